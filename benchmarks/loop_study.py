"""The loop study: does simulated expert feedback make fresh tiles more plausible, at what cost?

On the demo slide (scikit-image's immunohistochemistry image, two classes by DAB stain), from
a freshly pretrained generator (round 0), two arms run the same number of optimizer steps:

- **loop**: N rounds of the real system (``pathloop.rounds``): generate ``per_class`` tiles
  per class, the simulated expert (``pathloop/simulate.py``) rates ``rate`` of them through
  the queue, a reward model is trained on its judgments, the generator is fine-tuned on its
  rated tiles (``--objective preference``, the default: Diffusion-DPO pairs of a plausible and
  an implausible tile, with the real-tile term at ``--beta 300``; ``kto``: Diffusion-KTO on each
  tile's verdict, also at ``--beta``; or ``weighted``: reward-weighted denoising, its real-tile
  term at ``--weighted-beta 0.3``), the child being the best of its checkpoints by the round's
  reward model (``--select-every 25``: the parent included, so a round that only makes
  things worse keeps the parent), and the round evaluates parent and child;
- **control**: the same fine-tuning loop, optimizer, learning rate, batches and steps with
  every synthetic weight 0 (``weighting = none``): the real-tile term alone, i.e. plain
  continued pretraining at equal cost, no feedback.

Then one ``pathloop evaluate`` of every version (same fresh seeds, never rated, same feature
extractor, the last round's reward model) with the simulated expert judging the fresh
samples. Per round and arm: simulated-expert plausibility with Wilson 95% intervals,
reward-predicted plausibility, FID / precision / recall / density / coverage, downstream
utility, and the share of fresh samples flagged as copies of training tiles. Round 0 is
measured once more on other seeds (row ``seeds+1``): how far every figure moves with the
draw alone, next to the targets' thresholds.

Repeats (``--seeds N``): each seed pretrains its own round-0 generator and runs every arm in
``OUT/seed-K/``; ``OUT/summary.{json,txt}`` holds each arm's plausibility gain at the last
round per seed (last round minus its own round 0) with the mean and a Student-t 95% interval
over seeds, and the FID and coverage changes per seed (each side with its bootstrap
interval from ``pathloop evaluate``). Compared objectives (``--compare kto,weighted``): each
runs the same rounds from the same round-0 generator in its own copy of the workspace
(``workspace-<objective>``, arm ``loop-<objective>``), judged by the same simulated expert.

The targets of the study (plausibility +15 points with its interval clear of round 0's, FID
at most 10% worse, coverage within 0.05, no such rise in the control) are checked and printed,
not asserted: the study reports what happened.

Run: ``python benchmarks/loop_study.py [--out study] [--rounds 3] …`` (``make study``); on a
GPU, larger settings by flag, e.g. ``--preset small --tile-size 64 --eval-per-class 256``.
Writes ``OUT/results.json``, ``results.csv``, ``table.txt``, ``plausibility.png``,
``metrics.png`` and keeps the workspace in ``OUT/workspace`` (open it with ``pathloop annotate``).
"""

# ruff: noqa: E402  (the import path is fixed before anything imports the stdlib's queue)

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/queue.py shares its name with the standard library's ``queue``: keep this folder,
# which Python puts first on the path for a script, off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from pathloop.demo import STAIN_CLASSES as SLIDE_CLASSES
from store.errors import PathloopError

CLASSES = SLIDE_CLASSES["ihc"]


