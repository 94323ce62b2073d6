"""Rate: one tile at a time, large, one key press per verdict.

Shortcuts (shown on the buttons): P plausible, I implausible (opens the checklist),
S unsure/skip, U undo the last rating; in the checklist, Ctrl+Enter (⌘+Enter) submits and
Esc cancels. Letter keys are ignored while the cursor is in the comment box.

The tile always comes from ``store.queue.next_item`` for this annotator, never from the
URL or the browser; every action button's key names the tile and a counter of completed
actions, so a second click that arrives after the first was saved matches no button and
does nothing. Each shown tile has one request id, so a resubmitted rating is stored once.
"""

from __future__ import annotations

import time
import uuid

import streamlit as st
from PIL import Image as PILImage

from annotate_app import context
from store import queue

ZOOMS = [256, 384, 512, 768, 1024]
VERDICT_WORDS = {"plausible": "plausible", "implausible": "implausible", "unsure": "unsure / skipped"}


def load_tile(path) -> PILImage.Image:
    """The tile's pixels (handed to the browser as a fresh PNG: no file name reaches the page)."""
    with PILImage.open(path) as im:
        return im.convert("RGB")


def upscaled(im: PILImage.Image, edge: int) -> PILImage.Image:
    """The tile enlarged to about ``edge`` pixels by whole-number nearest-neighbour steps (crisp)."""
    factor = max(1, edge // max(im.size))
    return im.resize((im.width * factor, im.height * factor), PILImage.NEAREST) if factor > 1 else im


def current_view(item) -> dict:
    """Request id, start time and open checklist of the tile on screen; new ones for a new tile."""
    key = f"{item.kind}-{item.item_id}" if item is not None else "none"
    view = st.session_state.get("view")
    if view is None or view["key"] != key:
        view = {"key": key, "request_id": uuid.uuid4().hex, "shown_at": time.monotonic(),
                "undo_request_id": uuid.uuid4().hex, "checklist": False,
                "n": st.session_state.get("actions", 0)}
        st.session_state["view"] = view
    return view


def done(message: str) -> None:
    """After a saved action: fresh ids for whatever comes next, a note, and the next tile at once."""
    st.session_state.pop("view", None)
    st.session_state["actions"] = st.session_state.get("actions", 0) + 1
    st.session_state["saved_note"] = message
    st.rerun()


def save(ws, engine, user, item, view, verdict: str, reasons=(), comment: str = "") -> None:
    try:
        queue.record_judgment(
            ws, engine, user.id, kind=item.kind, item_id=item.item_id, verdict=verdict,
            reasons=list(reasons), comment=comment.strip(),
            seconds=round(time.monotonic() - view["shown_at"], 3), request_id=view["request_id"],
        )
    except context.DB_ERRORS as e:
        st.error(f"Your rating was NOT saved: {context.one_line(e)}. The tile is still here; try again.")
        return
    done(f"Saved: {VERDICT_WORDS[verdict]}.")


def undo(ws, engine, user, view) -> None:
    try:
        undone = queue.undo_last(ws, engine, user.id, request_id=view["undo_request_id"])
    except context.DB_ERRORS as e:
        st.error(f"Undo did NOT happen: {context.one_line(e)}. Try again.")
        return
    if undone is None:
        st.info("Nothing to undo.")
        return
    done("Your last rating was undone.")


def show_progress(ws, engine, user) -> None:
    p = queue.progress(ws, engine, user.id)
    total = p["rated_this_round"] + p["remaining"]
    st.progress(p["rated_this_round"] / total if total else 1.0,
                text=f"{p['rated_today']} rated today · {p['rated_this_round']} in this round · "
                     f"{p['remaining']} remaining")


def checklist(ws, engine, user, item, view, tag: str) -> None:
    """The criteria from pathloop.toml, a comment box, and a submit for an implausible verdict."""
    with st.form(f"reasons-{tag}", border=True):
        st.markdown("**Why implausible?** Tick all that apply.")
        criteria = ws.settings.criteria
        cols = st.columns(2)  # filled column by column, so reading order is the toml's order
        half = (len(criteria) + 1) // 2
        ticked = [c for i, c in enumerate(criteria)
                  if cols[i // half].checkbox(c, key=f"criterion-{tag}-{i}")]
        comment = st.text_area("Comment (optional)", key=f"comment-{tag}", max_chars=2000, height=80)
        submitted = st.form_submit_button("Submit implausible", type="primary", shortcut="Ctrl+Enter",
                                          key=f"submit-{tag}")
    if st.button("Cancel", shortcut="Esc", key=f"cancel-{tag}"):
        view["checklist"] = False
        st.rerun()
    if submitted:
        save(ws, engine, user, item, view, "implausible", ticked, comment)


def main() -> None:
    ws, engine, user = context.require_user()
    note = st.session_state.pop("saved_note", None)
    if note:
        st.toast(note, icon=":material/check_circle:")
    try:
        item = queue.next_item(ws, engine, user.id)
        show_progress(ws, engine, user)
    except context.DB_ERRORS as e:
        st.error(f"Cannot fetch the next tile: {context.one_line(e)}. Reload the page to try again.")
        st.stop()
    view = current_view(item)
    tag = f"{view['key']}-{view['n']}"

    if item is None:
        st.header("Nothing left to rate")
        st.write("Every tile in the queue has the ratings it needs. Thank you! Check back later.")
        if st.button("Undo last rating", shortcut="U", key=f"undo-{tag}"):
            undo(ws, engine, user, view)
        return

    image_col, action_col = st.columns([3, 2], gap="large")
    with action_col:
        st.subheader(f"generated as: {item.shown_class}")
        zoom = st.select_slider("Zoom (pixels)", options=ZOOMS, value=512, key="zoom")
        if st.button("Plausible", shortcut="P", type="primary", width="stretch", key=f"plausible-{tag}"):
            save(ws, engine, user, item, view, "plausible")
        if st.button("Implausible…", shortcut="I", width="stretch", key=f"implausible-{tag}"):
            view["checklist"] = True
        if st.button("Unsure / skip", shortcut="S", width="stretch", key=f"unsure-{tag}"):
            save(ws, engine, user, item, view, "unsure")
        if st.button("Undo last rating", shortcut="U", type="tertiary", key=f"undo-{tag}"):
            undo(ws, engine, user, view)
        if view["checklist"]:
            checklist(ws, engine, user, item, view, tag)
    path = item.image_path if item.image_path.is_absolute() else ws.root / item.image_path
    with image_col:
        try:
            original = load_tile(path)
        except OSError as e:
            st.error(f"The tile's image file cannot be read: {e}")
            return
        tile = upscaled(original, zoom)
        st.image(tile, width=tile.width, alt="tile to rate")
        with st.expander("Actual pixels"):
            st.image(original, width="content", alt="tile at its stored size")


main()
