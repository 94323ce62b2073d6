"""Bad paths and values a lab types, through every ``pathloop`` subcommand: one line, non-zero, nothing written.

The CLI runs in-process (``pathloop.cli.main``): each case must exit non-zero with exactly one
line on stderr (``pathloop: error: ...``, or argparse's ``pathloop CMD: error: ...`` with exit 2
for a bad option), never a traceback, and leave behind nothing it was asked to create.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pandas as pd
import pytest
from rating_workspace import build_workspace
from sqlmodel import Session, select

from pathloop import cli
from pathloop.cli import main
from pathloop.demo import write_demo_slide
from store.models import Annotator, Judgment, Sample


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A workspace with samples and a judgment, a slide, and the bad files the cases point at."""
    tmp = tmp_path_factory.mktemp("bad")
    ws, engine = build_workspace(tmp / "ws", n_samples=4)
    with Session(engine) as s:
        alice = s.exec(select(Annotator).where(Annotator.username == "alice")).one()
        sample = s.exec(select(Sample)).first()
        s.add(Judgment(sample_id=sample.id, annotator_id=alice.id, verdict="plausible", request_id=uuid.uuid4().hex))
        s.commit()
    engine.dispose()
    slide, _ = write_demo_slide(tmp / "demo.tiff")
    (tmp / "afile").write_text("not a folder\n")
    (tmp / "notjson.geojson").write_text("<xml>not json</xml>\n")
    for name, toml in [("badtoml", "classes = [\n"), ("booltoml", 'classes = ["a"]\noverlap = true\n'),
                       ("strtoml", 'classes = ["a"]\ntile_size = "32"\n'),
                       ("urltoml", 'classes = ["a"]\ndatabase_url = 5\n')]:
        (tmp / name).mkdir()
        (tmp / name / "pathloop.toml").write_text(toml)
    return {"ws": str(ws.root), "tmp": str(tmp), "file": str(tmp / "afile"), "slide": str(slide)}


