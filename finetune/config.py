"""Run configurations: one dataclass per entry point, each field with its help text.

Kept free of torch imports so the CLI can build its options without loading a model stack.
Fields are grouped by prefix (``train_*``, ``noise_*``), checked in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from store.errors import PathloopError


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; written into the run and the model folder."""

    preset: str = field(default="tiny", metadata={"help": "UNet preset: tiny (CPU, 32 px), small (64 px), base (128-256 px)"})
    train_steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    train_batch_size: int = field(default=32, metadata={"help": "tiles per process per micro-batch"})
    train_gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    train_learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate"})
    train_lr_warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps, then cosine decay"})
    train_adam_weight_decay: float = field(default=1e-6, metadata={"help": "AdamW weight decay"})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    train_class_dropout: float = field(default=0.1, metadata={"help": "share of tiles trained without class, for guidance"})
    train_augment: bool = field(default=True, metadata={"help": "random flips and 90° rotations"})
    ema_decay: float = field(default=0.9999, metadata={"help": "maximum EMA decay (warm-up from 0)"})
    noise_timesteps: int = field(default=1000, metadata={"help": "diffusion steps T"})
    noise_beta_schedule: str = field(default="squaredcos_cap_v2", metadata={"help": "DDPM beta schedule"})
    mixed_precision: str = field(default="auto", metadata={"help": "no | fp16 | bf16 | auto (bf16/fp16 on GPU, none on CPU)"})
    checkpoint_every: int = field(default=500, metadata={"help": "save_state every N steps"})
    checkpoints_keep: int = field(default=2, metadata={"help": "checkpoints kept in the run folder"})
    seed: int = field(default=0, metadata={"help": "seed of model init, batches and noise"})
    log_with: str | None = field(default=None, metadata={"help": "accelerate tracker, e.g. tensorboard"})
    run_name: str = field(default="pretrain", metadata={"help": "folder under runs/ for checkpoints and logs"})
    data_workers: int = field(default=-1, metadata={
        "help": "processes that read and augment each step's tiles ahead of training (0: in the training process; "
                "-1: auto, 2 on a GPU and 0 on the CPU, where the model's own threads already use every core)"})

    def __post_init__(self) -> None:
        checks = [
            (self.train_steps >= 1, "train_steps must be >= 1"),
            (self.train_batch_size >= 1, "train_batch_size must be >= 1"),
            (self.train_gradient_accumulation_steps >= 1, "train_gradient_accumulation_steps must be >= 1"),
            (self.train_learning_rate > 0, "train_learning_rate must be > 0"),
            (self.train_lr_warmup_steps >= 0, "train_lr_warmup_steps must be >= 0"),
            (self.train_adam_weight_decay >= 0, "train_adam_weight_decay must be >= 0"),
            (self.train_max_grad_norm > 0, "train_max_grad_norm must be > 0"),
            (0 <= self.train_class_dropout < 1, "train_class_dropout must be in [0, 1)"),
            (0 < self.ema_decay < 1, "ema_decay must be in (0, 1)"),
            (self.noise_timesteps >= 2, "noise_timesteps must be >= 2"),
            (0 <= self.seed < 2**32, "seed must be in 0..2**32-1"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.checkpoints_keep >= 1, "checkpoints_keep must be >= 1"),
            (self.mixed_precision in ("no", "fp16", "bf16", "auto"), "mixed_precision must be no, fp16, bf16 or auto"),
            (self.run_name and "/" not in self.run_name and not self.run_name.startswith("."),
             "run_name must be a plain folder name"),
            (self.data_workers >= -1, "data_workers must be >= 0, or -1 for auto"),
        ]
        _raise_first_failed(self, checks)

    # Fields that may change between a checkpoint and its resumption (batches do not depend on them).
    RESUMABLE_CHANGES = ("log_with", "checkpoint_every", "checkpoints_keep", "data_workers")


def data_workers(configured: int, device) -> int:
    """``configured``, or for -1 (auto): 2 on an accelerator, 0 on the CPU."""
    if configured >= 0:
        return configured
    return 0 if getattr(device, "type", str(device)) == "cpu" else 2


def _raise_first_failed(cfg, checks: list[tuple[bool, str]]) -> None:
    """Raise the first failed check as ``"<field> must ... (got <value>)"``."""
    for ok, message in checks:
        if not ok:
            raise PathloopError(f"{message} (got {getattr(cfg, message.split()[0], '?')!s})")


