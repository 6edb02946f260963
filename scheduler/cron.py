"""Cron-scheduled starts: which ticks fire, and the run id each tick starts.

Promises.  A ``Schedule`` starts its workflow once per cron tick with the run id
``cron:<workflow>:<tick>`` (``tick`` in UTC, RFC 3339 to the second, e.g.
``cron:report:2024-05-01T12:05:00Z``).  The id is the whole coordination: every worker that
fires the same tick asks the store to *create* that one run, the first create wins, and the
others get ``RunExists`` - which means "another worker won", not an error.  No lock, no
leader, and no shared APScheduler job store (those fire twice).

Missed ticks (the worker was down when they fell due) follow the schedule's ``missed`` policy:

* ``"run_once"`` (default): when a worker starts, the latest tick at or before now is fired
  (at most one catch-up run per schedule, however many ticks were missed; if that tick's run
  exists already, nothing happens).  A schedule deployed for the first time therefore runs
  once for its latest past tick, as a Kubernetes CronJob does.
* ``"skip"``: ticks before the worker started are never fired.

While a worker runs, ticks it notices late (a suspended process, a long stall) coalesce: only
the latest passed tick is fired, under both policies.

Why a runtime-side call (``Worker.schedule(workflow, cron=..., input=...)``) and not
``Workflow.schedule(...)``: a schedule is deployment, not definition - which processes fire
it, the time zone, what to do after downtime - and the same workflow may be scheduled
differently in two deployments, or started only by hand in tests.  Keeping it out of the
kernel also keeps the kernel pure (cron parsing needs APScheduler, which the kernel must not
import) and its 100% branch coverage untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal, TypeAlias

from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]  # no py.typed

Missed: TypeAlias = Literal["run_once", "skip"]
MISSED: tuple[Missed, ...] = ("run_once", "skip")

_ONE_SECOND = timedelta(seconds=1)  # cron's resolution: the next tick is at least this later
_LOOKBACK = (timedelta(minutes=1), timedelta(hours=1), timedelta(days=1), timedelta(days=32),
             timedelta(days=367), timedelta(days=366 * 8))
"""Windows searched, smallest first, for the latest past tick (8 years covers Feb 29)."""


def run_id_for(workflow: str, tick: datetime) -> str:
    """The deterministic run id of ``workflow``'s run for cron tick ``tick``."""
    return f"cron:{workflow}:{tick.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


@dataclass(frozen=True)
class Schedule:
    """Start ``workflow`` with ``input`` on every tick of the crontab expression ``cron``.

    ``cron`` is a standard five-field expression (minute hour day month weekday), read in
    ``timezone`` (UTC by default).  ``missed`` is the missed-tick policy (module docstring).
    """

    workflow: str
    cron: str
    input: Any = None
    missed: Missed = "run_once"
    timezone: tzinfo = UTC
    trigger: CronTrigger = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.missed not in MISSED:
            raise ValueError(f"missed must be one of {MISSED}, not {self.missed!r}")
        # ValueError for a malformed expression, raised here rather than at the first tick.
        trigger = CronTrigger.from_crontab(self.cron, timezone=self.timezone)
        object.__setattr__(self, "trigger", trigger)

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after ``after``."""
        tick = self.trigger.get_next_fire_time(None, after + _ONE_SECOND)
        assert tick is not None  # a crontab trigger has no end date
        return _utc(tick)

    def first_tick(self, now: datetime) -> datetime:
        """The first tick at or after ``now``."""
        tick = self.trigger.get_next_fire_time(None, now)
        assert tick is not None
        return _utc(tick)

    def last_tick(self, now: datetime) -> datetime | None:
        """The latest tick at or before ``now`` (None: none in the last eight years)."""
        for window in _LOOKBACK:
            tick = self.first_tick(now - window)
            if tick > now:
                continue
            while True:
                following = self.next_tick(tick)
                if following > now:
                    return tick
                tick = following
        return None

    def run_id(self, tick: datetime) -> str:
        """The run id this schedule's run for ``tick`` gets."""
        return run_id_for(self.workflow, tick)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)
