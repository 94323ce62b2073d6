"""Reward model: data from judgments, training, calibration, export, scoring, bad input.

Tiny timm backbone (``test_resnet``) on 32-px tiles, CPU. The toy task: a tile is "plausible"
iff its colour matches the class it claims (dab_negative ↔ blue, dab_positive ↔ brown),
which only a model that uses both the image and the class can learn.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sqlmodel import Session, select

from pathloop.cli import main as cli_main
from reward import metrics as M
from reward.config import RewardConfig
from reward.data import ExampleSet, build_data
from reward.model import RewardModel, load_backbone_weights, load_folder
from reward.score import load_reward, score_samples
from reward.train import reward_loss, train_reward
from store import queue
from store.db import make_engine
from store.errors import PathloopError
from store.judgments import recount_ratings
from store.models import (
    Annotator,
    GeneratorVersion,
    Image,
    Judgment,
    RewardScore,
    RewardVersion,
    Sample,
    Tile,
)
from store.rewards import rewards_dir
from store.workspace import Workspace

CLASSES = ["dab_negative", "dab_positive"]
COLOURS = np.array([[60, 80, 200], [150, 90, 40]], dtype=float)  # blue (haematoxylin-ish), brown (DAB-ish)
FAST = dict(backbone="test_resnet", train_epochs=25, train_batch_size=32, train_patience=25, data_min_samples=10,
            train_learning_rate=3e-3)


def tile(rng, colour: int) -> np.ndarray:
    base = COLOURS[colour] + rng.normal(0, 25, 3)
    return np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)


def put_image(ws: Workspace, s: Session, rgb: np.ndarray) -> int:
    enc, rel, _ = ws.images.put_array(rgb)
    found = s.exec(select(Image).where(Image.sha256 == enc.sha256)).first()
    if found:
        return found.id
    im = Image(sha256=enc.sha256, width=enc.width, height=enc.height, path=rel)
    s.add(im)
    s.flush()
    return im.id


def add_annotators(engine, n: int) -> list[int]:
    with Session(engine) as s:
        start = len(s.exec(select(Annotator.id)).all())
        rows = [Annotator(username=f"rater{start + i}") for i in range(n)]
        s.add_all(rows)
        s.commit()
        return [a.id for a in rows]


def judge(engine, sample_id: int, annotator_id: int, verdict: str, supersedes: int | None = None) -> int:
    with Session(engine) as s:
        j = Judgment(sample_id=sample_id, annotator_id=annotator_id, verdict=verdict, seconds=3.0,
                     request_id=f"r{sample_id}-{annotator_id}-{verdict}-{supersedes}", supersedes_id=supersedes)
        s.add(j)
        s.commit()
        return j.id


def add_toy_samples(ws: Workspace, engine, n: int, seed: int = 0, size: int = 32) -> list[tuple[int, float]]:
    """``n`` samples (random class, random colour); returns (sample id, plausible 1/0)."""
    rng = np.random.default_rng(seed)
    out = []
    with Session(engine) as s:
        gv = GeneratorVersion(folder="models/generators/x", kind="imported")
        s.add(gv)
        s.flush()
        for i in range(n):
            cls, colour = int(rng.integers(2)), int(rng.integers(2))
            rgb = tile(rng, colour) if size == 32 else np.zeros((size, size, 3), np.uint8) + i
            sample = Sample(image_id=put_image(ws, s, rgb), generator_id=gv.id, class_name=CLASSES[cls],
                            seed=seed * 10_000 + i, sampler="ddim", steps=2)
            s.add(sample)
            s.flush()
            out.append((sample.id, float(cls == colour)))
        s.commit()
    return out


def add_toy_tiles(ws: Workspace, engine, per_split: dict[str, int], seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    with Session(engine) as s:
        for split, n in per_split.items():
            for i in range(n):
                s.add(Tile(image_id=put_image(ws, s, tile(rng, i % 2)), class_name=CLASSES[i % 2], split=split))
        s.commit()


def toy_workspace(ws: Workspace, engine, n: int = 160, raters: int = 2, tiles: bool = True) -> list[tuple[int, float]]:
    truth = add_toy_samples(ws, engine, n)
    annotators = add_annotators(engine, raters)
    for sid, plausible in truth:
        for a in annotators:
            judge(engine, sid, a, "plausible" if plausible else "implausible")
    recount_ratings(engine)  # judgments inserted as rows: bring the queue's cached counts in step
    if tiles:
        add_toy_tiles(ws, engine, {"train": 40, "val": 10, "test": 10})
    return truth


def registered(engine) -> int:
    with Session(engine) as s:
        return len(s.exec(select(RewardVersion)).all())


# ---------------------------------------------------------------- model


def test_model_output_shape_and_range():
    torch.manual_seed(0)
    model = RewardModel("test_resnet", 2).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    classes = torch.tensor([0, 1, 0, 1, 1])
    logits = model(images, classes)
    assert logits.shape == (5,) and torch.isfinite(logits).all()
    p = model.probabilities(images, classes)
    assert p.shape == (5,) and ((p >= 0) & (p <= 1)).all()
    assert torch.allclose(model(images.float() / 255, classes), logits, atol=1e-6)  # uint8 == float in [0, 1]
    assert not torch.allclose(model(images, 1 - classes), logits)  # the class matters


def test_unknown_backbone_is_refused():
    with pytest.raises(PathloopError, match="backbone 'resnet_does_not_exist' is not a timm model"):
        RewardModel("resnet_does_not_exist", 2)


def test_backbone_weights_load_from_a_local_file_or_are_refused(tmp_path):
    import timm

    src = timm.create_model("test_resnet", pretrained=False)  # with its classifier, as timm saves it
    torch.nn.init.constant_(src.conv1[0].weight, 0.5)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = RewardModel("test_resnet", 2)
    load_backbone_weights(model.backbone, "test_resnet", tmp_path / "w.safetensors")
    assert torch.equal(model.backbone.conv1[0].weight, src.conv1[0].weight)

    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")  # a timm training checkpoint
    load_backbone_weights(RewardModel("test_resnet", 2).backbone, "test_resnet", tmp_path / "w.pth")

    other = RewardModel("test_convnext", 2)
    with pytest.raises(PathloopError, match=r"w.safetensors do not fit test_convnext"):
        load_backbone_weights(other.backbone, "test_convnext", tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not weights")
    with pytest.raises(PathloopError, match="cannot be read"):
        load_backbone_weights(other.backbone, "test_convnext", tmp_path / "junk.safetensors")
    with pytest.raises(PathloopError, match="do not exist"):
        load_backbone_weights(other.backbone, "test_convnext", tmp_path / "missing.pth")


def test_one_training_step_changes_weights():
    torch.manual_seed(0)
    model = RewardModel("test_resnet", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = reward_loss(model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 0, 1])),
                       torch.tensor([1.0, 0.0, 0.5, 1.0]))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed)
    assert any(k.startswith("head.") for k in changed) and "class_embed.weight" in changed


# ---------------------------------------------------------------- metrics, hand-worked


def test_metrics_against_hand_worked_values():
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6])
    t = np.array([1.0, 0.0, 1.0, 0.0, 0.5])  # the tie (0.5) takes no side in AUC / balanced accuracy
    # positives {0.9, 0.3}, negatives {0.8, 0.2}: pairs won 0.9>0.8, 0.9>0.2, 0.3>0.2; lost 0.3<0.8 → 3/4
    assert M.roc_auc(p, t) == pytest.approx(0.75)
    # at 0.5: TPR 1/2 (0.9 yes, 0.3 no), TNR 1/2 (0.2 yes, 0.8 no)
    assert M.balanced_accuracy(p, t) == pytest.approx(0.5)
    assert M.brier(p, t) == pytest.approx((0.01 + 0.64 + 0.49 + 0.04 + 0.01) / 5)
    # bins of 0.1: {0.2}: |0.2-0|, {0.3}: |0.3-1|, {0.6}: |0.6-0.5|, {0.8}: |0.8-0|, {0.9}: |0.9-1| → each 1/5
    assert M.expected_calibration_error(p, t) == pytest.approx((0.2 + 0.7 + 0.1 + 0.8 + 0.1) / 5)
    assert M.roc_auc([0.2, 0.7], [1.0, 1.0]) is None  # one side only: undefined, not a number


def test_temperature_scaling_lowers_calibration_error_on_an_overconfident_toy():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, 4000)
    t = (rng.random(4000) < M.sigmoid(true_logits)).astype(float)
    overconfident = 4.0 * true_logits
    temperature = M.fit_temperature(overconfident[:2000], t[:2000])
    assert temperature == pytest.approx(4.0, rel=0.2)
    before = M.expected_calibration_error(M.sigmoid(overconfident[2000:]), t[2000:])
    after = M.expected_calibration_error(M.sigmoid(overconfident[2000:] / temperature), t[2000:])
    assert after < before / 2, (before, after)


# ---------------------------------------------------------------- data from the store


def test_soft_targets_count_current_decisive_judgments_only(workspace, engine):
    ws = workspace
    ids = [sid for sid, _ in add_toy_samples(ws, engine, 3)]
    a, b, c, d = add_annotators(engine, 4)
    # sample 0: plausible, plausible, and an implausible that its author later changed to plausible
    judge(engine, ids[0], a, "plausible")
    judge(engine, ids[0], b, "plausible")
    first = judge(engine, ids[0], c, "implausible")
    changed = judge(engine, ids[0], c, "plausible", supersedes=first)
    # sample 1: one plausible, two implausible, one unsure (not a judgment of plausibility)
    s1 = [judge(engine, ids[1], a, "plausible"), judge(engine, ids[1], b, "implausible"),
          judge(engine, ids[1], c, "implausible")]
    judge(engine, ids[1], d, "unsure")
    # sample 2: one implausible, then retracted (undo) → no current judgment; and one plausible
    undone = judge(engine, ids[2], a, "implausible")
    judge(engine, ids[2], a, "retracted", supersedes=undone)
    judge(engine, ids[2], b, "plausible")

    cfg = RewardConfig(backbone="test_resnet", data_min_ratings=2, data_min_samples=3, data_weak_share=0.0)
    with pytest.raises(PathloopError, match=r"2 samples have at least 2 current plausible/implausible judgments "
                                            r"\(7 such judgments in all\); 3 are needed"):
        build_data(ws, engine, cfg)
    data = build_data(ws, engine, RewardConfig(backbone="test_resnet", data_min_ratings=1, data_min_samples=3,
                                               data_weak_share=0.0))
    targets = {e.item_id: e.target for split in data.splits.values() for e in split}
    assert targets == {ids[0]: 1.0, ids[1]: pytest.approx(1 / 3), ids[2]: 1.0}
    used = set(data.manifest["judgment_ids"])
    assert changed in used and first not in used and undone not in used
    assert set(s1) <= used and len(used) == 7
    assert sorted(sum(data.manifest["samples"].values(), [])) == sorted(ids)


def test_single_verdict_label_set_learns_the_other_side_from_real_tiles_or_is_refused(workspace, engine):
    ids = [sid for sid, _ in add_toy_samples(workspace, engine, 12)]
    a, b = add_annotators(engine, 2)
    for sid in ids:  # a weak generator: every tile implausible
        judge(engine, sid, a, "implausible")
        judge(engine, sid, b, "implausible")
    recount_ratings(engine)
    cfg = RewardConfig(backbone="test_resnet", data_min_samples=10)
    # no real tiles yet: nothing can say plausible
    with pytest.raises(PathloopError, match="every one of the 12 rated samples is judged implausible by its raters, "
                                            "and the workspace has no real train tiles"):
        build_data(workspace, engine, cfg)
    with pytest.raises(PathloopError, match="there are no weak labels of real tiles to give the other side"):
        build_data(workspace, engine, RewardConfig(backbone="test_resnet", data_min_samples=10, data_weak_share=0))
    add_toy_tiles(workspace, engine, {"train": 20, "val": 6, "test": 6})
    data = build_data(workspace, engine, cfg)  # real tiles of their own class: the plausible side
    train = data.splits["train"]
    assert all(e.target == 0.0 for e in train if e.expert)
    assert any(e.target == 1.0 and not e.expert for e in train) and any(e.target == 0.0 and not e.expert for e in train)
    assert data.manifest["one_sided"] == "every one of the 12 rated samples is judged implausible by its raters"
    # and a model trains on it and is registered
    version = train_reward(workspace, engine, RewardConfig(backbone="test_resnet", data_min_samples=10,
                                                           train_epochs=1, train_batch_size=8), progress=False)
    assert version.data_manifest["one_sided"] and registered(engine) == 1


def test_weak_labels_pair_each_real_tile_with_its_own_and_another_class(workspace, engine):
    truth = toy_workspace(workspace, engine, n=40, tiles=True)
    data = build_data(workspace, engine, RewardConfig(backbone="test_resnet", data_min_samples=10,
                                                      data_weak_share=0.5))
    with Session(engine) as s:
        tiles = {t.id: t for t in s.exec(select(Tile)).all()}
    for split, examples in data.splits.items():
        expert = [e for e in examples if e.expert]
        weak = [e for e in examples if not e.expert]
        assert abs(len(weak) - len(expert)) <= 1  # share 0.5: as many weak as expert examples (whole pairs)
        for e in weak:
            assert tiles[e.item_id].split == split  # weak labels keep the ingest split
            own = CLASSES.index(tiles[e.item_id].class_name)
            assert e.target == float(e.class_id == own)
        by_tile: dict[int, list] = {}
        for e in weak:
            by_tile.setdefault(e.item_id, []).append((e.class_id, e.target))
        assert all(sorted(t for _, t in pairs) == [0.0, 1.0] for pairs in by_tile.values())
        classes_used = {CLASSES.index(tiles[tid].class_name) for tid in by_tile}
        assert len(by_tile) < 2 or classes_used == {0, 1}  # balanced over classes
    assert sum(len(v) for v in data.manifest["weak_tiles"].values()) == sum(
        not e.expert for v in data.splits.values() for e in v)
    assert len(truth) == sum(data.manifest["counts"][s]["expert"] for s in ("train", "val", "test"))
    off = build_data(workspace, engine, RewardConfig(backbone="test_resnet", data_min_samples=10, data_weak_share=0))
    assert all(e.expert for v in off.splits.values() for e in v)


def test_split_is_by_image_stratified_and_seeded(tmp_path, make_workspace):
    ws = make_workspace(f"sqlite:///{tmp_path / 'a.db'}")
    engine = make_engine(ws.database_url)
    from store.db import upgrade

    upgrade(engine)
    toy_workspace(ws, engine, n=100, tiles=False)
    cfg = RewardConfig(backbone="test_resnet", data_min_samples=10, data_weak_share=0)
    a, b = build_data(ws, engine, cfg), build_data(ws, engine, cfg)
    assert a.manifest == b.manifest
    c = build_data(ws, engine, RewardConfig(backbone="test_resnet", data_min_samples=10, data_weak_share=0, seed=1))
    assert c.manifest["samples"] != a.manifest["samples"]
    for split, share in (("val", 0.15), ("test", 0.15)):
        ex = a.splits[split]
        assert abs(len(ex) - 100 * share) <= 2
        assert 0 < sum(e.target for e in ex) < len(ex)  # both verdicts in each held-out split
    engine.dispose()


# ---------------------------------------------------------------- training, export, scoring


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A reward version trained on the toy task (SQLite; the store parts run on both backends above)."""
    from store.db import upgrade
    from store.workspace import Settings

    root = tmp_path_factory.mktemp("reward")
    ws = Workspace.create(root / "ws", Settings(classes=CLASSES, tile_size=32, control_share=0.0))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    truth = toy_workspace(ws, engine, n=160)
    version = train_reward(ws, engine, RewardConfig(**FAST), progress=False)
    yield ws, engine, version, dict(truth)
    engine.dispose()


