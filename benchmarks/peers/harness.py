"""The peer benchmark: the same workloads on every system, alternating, several rounds.

Theory of operation.  Each measurement is one driver process (``drive_<system>.py``, run by
its own venv's interpreter) in a fresh scratch directory, so no system sees another's
caches, files or imports, and ``ru_maxrss`` of the process is the peak memory of that one
workload.  Within a round every case runs on every system before the next case starts
(wakepoint, abstractruntime, dbos, langgraph; then again), so slow drifts of the shared
machine's load hit all systems alike; the medians over rounds are reported, and the ratio
wakepoint / peer is computed from medians of the same invocation.

The two restart workloads are orchestrated here, identically for every system:

* ``crash``: run ``--phase start`` (its step 5 SIGKILLs the process), then immediately
  ``--phase recover``.  *Restart to done* is from just before the recover process is spawned
  to the moment the driver saw the run complete (wall clock, so interpreter start-up and
  imports count: that is what a restart costs).  Executions per step come from the side file
  every step appends to; a completed step that ran twice is a re-run.
* ``sleep``: ``--phase start`` starts a run that sleeps ``SLEEP`` seconds and kills itself
  ``KILL_AFTER`` seconds into the sleep; the recover phase is spawned at once.  Lateness is
  the wall-clock time the step after the sleep ran minus the due time the system computed;
  ``timer_late_ms`` counts from when the restarted system was open instead, if that was
  later (the share of the lateness that is the timer's, not the restart's).

Before the first round every driver runs once untimed (``warm_up``): bytecode compiled,
files in the page cache, as for any restart of a deployed application.

The harness itself needs only the standard library (it runs under a fresh clone's python3).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .venvs import System

SLEEP = 2.0
KILL_AFTER = 0.5


@dataclass(frozen=True)
class Sizes:
    """How much work each case does."""

    linear_runs: int = 1000
    pause_runs: int = 500
    sleep_seconds: float = SLEEP
    kill_after: float = KILL_AFTER
    timeout: float = 1800.0
    """Seconds before a driver process is considered hung (and killed)."""


@dataclass(frozen=True)
class Case:
    """One cell of the plan: a workload on a store."""

    workload: str
    store: str = "sqlite"

    @property
    def key(self) -> str:
        return self.workload if self.workload != "linear" else f"linear/{self.store}"


CASES = (
    Case("linear", "memory"), Case("linear", "sqlite"), Case("linear", "jsonl"),
    Case("pause"), Case("crash"), Case("sleep"),
)
WORKLOADS = ("linear", "pause", "crash", "sleep")


class DriverError(RuntimeError):
    """A driver process failed: its exit status and the end of its stderr."""


def applies(system: System, case: Case) -> bool:
    """Whether the plan runs ``case`` on ``system`` (JSONL is wakepoint's own store)."""
    return case.workload != "linear" or case.store in system.linear_stores


def _driver(system: System, args: Iterable[str], timeout: float,
            expect_kill: bool = False) -> dict[str, Any]:
    """Run ``system``'s driver; the JSON object of its last stdout line."""
    command = [str(system.python), str(system.script), *args, *system.extra]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False, env=_driver_env())
    except subprocess.TimeoutExpired:
        raise DriverError(f"{system.name} {' '.join(args)}: no result in {timeout:.0f} s") from None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if expect_kill and done.returncode == -signal.SIGKILL:
        return result
    if done.returncode != 0 or not lines or "error" in result:
        what = result.get("error") or f"exit status {done.returncode}"
        raise DriverError(f"{system.name} {' '.join(args)}: {what}\n{done.stderr[-2000:]}")
    return result


def _driver_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # each venv sees only what was installed into it
    return env


