"""Spare run files (``stores.spares``): a JSONL store links a new run's file from an empty file
made ahead by a background thread.  These tests check that runs still land in files of their
own, that the spares are private to one process (forks included), cleaned up after crashes and
at close, and that the store falls back to creating files itself whenever spares fail."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from wakepoint.kernel import transitions
from wakepoint.kernel.errors import RunExists
from wakepoint.kernel.steps import done
from wakepoint.kernel.workflow import RunView, Workflow
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.records import sign_entries, verify_chain
from wakepoint.stores.jsonl import JsonlStore
from wakepoint.stores.spares import SparePool

T0 = datetime(2030, 1, 1, tzinfo=UTC)
ONE = Workflow("spares.one")


@ONE.node(start=True)
def only(run: RunView) -> Any:
    return done(run.input)


SIGNER = Signer.from_seed(b"jsonl-spares-test-signer-seed-32")


def _create(store: JsonlStore, run_id: str, value: Any = None) -> None:
    tr = transitions.start(ONE, run_id, value, T0)
    state, records = sign_entries(SIGNER, store.log_id, tr.state, tr.entries, T0,
                                  prev_seq=tr.state.seq, prev_head=tr.state.head)
    store.create(state, records)


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _spares(store_dir: Path) -> list[str]:
    spare_dir = store_dir / "spare"
    return sorted(os.listdir(spare_dir)) if spare_dir.exists() else []


def _start(pool: SparePool) -> None:
    """Start the pool's thread, keeping whatever the first take got (it may be a spare)."""
    got = pool.take()
    if got is not None:
        pool.put_back(got)


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "store"


def test_new_runs_are_linked_from_spares_and_each_has_its_own_file(store_dir: Path) -> None:
    """Runs created once spares are ready get distinct files (no two share an inode), each with
    one name once the pool dropped the spare names; ledgers verify; close removes the rest."""
    store = JsonlStore(store_dir, durability="none", spares=4)
    _create(store, "first")  # starts the pool (this run may or may not get a spare)
    pool = store._spares
    assert pool is not None
    _wait_for(lambda: len(pool._ready) == 4, "the pool to fill")
    spare_inodes = {os.stat(p).st_ino for p, _ in pool._ready}
    for i in range(12):
        _create(store, f"r{i}", i)
    runs = store_dir / "runs"
    inodes = {os.stat(runs / f"r{i}.jsonl").st_ino for i in range(12)}
    assert len(inodes) == 12
    assert spare_inodes <= inodes, "the ready spares became run files"
    _wait_for(lambda: all(os.stat(runs / f"r{i}.jsonl").st_nlink == 1 for i in range(12)),
              "spare names to be dropped")
    _wait_for(lambda: len(_spares(store_dir)) == 4, "the pool to refill")
    for i in range(12):
        assert store.load(f"r{i}").input == i
        assert verify_chain(store.ledger(f"r{i}"), SIGNER) == 1
    store.close()
    assert _spares(store_dir) == []
    assert store._spares is not None and store._spares._thread is not None
    assert not store._spares._thread.is_alive()


def test_a_taken_name_keeps_its_spare_and_is_refused(store_dir: Path) -> None:
    """Linking a spare to a run file that exists fails (``link`` never replaces): the create
    is ``RunExists`` as before, the existing run is untouched, and the spare goes back."""
    store = JsonlStore(store_dir, durability="none", spares=2)
    other = JsonlStore(store_dir, durability="none", spares=0)
    _create(store, "warm")
    pool = store._spares
    assert pool is not None
    _wait_for(lambda: len(pool._ready) == 2, "the pool to fill")
    _create(other, "taken", "theirs")
    before = set(pool._ready)
    with pytest.raises(RunExists):
        _create(store, "taken", "mine")
    # The spare the link tried is back (the thread may have made another meanwhile).
    assert before <= set(pool._ready)
    assert store.load("taken").input == "theirs"
    assert os.stat(store_dir / "runs" / "taken.jsonl").st_nlink == 1
    store.close()
    other.close()


def test_spares_of_dead_processes_and_predecessors_are_removed(store_dir: Path) -> None:
    """A pool starting up removes spares of pids that are gone and of its own pid (made by a
    predecessor), and keeps a live process's."""
    spare_dir = store_dir / "spare"
    spare_dir.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for name in (f"{dead_pid}-aaaa-0", f"{os.getpid()}-bbbb-0", f"{live.pid}-cccc-0",
                     "notes.txt"):
            (spare_dir / name).write_bytes(b"")
        pool = SparePool(str(spare_dir), size=1)
        pool.take()  # starts the thread (it cleans up before it makes spares)
        _wait_for(lambda: not (spare_dir / f"{dead_pid}-aaaa-0").exists(), "cleanup")
        _wait_for(lambda: not (spare_dir / f"{os.getpid()}-bbbb-0").exists(), "cleanup")
        assert (spare_dir / f"{live.pid}-cccc-0").exists()
        assert (spare_dir / "notes.txt").exists()
        pool.close()
    finally:
        live.kill()
        live.wait()


