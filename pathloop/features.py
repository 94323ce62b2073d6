"""The fixed feature space that `pathloop evaluate` measures generators in.

By default a small class classifier (``TileClassifier``, a 3-block CNN) is trained once per
workspace on the real train tiles and cached under ``models/evaluator/<key>/`` (safetensors
weights + ``config.json``), where ``key`` hashes the train tile ids and the recipe: new
train tiles give a new extractor, the same ones reuse it. The train tiles are those
`evaluate` reads: at most ``real_per_class`` of each class (``real_subsample``: all of a
smaller class, else a fixed hash-ranked subsample), so the key hashes that subsample's ids.
Its penultimate layer (64 floats) is the feature space. Alternatively ``timm:NAME`` with a local weights file: the pooled
features of that timm model. The same CNN, trained on synthetic or real tiles, is the
downstream-utility classifier.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from store.errors import PathloopError
from store.workspace import Workspace

EXTRACTOR_VERSION = 1  # bump when the recipe below changes, so cached extractors are rebuilt
REAL_SUBSAMPLE_SEED = 0  # which real tiles a capped class keeps: fixed, so every evaluation reads the same ones


class TileClassifier(nn.Module):
    """``(B, 3, H, W)`` uint8 or float in [0, 1] → logits ``(B, classes)``; ``features`` → ``(B, 64)``."""

    def __init__(self, n_classes: int, width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, n_classes)
        self.num_features = 4 * w  # torchmetrics reads this for a custom FID extractor

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self.body((x - 0.5) / 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FeatureExtractor(nn.Module):
    """A frozen feature map ``(B, 3, H, W)`` uint8 → ``(B, D)`` float, with ``num_features = D``."""

    def __init__(self, fn: nn.Module, num_features: int, name: str):
        super().__init__()
        self.fn, self.num_features, self.name = fn.eval(), num_features, name

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 → ``(N, D)`` float64."""
        out = [self(to_tensor(images[i:i + batch_size])).double().numpy() for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_features))


class _ClassifierFeatures(nn.Module):
    def __init__(self, model: TileClassifier):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 → ``(N, 3, H, W)`` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90° rotations (histology has no up)."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(3)
    return torch.rot90(x, int(torch.randint(0, 4, (), generator=gen)), dims=(2, 3))


