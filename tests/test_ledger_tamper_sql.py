"""The tamper suite on the SQL store, SQLite and PostgreSQL (a real server, ``pg_server``):
every class of damage the ``wp_records`` layout can express gets the exact error code at the
exact first bad row.

The ledger is written by the real ``Runtime`` on a real ``SqlStore`` (three runs, interleaved,
finished in reverse order and sealed); the damage is done with plain SQL, as someone with
write access to the database would.  Rows are named ``row <position>``.  Positions are dense
from 1, so a deleted row leaves a hole: the per-run checks name a deletion inside a run more
precisely (``seq_gap`` at the run's next row); the hole itself (``index_mismatch``) decides
only when nothing else shows it.  What ``wp_records`` cannot express is covered on JSONL
(``test_ledger_tamper.py``): lines and their states, the index file.  Checkpoint forgery and
split views use ``wp_checkpoints`` (migration 0002) and the auditor's anchor.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on it
from ledger_fixtures import T0, sealed, workflow
from wakepoint import Runtime
from wakepoint.kernel import transitions as kernel
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.logindex import make_checkpoint
from wakepoint.ledger.records import pae, record_hash, sign_entries
from wakepoint.ledger.rotation import rotation_record, seal_record
from wakepoint.ledger.trust import TrustedKey, TrustRoot
from wakepoint.ledger.verify import ExportError, Report, export, verify
from wakepoint.stores import open_store

KEY = Signer.from_seed(b"\x01" * 32)
MALLORY = Signer.from_seed(b"\x66" * 32)


class SqlLedger:
    """A SQL ledger written by the runtime, and SQL surgery on its rows."""

    def __init__(self, url: str) -> None:
        self.url = url
        store = open_store(url, durability="none", upgrade=True)
        self.log_id: str = store.log_id  # type: ignore[attr-defined]
        ticks = iter(range(1, 1000))
        rt = Runtime(store, workflows=[workflow()], signer=KEY,
                     clock=lambda: T0 + timedelta(seconds=next(ticks)))
        names = ["run-0", "run-1", "run-2"]
        for name in names:
            rt.start("audit", 1, run_id=name)
        for name in reversed(names):
            rt.send_event(f"go:{name}")
            if not sealed(store, name):  # a runtime that seals by itself has done so
                old = store.load(name)
                state, rec = seal_record(KEY, self.log_id, old,
                                         T0 + timedelta(seconds=next(ticks)))
                store.commit(name, old.seq, state, [rec])
        rt.close()
        self.engine = sqlalchemy.create_engine(url)
        # Exactly one stored checkpoint, of the whole ledger (the runtime writes its own on
        # timers, which would make the positions below vary).
        self.sql("DELETE FROM wp_checkpoints")
        store = open_store(url, durability="none")
        self.stored = store.checkpoint(KEY)  # type: ignore[attr-defined]
        store.close()
        self.trust = TrustRoot.from_signers([KEY], log_id=self.log_id)
        self.leaves = [bytes.fromhex(r.record_hash) for r in self.rows()]
        self.anchor = make_checkpoint(self.log_id, self.leaves, KEY)

    def rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT position, run_id, seq, key_id, body, sig, record_hash FROM wp_records "
                "ORDER BY position")).all())

    def position(self, run_id: str, seq: int) -> int:
        return next(r.position for r in self.rows() if (r.run_id, r.seq) == (run_id, seq))

    def row(self, run_id: str, seq: int) -> Any:
        return next(r for r in self.rows() if (r.run_id, r.seq) == (run_id, seq))

    def sql(self, statement: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(statement), params)

    def replace(self, run_id: str, seq: int, body: bytes, signer: Signer | None = None,
                *, sig: bytes | None = None) -> None:
        """Store ``body`` in place of the record (re-signed by ``signer``, else the given or
        the old signature), with key_id and record_hash updated to match, as a careful
        attacker would."""
        signer_id = signer.key_id if signer is not None else self.row(run_id, seq).key_id
        if signer is not None:
            sig = signer.sign(pae(body))
        self.sql("UPDATE wp_records SET body = :b, sig = :s, key_id = :k, record_hash = :h "
                 "WHERE run_id = :r AND seq = :q", b=body,
                 s=sig if sig is not None else self.row(run_id, seq).sig, k=signer_id,
                 h=record_hash(body), r=run_id, q=seq)

    def verify(self, **options: Any) -> Report:
        return verify(self.url, options.pop("trust", self.trust), **options)


@pytest.fixture(params=["sqlite", "postgresql"])
def led(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlLedger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        server = request.getfixturevalue("pg_server")
        name = f"tamper_{request.node.name.translate(str.maketrans('[]-', '___'))}".lower()
        url = server.create_database(name)
    ledger = SqlLedger(url)
    report = ledger.verify(anchor=ledger.anchor)
    assert report.ok, report.error
    assert (report.records, report.runs, report.uncovered) == (18, 3, 0)
    assert ledger.stored == ledger.anchor  # the store's checkpoint is the auditor's anchor
    stored = ledger.verify().checkpoint
    assert stored is not None and stored.where == "wp_checkpoints size=18"
    yield ledger
    ledger.engine.dispose()
    if request.param == "postgresql":
        request.getfixturevalue("pg_server").drop_database(name)


def check(report: Report, code: str, row: int | str) -> None:
    assert report.error is not None, f"expected {code}"
    where = row if isinstance(row, str) else f"row {row}"
    assert (report.error.code, report.error.where) == (code, where), report.error


def test_body_byte_edit_is_bad_signature(led: SqlLedger) -> None:
    """One changed byte in a signed body, the stored signature kept."""
    body = led.row("run-1", 2).body.replace(b'"seq":2', b'"seq":7')
    led.replace("run-1", 2, body)
    check(led.verify(), "bad_signature", led.position("run-1", 2))


def test_signature_damage_is_bad_signature(led: SqlLedger) -> None:
    """A flipped bit in a signature."""
    r = led.row("run-2", 3)
    sig = bytearray(r.sig)
    sig[10] ^= 1
    led.sql("UPDATE wp_records SET sig = :s WHERE position = :p", s=bytes(sig), p=r.position)
    check(led.verify(), "bad_signature", r.position)


def test_resigned_with_untrusted_key_is_unknown_key(led: SqlLedger) -> None:
    """A record rewritten and validly signed by a key the trust root does not hold."""
    body = led.row("run-0", 2).body.replace(KEY.key_id.encode(), MALLORY.key_id.encode())
    led.replace("run-0", 2, body, MALLORY)
    check(led.verify(), "unknown_key", led.position("run-0", 2))


def test_resigned_with_revoked_key_is_key_not_valid(led: SqlLedger) -> None:
    """The last record of a run rewritten by a trusted key revoked before its position."""
    r = led.row("run-0", 5)
    led.replace("run-0", 5, r.body.replace(KEY.key_id.encode(), MALLORY.key_id.encode()),
                MALLORY)
    trust = TrustRoot([*led.trust.keys.values(),
                       TrustedKey(key_id=MALLORY.key_id, public=MALLORY.public,
                                  revoked_at=r.position - 2)], log_id=led.log_id)
    report = led.verify(trust=trust)
    check(report, "key_not_valid", r.position)
    assert report.error is not None and report.error.position == r.position - 1


def test_deleted_row_is_seq_gap(led: SqlLedger) -> None:
    """A row deleted from the middle of a run: caught at the run's next row."""
    led.sql("DELETE FROM wp_records WHERE run_id = 'run-1' AND seq = 2")
    check(led.verify(), "seq_gap", led.position("run-1", 3))