@dataclass
class StudyConfig:
    """The study's settings; the defaults run on 2 CPU cores in under 30 minutes."""

    rounds: int = field(default=3, metadata={"help": "rounds of the loop (and of the control)"})
    rate: int = field(default=128, metadata={"help": "tiles the simulated expert rates per round"})
    per_class: int = field(default=64, metadata={"help": "tiles generated per class and round"})
    noise: float = field(default=0.0, metadata={"help": "share of the simulated expert's verdicts flipped"})
    preset: str = field(default="tiny", metadata={"help": "UNet preset: tiny (CPU, 32 px), small (64 px), base"})
    tile_size: int = field(default=32, metadata={"help": "tile edge in pixels"})
    pretrain_steps: int = field(default=450, metadata={"help": "pretraining steps of the round-0 generator"})
    pretrain_lr: float = field(default=1e-3, metadata={"help": "pretraining learning rate"})
    pretrain_batch_size: int = field(default=32, metadata={"help": "pretraining batch"})
    sampler: str = field(default="ddpm", metadata={"help": "sampler of every generated tile: ddpm or ddim"})
    sample_steps: int = field(default=100, metadata={"help": "sampler steps"})
    reward_backbone: str = field(default="resnet18", metadata={"help": "timm backbone of the reward model"})
    reward_epochs: int = field(default=20, metadata={"help": "maximum reward training epochs"})
    finetune_steps: int = field(default=150, metadata={"help": "optimizer steps per round, in both arms"})
    finetune_lr: float = field(default=1e-5, metadata={"help": "fine-tuning learning rate, both arms"})
    finetune_lr_schedule: str = field(default="cosine", metadata={"help": "constant or cosine (to 0), both arms"})
    finetune_batch_size: int = field(default=16, metadata={"help": "synthetic (and as many real) tiles per step"})
    beta: float = field(default=300.0, metadata={
        "help": "weight of the real-tile term of a preference or KTO loop arm and of the control (their pair and "
                "verdict terms' gradients are ~1000x a denoising one)"})
    weighted_beta: float = field(default=0.3, metadata={
        "help": "weight of the real-tile term of a weighted loop arm (pathloop finetune's own default: at the "
                "others' 300 its reward-weighted term is 1/300 of the loss and the arm is the control)"})
    weighting: str = field(default="binary", metadata={"help": "loop arm's sample weights: reward, binary, normalized"})
    objective: str = field(default="preference", metadata={
        "help": "loop arm's objective: weighted (reward-weighted likelihood), preference (Diffusion-DPO on pairs) or "
                "kto (Diffusion-KTO on each tile's verdict)"})
    preference_beta: float = field(default=5000.0, metadata={"help": "preference objective's inverse temperature"})
    select_every: int = field(default=25, metadata={
        "help": "loop arm: every N steps score the candidate on fresh samples with the round's reward model; the "
                "child is the best (0: off)"})
    select_per_class: int = field(default=16, metadata={"help": "loop arm: fresh samples per class of each check"})
    select_steps: int = field(default=50, metadata={"help": "loop arm: sampler steps of each check"})
    select_patience: int = field(default=2, metadata={"help": "loop arm: stop after N checks without a better score"})
    select_min_auc: float = field(default=0.65, metadata={
        "help": "loop arm, round-1 guard: a reward model below this held-out ROC-AUC does not select"})
    select_min_gain: float = field(default=0.01, metadata={
        "help": "loop arm, round-1 guard: checks spread by less than this do not select"})
    round_eval_per_class: int = field(default=8, metadata={"help": "fresh samples per class of each round's own check"})
    eval_per_class: int = field(default=64, metadata={"help": "fresh samples per class and version in the final evaluation"})
    utility_epochs: int = field(default=30, metadata={"help": "epochs of the downstream-utility classifiers"})
    seed: int = field(default=0, metadata={"help": "base seed of everything"})
    slide: str = field(default="ihc", metadata={
        "help": "the workspace's slide: ihc (the demo slide, dab_negative/dab_positive), he (the same tissue "
                "recoloured as H&E, nuclei_dense/stroma; see pathloop demo-slide --stain he), he-real (a real "
                "300x500 H&E crop) or he-tia (a real 1000x1000 H&E field, tiled at level 1), both "
                "nuclei_dense/stroma"})
    expert_rules: str = field(default="stain", metadata={
        "help": "the simulated expert's rules: stain (stain-agnostic) or ihc-legacy (the IHC demo's own)"})
    seeds: int = field(default=1, metadata={
        "help": "independent repeats, each from its own round-0 generator (seeds seed, seed+1, ...): the gains get "
                "a 95 percent interval over seeds"})
    compare: str = field(default="", metadata={
        "help": "further loop arms, comma-separated objectives (e.g. kto,weighted): each runs the same rounds from "
                "the same round-0 generator, in a copy of the workspace"})

    def __post_init__(self) -> None:
        for name in ("rounds", "rate", "per_class", "pretrain_steps", "finetune_steps", "eval_per_class", "seeds"):
            if getattr(self, name) < 1:
                raise PathloopError(f"{name} = {getattr(self, name)}; expected at least 1")
        if self.weighting not in ("reward", "binary", "normalized"):
            raise PathloopError(f"weighting {self.weighting!r}; the loop arm needs reward, binary or normalized "
                                "(none is the control arm's)")
        if self.slide not in SLIDE_CLASSES:
            raise PathloopError(f"slide {self.slide!r}; expected one of {', '.join(SLIDE_CLASSES)}")
        if not 0 <= self.noise <= 0.5:
            raise PathloopError(f"noise = {self.noise}; expected a share of flipped verdicts in [0, 0.5]")
        from finetune.unet import check_size

        check_size(self.preset, self.tile_size)  # before anything is written
        round_options(self)  # the round's and the evaluation's own checks, too
        for objective in self.compared():
            if objective == self.objective:
                raise PathloopError(f"compare {objective!r}: the loop arm already runs objective {objective}")
            round_options(replace(self, objective=objective, compare=""))
        evaluate_config(self)

    def compared(self) -> list[str]:
        """The further loop arms' objectives, in the order given."""
        return [o.strip() for o in self.compare.split(",") if o.strip()]


# Every stage in seconds, for an end-to-end test of the study's plumbing (not of its outcome). A
# 2-step generator makes noise the expert rejects; flipped verdicts give the reward model both kinds.
# Its 1-epoch reward model is noise: the round-1 guard is off so that the selection checks run.
FAST = dict(rounds=1, rate=16, per_class=8, noise=0.3, pretrain_steps=2, sample_steps=4, reward_backbone="test_resnet",
            reward_epochs=1, finetune_steps=2, finetune_batch_size=4, select_every=1, select_per_class=2, select_steps=2,
            round_eval_per_class=2, eval_per_class=4, utility_epochs=1, select_min_auc=0.0, select_min_gain=0.0)


