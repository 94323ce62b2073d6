"""Dashboard (admins): progress, plausibility with Wilson intervals, reasons, agreement, raters,
the visual Turing test.

Every figure comes from ``store`` (``store.export``, ``store.agreement``); generator
metrics come from ``Evaluation`` rows that ``pathloop evaluate`` wrote. The app computes
none of them itself: this page only arranges tables and charts.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st
from sqlmodel import Session, select

from annotate_app import context
from store import agreement, export, turing, turing_results
from store.models import Evaluation

PERCENT = st.column_config.NumberColumn(format="percent")
KAPPA = st.column_config.NumberColumn(format="%.3f")


def evaluations(engine) -> pd.DataFrame:
    """Evaluation rows, one column per metric (nested metrics flattened with dots)."""
    with Session(engine) as s:
        rows = s.exec(select(Evaluation).order_by(Evaluation.id)).all()
    if not rows:
        return pd.DataFrame()
    metrics = pd.json_normalize([r.metrics for r in rows])
    meta = pd.DataFrame({"evaluation": [r.id for r in rows], "generator_id": [r.generator_id for r in rows],
                         "created_at": [r.created_at for r in rows]})
    return pd.concat([meta, metrics], axis=1)


def progress_section(frame: pd.DataFrame, plaus: pd.DataFrame, overlap: int) -> None:
    st.header("Progress")
    current = frame[frame["current"] & frame["verdict"].isin(["plausible", "implausible"])]
    wanted = int(plaus["samples"].sum()) * overlap
    done = int(plaus["n"].clip(upper=plaus["samples"] * overlap).sum())  # extra ratings do not count
    c = st.columns(4)
    c[0].metric("Decisive ratings", len(current))
    c[1].metric("Ratings wanted", wanted, help=f"samples × overlap ({overlap})")
    c[2].metric("Done", f"{done / wanted:.0%}" if wanted else "–")
    c[3].metric("Annotators rating", frame.loc[frame["current"], "annotator"].nunique())
    label = ("round " + current["round_number"].astype("string")).fillna("no round")
    label[current["item_kind"] == "control"] = "controls"
    rounds = current.groupby(label.rename("round"))["verdict"].value_counts()
    table = plaus.assign(wanted=plaus["samples"] * overlap,
                         done=(plaus["n"] / (plaus["samples"] * overlap)).clip(upper=1).fillna(0))
    st.subheader("By generator version and class")
    st.dataframe(table[["generator_id", "class_name", "samples", "n", "wanted", "done"]], hide_index=True,
                 column_config={"n": "ratings", "done": st.column_config.ProgressColumn(min_value=0, max_value=1)})
    if len(rounds):
        st.subheader("Ratings by round")
        st.bar_chart(rounds.unstack(fill_value=0), x_label="round", y_label="ratings", stack=True)


def plausibility_section(plaus: pd.DataFrame) -> None:
    st.header("Plausibility")
    st.caption("Share of decisive ratings that say plausible, with a Wilson 95% interval.")
    st.dataframe(plaus, hide_index=True, column_config={"rate": PERCENT, "low": PERCENT, "high": PERCENT})
    rated = plaus[plaus["n"] > 0].assign(generator=lambda d: "v" + d["generator_id"].astype(str))
    if rated.empty:
        return
    base = alt.Chart(rated).encode(x=alt.X("class_name:N", title="class"), xOffset="generator:N",
                                   color=alt.Color("generator:N", title="generator"))
    points = base.mark_point(filled=True, size=90).encode(
        y=alt.Y("rate:Q", title="plausible", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        tooltip=["generator", "class_name", "n", alt.Tooltip("rate:Q", format=".1%"),
                 alt.Tooltip("low:Q", format=".1%"), alt.Tooltip("high:Q", format=".1%")])
    st.altair_chart(points + base.mark_rule(strokeWidth=2).encode(y="low:Q", y2="high:Q"))


def reasons_section(reasons: pd.DataFrame) -> None:
    st.header("Top implausibility reasons")
    if reasons.empty:
        st.caption("No implausible ratings yet.")
        return
    left, right = st.columns(2)
    left.dataframe(reasons, hide_index=True, column_config={"share": PERCENT})
    with right:
        st.bar_chart(reasons, x="reason", y="count", horizontal=True, sort="-count")


def agreement_section(summary: dict) -> None:
    st.header("Inter-rater agreement")
    st.caption("Plausible vs implausible on synthetic samples; unsure is a skip. "
               "Undefined (too few shared items, or one verdict only) shows as –.")
    fleiss, alpha = summary["fleiss"], summary["krippendorff"]
    c = st.columns(3)
    c[0].metric("Fleiss' kappa", fmt(fleiss["kappa"]),
                help=f"{fleiss['n_items']} samples with {fleiss['raters_per_item']} ratings each")
    c[1].metric("Krippendorff's alpha", fmt(alpha["alpha"]), help=f"{alpha['n_items']} samples rated twice or more")
    c[2].metric("Samples rated", summary["n_samples_rated"])
    st.subheader("Cohen's kappa per pair")
    pairs = pd.DataFrame(summary["pairs"], columns=["a", "b", "n", "kappa", "agreement"])
    st.dataframe(pairs, hide_index=True, column_config={"kappa": KAPPA, "agreement": PERCENT})


def annotators_section(summary: dict) -> None:
    st.header("Annotators")
    st.caption("Agreement with the majority of the other raters; controls are real tiles mixed in blind.")
    people = pd.DataFrame(summary["annotators"])
    if people.empty:
        st.caption("No ratings yet.")
        return
    st.dataframe(people, hide_index=True, column_config={
        "median_seconds": st.column_config.NumberColumn("median s", format="%.1f"),
        "majority_agreement": PERCENT, "controls_implausible": PERCENT})
    st.bar_chart(people, x="annotator", y="count", horizontal=True)


def turing_section(engine) -> None:
    """Per Turing test campaign, newest first: pooled figures, a table per rater and generator
    version with intervals, Fleiss' kappa, and the switch that shows it to raters."""
    st.header("Visual Turing test")
    st.caption("Raters call real and synthetic tiles, mixed blind, real or synthetic. Sensitivity: synthetic "
               "called synthetic; specificity: real called real; Wilson 95% intervals. Accuracy near 50% and "
               "kappa near 0 mean the samples pass for real. Kept apart from plausibility ratings.")
    found = turing.campaigns(engine)
    if not found:
        st.caption("No campaigns yet: `pathloop turing create --name N --model ID`.")
        return
    for campaign in reversed(found):
        res = turing_results.results(engine, campaign)
        state = ":green-badge[active]" if campaign.active else ":gray-badge[inactive]"
        st.subheader(f"{campaign.name} {state}")
        versions = ", ".join(f"v{g}" for g in campaign.generator_ids)
        st.caption(f"{res['items']} items · generator {versions} · {campaign.per_class} per class and version · "
                   f"real share {campaign.real_share:.0%} · seed {campaign.seed}"
                   + (f" · round {campaign.round_number}" if campaign.round_number is not None else ""))
        label = "Stop showing to raters" if campaign.active else "Show to raters"
        if st.button(label, key=f"turing-switch-{campaign.id}"):
            turing.set_active(engine, campaign.id, not campaign.active)
            st.rerun()
        pooled, fleiss = res["pooled"], res["fleiss"]
        c = st.columns(4)
        c[0].metric("Sensitivity", pct(pooled["sensitivity"]), help=interval(pooled["sensitivity"]))
        c[1].metric("Specificity", pct(pooled["specificity"]), help=interval(pooled["specificity"]))
        c[2].metric("Accuracy", pct(pooled["accuracy"]), help=interval(pooled["accuracy"]))
        kappa_help = (f"{fleiss['n_items']} items answered by all {fleiss['raters']} raters"
                      + (f"; 95% CI {fleiss['low']:.3f} to {fleiss['high']:.3f} (bootstrap)"
                         if fleiss["low"] is not None else ""))
        c[3].metric("Fleiss' kappa (real vs synthetic)", fmt(fleiss["kappa"]), help=kappa_help)
        st.caption(f"Fleiss' kappa: {kappa_help}.")
        if pooled["answers"]:
            table = with_intervals(turing_results.results_table(res))
            st.dataframe(table, hide_index=True, column_config={c: PERCENT for c in TURING_RATES})
        else:
            st.caption("No answers yet.")


