"""`pathloop turing` and `pathloop export turing` through the CLI's main, with bad inputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from sqlmodel import Session, select

from store import turing
from store.models import TuringCampaign, TuringItem
from tests.rating_workspace import add_controls, build_workspace
from tests.test_bad_inputs import one_line_error, run


@pytest.fixture
def place(tmp_path):
    ws, engine = build_workspace(tmp_path / "ws", n_samples=4)
    yield {"ws": str(ws.root), "engine": engine, "workspace": ws, "tmp": tmp_path}
    engine.dispose()


def _rows(engine):
    with Session(engine) as s:
        return s.exec(select(TuringCampaign)).all(), s.exec(select(TuringItem)).all()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--model", "99"], "generator version 99 does not exist"),
    (["--model", "1", "--per-class", "0"], "per_class = 0; expected at least 1"),
    (["--model", "1", "--real-share", "1"], "real_share = 1.0"),
    (["--model", "x"], "--model 'x'"),
    (["--model", "1"], "0 real val/test tiles of class 'dab_negative'"),  # no val/test tiles in this workspace
])
def test_create_refuses_bad_input_in_one_line_and_writes_nothing(place, capsys, extra, needle):
    code, out, err = run(["turing", "create", "-w", place["ws"], "--name", "t", "--per-class", "1", *extra], capsys)
    one_line_error(code, err, 1, needle)
    assert _rows(place["engine"]) == ([], [])


def test_create_activate_answer_results_and_export(place, capsys, tmp_path):
    add_controls(place["workspace"], place["engine"], 4)
    w = ["-w", place["ws"]]
    code, out, err = run(["turing", "create", *w, "--name", "first", "--model", "1", "--per-class", "2",
                          "--real-share", "0.5", "--round", "1"], capsys)
    assert code == 0, err
    assert "'first'" in out and "8 items" in out and "inactive" in out
    code, _, err = run(["turing", "create", *w, "--name", "first", "--model", "1", "--per-class", "1"], capsys)
    one_line_error(code, err, 1, "campaign 'first' exists already")
    assert run(["turing", "activate", "first", *w], capsys)[1].startswith("campaign 'first' is now active")
    listed = json.loads(run(["turing", "list", *w, "--json"], capsys)[1])
    assert [(c["name"], c["active"], c["round"]) for c in listed] == [("first", True, 1)]

    engine, ws = place["engine"], place["workspace"]
    cid = listed[0]["id"]
    for n, who in enumerate((1, 2)):  # alice and carol: alice calls everything synthetic, carol everything real
        while (tile := turing.next_tile(ws, engine, who, cid)) is not None:
            turing.record_answer(engine, who, item_id=tile.item_id, answer=("synthetic", "real")[n], confidence=2,
                                 seconds=2.0, request_id=f"{who}-{tile.item_id}")
    res = json.loads(run(["turing", "results", "first", *w, "--json"], capsys)[1])
    assert res["raters"]["alice"]["sensitivity"]["rate"] == 1 and res["raters"]["alice"]["specificity"]["rate"] == 0
    assert res["pooled"]["accuracy"]["rate"] == 0.5
    assert res["fleiss"]["n_items"] == 8 and res["fleiss"]["raters"] == 2
    code, out, err = run(["turing", "results", "first", *w], capsys)
    assert code == 0 and "pooled" in out and "Fleiss' kappa" in out and "over 8 items answered by all 2 raters" in out

    out_file = tmp_path / "t.parquet"
    code, out, err = run(["export", "turing", *w, "--format", "parquet", "--out", str(out_file)], capsys)
    assert code == 0, err
    df = pd.read_parquet(out_file)
    assert len(df) == 16 and set(df["source"]) == {"real", "synthetic"}
    assert set(df["campaign"]) == {"first"} and df["generator_id"].dropna().unique().tolist() == [1]
    assert {"annotator", "answer", "confidence", "seconds", "created_at", "class_name", "image_sha256"} <= set(df)
    assert df["correct"].sum() == 8
    code, _, err = run(["export", "turing", *w, "--campaign", "nope"], capsys)
    one_line_error(code, err, 1, "campaign 'nope' does not exist")
    code, _, err = run(["export", "judgments", *w, "--campaign", "first"], capsys)
    one_line_error(code, err, 1, "--campaign applies to `export turing`")
    assert run(["turing", "deactivate", "1", *w], capsys)[1] == "campaign 'first' is now inactive\n"


def test_results_without_a_campaign_is_one_line(place, capsys):
    code, _, err = run(["turing", "results", "-w", place["ws"]], capsys)
    one_line_error(code, err, 1, "turing results needs a CAMPAIGN")


def test_export_turing_with_no_answers_is_one_line(place, capsys):
    code, _, err = run(["export", "turing", "-w", place["ws"]], capsys)
    one_line_error(code, err, 1, "no Turing test answers to export yet")
