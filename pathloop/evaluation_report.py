"""What `pathloop evaluate` shows and writes: the console table, CSV/JSON, PNG plots, ``Evaluation`` rows.

The folder ``evaluations/<timestamp>/`` is built under a temporary name and renamed when
complete; the ``Evaluation`` rows go in one transaction, and the folder is removed if that
fails, so an evaluation is either all there or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from sqlalchemy.engine import Engine
from sqlmodel import Session

from store.models import Evaluation
from store.workspace import Workspace

PLOTS = ("plausibility.png", "trends.png")


def label(v: dict) -> str:
    return f"v{v['generator_id']}" + (f" r{v['round']}" if v["round"] is not None else "")


def _share(r: dict) -> str:
    if not r or r.get("rate") is None:
        return "- (n=0)"
    return f"{r['rate']:.2f} [{r['low']:.2f}-{r['high']:.2f}] n={r['n']}"


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _simulated_rows(versions: list[dict], classes: list[str]) -> list[tuple[str, list[str]]]:
    """The simulated expert's rows, when the evaluation asked for it."""
    if not any(v.get("simulated_expert") for v in versions):
        return []
    sim = [v.get("simulated_expert") or {} for v in versions]
    return [("simulated expert, fresh [95% CI]", [_share(x) for x in sim]),
            *((f"  {c}", [_share(x.get("per_class", {}).get(c)) for x in sim]) for c in classes)]


def _interval_rows(versions: list[dict], name: str, key: str, digits: int) -> list[tuple[str, list[str]]]:
    """A row of bootstrap 95% intervals under the metric's, when the evaluation computed them."""
    if not any(v.get("intervals") for v in versions):
        return []
    return [(f"  {name} bootstrap 95% CI", [f"{_num(v['intervals'][key]['low'], digits)}-{_num(v['intervals'][key]['high'], digits)}"
                                           if v.get("intervals") else "-" for v in versions])]


def format_table(versions: list[dict], baseline: dict, classes: list[str], real: dict | None = None) -> str:
    """Metrics as rows, versions as columns; ``real`` (the config's ``real_tiles``) adds a line when the real
    tiles were subsampled."""
    rows: list[tuple[str, list[str]]] = [
        ("kind", [v["kind"] for v in versions]),
        ("parent", [str(v["parent_id"] or "-") for v in versions]),
        ("expert plausible [95% CI]", [_share(v["expert"]) for v in versions]),
        *((f"  {c}", [_share(v["expert"]["per_class"][c]) for v in versions]) for c in classes),
        *_simulated_rows(versions, classes),
        ("reward p, stored samples", [_num(v["reward"]["stored"]["mean"]) + f" n={v['reward']['stored']['n']}"
                                      if v["reward"] else "-" for v in versions]),
        ("reward p, fresh samples", [_num(v["reward"]["fresh"]["mean"]) if v["reward"] else "-" for v in versions]),
        ("FID (lower is better)", [_num(v["fid"], 2) for v in versions]),
        *_interval_rows(versions, "FID", "fid", 2),
        *((m, [_num(v[m]) for v in versions]) for m in ("precision", "recall", "density", "coverage")),
        *_interval_rows(versions, "coverage", "coverage", 3),
        ("utility accuracy", [_num(v["utility"]["accuracy"]) for v in versions]),
        ("utility balanced accuracy", [_num(v["utility"]["balanced_accuracy"]) for v in versions]),
        ("copies, fresh samples", [f"{v['memorisation']['fresh_copies']}/{v['fresh_samples']}" for v in versions]),
        ("copies, stored samples", [f"{v['memorisation']['stored_copies']}/{v['memorisation']['stored']}"
                                    for v in versions]),
    ]
    head = ["", *(label(v) for v in versions)]
    width0 = max(len(name) for name, _ in rows)
    widths = [max(len(h), *(len(cells[i]) for _, cells in rows)) for i, h in enumerate(head[1:])]
    lines = ["  ".join([head[0].ljust(width0), *(h.rjust(w) for h, w in zip(head[1:], widths))])]
    lines += ["  ".join([name.ljust(width0), *(c.rjust(w) for c, w in zip(cells, widths))]) for name, cells in rows]
    v0 = versions[0]
    lines.append(f"fresh samples: {v0['fresh_samples']} per version (same seeds); real test tiles: "
                 f"{v0['real_test_tiles']}; same classifier trained on {baseline['trained_on']} real train tiles: "
                 f"accuracy {baseline['accuracy']:.3f}, balanced accuracy {baseline['balanced_accuracy']:.3f}")
    if real and real.get("subsampled"):
        lines.append(f"real tiles subsampled to at most {real['per_class_cap']} per class: train "
                     f"{real['train']['used']} of {real['train']['available']}, test {real['test']['used']} of "
                     f"{real['test']['available']} (FID, precision/recall, utility and copies are against these)")
    return "\n".join(lines)


