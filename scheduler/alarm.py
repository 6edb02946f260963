"""The alarm clock: one in-process APScheduler job that rings at the next time worth waking for.

Promises.  ``Alarm(ring)`` calls ``ring()`` once at (or a few milliseconds after) the time it
was last armed for; ``arm(at)`` replaces the armed time, ``arm_earlier(at)`` moves it only
forward in time order (earlier), so that many threads may report deadlines cheaply, and
``arm_by(at, now)`` keeps an armed time that is still ahead and not after ``at``.  A time
already past rings at once.  The alarm holds one thread (APScheduler's) however many runs wait.

Choices, and why:

* **The store is the only source of truth.**  The alarm knows one instant, never a run: the
  worker asks the store what is due next and arms the alarm for that.  APScheduler runs
  in-process only, with its default memory job store; its job stores must never be shared
  between processes (APScheduler's own documentation says so, and shared stores fire twice).
* **One ``DateTrigger`` job, re-armed** (``replace_existing``), not one job per timer: 100,000
  waiting runs cost nothing here.
* **``DebugExecutor``**: APScheduler's default executor hands each firing to a thread pool,
  one more thread hop of latency for a job whose whole work is setting an event.  The debug
  executor runs the job on the scheduler's own thread, which is right for a job that never
  blocks (``ring`` must not).
* ``misfire_grace_time=None``: an alarm that fires late (a suspended process, a busy machine)
  must still ring, however late.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

# APScheduler 3.x ships no type information (no py.typed); its use here is three calls.
from apscheduler.executors.debug import DebugExecutor  # type: ignore[import-untyped]
from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
    BackgroundScheduler,
)
from apscheduler.triggers.date import DateTrigger  # type: ignore[import-untyped]

_JOB_ID = "wakepoint-alarm"


class Alarm:
    """Rings ``ring()`` at the armed time; see the module docstring."""

    def __init__(self, ring: Callable[[], None]) -> None:
        self._ring = ring
        self._lock = threading.Lock()
        self._armed: datetime | None = None
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": DebugExecutor()},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
        )

    @property
    def armed_for(self) -> datetime | None:
        """The time the alarm will ring at (None: not armed)."""
        return self._armed

    def start(self) -> None:
        """Start the scheduler thread (a daemon); a time armed before rings as armed."""
        self._scheduler.start()
        with self._lock:
            if self._armed is not None:
                self._set(self._armed)

    def stop(self) -> None:
        """Stop ringing; the alarm cannot be started again."""
        with self._lock:
            self._armed = None
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def arm(self, at: datetime) -> None:
        """Ring at ``at`` (instead of any time armed before)."""
        with self._lock:
            self._set(at)

    def arm_by(self, at: datetime, now: datetime) -> bool:
        """Ring no later than ``at``: keep an armed time that is still ahead and not after
        ``at`` (ringing early only costs the caller a look at the store), else re-arm for
        ``at``; whether it re-armed.  Re-arming means an APScheduler ``add_job``, which
        costs about 0.3 ms of CPU (it inspects the job function's signature every time):
        a worker that re-armed after every claim round spent a fifth of its CPU there."""
        armed = self._armed
        if armed is not None and now < armed <= at:
            return False
        with self._lock:
            armed = self._armed
            if armed is not None and now < armed <= at:
                return False
            self._set(at)
            return True

    def arm_earlier(self, at: datetime) -> bool:
        """Ring at ``at`` if that is earlier than the armed time; whether it re-armed."""
        armed = self._armed
        if armed is not None and armed <= at:
            return False  # the common case, decided without the lock
        with self._lock:
            if self._armed is not None and self._armed <= at:
                return False
            self._set(at)
            return True

    def _set(self, at: datetime) -> None:
        # Caller holds ``_lock``.
        self._armed = at
        if self._scheduler.running:
            self._scheduler.add_job(
                self._fire, DateTrigger(run_date=at, timezone=UTC), id=_JOB_ID,
                replace_existing=True,
            )

    def _fire(self) -> None:
        # Runs on the scheduler thread *holding APScheduler's job store lock* (the debug
        # executor runs jobs inside its loop), while ``_set`` takes our lock and then that one:
        # taking our lock here would deadlock.  Unlocked, a re-arm racing with this firing may
        # be forgotten; harmless, because ``ring`` makes the worker re-arm from the store.
        armed = self._armed
        if armed is not None and armed <= datetime.now(UTC):
            self._armed = None
        self._ring()
