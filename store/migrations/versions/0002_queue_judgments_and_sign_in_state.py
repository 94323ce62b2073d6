"""queue, judgments and sign-in state

Sample gains the queue's state (``current_ratings``, a cache of current plausible/implausible
judgments, backfilled here; ``queue_key``, its place in the stable random order); Annotator
gains the failed sign-in counter; a judgment can be superseded at most once (unique index);
indexes for the queue's per-annotator look-ups and the most-uncertain-first order.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:40:42.144582
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Must match store/judgments.py: current = not superseded and not retracted.
BACKFILL_RATINGS = """
UPDATE sample SET current_ratings = (
    SELECT count(*) FROM judgment j
    WHERE j.sample_id = sample.id AND j.verdict IN ('plausible', 'implausible')
      AND NOT EXISTS (SELECT 1 FROM judgment k WHERE k.supersedes_id = j.id))
"""
RANDOM_KEY = {
    "sqlite": "UPDATE sample SET queue_key = abs(random()) % 2147483648",
    "postgresql": "UPDATE sample SET queue_key = floor(random() * 2147483648)::int",
}


def upgrade() -> None:
    # Added with constant defaults so SQLite can ADD COLUMN in place (no table rebuild, which
    # foreign keys from judgment and lease rows would refuse).
    with op.batch_alter_table("annotator", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failed_logins", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("sample", schema=None) as batch_op:
        batch_op.add_column(sa.Column("current_ratings", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("queue_key", sa.Integer(), server_default="0", nullable=False))
        batch_op.create_index("ix_sample_queue", ["current_ratings", "queue_key"], unique=False)
    bind = op.get_bind()
    op.execute(BACKFILL_RATINGS)
    op.execute(RANDOM_KEY[bind.dialect.name])

    with op.batch_alter_table("judgment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_judgment_supersedes_id"))
        batch_op.create_index(batch_op.f("ix_judgment_supersedes_id"), ["supersedes_id"], unique=True)
        batch_op.create_index(
            "ix_judgment_annotator_sample", ["annotator_id", "sample_id", "verdict", "created_at", "id"], unique=False
        )
        batch_op.create_index("ix_judgment_annotator_supersedes", ["annotator_id", "supersedes_id"], unique=False)
        batch_op.create_index("ix_judgment_annotator_tile", ["annotator_id", "tile_id"], unique=False)

    op.create_index(
        "ix_reward_score_uncertainty",
        "reward_score",
        ["reward_id", sa.text("abs(probability - 0.5)"), "sample_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_reward_score_uncertainty", table_name="reward_score")

    with op.batch_alter_table("judgment", schema=None) as batch_op:
        batch_op.drop_index("ix_judgment_annotator_tile")
        batch_op.drop_index("ix_judgment_annotator_supersedes")
        batch_op.drop_index("ix_judgment_annotator_sample")
        batch_op.drop_index(batch_op.f("ix_judgment_supersedes_id"))
        batch_op.create_index(batch_op.f("ix_judgment_supersedes_id"), ["supersedes_id"], unique=False)

    # SQLite >= 3.35 drops columns in place; a rebuild would trip the foreign keys.
    with op.batch_alter_table("sample", schema=None, recreate="never") as batch_op:
        batch_op.drop_index("ix_sample_queue")
        batch_op.drop_column("queue_key")
        batch_op.drop_column("current_ratings")

    with op.batch_alter_table("annotator", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("last_failed_at")
        batch_op.drop_column("failed_logins")
