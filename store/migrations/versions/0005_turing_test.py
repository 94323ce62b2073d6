"""visual Turing test

Campaigns of real and synthetic tiles mixed blind (``turing_campaign``), their items fixed at
creation (``turing_item``) and raters' append-only real-or-synthetic answers
(``turing_answer``). New tables only: plausibility judgments are untouched.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 19:40:00.000000
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = "0005"
down_revision: Union[str, None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "turing_campaign",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("generator_ids", sa.JSON(), nullable=False),
        sa.Column("per_class", sa.Integer(), nullable=False),
        sa.Column("real_share", sa.Float(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=True),
        sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_turing_campaign")),
        sa.UniqueConstraint("name", name=op.f("uq_turing_campaign_name")),
    )
    op.create_table(
        "turing_item",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=True),
        sa.Column("tile_id", sa.Integer(), nullable=True),
        sa.Column("class_name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.CheckConstraint("(sample_id IS NULL) <> (tile_id IS NULL)", name=op.f("ck_turing_item_one_item")),
        sa.ForeignKeyConstraint(["campaign_id"], ["turing_campaign.id"],
                                name=op.f("fk_turing_item_campaign_id_turing_campaign")),
        sa.ForeignKeyConstraint(["sample_id"], ["sample.id"], name=op.f("fk_turing_item_sample_id_sample")),
        sa.ForeignKeyConstraint(["tile_id"], ["tile.id"], name=op.f("fk_turing_item_tile_id_tile")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_turing_item")),
        sa.UniqueConstraint("campaign_id", "position", name="uq_turing_item_position"),
    )
    op.create_index(op.f("ix_turing_item_campaign_id"), "turing_item", ["campaign_id"], unique=False)
    op.create_table(
        "turing_answer",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("answer", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("confidence", sa.Integer(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("request_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("supersedes_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotator.id"],
                                name=op.f("fk_turing_answer_annotator_id_annotator")),
        sa.ForeignKeyConstraint(["item_id"], ["turing_item.id"], name=op.f("fk_turing_answer_item_id_turing_item")),
        sa.ForeignKeyConstraint(["supersedes_id"], ["turing_answer.id"],
                                name=op.f("fk_turing_answer_supersedes_id_turing_answer")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_turing_answer")),
        sa.UniqueConstraint("annotator_id", "request_id", name="uq_turing_answer_request"),
        sa.UniqueConstraint("supersedes_id", name=op.f("uq_turing_answer_supersedes_id")),
    )
    op.create_index(op.f("ix_turing_answer_item_id"), "turing_answer", ["item_id"], unique=False)
    op.create_index("ix_turing_answer_annotator_item", "turing_answer", ["annotator_id", "item_id"], unique=False)


def downgrade() -> None:
    op.drop_table("turing_answer")
    op.drop_table("turing_item")
    op.drop_table("turing_campaign")
