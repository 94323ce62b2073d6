"""Reward model throughput against the plain peers, side by side in one process.

Scoring: ``pathloop score``'s work end to end (``score_samples``: load the version from its
folder, select the samples, decode their PNGs, batched inference, write ``RewardScore``
rows) against a bare ``timm`` forward pass of the same backbone at the same batch size on
images already in memory. Interpreter start-up and imports are left out of both.

Training: ``train_reward`` (``pathloop train-reward`` without start-up: data from the
store, accelerate loop, augmentation, validation every epoch, calibration, test metrics,
export) against a plain PyTorch loop (AdamW, BCE, the same model, batches and
augmentation, nothing else) over the same training examples for the same epochs.

Runs alternate (pathloop, peer, pathloop, …); the medians are compared.
Run: ``python benchmarks/reward.py [--backbone resnet18] [--samples 2048] [--repeats 5]``.
"""

# ruff: noqa: E402  (the import path is fixed before anything imports the stdlib's queue)

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/queue.py shares its name with the standard library's ``queue``: keep this folder,
# which Python puts first on the path for a script, off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import tempfile
import time

import numpy as np
import timm
import torch
from sqlalchemy import delete
from sqlmodel import Session

from reward.config import RewardConfig
from reward.data import ExampleSet, build_data, dihedral
from reward.model import RewardModel, model_config, save_folder
from reward.score import score_samples
from reward.train import _generator, reward_loss, train_reward
from store.db import make_engine, upgrade
from store.images import register_images
from store.models import Annotator, GeneratorVersion, Judgment, RewardScore, Sample
from store.rewards import incoming_folder, register_reward
from store.workspace import Settings, Workspace

CLASSES = ["dab_negative", "dab_positive"]


def build_workspace(root: Path, n: int, size: int) -> tuple[Workspace, object]:
    """``n`` textured samples, each judged by two raters (plausible iff colour matches class)."""
    ws = Workspace.create(root, Settings(classes=CLASSES, tile_size=size, control_share=0.0))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    rng = np.random.default_rng(0)
    colours = np.array([[60, 80, 200], [150, 90, 40]], float)
    with Session(engine) as s:
        gv = GeneratorVersion(folder="models/generators/x", kind="imported")
        raters = [Annotator(username="a"), Annotator(username="b")]
        s.add_all([gv, *raters])
        s.flush()
        encoded, meta = [], []
        for _ in range(n):
            cls, colour = int(rng.integers(2)), int(rng.integers(2))
            rgb = np.clip(colours[colour] + rng.normal(0, 35, (size, size, 3)), 0, 255).astype(np.uint8)
            enc, _, _ = ws.images.put_array(rgb)
            encoded.append(enc)
            meta.append((cls, colour))
        ids = register_images(s, {e.sha256: (e.width, e.height) for e in encoded})
        samples = [Sample(image_id=ids[e.sha256], generator_id=gv.id, class_name=CLASSES[c], seed=i, sampler="ddim",
                          steps=2) for i, (e, (c, _)) in enumerate(zip(encoded, meta))]
        s.add_all(samples)
        s.flush()
        for smp, (c, colour) in zip(samples, meta):
            for r in raters:
                s.add(Judgment(sample_id=smp.id, annotator_id=r.id, request_id=f"{smp.id}-{r.id}",
                               verdict="plausible" if c == colour else "implausible"))
        s.commit()
    return ws, engine


def register_untrained(ws: Workspace, engine, backbone: str, size: int) -> int:
    cfg = RewardConfig(backbone=backbone)
    torch.manual_seed(0)
    model = RewardModel(backbone, len(CLASSES)).eval()
    folder = incoming_folder(ws)
    config = model_config(cfg, CLASSES, size)
    save_folder(model, config, folder)
    return register_reward(ws, engine, folder, backbone=backbone, config=config, metrics={}, data_manifest={}).id


def time_pathloop_score(ws, engine, rid: int, batch: int) -> tuple[float, int]:
    with Session(engine) as s:
        s.exec(delete(RewardScore))
        s.commit()
    t0 = time.perf_counter()
    r = score_samples(ws, engine, rid, "all", batch_size=batch, device="cpu", progress=False)
    return time.perf_counter() - t0, r.scored


def time_bare_timm(backbone: str, images: torch.Tensor, batch: int, channels_last: bool = False) -> float:
    model = timm.create_model(backbone, pretrained=False, num_classes=0).eval()
    x = images.float().div(255)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    return time.perf_counter() - t0


