"""Every judgment with its full provenance, as a DataFrame or a CSV/Parquet/JSONL file.

One row per judgment row — edits, undos and their originals included — with ``current``
(store/judgments.py decides) and ``superseded_by`` so a reader can rebuild any history.
Files are written to a temporary name beside the target and renamed into place, so a
crash never leaves half an export under the real name.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased

from store.errors import PathloopError
from store.judgments import is_current
from store.models import Annotator, Image, Judgment, Sample, Slide, Tile

FORMATS = ("csv", "parquet", "jsonl")
COLUMNS = [
    "judgment_id", "created_at", "annotator", "role", "verdict", "reasons", "comment", "seconds", "request_id",
    "supersedes_id", "superseded_by", "current", "item_kind", "sample_id", "generator_id", "class_name", "seed",
    "sampler", "steps", "guidance", "round_number", "tile_id", "tile_split", "tile_x", "tile_y", "slide_path",
    "image_sha256",
]
_INTS = ["supersedes_id", "superseded_by", "sample_id", "generator_id", "seed", "steps", "round_number", "tile_id",
         "tile_x", "tile_y"]


def _query():
    later = aliased(Judgment, name="superseding")
    return (
        select(Judgment.id.label("judgment_id"), Judgment.created_at, Annotator.username.label("annotator"),
               Annotator.role, Judgment.verdict, Judgment.reasons, Judgment.comment, Judgment.seconds,
               Judgment.request_id, Judgment.supersedes_id, later.id.label("superseded_by"),
               is_current().label("current"), Judgment.sample_id, Sample.generator_id,
               func.coalesce(Sample.class_name, Tile.class_name).label("class_name"), Sample.seed, Sample.sampler,
               Sample.steps, Sample.guidance, Sample.round_number, Judgment.tile_id, Tile.split.label("tile_split"),
               Tile.x.label("tile_x"), Tile.y.label("tile_y"), Slide.path.label("slide_path"),
               Image.sha256.label("image_sha256"))
        .join(Annotator, Annotator.id == Judgment.annotator_id)
        .outerjoin(later, later.supersedes_id == Judgment.id)
        .outerjoin(Sample, Sample.id == Judgment.sample_id)
        .outerjoin(Tile, Tile.id == Judgment.tile_id)
        .outerjoin(Slide, Slide.id == Tile.slide_id)
        .outerjoin(Image, Image.id == func.coalesce(Sample.image_id, Tile.image_id))
        .order_by(Judgment.id)
    )


def judgments_frame(engine: Engine) -> pd.DataFrame:
    """All judgment rows with annotator and item provenance; columns as ``COLUMNS``.

    ``item_kind`` is ``sample`` (synthetic) or ``control`` (a real tile); ``class_name`` is the
    class the item was shown as; ``created_at`` is UTC.
    """
    with engine.connect() as conn:
        rows = conn.execute(_query()).mappings().all()
    df = pd.DataFrame([dict(r) for r in rows], columns=[c for c in COLUMNS if c != "item_kind"])
    df.insert(COLUMNS.index("item_kind"), "item_kind", ["sample" if pd.notna(v) else "control" for v in df["sample_id"]])
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
    df["reasons"] = ["; ".join(r or []) for r in df["reasons"]]
    df["current"] = df["current"].astype(bool)
    for c in _INTS:
        df[c] = df[c].astype("Int64")
    for c in ("seconds", "guidance"):
        df[c] = df[c].astype("float64")
    return df


def export_judgments(engine: Engine, out_path: str | os.PathLike, fmt: str) -> int:
    """Write every judgment to ``out_path`` as csv, parquet or jsonl; returns the row count."""
    if fmt not in FORMATS:
        raise PathloopError(f"export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    out = Path(out_path)
    if not out.parent.is_dir():
        raise PathloopError(f"cannot write {out}: folder {out.parent} does not exist")
    df = judgments_frame(engine)
    if df.empty:
        raise PathloopError("no judgments to export yet; rate some tiles first")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        elif fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", lines=True, date_format="iso", date_unit="us")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(df)
