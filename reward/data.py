"""What the reward model learns from: expert-rated samples and weak labels from real tiles.

- Expert examples: synthetic tiles with at least ``data_min_ratings`` current plausible or
  implausible judgments (unsure and superseded rows are not judgments of plausibility);
  target = the share that say plausible.
- Weak examples (Sun et al.): a real tile with its own class → 1, the same tile with another
  class drawn at random → 0. When every rated sample has one verdict (a weak first
  generator's tiles are all implausible), the weak labels give the other side and training
  goes on; the manifest says so (``one_sided``). Pairs keep the image fixed, so only the class embedding can
  tell them apart. Real tiles keep the split they got at ingest (grouped by slide or
  spatial block), so a weak example never leaks across splits.

Expert examples are split by image (two samples with the same pixels share one image),
stratified by majority verdict, seeded. The manifest records every judgment id, sample and
tile used, and where each went.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reward.config import RewardConfig
from store.errors import PathloopError
from store.images import load_rgb
from store.rewards import current_decisive_count, rated_samples, real_tile_ids, tiles_by_id
from store.workspace import Workspace

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Example:
    path: Path
    class_id: int
    target: float
    expert: bool  # False: a weak label from a real tile
    item_id: int  # sample id (expert) or tile id (weak)


@dataclass
class RewardData:
    splits: dict[str, list[Example]]
    manifest: dict


def _seeded(seed: int, *parts) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()[:8], "big"))


def build_data(ws: Workspace, engine, cfg: RewardConfig) -> RewardData:
    """Examples per split and their manifest; a clear error when there is too little to learn from."""
    classes = ws.settings.classes
    rated = [r for r in rated_samples(ws, engine) if r.class_name in classes]
    enough = [r for r in rated if r.ratings >= cfg.data_min_ratings]
    if len(enough) < cfg.data_min_samples:
        raise PathloopError(
            f"too few judgments to train a reward model: {len(enough)} samples have at least {cfg.data_min_ratings} "
            f"current plausible/implausible judgments ({current_decisive_count(engine)} such judgments in all); "
            f"{cfg.data_min_samples} are needed (rate more, or lower --data-min-samples / --data-min-ratings)")
    sides = {r.target > 0.5 for r in enough if r.target != 0.5}
    one_sided = None
    if len(sides) < 2:
        verdict = "plausible" if sides == {True} else "implausible" if sides == {False} else "a tie"
        one_sided = f"every one of the {len(enough)} rated samples is judged {verdict} by its raters"
        if cfg.data_weak_share == 0 or len(classes) < 2:
            raise PathloopError(f"{one_sided}; the reward model needs samples of both verdicts to learn anything, "
                                "and there are no weak labels of real tiles to give the other side (they need "
                                "--data-weak-share > 0 and two classes or more)")

    by_image: dict[int, list] = defaultdict(list)
    for r in enough:
        by_image[r.image_id].append(r)
    split_of_image = _stratified_split(by_image, cfg)
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for image_id, group in by_image.items():
        for r in group:
            splits[split_of_image[image_id]].append(
                Example(r.path, classes.index(r.class_name), r.target, True, r.sample_id))

    weak_tiles = _weak_examples(ws, engine, cfg, {s: len(v) for s, v in splits.items()})
    for split, examples in weak_tiles.items():
        splits[split].extend(examples)
    if one_sided and not {e.target > 0.5 for e in splits["train"] if e.target != 0.5} >= {True, False}:
        raise PathloopError(f"{one_sided}, and the workspace has no real train tiles to give the other side "
                            "as weak labels; the reward model needs examples of both verdicts")

    manifest = {
        "min_ratings": cfg.data_min_ratings,
        "judgment_ids": sorted(j for r in enough for j in r.judgment_ids),
        "samples": {s: sorted(e.item_id for e in splits[s] if e.expert) for s in SPLITS},
        "weak_tiles": {s: [[e.item_id, classes[e.class_id], e.target] for e in splits[s] if not e.expert]
                       for s in SPLITS},
        "counts": {s: {"expert": sum(e.expert for e in splits[s]), "weak": sum(not e.expert for e in splits[s])}
                   for s in SPLITS},
        "rated_below_min": len(rated) - len(enough),
        # A weak generator's first ratings may all say implausible: real tiles of their own class
        # (the weak labels) are then the only plausible examples, which is what lets round 1 go on.
        "one_sided": one_sided,
    }
    return RewardData(splits, manifest)


def _stratified_split(by_image: dict[int, list], cfg: RewardConfig) -> dict[int, str]:
    """image id → split, stratified by majority verdict (plausible / implausible / tie), seeded."""
    strata: dict[str, list[int]] = defaultdict(list)
    for image_id, group in sorted(by_image.items()):
        t = float(np.mean([r.target for r in group]))
        strata["plausible" if t > 0.5 else "implausible" if t < 0.5 else "tie"].append(image_id)
    out: dict[int, str] = {}
    for name, ids in sorted(strata.items()):
        _seeded(cfg.seed, "split", name).shuffle(ids)
        n_test = round(len(ids) * cfg.data_test_share)
        n_val = round(len(ids) * cfg.data_val_share)
        for i, image_id in enumerate(ids):
            out[image_id] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    # Small sets: make sure validation and test are not empty, taking from train.
    for split in ("val", "test"):
        if split not in out.values():
            train = sorted(i for i, s in out.items() if s == "train")
            if len(train) > 1:
                out[train[_seeded(cfg.seed, "fill", split).randrange(len(train))]] = split
    return out


def _weak_examples(ws: Workspace, engine, cfg: RewardConfig, expert_counts: dict[str, int]) -> dict[str, list]:
    """Pairs (own class → 1, another class → 0) from real tiles, ``data_weak_share`` of each split."""
    classes = ws.settings.classes
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    if cfg.data_weak_share == 0 or len(classes) < 2:
        return out
    ids = real_tile_ids(ws, engine)  # ids only: a cohort's 10^6 tiles are not loaded as objects
    for split in SPLITS:
        wanted = round(expert_counts[split] * cfg.data_weak_share / (1 - cfg.data_weak_share))
        pairs = (wanted + 1) // 2
        # in the order the classes first appear among the split's tiles, as the shuffles below draw
        present = sorted((c for c in classes if ids.get((split, c))), key=lambda c: ids[(split, c)][0])
        by_class = {c: list(ids[(split, c)]) for c in present}
        rng = _seeded(cfg.seed, "weak", split)
        for pool in by_class.values():
            rng.shuffle(pool)
        chosen, queues = [], [by_class[c] for c in classes if by_class.get(c)]
        while len(chosen) < pairs and any(queues):  # round-robin over classes: balanced weak labels
            for q in queues:
                if q and len(chosen) < pairs:
                    chosen.append(q.pop())
        tiles = {t.tile_id: t for t in tiles_by_id(ws, engine, chosen)}
        for tile_id in chosen:
            t = tiles[tile_id]
            own = classes.index(t.class_name)
            other = rng.choice([i for i in range(len(classes)) if i != own])
            out[split] += [Example(t.path, own, 1.0, False, t.tile_id), Example(t.path, other, 0.0, False, t.tile_id)]
    return out


class ExampleSet:
    """Examples in memory: ``images (N, 3, H, W)`` uint8, ``class_ids (N,)``, ``targets (N,)``, ``expert (N,)``."""

    def __init__(self, examples: list[Example], size: int):
        cache: dict[Path, np.ndarray] = {}
        for e in examples:
            if e.path not in cache:
                cache[e.path] = load_rgb(e.path, size)
        stack = np.stack([cache[e.path] for e in examples]) if examples else np.zeros((0, size, size, 3), np.uint8)
        self.images = torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous()
        self.class_ids = torch.tensor([e.class_id for e in examples], dtype=torch.long)
        self.targets = torch.tensor([e.target for e in examples], dtype=torch.float32)
        self.expert = torch.tensor([e.expert for e in examples], dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.targets)


def dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image of ``(B, C, H, W)`` under one of the 8 flips/90° rotations (histology has no up).

    The same transforms as the generator's augmentation; ``reward`` and ``finetune`` do not
    import each other (DESIGN.md), so each keeps its own eight lines.
    """
    ks = torch.randint(0, 8, (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    for k in range(8):
        sel = ks == k
        if sel.any():
            y = torch.rot90(x[sel], k % 4, dims=(2, 3))
            out[sel] = y.flip(3) if k >= 4 else y
    return out
