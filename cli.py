"""The ``wakepoint`` command (console script and ``python -m wakepoint``).

Every command of the design::

    wakepoint [--debug] --version
    wakepoint run MODULE:WORKFLOW [--input JSON|@FILE] [--run-id ID] [--store URL] [--json]
    wakepoint runs list [--status S] [--workflow W] [--waiting-on KEY] [--limit N] [--store URL]
                        [--json]
    wakepoint runs show RUN_ID [--store URL] [--json]
    wakepoint runs timeline RUN_ID [--store URL] [--json]
    wakepoint respond RUN_ID ANSWER --app module:attribute [--store URL] [--json]
    wakepoint send KEY PAYLOAD_JSON --app module:attribute [--store URL] [--json]
    wakepoint cancel RUN_ID [--reason R] [--no-cascade] --app module:attribute [--store URL]
                     [--json]
    wakepoint ledger verify SOURCE --trust FILE [--anchor FILE] [--json] [--mode full|chain]
    wakepoint ledger export --store URL OUT
    wakepoint ledger checkpoint --store URL [--export FILE]
    wakepoint ledger verify-chain RUN_ID --store URL [--key KEY_FILE]
    wakepoint keys generate FILE
    wakepoint keys rotate KEYFILE [--trust TRUSTFILE --at POSITION]
    wakepoint keys trust --key FILE [--key FILE ...] (--store URL | --log-id ID) [--out FILE]
    wakepoint worker --store URL --app module:attribute [--concurrency N] [--home DIR]
    wakepoint db upgrade URL

``ledger verify`` is the auditor's verifier (``wakepoint.ledger.verify``; docs/AUDIT.md):
SOURCE is a JSONL store directory (``jsonl:PATH`` is accepted too), one run file, a SQL URL, or
an export file; ``--trust`` is the trust root the auditor holds, ``--anchor`` a file holding
the last signed checkpoint they hold.  It prints ``render_summary`` (or the full report with
``--json``); on a terminal, once more than ``PROGRESS_MIN_RECORDS`` records are checked, a
progress bar on stderr (erased at the end; never on a pipe).  Whether a finished run must end
with ``run.sealed`` is the one switch ``REQUIRE_SEALS``.

``ledger export`` writes the ledger of a JSONL store or SQL database as one new file (never
replaced): a header line, one DSSE envelope per record in global order, and the stored
checkpoints where they stand (format: ``ledger.verify.ExportHeader`` and docs/AUDIT.md).  It
is a transcription, not a verification, and refuses a store whose records cannot be ordered.
``ledger checkpoint`` prints the latest stored signed checkpoint (exit 1 when there is none),
or with ``--export FILE`` writes it there atomically - refusing to replace a checkpoint of
another log, a larger one (rollback) or another root at the same size (equivocation).

``keys rotate`` replaces KEYFILE's key with a new one and keeps the old one under
``previous`` (it co-signs the runtime's ``key.rotated`` hand-overs); with ``--trust
TRUSTFILE --at POSITION`` it also rewrites that trust root: the new key valid from POSITION
with the old key's roles, the old key revoked from POSITION.  Both files are replaced
atomically, the key file first.

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

``run``, ``runs``, ``respond``, ``send`` and ``cancel`` take ``--store URL`` (default
``jsonl:./.wakepoint``, the embedded default) and ``--json`` (one JSON document on stdout instead
of a table or text).  ``run`` imports ``MODULE:WORKFLOW`` as ``worker`` imports ``--app`` (a
``Workflow``, or an ``App`` or list holding exactly one) and starts it, driving it until it
waits or finishes; it prints the run id, status and the wait or output.  ``runs`` only reads the
store (no workflows needed).  ``respond``, ``send`` and ``cancel`` drive runs on, so they load
the workflows with ``--app``; an answer, key or run the run refuses (``InvalidAnswer``,
``WrongWaitKey``, ``NotWaiting``, ``RunFinished``, ``RunNotFound``) is exit 1 with one line, and
so is a ``send`` that resumed no run.  The signer key is found as for ``worker`` (``--home``).

Only ``worker``, ``run`` (which open their store as the runtime does) and ``db upgrade`` may
create a store; the other commands read what exists: a JSONL store directory, SQLite file or
key file that does not exist is an error, not a fresh one.  These commands log only warnings
and errors, to stderr, so that stdout holds just their answer.

Exit codes: 0 verified / done; 1 the ledger does not verify, or a store, key, file or database
cannot be read, written or is refused; 2 usage errors (argparse's convention, plus an unreadable
trust root or anchor, a source that is not a ledger, an ``--app`` that cannot be loaded).
Errors are one line on stderr, without a traceback; an exception no command expected is one
line and exit 1 as well, and ``--debug`` (before the command) lets it raise with its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from . import __version__
from .kernel.errors import WakepointError
from .kernel.types import RunState, Status
from .ledger.keys import Signer
from .ledger.records import parse_body, verify_chain
from .runtime import _KEY_FILE, DEFAULT_HOME, Runtime
from .stores import Store, open_store

if TYPE_CHECKING:
    from .scheduler import App


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a position (0 or more), not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wakepoint", description="wakepoint: a durable workflow kernel."
    )
    parser.add_argument("--version", action="version", version=f"wakepoint {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="let unexpected errors raise with their traceback")
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
    export = ledger_commands.add_parser(
        "export", help="write a store's ledger as one portable, verifiable file"
    )
    export.add_argument("--store", required=True, metavar="URL",
                        help="a JSONL store (jsonl:PATH or PATH) or a SQL URL")
    export.add_argument("out", metavar="OUT", help="the export file to create (never replaced)")
    checkpoint = ledger_commands.add_parser(
        "checkpoint", help="print (or --export) the latest signed checkpoint a store holds"
    )
    checkpoint.add_argument("--store", required=True, metavar="URL",
                            help="a JSONL store (jsonl:PATH or PATH) or a SQL URL")
    checkpoint.add_argument("--export", metavar="FILE",
                            help="write it to FILE (an anchor for ledger verify --anchor); "
                                 "refuses to move FILE's checkpoint backwards or sideways")
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
    rotate = keys_commands.add_parser(
        "rotate", help="replace a key file's key, keeping the old one as previous"
    )
    rotate.add_argument("file", metavar="KEYFILE")
    rotate.add_argument("--trust", metavar="TRUSTFILE",
                        help="also move this trust root: the new key valid from --at, the old "
                             "key revoked from --at")
    rotate.add_argument("--at", type=_natural, metavar="POSITION",
                        help="the global ledger position the new key takes over from "
                             "(needed with --trust)")
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

    _add_run_commands(commands)
    return parser


_DEFAULT_STORE = f"jsonl:./{DEFAULT_HOME}"


def _store_options(command: argparse.ArgumentParser, *, home: bool = False) -> None:
    command.add_argument("--store", default=_DEFAULT_STORE, metavar="URL",
                         help=f"the store (default {_DEFAULT_STORE})")
    command.add_argument("--json", action="store_true", help="print JSON for scripts")
    if home:
        command.add_argument("--home", default=DEFAULT_HOME, metavar="DIR",
                             help=f"where the signer key lives for a non-JSONL store "
                                  f"(default {DEFAULT_HOME})")


def _app_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--app", required=True, metavar="MODULE:ATTRIBUTE",
                         help="an App, a Workflow, a list of them, or a callable returning one")


def _add_run_commands(commands: Any) -> None:
    run = commands.add_parser("run", help="start a run and drive it until it waits or ends")
    run.add_argument("workflow", metavar="MODULE:WORKFLOW",
                     help="a Workflow, or an App or list holding exactly one")
    run.add_argument("--input", metavar="JSON|@FILE",
                     help="the run's input: JSON text, or @FILE holding JSON")
    run.add_argument("--run-id", metavar="ID", help="the run id (default: a new one)")
    _store_options(run, home=True)

    runs = commands.add_parser("runs", help="list and inspect runs")
    runs_commands = runs.add_subparsers(dest="runs_command", metavar="COMMAND", required=True)
    listing = runs_commands.add_parser("list", help="list runs, oldest first")
    listing.add_argument("--status", choices=[s.value for s in Status])
    listing.add_argument("--workflow", metavar="W", help="only runs of this workflow id")
    listing.add_argument("--waiting-on", metavar="KEY", help="only runs waiting on this key")
    listing.add_argument("--limit", type=_positive, metavar="N", help="at most N runs")
    _store_options(listing)
    show = runs_commands.add_parser("show", help="one run: state, wait, children, output")
    show.add_argument("run_id", metavar="RUN_ID")
    _store_options(show)
    timeline = runs_commands.add_parser("timeline", help="a run's ledger as a history")
    timeline.add_argument("run_id", metavar="RUN_ID")
    _store_options(timeline)

    respond = commands.add_parser("respond", help="answer the question a run asked")
    respond.add_argument("run_id", metavar="RUN_ID")
    respond.add_argument("answer", metavar="ANSWER")
    _app_option(respond)
    _store_options(respond, home=True)
    send = commands.add_parser("send", help="send an event to every run waiting on KEY")
    send.add_argument("key", metavar="KEY")
    send.add_argument("payload", metavar="PAYLOAD_JSON")
    _app_option(send)
    _store_options(send, home=True)
    cancel = commands.add_parser("cancel", help="cancel a run (and its unfinished children)")
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.add_argument("--reason", default="cancelled", metavar="R")
    cancel.add_argument("--no-cascade", action="store_true",
                        help="leave the run's children running")
    _app_option(cancel)
    _store_options(cancel, home=True)


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
    if scheme == "jsonl" and rest and not (Path(rest) / "log.json").is_file():
        # A directory that is not a store (no log.json) would be made one by opening it.
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


REQUIRE_SEALS = True
"""THE switch for ``ledger verify``: whether a finished run must end with ``run.sealed``
(``missing_seal`` otherwise).  On: the runtime seals every finished run in the commit that
finishes it, so an unsealed finished run is a truncated chain.  (Ledgers written before the
runtime sealed - none outside this repository's history - would report ``missing_seal``.)"""

PROGRESS_MIN_RECORDS = 100_000
"""``ledger verify`` draws a progress bar on a terminal only once this many records are
checked, so that small ledgers print nothing but their summary."""


class _Source(Exception):
    """A ledger source that does not exist (exit 2 for ``verify``, 1 for the others)."""


def _ledger_source(text: str) -> str:
    """A ``verify``/``export``/``checkpoint`` source: a path (``jsonl:`` prefix dropped) or a
    SQL URL whose SQLite file exists (connecting to a missing file would create it)."""
    source = text.removeprefix("jsonl:")
    if source.startswith("sqlite:"):
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        from .stores.sql_engine import sqlite_path

        try:
            path = sqlite_path(make_url(source))
        except ArgumentError as exc:
            raise _Source(f"not a SQLAlchemy URL: {source!r} ({exc})") from None
        if path is not None and not path.is_file():
            raise _Source(f"no SQLite database at {path}")
    elif "://" not in source and not Path(source).exists():
        raise _Source(f"no ledger at {source}")
    return source


class _Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal and only once
    ``PROGRESS_MIN_RECORDS`` records are checked; ``done`` erases it."""

    WIDTH = 30

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.on = bool(getattr(self.stream, "isatty", lambda: False)())
        self.drawn = False
        self.last = -1

    def __call__(self, records: int, done: int, total: int) -> None:
        if not self.on or records < PROGRESS_MIN_RECORDS or total <= 0:
            return
        fraction = min(done / total, 1.0)
        percent = int(fraction * 100)
        if percent == self.last:
            return
        self.last = percent
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\rverifying [{bar}] {percent:3d}%  {records:,} records")
        self.stream.flush()
        self.drawn = True

    def done(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


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
    try:
        source = _ledger_source(args.source)
    except _Source as exc:
        return _error(str(exc), 2)
    progress = _Progress()
    try:
        report = verify(source, trust, anchor=anchor, mode=args.mode,
                        processes=os.cpu_count() or 1, require_seals=REQUIRE_SEALS,
                        progress=progress)
    except VerifyUsageError as exc:
        return _error(str(exc), 2)
    finally:
        progress.done()
    print(report.to_json().decode() if args.json else render_summary(report))
    return 0 if report.ok else 1


def _ledger_export(args: argparse.Namespace) -> int:
    from .ledger.verify import ExportError, VerifyUsageError, export

    try:
        source = _ledger_source(args.store)
        records = export(source, args.out)
    except (_Source, ExportError, VerifyUsageError) as exc:
        return _error(str(exc), 1)
    except FileExistsError:
        return _error(f"{args.out} already exists; not overwriting an export", 1)
    except OSError as exc:
        return _error(f"cannot write {args.out}: {exc.strerror or exc}", 1)
    print(f"ok: {records} records -> {args.out}")
    return 0


def _ledger_checkpoint(args: argparse.Namespace) -> int:
    from .ledger.checkpoint import CheckpointError, parse_checkpoint
    from .ledger.verify import ExportError, VerifyUsageError, stored_checkpoints

    try:
        notes = stored_checkpoints(_ledger_source(args.store))
    except (_Source, VerifyUsageError) as exc:
        return _error(str(exc), 1)
    if not notes:
        return _error(f"{args.store} holds no signed checkpoint yet", 1)
    note = notes[-1]
    try:
        cp = parse_checkpoint(note)[0]
    except CheckpointError as exc:
        return _error(f"the latest stored checkpoint is damaged: {exc}", 1)
    if args.export is None:
        sys.stdout.write(note)
        return 0
    target = Path(args.export)
    if target.exists():
        # The file is the auditor's anchor: moving it back (a smaller tree) or sideways (same
        # size, another root) would throw away exactly what it protects against.
        try:
            held = parse_checkpoint(target.read_text(encoding="utf-8"))[0]
        except (OSError, UnicodeDecodeError, CheckpointError) as exc:
            return _error(f"{target} holds no checkpoint ({exc}); not replacing it", 1)
        if held.origin != cp.origin:
            return _error(f"{target} holds a checkpoint of {held.origin}, the store is "
                          f"{cp.origin}; not replacing it", 1)
        if cp.size < held.size:
            return _error(f"rollback: the store's latest checkpoint (size {cp.size}) is older "
                          f"than the one in {target} (size {held.size}); not replacing it", 1)
        if cp.size == held.size and cp.root != held.root:
            return _error(f"equivocation: the store's checkpoint of size {cp.size} has another "
                          f"root than the one in {target}; not replacing it", 1)
        # A larger checkpoint must extend the held one: the store's first held.size records
        # must still have its root (else the history was rewritten and grown past it).
        from .ledger import merkle
        from .ledger.export import stored_leaves

        try:
            leaves = stored_leaves(args.store.removeprefix("jsonl:"))
        except (VerifyUsageError, ExportError) as exc:
            return _error(f"cannot read the store's records: {exc}", 1)
        if len(leaves) < held.size or merkle.root(leaves[:held.size]) != held.root:
            return _error(f"fork: the store's first {held.size} records no longer have the root "
                          f"of the checkpoint in {target}; not replacing it", 1)
    try:
        _write_replacing(target, note.encode())
    except OSError as exc:
        return _error(f"cannot write {target}: {exc.strerror or exc}", 1)
    print(f"ok: checkpoint of {cp.size} records ({cp.origin}) -> {target}")
    return 0


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


def _write_replacing(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (temporary file, fsync, rename), keeping its mode."""
    from .ledger.keys import write_durably

    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    # A name no one can guess or plant a link at (O_EXCL in write_durably).
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    write_durably(temp, data, mode)
    try:
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself durable
    finally:
        os.close(dir_fd)


def _keys_rotate(args: argparse.Namespace) -> int:
    from .ledger.trust import TrustError, TrustRoot

    if (args.trust is None) != (args.at is None):
        return _error("--trust and --at go together: the trust root needs the position the "
                      "new key takes over from", 2)
    try:
        old = Signer.load(args.file)
    except WakepointError as exc:
        return _error(str(exc), 1)
    new = old.rotate()
    trust = None
    if args.trust is not None:
        try:
            held = TrustRoot.load(args.trust)
            if old.key_id not in held.keys and old.previous and (
                old.previous[0].key_id in held.keys
            ):
                # An earlier rotate replaced the key file but not the trust root (its second
                # write failed): finish that rotation instead of starting another.
                done = held.rotate(old.previous[0].key_id, old, args.at)
                _write_replacing(Path(args.trust), done.to_json() + b"\n")
                print(f"ok: finished the rotation to {old.key_id}: {args.trust} now trusts it "
                      f"from position {args.at}; the key file is unchanged")
                return 0
            trust = held.rotate(old.key_id, new, args.at)
        except TrustError as exc:
            return _error(f"trust root: {exc}", 2)
        except OSError as exc:
            return _error(f"cannot write {args.trust}: {exc.strerror or exc}", 1)
    # Key file first: a crash between the two writes leaves a trust root that does not yet
    # know the new key (the operator re-runs the trust step), never a trust root naming a key
    # that was lost.
    try:
        new.save(args.file, replace=True)
    except OSError as exc:
        return _error(f"cannot write {args.file}: {exc.strerror or exc}", 1)
    if trust is not None:
        try:
            _write_replacing(Path(args.trust), trust.to_json() + b"\n")
        except OSError as exc:
            return _error(f"{args.file} now holds the new key {new.key_id}, but {args.trust} "
                          f"could not be written ({exc.strerror or exc}): run the same command "
                          "again to finish the rotation", 1)
    print(f"ok: {old.key_id} -> {new.key_id} ({len(new.previous)} previous key(s) kept in "
          f"{args.file})")
    if trust is not None:
        print(f"trust root {args.trust}: {new.key_id} valid from position {args.at}, "
              f"{old.key_id} revoked from position {args.at}")
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


# --- run, runs, respond, send, cancel ------------------------------------------------------


class _Usage(Exception):
    """A usage error found after parsing (exit 2)."""


def _load(spec: str) -> App:
    """``load_app(spec)`` with the current directory importable; ``_Usage`` if it fails."""
    from .scheduler import load_app

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return load_app(spec)
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    except (ImportError, AttributeError) as exc:
        raise _Usage(f"cannot load {spec}: {type(exc).__name__}: {exc}") from None


def _missing_store(url: str) -> str | None:
    """Why ``url`` names no existing store (a JSONL directory or SQLite file), or None."""
    missing = _missing_jsonl(url)
    if missing is None and url.startswith("sqlite:"):
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        from .stores.sql_engine import sqlite_path

        try:
            path = sqlite_path(make_url(url))
        except ArgumentError as exc:
            return f"not a SQLAlchemy URL: {url!r} ({exc})"
        if path is not None and not path.is_file():
            return f"no SQLite database at {path}"
    return missing


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [list(headers), *rows]]
    return "\n".join(lines)