def run_case(system: System, case: Case, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    """Run one case on one system in the fresh directory ``scratch``; its result fields."""
    common = ["--dir", str(scratch)]
    if case.workload == "linear":
        result = _driver(system, ["linear", "--store", case.store,
                                  "--runs", str(sizes.linear_runs), *common], sizes.timeout)
        return _rates(result, "steps")
    if case.workload == "pause":
        result = _driver(system, ["pause", "--runs", str(sizes.pause_runs), *common],
                         sizes.timeout)
        return _rates(result, "cycles")
    if case.workload == "crash":
        return _crash(system, sizes, scratch)
    if case.workload == "sleep":
        return _sleep(system, sizes, scratch)
    raise ValueError(f"unknown workload {case.workload!r}")


def _rates(result: dict[str, Any], unit: str) -> dict[str, Any]:
    if "unsupported" in result:
        return result
    work = result[unit]
    if result.get("completed") != (work // 10 if unit == "steps" else work):
        raise DriverError(f"only {result.get('completed')} runs completed: {result}")
    return {**result, "rate": work / result["wall"], "rate_cpu": work / result["cpu"]}


def _crash(system: System, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    common = ["crash", "--dir", str(scratch)]
    _driver(system, [*common, "--phase", "start"], sizes.timeout, expect_kill=True)
    if not (scratch / "killed").exists():
        raise DriverError(f"{system.name}: the crash run never reached step 5")
    restart = time.time()
    result = _driver(system, [*common, "--phase", "recover"], sizes.timeout)
    counts = [0] * 10
    for line in (scratch / "steps.log").read_text().split():
        counts[int(line) - 1] += 1
    return {
        **result,
        "restart_to_done_s": result["done_at"] - restart,
        "runs_per_step": counts,
        "reran_completed": sum(c - 1 for c in counts[:4]),
        "all_steps_ran": all(c >= 1 for c in counts),
    }


def _sleep(system: System, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    common = ["sleep", "--dir", str(scratch), "--seconds", str(sizes.sleep_seconds),
              "--kill-after", str(sizes.kill_after)]
    first = _driver(system, [*common, "--phase", "start"], sizes.timeout, expect_kill=True)
    if "unsupported" in first:
        return first
    if not (scratch / "due").exists():
        raise DriverError(f"{system.name}: the sleep never started")
    restart = time.time()
    result = _driver(system, [*common, "--phase", "recover"], sizes.timeout)
    due = float((scratch / "due").read_text())
    woke = float((scratch / "woke").read_text())
    return {
        **result,
        "lateness_ms": (woke - due) * 1000.0,
        "restart_before_due_s": due - restart,
        # What the timer itself added: lateness counted from when the restarted system was
        # open, if that was after the due time (a slow restart is not the timer's fault,
        # but it is part of the lateness a user sees, which is the headline figure).
        "timer_late_ms": (woke - max(due, result["ready_at"])) * 1000.0,
    }


def warm_up(system: System, sizes: Sizes) -> None:
    """Run ``system``'s driver once, untimed, so that every measured process starts warm.

    The first start of a fresh venv compiles its modules to bytecode and reads them from
    disk; a restarted production process finds both done.  Without this the first round's
    restart figures (and the sleep workload's lateness) would measure compilation.
    """
    scratch = Path(tempfile.mkdtemp(prefix=f"peers-warm-{system.name}-"))
    try:
        _driver(system, ["linear", "--store", "memory", "--runs", "1", "--dir", str(scratch)],
                sizes.timeout)
    except DriverError:
        pass  # a broken driver is reported by the measured cases, each with its error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def plan(systems: Iterable[System], cases: Iterable[Case]) -> list[tuple[Case, System]]:
    """The order of one round: every system on a case before the next case."""
    systems = list(systems)
    return [(case, system) for case in cases for system in systems if applies(system, case)]


def run_rounds(
    systems: Iterable[System],
    cases: Iterable[Case],
    sizes: Sizes,
    rounds: int,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the plan ``rounds`` times; one record per (round, case, system)."""
    order = plan(systems, cases)
    for system in dict.fromkeys(s for _, s in order):
        warm_up(system, sizes)
    records: list[dict[str, Any]] = []
    for rnd in range(1, rounds + 1):
        for case, system in order:
            scratch = Path(tempfile.mkdtemp(prefix=f"peers-{system.name}-"))
            record: dict[str, Any] = {"round": rnd, "system": system.name,
                                      "workload": case.workload, "case": case.key}
            started = time.monotonic()
            try:
                record["result"] = run_case(system, case, sizes, scratch)
            except (DriverError, OSError, ValueError, KeyError) as exc:
                # One broken cell must not lose the others' figures: it is reported as such.
                record["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            record["seconds"] = time.monotonic() - started
            records.append(record)
            progress(f"round {rnd}/{rounds} {case.key:<14} {system.name:<16} "
                     f"{_brief(record)}")
    return records


def _brief(record: dict[str, Any]) -> str:
    if "error" in record:
        return "ERROR " + record["error"].splitlines()[0]
    r = record["result"]
    if "unsupported" in r:
        return "unsupported"
    if "rate" in r:
        return f"{r['rate']:,.0f}/s wall, {r['rate_cpu']:,.0f}/CPU-s"
    if "runs_per_step" in r:
        return f"restart->done {r['restart_to_done_s']:.2f} s, runs per step {r['runs_per_step']}"
    return f"lateness {r['lateness_ms']:.1f} ms"


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per case and system: medians (and the raw per-round values) of the reported figures."""
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {}
    errors: dict[str, dict[str, list[str]]] = {}
    for rec in records:
        if "error" in rec:
            errors.setdefault(rec["case"], {}).setdefault(rec["system"], []).append(rec["error"])
            continue
        cells.setdefault(rec["case"], {}).setdefault(rec["system"], []).append(rec["result"])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for case, by_system in cells.items():
        for system, results in by_system.items():
            out.setdefault(case, {})[system] = _cell(results)
    for case, by_system in errors.items():
        for system, messages in by_system.items():
            cell = out.setdefault(case, {}).setdefault(system, {"n": 0})
            cell["errors"] = messages
    return out


def _cell(results: list[dict[str, Any]]) -> dict[str, Any]:
    if any("unsupported" in r for r in results):
        return {"unsupported": results[0]["unsupported"], "n": len(results),
                "maxrss_kb": max(r["maxrss_kb"] for r in results)}
    cell: dict[str, Any] = {"n": len(results)}
    for key in ("rate", "rate_cpu", "restart_to_done_s", "ready_s", "lateness_ms",
                "restart_before_due_s", "timer_late_ms", "maxrss_kb", "reran_completed"):
        values = [r[key] for r in results if key in r]
        if values:
            cell[key] = statistics.median(values)
            cell[f"{key}_all"] = values
    if "runs_per_step" in results[0]:
        cell["runs_per_step_all"] = [r["runs_per_step"] for r in results]
        cell["completed_all"] = [bool(r.get("completed")) and r["all_steps_ran"]
                                 for r in results]
    elif "completed" in results[0] and "lateness_ms" in results[0]:
        cell["completed_all"] = [bool(r["completed"]) for r in results]
    for key in ("mechanism",):
        if key in results[0]:
            cell[key] = results[0][key]
    return cell
