"""A hypothesis state machine that drives ``Runtime`` on a JSONL directory against a plain model.

Rules start runs of three workflows (a question, an event wait, two ``call``s), answer them
(validly or not), send events, cancel runs, and crash: the ``Runtime`` is dropped without
``close()`` - sometimes in the middle of an operation, at a chosen commit, just before or just
after it reaches the file - and a new ``Runtime`` on the same directory runs ``recover()``.

The model is a dict from run id to what the run must look like: status, output, and the wait
it is parked on.  Invariants after every rule: ``rt.get`` matches the model for every run and
the store holds no other run; every chain verifies; every run has one ledger record per
transition (``len(ledger) == state.step``); every ``call`` result is recorded once, and the
function ran (at least once) for exactly the calls the ledger requested.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from wakepoint import (
    InvalidAnswer,
    RunFinished,
    Runtime,
    Status,
    Workflow,
    WrongWaitKey,
    ask_user,
    call,
    done,
    wait_event,
)
from wakepoint.stores.jsonl import JsonlStore

ask_wf = Workflow("sm-ask")


@ask_wf.node(start=True)
def question(run: Any) -> Any:
    return ask_user("yes or no?", choices=["yes", "no"], into="answer", then="answered")


@ask_wf.node
def answered(run: Any) -> Any:
    return done({"answer": run.vars["answer"], "input": run.input})


event_wf = Workflow("sm-event")


@event_wf.node(start=True)
def listen(run: Any) -> Any:
    return wait_event(f"ev:{run.input}", into="event", then="heard")


@event_wf.node
def heard(run: Any) -> Any:
    return done(run.vars["event"])


call_wf = Workflow("sm-call")


@call_wf.node(start=True)
def first(run: Any) -> Any:
    return call("inc", {"x": run.input}, into="x", then="second")


@call_wf.node
def second(run: Any) -> Any:
    return call("inc", {"x": run.vars["x"]}, into="x", then="total")


@call_wf.node
def total(run: Any) -> Any:
    return done(run.vars["x"])


WORKFLOWS = {"ask": ask_wf, "event": event_wf, "call": call_wf}


class Expect(msgspec.Struct):
    """What the model says a run looks like."""

    status: Status
    output: Any = None
    wait_kind: str | None = None
    wait_key: str | None = None


def expected_start(kind: str, run_id: str, value: int) -> Expect:
    """Where a freshly started run of ``kind`` must stop."""
    if kind == "ask":
        return Expect(Status.WAITING, wait_kind="user", wait_key=f"{run_id}:2")
    if kind == "event":
        return Expect(Status.WAITING, wait_kind="event", wait_key=f"ev:{value}")
    return Expect(Status.COMPLETED, output=value + 2)


class Countdown:
    """Crash rule: dies at the ``n``-th write (create or commit) of ``run_id``."""

    def __init__(self, run_id: str, n: int) -> None:
        self.run_id = run_id
        self.left = n

    def __call__(self, run_id: str, state: Any) -> bool:
        if run_id != self.run_id:
            return False
        self.left -= 1
        return self.left == 0


class RuntimeMachine(RuleBasedStateMachine):
    def __init__(self, base: Path, kit: Any) -> None:
        super().__init__()
        self.kit = kit
        self.root = Path(tempfile.mkdtemp(dir=base))
        self.clock = kit.FakeClock()
        self.model: dict[str, Expect] = {}
        self.calls: list[str] = []
        self.counter = 0
        self.runtimes: list[Runtime] = []
        self.crashes = 0
        self.rt = self._open()

    # --- plumbing ------------------------------------------------------------------------

    def inc(self, x: int, idempotency_key: str) -> int:
        self.calls.append(idempotency_key)
        return x + 1

    def _open(self) -> Runtime:
        store = self.kit.CrashingStore(JsonlStore(self.root, durability="batch"))
        rt = Runtime(store, WORKFLOWS.values(), {"inc": self.inc}, clock=self.clock)
        self.runtimes.append(rt)
        return rt

    def _restart(self) -> None:
        """The process died: drop the runtime unclosed, open a new one, recover."""
        self.crashes += 1
        self.rt = self._open()
        self.rt.recover()

    def _new_id(self) -> str:
        self.counter += 1
        return f"run-{self.counter}"

    def _waiting(self, wait_kind: str) -> list[str]:
        return sorted(r for r, e in self.model.items() if e.wait_kind == wait_kind)

    def teardown(self) -> None:
        for rt in self.runtimes:
            rt.close()

    # --- rules ---------------------------------------------------------------------------

    @rule(kind=st.sampled_from(sorted(WORKFLOWS)), value=st.integers(0, 2))
    def start(self, kind: str, value: int) -> None:
        run_id = self._new_id()
        state = self.rt.start(WORKFLOWS[kind], value, run_id=run_id)
        self.model[run_id] = expected_start(kind, run_id, value)
        assert state.status is self.model[run_id].status

    @rule(kind=st.sampled_from(sorted(WORKFLOWS)), value=st.integers(0, 2),
          n=st.integers(1, 6), after=st.booleans())
    def start_and_crash(self, kind: str, value: int, n: int, after: bool) -> None:
        """The process dies at the ``n``-th write of a run being started."""
        run_id = self._new_id()
        self.rt.store.arm(Countdown(run_id, n), after=after)
        try:
            self.rt.start(WORKFLOWS[kind], value, run_id=run_id)
        except self.kit.SimulatedCrash:
            self._restart()
            if n == 1 and not after:
                return  # the create never reached the disk: there is no run
        finally:
            self.rt.store.arm(None)
        self.model[run_id] = expected_start(kind, run_id, value)

    @precondition(lambda self: self._waiting("user"))
    @rule(data=st.data(), answer=st.sampled_from(["yes", "no", "maybe"]))
    def respond(self, data: st.DataObject, answer: str) -> None:
        run_id = data.draw(st.sampled_from(self._waiting("user")))
        if answer == "maybe":
            with pytest.raises(InvalidAnswer):
                self.rt.respond(run_id, answer)
            return
        state = self.rt.respond(run_id, answer)
        self.model[run_id] = Expect(Status.COMPLETED, output={"answer": answer,
                                                              "input": state.input})

    @precondition(lambda self: self._waiting("user"))
    @rule(data=st.data(), after=st.booleans())
    def respond_and_crash(self, data: st.DataObject, after: bool) -> None:
        """The process dies while applying an answer, before or after its one commit (the
        resume together with the node it lets run).  Only an answer whose commit never
        landed is lost."""
        run_id = data.draw(st.sampled_from(self._waiting("user")))
        self.rt.store.arm(Countdown(run_id, 1), after=after)
        try:
            with pytest.raises(self.kit.SimulatedCrash):
                self.rt.respond(run_id, "yes")
        finally:
            self.rt.store.arm(None)
        self._restart()
        if not after:
            return
        state = self.rt.get(run_id)
        self.model[run_id] = Expect(Status.COMPLETED, output={"answer": "yes",
                                                              "input": state.input})

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def resume_with_wrong_key(self, data: st.DataObject) -> None:
        run_id = data.draw(st.sampled_from(sorted(self.model)))
        expect = self.model[run_id]
        before = (self.rt.get(run_id), self.rt.ledger(run_id))
        error = RunFinished if expect.status.finished else WrongWaitKey
        with pytest.raises(error):
            self.rt.resume(run_id, "no-such-key", 1)
        assert (self.rt.get(run_id), self.rt.ledger(run_id)) == before

    @rule(value=st.integers(0, 3))
    def send_event(self, value: int) -> None:
        key = f"ev:{value}"
        payload = {"event": self.counter, "value": value}
        resumed = self.rt.send_event(key, payload)
        expected = sorted(r for r, e in self.model.items() if e.wait_key == key)
        assert sorted(s.run_id for s in resumed) == expected
        for run_id in expected:
            self.model[run_id] = Expect(Status.COMPLETED, output=payload)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        run_id = data.draw(st.sampled_from(sorted(self.model)))
        if self.model[run_id].status.finished:
            with pytest.raises(RunFinished):
                self.rt.cancel(run_id)
            return
        assert self.rt.cancel(run_id).status is Status.CANCELLED
        self.model[run_id] = Expect(Status.CANCELLED)

    @rule()
    def crash(self) -> None:
        """Drop the runtime between operations: every run is at rest, nothing to recover."""
        self.crashes += 1
        self.rt = self._open()
        assert self.rt.recover() == []

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def runs_match_model(self) -> None:
        stored = {s.run_id: s for s in self.rt.list()}
        assert sorted(stored) == sorted(self.model)
        for run_id, expect in self.model.items():
            state = stored[run_id]
            assert state.status is expect.status, (run_id, state, expect)
            assert state.output == expect.output, run_id
            wait = state.wait
            assert (wait.kind if wait else None) == expect.wait_kind, run_id
            assert (wait.key if wait else None) == expect.wait_key, run_id

    @invariant()
    def ledgers_are_one_record_per_transition_and_verify(self) -> None:
        for run_id in self.model:
            self.kit.check_ledger(self.rt, run_id)

    @invariant()
    def calls_are_recorded_once(self) -> None:
        requested: Counter[str] = Counter()
        resumed: Counter[str] = Counter()
        for run_id in self.model:
            for body in self.kit.bodies(self.rt.ledger(run_id)):
                if body.effect == "call" and body.kind == "effect.requested":
                    requested[body.key] += 1
                elif body.kind == "wait.resumed" and body.key in requested:
                    resumed[body.key] += 1
        assert all(n == 1 for n in requested.values())
        assert all(n == 1 for n in resumed.values())
        # At rest every requested call has run and has its result recorded, and the function
        # never ran for a call the ledger does not hold.
        assert set(resumed) == set(requested)
        assert set(self.calls) == set(requested)


def test_runtime_against_model_with_crashes(
    tmp_path: Path, kit: Any
) -> None:
    """Runtime on JSONL, with crashes at any commit of start and respond, always agrees with
    a plain model after ``recover()``; ledgers stay one verified record per transition."""
    run_state_machine_as_test(
        lambda: RuntimeMachine(tmp_path, kit),
        settings=settings(
            max_examples=120, stateful_step_count=25, deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
