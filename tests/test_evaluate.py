"""`pathloop evaluate`: metrics on hand-made feature sets, copy flags, and a whole evaluation on a tiny workspace.

The Wilson interval itself is tested in tests/test_agreement.py; here it is only used.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlmodel import Session, select

from finetune.config import PretrainConfig
from finetune.pretrain import pretrain
from finetune.registry import load_generator
from finetune.sample import SampleSettings, generate_into_store
from pathloop.evaluate import (
    EvaluateConfig,
    bootstrap_intervals,
    chosen_versions,
    copy_flags,
    evaluate,
    fid,
    flag_copies,
    lineage,
    prdc,
)
from pathloop.features import workspace_extractor
from store.agreement import wilson_interval
from store.db import make_engine, upgrade
from store.errors import PathloopError
from store.generators import incoming_folder, register_generator, training_tiles
from store.images import load_rgb
from store.ingest import import_tiles
from store.models import Annotator, Evaluation, Judgment, Sample
from store.workspace import Settings, Workspace

SIZE = 16
CLASSES = ["red", "blue"]


# ---------------------------------------------------------------- metrics with known answers


def test_identical_feature_sets_give_fid_zero_and_full_precision_recall_coverage():
    x = np.random.default_rng(0).normal(size=(60, 4))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)
    m = prdc(x, x.copy(), nearest_k=3)
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["coverage"] == 1.0


def test_far_apart_feature_sets_give_zero_precision_recall_coverage_and_a_large_fid():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(50, 4)), rng.normal(size=(40, 4)) + 100.0
    m = prdc(real, fake, nearest_k=3)
    assert (m["precision"], m["recall"], m["density"], m["coverage"]) == (0.0, 0.0, 0.0, 0.0)
    assert fid(real, fake) == pytest.approx(4 * 100.0 ** 2, rel=0.05)  # ‖μ₁ − μ₂‖² dominates


def test_fid_of_two_gaussians_by_hand():
    # Same covariance I, means 0 and (3, 0): FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) = 9.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4000, 2))
    b = a + np.array([3.0, 0.0])
    assert fid(a, b) == pytest.approx(9.0, abs=1e-6)


def test_bootstrap_intervals_hold_the_point_estimate_shrink_with_n_and_repeat_by_seed():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(120, 3)), rng.normal(size=(120, 3)) + np.array([1.0, 0.0, 0.0])
    iv = bootstrap_intervals(real, fake, n_boot=200, seed=0, nearest_k=3)
    assert iv["fid"]["low"] <= fid(real, fake) <= iv["fid"]["high"]
    cov = prdc(real, fake, 3)["coverage"]
    assert iv["coverage"]["low"] <= cov <= iv["coverage"]["high"] and iv["resamples"] == 200
    # the coverage resamples the real tiles' indicators: their mean over all tiles is prdc's coverage
    assert abs((iv["coverage"]["low"] + iv["coverage"]["high"]) / 2 - cov) < 0.05
    assert iv["fid"]["high"] - iv["fid"]["low"] > 0.05  # a real spread, not a point
    assert bootstrap_intervals(real, fake, n_boot=200, seed=0, nearest_k=3) == iv
    # four times the tiles: about half the width (the spread is sampling noise, ~1/sqrt(n))
    big_r, big_f = rng.normal(size=(480, 3)), rng.normal(size=(480, 3)) + np.array([1.0, 0.0, 0.0])
    big = bootstrap_intervals(big_r, big_f, n_boot=200, seed=0, nearest_k=3)
    assert big["fid"]["high"] - big["fid"]["low"] < 0.75 * (iv["fid"]["high"] - iv["fid"]["low"])
    with pytest.raises(PathloopError, match="bootstrap = 1; expected at least 2"):
        bootstrap_intervals(real, fake, n_boot=1, seed=0)


def test_an_exact_copy_of_a_train_tile_is_flagged_and_a_fresh_one_is_not():
    train = np.random.default_rng(3).normal(size=(200, 8))
    samples = np.stack([train[17], np.full(8, 10.0)])  # a copy, and a point far from every train tile
    idx, dist, is_copy, thr = flag_copies(train, samples, percentile=5.0)
    assert thr > 0 and idx[0] == 17 and dist[0] == 0.0
    assert is_copy.tolist() == [True, False]


def test_bad_settings_are_refused():
    with pytest.raises(PathloopError, match="per_class = 1; expected at least 2"):
        EvaluateConfig(per_class=1)
    with pytest.raises(PathloopError, match="--features 'inception'; expected workspace or timm:NAME"):
        EvaluateConfig(features="inception")
    with pytest.raises(PathloopError, match=r"copy_percentile = 100.0; expected a percentile in \(0, 100\)"):
        EvaluateConfig(copy_percentile=100.0)


# ---------------------------------------------------------------- a tiny workspace


def _tiles(root, n_train=10, n_test=4):
    """Toy tiles in split folders: reddish or bluish noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, base in zip(CLASSES, ([200, 60, 60], [60, 60, 200])):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(base) + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                PILImage.fromarray(img).save(root / split / c / f"{i}.png")
    return root


