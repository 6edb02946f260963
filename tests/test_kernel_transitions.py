"""The transition functions: what each input does to a run, and what it refuses.

Every transition is checked for its one ledger entry, whose ``state`` digest must be the SHA-256
of ``codec.encode_state`` of the new state (``_sealed``).  Refusals are checked to leave the
input state equal to a copy taken before.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from wakepoint.kernel import (
    Call,
    Custom,
    ErrorInfo,
    InvalidAnswer,
    NotDue,
    ParentLink,
    Retry,
    RunState,
    RunView,
    Status,
    Step,
    Subworkflow,
    Transition,
    UnencodableValue,
    UnknownWorkflow,
    VersionMismatch,
    Wait,
    WaitUntil,
    Workflow,
    WorkflowDefinitionError,
    WrongWaitKey,
    ask_user,
    call,
    cancel,
    done,
    effect,
    fail,
    goto,
    reject,
    resume,
    start,
    subworkflow,
    tick,
    timeout,
    wait_event,
    wait_until,
)
from wakepoint.kernel.codec import decode_state, encode, encode_state

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
DEADLINE = NOW + timedelta(hours=1)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sealed(t: Transition) -> Transition:
    """Check that the transition has one entry whose digest is that of the new state."""
    assert len(t.entries) == 1
    assert t.entries[0].state == _sha(encode_state(t.state))
    return t


def _one(first: Callable[[RunView], Any], *, wf_id: str = "t", max_steps: int = 10_000) -> Workflow:
    """A workflow whose start node ``a`` is ``first``; nodes b, c and err finish with the vars."""
    wf = Workflow(wf_id, max_steps=max_steps)
    wf.node(first, start=True, name="a")
    for name in ("b", "c", "err"):
        wf.node(lambda run: done(dict(run.vars)), name=name)
    return wf


def _begun(wf: Workflow, run_input: Any = None, run_id: str = "r") -> RunState:
    return _sealed(start(wf, run_id, run_input, NOW)).state


def _waiting(step: Callable[[RunView], Any], run_input: Any = None) -> tuple[Workflow, Transition]:
    """Start a run of ``_one(step)`` and tick it once: the node's effect parks it."""
    wf = _one(step)
    t = _sealed(tick(wf, _begun(wf, run_input), NOW))
    assert t.state.status is Status.WAITING
    return wf, t


def _unchanged_after(
    call_: Callable[[], object], state: RunState, exc: type[BaseException]
) -> str:
    """Run ``call_``, expect ``exc``, check ``state`` equals its copy; return the message."""
    before = copy.deepcopy(state)
    with pytest.raises(exc) as info:
        call_()
    assert state == before
    return str(info.value)


# --- start -----------------------------------------------------------------------------------


def test_start_creates_a_running_run_at_the_start_node() -> None:
    """start: RUNNING at the start node, step 1, logic id and input kept, ``run.started``."""
    wf = _one(lambda run: done())
    t = _sealed(start(wf, "r1", {"n": 1}, NOW))
    s = t.state
    assert (s.run_id, s.workflow, s.version, s.status, s.node) == (
        "r1", "t", wf.logic_id, Status.RUNNING, "a",
    )
    assert (s.input, s.vars, s.step, s.created_at, s.updated_at) == ({"n": 1}, {}, 1, NOW, NOW)
    assert (s.wait, s.output, s.error, s.parent, s.children) == (None, None, None, None, ())
    assert t.effects == ()
    (entry,) = t.entries
    assert (entry.kind, entry.node, entry.next, entry.effect, entry.key) == (
        "run.started", None, "a", None, None,
    )
    assert entry.payload == _sha(encode({"n": 1}))


def test_start_records_the_parent_link() -> None:
    """A child run keeps the parent's run id and wait key it was started for."""
    link = ParentLink(run_id="p", key="p.2")
    assert _sealed(start(_one(lambda run: done()), "p.2", None, NOW, parent=link)).state.parent == (
        link
    )


def test_start_without_a_start_node_is_refused() -> None:
    """A workflow with no start node cannot start a run."""
    wf = Workflow("nostart")
    wf.node(lambda run: done(), name="a")
    with pytest.raises(WorkflowDefinitionError, match="no start node"):
        start(wf, "r", None, NOW)


# --- tick --------------------------------------------------------------------------------------


def test_tick_goto_merges_vars_and_moves_to_the_target() -> None:
    """goto: vars merged (new keys added, old ones overwritten), node moves, ``node.stepped``."""

    def a(run: RunView) -> Step:
        if run.step == 1:
            return goto("a", set={"x": 1, "y": 1})
        return goto("b", set={"y": 2, "z": 3})

    wf = _one(a)
    first = _sealed(tick(wf, _begun(wf), NOW)).state
    t = _sealed(tick(wf, first, LATER))
    s = t.state
    assert (s.status, s.node, s.vars, s.step, s.updated_at) == (
        Status.RUNNING, "b", {"x": 1, "y": 2, "z": 3}, 3, LATER,
    )
    assert first.vars == {"x": 1, "y": 1}  # the earlier state is not touched
    (entry,) = t.entries
    assert (entry.kind, entry.node, entry.next, entry.payload) == ("node.stepped", "a", "b", None)
    assert t.effects == ()


def test_tick_goto_without_set_keeps_vars() -> None:
    """goto without ``set`` (or with an empty one) leaves vars as they were."""
    wf = _one(lambda run: goto("b", set={}) if run.input else goto("b"))
    for run_input in (True, False):
        assert _sealed(tick(wf, _begun(wf, run_input), NOW)).state.vars == {}