def time_pathloop_train(ws, engine, cfg: RewardConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    v = train_reward(ws, engine, cfg, progress=False)
    seconds = time.perf_counter() - t0
    counts = v.data_manifest["counts"]["train"]
    return seconds, (counts["expert"] + counts["weak"]) * v.metrics["epochs_run"]


def time_plain_train(train: ExampleSet, cfg: RewardConfig, channels_last: bool = False) -> tuple[float, int]:
    """The loop a researcher writes by hand: same model, batches, augmentation, optimiser."""
    torch.manual_seed(cfg.seed)
    model = RewardModel(cfg.backbone, len(CLASSES)).train()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train_learning_rate, weight_decay=cfg.train_weight_decay)
    loader = torch.utils.data.DataLoader(torch.arange(len(train)), batch_size=cfg.train_batch_size, shuffle=True,
                                         generator=_generator(cfg.seed, "order"), drop_last=True)
    seen = 0
    t0 = time.perf_counter()
    for epoch in range(cfg.train_epochs):
        for step, idx in enumerate(loader):
            x = dihedral(train.images[idx], _generator(cfg.seed, "augment", epoch, step, 0)).contiguous(
                memory_format=layout)
            loss = reward_loss(model(x, train.class_ids[idx]), train.targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
    return time.perf_counter() - t0, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18", help="timm model name (default resnet18, the default backbone)")
    ap.add_argument("--samples", type=int, default=2048, help="rated samples in the workspace")
    ap.add_argument("--size", type=int, default=32, help="tile size in pixels")
    ap.add_argument("--batch", type=int, default=256, help="scoring batch size")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs per run")
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs of each side")
    args = ap.parse_args()
    print(f"backbone {args.backbone}, {args.samples} samples of {args.size} px, torch threads "
          f"{torch.get_num_threads()}, {args.repeats} alternating runs each; medians")
    with tempfile.TemporaryDirectory() as tmp:
        ws, engine = build_workspace(Path(tmp) / "ws", args.samples, args.size)
        rid = register_untrained(ws, engine, args.backbone, args.size)
        cfg = RewardConfig(backbone=args.backbone, train_epochs=args.epochs, train_patience=args.epochs,
                           data_min_samples=10, mixed_precision="no")
        train_set = ExampleSet(build_data(ws, engine, cfg).splits["train"], args.size)
        images = torch.randint(0, 256, (args.samples, 3, args.size, args.size), dtype=torch.uint8)

        time_pathloop_score(ws, engine, rid, args.batch)  # warm-up: page cache, allocator, kernels
        time_bare_timm(args.backbone, images, args.batch)
        ours, peer, peer_nhwc = [], [], []
        for _ in range(args.repeats):
            seconds, n = time_pathloop_score(ws, engine, rid, args.batch)
            ours.append(n / seconds)
            peer.append(len(images) / time_bare_timm(args.backbone, images, args.batch))
            peer_nhwc.append(len(images) / time_bare_timm(args.backbone, images, args.batch, channels_last=True))
        o, p, q = statistics.median(ours), statistics.median(peer), statistics.median(peer_nhwc)
        print(f"scoring   pathloop score {o:8.1f} img/s   bare timm forward {p:8.1f} img/s   ratio {o / p:.3f}"
              f"   (runs: {', '.join(f'{x:.0f}' for x in ours)} | {', '.join(f'{x:.0f}' for x in peer)})")
        print(f"          (pathloop runs channels_last; a bare channels_last forward: {q:8.1f} img/s, "
              f"ratio {o / q:.3f})")

        ours, peer, peer_nhwc = [], [], []
        for _ in range(args.repeats):
            seconds, n = time_pathloop_train(ws, engine, cfg)
            ours.append(n / seconds)
            seconds, n = time_plain_train(train_set, cfg)
            peer.append(n / seconds)
            seconds, n = time_plain_train(train_set, cfg, channels_last=True)
            peer_nhwc.append(n / seconds)
        o, p, q = statistics.median(ours), statistics.median(peer), statistics.median(peer_nhwc)
        print(f"training  train-reward   {o:8.1f} ex/s    plain PyTorch loop {p:8.1f} ex/s    ratio {o / p:.3f}"
              f"   (runs: {', '.join(f'{x:.0f}' for x in ours)} | {', '.join(f'{x:.0f}' for x in peer)})")
        print(f"          (pathloop trains channels_last; the plain loop in channels_last: {q:8.1f} ex/s, "
              f"ratio {o / q:.3f})")
        engine.dispose()


if __name__ == "__main__":
    main()
