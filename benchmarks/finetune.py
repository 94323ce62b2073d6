"""Cost of the reward-weighted objective: one fine-tuning step against its peers, same model and device.

(a) pathloop's fine-tuning step as ``finetune.train`` runs it (B synthetic + B real tiles
    gathered from memory, ``denoising_batch`` with seeded flips/rotations and class dropout,
    ``sample_weights``, ``weighted_update`` — one forward pass over the 2B tiles — the EMA step
    and the logged figures) against a plain step on 2B tiles written the way diffusers'
    ``train_unconditional.py`` writes it (``randn_like`` noise, ``add_noise``, MSE, backward,
    clip, step, EMA). The objective should cost nothing extra. Target: >= 0.95x.
(b) The same against a two-forward-pass version of the objective (the synthetic and the
    real halves through the UNet separately, one backward of the sum), which the single
    pass should beat. Ratio > 1 means the single pass is faster.
(c) LoRA (``--lora-rank``, finetune/lora.py) at ranks 4 and 8 against full fine-tuning: the
    same loop body; step-time ratio, trained parameters, and the size of what each exports
    (the adapter folder vs the full UNet's weights).

Contenders take short turns of a few steps, in an order that flips every turn, so drift
and bursts of load favour no side; ratios are of the median step times. Run: ``python benchmarks/finetune.py [--preset tiny --size 32 --batch 16]``.
"""

# ruff: noqa: E402  (the import path is fixed before anything imports the stdlib's queue)

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/queue.py shares its name with the standard library's ``queue``: keep this folder,
# which Python puts first on the path for a script, off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from finetune import lora
from finetune.config import FinetuneConfig, PretrainConfig
from finetune.data import StepBatches, step_generator
from finetune.losses import per_sample_error, sample_weights
from finetune.pretrain import denoising_batch, make_noise_scheduler
from finetune.train import weighted_update
from finetune.unet import build_unet, null_class

BETA = 0.3


class Setup:
    """A fresh model, optimizer and EMA (same seed for every contender), and tiles in memory."""

    def __init__(self, preset: str, size: int, batch: int, lora_rank: int = 0):
        torch.manual_seed(0)
        self.accelerator = Accelerator(mixed_precision="no")
        unet = build_unet(preset, size, 2)
        self.null_id = null_class(unet)
        if lora_rank:
            unet = lora.wrap(unet, lora_rank, 0, FinetuneConfig().lora_targets)
        opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5)
        sched = get_scheduler("constant", optimizer=opt)
        self.ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, power=3 / 4)
        self.unet, self.opt, self.sched = self.accelerator.prepare(unet, opt, sched)
        self.ema.to(self.accelerator.device)
        self.noise_scheduler = make_noise_scheduler(PretrainConfig(preset=preset))
        g = torch.Generator().manual_seed(1)
        n = 4 * batch
        self.synthetic = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.real = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.classes = torch.randint(0, 2, (n,), generator=g)
        nan = torch.full((n,), float("nan"))
        self.expert, self.reward = nan, torch.rand(n, generator=g)
        self.batches = StepBatches(n, batch, 0)
        self.batch = batch

    def inputs(self, step: int):
        """The loop's batch: B synthetic + B real tiles, noised in one call."""
        si = torch.from_numpy(self.batches.indices(step))
        ri = torch.from_numpy(self.batches.indices(step + 7))
        inputs = denoising_batch(torch.cat([self.synthetic[si], self.real[ri]]),
                                 torch.cat([self.classes[si], self.classes[ri]]), scheduler=self.noise_scheduler,
                                 g=step_generator(0, step), null_id=self.null_id, class_dropout=0.1, augment=True)
        return inputs, sample_weights(self.expert[si], self.reward[si], "reward")


def ours(s: Setup, steps: int) -> list[float]:
    """Seconds of each step of the fine-tuning loop body (``finetune.train``)."""
    out = []
    for step in range(steps):
        start = time.perf_counter()
        inputs, weights = s.inputs(step)
        terms = weighted_update(s.accelerator, s.unet, s.opt, s.sched, inputs, weights, BETA, 1.0)
        s.ema.step(s.unet.parameters())
        torch.stack([terms.total, terms.synthetic, terms.real, weights.mean()]).detach().tolist()
        out.append(time.perf_counter() - start)
    return out


