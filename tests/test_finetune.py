"""Reward-weighted fine-tuning: the objective by hand, the loop, resume, lineage, bad input, 2 processes.

Tiny UNet (preset ``tiny``) on 16-px toy tiles, CPU, a few steps. The toy reward is the
redness of an image (a pure torch function), so fine-tuning on samples weighted by it
should make the generator's fresh samples redder.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, UNet2DModel
from PIL import Image as PILImage
from safetensors.torch import load_file
from sqlmodel import Session, select

from finetune.config import FinetuneConfig, PretrainConfig
from finetune.data import PairBatches
from finetune.losses import (
    kto_loss,
    kto_weights,
    pair_accuracy,
    preference_loss,
    reward_weighted_loss,
    sample_weights,
)
from finetune.pretrain import export_pipeline, make_noise_scheduler, pretrain
from finetune.registry import load_generator
from finetune.sample import sample_images
from finetune.train import finetune, weighted_samples
from finetune.unet import build_unet
from store.db import make_engine, upgrade
from store.errors import PathloopError
from store.generators import add_samples, incoming_folder, list_generators, register_generator
from store.images import encode
from store.ingest import import_tiles
from store.judgments import recount_ratings
from store.models import Annotator, Judgment, RewardVersion
from store.rewards import add_scores
from store.workspace import Settings, Workspace

SIZE = 16
CLASSES = ["red", "blue"]
COLOURS = {"red": (200, 60, 60), "blue": (60, 60, 200)}


# ---------------------------------------------------------------- the objective, by hand


def _batch():
    """Four one-channel 2-pixel tiles, two synthetic then two real, with pred - noise chosen by hand."""
    diff = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [1.0, 3.0]]).reshape(4, 1, 2, 1)
    noise = torch.randn(4, 1, 2, 1, generator=torch.Generator().manual_seed(0))
    return (noise + diff).requires_grad_(), noise


def touched(grad: torch.Tensor) -> list[bool]:
    """Which tiles of a ``(B, ...)`` gradient are not all zero."""
    return grad.flatten(1).abs().sum(1).gt(0).tolist()


def test_reward_weighted_loss_against_a_hand_worked_value():
    pred, noise = _batch()
    # per-tile errors (mean over pixels): 1, (4+0)/2 = 2 | real: (0+4)/2 = 2, (1+9)/2 = 5
    # synthetic (0.5·1 + 1·2)/2 = 1.25; real (2+5)/2 = 3.5; total 1.25 + 0.3·3.5 = 2.3
    out = reward_weighted_loss(pred, noise, torch.tensor([0.5, 1.0]), beta=0.3)
    assert out.synthetic.item() == pytest.approx(1.25)
    assert out.real.item() == pytest.approx(3.5)
    assert out.total.item() == pytest.approx(2.3)
    # weights 1 and beta 1: the sum of the two halves' F.mse_loss (pretraining's loss)
    ones = reward_weighted_loss(pred, noise, torch.ones(2), beta=1.0).total
    assert ones.item() == pytest.approx((F.mse_loss(pred[:2], noise[:2]) + F.mse_loss(pred[2:], noise[2:])).item())


def test_zero_weights_leave_only_the_real_term():
    pred, noise = _batch()
    out = reward_weighted_loss(pred, noise, torch.zeros(2), beta=0.3)
    assert out.synthetic.item() == 0 and out.total.item() == pytest.approx(0.3 * 3.5)
    out.total.backward()
    assert touched(pred.grad) == [False, False, True, True]


def test_beta_zero_leaves_only_the_weighted_term():
    pred, noise = _batch()
    out = reward_weighted_loss(pred, noise, torch.tensor([0.5, 1.0]), beta=0.0)
    assert out.total.item() == pytest.approx(1.25)
    out.total.backward()
    assert touched(pred.grad) == [True, True, False, False]


def test_preference_loss_against_a_hand_worked_value():
    pred, noise = _batch()  # tile 0 the plausible one, tile 1 its implausible partner, tiles 2-3 real
    # the parent's errors: 2 on both tiles of the pair (pred - noise = [2, 0] each)
    ref = noise[:2] + torch.tensor([[2.0, 0.0], [2.0, 0.0]]).reshape(2, 1, 2, 1)
    # Δ = (1 - 2) - (2 - 2) = -1; with κ = 2 the pair term is -log σ(1) = log(1 + e^-1)
    out = preference_loss(pred, noise, ref, pairs=1, kappa=2.0, beta=0.3)
    assert out.synthetic.item() == pytest.approx(math.log1p(math.exp(-1)))
    assert out.real.item() == pytest.approx(3.5)
    assert out.total.item() == pytest.approx(math.log1p(math.exp(-1)) + 0.3 * 3.5)
    assert pair_accuracy(pred, noise, ref, pairs=1).item() == 1.0
    out.total.backward()
    assert touched(pred.grad) == [True, True, True, True]
    # the gradient lowers the plausible tile's error and raises its partner's
    assert (pred.grad[0] * (pred - noise)[0]).sum() > 0 > (pred.grad[1] * (pred - noise)[1]).sum()
    # a model equal to its parent: Δ = 0, the pair term is log 2 whatever κ
    same = preference_loss(pred.detach(), noise, pred.detach()[:2], pairs=1, kappa=5000.0, beta=0.0)
    assert same.total.item() == pytest.approx(math.log(2))


def test_preference_loss_refuses_a_bad_layout():
    pred, noise = _batch()
    with pytest.raises(ValueError, match="pairs"):
        preference_loss(pred, noise, pred[:4].detach(), pairs=2, kappa=1.0, beta=0.3)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(pred, noise, pred[:1].detach(), pairs=1, kappa=1.0, beta=0.3)


def test_kto_loss_against_hand_worked_values():
    # Errors are the mean of (pred - noise)² over the tile; noise 0, so err = pred².
    noise = torch.zeros(3, 1, 1, 1)
    pred = torch.tensor([1.0, 2.0, 0.5]).reshape(3, 1, 1, 1).requires_grad_()  # 2 synthetic, 1 real
    ref = torch.tensor([2.0, 1.0]).reshape(2, 1, 1, 1)  # the parent's errors: 4 and 1
    # r = (κ/2)(ref - err) with κ = 2: [4 - 1, 1 - 4] = [3, -3]; z = max(0, mean r) = 0.
    # tile 0 plausible: 1 - σ(3 - 0); tile 1 implausible: 1 - σ(0 - (-3)); both 1 - σ(3) = 0.0474259
    out, right = kto_loss(pred, noise, ref, torch.tensor([True, False]), kappa=2.0, beta=2.0)
    v = 1 - 1 / (1 + math.exp(-3))
    assert out.synthetic.item() == pytest.approx(v) and out.real.item() == pytest.approx(0.25)
    assert out.total.item() == pytest.approx(v + 2.0 * 0.25) and right.item() == 1.0
    out.total.backward()
    # the gradient lowers the plausible tile's error and raises the implausible one's
    assert pred.grad[0].item() > 0 > pred.grad[1].item()
    # z > 0: errors [1, 1] against the parent's [2, 2] give r = [1, 1] and z = 1, so each term is 1 - σ(0) = 0.5;
    # with λ_D = 2, λ_U = 1 the synthetic term is (2 × 0.5 + 1 × 0.5) / 2 = 0.75, and neither tile is past z
    pred2 = torch.tensor([1.0, 1.0, 0.0]).reshape(3, 1, 1, 1)
    out2, right2 = kto_loss(pred2, noise, torch.tensor([2.0 ** 0.5] * 2).reshape(2, 1, 1, 1),
                            torch.tensor([True, False]), kappa=2.0, beta=0.0, lambda_d=2.0, lambda_u=1.0)
    assert out2.synthetic.item() == pytest.approx(0.75) and right2.item() == 0.0
    # a model equal to its parent: r = 0 = z, every term 1 - σ(0) = 0.5 (times its λ)
    same, _ = kto_loss(pred.detach(), noise, pred.detach()[:2], torch.tensor([True, True]), kappa=5000.0, beta=0.0)
    assert same.total.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reference"):
        kto_loss(pred, noise, ref[:1], torch.tensor([True, False]), kappa=2.0, beta=0.0)
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(pred, noise, ref, torch.tensor([True, False, True]), kappa=2.0, beta=0.0)


def test_kto_weights_weigh_the_rarer_verdict_up():
    assert kto_weights(4, 12) == (3.0, 1.0)  # λ_D n_D = 12 = λ_U n_U
    assert kto_weights(12, 4) == (1.0, 3.0)
    assert kto_weights(5, 5) == (1.0, 1.0)
    assert kto_weights(0, 9) == (1.0, 1.0)  # every tile implausible: nothing to balance


def test_pairs_are_drawn_in_proportion_to_each_class_s_pairs():
    # class 0: 10 plausible x 10 implausible = 100 pairs; class 1: 10 x 1 = 10 pairs
    groups = [(list(range(0, 10)), list(range(10, 20))), (list(range(20, 30)), [30])]
    batches = PairBatches(groups, global_pairs=8, seed=3)
    win, lose = zip(*(batches.indices(p) for p in range(500)))
    win, lose = np.concatenate(win), np.concatenate(lose)
    first = win < 10
    assert np.all(first == (lose < 20)), "a pair mixes two classes"
    assert np.all(lose[~first] == 30) and np.all((win[~first] >= 20) & (win[~first] < 30))
    assert abs(first.mean() - 100 / 110) < 0.03  # 4000 pairs: a uniform choice of class would give 0.5
    # a pure function of the position; two processes split one global batch between them
    again = batches.indices(7)
    assert all(np.array_equal(a, b) for a, b in zip(again, PairBatches(groups, 8, seed=3).indices(7)))
    halves = [batches.indices(7, rank, 2) for rank in (0, 1)]
    assert sorted(np.concatenate([h[0] for h in halves])) == sorted(again[0])
    with pytest.raises(ValueError, match="at least one plausible and one implausible"):
        PairBatches([([1, 2], [])], 4, 0)


def test_sample_weights_by_source_and_mode():
    nan = float("nan")
    experts = torch.tensor([nan, 0.5, nan, 1.0])
    reward = torch.tensor([0.2, nan, 0.9, 0.1])  # the experts' verdict wins where there is one
    assert sample_weights(experts, reward, "reward").tolist() == pytest.approx([0.2, 0.5, 0.9, 1.0])
    assert sample_weights(experts, reward, "binary", threshold=0.5).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert sample_weights(experts, reward, "normalized").tolist() == pytest.approx(
        [0.2 / 0.65, 0.5 / 0.65, 0.9 / 0.65, 1.0 / 0.65])
    assert sample_weights(experts, reward, "none").tolist() == [0.0, 0.0, 0.0, 0.0]
    assert sample_weights(torch.full((2,), nan), torch.full((2,), nan), "none").tolist() == [0.0, 0.0]
    zeros = torch.zeros(3)
    assert sample_weights(torch.full((3,), nan), zeros, "normalized").tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="neither"):
        sample_weights(torch.tensor([nan]), torch.tensor([nan]))


def test_config_checks():
    with pytest.raises(PathloopError, match=r"^beta must be >= 0 \(got -0.1\)$"):
        FinetuneConfig(beta=-0.1)
    with pytest.raises(PathloopError, match="weighting must be one of reward, binary, normalized"):
        FinetuneConfig(weighting="softmax")
    with pytest.raises(PathloopError, match="samples must be all or a round number"):
        FinetuneConfig(samples="latest")
    assert FinetuneConfig(samples=3).sample_selection == 3 and FinetuneConfig().beta == 0.3


# ---------------------------------------------------------------- a workspace with a parent and samples


def _noisy(rng, colour) -> np.ndarray:
    return np.clip(np.array(colour) + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def redness(images: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Toy reward: ``(B, 3, H, W)`` uint8 → ``(B,)`` in [0, 1], 1 for pure red, 0 for pure blue."""
    x = images.float() / 255
    return ((x[:, 0] - x[:, 2]).mean(dim=(1, 2)) + 1) / 2


