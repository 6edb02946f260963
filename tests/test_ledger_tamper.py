"""The tamper suite: every class of damage to a JSONL ledger written by the real runtime gets
the exact error code at the exact first bad position; random single-byte mutations and record
deletions never verify."""

from __future__ import annotations

import base64
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on it
from ledger_fixtures import Ledger, interleaved
from wakepoint.kernel.codec import encode_state
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.logindex import INDEX_FILE, make_checkpoint, read_leaves
from wakepoint.ledger.records import pae, record_hash
from wakepoint.ledger.trust import TrustedKey, TrustRoot
from wakepoint.ledger.verify import Report, verify

MALLORY = Signer.from_seed(b"\x66" * 32)
enc = msgspec.json.Encoder()


# --- file surgery ------------------------------------------------------------------------


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(x + b"\n" for x in new))


def run_file(root: Path, run: str) -> Path:
    return root / "runs" / f"{run}.jsonl"


def edit_line(root: Path, run: str, number: int, fn: Callable[[dict], None],  # type: ignore[type-arg]
              *, fix_state: bool = False) -> None:
    """Decode line ``number`` (1-based) of a run file, let ``fn`` change it, store it back in
    the store's exact encoding (so only what ``fn`` changed differs)."""
    path = run_file(root, run)
    all_lines = lines(path)
    raw = all_lines[number - 1]
    head, _, state = raw.partition(b',"state":')
    doc = msgspec.json.decode(head + b"}")
    before = record_hash(body_of(doc["records"][-1]))
    fn(doc)
    after = record_hash(body_of(doc["records"][-1]))
    if fix_state:  # an insider also points the stored state at the rewritten record
        state = state.replace(before.encode(), after.encode())
    all_lines[number - 1] = enc.encode(doc)[:-1] + b',"state":' + state
    write_lines(path, all_lines)


def body_of(env: dict) -> bytes:  # type: ignore[type-arg]
    return base64.b64decode(env["payload"])


def set_body(env: dict, body: bytes, signer: Signer | None = None) -> None:  # type: ignore[type-arg]
    env["payload"] = base64.b64encode(body).decode()
    if signer is not None:
        env["signatures"] = [{"keyid": signer.key_id,
                              "sig": base64.b64encode(signer.sign(pae(body))).decode()}]


def reindex(root: Path, keep_checkpoints: bool = False) -> None:
    """Rewrite the index so its hashes are those of the (tampered) run files: what an attacker
    who edits records also does."""
    hashes: dict[tuple[str, int], str] = {}
    for f in (root / "runs").iterdir():
        for raw in lines(f):
            doc = msgspec.json.decode(raw)
            for env in doc["records"]:
                body = msgspec.json.decode(body_of(env))
                hashes[(body["run_id"], body["seq"])] = record_hash(body_of(env))
    out = []
    for raw in lines(root / INDEX_FILE):
        doc = msgspec.json.decode(raw)
        if "checkpoint" in doc:
            if keep_checkpoints:
                out.append(raw)
            continue
        doc["hashes"] = [hashes[(doc["run_id"], doc["seq"] + i)]
                         for i in range(len(doc["hashes"]))
                         if (doc["run_id"], doc["seq"] + i) in hashes]
        if doc["hashes"]:
            out.append(enc.encode(doc))
    write_lines(root / INDEX_FILE, out)


def tail_line(index: list[bytes], run: str) -> int:
    """The 0-based index line listing ``run``'s seq 3 (its last commit: resumed, completed,
    sealed).  How the store groups commits into index lines is its business; tests find
    lines by content."""
    return next(i for i, x in enumerate(index)
                if x.startswith(b'{"run_id":"%s",' % run.encode())
                and b'"seq":3,' in x)


def last_line(led: Ledger) -> str:
    """The position of the index's last line (where the checkpoint under test stands)."""
    return f"{INDEX_FILE}:{len(lines(led.path / INDEX_FILE))}"


def check(report: Report, code: str, where: str) -> None:
    assert not report.ok
    assert report.error is not None
    assert (report.error.code, report.error.where) == (code, where), report.error


@pytest.fixture
def led(tmp_path: Path) -> Ledger:
    ledger = interleaved(tmp_path / "store", 3)
    ledger.close()
    assert verify(ledger.path, ledger.trust()).ok
    return ledger


# --- records -----------------------------------------------------------------------------


