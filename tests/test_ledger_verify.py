"""The verifier on sound ledgers (empty, one record, many interleaved runs, rotation in the
middle of a run, a single run file, SQL), its report, summary and usage errors, and the
agreement of its bulk and exact passes."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on it
from ledger_fixtures import T0, IndexedStore, Ledger, interleaved, sealed, workflow
from wakepoint import Runtime
from wakepoint.kernel import transitions as kernel
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.logindex import INDEX_FILE, read_leaves
from wakepoint.ledger.records import sign_entries
from wakepoint.ledger.rotation import seal_record
from wakepoint.ledger.trust import TrustedKey, TrustRoot
from wakepoint.ledger.verify import (
    CODES,
    Report,
    VerifyUsageError,
    _Ctx,
    _exact_run_file,
    _fast_run,
    _file_name,
    render_summary,
    verify,
)
from wakepoint.stores import open_store
from wakepoint.stores.jsonl import file_name

NEW = Signer.from_seed(b"\x02" * 32)


def test_empty_store_verifies(tmp_path: Path) -> None:
    """A store with no runs is ok, with nothing counted."""
    IndexedStore(tmp_path, durability="none").close()
    report = verify(tmp_path, TrustRoot.from_signers([NEW]))
    assert report.ok and report.records == 0 and report.runs == 0 and report.keys == {}


def test_one_record_verifies(tmp_path: Path) -> None:
    """A run holding only its run.started record (created straight through the store)."""
    signer = Signer.from_seed(b"\x01" * 32)
    store = IndexedStore(tmp_path, durability="none", log_id="one")
    tr = kernel.start(workflow(), "solo", None, T0)
    state, records = sign_entries(signer, "one", tr.state, tr.entries, T0, prev_seq=-1,
                                  prev_head="")
    store.create(state, records)
    store.close()
    report = verify(tmp_path, TrustRoot.from_signers([signer], log_id="one"))
    assert report.ok, report.error
    assert (report.records, report.runs, report.uncovered) == (1, 1, 1)
    assert report.keys == {signer.key_id: 1}


def test_many_interleaved_runs_in_one_and_two_processes(tmp_path: Path) -> None:
    """Twenty runs interleaved in commit order, sealed, checkpointed: ok, the checkpoint
    covers everything, and two worker processes report exactly the same."""
    led = interleaved(tmp_path, 20)
    led.close()
    one = verify(tmp_path, led.trust())
    two = verify(tmp_path, led.trust(), processes=2)
    assert one.ok, one.error
    assert one.records == 120 and one.runs == 20 and one.uncovered == 0
    assert one.checkpoint is not None and one.checkpoint.size == 120
    # The checkpoint is the index's last line (how many lines the store groups the commits
    # into is its business).
    index_lines = (tmp_path / INDEX_FILE).read_bytes().count(b"\n")
    assert one.checkpoint.where == f"{INDEX_FILE}:{index_lines}"
    one.seconds = two.seconds = 0
    assert one == two


def test_uncovered_tail_is_counted(tmp_path: Path) -> None:
    """Records committed after the last checkpoint are the uncovered tail."""
    led = interleaved(tmp_path, 2)
    led.start("late")
    led.close()
    report = verify(tmp_path, led.trust())
    assert report.ok and report.uncovered == 3 and report.checkpoint is not None


def test_rotation_in_the_middle_of_a_run(tmp_path: Path) -> None:
    """A run starts under key A, rotates to B (signed by both), finishes and is sealed under
    B; a trust root ending A's range just after the rotation accepts it, and counts both."""
    led = Ledger(tmp_path)
    old = led.signer
    led.start("r")
    position = len(read_leaves(tmp_path))
    led.rotate("r", NEW)
    led.cp_signer = NEW
    led.finish("r")
    led.checkpoint()
    led.close()
    trust = TrustRoot([TrustedKey(key_id=old.key_id, public=old.public,
                                  valid_until=position + 1),
                       TrustedKey(key_id=NEW.key_id, public=NEW.public,
                                  valid_from=position)], log_id=led.log_id)
    report = verify(tmp_path, trust)
    assert report.ok, report.error
    assert report.keys == {old.key_id: 4, NEW.key_id: 3}
    # A revoked at the rotation position may still co-sign the hand-over (the runtime writes
    # it lazily, after that position): the new key's range decides for a key.rotated record.
    assert verify(tmp_path, trust.revoke(old.key_id, position)).ok
    late = trust.with_key(TrustedKey(key_id=NEW.key_id, public=NEW.public,
                                     valid_from=position + 1))
    bad = verify(tmp_path, late)
    assert bad.error is not None and bad.error.code == "key_not_valid"
    assert bad.error.where == "runs/r.jsonl:3#0"


