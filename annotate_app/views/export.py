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


def or_stop(read, message: str):
    """``read()``'s result, or ``message`` and the reason on one line and the page stops (database down)."""
    try:
        return read()
    except context.DB_ERRORS as e:
        st.error(f"{message}: {context.one_line(e)}")
        st.stop()


st.title("Export judgments")
st.write("One row per judgment (undos and edits included, with what they supersede): annotator, "
         "verdict, reasons, comment, seconds, timestamps, and the item's provenance. "
         "The same file as `pathloop export judgments`.")
frame = or_stop(lambda: export.judgments_frame(engine), "The database is not available")
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
    data = or_stop(lambda: file_bytes(ws.database_url, what, fmt, rows), "The export failed")
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
answers = or_stop(lambda: turing_results.answers_frame(engine), "The database is not available")
if answers.empty:
    st.info("No Turing test answers yet.")
else:
    st.caption(f"{len(answers)} answers.")
    download("turing", len(answers))
