"""The SQL store on SQLite and on a real PostgreSQL server.

What this file pins, on both dialects (PostgreSQL is started from Debian's package by
``tests/pg.py``; with ``CI`` set a missing server is a failure, never a skip):

* the conformance suite of ``wakepoint.stores.conformance``: the state machine against the
  model (with restarts, crashes and a peer store on the same database), the query, claim and
  misuse checks, and processes racing to commit and to claim;
* what the SQL store adds: dense global positions in commit order, threads sharing a store,
  the SQLite pragmas of each durability mode;
* the migrations: a database built by the first revision and upgraded equals one built from
  the metadata; autogenerate finds no difference (``alembic check``); ``upgrade`` is
  idempotent and four processes upgrading one empty database at once all succeed;
* bad input - a missing driver, a database newer than the code, someone else's database, an
  empty one - is a ``StoreError`` that says what to do, and nothing is written;
* crashes: a process driving 20-node ``call`` workflows is killed with SIGKILL at random
  moments; ``recover()`` in a fresh process completes every run with one record per
  transition, and every chain verifies.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool
from wakepoint import Runtime, Workflow, done, wait_event
from wakepoint.kernel import transitions
from wakepoint.kernel.errors import ConflictError, RunExists
from wakepoint.kernel.types import Status
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.records import parse_body, verify_chain
from wakepoint.migrations import HEAD, revisions, upgrade
from wakepoint.stores import Store, StoreError, open_store
from wakepoint.stores.conformance import (
    COUNTER,
    LINEAR,
    QUERY_CHECKS,
    TIMER,
    Harness,
    StoreMachine,
    race_claims,
    race_commits,
)
from wakepoint.stores.sql import SqlStore
from wakepoint.stores.sql_schema import METADATA, REVISIONS, VERSION_TABLE

HERE = Path(__file__).resolve().parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"wakepoint_tests_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


crash_worker = _load("crash_worker")  # the JSONL crash test's workflow, reused as it is

# --- fixtures ---------------------------------------------------------------------------------



_databases = iter(range(1_000_000))


@pytest.fixture
def pg_url(pg_server: Any) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server."""
    name = f"t{os.getpid()}_{next(_databases)}"
    url: str = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of a SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'wp.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest) -> str:
    """An empty database of each dialect."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


def _engine(url: str) -> Engine:
    return create_engine(url, poolclass=NullPool)


def _reset(url: str) -> None:
    """Empty the store's tables (keeping ``wp_meta``'s log_id) for a fresh example."""
    store = SqlStore(url, durability="none")
    try:
        with store._transaction() as cursor:
            cursor.execute("DELETE FROM wp_records")
            cursor.execute("DELETE FROM wp_runs")
            cursor.execute("UPDATE wp_meta SET last_position = 0")
    finally:
        store.close()


# --- the conformance suite --------------------------------------------------------------------

MACHINE_SETTINGS = settings(
    max_examples=20,
    stateful_step_count=25,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


class SqliteMachine(StoreMachine):
    """A fresh SQLite file per example, created by the migrations on first open."""

    durability: ClassVar[str] = "batch"

    def make_store(self) -> Store:
        return SqlStore(f"sqlite:///{self.tmpdir / 'wp.db'}", durability=self.durability,
                        upgrade=True)  # type: ignore[arg-type]


class SqliteNoneMachine(SqliteMachine):
    durability = "none"


class PgMachine(StoreMachine):
    """One PostgreSQL database, emptied before each example."""

    url: ClassVar[str] = ""

    def __init__(self) -> None:
        _reset(self.url)
        super().__init__()

    def make_store(self) -> Store:
        return SqlStore(self.url)


TestSqliteMachine = SqliteMachine.TestCase
TestSqliteMachine.settings = MACHINE_SETTINGS
TestSqliteMachine.__doc__ = (
    "SQLite (batch) agrees with the model after every step, restart and crash, and with a "
    "second store object on the same file."
)

TestSqliteNoneMachine = SqliteNoneMachine.TestCase
TestSqliteNoneMachine.settings = settings(MACHINE_SETTINGS, max_examples=8)
TestSqliteNoneMachine.__doc__ = "SQLite with durability none keeps every commit a crash leaves."


def test_postgresql_machine(pg_url: str) -> None:
    """PostgreSQL agrees with the model after every step, restart and crash, and with a
    second store object (another connection) on the same database."""
    SqlStore(pg_url, upgrade=True).close()

    class Machine(PgMachine):
        url = pg_url

    run_state_machine_as_test(Machine, settings=settings(MACHINE_SETTINGS, max_examples=12))


@pytest.mark.parametrize("check", QUERY_CHECKS, ids=lambda c: c.__name__)
def test_query_checks(url: str, check: Callable[[Store], None]) -> None:
    """Each query, claim and misuse check of the conformance suite, on a fresh store."""
    store = SqlStore(url, upgrade=True)
    try:
        check(store)
    finally:
        store.close()


def test_processes_race_to_commit(url: str) -> None:
    """Four processes commit the same seq of one run, six rounds: exactly one wins each
    round, the others get ConflictError, and the ledger is contiguous and verifies."""
    SqlStore(url, upgrade=True).close()
    report = race_commits(functools.partial(SqlStore, url), processes=4, rounds=6)
    assert report.final_seq == 6


def test_processes_race_to_claim(url: str) -> None:
    """Four processes claim from 40 RUNNING runs at once: no run is leased twice, every run
    is leased (SKIP LOCKED on PostgreSQL, the write lock on SQLite)."""
    SqlStore(url, upgrade=True).close()
    claimed = race_claims(functools.partial(SqlStore, url), processes=4, runs=40)
    assert sum(len(ids) for ids in claimed.values()) == 40


def _rows(url: str, sql: str) -> list[Any]:
    """The rows of one query, on a connection of the test's own."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.exec_driver_sql(sql).all())
    finally:
        engine.dispose()