def test_node_sees_a_read_only_view_of_the_run() -> None:
    """The node gets run id, workflow, node, input, step, the caller's ``now`` and a read-only
    view of the vars."""
    seen: list[RunView] = []

    def a(run: RunView) -> Step:
        seen.append(run)
        with pytest.raises(TypeError):
            run.vars["x"] = 2  # type: ignore[index]
        return goto("b")

    wf = _one(a)
    state = msgspec.structs.replace(_begun(wf, [1]), vars={"x": 1})
    _sealed(tick(wf, state, LATER))
    (view,) = seen
    assert (view.run_id, view.workflow, view.node, view.input, view.step, view.now) == (
        "r", "t", "a", [1], 1, LATER,
    )
    assert dict(view.vars) == {"x": 1}
    assert repr(view) == "RunView(run_id='r', node='a', step=1)"
    with pytest.raises(AttributeError):
        view.extra = 1  # type: ignore[attr-defined]


def test_tick_done_completes_with_output() -> None:
    """done: COMPLETED with the output, ``run.completed`` with the output's digest."""
    wf = _one(lambda run: done({"total": 3}))
    t = _sealed(tick(wf, _begun(wf), LATER))
    assert (t.state.status, t.state.output, t.state.step, t.state.updated_at) == (
        Status.COMPLETED, {"total": 3}, 2, LATER,
    )
    (entry,) = t.entries
    assert (entry.kind, entry.node, entry.next) == ("run.completed", "a", None)
    assert entry.payload == _sha(encode({"total": 3}))


def test_tick_fail_fails_with_the_reason() -> None:
    """fail: FAILED with error type ``Fail``, the reason and the node; ``run.failed``."""
    wf = _one(lambda run: fail("out of stock"))
    t = _sealed(tick(wf, _begun(wf), NOW))
    assert t.state.status is Status.FAILED
    assert t.state.error == ErrorInfo(type="Fail", message="out of stock", node="a")
    assert (t.entries[0].kind, t.entries[0].node, t.entries[0].next) == ("run.failed", "a", None)


class _Boom(Exception):
    pass


def test_node_that_raises_fails_the_run_and_changes_nothing_else() -> None:
    """An exception in a node gives FAILED with its type name and message; vars, node, input,
    output and children stay as they were."""

    def a(run: RunView) -> Step:
        raise _Boom("card declined")

    wf = _one(a)
    state = msgspec.structs.replace(_begun(wf, {"n": 1}), vars={"kept": True})
    t = _sealed(tick(wf, state, LATER))
    assert t.state.error == ErrorInfo(type="_Boom", message="card declined", node="a")
    assert t.state == msgspec.structs.replace(
        state, status=Status.FAILED, error=t.state.error, step=2, updated_at=LATER
    )
    assert t.effects == ()


def test_interrupt_in_a_node_propagates() -> None:
    """A BaseException that is not an Exception (KeyboardInterrupt) is not turned into a failure."""

    def a(run: RunView) -> Step:
        raise KeyboardInterrupt

    wf = _one(a)
    state = _begun(wf)
    _unchanged_after(lambda: tick(wf, state, NOW), state, KeyboardInterrupt)


def test_node_returning_a_non_step_fails_with_invalid_step() -> None:
    """A node that returns something that is not a step fails the run with ``InvalidStep``."""
    wf = _one(lambda run: "next please")
    t = _sealed(tick(wf, _begun(wf), NOW))
    assert t.state.status is Status.FAILED
    assert t.state.error is not None
    assert t.state.error.type == "InvalidStep"
    assert "'a'" in t.state.error.message
    assert "'next please'" in t.state.error.message


@pytest.mark.parametrize(
    ("step", "named"),
    [
        (wait_event(123, then="b"), "Expected `str`, got `int` - at `$.key`"),  # type: ignore[arg-type]
        (ask_user("ok?", choices=[1, 2], then="b"), "at `$.choices[0]`"),  # type: ignore[list-item]
        (ask_user(5, then="b"), "at `$.prompt`"),  # type: ignore[arg-type]
        (call("f", then="b", timeout="soon"), "at `$.timeout`"),  # type: ignore[arg-type]
        (wait_event("k", then="b", deadline=datetime(2030, 1, 1)), "deadline 2030-01-01T00:00:00 "
         "has no time zone"),
        (wait_until(datetime(2030, 1, 1), then="b"), "when 2030-01-01T00:00:00 has no time zone"),
    ],
    ids=["event-key", "choices", "prompt", "call-timeout", "naive-deadline", "naive-when"],
)
def test_an_effect_request_with_wrong_typed_fields_fails_the_run(step: Step, named: str) -> None:
    """The step structs check no types when built; stored as it is, a wrong-typed field
    would make the run's state undecodable and a naive deadline break every comparison of
    deadlines.  The run fails with ``InvalidStep`` naming the field; nothing is requested."""
    wf = _one(lambda run: step)
    t = _sealed(tick(wf, _begun(wf), NOW))
    assert t.state.status is Status.FAILED and t.effects == ()
    assert t.state.error is not None and t.state.error.type == "InvalidStep"
    assert named in t.state.error.message
    assert decode_state(encode_state(t.state)) == t.state  # readable as stored


def test_an_unencodable_effect_argument_is_still_unencodable_value() -> None:
    """The type check leaves values with no encoding at all to ``UnencodableValue``."""
    wf = _one(lambda run: call("f", (object(),), then="b"))
    with pytest.raises(UnencodableValue, match="arguments of the call effect"):
        tick(wf, _begun(wf), NOW)


