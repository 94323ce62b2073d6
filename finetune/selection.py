"""Choosing the child among its own training checkpoints by the reward model's verdict.

A preference fine-tuning run pushes the generator by an amount set by its learning rate and
steps, not by how much is left to correct: the push that mends a generator's most frequent
error in one round carries the next round's generator past the target (the loop study,
README). With selection on, the run checks candidates every ``select_every`` steps — before
the first step (the parent itself), then the EMA weights it would export — by sampling
``select_per_class`` fresh tiles per class (the same seeds for every candidate, never the
ones the experts rated or an evaluation draws) and scoring them with the reward model. The
child is the best-scoring candidate; after ``select_patience`` checks in a row without a
better score the run stops early. When no candidate beats the parent, the child is the
parent's weights, recorded as such: the round moves on without making the generator worse
by its own reward model's account.

The checks and the best weights are part of the run's checkpoints (``state_dict``), so a
resumed run selects exactly as an uninterrupted one would.

The round-1 guard: a reward model trained on a first round's few ratings may not tell the
candidates apart (the loop study's round 1: ROC-AUC 0.60, every candidate scored 0.495 to the
fourth decimal), and then "the best" is noise. Two checks decide whether the reward model
decides:

- before training, its held-out ROC-AUC (``RewardVersion.metrics["roc_auc"]``) must reach
  ``min_auc``; below it no check runs at all (``finetune.train``);
- after the checks, their scores must spread by at least ``min_gain`` (max - min of the mean
  reward p); within it, the candidates are indistinguishable to this reward model. Early
  stopping waits for a spread too: "no better score" means nothing while nothing differs.

When either fails, the child is decided by the fallback rule: the last step's EMA weights,
i.e. the run as configured (its learning rate and steps, as with selection off). The last
step and not the parent, because a round whose reward model cannot judge still has the
experts' verdicts in its objective; keeping the parent would throw that round away. The
record's ``rule`` says which decided: ``reward`` or ``fallback: <why>``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import UNet2DModel

from finetune.sample import SampleSettings, sample_images
from store.generators import sample_seed

SELECT_SEED_OFFSET = 2_000_000_011  # never the seeds of `generate`, a round or `evaluate`


class Selection:
    """The candidates checked so far and the best one's weights."""

    def __init__(self, *, every: int, per_class: int, sampler: str, steps: int, patience: int, seed: int,
                 classes: list[str], null_id: int, scheduler_config: dict,
                 reward_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], min_gain: float = 0.0):
        self.every, self.patience, self.classes, self.min_gain = every, patience, list(classes), min_gain
        self.settings = SampleSettings(sampler, steps)
        self.null_id, self.scheduler_config, self.reward_fn = null_id, scheduler_config, reward_fn
        self.class_ids = [k for k in range(len(classes)) for _ in range(per_class)]
        self.seeds = [sample_seed(SELECT_SEED_OFFSET + seed, c, i) for c in classes for i in range(per_class)]
        self.history: list[dict] = []
        self.best: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------ the decisions

    def due(self, done: int, total: int) -> bool:
        """Whether the weights after ``done`` >= 1 optimizer steps are a candidate (the parent is checked first)."""
        return done % self.every == 0 or done == total

    @property
    def best_entry(self) -> dict | None:
        return max(self.history, key=lambda h: (h["reward_p"], -h["step"])) if self.history else None

    def stale(self) -> int:
        """Checks since the best one."""
        best = self.best_entry
        return 0 if best is None else sum(h["step"] > best["step"] for h in self.history)

    def spread(self) -> float:
        """Max - min of the checks' mean reward p so far (0 before two checks)."""
        scores = [h["reward_p"] for h in self.history]
        return max(scores) - min(scores) if len(scores) > 1 else 0.0

    def separated(self) -> bool:
        """Whether the reward model tells the candidates apart: their scores spread by at least ``min_gain``."""
        return len(self.history) > 1 and self.spread() >= self.min_gain

    def should_stop(self) -> bool:
        return self.patience > 0 and self.separated() and self.stale() >= self.patience

    # ------------------------------------------------------------ one check

    @torch.no_grad()
    def check(self, step: int, model: UNet2DModel, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Score ``model`` (the candidate's weights, eval mode) and keep its weights if it is the best so far.

        ``reduce`` averages a tensor over processes, so every process takes the same decision.
        """
        p = []
        for i in range(0, len(self.seeds), self.settings.batch_size):
            images = sample_images(model, self.scheduler_config, self.class_ids[i:i + self.settings.batch_size],
                                   self.seeds[i:i + self.settings.batch_size], null_id=self.null_id,
                                   sampler=self.settings.sampler, steps=self.settings.steps)
            batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
            ids = torch.tensor(self.class_ids[i:i + self.settings.batch_size], dtype=torch.long)
            p.append(torch.as_tensor(self.reward_fn(batch, ids)).detach().float().cpu())
        probs = reduce(torch.cat(p).to(next(model.parameters()).device)).cpu().numpy()
        ids = np.array(self.class_ids)
        entry = {"step": step, "reward_p": float(probs.mean()),
                 "per_class": {c: float(probs[ids == k].mean()) for k, c in enumerate(self.classes)}}
        self.history.append(entry)
        if self.best_entry is entry:
            self.best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return entry

    def record(self, last_step: int) -> dict:
        """What the child version records about its selection; ``last_step``: the fallback's step."""
        best = self.best_entry
        decided = {"rule": "reward", "selected_step": best["step"] if best else None}
        if not self.separated():
            decided = {"rule": f"fallback: the checks' scores spread by {self.spread():.4f} < min_gain {self.min_gain}; "
                               "the last step's weights", "selected_step": last_step}
        return {"every": self.every, "per_class": len(self.seeds) // len(self.classes),
                "sampler": self.settings.sampler, "steps": self.settings.steps, "patience": self.patience,
                "min_gain": self.min_gain, "spread": self.spread(), **decided, "history": self.history}

    # ------------------------------------------------------------ checkpointing (accelerate custom state)

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history], "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.best = state["best"]