def test_single_run_file(tmp_path: Path) -> None:
    """One run file verifies on its own; what needs the global order is listed unchecked, and
    an anchor is refused."""
    led = interleaved(tmp_path, 2)
    led.close()
    path = tmp_path / "runs" / "run-1.jsonl"
    report = verify(path, led.trust())
    assert report.ok and report.records == 6
    assert report.unchecked == ["key_validity", "checkpoints"]
    with pytest.raises(VerifyUsageError):
        verify(path, led.trust(), anchor="x")


def test_chain_mode(tmp_path: Path) -> None:
    """Chain mode accepts a sound ledger without keys, and catches a changed body at the next
    record's link (full mode names the changed record itself)."""
    led = interleaved(tmp_path, 2)
    led.close()
    report = verify(tmp_path, TrustRoot([]), mode="chain")
    assert report.ok and report.records == 12
    path = tmp_path / "runs" / "run-0.jsonl"
    lines = path.read_bytes().split(b"\n")
    doc = msgspec.json.decode(lines[1])
    import base64

    body = base64.b64decode(doc["records"][0]["payload"]).replace(b"T00:00", b"T01:00")
    lines[1] = lines[1].replace(doc["records"][0]["payload"].encode(),
                                base64.b64encode(body))
    path.write_bytes(b"\n".join(lines))
    chain = verify(tmp_path, TrustRoot([]), mode="chain")
    assert chain.error is not None
    assert (chain.error.code, chain.error.where) == ("prev_mismatch", "runs/run-0.jsonl:3#0")
    full = verify(tmp_path, led.trust())
    assert full.error is not None
    assert (full.error.code, full.error.where) == ("bad_signature", "runs/run-0.jsonl:2#0")


def test_report_json_and_summary(tmp_path: Path) -> None:
    """to_json is the whole report; the summary names the first error, its position and
    expected versus actual on one screen."""
    led = interleaved(tmp_path, 2)
    led.close()
    path = tmp_path / "runs" / "run-1.jsonl"
    lines = path.read_bytes().split(b"\n")
    del lines[1]
    path.write_bytes(b"\n".join(lines))
    report = verify(tmp_path, led.trust())
    assert msgspec.json.decode(report.to_json(), type=Report) == report
    text = render_summary(report)
    assert text.startswith("FAILED") and "seq_gap at runs/run-1.jsonl:2#0" in text
    assert "expected 2" in text and "actual   3" in text and len(text.splitlines()) < 20
    assert report.error is not None and report.error.code in CODES


def test_usage_errors(tmp_path: Path) -> None:
    """Unknown modes, sources that are not ledgers, anchors without a global order."""
    with pytest.raises(VerifyUsageError):
        verify(tmp_path, TrustRoot([]), mode="fast")  # type: ignore[arg-type]
    with pytest.raises(VerifyUsageError):
        verify(tmp_path, TrustRoot([]))
    led = Ledger(tmp_path / "s")
    led.start("r")
    led.close()
    (tmp_path / "s" / INDEX_FILE).unlink()
    with pytest.raises(VerifyUsageError):
        verify(tmp_path / "s", led.trust(), anchor="x")


