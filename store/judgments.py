"""What a *current* judgment is, and the two ways an annotator writes judgments: rate and undo.

Judgment rows are append-only. A row is **current** when no other row supersedes it and it
is not a retraction; an edit adds a row that supersedes the annotator's newest row on the item, an
undo adds a ``retracted`` row. Plausible and implausible are **decisive**: they count toward
a sample's overlap target. Unsure (skip) is current too — it keeps the item away from that
annotator — but does not count, so the sample stays open for others.

``Sample.current_ratings`` caches the number of current decisive judgments of a sample; the
functions here keep it in step inside the same transaction, and ``recount_ratings`` rebuilds
it from the rows. Every read of "current" goes through ``is_current``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, bindparam, delete, exists, func, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from store.db import write_session
from store.errors import PathloopError
from store.models import Annotator, Judgment, Lease, Sample, Tile, as_utc, utcnow
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
    """Rebuild ``Sample.current_ratings`` from the judgment rows; returns how many were wrong."""
    counted = (select(func.count()).select_from(Judgment)
               .where(Judgment.sample_id == Sample.id, Judgment.verdict.in_(DECISIVE), is_current())
               .scalar_subquery())
    with write_session(engine) as s:
        wrong = s.exec(select(func.count()).select_from(Sample).where(Sample.current_ratings != counted)).one()
        if wrong:
            s.exec(update(Sample).where(Sample.current_ratings != counted).values(current_ratings=counted))
        s.commit()
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


def _shift_ratings(s: Session, kind: str, item_id: int, delta: int) -> None:
    if kind == "sample" and delta:
        s.exec(update(Sample).where(Sample.id == item_id)
                  .values(current_ratings=Sample.current_ratings + delta))


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
            was = head is not None and head.verdict in DECISIVE
            _shift_ratings(s, kind, item_id, int(verdict in DECISIVE) - int(was))
            s.exec(delete(Lease).where(Lease.annotator_id == annotator_id, item_column(kind, Lease) == item_id))
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
            s.add(Judgment(annotator_id=annotator_id, sample_id=last.sample_id, tile_id=last.tile_id,
                           verdict="retracted", reasons=[], comment="", request_id=request_id,
                           supersedes_id=last.id, created_at=now))
            _shift_ratings(s, kind, item_id, -int(last.verdict in DECISIVE))
            s.exec(delete(Lease).where(Lease.annotator_id == annotator_id, item_column(kind, Lease) == item_id))
            add_lease(s, ws, annotator_id, kind, item_id, now)  # newest lease: shown next
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
