"""Class-conditional diffusers ``UNet2DModel`` presets, sized from the workspace.

The model has ``num_classes + 1`` class embeddings: ids ``0..num_classes-1`` are the
workspace classes in ``pathloop.toml`` order, and the last id is "no class", used for class
dropout in training and the unconditional half of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import UNet2DModel

from store.errors import PathloopError


@dataclass(frozen=True)
class Preset:
    """A UNet shape and the tile sizes it is meant for."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    norm_num_groups: int
    sizes: tuple[int, int]  # smallest and largest tile edge
    help: str


PRESETS: dict[str, Preset] = {
    # Trains in minutes on 2 CPU cores at 32 px: the demo and tests.
    "tiny": Preset(
        (32, 64, 64), ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), 1, 8, (16, 64),
        "tests and the CPU demo (16-64 px)",
    ),
    # One GPU at 64 px: about the size of the DDPM CIFAR-10 model.
    "small": Preset(
        (64, 128, 256, 256), ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), 2, 32, (32, 128),
        "one GPU (32-128 px)",
    ),
    # The paper's scale (128-256 px), as diffusers' train_unconditional.py builds it.
    "base": Preset(
        (128, 128, 256, 256, 512, 512),
        ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"), 2, 32, (128, 256),
        "the paper's scale, several GPUs (128-256 px)",
    ),
}


def check_size(preset_name: str, tile_size: int) -> Preset:
    """The preset, or a clear error for an unknown name or a tile size it cannot take."""
    if preset_name not in PRESETS:
        raise PathloopError(f"unknown generator preset {preset_name!r}; expected one of: {', '.join(PRESETS)}")
    p = PRESETS[preset_name]
    factor = 2 ** (len(p.block_out_channels) - 1)
    lo, hi = p.sizes
    if not lo <= tile_size <= hi or tile_size % factor:
        raise PathloopError(
            f"preset {preset_name!r} takes tiles of {lo}-{hi} px divisible by {factor}, not {tile_size}; "
            f"choose another preset ({', '.join(f'{k}: {v.help}' for k, v in PRESETS.items())})"
        )
    return p


def build_unet(preset_name: str, tile_size: int, num_classes: int) -> UNet2DModel:
    """A fresh class-conditional UNet: input and output ``(B, 3, tile_size, tile_size)``."""
    if num_classes < 1:
        raise PathloopError("the workspace lists no classes; add them to pathloop.toml")
    p = check_size(preset_name, tile_size)
    return UNet2DModel(
        sample_size=tile_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=p.block_out_channels,
        down_block_types=p.down_block_types,
        up_block_types=p.up_block_types,
        layers_per_block=p.layers_per_block,
        norm_num_groups=p.norm_num_groups,
        num_class_embeds=num_classes + 1,
    )


def null_class(unet: UNet2DModel) -> int:
    """The "no class" id of a model built here: the last class embedding."""
    return unet.config.num_class_embeds - 1


def check_fits(unet_config: dict, tile_size: int, num_classes: int, what: str) -> None:
    """Refuse a model whose size or class embedding does not fit the workspace."""
    size = unet_config.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    if size != tile_size:
        raise PathloopError(f"{what} makes {size} px tiles; the workspace tile_size is {tile_size}")
    n = unet_config.get("num_class_embeds")
    if n != num_classes + 1:
        raise PathloopError(
            f"{what} has {n} class embeddings; the workspace needs {num_classes + 1} "
            f"({num_classes} classes and one unconditional id)"
        )
    if unet_config.get("in_channels") != 3 or unet_config.get("out_channels") != 3:
        raise PathloopError(f"{what} is not an RGB model (in/out channels must be 3)")