def test_body_byte_edit_is_bad_signature(led: Ledger) -> None:
    """One changed byte inside a signed body: the signature over the stored bytes fails."""
    def fn(doc: dict) -> None:  # type: ignore[type-arg]
        env = doc["records"][0]
        set_body(env, body_of(env).replace(b'"seq":2', b'"seq":7'))
    edit_line(led.path, "run-1", 2, fn)
    check(verify(led.path, led.trust()), "bad_signature", "runs/run-1.jsonl:2#0")


def test_signature_damage_is_bad_signature(led: Ledger) -> None:
    """A flipped bit in a signature of the second record of a line."""
    def fn(doc: dict) -> None:  # type: ignore[type-arg]
        sig = bytearray(base64.b64decode(doc["records"][1]["signatures"][0]["sig"]))
        sig[10] ^= 1
        doc["records"][1]["signatures"][0]["sig"] = base64.b64encode(sig).decode()
    edit_line(led.path, "run-2", 3, fn)
    check(verify(led.path, led.trust()), "bad_signature", "runs/run-2.jsonl:3#1")


def test_resigned_with_untrusted_key_is_unknown_key(led: Ledger) -> None:
    """A record rewritten and validly signed by a key the trust root does not hold."""
    def fn(doc: dict) -> None:  # type: ignore[type-arg]
        env = doc["records"][0]
        body = body_of(env).replace(led.signer.key_id.encode(), MALLORY.key_id.encode())
        set_body(env, body, MALLORY)
    edit_line(led.path, "run-0", 2, fn)
    check(verify(led.path, led.trust()), "unknown_key", "runs/run-0.jsonl:2#0")


def test_resigned_with_revoked_key_is_key_not_valid(led: Ledger) -> None:
    """The last record rewritten by a trusted key revoked before its position (index rebuilt
    to match): caught at that record's position in the global order."""
    def fn(doc: dict) -> None:  # type: ignore[type-arg]
        env = doc["records"][-1]
        body = body_of(env).replace(led.signer.key_id.encode(), MALLORY.key_id.encode())
        set_body(env, body, MALLORY)
    edit_line(led.path, "run-1", 3, fn, fix_state=True)
    reindex(led.path)
    trust = TrustRoot([*led.trust().keys.values(),
                       TrustedKey(key_id=MALLORY.key_id, public=MALLORY.public, revoked_at=5)],
                      log_id=led.log_id)
    report = verify(led.path, trust)
    check(report, "key_not_valid", "runs/run-1.jsonl:3#2")
    assert report.error is not None and report.error.position == 14


def test_deleted_record_is_seq_gap(led: Ledger) -> None:
    """Deleting a commit line from the middle of a run."""
    path = run_file(led.path, "run-1")
    all_lines = lines(path)
    del all_lines[1]
    write_lines(path, all_lines)
    check(verify(led.path, led.trust()), "seq_gap", "runs/run-1.jsonl:2#0")


def test_reordered_records_in_a_line_is_seq_gap(led: Ledger) -> None:
    """Swapping two records of one commit."""
    edit_line(led.path, "run-0", 1, lambda d: d["records"].reverse())
    check(verify(led.path, led.trust()), "seq_gap", "runs/run-0.jsonl:1#0")


def test_duplicated_record_is_duplicate_seq(led: Ledger) -> None:
    """A commit line repeated."""
    path = run_file(led.path, "run-2")
    all_lines = lines(path)
    all_lines.insert(2, all_lines[1])
    write_lines(path, all_lines)
    check(verify(led.path, led.trust()), "duplicate_seq", "runs/run-2.jsonl:3#0")


def test_record_from_another_run_is_run_mismatch(led: Ledger) -> None:
    """A validly signed line of run-0 spliced into run-1 at the same seq."""
    donor = lines(run_file(led.path, "run-0"))[1]
    path = run_file(led.path, "run-1")
    all_lines = lines(path)
    all_lines[1] = donor
    write_lines(path, all_lines)
    check(verify(led.path, led.trust()), "run_mismatch", "runs/run-1.jsonl:2#0")


def test_record_from_another_ledger_is_run_mismatch(led: Ledger, tmp_path: Path) -> None:
    """Same key, same run id, another ledger: its validly signed line does not belong here;
    nor does a whole run file copied from it."""
    other = Ledger(tmp_path / "other", log_id="another-log")
    for run in ("run-0", "run-1"):
        other.start(run)
    other.close()
    spare = tmp_path / "spare"
    shutil.copytree(led.path, spare)
    path = run_file(led.path, "run-1")
    all_lines = lines(path)
    all_lines[1] = lines(run_file(other.path, "run-1"))[1]
    write_lines(path, all_lines)
    check(verify(led.path, led.trust()), "run_mismatch", "runs/run-1.jsonl:2#0")
    shutil.copy(run_file(other.path, "run-1"), run_file(spare, "run-1"))
    check(verify(spare, led.trust()), "run_mismatch", "runs/run-1.jsonl:1#0")


