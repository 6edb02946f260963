"""The in-memory store: for tests, examples and pure speed.  Nothing survives the process.

It keeps the same contract as the durable stores (atomic commits, optimistic seq check,
leases, a global record order with signed checkpoints), so that code tested against it
behaves the same on JSONL or SQL.  One lock guards everything: the store is safe to share
between threads of one process.
"""

from __future__ import annotations

import builtins
import threading
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

from ..kernel.errors import ConflictError, RunExists, RunNotFound
from ..kernel.types import RunState, Status
from ..ledger.keys import Signer
from ..ledger.logindex import sign_frontier
from ..ledger.merkle import Frontier
from ..ledger.records import Record
from .base import check_append, matches, needs_worker, no_hold


class MemoryStore:
    """A store in a dict.  ``log_id`` is random unless given."""

    def __init__(self, log_id: str | None = None) -> None:
        self.log_id = log_id or f"memory-{uuid.uuid4().hex}"
        self._lock = threading.Lock()
        self._states: dict[str, RunState] = {}
        self._records: dict[str, list[Record]] = {}
        self._waiting: dict[str, set[str]] = {}
        self._leases: dict[str, tuple[str, datetime]] = {}
        self._order: list[str] = []  # record hashes in commit order: the global order
        self._frontier = Frontier()
        self._checkpoints: list[tuple[int, str]] = []

    def __repr__(self) -> str:
        return f"MemoryStore(runs={len(self._states)})"

    def _index(self, old: RunState | None, new: RunState) -> None:
        if old is not None and old.wait is not None:
            self._waiting.get(old.wait.key, set()).discard(old.run_id)
        if new.status is Status.WAITING and new.wait is not None:
            self._waiting.setdefault(new.wait.key, set()).add(new.run_id)

    def create(self, state: RunState, records: Sequence[Record]) -> None:
        """Store a new run; ``RunExists`` if the id is taken."""
        check_append(state.run_id, -1, state, records)
        with self._lock:
            if state.run_id in self._states:
                raise RunExists(state.run_id)
            self._states[state.run_id] = state
            self._records[state.run_id] = list(records)
            self._order.extend([r.hash for r in records])
            self._index(None, state)

    def commit(
        self, run_id: str, expected_seq: int, state: RunState, records: Sequence[Record]
    ) -> None:
        """Append records and replace the state if the run is at ``expected_seq``."""
        check_append(run_id, expected_seq, state, records)
        with self._lock:
            old = self._states.get(run_id)
            if old is None:
                raise RunNotFound(run_id)
            if old.seq != expected_seq:
                raise ConflictError(run_id, expected_seq, old.seq)
            self._states[run_id] = state
            self._records[run_id].extend(records)
            self._order.extend([r.hash for r in records])
            if old.wait is not None or state.wait is not None:  # only waits are indexed
                self._index(old, state)

    def load(self, run_id: str) -> RunState:
        """The run's last committed state."""
        try:
            return self._states[run_id]
        except KeyError:
            raise RunNotFound(run_id) from None

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
        with self._lock:
            states = list(self._states.values())
        found = [
            s for s in states if matches(s, status=status, workflow=workflow, wait_kind=wait_kind,
                          due_before=due_before, parent=parent)
        ]
        found.sort(key=lambda s: (s.created_at, s.run_id))
        return found if limit is None else found[:max(limit, 0)]  # as SQL's LIMIT

    def find_waiting(self, key: str) -> builtins.list[RunState]:
        """WAITING runs whose wait key is ``key``."""
        with self._lock:
            return [self._states[r] for r in sorted(self._waiting.get(key, ()))]

    def ledger(self, run_id: str) -> builtins.list[Record]:
        """The run's records in seq order."""
        with self._lock:
            try:
                return list(self._records[run_id])
            except KeyError:
                raise RunNotFound(run_id) from None

    def claim(
        self, now: datetime, worker: str, lease: timedelta, limit: int
    ) -> builtins.list[RunState]:
        """Lease up to ``limit`` runs that need a worker now."""
        claimed: builtins.list[RunState] = []
        with self._lock:
            for run_id, state in self._states.items():
                if len(claimed) >= limit:
                    break
                held = self._leases.get(run_id)
                if held is not None and held[0] != worker and held[1] > now:
                    continue
                if needs_worker(state, now):
                    self._leases[run_id] = (worker, now + lease)
                    claimed.append(state)
        return claimed

    def release(self, run_id: str, worker: str) -> None:
        """Give back ``worker``'s lease on ``run_id``."""
        with self._lock:
            held = self._leases.get(run_id)
            if held is not None and held[0] == worker:
                del self._leases[run_id]

    def renew(self, run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        """Extend ``worker``'s lease on ``run_id`` to ``now + lease``; False (nothing changed)
        unless ``worker`` holds it (an expired lease nobody took over still counts)."""
        with self._lock:
            held = self._leases.get(run_id)
            if held is None or held[0] != worker:
                return False
            self._leases[run_id] = (worker, now + lease)
            return True

    def take(self, run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        """Lease ``run_id`` to ``worker`` until ``now + lease`` unless another worker holds an
        unexpired lease on it, whatever the run's state; whether it did."""
        with self._lock:
            if run_id not in self._states:
                return False
            held = self._leases.get(run_id)
            if held is not None and held[0] != worker and held[1] > now:
                return False
            self._leases[run_id] = (worker, now + lease)
            return True

    def checkpoint(self, signer: Signer) -> str:
        """Sign and keep a checkpoint of every record committed so far; return the note
        (the last one again when nothing was committed since)."""
        with self._lock:
            frontier = self._frontier
            frontier.extend([bytes.fromhex(h) for h in self._order[frontier.size:]])
            if self._checkpoints and self._checkpoints[-1][0] == frontier.size:
                return self._checkpoints[-1][1]
            note = sign_frontier(self.log_id, frontier, signer)
            self._checkpoints.append((frontier.size, note))
            return note

    def checkpoints(self) -> builtins.list[str]:
        """The checkpoint notes kept so far, oldest first."""
        with self._lock:
            return [note for _, note in self._checkpoints]

    def hold(self, run_id: str) -> AbstractContextManager[None]:
        """Nothing to prepare in memory."""
        return no_hold()

    def flush(self) -> None:
        """Nothing to flush in memory."""

    def close(self) -> None:
        """Nothing to release in memory."""
