"""Visual Turing test results and export: how well raters tell real from synthetic.

Positive = synthetic. **Sensitivity**: synthetic items called synthetic; **specificity**: real
items called real; both with Wilson 95% intervals, per rater and pooled (pooled counts every
current answer once, so answers of one item by several raters are not independent: read the
pooled interval as optimistic). Per generator version: sensitivity on that version's items;
specificity is shared, as real tiles belong to no version. **Fleiss' kappa** over the items
every rater of the campaign answered, with a bootstrap 95% interval over those items.
Accuracy 0.5 and kappa near 0 are what a perfect generator earns.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased

from store.agreement import fleiss_kappa, wilson_interval
from store.export import write_table
from store.models import Annotator, Image, Sample, Tile, TuringAnswer, TuringCampaign, TuringItem
from store.turing import CONFIDENCE, is_current

BOOTSTRAP = 2000

EXPORT_COLUMNS = [
    "answer_id", "created_at", "campaign", "campaign_id", "campaign_round", "item_id", "position", "source",
    "sample_id", "generator_id", "seed", "sampler", "steps", "tile_id", "tile_split", "class_name",
    "image_sha256", "annotator", "answer", "confidence", "confidence_label", "seconds", "correct", "request_id",
    "supersedes_id", "superseded_by", "current",
]


def _query(campaign_id: int | None):
    later = aliased(TuringAnswer, name="superseding")
    q = (select(TuringAnswer.id.label("answer_id"), TuringAnswer.created_at, TuringCampaign.name.label("campaign"),
                TuringCampaign.id.label("campaign_id"), TuringCampaign.round_number.label("campaign_round"),
                TuringItem.id.label("item_id"), TuringItem.position, TuringItem.sample_id, Sample.generator_id,
                Sample.seed, Sample.sampler, Sample.steps, TuringItem.tile_id, Tile.split.label("tile_split"),
                TuringItem.class_name, Image.sha256.label("image_sha256"), Annotator.username.label("annotator"),
                TuringAnswer.answer, TuringAnswer.confidence, TuringAnswer.seconds, TuringAnswer.request_id,
                TuringAnswer.supersedes_id, later.id.label("superseded_by"), is_current().label("current"))
         .join(TuringItem, TuringItem.id == TuringAnswer.item_id)
         .join(TuringCampaign, TuringCampaign.id == TuringItem.campaign_id)
         .join(Annotator, Annotator.id == TuringAnswer.annotator_id)
         .outerjoin(later, later.supersedes_id == TuringAnswer.id)
         .outerjoin(Sample, Sample.id == TuringItem.sample_id)
         .outerjoin(Tile, Tile.id == TuringItem.tile_id)
         .outerjoin(Image, Image.id == func.coalesce(Sample.image_id, Tile.image_id))
         .order_by(TuringAnswer.id))
    return q if campaign_id is None else q.where(TuringCampaign.id == campaign_id)


def answers_frame(engine: Engine, campaign_id: int | None = None) -> pd.DataFrame:
    """Every answer row (retractions and superseded rows included; ``current`` marks the rest)
    with the campaign, the item's source and provenance; columns as ``EXPORT_COLUMNS``."""
    with engine.connect() as conn:
        rows = conn.execute(_query(campaign_id)).mappings().all()
    df = pd.DataFrame([dict(r) for r in rows])
    if df.empty:
        return pd.DataFrame(columns=EXPORT_COLUMNS)
    df["source"] = np.where(df["sample_id"].notna(), "synthetic", "real")
    df["confidence_label"] = df["confidence"].map(CONFIDENCE)
    df["correct"] = pd.Series(np.where(df["answer"] == "retracted", None, df["answer"] == df["source"]),
                              dtype="boolean")
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
    df["current"] = df["current"].astype(bool)
    for c in ("campaign_round", "sample_id", "generator_id", "seed", "steps", "tile_id", "confidence",
              "supersedes_id", "superseded_by"):
        df[c] = df[c].astype("Int64")
    df["seconds"] = df["seconds"].astype("float64")
    return df[EXPORT_COLUMNS]


def export_turing(engine: Engine, out_path: str | os.PathLike, fmt: str, campaign_id: int | None = None) -> int:
    """Write every Turing test answer to ``out_path`` (csv, parquet or jsonl); returns the row count."""
    return write_table(lambda: answers_frame(engine, campaign_id), out_path, fmt, "turing",
                       "no Turing test answers to export yet")


# -- statistics: pure functions on current answers --------------------------------------------

def rate(k: int, n: int) -> dict:
    """k of n with the share and its Wilson 95% interval (share None when n is 0)."""
    low, high = wilson_interval(k, n)
    return {"k": int(k), "n": int(n), "rate": k / n if n else None, "low": low, "high": high}


