"""The next item for an annotator: leases, the overlap target, blind controls, the order.

- A sample is **open** while it has fewer current decisive judgments than ``overlap``
  (``Sample.current_ratings``, see store/judgments.py). It is offered to an annotator who
  has no current judgment on it (an unsure/skip counts as judged for them), and only while
  its ratings plus other annotators' live leases leave a slot: two annotators never hold
  the last slot at once.
- A lease reserves the item for ``lease_minutes``; an annotator holding a live lease gets
  that item again (a reload skips nothing), an expired one is renewed if the slot is still
  free, else dropped. Undo leases the undone item again, newest lease first.
- Order: most uncertain first (|p - 0.5| ascending) under the newest reward version that has
  scores; samples without a score follow in the random order. Without scores, a random
  order stable per annotator: every sample has a random ``queue_key`` and each annotator
  walks that cycle from their own starting point. Both are index scans that stop at the
  first free sample, so the cost does not grow with the number of samples; it grows with
  the open samples this annotator already rated (they are skipped one by one).
- Controls are real tiles of the val and test splits (never train: what trains a model is
  never a control), shown with their own class, at ``control_share`` of an annotator's
  positions: one in each block of 1/share positions, at a place drawn per annotator and
  block, so the share is exact and the place cannot be guessed. An annotator never gets the
  same control twice, and controls are mixed in only while samples remain.
- Concurrency: SQLite takes the write lock at BEGIN (``write_session``). PostgreSQL locks
  the annotator's row (one request per person at a time) and each candidate sample with
  ``FOR NO KEY UPDATE SKIP LOCKED``, then rechecks its slot in a new statement, which sees
  every lease committed before the lock was taken.
- Progress reads tallies, not rows (store/models.py, "Tallies"): samples per rating count,
  tiles per split and class, and per annotator their current judgments per rating count of
  the sample, per hour, the control tiles they judged and their position. It is a few key
  look-ups whatever the number of samples, tiles or judgments; only the hour in which the
  latest round began is counted row by row (that hour's judgments of this annotator).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    bindparam,
    exists,
    func,
    literal_column,
    union_all,
)
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from store.db import write_session
from store.images import locate, location_columns
from store.judgments import (  # noqa: F401  (record_judgment, undo_last, current_judgments: the queue's API)
    add_lease,
    current_judgments,
    hour_of,
    hour_start,
    is_current,
    lock_annotator,
    now_utc,
    record_judgment,
    undo_last,
)
from store.models import (
    Annotator,
    Image,
    Judgment,
    Lease,
    RaterControlTally,
    RaterHourTally,
    RaterRatingTally,
    RewardScore,
    Round,
    Sample,
    SampleTally,
    Tile,
    TileTally,
    as_utc,
)
from store.workspace import Workspace

KEY_SPACE = 2**31  # queue_key range (models.new_queue_key)
CONTROL_SPLITS = ("val", "test")
BATCH = 8  # candidates fetched per query; more are fetched only when all are taken
MAX_BATCHES = 50


@dataclass(frozen=True)
class QueueItem:
    """One item leased to an annotator. ``shown_class``: the class it is presented as."""

    kind: str  # "sample" | "control"
    item_id: int  # sample id or tile id
    image_path: Path
    shown_class: str
    lease_id: int
    lease_expires_at: datetime


def next_item(ws: Workspace, engine: Engine, annotator_id: int, *, now: datetime | None = None,
              rng_seed: int | None = None) -> QueueItem | None:
    """The item this annotator should rate now, leased to them; None when nothing is left.

    ``rng_seed`` varies the per-annotator random order and control positions (default 0).
    """
    now = now_utc(now)
    seed = rng_seed or 0
    with write_session(engine) as s:
        lock_annotator(s, annotator_id)
        lease = _held_lease(s, ws, annotator_id, now) or _new_lease(s, ws, annotator_id, now, seed)
        item = None if lease is None else _queue_item(s, ws, lease)
        s.commit()
    return item


def progress(ws: Workspace, engine: Engine, annotator_id: int, *, now: datetime | None = None) -> dict:
    """``rated_today`` (UTC day), ``rated_total``, ``rated_this_round`` and ``remaining``.

    Counts are of the annotator's current judgments, controls included (so the numbers
    never tell a control apart). "This round": since the latest ``Round`` began, all when
    there is none. ``remaining``: open samples this annotator could still rate plus the
    controls that will be mixed in among them.
    """
    now = now_utc(now)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    with Session(engine) as s:
        round_start = s.exec(_LATEST_ROUND).first()
        params = {"me": annotator_id, "overlap": ws.settings.overlap, "classes": list(ws.settings.classes),
                  "today": hour_of(today), "round_hour": NO_HOUR, "since": today, "until": today}
        if round_start is not None:
            # Whole hours from the tally; the part of the hour the round began in, row by row.
            since = as_utc(round_start)
            first = hour_of(since)
            whole = since == hour_start(first)
            params.update(round_hour=first if whole else first + 1, since=since,
                          until=since if whole else hour_start(first + 1))
        total, position, open_total, rated_open, tiles, judged_tiles, on_day, in_round, round_part = s.exec(
            _progress_stmt(), params=params).one()
    in_round = total if round_start is None else in_round + round_part
    remaining = _with_controls(open_total - rated_open, tiles - judged_tiles, ws.settings.control_share, 0,
                               annotator_id, position)
    return {"rated_today": on_day, "rated_total": total, "rated_this_round": in_round, "remaining": remaining}


_LATEST_ROUND = select(Round.created_at).order_by(Round.number.desc()).limit(1)
NO_HOUR = 2**31 - 1  # a tally hour after every judgment


@functools.cache
def _progress_stmt():
    """One statement: every count progress() needs, from the tallies (bind parameters: ``me``,
    ``overlap``, ``classes``, the tally hours ``today`` and ``round_hour``, and the part of an
    hour ``since`` <= created_at < ``until`` counted from the judgment rows)."""
    me = bindparam("me", type_=Integer)
    overlap = bindparam("overlap", type_=Integer)
    classes = bindparam("classes", expanding=True)

    def tally(column, *where):
        return func.coalesce(select(func.sum(column)).where(*where).scalar_subquery(), 0)

    def of_me(column):
        return func.coalesce(select(column).where(Annotator.id == me).scalar_subquery(), 0)

    at = DateTime(timezone=True)
    round_part = (select(func.count()).select_from(Judgment)
                  .where(Judgment.annotator_id == me, Judgment.created_at >= bindparam("since", type_=at),
                         Judgment.created_at < bindparam("until", type_=at), is_current())
                  .scalar_subquery())
    return select(
        of_me(Annotator.current_judgments),
        of_me(Annotator.judged_items),
        tally(SampleTally.samples, SampleTally.current_ratings < overlap),
        tally(RaterRatingTally.judgments, RaterRatingTally.annotator_id == me,
              RaterRatingTally.current_ratings < overlap),
        tally(TileTally.tiles, TileTally.split.in_(CONTROL_SPLITS), TileTally.class_name.in_(classes)),
        tally(RaterControlTally.tiles, RaterControlTally.annotator_id == me,
              RaterControlTally.split.in_(CONTROL_SPLITS), RaterControlTally.class_name.in_(classes)),
        tally(RaterHourTally.judgments, RaterHourTally.annotator_id == me,
              RaterHourTally.hour >= bindparam("today", type_=Integer)),
        tally(RaterHourTally.judgments, RaterHourTally.annotator_id == me,
              RaterHourTally.hour >= bindparam("round_hour", type_=Integer)),
        round_part,
    )


# -- leases --------------------------------------------------------------------------------

def _held_lease(s: Session, ws: Workspace, annotator_id: int, now: datetime) -> Lease | None:
    """The newest live lease; an expired one renewed when its item is still free; else None."""
    for lease in s.exec(select(Lease).where(Lease.annotator_id == annotator_id).order_by(Lease.id.desc())).all():
        if as_utc(lease.expires_at) > now:
            return lease
        if _still_free(s, ws, annotator_id, lease, now):
            lease.expires_at = now + timedelta(minutes=ws.settings.lease_minutes)
            s.add(lease)
            s.flush()
            return lease
        s.delete(lease)
    s.flush()
    return None


def _still_free(s: Session, ws: Workspace, annotator_id: int, lease: Lease, now: datetime) -> bool:
    if lease.tile_id is not None:
        return not s.exec(select(exists().where(Judgment.annotator_id == annotator_id,
                                                Judgment.tile_id == lease.tile_id, is_current()))).one()
    _lock(s, lease.sample_id, skip_locked=False)
    return _slot_free(s, ws, annotator_id, lease.sample_id, now)


def _new_lease(s: Session, ws: Workspace, annotator_id: int, now: datetime, seed: int) -> Lease | None:
    sample_id = _pick_sample(s, ws, annotator_id, now, seed)
    if sample_id is None:
        return None
    position = _position(s, annotator_id)
    if is_control_position(ws.settings.control_share, seed, annotator_id, position):
        tile_id = _pick_control(s, ws, annotator_id, seed, position)
        if tile_id is not None:
            return add_lease(s, ws, annotator_id, "control", tile_id, now)
    return add_lease(s, ws, annotator_id, "sample", sample_id, now)


def _queue_item(s: Session, ws: Workspace, lease: Lease) -> QueueItem:
    if lease.sample_id is not None:
        kind, item_id, model = "sample", lease.sample_id, Sample
    else:
        kind, item_id, model = "control", lease.tile_id, Tile
    shown, *loc = s.exec(select(model.class_name, *location_columns()).join(Image, Image.id == model.image_id)
                         .where(model.id == item_id)).one()
    # The app shows a PNG: a control tile from a shard gets one now (kept at its content address).
    path = ws.images.png_path(locate(ws.root, *loc))
    return QueueItem(kind, item_id, path, shown, lease.id, as_utc(lease.expires_at))


# -- samples -------------------------------------------------------------------------------
# Statements are built once (bind parameters for everything that varies): building
# SQLAlchemy expressions costs more than running these index look-ups.

_ME = bindparam("me", type_=Integer)
_NOW = bindparam("now", type_=DateTime(timezone=True))


def _free_for(slots) -> ColumnElement[bool]:
    """SQL condition on ``Sample``: not judged by annotator ``:me``, and other annotators'
    live leases fill fewer than ``slots`` (an int or a column expression)."""
    mine = exists().where(Judgment.annotator_id == _ME, Judgment.sample_id == Sample.id, is_current())
    leased = (select(func.count()).select_from(Lease)
              .where(Lease.sample_id == Sample.id, Lease.expires_at > _NOW, Lease.annotator_id != _ME)
              .scalar_subquery())
    return ~mine & (leased < slots)


@functools.cache
def _slot_free_stmt(overlap: int):
    return select(exists().where(Sample.id == bindparam("sample_id"), Sample.current_ratings < overlap,
                                 _free_for(overlap - Sample.current_ratings)))


@functools.cache
def _by_key_stmt(overlap: int, excluding: bool):
    """The first free samples with ``:lo <= queue_key <= :hi``: one index range scan per rating count."""
    parts = []
    for r in range(overlap):
        q = (select(Sample.id, Sample.queue_key)
             .where(Sample.current_ratings == r, Sample.queue_key >= bindparam("lo"),
                    Sample.queue_key <= bindparam("hi"), _free_for(overlap - r)))
        if excluding:
            q = q.where(Sample.id.not_in(bindparam("tried", expanding=True)))
        parts.append(q.order_by(Sample.queue_key, Sample.id).limit(BATCH).subquery())
    both = union_all(*(select(p.c.id, p.c.queue_key) for p in parts)).subquery()
    return select(both.c.id).order_by(both.c.queue_key, both.c.id).limit(BATCH)


@functools.cache
def _by_uncertainty_stmt(overlap: int, excluding: bool):
    # Written exactly as ix_reward_score_uncertainty so both databases scan that index.
    uncertainty = func.abs(RewardScore.probability - literal_column("0.5"))
    q = (select(Sample.id).join(RewardScore, RewardScore.sample_id == Sample.id)
         .where(RewardScore.reward_id == bindparam("reward_id"), Sample.current_ratings < overlap,
                _free_for(overlap - Sample.current_ratings)))
    if excluding:
        q = q.where(Sample.id.not_in(bindparam("tried", expanding=True)))
    return q.order_by(uncertainty, RewardScore.sample_id).limit(BATCH)


def _slot_free(s: Session, ws: Workspace, annotator_id: int, sample_id: int, now: datetime) -> bool:
    return s.exec(_slot_free_stmt(ws.settings.overlap),
                  params={"sample_id": sample_id, "me": annotator_id, "now": now}).one()


def _lock(s: Session, sample_id: int, *, skip_locked: bool) -> bool:
    """Lock a sample row on PostgreSQL; False when another transaction holds it (skip_locked)."""
    if s.get_bind().dialect.name != "postgresql":
        return True  # SQLite: the whole transaction already holds the write lock
    q = select(Sample.id).where(Sample.id == sample_id).with_for_update(skip_locked=skip_locked, key_share=True)
    return s.exec(q).first() is not None


def _pick_sample(s: Session, ws: Workspace, annotator_id: int, now: datetime, seed: int) -> int | None:
    overlap = ws.settings.overlap
    params = {"me": annotator_id, "now": now}
    scored = s.exec(_NEWEST_SCORED).one()
    if scored is not None:
        # Scores may cover samples that are all complete; do not walk them to find that out.
        if s.exec(_ANY_OPEN, params={"overlap": overlap}).first() is None:
            return None
        found = _first_claimed(s, ws, annotator_id, now, _by_uncertainty_stmt, {**params, "reward_id": scored})
        if found is not None:
            return found
    start = _mix("order", seed, annotator_id) % KEY_SPACE
    for lo, hi in ((start, KEY_SPACE - 1), (0, start - 1)):  # inclusive: 2**31 overflows an INTEGER
        found = _first_claimed(s, ws, annotator_id, now, _by_key_stmt, {**params, "lo": lo, "hi": hi})
        if found is not None:
            return found
    return None


_NEWEST_SCORED = select(func.max(RewardScore.reward_id))
_ANY_OPEN = select(Sample.id).where(Sample.current_ratings < bindparam("overlap")).limit(1)


def _first_claimed(s: Session, ws: Workspace, annotator_id: int, now: datetime, stmt, params: dict) -> int | None:
    """The first candidate this transaction can claim; on PostgreSQL, locked ones are skipped."""
    postgres = s.get_bind().dialect.name == "postgresql"
    tried: list[int] = []
    for _ in range(MAX_BATCHES):
        ids = s.exec(stmt(ws.settings.overlap, bool(tried)), params={**params, "tried": tried} if tried else params
                     ).all()
        if not ids:
            return None
        for sample_id in ids:
            if not postgres:
                return sample_id
            if _lock(s, sample_id, skip_locked=True) and _slot_free(s, ws, annotator_id, sample_id, now):
                return sample_id
            tried.append(sample_id)
    return None


# -- controls ------------------------------------------------------------------------------

def _control_tile(ws: Workspace, annotator_id: int) -> ColumnElement[bool]:
    """SQL condition on ``Tile``: a control this annotator has never been given to judge."""
    return (Tile.split.in_(CONTROL_SPLITS) & Tile.class_name.in_(ws.settings.classes)
            & ~exists().where(Judgment.annotator_id == annotator_id, Judgment.tile_id == Tile.id))


def _pick_control(s: Session, ws: Workspace, annotator_id: int, seed: int, position: int) -> int | None:
    """A control from a point drawn per annotator and position, scanning forward, then from the start."""
    lo, hi = s.exec(select(func.min(Tile.id), func.max(Tile.id))).one()
    if lo is None:
        return None
    start = lo + _mix("control", seed, annotator_id, position) % (hi - lo + 1)
    base = select(Tile.id).where(_control_tile(ws, annotator_id))
    for after in (Tile.id >= start, Tile.id < start):
        # One query per split: each walks the (split, id) index in order and stops at the first hit.
        found = [s.exec(base.where(Tile.split == split, after).order_by(Tile.id).limit(1)).first()
                 for split in CONTROL_SPLITS]
        found = [t for t in found if t is not None]
        if found:
            return min(found)
    return None


def _position(s: Session, annotator_id: int) -> int:
    """How many items this annotator has judged (first judgments; edits and undos excluded)."""
    return s.exec(select(func.count()).select_from(Judgment).where(
        Judgment.annotator_id == annotator_id, Judgment.supersedes_id.is_(None))).one()


def _share(share: float) -> Fraction:
    return Fraction(share).limit_denominator(1000)


def _control_slot(share: Fraction, seed: int, annotator_id: int, block: int) -> int:
    """The position of the control in ``block``, which covers [ceil(block/share), ceil((block+1)/share))."""
    start, end = math.ceil(block / share), math.ceil((block + 1) / share)
    return start + _mix("slot", seed, annotator_id, block) % (end - start)


def is_control_position(control_share: float, seed: int, annotator_id: int, position: int) -> bool:
    """Whether the annotator's ``position``-th item (0-based) is a control."""
    share = _share(control_share)
    if share == 0:
        return False
    return position == _control_slot(share, seed, annotator_id, math.floor(position * share))


