"""The training batch path against indexing an in-memory tensor, and pretraining's peak memory per tile count.

1. Images/s of the batch path at 64 px, up to model-ready inputs (noisy tiles, timesteps,
   classes, noise): 2 data worker processes read each step's tiles from the store's shards and
   augment them (``step_loader``), the training process draws the noise from the same
   generator state; against the same batches made in this process from one uint8 tensor
   holding every tile (what ``TileSet`` did before: ~196 GB for 10^6 tiles of 256 px). Same
   positions, same batches (checked), one run.
2. Peak RSS of ``pathloop pretrain --steps 20`` on workspaces of about 5k, 50k and 200k
   stored 64-px tiles: of the main process, and of the process tree (data workers included;
   forked workers share the parent's pages, so the tree figure counts those pages twice).

Run: ``python benchmarks/loader.py`` (workspaces are built once under ``benchmarks/.cache/loader``).
"""

# ruff: noqa: E402  (the import path is fixed before anything imports the stdlib's queue)

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import os
import subprocess
import time

import numpy as np
import psutil
import torch

CACHE = Path(__file__).parent / ".cache" / "loader"
TILE = 64
# slide edge → tiles of 64 px on a 64-px grid (the IHC pattern is tissue nearly everywhere)
SIZES = {"5k": 4544, "50k": 14336, "200k": 28672}
BATCH, STEPS, REPEATS = 32, 200, 5


def workspace(name: str, size: int) -> Path:
    """A workspace with one slide of ``size`` px tiled at 64 px, built once."""
    from pathloop.demo import write_large_pyramid
    from store.db import make_engine, upgrade
    from store.ingest import ingest_slides
    from store.workspace import Settings, Workspace

    root = CACHE / f"ws-{name}"
    if (root / ".ready").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    slide = CACHE / f"slide-{size}.tif"
    if not slide.exists():
        write_large_pyramid(slide, size=size)
    if root.exists():
        import shutil

        shutil.rmtree(root)
    ws = Workspace.create(root, Settings(classes=["tissue"], tile_size=TILE))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    start = time.perf_counter()
    [r] = ingest_slides(ws, engine, [slide], class_name="tissue", workers=0)
    print(f"built {root.name}: {r.tiles_added} tiles in {time.perf_counter() - start:.0f} s")
    engine.dispose()
    (root / ".ready").touch()
    return root


def batch_path_rates(root: Path, workers: int) -> dict[str, float]:
    """Images/s of the same ``STEPS`` pretraining batches, model-ready, made four ways (the first is the peer)."""
    from diffusers import DDPMScheduler

    from finetune.data import StepBatches, StepTiles, TileSet, step_generator, step_loader
    from finetune.pretrain import augmented, denoising_batch, noised_batch
    from store.db import make_engine
    from store.generators import tile_table
    from store.workspace import Workspace

    ws = Workspace.open(root)
    engine = make_engine(ws.database_url)
    table = tile_table(ws, engine, "train")
    data = TileSet(table.images, table.class_ids)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    batches = StepBatches(len(data), BATCH, seed=0)

    def read_ahead(position: int) -> StepTiles:  # what pretraining's data workers do
        idx = batches.indices(position)
        g = step_generator(0, position)
        return StepTiles.of(augmented(data.batch(idx), g, True), data.class_ids[idx], g)

    def streamed(ready):
        tiles = next(ready)
        return noised_batch(*tiles.tensors(), scheduler=scheduler, g=tiles.generator(), null_id=1, class_dropout=0.1)

    in_memory = data.batch(np.arange(len(data)))  # every tile decoded into one tensor, as before

    def indexed(positions):
        position = next(positions)
        idx = torch.from_numpy(batches.indices(position))
        return denoising_batch(in_memory[idx], data.class_ids[idx], scheduler=scheduler,
                               g=step_generator(0, position), null_id=1, class_dropout=0.1, augment=True)

    threads = torch.get_num_threads()
    variants = {  # name: (batch maker, its source of positions, torch threads of this process)
        "in-memory tensor, this process": (indexed, lambda: iter(range(STEPS)), threads),
        "shards, in this process (0 workers)": (streamed, lambda: step_loader(read_ahead, range(STEPS), 0), threads),
        f"shards + {workers} workers": (streamed, lambda: step_loader(read_ahead, range(STEPS), workers), threads),
        f"shards + {workers} workers, 1 thread here": (streamed, lambda: step_loader(read_ahead, range(STEPS), workers),
                                                       1),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(REPEATS):  # alternating, so all see the same machine; medians reported
        outputs = []
        for name, (make, source_of, n_threads) in variants.items():
            torch.set_num_threads(n_threads)
            source = source_of()
            first = make(source)  # the workers' start-up is paid once per run, not per step
            start = time.perf_counter()
            for _ in range(STEPS - 1):
                last = make(source)
            rates[name].append((STEPS - 1) * BATCH / (time.perf_counter() - start))
            outputs.append((first, last))
            del source  # ends the workers
            torch.set_num_threads(threads)
        for other in outputs[1:]:
            for a, b in zip(outputs[0], other):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), "streamed and in-memory batches differ"
    engine.dispose()
    return {name: float(np.median(r)) for name, r in rates.items()}


