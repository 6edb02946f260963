"""The ledger the runtime writes, checked by the auditor's verifier.

What is asserted: runs written by a ``Runtime`` verify in full mode with seals required and
checkpoints present (JSONL and SQLite); the runtime writes checkpoints at a run's end and
every ``checkpoint_records`` records; a JSONL writer that dies between a commit's run line
and its index line leaves a ledger that ``recover()`` (or the run's next writer) repairs so
that it verifies again; and a key rotation in the middle of a run hands the chain over with a
``key.rotated`` record signed by both keys, which verifies against the rotated trust root.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest
from wakepoint import Runtime, Status, Workflow, ask_user, done, goto
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.logindex import INDEX_FILE
from wakepoint.ledger.records import parse_body
from wakepoint.ledger.trust import TrustRoot
from wakepoint.ledger.verify import verify
from wakepoint.stores import open_store
from wakepoint.stores.jsonl import JsonlStore

approval = Workflow("approval")


@approval.node(start=True)
def ask(run):  # type: ignore[no-untyped-def]
    return ask_user("ok?", choices=["yes", "no"], into="answer", then="decide")


@approval.node
def decide(run):  # type: ignore[no-untyped-def]
    return done({"answer": run.vars["answer"]})


linear = Workflow("linear")


@linear.node(start=True)
def first(run):  # type: ignore[no-untyped-def]
    return goto("second", set={"a": 1})


@linear.node
def second(run):  # type: ignore[no-untyped-def]
    return done(run.vars["a"])


def _trust(signer: Signer, log_id: str) -> TrustRoot:
    return TrustRoot.from_signers([signer], log_id=log_id)


@pytest.mark.parametrize("kind", ["jsonl", "sqlite"])
def test_runtime_ledgers_verify_with_seals_and_checkpoints(tmp_path: Path, kind: str) -> None:
    """Finished runs end with run.sealed, waiting runs do not; after close() a checkpoint
    covers every record; the verifier says ok with seals required."""
    url = f"jsonl:{tmp_path / 'store'}" if kind == "jsonl" else f"sqlite:///{tmp_path}/wp.db"
    signer = Signer.generate()
    store = open_store(url, upgrade=True) if kind == "sqlite" else open_store(url)
    with Runtime(store, [approval, linear], signer=signer) as rt:
        for i in range(5):
            rt.start(linear, run_id=f"lin{i}")
        waiting = rt.start(approval, run_id="ask")
        assert waiting.status is Status.WAITING
        rt.start(approval, run_id="answered")
        rt.respond("answered", "yes")
        kinds = {rid: [parse_body(r.body).kind for r in rt.ledger(rid)]
                 for rid in ("lin0", "ask", "answered")}
        log_id = rt.store.log_id
    assert kinds["lin0"] == ["run.started", "node.stepped", "run.completed", "run.sealed"]
    assert kinds["ask"] == ["run.started", "effect.requested"]
    assert kinds["answered"][-2:] == ["run.completed", "run.sealed"]
    source = tmp_path / "store" if kind == "jsonl" else url
    report = verify(source, _trust(signer, log_id), require_seals=True)
    assert report.ok, report.error
    total = 5 * 4 + 2 + 5
    assert report.records == total
    assert report.checkpoint is not None and report.checkpoint.size == total
    assert report.uncovered == 0


def test_checkpoints_at_run_end_and_every_k_records(tmp_path: Path) -> None:
    """The first run's end writes a checkpoint at once; with checkpoint_records=8, a stream of
    4-record runs gets one at least every 8 records; each covers more than the one before."""
    rt = Runtime(f"jsonl:{tmp_path}", [linear], checkpoint_records=8,
                 checkpoint_seconds=3600)
    rt.start(linear, run_id="r0")
    assert len(rt.store.checkpoints()) == 1  # type: ignore[attr-defined]
    for i in range(1, 9):
        rt.start(linear, run_id=f"r{i}")
    notes = rt.store.checkpoints()  # type: ignore[attr-defined]
    sizes = [int(note.splitlines()[1]) for note in notes]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert sizes[0] == 4 and sizes[-1] >= 9 * 4 - 8
    assert len(sizes) >= (9 * 4 - 4) // 8
    rt.close()


_DIE_BETWEEN_WRITES = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, @TESTS@)
    from test_runtime_ledger import approval, linear
    from wakepoint import Runtime
    from wakepoint.stores import jsonl

    real = jsonl.JsonlStore._write_index
    calls = 0

    def dying(self, data, **kw):
        global calls
        if data.startswith(b'{"run_id"'):  # a commit's index line (not a checkpoint's)
            calls += 1
        if calls == int(sys.argv[2]):
            os._exit(9)  # the run line is written; its index line never will be
        return real(self, data, **kw)

    jsonl.JsonlStore._write_index = dying
    rt = Runtime("jsonl:" + sys.argv[1], [approval, linear])
    rt.start(linear, run_id="done-run")
    rt.start(approval, run_id="waiting-run")
""")