WEIGHTINGS = ("reward", "binary", "normalized", "none")
LR_SCHEDULES = ("constant", "cosine")  # fine-tuning, after the warm-up
OBJECTIVES = ("weighted", "preference", "kto")


@dataclass
class FinetuneConfig:
    """Everything that defines a reward-weighted fine-tuning run (DESIGN.md, "The fine-tuning objective").

    Each optimizer step sees ``train_batch_size`` synthetic tiles (weighted) and as many real
    train tiles per process and micro-batch, in one forward pass.
    """

    train_steps: int = field(default=500, metadata={"help": "optimizer steps"})
    train_batch_size: int = field(default=16, metadata={
        "help": "synthetic tiles per process per micro-batch; as many real tiles join them"})
    train_gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    train_learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate"})
    train_lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    train_lr_schedule: str = field(default="constant", metadata={
        "help": "after the warm-up: constant, or cosine (decays to 0 at the last step, as pretraining does)"})
    train_adam_weight_decay: float = field(default=1e-6, metadata={"help": "AdamW weight decay"})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    train_class_dropout: float = field(default=0.1, metadata={
        "help": "share of tiles trained without class, keeping classifier-free guidance"})
    train_augment: bool = field(default=True, metadata={"help": "random flips and 90° rotations"})
    beta: float = field(default=0.3, metadata={
        "help": "weight of the real-tile denoising term, the regulariser (Sun et al. use 0.3)"})
    weighting: str = field(default="reward", metadata={
        "help": "sample weights: reward (probability as is), binary (1 at or above the threshold, else 0), "
                "normalized (divided by the batch mean), none (all 0: the real-tile term alone, i.e. plain continued "
                "pretraining at the same cost, the control of the loop study)"})
    weighting_threshold: float = field(default=0.5, metadata={"help": "threshold of the binary weighting"})
    objective: str = field(default="weighted", metadata={
        "help": "weighted: the reward-weighted likelihood (synthetic tiles weighted by plausibility); preference: "
                "Diffusion-DPO on pairs of a plausible and an implausible sample of the same class against the frozen "
                "parent (plausible: at or above weighting_threshold), learning from the implausible tiles too; kto: "
                "Diffusion-KTO on each tile's own plausible/implausible verdict against the frozen parent, no pairs "
                "needed, the rarer verdict weighed up; all add beta x the real-tile term"})
    preference_beta: float = field(default=2000.0, metadata={
        "help": "preference and kto objectives' inverse temperature: the larger, the closer the child stays to the "
                "parent"})
    weighting_min_ratings: int = field(default=2, metadata={
        "help": "a sample with at least this many current plausible/implausible judgments is weighted by the "
                "experts' share of plausible, otherwise by the reward model"})
    samples: str = field(default="all", metadata={"help": "synthetic tiles to learn from: all, or a round number"})
    select_every: int = field(default=0, metadata={"help": (
        "every N steps (and before the first and after the last) sample select_per_class fresh tiles per class "
        "from the EMA weights and score them with the reward model; the child is the best-scoring of these "
        "candidates, the parent's own weights included (0: off, the last step's weights)")})
    select_per_class: int = field(default=8, metadata={"help": "fresh tiles per class of each candidate's check"})
    select_sampler: str = field(default="ddpm", metadata={"help": "sampler of the checks: ddim or ddpm"})
    select_steps: int = field(default=50, metadata={"help": "sampler steps of the checks"})
    select_patience: int = field(default=0, metadata={
        "help": "stop after this many checks in a row without a better score (0: train every step)"})
    select_min_auc: float = field(default=0.65, metadata={"help": (
        "round-1 guard: a reward model whose held-out ROC-AUC is below this does not select (no checks run); the "
        "child is the last step's weights (0: always trust it)")})
    select_min_gain: float = field(default=0.01, metadata={"help": (
        "round-1 guard: when the checks' mean reward p spread by less than this, the reward model cannot tell "
        "the candidates apart; no early stop, and the child is the last step's weights")})
    lora_rank: int = field(default=0, metadata={"help": (
        "LoRA: train low-rank adapters of this rank instead of every weight (0: full fine-tuning); the child "
        "also carries the adapter in lora/ (peft layout), which stock peft loads onto the parent")})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA scale numerator: adapters scaled by alpha/rank (0: alpha = rank)"})
    lora_targets: str = field(default="to_q,to_k,to_v,to_out.0,conv1,conv2", metadata={
        "help": "layers that get adapters, comma-separated names (attention projections and resnet convolutions)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "maximum EMA decay (warm-up from 0)"})
    mixed_precision: str = field(default="auto", metadata={"help": "no | fp16 | bf16 | auto (bf16/fp16 on GPU, none on CPU)"})
    checkpoint_every: int = field(default=100, metadata={"help": "save_state every N steps"})
    checkpoints_keep: int = field(default=2, metadata={"help": "checkpoints kept in the run folder"})
    seed: int = field(default=0, metadata={"help": "seed of batches and noise"})
    log_with: str | None = field(default=None, metadata={"help": "accelerate tracker, e.g. tensorboard"})
    run_name: str = field(default="finetune", metadata={"help": "folder under runs/ for checkpoints and logs"})
    data_workers: int = field(default=-1, metadata={
        "help": "processes that read and augment each step's tiles ahead of training (0: in the training process; "
                "-1: auto, 2 on a GPU and 0 on the CPU, where the model's own threads already use every core)"})

    def __post_init__(self) -> None:
        self.samples = str(self.samples).strip().lower()
        checks = [
            (self.train_steps >= 1, "train_steps must be >= 1"),
            (self.train_batch_size >= 1, "train_batch_size must be >= 1"),
            (self.train_gradient_accumulation_steps >= 1, "train_gradient_accumulation_steps must be >= 1"),
            (self.train_learning_rate > 0, "train_learning_rate must be > 0"),
            (self.train_lr_warmup_steps >= 0, "train_lr_warmup_steps must be >= 0"),
            (self.train_lr_schedule in LR_SCHEDULES, "train_lr_schedule must be constant or cosine"),
            (self.train_adam_weight_decay >= 0, "train_adam_weight_decay must be >= 0"),
            (self.train_max_grad_norm > 0, "train_max_grad_norm must be > 0"),
            (0 <= self.seed < 2**32, "seed must be in 0..2**32-1"),
            (0 <= self.train_class_dropout < 1, "train_class_dropout must be in [0, 1)"),
            (self.beta >= 0, "beta must be >= 0"),
            (self.weighting in WEIGHTINGS, f"weighting must be one of {', '.join(WEIGHTINGS)}"),
            (0 <= self.weighting_threshold <= 1, "weighting_threshold must be in [0, 1]"),
            (self.weighting_min_ratings >= 1, "weighting_min_ratings must be >= 1"),
            (self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}"),
            (self.preference_beta > 0, "preference_beta must be > 0"),
            (self.objective == "weighted" or self.weighting != "none",
             f"objective {self.objective} needs feedback: weighting none is the weighted objective's control"),
            (self.samples == "all" or self.samples.isdigit(), "samples must be all or a round number"),
            (self.select_every >= 0, "select_every must be >= 0 (0: off)"),
            (self.select_every == 0 or self.weighting != "none",
             "select_every needs feedback: weighting none has no reward model to select with"),
            (self.select_per_class >= 1, "select_per_class must be >= 1"),
            (self.select_sampler in ("ddim", "ddpm"), "select_sampler must be ddim or ddpm"),
            (self.select_steps >= 1, "select_steps must be >= 1"),
            (self.select_patience >= 0, "select_patience must be >= 0 (0: never stop early)"),
            (0 <= self.select_min_auc <= 1, "select_min_auc must be in [0, 1]"),
            (0 <= self.select_min_gain < 1, "select_min_gain must be in [0, 1)"),
            (isinstance(self.lora_rank, int) and self.lora_rank >= 0, "lora_rank must be a whole number >= 0 (0: full fine-tuning)"),
            (self.lora_alpha >= 0, "lora_alpha must be >= 0 (0: the rank)"),
            (self.lora_rank == 0 or any(t.strip() for t in self.lora_targets.split(",")),
             "lora_targets must name at least one layer"),
            (0 < self.ema_decay < 1, "ema_decay must be in (0, 1)"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.checkpoints_keep >= 1, "checkpoints_keep must be >= 1"),
            (self.mixed_precision in ("no", "fp16", "bf16", "auto"), "mixed_precision must be no, fp16, bf16 or auto"),
            (self.run_name and "/" not in self.run_name and not self.run_name.startswith("."),
             "run_name must be a plain folder name"),
            (self.data_workers >= -1, "data_workers must be >= 0, or -1 for auto"),
        ]
        _raise_first_failed(self, checks)

    @property
    def sample_selection(self) -> str | int:
        """``"all"`` or the round number, as ``store.rewards`` selects samples."""
        return "all" if self.samples == "all" else int(self.samples)

    RESUMABLE_CHANGES = PretrainConfig.RESUMABLE_CHANGES
