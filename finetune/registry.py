"""Load a generator version by id, and import an existing diffusers model as one.

A version folder is a diffusers ``DDPMPipeline`` folder (``unet/``, ``scheduler/``,
``model_index.json``) plus ``pathloop.json``; stock ``UNet2DModel.from_pretrained(folder,
subfolder="unet")`` and ``DDPMPipeline.from_pretrained(folder)`` load it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from sqlalchemy.engine import Engine

from finetune.pretrain import CONFIG_FILE, export_pipeline
from finetune.unet import check_fits
from store.errors import PathloopError
from store.generators import get_generator, incoming_folder, register_generator
from store.models import GeneratorVersion
from store.workspace import Workspace


@dataclass
class LoadedGenerator:
    """A generator version ready to sample: model in eval mode on ``device``."""

    id: int
    record: GeneratorVersion
    unet: UNet2DModel
    scheduler_config: dict
    classes: list[str]
    null_id: int
    folder: Path


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_generator(ws: Workspace, engine: Engine, generator_id: int, device: torch.device | str | None = None
                   ) -> LoadedGenerator:
    """The generator version ``generator_id``, checked against the workspace's classes and size."""
    record = get_generator(engine, generator_id)
    folder = ws.root / record.folder
    if not (folder / "unet" / "config.json").is_file():
        raise PathloopError(f"generator version {generator_id}: its folder {folder} is missing or incomplete")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    check_fits(unet.config, ws.settings.tile_size, len(ws.settings.classes), f"generator version {generator_id}")
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    unet.to(device or default_device()).eval()
    return LoadedGenerator(generator_id, record, unet, dict(sched.config), list(ws.settings.classes),
                           unet.config.num_class_embeds - 1, folder)


def _find_unet(source: Path) -> tuple[Path, Path | None]:
    """``(unet folder, scheduler folder or None)`` of a UNet2DModel or DDPMPipeline folder."""
    if not source.is_dir():
        raise PathloopError(f"model folder {source} does not exist or is not a folder")
    if (source / "model_index.json").is_file():
        unet_dir = source / "unet"
        sched = source / "scheduler"
        if not (unet_dir / "config.json").is_file():
            raise PathloopError(f"{source} is a diffusers pipeline without a unet/ folder")
        return unet_dir, sched if (sched / "scheduler_config.json").is_file() else None
    cfg_file = source / "config.json"
    if cfg_file.is_file():
        try:
            cls = json.loads(cfg_file.read_text()).get("_class_name")
        except json.JSONDecodeError:
            cls = None
        if cls == "UNet2DModel":
            return source, None
    raise PathloopError(
        f"{source} is not a diffusers UNet2DModel or DDPMPipeline folder "
        "(expected config.json with _class_name UNet2DModel, or model_index.json with unet/)"
    )


def import_model(ws: Workspace, engine: Engine, source: Path, note: str = "") -> GeneratorVersion:
    """Register an existing local diffusers model as a generator version, after checking it fits."""
    source = Path(source).resolve()
    unet_dir, sched_dir = _find_unet(source)
    try:
        config = UNet2DModel.load_config(unet_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PathloopError(f"{unet_dir} has no readable UNet config: {e}") from None
    check_fits(config, ws.settings.tile_size, len(ws.settings.classes), f"model {source}")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise PathloopError(f"{unet_dir} has no loadable UNet weights: {str(e).splitlines()[0]}") from None
    scheduler = (DDPMScheduler.from_pretrained(sched_dir, local_files_only=True) if sched_dir
                 else DDPMScheduler(num_train_timesteps=unet.config.get("num_train_timesteps") or 1000))
    folder = incoming_folder(ws)
    try:
        info = {"kind": "imported", "source": str(source), "classes": list(ws.settings.classes),
                "tile_size": ws.settings.tile_size, "null_class": unet.config.num_class_embeds - 1,
                "scheduler_from": str(sched_dir) if sched_dir else "default DDPMScheduler", "note": note}
        export_pipeline(unet, scheduler, folder, info)
        return register_generator(ws, engine, folder, kind="imported", config=info)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def version_info(ws: Workspace, record: GeneratorVersion) -> dict:
    """The ``pathloop.json`` of a version folder (empty when missing)."""
    f = ws.root / record.folder / CONFIG_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
