"""Reward-weighted fine-tuning of a generator version: one step of the loop.

The synthetic set is the chosen samples, each weighted by the experts' share of plausible
judgments when it has enough ratings, else by the reward model's calibrated probability;
the real set is the workspace's train tiles. Every optimizer step denoises B synthetic and
B real tiles in one forward pass (``finetune.losses``). With ``objective = "preference"`` the
B synthetic tiles are B/2 pairs of a plausible and an implausible sample of one class, and
a frozen copy of the parent denoises the pairs too (Diffusion-DPO); with ``"kto"`` each of the B
synthetic tiles carries its own binary verdict and the frozen parent denoises it too
(Diffusion-KTO). The loop is pretraining's
(``accumulate`` → ``backward`` → clip on sync → ``step``; EMA; ``save_state`` checkpoints;
batches and noise a pure function of (seed, step)), and the result is exported as a
diffusers ``DDPMPipeline`` folder registered as a child ``GeneratorVersion``.

The reward arrives as a plain function ``reward_fn(images uint8 (B, 3, H, W), class_ids
(B,)) -> (B,) probabilities``; this package never imports ``reward/``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from sqlalchemy.engine import Engine
from tqdm.auto import tqdm

from finetune import lora
from finetune.config import FinetuneConfig, data_workers
from finetune.data import (
    PairBatches,
    StepBatches,
    StepTiles,
    TileSet,
    step_generator,
    step_loader,
    to_model_range,
)
from finetune.losses import (
    WeightedLoss,
    kto_loss,
    kto_weights,
    pair_accuracy,
    preference_loss,
    reward_weighted_loss,
    sample_weights,
)
from finetune.pretrain import augmented, export_pipeline, noised_batch
from finetune.registry import load_generator, version_info
from finetune.runs import (
    check_launch,
    check_resumable,
    checkpoint_step,
    resolve_mixed_precision,
    resume_point,
    save_checkpoint,
    write_json,
)
from finetune.selection import Selection
from store.errors import PathloopError
from store.generators import TileTable, incoming_folder, register_generator, tile_table
from store.images import load_rgb
from store.models import GeneratorVersion
from store.rewards import rated_samples, scores_of, selected_samples
from store.workspace import Workspace

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DATA_FILE = "data.json"  # the frozen training data of a run: resuming never re-reads judgments
REWARD_BATCH = 64


@dataclass(frozen=True)
class WeightedSample:
    """A synthetic tile and where its weight comes from: the experts, or the reward model."""

    sample_id: int
    path: Path
    class_name: str
    source: str  # experts | reward | none (weighting "none": no feedback read)
    plausibility: float  # experts' share of plausible, or p(plausible) from the reward model; 0 for none
    ratings: int
    judgment_ids: tuple[int, ...]


def check_reward_fits(reward_fn: RewardFn | None, reward_id: int | None, classes: list[str], tile_size: int) -> None:
    """Refuse a reward function made for other classes, another tile size or another version."""
    if reward_fn is None:
        return
    own_id = getattr(reward_fn, "reward_id", None)
    if own_id is not None and reward_id is not None and own_id != reward_id:
        raise PathloopError(f"the reward function is reward version {own_id}, not version {reward_id}")
    name = f"reward version {reward_id if reward_id is not None else own_id}"
    got = getattr(reward_fn, "classes", None)
    if got is not None and list(got) != list(classes):
        raise PathloopError(f"{name} was trained for classes {list(got)} but the workspace has {list(classes)}")
    size = getattr(reward_fn, "image_size", None)
    if size is not None and size != tile_size:
        raise PathloopError(f"{name} takes {size} px tiles; the workspace tile_size is {tile_size}")


def reward_probabilities(reward_fn: RewardFn, paths: list[Path], class_ids: list[int], size: int, *,
                         progress: bool = False) -> list[float]:
    """p(plausible) of each tile, in batches of ``REWARD_BATCH``: ``(N,)`` floats in [0, 1]."""
    out: list[float] = []
    bar = tqdm(total=len(paths), desc="reward", unit="img", disable=not progress, leave=False)
    for i in range(0, len(paths), REWARD_BATCH):
        batch = np.stack([load_rgb(p, size) for p in paths[i:i + REWARD_BATCH]])
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        ids = torch.tensor(class_ids[i:i + REWARD_BATCH], dtype=torch.long)
        p = torch.as_tensor(reward_fn(images, ids)).detach().float().cpu()
        if p.shape != (len(ids),) or not torch.isfinite(p).all() or p.min() < 0 or p.max() > 1:
            raise PathloopError(f"the reward function returned {tuple(p.shape)} values for {len(ids)} tiles; "
                                "expected one probability in [0, 1] per tile")
        out.extend(p.tolist())
        bar.update(len(ids))
    bar.close()
    return out


def weighted_samples(ws: Workspace, engine: Engine, cfg: FinetuneConfig, reward_fn: RewardFn | None,
                     reward_id: int | None, *, progress: bool = False) -> list[WeightedSample]:
    """The chosen samples (``cfg.samples``), each with its weight source and plausibility.

    Experts' verdict where a sample has at least ``cfg.weighting_min_ratings`` current
    decisive judgments; else ``reward_fn`` when given, else the stored score of ``reward_id``.
    """
    classes, size, which = list(ws.settings.classes), ws.settings.tile_size, cfg.sample_selection
    chosen = selected_samples(ws, engine, which)
    if not chosen:
        where = "the workspace" if which == "all" else f"round {which}"
        raise PathloopError(f"{where} has no samples to fine-tune on; generate some first (`pathloop generate`)")
    for s in chosen:
        if s.class_name not in classes:
            raise PathloopError(f"sample {s.sample_id} has class {s.class_name!r}; the workspace classes are {classes}")
        if (s.width, s.height) != (size, size):
            raise PathloopError(f"sample {s.sample_id} is {s.width}x{s.height} px; the workspace tile_size is {size}")
    if cfg.weighting == "none":  # no feedback at all: nothing to read or score
        return [WeightedSample(s.sample_id, s.path, s.class_name, "none", 0.0, 0, ()) for s in chosen]
    rated = {r.sample_id: r for r in rated_samples(ws, engine)}
    enough = {s.sample_id for s in chosen
              if s.sample_id in rated and rated[s.sample_id].ratings >= cfg.weighting_min_ratings}
    need = [s for s in chosen if s.sample_id not in enough]
    if need and reward_fn is not None:
        probs = dict(zip((s.sample_id for s in need), reward_probabilities(
            reward_fn, [s.path for s in need], [classes.index(s.class_name) for s in need], size, progress=progress)))
    elif need:
        probs = scores_of(engine, reward_id) if reward_id is not None else {}
        missing = [s.sample_id for s in need if s.sample_id not in probs]
        if missing:
            by = f"no score from reward version {reward_id}" if reward_id is not None else "no reward score"
            raise PathloopError(
                f"{len(missing)} of {len(chosen)} samples (first: sample {missing[0]}) have fewer than "
                f"{cfg.weighting_min_ratings} current plausible/implausible judgments and {by}; "
                f"score them (`pathloop score --samples {cfg.samples}`) or rate them")
    out = []
    for s in chosen:
        r = rated.get(s.sample_id)
        if s.sample_id in enough:
            out.append(WeightedSample(s.sample_id, s.path, s.class_name, "experts", r.target, r.ratings,
                                      r.judgment_ids))
        else:
            out.append(WeightedSample(s.sample_id, s.path, s.class_name, "reward", float(probs[s.sample_id]),
                                      r.ratings if r else 0, ()))
    return out


def _frozen_data(samples: list[WeightedSample], tile_ids: list[int]) -> dict:
    return {"samples": [{"id": s.sample_id, "class": s.class_name, "source": s.source,
                         "plausibility": s.plausibility, "ratings": s.ratings, "judgment_ids": list(s.judgment_ids)}
                        for s in samples],
            "train_tile_ids": tile_ids}


def _thaw_data(ws: Workspace, engine: Engine, run_dir: Path) -> tuple[list[WeightedSample], TileTable]:
    """The samples and train tiles a run started with, from its ``data.json``."""
    f = run_dir / DATA_FILE
    if not f.is_file():
        raise PathloopError(f"{run_dir} has no {DATA_FILE}; it is not a pathloop fine-tuning run")
    data = json.loads(f.read_text())
    paths = {s.sample_id: s.path for s in selected_samples(ws, engine, "all")}
    gone = [d["id"] for d in data["samples"] if d["id"] not in paths]
    if gone:
        raise PathloopError(f"sample {gone[0]}, which the run in {run_dir} trains on, is no longer in the workspace; "
                            "start a new --run-name")
    try:
        tiles = tile_table(ws, engine, "train", tile_ids=data["train_tile_ids"])
    except PathloopError as e:
        raise PathloopError(f"{e}; the run in {run_dir} trains on it: start a new --run-name") from None
    samples = [WeightedSample(d["id"], paths[d["id"]], d["class"], d["source"], d["plausibility"], d["ratings"],
                              tuple(d["judgment_ids"])) for d in data["samples"]]
    return samples, tiles


def weight_sources(samples: list[WeightedSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert_targets (N,), reward_probs (N,))``, NaN where the other source applies."""
    nan = float("nan")
    expert = torch.tensor([s.plausibility if s.source == "experts" else nan for s in samples], dtype=torch.float32)
    reward = torch.tensor([s.plausibility if s.source == "reward" else nan for s in samples], dtype=torch.float32)
    return expert, reward


