"""What ``wakepoint worker --app module:attribute`` loads, and the worker process's main function.

``--app`` names an attribute that is, or is a zero-argument callable returning, one of:

* an ``App`` (workflows, ``call`` functions, effect handlers, cron schedules);
* a ``Workflow``, or an iterable of them (no functions, handlers or schedules).

``main_worker(store_url, app_spec, concurrency)`` builds the ``Runtime`` on the store, a
``Worker`` on it, declares the app's schedules and runs until SIGTERM/SIGINT; it returns the
process exit status.  Every worker of a deployment must sign with the same key: the runtime
loads it from ``home`` (``.wakepoint/signer.key`` by default; a JSONL store keeps it in its
directory), so workers on several machines need that file copied to each.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..effects.base import Handler
from ..kernel.workflow import Workflow
from ..runtime import DEFAULT_HOME, Runtime
from .cron import Schedule
from .worker import Worker


@dataclass(frozen=True)
class App:
    """Everything a worker process needs to know about the application."""

    workflows: Iterable[Workflow]
    functions: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    schedules: Iterable[Schedule] = ()


def load_app(spec: str) -> App:
    """Import ``module:attribute`` and make an ``App`` of it (``ValueError`` if it is none)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--app must be module:attribute, not {spec!r}")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if callable(target) and not isinstance(target, Workflow):
        target = target()
    if isinstance(target, App):
        return target
    if isinstance(target, Workflow):
        return App(workflows=[target])
    if isinstance(target, Iterable):
        workflows = list(target)
        if all(isinstance(wf, Workflow) for wf in workflows):
            return App(workflows=workflows)
    raise ValueError(f"{spec} is not an App, a Workflow or a list of workflows")


def main_worker(
    store_url: str,
    app_spec: str | App,
    concurrency: int = 1,
    *,
    home: str | os.PathLike[str] = DEFAULT_HOME,
    worker_id: str | None = None,
    **worker_options: Any,
) -> int:
    """Run a worker on ``store_url`` for the app until SIGTERM/SIGINT; the exit status.

    ``worker_options`` go to ``Worker`` (``lease``, ``poll``, ``orphan_after``).
    """
    app = load_app(app_spec) if isinstance(app_spec, str) else app_spec
    with Runtime(store_url, app.workflows, app.functions, app.handlers, home=home) as rt:
        worker = Worker(rt, worker_id, concurrency=concurrency, **worker_options)
        for sched in app.schedules:
            worker.schedule(sched.workflow, sched.cron, sched.input, missed=sched.missed,
                            timezone=sched.timezone)
        worker.run()
    return 0
