"""The options of `pathloop evaluate`, kept free of torch imports so the CLI builds its parser fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from store.errors import PathloopError

REAL_PER_CLASS = 2000  # real tiles per class and split that evaluation and the simulated expert read at most


@dataclass
class EvaluateConfig:
    """How `pathloop evaluate` measures; written into the evaluation folder with the results."""

    per_class: int = field(default=64, metadata={"metavar": "N", "help": "fresh samples per class and version (same seeds for all)"})
    sampler: str = field(default="ddim", metadata={"help": "sampler of the fresh samples: ddim or ddpm"})
    steps: int = field(default=50, metadata={"help": "sampler steps of the fresh samples"})
    guidance: float = field(default=1.0, metadata={"help": "classifier-free guidance of the fresh samples (1 = none)"})
    seed: int = field(default=0, metadata={"help": "base seed of the fresh samples and the classifiers"})
    features: str = field(default="workspace", metadata={
        "help": "feature space: workspace (a classifier trained once on the real train tiles, cached) or timm:NAME"})
    weights: str | None = field(default=None, metadata={"help": "local weights file for --features timm:NAME"})
    nearest_k: int = field(default=5, metadata={"help": "k of precision/recall/density/coverage"})
    copy_percentile: float = field(default=5.0, metadata={
        "help": "a sample at or below this percentile of real-to-real nearest distances is a copy"})
    real_per_class: int = field(default=REAL_PER_CLASS, metadata={"metavar": "N", "help": (
        "read at most N real tiles per class of each split (train, test) for the extractor, the real-tile "
        "classifier, the copy check and the simulated expert; a larger class is subsampled, the same tiles every "
        "time (a fixed hash of tile ids); memory grows with N: 0.2 GB per 1000 tiles of 256 px")})
    bootstrap: int = field(default=200, metadata={"metavar": "N", "help": (
        "bootstrap resamples of the 95 percent intervals of FID (real test and fresh features resampled) and "
        "coverage (real test tiles resampled); 0: no intervals")})
    utility_epochs: int = field(default=30, metadata={"help": "epochs of the downstream-utility classifiers"})
    simulated_expert: bool = field(default=False, metadata={
        "help": "also rate the fresh samples with the simulated expert (pathloop/simulate.py), fitted on the real "
                "train tiles: its plausibility with Wilson intervals, for the demo and the study"})

    expert_rules: str = field(default="stain", metadata={
        "help": "rules of the simulated expert: stain (stain-agnostic, the default) or ihc-legacy (the IHC demo's)"})

    def __post_init__(self) -> None:
        for name in ("per_class", "steps", "nearest_k", "utility_epochs", "real_per_class"):
            if getattr(self, name) < 1:
                raise PathloopError(f"{name} = {getattr(self, name)}; expected at least 1")
        if self.per_class < 2:
            raise PathloopError(f"per_class = {self.per_class}; expected at least 2 (FID needs two samples)")
        if self.sampler not in ("ddim", "ddpm"):
            raise PathloopError(f"sampler {self.sampler!r}; expected ddim or ddpm")
        if self.bootstrap < 0 or self.bootstrap == 1:
            raise PathloopError(f"bootstrap = {self.bootstrap}; expected 0 (no intervals) or at least 2 resamples")
        if not 0 < self.copy_percentile < 100:
            raise PathloopError(f"copy_percentile = {self.copy_percentile}; expected a percentile in (0, 100)")
        if self.simulated_expert and self.real_per_class < 5:
            raise PathloopError(f"real_per_class = {self.real_per_class}; the simulated expert needs at least 5 "
                                f"real train tiles of each class")
        if self.expert_rules not in ("stain", "ihc-legacy"):
            raise PathloopError(f"expert_rules {self.expert_rules!r}; expected stain or ihc-legacy")
        if self.features != "workspace" and not self.features.startswith("timm:"):
            raise PathloopError(f"--features {self.features!r}; expected workspace or timm:NAME")
