"""The effect-handler protocol: what a handler receives and what it may answer.

A handler carries out one effect that a node requested.  The run has already been committed as
WAITING on the effect's key before the handler is called, so a crash during the handler loses
nothing: recovery dispatches the same effect again (handlers must therefore tolerate being
called twice for one key; ``call`` passes that key to the user's function for this reason).

A handler answers with an ``Outcome``:

* ``Resolved(value)`` - done; the runtime resumes the run at once with ``value``.
* ``Parked()`` - the run keeps waiting for ``respond``, ``send_event``, a timer or a child.
* ``Failed(type, message, retryable)`` - the effect failed for good; the run continues at the
  node's ``on_error`` branch or fails.  (Retrying is the handler's business: ``call`` retries
  inside its policy and reports ``Failed`` only when the policy gives up.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol, TypeAlias, runtime_checkable

import msgspec

from ..kernel.types import Effect, ErrorInfo, ParentLink, RunState


class Resolved(msgspec.Struct, frozen=True):
    """The effect finished with ``value``; the run resumes with it now."""

    value: Any = None


class Parked(msgspec.Struct, frozen=True):
    """The run waits; something outside (a person, an event, a timer, a child) resumes it."""


class Failed(msgspec.Struct, frozen=True, kw_only=True):
    """The effect failed for good."""

    type: str
    message: str
    retryable: bool = False

    def error(self) -> ErrorInfo:
        """As the kernel's ``ErrorInfo``."""
        return ErrorInfo(type=self.type, message=self.message, retryable=self.retryable)


Outcome: TypeAlias = Resolved | Parked | Failed


class HandlerContext(Protocol):
    """What the runtime lends a handler: registered functions, the clock, children."""

    @property
    def functions(self) -> Mapping[str, Callable[..., Any]]:
        """The functions registered for ``call``, by name."""
        ...

    def now(self) -> datetime:
        """The runtime's clock (UTC)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Sleep (injectable, so tests and benchmarks need not wait)."""
        ...

    def random(self) -> float:
        """A random number in ``[0, 1)`` (injectable, for retry jitter)."""
        ...

    def start_child(
        self, workflow: str, input: Any, run_id: str, parent: ParentLink
    ) -> RunState:
        """Create the child run ``run_id`` unless it exists; return its current state.

        The runtime drives a newly created child after the handler returns.
        """
        ...


@runtime_checkable
class Handler(Protocol):
    """Carries out effects of one kind."""

    def handle(self, effect: Effect, run: RunState, ctx: HandlerContext) -> Outcome:
        """Carry out ``effect`` for ``run`` (which waits on ``run.wait.key``)."""
        ...
