"""Ingest into the store: the demo slide, splits, idempotence, folder import, bad input."""

from __future__ import annotations

import json
import subprocess
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage
from sqlalchemy import func
from sqlmodel import Session, select

from pathloop.demo import write_demo_slide, write_large_pyramid
from store import ingest as ingest_module
from store.errors import PathloopError
from store.images import ImageStore, ShardWriter, load_rgb, locate
from store.ingest import import_tiles, ingest_slides
from store.models import Image, Slide, Tile


@pytest.fixture(scope="session")
def demo_slide(tmp_path_factory):
    return write_demo_slide(tmp_path_factory.mktemp("demo") / "ihc.tiff")


def counts(engine):
    with Session(engine) as s:
        return tuple(s.exec(select(func.count()).select_from(m)).one() for m in (Slide, Image, Tile))


def image_files(ws):
    return sorted(p for p in (ws.root / "images").rglob("*") if p.is_file())


def test_demo_slide_ingest(workspace, engine, demo_slide):
    tiff, geojson = demo_slide
    [r] = ingest_slides(workspace, engine, [tiff], regions=geojson, stride=16, workers=2)
    assert r.tiles_added > 300 and set(r.per_class) == {"dab_negative", "dab_positive"}
    assert min(r.per_class.values()) > 100
    with Session(engine) as s:
        slide = s.exec(select(Slide)).one()
        assert (slide.width, slide.height, slide.split) == (512, 512, None)
        tiles = s.exec(select(Tile)).all()
        images = {im.id: im for im in s.exec(select(Image)).all()}
    assert len(tiles) == r.tiles_added
    assert {t.split for t in tiles} == {"train", "val", "test"}
    for t in tiles:
        assert 0 <= t.x and t.x + t.extent <= 512 and 0 <= t.y and t.y + t.extent <= 512
        assert t.x % 16 == 0 and t.y % 16 == 0 and t.extent == 32 and t.tissue >= 0.5
        im = images[t.image_id]
        assert (im.width, im.height) == (32, 32) and im.codec in ("zstd", "raw") and (workspace.root / im.shard).is_file()
        assert not (workspace.root / im.path).exists()  # a PNG only where one is needed
    # One shard for the slide, and no stray temporary file beside it.
    assert len({im.shard for im in images.values()}) == 1
    assert [p.name for p in (workspace.root / "images" / "shards").iterdir() if p.name.startswith(".")] == []
    # The stored pixels are the slide's pixels at those coordinates, and its PNG is made on demand.
    src = tifffile.imread(tiff, key=0)
    t = tiles[len(tiles) // 2]
    im = images[t.image_id]
    slot = locate(workspace.root, im.path, im.shard, im.offset, im.length, im.codec, im.width, im.height)
    assert np.array_equal(load_rgb(slot, 32), src[t.y:t.y + 32, t.x:t.x + 32])
    png = workspace.images.png_path(slot)
    assert png == workspace.root / im.path and np.array_equal(ImageStore(workspace.root).load(im.sha256),
                                                               src[t.y:t.y + 32, t.x:t.x + 32])
    # Overlapping tiles never sit in two splits.
    by_split = {}
    for t in tiles:
        by_split.setdefault(t.split, []).append(t)
    for a_split, a_tiles in by_split.items():
        for b_split, b_tiles in by_split.items():
            if a_split < b_split:
                for a in a_tiles:
                    for b in b_tiles:
                        assert abs(a.x - b.x) >= 32 or abs(a.y - b.y) >= 32
    # Re-ingesting adds nothing, not even image files.
    before, files = counts(engine), image_files(workspace)
    [again] = ingest_slides(workspace, engine, [tiff], regions=geojson, stride=16, workers=1)
    assert (again.tiles_added, again.tiles_skipped, again.new_source) == (0, r.tiles_added, False)
    assert counts(engine) == before and image_files(workspace) == files


def test_reingest_with_another_grid_adds_only_new_tiles(make_workspace, tmp_path, demo_slide):
    from store.db import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'g.db'}"
    engine = make_engine(url)
    upgrade(engine)
    ws = make_workspace(url)
    tiff, geojson = demo_slide
    [a] = ingest_slides(ws, engine, [tiff], regions=geojson, stride=32, workers=1)
    [b] = ingest_slides(ws, engine, [tiff], regions=geojson, stride=16, workers=1)
    assert b.tiles_skipped > 0 and b.tiles_added > 0 and not b.new_source
    assert counts(engine)[0] == 1 and counts(engine)[2] == a.tiles_added + b.tiles_added