# ---------------------------------------------------------------- the two arms


def make_workspace(out: Path, cfg: StudyConfig, log: Callable[[str], None]):
    """A new workspace of the demo slide's tiles; every rated tile is rated once, no control tiles."""
    from pathloop.demo import demo_workspace

    ws, engine, added = demo_workspace(out, cfg.slide, cfg.tile_size, overlap=1, round_min_judgments=cfg.rate)
    log(f"workspace {ws.root}: {added} real tiles from the demo slide")
    return ws, engine


def evaluate_config(cfg: StudyConfig):
    """The final evaluation: every version, the simulated expert judging the fresh samples."""
    from pathloop.evaluate_config import EvaluateConfig

    return EvaluateConfig(per_class=cfg.eval_per_class, sampler=cfg.sampler, steps=cfg.sample_steps, seed=cfg.seed,
                          utility_epochs=cfg.utility_epochs, simulated_expert=True, expert_rules=cfg.expert_rules)


def round_options(cfg: StudyConfig):
    from pathloop.rounds import RoundOptions

    return RoundOptions(per_class=cfg.per_class, sampler=cfg.sampler, sample_steps=cfg.sample_steps,
                        reward_backbone=cfg.reward_backbone, reward_epochs=cfg.reward_epochs,
                        reward_min_samples=min(20, cfg.rate), min_ratings=1, finetune_steps=cfg.finetune_steps,
                        finetune_lr=cfg.finetune_lr, finetune_lr_schedule=cfg.finetune_lr_schedule,
                        finetune_batch_size=cfg.finetune_batch_size,
                        finetune_checkpoint_every=cfg.finetune_steps,
                        beta=cfg.weighted_beta if cfg.objective == "weighted" else cfg.beta, weighting=cfg.weighting,
                        objective=cfg.objective, preference_beta=cfg.preference_beta,
                        select_every=cfg.select_every, select_per_class=cfg.select_per_class,
                        select_steps=cfg.select_steps, select_patience=cfg.select_patience,
                        select_min_auc=cfg.select_min_auc, select_min_gain=cfg.select_min_gain,
                        eval_per_class=max(2, cfg.round_eval_per_class), seed=cfg.seed)


def run_loop(ws, engine, cfg: StudyConfig, timings: dict, log: Callable[[str], None], arm: str = "loop") -> list[dict]:
    """A loop arm through ``pathloop.rounds``, the simulated expert rating each round: one dict per round."""
    from pathloop import rounds
    from pathloop.simulate import fit_expert, simulate
    from store.generators import get_generator

    expert = fit_expert(ws, engine, cfg.expert_rules)
    options = asdict(round_options(cfg))
    out = []
    for number in range(1, cfg.rounds + 1):
        t = time.perf_counter()
        rounds.advance(ws, engine, options, log=lambda m: None)  # starts the round, generates, waits
        t_gen = time.perf_counter()
        rated = simulate(ws, engine, raters=1, max_per_rater=cfg.rate, noise=cfg.noise, seed=cfg.seed + number,
                         expert=expert)
        t_rate = time.perf_counter()
        stamps = {}
        for step in ("awaiting_ratings", "training_reward", "finetuning", "evaluating"):
            rounds.advance(ws, engine, only=step, log=lambda m: None)
            stamps[step] = time.perf_counter()
        r = rounds.list_rounds(engine)[-1]
        if r.number != number or r.state != "done":
            raise RuntimeError(f"round {number} ended in state {r.state}")
        timings[f"{arm} round {number}"] = {
            "generate": t_gen - t, "simulated expert": t_rate - t_gen,
            "reward model": stamps["training_reward"] - stamps["awaiting_ratings"],
            "fine-tune": stamps["finetuning"] - stamps["training_reward"],
            "round evaluation": stamps["evaluating"] - stamps["finetuning"]}
        metrics = r.details.get("reward_metrics") or {}
        selection = get_generator(engine, r.generator_out_id).config.get("selection") or {}
        out.append({"round": number, "generator_id": r.generator_out_id, "reward_id": r.reward_id,
                    "rated": rated.judgments, "rated_plausible": rated.plausible,
                    "reward_roc_auc": metrics.get("roc_auc"), "reward_test_n": metrics.get("n"),
                    "selected_step": selection.get("selected_step"), "selection_rule": selection.get("rule"),
                    "selection": selection.get("history")})
        chosen = f", child = step {selection['selected_step']} by {selection.get('rule')}" if selection else ""
        log(f"{arm} round {number}: rated {rated.judgments} ({rated.plausible} plausible), reward ROC-AUC "
            f"{_fmt(metrics.get('roc_auc'))}, generator version {r.generator_out_id}{chosen} "
            f"({time.perf_counter() - t:.0f} s)")
    return out


