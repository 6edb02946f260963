"""The AbstractRuntime driver: the peer workloads (see ``driver_common``) on ``abstractruntime``.

Stores: ``InMemoryRunStore`` + ``InMemoryLedgerStore`` (memory), and its SQLite store
(``SqliteRunStore`` + ``SqliteLedgerStore`` on one ``SqliteDatabase`` in
``DIR/abstractruntime.db``; sqlite).  A run is ``Runtime.start`` (creates it) then
``Runtime.tick`` (runs it until it blocks or completes); nodes are ``(run, ctx) -> StepPlan``.

* linear: ten nodes, each setting ``run.vars["i"]`` and naming the next node.
* pause: an ``ASK_USER`` effect; the outside resumes the run with ``Runtime.resume(wait_key=,
  payload=)``, which also ticks it to the end.
* crash: ten nodes.  AbstractRuntime has no recovery sweep of its own for runs that were
  RUNNING when their process died (its ``Scheduler`` wakes ``WAIT_UNTIL`` runs), so the
  restarted process does what its docs say a host does: load the run and ``tick`` it.
* sleep: a ``WAIT_UNTIL`` effect; the restarted process runs ``create_scheduled_runtime``
  (the built-in ``Scheduler``, which polls for due ``wait_until`` runs; default poll 1.0 s,
  kept: it is the default a user gets).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import driver_common as common
from abstractruntime import (
    Effect,
    EffectType,
    InMemoryLedgerStore,
    InMemoryRunStore,
    RunStatus,
    Runtime,
    SqliteDatabase,
    SqliteLedgerStore,
    SqliteRunStore,
    StepPlan,
    WorkflowSpec,
    create_scheduled_runtime,
)

logging.getLogger("abstractruntime").setLevel(logging.WARNING)


def stores(store: str, directory: Path) -> tuple[Any, Any]:
    """``(run store, ledger store)`` of a ``--store`` name."""
    if store == "memory":
        return InMemoryRunStore(), InMemoryLedgerStore()
    db = SqliteDatabase(directory / "abstractruntime.db")
    return SqliteRunStore(db), SqliteLedgerStore(db)


def line(workflow_id: str, before: Any = None) -> WorkflowSpec:
    """Ten nodes ``n1``..``n10`` in a line, each setting ``i``; ``before(n)`` runs first."""
    nodes: dict[str, Any] = {}
    for n in range(1, common.NODES + 1):
        def node(run: Any, ctx: Any, n: int = n) -> StepPlan:
            if before is not None:
                before(n)
            run.vars["i"] = n
            if n == common.NODES:
                return StepPlan(node_id=f"n{n}", complete_output={"i": n})
            return StepPlan(node_id=f"n{n}", next_node=f"n{n + 1}")
        nodes[f"n{n}"] = node
    return WorkflowSpec(workflow_id=workflow_id, entry_node="n1", nodes=nodes)


def approval() -> WorkflowSpec:
    def ask(run: Any, ctx: Any) -> StepPlan:
        effect = Effect(type=EffectType.ASK_USER, result_key="answer",
                        payload={"prompt": "ok?", "choices": ["yes", "no"]})
        return StepPlan(node_id="ask", effect=effect, next_node="end")

    def end(run: Any, ctx: Any) -> StepPlan:
        return StepPlan(node_id="end", complete_output={"answer": run.vars.get("answer")})

    return WorkflowSpec(workflow_id="approval", entry_node="ask",
                        nodes={"ask": ask, "end": end})


def sleeper(directory: Path, seconds: float) -> WorkflowSpec:
    def nap(run: Any, ctx: Any) -> StepPlan:
        due = datetime.now(UTC) + timedelta(seconds=seconds)
        common.record_due(directory, due.timestamp())
        effect = Effect(type=EffectType.WAIT_UNTIL, payload={"until": due.isoformat()})
        return StepPlan(node_id="nap", effect=effect, next_node="after")

    def after(run: Any, ctx: Any) -> StepPlan:
        common.record_woke(directory)
        return StepPlan(node_id="after", complete_output={})

    return WorkflowSpec(workflow_id="sleeper", entry_node="nap",
                        nodes={"nap": nap, "after": after})


def main() -> None:
    args = common.parse()
    directory = args.dir.resolve()
    if args.workload == "linear":
        run_store, ledger_store = stores(args.store, directory)
        rt = Runtime(run_store=run_store, ledger_store=ledger_store)
        wf = line("linear")
        finals: list[Any] = []

        def drive() -> None:
            for _ in range(args.runs):
                finals.append(rt.tick(workflow=wf, run_id=rt.start(workflow=wf)))

        wall, cpu = common.timed(drive)
        common.finish(steps=args.runs * common.NODES,
                      completed=sum(f.status is RunStatus.COMPLETED for f in finals),
                      wall=wall, cpu=cpu)
    elif args.workload == "pause":
        run_store, ledger_store = stores("sqlite", directory)
        rt = Runtime(run_store=run_store, ledger_store=ledger_store)
        wf = approval()
        finals = []

        def cycle() -> None:
            for _ in range(args.runs):
                run_id = rt.start(workflow=wf)
                paused = rt.tick(workflow=wf, run_id=run_id)
                assert paused.status is RunStatus.WAITING  # waiting for the person
                finals.append(rt.resume(workflow=wf, run_id=run_id,
                                        wait_key=paused.waiting.wait_key,
                                        payload={"text": "yes"}))

        wall, cpu = common.timed(cycle)
        common.finish(cycles=args.runs,
                      completed=sum(f.status is RunStatus.COMPLETED for f in finals),
                      wall=wall, cpu=cpu)
    elif args.workload == "crash":
        wf = line("crash", before=lambda n: common.crash_step(directory, n))
        run_store, ledger_store = stores("sqlite", directory)
        rt = Runtime(run_store=run_store, ledger_store=ledger_store)
        if args.phase == "start":
            rt.tick(workflow=wf, run_id=rt.start(workflow=wf, run_id="crash"))
            common.finish(error="step 5 did not kill the process")
        ready = time.time()
        state = rt.get_state("crash")
        if state.status is RunStatus.RUNNING:
            state = rt.tick(workflow=wf, run_id="crash")
        common.finish(done_at=time.time(), **common.readiness(ready),
                      completed=state.status is RunStatus.COMPLETED)
    else:
        wf = sleeper(directory, args.seconds)
        run_store, ledger_store = stores("sqlite", directory)
        if args.phase == "start":
            rt = Runtime(run_store=run_store, ledger_store=ledger_store)
            state = rt.tick(workflow=wf, run_id=rt.start(workflow=wf, run_id="sleeper"))
            if state.status is not RunStatus.WAITING:
                common.finish(error=f"the run did not sleep: {state.status}")
            common.die_after(args.kill_after)
        scheduled = create_scheduled_runtime(run_store=run_store, ledger_store=ledger_store,
                                             workflows=[wf])
        ready = time.time()
        woke = common.wait_for_file(directory / "woke", args.seconds + 30)
        common.finish(done_at=time.time(), **common.readiness(ready), completed=woke,
                      mechanism="WAIT_UNTIL + the built-in Scheduler (polls every 1.0 s)")
        scheduled.stop()


if __name__ == "__main__":
    main()