def test_run_file_renamed_is_run_mismatch(led: Ledger) -> None:
    """A run's file moved under another run's name."""
    run_file(led.path, "run-2").unlink()
    run_file(led.path, "run-1").rename(run_file(led.path, "run-2"))
    check(verify(led.path, led.trust()), "run_mismatch", "runs/run-2.jsonl:1#0")


def test_truncated_head_is_seq_gap(led: Ledger) -> None:
    """The first commit of a run removed."""
    path = run_file(led.path, "run-0")
    write_lines(path, lines(path)[1:])
    check(verify(led.path, led.trust()), "seq_gap", "runs/run-0.jsonl:1#0")


def test_truncated_tail_of_finished_run_is_missing_seal(led: Ledger) -> None:
    """The seal cut off a finished run (the last record of its last line, the line's state
    pointed back at the completion, as a careful forger would; its index entry and the
    checkpoint too)."""
    path = run_file(led.path, "run-1")
    all_lines = lines(path)
    head, _, state = all_lines[-1].partition(b',"state":')
    doc = msgspec.json.decode(head + b"}")
    seal = doc["records"].pop()
    completed = record_hash(body_of(doc["records"][-1]))
    state = state.replace(b'"seq":5,"head":"%s"}' % record_hash(body_of(seal)).encode(),
                          b'"seq":4,"head":"%s"}' % completed.encode())
    all_lines[-1] = enc.encode(doc)[:-1] + b',"state":' + state
    write_lines(path, all_lines)
    reindex(led.path)
    check(verify(led.path, led.trust()), "missing_seal", "runs/run-1.jsonl:3")


def test_truncated_tail_under_a_checkpoint_is_behind_checkpoint(led: Ledger) -> None:
    """Records a stored checkpoint covers are gone from the run and the index."""
    path = run_file(led.path, "run-0")
    write_lines(path, lines(path)[:-1])  # no completion, no seal: a run that looks unfinished
    index = lines(led.path / INDEX_FILE)
    tail = tail_line(index, "run-0")
    write_lines(led.path / INDEX_FILE, index[:tail] + index[tail + 1:])
    report = verify(led.path, led.trust())
    check(report, "behind_checkpoint", last_line(led))


def test_rollback_against_the_anchor(led: Ledger) -> None:
    """The auditor holds the checkpoint of 18 records; the ledger is restored to 15."""
    anchor = msgspec.json.decode(lines(led.path / INDEX_FILE)[-1])["checkpoint"]
    path = run_file(led.path, "run-0")
    write_lines(path, lines(path)[:-1])
    index = lines(led.path / INDEX_FILE)
    write_lines(led.path / INDEX_FILE, [x for i, x in enumerate(index)
                                        if i != tail_line(index, "run-0")
                                        and not x.startswith(b'{"checkpoint"')])
    assert verify(led.path, led.trust()).ok  # without the anchor nothing is wrong
    check(verify(led.path, led.trust(), anchor=anchor), "rollback", "anchor")


def test_rewritten_suffix_by_key_holder_is_root_mismatch(led: Ledger) -> None:
    """An insider with the signing key rewrites run-0's tail and re-signs it; the checkpoint
    stored before catches it, and so does the anchor once the checkpoint is removed."""
    anchor = msgspec.json.decode(lines(led.path / INDEX_FILE)[-1])["checkpoint"]

    def fn(doc: dict) -> None:  # type: ignore[type-arg]
        env = doc["records"][-1]
        set_body(env, body_of(env).replace(b"T00:00:", b"T09:00:"), led.signer)
    edit_line(led.path, "run-0", 3, fn, fix_state=True)
    reindex(led.path, keep_checkpoints=True)
    check(verify(led.path, led.trust()), "root_mismatch", last_line(led))
    reindex(led.path)
    assert verify(led.path, led.trust()).ok
    check(verify(led.path, led.trust(), anchor=anchor), "root_mismatch", "anchor")


def test_checkpoint_forgery(led: Ledger) -> None:
    """A stored checkpoint whose size was edited, or signed by an untrusted key."""
    index = lines(led.path / INDEX_FILE)
    note = msgspec.json.decode(index[-1])["checkpoint"]
    index[-1] = enc.encode({"checkpoint": note.replace("\n18\n", "\n17\n")})
    write_lines(led.path / INDEX_FILE, index)
    check(verify(led.path, led.trust()), "bad_signature", last_line(led))
    forged = make_checkpoint(led.log_id, read_leaves(led.path), MALLORY)
    index[-1] = enc.encode({"checkpoint": forged})
    write_lines(led.path / INDEX_FILE, index)
    check(verify(led.path, led.trust()), "unknown_key", last_line(led))


