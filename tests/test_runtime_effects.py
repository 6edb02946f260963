"""The built-in effects, driven through ``Runtime``, and user-registered effect kinds.

Every test runs on the memory store and on the JSONL store.  Time is a fake clock: timers and
deadlines fire only through ``rt.wake_due(now)``; retry backoff sleeps through an injected
``sleep`` that records the delays instead of waiting.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from wakepoint import (
    Failed,
    Parked,
    Resolved,
    Retry,
    RunState,
    Status,
    Workflow,
    ask_user,
    call,
    done,
    effect,
    goto,
    subworkflow,
    wait_event,
    wait_until,
)

# --- ask_user ------------------------------------------------------------------------------

review = Workflow("review")


@review.node(start=True)
def ask(run: Any) -> Any:
    return ask_user(
        "Approve the refund?", choices=["approve", "reject"], into="answer", then="decide",
        timeout=timedelta(hours=1), on_timeout="escalate",
    )


@review.node
def decide(run: Any) -> Any:
    return done({"by": "reviewer", "answer": run.vars["answer"]})


@review.node
def escalate(run: Any) -> Any:
    return ask_user("Manager: approve?", choices=["approve", "reject"], into="answer",
                    then="manager")


@review.node
def manager(run: Any) -> Any:
    return done({"by": "manager", "answer": run.vars["answer"]})


def test_ask_user_parks_with_prompt_and_choices(env: Any) -> None:
    """``ask_user`` parks the run WAITING on a ``user`` wait with its prompt and choices, and
    ``respond`` puts the answer in ``into`` and continues at ``then``."""
    rt = env.open([review])
    run = rt.start(review, run_id="q1")
    assert run.status is Status.WAITING
    assert run.wait.kind == "user"
    assert run.wait.prompt == "Approve the refund?"
    assert run.wait.choices == ("approve", "reject")
    assert run.wait.key == "q1:2"
    assert run.wait.deadline == env.clock.now + timedelta(hours=1)
    assert [s.run_id for s in rt.list(status=Status.WAITING, wait_kind="user")] == ["q1"]
    final = rt.respond("q1", "approve")
    assert final.status is Status.COMPLETED
    assert final.output == {"by": "reviewer", "answer": "approve"}
    assert final.vars["answer"] == "approve"
    env.check_ledger(rt, "q1")


def test_ask_user_timeout_escalates(env: Any) -> None:
    """When the question's timeout passes, ``wake_due`` continues the run at ``on_timeout``
    with ``{"timed_out": True}`` in ``into``; before that, nothing is due."""
    rt = env.open([review])
    rt.start(review, run_id="q1")
    assert rt.next_due() == env.clock.now + timedelta(hours=1)
    assert rt.wake_due(env.clock.now + timedelta(minutes=59)) == []
    assert rt.get("q1").wait.prompt == "Approve the refund?"
    woken = rt.wake_due(env.clock.advance(hours=1))
    assert [s.run_id for s in woken] == ["q1"]
    state = rt.get("q1")
    assert state.status is Status.WAITING
    assert state.vars["answer"] == {"timed_out": True}
    assert state.wait.prompt == "Manager: approve?"
    assert env.kinds(rt, "q1")[-2:] == ["wait.timed_out", "effect.requested"]
    assert rt.respond("q1", "reject").output == {"by": "manager", "answer": "reject"}
    env.check_ledger(rt, "q1")


def test_ask_user_without_escalation_fails_on_timeout(env: Any) -> None:
    """A question with a timeout but no ``on_timeout`` fails the run with ``Timeout``."""
    wf = Workflow("ask-or-fail")

    @wf.node(start=True)
    def only(run: Any) -> Any:
        return ask_user("quick!", into="a", then="after", timeout=5)

    @wf.node
    def after(run: Any) -> Any:
        return done(run.vars["a"])

    rt = env.open([wf])
    rt.start(wf, run_id="q1")
    rt.wake_due(env.clock.advance(5))
    state = rt.get("q1")
    assert state.status is Status.FAILED
    assert state.error.type == "Timeout"
    env.check_ledger(rt, "q1")


# --- wait_event ----------------------------------------------------------------------------

webhook = Workflow("webhook")


@webhook.node(start=True)
def subscribe(run: Any) -> Any:
    deadline = run.input.get("deadline")
    return wait_event(run.input["key"], into="event", then="handle", deadline=deadline,
                      on_timeout=run.input.get("on_timeout"))


@webhook.node
def handle(run: Any) -> Any:
    return done(run.vars["event"])


def test_send_event_resumes_every_waiting_run(env: Any) -> None:
    """``send_event(key, payload)`` resumes every run waiting on ``key`` with ``payload`` in
    ``into``, and no run waiting on another key; an event nobody waits for reaches nobody."""
    rt = env.open([webhook])
    for run_id, key in (("a", "paid:1"), ("b", "paid:1"), ("c", "paid:2")):
        assert rt.start(webhook, {"key": key}, run_id=run_id).status is Status.WAITING
    assert rt.send_event("paid:3", {"amount": 1}) == []
    resumed = rt.send_event("paid:1", {"amount": 12.5})
    assert sorted(s.run_id for s in resumed) == ["a", "b"]
    for run_id in ("a", "b"):
        state = rt.get(run_id)
        assert state.status is Status.COMPLETED
        assert state.output == {"amount": 12.5}
        env.check_ledger(rt, run_id)
    assert rt.get("c").status is Status.WAITING
    assert rt.send_event("paid:1", "again") == []  # no buffering, nobody waits any more
    assert rt.get("c").wait.key == "paid:2"


def test_event_deadline_with_on_timeout_continues(env: Any) -> None:
    """A wait whose deadline passes continues at ``on_timeout`` with ``{"timed_out": True}``."""
    rt = env.open([webhook])
    deadline = env.clock.now + timedelta(minutes=10)
    rt.start(webhook, {"key": "k", "deadline": deadline, "on_timeout": "handle"}, run_id="w1")
    assert rt.next_due() == deadline
    assert rt.wake_due(deadline - timedelta(seconds=1)) == []
    [state] = rt.wake_due(deadline)
    assert state.status is Status.COMPLETED
    assert state.output == {"timed_out": True}
    assert rt.send_event("k", "too late") == []
    env.check_ledger(rt, "w1")


def test_event_deadline_without_on_timeout_fails(env: Any) -> None:
    """A wait whose deadline passes with no ``on_timeout`` fails the run with ``Timeout``."""
    rt = env.open([webhook])
    deadline = env.clock.now + timedelta(minutes=10)
    rt.start(webhook, {"key": "k", "deadline": deadline}, run_id="w1")
    rt.wake_due(env.clock.advance(minutes=11))
    state = rt.get("w1")
    assert state.status is Status.FAILED
    assert state.error.type == "Timeout"
    assert "'k'" in state.error.message
    assert env.kinds(rt, "w1")[-2:] == ["run.failed", "run.sealed"]
    env.check_ledger(rt, "w1")


# --- wait_until ----------------------------------------------------------------------------

sleeper = Workflow("sleeper")


@sleeper.node(start=True)
def nap(run: Any) -> Any:
    return wait_until(run.input, then="wake")


@sleeper.node
def wake(run: Any) -> Any:
    return done(run.now.isoformat())


def test_wait_until_future_parks_until_due(env: Any) -> None:
    """A future time parks the run on a timer; ``next_due`` reports it, ``wake_due`` before it
    does nothing and at it resumes the run."""
    rt = env.open([sleeper])
    when = env.clock.now + timedelta(days=2)
    run = rt.start(sleeper, when, run_id="t1")
    assert run.status is Status.WAITING
    assert run.wait.kind == "timer"
    assert run.wait.deadline == when
    assert rt.next_due() == when
    assert rt.wake_due(when - timedelta(microseconds=1)) == []
    env.clock.now = when
    [state] = rt.wake_due(when)
    assert state.status is Status.COMPLETED
    assert state.output == when.isoformat()
    assert rt.next_due() is None
    assert env.kinds(rt, "t1") == ["run.started", "effect.requested", "timer.fired",
                                   "run.completed", "run.sealed"]
    env.check_ledger(rt, "t1")


def test_wait_until_delay_in_seconds(env: Any) -> None:
    """A delay in seconds is measured from the moment the node ran."""
    rt = env.open([sleeper])
    run = rt.start(sleeper, 90, run_id="t1")
    assert run.wait.deadline == env.clock.now + timedelta(seconds=90)


def test_wait_until_past_resumes_at_once(env: Any) -> None:
    """A time already past resumes the run at once: ``start`` returns it finished."""
    rt = env.open([sleeper])
    run = rt.start(sleeper, env.clock.now - timedelta(hours=1), run_id="t1")
    assert run.status is Status.COMPLETED
    assert env.kinds(rt, "t1") == ["run.started", "effect.requested", "wait.resumed",
                                   "run.completed", "run.sealed"]
    env.check_ledger(rt, "t1")


# --- subworkflow ---------------------------------------------------------------------------

child_wf = Workflow("child")


@child_wf.node(start=True)
def child_start(run: Any) -> Any:
    if run.input.get("ask"):
        return ask_user("child asks", into="answer", then="child_end")
    return goto("child_end", set={"answer": None})


@child_wf.node
def child_end(run: Any) -> Any:
    if run.input.get("fail"):
        raise ValueError(f"child {run.run_id} cannot")
    return done({"child": run.run_id, "answer": run.vars["answer"], "x": run.input.get("x")})


parent_wf = Workflow("parent")


@parent_wf.node(start=True)
def spawn(run: Any) -> Any:
    return subworkflow(child_wf, run.input, into="result", then="parent_end",
                       mode=run.input.get("mode", "wait"), on_error=run.input.get("on_error"))


@parent_wf.node
def parent_end(run: Any) -> Any:
    return done({"parent": run.run_id, "result": run.vars["result"]})


@parent_wf.node
def recover_node(run: Any) -> Any:
    return done({"recovered": run.vars["result"]})


def test_subworkflow_wait_resumes_parent_with_child_output(env: Any) -> None:
    """``mode="wait"`` parks the parent until the child finishes, then resumes the parent with
    the child's output without any call by the user; both runs record the link."""
    rt = env.open([parent_wf, child_wf])
    parent = rt.start(parent_wf, {"ask": True, "x": 5}, run_id="p")
    assert parent.status is Status.WAITING
    assert parent.wait.kind == "child"
    [child_id] = parent.children
    assert child_id == parent.wait.key == "p.2"
    child = rt.get(child_id)
    assert child.status is Status.WAITING
    assert (child.parent.run_id, child.parent.key) == ("p", child_id)
    assert [s.run_id for s in rt.list(parent="p")] == [child_id]
    rt.respond(child_id, "hi")
    assert rt.get(child_id).status is Status.COMPLETED
    final = rt.get("p")
    assert final.status is Status.COMPLETED
    assert final.output == {"parent": "p",
                            "result": {"child": "p.2", "answer": "hi", "x": 5}}
    env.check_ledger(rt, "p")
    env.check_ledger(rt, child_id)


