"""Whole-slide images through OpenSlide: slide facts, tissue mask, tile grid, tile export.

No SQL here: these functions return plain dataclasses and encoded images, and the ingest
glue stores them. Coordinates are level-0 pixels unless a name says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import shapely
from PIL import Image
from scipy import ndimage
from skimage import color, filters

from store.errors import PathloopError
from store.images import EncodedImage, encode

# Saturation of bare glass is ~0.008 (measured on the scikit-image IHC lumen); pale stroma
# sits at ~0.03. Otsu on a slide that is nearly all tissue splits brown from blue tissue
# (0.26 on the IHC image), so the threshold is capped just above glass and floored at it.
GLASS_SATURATION = 0.01
PALE_TISSUE_SATURATION = 0.02


@dataclass(frozen=True)
class SlideInfo:
    """What the Slide table records about one file."""

    path: str
    sha256: str
    vendor: str | None
    width: int
    height: int
    mpp: float | None
    level_count: int
    level_dimensions: tuple
    level_downsamples: tuple


@dataclass(frozen=True)
class TileSpec:
    """One tile to read: ``read_size`` px square at ``level``, top-left ``(x, y)`` in level 0.

    ``extent`` is the level-0 edge it covers; ``block`` the spatial block holding (x, y);
    ``touches`` every block its extent overlaps (for leak-free block splits).
    """

    level: int
    x: int
    y: int
    read_size: int
    extent: int
    tissue: float
    class_name: str
    block: int
    touches: tuple[int, ...] = ()


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    p = Path(path)
    if not p.is_file():
        raise PathloopError(f"{p} does not exist or is not a file")
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def open_slide(path) -> openslide.OpenSlide:
    """Open a slide, turning every OpenSlide failure into a one-line PathloopError."""
    p = Path(path)
    if not p.exists():
        raise PathloopError(f"slide {p} does not exist")
    try:
        slide = openslide.OpenSlide(str(p))
        # Opening only parses headers; a truncated file fails when its last tile is read.
        last = slide.level_count - 1
        w, h = slide.level_dimensions[last]
        corner = (round((w - 1) * slide.level_downsamples[last]), round((h - 1) * slide.level_downsamples[last]))
        slide.read_region(corner, last, (1, 1))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as e:
        raise PathloopError(f"{p} is not a slide OpenSlide can read: {e}") from None
    return slide


def _slide_mpp(slide: openslide.OpenSlide) -> float | None:
    value = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
    return float(value) if value else None


def slide_info(path) -> SlideInfo:
    """Facts about a slide file (opens it, hashes it)."""
    slide = open_slide(path)
    try:
        return SlideInfo(
            path=str(Path(path)),
            sha256=file_sha256(path),
            vendor=slide.properties.get(openslide.PROPERTY_NAME_VENDOR),
            width=slide.dimensions[0],
            height=slide.dimensions[1],
            mpp=_slide_mpp(slide),
            level_count=slide.level_count,
            level_dimensions=tuple(slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        )
    finally:
        slide.close()


def rgb_tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)`` tissue mask of an ``(H, W, 3)`` uint8 image (capped Otsu on saturation)."""
    saturation = filters.gaussian(color.rgb2hsv(rgb)[..., 1], sigma=1)
    if np.ptp(saturation) == 0:
        return np.zeros(saturation.shape, bool)
    threshold = filters.threshold_otsu(saturation)
    threshold = min(max(threshold, GLASS_SATURATION), PALE_TISSUE_SATURATION)
    mask = saturation > threshold
    # Specks under 0.05% and holes under 0.5% of the thumbnail are noise, not anatomy.
    mask = _without_small_components(mask, mask.size // 2000)
    return ~_without_small_components(~mask, mask.size // 200)


def _without_small_components(mask: np.ndarray, max_area: int) -> np.ndarray:
    labels, _ = ndimage.label(mask)
    small = np.bincount(labels.ravel()) <= max_area
    small[0] = False
    return mask & ~small[labels]


def tissue_mask(slide: openslide.OpenSlide, max_size: int = 1024) -> tuple[np.ndarray, float]:
    """Tissue mask over a thumbnail at most ``max_size`` px: ``(H, W)`` bool and level-0 px per mask px."""
    thumb = slide.get_thumbnail((max_size, max_size))
    mask = rgb_tissue_mask(np.asarray(thumb.convert("RGB")))
    return mask, slide.dimensions[0] / mask.shape[1]


def load_regions(geojson_path) -> list[tuple[str, shapely.Geometry]]:
    """Classified polygons from a QuPath GeoJSON export, as ``(class name, geometry)`` in level-0 px."""
    p = Path(geojson_path)
    if not p.is_file():
        raise PathloopError(f"regions file {p} does not exist")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PathloopError(f"{p} is not valid GeoJSON: {e}") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        features = doc
    if not isinstance(features, list):
        raise PathloopError(f"{p} is not valid GeoJSON: expected a FeatureCollection, a Feature or a list of features")
    regions = []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise PathloopError(f"{p} is not valid GeoJSON: feature {i} is a {type(feature).__name__}, not an object")
        classification = (feature.get("properties") or {}).get("classification")
        name = classification.get("name") if isinstance(classification, dict) else classification
        if not isinstance(name, str) or not name or not feature.get("geometry"):
            continue
        try:
            geometry = shapely.geometry.shape(feature["geometry"])
        except (shapely.errors.GEOSException, ValueError, TypeError, KeyError, AttributeError) as e:
            raise PathloopError(f"{p} is not valid GeoJSON: feature {i} has a bad geometry: {e}") from None
        if not geometry.is_valid:
            geometry = shapely.make_valid(geometry)
        # make_valid can leave stray lines and points; only areas label tiles.
        polygons = [g for g in shapely.get_parts(geometry) if g.geom_type in ("Polygon", "MultiPolygon")]
        if polygons and (area := shapely.union_all(polygons)).area > 0:
            regions.append((name, area))
    if not regions:
        raise PathloopError(f"{p} has no classified regions (expected features with properties.classification.name)")
    return regions


def _region_coverage(boxes: np.ndarray, regions: list) -> tuple[list[str], np.ndarray]:
    """Share of each box covered by each class: class names and an ``(n_boxes, n_classes)`` array."""
    names = sorted({name for name, _ in regions})
    parts, part_class = [], []
    for k, name in enumerate(names):
        # Union per class first so overlapping regions of one class are not counted twice.
        merged = shapely.union_all([g for n, g in regions if n == name])
        for part in shapely.get_parts(merged):
            parts.append(part)
            part_class.append(k)
    parts = np.array(parts, dtype=object)
    shapely.prepare(parts)
    part_class = np.array(part_class)
    tree = shapely.STRtree(parts)
    box_idx, part_idx = tree.query(boxes, predicate="intersects")
    inside = shapely.contains(parts[part_idx], boxes[box_idx])
    areas = shapely.area(boxes[box_idx])
    partial = ~inside
    areas[partial] = shapely.area(shapely.intersection(boxes[box_idx[partial]], parts[part_idx[partial]]))
    coverage = np.zeros((len(boxes), len(names)))
    np.add.at(coverage, (box_idx, part_class[part_idx]), areas)
    return names, coverage / shapely.area(boxes)[:, None]


def _choose_level(slide, name, tile_size, level, mpp) -> tuple[int, int]:
    """The level to read and the edge to read there: ``(level, read_size)``."""
    if level is not None and mpp is not None:
        raise PathloopError("give a level or an mpp, not both")
    if mpp is None:
        level = 0 if level is None else level
        if not 0 <= level < slide.level_count:
            raise PathloopError(f"level {level} does not exist in {name} (levels 0..{slide.level_count - 1})")
        return level, tile_size
    base = _slide_mpp(slide)
    if base is None:
        raise PathloopError(f"{name} has no mpp (openslide.mpp-x); choose a level instead of mpp {mpp}")
    level_mpps = [base * d for d in slide.level_downsamples]
    # A small tolerance: level downsamples are ratios of rounded sizes.
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= mpp * 1.001]
    if not fine_enough:
        raise PathloopError(f"mpp {mpp} is finer than level 0 of {name} ({base:g} µm/px)")
    level = fine_enough[-1]
    return level, max(1, round(tile_size * mpp / level_mpps[level]))


def plan_tiles(
    path_or_slide,
    *,
    tile_size: int,
    level: int | None = None,
    mpp: float | None = None,
    stride: int | None = None,
    min_tissue: float = 0.5,
    class_name: str | None = None,
    regions: list | None = None,
    block_size: int | None = None,
) -> list[TileSpec]:
    """The labelled tile grid of one slide, row by row.

    ``tile_size`` and ``stride`` are pixels at the chosen ``level``, or at the target ``mpp``
    (then a proportionally larger square is read at the deepest level at least that fine,
    and ``read_tiles(out_size=tile_size)`` resizes it). Label every tile ``class_name``, or
    by ``regions`` (from ``load_regions``): the class covering most of the tile, if it covers
    at least half. ``block_size`` (level-0 px) defaults to about a 4x4 grid of blocks.
    """
    if (class_name is None) == (regions is None):
        raise PathloopError("plan_tiles needs exactly one of class_name or regions")
    if tile_size < 1 or (stride is not None and stride < 1):
        raise PathloopError(f"tile size {tile_size} and stride {stride} must be positive")
    own = not isinstance(path_or_slide, openslide.AbstractSlide)
    slide = open_slide(path_or_slide) if own else path_or_slide
    name = str(path_or_slide) if own else getattr(slide, "_filename", "slide")
    try:
        level, read_size = _choose_level(slide, name, tile_size, level, mpp)
        width, height = slide.dimensions
        extent = round(read_size * slide.level_downsamples[level])
        if extent > min(width, height):
            raise PathloopError(
                f"tile of {extent}x{extent} level-0 px ({read_size} px at level {level}) is larger than "
                f"slide {name} ({width}x{height})"
            )
        step = max(1, round((stride or tile_size) * extent / tile_size))
        mask, scale = tissue_mask(slide)
    finally:
        if own:
            slide.close()
    if not mask.any():
        raise PathloopError(f"no tissue found in {name}")

    ys, xs = np.mgrid[0 : height - extent + 1 : step, 0 : width - extent + 1 : step]
    xs, ys = xs.ravel(), ys.ravel()
    # Summed-area table: the tissue share of any box in O(1).
    sat = np.pad(mask.cumsum(0).cumsum(1, dtype=np.int64), ((1, 0), (1, 0)))
    mh, mw = mask.shape
    x0 = np.clip(np.floor(xs / scale).astype(int), 0, mw - 1)
    y0 = np.clip(np.floor(ys / scale).astype(int), 0, mh - 1)
    x1 = np.clip(np.ceil((xs + extent) / scale).astype(int), x0 + 1, mw)
    y1 = np.clip(np.ceil((ys + extent) / scale).astype(int), y0 + 1, mh)
    tissue = (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) / ((y1 - y0) * (x1 - x0))
    n_grid = len(xs)
    keep = tissue >= min_tissue
    xs, ys, tissue = xs[keep], ys[keep], tissue[keep]
    n_tissue = len(xs)

    if regions is not None:
        names, coverage = _region_coverage(shapely.box(xs, ys, xs + extent, ys + extent), regions)
        best = coverage.argmax(1)
        keep = coverage[np.arange(len(xs)), best] >= 0.5
        xs, ys, tissue = xs[keep], ys[keep], tissue[keep]
        labels = [names[k] for k in best[keep]]
    else:
        labels = [class_name] * len(xs)
    if not len(xs):
        raise PathloopError(
            f"no tile of {name} survives: {n_grid} on the grid, {n_tissue} with tissue >= {min_tissue}"
            + (", none of them at least half inside one class's regions" if n_tissue else "")
        )

    block_size = block_size or max(4 * extent, math.ceil(max(width, height) / 4))
    n_bx = math.ceil(width / block_size)
    specs = []
    for x, y, t, label in zip(xs.tolist(), ys.tolist(), tissue.tolist(), labels):
        bx = range(x // block_size, (x + extent - 1) // block_size + 1)
        by = range(y // block_size, (y + extent - 1) // block_size + 1)
        touches = tuple(j * n_bx + i for j in by for i in bx)
        block = (y // block_size) * n_bx + x // block_size
        specs.append(TileSpec(level, x, y, read_size, extent, round(t, 4), label, block, touches))
    return specs


def _split_counts(n: int, fractions) -> list[int]:
    """Blocks per split: largest remainder, then at least one each when there are >= 3."""
    exact = [n * f for f in fractions]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(3), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
        counts[i] += 1
    while n >= 3 and 0 in counts:
        counts[counts.index(0)] += 1
        counts[counts.index(max(counts))] -= 1
    return counts


def assign_block_splits(specs, seed: int, fractions=(0.7, 0.15, 0.15)) -> list[tuple[TileSpec, str]]:
    """("train" | "val" | "test") per tile by spatial block; tiles reaching into another split's block are dropped."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise PathloopError(f"split fractions {tuple(fractions)} must be three non-negative numbers summing to 1")
    blocks = sorted({s.block for s in specs})
    order = np.random.default_rng(seed).permutation(len(blocks))
    bounds = np.cumsum(_split_counts(len(blocks), fractions))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[blocks[i]] = ("train", "val", "test")[int(np.searchsorted(bounds, rank, side="right"))]
    # A tile reaching into a block of another split (or one with no split) could overlap a tile
    # of that split; dropping it is what keeps overlapping tiles out of two splits.
    return [
        (s, split_of[s.block])
        for s in specs
        if all(split_of.get(b) == split_of[s.block] for b in s.touches or (s.block,))
    ]


_worker_slide: openslide.OpenSlide | None = None
_worker_path = ""


def _open_worker(path: str) -> None:
    global _worker_slide, _worker_path
    _worker_slide, _worker_path = open_slide(path), path


def _read_one(slide, path, spec: TileSpec, out_size: int) -> EncodedImage:
    try:
        region = slide.read_region((spec.x, spec.y), spec.level, (spec.read_size, spec.read_size))
    except openslide.OpenSlideError as e:
        raise PathloopError(f"{path}: reading the tile at ({spec.x}, {spec.y}) level {spec.level} failed: {e}") from None
    # Transparent pixels (outside the scanned area) become white, like glass.
    rgb = Image.new("RGB", region.size, "white")
    rgb.paste(region, mask=region.getchannel("A"))
    if spec.read_size != out_size:
        rgb = rgb.resize((out_size, out_size), Image.Resampling.LANCZOS)
    return encode(np.asarray(rgb))


def _read_chunk(args) -> list[EncodedImage]:
    specs, out_size = args
    return [_read_one(_worker_slide, _worker_path, s, out_size) for s in specs]


def read_tiles(
    path, specs, *, out_size: int, workers: int | None = 1, chunk: int = 64
) -> Iterator[tuple[TileSpec, EncodedImage]]:
    """Read, resize to ``out_size`` and encode each tile, yielding in input order.

    ``workers`` > 1 reads in that many spawned processes, each with its own OpenSlide handle
    (0 or None: one per CPU); hashing and PNG encoding happen there too.
    """
    if out_size < 1:
        raise PathloopError(f"out_size {out_size} must be positive")
    specs = list(specs)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(specs) <= chunk:
        slide = open_slide(path)
        try:
            for spec in specs:
                yield spec, _read_one(slide, path, spec, out_size)
        finally:
            slide.close()
        return
    chunks = [(specs[i : i + chunk], out_size) for i in range(0, len(specs), chunk)]
    # spawn: forking a parent that holds torch or OpenSlide threads can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(chunks)), initializer=_open_worker, initargs=(str(path),)) as pool:
        for (chunk_specs, _), images in zip(chunks, pool.imap(_read_chunk, chunks)):
            yield from zip(chunk_specs, images)
