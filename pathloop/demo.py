"""Demo slides from scikit-image's bundled immunohistochemistry image: real tissue, no downloads.

``write_demo_slide`` writes a small pyramidal TIFF OpenSlide reads, plus a QuPath-style
GeoJSON that labels tissue ``dab_positive`` / ``dab_negative`` by colour deconvolution.
``demo_workspace`` makes a new workspace of one demo slide's tiles (the study, the expert's
accuracy table and its tests); ``write_large_pyramid`` writes a big slide tile by tile, for benchmarks.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import shapely
import tifffile
from skimage import color, data, filters

from store.errors import PathloopError
from store.slides import rgb_tissue_mask

CLASS_COLORS = {"dab_positive": (153, 102, 51), "dab_negative": (68, 114, 196),
                "nuclei_dense": (72, 61, 139), "stroma": (219, 112, 147)}
STAIN_CLASSES = {"ihc": ["dab_negative", "dab_positive"], "he": ["nuclei_dense", "stroma"],
                 "he-real": ["nuclei_dense", "stroma"], "he-tia": ["nuclei_dense", "stroma"]}
STAINS = tuple(STAIN_CLASSES)
# Real H&E images that ship inside pip wheels, read from the installed package's folder without
# importing it (``make install`` puts in each wheel alone, ``--no-deps``: their own dependencies -
# numba, csbdeep; tiatoolbox's pinned torch - are not needed for one image). stain -> (package, file).
REAL_HE = {
    # 300x500 px tumour crop from The Cancer Imaging Archive: stardist's test_image_he_2d (BSD-3)
    "he-real": ("stardist", "data/images/histo.jpg"),
    # 1000x1000 px tumour field: TIAToolbox's stain-normalisation target, stain_norm_target() (BSD-3)
    "he-tia": ("tiatoolbox", "data/target_image.png"),
}
# he-tia's nuclei are about twice the other images' size in pixels: its demo workspace tiles pyramid
# level 1, and its regions smooth haematoxylin over 16 px, not 4 (see he_masks)
INGEST_LEVEL = {"he-tia": 1}
REGION_SIGMA = {"he-tia": 16.0}


def real_he_image(stain: str = "he-real") -> np.ndarray:
    """``(H, W, 3)`` uint8: the real H&E image of ``stain`` (``REAL_HE``), read from its installed wheel."""
    import importlib.util

    from PIL import Image

    package, name = REAL_HE[stain]
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / name if spec else None
    if path is None or not path.is_file():
        raise PathloopError(f"stain {stain!r} reads the H&E image in the {package} wheel; it is not installed "
                            f"(expected {package}/{name}; pip install --no-deps {package})")
    return np.asarray(Image.open(path).convert("RGB"))


SOURCE_SIZE = 512  # skimage.data.immunohistochemistry() is 512x512 RGB


def _check_out(out_tiff) -> Path:
    out = Path(out_tiff)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise PathloopError(f"{out} must end in .tif or .tiff")
    if not out.parent.is_dir():
        raise PathloopError(f"folder {out.parent} does not exist (for {out.name})")
    return out


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``target``, then rename it into place."""
    # Not mkstemp: its files are private (0600); these should get the usual umask permissions.
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PathloopError(f"cannot write {target}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Box-average an ``(H, W, 3)`` uint8 image whose sides divide by ``factor``."""
    h, w, c = rgb.shape
    blocks = rgb.reshape(h // factor, factor, w // factor, factor, c).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def stain_masks(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """``(H, W)`` bool masks of DAB-positive and DAB-negative tissue in an ``(H, W, 3)`` IHC image."""
    tissue = rgb_tissue_mask(rgb)
    # Smoothed so classes form regions (glands, stroma) rather than single membranes.
    dab = filters.gaussian(color.rgb2hed(rgb)[..., 2], sigma=4)
    positive = tissue & (dab > filters.threshold_otsu(dab[tissue]))
    return {"dab_positive": positive, "dab_negative": tissue & ~positive}


def recolour_he(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 IHC (haematoxylin + DAB) → the same tissue recoloured as H&E.

    Colour deconvolution (Ruifrok & Johnston, ``rgb2hed``) gives the haematoxylin and DAB
    concentrations; haematoxylin is kept, eosin is the DAB signal plus a faint counterstain on
    all tissue (eosin stains every cytoplasm and stroma), and both are recombined with the
    standard H&E vectors. Real morphology, H&E colours; it is not a real H&E stain.
    """
    hed = color.rgb2hed(rgb)
    tissue = filters.gaussian(rgb_tissue_mask(rgb).astype(float), sigma=2)
    eosin = 0.6 * np.clip(hed[..., 2], 0, None) + 0.12 * tissue
    he = np.stack([np.clip(hed[..., 0], 0, None) * 1.2, eosin, np.zeros_like(eosin)], axis=-1)
    return np.round(np.clip(color.hed2rgb(he), 0, 1) * 255).astype(np.uint8)


def he_masks(rgb: np.ndarray, sigma: float = 4.0) -> dict[str, np.ndarray]:
    """``(H, W)`` bool masks of nuclei-dense tissue and stroma in an ``(H, W, 3)`` H&E image: smoothed
    haematoxylin (σ = ``sigma`` px, a few nuclei wide, so that classes are regions, not single nuclei)
    above its Otsu threshold over tissue is nuclei-dense, the rest stroma."""
    tissue = rgb_tissue_mask(rgb)
    haem = filters.gaussian(color.rgb2hed(rgb)[..., 0], sigma=sigma)
    dense = tissue & (haem > filters.threshold_otsu(haem[tissue]))
    return {"nuclei_dense": dense, "stroma": tissue & ~dense}


def mask_to_geometry(mask: np.ndarray, cell: int = 4) -> shapely.Geometry:
    """Polygon or MultiPolygon (with holes) covering a ``(H, W)`` bool mask, in its pixel coordinates.

    The mask is reduced to ``cell``-px squares (majority vote), each row's runs become
    rectangles, and their union is lightly simplified.
    """
    h, w = mask.shape
    padded = np.zeros((math.ceil(h / cell) * cell, math.ceil(w / cell) * cell), bool)
    padded[:h, :w] = mask
    coarse = padded.reshape(padded.shape[0] // cell, cell, padded.shape[1] // cell, cell).mean((1, 3)) >= 0.5
    boxes = []
    for row, line in enumerate(coarse):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], line.astype(np.int8), [0]])))
        for x0, x1 in zip(edges[::2], edges[1::2]):
            boxes.append(shapely.box(x0 * cell, row * cell, min(x1 * cell, w), min((row + 1) * cell, h)))
    geometry = shapely.union_all(boxes).simplify(cell / 2, preserve_topology=True)
    return geometry if geometry.is_valid else shapely.make_valid(geometry)


def _feature(name: str, geometry: shapely.Geometry) -> dict:
    return {
        "type": "Feature",
        # Deterministic ids: the demo files are byte-identical on every run.
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"pathloop-demo/{name}")),
        "geometry": json.loads(shapely.to_geojson(geometry)),
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(CLASS_COLORS[name])},
        },
    }


def write_demo_slide(out_tiff, stain: str = "ihc") -> tuple[Path, Path]:
    """Write the demo image (512x512 IHC, or a real H&E image) as a 3-level tiled TIFF and its regions
    beside it.

    ``stain="ihc"``: as shipped, regions ``dab_positive``/``dab_negative``; ``stain="he"``:
    recoloured to H&E (``recolour_he``), regions ``nuclei_dense``/``stroma`` (``he_masks``);
    ``stain="he-real"`` (a real 300x500 H&E crop) or ``"he-tia"`` (a real 1000x1000 H&E field): the
    image in its wheel (``real_he_image``), regions by ``he_masks``.
    Returns ``(tiff path, geojson path)``; the GeoJSON has the same stem. No mpp is written
    because the source does not state one.
    """
    if stain not in STAINS:
        raise PathloopError(f"stain {stain!r}; expected one of {', '.join(STAINS)}")
    out = _check_out(out_tiff)
    if stain in REAL_HE:
        rgb = real_he_image(stain)
    else:
        rgb = data.immunohistochemistry() if stain == "ihc" else recolour_he(data.immunohistochemistry())
    masks = stain_masks(rgb) if stain == "ihc" else he_masks(rgb, REGION_SIGMA.get(stain, 4.0))

    def write_tiff(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp) as tif:
            for i, factor in enumerate((1, 2, 4)):
                tif.write(
                    _downsample(rgb, factor),
                    tile=(128, 128),
                    photometric="rgb",
                    compression="zlib",
                    predictor=True,
                    subfiletype=0 if i == 0 else 1,
                )

    features = [_feature(name, mask_to_geometry(mask)) for name, mask in masks.items()]
    geojson = out.with_suffix(".geojson")
    _write_atomically(out, write_tiff)
    _write_atomically(
        geojson, lambda tmp: tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    )
    return out, geojson


def demo_workspace(root, stain: str = "ihc", tile_size: int = 32, **settings):
    """A new workspace in ``root/workspace`` of the demo slide's tiles (written to ``root/slides``),
    half-tile stride at level ``INGEST_LEVEL`` (0 unless named), classes ``STAIN_CLASSES[stain]``, no
    control tiles; ``settings``: further
    ``Settings`` fields. Returns ``(workspace, engine, tiles added)``; the caller disposes of the engine.
    """
    from store.db import make_engine, upgrade
    from store.ingest import ingest_slides
    from store.workspace import Settings, Workspace

    root = Path(root)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    tiff, geojson = write_demo_slide(root / "slides" / f"{stain}.tiff", stain=stain)
    ws = Workspace.create(root / "workspace", Settings(classes=STAIN_CLASSES[stain], tile_size=tile_size,
                                                       **{"control_share": 0.0, **settings}))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    report = ingest_slides(ws, engine, [tiff], regions=geojson, stride=tile_size // 2, workers=1,
                           level=INGEST_LEVEL.get(stain, 0))
    return ws, engine, sum(r.tiles_added for r in report)


def _dihedral(rgb: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 rotations/flips of a square image."""
    turned = np.rot90(rgb, k % 4)
    return np.ascontiguousarray(turned[:, ::-1] if k >= 4 else turned)


def _pattern_tiles(cells: list[np.ndarray], kinds: np.ndarray, size: int, tile: int) -> Iterator[np.ndarray]:
    """``(tile, tile, 3)`` tiles, row by row, of a ``size``-px plane laid with ``cells[kinds[row, col]]``."""
    c = cells[0].shape[0]
    for y0 in range(0, size, tile):
        for x0 in range(0, size, tile):
            out = np.empty((tile, tile, 3), np.uint8)
            for cy in range(y0 // c, (y0 + tile - 1) // c + 1):
                for cx in range(x0 // c, (x0 + tile - 1) // c + 1):
                    ya, yb = max(y0, cy * c), min(y0 + tile, (cy + 1) * c)
                    xa, xb = max(x0, cx * c), min(x0 + tile, (cx + 1) * c)
                    cell = cells[kinds[cy % kinds.shape[0], cx % kinds.shape[1]]]
                    part = cell[ya - cy * c : yb - cy * c, xa - cx * c : xb - cx * c]
                    out[ya - y0 : yb - y0, xa - x0 : xb - x0] = part
            yield out


def write_large_pyramid(out_tiff, size: int = 20000, tile: int = 256, mpp: float = 0.5,
                        compression: str = "jpeg") -> Path:
    """Write a ``size`` x ``size`` pyramidal TIFF of randomly flipped IHC cells, tile by tile.

    Levels are 4x apart down to about one tile; resolution tags make OpenSlide report ``mpp``.
    ``compression``: ``jpeg`` (quality 90, YCbCr 4:2:0, as scanners write) or ``zlib``.
    Memory stays at a few tiles whatever the size.
    """
    out = _check_out(out_tiff)
    codecs = {"jpeg": {"level": 90}, "zlib": {"level": 1}}
    if compression not in codecs:
        raise PathloopError(f"compression {compression!r}; expected one of {', '.join(codecs)}")
    if size < tile or tile % 16:
        raise PathloopError(f"size {size} and tile {tile}: expected size >= tile and tile a multiple of 16")
    source = data.immunohistochemistry()
    n_cells = math.ceil(size / SOURCE_SIZE) + 1
    kinds = np.random.default_rng(0).integers(0, 8, (n_cells, n_cells))
    factors = [4**i for i in range(5) if 4**i <= SOURCE_SIZE and math.ceil(size / 4**i) >= tile]
    pixels_per_cm = 1e4 / mpp

    def write_tiff(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=size * size * 3 > 2**31) as tif:
            for i, factor in enumerate(factors):
                # Box-averaging commutes with the flips, so each level lays out downsampled cells.
                cells = [_dihedral(_downsample(source, factor), k) for k in range(8)]
                side = math.ceil(size / factor)
                tif.write(
                    _pattern_tiles(cells, kinds, side, tile),
                    shape=(side, side, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression=compression,
                    compressionargs=codecs[compression],
                    subfiletype=0 if i == 0 else 1,
                    resolution=(pixels_per_cm / factor, pixels_per_cm / factor),
                    resolutionunit="CENTIMETER",
                )

    _write_atomically(out, write_tiff)
    return out
