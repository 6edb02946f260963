"""The worker process of the multi-process worker tests and of ``benchmarks/bench_worker.py``.

    python worker_proc.py STORE_URL HOME SIDE_FILE [--concurrency N] [--lease S] [--poll S]
                          [--orphan-after S] [--call-ms MS]

runs ``scheduler.main_worker`` on the store for the app ``app(SIDE_FILE)``: one workflow,
``steps`` (10 transitions per run, plus start and end), alternating timers (``wait_until``
0-``TIMER_MS`` ms) and ``call("work", ...)`` effects.  ``work`` sleeps ``--call-ms`` and then
appends ``<idempotency key> <pid>\\n`` to SIDE_FILE with ``O_APPEND`` and fsyncs it before
returning: the side file is the outside world, where the tests count how often each call ran
and which process ran it.  The process prints ``ready <pid>`` once the worker loop is about to
start, and exits 0 after SIGTERM.

The tests import this file by path for ``build_workflow``, ``expected_output`` and
``read_side``.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

WORKFLOW_ID = "steps"
STAGES = 5
"""Each stage is a timer then a call: 2 effects, 4 records, 10 stages' worth of transitions."""
TIMER_MS = int(os.environ.get("WAKEPOINT_TIMER_MS", "200"))
"""Timers last 0..TIMER_MS ms (the throughput benchmark sets 0: every timer is due at once)."""


FSYNC = os.environ.get("WAKEPOINT_SIDE_FSYNC", "1") == "1"
"""Whether ``work`` fsyncs the side file (the scaling benchmark turns it off: it measures
the workers, not the disk)."""


def build_workflow() -> Any:
    from wakepoint import RunView, Workflow, call, done, wait_until

    wf = Workflow(WORKFLOW_ID)

    @wf.node(start=True)
    def begin(run: RunView) -> Any:
        return wait_until(_delay(run.run_id, 0), then="s0_call")

    def make(stage: int) -> None:
        def stage_call(run: RunView) -> Any:
            acc = run.vars.get("acc", run.input)
            return call("work", {"stage": stage, "acc": acc}, into="acc",
                        then=f"s{stage}_timer")

        def stage_timer(run: RunView) -> Any:
            if stage == STAGES - 1:
                return done({"acc": run.vars["acc"]})
            return wait_until(_delay(run.run_id, stage + 1), then=f"s{stage + 1}_call")

        wf.node(stage_call, name=f"s{stage}_call")
        wf.node(stage_timer, name=f"s{stage}_timer")

    for stage in range(STAGES):
        make(stage)
    return wf


def _delay(run_id: str, stage: int) -> float:
    # Deterministic per run and stage, spread over 0..TIMER_MS: timers fall due all the time.
    return (zlib.crc32(f"{run_id}:{stage}".encode()) % (TIMER_MS + 1)) / 1000


def expected_output(input: int) -> dict[str, Any]:
    acc = input
    for stage in range(STAGES):
        acc = acc * 3 + stage
    return {"acc": acc}


def make_work(side: Path, call_ms: float) -> Any:
    def work(stage: int, acc: int, idempotency_key: str) -> int:
        time.sleep(call_ms / 1000)
        fd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{idempotency_key} {os.getpid()}\n".encode())
            if FSYNC:
                os.fsync(fd)
        finally:
            os.close(fd)
        return acc * 3 + stage

    return work


def read_side(side: Path) -> tuple[Counter[str], dict[str, list[int]]]:
    """How often each idempotency key ran, and the pids that ran it."""
    counts: Counter[str] = Counter()
    pids: dict[str, list[int]] = {}
    if side.exists():
        for line in side.read_text().splitlines():
            key, pid = line.split()
            counts[key] += 1
            pids.setdefault(key, []).append(int(pid))
    return counts, pids


def main() -> int:
    import structlog
    from wakepoint.scheduler import App, main_worker

    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("home")
    parser.add_argument("side")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--orphan-after", type=float, default=3.0)
    parser.add_argument("--call-ms", type=float, default=5.0)
    parser.add_argument("--log", default="WARNING")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1)  # the tests dump a stuck worker's threads with it
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, args.log)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    app = App(workflows=[build_workflow()],
              functions={"work": make_work(Path(args.side), args.call_ms)})
    print(f"ready {os.getpid()}", flush=True)
    return main_worker(args.store, app, args.concurrency, home=args.home, lease=args.lease,
                       poll=args.poll, orphan_after=args.orphan_after)


if __name__ == "__main__":
    raise SystemExit(main())
