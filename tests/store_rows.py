"""Rows for queue, judgment and export tests, inserted directly (no images or diffusion needed)."""

from __future__ import annotations

import hashlib

from sqlmodel import Session

from store.models import Annotator, GeneratorVersion, Image, Sample, Slide, Tile

CLASSES = ("dab_negative", "dab_positive")


def _sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def add_samples(engine, n: int, *, generator_id: int | None = None, round_number: int | None = None,
                classes=CLASSES, tag: str = "s") -> list[int]:
    """``n`` samples (classes alternating) of a new generator version, or of ``generator_id``."""
    with Session(engine) as s:
        if generator_id is None:
            gv = GeneratorVersion(folder=f"models/generators/{tag}", round_number=round_number)
            s.add(gv)
            s.flush()
            generator_id = gv.id
        images = [Image(sha256=_sha(f"{tag}{generator_id}-{i}"), width=32, height=32,
                        path=f"images/{tag}{generator_id}-{i}.png") for i in range(n)]
        s.add_all(images)
        s.flush()
        samples = [Sample(image_id=im.id, generator_id=generator_id, class_name=classes[i % len(classes)], seed=i,
                          sampler="ddpm", steps=2, round_number=round_number) for i, im in enumerate(images)]
        s.add_all(samples)
        s.commit()
        return [x.id for x in samples]


def add_tiles(engine, n: int, *, split: str = "test", classes=CLASSES, tag: str = "t") -> list[int]:
    """``n`` real tiles of one slide in ``split`` (classes alternating)."""
    with Session(engine) as s:
        slide = Slide(path=f"/slides/{tag}.tiff", sha256=_sha(f"slide-{tag}"), width=1024, height=1024)
        s.add(slide)
        s.flush()
        images = [Image(sha256=_sha(f"tile-{tag}-{i}"), width=32, height=32, path=f"images/{tag}-{i}.png")
                  for i in range(n)]
        s.add_all(images)
        s.flush()
        tiles = [Tile(image_id=im.id, slide_id=slide.id, level=0, x=32 * i, y=64, extent=32,
                      class_name=classes[i % len(classes)], split=split) for i, im in enumerate(images)]
        s.add_all(tiles)
        s.commit()
        return [t.id for t in tiles]


def add_annotators(engine, *names: str, role: str = "annotator") -> list[int]:
    with Session(engine) as s:
        rows = [Annotator(username=n, role=role) for n in names]
        s.add_all(rows)
        s.commit()
        return [a.id for a in rows]