def run_control(ws, engine, cfg: StudyConfig, start_id: int, timings: dict, log: Callable[[str], None]) -> list[dict]:
    """The control arm: per round, the same fine-tuning run with every synthetic weight 0."""
    from finetune.config import FinetuneConfig
    from finetune.train import finetune

    out, parent = [], start_id
    for number in range(1, cfg.rounds + 1):
        t = time.perf_counter()
        fc = FinetuneConfig(train_steps=cfg.finetune_steps, train_learning_rate=cfg.finetune_lr,
                            train_lr_schedule=cfg.finetune_lr_schedule,
                            train_batch_size=cfg.finetune_batch_size, beta=cfg.beta, weighting="none",
                            samples=str(number), checkpoint_every=cfg.finetune_steps, seed=cfg.seed,
                            run_name=f"control-{number}")
        child = finetune(ws, engine, fc, None, parent_id=parent, reward_id=None, progress=False)
        timings[f"control round {number}"] = {"fine-tune": time.perf_counter() - t}
        out.append({"round": number, "generator_id": child.id})
        log(f"control round {number}: generator version {child.id} ({time.perf_counter() - t:.0f} s)")
        parent = child.id
    return out


# ---------------------------------------------------------------- the report


def study_rows(versions: dict[int, dict], g0: int, loops: dict[str, list[dict]], control: list[dict],
               again: dict | None = None, objectives: dict[str, str] | None = None,
               classes: list[str] = CLASSES) -> list[dict]:
    """One flat row per (arm, round), round 0 shared: what the table, CSV and plots show.

    ``loops``: arm name -> its rounds (``loop``, and ``loop-<objective>`` for compared objectives);
    ``versions``: workspace -> generator id -> evaluated metrics, where the workspace is
    ``base`` (round 0, ``loop``, the control) or a compared arm's name (its own copy of the
    workspace, so ids repeat across copies). ``again``: round 0 measured once more on other seeds (arm
    ``seeds+1``), the spread of the measurement itself.
    """
    def row(arm: str, number: int, gid: int, extra: dict | None = None, v: dict | None = None) -> dict:
        v = v or versions.get(arm, versions["base"])[gid]
        sim = v["simulated_expert"]
        iv = v.get("intervals") or {}
        return {"arm": arm, "objective": (objectives or {}).get(arm, "none" if arm == "control" else "-"),
                "round": number, "generator_id": gid,
                "plausibility": sim["rate"], "plausibility_low": sim["low"], "plausibility_high": sim["high"],
                "plausibility_n": sim["n"],
                **{f"plausibility_{c}": sim["per_class"][c]["rate"] for c in classes},
                "reward_p_fresh": v["reward"]["fresh"]["mean"] if v["reward"] else None,
                "fid": v["fid"], "fid_low": iv.get("fid", {}).get("low"), "fid_high": iv.get("fid", {}).get("high"),
                "precision": v["precision"], "recall": v["recall"], "density": v["density"],
                "coverage": v["coverage"], "coverage_low": iv.get("coverage", {}).get("low"),
                "coverage_high": iv.get("coverage", {}).get("high"), "utility_accuracy": v["utility"]["accuracy"],
                "utility_balanced_accuracy": v["utility"]["balanced_accuracy"],
                "copies_share": v["memorisation"]["fresh_share"], **(extra or {})}

    rows = [row("both", 0, g0)]
    for arm, rounds_ in loops.items():
        rows += [row(arm, r["round"], r["generator_id"], {k: r[k] for k in ("rated", "rated_plausible", "reward_roc_auc",
                                                                            "selected_step", "selection_rule")})
                 for r in rounds_]
    rows += [row("control", r["round"], r["generator_id"]) for r in control]
    if again is not None:
        rows.append(row("seeds+1", 0, g0, v=again))
    return rows


def check_targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The study's targets, each (name, met, the figures behind it)."""
    r0 = rows[0]
    loop_n = [r for r in rows if r["arm"] == "loop"][-1]
    ctrl_n = [r for r in rows if r["arm"] == "control"][-1]
    rise = loop_n["plausibility"] - r0["plausibility"]
    ctrl_rise = ctrl_n["plausibility"] - r0["plausibility"]
    fid_change = loop_n["fid"] / r0["fid"] - 1 if r0["fid"] > 0 else float("inf")
    cov_change = loop_n["coverage"] - r0["coverage"]
    ctrl_clear = ctrl_n["plausibility_low"] > r0["plausibility_high"]
    again = [r for r in rows if r["arm"] == "seeds+1"]
    spread = (f"; round 0 on other seeds: {again[0]['fid']:.2f} ({100 * (again[0]['fid'] / r0['fid'] - 1):+.1f}%)"
              if again else "")
    cov_spread = (f"; round 0 on other seeds: {again[0]['coverage']:.3f} ({again[0]['coverage'] - r0['coverage']:+.3f})"
                  if again else "")
    return [
        ("plausibility rises >= 15 points, round 0 -> N", rise >= 0.15,
         f"{r0['plausibility']:.3f} -> {loop_n['plausibility']:.3f} ({100 * rise:+.1f} points)"),
        ("its interval clear of round 0's", loop_n["plausibility_low"] > r0["plausibility_high"],
         f"round N [{loop_n['plausibility_low']:.3f}, {loop_n['plausibility_high']:.3f}] vs round 0 "
         f"[{r0['plausibility_low']:.3f}, {r0['plausibility_high']:.3f}]"),
        ("FID worsens by no more than 10%", fid_change <= 0.10,
         f"{r0['fid']:.2f} -> {loop_n['fid']:.2f} ({100 * fid_change:+.1f}%){spread}"),
        ("coverage within 0.05", abs(cov_change) <= 0.05 + 1e-9,  # coverage is a share: -0.05 may print as -0.0500…1
         f"{r0['coverage']:.3f} -> {loop_n['coverage']:.3f} ({cov_change:+.3f}"
         f"{', higher: more of the real tiles covered' if cov_change > 0.05 else ''}){cov_spread}"),
        ("the control does not show the same rise", not (ctrl_rise >= 0.15 and ctrl_clear),
         f"{r0['plausibility']:.3f} -> {ctrl_n['plausibility']:.3f} ({100 * ctrl_rise:+.1f} points, interval "
         f"{'clear of' if ctrl_clear else 'overlapping'} round 0's)"),
    ]


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _chosen(r: dict) -> str:
    """The child's step; '(fallback)' when the round-1 guard, not the reward model, chose it."""
    if r.get("selected_step") is None:
        return "-"
    return f"{r['selected_step']}{' (fallback)' if str(r.get('selection_rule')).startswith('fallback') else ''}"


