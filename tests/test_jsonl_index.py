"""The JSONL store lists a record in ``index.jsonl`` only once the record is durable.

In ``batch`` mode the run lines reach the disk with the next group commit; an index line
written before that could outlive its run line in a power loss, and the auditor's verifier
would then report the ledger as damaged.  What is asserted:

* the index line of a drive is written after the sync that made its run lines durable, and
  not before (an explicit ``flush()`` or the flusher's own batch);
* a power loss, emulated at its worst (every run file cut back to what the last sync covered,
  the index kept whole), leaves a ledger that ``recover()`` brings back to a verifying state;
  the same emulation with index lines written at once (the old rule) does not - which is what
  makes this test able to fail;
* a second process that takes a run over while the first one's index line still waits lists
  the records itself (after an fsync of the run file), and the first one's flush then writes
  no second copy: every record appears in the index exactly once, and the ledger verifies.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from wakepoint import Runtime, Workflow, wait_event
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.logindex import INDEX_FILE
from wakepoint.ledger.trust import TrustRoot
from wakepoint.ledger.verify import verify
from wakepoint.stores.base import StoreError
from wakepoint.stores.jsonl import JsonlStore

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on it
from test_runtime_ledger import approval, linear  # the same two workflows

# No flush happens by itself within a test: only explicit ones.
_QUIET = {"batch_ms": 600_000, "batch_commits": 10**9}


class SpyStore(JsonlStore):
    """Records the order of syncs and index writes, and each run file's size at every sync
    (what a power loss right after that sync would keep of it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.events: list[tuple[str, Any]] = []
        self.synced: dict[str, int] = {}
        super().__init__(*args, **kwargs)

    def _sync_files(self, todo: list[tuple[int | None, str]], dir_dirty: bool) -> None:
        sizes = {p.name: p.stat().st_size for p in (self.path / "runs").iterdir()}
        super()._sync_files(todo, dir_dirty)
        self.synced.update(sizes)
        self.events.append(("sync", sizes))

    def _write_index(self, data: bytes, *, mark: bool = True) -> None:
        self.events.append(("index", data))
        super()._write_index(data, mark=mark)


def _index_leaves(root: Path) -> list[tuple[str, int]]:
    """Every (run_id, seq) the index lists, in order."""
    listed = []
    for raw in (root / INDEX_FILE).read_bytes().splitlines():
        line = msgspec.json.decode(raw)
        if "hashes" in line:
            listed += [(line["run_id"], line["seq"] + k) for k in range(len(line["hashes"]))]
    return listed


def _verify(root: Path, signer: Signer, log_id: str) -> Any:
    return verify(root, TrustRoot.from_signers([signer], log_id=log_id), require_seals=True)


def test_index_lines_wait_for_the_sync_that_makes_their_records_durable(tmp_path: Path) -> None:
    signer = Signer.generate()
    store = SpyStore(tmp_path / "s", **_QUIET)
    rt = Runtime(store, [approval, linear], signer=signer, checkpoints=False)
    rt.start(linear, run_id="l1")
    rt.start(approval, run_id="a1")
    assert _index_leaves(store.path) == []  # committed, not yet durable: not listed
    assert not any(kind == "index" for kind, _ in store.events)
    store.flush()
    kinds = [kind for kind, _ in store.events]
    assert kinds[0] == "sync" and "index" in kinds
    assert kinds.index("index") > kinds.index("sync")
    listed = _index_leaves(store.path)
    assert sorted(listed) == sorted([("l1", s) for s in range(4)] + [("a1", 0), ("a1", 1)])
    # A later drive of the same run: listed after the next sync, contiguous with the first.
    rt.respond("a1", "yes")
    assert len(_index_leaves(store.path)) == 6
    store.flush()
    assert [seq for run, seq in _index_leaves(store.path) if run == "a1"] == list(range(5))
    rt.close()
    assert _verify(store.path, signer, store.log_id).ok


def _power_cut(root: Path, synced: dict[str, int]) -> None:
    """Cut every run file back to its size at the last sync (0 if never synced); the
    index is kept whole - the worst a power loss can do to the order of the two."""
    for path in (root / "runs").iterdir():
        keep = synced.get(path.name, 0)
        if path.stat().st_size > keep:
            with open(path, "r+b") as f:
                f.truncate(keep)


def _lose_power(tmp_path: Path, defer: bool) -> Any:
    root = tmp_path / ("deferred" if defer else "at-once")
    signer = Signer.generate()
    store = SpyStore(root, **_QUIET)
    store._defer = defer  # False: index lines written at once, the rule before this one
    rt = Runtime(store, [approval, linear], signer=signer, checkpoints=False)
    for i in range(3):
        rt.start(linear, run_id=f"early-{i}")
    rt.start(approval, run_id="asked")
    store.flush()  # these are durable
    for i in range(3):
        rt.start(linear, run_id=f"late-{i}")  # these are not, when the power goes
    rt.respond("asked", "no")
    _power_cut(root, store.synced)
    log_id = store.log_id
    store._closed = True  # the process is gone: nothing more is written or synced
    store._stop.set()
    store._wake.set()
    with Runtime(f"jsonl:{root}", [approval, linear], signer=signer) as after:
        after.recover()
        states = {s.run_id: s.status.value for s in after.list()}
    return _verify(root, signer, log_id), states


def test_a_power_loss_leaves_a_ledger_that_recover_makes_verify(tmp_path: Path) -> None:
    report, states = _lose_power(tmp_path, defer=True)
    assert report.ok, report.error
    assert {f"early-{i}" for i in range(3)} <= set(states)
    assert states["asked"] == "waiting"  # its answer was lost with the power; it asks again


def test_the_same_power_loss_with_index_lines_written_at_once_breaks_the_ledger(
    tmp_path: Path,
) -> None:
    report, _ = _lose_power(tmp_path, defer=False)
    assert not report.ok  # the index lists records the run files lost


def test_a_second_process_lists_a_runs_waiting_records_once(tmp_path: Path) -> None:
    """Store A commits a question and keeps its index line waiting; store B (another open
    file description, as another process has) answers the run: it lists A's records and its
    own.  A's flush then finds them listed and writes nothing more."""
    root = tmp_path / "s"
    signer = Signer.generate()
    a = SpyStore(root, **_QUIET)
    rt_a = Runtime(a, [approval], signer=signer, checkpoints=False)
    rt_a.start(approval, run_id="q")
    assert _index_leaves(root) == []
    b = JsonlStore(root)
    rt_b = Runtime(b, [approval], signer=signer, checkpoints=False)
    rt_b.respond("q", "yes")
    rt_b.close()
    assert [seq for _, seq in _index_leaves(root)] == [0, 1, 2, 3, 4]
    assert b.repaired == [("q", 0, 1)]
    a.flush()
    rt_a.close()
    listed = _index_leaves(root)
    assert len(listed) == len(set(listed)) == 5  # nothing listed twice
    assert _verify(root, signer, a.log_id).ok


def test_an_unclosed_store_lists_its_waiting_records_at_exit(tmp_path: Path) -> None:
    """A script that never closes its runtime: the store is closed at interpreter exit,
    which writes the index lines still waiting."""
    import subprocess
    import textwrap

    root = tmp_path / "s"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_runtime_ledger import linear
        from wakepoint import Runtime
        from wakepoint.stores.jsonl import JsonlStore
        rt = Runtime(JsonlStore({str(root)!r}, batch_ms=600_000), [linear], checkpoints=False)
        rt.start(linear, run_id="left-open")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert _index_leaves(root) == [("left-open", s) for s in range(4)]


def test_an_indexed_run_whose_file_was_emptied_does_not_verify(tmp_path: Path) -> None:
    """An empty run file is not a run (a create that never wrote, left by a crash): it
    verifies as nothing.  But emptying the file of a run the index lists is caught."""
    signer = Signer.generate()
    with Runtime(JsonlStore(tmp_path / "s"), [linear], signer=signer) as rt:
        rt.start(linear, run_id="kept")
        rt.start(linear, run_id="emptied")
        log_id = rt.store.log_id
    (tmp_path / "s" / "runs" / "never-written.jsonl").touch()
    assert _verify(tmp_path / "s", signer, log_id).ok
    (tmp_path / "s" / "runs" / "emptied.jsonl").write_bytes(b"")
    report = _verify(tmp_path / "s", signer, log_id)
    assert not report.ok and report.error.code == "index_mismatch"
    assert report.error.run_id == "emptied"


class GateStore(JsonlStore):
    """Holds its flush inside the index write, with the waiting runs' locks taken."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        super().__init__(*args, **kwargs)

    def _list_waiting(self, taken: Any) -> bool:
        self.entered.set()
        assert self.gate.wait(10)
        return super()._list_waiting(taken)


def test_the_stores_own_flusher_never_makes_a_claim_skip_a_run(tmp_path: Path) -> None:
    """A run locked only by this store's flusher (listing its leaves) is waited for, not
    skipped: ``take``/``claim`` skip runs a *writer* holds.  CI once saw a claim miss a
    run because the flusher held it at that moment."""
    store = GateStore(tmp_path / "s", **_QUIET)
    rt = Runtime(store, [approval], signer=Signer.generate(), checkpoints=False)
    rt.start(approval, run_id="a1")  # waits for its answer; its index line waits for a sync
    flusher = threading.Thread(target=store.flush)
    flusher.start()
    assert store.entered.wait(10)  # the flush holds a1's lock now
    got: list[bool] = []
    lease = timedelta(minutes=1)
    taker = threading.Thread(
        target=lambda: got.append(store.take("a1", "w1", lease, datetime.now(UTC)))
    )
    taker.start()
    taker.join(0.3)
    assert got == []  # waiting for the flush, not skipping the run
    store.gate.set()
    taker.join(10)
    flusher.join(10)
    assert got == [True]
    assert _index_leaves(store.path)  # the flush listed the records meanwhile
    store.close()


def _held_by_a_flush(tmp_path: Path, lease: timedelta) -> tuple[GateStore, datetime,
                                                                  threading.Thread]:
    """A store whose run ``a1`` (leased to ``w1`` for ``lease``) its flush holds now, inside
    the index write; the flush's thread goes on once ``store.gate`` is set."""
    store = GateStore(tmp_path / "s", **_QUIET)
    rt = Runtime(store, [approval], signer=Signer.generate(), checkpoints=False)
    rt.start(approval, run_id="a1")
    t0 = datetime.now(UTC)
    assert store.take("a1", "w1", lease, t0)
    flusher = threading.Thread(target=store.flush)
    flusher.start()
    assert store.entered.wait(10)
    return store, t0, flusher


def test_a_renew_during_a_flush_waits_and_extends_the_lease(tmp_path: Path) -> None:
    """``renew`` answers without rewriting only while a *driving* thread holds the run; a
    run held by the flusher for a moment is waited for and its lease really extended."""
    store, t0, flusher = _held_by_a_flush(tmp_path, timedelta(seconds=10))
    got: list[bool] = []
    renewer = threading.Thread(
        target=lambda: got.append(store.renew("a1", "w1", timedelta(hours=1), t0))
    )
    renewer.start()
    renewer.join(0.3)
    assert got == []  # waiting for the flush
    store.gate.set()
    renewer.join(10)
    flusher.join(10)
    assert got == [True]
    # The lease now runs an hour: another worker cannot take the run a minute later.
    assert not store.take("a1", "w2", timedelta(seconds=10), t0 + timedelta(minutes=1))
    store.close()


loop = Workflow("loop")


@loop.node(start=True)
def _wait_again(run: Any) -> Any:
    return wait_event("k", into="x", then="_wait_again")


class HookStore(JsonlStore):
    """Runs ``hook`` (once) right after a flush's sync, before its index lines."""

    hook: Any = None

    def _sync_files(self, todo: list[tuple[int | None, str]], dir_dirty: bool) -> None:
        super()._sync_files(todo, dir_dirty)
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()


def test_records_listed_in_part_elsewhere_are_listed_once(tmp_path: Path) -> None:
    """Another process lists part of a run's waiting records (its ``recover()``), this
    process commits more, and a drive commits again while the flush syncs: the flush lists
    the gap from the run file - up to the leaves it took, not the drive's newer ones, which
    follow with their own line.  Before: those were listed twice and the ledger never
    verified again (the index is append-only)."""
    signer = Signer.generate()
    store = HookStore(tmp_path / "s", **_QUIET)
    rt = Runtime(store, [loop], signer=signer, checkpoints=False)
    rt.start(loop, run_id="q")  # its leaves wait for a flush
    other = JsonlStore(tmp_path / "s", durability="none")
    assert other.repair_index() == 1  # lists them, appends nothing
    rt.send_event("k", 1)  # more waiting leaves of the same run
    store.hook = lambda: rt.send_event("k", 2)  # a drive during the flush's sync
    store.flush()
    store.close()
    other.close()
    listed = _index_leaves(store.path)
    assert sorted(listed) == sorted(set(listed))  # nothing listed twice
    assert sorted(seq for _, seq in listed) == list(range(len(rt.ledger("q"))))
    assert _verify(store.path, signer, store.log_id).ok


def test_a_renew_that_waited_for_a_flush_does_not_wait_for_a_drive(tmp_path: Path) -> None:
    """A drive that gets the run after the flusher (before the waiting ``renew``) is answered
    for from the lease file at once: the worker's loop, which renews every lease, is not
    held up for a whole drive (a long call) while other leases run out."""
    store, t0, flusher = _held_by_a_flush(tmp_path, timedelta(seconds=30))
    driving = threading.Event()

    def drive() -> None:
        with store.hold("a1"):
            driving.set()
            time.sleep(3)

    driver = threading.Thread(target=drive)
    driver.start()
    time.sleep(0.1)  # the drive waits for the run's mutex
    took: list[float] = []

    def renew() -> None:
        began = time.monotonic()
        assert store.renew("a1", "w1", timedelta(seconds=30), t0)
        took.append(time.monotonic() - began)

    renewer = threading.Thread(target=renew)
    renewer.start()
    time.sleep(0.1)
    store.gate.set()  # the flush ends; the drive takes the run
    renewer.join(10)
    assert driving.wait(10)
    assert took and took[0] < 1.5  # not the drive's 3 s
    driver.join(10)
    flusher.join(10)
    store.close()


def test_lines_held_back_by_another_process_come_without_further_commits(
    tmp_path: Path,
) -> None:
    """A flush that finds a waiting run locked by another process tries again a batch window
    later by itself: an idle process's records do not wait for its next commit or close."""
    store = JsonlStore(tmp_path / "s", batch_ms=50)
    rt = Runtime(store, [approval], signer=Signer.generate(), checkpoints=False)
    other = JsonlStore(tmp_path / "s", durability="none")  # another process
    rt.start(approval, run_id="q")  # its line is due ~50 ms later
    with other.hold("q"):
        time.sleep(0.3)  # the flush came and found q locked
    deadline = time.monotonic() + 5
    while not _index_leaves(store.path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [seq for _, seq in _index_leaves(store.path)] == list(range(len(rt.ledger("q"))))
    other.close()
    store.close()


def test_a_forked_child_leaves_its_parents_stores_alone_at_exit(tmp_path: Path) -> None:
    """The exit-time close is for a process's own stores: a forked child that exits normally
    neither lists the parent's waiting records nor releases the run lock the parent holds
    (its copies share the parent's open file descriptions)."""
    import subprocess
    import textwrap

    root = tmp_path / "s"
    script = textwrap.dedent(f"""
        import fcntl, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_runtime_ledger import approval
        from wakepoint import Runtime
        from wakepoint.stores.jsonl import JsonlStore
        store = JsonlStore({str(root)!r}, batch_ms=600_000, batch_commits=10**9)
        rt = Runtime(store, [approval], checkpoints=False)
        rt.start(approval, run_id="q")  # its index line waits for a group commit
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)  # until the parent holds q
            sys.exit(0)  # a normal exit: atexit runs
        os.close(r)
        with store.hold("q"):
            os.write(w, b"x")
            os.waitpid(pid, 0)
            print("index", os.path.getsize(os.path.join({str(root)!r}, "index.jsonl")))
            fd = os.open(os.path.join({str(root)!r}, "runs", "q.jsonl"), os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                print("lock lost")
            except BlockingIOError:
                print("lock held")
        store.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, timeout=60,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    said = [line for line in out.splitlines() if line.startswith(("index ", "lock "))]
    assert said == ["index 0", "lock held"]
    assert [seq for _, seq in _index_leaves(root)] == [0, 1]  # the parent's close lists them


def _fds_under(root: Path) -> list[str]:
    """This process's open file descriptors on files under ``root``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)):
            found.append(target)
    return found


def test_a_run_listed_meanwhile_and_evicted_leaves_no_fd_open(tmp_path: Path) -> None:
    """A waiting run whose records another path listed (``repair_index``) and that was then
    evicted is not pinned and reopened by the next flush: ``close()`` leaves no fd open."""
    root = tmp_path / "s"
    store = JsonlStore(root, max_open=1, **_QUIET)
    rt = Runtime(store, [approval], signer=Signer.generate(), checkpoints=False)
    rt.start(approval, run_id="a")  # a's leaves wait
    store.repair_index()  # lists them from the run file
    rt.start(approval, run_id="b")  # max_open=1: the idle a is evicted
    store.flush()
    store.close()
    assert _fds_under(root) == []
    assert sorted({rid for rid, _ in _index_leaves(root)}) == ["a", "b"]


class FailOnce(JsonlStore):
    """Its first sync fails as a disk would (EIO); later syncs are recorded."""

    failed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.synced_paths: list[str] = []
        super().__init__(*args, **kwargs)

    def _sync_files(self, todo: list[tuple[int | None, str]], dir_dirty: bool) -> None:
        if not self.failed:
            self.failed = True
            for fd, _ in todo:
                if fd is not None:
                    os.close(fd)
            raise OSError(5, "Input/output error (injected)")
        self.synced_paths += [path for _, path in todo]
        super()._sync_files(todo, dir_dirty)


def test_a_failed_sync_is_raised_and_its_files_are_synced_again(tmp_path: Path) -> None:
    """A group commit whose fsync fails raises ``StoreError`` from ``flush()`` and lists
    nothing; its files stay dirty, so the next flush syncs them again before their records
    are listed, and the waiting runs are not left pinned."""
    store = FailOnce(tmp_path / "s", **_QUIET)
    rt = Runtime(store, [approval], signer=Signer.generate(), checkpoints=False)
    rt.start(approval, run_id="a")
    with pytest.raises(StoreError, match="fsync failed"):
        store.flush()
    assert _index_leaves(store.path) == []
    run = store._runs["a"]
    assert run.users == 0 and "a" in store._unindexed
    store.flush()
    assert str(store.path / "runs" / "a.jsonl") in store.synced_paths
    assert [seq for _, seq in _index_leaves(store.path)] == [0, 1]
    store.close()


class NoIndex(JsonlStore):
    """Its index cannot be written (a full disk, say)."""

    def _write_index(self, data: bytes, *, mark: bool = True) -> None:
        raise OSError(28, "No space left on device (injected)")


def test_close_raises_what_the_index_could_not_list(tmp_path: Path) -> None:
    """A batch store whose index lines could not be written says so from ``close()`` as
    from ``flush()``: the records are stored but unlisted until ``recover()`` (before,
    close() returned as if all was well)."""
    store = NoIndex(tmp_path / "s", **_QUIET)
    rt = Runtime(store, [approval], signer=Signer.generate(), checkpoints=False)
    rt.start(approval, run_id="a")
    with pytest.raises(StoreError, match="could not be listed"):
        store.close()
    assert _fds_under(store.path) == []  # closed all the same


class DirSpy(JsonlStore):
    """Records each fsync of a directory, with what the index held at that moment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.dir_syncs: list[str] = []
        super().__init__(*args, **kwargs)

    def _fsync_dir(self, path: str) -> None:
        self.dir_syncs.append(path)
        super()._fsync_dir(path)


def test_listing_another_writers_new_run_syncs_its_directory_entry(tmp_path: Path) -> None:
    """Listing records of a run another writer created and has not synced yet: the run
    file is fsynced first, and so is ``runs/`` - else a power loss could keep the index
    line and lose the file's name."""
    root = tmp_path / "s"
    signer = Signer.generate()
    a = JsonlStore(root, **_QUIET)
    Runtime(a, [approval], signer=signer, checkpoints=False).start(approval, run_id="q")
    b = DirSpy(root)
    Runtime(b, [approval], signer=signer, checkpoints=False).respond("q", "yes")
    assert b.repaired == [("q", 0, 1)]
    assert str(root / "runs") in b.dir_syncs
    b.close()
    a.close()
