"""The JSONL store: file format, optimistic commits, torn lines, corruption, queries, leases,
durability modes, and several threads and processes sharing one directory.

Every run here is driven by the real kernel (``transitions.start``/``tick``) and every record
is signed with a real key, so the ledgers the store returns can be checked with
``verify_chain``.  Queries are compared with ``MemoryStore`` fed the very same commits: the
memory store is the reference for filters and ordering.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import multiprocessing
import os
import runpy
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from wakepoint.kernel import transitions
from wakepoint.kernel.errors import ConflictError, CorruptStore, RunExists, RunNotFound
from wakepoint.kernel.steps import ask_user, done, goto, wait_event
from wakepoint.kernel.types import ParentLink, RunState, Status, Transition
from wakepoint.kernel.workflow import RunView, Workflow
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.records import Record, sign_entries, verify_chain
from wakepoint.stores import MemoryStore, Store, StoreError, open_store
from wakepoint.stores import jsonl as jsonl_module
from wakepoint.stores.jsonl import JsonlStore, file_name, run_id_of

T0 = datetime(2030, 1, 1, tzinfo=UTC)

# --- workflows -------------------------------------------------------------------------------

LOOP = Workflow("jsonl.loop")


@LOOP.node(start=True)
def spin(run: RunView) -> Any:
    return goto("spin", set={"n": run.step})


WAITER = Workflow("jsonl.waiter")


@WAITER.node(start=True)
def park(run: RunView) -> Any:
    hours = run.input.get("hours")
    deadline = None if hours is None else T0 + timedelta(hours=hours)
    return wait_event(f"evt:{run.input['key']}", into="got", then="finish", deadline=deadline)


@WAITER.node
def finish(run: RunView) -> Any:
    return done(dict(run.vars))


ASKER = Workflow("jsonl.asker")


@ASKER.node(start=True)
def question(run: RunView) -> Any:
    return ask_user("ok?", choices=["y", "n"], into="answer", then="answered", timeout=7200)


@ASKER.node
def answered(run: RunView) -> Any:
    return done(run.vars["answer"])


ONESHOT = Workflow("jsonl.oneshot")


@ONESHOT.node(start=True)
def only(run: RunView) -> Any:
    return done("ok")


# --- helpers ---------------------------------------------------------------------------------


def _sign(
    signer: Signer, log_id: str, tr: Transition, now: datetime
) -> tuple[RunState, list[Record]]:
    # ``tr.state`` still names the previous record: that is where the new records chain on.
    return sign_entries(signer, log_id, tr.state, tr.entries, now,
                        prev_seq=tr.state.seq, prev_head=tr.state.head)


class Driver:
    """One run of ``wf`` driven by the kernel, each transition signed and written to ``stores``."""

    def __init__(
        self, stores: Store | Sequence[Store], signer: Signer, wf: Workflow, run_id: str,
        input: Any = None, *, now: datetime = T0, parent: ParentLink | None = None,
    ) -> None:
        self.stores = [stores] if isinstance(stores, JsonlStore | MemoryStore) else list(stores)
        self.signer, self.wf, self.run_id, self.now = signer, wf, run_id, now
        tr = transitions.start(wf, run_id, input, now, parent=parent)
        self.state, records = _sign(signer, self.stores[0].log_id, tr, now)
        self.records = list(records)
        for store in self.stores:
            store.create(self.state, records)

    def next(self) -> tuple[int, RunState, list[Record]]:
        """The next tick's commit arguments, not committed."""
        tr = transitions.tick(self.wf, self.state, self.now)
        new, records = _sign(self.signer, self.stores[0].log_id, tr, self.now)
        return self.state.seq, new, records

    def step(self, times: int = 1) -> RunState:
        """Tick ``times`` times, committing each tick to every store."""
        for _ in range(times):
            seq, new, records = self.next()
            for store in self.stores:
                store.commit(self.run_id, seq, new, records)
            self.state = new
            self.records.extend(records)
        return self.state


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.from_seed(b"jsonl-store-test-signer-seed-32b")


