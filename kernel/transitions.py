"""The pure transitions: ``start``, ``tick``, ``resume``, ``reject``, ``timeout``, ``cancel``.

Theory of operation.  Each function takes a run's state and one input and returns a
``Transition``: the new state, the effects the runtime must carry out, and one ledger entry.
They read no clock (``now`` is an argument), draw no random numbers (ids derive from the run id
and step), do no I/O and log nothing; the same arguments always give the same transition.

Whether an input is legal for a status is decided by ``kernel.table`` alone, before any work is
done.  A refused input raises and changes nothing.  A node that raises, returns something that
is not a step, or names a node that does not exist gives a FAILED state with the error's type
and message - never a half-applied state.  A value that cannot be persisted (a var, an output,
a payload) raises ``UnencodableValue`` instead, because no state containing it could be stored.

Ids and keys.  ``step`` counts transitions.  An effect requested by the transition that makes
step ``n`` waits on key ``"<run_id>:<n>"`` (timers, questions, calls and custom effects); that
key is the idempotency key of a ``call``.  A child run started at step ``n`` gets the id
``"<run_id>.<n>"``, so dispatching the same request twice starts the same child.

Entry kinds: ``run.started``, ``node.stepped``, ``effect.requested``, ``wait.resumed``,
``wait.rejected``, ``wait.timed_out``, ``timer.fired``, ``run.completed``, ``run.failed``,
``run.cancelled``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

import msgspec

from .codec import ENCODE_ERRORS, digest, encode, encode_state, explain, value_digest
from .errors import (
    InvalidAnswer,
    NotDue,
    UnencodableValue,
    UnknownWorkflow,
    VersionMismatch,
    WrongWaitKey,
)
from .table import Input, check
from .types import (
    AskUser,
    Call,
    Custom,
    Done,
    Effect,
    Entry,
    ErrorInfo,
    Fail,
    Goto,
    ParentLink,
    RunState,
    Status,
    Subworkflow,
    Transition,
    Wait,
    WaitEvent,
    WaitUntil,
    effect_kind,
)
from .workflow import Migration, RunView, Workflow

_replace = msgspec.structs.replace


def start(
    wf: Workflow,
    run_id: str,
    input: Any,
    now: datetime,
    *,
    parent: ParentLink | None = None,
) -> Transition:
    """Create a RUNNING run of ``wf`` at its start node (no node runs yet)."""
    node = wf.start_node
    payload = value_digest(input, "input of run {!r}", run_id)
    state = RunState(
        run_id=run_id,
        workflow=wf.id,
        version=wf.logic_id,
        status=Status.RUNNING,
        node=node,
        input=input,
        parent=parent,
        step=1,
        created_at=now,
        updated_at=now,
    )
    return _emit(state, "run.started", None, node, payload=payload)


def tick(wf: Workflow, state: RunState, now: datetime) -> Transition:
    """Run exactly one node of a RUNNING run and apply the step it returns."""
    allowed = check(state.run_id, state.status, "tick")
    if state.version != wf.logic_id or state.workflow != wf.id:  # the common case skips a call
        state = _current_logic(wf, state)
    node: str = state.node  # type: ignore[assignment]  # RUNNING runs always have a node
    fn = wf.nodes.get(node)
    if fn is None:
        return _failed(state, now, "UnknownNode", f"workflow {wf.id!r} has no node {node!r}")
    if state.step >= wf.max_steps:
        return _failed(
            state, now, "MaxStepsExceeded", f"run reached max_steps={wf.max_steps} at {node!r}"
        )
    view = RunView(
        run_id=state.run_id,
        workflow=state.workflow,
        node=node,
        input=state.input,
        vars=MappingProxyType(state.vars),
        now=now,
        step=state.step,
    )
    try:
        # Typed as object: a node is user code and may return anything.
        result: object = fn(view)
    except Exception as exc:  # a node's exception is data: the run fails, the kernel does not
        return _failed(state, now, type(exc).__qualname__, str(exc))
    step = state.step + 1

    if isinstance(result, Goto):
        if not wf.check_target(result.node):
            return _unknown_target(wf, state, now, result.node)
        new_vars = state.vars if not result.set else {**state.vars, **result.set}
        new = _replace(state, node=result.node, vars=new_vars, step=step, updated_at=now)
        assert new.status in allowed
        return _emit(new, "node.stepped", node, result.node)
    if isinstance(result, Done):
        output = result.output
        if isinstance(output, MappingProxyType):  # ``done(run.vars)``: store a plain dict
            output = dict(output)
        new = _replace(state, status=Status.COMPLETED, output=output, step=step, updated_at=now)
        payload = value_digest(output, "output of node {!r} of run {!r}", node, state.run_id)
        return _emit(new, "run.completed", node, None, payload=payload)
    if isinstance(result, Fail):
        reason: object = result.reason  # typed str, but a node may pass anything
        if not isinstance(reason, str):
            return _failed(state, now, "InvalidStep", f"node {node!r} returned fail() with a "
                           f"{type(reason).__name__} reason; it must be a str")
        return _failed(state, now, "Fail", reason)
    if isinstance(result, WaitEvent | WaitUntil | AskUser | Subworkflow | Call | Custom):
        return _request(wf, state, now, node, step, result)
    return _failed(
        state, now, "InvalidStep", f"node {node!r} returned {result!r}, which is not a step"
    )


def resume(wf: Workflow, state: RunState, key: str, payload: Any, now: datetime) -> Transition:
    """Deliver ``payload`` to a WAITING run waiting on ``key``; it continues at ``wait.then``."""
    check(state.run_id, state.status, "resume")
    # Refuse other logic without a migration, but do not migrate here: a migration maps the
    # node a run continues at, and a waiting run continues at ``wait.then``, which the
    # migration only sees at the next tick (as ``timeout`` and ``reject`` runs do).
    _migration_for(wf, state)
    wait = _wait_on(state, key)
    if wait.kind == "user" and wait.choices is not None and payload not in wait.choices:
        raise InvalidAnswer(state.run_id, payload, wait.choices)
    digest = value_digest(payload, "payload for key {!r} of run {!r}", key, state.run_id)
    return _continue(state, now, wait.then, wait.into, payload, "wait.resumed", key, digest)


def reject(state: RunState, key: str, error: ErrorInfo, now: datetime) -> Transition:
    """The effect a WAITING run waits on failed: continue at ``on_error`` or fail the run."""
    check(state.run_id, state.status, "reject")
    wait = _wait_on(state, key)
    if wait.on_error is None:
        return _failed(
            state, now, error.type, error.message, retryable=error.retryable, key=key
        )
    value = {"error": {"type": error.type, "message": error.message}}
    return _continue(state, now, wait.on_error, wait.into, value, "wait.rejected", key, None)


def timeout(state: RunState, now: datetime) -> Transition:
    """The wait's deadline has passed: a timer fires, a question escalates, or the run fails."""
    check(state.run_id, state.status, "timeout")
    wait: Wait = state.wait  # type: ignore[assignment]  # WAITING runs always have a wait
    if wait.deadline is None or now < wait.deadline:
        raise NotDue(
            f"run {state.run_id!r}: wait {wait.key!r} is not due "
            f"(deadline {wait.deadline}, now {now})"
        )
    if wait.kind == "timer":
        return _continue(state, now, wait.then, None, None, "timer.fired", wait.key, None)
    if wait.on_timeout is None:
        return _failed(
            state, now, "Timeout", f"wait {wait.key!r} passed its deadline {wait.deadline}",
            key=wait.key,
        )
    return _continue(
        state, now, wait.on_timeout, wait.into, {"timed_out": True}, "wait.timed_out",
        wait.key, None,
    )