def test_sql_ledger(tmp_path: Path) -> None:
    """A SQLite ledger written by the runtime verifies by URL; a changed body byte is a bad
    signature at its row."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    signer = Signer.from_seed(b"\x01" * 32)
    store = open_store(url, durability="none", upgrade=True)
    rt = Runtime(store, workflows=[workflow()], signer=signer)
    rt.start("audit", 1, run_id="a")
    rt.send_event("go:a")
    if not sealed(store, "a"):  # a runtime that seals by itself has done so
        state = store.load("a")
        new, rec = seal_record(signer, store.log_id, state, T0)  # type: ignore[attr-defined]
        store.commit("a", state.seq, new, [rec])
    rt.close()
    trust = TrustRoot.from_signers([signer])
    report = verify(url, trust)
    assert report.ok, report.error
    # At migration 0002 the schema holds checkpoints and co-signatures: nothing is unchecked.
    assert report.records == 6 and report.unchecked == []
    db = sqlite3.connect(tmp_path / "l.db")
    body = db.execute("SELECT body FROM wp_records WHERE position = 3").fetchone()[0]
    db.execute("UPDATE wp_records SET body = ? WHERE position = 3",
               (body.replace(b'"seq":2', b'"seq":5'),))
    db.commit()
    db.close()
    bad = verify(url, trust)
    assert bad.error is not None and (bad.error.code, bad.error.where) == ("bad_signature",
                                                                           "row 3")


@pytest.mark.parametrize("run_id", ["a", "a/b:c", ".hidden", "~tilde", "ü" * 150, "x" * 300])
def test_file_names_agree_with_the_store(run_id: str) -> None:
    """The verifier's copy of the JSONL file naming is the store's."""
    assert _file_name(run_id) == file_name(run_id)


def test_bulk_and_exact_passes_agree(tmp_path: Path) -> None:
    """On a sound file both passes return the same leaves, lines, slots and key counts."""
    led = interleaved(tmp_path, 1)
    led.close()
    data = (tmp_path / "runs" / "run-0.jsonl").read_bytes()
    ctx = _Ctx(record_keys={led.signer.key_id: led.signer.public}, other_keys=[],
               log_id=led.log_id, mode="full", require_seals=True)
    fast = _fast_run(data, "runs/run-0.jsonl", ctx, True)
    exact = _exact_run_file(data, "runs/run-0.jsonl", ctx, True)
    assert fast is not None and exact.problem is None
    assert fast == exact


def test_bulk_pass_refuses_a_commit_split_over_two_lines(tmp_path: Path) -> None:
    """The bulk pass reads a file as one JSON array of lines; a commit whose records are
    spread over two lines would still decode to the same elements, so it must check each
    line against its own element: it declines, and the exact pass says ``malformed``."""
    led = interleaved(tmp_path, 1)
    led.close()
    lines = (tmp_path / "runs" / "run-0.jsonl").read_bytes().split(b"\n")[:-1]
    cut = lines[2].index(b'},{"payloadType"') + 1
    bad = b"\n".join([*lines[:2], lines[2][:cut], lines[2][cut + 1:]]) + b"\n"
    ctx = _Ctx(record_keys={led.signer.key_id: led.signer.public}, other_keys=[],
               log_id=led.log_id, mode="full", require_seals=True)
    assert _fast_run(bad, "runs/run-0.jsonl", ctx, True) is None
    problem = _exact_run_file(bad, "runs/run-0.jsonl", ctx, True).problem
    assert problem is not None and (problem.code, problem.line) == ("malformed", 3)


def test_bulk_pass_structs_mirror_the_envelope() -> None:
    """The bulk pass decodes lines into its own untracked copies of ``Envelope`` and
    ``Signature``; their fields must stay the records module's, in the same order, or the
    bulk pass would decline every line (correct, but slow)."""
    from wakepoint.ledger.records import Envelope, Signature
    from wakepoint.ledger.verify import _FastEnvelope, _FastSignature

    def shape(t: type) -> list[tuple[str, object]]:
        return [(f.name, f.type) for f in msgspec.structs.fields(t)]

    assert [n for n, _ in shape(_FastEnvelope)] == [n for n, _ in shape(Envelope)]
    assert shape(_FastSignature) == shape(Signature)
    # The one payload type the bulk pass decodes is the records module's.
    from typing import get_args

    from wakepoint.ledger.records import PAYLOAD_TYPE

    assert get_args(shape(_FastEnvelope)[0][1]) == (PAYLOAD_TYPE,)


def test_bulk_pass_pae_format_is_pae() -> None:
    """The bulk pass builds DSSE's PAE with one C-level format; it must be ``pae`` exactly."""
    from wakepoint.ledger.records import pae
    from wakepoint.ledger.runfile import _PAE_FORMAT

    for body in (b"", b"x", b"%d %s", b'{"seq":1}' * 300):
        assert _PAE_FORMAT % (len(body), body) == pae(body)


@pytest.mark.parametrize("counts", [[1], [3], [1, 2], [2, 1, 1, 3, 1], [1] * 7 + [2],
                                    [2] * 9, [1, 2] * 12])
def test_bulk_pass_positions(counts: list[int]) -> None:
    """``_positions`` (one record per line, the few longer lines spliced in) names each
    record's line and slot as the construction of one entry per record does."""
    from array import array

    from wakepoint.ledger.runfile import _positions

    lines = array("I", [n for n, c in enumerate(counts, start=1) for _ in range(c)])
    slots = array("H", [k for c in counts for k in range(c)])
    assert _positions(counts) == (lines.tobytes(), slots.tobytes())


