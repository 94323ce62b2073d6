"""Rounds: the state machine, its lock, --if-due, out-of-order steps; then a whole round on tiny models.

The state-machine tests swap the heavy steps for small functions that write what a step
would, on SQLite and PostgreSQL; the end-to-end tests run the real steps through the CLI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlmodel import Session, select
from store_rows import add_annotators, add_samples

from pathloop import rounds
from store.errors import PathloopError
from store.judgments import recount_ratings
from store.models import Evaluation, GeneratorVersion, Judgment, RewardVersion, Round, Sample, utcnow


def add_generator(engine) -> int:
    with Session(engine) as s:
        gv = GeneratorVersion(folder="models/generators/1", kind="pretrained")
        s.add(gv)
        s.commit()
        return gv.id


def fake_steps(engine, calls: list[str], fail: str | None = None) -> rounds.Steps:
    """Steps that record their call and write what the real ones would (samples, versions)."""
    def generate(ws, eng, r, o):
        calls.append("generating")
        if fail == "generating":
            raise RuntimeError("killed while generating")
        add_samples(eng, o.per_class * 2, generator_id=r.generator_in_id, round_number=r.number, tag=f"r{r.number}-")
        return {"details": {"generated": o.per_class * 2}}

    def train_reward(ws, eng, r, o):
        calls.append("training_reward")
        return {"details": {"reward_metrics": {"roc_auc": 0.9}}}

    def finetune(ws, eng, r, o):
        calls.append("finetuning")
        if fail == "finetuning":
            raise RuntimeError("killed while fine-tuning")
        with Session(eng) as s:
            child = GeneratorVersion(folder=f"models/generators/c{r.number}", kind="finetuned",
                                     parent_id=r.generator_in_id, round_number=r.number)
            s.add(child)
            s.commit()
            return {"generator_out_id": child.id}

    def evaluate(ws, eng, r, o):
        calls.append("evaluating")
        return {"details": {"evaluation": {"parent": 0.4, "child": 0.6}}}

    return {"generating": generate, "awaiting_ratings": rounds.step_await_ratings,
            "training_reward": train_reward, "finetuning": finetune, "evaluating": evaluate}


def rate_round(engine, number: int, per_sample: int = 2) -> None:
    """Every sample of a round gets ``per_sample`` plausible judgments (rows, as the app writes them)."""
    raters = add_annotators(engine, *(f"round{number}-rater{i}" for i in range(per_sample)))
    with Session(engine) as s:
        ids = s.exec(select(Sample.id).where(Sample.round_number == number)).all()
        for sid in ids:
            for a in raters:
                s.add(Judgment(sample_id=sid, annotator_id=a, verdict="plausible", request_id=f"{sid}-{a}"))
        s.commit()
    recount_ratings(engine)


def test_a_round_waits_for_ratings_then_runs_to_done_and_starts_the_next(workspace, engine):
    ws = workspace
    gen = add_generator(engine)
    calls: list[str] = []
    steps = fake_steps(engine, calls)
    opts = rounds.RoundOptions(per_class=3)

    first = rounds.advance(ws, engine, opts, steps=steps, log=lambda m: None)
    assert calls == ["generating"] and first.state == "awaiting_ratings"
    assert first.waiting_for == ("round 1 is waiting for ratings: 0 of 12 judgments on its 6 samples "
                                 "(round_min_judgments = 200, overlap = 2)")
    assert not rounds.is_due(ws, engine)
    rounds.advance(ws, engine, opts, steps=steps, log=lambda m: None)  # still waiting: nothing runs
    assert calls == ["generating"]

    rate_round(engine, 1)
    assert rounds.is_due(ws, engine)
    second = rounds.advance(ws, engine, {"beta": 0.5}, steps=steps, log=lambda m: None)  # changes one option
    assert calls == ["generating", "training_reward", "finetuning", "evaluating", "generating"]
    assert second.round_number == 2 and second.state == "awaiting_ratings"
    r1, r2 = rounds.list_rounds(engine)
    assert (r1.state, r1.generator_in_id, r1.finished_at is not None) == ("done", gen, True)
    assert r1.details["evaluation"] == {"parent": 0.4, "child": 0.6} and r1.details["judgments_at_close"] == 12
    assert r2.generator_in_id == r1.generator_out_id  # the fine-tuned generator became current
    assert r1.lock_owner is None and r2.lock_owner is None
    assert r1.details["options"]["per_class"] == 3 and r1.details["options"]["beta"] == 0.3
    assert r2.details["options"]["per_class"] == 3 and r2.details["options"]["beta"] == 0.5  # kept, and changed


def test_a_crashed_step_leaves_the_round_where_it_was_and_unlocked(workspace, engine):
    ws = workspace
    add_generator(engine)
    calls: list[str] = []
    rounds.advance(ws, engine, rounds.RoundOptions(per_class=2), steps=fake_steps(engine, calls), log=lambda m: None)
    rate_round(engine, 1)
    with pytest.raises(RuntimeError, match="killed while fine-tuning"):
        rounds.advance(ws, engine, steps=fake_steps(engine, calls, fail="finetuning"), log=lambda m: None)
    (r,) = rounds.list_rounds(engine)
    assert r.state == "finetuning" and r.lock_owner is None
    calls.clear()
    rounds.advance(ws, engine, steps=fake_steps(engine, calls), log=lambda m: None)
    assert calls[:2] == ["finetuning", "evaluating"]  # resumed at the step that failed, not before


def test_the_lock_keeps_a_second_scheduler_out(workspace, engine):
    ws = workspace
    add_generator(engine)
    calls: list[str] = []
    rounds.advance(ws, engine, rounds.RoundOptions(per_class=2), steps=fake_steps(engine, calls), log=lambda m: None)
    (r,) = rounds.list_rounds(engine)
    other = f"{socket.gethostname()}:{os.getpid()}:someone"
    rounds.acquire(engine, r.id, other)
    with pytest.raises(rounds.RoundBusy, match=r"round 1 is being run by .*:someone \(lock until .* UTC\); try again"):
        rounds.advance(ws, engine, steps=fake_steps(engine, calls), log=lambda m: None)
    assert rounds.list_rounds(engine)[0].lock_owner == other  # the refused call did not release it

    with Session(engine) as s:  # an expired lock is free
        row = s.get(Round, r.id)
        row.lock_expires_at = utcnow() - timedelta(seconds=1)
        s.add(row)
        s.commit()
    rounds.acquire(engine, r.id, "me:1:x")
    rounds.release(engine, r.id, "me:1:x")

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: its lock is taken over at once, expiry or not
    rounds.acquire(engine, r.id, f"{socket.gethostname()}:{dead.pid}:gone")
    rounds.acquire(engine, r.id, "me:2:y")
    assert rounds.list_rounds(engine)[0].lock_owner == "me:2:y"
    assert rounds.renew(engine, r.id, "me:2:y") and not rounds.renew(engine, r.id, "not-me")


def test_steps_out_of_order_and_bad_options_are_refused(workspace, engine):
    ws = workspace
    with pytest.raises(PathloopError, match="no generator version yet"):
        rounds.advance(ws, engine, steps=fake_steps(engine, []), log=lambda m: None)
    assert rounds.list_rounds(engine) == []
    add_generator(engine)
    with pytest.raises(PathloopError, match=r"round the next is at generating; step finetuning is not due before "
                                            r"generating is done"):
        rounds.advance(ws, engine, only="finetuning", steps=fake_steps(engine, []), log=lambda m: None)
    calls: list[str] = []
    rounds.advance(ws, engine, rounds.RoundOptions(per_class=2), only="generating", steps=fake_steps(engine, calls),
                   log=lambda m: None)
    assert calls == ["generating"] and rounds.list_rounds(engine)[0].state == "awaiting_ratings"
    with pytest.raises(PathloopError, match="round 1 is at awaiting_ratings; step generating is already done"):
        rounds.advance(ws, engine, only="generating", steps=fake_steps(engine, calls), log=lambda m: None)
    with pytest.raises(PathloopError, match="step 'lunch'; expected one of"):
        rounds.advance(ws, engine, only="lunch", steps=fake_steps(engine, calls), log=lambda m: None)
    with pytest.raises(PathloopError, match="beta must be >= 0"):
        rounds.RoundOptions(beta=-0.1)
    assert all(r.lock_owner is None for r in rounds.list_rounds(engine))


# ---------------------------------------------------------------- the real steps, through the CLI


E2E_OPTIONS = ["--per-class", "6", "--sample-steps", "2", "--reward-backbone", "test_resnet", "--reward-epochs", "2",
               "--reward-min-samples", "6", "--finetune-steps", "3", "--finetune-batch-size", "4",
               "--finetune-checkpoint-every", "1", "--eval-per-class", "2"]


@pytest.fixture
def loop_ws(tmp_path):
    """A SQLite workspace of 16-px toy tiles with a 2-step pretrained tiny generator."""
    import numpy as np
    from PIL import Image as PILImage

    from finetune.config import PretrainConfig
    from finetune.pretrain import pretrain
    from store.db import make_engine, upgrade
    from store.ingest import import_tiles
    from store.workspace import Settings, Workspace

    rng = np.random.default_rng(0)
    for c, base in (("red", [200, 60, 60]), ("blue", [60, 60, 200])):
        for split, n in (("train", 12), ("test", 4)):  # the round's evaluation compares against test tiles
            (tmp_path / "crops" / split / c).mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(base) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
                PILImage.fromarray(img).save(tmp_path / "crops" / split / c / f"{i}.png")
    ws = Workspace.create(tmp_path / "ws", Settings(classes=["red", "blue"], tile_size=16, control_share=0.0))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    import_tiles(ws, engine, tmp_path / "crops")
    pretrain(ws, engine, PretrainConfig(train_steps=2, train_batch_size=4, train_lr_warmup_steps=0,
                                        checkpoint_every=2), progress=False)
    yield ws, engine
    engine.dispose()


def run(exe, *args, ok=True, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PATHLOOP_DATABASE_URL", "PATHLOOP_WORKSPACE")}
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if ok:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def rate_by_class(engine, number: int, verdict=lambda cls: "plausible" if cls == "red" else "implausible") -> None:
    """Two raters per sample of the round: by default red samples plausible, blue ones implausible."""
    raters = add_annotators(engine, f"round{number}-a", f"round{number}-b")
    with Session(engine) as s:
        for sid, cls in s.exec(select(Sample.id, Sample.class_name).where(Sample.round_number == number)).all():
            for a in raters:
                s.add(Judgment(sample_id=sid, annotator_id=a, request_id=f"{sid}-{a}", verdict=verdict(cls)))
        s.commit()
    recount_ratings(engine)


def test_a_weak_generator_whose_tiles_are_all_implausible_does_not_stall_the_loop(loop_ws, pathloop_exe):
    # A 2-step generator makes noise: every rated tile is implausible. The reward model takes its
    # plausible side from real tiles of their own class (weak labels) and the round goes on.
    ws, engine = loop_ws
    w = ["--workspace", ws.root]
    run(pathloop_exe, "round", *w, *E2E_OPTIONS)
    rate_by_class(engine, 1, verdict=lambda cls: "implausible")
    p = run(pathloop_exe, "round", *w)
    assert "round 2 is waiting for ratings" in p.stdout, p.stdout
    r1 = rounds.list_rounds(engine)[0]
    assert r1.state == "done" and r1.reward_id is not None and r1.generator_out_id is not None
    with Session(engine) as s:
        reward = s.get(RewardVersion, r1.reward_id)
    assert reward.data_manifest["one_sided"] == "every one of the 12 rated samples is judged implausible by its raters"


def test_a_whole_round_through_the_cli(loop_ws, pathloop_exe):
    ws, engine = loop_ws
    w = ["--workspace", ws.root]
    p = run(pathloop_exe, "round", *w, *E2E_OPTIONS, "--finetune-lora-rank", "2")
    assert "round 1 is waiting for ratings: 0 of 24 judgments on its 12 samples" in p.stdout
    p = run(pathloop_exe, "round", "--if-due", *w)
    assert p.stdout == "" and p.stderr == ""  # nothing due: quiet, exit 0

    rate_by_class(engine, 1)
    p = run(pathloop_exe, "round", "--if-due", *w)
    assert "round 2 is waiting for ratings" in p.stdout

    r1, r2 = rounds.list_rounds(engine)
    assert r1.state == "done" and r2.state == "awaiting_ratings" and r2.generator_in_id == r1.generator_out_id
    with Session(engine) as s:
        child = s.get(GeneratorVersion, r1.generator_out_id)
    assert (child.kind, child.parent_id, child.round_number) == ("finetuned", r1.generator_in_id, 1)
    assert child.config["reward_id"] == r1.reward_id
    # the round fine-tuned LoRA adapters (and round 2 keeps the option)
    assert child.config["lora"]["rank"] == 2 and (ws.root / child.folder / "lora" / "adapter_config.json").is_file()
    assert r2.details["options"]["finetune_lora_rank"] == 2
    ev = r1.details["evaluation"]  # the round ran `pathloop evaluate` on parent and child
    assert set(ev) == {"parent", "child", "fid", "coverage", "folder", "evaluation_ids"}
    assert 0 <= ev["parent"] <= 1 and 0 <= ev["child"] <= 1 and (ws.root / ev["folder"] / "metrics.json").is_file()
    with Session(engine) as s:
        rows = s.exec(select(Evaluation).where(Evaluation.id.in_(ev["evaluation_ids"]))).all()
    assert sorted(e.generator_id for e in rows) == sorted([r1.generator_in_id, r1.generator_out_id])
    assert all(e.metrics["reward"]["reward_id"] == r1.reward_id for e in rows)
    p = run(pathloop_exe, "round", "status", *w)
    lines = p.stdout.splitlines()
    assert lines[1].split()[:5] == ["1", "done", str(r1.generator_in_id), str(r1.reward_id), str(child.id)]
    assert lines[2].split()[:2] == ["2", "awaiting_ratings"]
    p = run(pathloop_exe, "round", "--step", "finetuning", *w, ok=False)
    assert p.returncode == 1 and p.stderr.strip() == (
        "pathloop: error: round 2 is at awaiting_ratings; step finetuning is not due before awaiting_ratings is done")


def test_a_killed_fine_tune_resumes_from_its_checkpoint(loop_ws, pathloop_exe):
    import time

    ws, engine = loop_ws
    w = ["--workspace", ws.root]
    options = [*E2E_OPTIONS]
    options[options.index("--finetune-steps") + 1] = "60"
    run(pathloop_exe, "round", *w, *options)
    rate_by_class(engine, 1)
    proc = subprocess.Popen([pathloop_exe, "round", *map(str, w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={k: v for k, v in os.environ.items() if k != "PATHLOOP_WORKSPACE"})
    checkpoints = ws.root / "runs" / "round-1-finetune" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    (r,) = rounds.list_rounds(engine)
    assert r.state == "finetuning" and r.lock_owner.split(":")[1] == str(proc.pid)  # killed holding the lock
    done_before = max(int(c.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*"))

    p = run(pathloop_exe, "round", *w, timeout=600)  # the dead owner's lock is taken over; training resumes
    assert "round 2 is waiting for ratings" in p.stdout
    r = rounds.list_rounds(engine)[0]
    with Session(engine) as s:
        child = s.get(GeneratorVersion, r.generator_out_id)
    assert r.state == "done" and child.parent_id == r.generator_in_id
    assert 0 < done_before < 60
    assert f" {done_before}/60 " in p.stderr  # the bar starts where the checkpoint left off, not at 0
