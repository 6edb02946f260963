"""``Runtime.recover()`` after a crash at each place where a process can die.

A crash is simulated in-process (``env.open(crash=rule)``): the commit the rule picks raises
``SimulatedCrash`` just before or just after it reaches the store, the ``Runtime`` is dropped
without ``close()``, and a fresh ``Runtime`` on the same store (the next process) calls
``recover()``.  Real processes killed with SIGKILL are in ``test_crash.py``.

What recovery must give, whatever the crash point: the run finishes as if nothing happened,
its ledger has one record per transition and verifies, and an effect's result is recorded
once (a ``call`` may run again if its result was not committed: at-least-once).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

import pytest
from wakepoint import (
    RunState,
    Runtime,
    Status,
    UnencodableValue,
    Workflow,
    ask_user,
    call,
    done,
    goto,
    subworkflow,
    wait_until,
)

pipeline = Workflow("pipeline")


@pipeline.node(start=True)
def fetch(run: Any) -> Any:
    return goto("charge", set={"amount": run.input})


@pipeline.node
def charge(run: Any) -> Any:
    return call("charge", {"amount": run.vars["amount"]}, into="receipt", then="notify")


@pipeline.node
def notify(run: Any) -> Any:
    return done({"receipt": run.vars["receipt"]})


class Charger:
    """A side-effecting function that records each call's idempotency key."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, amount: int, idempotency_key: str) -> str:
        self.keys.append(idempotency_key)
        return f"receipt-{amount}"


def running_at(node: str) -> Any:
    """Crash rule: the commit that leaves the run RUNNING at ``node``."""
    return lambda run_id, s: s.status is Status.RUNNING and s.node == node


def waiting_on(kind: str, run_id: str | None = None) -> Any:
    """Crash rule: the commit that parks the run on a wait of ``kind``."""
    return lambda rid, s: (
        s.status is Status.WAITING and s.wait.kind == kind and run_id in (None, rid)
    )


def resumed(run_id: str) -> Any:
    """Crash rule: the commit that resumes ``run_id`` after its first wait (that commit also
    carries the node the resume lets run, which here finishes or moves on)."""
    return lambda rid, s: rid == run_id and s.step > 2 and s.status is not Status.WAITING


def key_counts(env: Any, rt: Any, run_id: str) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for body in env.bodies(rt.ledger(run_id)):
        if body.key is not None:
            counts[body.kind, body.key] = counts.get((body.kind, body.key), 0) + 1
    return counts


def test_recover_continues_running_run(env: Any) -> None:
    """A run whose last commit left it RUNNING is driven on by ``recover()``."""
    charger = Charger()
    rt = env.open([pipeline], {"charge": charger}, crash=running_at("charge"), after=True)
    with pytest.raises(env.Crash):
        rt.start(pipeline, 5, run_id="p1")
    assert rt.get("p1").status is Status.RUNNING
    later = env.open([pipeline], {"charge": charger})
    [state] = later.recover()
    assert state.status is Status.COMPLETED
    assert state.output == {"receipt": "receipt-5"}
    assert charger.keys == ["p1:3"]
    env.check_ledger(later, "p1")


def test_lost_commit_is_redone(env: Any) -> None:
    """A transition whose commit never reached the store is simply taken again."""
    charger = Charger()
    rt = env.open([pipeline], {"charge": charger}, crash=waiting_on("effect"))
    with pytest.raises(env.Crash):
        rt.start(pipeline, 5, run_id="p1")
    assert rt.get("p1").node == "charge"
    assert rt.get("p1").status is Status.RUNNING
    later = env.open([pipeline], {"charge": charger})
    later.recover()
    assert later.get("p1").status is Status.COMPLETED
    env.check_ledger(later, "p1")


def test_recover_dispatches_unresolved_call(env: Any) -> None:
    """A ``call`` requested (committed) but never carried out is dispatched by ``recover()``;
    its result is recorded once, under the request's idempotency key."""
    charger = Charger()
    rt = env.open([pipeline], {"charge": charger}, crash=waiting_on("effect"), after=True)
    with pytest.raises(env.Crash):
        rt.start(pipeline, 7, run_id="p1")
    assert charger.keys == []
    parked = rt.get("p1")
    assert parked.wait.kind == "effect"
    later = env.open([pipeline], {"charge": charger})
    [state] = later.recover()
    assert state.status is Status.COMPLETED
    assert charger.keys == ["p1:3"]
    assert key_counts(env, later, "p1") == {("effect.requested", "p1:3"): 1,
                                            ("wait.resumed", "p1:3"): 1}
    env.check_ledger(later, "p1")