def test_fail_with_a_non_str_reason_fails_with_invalid_step() -> None:
    wf = _one(lambda run: fail(123))  # type: ignore[arg-type]
    t = _sealed(tick(wf, _begun(wf), NOW))
    assert t.state.error is not None and t.state.error.type == "InvalidStep"
    assert "int reason" in t.state.error.message
    assert decode_state(encode_state(t.state)) == t.state


def test_cancel_with_a_non_str_reason_is_a_type_error() -> None:
    wf = _one(lambda run: done())
    state = _begun(wf)
    before = copy.deepcopy(state)
    with pytest.raises(TypeError, match="cancel reason must be a str, not int"):
        cancel(state, 123, NOW)  # type: ignore[arg-type]
    assert state == before


@pytest.mark.parametrize(
    "step",
    [
        goto("nowhere", set={"x": 1}),
        wait_event("k", then="nowhere"),
        wait_event("k", then="b", deadline=DEADLINE, on_timeout="nowhere"),
        ask_user("ok?", then="b", timeout=5, on_timeout="nowhere"),
        call("f", then="b", on_error="nowhere"),
        effect("mail", then="b", on_error="nowhere"),
        subworkflow("child", then="b", on_error="nowhere"),
    ],
    ids=["goto", "then", "event-on_timeout", "ask-on_timeout", "call-on_error",
         "custom-on_error", "child-on_error"],
)
def test_unknown_target_fails_the_run_naming_it(step: Step) -> None:
    """goto/then/on_timeout/on_error naming no node: FAILED ``UnknownNode`` naming node and
    target; no var is set and no effect is requested."""
    wf = _one(lambda run: step)
    t = _sealed(tick(wf, _begun(wf), NOW))
    assert t.state.status is Status.FAILED
    assert t.state.error is not None
    assert t.state.error.type == "UnknownNode"
    assert "'nowhere'" in t.state.error.message
    assert "node 'a'" in t.state.error.message
    assert (t.state.vars, t.state.wait, t.state.children, t.effects) == ({}, None, (), ())


def test_max_steps_stops_a_cycle() -> None:
    """A cycle runs until ``step`` reaches ``max_steps``; then the run fails
    ``MaxStepsExceeded``."""
    wf = Workflow("loop", max_steps=5)
    wf.node(lambda run: goto("pong"), start=True, name="ping")
    wf.node(lambda run: goto("ping"), name="pong")
    state = _begun(wf)
    ticks = 0
    while state.status is Status.RUNNING:
        state = _sealed(tick(wf, state, NOW)).state
        ticks += 1
    assert ticks == 5  # four node runs (at steps 1..4), then the refusal at step 5
    assert state.status is Status.FAILED
    assert state.error is not None
    assert state.error.type == "MaxStepsExceeded"
    assert "max_steps=5" in state.error.message
    assert state.error.node == "ping"


# --- effects -----------------------------------------------------------------------------------


def test_wait_event_waits_on_the_event_key() -> None:
    """wait_event: WAITING on the event key itself, with deadline and on_timeout kept."""
    step = wait_event("order-7", into="evt", then="b", deadline=DEADLINE, on_timeout="c")
    _, t = _waiting(lambda run: step)
    assert t.state.wait == Wait(
        kind="event", key="order-7", then="b", into="evt", deadline=DEADLINE, on_timeout="c",
        effect=step,
    )
    assert t.effects == (step,)
    assert (t.state.node, t.state.step) == ("a", 2)  # the node that opened the wait
    (entry,) = t.entries
    assert (entry.kind, entry.node, entry.next, entry.effect, entry.key) == (
        "effect.requested", "a", "b", "wait_event", "order-7",
    )
    assert entry.payload == _sha(encode(step))


@pytest.mark.parametrize("delay", [90, 90.0, timedelta(seconds=90)])
def test_wait_until_with_a_delay_is_due_at_now_plus_delay(delay: float | timedelta) -> None:
    """wait_until(delay): a timer on ``run_id:step`` due at ``now + delay``; the effect carries
    the absolute time and no delay."""
    _, t = _waiting(lambda run: wait_until(delay, then="b"))
    due = NOW + timedelta(seconds=90)
    (eff,) = t.effects
    assert eff == WaitUntil(when=due, delay=None, then="b")
    assert t.state.wait == Wait(kind="timer", key="r:2", then="b", deadline=due, effect=eff)
    assert (t.entries[0].effect, t.entries[0].key) == ("wait_until", "r:2")


def test_wait_until_with_a_datetime_keeps_it() -> None:
    """wait_until(datetime): the deadline is that datetime, whatever ``now`` is."""
    when = datetime(2030, 1, 1, tzinfo=UTC)
    _, t = _waiting(lambda run: wait_until(when, then="b"))
    assert t.state.wait is not None
    assert t.state.wait.deadline == when
    assert t.effects == (WaitUntil(when=when, then="b"),)


def test_wait_until_without_when_or_delay_is_due_now() -> None:
    """A bare ``WaitUntil(then=...)`` is due at once (``now``)."""
    _, t = _waiting(lambda run: WaitUntil(then="b"))
    assert t.state.wait is not None
    assert t.state.wait.deadline == NOW


def test_ask_user_timeout_becomes_a_deadline() -> None:
    """ask_user(timeout=...): a ``user`` wait on ``run_id:step`` with deadline ``now + timeout``,
    prompt and choices kept."""
    step = ask_user("Ship it?", choices=["yes", "no"], into="answer", then="b", timeout=60,
                    on_timeout="c")
    _, t = _waiting(lambda run: step)
    deadline = NOW + timedelta(seconds=60)
    (eff,) = t.effects
    assert eff == msgspec.structs.replace(step, deadline=deadline)
    assert t.state.wait == Wait(
        kind="user", key="r:2", then="b", into="answer", deadline=deadline, on_timeout="c",
        prompt="Ship it?", choices=("yes", "no"), effect=eff,
    )
    assert t.entries[0].effect == "ask_user"


