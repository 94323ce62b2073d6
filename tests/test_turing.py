"""Visual Turing test in the store: campaigns, answers, undo, and hand-worked statistics."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from alembic import command
from sqlalchemy import inspect, update
from sqlmodel import Session, select

from store import turing
from store.agreement import fleiss_kappa
from store.db import _alembic_config, make_engine, upgrade
from store.errors import PathloopError
from store.models import Image, Judgment, TuringAnswer, TuringCampaign, TuringItem
from store.turing import CampaignConfig
from store.turing_results import answers_frame, fleiss_kappa_many, kappa_with_interval, results
from tests.store_rows import add_annotators, add_samples, add_tiles

from conftest import BACKENDS, database_url


def _campaign(workspace, engine, name="t1", per_class=1, real_share=0.5, model=None, **kw) -> int:
    if model is None:
        gid = _generator_of(engine, add_samples(engine, 6)[0])
        model = str(gid)
    return turing.create_campaign(workspace, engine, CampaignConfig(name=name, model=model, per_class=per_class,
                                                                     real_share=real_share, **kw))


def _generator_of(engine, sample_id: int) -> int:
    from store.models import Sample

    with Session(engine) as s:
        return s.get(Sample, sample_id).generator_id


def _items(engine, campaign_id: int) -> list[TuringItem]:
    with Session(engine) as s:
        return list(s.exec(select(TuringItem).where(TuringItem.campaign_id == campaign_id)
                           .order_by(TuringItem.position)).all())


def _answer(engine, who: int, item: int, answer: str, confidence: int = 2, request_id: str | None = None):
    return turing.record_answer(engine, who, item_id=item, answer=answer, confidence=confidence, seconds=1.5,
                                request_id=request_id or uuid.uuid4().hex)


def test_campaign_mixes_real_val_test_tiles_never_train(workspace, engine):
    add_tiles(engine, 20, split="train", tag="tr")
    val = set(add_tiles(engine, 4, split="val", tag="va"))
    test = set(add_tiles(engine, 4, split="test", tag="te"))
    cid = _campaign(workspace, engine, per_class=2, real_share=0.5)
    items = _items(engine, cid)
    real = [i for i in items if i.tile_id is not None]
    synthetic = [i for i in items if i.sample_id is not None]
    assert len(synthetic) == 4 and len(real) == 4  # 2 per class each
    assert {i.tile_id for i in real} <= val | test
    assert sorted(i.class_name for i in real) == sorted(i.class_name for i in synthetic)
    assert [i.position for i in items] == list(range(8))
    with Session(engine) as s:
        assert s.get(TuringCampaign, cid).active is False


def test_campaign_draw_is_seeded(workspace, engine):
    add_tiles(engine, 12, split="test")
    gid = _generator_of(engine, add_samples(engine, 12)[0])
    a = _campaign(workspace, engine, name="a", model=str(gid), per_class=2, seed=7)
    b = _campaign(workspace, engine, name="b", model=str(gid), per_class=2, seed=7)
    key = [(i.sample_id, i.tile_id) for i in _items(engine, a)]
    assert key == [(i.sample_id, i.tile_id) for i in _items(engine, b)]


@pytest.mark.parametrize("change, message", [
    ({"model": "99"}, "generator version 99 does not exist"),
    ({"per_class": 5}, "has 3 samples of class"),
    ({"real_share": 0.9}, "real val/test tiles of class"),
])
def test_campaign_bad_input_writes_nothing(workspace, engine, change, message):
    add_tiles(engine, 4, split="test")
    add_tiles(engine, 40, split="train", tag="tr")
    gid = _generator_of(engine, add_samples(engine, 6)[0])
    kw = {"model": str(gid), "per_class": 1, "real_share": 0.5} | change
    with pytest.raises(PathloopError, match=message):
        _campaign(workspace, engine, **kw)
    with Session(engine) as s:
        assert s.exec(select(TuringCampaign)).all() == [] and s.exec(select(TuringItem)).all() == []


def test_campaign_refuses_tiles_of_another_size(workspace, engine):
    add_tiles(engine, 4, split="test")
    gid = _generator_of(engine, add_samples(engine, 4)[0])
    with Session(engine) as s:
        s.exec(update(Image).where(Image.path.like("images/s%")).values(width=64, height=64))
        s.commit()
    with pytest.raises(PathloopError, match="synthetic tiles are 64x64 px, real ones 32x32"):
        _campaign(workspace, engine, model=str(gid))


@pytest.mark.parametrize("backend", BACKENDS)
def test_migration_0005_upgrades_and_downgrades(backend, request, tmp_path):
    engine = make_engine(database_url(backend, request, tmp_path, migrated=False))
    upgrade(engine, "0004")
    upgrade(engine)
    assert {"turing_campaign", "turing_item", "turing_answer"} <= set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0004")
    assert not {"turing_campaign", "turing_item", "turing_answer"} & set(inspect(engine).get_table_names())
    engine.dispose()


def test_config_refuses_bad_values():
    with pytest.raises(PathloopError, match="per_class = 0"):
        CampaignConfig(name="x", model="1", per_class=0)
    with pytest.raises(PathloopError, match="real_share = 1"):
        CampaignConfig(name="x", model="1", real_share=1.0)
    with pytest.raises(PathloopError, match="--model 'a'"):
        CampaignConfig(name="x", model="a")


def test_each_rater_sees_the_same_set_in_their_own_order(workspace, engine):
    add_tiles(engine, 12, split="test")
    gid = _generator_of(engine, add_samples(engine, 12)[0])
    cid = _campaign(workspace, engine, model=str(gid), per_class=3)
    turing.set_active(engine, cid, True)
    a, b = add_annotators(engine, "ann", "bob")
    seen = {}
    for who in (a, b):
        seen[who] = []
        while (tile := turing.next_tile(workspace, engine, who, cid)) is not None:
            assert tile.done == len(seen[who]) and tile.total == 12
            seen[who].append(tile.item_id)
            _answer(engine, who, tile.item_id, "real")
    assert sorted(seen[a]) == sorted(seen[b]) == sorted(i.id for i in _items(engine, cid))
    assert seen[a] != seen[b]
    assert seen[a] == turing.rater_order(cid, a, seen[a])  # stable: the same order again
    assert turing.progress(engine, a, cid) == (12, 12)


def test_double_submit_is_a_no_op_and_undo_brings_the_item_back(workspace, engine):
    add_tiles(engine, 4, split="test")
    cid = _campaign(workspace, engine)
    turing.set_active(engine, cid, True)
    (who,) = add_annotators(engine, "ann")
    first = turing.next_tile(workspace, engine, who, cid)
    one = _answer(engine, who, first.item_id, "synthetic", 3, request_id="r1")
    again = _answer(engine, who, first.item_id, "synthetic", 3, request_id="r1")
    assert one.id == again.id
    second = turing.next_tile(workspace, engine, who, cid)
    assert second.item_id != first.item_id
    _answer(engine, who, second.item_id, "real", 1)
    undone = turing.undo_last(engine, who, cid, request_id="u1")
    assert undone.item_id == second.item_id
    assert turing.undo_last(engine, who, cid, request_id="u1").id == undone.id  # repeated undo: no-op
    assert turing.next_tile(workspace, engine, who, cid).item_id == second.item_id
    _answer(engine, who, second.item_id, "synthetic", 2)
    with Session(engine) as s:
        rows = s.exec(select(TuringAnswer).order_by(TuringAnswer.id)).all()
        assert [r.answer for r in rows] == ["synthetic", "real", "retracted", "synthetic"]
        assert rows[2].supersedes_id == rows[1].id and rows[3].supersedes_id == rows[2].id
        assert s.exec(select(Judgment)).all() == []  # plausibility ratings stay separate
    frame = answers_frame(engine, cid)
    assert frame["current"].tolist() == [True, False, False, True]


def test_bad_answers_are_refused_and_a_late_one_is_kept(workspace, engine):
    add_tiles(engine, 4, split="test")
    cid = _campaign(workspace, engine)
    (who,) = add_annotators(engine, "ann")
    item = _items(engine, cid)[0].id
    with pytest.raises(PathloopError, match="Turing test item 999 does not exist"):
        _answer(engine, who, 999, "real")
    _answer(engine, who, item, "real")  # shown before the campaign was switched off: kept
    assert turing.progress(engine, who, cid) == (1, 4)
    with pytest.raises(PathloopError, match="answer 'fake'"):
        _answer(engine, who, item, "fake")
    with pytest.raises(PathloopError, match="confidence 4"):
        _answer(engine, who, item, "real", 4)
    with pytest.raises(PathloopError, match="campaign 'nope' does not exist; known: t1"):
        turing.set_active(engine, "nope", True)


def test_hand_worked_sensitivity_specificity_and_kappa(workspace, engine):
    """Two synthetic (S1, S2) and two real (R1, R2) items, three raters:

    S1: a syn, b syn, c syn | S2: a syn, b syn, c real | R1: all real | R2: a real, b syn, c syn
    a: sens 2/2 spec 2/2; b: sens 2/2 spec 1/2; c: sens 1/2 spec 1/2; pooled sens 5/6 spec 4/6.
    Fleiss (real, syn) counts: (0,3) (1,2) (3,0) (1,2): P_i = 1, 1/3, 1, 1/3, mean 2/3;
    p = (5/12, 7/12), Pe = 74/144; kappa = (96 - 74) / (144 - 74) = 11/35.
    """
    add_tiles(engine, 4, split="test")
    cid = _campaign(workspace, engine)
    turing.set_active(engine, cid, True)
    items = _items(engine, cid)
    s1, s2 = sorted((i for i in items if i.sample_id), key=lambda i: i.class_name)
    r1, r2 = sorted((i for i in items if i.tile_id), key=lambda i: i.class_name)
    a, b, c = add_annotators(engine, "a", "b", "c")
    plan = {a: ["synthetic", "synthetic", "real", "real"], b: ["synthetic", "synthetic", "real", "synthetic"],
            c: ["synthetic", "real", "real", "synthetic"]}
    for who, answers in plan.items():
        for item, ans in zip((s1, s2, r1, r2), answers):
            _answer(engine, who, item.id, ans)
    with Session(engine) as s:
        res = results(engine, s.get(TuringCampaign, cid))
    pooled = res["pooled"]
    assert (pooled["sensitivity"]["k"], pooled["sensitivity"]["n"]) == (5, 6)
    assert (pooled["specificity"]["k"], pooled["specificity"]["n"]) == (4, 6)
    assert pooled["accuracy"]["rate"] == pytest.approx(9 / 12)
    assert pooled["sensitivity"]["low"] == pytest.approx(0.4365, abs=1e-3)  # Wilson, by hand
    assert pooled["sensitivity"]["high"] == pytest.approx(0.9699, abs=1e-3)
    by = res["raters"]
    assert [(by[r]["sensitivity"]["k"], by[r]["specificity"]["k"]) for r in "abc"] == [(2, 2), (2, 1), (1, 1)]
    assert res["versions"][0]["pooled"]["sensitivity"]["k"] == 5
    fleiss = res["fleiss"]
    assert fleiss["kappa"] == pytest.approx(11 / 35)
    assert (fleiss["n_items"], fleiss["raters"]) == (4, 3)
    assert fleiss["low"] <= 11 / 35 <= fleiss["high"]


def test_kappa_counts_only_items_every_rater_answered(workspace, engine):
    add_tiles(engine, 4, split="test")
    cid = _campaign(workspace, engine)
    turing.set_active(engine, cid, True)
    items = _items(engine, cid)
    a, b = add_annotators(engine, "a", "b")
    for item in items:
        _answer(engine, a, item.id, "real")
    for item in items[:2]:
        _answer(engine, b, item.id, "synthetic")
    with Session(engine) as s:
        res = results(engine, s.get(TuringCampaign, cid))
    assert (res["fleiss"]["n_items"], res["fleiss"]["raters"]) == (2, 2)


def test_vectorised_fleiss_matches_statsmodels():
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(5):
        real = rng.integers(0, 5, size=9)
        tables.append(np.column_stack([real, 4 - real]).astype(float))
    many = fleiss_kappa_many(np.stack(tables))
    assert many == pytest.approx([fleiss_kappa(t) for t in tables])
    # Perfect agreement on a mixed set: kappa 1, and every bootstrap draw with both categories is 1 too.
    perfect = np.array([[3, 0], [0, 3], [3, 0], [0, 3]], dtype=float)
    assert kappa_with_interval(perfect, 3)["kappa"] == pytest.approx(1.0)
