"""Co-signatures on records, stored checkpoints, and (PostgreSQL) a NOTIFY on new deadlines.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

* ``wp_records.cosigs``: nullable bytes, the msgspec JSON list of the DSSE signatures after
  the first (``key.rotated`` records carry two); existing rows need no value.
* ``wp_checkpoints``: one signed checkpoint note per tree size.
* PostgreSQL only: ``wp_notify_due()`` and its triggers on ``wp_runs``: a row inserted with a
  deadline still ahead, or updated to a different one still ahead, sends ``NOTIFY wp_due,
  '<microseconds>'``.  The
  notification is delivered when (and only if) the transaction commits, so a worker that
  LISTENs never wakes for a timer that was rolled back.  A server-side trigger costs the
  committing client no round trip, and every writer (store, CLI, a hand-made UPDATE) gets it.
* ``wp_meta.schema_version`` becomes 2.

Written out in full (not imported from ``stores.sql_schema``), like 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = """
CREATE OR REPLACE FUNCTION wp_notify_due() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('wp_due', NEW.due::text);
    RETURN NULL;
END
$$
"""
# Only deadlines still ahead (by the server's clock) are announced: a deadline already past
# when it is committed is one its committer resolves in the same drive (``wait_until`` of a
# past time resumes at once), and announcing it would wake every worker for nothing - and
# NOTIFY serializes the commits that send one.  (Should an application host's clock lag the
# database's, such a timer is found by the workers' poll instead.)
_AHEAD = "NEW.due > (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
# Two triggers because an INSERT has no OLD row to compare with.
_TRIGGERS = (
    "CREATE TRIGGER wp_runs_due_insert AFTER INSERT ON wp_runs FOR EACH ROW "
    f"WHEN (NEW.due IS NOT NULL AND {_AHEAD}) EXECUTE FUNCTION wp_notify_due()",
    "CREATE TRIGGER wp_runs_due_update AFTER UPDATE OF due ON wp_runs FOR EACH ROW "
    f"WHEN (NEW.due IS NOT NULL AND NEW.due IS DISTINCT FROM OLD.due AND {_AHEAD}) "
    "EXECUTE FUNCTION wp_notify_due()",
)


def upgrade() -> None:
    """Add ``cosigs``, create ``wp_checkpoints``, install the NOTIFY trigger (PostgreSQL)."""
    with op.batch_alter_table("wp_records") as batch:
        batch.add_column(sa.Column(
            "cosigs", sa.LargeBinary(), nullable=True,
            comment="further DSSE signatures (JSON list of {keyid, sig}); NULL: none"))
    op.create_table(
        "wp_checkpoints",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False,
                  comment="tree size: the checkpoint covers the records at positions 1..size"),
        sa.Column("checkpoint", sa.Text(), nullable=False,
                  comment="the C2SP signed checkpoint note"),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("size", name=op.f("pk_wp_checkpoints")),
        comment="Signed checkpoints of the global record order, one per tree size.",
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_FUNCTION)
        for trigger in _TRIGGERS:
            op.execute(trigger)
    op.execute(sa.text("UPDATE wp_meta SET schema_version = 2 WHERE id = 1"))


def downgrade() -> None:
    """Back to 0001 (stored checkpoints and co-signatures are dropped)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS wp_runs_due_update ON wp_runs")
        op.execute("DROP TRIGGER IF EXISTS wp_runs_due_insert ON wp_runs")
        op.execute("DROP FUNCTION IF EXISTS wp_notify_due()")
    op.drop_table("wp_checkpoints")
    with op.batch_alter_table("wp_records") as batch:
        batch.drop_column("cosigs")
    op.execute(sa.text("UPDATE wp_meta SET schema_version = 1 WHERE id = 1"))
