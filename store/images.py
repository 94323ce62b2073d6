"""Content-addressed images under the workspace's ``images/`` folder: PNG files and tile shards.

An image is identified by the sha256 of its pixels (mode, size and raw RGB bytes), not of
its encoded bytes, so the same pixels are stored once whatever encoder wrote them. Two
layouts, one identity:

- a PNG file at ``images/ab/cd/<sha256>.png`` (samples, folder imports, older tiles);
- a record in a shard, ``images/shards/<name>.tiles``: one append-only file per ingest of a
  slide, its tiles' encoded bytes back to back, each found by ``(shard, offset, length,
  codec)`` in its Image row. Codecs: ``jpeg`` (the slide's own JPEG tile, copied without
  re-encoding), ``jpeg-rgb`` (the same with RGB components), ``zstd`` (RGB bytes at zstd
  level 1: lossless and ~20x faster to write than PNG) and ``raw`` (RGB bytes as they are,
  where zstd would save less than a fifth: read straight into a batch, nothing to decode). A PNG of a shard image is made
  only where a PNG is needed (``ImageStore.png_path``), at its usual content address.

Every file is written to a temporary name then ``os.replace``d, so a crash never leaves half
a file under a real name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
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
    h.update(memoryview(np.ascontiguousarray(rgb)).cast("B"))  # no copy; hashlib drops the GIL
    return h.hexdigest()


def encode(rgb: np.ndarray, compress_level: int = 1) -> EncodedImage:
    """Hash and PNG-encode an ``(H, W, 3)`` uint8 array (cheap enough to run in workers)."""
    sha = pixel_sha256(rgb)
    buf = io.BytesIO()
    # Level 1: tiles are small and written often; higher levels cost 3-5x the time for ~10% size.
    PILImage.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return EncodedImage(sha, rgb.shape[1], rgb.shape[0], buf.getvalue())


SHARD_CODECS = ("jpeg", "jpeg-rgb", "zstd", "raw")


@dataclass(frozen=True)
class StoredTile:
    """An RGB tile encoded for a shard: pixel hash, size, codec and its bytes."""

    sha256: str
    width: int
    height: int
    codec: str
    data: bytes


ZSTD_WORTH = 0.8  # keep zstd only where it saves a fifth; else raw bytes, which are read without decoding


def encode_for_shard(rgb: np.ndarray) -> StoredTile:
    """Hash an ``(H, W, 3)`` uint8 array and store it losslessly: zstd level 1, or raw where zstd saves little."""
    rgb = np.ascontiguousarray(rgb)
    sha = pixel_sha256(rgb)
    packed = imagecodecs.zstd_encode(rgb, 1)
    if len(packed) <= ZSTD_WORTH * rgb.nbytes:
        return StoredTile(sha, rgb.shape[1], rgb.shape[0], "zstd", packed)
    return StoredTile(sha, rgb.shape[1], rgb.shape[0], "raw", rgb.tobytes())


def decode_shard_record(data: bytes, codec: str, width: int, height: int) -> np.ndarray:
    """The ``(height, width, 3)`` uint8 pixels of one shard record."""
    if codec in ("zstd", "raw"):
        rgb = np.frombuffer(imagecodecs.zstd_decode(data) if codec == "zstd" else data, np.uint8)
        if rgb.size != height * width * 3:
            raise PathloopError(f"a {codec} tile record holds {rgb.size} bytes; expected {height}x{width}x3")
        return rgb.reshape(height, width, 3)
    if codec == "jpeg":
        rgb = imagecodecs.jpeg8_decode(data)
    elif codec == "jpeg-rgb":
        rgb = imagecodecs.jpeg8_decode(data, colorspace="RGB", outcolorspace="RGB")
    else:
        raise PathloopError(f"tile codec {codec!r} is unknown; expected one of {', '.join(SHARD_CODECS)}")
    if rgb.shape != (height, width, 3):
        raise PathloopError(f"a {codec} tile record decodes to {rgb.shape}; expected ({height}, {width}, 3)")
    return rgb


@dataclass(frozen=True, slots=True)
class ShardSlot:
    """Where a shard image's bytes are: absolute shard file, byte range, codec and size."""

    shard: Path
    offset: int
    length: int
    codec: str
    width: int
    height: int
    png: Path  # where its PNG goes when one is needed (the usual content address)

    def __str__(self) -> str:
        return f"{self.shard}@{self.offset}"


def locate(root: Path, path: str, shard: str | None, offset: int | None, length: int | None, codec: str | None,
           width: int, height: int) -> Path | ShardSlot:
    """An Image row's pixels: its PNG file, or its slot in a shard (``location_columns()``' order)."""
    if shard is None:
        return root / path
    return ShardSlot(root / shard, int(offset), int(length), codec, int(width), int(height), root / path)


def location_columns():
    """The Image columns ``locate`` takes, in its order (after the workspace root)."""
    from store.models import Image

    return (Image.path, Image.shard, Image.offset, Image.length, Image.codec, Image.width, Image.height)


