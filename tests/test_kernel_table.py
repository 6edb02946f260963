"""The transition table (``kernel.table``) against the real transition functions.

Every ``(status, input)`` pair is tried on a real run in that status, built only through the
transition functions (start, tick, cancel).  A hypothesis state machine, after python-hyper/h2's
``tests/test_state_machines.py``, then feeds random inputs to random small workflows and checks
each status change against the table, and that every refused input changes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from wakepoint.kernel import (
    ErrorInfo,
    IllegalTransition,
    InvalidAnswer,
    NotDue,
    NotRunning,
    NotWaiting,
    RunFinished,
    RunState,
    RunView,
    Status,
    Step,
    Transition,
    Workflow,
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
from wakepoint.kernel.codec import encode_state
from wakepoint.kernel.table import INPUTS, TABLE, Input, check

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LATE = NOW + timedelta(days=1)
R, W = Status.RUNNING, Status.WAITING
C, F, X = Status.COMPLETED, Status.FAILED, Status.CANCELLED
ALL_PAIRS = list(itertools.product(Status, INPUTS))


def _promised_refusal(status: Status) -> type[IllegalTransition]:
    """The error class the table module's header promises for a missing pair."""
    if status in (C, F, X):
        return RunFinished
    if status is W:
        return NotRunning
    return NotWaiting


def _sealed(t: Transition) -> Transition:
    """Check that a transition's one entry digests its new state; return the transition."""
    assert len(t.entries) == 1
    assert t.entries[0].state == hashlib.sha256(encode_state(t.state)).hexdigest()
    return t


def _walk_workflow() -> Workflow:
    """A workflow whose start node goes wherever the run's input says."""
    wf = Workflow("walk")

    @wf.node(start=True)
    def begin(run: RunView) -> Step:
        if run.input == "wait":
            return wait_event(
                "walk-event", into="got", then="after",
                deadline=NOW + timedelta(hours=1), on_timeout="after",
            )
        if run.input == "error-branch":
            return call("work", {"n": 1}, into="got", then="after", on_error="after")
        if run.input == "strict-wait":
            return wait_event("strict", then="after", deadline=NOW + timedelta(hours=1))
        if run.input == "done":
            return done("ok")
        if run.input == "fail":
            return fail("no")
        return goto("after", set={"went": True})

    @wf.node
    def after(run: RunView) -> Step:
        return done(dict(run.vars))

    return wf


def _state_in(wf: Workflow, status: Status) -> RunState:
    """A real run of ``wf`` in ``status``, reached through the transition functions only."""
    run_input = {R: "goto", W: "wait", C: "done", F: "fail", X: "goto"}[status]
    begun = start(wf, f"run-{status.value}", run_input, NOW).state
    if status is R:
        return begun
    if status is X:
        return cancel(begun, "stop", NOW).state
    return tick(wf, begun, NOW).state


def _apply(wf: Workflow, state: RunState, input_: Input) -> Transition:
    """Send one input through its real transition function (a due time for ``timeout``)."""
    key = state.wait.key if state.wait is not None else "no-such-key"
    if input_ == "tick":
        return tick(wf, state, NOW)
    if input_ == "resume":
        return resume(wf, state, key, "payload", NOW)
    if input_ == "reject":
        return reject(state, key, ErrorInfo(type="Boom", message="it broke"), NOW)
    if input_ == "timeout":
        return timeout(state, LATE)
    return cancel(state, "stop", NOW)


def test_the_table_has_exactly_the_documented_rows() -> None:
    """RUNNING takes tick and cancel, WAITING takes resume/reject/timeout/cancel, nothing else."""
    assert dict(TABLE) == {
        (R, "tick"): {R, W, C, F},
        (R, "cancel"): {X},
        (W, "resume"): {R},
        (W, "reject"): {R, F},
        (W, "timeout"): {R, F},
        (W, "cancel"): {X},
    }
    assert len(ALL_PAIRS) == 25
    assert all(key in ALL_PAIRS for key in TABLE)


@pytest.mark.parametrize(("status", "input_"), ALL_PAIRS, ids=[f"{s}-{i}" for s, i in ALL_PAIRS])
def test_every_status_input_pair_follows_the_table(status: Status, input_: Input) -> None:
    """An allowed pair lands in its row; a refused one raises exactly the promised class.

    Either way the input state is left equal to a copy taken before.
    """
    wf = _walk_workflow()
    state = _state_in(wf, status)
    assert state.status is status
    before = copy.deepcopy(state)
    row = TABLE.get((status, input_))
    if row is not None:
        t = _sealed(_apply(wf, state, input_))
        assert t.state.status in row
        assert t.state.step == state.step + 1
    else:
        expected = _promised_refusal(status)
        with pytest.raises(IllegalTransition) as info:
            _apply(wf, state, input_)
        assert type(info.value) is expected
        assert (info.value.run_id, info.value.status, info.value.input) == (
            state.run_id, status.value, input_,
        )
        assert f"cannot {input_} a run that is {status.value}" in str(info.value)
    assert state == before


