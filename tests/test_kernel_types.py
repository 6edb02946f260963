"""Kernel values: Status, Retry, effects and their constructors, the codec, the errors.

Everything here is a plain value; the tests pin what each promises on its own, without running
transitions.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import msgspec
import pytest
from wakepoint import kernel
from wakepoint.kernel import (
    AskUser,
    Call,
    ChainError,
    ConflictError,
    CorruptStore,
    Custom,
    Done,
    Effect,
    ErrorInfo,
    Fail,
    Goto,
    InvalidAnswer,
    ParentLink,
    Retry,
    RunExists,
    RunNotFound,
    RunState,
    Status,
    Subworkflow,
    UnencodableValue,
    UnknownEffect,
    UnknownFunction,
    UnknownWorkflow,
    VersionMismatch,
    Wait,
    WaitEvent,
    WaitUntil,
    WakepointError,
    Workflow,
    WrongWaitKey,
    ask_user,
    call,
    done,
    effect,
    effect_kind,
    fail,
    goto,
    subworkflow,
    wait_event,
    wait_until,
)
from wakepoint.kernel.codec import (
    decode_effect,
    decode_state,
    digest,
    encode,
    encode_state,
    value_digest,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


# --- Status ------------------------------------------------------------------------------------


def test_status_finished_marks_exactly_the_terminal_statuses() -> None:
    """COMPLETED, FAILED and CANCELLED are finished; RUNNING and WAITING are not."""
    assert {s for s in Status if s.finished} == {
        Status.COMPLETED, Status.FAILED, Status.CANCELLED,
    }
    assert [s.value for s in Status] == ["running", "waiting", "completed", "failed", "cancelled"]


# --- Retry -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attempts": 0}, "attempts must be at least 1"),
        ({"attempts": -1}, "attempts must be at least 1"),
        ({"jitter": -0.01}, "jitter must be between 0 and 1"),
        ({"jitter": 1.01}, "jitter must be between 0 and 1"),
        ({"initial": -1}, "must not be negative"),
        ({"max_delay": -1}, "must not be negative"),
        ({"multiplier": -2}, "must not be negative"),
    ],
)
def test_retry_refuses_bad_policies(kwargs: dict[str, Any], match: str) -> None:
    """Fewer than one attempt, or jitter outside [0, 1], is refused with ``ValueError``."""
    with pytest.raises(ValueError, match=match):
        Retry(**kwargs)


def test_retry_accepts_boundary_policies() -> None:
    """One attempt and jitter of exactly 0 or 1 are valid."""
    assert Retry(attempts=1, jitter=0).attempts == 1
    assert Retry(jitter=1).jitter == 1


def test_retry_delay_is_exponential_and_capped() -> None:
    """Without jitter the delay is ``initial * multiplier ** (attempt - 1)``, capped."""
    policy = Retry(initial=0.5, multiplier=3.0, max_delay=10.0, jitter=0)
    assert [policy.delay(n, 0.7) for n in (1, 2, 3, 4, 5)] == [0.5, 1.5, 4.5, 10.0, 10.0]


def test_retry_delay_of_a_very_late_attempt_is_the_cap() -> None:
    """An attempt far enough in that the growth overflows a float (a policy retrying for
    hours) waits the cap, instead of raising ``OverflowError``."""
    policy = Retry(attempts=10**6, initial=1.0, multiplier=2.0, max_delay=30.0, jitter=0)
    assert policy.delay(5000, 0.5) == 30.0


def test_retry_delay_jitter_stays_in_bounds() -> None:
    """Jitter scales the delay by ``1 - jitter`` at random 0 up to ``1 + jitter`` near 1."""
    policy = Retry(initial=2.0, multiplier=2.0, max_delay=100.0, jitter=0.25)
    assert policy.delay(2, 0.0) == pytest.approx(3.0)
    assert policy.delay(2, 0.5) == pytest.approx(4.0)
    assert policy.delay(2, 0.999999) == pytest.approx(5.0, rel=1e-5)
    assert all(3.0 <= policy.delay(2, u / 100) < 5.0 for u in range(100))


def test_retry_with_no_list_retries_every_exception_but_no_base_exception() -> None:
    """An empty ``retry_on`` retries any ``Exception``, never KeyboardInterrupt/SystemExit."""
    policy = Retry()
    assert policy.retries(ValueError("x"))
    assert policy.retries(OSError("x"))
    assert not policy.retries(KeyboardInterrupt())
    assert not policy.retries(SystemExit(1))


class _Transient(ConnectionError):
    pass


def test_retry_on_names_or_classes_matches_subclasses() -> None:
    """``retry_on`` takes classes or names (qualified or bare), stored as names; an exception
    matches when any class in its MRO is listed."""
    policy = Retry(retry_on=(ConnectionError, "TimeoutError", _Transient))
    assert policy.retry_on == (
        "builtins.ConnectionError", "TimeoutError", f"{__name__}._Transient",
    )
    assert policy.retries(ConnectionResetError())  # subclass of a listed class
    assert policy.retries(_Transient())
    assert policy.retries(TimeoutError())  # bare name
    assert not policy.retries(ValueError())
    assert not policy.retries(KeyboardInterrupt())
    assert Retry(retry_on=("builtins.OSError",)).retries(_Transient())  # via the MRO


def test_retry_survives_the_codec() -> None:
    """A policy built from classes decodes back equal (names persist)."""
    policy = Retry(attempts=4, retry_on=(ValueError,))
    assert msgspec.json.decode(encode(policy), type=Retry) == policy


# --- effects and steps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eff", "kind"),
    [
        (WaitEvent(key="k", then="a"), "wait_event"),
        (WaitUntil(when=NOW, then="a"), "wait_until"),
        (AskUser(prompt="?", then="a"), "ask_user"),
        (Subworkflow(workflow="w", then="a"), "subworkflow"),
        (Call(name="f", then="a"), "call"),
        (Custom(kind="email", then="a"), "email"),
    ],
)
def test_effect_kind_is_the_tag_or_the_custom_kind(eff: Effect, kind: str) -> None:
    """``effect_kind`` is the union tag, except for Custom effects, where it is ``kind``."""
    assert effect_kind(eff) == kind


def test_simple_step_constructors() -> None:
    """goto, done and fail build the matching structs."""
    assert goto("b") == Goto(node="b", set=None)
    assert goto("b", set={"x": 1}) == Goto(node="b", set={"x": 1})
    assert done() == Done(output=None)
    assert done([1]) == Done(output=[1])
    assert fail("why") == Fail(reason="why")


def test_wait_event_constructor() -> None:
    """wait_event keeps key, into, then, deadline and on_timeout."""
    assert wait_event("k", into="v", then="b", deadline=NOW, on_timeout="c") == WaitEvent(
        key="k", into="v", then="b", deadline=NOW, on_timeout="c"
    )


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (NOW, WaitUntil(when=NOW, then="b")),
        (30, WaitUntil(delay=timedelta(seconds=30), then="b")),
        (1.5, WaitUntil(delay=timedelta(seconds=1.5), then="b")),
        (timedelta(days=2), WaitUntil(delay=timedelta(days=2), then="b")),
    ],
    ids=["datetime", "int-seconds", "float-seconds", "timedelta"],
)
def test_wait_until_takes_a_time_or_a_delay(when: Any, expected: WaitUntil) -> None:
    """A datetime is an absolute time; seconds or a timedelta are a delay."""
    assert wait_until(when, then="b") == expected


def test_ask_user_constructor_converts_choices_and_timeout() -> None:
    """ask_user stores choices as a tuple and the timeout as a timedelta."""
    asked = ask_user("Ok?", choices=["yes", "no"], into="a", then="b", timeout=90,
                     on_timeout="c")
    assert asked == AskUser(
        prompt="Ok?", choices=("yes", "no"), into="a", then="b",
        timeout=timedelta(seconds=90), on_timeout="c",
    )
    assert ask_user("?", then="b", timeout=timedelta(hours=1)).timeout == timedelta(hours=1)
    bare = ask_user("?", then="b")
    assert (bare.choices, bare.timeout, bare.deadline) == (None, None, None)


def test_subworkflow_constructor_takes_a_workflow_or_its_id() -> None:
    """subworkflow stores the workflow's id, whether given the object or the id."""
    child = Workflow("child")
    expected = Subworkflow(workflow="child", input={"n": 1}, into="r", then="b",
                           mode="detach", on_error="e")
    assert subworkflow(child, {"n": 1}, into="r", then="b", mode="detach",
                       on_error="e") == expected
    assert subworkflow("child", {"n": 1}, into="r", then="b", mode="detach",
                       on_error="e") == expected
    assert subworkflow("child", then="b").mode == "wait"


