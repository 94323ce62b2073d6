"""Plausibility rates and inter-rater agreement, from the current judgments.

Pure functions wrap maintained implementations (scikit-learn's Cohen's kappa, statsmodels'
Fleiss' kappa, the ``krippendorff`` package); the loaders read current judgments through
store/judgments.py. Agreement uses decisive verdicts only — plausible and implausible;
unsure is a skip, not a category — and synthetic samples only (controls have a known
answer: they measure each annotator instead). A statistic that is undefined (too few
items, or everyone gave the same verdict) is ``None`` in summaries and NaN from the pure
functions.
"""

from __future__ import annotations

import math
import warnings
from itertools import combinations

import krippendorff
import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from statsmodels.stats.inter_rater import fleiss_kappa as _fleiss_kappa

from store.judgments import DECISIVE, is_current
from store.models import Annotator, Judgment, Sample

CODES = {"implausible": 0, "plausible": 1}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials; (0, 1) when n is 0."""
    if not 0 <= k <= n:
        raise ValueError(f"k = {k}, n = {n}: expected 0 <= k <= n")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def cohen_kappa(a, b) -> float:
    """Cohen's kappa of two raters' labels on the same items (NaN when undefined)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined kappa: NaN, documented above
        return float(cohen_kappa_score(list(a), list(b)))


def fleiss_kappa(table) -> float:
    """Fleiss' kappa of an items × categories table of counts (same raters per item)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(_fleiss_kappa(np.asarray(table, dtype=float), method="fleiss"))


def krippendorff_alpha(reliability_data, level: str = "nominal") -> float:
    """Krippendorff's alpha of a raters × items array, NaN for missing ratings."""
    data = np.asarray(reliability_data, dtype=float)
    if len(np.unique(data[~np.isnan(data)])) < 2:
        return float("nan")  # one value in the whole domain: alpha is undefined
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))


def _none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def current_frame(engine: Engine) -> pd.DataFrame:
    """Current judgments: judgment_id, annotator, verdict, seconds, sample_id, tile_id,
    generator_id, class_name, reasons (a list)."""
    q = (select(Judgment.id.label("judgment_id"), Annotator.username.label("annotator"), Judgment.verdict,
                Judgment.seconds, Judgment.sample_id, Judgment.tile_id, Sample.generator_id, Sample.class_name,
                Judgment.reasons)
         .join(Annotator, Annotator.id == Judgment.annotator_id)
         .outerjoin(Sample, Sample.id == Judgment.sample_id)
         .where(is_current()).order_by(Judgment.id))
    with engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    cols = ["judgment_id", "annotator", "verdict", "seconds", "sample_id", "tile_id", "generator_id", "class_name",
            "reasons"]
    return pd.DataFrame([dict(r) for r in rows], columns=cols)


def agreement_summary(engine: Engine, overlap: int | None = None) -> dict:
    """Inter-rater agreement on samples and a quality line per annotator.

    - ``pairs``: Cohen's kappa for each annotator pair on the samples both judged;
    - ``fleiss``: over samples with exactly ``overlap`` decisive ratings (default: the most
      common count of at least 2);
    - ``krippendorff``: nominal alpha over all samples, missing ratings allowed;
    - ``annotators``: count of current judgments, median seconds, agreement with the
      majority of the *other* raters (samples where they have a strict majority), and the
      share of real controls called implausible.
    """
    cur = current_frame(engine)
    decisive = cur[cur["verdict"].isin(DECISIVE)]
    samples = decisive[decisive["sample_id"].notna()].copy()
    samples["code"] = samples["verdict"].map(CODES)
    grid = samples.pivot_table(index="sample_id", columns="annotator", values="code", aggfunc="first")
    return {
        "n_samples_rated": int(grid.shape[0]),
        "pairs": _pairs(grid),
        "fleiss": _fleiss(samples, overlap),
        "krippendorff": _krippendorff(grid),
        "annotators": _annotators(cur, samples),
    }


def _pairs(grid: pd.DataFrame) -> list[dict]:
    out = []
    for a, b in combinations(sorted(grid.columns), 2):
        both = grid[[a, b]].dropna()
        if both.empty:
            continue
        kappa = cohen_kappa(both[a], both[b]) if len(both) >= 2 else float("nan")
        out.append({"a": a, "b": b, "n": len(both), "kappa": _none(kappa),
                    "agreement": _none(float((both[a] == both[b]).mean()))})
    return out


