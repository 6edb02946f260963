"""Alembic migrations of the SQL store, shipped in the package and run programmatically.

``upgrade(url)`` (what ``wakepoint db upgrade URL`` and ``SqlStore(url, upgrade=True)`` call)
brings a database to this code's head revision:

* under a lock, so that several processes starting at once do not collide:
  ``pg_advisory_lock`` on PostgreSQL (held by a connection of its own for the whole upgrade),
  a ``filelock`` next to the SQLite file; whoever comes second finds the head and does
  nothing;
* idempotent: a database at head is left alone (nothing is written);
* refusing, with nothing written, a database that holds other tables but no wakepoint schema,
  and one at a revision this code does not know (newer code made it);
* in one transaction (both dialects have transactional DDL; SQLite's through ``BEGIN
  IMMEDIATE``), so a crash mid-upgrade leaves the previous revision.

The Alembic environment (``env.py``) takes the connection from
``config.attributes["connection"]``; ``script_location`` is this package's directory, found
with ``importlib.resources`` so it works from a wheel, an editable install or a checkout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

from ..stores.base import StoreError
from ..stores.sql_engine import (
    DatabaseState,
    inspect_database,
    make_engine,
    parse_url,
    refuse_foreign,
    show,
    sqlite_path,
)
from ..stores.sql_schema import REVISIONS

LOCK_KEY = int.from_bytes(hashlib.sha256(b"wakepoint.migrations").digest()[:8], "big", signed=True)
"""The ``pg_advisory_lock`` key that serializes upgrades of one PostgreSQL database."""

HEAD = REVISIONS[-1]


def script_location() -> str:
    """The directory of the Alembic scripts (this package), as a filesystem path."""
    location = resources.files(__name__)
    if not isinstance(location, Path) or not (location / "env.py").is_file():
        raise StoreError(
            f"wakepoint's migrations are not on the filesystem ({location!r}): install "
            "wakepoint from a wheel or a checkout, not a zip"
        )
    return str(location)


def alembic_config() -> Config:
    """An Alembic ``Config`` for these migrations (no ini file).  Set
    ``attributes["connection"]`` before running a command with it."""
    config = Config()
    config.set_main_option("script_location", script_location())
    config.set_main_option("path_separator", "os")
    return config


def revisions() -> list[str]:
    """The revisions Alembic finds in the package, oldest first."""
    script = ScriptDirectory(script_location())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def upgrade(target: str | URL | Engine, revision: str = "head") -> str | None:
    """Bring the database to ``revision`` (default: this code's head) under the migration
    lock; return the revision it was at before (None: it had no wakepoint schema).

    ``target`` is a store URL or an engine made by ``stores.sql_engine.make_engine``.
    ``StoreError`` for a database that is not wakepoint's or is newer than this code.
    """
    owned = not isinstance(target, Engine)
    engine = make_engine(parse_url(target), "sync") if not isinstance(target, Engine) else target
    shown = show(engine.url)
    path = sqlite_path(engine.url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Look first, without the lock: refusing or finding nothing to do writes nothing,
        # not even the lock file.
        before = _inspect(engine, shown, wal=False)
        if before.current and revision in ("head", HEAD):
            return before.revision
        with _migration_lock(engine):
            before = _inspect(engine, shown, wal=True)  # again: another process may have won
            if before.current and revision in ("head", HEAD):
                return before.revision
            config = alembic_config()
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
            return before.revision
    finally:
        if owned:
            engine.dispose()


def _inspect(engine: Engine, shown: str, *, wal: bool) -> DatabaseState:
    """What the database holds (``StoreError`` for a foreign or newer one); with ``wal``,
    switch a SQLite database to WAL mode (persistent, and not allowed in a transaction)."""
    backend = engine.url.get_backend_name()
    raw = engine.raw_connection()
    try:
        driver: Any = raw.driver_connection
        if backend == "postgresql":
            driver.autocommit = True
        state = inspect_database(driver, backend)
        refuse_foreign(state, shown)
        if wal and backend == "sqlite":
            driver.execute("PRAGMA journal_mode = WAL")
        return state
    finally:
        raw.close()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Hold the database's migration lock (see the module header)."""
    with ExitStack() as stack:
        path = sqlite_path(engine.url)
        if path is not None:
            from filelock import FileLock

            stack.enter_context(FileLock(f"{path}.migrate.lock", timeout=600))
            yield
            return
        connection = stack.enter_context(engine.connect())
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            connection.commit()


__all__ = ["HEAD", "LOCK_KEY", "alembic_config", "revisions", "script_location", "upgrade"]
