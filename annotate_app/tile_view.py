"""How a tile reaches the page: its pixels as a fresh PNG (no file name), enlarged crisply."""

from __future__ import annotations

from PIL import Image as PILImage


def load_tile(path) -> PILImage.Image:
    """The tile's pixels (handed to the browser as a fresh PNG: no file name reaches the page)."""
    with PILImage.open(path) as im:
        return im.convert("RGB")


def upscaled(im: PILImage.Image, edge: int) -> PILImage.Image:
    """The tile enlarged to about ``edge`` pixels by whole-number nearest-neighbour steps (crisp)."""
    factor = max(1, edge // max(im.size))
    return im.resize((im.width * factor, im.height * factor), PILImage.NEAREST) if factor > 1 else im