def test_ask_user_without_timeout_has_no_deadline() -> None:
    """ask_user without timeout waits forever (no deadline)."""
    _, t = _waiting(lambda run: ask_user("?", then="b"))
    assert t.state.wait is not None
    assert t.state.wait.deadline is None
    assert t.effects[0].deadline is None  # type: ignore[union-attr]


def test_subworkflow_wait_parks_on_the_child_id() -> None:
    """subworkflow(mode="wait"): the child id is ``run_id.step``, the wait is a ``child`` wait on
    that id, and the child is listed in ``children``."""
    child = Workflow("child-wf")
    step = subworkflow(child, {"n": 1}, into="res", then="b", on_error="err")
    _, t = _waiting(lambda run: step)
    (eff,) = t.effects
    assert eff == msgspec.structs.replace(step, run_id="r.2")
    assert t.state.wait == Wait(
        kind="child", key="r.2", then="b", into="res", on_error="err", effect=eff,
    )
    assert t.state.children == ("r.2",)
    assert (t.entries[0].effect, t.entries[0].key) == ("subworkflow", "r.2")


def test_subworkflow_detach_parks_on_an_effect_key() -> None:
    """subworkflow(mode="detach"): an ``effect`` wait on ``run_id:step`` (the start of the
    child), the child still gets id ``run_id.step`` and is listed."""
    _, t = _waiting(lambda run: subworkflow("child-wf", then="b", mode="detach"))
    (eff,) = t.effects
    assert isinstance(eff, Subworkflow)
    assert eff.run_id == "r.2"
    assert t.state.wait is not None
    assert (t.state.wait.kind, t.state.wait.key) == ("effect", "r:2")
    assert t.state.children == ("r.2",)


def test_children_accumulate() -> None:
    """Each subworkflow adds its child id to ``children``, oldest first."""

    def a(run: RunView) -> Step:
        return subworkflow("child-wf", then="a", mode="detach" if run.step == 1 else "wait")

    wf = _one(a)
    state = _sealed(tick(wf, _begun(wf), NOW)).state
    state = _sealed(resume(wf, state, "r:2", "r.2", NOW)).state
    state = _sealed(tick(wf, state, NOW)).state
    assert state.children == ("r.2", "r.4")
    assert state.wait is not None
    assert state.wait.key == "r.4"


def test_call_waits_on_its_idempotency_key() -> None:
    """call: an ``effect`` wait on ``run_id:step`` with into/then/on_error; the effect is handed
    out as given (args as a list, retry and timeout kept)."""
    policy = Retry(attempts=5)
    step = call("charge", (10, "EUR"), into="receipt", then="b", retry=policy, timeout=2.5,
                on_error="err")
    _, t = _waiting(lambda run: step)
    assert t.effects == (Call(name="charge", args=[10, "EUR"], into="receipt", then="b",
                              retry=policy, timeout=2.5, on_error="err"),)
    assert t.state.wait == Wait(
        kind="effect", key="r:2", then="b", into="receipt", on_error="err", effect=step,
    )
    assert (t.entries[0].effect, t.entries[0].key) == ("call", "r:2")


def test_custom_effect_waits_on_its_key() -> None:
    """A custom effect: an ``effect`` wait on ``run_id:step``; the entry names its kind."""
    step = effect("email", {"to": "a@b.c"}, into="sent", then="b")
    _, t = _waiting(lambda run: step)
    assert t.effects == (Custom(kind="email", args={"to": "a@b.c"}, into="sent", then="b"),)
    assert t.state.wait is not None
    assert (t.state.wait.kind, t.state.wait.key, t.state.wait.into) == ("effect", "r:2", "sent")
    assert t.entries[0].effect == "email"


# --- resume ------------------------------------------------------------------------------------


def test_resume_stores_payload_and_continues_at_then() -> None:
    """resume: the payload lands in var ``into``, the run continues RUNNING at ``then``, the wait
    is gone, and ``wait.resumed`` carries the key and the payload's digest."""
    wf, t = _waiting(lambda run: wait_event("paid", into="payment", then="b"))
    waiting = msgspec.structs.replace(t.state, vars={"kept": 1})
    r = _sealed(resume(wf, waiting, "paid", {"amount": 5}, LATER))
    assert (r.state.status, r.state.node, r.state.wait, r.state.step, r.state.updated_at) == (
        Status.RUNNING, "b", None, 3, LATER,
    )
    assert r.state.vars == {"kept": 1, "payment": {"amount": 5}}
    (entry,) = r.entries
    assert (entry.kind, entry.node, entry.next, entry.key) == ("wait.resumed", "a", "b", "paid")
    assert entry.payload == _sha(encode({"amount": 5}))
    assert r.effects == ()


def test_resume_without_into_keeps_vars() -> None:
    """A wait without ``into`` drops the payload: vars are unchanged."""
    wf, t = _waiting(lambda run: wait_event("go", then="b"))
    assert _sealed(resume(wf, t.state, "go", "ignored", NOW)).state.vars == {}


