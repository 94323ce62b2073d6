"""The SQL store on SQLite and PostgreSQL: migrations, round-trips, constraints, images."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from store.db import check_schema, current_revision, head_revision, make_engine, upgrade, write_session
from store.errors import PathloopError
from store.images import ImageStore, encode, pixel_sha256
from store.models import (
    Annotator,
    GeneratorVersion,
    Image,
    Judgment,
    Sample,
    Slide,
    Tile,
    metadata,
)

from conftest import BACKENDS, database_url


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrations_from_empty_create_every_table(backend, request, tmp_path):
    engine = make_engine(database_url(backend, request, tmp_path, migrated=False))
    with pytest.raises(PathloopError, match="no pathloop schema; run `pathloop db upgrade`"):
        check_schema(engine)
    assert current_revision(engine) is None
    assert upgrade(engine) == head_revision()
    assert upgrade(engine) == head_revision()  # a second upgrade is a no-op
    check_schema(engine)
    tables = set(inspect(engine).get_table_names())
    assert set(metadata.tables) <= tables
    engine.dispose()


def test_newer_schema_is_refused(engine):
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    with pytest.raises(PathloopError, match=r"schema '9999_from_the_future', newer than this pathloop"):
        check_schema(engine)
    with pytest.raises(PathloopError, match="newer than this pathloop"):
        upgrade(engine)


def test_unreachable_database_is_one_clear_line():
    engine = make_engine("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    with pytest.raises(PathloopError) as e:
        check_schema(engine)
    msg = str(e.value)
    assert msg.startswith("cannot reach database postgresql+psycopg://nobody:***@127.0.0.1:1/none")
    assert "secret" not in msg and "\n" not in msg


def test_bad_database_urls():
    with pytest.raises(PathloopError, match="is not a URL"):
        make_engine("not a url")
    with pytest.raises(PathloopError, match="expected a sqlite or postgresql URL"):
        make_engine("mysql://root@localhost/db")


def _image(s: Session, sha: str) -> Image:
    im = Image(sha256=sha, width=32, height=32, path=f"images/{sha}.png")
    s.add(im)
    s.flush()
    return im


def test_round_trip_of_the_loop_tables(engine):
    with Session(engine) as s:
        slide = Slide(path="/slides/a.tiff", sha256="s" * 64, vendor="generic-tiff", width=512, height=512)
        s.add(slide)
        s.flush()
        tile = Tile(image_id=_image(s, "a" * 64).id, slide_id=slide.id, level=0, x=16, y=32, extent=32,
                    tissue=0.9, class_name="dab_positive", split="train")
        gen = GeneratorVersion(folder="models/generators/1", config={"preset": "tiny", "lr": 1e-4})
        s.add_all([tile, gen])
        s.flush()
        sample = Sample(image_id=_image(s, "b" * 64).id, generator_id=gen.id, class_name="dab_negative",
                        seed=2**40 + 7, sampler="ddim", steps=5, guidance=1.5, round_number=0)
        ann = Annotator(username="dr.ada", role="admin", password_hash="scrypt$...")
        s.add_all([sample, ann])
        s.flush()
        first = Judgment(sample_id=sample.id, annotator_id=ann.id, verdict="implausible",
                         reasons=["nuclear shape", "staining"], comment="odd nuclei", seconds=4.2,
                         request_id="r1")
        s.add(first)
        s.flush()
        s.add(Judgment(sample_id=sample.id, annotator_id=ann.id, verdict="plausible", request_id="r2",
                       supersedes_id=first.id))
        s.commit()
    with Session(engine) as s:
        got = s.exec(select(Sample)).one()
        assert (got.seed, got.sampler, got.steps, got.guidance) == (2**40 + 7, "ddim", 5, 1.5)
        assert s.get(GeneratorVersion, got.generator_id).config == {"preset": "tiny", "lr": 1e-4}
        js = s.exec(select(Judgment).order_by(Judgment.id)).all()
        assert js[0].reasons == ["nuclear shape", "staining"] and js[1].supersedes_id == js[0].id
        t = s.exec(select(Tile)).one()
        assert (t.x, t.y, t.extent, t.class_name, t.split) == (16, 32, 32, "dab_positive", "train")
        assert t.created_at is not None


def test_a_double_submit_stores_one_judgment(engine):
    with Session(engine) as s:
        gen = GeneratorVersion(folder="g")
        ann = Annotator(username="a")
        s.add_all([gen, ann])
        s.flush()
        sample = Sample(image_id=_image(s, "c" * 64).id, generator_id=gen.id, class_name="x", seed=1,
                        sampler="ddim", steps=2)
        s.add(sample)
        s.commit()
        ids = (sample.id, ann.id)
    with Session(engine) as s:
        s.add(Judgment(sample_id=ids[0], annotator_id=ids[1], verdict="plausible", request_id="same"))
        s.commit()
    with pytest.raises(IntegrityError), Session(engine) as s:
        s.add(Judgment(sample_id=ids[0], annotator_id=ids[1], verdict="plausible", request_id="same"))
        s.commit()


def test_a_judgment_names_exactly_one_item(engine):
    with Session(engine) as s:
        ann = Annotator(username="b")
        s.add(ann)
        s.commit()
        ann_id = ann.id
    with pytest.raises(IntegrityError), Session(engine) as s:
        s.add(Judgment(annotator_id=ann_id, verdict="plausible", request_id="x"))
        s.commit()


def test_tile_grid_position_is_unique_per_slide(engine):
    with Session(engine) as s:
        slide = Slide(path="p", sha256="d" * 64, width=1, height=1)
        s.add(slide)
        s.flush()
        im = _image(s, "e" * 64)
        s.add(Tile(image_id=im.id, slide_id=slide.id, level=0, x=0, y=0, extent=32, class_name="a", split="train"))
        s.commit()
        sid, iid = slide.id, im.id
    with pytest.raises(IntegrityError), Session(engine) as s:
        s.add(Tile(image_id=iid, slide_id=sid, level=0, x=0, y=0, extent=32, class_name="a", split="val"))
        s.commit()


def test_write_session_takes_sqlite_write_lock_at_begin(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    upgrade(engine)
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with write_session(engine) as s:
        s.add(Annotator(username="w"))
        # A second writer cannot begin while the first holds the lock.
        other = make_engine(f"sqlite:///{tmp_path / 'w.db'}?timeout=0")
        import sqlite3

        raw = sqlite3.connect(tmp_path / "w.db", timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            raw.execute("BEGIN IMMEDIATE")
        raw.close()
        other.dispose()
        s.commit()
    engine.dispose()


def test_content_addressing_stores_same_pixels_once(tmp_path):
    store = ImageStore(tmp_path)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    enc, rel, new = store.put_array(rgb)
    assert new and rel == f"images/{enc.sha256[:2]}/{enc.sha256[2:4]}/{enc.sha256}.png"
    # Same pixels, different PNG bytes (another compression level): same address, not rewritten.
    again = encode(rgb.copy(), compress_level=9)
    assert again.png != enc.png and again.sha256 == enc.sha256
    assert store.put(again) == (rel, False)
    assert np.array_equal(store.load(enc.sha256), rgb)
    other = rgb.copy()
    other[0, 0, 0] ^= 1
    assert pixel_sha256(other) != enc.sha256
    # Same bytes, another shape: another image.
    assert pixel_sha256(rgb.reshape(16, 64, 3)) != enc.sha256
    assert not list(tmp_path.rglob(".tmp-*"))


def test_image_store_errors(tmp_path):
    store = ImageStore(tmp_path)
    with pytest.raises(PathloopError, match="expected \\(H, W, 3\\) uint8"):
        encode(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(PathloopError, match="is missing from"):
        store.load("0" * 64)
