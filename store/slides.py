"""Whole-slide images through OpenSlide: slide facts, tissue mask, tile grid, tile export.

No SQL here: these functions return plain dataclasses and encoded images, and the ingest
glue stores them. Coordinates are level-0 pixels unless a name says otherwise.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import shapely
from PIL import Image
from skimage import color, filters

from store.errors import PathloopError
from store.images import StoredTile, decode_shard_record, encode_for_shard, pixel_sha256
from store.regions import load_regions, region_coverage

__all__ = [
    "SlideInfo",
    "TileSpec",
    "assign_block_splits",
    "file_sha256",
    "load_regions",
    "open_slide",
    "plan_tiles",
    "read_tiles",
    "rgb_tissue_mask",
    "slide_info",
    "tissue_mask",
]

# Saturation of bare glass is ~0.008 (measured on the scikit-image IHC lumen); pale stroma
# sits at ~0.03. On a slide that is nearly all tissue, Otsu splits brown from blue tissue
# (0.26 on the IHC image), so its threshold is clamped between these two: never into glass
# noise, never above pale stroma.
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
        # Opening also hashes the smallest level, so a truncated file fails here.
        return openslide.OpenSlide(str(p))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as e:
        raise PathloopError(f"{p} is not a slide OpenSlide can read: {e}") from None


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
    # Imported here: scipy doubles the start-up time of every tile-reading worker.
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    small = np.bincount(labels.ravel()) <= max_area
    small[0] = False
    return mask & ~small[labels]


def tissue_mask(slide: openslide.OpenSlide, max_size: int = 1024) -> tuple[np.ndarray, float]:
    """Tissue mask over a thumbnail at most ``max_size`` px: ``(H, W)`` bool and level-0 px per mask px."""
    thumb = slide.get_thumbnail((max_size, max_size))
    mask = rgb_tissue_mask(np.asarray(thumb.convert("RGB")))
    return mask, slide.dimensions[0] / mask.shape[1]


def _choose_level(slide, name, tile_size, level, mpp) -> tuple[int, int]:
    """The level to read and the edge to read there: ``(level, read_size)``."""
    if level is not None and mpp is not None:
        raise PathloopError("give a level or an mpp, not both")
    if mpp is None:
        level = 0 if level is None else level
        if not 0 <= level < slide.level_count:
            raise PathloopError(f"level {level} does not exist in {name} (levels 0..{slide.level_count - 1})")
        return level, tile_size
    if mpp <= 0:
        raise PathloopError(f"mpp {mpp} must be positive")
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
    except openslide.OpenSlideError as e:
        raise PathloopError(f"{name}: reading the thumbnail for the tissue mask failed: {e}") from None
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
        names, coverage = region_coverage(shapely.box(xs, ys, xs + extent, ys + extent), regions)
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


SPLIT_NAMES = ("train", "val", "test")
SPLIT_CANDIDATES = 64


def assign_block_splits(specs, seed: int, fractions=(0.7, 0.15, 0.15)) -> list[tuple[TileSpec, str]]:
    """("train" | "val" | "test") per tile by spatial block; tiles reaching into another split's block are dropped.

    Blocks are dealt to splits by a seeded permutation. Of ``SPLIT_CANDIDATES`` such
    permutations, the one whose splits keep the class mix closest to the whole slide's is
    used, so a small slide does not end up with a test split of almost one class.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise PathloopError(
            f"split fractions {tuple(fractions)} must be three non-negative numbers summing to 1"
        )
    specs = list(specs)
    if not specs:
        return []
    blocks = sorted({s.block for s in specs})
    rank_of = {b: i for i, b in enumerate(blocks)}
    bounds = np.cumsum(_split_counts(len(blocks), fractions))
    classes = sorted({s.class_name for s in specs})
    cls = np.array([classes.index(s.class_name) for s in specs])
    own = np.array([rank_of[s.block] for s in specs])
    # Every block a tile touches, padded with its own block; -1 marks a block with no tiles.
    width = max(len(s.touches) for s in specs) or 1
    touch = np.array([[rank_of.get(b, -1) for b in s.touches] + [rank_of[s.block]] * (width - len(s.touches))
                      for s in specs])
    overall = np.bincount(cls, minlength=len(classes)) / len(specs)
    rng = np.random.default_rng(seed)
    best_split, best_keep, best_score = None, None, np.inf
    for _ in range(SPLIT_CANDIDATES):
        block_split = np.searchsorted(bounds, np.argsort(rng.permutation(len(blocks))), side="right")
        lookup = np.append(block_split, -1)  # index -1 → "no split"
        tile_split = block_split[own]
        # A tile reaching into a block of another split (or one with no split) could overlap a
        # tile of that split; dropping it is what keeps overlapping tiles out of two splits.
        keep = (lookup[touch] == tile_split[:, None]).all(1)
        score = 0.0
        for k in range(len(SPLIT_NAMES)):
            counts = np.bincount(cls[keep & (tile_split == k)], minlength=len(classes))
            score += float(np.abs(counts / counts.sum() - overall).sum()) if counts.sum() else 2.0
        if score < best_score:
            best_split, best_keep, best_score = tile_split, keep, score
    return [(s, SPLIT_NAMES[k]) for s, k, kept in zip(specs, best_split, best_keep) if kept]


