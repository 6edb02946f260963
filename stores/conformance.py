"""The store conformance suite: what every store must do, checked against a plain model.

Shipped with the package (after zarr's ``zarr.testing.stateful``) so that any store - ours or
a user's - can be run against the same rules.  It needs ``hypothesis`` (the ``dev`` extra);
``wakepoint.stores`` never imports this module, so users without it are unaffected.

What a store that passes has shown, for runs driven by the *real* kernel and signed by a real
``Signer``:

* **State and ledger agree with the model.**  After every operation, ``load`` returns exactly
  the last committed ``RunState`` of every run, ``ledger`` returns exactly the records that
  were committed (same bytes, same signatures, seq order) and the chain verifies against the
  store's ``log_id``.
* **Commits are all or nothing and optimistic.**  A commit whose ``expected_seq`` is not the
  stored head (a stale writer, or one that is ahead) raises ``ConflictError`` and changes
  nothing; ``create`` of a taken id raises ``RunExists``; an unknown run raises ``RunNotFound``;
  records or a state that do not continue the chain raise ``StoreError``.
* **Queries are views of the same data.**  ``list`` with every filter (status, workflow, wait
  kind, due before, parent, limit) returns the model's runs oldest first by
  ``(created_at, run_id)``; ``find_waiting(key)`` returns the WAITING runs on ``key``.
  Any string is a run id (slashes, ``..``, colons, spaces, non-ASCII, ids differing in case).
* **Every reader sees a returned commit.**  A second store object on the same location (as
  another process would open) sees each commit at once, and after it commits the first
  object refuses a commit from the head it had.
* **Restarts and crashes lose nothing that was committed.**  Reopening the store on the same
  location - after a clean ``close`` or after abandoning the open store without closing it,
  as a killed process would - gives back every committed state and record and the same
  ``log_id``.  (For ``durability="none"`` this is what a *process* crash keeps; the suite does
  not simulate power loss.)  ``close`` returns within ``CLOSE_TIMEOUT`` seconds.
* **Leases exclude.**  ``claim`` leases exactly the runs that need a worker (RUNNING, or
  WAITING past a deadline) and that no *other* worker holds an unexpired lease on, at most
  ``limit`` of them; ``release`` hands a lease back, and only its holder can; ``renew``
  extends only the holder's lease.
* **Processes race safely** (durable stores).  Several processes committing the same seq of
  one run: exactly one wins each round, the others get ``ConflictError``, and the final
  ledger is contiguous and verifies; several processes claiming at once never lease a run
  twice.

How to use it (see ``tests/test_store_conformance.py``)::

    class JsonlMachine(StoreMachine):
        def make_store(self) -> Store:
            return JsonlStore(self.tmpdir / "store", durability="none")

    TestJsonl = JsonlMachine.TestCase          # collected by pytest

    for check in QUERY_CHECKS: ...             # or run_queries_suite(make_store)
    race_commits(functools.partial(open_store, f"jsonl:{path}"))

A store that cannot survive a restart (memory) sets ``durable = False``: the restart and crash
rules then keep the same object, and ``race_commits`` / ``race_claims`` do not apply to it.
"""

from __future__ import annotations

import faulthandler
import hashlib
import multiprocessing
import queue
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

try:
    from hypothesis import note
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "wakepoint.stores.conformance needs hypothesis: pip install 'wakepoint[dev]'"
    ) from exc

import msgspec

from ..kernel import transitions
from ..kernel.errors import (
    ConflictError,
    InvalidAnswer,
    RunExists,
    RunNotFound,
    WrongWaitKey,
)
from ..kernel.steps import ask_user, call, done, fail, goto, wait_event, wait_until
from ..kernel.types import ErrorInfo, ParentLink, RunState, Status, Step, Transition
from ..kernel.workflow import RunView, Workflow
from ..ledger.keys import Signer
from ..ledger.records import Record, sign_entries, verify_chain
from .base import Store, StoreError

EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
"""Where the suite's clock starts; every ``now`` is ``EPOCH`` plus whole seconds."""

SIGNER_SEED = hashlib.sha256(b"wakepoint conformance signer").digest()
"""The suite's signing key seed: deterministic, so that failures reproduce byte for byte."""

EVENT_KEYS = ("evt:k0", "evt:k1")
"""Event keys the machine's runs wait on; two runs often share one."""


class ConformanceFailure(AssertionError):
    """A store broke a rule of the suite; the message names the rule and the difference.

    Raised explicitly rather than with ``assert`` so that the checks hold under ``python -O``
    and read well outside pytest's assertion rewriting.
    """


def conformance_signer() -> Signer:
    """The suite's deterministic signer."""
    return Signer.from_seed(SIGNER_SEED)


# --- the workflows the suite drives ---------------------------------------------------------
# Small but real: every kind of wait the kernel can open that a store must index (event, user,
# timer, effect), cycles, failures raised by a node, and vars that carry arbitrary JSON.

LINEAR = Workflow("conformance.linear")
"""``a -> b -> c -> done``; node ``b`` raises when the input says ``boom``."""


@LINEAR.node(start=True, name="a")
def _linear_a(run: RunView) -> Step:
    return goto("b", set={"data": run.input["data"]})


@LINEAR.node(name="b")
def _linear_b(run: RunView) -> Step:
    if run.input["boom"]:
        raise ValueError("boom: the input asked node b to fail")
    return goto("c", set={"b_step": run.step})


@LINEAR.node(name="c")
def _linear_c(run: RunView) -> Step:
    return done({"vars": dict(run.vars)})


EVENT = Workflow("conformance.event")
"""Waits for the event named by the input's ``key``, 5 s deadline (``late`` on timeout)."""


@EVENT.node(start=True, name="park")
def _event_park(run: RunView) -> Step:
    return wait_event(
        run.input["key"], into="payload", then="got",
        deadline=run.now + timedelta(seconds=5), on_timeout="late",
    )


@EVENT.node(name="got")
def _event_got(run: RunView) -> Step:
    return done({"payload": run.vars["payload"]})


@EVENT.node(name="late")
def _event_late(run: RunView) -> Step:
    return done("late")


ASK = Workflow("conformance.ask")
"""Asks yes/no/later with a 10 s timeout; ``later`` asks again (a cycle), ``no`` fails."""

ASK_CHOICES = ("yes", "no", "later")


@ASK.node(start=True, name="ask")
def _ask_ask(run: RunView) -> Step:
    return ask_user(
        "ship it?", choices=ASK_CHOICES, into="answer", then="decide", timeout=10,
        on_timeout="escalate",
    )


@ASK.node(name="decide")
def _ask_decide(run: RunView) -> Step:
    answer = run.vars["answer"]
    if answer == "yes":
        return done("shipped")
    if answer == "no":
        return fail("declined")
    return goto("ask")


@ASK.node(name="escalate")
def _ask_escalate(run: RunView) -> Step:
    return done("escalated")


CALL = Workflow("conformance.call")
"""Calls ``charge``; the result lands in ``receipt``, a rejection continues at ``recover``."""


@CALL.node(start=True, name="charge")
def _call_charge(run: RunView) -> Step:
    return call("charge", {"amount": run.input["data"]}, into="receipt", then="finish",
                on_error="recover")


@CALL.node(name="finish")
def _call_finish(run: RunView) -> Step:
    return done({"receipt": run.vars["receipt"]})


