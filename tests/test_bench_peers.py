"""The peer benchmark's wakepoint side, end to end at a tiny size (no network, no peer venvs).

The harness runs each system's driver in that system's venv; here the wakepoint driver runs
with this test's own interpreter (wakepoint is installed in it), through the very functions
``python -m benchmarks`` uses: ``harness.run_rounds`` over every case, ``summarize``, and the
report writers.  So a driver or harness change that breaks a workload, miscounts, or stops
measuring fails here, in CI, without AbstractRuntime, DBOS or LangGraph installed.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> Any:
    """``benchmarks.peers``' modules, imported from the repository root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        modules: dict[str, ModuleType] = {
            name: importlib.import_module(f"benchmarks.peers.{name}")
            for name in ("harness", "report", "venvs")
        }
    return dataclasses.make_dataclass("Bench", list(modules))(**modules)


@pytest.fixture(scope="module")
def wakepoint(bench: Any) -> Any:
    """The harness's wakepoint system, driven by this interpreter instead of its venv."""
    return dataclasses.replace(bench.venvs.WAKEPOINT, python=Path(sys.executable))


SIZES = {"linear_runs": 7, "pause_runs": 5, "sleep_seconds": 1.5, "kill_after": 0.1,
         "timeout": 120}


@pytest.fixture(scope="module")
def records(bench: Any, wakepoint: Any, tmp_path_factory: pytest.TempPathFactory,
            ) -> list[dict[str, Any]]:
    """Every case on wakepoint at tiny sizes (a short sleep, killed early).

    ``harness.run_case`` is what ``run_rounds`` calls per cell; the cases run side by side
    here (each in its own processes and directory, as in the harness) only to keep this
    test short - most of its time is interpreter start-up and the sleep.
    """
    sizes = bench.harness.Sizes(**SIZES)
    # Made here, in one thread: pytest's tmp_path_factory is not thread-safe (its first use
    # in a process clears and creates the base directory, which raced with another thread's
    # mktemp under xdist: "Directory not empty").
    scratch = {case.key: tmp_path_factory.mktemp(case.key.replace("/", "-"))
               for case in bench.harness.CASES}

    def one(case: Any) -> dict[str, Any]:
        return {"round": 1, "system": "wakepoint", "workload": case.workload,
                "case": case.key, "result": bench.harness.run_case(wakepoint, case, sizes,
                                                                    scratch[case.key])}

    with ThreadPoolExecutor(len(bench.harness.CASES)) as pool:
        return list(pool.map(one, bench.harness.CASES))


def _by_case(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["case"]: r for r in records}


def test_every_case_ran_without_error(records: list[dict[str, Any]]) -> None:
    """Each of the six cases (three linear stores, pause, crash, sleep) produced a result."""
    cases = _by_case(records)
    assert sorted(cases) == sorted(
        ["linear/memory", "linear/sqlite", "linear/jsonl", "pause", "crash", "sleep"])
    for case, record in cases.items():
        assert "error" not in record, (case, record.get("error"))
        assert record["system"] == "wakepoint"
        assert record["result"]["maxrss_kb"] > 10_000  # a Python process: ru_maxrss in KiB


def test_rates_count_every_step_and_cycle(records: list[dict[str, Any]]) -> None:
    """Linear: 10 steps per run, every run completed; pause: every cycle answered."""
    cases = _by_case(records)
    for store in ("memory", "sqlite", "jsonl"):
        result = cases[f"linear/{store}"]["result"]
        assert result["steps"] == 70
        assert result["completed"] == 7
        assert result["rate"] == pytest.approx(70 / result["wall"])
        assert 0 < result["rate"] < math.inf and result["rate_cpu"] > 0
    pause = cases["pause"]["result"]
    assert pause["cycles"] == pause["completed"] == 5
    assert pause["rate"] == pytest.approx(5 / pause["wall"])