@pytest.mark.parametrize(("status", "input_"), ALL_PAIRS, ids=[f"{s}-{i}" for s, i in ALL_PAIRS])
def test_check_returns_the_row_or_raises_the_promised_class(
    status: Status, input_: Input
) -> None:
    """``table.check`` alone gives the row for an allowed pair and the exact refusal otherwise."""
    if (status, input_) in TABLE:
        assert check("r", status, input_) is TABLE[(status, input_)]
    else:
        with pytest.raises(IllegalTransition) as info:
            check("r", status, input_)
        assert type(info.value) is _promised_refusal(status)
        assert info.value.__suppress_context__  # the KeyError of the lookup is hidden


def test_every_status_a_row_lists_is_reached() -> None:
    """No row is wider than the kernel: each listed (status, input) -> status really happens."""
    wf = _walk_workflow()
    seen: set[tuple[Status, str, Status]] = set()

    def record(state: RunState, input_: Input, t: Transition) -> RunState:
        seen.add((state.status, input_, _sealed(t).state.status))
        return t.state

    for run_input in ("goto", "wait", "done", "fail", "error-branch", "strict-wait"):
        state = start(wf, f"run-{run_input}", run_input, NOW).state
        record(state, "cancel", cancel(state, "stop", NOW))
        waiting = record(state, "tick", tick(wf, state, NOW))
        if waiting.status is W:
            record(waiting, "cancel", cancel(waiting, "stop", NOW))
            record(waiting, "reject", reject(
                waiting, waiting.wait.key, ErrorInfo(type="Boom", message="x"), NOW,
            ))
            if waiting.wait.kind == "event":
                record(waiting, "timeout", timeout(waiting, LATE))
                record(waiting, "resume", resume(wf, waiting, waiting.wait.key, 1, NOW))
    assert seen == {(s, i, new) for (s, i), row in TABLE.items() for new in row}


# --- the random walk -------------------------------------------------------------------------

GHOST = "ghost"
"""A target that names no node: such a step must fail the run, never corrupt it."""


@st.composite
def workflow_specs(draw: st.DrawFn) -> tuple[tuple[Any, ...], ...]:
    """One to three nodes, each with a behaviour; some targets name no node."""
    count = draw(st.integers(1, 3))
    names = [f"n{i}" for i in range(count)]
    target = st.one_of(st.sampled_from(names), st.sampled_from(names), st.just(GHOST))
    optional = st.none() | target
    seconds = st.integers(0, 3600)
    behaviour = st.one_of(
        st.tuples(st.just("goto"), target, st.booleans()),
        st.tuples(st.just("done")),
        st.tuples(st.just("fail")),
        st.tuples(st.sampled_from(("raise", "non-step"))),
        st.tuples(st.just("event"), target, optional, st.none() | seconds),
        st.tuples(st.just("timer"), target, seconds),
        st.tuples(
            st.just("ask"), target, st.none() | st.just(("yes", "no")), st.none() | seconds,
            optional,
        ),
        st.tuples(st.just("child"), target, st.sampled_from(("wait", "detach")), optional),
        st.tuples(st.sampled_from(("call", "custom")), target, optional),
    )
    return tuple(draw(behaviour) for _ in names)


def _node(behaviour: tuple[Any, ...]) -> Any:
    """A node function that deterministically does what ``behaviour`` says."""
    kind, *args = behaviour

    def node(run: RunView) -> Any:
        if kind == "goto":
            target, with_set = args
            return goto(target, set={f"v{run.step}": run.step} if with_set else None)
        if kind == "done":
            return done(dict(run.vars))
        if kind == "fail":
            return fail("gave up")
        if kind == "raise":
            raise RuntimeError(f"broke at step {run.step}")
        if kind == "non-step":
            return 42
        if kind == "event":
            then, on_timeout, after = args
            deadline = run.now + timedelta(seconds=after) if after is not None else None
            return wait_event(
                f"evt-{run.step}", into="evt", then=then, deadline=deadline, on_timeout=on_timeout
            )
        if kind == "timer":
            then, delay = args
            return wait_until(delay, then=then)
        if kind == "ask":
            then, choices, limit, on_timeout = args
            return ask_user(
                "ok?", choices=choices, into="answer", then=then, timeout=limit,
                on_timeout=on_timeout,
            )
        if kind == "child":
            then, mode, on_error = args
            return subworkflow(
                "child-wf", {"n": run.step}, into="child", then=then, mode=mode, on_error=on_error
            )
        then, on_error = args
        if kind == "call":
            return call("work", [run.step], into="result", then=then, on_error=on_error)
        return effect("notify", {"n": run.step}, into="result", then=then, on_error=on_error)

    return node


