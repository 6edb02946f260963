"""ask_user: a run pauses for a person, a *different process* answers, a third verifies.

This is wakepoint's core promise in three commands.  Each one is a separate Python process
that opens the embedded default store (a JSONL directory plus the Ed25519 key file
``signer.key`` in it) under ``--home``:

    python examples/ask_user.py start                  # process 1: starts a run, it pauses
    python examples/ask_user.py answer RUN_ID approve  # process 2: answers; the run completes
    python examples/ask_user.py verify RUN_ID          # process 3: verifies the signed ledger
    python examples/ask_user.py demo                   # runs the three above as subprocesses

The workflow is an expense approval: ``submit`` asks a person to approve or reject (with a
three-day timeout that escalates), ``decide`` records the answer.  Nothing is kept in memory
between the commands: the question, the choices and where to continue all live in the store.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import structlog
from wakepoint import (
    Runtime,
    RunView,
    Status,
    WakepointError,
    Workflow,
    ask_user,
    done,
    goto,
)

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

KEY_FILE = "signer.key"  # where Runtime() keeps the default store's signing key

approval = Workflow("expense-approval")


@approval.node(start=True)
def submit(run: RunView):
    expense = run.input
    return ask_user(
        f"Approve {expense['amount']} {expense['currency']} for {expense['what']!r} "
        f"by {expense['who']}?",
        choices=["approve", "reject"],
        into="decision",
        then="decide",
        timeout=3 * 24 * 3600,  # nobody answered in three days: escalate
        on_timeout="escalate",
    )


@approval.node
def decide(run: RunView):
    return done({"expense": run.input["what"], "decision": run.vars["decision"]})


@approval.node
def escalate(run: RunView):
    return goto("decide", set={"decision": "escalated to finance"})


def shown(path: str) -> str:
    """``path`` as a person would type it from the current directory."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def runtime(home: str) -> Runtime:
    """The embedded default store under ``home`` (created on first use)."""
    return Runtime(workflows=[approval], home=home)


def cmd_start(args: argparse.Namespace) -> int:
    expense = {"who": "ada", "what": "conference ticket", "amount": 450, "currency": "EUR"}
    with runtime(args.home) as rt:
        state = rt.start(approval, expense)
    assert state.wait is not None
    print(f"[pid {os.getpid()}] started run {state.run_id}; it is {state.status.value}")
    print(f"run_id: {state.run_id}")
    print(f"question: {state.wait.prompt}")
    print(f"choices: {', '.join(state.wait.choices or ())}")
    print(f"answer from any process: python {shown(__file__)} answer {state.run_id} approve "
          f"--home {args.home}")
    return 0 if state.status is Status.WAITING else 1


def cmd_answer(args: argparse.Namespace) -> int:
    with runtime(args.home) as rt:
        try:
            waiting = rt.get(args.run_id)
            question = waiting.wait.prompt if waiting.wait else None
            state = rt.respond(args.run_id, args.choice)
        except WakepointError as exc:
            print(f"[pid {os.getpid()}] cannot answer: {exc}", file=sys.stderr)
            return 1
    print(f"[pid {os.getpid()}] loaded run {state.run_id} from the store; "
          f"it was waiting on: {question}")
    print(f"answered {args.choice!r}; the run is {state.status.value}")
    print(f"output: {state.output}")
    return 0 if state.status is Status.COMPLETED else 1


def cmd_verify(args: argparse.Namespace) -> int:
    key_file = Path(args.home) / KEY_FILE
    if not key_file.is_file():
        print(f"no key file at {key_file}", file=sys.stderr)
        return 1
    # The key file is passed explicitly: verification uses exactly the key that signed.
    with Runtime(workflows=[approval], home=args.home, signer=key_file) as rt:
        try:
            records = rt.ledger(args.run_id)
            count = rt.verify(args.run_id)
        except WakepointError as exc:
            print(f"[pid {os.getpid()}] chain does NOT verify: {exc}", file=sys.stderr)
            return 1
        state = rt.get(args.run_id)
    key_ids = sorted({record.key_id for record in records})
    print(f"[pid {os.getpid()}] run {args.run_id} ({state.status.value}): {count} records, "
          f"seq 0..{count - 1}, signed by {', '.join(key_ids)} ({key_file})")
    print(f"chain: ok ({count} records)")
    return 0


def _step(title: str, argv: list[str]) -> str:
    """Run one subcommand in a fresh interpreter, echo its output, fail loudly."""
    print(f"\n== {title}")
    shown_argv = argv[2:] if argv[1] == "-m" else [shown(argv[1]), *argv[2:]]
    print("$ " + " ".join(["python", *(["-m"] if argv[1] == "-m" else []), *shown_argv]))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    for line in (proc.stdout + proc.stderr).splitlines():
        print(f"   {line}")
    if proc.returncode != 0:
        raise SystemExit(f"demo: step {title!r} failed with exit code {proc.returncode}")
    return proc.stdout


def cmd_demo(args: argparse.Namespace) -> int:
    me = [sys.executable, str(Path(__file__).resolve())]
    home = ["--home", args.home]
    print(f"demo: separate processes share the store in {args.home}")
    out = _step("1. start a run; it asks a person and the process exits",
                [*me, "start", *home])
    found = re.search(r"^run_id: (\S+)$", out, re.MULTILINE)
    if found is None:
        raise SystemExit("demo: the start step printed no run id")
    run_id = found.group(1)
    out = _step("2. a new process answers the question; the run completes",
                [*me, "answer", run_id, "approve", *home])
    if "the run is completed" not in out:
        raise SystemExit("demo: the run did not complete")
    out = _step("3. a third process verifies the signed hash chain with the key file",
                [*me, "verify", run_id, *home])
    if "chain: ok" not in out:
        raise SystemExit("demo: the chain did not verify")
    # The auditor's view: only the public key leaves the writer (a trust root file), and the
    # verifier checks every record's signature, the chains, the run's seal, the store-wide
    # index and the signed checkpoint - offline, with the `wakepoint` command.
    cli = [sys.executable, "-m", "wakepoint"]
    trust = os.path.join(args.home, "trust.json")
    _step("4. an auditor gets the trust root (public key only) ...",
          [*cli, "keys", "trust", "--key", os.path.join(args.home, KEY_FILE),
           "--store", f"jsonl:{args.home}", "--out", trust])
    out = _step("   ... and verifies the whole ledger offline",
                [*cli, "ledger", "verify", args.home, "--trust", trust])
    if not out.startswith("OK"):
        raise SystemExit("demo: the auditor's verification failed")
    print(f"\ndemo: ok - run {run_id} paused, was answered by another process, completed, "
          "and its ledger verified")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default="./.wakepoint",
                        help="directory of the default JSONL store and its key (./.wakepoint)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start an approval run; it pauses for a person")
    answer = sub.add_parser("answer", help="answer a paused run from this process")
    answer.add_argument("run_id")
    answer.add_argument("choice")
    verify = sub.add_parser("verify", help="verify a run's ledger chain with the key file")
    verify.add_argument("run_id")
    sub.add_parser("demo", help="run start, answer and verify as three subprocesses")
    # Accept --home after the subcommand too (``ask_user.py demo --home DIR``).
    for command in sub.choices.values():
        command.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    handlers = {"start": cmd_start, "answer": cmd_answer, "verify": cmd_verify,
                "demo": cmd_demo}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
