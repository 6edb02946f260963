"""The JSONL store: the embedded default.  A directory of append-only files, one per run.

What it promises (the contract of ``stores.base``): a commit's records and new state land
together or not at all; a stale ``expected_seq`` gets ``ConflictError`` and writes nothing; a
returned commit is visible to every reader in any process at once, and is on disk as the
durability mode says.  Several threads of one process and several processes may share one
directory.

Layout::

    log.json             {"log_id": ...}, written once (temp file + link: first writer wins)
    runs/<name>.jsonl    one line per commit: {"records": [Envelope, ...], "state": RunState};
                         ``flock(2)`` on it is the run's inter-process lock
    index.jsonl          the global order: one line per commit {"run_id","seq","hashes"}
                         and signed checkpoints {"checkpoint": note} (``ledger.logindex``)
    locks/index.lock     checkpoint writers take turns on it (filelock)
    leases/<name>.json   a worker's lease: {"worker": ..., "expires": RFC 3339}
    spare/<pid>-<tag>-<n>  empty files made ahead; a new run's file is a link of one
                         (``stores.spares``: file creation costs up to ~1 ms of kernel CPU)

``<name>`` is the run id percent-encoded with nothing kept but ``[A-Za-z0-9_.-]`` (so ``/``,
``:`` and unicode are safe and the name decodes back), with a leading ``.`` encoded too (no
hidden files, no ``..``).  An id whose encoding would pass the file-name limit gets a
truncated prefix plus ``~`` and its SHA-256; such names do not decode, which costs nothing
because listing takes every run id from the state stored in the file.

Choices, and why:

* **One line per commit, one ``os.write`` on an ``O_APPEND`` fd.**  A commit is atomic because
  it is one line: readers ignore a last line without its ``\\n``, so a commit becomes visible
  exactly when its newline is written.  Envelopes keep the signed body bytes as they are
  (base64 in JSON), so the verifier checks the stored bytes and never a re-encoding.
* **Every line carries the full state**, so opening a run reads only the last complete line,
  found by reading backwards from the end: replay is bounded by one line whatever the run's
  length.  The price is disk space; a delta format with periodic snapshots can come later
  behind a new field (old lines stay readable).
* **Locking.**  Writers (``create``, ``commit``, and the lease calls) take the run's file
  lock for the inter-process part and a per-run ``threading.RLock`` for the in-process part;
  readers take no lock.  The run's file lock is an exclusive ``flock(2)`` on the run file
  itself, through the append fd the store keeps open anyway.  Until this version it was a
  ``filelock.FileLock`` on ``locks/<name>.lock``; measured here with filelock 4.2.11, a new run
  paid ~75 us to build the lock object, ~130-200 us per acquire + release (fork tracking, path
  resolution, a ``mkdir`` of the parent on every acquire) and one more file creation (20 us to
  1 ms of kernel time on this VM) - together more than the run's ten commits, and the largest
  cost of the JSONL store - against ~2 us for ``flock`` on an open fd.  The lock semantics are
  the same (filelock's Unix lock is this ``flock``), contended waits block in the kernel
  instead of polling, and ``filelock`` keeps the store-wide locks in ``locks/``.  Do not mix
  this version with older ones on one store: they lock different files.  ``hold(run_id)`` takes
  the lock once for a whole series of commits by this process (the runtime drives each run
  inside one), and a commit inside it takes no lock at all; ``unheld(run_id)``, around an
  effect's handler, lets the other threads of this process write the held run meanwhile (the
  file lock stays, so other processes still wait).  A hold on a run that does not exist yet
  creates its file empty, to lock it (the runtime holds a new run before creating it); an
  empty file is not a run (see below). Under the lock a commit checks its cached ``(size,
  state)`` against one ``os.fstat`` and re-reads the last line only when another
  process appended.  The size alone is a sound check because complete lines are never rewritten
  (see ``_Snap.still``); the same cache serves ``load`` and ``list``. ``claim`` does not wait
  for a run another worker is writing: it skips it, as ``FOR UPDATE SKIP LOCKED`` would.  Open
  append fds live in a bounded LRU (``max_open``); an fd in use is never evicted.
* **Durability.**  ``sync``: fsync after each commit (and of ``runs/`` after a new file).
  ``batch`` (default): group commit.  A daemon flusher thread syncs ``batch_ms`` after the
  first pending commit, or at once when a commit finds ``batch_commits`` commits pending, so
  a committer never waits for the disk unless the flusher falls ``_BACKLOG`` batches behind.
  A crash loses at most the commits of the current window (about ``batch_ms`` plus one
  fsync).  A batch touches about one file per run, and an ``fsync`` per file cost ~90 us of
  CPU and ~250 us of wall here (one journal commit each); so on Linux a batch of at least
  ``_SYNCFS_MIN`` files is made durable by ONE ``syncfs(2)`` of the store's file system
  (~7-11 us of CPU per file in the same test), which also covers ``runs/``'s new entries.
  The price: ``syncfs`` also writes back other programs' dirty data on that file system, so
  a store sharing its file system with a heavy writer should pass ``syncfs=False``.  ``sync``
  mode always fsyncs the one file (and directory) it wrote.  ``none``: never fsyncs by
  itself.  ``flush()`` makes everything pending durable in every mode; ``close()`` flushes in
  ``sync`` and ``batch``.  Leases are not fsynced: a lease lost
  in a power cut only lets another worker claim the run sooner, which the at-least-once
  contract allows.  A failed background fsync is raised by the next commit, ``flush`` or
  ``close``.
* **Global order.**  Run files say nothing about the order of records across runs, which
  checkpoints and key validity need; ``index.jsonl`` (created with the store) does.  A commit's
  records are listed there with one ``write`` on a shared ``O_APPEND`` fd (whole lines never
  interleave, between threads or processes), under the run's lock, and only once they are
  *durable*: so the index never lists a record that a crash or a power loss could take back,
  and lists a run's records in seq order.  Consecutive commits of a run that keeps RUNNING
  share one index line, complete when the run stops running (waits, dispatches an effect,
  ends) or its lock is released: one index write per drive instead of one per node.  In
  ``sync`` mode the records are durable when committed and the line is written at once (so
  is it in ``none`` mode, which promises nothing on power loss).  In ``batch`` mode the line
  waits for the group commit: the flusher makes the batch's run files durable, then takes
  each waiting run's lock and writes its line (a run busy in this process or locked by
  another is retried at the next flush; a writer of another process that takes the run over
  lists them itself, see below), so the index lags the run files by about one batch window.
  Before this rule (written at once), a power loss in ``batch`` mode could keep an index line
  whose run line it lost, and the verifier then reported the ledger as damaged.  A process
  that dies before writing a line leaves those commits unindexed: the next writer of the run
  finds out (its knowledge of what is indexed does not match the run's last seq, so it scans
  the index lines written since it last looked), fsyncs the run file and lists them before
  its own, and ``repair_index()`` (run by ``Runtime.recover()``) does it for every run.  A
  store still open at interpreter exit is closed then, which writes its waiting lines.
  Checkpoints (``checkpoint(signer)``) write the waiting lines first and fold the index
  incrementally into a Merkle frontier; see there.
* **Torn last line.**  A crash mid-write leaves a last line without ``\\n``.  Readers ignore
  it; the next writer, under the lock, truncates the file back to the last ``\\n`` before it
  appends, so its line never glues onto the garbage.  A file with no complete line at all is
  a ``create`` that never returned: it is not a run, and a later ``create`` takes it over.
  Any other damage - a complete line that does not decode, a malformed envelope, a line whose
  records or state belong to another run - raises ``CorruptStore`` naming the file and the
  1-based line, and changes nothing (``list`` and ``claim`` raise it too when the damaged
  line is the last one of a file they read).

Limits: ``list``, ``find_waiting`` and ``claim`` list ``runs/`` and stat every file on each
call (re-reading only files that changed), so they cost O(runs); the in-memory index holds
every run's latest state.  The cache trusts the file size, so an edit by hand that keeps a
file's size is not noticed by ``load``/``list`` (``ledger`` and the verifier read every
line).  A commit outside ``hold`` waits for the run's lock without a timeout: a process
holding run A while committing to run B, against another holding B and committing to A,
would wait forever, so take holds one run at a time.  File names are case-sensitive, as on
Linux.
"""

