"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 11:25:36.576643
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = "0001"
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:

    op.create_table(
        "annotator",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("role", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("password_hash", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("email", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotator")),
        sa.UniqueConstraint("email", name=op.f("uq_annotator_email")),
    )
    with op.batch_alter_table("annotator", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_annotator_username"), ["username"], unique=True)

    op.create_table(
        "generator_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("folder", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("round_number", sa.Integer(), nullable=True),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["generator_version.id"],
            name=op.f("fk_generator_version_parent_id_generator_version"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generator_version")),
    )
    op.create_table(
        "image",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("path", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image")),
    )
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_image_sha256"), ["sha256"], unique=True)

    op.create_table(
        "reward_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("backbone", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("folder", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("data_manifest", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reward_version")),
    )
    op.create_table(
        "slide",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("vendor", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("mpp", sa.Float(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("label", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("split", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_slide")),
    )
    with op.batch_alter_table("slide", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_slide_sha256"), ["sha256"], unique=True)

    op.create_table(
        "evaluation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generator_id", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("plots", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["generator_id"],
            ["generator_version.id"],
            name=op.f("fk_evaluation_generator_id_generator_version"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation")),
    )
    with op.batch_alter_table("evaluation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evaluation_generator_id"), ["generator_id"], unique=False)

    op.create_table(
        "round",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("generator_in_id", sa.Integer(), nullable=True),
        sa.Column("reward_id", sa.Integer(), nullable=True),
        sa.Column("generator_out_id", sa.Integer(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("lock_owner", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("lock_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["generator_in_id"],
            ["generator_version.id"],
            name=op.f("fk_round_generator_in_id_generator_version"),
        ),
        sa.ForeignKeyConstraint(
            ["generator_out_id"],
            ["generator_version.id"],
            name=op.f("fk_round_generator_out_id_generator_version"),
        ),
        sa.ForeignKeyConstraint(
            ["reward_id"], ["reward_version.id"], name=op.f("fk_round_reward_id_reward_version")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_round")),
        sa.UniqueConstraint("number", name=op.f("uq_round_number")),
    )
    op.create_table(
        "sample",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("generator_id", sa.Integer(), nullable=False),
        sa.Column("class_name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("sampler", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("guidance", sa.Float(), nullable=False),
        sa.Column("round_number", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["generator_id"], ["generator_version.id"], name=op.f("fk_sample_generator_id_generator_version")
        ),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"], name=op.f("fk_sample_image_id_image")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sample")),
        sa.UniqueConstraint(
            "generator_id", "class_name", "seed", "sampler", "steps", "guidance", name="uq_sample_recipe"
        ),
    )
    with op.batch_alter_table("sample", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sample_class_name"), ["class_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_sample_generator_id"), ["generator_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sample_image_id"), ["image_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sample_round_number"), ["round_number"], unique=False)

    op.create_table(
        "tile",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=True),
        sa.Column("level", sa.Integer(), nullable=True),
        sa.Column("x", sa.Integer(), nullable=True),
        sa.Column("y", sa.Integer(), nullable=True),
        sa.Column("extent", sa.Integer(), nullable=True),
        sa.Column("tissue", sa.Float(), nullable=True),
        sa.Column("class_name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("split", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"], name=op.f("fk_tile_image_id_image")),
        sa.ForeignKeyConstraint(["slide_id"], ["slide.id"], name=op.f("fk_tile_slide_id_slide")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tile")),
        sa.UniqueConstraint("slide_id", "level", "x", "y", "extent", name="uq_tile_grid"),
    )
    with op.batch_alter_table("tile", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tile_class_name"), ["class_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_tile_image_id"), ["image_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_tile_slide_id"), ["slide_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_tile_split"), ["split"], unique=False)

    op.create_table(
        "judgment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=True),
        sa.Column("tile_id", sa.Integer(), nullable=True),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("verdict", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("comment", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("request_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("supersedes_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("(sample_id IS NULL) <> (tile_id IS NULL)", name=op.f("ck_judgment_one_item")),
        sa.ForeignKeyConstraint(
            ["annotator_id"], ["annotator.id"], name=op.f("fk_judgment_annotator_id_annotator")
        ),
        sa.ForeignKeyConstraint(["sample_id"], ["sample.id"], name=op.f("fk_judgment_sample_id_sample")),
        sa.ForeignKeyConstraint(
            ["supersedes_id"], ["judgment.id"], name=op.f("fk_judgment_supersedes_id_judgment")
        ),
        sa.ForeignKeyConstraint(["tile_id"], ["tile.id"], name=op.f("fk_judgment_tile_id_tile")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judgment")),
        sa.UniqueConstraint("annotator_id", "request_id", name="uq_judgment_request"),
    )
    with op.batch_alter_table("judgment", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_judgment_annotator_id"), ["annotator_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_judgment_sample_id"), ["sample_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_judgment_supersedes_id"), ["supersedes_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_judgment_tile_id"), ["tile_id"], unique=False)

    op.create_table(
        "lease",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=True),
        sa.Column("tile_id", sa.Integer(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("(sample_id IS NULL) <> (tile_id IS NULL)", name=op.f("ck_lease_one_item")),
        sa.ForeignKeyConstraint(
            ["annotator_id"], ["annotator.id"], name=op.f("fk_lease_annotator_id_annotator")
        ),
        sa.ForeignKeyConstraint(["sample_id"], ["sample.id"], name=op.f("fk_lease_sample_id_sample")),
        sa.ForeignKeyConstraint(["tile_id"], ["tile.id"], name=op.f("fk_lease_tile_id_tile")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lease")),
    )
    with op.batch_alter_table("lease", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lease_annotator_id"), ["annotator_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_lease_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_lease_sample_id"), ["sample_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_lease_tile_id"), ["tile_id"], unique=False)

    op.create_table(
        "reward_score",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("reward_id", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["reward_id"], ["reward_version.id"], name=op.f("fk_reward_score_reward_id_reward_version")
        ),
        sa.ForeignKeyConstraint(["sample_id"], ["sample.id"], name=op.f("fk_reward_score_sample_id_sample")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reward_score")),
        sa.UniqueConstraint("sample_id", "reward_id", name="uq_reward_score"),
    )
    with op.batch_alter_table("reward_score", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reward_score_reward_id"), ["reward_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_reward_score_sample_id"), ["sample_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("reward_score", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reward_score_sample_id"))
        batch_op.drop_index(batch_op.f("ix_reward_score_reward_id"))

    op.drop_table("reward_score")
    with op.batch_alter_table("lease", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lease_tile_id"))
        batch_op.drop_index(batch_op.f("ix_lease_sample_id"))
        batch_op.drop_index(batch_op.f("ix_lease_expires_at"))
        batch_op.drop_index(batch_op.f("ix_lease_annotator_id"))

    op.drop_table("lease")
    with op.batch_alter_table("judgment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_judgment_tile_id"))
        batch_op.drop_index(batch_op.f("ix_judgment_supersedes_id"))
        batch_op.drop_index(batch_op.f("ix_judgment_sample_id"))
        batch_op.drop_index(batch_op.f("ix_judgment_annotator_id"))

    op.drop_table("judgment")
    with op.batch_alter_table("tile", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tile_split"))
        batch_op.drop_index(batch_op.f("ix_tile_slide_id"))
        batch_op.drop_index(batch_op.f("ix_tile_image_id"))
        batch_op.drop_index(batch_op.f("ix_tile_class_name"))

    op.drop_table("tile")
    with op.batch_alter_table("sample", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sample_round_number"))
        batch_op.drop_index(batch_op.f("ix_sample_image_id"))
        batch_op.drop_index(batch_op.f("ix_sample_generator_id"))
        batch_op.drop_index(batch_op.f("ix_sample_class_name"))

    op.drop_table("sample")
    op.drop_table("round")
    with op.batch_alter_table("evaluation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evaluation_generator_id"))

    op.drop_table("evaluation")
    with op.batch_alter_table("slide", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_slide_sha256"))

    op.drop_table("slide")
    op.drop_table("reward_version")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_sha256"))

    op.drop_table("image")
    op.drop_table("generator_version")
    with op.batch_alter_table("annotator", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_annotator_username"))

    op.drop_table("annotator")
