"""Effect handlers: the protocol, the registry and the built-in handlers."""

from .base import Failed, Handler, HandlerContext, Outcome, Parked, Resolved
from .builtins import (
    AskUserHandler,
    CallHandler,
    SubworkflowHandler,
    WaitEventHandler,
    WaitUntilHandler,
)
from .registry import BUILTIN_KINDS, Registry, default_handlers

__all__ = [
    "BUILTIN_KINDS",
    "AskUserHandler",
    "CallHandler",
    "Failed",
    "Handler",
    "HandlerContext",
    "Outcome",
    "Parked",
    "Registry",
    "Resolved",
    "SubworkflowHandler",
    "WaitEventHandler",
    "WaitUntilHandler",
    "default_handlers",
]
