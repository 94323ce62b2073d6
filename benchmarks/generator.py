"""Generator throughput against stock diffusers, same model, batch and device, in one run.

(a) Training: images/s of pathloop's pretraining step (``denoising_batch`` with its
    seeded flips/rotations and class dropout, then ``denoising_update``, then the EMA
    step) against a plain step written the way diffusers' ``train_unconditional.py`` writes
    it (``randn_like`` noise, ``add_noise``, MSE, ``accelerator.backward``, clip, step, EMA).
    Target: >= 0.95x.
(b) Generation: images/s of ``generate_into_store`` (sampling, PNG encoding, content-
    addressed files and ``Sample`` rows) against a stock ``DDIMPipeline`` call with the
    same steps and batch. ``DDIMPipeline`` cannot pass class labels, so its UNet is the
    same architecture without the class embedding (an ``nn.Embedding`` lookup; the rest
    of the compute is identical). Target: >= 1.0x.

Each measurement is repeated (--runs, default 5) alternating ours and the peer; the
ratio of medians is printed. Run: ``python benchmarks/generator.py [--preset tiny]``.
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
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from finetune.config import PretrainConfig
from finetune.pretrain import denoising_batch, denoising_update, make_noise_scheduler
from finetune.registry import load_generator
from finetune.sample import SampleSettings, generate_into_store
from finetune.unet import build_unet, null_class
from store.db import make_engine, upgrade
from store.generators import incoming_folder, register_generator
from store.workspace import Settings, Workspace


def make_training(preset: str, size: int, batch: int, seed: int):
    torch.manual_seed(seed)
    accelerator = Accelerator(mixed_precision="no")
    unet = build_unet(preset, size, 2)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = get_scheduler("constant", optimizer=opt)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, power=3 / 4)
    unet, opt, sched = accelerator.prepare(unet, opt, sched)
    ema.to(accelerator.device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    classes = torch.randint(0, 2, (batch,))
    return accelerator, unet, opt, sched, ema, images, classes


def ours_train(n_steps, preset, size, batch) -> float:
    accelerator, unet, opt, sched, ema, images, classes = make_training(preset, size, batch, 0)
    cfg = PretrainConfig(preset=preset)
    noise_scheduler = make_noise_scheduler(cfg)
    null_id = null_class(accelerator.unwrap_model(unet))
    start = time.perf_counter()
    for step in range(n_steps):
        g = torch.Generator().manual_seed(step)
        inputs = denoising_batch(images, classes, scheduler=noise_scheduler, g=g, null_id=null_id,
                                 class_dropout=0.1, augment=True)
        denoising_update(accelerator, unet, opt, sched, inputs, 1.0)
        ema.step(unet.parameters())
    return n_steps * batch / (time.perf_counter() - start)


def plain_train(n_steps, preset, size, batch) -> float:
    """The loop body of diffusers' examples/unconditional_image_generation/train_unconditional.py."""
    accelerator, model, optimizer, lr_scheduler, ema_model, images, classes = make_training(preset, size, batch, 0)
    noise_scheduler = make_noise_scheduler(PretrainConfig(preset=preset))
    start = time.perf_counter()
    for _ in range(n_steps):
        clean_images = images.to(accelerator.device).float() / 127.5 - 1
        noise = torch.randn_like(clean_images)
        bsz = clean_images.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=clean_images.device)
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(model):
            model_output = model(noisy_images, timesteps, class_labels=classes.to(accelerator.device)).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema_model.step(model.parameters())
    return n_steps * batch / (time.perf_counter() - start)


def make_generation_workspace(tmp: Path, preset: str, size: int):
    ws = Workspace.create(tmp / "ws", Settings(classes=["a", "b"], tile_size=size))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    torch.manual_seed(0)
    unet = build_unet(preset, size, 2)
    folder = incoming_folder(ws)
    from finetune.pretrain import export_pipeline

    export_pipeline(unet, make_noise_scheduler(PretrainConfig(preset=preset)), folder, {"benchmark": True})
    version = register_generator(ws, engine, folder, kind="imported", config={})
    return ws, engine, version


def ours_generate(ws, engine, gen, batch, steps, run) -> float:
    per_class = batch // 2
    settings = SampleSettings(sampler="ddim", steps=steps, guidance=1.0, batch_size=batch)
    start = time.perf_counter()
    r = generate_into_store(ws, engine, gen, per_class=per_class, settings=settings, seed=1000 + run)
    assert r.generated == 2 * per_class
    return r.generated / (time.perf_counter() - start)


def stock_generate(pipe, batch, steps, run, out: Path) -> float:
    """The stock call, and saving its PIL images as PNG files as a script would."""
    start = time.perf_counter()
    images = pipe(batch_size=batch, num_inference_steps=steps, eta=0.0,
                  generator=torch.Generator().manual_seed(run), output_type="pil").images
    for i, im in enumerate(images):
        im.save(out / f"{run}-{i}.png", compress_level=1)
    return len(images) / (time.perf_counter() - start)


def stock_pipeline(preset: str, size: int) -> DDIMPipeline:
    torch.manual_seed(0)
    unet = build_unet(preset, size, 2)
    cfg = dict(unet.config)
    cfg["num_class_embeds"] = None
    plain = UNet2DModel.from_config(cfg)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding")}
    plain.load_state_dict(state)
    scheduler = DDIMScheduler.from_config(make_noise_scheduler(PretrainConfig(preset=preset)).config)
    pipe = DDIMPipeline(unet=plain, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def median_ratio(ours: list[float], peer: list[float]) -> tuple[float, float, float]:
    o, p = statistics.median(ours), statistics.median(peer)
    return o, p, o / p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    print(f"preset {a.preset}, {a.size} px, batch {a.batch}, device "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads, {a.runs} runs")

    ours_train(2, a.preset, a.size, a.batch)  # warm-up both paths once
    plain_train(2, a.preset, a.size, a.batch)
    o, p = [], []
    for run in range(a.runs):  # alternate which goes first, so drift favours neither
        pair = [(o, ours_train), (p, plain_train)]
        for out, fn in pair if run % 2 == 0 else pair[::-1]:
            out.append(fn(a.train_steps, a.preset, a.size, a.batch))
    mo, mp, r = median_ratio(o, p)
    print(f"(a) training  pathloop {mo:7.1f} img/s   diffusers loop {mp:7.1f} img/s   ratio {r:.3f}  (target >= 0.95)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ws, engine, version = make_generation_workspace(tmp, a.preset, a.size)
        gen = load_generator(ws, engine, version.id)
        pipe = stock_pipeline(a.preset, a.size).to(gen.unet.device)
        (tmp / "stock").mkdir()
        ours_generate(ws, engine, gen, a.batch, 2, -1)
        stock_generate(pipe, a.batch, 2, -1, tmp / "stock")
        o, p = [], []
        for run in range(a.runs):
            pair = [(o, lambda run=run: ours_generate(ws, engine, gen, a.batch, a.sample_steps, run)),
                    (p, lambda run=run: stock_generate(pipe, a.batch, a.sample_steps, run, tmp / "stock"))]
            for out, fn in pair if run % 2 == 0 else pair[::-1]:
                out.append(fn())
        mo, mp, r = median_ratio(o, p)
        print(f"(b) generate  pathloop {mo:7.1f} img/s   DDIMPipeline   {mp:7.1f} img/s   ratio {r:.3f}  (target >= 1.0)")
        engine.dispose()


if __name__ == "__main__":
    main()
