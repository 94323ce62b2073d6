"""Ingest throughput against a plain ``read_region`` loop over the same grid.

The peer is what a lab script does by hand: one process, ``read_region`` per grid tile,
convert to RGB, nothing else. ``read_tiles`` also hashes every tile's pixels and encodes it
for a shard (the slide's own JPEG bytes where a grid tile is one native tile, else zstd),
and ``pathloop ingest`` (``ingest_slides``) adds planning (tissue mask, regions, splits),
writing the shard and one transaction of rows; each is timed with one worker and with every
core, side by side in one run, on a JPEG-tiled 20k x 20k pyramid and on the demo slide.

Run: ``python benchmarks/ingest.py`` (slides are written once under ``benchmarks/.cache/``).
"""

# ruff: noqa: E402  (the import path is fixed before anything imports the stdlib's queue)

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/queue.py shares its name with the standard library's ``queue``: keep this folder,
# which Python puts first on the path for a script, off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import os
import time
from collections.abc import Callable
from functools import partial

import openslide

from store.slides import TileSpec, load_regions, plan_tiles, read_tiles

CACHE = Path(__file__).parent / ".cache"
LARGE_SIZE = 20000


def plain_read_region_loop(path, specs: list[TileSpec]) -> int:
    """Read every tile with ``read_region`` and convert it to RGB; returns the tile count."""
    slide = openslide.OpenSlide(str(path))
    for s in specs:
        slide.read_region((s.x, s.y), s.level, (s.read_size, s.read_size)).convert("RGB")
    slide.close()
    return len(specs)


def exported_tile_count(path, specs: list[TileSpec], out_size: int, workers: int) -> int:
    """Run ``read_tiles`` to the end; returns the tile count."""
    return sum(1 for _ in read_tiles(path, specs, out_size=out_size, workers=workers))


def full_ingest(path, regions: Path | None, tile_size: int, stride: int | None, workers: int) -> float:
    """Tiles/s of ``ingest_slides`` into a fresh SQLite workspace (set-up not timed)."""
    import tempfile

    from store.db import make_engine, upgrade
    from store.ingest import ingest_slides
    from store.workspace import Settings, Workspace

    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        ws = Workspace.create(Path(tmp) / "ws", Settings(classes=["dab_negative", "dab_positive", "tissue"],
                                                         tile_size=tile_size))
        engine = make_engine(ws.database_url)
        upgrade(engine)
        start = time.perf_counter()
        [r] = ingest_slides(ws, engine, [path], regions=regions, class_name=None if regions else "tissue",
                            stride=stride, workers=workers)
        rate = r.tiles_added / (time.perf_counter() - start)
        engine.dispose()
        return rate


def tiles_per_second(read: Callable[[], int]) -> float:
    start = time.perf_counter()
    n = read()
    return n / (time.perf_counter() - start)


def slides() -> list[tuple[str, Path, list[TileSpec], int, Path | None, int | None]]:
    """(name, path, tile specs, out size, regions, stride) for the demo slide and the large pyramid."""
    from pathloop.demo import write_demo_slide, write_large_pyramid

    CACHE.mkdir(exist_ok=True)
    demo, geojson = write_demo_slide(CACHE / "ihc.tiff")
    large = CACHE / f"large-{LARGE_SIZE}-jpeg.tif"
    if not large.exists():
        start = time.perf_counter()
        write_large_pyramid(large, size=LARGE_SIZE, compression="jpeg")
        print(f"wrote {large} ({large.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s")
    demo_specs = plan_tiles(demo, tile_size=32, stride=16, regions=load_regions(geojson))
    large_specs = plan_tiles(large, tile_size=256, class_name="tissue")
    return [
        ("demo 512 px, tile 32 stride 16", demo, demo_specs, 32, geojson, 16),
        (f"large {LARGE_SIZE} px JPEG tiles, tile 256 level 0", large, large_specs, 256, None, None),
    ]


def main() -> None:
    cores = os.cpu_count() or 1
    print(f"{cores} cores")
    for name, path, specs, out_size, regions, stride in reversed(slides()):
        plain = tiles_per_second(partial(plain_read_region_loop, path, specs))
        print(f"\n{name}: {len(specs)} tiles")
        print(f"  {'plain read_region loop':<28} {plain:9.0f} tiles/s   1.00x")
        for workers in (1, cores):
            rate = tiles_per_second(partial(exported_tile_count, path, specs, out_size, workers))
            label = f"read_tiles workers={workers}"
            print(f"  {label:<28} {rate:9.0f} tiles/s   {rate / plain:.2f}x")
        for workers in (1, cores):
            rate = full_ingest(path, regions, out_size, stride, workers)
            label = f"pathloop ingest workers={workers}"
            print(f"  {label:<28} {rate:9.0f} tiles/s   {rate / plain:.2f}x")


if __name__ == "__main__":
    main()