class _Handles:
    """Read-only file descriptors of shards, opened once per process (``os.pread`` needs no seek)."""

    def __init__(self):
        self.pid, self.fds = os.getpid(), {}

    def read(self, path: Path, offset: int, length: int) -> bytes:
        if self.pid != os.getpid():  # a forked worker: its own descriptors
            self.pid, self.fds = os.getpid(), {}
        fd = self.fds.get(path)
        if fd is None:
            try:
                fd = self.fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise PathloopError(f"tile shard {path} is missing from the workspace") from None
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise PathloopError(f"tile shard {path} ends before byte {offset + length}; it is truncated")
        return data

    def read_into(self, path: Path, offset: int, out: np.ndarray) -> None:
        """Fill the contiguous array ``out`` with the bytes at ``offset`` (no copy, no decode)."""
        if self.pid != os.getpid():
            self.pid, self.fds = os.getpid(), {}
        fd = self.fds.get(path)
        if fd is None:
            self.read(path, offset, 0)  # opens it, with read()'s error for a missing shard
            fd = self.fds[path]
        if os.preadv(fd, [memoryview(out).cast("B")], offset) != out.nbytes:
            raise PathloopError(f"tile shard {path} ends before byte {offset + out.nbytes}; it is truncated")


_handles = _Handles()


def read_slot(slot: ShardSlot) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 pixels at one shard slot."""
    return decode_shard_record(_handles.read(slot.shard, slot.offset, slot.length), slot.codec, slot.width,
                               slot.height)


class ShardWriter:
    """One new shard file: records appended in order, published by ``os.replace`` on ``publish``.

    Until published it lives under a temporary name, so a failed ingest leaves no shard that
    a row could name; ``discard`` removes it (and the published file, when the rows that
    would reference it were not committed).
    """

    def __init__(self, root: Path, stem: str):
        self.rel = f"images/shards/{stem}-{uuid.uuid4().hex[:12]}.tiles"
        self.target = Path(root) / self.rel
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.target.parent, prefix=".tmp-", suffix=".tiles")
        self.tmp, self.file, self.size, self.published = Path(tmp), os.fdopen(fd, "wb", buffering=1 << 20), 0, False

    def append(self, data: bytes) -> tuple[int, int]:
        """Write one record; returns its ``(offset, length)``."""
        offset = self.size
        self.file.write(data)
        self.size += len(data)
        return offset, len(data)

    def publish(self) -> str:
        """Flush, sync and move the shard to its real name; returns its workspace-relative path."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, _FILE_MODE)
        os.replace(self.tmp, self.target)
        self.published = True
        return self.rel

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)
        if self.published:
            self.target.unlink(missing_ok=True)


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

    def png_path(self, location: Path | ShardSlot) -> Path:
        """A PNG file of these pixels: the file itself, or one written now from a shard (then kept)."""
        if not isinstance(location, ShardSlot):
            return Path(location)
        if not location.png.exists():
            rgb = read_slot(location)
            enc = encode(rgb)
            self.put(enc)
            return self.path(enc.sha256)
        return location.png

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


def insert_shard_images(s, shard: str, images: dict[str, dict]) -> dict[str, int]:
    """Image row ids for one shard's images (hash → row fields), inserting the new ones in bulk.

    An image already stored (same pixels from another slide or an earlier ingest) keeps its
    row; its copy in this shard is simply never read. Call inside the slide's transaction.
    """
    from sqlalchemy import insert
    from sqlmodel import select

    from store.models import Image

    shas = list(images)
    ids: dict[str, int] = {}
    for i in range(0, len(shas), 500):
        chunk = shas[i : i + 500]
        ids.update(dict(s.exec(select(Image.sha256, Image.id).where(Image.sha256.in_(chunk))).all()))
    new = [images[sha] | {"shard": shard} for sha in shas if sha not in ids]
    if new:
        s.execute(insert(Image), new)
        for i in range(0, len(new), 500):
            chunk = [row["sha256"] for row in new[i : i + 500]]
            ids.update(dict(s.exec(select(Image.sha256, Image.id).where(Image.sha256.in_(chunk))).all()))
    return ids


def load_rgb(path: Path | ShardSlot, size: int) -> np.ndarray:
    """An ``(size, size, 3)`` uint8 tile from its PNG or shard slot; a clear error for a missing or wrong-size one."""
    if isinstance(path, ShardSlot):
        rgb = read_slot(path)
    elif not Path(path).is_file():
        raise PathloopError(f"tile image {path} is missing from the workspace")
    else:
        with PILImage.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    if rgb.shape[:2] != (size, size):
        raise PathloopError(f"tile image {path} is {rgb.shape[1]}x{rgb.shape[0]}; expected {size}x{size}")
    return rgb


