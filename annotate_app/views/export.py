"""Export (admins): every judgment with its item's provenance, and every visual Turing test
answer, as the CLI writes them."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

import streamlit as st

from annotate_app import context
from store import export, turing_results

FORMATS = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet", "jsonl": "application/x-ndjson"}

ws, engine, user = context.require_admin()
st.title("Export judgments")
st.write("One row per judgment (undos and edits included, with what they supersede): annotator, "
         "verdict, reasons, comment, seconds, timestamps, and the item's provenance. "
         "The same file as `pathloop export judgments`.")
try:
    frame = export.judgments_frame(engine)
except context.DB_ERRORS as e:
    st.error(f"The database is not available: {context.one_line(e)}")
    st.stop()
st.caption(f"{len(frame)} judgments; the latest 20 below.")
st.dataframe(frame.tail(20), hide_index=True)

fmt = st.radio("Format", list(FORMATS), horizontal=True, key="export_format")


WRITERS = {"judgments": export.export_judgments, "turing": turing_results.export_turing}


@st.cache_data(show_spinner="Preparing the file…", max_entries=6, ttl=60)
def file_bytes(url: str, what: str, fmt: str, rows: int) -> bytes:
    """The export file's bytes (cached briefly per row count, so reruns do not rewrite it)."""
    del url, rows  # cache keys only
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{what}.{fmt}"
        WRITERS[what](engine, out, fmt)
        return out.read_bytes()


def download(what: str, rows: int) -> None:
    try:
        data = file_bytes(ws.database_url, what, fmt, rows)
    except context.DB_ERRORS as e:
        st.error(f"The export failed: {context.one_line(e)}")
        st.stop()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    st.download_button(f"Download {fmt.upper()}", data, file_name=f"{what}-{stamp}.{fmt}",
                       mime=FORMATS[fmt], type="primary", on_click="ignore", key=f"download-{what}")


if frame.empty:
    st.info("No judgments yet.")
else:
    download("judgments", len(frame))

st.header("Visual Turing test answers")
st.write("One row per answer (undos included): campaign, item source (real or synthetic), generator version, "
         "class, rater, answer, confidence, seconds and time. The same file as `pathloop export turing`.")
try:
    answers = turing_results.answers_frame(engine)
except context.DB_ERRORS as e:
    st.error(f"The database is not available: {context.one_line(e)}")
    st.stop()
if answers.empty:
    st.info("No Turing test answers yet.")
else:
    st.caption(f"{len(answers)} answers.")
    download("turing", len(answers))