# Python 3.12+ warns about forking a process that runs threads; here that is the point.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_forked_child_never_takes_its_parents_spares(store_dir: Path) -> None:
    """After ``fork`` the child's pool starts afresh with spares of its own (named with its
    pid): parent and child never link one inode to two runs."""
    pool = SparePool(str(store_dir / "spare"), size=3)
    pool.take()
    _wait_for(lambda: len(pool._ready) == 3, "the pool to fill")
    parents = set(pool._ready)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it is handed, then leave without cleanup
        try:
            got = pool.take()
            deadline = time.monotonic() + 10
            while got is None and time.monotonic() < deadline:
                time.sleep(0.005)
                got = pool.take()
            os.write(write_end, (got[0] if got else "").encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    child_got = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert status == 0
    assert child_got and child_got not in {path for path, _ in parents}
    assert os.path.basename(child_got).startswith(f"{pid}-")
    assert set(pool._ready) == parents
    pool.close()


def test_store_creates_files_itself_when_spares_fail(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No spare directory possible (a file is in its place), or a link refused by the file
    system: runs are still created, inline, and the pool is given up."""
    store_dir.mkdir()
    (store_dir / "spare").write_bytes(b"not a directory")
    store = JsonlStore(store_dir, durability="none", spares=2)
    _create(store, "a", 1)
    pool = store._spares
    assert pool is not None
    _wait_for(lambda: pool.broken, "the pool to give up")
    _create(store, "b", 2)
    assert [store.load(r).input for r in ("a", "b")] == [1, 2]
    store.close()

    (store_dir / "spare").unlink()
    store = JsonlStore(store_dir, durability="none", spares=2)
    _create(store, "c", 3)
    pool = store._spares
    assert pool is not None
    _wait_for(lambda: len(pool._ready) == 2, "the pool to fill")

    def no_links(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted", src)

    monkeypatch.setattr(os, "link", no_links)
    _create(store, "d", 4)
    assert store._spares is None and pool.broken
    _create(store, "e", 5)
    assert [store.load(r).input for r in ("c", "d", "e")] == [3, 4, 5]
    assert _spares(store_dir) == []  # given up: its spares were removed
    store.close()


def test_spares_zero_makes_no_thread_and_no_directory(store_dir: Path) -> None:
    """``spares=0`` creates every file inline; read-only use never starts a pool."""
    store = JsonlStore(store_dir, durability="none", spares=0)
    _create(store, "a")
    assert store._spares is None
    store.close()
    reader = JsonlStore(store_dir, durability="none")
    assert reader.load("a").run_id == "a"
    reader.close()
    assert not (store_dir / "spare").exists()


def test_the_pool_grows_only_when_it_runs_dry(store_dir: Path) -> None:
    """A pool keeps 4 spares ready at first (a process making one run does not make 32 files)
    and doubles that, up to its size, each time a take finds it empty."""
    pool = SparePool(str(store_dir / "spare"), size=16)
    first = pool.take()  # starts the thread; finding it empty does not count as running dry
    _wait_for(lambda: len(pool._ready) == 4, "the first fill")
    assert pool._target == 4
    taken = [] if first is None else [first]
    while len(taken) < 300:
        path = pool.take()
        if path is None:
            break
        taken.append(path)
    assert len(taken) < 300, "never ran dry"
    assert pool._target == 8
    _wait_for(lambda: len(pool._ready) == 8, "the larger fill")
    for path, fd in taken:
        os.close(fd)
        os.unlink(path)
    pool.close()
    assert _spares(store_dir) == []


def test_two_pools_of_one_process_keep_each_others_spares(store_dir: Path) -> None:
    """A second store on the same directory in the same process does not take the first's
    spares for a predecessor's: both keep theirs, and each removes only its own at close."""
    first = SparePool(str(store_dir / "spare"), size=2)
    _start(first)
    _wait_for(lambda: len(first._ready) == 2, "the first pool to fill")
    mine = set(first._ready)
    second = SparePool(str(store_dir / "spare"), size=2)
    _start(second)
    _wait_for(lambda: len(second._ready) == 2, "the second pool to fill")
    assert all(os.path.exists(p) for p, _ in mine)
    second.close()
    assert set(_spares(store_dir)) == {os.path.basename(p) for p, _ in mine}
    first.close()
    assert _spares(store_dir) == []


def test_a_process_that_only_drives_existing_runs_makes_no_spares(store_dir: Path) -> None:
    """Spares are asked for only when a run's file is missing: holding and writing runs that
    exist starts no pool and makes no ``spare/`` directory."""
    maker = JsonlStore(store_dir, durability="none", spares=0)
    _create(maker, "old", 1)
    maker.close()
    store = JsonlStore(store_dir, durability="none")
    with store.hold("old"):
        pass
    assert store.load("old").input == 1
    pool = store._spares
    assert pool is not None and pool._thread is None
    store.close()
    assert not (store_dir / "spare").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: forking with threads
def test_a_forked_child_closes_its_parents_spare_fds_at_once(store_dir: Path) -> None:
    """A spare's fd may become a run file's (and its ``flock``'s) in the parent: a forked
    child closes its copies at the fork, not at its first run, so that no lock of the parent
    can outlive the parent in a child."""
    pool = SparePool(str(store_dir / "spare"), size=2)
    _start(pool)
    _wait_for(lambda: len(pool._ready) == 2, "the pool to fill")
    fds = [fd for _, fd in pool._ready]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            still_open = []
            for fd in fds:
                try:
                    os.fstat(fd)
                    still_open.append(fd)
                except OSError:
                    pass
            os.write(write_end, repr(still_open).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert os.read(read_end, 200).decode() == "[]"
    os.close(read_end)
    assert all(os.fstat(fd) for fd in fds)  # the parent's stay open
    pool.close()
