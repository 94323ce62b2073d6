"""The stain-agnostic simulated expert on the IHC demo and the (recoloured) H&E workspace."""

import numpy as np
import pytest

from pathloop.demo import write_demo_slide
from pathloop.macenko import concentrations, macenko_matrix
from pathloop.simulate import StainExpert, fit_expert
from store.db import make_engine, upgrade
from store.errors import PathloopError
from store.images import load_rgb
from store.ingest import ingest_slides
from store.rewards import real_tiles
from store.workspace import Settings, Workspace

WORKSPACES = {"ihc": ["dab_negative", "dab_positive"], "he": ["nuclei_dense", "stroma"]}


@pytest.fixture(scope="module", params=list(WORKSPACES))
def fitted(request, tmp_path_factory):
    stain, classes = request.param, WORKSPACES[request.param]
    root = tmp_path_factory.mktemp(stain)
    tiff, geojson = write_demo_slide(root / f"{stain}.tiff", stain=stain)
    ws = Workspace.create(root / "ws", Settings(classes=classes, tile_size=32, control_share=0.0))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    ingest_slides(ws, engine, [tiff], regions=geojson, stride=16, workers=1)
    held_out = [t for t in real_tiles(ws, engine) if t.split != "train"]
    yield classes, fit_expert(ws, engine), held_out
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


def test_own_class_plausible_wrong_class_and_broken_tiles_implausible(fitted):
    classes, expert, held_out = fitted
    assert isinstance(expert, StainExpert)
    for c in classes:
        tiles = [load_rgb(t.path, 32) for t in held_out if t.class_name == c]
        other = next(o for o in classes if o != c)
        assert len(tiles) > 50
        own = np.mean([expert.judge(rgb, c)[0] == "plausible" for rgb in tiles])
        swapped = np.mean([expert.judge(rgb, other)[0] == "plausible" for rgb in tiles])
        assert own >= 0.8 and swapped <= 0.3, (c, own, swapped)
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