def test_subworkflow_constructor_refuses_an_unknown_mode() -> None:
    """A mode other than "wait" or "detach" raises ``ValueError`` naming it."""
    with pytest.raises(ValueError, match="not 'later'"):
        subworkflow("child", then="b", mode="later")  # type: ignore[arg-type]


def test_call_constructor_stores_tuple_args_as_a_list() -> None:
    """call turns tuple args into a list (how they persist); dicts and None stay as given."""
    policy = Retry(attempts=2)
    assert call("f", (1, 2), into="r", then="b", retry=policy, timeout=3.0,
                on_error="e") == Call(name="f", args=[1, 2], into="r", then="b", retry=policy,
                                      timeout=3.0, on_error="e")
    assert call("f", {"x": 1}, then="b").args == {"x": 1}
    assert call("f", then="b").args is None


def test_effect_constructor_builds_a_custom_effect() -> None:
    """effect(kind, args, ...) builds a Custom effect."""
    assert effect("email", {"to": "x"}, into="r", then="b", on_error="e") == Custom(
        kind="email", args={"to": "x"}, into="r", then="b", on_error="e"
    )


def test_values_are_frozen() -> None:
    """Kernel values cannot be changed in place."""
    with pytest.raises(AttributeError):
        goto("b").node = "c"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Retry().attempts = 9  # type: ignore[misc]


