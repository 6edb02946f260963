"""The handler registry: one handler per effect kind, built-ins first, users on top.

Users add their own kinds (a ``Custom`` effect names its kind) and may override any built-in
by registering a handler under the same name; the runtime looks handlers up here only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from ..kernel.errors import UnknownEffect
from .base import Handler
from .builtins import (
    AskUserHandler,
    CallHandler,
    SubworkflowHandler,
    WaitEventHandler,
    WaitUntilHandler,
)

BUILTIN_KINDS = ("wait_event", "wait_until", "ask_user", "subworkflow", "call")


def default_handlers() -> dict[str, Handler]:
    """Fresh instances of the built-in handlers, by kind."""
    return {
        "wait_event": WaitEventHandler(),
        "wait_until": WaitUntilHandler(),
        "ask_user": AskUserHandler(),
        "subworkflow": SubworkflowHandler(),
        "call": CallHandler(),
    }


class Registry(Mapping[str, Handler]):
    """Effect kind -> handler.  ``Registry(overrides)`` starts from the built-ins."""

    def __init__(self, overrides: Mapping[str, Handler] | None = None) -> None:
        self._handlers = default_handlers()
        for kind, handler in (overrides or {}).items():
            self.register(kind, handler)

    def register(self, kind: str, handler: Handler) -> None:
        """Add a kind, or replace the handler of an existing one."""
        if not callable(getattr(handler, "handle", None)):
            raise TypeError(f"handler for {kind!r} has no handle(effect, run, ctx) method")
        self._handlers[kind] = handler

    def __getitem__(self, kind: str) -> Handler:
        try:
            return self._handlers[kind]
        except KeyError:
            raise UnknownEffect(kind) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)
