"""``ledger.verify.export``: the portable export file of a JSONL store and of a SQL store,
and the issue-4 acceptance "JSONL and SQL exports of the same ledger verify to the same
report"; the export format's own damage cases."""

from __future__ import annotations

import base64
import sys
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
import pytest
import sqlalchemy

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on it
from ledger_fixtures import T0, IndexedStore, Ledger, interleaved, sealed, workflow
from wakepoint import Runtime
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.logindex import append_checkpoint, make_checkpoint, read_leaves
from wakepoint.ledger.rotation import seal_record
from wakepoint.ledger.trust import TrustRoot
from wakepoint.ledger.verify import ExportError, Report, VerifyUsageError, export, verify
from wakepoint.stores import Store, open_store

KEY = Signer.from_seed(b"\x07" * 32)


class Clock:
    def __init__(self) -> None:
        self.ticks = 0

    def __call__(self) -> datetime:
        self.ticks += 1
        return T0 + timedelta(seconds=self.ticks)


def drive(store: Store, log_id: str) -> None:
    """The same workload on any store: four runs started, two finished in reverse order
    and sealed, one left waiting, one finished and sealed last; fixed clock, fixed key."""
    clock = Clock()
    rt = Runtime(store, workflows=[workflow()], signer=KEY, clock=clock)
    for name in ("w-0", "w-1", "w-2", "w-3"):
        rt.start("audit", 1, run_id=name)
    for name in ("w-2", "w-0", "w-3"):
        rt.send_event(f"go:{name}")
        if not sealed(store, name):  # a runtime that seals by itself has done so
            old = store.load(name)
            state, rec = seal_record(KEY, log_id, old, clock())
            store.commit(name, old.seq, state, [rec])
    rt.close()


def normalised(report: Report) -> dict[str, object]:
    """The report minus what must differ between two files: where they are and how long
    the check took.  Positions inside (``where``, line numbers) are export lines, the same
    in both."""
    doc = msgspec.to_builtins(report)
    doc.pop("source")
    doc.pop("seconds")
    return doc


def test_jsonl_and_sql_exports_verify_to_the_same_report(tmp_path: Path) -> None:
    """Issue 4 acceptance: one workload into SQLite and into a JSONL store (same log id, key
    and clock); both exports verify ok, to the same report (with the same anchor), and are
    in fact the same bytes; the same damage to both gives the same first error."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    sql = open_store(url, durability="none", upgrade=True)
    log_id = sql.log_id  # type: ignore[attr-defined]
    drive(sql, log_id)
    sql.close()
    jsonl = IndexedStore(tmp_path / "j", durability="none", log_id=log_id)
    drive(jsonl, log_id)
    jsonl.close()
    # One stored checkpoint of the whole ledger in each (the runtime's own depend on timers):
    # same log, leaves and key, so the same note (Ed25519 signatures are deterministic).
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DELETE FROM wp_checkpoints"))
    engine.dispose()
    sql = open_store(url, durability="none")
    stored = sql.checkpoint(KEY)  # type: ignore[attr-defined]
    sql.close()
    assert append_checkpoint(tmp_path / "j", log_id, KEY) == stored
    trust = TrustRoot.from_signers([KEY], log_id=log_id)
    anchor = make_checkpoint(log_id, read_leaves(tmp_path / "j"), KEY)
    # Same file name in two directories, so that positions (``ledger.export:<line>``) match.
    outs = [tmp_path / side / "ledger.export" for side in ("sql", "jsonl")]
    for out in outs:
        out.parent.mkdir()
    n_sql = export(url, outs[0])
    n_jsonl = export(tmp_path / "j", outs[1])
    assert n_sql == n_jsonl == 3 * 6 + 3
    reports = [verify(out, trust, anchor=anchor) for out in outs]
    assert all(r.ok for r in reports), [r.error for r in reports]
    without = verify(outs[0], trust).checkpoint
    assert without is not None and without.where == f"ledger.export:{n_sql + 2}"
    assert normalised(reports[0]) == normalised(reports[1])
    assert reports[0].checkpoint is not None and reports[0].checkpoint.size == n_sql
    assert (reports[0].records, reports[0].runs, reports[0].uncovered) == (n_sql, 4, 0)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    # The stores themselves agree with their exports.
    assert verify(url, trust, anchor=anchor).ok and verify(tmp_path / "j", trust, anchor=anchor).ok
    for out in outs:
        lines = out.read_bytes().split(b"\n")
        lines[5], lines[6] = lines[6], lines[5]
        out.write_bytes(b"\n".join(lines))
    bad = [verify(out, trust) for out in outs]
    assert normalised(bad[0]) == normalised(bad[1])
    assert bad[0].error is not None
    assert (bad[0].error.code, bad[0].error.where) == ("seq_gap", "ledger.export:6")


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Ledger, Path]:
    led = interleaved(tmp_path / "s", 3)
    led.close()
    out = tmp_path / "ledger.export"
    assert export(f"jsonl:{led.path}", out) == 18
    return led, out


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(x + b"\n" for x in new))


def test_export_keeps_checkpoints_and_verifies(exported: tuple[Ledger, Path]) -> None:
    """An export of a JSONL store with a checkpoint: header, 18 records, the checkpoint
    last; it verifies to the store's own counts; an existing file is never replaced."""
    led, out = exported
    head, *rest = lines(out)
    assert msgspec.json.decode(head) == {"format": "wakepoint-ledger-export", "v": 1,
                                         "log_id": led.log_id, "ordered": True, "records": 18}
    assert rest[-1].startswith(b'{"checkpoint"') and len(rest) == 19
    report = verify(out, led.trust())
    store_report = verify(led.path, led.trust())
    assert report.ok and (report.records, report.runs, report.keys, report.uncovered) == (
        store_report.records, store_report.runs, store_report.keys, 0)
    with pytest.raises(FileExistsError):
        export(led.path, out)


