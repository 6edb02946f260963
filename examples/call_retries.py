"""call_retries: side effects through ``call`` - retries with backoff, idempotency key, on_error.

A node never performs a side effect itself; it returns ``call(name, args, ...)`` and the
runtime runs the registered function, records the request and the result in the ledger, and
continues at ``then`` with the result in ``into``.  A committed result is never recomputed.

1. ``charge`` is flaky: it raises ``ConnectionError`` twice, then succeeds.  The policy
   ``Retry(attempts=5, initial=0.01, ..., retry_on=(ConnectionError,))`` retries it with
   exponential backoff.  It declares an ``idempotency_key`` parameter, so it receives
   ``run_id:step`` - the same value on every attempt and after a crash - which a real payment
   API would use to deduplicate.
2. ``lookup`` raises ``KeyError`` for an unknown customer, which the policy does not retry:
   the second run continues at the node's ``on_error`` branch with the error in ``into``.

Run it:  python examples/call_retries.py
"""

from __future__ import annotations

import logging

import structlog
from wakepoint import Retry, Runtime, RunView, Status, Workflow, call, done

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

# --- the side-effecting functions (plain Python, registered by name) ----------------------

attempts: list[str] = []  # the idempotency key of every attempt, in order


def charge(amount: int, idempotency_key: str) -> dict[str, object]:
    """A payment API that drops the connection twice per payment before it answers."""
    attempts.append(idempotency_key)
    tries = attempts.count(idempotency_key)
    print(f"   charge attempt {tries} with idempotency key {idempotency_key!r}")
    if tries < 3:
        raise ConnectionError("payment gateway reset the connection")
    return {"charged": amount, "receipt": f"rcpt-{idempotency_key}"}


CUSTOMERS = {"ada": "Ada Lovelace"}
lookups: list[str] = []


def lookup(customer: str) -> str:
    """A lookup whose failure (an unknown customer) retrying cannot fix."""
    lookups.append(customer)
    return CUSTOMERS[customer]  # KeyError for anyone else


POLICY = Retry(attempts=5, initial=0.01, multiplier=2.0, max_delay=0.1, jitter=0.1,
               retry_on=(ConnectionError,))

# --- the workflow --------------------------------------------------------------------------

checkout = Workflow("checkout")


@checkout.node(start=True)
def pay(run: RunView):
    return call("charge", {"amount": run.input["amount"]}, into="payment", then="find_customer",
                retry=POLICY)


@checkout.node
def find_customer(run: RunView):
    return call("lookup", {"customer": run.input["customer"]}, into="customer", then="finish",
                retry=POLICY, on_error="no_customer")


@checkout.node
def finish(run: RunView):
    return done({"payment": run.vars["payment"], "customer": run.vars["customer"]})


@checkout.node
def no_customer(run: RunView):
    # ``into`` holds {"error": {"type": ..., "message": ...}} when the call failed.
    return done({"payment": run.vars["payment"], "customer_error": run.vars["customer"]})


def main() -> int:
    with Runtime("memory:", workflows=[checkout],
                 functions={"charge": charge, "lookup": lookup}) as rt:
        print("1. a flaky call, retried on ConnectionError:")
        first = rt.start(checkout, {"amount": 42, "customer": "ada"}, run_id="checkout-1")
        first_attempts = list(attempts)
        print(f"   {len(first_attempts)} attempts, one idempotency key: "
              f"{sorted(set(first_attempts))}")
        print(f"   run {first.run_id} {first.status.value}: {first.output}")
        print(f"   ledger verified: {rt.verify(first.run_id)} records")

        print("2. a KeyError is not in retry_on: one attempt, then the on_error branch")
        print("   (the runtime logs the failed effect as a warning)")
        second = rt.start(checkout, {"amount": 7, "customer": "zed"}, run_id="checkout-2")
        print(f"   lookup attempts for 'zed': {lookups.count('zed')}")
        print(f"   run {second.run_id} {second.status.value} via no_customer: "
              f"{second.output['customer_error']}")
        ok = (first.status is Status.COMPLETED
              and first_attempts == ["checkout-1:2"] * 3
              and first.output["customer"] == "Ada Lovelace"
              and second.status is Status.COMPLETED and lookups == ["ada", "zed"]
              and second.output["customer_error"]["error"]["type"] == "KeyError")
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
