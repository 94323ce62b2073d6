"""The CLI through its installed entry point: help, init, status, and bad workspaces."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib

import pytest

from store.db import head_revision
from store.errors import PathloopError
from store.workspace import DEFAULT_CRITERIA, Settings, Workspace, load_settings

COMMANDS = ["init", "db", "demo-slide", "ingest", "import-tiles", "status", "pretrain", "import-model", "generate",
            "finetune", "generator", "annotate", "users", "export", "train-reward", "score", "reward", "simulate-expert", "round",
            "evaluate", "turing"]


def run(exe, *args, env=None, ok=True):
    e = {k: v for k, v in os.environ.items() if k not in ("PATHLOOP_DATABASE_URL", "PATHLOOP_WORKSPACE")}
    e.update(env or {})
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=e, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def fails(p, *needles):
    """A bad input: non-zero exit, exactly one line on stderr naming the thing."""
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathloop: error: "), p.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def test_help_lists_every_command_and_each_has_help(pathloop_exe):
    out = run(pathloop_exe, "--help").stdout
    for c in COMMANDS:
        assert c in out
        sub = run(pathloop_exe, c, "--help").stdout
        assert sub.startswith(f"usage: pathloop {c}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_init_then_status(pathloop_exe, tmp_path, backend, request):
    args = ["init", tmp_path / "ws", "--classes", "tumour,stroma", "--tile-size", "64"]
    if backend == "postgresql":
        args += ["--database-url", request.getfixturevalue("postgres_server").fresh(migrated=False)]
    out = run(pathloop_exe, *args).stdout
    assert "initialised workspace" in out
    toml = (tmp_path / "ws" / "pathloop.toml").read_text()
    assert "# Tile classes" in toml  # commented defaults
    raw = tomllib.loads(toml)
    assert raw["classes"] == ["tumour", "stroma"] and raw["tile_size"] == 64
    assert raw["criteria"] == DEFAULT_CRITERIA and raw["overlap"] == 2 and raw["control_share"] == 0.1
    for folder in ("images", "models", "runs"):
        assert (tmp_path / "ws" / folder).is_dir()
    st = json.loads(run(pathloop_exe, "status", "--json", "--workspace", tmp_path / "ws").stdout)
    assert st["tiles"] == {c: {"train": 0, "val": 0, "test": 0} for c in ("tumour", "stroma")}
    assert st["slides"] == 0 and st["samples_total"] == 0
    # The workspace is also found through the environment and the current folder.
    env_out = run(pathloop_exe, "status", env={"PATHLOOP_WORKSPACE": str(tmp_path / "ws")}).stdout
    assert "tumour" in env_out
    cwd_out = subprocess.run([pathloop_exe, "status"], cwd=tmp_path / "ws", capture_output=True, text=True)
    assert cwd_out.returncode == 0 and "stroma" in cwd_out.stdout
    assert f"schema {head_revision()}" in run(pathloop_exe, "db", "current", "-w", tmp_path / "ws").stdout


def test_init_refuses_an_existing_workspace(pathloop_exe, tmp_path):
    run(pathloop_exe, "init", tmp_path / "ws", "--classes", "a")
    before = (tmp_path / "ws" / "pathloop.toml").read_text()
    fails(run(pathloop_exe, "init", tmp_path / "ws", "--classes", "b", ok=False), "already a pathloop workspace")
    assert (tmp_path / "ws" / "pathloop.toml").read_text() == before


def test_workspace_that_does_not_exist(pathloop_exe, tmp_path):
    fails(run(pathloop_exe, "status", "-w", tmp_path / "nope", ok=False), tmp_path / "nope", "does not exist")


def test_folder_that_is_not_a_workspace(pathloop_exe, tmp_path):
    fails(run(pathloop_exe, "status", "-w", tmp_path, ok=False), tmp_path, "is not a pathloop workspace")


def test_unreachable_database_url(pathloop_exe, tmp_path):
    bad = "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/test"
    line = fails(run(pathloop_exe, "init", tmp_path / "ws", "--database-url", bad, ok=False),
                 "cannot reach database", "127.0.0.1:1")
    assert "hunter2" not in line
    assert not (tmp_path / "ws").exists()  # nothing half-written
    run(pathloop_exe, "init", tmp_path / "ok", "--classes", "a")
    fails(run(pathloop_exe, "status", "-w", tmp_path / "ok", env={"PATHLOOP_DATABASE_URL": bad}, ok=False),
          "cannot reach database")


def test_newer_schema_from_the_cli(pathloop_exe, tmp_path):
    import sqlite3

    run(pathloop_exe, "init", tmp_path / "ws", "--classes", "a")
    with sqlite3.connect(tmp_path / "ws" / "pathloop.db") as c:
        c.execute("UPDATE alembic_version SET version_num = '9999'")
    fails(run(pathloop_exe, "status", "-w", tmp_path / "ws", ok=False), "'9999'", "newer than this pathloop")
    fails(run(pathloop_exe, "db", "upgrade", "-w", tmp_path / "ws", ok=False), "newer than this pathloop")


def test_bad_settings_are_named(tmp_path):
    (tmp_path / "pathloop.toml").write_text('classes = ["a"]\ntile_sise = 32\n')
    with pytest.raises(PathloopError, match="unknown setting 'tile_sise'"):
        Workspace.open(tmp_path)
    (tmp_path / "pathloop.toml").write_text("classes = [\n")
    with pytest.raises(PathloopError, match="is not valid TOML"):
        Workspace.open(tmp_path)
    (tmp_path / "pathloop.toml").write_text('classes = ["a"]\ntile_size = 30\n')
    with pytest.raises(PathloopError, match="tile_size = 30; expected a multiple of 8"):
        Workspace.open(tmp_path)
    with pytest.raises(PathloopError, match="repeats a name"):
        Settings(classes=["a", "a"])
    with pytest.raises(PathloopError, match="unknown class 'c'; expected one of: a, b"):
        Settings(classes=["a", "b"]).class_index("c")


def test_settings_round_trip_through_the_commented_file(tmp_path):
    s = Settings(classes=["x", "y"], tile_size=128, overlap=3, control_share=0.2,
                 database_url='postgresql+psycopg://u@h/db?x="1"')
    ws = Workspace.create(tmp_path / "w", s)
    assert load_settings(ws.root / "pathloop.toml") == s
    assert ws.database_url == s.database_url


def test_database_url_from_environment_wins(tmp_path, monkeypatch):
    ws = Workspace.create(tmp_path / "w", Settings(classes=["a"]))
    assert ws.database_url == f"sqlite:///{ws.root / 'pathloop.db'}"
    monkeypatch.setenv("PATHLOOP_DATABASE_URL", "postgresql+psycopg://lab@db/pathloop")
    assert Workspace.open(ws.root).database_url == "postgresql+psycopg://lab@db/pathloop"


def test_users_and_export_from_the_cli(pathloop_exe, tmp_path):
    ws = tmp_path / "ws"
    run(pathloop_exe, "init", ws, "--classes", "a")
    p = subprocess.run([pathloop_exe, "users", "add", "ada", "--role", "admin", "--password-stdin", "-w", ws],
                       input="correct horse battery\n", capture_output=True, text=True)
    assert p.returncode == 0 and "added admin ada" in p.stdout and "correct horse" not in p.stdout + p.stderr
    out = run(pathloop_exe, "users", "add", "bo", "--generate-password", "-w", ws).stdout
    assert "password (shown once): " in out
    listing = run(pathloop_exe, "users", "list", "-w", ws).stdout
    assert "ada" in listing and "bo" in listing and "scrypt" not in listing
    assert "bo: disabled" in run(pathloop_exe, "users", "disable", "bo", "-w", ws).stdout
    fails(run(pathloop_exe, "users", "add", "ada", "--generate-password", "-w", ws, ok=False), "'ada' already exists")
    fails(run(pathloop_exe, "export", "judgments", "-w", ws, ok=False), "no judgments")