def weighted_update(accelerator: Accelerator, unet, optimizer, lr_scheduler, inputs, weights: torch.Tensor,
                    beta: float, max_grad_norm: float) -> WeightedLoss:
    """One micro-batch: one forward pass over synthetic + real tiles, then the standard update.

    ``inputs``: ``denoising_batch``'s output for the concatenated batch (synthetic first);
    ``weights``: ``(B_s,)``. Returns the loss and its two terms.
    """
    noisy, t, cls, noise = inputs
    dev = accelerator.device
    _, terms = _update(accelerator, unet, optimizer, lr_scheduler, (noisy.to(dev), t.to(dev), cls.to(dev)),
                       lambda pred: reward_weighted_loss(pred, noise.to(dev), weights.to(dev), beta), max_grad_norm)
    return terms


def _update(accelerator: Accelerator, unet, optimizer, lr_scheduler, model_inputs, loss_of, max_grad_norm: float
            ) -> tuple[torch.Tensor, WeightedLoss]:
    """accumulate → forward → ``loss_of(pred)`` → backward → clip on sync → step; returns (pred, terms)."""
    noisy, t, cls = model_inputs
    with accelerator.accumulate(unet):
        pred = unet(noisy, t, class_labels=cls).sample
        terms = loss_of(pred)
        accelerator.backward(terms.total)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return pred, terms


