"""Real tiles as tensors, and batches that are a pure function of the step.

Every batch and every random draw of a training step comes from ``step_generator(seed,
step, micro, process)``, not from a global RNG, so a run resumed from a checkpoint sees
exactly the data and noise an uninterrupted run would, on any number of processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from store.errors import PathloopError
from store.images import ImageColumns, ShardSlot


def to_model_range(rgb_uint8: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` or ``(B, 3, H, W)`` uint8 → float in [-1, 1], channels first."""
    x = rgb_uint8
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] → ``(B, H, W, 3)`` uint8 (rounded, clipped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class TileSet:
    """Tiles read from the store on demand: images ``ImageColumns`` and class ids ``(N,)``.

    Nothing is decoded until a batch asks for it, so a process holds a few dozen bytes a
    tile whatever the tile count (a tensor of 10^6 tiles of 256 px would be ~196 GB).
    """

    def __init__(self, images: ImageColumns, class_ids: Sequence[int] | np.ndarray):
        if not len(images):
            raise PathloopError("no tiles to train on")
        self.images = images
        self.class_ids = torch.as_tensor(np.asarray(class_ids, np.int64))
        if len(self.class_ids) != len(images):
            raise PathloopError(f"{len(images)} tiles but {len(self.class_ids)} class ids")

    @classmethod
    def from_locations(cls, root: Path, locations: Sequence[Path | ShardSlot], class_ids: Sequence[int], size: int
                       ) -> TileSet:
        """From PNG paths or shard slots (samples, small sets)."""
        return cls(ImageColumns.from_locations(root, locations, size), class_ids)

    def __len__(self) -> int:
        return len(self.class_ids)

    def batch(self, indices) -> torch.Tensor:
        """The tiles at ``indices`` as ``(B, 3, H, W)`` uint8."""
        return torch.from_numpy(self.images.batch(np.asarray(indices))).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class StepTiles:
    """One micro-batch's tiles as a data worker hands them over: read and augmented, still uint8.

    ``rng`` is the step's generator state after the augmentation drew from it, so the
    training process draws the noise exactly as if it had done everything itself; uint8
    tiles are a quarter of the float batch to pass between processes. ``extra`` carries what
    the loop needs beside them (sample indices, a pair count).
    """

    images: np.ndarray  # (B, 3, H, W) uint8
    class_ids: np.ndarray  # (B,) int64
    rng: np.ndarray  # torch.Generator state
    extra: object = None

    @classmethod
    def of(cls, images: torch.Tensor, class_ids, g: torch.Generator, extra: object = None) -> StepTiles:
        return cls(images.numpy(), np.asarray(class_ids, np.int64), g.get_state().numpy(), extra)

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.set_state(torch.from_numpy(self.rng.copy()))
        return g

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.images), torch.from_numpy(self.class_ids)


def _as_is(item):
    return item


class _Positions(torch.utils.data.Dataset):
    def __init__(self, make: Callable[[int], object], positions: range):
        self.make, self.positions = make, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        return self.make(self.positions[k])


PREFETCH = 2  # batches each worker makes ahead


def step_loader(make: Callable[[int], StepTiles], positions: range, workers: int) -> Iterator[StepTiles]:
    """``make(position)`` for each position in order, made ahead in ``workers`` processes (0: here).

    ``make`` is a pure function of the position (its data and noise come from
    ``step_generator``), so what a worker makes is what this process would have made, and a
    resumed run, which starts at a later position, sees the same batches as an uninterrupted one.

    Workers write the tiles into slots of one shared-memory buffer and send only the slot
    number: passing each batch through a pipe or a shared-memory segment of its own costs
    more than reading it. A yielded batch's ``images`` stay valid until the next batch after
    it is asked for (the loops turn them into model inputs at once).
    """
    if workers <= 0 or len(positions) <= 1:
        yield from (make(p) for p in positions)
        return
    first = make(positions[0])  # its shape sizes the buffer
    yield first
    rest = positions[1:]
    slots = PREFETCH * workers + 2  # a slot is rewritten only two batches after it was handed out
    buffer = torch.empty((slots, *first.images.shape), dtype=torch.uint8).share_memory_()

    def into_slot(k: int):  # in a worker
        tiles = make(rest[k])
        slot = buffer[k % slots].numpy()
        if tiles.images.shape != slot.shape:
            return tiles, -1  # another shape (not made by pathloop's loops): through the pipe
        slot[...] = tiles.images
        return replace(tiles, images=None), k % slots

    loader = torch.utils.data.DataLoader(
        _Positions(into_slot, range(len(rest))), batch_size=None, shuffle=False,
        num_workers=min(workers, len(rest)), prefetch_factor=PREFETCH, persistent_workers=False,
        collate_fn=_as_is,  # numpy metadata as it is, no conversion to tensors
        # fork: the workers inherit ``make``, its data and the buffer without pickling; CPU only.
        multiprocessing_context="fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None,
    )
    for tiles, slot in loader:
        yield tiles if slot < 0 else replace(tiles, images=buffer[slot].numpy())


