"""Alembic environment for the SQL store, run programmatically only (``migrations.upgrade``).

Alembic loads this file by path, not as a module of the package, so it imports wakepoint
absolutely.  It never opens a connection itself: the caller passes one (already locked, in a
transaction it will commit) through ``config.attributes["connection"]``.  There is no offline
(SQL script) mode.

* ``target_metadata`` is the store's Core metadata, so ``alembic check``-style comparisons
  (autogenerate) compare the migrations with the code.
* ``render_as_batch`` on SQLite, whose ``ALTER TABLE`` cannot change columns or constraints:
  future revisions written with ``op.batch_alter_table`` then work there too.
* The version table is ``wp_alembic_version``, so an application's own Alembic history in the
  same database is left alone.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection
from wakepoint.stores.sql_schema import METADATA, VERSION_TABLE


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=METADATA,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        raise RuntimeError("wakepoint migrations run online only: use wakepoint.migrations.upgrade")
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "wakepoint's Alembic environment needs a connection in "
            "config.attributes['connection']: use wakepoint.migrations.upgrade(url)"
        )
    _run(connection)


_main()
