"""A simulated expert: a programmatic rater for the demo, the study and benchmarks.

It judges a tile plausible only when it looks like the real tissue and stain of the class
it is shown as, by rules fitted once on the workspace's real train tiles (at most
``per_class`` of each class, chosen as `pathloop evaluate` chooses them: every tile of a
class under the cap, else a fixed hash-ranked subsample; only those are read):

- **staining**: the tile's mean DAB level (colour deconvolution, ``skimage.color.rgb2hed``)
  lies inside the central 90% of that class's real tiles;
- **wrong class**: its DAB level is nearer to another class's real median than to its own;
- **cytoplasm colour**: its per-channel mean and spread lie inside the real tiles' range
  (1st-99th percentile over all classes);
- **artefact**: its high-frequency energy (mean absolute difference to a 3×3 box blur, which
  diffusion noise raises far above tissue texture) stays below the real tiles' 99th
  percentile.

Those are the ``ihc-legacy`` rules (``SimulatedExpert``), written for the IHC demo. The
default rules (``StainExpert``, ``rules="stain"``) know no stain: a Macenko stain matrix is
estimated from the workspace's own train tiles and every rule is a per-class range fitted there:

- **staining**: each stain's mean concentration lies inside the class's robust range;
- **chromatin pattern**: each stain's spread (std) and the tile's gradient energy likewise;
- **cytoplasm colour**: its RGB mean likewise;
- **artefact**: its high-frequency energy is below the class's range top;
- **wrong class**: a logistic regression on those features, trained on the same real tiles,
  gives the shown class a probability below ``WRONG_CLASS_P``.

Each broken rule is a reason (when the workspace's criteria list it). It writes ordinary
``Judgment`` rows as a named annotator through the same queue the app uses, so leases,
overlap and controls work unchanged. ``noise`` flips a share of its verdicts; several
raters (``sim-expert-1``, ``-2``, ...) with their own noise exercise the agreement metrics.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import numpy as np
from skimage.color import rgb2hed
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from pathloop.evaluate_config import REAL_PER_CLASS
from pathloop.macenko import concentrations, macenko_matrix
from store.errors import PathloopError
from store.generators import tile_table
from store.images import load_rgb
from store.judgments import record_judgment
from store.models import Annotator
from store.queue import next_item
from store.workspace import Workspace

PREFIX = "sim-expert"
RULES = ("stain", "ihc-legacy")
RANGE_Q = (0.5, 99.5)  # per-class percentiles of each feature, then widened by RANGE_PAD of their width
RANGE_PAD = 0.15
SPREAD_COLUMNS = np.array([0, 0, 1, 1, 0, 0, 0, 1, 1], bool)  # stain stds, gradient and high-frequency energy
WRONG_CLASS_P = 0.4  # shown-class probability under which the classifier calls the tile another class
# Feature columns of stain_features and the reason a value outside its class range gives.
STAIN_REASONS = ["staining", "staining", "chromatin pattern", "chromatin pattern",
                 "cytoplasm colour", "cytoplasm colour", "cytoplasm colour", "chromatin pattern", "artefact"]


def tile_features(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 → ``[DAB mean, R/G/B mean, R/G/B std, roughness]`` (8 floats)."""
    x = rgb.astype(np.float32) / 255.0
    dab = float(rgb2hed(rgb)[..., 2].mean())
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    blur = sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    rough = float(np.abs(x - blur).mean())
    return np.array([dab, *x.mean(axis=(0, 1)), *x.std(axis=(0, 1)), rough], dtype=np.float64)


def train_subsample(ws: Workspace, engine: Engine, per_class: int | None):
    """``(image column, class ids)`` of at most ``per_class`` real train tiles per class (None: all), the same
    choice as `pathloop evaluate`; pixels are read later, in batches."""
    from pathloop.features import real_subsample

    if per_class is not None and per_class < 5:
        raise PathloopError(f"per_class = {per_class}; the simulated expert needs at least 5 real train tiles "
                            f"of each class")
    table = tile_table(ws, engine, "train")
    pos = real_subsample(table.tile_ids, table.class_ids, per_class)
    return table.images.take(pos), table.class_ids[pos]