def _workspace(tmp_path, name="ws", with_test=True):
    ws = Workspace.create(tmp_path / name, Settings(classes=CLASSES, tile_size=SIZE))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    crops = _tiles(tmp_path / f"{name}-crops")
    if not with_test:
        shutil.rmtree(crops / "test")
        (crops / "val").mkdir()
    import_tiles(ws, engine, crops)
    return ws, engine


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    """A pretrained 2-step generator (v1), a child copy of it (v2), 4 stored samples of v1 with judgments."""
    tmp = tmp_path_factory.mktemp("eval")
    ws, engine = _workspace(tmp)
    cfg = PretrainConfig(train_steps=2, train_batch_size=4, train_lr_warmup_steps=0, checkpoint_every=1,
                         train_learning_rate=1e-3)
    parent = pretrain(ws, engine, cfg)
    folder = incoming_folder(ws)
    shutil.copytree(ws.root / parent.folder, folder, dirs_exist_ok=True)
    child = register_generator(ws, engine, folder, kind="finetuned", config={}, parent_id=parent.id, round_number=1)
    gen = load_generator(ws, engine, parent.id)
    generate_into_store(ws, engine, gen, per_class=2, settings=SampleSettings("ddim", 2, 1.0, 8))
    with Session(engine) as s:
        raters = [Annotator(username=f"r{i}") for i in range(2)]
        s.add_all(raters)
        s.flush()
        samples = s.exec(select(Sample).order_by(Sample.id)).all()
        for i, smp in enumerate(samples):  # red: 2 of 4 plausible; blue: 4 of 4
            for a in raters:
                verdict = "implausible" if smp.class_name == "red" and (i + a.id) % 2 else "plausible"
                s.add(Judgment(sample_id=smp.id, annotator_id=a.id, verdict=verdict, request_id=f"{smp.id}-{a.id}"))
        s.commit()
    yield ws, engine, parent.id, child.id
    engine.dispose()


FAST = dict(per_class=6, steps=2, utility_epochs=2, nearest_k=2)


def test_lineage_and_the_default_versions(tiny_ws):
    ws, engine, parent, child = tiny_ws
    assert lineage(engine, child) == [parent, child]
    assert chosen_versions(engine, None, None) == [parent, child]  # the newest version's lineage
    assert chosen_versions(engine, parent, [child]) == [parent, child]