def test_resume_with_the_wrong_key_names_both_keys() -> None:
    """resume or reject on a key the run does not wait on raises ``WrongWaitKey`` naming both
    keys, and changes nothing."""
    wf, t = _waiting(lambda run: wait_event("right", then="b"))
    state = t.state
    message = _unchanged_after(lambda: resume(wf, state, "wrong", 1, NOW), state, WrongWaitKey)
    assert "'right'" in message
    assert "'wrong'" in message
    with pytest.raises(WrongWaitKey) as info:
        reject(state, "wrong", ErrorInfo(type="E", message="m"), NOW)
    assert (info.value.run_id, info.value.expected, info.value.got) == ("r", "right", "wrong")


def test_resume_answer_outside_choices_is_refused() -> None:
    """An answer that is not one of ``choices`` raises ``InvalidAnswer`` and changes nothing."""
    wf, t = _waiting(lambda run: ask_user("?", choices=("yes", "no"), into="ans", then="b"))
    state = t.state
    message = _unchanged_after(
        lambda: resume(wf, state, "r:2", "maybe", NOW), state, InvalidAnswer
    )
    assert "'maybe'" in message
    assert "['yes', 'no']" in message
    assert _sealed(resume(wf, state, "r:2", "no", NOW)).state.vars == {"ans": "no"}


def test_resume_without_choices_accepts_any_answer() -> None:
    """A question without choices accepts any encodable answer."""
    wf, t = _waiting(lambda run: ask_user("?", into="ans", then="b"))
    r = _sealed(resume(wf, t.state, "r:2", {"free": ["text", 1]}, NOW))
    assert r.state.vars == {"ans": {"free": ["text", 1]}}


# --- reject ------------------------------------------------------------------------------------


def test_reject_continues_at_on_error_with_the_error() -> None:
    """reject with ``on_error``: RUNNING at on_error with ``{"error": {type, message}}`` in
    ``into``; ``wait.rejected`` names the key."""
    _, t = _waiting(lambda run: call("charge", into="receipt", then="b", on_error="err"))
    error = ErrorInfo(type="CardDeclined", message="no funds", retryable=True)
    r = _sealed(reject(t.state, "r:2", error, LATER))
    assert (r.state.status, r.state.node, r.state.wait, r.state.step) == (
        Status.RUNNING, "err", None, 3,
    )
    assert r.state.vars == {"receipt": {"error": {"type": "CardDeclined", "message": "no funds"}}}
    (entry,) = r.entries
    assert (entry.kind, entry.node, entry.next, entry.key, entry.payload) == (
        "wait.rejected", "a", "err", "r:2", None,
    )


def test_reject_without_on_error_fails_with_the_error() -> None:
    """reject without ``on_error``: FAILED with the error's type, message and retryable flag."""
    _, t = _waiting(lambda run: call("charge", into="receipt", then="b"))
    error = ErrorInfo(type="Timeout", message="slow", retryable=True)
    r = _sealed(reject(t.state, "r:2", error, LATER))
    assert r.state.status is Status.FAILED
    assert r.state.error == ErrorInfo(type="Timeout", message="slow", node="a", retryable=True)
    assert (r.state.wait, r.state.vars) == (None, {})
    assert (r.entries[0].kind, r.entries[0].key) == ("run.failed", "r:2")


# --- timeout -----------------------------------------------------------------------------------


def test_timeout_before_the_deadline_is_not_due() -> None:
    """timeout before the deadline raises ``NotDue`` and changes nothing; at it, it applies."""
    _, t = _waiting(lambda run: wait_event("e", then="b", deadline=DEADLINE, on_timeout="c"))
    state = t.state
    message = _unchanged_after(
        lambda: timeout(state, DEADLINE - timedelta(microseconds=1)), state, NotDue
    )
    assert "'e'" in message
    assert _sealed(timeout(state, DEADLINE)).state.node == "c"


@pytest.mark.parametrize(
    "step",
    [
        wait_event("e", then="b"),
        ask_user("?", then="b"),
        call("f", then="b"),
        effect("mail", then="b"),
        subworkflow("child", then="b"),
        subworkflow("child", then="b", mode="detach"),
    ],
    ids=["event", "ask", "call", "custom", "child", "detach"],
)
def test_timeout_of_a_wait_without_deadline_is_not_due(step: Step) -> None:
    """A wait without a deadline never times out: ``NotDue`` at any time, nothing changed."""
    _, t = _waiting(lambda run: step)
    state = t.state
    far = NOW + timedelta(days=3650)
    assert "deadline None" in _unchanged_after(lambda: timeout(state, far), state, NotDue)


def test_timer_fires_at_its_deadline() -> None:
    """A due timer continues at ``then`` (vars unchanged) with a ``timer.fired`` entry."""
    _, t = _waiting(lambda run: wait_until(60, then="b"))
    r = _sealed(timeout(t.state, NOW + timedelta(seconds=61)))
    assert (r.state.status, r.state.node, r.state.wait, r.state.vars) == (
        Status.RUNNING, "b", None, {},
    )
    (entry,) = r.entries
    assert (entry.kind, entry.node, entry.next, entry.key) == ("timer.fired", "a", "b", "r:2")


@pytest.mark.parametrize(
    "step",
    [
        wait_event("e", into="v", then="b", deadline=DEADLINE, on_timeout="c"),
        ask_user("?", into="v", then="b", timeout=timedelta(hours=1), on_timeout="c"),
    ],
    ids=["event", "ask"],
)
def test_timeout_with_on_timeout_escalates(step: Step) -> None:
    """A passed deadline with ``on_timeout``: continue there with ``{"timed_out": True}`` in
    ``into``, entry ``wait.timed_out``."""
    _, t = _waiting(lambda run: step)
    assert t.state.wait is not None
    key = t.state.wait.key
    r = _sealed(timeout(t.state, DEADLINE))
    assert (r.state.status, r.state.node, r.state.vars) == (
        Status.RUNNING, "c", {"v": {"timed_out": True}},
    )
    (entry,) = r.entries
    assert (entry.kind, entry.node, entry.next, entry.key) == ("wait.timed_out", "a", "c", key)


