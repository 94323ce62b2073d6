"""Held-out metrics of a reward model and its temperature scaling, as small pure functions.

Targets are soft (the share of experts who said plausible). ROC-AUC and balanced accuracy
need a side: a target above 0.5 is positive, below is negative, exactly 0.5 (a tie between
raters) takes no side and is left out of those two. The Brier score and the expected
calibration error (ECE) use the soft targets as they are.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import balanced_accuracy_score, roc_auc_score


def _sides(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    keep = t != 0.5
    y = t[keep] > 0.5
    if y.all() or not y.any():
        return None
    return p[keep], y


def roc_auc(p, t) -> float | None:
    """ROC-AUC of probabilities ``p`` against targets ``t``; None when only one side is present."""
    sides = _sides(np.asarray(p, float), np.asarray(t, float))
    return None if sides is None else float(roc_auc_score(sides[1], sides[0]))


def balanced_accuracy(p, t) -> float | None:
    """Mean of the true-positive and true-negative rates at p ≥ 0.5; None with one side only."""
    sides = _sides(np.asarray(p, float), np.asarray(t, float))
    return None if sides is None else float(balanced_accuracy_score(sides[1], sides[0] >= 0.5))


def brier(p, t) -> float:
    """Mean squared difference between probability and (soft) target."""
    p, t = np.asarray(p, float), np.asarray(t, float)
    return float(np.mean((p - t) ** 2))


def expected_calibration_error(p, t, bins: int = 10) -> float:
    """Σ_b (n_b / n) · |mean p_b − mean t_b| over ``bins`` equal-width probability bins."""
    p, t = np.asarray(p, float), np.asarray(t, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(p[sel].mean() - t[sel].mean())
    return float(total)


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, float)))


def soft_bce(logits, t) -> float:
    """Binary cross-entropy of logits against soft targets (numerically stable)."""
    z, t = np.asarray(logits, float), np.asarray(t, float)
    return float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))


def fit_temperature(logits, t) -> float:
    """The T > 0 minimising the BCE of ``sigmoid(logits / T)`` on validation targets ``t``."""
    z, t = np.asarray(logits, float), np.asarray(t, float)
    if len(z) == 0:
        return 1.0
    res = minimize_scalar(lambda log_t: soft_bce(z / math.exp(log_t), t), bounds=(-4.0, 4.0), method="bounded")
    return float(math.exp(res.x))


def evaluate(p, t) -> dict:
    """Every held-out metric for probabilities ``p`` and targets ``t`` (None where undefined)."""
    p, t = np.asarray(p, float), np.asarray(t, float)
    if len(p) == 0:
        return {"n": 0, "roc_auc": None, "balanced_accuracy": None, "brier": None, "ece": None}
    return {"n": int(len(p)), "roc_auc": roc_auc(p, t), "balanced_accuracy": balanced_accuracy(p, t),
            "brier": brier(p, t), "ece": expected_calibration_error(p, t)}
