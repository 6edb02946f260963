"""The store protocol every backend implements, and the checks they share.

A store keeps, per run, the current ``RunState`` and the run's signed ledger records, and
changes both in one atomic ``commit``.  Contract (the conformance suite in
``stores.conformance`` checks it against every store):

* ``create(state, records)``: a new run; ``RunExists`` if the id is taken.
* ``commit(run_id, expected_seq, state, records)``: append ``records`` (seqs
  ``expected_seq + 1 ...``) and replace the state, all or nothing.  ``ConflictError`` when the
  stored run's last seq is not ``expected_seq`` (another writer won), ``RunNotFound`` when the
  run does not exist.  Once ``commit`` returns, the commit is visible to every reader and is
  as durable as the store's durability mode promises.
* ``load(run_id)``: the last committed state; ``RunNotFound``.
* ``list(...)``: states filtered by status, workflow, wait kind, due before, parent.
* ``find_waiting(key)``: WAITING runs whose wait key is ``key``.
* ``ledger(run_id)``: the run's records in seq order.
* ``claim(now, worker, lease, limit)``: atomically lease up to ``limit`` runs that need a worker
  now - RUNNING runs, and WAITING runs whose deadline has passed - that no other worker holds an
  unexpired lease on; ``release`` gives a lease back.
* ``renew(run_id, worker, lease, now) -> bool``: extend ``worker``'s lease to ``now + lease``
  if it still holds it (an expired lease nobody else claimed counts as held); False, and
  nothing changed, otherwise.  A worker renews the runs it is driving (a node that runs long),
  so that no other worker claims them while it lives.
* ``take(run_id, worker, lease, now) -> bool``: lease one given run to ``worker`` until
  ``now + lease`` unless another worker holds an unexpired lease on it, whatever the run's
  state (``claim`` hands out only runs that need a worker).  The worker's orphan sweep takes
  a run WAITING on an effect before dispatching the effect again, so that a live dispatcher
  (which holds and renews that lease) and a second sweeper are kept out.
* ``hold(run_id)``: a context manager under which this process drives one run; stores that lock
  per run (JSONL) take the lock once for the whole drive instead of once per commit.

Optional (not part of ``Store``; callers check with ``getattr``):


* ``next_deadline(after) -> datetime | None``: the earliest deadline of a WAITING run later
  than ``after``; a worker arms its alarm with it (without it, the worker lists the waiting
  runs due before its horizon and reads their deadlines).

For stores that keep the ledger's global order and sign checkpoints of it
(``SupportsCheckpoints``):

* ``checkpoint(signer) -> str``: sign a C2SP checkpoint over every record committed so far in
  the store's global order, store it, and return the note; a size already checkpointed
  returns the stored note.  Incremental: a store keeps a Merkle frontier.
* ``checkpoints() -> list[str]``: the stored notes, smallest tree size first.

Durability modes: ``sync`` (every commit is on disk before it returns), ``batch`` (group commit:
flushed to disk every N commits or T milliseconds; the default), ``none`` (tests).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta
from typing import Literal, Protocol, TypeAlias, runtime_checkable

from ..kernel.errors import WakepointError
from ..kernel.types import RunState, Status
from ..ledger.keys import Signer
from ..ledger.records import Record

Durability: TypeAlias = Literal["sync", "batch", "none"]
DURABILITIES: tuple[Durability, ...] = ("sync", "batch", "none")


class StoreError(WakepointError):
    """A store cannot be opened or used as asked (bad URL, bad option, misuse)."""


@runtime_checkable
class Store(Protocol):
    """What the runtime needs of a store.  See the module docstring for the contract."""

    log_id: str
    """Identifies this ledger (bound into every record's genesis)."""

    def create(self, state: RunState, records: Sequence[Record]) -> None:
        """Store a new run with its first records."""
        ...

    def commit(
        self, run_id: str, expected_seq: int, state: RunState, records: Sequence[Record]
    ) -> None:
        """Atomically append records and replace the state, if the run is at ``expected_seq``."""
        ...

    def load(self, run_id: str) -> RunState:
        """The run's last committed state."""
        ...

    def list(
        self,
        *,
        status: Status | None = None,
        workflow: str | None = None,
        wait_kind: str | None = None,
        due_before: datetime | None = None,
        parent: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[RunState]:
        """Runs matching every given filter, oldest first."""
        ...

    def find_waiting(self, key: str) -> builtins.list[RunState]:
        """WAITING runs whose wait key is ``key``."""
        ...

    def ledger(self, run_id: str) -> builtins.list[Record]:
        """The run's records in seq order."""
        ...

    def claim(
        self, now: datetime, worker: str, lease: timedelta, limit: int
    ) -> builtins.list[RunState]:
        """Lease up to ``limit`` runs that need a worker now."""
        ...

    def release(self, run_id: str, worker: str) -> None:
        """Give back ``worker``'s lease on ``run_id`` (no error if it holds none)."""
        ...

    def renew(self, run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        """Extend ``worker``'s lease on ``run_id`` to ``now + lease``; False if not held."""
        ...

    def take(self, run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        """Lease ``run_id`` to ``worker`` unless another worker holds an unexpired lease."""
        ...

    def hold(self, run_id: str) -> AbstractContextManager[None]:
        """Keep ``run_id`` ready for a series of commits by this process."""
        ...

    def flush(self) -> None:
        """Make every returned commit durable now, whatever the durability mode."""
        ...

    def close(self) -> None:
        """Flush and release resources; the store is unusable afterwards."""
        ...


@runtime_checkable
class SupportsCheckpoints(Protocol):
    """The optional checkpoint methods of a store (see the module docstring)."""

    def checkpoint(self, signer: Signer) -> str:
        """Sign, store and return a checkpoint of every record committed so far."""
        ...

    def checkpoints(self) -> builtins.list[str]:
        """The stored checkpoint notes, smallest tree size first."""
        ...


def check_append(
    run_id: str, expected_seq: int, state: RunState, records: Sequence[Record]
) -> None:
    """Reject a commit whose records or state do not continue the chain at ``expected_seq``.

    This guards the stores against a caller bug; a conflicting concurrent writer is detected
    separately, by comparing ``expected_seq`` with the stored run.
    """
    if len(records) == 1:  # the common commit (one node): checked without a loop
        rec = records[0]
        if (rec.run_id == run_id == state.run_id
                and rec.seq == expected_seq + 1 == state.seq):
            return
    if state.run_id != run_id:
        raise StoreError(f"commit for run {run_id!r} carries the state of {state.run_id!r}")
    for offset, rec in enumerate(records, start=1):
        if rec.run_id != run_id or rec.seq != expected_seq + offset:
            raise StoreError(
                f"commit for run {run_id!r} at seq {expected_seq}: record {offset} is "
                f"{rec.run_id!r} seq {rec.seq}, expected seq {expected_seq + offset}"
            )
    if state.seq != expected_seq + len(records):
        raise StoreError(
            f"commit for run {run_id!r}: state.seq {state.seq} does not match its records "
            f"(last seq {expected_seq + len(records)})"
        )


def matches(
    state: RunState,
    *,
    status: Status | None,
    workflow: str | None,
    wait_kind: str | None,
    due_before: datetime | None,
    parent: str | None,
) -> bool:
    """Whether ``state`` passes the ``list`` filters."""
    if status is not None and state.status != status:
        return False
    if workflow is not None and state.workflow != workflow:
        return False
    wait = state.wait
    if wait_kind is not None and (wait is None or wait.kind != wait_kind):
        return False
    if due_before is not None and (
        wait is None or wait.deadline is None or wait.deadline > due_before
    ):
        return False
    return parent is None or (state.parent is not None and state.parent.run_id == parent)


def needs_worker(state: RunState, now: datetime) -> bool:
    """Whether a worker should pick ``state`` up at ``now`` (see ``Store.claim``)."""
    if state.status is Status.RUNNING:
        return True
    wait = state.wait
    return (
        state.status is Status.WAITING
        and wait is not None
        and wait.deadline is not None
        and wait.deadline <= now
    )


_NO_HOLD: AbstractContextManager[None] = nullcontext()


def no_hold() -> AbstractContextManager[None]:
    """``hold`` for stores that need no per-run preparation: one shared no-op context
    (``nullcontext`` is reusable and re-entrant; a generator-based one cost a few
    microseconds per run drive)."""
    return _NO_HOLD
