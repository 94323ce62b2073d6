"""The simulated expert: fitted on the demo slide's real tiles, it rates real tiles of their own
class mostly plausible and real tiles shown as the other class mostly implausible; through the
queue it writes ordinary judgments as named raters."""

from __future__ import annotations

import numpy as np
import pytest
from sqlmodel import Session, select

from pathloop.demo import write_demo_slide
from pathloop.simulate import SimulatedExpert, simulate, tile_features
from store.db import make_engine, upgrade
from store.errors import PathloopError
from store.images import load_rgb
from store.ingest import ingest_slides
from store.models import Annotator, GeneratorVersion, Judgment, Sample
from store.rewards import real_tiles
from store.workspace import Settings, Workspace

CLASSES = ["dab_negative", "dab_positive"]


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    tiff, geojson = write_demo_slide(root / "ihc.tiff")
    ws = Workspace.create(root / "ws", Settings(classes=CLASSES, tile_size=32, control_share=0.0))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    ingest_slides(ws, engine, [tiff], regions=geojson, stride=16, workers=1)
    yield ws, engine, SimulatedExpert.fit(ws, engine)
    engine.dispose()


def test_features_of_hand_made_tiles():
    flat = np.full((32, 32, 3), 128, np.uint8)
    noisy = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    f, g = tile_features(flat), tile_features(noisy)
    assert f[7] == 0 and np.allclose(f[1:4], 128 / 255) and np.allclose(f[4:7], 0, atol=1e-5)
    assert g[7] > 0.2  # pixel noise: high-frequency energy far above any tissue


def test_real_tiles_of_their_own_class_pass_and_of_the_other_class_fail(demo_ws):
    ws, engine, expert = demo_ws
    held_out = [t for t in real_tiles(ws, engine) if t.split != "train"]
    assert len(held_out) > 100
    own = [expert.judge(load_rgb(t.path, 32), t.class_name)[0] for t in held_out]
    swapped = [expert.judge(load_rgb(t.path, 32), CLASSES[1 - CLASSES.index(t.class_name)]) for t in held_out]
    assert own.count("plausible") / len(own) > 0.7
    assert [v for v, _ in swapped].count("implausible") / len(swapped) > 0.95
    # A tile outside the real colour range is implausible as either class; of the others, every
    # swapped one is rejected for a class rule.
    assert all("wrong class" in reasons or "staining" in reasons
               for (v, reasons), mine in zip(swapped, own) if v == "implausible" and mine == "plausible")
    assert sum(v == "implausible" and not {"wrong class", "staining"} & set(r) for v, r in swapped) <= 0.02 * len(own)
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    verdict, reasons = expert.judge(noise, "dab_positive")
    assert verdict == "implausible" and "artefact" in reasons


def test_simulated_raters_write_ordinary_judgments_through_the_queue(demo_ws):
    ws, engine, expert = demo_ws
    held_out = [t for t in real_tiles(ws, engine) if t.split == "test"][:20]
    with Session(engine) as s:  # "samples" that are real tiles: even ones shown as their class, odd ones swapped
        gv = GeneratorVersion(folder="models/generators/x", kind="imported")
        s.add(gv)
        s.flush()
        shown = {}
        for i, t in enumerate(held_out):
            cls = t.class_name if i % 2 == 0 else CLASSES[1 - CLASSES.index(t.class_name)]
            sample = Sample(image_id=t.image_id, generator_id=gv.id, class_name=cls, seed=i, sampler="ddim", steps=2)
            s.add(sample)
            s.flush()
            shown[sample.id] = i % 2 == 0
        s.commit()
    report = simulate(ws, engine, raters=2, expert=expert)
    assert report.judgments == 2 * len(held_out) and report.controls == 0
    with Session(engine) as s:
        rows = s.exec(select(Judgment, Annotator.username).join(Annotator)).all()
    assert {name for _, name in rows} == {"sim-expert-1", "sim-expert-2"}
    by_sample: dict[int, list[str]] = {}
    for j, _ in rows:
        by_sample.setdefault(j.sample_id, []).append(j.verdict)
    assert all(len(v) == 2 and v[0] == v[1] for v in by_sample.values())  # no noise: the two raters agree
    swapped = [v[0] for sid, v in by_sample.items() if not shown[sid]]
    assert swapped.count("implausible") == len(swapped)
    assert simulate(ws, engine, raters=2, expert=expert).judgments == 0  # the queue is empty: nothing more

    noisy = simulate(ws, engine, raters=3, noise=0.5, seed=1, expert=expert)  # a third rater, half flipped
    assert noisy.judgments == 0  # overlap reached: the queue gives nobody more


