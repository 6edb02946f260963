"""Shared fixtures for the runtime tests: a fake clock, stores that outlive a ``Runtime``, checks.

The application owns logging configuration (the library never calls ``structlog.configure``),
so the test session plays the application: it configures structlog once, at WARNING, to keep
the output readable.  Tests that assert on log events lower the level themselves.

``env`` is the harness most runtime tests use.  It stands for *a durable store and a clock*,
and ``env.open(...)`` builds a ``Runtime`` on it; calling ``open`` again builds a fresh
``Runtime`` on the same data, which is how the tests model a process restart:

* ``memory``: one ``MemoryStore`` and one signing key shared by every ``Runtime`` of the test;
* ``jsonl``: a directory; every ``Runtime`` opens it by URL, with the key file the store
  creates there (the embedded default).

``env.open(crash=...)`` wraps the store so that the commit the predicate picks raises
``SimulatedCrash`` (a ``BaseException``, so nothing in the runtime catches it) either before
the commit is written or just after: the two places where a real process can die.
"""

from __future__ import annotations

import builtins
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from wakepoint import RunState, Runtime, Workflow
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.records import Body, Record, parse_body
from wakepoint.stores import MemoryStore, Store


def pytest_configure(config: pytest.Config) -> None:
    """Configure structlog once for the session, as an application would: WARNING and up."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
"""The fake clock's start."""


class SimulatedCrash(BaseException):
    """Stands for the process dying: a ``BaseException`` that no runtime code handles."""


class FakeClock:
    """A clock that only moves when told to; ``Runtime(clock=...)`` calls it."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0, **delta: float) -> datetime:
        """Move forward by ``seconds`` (plus any ``timedelta`` keywords); return the new time."""
        self.now += timedelta(seconds=seconds, **delta)
        return self.now


CrashRule = Callable[[str, RunState], bool]


class CrashingStore:
    """A store proxy that dies (``SimulatedCrash``) at the commit ``rule`` picks.

    ``after=False`` dies before the commit is written (the transition is lost), ``after=True``
    just after (the transition is stored, but nothing that follows it happens).  It dies once;
    later commits go through, as they would in the next process.
    """

    def __init__(
        self, inner: Store, rule: CrashRule | None = None, *, after: bool = False
    ) -> None:
        self.inner = inner
        self.rule = rule
        self.after = after
        self.crashed = False
        self.log_id = inner.log_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def arm(self, rule: CrashRule, *, after: bool = False) -> None:
        """Die at the next commit ``rule`` picks."""
        self.rule, self.after, self.crashed = rule, after, False

    def _maybe_crash(self, run_id: str, state: RunState) -> bool:
        return not self.crashed and self.rule is not None and self.rule(run_id, state)

    def create(self, state: RunState, records: Sequence[Record]) -> None:
        crash = self._maybe_crash(state.run_id, state)
        if crash and not self.after:
            self.crashed = True
            raise SimulatedCrash(f"before create of {state.run_id}")
        self.inner.create(state, records)
        if crash:
            self.crashed = True
            raise SimulatedCrash(f"after create of {state.run_id}")

    def commit(
        self, run_id: str, expected_seq: int, state: RunState, records: Sequence[Record]
    ) -> None:
        crash = self._maybe_crash(run_id, state)
        if crash and not self.after:
            self.crashed = True
            raise SimulatedCrash(f"before commit of {run_id} step {state.step}")
        self.inner.commit(run_id, expected_seq, state, records)
        if crash:
            self.crashed = True
            raise SimulatedCrash(f"after commit of {run_id} step {state.step}")

    def hold(self, run_id: str) -> AbstractContextManager[None]:
        return self.inner.hold(run_id)


class Env:
    """A durable store (memory or JSONL) plus a fake clock; ``open`` builds runtimes on it.

    Also carries the helpers test modules need (under ``--import-mode=importlib`` they cannot
    import this file): ``Crash``, ``check_ledger``, ``kinds``, ``bodies``.
    """

    Crash = SimulatedCrash

    def __init__(self, kind: str, root: Path, clock: FakeClock) -> None:
        self.kind = kind
        self.root = root
        self.clock = clock
        self.runtimes: list[Runtime] = []
        self._memory = MemoryStore() if kind == "memory" else None
        self._signer = Signer.generate() if kind == "memory" else None

    def __repr__(self) -> str:
        return f"Env({self.kind})"

    @property
    def url(self) -> str:
        return "memory:" if self.kind == "memory" else f"jsonl:{self.root}"

    def store(self) -> Store:
        """A store object on this env's data (a fresh one for JSONL, the shared one in memory)."""
        if self._memory is not None:
            return self._memory
        from wakepoint.stores.jsonl import JsonlStore

        return JsonlStore(self.root, durability="none")

    def signer(self) -> Signer:
        """The key this env's runs are signed with."""
        if self._signer is not None:
            return self._signer
        return Signer.load(self.root / "signer.key")

    def open(
        self,
        workflows: Iterable[Workflow] = (),
        functions: Mapping[str, Callable[..., Any]] | None = None,
        *,
        crash: CrashRule | None = None,
        after: bool = False,
        **kwargs: Any,
    ) -> Runtime:
        """A new ``Runtime`` on this env's data: what the next process would build."""
        store: Any = self.store()
        if crash is not None:
            store = CrashingStore(store, crash, after=after)
        kwargs.setdefault("clock", self.clock)
        kwargs.setdefault("sleep", lambda _seconds: None)
        rt = Runtime(store, workflows, functions, signer=self._signer, **kwargs)
        self.runtimes.append(rt)
        return rt

    @staticmethod
    def check_ledger(rt: Runtime, run_id: str) -> builtins.list[Body]:
        return check_ledger(rt, run_id)

    @staticmethod
    def kinds(rt: Runtime, run_id: str) -> builtins.list[str]:
        return kinds(rt, run_id)

    @staticmethod
    def bodies(records: Iterable[Record]) -> builtins.list[Body]:
        return bodies(records)

    def close(self) -> None:
        for rt in self.runtimes:
            try:
                rt.close()
            except Exception:  # a runtime that "crashed" may hold a half-used store
                continue