def _with_interval(r: dict, key: str, digits: int) -> str:
    if r.get(f"{key}_low") is None:
        return _fmt(r[key], digits)
    return f"{_fmt(r[key], digits)} [{_fmt(r[f'{key}_low'], digits)}-{_fmt(r[f'{key}_high'], digits)}]"


def format_table(rows: list[dict]) -> str:
    classes = [k[len("plausibility_"):] for k in rows[0] if k.startswith("plausibility_")
               and k not in ("plausibility_low", "plausibility_high", "plausibility_n")]
    head = ["arm", "objective", "round", "version", "sim. expert plausible [95% CI]", *classes, "reward p", "FID [95% CI]",
            "precision", "recall", "density", "coverage [95% CI]", "utility acc", "bal. acc", "copies", "rated (plausible)", "reward AUC",
            "child = step"]
    body = []
    for r in rows:
        body.append([r["arm"], r.get("objective", "-"), str(r["round"]), f"v{r['generator_id']}",
                     f"{r['plausibility']:.3f} [{r['plausibility_low']:.3f}-{r['plausibility_high']:.3f}] "
                     f"n={r['plausibility_n']}",
                     *(_fmt(r[f"plausibility_{c}"]) for c in classes), _fmt(r["reward_p_fresh"]),
                     _with_interval(r, "fid", 2), _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["density"]),
                     _with_interval(r, "coverage", 3),
                     _fmt(r["utility_accuracy"]), _fmt(r["utility_balanced_accuracy"]), _fmt(r["copies_share"]),
                     f"{r['rated']} ({r['rated_plausible']})" if "rated" in r else "-",
                     _fmt(r.get("reward_roc_auc")), _chosen(r)])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i < 4 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines += ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))) for b in body]
    return "\n".join(lines)