@CALL.node(name="recover")
def _call_recover(run: RunView) -> Step:
    return done({"recovered": run.vars["receipt"]})


TIMER = Workflow("conformance.timer")
"""Sleeps 3 s (a timer wait, due through ``timeout``), then finishes."""


@TIMER.node(start=True, name="sleep")
def _timer_sleep(run: RunView) -> Step:
    return wait_until(3, then="wake")


@TIMER.node(name="wake")
def _timer_wake(run: RunView) -> Step:
    return done(run.now.isoformat())


COUNTER = Workflow("conformance.counter")
"""One node that loops forever, counting: the run the process races commit to."""


@COUNTER.node(start=True, name="count")
def _counter_count(run: RunView) -> Step:
    return goto("count", set={"n": run.vars.get("n", 0) + 1})


WORKFLOWS: dict[str, Workflow] = {wf.id: wf for wf in (LINEAR, EVENT, ASK, CALL, TIMER, COUNTER)}
"""Every workflow of the suite, by id."""

MACHINE_WORKFLOWS = (LINEAR.id, EVENT.id, ASK.id, CALL.id, TIMER.id)
WAIT_KINDS = ("event", "user", "timer", "child", "effect")

JsonValue: TypeAlias = Any

json_values: st.SearchStrategy[JsonValue] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6,
)
"""Payloads and inputs: values JSON round-trips exactly (lists, not tuples; any text, which
includes line separators a line-oriented store must not split on)."""


# --- the model and the harness that drives the kernel ---------------------------------------


@dataclass
class ModelRun:
    """What the suite committed for one run: the store must give back exactly this."""

    state: RunState
    records: list[Record]
    history: list[RunState] = field(default_factory=list)
    """Every committed state, oldest first (stale writers start from these)."""

    @property
    def hashes(self) -> list[str]:
        """The record hashes of the run's chain, in seq order."""
        return [r.hash for r in self.records]


class Harness:
    """Drives the real kernel against a store, signing and committing every transition.

    ``runs`` is the model: each run's last committed state and records.  It changes only
    after the store accepted a commit, so a refused commit must leave store and model equal.
    """

    def __init__(self, store: Store, signer: Signer | None = None, now: datetime = EPOCH):
        self.store = store
        self.signer = signer or conformance_signer()
        self.now = now
        self.runs: dict[str, ModelRun] = {}

    def advance(self, seconds: float) -> datetime:
        """Move the clock forward; returns the new ``now``."""
        self.now += timedelta(seconds=seconds)
        return self.now

    def sign(self, prev: RunState | None, tr: Transition) -> tuple[RunState, list[Record]]:
        """Sign ``tr``'s entries onto the chain after ``prev`` (None: a new run)."""
        return sign_entries(
            self.signer, self.store.log_id, tr.state, tr.entries, self.now,
            prev_seq=-1 if prev is None else prev.seq, prev_head="" if prev is None else prev.head,
        )

    def start(
        self, wf: Workflow, run_id: str, input: JsonValue = None,
        *, parent: ParentLink | None = None,
    ) -> RunState:
        """Start a run with ``store.create`` and record it in the model."""
        state, records = self.sign(None, transitions.start(wf, run_id, input, self.now,
                                                           parent=parent))
        self.store.create(state, records)
        self.runs[run_id] = ModelRun(state, list(records), [state])
        return state

    def commit(self, run_id: str, tr: Transition) -> RunState:
        """Sign ``tr`` after the run's model state and commit it at that state's seq."""
        run = self.runs[run_id]
        state, records = self.sign(run.state, tr)
        self.store.commit(run_id, run.state.seq, state, records)
        run.state = state
        run.records.extend(records)
        run.history.append(state)
        return state

    def tick(self, run_id: str) -> RunState:
        """Tick a RUNNING run once."""
        state = self.runs[run_id].state
        return self.commit(run_id, transitions.tick(WORKFLOWS[state.workflow], state, self.now))

    def resume(self, run_id: str, payload: JsonValue) -> RunState:
        """Resume a WAITING run on its own key."""
        state = self.runs[run_id].state
        assert state.wait is not None
        wf = WORKFLOWS[state.workflow]
        return self.commit(
            run_id, transitions.resume(wf, state, state.wait.key, payload, self.now)
        )

    def drive(self, run_id: str, limit: int = 10) -> RunState:
        """Tick until the run stops RUNNING (at most ``limit`` ticks)."""
        for _ in range(limit):
            if self.runs[run_id].state.status is not Status.RUNNING:
                break
            self.tick(run_id)
        return self.runs[run_id].state


# --- comparison helpers ---------------------------------------------------------------------


def _ids(states: Iterable[RunState]) -> list[str]:
    return [s.run_id for s in states]


def _fail(rule: str, detail: str) -> ConformanceFailure:
    return ConformanceFailure(f"{rule}: {detail}")


def _equal(actual: object, expected: object, rule: str) -> None:
    if actual != expected:
        raise _fail(rule, f"store gave {actual!r}, expected {expected!r}")


def _same_runs(actual: Sequence[RunState], expected: Sequence[RunState], rule: str) -> None:
    """Same states, same order; the message shows the run ids first."""
    if list(actual) != list(expected):
        raise _fail(
            rule,
            f"store gave runs {_ids(actual)}, expected {_ids(expected)}"
            + ("" if _ids(actual) != _ids(expected) else f" (states differ: {actual!r})"),
        )


def _raises(
    expected: type[BaseException] | tuple[type[BaseException], ...],
    rule: str,
    fn: Callable[..., object],
    *args: Any,
) -> BaseException:
    try:
        fn(*args)
    except expected as exc:
        return exc
    except Exception as exc:
        raise _fail(rule, f"raised {type(exc).__name__}: {exc}") from exc
    raise _fail(rule, "did not raise")


def _oldest_first(states: Iterable[RunState]) -> list[RunState]:
    return sorted(states, key=lambda s: (s.created_at, s.run_id))


def check_run_matches(store: Store, run: ModelRun, signer: Signer, *, verify: bool = True) -> None:
    """The store holds exactly ``run``: same state, same records, and the chain verifies."""
    run_id = run.state.run_id
    _equal(store.load(run_id), run.state, f"load({run_id!r}) returns the last committed state")
    got = store.ledger(run_id)
    _equal([r.hash for r in got], run.hashes, f"ledger({run_id!r}) record hashes")
    _equal(got, run.records, f"ledger({run_id!r}) records (bytes and signatures)")
    if verify:
        count = verify_chain(got, signer, log_id=store.log_id, run_id=run_id)
        _equal(count, len(run.records), f"verify_chain(ledger({run_id!r})) count")


