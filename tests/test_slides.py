"""Slide reading, tile planning, block splits and tile export on the bundled IHC demo slide."""

from collections import Counter

import numpy as np
import openslide
import pytest
import tifffile
from skimage import data

from pathloop.demo import write_demo_slide, write_large_pyramid
from store import slides as slides_module
from store.errors import PathloopError, PathloopWarning
from store.images import decode_shard_record, pixel_sha256
from store.slides import (
    assign_block_splits,
    load_regions,
    open_slide,
    plan_tiles,
    read_tiles,
    slide_info,
    tissue_mask,
)

CLASSES = {"dab_positive", "dab_negative"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(tiff, geojson) of the demo slide, written once."""
    return write_demo_slide(tmp_path_factory.mktemp("demo") / "ihc.tiff")


@pytest.fixture(scope="module")
def demo_specs(demo):
    tiff, geojson = demo
    return plan_tiles(tiff, tile_size=32, stride=16, regions=load_regions(geojson))


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    return write_large_pyramid(tmp_path_factory.mktemp("big") / "big.tif", size=2048)


def test_demo_slide_opens_with_levels_and_exact_pixels(demo):
    tiff, _ = demo
    slide = openslide.OpenSlide(str(tiff))
    assert slide.level_count >= 2
    assert slide.dimensions == (512, 512)
    level0 = np.asarray(slide.read_region((0, 0), 0, (512, 512)))
    np.testing.assert_array_equal(level0[..., :3], data.immunohistochemistry())
    assert (level0[..., 3] == 255).all()
    info = slide_info(tiff)
    assert (info.vendor, info.mpp, info.level_count) == ("generic-tiff", None, slide.level_count)
    assert len(info.sha256) == 64


def test_demo_geojson_has_both_valid_classes(demo):
    regions = load_regions(demo[1])
    assert {name for name, _ in regions} == CLASSES
    assert all(g.is_valid and g.area > 10_000 for _, g in regions)


def test_tissue_mask_keeps_tissue_and_drops_the_lumen(demo):
    mask, scale = tissue_mask(open_slide(demo[0]))
    assert mask.shape == (512, 512) and scale == 1.0
    assert 0.6 < mask.mean() < 0.98
    assert not mask[310:385, 0:20].any()  # the empty lumen on the left edge


def test_plan_tiles_on_demo_gives_both_classes_inside_tissue(demo_specs):
    counts = Counter(s.class_name for s in demo_specs)
    assert set(counts) == CLASSES
    assert min(counts.values()) >= 150
    for s in demo_specs:
        assert s.tissue >= 0.5
        assert 0 <= s.x <= 512 - 32 and 0 <= s.y <= 512 - 32
        assert s.x % 16 == 0 and s.y % 16 == 0
        assert (s.level, s.read_size, s.extent) == (0, 32, 32)


def _overlap(a, b) -> bool:
    return a.x < b.x + b.extent and b.x < a.x + a.extent and a.y < b.y + b.extent and b.y < a.y + a.extent


def test_block_splits_are_deterministic_and_never_overlap_across_splits(demo_specs):
    first = assign_block_splits(demo_specs, seed=7)
    assert first == assign_block_splits(demo_specs, seed=7)
    assert first != assign_block_splits(demo_specs, seed=8)
    splits = Counter(split for _, split in first)
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"] > splits["val"] and splits["train"] > splits["test"]
    for i, (a, split_a) in enumerate(first):
        for b, split_b in first[i + 1 :]:
            assert split_a == split_b or not _overlap(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_splits_keep_every_class_in_every_split(demo_specs, seed):
    kept = assign_block_splits(demo_specs, seed=seed)
    overall = Counter(s.class_name for s, _ in kept)
    for split in ("train", "val", "test"):
        mix = Counter(s.class_name for s, sp in kept if sp == split)
        for c in CLASSES:
            share, whole = mix[c] / sum(mix.values()), overall[c] / len(kept)
            assert abs(share - whole) < 0.15, (split, c, share, whole)


def test_block_splits_reject_bad_fractions(demo_specs):
    with pytest.raises(PathloopError, match=r"\(0\.5, 0\.5, 0\.5\)"):
        assign_block_splits(demo_specs, seed=0, fractions=(0.5, 0.5, 0.5))


def test_read_tiles_in_workers_matches_in_process(demo, demo_specs):
    specs = demo_specs[:120]
    here = list(read_tiles(demo[0], specs, out_size=32, workers=1))
    pooled = list(read_tiles(demo[0], specs, out_size=32, workers=2, chunk=16))
    # The caller's own spec objects come back, in order (ingest keys on their identity).
    assert all(got is spec for (got, _), spec in zip(pooled, specs, strict=True))
    assert [e.sha256 for _, e in here] == [e.sha256 for _, e in pooled]
    assert len({e.sha256 for _, e in here}) == len(specs)
    assert (here[0][1].width, here[0][1].height) == (32, 32)


def test_mpp_picks_the_deepest_fine_enough_level(pyramid):
    assert slide_info(pyramid).mpp == pytest.approx(0.5)
    at_1 = plan_tiles(pyramid, tile_size=64, mpp=1.0, class_name="tissue")
    at_4 = plan_tiles(pyramid, tile_size=64, mpp=4.0, class_name="tissue")
    assert {(s.level, s.read_size, s.extent) for s in at_1} == {(0, 128, 128)}
    assert {(s.level, s.read_size, s.extent) for s in at_4} == {(1, 128, 512)}
    tiles = list(read_tiles(pyramid, at_4[:3], out_size=64))
    assert all((e.width, e.height) == (64, 64) for _, e in tiles)


@pytest.fixture
def white_slide(tmp_path):
    path = tmp_path / "white.tiff"
    tifffile.imwrite(path, np.full((256, 256, 3), 255, np.uint8), tile=(128, 128), photometric="rgb")
    return path


def test_bad_slide_files_are_named(demo, tmp_path):
    with pytest.raises(PathloopError, match="missing.svs does not exist"):
        open_slide(tmp_path / "missing.svs")
    text = tmp_path / "notes.tiff"
    text.write_text("not a slide")
    with pytest.raises(PathloopError, match="notes.tiff is not a slide OpenSlide can read"):
        slide_info(text)
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(demo[0].read_bytes()[:200_000])
    with pytest.raises(PathloopError, match="truncated.tiff is not a slide OpenSlide can read"):
        plan_tiles(truncated, tile_size=32, class_name="x")


def test_bad_geojson_is_named(tmp_path):
    broken = tmp_path / "broken.geojson"
    broken.write_text('{"type": "FeatureCollection", ')
    with pytest.raises(PathloopError, match="broken.geojson is not valid GeoJSON"):
        load_regions(broken)
    unclassified = tmp_path / "unclassified.geojson"
    unclassified.write_text(
        '{"type": "Feature", "properties": {"objectType": "annotation"},'
        ' "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}}'
    )
    with pytest.raises(PathloopError, match="unclassified.geojson has no classified regions"):
        load_regions(unclassified)


def test_load_regions_accepts_plain_string_classes_and_repairs_bowties(tmp_path):
    path = tmp_path / "bowtie.geojson"
    path.write_text(
        '[{"type": "Feature", "properties": {"classification": "tumour"},'
        ' "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [0, 10], [10, 10], [0, 0]]]}}]'
    )
    with pytest.warns(PathloopWarning, match="feature 0 .* repaired"):
        [(name, geometry)] = load_regions(path)
    assert name == "tumour" and geometry.is_valid and geometry.area == pytest.approx(50)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 1024}, r"1024x1024 .* larger than slide .*ihc.tiff \(512x512\)"),
        ({"tile_size": 32, "level": 3}, "level 3 does not exist in .*ihc.tiff"),
        ({"tile_size": 32, "mpp": 0.5}, "ihc.tiff has no mpp"),
    ],
)
def test_bad_plan_arguments_are_named(demo, kwargs, message):
    with pytest.raises(PathloopError, match=message):
        plan_tiles(demo[0], class_name="x", **kwargs)


def test_mpp_finer_than_the_slide_is_refused(pyramid):
    with pytest.raises(PathloopError, match=r"mpp 0.25 is finer than level 0 of .*big.tif"):
        plan_tiles(pyramid, tile_size=64, mpp=0.25, class_name="x")


def test_empty_tissue_mask_is_named(white_slide):
    with pytest.raises(PathloopError, match="no tissue found in .*white.tiff"):
        plan_tiles(white_slide, tile_size=32, class_name="x")


def test_write_demo_slide_refuses_bad_targets(tmp_path):
    with pytest.raises(PathloopError, match="nowhere does not exist"):
        write_demo_slide(tmp_path / "nowhere" / "demo.tiff")
    with pytest.raises(PathloopError, match=r"demo.png must end in .tif or .tiff"):
        write_demo_slide(tmp_path / "demo.png")
    assert list(tmp_path.iterdir()) == []


# ---- native tiles: read from the TIFF itself where a grid tile is one native tile

def _openslide_pixels(path, spec):
    slide = openslide.OpenSlide(str(path))
    try:
        return np.asarray(slide.read_region((spec.x, spec.y), spec.level, (spec.read_size,) * 2).convert("RGB"))
    finally:
        slide.close()


@pytest.mark.parametrize("compression, codecs", [("jpeg", {"jpeg"}), ("zlib", {"zstd", "raw"})])
def test_native_tiles_equal_openslide_pixels(tmp_path, compression, codecs):
    path = write_large_pyramid(tmp_path / f"{compression}.tif", size=1536, tile=256, compression=compression)
    specs = plan_tiles(path, tile_size=256, class_name="tissue", min_tissue=0.0)
    at_1 = plan_tiles(path, tile_size=256, level=1, class_name="tissue", min_tissue=0.0)
    for plan in (specs, at_1):
        tiles = list(read_tiles(path, plan, out_size=256, workers=2, chunk=4))
        assert {t.codec for _, t in tiles} <= codecs
        for spec, tile in tiles:
            theirs = _openslide_pixels(path, spec)
            mine = decode_shard_record(tile.data, tile.codec, tile.width, tile.height)
            assert np.array_equal(mine, theirs), (spec.x, spec.y, spec.level)
            assert tile.sha256 == pixel_sha256(theirs)
    if compression == "jpeg":  # the slide's own JPEG bytes, stored as they are: a standalone JPEG file
        raw = tiles[0][1].data
        assert raw[:2] == b"\xff\xd8" and len(raw) < 256 * 256 * 3 / 4


def test_native_tiles_fall_back_to_openslide_when_pixels_differ(tmp_path, monkeypatch):
    path = write_large_pyramid(tmp_path / "j.tif", size=1024, tile=256)
    specs = plan_tiles(path, tile_size=256, class_name="tissue", min_tissue=0.0)
    real = slides_module.decode_shard_record
    monkeypatch.setattr(slides_module, "decode_shard_record", lambda *a: real(*a) ^ 1)  # a decoder that disagrees
    tiles = list(read_tiles(path, specs, out_size=256, workers=1))
    assert {t.codec for _, t in tiles} <= {"zstd", "raw"}  # every tile read through OpenSlide instead
    for spec, tile in tiles[:3]:
        assert tile.sha256 == pixel_sha256(_openslide_pixels(path, spec))


def test_unaligned_grids_read_through_openslide(tmp_path):
    path = write_large_pyramid(tmp_path / "j.tif", size=1024, tile=256)
    for kwargs in ({"tile_size": 128}, {"tile_size": 256, "stride": 128}):
        specs = plan_tiles(path, class_name="tissue", min_tissue=0.0, **kwargs)
        tiles = list(read_tiles(path, specs, out_size=kwargs["tile_size"], workers=2))
        codecs = Counter(t.codec for _, t in tiles)
        aligned = sum(s.x % 256 == 0 and s.y % 256 == 0 and s.read_size == 256 for s in specs)
        assert codecs.get("jpeg", 0) in (0, aligned) and sum(codecs.values()) == len(specs)
        for spec, tile in tiles[:: max(1, len(tiles) // 5)]:
            assert tile.sha256 == pixel_sha256(_openslide_pixels(path, spec))


def test_shard_codecs_round_trip_and_raw_reads_need_no_decoding(tmp_path):
    from store.images import ImageColumns, ShardWriter, encode_for_shard

    flat = np.full((32, 32, 3), 200, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a, b = encode_for_shard(flat), encode_for_shard(noise)
    assert (a.codec, b.codec) == ("zstd", "raw")  # zstd only where it pays
    assert len(a.data) < 1000 and len(b.data) == noise.nbytes
    writer = ShardWriter(tmp_path, "t")
    slots = [writer.append(t.data) for t in (a, b, a)]
    rel = writer.publish()
    rows = [("x.png", rel, off, n, t.codec, 32, 32) for (off, n), t in zip(slots, (a, b, a))]
    cols = ImageColumns(tmp_path, rows, 32)
    got = cols.batch([1, 0, 2, 1])
    assert [np.array_equal(g, w) for g, w in zip(got, (noise, flat, flat, noise))] == [True] * 4
    assert pixel_sha256(cols.read(1)) == b.sha256
    (tmp_path / rel).write_bytes((tmp_path / rel).read_bytes()[:-10])  # a truncated shard: one clear line
    with pytest.raises(PathloopError, match="is truncated"):
        ImageColumns(tmp_path, rows, 32).batch([2])