# --- codec -------------------------------------------------------------------------------------

EFFECTS: list[Effect] = [
    WaitEvent(key="k", into="v", then="b", deadline=NOW, on_timeout="c"),
    WaitUntil(when=NOW, delay=timedelta(seconds=5), then="b"),
    AskUser(prompt="?", choices=("y", "n"), into="v", then="b", timeout=timedelta(minutes=3),
            deadline=NOW, on_timeout="c"),
    Subworkflow(workflow="w", input={"n": [1, 2]}, into="v", then="b", mode="detach",
                on_error="e", run_id="r.2"),
    Call(name="f", args=[1, "x"], into="v", then="b",
         retry=Retry(attempts=5, retry_on=(KeyError,)), timeout=1.5, on_error="e"),
    Custom(kind="email", args={"to": "x"}, into="v", then="b", on_error="e"),
]


@pytest.mark.parametrize("eff", EFFECTS, ids=[effect_kind(e) for e in EFFECTS])
def test_each_effect_roundtrips_through_the_codec(eff: Effect) -> None:
    """Every effect variant decodes back equal, and of the same type, from its tagged JSON."""
    data = encode(eff)
    assert msgspec.json.decode(data)["type"] == type(eff).__struct_config__.tag
    decoded = decode_effect(data)
    assert type(decoded) is type(eff)
    assert decoded == eff


def test_run_state_roundtrips_through_the_codec() -> None:
    """A run state with every field set decodes back equal from ``encode_state``."""
    state = RunState(
        run_id="r", workflow="w", version="abc", status=Status.WAITING, node="a",
        input={"n": 1}, vars={"x": [1, {"y": None}]},
        wait=Wait(kind="user", key="r:2", then="b", into="v", deadline=NOW, on_timeout="c",
                  prompt="?", choices=("y",), effect=EFFECTS[2]),
        output=None, error=ErrorInfo(type="E", message="m", node="a", retryable=True),
        parent=ParentLink(run_id="p", key="p.3"), children=("r.1",), step=2,
        created_at=NOW, updated_at=NOW + timedelta(seconds=1), seq=4, head="ab" * 32,
    )
    decoded = decode_state(encode_state(state))
    assert decoded == state
    assert decoded.status is Status.WAITING
    assert decode_state(memoryview(encode_state(state))) == state


def test_decode_refuses_bad_bytes() -> None:
    """Bad bytes raise msgspec's errors: an unknown effect tag, a state missing fields."""
    with pytest.raises(msgspec.ValidationError):
        decode_effect(b'{"type": "teleport", "then": "b"}')
    with pytest.raises(msgspec.ValidationError):
        decode_state(b'{"run_id": "r"}')
    with pytest.raises(msgspec.DecodeError):
        decode_state(b"not json")