def test_crash_recovery_reruns_no_completed_step(records: list[dict[str, Any]]) -> None:
    """Step 5 died once and ran again; steps 1-4 ran once; the run completed after restart."""
    crash = _by_case(records)["crash"]["result"]
    assert crash["runs_per_step"] == [1, 1, 1, 1, 2, 1, 1, 1, 1, 1]
    assert crash["reran_completed"] == 0
    assert crash["completed"] is True and crash["all_steps_ran"] is True
    assert 0 < crash["ready_s"] < crash["restart_to_done_s"] < 60


def test_sleep_lateness_is_measured(records: list[dict[str, Any]]) -> None:
    """The run killed during its sleep woke after restart, not before its due time."""
    sleep = _by_case(records)["sleep"]["result"]
    assert sleep["completed"] is True
    assert "Worker" in sleep["mechanism"]
    # Same clock on both sides; a wake before the due time would be a bug.
    assert -1.0 <= sleep["lateness_ms"] < 5000
    assert sleep["restart_before_due_s"] < 1.5
    # The timer's own share never exceeds the whole, and is not negative either.
    assert -1.0 <= sleep["timer_late_ms"] <= sleep["lateness_ms"] + 1e-6
    assert sleep["ready_at"] > 0 and 0 < sleep["ready_s"] < 60


def test_report_quotes_the_measured_figures(bench: Any, records: list[dict[str, Any]],
                                            tmp_path: Path) -> None:
    """RESULTS.md and the README block state the medians and the targets' verdicts."""
    summary = bench.harness.summarize(records)
    rate = summary["linear/sqlite"]["wakepoint"]["rate"]
    meta = {"command": "python3 -m benchmarks --test", "started": "s", "finished": "f",
            "rounds": 1, "sizes": dataclasses.asdict(bench.harness.Sizes()),
            "versions": {"wakepoint": {"python": "3.11", "wakepoint": "0"}},
            "machine": bench.report.machine(), "load_before": "l0", "load_after": "l1"}
    out = tmp_path / "RESULTS.md"
    bench.report.write_results(out, summary, meta)
    text = out.read_text()
    assert f"{rate:,.0f}" in text
    assert "| 1111211111 |" in text  # the crash trial's executions per step
    assert "never re-runs completed steps after a crash | re-runs of steps 1-4 per trial: [0]" \
        " | yes |" in text
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- peers:begin -->\nold\n<!-- peers:end -->\ntail\n")
    bench.report.update_readme(readme, bench.report.readme_block(summary, "CMD"))
    new = readme.read_text()
    assert "old" not in new and new.endswith("<!-- peers:end -->\ntail\n")
    assert "| wakepoint |" in new and "CMD" in new
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- peers:begin -->"):
        bench.report.update_readme(readme, "x")


def test_rounds_record_each_cell_and_report_a_failing_driver(bench: Any, wakepoint: Any,
                                                             ) -> None:
    """``run_rounds`` warms up, runs every round, and turns a bad driver into an ``error``."""
    sizes = bench.harness.Sizes(pause_runs=2, timeout=60)
    lines: list[str] = []
    records = bench.harness.run_rounds([wakepoint], [bench.harness.Case("pause")], sizes,
                                       rounds=2, progress=lines.append)
    assert [(r["round"], r["case"], r["system"]) for r in records] == [
        (1, "pause", "wakepoint"), (2, "pause", "wakepoint")]
    assert all(r["result"]["cycles"] == 2 for r in records) and len(lines) == 2
    assert bench.harness.summarize(records)["pause"]["wakepoint"]["n"] == 2

    broken = dataclasses.replace(wakepoint, driver="no_such_driver.py")
    records = bench.harness.run_rounds([broken], [bench.harness.Case("pause")], sizes,
                                       rounds=1, progress=lambda _line: None)
    assert len(records) == 1
    assert records[0]["error"].startswith("DriverError: wakepoint pause")
    summary = bench.harness.summarize(records)
    assert summary["pause"]["wakepoint"]["errors"] == [records[0]["error"]]
