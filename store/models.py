"""Every table pathloop stores, in one file (DESIGN.md, "Data model").

Judgments are append-only: an edit or an undo adds a row whose ``supersedes_id`` names
the row it replaces. Class names are stored as the names from ``pathloop.toml`` rather
than indices, so reordering the class list never relabels data.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, DateTime, Index, MetaData, UniqueConstraint, text
from sqlmodel import Field, SQLModel

# Named constraints, so Alembic can alter them later (SQLite batch mode needs the names).
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata: MetaData = SQLModel.metadata

SPLITS = ("train", "val", "test")
ROLES = ("annotator", "admin")
VERDICTS = ("plausible", "implausible", "unsure", "retracted")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(dt: datetime | None) -> datetime | None:
    """``dt`` as an aware UTC datetime; naive ones (SQLite returns those) are taken as UTC."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def new_queue_key() -> int:
    """A sample's place in the queue's stable random order (31 bits: an INTEGER everywhere)."""
    return secrets.randbits(31)


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=DateTime(timezone=True), nullable=False)


class Slide(SQLModel, table=True):
    """A whole-slide image file that tiles were cut from."""

    id: int | None = Field(default=None, primary_key=True)
    path: str
    sha256: str = Field(unique=True, index=True)
    vendor: str | None = None
    mpp: float | None = None
    width: int
    height: int
    label: str | None = None
    # Set when the whole slide went to one split (split by slide); None when split by blocks.
    split: str | None = None
    created_at: datetime = _created()


class Image(SQLModel, table=True):
    """One content-addressed PNG under the workspace's images/ folder."""

    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(unique=True, index=True)
    width: int
    height: int
    path: str


class Tile(SQLModel, table=True):
    """A real, class-labelled tile: from a slide (level-0 coordinates) or a folder import."""

    __table_args__ = (UniqueConstraint("slide_id", "level", "x", "y", "extent", name="uq_tile_grid"),)

    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="image.id", index=True)
    slide_id: int | None = Field(default=None, foreign_key="slide.id", index=True)
    level: int | None = None
    x: int | None = None
    y: int | None = None
    extent: int | None = None  # level-0 pixels the tile covers
    tissue: float | None = None
    class_name: str = Field(index=True)
    split: str = Field(index=True)
    created_at: datetime = _created()


class GeneratorVersion(SQLModel, table=True):
    """A diffusion model folder in the diffusers save_pretrained layout."""

    __tablename__ = "generator_version"

    id: int | None = Field(default=None, primary_key=True)
    folder: str
    parent_id: int | None = Field(default=None, foreign_key="generator_version.id")
    round_number: int | None = None
    kind: str = "pretrained"  # pretrained | imported | finetuned
    config: dict = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = _created()


class Sample(SQLModel, table=True):
    """A synthetic tile and exactly how it was generated."""

    __table_args__ = (
        UniqueConstraint(
            "generator_id", "class_name", "seed", "sampler", "steps", "guidance", name="uq_sample_recipe"
        ),
        # The queue scans open samples (few ratings) in key order; see store/queue.py.
        Index("ix_sample_queue", "current_ratings", "queue_key"),
    )

    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="image.id", index=True)
    generator_id: int = Field(foreign_key="generator_version.id", index=True)
    class_name: str = Field(index=True)
    seed: int = Field(sa_type=BigInteger)
    sampler: str
    steps: int
    guidance: float = 0.0
    round_number: int | None = Field(default=None, index=True)
    created_at: datetime = _created()
    # Queue state. current_ratings counts current plausible/implausible judgments: a cache of
    # what store.judgments defines, kept in step by record_judgment and undo_last (and
    # rebuilt by recount_ratings), so finding an open sample never counts judgment rows.
    current_ratings: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    queue_key: int = Field(default_factory=new_queue_key, sa_column_kwargs={"server_default": "0"})


