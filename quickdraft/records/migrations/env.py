"""Alembic environment: runs on the connection RecordStore hands over, or on the configured URL."""

from alembic import context
from sqlalchemy import create_engine

from quickdraft.records.tables import Base

config = context.config
connection = config.attributes.get("connection")


def run(conn) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds tables when it must.
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:  # the `alembic` command line, pointed at this folder
    with create_engine(config.get_main_option("sqlalchemy.url")).connect() as conn:
        run(conn)
