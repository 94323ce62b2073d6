"""The Real-or-synthetic page and the dashboard's Turing test section, through AppTest."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from store import turing
from store.models import Judgment, TuringAnswer
from store.turing import CampaignConfig
from tests.rating_workspace import add_controls, build_workspace
from tests.test_app import annotator_id, assert_no_errors, button, locked_until_told, sign_in, start, texts

CHOICE_KEYS = {"Synthetic — certain": "1", "Synthetic — fairly sure": "2", "Synthetic — a guess": "3",
               "Real — a guess": "8", "Real — fairly sure": "9", "Real — certain": "0"}


@pytest.fixture
def turing_ws(tmp_path, monkeypatch):
    ws, engine = build_workspace(tmp_path / "ws", n_samples=4)
    tiles = add_controls(ws, engine, 4)
    cid = turing.create_campaign(ws, engine, CampaignConfig(name="blind-1", model="1", per_class=1, real_share=0.5))
    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    yield ws, engine, cid, tiles
    engine.dispose()


def answers(engine) -> list[TuringAnswer]:
    with Session(engine) as s:
        return list(s.exec(select(TuringAnswer).order_by(TuringAnswer.id)).all())


def test_page_is_listed_only_while_a_campaign_is_active(turing_ws):
    ws, engine, cid, _ = turing_ws
    at = sign_in(start(), "alice")
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("views/turing.py")
    turing.set_active(engine, cid, True)
    at.run()
    at.switch_page("views/turing.py").run()
    assert_no_errors(at)
    assert at.title[0].value == "Real or synthetic?"


def test_answer_undo_and_progress(turing_ws):
    ws, engine, cid, tiles = turing_ws
    turing.set_active(engine, cid, True)
    at = sign_in(start(), "alice")
    at.switch_page("views/turing.py").run()
    assert_no_errors(at)
    assert {b.label: b.proto.shortcut for b in at.button if b.label in CHOICE_KEYS} == CHOICE_KEYS
    assert at.subheader[0].value.startswith("class: ")
    assert "0 of 4 answered" in texts(at)
    page = texts(at)
    uid = annotator_id(engine, "alice")
    first = turing.next_tile(ws, engine, uid, cid)
    assert str(first.image_path.name) not in page and first.image_path.stem not in page  # no file name
    button(at, "Synthetic — fairly sure").click().run()
    assert_no_errors(at)
    (a,) = answers(engine)
    assert (a.item_id, a.answer, a.confidence, a.annotator_id) == (first.item_id, "synthetic", 2, uid)
    assert a.seconds is not None and a.seconds >= 0
    assert "1 of 4 answered" in texts(at)
    assert any(f"Saved {a.created_at:%H:%M:%S} UTC" in m.value for m in at.markdown)
    button(at, "Undo last answer").click().run()
    assert [r.answer for r in answers(engine)] == ["synthetic", "retracted"]
    assert "0 of 4 answered" in texts(at)
    for _ in range(4):
        button(at, "Real — certain").click().run()
    assert_no_errors(at)
    assert "All done" in texts(at) and "4 of 4 answered" in texts(at)
    with Session(engine) as s:
        assert s.exec(select(Judgment)).all() == []  # never a plausibility judgment


def test_dashboard_shows_the_campaign_and_switches_it(turing_ws):
    ws, engine, cid, _ = turing_ws
    turing.set_active(engine, cid, True)
    for name, answer in (("alice", "synthetic"), ("carol", "real")):
        uid = annotator_id(engine, name)
        while (tile := turing.next_tile(ws, engine, uid, cid)) is not None:
            turing.record_answer(engine, uid, item_id=tile.item_id, answer=answer, confidence=3,
                                 request_id=f"{name}-{tile.item_id}")
    at = sign_in(start(), "boss")
    at.switch_page("views/dashboard.py").run()
    assert_no_errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy"] == "50%" and metrics["Sensitivity"] == "50%" and metrics["Specificity"] == "50%"
    assert metrics["Fleiss' kappa (real vs synthetic)"] == "-1.000"
    table = next(d.value for d in at.dataframe if "sensitivity 95% CI" in d.value.columns)
    alice = table[(table["generator"] == "all") & (table["rater"] == "alice")].iloc[0]
    assert alice["sensitivity"] == 1 and alice["specificity"] == 0
    assert alice["sensitivity 95% CI"] == "34%–100%"  # Wilson, 2 of 2
    assert set(table["generator"]) == {"all", "v1"}
    button(at, "Stop showing to raters").click().run()
    assert turing.active_campaigns(engine) == []


def test_export_page_offers_the_answers(turing_ws):
    ws, engine, cid, _ = turing_ws
    at = sign_in(start(), "boss")
    at.switch_page("views/export.py").run()
    assert_no_errors(at)
    assert "No Turing test answers yet." in texts(at) and not at.download_button
    turing.set_active(engine, cid, True)
    uid = annotator_id(engine, "alice")
    tile = turing.next_tile(ws, engine, uid, cid)
    turing.record_answer(engine, uid, item_id=tile.item_id, answer="real", confidence=1, request_id="x")
    at.run()
    assert_no_errors(at)
    (button,) = at.download_button  # no judgments yet: only the answers' button
    assert button.label == "Download CSV" and "1 answers." in texts(at)


def test_unsaved_answer_is_retried_and_lands_once(turing_ws, monkeypatch):
    ws, engine, cid, _ = turing_ws
    turing.set_active(engine, cid, True)
    at = sign_in(start(), "alice")
    at.switch_page("views/turing.py").run()
    flaky, calls = locked_until_told(turing.record_answer)
    monkeypatch.setattr(turing, "record_answer", flaky)
    button(at, "Real — fairly sure").click().run()
    (banner,) = [e.value for e in at.error]
    assert "Not saved — retrying" in banner and "real (fairly sure)" in banner and "database is locked" in banner
    assert not answers(engine) and "0 of 4 answered" in texts(at)
    at.run()
    assert calls["n"] >= 2 and not answers(engine)
    calls["fail"] = False
    at.run()
    assert_no_errors(at)
    (a,) = answers(engine)
    assert (a.answer, a.confidence) == ("real", 2) and "1 of 4 answered" in texts(at)
    assert any(f"Saved {a.created_at:%H:%M:%S} UTC" in m.value for m in at.markdown)
    at.run()
    assert len(answers(engine)) == 1
