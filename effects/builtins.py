"""The built-in handlers: ``wait_event``, ``wait_until``, ``ask_user``, ``subworkflow``, ``call``.

Choices made here (where the design is silent), after Temporal and DBOS:

* ``wait_event`` does not buffer: an event sent while no run waits on its key reaches nobody
  (like a webhook with no listener).  Runs that must not miss an event should start waiting
  before the sender can fire.
* ``call`` without a ``retry`` policy makes one attempt (DBOS's default for steps); a policy
  retries only the exceptions it names (all ``Exception``s when it names none).  Backoff sleeps
  happen in the handler, in-process.  ``timeout`` runs each attempt in a daemon thread and stops
  waiting for it when the time is up (Python cannot kill a thread; the attempt is abandoned and
  counts as a ``TimeoutError``).  Abandoned attempts that are still running are counted
  process-wide; while there are ``MAX_ABANDONED_ATTEMPTS`` of them, a timed attempt is not
  started and fails with ``TooManyAbandonedCalls`` (retried like any failure), so that a
  function that hangs for good cannot pile up threads without bound.  A function that
  declares an ``idempotency_key`` parameter receives ``run_id:step``, the same value on every
  attempt and after every crash.
* A failure the policy does not retry, or the last one, becomes ``Failed`` with the exception's
  type name and message.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ..kernel.types import (
    AskUser,
    Call,
    Effect,
    ParentLink,
    Retry,
    RunState,
    Status,
    Subworkflow,
    WaitEvent,
    WaitUntil,
)
from .base import Failed, HandlerContext, Outcome, Parked, Resolved

_SINGLE_ATTEMPT = Retry(attempts=1)


class WaitEventHandler:
    """Parks; ``Runtime.send_event`` resumes, the deadline times out."""

    def handle(self, effect: Effect, run: RunState, ctx: HandlerContext) -> Outcome:
        """Always park."""
        assert isinstance(effect, WaitEvent)
        return Parked()


class WaitUntilHandler:
    """Parks until the due time; a due time already past resolves at once."""

    def handle(self, effect: Effect, run: RunState, ctx: HandlerContext) -> Outcome:
        """Resolve when due, else park for the scheduler."""
        assert isinstance(effect, WaitUntil) and effect.when is not None
        return Resolved(None) if effect.when <= ctx.now() else Parked()


class AskUserHandler:
    """Parks with the prompt and choices; ``Runtime.respond`` answers."""

    def handle(self, effect: Effect, run: RunState, ctx: HandlerContext) -> Outcome:
        """Always park (the question is in the run's ``wait``)."""
        assert isinstance(effect, AskUser)
        return Parked()


class SubworkflowHandler:
    """Starts the child run; ``wait`` parks until it ends, ``detach`` resolves with its id."""

    def handle(self, effect: Effect, run: RunState, ctx: HandlerContext) -> Outcome:
        """Create the child (idempotent: its id is fixed by the parent's step)."""
        assert isinstance(effect, Subworkflow) and effect.run_id is not None
        assert run.wait is not None
        child = ctx.start_child(
            effect.workflow, effect.input, effect.run_id,
            ParentLink(run_id=run.run_id, key=run.wait.key),
        )
        if effect.mode == "detach":
            return Resolved(child.run_id)
        # A re-dispatch after a crash may find the child already finished.
        if child.status is Status.COMPLETED:
            return Resolved(child.output)
        if child.status.finished:
            error = child.error
            return Failed(
                type=error.type if error else "ChildFailed",
                message=error.message if error else f"child {child.run_id} {child.status}",
            )
        return Parked()


class CallHandler:
    """Runs a registered function with the effect's retry policy and timeout."""

    def __init__(self) -> None:
        # Keyed by the function object itself, weakly: an ``id()`` is reused once its
        # object is gone, and a new function would inherit the old one's answer.
        self._wants_key: weakref.WeakKeyDictionary[Callable[..., Any], bool] = (
            weakref.WeakKeyDictionary())

    def _takes_key(self, fn: Callable[..., Any]) -> bool:
        # Inspecting a signature costs microseconds; cache it per function object.
        try:
            cached = self._wants_key.get(fn)
        except TypeError:  # not weakly referenceable (or unhashable): not cached
            cached = None
        if cached is None:
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):  # builtins without a signature
                params = {}  # type: ignore[assignment]
            cached = "idempotency_key" in params
            with contextlib.suppress(TypeError):
                self._wants_key[fn] = cached
        return cached

    def handle(self, effect: Effect, run: RunState, ctx: HandlerContext) -> Outcome:
        """Call the function until it succeeds or the policy gives up."""
        assert isinstance(effect, Call) and run.wait is not None
        fn = ctx.functions.get(effect.name)
        if fn is None:
            return Failed(
                type="UnknownFunction",
                message=f"call names function {effect.name!r}, which is not registered",
            )
        args: list[Any] = effect.args if isinstance(effect.args, list) else []
        kwargs: dict[str, Any] = dict(effect.args) if isinstance(effect.args, dict) else {}
        if effect.args is not None and not isinstance(effect.args, list | dict):
            args = [effect.args]
        if self._takes_key(fn):
            kwargs["idempotency_key"] = run.wait.key
        policy = effect.retry or _SINGLE_ATTEMPT
        attempt = 0
        while True:
            attempt += 1
            try:
                # Copies for each attempt: a function that changes its arguments and then
                # fails must not hand the changed values to the retry (nor change the
                # committed request under its ledger digest).
                return Resolved(_attempt(fn, copy.deepcopy(args), copy.deepcopy(kwargs),
                                         effect.timeout))
            except Exception as exc:  # the function's failure is data for the policy
                if attempt >= policy.attempts or not policy.retries(exc):
                    return Failed(
                        type=type(exc).__qualname__,
                        message=str(exc) or repr(exc),
                        retryable=policy.retries(exc),
                    )
                ctx.sleep(policy.delay(attempt, ctx.random()))


