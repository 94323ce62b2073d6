"""queue tallies

Counts that ``store.queue.progress`` reads instead of counting rows, so its cost does not
grow with the number of samples, tiles or judgments: samples per rating count and tiles per
split and class (kept by the triggers created here, so every way of adding rows keeps them),
and per annotator: current judgments per rating count of their sample, per UTC hour, distinct
tiles judged per split and class, items judged and current judgments (kept by
store/judgments.py). All are backfilled here; ``recount_ratings`` rebuilds them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 15:10:00.000000
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = "0004"
down_revision: Union[str, None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Must match store/judgments.py: current = not superseded and not retracted; decisive =
# plausible or implausible; the hour is floor(seconds since 1970 / 3600), UTC.
CURRENT = "j.verdict <> 'retracted' AND NOT EXISTS (SELECT 1 FROM judgment k WHERE k.supersedes_id = j.id)"
HOUR = {
    "sqlite": "(CAST(strftime('%s', j.created_at) AS INTEGER)"
              " - ((CAST(strftime('%s', j.created_at) AS INTEGER) % 3600) + 3600) % 3600) / 3600",
    "postgresql": "CAST(floor(extract(epoch FROM j.created_at) / 3600) AS INTEGER)",
}
BACKFILL = [
    "INSERT INTO sample_tally (current_ratings, samples) SELECT current_ratings, count(*) FROM sample"
    " GROUP BY current_ratings",
    "INSERT INTO tile_tally (split, class_name, tiles) SELECT split, class_name, count(*) FROM tile"
    " GROUP BY split, class_name",
    "INSERT INTO rater_rating_tally (annotator_id, current_ratings, judgments)"
    " SELECT j.annotator_id, s.current_ratings, count(*) FROM judgment j JOIN sample s ON s.id = j.sample_id"
    f" WHERE {CURRENT} GROUP BY j.annotator_id, s.current_ratings",
    "INSERT INTO rater_hour_tally (annotator_id, hour, judgments) SELECT annotator_id, hour, count(*) FROM"
    f" (SELECT j.annotator_id, {{hour}} AS hour FROM judgment j WHERE {CURRENT}) AS h GROUP BY annotator_id, hour",
    "INSERT INTO rater_control_tally (annotator_id, split, class_name, tiles)"
    " SELECT j.annotator_id, t.split, t.class_name, count(DISTINCT j.tile_id) FROM judgment j"
    " JOIN tile t ON t.id = j.tile_id GROUP BY j.annotator_id, t.split, t.class_name",
    "UPDATE annotator SET"
    " judged_items = (SELECT count(*) FROM judgment j WHERE j.annotator_id = annotator.id"
    " AND j.supersedes_id IS NULL),"
    f" current_judgments = (SELECT count(*) FROM judgment j WHERE j.annotator_id = annotator.id AND {CURRENT})",
]

# SQLite: row triggers. PostgreSQL: statement triggers over the transition tables, so a bulk
# insert (COPY) updates each tally row once, and rows are locked in key order (no deadlock
# between two raters whose samples move in opposite directions).
SQLITE_TRIGGERS = [
    """CREATE TRIGGER sample_tally_insert AFTER INSERT ON sample BEGIN
        INSERT INTO sample_tally (current_ratings, samples) VALUES (NEW.current_ratings, 1)
            ON CONFLICT (current_ratings) DO UPDATE SET samples = samples + 1;
    END""",
    """CREATE TRIGGER sample_tally_delete AFTER DELETE ON sample BEGIN
        INSERT INTO sample_tally (current_ratings, samples) VALUES (OLD.current_ratings, -1)
            ON CONFLICT (current_ratings) DO UPDATE SET samples = samples - 1;
    END""",
    """CREATE TRIGGER sample_tally_update AFTER UPDATE OF current_ratings ON sample
    WHEN OLD.current_ratings IS NOT NEW.current_ratings BEGIN
        INSERT INTO sample_tally (current_ratings, samples) VALUES (OLD.current_ratings, -1)
            ON CONFLICT (current_ratings) DO UPDATE SET samples = samples - 1;
        INSERT INTO sample_tally (current_ratings, samples) VALUES (NEW.current_ratings, 1)
            ON CONFLICT (current_ratings) DO UPDATE SET samples = samples + 1;
    END""",
    """CREATE TRIGGER tile_tally_insert AFTER INSERT ON tile BEGIN
        INSERT INTO tile_tally (split, class_name, tiles) VALUES (NEW.split, NEW.class_name, 1)
            ON CONFLICT (split, class_name) DO UPDATE SET tiles = tiles + 1;
    END""",
    """CREATE TRIGGER tile_tally_delete AFTER DELETE ON tile BEGIN
        INSERT INTO tile_tally (split, class_name, tiles) VALUES (OLD.split, OLD.class_name, -1)
            ON CONFLICT (split, class_name) DO UPDATE SET tiles = tiles - 1;
    END""",
    """CREATE TRIGGER tile_tally_update AFTER UPDATE OF split, class_name ON tile
    WHEN OLD.split IS NOT NEW.split OR OLD.class_name IS NOT NEW.class_name BEGIN
        INSERT INTO tile_tally (split, class_name, tiles) VALUES (OLD.split, OLD.class_name, -1)
            ON CONFLICT (split, class_name) DO UPDATE SET tiles = tiles - 1;
        INSERT INTO tile_tally (split, class_name, tiles) VALUES (NEW.split, NEW.class_name, 1)
            ON CONFLICT (split, class_name) DO UPDATE SET tiles = tiles + 1;
    END""",
]
SQLITE_TRIGGER_NAMES = [f"{t}_tally_{e}" for t in ("sample", "tile") for e in ("insert", "delete", "update")]

# One function per table; TG_OP says which transition tables this event has.
PG_FUNCTION = """CREATE FUNCTION {table}_tally_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {table}_tally AS t ({key}, {count})
        SELECT {key}, count(*) FROM new_rows GROUP BY {key} ORDER BY {key}
        ON CONFLICT ({key}) DO UPDATE SET {count} = t.{count} + excluded.{count};
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {table}_tally AS t ({key}, {count})
        SELECT {key}, -count(*) FROM old_rows GROUP BY {key} ORDER BY {key}
        ON CONFLICT ({key}) DO UPDATE SET {count} = t.{count} + excluded.{count};
    ELSE
        INSERT INTO {table}_tally AS t ({key}, {count})
        SELECT {key}, sum(d) FROM (SELECT {key}, 1 AS d FROM new_rows
                                   UNION ALL SELECT {key}, -1 AS d FROM old_rows) AS changes
        GROUP BY {key} HAVING sum(d) <> 0 ORDER BY {key}
        ON CONFLICT ({key}) DO UPDATE SET {count} = t.{count} + excluded.{count};
    END IF;
    RETURN NULL;
