"""Generator versions and their samples in the store.

Version folders live in ``models/generators/<id>``, registered all or nothing
(``store/versions.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from store import versions
from store.errors import PathloopError
from store.images import EncodedImage, ImageColumns, ShardSlot, locate, location_columns, register_images
from store.models import GeneratorVersion, Image, Sample, Tile
from store.workspace import Workspace


def generators_dir(ws: Workspace) -> Path:
    return ws.models_dir / "generators"


def incoming_folder(ws: Workspace) -> Path:
    """A fresh folder to export a model into before it is registered."""
    return versions.incoming_folder(generators_dir(ws))


def register_generator(ws: Workspace, engine: Engine, folder: Path, *, kind: str, config: dict,
                       parent_id: int | None = None, round_number: int | None = None) -> GeneratorVersion:
    """Move an exported folder to ``models/generators/<id>`` and record it, all or nothing."""
    with Session(engine, expire_on_commit=False) as s:
        gv = GeneratorVersion(folder="", kind=kind, config=config, parent_id=parent_id, round_number=round_number)
        versions.commit_with_folder(ws, s, gv, folder, generators_dir(ws))
        return gv


def get_generator(engine: Engine, generator_id: int) -> GeneratorVersion:
    with Session(engine) as s:
        gv = s.get(GeneratorVersion, generator_id)
        if gv is None:
            known = s.exec(select(GeneratorVersion.id).order_by(GeneratorVersion.id)).all()
            raise PathloopError(
                f"generator version {generator_id} does not exist; known: {', '.join(map(str, known)) or 'none'}"
            )
        return gv


def list_generators(engine: Engine) -> list[GeneratorVersion]:
    with Session(engine) as s:
        return list(s.exec(select(GeneratorVersion).order_by(GeneratorVersion.id)).all())


@dataclass(frozen=True)
class TileRef:
    """A real tile as model code sees it: where its pixels are (PNG or shard slot) and its class."""

    tile_id: int
    path: Path | ShardSlot
    class_name: str


def _check_split_classes(ws: Workspace, split: str, present: set[str], n: int) -> None:
    if not n:
        raise PathloopError(f"the workspace has no {split} tiles; ingest slides first (`pathloop ingest`)")
    missing = [c for c in ws.settings.classes if c not in present]
    if missing:
        raise PathloopError(
            f"class {missing[0]!r} has no {split} tiles; ingest tiles of it or remove it from pathloop.toml"
        )


def _split_query(ws: Workspace, split: str):
    if not ws.settings.classes:
        raise PathloopError(f"no classes in {ws.root / 'pathloop.toml'}; list them and ingest tiles first")
    return (select(Tile.id, Tile.class_name, *location_columns()).join(Image, Image.id == Tile.image_id)
            .where(Tile.split == split, Tile.class_name.in_(ws.settings.classes)).order_by(Tile.id))


def training_tiles(ws: Workspace, engine: Engine, split: str = "train") -> list[TileRef]:
    """Every tile of ``split`` in a workspace class; a clear error when a class has none.

    One object per tile: for the held-out splits and small sets. Training reads
    ``tile_table``, whose memory does not grow with the tile count.
    """
    with Session(engine) as s:
        rows = s.exec(_split_query(ws, split)).all()
    _check_split_classes(ws, split, {r[1] for r in rows}, len(rows))
    return [TileRef(tid, locate(ws.root, *loc), cls) for tid, cls, *loc in rows]


@dataclass(frozen=True)
class TileTable:
    """The tiles of one split as columns: ids ``(N,)`` int64, class ids ``(N,)`` int64, and their images."""

    tile_ids: np.ndarray
    class_ids: np.ndarray
    images: ImageColumns

    def __len__(self) -> int:
        return len(self.tile_ids)


TABLE_CHUNK = 20_000


def tile_table(ws: Workspace, engine: Engine, split: str = "train", tile_ids: Sequence[int] | None = None
               ) -> TileTable:
    """Every tile of ``split`` (or exactly ``tile_ids``, in that order) as a ``TileTable``.

    Rows are streamed from the database in chunks, so not even the query result is held as
    Python objects; a tile id that is gone is a clear error.
    """
    classes = list(ws.settings.classes)
    index = {c: i for i, c in enumerate(classes)}
    ids, cls, locations = [], [], []
    with Session(engine) as s:
        result = s.exec(_split_query(ws, split).execution_options(yield_per=TABLE_CHUNK))
        for chunk in result.partitions(TABLE_CHUNK):
            ids.append(np.fromiter((r[0] for r in chunk), np.int64, len(chunk)))
            cls.append(np.fromiter((index[r[1]] for r in chunk), np.int64, len(chunk)))
            locations.append(ImageColumns(ws.root, [tuple(r[2:]) for r in chunk], ws.settings.tile_size))
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    all_cls = np.concatenate(cls) if cls else np.zeros(0, np.int64)
    _check_split_classes(ws, split, {classes[i] for i in np.unique(all_cls)}, len(all_ids))
    images = ImageColumns.concatenate(locations)
    if tile_ids is not None:
        want = np.asarray(tile_ids, np.int64)
        pos = np.searchsorted(all_ids, want)  # ids come ordered by id
        found = (pos < len(all_ids)) & (all_ids[np.minimum(pos, len(all_ids) - 1)] == want)
        if not found.all():
            raise PathloopError(f"{split} tile {int(want[~found][0])} is no longer in the workspace")
        all_ids, all_cls, images = all_ids[pos], all_cls[pos], images.take(pos)
    return TileTable(all_ids, all_cls, images)


def sample_seed(base_seed: int, class_name: str, index: int) -> int:
    """The seed of the ``index``-th sample of a class in a generate call (stable, 63-bit)."""
    digest = hashlib.sha256(f"{base_seed}:{class_name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def existing_seeds(engine: Engine, generator_id: int, class_name: str, sampler: str, steps: int,
                   guidance: float) -> set[int]:
    with Session(engine) as s:
        return set(s.exec(select(Sample.seed).where(
            Sample.generator_id == generator_id, Sample.class_name == class_name, Sample.sampler == sampler,
            Sample.steps == steps, Sample.guidance == guidance)).all())


def add_samples(ws: Workspace, engine: Engine, generator_id: int, items: Iterable[tuple[EncodedImage, str, int]], *,
                sampler: str, steps: int, guidance: float, round_number: int | None = None) -> int:
    """Store images and register them as samples in one transaction; returns how many were new."""
    items = list(items)
    written: list[str] = []
    try:
        for enc, _, _ in items:
            rel, new = ws.images.put(enc)
            if new:
                written.append(rel)
        with Session(engine) as s:
            ids = register_images(s, {enc.sha256: (enc.width, enc.height) for enc, _, _ in items})
            for enc, class_name, seed in items:
                s.add(Sample(image_id=ids[enc.sha256], generator_id=generator_id, class_name=class_name, seed=seed,
                             sampler=sampler, steps=steps, guidance=guidance, round_number=round_number))
            s.commit()
    except BaseException:
        ws.images.remove(written)
        raise
    return len(items)
