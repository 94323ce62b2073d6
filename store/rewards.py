"""Reward model versions, the data they learn from, and their scores, in the store.

A version's folder lives in ``models/rewards/<id>``, registered all or nothing
(``store/versions.py``). The functions here read what training needs (rated samples with
their current decisive judgments, real tiles for weak labels) and write what scoring
produces (``RewardScore`` rows, one per sample and version, inserted idempotently).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from store import versions
from store.db import write_session
from store.errors import PathloopError
from store.images import ShardSlot, locate, location_columns
from store.judgments import DECISIVE, is_current
from store.models import Image, Judgment, RewardScore, RewardVersion, Sample, Tile, utcnow
from store.workspace import Workspace

SAMPLE_CHOICES = ("unscored", "all")


def rewards_dir(ws: Workspace) -> Path:
    return ws.models_dir / "rewards"


def incoming_folder(ws: Workspace) -> Path:
    """A fresh folder to export a reward model into before it is registered."""
    return versions.incoming_folder(rewards_dir(ws))


def register_reward(ws: Workspace, engine: Engine, folder: Path, *, backbone: str, config: dict, metrics: dict,
                    data_manifest: dict) -> RewardVersion:
    """Move an exported folder to ``models/rewards/<id>`` and record it, all or nothing."""
    with Session(engine, expire_on_commit=False) as s:
        rv = RewardVersion(folder="", backbone=backbone, config=config, metrics=metrics, data_manifest=data_manifest)
        versions.commit_with_folder(ws, s, rv, folder, rewards_dir(ws))
        return rv


def list_rewards(engine: Engine) -> list[RewardVersion]:
    with Session(engine) as s:
        return list(s.exec(select(RewardVersion).order_by(RewardVersion.id)).all())


def get_reward(engine: Engine, ref: int | str) -> RewardVersion:
    """A reward version by id, or ``current``/``latest`` (the newest); a clear error when missing."""
    with Session(engine) as s:
        if isinstance(ref, str) and ref in ("current", "latest"):
            rv = s.exec(select(RewardVersion).order_by(RewardVersion.id.desc())).first()
            if rv is None:
                raise PathloopError("the workspace has no reward version yet; train one with `pathloop train-reward`")
            return rv
        try:
            rid = int(ref)
        except (TypeError, ValueError):
            raise PathloopError(f"reward version {ref!r}; expected a number, 'current' or 'latest'") from None
        rv = s.get(RewardVersion, rid)
        if rv is None:
            known = s.exec(select(RewardVersion.id).order_by(RewardVersion.id)).all()
            raise PathloopError(f"reward version {rid} does not exist; known: {', '.join(map(str, known)) or 'none'}")
        return rv


def current_reward_id(engine: Engine) -> int | None:
    """The newest reward version (the one ``pathloop score`` uses by default), if any."""
    with Session(engine) as s:
        return s.exec(select(func.max(RewardVersion.id))).one()


def score_counts(engine: Engine) -> dict[int, int]:
    """Samples scored per reward version."""
    with Session(engine) as s:
        rows = s.exec(select(RewardScore.reward_id, func.count()).group_by(RewardScore.reward_id)).all()
    return {rid: n for rid, n in rows}


@dataclass(frozen=True)
class RatedSample:
    """A synthetic tile with its current decisive judgments (unsure and superseded rows left out)."""

    sample_id: int
    image_id: int
    path: Path
    class_name: str
    plausible: int
    implausible: int
    judgment_ids: tuple[int, ...]

    @property
    def ratings(self) -> int:
        return self.plausible + self.implausible

    @property
    def target(self) -> float:
        """Share of the decisive judgments that say plausible."""
        return self.plausible / self.ratings


def rated_samples(ws: Workspace, engine: Engine) -> list[RatedSample]:
    """Every sample with at least one current plausible/implausible judgment, by sample id."""
    with Session(engine) as s:
        rows = s.exec(
            select(Judgment.id, Judgment.sample_id, Judgment.verdict, Sample.image_id, Image.path, Sample.class_name)
            .join(Sample, Sample.id == Judgment.sample_id).join(Image, Image.id == Sample.image_id)
            .where(Judgment.sample_id.is_not(None), Judgment.verdict.in_(DECISIVE), is_current())
            .order_by(Judgment.sample_id, Judgment.id)
        ).all()
    out: list[RatedSample] = []
    for jid, sid, verdict, image_id, path, cls in rows:
        if not out or out[-1].sample_id != sid:
            out.append(RatedSample(sid, image_id, ws.root / path, cls, 0, 0, ()))
        last = out[-1]
        out[-1] = RatedSample(sid, image_id, last.path, cls, last.plausible + (verdict == "plausible"),
                              last.implausible + (verdict == "implausible"), (*last.judgment_ids, jid))
    return out


def current_decisive_count(engine: Engine) -> int:
    """Current plausible/implausible judgments of samples (what reward training can use)."""
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(Judgment).where(
            Judgment.sample_id.is_not(None), Judgment.verdict.in_(DECISIVE), is_current())).one()


@dataclass(frozen=True)
class RealTile:
    tile_id: int
    image_id: int
    path: Path | ShardSlot
    class_name: str
    split: str


def real_tiles(ws: Workspace, engine: Engine) -> list[RealTile]:
    """Every real tile of a workspace class, by id."""
    with Session(engine) as s:
        rows = s.exec(select(Tile.id, Tile.image_id, Tile.class_name, Tile.split, *location_columns())
                      .join(Image, Image.id == Tile.image_id)
                      .where(Tile.class_name.in_(ws.settings.classes)).order_by(Tile.id)).all()
    return [RealTile(tid, iid, locate(ws.root, *loc), cls, split) for tid, iid, cls, split, *loc in rows]


def real_tile_ids(ws: Workspace, engine: Engine) -> dict[tuple[str, str], list[int]]:
    """(split, class) → ids of its real tiles, ascending; ids only, streamed, for sampling from a cohort."""
    out: dict[tuple[str, str], list[int]] = {}
    with Session(engine) as s:
        rows = s.exec(select(Tile.split, Tile.class_name, Tile.id).where(Tile.class_name.in_(ws.settings.classes))
                      .order_by(Tile.id).execution_options(yield_per=20_000))
        for split, cls, tid in rows:
            out.setdefault((split, cls), []).append(tid)
    return out


def tiles_by_id(ws: Workspace, engine: Engine, tile_ids: Iterable[int]) -> list[RealTile]:
    """The real tiles with these ids, by id."""
    ids, out = sorted(set(tile_ids)), []
    with Session(engine) as s:
        for i in range(0, len(ids), 500):
            rows = s.exec(select(Tile.id, Tile.image_id, Tile.class_name, Tile.split, *location_columns())
                          .join(Image, Image.id == Tile.image_id).where(Tile.id.in_(ids[i:i + 500]))
                          .order_by(Tile.id)).all()
            out += [RealTile(tid, iid, locate(ws.root, *loc), cls, split) for tid, iid, cls, split, *loc in rows]
    return out


@dataclass(frozen=True)
class SampleImage:
    sample_id: int
    path: Path
    class_name: str
    width: int
    height: int


def _selection(which: str | int):
    """Condition on Sample for ``--samples``: unscored (no score from any version), all, or a round number."""
    if which == "unscored":
        return Sample.id.not_in(select(RewardScore.sample_id))
    if isinstance(which, int) and not isinstance(which, bool):
        return Sample.round_number == which
    if which == "all":
        return Sample.id.is_not(None)
    raise PathloopError(f"--samples {which!r}; expected unscored, all or a round number")


def samples_to_score(ws: Workspace, engine: Engine, reward_id: int | None, which: str | int = "unscored"
                     ) -> list[SampleImage]:
    """The chosen samples (``_selection``) that ``reward_id`` has not scored yet, by id; every
    chosen sample when ``reward_id`` is None."""
    q = (select(Sample.id, Image.path, Sample.class_name, Image.width, Image.height)
         .join(Image, Image.id == Sample.image_id).where(_selection(which)))
    if reward_id is not None:
        q = q.where(Sample.id.not_in(select(RewardScore.sample_id).where(RewardScore.reward_id == reward_id)))
    with Session(engine) as s:
        rows = s.exec(q.order_by(Sample.id)).all()
    return [SampleImage(sid, ws.root / path, cls, w, h) for sid, path, cls, w, h in rows]


def selected_samples(ws: Workspace, engine: Engine, which: str | int = "all") -> list[SampleImage]:
    """Every sample of a selection: ``all``, ``unscored`` or a round number."""
    return samples_to_score(ws, engine, None, which)


def already_scored(engine: Engine, reward_id: int, which: str | int) -> int:
    """How many of the chosen samples ``reward_id`` has scored."""
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(RewardScore).join(Sample, Sample.id == RewardScore.sample_id)
                      .where(RewardScore.reward_id == reward_id, _selection(which))).one()


def add_scores(engine: Engine, reward_id: int, scores: Iterable[tuple[int, float]]) -> int:
    """Insert ``(sample_id, probability)`` rows for a version; rows it already has are kept. Returns how many were new."""
    now = utcnow()
    rows = [{"sample_id": int(sid), "reward_id": reward_id, "probability": float(p), "created_at": now}
            for sid, p in scores]
    if not rows:
        return 0
    with write_session(engine) as s:
        dialect = s.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = insert(RewardScore).on_conflict_do_nothing(index_elements=["sample_id", "reward_id"])
        before = s.exec(select(func.count()).select_from(RewardScore).where(RewardScore.reward_id == reward_id)).one()
        s.execute(stmt, rows)
        after = s.exec(select(func.count()).select_from(RewardScore).where(RewardScore.reward_id == reward_id)).one()
        s.commit()
    return after - before


def scores_of(engine: Engine, reward_id: int) -> dict[int, float]:
    """sample id → probability under one version."""
    with Session(engine) as s:
        rows = s.exec(select(RewardScore.sample_id, RewardScore.probability)
                      .where(RewardScore.reward_id == reward_id)).all()
    return dict(rows)
