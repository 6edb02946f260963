"""``Worker``: keeps runs moving - claims what is due, drives it, sleeps until the next due time.

Theory of operation.  One loop thread and a pool of ``concurrency`` threads.  The loop asks the
store to ``claim`` up to as many runs as there are free threads (RUNNING runs, and WAITING runs
whose deadline has passed, that no other worker holds an unexpired lease on), hands each to a
pool thread, which calls ``Runtime.recover_run`` - a RUNNING run is driven on, a due timer,
event deadline or question timeout fires - and releases the lease when the run blocks or
finishes.  Then the loop arms the alarm (``scheduler.alarm``) for the earliest of: the next
deadline the store holds within ``poll`` seconds, the next cron tick, and ``now + poll``; and
sleeps until it rings, a pool thread frees up, or a commit creates an earlier deadline: in
this process (the runtime's ``on_due`` callback), or - on PostgreSQL - in any process (the
store's ``watch_due``: a LISTEN on a connection of its own, fed by migration 0002's NOTIFY
trigger, so a timer another process creates fires here on time, not at the next poll).
Waiting runs therefore cost nothing: no thread, no timer object and no memory per run; the
poll (2 s by default) is what catches timers created by other processes on SQLite and JSONL,
and runs orphaned by a dead worker.

Leases are renewed: every ``lease / RENEW_FRACTION`` the loop renews (``store.renew``) the
lease of every claimed run a pool thread is still driving, so a node that runs longer than
``lease`` keeps its run; a refused renewal (another worker claimed the run after the lease
ran out, e.g. while this process was suspended) is logged as ``lease.lost`` - unless the run
has finished (a store whose finishing commit ends the lease refuses to renew it for the rest
of the drive that committed it).  A store without ``renew`` still works: its leases then last
``lease`` from the claim.

Store errors do not end the worker.  A loop step whose store call fails (``claim``, the look
for the next deadline, the orphan sweep's listing: PostgreSQL restarted, a terminated backend)
is logged as ``loop.store_failed`` and counted (``stats["store.failed"]``); the other steps of
the round still run (lease renewal above all), and the next round comes ``min(poll, 1 s)``
later - by then the store has reconnected, or the round fails and waits again.

Start-up is recovery: the first claim rounds take every RUNNING run and every overdue wait
(nothing else holds a lease on them after a restart), cron schedules catch up (see
``scheduler.cron``), and the orphan sweep below runs at once.

What is exactly-once, and what is not (several workers, or workers next to client processes):

* **Commits.**  Every transition is committed at most once: the store's seq check lets one
  writer win, the loser stops driving (``run.conflict``).  Leases do not guard this, so a lease
  that expires while its holder still drives the run (a node function stuck for longer than
  ``lease`` while its renewal could not reach the store, or a suspended process; the worker
  logs ``lease.lost``) costs duplicate node executions, never a duplicate commit.
* **``call`` effects.** A call is dispatched by the process whose commit recorded the
  request - one process, by the rule above - and by no one else while that process lives: a
  run WAITING on an effect is never handed out by ``claim``, whatever its lease says, and a
  worker driving a run holds (and renews) the run's lease while the call runs. If that
  process dies before the outcome is committed, the request is *orphaned*; the orphan sweep
  (every ``orphan_after / 2`` seconds, jittered, and at start-up) looks at every effect
  whose request is older than ``orphan_after`` and first takes the run's lease
  (``store.take``): a live dispatcher still holds it, and of several sweepers only one
  gets it. It then dispatches the effect again with the same idempotency key
  (``run_id:step``). So a function runs twice only after its dispatcher died mid-call (or,
  dispatched by a plain client process that holds no lease, when it runs longer than
  ``orphan_after``); with a third-party store without ``take`` also when it runs longer than
  ``orphan_after`` or when two workers sweep the same orphan at the same moment. In every
  case the outcome is committed once (the second commit conflicts), and a function that keys
  its side effect on ``idempotency_key`` takes effect once.

Shutdown (``stop()``, SIGTERM, SIGINT): stop claiming and sweeping, let every pool thread
finish the run it drives until that run blocks or finishes (a running ``call`` is not
interrupted) while the leases of those runs are still renewed (a drive longer than ``lease``
must not be claimed by another worker while this one finishes it), give back the leases of
drives queued but not begun and of the ones that blocked, stop the alarm.  Events
(structlog, logger ``wakepoint.worker``, ``worker`` bound): ``worker.started``, ``claim``,
``wake`` (a due wait fired), ``resume`` (a RUNNING run driven on), ``orphan.redispatch``,
``lease.lost``, ``loop.store_failed``, ``cron.started``, ``cron.skipped`` (another worker won
the tick), ``worker.stopped``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import structlog

from ..kernel.errors import RunExists, WakepointError
from ..kernel.types import RunState, Status
from ..kernel.workflow import Workflow
from ..runtime import Runtime
from .alarm import Alarm
from .cron import Missed, Schedule

COALESCE = timedelta(milliseconds=10)
"""Deadlines reported when already due ring the alarm this long from now, at the soonest."""

BUSY_RETRY = timedelta(milliseconds=50)
"""A claimed run that a thread of this process was driving is claimed again this much later,
not at once; the pause doubles while claim rounds keep finding such runs, up to ``poll``."""

RENEW_FRACTION = 3
"""Leases of runs being driven are renewed every ``lease / RENEW_FRACTION``."""

_HORIZON_LIMIT = 1000
"""At most this many upcoming deadlines are read per arming (the poll catches any beyond)."""

_NEVER = datetime.max.replace(tzinfo=UTC)
"""The expiry of a lease that never needs renewing, nor counts as lost: a run that ended."""

_RETRY_PAUSE = timedelta(seconds=1)
"""After a loop round whose store calls failed, the next round comes at most this much later
(or after ``poll``, when shorter)."""


def _seconds(value: float | timedelta) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


class Worker:
    """Drives the runs of ``runtime`` that need a worker; see the module docstring.

    ``worker_id`` names this worker in leases (default: host, pid and a random suffix, so a
    restarted process never inherits its predecessor's leases).  ``lease``, ``poll`` and
    ``orphan_after`` are seconds or ``timedelta``s.
    """

    def __init__(
        self,
        runtime: Runtime,
        worker_id: str | None = None,
        concurrency: int = 1,
        lease: float | timedelta = 30.0,
        poll: float | timedelta = 2.0,
        *,
        orphan_after: float | timedelta = 60.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.runtime = runtime
        self.worker_id = worker_id or (
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self.concurrency = concurrency
        self.lease = _seconds(lease)
        self.poll = _seconds(poll)
        self.orphan_after = _seconds(orphan_after)
        if self.lease <= timedelta(0) or self.poll <= timedelta(0):
            raise ValueError("lease and poll must be positive")
        self.stats: Counter[str] = Counter()
        """Counts of ``claim``, ``wake``, ``resume``, ``orphan``, ``lease.lost``, ``cron.*``,
        ``store.failed`` (loop steps whose store call failed), ``busy`` (claimed runs a thread
        of this process was driving meanwhile, left to it)."""
        # The loop and the pool threads all count: ``Counter[k] += 1`` is a read and a write
        # that another thread can come between, losing a count.
        self._stats_lock = threading.Lock()
        self._log = structlog.get_logger("wakepoint.worker").bind(worker=self.worker_id)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._running = False
        self._lock = threading.Lock()
        # run id -> (when its lease expires, whether this worker holds a lease on it in the
        # store: claimed, or an orphan taken with ``take``; not: an orphan swept from a store
        # without ``take``, or a lease found lost)
        self._inflight: dict[str, tuple[datetime, bool]] = {}
        self._lost: set[str] = set()  # claimed runs whose renewal was refused
        self._reported: datetime | None = None  # earliest deadline on_due told since arming
        self._soon = False  # a deadline already due was reported: claim soon
        self._busy_pause = BUSY_RETRY  # see BUSY_RETRY
        # Until when the last look at the store for the next deadline holds (see _arm).
        self._looked_until = datetime.min.replace(tzinfo=UTC)
        self._alarm = Alarm(self._wake.set)
        self._schedules: list[Schedule] = []
        self._next_tick: list[datetime] = []
        self._next_sweep: datetime | None = None
        self._renew_fn: Callable[[str, str, timedelta, datetime], bool] | None = getattr(
            runtime.store, "renew", None)
        # A store whose commit of a finished run ends its lease (the SQL store) needs no
        # ``release`` after a drive that finished the run.
        self._releases_finished = bool(getattr(runtime.store, "releases_finished", False))
        self._next_renewal = _NEVER
        self._pool: ThreadPoolExecutor | None = None
        # Pool tasks submitted and not done yet -> the run each drives (None: a cron start).
        self._pending: dict[Future[None], str | None] = {}

    def __repr__(self) -> str:
        return f"Worker({self.worker_id!r}, concurrency={self.concurrency})"

    # --- configuration -----------------------------------------------------------------------

    def schedule(
        self,
        workflow: Workflow | str,
        cron: str,
        input: Any = None,
        *,
        missed: Missed = "run_once",
        timezone: tzinfo | None = None,
    ) -> Schedule:
        """Start ``workflow`` with ``input`` on every tick of ``cron`` (see ``scheduler.cron``).

        Every worker of a deployment should declare the same schedules: each tick starts one
        run whichever workers fire it.  Call before ``run()``.
        """
        if self._running:
            raise RuntimeError("schedule() must be called before run()")
        if isinstance(workflow, Workflow):
            self.runtime.register(workflow)
            workflow = workflow.id
        self.runtime.workflow(workflow)  # UnknownWorkflow now, not at the first tick
        options: dict[str, Any] = {} if timezone is None else {"timezone": timezone}
        sched = Schedule(workflow, cron, input, missed, **options)
        self._schedules.append(sched)
        return sched

    # --- running -----------------------------------------------------------------------------

    def run(self, *, install_signals: bool = True) -> None:
        """Run until ``stop()`` (or SIGTERM/SIGINT, when called on the main thread)."""
        if self._running:
            raise RuntimeError("this worker is already running")
        self._running = True
        rt = self.runtime
        previous_on_due = rt.on_due
        rt.on_due = self._chain(previous_on_due)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="wakepoint-work")
        watch = getattr(rt.store, "watch_due", None)
        unwatch: Callable[[], None] | None = None
        try:
            if watch is not None:
                # Deadlines other processes commit wake us at once (PostgreSQL LISTEN/NOTIFY)
                # instead of at the next poll.
                unwatch = watch(self._due)
            with self._signals(install_signals):
                self._alarm.start()
                self._log.info("worker.started", concurrency=self.concurrency,
                               lease=self.lease.total_seconds(),
                               poll=self.poll.total_seconds())
                self._loop()
        finally:
            if unwatch is not None:
                unwatch()
            # No new tasks; queued ones (not begun) are cancelled and their leases given back
            # (``_done``).  Then the drives in progress finish while their leases are still
            # renewed (``_drain``) - not in ``shutdown(wait=True)`` alone, where nothing
            # renewed them and another worker could claim a run a long drive still drove.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._drain()
            self._pool.shutdown(wait=True)
            self._alarm.stop()
            rt.on_due = previous_on_due
            self._release_all()
            self._log.info("worker.stopped", **dict(sorted(self.stats.items())))
            self._stopped.set()

    def run_in_thread(self) -> threading.Thread:
        """Run in a daemon thread (no signal handlers); ``stop()`` ends it."""
        thread = threading.Thread(target=self.run, kwargs={"install_signals": False},
                                  name="wakepoint-worker", daemon=True)
        thread.start()
        return thread

    def stop(self, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Ask the worker to stop; with ``wait``, wait until it has (whether it has)."""
        self._stopping.set()
        self._wake.set()
        if wait and self._running:
            return self._stopped.wait(timeout)
        return self._stopped.is_set()

    def wake(self) -> None:
        """Claim now instead of at the next alarm (e.g. after another process started runs)."""
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        now = self.runtime.clock()
        self._start_schedules(now)
        self._next_sweep = now  # sweep orphans at start-up
        while not self._stopping.is_set():
            now = self.runtime.clock()
            # Each step that asks the store is guarded on its own: a store error (PostgreSQL
            # restarted, a backend terminated, a locked SQLite file) fails that step of this
            # round only - the store reconnects on its next call - so the other steps (above
            # all the renewal of the leases of the drives in progress) still run.
            failed = False
            more = False
            try:
                more = self._claim(now)
            except Exception as exc:
                self._store_failed("claim", exc)
                failed = True
            self._fire_cron(now)
            if self._next_sweep is not None and now >= self._next_sweep:
                try:
                    self._sweep(now)
                except Exception as exc:
                    self._store_failed("sweep", exc)
                    failed = True
            if now >= self._next_renewal:
                self._renew(now)  # guarded per run: see lease.renew_failed
            if not failed and not more:
                self._checkpoint_if_due()
                try:
                    self._arm(now)
                except Exception as exc:
                    self._store_failed("arm", exc)
                    failed = True
            if failed:
                self._pause_after_failure(now)
                continue
            if more:
                continue  # free threads and claimable runs left: claim again at once
            self._wake.wait()
            self._wake.clear()
            if self._soon:
                # A deadline already due was reported: claim after COALESCE, or sooner when
                # a pool thread frees up (that claim round sees it too).  Cleared after the
                # pause, so that every report before the clear is seen by the claim below
                # (reports come after their commit); a later one sets flag and event again.
                if self._wake.wait(COALESCE.total_seconds()):
                    self._wake.clear()
                self._soon = False

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _store_failed(self, step: str, exc: Exception) -> None:
        """Report a loop step whose store call failed: logged and counted, never silent."""
        self._count("store.failed")
        self._log.warning("loop.store_failed", step=step, error=str(exc),
                          error_type=type(exc).__name__)

    def _pause_after_failure(self, now: datetime) -> None:
        """After a failed round: wait ``min(poll, 1 s)`` before the next one (a store that is
        down is not asked in a tight loop), less when a lease renewal falls due sooner (the
        renewal does not wait for the store's other calls to recover), and not at all once
        ``stop()`` was called."""
        pause = min(self.poll, _RETRY_PAUSE)
        if self._renewing:
            pause = min(pause, self._next_renewal - now)
        self._stopping.wait(max(pause.total_seconds(), 0.0))

    def _checkpoint_if_due(self) -> None:
        # Before the loop sleeps: records this process committed after the runtime's last
        # checkpoint get one now (at most one per the runtime's minimum interval), instead
        # of waiting for the next commit or for close().  A failure is the store's to
        # report; the worker goes on.
        try:
            self.runtime.checkpoint_if_due()
        except Exception as exc:
            self._log.warning("checkpoint.failed", error=str(exc))

    def _free(self) -> int:
        with self._lock:
            return self.concurrency - len(self._inflight)

    def _claim(self, now: datetime) -> bool:
        """One claim round; whether more runs may be claimable right away."""
        free = self._free()
        if free <= 0 or self._stopping.is_set():
            return False
        states = self.runtime.store.claim(now, self.worker_id, self.lease, free)
        fresh = 0
        busy = False
        for state in states:
            with self._lock:
                if state.run_id in self._inflight:
                    continue  # our own run, still being driven: the claim renewed its lease
                # Else a thread of this runtime driving it is a client's (a start, a
                # respond): not stalled, so left to that thread.  Handed to the pool,
                # ``recover_run`` would return at once, the released run be claimed again at
                # once, and the loop spin for as long as that drive lasts (7,500 claims/s,
                # measured).
                driven = self.runtime.driving(state.run_id)
                if not driven:
                    self._hold(state.run_id, now)
            if driven:
                self._release(state.run_id)
                self._count("busy")
                busy = True
                continue
            fresh += 1
            self._count("claim")
            self._log.debug("claim", run_id=state.run_id, workflow=state.workflow,
                            node=state.node, step=state.step, status=state.status.value)
            self._submit(state.run_id, self._work, state, redispatch=False, leased=True)
        if busy:
            # Look again a little later: that drive may leave the run due (a wait whose
            # deadline has passed, reported by ``on_due`` while the drive still ran).  Later
            # and later while it goes on (a node blocked for an hour costs a few claims).
            self._due(datetime.now(UTC) + self._busy_pause)
            self._busy_pause = min(self._busy_pause * 2, max(self.poll, BUSY_RETRY))
        else:
            self._busy_pause = BUSY_RETRY
        return fresh >= free

    def _hold(self, run_id: str, now: datetime) -> None:
        """Record a run this worker now holds a lease on (called with ``_lock`` held)."""
        # The first held run starts the renewal clock - whether claimed or an orphan taken
        # by the sweep (before, only a claim into an empty ``_inflight`` started it, so an
        # orphan taken by a worker that had claimed nothing yet was never renewed).
        first = not any(leased for _, leased in self._inflight.values())
        self._inflight[run_id] = (now + self.lease, True)
        if first:
            self._next_renewal = now + self.lease / RENEW_FRACTION

    @property
    def _renewing(self) -> bool:
        """Whether some claimed run is being driven (its lease needs renewing)."""
        with self._lock:
            return any(leased for _, leased in self._inflight.values())

    def _renew(self, now: datetime) -> None:
        """Renew the lease of every claimed run a pool thread is driving (a node or ``call``
        running longer than ``lease`` would otherwise let another worker claim it)."""
        self._next_renewal = now + self.lease / RENEW_FRACTION
        if self._renew_fn is None:
            return
        with self._lock:
            held = [run_id for run_id, (_, leased) in self._inflight.items() if leased]
        for run_id in held:
            try:
                renewed = self._renew_fn(run_id, self.worker_id, self.lease, now)
            except Exception as exc:  # the store is unreachable: the next round retries
                self._log.warning("lease.renew_failed", run_id=run_id, error=str(exc))
                continue
            finished = False
            if not renewed and self._releases_finished:
                # The store's commit that finishes a run ends its lease, and the run stays
                # in ``_inflight`` until its drive returns (a checkpoint, a parent resumed
                # in the same drive come after that commit): a refusal then means the run
                # finished, not that another worker took it.  So look: a finished run is no
                # lost lease.  (A run another worker took over AND finished meanwhile is
                # not reported here either; this drive's next commit then conflicts, which
                # the runtime logs as ``run.conflict``.)  The look failing: the next round
                # asks again.
                try:
                    finished = self.runtime.store.load(run_id).status.finished
                except Exception as exc:
                    self._log.warning("lease.renew_failed", run_id=run_id, error=str(exc))
                    continue
            with self._lock:
                if run_id not in self._inflight:
                    continue  # finished meanwhile (and released)
                if renewed:
                    self._inflight[run_id] = (now + self.lease, True)
                    continue
                if finished:
                    # Nothing to renew any more, and the drive's end must not count the
                    # lease as lost when it comes after the lease would have run out.
                    self._inflight[run_id] = (_NEVER, False)
                    continue
                # Lost for good: reported once, here; the drive goes on (the store's seq
                # check keeps its commits single) and is not renewed again.
                self._inflight[run_id] = (self._inflight[run_id][0], False)
                self._lost.add(run_id)
            self._count("lease.lost")
            self._log.warning("lease.lost", run_id=run_id, lease=self.lease.total_seconds())

    def _drain(self) -> None:
        """After the loop: wait for every pool task to end, renewing the leases of the runs
        still being driven meanwhile (no claiming, no sweeping: the worker is stopping)."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return
            now = self.runtime.clock()
            if now >= self._next_renewal:
                self._renew(now)
            timeout: float | None = None  # nothing to renew: until a task ends
            if self._renewing:
                timeout = max((self._next_renewal - now).total_seconds(), 0.0)
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    def _submit(
        self, run_id: str | None, fn: Callable[..., None], *args: Any, **kwargs: Any
    ) -> None:
        """Hand ``fn`` to the pool; ``run_id``: the run it drives (None: a cron start)."""
        assert self._pool is not None
        future = self._pool.submit(fn, *args, **kwargs)
        with self._lock:
            self._pending[future] = run_id
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        """A pool task ended, or was cancelled by the shutdown before it began."""
        with self._lock:
            run_id = self._pending.pop(future, None)
            held = None
            if run_id is not None and future.cancelled():
                # Never driven (``_work``'s finally, which gives leases back, never ran).
                held = self._inflight.pop(run_id, None)
                self._lost.discard(run_id)
        if run_id is not None and held is not None and held[1]:
            self._release(run_id)

    def _work(self, state: RunState, *, redispatch: bool, leased: bool) -> None:
        """Drive one claimed (or orphaned) run in a pool thread, then give its lease back."""
        run_id = state.run_id
        log = self._log.bind(run_id=run_id, workflow=state.workflow)
        finished = False
        try:
            if redispatch:
                event = "orphan.redispatch"
                self._count("orphan")
            elif state.status is Status.RUNNING:
                event = "resume"
                self._count("resume")
            else:
                event = "wake"
                self._count("wake")
            log.info(event, node=state.node, step=state.step)
            finished = self.runtime.recover_run(
                run_id, redispatch=redispatch, state=state).status.finished
        except Exception as exc:  # a store failure or a bug: log it, keep the worker alive
            log.exception("run.failed", error=str(exc))
        finally:
            with self._lock:
                held = self._inflight.pop(run_id, None)
                reported = run_id in self._lost
                self._lost.discard(run_id)
            expires = None if held is None or reported or not leased else held[0]
            if expires is not None and self.runtime.clock() > expires:
                self._count("lease.lost")
                log.warning("lease.lost", lease=self.lease.total_seconds())
            if leased and not (finished and self._releases_finished):
                self._release(run_id)
            self._wake.set()  # a thread is free

    def _release(self, run_id: str) -> None:
        try:
            self.runtime.store.release(run_id, self.worker_id)
        except Exception as exc:  # the lease then simply expires
            self._log.warning("lease.release_failed", run_id=run_id, error=str(exc))

    def _release_all(self) -> None:
        with self._lock:
            left, self._inflight = list(self._inflight), {}
        for run_id in left:
            self._release(run_id)

    # --- the alarm ---------------------------------------------------------------------------

    def _chain(self, previous: Callable[[datetime], None] | None) -> Callable[[datetime], None]:
        def on_due(deadline: datetime) -> None:
            self._due(deadline)
            if previous is not None:
                previous(deadline)

        return on_due

    def _due(self, deadline: datetime) -> None:
        """A commit (in this process, or announced by the store) created ``deadline``."""
        if deadline <= datetime.now(UTC):
            # Due already (``wait_until`` of now: its drive resolves it at once, right after
            # this call): the loop claims within COALESCE (see ``_loop``), so that a stream
            # of them costs one claim round per COALESCE, not one each - and no alarm:
            # re-arming APScheduler costs about 0.3 ms of CPU, and a busy worker on timers
            # due at once re-armed it twice per round (a tenth of its CPU).
            if not self._soon:
                self._soon = True
                self._wake.set()
            return
        # A deadline just ahead rings no sooner than COALESCE from now (coalescing as above).
        deadline = max(deadline, datetime.now(UTC) + COALESCE)
        # Recorded before re-arming, so that an _arm() racing with us sees it (see _arm).
        reported = self._reported
        if reported is None or deadline < reported:
            self._reported = deadline
        self._alarm.arm_earlier(deadline)

    def _arm(self, now: datetime) -> None:
        """Arm the alarm for the next moment worth waking up for."""
        self._reported = None
        armed = self._alarm.armed_for
        if armed is not None and now < armed <= self._looked_until:
            # The alarm still rings before the next deadline the store held when we last
            # looked, and no later than that look's poll: every deadline committed since
            # was reported (``on_due`` here, ``watch_due`` from other processes) and moved
            # the alarm earlier, or is the poll's to find.  So the store is not asked again
            # after every claim round (a statement per round for a busy worker), only once
            # the alarm rang or the poll is due.
            at = armed
        else:
            # ``_looked_until`` is set only once the look succeeded: after a failed look, the
            # next _arm asks the store again instead of trusting an alarm armed without it.
            at = horizon = now + self.poll
            # An overdue wait we did not get is leased by another worker: its holder drives
            # it, and the poll looks again in case that worker died.  So: the next deadline
            # after now.
            next_deadline = getattr(self.runtime.store, "next_deadline", None)
            if next_deadline is not None:
                deadline = next_deadline(now)
                if deadline is not None and deadline < at:
                    at = deadline
            else:
                for state in self.runtime.store.list(
                    status=Status.WAITING, due_before=at, limit=_HORIZON_LIMIT
                ):
                    deadline = state.wait.deadline if state.wait is not None else None
                    if deadline is not None and now < deadline < at:
                        at = deadline
            self._looked_until = horizon
        at = min([at, *self._next_tick])
        if self._renewing:
            at = min(at, self._next_renewal)
        # An alarm already set between now and ``at`` stays: it rings a little early at
        # worst (one more claim round), and re-arming after every round cost a fifth of a
        # busy worker's CPU.
        self._alarm.arm_by(at, now)
        reported = self._latest_report()
        if reported is not None and reported < at:
            self._alarm.arm_earlier(reported)

    def _latest_report(self) -> datetime | None:
        return self._reported  # read again: on_due may have set it since _arm cleared it

    # --- orphaned effects --------------------------------------------------------------------

    def _sweep(self, now: datetime) -> None:
        """Dispatch again the effects whose requesting process is presumed dead."""
        # Both listings first: when one fails (the loop reports it), the next round sweeps
        # again rather than half an ``orphan_after`` later.
        waiting = [state for kind in ("effect", "child")
                   for state in self.runtime.store.list(status=Status.WAITING, wait_kind=kind)]
        half = self.orphan_after.total_seconds() / 2
        self._next_sweep = now + timedelta(seconds=half * (1 + random.random()))
        cutoff = now - self.orphan_after
        take: Callable[[str, str, timedelta, datetime], bool] | None = getattr(
            self.runtime.store, "take", None)  # every wakepoint store has it; others may not
        for state in waiting:
            if state.updated_at > cutoff or not self._serves(state.workflow):
                continue
            with self._lock:
                if state.run_id in self._inflight:
                    continue
            if self.runtime.driving(state.run_id):
                continue  # its dispatcher is a live thread of this process: not an orphan
            if take is not None:
                # The lease decides, not the age alone: a live dispatcher holds (and
                # renews) the run's lease while its call runs, and of several sweepers
                # only one can take a free lease.
                try:
                    taken = take(state.run_id, self.worker_id, self.lease, now)
                except Exception as exc:  # the store is unreachable: next sweep
                    self._log.warning("orphan.take_failed", run_id=state.run_id,
                                      error=str(exc))
                    continue
                if not taken:
                    continue
                if self._moved(state):
                    # Resolved between the listing and the take (its live dispatcher
                    # committed the outcome, and perhaps finished the run): not an orphan.
                    self._release(state.run_id)
                    continue
            with self._lock:
                if state.run_id in self._inflight:  # claimed meanwhile by our loop
                    continue
                if take is not None:
                    self._hold(state.run_id, now)
                else:
                    self._inflight[state.run_id] = (now + self.orphan_after, False)
            self._submit(state.run_id, self._work, state, redispatch=True,
                         leased=take is not None)

    def _moved(self, state: RunState) -> bool:
        """Whether the run was committed since ``state`` was read (or is gone)."""
        try:
            return self.runtime.store.load(state.run_id).seq != state.seq
        except WakepointError:
            return True

    def _serves(self, workflow: str) -> bool:
        try:
            self.runtime.workflow(workflow)
        except WakepointError:
            return False
        return True

    # --- cron --------------------------------------------------------------------------------

    def _start_schedules(self, now: datetime) -> None:
        self._next_tick = []
        for sched in self._schedules:
            first = sched.first_tick(now)  # a tick exactly now is fired by _fire_cron ...
            last = sched.last_tick(now)
            if sched.missed == "run_once" and last is not None:
                self._start_cron(sched, last)
                if first == last:  # ... unless the catch-up just fired it
                    first = sched.next_tick(last)
            self._next_tick.append(first)

    def _fire_cron(self, now: datetime) -> None:
        for i, sched in enumerate(self._schedules):
            tick = self._next_tick[i]
            if tick > now:
                continue
            latest = sched.last_tick(now) or tick  # ticks noticed late coalesce to the latest
            self._start_cron(sched, latest)
            self._next_tick[i] = sched.next_tick(latest)

    def _start_cron(self, sched: Schedule, tick: datetime) -> None:
        self._submit(None, self._cron_run, sched, tick)

    def _cron_run(self, sched: Schedule, tick: datetime) -> None:
        run_id = sched.run_id(tick)
        try:
            self.runtime.start(sched.workflow, sched.input, run_id=run_id)
        except RunExists:
            self._count("cron.skipped")
            self._log.info("cron.skipped", run_id=run_id, workflow=sched.workflow)
            return
        except Exception as exc:  # the run exists and failed, or the store failed: logged
            self._log.exception("cron.failed", run_id=run_id, workflow=sched.workflow,
                                error=str(exc))
            return
        self._count("cron.started")
        self._log.info("cron.started", run_id=run_id, workflow=sched.workflow)

    # --- signals -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self, install: bool) -> Iterator[None]:
        """SIGTERM and SIGINT stop the worker while it runs (main thread only).

        The Python-level handler does nothing: it runs on the main thread between two
        bytecodes, and the main thread runs the loop, which logs - a handler that logged
        (or set an Event) could need a lock the interrupted code holds, and wait for it
        forever (structlog's print lock did: a SIGTERM right after a log line hung the
        process).  The signal number reaches a watcher thread instead, through the
        interpreter's wakeup fd (written by the C-level handler, which takes no lock); that
        thread logs ``worker.stopping`` and calls ``stop``.  The process's previous wakeup fd
        is restored on exit."""
        if not install or threading.current_thread() is not threading.main_thread():
            yield
            return
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # the interpreter requires it of a wakeup fd
        watcher = threading.Thread(target=self._watch_signals, args=(reader,),
                                   name="wakepoint-signals", daemon=True)
        watcher.start()
        previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, _noted) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(previous_fd)
            writer.close()  # the watcher reads EOF and ends
            watcher.join(5)
            reader.close()

    def _watch_signals(self, reader: socket.socket) -> None:
        """The watcher thread of ``_signals``: one byte per signal received, EOF at the end."""
        while data := reader.recv(64):
            for signum in data:
                if signum in _STOP_SIGNALS:
                    self._log.info("worker.stopping", signal=signal.Signals(signum).name)
                    self.stop(wait=False)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _noted(signum: int, frame: object) -> None:
    """The Python-level handler of SIGTERM/SIGINT while a worker runs: the work is done by
    the worker's watcher thread (see ``Worker._signals``); this only replaces the default
    action (ending the process, or KeyboardInterrupt)."""