def test_timeout_without_on_timeout_fails() -> None:
    """A passed deadline without ``on_timeout`` fails the run with error type ``Timeout``."""
    _, t = _waiting(lambda run: ask_user("?", into="v", then="b", timeout=60))
    r = _sealed(timeout(t.state, DEADLINE))
    assert r.state.status is Status.FAILED
    assert r.state.error is not None
    assert (r.state.error.type, r.state.error.node) == ("Timeout", "a")
    assert "'r:2'" in r.state.error.message
    assert (r.state.wait, r.entries[0].kind, r.entries[0].key) == (None, "run.failed", "r:2")


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_a_running_run() -> None:
    """cancel: CANCELLED with error type ``Cancelled`` and the reason; ``run.cancelled``."""
    wf = _one(lambda run: done())
    t = _sealed(cancel(_begun(wf), "user asked", LATER))
    assert (t.state.status, t.state.step, t.state.updated_at) == (Status.CANCELLED, 2, LATER)
    assert t.state.error == ErrorInfo(type="Cancelled", message="user asked", node="a")
    assert (t.entries[0].kind, t.entries[0].node, t.entries[0].next) == (
        "run.cancelled", "a", None,
    )


def test_cancel_a_waiting_run_clears_the_wait() -> None:
    """Cancelling a waiting run drops its wait; its children stay listed for the runtime."""
    _, t = _waiting(lambda run: subworkflow("child", then="b"))
    c = _sealed(cancel(t.state, "stop", NOW))
    assert (c.state.status, c.state.wait, c.state.children) == (Status.CANCELLED, None, ("r.2",))
    assert c.effects == ()


# --- determinism -------------------------------------------------------------------------------


def _script(wf: Workflow) -> list[Transition]:
    """A fixed sequence of inputs through a workflow with every kind of transition."""
    out = [start(wf, "det", {"n": 2}, NOW)]

    def go(t: Transition) -> None:
        out.append(_sealed(t))

    go(tick(wf, out[-1].state, NOW))  # a: ask
    go(resume(wf, out[-1].state, "det:2", "yes", LATER))
    go(tick(wf, out[-1].state, LATER))  # b: timer
    go(timeout(out[-1].state, DEADLINE))
    go(tick(wf, out[-1].state, DEADLINE))  # c: call
    go(reject(out[-1].state, "det:6", ErrorInfo(type="E", message="m"), DEADLINE))
    go(tick(wf, out[-1].state, DEADLINE))  # err: done
    return out


def _script_workflow() -> Workflow:
    wf = Workflow("det", version="1")
    wf.node(lambda run: ask_user("?", choices=["yes"], into="ok", then="b"), start=True, name="a")
    wf.node(lambda run: wait_until(60, then="c"), name="b")
    wf.node(lambda run: call("f", [run.step], into="res", then="b", on_error="err"), name="c")
    wf.node(lambda run: done(dict(run.vars)), name="err")
    return wf


def test_same_inputs_give_equal_transitions() -> None:
    """Two equal workflow definitions fed the same inputs give equal transitions, entries and
    state digests included."""
    first, second = _script(_script_workflow()), _script(_script_workflow())
    assert first == second
    assert first[-1].state.status is Status.COMPLETED
    kinds = [t.entries[0].kind for t in first]
    assert kinds == ["run.started", "effect.requested", "wait.resumed", "effect.requested",
                     "timer.fired", "effect.requested", "wait.rejected", "run.completed"]
    assert len({t.entries[0].state for t in first}) == len(first)


def test_entry_state_digest_is_the_sha256_of_the_encoded_state() -> None:
    """An entry's ``state`` is ``sha256(encode_state(new_state))``, and the state decodes back
    equal from those bytes."""
    for t in _script(_script_workflow()):
        data = encode_state(t.state)
        assert t.entries[0].state == hashlib.sha256(data).hexdigest()
        assert decode_state(data) == t.state


# --- unencodable values ------------------------------------------------------------------------


def test_unencodable_var_set_by_goto_is_named() -> None:
    """goto(set={"bad": object()}) raises ``UnencodableValue`` naming var 'bad' and the node;
    the state is unchanged."""
    wf = _one(lambda run: goto("b", set={"fine": 1, "bad": object()}))
    state = msgspec.structs.replace(_begun(wf), vars={"old": [1, 2]})
    message = _unchanged_after(lambda: tick(wf, state, NOW), state, UnencodableValue)
    assert "var 'bad'" in message
    assert "node 'a'" in message
    assert "object" in message


def test_var_with_an_unencodable_key_is_named() -> None:
    """A var whose name cannot be a JSON key is named too."""
    wf = _one(lambda run: goto("b", set={(1, 2): "x"}))
    state = _begun(wf)
    assert "var (1, 2)" in _unchanged_after(lambda: tick(wf, state, NOW), state, UnencodableValue)


def test_unencodable_done_output_is_named() -> None:
    """done(output) with an unencodable part names the output, the node and where inside."""
    wf = _one(lambda run: done({"rows": [1, object()]}))
    state = _begun(wf)
    message = _unchanged_after(lambda: tick(wf, state, NOW), state, UnencodableValue)
    assert "output of node 'a'" in message
    assert "key 'rows': item 1: object value" in message