def preference_groups(samples: list[WeightedSample], classes: list[str], threshold: float
                      ) -> dict[str, tuple[list[int], list[int]]]:
    """Per class with both kinds: (indices of plausible samples, of implausible ones) in ``samples``.

    Plausible: the experts' share (or the reward probability) at or above ``threshold``.
    """
    split: dict[str, tuple[list[int], list[int]]] = {c: ([], []) for c in classes}
    for i, s in enumerate(samples):
        split[s.class_name][0 if s.plausibility >= threshold else 1].append(i)
    out = {c: (win, lose) for c, (win, lose) in split.items() if win and lose}
    if not out:
        raise PathloopError("the preference objective needs a plausible and an implausible sample of one class; "
                            "(plausible, implausible) per class: "
                            + ", ".join(f"{c} {len(w)}/{len(lo)}" for c, (w, lo) in split.items()))
    return out


def preference_batch(win: torch.Tensor, lose: torch.Tensor, win_classes: torch.Tensor, real: torch.Tensor,
                     real_classes: torch.Tensor, *, scheduler: DDPMScheduler, g: torch.Generator, null_id: int,
                     class_dropout: float, augment: bool):
    """``denoising_batch`` for P pairs and B real tiles: each pair shares its noise, timestep and class.

    Returns ``(noisy (2P+B,3,H,W), timesteps, classes, noise)``: plausible tiles, their partners, real tiles.
    """
    x = augmented(torch.cat([win, lose, real]), g, augment)
    return preference_noised(x, win_classes, real_classes, scheduler=scheduler, g=g, null_id=null_id,
                             class_dropout=class_dropout)


