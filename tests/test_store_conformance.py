"""Every store against the conformance suite in ``wakepoint.stores.conformance``.

Each store runs the state machine (its restart and crash rules reopen the same location), and
the plain query, claim and misuse checks.  The memory store cannot survive a restart, so its
machine keeps the same object across restarts and crashes and the multi-process races do not
apply to it; the JSONL store runs them with ``durability="none"`` and ``"batch"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from wakepoint.stores import MemoryStore, Store, open_store
from wakepoint.stores.base import Durability
from wakepoint.stores.conformance import QUERY_CHECKS, StoreMachine, race_claims, race_commits
from wakepoint.stores.jsonl import JsonlStore

MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    database=None,  # keep the repository free of .hypothesis/; failures print a repro blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


class MemoryMachine(StoreMachine):
    """The memory store: restarts and crashes keep the same object (nothing else survives)."""

    durable = False

    def make_store(self) -> Store:
        return MemoryStore()


class JsonlNoneMachine(StoreMachine):
    """The JSONL store without fsync: a crash must still keep every written commit."""

    def make_store(self) -> Store:
        return JsonlStore(self.tmpdir / "store", durability="none")


class JsonlBatchMachine(StoreMachine):
    """The JSONL store with group commit (its default)."""

    def make_store(self) -> Store:
        return JsonlStore(self.tmpdir / "store", durability="batch")


TestMemoryStoreMachine = MemoryMachine.TestCase
TestMemoryStoreMachine.settings = MACHINE_SETTINGS
TestMemoryStoreMachine.__doc__ = "The memory store agrees with the model after every step."

TestJsonlNoneMachine = JsonlNoneMachine.TestCase
TestJsonlNoneMachine.settings = MACHINE_SETTINGS
TestJsonlNoneMachine.__doc__ = (
    "The JSONL store (durability none) agrees with the model after every step, restart and "
    "crash, and with a second store object on the same directory."
)

TestJsonlBatchMachine = JsonlBatchMachine.TestCase
TestJsonlBatchMachine.settings = MACHINE_SETTINGS
TestJsonlBatchMachine.__doc__ = (
    "The JSONL store (durability batch) agrees with the model after every step, restart and "
    "crash, and with a second store object on the same directory."
)

STORES: dict[str, Callable[[Path], Store]] = {
    "memory": lambda tmp: MemoryStore(),
    "jsonl-none": lambda tmp: JsonlStore(tmp / "store", durability="none"),
    "jsonl-batch": lambda tmp: JsonlStore(tmp / "store", durability="batch"),
}


@pytest.mark.parametrize("check", QUERY_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", sorted(STORES))
def test_queries(kind: str, check: Callable[[Store], None], tmp_path: Path) -> None:
    """Each store passes each plain query, claim and misuse check on a fresh store."""
    store = STORES[kind](tmp_path)
    try:
        check(store)
    finally:
        store.close()


@pytest.mark.parametrize("durability", ["none", "batch"])
def test_jsonl_commit_race(durability: Durability, tmp_path: Path) -> None:
    """Four processes committing the same seq of one JSONL run: one wins per round, and the
    ledger a fresh process reads afterwards is contiguous and verifies."""
    factory = functools.partial(open_store, f"jsonl:{tmp_path / 'store'}", durability=durability)
    report = race_commits(factory, processes=4, rounds=6)
    assert report.final_seq == 6


def test_jsonl_claim_race(tmp_path: Path) -> None:
    """Four processes claiming from one JSONL directory at once never lease a run twice."""
    factory = functools.partial(open_store, f"jsonl:{tmp_path / 'store'}", durability="none")
    claimed = race_claims(factory, processes=4, runs=40)
    assert sum(map(len, claimed.values())) == 40