def test_deleted_tail_of_a_waiting_run_is_the_hole(led: SqlLedger) -> None:
    """The last row of a run that still looks unfinished (its finish and seal gone): no run
    check sees it, the hole in the positions does."""
    seal = led.position("run-2", 5)
    led.sql("DELETE FROM wp_records WHERE run_id = 'run-2' AND seq >= 4")
    check(led.verify(), "index_mismatch", seal + 1)


def test_reordered_rows_are_seq_gap(led: SqlLedger) -> None:
    """Two records of one run swapping positions."""
    a, b = led.position("run-0", 3), led.position("run-0", 4)
    led.sql("UPDATE wp_records SET position = -1 WHERE position = :a", a=a)
    led.sql("UPDATE wp_records SET position = :a WHERE position = :b", a=a, b=b)
    led.sql("UPDATE wp_records SET position = :b WHERE position = -1", b=b)
    check(led.verify(), "seq_gap", a)


def test_reordered_runs_break_the_anchor(led: SqlLedger) -> None:
    """Records of two runs swapping global positions: each run's chain is intact, the
    global order (and so the Merkle root the auditor holds) is not."""
    rows = led.rows()
    a, b = next((x, y) for x, y in itertools.pairwise(rows) if x.run_id != y.run_id)
    led.sql("UPDATE wp_records SET position = -1 WHERE position = :a", a=a.position)
    led.sql("UPDATE wp_records SET position = :a WHERE position = :b", a=a.position,
            b=b.position)
    led.sql("UPDATE wp_records SET position = :b WHERE position = -1", b=b.position)
    check(led.verify(), "root_mismatch", "wp_checkpoints size=18")
    led.sql("DELETE FROM wp_checkpoints")
    assert led.verify().ok
    check(led.verify(anchor=led.anchor), "root_mismatch", "anchor")


