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
from store.errors import PathloopError
from store.generators import tile_table
from store.images import load_rgb
from store.judgments import record_judgment
from store.models import Annotator
from store.queue import next_item
from store.workspace import Workspace

PREFIX = "sim-expert"


def tile_features(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 → ``[DAB mean, R/G/B mean, R/G/B std, roughness]`` (8 floats)."""
    x = rgb.astype(np.float32) / 255.0
    dab = float(rgb2hed(rgb)[..., 2].mean())
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    blur = sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    rough = float(np.abs(x - blur).mean())
    return np.array([dab, *x.mean(axis=(0, 1)), *x.std(axis=(0, 1)), rough], dtype=np.float64)


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
        from pathloop.features import real_subsample  # the same choice as `pathloop evaluate`

        if per_class is not None and per_class < 5:
            raise PathloopError(f"per_class = {per_class}; the simulated expert needs at least 5 real train tiles "
                                f"of each class")
        table = tile_table(ws, engine, "train")
        pos = real_subsample(table.tile_ids, table.class_ids, per_class)
        images = table.images.take(pos)
        feats = np.zeros((len(pos), 8))
        for i in range(0, len(pos), 256):
            chunk = images.batch(range(i, min(i + 256, len(pos))))
            feats[i:i + len(chunk)] = [tile_features(rgb) for rgb in chunk]
        return cls.from_features(feats, table.class_ids[pos], list(ws.settings.classes), list(ws.settings.criteria))

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
             fit_per_class: int | None = REAL_PER_CLASS) -> SimulationReport:
    """Each simulated rater rates what the queue gives it until the queue is empty or ``max_per_rater``."""
    if raters < 1:
        raise PathloopError(f"raters = {raters}; expected at least 1")
    if not 0 <= noise <= 0.5:
        raise PathloopError(f"noise = {noise}; expected a share of flipped verdicts in [0, 0.5]")
    expert = expert or SimulatedExpert.fit(ws, engine, per_class=fit_per_class)
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
