"""The alarm clock and cron schedules: when they ring, which ticks fire, which run ids they get."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from wakepoint.scheduler import Alarm, Schedule, run_id_for


def test_alarm_rings_at_the_armed_time() -> None:
    """An armed alarm rings once, soon after the armed time (never before it).  Usually a
    few milliseconds; the bound is loose (1 s) because the suite shares two cores with
    parallel tests and a stall of a few hundred ms must not fail it - it still tells an alarm
    that rings at its time from one that only notices at a worker's poll (2 s by default).
    The lateness figure itself is bench_worker.py's, on a quiet machine."""
    rang: list[datetime] = []
    done = threading.Event()
    alarm = Alarm(lambda: (rang.append(datetime.now(UTC)), done.set()))
    alarm.start()
    try:
        at = datetime.now(UTC) + timedelta(milliseconds=150)
        alarm.arm(at)
        assert alarm.armed_for == at
        assert done.wait(5)
        assert timedelta(0) <= rang[0] - at < timedelta(seconds=1)
        time.sleep(0.1)
        assert len(rang) == 1
        assert alarm.armed_for is None
    finally:
        alarm.stop()


def test_arm_earlier_only_moves_the_alarm_earlier() -> None:
    """``arm_earlier`` re-arms for an earlier time and ignores a later one."""
    alarm = Alarm(lambda: None)
    now = datetime.now(UTC)
    alarm.arm(now + timedelta(hours=1))
    assert not alarm.arm_earlier(now + timedelta(hours=2))
    assert alarm.arm_earlier(now + timedelta(minutes=1))
    assert alarm.armed_for == now + timedelta(minutes=1)
    alarm.stop()


def test_arm_by_keeps_an_earlier_time_still_ahead() -> None:
    """``arm_by(at, now)`` keeps an armed time between now and ``at``, and re-arms for ``at``
    when the armed time is later than ``at``, already past, or unset."""
    alarm = Alarm(lambda: None)
    now = datetime.now(UTC)
    assert alarm.arm_by(now + timedelta(minutes=5), now)  # unset: arms
    assert not alarm.arm_by(now + timedelta(minutes=10), now)  # 5 min is sooner: kept
    assert alarm.armed_for == now + timedelta(minutes=5)
    assert alarm.arm_by(now + timedelta(minutes=1), now)  # sooner than armed: re-arms
    assert alarm.armed_for == now + timedelta(minutes=1)
    later = now + timedelta(minutes=2)  # the armed time has passed
    assert alarm.arm_by(later + timedelta(minutes=5), later)
    assert alarm.armed_for == later + timedelta(minutes=5)
    alarm.stop()


def test_an_alarm_armed_before_start_rings_after_start() -> None:
    """A time armed before ``start()`` (already past here) rings as soon as it starts."""
    done = threading.Event()
    alarm = Alarm(done.set)
    alarm.arm(datetime.now(UTC) - timedelta(seconds=1))
    alarm.start()
    try:
        assert done.wait(2)
    finally:
        alarm.stop()


def test_cron_run_ids_are_deterministic_utc_seconds() -> None:
    """The run id of a tick is ``cron:<workflow>:<tick in UTC to the second>Z``."""
    tick = datetime(2024, 5, 1, 14, 5, tzinfo=UTC)
    assert run_id_for("report", tick) == "cron:report:2024-05-01T14:05:00Z"
    other_zone = tick.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    assert run_id_for("report", other_zone) == "cron:report:2024-05-01T14:05:00Z"


def test_schedule_ticks() -> None:
    """first/next/last tick around a moment, on and off the cron grid."""
    sched = Schedule("wf", "*/5 * * * *")
    on = datetime(2024, 5, 1, 12, 5, tzinfo=UTC)
    off = on + timedelta(minutes=2, seconds=7)
    assert sched.first_tick(on) == on
    assert sched.first_tick(off) == on + timedelta(minutes=5)
    assert sched.next_tick(on) == on + timedelta(minutes=5)
    assert sched.last_tick(on) == on
    assert sched.last_tick(off) == on
    assert sched.run_id(on) == "cron:wf:2024-05-01T12:05:00Z"


def test_last_tick_looks_back_far_enough_for_rare_schedules() -> None:
    """A yearly schedule's latest tick is found even months back."""
    sched = Schedule("wf", "0 0 1 1 *")
    assert sched.last_tick(datetime(2024, 11, 3, 8, 0, tzinfo=UTC)) == datetime(
        2024, 1, 1, tzinfo=UTC)


def test_schedule_refuses_a_bad_expression_or_policy() -> None:
    """A malformed crontab or an unknown missed-tick policy fails at declaration."""
    with pytest.raises(ValueError):
        Schedule("wf", "every five minutes")
    with pytest.raises(ValueError, match="missed"):
        Schedule("wf", "* * * * *", missed="all")  # type: ignore[arg-type]