class _NativeLevel:
    """One level of a tiled TIFF read as its own tiles, without OpenSlide (tifffile + imagecodecs).

    Used only where a grid tile is exactly one native tile; a slide's first tiles are checked
    against OpenSlide before it is trusted (``_native_level``). JPEG tiles are kept as the
    slide's own bytes (the JPEG tables merged in), so they are neither decoded twice nor
    re-encoded; other codecs are decoded and stored as zstd.
    """

    def __init__(self, path: str, page, downsample: int):
        self.fd = os.open(path, os.O_RDONLY)
        self.page, self.downsample = page, downsample
        self.tile_w, self.tile_h = page.tilewidth, page.tilelength
        self.width, self.height = page.imagewidth, page.imagelength
        self.across = math.ceil(self.width / self.tile_w)
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        self.jpeg = page.compression == 7  # TIFF COMPRESSION.JPEG
        self.codec = "jpeg" if page.photometric == 6 else "jpeg-rgb"  # 6: YCbCr
        tables = page.jpegtables
        self.tables = bytes(tables)[:-2] if self.jpeg and tables else b""  # without its EOI

    def index_of(self, spec: TileSpec, out_size: int) -> int | None:
        """The native tile that is exactly this grid tile, or None."""
        d, t = self.downsample, self.tile_w
        if spec.read_size != out_size or spec.read_size != t or self.tile_h != t:
            return None
        if spec.x % (d * t) or spec.y % (d * t):
            return None
        col, row = spec.x // (d * t), spec.y // (d * t)
        if (col + 1) * t > self.width or (row + 1) * t > self.height:
            return None
        return row * self.across + col

    def read(self, index: int) -> StoredTile:
        raw = os.pread(self.fd, int(self.counts[index]), int(self.offsets[index]))
        if self.jpeg:
            data = self.tables + raw[2:] if self.tables else raw  # tables + tile without its SOI
            rgb = decode_shard_record(data, self.codec, self.tile_w, self.tile_h)
            return StoredTile(pixel_sha256(rgb), self.tile_w, self.tile_h, self.codec, data)
        rgb, _, _ = self.page.decode(raw, index, jpegtables=self.page.jpegtables)
        return encode_for_shard(np.ascontiguousarray(rgb.reshape(self.tile_h, self.tile_w, -1)[..., :3]))

    def close(self) -> None:
        os.close(self.fd)


NATIVE_CHECKS = 3