def _leases(url: str) -> dict[str, tuple[Any, Any]]:
    rows = _rows(url, "SELECT run_id, lease_owner, lease_expires FROM wp_runs")
    return {str(r): (owner, expires) for r, owner, expires in rows}


def test_the_commit_that_finishes_a_run_ends_its_lease(url: str) -> None:
    """``releases_finished``: the commit of a COMPLETED state clears the run's lease in the
    same statement (a worker skips ``release`` after such a drive); commits before it keep
    the lease, and a run that is not finished keeps its lease until released."""
    store = SqlStore(url, upgrade=True)
    try:
        assert store.releases_finished is True
        h = Harness(store)
        inp = {"key": "evt:k0", "data": None, "boom": False}
        h.start(LINEAR, "done", inp)
        h.start(LINEAR, "open", inp)
        lease = timedelta(minutes=5)
        assert sorted(s.run_id for s in store.claim(h.now, "w1", lease, 10)) == ["done", "open"]
        h.tick("done")  # one step: still RUNNING, still leased
        assert _leases(url)["done"][0] == "w1"
        assert h.drive("done").status is Status.COMPLETED
        leases = _leases(url)
        assert leases["done"] == (None, None)
        assert leases["open"][0] == "w1" and leases["open"][1] is not None
    finally:
        store.close()


def test_postgresql_claims_overdue_waits_first_then_the_oldest_running_runs(
    pg_url: str,
) -> None:
    """PostgreSQL's claim reads each kind of candidate in its index's order and stops at
    ``limit``: overdue waits by deadline first, then RUNNING runs no one holds, oldest first,
    and the claimer's own RUNNING runs last (a worker skips those it is driving, so they must
    not take the places of runs it could start); runs another worker holds, finished runs
    and waits not yet due are passed over."""
    store = SqlStore(pg_url, upgrade=True)
    try:
        h = Harness(store)
        inp = {"key": "evt:k0", "data": None, "boom": False}
        for rid in ("r1", "r2", "r3", "r4"):
            h.start(LINEAR, rid, inp)
            h.advance(1)
        h.start(LINEAR, "done", inp)
        h.drive("done")
        h.start(TIMER, "t1")
        h.drive("t1")  # waits 3 s
        h.advance(1)
        h.start(TIMER, "t2")
        h.drive("t2")  # due a second after t1
        lease = timedelta(minutes=5)

        def claim(worker: str, limit: int) -> list[str]:
            return sorted(s.run_id for s in store.claim(h.now, worker, lease, limit))

        assert claim("w0", 1) == ["r1"]
        assert claim("w0", 1) == ["r2"]  # not its own r1 again while r2 is free
        h.advance(5)  # both timers overdue
        assert claim("w1", 1) == ["t1"]
        assert claim("w2", 2) == ["r3", "t2"]
        assert claim("w3", 5) == ["r4"]
        assert claim("w0", 5) == ["r1", "r2"]  # the holder may claim its own runs again
    finally:
        store.close()


