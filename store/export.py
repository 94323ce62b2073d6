"""Every judgment with its full provenance, as a DataFrame or a CSV/Parquet/JSONL file; synthetic samples to share;
the experts' feedback as preference pairs (Pick-a-Pic layout, Diffusion-DPO) or binary labels (Diffusion-KTO style).

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
    return write_table(lambda: judgments_frame(engine), out_path, fmt, "judgments",
                       "no judgments to export yet; rate some tiles first")


def write_table(frame, out_path: str | os.PathLike, fmt: str, name: str, empty: str) -> int:
    """Write ``frame()`` (called once the path is checked) as csv, parquet or jsonl, atomically;
    refuses with ``empty`` when it has no rows. Returns the row count."""
    if fmt not in FORMATS:
        raise PathloopError(f"export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    out = Path(out_path)
    check_out_folder(out)
    if out.is_dir():
        raise PathloopError(f"cannot write {out}: it is a folder; give a file name such as {out / f'{name}.{fmt}'}")
    df = frame()
    if df.empty:
        raise PathloopError(empty)

    def write(tmp: Path) -> None:
        if fmt == "csv":
            df.to_csv(tmp, index=False, encoding="utf-8")
        elif fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_json(tmp, orient="records", lines=True, date_format="iso", date_unit="us", force_ascii=False)

    _write_atomically(out, write)
    return len(df)


def _write_atomically(out: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``out``, renamed into place; an OS error is one line."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise PathloopError(f"cannot write {out}: {_reason(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


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


# --- Feedback in the layouts preference-tuning code reads ------------------------------------
#
# ``pairs``: Pick-a-Pic v2 columns, what the diffusers Diffusion-DPO example
# (examples/research_projects/diffusion_dpo/train_diffusion_dpo.py) reads: ``jpg_0``/``jpg_1``
# (JPEG bytes), ``label_0`` (1.0 when image 0 is preferred, 0.0 when image 1 is; this export
# never writes a 0.5 tie), ``caption`` (the prompt: here the class name).
# ``binary``: one row per rated sample, Diffusion-KTO style: ``image`` bytes, ``caption``,
# ``label`` (1 plausible, 0 implausible).

PAIR_COLUMNS = ["jpg_0", "jpg_1", "label_0", "label_1", "caption", "sample_id_0", "sample_id_1", "generator_id_0",
                "generator_id_1", "round_number_0", "round_number_1", "plausible_0", "implausible_0", "plausible_1",
                "implausible_1"]
BINARY_COLUMNS = ["image", "caption", "label", "sample_id", "generator_id", "round_number", "seed", "plausible",
                  "implausible", "image_sha256"]
PAIR_BY = ("generator", "round", "class")
IMAGE_FORMATS = ("jpeg", "png")
JPEG_QUALITY = 95


class _Rated:
    """A sample's current decisive votes with what the exports need to name and read it."""

    __slots__ = ("sample_id", "generator_id", "round_number", "seed", "class_name", "sha256", "location",
                 "width", "plausible", "implausible")

    def __init__(self, row, location):
        self.sample_id, self.generator_id, self.round_number = row.sample_id, row.generator_id, row.round_number
        self.seed, self.class_name, self.sha256, self.width = row.seed, row.class_name, row.sha256, row.width
        self.location = location
        self.plausible = self.implausible = 0

    @property
    def ratings(self) -> int:
        return self.plausible + self.implausible

    @property
    def label(self) -> int | None:
        """1 when most current decisive judgments say plausible, 0 when most say implausible, None on a tie."""
        if self.plausible == self.implausible:
            return None
        return int(self.plausible > self.implausible)


def _rated(ws, engine: Engine, min_ratings: int) -> list[_Rated]:
    """Samples with at least ``min_ratings`` current plausible/implausible judgments, by id (unsure left out)."""
    from store.images import locate, location_columns
    from store.judgments import DECISIVE

    if min_ratings < 1:
        raise PathloopError(f"--min-ratings {min_ratings}; expected a whole number of at least 1")
    query = (select(Judgment.sample_id, Judgment.verdict, Sample.generator_id, Sample.round_number, Sample.seed,
                    Sample.class_name, Image.sha256, *location_columns())
             .join(Sample, Sample.id == Judgment.sample_id).join(Image, Image.id == Sample.image_id)
             .where(Judgment.sample_id.is_not(None), Judgment.verdict.in_(DECISIVE), is_current())
             .order_by(Judgment.sample_id, Judgment.id))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    by_id: dict[int, _Rated] = {}
    for r in rows:
        item = by_id.get(r.sample_id)
        if item is None:
            item = by_id[r.sample_id] = _Rated(r, locate(ws.root, r.path, r.shard, r.offset, r.length, r.codec,
                                                         r.width, r.height))
        if r.verdict == "plausible":
            item.plausible += 1
        else:
            item.implausible += 1
    return [x for x in by_id.values() if x.ratings >= min_ratings]


