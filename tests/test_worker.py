"""``Worker`` in one process: timers wake on time, start-up recovers, orphans are re-dispatched
only when stale, cron ticks start one run however many workers fire them, stop is graceful.

Workers here run on the real clock (the alarm is APScheduler's, which reads the real clock);
several ``Runtime``s on one JSONL directory stand for several processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from wakepoint import Runtime, RunView, Status, Workflow, call, done, goto, wait_until
from wakepoint.scheduler import App, Worker, load_app
from wakepoint.stores import MemoryStore

timer_wf = Workflow("timer")


@timer_wf.node(start=True)
def sleep_first(run: RunView) -> Any:
    return wait_until(run.input, then="woke")


@timer_wf.node
def woke(run: RunView) -> Any:
    return done(run.now.isoformat())


def _create_running(rt: Runtime, wf: Workflow, run_id: str, input: Any) -> None:
    """Store a new RUNNING run that nobody drives: a client that died right after creating it."""
    from wakepoint.kernel import transitions as kernel
    from wakepoint.ledger.records import sign_entries

    tr = kernel.start(wf, run_id, input, datetime.now(UTC))
    state, records = sign_entries(rt.signer, rt.store.log_id, tr.state, tr.entries,
                                  tr.state.updated_at, prev_seq=-1, prev_head="")
    rt.store.create(state, records)


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.fixture
def jsonl(tmp_path: Path) -> str:
    return f"jsonl:{tmp_path / 'store'}"


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop(timeout=10)


def _run(worker: Worker, workers: list[Worker]) -> Worker:
    workers.append(worker)
    worker.run_in_thread()
    return worker


def test_timers_fire_on_time_on_a_live_worker(workers: list[Worker]) -> None:
    """Timers set by runs in the worker's own process wake within 2 s of their due time,
    long before the 30 s poll (on_due re-arms the alarm).  The bound only separates the alarm
    from the poll, with room for a loaded CI machine (the suite shares two cores with parallel
    tests; 150 ms was exceeded once at load 5); the lateness figure itself (p99 <= 50 ms) is
    bench_worker.py's, on a quiet machine."""
    rt = Runtime("memory:", [timer_wf])
    _run(Worker(rt, concurrency=2, poll=30), workers)
    time.sleep(0.05)  # the worker has armed for now + poll
    for i in range(20):
        rt.start(timer_wf, 0.2 + i * 0.01, run_id=f"t{i}")
    _wait_for(lambda: len(rt.list(status=Status.COMPLETED)) == 20)
    for state in rt.list(status=Status.COMPLETED):
        due = state.created_at + timedelta(seconds=0.2 + int(state.run_id[1:]) * 0.01)
        late = datetime.fromisoformat(state.output) - due
        assert timedelta(0) <= late < timedelta(seconds=2), (state.run_id, late)


def test_timers_created_by_another_process_are_caught_by_the_poll(
    jsonl: str, workers: list[Worker]
) -> None:
    """A timer another process creates (another Runtime on the same directory) fires
    about one poll interval (0.3 s) after it is due at the latest - the worker's alarm
    never hears of it.  The bound allows 0.7 s of scheduling delay on a loaded machine."""
    worker_rt = Runtime(jsonl, [timer_wf])
    _run(Worker(worker_rt, poll=0.3), workers)
    client = Runtime(jsonl, [timer_wf])
    client.start(timer_wf, 0.1, run_id="other")
    _wait_for(lambda: client.get("other").status is Status.COMPLETED, timeout=5)
    state = client.get("other")
    late = datetime.fromisoformat(state.output) - (state.created_at + timedelta(seconds=0.1))
    assert late < timedelta(seconds=1.0)


def test_a_worker_started_late_resumes_every_overdue_run(
    jsonl: str, workers: list[Worker]
) -> None:
    """Runs whose timers fell due while no worker ran are all resumed as soon as a worker
    starts (the first claim rounds), well before any poll."""
    client = Runtime(jsonl, [timer_wf])
    for i in range(10):
        client.start(timer_wf, 0.01, run_id=f"late{i}")
    time.sleep(0.05)
    began = time.monotonic()
    _run(Worker(Runtime(jsonl, [timer_wf]), concurrency=4, poll=30), workers)
    _wait_for(lambda: len(client.list(status=Status.COMPLETED)) == 10, timeout=5)
    assert time.monotonic() - began < 2


def _keyed(keys: list[str], gate: threading.Event, times: int = 1) -> Callable[..., int]:
    """A ``work`` function that records its idempotency key, waits for ``gate`` (10 s at
    most) and returns its input ``times`` over."""

    def work(x: int, idempotency_key: str) -> int:
        keys.append(idempotency_key)
        gate.wait(10)
        return x * times

    return work


def _call_wf(name: str) -> Workflow:
    wf = Workflow(name)

    @wf.node(start=True)
    def ask(run: RunView) -> Any:
        return call("work", [run.input], into="out", then="finish")

    @wf.node
    def finish(run: RunView) -> Any:
        return done(run.vars["out"])

    return wf