def test_split_view_is_equivocation(led: Ledger) -> None:
    """Two validly signed checkpoints of the same size with different roots: the anchor the
    auditor holds and the one the rewritten ledger carries; also two inside one ledger."""
    anchor = msgspec.json.decode(lines(led.path / INDEX_FILE)[-1])["checkpoint"]

    def fn(doc: dict) -> None:  # type: ignore[type-arg]
        env = doc["records"][-1]
        set_body(env, body_of(env).replace(b"T00:00:", b"T09:00:"), led.signer)
    edit_line(led.path, "run-0", 3, fn, fix_state=True)
    reindex(led.path, keep_checkpoints=True)
    index = lines(led.path / INDEX_FILE)
    write_lines(led.path / INDEX_FILE, index[:-1])
    led.checkpoint()  # the writer signs the rewritten history at the same size
    check(verify(led.path, led.trust(), anchor=anchor), "equivocation", "anchor")
    write_lines(led.path / INDEX_FILE, [*lines(led.path / INDEX_FILE),
                                        enc.encode({"checkpoint": anchor})])
    check(verify(led.path, led.trust()), "equivocation", last_line(led))


def test_checkpoint_going_backwards_is_rollback(led: Ledger) -> None:
    """A later stored checkpoint smaller than an earlier one."""
    older = make_checkpoint(led.log_id, read_leaves(led.path)[:10], led.signer)
    write_lines(led.path / INDEX_FILE, [*lines(led.path / INDEX_FILE),
                                        enc.encode({"checkpoint": older})])
    check(verify(led.path, led.trust()), "rollback", last_line(led))


def test_rotation_signed_by_one_key_is_unauthorized(tmp_path: Path) -> None:
    """A key.rotated record carrying only the old key's signature."""
    new = Signer.from_seed(b"\x02" * 32)
    led = Ledger(tmp_path / "s")
    led.start("r")
    led.rotate("r", new, cosign=False)
    led.close()
    check(verify(led.path, led.trust(led.signer, new)), "rotation_unauthorized",
          "runs/r.jsonl:3#0")


def test_old_key_after_rotation_is_key_not_valid(tmp_path: Path) -> None:
    """After a rotation, the rotated-out key may not sign in that run any more."""
    new = Signer.from_seed(b"\x02" * 32)
    led = Ledger(tmp_path / "s")
    led.start("r")
    old = led.signer
    led.rotate("r", new)
    led.rt.signer = old  # the writer keeps using the old key
    led.finish("r")
    led.close()
    check(verify(led.path, led.trust(old, new)), "key_not_valid", "runs/r.jsonl:4#0")


def test_record_after_seal_is_state_violation(led: Ledger) -> None:
    """Anything after run.sealed (here: a second seal, validly signed)."""
    led2 = Ledger.__new__(Ledger)
    led2.__dict__.update(led.__dict__)
    from wakepoint.stores.jsonl import JsonlStore

    led2.store = JsonlStore(led.path, durability="none")
    led2.rt = type(led.rt)(led2.store, signer=led.signer)
    led2.seal("run-1")
    led2.close()
    check(verify(led.path, led.trust()), "state_violation", "runs/run-1.jsonl:4#0")


def test_edited_state_is_state_mismatch(led: Ledger) -> None:
    """The unsigned state of a line changed: it no longer matches the digest its record
    signed."""
    path = run_file(led.path, "run-2")
    all_lines = lines(path)
    assert b'"step":3,' in all_lines[1]
    all_lines[1] = all_lines[1].replace(b'"step":3,', b'"step":4,')
    write_lines(path, all_lines)
    check(verify(led.path, led.trust()), "state_mismatch", "runs/run-2.jsonl:2#0")


@pytest.mark.parametrize("mutate", [
    lambda raw: raw.replace(b'{"payloadType":', b'{"payloadType":"x","payloadType":', 1),
    lambda raw: raw.replace(b'"signatures":', b'"extra":1,"signatures":', 1),
    lambda raw: raw + b" ",
    lambda raw: raw.replace(b'{"records":', b'{ "records":', 1),
])
def test_non_canonical_lines_are_malformed(led: Ledger, mutate) -> None:  # type: ignore[no-untyped-def]
    """Duplicate keys, unknown fields, trailing data, extra whitespace: malformed."""
    path = run_file(led.path, "run-1")
    all_lines = lines(path)
    all_lines[2] = mutate(all_lines[2])
    write_lines(path, all_lines)
    check(verify(led.path, led.trust()), "malformed", "runs/run-1.jsonl:3")