def _encoder(fmt: str):
    """A function from a rated sample to its image bytes (cached: a sample may sit in many pairs)."""
    import io

    from PIL import Image as PILImage

    from store.images import load_rgb

    if fmt not in IMAGE_FORMATS:
        raise PathloopError(f"image format {fmt!r}; expected one of: {', '.join(IMAGE_FORMATS)}")
    cache: dict[int, bytes] = {}

    def encode(item: _Rated) -> bytes:
        if item.sample_id not in cache:
            buf = io.BytesIO()
            im = PILImage.fromarray(load_rgb(item.location, item.width))
            if fmt == "jpeg":
                im.save(buf, format="JPEG", quality=JPEG_QUALITY)
            else:
                im.save(buf, format="PNG")
            cache[item.sample_id] = buf.getvalue()
        return cache[item.sample_id]

    return encode


def _write_parquet(table, out: Path) -> None:
    """``table`` to ``out`` through a temporary file beside it, renamed into place."""
    import pyarrow.parquet as pq

    _write_atomically(out, lambda tmp: pq.write_table(table, tmp))


def _check_parquet_out(out: Path, default_name: str) -> None:
    check_out_folder(out)
    if out.is_dir():
        raise PathloopError(f"cannot write {out}: it is a folder; give a file name such as {out / default_name}")


def _pair_key(item: _Rated, pair_by: str) -> tuple:
    if pair_by == "generator":
        return (item.class_name, item.generator_id)
    if pair_by == "round":
        return (item.class_name, -1 if item.round_number is None else item.round_number)
    return (item.class_name,)