def test_an_orphaned_call_is_dispatched_again_only_once_stale(workers: list[Worker]) -> None:
    """A call whose requesting process died (its run WAITING on the effect) is dispatched
    again by a worker once the request is older than ``orphan_after``, with the same
    idempotency key; a fresher request is left alone."""
    wf = _call_wf("orphan")
    store = MemoryStore()
    keys: list[str] = []
    gate = threading.Event()

    def hang(x: int, idempotency_key: str) -> int:
        keys.append(idempotency_key)
        gate.wait()  # the "dead" process never returns
        return x

    dead = Runtime(store, [wf], {"work": hang})
    threading.Thread(target=dead.start, args=(wf, 1), kwargs={"run_id": "o1"},
                     daemon=True).start()
    _wait_for(lambda: len(keys) == 1)

    def work(x: int, idempotency_key: str) -> int:
        keys.append(idempotency_key)
        return x * 10

    rt = Runtime(store, [wf], {"work": work}, signer=dead.signer)
    worker = _run(Worker(rt, poll=0.1, orphan_after=2.0), workers)
    time.sleep(0.3)  # well inside orphan_after (2 s), on a stalled machine too
    assert len(keys) == 1, "a request younger than orphan_after is not re-dispatched"
    _wait_for(lambda: rt.get("o1").status is Status.COMPLETED, timeout=5)
    assert rt.get("o1").output == 10
    assert keys[0] == keys[1] and len(keys) == 2
    assert worker.stats["orphan"] >= 1
    gate.set()


def test_a_slow_call_on_a_live_worker_is_not_dispatched_by_another(
    jsonl: str, workers: list[Worker]
) -> None:
    """While one worker runs a call, a second worker never dispatches it, however many
    claim rounds it makes (a run waiting on an effect is never claimable)."""
    wf = _call_wf("slow")
    calls: list[str] = []

    def slow(x: int, idempotency_key: str) -> int:
        calls.append(idempotency_key)
        time.sleep(0.5)
        return x

    client = Runtime(jsonl, [wf])
    for _ in range(2):
        _run(Worker(Runtime(jsonl, [wf], {"work": slow}), poll=0.05, lease=0.1,
                    orphan_after=60), workers)
    _create_running(client, wf, "s1", 7)
    for w in workers:
        w.wake()
    _wait_for(lambda: client.get("s1").status is Status.COMPLETED, timeout=5)
    assert calls == [calls[0]]