def test_call_whose_result_was_lost_runs_again_with_same_key(env: Any) -> None:
    """If the process dies after the function returned but before its result was committed,
    the function runs again with the same key (at-least-once) and one result is recorded."""
    charger = Charger()
    rt = env.open([pipeline], {"charge": charger}, crash=resumed("p1"))
    with pytest.raises(env.Crash):
        rt.start(pipeline, 9, run_id="p1")
    assert charger.keys == ["p1:3"]
    later = env.open([pipeline], {"charge": charger})
    later.recover()
    assert later.get("p1").output == {"receipt": "receipt-9"}
    assert charger.keys == ["p1:3", "p1:3"]
    assert key_counts(env, later, "p1") == {("effect.requested", "p1:3"): 1,
                                            ("wait.resumed", "p1:3"): 1}
    env.check_ledger(later, "p1")


def test_recover_is_idempotent(env: Any) -> None:
    """A second ``recover()`` finds nothing to do and changes nothing."""
    charger = Charger()
    rt = env.open([pipeline], {"charge": charger}, crash=waiting_on("effect"), after=True)
    with pytest.raises(env.Crash):
        rt.start(pipeline, 1, run_id="p1")
    later = env.open([pipeline], {"charge": charger})
    later.recover()
    before = (later.get("p1"), later.ledger("p1"))
    assert env.open([pipeline], {"charge": charger}).recover() == []
    assert (later.get("p1"), later.ledger("p1")) == before
    assert charger.keys == ["p1:3"]


# --- parents and children ------------------------------------------------------------------

child = Workflow("rchild")


@child.node(start=True)
def child_work(run: Any) -> Any:
    if run.input == "ask":
        return ask_user("child?", into="a", then="child_done")
    return goto("child_done", set={"a": run.input})


@child.node
def child_done(run: Any) -> Any:
    return done(f"child says {run.vars['a']}")


parent = Workflow("rparent")


@parent.node(start=True)
def spawn(run: Any) -> Any:
    return subworkflow(child, run.input, into="r", then="parent_done")


@parent.node
def parent_done(run: Any) -> Any:
    return done(run.vars["r"])


def test_recover_resumes_parent_whose_child_finished(env: Any) -> None:
    """The child finished and was committed, but the process died before the parent's
    resume: ``recover()`` resumes the parent with the child's output."""
    rt = env.open([parent, child], crash=resumed("p"))
    rt.start(parent, "ask", run_id="p")
    with pytest.raises(env.Crash):
        rt.respond("p.2", "yes")
    assert rt.get("p.2").status is Status.COMPLETED
    assert rt.get("p").status is Status.WAITING
    later = env.open([parent, child])
    touched = later.recover()
    assert "p" in [s.run_id for s in touched]
    state = later.get("p")
    assert state.status is Status.COMPLETED
    assert state.output == "child says yes"
    env.check_ledger(later, "p")
    env.check_ledger(later, "p.2")


def test_recover_starts_child_that_was_never_created(env: Any) -> None:
    """The parent's request for a child was committed but the child never created: recovery
    creates it (with the same id) and the parent finishes."""
    rt = env.open([parent, child], crash=waiting_on("child"), after=True)
    with pytest.raises(env.Crash):
        rt.start(parent, "now", run_id="p")
    assert rt.list(workflow="rchild") == []
    later = env.open([parent, child])
    later.recover()
    assert later.get("p.2").status is Status.COMPLETED
    assert later.get("p").output == "child says now"
    env.check_ledger(later, "p")


def test_recover_drives_child_created_but_never_run(env: Any) -> None:
    """The child was created (RUNNING) but the process died before it ran: recovery drives
    the child and then its parent."""
    rt = env.open([parent, child], crash=lambda rid, s: rid == "p.2", after=True)
    with pytest.raises(env.Crash):
        rt.start(parent, "now", run_id="p")
    assert rt.get("p.2").status is Status.RUNNING
    later = env.open([parent, child])
    later.recover()
    assert later.get("p").output == "child says now"
    for run_id in ("p", "p.2"):
        env.check_ledger(later, run_id)