def peak_rss(root: Path, steps: int, workers: int = 2) -> tuple[float, float, float]:
    """(main-process peak MB, process-tree peak MB, seconds) of ``pathloop pretrain --steps``."""
    exe = Path(sys.executable).with_name("pathloop")
    run = f"rss-{time.time_ns()}"
    cmd = [str(exe), "pretrain", "-w", str(root), "--preset", "tiny", "--steps", str(steps), "--batch-size",
           str(BATCH), "--run-name", run, "--checkpoint-every", str(steps), "--data-workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps, main_peak, tree_peak = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            main = ps.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            break
        main_peak, tree_peak = max(main_peak, main), max(tree_peak, tree)
        time.sleep(0.05)
    err = proc.communicate()[1]
    if proc.returncode:
        raise SystemExit(f"pretrain failed on {root}: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return main_peak / 2**20, tree_peak / 2**20, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"tile counts to build and measure ({', '.join(SIZES)})")
    ap.add_argument("--steps", type=int, default=20, help="pretraining steps of the RSS runs")
    ap.add_argument("--workers", type=int, default=2, help="data workers of the streamed batch path")
    args = ap.parse_args()
    names = [s for s in args.sizes.split(",") if s]
    roots = {n: workspace(n, SIZES[n]) for n in names}
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {TILE} px tiles, batch {BATCH}")

    rates = batch_path_rates(roots[names[0]], args.workers)
    peer = next(iter(rates.values()))
    print(f"\nbatch path on {names[0]} ({STEPS} steps of {BATCH}, identical batches; median of {REPEATS} "
          f"alternating runs; {torch.get_num_threads()} torch threads unless said):")
    for name, rate in rates.items():
        print(f"  {name:<42} {rate:9.0f} images/s   {rate / peer:.2f}x")

    print(f"\npathloop pretrain --steps {args.steps} --batch-size {BATCH} --data-workers 2 (peak RSS):")
    first = None
    for n in names:
        from store.db import make_engine
        from store.generators import tile_table
        from store.workspace import Workspace

        ws = Workspace.open(roots[n])
        engine = make_engine(ws.database_url)
        count = len(tile_table(ws, engine, "train"))
        engine.dispose()
        main_mb, tree_mb, secs = peak_rss(roots[n], args.steps)
        first = first or main_mb
        print(f"  {n:>5}: {count:7d} train tiles   main {main_mb:7.0f} MB ({main_mb / first:.2f}x)   "
              f"tree {tree_mb:7.0f} MB   {secs:5.1f} s")
    main_mb, tree_mb, secs = peak_rss(roots[names[0]], args.steps, workers=0)
    print(f"  {names[0]:>5} with --data-workers 0: main {main_mb:7.0f} MB   {secs:5.1f} s (the whole command)")


if __name__ == "__main__":
    main()