def _mix(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def step_generator(seed: int, step: int, micro: int = 0, process: int = 0) -> torch.Generator:
    """The CPU generator for one micro-batch of one process at one optimizer step."""
    return torch.Generator().manual_seed(_mix(seed, step, micro, process))


class StepBatches:
    """The global batch of every (step, micro) as indices into a dataset of ``n`` items.

    The stream is a sequence of seeded permutations (epochs); a batch is the next
    ``global_batch`` positions of it, and each process takes its own interleaved share.
    """

    def __init__(self, n: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng(_mix(self.seed, "epoch", epoch)).permutation(self.n)
        return self._perms[epoch]

    def indices(self, position: int, process: int = 0, num_processes: int = 1) -> np.ndarray:
        """Indices for the ``position``-th global batch (position = step * accumulation + micro)."""
        start = position * self.global_batch
        pos = np.arange(start, start + self.global_batch)
        out = np.empty(len(pos), dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            sel = pos // self.n == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % self.n]
        return out[process::num_processes]


class PairBatches:
    """The preference pairs of every (step, micro): ``(plausible indices, implausible indices)``.

    ``groups`` holds, per class that has both kinds, the indices of its plausible and of its
    implausible tiles. Every pair is drawn uniformly from all (plausible, implausible) pairs of
    one class, so a class takes a share of the batch in proportion to its pairs
    (``plausible × implausible``): a class the experts still reject half of gets most of the
    steps, and a class with a handful of implausible tiles left is not pushed away from those
    few over and over (a uniform choice of class would give it half of every batch). Every
    choice is a pure function of (seed, position), and each process takes its own interleaved
    share of the global batch of pairs.
    """

    def __init__(self, groups: Sequence[tuple[Sequence[int], Sequence[int]]], global_pairs: int, seed: int):
        self.groups = [(np.asarray(w, dtype=np.int64), np.asarray(lo, dtype=np.int64)) for w, lo in groups]
        if not self.groups or any(len(w) == 0 or len(lo) == 0 for w, lo in self.groups):
            raise ValueError("every pair group needs at least one plausible and one implausible tile")
        self.global_pairs, self.seed = global_pairs, seed
        counts = np.array([len(w) * len(lo) for w, lo in self.groups], dtype=np.float64)
        self.class_share = counts / counts.sum()

    def indices(self, position: int, process: int = 0, num_processes: int = 1) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(_mix(self.seed, "pairs", position))
        group = rng.choice(len(self.groups), self.global_pairs, p=self.class_share)
        win = np.array([self.groups[k][0][rng.integers(0, len(self.groups[k][0]))] for k in group], dtype=np.int64)
        lose = np.array([self.groups[k][1][rng.integers(0, len(self.groups[k][1]))] for k in group], dtype=np.int64)
        return win[process::num_processes], lose[process::num_processes]


def dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image of ``(B, C, H, W)`` under one of the 8 flips/90° rotations (histology has no up)."""
    ks = torch.randint(0, 8, (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    for k in range(8):
        sel = ks == k
        if sel.any():
            y = torch.rot90(x[sel], k % 4, dims=(2, 3))
            out[sel] = y.flip(3) if k >= 4 else y
    return out