def preference_noised(x_uint8: torch.Tensor, win_classes: torch.Tensor, real_classes: torch.Tensor, *,
                      scheduler: DDPMScheduler, g: torch.Generator, null_id: int, class_dropout: float):
    """``preference_batch`` after augmentation: ``x_uint8`` is ``(2P+B, 3, H, W)``, pairs first."""
    pairs, n_real = win_classes.shape[0], real_classes.shape[0]
    x = to_model_range(x_uint8)
    shape = x.shape[1:]
    pair_noise, real_noise = torch.randn((pairs, *shape), generator=g), torch.randn((n_real, *shape), generator=g)
    steps = scheduler.config.num_train_timesteps
    pair_t, real_t = torch.randint(0, steps, (pairs,), generator=g), torch.randint(0, steps, (n_real,), generator=g)
    drop = torch.rand(pairs + n_real, generator=g) < class_dropout
    pair_cls = torch.where(drop[:pairs], torch.full_like(win_classes, null_id), win_classes)
    real_cls = torch.where(drop[pairs:], torch.full_like(real_classes, null_id), real_classes)
    noise = torch.cat([pair_noise, pair_noise, real_noise])
    t = torch.cat([pair_t, pair_t, real_t])
    return scheduler.add_noise(x, noise, t), t, torch.cat([pair_cls, pair_cls, real_cls]), noise


def preference_update(accelerator: Accelerator, unet, reference, optimizer, lr_scheduler, inputs, pairs: int,
                      kappa: float, beta: float, max_grad_norm: float) -> tuple[WeightedLoss, torch.Tensor]:
    """One micro-batch of the preference objective; the frozen ``reference`` denoises the pairs without grad."""
    noisy, t, cls, noise = (v.to(accelerator.device) for v in inputs)
    with torch.no_grad():
        ref_pred = reference(noisy[:2 * pairs], t[:2 * pairs], class_labels=cls[:2 * pairs]).sample
    pred, terms = _update(accelerator, unet, optimizer, lr_scheduler, (noisy, t, cls),
                          lambda pred: preference_loss(pred, noise, ref_pred, pairs, kappa, beta), max_grad_norm)
    return terms, pair_accuracy(pred.detach(), noise, ref_pred, pairs)


def _distrusted_reward(engine: Engine, cfg: FinetuneConfig, reward_id: int | None) -> str | None:
    """Why the reward model may not select (its held-out ROC-AUC is below ``select_min_auc``), or None."""
    if not cfg.select_every or reward_id is None or cfg.select_min_auc <= 0:
        return None
    from store.rewards import get_reward

    auc = (get_reward(engine, reward_id).metrics or {}).get("roc_auc")
    if auc is not None and auc < cfg.select_min_auc:
        return f"reward version {reward_id}'s held-out ROC-AUC {auc:.3f} < min_auc {cfg.select_min_auc}"
    return None


