"""Ledgers for the verifier tests, written by the real ``Runtime`` on a real JSONL store.

``IndexedStore`` is a ``JsonlStore`` that appends every successful commit's record hashes to
``index.jsonl`` (the store-wide global order of ``ledger.logindex``), as the store will once
that integration lands; ``seal``, ``rotate`` and ``checkpoint`` write the records the runtime
does not write yet, through the same ``commit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from wakepoint import Runtime, Workflow, done, goto, wait_event
from wakepoint.kernel.types import RunState
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.logindex import append_checkpoint, append_leaves
from wakepoint.ledger.records import Record, parse_body
from wakepoint.ledger.rotation import SEALED, rotation_record, seal_record
from wakepoint.ledger.trust import TrustRoot
from wakepoint.stores import Store
from wakepoint.stores.jsonl import JsonlStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


STORE_INDEXES = hasattr(JsonlStore, "repair_index")
"""Whether the JSONL store keeps ``index.jsonl`` itself (it repairs it after a crash)."""


class IndexedStore(JsonlStore):
    """A JSONL store that is sure to keep ``index.jsonl`` (commit order across runs): the
    store writes it itself now; for a store that does not, the line is appended here.

    It hides the store's ``checkpoint`` from the runtime (which writes checkpoints by
    itself, partly on timers): the tests place every checkpoint themselves, so that error
    positions are exact and repeatable."""

    checkpoint = None

    def _ensure_indexed(self, run_id: str, records: Sequence[Record]) -> None:
        if not STORE_INDEXES:
            append_leaves(self.path, run_id, records[0].seq, [r.hash for r in records])

    def create(self, state: RunState, records: Sequence[Record]) -> None:
        super().create(state, records)
        self._ensure_indexed(state.run_id, records)

    def commit(self, run_id: str, expected_seq: int, state: RunState,
               records: Sequence[Record]) -> None:
        super().commit(run_id, expected_seq, state, records)
        if records:
            self._ensure_indexed(run_id, records)


def sealed(store: Store, run_id: str) -> bool:
    """Whether the run's chain ends with ``run.sealed``."""
    return parse_body(store.ledger(run_id)[-1].body).kind == SEALED


def workflow() -> Workflow:
    """start -> step -> wait for event ``go:<run>`` -> done."""
    wf = Workflow("audit")

    @wf.node(start=True)
    def first(run):  # type: ignore[no-untyped-def]
        return goto("second")

    @wf.node
    def second(run):  # type: ignore[no-untyped-def]
        return wait_event(f"go:{run.run_id}", then="last")

    @wf.node
    def last(run):  # type: ignore[no-untyped-def]
        return done({"n": run.input})

    return wf


class Ledger:
    """A store directory plus the keys and runtime that write it."""

    def __init__(self, path: Path, signer: Signer | None = None,
                 log_id: str = "test-log") -> None:
        self.path = path
        self.signer = signer or Signer.from_seed(b"\x01" * 32)
        self.cp_signer = self.signer
        self.store = IndexedStore(path, durability="none", log_id=log_id)
        self.log_id = self.store.log_id
        self.ticks = 0
        self.rt = Runtime(self.store, workflows=[workflow()], signer=self.signer,
                          clock=self.clock)

    def clock(self) -> datetime:
        self.ticks += 1
        return T0 + timedelta(seconds=self.ticks)

    def start(self, run_id: str) -> None:
        self.rt.start("audit", 1, run_id=run_id)

    def finish(self, run_id: str) -> None:
        """Finish the run and seal it (the runtime seals finished runs itself now; for a
        runtime that does not, the seal is committed here)."""
        self.rt.send_event(f"go:{run_id}")
        if not sealed(self.store, run_id):
            self.seal(run_id)

    def seal(self, run_id: str, signer: Signer | None = None) -> None:
        old = self.store.load(run_id)
        state, rec = seal_record(signer or self.rt.signer, self.log_id, old, self.clock())
        self.store.commit(run_id, old.seq, state, [rec])

    def rotate(self, run_id: str, new: Signer, *, cosign: bool = True,
               old_key: Signer | None = None) -> None:
        """Hand ``run_id`` (and the runtime) to ``new`` with a ``key.rotated`` record signed
        by ``old_key`` (default: the runtime's current key) and ``new``; ``cosign=False``
        forges it (the old key's signature only)."""
        old = self.store.load(run_id)
        state, rec = rotation_record(old_key or self.rt.signer, new, self.log_id, old,
                                     self.clock())
        if not cosign:
            from msgspec.structs import replace

            rec = replace(rec, cosigs=())
        self.store.commit(run_id, old.seq, state, [rec])
        self.rt.signer = new

    def checkpoint(self) -> str:
        return append_checkpoint(self.path, self.log_id, self.cp_signer)

    def trust(self, *signers: Signer) -> TrustRoot:
        return TrustRoot.from_signers(signers or (self.signer,), log_id=self.log_id)

    def close(self) -> None:
        self.rt.close()


def interleaved(path: Path, runs: int = 3, *, checkpoint: bool = True) -> Ledger:
    """``runs`` runs started, then finished and sealed in reverse order, then a checkpoint."""
    led = Ledger(path)
    names = [f"run-{i}" for i in range(runs)]
    for name in names:
        led.start(name)
    for name in reversed(names):
        led.finish(name)
    if checkpoint:
        led.checkpoint()
    return led