def plot(rows: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loop_arms = list(dict.fromkeys(r["arm"] for r in rows if r["arm"].startswith("loop")))
    styles = [("tab:red", "o-"), ("tab:orange", "^-"), ("tab:purple", "D-"), ("tab:green", "v-")]
    arms = {arm: styles[i % len(styles)] for i, arm in enumerate(loop_arms)} | {"control": ("tab:blue", "s--")}
    objective = {r["arm"]: r.get("objective", "-") for r in rows}

    def series(arm: str) -> list[dict]:
        return [rows[0]] + [r for r in rows if r["arm"] == arm]

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (arm, (colour, style)) in enumerate(arms.items()):
        pts = series(arm)
        xs = [r["round"] + (k - (len(arms) - 1) / 2) * 0.06 for r in pts]
        ys = [r["plausibility"] for r in pts]
        err = [[y - r["plausibility_low"] for y, r in zip(ys, pts)], [r["plausibility_high"] - y for y, r in zip(ys, pts)]]
        label = (f"{arm} ({objective[arm]}, simulated expert feedback)" if arm != "control"
                 else "control (continued pretraining)")
        ax.errorbar(xs, ys, yerr=err, fmt=style, color=colour, capsize=4, label=label)
    n = rows[0]["plausibility_n"]
    ax.set_xticks(sorted({r["round"] for r in rows}))
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"simulated-expert plausibility\nof {n} fresh tiles (Wilson 95%)")
    ax.set_title("Plausibility of fresh tiles by round")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths = [folder / "plausibility.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    panels = [("FID (lower is better)", ["fid"]), ("precision / recall", ["precision", "recall"]),
              ("density / coverage", ["density", "coverage"]),
              ("utility: synthetic-trained, real test", ["utility_accuracy", "utility_balanced_accuracy"]),
              ("reward-predicted plausibility (fresh)", ["reward_p_fresh"]), ("copies (share of fresh)", ["copies_share"])]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels):
        for arm, (colour, style) in arms.items():
            pts = series(arm)
            for j, key in enumerate(keys):
                ax.plot([r["round"] for r in pts], [float("nan") if r[key] is None else r[key] for r in pts],
                        style, color=colour, alpha=1.0 if j == 0 else 0.5, label=f"{arm}: {key}")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(sorted({r["round"] for r in rows}))
        ax.set_xlabel("round", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle("Fidelity, diversity, utility and memorisation by round (loop vs control)")
    fig.tight_layout()
    paths.append(folder / "metrics.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- the whole study


def run_seed(cfg: StudyConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    """One repeat: round 0, every loop arm, the control and the final evaluation in ``out``."""
    import shutil

    from finetune.config import PretrainConfig
    from finetune.pretrain import pretrain
    from pathloop.evaluate import evaluate
    from store.db import make_engine
    from store.workspace import Workspace

    started = time.perf_counter()
    timings: dict = {}
    ws, engine = make_workspace(out, cfg, log)
    timings["workspace"] = time.perf_counter() - started

    t = time.perf_counter()
    g0 = pretrain(ws, engine, PretrainConfig(preset=cfg.preset, train_steps=cfg.pretrain_steps,
                                             train_batch_size=cfg.pretrain_batch_size,
                                             train_learning_rate=cfg.pretrain_lr,
                                             train_lr_warmup_steps=min(20, cfg.pretrain_steps - 1),
                                             checkpoint_every=cfg.pretrain_steps, seed=cfg.seed,
                                             run_name="pretrain"), progress=False).id
    timings["pretrain"] = time.perf_counter() - t
    log(f"round 0: pretrained generator version {g0} ({timings['pretrain']:.0f} s)")
    # each compared objective starts from this very round 0, in its own copy of the workspace
    copies = {}
    engine.dispose()
    for objective in cfg.compared():
        copies[f"loop-{objective}"] = (objective, shutil.copytree(ws.root, out / f"workspace-{objective}"))

    loops = {"loop": run_loop(ws, engine, cfg, timings, log)}
    objectives = {"loop": cfg.objective}
    arm_engines = {}
    for arm, (objective, folder) in copies.items():
        arm_ws = Workspace.open(folder)
        arm_engines[arm] = (arm_ws, make_engine(arm_ws.database_url))
        loops[arm] = run_loop(*arm_engines[arm], replace(cfg, objective=objective, compare=""), timings, log, arm=arm)
        objectives[arm] = objective
    control = run_control(ws, engine, cfg, g0, timings, log)

    t = time.perf_counter()
    ids = [g0, *(r["generator_id"] for r in loops["loop"]), *(r["generator_id"] for r in control)]
    ev = evaluate(ws, engine, evaluate_config(cfg), model=loops["loop"][-1]["generator_id"], against=ids,
                  progress=False, log=log)
    versions = {"base": {v["generator_id"]: v for v in ev.versions}}
    for arm, (arm_ws, arm_engine) in arm_engines.items():
        arm_ids = [r["generator_id"] for r in loops[arm]]
        arm_ev = evaluate(arm_ws, arm_engine, evaluate_config(cfg), model=arm_ids[-1], against=arm_ids,
                          progress=False, log=log)
        versions[arm] = {v["generator_id"]: v for v in arm_ev.versions}
        arm_engine.dispose()
    timings["final evaluation"] = time.perf_counter() - t
    again = None
    if cfg.seeds == 1:  # round 0 once more on other seeds: how far the figures move with the draw alone
        t = time.perf_counter()
        again = evaluate(ws, engine, replace(evaluate_config(cfg), seed=cfg.seed + 1), model=g0, against=[g0],
                         progress=False, log=log).versions[0]
        timings["round 0 on other seeds"] = time.perf_counter() - t
    engine.dispose()

    classes = list(ws.settings.classes)
    rows = study_rows(versions, g0, loops, control, again, objectives, classes)
    rows = [{"seed": cfg.seed, **r} for r in rows]
    targets = check_targets(rows)
    results = {"config": asdict(cfg), "rows": rows, "targets": [{"target": n, "met": ok, "figures": f}
                                                                for n, ok, f in targets],
               "timings_s": timings, "total_s": time.perf_counter() - started, "evaluation_folder": str(ev.folder),
               "baseline_real": ev.baseline}
    _write_results(out, results, rows)
    return results


def _write_results(out: Path, results: dict, rows: list[dict]) -> None:
    import pandas as pd

    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "device": "cuda" if torch.cuda.is_available() else "cpu"}
    results["table"] = format_table(rows)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "table.txt").write_text(results["table"] + "\n")
    results["plots"] = [str(p) for p in plot(rows, out)]


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and Student-t ``level`` interval of ``values`` (one value per seed); no interval from one value."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), None, None
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def summarise(per_seed: list[list[dict]]) -> dict:
    """Gains at the last round per arm and seed, with their mean and 95% interval over seeds, and the targets.

    ``per_seed``: each seed's rows (``study_rows``). A gain is the arm's last-round simulated-expert
    plausibility minus its own seed's round 0; FID and coverage changes alike, with each side's
    bootstrap interval kept in the per-seed lines.
    """
    arms = list(dict.fromkeys(r["arm"] for rows in per_seed for r in rows if r["arm"] not in ("both", "seeds+1")))
    out = {"seeds": [rows[0]["seed"] for rows in per_seed], "arms": {}}
    for arm in arms:
        per = []
        for rows in per_seed:  # an arm run on some seeds only (--combine) is summarised over those
            r0 = rows[0]
            mine = [r for r in rows if r["arm"] == arm]
            if not mine:
                continue
            last = mine[-1]
            per.append({"seed": r0["seed"], "round": last["round"], "objective": last["objective"],
                        "plausibility_0": r0["plausibility"], "plausibility_n": last["plausibility"],
                        "gain": last["plausibility"] - r0["plausibility"],
                        "fid_0": r0["fid"], "fid_n": last["fid"], "fid_n_interval": [last["fid_low"], last["fid_high"]],
                        "fid_0_interval": [r0["fid_low"], r0["fid_high"]], "fid_change": last["fid"] / r0["fid"] - 1,
                        "coverage_0": r0["coverage"], "coverage_n": last["coverage"],
                        "coverage_0_interval": [r0["coverage_low"], r0["coverage_high"]],
                        "coverage_n_interval": [last["coverage_low"], last["coverage_high"]],
                        "coverage_change": last["coverage"] - r0["coverage"]})
        agg = {}
        for key in ("gain", "fid_change", "coverage_change"):
            mean, low, high = t_interval([p[key] for p in per])
            agg[key] = {"mean": mean, "low": low, "high": high}
        out["arms"][arm] = {"objective": per[0]["objective"], "per_seed": per, **agg}
    targets = []
    for arm, a in out["arms"].items():
        g = a["gain"]
        if g["low"] is None:
            targets.append({"target": f"{arm}: gain interval over seeds", "met": None,
                            "figures": f"{100 * g['mean']:+.1f} points from 1 seed: no interval (needs --seeds 2 or more)"})
            continue
        figures = f"{100 * g['mean']:+.1f} points [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}] over {len(a['per_seed'])} seeds"
        if arm == "control":
            targets.append({"target": "control: gain not >= 15 points with its interval clear of 0",
                            "met": not (g["mean"] >= 0.15 and g["low"] > 0), "figures": figures})
        else:
            targets.append({"target": f"{arm} ({a['objective']}): gain >= 15 points, interval over seeds clear of 0",
                            "met": g["mean"] >= 0.15 and g["low"] > 0, "figures": figures})
    out["targets"] = targets
    return out


# settings that may differ between the seed folders one summary combines
_PER_RUN = {"seed", "seeds", "compare"}


def combine(folders: list[Path], out: Path) -> dict:
    """Summarise seed folders run apart (e.g. one process per seed, in parallel) as ``run_study`` does its own.

    Each folder holds one seed's ``results.json``; they must share every setting but the seed and the
    compared objectives (an arm run on some seeds only is summarised over those). Writes
    ``OUT/summary.{json,txt}`` and ``OUT/results.csv`` (every seed's rows); nothing when a folder is wrong.
    """
    runs = []
    for folder in folders:
        path = Path(folder) / "results.json"
        try:
            run = json.loads(path.read_text())
            run["rows"], run["config"]  # noqa: B018  (a study's results, not any JSON)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PathloopError(f"{path}: not a loop study's results ({type(e).__name__}); expected the "
                                "results.json of one seed's run") from None
        if len({r.get("seed") for r in run["rows"]}) != 1:
            raise PathloopError(f"{folder} holds several seeds' results; combine one seed's folders "
                                "(its seed-K folders)")
        runs.append(run)
    if len(runs) < 2:
        raise PathloopError(f"{len(runs)} seed folder given; combine needs 2 or more")
    first = runs[0]["config"]
    for folder, run in zip(folders[1:], runs[1:]):
        differ = sorted(k for k in first.keys() | run["config"].keys()
                        if k not in _PER_RUN and first.get(k) != run["config"].get(k))
        if differ:
            raise PathloopError(f"{folder} ran other settings than {folders[0]} ({', '.join(differ)}); "
                                "expected the same study on other seeds")
    seeds = [run["config"]["seed"] for run in runs]
    if len(set(seeds)) < len(seeds):
        raise PathloopError(f"seeds {seeds}: the same seed twice; expected each seed once")
    if out.exists() and any(out.iterdir()):
        raise PathloopError(f"{out} is not empty; the combined summary goes to a new folder (choose another --out)")
    summary = summarise([run["rows"] for run in runs])
    summary["folders"] = [str(f) for f in folders]
    summary["total_s"] = sum(run["total_s"] for run in runs)
    summary["table"] = format_summary(summary)
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([r for run in runs for r in run["rows"]]).to_csv(out / "results.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.txt").write_text(summary["table"] + "\n")
    return summary


