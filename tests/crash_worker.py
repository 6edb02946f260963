"""The process that ``test_crash.py`` kills with SIGKILL, and the one that recovers after it.

    python crash_worker.py DIR --round R --runs N [--linger]
        Open ``Runtime("jsonl:DIR", durability="batch")``, print ``ready``, start runs
        ``crash-R-0`` .. ``crash-R-<N-1>`` one after the other, print ``done``; with
        ``--linger``, then wait (reading stdin) for the test to kill it.

    python crash_worker.py DIR --round R --runs N --recover
        Open the same directory, report which runs exist and their status, call
        ``rt.recover()``, start any of the N runs that was never created (the worker died
        before creating it), and print one JSON line: ``before``, ``after`` (run id ->
        status or null) and ``pending`` (runs still RUNNING or waiting on an effect).

The workflow has 20 nodes; every third one (1, 4, ..., 16) does ``call("effect", ...)``, whose
function appends ``<idempotency key>\\n`` to ``DIR/side-effects.log`` with ``O_APPEND`` and
fsyncs it *before returning*: the side file is the outside world that the test compares with
the ledger.  ``expected_output`` and ``expected_trace`` say what a finished run must hold.

The test imports this file by path for those two functions; running it is the only way it is
used otherwise.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from wakepoint import RunNotFound, Runtime, RunView, Status, Workflow, call, done, goto

NODES = 20
CALL_NODES = frozenset(range(1, NODES - 1, 3))
SIDE_FILE = "side-effects.log"
WORKFLOW_ID = "crash-chain"
HANG_AFTER = 45
"""Seconds after which a worker prints every thread's stack and exits (a hang, not a run)."""


def node_name(i: int) -> str:
    return f"n{i:02d}"


def effect_value(i: int, acc: int) -> int:
    """What the side-effecting function returns for node ``i``."""
    return acc + 100 * i


def expected_output(run_id: str, input: int) -> dict[str, Any]:
    """The output a run of the workflow must finish with."""
    acc = input
    for i in range(NODES - 1):
        acc = effect_value(i, acc) if i in CALL_NODES else acc + i
    return {"run": run_id, "acc": acc, "input": input}


def expected_trace() -> list[tuple[str, str | None]]:
    """``(kind, node)`` of every ledger record of a finished run, in order."""
    trace: list[tuple[str, str | None]] = [("run.started", None)]
    for i in range(NODES - 1):
        if i in CALL_NODES:
            trace += [("effect.requested", node_name(i)), ("wait.resumed", node_name(i))]
        else:
            trace.append(("node.stepped", node_name(i)))
    trace.append(("run.completed", node_name(NODES - 1)))
    trace.append(("run.sealed", None))  # a finished run's chain ends with its seal
    return trace


def expect_line(proc: subprocess.Popen[str], word: str) -> None:
    """For the tests driving this script: read its next stdout line, which must be ``word``
    (``ready`` / ``done``); otherwise kill it and fail with its stderr."""
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != word:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"worker said {line!r}, expected {word!r}; stderr:\n{err}")


def run_ids(round_no: int, runs: int) -> list[str]:
    return [f"crash-{round_no}-{i}" for i in range(runs)]


def build_workflow() -> Workflow:
    wf = Workflow(WORKFLOW_ID)

    def make(i: int) -> Any:
        nxt = node_name(i + 1)

        def node(run: RunView) -> Any:
            acc = run.vars.get("acc", run.input)
            if i == NODES - 1:
                return done({"run": run.run_id, "acc": acc, "input": run.input})
            if i in CALL_NODES:
                return call("effect", {"i": i, "acc": acc}, into="acc", then=nxt)
            return goto(nxt, set={"acc": acc + i})

        return node

    for i in range(NODES):
        wf.node(make(i), start=(i == 0), name=node_name(i))
    return wf


def make_effect(root: Path) -> Any:
    side = root / SIDE_FILE

    def effect(i: int, acc: int, idempotency_key: str) -> int:
        # A little work before the side effect, like a real call: it widens the window in
        # which a kill lands mid-run, and splits kills between before and after the effect.
        time.sleep(0.002)
        fd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{idempotency_key}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return effect_value(i, acc)

    return effect


def open_runtime(root: Path) -> Runtime:
    return Runtime(
        f"jsonl:{root}", workflows=[build_workflow()], functions={"effect": make_effect(root)},
        durability="batch",
    )


def statuses(rt: Runtime, ids: list[str]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for run_id in ids:
        try:
            found[run_id] = rt.get(run_id).status.value
        except RunNotFound:
            found[run_id] = None
    return found


def pending(rt: Runtime) -> list[str]:
    """Runs recovery should have moved on: RUNNING, or waiting on an effect."""
    return sorted(
        s.run_id for s in rt.list()
        if s.status is Status.RUNNING
        or (s.status is Status.WAITING and s.wait is not None and s.wait.kind == "effect")
    )


def work(root: Path, round_no: int, runs: int, linger: bool) -> None:
    rt = open_runtime(root)
    print("ready", flush=True)
    for index, run_id in enumerate(run_ids(round_no, runs)):
        rt.start(WORKFLOW_ID, index, run_id=run_id)
    print("done", flush=True)
    if linger:
        sys.stdin.read()  # until the test kills us (or closes our stdin)
    rt.close()


def recover(root: Path, round_no: int, runs: int) -> None:
    rt = open_runtime(root)
    ids = run_ids(round_no, runs)
    before = statuses(rt, ids)
    rt.recover()
    for index, run_id in enumerate(ids):
        if before[run_id] is None:
            try:
                rt.get(run_id)
            except RunNotFound:
                rt.start(WORKFLOW_ID, index, run_id=run_id)
    report = {"before": before, "after": statuses(rt, ids), "pending": pending(rt)}
    rt.close()
    print(json.dumps(report), flush=True)


def main(argv: list[str] | None = None) -> int:
    import structlog

    # This script is the application: it owns logging, and keeps stdout for its protocol.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--round", type=int, required=True, dest="round_no")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--recover", action="store_true")
    parser.add_argument("--linger", action="store_true")
    args = parser.parse_args(argv)
    # A hung process shows where it hangs (stack on stderr) instead of only timing out.
    faulthandler.dump_traceback_later(HANG_AFTER, exit=True)
    if args.recover:
        recover(args.root, args.round_no, args.runs)
    else:
        work(args.root, args.round_no, args.runs, args.linger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