NO_CASCADE = "no-cascade"
"""The ``key`` of a ``run.cancelled`` entry whose cancel leaves the run's children running."""


def cancel(state: RunState, reason: str, now: datetime, *, cascade: bool = True) -> Transition:
    """Cancel a RUNNING or WAITING run (children are the runtime's to cascade to).

    ``cascade=False`` is recorded in the entry (``key`` = ``NO_CASCADE``), so that a
    recovery finishing cascades a crash cut short leaves this run's children alone."""
    if not isinstance(reason, str):
        raise TypeError(f"cancel reason must be a str, not {type(reason).__name__}")
    check(state.run_id, state.status, "cancel")
    new = _replace(
        state,
        status=Status.CANCELLED,
        wait=None,
        error=ErrorInfo(type="Cancelled", message=reason, node=state.node),
        step=state.step + 1,
        updated_at=now,
    )
    return _emit(new, "run.cancelled", state.node, None, key=None if cascade else NO_CASCADE)


# --- helpers -------------------------------------------------------------------------------


def _malformed(eff: Effect) -> str | None:
    """What is wrong with an effect request's fields, or None.  The structs check no types
    when built (a node may pass an int for a key): the request is converted back to its own
    type, as a stored one will be decoded.  A value with no encoding at all is left to
    ``value_digest`` (``UnencodableValue``)."""
    try:
        plain = msgspec.to_builtins(eff, builtin_types=(datetime, timedelta))
    except ENCODE_ERRORS:
        return None
    try:
        msgspec.convert(plain, type(eff))
    except msgspec.ValidationError as exc:
        return str(exc)
    for name in ("deadline", "when"):
        value = getattr(eff, name, None)
        if isinstance(value, datetime) and value.utcoffset() is None:
            return f"{name} {value.isoformat()} has no time zone (use an aware datetime)"
    return None