def test_three_slides_split_by_slide(workspace, engine, tmp_path):
    slides = [write_large_pyramid(tmp_path / f"s{n}.tiff", size=n, tile=256) for n in (512, 768, 1024)]
    results = ingest_slides(workspace, engine, slides, class_name="dab_positive", tile_size=64,
                            workers=1)
    assert all(r.tiles_added > 0 for r in results)
    with Session(engine) as s:
        rows = s.exec(select(Slide)).all()
        assert sorted(r.split for r in rows) == ["test", "train", "val"]
        for sl in rows:
            splits = set(s.exec(select(Tile.split).where(Tile.slide_id == sl.id)).all())
            assert splits == {sl.split}
            assert sl.mpp == pytest.approx(0.5)


def test_labels_csv(workspace, engine, tmp_path):
    a = write_large_pyramid(tmp_path / "a.tiff", size=512, tile=256)
    b = write_large_pyramid(tmp_path / "b.tiff", size=768, tile=256)
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,class\na.tiff,dab_negative\nb,dab_positive\n")
    ingest_slides(workspace, engine, [a, b], labels=csv, tile_size=64, workers=1)
    with Session(engine) as s:
        got = dict(s.exec(select(Slide.path, Slide.label)).all())
        assert got == {str(a.resolve()): "dab_negative", str(b.resolve()): "dab_positive"}
        assert set(s.exec(select(Tile.class_name)).all()) == {"dab_negative", "dab_positive"}


def test_labels_csv_naming_an_unknown_slide(workspace, engine, tmp_path):
    a = write_large_pyramid(tmp_path / "a.tiff", size=512, tile=256)
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,class\na.tiff,dab_negative\nghost.svs,dab_positive\n")
    with pytest.raises(PathloopError, match=r"labels.csv line 3: slide 'ghost.svs' is not among the slides"):
        ingest_slides(workspace, engine, [a], labels=csv, tile_size=64, workers=1)
    assert counts(engine) == (0, 0, 0)


def test_unknown_class_is_refused_before_anything_is_written(workspace, engine, demo_slide):
    with pytest.raises(PathloopError, match=r"'tumour', which is not in classes of .*pathloop.toml"):
        ingest_slides(workspace, engine, [demo_slide[0]], class_name="tumour")
    assert counts(engine) == (0, 0, 0) and not image_files(workspace)


@pytest.mark.parametrize("where", ["shard", "rows"])
def test_a_failure_midway_leaves_no_rows_and_no_files(workspace, engine, demo_slide, monkeypatch, where):
    if where == "shard":  # the disk fills while tiles are being written
        real_append, calls = ShardWriter.append, []

        def flaky(self, data):
            calls.append(1)
            if len(calls) > 50:
                raise OSError("disk full")
            return real_append(self, data)

        monkeypatch.setattr(ShardWriter, "append", flaky)
    else:  # the shard is published, then the transaction of rows fails
        def flaky(*args, **kwargs):
            raise OSError("database went away")

        monkeypatch.setattr(ingest_module, "insert_shard_images", flaky)
    with pytest.raises(OSError):
        ingest_slides(workspace, engine, [demo_slide[0]], regions=demo_slide[1], stride=16, workers=2)
    assert counts(engine) == (0, 0, 0)
    assert not image_files(workspace)