@pytest.fixture
def open_jsonl(tmp_path: Path) -> Iterator[Callable[..., JsonlStore]]:
    """Open JSONL stores on ``tmp_path/store`` (or another dir); all are closed at teardown."""
    opened: list[JsonlStore] = []

    def make(path: Path | None = None, **options: Any) -> JsonlStore:
        options.setdefault("durability", "none")
        store = JsonlStore(path or tmp_path / "store", **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def run_file(store: JsonlStore, run_id: str) -> Path:
    return store.path / "runs" / (file_name(run_id) + ".jsonl")


def _bytes_of(records: Sequence[Record]) -> list[tuple[bytes, bytes, str]]:
    return [(r.body, r.sig, r.key_id) for r in records]


# --- format and round trip -------------------------------------------------------------------


def test_roundtrip_survives_reopen(open_jsonl: Callable[..., JsonlStore], signer: Signer) -> None:
    """create + commits, then a new store on the same directory: same log id, same last state,
    the same record bytes and signatures in seq order, and the chain verifies."""
    store = open_jsonl()
    run = Driver(store, signer, LOOP, "r1", {"x": 1})
    run.step(5)
    store.close()

    again = open_jsonl()
    assert again.log_id == store.log_id
    assert again.load("r1") == run.state
    ledger = again.ledger("r1")
    assert [r.seq for r in ledger] == list(range(6))
    assert _bytes_of(ledger) == _bytes_of(run.records)
    assert verify_chain(ledger, signer, log_id=again.log_id, run_id="r1") == 6


def test_one_line_per_commit_with_envelopes_and_state(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """Each commit is one line {"records": [DSSE envelopes], "state": ...}; the envelope's
    payload is the exact signed body, base64-encoded."""
    store = open_jsonl()
    run = Driver(store, signer, LOOP, "r1")
    run.step(2)
    lines = run_file(store, "r1").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4
    last = json.loads(lines[-2])
    assert set(last) == {"records", "state"}
    (env,) = last["records"]
    assert base64.b64decode(env["payload"]) == run.records[-1].body
    assert base64.b64decode(env["signatures"][0]["sig"]) == run.records[-1].sig
    assert env["signatures"][0]["keyid"] == signer.key_id
    assert last["state"]["seq"] == 2 and last["state"]["head"] == run.records[-1].hash
    log = json.loads((store.path / "log.json").read_bytes())
    assert log == {"log_id": store.log_id}


# --- optimistic commits and missing runs ------------------------------------------------------


def test_stale_commit_is_a_conflict_and_writes_nothing(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """A commit whose expected_seq is not the stored head raises ConflictError (naming both
    seqs) and leaves the file byte for byte as it was."""
    store = open_jsonl()
    run = Driver(store, signer, LOOP, "r1")
    stale = run.next()
    run.step(2)
    before = run_file(store, "r1").read_bytes()
    with pytest.raises(ConflictError) as info:
        store.commit("r1", *stale)
    assert (info.value.expected_seq, info.value.actual_seq) == (0, 2)
    tr = transitions.tick(LOOP, run.state, T0)
    ahead_state, ahead_records = sign_entries(signer, store.log_id, tr.state, tr.entries, T0,
                                              prev_seq=5, prev_head="ab" * 32)
    with pytest.raises(ConflictError) as info:  # a writer that believes the run is further on
        store.commit("r1", 5, ahead_state, ahead_records)
    assert (info.value.expected_seq, info.value.actual_seq) == (5, 2)
    assert run_file(store, "r1").read_bytes() == before
    assert store.load("r1") == run.state


def test_create_of_a_taken_id_is_run_exists(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """create of an existing run raises RunExists and changes nothing, also from another
    store instance on the same directory."""
    store = open_jsonl()
    run = Driver(store, signer, LOOP, "r1")
    run.step()
    before = run_file(store, "r1").read_bytes()
    fresh = transitions.start(LOOP, "r1", None, T0)
    state, records = _sign(signer, store.log_id, fresh, T0)
    for target in (store, open_jsonl()):
        with pytest.raises(RunExists):
            target.create(state, records)
    assert run_file(store, "r1").read_bytes() == before


def test_unknown_run_is_run_not_found_and_leaves_no_files(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """load, commit and ledger of an unknown run raise RunNotFound, and a failed commit
    creates neither a run file nor a lock file."""
    store = open_jsonl()
    other = Driver(MemoryStore(log_id=store.log_id), signer, LOOP, "ghost")
    with pytest.raises(RunNotFound):
        store.load("ghost")
    with pytest.raises(RunNotFound):
        store.ledger("ghost")
    with pytest.raises(RunNotFound):
        store.commit("ghost", *other.next())
    assert list((store.path / "runs").iterdir()) == []
    assert list((store.path / "locks").iterdir()) == []


def test_abandoned_create_is_not_a_run_and_can_be_created(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """A run file with no complete line (a create that crashed before writing its line) is
    not a run: load/ledger say RunNotFound, list skips it, and create takes it over."""
    store = open_jsonl()
    path = run_file(store, "r1")
    path.write_bytes(b'{"records":[{"payl')  # the crashed creator's torn first line
    with pytest.raises(RunNotFound):
        store.load("r1")
    with pytest.raises(RunNotFound):
        store.ledger("r1")
    assert store.list() == []
    run = Driver(store, signer, LOOP, "r1")
    assert store.load("r1") == run.state
    assert path.read_bytes().count(b"\n") == 1 and path.read_bytes().startswith(b'{"records":[{')
    assert verify_chain(store.ledger("r1"), signer) == 1


# --- torn and corrupt lines -------------------------------------------------------------------


def test_torn_last_line_is_ignored_then_truncated_by_the_next_commit(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """Half a line appended by hand (a crash mid-write) is invisible to load and ledger; the
    next commit cuts it off before appending, so every line decodes and the chain verifies."""
    store = open_jsonl()
    run = Driver(store, signer, LOOP, "r1")
    run.step(2)
    path = run_file(store, "r1")
    clean = path.read_bytes()
    _, lost_state, lost_records = run.next()  # the commit that "crashed" half-way
    line = msgspec.json.encode(
        {"records": [r.envelope() for r in lost_records], "state": lost_state}
    ) + b"\n"
    with open_jsonl().hold("r1"), path.open("ab") as f:  # as a writer would: under the lock
        f.write(line[: len(line) // 2])
    assert store.load("r1") == run.state
    assert _bytes_of(store.ledger("r1")) == _bytes_of(run.records)
    assert open_jsonl().load("r1") == run.state

    run.step()  # same store instance: its cache must notice the file changed
    assert path.read_bytes() == clean + line  # the torn half is gone, not glued to

    ledger = open_jsonl().ledger("r1")
    assert [r.seq for r in ledger] == [0, 1, 2, 3]
    assert verify_chain(ledger, signer, log_id=store.log_id, run_id="r1") == 4
    assert store.load("r1") == run.state


def _rewrite_line(path: Path, number: int, new: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = new
    path.write_bytes(b"\n".join(lines))


def test_corrupt_middle_line_names_file_and_line(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """A complete line that does not decode raises CorruptStore naming the file and the
    1-based line number; load stays bounded (it reads only the last line) and still works."""
    store = open_jsonl()
    run = Driver(store, signer, LOOP, "r1")
    run.step(3)
    path = run_file(store, "r1")
    _rewrite_line(path, 2, b'{"records": [], "state": 17}')
    with pytest.raises(CorruptStore) as info:
        store.ledger("r1")
    assert (info.value.where, info.value.line) == (str(path), 2)
    assert f"{path}:2" in str(info.value)
    assert store.load("r1") == run.state


def test_corrupt_complete_last_line_is_an_error_not_a_torn_line(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """A damaged last line that still ends in a newline is corruption: load, ledger, list
    and commit raise CorruptStore naming its line, and the file is not truncated."""
    store = open_jsonl()
    run = Driver(store, signer, LOOP, "r1")
    run.step(2)
    path = run_file(store, "r1")
    pending = run.next()
    data = path.read_bytes()
    damaged = data[:-20] + b"#garbage#" + b"\n"
    path.write_bytes(damaged)
    for call in (lambda: store.load("r1"), lambda: store.ledger("r1"), store.list,
                 lambda: store.commit("r1", *pending), lambda: open_jsonl().load("r1")):
        with pytest.raises(CorruptStore) as info:
            call()
        assert (info.value.where, info.value.line) == (str(path), 3)
    assert path.read_bytes() == damaged


def test_malformed_envelope_is_corruption(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """A line that is valid JSON of the right shape but whose envelope is not a wakepoint
    record (wrong payload type, or a body that does not parse) raises CorruptStore."""
    store = open_jsonl()
    run = Driver(store, signer, LOOP, "r1")
    run.step(2)
    path = run_file(store, "r1")
    lines = path.read_bytes().split(b"\n")
    doc = json.loads(lines[1])
    doc["records"][0]["payloadType"] = "text/plain"
    _rewrite_line(path, 2, json.dumps(doc).encode())
    with pytest.raises(CorruptStore) as info:
        store.ledger("r1")
    assert info.value.line == 2

    doc = json.loads(lines[2])
    doc["records"][0]["payload"] = base64.b64encode(b'{"not": "a body"}').decode()
    _rewrite_line(path, 2, lines[1])
    _rewrite_line(path, 3, json.dumps(doc).encode())
    with pytest.raises(CorruptStore) as info:
        store.load("r1")
    assert info.value.line == 3


def test_line_of_another_run_is_corruption(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """A file whose last line holds another run's commit (a file copied or renamed by hand)
    raises CorruptStore instead of answering with the other run's state."""
    store = open_jsonl()
    Driver(store, signer, LOOP, "r1")
    Driver(store, signer, LOOP, "r2-longer")
    run_file(store, "r2-longer").write_bytes(run_file(store, "r1").read_bytes())
    for reader in (store, open_jsonl()):
        with pytest.raises(CorruptStore):
            reader.load("r2-longer")
        with pytest.raises(CorruptStore):
            reader.list()


# --- run ids ---------------------------------------------------------------------------------

AWKWARD_IDS = ["a/b/c", "tenant:42:run.7", "ünïcødé/日本", ".hidden", "..", ".", "~x", "%41",
               "A", "sp ace", "x" * 300, "é" * 150]


def test_awkward_run_ids(open_jsonl: Callable[..., JsonlStore], signer: Signer) -> None:
    """Run ids with '/', ':', '.', '~', '%', unicode and great length each get their own
    flat, non-hidden, bounded file name, decode back when not hashed, and round-trip through
    create, commit, load, ledger and list."""
    store = open_jsonl()
    names = {file_name(rid) for rid in AWKWARD_IDS}
    assert len(names) == len(AWKWARD_IDS)
    for rid in AWKWARD_IDS:
        name = file_name(rid)
        assert "/" not in name and not name.startswith(".") and len(name) <= 200
        assert run_id_of(name) in (rid, None)
        if len(rid) < 50:
            assert run_id_of(name) == rid
        run = Driver(store, signer, LOOP, rid)
        run.step()
        assert store.load(rid) == run.state
        assert verify_chain(store.ledger(rid), signer, run_id=rid) == 2
    assert sorted(s.run_id for s in open_jsonl().list()) == sorted(AWKWARD_IDS)
    assert sorted(p.name for p in (store.path / "runs").iterdir()) == sorted(
        n + ".jsonl" for n in names
    )
    with pytest.raises(StoreError):
        store.load("")


# --- queries ---------------------------------------------------------------------------------


def _mixed_runs(stores: Sequence[Store], signer: Signer) -> dict[str, Driver]:
    """Runs in every interesting shape, written identically to each of ``stores``."""
    minute = timedelta(minutes=1)
    runs = {
        "tie-b": Driver(stores, signer, LOOP, "tie-b"),
        "tie-a": Driver(stores, signer, LOOP, "tie-a"),
        "loop": Driver(stores, signer, LOOP, "loop", now=T0 + minute),
        "wait-a": Driver(stores, signer, WAITER, "wait-a", {"key": "k1", "hours": 1},
                         now=T0 + 2 * minute),
        "wait-b": Driver(stores, signer, WAITER, "wait-b", {"key": "k1"}, now=T0 + 3 * minute),
        "wait-c": Driver(stores, signer, WAITER, "wait-c", {"key": "k2", "hours": 5},
                         now=T0 + 4 * minute),
        "ask": Driver(stores, signer, ASKER, "ask", now=T0 + 5 * minute),
        "done": Driver(stores, signer, ONESHOT, "done", now=T0 + 6 * minute),
        "child": Driver(stores, signer, LOOP, "child", now=T0 + 7 * minute,
                        parent=ParentLink(run_id="wait-a", key="wait-a:2")),
    }
    runs["loop"].step(3)
    for rid in ("wait-a", "wait-b", "wait-c", "ask", "done"):
        runs[rid].step()
    return runs


def test_list_and_find_waiting_match_the_memory_store(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """For every combination of filters, list() returns exactly what MemoryStore returns for
    the same commits (same states, oldest first by (created_at, run_id), limit applied last);
    find_waiting agrees too, also from a second store instance."""
    store = open_jsonl()
    memory = MemoryStore(log_id=store.log_id)
    runs = _mixed_runs([store, memory], signer)
    assert runs["wait-a"].state.status is Status.WAITING
    assert runs["done"].state.status is Status.COMPLETED
    other = open_jsonl()
    combos = 0
    for status in (None, *Status):
        for workflow in (None, LOOP.id, WAITER.id, "nope"):
            for wait_kind in (None, "event", "user", "timer"):
                for due_before in (None, T0 + timedelta(hours=2), T0 + timedelta(hours=10)):
                    for parent in (None, "wait-a", "nope"):
                        for limit in (None, 2):
                            args = {"status": status, "workflow": workflow,
                                    "wait_kind": wait_kind, "due_before": due_before,
                                    "parent": parent, "limit": limit}
                            expected = memory.list(**args)
                            assert store.list(**args) == expected, args
                            combos += bool(expected)
    assert combos > 50  # the filters select something, not only empty lists
    assert [s.run_id for s in store.list(limit=3)] == ["tie-a", "tie-b", "loop"]
    for key in ("evt:k1", "evt:k2", "ask:1", "ask:2", "nope"):
        assert store.find_waiting(key) == memory.find_waiting(key)
        assert other.find_waiting(key) == memory.find_waiting(key)
    assert [s.run_id for s in store.find_waiting("evt:k1")] == ["wait-a", "wait-b"]


def test_commits_of_another_store_instance_are_seen(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """A second store on the same directory (as another process would) commits; the first
    store's load, list and find_waiting see it, and the first's now stale commit is a
    ConflictError that writes nothing."""
    first, second = open_jsonl(), open_jsonl()
    run = Driver(first, signer, WAITER, "w", {"key": "late"})
    stale = run.next()
    assert [s.status for s in first.list()] == [Status.RUNNING]  # warm first's cache
    assert first.find_waiting("evt:late") == []

    run.stores = [second]
    run.step()
    assert first.load("w") == run.state
    assert first.list(status=Status.WAITING) == [run.state]
    assert first.find_waiting("evt:late") == [run.state]
    before = run_file(first, "w").read_bytes()
    with pytest.raises(ConflictError):
        first.commit("w", *stale)
    assert run_file(first, "w").read_bytes() == before


# --- leases ----------------------------------------------------------------------------------


def test_claim_lease_expiry_and_release(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """claim leases exactly the runs that need a worker (RUNNING, WAITING past deadline),
    oldest first and at most ``limit``; another worker gets none of them until the lease
    expires; the holder may claim again; release works only for the holder."""
    store = open_jsonl()
    _mixed_runs([store], signer)
    now = T0 + timedelta(hours=3)  # past wait-a's and ask's deadlines, before wait-c's
    lease = timedelta(minutes=5)
    need = ["tie-a", "tie-b", "loop", "wait-a", "ask", "child"]
    assert [s.run_id for s in store.claim(now, "w1", lease, 2)] == need[:2]
    assert [s.run_id for s in store.claim(now, "w1", lease, 100)] == need
    lease_doc = json.loads((store.path / "leases" / "loop.json").read_bytes())
    assert lease_doc["worker"] == "w1"
    assert datetime.fromisoformat(lease_doc["expires"]) == now + lease

    other = open_jsonl()  # another process's worker sees the same leases
    assert other.claim(now, "w2", lease, 100) == []
    assert [s.run_id for s in other.claim(now + lease + timedelta(seconds=1), "w2", lease, 100)
            ] == need

    later = now + lease + timedelta(seconds=2)
    store.release("loop", "w1")  # not the holder: no effect
    assert store.claim(later, "w1", lease, 100) == []
    other.release("loop", "w2")
    assert [s.run_id for s in store.claim(later, "w1", lease, 100)] == ["loop"]
    assert [s.run_id for s in other.claim(later, "w2", lease, 100)] == [
        r for r in need if r != "loop"]  # w2's own unexpired leases: claimable by w2 again
    store.release("nope", "w1")  # no lease, no run: no error


def test_claim_skips_a_run_locked_by_another_writer(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """A run another store instance holds (it is being driven) is skipped by claim rather
    than waited for, and claimable again once the hold ends."""
    store, driver = open_jsonl(), open_jsonl()
    Driver(store, signer, LOOP, "busy")
    Driver(store, signer, LOOP, "idle")
    with driver.hold("busy"):
        assert [s.run_id for s in store.claim(T0, "w1", timedelta(minutes=1), 10)] == ["idle"]
    assert [s.run_id for s in store.claim(T0, "w1", timedelta(minutes=1), 10)] == [
        "busy", "idle"]


# --- locking ---------------------------------------------------------------------------------


def test_hold_takes_the_file_lock_once(
    open_jsonl: Callable[..., JsonlStore], signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside hold(run_id) (re-entrant) a series of commits takes the run's file lock - an
    exclusive flock on the run file - once; outside it, each commit takes it itself."""
    store = open_jsonl()
    Driver(store, signer, LOOP, "warm")  # starts the spare pool: r1's file is a spare's
    assert store._spares is not None
    assert _wait_for(lambda: len(store._spares._ready) > 0)  # type: ignore[union-attr]
    run = Driver(store, signer, LOOP, "r1")
    acquired: list[str] = []
    real = fcntl.flock

    def counting(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_EX:
            acquired.append(_fd_path(fd))
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", counting)
    with store.hold("r1"), store.hold("r1"):
        run.step(10)
    assert len(acquired) == 1
    run.step(3)
    assert len(acquired) == 4
    assert set(acquired) == {str(run_file(store, "r1"))}


def test_hold_excludes_another_writer_until_it_ends(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """While one store holds a run, another store's commit to it waits; once the hold ends
    it proceeds and sees the holder's commits (so its stale commit is a ConflictError)."""
    holder, other = open_jsonl(), open_jsonl()
    run = Driver(holder, signer, LOOP, "r1")
    stale = run.next()
    outcome: list[BaseException | None] = []

    def commit_from_other() -> None:
        try:
            other.commit("r1", *stale)
            outcome.append(None)
        except BaseException as exc:  # handed to the main thread
            outcome.append(exc)

    with holder.hold("r1"):
        thread = threading.Thread(target=commit_from_other)
        thread.start()
        time.sleep(0.3)
        assert outcome == []  # still waiting for the lock
        run.step(2)
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], ConflictError)
    assert holder.load("r1") == run.state


def test_threads_share_one_store(open_jsonl: Callable[..., JsonlStore], signer: Signer) -> None:
    """Threads of one process drive their own runs (with the fd cache far smaller than the
    number of runs, so fds are evicted while others are in use) and race on a shared run:
    every ledger ends contiguous and verifies, and the shared run got exactly one commit per
    successful call."""
    store = open_jsonl(durability="batch", max_open=2, batch_ms=1)
    Driver(store, signer, LOOP, "shared")
    wins: list[int] = []
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            owns = [Driver(store, signer, LOOP, f"own-{index}-{k}") for k in range(3)]
            for step in range(30):
                own = owns[step % 3]
                with store.hold(own.run_id):
                    own.step()
                state = store.load("shared")
                tr = transitions.tick(LOOP, state, T0)
                new, records = _sign(signer, store.log_id, tr, T0)
                try:
                    store.commit("shared", state.seq, new, records)
                    wins.append(index)
                except ConflictError:
                    pass
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    shared = store.ledger("shared")
    assert len(shared) == 1 + len(wins)
    assert verify_chain(shared, signer, log_id=store.log_id, run_id="shared") == len(shared)
    for i in range(4):
        for k in range(3):
            assert verify_chain(store.ledger(f"own-{i}-{k}"), signer) == 11
    # The fd cache is bounded softly: entries in use when it overflows are kept, so up to
    # max_open plus one per thread may stay open, but never one per run (13 runs).
    store.flush()  # waits for the flusher, whose dup()ed fds would be counted too
    fds = [_fd_path(int(fd)) for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")]
    assert sum(str(store.path / "runs") in link for link in fds) <= 2 + 4


# --- durability ------------------------------------------------------------------------------


def _fd_path(fd: int) -> str:
    """The path of the file ``fd`` is open on.  A run file made from a spare was opened under
    the spare's name (``spare/...``, removed a little later): its run file is found by
    inode."""
    path = os.readlink(f"/proc/self/fd/{fd}")
    if "/spare/" in path:  # a ready spare is in no run: its own path comes back
        inode = os.fstat(fd).st_ino
        with os.scandir(os.path.join(path.split("/spare/")[0], "runs")) as entries:
            for entry in entries:
                if entry.inode() == inode:
                    return entry.path
    return path


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every os.fsync call from now on, as the path of the file it synced."""
    calls: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(_fd_path(fd))
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def _wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_sync_fsyncs_every_commit(
    open_jsonl: Callable[..., JsonlStore], signer: Signer, fsyncs: list[str]
) -> None:
    """durability="sync": each commit has fsynced its file before it returns, and a new run
    file's directory is fsynced too."""
    store = open_jsonl(durability="sync")
    run = Driver(store, signer, LOOP, "r1")
    path = str(run_file(store, "r1"))
    assert fsyncs.count(path) == 1 and fsyncs.count(str(store.path / "runs")) == 1
    for n in range(2, 6):
        run.step()
        assert fsyncs.count(path) == n


def test_batch_fsyncs_by_count_by_time_and_on_flush(
    open_jsonl: Callable[..., JsonlStore], signer: Signer, fsyncs: list[str], tmp_path: Path
) -> None:
    """durability="batch": no fsync while a batch is neither full nor old; a full batch
    (batch_commits) or an expired window (batch_ms, via the flusher thread) fsyncs soon
    after; flush() fsyncs what is pending at once."""
    slow = open_jsonl(tmp_path / "slow", durability="batch", batch_commits=4, batch_ms=60_000)
    run = Driver(slow, signer, LOOP, "r1")
    path = str(run_file(slow, "r1"))
    run.step(2)
    time.sleep(0.2)
    assert fsyncs.count(path) == 0  # 3 commits pending: not a full batch, window not over
    run.step()  # the 4th pending commit fills the batch
    assert _wait_for(lambda: fsyncs.count(path) == 1)
    run.step()
    time.sleep(0.1)
    assert fsyncs.count(path) == 1
    slow.flush()
    assert fsyncs.count(path) == 2
    slow.flush()
    assert fsyncs.count(path) == 2  # nothing pending: nothing to sync

    quick = open_jsonl(tmp_path / "quick", durability="batch", batch_commits=1000, batch_ms=20)
    run = Driver(quick, signer, LOOP, "r1")
    path = str(run_file(quick, "r1"))
    assert _wait_for(lambda: fsyncs.count(path) == 1, 2.0)  # the flusher, ~batch_ms later
    assert _wait_for(lambda: str(quick.path / "runs") in fsyncs)  # the new file's directory


def test_none_never_fsyncs_unless_flushed(
    open_jsonl: Callable[..., JsonlStore], signer: Signer, fsyncs: list[str]
) -> None:
    """durability="none": commits and close never fsync; an explicit flush() still does (the
    protocol's flush promises durability in every mode)."""
    store = open_jsonl(durability="none")
    run = Driver(store, signer, LOOP, "r1")
    run.step(5)
    time.sleep(0.05)
    store.close()
    assert [p for p in fsyncs if p.startswith(str(store.path / "runs"))] == []
    again = open_jsonl(durability="none")
    Driver(again, signer, LOOP, "r2").step()
    again.flush()
    assert str(run_file(again, "r2")) in fsyncs


def test_flush_covers_files_whose_fd_was_evicted(
    open_jsonl: Callable[..., JsonlStore], signer: Signer, fsyncs: list[str]
) -> None:
    """With more dirty runs than cached fds, flush() still fsyncs every written file (the
    per-file path, syncfs=False)."""
    store = open_jsonl(durability="batch", batch_commits=1000, batch_ms=60_000, max_open=2,
                       syncfs=False)
    for i in range(5):
        Driver(store, signer, LOOP, f"r{i}").step()
    store.flush()
    assert {str(run_file(store, f"r{i}")) for i in range(5)} <= set(fsyncs)


def test_a_batch_of_many_files_is_one_syncfs(
    open_jsonl: Callable[..., JsonlStore], signer: Signer, fsyncs: list[str]
) -> None:
    """A group commit covering at least _SYNCFS_MIN files makes them durable with one real
    syncfs(2) of the store's file system instead of an fsync each; fewer files, or
    syncfs=False, fsync each file."""
    store = open_jsonl(durability="batch", batch_commits=1000, batch_ms=60_000)
    assert store._syncfs is not None  # Linux: the tests run where syncfs exists
    real = store._syncfs
    synced: list[str] = []

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)  # the real system call: an error here fails the test

    store._syncfs = recording
    for i in range(jsonl_module._SYNCFS_MIN):
        Driver(store, signer, LOOP, f"r{i}").step()
    store.flush()
    assert synced == [str(store.path / "runs")]
    assert [p for p in fsyncs if p.startswith(str(store.path / "runs"))] == []
    Driver(store, signer, LOOP, "few").step()
    store.flush()  # one dirty file: below the threshold, so an fsync of that file
    assert synced == [str(store.path / "runs")]
    assert str(run_file(store, "few")) in fsyncs


def test_a_failed_syncfs_is_raised_and_later_flushes_recover(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """syncfs failing (EIO) surfaces as a StoreError (naming the OS error) from flush();
    the store stays usable, and the next flush syncs the same files again."""
    store = open_jsonl(durability="batch", batch_commits=1000, batch_ms=60_000)
    real = store._syncfs

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "syncfs: Input/output error")

    store._syncfs = failing
    for i in range(jsonl_module._SYNCFS_MIN):
        Driver(store, signer, LOOP, f"r{i}").step()
    with pytest.raises(StoreError, match="Input/output"):
        store.flush()
    store._syncfs = real
    Driver(store, signer, LOOP, "after").step()
    store.flush()
    assert store.load("after").seq >= 0


def test_invalid_options_are_store_errors(tmp_path: Path) -> None:
    """An unknown durability (named in the message) or a nonsensical batch size is a
    StoreError, directly and through open_store."""
    with pytest.raises(StoreError, match="'fast'"):
        JsonlStore(tmp_path / "a", durability="fast")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="'fast'"):
        open_store(f"jsonl:{tmp_path / 'b'}", durability="fast")
    with pytest.raises(StoreError):
        JsonlStore(tmp_path / "c", batch_commits=0)


# --- log id ----------------------------------------------------------------------------------


def test_concurrent_opens_of_a_fresh_directory_agree_on_the_log_id(tmp_path: Path) -> None:
    """Stores opened at the same instant on a fresh directory agree on one log id; a given
    log_id is used for a new store and must match an existing one."""
    for attempt in range(10):
        root = tmp_path / f"fresh-{attempt}"
        barrier = threading.Barrier(6)
        ids: list[str] = []

        def open_one(
            root: Path = root, barrier: threading.Barrier = barrier, ids: list[str] = ids
        ) -> None:
            barrier.wait()
            store = JsonlStore(root, durability="none")
            ids.append(store.log_id)
            store.close()

        threads = [threading.Thread(target=open_one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(ids) == 6 and len(set(ids)) == 1
        assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []

    named = JsonlStore(tmp_path / "named", log_id="ledger-1", durability="none")
    named.close()
    JsonlStore(tmp_path / "named", log_id="ledger-1", durability="none").close()
    with pytest.raises(StoreError, match="ledger-1"):
        JsonlStore(tmp_path / "named", log_id="ledger-2", durability="none")


# --- processes -------------------------------------------------------------------------------

_RACE_MODULE = "wakepoint_jsonl_race_worker"
_RACE_SEEDS = [bytes([i]) * 32 for i in range(4)]


def _race_worker(
    root: str, index: int, rounds: int, barrier: Any, results: Any
) -> None:
    """One racing process: each round load the head, wait for all, commit the next seq."""
    signer = Signer.from_seed(_RACE_SEEDS[index])
    store = JsonlStore(root, durability="batch")
    try:
        for round_no in range(rounds):
            state = store.load("race")
            new, records = _sign(signer, store.log_id, transitions.tick(LOOP, state, T0), T0)
            barrier.wait(30)  # everyone holds the same head before anyone commits
            try:
                store.commit("race", state.seq, new, records)
                results.put((round_no, index, state.seq, "won"))
            except ConflictError:
                results.put((round_no, index, state.seq, "lost"))
            barrier.wait(30)
    finally:
        store.close()


def test_processes_race_for_each_seq(
    open_jsonl: Callable[..., JsonlStore], signer: Signer, tmp_path: Path
) -> None:
    """4 processes (spawn) commit the same next seq each round: exactly one wins each round,
    the others get ConflictError, and the final ledger is contiguous, verifies, and holds
    each round's winner's record."""
    rounds, procs = 8, 4
    root = tmp_path / "race"
    store = open_jsonl(root)
    Driver(store, signer, LOOP, "race")
    store.close()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [
        # runpy re-runs this file in the child under _RACE_MODULE, which calls _race_worker:
        # a test module is not importable by name from a spawned process.
        ctx.Process(target=runpy.run_path, args=(__file__,), kwargs={
            "run_name": _RACE_MODULE,
            "init_globals": {"RACE_ARGS": (str(root), i, rounds, barrier, results)},
        })
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=60) for _ in range(rounds * procs)]
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    winners: list[int] = []
    for round_no in range(rounds):
        seen = [o for o in outcomes if o[0] == round_no]
        assert {o[2] for o in seen} == {round_no}
        won = [o[1] for o in seen if o[3] == "won"]
        assert len(won) == 1 and len(seen) == procs
        winners.append(won[0])
    results.close()
    results.join_thread()
    final = open_jsonl(root)
    ledger = final.ledger("race")
    assert [r.seq for r in ledger] == list(range(rounds + 1))
    keys = {s.key_id: s.verify_key for s in [signer, *map(Signer.from_seed, _RACE_SEEDS)]}
    assert verify_chain(ledger, keys, log_id=final.log_id, run_id="race") == rounds + 1
    assert [r.key_id for r in ledger[1:]] == [
        Signer.from_seed(_RACE_SEEDS[w]).key_id for w in winners
    ]
    assert final.load("race").seq == rounds


if __name__ == _RACE_MODULE:
    _race_worker(*globals()["RACE_ARGS"])


# --- lease renewal -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "jsonl"])
def test_take_passes_the_conformance_check(
    kind: str, open_jsonl: Callable[..., JsonlStore]
) -> None:
    """The shared conformance check of take (the worker's orphan sweep), on memory and JSONL."""
    from wakepoint.stores.conformance import check_take

    check_take(MemoryStore() if kind == "memory" else open_jsonl())


def test_renew_while_another_thread_drives_the_run_does_not_wait(
    open_jsonl: Callable[..., JsonlStore], signer: Signer
) -> None:
    """A worker renews from its own thread while another thread holds the run (a long call):
    renew answers at once from the lease file (True for the holder), because no other process
    can claim or write a run whose file lock this process holds."""
    store = open_jsonl()
    Driver(store, signer, LOOP, "r1")
    now = datetime(2030, 1, 1, tzinfo=UTC)
    lease = timedelta(seconds=10)
    assert [s.run_id for s in store.claim(now, "w1", lease, 1)] == ["r1"]
    entered, leave = threading.Event(), threading.Event()

    def drive() -> None:
        with store.hold("r1"):
            entered.set()
            leave.wait(5)

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        assert entered.wait(5)
        started = time.monotonic()
        assert store.renew("r1", "w1", lease, now) is True  # under our own file lock
        assert store.renew("r1", "w2", lease, now) is False  # not the holder
        assert time.monotonic() - started < 0.5
    finally:
        leave.set()
        driver.join()
    assert store.renew("r1", "w2", lease, now) is False  # not held: the lease file decides
    assert store.renew("r1", "w1", lease, now) is True