def test_bulk_pass_declines_a_body_holding_a_newline(tmp_path: Path) -> None:
    """The bulk pass checks the bodies' canonical form over all of them joined by newlines;
    a validly signed body of two JSON documents on two lines would pass that check as two
    bodies, so the count of decoded bodies must decide (``_fast_full`` declines by itself,
    before any chain check), and the exact pass names the record as ``malformed``."""
    import base64

    from wakepoint.ledger.records import pae

    led = interleaved(tmp_path, 1)
    led.close()
    path = tmp_path / "runs" / "run-0.jsonl"
    lines = path.read_bytes().split(b"\n")
    doc = msgspec.json.decode(lines[1])
    env = doc["records"][0]
    body = base64.b64decode(env["payload"])
    forged = body + b"\n" + body
    env["payload"] = base64.b64encode(forged).decode()
    env["signatures"][0]["sig"] = base64.b64encode(led.signer.sign(pae(forged))).decode()
    lines[1] = lines[1].replace(lines[1][:lines[1].index(b',"state":')],
                                msgspec.json.encode({"records": doc["records"]})[:-1])
    path.write_bytes(b"\n".join(lines))
    ctx = _Ctx(record_keys={led.signer.key_id: led.signer.public}, other_keys=[],
               log_id=led.log_id, mode="full", require_seals=True)
    data = path.read_bytes()
    from wakepoint.ledger.runfile import _fast_full

    assert _fast_full(data, ctx) is None
    assert _fast_run(data, "runs/run-0.jsonl", ctx, True) is None
    problem = _exact_run_file(data, "runs/run-0.jsonl", ctx, True).problem
    assert problem is not None and (problem.code, problem.where) == ("malformed",
                                                                     "runs/run-0.jsonl:2#0")


def test_index_block_hashes_only_in_canonical_form() -> None:
    """The bulk walk of the index proves every ``hashes`` value canonical with whole-block
    calls (``_block_hashes``); each near miss below must be refused (the line walk then names
    the line), the canonical form accepted with its hashes in order."""
    from wakepoint.ledger.global_order import _block_hashes

    h1, h2, h3 = (bytes([i]) * 32 for i in (0xA1, 0xB2, 0xC3))
    x1, x2, x3 = (h.hex().encode() for h in (h1, h2, h3))
    good = [b'["' + x1 + b'","' + x2 + b'"]', b'["' + x3 + b'"]']
    assert _block_hashes(good) == h1 + h2 + h3
    near_misses = [
        [b'["' + x1 + x2 + b'",""]'],                   # same digits, other strings
        [b'["' + x1[:10] + b'","' + x1[10:] + x2 + b'"]'],
        [b'["' + x1.upper() + b'"]'],                   # one spelling per hash
        [b'["' + x1 + b'", "' + x2 + b'"]'],            # spacing
        [b'[["' + x1 + b'"]]'],                         # nested
        [b"[" + b"1" * 64 + b"]"],                      # a number, not a string
        [b'["' + x1[:-2] + b'"]'],                      # short
        [b"[]"], [b'[""]'],
        [b'["' + x1 + b'"]', b'["' + x2 + b'","' + x3[:-1] + b'"]'],
    ]
    for raws in near_misses:
        assert _block_hashes(raws) is None, raws


@pytest.mark.parametrize("counts", [[1, 1, 1], [1, 1, 2], [3], [1, 2, 1, 3], [2, 1]])
def test_bulk_pass_state_check_per_line_shape(counts: list[int]) -> None:
    """The bulk state check (``_states_ok``) has three ways of pairing lines with their last
    records (one per line, only the last line longer, any shape); each accepts states built
    by the rule of ``check_state`` and refuses a state edited in any one line."""
    import hashlib
    from types import SimpleNamespace

    from wakepoint.ledger.runfile import _states_ok

    n = sum(counts)
    hashes = [hashlib.sha256(b"%d" % k).digest() for k in range(n)]

    def tail(k: int) -> bytes:
        return b',"seq":%d,"head":"%s"}' % (k, hashes[k].hex().encode() if k >= 0 else b"")

    bodies: list[SimpleNamespace] = [SimpleNamespace(state=None) for _ in range(n)]
    states = []
    last = -1
    for line, c in enumerate(counts):
        last += c
        prefix = b'{"line":%d,"vars":{"n":%d}' % (line, last)
        states.append(prefix + tail(last))
        bodies[last].state = hashlib.sha256(prefix + tail(last - 1)).hexdigest()
    raw = [msgspec.Raw(s) for s in states]
    assert _states_ok(counts, raw, hashes, bodies)  # type: ignore[arg-type]
    for line in range(len(counts)):
        edited = list(raw)
        edited[line] = msgspec.Raw(states[line].replace(b'"vars"', b'"varz"'))
        assert not _states_ok(counts, edited, hashes, bodies)  # type: ignore[arg-type]