def test_duplicated_row_is_duplicate_seq(led: SqlLedger) -> None:
    """A record copied to a new row (its seq column changed to pass the unique index)."""
    r = led.row("run-1", 1)
    end = len(led.rows()) + 1
    led.sql("INSERT INTO wp_records (position, run_id, seq, key_id, body, sig, record_hash) "
            "VALUES (:p, :r, 99, :k, :b, :s, :h)", p=end, r=r.run_id, k=r.key_id, b=r.body,
            s=r.sig, h=r.record_hash)
    check(led.verify(), "duplicate_seq", end)


def test_record_from_another_run_is_run_mismatch(led: SqlLedger) -> None:
    """run-0's validly signed seq 1 stored in place of run-1's."""
    donor = led.row("run-0", 1)
    led.replace("run-1", 1, donor.body, sig=donor.sig)
    check(led.verify(), "run_mismatch", led.position("run-1", 1))


def test_record_from_another_ledger_is_run_mismatch(led: SqlLedger) -> None:
    """Same key, same run id and seq, another ledger's log id: validly signed, not ours."""
    tr = kernel.start(workflow(), "run-1", 1, T0)
    _, records = sign_entries(KEY, "another-log", tr.state, tr.entries, T0, prev_seq=-1,
                              prev_head="")
    led.replace("run-1", 0, records[0].body, sig=records[0].sig)
    check(led.verify(), "run_mismatch", led.position("run-1", 0))


def test_row_columns_must_match_the_body(led: SqlLedger) -> None:
    """The unsigned columns: a row moved to another run id, or its seq column changed."""
    p = led.position("run-2", 2)
    led.sql("UPDATE wp_records SET seq = 42 WHERE position = :p", p=p)
    check(led.verify(), "malformed", p)
    led.sql("UPDATE wp_records SET seq = 2, run_id = 'run-9' WHERE position = :p", p=p)
    check(led.verify(), "run_mismatch", p)


def test_truncated_head_is_seq_gap(led: SqlLedger) -> None:
    """The first two rows gone: the run that lost them fails at its first remaining row."""
    first = led.rows()[0].run_id
    led.sql("DELETE FROM wp_records WHERE position <= 2")
    check(led.verify(), "seq_gap", led.position(first, 2))


def test_truncated_tail(led: SqlLedger) -> None:
    """The last row (a seal) gone: ``missing_seal`` at the finished run's last row; without
    seals required, the stored checkpoint is ``behind_checkpoint``; with that gone too, the
    anchor the auditor holds shows the rollback."""
    last = led.rows()[-1]
    led.sql("DELETE FROM wp_records WHERE position = :p", p=last.position)
    check(led.verify(), "missing_seal", last.position - 1)
    check(led.verify(require_seals=False), "behind_checkpoint", "wp_checkpoints size=18")
    led.sql("DELETE FROM wp_checkpoints")
    check(led.verify(require_seals=False, anchor=led.anchor), "rollback", "anchor")


def test_rewritten_suffix_by_key_holder_is_root_mismatch(led: SqlLedger) -> None:
    """An insider with the signing key rewrites the last record and re-signs it: the stored
    checkpoint shows it; deleted, the anchor (held outside the writer's reach) does; and a
    fresh checkpoint the insider signs over the rewritten history is a split view."""
    last = led.rows()[-1]
    led.replace(last.run_id, last.seq, last.body.replace(b"T00:00:", b"T09:00:"), KEY)
    check(led.verify(), "root_mismatch", "wp_checkpoints size=18")
    led.sql("DELETE FROM wp_checkpoints")
    assert led.verify().ok
    check(led.verify(anchor=led.anchor), "root_mismatch", "anchor")
    forged = make_checkpoint(led.log_id, [bytes.fromhex(r.record_hash) for r in led.rows()],
                             KEY)
    led.sql("INSERT INTO wp_checkpoints (size, checkpoint, created_at) VALUES (18, :c, 0)",
            c=forged)
    assert led.verify().ok
    check(led.verify(anchor=led.anchor), "equivocation", "anchor")


