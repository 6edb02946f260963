"""``Runtime``: refused input, the ledger it writes, limits, logic versions and logging.

Each test runs on the memory store and on the JSONL store (the ``env`` fixture) unless it is
about something only one of them has.  A refused input must raise its own typed error naming
what was wrong and leave the stored run exactly as it was: state and ledger are compared
before and after.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import structlog
from structlog.testing import capture_logs
from wakepoint import (
    InvalidAnswer,
    NotWaiting,
    RunExists,
    RunFinished,
    RunNotFound,
    Status,
    UnencodableValue,
    UnknownWorkflow,
    VersionMismatch,
    Workflow,
    WrongWaitKey,
    ask_user,
    call,
    done,
    fail,
    goto,
    wait_event,
)
from wakepoint.kernel.errors import ChainError
from wakepoint.ledger.records import verify_chain

# --- workflows -----------------------------------------------------------------------------

approval = Workflow("approval")


@approval.node(start=True)
def ask(run: Any) -> Any:
    return ask_user("Ship it?", choices=["yes", "no"], into="answer", then="decide")


@approval.node
def decide(run: Any) -> Any:
    return done({"answer": run.vars["answer"], "input": run.input})


free_text = Workflow("free-text")


@free_text.node(start=True)
def question(run: Any) -> Any:
    return ask_user("Anything to add?", into="note", then="finish")


@free_text.node
def finish(run: Any) -> Any:
    return done(run.vars["note"])


listener = Workflow("listener")


@listener.node(start=True)
def listen(run: Any) -> Any:
    return wait_event(f"order:{run.input}", into="event", then="got")


@listener.node
def got(run: Any) -> Any:
    return done(run.vars["event"])


poison = Workflow("poison")


@poison.node(start=True)
def fine(run: Any) -> Any:
    return goto("bad", set={"ok": 1})


@poison.node
def bad(run: Any) -> Any:
    return goto("never", set={"handle": object(), "also_ok": 2})


@poison.node
def never(run: Any) -> Any:
    return done()


linear = Workflow("linear")


@linear.node(start=True)
def one(run: Any) -> Any:
    return goto("two", set={"n": 1})


@linear.node
def two(run: Any) -> Any:
    return call("add", {"a": run.vars["n"], "b": 41}, into="sum", then="three")


@linear.node
def three(run: Any) -> Any:
    return ask_user("ok?", choices=["ok"], into="ack", then="four")


@linear.node
def four(run: Any) -> Any:
    return done({"sum": run.vars["sum"], "ack": run.vars["ack"]})


def add(a: int, b: int) -> int:
    return a + b


failing = Workflow("failing")


@failing.node(start=True)
def boom(run: Any) -> Any:
    raise RuntimeError("node exploded")


refusing = Workflow("refusing")


@refusing.node(start=True)
def refuse(run: Any) -> Any:
    return fail("not today")


# --- refused input -------------------------------------------------------------------------


def test_refusals_are_distinct_types() -> None:
    """Each kind of bad input has its own exception class; none is a case of another."""
    classes = [WrongWaitKey, InvalidAnswer, RunFinished, RunNotFound, UnencodableValue]
    for a in classes:
        for b in classes:
            assert a is b or not issubclass(a, b), (a, b)


def test_resume_with_wrong_key_is_refused(env: Any, snapshot: Any) -> None:
    """``resume`` with a key the run does not wait on raises ``WrongWaitKey`` naming both keys."""
    rt = env.open([approval])
    run = rt.start(approval, run_id="r1")
    before = snapshot(rt, "r1")
    with pytest.raises(WrongWaitKey) as info:
        rt.resume("r1", "r1:999", "yes")
    assert info.value.expected == run.wait.key
    assert info.value.got == "r1:999"
    assert "'r1:999'" in str(info.value) and repr(run.wait.key) in str(info.value)
    assert snapshot(rt, "r1") == before
    assert snapshot(env.open([approval]), "r1") == before  # nothing reached the store either


def test_resume_that_keeps_losing_the_key_hand_over_race_raises_the_conflict(
    env: Any, snapshot: Any,
) -> None:
    """A run whose key hand-over loses every race (another process keeps moving it) makes
    ``resume`` raise ``ConflictError`` after its retries, like any other lost race - not an
    AssertionError - and nothing is stored."""
    from wakepoint.kernel.errors import ConflictError

    rt = env.open([approval])
    rt.start(approval, run_id="r1")
    before = snapshot(rt, "r1")

    def always_moved(state: Any) -> Any:
        raise ConflictError("r1", state.seq, state.seq + 1)

    rt._handover = always_moved
    with pytest.raises(ConflictError):
        rt.resume("r1", rt.get("r1").wait.key, "yes")
    assert snapshot(rt, "r1") == before


@pytest.mark.parametrize("run_id", ["", 7])
def test_start_with_an_empty_or_non_str_run_id_is_refused(env: Any, run_id: Any) -> None:
    """An empty run id was silently replaced by a random one; it is a ``ValueError`` now,
    as is an id that is not a str, and nothing is stored."""
    rt = env.open([approval])
    with pytest.raises(ValueError, match="run_id must be a non-empty str"):
        rt.start(approval, run_id=run_id)
    assert rt.list() == []


def test_answer_outside_choices_is_refused(env: Any, snapshot: Any) -> None:
    """``respond`` with an answer that is not a choice raises ``InvalidAnswer`` naming both."""
    rt = env.open([approval])
    rt.start(approval, run_id="r1")
    before = snapshot(rt, "r1")
    with pytest.raises(InvalidAnswer) as info:
        rt.respond("r1", "maybe")
    assert info.value.answer == "maybe"
    assert info.value.choices == ("yes", "no")
    assert "'maybe'" in str(info.value) and "'yes'" in str(info.value)
    assert snapshot(rt, "r1") == before
    # The same check guards ``resume`` with the right key.
    with pytest.raises(InvalidAnswer):
        rt.resume("r1", before[0].wait.key, "YES")
    assert snapshot(rt, "r1") == before


def test_input_to_finished_run_is_refused(env: Any, snapshot: Any) -> None:
    """Resume, respond and cancel of a finished run raise ``RunFinished`` and change nothing."""
    rt = env.open([approval])
    run = rt.start(approval, run_id="r1")
    key = run.wait.key
    assert rt.respond("r1", "yes").status is Status.COMPLETED
    before = snapshot(rt, "r1")
    for attempt in (
        lambda: rt.resume("r1", key, "yes"),
        lambda: rt.respond("r1", "no"),
        lambda: rt.cancel("r1"),
    ):
        with pytest.raises(RunFinished) as info:
            attempt()
        assert "'r1'" in str(info.value) and "completed" in str(info.value)
        assert snapshot(rt, "r1") == before


def test_unknown_run_id_is_refused(env: Any) -> None:
    """Every per-run operation on an id that does not exist raises ``RunNotFound`` naming it."""
    rt = env.open([approval])
    rt.start(approval, run_id="exists")
    for attempt in (
        lambda: rt.get("ghost"),
        lambda: rt.resume("ghost", "ghost:1", "yes"),
        lambda: rt.respond("ghost", "yes"),
        lambda: rt.cancel("ghost"),
        lambda: rt.ledger("ghost"),
    ):
        with pytest.raises(RunNotFound) as info:
            attempt()
        assert info.value.run_id == "ghost"
        assert "'ghost'" in str(info.value)
    assert [s.run_id for s in rt.list()] == ["exists"]


def test_unknown_workflow_is_refused(env: Any) -> None:
    """``start`` by the id of a workflow this runtime does not know raises ``UnknownWorkflow``
    naming it, and creates no run."""
    rt = env.open([approval])
    with pytest.raises(UnknownWorkflow, match="'nope'"):
        rt.start("nope", run_id="r1")
    assert rt.list() == []


def test_respond_to_run_not_asking_is_refused(env: Any, snapshot: Any) -> None:
    """``respond`` to a run that waits for an event (not a person) raises ``NotWaiting``."""
    rt = env.open([listener])
    rt.start(listener, "7", run_id="r1")
    before = snapshot(rt, "r1")
    with pytest.raises(NotWaiting, match="answer from a person"):
        rt.respond("r1", "yes")
    assert snapshot(rt, "r1") == before


def test_unencodable_var_is_refused_and_run_stays_at_last_commit(env: Any) -> None:
    """A node that sets a var msgspec cannot encode raises ``UnencodableValue`` naming the var.

    Nothing of the refused step is stored: the run stays RUNNING at the node that set it, as
    its last good commit left it, with a ledger of one record per committed transition.
    """
    rt = env.open([poison])
    with pytest.raises(UnencodableValue) as info:
        rt.start(poison, run_id="p1")
    message = str(info.value)
    assert "'handle'" in message and "'p1'" in message and "'bad'" in message
    assert "also_ok" not in message
    state = rt.get("p1")
    assert state.status is Status.RUNNING
    assert state.node == "bad"
    assert state.vars == {"ok": 1}
    assert env.kinds(rt, "p1") == ["run.started", "node.stepped"]
    env.check_ledger(rt, "p1")


def test_unencodable_event_payload_is_refused(env: Any, snapshot: Any) -> None:
    """``send_event`` with an unencodable payload raises ``UnencodableValue`` naming the event,
    before any waiting run is touched."""
    rt = env.open([listener])
    rt.start(listener, "7", run_id="r1")
    before = snapshot(rt, "r1")
    with pytest.raises(UnencodableValue) as info:
        rt.send_event("order:7", {"when": object()})
    assert "'order:7'" in str(info.value) and "'when'" in str(info.value)
    assert snapshot(rt, "r1") == before


def test_unencodable_resume_payload_is_refused(env: Any, snapshot: Any) -> None:
    """``resume``/``respond`` with an unencodable payload raise ``UnencodableValue`` and store
    nothing."""
    rt = env.open([free_text])
    run = rt.start(free_text, run_id="r1")
    before = snapshot(rt, "r1")
    with pytest.raises(UnencodableValue, match="'r1'"):
        rt.respond("r1", {1, 2, 3j})
    with pytest.raises(UnencodableValue, match="'r1'"):
        rt.resume("r1", run.wait.key, object())
    assert snapshot(rt, "r1") == before


def test_unencodable_start_input_is_refused(env: Any) -> None:
    """``start`` with an unencodable input raises ``UnencodableValue`` and creates no run."""
    rt = env.open([approval])
    with pytest.raises(UnencodableValue) as info:
        rt.start(approval, {"file": open}, run_id="r1")  # a function is not data
    assert "'r1'" in str(info.value) and "'file'" in str(info.value)
    with pytest.raises(RunNotFound):
        rt.get("r1")
    assert rt.list() == []


def test_start_with_taken_run_id_is_refused(env: Any, snapshot: Any) -> None:
    """``start`` with the id of an existing run raises ``RunExists`` and leaves that run be."""
    rt = env.open([approval])
    rt.start(approval, "first", run_id="r1")
    before = snapshot(rt, "r1")
    with pytest.raises(RunExists, match="'r1'"):
        rt.start(approval, "second", run_id="r1")
    assert snapshot(rt, "r1") == before


def test_start_with_taken_run_id_does_not_run_the_start_node(env: Any) -> None:
    """The taken id is refused before the start node runs (a node may have side effects;
    before, it ran and then the create was refused)."""
    ran: list[str] = []
    wf = Workflow("noisy")

    @wf.node(start=True)
    def first(run: Any) -> Any:
        ran.append(run.run_id)
        return ask_user("ok?", into="a", then="first")

    rt = env.open([wf])
    rt.start(wf, run_id="r1")
    with pytest.raises(RunExists, match="'r1'"):
        rt.start(wf, run_id="r1")
    assert ran == ["r1"]


def _shared_listener(workflow_id: str) -> Workflow:
    """A workflow whose runs wait for event ``shared`` and finish with its payload."""
    wf = Workflow(workflow_id)

    @wf.node(start=True)
    def wait_shared(run: Any) -> Any:
        return wait_event("shared", into="event", then="heard")

    @wf.node
    def heard(run: Any) -> Any:
        return done(run.vars["event"])

    return wf


def test_send_event_is_not_stopped_by_a_run_it_cannot_drive(env: Any) -> None:
    """A runtime that serves only some workflows delivers an event to the runs it can drive
    even when a run of another workflow waits on the same key."""
    theirs, ours = _shared_listener("theirs"), _shared_listener("ours")
    env.open([theirs]).start(theirs, run_id="a-theirs")
    rt = env.open([ours])
    rt.start(ours, run_id="b-ours")
    with contextlib.suppress(UnknownWorkflow):  # reporting the foreign run is fine...
        rt.send_event("shared", 1)
    assert rt.get("b-ours").status is Status.COMPLETED  # ...starving ours is not


# --- the ledger ------------------------------------------------------------------------------


def test_every_transition_is_one_record(env: Any) -> None:
    """A run through goto, call, ask_user and done leaves exactly one record per transition,
    seqs contiguous from 0, and a chain that verifies."""
    rt = env.open([linear], {"add": add})
    run = rt.start(linear, run_id="lin")
    assert run.status is Status.WAITING
    env.check_ledger(rt, "lin")
    final = rt.respond("lin", "ok")
    assert final.status is Status.COMPLETED
    assert final.output == {"sum": 42, "ack": "ok"}
    parsed = env.check_ledger(rt, "lin")
    assert [(b.kind, b.node) for b in parsed] == [
        ("run.started", None),
        ("node.stepped", "one"),
        ("effect.requested", "two"),
        ("wait.resumed", "two"),
        ("effect.requested", "three"),
        ("wait.resumed", "three"),
        ("run.completed", "four"),
        ("run.sealed", None),
    ]
    # Another runtime (the next process) reads and verifies the same chain.
    env.check_ledger(env.open([linear], {"add": add}), "lin")


def test_failed_and_cancelled_runs_are_recorded_once(env: Any) -> None:
    """A node that raises, a ``fail`` step and a cancel each end the run with one record."""
    rt = env.open([failing, refusing, approval])
    crashed = rt.start(failing, run_id="f1")
    assert crashed.status is Status.FAILED
    assert (crashed.error.type, crashed.error.message) == ("RuntimeError", "node exploded")
    refused = rt.start(refusing, run_id="f2")
    assert refused.status is Status.FAILED
    assert (refused.error.type, refused.error.message) == ("Fail", "not today")
    rt.start(approval, run_id="c1")
    cancelled = rt.cancel("c1", "changed my mind")
    assert cancelled.status is Status.CANCELLED
    assert cancelled.error.message == "changed my mind"
    assert env.kinds(rt, "f1") == ["run.started", "run.failed", "run.sealed"]
    assert env.kinds(rt, "f2") == ["run.started", "run.failed", "run.sealed"]
    assert env.kinds(rt, "c1") == ["run.started", "effect.requested", "run.cancelled",
                                   "run.sealed"]
    for run_id in ("f1", "f2", "c1"):
        env.check_ledger(rt, run_id)


def test_tampered_record_fails_verification(env: Any) -> None:
    """A record whose body bytes changed after signing fails with ``bad_signature``."""
    rt = env.open([approval])
    rt.start(approval, run_id="r1")
    records = rt.ledger("r1")
    body = bytearray(records[1].body)
    body[body.index(b'"kind"') + 9] ^= 0x01  # one bit inside the kind's value
    records[1] = msgspec.structs.replace(records[1], body=bytes(body))
    with pytest.raises(ChainError) as info:
        verify_chain(records, env.signer())
    assert info.value.code == "bad_signature"
    assert info.value.seq == 1


def _flip_payload_byte(path: Any, line_no: int, record: int = 0) -> None:
    """Change one byte of record ``record`` (0-based) stored on line ``line_no`` of a run file.

    The byte is a hex digit of the body's ``state`` digest, swapped for another hex digit, so
    the body is still valid JSON and the line still decodes: only the signed bytes differ.
    The envelope's base64 text is replaced in place; the rest of the line is untouched.
    """
    lines = path.read_bytes().split(b"\n")
    line = lines[line_no]
    start = -1
    for _ in range(record + 1):
        start = line.index(b'"payload":"', start + 1)
    start += len(b'"payload":"')
    end = line.index(b'"', start)
    body = bytearray(base64.b64decode(line[start:end]))
    pos = body.index(b'"state":"') + len(b'"state":"') + 10
    body[pos] = ord("a") if body[pos] != ord("a") else ord("b")
    lines[line_no] = line[:start] + base64.b64encode(bytes(body)) + line[end:]
    path.write_bytes(b"\n".join(lines))


def test_tampered_jsonl_record_fails_verification(jsonl_env: Any) -> None:
    """Flipping one byte of a stored record's payload in the JSONL file makes ``verify_chain``
    fail with ``ChainError`` code ``bad_signature`` at that record."""
    env = jsonl_env
    rt = env.open([approval])
    rt.start(approval, run_id="r1")
    assert rt.verify("r1") == 2
    rt.close()
    files = list((env.root / "runs").glob("*.jsonl"))
    assert len(files) == 1
    # One commit: the start together with the node that asked; its second record is the
    # effect request.
    _flip_payload_byte(files[0], 0, record=1)
    fresh = env.open([approval])
    with pytest.raises(ChainError) as info:
        fresh.verify("r1")
    assert info.value.code == "bad_signature"
    assert info.value.seq == 1
    with pytest.raises(ChainError, match="bad_signature"):
        verify_chain(fresh.ledger("r1"), env.signer())


# --- limits and logic versions -------------------------------------------------------------


def test_max_steps_bounds_a_loop(env: Any) -> None:
    """A node that loops forever is stopped at the workflow's ``max_steps`` with
    ``MaxStepsExceeded``; every step until then is recorded."""
    spin = Workflow("spin", max_steps=25)

    @spin.node(start=True)
    def again(run: Any) -> Any:
        return goto("again", set={"n": run.vars.get("n", 0) + 1})

    rt = env.open([spin])
    state = rt.start(spin, run_id="s1")
    assert state.status is Status.FAILED
    assert state.error.type == "MaxStepsExceeded"
    assert "max_steps=25" in state.error.message
    assert state.step == 26  # 25 transitions allowed, then the failure itself
    assert state.vars["n"] == 24
    env.check_ledger(rt, "s1")


def _versioned(extra_node: bool) -> Workflow:
    """The same workflow id, with or without an extra node (so another logic id)."""
    wf = Workflow("versioned")

    @wf.node(start=True)
    def begin(run: Any) -> Any:
        return ask_user("go?", choices=["go"], into="answer", then="end")

    @wf.node
    def end(run: Any) -> Any:
        return done(run.vars["answer"])

    if extra_node:

        @wf.node
        def audit(run: Any) -> Any:
            return done("audited")

    return wf


def test_changed_workflow_is_refused_without_migration(env: Any, snapshot: Any) -> None:
    """A run started under one logic id, resumed by a process whose workflow has other nodes,
    raises ``VersionMismatch`` naming run, workflow and both ids; the run is unchanged."""
    old = _versioned(extra_node=False)
    rt = env.open([old])
    rt.start(old, run_id="v1")
    before = snapshot(rt, "v1")
    new = _versioned(extra_node=True)
    assert new.logic_id != old.logic_id
    later = env.open([new])
    with pytest.raises(VersionMismatch) as info:
        later.respond("v1", "go")
    assert info.value.stored == old.logic_id and info.value.current == new.logic_id
    message = str(info.value)
    assert "'v1'" in message and "'versioned'" in message and "migration" in message
    assert snapshot(later, "v1") == before


def test_changed_workflow_resumes_with_migration(env: Any) -> None:
    """With ``@wf.migration(old_logic_id)`` registered, the new process resumes the old run,
    which finishes under the new logic id."""
    old = _versioned(extra_node=False)
    rt = env.open([old])
    rt.start(old, run_id="v1")
    new = _versioned(extra_node=True)
    seen: list[tuple[str | None, dict[str, Any]]] = []

    @new.migration(old.logic_id)
    def upgrade(node: str | None, vars: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        seen.append((node, dict(vars)))
        return node, {**vars, "migrated": True}

    later = env.open([new])
    state = later.respond("v1", "go")
    assert state.status is Status.COMPLETED
    assert state.output == "go"
    assert state.version == new.logic_id
    assert state.vars["migrated"] is True
    assert seen == [("end", {"answer": "go"})]
    env.check_ledger(later, "v1")


# --- logging -------------------------------------------------------------------------------


@pytest.fixture
def debug_logs() -> Iterator[list[dict[str, Any]]]:
    """Capture every structlog event at DEBUG level, then restore the session's WARNING."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


