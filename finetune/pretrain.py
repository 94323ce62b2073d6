"""DDPM pretraining of a class-conditional UNet on the workspace's train tiles.

The loop is diffusers' ``train_unconditional.py`` in shape: ``accumulate`` → ``backward``
→ clip when gradients sync → ``step``; EMA weights; ``save_state`` checkpoints kept apart
from the exported model (``save_pretrained``). ``accelerate launch -m pathloop.cli
pretrain …`` runs it on several processes; only the main process writes to the store.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from sqlalchemy.engine import Engine
from tqdm.auto import tqdm

from finetune.config import PretrainConfig, data_workers
from finetune.data import (
    StepBatches,
    StepTiles,
    TileSet,
    dihedral,
    step_generator,
    step_loader,
    to_model_range,
)
from finetune.runs import (
    check_launch,
    check_resumable,
    checkpoint_step,
    resolve_mixed_precision,
    resume_point,
    save_checkpoint,
    write_json,
)
from finetune.unet import build_unet, check_size, null_class
from store.errors import PathloopError
from store.generators import incoming_folder, register_generator, tile_table
from store.models import GeneratorVersion
from store.workspace import Workspace

CONFIG_FILE = "pathloop.json"


def make_noise_scheduler(cfg: PretrainConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.noise_timesteps, beta_schedule=cfg.noise_beta_schedule,
                         prediction_type="epsilon")


def denoising_batch(images_uint8: torch.Tensor, class_ids: torch.Tensor, *, scheduler: DDPMScheduler,
                    g: torch.Generator, null_id: int, class_dropout: float, augment: bool):
    """Noisy inputs for one micro-batch, all randomness from ``g`` (on the CPU, so any device agrees).

    Returns ``(noisy (B,3,H,W), timesteps (B,), classes (B,), noise (B,3,H,W))``. The same as
    ``noised_batch(augmented(images, g, augment), ...)``, the two halves a data worker and the
    training process split between them.
    """
    return noised_batch(augmented(images_uint8, g, augment), class_ids, scheduler=scheduler, g=g, null_id=null_id,
                        class_dropout=class_dropout)


def augmented(images_uint8: torch.Tensor, g: torch.Generator, augment: bool) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 under seeded flips/rotations (the first draws from ``g``); pixels are only moved."""
    return dihedral(images_uint8, g) if augment else images_uint8


def noised_batch(images_uint8: torch.Tensor, class_ids: torch.Tensor, *, scheduler: DDPMScheduler,
                 g: torch.Generator, null_id: int, class_dropout: float):
    """The rest of ``denoising_batch`` after augmentation: noise, timesteps and class dropout from ``g``."""
    x = to_model_range(images_uint8)
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), generator=g)
    drop = torch.rand(x.shape[0], generator=g) < class_dropout
    classes = torch.where(drop, torch.full_like(class_ids, null_id), class_ids)
    return scheduler.add_noise(x, noise, t), t, classes, noise


def denoising_update(accelerator: Accelerator, unet, optimizer, lr_scheduler, inputs, max_grad_norm: float
                     ) -> torch.Tensor:
    """One micro-batch of the standard accelerate loop: accumulate → backward → clip on sync → step.

    ``inputs`` is ``denoising_batch``'s output (on the CPU). Returns the micro-batch loss.
    """
    noisy, t, cls, noise = inputs
    dev = accelerator.device
    with accelerator.accumulate(unet):
        pred = unet(noisy.to(dev), t.to(dev), class_labels=cls.to(dev)).sample
        loss = F.mse_loss(pred.float(), noise.to(dev).float())
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return loss


