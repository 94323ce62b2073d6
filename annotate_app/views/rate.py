"""Rate: one tile at a time, large, one key press per verdict.

Shortcuts (shown on the buttons): P plausible, I implausible (opens the checklist),
S unsure/skip, U undo the last rating; in the checklist each criterion has a key (1-9, 0,
then letters; shown beside it) that ticks or unticks it, Ctrl+Enter (⌘+Enter) submits and
Esc cancels. Letter keys are ignored while the cursor is in the comment box.

A rating is kept in ``st.session_state["pending"]`` until the store has it (annotate_app/saving.py,
shared with the Real-or-synthetic page): one that could
not be saved (database locked or gone) stays there, a red banner says so, and it is sent
again on every run and every few seconds until it lands; its request id makes a repeat
that did reach the database a no-op. The time of the last saved rating is always shown.

The tile always comes from ``store.queue.next_item`` for this annotator, never from the
URL or the browser; every action button's key names the tile and a counter of completed
actions, so a second click that arrives after the first was saved matches no button and
does nothing. Each shown tile has one request id, so a resubmitted rating is stored once.
"""

from __future__ import annotations

import time
import uuid

import streamlit as st

from annotate_app import context, saving
from annotate_app.tile_view import load_tile, upscaled
from store import queue

ZOOMS = [256, 384, 512, 768, 1024]
VERDICT_WORDS = {"plausible": "plausible", "implausible": "implausible", "unsure": "unsure / skipped"}
# Keys for the criteria, in checklist order: never one the page already uses (P, I, S, U,
# T retry) nor one Streamlit reserves (C clears caches, R reruns).
CRITERION_KEYS = "1234567890abdefghjklmnoqvwxyz"
REFERENCE_EDGE = 128


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
    saving.next_action(message)
    st.rerun()


def criterion_keys(criteria) -> list[str | None]:
    """The key that toggles each criterion; None past the last free key (then it takes the mouse)."""
    return [CRITERION_KEYS[i] if i < len(CRITERION_KEYS) else None for i in range(len(criteria))]


def save(ws, engine, user, item, view, verdict: str, reasons=(), comment: str = "") -> None:
    """Keep the rating as pending, then try to store it; on failure it stays pending (retried)."""
    saving.keep("pending", {
        "annotator_id": user.id, "kind": item.kind, "item_id": item.item_id, "verdict": verdict,
        "word": VERDICT_WORDS[verdict], "reasons": list(reasons), "comment": comment.strip(),
        "seconds": round(time.monotonic() - view["shown_at"], 3), "request_id": view["request_id"],
    })
    if saving.store_pending("pending", user, sender(ws, engine, user)):
        done(f"Saved: {VERDICT_WORDS[verdict]}.")
    st.rerun()  # the banner at the top of the page shows the failure and retries


def sender(ws, engine, user):
    """How a pending rating reaches the store."""
    def send(p: dict):
        return queue.record_judgment(
            ws, engine, user.id, kind=p["kind"], item_id=p["item_id"], verdict=p["verdict"],
            reasons=p["reasons"], comment=p["comment"], seconds=p["seconds"], request_id=p["request_id"],
        )

    return send


def undo(ws, engine, user, view) -> None:
    saving.undo(lambda: queue.undo_last(ws, engine, user.id, request_id=view["undo_request_id"]))


def show_progress(ws, engine, user) -> None:
    p = queue.progress(ws, engine, user.id)
    total = p["rated_this_round"] + p["remaining"]
    st.progress(p["rated_this_round"] / total if total else 1.0,
                text=f"{p['rated_today']} rated today · {p['rated_this_round']} in this round · "
                     f"{p['remaining']} remaining")


def toggle(state_key: str) -> None:
    st.session_state[state_key] = not st.session_state.get(state_key, False)


def checklist(ws, engine, user, item, view, tag: str) -> None:
    """The criteria from pathloop.toml, each with its key, a comment box, and a submit.

    Not an ``st.form``: a criterion's key is a button that flips its checkbox, and a form's
    unsent ticks would be lost when that button reruns the page.
    """
    criteria = ws.settings.criteria
    keys = criterion_keys(criteria)
    with st.container(border=True, key=f"reasons-{tag}"):
        st.markdown("**Why implausible?** Tick all that apply: press a criterion's key, or click.")
        ticked = []
        rows = st.container(gap=None)  # nine rows of the default gap push Submit off the screen
        for i, (c, k) in enumerate(zip(criteria, keys, strict=True)):
            # The checkbox, then the criterion as a button that carries its key (Streamlit shows
            # a button's shortcut on it); pressing the key or clicking either one flips the tick.
            state_key = f"criterion-{tag}-{i}"
            box_col, name_col = rows.columns([1, 14], vertical_alignment="center", gap=None)
            if box_col.checkbox(c, key=state_key, label_visibility="collapsed"):
                ticked.append(c)
            name_col.button(c, shortcut=k, key=f"key-{tag}-{i}", type="tertiary", on_click=toggle,
                            args=(state_key,), help=f"press {k.upper()} to tick or untick" if k else None)
        comment = st.text_area("Comment (optional)", key=f"comment-{tag}", max_chars=2000, height=80)
        submitted = st.button("Submit implausible", type="primary", shortcut="Ctrl+Enter",
                              key=f"submit-{tag}", width="stretch")
        if st.button("Cancel", shortcut="Esc", key=f"cancel-{tag}", width="stretch"):
            view["checklist"] = False
            st.rerun()
    if submitted:
        save(ws, engine, user, item, view, "implausible", ticked, comment)


def reference_strip(ws, engine, item, edge: int) -> None:
    """A few real train tiles of the shown class, small, below the tile; the same for controls."""
    n = ws.settings.reference_tiles
    if n <= 0:
        return
    try:
        paths = queue.reference_tiles(ws, engine, item.shown_class, n, exclude_kind=item.kind,
                                      exclude_id=item.item_id)
        images = [load_tile(p) for p in paths]
    except (*context.DB_ERRORS, ValueError) as e:
        st.caption(f"Reference tiles unavailable: {context.one_line(e)}")
        return
    if not images:
        st.caption(f"No real {item.shown_class} tiles in the train split to compare with.")
        return
    st.caption(f"For comparison: real **{item.shown_class}** tiles (train split)")
    with st.container(width=max(edge, 256), key="reference-strip"):
        for col, im in zip(st.columns(n, gap="small"), images):  # n columns even when fewer: same size
            col.image(upscaled(im, REFERENCE_EDGE), width="stretch", alt=f"real {item.shown_class} tile")


def main() -> None:
    ws, engine, user = context.require_user()
    if "pending" in st.session_state:
        saving.pending_banner("pending", user, sender(ws, engine, user))
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
        saving.saved_badge("pending")
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
        saving.saved_badge("pending")
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
        reference_strip(ws, engine, item, tile.width)
        with st.expander("Actual pixels"):
            st.image(original, width="content", alt="tile at its stored size")


main()
