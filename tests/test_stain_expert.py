"""The stain-agnostic simulated expert on the IHC demo, the recoloured H&E workspace and two real H&E
images (stardist's test crop, TIAToolbox's stain-normalisation target)."""

import numpy as np
import pytest
from sqlmodel import Session, select

from pathloop.demo import INGEST_LEVEL, STAIN_CLASSES, demo_workspace
from pathloop.macenko import concentrations, macenko_matrix
from pathloop.simulate import StainExpert, fit_expert
from store.errors import PathloopError
from store.images import load_rgb
from store.models import Tile
from store.rewards import real_tiles


@pytest.fixture(scope="module", params=list(STAIN_CLASSES))
def fitted(request, tmp_path_factory):
    stain, classes = request.param, STAIN_CLASSES[request.param]
    ws, engine, _ = demo_workspace(tmp_path_factory.mktemp(stain), stain)
    held_out = [t for t in real_tiles(ws, engine) if t.split != "train"]
    yield classes, fit_expert(ws, engine), held_out, stain, engine
    engine.dispose()


def test_macenko_recovers_hand_made_stains():
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    conc = np.random.default_rng(0).uniform(0.3, 1.5, (64, 64, 2))
    conc[:8, :, 1] = conc[-8:, :, 0] = 0  # some pure-stain pixels: the extreme angles Macenko looks for
    rgb = np.clip(256 * np.exp(-(conc @ stains)) - 1, 0, 255).round().astype(np.uint8)
    found = macenko_matrix(rgb)
    assert np.allclose(found, stains, atol=0.05)
    assert np.allclose(concentrations(rgb, found), conc, atol=0.1)


# per workspace: held-out tiles per class at least, own class plausible at least, shown as the other
# class plausible at most. The real H&E crop is 300x500 px: 62 held-out tiles in all, 19 of them
# nuclei-dense (measured 14 of 19 plausible as their own class, 3 of 19 as stroma). The 1000x1000 real
# H&E field, tiled at level 1, holds 153 and 92 (measured 0.974 / 0.059 and 0.924 / 0.109).
BOUNDS = {"ihc": (50, 0.8, 0.3), "he": (50, 0.8, 0.3), "he-real": (15, 0.7, 0.3), "he-tia": (50, 0.8, 0.3)}


def test_own_class_plausible_wrong_class_and_broken_tiles_implausible(fitted):
    classes, expert, held_out, stain, engine = fitted
    assert isinstance(expert, StainExpert)
    with Session(engine) as s:  # he-tia, whose nuclei are twice as many pixels, is tiled at level 1
        assert set(s.exec(select(Tile.level).distinct()).all()) == {INGEST_LEVEL.get(stain, 0)}
    least, own_at_least, swapped_at_most = BOUNDS[stain]
    for c in classes:
        tiles = [load_rgb(t.path, 32) for t in held_out if t.class_name == c]
        other = next(o for o in classes if o != c)
        assert len(tiles) >= least
        own = np.mean([expert.judge(rgb, c)[0] == "plausible" for rgb in tiles])
        swapped = np.mean([expert.judge(rgb, other)[0] == "plausible" for rgb in tiles])
        assert own >= own_at_least and swapped <= swapped_at_most, (c, own, swapped)
    real = load_rgb(held_out[0].path, 32)
    broken = {"artefact": np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8),
              "chromatin pattern": np.full((32, 32, 3), 240, np.uint8),  # blank glass: no texture at all
              "cytoplasm colour": np.roll(real, 1, axis=2)}  # colour-shifted real tissue
    for reason, rgb in broken.items():
        for c in classes:
            verdict, reasons = expert.judge(rgb, c)
            assert verdict == "implausible" and reason in reasons, (reason, c, reasons)


def test_too_few_tiles_and_unknown_rules():
    with pytest.raises(PathloopError, match="'b' has 2"):
        StainExpert.from_tiles(np.zeros((7, 32, 32, 3), np.uint8) + 100, np.array([0] * 5 + [1] * 2), ["a", "b"], [])
    with pytest.raises(PathloopError, match="rules 'x'"):
        fit_expert(None, None, rules="x")


@pytest.mark.parametrize("stain, size", [("he-real", (500, 300)), ("he-tia", (1000, 1000))])
def test_the_real_he_images_are_pyramids_openslide_reads_and_their_absence_is_one_line(tmp_path, monkeypatch,
                                                                                       stain, size):
    import openslide

    from pathloop import demo

    tiff, geojson = demo.write_demo_slide(tmp_path / "real.tiff", stain=stain)
    with openslide.OpenSlide(str(tiff)) as slide:
        assert slide.level_count == 3 and slide.dimensions == size
        assert slide.level_dimensions[1] == (size[0] // 2, size[1] // 2)
        region = np.asarray(slide.read_region((0, 0), 0, size).convert("RGB"))
    # the wheel's own pixels, losslessly stored (zlib): H&E, haematoxylin-blue nuclei on eosin-pink
    assert np.array_equal(region, demo.real_he_image(stain))
    assert region[..., 0].mean() > region[..., 1].mean() and region[..., 2].mean() > region[..., 1].mean()
    assert geojson.is_file()

    package, name = demo.REAL_HE[stain]
    monkeypatch.setitem(demo.REAL_HE, stain, ("no_such_package_here", name))
    with pytest.raises(PathloopError) as e:
        demo.write_demo_slide(tmp_path / "missing.tiff", stain=stain)
    assert str(e.value) == (f"stain {stain!r} reads the H&E image in the no_such_package_here wheel; it is not "
                            f"installed (expected no_such_package_here/{name}; pip install --no-deps "
                            "no_such_package_here)")
    assert not list(tmp_path.glob("missing*"))

