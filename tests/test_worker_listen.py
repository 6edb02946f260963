"""PostgreSQL LISTEN/NOTIFY: a timer created by one process wakes a worker in another at once.

* Store level: ``SqlStore.watch_due`` on one store object (its own connection) is told the
  deadline another store object commits, within a second; a rolled-back commit, and a
  deadline already past when committed, announce nothing; SQLite has no watch (None).
* Process level: a worker process with a 30 s poll; the test process (a client) starts runs
  whose first timer is 0-200 ms away.  Only the NOTIFY can wake the worker in time: every run
  completes (5 timers and 5 calls each) within a few seconds, far inside one poll.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool
from wakepoint import Runtime, Status
from wakepoint.stores.conformance import TIMER, Harness
from wakepoint.stores.sql import SqlStore

HERE = Path(__file__).parent
_databases = iter(range(1_000_000))


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"wakepoint_test_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


proc = _load("worker_proc")


@pytest.fixture
def pg_url(pg_server: Any) -> Iterator[str]:
    """A fresh database at head on the session's server."""
    name = f"l{os.getpid()}_{next(_databases)}"
    url = str(pg_server.create_database(name))
    SqlStore(url, upgrade=True).close()
    yield url
    pg_server.drop_database(name)



def _now() -> datetime:
    """The harness's clock for deadlines the NOTIFY trigger must announce: it announces only
    deadlines after the server's clock, so the harness's default (2030-01-01) would stop
    working on that date."""
    return datetime.now(UTC).replace(microsecond=0)

def test_watch_due_hears_another_connections_deadline(pg_url: str) -> None:
    """A deadline committed through one store object reaches the watcher of another; a
    rolled-back one does not."""
    heard: queue.Queue[datetime] = queue.Queue()
    watcher, writer = SqlStore(pg_url), SqlStore(pg_url)
    try:
        stop = watcher.watch_due(heard.put)
        assert stop is not None
        h = Harness(writer, now=_now())
        with pytest.raises(RuntimeError), writer._transaction() as cursor:
            cursor.execute("UPDATE wp_runs SET due = 1")  # no rows yet: nothing fires anyway
            raise RuntimeError("roll back")
        state = h.start(TIMER, "t", 5)
        h.drive("t")
        state = h.runs["t"].state
        assert state.wait is not None and state.wait.deadline is not None
        assert heard.get(timeout=5) == state.wait.deadline
        # rolled back: the trigger fired inside the transaction, the NOTIFY is dropped
        with pytest.raises(RuntimeError), writer._transaction() as cursor:
            cursor.execute("UPDATE wp_runs SET due = due + 1")
            raise RuntimeError("roll back")
        # committed, but already past by the server's clock: its committer resolves it
        with writer._transaction() as cursor:
            cursor.execute("UPDATE wp_runs SET due = 1")
        time.sleep(0.5)
        assert heard.empty()
        stop()
    finally:
        watcher.close()
        writer.close()


def test_watch_due_reconnects_after_losing_its_connection(pg_url: str) -> None:
    """The LISTEN connection is killed by the server (``pg_terminate_backend``): the watcher
    reconnects on its own and hears the next deadline."""
    heard: queue.Queue[datetime] = queue.Queue()
    watcher, writer = SqlStore(pg_url), SqlStore(pg_url)
    try:
        stop = watcher.watch_due(heard.put)
        assert stop is not None
        listeners = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                     "AND query LIKE 'LISTEN%%' AND state = 'idle' AND pid <> pg_backend_pid()")
        with writer._transaction() as cursor:
            cursor.execute(listeners)
            (killed,) = cursor.fetchone()
            cursor.execute("SELECT pg_terminate_backend(%(pid)s)", {"pid": killed})
        end = time.monotonic() + 10
        while True:  # a new LISTEN session, within RETRY_SECONDS
            with writer._transaction() as cursor:
                cursor.execute(listeners)
                if [row[0] for row in cursor.fetchall()] not in ([], [killed]):
                    break
            assert time.monotonic() < end, "the watcher did not reconnect"
            time.sleep(0.05)
        h = Harness(writer, now=_now())
        h.start(TIMER, "t2", 5)
        h.drive("t2")
        state = h.runs["t2"].state
        assert state.wait is not None
        assert heard.get(timeout=5) == state.wait.deadline
        stop()
    finally:
        watcher.close()
        writer.close()


def test_sqlite_has_no_watch(tmp_path: Path) -> None:
    """SQLite cannot tell other processes: ``watch_due`` is None (the worker's poll covers)."""
    store = SqlStore(f"sqlite:///{tmp_path / 'wp.db'}", upgrade=True)
    try:
        assert store.watch_due(lambda _: None) is None
    finally:
        store.close()


def _listening(url: str) -> bool:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return bool(conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN wp_due%%'"
            ).scalar())
    finally:
        engine.dispose()


def test_a_timer_from_another_process_fires_well_before_the_poll(
    pg_url: str, tmp_path: Path
) -> None:
    """Runs started by this process wait on timers; the worker process (poll 30 s) is woken
    by NOTIFY and finishes every run within seconds."""
    home, side = tmp_path / "home", tmp_path / "side.log"
    home.mkdir()
    args = [sys.executable, str(HERE / "worker_proc.py"), pg_url, str(home), str(side),
            "--poll", "30", "--concurrency", "2"]
    log = home / "worker.log"
    with open(log, "w") as err:
        worker = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    client = None
    try:
        assert worker.stdout is not None
        with worker.stdout:
            assert worker.stdout.readline().startswith("ready"), log.read_text()
        end = time.monotonic() + 20
        while not _listening(pg_url):  # the worker's first claim and its LISTEN
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.05)
        time.sleep(0.3)  # its first arming (at now + poll) is done: only NOTIFY wakes it now
        wf = proc.build_workflow()
        client = Runtime(pg_url, [wf], {"work": proc.make_work(side, 1.0)}, home=home)
        ids = [f"listen-{i}" for i in range(5)]
        started = time.monotonic()
        for i, run_id in enumerate(ids):
            client.start(wf, i, run_id=run_id)
        assert any(client.get(r).status is Status.WAITING for r in ids)
        while any(client.get(r).status is not Status.COMPLETED for r in ids):
            assert time.monotonic() - started < 10, (
                [client.get(r).node for r in ids], log.read_text())
            time.sleep(0.05)
        for i, run_id in enumerate(ids):
            assert client.get(run_id).output == proc.expected_output(i)
    finally:
        if client is not None:
            client.close()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0, log.read_text()
