"""The ``wakepoint`` command (console script and ``python -m wakepoint``).

What exists today (the rest of the design's CLI - ``run``, ``runs``, ``respond``, ``send``,
``cancel``, ``worker``, ``ledger verify|export|checkpoint``, ``keys``, ``db`` - comes with the
worker, SQL store and auditor work):

    wakepoint --version
    wakepoint ledger verify-chain RUN_ID --store URL [--key KEY_FILE]
    wakepoint db upgrade URL

``verify-chain`` checks one run's chain (signatures, contiguous seq, prev links, genesis) with
one key: ``--key``, or for a ``jsonl:PATH`` store the store's own ``PATH/signer.key``.  It is
the writer's self-check, not the auditor's verifier (trust roots, rotation and checkpoints are
not handled here).  It never creates anything: a store directory or key file that does not
exist is an error, not a fresh store.

``db upgrade`` brings a SQL store's database (``sqlite:///PATH``, ``postgresql+psycopg://...``)
to this code's schema under a migration lock; it is idempotent and refuses, writing nothing,
a database that is not wakepoint's or is newer than this code.

Exit codes: 0 verified (or upgraded); 1 the chain does not verify, the run, store or key cannot
be read, or the database is refused; 2 usage errors (argparse's convention).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .kernel.errors import WakepointError
from .ledger.keys import Signer
from .ledger.records import verify_chain
from .runtime import _KEY_FILE
from .stores import open_store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wakepoint", description="wakepoint: a durable workflow kernel."
    )
    parser.add_argument("--version", action="version", version=f"wakepoint {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ledger = commands.add_parser("ledger", help="inspect and verify run ledgers")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND",
                                            required=True)
    verify = ledger_commands.add_parser(
        "verify-chain", help="verify one run's hash chain and signatures with one key"
    )
    verify.add_argument("run_id", metavar="RUN_ID")
    verify.add_argument("--store", required=True, metavar="URL",
                        help="the store holding the run, e.g. jsonl:./.wakepoint")
    verify.add_argument("--key", metavar="KEY_FILE",
                        help="the signer's key file (default for jsonl:PATH: PATH/signer.key)")
    db = commands.add_parser("db", help="manage a SQL store's database")
    db_commands = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", help="bring the database to this code's schema (idempotent)"
    )
    upgrade.add_argument("url", metavar="URL",
                         help="a SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://...")
    return parser


def _db_upgrade(args: argparse.Namespace) -> int:
    from .migrations import HEAD, upgrade  # SQLAlchemy and Alembic load only for this command

    try:
        before = upgrade(args.url)
    except WakepointError as exc:  # StoreError: not wakepoint's, newer schema, no driver, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if before == HEAD:
        print(f"ok: already at {HEAD}")
    else:
        print(f"ok: upgraded {before or 'an empty database'} -> {HEAD}")
    return 0


def _verify_chain(args: argparse.Namespace) -> int:
    scheme, _, rest = args.store.partition(":")
    if scheme == "jsonl" and rest and not Path(rest).is_dir():
        # Opening a JSONL store creates its directory; a verifier must not.
        print(f"error: no JSONL store at {rest}", file=sys.stderr)
        return 1
    key_file = args.key
    if key_file is None:
        if scheme != "jsonl" or not rest:
            print(f"error: --key is required for store {args.store!r}", file=sys.stderr)
            return 1
        key_file = str(Path(rest) / _KEY_FILE)
    try:
        signer = Signer.load(key_file)
        store = open_store(args.store)
        try:
            records = store.ledger(args.run_id)
        finally:
            store.close()
        if not records:
            print(f"error: run {args.run_id!r} has no ledger records", file=sys.stderr)
            return 1
        count = verify_chain(records, signer, log_id=store.log_id, run_id=args.run_id)
    except WakepointError as exc:  # ChainError, RunNotFound, KeyFileError, StoreError, ...
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {count} records")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "ledger" and args.ledger_command == "verify-chain":
        return _verify_chain(args)
    if args.command == "db" and args.db_command == "upgrade":
        return _db_upgrade(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse requires one
