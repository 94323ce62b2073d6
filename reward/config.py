"""The reward training configuration: one dataclass, each field with its help text.

Free of torch imports so the CLI can build its options without loading the model stack.
Fields are grouped by prefix (``model_*``, ``data_*``, ``train_*``), checked in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from store.errors import PathloopError


@dataclass
class RewardConfig:
    """Everything that defines a reward training run; written into the model folder."""

    backbone: str = field(default="resnet18", metadata={"help": "any timm.create_model name (test_resnet for a tiny one)"})
    backbone_weights: str | None = field(
        default=None, metadata={"help": "local file of pretrained backbone weights (safetensors or timm checkpoint)"})
    model_class_embed_dim: int = field(default=16, metadata={"help": "size of the learned class embedding"})
    model_hidden: int = field(default=128, metadata={"help": "hidden units of the MLP head"})
    model_dropout: float = field(default=0.1, metadata={"help": "dropout before the head's last layer"})
    data_min_ratings: int = field(
        default=2, metadata={"help": "current plausible/implausible judgments a sample needs to be used"})
    data_min_samples: int = field(default=20, metadata={"help": "rated samples needed to train at all"})
    data_weak_share: float = field(
        default=0.5, metadata={"help": "share of training examples that are weak labels from real tiles (0 = off)"})
    data_val_share: float = field(default=0.15, metadata={"help": "share of rated images for validation"})
    data_test_share: float = field(default=0.15, metadata={"help": "share of rated images held out for the metrics"})
    train_epochs: int = field(default=40, metadata={"help": "maximum passes over the training examples"})
    train_batch_size: int = field(default=64, metadata={"help": "examples per process per step"})
    train_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    train_weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    train_schedule: str = field(default="cosine", metadata={"help": "learning-rate schedule: cosine or step"})
    train_patience: int = field(
        default=8, metadata={"help": "stop after this many epochs without a better validation ROC-AUC"})
    train_augment: bool = field(default=True, metadata={"help": "random flips and 90° rotations"})
    mixed_precision: str = field(default="auto", metadata={"help": "no | fp16 | bf16 | auto (bf16/fp16 on GPU)"})
    seed: int = field(default=0, metadata={"help": "seed of splits, init, batches and augmentation"})
    log_with: str | None = field(default=None, metadata={"help": "accelerate tracker, e.g. tensorboard"})
    run_name: str = field(default="reward", metadata={"help": "folder under runs/ for logs"})

    def __post_init__(self) -> None:
        checks = [
            ("model_class_embed_dim", self.model_class_embed_dim >= 1, ">= 1"),
            ("model_hidden", self.model_hidden >= 1, ">= 1"),
            ("model_dropout", 0 <= self.model_dropout < 1, "in [0, 1)"),
            ("data_min_ratings", self.data_min_ratings >= 1, ">= 1"),
            ("data_min_samples", self.data_min_samples >= 3, ">= 3 (one per split)"),
            ("data_weak_share", 0 <= self.data_weak_share < 1, "in [0, 1)"),
            ("data_val_share", 0 < self.data_val_share < 1, "in (0, 1)"),
            ("data_test_share", 0 < self.data_test_share < 1, "in (0, 1)"),
            ("train_epochs", self.train_epochs >= 1, ">= 1"),
            ("train_batch_size", self.train_batch_size >= 1, ">= 1"),
            ("train_learning_rate", self.train_learning_rate > 0, "> 0"),
            ("train_weight_decay", self.train_weight_decay >= 0, ">= 0"),
            ("train_schedule", self.train_schedule in ("cosine", "step"), "cosine or step"),
            ("train_patience", self.train_patience >= 1, ">= 1"),
            ("mixed_precision", self.mixed_precision in ("no", "fp16", "bf16", "auto"), "no, fp16, bf16 or auto"),
            ("run_name", bool(self.run_name) and "/" not in self.run_name and not self.run_name.startswith("."),
             "a plain folder name"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise PathloopError(f"{name} must be {expected} (got {getattr(self, name)!r})")
        if self.data_val_share + self.data_test_share >= 1:
            raise PathloopError(f"data_val_share + data_test_share must be < 1 (got "
                                f"{self.data_val_share} + {self.data_test_share})")