def test_chain_links_are_compared_one_by_one(tmp_path: Path) -> None:
    """The bulk pass compares all links as one joined string; a prev two characters short
    followed by one two characters long joins to the same string, so the length of every
    prev must be checked too: the run is refused at the short link (chain mode, where bodies
    are not signed and such a run can be written)."""
    import base64
    import hashlib

    led = interleaved(tmp_path, 2)
    led.close()
    path = tmp_path / "runs" / "run-0.jsonl"
    lines = path.read_bytes().split(b"\n")[:-1]
    docs = [msgspec.json.decode(line) for line in lines]
    where = [(n, slot) for n, d in enumerate(docs) for slot in range(len(d["records"]))]
    payloads = [env["payload"] for d in docs for env in d["records"]]
    assert len(payloads) >= 4
    bodies = [base64.b64decode(p) for p in payloads]
    carry = ""  # the two characters moved from link 2 to link 3
    for k in range(2, len(bodies)):
        want = hashlib.sha256(b"\x00" + bodies[k - 1]).hexdigest()
        new_prev = want[:-2] if k == 2 else carry + want if k == 3 else want
        carry = want[-2:] if k == 2 else ""
        old_prev = msgspec.json.decode(bodies[k])["prev"]
        bodies[k] = bodies[k].replace(b'"prev":"%s"' % old_prev.encode(),
                                      b'"prev":"%s"' % new_prev.encode())
        n = where[k][0]
        lines[n] = lines[n].replace(payloads[k].encode(), base64.b64encode(bodies[k]))
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = verify(tmp_path, TrustRoot([]), mode="chain")
    assert report.error is not None
    line, slot = where[2]
    assert (report.error.code, report.error.where) == ("prev_mismatch",
                                                       f"runs/run-0.jsonl:{line + 1}#{slot}")


def _chain_ctx() -> _Ctx:
    return _Ctx(record_keys={}, other_keys=[], log_id=None, mode="chain", require_seals=True)


def _payloads(data: bytes) -> tuple[list[Any], list[bytes]]:
    """A run file's line documents and its record bodies, in order."""
    import base64

    docs = [msgspec.json.decode(line) for line in data.split(b"\n")[:-1]]
    bodies = [base64.b64decode(env["payload"]) for doc in docs for env in doc["records"]]
    return docs, bodies


def _with_payloads(docs: list[Any], bodies: list[bytes]) -> bytes:
    import base64

    envs = [env for doc in docs for env in doc["records"]]
    for env, body in zip(envs, bodies, strict=True):
        env["payload"] = base64.b64encode(body).decode()
    return b"".join(msgspec.json.encode(doc) + b"\n" for doc in docs)


def test_chain_bulk_pass_decodes_each_body_on_its_own(tmp_path: Path) -> None:
    """Chain mode: an empty body followed by a body of two documents (the record it
    replaced, then the next) made up the count when the bodies were decoded joined as
    lines, and the bulk pass accepted a file the exact pass calls ``malformed``."""
    import hashlib

    led = interleaved(tmp_path, 1)
    led.close()
    data = (tmp_path / "runs" / "run-0.jsonl").read_bytes()
    docs, bodies = _payloads(data)
    k = len(bodies) - 2  # the finishing record; k + 1 is the seal
    seal = msgspec.json.decode(bodies[k + 1])
    seal["prev"] = hashlib.sha256(b"\x00").hexdigest()  # links to the now empty body
    forged = [*bodies[:k], b"", bodies[k] + b"\n" + msgspec.json.encode(seal)]
    bad = _with_payloads(docs, forged)
    assert _fast_run(bad, "runs/run-0.jsonl", _chain_ctx(), True) is None
    problem = _exact_run_file(bad, "runs/run-0.jsonl", _chain_ctx(), True).problem
    assert problem is not None and problem.code == "malformed"
