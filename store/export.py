"""Every judgment with its full provenance, as a DataFrame or a CSV/Parquet/JSONL file; synthetic samples to share.

One row per judgment row — edits, undos and their originals included — with ``current``
(store/judgments.py decides) and ``superseded_by`` so a reader can rebuild any history.
Files are written to a temporary name beside the target and renamed into place, so a
crash never leaves half an export under the real name.
"""

from __future__ import annotations

import contextlib
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
    check_out_folder(out)
    if out.is_dir():
        raise PathloopError(f"cannot write {out}: it is a folder; give a file name such as {out / f'judgments.{fmt}'}")
    df = judgments_frame(engine)
    if df.empty:
        raise PathloopError("no judgments to export yet; rate some tiles first")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if fmt == "csv":
            df.to_csv(tmp, index=False, encoding="utf-8")
        elif fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", lines=True, date_format="iso", date_unit="us", force_ascii=False)
        os.replace(tmp, out)
    except OSError as e:
        raise PathloopError(f"cannot write {out}: {_reason(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return len(df)


def check_out_folder(out: Path) -> None:
    """Refuse an output path whose folder is missing or is a file, before anything is written."""
    parent = out.parent
    if parent.is_dir():
        return
    if parent.exists():
        raise PathloopError(f"cannot write {out}: {parent} is a file, not a folder")
    raise PathloopError(f"cannot write {out}: folder {parent} does not exist; create it first or choose another path")


def _reason(e: OSError) -> str:
    """An OSError as a few words (``Permission denied``), without the errno noise."""
    return e.strerror or str(e) or type(e).__name__


SAMPLE_COLUMNS = ["file", "sample_id", "generator_id", "class_name", "seed", "sampler", "steps", "guidance",
                  "round_number", "image_sha256", "copy_checked", "copy"]


def export_samples(ws, engine: Engine, out_dir: str | os.PathLike, *, generator_id: int | None = None,
                   copies: dict[int, bool] | None = None, exclude_copies: bool = False) -> tuple[int, int]:
    """Copy synthetic samples into a new folder ``out_dir``: ``<class>/<sample id>.png`` and ``manifest.csv``.

    ``generator_id``: that version's samples only (default every sample). ``copies`` maps a
    sample id to whether an evaluation flagged it as a near-copy of a real training tile; with
    ``exclude_copies`` the flagged ones are left out, and a sample no evaluation has checked is
    refused rather than shared unchecked. The folder appears complete or not at all. Returns
    ``(exported, left out)``.
    """
    import shutil

    out = Path(out_dir)
    if out.exists():
        raise PathloopError(f"{out} already exists; choose a new folder for the export")
    check_out_folder(out)
    copies = copies or {}
    query = (select(Sample.id, Sample.generator_id, Sample.class_name, Sample.seed, Sample.sampler, Sample.steps,
                    Sample.guidance, Sample.round_number, Image.path, Image.sha256)
             .join(Image, Image.id == Sample.image_id).order_by(Sample.id))
    if generator_id is not None:
        query = query.where(Sample.generator_id == generator_id)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    if not rows:
        which = f"generator version {generator_id}" if generator_id is not None else "the workspace"
        raise PathloopError(f"{which} has no samples to export; `pathloop generate` first")
    if exclude_copies:
        unchecked = [r.id for r in rows if r.id not in copies]
        if unchecked:
            raise PathloopError(f"{len(unchecked)} of {len(rows)} samples (first: sample {unchecked[0]}) have not been "
                                f"checked for copies of real tiles; run `pathloop evaluate` on generator version "
                                f"{next(r.generator_id for r in rows if r.id == unchecked[0])} first")
    kept = [r for r in rows if not (exclude_copies and copies[r.id])]
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        manifest = []
        for r in kept:
            rel = Path(r.class_name) / f"{r.id}.png"
            (tmp / r.class_name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ws.root / r.path, tmp / rel)
            manifest.append({"file": rel.as_posix(), "sample_id": r.id, "generator_id": r.generator_id,
                             "class_name": r.class_name, "seed": r.seed, "sampler": r.sampler, "steps": r.steps,
                             "guidance": r.guidance, "round_number": r.round_number, "image_sha256": r.sha256,
                             "copy_checked": r.id in copies, "copy": copies.get(r.id)})
        tmp.mkdir(exist_ok=True)
        frame = pd.DataFrame(manifest, columns=SAMPLE_COLUMNS)
        frame["round_number"] = frame["round_number"].astype("Int64")
        frame.to_csv(tmp / "manifest.csv", index=False, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        raise PathloopError(f"cannot write {out}: {_reason(e)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return len(kept), len(rows) - len(kept)
