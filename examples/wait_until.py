"""wait_until: a run sleeps durably until a time, and wakes in a runtime that was reopened.

``wait_until(seconds_or_datetime, then=...)`` parks the run with a due time stored in the run
itself, not in memory: this example starts the run, closes its runtime (as a process exit
would), opens a new one on the same store, asks it for ``next_due()``, waits until then, and
calls ``wake_due()``, which fires every due timer.  In production the scheduler's alarm clock
does those last two steps.

The store is the embedded default (JSONL files and a signing key) in a temporary directory.

Run it:  python examples/wait_until.py
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import UTC, datetime

import structlog
from wakepoint import Runtime, RunView, Status, Workflow, done, wait_until

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

reminder = Workflow("reminder")


def hms(moment: datetime) -> str:
    """A time of day to the millisecond."""
    return moment.strftime("%H:%M:%S.%f")[:-3]


@reminder.node(start=True)
def schedule(run: RunView):
    return wait_until(run.input["seconds"], then="remind")


@reminder.node
def remind(run: RunView):
    # run.now is the time the runtime hands the node (nodes never read the clock themselves).
    return done(f"reminder: {run.input['text']} (sent at {hms(run.now)})")


def main() -> int:
    with tempfile.TemporaryDirectory() as home:
        with Runtime(workflows=[reminder], home=home) as rt:
            started = time.monotonic()
            state = rt.start(reminder, {"seconds": 1.0, "text": "stand up"}, run_id="remind-1")
            assert state.wait is not None
            print(f"run {state.run_id}: {state.status.value} ({state.wait.kind}) until "
                  f"{hms(state.wait.deadline)}")
        print("runtime closed; opening a new one on the same store")

        with Runtime(workflows=[reminder], home=home) as rt:
            due = rt.next_due()
            assert due is not None
            print(f"next_due(): {hms(due)}")
            print(f"woken before it is due: {len(rt.wake_due())} run(s)")
            time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()))
            woken = rt.wake_due()
            state = rt.get("remind-1")
            elapsed = time.monotonic() - started
            print(f"woken when due: {len(woken)} run(s); {state.run_id}: {state.status.value}")
            print(f"output: {state.output}")
            print(f"slept {elapsed:.1f} s; ledger verified: {rt.verify(state.run_id)} records")
            ok = state.status is Status.COMPLETED and elapsed >= 1.0 and len(woken) == 1
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
