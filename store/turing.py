"""Visual Turing test: campaigns of real and synthetic tiles mixed blind, and raters' answers.

A campaign's items are fixed when it is created, so every rater sees the same set (Fleiss'
kappa needs that), each in their own stable order (a hash of campaign, rater and item).
Synthetic items are existing samples of the chosen generator versions, ``per_class`` of each
class per version; real items are val/test tiles (never train, as for controls) of the same
classes, as many per class as ``real_share`` asks, drawn with the campaign's seed.

Answers are append-only like judgments (store/judgments.py): an answer on an item the rater
already answered supersedes their newest row on it; an undo adds a ``retracted`` row; a
repeated request id writes nothing. An answer is **current** when nothing supersedes it and
it is not a retraction. Answers never touch ``Judgment``: plausibility stays separate.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import ColumnElement, exists, func, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from store.db import write_session
from store.errors import PathloopError
from store.images import locate, location_columns
from store.judgments import lock_annotator, now_utc
from store.models import (
    GeneratorVersion,
    Image,
    Sample,
    Tile,
    TuringAnswer,
    TuringCampaign,
    TuringItem,
    as_utc,
)
from store.queue import CONTROL_SPLITS
from store.turing_config import CampaignConfig
from store.workspace import Workspace

ANSWERS = ("real", "synthetic")
CONFIDENCE = {1: "guess", 2: "fairly sure", 3: "certain"}
MAX_REQUEST_ID = 200
_LATER = aliased(TuringAnswer, name="later")


@dataclass(frozen=True)
class TuringTile:
    """The tile a rater should answer now. ``image_path`` is a PNG; the page never shows it."""

    campaign_id: int
    item_id: int
    class_name: str
    image_path: Path
    done: int  # items this rater has a current answer on
    total: int


def real_per_class(per_class: int, versions: int, real_share: float) -> int:
    """Real tiles per class so that they are ``real_share`` of all items (rounded, at least 1)."""
    synthetic = per_class * versions
    return max(1, round(synthetic * real_share / (1 - real_share)))


def _draw(ids: list[int], k: int, rng: np.random.Generator) -> list[int]:
    return sorted(int(x) for x in rng.choice(np.asarray(sorted(ids)), size=k, replace=False))


def create_campaign(ws: Workspace, engine: Engine, cfg: CampaignConfig, *, created_by: str | None = None) -> int:
    """Draw the items and store the campaign (inactive); returns its id. Nothing is written on error."""
    versions = cfg.generator_ids()
    classes = list(ws.settings.classes)
    rng = np.random.default_rng(cfg.seed)
    n_real = real_per_class(cfg.per_class, len(versions), cfg.real_share)
    items: list[dict] = []
    with write_session(engine) as s:
        if s.exec(select(TuringCampaign.id).where(TuringCampaign.name == cfg.name)).first() is not None:
            raise PathloopError(f"campaign {cfg.name!r} exists already; choose another --name")
        for gid in versions:
            if s.get(GeneratorVersion, gid) is None:
                raise PathloopError(f"generator version {gid} does not exist; see `pathloop generator list`")
        for c in classes:
            for gid in versions:
                pool = list(s.exec(select(Sample.id).where(Sample.generator_id == gid, Sample.class_name == c)).all())
                if len(pool) < cfg.per_class:
                    raise PathloopError(f"generator version {gid} has {len(pool)} samples of class {c!r}; "
                                        f"--per-class {cfg.per_class} needs that many (`pathloop generate`)")
                items += [{"sample_id": i, "class_name": c} for i in _draw(pool, cfg.per_class, rng)]
            pool = list(s.exec(select(Tile.id).where(Tile.class_name == c, Tile.split.in_(CONTROL_SPLITS))).all())
            if len(pool) < n_real:
                raise PathloopError(f"{len(pool)} real val/test tiles of class {c!r}; real share {cfg.real_share:g} "
                                    f"needs {n_real} (train tiles are never used)")
            items += [{"tile_id": i, "class_name": c} for i in _draw(pool, n_real, rng)]
        _check_one_size(s, items)
        order = rng.permutation(len(items))
        campaign = TuringCampaign(name=cfg.name, generator_ids=versions, per_class=cfg.per_class,
                                  real_share=cfg.real_share, seed=cfg.seed, round_number=cfg.round,
                                  created_by=created_by)
        s.add(campaign)
        s.flush()
        s.add_all(TuringItem(campaign_id=campaign.id, position=int(p), **items[i]) for p, i in enumerate(order))
        s.commit()
        return campaign.id


def _check_one_size(s: Session, items: list[dict]) -> None:
    """Refuse a mix whose real and synthetic tiles differ in size: the size alone would give them away."""
    sizes = {}
    for source, model, key in (("synthetic", Sample, "sample_id"), ("real", Tile, "tile_id")):
        ids = [i[key] for i in items if key in i]
        sizes[source] = set(s.exec(select(Image.width, Image.height).join(model, model.image_id == Image.id)
                                   .where(model.id.in_(ids)).distinct()).all())
    if len(sizes["synthetic"] | sizes["real"]) > 1:
        def show(found):
            return ", ".join(f"{w}x{h}" for w, h in sorted(found))

        raise PathloopError(f"synthetic tiles are {show(sizes['synthetic'])} px, real ones {show(sizes['real'])}; "
                            "a blind test needs one size (generate at the workspace's tile size)")


def campaigns(engine: Engine) -> list[TuringCampaign]:
    """Every campaign, oldest first."""
    with Session(engine) as s:
        return list(s.exec(select(TuringCampaign).order_by(TuringCampaign.id)).all())


def find_campaign(engine: Engine, name_or_id: str | int) -> TuringCampaign:
    """A campaign by name or id; a one-line error naming the known ones when missing."""
    with Session(engine) as s:
        found = s.exec(select(TuringCampaign).where(TuringCampaign.name == str(name_or_id))).first()
        if found is None and str(name_or_id).isdigit():
            found = s.get(TuringCampaign, int(name_or_id))
        if found is None:
            known = ", ".join(s.exec(select(TuringCampaign.name).order_by(TuringCampaign.id)).all()) or "none yet"
            raise PathloopError(f"campaign {name_or_id!r} does not exist; known: {known}")
        return found


def set_active(engine: Engine, name_or_id: str | int, active: bool) -> TuringCampaign:
    """Show (or stop showing) a campaign to raters; returns it."""
    campaign = find_campaign(engine, name_or_id)
    with write_session(engine) as s:
        s.exec(update(TuringCampaign).where(TuringCampaign.id == campaign.id).values(active=active))
        s.commit()
    campaign.active = active
    return campaign


def active_campaigns(engine: Engine) -> list[TuringCampaign]:
    return [c for c in campaigns(engine) if c.active]


def is_current(a=TuringAnswer) -> ColumnElement[bool]:
    """SQL condition: answer ``a`` is current (not superseded, not a retraction)."""
    return (a.answer != "retracted") & ~exists().where(_LATER.supersedes_id == a.id)


def rater_order(campaign_id: int, annotator_id: int, item_ids) -> list[int]:
    """``item_ids`` in this rater's stable order: by a hash of campaign, rater and item."""
    def key(item_id: int) -> bytes:
        return hashlib.sha256(f"{campaign_id}:{annotator_id}:{item_id}".encode()).digest()

    return sorted(item_ids, key=key)