def test_an_index_line_cut_at_a_comma_is_malformed(led: Ledger) -> None:
    """A leaf line cut in two where a comma separated two hashes (one byte made a newline):
    joined back with commas the halves would read as the line they were, so the bulk walk
    must see two lines that are not leaf lines (found by the random-damage test)."""
    index = led.path / INDEX_FILE
    data = index.read_bytes()
    at = data.index(b'","') + 1
    index.write_bytes(data[:at] + b"\n" + data[at + 1:])
    line = data[:at].count(b"\n") + 1
    check(verify(led.path, led.trust()), "malformed", f"{INDEX_FILE}:{line}")


def test_unindexed_record_is_index_mismatch(tmp_path: Path) -> None:
    """A validly signed record appended to a run behind the index's back."""
    from wakepoint.ledger.rotation import rotation_record
    from wakepoint.stores.jsonl import JsonlStore

    led = Ledger(tmp_path / "s")
    led.start("r")
    led.close()
    store = JsonlStore(led.path, durability="none")
    old = store.load("r")
    store.close()
    state, rec = rotation_record(led.signer, MALLORY, led.log_id, old, old.updated_at)
    # Appended to the run file directly, in the store's exact line form: the store itself
    # would index it.
    with run_file(led.path, "r").open("ab") as f:
        f.write(b'{"records":%s,"state":%s}\n' % (enc.encode([rec.envelope()]),
                                                   encode_state(state)))
    check(verify(led.path, led.trust(led.signer, MALLORY)), "index_mismatch",
          "runs/r.jsonl:3#0")


def test_torn_last_line_is_a_crash(led: Ledger) -> None:
    """Half a line at the end of a run file: incomplete_tail_write, flagged as a crash."""
    path = run_file(led.path, "run-1")
    path.write_bytes(path.read_bytes() + b'{"records":[{"payloa')
    report = verify(led.path, led.trust())
    check(report, "incomplete_tail_write", "runs/run-1.jsonl:4")
    assert report.crash and report.records == 18


# --- random damage -----------------------------------------------------------------------

_BASE: dict[str, Path] = {}


def _base(tmp_root: Path) -> Ledger:
    led = interleaved(tmp_root / "base", 2)
    led.close()
    return led


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_never_verifies(tmp_path_factory: pytest.TempPathFactory,
                                      data: st.DataObject) -> None:
    """A random single-byte change anywhere in the run files or the index, or a random
    record line deleted, is never ``ok``."""
    if "led" not in _BASE:
        led = _base(tmp_path_factory.mktemp("hyp"))
        _BASE["led"] = led.path
        _BASE["trust"] = led.trust().to_json()  # type: ignore[assignment]
    base = _BASE["led"]
    trust = TrustRoot.loads(_BASE["trust"])  # type: ignore[arg-type]
    work = tmp_path_factory.mktemp("case") / "s"
    shutil.copytree(base, work)
    files = sorted([*(work / "runs").iterdir(), work / INDEX_FILE])
    target = data.draw(st.sampled_from(files))
    content = bytearray(target.read_bytes())
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(content) - 1))
        new = data.draw(st.integers(0, 255).filter(lambda b: b != content[at]))
        content[at] = new
        target.write_bytes(bytes(content))
    else:
        # Records only: dropping a checkpoint line is not damage without an anchor.
        all_lines = lines(target)
        records = [i for i, x in enumerate(all_lines) if not x.startswith(b'{"checkpoint"')]
        del all_lines[data.draw(st.sampled_from(records))]
        write_lines(target, all_lines)
    assert not verify(work, trust).ok


def test_random_single_bytes_exhaustive_sample(tmp_path: Path) -> None:
    """A denser seeded sweep: 400 random single-byte edits of one run file all fail."""
    led = interleaved(tmp_path / "s", 1)
    led.close()
    path = run_file(led.path, "run-0")
    original = path.read_bytes()
    rng = random.Random(7)
    trust = led.trust()
    for _ in range(400):
        content = bytearray(original)
        at = rng.randrange(len(content))
        content[at] = (content[at] + rng.randrange(1, 256)) % 256
        path.write_bytes(bytes(content))
        assert not verify(led.path, trust).ok, at
    path.write_bytes(original)
    assert verify(led.path, trust).ok