def test_export_damage_has_exact_codes_and_lines(exported: tuple[Ledger, Path]) -> None:
    """Export damage: a changed body byte (bad_signature), a record removed (seq_gap - the
    header count catches a cut tail), a cut tail (malformed), a forged checkpoint, a torn
    last line (crash), and an anchor newer than the export (rollback)."""
    led, out = exported
    trust = led.trust()
    original = lines(out)

    def case(new: list[bytes], code: str, where: str, anchor: str | None = None,
             tail: bytes = b"") -> None:
        write(out, new)
        if tail:
            out.write_bytes(out.read_bytes() + tail)
        report = verify(out, trust, anchor=anchor)
        assert report.error is not None, code
        assert (report.error.code, report.error.where) == (code, where), report.error

    env = msgspec.json.decode(original[4])
    body = base64.b64decode(env["payload"]).replace(b'"seq":', b'"seq": ', 1)
    env["payload"] = base64.b64encode(body).decode()
    case([*original[:4], msgspec.json.encode(env), *original[5:]], "bad_signature",
         "ledger.export:5")
    # run-0's seq 2 removed: caught at its seq 3, now on line 16.
    assert b'"seq":2' in base64.b64decode(msgspec.json.decode(original[3])["payload"])
    case([*original[:3], *original[4:]], "seq_gap", "ledger.export:16")
    case(original[:-3], "malformed", "ledger.export:18")
    note = msgspec.json.decode(original[-1])["checkpoint"].replace("\n18\n", "\n17\n")
    case([*original[:-1], msgspec.json.encode({"checkpoint": note})], "bad_signature",
         "ledger.export:20")
    case(original, "incomplete_tail_write", "ledger.export:21", tail=b'{"payloadT')
    # The auditor holds a checkpoint of one record more than the export holds.
    newer = make_checkpoint(led.log_id, [*read_leaves(led.path), b"\x00" * 32], led.signer)
    case(original, "rollback", "anchor", anchor=newer)


def test_export_refuses_what_it_cannot_order(tmp_path: Path) -> None:
    """A JSONL store whose index disagrees with its run files is refused (ledger verify
    says why); a store without index exports unordered, and the verifier says what that
    leaves unchecked; a directory that is no store is refused."""
    led = interleaved(tmp_path / "s", 2)
    led.close()
    index = led.path / "index.jsonl"
    saved = index.read_bytes()
    index.write_bytes(b"\n".join(saved.split(b"\n")[1:]))
    with pytest.raises(ExportError, match="disagree"):
        export(led.path, tmp_path / "x.export")
    index.unlink()
    export(led.path, tmp_path / "u.export")
    report = verify(tmp_path / "u.export", led.trust())
    assert report.ok and report.unchecked == ["key_validity", "checkpoints"]
    assert report.uncovered is None and report.records == 12
    with pytest.raises(VerifyUsageError):
        verify(tmp_path / "u.export", led.trust(), anchor="x")
    with pytest.raises(ExportError, match="not a JSONL store"):
        export(tmp_path, tmp_path / "y.export")