def check_queries_match(store: Store, runs: Iterable[ModelRun], now: datetime) -> None:
    """Every ``list`` filter and ``find_waiting`` key agrees with the model ``runs``."""
    states = _oldest_first(r.state for r in runs)
    waiting = [s for s in states if s.status is Status.WAITING]
    _same_runs(store.list(), states, "list() returns every run oldest first")
    _same_runs(store.list(limit=2), states[:2], "list(limit=2) returns the two oldest runs")
    for status in Status:
        _same_runs(store.list(status=status), [s for s in states if s.status is status],
                   f"list(status={status.value})")
    for wf_id in MACHINE_WORKFLOWS:
        _same_runs(store.list(workflow=wf_id), [s for s in states if s.workflow == wf_id],
                   f"list(workflow={wf_id!r})")
    _same_runs(store.list(status=Status.WAITING, workflow=EVENT.id),
               [s for s in waiting if s.workflow == EVENT.id],
               f"list(status=waiting, workflow={EVENT.id!r})")
    for kind in WAIT_KINDS:
        _same_runs(store.list(wait_kind=kind),
                   [s for s in states if s.wait is not None and s.wait.kind == kind],
                   f"list(wait_kind={kind!r})")
    for horizon in (0, 5, 1000):
        due = now + timedelta(seconds=horizon)
        _same_runs(
            store.list(due_before=due),
            [s for s in states
             if s.wait is not None and s.wait.deadline is not None and s.wait.deadline <= due],
            f"list(due_before=now+{horizon}s)",
        )
    for parent in sorted({s.parent.run_id for s in states if s.parent is not None}):
        _same_runs(store.list(parent=parent),
                   [s for s in states if s.parent is not None and s.parent.run_id == parent],
                   f"list(parent={parent!r})")
    keys = {s.wait.key for s in waiting if s.wait is not None}
    for key in sorted(keys | {*EVENT_KEYS, "no-such-key"}):
        got = store.find_waiting(key)
        want = {s.run_id: s for s in waiting if s.wait is not None and s.wait.key == key}
        _equal(len(got), len({s.run_id for s in got}),
               f"find_waiting({key!r}) lists each run once")
        _equal({s.run_id: s for s in got}, want, f"find_waiting({key!r})")


# --- the stateful machine -------------------------------------------------------------------


CLOSE_TIMEOUT = 15.0
"""Seconds a live store's ``close`` may take before the suite calls it hung."""


def close_within(store: Store, seconds: float) -> None:
    """``store.close()``, failing (with a dump of every thread's stack on stderr) if it does
    not return within ``seconds``: a store that hangs on close fails the suite, not hangs it.

    The close runs on a helper thread so that it can be timed out; a store's ``close`` must
    therefore not depend on the thread that opened it.
    """
    errors: list[BaseException] = []

    def close() -> None:
        try:
            store.close()
        except BaseException as exc:
            errors.append(exc)

    closer = threading.Thread(target=close, name="wakepoint-conformance-close", daemon=True)
    closer.start()
    closer.join(seconds)
    if closer.is_alive():
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        raise _fail("close() returns", f"{store!r}.close() still blocked after {seconds} s "
                    "(every thread's stack is on stderr)")
    if errors:
        raise errors[0]


def _close_corpse(store: Store) -> None:
    """Release what a crashed store object still holds (fds, threads), best effort.

    A really crashed process is never closed, so nothing about this close is a rule: its
    errors are ignored, and it runs on a daemon thread that is given a few seconds, so that
    a store whose ``close`` can hang does not hang the suite at this point.
    """

    def close() -> None:
        with suppress(Exception):
            store.close()

    closer = threading.Thread(target=close, name="wakepoint-conformance-corpse", daemon=True)
    closer.start()
    closer.join(5)


def _live(run: ModelRun) -> bool:
    return run.state.status in (Status.RUNNING, Status.WAITING)


