"""Verifying record streams: SQL databases and export files.

Both hold the records in global order, one per row or line, so they are checked in one pass
(``_Stream``): each record goes to its run's checker (routed by the run id read leniently from
the body; the checker verifies the signature before it parses anything), its key's range is
checked at its position, and each checkpoint is checked where it stands in the stream (reported
after the run checks, as for a JSONL store).  ``_verify_sql`` and ``_verify_export`` are the two
sources ``ledger.verify.verify`` dispatches here; the readers are ``sqlsource`` and ``export``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec

from ._verifycore import Progress, _Item, _route
from .export import _export_items
from .global_order import _Global
from .report import Problem, Report, VerifyUsageError
from .runcheck import _ctx, _RunChecker
from .sqlsource import _sql_source
from .trust import TrustRoot


class _Stream:
    """Checks a stream of ``_Item`` in global order."""

    def __init__(self, trust: TrustRoot, log_id: str | None, mode: str, require_seals: bool,
                 label: Callable[[int], str], ordered: bool = True) -> None:
        self.trust = trust
        self.full = mode == "full"
        self.ordered = ordered
        self.ctx = _ctx(trust, mode, require_seals, log_id)
        self.label = label
        self.checkers: dict[str, _RunChecker] = {}
        self.g = _Global(trust, self.ctx.log_id, {}, self.full)
        self.keys: Counter[str] = Counter()
        self.next_row = 1
        self.late: Problem | None = None
        """The first stored checkpoint that failed.  As for a JSONL store, the run checks
        come first (they name the damaged record), then the checks of the global order."""
        self.hole: Problem | None = None
        """The first gap in SQL positions (dense from 1): a deleted row.  Reported after the
        run checks, which name a deletion inside a run more precisely (``seq_gap``), so it
        decides only when nothing else shows the deletion (the tail of an unfinished run)."""

    def checker(self, run_id: str, where: str) -> _RunChecker:
        chk = self.checkers.get(run_id)
        if chk is None:
            chk = self.checkers[run_id] = _RunChecker(self.ctx, where, expect_name=False)
            chk.slotted = False
        # A row names itself; a line is named by its file (the checker adds the number).
        chk.path = where if where.startswith("row ") else where.rpartition(":")[0]
        return chk

    def feed(self, item: _Item) -> Problem | None:
        where = item.where or self.label(item.number)
        if item.problem is not None:
            if where.startswith("row "):
                return Problem(code="malformed", where=where, row=item.number,
                               detail=item.problem)
            return Problem(code="malformed", where=where, path=where.rpartition(":")[0],
                           line=item.number, detail=item.problem)
        if item.note is not None:
            if self.ordered and self.late is None:
                self.late = self.g.checkpoint(item.note, where, anchor=False)
            return None
        env = item.env
        assert env is not None
        if item.seq is not None:  # a SQL row
            if item.number != self.next_row and self.hole is None:
                self.hole = Problem(code="index_mismatch", where=where, row=item.number,
                                    position=len(self.g.leaves), expected=str(self.next_row),
                                    actual=str(item.number),
                                    detail="positions are dense from 1: rows are missing "
                                    "before this one")
            self.next_row = item.number + 1
        try:
            run_id = item.run_id if item.run_id is not None else _route.decode(env.payload).run_id
        except ValueError:
            run_id = ""  # unreadable: a fresh checker reports it (bad signature or malformed)
        chk = self.checker(run_id, where)
        if chk.run_id is None and item.run_id is not None:
            chk.run_id = item.run_id  # the row's run: a body of another run is run_mismatch
        p = chk.feed(env, item.number, 0)
        if p is None and item.run_id is not None and chk.run_id != item.run_id:
            p = chk.problem("run_mismatch", item.number, None, "the row's run_id differs from "
                            "the body's", seq=chk.seq, expected=chk.run_id, actual=item.run_id)
        if p is None and item.seq is not None and (item.seq != chk.seq
                                                   or item.stored_hash != chk.prev):
            p = chk.problem("malformed", item.number, None, "the row's seq/record_hash differ "
                            "from the record", seq=chk.seq)
        if p is None and self.full and self.ordered:
            key_id = chk.segments[-1][1]
            why = self.trust.keys[key_id].invalid_at(len(self.g.leaves))
            if why is not None:
                p = chk.problem("key_not_valid", item.number, None, why, seq=chk.seq,
                                actual=key_id)
                p = msgspec.structs.replace(p, position=len(self.g.leaves))
        if p is not None:
            return p
        self.g.leaves.append(bytes(chk.leaves[-32:]))
        return None

    def finish(self, report: Report, anchor: str | None, problem: Problem | None,
               torn: Problem | None) -> None:
        if problem is None:
            for chk in self.checkers.values():
                problem = chk.finish(chk.lines[-1] if chk.lines else 0)
                if problem is not None:
                    break
        if problem is None:
            problem = self.hole or self.late
        if problem is None and anchor is not None:
            problem = self.g.checkpoint(anchor, "anchor", anchor=True)
        for chk in self.checkers.values():
            self.keys.update(chk.keys)
        report.keys = dict(sorted(self.keys.items()))
        report.records = len(self.g.leaves)
        report.runs = len(self.checkers)
        report.error = problem or torn
        report.crash = problem is None and torn is not None
        if self.ordered:
            report.checkpoint = self.g.last
            report.uncovered = len(self.g.leaves) - max(self.g.last_size, 0)

    def run(self, items: Iterable[_Item], report: Report, anchor: str | None,
            torn: Problem | None = None, progress: Progress | None = None,
            total: int | None = None) -> None:
        """Check ``items`` in order; ``total`` (for progress) defaults to their number."""
        problem = None
        if total is None:
            items = list(items)
            total = len(items)
        for done, item in enumerate(items, start=1):
            problem = self.feed(item)
            if problem is not None:
                break
            if progress is not None and not done % 10_000:
                progress(len(self.g.leaves), done, total)
        self.finish(report, anchor, problem, torn)


def _sql_label(number: int) -> str:
    return f"row {number}"


def _verify_sql(url: str, trust: TrustRoot, anchor: str | None, report: Report, mode: str,
                require_seals: bool, progress: Progress | None = None) -> None:
    if mode == "chain" and anchor is not None:
        raise VerifyUsageError("an anchor needs full mode")
    source = _sql_source(url)
    stream = _Stream(trust, trust.log_id or source.log_id, mode, require_seals, _sql_label)
    try:
        stream.run(source.items, report, anchor, progress=progress, total=source.total)
    finally:
        source.items.close()  # type: ignore[attr-defined]
    report.unchecked = (["signatures", "key_validity", "checkpoints"] if mode == "chain"
                        else source.lacks)


def _verify_export(path: Path, trust: TrustRoot, anchor: str | None, report: Report,
                   mode: str, require_seals: bool, progress: Progress | None = None) -> None:
    header, items, torn_at = _export_items(path.read_bytes())
    name = path.name
    if anchor is not None and (mode == "chain" or not header.ordered):
        raise VerifyUsageError("an anchor needs full mode and an ordered export")
    stream = _Stream(trust, trust.log_id or header.log_id, mode, require_seals,
                     lambda n: f"{name}:{n}", ordered=header.ordered)
    torn = None
    if torn_at is not None:
        torn = Problem(code="incomplete_tail_write", where=f"{name}:{torn_at}", path=name,
                       line=torn_at, detail="the export's last line has no newline")
    stream.run(items, report, anchor, torn, progress)
    if mode == "chain":
        report.unchecked = ["signatures", "key_validity", "checkpoints"]
    elif not header.ordered:
        report.unchecked = ["key_validity", "checkpoints"]
