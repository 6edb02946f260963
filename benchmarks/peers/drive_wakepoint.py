"""The wakepoint driver: the peer workloads (see ``driver_common``) on wakepoint's public API.

Stores: ``memory:``, ``sqlite:///DIR/wakepoint.db`` and ``jsonl:DIR/jsonl``, all with the
default ``batch`` durability and signed ledger records (nothing is switched off for speed);
``--durability sync`` (the harness's ``wakepoint-sync`` variant) makes every commit durable
before it returns (SQLite ``synchronous=FULL``), as DBOS's and LangGraph's SQLite defaults do.
The linear and ask-user workflows are ``bench_core``'s, so these figures and that script's
measure the same thing.  Recovery is what a user would run after a crash: a new
``Runtime(...).recover()`` for the crash workload, and the real ``Worker`` (which recovers at
start and wakes timers with its alarm clock) for the sleep workload.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import driver_common as common
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench_core, one level up
from bench_core import approval, linear
from wakepoint import Runtime, RunView, Status, Workflow, done, goto, wait_until
from wakepoint.stores import Store
from wakepoint.stores import open_store as open_url
from wakepoint.stores.base import Durability

# The application owns logging (the library never configures it): warnings only, as the
# other benchmarks do, so that log formatting is not what is measured.
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    cache_logger_on_first_use=True,
)


DURABILITY: list[Durability] = ["batch"]  # main() sets it from --durability


def open_store(store: str, directory: Path) -> Store | str:
    """The store of a ``--store`` name (SQLite: created on first open, as a user would)."""
    if store == "sqlite":
        from wakepoint.stores.sql import SqlStore  # SQLAlchemy only where it is used

        return SqlStore(f"sqlite:///{directory}/wakepoint.db", upgrade=True,
                        durability=DURABILITY[0])
    if store == "jsonl":
        return open_url(f"jsonl:{directory}/jsonl", durability=DURABILITY[0])
    return "memory:"


def crash_workflow(directory: Path) -> Workflow:
    """Ten steps; each logs its execution, step 5 kills the process the first time."""
    wf = Workflow("crash")
    for number in range(1, common.NODES + 1):
        def node(run: RunView, number: int = number):  # type: ignore[no-untyped-def]
            common.crash_step(directory, number)
            if number == common.NODES:
                return done({"steps": number})
            return goto(f"s{number + 1}", set={"i": number})
        wf.node(node, start=(number == 1), name=f"s{number}")
    return wf


def sleep_workflow(directory: Path, seconds: float) -> Workflow:
    """Sleep durably for ``seconds``, then note the wall-clock time the next step ran."""
    wf = Workflow("sleeper")

    @wf.node(start=True)
    def nap(run: RunView):  # type: ignore[no-untyped-def]
        return wait_until(seconds, then="after")

    @wf.node
    def after(run: RunView):  # type: ignore[no-untyped-def]
        common.record_woke(directory)
        return done(None)

    return wf


def main() -> None:
    args = common.parse()
    args.dir = args.dir.resolve()
    if args.durability is not None:
        if args.durability not in ("sync", "batch", "none"):
            common.finish(error=f"wakepoint has no durability {args.durability!r}")
        DURABILITY[0] = args.durability
    home = args.dir / "home"
    if args.workload == "linear":
        rt = Runtime(open_store(args.store, args.dir), [linear()], home=home)

        def drive() -> None:
            for _ in range(args.runs):
                rt.start("linear")
            rt.store.flush()

        wall, cpu = common.timed(drive)
        completed = len(rt.list(status=Status.COMPLETED))
        rt.close()
        common.emit(steps=args.runs * common.NODES, completed=completed, wall=wall, cpu=cpu)
    elif args.workload == "pause":
        rt = Runtime(open_store("sqlite", args.dir), [approval()], home=home)

        def cycle() -> None:
            for _ in range(args.runs):
                state = rt.start("approval")
                assert state.status is Status.WAITING  # paused for the person
                rt.respond(state.run_id, "yes")
            rt.store.flush()

        wall, cpu = common.timed(cycle)
        completed = len(rt.list(status=Status.COMPLETED))
        rt.close()
        common.emit(cycles=args.runs, completed=completed, wall=wall, cpu=cpu)
    elif args.workload == "crash":
        wf = crash_workflow(args.dir)
        if args.phase == "start":
            Runtime(open_store("sqlite", args.dir), [wf], home=home).start(wf, run_id="crash")
            common.finish(error="step 5 did not kill the process")
        rt = Runtime(open_store("sqlite", args.dir), [wf], home=home)
        ready = time.time()
        rt.recover()
        state = rt.get("crash")
        common.finish(done_at=time.time(), **common.readiness(ready),
                      completed=state.status is Status.COMPLETED)
    else:
        wf = sleep_workflow(args.dir, args.seconds)
        if args.phase == "start":
            rt = Runtime(open_store("sqlite", args.dir), [wf], home=home)
            state = rt.start(wf, run_id="sleeper")
            assert state.wait is not None and state.wait.deadline is not None
            common.record_due(args.dir, state.wait.deadline.timestamp())
            common.die_after(args.kill_after)
        from wakepoint.scheduler import Worker

        rt = Runtime(open_store("sqlite", args.dir), [wf], home=home)
        Worker(rt).run_in_thread()  # recovers at start, then its alarm wakes the timer
        ready = time.time()
        woke = common.wait_for_file(args.dir / "woke", args.seconds + 30)
        common.finish(done_at=time.time(), **common.readiness(ready), completed=woke,
                      mechanism="Worker: recover at start + APScheduler alarm at the due time")


if __name__ == "__main__":
    main()