def _controls_from(share: Fraction, seed: int, annotator_id: int, position: int) -> int:
    """Index of the first control at or after ``position``."""
    block = math.floor(position * share)
    return block if _control_slot(share, seed, annotator_id, block) >= position else block + 1


def _with_controls(samples: int, controls: int, control_share: float, seed: int, annotator_id: int,
                   position: int) -> int:
    """Items left: ``samples`` plus the controls (at most ``controls``) that fall among them."""
    share = _share(control_share)
    if share == 0 or samples <= 0:
        return max(samples, 0)
    total = samples
    for _ in range(100):  # grows monotonically to the fixed point, in a few steps
        mixed = _controls_from(share, seed, annotator_id, position + total) - _controls_from(
            share, seed, annotator_id, position)
        nxt = samples + min(controls, mixed)
        if nxt == total:
            break
        total = nxt
    return total


def _mix(*parts) -> int:
    """A stable 64-bit hash (Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


# -- reference strip -------------------------------------------------------------------------

REFERENCE_SPLIT = "train"


def reference_tiles(ws: Workspace, engine: Engine, class_name: str, n: int, *, exclude_kind: str | None = None,
                    exclude_id: int | None = None) -> list[Path]:
    """Up to ``n`` real tiles of ``class_name`` from the train split, as PNG paths, for calibration.

    The same tiles every time for a class (a start id drawn from the class name, then the
    next ids in order, wrapping round), so a rater sees one stable reference per class. The
    item on screen (``exclude_kind`` "sample" or "control" and ``exclude_id``) is never among
    them: neither its tile nor any tile with the same image. Controls come from val and test,
    so the strip never shows one either way; the exclusion holds even for a mislabelled split.
    """
    if n <= 0:
        return []
    key = ws.settings.classes[ws.settings.class_index(class_name)]
    conditions = [Tile.split == REFERENCE_SPLIT, Tile.class_name == key]
    if exclude_kind is not None:
        model = Sample if exclude_kind == "sample" else Tile
        shown_image = select(model.image_id).where(model.id == exclude_id).scalar_subquery()
        conditions.append(Tile.image_id != func.coalesce(shown_image, -1))
        if exclude_kind == "control":
            conditions.append(Tile.id != exclude_id)
    with Session(engine) as s:
        lo, hi = s.exec(select(func.min(Tile.id), func.max(Tile.id)).where(*conditions)).one()
        if lo is None:
            return []
        start = lo + _mix("reference", key) % (hi - lo + 1)
        rows = []
        for after in (Tile.id >= start, Tile.id < start):
            q = (select(*location_columns()).select_from(Tile).join(Image, Image.id == Tile.image_id)
                 .where(*conditions, after).order_by(Tile.id).limit(n - len(rows)))
            rows += s.exec(q).all()
            if len(rows) >= n:
                break
    return [ws.images.png_path(locate(ws.root, *loc)) for loc in rows]