def _native_level(path: str, slide: openslide.OpenSlide, specs: list[TileSpec], out_size: int
                  ) -> _NativeLevel | None:
    """A native reader for the specs' level when the file allows it and agrees with OpenSlide, else None."""
    if not specs or slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in ("generic-tiff", "aperio"):
        return None
    level = specs[0].level
    ds = slide.level_downsamples[level]
    if abs(ds - round(ds)) > 1e-9:
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages if p.is_tiled and (p.imagewidth, p.imagelength)
                     == tuple(slide.level_dimensions[level])]
            if len(pages) != 1:
                return None
            page = pages[0]
            if (page.bitspersample != 8 or page.samplesperpixel != 3 or page.planarconfig != 1
                    or page.photometric not in (2, 6) or page.is_subsampled and page.compression != 7):
                return None
            native = _NativeLevel(path, page, round(ds))
    except Exception:  # an unusual TIFF: OpenSlide reads it as before
        return None
    eligible = [s for s in specs if native.index_of(s, out_size) is not None]
    if len(eligible) < len(specs) // 2:
        native.close()
        return None
    # Trust the native reader only where its pixels are OpenSlide's, on tiles across the slide.
    # An RGB-photometric JPEG may hold RGB or YCbCr components (vendors differ): try both.
    picks = sorted({0, len(eligible) // 2, len(eligible) - 1})[:NATIVE_CHECKS]
    theirs = [_read_one(slide, path, eligible[k], out_size).sha256 for k in picks]
    for codec in ([native.codec, "jpeg"] if native.codec == "jpeg-rgb" else [native.codec]):
        native.codec = codec
        try:
            if [native.read(native.index_of(eligible[k], out_size)).sha256 for k in picks] == theirs:
                return native
        except Exception:  # noqa: S112 (a codec that fails here is one that disagrees)
            continue
    native.close()
    return None


def _rgb_of(region: Image.Image) -> np.ndarray:
    """RGBA from OpenSlide → RGB; transparent pixels (outside the scanned area) become white, like glass."""
    rgba = np.asarray(region)
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = Image.new("RGB", region.size, "white")
    rgb.paste(region, mask=region.getchannel("A"))
    return np.asarray(rgb)


def _read_one(slide, path, spec: TileSpec, out_size: int) -> StoredTile:
    try:
        region = slide.read_region((spec.x, spec.y), spec.level, (spec.read_size, spec.read_size))
    except openslide.OpenSlideError as e:
        raise PathloopError(
            f"{path}: reading the tile at ({spec.x}, {spec.y}) level {spec.level} failed: {e}"
        ) from None
    rgb = _rgb_of(region)
    if spec.read_size != out_size:
        rgb = np.asarray(Image.fromarray(rgb).resize((out_size, out_size), Image.Resampling.LANCZOS))
    return encode_for_shard(rgb)


def read_tiles(
    path, specs, *, out_size: int, workers: int | None = 1, chunk: int = 32
) -> Iterator[tuple[TileSpec, StoredTile]]:
    """Read, resize to ``out_size``, hash and encode each tile for a shard, yielding ``(spec, tile)`` in input order.

    A grid tile that is exactly one native tile of a tiled TIFF/SVS is read from the file
    directly (its JPEG bytes kept as they are); any other through OpenSlide. ``workers``
    threads (0 or None: one per CPU) read chunks of ``chunk`` tiles: OpenSlide, the codecs and
    hashing release the GIL, so threads scale without the start-up and pickling of processes.
    """
    if out_size < 1:
        raise PathloopError(f"out_size {out_size} must be positive")
    if chunk < 1:
        raise PathloopError(f"chunk {chunk} must be positive")
    specs = list(specs)
    workers = workers or os.cpu_count() or 1
    slide = open_slide(path)  # a bad file fails now, before the first tile is asked for
    return _read(slide, str(path), specs, out_size, workers, chunk)


def _read(slide, path: str, specs: list[TileSpec], out_size: int, workers: int, chunk: int):
    native = _native_level(path, slide, specs, out_size)

    def read_chunk(chunk_specs: list[TileSpec]) -> list[StoredTile]:
        out = []
        for spec in chunk_specs:
            index = native.index_of(spec, out_size) if native is not None else None
            out.append(native.read(index) if index is not None else _read_one(slide, path, spec, out_size))
        return out

    try:
        if workers == 1 or len(specs) <= chunk:
            for spec in specs:
                yield spec, read_chunk([spec])[0]
            return
        chunks = [specs[i : i + chunk] for i in range(0, len(specs), chunk)]
        with ThreadPoolExecutor(min(workers, len(chunks)), thread_name_prefix="pathloop-tiles") as pool:
            # A bounded window rather than map: map runs ahead of a slow consumer (the shard
            # writer, the database) and would hold every encoded tile of the slide in memory.
            pending = deque()
            try:
                for chunk_specs in chunks:
                    pending.append((chunk_specs, pool.submit(read_chunk, chunk_specs)))
                    if len(pending) > 2 * workers:
                        done, future = pending.popleft()
                        yield from zip(done, future.result())
                while pending:
                    done, future = pending.popleft()
                    yield from zip(done, future.result())
            finally:
                for _, future in pending:
                    future.cancel()
    finally:
        if native is not None:
            native.close()
        slide.close()