def test_recover_runs_a_pending_child_node_once(env: Any) -> None:
    """Recovering a child that was created but never ran executes its node once: nodes are
    at-least-once across crashes, but one recovery should not repeat work by itself."""
    ran: list[str] = []
    counted = Workflow("counted-child")

    @counted.node(start=True)
    def count(run: Any) -> Any:
        ran.append(run.run_id)
        return done(len(ran))

    owner = Workflow("counted-parent")

    @owner.node(start=True)
    def spawn_counted(run: Any) -> Any:
        return subworkflow(counted, None, into="r", then="owner_done")

    @owner.node
    def owner_done(run: Any) -> Any:
        return done(run.vars["r"])

    rt = env.open([owner, counted], crash=lambda rid, s: rid == "p.2", after=True)
    with pytest.raises(env.Crash):
        rt.start(owner, run_id="p")
    env.open([owner, counted]).recover()
    assert ran == ["p.2"]


def test_recover_finishes_interrupted_cancel_cascade(env: Any) -> None:
    """The parent's cancel was committed but the process died before its child was
    cancelled: after ``recover()`` no unfinished run is left under a cancelled parent."""
    rt = env.open([parent, child], crash=lambda rid, s: (
        rid == "p.2" and s.status is Status.CANCELLED))
    rt.start(parent, "ask", run_id="p")
    with pytest.raises(env.Crash):
        rt.cancel("p")
    assert rt.get("p").status is Status.CANCELLED
    later = env.open([parent, child])
    later.recover()
    assert later.get("p.2").status is Status.CANCELLED


# --- timers --------------------------------------------------------------------------------

napper = Workflow("napper")


@napper.node(start=True)
def nap(run: Any) -> Any:
    return wait_until(timedelta(hours=1), then="check")


@napper.node
def check(run: Any) -> Any:
    return ask_user("still there?", into="a", then="nap_done", timeout=60,
                    on_timeout="nap_done")


@napper.node
def nap_done(run: Any) -> Any:
    return done(run.vars["a"])


def test_recover_fires_overdue_timers_and_deadlines(env: Any) -> None:
    """A timer that came due while no process ran fires at ``recover()``; so does a question
    whose timeout passed, which escalates."""
    rt = env.open([napper])
    rt.start(napper, run_id="n1")
    rt.close()
    env.clock.advance(hours=2)  # the machine was off
    later = env.open([napper])
    [state] = later.recover()
    assert state.status is Status.WAITING
    assert state.wait.kind == "user"
    assert later.recover() == []  # the question is not due yet
    env.clock.advance(minutes=5)
    [state] = env.open([napper]).recover()
    assert state.status is Status.COMPLETED
    assert state.output == {"timed_out": True}
    assert env.kinds(later, "n1") == [
        "run.started", "effect.requested", "timer.fired", "effect.requested",
        "wait.timed_out", "run.completed", "run.sealed",
    ]
    env.check_ledger(later, "n1")


# --- recovery must not stop at one bad run -------------------------------------------------

poison = Workflow("rpoison")


@poison.node(start=True)
def poisoned(run: Any) -> Any:
    return goto("poisoned_end", set={"handle": object()})


@poison.node
def poisoned_end(run: Any) -> Any:
    return done()


def test_recover_is_not_stopped_by_one_bad_run(env: Any) -> None:
    """A run that cannot advance (its node sets an unencodable var) must not keep
    ``recover()`` from continuing the other runs."""
    charger = Charger()
    rt = env.open([poison, pipeline], {"charge": charger}, crash=running_at("charge"),
                  after=True)
    with pytest.raises(UnencodableValue):
        rt.start(poison, run_id="a-poison")
    with pytest.raises(env.Crash):
        rt.start(pipeline, 3, run_id="b-ok")
    later = env.open([poison, pipeline], {"charge": charger})
    with contextlib.suppress(UnencodableValue):  # reporting the bad run is fine...
        later.recover()
    # ...abandoning the others is not.
    assert later.get("b-ok").status is Status.COMPLETED


def test_recover_skips_runs_of_unregistered_workflows(env: Any) -> None:
    """A runtime that serves only some workflows recovers those and leaves the others."""
    charger = Charger()
    rt = env.open([napper, pipeline], {"charge": charger}, crash=running_at("charge"),
                  after=True)
    rt.start(napper, run_id="a-nap")
    with pytest.raises(env.Crash):
        rt.start(pipeline, 3, run_id="b-ok")
    env.clock.advance(hours=2)
    later = env.open([pipeline], {"charge": charger})
    later.recover()
    assert later.get("b-ok").status is Status.COMPLETED
    assert later.get("a-nap").wait is not None