def kto_update(accelerator: Accelerator, unet, reference, optimizer, lr_scheduler, inputs, desirable: torch.Tensor,
               kappa: float, beta: float, lambdas: tuple[float, float], max_grad_norm: float
               ) -> tuple[WeightedLoss, torch.Tensor]:
    """One micro-batch of the KTO objective; the frozen ``reference`` denoises the synthetic tiles without grad."""
    noisy, t, cls, noise = (v.to(accelerator.device) for v in inputs)
    n = desirable.shape[0]
    with torch.no_grad():
        ref_pred = reference(noisy[:n], t[:n], class_labels=cls[:n]).sample
    side = {}

    def loss_of(pred):
        terms, side["right"] = kto_loss(pred, noise, ref_pred, desirable, kappa, beta, *lambdas)
        return terms

    _, terms = _update(accelerator, unet, optimizer, lr_scheduler, (noisy, t, cls), loss_of, max_grad_norm)
    return terms, side["right"]


def _check_parent(ws: Workspace, parent, classes: list[str]) -> None:
    """Refuse a parent made for other class names, or one that does not predict the noise ε."""
    predicts = parent.scheduler_config.get("prediction_type", "epsilon")
    if predicts != "epsilon":
        raise PathloopError(f"generator version {parent.id} predicts {predicts!r}; the fine-tuning objective "
                            "needs an epsilon-prediction model")
    made_for = version_info(ws, parent.record).get("classes")
    if made_for is not None and list(made_for) != classes:
        raise PathloopError(f"generator version {parent.id} was trained for classes {list(made_for)} "
                            f"but the workspace has {classes}")