def test_evaluate_writes_the_table_files_plots_and_rows(tiny_ws):
    ws, engine, parent, child = tiny_ws
    logs: list[str] = []
    r = evaluate(ws, engine, EvaluateConfig(**FAST, simulated_expert=True), progress=False, log=logs.append)
    assert [v["generator_id"] for v in r.versions] == [parent, child]
    first = r.versions[0]
    red = first["expert"]["per_class"]["red"]
    assert (red["n"], red["plausible"]) == (4, 2)
    assert (red["low"], red["high"]) == pytest.approx(wilson_interval(2, 4))
    assert (first["expert"]["n"], first["expert"]["plausible"]) == (8, 6)
    assert r.versions[1]["expert"]["rate"] is None and first["reward"] is None  # no reward version: "-"
    # v2 is a copy of v1's weights and the fresh samples share seeds: the same numbers.
    assert r.versions[1]["fid"] == pytest.approx(first["fid"]) and r.versions[1]["coverage"] == first["coverage"]
    for v in r.versions:
        assert np.isfinite(v["fid"]) and 0 <= v["precision"] <= 1 and 0 <= v["utility"]["accuracy"] <= 1
        assert v["fresh_samples"] == 12 and v["real_test_tiles"] == 8
        iv = v["intervals"]  # bootstrap 95% intervals around the point estimates
        assert iv["fid"]["low"] <= v["fid"] <= iv["fid"]["high"] and iv["resamples"] == r.config["bootstrap"]
        assert iv["coverage"]["low"] <= v["coverage"] <= iv["coverage"]["high"]
    assert first["memorisation"]["stored"] == 4
    sim = first["simulated_expert"]  # the rule-based rater on the fresh samples, with intervals
    assert sim["n"] == 12 and sim["per_class"]["red"]["n"] == 6 and sim["low"] <= sim["rate"] <= sim["high"]
    assert sum(sim["reasons"].values()) >= sim["n"] - sim["plausible"]
    lines = r.table.splitlines()
    assert lines[0].split() == [f"v{parent}", f"v{child}", "r1"]
    assert any(line.startswith("expert plausible [95% CI]") and "n=8" in line and "- (n=0)" in line for line in lines)
    assert any(line.startswith("FID (lower is better)") for line in lines)
    assert any(line.strip().startswith("FID bootstrap 95% CI") for line in lines)
    assert any(line.startswith("simulated expert, fresh [95% CI]") and "n=12" in line for line in lines)

    files = {p.name for p in r.folder.iterdir()}
    assert {"metrics.csv", "metrics.json", "copies.csv", "plausibility.png", "trends.png", "table.txt"} <= files
    assert (r.folder / "plausibility.png").stat().st_size > 1000
    data = json.loads((r.folder / "metrics.json").read_text())
    assert [v["generator_id"] for v in data["versions"]] == [parent, child]
    import pandas as pd

    assert list(pd.read_csv(r.folder / "metrics.csv")["generator_id"]) == [parent, child]
    with Session(engine) as s:
        rows = s.exec(select(Evaluation).where(Evaluation.id.in_(r.evaluation_ids)).order_by(Evaluation.id)).all()
    assert [e.generator_id for e in rows] == [parent, child]
    assert rows[0].plots[0].startswith("evaluations/") and (ws.root / rows[0].plots[0]).is_file()
    assert rows[0].metrics["fid"] == pytest.approx(first["fid"])

    # The extractor is trained once per set of train tiles, then reused.
    assert any("trained the feature extractor" in m for m in logs) or (ws.models_dir / "evaluator").is_dir()
    refs = training_tiles(ws, engine, "train")
    images = np.stack([load_rgb(t.path, SIZE) for t in refs])
    _, info = workspace_extractor(ws, [t.tile_id for t in refs], images, np.zeros(len(refs), dtype=int))
    assert not info.trained_now


def test_a_stored_copy_of_a_train_tile_is_flagged(tiny_ws, tmp_path):
    from store.generators import add_samples
    from store.images import encode

    ws, engine, parent, child = tiny_ws
    refs = training_tiles(ws, engine, "train")
    copy = load_rgb(refs[0].path, SIZE)
    add_samples(ws, engine, child, [(encode(copy), refs[0].class_name, 999)], sampler="ddim", steps=2, guidance=1.0)
    r = evaluate(ws, engine, EvaluateConfig(**FAST), model=child, against=[child], progress=False, log=lambda m: None)
    import pandas as pd

    copies = pd.read_csv(r.folder / "copies.csv")
    row = copies[copies["generator_id"] == child].iloc[0]
    assert bool(row["copy"]) and row["nearest_tile_id"] == refs[0].tile_id and row["distance"] < 1e-4
    assert r.versions[0]["memorisation"]["stored_copies"] == 1
    flags = copy_flags(ws)
    assert flags[int(row["sample_id"])] and sum(flags.values()) == 1


