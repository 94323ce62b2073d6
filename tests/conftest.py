"""Shared fixtures: a database on SQLite and on PostgreSQL, and workspaces on each.

PostgreSQL: ``PATHLOOP_TEST_POSTGRES_URL`` (``.ci/run`` sets it) names a server and a
database to connect to; each test gets a fresh database cloned from one migrated template,
and everything is dropped at the end, so reruns against a long-lived server start clean.
Unset, the PostgreSQL cases skip; set but unreachable, they fail.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from store.db import make_engine, upgrade
from store.models import metadata
from store.workspace import Settings, Workspace

POSTGRES_ENV = "PATHLOOP_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Streamlit's AppTest leaves the app script as ``__main__``; spawned worker processes
    (slide reading) would re-run it on start. Put the real one back after every test."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(autouse=True)
def _no_ambient_workspace(monkeypatch):
    """Tests never pick up a developer's own workspace or database from the environment."""
    monkeypatch.delenv("PATHLOOP_DATABASE_URL", raising=False)
    monkeypatch.delenv("PATHLOOP_WORKSPACE", raising=False)


class PostgresServer:
    """One throwaway database per test run on the server named by the environment.

    Each test gets it emptied (TRUNCATE is milliseconds; CREATE/DROP DATABASE cost a
    checkpoint each, about two seconds here), or an empty schema when it needs no tables.
    """

    def __init__(self, url: str):
        self.url = make_url(url)
        if self.url.drivername in ("postgresql", "postgres"):
            self.url = self.url.set(drivername="postgresql+psycopg")
        self.admin = create_engine(self.url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        self.name = f"pathloop_t_{uuid.uuid4().hex[:10]}"
        self.schemas = 0
        with self.admin.connect() as c:  # fails the run when the server is unreachable
            c.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.db_url = self.url.set(database=self.name).render_as_string(hide_password=False)
        self.engine = make_engine(self.db_url)
        upgrade(self.engine)
        self.tables = ", ".join(f'"{t}"' for t in metadata.tables)

    def fresh(self, migrated: bool = True) -> str:
        if migrated:
            with self.engine.begin() as c:
                c.execute(text(f"TRUNCATE {self.tables} RESTART IDENTITY CASCADE"))
            return self.db_url
        self.schemas += 1
        schema = f"empty_{self.schemas}"
        with self.engine.begin() as c:
            c.execute(text(f"CREATE SCHEMA {schema}"))
        url = make_url(self.db_url).update_query_dict({"options": f"-csearch_path={schema}"})
        return url.render_as_string(hide_password=False)

    def close(self) -> None:
        self.engine.dispose()
        with self.admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres_server():
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/run sets it); PostgreSQL cases not run")
    server = PostgresServer(url)
    yield server
    server.close()


def database_url(backend: str, request, tmp_path: Path, migrated: bool = True) -> str:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        if migrated:
            engine = make_engine(url)
            upgrade(engine)
            engine.dispose()
        return url
    return request.getfixturevalue("postgres_server").fresh(migrated)


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> str:
    """URL of a migrated, empty database on each backend."""
    return database_url(request.param, request, tmp_path)


@pytest.fixture
def engine(db_url):
    e = make_engine(db_url)
    yield e
    e.dispose()


@pytest.fixture
def make_workspace(tmp_path):
    """Build a workspace (settings as keyword arguments) on a given database URL."""
    def make(db_url: str, name: str = "ws", **settings) -> Workspace:
        settings.setdefault("classes", ["dab_negative", "dab_positive"])
        settings.setdefault("tile_size", 32)
        return Workspace.create(tmp_path / name, Settings(database_url=db_url, **settings))

    return make


@pytest.fixture
def workspace(make_workspace, db_url) -> Workspace:
    return make_workspace(db_url)


@pytest.fixture(scope="session")
def pathloop_exe() -> str:
    """The installed console script: the CLI is tested through its real entry point."""
    exe = Path(sys.executable).parent / "pathloop"
    if not exe.exists():
        pytest.fail(f"{exe} is missing; install the project (`make test` does) before running tests")
    return str(exe)