from __future__ import annotations

import atexit
import builtins
import ctypes
import fcntl
import hashlib
import os
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import NamedTuple
from urllib.parse import quote, unquote

import filelock
import msgspec

from ..kernel.codec import encode_state
from ..kernel.errors import (
    ConflictError,
    CorruptStore,
    RunExists,
    RunNotFound,
    WakepointError,
)
from ..kernel.types import RunState, Status
from ..ledger.checkpoint import parse_checkpoint
from ..ledger.keys import Signer
from ..ledger.logindex import INDEX_FILE, CheckpointLine, LeafLine, leaf_line, sign_frontier
from ..ledger.merkle import Frontier
from ..ledger.records import Envelope, Record, from_envelope
from .base import DURABILITIES, Durability, StoreError, check_append, matches, needs_worker
from .spares import SparePool

_SUFFIX = ".jsonl"
_MAX_NAME = 200
"""Longest encoded run id used as is; with suffixes it stays under the usual 255-byte limit."""
_TAIL_WINDOW = 16 * 1024
"""First read when looking for the last line; grows x4 until the line fits."""
_BACKLOG = 4
"""Pending commits, in batches, at which a committer waits for the fsync itself."""

_APPEND_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC

_INDEX_KEY = ""
"""The index's key among the dirty files (keyed by run id; no run id is empty)."""
_SYNCFS_MIN = 4
"""Dirty files in one batch from which one ``syncfs`` replaces a ``fsync`` per file."""

_LIVE: weakref.WeakSet[JsonlStore] = weakref.WeakSet()
"""Open stores, closed at interpreter exit: their index lines waiting for a group commit are
written then (a store nobody closes would otherwise leave them to the next ``recover``)."""


@atexit.register
def _close_live_stores() -> None:
    for store in list(_LIVE):
        with suppress(Exception):  # exit goes on; what is left is repaired by recover()
            store.close()


# A forked child's copies of its parent's stores are not its own: closing them at its exit
# would list the parent's waiting lines and, through the open file descriptions it shares,
# release the parent's run locks (or hang on a lock a parent thread held at the fork).
os.register_at_fork(after_in_child=_LIVE.clear)


def _load_syncfs() -> Callable[[int], None] | None:
    """Linux's ``syncfs(2)`` through libc, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None  # pragma: no cover - the tests run on Linux
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # pragma: no cover - a libc without syncfs
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        # ctypes releases the GIL for the call, as os.fsync does: commits go on meanwhile.
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")

    return syncfs


_SYNCFS = _load_syncfs()

# Read access on the append fd lets the writer read the tail and truncate a torn line without
# opening the file a second time.


class _Line(msgspec.Struct):
    """One stored commit (unknown fields are ignored, so later formats can add some)."""

    records: list[Envelope]
    state: RunState


class _Lease(msgspec.Struct):
    worker: str
    expires: datetime


class _LogFile(msgspec.Struct):
    log_id: str


_encoder = msgspec.json.Encoder()
_line_decoder = msgspec.json.Decoder(_Line)
_lease_decoder = msgspec.json.Decoder(_Lease)
_log_decoder = msgspec.json.Decoder(_LogFile)
_leaf_decoder = msgspec.json.Decoder(LeafLine)
_checkpoint_line_decoder = msgspec.json.Decoder(CheckpointLine)


class _Snap(NamedTuple):
    """What a run file held when last seen: the cache a commit validates with ``fstat``."""

    size: int
    clean: int
    """Offset just past the last ``\\n``; ``< size`` when a torn line follows it."""
    state: RunState | None
    """The last complete line's state; None when the file holds no complete line."""

    def still(self, size: int) -> bool:
        """Whether the file, now ``size`` bytes long, still ends with this snapshot's line.

        Complete lines are never rewritten and a torn tail is only ever cut back to the last
        ``\\n``, so a file that ended cleanly at ``size`` and is ``size`` bytes long again
        holds the same lines.  A snapshot with a torn tail proves nothing (the tail may have
        been cut and replaced by a line of the same length), so it is never trusted.
        """
        return self.clean == self.size == size


_RENEW_POLL = 0.005  # s: how often a waiting renew looks whether a drive holds the run

class _Run:
    """Per-run process-local machinery: the in-process lock, the append fd (whose ``flock``
    is the run's inter-process lock)."""

    __slots__ = ("depth", "fd", "fresh", "leaf_seq", "lease_path", "leaves", "mutex", "name",
                 "owner", "path", "run_id", "users")

    def __init__(self, run_id: str, name: str, runs_dir: str, leases_dir: str) -> None:
        self.run_id = run_id
        self.name = name
        self.path = os.path.join(runs_dir, name + _SUFFIX)
        self.lease_path = os.path.join(leases_dir, name + ".json")
        self.leaves: list[str] = []
        """Record hashes committed under the current lock but not yet in the index."""
        self.leaf_seq = 0
        """The seq of ``leaves[0]``."""
        self.mutex = threading.RLock()
        self.depth = 0
        """Nesting of lock sections of the thread owning ``mutex``; > 0 while it holds the flock."""
        self.owner: int | None = None
        """``threading.get_ident()`` of the thread holding the file lock, None when unheld."""
        self.fresh = False
        """The cached snapshot is this thread's own last append, made under the file lock it
        has held ever since: no other process can have appended, so no ``fstat`` is needed."""
        self.fd: int | None = None
        self.users = 0
        """Threads between checkout and checkin; an entry in use is never evicted."""


def file_name(run_id: str) -> str:
    """The file-system-safe name of a run id (see the module docstring)."""
    if not run_id:
        raise StoreError("a run id cannot be empty")
    # quote() keeps "~" as is; escaping it too leaves "~" free to mark hashed names.
    name = quote(run_id, safe="").replace("~", "%7E")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _MAX_NAME:
        name = name[: _MAX_NAME - 65] + "~" + hashlib.sha256(run_id.encode()).hexdigest()
    return name


def run_id_of(name: str) -> str | None:
    """The run id a file name encodes, or None for a hashed (too long) one."""
    return None if "~" in name else unquote(name)


def _tail(fd: int, size: int) -> tuple[int, int, bytes | None]:
    """``(start, clean, line)`` of the last complete line within the first ``size`` bytes.

    ``clean`` is the offset just past its ``\\n``; ``line`` is None (and both offsets 0) when
    there is no complete line.
    """
    window = _TAIL_WINDOW
    while True:
        start = max(0, size - window)
        # A concurrent truncation of a torn line may make this read short; whatever it
        # returns is still the file's content from ``start`` on.
        data = os.pread(fd, size - start, start)
        nl = data.rfind(b"\n")
        if nl < 0:
            if start == 0:
                return 0, 0, None
            window *= 4
            continue
        prev = data.rfind(b"\n", 0, nl)
        if prev < 0 and start > 0:
            window *= 4
            continue
        return start + prev + 1, start + nl + 1, data[prev + 1 : nl]


def _line_number(fd: int, offset: int) -> int:
    """The 1-based number of the line starting at ``offset`` (only on the error path)."""
    count, pos = 0, 0
    while pos < offset:
        chunk = os.pread(fd, min(1 << 20, offset - pos), pos)
        if not chunk:
            break
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count + 1