def export_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, folder: Path, info: dict) -> None:
    """Write a diffusers ``DDPMPipeline`` folder (``unet/``, ``scheduler/``) plus ``pathloop.json``."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2, default=str))


def pretrain(ws: Workspace, engine: Engine, cfg: PretrainConfig, *, resume: str | None = None,
             stop_after: int | None = None, progress: bool = True) -> GeneratorVersion | None:
    """Train and register a generator version; ``None`` on non-main processes or when stopped early.

    ``resume``: ``"latest"``, ``"auto"`` (latest if there is one) or a checkpoint folder of this run. ``stop_after``: end after that
    many optimizer steps without exporting, as a crash after a checkpoint would (for tests).
    """
    tile_size, classes = ws.settings.tile_size, ws.settings.classes
    check_size(cfg.preset, tile_size)
    run_dir = ws.runs_dir / cfg.run_name
    ckpt = resume_point(run_dir, resume)
    tiles = tile_table(ws, engine, "train")

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train_gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        log_with=cfg.log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    check_launch(accelerator)
    set_seed(cfg.seed)
    data = TileSet(tiles.images, tiles.class_ids)
    unet = build_unet(cfg.preset, tile_size, len(classes))
    null_id = null_class(unet)
    noise_scheduler = make_noise_scheduler(cfg)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train_learning_rate,
                                  weight_decay=cfg.train_adam_weight_decay)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=cfg.train_lr_warmup_steps,
                                 num_training_steps=cfg.train_steps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4,
                   model_cls=UNet2DModel, model_config=unet.config)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)

    procs, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.train_batch_size * procs
    batches = StepBatches(len(data), global_batch, cfg.seed)
    first_step = 0
    run_config = {**asdict(cfg), "classes": classes, "tile_size": tile_size}
    if ckpt is not None:
        check_resumable(run_dir, run_config, PretrainConfig.RESUMABLE_CHANGES)
        accelerator.load_state(str(ckpt))
        first_step = checkpoint_step(ckpt)
    elif accelerator.is_main_process:
        write_json(run_dir / "config.json", run_config)
    if cfg.log_with:
        accelerator.init_trackers("pathloop-pretrain", config={k: v for k, v in asdict(cfg).items() if v is not None})

    bar = tqdm(total=cfg.train_steps, initial=first_step, desc="pretrain", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    unet.train()
    last_loss = float("nan")
    started = time.time()
    end = cfg.train_steps if stop_after is None else min(cfg.train_steps, stop_after)
    accumulation = cfg.train_gradient_accumulation_steps

    def read_ahead(position: int) -> StepTiles:  # a pure function of the position: run in data workers
        step, micro = divmod(position, accumulation)
        idx = batches.indices(position, rank, procs)
        g = step_generator(cfg.seed, step, micro, rank)
        return StepTiles.of(augmented(data.batch(idx), g, cfg.train_augment), data.class_ids[idx], g)

    workers = data_workers(cfg.data_workers, accelerator.device)
    ready = step_loader(read_ahead, range(first_step * accumulation, end * accumulation), workers)
    for step in range(first_step, end):
        loss = None
        for _micro in range(accumulation):
            ahead = next(ready)
            inputs = noised_batch(*ahead.tensors(), scheduler=noise_scheduler, g=ahead.generator(),
                                  null_id=null_id, class_dropout=cfg.train_class_dropout)
            loss = denoising_update(accelerator, unet, optimizer, lr_scheduler, inputs, cfg.train_max_grad_norm)
        if not accelerator.sync_gradients:  # accumulate() syncs on the last micro-batch
            raise RuntimeError("gradient accumulation fell out of step with the loop")
        ema.step(unet.parameters())
        last_loss = accelerator.gather(loss.detach()).mean().item()
        if not math.isfinite(last_loss):
            raise PathloopError(f"the loss became {last_loss} at step {step + 1}; lower --lr or check the tiles")
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        accelerator.log({"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0], "ema_decay": ema.cur_decay_value},
                        step=done)
        if done % cfg.checkpoint_every == 0 or done == cfg.train_steps:
            save_checkpoint(accelerator, run_dir, done, cfg.checkpoints_keep)
    bar.close()
    if stop_after is not None and end < cfg.train_steps:
        accelerator.end_training()
        return None

    version = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = build_unet(cfg.preset, tile_size, len(classes))
        final.load_state_dict(accelerator.unwrap_model(unet).state_dict())
        ema.copy_to(final.parameters())
        folder = incoming_folder(ws)
        try:
            info = {
                "kind": "pretrained", "classes": classes, "tile_size": tile_size, "null_class": null_id,
                "config": asdict(cfg), "train_tiles": len(tiles), "train_tile_ids": tiles.tile_ids.tolist(),
                "final_loss": last_loss, "seconds": round(time.time() - started, 1), "processes": procs,
                "weights": "ema",
            }
            export_pipeline(final.cpu(), noise_scheduler, folder, info)
            config = {k: v for k, v in info.items() if k != "train_tile_ids"}
            config["run"] = str(run_dir.relative_to(ws.root))
            version = register_generator(ws, engine, folder, kind="pretrained", config=config)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group: nothing collective after this
    return version

