"""Core speed figures of issue 2: pure kernel, runtime on memory, runtime on JSONL.

Run: ``python benchmarks/bench_core.py [--runs 1000] [--rounds 5]``.

Workload (the same for every row): a linear workflow of 10 nodes, each ``goto`` the next with
one var set, the last ``done``.  A *step* is one node executed (10 per run); every run also
commits one ``run.started`` transition, so the ledger holds 11 signed records per run.  Rows:

* ``kernel``: ``tick`` alone on one run state, no store, no signing (ticks/s).
* ``memory``: ``Runtime("memory:")`` - start each run and drive it to the end; signed records.
* ``jsonl``: ``Runtime("jsonl:DIR", durability="batch")`` - the embedded default; signed
  records, group-committed fsync.
* ``jsonl (no checkpoints)``: the same without the signed checkpoints the runtime writes (at
  a run's end at most every 0.5 s, every 10,000 records, at close): the ledger issue's
  "writing with checkpoints costs <= 10% over writing without" compares these two rows.
* ``jsonl-sync``: the same with an fsync per commit (for scale).
* ``ask_user``: pause + resume cycles on JSONL (start a run that asks, respond from outside).

Each row runs ``--rounds`` times; the median is reported, in wall-clock terms and per CPU
second of this process (all its threads; ``time.process_time``).  The targets are wall-clock
figures on a quiet machine; the CPU figure stays meaningful when other work shares the
cores.  Targets (issue 2): kernel >= 100,000 ticks/s, memory >= 20,000 steps/s, jsonl >= 10,000
steps/s, one process.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from datetime import UTC, datetime

import structlog
from wakepoint import Runtime, Workflow, ask_user, done, goto
from wakepoint.kernel import transitions as kernel

NODES = 10


def linear() -> Workflow:
    """The 10-node linear workflow."""
    wf = Workflow("linear", max_steps=1_000_000_000)
    names = [f"n{i}" for i in range(NODES)]
    for i, name in enumerate(names):
        if i < NODES - 1:
            def node(run, nxt=names[i + 1], i=i):  # type: ignore[no-untyped-def]
                return goto(nxt, set={"i": i})
        else:
            def node(run):  # type: ignore[no-untyped-def]
                return done({"steps": run.step})
        wf.node(node, start=(i == 0), name=name)
    return wf


def approval() -> Workflow:
    """One ask_user, then done."""
    wf = Workflow("approval")

    @wf.node(start=True)
    def ask(run):  # type: ignore[no-untyped-def]
        return ask_user("ok?", choices=["yes", "no"], into="a", then="end")

    @wf.node
    def end(run):  # type: ignore[no-untyped-def]
        return done(run.vars["a"])

    return wf


def _timed(work: int, fn: object) -> tuple[float, float]:
    """``(work / wall seconds, work / CPU seconds)`` of calling ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()  # type: ignore[operator]
    return work / (time.perf_counter() - w0), work / (time.process_time() - c0)


def bench_kernel(n: int) -> tuple[float, float]:
    """Ticks per second of the pure kernel: one cycling run, no store, no signing."""
    wf = Workflow("cycle", max_steps=1_000_000_000)

    @wf.node(start=True)
    def spin(run):  # type: ignore[no-untyped-def]
        return goto("spin", set={"i": run.step})

    now = datetime.now(UTC)
    state = kernel.start(wf, "k", None, now).state

    def spin_all() -> None:
        nonlocal state
        for _ in range(n):
            state = kernel.tick(wf, state, now).state

    return _timed(n, spin_all)


def bench_runtime(url: str, runs: int, **options: object) -> tuple[float, float]:
    """Steps (nodes executed) per second through ``Runtime.start`` on the store at ``url``."""
    rt = Runtime(url, [linear()], **options)  # type: ignore[arg-type]

    def work() -> None:
        for _ in range(runs):
            rt.start("linear")
        rt.store.flush()

    rates = _timed(runs * NODES, work)
    rt.close()
    return rates


def bench_pause_resume(url: str, runs: int) -> tuple[float, float]:
    """ask_user pause + respond cycles per second."""
    rt = Runtime(url, [approval()])

    def work() -> None:
        for _ in range(runs):
            state = rt.start("approval")
            rt.respond(state.run_id, "yes")
        rt.store.flush()

    rates = _timed(runs, work)
    rt.close()
    return rates


def main() -> None:
    """Run every row and print a table of medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=".",
                        help="where the JSONL stores are created (default: the current "
                             "directory); file creation speed varies a lot between places")
    args = parser.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )

    # Every store of every round stays on disk until the end: deleting thousands of fsynced
    # run files between rounds made the next round's file creations cost up to ~1 ms of
    # kernel time each on this VM (ext4 mounted with ``discard``), so the rounds measured
    # the previous round's clean-up.  Applications do not delete runs at that rate.
    parent = tempfile.TemporaryDirectory(dir=args.dir)

    def jsonl(durability: str, checkpoints: bool = True) -> tuple[float, float]:
        tmp = tempfile.mkdtemp(dir=parent.name)
        return bench_runtime(f"jsonl:{tmp}", args.runs, durability=durability,
                             checkpoints=checkpoints)

    def pause_resume() -> tuple[float, float]:
        tmp = tempfile.mkdtemp(dir=parent.name)
        return bench_pause_resume(f"jsonl:{tmp}", args.runs)

    rows = [
        ("kernel", "ticks/s", lambda: bench_kernel(args.runs * NODES * 5), 100_000),
        ("memory", "steps/s", lambda: bench_runtime("memory:", args.runs), 20_000),
        ("jsonl (batch)", "steps/s", lambda: jsonl("batch"), 10_000),
        ("jsonl, no checkpoints", "steps/s", lambda: jsonl("batch", checkpoints=False), None),
        ("jsonl (sync)", "steps/s", lambda: jsonl("sync"), None),
        ("ask_user on jsonl", "cycles/s", pause_resume, None),
    ]
    # Rounds outside, rows inside: every row sees the same stretch of machine load, which
    # keeps the paired comparison (checkpoints on/off) fair on a noisy VM.
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in rows}
    for _ in range(args.rounds):
        for name, _unit, fn, _target in rows:
            figures[name].append(fn())  # type: ignore[operator]
    print(f"{'row':<22} {'wall':>9} {'per cpu-s':>10}  {'unit':<9} {'target':>7}  "
          "wall figures of each round")
    for name, unit, _fn, target in rows:
        wall = statistics.median(f[0] for f in figures[name])
        cpu = statistics.median(f[1] for f in figures[name])
        verdict = "" if target is None else ("ok" if wall >= target else "BELOW")
        print(
            f"{name:<22} {wall:>9,.0f} {cpu:>10,.0f}  {unit:<9} {target or '-':>7}  "
            f"{' '.join(f'{f[0]:,.0f}' for f in figures[name])} {verdict}"
        )
    on, off = figures["jsonl (batch)"], figures["jsonl, no checkpoints"]
    cost = statistics.median(b[1] / a[1] - 1 for a, b in zip(on, off, strict=True))
    print(f"checkpoint cost on JSONL (median over paired rounds, per CPU second): "
          f"{100 * cost:+.1f}% (target <= 10%)")
    parent.cleanup()


if __name__ == "__main__":
    main()