class StoreMachine(RuleBasedStateMachine):
    """Drives a store with the real kernel and checks it against the model after every step.

    Subclass it and implement ``make_store`` (open the store at a location under
    ``self.tmpdir``, which lives as long as one example).  ``TestCase`` on the subclass is the
    unittest class pytest collects.

    Rules: start a run (sometimes as a child, with a parent link); ``create`` of a taken id;
    tick (sometimes under ``hold``); drive a run under one ``hold``; resume a WAITING run on
    its key; refused inputs (wrong key, an answer that is not a choice); reject an effect;
    time out a due wait; cancel; advance the clock; a stale commit and an ahead-of-head commit
    (both ``ConflictError``); operations on an unknown run (``RunNotFound``); a clean restart
    (``reopen_store``); a crash (``crash_store``); ``flush``.  Durable stores also get a
    *peer* - a second store object on the same location, standing in for another process -
    that commits (after which the store under test must refuse a commit from the old head)
    and reads everything back.

    Invariant after every step: ``check_run_matches`` for every run (records verified again
    when the run changed or the store was reopened) and ``check_queries_match``, and the
    store's ``log_id`` never changes.
    """

    durable: ClassVar[bool] = True
    """False for a store that cannot outlive its object (memory): restarts keep the object."""

    def __init__(self) -> None:
        super().__init__()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="wakepoint-conformance-"))
        self._abandoned: list[Store] = []
        self._peer_store: Store | None = None
        self._serial = 0
        self._unverified: set[str] = set()
        self.h = Harness(self.make_store())
        self.log_id = self.h.store.log_id

    # -- hooks ---------------------------------------------------------------------------------

    def make_store(self) -> Store:
        """Open the store under test on a location derived from ``self.tmpdir``.

        Called once per example, again after every restart or crash, and once for the peer:
        it must open the same data each time, not create a new store.
        """
        raise NotImplementedError("a StoreMachine subclass must implement make_store")

    def reopen_store(self, store: Store) -> Store:
        """A clean restart: ``close`` the store and open it again on the same location."""
        if not self.durable:
            return store
        close_within(store, CLOSE_TIMEOUT)
        return self.make_store()

    def crash_store(self, store: Store) -> Store:
        """A process crash: open the location again while the old store is left unclosed.

        The suite never touches the old object again: it is kept referenced (so no finalizer
        flushes it) and closed only at teardown, after the last check.  Its own background
        threads (a group-commit flusher) do keep running, which a dead process's could not;
        what a returned commit promised must not depend on them.
        """
        if not self.durable:
            return store
        self._abandoned.append(store)
        return self.make_store()

    def teardown(self) -> None:
        """Close the store (and any crashed ones) and delete the example's directory."""
        try:
            close_within(self.h.store, CLOSE_TIMEOUT)
            if self._peer_store is not None:
                close_within(self._peer_store, CLOSE_TIMEOUT)
        finally:
            for old in self._abandoned:
                _close_corpse(old)
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store under test (replaced on restart and crash)."""
        return self.h.store

    def _peer(self) -> Store:
        """A second store object on the same location, opened on first use."""
        if self._peer_store is None:
            self._peer_store = self.make_store()
        return self._peer_store

    def _pick(self, data: st.DataObject, keep: Callable[[ModelRun], bool]) -> ModelRun:
        ids = sorted(rid for rid, run in self.h.runs.items() if keep(run))
        return self.h.runs[data.draw(st.sampled_from(ids), label="run")]

    def _any(self, keep: Callable[[ModelRun], bool]) -> bool:
        return any(keep(run) for run in self.h.runs.values())

    def _commit(self, run: ModelRun, tr: Transition, *, hold: bool = False) -> None:
        run_id = run.state.run_id
        note(f"commit {run_id} seq {run.state.seq} -> {tr.entries[-1].kind}")
        if hold:
            with self.store.hold(run_id):
                self.h.commit(run_id, tr)
        else:
            self.h.commit(run_id, tr)
        self._unverified.add(run_id)

    def _unchanged(self, run: ModelRun, rule: str) -> None:
        check_run_matches(self.store, run, self.h.signer, verify=False)
        note(f"{rule}: store unchanged")

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        workflow=st.sampled_from(MACHINE_WORKFLOWS),
        key=st.sampled_from(EVENT_KEYS),
        payload=json_values,
        boom=st.booleans(),
        tag=st.sampled_from(("b", "a", "c")),
        as_child=st.booleans(),
        data=st.data(),
    )
    def start_run(
        self, workflow: str, key: str, payload: JsonValue, boom: bool, tag: str,
        as_child: bool, data: st.DataObject,
    ) -> None:
        """Start a run; ids are not in creation order, and children carry a parent link."""
        self._serial += 1
        parent = None
        run_id = f"{tag}{self._serial}"
        if as_child and self.h.runs:
            parent_id = self._pick(data, lambda r: True).state.run_id
            run_id = f"{parent_id}.{self._serial}"
            parent = ParentLink(run_id=parent_id, key=run_id)
        self.h.start(WORKFLOWS[workflow], run_id, {"key": key, "data": payload, "boom": boom},
                     parent=parent)
        self._unverified.add(run_id)

    @precondition(lambda self: bool(self.h.runs))
    @rule(data=st.data())
    def create_existing(self, data: st.DataObject) -> None:
        """``create`` of a taken run id raises ``RunExists`` and leaves the run alone."""
        run = self._pick(data, lambda r: True)
        wf = WORKFLOWS[data.draw(st.sampled_from(MACHINE_WORKFLOWS), label="workflow")]
        tr = transitions.start(wf, run.state.run_id, {"key": "evt:k0", "data": None,
                                                      "boom": False}, self.h.now)
        state, records = self.h.sign(None, tr)
        _raises(RunExists, "create of an existing run", self.store.create, state, records)
        self._unchanged(run, "create_existing")

    @precondition(lambda self: self._any(lambda r: r.state.status is Status.RUNNING))
    @rule(data=st.data(), hold=st.booleans())
    def tick_run(self, data: st.DataObject, hold: bool) -> None:
        """Tick a RUNNING run once and commit the transition (sometimes under ``hold``)."""
        run = self._pick(data, lambda r: r.state.status is Status.RUNNING)
        state = run.state
        self._commit(run, transitions.tick(WORKFLOWS[state.workflow], state, self.h.now),
                     hold=hold)

    @precondition(lambda self: self._any(lambda r: r.state.status is Status.RUNNING))
    @rule(data=st.data())
    def drive_run(self, data: st.DataObject) -> None:
        """Tick a run until it blocks or ends, all commits under one ``hold``."""
        run = self._pick(data, lambda r: r.state.status is Status.RUNNING)
        run_id = run.state.run_id
        with self.store.hold(run_id):
            self.h.drive(run_id)
        self._unverified.add(run_id)

    @precondition(lambda self: self._any(
        lambda r: r.state.wait is not None and r.state.wait.kind in ("event", "user", "effect")
    ))
    @rule(data=st.data(), payload=json_values)
    def resume_run(self, data: st.DataObject, payload: JsonValue) -> None:
        """Resume a WAITING run on its own key (an answer from the choices for a question)."""
        run = self._pick(
            data,
            lambda r: r.state.wait is not None and r.state.wait.kind in ("event", "user", "effect"),
        )
        state = run.state
        assert state.wait is not None
        if state.wait.choices is not None:
            payload = data.draw(st.sampled_from(state.wait.choices), label="answer")
        tr = transitions.resume(WORKFLOWS[state.workflow], state, state.wait.key, payload,
                                self.h.now)
        self._commit(run, tr)

    @precondition(lambda self: self._any(lambda r: r.state.status is Status.WAITING))
    @rule(data=st.data())
    def refused_input(self, data: st.DataObject) -> None:
        """A resume on the wrong key (or with an answer that is no choice) commits nothing."""
        run = self._pick(data, lambda r: r.state.status is Status.WAITING)
        state = run.state
        assert state.wait is not None
        wf = WORKFLOWS[state.workflow]
        if state.wait.choices is not None and data.draw(st.booleans(), label="bad answer"):
            _raises(InvalidAnswer, "resume with an answer that is not a choice",
                    transitions.resume, wf, state, state.wait.key, "maybe", self.h.now)
        else:
            _raises(WrongWaitKey, "resume on the wrong key",
                    transitions.resume, wf, state, state.wait.key + "-wrong", None, self.h.now)
        self._unchanged(run, "refused_input")

    @precondition(lambda self: self._any(lambda r: r.state.status is Status.WAITING))
    @rule(data=st.data())
    def reject_run(self, data: st.DataObject) -> None:
        """The awaited effect failed: continue at ``on_error`` or fail the run."""
        run = self._pick(data, lambda r: r.state.status is Status.WAITING)
        state = run.state
        assert state.wait is not None
        error = ErrorInfo(type="CardDeclined", message="insufficient funds", retryable=False)
        self._commit(run, transitions.reject(state, state.wait.key, error, self.h.now))

    @precondition(lambda self: self._any(lambda r: r.state.status is Status.WAITING and (
        r.state.wait is not None and r.state.wait.deadline is not None
        and r.state.wait.deadline <= self.h.now
    )))
    @rule(data=st.data())
    def timeout_run(self, data: st.DataObject) -> None:
        """A due wait times out: a timer fires, a question escalates, an event goes late."""
        run = self._pick(data, lambda r: r.state.status is Status.WAITING and (
            r.state.wait is not None and r.state.wait.deadline is not None
            and r.state.wait.deadline <= self.h.now
        ))
        self._commit(run, transitions.timeout(run.state, self.h.now))

    @precondition(lambda self: self._any(_live))
    @rule(data=st.data())
    def cancel_run(self, data: st.DataObject) -> None:
        """Cancel a RUNNING or WAITING run."""
        run = self._pick(data, _live)
        self._commit(run, transitions.cancel(run.state, "cancelled by the suite", self.h.now))

    @rule(seconds=st.integers(1, 12))
    def advance_clock(self, seconds: int) -> None:
        """Let time pass, so that deadlines and timers come due."""
        self.h.advance(seconds)

    @precondition(lambda self: self._any(
        lambda r: any(_live_state(s) for s in r.history[:-1])
    ))
    @rule(data=st.data())
    def stale_commit(self, data: st.DataObject) -> None:
        """A writer that loaded an older state commits from it: ``ConflictError``, no change."""
        run = self._pick(data, lambda r: any(_live_state(s) for s in r.history[:-1]))
        old = data.draw(st.sampled_from([s for s in run.history[:-1] if _live_state(s)]),
                        label="stale state")
        state, records = self.h.sign(old, transitions.cancel(old, "stale writer", self.h.now))
        exc = _raises(ConflictError, f"commit at stale seq {old.seq} (head {run.state.seq})",
                      self.store.commit, old.run_id, old.seq, state, records)
        note(f"stale commit refused: {exc}")
        self._unchanged(run, "stale_commit")

    @precondition(lambda self: self._any(_live))
    @rule(data=st.data())
    def ahead_commit(self, data: st.DataObject) -> None:
        """A commit whose ``expected_seq`` is past the head: ``ConflictError``, no change."""
        run = self._pick(data, _live)
        ahead = msgspec.structs.replace(run.state, seq=run.state.seq + 1, head="0" * 64)
        state, records = self.h.sign(ahead, transitions.cancel(ahead, "ahead", self.h.now))
        _raises(ConflictError, f"commit at seq {ahead.seq} past head {run.state.seq}",
                self.store.commit, ahead.run_id, ahead.seq, state, records)
        self._unchanged(run, "ahead_commit")

    @rule()
    def unknown_run(self) -> None:
        """``load``, ``ledger`` and ``commit`` of a run that does not exist: ``RunNotFound``."""
        missing = f"missing{self._serial}"
        _raises(RunNotFound, "load of an unknown run", self.store.load, missing)
        _raises(RunNotFound, "ledger of an unknown run", self.store.ledger, missing)
        tr = transitions.start(LINEAR, missing, None, self.h.now)
        first, _ = self.h.sign(None, tr)
        state, records = self.h.sign(first, transitions.cancel(first, "x", self.h.now))
        _raises(RunNotFound, "commit to an unknown run",
                self.store.commit, missing, first.seq, state, records)

    @rule()
    def restart(self) -> None:
        """Close the store and open it again: everything committed is still there."""
        self.h.store = self.reopen_store(self.h.store)
        self._unverified.update(self.h.runs)

    @rule()
    def crash(self) -> None:
        """Abandon the open store (as a killed process would) and open the location again."""
        self.h.store = self.crash_store(self.h.store)
        self._unverified.update(self.h.runs)

    @precondition(lambda self: self.durable and self._any(_live))
    @rule(data=st.data())
    def peer_commit(self, data: st.DataObject) -> None:
        """Another store object on the same location (another process, in effect) commits;
        the store under test must see it and must refuse to commit from its old head."""
        run = self._pick(data, _live)
        state = run.state
        before = state
        if state.status is Status.RUNNING:
            tr = transitions.tick(WORKFLOWS[state.workflow], state, self.h.now)
        else:
            tr = transitions.cancel(state, "cancelled by a peer", self.h.now)
        main, self.h.store = self.h.store, self._peer()
        try:
            self._commit(run, tr)
        finally:
            self.h.store = main
        stale, records = self.h.sign(before, transitions.cancel(before, "stale", self.h.now))
        _raises(ConflictError, "commit from the head a peer has moved past",
                self.store.commit, before.run_id, before.seq, stale, records)

    @precondition(lambda self: self.durable and bool(self.h.runs))
    @rule()
    def peer_reads(self) -> None:
        """Another store object on the same location sees every commit of the store under
        test: states, ledgers and queries."""
        peer = self._peer()
        for run in self.h.runs.values():
            check_run_matches(peer, run, self.h.signer, verify=False)
        check_queries_match(peer, self.h.runs.values(), self.h.now)

    @rule()
    def flush(self) -> None:
        """``flush`` changes nothing visible."""
        self.store.flush()

    # -- invariant -----------------------------------------------------------------------------

    @invariant()
    def store_agrees_with_model(self) -> None:
        """Every run, its ledger and every query agree with the model."""
        _equal(self.store.log_id, self.log_id, "log_id survives restarts")
        for run_id, run in self.h.runs.items():
            check_run_matches(self.store, run, self.h.signer, verify=run_id in self._unverified)
        self._unverified.clear()
        check_queries_match(self.store, self.h.runs.values(), self.h.now)


def _live_state(state: RunState) -> bool:
    return state.status in (Status.RUNNING, Status.WAITING)


# --- query, claim and misuse checks ---------------------------------------------------------


def check_run_exists(store: Store) -> None:
    """``create`` of a taken id raises ``RunExists``; the first run is unchanged."""
    h = Harness(store)
    h.start(LINEAR, "r1", {"key": "evt:k0", "data": 1, "boom": False})
    h.tick("r1")
    tr = transitions.start(EVENT, "r1", {"key": "evt:k0", "data": 2, "boom": False}, h.now)
    state, records = h.sign(None, tr)
    _raises(RunExists, "create of a taken run id", store.create, state, records)
    check_run_matches(store, h.runs["r1"], h.signer)
    _equal(_ids(store.list()), ["r1"], "a refused create adds no run")


def check_unknown_run(store: Store) -> None:
    """``load``, ``ledger`` and ``commit`` of an unknown run raise ``RunNotFound``."""
    h = Harness(store)
    _raises(RunNotFound, "load of an unknown run", store.load, "nope")
    _raises(RunNotFound, "ledger of an unknown run", store.ledger, "nope")
    first, _ = h.sign(None, transitions.start(LINEAR, "nope", None, h.now))
    state, records = h.sign(first, transitions.cancel(first, "x", h.now))
    _raises(RunNotFound, "commit to an unknown run", store.commit, "nope", 0, state, records)
    _equal(store.list(), [], "a refused commit creates no run")


def check_append_misuse(store: Store) -> None:
    """Records or a state that do not continue the chain raise ``StoreError``, change nothing.

    Covers: the state of another run, records of another run, a seq gap, a state whose seq
    does not match its records, and a ``create`` whose records do not start at seq 0.
    """
    h = Harness(store)
    h.start(LINEAR, "r1", {"key": "evt:k0", "data": 1, "boom": False})
    h.start(LINEAR, "r2", {"key": "evt:k0", "data": 2, "boom": False})
    run = h.runs["r1"]
    head = run.state
    tr = transitions.tick(LINEAR, head, h.now)
    good_state, good_records = h.sign(head, tr)
    other_state, other_records = h.sign(h.runs["r2"].state,
                                        transitions.tick(LINEAR, h.runs["r2"].state, h.now))
    gap_state, gap_records = h.sign(msgspec.structs.replace(head, seq=head.seq + 1), tr)
    cases: list[tuple[str, RunState, list[Record]]] = [
        ("commit carrying another run's state", other_state, good_records),
        ("commit carrying another run's records", good_state, other_records),
        ("commit whose records skip a seq", gap_state, gap_records),
        ("commit whose state.seq does not match its records",
         msgspec.structs.replace(good_state, seq=good_state.seq + 1), good_records),
        ("commit whose state.seq claims records that are not there", good_state, []),
    ]
    for what, state, records in cases:
        _raises(StoreError, what, store.commit, "r1", head.seq, state, records)
        check_run_matches(store, run, h.signer, verify=False)
    late = h.sign(head, transitions.start(LINEAR, "r3", None, h.now))
    _raises(StoreError, "create whose records do not start at seq 0", store.create, *late)
    _raises(RunNotFound, "a refused create stores nothing", store.load, "r3")
    h.tick("r1")  # the run still takes a good commit
    check_run_matches(store, run, h.signer)


def _mixed_runs(h: Harness) -> None:
    """Runs in every status and wait kind (no child wait), with created_at ties."""
    inp = {"key": "evt:k0", "data": None, "boom": False}
    h.start(EVENT, "w-b", inp)               # two event waiters on one key, same created_at
    h.start(EVENT, "w-a", inp)
    h.drive("w-b")
    h.drive("w-a")
    h.advance(1)
    h.start(LINEAR, "run", inp)              # RUNNING
    h.start(ASK, "ask", inp, parent=ParentLink(run_id="run", key="ask"))
    h.drive("ask")                           # WAITING user, deadline +10 s
    h.start(TIMER, "timer", inp, parent=ParentLink(run_id="run", key="timer"))
    h.drive("timer")                         # WAITING timer, due at +3 s
    h.start(CALL, "call", inp)
    h.drive("call")                          # WAITING effect, no deadline
    h.start(LINEAR, "done", inp)
    h.drive("done")                          # COMPLETED
    h.start(LINEAR, "boom", {**inp, "boom": True})
    h.drive("boom")                          # FAILED
    h.start(EVENT, "cancelled", {**inp, "key": "evt:k1"})
    h.drive("cancelled")
    h.commit("cancelled", transitions.cancel(h.runs["cancelled"].state, "no", h.now))


def check_list_queries(store: Store) -> None:
    """``list`` filters (each alone and combined), ``limit``, and oldest-first order with ties."""
    h = Harness(store)
    _mixed_runs(h)
    t0 = EPOCH + timedelta(seconds=1)

    def ids(**filters: Any) -> list[str]:
        return _ids(store.list(**filters))

    everything = ["w-a", "w-b", "ask", "boom", "call", "cancelled", "done", "run", "timer"]
    _equal(ids(), everything, "list() orders by (created_at, run_id)")
    _equal(ids(limit=3), everything[:3], "list(limit=3)")
    _equal(ids(limit=0), [], "list(limit=0)")
    _equal(ids(limit=-1), [], "list(limit=-1): no runs, as SQL's LIMIT (not all but the last)")
    _equal(ids(status=Status.RUNNING), ["run"], "list(status=running)")
    _equal(ids(status=Status.WAITING), ["w-a", "w-b", "ask", "call", "timer"],
           "list(status=waiting)")
    _equal(ids(status=Status.COMPLETED), ["done"], "list(status=completed)")
    _equal(ids(status=Status.FAILED), ["boom"], "list(status=failed)")
    _equal(ids(status=Status.CANCELLED), ["cancelled"], "list(status=cancelled)")
    _equal(ids(workflow=EVENT.id), ["w-a", "w-b", "cancelled"], "list(workflow=event)")
    _equal(ids(workflow=EVENT.id, status=Status.WAITING), ["w-a", "w-b"],
           "list(workflow=event, status=waiting)")
    _equal(ids(workflow=EVENT.id, status=Status.WAITING, limit=1), ["w-a"],
           "list(workflow=event, status=waiting, limit=1)")
    _equal(ids(wait_kind="event"), ["w-a", "w-b"], "list(wait_kind=event)")
    _equal(ids(wait_kind="user"), ["ask"], "list(wait_kind=user)")
    _equal(ids(wait_kind="timer"), ["timer"], "list(wait_kind=timer)")
    _equal(ids(wait_kind="effect"), ["call"], "list(wait_kind=effect)")
    _equal(ids(wait_kind="child"), [], "list(wait_kind=child)")
    _equal(ids(parent="run"), ["ask", "timer"], "list(parent=run)")
    _equal(ids(parent="ask"), [], "list(parent=ask)")
    _equal(ids(due_before=t0), [], "list(due_before=t0): nothing due yet")
    _equal(ids(due_before=t0 + timedelta(seconds=3)), ["timer"],
           "list(due_before=t0+3s) includes a deadline equal to the bound")
    _equal(ids(due_before=t0 + timedelta(seconds=5)), ["w-a", "w-b", "timer"],
           "list(due_before=t0+5s)")
    _equal(ids(due_before=t0 + timedelta(days=1)), ["w-a", "w-b", "ask", "timer"],
           "list(due_before=t0+1d): waits without a deadline never come due")
    _equal(ids(due_before=t0 + timedelta(days=1), wait_kind="user"), ["ask"],
           "list(due_before=t0+1d, wait_kind=user)")
    check_queries_match(store, h.runs.values(), h.now)


def check_find_waiting(store: Store) -> None:
    """``find_waiting`` lists every WAITING run on a key, and forgets a run once it moves on."""
    h = Harness(store)
    for rid, key in (("e1", "evt:k0"), ("e2", "evt:k0"), ("e3", "evt:k1")):
        h.start(EVENT, rid, {"key": key, "data": None, "boom": False})
        h.drive(rid)

    def ids(key: str) -> list[str]:
        return sorted(_ids(store.find_waiting(key)))

    _equal(ids("evt:k0"), ["e1", "e2"], "find_waiting(evt:k0)")
    _equal(ids("evt:k1"), ["e3"], "find_waiting(evt:k1)")
    _equal(ids("evt:none"), [], "find_waiting of a key nobody waits on")
    h.resume("e1", {"ok": True})
    _equal(ids("evt:k0"), ["e2"], "find_waiting after one waiter was resumed")
    h.commit("e2", transitions.cancel(h.runs["e2"].state, "no", h.now))
    _equal(ids("evt:k0"), [], "find_waiting after the other waiter was cancelled")
    _equal(store.find_waiting("evt:k1"), [h.runs["e3"].state],
           "find_waiting returns the current states")


def check_claim_two_workers(store: Store) -> None:
    """Claim takes RUNNING and overdue WAITING runs; another worker's lease excludes until it
    expires; the holder may claim its runs again; finished and not-yet-due runs are never
    claimed; claimed states are the stored ones."""
    h = Harness(store)
    _mixed_runs(h)
    now = h.now  # t0: nothing is overdue yet
    lease = timedelta(seconds=30)

    def ids(states: Sequence[RunState]) -> list[str]:
        return sorted(_ids(states))

    got = store.claim(now, "w1", lease, 100)
    _equal(ids(got), ["run"], "claim at t0 takes only the RUNNING run")
    _equal(sorted(got, key=lambda s: s.run_id), [store.load("run")],
           "claim returns the stored state")
    _equal(store.claim(now, "w2", lease, 100), [], "another worker's unexpired lease excludes")
    _equal(ids(store.claim(now, "w1", lease, 100)), ["run"],
           "the holder may claim its own run again (it holds no *other* worker's lease)")
    later = now + timedelta(seconds=6)  # the timer (+3 s) and both events (+5 s) are overdue
    _equal(ids(store.claim(later, "w2", lease, 100)), ["timer", "w-a", "w-b"],
           "overdue waits are claimable; the lease on 'run' is still held")
    expired = now + lease + timedelta(seconds=1)
    _equal(ids(store.claim(expired, "w2", lease, 100)), ["ask", "run", "timer", "w-a", "w-b"],
           "after w1's lease expired w2 takes 'run'; 'ask' (+10 s) is overdue now")
    _equal(store.claim(expired, "w1", lease, 100), [], "w2 now holds every claimable run")


def check_claim_limit(store: Store) -> None:
    """``claim`` leases at most ``limit`` runs; the rest stay for the next worker."""
    h = Harness(store)
    inp = {"key": "evt:k0", "data": None, "boom": False}
    for rid in ("r1", "r2", "r3", "r4", "r5"):
        h.start(LINEAR, rid, inp)
    lease = timedelta(minutes=1)
    first = store.claim(h.now, "w1", lease, 2)
    _equal(len(first), 2, "claim(limit=2) leases two of five runs")
    second = store.claim(h.now, "w2", lease, 2)
    _equal(len(second), 2, "a second worker's claim(limit=2) leases two more")
    third = store.claim(h.now, "w3", lease, 10)
    _equal(len(third), 1, "a third worker gets the one left")
    every = _ids(first) + _ids(second) + _ids(third)
    _equal(sorted(every), ["r1", "r2", "r3", "r4", "r5"], "no run is leased twice")
    _equal(store.claim(h.now, "w4", lease, 10), [], "nothing is left to claim")
    _equal(store.claim(h.now, "w4", lease, 0), [], "claim(limit=0) leases nothing")


def check_claim_release(store: Store) -> None:
    """``release`` by the holder frees a run at once; by anyone else it is a no-op; a run
    that finishes is no longer claimable."""
    h = Harness(store)
    inp = {"key": "evt:k0", "data": None, "boom": False}
    h.start(LINEAR, "r1", inp)
    h.start(LINEAR, "r2", inp)
    lease = timedelta(minutes=5)
    _equal(sorted(_ids(store.claim(h.now, "w1", lease, 10))), ["r1", "r2"], "w1 claims both")
    store.release("r1", "w2")  # not the holder: no effect, no error
    _equal(store.claim(h.now, "w2", lease, 10), [], "release by a non-holder frees nothing")
    store.release("r1", "w1")
    store.release("r1", "w1")  # releasing twice is fine
    store.release("unknown", "w1")  # as is releasing a run that does not exist
    _equal(_ids(store.claim(h.now, "w2", lease, 10)), ["r1"], "the holder's release frees r1")
    h.drive("r2")  # COMPLETED
    store.release("r2", "w1")
    _equal(store.claim(h.now, "w3", lease, 10), [], "a finished run is not claimable")


def check_renew(store: Store) -> None:
    """``renew`` extends only the holder's lease: refused (False, nothing
    changed) for a run nobody holds, for another worker, after a release, after another
    worker claimed the expired lease, and for an unknown run; a renewed lease keeps other
    claimers out until the new expiry; an expired lease nobody took is renewed."""
    renew = store.renew
    h = Harness(store)
    h.start(LINEAR, "r1", {"key": "evt:k0", "data": None, "boom": False})  # RUNNING
    lease = timedelta(seconds=10)
    now = h.now
    _equal(renew("r1", "w1", lease, now), False, "renew of a run nobody holds")
    _equal(_ids(store.claim(now, "w1", lease, 10)), ["r1"], "w1 claims r1")
    later = now + timedelta(seconds=8)
    _equal(renew("r1", "w1", lease, later), True, "the holder renews")
    _equal(renew("r1", "w2", lease, later), False, "renew by a non-holder")
    _equal(store.claim(now + timedelta(seconds=15), "w2", lease, 10), [],
           "a renewed lease keeps others out past its first expiry")
    expired = later + lease + timedelta(seconds=1)
    _equal(renew("r1", "w1", lease, expired), True, "an expired lease nobody took is renewed")
    taken = expired + lease
    _equal(_ids(store.claim(taken, "w2", lease, 10)), ["r1"], "w2 claims after expiry")
    _equal(renew("r1", "w1", lease, taken), False, "renew after another worker took over")
    store.release("r1", "w2")
    _equal(renew("r1", "w2", lease, taken), False, "renew after release")
    _equal(renew("unknown", "w1", lease, now), False, "renew of an unknown run")


def check_take(store: Store) -> None:
    """``take`` leases one given run whatever its state, unless another
    worker holds an unexpired lease: a WAITING run (which ``claim`` never hands out) is
    taken; a second taker is refused until the lease expires or is released; the holder
    may take it again (extending it); an unknown run is refused."""
    take = store.take
    h = Harness(store)
    h.start(CALL, "r1", {"key": "evt:k0", "data": 3, "boom": False})
    h.tick("r1")  # WAITING on its effect: not claimable, but takeable
    lease = timedelta(seconds=10)
    now = h.now
    _equal(store.claim(now, "w1", lease, 10), [], "a run WAITING on an effect is not claimed")
    _equal(take("r1", "w1", lease, now), True, "w1 takes the waiting run")
    _equal(take("r1", "w2", lease, now + timedelta(seconds=5)), False,
           "w2 cannot take a run w1 holds")
    _equal(take("r1", "w1", lease, now + timedelta(seconds=5)), True, "the holder again")
    _equal(take("r1", "w2", lease, now + timedelta(seconds=12)), False,
           "the holder's second take extended its lease")
    _equal(take("r1", "w2", lease, now + timedelta(seconds=16)), True, "after it expires")
    store.release("r1", "w2")
    _equal(take("r1", "w3", lease, now + timedelta(seconds=16)), True, "after a release")
    _equal(take("unknown", "w1", lease, now), False, "an unknown run")


def check_hold(store: Store) -> None:
    """Under ``hold``: commits are visible at once, a stale commit still conflicts, and the
    run is usable after the hold ends (also after an exception inside it)."""
    h = Harness(store)
    h.start(CALL, "r1", {"key": "evt:k0", "data": 3, "boom": False})
    with store.hold("r1"):
        h.tick("r1")
        check_run_matches(store, h.runs["r1"], h.signer)
        old = h.runs["r1"].history[0]
        state, records = h.sign(old, transitions.cancel(old, "stale", h.now))
        _raises(ConflictError, "stale commit under hold", store.commit, "r1", old.seq, state,
                records)
        h.resume("r1", {"id": "rcpt-1"})
    check_run_matches(store, h.runs["r1"], h.signer)
    with suppress(RuntimeError), store.hold("r1"):
        raise RuntimeError("the driver crashed inside hold")
    h.drive("r1")
    _equal(h.runs["r1"].state.status, Status.COMPLETED, "the run completes after the hold")
    check_run_matches(store, h.runs["r1"], h.signer)


def check_awkward_run_ids(store: Store) -> None:
    """Any string is a run id: slashes, dots, colons, spaces, non-ASCII, ids differing only in
    case, and ids that look like paths are stored, listed and loaded as themselves."""
    h = Harness(store)
    ids = ["order/17", "../escape", "a.b:c", "with space", "\u00fcn\u00efc\u00f8de", "Case",
           "case", ".hidden", "x" * 200]
    for rid in ids:
        h.start(LINEAR, rid, {"key": "evt:k0", "data": rid, "boom": False})
        h.tick(rid)
    for rid in ids:
        check_run_matches(store, h.runs[rid], h.signer)
    _equal(_ids(store.list()), sorted(ids), "list() returns every awkward id as itself")


QUERY_CHECKS: tuple[Callable[[Store], None], ...] = (
    check_run_exists,
    check_unknown_run,
    check_append_misuse,
    check_list_queries,
    check_find_waiting,
    check_claim_two_workers,
    check_claim_limit,
    check_claim_release,
    check_renew,
    check_take,
    check_hold,
    check_awkward_run_ids,
)
"""The plain checks; each takes a fresh, empty store (and leaves closing it to the caller)."""


def run_queries_suite(make_store: Callable[[], Store]) -> None:
    """Run every check of ``QUERY_CHECKS``, each on a fresh store from ``make_store``."""
    for check in QUERY_CHECKS:
        store = make_store()
        try:
            check(store)
        finally:
            store.close()


# --- processes racing on one store location -------------------------------------------------

_RACE_RUN = "race"
_RACE_TIMEOUT = 30.0


@dataclass(frozen=True)
class RaceReport:
    """What ``race_commits`` saw: the winning worker of each round, and the final seq."""

    winners: list[int]
    final_seq: int


def _race_commit_worker(
    factory: Callable[[], Store],
    worker: int,
    rounds: int,
    barrier: Any,
    results: Any,
) -> None:
    """One racing process: each round, load the run, wait for all, then commit seq k+1."""
    # A worker that hangs (a lock never released, a flusher never joined) prints where it
    # is stuck and exits, so that the parent reports the stack instead of waiting forever.
    faulthandler.dump_traceback_later(_RACE_TIMEOUT, exit=True)
    store = None
    round_ = -1
    try:
        store = factory()
        signer = conformance_signer()
        for round_ in range(rounds):
            barrier.wait(_RACE_TIMEOUT)  # everyone finished the previous round
            state = store.load(_RACE_RUN)
            barrier.wait(_RACE_TIMEOUT)  # everyone loaded the same head
            # A distinct ``now`` per worker makes every worker's record distinct bytes.
            now = EPOCH + timedelta(seconds=round_ + 1, microseconds=worker + 1)
            tr = transitions.tick(COUNTER, state, now)
            new, records = sign_entries(signer, store.log_id, tr.state, tr.entries, now,
                                        prev_seq=state.seq, prev_head=state.head)
            try:
                if worker % 2:  # half of them commit under hold, as the runtime does
                    with store.hold(_RACE_RUN):
                        store.commit(_RACE_RUN, state.seq, new, records)
                else:
                    store.commit(_RACE_RUN, state.seq, new, records)
            except ConflictError:
                results.put((worker, round_, state.seq, "conflict", ""))
            else:
                results.put((worker, round_, state.seq, "won", records[-1].hash))
    except BaseException:
        results.put((worker, round_, -1, "error", traceback.format_exc()))
        barrier.abort()
    finally:
        if store is not None:
            with suppress(Exception):
                store.close()


def _run_processes(
    target: Callable[..., None], factory: Callable[[], Store], processes: int, *args: Any
) -> list[tuple[Any, ...]]:
    """Start ``processes`` spawned workers, collect every result tuple, and join them."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(factory, worker, *args, barrier, results), daemon=True)
        for worker in range(processes)
    ]
    for proc in procs:
        proc.start()
    out: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + 2 * _RACE_TIMEOUT
    try:
        while any(p.is_alive() for p in procs) or not results.empty():
            if time.monotonic() > deadline:
                raise _fail("racing processes", f"still running after {2 * _RACE_TIMEOUT} s")
            try:
                out.append(results.get(timeout=0.2))
            except queue.Empty:
                continue
    finally:
        for proc in procs:
            proc.join(_RACE_TIMEOUT)
            if proc.is_alive():  # pragma: no cover - only when a worker hangs
                proc.kill()
                proc.join()
    errors = [r for r in out if r[3] == "error"]
    if errors:
        raise _fail("a racing process failed", "\n".join(str(e[4]) for e in errors))
    bad_exit = [p.exitcode for p in procs if p.exitcode != 0]
    if bad_exit:
        raise _fail("a racing process failed", f"exit codes {bad_exit}; a process that hung "
                    f"for {_RACE_TIMEOUT} s printed its threads' stacks on stderr")
    return out


