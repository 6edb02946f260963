"""The auditor's verifier: ``verify(source, trust, anchor=None, mode="full") -> Report``.

What it promises.  Given a ledger (a JSONL store directory, one run file, a SQL URL, or an
export file written by ``export``), a
trust root the auditor holds, and optionally the last checkpoint the auditor holds (the
*anchor*), it decides offline, trusting nothing the writer says, whether every record is
authentic, complete and in order; if not, it names the FIRST bad thing: where it is stored
(``file:line`` plus the record's index in the line, or the SQL row), the run, the seq, a stable
error code, and expected versus actual.

How one record is checked (full mode), in this order, so the code is always the earliest
failing rule:

1. the line / row parses strictly as the store wrote it: a JSONL line must be exactly
   ``{"records":[<Envelope>...],"state":<state>}`` as msgspec encodes it, so duplicate keys,
   unknown fields, whitespace, non-canonical base64 and trailing data are ``malformed``;
2. the signing key is in the trust root (``unknown_key``) with the ``record`` role
   (``key_not_valid``);
3. Ed25519 over ``PAE(payloadType, stored body bytes)`` verifies (``bad_signature``) - before
   the body is parsed;
4. the body parses strictly and is in canonical form (sorted keys, no whitespace: re-encoding
   the parsed body must give the stored bytes back, which rules out duplicate keys; the
   signature and hash are always over the stored bytes) - ``malformed``;
5. chain rules: same log and run (``run_mismatch``, also for a run file whose name is not its
   run's), seq contiguous from 0 (``seq_gap`` / ``duplicate_seq``), ``prev`` (``genesis_mismatch``
   for seq 0, ``prev_mismatch``), lifecycle (``state_violation``: a first record that is not
   ``run.started``, a second start, anything but ``run.sealed`` after a run finished, anything
   after the seal), rotation (``rotation_unauthorized`` unless signed by the old and the new
   key; after it the old key is ``key_not_valid`` in that run);
6. the stored state of each line is the state the last record of the line signed (its
   ``state`` digest; ``state_mismatch``), so the unsigned part of a line cannot be edited;
7. a finished run ends with ``run.sealed`` (``missing_seal``).

Then, ledger-wide, over the global order (``index.jsonl`` for JSONL, ``position`` for SQL):
every record appears once, in per-run order, with its hash (``index_mismatch``); each key is
valid at each record's position (``key_not_valid``); stored checkpoints verify
(``unknown_key`` / ``bad_signature`` / ``key_not_valid``), name this log (``run_mismatch``),
never exceed the leaves before them (``behind_checkpoint``), never go backwards
(``rollback``), never disagree at one size (``equivocation``), and match the Merkle root of the
leaves (``root_mismatch``).  The anchor must verify the same way, and the ledger must not be
older than it (``rollback``) nor disagree with it (``equivocation`` against a stored
checkpoint of its size, else ``root_mismatch``).

Order of errors: run checks first, by file name and line (or row); then the global checks in
global order; then the anchor.  A torn last line (a crash mid-write) is reported as
``incomplete_tail_write`` with ``crash=True`` only when nothing worse is found: the records
before it all verified.

Modes.  ``full`` does all of the above.  ``chain`` checks hashes and links only: no signature,
no trust, no strict parse (fields are extracted from the body with a small lenient decoder, the
state is not checked) - a fast integrity scan, not an authentication.

SQL databases and export files hold the records in global order, one per row or line: they
are checked as one stream (``_Stream``), each record by its run's checker, its key's range at
its position, each stored checkpoint where it stands (reported after the run checks, as for
JSONL).  SQL rows are named ``row <position>``; positions must be dense from 1, and a hole no
run check explains is ``index_mismatch``; ``cosigs`` and ``wp_checkpoints`` (migration 0002)
are read when the schema has them.  ``export`` writes the export file (a header, one DSSE
envelope per line in global order, the stored checkpoints): the JSONL and the SQL export of
one ledger are the same bytes.

Key ranges: a record is checked against its signer's range, except a ``key.rotated``
hand-over, which the runtime writes lazily after the rotation position: the new key's range
decides, so a revoked old key may co-sign a hand-over and nothing else.  A checkpoint of size
n is signed between positions n - 1 and n: a key valid at either may sign it.

Limits (stated in the report's ``unchecked``): without a global order (a single run file, a
JSONL directory without ``index.jsonl``, an unordered export) key validity ranges,
checkpoints and the anchor cannot be checked; a SQL database still at schema 0001 holds no
checkpoints and no co-signatures.

Speed: signatures are checked through libsodium's ``crypto_sign_ed25519_verify_detached``
(no copy of the message) when PyNaCl's bundled library exports it, else through
``crypto_sign_open``; a sound run file is checked by a bulk pass whose per-record work is
C-level ``map``s (one decode of the file's lines and one encode back to prove their exact
form, the signatures back to back), and index blocks between checkpoints likewise; anything
the bulk passes do not accept is checked again record by record, which alone decides codes
and positions.  ``processes > 1`` verifies run files in
worker processes.

Layout.  This module is the entry point: ``verify`` dispatches on the source and runs the
checks of a JSONL store; the rest lives in modules it re-exports from (callers import every
name below from here): ``report`` (``Report``, ``Problem``, ``CODES``, ``VerifyUsageError``,
``render_summary``), ``runcheck`` (the per-record rules), ``runfile`` (JSONL run files, bulk
and exact), ``global_order`` (index, key ranges, checkpoints, anchor), ``stream`` (SQL
databases and export files), ``sqlsource`` (reading a SQL ledger), ``export`` (the export file
format), ``sigverify`` (the Ed25519 binding), ``_verifycore`` (codecs they share).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from ._verifycore import Progress, _read_log_id
from .export import (
    EXPORT_FORMAT,
    ExportError,
    ExportHeader,
    export,
    is_export,
    stored_checkpoints,
)
from .global_order import _Global, _global
from .logindex import INDEX_FILE
from .report import (
    CODES,
    CheckpointInfo,
    Problem,
    Report,
    VerifyUsageError,
    render_summary,
)
from .runcheck import (
    STARTED,
    RunResult,
    _Ctx,  # noqa: F401 - re-exported for tests (not public): they drive the bulk pass
    _ctx,
    _file_name,  # noqa: F401 - re-exported for tests (not public): pinned to stores.jsonl
)
from .runfile import (
    _check_files,
    _exact_run_file,  # noqa: F401 - re-exported for tests (not public)
    _fast_run,  # noqa: F401 - re-exported for tests (not public)
    _FastEnvelope,  # noqa: F401 - re-exported for tests (not public)
    _FastSignature,  # noqa: F401 - re-exported for tests (not public)
    check_run_file,
)
from .sigverify import ed25519_verify, verify_all
from .stream import _verify_export, _verify_sql
from .trust import TrustRoot

__all__ = [
    "CODES",
    "EXPORT_FORMAT",
    "STARTED",
    "CheckpointInfo",
    "ExportError",
    "ExportHeader",
    "Mode",
    "Problem",
    "Progress",
    "Report",
    "RunResult",
    "VerifyUsageError",
    "check_run_file",
    "ed25519_verify",
    "export",
    "is_export",
    "render_summary",
    "stored_checkpoints",
    "verify",
    "verify_all",
]

Mode = Literal["full", "chain"]


def _finish_runs(results: Iterable[RunResult], report: Report,
                 log_id: str | None) -> tuple[Problem | None, Problem | None]:
    """First run problem (by path, then position) and first torn line; fills the counts."""
    problem: Problem | None = None
    torn: Problem | None = None
    keys: Counter[str] = Counter()
    for res in sorted(results, key=lambda r: r.path):
        report.runs += 1
        report.records += res.count
        keys.update(res.keys)
        if problem is None and res.problem is not None:
            problem = res.problem
        if problem is None and log_id is not None and res.log_id not in (None, log_id):
            problem = Problem(code="run_mismatch", where=f"{res.path}:1#0", path=res.path,
                              line=1, record=0, run_id=res.run_id, seq=0, expected=log_id,
                              actual=res.log_id, detail="a run of another ledger")
        if torn is None and res.torn is not None:
            torn = res.torn
    report.keys = dict(sorted(keys.items()))
    return problem, torn


def verify(
    source: str | os.PathLike[str],
    trust: TrustRoot,
    anchor: str | None = None,
    mode: Mode = "full",
    *,
    processes: int = 1,
    require_seals: bool = True,
    progress: Progress | None = None,
) -> Report:
    """Verify a ledger; see the module docstring for every rule and the order of errors.

    ``source``: a JSONL store directory, one ``.jsonl`` run file, or a SQLAlchemy URL
    (``sqlite:///...``, ``postgresql+psycopg://...``).  ``anchor``: the text of the last
    signed checkpoint the auditor holds.  ``processes``: worker processes for run files.
    ``require_seals``: a finished run must end with ``run.sealed``.  ``progress`` is called
    now and then with (records checked, work done, work total).  Raises
    ``VerifyUsageError`` for a source it cannot read or an anchor it cannot place.
    """
    if mode not in ("full", "chain"):
        raise VerifyUsageError(f"unknown mode {mode!r}: use full or chain")
    started = time.perf_counter()
    text = os.fspath(source)
    report = Report(ok=False, source=text, mode=mode)
    if "://" in text:
        _verify_sql(text, trust, anchor, report, mode, require_seals, progress)
    else:
        _verify_jsonl(Path(text), trust, anchor, report, mode, processes, require_seals,
                      progress)
    report.ok = report.error is None
    report.seconds = round(time.perf_counter() - started, 6)
    return report


def _verify_jsonl(path: Path, trust: TrustRoot, anchor: str | None, report: Report,
                  mode: str, processes: int, require_seals: bool,
                  progress: Progress | None) -> None:
    if path.is_file() and is_export(path):
        _verify_export(path, trust, anchor, report, mode, require_seals, progress)
        return
    if path.is_file():
        if anchor is not None:
            raise VerifyUsageError("an anchor needs the whole store (a single run file has no "
                                   "global order)")
        ctx = _ctx(trust, mode, require_seals, None)
        res = check_run_file(str(path), path.name, ctx, expect_name=False)
        problem, torn = _finish_runs([res], report, trust.log_id)
        report.unchecked = ["key_validity", "checkpoints"]
        report.error = problem or torn
        report.crash = problem is None and torn is not None
        return
    if not (path / "runs").is_dir():
        raise VerifyUsageError(f"{path}: not a JSONL store (no runs/ directory) nor a run file")
    log_id = trust.log_id or _read_log_id(path)
    ctx = _ctx(trust, mode, require_seals, log_id)
    files = sorted((str(f), f"runs/{f.name}") for f in (path / "runs").iterdir()
                   if f.name.endswith(".jsonl"))
    results = _check_files(files, ctx, processes, progress)
    problem, torn = _finish_runs(results, report, log_id)
    if problem is not None:
        report.error = problem
        return
    index = path / INDEX_FILE
    if mode == "chain":
        if anchor is not None:
            raise VerifyUsageError("an anchor needs full mode")
        report.unchecked = ["signatures", "state", "index", "key_validity", "checkpoints"]
        report.error = torn
        report.crash = torn is not None
        return
    if not index.exists():
        if anchor is not None:
            raise VerifyUsageError(f"{path}: no {INDEX_FILE}, so the anchor cannot be placed")
        report.unchecked = ["key_validity", "checkpoints"]
        report.error = torn
        report.crash = torn is not None
        return
    by_run = {r.run_id: r for r in results if r.run_id is not None}
    g = _Global(trust, log_id or next((r.log_id for r in results if r.log_id), None), by_run,
                mode == "full")
    report.error = _global(g, index.read_bytes(), anchor, results) or torn
    report.crash = report.error is not None and report.error.code == "incomplete_tail_write"
    report.checkpoint = g.last
    report.uncovered = len(g.leaves) - max(g.last_size, 0)
