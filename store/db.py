"""The engine for a workspace's database, sessions, and Alembic migrations.

SQLite (the default) runs in WAL mode with a busy timeout so the annotation app, the CLI
and a scheduled round can share one file; PostgreSQL is reached through psycopg. The schema
is owned by Alembic: ``upgrade`` creates or upgrades it, and ``check_schema`` refuses a
database that a newer pathloop has migrated past what this code knows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlmodel import Session, create_engine

from store.errors import PathloopError

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_MS = 30_000


def safe_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def make_engine(url: str) -> Engine:
    """An engine for ``url``: ``sqlite:///file.db`` or ``postgresql+psycopg://…``."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise PathloopError(
            f"database URL {url!r} is not a URL; expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(
            parsed, connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own BEGIN handling defers locks; issue BEGIN ourselves so that
        # `BEGIN IMMEDIATE` (see `write_session`) is possible.
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        except ModuleNotFoundError:
            raise PathloopError(
                "PostgreSQL needs psycopg; install it with `pip install 'pathloop[postgres]'`"
            ) from None
    raise PathloopError(f"database URL {safe_url(url)}: expected a sqlite or postgresql URL, not {backend!r}")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn) -> None:
    immediate = conn.get_execution_options().get("sqlite_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def write_session(engine: Engine) -> Session:
    """A session whose transaction takes SQLite's write lock at BEGIN (plain elsewhere).

    For read-then-write transactions (queue leases, judgments): two writers serialise
    instead of both reading the same state and one failing at COMMIT.
    """
    s = Session(engine, expire_on_commit=False)
    if engine.dialect.name == "sqlite":
        s.connection(execution_options={"sqlite_immediate": True})
    return s


def connect_check(engine: Engine) -> None:
    """Fail with one line when the database cannot be reached."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (OperationalError, SQLAlchemyError) as e:
        lines = str(getattr(e, "orig", None) or e).strip().splitlines()
        reason = lines[0] if lines else type(e).__name__
        raise PathloopError(f"cannot reach database {_url(engine)}: {reason}") from None


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _alembic_config(connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Create or upgrade the schema; return the revision the database is now at."""
    connect_check(engine)
    _refuse_newer(engine)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)
    return current_revision(engine) or ""


def _refuse_newer(engine: Engine) -> None:
    rev = current_revision(engine)
    if rev is None:
        return
    try:
        ScriptDirectory.from_config(_alembic_config(None)).get_revision(rev)
    except CommandError:
        raise PathloopError(
            f"database {_url(engine)} has schema {rev!r}, "
            f"newer than this pathloop knows (head {head_revision()!r}); upgrade pathloop"
        ) from None


def check_schema(engine: Engine) -> None:
    """Refuse a database that is unreachable, empty, older or newer than this code."""
    connect_check(engine)
    _refuse_newer(engine)
    rev = current_revision(engine)
    url = _url(engine)
    if rev is None:
        raise PathloopError(f"database {url} has no pathloop schema; run `pathloop db upgrade`")
    if rev != head_revision():
        raise PathloopError(
            f"database {url} has schema {rev!r}, older than this pathloop's {head_revision()!r}; "
            "run `pathloop db upgrade`"
        )


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with Session(engine, expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
