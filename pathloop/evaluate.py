"""`pathloop evaluate`: generator versions side by side (DESIGN.md, "Evaluation").

Per version:

- **expert plausibility**: share of current decisive judgments (plausible / implausible) on
  the version's stored samples that say plausible, overall and per class, with Wilson 95%
  intervals and the number of judgments;
- **reward-predicted plausibility** under the current (newest) reward version: of the
  version's stored samples (stored ``RewardScore`` rows where present, else scored now, not
  written) and of the fresh samples below;
- **fidelity and diversity** of *fresh* samples — ``per_class`` per class, the same seeds for
  every version, never stored — against the real **test** tiles: FID (torchmetrics, fed the
  extractor's features through an identity feature module), precision, recall, density and
  coverage (``prdc``), in the feature space of a fixed extractor (pathloop/features.py);
  FID and coverage with percentile-bootstrap 95% intervals (``bootstrap`` resamples);
- **downstream utility**: the small classifier trained on the fresh synthetic tiles only,
  tested on the real test tiles (accuracy, balanced accuracy), next to the same recipe
  trained on the real train tiles;
- **simulated expert** (``simulated_expert``): the share of the fresh samples the rule-based
  rater of ``pathloop/simulate.py`` calls plausible, with Wilson intervals, overall and per
  class: plausibility of samples nobody rated, which the study tracks round by round;
- **memorisation**: each sample's nearest real train tile in the same feature space; a sample
  at or below the ``copy_percentile``-th percentile of real-to-real nearest-neighbour
  distances (train tiles, leave-one-out) is flagged as a copy. Reported for the fresh samples
  (share) and for every stored sample (``copies.csv``, one row per sample).

Real tiles are read from the store in batches, and only some: at most ``real_per_class`` of
each class per split (``real_reference``). A class with fewer keeps every tile, so a split
under the cap is measured exactly as before the cap; a larger class keeps the same
hash-ranked subsample every time (``features.real_subsample``), which the extractor, the
real-tile classifier, the copy check and the simulated expert all use. How many were read
and whether any split was subsampled is in the config (``real_tiles``) and each version's
metrics (``real_train_tiles``, ``real_test_tiles``, ``real_subsampled``).

Fresh samples make versions comparable (a new child has no stored samples, and stored ones
differ in number, seeds and rounds); the stored ones are what experts rated and labs share.
Everything is computed before anything is written; then the folder
``evaluations/<timestamp>/`` appears at once and one ``Evaluation`` row per version is added.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.neighbors import NearestNeighbors
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from tqdm.auto import tqdm

from pathloop.evaluate_config import EvaluateConfig
from pathloop.features import (
    REAL_SUBSAMPLE_SEED,
    FeatureExtractor,
    predict,
    read_tiles,
    real_subsample,
    timm_extractor,
    train_classifier,
    workspace_extractor,
)
from store.agreement import wilson_interval
from store.errors import PathloopError
from store.generators import TileTable, get_generator, sample_seed, tile_table
from store.images import load_rgb
from store.judgments import DECISIVE, is_current
from store.models import GeneratorVersion, Image, Judgment, Sample
from store.workspace import Workspace

EVAL_SEED_OFFSET = 1_000_000_007  # fresh samples' seeds never coincide with `generate --seed N` ones


# ---------------------------------------------------------------- metrics on feature arrays


class _GivenFeatures(torch.nn.Module):
    """Identity 'extractor' for torchmetrics: the features are computed once, upstream."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between ``(N, D)`` and ``(M, D)`` feature sets (N, M >= 2), via torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise PathloopError(f"FID needs at least 2 real and 2 synthetic tiles (got {len(real)} and {len(fake)})")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(fake, dtype=torch.float64), real=False)
    return max(0.0, float(metric.compute()))


