"""p(plausible | image, class): a timm backbone and a class embedding into a small MLP.

Sun et al.'s design: the backbone's pooled features and a learned embedding of the class
the tile was generated as are concatenated and mapped to one logit. The model takes
images as ``(B, 3, H, W)`` uint8 or float in [0, 1] and normalises them itself with the
backbone's mean and std, so every caller (training, scoring, fine-tuning) feeds the same
thing. A fitted temperature is a buffer: ``probabilities`` applies it, ``forward`` does not.

A model folder holds ``model.safetensors`` and ``config.json``; ``load_folder`` rebuilds
the model from the config alone (no hub, no other file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from store.errors import PathloopError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A timm model by name with its classifier removed (pooled features out); never downloads."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise PathloopError(f"backbone {name!r} is not a timm model{hint}")
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def load_backbone_weights(backbone: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Load a local safetensors file or timm/PyTorch checkpoint into ``backbone``; its classifier is ignored."""
    path = Path(path)
    if not path.is_file():
        raise PathloopError(f"backbone weights {path} do not exist")
    try:
        state = timm.models.load_state_dict(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise PathloopError(f"backbone weights {path} cannot be read as safetensors or a torch checkpoint: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    classifier = backbone.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in heads)}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise PathloopError(f"backbone weights {path} do not fit {name}: {detail[:300]}") from None


class RewardModel(nn.Module):
    """Logit of p(plausible | image, class) for ``(B, 3, H, W)`` images and ``(B,)`` class ids."""

    def __init__(self, backbone: str, num_classes: int, *, class_embed_dim: int = 16, hidden: int = 128,
                 dropout: float = 0.1, backbone_kwargs: dict | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, **(backbone_kwargs or {}))
        cfg = self.backbone.pretrained_cfg
        self.class_embed = nn.Embedding(num_classes, class_embed_dim)
        self.head = nn.Sequential(
            nn.Linear(self.backbone.num_features + class_embed_dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, 1))
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.ones((), dtype=torch.float32))
        self.num_classes = num_classes

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """``(B,)`` uncalibrated logits."""
        features = self.backbone(self.normalise(images))
        return self.head(torch.cat([features, self.class_embed(class_ids)], dim=1)).squeeze(1)

    def probabilities(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """``(B,)`` calibrated p(plausible) in [0, 1]."""
        return torch.sigmoid(self(images, class_ids).float() / self.temperature)


def model_config(cfg, classes: list[str], image_size: int) -> dict:
    """The JSON that rebuilds a model (``build_from_config``) from a ``RewardConfig``."""
    return {"backbone": cfg.backbone, "classes": list(classes), "image_size": image_size,
            "class_embed_dim": cfg.model_class_embed_dim, "hidden": cfg.model_hidden, "dropout": cfg.model_dropout,
            "backbone_kwargs": {}}


def build_from_config(config: dict) -> RewardModel:
    return RewardModel(config["backbone"], len(config["classes"]), class_embed_dim=config["class_embed_dim"],
                       hidden=config["hidden"], dropout=config["dropout"], backbone_kwargs=config.get("backbone_kwargs"))


def save_folder(model: RewardModel, config: dict, folder: Path, extra: dict[str, dict] | None = None) -> None:
    """Write weights, config and any extra JSON files (metrics, manifest) into ``folder``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "backbone": config["backbone"]})
    files = {CONFIG_FILE: config, **(extra or {})}
    for name, content in files.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_text(json.dumps(content, indent=2, default=str))
        os.replace(tmp, folder / name)


def load_folder(folder: Path) -> tuple[RewardModel, dict]:
    """Rebuild a model from its folder: ``(model in eval mode on the CPU, config)``."""
    config_file, weights = Path(folder) / CONFIG_FILE, Path(folder) / WEIGHTS_FILE
    if not config_file.is_file() or not weights.is_file():
        raise PathloopError(f"reward model folder {folder} lacks {CONFIG_FILE} or {WEIGHTS_FILE}")
    config = json.loads(config_file.read_text())
    model = build_from_config(config)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), config
