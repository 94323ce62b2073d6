"""Export (admins): every judgment with its item's provenance, as the CLI writes it."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

import streamlit as st

from annotate_app import context
from store import export

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


@st.cache_data(show_spinner="Preparing the file…", max_entries=3, ttl=60)
def file_bytes(url: str, fmt: str, rows: int) -> bytes:
    """The export file's bytes (cached briefly per row count, so reruns do not rewrite it)."""
    del url, rows  # cache keys only
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"judgments.{fmt}"
        export.export_judgments(engine, out, fmt)
        return out.read_bytes()


if frame.empty:
    st.info("No judgments yet.")
else:
    try:
        data = file_bytes(ws.database_url, fmt, len(frame))
    except context.DB_ERRORS as e:
        st.error(f"The export failed: {context.one_line(e)}")
        st.stop()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    st.download_button(f"Download {fmt.upper()}", data, file_name=f"judgments-{stamp}.{fmt}",
                       mime=FORMATS[fmt], type="primary", on_click="ignore")