def test_a_run_already_holding_a_childs_id_is_not_taken_as_the_child(env: Any) -> None:
    """A run a caller started under the id a child would get (``<parent>.<step>``) is not
    adopted as that child: the parent fails with ``RunExists`` naming it (before, it
    completed with the unrelated run's output), and the other run is left as it was."""
    rt = env.open([parent_wf, child_wf])
    other = rt.start(child_wf, {"ask": True, "x": 1}, run_id="p.2")
    parent = rt.start(parent_wf, {"ask": True, "x": 5}, run_id="p")
    assert parent.status is Status.FAILED
    assert parent.error.type == "RunExists" and "'p.2'" in parent.error.message
    assert rt.get("p.2") == other


def test_a_store_error_creating_a_child_leaves_the_parent_to_recovery(env: Any) -> None:
    """The store failing while a child is created is not the subworkflow failing: the error
    reaches the caller, the parent stays parked on its committed request, and ``recover()``
    creates the child and finishes the parent (before: the parent was committed FAILED with
    type StoreError)."""
    from wakepoint.stores.base import StoreError

    rt = env.open([parent_wf, child_wf])
    create = rt.store.create

    def failing(state: RunState, records: Any) -> None:
        if state.run_id == "p.2":
            raise StoreError("database is locked (injected)")
        create(state, records)

    rt.store.create = failing
    with pytest.raises(StoreError, match="injected"):
        rt.start(parent_wf, {"ask": False, "x": 5}, run_id="p")
    rt.store.create = create
    parked = rt.get("p")
    assert parked.status is Status.WAITING and parked.wait.kind == "child"
    rt.recover()
    assert rt.get("p.2").status is Status.COMPLETED
    assert rt.get("p").status is Status.COMPLETED
    env.check_ledger(rt, "p")