def _waiting_on(state: RunState) -> str:
    return "-" if state.wait is None else f"{state.wait.kind}:{state.wait.key}"


def _summary(state: RunState) -> str:
    """What ``run``, ``respond`` and ``cancel`` print: id, status, then the wait or result."""
    lines = [f"run {state.run_id}: {state.status.value}"]
    wait = state.wait
    if state.status is Status.WAITING and wait is not None:
        lines.append(f"waiting on {wait.kind}:{wait.key}")
        if wait.prompt is not None:
            lines.append(f"prompt: {wait.prompt}")
        if wait.choices is not None:
            lines.append(f"choices: {', '.join(wait.choices)}")
        if wait.deadline is not None:
            lines.append(f"deadline: {_time(wait.deadline)}")
    elif state.status is Status.COMPLETED:
        lines.append(f"output: {_json(state.output)}")
    elif state.error is not None:
        lines.append(f"error: {state.error.type}: {state.error.message}")
    return "\n".join(lines)


def _print_state(state: RunState, as_json: bool) -> None:
    print(_json(state) if as_json else _summary(state))


def _parse_json(text: str, what: str) -> Any:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _Usage(f"{what} {text[1:]}: {getattr(exc, 'strerror', None) or exc}") from None
    def constant(name: str) -> Any:
        # Python's json takes NaN and Infinity, which are not JSON: the value would be
        # stored as null while the node saw a float.
        raise _Usage(f"{what} is not JSON: {name} is not a JSON value")

    try:
        return json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise _Usage(f"{what} is not JSON: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    app = _load(args.workflow)
    workflows = list(app.workflows)
    if len(workflows) != 1:
        raise _Usage(f"{args.workflow} holds {len(workflows)} workflows; name exactly one")
    input_value = None if args.input is None else _parse_json(args.input, "--input")
    with Runtime(args.store, workflows, app.functions, app.handlers, home=args.home) as rt:
        state = rt.start(workflows[0], input_value, run_id=args.run_id)
    _print_state(state, args.json)
    return 0


def _runs_list(args: argparse.Namespace, store: Store) -> int:
    status = None if args.status is None else Status(args.status)
    if args.waiting_on is not None:
        states = [s for s in store.find_waiting(args.waiting_on)
                  if (status is None or s.status is status)
                  and (args.workflow is None or s.workflow == args.workflow)]
        states.sort(key=lambda s: s.created_at)
        states = states[:args.limit] if args.limit is not None else states
    else:
        states = store.list(status=status, workflow=args.workflow, limit=args.limit)
    if args.json:
        print(_json(states))
        return 0
    rows = [[s.run_id, s.workflow, s.status.value, s.node or "-", str(s.step), _waiting_on(s),
             _time(s.updated_at)] for s in states]
    print(_table(["RUN ID", "WORKFLOW", "STATUS", "NODE", "STEP", "WAITING ON", "UPDATED"],
                 rows))
    return 0


def _runs_show(args: argparse.Namespace, store: Store) -> int:
    state = store.load(args.run_id)
    if args.json:
        print(_json(state))
        return 0
    wait = state.wait
    fields: list[tuple[str, str]] = [
        ("run", state.run_id), ("workflow", f"{state.workflow} (logic {state.version})"),
        ("status", state.status.value), ("node", state.node or "-"), ("step", str(state.step)),
        ("created", _time(state.created_at)), ("updated", _time(state.updated_at)),
        ("waiting on", _waiting_on(state)),
    ]
    if wait is not None:
        fields += [("prompt", wait.prompt or "-"),
                   ("choices", ", ".join(wait.choices) if wait.choices else "-"),
                   ("deadline", _time(wait.deadline)), ("then", wait.then)]
    fields += [
        ("parent", "-" if state.parent is None else state.parent.run_id),
        ("children", ", ".join(state.children) or "-"),
        ("input", _json(state.input)),
        ("error", "-" if state.error is None
         else f"{state.error.type}: {state.error.message}"),
        ("output", _json(state.output) if state.status is Status.COMPLETED else "-"),
        ("ledger", f"{state.seq + 1} records"),
    ]
    width = max(len(name) for name, _ in fields)
    print("\n".join(f"{name.ljust(width)}  {text}" for name, text in fields))
    return 0


def _runs_timeline(args: argparse.Namespace, store: Store) -> int:
    records = store.ledger(args.run_id)
    if not records:
        store.load(args.run_id)  # RunNotFound for an unknown run
    bodies = [parse_body(rec.body) for rec in records]
    if args.json:
        print(_json([{"seq": b.seq, "ts": b.ts, "kind": b.kind, "node": b.node,
                      "next": b.next, "effect": b.effect, "key": b.key, "key_id": b.key_id,
                      "hash": rec.hash} for b, rec in zip(bodies, records, strict=True)]))
        return 0
    rows = []
    for b in bodies:
        step = b.node or "-"
        if b.next is not None:
            step = f"{step} -> {b.next}"
        what = " ".join(x for x in (b.effect, b.key) if x) or "-"
        rows.append([str(b.seq), _time(b.ts), b.kind, step, what, b.key_id])
    print(_table(["SEQ", "TIME", "KIND", "NODE -> NEXT", "EFFECT / KEY", "SIGNED BY"], rows))
    return 0


def _runtime(args: argparse.Namespace) -> Runtime:
    app = _load(args.app)
    return Runtime(args.store, list(app.workflows), app.functions, app.handlers,
                   home=args.home)


def _respond(args: argparse.Namespace) -> int:
    with _runtime(args) as rt:
        state = rt.respond(args.run_id, args.answer)
    _print_state(state, args.json)
    return 0


def _send(args: argparse.Namespace) -> int:
    payload = _parse_json(args.payload, "PAYLOAD_JSON")
    with _runtime(args) as rt:
        states = rt.send_event(args.key, payload)
    if args.json:
        print(_json(states))
    else:
        for state in states:
            print(_summary(state))
    if not states:
        return _error(f"no run of --app {args.app} was waiting on event {args.key!r}", 1)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _runtime(args) as rt:
        state = rt.cancel(args.run_id, args.reason, cascade=not args.no_cascade)
    _print_state(state, args.json)
    return 0


_READERS: dict[str, Callable[[argparse.Namespace, Store], int]] = {
    "list": _runs_list, "show": _runs_show, "timeline": _runs_timeline,
}
_DRIVERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run, "respond": _respond, "send": _send, "cancel": _cancel,
}


