"""hello: the smallest workflow - three nodes, ``goto`` carrying vars, ``done``.

A workflow is a set of named nodes (plain functions).  Each node reads the run through a
read-only view and returns the next *step*: here ``goto(node, set={...})`` to continue at
another node with new vars, and ``done(output)`` to finish.  Every transition is committed to
the store together with a signed ledger record; the example prints the run's path through the
ledger and verifies its hash chain.

Run it:  python examples/hello.py
"""

from __future__ import annotations

import json
import logging

import structlog
from wakepoint import Runtime, RunView, Status, Workflow, done, goto

# The library logs through structlog and never configures it; the application does.  Keep the
# example's output to what it prints itself.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

wf = Workflow("hello")


@wf.node(start=True)
def greet(run: RunView):
    name = run.input["name"]
    return goto("shout", set={"greeting": f"hello, {name}"})


@wf.node
def shout(run: RunView):
    # Vars set by the previous node arrive here; a node changes vars only through its step.
    return goto("finish", set={"greeting": run.vars["greeting"].upper() + "!"})


@wf.node
def finish(run: RunView):
    return done({"message": run.vars["greeting"], "steps_before_done": run.step})


def main() -> int:
    # "memory:" keeps this example free of files; Runtime() alone would use ./.wakepoint.
    with Runtime("memory:", workflows=[wf]) as rt:
        state = rt.start(wf, {"name": "world"})
        print(f"run {state.run_id}: {state.status.value}")
        print(f"output: {state.output}")
        print("ledger (one signed record per transition):")
        for record in rt.ledger(state.run_id):
            body = json.loads(record.body)
            step = f"{body.get('node') or '-'} -> {body.get('next') or '-'}"
            print(f"  seq {body['seq']}: {body['kind']:<15} {step}")
        records = rt.verify(state.run_id)
        print(f"chain verified: {records} records ok")
        return 0 if state.status is Status.COMPLETED else 1


if __name__ == "__main__":
    raise SystemExit(main())