def test_subworkflow_child_finishing_at_once(env: Any) -> None:
    """A child that finishes during ``start`` resumes its parent within the same call."""
    rt = env.open([parent_wf, child_wf])
    final = rt.start(parent_wf, {"x": 1}, run_id="p")
    assert final.status is Status.COMPLETED
    assert final.output["result"] == {"child": "p.2", "answer": None, "x": 1}


def test_failing_child_goes_to_parent_on_error(env: Any) -> None:
    """A failed child continues the parent at ``on_error`` with the error in ``into``."""
    rt = env.open([parent_wf, child_wf])
    final = rt.start(parent_wf, {"fail": True, "on_error": "recover_node"}, run_id="p")
    assert rt.get("p.2").status is Status.FAILED
    assert final.status is Status.COMPLETED
    error = final.output["recovered"]["error"]
    assert error["type"] == "ValueError"
    assert "p.2" in error["message"] and "cannot" in error["message"]
    env.check_ledger(rt, "p")


def test_failing_child_fails_parent_without_on_error(env: Any) -> None:
    """A failed child fails a parent that has no ``on_error``, naming the child."""
    rt = env.open([parent_wf, child_wf])
    rt.start(parent_wf, {"ask": True, "fail": True}, run_id="p")
    rt.respond("p.2", "x")
    state = rt.get("p")
    assert state.status is Status.FAILED
    assert state.error.type == "ValueError"
    assert "child run p.2 failed" in state.error.message
    env.check_ledger(rt, "p")


def test_subworkflow_detach_continues_at_once(env: Any) -> None:
    """``mode="detach"`` continues the parent at once with the child's run id; the child runs
    on its own and finishing it does not touch the parent."""
    rt = env.open([parent_wf, child_wf])
    parent = rt.start(parent_wf, {"mode": "detach", "ask": True}, run_id="p")
    assert parent.status is Status.COMPLETED
    assert parent.output == {"parent": "p", "result": "p.2"}
    child = rt.get("p.2")
    assert child.status is Status.WAITING
    assert child.parent.run_id == "p"
    assert rt.respond("p.2", "later").status is Status.COMPLETED
    assert rt.get("p") == parent
    env.check_ledger(rt, "p")
    env.check_ledger(rt, "p.2")


grand = Workflow("grand")


@grand.node(start=True)
def nest(run: Any) -> Any:
    if run.input > 0:
        return subworkflow("grand", run.input - 1, into="r", then="nest_end")
    return ask_user("bottom", into="r", then="nest_end")


@grand.node
def nest_end(run: Any) -> Any:
    return done(run.vars["r"])


def test_cancel_cascades_to_children_and_grandchildren(env: Any) -> None:
    """Cancelling a run cancels every unfinished descendant, each with a reason naming its
    parent; ledgers stay one record per transition."""
    rt = env.open([grand])
    rt.start(grand, 2, run_id="g")
    ids = ["g", "g.2", "g.2.2"]
    assert [rt.get(i).status for i in ids] == [Status.WAITING] * 3
    state = rt.cancel("g", "stop")
    assert state.status is Status.CANCELLED
    for run_id in ids:
        run = rt.get(run_id)
        assert run.status is Status.CANCELLED, run_id
        assert run.wait is None
        env.check_ledger(rt, run_id)
    assert rt.get("g.2").error.message == "parent g cancelled: stop"
    assert "parent g.2 cancelled" in rt.get("g.2.2").error.message


def test_cancel_without_cascade_leaves_children(env: Any) -> None:
    """``cancel(cascade=False)`` cancels only the run - also after a later ``recover()``,
    which finishes only the cascades a crash cut short (before: it cancelled the children
    the caller chose to keep)."""
    rt = env.open([grand])
    rt.start(grand, 1, run_id="g")
    rt.cancel("g", cascade=False)
    assert rt.get("g").status is Status.CANCELLED
    assert rt.get("g.2").status is Status.WAITING
    rt.recover()
    assert rt.get("g.2").status is Status.WAITING


def test_cancel_reaches_the_bottom_of_a_chain_deeper_than_the_recursion_limit() -> None:
    """The cascade walks the tree with a stack of its own: a chain of 1,200 waiting runs
    (Python's recursion limit is 1,000) is cancelled to the last one (before: a raw
    RecursionError two thirds down, the rest left waiting)."""
    from wakepoint import Runtime

    rt = Runtime("memory:", [grand], checkpoints=False)
    rt.start(grand, 1200, run_id="root")
    rt.cancel("root")
    statuses = {s.status for s in rt.list()}
    assert statuses == {Status.CANCELLED} and len(rt.list()) == 1201


def test_a_child_finishing_during_the_cascade_does_not_stop_it(env: Any) -> None:
    """A child that finishes between the cascade's look and its cancel (another process,
    or its own last node) is passed over instead of failing the whole ``cancel`` with
    ``RunFinished`` (before: raised, after the parent was already cancelled)."""
    rt = env.open([grand])
    rt.start(grand, 2, run_id="n")  # n -> n.2 -> n.2.2 (waiting)
    load = rt.store.load
    raced: list[str] = []

    def racing(run_id: str) -> Any:
        if run_id == "n.2" and not raced:
            raced.append(run_id)
            stale = load(run_id)  # what the cascade sees: unfinished
            rt.cancel("n.2", cascade=False)  # ...and it finishes right after the look
            return stale
        return load(run_id)

    rt.store.load = racing  # type: ignore[method-assign]
    try:
        state = rt.cancel("n")
    finally:
        rt.store.load = load  # type: ignore[method-assign]
    assert raced == ["n.2"]
    assert state.status is Status.CANCELLED
    assert rt.get("n.2").status is Status.CANCELLED