def _build(spec: tuple[tuple[Any, ...], ...]) -> Workflow:
    wf = Workflow("random", max_steps=12)  # low enough for a goto cycle to reach it
    for index, behaviour in enumerate(spec):
        wf.node(_node(behaviour), start=index == 0, name=f"n{index}")
    return wf


class KernelMachine(RuleBasedStateMachine):
    """One run of a random workflow at a time, fed random inputs at random times."""

    def __init__(self) -> None:
        super().__init__()
        self.wf: Workflow | None = None
        self.state: RunState | None = None
        self.now = NOW
        self.runs = 0

    def _start(self) -> None:
        assert self.wf is not None
        self.runs += 1
        t = _sealed(start(self.wf, f"run-{self.runs}", {"run": self.runs}, self.now))
        assert t.state.status is R
        self.state = t.state

    @initialize(spec=workflow_specs())
    def define(self, spec: tuple[tuple[Any, ...], ...]) -> None:
        self.wf = _build(spec)
        self._start()

    @precondition(lambda self: self.state is not None and self.state.status.finished)
    @rule()
    def start_again(self) -> None:
        self._start()

    @rule(
        # every input, with the ones that move a run forward drawn more often than cancel
        input_=st.sampled_from(INPUTS) | st.sampled_from(("tick", "resume", "reject", "timeout")),
        right_key=st.booleans(),
        answer=st.sampled_from(("yes", "no", "maybe")),
        advance=st.integers(0, 5400),
        jump=st.booleans(),
    )
    def send(
        self, input_: Input, right_key: bool, answer: str, advance: int, jump: bool
    ) -> None:
        assert self.wf is not None and self.state is not None
        self.now += timedelta(seconds=advance)
        state = self.state
        wait = state.wait
        if jump and input_ == "timeout" and wait is not None and wait.deadline is not None:
            self.now = max(self.now, wait.deadline)  # half the timeouts come when due
        before = copy.deepcopy(state)
        key = wait.key if wait is not None and right_key else "wrong-key"
        row = TABLE.get((state.status, input_))
        try:
            if input_ == "tick":
                t = tick(self.wf, state, self.now)
            elif input_ == "resume":
                payload = answer if wait is not None and wait.kind == "user" else {"got": 1}
                t = resume(self.wf, state, key, payload, self.now)
            elif input_ == "reject":
                t = reject(state, key, ErrorInfo(type="Boom", message="no"), self.now)
            elif input_ == "timeout":
                t = timeout(state, self.now)
            else:
                t = cancel(state, "stop", self.now)
        except IllegalTransition as exc:
            assert row is None
            assert type(exc) is _promised_refusal(state.status)
            assert state == before
            return
        except (NotDue, WrongWaitKey, InvalidAnswer) as exc:
            # Allowed by the table but not by the wait: still nothing may change, and each
            # error must have its reason.
            assert row is not None
            assert wait is not None
            assert state == before
            if isinstance(exc, NotDue):
                assert wait.deadline is None or self.now < wait.deadline
            elif isinstance(exc, WrongWaitKey):
                assert not right_key
            else:
                assert wait.choices is not None and answer not in wait.choices
            return
        assert row is not None, f"{state.status} accepted {input_}"
        assert state == before
        assert _sealed(t).state.status in row
        assert t.state.step == state.step + 1
        self.state = t.state

    @invariant()
    def state_is_consistent(self) -> None:
        state = self.state
        if state is None:
            return
        assert (state.wait is not None) == (state.status is W)
        assert (state.error is not None) == (state.status in (F, X))
        # Bounded: a node runs only below max_steps; a wait opened at max_steps can still be
        # resumed (one more step) before the next tick is refused (one more).
        assert state.step <= self.wf.max_steps + 2  # type: ignore[union-attr]


class TestKernelMachine(KernelMachine.TestCase):
    """Random inputs to random workflows: every status change is in the table, and every
    refused input (by the table or by the wait) leaves the state equal to a copy."""

    settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