def _run_command(args: argparse.Namespace) -> int:
    """``run``, ``runs ...``, ``respond``, ``send``, ``cancel``: the shared error handling."""
    import logging

    import structlog

    # Keep stdout for the answer (``--json`` must parse): only warnings and errors are logged,
    # and to stderr.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    try:
        if args.command == "runs":
            missing = _missing_store(args.store)
            if missing is not None:
                return _error(missing, 1)
            store = open_store(args.store)
            try:
                return _READERS[args.runs_command](args, store)
            finally:
                store.close()
        if args.command != "run":  # ``run`` may create the store, as the runtime does
            missing = _missing_store(args.store)
            if missing is not None:
                return _error(missing, 1)
        return _DRIVERS[args.command](args)
    except _Usage as exc:
        return _error(str(exc), 2)
    except WakepointError as exc:  # RunNotFound, InvalidAnswer, RunFinished, StoreError, ...
        return _error(f"{type(exc).__name__}: {exc}", 1)


_COMMANDS: dict[tuple[str, str | None], Callable[[argparse.Namespace], int]] = {
    ("ledger", "verify"): _ledger_verify, ("ledger", "export"): _ledger_export,
    ("ledger", "checkpoint"): _ledger_checkpoint, ("ledger", "verify-chain"): _verify_chain,
    ("keys", "generate"): _keys_generate, ("keys", "rotate"): _keys_rotate,
    ("keys", "trust"): _keys_trust, ("worker", None): _worker, ("db", "upgrade"): _db_upgrade,
    **{(name, None): _run_command for name in ("run", "runs", "respond", "send", "cancel")},
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Anything a command did not expect is one line on stderr and exit 1; ``--debug`` lets it
    raise instead, with its traceback."""
    args = _parser().parse_args(argv)
    sub = {"ledger": "ledger_command", "keys": "keys_command", "db": "db_command"}
    command = _COMMANDS[(args.command, getattr(args, sub.get(args.command, ""), None))]
    if args.debug:
        return command(args)
    try:
        return command(args)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except BrokenPipeError:
        # The reader went away (``wakepoint runs list | head -1``): nothing to report.  Point
        # stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # the operator gets one line; --debug shows everything
        return _error(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)
