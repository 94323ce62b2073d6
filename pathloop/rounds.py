"""The loop as a resumable state machine: one ``Round`` row per turn.

    generating → awaiting_ratings → training_reward → finetuning → evaluating → done

``advance`` runs the current round as far as it can: each step is idempotent or resumable
(generation skips seeds already stored, fine-tuning resumes from its last checkpoint,
reward training simply starts again), and the state moves on only after a step finished
and committed what it made. It stops when the round waits for ratings; when a round is
done, the next one starts with the new generator and stops at its own wait.

A lock on the round row (owner, expiry, renewed by a heartbeat while a step runs) keeps
two schedulers off the same round. A lock left by a killed process on this machine is
taken over at once (its pid is gone); one from another machine after it expires.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from finetune.config import LR_SCHEDULES, WEIGHTINGS, FinetuneConfig
from store.errors import PathloopError
from store.judgments import DECISIVE, is_current
from store.models import GeneratorVersion, Judgment, Round, Sample, utcnow
from store.workspace import Workspace

STATES = ("generating", "awaiting_ratings", "training_reward", "finetuning", "evaluating", "done")
LOCK_MINUTES = 10


@dataclass
class RoundOptions:
    """How a round runs; fixed when the round starts and kept in ``Round.details``."""

    per_class: int = field(default=32, metadata={"metavar": "N", "help": "samples generated per class for the experts to rate"})
    sampler: str = field(default="ddim", metadata={"help": "ddim or ddpm"})
    sample_steps: int = field(default=50, metadata={"help": "sampler steps"})
    guidance: float = field(default=1.0, metadata={"help": "classifier-free guidance scale (1 = none)"})
    reward_backbone: str = field(default="resnet18", metadata={"help": "timm backbone of the reward model"})
    reward_epochs: int = field(default=40, metadata={"help": "maximum reward training epochs"})
    reward_min_samples: int = field(default=20, metadata={"help": "rated samples needed to train the reward model"})
    min_ratings: int = field(default=2, metadata={"metavar": "N", "help": (
        "current plausible/implausible judgments that make a sample a reward training example and let the "
        "experts' verdict, not the reward model, weight it in fine-tuning")})
    finetune_steps: int = field(default=500, metadata={"help": "fine-tuning optimizer steps"})
    finetune_lr: float = field(default=2e-5, metadata={"help": "fine-tuning learning rate"})
    finetune_lr_schedule: str = field(default="constant", metadata={
        "help": "fine-tuning learning-rate schedule: constant or cosine (decays to 0)"})
    finetune_batch_size: int = field(default=16, metadata={"help": "synthetic (and as many real) tiles per step"})
    finetune_checkpoint_every: int = field(default=100, metadata={"help": "fine-tuning checkpoint interval (steps)"})
    finetune_lora_rank: int = field(default=0, metadata={"metavar": "R", "help": (
        "fine-tune LoRA adapters of rank R instead of every weight (0: full fine-tuning); the child also carries "
        "the adapter in lora/")})
    beta: float = field(default=0.3, metadata={"help": "weight of the real-tile denoising term"})
    weighting: str = field(default="reward", metadata={"help": "reward, binary, normalized or none (no feedback)"})
    objective: str = field(default="weighted", metadata={"help": (
        "fine-tuning objective: weighted (reward-weighted likelihood), preference (Diffusion-DPO on pairs of a "
        "plausible and an implausible sample of one class) or kto (Diffusion-KTO on each sample's own verdict)")})
    preference_beta: float = field(default=2000.0, metadata={
        "help": "preference and kto objectives' inverse temperature: the larger, the closer the child stays to its "
                "parent"})
    select_every: int = field(default=0, metadata={"metavar": "N", "help": (
        "every N fine-tuning steps, score the EMA weights on fresh samples with the round's reward model; the "
        "child is the best-scoring candidate, the parent included (0: off, the last step's weights)")})
    select_per_class: int = field(default=8, metadata={"metavar": "N", "help": "fresh samples per class of each check"})
    select_steps: int = field(default=50, metadata={"help": "sampler steps of the checks (the round's sampler)"})
    select_patience: int = field(default=0, metadata={"metavar": "N", "help": (
        "stop fine-tuning after N checks in a row without a better score (0: every step)")})
    select_min_auc: float = field(default=0.65, metadata={"help": (
        "round-1 guard: a reward model with held-out ROC-AUC below this does not select; the child is the last step")})
    select_min_gain: float = field(default=0.01, metadata={"help": (
        "round-1 guard: checks whose mean reward p spread by less than this do not select; the child is the last step")})
    eval_per_class: int = field(default=16, metadata={"metavar": "N", "help": "fresh samples per class to compare parent and child"})
    seed: int = field(default=0, metadata={"help": "base seed of the round's sampling and training"})

    def __post_init__(self) -> None:
        for name in ("per_class", "sample_steps", "reward_epochs", "reward_min_samples", "min_ratings", "finetune_steps",
                     "finetune_batch_size", "finetune_checkpoint_every", "eval_per_class"):
            if getattr(self, name) < 1:
                raise PathloopError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not self.beta >= 0:  # NaN too
            raise PathloopError(f"beta must be >= 0 (got {self.beta})")
        if self.sampler not in ("ddim", "ddpm"):
            raise PathloopError(f"sampler must be ddim or ddpm (got {self.sampler!r})")
        if not 0 <= self.guidance <= 30:
            raise PathloopError(f"guidance must be from 0 (unconditional) to 30, 1 = no guidance (got {self.guidance})")
        if not 0 < self.finetune_lr < float("inf"):
            raise PathloopError(f"finetune_lr must be > 0 (got {self.finetune_lr})")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise PathloopError(f"seed must be a whole number from 0 to {2**32 - 1} (got {self.seed!r})")
        if self.finetune_lr_schedule not in LR_SCHEDULES:
            raise PathloopError(f"finetune_lr_schedule must be constant or cosine (got {self.finetune_lr_schedule!r})")
        if self.weighting not in WEIGHTINGS:
            raise PathloopError(f"weighting must be one of {', '.join(WEIGHTINGS)} (got {self.weighting!r})")
        # the objective's own checks, where FinetuneConfig keeps them (same field names)
        FinetuneConfig(weighting=self.weighting, objective=self.objective, preference_beta=self.preference_beta,
                       lora_rank=self.finetune_lora_rank, **self.selection())

    def selection(self) -> dict:
        """The fine-tuning run's ``select_*`` options (the checks sample with the round's sampler)."""
        return {"select_every": self.select_every, "select_per_class": self.select_per_class,
                "select_sampler": self.sampler, "select_steps": self.select_steps,
                "select_patience": self.select_patience, "select_min_auc": self.select_min_auc,
                "select_min_gain": self.select_min_gain}


@dataclass
class Progress:
    """What one ``advance`` call did, for the CLI to print."""

    round_number: int | None = None
    state: str | None = None
    ran: list[str] = field(default_factory=list)
    waiting_for: str | None = None


class RoundBusy(PathloopError):
    """Another process holds the round's lock."""


