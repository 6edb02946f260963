"""Migration 0002's features on SQLite and a real PostgreSQL: co-signed records and signed
checkpoints of the global record order (``renew`` is in the conformance suite:
``stores.conformance.check_renew``, run by ``tests/test_sql_store.py``).

* A ``key.rotated`` record (signed by the old and the new key) is stored with both
  signatures and read back equal; the chain verifies across the rotation; ordinary records
  keep ``cosigs`` NULL.
* ``checkpoint(signer)`` signs the C2SP note of every record so far: it opens with the
  signer's key, names the store's log, and its size and root are those of all record hashes
  in global position order; the next checkpoint covers the records since (incrementally, and
  equal to a fresh store's from scratch); no new records, no new checkpoint;
  ``checkpoints()`` lists them by size; the ledger verifier accepts the store with them.
* ``next_deadline(after)``: the earliest deadline of a waiting run later than ``after``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool
from wakepoint.ledger import merkle
from wakepoint.ledger.checkpoint import open_checkpoint, origin_of
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.rotation import rotation_record
from wakepoint.ledger.trust import TrustRoot
from wakepoint.ledger.verify import verify
from wakepoint.stores.conformance import COUNTER, EVENT, TIMER, Harness
from wakepoint.stores.sql import SqlStore

_databases = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database at head, of each dialect."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'wp.db'}"
        SqlStore(url, upgrade=True).close()
        yield url
        return
    server: Any = request.getfixturevalue("pg_server")
    name = f"c{os.getpid()}_{next(_databases)}"
    url = str(server.create_database(name))
    SqlStore(url, upgrade=True).close()
    yield url
    server.drop_database(name)


def _hashes_in_order(url: str) -> list[bytes]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT position, record_hash, cosigs FROM wp_records ORDER BY position").all()
    finally:
        engine.dispose()
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    return [bytes.fromhex(r[1]) for r in rows]


def test_rotation_record_keeps_both_signatures(url: str) -> None:
    """A record signed by two keys reads back with its second signature; the chain
    verifies across the hand-over; ordinary records store no co-signature."""
    store = SqlStore(url)
    try:
        h = Harness(store)
        h.start(COUNTER, "r", 1)
        old, new = h.signer, Signer.generate()
        state, rotated = rotation_record(old, new, store.log_id, h.runs["r"].state, h.now)
        assert len(rotated.cosigs) == 1
        store.commit("r", h.runs["r"].state.seq, state, [rotated])
        ledger = store.ledger("r")
        assert ledger[-1] == rotated
        assert ledger[-1].cosigs == rotated.cosigs
        assert all(rec.cosigs == () for rec in ledger[:-1])
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                nulls = conn.exec_driver_sql(
                    "SELECT count(*) FROM wp_records WHERE cosigs IS NULL").scalar()
        finally:
            engine.dispose()
        assert nulls == len(ledger) - 1
    finally:
        store.close()
    report = verify(url, TrustRoot.from_signers([old, new]), require_seals=False)
    assert report.ok, report


def test_checkpoints_cover_the_global_order(url: str) -> None:
    """Each checkpoint is a signed note over every record so far, in position order; the
    frontier makes the second one incremental and it equals a fresh store's; no new
    records, no new note."""
    store = SqlStore(url)
    signer = Signer.generate()
    try:
        assert store.checkpoints() == []
        h = Harness(store)
        for n in range(3):
            h.start(COUNTER, f"r{n}", 2)
            h.drive(f"r{n}", 2)
        first = store.checkpoint(signer)
        checkpoint, names = open_checkpoint(first, {signer.key_id: signer.public})
        leaves = _hashes_in_order(url)
        assert names == [signer.key_id]
        assert checkpoint.origin == origin_of(store.log_id)
        assert checkpoint.size == len(leaves) > 0
        assert checkpoint.root == merkle.root(leaves)
        assert store.checkpoint(signer) == first  # nothing new: the stored note

        h.start(EVENT, "e", None)
        h.tick("r0")
        second = store.checkpoint(signer)
        checkpoint2, _ = open_checkpoint(second, {signer.key_id: signer.public})
        leaves = _hashes_in_order(url)
        assert checkpoint2.size == len(leaves) > checkpoint.size
        assert checkpoint2.root == merkle.root(leaves)
        assert store.checkpoints() == [first, second]
        fresh = SqlStore(url)
        try:
            assert fresh.checkpoint(signer) == second
        finally:
            fresh.close()
    finally:
        store.close()


def test_verifier_accepts_a_store_with_checkpoints(url: str) -> None:
    """The ledger verifier reads the stored checkpoints and finds the store valid."""
    store = SqlStore(url)
    try:
        h = Harness(store)
        h.start(COUNTER, "r", 1)
        h.drive("r", 2)
        store.checkpoint(h.signer)
    finally:
        store.close()
    report = verify(url, TrustRoot.from_signers([h.signer]), require_seals=False)
    assert report.ok, report
    assert report.checkpoint is not None
    assert report.uncovered == 0  # the checkpoint covers every record


def test_checkpoint_refuses_a_hole_in_the_global_order(url: str) -> None:
    """A record deleted behind the store's back leaves a hole in the positions: the next
    checkpoint names it (``CorruptStore``) instead of signing a tree over a damaged ledger."""
    from wakepoint.kernel.errors import CorruptStore

    store = SqlStore(url)
    try:
        h = Harness(store)
        h.start(COUNTER, "r", 1)
        h.drive("r", 3)
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql("DELETE FROM wp_records WHERE position = 2")
        finally:
            engine.dispose()
        with pytest.raises(CorruptStore, match="positions jump from 1 to 3"):
            store.checkpoint(h.signer)
        assert store.checkpoints() == []
    finally:
        store.close()


def test_next_deadline_is_the_earliest_future_deadline(url: str) -> None:
    """``next_deadline(after)`` is the earliest deadline of a WAITING run strictly later than
    ``after``; overdue deadlines and runs no longer waiting do not count; None when none."""
    store = SqlStore(url)
    try:
        h = Harness(store)
        assert store.next_deadline(h.now) is None
        base, deadlines = h.now, []
        for n, offset in enumerate((20, 0, 40)):  # the timer waits 3 s from its start
            h.now = base + timedelta(seconds=offset)
            h.start(TIMER, f"t{n}", None)
            h.drive(f"t{n}")
            wait = h.runs[f"t{n}"].state.wait
            assert wait is not None and wait.deadline is not None
            deadlines.append(wait.deadline)
        assert store.next_deadline(base) == min(deadlines) == deadlines[1]
        assert store.next_deadline(min(deadlines)) == deadlines[0]  # strictly later
        assert store.next_deadline(max(deadlines)) is None
        h.now = base
        h.resume("t1", None)  # the earliest is no longer waiting
        assert store.next_deadline(base) == deadlines[0]
    finally:
        store.close()
