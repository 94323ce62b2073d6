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
    """One content-addressed image: a PNG under images/, or a record in a tile shard (store/images.py).

    ``path`` is always the PNG's content address; for a shard image the file exists only once
    something needed a PNG of it. ``shard``/``offset``/``length``/``codec`` locate its bytes.
    """

    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(unique=True, index=True)
    width: int
    height: int
    path: str
    shard: str | None = None
    offset: int | None = Field(default=None, sa_type=BigInteger)
    length: int | None = None
    codec: str = Field(default="png", sa_column_kwargs={"server_default": "png"})


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
    # Queue state, caches like Sample.current_ratings (store/judgments.py keeps them in step):
    # items judged (judgments that supersede nothing: the queue position) and current judgments.
    judged_items: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    current_judgments: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


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
        Index("ix_judgment_annotator_sample", "annotator_id", "sample_id", "verdict", "created_at", "id"),
        # progress(): the part of an hour before a round began (see RaterHourTally).
        Index("ix_judgment_annotator_created", "annotator_id", "created_at"),
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



# -- Tallies: counts that queue.progress reads instead of counting rows ----------------------
# Caches, like Sample.current_ratings. The sample and tile tallies are kept by triggers on
# those tables (migration 0004), so every way of adding rows keeps them; the per-annotator
# ones by store/judgments.py in the transaction that writes the judgment. recount_ratings
# rebuilds them all. No foreign keys: a tally row is not a fact to protect.

class SampleTally(SQLModel, table=True):
    """How many samples have ``current_ratings`` = this value."""

    __tablename__ = "sample_tally"

    current_ratings: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    samples: int = 0


class TileTally(SQLModel, table=True):
    """How many real tiles there are of one split and class."""

    __tablename__ = "tile_tally"

    split: str = Field(primary_key=True)
    class_name: str = Field(primary_key=True)
    tiles: int = 0


class RaterRatingTally(SQLModel, table=True):
    """An annotator's current judgments on samples that have ``current_ratings`` = this value
    (a sample's rating count moves every current judgment on it to another row)."""

    __tablename__ = "rater_rating_tally"

    annotator_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    current_ratings: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    judgments: int = 0


class RaterHourTally(SQLModel, table=True):
    """An annotator's current judgments created in one UTC hour (``hour``: hours since 1970)."""

    __tablename__ = "rater_hour_tally"

    annotator_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    hour: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    judgments: int = 0


class RaterControlTally(SQLModel, table=True):
    """How many distinct real tiles of one split and class an annotator has judged (ever:
    a retracted judgment still counts, as a control is never given twice)."""

    __tablename__ = "rater_control_tally"

    annotator_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    split: str = Field(primary_key=True)
    class_name: str = Field(primary_key=True)
    tiles: int = 0

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


# -- Visual Turing test (store/turing.py): kept apart from plausibility judgments -------------

TURING_ANSWERS = ("real", "synthetic", "retracted")


class TuringCampaign(SQLModel, table=True):
    """A fixed, blind mix of real and synthetic tiles that raters call real or synthetic."""

    __tablename__ = "turing_campaign"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    generator_ids: list = Field(default_factory=list, sa_type=JSON)
    per_class: int  # synthetic items per class and generator version
    real_share: float  # share of real tiles among all items
    seed: int = Field(sa_type=BigInteger)
    active: bool = False
    round_number: int | None = None
    created_by: str | None = None
    created_at: datetime = _created()


class TuringItem(SQLModel, table=True):
    """One tile of a campaign, fixed when the campaign is made: a sample or a real val/test tile."""

    __tablename__ = "turing_item"
    __table_args__ = (
        UniqueConstraint("campaign_id", "position", name="uq_turing_item_position"),
        CheckConstraint("(sample_id IS NULL) <> (tile_id IS NULL)", name="one_item"),
    )

    id: int | None = Field(default=None, primary_key=True)
    campaign_id: int = Field(foreign_key="turing_campaign.id", index=True)
    position: int
    sample_id: int | None = Field(default=None, foreign_key="sample.id")
    tile_id: int | None = Field(default=None, foreign_key="tile.id")
    class_name: str


class TuringAnswer(SQLModel, table=True):
    """One append-only answer, real or synthetic, with confidence 1 (guess) to 3 (certain).

    Like ``Judgment``: an edit or an undo adds a row that supersedes the rater's newest row on
    the item (an undo's row says ``retracted``); a repeated ``request_id`` is a no-op.
    """

    __tablename__ = "turing_answer"
    __table_args__ = (
        UniqueConstraint("annotator_id", "request_id", name="uq_turing_answer_request"),
        Index("ix_turing_answer_annotator_item", "annotator_id", "item_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    item_id: int = Field(foreign_key="turing_item.id", index=True)
    annotator_id: int = Field(foreign_key="annotator.id")
    answer: str
    confidence: int | None = None
    seconds: float | None = None
    request_id: str
    supersedes_id: int | None = Field(default=None, foreign_key="turing_answer.id", unique=True)
    created_at: datetime = _created()
