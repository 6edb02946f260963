"""The SQL store's first schema: wp_meta, wp_runs, wp_records and their indexes.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written out in full rather than imported from ``stores.sql_schema``: a migration describes
the schema of its own revision forever, whatever the metadata becomes later.  The row of
``wp_meta`` (with the ledger's ``log_id``) is created here, once, under the migration lock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ident(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def upgrade() -> None:
    """Create the tables and indexes, and the one row of ``wp_meta``."""
    meta = op.create_table(
        "wp_meta",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("log_id", sa.String(64), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("last_position", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_wp_meta_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_wp_meta")),
        comment="One row: the ledger's log_id, the store format, the last global position.",
    )
    op.create_table(
        "wp_runs",
        sa.Column("run_id", _ident(255), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("workflow", _ident(200), nullable=False),
        sa.Column("logic_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("wait_kind", sa.String(16), nullable=True),
        sa.Column("wait_key", _ident(1000), nullable=True),
        sa.Column("due", sa.BigInteger(), nullable=True,
                  comment="wait deadline, microseconds since the epoch (UTC)"),
        sa.Column("parent", _ident(255), nullable=True),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_wp_runs")),
        comment="One row per run: the msgspec JSON of its RunState and indexed copies of it.",
    )
    op.create_index("ix_wp_runs_waiting_key", "wp_runs", ["wait_key"],
                    sqlite_where=sa.text("status = 'waiting'"),
                    postgresql_where=sa.text("status = 'waiting'"))
    op.create_index("ix_wp_runs_due", "wp_runs", ["due"],
                    sqlite_where=sa.text("due IS NOT NULL"),
                    postgresql_where=sa.text("due IS NOT NULL"))
    op.create_index("ix_wp_runs_status_workflow", "wp_runs",
                    ["status", "workflow", "created_at", "run_id"])
    op.create_index("ix_wp_runs_status_created", "wp_runs", ["status", "created_at", "run_id"])
    op.create_index("ix_wp_runs_created", "wp_runs", ["created_at", "run_id"])
    op.create_index("ix_wp_runs_parent", "wp_runs", ["parent"],
                    sqlite_where=sa.text("parent IS NOT NULL"),
                    postgresql_where=sa.text("parent IS NOT NULL"))
    op.create_table(
        "wp_records",
        sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=False, nullable=False),
        sa.Column("run_id", _ident(255), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("sig", sa.LargeBinary(), nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_wp_records")),
        sa.UniqueConstraint("run_id", "seq", name=op.f("uq_wp_records_run_id_seq")),
        comment="Signed ledger records in global commit order; body is the exact signed bytes.",
    )
    op.bulk_insert(meta, [{
        "id": 1,
        "log_id": uuid.uuid4().hex,
        "schema_version": 1,
        "last_position": 0,
        "created_at": time.time_ns() // 1000,
    }])


def downgrade() -> None:
    """Drop everything the upgrade created (the ledger with it)."""
    op.drop_table("wp_records")
    op.drop_table("wp_runs")  # its indexes go with it
    op.drop_table("wp_meta")