def _answered(s: Session, campaign_id: int, annotator_id: int) -> set[int]:
    return set(s.exec(select(TuringAnswer.item_id).join(TuringItem, TuringItem.id == TuringAnswer.item_id)
                      .where(TuringItem.campaign_id == campaign_id, TuringAnswer.annotator_id == annotator_id,
                             is_current())).all())


def next_tile(ws: Workspace, engine: Engine, annotator_id: int, campaign_id: int) -> TuringTile | None:
    """The first item in this rater's order they have no current answer on; None when done.

    An undone answer's item comes back at once: every item before it in the order is answered.
    """
    with Session(engine) as s:
        lock_annotator(s, annotator_id)
        ids = list(s.exec(select(TuringItem.id).where(TuringItem.campaign_id == campaign_id)).all())
        answered = _answered(s, campaign_id, annotator_id)
        todo = next((i for i in rater_order(campaign_id, annotator_id, ids) if i not in answered), None)
        if todo is None:
            return None
        model_rows = []
        for model, col in ((Sample, TuringItem.sample_id), (Tile, TuringItem.tile_id)):
            model_rows += s.exec(select(TuringItem.class_name, *location_columns())
                                 .join(model, model.id == col).join(Image, Image.id == model.image_id)
                                 .where(TuringItem.id == todo)).all()
        shown, *loc = model_rows[0]
    # Samples and tiles alike reach the page as a PNG file's pixels (a shard record gets one).
    return TuringTile(campaign_id, todo, shown, ws.images.png_path(locate(ws.root, *loc)), len(answered), len(ids))


def item_count(s: Session, campaign_id: int) -> int:
    return s.exec(select(func.count()).select_from(TuringItem).where(TuringItem.campaign_id == campaign_id)).one()


def progress(engine: Engine, annotator_id: int, campaign_id: int) -> tuple[int, int]:
    """(items this rater has answered, items in the campaign)."""
    with Session(engine) as s:
        return len(_answered(s, campaign_id, annotator_id)), item_count(s, campaign_id)


