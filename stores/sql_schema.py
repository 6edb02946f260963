"""The SQL store's tables, as SQLAlchemy Core metadata: the schema at the migrations' head.

This module is the *target* of the Alembic migrations in ``wakepoint.migrations`` (a test
checks that autogenerate finds no difference between the two); a migration never imports it,
because a migration must keep describing the schema of its own revision.

Choices, and why:

* ``wp_`` prefixes and our own Alembic version table (``wp_alembic_version``), so that the
  tables can share a schema with an application that runs Alembic itself.
* Run states and record bodies are ``LargeBinary`` (BLOB / BYTEA): the exact bytes msgspec
  encoded and the exact bytes that were signed.  Never JSON/JSONB, which re-encode.
* Times are ``BIGINT`` microseconds since the Unix epoch, UTC (``to_us``/``from_us``), as
  DBOS does: exact, ordered the same way as the ``datetime`` values on every dialect, and
  free of the driver's time-zone handling (SQLite has no time type at all).
* Run ids, wait keys and workflow ids compare by code point: the ``C`` collation on
  PostgreSQL (SQLite's default BINARY collation on UTF-8 already does), so that ``list``
  returns runs in the same order on every store (Python's string order).
* ``wp_records.cosigs`` holds the signatures after the first (a ``key.rotated`` record is
  signed by the old and the new key), as the msgspec JSON of a list of DSSE signatures;
  NULL for every ordinary record, so the common row stays as it was.
* ``wp_checkpoints`` keeps each signed checkpoint under its tree size (the primary key: a
  second checkpoint of the same size adds nothing), as the exact note text.
* On PostgreSQL, migration 0002 also installs a trigger that ``NOTIFY``s ``wp_due`` when a
  row gets a new deadline, so that workers in other processes re-arm at once (triggers are
  not part of this metadata; ``create_all`` does not make it - use the migrations).
* ``wp_records.position`` is the store-wide global position, dense from 1 and assigned in
  commit order (see ``stores.sql`` for how).  On SQLite it is the rowid (``INTEGER PRIMARY
  KEY``), which needs no separate index.
* The columns of ``wp_runs`` next to ``state`` are derived from the state at every commit
  and exist only to be indexed; ``state`` is the truth.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

VERSION_TABLE = "wp_alembic_version"
"""Alembic's version table for wakepoint's migrations (not ``alembic_version``)."""

REVISIONS: tuple[str, ...] = ("0001", "0002")
"""The migrations' revisions, oldest first; the last is the head this code needs.  Kept here
so that opening a store does not load Alembic; a test checks it against the migrations."""

SCHEMA_VERSION = 2
"""The store format in ``wp_meta.schema_version`` (1 from the first migration, 2 from 0002)."""

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}

METADATA = MetaData(naming_convention=NAMING)

# Code-point order on PostgreSQL whatever the database's default collation.
Ident = String(255).with_variant(String(255, collation="C"), "postgresql")
Name = String(200).with_variant(String(200, collation="C"), "postgresql")
Key = String(1000).with_variant(String(1000, collation="C"), "postgresql")
# SQLite makes only ``INTEGER PRIMARY KEY`` an alias of the rowid.
Position = BigInteger().with_variant(Integer(), "sqlite")

WP_META = Table(
    "wp_meta",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("log_id", String(64), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("last_position", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="one_row"),
    comment="One row: the ledger's log_id, the store format, the last global position.",
)

WP_RUNS = Table(
    "wp_runs",
    METADATA,
    Column("run_id", Ident, primary_key=True),
    Column("state", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),
    Column("workflow", Name, nullable=False),
    Column("logic_id", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("wait_kind", String(16)),
    Column("wait_key", Key),
    Column("due", BigInteger, comment="wait deadline, microseconds since the epoch (UTC)"),
    Column("parent", Ident),
    Column("lease_owner", String(255)),
    Column("lease_expires", BigInteger),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    comment="One row per run: the msgspec JSON of its RunState and indexed copies of it.",
)

# The queries each index serves (see ``stores.sql``):
Index(
    "ix_wp_runs_waiting_key",  # find_waiting(key)
    WP_RUNS.c.wait_key,
    sqlite_where=text("status = 'waiting'"),
    postgresql_where=text("status = 'waiting'"),
)
# Partial: most runs have no deadline and no parent, and then cost these indexes nothing.
# ``due <= ?`` implies ``due IS NOT NULL`` for both planners.
Index(  # list(due_before=...), claim of overdue waits
    "ix_wp_runs_due", WP_RUNS.c.due,
    sqlite_where=text("due IS NOT NULL"), postgresql_where=text("due IS NOT NULL"),
)
Index(  # list(status=..., workflow=..., limit=...) in (created_at, run_id) order; claim
    "ix_wp_runs_status_workflow",
    WP_RUNS.c.status, WP_RUNS.c.workflow, WP_RUNS.c.created_at, WP_RUNS.c.run_id,
)
Index(  # list(status=..., limit=...) and list(limit=...) in (created_at, run_id) order
    "ix_wp_runs_status_created", WP_RUNS.c.status, WP_RUNS.c.created_at, WP_RUNS.c.run_id,
)
Index("ix_wp_runs_created", WP_RUNS.c.created_at, WP_RUNS.c.run_id)
Index(  # list(parent=...): the children of a run
    "ix_wp_runs_parent", WP_RUNS.c.parent,
    sqlite_where=text("parent IS NOT NULL"), postgresql_where=text("parent IS NOT NULL"),
)

WP_RECORDS = Table(
    "wp_records",
    METADATA,
    Column("position", Position, primary_key=True, autoincrement=False),
    Column("run_id", Ident, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("key_id", String(128), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("sig", LargeBinary, nullable=False),
    Column("record_hash", String(64), nullable=False),
    Column("cosigs", LargeBinary,
           comment="further DSSE signatures (JSON list of {keyid, sig}); NULL: none"),
    UniqueConstraint("run_id", "seq"),  # one chain per run; also the ledger(run_id) index
    comment="Signed ledger records in global commit order; body is the exact signed bytes.",
)

WP_CHECKPOINTS = Table(
    "wp_checkpoints",
    METADATA,
    Column("size", BigInteger, primary_key=True, autoincrement=False,
           comment="tree size: the checkpoint covers the records at positions 1..size"),
    Column("checkpoint", Text, nullable=False, comment="the C2SP signed checkpoint note"),
    Column("created_at", BigInteger, nullable=False),
    comment="Signed checkpoints of the global record order, one per tree size.",
)

NOTIFY_CHANNEL = "wp_due"
"""PostgreSQL ``NOTIFY`` channel on which a commit that sets a wait deadline announces it
(payload: the deadline in microseconds since the epoch); created by migration 0002."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def to_us(when: datetime) -> int:
    """Microseconds since the Unix epoch; a naive ``datetime`` is taken as UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // _US


def from_us(us: int) -> datetime:
    """The UTC ``datetime`` of ``to_us``'s value."""
    return _EPOCH + timedelta(microseconds=us)
