"""Alembic environment: pathloop passes an open connection in ``config.attributes``."""

from alembic import context

import store.models  # noqa: F401  (registers every table on the metadata)
from store.models import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("pathloop migrations run through `pathloop db upgrade`, which passes a connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