def _migration_for(wf: Workflow, state: RunState) -> Migration | None:
    """The migration ``state`` needs under ``wf`` (None: none needed); raise if it has none."""
    if state.workflow != wf.id:
        raise UnknownWorkflow(state.workflow)
    if state.version == wf.logic_id:
        return None
    migrate = wf.migration_from(state.version)
    if migrate is None:
        raise VersionMismatch(state.run_id, wf.id, state.version, wf.logic_id)
    return migrate


def _current_logic(wf: Workflow, state: RunState) -> RunState:
    """``state`` (of other logic than ``wf``'s) migrated to ``wf``'s current logic id.

    Raises ``UnknownWorkflow`` or ``VersionMismatch`` when it cannot be; ``tick`` calls it only
    when the workflow or the logic id differs, so a migration is always found or refused.
    """
    migrate = _migration_for(wf, state)
    assert migrate is not None  # the logic ids differ, so "no migration needed" is impossible
    node, new_vars = migrate(state.node, dict(state.vars))
    return _replace(state, node=node, vars=new_vars, version=wf.logic_id)


def _wait_on(state: RunState, key: str) -> Wait:
    wait: Wait = state.wait  # type: ignore[assignment]  # WAITING runs always have a wait
    if key != wait.key:
        raise WrongWaitKey(state.run_id, wait.key, key)
    return wait


def _continue(
    state: RunState,
    now: datetime,
    node: str,
    into: str | None,
    value: Any,
    kind: str,
    key: str,
    payload: str | None,
) -> Transition:
    """Leave the wait and continue at ``node`` with ``value`` stored in var ``into``."""
    new_vars = state.vars if into is None else {**state.vars, into: value}
    new = _replace(
        state, status=Status.RUNNING, node=node, wait=None, vars=new_vars,
        step=state.step + 1, updated_at=now,
    )
    return _emit(new, kind, state.node, node, key=key, payload=payload)


