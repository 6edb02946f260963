"""Several worker processes on one store: every run completes, nothing is committed twice, and
a call runs twice only when the process running it was killed.

The fleet: ``worker_proc.py`` processes (``scheduler.main_worker`` on the app there: runs of
five timer + ``call`` stages, 12 transitions each) on one PostgreSQL database, one SQLite file
or one JSONL directory; the test process plays a client that starts the runs.  With
``kill=True`` one worker is SIGKILLed once a third of the calls have run; the others take its
runs over when its leases expire and re-dispatch the calls it left in flight once they are
older than ``--orphan-after``.  The side file (one line per call execution, with the key and
the pid) is the outside world the ledger is checked against.  Scaled down from the issue's
2,000 runs and 4 workers to keep the suite fast; ``benchmarks/bench_worker.py`` runs it full
size.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from wakepoint import Runtime, Status

HERE = Path(__file__).parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"wakepoint_test_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


proc = _load("worker_proc")

pytestmark = pytest.mark.slow



def _store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    from wakepoint.stores.sql import SqlStore

    if kind == "jsonl":
        return f"jsonl:{tmp_path / 'store'}"
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'wp.db'}"
    else:
        server = request.getfixturevalue("pg_server")
        url = server.create_database(f"w{os.getpid()}_{tmp_path.name[-20:]}".lower())
    SqlStore(url, upgrade=True).close()
    return url


def _spawn(url: str, home: Path, side: Path, **options: Any) -> subprocess.Popen[str]:
    args = [sys.executable, str(HERE / "worker_proc.py"), url, str(home), str(side)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    log = home / f"worker-{time.monotonic_ns()}.log"
    with open(log, "w") as err:
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    assert child.stdout is not None
    with child.stdout:
        line = child.stdout.readline()
    assert line.startswith("ready"), (line, log.read_text())
    return child


def run_fleet(
    url: str, tmp_path: Path, *, workers: int, runs: int, kill: bool, deadline: float = 80.0,
    **options: Any,
) -> SimpleNamespace:
    """Start ``runs`` runs, run ``workers`` worker processes until all finish; what happened."""
    home, side = tmp_path / "home", tmp_path / "side.log"
    home.mkdir(exist_ok=True)
    wf = proc.build_workflow()
    # The client drives what it starts until the run blocks, as every Runtime does: when a
    # timer is already due it reaches the first call itself, so it needs the functions too.
    client = Runtime(url, [wf], {"work": proc.make_work(side, 5.0)}, home=home)
    ids = [f"fleet-{i}" for i in range(runs)]
    fleet = [_spawn(url, home, side, **options) for _ in range(workers)]
    killed: int | None = None
    started = time.monotonic()
    try:
        for i, run_id in enumerate(ids):
            client.start(wf, i, run_id=run_id)
        calls = runs * proc.STAGES
        while time.monotonic() - started < deadline:
            done = sum(1 for r in client.list(status=Status.COMPLETED))
            if done == runs or client.list(status=Status.FAILED):
                break
            if kill and killed is None and len(proc.read_side(side)[0]) >= calls // 3:
                fleet[0].send_signal(signal.SIGKILL)
                fleet[0].wait()
                killed = fleet[0].pid
            time.sleep(0.1)
        elapsed = time.monotonic() - started
    finally:
        codes = []
        for child in fleet:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in fleet:
            try:
                codes.append(child.wait(timeout=20))
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGUSR1)  # dump its threads into its log
                time.sleep(0.5)
                child.kill()
                child.wait()
                codes.append(None)
    counts, pids = proc.read_side(side)
    return SimpleNamespace(client=client, ids=ids, killed=killed, elapsed=elapsed,
                           counts=counts, pids=pids, codes=codes, fleet=fleet)


def check_fleet(result: SimpleNamespace, kit: Any) -> None:
    """All runs completed correctly, ledgers verify, and calls ran once unless killed."""
    client: Runtime = result.client
    try:
        for i, run_id in enumerate(result.ids):
            state = client.get(run_id)
            assert state.status is Status.COMPLETED, (run_id, state.status, state.node)
            assert state.output == proc.expected_output(i)
            kit.check_ledger(client, run_id)  # one record per transition, chain verifies
        assert len(result.counts) == len(result.ids) * proc.STAGES
        for key, count in result.counts.items():
            if count > 1:
                # Only a call whose process was killed mid-call may run again.
                assert result.pids[key][0] == result.killed, (key, result.pids[key])
                assert count == 2, (key, result.pids[key])
        survivors = [c for c, child in zip(result.codes, result.fleet, strict=True)
                     if child.pid != result.killed]
        assert survivors == [0] * len(survivors), "SIGTERM stops a worker cleanly"
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["postgresql", "sqlite", "jsonl"])
def test_two_workers_share_a_store_and_run_every_call_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, kit: Any
) -> None:
    """Two worker processes on one store finish every run; every call runs exactly once,
    and every ledger verifies with one record per transition."""
    url = _store_url(kind, tmp_path, request)
    result = run_fleet(url, tmp_path, workers=2, runs=60, kill=False)
    check_fleet(result, kit)
    assert max(result.counts.values()) == 1


@pytest.mark.parametrize("kind", ["postgresql", "sqlite", "jsonl"])
def test_a_worker_killed_mid_way_loses_no_run(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, kit: Any
) -> None:
    """One of several workers is SIGKILLed mid-way: the others finish all its runs (after
    its leases expire and its in-flight calls become orphans); no transition is committed
    twice, and only the calls the killed process was running run a second time."""
    workers, runs = (4, 200) if kind == "postgresql" else (2, 80)
    url = _store_url(kind, tmp_path, request)
    result = run_fleet(url, tmp_path, workers=workers, runs=runs, kill=True)
    assert result.killed is not None
    check_fleet(result, kit)
