"""The DBOS driver: the peer workloads (see ``driver_common``) on DBOS Transact for Python.

DBOS's durable default here is its SQLite system database
(``system_database_url="sqlite:///DIR/dbos.db"``): every ``@DBOS.step`` result is recorded
there before the workflow goes on, and ``DBOS.launch()`` recovers this executor's pending
workflows.  DBOS has no in-memory mode (its state *is* the system database), so the linear
workload's ``memory`` store answers ``unsupported``.

* linear: a ``@DBOS.workflow`` calling ten ``@DBOS.step`` functions, each returning one
  small value, started with a direct call (it runs in the calling thread).
* pause: the workflow publishes its question with ``DBOS.set_event`` and waits in
  ``DBOS.recv``; the outside reads the question with ``DBOS.get_event`` (as a UI showing it to
  the person would: the run is then known to be paused), answers with ``DBOS.send``, and
  waits for the result.  Without the ``get_event`` the answer could reach the mailbox before
  the workflow ever waited, which is not a pause.
* crash: ten steps in one workflow; ``DBOS.launch()`` in the restarted process recovers it.
* sleep: ``DBOS.sleep`` (durable: the wake-up time is recorded, and a recovered workflow
  sleeps only for what is left).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import driver_common as common
from dbos import DBOS, DBOSConfig, SetWorkflowID

logging.getLogger("dbos").setLevel(logging.WARNING)


def configure(directory: Path) -> None:
    """Create the DBOS instance on the SQLite system database in ``directory``."""
    config: DBOSConfig = {
        "name": "peers-bench",
        "system_database_url": f"sqlite:///{directory}/dbos.db",
        "log_level": "WARNING",
        "notification_listener_polling_interval_sec": 0.01,
    }
    DBOS(config=config)


def _linear_step(number: int) -> Any:
    @DBOS.step(name=f"linear_{number}")
    def step(previous: int) -> int:
        return number
    return step


LINEAR_STEPS = [_linear_step(i) for i in range(common.NODES)]


@DBOS.workflow(name="linear")
def linear() -> int:
    value = -1
    for step in LINEAR_STEPS:
        value = step(value)
    return value


@DBOS.workflow(name="approval")
def approval() -> Any:
    DBOS.set_event("question", "ok?")
    return DBOS.recv("answer", timeout_seconds=120)


DIRECTORY: list[Path] = []  # set in main(): steps of the crash and sleep workflows use it


def _crash_step(number: int) -> Any:
    @DBOS.step(name=f"crash_{number}")
    def step() -> int:
        common.crash_step(DIRECTORY[0], number)
        return number
    return step


CRASH_STEPS = [_crash_step(i) for i in range(1, common.NODES + 1)]


@DBOS.workflow(name="crash")
def crash() -> int:
    for step in CRASH_STEPS:
        step()
    return common.NODES


@DBOS.step(name="note_due")
def note_due(seconds: float) -> None:
    common.record_due(DIRECTORY[0], time.time() + seconds)


@DBOS.step(name="after_sleep")
def after_sleep() -> None:
    common.record_woke(DIRECTORY[0])


@DBOS.workflow(name="sleeper")
def sleeper(seconds: float) -> None:
    note_due(seconds)
    DBOS.sleep(seconds)
    after_sleep()


def main() -> None:
    args = common.parse()
    directory = args.dir.resolve()
    DIRECTORY.append(directory)
    if args.workload == "linear" and args.store != "sqlite":
        common.finish(unsupported="DBOS has no in-memory or file store: its state is the "
                                  "system database (SQLite or PostgreSQL)")
    configure(directory)
    DBOS.launch()
    ready = time.time()
    if args.workload == "linear":
        results: list[int] = []

        def drive() -> None:
            for _ in range(args.runs):
                results.append(linear())

        wall, cpu = common.timed(drive)
        common.finish(steps=args.runs * common.NODES,
                      completed=sum(r == common.NODES - 1 for r in results), wall=wall, cpu=cpu)
    elif args.workload == "pause":
        answers: list[Any] = []

        def cycle() -> None:
            for _ in range(args.runs):
                handle = DBOS.start_workflow(approval)
                workflow_id = handle.get_workflow_id()
                assert DBOS.get_event(workflow_id, "question", timeout_seconds=60) == "ok?"
                DBOS.send(workflow_id, "yes", "answer")
                answers.append(handle.get_result())

        wall, cpu = common.timed(cycle)
        common.finish(cycles=args.runs, completed=answers.count("yes"), wall=wall, cpu=cpu)
    elif args.workload == "crash":
        if args.phase == "start":
            with SetWorkflowID("crash"):
                crash()
            common.finish(error="step 5 did not kill the process")
        # launch() has already started recovering the pending workflow in the background.
        result = DBOS.retrieve_workflow("crash").get_result()
        common.finish(done_at=time.time(), **common.readiness(ready),
                      completed=result == common.NODES)
    else:
        if args.phase == "start":
            with SetWorkflowID("sleeper"):
                DBOS.start_workflow(sleeper, args.seconds)
            if not common.wait_for_file(directory / "due", 30):
                common.finish(error="the sleep never started")
            common.die_after(args.kill_after)
        DBOS.retrieve_workflow("sleeper").get_result()
        common.finish(done_at=time.time(), **common.readiness(ready),
                      completed=(directory / "woke").exists(),
                      mechanism="DBOS.sleep, recovered by DBOS.launch()")


if __name__ == "__main__":
    main()