W = ["-w", "{ws}"]
GEN = ["generate", *W, "--model", "1", "--per-class", "1"]
SLIDE = ["ingest", *W, "{slide}", "--class", "dab_negative"]
CASES = [
    # workspaces and pathloop.toml
    (["status", "-w", "{tmp}/nope"], 1, "does not exist"),
    (["status", "-w", "{file}"], 1, "is a file, not a folder"),
    (["status", "-w", "{tmp}/badtoml"], 1, "is not valid TOML"),
    (["status", "-w", "{tmp}/booltoml"], 1, "overlap = True; expected a whole number"),
    (["status", "-w", "{tmp}/strtoml"], 1, "tile_size = '32'"),
    (["status", "-w", "{tmp}/urltoml"], 1, "database_url = 5"),
    (["db", "current", "-w", "{tmp}/nope"], 1, "does not exist"),
    (["init", "{file}/ws", "--classes", "a"], 1, "is a file, not a folder"),
    (["init", "/proc/pathloop-no-such-ws", "--classes", "a"], 1, "cannot create workspace"),
    (["init", "{tmp}/new1", "--classes", "a b"], 1, "class name 'a b'"),
    (["init", "{tmp}/new2", "--tile-size", "0"], 2, "--tile-size"),
    (["init", "{tmp}/new3", "--tile-size", "30"], 1, "tile_size = 30"),
    (["demo-slide", "{file}/x.tiff"], 1, "x.tiff"),
    # slides, labels, regions, tiles
    (["ingest", *W, "{tmp}/nope.svs", "--class", "dab_negative"], 1, "does not exist"),
    (["ingest", *W, "{file}", "--class", "dab_negative"], 1, "is not a slide OpenSlide can read"),
    (["ingest", *W, "{slide}", "--regions", "{tmp}/notjson.geojson"], 1, "is not valid GeoJSON"),
    (["ingest", *W, "{slide}", "--regions", "{tmp}/nope.geojson"], 1, "does not exist"),
    (["ingest", *W, "{slide}", "--labels", "{tmp}/nope.csv"], 1, "labels file"),
    ([*SLIDE, "--workers", "-1"], 2, "--workers"),
    ([*SLIDE, "--level", "-1"], 2, "--level"),
    ([*SLIDE, "--mpp", "0"], 2, "--mpp"),
    ([*SLIDE, "--min-tissue", "2"], 1, "--min-tissue"),
    ([*SLIDE, "--seed", "-1"], 2, "--seed"),
    (["import-tiles", *W, "{tmp}/nope"], 1, "does not exist"),
    # generation and training: counts, seeds, model ids
    ([*GEN[:-1], "0"], 2, "--per-class"),
    ([*GEN[:-1], "-3"], 2, "--per-class"),
    ([*GEN, "--steps", "-1"], 2, "--steps"),
    ([*GEN, "--batch-size", "0"], 2, "--batch-size"),
    ([*GEN, "--seed", "abc"], 2, "--seed"),
    ([*GEN, "--seed", "-1"], 2, "--seed"),
    ([*GEN, "--round", "-1"], 2, "--round"),
    (["generate", *W, "--model", "abc", "--per-class", "1"], 1, "--model 'abc'"),
    (["generate", *W, "--model", "99", "--per-class", "1"], 1, "generator version 99 does not exist"),
    (["pretrain", *W, "--steps", "-1"], 1, "train_steps"),
    (["pretrain", *W, "--batch-size", "0"], 1, "train_batch_size"),
    (["pretrain", *W, "--seed", "-1"], 2, "--seed"),  # was a numpy traceback
    (["finetune", *W, "--from", "abc"], 1, "--from 'abc'"),
    (["finetune", *W, "--from", "1", "--steps", "0"], 1, "train_steps"),
    (["train-reward", *W, "--epochs", "0"], 1, "train_epochs"),
    (["train-reward", *W, "--weights", "{tmp}/nope.pth"], 1, "--weights"),
    (["score", *W, "--samples", "abc"], 1, "--samples 'abc'"),
    (["score", *W, "--batch-size", "0"], 2, "--batch-size"),
    (["evaluate", *W, "--model", "abc"], 1, "--model 'abc'"),
    (["evaluate", *W, "--against", "abc"], 1, "--against 'abc'"),
    (["evaluate", *W, "--per-class", "0"], 1, "per_class"),
    (["round", *W, "--per-class", "0"], 1, "per_class"),
    (["round", *W, "--sampler", "euler"], 1, "sampler"),
    (["round", *W, "--guidance", "nan"], 1, "guidance"),
    (["round", *W, "--seed", "-5"], 2, "--seed"),
    (["round", *W, "--step", "bogus"], 1, "step 'bogus'"),
    (["simulate-expert", *W, "--noise", "2"], 1, "noise"),
    (["simulate-expert", *W, "--raters", "0"], 2, "--raters"),
    # serving, accounts
    (["annotate", *W, "--port", "70000"], 2, "--port"),
    (["annotate", *W, "--port", "0"], 2, "--port"),
    (["annotate", *W, "--port", "http"], 2, "--port"),
    (["annotate", *W, "--host", "192.0.2.1"], 1, "cannot serve on 192.0.2.1:8501"),  # TEST-NET: not ours
    (["annotate", "-w", "{tmp}/nope"], 1, "does not exist"),
    (["users", "add", *W], 2, "needs a USERNAME"),
    (["users", "disable", "nobody", *W], 1, "no user named 'nobody'"),
    # exports: missing, file-as-folder and unwritable targets
    (["export", "judgments", *W, "--out", "{tmp}/nodir/j.csv"], 1, "folder {tmp}/nodir does not exist"),
    (["export", "judgments", *W, "--out", "{file}/j.csv"], 1, "{file} is a file, not a folder"),
    (["export", "judgments", *W, "--out", "/proc/pathloop-j.csv"], 1, "cannot write /proc/pathloop-j.csv"),
    (["export", "judgments", *W, "--out", "{tmp}"], 1, "is a folder"),
    (["export", "judgments", *W, "--format", "xlsx"], 2, "--format"),
    (["export", "samples", *W, "--out", "{tmp}/nodir/s"], 1, "folder {tmp}/nodir does not exist"),
    (["export", "samples", *W, "--out", "{file}/s"], 1, "is a file, not a folder"),
    (["export", "samples", *W, "--out", "{file}"], 1, "already exists"),
    (["export", "samples", *W, "--out", "/proc/pathloop-s"], 1, "cannot write /proc/pathloop-s"),
    (["export", "samples", *W, "--model", "abc"], 1, "--model 'abc'"),
]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, expected_code, needle):
    assert "Traceback" not in err, err
    assert code == expected_code, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pathloop") and ": error: " in lines[0], lines[0]
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(("argv", "code", "needle"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_bad_invocation_is_one_line(place, capsys, argv, code, needle):
    before = sorted(p.name for p in Path(place["tmp"]).iterdir())
    got, out, err = run([a.format(**place) for a in argv], capsys)
    one_line_error(got, err, code, needle.format(**place))
    assert sorted(p.name for p in Path(place["tmp"]).iterdir()) == before  # nothing half-written


def test_a_port_in_use_is_one_line(place, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run(["annotate", "-w", place["ws"], "--port", str(port)], capsys)
    one_line_error(code, err, 1, f"cannot serve on 127.0.0.1:{port}")
    assert "serving" not in out


def test_export_into_a_new_folder_of_the_workspace_and_an_existing_one(place, capsys, tmp_path):
    code, out, err = run(["export", "judgments", "-w", place["ws"]], capsys)
    assert code == 0, err
    default = Path(place["ws"]) / "exports" / "judgments.csv"  # WORKSPACE/exports is made on first use
    assert len(pd.read_csv(default)) == 1
    code, out, err = run(["export", "judgments", "-w", place["ws"], "--format", "parquet",
                          "--out", str(tmp_path / "j.parquet")], capsys)
    assert code == 0, err
    assert len(pd.read_parquet(tmp_path / "j.parquet")) == 1


def test_a_failed_write_leaves_the_old_export_and_no_temporary_file(place, capsys, tmp_path, monkeypatch):
    target = tmp_path / "j.parquet"
    target.write_text("the previous export\n")

    def disk_full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    code, out, err = run(["export", "judgments", "-w", place["ws"], "--format", "parquet", "--out", str(target)],
                         capsys)
    one_line_error(code, err, 1, f"cannot write {target}: No space left on device")
    assert target.read_text() == "the previous export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["j.parquet"]


def test_a_failed_sample_export_leaves_no_folder(place, capsys, tmp_path, monkeypatch):
    import shutil

    copied = []

    def copy_then_fail(src, dst, *a, **kw):
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(dst)
        return real(src, dst, *a, **kw)

    real = shutil.copyfile
    monkeypatch.setattr(shutil, "copyfile", copy_then_fail)
    code, out, err = run(["export", "samples", "-w", place["ws"], "--out", str(tmp_path / "shared")], capsys)
    one_line_error(code, err, 1, "No space left on device")
    assert copied and list(tmp_path.iterdir()) == []


def test_an_unforeseen_os_error_is_one_line(place, capsys, monkeypatch):
    def boom(args):
        raise PermissionError(13, "Permission denied", "/srv/lab/pathloop.db")

    monkeypatch.setattr(cli, "cmd_status", boom)
    code, out, err = run(["status", "-w", place["ws"]], capsys)
    one_line_error(code, err, 1, "/srv/lab/pathloop.db: Permission denied")