def test_pg_statement_runs_through_libpq_with_psycopg_errors(pg_url: str) -> None:
    """``PgStatement``: ``%(name)s`` parameters (a name used twice is one parameter) go as
    text (str, int) or binary (bytes-like, None); results come back binary; a failing
    statement raises psycopg's exception class for its SQLSTATE, and the statement stays
    usable, also after the connection's prepared statements were deallocated."""
    import psycopg
    from wakepoint.stores.sql_engine import PgStatement, int_value

    conn = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"),
                           autocommit=True)
    try:
        prepared: set[bytes] = set()
        echo = PgStatement("t_echo", "SELECT %(n)s::bigint + %(n)s::bigint, %(s)s::text, "
                                     "%(b)s::bytea, %(z)s::bytea IS NULL, 10 / %(d)s::int")
        assert echo.names == ("n", "s", "b", "z", "d")
        result = echo.run(conn, prepared, {"n": 21, "s": "h\u00e9", "b": b"\x00\xff",
                                           "z": None, "d": 5, "unused": 1})
        assert int_value(result.get_value(0, 0)) == 42
        assert result.get_value(0, 1).decode() == "h\u00e9"
        assert result.get_value(0, 2) == b"\x00\xff"
        assert result.get_value(0, 3) == b"\x01"  # binary true
        assert prepared == {b"t_echo"}
        with pytest.raises(psycopg.errors.DivisionByZero):
            echo.run(conn, prepared, {"n": 1, "s": "", "b": b"", "z": None, "d": 0})
        again = echo.run(conn, prepared, {"n": 1, "s": "", "b": b"", "z": None, "d": 1})
        assert int_value(again.get_value(0, 4)) == 10
        conn.execute("DEALLOCATE ALL")  # as a pooler's DISCARD ALL would: prepared again
        after = echo.run(conn, prepared, {"n": 2, "s": "", "b": bytearray(b"\x07"),
                                          "z": None, "d": 2})
        assert int_value(after.get_value(0, 0)) == 4
        assert after.get_value(0, 2) == b"\x07"
    finally:
        conn.close()


def test_a_terminated_connection_fails_one_call_then_the_store_reconnects(
    pg_url: str,
) -> None:
    """The hot path's libpq statements: when the server ends the store's connection, the
    next call raises psycopg's ``OperationalError`` and drops the connection; the call
    after it connects again, prepares its statements again, and works."""
    import psycopg

    store = SqlStore(pg_url, upgrade=True)
    try:
        h = Harness(store)
        h.start(LINEAR, "r1", {"key": "evt:k0", "data": None, "boom": False})
        assert store.load("r1").run_id == "r1"
        pid = store._conn().info.backend_pid
        with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"),
                             autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.1)
        with pytest.raises(psycopg.OperationalError):
            store.load("r1")
        assert store.load("r1").run_id == "r1"
        assert store._conn().info.backend_pid != pid
        h.tick("r1")  # a commit on the new connection
        assert store.load("r1").seq == h.runs["r1"].state.seq
    finally:
        store.close()


# --- what the SQL store adds ------------------------------------------------------------------


def _positions(url: str) -> list[tuple[int, str, int]]:
    rows = _rows(url, "SELECT position, run_id, seq FROM wp_records ORDER BY position")
    return [(int(p), str(r), int(s)) for p, r, s in rows]


def test_global_positions_are_dense_and_in_commit_order(url: str) -> None:
    """Every record gets the next global position at commit, from 1 with no gap, also after
    refused commits (conflict, taken id) and across store objects; ``last_position`` is the
    last one."""
    store = SqlStore(url, upgrade=True)
    other = SqlStore(url)
    try:
        h = Harness(store)
        h2 = Harness(other)
        order: list[tuple[str, int]] = []
        for n in range(3):
            h.start(COUNTER, f"a{n}")
            order.append((f"a{n}", 0))
            h2.start(COUNTER, f"b{n}")
            order.append((f"b{n}", 0))
        state = h.runs["a0"].state
        for _ in range(3):
            h.tick("a0")
            order.append(("a0", h.runs["a0"].state.seq))
        stale, records = h.sign(state, transitions.tick(COUNTER, state, h.now))
        with pytest.raises(ConflictError):
            store.commit("a0", state.seq, stale, records)
        with pytest.raises(RunExists):
            h.start(COUNTER, "b2")
        h2.tick("b1")
        order.append(("b1", 1))
        assert [(r, s) for _, r, s in _positions(url)] == order
        assert [p for p, _, _ in _positions(url)] == list(range(1, len(order) + 1))
        assert store.last_position() == other.last_position() == len(order)
    finally:
        store.close()
        other.close()