def test_trained_on_a_separable_toy_it_ranks_held_out_samples(trained):
    ws, engine, version, _ = trained
    m = version.metrics
    assert m["roc_auc"] > 0.9, m
    assert m["n"] >= 20
    folder = ws.root / version.folder
    assert folder.name == str(version.id) and {p.name for p in folder.iterdir()} == {
        "model.safetensors", "config.json", "metrics.json", "data_manifest.json"}
    full = json.loads((folder / "metrics.json").read_text())
    assert full["test"]["expert"]["roc_auc"] == m["roc_auc"] and full["history"]
    manifest = json.loads((folder / "data_manifest.json").read_text())
    assert len(manifest["judgment_ids"]) == 2 * 160 and manifest == version.data_manifest
    assert not list(rewards_dir(ws).glob(".incoming-*"))


def test_export_and_reload_give_identical_outputs(trained):
    ws, engine, version, _ = trained
    model, config = load_folder(ws.root / version.folder)
    again, _ = load_folder(ws.root / version.folder)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    classes = torch.tensor([0, 1, 0, 1, 0, 1])
    assert torch.equal(model.probabilities(images, classes), again.probabilities(images, classes))
    assert float(model.temperature) == pytest.approx(version.metrics["temperature"])
    fn = load_reward(ws, engine, version.id, device="cpu")
    assert torch.allclose(fn(images, classes), model.probabilities(images, classes))
    with pytest.raises(PathloopError, match=r"takes \(B, 3, 32, 32\) images"):
        fn(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(PathloopError, match="class ids"):
        fn(images, torch.tensor([0, 1, 2, 0, 1, 0]))


def test_scoring_is_idempotent_and_feeds_the_queue(trained):
    ws, engine, version, truth = trained
    new = add_toy_samples(ws, engine, 30, seed=7)  # unrated samples the queue will serve
    first = score_samples(ws, engine, version.id, "all", batch_size=16, progress=False)
    with Session(engine) as s:
        n_samples = len(s.exec(select(Sample.id)).all())
        scores = s.exec(select(RewardScore).where(RewardScore.reward_id == version.id)).all()
    assert first.scored == n_samples == len(scores)
    again = score_samples(ws, engine, version.id, "all", batch_size=16, progress=False)
    assert (again.scored, again.skipped) == (0, n_samples)
    assert score_samples(ws, engine, version.id, "unscored", progress=False).scored == 0
    p = {r.sample_id: r.probability for r in scores}
    new_truth = dict(new)
    assert M.roc_auc([p[s] for s in new_truth], list(new_truth.values())) > 0.9

    annotator = add_annotators(engine, 1)[0]
    item = queue.next_item(ws, engine, annotator)
    open_samples = [sid for sid, _ in new]
    most_uncertain = min(open_samples, key=lambda sid: (abs(p[sid] - 0.5), sid))
    assert item.kind == "sample" and item.item_id == most_uncertain


# ---------------------------------------------------------------- the CLI and bad input


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_train_score_list_and_bad_inputs(tmp_path, capsys):
    from store.db import upgrade
    from store.workspace import Settings

    ws = Workspace.create(tmp_path / "ws", Settings(classes=CLASSES, tile_size=32))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    w = ["--workspace", ws.root]

    code, _, err = run_cli(capsys, "train-reward", *w, "--backbone", "test_resnet")
    assert code == 1 and "too few judgments to train a reward model: 0 samples" in err and "20 are needed" in err

    toy_workspace(ws, engine, n=60)
    fast = ["--backbone", "test_resnet", "--epochs", "3", "--data-min-samples", "10"]
    code, _, err = run_cli(capsys, "train-reward", *w, *fast[2:], "--backbone", "resnet_nope")
    assert code == 1 and err.count("\n") == 1 and "backbone 'resnet_nope' is not a timm model" in err
    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 64)
    code, _, err = run_cli(capsys, "train-reward", *w, *fast, "--weights", tmp_path / "bad.safetensors")
    assert code == 1 and "cannot be read" in err
    code, _, err = run_cli(capsys, "score", *w)
    assert code == 1 and "no reward version yet" in err
    assert registered(engine) == 0 and not [p for p in rewards_dir(ws).glob("*") if p.is_dir()]

    code, out, err = run_cli(capsys, "train-reward", *w, *fast)
    assert code == 0, err
    assert out.startswith("reward version 1: models/rewards/1 (test_resnet; held-out experts: n=")
    code, out, _ = run_cli(capsys, "score", *w, "--reward", "1")
    assert code == 0 and out.strip() == "reward version 1: 60 samples scored, 0 already scored"
    code, out, _ = run_cli(capsys, "score", *w, "--samples", "all")
    assert code == 0 and out.strip() == "reward version 1: 0 samples scored, 60 already scored"
    code, out, _ = run_cli(capsys, "reward", "list", *w)
    assert code == 0 and "\n*   1  test_resnet" in out and "    60" in out

    code, _, err = run_cli(capsys, "score", *w, "--reward", "9")
    assert code == 1 and "reward version 9 does not exist; known: 1" in err
    code, _, err = run_cli(capsys, "score", *w, "--samples", "some")
    assert code == 1 and "--samples 'some'" in err

    add_toy_samples(ws, engine, 2, seed=3, size=64)  # images of another size than the workspace tiles
    code, _, err = run_cli(capsys, "score", *w)
    assert code == 1 and "is 64x64 px; reward model 1 was trained on 32x32" in err
    with Session(engine) as s:
        assert len(s.exec(select(RewardScore)).all()) == 60  # nothing written by the refused run
    engine.dispose()


def test_sample_images_of_another_size_are_refused_for_training(tmp_path, make_workspace):
    from store.db import upgrade

    ws = make_workspace(f"sqlite:///{tmp_path / 'b.db'}")
    engine = make_engine(ws.database_url)
    upgrade(engine)
    truth = add_toy_samples(ws, engine, 12, size=64)
    a, b = add_annotators(engine, 2)
    for i, (sid, _) in enumerate(truth):
        judge(engine, sid, a, "plausible" if i % 2 else "implausible")
        judge(engine, sid, b, "plausible" if i % 2 else "implausible")
    data = build_data(ws, engine, RewardConfig(backbone="test_resnet", data_min_samples=10))
    with pytest.raises(PathloopError, match="is 64x64; expected 32x32"):
        ExampleSet(data.splits["train"], 32)
    with pytest.raises(PathloopError, match="is 64x64; expected 32x32"):
        train_reward(ws, engine, RewardConfig(backbone="test_resnet", data_min_samples=10), progress=False)
    assert registered(engine) == 0
    engine.dispose()
