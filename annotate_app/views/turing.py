"""Real or synthetic? The visual Turing test: one tile at a time, answered by one key press.

Keys (shown on the buttons): 1 / 2 / 3 = synthetic, certain / fairly sure / a guess;
8 / 9 / 0 = real, a guess / fairly sure / certain (the two ends of the row are the sure
answers); U undoes the last answer. R and C are Streamlit's own (rerun, clear caches).

The page shows the tile and the class it belongs to, nothing else: real tiles and samples
reach the browser the same way (pixels re-encoded by Streamlit, the same alt text, no file
name or id), so only pixels can tell them apart. The tile comes from ``store.turing.next_tile``
for this rater, never from the URL. Answers are saved with the Rate page's pending/retry
pattern (annotate_app/saving.py) and never touch plausibility judgments.
"""

from __future__ import annotations

import time
import uuid

import streamlit as st

from annotate_app import context, saving
from annotate_app.tile_view import load_tile, upscaled
from store import turing

PENDING = "turing_pending"
VIEW = "turing_view"
EDGE = 512
# (label, key, answer, confidence), in the order shown.
CHOICES = [
    ("Synthetic — certain", "1", "synthetic", 3),
    ("Synthetic — fairly sure", "2", "synthetic", 2),
    ("Synthetic — a guess", "3", "synthetic", 1),
    ("Real — a guess", "8", "real", 1),
    ("Real — fairly sure", "9", "real", 2),
    ("Real — certain", "0", "real", 3),
]


def word(answer: str, confidence: int) -> str:
    return f"{answer} ({turing.CONFIDENCE[confidence]})"


def current_view(tile) -> dict:
    """Request ids and start time of the tile on screen; new ones for a new tile."""
    key = f"{tile.campaign_id}-{tile.item_id}" if tile is not None else "none"
    view = st.session_state.get(VIEW)
    if view is None or view["key"] != key:
        view = {"key": key, "request_id": uuid.uuid4().hex, "undo_request_id": uuid.uuid4().hex,
                "shown_at": time.monotonic(), "n": st.session_state.get("actions", 0)}
        st.session_state[VIEW] = view
    return view


def sender(engine, user):
    def send(p: dict):
        return turing.record_answer(engine, user.id, item_id=p["item_id"], answer=p["answer"],
                                    confidence=p["confidence"], seconds=p["seconds"], request_id=p["request_id"])

    return send


def save(engine, user, tile, view, answer: str, confidence: int) -> None:
    saving.keep(PENDING, {"annotator_id": user.id, "item_id": tile.item_id, "answer": answer,
                          "confidence": confidence, "word": word(answer, confidence),
                          "seconds": round(time.monotonic() - view["shown_at"], 3),
                          "request_id": view["request_id"]})
    if saving.store_pending(PENDING, user, sender(engine, user)):
        saving.next_action(f"Saved: {word(answer, confidence)}.", VIEW)
    st.rerun()


def undo(engine, user, campaign_id: int, view) -> None:
    saving.undo(lambda: turing.undo_last(engine, user.id, campaign_id, request_id=view["undo_request_id"]),
                "answer", VIEW)


def choose_campaign(engine):
    try:
        active = turing.active_campaigns(engine)
    except context.DB_ERRORS as e:
        st.error(f"The database is not available: {context.one_line(e)}")
        st.stop()
    if not active:
        st.info("No Turing test is running at the moment.")
        st.stop()
    if len(active) == 1:
        return active[0]
    names = [c.name for c in active]
    chosen = st.selectbox("Test", names, key="turing_campaign")
    return active[names.index(chosen)]


def main() -> None:
    ws, engine, user = context.require_user()
    st.title("Real or synthetic?")
    if PENDING in st.session_state:  # before the campaign check: one switched off still takes it
        saving.pending_banner(PENDING, user, sender(engine, user), what="answer", view_key=VIEW)
    campaign = choose_campaign(engine)
    note = st.session_state.pop("saved_note", None)
    if note:
        st.toast(note, icon=":material/check_circle:")
    try:
        tile = turing.next_tile(ws, engine, user.id, campaign.id)
        done, total = (tile.done, tile.total) if tile else turing.progress(engine, user.id, campaign.id)
    except context.DB_ERRORS as e:
        st.error(f"Cannot fetch the next tile: {context.one_line(e)}. Reload the page to try again.")
        st.stop()
    view = current_view(tile)
    tag = f"{view['key']}-{view['n']}"
    st.progress(done / total if total else 1.0, text=f"{done} of {total} answered")
    if tile is None:
        st.header("All done")
        st.write("You have answered every tile of this test. Thank you!")
        if st.button("Undo last answer", shortcut="U", key=f"t-undo-{tag}"):
            undo(engine, user, campaign.id, view)
        saving.saved_badge(PENDING)
        return

    image_col, action_col = st.columns([3, 2], gap="large")
    with action_col:
        st.subheader(f"class: {tile.class_name}")
        st.caption("Was this tile cut from a real slide, or generated? Answer with a key.")
        for label, key, answer, confidence in CHOICES:
            if st.button(label, shortcut=key, width="stretch", key=f"t-{answer}-{confidence}-{tag}",
                         type="primary" if confidence == 3 else "secondary"):
                save(engine, user, tile, view, answer, confidence)
        if st.button("Undo last answer", shortcut="U", type="tertiary", key=f"t-undo-{tag}"):
            undo(engine, user, campaign.id, view)
        saving.saved_badge(PENDING)
    path = tile.image_path if tile.image_path.is_absolute() else ws.root / tile.image_path
    with image_col:
        try:
            image = upscaled(load_tile(path), EDGE)
        except OSError as e:
            st.error(f"The tile's image file cannot be read: {e}")
            return
        st.image(image, width=image.width, alt="tile")


main()