# ---------------------------------------------------------------- locking


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead(owner: str) -> bool:
    """True for an owner on this machine whose process no longer exists."""
    try:
        host, pid, _ = owner.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire(engine: Engine, round_id: int, owner: str, minutes: int = LOCK_MINUTES) -> None:
    """Take the round's lock, or raise ``RoundBusy`` naming who holds it and until when."""
    now = utcnow()
    with Session(engine) as s:
        held = s.exec(select(Round.lock_owner, Round.lock_expires_at, Round.number).where(Round.id == round_id)).one()
        free = or_(Round.lock_owner.is_(None), Round.lock_expires_at < now, Round.lock_owner == owner)
        if held[0] and _owner_is_dead(held[0]):
            free = or_(free, Round.lock_owner == held[0])
        taken = s.exec(update(Round).where(Round.id == round_id, free)
                       .values(lock_owner=owner, lock_expires_at=now + timedelta(minutes=minutes))).rowcount
        s.commit()
    if taken != 1:
        raise RoundBusy(f"round {held[2]} is being run by {held[0]} (lock until {held[1]:%Y-%m-%d %H:%M:%S} UTC); "
                        "try again later")


def renew(engine: Engine, round_id: int, owner: str, minutes: int = LOCK_MINUTES) -> bool:
    with Session(engine) as s:
        n = s.exec(update(Round).where(Round.id == round_id, Round.lock_owner == owner)
                   .values(lock_expires_at=utcnow() + timedelta(minutes=minutes))).rowcount
        s.commit()
    return n == 1