@dataclass
class SimulatedExpert:
    """Rules fitted on real tiles; ``judge`` gives (verdict, reasons)."""

    classes: list[str]
    dab_range: dict[str, tuple[float, float]]
    dab_median: dict[str, float]
    colour_lo: np.ndarray
    colour_hi: np.ndarray
    rough_hi: float
    criteria: list[str]

    @classmethod
    def fit(cls, ws: Workspace, engine: Engine, per_class: int | None = REAL_PER_CLASS) -> SimulatedExpert:
        """Fitted on at most ``per_class`` real train tiles of each class (None: all), read in batches."""
        images, labels = train_subsample(ws, engine, per_class)
        pos = range(len(labels))
        feats = np.zeros((len(pos), 8))
        for i in range(0, len(pos), 256):
            chunk = images.batch(range(i, min(i + 256, len(pos))))
            feats[i:i + len(chunk)] = [tile_features(rgb) for rgb in chunk]
        return cls.from_features(feats, labels, list(ws.settings.classes), list(ws.settings.criteria))

    @classmethod
    def from_tiles(cls, images: np.ndarray, labels: np.ndarray, classes: list[str], criteria: list[str]
                   ) -> SimulatedExpert:
        """Fitted on ``(N, H, W, 3)`` uint8 real tiles with class indices ``labels`` (what `evaluate` has read)."""
        feats = np.stack([tile_features(rgb) for rgb in images]) if len(images) else np.zeros((0, 8))
        return cls.from_features(feats, labels, classes, criteria)

    @classmethod
    def from_features(cls, features: np.ndarray, labels: np.ndarray, classes: list[str], criteria: list[str]
                      ) -> SimulatedExpert:
        """Fitted on ``tile_features`` rows of real train tiles with class indices ``labels``."""
        labels = np.asarray(labels)
        feats = {c: features[labels == i] for i, c in enumerate(classes)}
        missing = [c for c, f in feats.items() if len(f) < 5]
        if missing:
            raise PathloopError(f"the simulated expert needs at least 5 real train tiles of each class; "
                                f"{missing[0]!r} has {len(feats[missing[0]])}")
        every = np.concatenate(list(feats.values()))
        return cls(
            classes=classes,
            dab_range={c: (float(np.percentile(f[:, 0], 5)), float(np.percentile(f[:, 0], 95))) for c, f in feats.items()},
            dab_median={c: float(np.median(f[:, 0])) for c, f in feats.items()},
            colour_lo=np.percentile(every[:, 1:7], 1, axis=0), colour_hi=np.percentile(every[:, 1:7], 99, axis=0),
            rough_hi=float(np.percentile(every[:, 7], 99)), criteria=list(criteria))

    def reasons(self, rgb: np.ndarray, class_name: str) -> list[str]:
        """The rules a tile shown as ``class_name`` breaks (empty: plausible)."""
        f = tile_features(rgb)
        out = []
        lo, hi = self.dab_range[class_name]
        if not lo <= f[0] <= hi:
            out.append("staining")
        nearest = min(self.classes, key=lambda c: abs(f[0] - self.dab_median[c]))
        if nearest != class_name:
            out.append("wrong class")
        if np.any(f[1:7] < self.colour_lo) or np.any(f[1:7] > self.colour_hi):
            out.append("cytoplasm colour")
        if f[7] > self.rough_hi:
            out.append("artefact")
        return out

    def judge(self, rgb: np.ndarray, class_name: str) -> tuple[str, list[str]]:
        broken = self.reasons(rgb, class_name)
        return ("implausible" if broken else "plausible"), [r for r in broken if r in self.criteria]


