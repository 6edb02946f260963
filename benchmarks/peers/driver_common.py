"""What every driver shares: its command line, the side files, timing and the JSON result.

A driver is a script that runs inside one system's own virtual environment (``drive_*.py``),
so this module uses the standard library only, and each driver imports it by name (a script's
own directory is on ``sys.path``).  The harness (``harness.py``) calls every driver with the
same command line:

``drive_X.py WORKLOAD --dir DIR [--store S] [--runs N] [--phase P] [--seconds S]``

* ``linear``: ``--runs`` runs of a 10-step linear workflow, each step setting one small value,
  on ``--store`` (``memory``, ``sqlite``, ``jsonl``).  Prints ``steps``, ``wall``, ``cpu``.
* ``pause``: ``--runs`` runs that ask a person and are answered from outside, on SQLite.
  Prints ``cycles``, ``wall``, ``cpu``.
* ``crash``: a 10-step run on SQLite whose step 5 SIGKILLs its own process on the first
  attempt.  ``--phase start`` starts it (and dies); ``--phase recover`` is the restarted
  process: it lets the system recover the run and prints ``done_at`` (epoch seconds).  Every
  step appends its number to ``DIR/steps.log`` first, so the harness counts executions.
* ``sleep``: a run that sleeps durably for ``--seconds`` then runs one more step.
  ``--phase start`` starts it, writes the due time (epoch seconds) to ``DIR/due``, and
  SIGKILLs itself ``--kill-after`` seconds later; ``--phase recover`` restarts the system and
  waits until the last step wrote its wall-clock time to ``DIR/woke``.  A system without a
  durable timer prints ``{"unsupported": reason}`` instead.

Every result line also carries ``maxrss_kb`` (``ru_maxrss`` of the driver process: its peak
memory for that workload), and where a phase restarts a system, ``ready_at`` (epoch seconds
when the system was open again) and ``ready_s`` (seconds from the driver's first line to
then).  Side files are written with ``os.write`` on
an ``O_APPEND`` descriptor: the bytes are in the kernel's page cache when ``write`` returns,
so they survive the SIGKILL that ends the process a moment later.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NODES = 10
"""Steps of the linear and crash workflows."""
KILL_AT = 5
"""The crash workflow's step that kills its process on the first attempt."""

STARTED = time.time()
"""When this driver process began running Python code (close enough to its exec)."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The driver command line (the same for every system)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["linear", "pause", "crash", "sleep"])
    parser.add_argument("--dir", required=True, type=Path, help="a fresh scratch directory")
    parser.add_argument("--store", default="sqlite", choices=["memory", "sqlite", "jsonl"])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--phase", default="start", choices=["start", "recover"])
    parser.add_argument("--seconds", type=float, default=2.0, help="sleep workload: duration")
    parser.add_argument("--kill-after", type=float, default=0.5,
                        help="sleep workload: seconds into the sleep at which to die")
    parser.add_argument("--durability", default=None,
                        choices=["sync", "async", "exit", "batch", "none"],
                        help="the system's durability mode where it has one (wakepoint: "
                             "sync|batch|none; LangGraph: sync|async|exit); default: its own")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.dir.mkdir(parents=True, exist_ok=True)
    return args


def _append(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def crash_step(directory: Path, number: int) -> None:
    """Step ``number`` (1-based) of the crash workflow: log the execution, maybe die.

    Step ``KILL_AT`` kills the process the first time it runs (a marker file remembers that
    it did), the way a power cut or an OOM kill would: no exception, no cleanup.
    """
    _append(directory / "steps.log", f"{number}\n")
    marker = directory / "killed"
    if number == KILL_AT and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def _publish(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a reader polling for it never sees it empty)."""
    if not path.exists():
        partial = path.with_suffix(".partial")
        partial.write_text(text)
        os.replace(partial, path)


def record_due(directory: Path, due_epoch: float) -> None:
    """Write the sleep's due time once (a replaying system may call this again)."""
    _publish(directory / "due", repr(due_epoch))


def record_woke(directory: Path) -> None:
    """The step after the sleep: note when it ran (the first time only)."""
    _publish(directory / "woke", repr(time.time()))


def wait_for_file(path: Path, timeout: float, poll: float = 0.002) -> bool:
    """Wait until ``path`` exists; whether it did within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(poll)
    return path.exists()


def die_after(seconds: float) -> None:
    """Sleep, then SIGKILL this process (the sleep workload's crash during the sleep)."""
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


def readiness(ready: float) -> dict[str, float]:
    """The result fields of a restarted system that was open at epoch ``ready``."""
    return {"ready_at": ready, "ready_s": ready - STARTED}


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` spent in ``work()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - w0, time.process_time() - c0


def emit(**fields: Any) -> None:
    """Print the result as the last line of stdout, with this process's peak memory."""
    fields["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def finish(**fields: Any) -> None:
    """``emit`` and leave at once: some systems keep non-daemon threads that delay exit."""
    emit(**fields)
    sys.stderr.flush()
    os._exit(0)