def _joined(arm: dict, key: str, fmt: Callable[[float], str]) -> str:
    return ", ".join(fmt(p[key]) for p in arm["per_seed"])


def format_summary(summary: dict) -> str:
    def pts(x):
        return "-" if x is None else f"{100 * x:+.1f}"

    lines = [f"{'arm':<16}{'objective':<12}{'gain per seed (points)':<30}{'mean gain [95% CI over seeds]':<34}"
             f"{'FID change per seed':<28}coverage change per seed"]
    for arm, a in summary["arms"].items():
        g = a["gain"]
        ci = f"{pts(g['mean'])} [{pts(g['low'])}, {pts(g['high'])}]" if g["low"] is not None else f"{pts(g['mean'])} [-]"
        lines.append(f"{arm:<16}{a['objective']:<12}{', '.join(pts(p['gain']) for p in a['per_seed']):<30}{ci:<34}"
                     f"{_joined(a, 'fid_change', lambda x: f'{100 * x:+.0f}%'):<28}"
                     f"{_joined(a, 'coverage_change', lambda x: f'{x:+.3f}')}")
    return "\n".join(lines)


def run_study(cfg: StudyConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    """Run every seed's repeat in ``out`` (a new or empty folder; ``seed-K/`` each when there are several) and
    summarise the gains over seeds; returns the results (one seed: that seed's, with the summary)."""
    if out.exists() and any(out.iterdir()):
        raise PathloopError(f"{out} is not empty; the study starts from a new workspace (choose another --out)")
    started = time.perf_counter()
    runs = []
    for k in range(cfg.seeds):
        seed_cfg = replace(cfg, seed=cfg.seed + k)
        folder = out if cfg.seeds == 1 else out / f"seed-{seed_cfg.seed}"
        if cfg.seeds > 1:
            log(f"--- seed {seed_cfg.seed} ({k + 1} of {cfg.seeds})")
        runs.append(run_seed(seed_cfg, folder, log))
    summary = summarise([r["rows"] for r in runs])
    summary["total_s"] = time.perf_counter() - started
    summary["table"] = format_summary(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.txt").write_text(summary["table"] + "\n")
    if cfg.seeds == 1:
        return runs[0] | {"summary": summary, "total_s": summary["total_s"]}
    rows = [r for run in runs for r in run["rows"]]
    timings = {f"seed {run['config']['seed']}": run["timings_s"] for run in runs}
    results = {"config": asdict(cfg), "rows": rows,
               "targets": [t | {"target": f"seed {run['config']['seed']}: {t['target']}"} for run in runs
                           for t in run["targets"]],
               "timings_s": timings, "total_s": summary["total_s"], "summary": summary,
               "machine": runs[0]["machine"], "table": "\n\n".join(f"seed {run['config']['seed']}:\n{run['table']}"
                                                                  for run in runs),
               "plots": [p for run in runs for p in run["plots"]]}
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)  # every seed's rows, with their seed
    (out / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "table"}, indent=1,
                                                 default=str))
    return results


