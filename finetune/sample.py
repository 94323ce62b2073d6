"""Generation: seeded, batched sampling with DDIM or DDPM and classifier-free guidance.

Each image's starting noise (and, for DDPM, its per-step noise) comes from its own seed,
so an image depends on its seed only, not on the batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from sqlalchemy.engine import Engine

from finetune.data import to_uint8
from store.errors import PathloopError
from store.generators import add_samples, existing_seeds, sample_seed
from store.images import encode
from store.workspace import Workspace

SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class SampleSettings:
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 1.0
    batch_size: int = 64

    def check(self, num_train_timesteps: int) -> None:
        if self.sampler not in SAMPLERS:
            raise PathloopError(f"sampler {self.sampler!r}; expected one of: {', '.join(SAMPLERS)}")
        if not 1 <= self.steps <= num_train_timesteps:
            raise PathloopError(f"steps = {self.steps}; expected 1 to {num_train_timesteps} (the model's T)")
        if not 0 <= self.guidance <= 30:
            raise PathloopError(f"guidance = {self.guidance}; expected 0 (unconditional) to 30, 1 = no guidance")
        if not 1 <= self.batch_size <= 4096:
            raise PathloopError(f"batch size = {self.batch_size}; expected 1 to 4096")


def make_sampler(name: str, scheduler_config: dict):
    cls = DDIMScheduler if name == "ddim" else DDPMScheduler
    return cls.from_config(scheduler_config)


@torch.inference_mode()
def sample_images(unet: UNet2DModel, scheduler_config: dict, class_ids: list[int], seeds: list[int], *,
                  null_id: int, sampler: str = "ddim", steps: int = 50, guidance: float = 1.0) -> np.ndarray:
    """One batch: ``(B, H, W, 3)`` uint8 images of the given classes and seeds."""
    scheduler = make_sampler(sampler, scheduler_config)
    scheduler.set_timesteps(steps)
    device, dtype = unet.device, unet.dtype
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn((3, size, size), generator=g) for g in gens]).to(device)
    x = x * scheduler.init_noise_sigma
    cls = torch.tensor(class_ids, device=device, dtype=torch.long)
    guided = guidance != 1.0
    if guided:
        cls_in = torch.cat([cls, torch.full_like(cls, null_id)])
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        eps = unet(inp.to(dtype), t, class_labels=cls_in if guided else cls).sample.float()
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        if sampler == "ddpm":
            x = scheduler.step(eps, t, x, generator=gens).prev_sample
        else:
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return to_uint8(x)


@dataclass
class GenerateReport:
    generated: int = 0
    skipped: int = 0


def generate_into_store(ws: Workspace, engine: Engine, generator, *, per_class: int, settings: SampleSettings,
                        seed: int = 0, classes: Iterable[str] | None = None, round_number: int | None = None,
                        progress: Callable | None = None) -> GenerateReport:
    """Generate ``per_class`` samples of each class and register them, one commit per batch.

    ``generator`` is a ``LoadedGenerator``. Seeds are ``sample_seed(seed, class, i)``; samples
    already in the store with the same seed and recipe are skipped, so an interrupted call
    rerun with the same arguments finishes the job without duplicates.
    """
    if per_class < 1:
        raise PathloopError(f"--per-class {per_class}; expected at least 1")
    settings.check(generator.scheduler_config["num_train_timesteps"])
    wanted = list(classes) if classes is not None else list(generator.classes)
    for c in wanted:
        if c not in generator.classes:
            raise PathloopError(f"unknown class {c!r}; generator {generator.id} knows: {', '.join(generator.classes)}")
    todo: list[tuple[str, int]] = []
    report = GenerateReport()
    for c in wanted:
        have = existing_seeds(engine, generator.id, c, settings.sampler, settings.steps, settings.guidance)
        for i in range(per_class):
            s = sample_seed(seed, c, i)
            if s in have:
                report.skipped += 1
            else:
                todo.append((c, s))
    batches = [todo[i:i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)]
    bar = progress(len(todo)) if progress else None
    for batch in batches:
        images = sample_images(
            generator.unet, generator.scheduler_config, [generator.classes.index(c) for c, _ in batch],
            [s for _, s in batch], null_id=generator.null_id, sampler=settings.sampler, steps=settings.steps,
            guidance=settings.guidance)
        items = [(encode(img), c, s) for img, (c, s) in zip(images, batch)]
        report.generated += add_samples(ws, engine, generator.id, items, sampler=settings.sampler,
                                        steps=settings.steps, guidance=settings.guidance, round_number=round_number)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return report