def test_checkpoint_forgery(led: SqlLedger) -> None:
    """A stored checkpoint whose size was edited (its signature breaks), or one signed by
    an untrusted key."""
    led.sql("UPDATE wp_checkpoints SET checkpoint = :c WHERE size = 18",
            c=led.stored.replace("\n18\n", "\n17\n"))
    check(led.verify(), "bad_signature", "wp_checkpoints size=18")
    led.sql("UPDATE wp_checkpoints SET checkpoint = :c WHERE size = 18",
            c=make_checkpoint(led.log_id, led.leaves, MALLORY))
    check(led.verify(), "unknown_key", "wp_checkpoints size=18")


def test_chain_mode_on_sql(led: SqlLedger) -> None:
    """Chain mode catches a broken link without checking signatures."""
    r = led.row("run-1", 3)
    body = msgspec.json.decode(r.body)
    body["prev"] = "0" * 64
    led.sql("UPDATE wp_records SET body = :b, record_hash = :h WHERE position = :p",
            b=msgspec.json.encode(body), h=record_hash(msgspec.json.encode(body)),
            p=r.position)
    report = led.verify(mode="chain")
    check(report, "prev_mismatch", r.position)
    assert report.unchecked == ["signatures", "key_validity", "checkpoints"]


def test_rotation_signed_by_one_key_is_unauthorized(led: SqlLedger) -> None:
    """A run handed over to a new key with a ``key.rotated`` record.  With the ``cosigs``
    column (migration 0002) the hand-over verifies, and clearing the new key's co-signature
    is ``rotation_unauthorized`` at that row; a schema without the column cannot hold the
    co-signature at all, so the same row is ``rotation_unauthorized`` already and the report
    says rotations were not checkable."""
    new = KEY.rotate()
    store = open_store(led.url, durability="none")
    rt = Runtime(store, workflows=[workflow()], signer=KEY, clock=lambda: T0)
    rt.start("audit", 1, run_id="run-3")
    old = store.load("run-3")
    state, rec = rotation_record(KEY, new, led.log_id, old, T0)
    store.commit("run-3", old.seq, state, [rec])
    rt.close()
    # The runtime above still held the old key when it checkpointed at close; the runtime of
    # a rotated key file would have signed with the new one.  Keep the fixture's checkpoint.
    led.sql("DELETE FROM wp_checkpoints WHERE size > 18")
    at = len(led.leaves) + 3  # run-3's three records, then the hand-over
    trust = led.trust.rotate(KEY.key_id, new, at)
    row = led.position("run-3", 3)
    with led.engine.connect() as conn:
        has_cosigs = "cosigs" in {c["name"] for c in
                                  sqlalchemy.inspect(conn).get_columns("wp_records")}
    if has_cosigs:
        assert led.verify(trust=trust).ok
        led.sql("UPDATE wp_records SET cosigs = NULL WHERE position = :p", p=row)
        check(led.verify(trust=trust), "rotation_unauthorized", row)
    else:
        report = led.verify(trust=trust)
        check(report, "rotation_unauthorized", row)
        assert "rotation" in report.unchecked


def test_export_of_the_sql_ledger(led: SqlLedger, tmp_path: Path) -> None:
    """The export of the database verifies to the database's own counts and checkpoint, and
    with the auditor's anchor; a database with a deleted row is refused (verify it directly:
    it names the row)."""
    out = tmp_path / "sql.export"
    assert export(led.url, out) == 18
    direct, exported = led.verify(), verify(out, led.trust, anchor=led.anchor)
    assert exported.ok, exported.error
    assert (exported.records, exported.runs, exported.keys) == (direct.records, direct.runs,
                                                                direct.keys)
    assert verify(out, led.trust).checkpoint is not None
    led.sql("DELETE FROM wp_records WHERE position = 4")
    with pytest.raises(ExportError, match="not dense"):
        export(led.url, tmp_path / "again.export")
