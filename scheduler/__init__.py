"""Timers, workers and cron starts: what keeps runs moving without anyone calling the runtime.

``Worker(runtime, concurrency=...)`` claims due and orphaned runs from the store and drives
them, sleeping on an in-process alarm clock (APScheduler 3.x) until the store's next due time;
``Worker.schedule(workflow, cron=...)`` adds cron starts.  ``main_worker`` is the body of
``wakepoint worker``.  The modules: ``alarm`` (the alarm clock), ``worker`` (claiming, leases,
recovery, shutdown, and what is exactly-once), ``cron`` (ticks, run ids, missed ticks),
``app`` (loading ``--app module:attribute``).
"""

from .alarm import Alarm
from .app import App, load_app, main_worker
from .cron import Schedule, run_id_for
from .worker import Worker

__all__ = ["Alarm", "App", "Schedule", "Worker", "load_app", "main_worker", "run_id_for"]