# --- call ----------------------------------------------------------------------------------

caller = Workflow("caller")


@caller.node(start=True)
def invoke(run: Any) -> Any:
    spec = run.input
    retry = Retry(**spec["retry"]) if spec.get("retry") else None
    return call(spec["fn"], spec.get("args"), into="result", then="report", retry=retry,
                timeout=spec.get("timeout"), on_error=spec.get("on_error"))


@caller.node
def report(run: Any) -> Any:
    return done(run.vars["result"])


class Flaky:
    """Fails with ``errors`` in turn, then returns ``value``; records every call."""

    def __init__(self, errors: list[BaseException], value: Any = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.keys: list[str] = []

    def __call__(self, *, idempotency_key: str) -> Any:
        self.keys.append(idempotency_key)
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def test_call_result_lands_in_var(env: Any) -> None:
    """``call`` runs the function with keyword or positional args; its result goes to
    ``into``."""
    rt = env.open([caller], {"mul": lambda a, b: a * b})
    run = rt.start(caller, {"fn": "mul", "args": {"a": 6, "b": 7}}, run_id="c1")
    assert run.status is Status.COMPLETED
    assert run.output == 42
    assert run.vars["result"] == 42
    assert rt.start(caller, {"fn": "mul", "args": [3, 5]}, run_id="c2").output == 15
    env.check_ledger(rt, "c1")


def test_call_passes_idempotency_key(env: Any) -> None:
    """A function that declares ``idempotency_key`` receives ``run_id:step`` of the request,
    the same on every attempt; it is the key of the ledger's request and resume records."""
    fn = Flaky([ConnectionError("a"), ConnectionError("b")], value=1)
    rt = env.open([caller], {"fn": fn})
    run = rt.start(caller, {"fn": "fn", "retry": {"attempts": 3}}, run_id="c1")
    assert run.status is Status.COMPLETED
    assert fn.keys == ["c1:2"] * 3
    keyed = [(b.kind, b.key) for b in env.bodies(rt.ledger("c1")) if b.key]
    assert keyed == [("effect.requested", "c1:2"), ("wait.resumed", "c1:2")]


def test_each_call_attempt_gets_its_own_copy_of_the_arguments(env: Any) -> None:
    """A function that changes its arguments and then fails does not hand the changed
    values to the retry, nor change the committed request."""
    seen: list[dict[str, int]] = []

    def bump(box: dict[str, int]) -> int:
        seen.append(dict(box))
        box["n"] += 1
        if len(seen) == 1:
            raise ConnectionError("transient")
        return box["n"]

    rt = env.open([caller], {"bump": bump}, sleep=lambda _: None)
    run = rt.start(caller, {"fn": "bump", "args": [{"n": 1}], "retry": {"attempts": 2}},
                   run_id="c1")
    assert seen == [{"n": 1}, {"n": 1}]
    assert run.output == 2
    env.check_ledger(rt, "c1")


def test_the_idempotency_key_check_is_not_inherited_by_a_new_function(env: Any) -> None:
    """Whether a function takes ``idempotency_key`` is remembered per function object, not
    per ``id()``: a new function at a reused address is looked at afresh."""
    import gc

    rt = env.open([caller], {})
    for i in range(20):
        # Alternately with and without the parameter; each function is dropped after use,
        # so CPython reuses addresses.
        if i % 2:
            def fn(idempotency_key: str) -> str:
                return idempotency_key
        else:
            def fn() -> str:  # type: ignore[misc]
                return "plain"
        rt.register_function("fn", fn)
        run = rt.start(caller, {"fn": "fn"}, run_id=f"k{i}")
        assert run.status is Status.COMPLETED, run.error
        assert run.output == (f"k{i}:2" if i % 2 else "plain")
        rt.register_function("fn", len)  # the only reference to fn goes
        del fn
        gc.collect()


def test_call_retries_with_exponential_backoff(env: Any) -> None:
    """Failed attempts are retried after delays that grow by ``multiplier`` from ``initial``,
    capped at ``max_delay``, each within ``jitter`` of its base."""
    delays: list[float] = []
    fn = Flaky([TimeoutError(str(i)) for i in range(5)], value="finally")
    rt = env.open([caller], {"fn": fn}, sleep=delays.append)
    policy = {"attempts": 6, "initial": 1.0, "multiplier": 3.0, "max_delay": 10.0,
              "jitter": 0.2}
    run = rt.start(caller, {"fn": "fn", "retry": policy}, run_id="c1")
    assert run.output == "finally"
    assert len(fn.keys) == 6
    bases = [1.0, 3.0, 9.0, 10.0, 10.0]
    assert len(delays) == len(bases)
    for delay, base in zip(delays, bases, strict=True):
        assert base * 0.8 <= delay <= base * 1.2, (delays, bases)
    assert delays[1] > delays[0] and delays[2] > delays[1]  # growth beats the jitter
    env.check_ledger(rt, "c1")


def test_call_jitter_comes_from_injected_random(env: Any) -> None:
    """The jitter factor is drawn from the runtime's ``rand``: 0 gives the lowest delay."""
    delays: list[float] = []
    fn = Flaky([OSError("x")] * 2)
    rt = env.open([caller], {"fn": fn}, sleep=delays.append, rand=lambda: 0.0)
    rt.start(caller, {"fn": "fn", "retry": {"attempts": 3, "initial": 2.0, "jitter": 0.5}})
    assert delays == [1.0, 2.0]


def test_call_retries_only_retry_on(env: Any) -> None:
    """A policy with ``retry_on`` retries those exceptions (and their subclasses) only; any
    other exception ends the call at once and fails the run with its type and message."""
    policy = {"attempts": 5, "retry_on": ["ConnectionError"]}
    retried = Flaky([ConnectionResetError("reset")], value="second time")
    rt = env.open([caller], {"retried": retried})
    assert rt.start(caller, {"fn": "retried", "retry": policy}).output == "second time"
    assert len(retried.keys) == 2

    refused = Flaky([ValueError("bad input"), ValueError("unreached")])
    rt = env.open([caller], {"refused": refused})
    state = rt.start(caller, {"fn": "refused", "retry": policy}, run_id="c2")
    assert len(refused.keys) == 1
    assert state.status is Status.FAILED
    assert (state.error.type, state.error.message) == ("ValueError", "bad input")
    assert state.error.retryable is False
    env.check_ledger(rt, "c2")


def test_call_gives_up_after_attempts(env: Any) -> None:
    """When every attempt fails, the run fails with the last error, or continues at
    ``on_error`` with ``{"error": {...}}`` in ``into``."""
    fn = Flaky([ConnectionError(f"try {i}") for i in range(3)])
    rt = env.open([caller], {"fn": fn})
    state = rt.start(caller, {"fn": "fn", "retry": {"attempts": 3}}, run_id="c1")
    assert state.status is Status.FAILED
    assert state.error.message == "try 2"
    assert state.error.retryable is True

    fn2 = Flaky([ConnectionError("down")])
    rt = env.open([caller], {"fn": fn2})
    state = rt.start(caller, {"fn": "fn", "on_error": "report"}, run_id="c2")
    assert state.status is Status.COMPLETED
    assert state.output == {"error": {"type": "ConnectionError", "message": "down"}}
    assert env.kinds(rt, "c2") == ["run.started", "effect.requested", "wait.rejected",
                                   "run.completed", "run.sealed"]


def test_call_timeout_counts_as_failed_attempt(env: Any) -> None:
    """An attempt that outlives ``timeout`` is abandoned as a ``TimeoutError``; after the last
    attempt the run fails with it."""
    release = threading.Event()
    started: list[str] = []

    def hang(*, idempotency_key: str) -> str:
        started.append(idempotency_key)
        release.wait(10)
        return "too late"

    rt = env.open([caller], {"hang": hang})
    try:
        state = rt.start(caller, {"fn": "hang", "timeout": 0.05, "retry": {"attempts": 2}},
                         run_id="c1")
    finally:
        release.set()
    # Each abandoned attempt runs on in its own thread; on a loaded machine one may not
    # have been scheduled within the 50 ms its attempt was given, so wait for it to begin.
    waited = time.monotonic() + 5
    while len(started) < 2 and time.monotonic() < waited:
        time.sleep(0.01)
    assert started == ["c1:2", "c1:2"]
    assert state.status is Status.FAILED
    assert state.error.type == "TimeoutError"
    assert "0.05" in state.error.message
    env.check_ledger(rt, "c1")


def test_call_of_unknown_function_fails_run(env: Any) -> None:
    """``call`` naming a function that is not registered fails the run with
    ``UnknownFunction`` naming it."""
    rt = env.open([caller])
    state = rt.start(caller, {"fn": "nope"}, run_id="c1")
    assert state.status is Status.FAILED
    assert state.error.type == "UnknownFunction"
    assert "'nope'" in state.error.message
    env.check_ledger(rt, "c1")


def test_call_with_unencodable_result_fails_run(env: Any) -> None:
    """A function whose result msgspec cannot encode fails the run with ``UnencodableValue``
    (the result cannot be committed, so it is never half-recorded)."""
    rt = env.open([caller], {"lock": threading.Lock})
    state = rt.start(caller, {"fn": "lock"}, run_id="c1")
    assert state.status is Status.FAILED
    assert state.error.type == "UnencodableValue"
    assert "'c1:2'" in state.error.message
    assert "result" not in state.vars
    assert env.kinds(rt, "c1") == ["run.started", "effect.requested", "run.failed",
                                   "run.sealed"]
    env.check_ledger(rt, "c1")


# --- custom effect kinds -------------------------------------------------------------------


class Doubler:
    """A user effect kind: resolves at once with twice its argument."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, str]] = []

    def handle(self, eff: Any, run: RunState, ctx: Any) -> Any:
        self.seen.append((eff.args, run.wait.key))
        if eff.args is None:
            return Failed(type="NothingToDouble", message="no argument")
        return Resolved(eff.args * 2)


class Outbox:
    """A user effect kind that parks: something outside resumes the run with ``resume``."""

    def handle(self, eff: Any, run: RunState, ctx: Any) -> Any:
        return Parked()


class AutoApprove:
    """Overrides the built-in ``ask_user``: every question is answered by its first choice."""

    def handle(self, eff: Any, run: RunState, ctx: Any) -> Any:
        return Resolved(eff.choices[0])


custom = Workflow("custom")


@custom.node(start=True)
def use_kind(run: Any) -> Any:
    return effect(run.input["kind"], run.input.get("arg"), into="value", then="custom_end",
                  on_error=run.input.get("on_error"))


@custom.node
def custom_end(run: Any) -> Any:
    return done(run.vars["value"])


def test_custom_effect_kind_resolves(env: Any) -> None:
    """A handler registered under a new kind carries out ``effect(kind, args)``; its value
    lands in ``into``."""
    doubler = Doubler()
    rt = env.open([custom], handlers={"double": doubler})
    state = rt.start(custom, {"kind": "double", "arg": 21}, run_id="e1")
    assert state.output == 42
    assert doubler.seen == [(21, "e1:2")]
    env.check_ledger(rt, "e1")


def test_custom_effect_kind_failure_and_parking(env: Any) -> None:
    """A custom handler's ``Failed`` goes to ``on_error`` (or fails the run), and ``Parked``
    leaves the run waiting until ``resume`` with the wait's key."""
    rt = env.open([custom], handlers={"double": Doubler(), "outbox": Outbox()})
    failed = rt.start(custom, {"kind": "double"}, run_id="e1")
    assert failed.status is Status.FAILED
    assert failed.error.type == "NothingToDouble"
    handled = rt.start(custom, {"kind": "double", "on_error": "custom_end"}, run_id="e2")
    assert handled.output == {"error": {"type": "NothingToDouble", "message": "no argument"}}
    parked = rt.start(custom, {"kind": "outbox", "arg": "mail"}, run_id="e3")
    assert parked.status is Status.WAITING
    assert parked.wait.kind == "effect"
    assert rt.resume("e3", parked.wait.key, "sent").output == "sent"
    for run_id in ("e1", "e2", "e3"):
        env.check_ledger(rt, run_id)


def test_unregistered_effect_kind_fails_run(env: Any) -> None:
    """An effect of a kind with no handler fails the run with ``UnknownEffect``."""
    rt = env.open([custom])
    state = rt.start(custom, {"kind": "teleport"}, run_id="e1")
    assert state.status is Status.FAILED
    assert state.error.type == "UnknownEffect"
    assert "'teleport'" in state.error.message


def test_handler_exception_fails_run(env: Any) -> None:
    """A handler that raises fails the run with the exception's type and message."""

    class Broken:
        def handle(self, eff: Any, run: RunState, ctx: Any) -> Any:
            raise KeyError("handler bug")

    rt = env.open([custom], handlers={"broken": Broken()})
    state = rt.start(custom, {"kind": "broken"}, run_id="e1")
    assert state.status is Status.FAILED
    assert state.error.type == "KeyError"
    assert "handler bug" in state.error.message


def test_handler_overrides_builtin(env: Any) -> None:
    """A handler registered under a built-in kind replaces the built-in: here ``ask_user`` is
    answered automatically and the run never waits for a person."""
    rt = env.open([review], handlers={"ask_user": AutoApprove()})
    state = rt.start(review, run_id="q1")
    assert state.status is Status.COMPLETED
    assert state.output == {"by": "reviewer", "answer": "approve"}
    assert env.kinds(rt, "q1") == ["run.started", "effect.requested", "wait.resumed",
                                   "run.completed", "run.sealed"]


def test_handler_without_handle_method_is_rejected(env: Any) -> None:
    """Registering an object without ``handle`` fails at construction, naming the kind."""
    with pytest.raises(TypeError, match="'nonsense'"):
        env.open([], handlers={"nonsense": object()})


# --- one runtime, many threads -------------------------------------------------------------


class Gate:
    """A function that blocks until released; ``entered`` is set once it is running."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        self.entered.set()
        self.release.wait(30)
        return "late"


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test, which asserts on it
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _cancel_during(rt: Any, run_id: str, gate: Gate, why: str) -> None:
    """Once ``gate``'s call runs, cancel ``run_id`` from another thread: it must land before
    the call ends (the gate is opened afterwards, either way)."""
    try:
        assert gate.entered.wait(10)
        canceller, cancel_out = _in_thread(lambda: rt.cancel(run_id, "operator"))
        canceller.join(10)
        assert not canceller.is_alive(), why
        assert cancel_out[0].status is Status.CANCELLED
    finally:
        gate.release.set()


def test_slow_call_does_not_block_other_runs(env: Any) -> None:
    """While one thread's run waits on a slow ``call``, other threads start, answer and
    signal other runs of the same runtime (no runtime-wide lock is held across a drive)."""
    gate = Gate()
    rt = env.open([caller, review, webhook], {"slow": gate})
    slow, slow_out = _in_thread(lambda: rt.start(caller, {"fn": "slow"}, run_id="c1"))
    try:
        assert gate.entered.wait(10)

        def others() -> list[Status]:
            rt.start(review, run_id="r1")
            rt.start(webhook, {"key": "hook"}, run_id="w1")
            return [rt.respond("r1", "approve").status,
                    *(s.status for s in rt.send_event("hook", {"n": 1}))]

        other, other_out = _in_thread(others)
        other.join(10)
        assert not other.is_alive(), "other runs waited for the slow call"
        assert other_out == [[Status.COMPLETED, Status.COMPLETED]]
    finally:
        gate.release.set()
    slow.join(10)
    assert slow_out[0].status is Status.COMPLETED
    for run_id in ("c1", "r1", "w1"):
        env.check_ledger(rt, run_id)


def test_cancel_during_a_call_takes_effect_at_once(env: Any) -> None:
    """``cancel`` from another thread while the run's ``call`` is running commits at once; the
    call's late result is dropped (the drive finds the run moved on) and never recorded."""
    gate = Gate()
    rt = env.open([caller], {"slow": gate})
    slow, slow_out = _in_thread(lambda: rt.start(caller, {"fn": "slow"}, run_id="c1"))
    _cancel_during(rt, "c1", gate, "cancel waited for the running call")
    slow.join(10)
    assert not slow.is_alive()
    assert slow_out[0].status is Status.CANCELLED
    assert "result" not in rt.get("c1").vars
    assert env.kinds(rt, "c1") == ["run.started", "effect.requested", "run.cancelled",
                                   "run.sealed"]
    env.check_ledger(rt, "c1")


def test_abandoned_call_attempts_are_bounded(env: Any, monkeypatch: Any) -> None:
    """Timed-out attempts still running are counted process-wide; at the limit a timed attempt
    is not started (``TooManyAbandonedCalls``), and once they end, calls run again."""
    from wakepoint.effects import builtins as handlers

    def settle() -> None:  # the count is process-wide: wait for other tests' attempts to end
        waited = time.monotonic() + 10
        while handlers._abandoned.running and time.monotonic() < waited:
            time.sleep(0.01)
        assert handlers._abandoned.running == 0

    settle()
    monkeypatch.setattr(handlers, "MAX_ABANDONED_ATTEMPTS", 2)
    release = threading.Event()
    started: list[str] = []

    def hang(*, idempotency_key: str) -> str:
        started.append(idempotency_key)
        release.wait(30)
        return "late"

    rt = env.open([caller], {"hang": hang})
    spec = {"fn": "hang", "timeout": 0.05, "retry": {"attempts": 2}}
    try:
        first = rt.start(caller, spec, run_id="c1")
        assert first.error.type == "TimeoutError"
        assert handlers._abandoned.running == 2
        refused = rt.start(caller, spec, run_id="c2")
    finally:
        release.set()
    assert refused.status is Status.FAILED
    assert refused.error.type == "TooManyAbandonedCalls"
    assert "2 earlier attempts" in refused.error.message
    settle()
    assert "c2:2" not in started
    # Time enough for a loaded machine to schedule the attempt's thread.
    assert rt.start(caller, {**spec, "timeout": 10}, run_id="c3").output == "late"
    for run_id in ("c1", "c2", "c3"):
        env.check_ledger(rt, run_id)


def test_recovery_leaves_a_running_call_to_its_thread(env: Any) -> None:
    """``recover()`` or ``recover_run(redispatch=True)`` from another thread while a ``call``
    runs do not dispatch it again: the runtime knows its own thread is on it."""
    gate = Gate()
    rt = env.open([caller], {"slow": gate})
    slow, slow_out = _in_thread(lambda: rt.start(caller, {"fn": "slow"}, run_id="c1"))
    try:
        assert gate.entered.wait(10)
        recovering, recover_out = _in_thread(
            lambda: (rt.recover(), rt.recover_run("c1", redispatch=True)))
        recovering.join(10)
        assert not recovering.is_alive(), "recovery dispatched the running call again"
        assert recover_out[0][1].status is Status.WAITING
        assert gate.calls == 1
    finally:
        gate.release.set()
    slow.join(10)
    assert slow_out[0].output == "late"
    assert gate.calls == 1
    env.check_ledger(rt, "c1")


class _ParkAll:
    """A ``call`` handler that parks every request: the process that committed the requests
    and died before resolving them."""

    def handle(self, effect: Any, run: Any, ctx: Any) -> Any:
        return Parked()


def test_two_recoveries_never_dispatch_one_request_twice(env: Any) -> None:
    """Two threads recovering at once: each orphaned request is dispatched by one of them (one
    recovery commits a run's outcome before another may look at that run)."""
    calls = {"fast": 0, "slow": 0}
    fast_done = threading.Event()

    def fast() -> str:
        calls["fast"] += 1
        fast_done.set()
        return "x"

    def slow() -> str:
        calls["slow"] += 1
        time.sleep(0.5)  # keeps the first recovery busy after it resolved "fast"
        return "y"

    dead = env.open([caller], handlers={"call": _ParkAll()})
    dead.start(caller, {"fn": "fast"}, run_id="a1")
    dead.start(caller, {"fn": "slow"}, run_id="a2")
    rt = env.open([caller], {"fast": fast, "slow": slow})
    first, _ = _in_thread(rt.recover)
    assert fast_done.wait(10)
    rt.recover()
    first.join(10)
    assert calls == {"fast": 1, "slow": 1}
    assert rt.get("a1").output == "x" and rt.get("a2").output == "y"
    for run_id in ("a1", "a2"):
        env.check_ledger(rt, run_id)


def test_recovery_leaves_a_run_that_moved_since_it_was_listed(env: Any) -> None:
    """A run ``recover()`` listed as waiting on a request, whose live dispatcher (a thread of
    this runtime) commits the outcome while recovery is busy elsewhere, is not dispatched
    again."""
    gate = Gate()
    slow_done = threading.Event()

    def earlier() -> str:  # an orphan recovery dispatches before it reaches c1
        gate.release.set()  # the live call ends meanwhile ...
        assert slow_done.wait(10)  # ... and its thread commits the outcome
        return "ok"

    dead = env.open([caller], handlers={"call": _ParkAll()})
    dead.start(caller, {"fn": "earlier"}, run_id="b0")
    rt = env.open([caller], {"slow": gate, "earlier": earlier})
    slow, slow_out = _in_thread(
        lambda: (rt.start(caller, {"fn": "slow"}, run_id="c1"), slow_done.set())[0])
    assert gate.entered.wait(10)
    rt.recover()
    slow.join(10)
    assert gate.calls == 1
    assert slow_out[0].output == "late"
    for run_id in ("b0", "c1"):
        env.check_ledger(rt, run_id)


@pytest.mark.parametrize("mode", ["wait", "detach"])
def test_cancel_while_a_child_is_created_cancels_the_child(mode: str) -> None:
    """A parent cancelled between its ``subworkflow`` request and its child's creation (the
    cascade finds no child yet): the child is cancelled as soon as it exists, and runs no
    node."""
    from wakepoint import Runtime
    from wakepoint.ledger.keys import Signer
    from wakepoint.stores import MemoryStore

    creating, cancelled = threading.Event(), threading.Event()

    class SlowChildCreate(MemoryStore):
        def create(self, state: RunState, records: Any) -> None:
            if state.parent is not None:
                creating.set()
                cancelled.wait(10)
            super().create(state, records)

    charged: list[str] = []
    child = Workflow("child.charge")

    @child.node(start=True)
    def act(run: Any) -> Any:
        return call("charge", None, into="r", then="fin")

    @child.node
    def fin(run: Any) -> Any:
        return done(run.vars["r"])

    parent = Workflow("parent.spawn")

    @parent.node(start=True)
    def spawn(run: Any) -> Any:
        return subworkflow("child.charge", None, into="out", then="end", mode=mode)

    @parent.node
    def end(run: Any) -> Any:
        return done(run.vars.get("out"))

    rt = Runtime(SlowChildCreate(), [child, parent], {"charge": lambda: charged.append("x")},
                 signer=Signer.generate(), checkpoints=False)
    starter, _ = _in_thread(lambda: rt.start(parent, run_id="P"))
    assert creating.wait(10)
    assert rt.cancel("P", "operator").status is Status.CANCELLED
    cancelled.set()
    starter.join(10)
    assert rt.get("P.2").status is Status.CANCELLED
    assert rt.get("P").status is Status.CANCELLED
    assert charged == []


def test_a_cancel_cascade_goes_on_past_a_child_it_cannot_catch() -> None:
    """A child whose every cancel loses the race to its driver (``ConflictError`` each time)
    is logged and passed over: the cascade still cancels the rest of the tree."""
    from wakepoint import ConflictError, Runtime
    from wakepoint.ledger.keys import Signer
    from wakepoint.stores import MemoryStore

    outrun: set[str] = set()

    class Outrun(MemoryStore):
        def commit(self, run_id: str, expected_seq: int, state: RunState,
                   records: Any) -> None:
            if run_id in outrun:
                raise ConflictError(run_id, expected_seq, expected_seq + 1)
            super().commit(run_id, expected_seq, state, records)

    leaf = Workflow("leaf.wait")

    @leaf.node(start=True)
    def hang(run: Any) -> Any:
        return wait_event(f"never:{run.run_id}", into="e", then="fin")

    @leaf.node
    def fin(run: Any) -> Any:
        return done(None)

    tree = Workflow("tree.two")

    @tree.node(start=True)
    def one(run: Any) -> Any:
        return subworkflow("leaf.wait", None, into="a", then="two", mode="detach")

    @tree.node
    def two(run: Any) -> Any:
        return subworkflow("leaf.wait", None, into="b", then="park", mode="detach")

    @tree.node
    def park(run: Any) -> Any:
        return wait_event("never", into="e", then="park")

    rt = Runtime(Outrun(), [leaf, tree], signer=Signer.generate(), checkpoints=False)
    root = rt.start(tree, run_id="T")
    first, second = root.children
    outrun.add(first)
    assert rt.cancel("T").status is Status.CANCELLED
    assert rt.get(first).status is Status.WAITING  # left for recover() to cancel
    assert rt.get(second).status is Status.CANCELLED
    outrun.clear()
    rt.recover()
    assert rt.get(first).status is Status.CANCELLED



@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: forking with threads
def test_a_forked_child_starts_with_no_abandoned_attempts(monkeypatch: Any) -> None:
    """The abandoned-attempt count is per process: a child forked while attempts of its parent
    hang is not refused for them (their threads are not in the child)."""
    import os

    from wakepoint.effects import builtins as handlers

    release = threading.Event()

    def hang() -> None:
        release.wait(30)

    monkeypatch.setattr(handlers, "MAX_ABANDONED_ATTEMPTS", 1)
    try:
        with pytest.raises(TimeoutError):
            handlers._attempt(hang, [], {}, 0.01)
        assert handlers._abandoned.running >= 1
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                answer = handlers._attempt(lambda: "ran", [], {}, 5)
            except BaseException as exc:  # reported to the parent
                answer = type(exc).__name__
            os.write(write_end, str(answer).encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        assert os.read(read_end, 100).decode() == "ran"
        os.close(read_end)
    finally:
        release.set()


def test_jsonl_other_processes_find_a_dispatching_run_busy(jsonl_env: Any) -> None:
    """On JSONL the run's file lock stays with the process that dispatches its ``call``:
    another store on the directory (another process: ``flock`` locks are per open file) cannot
    ``take`` it for an orphan sweep while the call runs, and can once it is over."""
    from datetime import timedelta

    from wakepoint.stores.jsonl import JsonlStore

    gate = Gate()
    rt = jsonl_env.open([caller], {"slow": gate})
    slow, slow_out = _in_thread(lambda: rt.start(caller, {"fn": "slow"}, run_id="c1"))
    other = JsonlStore(jsonl_env.root, durability="none")
    try:
        assert gate.entered.wait(10)
        assert other.take("c1", "sweeper", timedelta(seconds=30), jsonl_env.clock()) is False
    finally:
        gate.release.set()
    slow.join(10)
    assert slow_out[0].output == "late"
    assert other.take("c1", "sweeper", timedelta(seconds=30), jsonl_env.clock()) is True
    assert gate.calls == 1
    other.close()


def test_a_second_drive_during_a_handler_lets_go_in_its_own_handler(jsonl_env: Any) -> None:
    """A handler whose own thread resumes the run before it returns ``Parked`` (an async
    executor): that second drive reaches a slow ``call`` while the first is still in its
    handler, and a ``cancel`` from a third thread still lands at once."""
    gate = Gate()
    job = Workflow("job.async")

    @job.node(start=True)
    def submit(run: Any) -> Any:
        return effect("job", None, into="r", then="work")

    @job.node
    def work(run: Any) -> Any:
        return call("slow", None, into="s", then="fin")

    @job.node
    def fin(run: Any) -> Any:
        return done(run.vars["s"])

    holder: dict[str, Any] = {}

    class AsyncJob:
        def handle(self, eff: Any, run: Any, ctx: Any) -> Any:
            key = run.wait.key
            thread, _ = _in_thread(lambda: holder["rt"].resume(run.run_id, key, "done"))
            holder["resumer"] = thread
            assert gate.entered.wait(10)  # the resumed drive is in its call
            return Parked()

    rt = jsonl_env.open([job], {"slow": gate}, handlers={"job": AsyncJob()})
    holder["rt"] = rt
    starter, _ = _in_thread(lambda: rt.start(job, run_id="X"))
    _cancel_during(rt, "X", gate, "cancel waited for the second drive's call")
    starter.join(10)
    holder["resumer"].join(10)
    assert rt.get("X").status is Status.CANCELLED
    assert gate.calls == 1
    jsonl_env.check_ledger(rt, "X")


def test_closing_the_store_during_a_call_is_a_store_error(jsonl_env: Any) -> None:
    """``close()`` while another thread's drive is in a ``call``: that drive's next commit
    raises ``StoreError`` (the store is closed), not an internal assertion."""
    from wakepoint.stores import StoreError

    gate = Gate()
    rt = jsonl_env.open([caller], {"slow": gate})
    slow, slow_out = _in_thread(lambda: rt.start(caller, {"fn": "slow"}, run_id="c1"))
    assert gate.entered.wait(10)
    rt.close()
    gate.release.set()
    slow.join(10)
    assert isinstance(slow_out[0], StoreError), repr(slow_out[0])


def test_recover_lists_the_parent_it_resumed(env: Any) -> None:
    """A crash left a child created but never driven, its parent waiting on it: ``recover()``
    drives the child and resumes the parent, and returns both."""
    from wakepoint.effects.builtins import SubworkflowHandler

    kid = Workflow("kid.quick")

    @kid.node(start=True)
    def quick(run: Any) -> Any:
        return done(42)

    par = Workflow("par.waits")

    @par.node(start=True)
    def spawn(run: Any) -> Any:
        return subworkflow("kid.quick", None, into="out", then="end", mode="wait")

    @par.node
    def end(run: Any) -> Any:
        return done(run.vars["out"])

    class DiesAfterCreate(SubworkflowHandler):
        def handle(self, eff: Any, run: Any, ctx: Any) -> Any:
            out = super().handle(eff, run, ctx)
            ctx._queue.clear()  # the process dies before it drives the child
            return out

    dead = env.open([kid, par], handlers={"subworkflow": DiesAfterCreate()})
    dead.start(par, run_id="P")
    rt = env.open([kid, par])
    assert sorted(s.run_id for s in rt.recover()) == ["P", "P.2"]
    assert rt.get("P").output == 42