def test_unencodable_resume_payload_is_named() -> None:
    """A resume payload that cannot be encoded is refused naming the key; nothing changes."""
    wf, t = _waiting(lambda run: wait_event("e", into="v", then="b"))
    state = t.state
    message = _unchanged_after(
        lambda: resume(wf, state, "e", {"x": {1, object()}}, NOW), state, UnencodableValue
    )
    assert "payload for key 'e'" in message
    assert "key 'x'" in message


def test_unencodable_start_input_is_named() -> None:
    """start with an unencodable input raises naming the run's input."""
    wf = _one(lambda run: done())
    with pytest.raises(UnencodableValue, match=r"input of run 'r'.*item 0: object value"):
        start(wf, "r", (object(),), NOW)


@pytest.mark.parametrize(
    ("step", "kind"),
    [
        (call("f", {"x": object()}, then="b"), "call"),
        (effect("mail", [object()], then="b"), "mail"),
        (subworkflow("child", {"x": object()}, then="b"), "subworkflow"),
    ],
    ids=["call", "custom", "subworkflow"],
)
def test_unencodable_effect_args_are_named(step: Step, kind: str) -> None:
    """An effect whose arguments cannot be encoded is refused naming the effect and the node."""
    wf = _one(lambda run: step)
    state = _begun(wf)
    message = _unchanged_after(lambda: tick(wf, state, NOW), state, UnencodableValue)
    assert f"arguments of the {kind} effect of node 'a'" in message


def test_a_cancel_without_cascade_says_so_in_its_entry() -> None:
    """The ledger entry of ``cancel(cascade=False)`` carries ``NO_CASCADE`` as its key (what
    recovery reads to leave the children alone); a cascading cancel carries none."""
    from wakepoint.kernel.transitions import NO_CASCADE

    wf = _one(lambda run: done())
    state = _begun(wf)
    assert _sealed(cancel(state, "stop", NOW)).entries[0].key is None
    alone = _sealed(cancel(state, "stop", NOW, cascade=False))
    assert alone.entries[0].key == NO_CASCADE
    assert alone.state.status is Status.CANCELLED


def test_a_non_string_reason_is_refused_before_anything_is_encoded() -> None:
    """A ``fail``/``cancel`` reason that is not a str (here an exception object, which has
    no encoding either) is named as such: the run fails with ``InvalidStep``, the cancel is a
    ``TypeError``; no var is blamed and the input state is unchanged."""
    not_a_string: Any = ValueError("not a string")
    wf = _one(lambda run: fail(not_a_string))
    state = msgspec.structs.replace(_begun(wf), vars={"good": 1})
    t = _sealed(tick(wf, state, NOW))
    assert t.state.error is not None and t.state.error.type == "InvalidStep"
    assert "ValueError reason" in t.state.error.message
    message = _unchanged_after(lambda: cancel(state, not_a_string, NOW), state, TypeError)
    assert "var" not in message


def test_an_unencodable_value_outside_vars_is_blamed_on_the_state() -> None:
    """A state that cannot be encoded although every var can (here an input no ``start``
    would have taken) is reported as the run's state, not as whichever var comes first."""
    wf = _one(lambda run: goto("b"))
    state = msgspec.structs.replace(_begun(wf), vars={"good": 1}, input=object())
    with pytest.raises(UnencodableValue) as info:
        tick(wf, state, NOW)
    assert str(info.value).startswith("state of run 'r' cannot be persisted")
    assert "var" not in str(info.value)


def test_run_vars_view_is_encodable_as_output() -> None:
    """A node may return the read-only ``run.vars`` view as its output; a dict is stored."""
    wf = _one(lambda run: done(run.vars))
    state = msgspec.structs.replace(_begun(wf), vars={"a": 1})
    t = _sealed(tick(wf, state, NOW))
    assert type(t.state.output) is dict
    assert t.entries[0].payload == _sha(encode({"a": 1}))
    assert decode_state(encode_state(t.state)).output == {"a": 1}


# --- versions ----------------------------------------------------------------------------------


def _v1() -> Workflow:
    wf = Workflow("orders")
    wf.node(lambda run: goto(run.input or "review", set={"amount": 10}), start=True, name="a")
    wf.node(lambda run: ask_user("ok?", into="ans", then="review"), name="ask")
    wf.node(lambda run: done({"v": 1, **run.vars}), name="review")
    return wf


def _ask_v1(v1: Workflow) -> RunState:
    """A v1 run waiting (key ``r:3``) on the question of node ``ask``, which continues at
    ``review``."""
    state = _sealed(tick(v1, _begun(v1, "ask"), NOW)).state
    state = _sealed(tick(v1, state, NOW)).state
    assert state.wait is not None
    assert (state.status, state.wait.key, state.wait.then) == (Status.WAITING, "r:3", "review")
    return state


