"""Writing real tiles into the store: slides through OpenSlide, or an ImageFolder tree.

Every input is checked before anything is written (slides open, labels resolve, classes
are in ``pathloop.toml``). Each slide is then one transaction: its image files are written
first (content-addressed, atomic), its rows in one commit, and on any failure the files
this run created are removed again. Re-ingesting a slide adds only tiles it lacks.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from store import slides
from store.errors import PathloopError
from store.images import ShardWriter, encode, insert_shard_images, register_images, relative_path
from store.models import SPLITS, Slide, Tile, utcnow
from store.workspace import Workspace, class_key

SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass
class IngestResult:
    """What one slide or folder contributed."""

    source: str
    tiles_added: int = 0
    tiles_skipped: int = 0
    new_source: bool = True
    per_class: Counter = field(default_factory=Counter)
    per_split: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class SlideJob:
    path: Path
    info: slides.SlideInfo
    class_name: str | None
    regions: list | None


def read_labels(csv_path: Path, slide_paths: list[Path]) -> dict[Path, str]:
    """slide → class from a CSV with columns ``slide,class`` (slide by path, file name or stem)."""
    if not csv_path.is_file():
        raise PathloopError(f"labels file {csv_path} does not exist")
    by_key: dict[str, Path] = {}
    for p in slide_paths:
        for key in (str(p), p.name, p.stem, str(p.resolve())):
            by_key.setdefault(key, p)
    labels: dict[Path, str] = {}
    try:
        # utf-8-sig: Excel writes "CSV UTF-8" with a byte-order mark, which would stick to 'slide'.
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"slide", "class"} <= set(reader.fieldnames):
                raise PathloopError(f"labels file {csv_path}: expected a header with columns 'slide' and 'class'")
            for n, row in enumerate(reader, start=2):
                name, cls = (row.get("slide") or "").strip(), (row.get("class") or "").strip()
                if not name or not cls:
                    raise PathloopError(f"labels file {csv_path} line {n}: expected a slide and a class")
                if name not in by_key:
                    raise PathloopError(
                        f"labels file {csv_path} line {n}: slide {name!r} is not among the slides given"
                    )
                labels[by_key[name]] = cls
    except UnicodeDecodeError:
        with open(csv_path, "rb") as f:
            if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
                raise PathloopError(f"labels file {csv_path} is UTF-16 (Excel 'Unicode Text'); "
                                    "save it as 'CSV UTF-8' instead") from None
        raise PathloopError(f"labels file {csv_path} is not a text CSV file (expected UTF-8)") from None
    missing = [p for p in slide_paths if p not in labels]
    if missing:
        raise PathloopError(f"labels file {csv_path} has no class for slide {missing[0]}")
    return labels


def _regions_for(regions: Path, slide_path: Path, n_slides: int) -> Path:
    if regions.is_dir():
        candidate = regions / f"{slide_path.stem}.geojson"
        if not candidate.is_file():
            raise PathloopError(f"regions folder {regions} has no {candidate.name} for slide {slide_path}")
        return candidate
    if n_slides > 1:
        raise PathloopError(
            f"--regions {regions} is one file but {n_slides} slides were given; "
            "pass a folder holding SLIDE_STEM.geojson per slide"
        )
    if not regions.is_file():
        raise PathloopError(f"regions file {regions} does not exist")
    return regions


def plan_jobs(ws: Workspace, paths: list[Path], *, class_name: str | None, labels: Path | None,
              regions: Path | None) -> list[SlideJob]:
    """Open every slide and resolve its labels; fail before anything is written."""
    given = sum(x is not None for x in (class_name, labels, regions))
    if given != 1:
        raise PathloopError("give exactly one of --class NAME, --labels slides.csv, --regions FILE.geojson")
    if not paths:
        raise PathloopError("no slides given")
    label_map = read_labels(labels, paths) if labels is not None else {}
    jobs, seen = [], {}
    for p in paths:
        info = slides.slide_info(p)
        if info.sha256 in seen:
            raise PathloopError(f"slide {p} is the same file as {seen[info.sha256]}")
        seen[info.sha256] = p
        cls = class_name if class_name is not None else label_map.get(p)
        cls = class_key(cls) if cls is not None else None  # NFC, as pathloop.toml's classes
        region_list = None
        if regions is not None:
            rpath = _regions_for(regions, p, len(paths))
            region_list = slides.load_regions(rpath)
            for name, _geom in region_list:
                _check_class(ws, name, f"region class in {rpath}")
        else:
            _check_class(ws, cls, f"class of slide {p}")
        jobs.append(SlideJob(p, info, cls, region_list))
    return jobs


def _check_class(ws: Workspace, name: str, what: str) -> None:
    if name not in ws.settings.classes:
        raise PathloopError(
            f"{what} is {name!r}, which is not in classes of {ws.root / 'pathloop.toml'} "
            f"({', '.join(ws.settings.classes) or 'none yet'}); add it there first"
        )


def allot_splits(keys: list[str], seed: int, fractions=SPLIT_FRACTIONS) -> dict[str, str]:
    """Deal keys (slide hashes) to train/val/test by fractions, at least one each when possible."""
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    n = len(order)
    counts = [int(round(f * n)) for f in fractions]
    if n >= len(SPLITS):
        counts = [max(1, c) for c in counts]
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < n:
        counts[0] += 1
    out, i = {}, 0
    for split, c in zip(SPLITS, counts):
        for k in order[i:i + c]:
            out[k] = split
        i += c
    return out


def ingest_slides(ws: Workspace, engine: Engine, paths: Iterable[str | Path], *, class_name: str | None = None,
                  labels: Path | None = None, regions: Path | None = None, tile_size: int | None = None,
                  level: int | None = None, mpp: float | None = None, stride: int | None = None,
                  min_tissue: float = 0.5, workers: int = 0, split_by: str = "auto", seed: int = 0,
                  progress: Callable[[str, int], Iterable] | None = None) -> list[IngestResult]:
    """Tile slides into the store; see ``pathloop ingest --help`` for the meaning of each option."""
    paths = [Path(p) for p in paths]
    if split_by not in ("auto", "slide", "blocks"):
        raise PathloopError(f"--split-by {split_by!r}; expected auto, slide or blocks")
    if not 0 <= min_tissue <= 1:
        raise PathloopError(f"--min-tissue {min_tissue}; expected a fraction from 0 to 1")
    if level is not None and mpp is not None:
        raise PathloopError("give --level or --mpp, not both")
    jobs = plan_jobs(ws, paths, class_name=class_name, labels=labels, regions=regions)
    if split_by == "auto":
        split_by = "slide" if len(jobs) >= len(SPLITS) else "blocks"

    with Session(engine) as s:
        known = {sl.sha256: sl for sl in s.exec(select(Slide).where(
            Slide.sha256.in_([j.info.sha256 for j in jobs]))).all()}
    slide_split: dict[str, str] = {}
    if split_by == "slide":
        fresh = [j.info.sha256 for j in jobs if not (j.info.sha256 in known and known[j.info.sha256].split)]
        slide_split = allot_splits(fresh, seed)
        slide_split.update({k: v.split for k, v in known.items() if v.split})

    results = []
    for job in jobs:
        specs = slides.plan_tiles(
            job.path, tile_size=tile_size or ws.settings.tile_size, level=level, mpp=mpp, stride=stride,
            min_tissue=min_tissue, class_name=job.class_name, regions=job.regions,
        )
        if split_by == "slide":
            assigned = [(spec, slide_split[job.info.sha256]) for spec in specs]
        else:
            slide_seed = int(hashlib.sha256(f"{seed}:{job.info.sha256}".encode()).hexdigest()[:8], 16)
            assigned = slides.assign_block_splits(specs, seed=slide_seed, fractions=SPLIT_FRACTIONS)
        results.append(_write_slide(ws, engine, job, assigned, known.get(job.info.sha256),
                                    slide_split.get(job.info.sha256), workers, progress))
    return results


def _write_slide(ws, engine, job: SlideJob, assigned, existing: Slide | None, whole_split: str | None,
                 workers: int, progress) -> IngestResult:
    result = IngestResult(str(job.path), new_source=existing is None)
    with Session(engine) as s:
        have = set()
        if existing is not None:
            have = set(s.exec(select(Tile.level, Tile.x, Tile.y, Tile.extent).where(
                Tile.slide_id == existing.id)).all())
    todo = [(spec, split) for spec, split in assigned if (spec.level, spec.x, spec.y, spec.extent) not in have]
    result.tiles_skipped = len(assigned) - len(todo)
    if not todo:
        return result
    split_of = {id(spec): split for spec, split in todo}
    tiles = slides.read_tiles(job.path, [spec for spec, _ in todo], out_size=ws.settings.tile_size,
                              workers=workers)
    if progress is not None:
        tiles = progress(f"{job.path.name}", len(todo))(tiles)
    shard = ShardWriter(ws.root, job.info.sha256[:16])
    try:
        # Tiles go to the shard as they arrive; only their rows wait for the commit, as plain
        # tuples, so memory stays small however large the slide.
        rows: list[tuple[slides.TileSpec, str, str]] = []
        images: dict[str, dict] = {}
        for spec, tile in tiles:
            offset, length = shard.append(tile.data)
            rows.append((spec, split_of[id(spec)], tile.sha256))
            images.setdefault(tile.sha256, {"sha256": tile.sha256, "width": tile.width, "height": tile.height,
                                            "path": relative_path(tile.sha256), "offset": offset,
                                            "length": length, "codec": tile.codec})
        rel = shard.publish()
        with Session(engine) as s:
            slide = existing or Slide(
                path=str(job.path.resolve()), sha256=job.info.sha256, vendor=job.info.vendor, mpp=job.info.mpp,
                width=job.info.width, height=job.info.height, label=job.class_name, split=whole_split,
            )
            if existing is not None:
                slide = s.merge(existing)
            s.add(slide)
            s.flush()
            image_ids = insert_shard_images(s, rel, images)
            s.execute(insert(Tile), [
                {"image_id": image_ids[sha], "slide_id": slide.id, "level": spec.level, "x": spec.x, "y": spec.y,
                 "extent": spec.extent, "tissue": round(float(spec.tissue), 4), "class_name": spec.class_name,
                 "split": split, "created_at": utcnow()}
                for spec, split, sha in rows])
            s.commit()
        for spec, split, _ in rows:
            result.per_class[spec.class_name] += 1
            result.per_split[split] += 1
        result.tiles_added = len(rows)
    except BaseException:
        shard.discard()
        raise
    return result


def import_tiles(ws: Workspace, engine: Engine, folder: Path, seed: int = 0) -> IngestResult:
    """Import an ImageFolder tree: FOLDER/CLASS/*.png, or FOLDER/{train,val,test}/CLASS/*.png.

    Without split folders, each image's split follows a hash of its pixels (stable on rerun).
    Images must already be ``tile_size`` square: resizing someone's crops silently would
    change their scale.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PathloopError(f"tile folder {folder} does not exist or is not a folder")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and {p.name for p in subdirs} <= set(SPLITS):
        groups = [(split, c) for d in subdirs for c in sorted(x for x in d.iterdir() if x.is_dir())
                  for split in [d.name]]
    else:
        groups = [(None, d) for d in subdirs]
    files = []
    for split, class_dir in groups:
        cls = class_key(class_dir.name)  # macOS writes folder names decomposed (NFD)
        _check_class(ws, cls, f"class folder {class_dir}")
        files += [(split, cls, f) for f in sorted(class_dir.iterdir())
                  if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise PathloopError(f"tile folder {folder} holds no images in class subfolders (expected FOLDER/CLASS/*.png)")
    size = ws.settings.tile_size
    encoded = []
    for split, cls, f in files:
        try:
            with PILImage.open(f) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise PathloopError(f"{f} is not an image pathloop can read: {e}") from None
        if rgb.shape[:2] != (size, size):
            raise PathloopError(f"{f} is {rgb.shape[1]}x{rgb.shape[0]}; expected {size}x{size} (the workspace tile_size)")
        enc = encode(rgb)
        if split is None:
            bucket = int(hashlib.sha256(f"{seed}:{enc.sha256}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            split = "train" if bucket < SPLIT_FRACTIONS[0] else "val" if bucket < sum(SPLIT_FRACTIONS[:2]) else "test"
        encoded.append((split, cls, enc))

    result = IngestResult(str(folder))
    written: list[str] = []
    try:
        with Session(engine) as s:
            image_ids = register_images(s, {e.sha256: (e.width, e.height) for _, _, e in encoded})
            have = set(s.exec(select(Tile.image_id, Tile.class_name).where(
                Tile.slide_id.is_(None), Tile.image_id.in_(list(image_ids.values())))).all())
            for split, cls, enc in encoded:
                rel, new = ws.images.put(enc)
                if new:
                    written.append(rel)
                key = (image_ids[enc.sha256], cls)
                if key in have:
                    result.tiles_skipped += 1
                    continue
                have.add(key)
                s.add(Tile(image_id=key[0], class_name=cls, split=split))
                result.tiles_added += 1
                result.per_class[cls] += 1
                result.per_split[split] += 1
            s.commit()
    except BaseException:
        ws.images.remove(written)
        raise
    return result
