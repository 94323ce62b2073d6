"""The run folder shared by pretraining and fine-tuning: launch checks, checkpoints, resume.

A run lives in ``runs/<run_name>``: ``config.json`` (what the run was started with),
``checkpoints/checkpoint-<step>`` (``accelerator.save_state``, each written into a
temporary folder and renamed when complete) and ``logs/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from store.errors import PathloopError


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` → bf16 (or fp16) on a GPU, ``no`` elsewhere; other choices as given."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a multi-process launch that accelerate did not set up (each process would act alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes != world:
        raise PathloopError(
            f"launched as {world} processes but accelerate sees {accelerator.num_processes}; on CPUs launch with "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ..."
        )


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    ckpts = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))


def resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, or ``None`` for a fresh run.

    ``resume``: ``None`` (fresh; refused when the run already has checkpoints), ``"latest"``,
    ``"auto"`` (latest when there is one, else fresh) or a checkpoint folder.
    """
    ckpts = checkpoints(run_dir)
    if resume == "auto":
        resume = "latest" if ckpts else None
    if resume is None:
        if ckpts:
            raise PathloopError(
                f"run folder {run_dir} already has checkpoints; pass --resume latest or a new --run-name")
        return None
    ckpt = (ckpts[-1] if ckpts else None) if resume == "latest" else Path(resume)
    if ckpt is None or not ckpt.is_dir():
        raise PathloopError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}")
    return ckpt


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[-1])


def check_resumable(run_dir: Path, now: dict, may_change: tuple[str, ...]) -> None:
    """Refuse to resume a run whose ``config.json`` differs from ``now`` outside ``may_change``."""
    saved_file = run_dir / "config.json"
    if not saved_file.is_file():
        raise PathloopError(f"{run_dir} has no config.json; it is not a pathloop training run")
    saved = json.loads(saved_file.read_text())
    for key, value in now.items():
        if key in may_change:
            continue
        if saved.get(key) != value:
            raise PathloopError(
                f"checkpoint in {run_dir} was made with {key} = {saved.get(key)!r}, not {value!r}; "
                "resume with the same settings or start a new --run-name"
            )


def write_json(path: Path, content: dict) -> None:
    """Write ``content`` as JSON through a temporary file, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2, default=str))
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int) -> None:
    """``save_state`` into a temporary folder renamed when complete, then prune old ones."""
    ckdir = run_dir / "checkpoints"
    target = ckdir / f"checkpoint-{step}"
    tmp = ckdir / f".partial-{step}"
    if accelerator.is_main_process:
        ckdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
