"""Generator versions and their samples in the store.

Version folders live in ``models/generators/<id>``, registered all or nothing
(``store/versions.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from store import versions
from store.errors import PathloopError
from store.images import EncodedImage, register_images
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
    """A real tile as model code sees it: where its PNG is and its class."""

    tile_id: int
    path: Path
    class_name: str


def training_tiles(ws: Workspace, engine: Engine, split: str = "train") -> list[TileRef]:
    """Every tile of ``split`` in a workspace class; a clear error when a class has none."""
    classes = ws.settings.classes
    if not classes:
        raise PathloopError(f"no classes in {ws.root / 'pathloop.toml'}; list them and ingest tiles first")
    with Session(engine) as s:
        rows = s.exec(select(Tile.id, Image.path, Tile.class_name).join(Image, Image.id == Tile.image_id)
                      .where(Tile.split == split, Tile.class_name.in_(classes)).order_by(Tile.id)).all()
    if not rows:
        raise PathloopError(f"the workspace has no {split} tiles; ingest slides first (`pathloop ingest`)")
    present = {r[2] for r in rows}
    missing = [c for c in classes if c not in present]
    if missing:
        raise PathloopError(
            f"class {missing[0]!r} has no {split} tiles; ingest tiles of it or remove it from pathloop.toml"
        )
    return [TileRef(tid, ws.root / path, cls) for tid, path, cls in rows]


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