def release(engine: Engine, round_id: int, owner: str) -> None:
    with Session(engine) as s:
        s.exec(update(Round).where(Round.id == round_id, Round.lock_owner == owner)
               .values(lock_owner=None, lock_expires_at=None))
        s.commit()


class Heartbeat:
    """Renews a lock every few minutes while a long step runs."""

    def __init__(self, engine: Engine, round_id: int, owner: str, every_s: float = LOCK_MINUTES * 60 / 3):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine, round_id, owner, every_s), daemon=True)

    def _run(self, engine, round_id, owner, every_s) -> None:
        while not self._stop.wait(every_s):
            renew(engine, round_id, owner)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- reading the store


def current_generator_id(engine: Engine) -> int | None:
    """The generator new rounds start from: the last finished round's child, else the newest version."""
    with Session(engine) as s:
        done = s.exec(select(Round.generator_out_id).where(Round.state == "done", Round.generator_out_id.is_not(None))
                      .order_by(Round.number.desc())).first()
        if done is not None:
            return done
        return s.exec(select(func.max(GeneratorVersion.id))).one()


def open_round(engine: Engine) -> Round | None:
    with Session(engine) as s:
        return s.exec(select(Round).where(Round.state != "done").order_by(Round.number)).first()


def list_rounds(engine: Engine) -> list[Round]:
    with Session(engine) as s:
        return list(s.exec(select(Round).order_by(Round.number)).all())


def round_ratings(engine: Engine, number: int) -> tuple[int, int]:
    """(current decisive judgments on the round's samples, the round's samples)."""
    with Session(engine) as s:
        judged = s.exec(select(func.count()).select_from(Judgment).join(Sample, Sample.id == Judgment.sample_id)
                        .where(Sample.round_number == number, Judgment.verdict.in_(DECISIVE), is_current())).one()
        samples = s.exec(select(func.count()).select_from(Sample).where(Sample.round_number == number)).one()
    return judged, samples


def _start_round(engine: Engine, overrides: dict) -> Round:
    """The next round, with the previous round's options updated by ``overrides`` (defaults for the first)."""
    generator = current_generator_id(engine)
    if generator is None:
        raise PathloopError("no generator version yet; `pathloop pretrain` or `pathloop import-model DIR` first")
    with Session(engine, expire_on_commit=False) as s:
        previous = s.exec(select(Round).order_by(Round.number.desc())).first()
        last = previous.number if previous else 0
        options = RoundOptions(**{**(previous.details.get("options", {}) if previous else {}), **overrides})
        r = Round(number=last + 1, state="generating", generator_in_id=generator,
                  details={"options": asdict(options)})
        s.add(r)
        try:
            s.commit()
        except IntegrityError:
            raise RoundBusy(f"round {last + 1} was just started by another process; try again later") from None
        return r


def _set_state(engine: Engine, round_id: int, state: str, **values) -> Round:
    with Session(engine, expire_on_commit=False) as s:
        r = s.get(Round, round_id)
        details = dict(r.details)
        details.update(values.pop("details", {}))
        r.details = details
        r.state = state
        r.updated_at = utcnow()
        if state == "done":
            r.finished_at = r.updated_at
        for k, v in values.items():
            setattr(r, k, v)
        s.add(r)
        s.commit()
        return r


# ---------------------------------------------------------------- the steps


