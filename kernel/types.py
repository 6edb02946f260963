"""The kernel's values: run state, waits, effects, steps, ledger entries and transitions.

Every value here is a frozen, keyword-only ``msgspec.Struct`` so that it can be persisted as it
is and cannot be changed behind the kernel's back.  Rules that keep old data readable
(msgspec's schema-evolution rules): a new field always gets a default, a tag is never renamed.

Effects form one tagged union, ``Effect``, with explicit tags.  A user-defined effect kind is a
``Custom`` effect whose ``kind`` names the handler; this keeps the union closed (and decodable
with one typed decoder) while the set of handlers stays open.

Times are timezone-aware ``datetime`` values in UTC; the kernel never reads the clock, callers
pass ``now``.
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta
from typing import Any, Literal, TypeAlias

import msgspec


class Status(enum.StrEnum):
    """Where a run stands.  See ``kernel.table`` for the inputs each status accepts."""

    RUNNING = "running"
    """Ready for ``tick``: the node in ``RunState.node`` runs next."""
    WAITING = "waiting"
    """Parked on ``RunState.wait`` until resume, timeout or cancel."""
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for the three terminal statuses."""
        # Identity tests: ``self in frozenset`` hashes the member through Enum.__hash__, a
        # Python-level call, and the runtime asks this a few times per transition.
        return self is _COMPLETED or self is _FAILED or self is _CANCELLED


_COMPLETED, _FAILED, _CANCELLED = Status.COMPLETED, Status.FAILED, Status.CANCELLED

WaitKind: TypeAlias = Literal["event", "user", "timer", "child", "effect"]


def _qualified(exc: type[BaseException] | str) -> str:
    if isinstance(exc, str):
        return exc
    return f"{exc.__module__}.{exc.__qualname__}"


class Retry(msgspec.Struct, frozen=True, kw_only=True):
    """Retry policy of a ``call``: exponential backoff with a cap and jitter.

    ``retry_on`` holds exception classes or their qualified names; it is stored as names so
    that the policy can be persisted.  Empty means every ``Exception`` retries.
    """

    attempts: int = 3
    """Total attempts, the first one included."""
    initial: float = 0.1
    """Seconds before the second attempt."""
    multiplier: float = 2.0
    max_delay: float = 30.0
    """Cap on any single delay, in seconds."""
    jitter: float = 0.1
    """Each delay is scaled by a random factor in ``[1 - jitter, 1 + jitter]``."""
    retry_on: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("Retry.jitter must be between 0 and 1")
        if self.initial < 0 or self.max_delay < 0 or self.multiplier < 0:
            raise ValueError("Retry.initial, multiplier and max_delay must not be negative")
        names = tuple(_qualified(e) for e in self.retry_on)
        msgspec.structs.force_setattr(self, "retry_on", names)

    def delay(self, attempt: int, unit_random: float) -> float:
        """Seconds to sleep after failed attempt ``attempt`` (1-based).

        ``unit_random`` in ``[0, 1)`` is supplied by the caller: the kernel has no randomness.
        """
        try:
            grown = self.initial * self.multiplier ** (attempt - 1)
        except OverflowError:  # far past the cap (a policy that retries for hours)
            grown = self.max_delay
        base = min(self.max_delay, grown)
        return base * (1 - self.jitter + 2 * self.jitter * unit_random)

    def retries(self, exc: BaseException) -> bool:
        """Whether ``exc`` is one of the exceptions this policy retries."""
        if not isinstance(exc, Exception):
            return False
        if not self.retry_on:
            return True
        wanted = set(self.retry_on)
        for cls in type(exc).__mro__:
            if _qualified(cls) in wanted or cls.__qualname__ in wanted:
                return True
        return False


# --- effects: one tagged union -------------------------------------------------------------


class WaitEvent(msgspec.Struct, frozen=True, kw_only=True, tag="wait_event"):
    """Park until ``send_event(key, payload)``; optional deadline."""

    key: str
    into: str | None = None
    then: str
    deadline: datetime | None = None
    on_timeout: str | None = None
    """Node to continue at with ``{"timed_out": True}`` in ``into``; None fails the run."""


class WaitUntil(msgspec.Struct, frozen=True, kw_only=True, tag="wait_until"):
    """Park until a point in time (a time in the past wakes at once)."""

    when: datetime | None = None
    """Absolute due time; the kernel fills it in from ``delay`` when only that is given."""
    delay: timedelta | None = None
    """A delay from the moment the node returned (``now + delay``)."""
    then: str


class AskUser(msgspec.Struct, frozen=True, kw_only=True, tag="ask_user"):
    """Park until a person answers; ``choices`` restricts the answers."""

    prompt: str
    choices: tuple[str, ...] | None = None
    into: str | None = None
    then: str
    timeout: timedelta | None = None
    deadline: datetime | None = None
    """Filled in by the kernel from ``timeout``."""
    on_timeout: str | None = None
    """Escalation: node to continue at when the timeout passes; None fails the run."""