class ImageColumns:
    """Random access to many stored images, held as numpy columns (a few dozen bytes an image).

    What training reads: a list of ``Path``/``ShardSlot`` objects costs ~0.5 kB an image in
    every process; these columns cost ~30 B, so memory does not grow with the tile count.
    Shard images are read by ``os.pread``; PNG ones (folder imports, older workspaces) by path.
    """

    def __init__(self, root: Path, rows: Sequence[tuple], size: int):
        """``rows``: ``(path, shard, offset, length, codec, width, height)`` per image (``location_columns``)."""
        self.root, self.size = Path(root), size
        n = len(rows)
        shards: dict[str | None, int] = {}
        codecs: dict[str | None, int] = {}
        self.shard_of = np.empty(n, np.int32)
        self.offset = np.zeros(n, np.int64)
        self.length = np.zeros(n, np.int32)
        self.codec_of = np.empty(n, np.int8)
        pngs: dict[int, str] = {}
        for i, (path, shard, offset, length, codec, width, height) in enumerate(rows):
            if (width, height) != (size, size):
                raise PathloopError(f"image {self.root / path} is {width}x{height}; expected {size}x{size}")
            self.shard_of[i] = shards.setdefault(shard, len(shards))
            self.codec_of[i] = codecs.setdefault(codec if shard is not None else None, len(codecs))
            if shard is None:
                pngs[i] = path  # only PNG-backed images keep a string
            else:
                self.offset[i], self.length[i] = offset, length
        self.shards = [None if k is None else self.root / k for k in shards]
        self.codecs = list(codecs)
        self.pngs = pngs

    @classmethod
    def from_locations(cls, root: Path, locations: Sequence[Path | ShardSlot], size: int) -> ImageColumns:
        """From PNG paths (absolute or under ``root``) and shard slots."""
        root = Path(root)
        rows = []
        for loc in locations:
            if isinstance(loc, ShardSlot):
                rows.append((str(loc.png.relative_to(root)) if loc.png.is_relative_to(root) else str(loc.png),
                             str(loc.shard), loc.offset, loc.length, loc.codec, loc.width, loc.height))
            else:
                rows.append((str(loc), None, None, None, "png", size, size))  # size checked on read
        return cls(root, rows, size)

    @classmethod
    def concatenate(cls, parts: Sequence[ImageColumns]) -> ImageColumns:
        """One set of columns from several (their shard and codec lists merged)."""
        out = cls.__new__(cls)
        if not parts:
            out.root, out.size, out.shards, out.codecs, out.pngs = Path("."), 0, [], [], {}
            out.shard_of, out.codec_of = np.zeros(0, np.int32), np.zeros(0, np.int8)
            out.offset, out.length = np.zeros(0, np.int64), np.zeros(0, np.int32)
            return out
        out.root, out.size = parts[0].root, parts[0].size
        shards: dict = {}
        codecs: dict = {}
        shard_of, codec_of, pngs, start = [], [], {}, 0
        for p in parts:
            shard_map = np.array([shards.setdefault(k, len(shards)) for k in p.shards], np.int32)
            codec_map = np.array([codecs.setdefault(k, len(codecs)) for k in p.codecs], np.int8)
            shard_of.append(shard_map[p.shard_of] if len(p) else p.shard_of)
            codec_of.append(codec_map[p.codec_of] if len(p) else p.codec_of)
            pngs.update({start + i: v for i, v in p.pngs.items()})
            start += len(p)
        out.shards, out.codecs, out.pngs = list(shards), list(codecs), pngs
        out.shard_of, out.codec_of = np.concatenate(shard_of), np.concatenate(codec_of)
        out.offset = np.concatenate([p.offset for p in parts])
        out.length = np.concatenate([p.length for p in parts])
        return out

    def take(self, positions) -> ImageColumns:
        """The images at ``positions``, in that order."""
        positions = np.asarray(positions, np.int64)
        out = ImageColumns.__new__(ImageColumns)
        out.root, out.size, out.shards, out.codecs = self.root, self.size, self.shards, self.codecs
        out.shard_of, out.codec_of = self.shard_of[positions], self.codec_of[positions]
        out.offset, out.length = self.offset[positions], self.length[positions]
        out.pngs = {k: self.pngs[int(p)] for k, p in enumerate(positions) if int(p) in self.pngs} if self.pngs else {}
        return out

    def __len__(self) -> int:
        return len(self.shard_of)

    def read(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Image ``i`` as ``(size, size, 3)`` uint8, into ``out`` when given (a raw record is read straight there)."""
        i = int(i)
        shard, codec = self.shards[self.shard_of[i]], self.codecs[self.codec_of[i]]
        if shard is None:
            rgb = load_rgb(self.root / self.pngs[i], self.size)
        elif codec == "raw" and out is not None:
            _handles.read_into(shard, int(self.offset[i]), out)
            return out
        else:
            data = _handles.read(shard, int(self.offset[i]), int(self.length[i]))
            rgb = decode_shard_record(data, codec, self.size, self.size)
        if out is None:
            return rgb
        out[...] = rgb
        return out

    def batch(self, indices) -> np.ndarray:
        """Images at ``indices`` as ``(B, size, size, 3)`` uint8."""
        out = np.empty((len(indices), self.size, self.size, 3), np.uint8)
        for k, i in enumerate(indices):
            self.read(i, out[k])
        return out
