"""tile shards

Image gains where a shard image's bytes are (``shard``, ``offset``, ``length``) and their
``codec``; existing rows are PNG files (``codec = 'png'``, no shard).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 14:20:00.000000
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Nullable or with a constant default: SQLite adds them in place, no table rebuild.
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shard", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column("offset", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("length", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("codec", sqlmodel.sql.sqltypes.AutoString(), server_default="png", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_column("codec")
        batch_op.drop_column("length")
        batch_op.drop_column("offset")
        batch_op.drop_column("shard")
