"""Empty files made ahead of need by a background thread, for stores that create a file per run.

Why: on ext4 a new file costs an inode allocation, and on this project's VM that costs from
~20 us to over 1 ms of kernel CPU depending on the state of the directory's block group
(measured with a bare ``os.open(O_CREAT)`` loop: 33 us in one directory and 820-1,090 us in
another of the same file system, minutes apart), while giving an existing inode a second
name with ``link(2)`` costs ~16 us and dropping the spare name ~6 us.  The JSONL store makes
one file per run, so a run's creation paid that price on the committing thread.  Here a
daemon thread allocates the inodes ahead of time (``os.open`` releases the GIL, so the kernel
work runs on another core) and the store links a spare to the run's name.

Safety, the points that matter:

* ``link(2)`` never replaces: a run file that exists (another process created it first) makes
  ``take``'s caller fall back to opening that file, and the spare stays in the pool.
* Spares live in their own directory (``spare/`` in the store), under names no run file can
  have, made of the owning process's pid, a random tag and a counter; a process only ever
  takes spares from its own in-memory list, so two processes (or a forked child, which drops
  its parent's list) never hand out one inode twice.
* A crashed process leaves its spares behind: each pool removes, when it starts, the spares
  of pids that are no longer alive, and those named with its own pid (a process restarted
  in a container often gets its predecessor's pid; the pool has made none yet).  A spare
  removed by mistake (pid namespaces differ between processes sharing the directory) only
  makes its owner's link fail with ``ENOENT``, and that run's file is then created inline.
  A spare name that a crash or power cut leaves after its file was linked to a run (the
  thread drops linked names a little later) is only a second name of that run's inode:
  removing it is harmless.
* When spares cannot be made (a full disk, a file system without hard links) the pool stops
  and the store creates files itself, as it did before.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import weakref
from collections import deque

_FIRST_TARGET = 4
_live_tags: set[str] = set()  # this process's pools' tags (another pool's spares are kept)
_pools: weakref.WeakSet[SparePool] = weakref.WeakSet()


def _after_fork() -> None:
    # A forked child must not keep its parent's spares open: one may already be, or become,
    # a run file of the parent, and the child's copy of the fd would share that file's flock
    # (a lock the parent dies holding would then outlive it).
    for pool in list(_pools):
        pool._drop_ready(unlink=False)
# A run file's append flags (the store's), plus the create: the spare's fd is the run's fd.
_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_CREAT | os.O_EXCL
Spare = tuple[str, int]
"""A spare's path and an fd open on it with a run file's append flags."""


class SparePool:
    """Up to ``size`` empty files in ``directory``, refilled by a daemon thread on demand."""

    def __init__(self, directory: str, size: int = 32, mode: int = 0o644) -> None:
        self.directory = directory
        self.size = size
        # How many to keep ready: a few at first, doubled each time the pool runs dry, so
        # that a process that makes one run does not make (and then remove) ``size`` files.
        self._target = min(size, _FIRST_TARGET)
        self.mode = mode
        self.broken = False
        """True once spares could not be made or linked: the caller creates files itself."""
        self._ready: deque[Spare] = deque()
        self._linked: deque[str] = deque()  # spare names to drop (linked to a run file)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = -1  # the process whose spares ``_ready`` holds; -1: none started yet
        self._tag = ""
        self._start_lock = threading.Lock()
        _pools.add(self)

    @property
    def running(self) -> bool:
        """Started in this process (by a first ``take``) and not given up."""
        return self._pid == os.getpid() and not self.broken

    def take(self) -> Spare | None:
        """A spare (its path and an append fd on it), or None when none is ready (the caller
        creates the file).

        The caller links the path to its final name and keeps the fd, then calls ``used``;
        or ``put_back`` when the link found the name taken, or closes the fd when the spare
        is gone."""
        if self.broken:
            return None
        fresh = self._pid != os.getpid()
        if fresh:
            with self._start_lock:  # two threads making a process's first runs at once
                fresh = self._pid != os.getpid()
                if fresh:
                    self._start()  # first use, or a forked child: not its parent's spares
        try:
            path = self._ready.popleft()
        except IndexError:
            path = None
            if not fresh:  # ran dry under load (a new pool is empty, by nature)
                self._target = min(self.size, self._target * 2)
        if len(self._ready) < self._target:
            self._wake.set()
        return path

    def used(self, path: str) -> None:
        """The spare is linked under its final name: its spare name is dropped later, by the
        thread (the caller's thread saves the ``unlink``)."""
        self._linked.append(path)
        self._wake.set()

    def put_back(self, spare: Spare) -> None:
        """Return a spare that was not linked."""
        self._ready.appendleft(spare)

    def fail(self) -> None:
        """Stop using spares (a link failed for another reason than a taken name)."""
        self.broken = True
        self.close()

    def close(self) -> None:
        """Stop the thread and remove the spares still ready; idempotent."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread is not (
            threading.current_thread()
        ):
            thread.join()
        if self._pid == os.getpid():
            self._unlink_all(self._linked)
            self._drop_ready(unlink=True)
            _live_tags.discard(self._tag)

    def _drop_ready(self, *, unlink: bool) -> None:
        while True:
            try:
                path, fd = self._ready.popleft()
            except IndexError:
                return
            with contextlib.suppress(OSError):
                os.close(fd)
            if unlink:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    @staticmethod
    def _unlink_all(paths: deque[str]) -> None:
        while True:
            try:
                path = paths.popleft()  # another thread may empty it too (close vs fail)
            except IndexError:
                return
            with contextlib.suppress(OSError):  # a leftover name is harmless (see above)
                os.unlink(path)

    def _start(self) -> None:
        # In a forked child ``_after_fork`` has closed the inherited fds already.
        self._pid = os.getpid()
        self._ready = deque()
        self._linked = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._wake.set()
        tag = f"{self._pid}-{os.urandom(4).hex()}-"
        _live_tags.add(tag)
        self._tag = tag
        self._thread = threading.Thread(target=self._fill, args=(tag,),
                                        name="wakepoint-spares", daemon=True)
        self._thread.start()

    def _fill(self, tag: str) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._remove_dead()
        except OSError:
            self.broken = True
            return
        counter = itertools.count()
        while True:
            self._wake.wait()
            self._wake.clear()
            self._unlink_all(self._linked)
            while len(self._ready) < self._target:
                if self._stop.is_set():
                    return
                path = os.path.join(self.directory, f"{tag}{next(counter)}")
                try:
                    fd = os.open(path, _FLAGS, self.mode)  # one call: kept open for the run
                except OSError:
                    self.broken = True  # a full disk, say: the store creates files itself
                    return
                self._ready.append((path, fd))
            if self._stop.is_set():
                return

    def _remove_dead(self) -> None:
        """Remove the spares of processes that are gone (a crash left them)."""
        with os.scandir(self.directory) as entries:
            names = [e.name for e in entries]
        own = os.getpid()
        alive: dict[int, bool] = {own: False}  # our pid's: a predecessor's, or another pool's
        for name in names:
            pid_text = name.split("-", 1)[0]
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == own and name[:name.rfind("-") + 1] in _live_tags:
                continue  # another pool of this process (a second store on the directory)
            if pid not in alive:
                alive[pid] = process_alive(pid)
            if not alive[pid]:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


os.register_at_fork(after_in_child=_after_fork)