Steps = dict[str, Callable[[Workspace, Engine, Round, RoundOptions], dict | None]]


def advance(ws: Workspace, engine: Engine, options: RoundOptions | dict | None = None, *, steps: Steps | None = None,
            only: str | None = None, owner: str | None = None, log: Callable[[str], None] = print) -> Progress:
    """Run rounds until one waits for ratings; ``only``: run just that step of the open round.

    ``options`` apply to rounds that start now: a ``RoundOptions``, or a dict of the fields
    to change from the previous round's (a new round keeps its predecessor's otherwise).

    ``steps`` maps a state to its step function (tests swap them). A step returns ``None``
    to wait, or the values to record as the round moves on.
    """
    owner = owner or new_owner()
    steps = steps or default_steps()
    progress = Progress()
    if only is not None:
        _check_only(engine, only)
    while True:
        if isinstance(options, RoundOptions):
            options = asdict(options)
        r = open_round(engine) or _start_round(engine, options or {})
        opts = RoundOptions(**r.details.get("options", {}))
        acquire(engine, r.id, owner)
        try:
            progress.round_number = r.number
            while r.state != "done":
                if only is not None and r.state != only:
                    progress.state = r.state
                    return progress
                if r.state not in steps:
                    raise PathloopError(f"round {r.number} is in unknown state {r.state!r}")
                with Heartbeat(engine, r.id, owner):
                    outcome = steps[r.state](ws, engine, r, opts)
                if outcome is None:  # waiting
                    progress.state = r.state
                    progress.waiting_for = waiting_message(engine, r, ws)
                    return progress
                progress.ran.append(f"round {r.number}: {r.state}")
                log(f"round {r.number}: {r.state} done")
                nxt = STATES[STATES.index(r.state) + 1]
                r = _set_state(engine, r.id, nxt, **outcome)
            progress.state = "done"
            if only is not None:  # that step was the round's last: do not start the next one
                return progress
        finally:
            release(engine, r.id, owner)


def _check_only(engine: Engine, only: str) -> None:
    if only not in STATES[:-1]:
        raise PathloopError(f"step {only!r}; expected one of: {', '.join(STATES[:-1])}")
    r = open_round(engine)
    state = r.state if r is not None else "generating"
    if state != only:
        number = r.number if r is not None else "the next"
        when = "already done" if STATES.index(only) < STATES.index(state) else f"not due before {state} is done"
        raise PathloopError(f"round {number} is at {state}; step {only} is {when}")


def ratings_needed(ws: Workspace, n_samples: int) -> int:
    """Judgments on a round's samples that end its wait: the trigger, or every sample rated ``overlap`` times."""
    return max(1, min(ws.settings.round_min_judgments, ws.settings.overlap * n_samples))


def waiting_message(engine: Engine, r: Round, ws: Workspace) -> str:
    judged, samples = round_ratings(engine, r.number)
    return (f"round {r.number} is waiting for ratings: {judged} of {ratings_needed(ws, samples)} judgments on its "
            f"{samples} samples (round_min_judgments = {ws.settings.round_min_judgments}, overlap = "
            f"{ws.settings.overlap})")


def is_due(ws: Workspace, engine: Engine) -> bool:
    """False only when the open round waits for ratings that have not come (``--if-due`` then does nothing)."""
    r = open_round(engine)
    if r is None or r.state != "awaiting_ratings":
        return True
    judged, samples = round_ratings(engine, r.number)
    return judged >= ratings_needed(ws, samples)


def default_steps() -> Steps:
    return {"generating": step_generate, "awaiting_ratings": step_await_ratings,
            "training_reward": step_train_reward, "finetuning": step_finetune, "evaluating": step_evaluate}


def step_generate(ws: Workspace, engine: Engine, r: Round, o: RoundOptions) -> dict:
    from finetune.registry import load_generator
    from finetune.sample import SampleSettings, generate_into_store

    gen = load_generator(ws, engine, r.generator_in_id)
    settings = SampleSettings(o.sampler, o.sample_steps, o.guidance)
    report = generate_into_store(ws, engine, gen, per_class=o.per_class, settings=settings,
                                 seed=o.seed * 1_000_003 + r.number, round_number=r.number)
    return {"details": {"generated": report.generated + report.skipped}}