def test_export_samples_leaves_out_copies_and_refuses_unchecked_ones(tiny_ws, tmp_path, pathloop_exe):
    import subprocess

    import pandas as pd

    from store.generators import add_samples
    from store.images import encode

    ws, engine, parent, child = tiny_ws
    refs = training_tiles(ws, engine, "train")
    add_samples(ws, engine, child, [(encode(load_rgb(refs[1].path, SIZE)), refs[1].class_name, 1000)],
                sampler="ddim", steps=2, guidance=1.0)

    def export(*extra):
        return subprocess.run([pathloop_exe, "export", "samples", "-w", str(ws.root), *extra],
                              capture_output=True, text=True, timeout=120)

    unchecked = export("--exclude-copies", "--out", str(tmp_path / "shared"))  # the new copy was never evaluated
    assert unchecked.returncode == 1 and not (tmp_path / "shared").exists()
    assert unchecked.stderr.strip().splitlines() == [
        f"pathloop: error: 1 of {4 + len(_child_samples(engine, child))} samples (first: sample "
        f"{max(_child_samples(engine, child))}) have not been checked for copies of real tiles; run `pathloop "
        f"evaluate` on generator version {child} first"]

    evaluate(ws, engine, EvaluateConfig(**FAST), model=child, against=[parent], progress=False, log=lambda m: None)
    flags = copy_flags(ws)
    flagged = sorted(i for i, is_copy in flags.items() if is_copy)
    assert max(_child_samples(engine, child)) in flagged
    shared = export("--exclude-copies", "--out", str(tmp_path / "shared"))
    assert shared.returncode == 0, shared.stderr
    assert f"left out {len(flagged)} flagged as copies" in shared.stdout
    manifest = pd.read_csv(tmp_path / "shared" / "manifest.csv")
    assert set(manifest["sample_id"]).isdisjoint(flagged) and len(manifest) == len(flags) - len(flagged)
    assert manifest["copy_checked"].all() and not manifest["copy"].any()
    assert all((tmp_path / "shared" / f).is_file() for f in manifest["file"])
    one = manifest.iloc[0]
    assert one["file"] == f"{one['class_name']}/{one['sample_id']}.png"

    everything = export("--model", str(child), "--out", str(tmp_path / "all-of-child"))  # no check asked: all, flagged
    assert everything.returncode == 0, everything.stderr
    child_rows = pd.read_csv(tmp_path / "all-of-child" / "manifest.csv")
    assert sorted(child_rows["sample_id"]) == sorted(_child_samples(engine, child)) and child_rows["copy"].any()

    again = export("--out", str(tmp_path / "shared"))  # never over an earlier export
    assert again.returncode == 1 and "already exists; choose a new folder" in again.stderr
    assert len(pd.read_csv(tmp_path / "shared" / "manifest.csv")) == len(manifest)


def _child_samples(engine, child) -> list[int]:
    with Session(engine) as s:
        return list(s.exec(select(Sample.id).where(Sample.generator_id == child)).all())


def test_reward_predicted_plausibility_uses_stored_scores_and_scores_the_rest(tiny_ws):
    from reward.config import RewardConfig
    from reward.model import RewardModel, model_config, save_folder
    from store.rewards import add_scores, register_reward
    from store.rewards import incoming_folder as reward_folder

    ws, engine, parent, child = tiny_ws
    folder = reward_folder(ws)
    torch_model = RewardModel("test_resnet", len(CLASSES))
    save_folder(torch_model, model_config(RewardConfig(backbone="test_resnet"), CLASSES, SIZE), folder)
    rv = register_reward(ws, engine, folder, backbone="test_resnet", config={}, metrics={}, data_manifest={})
    with Session(engine) as s:
        first = s.exec(select(Sample.id).where(Sample.generator_id == parent).order_by(Sample.id)).first()
    add_scores(engine, rv.id, [(first, 0.0)])
    r = evaluate(ws, engine, EvaluateConfig(**FAST), model=parent, against=[parent], progress=False,
                 log=lambda m: None)
    rw = r.versions[0]["reward"]
    assert rw["reward_id"] == rv.id and rw["stored"]["n"] == 4 and rw["scored_now"] == 3
    assert 0 <= rw["stored"]["mean"] < 0.75  # one stored 0.0 among four probabilities
    assert rw["fresh"]["n"] == 12 and 0 < rw["fresh"]["mean"] < 1
    assert "reward p, fresh samples" in r.table and "n=4" in r.table