MAX_ABANDONED_ATTEMPTS = 64
"""How many timed-out ``call`` attempts may still be running (process-wide) before further
timed attempts are refused with ``TooManyAbandonedCalls``."""

class _Abandoned:
    """The process-wide count of timed-out attempts whose thread still runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0


_abandoned = _Abandoned()


def _forget_abandoned() -> None:
    # A forked child has none of its parent's attempt threads (nor, if one held it at the
    # fork, a usable lock): its count starts at zero.
    _abandoned.lock = threading.Lock()
    _abandoned.running = 0


os.register_at_fork(after_in_child=_forget_abandoned)


class TooManyAbandonedCalls(RuntimeError):
    """A timed ``call`` attempt was not started: too many earlier ones that timed out are
    still running (see ``MAX_ABANDONED_ATTEMPTS``)."""


def _attempt(
    fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], timeout: float | None
) -> Any:
    if timeout is None:
        return fn(*args, **kwargs)
    with _abandoned.lock:
        if _abandoned.running >= MAX_ABANDONED_ATTEMPTS:
            raise TooManyAbandonedCalls(
                f"attempt not started: {_abandoned.running} earlier attempts that timed out "
                f"are still running (limit MAX_ABANDONED_ATTEMPTS={MAX_ABANDONED_ATTEMPTS})")
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the waiting thread, which re-raises it
            box["error"] = exc
        finally:
            with _abandoned.lock:
                box["done"] = True
                if "abandoned" in box:
                    _abandoned.running -= 1

    worker = threading.Thread(target=target, name="wakepoint-call", daemon=True)
    worker.start()
    worker.join(timeout)
    with _abandoned.lock:  # decided under the lock, so that the count cannot miss the end
        if "done" not in box:
            box["abandoned"] = True
            _abandoned.running += 1
    if "abandoned" in box:
        raise TimeoutError(f"call did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")