def detection(current: pd.DataFrame) -> dict:
    """Sensitivity, specificity and accuracy of current answers (columns source, answer)."""
    synth = current[current["source"] == "synthetic"]
    real = current[current["source"] == "real"]
    return {"answers": int(len(current)),
            "sensitivity": rate(int((synth["answer"] == "synthetic").sum()), len(synth)),
            "specificity": rate(int((real["answer"] == "real").sum()), len(real)),
            "accuracy": rate(int((current["answer"] == current["source"]).sum()), len(current))}


def kappa_table(current: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Items × (real, synthetic) answer counts over the items every rater of ``current`` answered;
    returns (table of shape (n_items, 2), number of raters)."""
    raters = current["annotator"].nunique()
    if current.empty:
        return np.zeros((0, 2)), 0
    per_item = current.groupby("item_id")["answer"].agg(
        real=lambda a: int((a == "real").sum()), synthetic=lambda a: int((a == "synthetic").sum()))
    full = per_item[(per_item["real"] + per_item["synthetic"]) == raters]
    return full[["real", "synthetic"]].to_numpy(dtype=float).reshape(-1, 2), int(raters)


def fleiss_kappa_many(tables: np.ndarray) -> np.ndarray:
    """Fleiss' kappa of each of B tables at once: ``tables`` (B, N items, k categories), the same
    number of raters on every item; returns (B,), NaN where undefined."""
    n = tables.sum(axis=2)[:, :1]  # raters per item, (B, 1)
    p_item = ((tables ** 2).sum(axis=2) - n) / (n * (n - 1))  # (B, N)
    p_cat = tables.sum(axis=1) / tables.sum(axis=(1, 2))[:, None]  # (B, k)
    p_e = (p_cat ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (p_item.mean(axis=1) - p_e) / (1 - p_e)


def kappa_with_interval(table: np.ndarray, raters: int, seed: int = 0, resamples: int = BOOTSTRAP) -> dict:
    """Fleiss' kappa of ``table`` (n_items, 2) and a percentile-bootstrap 95% interval over items."""
    out = {"kappa": None, "low": None, "high": None, "n_items": int(len(table)), "raters": raters}
    if raters < 2 or len(table) < 2:
        return out
    kappa = fleiss_kappa(table)
    if not np.isfinite(kappa):
        return out
    rng = np.random.default_rng(seed)
    draws = fleiss_kappa_many(table[rng.integers(0, len(table), size=(resamples, len(table)))])
    draws = draws[np.isfinite(draws)]
    out["kappa"] = float(kappa)
    if len(draws):
        out["low"], out["high"] = (float(x) for x in np.percentile(draws, [2.5, 97.5]))
    return out


def summarise(current: pd.DataFrame, generator_ids, seed: int = 0) -> dict:
    """Every figure of one campaign from its current answers (columns annotator, item_id, source,
    answer, generator_id)."""
    raters = sorted(current["annotator"].unique())
    table, n_raters = kappa_table(current)
    versions = []
    for gid in generator_ids:
        mine = current[(current["generator_id"] == gid) | (current["source"] == "real")]
        versions.append({"generator_id": int(gid), "pooled": detection(mine),
                         "raters": {r: detection(mine[mine["annotator"] == r]) for r in raters}})
    return {"pooled": detection(current),
            "raters": {r: detection(current[current["annotator"] == r]) for r in raters},
            "versions": versions,
            "fleiss": kappa_with_interval(table, n_raters, seed)}


def results(engine: Engine, campaign: TuringCampaign) -> dict:
    """The campaign's figures (see ``summarise``) with its name, items and who answered."""
    frame = answers_frame(engine, campaign.id)
    current = frame[frame["current"]]
    with engine.connect() as conn:
        items = conn.execute(select(func.count()).select_from(TuringItem)
                             .where(TuringItem.campaign_id == campaign.id)).scalar_one()
    return {"campaign": campaign.name, "campaign_id": campaign.id, "active": campaign.active, "items": int(items),
            "generator_ids": list(campaign.generator_ids), **summarise(current, campaign.generator_ids, campaign.seed)}


def results_table(res: dict) -> pd.DataFrame:
    """One row per (generator version or all, rater or pooled): answers, sensitivity, specificity and
    accuracy with their intervals, for the dashboard and the CLI."""
    rows = []
    groups = [("all", res["pooled"], res["raters"])] + [
        (f"v{v['generator_id']}", v["pooled"], v["raters"]) for v in res["versions"]]
    for version, pooled, per_rater in groups:
        for who, d in [("pooled", pooled), *per_rater.items()]:
            row = {"generator": version, "rater": who, "answers": d["answers"]}
            for name in ("sensitivity", "specificity", "accuracy"):
                r = d[name]
                row |= {name: r["rate"], f"{name}_low": r["low"], f"{name}_high": r["high"]}
            rows.append(row)
    return pd.DataFrame(rows)