def test_threads_share_one_store(url: str) -> None:
    """Eight threads driving their own runs through one store object (one connection each)
    lose nothing: every chain is complete and verifies."""
    store = SqlStore(url, upgrade=True)
    h = Harness(store)
    errors: list[BaseException] = []

    def drive(n: int) -> None:
        try:
            local = Harness(store, signer=h.signer)
            local.start(COUNTER, f"t{n}")
            for _ in range(20):
                local.tick(f"t{n}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        for n in range(8):
            records = store.ledger(f"t{n}")
            assert verify_chain(records, h.signer, log_id=store.log_id) == 21
            assert store.load(f"t{n}").seq == 20
        assert store.last_position() == 8 * 21
    finally:
        store.close()


@pytest.mark.parametrize(("durability", "synchronous"),
                         [("sync", 2), ("batch", 1), ("none", 1)])
def test_sqlite_durability_pragmas(sqlite_url: str, durability: str, synchronous: int) -> None:
    """SQLite runs in WAL mode with a busy timeout and no checkpoints inside commits;
    ``synchronous`` is FULL for sync, NORMAL for batch and none; ``flush`` and ``close`` work
    in every mode."""
    store = SqlStore(sqlite_url, durability=durability, upgrade=True)  # type: ignore[arg-type]
    try:
        conn = store._conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == synchronous
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        Harness(store).start(COUNTER, "r")
        store.flush()
    finally:
        store.close()


def test_sqlite_checkpoints_in_the_background(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits never checkpoint themselves; the store's checkpointer thread copies the WAL
    into the database file within a few seconds, while the store stays open.  Its period is
    raised from 0.5 s to 3 s here, so that a stalled machine cannot checkpoint before the
    100 commits and the size check below are done."""
    from wakepoint.stores import sql_engine

    monkeypatch.setattr(sql_engine, "CHECKPOINT_SECONDS", 3.0)
    store = SqlStore(sqlite_url, upgrade=True)
    db = Path(sqlite_url.removeprefix("sqlite:///"))
    try:
        h = Harness(store)
        size = db.stat().st_size
        for n in range(100):
            h.start(COUNTER, f"r{n}")
        assert db.stat().st_size == size  # everything is still in the WAL
        deadline = time.monotonic() + 10
        while db.stat().st_size == size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert db.stat().st_size > size
    finally:
        store.close()


@pytest.mark.parametrize(("durability", "setting"), [("sync", "on"), ("batch", "off")])
def test_postgresql_synchronous_commit(pg_url: str, durability: str, setting: str) -> None:
    """PostgreSQL commits with synchronous_commit off in batch mode (the WAL writer's group
    commit), on in sync mode; ``flush`` works in both."""
    store = SqlStore(pg_url, durability=durability, upgrade=True)  # type: ignore[arg-type]
    try:
        assert store._conn().execute("SHOW synchronous_commit").fetchone()[0] == setting
        Harness(store).start(COUNTER, "r")
        store.flush()
    finally:
        store.close()


def test_runtime_on_sql_urls(url: str, tmp_path: Path) -> None:
    """``Runtime`` opens SQL URLs through ``open_store`` and runs a workflow to the end."""
    from wakepoint import Runtime

    upgrade(url)
    rt = Runtime(url, [crash_worker.build_workflow()],
                 functions={"effect": crash_worker.make_effect(tmp_path)},
                 signer=tmp_path / "key")
    try:
        state = rt.start(crash_worker.WORKFLOW_ID, 3, run_id="one")
        assert state.status is Status.COMPLETED
        assert state.output == crash_worker.expected_output("one", 3)
        assert rt.verify("one") == len(crash_worker.expected_trace())
    finally:
        rt.close()


# --- migrations -------------------------------------------------------------------------------


def test_revisions_known_to_the_store_are_alembic_s() -> None:
    """``sql_schema.REVISIONS`` (what opening a store checks, without loading Alembic) is
    exactly the migrations' history, oldest first."""
    assert revisions() == list(REVISIONS)
    assert REVISIONS[-1] == HEAD


def _schema(url: str) -> dict[str, Any]:
    """Tables, columns, indexes, unique constraints and primary keys, as comparable data."""
    engine = _engine(url)
    try:
        insp = inspect(engine)
        schema: dict[str, Any] = {}
        for table in sorted(set(insp.get_table_names()) - {VERSION_TABLE}):
            schema[table] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"], c.get("comment"))
                    for c in insp.get_columns(table)
                ],
                "pk": insp.get_pk_constraint(table)["constrained_columns"],
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]),
                     repr(sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items())))
                    for i in insp.get_indexes(table)
                ),
                "unique": sorted(
                    (u["name"], tuple(u["column_names"]))
                    for u in insp.get_unique_constraints(table)
                ),
                "checks": sorted(c["name"] for c in insp.get_check_constraints(table)),
            }
    finally:
        engine.dispose()
    return schema


def test_migrated_schema_equals_metadata_schema(url: str, request: pytest.FixtureRequest) -> None:
    """A database built by the first revision and upgraded step by step to head has the same
    tables, columns, types, indexes and constraints as one built from the metadata; each
    step really changes the schema (0001 has no ``cosigs`` and no ``wp_checkpoints``)."""
    upgrade(url, REVISIONS[0])
    first = _schema(url)
    assert set(first) == {"wp_meta", "wp_runs", "wp_records"}
    assert "cosigs" not in [c[0] for c in first["wp_records"]["columns"]]
    for revision in REVISIONS[1:]:
        upgrade(url, revision)
    if url.startswith("sqlite"):
        other = url.replace("wp.db", "metadata.db")
    else:
        other = str(request.getfixturevalue("pg_server").create_database(
            f"meta{os.getpid()}_{next(_databases)}"))
    engine = _engine(other)
    try:
        METADATA.create_all(engine)
    finally:
        engine.dispose()
    migrated, built = _schema(url), _schema(other)
    assert set(migrated) == {"wp_meta", "wp_runs", "wp_records", "wp_checkpoints"}
    assert "cosigs" in [c[0] for c in migrated["wp_records"]["columns"]]
    assert migrated == built
    assert migrated != first