STORE_KINDS = ("memory", "jsonl")


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at ``T0``."""
    return FakeClock()


@pytest.fixture(params=STORE_KINDS)
def env(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Env]:
    """A memory or JSONL env (every test using it runs on both)."""
    e = Env(request.param, tmp_path / "store", clock)
    yield e
    e.close()


@pytest.fixture
def jsonl_env(tmp_path: Path, clock: FakeClock) -> Iterator[Env]:
    """A JSONL env only (tests that touch files)."""
    e = Env("jsonl", tmp_path / "store", clock)
    yield e
    e.close()


# --- ledger checks ------------------------------------------------------------------------


def bodies(records: Iterable[Record]) -> builtins.list[Body]:
    """The parsed bodies of ``records``."""
    return [parse_body(r.body) for r in records]


def check_ledger(rt: Runtime, run_id: str) -> builtins.list[Body]:
    """Assert the run's ledger is one record per transition (plus ``run.sealed`` closing a
    finished run, and nothing else), contiguous, and verifies.

    Returns the parsed bodies for further checks.
    """
    state = rt.get(run_id)
    records = rt.ledger(run_id)
    parsed = bodies(records)
    assert [b.seq for b in parsed] == list(range(len(parsed))), "seqs must be 0, 1, 2, ..."
    sealed = [i for i, b in enumerate(parsed) if b.kind == "run.sealed"]
    if state.status.finished:
        assert sealed == [len(parsed) - 1], "a finished run ends with one run.sealed"
        assert len(parsed) == state.step + 1, "one record per transition, then the seal"
    else:
        assert sealed == [], "an unfinished run has no seal"
        assert len(parsed) == state.step, "one record per transition"
    assert state.seq == len(parsed) - 1
    assert state.head == records[-1].hash
    assert all(b.run_id == run_id for b in parsed)
    assert rt.verify(run_id) == len(parsed)
    return parsed


def kinds(rt: Runtime, run_id: str) -> builtins.list[str]:
    """The record kinds of the run's ledger, in order."""
    return [b.kind for b in bodies(rt.ledger(run_id))]


@pytest.fixture
def kit() -> SimpleNamespace:
    """This module's helpers, for tests that build their own stores (state machines)."""
    return SimpleNamespace(
        CrashingStore=CrashingStore, SimulatedCrash=SimulatedCrash, FakeClock=FakeClock,
        check_ledger=check_ledger, bodies=bodies, kinds=kinds,
    )


@pytest.fixture
def snapshot() -> Callable[[Runtime, str], tuple[RunState, builtins.list[Record]]]:
    """Take ``(rt.get(id), rt.ledger(id))`` to compare a run before and after a refused input."""

    def take(rt: Runtime, run_id: str) -> tuple[RunState, builtins.list[Record]]:
        return rt.get(run_id), rt.ledger(run_id)

    return take


# --- PostgreSQL ------------------------------------------------------------------------------


def _load_pg() -> Any:
    # tests/ has no __init__.py (importlib import mode), so the helper is loaded by path.
    spec = importlib.util.spec_from_file_location(
        "wakepoint_test_pg", Path(__file__).parent / "pg.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One throw-away PostgreSQL server per test process, from Debian's package.

    With ``CI`` set, a missing server is a failure, never a skip: the tests that claim
    PostgreSQL must run in CI.
    """
    pg = _load_pg()
    why = pg.missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {why}", pytrace=False)
        pytest.skip(why)
    server = pg.PgServer().start()
    try:
        yield server
    finally:
        server.stop()