END
$$"""
PG_TABLES = {"sample": ("current_ratings", "samples"), "tile": ("split, class_name", "tiles")}
PG_EVENTS = {"insert": "NEW TABLE AS new_rows", "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
             "delete": "OLD TABLE AS old_rows"}


def _pg_function(table: str) -> str:
    key, count = PG_TABLES[table]
    return PG_FUNCTION.format(table=table, key=key, count=count)


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    # Constant defaults: SQLite adds them in place (no table rebuild under foreign keys).
    with op.batch_alter_table("annotator", schema=None) as batch_op:
        batch_op.add_column(sa.Column("judged_items", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("current_judgments", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("judgment", schema=None) as batch_op:
        batch_op.create_index("ix_judgment_annotator_created", ["annotator_id", "created_at"], unique=False)

    op.create_table(
        "sample_tally",
        sa.Column("current_ratings", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("current_ratings", name=op.f("pk_sample_tally")),
    )
    op.create_table(
        "tile_tally",
        sa.Column("split", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("class_name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("tiles", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("split", "class_name", name=op.f("pk_tile_tally")),
    )
    op.create_table(
        "rater_rating_tally",
        sa.Column("annotator_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("current_ratings", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("judgments", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("annotator_id", "current_ratings", name=op.f("pk_rater_rating_tally")),
    )
    op.create_table(
        "rater_hour_tally",
        sa.Column("annotator_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("hour", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("judgments", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("annotator_id", "hour", name=op.f("pk_rater_hour_tally")),
    )
    op.create_table(
        "rater_control_tally",
        sa.Column("annotator_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("split", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("class_name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("tiles", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("annotator_id", "split", "class_name", name=op.f("pk_rater_control_tally")),
    )

    for statement in BACKFILL:
        op.execute(statement.replace("{hour}", HOUR[dialect]))
    if dialect == "sqlite":
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)
    else:
        for table in PG_TABLES:
            op.execute(_pg_function(table))
            for event, referencing in PG_EVENTS.items():
                op.execute(f"CREATE TRIGGER {table}_tally_{event} AFTER {event.upper()} ON {table}"
                           f" REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {table}_tally_apply()")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for name in SQLITE_TRIGGER_NAMES:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    else:
        for table in PG_TABLES:
            for event in PG_EVENTS:
                op.execute(f"DROP TRIGGER IF EXISTS {table}_tally_{event} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {table}_tally_apply()")
    for table in ("rater_control_tally", "rater_hour_tally", "rater_rating_tally", "tile_tally", "sample_tally"):
        op.drop_table(table)
    with op.batch_alter_table("judgment", schema=None) as batch_op:
        batch_op.drop_index("ix_judgment_annotator_created")
    # SQLite >= 3.35 drops columns in place; a rebuild would trip the foreign keys.
    with op.batch_alter_table("annotator", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("current_judgments")
        batch_op.drop_column("judged_items")
