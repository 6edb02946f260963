"""``python3 -m benchmarks``: wakepoint side by side with AbstractRuntime, DBOS and LangGraph.

Run from the repository root with any Python >= 3.11 (standard library only here): it
creates or reuses one venv per system under ``benchmarks/.venvs/`` (PyPI installs; wakepoint
itself editable from this clone), runs the workloads of ``benchmarks/peers/harness.py``
alternating systems for ``--rounds`` rounds, and writes ``RESULTS.md``, ``steps.png`` and
``peers/results.json`` into ``--out`` (default ``benchmarks/``).  ``--readme`` also rewrites
the peer table between the README's ``<!-- peers:begin/end -->`` markers.  The other
``bench_*.py`` scripts here measure wakepoint alone; run them directly.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .peers import harness, report, venvs


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks", description=__doc__.split(
        "\n\n")[0])
    names = [s.name for s in venvs.SYSTEMS]
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--only", default=",".join(names),
                        help=f"comma-separated systems (default: all of {','.join(names)})")
    parser.add_argument("--workloads", default=",".join(harness.WORKLOADS),
                        help="comma-separated workloads (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 100 linear runs, 50 pauses, 1 round")
    parser.add_argument("--linear-runs", type=int, default=None)
    parser.add_argument("--pause-runs", type=int, default=None)
    parser.add_argument("--no-install", action="store_true",
                        help="fail instead of creating or updating a venv")
    parser.add_argument("--out", type=Path, default=venvs.BENCH_DIR,
                        help="where RESULTS.md, steps.png and peers/results.json go")
    parser.add_argument("--readme", action="store_true",
                        help="also rewrite the README's peer table")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: re-render the outputs from --out's "
                             "peers/results.json (after a change to the report's layout)")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown or not chosen:
        parser.error(f"--only: unknown system(s) {unknown}; choose from {names}")
    args.systems = [s for s in venvs.SYSTEMS if s.name in chosen]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or set(workloads) - set(harness.WORKLOADS):
        parser.error(f"--workloads: choose from {list(harness.WORKLOADS)}")
    args.cases = [c for c in harness.CASES if c.workload in workloads]
    if args.quick:
        args.rounds = 1
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    defaults = harness.Sizes()
    args.sizes = harness.Sizes(
        linear_runs=args.linear_runs or (100 if args.quick else defaults.linear_runs),
        pause_runs=args.pause_runs or (50 if args.quick else defaults.pause_runs),
    )
    if args.sizes.linear_runs < 1 or args.sizes.pause_runs < 1:
        parser.error("run counts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    out: Path = args.out
    raw = out / "peers" / "results.json"
    try:
        plotter = venvs.ensure(venvs.PLOT, install=not args.no_install)
        if args.render:
            saved = json.loads(raw.read_text())
            return publish(saved["summary"], saved["meta"], saved["records"], out, plotter,
                           args.readme)
        systems = [venvs.ensure(s, install=not args.no_install) for s in args.systems]
    except (venvs.SetupError, OSError, ValueError, KeyError) as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 1
    command = " ".join(["python3 -m benchmarks", *map(shlex.quote, argv)])
    started = datetime.now(UTC)
    versions = {s.name: venvs.versions(s) for s in systems}
    load_before = report.machine()["uptime"]
    print(f"load before: {load_before}")
    t0 = time.monotonic()
    records = harness.run_rounds(systems, args.cases, args.sizes, args.rounds)
    meta = {
        "command": command, "started": started.strftime("%Y-%m-%d %H:%M"),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "seconds": round(time.monotonic() - t0, 1), "rounds": args.rounds,
        "sizes": asdict(args.sizes), "versions": versions, "machine": report.machine(),
        "load_before": load_before, "commit": report.commit(),
    }
    meta["load_after"] = meta["machine"]["uptime"]
    raw.parent.mkdir(parents=True, exist_ok=True)
    summary = harness.summarize(records)
    raw.write_text(json.dumps({"meta": meta, "summary": summary, "records": records},
                              indent=1) + "\n")
    return publish(summary, meta, records, out, plotter, args.readme)


def publish(summary: report.Summary, meta: dict[str, Any], records: list[dict[str, Any]],
            out: Path, plotter: venvs.System, readme: bool) -> int:
    """Write RESULTS.md, the PNG and (``readme``) the README block; print the verdicts."""
    report.write_results(out / "RESULTS.md", summary, meta)
    report.plot(plotter, summary, out / "steps.png", meta["sizes"]["linear_runs"])
    if readme:
        report.update_readme(report.README, report.readme_block(summary, meta["command"]))
    print("\n".join(report.readme_table(summary)))
    for target, measured, met in report.targets(summary):
        print(f"{'ok ' if met else 'NO ' if met is False else '-  '} {target}: {measured}")
    print(f"written: {out / 'RESULTS.md'}, {out / 'steps.png'}")
    failed = [r for r in records if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
