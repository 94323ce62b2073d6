"""LoRA fine-tuning (Hu et al. 2021) with ``peft``: low-rank adapters on the UNet's layers.

The UNet is wrapped with ``peft.get_peft_model`` (diffusers' ``UNet2DModel`` has no adapter
mixin of its own), so only the adapters' ``A``/``B`` matrices train; the base weights are
frozen and stay bit-identical. ``B`` starts at zero, so step 0 is the parent exactly.

A LoRA child is exported twice over, for two kinds of reader:

- the version folder is, as for every version, a full diffusers pipeline with the adapter
  merged into the weights (DESIGN.md: stock ``DDPMPipeline.from_pretrained`` loads every
  version; generate, evaluate, rounds and the app need nothing new);
- ``lora/`` inside it is the adapter in peft's layout (``adapter_config.json``,
  ``adapter_model.safetensors``): the small thing to ship. Stock peft puts it on the parent:
  ``PeftModel.from_pretrained(UNet2DModel.from_pretrained(parent, subfolder="unet"), child / "lora")``.

Targets: the attention projections (as diffusers' LoRA training scripts use) only exist at
the lowest resolution of the small presets, where they cannot change colour or texture, so
the resnet convolutions are targeted as well by default.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import UNet2DModel

from store.errors import PathloopError

ADAPTER_FOLDER = "lora"


def target_names(targets: str) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()]


def check_targets(unet: torch.nn.Module, targets: str) -> None:
    """Refuse a target that names no layer of the UNet (peft would fail later, less clearly)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for t in target_names(targets):
        if not any(n == t or n.endswith(f".{t}") for n in names):
            known = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise PathloopError(f"lora_targets: no linear or convolution layer of the UNet is named {t!r}; "
                                f"expected names such as {', '.join(known)}")


def wrap(unet: UNet2DModel, rank: int, alpha: float, targets: str):
    """``unet`` with LoRA adapters of ``rank`` (scale ``alpha / rank``) on ``targets``: a ``peft.PeftModel``
    whose forward is the UNet's (``model(x, t, class_labels=c).sample``); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    check_targets(unet, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_names(targets), lora_dropout=0.0,
                        init_lora_weights=True)
    return get_peft_model(unet, config)


def trained_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged_copy(peft_model) -> UNet2DModel:
    """A plain ``UNet2DModel`` with the adapters merged into its weights (``peft_model`` is left as it is)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def save_adapter(peft_model, folder: Path) -> dict:
    """Write the adapter in peft's layout to ``folder``; returns its size and shape for the version record."""
    peft_model.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)  # peft's model-card stub, nothing of ours
    config = peft_model.peft_config["default"]
    return {"rank": config.r, "alpha": config.lora_alpha, "targets": sorted(config.target_modules),
            "trained_parameters": trained_parameters(peft_model),
            "adapter_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
            "folder": ADAPTER_FOLDER}
