"""Timers and workers (APScheduler 3.x as the in-process alarm clock).

Not built yet: the worker loop, leases renewal and cron starts arrive with the scheduler issue.
Until then ``Runtime.wake_due()`` fires due timers and ``Runtime.recover()`` continues runs.
"""