def _v2(migrate: bool) -> Workflow:
    """v1 with ``review`` renamed ``review2`` (and a migration from v1 when ``migrate``)."""
    wf = Workflow("orders")
    wf.node(lambda run: goto("review2"), start=True, name="a")
    wf.node(lambda run: done({"v": 2, **run.vars}), name="review2")
    if migrate:

        @wf.migration(_v1().logic_id)
        def rename(node: str | None, old: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
            new_vars = {("total" if k == "amount" else k): v for k, v in old.items()}
            return ("review2" if node == "review" else node), new_vars

    return wf


def test_tick_under_changed_logic_is_refused() -> None:
    """A run started under one logic id is not ticked under other logic without a migration:
    ``VersionMismatch`` names both logic ids, nothing changes."""
    v1, v2 = _v1(), _v2(migrate=False)
    assert v1.logic_id != v2.logic_id
    state = _sealed(tick(v1, _begun(v1), NOW)).state
    message = _unchanged_after(lambda: tick(v2, state, NOW), state, VersionMismatch)
    assert v1.logic_id in message
    assert v2.logic_id in message
    assert f"@workflow.migration('{v1.logic_id}')" in message


def test_resume_under_changed_logic_is_refused() -> None:
    """A waiting run is not resumed under other logic without a migration."""
    v1 = _v1()
    waiting = _ask_v1(v1)
    with pytest.raises(VersionMismatch) as info:
        resume(_v2(migrate=False), waiting, "r:3", "yes", NOW)
    assert (info.value.stored, info.value.current) == (v1.logic_id, _v2(False).logic_id)


def test_migration_lets_a_running_run_continue() -> None:
    """With a migration from the run's logic id, tick maps node and vars, records the new logic
    id and runs the mapped node."""
    v1, v2 = _v1(), _v2(migrate=True)
    state = _sealed(tick(v1, _begun(v1), NOW)).state
    assert (state.node, state.vars) == ("review", {"amount": 10})
    t = _sealed(tick(v2, state, NOW))
    assert t.state.status is Status.COMPLETED
    assert t.state.output == {"v": 2, "total": 10}
    assert (t.state.version, t.state.vars) == (v2.logic_id, {"total": 10})
    assert (t.entries[0].node, state.vars) == ("review2", {"amount": 10})


def test_migration_lets_a_waiting_run_continue_at_a_renamed_node() -> None:
    """A run waiting under old logic resumes under new logic with a migration, and the node it
    continues at (the wait's ``then``) is the one the migration maps, at the next tick."""
    v1, v2 = _v1(), _v2(migrate=True)
    waiting = _ask_v1(v1)
    resumed = _sealed(resume(v2, waiting, "r:3", "yes", NOW)).state
    assert (resumed.status, resumed.node, resumed.version) == (
        Status.RUNNING, "review", v1.logic_id,
    )
    finished = _sealed(tick(v2, resumed, NOW)).state
    assert finished.status is Status.COMPLETED
    assert finished.output == {"v": 2, "total": 10, "ans": "yes"}
    assert finished.version == v2.logic_id


def test_migration_gets_a_copy_of_the_vars() -> None:
    """A migration that edits the vars it is given in place does not touch the input state."""
    v1 = _v1()
    v2 = Workflow("orders", version="2")
    v2.node(lambda run: done(dict(run.vars)), start=True, name="a")

    @v2.migration(v1.logic_id)
    def edit_in_place(node: str | None, old: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        old["migrated"] = True
        return node, old

    state = msgspec.structs.replace(_begun(v1), vars={"x": 1})
    t = _sealed(tick(v2, state, NOW))
    assert t.state.output == {"x": 1, "migrated": True}
    assert state.vars == {"x": 1}


def test_migration_to_a_missing_node_fails_the_run() -> None:
    """A migration that maps to a node the workflow lacks fails the run with ``UnknownNode``."""
    v1 = _v1()
    v2 = Workflow("orders", version="2")
    v2.node(lambda run: done(), start=True, name="a")
    v2.migration(v1.logic_id)(lambda node, old: ("gone", old))
    t = _sealed(tick(v2, _begun(v1), NOW))
    assert t.state.status is Status.FAILED
    assert t.state.error is not None
    assert t.state.error.type == "UnknownNode"
    assert "no node 'gone'" in t.state.error.message
    assert t.state.version == v2.logic_id


def test_state_of_another_workflow_is_refused() -> None:
    """tick or resume with a workflow of another id raises ``UnknownWorkflow`` naming the run's."""
    v1 = _v1()
    other = _one(lambda run: done(), wf_id="other")
    running = _begun(v1)
    assert "'orders'" in _unchanged_after(lambda: tick(other, running, NOW), running,
                                          UnknownWorkflow)
    waiting = _ask_v1(v1)
    with pytest.raises(UnknownWorkflow) as info:
        resume(other, waiting, "r:3", "yes", NOW)
    assert info.value.workflow == "orders"



def test_cyclic_value_is_unencodable_not_a_recursion_error() -> None:
    """A cyclic payload raises ``UnencodableValue`` saying it is cyclic, and changes nothing."""
    wf = Workflow("cyclic")

    @wf.node(start=True)
    def first(run: RunView) -> Step:
        return done()

    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises(UnencodableValue, match="cyclic or nested too deeply"):
        start(wf, "r-cyclic", cyclic, NOW)


def test_cyclic_var_is_named() -> None:
    """A cyclic var set by ``goto`` is named in the error, and the input state is unchanged."""
    wf = Workflow("cyclic-var")
    cyclic: dict[str, object] = {}
    cyclic["self"] = cyclic

    @wf.node(start=True)
    def first(run: RunView) -> Step:
        return goto("second", set={"loop": cyclic})

    @wf.node
    def second(run: RunView) -> Step:
        return done()

    state = start(wf, "r-cyclic-var", None, NOW).state
    with pytest.raises(UnencodableValue, match="var 'loop'"):
        tick(wf, state, NOW)


def test_done_with_run_vars_stores_a_plain_dict() -> None:
    """``done(run.vars)`` stores the output as a plain dict, not the read-only view."""
    wf = Workflow("vars-out")

    @wf.node(start=True)
    def first(run: RunView) -> Step:
        return goto("second", set={"a": 1})

    @wf.node
    def second(run: RunView) -> Step:
        return done(run.vars)

    state = tick(wf, tick(wf, start(wf, "r-vars", None, NOW).state, NOW).state, NOW).state
    assert type(state.output) is dict and state.output == {"a": 1}