@pytest.fixture
def ft_ws(tmp_path):
    """16-px red and blue train tiles, an untrained parent, and 16 samples of round 1 (half red, half blue)."""
    ws = Workspace.create(tmp_path / "ws", Settings(classes=CLASSES, tile_size=SIZE))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (tmp_path / "crops" / c).mkdir(parents=True)
        for i in range(12):
            PILImage.fromarray(_noisy(rng, COLOURS[c])).save(tmp_path / "crops" / c / f"{i}.png")
    import_tiles(ws, engine, tmp_path / "crops")
    parent = register_parent(ws, engine)
    items = [(encode(_noisy(rng, COLOURS["red" if i % 2 == 0 else "blue"])), CLASSES[(i // 2) % 2], i)
             for i in range(16)]
    add_samples(ws, engine, parent.id, items, sampler="ddim", steps=2, guidance=1.0, round_number=1)
    yield ws, engine, parent
    engine.dispose()


def register_parent(ws, engine, size: int = SIZE):
    torch.manual_seed(0)
    folder = incoming_folder(ws)
    export_pipeline(build_unet("tiny", size, len(CLASSES)), make_noise_scheduler(PretrainConfig()), folder,
                    {"kind": "pretrained", "classes": CLASSES, "tile_size": size})
    return register_generator(ws, engine, folder, kind="pretrained", config={"classes": CLASSES})


def judge_all(engine, sample_ids, verdicts) -> list[int]:
    """Each sample judged by one rater per verdict in ``verdicts``; returns the judgment ids."""
    with Session(engine) as s:
        start = len(s.exec(select(Annotator.id)).all())
        raters = [Annotator(username=f"rater{start + i}") for i in range(len(verdicts))]
        s.add_all(raters)
        s.flush()
        rows = [Judgment(sample_id=sid, annotator_id=r.id, verdict=v, request_id=f"{sid}-{r.id}")
                for sid in sample_ids for r, v in zip(raters, verdicts)]
        s.add_all(rows)
        s.commit()
        ids = [j.id for j in rows]
    recount_ratings(engine)
    return ids


def tiny(**kw) -> FinetuneConfig:
    base = dict(train_steps=2, train_batch_size=4, checkpoint_every=1, train_learning_rate=1e-3, samples="1")
    return FinetuneConfig(**{**base, **kw})


def fresh_redness(ws, engine, version_id: int) -> tuple[float, float]:
    """Mean toy reward of 8 fresh samples of class red and 8 of class blue (same seeds for every version)."""
    gen = load_generator(ws, engine, version_id, device="cpu")
    images = sample_images(gen.unet, gen.scheduler_config, [0] * 8 + [1] * 8, list(range(16)), null_id=gen.null_id,
                           sampler="ddim", steps=5)
    r = redness(torch.from_numpy(images).permute(0, 3, 1, 2))
    return r[:8].mean().item(), r[8:].mean().item()


def unet_weights(ws, version) -> dict[str, torch.Tensor]:
    return load_file(ws.root / version.folder / "unet" / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------- the loop


def learned_parent(ws, engine):
    """A parent that has begun to learn the tiles' colours (an untrained one makes grey noise)."""
    return pretrain(ws, engine, PretrainConfig(train_steps=30, train_batch_size=8, train_learning_rate=3e-3,
                                               train_lr_warmup_steps=0, ema_decay=0.1), progress=False)


def learns_redness(ws, engine, parent, **objective):
    """Fine-tune ``parent`` 8 steps on the redness reward; the child, after checking class "blue" turned red."""
    cfg = tiny(train_steps=8, train_batch_size=8, train_learning_rate=3e-3, preference_beta=50.0, beta=0.1,
               ema_decay=0.1, checkpoint_every=8, **objective)
    child = finetune(ws, engine, cfg, redness, parent_id=parent.id, reward_id=None, round_number=1, progress=False)
    before, after = fresh_redness(ws, engine, parent.id), fresh_redness(ws, engine, child.id)
    assert after[1] > before[1] + 0.05, (before, after)  # even class "blue" turns red
    return child


def test_toy_reward_rises_and_the_child_records_its_lineage(ft_ws):
    ws, engine, parent = ft_ws
    # Two samples (ids 1 and 2: a red one and a blue one) have enough ratings: the experts decide
    # their weight (the blue one is called plausible, against the reward); the rest get redness.
    used = judge_all(engine, [1, 2], ["plausible", "plausible"])
    judge_all(engine, [3], ["implausible"])  # one rating: below the minimum, the reward decides
    parent = learned_parent(ws, engine)
    cfg = tiny(train_steps=8, train_batch_size=8, train_learning_rate=3e-3, weighting="binary", beta=0.1,
               ema_decay=0.1, checkpoint_every=8)
    child = finetune(ws, engine, cfg, redness, parent_id=parent.id, reward_id=None, round_number=1, progress=False)

    before, after = fresh_redness(ws, engine, parent.id), fresh_redness(ws, engine, child.id)
    assert after[1] > before[1] + 0.05, (before, after)  # even class "blue" turns red
    assert sum(after) / 2 > sum(before) / 2 + 0.03, (before, after)

    assert (child.kind, child.parent_id, child.round_number) == ("finetuned", parent.id, 1)
    c = child.config
    assert c["reward_id"] is None and c["beta"] == 0.1 and c["weighting"] == "binary"
    by_id = {s["id"]: s for s in c["samples"]}
    assert sorted(by_id) == list(range(1, 17))
    assert by_id[1]["source"] == by_id[2]["source"] == "experts" and by_id[2]["weight"] == 1.0
    assert by_id[3]["source"] == "reward" and by_id[3]["weight"] == 1.0  # red sample, redness >= 0.5
    assert by_id[4]["source"] == "reward" and by_id[4]["weight"] == 0.0  # blue sample
    assert c["weight_sources"] == {"experts": 2, "reward": 14, "none": 0}
    assert c["judgment_ids"] == sorted(used)
    assert c["train_tiles"] > 0 and "train_tile_ids" not in c
    for k in ("final_loss", "final_loss_synthetic", "final_loss_real", "final_mean_weight"):
        assert math.isfinite(c[k]), k
    assert c["final_loss"] == pytest.approx(c["final_loss_synthetic"] + 0.1 * c["final_loss_real"], rel=1e-5)

    folder = ws.root / child.folder
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    assert unet.config.num_class_embeds == 3 and unet.config.sample_size == SIZE
    assert DDPMPipeline.from_pretrained(folder).scheduler.config.num_train_timesteps == 1000
    info = json.loads((folder / "pathloop.json").read_text())
    assert len(info["train_tile_ids"]) == c["train_tiles"] and info["parent_id"] == parent.id
    assert not torch.equal(unet_weights(ws, parent)["conv_in.weight"], unet_weights(ws, child)["conv_in.weight"])
    assert not list((ws.models_dir / "generators").glob(".incoming-*"))


def test_preference_objective_learns_from_pairs_and_records_them(ft_ws):
    ws, engine, parent = ft_ws
    # Every sample weighted by redness: per class the red samples are the plausible side of a
    # pair, the blue ones the implausible side. Class "blue" must turn red, as with the weights.
    parent = learned_parent(ws, engine)
    child = learns_redness(ws, engine, parent, objective="preference")
    c = child.config
    assert (c["objective"], c["preference_beta"]) == ("preference", 50.0)
    assert c["preference_pairs"] == {"red": {"plausible": 4, "implausible": 4},
                                     "blue": {"plausible": 4, "implausible": 4}}
    assert 0 <= c["final_pair_accuracy"] <= 1 and "final_mean_weight" not in c
    assert c["final_loss"] == pytest.approx(c["final_loss_synthetic"] + 0.1 * c["final_loss_real"], rel=1e-5)
    # resumed from a checkpoint, the same weights: the frozen reference is the parent again
    resumes_to_the_same_weights(ws, engine, parent, "p", objective="preference")


def test_kto_objective_learns_from_unpaired_verdicts_and_records_them(ft_ws):
    ws, engine, parent = ft_ws
    parent = learned_parent(ws, engine)
    child = learns_redness(ws, engine, parent, objective="kto")  # unpaired verdicts move it as pairs do
    c = child.config
    assert c["objective"] == "kto" and c["kto"] == {"plausible": 8, "implausible": 8, "lambda_plausible": 1.0,
                                                   "lambda_implausible": 1.0}
    assert 0 <= c["final_kto_accuracy"] <= 1 and math.isfinite(c["final_loss"])
    # every tile implausible (a weak generator's round): no pairs, yet KTO trains, pushing away from them
    everything_blue = lambda images, ids: torch.zeros(len(ids))  # noqa: E731
    weak = finetune(ws, engine, tiny(objective="kto", preference_beta=50.0, run_name="all-implausible"),
                    everything_blue, parent_id=parent.id, reward_id=None, progress=False)
    assert weak.config["kto"]["plausible"] == 0 and weak.config["kto"]["implausible"] == 16
    # resumed from a checkpoint, the same weights: the frozen reference is the parent again
    resumes_to_the_same_weights(ws, engine, parent, "k", objective="kto")


def test_preference_objective_needs_both_kinds_in_one_class(ft_ws):
    ws, engine, parent = ft_ws
    everything_red = lambda images, ids: torch.ones(len(ids))  # noqa: E731
    with pytest.raises(PathloopError, match=r"needs a plausible and an implausible sample of one class; "
                                            r"\(plausible, implausible\) per class: red 8/0, blue 8/0"):
        finetune(ws, engine, tiny(objective="preference"), everything_red, parent_id=parent.id, reward_id=None,
                 progress=False)
    assert len(list_generators(engine)) == 1
    with pytest.raises(PathloopError, match="objective preference needs feedback"):
        tiny(objective="preference", weighting="none")
    with pytest.raises(PathloopError, match="objective must be one of weighted, preference, kto"):
        tiny(objective="dpo")
    with pytest.raises(PathloopError, match="objective kto needs feedback"):
        tiny(objective="kto", weighting="none")


class Counter:
    """A reward giving every tile of a call the same value: ``start + step x calls so far`` (clipped to [0, 1])."""

    def __init__(self, start: float, step: float):
        self.start, self.step, self.calls = start, step, 0

    def __call__(self, images, class_ids):
        self.calls += 1
        return torch.full((len(class_ids),), float(np.clip(self.start + self.step * self.calls, 0, 1)))


def test_selection_exports_the_best_candidate_and_stops_early(ft_ws):
    ws, engine, parent = ft_ws
    kw = dict(parent_id=parent.id, reward_id=None, progress=False)
    check = dict(select_every=2, select_per_class=2, select_steps=2, checkpoint_every=4)
    # The reward rises with every call (the first weighs the samples): the last candidate wins, and it is
    # exactly what the same run without selection exports (checking draws nothing from training's randomness).
    plain = finetune(ws, engine, tiny(run_name="plain", train_steps=4, checkpoint_every=4), Counter(0.2, 0.1), **kw)
    rising = finetune(ws, engine, tiny(run_name="rising", train_steps=4, **check), Counter(0.2, 0.1), **kw)
    a, b = unet_weights(ws, plain), unet_weights(ws, rising)
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = rising.config["selection"]
    assert [h["step"] for h in r["history"]] == [0, 2, 4]
    assert [h["reward_p"] for h in r["history"]] == pytest.approx([0.4, 0.5, 0.6])
    assert r["history"][0]["per_class"] == pytest.approx({"red": 0.4, "blue": 0.4})
    assert (r["selected_step"], r["stopped_early_at"], r["per_class"], r["sampler"]) == (4, None, 2, "ddpm")
    assert "selection" not in plain.config
    # It falls with every call: no candidate beats the parent, whose weights the child gets; after two
    # checks without a better score the run stops (at step 4 of 10), checkpointed there.
    falling = finetune(ws, engine, tiny(run_name="falling", train_steps=10, select_patience=2, **check),
                       Counter(0.9, -0.1), **kw)
    f = falling.config["selection"]
    assert [h["step"] for h in f["history"]] == [0, 2, 4] and (f["selected_step"], f["stopped_early_at"]) == (0, 4)
    p, c = unet_weights(ws, parent), unet_weights(ws, falling)
    assert all(torch.equal(p[k], c[k]) for k in p)
    assert (ws.runs_dir / "falling" / "checkpoints" / "checkpoint-4").is_dir()
    # Resumed from a checkpoint between two checks: the same checks, the same child.
    res = dict(train_steps=4, select_every=2, select_per_class=2, select_steps=2, checkpoint_every=1)
    straight = finetune(ws, engine, tiny(run_name="s1", **res), redness, **kw)
    assert finetune(ws, engine, tiny(run_name="s2", **res), redness, stop_after=3, **kw) is None
    resumed = finetune(ws, engine, tiny(run_name="s2", **res), redness, resume="latest", **kw)
    a, b = unet_weights(ws, straight), unet_weights(ws, resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.config["selection"]["history"] == straight.config["selection"]["history"]
    # no reward model to select with: refused before anything is written
    with pytest.raises(PathloopError, match="select_every needs a reward model"):
        finetune(ws, engine, tiny(run_name="none", select_every=2), None, reward_id=None, parent_id=parent.id,
                 progress=False)
    assert not (ws.runs_dir / "none").exists()
    with pytest.raises(PathloopError, match="select_every needs feedback"):
        tiny(select_every=2, weighting="none")
    with pytest.raises(PathloopError, match="select_sampler must be ddim or ddpm"):
        tiny(select_sampler="euler")


def test_round_1_guard_falls_back_to_the_last_step_when_the_reward_model_cannot_decide(ft_ws):
    ws, engine, parent = ft_ws
    kw = dict(parent_id=parent.id, progress=False)
    check = dict(train_steps=4, select_every=2, select_per_class=2, select_steps=2, checkpoint_every=4,
                 select_patience=1)
    # the same run without selection, weighted by the same reward (its first call weighs the samples)
    plain = finetune(ws, engine, tiny(run_name="plain", train_steps=4, checkpoint_every=4), Counter(0.4955, -0.0001),
                     reward_id=None, **kw)
    # Scores that barely move (0.4950, 0.4951, ...: a first round's reward model): the falling-by-a-hair
    # scores would stop the run and keep the parent; within min_gain they decide nothing: the last step.
    flat = finetune(ws, engine, tiny(run_name="flat", **check), Counter(0.4955, -0.0001), reward_id=None, **kw)
    f = flat.config["selection"]
    assert [h["step"] for h in f["history"]] == [0, 2, 4] and f["stopped_early_at"] is None
    assert f["rule"].startswith("fallback: the checks' scores spread by 0.0002 < min_gain 0.01")
    assert f["selected_step"] == 4 and f["spread"] == pytest.approx(0.0002, abs=1e-6)
    a, b = unet_weights(ws, plain), unet_weights(ws, flat)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the last step's EMA weights, as without selection
    # The same scores with the guard off (min_gain 0): the reward model decides, the parent is kept.
    trusted = finetune(ws, engine, tiny(run_name="trusted", select_min_gain=0.0, **check), Counter(0.4955, -0.0001),
                       reward_id=None, **kw)
    t = trusted.config["selection"]
    assert (t["rule"], t["selected_step"], t["stopped_early_at"]) == ("reward", 0, 2)
    # A reward version whose held-out ROC-AUC is below min_auc: no check runs, the last step is the child.
    rid = register_reward_version(ws, engine, CLASSES)
    with Session(engine) as s:
        row = s.get(RewardVersion, rid)
        row.metrics = {"roc_auc": 0.6}
        s.add(row)
        s.commit()
    weak = finetune(ws, engine, tiny(run_name="weak", **check), Counter(0.4955, -0.0001), reward_id=rid, **kw)
    w = weak.config["selection"]
    assert w["history"] == [] and w["selected_step"] == 4
    assert w["rule"] == (f"fallback: reward version {rid}'s held-out ROC-AUC 0.600 < min_auc 0.65; "
                         "the last step's weights")
    a, b = unet_weights(ws, plain), unet_weights(ws, weak)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PathloopError, match="select_min_gain must be in"):
        tiny(select_min_gain=-0.1)


def test_resume_equals_an_uninterrupted_run(ft_ws):
    ws, engine, parent = ft_ws
    cfg = dict(train_steps=4, checkpoint_every=2, weighting="normalized")
    kw = dict(parent_id=parent.id, reward_id=None, progress=False)
    logged = dict(log_with="tensorboard") if importlib.util.find_spec("tensorboard") else {}
    straight = finetune(ws, engine, tiny(run_name="a", **cfg, **logged), redness, **kw)
    if logged:  # tracker logging changes nothing in the weights
        assert list((ws.runs_dir / "a" / "logs").rglob("events.out.tfevents.*"))
    stopped = finetune(ws, engine, tiny(run_name="b", **cfg), redness, stop_after=2, **kw)
    assert stopped is None and len(list_generators(engine)) == 2
    assert (ws.runs_dir / "b" / "checkpoints" / "checkpoint-2").is_dir()
    # Judgments arriving meanwhile do not change a resumed run: it trains on the data it started with.
    judge_all(engine, range(1, 17), ["implausible", "implausible"])
    resumed = finetune(ws, engine, tiny(run_name="b", **cfg), redness, resume="latest", **kw)
    a, b = unet_weights(ws, straight), unet_weights(ws, resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.config["samples"] == straight.config["samples"]
    with pytest.raises(PathloopError, match=r"made with beta = 0.3, not 0.5"):
        finetune(ws, engine, tiny(run_name="b", beta=0.5, **cfg), redness, resume="latest", **kw)
    with pytest.raises(PathloopError, match="already has checkpoints; pass --resume latest"):
        finetune(ws, engine, tiny(run_name="b", **cfg), redness, **kw)


def test_without_a_reward_function_the_stored_scores_weigh_the_samples(ft_ws):
    ws, engine, _ = ft_ws
    with Session(engine) as s:
        rv = RewardVersion(folder="models/rewards/x", backbone="test_resnet")
        s.add(rv)
        s.commit()
        rid = rv.id
    add_scores(engine, rid, [(sid, sid / 100) for sid in range(2, 17)])
    used = judge_all(engine, [1], ["plausible", "implausible"])
    samples = weighted_samples(ws, engine, tiny(), None, rid)
    assert [(x.sample_id, x.source, x.plausibility) for x in samples[:3]] == [
        (1, "experts", 0.5), (2, "reward", pytest.approx(0.02)), (3, "reward", pytest.approx(0.03))]
    assert samples[0].judgment_ids == tuple(used) and samples[1].judgment_ids == ()


class OtherClassesReward:
    """A reward function made for another workspace (what ``RewardFunction`` carries)."""

    classes = ["tumour", "stroma"]
    reward_id = 7
    image_size = SIZE

    def __call__(self, images, class_ids):
        return redness(images)


def test_bad_input_is_refused_and_nothing_is_registered(ft_ws):
    ws, engine, parent = ft_ws
    kw = dict(parent_id=parent.id, progress=False)
    with pytest.raises(PathloopError, match=r"^reward version 7 was trained for classes \['tumour', 'stroma'\] "
                                            r"but the workspace has \['red', 'blue'\]$"):
        finetune(ws, engine, tiny(), OtherClassesReward(), reward_id=7, **kw)
    judge_all(engine, [1], ["plausible", "implausible"])
    with pytest.raises(PathloopError, match=r"15 of 16 samples \(first: sample 2\) have fewer than 2 current "
                                            r"plausible/implausible judgments and no reward score"):
        finetune(ws, engine, tiny(), None, reward_id=None, **kw)
    with pytest.raises(PathloopError, match="round 5 has no samples to fine-tune on"):
        finetune(ws, engine, tiny(samples="5"), redness, reward_id=None, **kw)
    with pytest.raises(PathloopError, match=r"^beta must be >= 0 \(got -1"):
        finetune(ws, engine, tiny(beta=-1), redness, reward_id=None, **kw)
    other = register_parent(ws, engine, size=32)
    with pytest.raises(PathloopError, match=f"generator version {other.id} makes 32 px tiles; "
                                            "the workspace tile_size is 16"):
        finetune(ws, engine, tiny(), redness, reward_id=None, parent_id=other.id, progress=False)
    with pytest.raises(PathloopError, match="generator version 99 does not exist"):
        finetune(ws, engine, tiny(), redness, reward_id=None, parent_id=99, progress=False)
    assert [g.kind for g in list_generators(engine)] == ["pretrained", "pretrained"]
    assert not list((ws.models_dir / "generators").glob(".incoming-*"))


# ---------------------------------------------------------------- through the CLI, on two processes


def register_reward_version(ws, engine, classes) -> int:
    """An untrained tiny reward model registered as a version (what the CLI loads)."""
    from reward.config import RewardConfig
    from reward.model import RewardModel, model_config, save_folder
    from store.rewards import incoming_folder as reward_folder
    from store.rewards import register_reward

    torch.manual_seed(0)
    model = RewardModel("test_resnet", len(classes)).eval()
    folder = reward_folder(ws)
    config = model_config(RewardConfig(backbone="test_resnet"), classes, SIZE)
    save_folder(model, config, folder)
    return register_reward(ws, engine, folder, backbone="test_resnet", config=config, metrics={},
                           data_manifest={}).id


def cpu_env() -> tuple[dict, str]:
    """The environment of a CPU-only subprocess (no workspace variables) and the venv's bin folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHLOOP_")}
    env.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    return env, os.path.dirname(sys.executable)


def finetune_on_two_processes(ws, reward_id: int, *options: str) -> subprocess.CompletedProcess:
    """`pathloop finetune` of round 1's samples (2 steps) under `accelerate launch` with 2 CPU processes."""
    env, bindir = cpu_env()
    # `accelerate launch --cpu` always starts one process; several CPU processes take --multi_gpu
    # with ACCELERATE_USE_CPU (accelerate issue #2741), which torchrun runs on the gloo backend.
    return subprocess.run([os.path.join(bindir, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "pathloop.cli", "finetune", "-w", str(ws.root), "--from", "latest", "--reward",
                           str(reward_id), "--samples", "1", "--steps", "2", "--batch-size", "2",
                           "--checkpoint-every", "1", "--round", "1", *options],
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_finetune_on_two_processes_and_its_bad_input(ft_ws):
    ws, engine, parent = ft_ws
    rid = register_reward_version(ws, engine, CLASSES)
    other = register_reward_version(ws, engine, ["tumour", "stroma"])
    env, bindir = cpu_env()
    p = finetune_on_two_processes(ws, rid, "--select-every", "1", "--select-per-class", "2", "--select-steps", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "fine-tuned from version 1 with reward version 1" in p.stdout
    assert "selection: the child is step " in p.stdout and "on 2 fresh tiles per class, of 3 checks" in p.stdout
    versions = list_generators(engine)
    assert [v.kind for v in versions] == ["pretrained", "finetuned"]  # registered once, by the main process
    child = versions[-1]
    assert child.config["processes"] == 2 and child.config["reward_id"] == rid and child.parent_id == parent.id
    assert child.config["weight_sources"] == {"experts": 0, "reward": 16, "none": 0}
    # both processes checked the same candidates and took the same decision (the scores are averaged)
    assert [h["step"] for h in child.config["selection"]["history"]] == [0, 1, 2]
    UNet2DModel.from_pretrained(ws.root / child.folder, subfolder="unet")

    bad = subprocess.run([os.path.join(bindir, "pathloop"), "finetune", "-w", str(ws.root), "--from", "1",
                          "--reward", str(other), "--steps", "1"], capture_output=True, text=True, env=env,
                         timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1, bad.stderr
    assert lines[0] == (f"pathloop: error: reward version {other} was trained for classes ['tumour', 'stroma'] "
                        "but the workspace has ['red', 'blue']")
    assert len(list_generators(engine)) == 2


@pytest.mark.parametrize("objective", ["weighted", "preference"])
def test_data_workers_change_nothing_but_speed(ft_ws, objective):
    ws, engine, parent = ft_ws
    kw = dict(parent_id=parent.id, reward_id=None, progress=False)
    opts = dict(objective=objective, train_steps=3, checkpoint_every=3, train_gradient_accumulation_steps=2)
    here = finetune(ws, engine, tiny(run_name=f"{objective}-here", data_workers=0, **opts), redness, **kw)
    ahead = finetune(ws, engine, tiny(run_name=f"{objective}-ahead", data_workers=2, **opts), redness, **kw)
    a, b = unet_weights(ws, here), unet_weights(ws, ahead)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert here.config["train_tiles"] == ahead.config["train_tiles"] > 0


def resumes_to_the_same_weights(ws, engine, parent, prefix: str, **opts) -> None:
    """4 steps straight, and 2 steps stopped then resumed from the checkpoint, give equal weights."""
    kw = dict(parent_id=parent.id, reward_id=None, progress=False)
    opts = dict(preference_beta=50.0, train_steps=4, checkpoint_every=2, **opts)
    straight = finetune(ws, engine, tiny(run_name=f"{prefix}1", **opts), redness, **kw)
    assert finetune(ws, engine, tiny(run_name=f"{prefix}2", **opts), redness, stop_after=2, **kw) is None
    resumed = finetune(ws, engine, tiny(run_name=f"{prefix}2", **opts), redness, resume="latest", **kw)
    a, b = unet_weights(ws, straight), unet_weights(ws, resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
