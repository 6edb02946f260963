"""What the verifier reports: ``Report``, ``Problem`` and ``CheckpointInfo``, the stable
error ``CODES``, ``VerifyUsageError``, and ``render_summary`` (the CLI's human view of a report).

This is the verifier's vocabulary.  It sits below every checking module (``runcheck``,
``global_order``, ``stream``, ...) so that they can name a problem without importing the entry
point ``verify``, which imports them all; callers keep importing these names from
``wakepoint.ledger.verify``, which re-exports them.
"""

from __future__ import annotations

import msgspec

CODES = (
    "malformed", "bad_signature", "unknown_key", "key_not_valid", "seq_gap", "duplicate_seq",
    "prev_mismatch", "genesis_mismatch", "run_mismatch", "equivocation", "state_violation",
    "state_mismatch", "root_mismatch", "behind_checkpoint", "rollback", "rotation_unauthorized",
    "missing_seal", "index_mismatch", "incomplete_tail_write",
)
"""Every error code the verifier reports; stable (a code is never renamed or reused)."""


class VerifyUsageError(ValueError):
    """The verifier was asked something it cannot do (bad source, anchor without order)."""


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The first bad thing found: what (``code``), where, and expected versus actual."""

    code: str
    where: str
    """``runs/<name>.jsonl:<line>[#<record>]``, ``index.jsonl:<line>``, ``row <n>``, ``anchor``."""
    path: str | None = None
    line: int | None = None
    record: int | None = None
    """Index of the record within its line (a commit may carry several)."""
    row: int | None = None
    run_id: str | None = None
    seq: int | None = None
    position: int | None = None
    """0-based global ledger position, when known."""
    expected: str | None = None
    actual: str | None = None
    detail: str = ""


class CheckpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The latest checkpoint that verified against the ledger."""

    origin: str
    size: int
    root: str
    """Hex Merkle root."""
    where: str


class Report(msgspec.Struct, kw_only=True):
    """What ``verify`` found."""

    ok: bool
    source: str
    mode: str
    error: Problem | None = None
    crash: bool = False
    """The only problem is a torn last line: a crash mid-write, not tampering."""
    records: int = 0
    runs: int = 0
    keys: dict[str, int] = msgspec.field(default_factory=dict)
    """Records signed per key id (the first signature of each record)."""
    checkpoint: CheckpointInfo | None = None
    uncovered: int | None = None
    """Records after the last verified checkpoint; None when there is no global order."""
    unchecked: list[str] = msgspec.field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> bytes:
        """The full report as JSON (for ``--json``)."""
        return msgspec.json.encode(self)


def render_summary(report: Report) -> str:
    """A one-screen human summary of a report (the CLI prints it without ``--json``)."""
    lines = [
        f"{'OK' if report.ok else 'FAILED'}: {report.source} ({report.mode} mode, "
        f"{report.records} records in {report.runs} runs, {report.seconds:.2f}s)",
    ]
    e = report.error
    if e is not None:
        kind = "crash (torn write)" if report.crash else "error"
        lines.append(f"  first {kind}: {e.code} at {e.where}")
        if e.run_id is not None:
            lines.append(f"    run {e.run_id!r} seq {e.seq}")
        if e.expected is not None:
            lines.append(f"    expected {e.expected}")
        if e.actual is not None:
            lines.append(f"    actual   {e.actual}")
        if e.detail:
            lines.append(f"    {e.detail}")
    if report.keys:
        lines.append("  records per key:")
        lines.extend(f"    {k}  {n}" for k, n in report.keys.items())
    cp = report.checkpoint
    if cp is not None:
        lines.append(f"  last checkpoint: size {cp.size} root {cp.root[:16]}... at {cp.where}")
    elif report.uncovered is not None:
        lines.append("  no checkpoint covers this ledger")
    if report.uncovered is not None:
        lines.append(f"  records after the last checkpoint: {report.uncovered}")
    if report.unchecked:
        lines.append(f"  not checked here: {', '.join(report.unchecked)}")
    return "\n".join(lines)