class Annotator(SQLModel, table=True):
    """A person (or a simulated rater) who judges tiles. Only a password hash is stored."""

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(unique=True, index=True)
    role: str = "annotator"
    password_hash: str | None = None
    email: str | None = Field(default=None, unique=True)
    active: bool = True
    created_at: datetime = _created()
    # Failed sign-ins since the last success, in the database so the back-off holds across
    # processes (store/accounts.py).
    failed_logins: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    last_failed_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class Lease(SQLModel, table=True):
    """An item reserved for one annotator until ``expires_at``."""

    __table_args__ = (
        CheckConstraint("(sample_id IS NULL) <> (tile_id IS NULL)", name="one_item"),
    )

    id: int | None = Field(default=None, primary_key=True)
    annotator_id: int = Field(foreign_key="annotator.id", index=True)
    sample_id: int | None = Field(default=None, foreign_key="sample.id", index=True)
    tile_id: int | None = Field(default=None, foreign_key="tile.id", index=True)
    expires_at: datetime = Field(sa_type=DateTime(timezone=True), index=True)
    created_at: datetime = _created()


class Judgment(SQLModel, table=True):
    """One append-only verdict on a sample or a blind control tile."""

    __table_args__ = (
        UniqueConstraint("annotator_id", "request_id", name="uq_judgment_request"),
        CheckConstraint("(sample_id IS NULL) <> (tile_id IS NULL)", name="one_item"),
        # Also covers progress()'s pass over one annotator's judgments (no table look-ups).
        Index("ix_judgment_annotator_sample", "annotator_id", "sample_id", "verdict", "created_at", "id"),
        Index("ix_judgment_annotator_tile", "annotator_id", "tile_id"),
        Index("ix_judgment_annotator_supersedes", "annotator_id", "supersedes_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    sample_id: int | None = Field(default=None, foreign_key="sample.id", index=True)
    tile_id: int | None = Field(default=None, foreign_key="tile.id", index=True)
    annotator_id: int = Field(foreign_key="annotator.id", index=True)
    verdict: str
    reasons: list = Field(default_factory=list, sa_type=JSON)
    comment: str = ""
    seconds: float | None = None
    request_id: str
    # Unique: a row is superseded at most once, so two racing edits cannot fork the history.
    supersedes_id: int | None = Field(default=None, foreign_key="judgment.id", index=True, unique=True)
    created_at: datetime = _created()


class RewardVersion(SQLModel, table=True):
    """A trained reward model folder and what it was trained on."""

    __tablename__ = "reward_version"

    id: int | None = Field(default=None, primary_key=True)
    backbone: str
    folder: str
    metrics: dict = Field(default_factory=dict, sa_type=JSON)
    config: dict = Field(default_factory=dict, sa_type=JSON)
    data_manifest: dict = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = _created()


class RewardScore(SQLModel, table=True):
    """p(plausible) for one sample under one reward version."""

    __tablename__ = "reward_score"
    __table_args__ = (
        UniqueConstraint("sample_id", "reward_id", name="uq_reward_score"),
        # Most uncertain first (store/queue.py orders by exactly this expression).
        Index("ix_reward_score_uncertainty", "reward_id", text("abs(probability - 0.5)"), "sample_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    sample_id: int = Field(foreign_key="sample.id", index=True)
    reward_id: int = Field(foreign_key="reward_version.id", index=True)
    probability: float
    created_at: datetime = _created()


class Round(SQLModel, table=True):
    """One turn of the loop, as a resumable state machine with a lock."""

    id: int | None = Field(default=None, primary_key=True)
    number: int = Field(unique=True)
    state: str = "generating"
    generator_in_id: int | None = Field(default=None, foreign_key="generator_version.id")
    reward_id: int | None = Field(default=None, foreign_key="reward_version.id")
    generator_out_id: int | None = Field(default=None, foreign_key="generator_version.id")
    details: dict = Field(default_factory=dict, sa_type=JSON)
    lock_owner: str | None = None
    lock_expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    created_at: datetime = _created()
    updated_at: datetime = _created()
    finished_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class Evaluation(SQLModel, table=True):
    """Metrics of one generator version, written by ``pathloop evaluate``."""

    id: int | None = Field(default=None, primary_key=True)
    generator_id: int = Field(foreign_key="generator_version.id", index=True)
    metrics: dict = Field(default_factory=dict, sa_type=JSON)
    plots: list = Field(default_factory=list, sa_type=JSON)
    created_at: datetime = _created()
