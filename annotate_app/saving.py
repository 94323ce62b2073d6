"""An action is kept until the store has it: the pending, retry and saved-badge pattern that the
Rate and Real-or-synthetic pages share.

The page puts the action in ``st.session_state[key]`` (a dict with ``annotator_id``, ``word``
— how the badge and banner name it — and whatever its ``send`` needs), then calls
``store_pending``. One that could not be saved (database locked or gone) stays there, a red
banner says so, and it is sent again on every run and every few seconds until it lands; the
request id inside makes a repeat that did reach the database a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC

import streamlit as st

from annotate_app import context

RETRY_SECONDS = 5


def keep(key: str, action: dict) -> None:
    """Hold ``action`` as this page's pending one (attempts and error start empty)."""
    st.session_state[key] = {**action, "attempts": 0, "error": ""}


def store_pending(key: str, user, send: Callable[[dict], object]) -> bool:
    """Send the pending action (if any) with ``send(action) -> stored row``; True once stored."""
    p = st.session_state.get(key)
    if p is None or p["annotator_id"] != user.id:
        st.session_state.pop(key, None)  # another account's leftover (sign-out clears it anyway)
        return False
    try:
        row = send(p)
    except context.DB_ERRORS as e:
        p["attempts"] += 1
        p["error"] = context.one_line(e)
        return False
    st.session_state.pop(key, None)
    st.session_state[f"{key}_saved"] = {"at": row.created_at, "word": p["word"]}
    return True


def next_action(note: str, view_key: str = "view") -> None:
    """After a saved action: fresh ids for whatever comes next and a note for the toast."""
    st.session_state.pop(view_key, None)
    st.session_state["actions"] = st.session_state.get("actions", 0) + 1
    st.session_state["saved_note"] = note


def undo(call: Callable[[], object], what: str = "rating", view_key: str = "view") -> None:
    """Run the store's undo (``call() -> the undone row or None``), say what happened, and on
    success go on with fresh ids (the undone item is what the store shows next)."""
    try:
        undone = call()
    except context.DB_ERRORS as e:
        st.error(f"Undo did NOT happen: {context.one_line(e)}. Try again.")
        return
    if undone is None:
        st.info("Nothing to undo.")
        return
    next_action(f"Your last {what} was undone.", view_key)
    st.rerun()


@st.fragment(run_every=RETRY_SECONDS)
def pending_banner(key: str, user, send: Callable[[dict], object], what: str = "rating",
                   view_key: str = "view") -> None:
    """While an action is unsaved: retry it (on each run and every few seconds) and say so."""
    p = st.session_state.get(key)
    if p is None:
        return
    if store_pending(key, user, send):
        next_action(f"Saved after a retry: {p['word']}.", view_key)
        st.rerun(scope="app")
    st.error(
        f"**Not saved — retrying.** Your {what} ({p['word']}) was NOT saved yet: "
        f"{p['error']}. It is kept in this tab and sent again every {RETRY_SECONDS} s and on every key "
        f"press (attempt {p['attempts']}); keep this tab open until this banner goes away.",
        icon=":material/sync_problem:",
    )
    if st.button("Retry now", shortcut="T", key=f"retry-{key}"):
        st.rerun(scope="app")


def saved_badge(key: str) -> None:
    """The time of the last action the store confirmed in this session (UTC, as stored)."""
    last = st.session_state.get(f"{key}_saved")
    if last is None:
        st.caption("Nothing saved yet in this session.")
        return
    at = last["at"].astimezone(UTC).strftime("%H:%M:%S")
    st.markdown(f":green-badge[:material/check_circle: Saved {at} UTC] · {last['word']}")
