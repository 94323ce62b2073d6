"""What a *current* judgment is, and the two ways an annotator writes judgments: rate and undo.

Judgment rows are append-only. A row is **current** when no other row supersedes it and it
is not a retraction; an edit adds a row that supersedes the annotator's newest row on the item, an
undo adds a ``retracted`` row. Plausible and implausible are **decisive**: they count toward
a sample's overlap target. Unsure (skip) is current too — it keeps the item away from that
annotator — but does not count, so the sample stays open for others.

``Sample.current_ratings`` caches the number of current decisive judgments of a sample, and
the per-annotator tallies (``Annotator.judged_items`` and ``current_judgments``, and the
``Rater*Tally`` tables of store/models.py) cache what ``store.queue.progress`` reports; the
functions here keep them in step inside the same transaction (``_retally``), and
``recount_ratings`` rebuilds them, and the trigger-kept sample and tile tallies, from the
rows. Every read of "current" goes through ``is_current``.

Concurrency (PostgreSQL): a rating that moves a sample's count, or changes how many current
judgments its rater has on it, first locks the sample row, so the judgments it reads on that
sample are the ones it moves; tally rows are written last, each table in key order and the
tables in one order (the sample tally by its trigger, then raters' rating rows, then the
rater's own rows), so two raters never wait on each other in a cycle.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, bindparam, delete, exists, func, literal_column, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from store.db import write_session
from store.errors import PathloopError
from store.models import (
    Annotator,
    Judgment,
    Lease,
    RaterControlTally,
    RaterHourTally,
    RaterRatingTally,
    Sample,
    SampleTally,
    Tile,
    TileTally,
    as_utc,
    utcnow,
)
from store.workspace import Workspace

DECISIVE = ("plausible", "implausible")
RATABLE = (*DECISIVE, "unsure")
KINDS = ("sample", "control")
MAX_COMMENT = 10_000
MAX_REQUEST_ID = 200


_LATER = aliased(Judgment, name="later")  # built once: aliasing costs milliseconds per call


def is_current(j=Judgment) -> ColumnElement[bool]:
    """SQL condition: judgment ``j`` (the table or an alias) is current."""
    return (j.verdict != "retracted") & ~exists().where(_LATER.supersedes_id == j.id)


def item_column(kind: str, model=Judgment):
    """The column of ``model`` (Judgment or Lease) that holds an item of this kind."""
    if kind not in KINDS:
        raise PathloopError(f"item kind {kind!r}; expected one of: {', '.join(KINDS)}")
    return model.sample_id if kind == "sample" else model.tile_id


def current_judgments(engine: Engine) -> list[Judgment]:
    """Every current judgment (all annotators, samples and controls), oldest first."""
    with Session(engine) as s:
        rows = list(s.exec(select(Judgment).where(is_current()).order_by(Judgment.id)).all())
    return [utc_judgment(j) for j in rows]


def recount_ratings(engine: Engine) -> int:
    """Rebuild ``Sample.current_ratings`` and every tally from the rows; returns how many cached
    counts were wrong (samples, tally entries, annotators' counters)."""
    counted = (select(func.count()).select_from(Judgment)
               .where(Judgment.sample_id == Sample.id, Judgment.verdict.in_(DECISIVE), is_current())
               .scalar_subquery())
    with write_session(engine) as s:
        if s.get_bind().dialect.name == "postgresql":
            # Every writer of judgments locks its annotator row first, so holding the table keeps
            # them all out (in-flight ones finish first); new samples and tiles wait too.
            s.exec(text("LOCK TABLE annotator IN EXCLUSIVE MODE"))
            s.exec(text("LOCK TABLE sample, tile IN SHARE ROW EXCLUSIVE MODE"))
        wrong = s.exec(select(func.count()).select_from(Sample).where(Sample.current_ratings != counted)).one()
        if wrong:
            s.exec(update(Sample).where(Sample.current_ratings != counted).values(current_ratings=counted))
        hour = literal_column(HOUR_SQL[s.get_bind().dialect.name])
        wrong += _rebuild(s, SampleTally, select(Sample.current_ratings, func.count()).group_by(Sample.current_ratings))
        wrong += _rebuild(s, TileTally, select(Tile.split, Tile.class_name, func.count())
                          .group_by(Tile.split, Tile.class_name))
        wrong += _rebuild(s, RaterRatingTally, select(Judgment.annotator_id, Sample.current_ratings, func.count())
                          .join(Sample, Sample.id == Judgment.sample_id).where(is_current())
                          .group_by(Judgment.annotator_id, Sample.current_ratings))
        wrong += _rebuild(s, RaterHourTally, select(Judgment.annotator_id, hour, func.count()).where(is_current())
                          .group_by(Judgment.annotator_id, hour))
        wrong += _rebuild(s, RaterControlTally, select(Judgment.annotator_id, Tile.split, Tile.class_name,
                                                       func.count(func.distinct(Judgment.tile_id)))
                          .join(Tile, Tile.id == Judgment.tile_id)
                          .group_by(Judgment.annotator_id, Tile.split, Tile.class_name))
        wrong += _rebuild_annotators(s)
        s.commit()
    return wrong


# Hours since 1970 (UTC) of judgment.created_at, as ``hour_of`` computes them.
HOUR_SQL = {
    "sqlite": "(CAST(strftime('%s', judgment.created_at) AS INTEGER)"
              " - ((CAST(strftime('%s', judgment.created_at) AS INTEGER) % 3600) + 3600) % 3600) / 3600",
    "postgresql": "CAST(floor(extract(epoch FROM judgment.created_at) / 3600) AS INTEGER)",
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def hour_of(dt: datetime) -> int:
    """The tally hour of a timestamp (``RaterHourTally.hour``): whole UTC hours since 1970."""
    return (as_utc(dt) - _EPOCH) // timedelta(hours=1)


def hour_start(hour: int) -> datetime:
    """When tally hour ``hour`` begins (UTC)."""
    return _EPOCH + timedelta(hours=hour)


def _tally_columns(model) -> tuple[list[str], str]:
    """(key columns, count column) of a tally table."""
    cols = [c.name for c in model.__table__.columns]
    return cols[:-1], cols[-1]


def _rebuild(s: Session, model, fresh_query) -> int:
    """Replace a tally's rows by ``fresh_query``'s (key..., count) rows; how many entries differed."""
    keys, count = _tally_columns(model)
    table = model.__table__
    fresh = {tuple(r[:-1]): r[-1] for r in s.exec(fresh_query).all()}
    stored = {tuple(r[:-1]): r[-1] for r in s.exec(select(*(table.c[k] for k in keys), table.c[count])).all()}
    wrong = sum(stored.get(k, 0) != fresh.get(k, 0) for k in stored.keys() | fresh.keys())
    if wrong:
        s.exec(delete(table))
        rows = [{**dict(zip(keys, k)), count: n} for k, n in sorted(fresh.items()) if n]
        if rows:
            s.exec(table.insert(), params=rows)
    return wrong


def _rebuild_annotators(s: Session) -> int:
    judged = dict(s.exec(select(Judgment.annotator_id, func.count()).where(Judgment.supersedes_id.is_(None))
                         .group_by(Judgment.annotator_id)).all())
    current = dict(s.exec(select(Judgment.annotator_id, func.count()).where(is_current())
                          .group_by(Judgment.annotator_id)).all())
    wrong = 0
    for aid, has_judged, has_current in s.exec(select(Annotator.id, Annotator.judged_items,
                                                      Annotator.current_judgments)).all():
        if (has_judged, has_current) != (judged.get(aid, 0), current.get(aid, 0)):
            wrong += 1
            s.exec(update(Annotator).where(Annotator.id == aid)
                   .values(judged_items=judged.get(aid, 0), current_judgments=current.get(aid, 0)))
    return wrong


def utc_judgment(j: Judgment) -> Judgment:
    j.created_at = as_utc(j.created_at)
    return j


def now_utc(now: datetime | None) -> datetime:
    return utcnow() if now is None else as_utc(now)


def lock_annotator(s: Session, annotator_id: int) -> Annotator:
    """The annotator's row, locked on PostgreSQL so one person's requests run one at a time."""
    q = select(Annotator).where(Annotator.id == annotator_id)
    if s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(key_share=True)  # FOR NO KEY UPDATE: foreign-key checks still pass
    ann = s.exec(q).first()
    if ann is None:
        raise PathloopError(f"annotator id {annotator_id} does not exist")
    if not ann.active:
        raise PathloopError(f"account {ann.username} is disabled")
    return ann


def add_lease(s: Session, ws: Workspace, annotator_id: int, kind: str, item_id: int, now: datetime) -> Lease:
    lease = Lease(annotator_id=annotator_id, expires_at=now + timedelta(minutes=ws.settings.lease_minutes),
                  created_at=now, **{"sample_id" if kind == "sample" else "tile_id": item_id})
    s.add(lease)
    s.flush()
    return lease


def _check_reasons(ws: Workspace, reasons: Iterable[str]) -> list[str]:
    if isinstance(reasons, str):
        reasons = [reasons]
    out: list[str] = []
    for r in reasons:
        if r not in ws.settings.criteria:
            raise PathloopError(f"reason {r!r} is not a criterion; expected one of: {', '.join(ws.settings.criteria)}")
        if r not in out:
            out.append(r)
    return out


def _check_request_id(request_id) -> str:
    if not isinstance(request_id, str) or not request_id.strip() or len(request_id) > MAX_REQUEST_ID:
        raise PathloopError(f"request id {request_id!r}; expected a non-empty string of at most {MAX_REQUEST_ID} characters")
    return request_id


def _by_request(s: Session, annotator_id: int, request_id: str) -> Judgment | None:
    return s.exec(select(Judgment).where(Judgment.annotator_id == annotator_id,
                                         Judgment.request_id == request_id)).first()


def _same_request(j: Judgment, kind: str, item_id: int) -> Judgment:
    if item_column(kind, j) != item_id:
        raise PathloopError(f"request id {j.request_id!r} was already used for another item")
    return utc_judgment(j)


def _ensure_item(s: Session, kind: str, item_id: int) -> None:
    model = Sample if kind == "sample" else Tile
    if not isinstance(item_id, int) or s.get(model, item_id) is None:
        raise PathloopError(f"{'sample' if kind == 'sample' else 'control tile'} {item_id!r} does not exist")


@functools.cache
def _head_stmt(kind: str):
    """The annotator's newest row on an item: not superseded (current unless a retraction)."""
    return select(Judgment).where(Judgment.annotator_id == bindparam("me"), item_column(kind) == bindparam("item"),
                                  ~exists().where(_LATER.supersedes_id == Judgment.id))


@functools.cache
def _was_given_stmt(kind: str):
    leased = exists().where(Lease.annotator_id == bindparam("me"), item_column(kind, Lease) == bindparam("item"))
    judged = exists().where(Judgment.annotator_id == bindparam("me"), item_column(kind) == bindparam("item"))
    return select(leased | judged)


def _head(s: Session, annotator_id: int, kind: str, item_id: int) -> Judgment | None:
    return s.exec(_head_stmt(kind), params={"me": annotator_id, "item": item_id}).first()


def _was_given(s: Session, annotator_id: int, kind: str, item_id: int) -> bool:
    """Leased to this annotator (a lease not yet cleared, even if expired) or judged by them before."""
    return bool(s.exec(_was_given_stmt(kind), params={"me": annotator_id, "item": item_id}).one())


# -- keeping the caches in step ---------------------------------------------------------------
# Statements are built once per dialect (building them costs more than running them).

@functools.cache
def _upsert_stmt(dialect: str, model):
    """Add ``:n`` to a tally row, creating it when missing (an executemany over key dicts)."""
    keys, count = _tally_columns(model)
    table = model.__table__
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    stmt = stmt.values({**{k: bindparam(k) for k in keys}, count: bindparam("n")})
    return stmt.on_conflict_do_update(index_elements=keys, set_={count: table.c[count] + stmt.excluded[count]})


_LOCK_SAMPLE = {
    "postgresql": select(Sample.current_ratings).where(Sample.id == bindparam("item"))
    .with_for_update(key_share=True),  # FOR NO KEY UPDATE, as an UPDATE would take
    "sqlite": select(Sample.current_ratings).where(Sample.id == bindparam("item")),  # the write lock is held
}
_SHIFT_RATINGS = (update(Sample).where(Sample.id == bindparam("item"))  # locks the row, like _LOCK_SAMPLE
                  .values(current_ratings=Sample.current_ratings + bindparam("shift")).returning(Sample.current_ratings))
_CURRENT_ON_SAMPLE = (select(Judgment.annotator_id, func.count()).where(Judgment.sample_id == bindparam("item"),
                                                                        is_current())
                      .group_by(Judgment.annotator_id))
_BUMP_ANNOTATOR = (update(Annotator).where(Annotator.id == bindparam("me"))
                   .values(judged_items=Annotator.judged_items + bindparam("d_judged"),
                           current_judgments=Annotator.current_judgments + bindparam("d_current")))


def _bump(s: Session, model, deltas: Counter) -> None:
    """Add the non-zero ``deltas`` (key tuple -> amount) to a tally, rows in key order."""
    keys, _ = _tally_columns(model)
    rows = [{**dict(zip(keys, k)), "n": d} for k, d in sorted(deltas.items()) if d]
    if rows:
        s.exec(_upsert_stmt(s.get_bind().dialect.name, model), params=rows)


def _retally(s: Session, annotator_id: int, kind: str, item_id: int, new: Judgment, old: Judgment | None) -> None:
    """Bring every cache in step with row ``new``, which supersedes ``old`` (None: the annotator's
    first row on the item). Called last before COMMIT (see the module's note on concurrency)."""
    now_current = new.verdict != "retracted"
    was_current = old is not None and old.verdict != "retracted"
    dialect = s.get_bind().dialect.name
    by_rating: Counter = Counter()
    if kind == "sample":
        shift = int(new.verdict in DECISIVE) - int(old is not None and old.verdict in DECISIVE)
        if shift:
            # The sample tally follows by trigger; every current judgment on the sample moves.
            after = s.exec(_SHIFT_RATINGS, params={"item": item_id, "shift": shift}).scalar_one()
            before = after - shift
            for other, n in s.exec(_CURRENT_ON_SAMPLE, params={"item": item_id}).all():
                by_rating[(other, after)] += n
                by_rating[(other, before)] -= n
        elif now_current != was_current:
            before = s.exec(_LOCK_SAMPLE[dialect], params={"item": item_id}).one()
        if shift or now_current != was_current:
            # The loop counted this annotator's "before" with ``new`` in place of ``old``.
            by_rating[(annotator_id, before)] += now_current - was_current
    _bump(s, RaterRatingTally, by_rating)
    hours: Counter = Counter()
    if now_current:
        hours[(annotator_id, hour_of(new.created_at))] += 1
    if was_current:
        hours[(annotator_id, hour_of(old.created_at))] -= 1
    _bump(s, RaterHourTally, hours)
    if kind == "control" and old is None:
        tile = s.get(Tile, item_id)
        _bump(s, RaterControlTally, Counter({(annotator_id, tile.split, tile.class_name): 1}))
    if old is None or now_current != was_current:
        s.exec(_BUMP_ANNOTATOR, params={"me": annotator_id, "d_judged": int(old is None),
                                        "d_current": now_current - was_current})


def record_judgment(ws: Workspace, engine: Engine, annotator_id: int, *, kind: str, item_id: int, verdict: str,
                    reasons: Iterable[str] = (), comment: str = "", seconds: float | None = None,
                    request_id: str, now: datetime | None = None) -> Judgment:
    """Store one verdict on an item given to this annotator; returns the row.

    The same ``request_id`` again returns the stored row and writes nothing. A verdict on an
    item the annotator already judged supersedes their newest row on it (an edit, or the
    retraction an undo left), so each annotator's history of an item is one chain. A lease
    that expired is still honoured until the annotator asks for another item, so a slow
    rating is not lost (the sample may then get one rating more than the overlap target).
    """
    item_column(kind)
    if verdict not in RATABLE:
        raise PathloopError(f"verdict {verdict!r}; expected one of: {', '.join(RATABLE)}")
    reasons = _check_reasons(ws, reasons)
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise PathloopError(f"comment: expected text of at most {MAX_COMMENT} characters")
    if seconds is not None and (not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0):
        raise PathloopError(f"seconds = {seconds!r}; expected a time of 0 or more seconds")
    request_id = _check_request_id(request_id)
    now = now_utc(now)
    with write_session(engine) as s:
        try:
            ann = lock_annotator(s, annotator_id)
            if (done := _by_request(s, annotator_id, request_id)) is not None:
                return _same_request(done, kind, item_id)
            _ensure_item(s, kind, item_id)
            head = _head(s, annotator_id, kind, item_id)  # an edit, or a new rating after an undo
            if head is None and not _was_given(s, annotator_id, kind, item_id):
                raise PathloopError(f"{kind} {item_id} was never given to {ann.username}; rate the item the queue shows")
            j = Judgment(annotator_id=annotator_id, verdict=verdict, reasons=reasons, comment=comment,
                         seconds=None if seconds is None else float(seconds), request_id=request_id,
                         supersedes_id=head.id if head else None, created_at=now,
                         **{"sample_id" if kind == "sample" else "tile_id": item_id})
            s.add(j)
            s.flush()
            s.exec(delete(Lease).where(Lease.annotator_id == annotator_id, item_column(kind, Lease) == item_id))
            _retally(s, annotator_id, kind, item_id, j, head)
            s.commit()
            return utc_judgment(j)
        except IntegrityError:
            s.rollback()
            if (done := _by_request(s, annotator_id, request_id)) is not None:  # a double submit won the race
                return _same_request(done, kind, item_id)
            raise PathloopError(f"{kind} {item_id}: the judgment changed at the same time; submit again") from None


def undo_last(ws: Workspace, engine: Engine, annotator_id: int, *, request_id: str,
              now: datetime | None = None) -> Judgment | None:
    """Retract the annotator's most recent current judgment and lease its item to them again.

    Returns the retracted judgment (the original row), or None when nothing is left to undo.
    The same ``request_id`` again returns the same original and writes nothing.
    """
    request_id = _check_request_id(request_id)
    now = now_utc(now)
    with write_session(engine) as s:
        try:
            lock_annotator(s, annotator_id)
            if (done := _by_request(s, annotator_id, request_id)) is not None:
                return _undone(s, done)
            last = s.exec(select(Judgment).where(Judgment.annotator_id == annotator_id, is_current())
                          .order_by(Judgment.id.desc()).limit(1)).first()
            if last is None:
                return None
            kind = "sample" if last.sample_id is not None else "control"
            item_id = last.sample_id if kind == "sample" else last.tile_id
            retraction = Judgment(annotator_id=annotator_id, sample_id=last.sample_id, tile_id=last.tile_id,
                                  verdict="retracted", reasons=[], comment="", request_id=request_id,
                                  supersedes_id=last.id, created_at=now)
            s.add(retraction)
            s.flush()
            s.exec(delete(Lease).where(Lease.annotator_id == annotator_id, item_column(kind, Lease) == item_id))
            add_lease(s, ws, annotator_id, kind, item_id, now)  # newest lease: shown next
            _retally(s, annotator_id, kind, item_id, retraction, last)
            s.commit()
            return utc_judgment(last)
        except IntegrityError:
            s.rollback()
            if (done := _by_request(s, annotator_id, request_id)) is not None:
                return _undone(s, done)
            raise PathloopError("undo: the last judgment changed at the same time; try again") from None


def _undone(s: Session, retraction: Judgment) -> Judgment:
    if retraction.verdict != "retracted":
        raise PathloopError(f"request id {retraction.request_id!r} was already used for a rating, not an undo")
    return utc_judgment(s.get(Judgment, retraction.supersedes_id))
