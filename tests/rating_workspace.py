"""A small workspace for the annotation-app tests: two accounts and a few samples to rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlmodel import Session, select

from store import accounts
from store.db import make_engine, upgrade
from store.models import GeneratorVersion, Image, Judgment, Sample, Tile
from store.workspace import Settings, Workspace

CLASSES = ["dab_negative", "dab_positive"]
PASSWORDS = {"alice": "alice-pass-1234", "boss": "boss-pass-1234", "carol": "carol-pass-1234"}


def build_workspace(root: Path, n_samples: int = 3, **settings):
    """A SQLite workspace with annotators alice and carol, admin boss, and ``n_samples`` samples."""
    settings.setdefault("classes", CLASSES)
    settings.setdefault("tile_size", 32)
    settings.setdefault("control_share", 0.0)
    ws = Workspace.create(root, Settings(**settings))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    add_samples(ws, engine, n_samples)
    accounts.add_user(engine, "alice", password=PASSWORDS["alice"])
    accounts.add_user(engine, "carol", password=PASSWORDS["carol"])
    accounts.add_user(engine, "boss", role="admin", password=PASSWORDS["boss"])
    return ws, engine


def add_samples(ws: Workspace, engine, n: int) -> list[int]:
    """Insert ``n`` distinct 32-px samples of one imported generator; return their ids."""
    rng = np.random.default_rng(n)
    with Session(engine, expire_on_commit=False) as s:
        gv = GeneratorVersion(folder="models/generators/1", kind="imported", round_number=1)
        s.add(gv)
        s.flush()
        samples = []
        for i in range(n):
            enc, rel, _ = ws.images.put_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            image = Image(sha256=enc.sha256, width=enc.width, height=enc.height, path=rel)
            s.add(image)
            s.flush()
            sample = Sample(image_id=image.id, generator_id=gv.id, class_name=CLASSES[i % 2], seed=i,
                            sampler="ddpm", steps=2, round_number=1)
            s.add(sample)
            samples.append(sample)
        s.commit()
        return [x.id for x in samples]


def add_controls(ws: Workspace, engine, n: int) -> list[int]:
    """Insert ``n`` real test-split tiles (folder imports) that the queue mixes in as blind controls."""
    rng = np.random.default_rng(1000 + n)
    with Session(engine, expire_on_commit=False) as s:
        tiles = []
        for i in range(n):
            enc, rel, _ = ws.images.put_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            image = Image(sha256=enc.sha256, width=enc.width, height=enc.height, path=rel)
            s.add(image)
            s.flush()
            tile = Tile(image_id=image.id, class_name=CLASSES[i % 2], split="test")
            s.add(tile)
            tiles.append(tile)
        s.commit()
        return [t.id for t in tiles]


def judgments(engine) -> list[Judgment]:
    with Session(engine) as s:
        return list(s.exec(select(Judgment).order_by(Judgment.id)).all())