def _write_new(path: str | os.PathLike[str], data: bytes) -> None:
    """Create ``path`` (``FileExistsError`` if it exists), write ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_line(state: RunState, records: Sequence[Record]) -> bytes:
    # Built by hand around the kernel's state encoding so the stored state is exactly the
    # bytes ``kernel.codec`` digests; equal to encoding a ``_Line``.
    envelopes = _encoder.encode([r.envelope() for r in records])
    return b'{"records":%s,"state":%s}\n' % (envelopes, encode_state(state))


def _decode_line(
    data: bytes, path: str, line: Callable[[], int], run_id: str | None
) -> tuple[RunState, list[Record]]:
    """Decode and check one complete line; ``CorruptStore`` at ``path:line()`` otherwise."""
    try:
        decoded = _line_decoder.decode(data)
        records = [from_envelope(env) for env in decoded.records]
    except ValueError as exc:  # msgspec's DecodeError and ValidationError are ValueErrors
        raise CorruptStore(path, line(), f"undecodable commit: {exc}") from None
    state = decoded.state
    owner = state.run_id if run_id is None else run_id
    if state.run_id != owner or any(r.run_id != owner for r in records):
        raise CorruptStore(path, line(), f"commit of another run in the file of {owner!r}")
    if records and [r.seq for r in records] != list(
        range(state.seq - len(records) + 1, state.seq + 1)
    ):
        raise CorruptStore(
            path, line(), f"record seqs {[r.seq for r in records]} do not end at state.seq "
            f"{state.seq}"
        )
    return state, records


class JsonlStore:
    """A store in a directory of JSONL files; see the module docstring for the guarantees.

    ``durability`` is ``"sync"``, ``"batch"`` (group commit every ``batch_commits`` commits or
    ``batch_ms`` milliseconds) or ``"none"``.  ``log_id`` names a new store's ledger (random
    when omitted) and must match an existing store's.  ``max_open`` bounds the cached append
    fds.  ``syncfs=False`` makes a group commit fsync each file instead of one ``syncfs`` of the
    file system (for a store on a file system that other heavy writers share).  ``spares``:
    how many empty run files a background thread keeps made ahead in ``spare/`` (a new run's
    file is then a ``link(2)`` of one; see ``stores.spares``); 0 creates each file inline.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "batch",
        batch_commits: int = 64,
        batch_ms: float = 10,
        log_id: str | None = None,
        max_open: int = 256,
        syncfs: bool = True,
        spares: int = 32,
    ) -> None:
        if durability not in DURABILITIES:
            raise StoreError(
                f"unknown durability {durability!r}: use one of {', '.join(DURABILITIES)}"
            )
        if batch_commits < 1 or batch_ms < 0 or max_open < 1 or spares < 0:
            raise StoreError(
                f"batch_commits ({batch_commits}) and max_open ({max_open}) must be at least "
                f"1, batch_ms ({batch_ms}) and spares ({spares}) at least 0"
            )
        self.path = Path(path)
        self.durability: Durability = durability
        self._sync = durability == "sync"
        self._batch = durability == "batch"
        self._batch_commits = batch_commits
        self._batch_s = batch_ms / 1000
        self._max_open = max_open
        # Started by the first new run, not here: read-only users never make spares.
        self._spares = SparePool(str(self.path / "spare"), spares) if spares else None
        self._syncfs = _SYNCFS if syncfs else None
        self._runs_dir = str(self.path / "runs")
        self._leases_dir = str(self.path / "leases")
        for sub in ("runs", "locks", "leases"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self.log_id = self._open_log(log_id)

        # Global state of this instance, guarded by ``_lock`` (never held while waiting for a
        # run's lock or doing a slow syscall, so a slow fsync never blocks other runs).
        self._lock = threading.RLock()
        self._runs: OrderedDict[str, _Run] = OrderedDict()  # LRU; the open fds live here
        self._snaps: dict[str, _Snap] = {}  # file name -> last seen; the commit cache and index
        self._dirty: dict[str, str] = {}  # run id -> path of files written since the last fsync
        self._dir_dirty = False
        self._pending = 0
        self._first_pending = 0.0
        self._closed = False
        self._error: Exception | None = None  # a failed background fsync, raised at next call
        # Flushes are serialized so that ``flush()`` returns only after every commit that
        # returned before it is on disk, even when the flusher thread started the fsync.
        self._sync_lock = threading.Lock()
        self._wake = threading.Event()  # set: commits are pending
        self._due = threading.Event()  # set: a batch is full or its window has passed
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

        # The store-wide index (see "Global order" in the module docstring).
        self._index_path = str(self.path / INDEX_FILE)
        self._index_fd: int | None = None
        self._indexed: dict[str, int] = {}  # file name -> last seq known to be in the index
        self._scan_offset = 0  # bytes of index.jsonl read into ``_indexed``
        self._scan_lock = threading.Lock()
        self._cp_lock = threading.Lock()  # this process's checkpoint writers, in turn
        self._cp_flock: filelock.FileLock | None = None  # every process's, in turn
        self._cp_offset = 0  # bytes of index.jsonl folded into ``_frontier``
        self._frontier = Frontier()
        self._cp_last: tuple[int, str] | None = None  # the last stored checkpoint seen
        self._index_error: StoreError | None = None  # an index line a lock release lost
        # batch mode: a run's index line waits until the group commit has made its records
        # durable (see "Global order"); run id -> the run whose ``leaves`` wait.
        self._defer = self._batch
        self._unindexed: dict[str, _Run] = {}
        # Held by the flusher while it holds run locks to list their leaves: a ``claim`` or
        # ``take`` that finds a run locked retries it under this lock, so this store's own
        # flusher never makes it skip a run (only a real writer does).
        self._index_lock = threading.Lock()
        # Created with the store, so that a store's ledger always has its global order: a
        # verifier that finds no index.jsonl can then tell it was removed.
        self._index()
        self.repaired: list[tuple[str, int, int]] = []
        """``(run_id, first seq, last seq)`` of every index repair this instance made."""
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"JsonlStore({str(self.path)!r}, durability={self.durability!r})"

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- opening -----------------------------------------------------------------------

    def _open_log(self, wanted: str | None) -> str:
        """Read ``log.json``, creating it first if absent; two racing creators agree."""
        target = self.path / "log.json"
        if not target.exists():
            tmp = self.path / f".log.json.{os.getpid()}.{uuid.uuid4().hex}.tmp"
            data = _encoder.encode(_LogFile(log_id=wanted or f"jsonl-{uuid.uuid4().hex}"))
            _write_new(tmp, data + b"\n")
            try:
                # link() fails if the name exists, so the first creator wins and every
                # process then reads the same complete file (never a half-written one).
                os.link(tmp, target)
            except FileExistsError:
                pass
            except OSError:
                # No hard links here (some network or FUSE file systems): an exclusive
                # create still lets one creator win; its single small write is all or nothing
                # in practice.
                with suppress(FileExistsError):
                    _write_new(target, data + b"\n")
            finally:
                tmp.unlink()
            self._fsync_dir(str(self.path))
        try:
            found = _log_decoder.decode(target.read_bytes()).log_id
        except ValueError as exc:
            raise CorruptStore(str(target), 1, f"undecodable log file: {exc}") from None
        if wanted is not None and wanted != found:
            raise StoreError(f"{self.path}: the store's log id is {found!r}, not {wanted!r}")
        return found

    # --- per-run machinery ---------------------------------------------------------------

    def _checkout(self, run_id: str) -> _Run:
        """The run's machinery, pinned (not evictable) until ``_checkin``."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                if self._closed:
                    raise StoreError(f"{self!r} is closed")
                run = self._runs[run_id] = _Run(run_id, file_name(run_id), self._runs_dir,
                                                self._leases_dir)
                run.users = 1  # pinned before evicting, or it could evict itself
                if len(self._runs) > self._max_open:
                    self._evict()
            else:
                self._runs.move_to_end(run_id)
                run.users += 1
            return run

    def _checkin(self, run: _Run) -> None:
        with self._lock:
            run.users -= 1

    def _evict(self) -> None:
        # Caller holds ``_lock``.  Pinned entries are skipped, so the bound is soft when more
        # than ``max_open`` runs are in use at once.  A dirty file closed here stays in
        # ``_dirty`` and is reopened by path to be fsynced.
        excess = len(self._runs) - self._max_open
        idle: builtins.list[_Run] = []
        for run in self._runs.values():  # oldest first
            if len(idle) >= excess:
                break
            if run.users == 0 and not run.leaves:  # waiting leaves keep their run object
                idle.append(run)
        for run in idle:
            del self._runs[run.run_id]
            if run.fd is not None:
                os.close(run.fd)
                run.fd = None

    def _open_or_create(self, path: str) -> int:
        """An append fd on ``path``, an empty file made first when there is none.

        Either way ``create`` tells a new file by its size under the lock.  A new file is a
        spare linked to ``path`` when one is ready (``stores.spares``: an inode allocated
        ahead of time, off this thread); else one ``O_CREAT`` open, which also opens a file
        that exists.  Until a run is new the pool is not started (a process that only drives
        existing runs never starts it); once it runs, a new file costs one ``link`` (the
        spare's fd is the run's), and a file that exists one failed ``link`` and its open."""
        pool = self._spares
        if pool is not None:
            if not pool.running:
                try:
                    return os.open(path, _APPEND_FLAGS)
                except FileNotFoundError:
                    pass  # a new run: start the pool (it has no spare ready yet)
            spare = pool.take()
            if spare is not None:
                spare_path, fd = spare
                try:
                    os.link(spare_path, path)  # never replaces: a taken name is FileExistsError
                except FileExistsError:
                    pool.put_back(spare)  # the run's file exists: open it below
                except FileNotFoundError:
                    os.close(fd)  # the spare was removed (a process took this one for dead)
                except OSError:
                    pool.put_back(spare)
                    pool.fail()  # no hard links here, say: create files inline from now on
                    self._spares = None
                else:
                    pool.used(spare_path)
                    return fd
        return os.open(path, _APPEND_FLAGS | os.O_CREAT, 0o644)

    def _open_run(self, run: _Run, *, create: bool) -> int:
        """The run's append fd, opening the file if needed; caller holds ``run.mutex``.

        ``create``: a missing file is created empty (a create that has not written yet, which
        readers ignore) so that it can be locked; otherwise a missing file is ``RunNotFound``.
        """
        if run.fd is None:
            if create:
                run.fd = self._open_or_create(run.path)
            else:
                try:
                    run.fd = os.open(run.path, _APPEND_FLAGS)
                except FileNotFoundError:
                    raise RunNotFound(run.run_id) from None
        return run.fd

    def _lock_run(
        self, run: _Run, *, blocking: bool = True, create: bool = False, own: bool = True
    ) -> bool:
        """Take the run's file lock unless this thread holds it; caller holds ``run.mutex``.

        The lock is ``flock(2)`` on the run file itself (see the module docstring).  Without
        ``blocking`` a run locked elsewhere returns False at once.  ``own=False`` (the
        flusher, listing leaves for a moment) leaves ``owner`` unset: ``owner`` names a thread
        that drives the run, which ``renew`` may answer for without waiting.
        """
        if run.depth == 0:
            fd = self._open_run(run, create=create)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if own:
                run.owner = threading.get_ident()
        run.depth += 1
        return True

    def _unlock_run(self, run: _Run) -> None:
        run.depth -= 1
        if run.depth == 0:
            if run.leaves:  # the index line of this lock's commits, before anyone else's
                if self._defer:
                    self._queue_leaves(run)  # batch mode: listed after the group commit
                else:
                    try:
                        self._flush_leaves(run)
                    except StoreError as exc:  # raised from flush() / checkpoint(); see there
                        self._keep_index_error(exc)
            # Once the file lock is released another process may append: distrust the cache.
            run.owner = None
            run.fresh = False
            if run.fd is not None:  # None only after close() (a drive ending meanwhile)
                fcntl.flock(run.fd, fcntl.LOCK_UN)

    @contextmanager
    def _locked(self, run_id: str, *, create: bool = False) -> Iterator[_Run]:
        run = self._checkout(run_id)
        me = threading.get_ident()
        try:
            with run.mutex:
                before = run.owner
                self._lock_run(run, create=create)
                if run.owner is None:
                    # The file lock is this process's already: another thread's drive is
                    # ``unheld`` (in a handler).  This section drives the run meanwhile, so it
                    # is the owner: its commits take the fast path, and its own ``unheld``
                    # lets the mutex go.
                    run.owner = me
                try:
                    yield run
                finally:
                    self._unlock_run(run)
                    if run.depth and run.owner == me and before != me:
                        # Leaving while a paused drive keeps the file lock: no owner until a
                        # thread takes the mutex again (a nested section of ours keeps it).
                        run.owner = None
                        run.fresh = False
        finally:
            self._checkin(run)

    # --- writing -------------------------------------------------------------------------

    def hold(self, run_id: str) -> AbstractContextManager[None]:
        """Hold the run's lock for a series of commits by this thread (re-entrant).

        Other processes cannot write the run meanwhile, and other threads of this process
        wait; ``commit`` inside the hold skips the file lock it would otherwise take.
        """
        return self._locked_none(run_id)

    @contextmanager
    def unheld(self, run_id: str) -> Iterator[None]:
        """Inside this thread's ``hold`` of ``run_id``: let the other threads of this process
        write the run while the block runs, keeping the run's file lock.

        The runtime wraps an effect's handler in it: a ``cancel`` from another thread lands
        during a slow ``call`` (the call's outcome then conflicts), while other processes
        still wait, and a worker's ``take`` still finds the run's dispatcher alive.  Outside
        a hold of this thread it does nothing."""
        run = self._runs.get(run_id)
        me = threading.get_ident()
        if run is None or run.owner != me:
            yield
            return
        # Our file lock stays (``depth`` keeps counting it), so the threads that write the
        # run meanwhile take only its mutex; the cache is distrusted on both sides.
        run.owner = None
        run.fresh = False
        run.mutex.release()
        try:
            yield
        finally:
            run.mutex.acquire()
            run.owner = me
            run.fresh = False

    @contextmanager
    def _locked_none(self, run_id: str) -> Iterator[None]:
        # create=True: the runtime holds a new run before creating it, and the lock lives on
        # the run file, so the (empty) file comes into being here.
        with self._locked(run_id, create=True):
            yield

    def create(self, state: RunState, records: Sequence[Record]) -> None:
        """Store a new run with its first records; ``RunExists`` if the id is taken."""
        check_append(state.run_id, -1, state, records)
        self._raise_error()
        line = _encode_line(state, records)
        # Under the run's lock, so that a crashed creator's empty file (no complete line) can
        # be taken over without racing a live creator that has not written its line yet: the
        # file's size is read only once the lock is ours.
        with self._locked(state.run_id, create=True) as run:
            fd = run.fd
            assert fd is not None  # opened (or created) to be locked
            size = os.fstat(fd).st_size
            if size == 0:
                snap = _Snap(0, 0, None)
            else:
                snap = self._snap_from(fd, size, run.path, run.name, run.run_id)
                if snap.state is not None:
                    raise RunExists(state.run_id)
            # An empty file is (almost always) one this create's hold just made: its directory
            # entry needs an fsync in sync mode.  For a crashed creator's empty file that
            # fsync is merely redundant.
            self._append(run, fd, snap, line, records, state, new_file=size == 0)

    def commit(
        self, run_id: str, expected_seq: int, state: RunState, records: Sequence[Record]
    ) -> None:
        """Append records and replace the state if the run is at ``expected_seq``.

        ``ConflictError`` (nothing written) when another writer got there first,
        ``RunNotFound`` when there is no such run.
        """
        check_append(run_id, expected_seq, state, records)
        self._raise_error()
        line = _encode_line(state, records)  # outside every lock: pure CPU work
        run = self._runs.get(run_id)
        if run is not None and run.owner == threading.get_ident():
            # Inside this thread's ``hold``: the run is pinned, its mutex and file lock are
            # ours, so none of them is taken again (the runtime commits every node this way).
            self._commit_locked(run, expected_seq, line, records, state)
            return
        run = self._checkout(run_id)
        try:
            with run.mutex:
                self._lock_run(run)  # RunNotFound when there is no file: nothing is created
                try:
                    self._commit_locked(run, expected_seq, line, records, state)
                finally:
                    self._unlock_run(run)
        finally:
            self._checkin(run)

    def _commit_locked(
        self, run: _Run, expected_seq: int, line: bytes, records: Sequence[Record],
        state: RunState,
    ) -> None:
        """Check the seq and append; the caller holds the run's mutex and file lock."""
        fd = run.fd
        assert fd is not None  # locking opened it
        snap = self._snaps.get(run.name) if run.fresh else None
        if snap is None:
            # One fstat tells whether another process committed since we last looked (see
            # _Snap.still); only then is the last line read again.
            size = os.fstat(fd).st_size
            snap = self._snaps.get(run.name)
            if snap is None or not snap.still(size):
                snap = self._snap_from(fd, size, run.path, run.name, run.run_id)
            known = (run.leaf_seq + len(run.leaves) - 1 if run.leaves
                     else self._indexed.get(run.name))
            if snap.state is not None and known != snap.state.seq:
                # Not this process's own last write: make sure the index lists the run's
                # records so far before listing ours after them (a writer that died between
                # its two writes left its last commit unindexed).  Our own leaves still
                # waiting for the group commit count as listed: they will be, in order.
                self._ensure_indexed(run, snap.state.seq)
        if snap.state is None:
            raise RunNotFound(run.run_id)
        if snap.state.seq != expected_seq:
            raise ConflictError(run.run_id, expected_seq, snap.state.seq)
        self._append(run, fd, snap, line, records, state, new_file=False)

    def _append(
        self, run: _Run, fd: int, snap: _Snap, line: bytes, records: Sequence[Record],
        state: RunState, *, new_file: bool,
    ) -> None:
        """Write one commit line and queue its records for the index; caller holds the run's
        lock and has checked the seq."""
        if snap.clean != snap.size:
            # A torn line from a crashed writer: cut it off, or our line would extend it.
            os.ftruncate(fd, snap.clean)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise StoreError(
                    f"{run.path}: short write ({written} of {len(line)} bytes); "
                    "the commit was not stored"
                )
        except (OSError, StoreError):
            # Leave no partial line behind (best effort: the next writer would cut it anyway).
            self._snaps.pop(run.name, None)
            run.fresh = False
            with suppress(OSError):
                os.ftruncate(fd, snap.clean)
            raise
        if self._sync:
            os.fsync(fd)
            if new_file:
                self._fsync_dir(self._runs_dir)
        # We hold the lock, so nobody else appended: the file now ends with our line.
        size = snap.clean + written
        self._snaps[run.name] = _Snap(size, size, state)
        run.fresh = True
        if not self._sync:
            # Before the leaves are queued: a flush that sees a leaf has the file to sync.
            self._mark_dirty(run, new_file)
        if records:
            # Listed in the index after the run line and still under the run's lock, so the
            # index lists a record only once it is stored, and a run's records in seq order.
            # Consecutive commits of a run that keeps running share one index line, written
            # when the run stops running (it waits, dispatches an effect, or ends) or when
            # the lock is released - whichever comes first.
            if not run.leaves:
                run.leaf_seq = records[0].seq
            run.leaves.extend([r.hash for r in records])
            if state.status is not Status.RUNNING:
                if self._defer:
                    self._queue_leaves(run)  # a flush within this drive may list them
                else:
                    self._flush_leaves(run)


    # --- the store-wide index and checkpoints ---------------------------------------------

    def _index(self) -> int:
        """The shared ``O_APPEND`` fd of ``index.jsonl`` (opened, or created, on first use)."""
        fd = self._index_fd
        if fd is None:
            with self._lock:
                if self._index_fd is None:
                    self._index_fd = os.open(
                        self._index_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                        0o644,
                    )
                fd = self._index_fd
        return fd

    def _write_index(self, data: bytes, *, mark: bool = True) -> None:
        """Append whole lines to the index: one ``write`` on an ``O_APPEND`` fd, so lines of
        concurrent writers (threads or processes) never interleave within a line.  ``mark``:
        record the index as written since the last flush (a commit does that in
        ``_mark_dirty`` instead, under the lock it takes anyway)."""
        fd = self._index()
        try:
            with self._scan_lock:
                written = os.write(fd, data)
                # Our own lines need no reading back (every caller notes what they list in
                # ``_indexed``): when they follow what was scanned, the scan skips them, and
                # the next one costs one fstat unless another process wrote meanwhile.  The
                # fd's offset is the end of our write (O_APPEND), read under the lock that
                # every write of this process takes.
                if written == len(data):
                    end = os.lseek(fd, 0, os.SEEK_CUR)
                    if end - written == self._scan_offset:
                        self._scan_offset = end
        except OSError as exc:
            raise StoreError(
                f"{self._index_path}: the commit is stored but its index line could not be "
                f"written ({exc}); recover() adds it"
            ) from exc
        if written != len(data):
            raise StoreError(
                f"{self._index_path}: short write ({written} of {len(data)} bytes); the "
                "commit is stored but not indexed; recover() repairs the index"
            )
        if self._sync:
            os.fsync(fd)
        elif mark:
            with self._lock:
                self._dirty[_INDEX_KEY] = self._index_path

    def _read_index(self, offset: int) -> tuple[bytes, int]:
        """The complete lines of the index from ``offset`` on, and the offset after them."""
        fd = self._index()
        size = os.fstat(fd).st_size
        if size <= offset:
            return b"", offset
        data = os.pread(fd, size - offset, offset)
        end = data.rfind(b"\n") + 1  # a line still being written (or torn) waits
        return data[:end], offset + end

    def _scan_index(self) -> None:
        """Bring ``_indexed`` up to date with the index lines written since the last scan."""
        # Under the lock that every update of ``_indexed`` takes: the values only grow, and
        # an interleaved read-compare-write of two threads could otherwise lower one, which
        # would make a later check list records a second time.
        with self._scan_lock:
            start = self._scan_offset
            data, self._scan_offset = self._read_index(start)
            indexed = self._indexed
            for number, raw in enumerate(data.split(b"\n")[:-1]):
                if raw.startswith(b'{"checkpoint"'):
                    continue
                try:
                    leaf = _leaf_decoder.decode(raw)
                except ValueError as exc:
                    self._scan_offset = start  # nothing of this read counts
                    raise CorruptStore(
                        self._index_path, None,
                        f"undecodable index line (line {number + 1} after byte {start}): {exc}",
                    ) from None
                name = file_name(leaf.run_id)
                last = leaf.seq + len(leaf.hashes) - 1
                if indexed.get(name, -1) < last:
                    indexed[name] = last

    def _mark_indexed(self, name: str, last: int) -> None:
        """Note that the index lists the run's records up to ``last`` (values only grow)."""
        with self._scan_lock:
            if self._indexed.get(name, -1) < last:
                self._indexed[name] = last

    def _queue_leaves(self, run: _Run) -> None:
        """Batch mode: the run's leaves wait for the group commit that makes them durable
        (``_index_waiting``); caller holds the run's lock."""
        with self._lock:
            self._unindexed[run.run_id] = run
            if self._pending == 0:  # no flush is due (it ran since this run's commits)
                self._schedule()
                self._pending += 1

    def _flush_leaves(self, run: _Run) -> None:
        """Write the run's queued record hashes as one index line; caller holds its lock.

        On failure the hashes are dropped and ``_indexed`` is not advanced, so the run's
        next writer (or ``repair_index``) lists them from the run file."""
        hashes, run.leaves = run.leaves, []
        self._write_index(leaf_line(run.run_id, run.leaf_seq, hashes))
        self._mark_indexed(run.name, run.leaf_seq + len(hashes) - 1)

    def _ensure_indexed(self, run: _Run, seq: int) -> None:
        """Append to the index the run's records up to ``seq`` that it lacks; the caller holds
        the run's lock (so no writer of this run is between its two writes).

        Our own waiting leaves are dropped and listed from the run file with the rest; in
        ``batch`` mode the run file is fsynced first, so that the index lists only durable
        records (the lines may be another process's, written moments ago)."""
        if run.leaves:
            if not self._defer:
                self._flush_leaves(run)
            else:
                run.leaves = []  # listed from the run file below, with the rest
        if self._indexed.get(run.name, -1) >= seq:
            return
        self._scan_index()
        known = self._indexed.get(run.name, -1)
        if known >= seq:
            return
        missing: list[bytes] = []
        for records in self._lines_of(run):
            # Up to ``seq`` only: later lines are a drive's commits whose leaves still wait
            # (the flusher's gaps); listing them here too would list them twice.
            fresh = [r for r in records if known < r.seq <= seq]
            if fresh:
                missing.append(leaf_line(run.run_id, fresh[0].seq, [r.hash for r in fresh]))
            if records and records[-1].seq >= seq:
                break
        if missing:
            if self._defer:
                assert run.fd is not None  # locked, so open
                os.fsync(run.fd)
                if known == -1:  # perhaps a new file of another writer: its name too
                    self._fsync_dir(self._runs_dir)
            self._write_index(b"".join(missing))
            self._log_repair(run.run_id, known, seq)
        self._mark_indexed(run.name, seq)

    def _log_repair(self, run_id: str, known: int, seq: int) -> None:
        # A hook point for tests and logs: the store has no logger of its own.
        self.repaired.append((run_id, known + 1, seq))

    def _lines_of(self, run: _Run) -> Iterator[list[Record]]:
        """The records of each complete line of a run file, in order."""
        with open(run.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    return
                _, records = _decode_line(raw[:-1], run.path, partial(int, number), run.run_id)
                yield records

    def repair_index(self) -> int:
        """List in the index every stored record it lacks; returns how many runs needed it.

        A writer that dies between a commit's run line and its index line (or a power loss
        that keeps one and not the other) leaves records the index does not list; a later
        commit to the run repairs its own run, and ``Runtime.recover()`` calls this for all
        of them (finished runs are never written again).  Each run is checked under its lock.
        """
        self._scan_index()
        repaired = 0
        for state in self._refresh():
            name = file_name(state.run_id)
            if self._indexed.get(name, -1) >= state.seq:
                continue
            with self._locked(state.run_id) as run:
                current = self._current(run.name, run.run_id)
                if current is not None and self._indexed.get(name, -1) < current.seq:
                    self._ensure_indexed(run, current.seq)
                    repaired += 1
        return repaired

    def checkpoint(self, signer: Signer) -> str:
        """Sign a checkpoint of every record the index lists, append it, and return the note.

        Checkpoint writers of all processes take turns (a ``filelock`` on
        ``locks/index.lock``), so stored checkpoints never go backwards.  Under it the index
        is read up to its last complete line, the records it lists are made durable (with
        ``syncfs`` this covers other processes' writes too), and only then is the note
        signed and appended.  Each call hashes only the leaves since the previous one.  When
        no record was indexed since the last stored checkpoint, that one is returned.
        """
        # Write the index lines still waiting for a group commit, so that the checkpoint
        # covers every record committed before this call.
        self.flush()
        with self._cp_lock:
            if self._cp_flock is None:
                self._cp_flock = filelock.FileLock(
                    str(self.path / "locks" / "index.lock"), preserve_lock_file=True
                )
            with self._cp_flock:
                data, self._cp_offset = self._read_index(self._cp_offset)
                self._fold(data)
                size = self._frontier.size
                if self._cp_last is not None and self._cp_last[0] == size:
                    return self._cp_last[1]
                self.flush()
                note = sign_frontier(self.log_id, self._frontier, signer)
                self._write_index(_encoder.encode(CheckpointLine(note)) + b"\n")
                self._cp_last = (size, note)
                return note

    def _fold(self, data: bytes) -> None:
        """Add the leaves of these index lines to the frontier; note stored checkpoints."""
        leaves: list[bytes] = []
        for raw in data.split(b"\n")[:-1]:
            if raw.startswith(b'{"checkpoint"'):
                note = _checkpoint_line_decoder.decode(raw).checkpoint
                self._frontier.extend(leaves)
                leaves = []
                self._cp_last = (parse_checkpoint(note)[0].size, note)
                continue
            leaves.extend(bytes.fromhex(h) for h in _leaf_decoder.decode(raw).hashes)
        self._frontier.extend(leaves)

    def checkpoints(self) -> builtins.list[str]:
        """Every checkpoint note stored in the index, in the order written."""
        try:
            data = Path(self._index_path).read_bytes()
        except FileNotFoundError:
            return []
        return [
            _checkpoint_line_decoder.decode(raw).checkpoint
            for raw in data.split(b"\n")[:-1]
            if raw.startswith(b'{"checkpoint"')
        ]

    # --- durability ------------------------------------------------------------------------

    def _mark_dirty(self, run: _Run, new_file: bool) -> None:
        with self._lock:
            self._dirty[run.run_id] = run.path
            if new_file:
                self._dir_dirty = True
            if not self._batch:
                return  # "none": tracked only so that an explicit flush() covers it
            if self._pending == 0:
                self._schedule()
            self._pending += 1
            # A full batch is due now: hand the fsync to the flusher, which runs it without
            # the GIL while commits go on (an inline fsync here cost ~18 us per commit on
            # average); a batch that does not fill up is due when the flusher's own wait for
            # ``batch_ms`` ends.  Only a flusher that falls far behind makes the committer
            # wait (backpressure).
            backlog = self._pending >= self._batch_commits * _BACKLOG
            if self._pending == self._batch_commits:
                self._due.set()
        if backlog:
            self._flush()

    def _schedule(self) -> None:
        """Start the batch window (caller holds ``_lock``; nothing was pending)."""
        self._first_pending = time.monotonic()
        self._wake.set()
        if self._flusher is None and not self._closed:
            self._flusher = threading.Thread(
                target=self._flush_loop, name=f"wakepoint-flusher:{self.path}", daemon=True,
            )
            self._flusher.start()

    def _flush_loop(self) -> None:
        # Wakes when a first commit becomes pending, sleeps out the rest of the batch window
        # (or less, when a commit finds the batch full), then fsyncs whatever is pending.
        # An idle store's thread sleeps on an event and costs nothing.
        # ``_stop`` is checked at the top of every pass: ``_flush`` clears ``_wake``, so a
        # ``close()`` that set both while a flush was running must not be waited out.
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            delay = self._first_pending + self._batch_s - time.monotonic()
            if delay > 0:
                self._due.wait(delay)
                if self._stop.is_set():
                    return
            try:
                self._flush()
            except Exception as exc:  # kept for the next caller; the thread must live on
                with self._lock:
                    self._error = exc

    def _flush(self) -> bool:
        """Make every file written since the last flush durable (and ``runs/`` if it gained
        files), then write the index lines that waited for it; whether any was written.

        One ``syncfs`` for the whole batch when it covers at least ``_SYNCFS_MIN`` files and
        the platform has it, else one ``fsync`` per file (see the module docstring).
        """
        with self._sync_lock:
            with self._lock:
                # dup() the cached fds so that an eviction closing them meanwhile cannot make
                # us fsync a closed (or reused) descriptor; evicted files reopen by path.
                todo: list[tuple[int | None, str]] = []
                for run_id, path in self._dirty.items():
                    run = self._runs.get(run_id)
                    fd = run.fd if run is not None else None
                    todo.append((None if fd is None else os.dup(fd), path))
                dirty, self._dirty = self._dirty, {}
                dir_dirty, self._dir_dirty = self._dir_dirty, False
                self._pending = 0
                self._wake.clear()
                self._due.clear()
                # The waiting leaves seen now are durable once this sync returns: a leaf is
                # queued only after its file was marked dirty (``_append``), under this lock.
                # A run whose leaves were listed meanwhile (``_ensure_indexed``) may have been
                # evicted: pinning that object would reopen a file no one closes again.
                waiting = [(run, run.leaf_seq, len(run.leaves))
                           for run in self._unindexed.values()
                           if run.leaves and self._runs.get(run.run_id) is run]
                self._unindexed = {}
                for run, _, _ in waiting:
                    run.users += 1  # pinned: an eviction must not close the fd we lock by
            if todo or dir_dirty:
                try:
                    self._sync_files(todo, dir_dirty)
                except OSError as exc:
                    self._sync_failed(dirty, dir_dirty, waiting)
                    raise StoreError(
                        f"{self.path}: a group commit's fsync failed ({exc}); its records are "
                        "not listed in the index until a later sync of their files succeeds"
                    ) from exc
            with self._index_lock:
                return self._index_waiting(waiting)

    def _sync_failed(
        self, dirty: dict[str, str], dir_dirty: bool, waiting: list[tuple[_Run, int, int]]
    ) -> None:
        """Put back what a failed sync was to cover: the files stay dirty (the next flush
        syncs them again) and their leaves wait for it, unpinned.  Linux may report a failed
        writeback only once, so a later fsync's success proves less than it seems; the
        failure itself reaches the caller (``flush()``, or the next call after a background
        flush)."""
        with self._lock:
            for run_id, path in dirty.items():
                self._dirty.setdefault(run_id, path)
            self._dir_dirty = self._dir_dirty or dir_dirty
            for run, _, _ in waiting:
                run.users -= 1
                self._unindexed.setdefault(run.run_id, run)

    def _sync_files(self, todo: list[tuple[int | None, str]], dir_dirty: bool) -> None:
        if self._syncfs is not None and len(todo) >= _SYNCFS_MIN:
            for fd, _ in todo:
                if fd is not None:
                    os.close(fd)
            self._syncfs_store()
            return
        try:
            for index, (dup, path) in enumerate(todo):
                fd = dup
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue
                    todo[index] = (fd, path)
                os.fsync(fd)
        finally:
            for fd, _ in todo:
                if fd is not None:
                    os.close(fd)
        if dir_dirty:
            self._fsync_dir(self._runs_dir)

    def _index_waiting(self, waiting: list[tuple[_Run, int, int]]) -> bool:
        """List the leaves made durable by the sync just done; whether a line was written.

        Each run's lock is taken without waiting - a run that a thread of this process
        drives, or another process holds, is left for the next flush (its drive queues it
        again; another process's writer lists the records itself, as it does for any
        unindexed commit).  With all the locks held the index is read once, for lines
        another process wrote for these runs meanwhile, and the rest is one write."""
        taken: list[tuple[_Run, int]] = []
        retry: list[_Run] = []
        wrote = False
        try:
            for run, first, count in waiting:
                if not run.mutex.acquire(blocking=False):
                    retry.append(run)
                    continue
                # Fewer leaves, or others: listed from the run file meanwhile (_ensure_indexed).
                if run.leaf_seq != first or len(run.leaves) < count:
                    run.mutex.release()
                    continue
                if not self._lock_run(run, blocking=False, own=False):
                    run.mutex.release()
                    retry.append(run)
                    continue
                taken.append((run, count))
            if taken:
                wrote = self._list_waiting(taken)
        except (OSError, WakepointError) as exc:
            # Not listed: the next flush, the run's next writer or repair_index() lists
            # them; the failure is raised by the next flush() or close().
            self._keep_index_error(StoreError(
                f"{self._index_path}: stored records could not be listed ({exc}); "
                "recover() adds them"
            ))
        finally:
            for run, _ in taken:
                self._unlock_run(run)  # queues what is left (a drive's newer leaves)
                run.mutex.release()
            with self._lock:
                for run in retry:
                    self._unindexed.setdefault(run.run_id, run)
                if retry and self._pending == 0:
                    # Held by another process: try again after a batch window, even if this
                    # process commits nothing more (an idle store's lines must still come).
                    self._schedule()
                    self._pending += 1
                for run, _, _ in waiting:
                    run.users -= 1
                if waiting and len(self._runs) > self._max_open:
                    self._evict()  # the fds kept open only for their waiting leaves
        return wrote

    def _list_waiting(self, taken: list[tuple[_Run, int]]) -> bool:
        """Write the index lines of each run's first ``count`` leaves (durable now); the
        caller holds every run's lock.  Whether anything was written."""
        self._scan_index()  # what other processes listed for these runs before we locked
        lines: list[bytes] = []
        listed: list[tuple[_Run, int]] = []
        gaps: list[tuple[_Run, int]] = []
        for run, count in taken:
            first, last = run.leaf_seq, run.leaf_seq + count - 1
            known = self._indexed.get(run.name, -1)
            if known >= last:  # another process took the run over and listed them
                listed.append((run, count))
            elif known == first - 1:
                lines.append(leaf_line(run.run_id, first, run.leaves[:count]))
                listed.append((run, count))
            else:  # listed in part, or records before them missing: from the run file
                gaps.append((run, count))
        if lines:
            self._write_index(b"".join(lines))
        for run, count in listed:
            self._mark_indexed(run.name, run.leaf_seq + count - 1)
            run.leaves = run.leaves[count:]
            run.leaf_seq += count
        for run, count in gaps:
            last = run.leaf_seq + count - 1
            rest, rest_seq, run.leaves = run.leaves[count:], last + 1, []
            self._ensure_indexed(run, last)  # fsyncs the run file first
            run.leaves, run.leaf_seq = rest, rest_seq  # a drive's newer leaves still wait
        return bool(lines or gaps)

    def _syncfs_store(self) -> None:
        """One ``syncfs`` of the store's file system: every dirty file and directory entry."""
        assert self._syncfs is not None
        fd = os.open(self._runs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._syncfs(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _fsync_dir(path: str) -> None:
        # A new file's directory entry is only durable once its directory is fsynced.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _raise_error(self) -> None:
        if self._error is not None:
            with self._lock:
                error, self._error = self._error, None
            if error is not None:
                raise StoreError(f"{self.path}: a background fsync failed: {error}") from error

    def flush(self) -> None:
        """Make every returned commit durable now, whatever the durability mode.

        Also raises (once) a ``StoreError`` for an index line that could not be written when
        a run's lock was released: those records are stored, and the run's next writer or
        ``repair_index()`` lists them."""
        self._raise_error()
        if self._flush():
            self._flush()  # the index lines just written, durable too
        self._raise_index_error()

    def _keep_index_error(self, error: StoreError) -> None:
        with self._lock:  # the first one is kept: it names the earliest records left out
            if self._index_error is None:
                self._index_error = error

    def _raise_index_error(self) -> None:
        with self._lock:
            error, self._index_error = self._index_error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Stop the flusher, flush (``sync``/``batch``) and close every fd; idempotent.

        With ``durability="none"`` nothing is fsynced; call ``flush()`` first to change that.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            flusher = self._flusher
        self._stop.set()
        self._wake.set()
        self._due.set()
        if flusher is not None:
            flusher.join()
        if self._spares is not None:
            self._spares.close()
        try:
            if self.durability != "none" and self._flush():
                self._flush()
            self._raise_error()
            self._raise_index_error()
        finally:
            with self._lock:
                for run in self._runs.values():
                    if run.fd is not None:
                        os.close(run.fd)
                        run.fd = None
                self._runs.clear()
                if self._index_fd is not None:
                    os.close(self._index_fd)
                    self._index_fd = None

    # --- reading -------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self._runs_dir, name + _SUFFIX)

    def _snap_from(
        self, fd: int, size: int, path: str, name: str, run_id: str | None
    ) -> _Snap:
        """Read the last complete line of an open run file of ``size`` bytes; cache it."""
        start, clean, data = _tail(fd, size)
        state: RunState | None = None
        if data is not None:
            state, _ = _decode_line(data, path, lambda: _line_number(fd, start), run_id)
            if run_id is None and file_name(state.run_id) != name:
                raise CorruptStore(
                    path, _line_number(fd, start), f"state of run {state.run_id!r} in the "
                    "file of another run"
                )
        snap = _Snap(size, clean, state)
        self._snaps[name] = snap
        return snap

    def _read_snap(self, path: str, name: str, run_id: str | None) -> _Snap | None:
        """``_snap_from`` on a fresh read-only fd; None if the file is gone."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return self._snap_from(fd, os.fstat(fd).st_size, path, name, run_id)
        finally:
            os.close(fd)

    def _current(self, name: str, run_id: str | None) -> RunState | None:
        """The run's latest committed state, from the cache when the file is unchanged."""
        path = self._path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        snap = self._snaps.get(name)
        if snap is None or not snap.still(st.st_size):
            snap = self._read_snap(path, name, run_id)
        return None if snap is None else snap.state

    def load(self, run_id: str) -> RunState:
        """The run's last committed state (bounded read: the file's last complete line)."""
        state = self._current(file_name(run_id), run_id)
        if state is None:
            raise RunNotFound(run_id)
        return state

    def ledger(self, run_id: str) -> list[Record]:
        """The run's records in seq order; ``CorruptStore`` names the file and line."""
        path = self._path(file_name(run_id))
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below, after the check
        except FileNotFoundError:
            raise RunNotFound(run_id) from None
        records: list[Record] = []
        complete = False
        with f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break  # torn last line: a commit that never returned
                complete = True
                _, found = _decode_line(raw[:-1], path, partial(int, number), run_id)
                records.extend(found)
        if not complete:
            raise RunNotFound(run_id)
        return records

    def _refresh(self) -> list[RunState]:
        """Every run's latest state, re-reading only the last line of files that changed."""
        states: list[RunState] = []
        seen: set[str] = set()
        with os.scandir(self._runs_dir) as entries:
            for entry in entries:
                if not entry.name.endswith(_SUFFIX) or entry.name.startswith("."):
                    continue
                name = entry.name[: -len(_SUFFIX)]
                seen.add(name)
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                snap = self._snaps.get(name)
                if snap is None or not snap.still(st.st_size):
                    snap = self._read_snap(entry.path, name, run_id_of(name))
                if snap is not None and snap.state is not None:
                    states.append(snap.state)
        # Forget files that disappeared (removed by hand); list() copies the keys atomically,
        # since other threads add entries without taking ``_lock``.
        for name in [n for n in list(self._snaps) if n not in seen]:
            self._snaps.pop(name, None)
        return states

    def list(
        self,
        *,
        status: Status | None = None,
        workflow: str | None = None,
        wait_kind: str | None = None,
        due_before: datetime | None = None,
        parent: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[RunState]:
        """Runs matching every given filter, oldest first (by ``created_at``, then id)."""
        found = [
            s for s in self._refresh()
            if matches(s, status=status, workflow=workflow, wait_kind=wait_kind,
                       due_before=due_before, parent=parent)
        ]
        found.sort(key=_age)
        return found if limit is None else found[:max(limit, 0)]  # as SQL's LIMIT

    def find_waiting(self, key: str) -> builtins.list[RunState]:
        """WAITING runs whose wait key is ``key``, by run id."""
        found = [
            s for s in self._refresh()
            if s.status is Status.WAITING and s.wait is not None and s.wait.key == key
        ]
        found.sort(key=lambda s: s.run_id)
        return found

    # --- leases --------------------------------------------------------------------------

    @contextmanager
    def _try_locked(self, run_id: str) -> Iterator[_Run | None]:
        """The run, locked - or None at once when another thread or process holds it (or
        its file is gone): the ``SKIP LOCKED`` of ``claim`` and ``take``."""
        run = self._checkout(run_id)
        try:
            locked = self._try_lock(run)
            if not locked and self._batch:
                # Perhaps only this store's flusher held it, listing its leaves: try again
                # once that pass is over, before the next can begin (the flusher never waits
                # for a run while it holds the index lock, so this cannot deadlock).
                with self._index_lock:
                    locked = self._try_lock(run)
            if not locked:
                yield None
                return
            try:
                yield run
            finally:
                self._unlock_run(run)
                run.mutex.release()
        finally:
            self._checkin(run)

    def _try_lock(self, run: _Run) -> bool:
        """Take the run's mutex and file lock without waiting; whether both were taken."""
        if not run.mutex.acquire(blocking=False):
            return False
        try:
            locked = self._lock_run(run, blocking=False)
        except RunNotFound:
            locked = False
        if not locked:
            run.mutex.release()
        return locked

    def _lease_if_free(
        self, run: _Run, worker: str, lease: timedelta, now: datetime
    ) -> bool:
        """Write ``worker``'s lease unless another worker holds an unexpired one; the caller
        holds the run's lock."""
        held = self._read_lease(run)
        if held is not None and held.worker != worker and held.expires > now:
            return False
        self._write_lease(run, _Lease(worker=worker, expires=now + lease))
        return True

    def claim(
        self, now: datetime, worker: str, lease: timedelta, limit: int
    ) -> builtins.list[RunState]:
        """Lease up to ``limit`` runs that need a worker now, oldest first.

        A run another thread or process is writing at this moment is skipped, not waited
        for (like ``SKIP LOCKED``); its state is re-read under the lock before it is leased.
        A run held only by this store's flusher is waited for (``_try_locked``); another
        process's flusher holding it makes it wait for the next claim round.
        """
        self._raise_error()
        candidates = [s for s in self._refresh() if needs_worker(s, now)]
        candidates.sort(key=_age)
        claimed: builtins.list[RunState] = []
        for candidate in candidates:
            if len(claimed) >= limit:
                break
            with self._try_locked(candidate.run_id) as run:
                if run is None:
                    continue
                state = self._current(run.name, run.run_id)
                if state is None or not needs_worker(state, now):
                    continue
                if self._lease_if_free(run, worker, lease, now):
                    claimed.append(state)
        return claimed

    def release(self, run_id: str, worker: str) -> None:
        """Give back ``worker``'s lease on ``run_id`` (no error if it holds none)."""
        try:
            with self._locked(run_id) as run:
                held = self._read_lease(run)
                if held is not None and held.worker == worker:
                    os.unlink(run.lease_path)
        except RunNotFound:
            return  # no such run: no lease to give back

    def renew(self, run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        """Extend ``worker``'s lease on ``run_id`` to ``now + lease``; False (nothing changed)
        unless ``worker`` holds it.  An expired lease nobody took over still counts: no one
        else can have driven the run meanwhile.

        Under the run's lock, so it cannot race a ``claim``.  A worker renews from another
        thread than the one driving the run; while that thread holds the run's file lock no
        other process can claim or write the run at all, so the lease needs no rewrite: the
        call answers from the lease file at once instead of waiting for the drive to end.
        """
        run = self._checkout(run_id)
        try:
            me = threading.get_ident()
            # Polled, not one blocking wait: a moment's holder (the flusher; a thread about
            # to take the file lock) is waited out, but a drive that gets the mutex first is
            # answered for at once instead of keeping the worker's loop for a whole drive.
            while not run.mutex.acquire(timeout=_RENEW_POLL):
                owner = run.owner
                if owner is not None and owner != me:
                    # Driven by another thread here, under the file lock: the lease file
                    # (replaced atomically, so readable without the lock) names the holder.
                    held = self._read_lease(run)
                    return held is not None and held.worker == worker
            try:
                self._lock_run(run)
                try:
                    held = self._read_lease(run)
                    if held is None or held.worker != worker:
                        return False
                    self._write_lease(run, _Lease(worker=worker, expires=now + lease))
                    return True
                finally:
                    self._unlock_run(run)
            finally:
                run.mutex.release()
        except RunNotFound:
            return False
        finally:
            self._checkin(run)

    def take(self, run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        """Lease ``run_id`` to ``worker`` until ``now + lease`` unless another worker holds an
        unexpired lease on it, whatever the run's state; whether it did.  Under the run's
        lock; a run another thread or process is writing right now is not waited for: it
        is refused, as a held lease would be (its writer is alive)."""
        with self._try_locked(run_id) as run:
            if run is None or self._current(run.name, run.run_id) is None:
                return False
            return self._lease_if_free(run, worker, lease, now)

    def _read_lease(self, run: _Run) -> _Lease | None:
        try:
            data = Path(run.lease_path).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _lease_decoder.decode(data)
        except ValueError as exc:
            raise CorruptStore(run.lease_path, None, f"undecodable lease: {exc}") from None

    def _write_lease(self, run: _Run, lease: _Lease) -> None:
        # Temp file + rename: a reader sees the old lease or the new one, never half of one.
        tmp = os.path.join(self.path, "leases", f".{run.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(_encoder.encode(lease))
        os.replace(tmp, run.lease_path)


def _age(state: RunState) -> tuple[datetime, str]:
    return (state.created_at, state.run_id)
