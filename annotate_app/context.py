"""What every page needs: the workspace, its engine, and the signed-in annotator.

``st.session_state`` holds only ``annotator_id``, ``username`` and ``role`` for the person
signed in; never a password or a hash. Each run re-reads the account from the database,
so disabling someone or changing their role takes effect on their next click.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from store import accounts
from store.db import check_schema, make_engine
from store.errors import PathloopError
from store.workspace import Workspace

# What a database that went away (or refused a write) raises mid-session.
DB_ERRORS = (PathloopError, SQLAlchemyError, OSError)
USER_KEYS = ("annotator_id", "username", "role")


@dataclass(frozen=True)
class User:
    """The signed-in account as the app sees it (no credentials)."""

    id: int
    username: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def workspace() -> Workspace:
    """The workspace named by ``$PATHLOOP_WORKSPACE``; a clear error page if it is missing."""
    try:
        return Workspace.open()
    except PathloopError as e:
        st.error(f"Cannot open the workspace: {e}")
        st.stop()


@st.cache_resource(show_spinner=False)
def _engine(url: str) -> Engine:
    engine = make_engine(url)
    check_schema(engine)  # raises, so a failed check is not cached and is retried next run
    return engine


def engine(ws: Workspace) -> Engine:
    """One engine per database URL for the whole server process."""
    try:
        return _engine(ws.database_url)
    except DB_ERRORS as e:
        st.error(f"The database is not available: {one_line(e)}")
        st.stop()


def one_line(e: BaseException) -> str:
    """An error as one short line: the driver's first line for database errors, no SQL."""
    if isinstance(e, PathloopError):
        return str(e)
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return text[0] if text else type(e).__name__


def sign_in(annotator) -> None:
    st.session_state["annotator_id"] = annotator.id
    st.session_state["username"] = annotator.username
    st.session_state["role"] = annotator.role


def sign_out() -> None:
    """Forget everything this browser session knew, not just the account."""
    for k in list(st.session_state.keys()):
        del st.session_state[k]


def current_user(eng: Engine) -> User | None:
    """The signed-in account as the database has it now; None (signed out) if gone or disabled."""
    uid = st.session_state.get("annotator_id")
    if uid is None:
        return None
    try:
        row = next((u for u in accounts.list_users(eng) if u.id == uid), None)
    except DB_ERRORS as e:
        st.error(f"The database is not available: {one_line(e)}")
        st.stop()
    if row is None or not row.active:
        sign_out()
        st.session_state["signed_out_reason"] = "Your account was disabled or removed; you were signed out."
        return None
    if row.role != st.session_state.get("role"):
        st.session_state["role"] = row.role
    return User(row.id, row.username, row.role)


def require_user() -> tuple[Workspace, Engine, User]:
    """Workspace, engine and signed-in user for a page; stops the page when signed out."""
    ws = workspace()
    eng = engine(ws)
    user = current_user(eng)
    if user is None:
        st.warning("Please sign in.")
        st.stop()
    return ws, eng, user


def require_admin() -> tuple[Workspace, Engine, User]:
    """Like ``require_user``, and stops the page unless the account is an admin right now."""
    ws, eng, user = require_user()
    if not user.is_admin:
        st.error("This page is for admins.")
        st.stop()
    return ws, eng, user