def preference_pairs(ws, engine: Engine, *, min_ratings: int = 2, pair_by: str = "generator",
                     max_pairs: int | None = 10_000, seed: int = 0) -> list[tuple[_Rated, _Rated, bool]]:
    """(plausible, implausible, swapped) triples: which pairs the ``pairs`` export writes, in order.

    A sample is plausible when most of its current decisive judgments say so, implausible when
    most say not; ties and samples below ``min_ratings`` are left out. Within each group (class
    and generator version, class and round, or class alone) every plausible sample is paired
    with every implausible one; when there are more than ``max_pairs`` pairs in all, that many
    are drawn at random without replacement (seeded). ``swapped`` (a seeded coin flip per pair)
    puts the implausible image first, so ``label_0`` is 1.0 or 0.0 about equally often.
    """
    import numpy as np

    if pair_by not in PAIR_BY:
        raise PathloopError(f"--pair-by {pair_by!r}; expected one of: {', '.join(PAIR_BY)}")
    if max_pairs is not None and max_pairs < 1:
        raise PathloopError(f"--max-pairs {max_pairs}; expected a whole number of at least 1")
    groups: dict[tuple, tuple[list[_Rated], list[_Rated]]] = {}
    for item in _rated(ws, engine, min_ratings):
        if item.label is not None:
            groups.setdefault(_pair_key(item, pair_by), ([], []))[1 - item.label].append(item)
    groups = {k: v for k, v in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))) if v[0] and v[1]}
    sizes = np.array([len(pos) * len(neg) for pos, neg in groups.values()], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return []
    rng = np.random.default_rng(seed)
    if max_pairs is None or total <= max_pairs:
        picks = np.arange(total, dtype=np.int64)
    else:
        picks = np.sort(rng.choice(total, size=max_pairs, replace=False))
    swaps = rng.random(len(picks)) < 0.5
    ends = np.cumsum(sizes)
    members = list(groups.values())
    out = []
    for pick, swap in zip(picks.tolist(), swaps.tolist(), strict=True):
        g = int(np.searchsorted(ends, pick, side="right"))
        pos, neg = members[g]
        r = pick - int(ends[g] - sizes[g])
        out.append((pos[r // len(neg)], neg[r % len(neg)], bool(swap)))
    return out


def export_pairs(ws, engine: Engine, out_path: str | os.PathLike, *, min_ratings: int = 2,
                 pair_by: str = "generator", max_pairs: int | None = 10_000, seed: int = 0) -> int:
    """Write preference pairs as Parquet in the Pick-a-Pic v2 layout (``PAIR_COLUMNS``); returns the pair count.

    ``jpg_0``/``jpg_1`` are JPEG bytes (quality 95, so not bit-exact to the stored PNGs),
    ``label_0`` is 1.0 when image 0 is the plausible one and 0.0 when image 1 is, ``label_1``
    its complement, ``caption`` the class name. Which pairs: ``preference_pairs``.
    """
    import pyarrow as pa

    out = Path(out_path)
    _check_parquet_out(out, "pairs.parquet")
    pairs = preference_pairs(ws, engine, min_ratings=min_ratings, pair_by=pair_by, max_pairs=max_pairs, seed=seed)
    if not pairs:
        raise PathloopError(f"no preference pairs to export: no class (per {pair_by}) has both a sample most experts "
                            f"rated plausible and one most rated implausible, with at least {min_ratings} current "
                            f"plausible/implausible judgment(s) each; rate more samples or lower --min-ratings")
    encode = _encoder("jpeg")
    cols: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    for good, bad, swap in pairs:
        first, second = (bad, good) if swap else (good, bad)
        label = 0.0 if swap else 1.0
        for name, value in (("jpg_0", encode(first)), ("jpg_1", encode(second)), ("label_0", label),
                            ("label_1", 1.0 - label), ("caption", good.class_name)):
            cols[name].append(value)
        for k, item in (("0", first), ("1", second)):
            cols[f"sample_id_{k}"].append(item.sample_id)
            cols[f"generator_id_{k}"].append(item.generator_id)
            cols[f"round_number_{k}"].append(item.round_number)
            cols[f"plausible_{k}"].append(item.plausible)
            cols[f"implausible_{k}"].append(item.implausible)
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(),
             "caption": pa.string()}
    schema = pa.schema([(c, types.get(c, pa.int64())) for c in PAIR_COLUMNS])
    _write_parquet(pa.Table.from_pydict(cols, schema=schema), out)
    return len(pairs)


def export_binary(ws, engine: Engine, out_path: str | os.PathLike, *, min_ratings: int = 2,
                  image_format: str = "jpeg") -> tuple[int, int]:
    """Write one row per rated sample as Parquet (``BINARY_COLUMNS``); returns ``(rows, ties left out)``.

    ``image`` holds JPEG (quality 95, lossy) or PNG (lossless) bytes, ``caption`` the class
    name, ``label`` 1 when most of the sample's current decisive judgments say plausible and 0
    when most say implausible; ties and samples below ``min_ratings`` are left out.
    """
    import pyarrow as pa

    out = Path(out_path)
    _check_parquet_out(out, "binary.parquet")
    encode = _encoder(image_format)
    rated = _rated(ws, engine, min_ratings)
    kept = [x for x in rated if x.label is not None]
    if not kept:
        ties = f" ({len(rated)} rated, all ties)" if rated else ""
        raise PathloopError(f"no rated samples to export: none has at least {min_ratings} current "
                            f"plausible/implausible judgment(s) with a majority{ties}; rate more samples or lower "
                            f"--min-ratings")
    cols = {"image": [encode(x) for x in kept], "caption": [x.class_name for x in kept],
            "label": [x.label for x in kept], "sample_id": [x.sample_id for x in kept],
            "generator_id": [x.generator_id for x in kept], "round_number": [x.round_number for x in kept],
            "seed": [x.seed for x in kept], "plausible": [x.plausible for x in kept],
            "implausible": [x.implausible for x in kept], "image_sha256": [x.sha256 for x in kept]}
    types = {"image": pa.binary(), "caption": pa.string(), "image_sha256": pa.string()}
    schema = pa.schema([(c, types.get(c, pa.int64())) for c in BINARY_COLUMNS])
    _write_parquet(pa.Table.from_pydict(cols, schema=schema), out)
    return len(kept), len(rated) - len(kept)