def finetune(ws: Workspace, engine: Engine, cfg: FinetuneConfig, reward_fn: RewardFn | None, *, parent_id: int,
             reward_id: int | None, round_number: int | None = None, resume: str | None = None,
             stop_after: int | None = None, progress: bool = True) -> GeneratorVersion | None:
    """Fine-tune generator version ``parent_id`` and register the child; ``None`` on non-main processes or when stopped.

    ``reward_fn`` weights samples with too few ratings (``None``: use the stored scores of
    ``reward_id``). ``resume``: ``"latest"``, ``"auto"`` (latest if there is one) or a
    checkpoint folder of this run; a resumed run trains on the samples, weights and tiles it
    started with. ``stop_after``: end after that many optimizer steps without exporting, as a
    crash after a checkpoint would.
    """
    tile_size, classes = ws.settings.tile_size, list(ws.settings.classes)
    check_reward_fits(reward_fn, reward_id, classes, tile_size)
    if cfg.select_every and reward_fn is None:
        raise PathloopError("select_every needs a reward model to score the candidates; give a reward version")
    run_dir = ws.runs_dir / cfg.run_name
    ckpt = resume_point(run_dir, resume)
    run_config = {**asdict(cfg), "classes": classes, "tile_size": tile_size, "parent_id": parent_id,
                  "reward_id": reward_id, "round_number": round_number}
    if ckpt is not None:
        check_resumable(run_dir, run_config, FinetuneConfig.RESUMABLE_CHANGES)
    parent = load_generator(ws, engine, parent_id, device="cpu")
    _check_parent(ws, parent, classes)
    if ckpt is not None:
        samples, tiles = _thaw_data(ws, engine, run_dir)
    else:
        # Every process weighs the samples itself (the same reads, the same scores): no collective
        # runs before training, so bad input fails on all processes alike instead of hanging one.
        tiles = tile_table(ws, engine, "train")
        first_process = int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
        samples = weighted_samples(ws, engine, cfg, reward_fn, reward_id, progress=progress and first_process)

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train_gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        log_with=cfg.log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    check_launch(accelerator)
    set_seed(cfg.seed)
    synthetic = TileSet.from_locations(ws.root, [s.path for s in samples], [classes.index(s.class_name) for s in samples],
                                       tile_size)
    real = TileSet(tiles.images, tiles.class_ids)
    expert, reward = weight_sources(samples)
    preference, kto = cfg.objective == "preference", cfg.objective == "kto"
    groups = preference_groups(samples, classes, cfg.weighting_threshold) if preference else {}
    # each tile's verdict and the weights of the rarer one (kto), fixed for the run
    plausible = (sample_weights(expert, reward, "binary", cfg.weighting_threshold).bool() if kto
                 else torch.zeros(len(samples), dtype=torch.bool))
    n_plausible = int(plausible.sum())
    kto_lambdas = kto_weights(n_plausible, len(plausible) - n_plausible)
    # the frozen parent the preference and kto objectives measure against; never trained or prepared
    reference = copy.deepcopy(parent.unet).eval().requires_grad_(False) if preference or kto else None
    unet = parent.unet.train()
    if cfg.lora_rank:  # adapters on the parent's frozen weights; only they train (finetune/lora.py)
        unet = lora.wrap(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets).train()
    noise_scheduler = DDPMScheduler.from_config(parent.scheduler_config)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=cfg.train_learning_rate,
                                  weight_decay=cfg.train_adam_weight_decay)
    schedule = "constant_with_warmup" if cfg.train_lr_schedule == "constant" else "cosine"
    lr_scheduler = get_scheduler(schedule, optimizer=optimizer,
                                 num_warmup_steps=cfg.train_lr_warmup_steps, num_training_steps=cfg.train_steps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4,
                   model_cls=UNet2DModel, model_config=parent.unet.config)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    selection = candidate = None
    distrusted = _distrusted_reward(engine, cfg, reward_id)  # the round-1 guard's first check
    if cfg.select_every and distrusted is None:
        selection = Selection(every=cfg.select_every, per_class=cfg.select_per_class, sampler=cfg.select_sampler,
                              steps=cfg.select_steps, patience=cfg.select_patience, seed=cfg.seed, classes=classes,
                              null_id=parent.null_id, scheduler_config=parent.scheduler_config, reward_fn=reward_fn,
                              min_gain=cfg.select_min_gain)
        accelerator.register_for_checkpointing(selection)  # after the EMA, always: the checkpoint's order
        candidate = copy.deepcopy(accelerator.unwrap_model(unet)).eval()  # no draw from the global RNG
    if reference is not None:
        reference.to(accelerator.device)

    procs, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.train_batch_size * procs
    synthetic_batches = StepBatches(len(synthetic), global_batch, cfg.seed)
    pairs = max(1, cfg.train_batch_size // 2)  # as many synthetic tiles per step as the weighted objective
    pair_batches = PairBatches(list(groups.values()), pairs * procs, cfg.seed) if preference else None
    real_batches = StepBatches(len(real), global_batch, cfg.seed + 1)  # its own stream of permutations
    first_step = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        first_step = checkpoint_step(ckpt)
    elif accelerator.is_main_process:
        write_json(run_dir / "config.json", run_config)
        write_json(run_dir / DATA_FILE, _frozen_data(samples, tiles.tile_ids.tolist()))
    if cfg.log_with:
        accelerator.init_trackers("pathloop-finetune", config={k: v for k, v in asdict(cfg).items() if v is not None})

    bar = tqdm(total=cfg.train_steps, initial=first_step, desc="finetune", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    fourth = "pair_accuracy" if preference else "kto_accuracy" if kto else "mean_weight"
    last = {"loss": float("nan"), "loss_synthetic": float("nan"), "loss_real": float("nan"), fourth: float("nan")}
    started = time.time()
    end = cfg.train_steps if stop_after is None else min(cfg.train_steps, stop_after)

    def check(done: int) -> None:  # a candidate: the EMA weights the run would export after `done` steps
        ema.copy_to(candidate.parameters())
        entry = selection.check(done, candidate, lambda t: accelerator.reduce(t, "mean"))
        best = selection.best_entry
        accelerator.log({"selection_reward_p": entry["reward_p"]}, step=done)
        if progress and accelerator.is_local_main_process:
            bar.write(f"check at step {done}: reward p {entry['reward_p']:.3f} (best: step {best['step']}, "
                      f"{best['reward_p']:.3f})")

    stopped_early = None
    if selection is not None and not selection.history:
        check(0)  # the parent itself
    elif selection is not None and selection.should_stop() and first_step < cfg.train_steps:
        stopped_early, end = first_step, first_step  # resumed after the early stop, before the export
    accumulation = cfg.train_gradient_accumulation_steps

    def read_ahead(position: int) -> StepTiles:  # a pure function of the position: run in data workers
        step, micro = divmod(position, accumulation)
        ri = real_batches.indices(position, rank, procs)
        g = step_generator(cfg.seed, step, micro, rank)
        if preference:
            wi, li = pair_batches.indices(position, rank, procs)
            x = augmented(torch.cat([synthetic.batch(wi), synthetic.batch(li), real.batch(ri)]), g, cfg.train_augment)
            return StepTiles.of(x, torch.cat([synthetic.class_ids[wi], real.class_ids[ri]]), g, extra=len(wi))
        si = synthetic_batches.indices(position, rank, procs)
        x = augmented(torch.cat([synthetic.batch(si), real.batch(ri)]), g, cfg.train_augment)
        return StepTiles.of(x, torch.cat([synthetic.class_ids[si], real.class_ids[ri]]), g, extra=si)

    workers = data_workers(cfg.data_workers, accelerator.device)
    ready = step_loader(read_ahead, range(first_step * accumulation, end * accumulation), workers)
    for step in range(first_step, end):
        for _micro in range(accumulation):
            ahead = next(ready)
            images, class_ids = ahead.tensors()
            if preference:
                n_pairs = ahead.extra
                inputs = preference_noised(images, class_ids[:n_pairs], class_ids[n_pairs:], scheduler=noise_scheduler,
                                           g=ahead.generator(), null_id=parent.null_id,
                                           class_dropout=cfg.train_class_dropout)
                terms, extra = preference_update(accelerator, unet, reference, optimizer, lr_scheduler, inputs,
                                                 n_pairs, cfg.preference_beta, cfg.beta, cfg.train_max_grad_norm)
                continue
            inputs = noised_batch(images, class_ids, scheduler=noise_scheduler, g=ahead.generator(),
                                  null_id=parent.null_id, class_dropout=cfg.train_class_dropout)
            si = torch.as_tensor(ahead.extra)
            if kto:
                terms, extra = kto_update(accelerator, unet, reference, optimizer, lr_scheduler, inputs, plausible[si],
                                          cfg.preference_beta, cfg.beta, kto_lambdas, cfg.train_max_grad_norm)
                continue
            weights = sample_weights(expert[si], reward[si], cfg.weighting, cfg.weighting_threshold)
            terms = weighted_update(accelerator, unet, optimizer, lr_scheduler, inputs, weights, cfg.beta,
                                    cfg.train_max_grad_norm)
            extra = weights.mean()
        if not accelerator.sync_gradients:  # accumulate() syncs on the last micro-batch
            raise RuntimeError("gradient accumulation fell out of step with the loop")
        ema.step(unet.parameters())
        figures = torch.stack([terms.total, terms.synthetic, terms.real, extra.to(terms.total)]).detach()
        figures = accelerator.gather(figures).reshape(procs, 4).mean(0).tolist()
        last = dict(zip(last, figures))
        if not math.isfinite(last["loss"]):
            raise PathloopError(f"the loss became {last['loss']} at step {step + 1}; lower --lr or check the samples")
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", syn=f"{last['loss_synthetic']:.4f}",
                        real=f"{last['loss_real']:.4f}", **{fourth[:3]: f"{last[fourth]:.2f}"})
        accelerator.log({**last, "lr": lr_scheduler.get_last_lr()[0], "ema_decay": ema.cur_decay_value}, step=done)
        if selection is not None and selection.due(done, cfg.train_steps):
            check(done)
            if selection.should_stop() and done < cfg.train_steps:
                stopped_early = done
        if done % cfg.checkpoint_every == 0 or done == cfg.train_steps or stopped_early:
            save_checkpoint(accelerator, run_dir, done, cfg.checkpoints_keep)
        if stopped_early:
            break
    bar.close()
    if stopped_early is None and stop_after is not None and end < cfg.train_steps:
        accelerator.end_training()
        return None

    version = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(unet)
        final = copy.deepcopy(trained) if cfg.lora_rank else UNet2DModel.from_config(trained.config)
        if selection is not None and selection.separated():
            final.load_state_dict(selection.best)  # the best candidate's EMA weights (step 0: the parent's)
        else:  # no selection, or the fallback rule of the round-1 guard: the last step's EMA weights
            if not cfg.lora_rank:  # (a LoRA model's deep copy holds them already)
                final.load_state_dict(trained.state_dict())
            ema.copy_to(final.parameters())
        adapter = final if cfg.lora_rank else None
        if adapter is not None:
            final = lora.merged_copy(adapter)  # the version folder holds full weights, as every version does
        folder = incoming_folder(ws)
        try:
            info = _record(cfg, samples, tiles, expert, reward, parent_id=parent_id, reward_id=reward_id,
                           round_number=round_number, classes=classes, tile_size=tile_size, null_id=parent.null_id)
            if preference:
                info["preference_pairs"] = {c: {"plausible": len(w), "implausible": len(lo)}
                                            for c, (w, lo) in groups.items()}
            if kto:
                info["kto"] = {"plausible": n_plausible, "implausible": len(plausible) - n_plausible,
                               "lambda_plausible": kto_lambdas[0], "lambda_implausible": kto_lambdas[1]}
            info.update({f"final_{k}": v for k, v in last.items()})
            if selection is not None:
                info["selection"] = selection.record(last_step=cfg.train_steps) | {"stopped_early_at": stopped_early}
            elif cfg.select_every:
                info["selection"] = {"rule": f"fallback: {distrusted}; the last step's weights",
                                     "selected_step": cfg.train_steps, "history": [], "stopped_early_at": None}
            info.update(seconds=round(time.time() - started, 1), processes=procs, weights="ema",
                        run=str(run_dir.relative_to(ws.root)))
            if adapter is not None:
                info["lora"] = lora.save_adapter(adapter.float().cpu(), folder / lora.ADAPTER_FOLDER)
            export_pipeline(final.float().cpu(), noise_scheduler, folder, info)
            config = {k: v for k, v in info.items() if k != "train_tile_ids"}
            version = register_generator(ws, engine, folder, kind="finetuned", config=config, parent_id=parent_id,
                                         round_number=round_number)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group: nothing collective after this
    return version


def _record(cfg: FinetuneConfig, samples: list[WeightedSample], tiles: TileTable, expert: torch.Tensor,
            reward: torch.Tensor, **provenance) -> dict:
    """What the child version records: parent, reward, objective, and exactly which data went in.

    A sample's ``weight`` is ``sample_weights`` over the whole set; with ``normalized`` the
    loop divides by each batch's mean instead, so there it is the set-level equivalent.
    """
    weights = sample_weights(expert, reward, cfg.weighting, cfg.weighting_threshold).tolist()
    return {
        "kind": "finetuned", **provenance, "config": asdict(cfg),
        "objective": cfg.objective, "preference_beta": cfg.preference_beta,
        "beta": cfg.beta, "weighting": cfg.weighting, "weighting_threshold": cfg.weighting_threshold,
        "weighting_min_ratings": cfg.weighting_min_ratings, "sample_selection": cfg.samples,
        "samples": [{"id": s.sample_id, "class": s.class_name, "source": s.source, "plausibility": s.plausibility,
                     "weight": w} for s, w in zip(samples, weights)],
        "weight_sources": {src: sum(s.source == src for s in samples) for src in ("experts", "reward", "none")},
        "mean_weight": float(np.mean(weights)),
        "judgment_ids": sorted(j for s in samples for j in s.judgment_ids),
        "train_tiles": len(tiles), "train_tile_ids": tiles.tile_ids.tolist(),
    }