def _verdict(met: bool | None) -> str:
    return "n/a   " if met is None else "met   " if met else "MISSED"


def _seconds(v) -> float:
    """A stage's seconds: a number, or the sum of a nested dict of them."""
    return sum(_seconds(x) for x in v.values()) if isinstance(v, dict) else v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="study", help="a new or empty folder for the workspace and results")
    parser.add_argument("--fast", action="store_true", help="seconds-long settings that test the plumbing only")
    for f in fields(StudyConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
                            help=f"{f.metadata['help']} (default {f.default})")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="SEED_FOLDER", help=(
        "no run: summarise these seed folders (each one seed's --out, same settings but the seed) over seeds "
        "into --out, e.g. after one process per seed"))
    args = parser.parse_args(argv)
    if args.combine:
        try:
            summary = combine(args.combine, Path(args.out))
        except PathloopError as e:
            print(f"loop_study: error: {e}", file=sys.stderr)
            return 1
        print(summary["table"])
        print()
        for t in summary["targets"]:
            print(f"{_verdict(t['met'])}  {t['target']}: {t['figures']}")
        print(f"wrote {args.out}/summary.json, summary.txt, results.csv")
        return 0
    given = {f.name: getattr(args, f.name) for f in fields(StudyConfig) if getattr(args, f.name) is not None}
    try:
        cfg = StudyConfig(**({**FAST, **given} if args.fast else given))
        results = run_study(cfg, Path(args.out))
    except PathloopError as e:
        print(f"loop_study: error: {e}", file=sys.stderr)
        return 1
    print()
    print(results["table"])
    print()
    for t in results["targets"]:
        print(f"{_verdict(t['met'])}  {t['target']}: {t['figures']}")
    print()
    print(results["summary"]["table"])
    print()
    for t in results["summary"]["targets"]:
        print(f"{_verdict(t['met'])}  {t['target']}: {t['figures']}")
    print()
    stages = "; ".join(f"{k} {_seconds(v):.0f} s" for k, v in results["timings_s"].items())
    print(f"run time {results['total_s'] / 60:.1f} min on {results['machine']['cpus']} CPUs "
          f"({results['machine']['device']}): {stages}")
    print(f"wrote {args.out}/results.json, results.csv, table.txt, summary.json, summary.txt; plots: "
          f"{', '.join(results['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