def _check_request_id(request_id) -> str:
    if not isinstance(request_id, str) or not request_id.strip() or len(request_id) > MAX_REQUEST_ID:
        raise PathloopError(f"request id {request_id!r}; expected a non-empty string of at most "
                            f"{MAX_REQUEST_ID} characters")
    return request_id


def _by_request(s: Session, annotator_id: int, request_id: str) -> TuringAnswer | None:
    return s.exec(select(TuringAnswer).where(TuringAnswer.annotator_id == annotator_id,
                                             TuringAnswer.request_id == request_id)).first()


def _head(s: Session, annotator_id: int, item_id: int) -> TuringAnswer | None:
    """The rater's newest row on the item (nothing supersedes it)."""
    return s.exec(select(TuringAnswer).where(TuringAnswer.annotator_id == annotator_id,
                                             TuringAnswer.item_id == item_id,
                                             ~exists().where(_LATER.supersedes_id == TuringAnswer.id))).first()


def _utc(a: TuringAnswer) -> TuringAnswer:
    a.created_at = as_utc(a.created_at)
    return a


def record_answer(engine: Engine, annotator_id: int, *, item_id: int, answer: str, confidence: int,
                  seconds: float | None = None, request_id: str, now: datetime | None = None) -> TuringAnswer:
    """Store one answer (real | synthetic, confidence 1-3) on a campaign's item.

    The same ``request_id`` again returns the stored row and writes nothing; an answer on an
    item already answered supersedes the rater's newest row on it. A campaign deactivated
    while a tile was on screen still takes its answer (as an expired lease still takes a
    rating): the page stops offering tiles, an answer already given is not lost or retried
    for ever.
    """
    if answer not in ANSWERS:
        raise PathloopError(f"answer {answer!r}; expected one of: {', '.join(ANSWERS)}")
    if confidence not in CONFIDENCE:
        raise PathloopError(f"confidence {confidence!r}; expected 1 (guess), 2 (fairly sure) or 3 (certain)")
    if seconds is not None and (not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0):
        raise PathloopError(f"seconds = {seconds!r}; expected a time of 0 or more seconds")
    request_id = _check_request_id(request_id)
    with write_session(engine) as s:
        try:
            lock_annotator(s, annotator_id)
            if (done := _by_request(s, annotator_id, request_id)) is not None:
                if done.item_id != item_id:
                    raise PathloopError(f"request id {request_id!r} was already used for another item")
                return _utc(done)
            if not isinstance(item_id, int) or s.get(TuringItem, item_id) is None:
                raise PathloopError(f"Turing test item {item_id!r} does not exist")
            head = _head(s, annotator_id, item_id)
            row = TuringAnswer(item_id=item_id, annotator_id=annotator_id, answer=answer, confidence=confidence,
                               seconds=None if seconds is None else float(seconds), request_id=request_id,
                               supersedes_id=head.id if head else None, created_at=now_utc(now))
            s.add(row)
            s.commit()
            return _utc(row)
        except IntegrityError:
            s.rollback()
            if (done := _by_request(s, annotator_id, request_id)) is not None:
                return _utc(done)
            raise PathloopError(f"Turing test item {item_id}: the answer changed at the same time; "
                                "submit again") from None


def undo_last(engine: Engine, annotator_id: int, campaign_id: int, *, request_id: str,
              now: datetime | None = None) -> TuringAnswer | None:
    """Retract the rater's most recent current answer in the campaign; returns it (None: nothing
    to undo). The same ``request_id`` again returns the same answer and writes nothing."""
    request_id = _check_request_id(request_id)
    with write_session(engine) as s:
        try:
            lock_annotator(s, annotator_id)
            if (done := _by_request(s, annotator_id, request_id)) is not None:
                if done.answer != "retracted":
                    raise PathloopError(f"request id {request_id!r} was already used for an answer, not an undo")
                return _utc(s.get(TuringAnswer, done.supersedes_id))
            last = s.exec(select(TuringAnswer).join(TuringItem, TuringItem.id == TuringAnswer.item_id)
                          .where(TuringItem.campaign_id == campaign_id, TuringAnswer.annotator_id == annotator_id,
                                 is_current()).order_by(TuringAnswer.id.desc()).limit(1)).first()
            if last is None:
                return None
            s.add(TuringAnswer(item_id=last.item_id, annotator_id=annotator_id, answer="retracted",
                               request_id=request_id, supersedes_id=last.id, created_at=now_utc(now)))
            s.commit()
            return _utc(last)
        except IntegrityError:
            s.rollback()
            raise PathloopError("undo: the last answer changed at the same time; try again") from None