def test_digests_are_sha256_of_the_encoding() -> None:
    """``digest`` is hex SHA-256; ``value_digest`` digests a value's JSON encoding."""
    assert digest(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert value_digest({"a": [1]}, "here") == hashlib.sha256(b'{"a":[1]}').hexdigest()


def test_a_read_only_mapping_encodes_as_a_dict() -> None:
    """``run.vars`` (a mappingproxy) encodes like the dict it shows; other objects do not."""
    assert encode(MappingProxyType({"a": 1})) == b'{"a":1}'
    assert encode({"nested": MappingProxyType({"b": [2]})}) == b'{"nested":{"b":[2]}}'
    with pytest.raises(TypeError, match="type object is unsupported"):
        encode(object())


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (object(), "object value: Encoding objects of type object is unsupported"),
        ({"ok": 1, "bad": object()}, "key 'bad': object value"),
        ({"a": {"b": [0, 1, object()]}}, "key 'a': key 'b': item 2: object value"),
        ([1, (2, object())], "item 1: item 1: object value"),
        ({(1, 2): "tuple key"}, "dict value: Encoding objects of type tuple is unsupported"),
        ("\ud800", "str value:"),
    ],
    ids=["object", "dict-item", "nested", "list-tuple", "dict-key", "surrogate"],
)
def test_value_digest_names_where_and_the_first_bad_part(value: Any, detail: str) -> None:
    """An unencodable value raises ``UnencodableValue`` naming where it was and the path to
    its first unencodable part."""
    with pytest.raises(UnencodableValue) as info:
        value_digest(value, "output of node 'a'")
    assert info.value.where == "output of node 'a'"
    assert info.value.detail.startswith(detail)
    assert str(info.value).startswith("output of node 'a' cannot be persisted: ")


# --- errors ------------------------------------------------------------------------------------


def test_errors_name_what_was_wrong() -> None:
    """Each error keeps its facts as attributes and names them in its message."""
    cases: list[tuple[WakepointError, str, dict[str, Any]]] = [
        (WrongWaitKey("r", "k1", "k2"), "run 'r' waits on key 'k1', not 'k2'",
         {"run_id": "r", "expected": "k1", "got": "k2"}),
        (InvalidAnswer("r", "maybe", ("y", "n")),
         "run 'r': answer 'maybe' is not one of the choices ['y', 'n']",
         {"answer": "maybe", "choices": ("y", "n")}),
        (UnencodableValue("var 'x'", "object value"), "var 'x' cannot be persisted: object value",
         {"where": "var 'x'", "detail": "object value"}),
        (VersionMismatch("r", "w", "old", "new"), "started under logic id old, the registered "
         "workflow has logic id new; register a migration with @workflow.migration('old')",
         {"workflow": "w", "stored": "old", "current": "new"}),
        (RunNotFound("r"), "no run with id 'r'", {"run_id": "r"}),
        (RunExists("r"), "a run with id 'r' already exists", {"run_id": "r"}),
        (ConflictError("r", 3, 5), "run 'r': expected ledger seq 3, store has 5",
         {"expected_seq": 3, "actual_seq": 5}),
        (UnknownWorkflow("w"), "workflow 'w' is not registered with this runtime",
         {"workflow": "w"}),
        (UnknownEffect("fax"), "no handler is registered for effect kind 'fax'",
         {"kind": "fax"}),
        (UnknownFunction("f"), "call names function 'f', which is not registered",
         {"name": "f"}),
        (CorruptStore("runs.jsonl", 12, "bad json"), "runs.jsonl:12: bad json",
         {"where": "runs.jsonl", "line": 12, "detail": "bad json"}),
        (CorruptStore("runs", None, "bad row"), "runs: bad row", {"line": None}),
        (ChainError("bad-hash", "r", 7, "mismatch"), "run 'r' seq 7: bad-hash: mismatch",
         {"code": "bad-hash", "run_id": "r", "seq": 7, "detail": "mismatch"}),
    ]
    for error, message, attributes in cases:
        assert isinstance(error, WakepointError)
        assert message in str(error)
        for name, value in attributes.items():
            assert getattr(error, name) == value


def test_public_surface_is_explicit_and_sorted() -> None:
    """``wakepoint.kernel.__all__`` is sorted and every name in it is importable."""
    assert list(kernel.__all__) == sorted(kernel.__all__)
    assert all(hasattr(kernel, name) for name in kernel.__all__)