def test_bad_input_is_one_line_and_writes_nothing(tiny_ws, tmp_path):
    ws, engine, parent, child = tiny_ws
    before = set((ws.root / "evaluations").iterdir()) if (ws.root / "evaluations").exists() else set()
    with Session(engine) as s:
        n_before = len(s.exec(select(Evaluation)).all())
    with pytest.raises(PathloopError, match=r"^generator version 99 does not exist; known: 1, 2$"):
        evaluate(ws, engine, EvaluateConfig(**FAST), model=99, progress=False)
    with pytest.raises(PathloopError, match=r"^generator version 42 does not exist"):
        evaluate(ws, engine, EvaluateConfig(**FAST), model=parent, against=[42], progress=False)

    bare, bare_engine = _workspace(tmp_path, "bare", with_test=False)
    copy = incoming_folder(bare)
    shutil.copytree(ws.root / "models" / "generators" / str(parent), copy, dirs_exist_ok=True)
    register_generator(bare, bare_engine, copy, kind="imported", config={})
    with pytest.raises(PathloopError, match=r"^the workspace has no test tiles; ingest slides first"):
        evaluate(bare, bare_engine, EvaluateConfig(**FAST), progress=False)
    assert not (bare.root / "evaluations").exists() and not (bare.models_dir / "evaluator").exists()
    bare_engine.dispose()

    after = set((ws.root / "evaluations").iterdir()) if (ws.root / "evaluations").exists() else set()
    with Session(engine) as s:
        assert len(s.exec(select(Evaluation)).all()) == n_before
    assert after == before