def test_upgrade_from_0001_keeps_the_ledger(url: str) -> None:
    """Runs and records written at revision 0001 read back unchanged after the upgrade to
    head (no co-signatures: ``cosigs`` is NULL), the chain verifies, and ``wp_meta`` says
    schema version 2."""
    from wakepoint.kernel.codec import encode_state
    from wakepoint.stores.memory import MemoryStore

    def mark(n: int) -> str:  # the driver's positional parameter marks
        return ", ".join(["?" if url.startswith("sqlite") else "%s"] * n)

    upgrade(url, "0001")
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            log_id = conn.exec_driver_sql("SELECT log_id FROM wp_meta").scalar()
        h = Harness(MemoryStore(log_id=log_id))
        h.start(COUNTER, "r", 2)
        h.drive("r", 3)
        run = h.runs["r"]
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO wp_runs (run_id, state, status, workflow, logic_id, seq, "
                f"created_at, updated_at) VALUES ({mark(8)})",
                ("r", encode_state(run.state), run.state.status.value, run.state.workflow,
                 run.state.version, run.state.seq, 1, 1))
            for position, rec in enumerate(run.records, start=1):
                conn.exec_driver_sql(
                    "INSERT INTO wp_records (position, run_id, seq, key_id, body, sig, "
                    f"record_hash) VALUES ({mark(7)})",
                    (position, "r", rec.seq, rec.key_id, rec.body, rec.sig, rec.hash))
            conn.exec_driver_sql(
                f"UPDATE wp_meta SET last_position = {len(run.records)}")
    finally:
        engine.dispose()
    assert upgrade(url) == "0001"
    store = SqlStore(url)
    try:
        assert store.load("r") == run.state
        assert store.ledger("r") == run.records
        verify_chain(store.ledger("r"), h.signer, log_id=log_id, run_id="r")
    finally:
        store.close()
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT schema_version FROM wp_meta").scalar() == 2
    finally:
        engine.dispose()