def test_recovered_states_are_returned(env: Any) -> None:
    """``recover()`` returns the current state of each run it touched, once each."""
    charger = Charger()
    rt = env.open([pipeline], {"charge": charger})
    states: list[RunState] = []
    for i in range(3):
        crashing = env.open([pipeline], {"charge": charger}, crash=waiting_on("effect"),
                            after=True)
        with pytest.raises(env.Crash):
            crashing.start(pipeline, i, run_id=f"p{i}")
    states = env.open([pipeline], {"charge": charger}).recover()
    assert sorted(s.run_id for s in states) == ["p0", "p1", "p2"]
    assert all(s.status is Status.COMPLETED for s in states)
    assert rt.recover() == []


def _left_running_at_charge(env: Any, charger: Charger) -> Runtime:
    """Run ``p1`` crashes right after committing RUNNING at ``charge``; the next process."""
    crashing = env.open([pipeline], {"charge": charger}, crash=running_at("charge"),
                        after=True)
    with pytest.raises(env.Crash):
        crashing.start(pipeline, 7, run_id="p1")
    later: Runtime = env.open([pipeline], {"charge": charger})
    return later


def test_recover_run_drives_the_claimed_state_without_reading_it(env: Any) -> None:
    """A worker passes the state its claim returned: the run is driven from it, and the
    state the drive committed last is returned - the store is not read for this run."""
    charger = Charger()
    later = _left_running_at_charge(env, charger)
    claimed = later.get("p1")
    reads: list[str] = []
    load = later.store.load
    later.store.load = lambda run_id: reads.append(run_id) or load(run_id)
    state = later.recover_run("p1", state=claimed)
    assert state.status is Status.COMPLETED and state.output == {"receipt": "receipt-7"}
    assert reads == []
    assert state == load("p1")
    env.check_ledger(later, "p1")


def test_recover_run_with_a_stale_claimed_state_leaves_the_run_to_its_writer(
    env: Any,
) -> None:
    """The run moved on after the claim read it: the drive's first commit conflicts, nothing
    is written twice, and the stored state is returned."""
    charger = Charger()
    later = _left_running_at_charge(env, charger)
    stale = later.get("p1")
    env.open([pipeline], {"charge": charger}).recover()  # another process finishes it
    state = later.recover_run("p1", state=stale)
    assert state.status is Status.COMPLETED
    assert charger.keys == ["p1:3"]  # the stale drive's commit of its request lost the race
    env.check_ledger(later, "p1")


def test_recover_run_redispatch_reads_the_state_itself(env: Any) -> None:
    """With ``redispatch`` the state passed in is not trusted: a worker's orphan sweep lists
    a run parked on a call, the call's live dispatcher finishes it meanwhile, and the sweep's
    ``recover_run(redispatch=True, state=listed)`` must not run the function again."""
    charger = Charger()
    rt = env.open([pipeline], {"charge": charger}, crash=waiting_on("effect"), after=True)
    with pytest.raises(env.Crash):
        rt.start(pipeline, 7, run_id="p1")
    listed = rt.get("p1")  # what the sweep saw: parked on the unresolved call
    env.open([pipeline], {"charge": charger}).recover()  # the dispatcher finishes it
    assert charger.keys == ["p1:3"]
    sweeper = env.open([pipeline], {"charge": charger})
    state = sweeper.recover_run("p1", redispatch=True, state=listed)
    assert state.status is Status.COMPLETED
    assert charger.keys == ["p1:3"]  # not dispatched a second time
    env.check_ledger(sweeper, "p1")


# --- the embedded default's key file -------------------------------------------------------


def test_crash_while_creating_key_file_does_not_block_next_runtime(
    jsonl_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first ``Runtime`` on a directory dies while writing its new key file; the next one
    must still open (no record was ever signed with the lost key)."""
    import os

    real_write = os.write

    def dying_write(fd: int, data: Any) -> int:
        if "signer.key" in os.readlink(f"/proc/self/fd/{fd}"):
            raise jsonl_env.Crash("killed while writing the key file")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", dying_write)
    with pytest.raises(jsonl_env.Crash):
        Runtime(jsonl_env.url, [pipeline])
    monkeypatch.setattr(os, "write", real_write)
    rt = Runtime(jsonl_env.url, [pipeline], {"charge": Charger()})
    assert rt.start(pipeline, 1, run_id="p1").status is Status.COMPLETED
    assert rt.verify("p1") == 6  # five transitions and the seal
