"""wait_event: runs wait for a webhook-style event, with a deadline that branches on timeout.

Each order run waits on the event key ``order:{id}`` (what a payment provider's webhook would
deliver).  ``Runtime.send_event(key, payload)`` resumes every run waiting on that key with the
payload in a var.  A run whose deadline passes first continues at its ``on_timeout`` node with
``{"timed_out": True}`` in that var - here it cancels the order.

Time is a hand-set clock passed to ``Runtime(clock=...)`` so that the 48-hour deadline passes
in a moment; a real deployment uses the default clock and lets the scheduler call
``wake_due()`` at ``next_due()``.

Run it:  python examples/wait_event.py
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import structlog
from wakepoint import Runtime, RunView, Workflow, done, wait_event

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

orders = Workflow("order")


@orders.node(start=True)
def await_payment(run: RunView):
    return wait_event(
        f"order:{run.input['id']}",
        into="payment",
        then="ship",
        deadline=run.now + timedelta(hours=48),
        on_timeout="cancel_order",
    )


@orders.node
def ship(run: RunView):
    payment = run.vars["payment"]
    return done({"order": run.input["id"], "shipped": True, "paid": payment["amount"]})


@orders.node
def cancel_order(run: RunView):
    # The payment var holds {"timed_out": True}: the deadline passed before any event.
    return done({"order": run.input["id"], "shipped": False, "why": "no payment in 48 h",
                 "payment": run.vars["payment"]})


class Clock:
    """A clock the example moves by hand (the runtime asks it for ``now``)."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def main() -> int:
    clock = Clock()
    with Runtime("memory:", workflows=[orders], clock=clock) as rt:
        runs = {order: rt.start(orders, {"id": order}, run_id=f"order-{order}")
                for order in ("A1", "B2", "C3")}
        for order, state in runs.items():
            assert state.wait is not None
            print(f"order {order}: {state.status.value} on event {state.wait.key!r} "
                  f"until {state.wait.deadline:%Y-%m-%d %H:%M}")

        # Two webhooks arrive (one of them for an order nobody waits on).
        clock.now += timedelta(hours=2)
        for key, payload in [("order:A1", {"amount": 30}), ("order:Z9", {"amount": 5}),
                             ("order:B2", {"amount": 12})]:
            resumed = rt.send_event(key, payload)
            print(f"send_event({key!r}) resumed {len(resumed)} run(s): "
                  f"{[s.output for s in resumed]}")

        # Nothing arrives for C3; once the deadline has passed the wake-up times it out.
        clock.now += timedelta(hours=47)
        print(f"next deadline due: {rt.next_due():%Y-%m-%d %H:%M}; clock is now "
              f"{clock.now:%Y-%m-%d %H:%M}")
        for state in rt.wake_due():
            print(f"woke {state.run_id}: {state.status.value} -> {state.output}")

        finals = {order: rt.get(f"order-{order}") for order in runs}
        shipped = sorted(o for o, s in finals.items() if s.output["shipped"])
        print(f"shipped: {shipped}; cancelled: "
              f"{sorted(o for o in finals if o not in shipped)}")
        return 0 if shipped == ["A1", "B2"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