def stain_features(rgb: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8, ``(2, 3)`` stains → 9 floats: stain 1/2 mean, stain 1/2 std, R/G/B mean,
    gradient energy (mean |∇| of grey), high-frequency energy (mean |x - 3×3 box blur|)."""
    conc = concentrations(rgb, stains)
    x = rgb.astype(np.float32) / 255.0
    grey = x.mean(axis=2)
    grad = float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())
    rough = tile_features(rgb)[7]
    return np.array([*conc.mean(axis=(0, 1)), *conc.std(axis=(0, 1)), *x.mean(axis=(0, 1)), grad, rough])


def _fit_softmax(z: np.ndarray, labels: np.ndarray, k: int, steps: int = 500, l2: float = 1e-2) -> np.ndarray:
    """Multinomial logistic regression by gradient descent: ``(N, F)`` standardised features →
    ``(F + 1, k)`` weights (last row: bias)."""
    xb = np.hstack([z, np.ones((len(z), 1))])
    onehot = np.eye(k)[labels]
    w = np.zeros((xb.shape[1], k))
    for _ in range(steps):
        p = _softmax(xb @ w)
        w -= 0.5 * (xb.T @ (p - onehot) / len(z) + l2 * w)
    return w


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class StainExpert:
    """Stain-agnostic rules fitted on real tiles; same ``judge`` interface as ``SimulatedExpert``."""

    classes: list[str]
    stains: np.ndarray  # (2, 3) Macenko stain vectors of the train tiles
    lo: dict[str, np.ndarray]  # per class, (9,) lower bounds of stain_features
    hi: dict[str, np.ndarray]
    mu: np.ndarray  # (9,) standardisation of the classifier's input
    sd: np.ndarray
    weights: np.ndarray  # (10, k) logistic regression
    criteria: list[str]

    @classmethod
    def fit(cls, ws: Workspace, engine: Engine, per_class: int | None = REAL_PER_CLASS) -> StainExpert:
        """Fitted on at most ``per_class`` real train tiles of each class (None: all)."""
        images, labels = train_subsample(ws, engine, per_class)
        n = len(labels)
        tiles = np.concatenate([images.batch(range(i, min(i + 256, n))) for i in range(0, n, 256)])
        return cls.from_tiles(tiles, labels, list(ws.settings.classes), list(ws.settings.criteria))

    @classmethod
    def from_tiles(cls, images: np.ndarray, labels: np.ndarray, classes: list[str], criteria: list[str]
                   ) -> StainExpert:
        """Fitted on ``(N, H, W, 3)`` uint8 real tiles with class indices ``labels``."""
        labels = np.asarray(labels)
        counts = [int((labels == i).sum()) for i in range(len(classes))]
        if min(counts, default=0) < 5:
            i = int(np.argmin(counts))
            raise PathloopError(f"the simulated expert needs at least 5 real train tiles of each class; "
                                f"{classes[i]!r} has {counts[i]}")
        stains = macenko_matrix(np.asarray(images))
        feats = np.stack([stain_features(rgb, stains) for rgb in images])
        lo, hi = {}, {}
        for i, c in enumerate(classes):
            a, b = np.percentile(feats[labels == i], RANGE_Q, axis=0)
            # Spreads and textures are positive: their lower bound never pads down to a flat tile's 0.
            lo[c] = np.where(SPREAD_COLUMNS, np.maximum(a - RANGE_PAD * (b - a), a * (1 - RANGE_PAD)),
                             a - RANGE_PAD * (b - a))
            hi[c] = b + RANGE_PAD * (b - a)
        mu, sd = feats.mean(axis=0), feats.std(axis=0) + 1e-9
        weights = _fit_softmax((feats - mu) / sd, labels, len(classes))
        return cls(classes, stains, lo, hi, mu, sd, weights, list(criteria))

    def class_probabilities(self, rgb: np.ndarray) -> np.ndarray:
        """``(k,)`` the classifier's probability of each class for one tile."""
        z = (stain_features(rgb, self.stains) - self.mu) / self.sd
        return _softmax(np.append(z, 1.0) @ self.weights)

    def reasons(self, rgb: np.ndarray, class_name: str) -> list[str]:
        """The rules a tile shown as ``class_name`` breaks (empty: plausible), each named once."""
        f = stain_features(rgb, self.stains)
        out = [r for r, v, a, b in zip(STAIN_REASONS, f, self.lo[class_name], self.hi[class_name])
               if not a <= v <= b]
        z = (f - self.mu) / self.sd
        if _softmax(np.append(z, 1.0) @ self.weights)[self.classes.index(class_name)] < WRONG_CLASS_P:
            out.append("wrong class")
        return list(dict.fromkeys(out))

    judge = SimulatedExpert.judge


def fit_expert(ws: Workspace, engine: Engine, rules: str = "stain", per_class: int | None = REAL_PER_CLASS):
    """The simulated expert of ``rules`` (``stain`` or ``ihc-legacy``) fitted on the workspace."""
    if rules not in RULES:
        raise PathloopError(f"rules {rules!r}; expected one of {', '.join(RULES)}")
    return (StainExpert if rules == "stain" else SimulatedExpert).fit(ws, engine, per_class=per_class)


@dataclass
class SimulationReport:
    judgments: int = 0
    plausible: int = 0
    controls: int = 0


def rater_ids(engine: Engine, raters: int) -> list[int]:
    """The simulated raters' accounts (``sim-expert-1`` …), created when missing, with no password."""
    from store.accounts import add_user

    ids = []
    for i in range(1, raters + 1):
        name = f"{PREFIX}-{i}"
        with Session(engine) as s:
            found = s.exec(select(Annotator.id).where(Annotator.username == name)).first()
        if found is None:
            found = add_user(engine, name, role="annotator", password=uuid.uuid4().hex)[0].id
        ids.append(found)
    return ids


def simulate(ws: Workspace, engine: Engine, *, raters: int = 1, max_per_rater: int | None = None,
             noise: float = 0.0, seed: int = 0, expert: SimulatedExpert | None = None,
             fit_per_class: int | None = REAL_PER_CLASS, rules: str = "stain") -> SimulationReport:
    """Each simulated rater rates what the queue gives it until the queue is empty or ``max_per_rater``."""
    if raters < 1:
        raise PathloopError(f"raters = {raters}; expected at least 1")
    if not 0 <= noise <= 0.5:
        raise PathloopError(f"noise = {noise}; expected a share of flipped verdicts in [0, 0.5]")
    expert = expert or fit_expert(ws, engine, rules, per_class=fit_per_class)
    report = SimulationReport()
    for k, annotator in enumerate(rater_ids(engine, raters)):
        rng = random.Random(f"{seed}:{k}")
        done = 0
        while max_per_rater is None or done < max_per_rater:
            item = next_item(ws, engine, annotator, rng_seed=seed)
            if item is None:
                break
            verdict, reasons = expert.judge(load_rgb(item.image_path, ws.settings.tile_size), item.shown_class)
            if rng.random() < noise:
                verdict, reasons = ("implausible", []) if verdict == "plausible" else ("plausible", [])
            record_judgment(ws, engine, annotator, kind=item.kind, item_id=item.item_id, verdict=verdict,
                            reasons=reasons, seconds=round(rng.uniform(2.0, 8.0), 1),
                            request_id=f"sim-{uuid.uuid4().hex}")
            done += 1
            report.judgments += 1
            report.plausible += verdict == "plausible"
            report.controls += item.kind == "control"
    return report