BOUND = ("run_id", "workflow", "node", "step")


def test_lifecycle_events_carry_run_context(env: Any, debug_logs: list[dict[str, Any]]) -> None:
    """Run lifecycle events (started, each transition, completed, failed, cancelled, a failed
    effect) carry ``run_id``, ``workflow``, ``node`` and ``step``."""
    rt = env.open([linear, failing, approval], {"add": add})
    rt.start(linear, run_id="lin")
    rt.respond("lin", "ok")
    rt.start(failing, run_id="bad")
    rt.start(approval, run_id="c1")
    rt.cancel("c1")
    broken = Workflow("broken-call")

    @broken.node(start=True)
    def go(run: Any) -> Any:
        return call("missing", then="go")

    rt.start(broken, run_id="b1")

    events = {e["event"] for e in debug_logs}
    assert {"run.started", "transition", "run.completed", "run.failed", "run.cancelled",
            "effect.failed"} <= events
    lifecycle = [e for e in debug_logs if e["event"].startswith(("run.", "transition", "effect."))]
    for event in lifecycle:
        missing = [k for k in BOUND if k not in event]
        assert not missing, (event, missing)
    completed = next(e for e in debug_logs if e["event"] == "run.completed")
    assert completed["run_id"] == "lin" and completed["workflow"] == "linear"
    assert completed["node"] == "four" and completed["step"] == 7
    transitions = [e["step"] for e in debug_logs
                   if e["event"] == "transition" and e["run_id"] == "lin"]
    assert transitions == sorted(transitions) and len(transitions) == len(set(transitions))


def test_import_does_not_configure_structlog() -> None:
    """Importing wakepoint and every module in it, then running a workflow, leaves structlog
    unconfigured: the application owns logging."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil
        import structlog
        import wakepoint
        # Not __main__ (it runs the CLI) nor the Alembic env script (it runs under Alembic).
        names = [m.name for m in pkgutil.walk_packages(wakepoint.__path__, "wakepoint.")
                 if not m.name.endswith(("__main__", ".env"))]
        assert "wakepoint.runtime" in names and "wakepoint.stores.jsonl" in names, names
        for name in names:
            importlib.import_module(name)
        assert not structlog.is_configured(), "configured on import"
        wf = wakepoint.Workflow("w")

        @wf.node(start=True)
        def only(run):
            return wakepoint.done(1)

        assert wakepoint.Runtime("memory:", [wf]).start(wf).output == 1
        print(structlog.is_configured())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    # Unconfigured structlog prints the run's events to stdout before the last line.
    assert out.stdout.splitlines()[-1] == "False"
