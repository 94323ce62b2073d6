"""My progress: the signed-in annotator's own counts (never anyone else's)."""

from __future__ import annotations

import streamlit as st

from annotate_app import context
from store import queue

ws, engine, user = context.require_user()
st.title("My progress")
try:
    p = queue.progress(ws, engine, user.id)
except context.DB_ERRORS as e:
    st.error(f"The database is not available: {context.one_line(e)}. Reload the page to try again.")
    st.stop()
cols = st.columns(4)
cols[0].metric("Rated today", p["rated_today"])
cols[1].metric("Rated in this round", p["rated_this_round"])
cols[2].metric("Rated in total", p["rated_total"])
cols[3].metric("Left for you in the queue", p["remaining"])
total = p["rated_this_round"] + p["remaining"]
st.progress(p["rated_this_round"] / total if total else 1.0, text="this round")