def test_a_call_longer_than_orphan_after_on_a_live_worker_is_not_dispatched_again(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """SQLite (a store with ``take``): a call that runs past ``orphan_after`` on a live worker
    is not an orphan - its worker holds and renews the run's lease - so another worker's
    sweeps leave it alone."""
    wf = _call_wf("long-call")
    calls: list[str] = []

    def slow(x: int, idempotency_key: str) -> int:
        calls.append(idempotency_key)
        time.sleep(2.0)  # two leases
        return x

    url = f"sqlite:///{tmp_path / 'wp.db'}"
    client = _sqlite_runtime(tmp_path, wf)
    first = _run(Worker(Runtime(url, [wf], {"work": slow}, home=tmp_path / "home"),
                        poll=0.05, lease=1.0, orphan_after=0.3), workers)
    _create_running(client, wf, "lc", 3)
    first.wake()
    _wait_for(lambda: len(calls) == 1)
    second = _run(Worker(Runtime(url, [wf], {"work": slow}, home=tmp_path / "home"),
                         poll=0.05, lease=1.0, orphan_after=0.3), workers)
    _wait_for(lambda: client.get("lc").status is Status.COMPLETED, timeout=10)
    assert calls == [calls[0]]
    assert second.stats["orphan"] == 0


def test_an_effect_resolved_between_the_sweeps_listing_and_its_take_is_no_orphan(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """SQLite: the sweep lists a call older than ``orphan_after``, and before it takes the
    run's lease the call's live dispatcher (a client holding no lease) commits the outcome
    and finishes the run.  The take still succeeds (a SQL take does whatever the run's
    state), so the sweep reads the run again: it moved since the listing, so the lease goes
    back and nothing is counted or logged as an orphan; the call ran once."""
    wf = _call_wf("resolved-meanwhile")
    keys: list[str] = []
    gate = threading.Event()

    slow = _keyed(keys, gate)
    client = _sqlite_runtime(tmp_path, wf)
    client.register_function("work", slow)
    dispatcher = threading.Thread(target=client.start, args=(wf, 1), kwargs={"run_id": "m1"},
                                  daemon=True)
    dispatcher.start()
    _wait_for(lambda: len(keys) == 1)
    rt = Runtime(f"sqlite:///{tmp_path / 'wp.db'}", [wf], {"work": slow},
                 home=tmp_path / "home")
    real_take = rt.store.take
    took: list[bool] = []

    def take(run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        gate.set()  # the dispatcher returns, commits the outcome and finishes the run
        dispatcher.join(10)
        taken: bool = real_take(run_id, worker, lease, now)
        took.append(taken)
        return taken

    rt.store.take = take  # type: ignore[method-assign]
    worker = _run(Worker(rt, poll=0.05, orphan_after=0.2), workers)
    _wait_for(lambda: bool(took))
    time.sleep(0.3)
    assert took[0] is True
    assert client.get("m1").status is Status.COMPLETED
    assert keys == [keys[0]]
    assert worker.stats["orphan"] == 0
    assert worker.stop(timeout=10)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_run_a_client_thread_drives_is_left_to_it_without_spinning(
    kind: str, tmp_path: Path, workers: list[Worker]
) -> None:
    """A RUNNING run that a client thread of the worker's own process is driving (a node of
    1.5 s) is claimable - it holds no lease - but not stalled.  The worker leaves it to that
    thread: it neither drives it nor claims it again at once, and looks again after a pause
    that doubles.  Before, each claim went to a pool thread whose ``recover_run`` returned at
    once, and the loop claimed the run again: 7,500 claims/s for as long as the node ran."""
    wf = Workflow(f"busy-{kind}")
    ran: list[int] = []

    @wf.node(start=True)
    def first(run: RunView) -> Any:
        return goto("slow")

    @wf.node
    def slow(run: RunView) -> Any:
        ran.append(1)
        time.sleep(1.5)
        return done(1)

    rt = _sqlite_runtime(tmp_path, wf) if kind == "sqlite" else Runtime("memory:", [wf])
    worker = _run(Worker(rt, concurrency=1, poll=0.2), workers)
    client = threading.Thread(target=rt.start, args=(wf, None), kwargs={"run_id": "b"})
    client.start()
    client.join(10)
    assert rt.get("b").status is Status.COMPLETED
    assert ran == [1]
    assert worker.stats["claim"] == 0 and worker.stats["resume"] == 0
    assert 1 <= worker.stats["busy"] <= 20, worker.stats


def test_two_sweepers_dispatch_an_orphan_once(tmp_path: Path, workers: list[Worker]) -> None:
    """SQLite: a call whose dispatcher is gone (here: a client stuck in it, holding no
    lease) is dispatched again by exactly one of two sweeping workers - the one that takes
    the run's lease."""
    wf = _call_wf("orphan-twice")
    keys: list[str] = []
    gate = threading.Event()

    def hang(x: int, idempotency_key: str) -> int:
        keys.append(idempotency_key)
        gate.wait()
        return x

    def work(x: int, idempotency_key: str) -> int:
        keys.append(idempotency_key)
        time.sleep(0.3)  # long enough for the other sweeper to find it still waiting
        return x * 10

    url = f"sqlite:///{tmp_path / 'wp.db'}"
    dead = _sqlite_runtime(tmp_path, wf)
    dead.register_function("work", hang)
    threading.Thread(target=dead.start, args=(wf, 1), kwargs={"run_id": "o2"},
                     daemon=True).start()
    _wait_for(lambda: len(keys) == 1)
    sweepers = [_run(Worker(Runtime(url, [wf], {"work": work}, home=tmp_path / "home"),
                            poll=0.05, orphan_after=0.2), workers) for _ in range(2)]
    _wait_for(lambda: dead.store.load("o2").status is Status.COMPLETED, timeout=10)
    time.sleep(0.5)
    assert len(keys) == 2 and keys[0] == keys[1]
    assert sum(w.stats["orphan"] for w in sweepers) == 1
    gate.set()


def _daily_cron_a_minute_ago() -> str:
    """A daily schedule whose latest tick was about a minute ago: it has a missed tick to
    catch up (or skip), and its next tick is a day away, so no real tick can fall due while
    a test runs (``*/5`` did once, at 15:50:00, and the skip test saw that tick's run)."""
    ago = datetime.now(UTC) - timedelta(minutes=1)
    return f"{ago.minute} {ago.hour} * * *"


def test_cron_tick_fired_by_two_workers_starts_one_run(
    jsonl: str, workers: list[Worker]
) -> None:
    """Two workers catching up the same missed tick (``run_once``) start one run with the
    tick's deterministic id; the other sees ``RunExists`` and counts a skip."""
    wf = _call_wf("cronned")
    fn = {"work": lambda x: x}
    pair = [Worker(Runtime(jsonl, [wf], fn), poll=5) for _ in range(2)]
    cron = _daily_cron_a_minute_ago()
    for w in pair:
        w.schedule(wf, cron, input=3)
        _run(w, workers)
    now = datetime.now(UTC)
    tick = pair[0]._schedules[0].last_tick(now)
    assert tick is not None
    run_id = f"cron:cronned:{tick.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    _wait_for(lambda: sum(w.stats["cron.started"] + w.stats["cron.skipped"] for w in pair) == 2)
    assert sum(w.stats["cron.started"] for w in pair) == 1
    rt = pair[0].runtime
    _wait_for(lambda: rt.get(run_id).status is Status.COMPLETED)
    assert [s.run_id for s in rt.list()] == [run_id]


def test_cron_skip_policy_fires_no_missed_tick(jsonl: str, workers: list[Worker]) -> None:
    """With ``missed="skip"`` a starting worker fires no tick from before it started."""
    wf = _call_wf("skipped")
    worker = Worker(Runtime(jsonl, [wf], {"work": lambda x: x}), poll=5)
    worker.schedule(wf, _daily_cron_a_minute_ago(), missed="skip")
    _run(worker, workers)
    time.sleep(0.3)
    assert worker.runtime.list() == []
    assert worker._next_tick[0] > datetime.now(UTC)


def test_stop_lets_the_current_drive_finish_and_releases_leases(
    jsonl: str, workers: list[Worker]
) -> None:
    """``stop()`` waits for a call in progress, commits its outcome and the nodes after it,
    and gives the lease back so that another worker could claim at once."""
    wf = _call_wf("graceful")
    started = threading.Event()

    def slow(x: int) -> int:
        started.set()
        time.sleep(0.3)
        return x

    rt = Runtime(jsonl, [wf], {"work": slow})
    worker = Worker(rt, poll=5)
    thread = worker.run_in_thread()
    _create_running(rt, wf, "g1", 5)
    worker.wake()
    assert started.wait(5)
    assert worker.stop(timeout=5)
    thread.join(5)
    assert rt.get("g1").status is Status.COMPLETED
    assert worker.stats["resume"] == 1
    lease_dir = Path(jsonl.removeprefix("jsonl:")) / "leases"
    assert list(lease_dir.glob("*.json")) == []


def _sqlite_runtime(tmp_path: Path, wf: Workflow) -> Runtime:
    from wakepoint.stores.sql import SqlStore

    return Runtime(SqlStore(f"sqlite:///{tmp_path / 'wp.db'}", upgrade=True), [wf],
                   home=tmp_path / "home")


def _long_drive(
    tmp_path: Path, workers: list[Worker], name: str, lease: float, hold: Callable[[], Any]
) -> tuple[Runtime, Worker]:
    """A SQLite runtime whose one RUNNING run ``long`` has a node that calls ``hold()``, and a
    worker with ``lease`` driving it; returns once the node runs."""
    wf = Workflow(name)
    entered = threading.Event()

    @wf.node(start=True)
    def crawl(run: RunView) -> Any:
        entered.set()
        hold()
        return done(1)

    rt = _sqlite_runtime(tmp_path, wf)
    _create_running(rt, wf, "long", None)
    worker = _run(Worker(rt, lease=lease, poll=5), workers)
    assert entered.wait(5)
    return rt, worker


def _steal(rt: Runtime, until: Callable[[], bool]) -> list[Any]:
    """What another worker's claims, polling every 50 ms, get until ``until()``."""
    stolen: list[Any] = []
    while not until():
        stolen += rt.store.claim(datetime.now(UTC), "thief", timedelta(seconds=5), 10)
        time.sleep(0.05)
    return stolen


def test_a_live_worker_renews_the_lease_of_a_long_drive(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """A node that runs for three leases keeps its run: the worker renews the lease while it
    drives, so another claimer polling all along never gets the run, and no lease is lost.
    The lease is 1 s (renewed every 1/3 s), so only a renewal more than 2/3 s late - not a
    mere stall of a loaded machine - would let the thief in."""
    rt, worker = _long_drive(tmp_path, workers, "long-node", 1.0, lambda: time.sleep(3.0))
    stolen = _steal(rt, lambda: rt.get("long").status is not Status.RUNNING)
    assert stolen == []
    assert rt.get("long").status is Status.COMPLETED
    assert worker.stats["lease.lost"] == 0


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_lease_taken_over_is_reported_once(
    kind: str, tmp_path: Path, workers: list[Worker]
) -> None:
    """When another worker claims the run after the lease ran out (here: a claim dated an
    hour ahead, as a worker with a clock jump or a long-suspended owner would see it), the
    worker logs ``lease.lost`` once - at the refused renewal, or (a store without ``renew``)
    when the drive ends past its lease - and the drive still completes (the store's seq
    check keeps its commits single)."""
    wf = Workflow("taken-node")
    holder: list[Any] = []

    @wf.node(start=True)
    def crawl(run: RunView) -> Any:
        store = holder[0]
        assert store.claim(datetime.now(UTC) + timedelta(hours=1), "thief",
                           timedelta(hours=2), 10)
        time.sleep(0.6)
        return done(1)

    rt = _sqlite_runtime(tmp_path, wf) if kind == "sqlite" else Runtime("memory:", [wf])
    holder.append(rt.store)
    _create_running(rt, wf, "taken", None)
    worker = _run(Worker(rt, lease=0.3, poll=5), workers)
    _wait_for(lambda: rt.get("taken").status is Status.COMPLETED)
    _wait_for(lambda: worker.stats["lease.lost"] == 1)
    time.sleep(0.2)
    assert worker.stats["lease.lost"] == 1


def test_recover_run_leaves_an_unresolved_effect_alone_unless_asked(tmp_path: Path) -> None:
    """``recover_run`` re-dispatches a pending effect only with ``redispatch=True``."""
    wf = _call_wf("pending")
    store = MemoryStore()
    gate = threading.Event()
    seen: list[int] = []

    def hang(x: int) -> int:
        seen.append(x)
        gate.wait()
        return x

    dead = Runtime(store, [wf], {"work": hang})
    threading.Thread(target=dead.start, args=(wf, 2), kwargs={"run_id": "p1"},
                     daemon=True).start()
    _wait_for(lambda: seen == [2])
    rt = Runtime(store, [wf], {"work": lambda x: x + 1}, signer=dead.signer)
    assert rt.recover_run("p1").status is Status.WAITING
    assert rt.recover_run("p1", redispatch=True).output == 3
    gate.set()


def test_constructor_refuses_bad_settings() -> None:
    """Zero concurrency, lease or poll are refused."""
    rt = Runtime("memory:", [timer_wf])
    for bad in ({"concurrency": 0}, {"lease": 0}, {"poll": -1}):
        with pytest.raises(ValueError):
            Worker(rt, **bad)


def test_load_app_accepts_an_app_a_workflow_a_list_or_a_factory() -> None:
    """``--app module:attribute`` resolves to an App from each accepted shape."""
    mod = "wakepoint_test_worker_app"
    module = type(sys)(mod)
    module.app = App(workflows=[timer_wf])  # type: ignore[attr-defined]
    module.wf = timer_wf  # type: ignore[attr-defined]
    module.wfs = [timer_wf]  # type: ignore[attr-defined]
    module.factory = lambda: [timer_wf]  # type: ignore[attr-defined]
    module.bad = 3  # type: ignore[attr-defined]
    sys.modules[mod] = module
    try:
        for attr in ("app", "wf", "wfs", "factory"):
            assert list(load_app(f"{mod}:{attr}").workflows) == [timer_wf]
        for spec in (f"{mod}:bad", mod, f":{mod}"):
            with pytest.raises(ValueError):
                load_app(spec)
    finally:
        del sys.modules[mod]


APP_SOURCE = '''
from wakepoint import Workflow, wait_until, done
wf = Workflow("proc")
@wf.node(start=True)
def a(run):
    return wait_until(run.input, then="b")
@wf.node
def b(run):
    return done(1)
'''


def test_sigterm_stops_a_worker_process_cleanly(tmp_path: Path) -> None:
    """``main_worker`` in a process: SIGTERM makes it stop and exit with status 0."""
    (tmp_path / "procapp.py").write_text(APP_SOURCE)
    code = ("import sys; from wakepoint.scheduler import main_worker; "
            "print('ready', flush=True); "
            f"sys.exit(main_worker('jsonl:{tmp_path / 'store'}', 'procapp:wf', 2))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=tmp_path)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        # The worker logs worker.started once its SIGTERM handler is in place; a signal sent
        # before would end the process by the default action.
        lines = []
        for line in child.stdout:
            lines.append(line)
            if "worker.started" in line:
                break
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=10)
        out = "".join(lines) + out
    finally:  # a failure must not leave the child to a later test's garbage collection
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0
    assert "worker.stopping" in out and "worker.stopped" in out


LOCKED_LOGGER_MAIN = """
import os, signal, sys, threading
import structlog
from wakepoint.scheduler import main_worker

lock = threading.Lock()


class Locked:
    # Like structlog's PrintLogger: one lock per file, held while the line is written.
    def msg(self, message):
        with lock:
            print(message, flush=True)
            if "worker.started" in message:
                os.kill(os.getpid(), signal.SIGTERM)  # delivered while the lock is held
                for _ in range(10000):
                    pass  # the Python-level handler runs between these bytecodes

    def __getattr__(self, name):
        return self.msg


structlog.configure(logger_factory=lambda *args: Locked())
sys.exit(main_worker(sys.argv[1], "procapp:wf", 2))
"""


def test_sigterm_while_the_main_thread_logs_stops_the_worker(tmp_path: Path) -> None:
    """A SIGTERM that arrives while the worker's main thread holds its logger's lock (here:
    right after the ``worker.started`` line, inside the lock, as structlog's PrintLogger
    holds it) still stops the worker: the signal is handled on a thread of its own.  The
    handler used to log on the main thread, waited for the lock it interrupted, and hung
    the process (seen once in CI when the SIGTERM test signalled right after that line)."""
    (tmp_path / "procapp.py").write_text(APP_SOURCE)
    (tmp_path / "locked_main.py").write_text(LOCKED_LOGGER_MAIN)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    child = subprocess.run([sys.executable, "locked_main.py", f"jsonl:{tmp_path / 'store'}"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=20,
                           check=False)  # hung before the fix: TimeoutExpired
    assert child.returncode == 0, child.stderr
    assert "worker.stopping" in child.stdout and "worker.stopped" in child.stdout

def test_an_idle_worker_covers_the_last_records_with_a_checkpoint(
    workers: list[Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records committed right after a checkpoint (within the runtime's minimum interval)
    are covered by one the worker writes before it sleeps, without a further commit or
    close(): the store's last checkpoint grows to every record within a few polls.  The
    interval is 2 s here, not 0.5 s, so that a stalled machine still starts the second run
    within it."""
    from wakepoint import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "_CHECKPOINT_MIN_INTERVAL", 2.0)
    store = MemoryStore()
    rt = Runtime(store, [timer_wf], checkpoint_seconds=3600)
    rt.start(timer_wf, 0.0, run_id="first")  # its end writes the first checkpoint at once
    rt.start(timer_wf, 0.0, run_id="second")  # too soon after it: left pending
    total = len(rt.ledger("first")) + len(rt.ledger("second"))

    def covered() -> int:
        notes = store.checkpoints()
        return int(notes[-1].splitlines()[1]) if notes else 0

    assert covered() == len(rt.ledger("first"))
    _run(Worker(rt, concurrency=1, poll=0.1), workers)
    _wait_for(lambda: covered() == total, timeout=10)


hops_wf = Workflow("hops")


@hops_wf.node(start=True)
def hop(run: RunView) -> Any:
    # Five timers due at once (each resolved by the drive that commits it), then done.
    n = run.vars.get("n", 0)
    if n == 5:
        return done(n)
    return wait_until(0, then="count")


@hops_wf.node
def count(run: RunView) -> Any:
    from wakepoint import goto

    return goto("hop", set={"n": run.vars.get("n", 0) + 1})


def test_a_busy_worker_spares_the_store_and_the_alarm(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """Driving runs whose timers are due at once: the worker asks the store for the next
    deadline only when its alarm rang or the poll is due (not after every claim round),
    never re-arms the alarm for a deadline already due, and sends no ``release`` for a run
    it drove to its end (the SQL store's finishing commit ended the lease)."""
    from wakepoint.stores.sql import SqlStore

    store = SqlStore(f"sqlite:///{tmp_path / 'wp.db'}", upgrade=True)
    rt = Runtime(store, [hops_wf], home=tmp_path / "home")
    calls: dict[str, int] = {"next_deadline": 0, "release": 0, "arm": 0}
    real_next, real_release = store.next_deadline, store.release

    def next_deadline(after: datetime) -> datetime | None:
        calls["next_deadline"] += 1
        return real_next(after)

    def release(run_id: str, worker: str) -> None:
        calls["release"] += 1
        real_release(run_id, worker)

    store.next_deadline = next_deadline  # type: ignore[method-assign]
    store.release = release  # type: ignore[method-assign]
    for i in range(30):
        _create_running(rt, hops_wf, f"h{i}", None)
    worker = Worker(rt, concurrency=2, poll=30)
    real_set = worker._alarm._set

    def counted_set(at: datetime) -> None:
        calls["arm"] += 1
        real_set(at)

    worker._alarm._set = counted_set  # type: ignore[method-assign]
    _run(worker, workers)
    _wait_for(lambda: len(rt.list(status=Status.COMPLETED)) == 30)
    assert worker.stats["resume"] == 30
    assert calls["release"] == 0
    # At start-up, the poll, and rounds racing them - a few, never one per claim round (30
    # runs, 2 threads: 15 rounds and more).  A bound of 3 failed once on a loaded machine.
    assert calls["next_deadline"] <= 6, calls
    assert calls["arm"] <= 6, calls


def test_a_deadline_already_due_from_a_client_thread_is_claimed_at_once(
    workers: list[Worker],
) -> None:
    """A client thread of the worker's process commits a wait whose deadline has passed
    (the drive parks it: no one resolves it in that drive): the worker fires it within a
    few COALESCE periods, not at the 30 s poll."""
    from wakepoint import wait_event

    late_wf = Workflow("late-event")

    @late_wf.node(start=True)
    def park(run: RunView) -> Any:
        return wait_event("never", into="got", then="after",
                          deadline=run.now - timedelta(seconds=1), on_timeout="after")

    @late_wf.node
    def after(run: RunView) -> Any:
        return done(run.vars["got"])

    rt = Runtime("memory:", [late_wf])
    worker = _run(Worker(rt, concurrency=1, poll=30), workers)
    time.sleep(0.1)  # armed for the poll, asleep
    began = time.monotonic()
    rt.start(late_wf, None, run_id="late")
    _wait_for(lambda: rt.get("late").status is Status.COMPLETED, timeout=5)
    assert time.monotonic() - began < 1.0
    assert rt.get("late").output == {"timed_out": True}
    assert worker.stats["wake"] == 1


# --- store failures, lease edges, shutdown ---------------------------------------------------

_databases = iter(range(1_000_000))


@pytest.fixture
def pg_db(pg_server: Any) -> Iterator[tuple[str, str]]:
    """A fresh database on the session's PostgreSQL server: (SQLAlchemy URL, libpq DSN)."""
    name = f"wk{os.getpid()}_{next(_databases)}"
    url: str = pg_server.create_database(name)
    yield url, pg_server.dsn(name)
    pg_server.drop_database(name)


def _terminate_backends(dsn: str) -> int:
    """End every other connection to the database, as a server restart would."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def test_a_worker_outlives_the_loss_of_its_database_connections(
    pg_db: tuple[str, str], tmp_path: Path, workers: list[Worker]
) -> None:
    """PostgreSQL ends the worker's connections while it runs (pg_terminate_backend: a
    restart, a failover), three times: each time the loop's next store call fails, which is
    logged (``loop.store_failed``, with the error) and counted (``store.failed``), and the
    worker goes on - the store reconnects - driving every timer committed afterwards to its
    end."""
    from structlog.testing import capture_logs
    from wakepoint.stores.sql import SqlStore

    url, dsn = pg_db
    rt = Runtime(SqlStore(url, upgrade=True), [timer_wf], home=tmp_path / "home")
    worker = Worker(rt, poll=0.1)

    def a_timer_completes(run_id: str) -> None:
        # A client of its own each time: the terminations end its connections too.
        client = Runtime(SqlStore(url), [timer_wf], home=tmp_path / "home")
        client.start(timer_wf, 0.05, run_id=run_id)
        _wait_for(lambda: client.get(run_id).status is Status.COMPLETED)
        client.store.close()

    with capture_logs() as logs:
        workers.append(worker)
        thread = worker.run_in_thread()
        a_timer_completes("before")  # the worker is connected
        for i in range(3):
            failed = worker.stats["store.failed"]
            assert _terminate_backends(dsn) >= 1
            _wait_for(lambda: worker.stats["store.failed"] > failed)  # noqa: B023
            a_timer_completes(f"after{i}")
        assert thread.is_alive()
    failures = [e for e in logs if e["event"] == "loop.store_failed"]
    assert len(failures) == worker.stats["store.failed"] >= 3
    assert all(e["error"] and e["log_level"] == "warning" for e in failures)


def test_a_run_finished_before_its_drive_returns_is_no_lost_lease(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """The SQL store's commit that finishes a run ends its lease, while the run stays the
    worker's until its drive returns.  Here the drive is held open after that commit until
    a renewal round has been refused, then past the lease: neither the refusal nor the
    drive's end past the lease is reported as ``lease.lost``."""
    wf = Workflow("finish-gap")

    @wf.node(start=True)
    def only(run: RunView) -> Any:
        return done(1)

    rt = _sqlite_runtime(tmp_path, wf)
    store: Any = rt.store
    finished = threading.Event()
    refused_after_finish = threading.Event()
    real_commit, real_renew = store.commit, store.renew

    def commit(run_id: str, expected: int, state: Any, records: Any) -> None:
        real_commit(run_id, expected, state, records)
        if state.status.finished:
            finished.set()
            refused_after_finish.wait(10)
            time.sleep(0.4)  # the lease (0.3 s) runs out before the drive returns

    def renew(run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        after = finished.is_set()
        renewed: bool = real_renew(run_id, worker, lease, now)
        if after and not renewed:
            refused_after_finish.set()
        return renewed

    store.commit, store.renew = commit, renew
    _create_running(rt, wf, "gap", None)
    worker = _run(Worker(rt, lease=0.3, poll=5), workers)
    _wait_for(refused_after_finish.is_set)
    assert worker.stop(timeout=10)  # once the drive has returned
    assert rt.get("gap").status is Status.COMPLETED
    assert worker.stats["lease.lost"] == 0


def test_a_stopping_worker_keeps_renewing_the_lease_of_the_drive_it_finishes(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """``stop()`` during a drive longer than the lease: while the worker waits for the drive
    to end, it still renews the run's lease, so another claimer polling all along gets
    nothing; then the drive completes and the worker stops."""
    gate = threading.Event()
    rt, worker = _long_drive(tmp_path, workers, "stop-long", 1.0, lambda: gate.wait(15))
    assert not worker.stop(wait=False)
    end = time.monotonic() + 3.2  # more than three leases (1 s: room for a late renewal)
    stolen = _steal(rt, lambda: time.monotonic() >= end)
    gate.set()
    assert worker.stop(timeout=10)
    assert stolen == []
    assert rt.get("long").status is Status.COMPLETED
    assert worker.stats["lease.lost"] == 0


def test_an_orphan_taken_by_a_worker_that_claimed_nothing_keeps_its_lease(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """SQLite: a worker whose first and only run is an orphan its sweep took (it claimed
    nothing before) renews that run's lease while the call it dispatched again runs for
    more than three leases, so no other sweeper can take the run meanwhile."""
    wf = _call_wf("orphan-renewed")
    keys: list[str] = []
    dead_gate, gate = threading.Event(), threading.Event()

    hang, work = _keyed(keys, dead_gate), _keyed(keys, gate, 10)

    dead = _sqlite_runtime(tmp_path, wf)
    dead.register_function("work", hang)
    threading.Thread(target=dead.start, args=(wf, 1), kwargs={"run_id": "o3"},
                     daemon=True).start()
    _wait_for(lambda: len(keys) == 1)
    url = f"sqlite:///{tmp_path / 'wp.db'}"
    worker = _run(Worker(Runtime(url, [wf], {"work": work}, home=tmp_path / "home"),
                         poll=0.05, lease=1.0, orphan_after=0.2), workers)
    _wait_for(lambda: len(keys) == 2)
    taken = []
    end = time.monotonic() + 3.2  # more than three leases (1 s: room for a late renewal)
    while time.monotonic() < end:
        taken.append(dead.store.take("o3", "thief", timedelta(seconds=5), datetime.now(UTC)))
        time.sleep(0.05)
    gate.set()
    _wait_for(lambda: dead.store.load("o3").status is Status.COMPLETED)
    assert not any(taken)
    assert worker.stats["orphan"] == 1 and worker.stats["lease.lost"] == 0
    dead_gate.set()


def test_a_stopping_worker_gives_back_at_once_the_lease_of_a_drive_it_never_began(
    tmp_path: Path, workers: list[Worker]
) -> None:
    """SQLite, one thread: the sweep takes an orphan while the thread drives a long run, so
    the orphan's drive waits in the pool's queue.  ``stop()`` cancels that drive and gives
    its lease back at once - another worker can take the run while this one still finishes
    the long drive (whose lease it keeps renewing) - and the stopping worker never
    dispatches the orphan's call."""
    long_wf = Workflow("long-first")
    orphan_wf = _call_wf("queued-orphan")
    entered, gate, dead_gate = threading.Event(), threading.Event(), threading.Event()
    keys: list[str] = []

    @long_wf.node(start=True)
    def crawl(run: RunView) -> Any:
        entered.set()
        gate.wait(10)
        return done(1)

    hang = _keyed(keys, dead_gate)

    def work(x: int, idempotency_key: str) -> int:
        keys.append(idempotency_key)
        return x

    dead = _sqlite_runtime(tmp_path, orphan_wf)
    dead.register_function("work", hang)
    threading.Thread(target=dead.start, args=(orphan_wf, 1), kwargs={"run_id": "o4"},
                     daemon=True).start()
    _wait_for(lambda: len(keys) == 1)
    _create_running(dead, long_wf, "long", None)
    time.sleep(0.3)  # the orphan's request is older than orphan_after at start-up
    url = f"sqlite:///{tmp_path / 'wp.db'}"
    rt = Runtime(url, [long_wf, orphan_wf], {"work": work}, home=tmp_path / "home")
    worker = _run(Worker(rt, concurrency=1, lease=5, poll=0.05, orphan_after=0.2), workers)
    assert entered.wait(5)
    _wait_for(lambda: len(worker._inflight) == 2)  # the orphan taken, its drive queued
    assert not dead.store.take("o4", "thief", timedelta(seconds=5), datetime.now(UTC))
    worker.stop(wait=False)
    _wait_for(lambda: dead.store.take("o4", "thief", timedelta(seconds=5),
                                      datetime.now(UTC)), timeout=3)  # lease: 5 s
    assert not dead.store.take("long", "thief", timedelta(seconds=5), datetime.now(UTC))
    gate.set()
    assert worker.stop(timeout=10)
    assert dead.store.load("long").status is Status.COMPLETED
    assert len(keys) == 1 and worker.stats["orphan"] == 0
    dead_gate.set()


def test_a_failed_sweep_is_reported_and_tried_again_at_the_next_round(
    workers: list[Worker],
) -> None:
    """The orphan sweep's listing fails twice (the store unreachable): the worker reports
    each failure (``store.failed``), lives on, and sweeps again at its next rounds - not
    half an ``orphan_after`` (here an hour) later - re-dispatching the orphan."""
    wf = _call_wf("sweep-fails")
    store = MemoryStore()
    keys: list[str] = []
    dead_gate = threading.Event()

    hang = _keyed(keys, dead_gate)

    # The dead dispatcher's clock is two hours behind: its request is older than the hour
    # of orphan_after from the start.
    dead = Runtime(store, [wf], {"work": hang},
                   clock=lambda: datetime.now(UTC) - timedelta(hours=2))
    threading.Thread(target=dead.start, args=(wf, 1), kwargs={"run_id": "o5"},
                     daemon=True).start()
    _wait_for(lambda: len(keys) == 1)
    failures = [OSError("store unreachable")] * 2
    real_list = store.list

    def list_(**filters: Any) -> list[Any]:
        if filters.get("wait_kind") is not None and failures:
            raise failures.pop()
        return real_list(**filters)

    store.list = list_  # type: ignore[method-assign]
    rt = Runtime(store, [wf], {"work": lambda x, idempotency_key: x * 10},
                 signer=dead.signer)
    worker = _run(Worker(rt, poll=0.05, orphan_after=3600), workers)
    _wait_for(lambda: rt.get("o5").status is Status.COMPLETED, timeout=5)
    assert rt.get("o5").output == 10
    assert worker.stats["store.failed"] == 2 and worker.stats["orphan"] == 1
    dead_gate.set()