def test_bad_simulation_input(demo_ws):
    ws, engine, expert = demo_ws
    with pytest.raises(PathloopError, match="raters = 0"):
        simulate(ws, engine, raters=0, expert=expert)
    with pytest.raises(PathloopError, match="noise = 0.9"):
        simulate(ws, engine, noise=0.9, expert=expert)


def _fit_the_old_way(ws, engine) -> SimulatedExpert:
    """What ``fit`` did before the cap: every real train tile, one object each."""
    tiles = [t for t in real_tiles(ws, engine) if t.split == "train"]
    feats = {c: np.stack([tile_features(load_rgb(t.path, 32)) for t in tiles if t.class_name == c]) for c in CLASSES}
    every = np.concatenate(list(feats.values()))
    return SimulatedExpert(
        classes=CLASSES, criteria=list(ws.settings.criteria),
        dab_range={c: (float(np.percentile(f[:, 0], 5)), float(np.percentile(f[:, 0], 95))) for c, f in feats.items()},
        dab_median={c: float(np.median(f[:, 0])) for c, f in feats.items()},
        colour_lo=np.percentile(every[:, 1:7], 1, axis=0), colour_hi=np.percentile(every[:, 1:7], 99, axis=0),
        rough_hi=float(np.percentile(every[:, 7], 99)))


def _same(a: SimulatedExpert, b: SimulatedExpert) -> bool:
    return (a.classes == b.classes and a.criteria == b.criteria and a.dab_range == b.dab_range
            and a.dab_median == b.dab_median and a.rough_hi == b.rough_hi
            and np.array_equal(a.colour_lo, b.colour_lo) and np.array_equal(a.colour_hi, b.colour_hi))


def test_under_the_cap_the_fit_is_the_old_one_and_over_it_reads_only_the_cap(demo_ws, monkeypatch):
    from store.images import ImageColumns

    ws, engine, expert = demo_ws
    n_train = sum(t.split == "train" for t in real_tiles(ws, engine))
    assert 100 < n_train < 2000  # the default cap is above every class
    old = _fit_the_old_way(ws, engine)
    assert _same(expert, old) and _same(SimulatedExpert.fit(ws, engine, per_class=None), old)

    reads: list[int] = []
    real_read = ImageColumns.read
    monkeypatch.setattr(ImageColumns, "read", lambda self, i, out=None: reads.append(int(i)) or real_read(self, i, out))
    small = SimulatedExpert.fit(ws, engine, per_class=30)
    assert len(reads) == 2 * 30  # only the capped tiles were read
    assert _same(SimulatedExpert.fit(ws, engine, per_class=30), small) and not _same(small, old)
    held_out = [t for t in real_tiles(ws, engine) if t.split != "train"]
    own = [small.judge(load_rgb(t.path, 32), t.class_name)[0] for t in held_out]
    swapped = [small.judge(load_rgb(t.path, 32), CLASSES[1 - CLASSES.index(t.class_name)])[0] for t in held_out]
    assert own.count("plausible") / len(own) > 0.5 and swapped.count("implausible") / len(swapped) > 0.9
    with pytest.raises(PathloopError, match="per_class = 4; the simulated expert needs at least 5"):
        SimulatedExpert.fit(ws, engine, per_class=4)