def flat_rows(versions: list[dict], baseline: dict) -> pd.DataFrame:
    """One row per version, nested metrics flattened (``expert.per_class.red.rate``)."""
    df = pd.json_normalize(versions)
    for k, v in baseline.items():
        df[f"baseline_real.{k}"] = v
    return df


def plot(versions: list[dict], baseline: dict, classes: list[str], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [label(v) for v in versions]
    xs = list(range(len(versions)))
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(versions) + 2), 3.6))
    series = [("all", lambda v: v["expert"])] + [(c, lambda v, c=c: v["expert"]["per_class"][c]) for c in classes]
    if any(v.get("simulated_expert") for v in versions):  # fresh samples, when the evaluation asked for it
        series.append(("simulated expert, fresh", lambda v: v.get("simulated_expert") or {"rate": None}))
    for j, (name, get) in enumerate(series):
        off = (j - (len(series) - 1) / 2) * 0.08
        pts = [(x + off, get(v)) for x, v in zip(xs, versions) if get(v)["rate"] is not None]
        if pts:
            ax.errorbar([p for p, _ in pts], [r["rate"] for _, r in pts],
                        yerr=[[r["rate"] - r["low"] for _, r in pts], [r["high"] - r["rate"] for _, r in pts]],
                        fmt="o-" if name == "all" else "s:" if name.startswith("simulated") else "o--", capsize=3,
                        label=name, lw=2 if name == "all" else 1)
    ax.set_xticks(xs, names)
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("plausibility (Wilson 95%)")
    ax.set_title("Plausibility by generator version")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no expert judgments yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out = [folder / PLOTS[0]]
    fig.savefig(out[0], dpi=110)
    plt.close(fig)

    panels = [("FID (lower is better)", [("FID", lambda v: v["fid"])]),
              ("precision / recall", [("precision", lambda v: v["precision"]), ("recall", lambda v: v["recall"])]),
              ("density / coverage", [("density", lambda v: v["density"]), ("coverage", lambda v: v["coverage"])]),
              ("utility (synthetic → real test)", [("accuracy", lambda v: v["utility"]["accuracy"]),
                                                    ("balanced acc.", lambda v: v["utility"]["balanced_accuracy"])]),
              ("reward-predicted plausibility", [("fresh", lambda v: v["reward"]["fresh"]["mean"] if v["reward"] else None),
                                                 ("stored", lambda v: v["reward"]["stored"]["mean"] if v["reward"] else None)]),
              ("copies (share of fresh samples)", [("copies", lambda v: v["memorisation"]["fresh_share"])])]
    fig, axes = plt.subplots(2, 3, figsize=(max(9, 1.2 * len(versions) * 3), 5.5))
    for ax, (title, lines) in zip(axes.flat, panels):
        for name, get in lines:
            ys = [get(v) for v in versions]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], "o-", label=name)
        if title.startswith("reward") and versions[0]["reward"] is None:
            ax.text(0.5, 0.5, "no reward version", ha="center", va="center", transform=ax.transAxes)
        if title.startswith("utility"):
            ax.axhline(baseline["accuracy"], color="grey", ls=":", label="trained on real")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(xs, names, fontsize=8)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        if len(lines) > 1 or title.startswith("utility"):
            ax.legend(fontsize=7)
    fig.suptitle("Metric trends by generator version")
    fig.tight_layout()
    out.append(folder / PLOTS[1])
    fig.savefig(out[1], dpi=110)
    plt.close(fig)
    return out


def write_evaluation(ws: Workspace, engine: Engine, versions: list[dict], baseline: dict, config: dict,
                     copies: list[dict], table: str) -> tuple[Path, list[int]]:
    """Write ``evaluations/<timestamp>/`` atomically, then one ``Evaluation`` row per version."""
    root = ws.root / "evaluations"
    root.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    final = root / stamp
    tmp = Path(tempfile.mkdtemp(prefix=f".{stamp}-", dir=root))
    try:
        classes = list(ws.settings.classes)
        (tmp / "metrics.json").write_text(json.dumps({"config": config, "baseline_real": baseline,
                                                      "versions": versions}, indent=1))
        flat_rows(versions, baseline).to_csv(tmp / "metrics.csv", index=False)
        pd.DataFrame(copies, columns=["generator_id", "sample_id", "class_name", "nearest_tile_id", "distance",
                                      "threshold", "copy"]).to_csv(tmp / "copies.csv", index=False)
        (tmp / "table.txt").write_text(table + "\n", encoding="utf-8")
        plot(versions, baseline, classes, tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rel = final.relative_to(ws.root).as_posix()
    try:
        with Session(engine) as s:
            rows = [Evaluation(generator_id=v["generator_id"], plots=[f"{rel}/{p}" for p in PLOTS],
                               metrics=v | {"baseline_real": baseline, "config": config, "folder": rel})
                    for v in versions]
            s.add_all(rows)
            s.commit()
            ids = [r.id for r in rows]
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return final, ids