def _folder(root, size=32, classes=("dab_negative", "dab_positive"), n=6, split_dirs=False):
    rng = np.random.default_rng(zlib.crc32(root.name.encode()))
    for split in ("train", "val", "test") if split_dirs else (None,):
        for c in classes:
            d = root / split / c if split else root / c
            d.mkdir(parents=True)
            for i in range(n):
                PILImage.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_import_tiles(workspace, engine, tmp_path):
    folder = _folder(tmp_path / "crops")
    r = import_tiles(workspace, engine, folder)
    assert r.tiles_added == 12 and dict(r.per_class) == {"dab_negative": 6, "dab_positive": 6}
    assert import_tiles(workspace, engine, folder).tiles_added == 0  # idempotent
    with Session(engine) as s:
        assert all(t.slide_id is None for t in s.exec(select(Tile)).all())
    kept = import_tiles(workspace, engine, _folder(tmp_path / "split", split_dirs=True, n=2))
    assert dict(kept.per_split) == {"train": 4, "val": 4, "test": 4}


def test_import_tiles_bad_input(workspace, engine, tmp_path):
    with pytest.raises(PathloopError, match="does not exist"):
        import_tiles(workspace, engine, tmp_path / "none")
    with pytest.raises(PathloopError, match=r"64x64; expected 32x32"):
        import_tiles(workspace, engine, _folder(tmp_path / "big", size=64))
    with pytest.raises(PathloopError, match=r"class folder .*mystery.* not in classes"):
        import_tiles(workspace, engine, _folder(tmp_path / "odd", classes=("mystery",)))
    (tmp_path / "empty" / "dab_negative").mkdir(parents=True)
    with pytest.raises(PathloopError, match="holds no images"):
        import_tiles(workspace, engine, tmp_path / "empty")
    bad = _folder(tmp_path / "junk", n=1)
    (bad / "dab_negative" / "x.png").write_text("not a png")
    with pytest.raises(PathloopError, match=r"x.png is not an image"):
        import_tiles(workspace, engine, bad)
    assert counts(engine) == (0, 0, 0) and not image_files(workspace)


# ---- through the CLI: each bad input is one line, a non-zero exit, nothing written


@pytest.fixture
def cli_ws(pathloop_exe, tmp_path):
    subprocess.run([pathloop_exe, "init", tmp_path / "ws", "--classes", "dab_negative,dab_positive",
                    "--tile-size", "32"], check=True, capture_output=True)
    return tmp_path / "ws"


def _cli(exe, ws, *args):
    return subprocess.run([exe, "ingest", "-w", ws, *map(str, args)], capture_output=True, text=True)


def _nothing_written(exe, ws):
    st = json.loads(subprocess.run([exe, "status", "--json", "-w", ws], capture_output=True, text=True,
                                   check=True).stdout)
    assert st["slides"] == 0 and st["tiles_total"] == 0
    assert not [p for p in (ws / "images").rglob("*") if p.is_file()]


def _one_line(p, *needles):
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathloop: error: "), p.stderr
    for n in needles:
        assert str(n) in lines[0]


def test_cli_ingest_and_status(pathloop_exe, cli_ws, demo_slide):
    tiff, geojson = demo_slide
    p = _cli(pathloop_exe, cli_ws, tiff, "--regions", geojson, "--stride", "16")
    assert p.returncode == 0, p.stderr
    assert "tiles added" in p.stdout
    st = json.loads(subprocess.run([pathloop_exe, "status", "--json", "-w", cli_ws], capture_output=True,
                                   text=True, check=True).stdout)
    assert st["slides"] == 1 and all(sum(v.values()) > 100 for v in st["tiles"].values())


