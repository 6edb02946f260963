"""The step constructors a node returns: ``goto``, ``done``, ``fail`` and the effects.

These are thin, typed front doors to the structs in ``kernel.types``; they accept the
conveniences a person writes (seconds as numbers, a ``Workflow`` object instead of its id)
and store only persistable values.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from .types import (
    AskUser,
    Call,
    Custom,
    Done,
    Fail,
    Goto,
    Retry,
    Subworkflow,
    WaitEvent,
    WaitUntil,
)


def _delta(value: float | timedelta | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    return timedelta(seconds=value)


def goto(node: str, set: dict[str, Any] | None = None) -> Goto:
    """Continue at ``node``, first merging ``set`` into the run's vars."""
    return Goto(node=node, set=set)


def done(output: Any = None) -> Done:
    """Finish the run successfully with ``output``."""
    return Done(output=output)


def fail(reason: str) -> Fail:
    """Finish the run as FAILED with ``reason``."""
    return Fail(reason=reason)


def wait_event(
    key: str,
    *,
    into: str | None = None,
    then: str,
    deadline: datetime | None = None,
    on_timeout: str | None = None,
) -> WaitEvent:
    """Park until ``Runtime.send_event(key, payload)``; the payload lands in var ``into``.

    With a ``deadline``, the run continues at ``on_timeout`` with ``{"timed_out": True}`` in
    ``into`` once it passes (pass ``on_timeout=then`` to simply resume), or fails when
    ``on_timeout`` is None.
    """
    return WaitEvent(key=key, into=into, then=then, deadline=deadline, on_timeout=on_timeout)


def wait_until(when: datetime | timedelta | float, *, then: str) -> WaitUntil:
    """Park until ``when`` (a datetime, or a delay in seconds / timedelta from now)."""
    if isinstance(when, datetime):
        return WaitUntil(when=when, then=then)
    return WaitUntil(delay=_delta(when), then=then)


def ask_user(
    prompt: str,
    *,
    choices: list[str] | tuple[str, ...] | None = None,
    into: str | None = None,
    then: str,
    timeout: float | timedelta | None = None,
    on_timeout: str | None = None,
) -> AskUser:
    """Ask a person; ``Runtime.respond(run_id, answer)`` resumes with the answer in ``into``.

    ``choices`` restricts valid answers.  After ``timeout`` the run escalates to node
    ``on_timeout`` (or fails when it is None).
    """
    return AskUser(
        prompt=prompt,
        choices=tuple(choices) if choices is not None else None,
        into=into,
        then=then,
        timeout=_delta(timeout),
        on_timeout=on_timeout,
    )


def subworkflow(
    workflow: Any,
    input: Any = None,
    *,
    into: str | None = None,
    then: str,
    mode: Literal["wait", "detach"] = "wait",
    on_error: str | None = None,
) -> Subworkflow:
    """Start a child run of ``workflow`` (a ``Workflow`` or its id).

    ``mode="wait"`` parks until the child ends and puts its output in ``into`` (a failed child
    continues at ``on_error`` with the error in ``into``, or fails this run);
    ``mode="detach"`` continues at once with the child's run id in ``into``.
    """
    if mode not in ("wait", "detach"):
        raise ValueError(f"subworkflow mode must be 'wait' or 'detach', not {mode!r}")
    workflow_id = workflow if isinstance(workflow, str) else workflow.id
    return Subworkflow(
        workflow=workflow_id, input=input, into=into, then=then, mode=mode, on_error=on_error
    )


def call(
    name: str,
    args: dict[str, Any] | list[Any] | tuple[Any, ...] | None = None,
    *,
    into: str | None = None,
    then: str,
    retry: Retry | None = None,
    timeout: float | None = None,
    on_error: str | None = None,
) -> Call:
    """Run the registered function ``name`` with ``args``; its result lands in ``into``.

    ``args`` is a dict of keyword arguments or a list of positional ones.  The function runs
    at least once and its committed result is never recomputed; it receives the idempotency
    key ``run_id:step`` when it declares an ``idempotency_key`` parameter.
    """
    if isinstance(args, tuple):
        args = list(args)
    return Call(
        name=name, args=args, into=into, then=then, retry=retry, timeout=timeout,
        on_error=on_error,
    )


def effect(
    kind: str,
    args: Any = None,
    *,
    into: str | None = None,
    then: str,
    on_error: str | None = None,
) -> Custom:
    """An effect of a user-registered kind; the handler registered for ``kind`` runs it."""
    return Custom(kind=kind, args=args, into=into, then=then, on_error=on_error)