def _fleiss(samples: pd.DataFrame, overlap: int | None) -> dict:
    counts = samples.groupby("sample_id")["code"].agg(plausible="sum", total="count")
    counts = counts[counts["total"] >= 2]
    if overlap is None and not counts.empty:
        overlap = int(counts["total"].mode().max())
    chosen = counts[counts["total"] == overlap] if overlap else counts.iloc[:0]
    table = np.column_stack([chosen["total"] - chosen["plausible"], chosen["plausible"]])
    kappa = fleiss_kappa(table) if len(chosen) >= 2 else float("nan")
    return {"kappa": _none(kappa), "n_items": int(len(chosen)), "raters_per_item": overlap}


def _krippendorff(grid: pd.DataFrame) -> dict:
    paired = grid[grid.notna().sum(axis=1) >= 2]
    alpha = krippendorff_alpha(paired.T.to_numpy(dtype=float)) if len(paired) >= 2 else float("nan")
    return {"alpha": _none(alpha), "n_items": int(len(paired))}


def _annotators(cur: pd.DataFrame, samples: pd.DataFrame) -> list[dict]:
    votes = samples.groupby("sample_id")["code"].agg(plausible="sum", total="count")
    out = []
    for name in sorted(cur["annotator"].unique()):
        mine = cur[cur["annotator"] == name]
        rated = samples[samples["annotator"] == name].join(votes, on="sample_id")
        others_p = rated["plausible"] - rated["code"]
        others_i = (rated["total"] - 1) - others_p
        has_majority = others_p != others_i
        agree = ((others_p > others_i).astype(int) == rated["code"])[has_majority]
        controls = mine[mine["tile_id"].notna() & mine["verdict"].isin(DECISIVE)]
        seconds = mine["seconds"].dropna()
        out.append({
            "annotator": name,
            "count": int(len(mine)),
            "unsure": int((mine["verdict"] == "unsure").sum()),
            "median_seconds": _none(float(seconds.median())) if len(seconds) else None,
            "majority_agreement": _none(float(agree.mean())) if len(agree) else None,
            "majority_n": int(len(agree)),
            "controls": int(len(controls)),
            "controls_implausible": _none(float((controls["verdict"] == "implausible").mean()))
            if len(controls) else None,
        })
    return out


def plausibility_table(engine: Engine) -> pd.DataFrame:
    """Per generator version and class: samples, decisive ratings ``n``, ``plausible``,
    ``rate`` and its Wilson 95% interval (``low``, ``high``); ratings counted one by one."""
    with engine.connect() as conn:
        made = conn.execute(select(Sample.generator_id, Sample.class_name, func.count().label("samples"))
                            .group_by(Sample.generator_id, Sample.class_name)).mappings().all()
    cur = current_frame(engine)
    rated = cur[cur["sample_id"].notna() & cur["verdict"].isin(DECISIVE)]
    stats = (rated.assign(p=rated["verdict"] == "plausible")
             .groupby(["generator_id", "class_name"])["p"].agg(n="count", plausible="sum"))
    rows = []
    for m in made:
        key = (m["generator_id"], m["class_name"])
        n, k = (int(stats.loc[key, "n"]), int(stats.loc[key, "plausible"])) if key in stats.index else (0, 0)
        low, high = wilson_interval(k, n)
        rows.append({"generator_id": m["generator_id"], "class_name": m["class_name"], "samples": m["samples"],
                     "n": n, "plausible": k, "rate": k / n if n else float("nan"), "low": low, "high": high})
    cols = ["generator_id", "class_name", "samples", "n", "plausible", "rate", "low", "high"]
    return pd.DataFrame(rows, columns=cols).sort_values(["generator_id", "class_name"], ignore_index=True)


def top_reasons(engine: Engine, n: int = 10) -> pd.DataFrame:
    """The ``n`` reasons ticked most on current implausible judgments of samples: reason,
    count, share (of those judgments)."""
    cur = current_frame(engine)
    implausible = cur[(cur["verdict"] == "implausible") & cur["sample_id"].notna()]
    counts = pd.Series([r for rs in implausible["reasons"] for r in (rs or [])], dtype=object).value_counts()
    out = counts.head(n).rename_axis("reason").reset_index(name="count")
    out["share"] = out["count"] / len(implausible) if len(implausible) else float("nan")
    return out