def test_cli_ingest_bad_inputs(pathloop_exe, cli_ws, demo_slide, tmp_path):
    tiff, geojson = demo_slide
    exe = pathloop_exe
    _one_line(_cli(exe, cli_ws, tmp_path / "missing.svs", "--class", "dab_negative"), "missing.svs", "does not exist")
    fake = tmp_path / "notes.tiff"
    fake.write_text("this is not a slide")
    _one_line(_cli(exe, cli_ws, fake, "--class", "dab_negative"), "notes.tiff", "not a slide")
    corrupt = tmp_path / "corrupt.tiff"
    corrupt.write_bytes(tiff.read_bytes()[:3000])
    _one_line(_cli(exe, cli_ws, corrupt, "--class", "dab_negative"), "corrupt.tiff")
    bad_json = tmp_path / "bad.geojson"
    bad_json.write_text("{not json")
    _one_line(_cli(exe, cli_ws, tiff, "--regions", bad_json), "bad.geojson", "not valid GeoJSON")
    unclassified = tmp_path / "plain.geojson"
    unclassified.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [99, 0], [99, 99], [0, 0]]]},
         "properties": {}}]}))
    _one_line(_cli(exe, cli_ws, tiff, "--regions", unclassified), "plain.geojson", "no classified regions")
    _one_line(_cli(exe, cli_ws, tiff, "--class", "dab_negative", "--tile-size", "1024"), "larger than slide")
    white = tmp_path / "white.tiff"
    tifffile.imwrite(white, np.full((512, 512, 3), 255, np.uint8), tile=(128, 128), photometric="rgb")
    _one_line(_cli(exe, cli_ws, white, "--class", "dab_negative"), "no tissue found in", "white.tiff")
    _one_line(_cli(exe, cli_ws, tiff, "--class", "tumour"), "'tumour'", "pathloop.toml")
    _nothing_written(exe, cli_ws)


# ---- labels CSVs as spreadsheets save them

def test_labels_csv_saved_by_excel_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts with the BOM bytes EF BB BF; the header must still read 'slide'."""
    from store.ingest import read_labels

    a, b = tmp_path / "a.tiff", tmp_path / "b.tiff"
    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + "slide,class\r\na.tiff,nécrose\r\nb,dab_positive\r\n".encode())
    assert read_labels(csv, [a, b]) == {a: "nécrose", b: "dab_positive"}


def test_labels_csv_saved_as_utf16_is_read_or_refused_in_one_line(tmp_path):
    """Excel's "Unicode Text" is tab-separated UTF-16 with a BOM: read it, or say so in one line."""
    from store.ingest import read_labels

    a = tmp_path / "a.tiff"
    for name, text in [("tabs.txt", "slide\tclass\r\na.tiff\tdab_negative\r\n"),
                       ("commas.csv", "slide,class\r\na.tiff,dab_negative\r\n")]:
        csv = tmp_path / name
        csv.write_bytes(text.encode("utf-16"))  # BOM FF FE, then little-endian
        try:
            got = read_labels(csv, [a])
        except PathloopError as e:
            message = str(e)
            assert "\n" not in message and name in message, message
        else:
            assert got == {a: "dab_negative"}


def test_labels_csv_with_accented_classes(make_workspace, db_url, tmp_path):
    """Class names with accents, typed composed or decomposed (NFD), label tiles as pathloop.toml spells them.

    The decomposed row needs store/ingest.py to NFC-normalise the class it reads.
    """
    import unicodedata

    from store.db import make_engine

    ws = make_workspace(db_url, classes=["nécrose", "Lymphozyten-ähnlich"])
    engine = make_engine(ws.database_url)
    a = write_large_pyramid(tmp_path / "a.tiff", size=512, tile=256)
    b = write_large_pyramid(tmp_path / "b.tiff", size=768, tile=256)
    csv = tmp_path / "labels.csv"
    csv.write_text(f"slide,class\na.tiff,nécrose\nb,{unicodedata.normalize('NFD', 'Lymphozyten-ähnlich')}\n",
                   encoding="utf-8")
    ingest_slides(ws, engine, [a, b], labels=csv, tile_size=64, workers=1)
    with Session(engine) as s:
        assert set(s.exec(select(Tile.class_name)).all()) == {"nécrose", "Lymphozyten-ähnlich"}
    engine.dispose()
