"""The loop study (benchmarks/loop_study.py) end to end on seconds-long settings: both arms, the
final evaluation, the table, the targets, the plots. Its outcome is the study's business; this
checks that every part ran on the real system and that the figures are where they belong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sqlmodel import Session, select

from store.db import make_engine
from store.models import Annotator, Evaluation, GeneratorVersion, Judgment, Round

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "loop_study.py"


def _load_study():
    import importlib.util

    spec = importlib.util.spec_from_file_location("loop_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


loop_study = _load_study()


def run(*args, timeout=600):
    return subprocess.run([sys.executable, str(STUDY), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_one_fast_round_of_the_study_runs_end_to_end(tmp_path):
    out = tmp_path / "study"
    p = run("--fast", "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["arm"], r["round"]) for r in rows] == [("both", 0), ("loop", 1), ("control", 1), ("seeds+1", 0)]
    assert (out / "summary.json").is_file() and "no interval" in p.stdout  # one seed: gains without an interval
    # round 0 measured again on other seeds: the same version, other fresh tiles
    assert rows[3]["generator_id"] == rows[0]["generator_id"] and rows[3]["fid"] != rows[0]["fid"]
    for r in rows:
        assert r["plausibility_n"] == 8 and r["plausibility_low"] <= r["plausibility"] <= r["plausibility_high"]
        assert r["fid"] >= 0 and 0 <= r["coverage"] <= 1 and 0 <= r["utility_accuracy"] <= 1
    assert rows[1]["rated"] == 16 and rows[1]["reward_p_fresh"] is not None
    assert len(results["targets"]) == 5 and all(isinstance(t["met"], bool) for t in results["targets"])
    assert set(results["timings_s"]) >= {"pretrain", "loop round 1", "control round 1", "final evaluation",
                                         "round 0 on other seeds"}
    assert len(pd.read_csv(out / "results.csv")) == 4
    assert "round 0 on other seeds" in results["targets"][2]["figures"]
    for name in ("plausibility.png", "metrics.png"):
        assert (out / name).stat().st_size > 5000
    assert "MISSED" in p.stdout or "met" in p.stdout
    assert "sim. expert plausible [95% CI]" in p.stdout and "run time" in p.stdout

    # The loop ran through the real rounds, judgments and store; the control learned without feedback.
    engine = make_engine(f"sqlite:///{out / 'workspace' / 'pathloop.db'}")
    with Session(engine) as s:
        (round1,) = s.exec(select(Round)).all()
        loop_child = s.get(GeneratorVersion, rows[1]["generator_id"])
        control_child = s.get(GeneratorVersion, rows[2]["generator_id"])
        judgments = s.exec(select(Judgment, Annotator.username).join(Annotator)).all()
        evaluations = s.exec(select(Evaluation)).all()
    engine.dispose()
    assert round1.state == "done" and round1.generator_out_id == loop_child.id
    assert loop_child.parent_id == control_child.parent_id == rows[0]["generator_id"]
    assert control_child.config["weighting"] == "none" and control_child.config["mean_weight"] == 0
    assert loop_child.config["weight_sources"]["experts"] == 16
    # the loop's child is the best of its checked candidates (steps 0, 1, 2); the control selects nothing
    assert [h["step"] for h in loop_child.config["selection"]["history"]] == [0, 1, 2]
    assert loop_child.config["selection"]["rule"] == "reward"  # the fast settings turn the round-1 guard off
    assert rows[1]["selected_step"] == loop_child.config["selection"]["selected_step"]
    assert "selection" not in control_child.config
    assert len(judgments) == 16 and {name for _, name in judgments} == {"sim-expert-1"}
    # the round's own check (parent and child), the study's evaluation of all three versions and round 0 again
    assert sorted(e.generator_id for e in evaluations) == sorted(
        [rows[0]["generator_id"], loop_child.id] + [r["generator_id"] for r in rows])


def test_seeds_and_compared_objectives_each_get_their_own_round_0_and_a_summary_over_seeds(tmp_path):
    out = tmp_path / "study"
    p = run("--fast", "--seeds", 2, "--compare", "kto", "--out", out, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and list(summary["arms"]) == ["loop", "loop-kto", "control"]
    for seed in (0, 1):
        results = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        rows = results["rows"]
        assert [(r["arm"], r["objective"], r["round"]) for r in rows] == [
            ("both", "-", 0), ("loop", "preference", 1), ("loop-kto", "kto", 1), ("control", "none", 1)]
        assert {r["seed"] for r in rows} == {seed} and results["config"]["seed"] == seed
        for r in rows:  # bootstrap intervals around FID and coverage
            assert r["fid_low"] <= r["fid"] <= r["fid_high"] and r["coverage_low"] <= r["coverage_high"]
        for arm in ("loop", "loop-kto", "control"):  # the summary's gain is this seed's last round - round 0
            (last,) = [r for r in rows if r["arm"] == arm]
            (entry,) = [e for e in summary["arms"][arm]["per_seed"] if e["seed"] == seed]
            assert entry["gain"] == pytest.approx(last["plausibility"] - rows[0]["plausibility"])
        # the compared arm ran its round in its own copy of the workspace, from the same round 0
        copy = make_engine(f"sqlite:///{out / f'seed-{seed}' / 'workspace-kto' / 'pathloop.db'}")
        with Session(copy) as s:
            (round1,) = s.exec(select(Round)).all()
            child = s.get(GeneratorVersion, round1.generator_out_id)
        copy.dispose()
        assert child.config["objective"] == "kto" and child.parent_id == rows[0]["generator_id"]
    # two seeds' round-0 generators differ (their own pretraining seed)
    r0 = [json.loads((out / f"seed-{k}" / "results.json").read_text())["rows"][0]["fid"] for k in (0, 1)]
    assert r0[0] != r0[1]
    gain = summary["arms"]["loop"]["gain"]
    assert gain["low"] <= gain["mean"] <= gain["high"]
    assert "mean gain [95% CI over seeds]" in p.stdout and "over 2 seeds" in p.stdout


def test_t_interval_by_hand():
    # values 0.1 and 0.3: mean 0.2, sd 0.1414, t(0.975, 1 df) = 12.706 -> half-width 12.706 * 0.1414 / sqrt(2) = 1.2706
    mean, low, high = loop_study.t_interval([0.1, 0.3])
    assert mean == pytest.approx(0.2) and low == pytest.approx(0.2 - 1.2706, abs=1e-4)
    assert high == pytest.approx(0.2 + 1.2706, abs=1e-4)
    assert loop_study.t_interval([0.25]) == (0.25, None, None)


def test_the_study_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("results of an earlier study")
    p = run("--fast", "--out", tmp_path / "old")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"loop_study: error: {tmp_path / 'old'} is not empty; the study starts from a new workspace "
        "(choose another --out)"]
    assert [f.name for f in (tmp_path / "old").iterdir()] == ["keep.txt"]
    bad = run("--fast", "--preset", "huge", "--out", tmp_path / "new")
    assert bad.returncode == 1 and not (tmp_path / "new").exists()
    assert bad.stderr.strip().splitlines() == [
        "loop_study: error: unknown generator preset 'huge'; expected one of: tiny, small, base"]


def test_combine_summarises_seed_folders_run_apart_and_refuses_mismatched_ones(tmp_path):
    out = tmp_path / "study"
    p = run("--fast", "--seeds", 2, "--out", out, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    whole = json.loads((out / "summary.json").read_text())
    seeds = [out / "seed-0", out / "seed-1"]

    c = run("--combine", *seeds, "--out", tmp_path / "combined")
    assert c.returncode == 0, c.stderr[-3000:]
    combined = json.loads((tmp_path / "combined" / "summary.json").read_text())
    assert combined["seeds"] == [0, 1] and combined["arms"].keys() == whole["arms"].keys()
    for arm, a in whole["arms"].items():  # the same summary as the run that made both seeds
        assert combined["arms"][arm]["gain"] == pytest.approx(a["gain"])
    assert len(pd.read_csv(tmp_path / "combined" / "results.csv")) == 2 * 3
    assert "over 2 seeds" in c.stdout

    # an arm run on one seed only is summarised over that seed, without an interval
    rows = loop_study.summarise([
        json.loads((seeds[0] / "results.json").read_text())["rows"],
        [r for r in json.loads((seeds[1] / "results.json").read_text())["rows"] if r["arm"] != "control"]])
    assert [e["seed"] for e in rows["arms"]["control"]["per_seed"]] == [0]
    assert rows["arms"]["control"]["gain"]["low"] is None

    # bad input: one line, exit 1, nothing written
    settings = json.loads((seeds[1] / "results.json").read_text())
    settings["config"]["slide"] = "he"
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps(settings))
    for args, message in [
        ((seeds[0], other), f"loop_study: error: {other} ran other settings than {seeds[0]} (slide); expected the "
                            "same study on other seeds"),
        ((seeds[0], tmp_path / "nowhere"), f"loop_study: error: {tmp_path / 'nowhere' / 'results.json'}: not a "
                                           "loop study's results (FileNotFoundError); expected the results.json "
                                           "of one seed's run"),
        ((seeds[0], seeds[0]), "loop_study: error: seeds [0, 0]: the same seed twice; expected each seed once"),
        ((out, seeds[0]), f"loop_study: error: {out} holds several seeds' results; combine one seed's folders "
                          "(its seed-K folders)")]:
        bad = run("--combine", *args, "--out", tmp_path / "bad")
        assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [message]
        assert not (tmp_path / "bad").exists()


def test_each_objective_gets_its_own_real_tile_weight():
    # the pair and verdict terms carry a factor ~kappa/4 that a denoising error does not: at their beta 300 a
    # weighted arm's reward-weighted term would be 1/300 of its loss, the control with extra steps
    cfg = loop_study.StudyConfig(compare="kto,weighted")
    assert loop_study.round_options(cfg).beta == 300.0
    assert loop_study.round_options(loop_study.replace(cfg, objective="kto", compare="")).beta == 300.0
    weighted = loop_study.round_options(loop_study.replace(cfg, objective="weighted", compare=""))
    assert weighted.beta == 0.3 and weighted.objective == "weighted"
    assert loop_study.round_options(loop_study.StudyConfig(weighted_beta=2.0, objective="weighted")).beta == 2.0