def race_commits(
    factory: Callable[[], Store], *, processes: int = 4, rounds: int = 6
) -> RaceReport:
    """Race ``processes`` processes committing seq k+1 of one run, for ``rounds`` rounds.

    ``factory`` opens the store on a shared location and must be picklable for the spawn
    start method (e.g. ``functools.partial(open_store, "jsonl:/path")``); the location must
    hold no run named ``"race"``.  Each round every process loads the same head (a barrier
    makes sure), then all commit at once.  Checks: exactly one process wins each round and
    the rest get ``ConflictError``; afterwards a freshly opened store holds a contiguous
    ledger of ``rounds + 1`` records that verifies, whose record k+1 is round k's winner's.
    Not for stores that live in one process (memory).
    """
    store = factory()
    try:
        Harness(store).start(COUNTER, _RACE_RUN, None)
        store.flush()
    finally:
        store.close()
    out = _run_processes(_race_commit_worker, factory, processes, rounds)
    winners: list[int] = []
    win_hashes: list[str] = []
    for round_ in range(rounds):
        seen = [r for r in out if r[1] == round_]
        _equal(len(seen), processes, f"round {round_}: every process reported")
        _equal({r[2] for r in seen}, {round_},
               f"round {round_}: every process loaded head seq {round_}")
        won = [r for r in seen if r[3] == "won"]
        _equal(len(won), 1, f"round {round_}: exactly one commit wins ({seen})")
        winners.append(won[0][0])
        win_hashes.append(won[0][4])
    store = factory()
    try:
        records = store.ledger(_RACE_RUN)
        _equal([r.seq for r in records], list(range(rounds + 1)), "the raced ledger is contiguous")
        count = verify_chain(records, conformance_signer(), log_id=store.log_id, run_id=_RACE_RUN)
        _equal(count, rounds + 1, "the raced ledger verifies")
        _equal([r.hash for r in records[1:]], win_hashes,
               "each round's record is the winner's")
        final = store.load(_RACE_RUN)
        _equal((final.seq, final.head, final.vars), (rounds, records[-1].hash, {"n": rounds}),
               "the final state is the last winner's")
    finally:
        store.close()
    return RaceReport(winners=winners, final_seq=rounds)