TURING_RATES = ("sensitivity", "specificity", "accuracy")


def with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """Each rate followed by its 95% interval as one short text column ("4%–62%")."""
    out = table[["generator", "rater", "answers"]].copy()
    for name in TURING_RATES:
        out[name] = table[name]
        out[f"{name} 95% CI"] = [f"{lo:.0%}–{hi:.0%}" for lo, hi in zip(table[f"{name}_low"], table[f"{name}_high"])]
    return out


def pct(r: dict) -> str:
    return "–" if r["rate"] is None else f"{r['rate']:.0%}"


def interval(r: dict) -> str:
    return f"{r['k']} of {r['n']}; 95% CI {r['low']:.0%} to {r['high']:.0%}"


def fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


ws, engine, user = context.require_admin()
st.title("Dashboard")
try:
    frame = export.judgments_frame(engine)
    plaus = agreement.plausibility_table(engine)
    reasons = agreement.top_reasons(engine, 10)
    summary = agreement.agreement_summary(engine, ws.settings.overlap)
    evals = evaluations(engine)
except context.DB_ERRORS as e:
    st.error(f"The database is not available: {context.one_line(e)}")
    st.stop()

if frame.empty:
    st.info("No judgments yet; figures fill in as raters work.")
progress_section(frame, plaus, ws.settings.overlap)
plausibility_section(plaus)
reasons_section(reasons)
agreement_section(summary)
annotators_section(summary)
try:
    turing_section(engine)
except context.DB_ERRORS as e:
    st.error(f"Turing test figures unavailable: {context.one_line(e)}")
st.header("Generator evaluations")
if evals.empty:
    st.caption("None yet: `pathloop evaluate` writes them.")
else:
    st.dataframe(evals, hide_index=True)
