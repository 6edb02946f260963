"""Every error the kernel (and the layers above it) raise on purpose.

Each error names what was wrong: the run, the key, the node, the value.  Callers catch the
specific class; ``WakepointError`` catches them all.  An error raised by a transition function
means *nothing changed*: the kernel builds the new state only after every check has passed.
"""

from __future__ import annotations


class WakepointError(Exception):
    """Base class of every error wakepoint raises on purpose."""


class WorkflowDefinitionError(WakepointError):
    """A workflow is ill-formed: duplicate node, unknown target, no start node."""


class IllegalTransition(WakepointError):
    """The run's status does not accept this input (see ``kernel.table``)."""

    def __init__(self, run_id: str, status: str, input: str, why: str) -> None:
        self.run_id = run_id
        self.status = status
        self.input = input
        super().__init__(f"run {run_id!r}: cannot {input} a run that is {status}: {why}")


class RunFinished(IllegalTransition):
    """The run is COMPLETED, FAILED or CANCELLED; it accepts no more input."""


class NotWaiting(IllegalTransition):
    """The run is not waiting, so it cannot be resumed, rejected or timed out."""


class NotRunning(IllegalTransition):
    """The run is waiting; it can only move on through resume, timeout or cancel."""


class WrongWaitKey(WakepointError):
    """A resume named a wait key that the run is not waiting on."""

    def __init__(self, run_id: str, expected: str, got: str) -> None:
        self.run_id = run_id
        self.expected = expected
        self.got = got
        super().__init__(f"run {run_id!r} waits on key {expected!r}, not {got!r}")


class InvalidAnswer(WakepointError):
    """An answer to ``ask_user`` is not one of the offered choices."""

    def __init__(self, run_id: str, answer: object, choices: tuple[str, ...]) -> None:
        self.run_id = run_id
        self.answer = answer
        self.choices = choices
        super().__init__(
            f"run {run_id!r}: answer {answer!r} is not one of the choices {list(choices)!r}"
        )


class NotDue(WakepointError):
    """A timeout was applied before the wait's deadline (or to a wait without one)."""


class UnencodableValue(WakepointError):
    """A value that must be persisted cannot be encoded by msgspec."""

    def __init__(self, where: str, detail: str) -> None:
        self.where = where
        self.detail = detail
        super().__init__(f"{where} cannot be persisted: {detail}")


class VersionMismatch(WakepointError):
    """A run was started under other workflow logic and no migration is registered."""

    def __init__(self, run_id: str, workflow: str, stored: str, current: str) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.stored = stored
        self.current = current
        super().__init__(
            f"run {run_id!r} of workflow {workflow!r} was started under logic id {stored}, "
            f"the registered workflow has logic id {current}; register a migration with "
            f"@workflow.migration({stored!r}) to resume it"
        )


class RunNotFound(WakepointError):
    """No run with this id exists in the store."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"no run with id {run_id!r}")


class RunExists(WakepointError):
    """A run with this id already exists (ids are unique per store)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"a run with id {run_id!r} already exists")


class ConflictError(WakepointError):
    """Another writer committed to the run first; reload it and try again."""

    def __init__(self, run_id: str, expected_seq: int, actual_seq: int) -> None:
        self.run_id = run_id
        self.expected_seq = expected_seq
        self.actual_seq = actual_seq
        super().__init__(
            f"run {run_id!r}: expected ledger seq {expected_seq}, store has {actual_seq}"
        )


class UnknownWorkflow(WakepointError):
    """A workflow id is not registered with the runtime."""

    def __init__(self, workflow: str) -> None:
        self.workflow = workflow
        super().__init__(f"workflow {workflow!r} is not registered with this runtime")


class UnknownEffect(WakepointError):
    """No handler is registered for an effect kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(f"no handler is registered for effect kind {kind!r}")


class UnknownFunction(WakepointError):
    """``call`` named a function that is not registered with the runtime."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"call names function {name!r}, which is not registered")


class CorruptStore(WakepointError):
    """Stored data is damaged; the message names the file (or table) and line (or row)."""

    def __init__(self, where: str, line: int | None, detail: str) -> None:
        self.where = where
        self.line = line
        self.detail = detail
        at = f"{where}:{line}" if line is not None else where
        super().__init__(f"{at}: {detail}")


class ChainError(WakepointError):
    """A ledger chain does not verify; ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, run_id: str, seq: int, detail: str) -> None:
        self.code = code
        self.run_id = run_id
        self.seq = seq
        self.detail = detail
        super().__init__(f"run {run_id!r} seq {seq}: {code}: {detail}")