@pytest.mark.parametrize("die_at", [1, 2])
def test_a_writer_dying_between_its_two_writes_is_repaired(tmp_path: Path, die_at: int) -> None:
    """A real process dies (os._exit) right after a commit's run line, before its index
    line.  The verifier then sees the commit missing from the index; the run's next writer
    (for a waiting run) or recover() (for any run) appends it, and the ledger verifies."""
    root = tmp_path / "store"
    script = _DIE_BETWEEN_WRITES.replace("@TESTS@", repr(str(Path(__file__).parent)))
    proc = subprocess.run([sys.executable, "-c", script, str(root), str(die_at)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    store = JsonlStore(root)
    log_id = store.log_id
    store.close()
    signer = Signer.load(root / "signer.key")
    damaged = verify(root, _trust(signer, log_id), require_seals=True)
    assert not damaged.ok
    with Runtime(f"jsonl:{root}", [approval, linear]) as rt:
        rt.recover()
        repaired = rt.store.repaired  # type: ignore[attr-defined]
        assert repaired, "recover() found the unindexed commit"
        if die_at == 2:  # waiting-run was created (unindexed); answer it
            rt.respond("waiting-run", "no")
        else:  # the process died before it started waiting-run
            assert rt.list(workflow="approval") == []
            rt.start(approval, run_id="again")
            rt.respond("again", "yes")
    report = verify(root, _trust(signer, log_id), require_seals=True)
    assert report.ok, report.error


def test_next_writer_repairs_its_runs_index_without_recover(tmp_path: Path) -> None:
    """The writer that died had just committed waiting-run's question (its last write); a
    new process answers the run without calling recover(): the commit path notices the run's
    last commit is not indexed, appends it first, and the ledger verifies."""
    root = tmp_path / "store"
    script = _DIE_BETWEEN_WRITES.replace("@TESTS@", repr(str(Path(__file__).parent)))
    # The linear run's commits share one index line (written when it ends); the approval
    # run's first commit (it waits) writes the second: the process dies right before it.
    proc = subprocess.run([sys.executable, "-c", script, str(root), "2"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    with Runtime(f"jsonl:{root}", [approval, linear]) as rt:
        assert rt.get("waiting-run").status is Status.WAITING
        rt.respond("waiting-run", "yes")
        assert [r[0] for r in rt.store.repaired] == ["waiting-run"]  # type: ignore[attr-defined]
        log_id = rt.store.log_id
    signer = Signer.load(root / "signer.key")
    report = verify(root, _trust(signer, log_id), require_seals=True)
    assert report.ok, report.error


def test_checkpoint_if_due_covers_an_idle_processs_last_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records committed right after a checkpoint wait for the next due point; an idle
    process covers them with checkpoint_if_due once the minimum interval has passed (and
    not before, and not when nothing is pending).  The interval is raised to 10 min here
    (the test moves the clock by hand), so a stall of the machine cannot pass it."""
    from wakepoint import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "_CHECKPOINT_MIN_INTERVAL", 600.0)

    rt = Runtime(f"jsonl:{tmp_path}", [linear], checkpoint_seconds=3600)
    rt.start(linear, run_id="a")  # the first run's end checkpoints at once
    rt.start(linear, run_id="b")  # within the minimum interval: left for later
    store = rt.store
    assert [int(n.splitlines()[1]) for n in store.checkpoints()] == [4]  # type: ignore[attr-defined]
    assert rt.checkpoint_if_due() is None  # too soon
    rt._cp_last -= runtime_module._CHECKPOINT_MIN_INTERVAL  # as if the interval passed
    note = rt.checkpoint_if_due()
    assert note is not None and int(note.splitlines()[1]) == 8
    rt._cp_last -= runtime_module._CHECKPOINT_MIN_INTERVAL
    assert rt.checkpoint_if_due() is None  # nothing pending
    rt.close()


def test_key_rotation_mid_run_is_handed_over_and_verifies(tmp_path: Path) -> None:
    """A run waits under key A; the key is rotated (A kept as previous); the next process
    answers with key B: the chain first gets key.rotated signed by A and co-signed by B,
    then B's records.  The trust root rotated at that record's global position verifies it;
    a trust root that never heard of B does not."""
    root = tmp_path / "store"
    key_file = tmp_path / "signer.key"
    old = Signer.generate()
    old.save(key_file)
    with Runtime(f"jsonl:{root}", [approval], signer=key_file) as rt:
        rt.start(approval, run_id="r1")
        log_id = rt.store.log_id
    new = Signer.load(key_file).rotate()
    new.save(key_file, replace=True)
    with Runtime(f"jsonl:{root}", [approval], signer=key_file) as rt:
        assert rt.signer.key_id == new.key_id and rt.signer.previous[0].key_id == old.key_id
        state = rt.respond("r1", "yes")
        records = rt.ledger("r1")
        assert rt.verify("r1") == len(records)
    assert state.status is Status.COMPLETED
    bodies = [parse_body(r.body) for r in records]
    assert [b.kind for b in bodies] == ["run.started", "effect.requested", "key.rotated",
                                       "wait.resumed", "run.completed", "run.sealed"]
    rotation = records[2]
    assert rotation.key_id == old.key_id
    assert [c.keyid for c in rotation.cosigs] == [new.key_id]
    assert {r.key_id for r in records[3:]} == {new.key_id}
    # The rotation record's global position: the leaves listed before it in the index.
    position = 0
    for raw in (root / INDEX_FILE).read_bytes().splitlines():
        line = msgspec.json.decode(raw)
        if "hashes" not in line:
            continue
        if rotation.hash in line["hashes"]:
            position += line["hashes"].index(rotation.hash)
            break
        position += len(line["hashes"])
    trust = _trust(old, log_id).rotate(old.key_id, new, position)
    report = verify(root, trust, require_seals=True)
    assert report.ok, report.error
    assert report.keys == {old.key_id: 3, new.key_id: 3}  # key.rotated counts for the old
    unrotated = verify(root, _trust(old, log_id), require_seals=True)
    assert not unrotated.ok and unrotated.error is not None
    assert unrotated.error.code in {"unknown_key", "rotation_unauthorized"}
