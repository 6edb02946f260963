"""subworkflow: child runs - wait for the output, detach, handle a failing child, cancel.

A node returns ``subworkflow(child_workflow, input, into=, then=, mode=)`` to start a child
run with its own state and ledger (both runs record the parent link).

1. ``mode="wait"``: the parent parks until the child finishes and resumes automatically with
   the child's output in ``into``.
2. ``mode="detach"``: the parent continues at once with the child's run id in ``into``.
3. A waited-for child that fails sends the parent to ``on_error``, with the error in ``into``.
4. Cancelling a parent cancels the child it is waiting for (the cascade).

Run it:  python examples/subworkflow.py
"""

from __future__ import annotations

import logging

import structlog
from wakepoint import (
    Runtime,
    RunView,
    Status,
    Workflow,
    done,
    fail,
    subworkflow,
    wait_event,
)

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

# --- children ------------------------------------------------------------------------------

quote = Workflow("quote")


@quote.node(start=True)
def price(run: RunView):
    items = run.input["items"]
    return done({"total": sum(qty * unit for qty, unit in items)})


receipt = Workflow("receipt")


@receipt.node(start=True)
def send_receipt(run: RunView):
    return done(f"receipt sent to {run.input['email']}")


charge = Workflow("charge")


@charge.node(start=True)
def charge_card(run: RunView):
    if run.input["card"] == "expired":
        return fail("card expired")
    return done("charged")


approval = Workflow("manager-approval")


@approval.node(start=True)
def await_manager(run: RunView):
    return wait_event(f"manager:{run.input['order']}", into="answer", then="finished")


@approval.node
def finished(run: RunView):
    return done(run.vars["answer"])


# --- the parent ----------------------------------------------------------------------------

order = Workflow("order")


@order.node(start=True)
def get_quote(run: RunView):
    return subworkflow(quote, {"items": run.input["items"]}, into="quote", then="get_paid")


@order.node
def get_paid(run: RunView):
    return subworkflow(charge, {"card": run.input["card"]}, into="charged", then="notify",
                       on_error="payment_failed")


@order.node
def notify(run: RunView):
    return subworkflow(receipt, {"email": run.input["email"]}, into="receipt_run",
                       then="approve", mode="detach")


@order.node
def approve(run: RunView):
    if run.vars["quote"]["total"] > 100:
        return subworkflow(approval, {"order": run.run_id}, into="approval", then="ship")
    return done({"total": run.vars["quote"]["total"], "receipt_run": run.vars["receipt_run"]})


@order.node
def ship(run: RunView):
    return done({"total": run.vars["quote"]["total"], "approval": run.vars["approval"]})


@order.node
def payment_failed(run: RunView):
    return done({"total": run.vars["quote"]["total"], "error": run.vars["charged"]["error"]})


def main() -> int:
    ok = True
    with Runtime("memory:", workflows=[quote, receipt, charge, approval, order]) as rt:
        print("1+2. wait for a child's output, then detach another child")
        small = rt.start(order, {"items": [[2, 10], [1, 5]], "card": "valid",
                                 "email": "ada@example.com"}, run_id="order-1")
        print(f"   parent {small.status.value}: {small.output}")
        detached = rt.get(small.output["receipt_run"])
        print(f"   detached child {detached.run_id} ({detached.workflow}): "
              f"{detached.status.value}, output {detached.output!r}")
        print(f"   children of the parent: {list(small.children)}")
        ok &= small.status is Status.COMPLETED and small.output["total"] == 25
        ok &= detached.status is Status.COMPLETED

        print("3. a failing child sends the parent to on_error")
        bad = rt.start(order, {"items": [[1, 40]], "card": "expired", "email": "bo@example.com"},
                       run_id="order-2")
        child = rt.get(bad.children[-1])
        print(f"   child {child.run_id}: {child.status.value} ({child.error.message})")
        print(f"   parent {bad.status.value} at payment_failed: {bad.output}")
        ok &= child.status is Status.FAILED and bad.output["error"]["message"].endswith(
            "card expired")

        print("4. cancelling a parent cancels the child it waits for")
        big = rt.start(order, {"items": [[3, 50]], "card": "valid", "email": "cy@example.com"},
                       run_id="order-3")
        waiting_child = rt.get(big.children[-1])
        print(f"   parent {big.status.value} on child {waiting_child.run_id} "
              f"({waiting_child.workflow}, {waiting_child.status.value})")
        cancelled = rt.cancel(big.run_id, "customer withdrew the order")
        waiting_child = rt.get(waiting_child.run_id)
        print(f"   parent {cancelled.status.value}; child {waiting_child.status.value}: "
              f"{waiting_child.error.message}")
        ok &= waiting_child.status is Status.CANCELLED
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
