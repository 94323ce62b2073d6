"""Content-addressed image files under the workspace's ``images/`` folder.

An image is identified by the sha256 of its pixels (mode, size and raw RGB bytes), not of
its PNG bytes, so the same pixels are stored once whatever encoder wrote them. Files live
at ``images/ab/cd/<sha256>.png`` and are written to a temporary file then ``os.replace``d,
so a crash never leaves half a file under a real name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from store.errors import PathloopError


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


@dataclass(frozen=True)
class EncodedImage:
    """An RGB image ready to store: pixel hash, size and PNG bytes."""

    sha256: str
    width: int
    height: int
    png: bytes


def pixel_sha256(rgb: np.ndarray) -> str:
    """sha256 of an ``(H, W, 3)`` uint8 array, including its shape."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise PathloopError(f"image array has shape {rgb.shape} and dtype {rgb.dtype}; expected (H, W, 3) uint8")
    h = hashlib.sha256()
    h.update(f"RGB {rgb.shape[1]}x{rgb.shape[0]}\n".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def encode(rgb: np.ndarray, compress_level: int = 1) -> EncodedImage:
    """Hash and PNG-encode an ``(H, W, 3)`` uint8 array (cheap enough to run in workers)."""
    sha = pixel_sha256(rgb)
    buf = io.BytesIO()
    # Level 1: tiles are small and written often; higher levels cost 3-5x the time for ~10% size.
    PILImage.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return EncodedImage(sha, rgb.shape[1], rgb.shape[0], buf.getvalue())


def relative_path(sha256: str) -> str:
    """Where an image with this pixel hash lives, relative to the workspace."""
    return f"images/{sha256[:2]}/{sha256[2:4]}/{sha256}.png"


class ImageStore:
    """The ``images/`` folder of one workspace."""

    def __init__(self, workspace_root: Path | str):
        self.root = Path(workspace_root)

    def path(self, sha256: str) -> Path:
        return self.root / relative_path(sha256)

    def put(self, image: EncodedImage) -> tuple[str, bool]:
        """Write the image unless it is there already; return (relative path, newly written)."""
        rel = relative_path(image.sha256)
        target = self.root / rel
        if target.exists():
            return rel, False
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(image.png)
            os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; images are shared with the lab's app
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return rel, True

    def put_array(self, rgb: np.ndarray) -> tuple[EncodedImage, str, bool]:
        enc = encode(rgb)
        rel, new = self.put(enc)
        return enc, rel, new

    def load(self, sha256: str) -> np.ndarray:
        """The stored image as an ``(H, W, 3)`` uint8 array."""
        p = self.path(sha256)
        if not p.exists():
            raise PathloopError(f"image {sha256} is missing from {self.root / 'images'}")
        with PILImage.open(p) as im:
            return np.asarray(im.convert("RGB"))

    def remove(self, rel_paths) -> None:
        """Delete files this process wrote, when the transaction that would reference them failed."""
        for rel in rel_paths:
            (self.root / rel).unlink(missing_ok=True)


def register_images(s, sizes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Image row ids for these pixel hashes (hash → (width, height)), inserting missing ones.

    The files must already be in the store; call inside the transaction that uses the ids.
    ``s`` is a ``sqlmodel.Session``; SQL is imported here only, so tile-reading worker
    processes that import this module stay light.
    """
    from sqlmodel import select

    from store.models import Image

    shas = list(sizes)
    ids: dict[str, int] = {}
    for i in range(0, len(shas), 500):
        chunk = shas[i : i + 500]
        ids.update(dict(s.exec(select(Image.sha256, Image.id).where(Image.sha256.in_(chunk))).all()))
    new = [
        Image(sha256=sha, width=sizes[sha][0], height=sizes[sha][1], path=relative_path(sha))
        for sha in shas
        if sha not in ids
    ]
    s.add_all(new)
    s.flush()
    ids.update({im.sha256: im.id for im in new})
    return ids


def load_rgb(path: Path, size: int) -> np.ndarray:
    """An ``(size, size, 3)`` uint8 tile; a clear error for a missing or wrong-size file."""
    if not Path(path).is_file():
        raise PathloopError(f"tile image {path} is missing from the workspace")
    with PILImage.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    if rgb.shape[:2] != (size, size):
        raise PathloopError(f"tile image {path} is {rgb.shape[1]}x{rgb.shape[0]}; expected {size}x{size}")
    return rgb
