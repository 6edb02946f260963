"""Speed of the auditor's verifier (issue 3).

Run: ``python benchmarks/bench_ledger.py [--runs 200] [--steps 250] [--dir DIR]``.

A JSONL ledger is written by the real ``Runtime`` (``runs`` runs of a workflow looping
``steps`` times, one record per commit, sealed, with the store-wide index and a checkpoint),
then verified:

* ``ed25519 only``: the binding the verifier uses, alone, over the same bodies (the ceiling);
* ``full, 1 process`` (target >= 15,000 records/s);
* ``full, 2 processes`` (target >= 1.6x the one-process figure);
* ``chain`` (target >= 300,000 records/s).

Each figure is the best of ``--rounds`` (default 3) so that other processes on a shared
machine disturb it less; the load average is printed next to the figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ledger_fixtures import IndexedStore
from wakepoint import Runtime, Workflow, done, goto
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.logindex import append_checkpoint
from wakepoint.ledger.records import pae
from wakepoint.ledger.rotation import seal_record
from wakepoint.ledger.trust import TrustRoot
from wakepoint.ledger.verify import ed25519_verify, verify
from wakepoint.stores.jsonl import JsonlStore


def build(path: Path, runs: int, steps: int, signer: Signer) -> None:
    wf = Workflow("loop")

    @wf.node(start=True)
    def step(run):  # type: ignore[no-untyped-def]
        n = run.vars.get("n", 0)
        if n >= steps:
            return done(n)
        return goto("step", set={"n": n + 1})

    store = IndexedStore(path, durability="none", log_id="bench")
    rt = Runtime(store, workflows=[wf], signer=signer)
    for i in range(runs):
        state = rt.start("loop", None, run_id=f"run-{i:05d}")
        _, rec = seal_record(signer, store.log_id, state, state.updated_at)
        store.commit(state.run_id, state.seq, _, [rec])
    append_checkpoint(path, store.log_id, signer)
    rt.close()


def best(rounds: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    signer = Signer.from_seed(b"\x05" * 32)
    path = args.dir or Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    if not (path / "index.jsonl").exists():
        t = time.perf_counter()
        build(path, args.runs, args.steps, signer)
        print(f"built {path} in {time.perf_counter() - t:.1f}s")
    trust = TrustRoot.from_signers([signer], log_id="bench")
    report = verify(path, trust)
    assert report.ok, report.error
    n = report.records
    print(f"ledger: {n} records in {report.runs} runs; load average {os.getloadavg()}")

    store = JsonlStore(path, durability="none")
    bodies = [(r.sig, pae(r.body)) for r in store.ledger("run-00000")][:2000]
    store.close()
    public = signer.public

    def raw() -> None:
        for sig, msg in bodies:
            ed25519_verify(sig, msg, public)

    t = best(args.rounds, raw)
    print(f"ed25519 only       {len(bodies) / t:>10,.0f} signatures/s")
    one = n / best(args.rounds, lambda: verify(path, trust))
    print(f"full, 1 process    {one:>10,.0f} records/s  (target 15,000)")
    two = n / best(args.rounds, lambda: verify(path, trust, processes=2))
    print(f"full, 2 processes  {two:>10,.0f} records/s  ({two / one:.2f}x; target 1.6x)")
    chain = n / best(args.rounds, lambda: verify(path, trust, mode="chain"))
    print(f"chain              {chain:>10,.0f} records/s  (target 300,000)")


if __name__ == "__main__":
    main()