def _race_claim_worker(
    factory: Callable[[], Store], worker: int, barrier: Any, results: Any
) -> None:
    """One claiming process: wait for all, then claim everything it can."""
    faulthandler.dump_traceback_later(_RACE_TIMEOUT, exit=True)
    try:
        store = factory()
        try:
            barrier.wait(_RACE_TIMEOUT)
            got = store.claim(EPOCH, f"worker-{worker}", timedelta(hours=1), 1000)
            results.put((worker, 0, 0, "claimed", [s.run_id for s in got]))
        finally:
            store.close()
    except BaseException:
        results.put((worker, 0, -1, "error", traceback.format_exc()))
        barrier.abort()


def race_claims(
    factory: Callable[[], Store], *, processes: int = 4, runs: int = 40
) -> dict[int, list[str]]:
    """Race ``processes`` processes claiming from ``runs`` RUNNING runs at the same instant.

    Checks that no run is leased to two workers and that together they leased every run.
    ``factory`` is as for ``race_commits``, on a location that holds no runs.  Returns the
    run ids each worker claimed.
    """
    store = factory()
    try:
        h = Harness(store)
        for n in range(runs):
            h.start(COUNTER, f"claim-{n:03d}", None)
        store.flush()
    finally:
        store.close()
    out = _run_processes(_race_claim_worker, factory, processes)
    claimed: dict[int, list[str]] = {r[0]: r[4] for r in out}
    every = [rid for ids in claimed.values() for rid in ids]
    duplicated = sorted({rid for rid in every if every.count(rid) > 1})
    _equal(duplicated, [], "no run is leased to two processes")
    _equal(sorted(every), [f"claim-{n:03d}" for n in range(runs)], "every run was leased")
    return claimed


__all__ = [
    "ASK",
    "CALL",
    "CLOSE_TIMEOUT",
    "COUNTER",
    "EPOCH",
    "EVENT",
    "EVENT_KEYS",
    "LINEAR",
    "QUERY_CHECKS",
    "SIGNER_SEED",
    "TIMER",
    "WORKFLOWS",
    "ConformanceFailure",
    "Harness",
    "ModelRun",
    "RaceReport",
    "StoreMachine",
    "check_append_misuse",
    "check_awkward_run_ids",
    "check_claim_limit",
    "check_claim_release",
    "check_claim_two_workers",
    "check_find_waiting",
    "check_hold",
    "check_list_queries",
    "check_queries_match",
    "check_run_exists",
    "check_run_matches",
    "check_unknown_run",
    "close_within",
    "conformance_signer",
    "json_values",
    "race_claims",
    "race_commits",
    "run_queries_suite",
]