def prdc(real: np.ndarray, fake: np.ndarray, nearest_k: int = 5) -> dict[str, float]:
    """Precision, recall, density, coverage (Naeem et al. 2020) via the ``prdc`` package.

    ``k`` is capped at ``len(real) - 2`` and ``len(fake) - 2`` (prdc takes each point's
    (k+1)-th nearest, itself included) so small sets still work.
    """
    from prdc import compute_prdc

    if len(real) < 3 or len(fake) < 3:
        raise PathloopError(f"precision/recall/density/coverage need at least 3 real and 3 synthetic tiles "
                            f"(got {len(real)} and {len(fake)})")
    k = max(1, min(nearest_k, len(real) - 2, len(fake) - 2))
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints its set sizes
        out = compute_prdc(real_features=np.asarray(real, dtype=np.float64),
                           fake_features=np.asarray(fake, dtype=np.float64), nearest_k=k)
    return {name: float(v) for name, v in out.items()} | {"k": k}


def bootstrap_intervals(real: np.ndarray, fake: np.ndarray, *, n_boot: int, seed: int, nearest_k: int = 5,
                        level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of FID and coverage from ``(N, D)`` real and ``(M, D)`` fake features.

    FID: both sets are resampled with replacement (the draw of the fresh tiles and of the real
    test tiles). Coverage is a mean over real tiles of "a fake lies within this tile's k-NN
    radius": the real tiles are resampled with their radii and indicators fixed, as computed
    on the full sets. (Resampling the fakes would bias it: a resample holds about 63% of the
    distinct fakes, so it covers less, and the interval can miss the point estimate.) So the
    coverage interval is the spread from the real test set; the spread from the fresh draw is
    what other seeds show. ``n_boot`` draws from one seeded generator: reproducible. Returns
    ``{"fid": {"low", "high"}, "coverage": {"low", "high"}, "resamples": n_boot}``.
    """
    from sklearn.metrics import pairwise_distances

    if n_boot < 2:
        raise PathloopError(f"bootstrap = {n_boot}; expected at least 2 resamples (or 0 for none)")
    k = max(1, min(nearest_k, len(real) - 2, len(fake) - 2))  # as prdc() caps it
    real_d = pairwise_distances(real)
    radius = np.sort(real_d, axis=1)[:, k]  # the k-th nearest other real tile (index 0 is the tile itself)
    covered = (pairwise_distances(real, fake).min(axis=1) < radius).astype(np.float64)
    rng = np.random.default_rng(seed)
    fids, covs = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        r_idx = rng.integers(0, len(real), len(real))
        fids[b] = fid(real[r_idx], fake[rng.integers(0, len(fake), len(fake))])
        covs[b] = covered[r_idx].mean()
    tail = 100 * (1 - level) / 2
    return {name: {"low": float(np.percentile(v, tail)), "high": float(np.percentile(v, 100 - tail))}
            for name, v in (("fid", fids), ("coverage", covs))} | {"resamples": n_boot}


def copy_threshold(train: np.ndarray, percentile: float = 5.0) -> float:
    """The ``percentile``-th percentile of each train feature's distance to its nearest *other* train feature."""
    if len(train) < 2:
        raise PathloopError(f"memorisation needs at least 2 real train tiles (got {len(train)})")
    dist, _ = NearestNeighbors(n_neighbors=2).fit(train).kneighbors(train)
    return float(np.percentile(dist[:, 1], percentile))


def nearest_train(train: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each sample feature: (index of the nearest train feature, its Euclidean distance)."""
    if len(samples) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    dist, idx = NearestNeighbors(n_neighbors=1).fit(train).kneighbors(samples)
    return idx[:, 0], dist[:, 0]


def flag_copies(train: np.ndarray, samples: np.ndarray, percentile: float = 5.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(nearest index, distance, is_copy, threshold)``: a copy is at or below the threshold."""
    thr = copy_threshold(train, percentile)
    idx, dist = nearest_train(train, samples)
    return idx, dist, dist <= thr, thr


def rate(k: int, n: int) -> dict:
    """Share with its Wilson 95% interval; ``rate`` None when there is nothing to count."""
    low, high = wilson_interval(k, n)
    return {"n": n, "plausible": k, "rate": k / n if n else None, "low": low, "high": high}


# ---------------------------------------------------------------- reading the store


def lineage(engine: Engine, generator_id: int) -> list[int]:
    """``generator_id`` and its ancestors (``parent_id``), root first."""
    chain: list[int] = []
    gid: int | None = generator_id
    with Session(engine) as s:
        while gid is not None and gid not in chain:
            gv = s.get(GeneratorVersion, gid)
            if gv is None:
                raise PathloopError(f"generator version {gid} (parent of {chain[-1]}) does not exist")
            chain.append(gid)
            gid = gv.parent_id
    return chain[::-1]


def chosen_versions(engine: Engine, model: int | None, against: list[int] | None) -> list[int]:
    """``model`` and ``against`` by id; without ``against``, ``model``'s lineage; without ``model``, the current one's."""
    from pathloop.rounds import current_generator_id

    if model is None:
        model = current_generator_id(engine)
        if model is None:
            raise PathloopError("no generator versions yet; `pathloop pretrain` or `pathloop import-model DIR` first")
    for gid in [model, *(against or [])]:
        get_generator(engine, gid)  # a clear error for an unknown id
    if not against:
        return lineage(engine, model)
    return sorted({model, *against})


def expert_plausibility(engine: Engine, generator_id: int, classes: list[str]) -> dict:
    """Current decisive judgments of the version's samples: overall and per class (``rate``)."""
    with Session(engine) as s:
        rows = s.exec(select(Sample.class_name, Judgment.verdict).join(Sample, Sample.id == Judgment.sample_id)
                      .where(Sample.generator_id == generator_id, Judgment.verdict.in_(DECISIVE), is_current())).all()
    out = rate(sum(v == "plausible" for _, v in rows), len(rows))
    out["per_class"] = {c: rate(sum(v == "plausible" for cc, v in rows if cc == c), sum(cc == c for cc, _ in rows))
                        for c in classes}
    return out


def stored_samples(ws: Workspace, engine: Engine, generator_id: int) -> list[tuple[int, Path, str]]:
    """``(sample id, image path, class)`` of the version's stored samples, by id."""
    with Session(engine) as s:
        rows = s.exec(select(Sample.id, Image.path, Sample.class_name).join(Image, Image.id == Sample.image_id)
                      .where(Sample.generator_id == generator_id).order_by(Sample.id)).all()
    return [(sid, ws.root / path, c) for sid, path, c in rows]


@dataclass
class RealTiles:
    """The real tiles of one split that an evaluation reads: at most ``per_class`` of each class."""

    split: str
    tile_ids: np.ndarray  # (n,) int64, ascending
    labels: np.ndarray  # (n,) int64 class indices
    available: int  # tiles of the split in the workspace
    per_class: int
    table: TileTable  # the whole split's columns (a few dozen bytes a tile, no pixels)
    positions: np.ndarray  # rows of ``table`` chosen

    @property
    def subsampled(self) -> bool:
        return len(self.tile_ids) < self.available

    def load(self, progress: bool = False) -> np.ndarray:
        """The chosen tiles' pixels ``(n, H, W, 3)`` uint8, read from the store in batches."""
        return read_tiles(self.table.images, self.positions, progress=progress, desc=f"read {self.split} tiles")

    def summary(self, classes: list[str]) -> dict:
        return {"used": len(self.tile_ids), "available": self.available, "subsampled": self.subsampled,
                "per_class": {c: int((self.labels == i).sum()) for i, c in enumerate(classes)}}


def real_reference(ws: Workspace, engine: Engine, split: str, per_class: int,
                   seed: int = REAL_SUBSAMPLE_SEED) -> RealTiles:
    """At most ``per_class`` tiles of each class of ``split``, chosen from the store's columns (``tile_table``);
    a split under the cap gives every tile in id order (what the evaluation read before the cap)."""
    table = tile_table(ws, engine, split)
    pos = real_subsample(table.tile_ids, table.class_ids, per_class, seed)
    return RealTiles(split, table.tile_ids[pos], table.class_ids[pos], len(table), per_class, table, pos)


# ---------------------------------------------------------------- one evaluation


@dataclass
class EvaluationResult:
    """What `evaluate` measured and wrote: ``versions`` holds one metrics dict per version."""

    versions: list[dict]
    baseline: dict
    config: dict
    folder: Path
    evaluation_ids: list[int]
    table: str


def fresh_samples(ws: Workspace, engine: Engine, generator_id: int, cfg: EvaluateConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` new tiles per class from the version, seeds fixed by ``cfg.seed``: ``(N, H, W, 3)``, labels."""
    from finetune.registry import load_generator
    from finetune.sample import SampleSettings, sample_images

    gen = load_generator(ws, engine, generator_id)
    SampleSettings(cfg.sampler, cfg.steps, cfg.guidance).check(gen.scheduler_config["num_train_timesteps"])
    todo = [(ci, sample_seed(EVAL_SEED_OFFSET + cfg.seed, c, i))
            for ci, c in enumerate(gen.classes) for i in range(cfg.per_class)]
    images = []
    for b in range(0, len(todo), 64):
        batch = todo[b:b + 64]
        images.append(sample_images(gen.unet, gen.scheduler_config, [ci for ci, _ in batch], [s for _, s in batch],
                                    null_id=gen.null_id, sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance))
    return np.concatenate(images), np.array([ci for ci, _ in todo])


def _reward(reward_fn, images: np.ndarray, labels: list[str]) -> np.ndarray:
    from pathloop.features import to_tensor

    ids = torch.tensor([reward_fn.classes.index(c) for c in labels], dtype=torch.long)
    return np.concatenate([reward_fn(to_tensor(images[i:i + 256]), ids[i:i + 256]).float().cpu().numpy()
                           for i in range(0, len(images), 256)])


def _mean_by_class(p: np.ndarray, labels: list[str], classes: list[str]) -> dict:
    per = {c: float(np.mean([x for x, lc in zip(p, labels) if lc == c])) if c in labels else None for c in classes}
    return {"n": len(p), "mean": float(np.mean(p)) if len(p) else None, "per_class": per}


def simulated_plausibility(expert, images: np.ndarray, labels: list[str], classes: list[str]) -> dict:
    """The simulated expert's verdicts on tiles shown as ``labels``: ``rate`` overall and per class, and the
    count of each reason it gave."""
    verdicts = [expert.judge(img, c) for img, c in zip(images, labels)]
    ok = [v == "plausible" for v, _ in verdicts]
    out = rate(sum(ok), len(ok))
    out["per_class"] = {c: rate(sum(o for o, lc in zip(ok, labels) if lc == c), labels.count(c)) for c in classes}
    reasons: dict[str, int] = {}
    for _, rs in verdicts:
        for r in rs:
            reasons[r] = reasons.get(r, 0) + 1
    out["reasons"] = reasons
    return out


def reward_plausibility(engine: Engine, reward_fn, stored: list[tuple[int, Path, str]], stored_images: np.ndarray,
                        fresh: np.ndarray, fresh_labels: list[str], classes: list[str]) -> dict | None:
    """Mean p(plausible) of the stored samples (stored scores first) and of the fresh ones; None without a reward."""
    if reward_fn is None:
        return None
    from store.rewards import scores_of

    known = scores_of(engine, reward_fn.reward_id)
    p = np.array([known.get(sid, np.nan) for sid, _, _ in stored], dtype=np.float64)
    missing = np.flatnonzero(np.isnan(p))
    if len(missing):
        p[missing] = _reward(reward_fn, stored_images[missing], [stored[i][2] for i in missing])
    return {"reward_id": reward_fn.reward_id, "scored_now": int(len(missing)),
            "stored": _mean_by_class(p, [c for _, _, c in stored], classes),
            "fresh": _mean_by_class(_reward(reward_fn, fresh, fresh_labels), fresh_labels, classes)}


def evaluate(ws: Workspace, engine: Engine, cfg: EvaluateConfig, *, model: int | None = None,
             against: list[int] | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> EvaluationResult:
    """Measure the chosen versions, write ``evaluations/<timestamp>/`` and one ``Evaluation`` row each."""
    from pathloop.evaluation_report import format_table, write_evaluation
    from reward.score import load_reward
    from store.rewards import current_reward_id

    classes, size = list(ws.settings.classes), ws.settings.tile_size
    versions = chosen_versions(engine, model, against)
    for gid in versions:  # before anything is trained or written
        if not (ws.root / get_generator(engine, gid).folder / "unet" / "config.json").is_file():
            raise PathloopError(f"generator version {gid}: its folder is missing or incomplete")
    train = real_reference(ws, engine, "train", cfg.real_per_class)
    test = real_reference(ws, engine, "test", cfg.real_per_class)
    if len(train.tile_ids) < 2 or len(test.tile_ids) < 3:
        capped = f"; at most {cfg.real_per_class} per class are read" if train.subsampled or test.subsampled else ""
        raise PathloopError(f"evaluation needs at least 2 real train and 3 real test tiles (the workspace has "
                            f"{train.available} and {test.available}{capped})")
    if cfg.features.startswith("timm:"):
        extractor, info = timm_extractor(cfg.features.split(":", 1)[1], Path(cfg.weights) if cfg.weights else None)
    real = {"per_class_cap": cfg.real_per_class, "subsampled": train.subsampled or test.subsampled,
            "train": train.summary(classes), "test": test.summary(classes)}
    if real["subsampled"]:
        log(f"reading at most {cfg.real_per_class} real tiles per class: {len(train.tile_ids)} of {train.available} "
            f"train, {len(test.tile_ids)} of {test.available} test")
    train_x, train_y, train_ids = train.load(progress), train.labels, train.tile_ids
    test_x, test_y = test.load(progress), test.labels
    del train, test  # the splits' columns: only the chosen tiles are kept
    rid = current_reward_id(engine)
    reward_fn = load_reward(ws, engine, rid) if rid is not None else None
    if reward_fn is not None and (set(classes) - set(reward_fn.classes) or reward_fn.image_size != size):
        raise PathloopError(f"reward version {rid} was trained on classes {', '.join(reward_fn.classes)} at "
                            f"{reward_fn.image_size} px; expected the workspace's {', '.join(classes)} at {size} px")
    judge = None  # fitted before anything is trained or cached, so a misfit writes nothing
    if cfg.simulated_expert:
        from pathloop.simulate import SimulatedExpert, StainExpert

        rules = StainExpert if cfg.expert_rules == "stain" else SimulatedExpert
        judge = rules.from_tiles(train_x, train_y, classes, list(ws.settings.criteria))  # = fit()
    if not cfg.features.startswith("timm:"):
        extractor, info = workspace_extractor(ws, train_ids.tolist(), train_x, train_y)
        if info.trained_now:
            log(f"trained the feature extractor on {len(train_ids)} real train tiles: {info.folder}")

    train_f, test_f = extractor.embed(train_x), extractor.embed(test_x)
    threshold = copy_threshold(train_f, cfg.copy_percentile)
    real_clf = train_classifier(train_x, train_y, len(classes), epochs=cfg.utility_epochs, seed=cfg.seed + 1)
    baseline = _utility(real_clf, test_x, test_y) | {"trained_on": len(train_x)}

    results, copies = [], []
    for gid in tqdm(versions, desc="evaluate", unit="version", disable=not progress):
        gv = get_generator(engine, gid)
        fresh, fresh_y = fresh_samples(ws, engine, gid, cfg)
        fresh_labels = [classes[i] for i in fresh_y]
        fresh_f = extractor.embed(fresh)
        stored = stored_samples(ws, engine, gid)
        stored_x = np.stack([load_rgb(p, size) for _, p, _ in stored]) if stored else np.zeros((0, size, size, 3),
                                                                                               np.uint8)
        _, fresh_d = nearest_train(train_f, fresh_f)
        s_idx, s_dist = nearest_train(train_f, extractor.embed(stored_x))
        for (sid, _, c), i, d in zip(stored, s_idx, s_dist):
            copies.append({"generator_id": gid, "sample_id": sid, "class_name": c,
                           "nearest_tile_id": int(train_ids[i]), "distance": float(d),
                           "threshold": threshold, "copy": bool(d <= threshold)})
        syn_clf = train_classifier(fresh, fresh_y, len(classes), epochs=cfg.utility_epochs, seed=cfg.seed + 1)
        n_copies = int((s_dist <= threshold).sum())
        results.append({
            "generator_id": gid, "parent_id": gv.parent_id, "round": gv.round_number, "kind": gv.kind,
            "expert": expert_plausibility(engine, gid, classes),
            "reward": reward_plausibility(engine, reward_fn, stored, stored_x, fresh, fresh_labels, classes),
            "simulated_expert": simulated_plausibility(judge, fresh, fresh_labels, classes) if judge else None,
            "fid": fid(test_f, fresh_f), **prdc(test_f, fresh_f, cfg.nearest_k),
            "intervals": (bootstrap_intervals(test_f, fresh_f, n_boot=cfg.bootstrap, seed=cfg.seed,
                                              nearest_k=cfg.nearest_k) if cfg.bootstrap else None),
            "utility": _utility(syn_clf, test_x, test_y) | {"trained_on": len(fresh)},
            "memorisation": {"threshold": threshold, "fresh_copies": int((fresh_d <= threshold).sum()),
                             "fresh_share": float((fresh_d <= threshold).mean()),
                             "fresh_median_distance": float(np.median(fresh_d)),
                             "stored_copies": n_copies, "stored": len(stored), "reference_tiles": len(train_f)},
            "fresh_samples": len(fresh), "real_test_tiles": len(test_x), "real_train_tiles": len(train_x),
            "real_subsampled": real["subsampled"],
        })
    config = asdict(cfg) | {"extractor": info.name, "extractor_folder": str(info.folder) if info.folder else None,
                            "versions": versions, "real_tiles": real}
    table = format_table(results, baseline, classes, real)
    folder, ids = write_evaluation(ws, engine, results, baseline, config, copies, table)
    return EvaluationResult(results, baseline, config, folder, ids, table)


def copy_flags(ws: Workspace) -> dict[int, bool]:
    """sample id → flagged as a copy, from the newest evaluation that measured the sample
    (``evaluations/*/copies.csv``); what an export that leaves copies out reads."""
    import pandas as pd

    flags: dict[int, bool] = {}
    for f in sorted((ws.root / "evaluations").glob("2*/copies.csv")):  # timestamped names sort by time
        frame = pd.read_csv(f)
        flags.update(zip(frame["sample_id"].astype(int), frame["copy"].astype(bool)))
    return flags


def _utility(model, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    pred = predict(model, test_x)
    return {"accuracy": float(accuracy_score(test_y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(test_y, pred))}


__all__ = ["EvaluateConfig", "EvaluationResult", "FeatureExtractor", "evaluate", "fid", "prdc", "bootstrap_intervals",
           "flag_copies", "copy_threshold", "copy_flags", "nearest_train", "lineage", "chosen_versions", "expert_plausibility"]
