"""What the SQL store does for speed on SQLite, and that it costs no correctness.

* ``load`` serves states this store just committed or read, but only while SQLite's
  ``data_version`` proves nobody else wrote: a commit by another connection (another store
  object, as another process would have; another thread of this one) is seen at once.
* The WAL stays bounded under a steady stream of commits (the checkpointer switches to a
  RESTART checkpoint when PASSIVE ones cannot catch up).
* Records are inserted without ``RETURNING`` (nobody reads it; it cost a third per insert).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from wakepoint.kernel import transitions
from wakepoint.kernel.errors import ConflictError
from wakepoint.stores import sql_engine
from wakepoint.stores.conformance import COUNTER, WORKFLOWS, Harness
from wakepoint.stores.sql import SqlStore


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database at head."""
    url = f"sqlite:///{tmp_path / 'wp.db'}"
    SqlStore(url, upgrade=True).close()
    return url


def test_load_sees_another_connections_commit_at_once(sqlite_url: str) -> None:
    """A store that committed (and so cached) a run's state returns the newer state once a
    second store object on the same file - another connection - has committed on top."""
    a, b = SqlStore(sqlite_url), SqlStore(sqlite_url)
    try:
        ha = Harness(a)
        first = ha.start(COUNTER, "r", 3)
        assert a.load("r") == first  # cached from the commit
        hb = Harness(b, now=ha.now)
        hb.runs["r"] = ha.runs["r"]
        second = hb.tick("r")
        assert second.seq == first.seq + 1
        assert a.load("r") == second
        # and back: a commits on top of b's state, b sees it
        third = ha.tick("r")
        assert b.load("r") == third
    finally:
        a.close()
        b.close()


def test_load_sees_another_threads_commit(sqlite_url: str) -> None:
    """Threads of one store have connections of their own; a commit by one thread is seen
    by another thread's next load even though that thread cached the older state."""
    store = SqlStore(sqlite_url)
    try:
        h = Harness(store)
        first = h.start(COUNTER, "r", 3)
        assert store.load("r") == first
        out: list[object] = []
        worker = threading.Thread(target=lambda: out.append(h.tick("r")))
        worker.start()
        worker.join()
        assert store.load("r") == out[0] != first
    finally:
        store.close()


def test_conflict_after_a_stale_cache_is_still_refused(sqlite_url: str) -> None:
    """The cache never lets a stale writer through: the seq check in the database decides."""
    a, b = SqlStore(sqlite_url), SqlStore(sqlite_url)
    try:
        ha = Harness(a)
        state = ha.start(COUNTER, "r", 3)
        hb = Harness(b, now=ha.now)
        hb.runs["r"] = ha.runs["r"]
        hb.tick("r")
        new, records = ha.sign(state, transitions.tick(WORKFLOWS[state.workflow], state, ha.now))
        with pytest.raises(ConflictError):
            a.commit("r", state.seq, new, records)
        assert a.load("r") == b.load("r") != state
    finally:
        a.close()
        b.close()


def test_wal_stays_bounded_under_steady_commits(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a low restart threshold, a stream of commits that never pauses still has its
    WAL restarted from the top: the file stops growing (PASSIVE alone would let it grow
    with every commit)."""
    monkeypatch.setattr(sql_engine, "WAL_RESTART_FRAMES", 64)
    monkeypatch.setattr(sql_engine, "CHECKPOINT_SECONDS", 0.02)
    monkeypatch.setattr(sql_engine, "CHECKPOINT_COMMITS", 20)
    store = SqlStore(sqlite_url)
    wal = Path(sqlite_url.removeprefix("sqlite:///") + "-wal")
    try:
        h = Harness(store)
        for n in range(4000):
            h.start(COUNTER, f"r{n}", 1)
        # A create writes 5-6 frames of 4 KiB: a WAL never restarted would hold 4,000 of
        # them, over 80 MB (measured with PASSIVE checkpoints only: it grows by every commit).
        # How often the checkpoint thread gets to restart depends on the CPU it gets: 4-20 MB
        # on a quiet machine, 42.7 MB once in CI with the suite's other tests on both cores.
        assert wal.stat().st_size < 64_000_000
    finally:
        store.close()


def test_record_insert_has_no_returning(sqlite_url: str) -> None:
    """The record insert is plain (SQLAlchemy would add ``RETURNING position``)."""
    store = SqlStore(sqlite_url)
    try:
        assert "RETURNING" not in store._sql.append.upper()
    finally:
        store.close()