def step_await_ratings(ws: Workspace, engine: Engine, r: Round, o: RoundOptions) -> dict | None:
    judged, samples = round_ratings(engine, r.number)
    if judged < ratings_needed(ws, samples):
        return None
    return {"details": {"judgments_at_close": judged}}


def step_train_reward(ws: Workspace, engine: Engine, r: Round, o: RoundOptions) -> dict:
    from reward.config import RewardConfig
    from reward.score import score_samples
    from reward.train import train_reward

    cfg = RewardConfig(backbone=o.reward_backbone, train_epochs=o.reward_epochs,
                       data_min_samples=o.reward_min_samples, data_min_ratings=o.min_ratings, seed=o.seed, run_name=f"round-{r.number}-reward")
    version = train_reward(ws, engine, cfg, progress=True)
    scored = score_samples(ws, engine, version.id, "all", progress=True)
    return {"reward_id": version.id, "details": {"reward_metrics": version.metrics, "scored": scored.scored}}


def step_finetune(ws: Workspace, engine: Engine, r: Round, o: RoundOptions) -> dict:
    from finetune.config import FinetuneConfig
    from finetune.train import finetune
    from reward.score import load_reward

    cfg = FinetuneConfig(train_steps=o.finetune_steps, train_learning_rate=o.finetune_lr,
                         train_lr_schedule=o.finetune_lr_schedule,
                         train_batch_size=o.finetune_batch_size, beta=o.beta, weighting=o.weighting,
                         objective=o.objective, preference_beta=o.preference_beta,
                         weighting_min_ratings=o.min_ratings, lora_rank=o.finetune_lora_rank,
                         checkpoint_every=o.finetune_checkpoint_every, samples=str(r.number), seed=o.seed,
                         **o.selection(), run_name=f"round-{r.number}-finetune")
    child = finetune(ws, engine, cfg, load_reward(ws, engine, r.reward_id), parent_id=r.generator_in_id,
                     reward_id=r.reward_id, round_number=r.number, resume="auto")
    selection = child.config.get("selection")
    if not selection:
        return {"generator_out_id": child.id}
    # which rule chose the child: the reward model, or the round-1 guard's fallback
    return {"generator_out_id": child.id, "details": {"selection": {k: selection.get(k) for k in (
        "rule", "selected_step", "spread", "stopped_early_at")}}}


def step_evaluate(ws: Workspace, engine: Engine, r: Round, o: RoundOptions) -> dict:
    """`pathloop evaluate` of the parent and the child on ``eval_per_class`` fresh samples per class (the
    round's sampler; the round's reward model predicts plausibility): the ``Evaluation`` rows the dashboard
    shows, and the headline figures in the round's details."""
    from pathloop.evaluate import evaluate
    from pathloop.evaluate_config import EvaluateConfig

    cfg = EvaluateConfig(per_class=max(2, o.eval_per_class), sampler=o.sampler, steps=o.sample_steps,
                         guidance=o.guidance, seed=o.seed)
    result = evaluate(ws, engine, cfg, model=r.generator_out_id, against=[r.generator_in_id], progress=False,
                      log=lambda m: None)
    by_id = {v["generator_id"]: v for v in result.versions}
    parent, child = by_id[r.generator_in_id], by_id[r.generator_out_id]

    def reward_fresh(v: dict) -> float | None:
        return v["reward"]["fresh"]["mean"] if v["reward"] else None

    return {"details": {"evaluation": {
        "parent": reward_fresh(parent), "child": reward_fresh(child),  # reward-predicted plausibility, fresh samples
        "fid": {"parent": parent["fid"], "child": child["fid"]},
        "coverage": {"parent": parent["coverage"], "child": child["coverage"]},
        "folder": result.folder.relative_to(ws.root).as_posix(), "evaluation_ids": result.evaluation_ids}}}