def train_classifier(images: np.ndarray, labels: np.ndarray, n_classes: int, *, epochs: int = 30,
                     batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> TileClassifier:
    """Train a ``TileClassifier`` on ``(N, H, W, 3)`` uint8 tiles with integer ``labels``; seeded, CPU-friendly."""
    if len(images) == 0:
        raise PathloopError("no tiles to train the classifier on")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TileClassifier(n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    y_all = torch.as_tensor(labels, dtype=torch.long)  # batches are cut from ``images``: no second copy of them
    steps_per_epoch = max(1, -(-len(images) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two
                continue
            loss = nn.functional.cross_entropy(model(_augment(to_tensor(images[idx.numpy()]), gen)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.inference_mode()
def predict(model: TileClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted class indices of ``(N, H, W, 3)`` uint8 tiles."""
    model.eval()
    out = [model(to_tensor(images[i:i + batch_size])).argmax(1).numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------- which real tiles are read


def _mix64(values: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random ``uint64`` per value (splitmix64 of ``value + seed``): the same on every machine."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(seed % 2**64) * np.uint64(0xD1B54A32D192ED03)
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def real_subsample(tile_ids: np.ndarray, class_ids: np.ndarray, per_class: int | None,
                   seed: int = REAL_SUBSAMPLE_SEED) -> np.ndarray:
    """Positions, ascending, of at most ``per_class`` tiles of each class (``TileTable`` columns).

    A class with at most ``per_class`` tiles keeps all of them, so a split under the cap gives
    ``arange(len(tile_ids))``: every tile, in the table's order. A larger class keeps the
    ``per_class`` tiles whose ids hash lowest under ``seed``: stratified, reproducible, and
    stable when tiles are added (a newcomer enters only by out-ranking a member). Memory is a
    few bytes per tile; no tile is read.
    """
    tile_ids, class_ids = np.asarray(tile_ids, np.int64), np.asarray(class_ids, np.int64)
    n = len(tile_ids)
    if per_class is None or n == 0 or np.bincount(class_ids).max() <= per_class:
        return np.arange(n, dtype=np.int64)
    if per_class < 1:
        raise PathloopError(f"per_class = {per_class}; expected at least 1 real tile per class")
    rank = _mix64(tile_ids, seed)
    keep = []
    for c in np.unique(class_ids):
        pos = np.flatnonzero(class_ids == c)
        if len(pos) > per_class:
            pos = pos[np.argsort(rank[pos], kind="stable")[:per_class]]
        keep.append(pos)
    return np.sort(np.concatenate(keep))


def read_tiles(images, positions=None, *, chunk: int = 256, progress: bool = False, desc: str = "read tiles"
               ) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 of the ``store.images.ImageColumns`` at ``positions`` (default: all), read in
    chunks of ``chunk`` into one preallocated array: only these tiles are ever read."""
    from tqdm.auto import tqdm

    if positions is not None:
        images = images.take(positions)
    out = np.empty((len(images), images.size, images.size, 3), np.uint8)
    with tqdm(total=len(out), desc=desc, unit="tile", disable=not progress, leave=False) as bar:
        for i in range(0, len(out), chunk):
            j = min(i + chunk, len(out))
            out[i:j] = images.batch(range(i, j))
            bar.update(j - i)
    return out


# ---------------------------------------------------------------- the workspace extractor


@dataclass(frozen=True)
class ExtractorInfo:
    name: str
    folder: Path | None
    trained_now: bool


def extractor_key(tile_ids: list[int], classes: list[str], tile_size: int) -> str:
    recipe = {"v": EXTRACTOR_VERSION, "tiles": sorted(tile_ids), "classes": classes, "size": tile_size}
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def workspace_extractor(ws: Workspace, tile_ids: list[int], images: np.ndarray, labels: np.ndarray
                        ) -> tuple[FeatureExtractor, ExtractorInfo]:
    """The workspace's cached classifier extractor for these train tiles, trained (and cached) when missing."""
    classes = list(ws.settings.classes)
    key = extractor_key(tile_ids, classes, ws.settings.tile_size)
    folder = ws.models_dir / "evaluator" / key
    weights, cfg_file = folder / "model.safetensors", folder / "config.json"
    trained = False
    if weights.is_file() and cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        model = TileClassifier(len(cfg["classes"]), cfg["width"])
        model.load_state_dict(load_file(weights))
    else:
        model = train_classifier(images, labels, len(classes), seed=0)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
        try:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(
                {"arch": "TileClassifier", "width": 16, "classes": classes, "tile_size": ws.settings.tile_size,
                 "train_tile_ids": sorted(tile_ids), "version": EXTRACTOR_VERSION}, indent=1))
            os.replace(tmp, folder)  # atomic: a crash never leaves half an extractor
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not weights.is_file():  # another process may have won the race
                raise
        trained = True
    model.eval()
    name = f"workspace classifier {key}"
    return FeatureExtractor(_ClassifierFeatures(model), model.num_features, name), ExtractorInfo(name, folder, trained)


class _TimmFeatures(nn.Module):
    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self.model((x - self.mean) / self.std)


def timm_extractor(name: str, weights: Path | None) -> tuple[FeatureExtractor, ExtractorInfo]:
    """Pooled features of a timm model with weights from a local file (never from a hub)."""
    import timm

    if weights is None:
        raise PathloopError(f"--features timm:{name} needs --weights PATH (a local weights file; nothing is downloaded)")
    weights = Path(weights)
    if not weights.is_file():
        raise PathloopError(f"--weights {weights}: no such file; expected a local safetensors or PyTorch weights file")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise PathloopError(f"--features timm:{name}: {e}") from None
    state = load_file(weights) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu",
                                                                                   weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier."))}
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise PathloopError(f"--weights {weights} does not fit timm model {name}: missing {missing[0]} "
                            f"and {len(missing) - 1} more")
    cfg = model.pretrained_cfg or {}
    fn = _TimmFeatures(model.eval(), cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.25, 0.25, 0.25)))
    return FeatureExtractor(fn, model.num_features, f"timm:{name}"), ExtractorInfo(f"timm:{name}", None, False)