def _request(
    wf: Workflow, state: RunState, now: datetime, node: str, step: int, eff: Effect
) -> Transition:
    """Park the run on the wait that ``eff`` opens and hand ``eff`` to the runtime."""
    problem = _malformed(eff)
    if problem is not None:
        # Stored as it is, a wrong-typed field would make the run unreadable (the state no
        # longer decodes) and a naive deadline would break every comparison of deadlines.
        return _failed(state, now, "InvalidStep", f"node {node!r} returned an invalid "
                       f"{effect_kind(eff)} request: {problem}")
    for target in (eff.then, getattr(eff, "on_timeout", None), getattr(eff, "on_error", None)):
        if target is not None and not wf.check_target(target):
            return _unknown_target(wf, state, now, target)
    key = f"{state.run_id}:{step}"
    children = state.children
    if isinstance(eff, WaitEvent):
        wait = Wait(
            kind="event", key=eff.key, then=eff.then, into=eff.into, deadline=eff.deadline,
            on_timeout=eff.on_timeout, effect=eff,
        )
    elif isinstance(eff, WaitUntil):
        when = eff.when if eff.when is not None else now + (eff.delay or timedelta())
        eff = _replace(eff, when=when, delay=None)
        wait = Wait(kind="timer", key=key, then=eff.then, deadline=when, effect=eff)
    elif isinstance(eff, AskUser):
        deadline = now + eff.timeout if eff.timeout is not None else None
        eff = _replace(eff, deadline=deadline)
        wait = Wait(
            kind="user", key=key, then=eff.then, into=eff.into, deadline=deadline,
            on_timeout=eff.on_timeout, prompt=eff.prompt, choices=eff.choices, effect=eff,
        )
    elif isinstance(eff, Subworkflow):
        child = f"{state.run_id}.{step}"
        eff = _replace(eff, run_id=child)
        children = (*children, child)
        # A waited-for child is awaited under its run id; a detached one only has to be
        # started, which the handler reports like any other effect.
        wait = Wait(
            kind="child" if eff.mode == "wait" else "effect",
            key=child if eff.mode == "wait" else key,
            then=eff.then, into=eff.into, on_error=eff.on_error, effect=eff,
        )
    else:  # Call | Custom
        wait = Wait(
            kind="effect", key=key, then=eff.then, into=eff.into, on_error=eff.on_error,
            effect=eff,
        )
    payload = value_digest(
        eff, "arguments of the {} effect of node {!r} of run {!r}", effect_kind(eff), node,
        state.run_id,
    )
    new = _replace(
        state, status=Status.WAITING, wait=wait, children=children, step=step, updated_at=now
    )
    return _emit(
        new, "effect.requested", node, eff.then, effect=effect_kind(eff), key=wait.key,
        payload=payload, effects=(eff,),
    )


def _unknown_target(wf: Workflow, state: RunState, now: datetime, target: str) -> Transition:
    return _failed(
        state, now, "UnknownNode",
        f"node {state.node!r} targets {target!r}, which is not a node of workflow {wf.id!r}",
    )


def _failed(
    state: RunState,
    now: datetime,
    error_type: str,
    message: str,
    *,
    retryable: bool = False,
    key: str | None = None,
) -> Transition:
    new = _replace(
        state,
        status=Status.FAILED,
        wait=None,
        error=ErrorInfo(type=error_type, message=message, node=state.node, retryable=retryable),
        step=state.step + 1,
        updated_at=now,
    )
    return _emit(new, "run.failed", state.node, None, key=key)


def _emit(
    new: RunState,
    kind: str,
    node: str | None,
    next_node: str | None,
    *,
    effect: str | None = None,
    key: str | None = None,
    payload: str | None = None,
    effects: tuple[Effect, ...] = (),
) -> Transition:
    """Seal a transition: digest the new state (proving it can be stored) and make the entry."""
    try:
        data = encode_state(new)
    except ENCODE_ERRORS as exc:
        raise _unencodable(new, node, exc) from None
    entry = Entry(
        kind=kind, node=node, next=next_node, effect=effect, key=key, payload=payload,
        state=digest(data),
    )
    return Transition(state=new, effects=effects, entries=(entry,))


def _unencodable(state: RunState, node: str | None, exc: BaseException) -> UnencodableValue:
    # Each var is tried on its own: trying it inside the state would blame the first var for
    # a value elsewhere in the state (a ``fail``/``cancel`` reason that is not a string).
    for name, value in state.vars.items():
        try:
            encode({name: value})
        except ENCODE_ERRORS as inner:
            return UnencodableValue(
                f"var {name!r} of run {state.run_id!r} (set at node {node!r})",
                explain(value, inner),
            )
    return UnencodableValue(f"state of run {state.run_id!r}", str(exc))


__all__ = ["NO_CASCADE", "Input", "cancel", "reject", "resume", "start", "tick", "timeout"]