def two_pass(s: Setup, steps: int) -> list[float]:
    """The same objective with the synthetic and real halves through the UNet separately."""
    acc, dev, b = s.accelerator, s.accelerator.device, s.batch
    out = []
    for step in range(steps):
        start = time.perf_counter()
        (noisy, t, cls, noise), weights = s.inputs(step)
        noisy, t, cls, noise = noisy.to(dev), t.to(dev), cls.to(dev), noise.to(dev)
        with acc.accumulate(s.unet):
            pred_s = s.unet(noisy[:b], t[:b], class_labels=cls[:b]).sample
            pred_r = s.unet(noisy[b:], t[b:], class_labels=cls[b:]).sample
            synthetic = (weights.to(dev) * per_sample_error(pred_s, noise[:b])).mean()
            real = per_sample_error(pred_r, noise[b:]).mean()
            loss = synthetic + BETA * real
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(s.unet.parameters(), 1.0)
            s.opt.step()
            s.sched.step()
            s.opt.zero_grad()
        s.ema.step(s.unet.parameters())
        torch.stack([loss, synthetic, real, weights.mean()]).detach().tolist()
        out.append(time.perf_counter() - start)
    return out


def plain(s: Setup, steps: int) -> list[float]:
    """The loop body of diffusers' train_unconditional.py on 2B tiles (class labels passed)."""
    acc, model, dev = s.accelerator, s.unet, s.accelerator.device
    images = torch.cat([s.synthetic[:s.batch], s.real[:s.batch]])
    classes = torch.cat([s.classes[:s.batch], s.classes[:s.batch]]).to(dev)
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        clean_images = images.to(dev).float() / 127.5 - 1
        noise = torch.randn_like(clean_images)
        timesteps = torch.randint(0, s.noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                  device=dev)
        noisy_images = s.noise_scheduler.add_noise(clean_images, noise, timesteps)
        with acc.accumulate(model):
            model_output = model(noisy_images, timesteps, class_labels=classes).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), 1.0)
            s.opt.step()
            s.sched.step()
            s.opt.zero_grad()
        if acc.sync_gradients:
            s.ema.step(model.parameters())
        loss.detach().item()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="B: synthetic tiles per step (as many real ones join)")
    ap.add_argument("--steps", type=int, default=3, help="steps per turn (short turns: load bursts hit all sides)")
    ap.add_argument("--runs", type=int, default=15, help="turns per contender")
    a = ap.parse_args()
    contenders = {"finetune": ours, "plain": plain, "two-pass": two_pass, "lora-r4": ours, "lora-r8": ours}
    setups = {name: Setup(a.preset, a.size, a.batch, lora_rank=int(name[6:]) if name.startswith("lora") else 0)
              for name in contenders}
    device = setups["finetune"].accelerator.device
    print(f"preset {a.preset}, {a.size} px, B = {a.batch} synthetic + {a.batch} real tiles per step, device {device}, "
          f"{torch.get_num_threads()} threads, {a.runs} alternating turns of {a.steps} steps each")
    for name, fn in contenders.items():  # warm-up: allocator, kernels, first EMA copies
        fn(setups[name], 2)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for run in range(a.runs):
        for name in order if run % 2 == 0 else order[::-1]:
            times[name] += contenders[name](setups[name], a.steps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        print(f"  {name:<9} median {1000 * med[name]:7.1f} ms/step   (quartiles {1000 * q[0]:.0f}-{1000 * q[2]:.0f} ms, "
              f"{len(ts)} steps)")
    print(f"(a) finetune step vs plain diffusers step on 2B tiles: ratio {med['plain'] / med['finetune']:.3f} "
          "(steps/s, target >= 0.95)")
    print(f"(b) finetune step vs two-forward-pass objective:      ratio {med['two-pass'] / med['finetune']:.3f} "
          "(steps/s, > 1: the single pass is faster)")
    full_params = lora.trained_parameters(setups["finetune"].unet)
    with tempfile.TemporaryDirectory() as tmp:
        setups["finetune"].accelerator.unwrap_model(setups["finetune"].unet).save_pretrained(f"{tmp}/full")
        full_bytes = sum(f.stat().st_size for f in Path(tmp, "full").iterdir())
        print(f"(c) full fine-tuning: {full_params:,} trained parameters, exports {full_bytes / 1e6:.2f} MB (unet/)")
        for name in ("lora-r4", "lora-r8"):
            info = lora.save_adapter(setups[name].accelerator.unwrap_model(setups[name].unet), Path(tmp, name))
            print(f"    {name}: step ratio {med['finetune'] / med[name]:.3f} (steps/s vs full), "
                  f"{info['trained_parameters']:,} trained parameters ({info['trained_parameters'] / full_params:.1%}), "
                  f"adapter {info['adapter_bytes'] / 1e3:.0f} kB ({info['adapter_bytes'] / full_bytes:.1%} of the UNet)")

if __name__ == "__main__":
    main()
