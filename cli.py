"""The ``wakepoint`` command (console script and ``python -m wakepoint``).

What exists today (the rest of the design's CLI - ``run``, ``runs``, ``respond``, ``send``,
``cancel``, ``ledger export|checkpoint``, ``keys rotate`` - is still to come)::

    wakepoint --version
    wakepoint ledger verify SOURCE --trust FILE [--anchor FILE] [--json] [--mode full|chain]
    wakepoint ledger verify-chain RUN_ID --store URL [--key KEY_FILE]
    wakepoint keys generate FILE
    wakepoint keys trust --key FILE [--key FILE ...] (--store URL | --log-id ID) [--out FILE]
    wakepoint worker --store URL --app module:attribute [--concurrency N] [--home DIR]
    wakepoint db upgrade URL

``ledger verify`` is the auditor's verifier (``wakepoint.ledger.verify``; docs/AUDIT.md):
SOURCE is a JSONL store directory (``jsonl:PATH`` is accepted too), one run file, or a SQL URL;
``--trust`` is the trust root the auditor holds, ``--anchor`` a file holding the last signed
checkpoint they hold.  It prints ``render_summary`` (or the full report with ``--json``).  It
runs with ``require_seals=False`` for now: the runtime does not write ``run.sealed`` records
yet, so every finished run would otherwise fail with ``missing_seal``.  Switch it back on when
the runtime seals finished runs.

``verify-chain`` checks one run's chain (signatures, contiguous seq, prev links, genesis) with
one key: ``--key``, or for a ``jsonl:PATH`` store the store's own ``PATH/signer.key``.  It is
the writer's self-check, not the auditor's verifier.

``keys generate`` writes a new Ed25519 key file (owner-only, mode 0600) and prints its key id;
it never replaces an existing file.  ``keys trust`` prints (or writes to a new ``--out`` file,
never replacing one) a trust root holding the public halves of the ``--key`` files, bound to
the ledger's log id: given with ``--log-id`` or read from ``--store``.

``worker`` runs ``wakepoint.scheduler.main_worker`` until SIGTERM/SIGINT (then exits 0).  The
current directory is put on ``sys.path`` first, so ``--app`` can name a module beside you also
when run through the console script.  The key is read from ``--home`` (default ``.wakepoint``),
or for a ``jsonl:PATH`` store from ``PATH/signer.key``.

``db upgrade`` brings a SQL store's database (``sqlite:///PATH``, ``postgresql+psycopg://...``)
to this code's schema under a migration lock; it is idempotent and refuses, writing nothing,
a database that is not wakepoint's or is newer than this code.

Only ``worker`` (which opens its store as the runtime does) and ``db upgrade`` may create a
store; the other commands read what exists: a JSONL store directory, SQLite file or key file
that does not exist is an error, not a fresh one.

Exit codes: 0 verified / done; 1 the ledger does not verify, or a store, key, file or database
cannot be read, written or is refused; 2 usage errors (argparse's convention, plus an unreadable
trust root or anchor, a source that is not a ledger, an ``--app`` that cannot be loaded).
Errors are one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .kernel.errors import WakepointError
from .ledger.keys import Signer
from .ledger.records import verify_chain
from .runtime import _KEY_FILE, DEFAULT_HOME
from .stores import open_store


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wakepoint", description="wakepoint: a durable workflow kernel."
    )
    parser.add_argument("--version", action="version", version=f"wakepoint {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ledger = commands.add_parser("ledger", help="inspect and verify run ledgers")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND",
                                            required=True)
    audit = ledger_commands.add_parser(
        "verify", help="verify a whole ledger against a trust root (the auditor's verifier)"
    )
    audit.add_argument("source", metavar="SOURCE",
                       help="a JSONL store directory, one run file, or a SQL URL")
    audit.add_argument("--trust", required=True, metavar="FILE", help="the trust root (JSON)")
    audit.add_argument("--anchor", metavar="FILE",
                       help="the last signed checkpoint you hold (a JSONL store only)")
    audit.add_argument("--json", action="store_true", help="print the full report as JSON")
    audit.add_argument("--mode", choices=("full", "chain"), default="full",
                       help="full (default) or chain: hashes and links only, no signatures")
    chain = ledger_commands.add_parser(
        "verify-chain", help="verify one run's hash chain and signatures with one key"
    )
    chain.add_argument("run_id", metavar="RUN_ID")
    chain.add_argument("--store", required=True, metavar="URL",
                       help="the store holding the run, e.g. jsonl:./.wakepoint")
    chain.add_argument("--key", metavar="KEY_FILE",
                       help="the signer's key file (default for jsonl:PATH: PATH/signer.key)")

    keys = commands.add_parser("keys", help="create signing keys and trust roots")
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    generate = keys_commands.add_parser(
        "generate", help="write a new Ed25519 key file (mode 0600; never overwrites)"
    )
    generate.add_argument("file", metavar="FILE")
    trust = keys_commands.add_parser(
        "trust", help="export a trust root (public keys) for auditors"
    )
    trust.add_argument("--key", action="append", required=True, metavar="FILE",
                       help="a key file whose public key to trust (repeatable)")
    log = trust.add_mutually_exclusive_group(required=True)
    log.add_argument("--store", metavar="URL", help="read the ledger's log id from this store")
    log.add_argument("--log-id", metavar="ID", help="the ledger's log id")
    trust.add_argument("--out", metavar="FILE",
                       help="write to this new file instead of standard output")

    worker = commands.add_parser("worker", help="run a worker: timers, waits, recovery, cron")
    worker.add_argument("--store", required=True, metavar="URL",
                        help="the store, e.g. jsonl:./.wakepoint or postgresql+psycopg://...")
    worker.add_argument("--app", required=True, metavar="MODULE:ATTRIBUTE",
                        help="an App, a Workflow, a list of them, or a callable returning one")
    worker.add_argument("--concurrency", type=_positive, default=1, metavar="N",
                        help="runs driven at once (default 1)")
    worker.add_argument("--home", default=DEFAULT_HOME, metavar="DIR",
                        help=f"where the signer key lives for a non-JSONL store "
                             f"(default {DEFAULT_HOME})")

    db = commands.add_parser("db", help="manage a SQL store's database")
    db_commands = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", help="bring the database to this code's schema (idempotent)"
    )
    upgrade.add_argument("url", metavar="URL",
                         help="a SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://...")
    return parser


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _db_upgrade(args: argparse.Namespace) -> int:
    from .migrations import HEAD, upgrade  # SQLAlchemy and Alembic load only for this command

    try:
        before = upgrade(args.url)
    except WakepointError as exc:  # StoreError: not wakepoint's, newer schema, no driver, ...
        return _error(str(exc), 1)
    if before == HEAD:
        print(f"ok: already at {HEAD}")
    else:
        print(f"ok: upgraded {before or 'an empty database'} -> {HEAD}")
    return 0


def _missing_jsonl(url: str) -> str | None:
    """Why ``url`` must not be opened (opening a JSONL store creates it), or None."""
    scheme, _, rest = url.partition(":")
    if scheme == "jsonl" and rest and not Path(rest).is_dir():
        return f"no JSONL store at {rest}"
    return None


def _verify_chain(args: argparse.Namespace) -> int:
    missing = _missing_jsonl(args.store)
    if missing is not None:
        return _error(missing, 1)
    scheme, _, rest = args.store.partition(":")
    key_file = args.key
    if key_file is None:
        if scheme != "jsonl" or not rest:
            return _error(f"--key is required for store {args.store!r}", 1)
        key_file = str(Path(rest) / _KEY_FILE)
    try:
        signer = Signer.load(key_file)
        store = open_store(args.store)
        try:
            records = store.ledger(args.run_id)
        finally:
            store.close()
        if not records:
            return _error(f"run {args.run_id!r} has no ledger records", 1)
        count = verify_chain(records, signer, log_id=store.log_id, run_id=args.run_id)
    except WakepointError as exc:  # ChainError, RunNotFound, KeyFileError, StoreError, ...
        return _error(f"{type(exc).__name__}: {exc}", 1)
    print(f"ok: {count} records")
    return 0


def _ledger_verify(args: argparse.Namespace) -> int:
    from .ledger.trust import TrustError, TrustRoot
    from .ledger.verify import VerifyUsageError, render_summary, verify

    try:
        trust = TrustRoot.load(args.trust)
    except TrustError as exc:
        return _error(f"trust root: {exc}", 2)
    anchor = None
    if args.anchor is not None:
        try:
            anchor = Path(args.anchor).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return _error(f"anchor {args.anchor}: {getattr(exc, 'strerror', None) or exc}", 2)
    source: str = args.source.removeprefix("jsonl:")
    if source.startswith("sqlite:"):
        # Connecting to a SQLite file that does not exist would create it.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        from .stores.sql_engine import sqlite_path

        try:
            path = sqlite_path(make_url(source))
        except ArgumentError as exc:
            return _error(f"not a SQLAlchemy URL: {source!r} ({exc})", 2)
        if path is not None and not path.is_file():
            return _error(f"no SQLite database at {path}", 2)
    try:
        report = verify(source, trust, anchor=anchor, mode=args.mode,
                        processes=os.cpu_count() or 1, require_seals=False)
    except VerifyUsageError as exc:
        return _error(str(exc), 2)
    print(report.to_json().decode() if args.json else render_summary(report))
    return 0 if report.ok else 1


def _keys_generate(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.exists() or path.is_symlink():
        return _error(f"{path} already exists; not overwriting a key file", 1)
    signer = Signer.generate()
    try:
        signer.save(path)
    except FileExistsError:  # created meanwhile by someone else
        return _error(f"{path} already exists; not overwriting a key file", 1)
    except OSError as exc:
        return _error(f"cannot write {path}: {exc.strerror or exc}", 1)
    print(signer.key_id)
    return 0


class _NoStore(WakepointError):
    """The store to read a log id from does not exist (and must not be created)."""


def _store_log_id(url: str) -> str:
    """The log id of an existing store; ``WakepointError`` / ``OSError`` if there is none."""
    missing = _missing_jsonl(url)
    scheme, _, rest = url.partition(":")
    if missing is None and scheme == "jsonl" and not (Path(rest) / "log.json").is_file():
        missing = f"{rest} is not a JSONL store (no log.json)"
    if missing is not None:
        raise _NoStore(missing)
    if scheme == "memory":
        raise _NoStore("a memory: store has no lasting log id")
    store = open_store(url)
    try:
        return store.log_id
    finally:
        store.close()


def _keys_trust(args: argparse.Namespace) -> int:
    from .ledger.trust import TrustError, TrustRoot

    try:
        signers = [Signer.load(path) for path in args.key]
        log_id = args.log_id if args.store is None else _store_log_id(args.store)
    except WakepointError as exc:  # KeyFileError, StoreError, _NoStore
        return _error(str(exc), 1)
    try:
        root = TrustRoot.from_signers(signers, log_id=log_id)
    except TrustError as exc:  # e.g. one key given twice
        return _error(str(exc), 2)
    data = root.to_json() + b"\n"
    if args.out is None:
        sys.stdout.write(data.decode())
        return 0
    try:
        with open(args.out, "xb") as out:  # never replace a trust root someone relies on
            out.write(data)
    except FileExistsError:
        return _error(f"{args.out} already exists; not overwriting it", 1)
    except OSError as exc:
        return _error(f"cannot write {args.out}: {exc.strerror or exc}", 1)
    print(f"ok: trust root for {len(root.keys)} key(s), log id {log_id} -> {args.out}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .scheduler import load_app, main_worker

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    # Load the app here, so that only errors of loading it are usage errors (exit 2), not a
    # ValueError or AttributeError raised later while the worker runs.
    try:
        app = load_app(args.app)
    except ValueError as exc:
        return _error(str(exc), 2)
    except (ImportError, AttributeError) as exc:
        return _error(f"cannot load --app {args.app}: {type(exc).__name__}: {exc}", 2)
    try:
        return main_worker(args.store, app, args.concurrency, home=args.home)
    except WakepointError as exc:  # StoreError (no database, schema too old), KeyFileError...
        return _error(f"{type(exc).__name__}: {exc}", 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "ledger" and args.ledger_command == "verify":
        return _ledger_verify(args)
    if args.command == "ledger" and args.ledger_command == "verify-chain":
        return _verify_chain(args)
    if args.command == "keys" and args.keys_command == "generate":
        return _keys_generate(args)
    if args.command == "keys" and args.keys_command == "trust":
        return _keys_trust(args)
    if args.command == "worker":
        return _worker(args)
    if args.command == "db" and args.db_command == "upgrade":
        return _db_upgrade(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse requires one
