"""worker_jsonl: a worker keeps runs moving on the embedded default store (JSONL files).

Runs that sleep with ``wait_until`` are woken by a ``Worker`` on time - no ``wake_due()`` by
hand.  The example starts five reminders due 1.0-1.4 s from now with a worker running in this
process, then "crashes": it stops the worker and closes the runtime while two more reminders
are still asleep.  A new runtime and worker on the same directory (the next process) resume
those at start-up, however overdue.  Lateness is printed per run (resume time - due time).

In production the worker is its own process: ``wakepoint worker --store jsonl:.wakepoint
--app myapp:app``; here it runs in a thread with ``Worker.run_in_thread()``.

Run it:  python examples/worker_jsonl.py
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import datetime

import structlog
from wakepoint import Runtime, RunView, Status, Workflow, done, wait_until
from wakepoint.scheduler import Worker

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

reminder = Workflow("reminder")


@reminder.node(start=True)
def schedule(run: RunView):
    return wait_until(run.input["seconds"], then="remind")


@reminder.node
def remind(run: RunView):
    # run.now: the moment the worker resumed the run (nodes never read the clock themselves).
    return done({"text": run.input["text"], "at": run.now.isoformat()})


def lateness_ms(rt: Runtime, run_id: str, due: datetime) -> float:
    return (datetime.fromisoformat(rt.get(run_id).output["at"]) - due).total_seconds() * 1000


def wait_for(rt: Runtime, ids: list[str], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(rt.get(r).status is Status.COMPLETED for r in ids):
            return True
        time.sleep(0.02)
    return False


def main() -> int:
    due: dict[str, datetime] = {}
    with tempfile.TemporaryDirectory() as home:
        rt = Runtime(workflows=[reminder], home=home)
        worker = Worker(rt)
        worker.run_in_thread()
        for i in range(5):
            state = rt.start(reminder, {"seconds": 1.0 + i / 10, "text": f"r{i}"},
                             run_id=f"r{i}")
            due[state.run_id] = state.wait.deadline
        for i in (5, 6):  # these fall due while "the process is down"
            state = rt.start(reminder, {"seconds": 1.5, "text": f"r{i}"}, run_id=f"r{i}")
            due[state.run_id] = state.wait.deadline
        first = [f"r{i}" for i in range(5)]
        ok = wait_for(rt, first, 5)
        for run_id in first:
            print(f"{run_id}: woken {lateness_ms(rt, run_id, due[run_id]):5.1f} ms after due")
        worker.stop()
        rt.close()
        print("worker stopped and runtime closed with r5, r6 asleep; restarting in 1 s")
        time.sleep(1.0)

        started = time.monotonic()
        with Runtime(workflows=[reminder], home=home) as rt2:
            worker2 = Worker(rt2)
            worker2.run_in_thread()
            ok = wait_for(rt2, ["r5", "r6"], 5) and ok
            took = time.monotonic() - started
            worker2.stop()
            for run_id in ("r5", "r6"):
                print(f"{run_id}: resumed by the new worker "
                      f"{lateness_ms(rt2, run_id, due[run_id]):.0f} ms after due")
            print(f"new worker: both overdue runs done {took:.2f} s after it was created")
            verified = sum(rt2.verify(r) for r in due)
            print(f"ledgers verified: {verified} records in {len(due)} runs")
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