def test_autogenerate_finds_no_difference(url: str) -> None:
    """``alembic check``: comparing the migrated database with the metadata (types, server
    defaults, indexes, constraints, comments) finds nothing to generate."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    upgrade(url)
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={
                "compare_type": True, "compare_server_default": True,
                "version_table": VERSION_TABLE,
            })
            assert compare_metadata(context, METADATA) == []
    finally:
        engine.dispose()


def test_upgrade_is_idempotent(url: str) -> None:
    """The first ``upgrade`` creates the schema (it reports no revision before); the second
    finds head and changes nothing: same log_id, same tables."""
    assert upgrade(url) is None
    store = SqlStore(url)
    log_id = store.log_id
    store.close()
    before = _schema(url)
    assert upgrade(url) == HEAD
    assert upgrade(url) == HEAD
    assert _schema(url) == before
    store = SqlStore(url, upgrade=True)
    assert store.log_id == log_id
    store.close()


_UPGRADE_AT = """
import sys, time
from wakepoint.migrations import upgrade
url, at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))
print(upgrade(url) or "")
"""


def test_four_processes_upgrade_an_empty_database_at_once(url: str) -> None:
    """Four processes released at the same instant all upgrade successfully: the lock lets
    exactly one build the schema, the others find it at head; one ``wp_meta`` row."""
    at = time.time() + 3.0  # after every interpreter has started and imported wakepoint
    procs = [subprocess.Popen([sys.executable, "-c", _UPGRADE_AT, url, str(at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outcomes = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outcomes
    assert sorted(out.strip() for out, _ in outcomes) == ["", HEAD, HEAD, HEAD], outcomes
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM wp_meta").scalar() == 1
    finally:
        engine.dispose()


# --- bad input: a clear error and nothing written ---------------------------------------------


def _fingerprint(url: str) -> Any:
    """What could change if something were written: the SQLite files' bytes, or the tables
    and their row counts on PostgreSQL."""
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        return sorted(
            (p.name, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in path.parent.iterdir() if p.name.startswith(path.name)
        )
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            tables = sorted(inspect(conn).get_table_names())
            return [(t, conn.exec_driver_sql(f'SELECT count(*) FROM "{t}"').scalar())
                    for t in tables]
    finally:
        engine.dispose()


def test_missing_sqlite_file_is_not_created(sqlite_url: str) -> None:
    """Opening a SQLite URL whose file does not exist says how to create it, and creates
    nothing."""
    with pytest.raises(StoreError, match=r"no database file .*wakepoint db upgrade"):
        SqlStore(sqlite_url)
    assert list(Path(sqlite_url.removeprefix("sqlite:///")).parent.iterdir()) == []


def test_empty_database_needs_an_upgrade(url: str) -> None:
    """An empty database (here: an empty SQLite file) is refused with the command to run,
    and nothing is written; ``upgrade=True`` then creates the schema."""
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).touch()
    before = _fingerprint(url)
    with pytest.raises(StoreError, match=r"no wakepoint tables.*db upgrade.*upgrade=True"):
        SqlStore(url)
    assert _fingerprint(url) == before
    SqlStore(url, upgrade=True).close()


def _foreign(url: str) -> None:
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
            conn.exec_driver_sql("INSERT INTO users VALUES (1, 'ada')")
    finally:
        engine.dispose()


def test_someone_elses_database_is_refused(url: str) -> None:
    """A database with tables but no wakepoint schema is 'not a wakepoint database', even
    with upgrade=True and for ``upgrade()``; nothing is written."""
    _foreign(url)
    before = _fingerprint(url)
    for attempt in (lambda: SqlStore(url), lambda: SqlStore(url, upgrade=True),
                    lambda: upgrade(url)):
        with pytest.raises(StoreError, match=r"not a wakepoint database: it has tables \(users\)"):
            attempt()
        assert _fingerprint(url) == before


def test_database_newer_than_the_code_is_refused(url: str) -> None:
    """A database at a revision this code does not know says the code is older than the
    database, for opening (with or without upgrade) and for ``upgrade()``; nothing is
    written."""
    upgrade(url)
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'")
    finally:
        engine.dispose()
    before = _fingerprint(url)
    for attempt in (lambda: SqlStore(url), lambda: SqlStore(url, upgrade=True),
                    lambda: upgrade(url)):
        with pytest.raises(StoreError, match=r"'9999_future'.*code is older than the database"):
            attempt()
        assert _fingerprint(url) == before


def test_missing_driver_names_the_extra(tmp_path: Path) -> None:
    """Without psycopg installed, a PostgreSQL URL is a StoreError naming the driver and
    ``pip install 'wakepoint[postgres]'`` (checked in a process where psycopg cannot be
    imported)."""
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from wakepoint.stores import open_store, StoreError\n"
        "try:\n"
        "    open_store('postgresql+psycopg://u@/db?host=/nonexistent')\n"
        "except StoreError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=tmp_path).stdout
    assert "psycopg driver is not installed" in out
    assert "pip install 'wakepoint[postgres]'" in out


@pytest.mark.parametrize(("bad", "says"), [
    ("sqlite://", "in-memory SQLite"),
    ("sqlite:///:memory:", "in-memory SQLite"),
    ("postgresql+psycopg2://u@h/db", "psycopg 3"),
    ("postgresql+asyncpg://u@h/db", "psycopg 3"),
])
def test_unsupported_urls(bad: str, says: str) -> None:
    """URLs the SQL store cannot serve are refused before anything is connected."""
    with pytest.raises(StoreError, match=says):
        open_store(bad)


def test_durability_is_checked(sqlite_url: str) -> None:
    """An unknown durability mode is a StoreError naming the valid ones."""
    with pytest.raises(StoreError, match="durability must be one of"):
        SqlStore(sqlite_url, durability="fast", upgrade=True)  # type: ignore[arg-type]


# --- crashes: SIGKILL at random moments, then recover() in a fresh process ----------------------

CRASH_ROUNDS = 10
CRASH_RUNS = 3


_CRASH_WORKER = """
import argparse, importlib.util, json, logging, sys
from pathlib import Path

import structlog

from wakepoint import RunNotFound, Runtime
from wakepoint.stores.sql import SqlStore

spec = importlib.util.spec_from_file_location("crash_worker", sys.argv[1])
cw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cw)
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    logger_factory=structlog.PrintLoggerFactory(sys.stderr),
)
parser = argparse.ArgumentParser()
parser.add_argument("url")
parser.add_argument("root", type=Path)
parser.add_argument("--round", type=int, required=True, dest="round_no")
parser.add_argument("--runs", type=int, required=True)
parser.add_argument("--recover", action="store_true")
parser.add_argument("--linger", action="store_true")
args = parser.parse_args(sys.argv[2:])
rt = Runtime(SqlStore(args.url), [cw.build_workflow()],
             functions={"effect": cw.make_effect(args.root)}, signer=args.root / "signer.key")
ids = cw.run_ids(args.round_no, args.runs)
if not args.recover:
    print("ready", flush=True)
    for index, run_id in enumerate(ids):
        rt.start(cw.WORKFLOW_ID, index, run_id=run_id)
    print("done", flush=True)
    if args.linger:
        sys.stdin.read()
    rt.close()
    sys.exit(0)
before = cw.statuses(rt, ids)
rt.recover()
for index, run_id in enumerate(ids):
    try:
        rt.get(run_id)
    except RunNotFound:
        rt.start(cw.WORKFLOW_ID, index, run_id=run_id)