def test_cli_evaluate_prints_the_table(tiny_ws, pathloop_exe):
    import subprocess

    ws, engine, parent, child = tiny_ws
    out = subprocess.run([pathloop_exe, "evaluate", "-w", str(ws.root), "--model", str(child), "--per-class", "4",
                          "--steps", "2", "--utility-epochs", "1", "--nearest-k", "2", "--simulated-expert"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "expert plausible [95% CI]" in out.stdout and "wrote " in out.stdout
    assert "simulated expert, fresh [95% CI]" in out.stdout  # a switch: no value after it
    bad = subprocess.run([pathloop_exe, "evaluate", "-w", str(ws.root), "--model", "77"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == ["pathloop: error: generator version 77 does not exist; known: 1, 2"]


def test_a_timm_extractor_takes_local_weights_only(tmp_path):
    import timm
    from safetensors.torch import save_file

    from pathloop.features import timm_extractor

    with pytest.raises(PathloopError, match=r"^--features timm:test_resnet needs --weights PATH"):
        timm_extractor("test_resnet", None)
    with pytest.raises(PathloopError, match=r"^--weights .*nope.safetensors: no such file"):
        timm_extractor("test_resnet", tmp_path / "nope.safetensors")
    src = timm.create_model("test_resnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    extractor, info = timm_extractor("test_resnet", tmp_path / "w.safetensors")
    feats = extractor.embed(np.random.default_rng(0).integers(0, 255, (3, SIZE, SIZE, 3), dtype=np.uint8))
    assert feats.shape == (3, extractor.num_features) and info.name == "timm:test_resnet"


# ---------------------------------------------------------------- at most N real tiles per class


def test_the_real_subsample_is_stratified_seeded_and_everything_under_the_cap():
    from pathloop.features import real_subsample

    ids = np.arange(100, 400, 3, dtype=np.int64)  # 100 tiles, classes 0/1/2 of 50, 30 and 20
    cls = np.repeat([0, 1, 2], [50, 30, 20])
    np.random.default_rng(0).shuffle(cls)
    assert real_subsample(ids, cls, 50).tolist() == list(range(100))  # under (or at) the cap: all, in order
    assert real_subsample(ids, cls, None).tolist() == list(range(100))
    pos = real_subsample(ids, cls, 25)
    assert np.all(np.diff(pos) > 0) and np.bincount(cls[pos]).tolist() == [25, 25, 20]
    assert real_subsample(ids, cls, 25).tolist() == pos.tolist()  # reproducible
    assert real_subsample(ids, cls, 25, seed=1).tolist() != pos.tolist()
    # adding tiles keeps the others' ranks: the old choice and the newcomers' winners
    more_ids, more_cls = np.concatenate([ids, np.arange(1000, 1010)]), np.concatenate([cls, np.zeros(10, int)])
    kept = set(more_ids[real_subsample(more_ids, more_cls, 25)].tolist()) & set(ids.tolist())
    assert kept <= set(ids[pos].tolist()) and len(kept) >= 70 - 10


def test_under_the_cap_evaluation_reads_every_tile_in_the_old_order(tiny_ws):
    from pathloop.evaluate import real_reference

    ws, engine, _, _ = tiny_ws
    for split in ("train", "test"):
        refs = training_tiles(ws, engine, split)  # what evaluation read before the cap
        for cap in (2000, max(sum(r.class_name == c for r in refs) for c in CLASSES)):
            real = real_reference(ws, engine, split, cap)
            assert not real.subsampled and real.available == len(refs)
            assert real.tile_ids.tolist() == [r.tile_id for r in refs]
            assert real.labels.tolist() == [CLASSES.index(r.class_name) for r in refs]
            assert np.array_equal(real.load(), np.stack([load_rgb(r.path, SIZE) for r in refs]))


def test_over_the_cap_evaluation_reads_only_the_capped_tiles(tiny_ws, monkeypatch):
    from store.images import ImageColumns

    ws, engine, parent, child = tiny_ws
    reads: list[int] = []
    real_read = ImageColumns.read
    monkeypatch.setattr(ImageColumns, "read", lambda self, i, out=None: reads.append(int(i)) or real_read(self, i, out))
    logs: list[str] = []
    cfg = EvaluateConfig(**FAST, real_per_class=5, simulated_expert=True)  # 10 train and 4 test tiles per class
    r = evaluate(ws, engine, cfg, model=parent, against=[parent], progress=False, log=logs.append)
    assert len(reads) == 2 * 5 + 2 * 4  # train capped at 5 a class, test under the cap; nothing else read
    real = r.config["real_tiles"]
    assert real["per_class_cap"] == 5 and real["subsampled"] and r.config["real_per_class"] == 5
    assert real["train"] == {"used": 10, "available": 20, "subsampled": True, "per_class": {"red": 5, "blue": 5}}
    assert real["test"] == {"used": 8, "available": 8, "subsampled": False, "per_class": {"red": 4, "blue": 4}}
    v = r.versions[0]
    assert v["real_train_tiles"] == 10 and v["real_test_tiles"] == 8 and v["real_subsampled"]
    assert r.baseline["trained_on"] == 10 and v["memorisation"]["reference_tiles"] == 10
    assert np.isfinite(v["fid"]) and v["simulated_expert"]["n"] == 12
    assert "real tiles subsampled to at most 5 per class: train 10 of 20, test 8 of 8" in r.table
    assert any("reading at most 5 real tiles per class" in m for m in logs)
    # the extractor is keyed on (and records) the subsample's tile ids; copies point into the subsample
    chosen = json.loads((ws.root / r.config["extractor_folder"] / "config.json").read_text())["train_tile_ids"]
    assert len(chosen) == 10 and set(chosen) < {t.tile_id for t in training_tiles(ws, engine, "train")}
    import pandas as pd

    assert set(pd.read_csv(r.folder / "copies.csv")["nearest_tile_id"]) <= set(chosen)
    with Session(engine) as s:
        row = s.get(Evaluation, r.evaluation_ids[0])
    assert row.metrics["config"]["real_tiles"]["train"]["used"] == 10 and row.metrics["real_train_tiles"] == 10

    reads.clear()  # the same subsample again: the cached extractor is reused
    again = evaluate(ws, engine, cfg, model=parent, against=[parent], progress=False, log=logs.append)
    assert again.config["extractor"] == r.config["extractor"] and len(reads) == 18
    assert not any(m.startswith("trained the feature extractor") for m in logs[2:])
    with pytest.raises(PathloopError, match="real_per_class = 4; the simulated expert needs at least 5"):
        EvaluateConfig(real_per_class=4, simulated_expert=True)
    with pytest.raises(PathloopError, match="real_per_class = 0; expected at least 1"):
        EvaluateConfig(real_per_class=0)
