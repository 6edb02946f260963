"""wakepoint: a durable workflow kernel for Python.

Runs pause for days (waiting for a person, an event, a time or a child run), survive process
restarts, and leave a hash-chained, Ed25519-signed ledger that an auditor can verify offline.

    from wakepoint import Workflow, Runtime, ask_user, done

This module is the public API: everything importable from it is supported; anything else is
internal and may change.
"""

from .effects.base import Failed, Handler, HandlerContext, Outcome, Parked, Resolved
from .kernel.errors import (
    ConflictError,
    CorruptStore,
    IllegalTransition,
    InvalidAnswer,
    NotRunning,
    NotWaiting,
    RunExists,
    RunFinished,
    RunNotFound,
    UnencodableValue,
    UnknownEffect,
    UnknownWorkflow,
    VersionMismatch,
    WakepointError,
    WorkflowDefinitionError,
    WrongWaitKey,
)
from .kernel.steps import (
    ask_user,
    call,
    done,
    effect,
    fail,
    goto,
    subworkflow,
    wait_event,
    wait_until,
)
from .kernel.types import ErrorInfo, Retry, RunState, Status, Wait
from .kernel.workflow import RunView, Workflow
from .runtime import Runtime

__version__ = "0.1.0"

__all__ = [
    "ConflictError",
    "CorruptStore",
    "ErrorInfo",
    "Failed",
    "Handler",
    "HandlerContext",
    "IllegalTransition",
    "InvalidAnswer",
    "NotRunning",
    "NotWaiting",
    "Outcome",
    "Parked",
    "Resolved",
    "Retry",
    "RunExists",
    "RunFinished",
    "RunNotFound",
    "RunState",
    "RunView",
    "Runtime",
    "Status",
    "UnencodableValue",
    "UnknownEffect",
    "UnknownWorkflow",
    "VersionMismatch",
    "Wait",
    "WakepointError",
    "Workflow",
    "WorkflowDefinitionError",
    "WrongWaitKey",
    "__version__",
    "ask_user",
    "call",
    "done",
    "effect",
    "fail",
    "goto",
    "subworkflow",
    "wait_event",
    "wait_until",
]