report = {"before": before, "after": cw.statuses(rt, ids), "pending": cw.pending(rt)}
rt.close()
print(json.dumps(report), flush=True)
"""
"""The process the crash test kills (``--linger``: start the runs, print ``ready`` then
``done``, wait), or the one that recovers after it (``--recover``: print a JSON report).
It imports only wakepoint and ``crash_worker.py``, to start fast."""


def _spawn(url: str, root: Path, round_no: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CRASH_WORKER, str(HERE / "crash_worker.py"), url, str(root),
         "--round", str(round_no), "--runs", str(CRASH_RUNS), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _recover(url: str, root: Path, round_no: int) -> dict[str, Any]:
    proc = _spawn(url, root, round_no, "--recover")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"recover failed:\n{err}"
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


def _check_crash_round(url: str, root: Path, round_no: int) -> None:
    """Every run completed with its output; one record per transition, in the workflow's
    order; each call requested and resolved once; the chain verifies with the key file;
    the global positions are dense."""
    signer = Signer.load(root / "signer.key")
    trace = crash_worker.expected_trace()
    store = SqlStore(url)
    try:
        requested: Counter[str] = Counter()
        for index, run_id in enumerate(crash_worker.run_ids(round_no, CRASH_RUNS)):
            state = store.load(run_id)
            assert state.status is Status.COMPLETED, (run_id, state.status, state.error)
            assert state.output == crash_worker.expected_output(run_id, index)
            records = store.ledger(run_id)
            assert verify_chain(records, signer, log_id=store.log_id) == len(records)
            bodies = [parse_body(r.body) for r in records]
            assert [(b.kind, b.node) for b in bodies] == trace, run_id
            assert len(bodies) == state.step + 1 == state.seq + 1  # + run.sealed
            requested.update(b.key for b in bodies if b.kind == "effect.requested" and b.key)
        assert set(requested.values()) == {1}
        positions = [p for p, _, _ in _positions(url)]
        assert positions == list(range(1, len(positions) + 1))
    finally:
        store.close()


def _calibrate(url: str, root: Path) -> tuple[float, float]:
    """Seconds from spawn to ``ready`` and from ``ready`` to ``done`` of a worker that is not
    killed (its round is checked like the others)."""
    root.mkdir()
    t0 = time.monotonic()
    proc = _spawn(url, root, 999, "--linger")
    crash_worker.expect_line(proc, "ready")
    t1 = time.monotonic()
    crash_worker.expect_line(proc, "done")
    t2 = time.monotonic()
    proc.communicate(input="", timeout=30)
    assert proc.returncode == 0
    assert _recover(url, root, 999)["pending"] == []
    _check_crash_round(url, root, 999)
    return t1 - t0, t2 - t1


@pytest.mark.slow
def test_sigkill_at_random_moments_then_recover(url: str, tmp_path: Path) -> None:
    """Ten SIGKILLs of a process driving 20-node ``call`` workflows on the store, at random
    moments (start-up, mid-work, after it finished); after ``recover()`` in fresh processes
    every run completes with every transition recorded exactly once and chains verify."""
    upgrade(url)
    startup, working = _calibrate(url, tmp_path / "calibration")
    rng = random.Random(4)
    outcome: Counter[str] = Counter()
    for round_no in range(CRASH_ROUNDS):
        root = tmp_path / f"round-{round_no}"
        root.mkdir()
        moment = rng.choices(["startup", "working", "after"], weights=[1, 8, 1])[0]
        proc = _spawn(url, root, round_no, "--linger")
        if moment == "startup":
            time.sleep(rng.uniform(0, startup))
        else:
            crash_worker.expect_line(proc, "ready")
            if moment == "working":
                time.sleep(rng.uniform(0, working * 1.1))
            else:
                crash_worker.expect_line(proc, "done")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        report = _recover(url, root, round_no)
        before = set(report["before"].values())
        if before == {None}:
            outcome["before any run existed"] += 1
        elif before == {"completed"}:
            outcome["after every run completed"] += 1
        else:
            outcome["mid-run"] += 1
        for _ in range(2):
            if not report["pending"]:
                break
            report = _recover(url, root, round_no)
        assert report["pending"] == [], report
        assert set(report["after"].values()) == {"completed"}, report
        _check_crash_round(url, root, round_no)
    print(f"{CRASH_ROUNDS} kills (start-up {startup:.2f} s, work {working:.2f} s): "
          f"{dict(outcome)}")
    assert outcome["mid-run"] >= CRASH_ROUNDS // 3, dict(outcome)



# --- text parameters and connection sharing on the libpq path ------------------------------


_text_wf = Workflow("text")


@_text_wf.node(start=True)
def _text_wait(run: Any) -> Any:
    return wait_event("clé", into="x", then="_text_end")


@_text_wf.node
def _text_end(run: Any) -> Any:
    return done(run.vars["x"])


def test_postgresql_refuses_text_with_nul_instead_of_cutting_it(pg_url: str) -> None:
    """libpq reads text parameters as C strings: a run id with a NUL would be stored cut
    short, as another run's id.  It is refused (as psycopg's cursor refuses it), and nothing
    is stored."""
    import psycopg

    store = SqlStore(pg_url, upgrade=True, durability="none")
    rt = Runtime(store, [_text_wf], checkpoints=False)
    with pytest.raises(psycopg.DataError, match="NUL"):
        rt.start(_text_wf, run_id="order-1\x00and more")
    assert store.list() == []
    assert rt.start(_text_wf, run_id="order-1").status is Status.WAITING  # not taken
    rt.close()


def test_postgresql_text_is_spelled_one_way_in_a_latin1_database(pg_server: Any) -> None:
    """Every statement sends text as UTF-8 (the engine sets ``client_encoding``), so a
    non-ASCII run id or wait key written by the prepared-statement path is found by the
    others: ledger, find_waiting, take, send_event."""
    import psycopg

    name = f"latin1_{os.getpid()}"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' "
                      "LC_CTYPE 'C' TEMPLATE template0")
    try:
        store = SqlStore(pg_server.url(name), upgrade=True, durability="none")
        rt = Runtime(store, [_text_wf], checkpoints=False)
        rt.start(_text_wf, run_id="café")
        assert len(store.ledger("café")) == 2
        assert [s.run_id for s in store.find_waiting("clé")] == ["café"]
        [resumed] = rt.send_event("clé", 1)
        assert resumed.run_id == "café" and resumed.status is Status.COMPLETED
        rt.close()
        with psycopg.connect(pg_server.dsn(name)) as conn:
            assert conn.execute("SELECT run_id FROM wp_runs").fetchall() == [("café",)]
    finally:
        pg_server.drop_database(name)


def test_postgresql_close_waits_for_a_statement_another_thread_runs(pg_url: str) -> None:
    """A prepared statement runs under psycopg's connection lock, as a cursor's does: a
    ``close()`` from another thread waits for it instead of finishing the connection under
    it (which libpq answered with 'out of memory' - freed memory in use)."""
    import psycopg

    store = SqlStore(pg_url, upgrade=True, durability="none")
    store.release("x", "w")  # opens the store's connection for this thread... and others
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as admin:
        admin.execute("INSERT INTO wp_runs (run_id, workflow, logic_id, status, state, seq, "
                      "created_at, updated_at, lease_owner) VALUES ('r', 'w', 'l', "
                      "'running', '\\x00', 0, 0, 0, 'w')")
        admin.commit()
        admin.execute("SELECT 1 FROM wp_runs WHERE run_id = 'r' FOR UPDATE")  # row locked
        outcome: list[str] = []

        def release() -> None:
            try:
                store.release("r", "w")  # waits for admin's row lock, inside libpq
                outcome.append("returned")
            except Exception as exc:
                outcome.append(f"{type(exc).__name__}: {exc}")

        releaser = threading.Thread(target=release)
        releaser.start()
        # Until the release waits for the row lock inside libpq (a fixed sleep was a guess).
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                   "AND wait_event_type = 'Lock'")
        with psycopg.connect(dsn, autocommit=True) as probe:
            end = time.monotonic() + 10
            while not probe.execute(waiting).fetchone()[0]:  # type: ignore[index]
                assert time.monotonic() < end, "the release never waited for the row lock"
                time.sleep(0.02)
        closer = threading.Thread(target=store.close)
        closer.start()
        closer.join(0.5)
        assert closer.is_alive()  # waiting for the statement, not closing under it
        admin.rollback()  # the row lock goes: the statement ends, then the close
        releaser.join(10)
        closer.join(10)
    assert outcome == ["returned"]
    assert not closer.is_alive()


def test_connections_of_threads_that_ended_are_closed(tmp_path: Path) -> None:
    """Each thread gets a connection of its own; once a thread has ended, the next thread to
    open one closes it - a server with a thread per request does not hold a connection per
    request until ``close()`` (before: 200 threads, 200 connections, 400 fds)."""
    url = f"sqlite:///{tmp_path / 'wp.db'}"
    store = SqlStore(url, upgrade=True)

    def fds() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path)))

    try:
        store.list()
        for _ in range(50):
            thread = threading.Thread(target=store.list)
            thread.start()
            thread.join()
        assert fds() <= 3 * 2  # this thread's, the last thread's, the checkpointer's
    finally:
        store.close()
    assert fds() == 0


@pytest.mark.parametrize(("url", "named"), [
    ("postgres://bob:s3cret@db/app", "supports SQLite"),  # an alias SQLAlchemy has no plugin for
    ("postgresql+psycopg://bob:s3cret@db:port/app", "invalid literal for int()"),
    ("postgresql+psycopg//bob:s3cret@db/app", "Could not parse"),
])
def test_unusable_store_urls_are_store_errors_without_the_password(url: str, named: str) -> None:
    """A URL the SQL store cannot use is a ``StoreError`` naming what is wrong (before: a raw
    NoSuchModuleError or ValueError, or the whole URL echoed, password included)."""
    with pytest.raises(StoreError, match=named) as info:
        SqlStore(url)
    assert "s3cret" not in str(info.value)
