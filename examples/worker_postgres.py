"""worker_postgres: two worker processes share one PostgreSQL database.

    python examples/worker_postgres.py postgresql+psycopg://USER@HOST/DB

The database must exist; the example creates the schema (``wakepoint db upgrade``), starts two
worker processes (this file with ``--worker``, i.e. ``main_worker`` with this module's app:
what ``wakepoint worker --store URL --app worker_postgres:app`` runs), starts 40 runs from
this process, and waits until all have finished.  Each run sleeps 0.2 s, calls ``charge`` (a
``call`` effect), sleeps again and finishes; ``charge`` reports the process that ran it.  The
runs are claimed with ``FOR UPDATE SKIP LOCKED``, so the two workers split them and none runs
twice: the example prints how many calls each worker made and checks that every run's call
ran exactly once.  Finally it stops the workers with SIGTERM (they finish what they are doing
and give their leases back).  All processes share the signing key in ``--home`` (default: a
temporary directory), as every worker of a deployment must.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import structlog
from wakepoint import Runtime, RunView, Status, Workflow, call, done, wait_until
from wakepoint.scheduler import App, main_worker

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

order = Workflow("order")


@order.node(start=True)
def hold(run: RunView):
    return wait_until(0.2, then="pay")


@order.node
def pay(run: RunView):
    return call("charge", {"amount": run.input}, into="receipt", then="settle")


@order.node
def settle(run: RunView):
    return wait_until(0.2, then="finish")


@order.node
def finish(run: RunView):
    return done(run.vars["receipt"])


def charge(amount: int, idempotency_key: str) -> dict[str, object]:
    # A real charge would pass idempotency_key to the payment provider.
    return {"amount": amount, "key": idempotency_key, "pid": os.getpid()}


app = App(workflows=[order], functions={"charge": charge})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--home", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return main_worker(args.url, app, concurrency=2, home=args.home)
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or tmp
        subprocess.run([sys.executable, "-m", "wakepoint", "db", "upgrade", args.url],
                       check=True, capture_output=True)
        workers = [subprocess.Popen([sys.executable, __file__, args.url, "--home", home,
                                     "--worker"]) for _ in range(2)]
        try:
            with Runtime(args.url, [order], {"charge": charge}, home=home) as rt:
                ids = [f"order-{os.getpid()}-{i}" for i in range(40)]
                for i, run_id in enumerate(ids):
                    rt.start(order, 10 + i, run_id=run_id)
                end = time.monotonic() + 30
                while time.monotonic() < end and not all(
                    rt.get(r).status is Status.COMPLETED for r in ids
                ):
                    time.sleep(0.1)
                states = [rt.get(r) for r in ids]
                done_ok = all(s.status is Status.COMPLETED for s in states)
                by_pid = Counter(s.output["pid"] for s in states if s.output)
                keys = Counter(s.output["key"] for s in states if s.output)
                print(f"{sum(s.status is Status.COMPLETED for s in states)}/{len(ids)} runs "
                      "completed")
                for pid, count in sorted(by_pid.items()):
                    print(f"worker pid {pid}: {count} calls")
                once = all(count == 1 for count in keys.values()) and len(keys) == len(ids)
                print(f"every call ran once: {once}")
                verified = sum(rt.verify(r) for r in ids)
                print(f"ledgers verified: {verified} records")
        finally:
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
            codes = [proc.wait(timeout=20) for proc in workers]
        print(f"workers stopped with exit codes {codes}")
    ok = done_ok and once and codes == [0, 0]
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