class Subworkflow(msgspec.Struct, frozen=True, kw_only=True, tag="subworkflow"):
    """Start a child run; ``wait`` parks until it ends, ``detach`` continues with its id."""

    workflow: str
    input: Any = None
    into: str | None = None
    then: str
    mode: Literal["wait", "detach"] = "wait"
    on_error: str | None = None
    """Node to continue at when the child fails (error in ``into``); None fails the run."""
    run_id: str | None = None
    """The child's run id, filled in by the kernel (deterministic: parent id and step)."""


class Call(msgspec.Struct, frozen=True, kw_only=True, tag="call"):
    """Run a registered side-effecting function once, with retries and a timeout."""

    name: str
    args: Any = None
    """A dict (keyword arguments), a list (positional arguments) or None."""
    into: str | None = None
    then: str
    retry: Retry | None = None
    timeout: float | None = None
    """Seconds each attempt may take."""
    on_error: str | None = None


class Custom(msgspec.Struct, frozen=True, kw_only=True, tag="custom"):
    """An effect of a user-registered kind, carried out by the handler for ``kind``."""

    kind: str
    args: Any = None
    into: str | None = None
    then: str
    on_error: str | None = None


Effect: TypeAlias = WaitEvent | WaitUntil | AskUser | Subworkflow | Call | Custom


def effect_kind(effect: Effect) -> str:
    """The handler key of an effect: its tag, or ``kind`` for a ``Custom`` effect."""
    if isinstance(effect, Custom):
        return effect.kind
    return type(effect).__struct_config__.tag  # type: ignore[return-value]


# --- steps a node returns ------------------------------------------------------------------


class Goto(msgspec.Struct, frozen=True, kw_only=True):
    """Continue at ``node`` after merging ``set`` into the run's vars."""

    node: str
    set: dict[str, Any] | None = None


class Done(msgspec.Struct, frozen=True, kw_only=True):
    """Finish the run with ``output``."""

    output: Any = None


class Fail(msgspec.Struct, frozen=True, kw_only=True):
    """Finish the run as FAILED with ``reason``."""

    reason: str


Step: TypeAlias = Goto | Done | Fail | Effect

# --- run state -----------------------------------------------------------------------------


class Wait(msgspec.Struct, frozen=True, kw_only=True):
    """What a WAITING run waits for, and where it continues."""

    kind: WaitKind
    key: str
    """Event key, child run id, or ``run_id:step`` for timers, questions and effects."""
    then: str
    into: str | None = None
    deadline: datetime | None = None
    """When a timer is due, or when an event/question times out."""
    on_timeout: str | None = None
    on_error: str | None = None
    prompt: str | None = None
    choices: tuple[str, ...] | None = None
    effect: Effect | None = None
    """The effect that opened the wait, kept so that recovery can dispatch it again."""


class ParentLink(msgspec.Struct, frozen=True, kw_only=True):
    """A child run's link to the parent run that waits for it (or started it detached)."""

    run_id: str
    key: str


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Why a run (or an effect) failed."""

    type: str
    message: str
    node: str | None = None
    retryable: bool = False


class RunState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything known about one run; the store persists exactly this value."""

    run_id: str
    workflow: str
    version: str
    """The workflow's logic id when the run was started (or last migrated)."""
    status: Status
    node: str | None
    """The node to run next (RUNNING), the node that opened the wait (WAITING; the run
    continues at ``wait.then``, ``on_timeout`` or ``on_error``), or the last one run."""
    input: Any = None
    vars: dict[str, Any] = msgspec.field(default_factory=dict)
    wait: Wait | None = None
    output: Any = None
    error: ErrorInfo | None = None
    parent: ParentLink | None = None
    children: tuple[str, ...] = ()
    step: int = 0
    """Transitions so far."""
    created_at: datetime
    updated_at: datetime
    seq: int = -1
    """Ledger seq of the last record of this run (-1: none yet)."""
    head: str = ""
    """Hex record hash of the last ledger record ("" before the first)."""


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """An unsigned ledger fact produced by a transition; the ledger layer signs it.

    Bodies carry digests, not user values, so a ledger can be shared without the data.
    ``state`` is the SHA-256 of the new state's JSON encoding with ``seq``/``head`` still naming
    the previous record (the hash of the record being made cannot be inside it).
    """

    kind: str
    node: str | None = None
    next: str | None = None
    effect: str | None = None
    key: str | None = None
    payload: str | None = None
    state: str


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """The result of one kernel input: the new state, effects to carry out, ledger facts."""

    state: RunState
    effects: tuple[Effect, ...] = ()
    entries: tuple[Entry, ...] = ()
