"""``Runtime``: the only place where kernel, store, handlers, signer and clock meet.

Commit protocol.  Every kernel transition is signed into exactly one ledger record, and
every ``store.commit`` is atomic: the new state and its records land together or not at all.
An input (start, resume, a timeout, an effect's outcome) is committed *together with* the node
it lets run, so a caller's call costs one write; every further node gets a commit of its own.
An effect is handed to its handler only *after* the commit that records the request.
Consequences:

* A crash at any point leaves the run at its last commit.  ``recover()`` continues RUNNING
  runs, dispatches again the effects that were requested but never resolved, resumes parents
  whose child finished, and fires due timers and deadlines.
* Nodes and effect handlers may run more than once (at-least-once); a result, once committed,
  is never recomputed, and a node whose commit returned never runs again.
* A writer that loses a race gets ``ConflictError`` from the store; the runtime then stops
  driving that run (the winner drives it) or, for an explicit ``resume``, reloads and retries.

Driving.  ``start``, ``resume``, ``respond``, ``send_event`` and ``cancel`` return only when
every run they touched (the run, children it started, parents it woke) has blocked or
finished.  Work is a queue, not recursion, so deep parent/child chains cannot overflow.

Defaults (what a user of the embedded mode gets with ``Runtime()``): a JSONL store and an
Ed25519 key file under ``./.wakepoint/`` (created on first use), ``batch`` durability.

Logging goes through structlog with ``run_id``, ``workflow``, ``node`` and ``step``; the runtime
never configures structlog (the application does).  Per-transition events are at debug level.

One ``Runtime`` may be shared by threads, and holds no runtime-wide lock: a thread waiting on a
slow ``call`` never holds up another run.  Two threads that touch one run are resolved as two
processes are, by the store's per-run hold (JSONL, for a series of commits; while a handler
runs, the other threads of the process may write the run, other processes still wait) or its
seq check: an input that lost the race is re-checked on the new state (or refused), and a drive
that finds the run moved on (a ``cancel`` during a ``call``, say) leaves it to the winner,
dropping the late outcome uncommitted.  (Temporal behaves alike: a workflow cancelled while an
activity runs ignores that activity's result.)  Recovery claims a run before it acts on it,
so it never dispatches a request that a thread of this runtime is dispatching.
"""

from __future__ import annotations

import builtins
import inspect
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeAlias

import structlog

from .effects.base import Failed, Handler, Parked, Resolved
from .effects.registry import Registry
from .kernel import transitions as kernel
from .kernel.codec import value_digest
from .kernel.errors import (
    ConflictError,
    IllegalTransition,
    NotWaiting,
    RunExists,
    RunFinished,
    RunNotFound,
    UnencodableValue,
    UnknownWorkflow,
    WakepointError,
    WrongWaitKey,
)
from .kernel.types import (
    Effect,
    ErrorInfo,
    ParentLink,
    RunState,
    Status,
    Transition,
    effect_kind,
)
from .kernel.workflow import Workflow
from .ledger.keys import Signer
from .ledger.records import Record, parse_body, sign_entries, verify_chain
from .ledger.rotation import rotation_record, seal_record
from .stores import MemoryStore, open_store
from .stores.base import Durability, Store, StoreError

DEFAULT_HOME = ".wakepoint"
_RETRIES = 3
# A cancel retries more: without a runtime-wide lock, a thread driving the run through fast
# nodes may commit between each of its reads and commits.
_CANCEL_TRIES = 64
"""How often an explicit input (resume, cancel) is re-applied after losing a race."""

_Work: TypeAlias = tuple[RunState | None, Transition | None]
"""A queued drive: the run's last committed state (None: not created) and a pending input."""
_KEY_FILE = "signer.key"
_CHECKPOINT_MIN_INTERVAL = 0.5
"""Seconds: a run's end makes a checkpoint due only this long after the previous one, so a
stream of short runs costs a checkpoint per interval, not one per run."""
_KEY_CACHE = 100_000
"""Runs whose last signing key the runtime remembers (only after a key rotation)."""


def utc_now() -> datetime:
    """The default clock: the current time in UTC."""
    return datetime.now(UTC)


class Runtime:
    """Runs workflows durably on a store, signing every transition into the run's ledger.

    ``store``: a ``Store`` or a store URL (``memory:``, ``jsonl:PATH``, ``sqlite:///PATH``,
    ``postgresql+psycopg://...``); None opens the embedded default, ``jsonl:./.wakepoint``
    (``home``).  ``durability`` applies to stores opened from a URL.  ``signer``: a ``Signer``
    or a key file path; None loads or creates ``signer.key`` in a JSONL store's directory, or in
    ``home`` for other durable stores, and uses a fresh key for the memory store.
    ``functions`` maps ``call`` names to callables; ``handlers`` adds effect kinds or
    overrides built-ins.  ``clock``, ``sleep`` and ``rand`` are injectable for tests.
    ``on_due`` is told every new wait deadline (an alarm clock re-arms on it).
    ``checkpoint_records`` / ``checkpoint_seconds``: how often a signed checkpoint of the
    store's global record order is written (stores with ``checkpoint``); a run's end and
    ``close()`` write one too.  ``checkpoints=False`` writes none (another process, or the
    operator with ``wakepoint ledger checkpoint``, does).
    """

    def __init__(
        self,
        store: Store | str | None = None,
        workflows: Iterable[Workflow] = (),
        functions: Mapping[str, Callable[..., Any]] | None = None,
        handlers: Mapping[str, Handler] | None = None,
        signer: Signer | str | os.PathLike[str] | None = None,
        clock: Callable[[], datetime] | None = None,
        *,
        home: str | os.PathLike[str] = DEFAULT_HOME,
        durability: Durability = "batch",
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        on_due: Callable[[datetime], None] | None = None,
        checkpoint_records: int = 10_000,
        checkpoint_seconds: float = 5.0,
        checkpoints: bool = True,
    ) -> None:
        if store is None:
            store = f"jsonl:{home}"
        if isinstance(store, str):
            options: dict[str, Any] = {}
            if not store.startswith("memory:"):
                options["durability"] = durability
            store = open_store(store, **options)
        self.store: Store = store
        if signer is None:
            signer = self._default_signer(store, Path(home))
        elif not isinstance(signer, Signer):
            signer = Signer.load_or_create(signer)
        self.signer: Signer = signer
        self.clock: Callable[[], datetime] = clock or utc_now
        self.handlers = Registry(handlers)
        self._functions: dict[str, Callable[..., Any]] = dict(functions or {})
        self._workflows: dict[str, Workflow] = {}
        self._sleep = sleep
        self._rand = rand
        # Guards only the checkpoint counter, which commits of several threads update.
        self._cp_count_lock = threading.Lock()
        # Runs a thread of this runtime is driving, or dispatching an effect of, right now
        # (run id -> how many): recovery leaves them to that thread - dispatching a running
        # ``call`` again would run it twice.
        self._active: dict[str, int] = {}
        self._active_lock = threading.Lock()
        self._log = structlog.get_logger("wakepoint")
        self.on_due: Callable[[datetime], None] | None = on_due
        """Called with the deadline of every committed wait that has one (after the commit),
        so that an alarm clock can re-arm when this process creates an earlier timer.  It runs
        on the committing thread and must be quick and never raise."""
        # Checkpoints (stores that keep them): every ``checkpoint_records`` records this
        # runtime commits, every ``checkpoint_seconds`` while it commits, at the end of a run
        # (at most one per _CHECKPOINT_MIN_INTERVAL), and at close().
        self._checkpoint_fn: Callable[[Signer], str] | None = (
            getattr(store, "checkpoint", None) if checkpoints else None)
        self._cp_records = checkpoint_records
        self._cp_seconds = checkpoint_seconds
        # As if one was written just long enough ago that the first run's end writes one.
        self._cp_last = time.monotonic() - _CHECKPOINT_MIN_INTERVAL
        self._cp_pending = 0  # records committed since the last checkpoint
        self._cp_lock = threading.Lock()
        self._last_key: dict[str, tuple[int, str]] = {}  # run id -> (seq, key) after a rotation
        for wf in workflows:
            self.register(wf)

    @staticmethod
    def _default_signer(store: Store, home: Path) -> Signer:
        # A durable store needs a durable key, or its chains stop verifying after a restart:
        # a JSONL store keeps the key in its directory, any other durable store in ``home``.
        # The memory store lives as long as the process, and so may its key.
        if isinstance(store, MemoryStore):
            return Signer.generate()
        root = getattr(store, "path", None)
        return Signer.load_or_create(Path(root if root is not None else home) / _KEY_FILE)

    def __repr__(self) -> str:
        return f"Runtime(store={self.store!r}, workflows={sorted(self._workflows)!r})"

    # --- registration ------------------------------------------------------------------------

    def register(self, workflow: Workflow) -> None:
        """Register (and validate) a workflow; its nodes' literal targets are checked here."""
        sources: dict[str, str] = {}
        for name, fn in workflow.nodes.items():
            try:
                sources[name] = inspect.getsource(fn)
            except (OSError, TypeError):  # no source (REPL, C function): checked at run time
                continue
        workflow.validate(sources)
        self._workflows[workflow.id] = workflow

    def register_function(self, name: str, fn: Callable[..., Any]) -> None:
        """Make ``fn`` callable by ``call(name, ...)``."""
        self._functions[name] = fn

    @property
    def functions(self) -> Mapping[str, Callable[..., Any]]:
        """The functions ``call`` can name."""
        return self._functions

    def workflow(self, workflow_id: str) -> Workflow:
        """The registered workflow with this id; ``UnknownWorkflow`` otherwise."""
        try:
            return self._workflows[workflow_id]
        except KeyError:
            raise UnknownWorkflow(workflow_id) from None

    # --- public operations -------------------------------------------------------------------

    def start(
        self,
        workflow: Workflow | str,
        input: Any = None,
        run_id: str | None = None,
    ) -> RunState:
        """Start a run and drive it until it blocks or finishes; return its state.

        ``run_id``: the run's id (a random one when None); an empty or non-str id is a
        ``ValueError``."""
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ValueError(f"run_id must be a non-empty str, not {run_id!r}")
        if isinstance(workflow, Workflow):
            if self._workflows.get(workflow.id) is not workflow:
                self.register(workflow)
            wf = workflow
        else:
            wf = self.workflow(workflow)
        if run_id is not None and self._exists(run_id):
            # Refused before the start node runs (the create that would refuse it comes
            # with that node's commit); a run created meanwhile is still refused there.
            # One store read per start with a chosen id; random ids skip it.
            raise RunExists(run_id)
        # 32 random hex digits (what uuid4().hex looks like, at a fifth of its cost).
        tr = kernel.start(wf, os.urandom(16).hex() if run_id is None else run_id, input,
                          self.clock())
        self._log.info("run.started", run_id=tr.state.run_id, workflow=wf.id,
                       node=tr.state.node, step=tr.state.step)
        queue: deque[_Work] = deque()
        final = self._advance((None, tr), queue, strict=True)
        return self._settle(final, queue, tr.state.run_id)

    def _exists(self, run_id: str) -> bool:
        try:
            self.store.load(run_id)
        except RunNotFound:
            return False
        return True

    def resume(self, run_id: str, key: str, payload: Any = None) -> RunState:
        """Deliver ``payload`` to a run waiting on ``key`` and drive it on.

        Raises ``RunNotFound``, ``WrongWaitKey``, ``NotWaiting``, ``RunFinished``,
        ``InvalidAnswer`` or ``UnencodableValue`` (of the payload); on any of them nothing is
        stored.  An ``UnencodableValue`` raised by the node the resume lets run comes after
        the resume was stored: the run is then RUNNING at that node, and a second ``resume``
        gets ``NotWaiting``.
        """
        for attempt in range(_RETRIES):
            state = self.store.load(run_id)
            wf = self.workflow(state.workflow)
            try:
                state = self._handover(state)
            except ConflictError:
                if attempt == _RETRIES - 1:
                    raise
                continue  # moved meanwhile: reload
            tr = kernel.resume(wf, state, key, payload, self.clock())
            queue: deque[_Work] = deque()
            try:
                final = self._advance((state, tr), queue, strict=True)
            except ConflictError:
                if attempt == _RETRIES - 1:
                    raise
                continue  # lost a race: reload, and the kernel re-checks the input
            return self._settle(final, queue, run_id)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def respond(self, run_id: str, answer: Any) -> RunState:
        """Answer the question a run asked with ``ask_user``; ``InvalidAnswer`` if not a choice."""
        state = self.store.load(run_id)
        if state.status is not Status.WAITING or state.wait is None or (
            state.wait.kind != "user"
        ):
            if state.status.finished:
                raise RunFinished(run_id, state.status.value, "respond", "it has finished")
            raise NotWaiting(run_id, state.status.value, "respond",
                             "it is not waiting for an answer from a person")
        return self.resume(run_id, state.wait.key, answer)

    def send_event(self, key: str, payload: Any = None) -> builtins.list[RunState]:
        """Resume every run waiting on event ``key`` with ``payload``; return their states.

        Runs of workflows this runtime does not serve are left for a runtime that does; a run
        that cannot be driven (its node fails to persist a value) is logged and skipped, so
        that one bad run never keeps the event from the others.
        """
        value_digest(payload, f"payload of event {key!r}")  # refuse before touching any run
        resumed: builtins.list[RunState] = []
        for state in self.store.find_waiting(key):
            if state.wait is None or state.wait.kind != "event" or not self._serves(state):
                continue
            try:
                resumed.append(self.resume(state.run_id, key, payload))
            except (ConflictError, IllegalTransition, WrongWaitKey) as exc:
                # Another process resumed it first (or it moved on): not ours to deliver.
                self._log.debug("event.skipped", run_id=state.run_id, key=key,
                                reason=str(exc))
            except WakepointError as exc:
                self._log.error("event.undeliverable", run_id=state.run_id, key=key,
                                workflow=state.workflow, error=str(exc))
        return resumed

    def cancel(self, run_id: str, reason: str = "cancelled", *, cascade: bool = True) -> RunState:
        """Cancel a run and (by default) every unfinished descendant; return its state."""
        state = self._apply(run_id, partial(self._cancel_transition, reason,
                                            cascade=cascade), tries=_CANCEL_TRIES)
        self._log.info("run.cancelled", run_id=run_id, workflow=state.workflow,
                       node=state.node, step=state.step)
        queue: deque[_Work] = deque()
        if cascade:
            self._cancel_descendants(state, reason)
        self._finished(state, queue)
        self._run_queue(queue)
        return self.store.load(run_id)

    def _cancel_descendants(self, root: RunState, reason: str) -> None:
        """Cancel every unfinished descendant of the cancelled ``root``, depth first.

        An explicit stack, not recursion: a chain of children can be deeper than Python's
        recursion limit.  A child never created, or finished meanwhile (by another process,
        or its own last node), is passed over, so that one race does not leave the rest of
        the tree running."""
        stack = [(child_id, root.run_id, reason) for child_id in reversed(root.children)]
        while stack:
            child_id, parent_id, why = stack.pop()
            why = f"parent {parent_id} cancelled: {why}"
            try:
                child = self._apply(child_id, partial(self._cancel_transition, why),
                                    tries=_CANCEL_TRIES)
            except (RunNotFound, RunFinished):
                continue  # never created, or finished (before or meanwhile): nothing to do
            except ConflictError as exc:
                # Outrun every time by its driver: the rest of the tree still gets its cancel,
                # and recover() cancels this one (its parent is cancelled).
                self._log.error("cancel.skipped", run_id=child_id, error=str(exc))
                continue
            self._log.info("run.cancelled", run_id=child_id, workflow=child.workflow,
                           node=child.node, step=child.step)
            stack.extend((grandchild, child_id, why) for grandchild in reversed(child.children))

    def _cancel_transition(
        self, reason: str, state: RunState, *, cascade: bool = True
    ) -> Transition:
        return kernel.cancel(state, reason, self.clock(), cascade=cascade)

    def get(self, run_id: str) -> RunState:
        """The run's current state; ``RunNotFound`` if there is none."""
        return self.store.load(run_id)

    def driving(self, run_id: str) -> bool:
        """Whether a thread of this runtime is driving ``run_id`` right now (a drive, or an
        effect it dispatched, is in progress).  A worker leaves such a run to that thread: it
        is not stalled, and ``recover_run`` would leave it alone anyway."""
        with self._active_lock:
            return run_id in self._active

    def list(self, **filters: Any) -> builtins.list[RunState]:
        """Runs matching the store's ``list`` filters (status, workflow, wait_kind, ...)."""
        return self.store.list(**filters)

    def ledger(self, run_id: str) -> builtins.list[Record]:
        """The run's signed ledger records, in order."""
        return self.store.ledger(run_id)

    def verify(self, run_id: str) -> int:
        """Verify the run's chain with this runtime's key; ``ChainError`` names the bad record."""
        keys = {k.key_id: k.verify_key for k in (self.signer, *self.signer.previous)}
        return verify_chain(self.store.ledger(run_id), keys)

    def recover(self) -> builtins.list[RunState]:
        """Continue everything a crash may have interrupted; return the states touched.

        RUNNING runs are driven on; WAITING runs whose deadline passed time out (or fire);
        effects requested but never resolved are dispatched again; parents whose child has
        already finished are resumed; runs left unfinished under a cancelled parent (a cancel
        cascade cut short) are cancelled.  Runs of workflows this runtime does not serve are
        left alone, and a run that cannot advance is logged and skipped, never allowed to
        stop the recovery of the others.  Run it at process start, before other workers could
        be handling the same runs (the worker's leases make that safe with several processes).
        Runs a thread of this runtime is driving meanwhile are left to that thread.  It takes
        no leases: while it dispatches an orphaned request again, a worker of another process
        sweeping orphans may do so too - with workers running, leave recovery to them.
        """
        repair = getattr(self.store, "repair_index", None)
        if repair is not None:
            repair()  # commits a crash left out of the store's global order
        # Both listed first: a run the RUNNING pass leaves waiting must not be dispatched again.
        running = self.store.list(status=Status.RUNNING)
        waiting = self.store.list(status=Status.WAITING)
        touched: builtins.list[str] = [state.run_id for state in running]
        for state in running:
            if self._serves(state):
                self._recover_one(state.run_id, redispatch=True, state=state)
        for state in waiting:
            if self._serves(state) and self._recover_one(
                state.run_id, redispatch=True, state=state
            )[0]:
                touched.append(state.run_id)
        self._log.info("recovered", runs=len(touched))
        return [self.store.load(r) for r in dict.fromkeys(touched)]

    def _recover_waiting(self, state: RunState, now: datetime, queue: deque[_Work]) -> bool:
        """Recover one WAITING run; whether there was anything to do."""
        if self._cascade_cancel(state):
            return True
        state = self._handover(state)
        wait = state.wait
        assert wait is not None
        if wait.deadline is not None and wait.deadline <= now:
            queue.append((state, kernel.timeout(state, now)))
        elif wait.kind == "effect" and wait.effect is not None:
            tr = self._dispatch(state, wait.effect, queue)
            if tr is not None:
                queue.append((state, tr))
        elif wait.kind == "child" and wait.effect is not None:
            self._recover_child(state, wait.effect, queue)
        else:
            return False
        return True

    def _cascade_cancel_quietly(self, state: RunState) -> bool:
        """``_cascade_cancel`` for recovery: a run that cannot be cancelled (it finished or
        moved meanwhile) is logged and counted as handled, never raised."""
        try:
            return self._cascade_cancel(state)
        except WakepointError as exc:
            self._log.error("recover.skipped", run_id=state.run_id, workflow=state.workflow,
                            node=state.node, step=state.step, error=str(exc))
            return True

    def _cascade_cancel(self, state: RunState) -> bool:
        """Cancel an unfinished run whose parent was cancelled (a cascade a crash cut short)."""
        if state.parent is None:
            return False
        try:
            parent = self.store.load(state.parent.run_id)
        except RunNotFound:
            return False
        if parent.status is not Status.CANCELLED or not self._cancel_cascades(parent):
            return False
        self.cancel(state.run_id, f"parent {parent.run_id} cancelled")
        return True

    def _cancel_cascades(self, parent: RunState) -> bool:
        """Whether the cancel of the cancelled ``parent`` was to reach its children (its
        ``run.cancelled`` record says ``cascade=False`` otherwise)."""
        for record in reversed(self.store.ledger(parent.run_id)):
            body = parse_body(record.body)
            if body.kind == "run.cancelled":
                return body.key != kernel.NO_CASCADE
        return True

    def _serves(self, state: RunState) -> bool:
        return state.workflow in self._workflows

    def recover_run(
        self, run_id: str, *, redispatch: bool = False, state: RunState | None = None
    ) -> RunState:
        """Do for one run what ``recover()`` does for all; return its state afterwards.

        A RUNNING run is driven on; a WAITING run whose deadline has passed times out (its
        timer fires).  With ``redispatch``, a WAITING run's unresolved effect is dispatched
        again (and a finished child's parent resumed): only a caller that knows the process
        which requested the effect is gone may ask for that, or the effect runs twice.  A run
        that cannot advance is logged, never raised; a lost race leaves the run to the winner.

        Meant for workers, which call it for runs they claimed from several threads at once;
        concurrent drives of one run are resolved by the store's seq check, as between
        processes (see the module's docstring).  ``state``: the run's state as the claim
        returned it (saves a read; a commit since then makes this drive's first commit
        conflict, and the run is left to whoever made it).  With ``redispatch`` the run is read
        again (after the caller took it) and left alone if it moved since ``state``: the effect
        is dispatched again before anything is committed, so a listed state that predates the
        outcome its live dispatcher committed must not decide it.
        """
        return self._recover_one(run_id, redispatch=redispatch, state=state)[1]

    def _recover_one(
        self, run_id: str, *, redispatch: bool, state: RunState | None = None
    ) -> tuple[bool, RunState]:
        """``recover_run``'s work, and whether there was anything to do (``recover``'s list).

        The run is claimed first: a run a thread of this runtime drives (or dispatches an
        effect of) right now is left to it, and no other thread of ours starts on this one
        until its queued outcome is committed - two recoveries, or a recovery and a live
        drive, never dispatch one request twice.  With ``redispatch`` the state is read after
        the claim, and a run that moved since the caller's ``state`` was read is left alone:
        whoever moved it is on it."""
        if not self._claim(run_id):
            return False, state if state is not None else self.store.load(run_id)
        try:
            return self._recover_claimed(run_id, redispatch, state)
        finally:
            self._unmark(run_id)

    def _recover_claimed(
        self, run_id: str, redispatch: bool, state: RunState | None
    ) -> tuple[bool, RunState]:
        if state is None:
            state = self.store.load(run_id)
        elif redispatch:
            current = self.store.load(run_id)
            if current.seq != state.seq:
                return True, current  # moved meanwhile (by this recovery, perhaps): touched
            state = current
        if not self._serves(state):
            return False, state
        queue: deque[_Work] = deque()
        did = False
        if state.status is Status.RUNNING:
            did = True
            if not self._cascade_cancel_quietly(state):
                queue.append((state, None))
        elif state.status is Status.WAITING and state.wait is not None:
            now = self.clock()
            deadline = state.wait.deadline
            if not redispatch and (deadline is None or deadline > now):
                return False, state
            try:
                did = self._recover_waiting(state, now, queue)
            except ConflictError:
                return False, self.store.load(run_id)  # another process got there first
            except WakepointError as exc:
                self._log.error("recover.skipped", run_id=state.run_id,
                                workflow=state.workflow, node=state.node, step=state.step,
                                error=str(exc))
                return False, state
        if len(queue) == 1:
            # Driving this run alone: what the drive committed last is the run's state (no
            # read back), unless it touched other runs (a parent, a child) or lost a race.
            last = self._run_one(queue)
            if last is not None and last.run_id == run_id and not queue:
                return did, last
        self._run_queue(queue, tolerant=True)
        return did, self.store.load(run_id)

    def _run_one(self, queue: deque[_Work]) -> RunState | None:
        """Drive the first queued run, logging (not raising) why it cannot advance; its last
        committed state (None: it could not advance, or another process took it over)."""
        work = queue.popleft()
        try:
            return self._advance(work, queue)
        except WakepointError as exc:
            state = work[1].state if work[1] is not None else work[0]
            assert state is not None
            self._log.error("run.stuck", run_id=state.run_id, workflow=state.workflow,
                            node=state.node, step=state.step, error=str(exc))
            return None

    def wake_due(self, now: datetime | None = None) -> builtins.list[RunState]:
        """Fire every timer and deadline that is due at ``now``; return the runs' new states."""
        now = now or self.clock()
        queue: deque[_Work] = deque()
        for due in self.store.list(status=Status.WAITING, due_before=now):
            if not self._serves(due):
                continue
            try:
                state = self._handover(due)
            except ConflictError:
                continue  # another process got there first
            queue.append((state, kernel.timeout(state, now)))
        woken = [state.run_id for state, _ in queue if state is not None]
        # Tolerant: a run another process woke first conflicts and is left to it.
        self._run_queue(queue, tolerant=True)
        return [self.store.load(r) for r in woken]

    def next_due(self) -> datetime | None:
        """The earliest deadline of any waiting run (what an alarm clock should wait for)."""
        deadlines = [
            s.wait.deadline for s in self.store.list(status=Status.WAITING)
            if s.wait is not None and s.wait.deadline is not None
        ]
        return min(deadlines, default=None)

    def close(self) -> None:
        """Write a last checkpoint (when records are uncovered), flush and close the store."""
        if self._cp_pending > 0:
            self._checkpoint_quietly()
        self.store.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the engine --------------------------------------------------------------------------

    def _sign(self, tr: Transition, records: builtins.list[Record]) -> RunState:
        """Sign ``tr``'s entries onto the chain; return its state with the new ledger head.

        The kernel copies ``seq``/``head`` from its input state, so they name the record
        before this transition, which is where the new records chain on.
        """
        state, new = sign_entries(
            self.signer, self.store.log_id, tr.state, tr.entries, tr.state.updated_at,
            prev_seq=tr.state.seq, prev_head=tr.state.head,
        )
        records.extend(new)
        if state.status.finished:
            # A finished run's chain ends with ``run.sealed``, in the same commit as the
            # transition that finished it, so no crash can leave it unsealed.
            state, seal = seal_record(self.signer, self.store.log_id, state, state.updated_at)
            records.append(seal)
        return state

    def _store(
        self, committed: RunState | None, state: RunState, records: builtins.list[Record]
    ) -> None:
        """Commit ``records`` and ``state`` on top of ``committed`` (None: create the run)."""
        if committed is None:
            self.store.create(state, records)
        else:
            self.store.commit(state.run_id, committed.seq, state, records)
        if self.signer.previous:
            self._remember_key(state)
        wait = state.wait
        if self.on_due is not None and wait is not None and wait.deadline is not None:
            self.on_due(wait.deadline)
        if self._checkpoint_fn is not None:
            with self._cp_count_lock:
                self._cp_pending += len(records)
                pending = self._cp_pending
            elapsed = time.monotonic() - self._cp_last
            if pending >= self._cp_records or elapsed >= self._cp_seconds or (
                state.status.finished and elapsed >= _CHECKPOINT_MIN_INTERVAL
            ):
                self._checkpoint_quietly()

    # --- checkpoints and key hand-over -------------------------------------------------------

    def checkpoint(self) -> str | None:
        """Sign and store a checkpoint of the store's whole ledger now; return its note.

        None when the store keeps no checkpoints.  The runtime also writes them by itself
        (see ``checkpoint_records`` / ``checkpoint_seconds``); an auditor exports the latest
        with ``wakepoint ledger checkpoint --export FILE``.
        """
        fn = self._checkpoint_fn
        if fn is None:
            return None
        with self._cp_lock:
            pending = self._cp_pending
            note = fn(self.signer)
            with self._cp_count_lock:
                self._cp_pending -= pending  # records committed meanwhile stay pending
            self._cp_last = time.monotonic()
            return note

    def checkpoint_if_due(self) -> str | None:
        """Write a checkpoint when records are waiting for one and the last is at least
        ``_CHECKPOINT_MIN_INTERVAL`` old; the note, or None.  For a process that stops
        committing for a while (a worker between bursts): its last records are then covered
        without waiting for its next commit or ``close()``."""
        if self._checkpoint_fn is None or self._cp_pending <= 0:
            return None
        if time.monotonic() - self._cp_last < _CHECKPOINT_MIN_INTERVAL:
            return None
        return self.checkpoint()

    def _checkpoint_quietly(self) -> None:
        # After a commit that returned: a failed checkpoint must not look like a failed
        # transition to the caller.  The next due point (or close) tries again.
        if not self._cp_lock.acquire(blocking=False):
            return  # another thread is writing one right now
        self._cp_lock.release()
        try:
            self.checkpoint()
        except Exception as exc:
            self._log.error("checkpoint.failed", error=str(exc))

    def _remember_key(self, state: RunState) -> None:
        if len(self._last_key) >= _KEY_CACHE:
            self._last_key.clear()
        self._last_key[state.run_id] = (state.seq, self.signer.key_id)

    def _chain_key(self, state: RunState) -> str:
        """The key the run's chain is currently in the hands of (its last record's signer;
        for a ``key.rotated`` record, the key it handed over to)."""
        cached = self._last_key.get(state.run_id)
        if cached is not None and cached[0] == state.seq:
            return cached[1]
        last = self.store.ledger(state.run_id)[-1]
        return last.cosigs[-1].keyid if last.cosigs else last.key_id

    def _handover(self, state: RunState) -> RunState:
        """Before this runtime's key signs onto a run whose chain a previous key of its
        signer (``Signer.previous``, after ``wakepoint keys rotate``) signed last, commit a
        ``key.rotated`` record signed by both; return the state to go on from.

        Runs are handed over lazily, when next written, so a rotation costs nothing up
        front; a chain in the hands of a key this signer never held is left as it is (the
        verifier judges it).  ``ConflictError`` when another writer moved the run first.
        """
        if not self.signer.previous or state.seq < 0 or state.status.finished:
            return state
        held_by = self._chain_key(state)
        if held_by == self.signer.key_id:
            return state
        old = next((k for k in self.signer.previous if k.key_id == held_by), None)
        if old is None:
            return state
        new, record = rotation_record(old, self.signer, self.store.log_id, state,
                                      self.clock())
        self._store(state, new, [record])  # remembers the key, counts toward a checkpoint
        self._log.info("key.rotated", run_id=state.run_id, workflow=state.workflow,
                       old=old.key_id, new=self.signer.key_id)
        return new

    def _commit(self, old: RunState, tr: Transition) -> RunState:
        records: builtins.list[Record] = []
        state = self._sign(tr, records)
        self._store(old, state, records)
        return state

    def _apply(
        self, run_id: str, make: Callable[[RunState], Transition], *, tries: int = _RETRIES
    ) -> RunState:
        """Load, transition and commit, retrying on a lost race (the input is re-checked)."""
        for _ in range(tries - 1):
            try:
                state = self._handover(self.store.load(run_id))
                return self._commit(state, make(state))
            except ConflictError:
                continue
        state = self._handover(self.store.load(run_id))
        return self._commit(state, make(state))

    def _settle(self, final: RunState | None, queue: deque[_Work], run_id: str) -> RunState:
        """Drive the runs a call queued, then return ``run_id``'s state.

        The state the drive ended with is the stored one unless another process took the run
        over (None) or a queued run - a child finishing - may move it on; only then re-read it.
        """
        if not queue and final is not None:
            return final
        self._run_queue(queue)
        return self.store.load(run_id)

    def _run_queue(self, queue: deque[_Work], *, tolerant: bool = False) -> None:
        """Drive every queued run.  ``tolerant``: log a run that cannot advance and go on
        (recovery), instead of raising to the caller who asked for that run (start, resume).
        """
        while queue:
            if tolerant:
                self._run_one(queue)
            else:
                self._advance(queue.popleft(), queue)

    def _advance(
        self, work: _Work, queue: deque[_Work], *, strict: bool = False
    ) -> RunState | None:
        """``_drive``, with the run marked as driven by this runtime meanwhile."""
        committed, pending = work
        state = pending.state if pending is not None else committed
        assert state is not None
        run_id = state.run_id
        self._mark(run_id)
        try:
            return self._drive(work, queue, strict=strict)
        finally:
            self._unmark(run_id)

    def _claim(self, run_id: str) -> bool:
        """Mark ``run_id`` as driven by this thread unless a thread of ours already is on it."""
        with self._active_lock:
            if run_id in self._active:
                return False
            self._active[run_id] = 1
            return True

    def _mark(self, run_id: str) -> None:
        with self._active_lock:
            self._active[run_id] = self._active.get(run_id, 0) + 1

    def _unmark(self, run_id: str) -> None:
        with self._active_lock:
            left = self._active[run_id] - 1
            if left:
                self._active[run_id] = left
            else:
                del self._active[run_id]

    def _drive(
        self, work: _Work, queue: deque[_Work], *, strict: bool = False
    ) -> RunState | None:
        """Drive one run until it blocks or finishes, queueing the runs it affects.

        ``work`` is the run's last committed state (None: not created yet) and a transition
        not yet committed (an input: start, resume, timeout, an effect's outcome).  That input
        is committed *together with* the node it lets run, in one atomic commit with one
        signed record per transition: if the process dies first, neither happened, and the
        caller's call never returned.  Every further node gets a commit of its own, so a
        completed node is never run again after a crash.  ``strict``: a lost race on that
        first commit raises ``ConflictError`` (the caller reloads); later ones mean another
        process drives the run, and end this drive quietly.  Returns the state last committed,
        or None when another process took the run over.
        """
        committed, pending = work
        if pending is None and committed is not None and self.signer.previous:
            try:
                committed = self._handover(committed)
            except ConflictError:
                return None  # another process drives it
        state = pending.state if pending is not None else committed
        assert state is not None
        wf = self.workflow(state.workflow)
        records: builtins.list[Record] = []
        if pending is not None:
            state = self._sign(pending, records)
        debug = self._log.debug
        # Locals: this loop runs once per node of every run (the hot path of every store).
        tick, clock, sign, store, running = (
            kernel.tick, self.clock, self._sign, self._store, Status.RUNNING)
        first = True
        # Stores without ``unheld`` keep nothing from other threads in ``hold`` (or all of it).
        unheld = getattr(self.store, "unheld", None) or _no_unheld
        try:
            with self.store.hold(state.run_id):
                while True:
                    effect: Effect | None = None
                    if state.status is running:
                        try:
                            tr = tick(wf, state, clock())
                        except WakepointError:
                            if records:  # keep the input; the node's failure is the caller's
                                store(committed, state, records)
                            raise
                        state = sign(tr, records)
                        debug("transition", run_id=state.run_id, workflow=state.workflow,
                              node=state.node, step=state.step, kind=tr.entries[0].kind)
                        if tr.effects:
                            effect = tr.effects[0]
                    if records:
                        store(committed, state, records)
                        committed, records, first = state, [], False
                    if effect is not None:
                        # The request is committed: now the handler may act on it.  The other
                        # threads of this process may write the run meanwhile (a ``cancel``
                        # during a slow ``call`` lands at once; committing the outcome then
                        # conflicts); other processes still wait for the hold (a worker's
                        # orphan sweep must see the dispatcher alive).
                        with unheld(state.run_id):
                            outcome = self._dispatch(state, effect, queue)
                        if outcome is not None:
                            state = self._sign(outcome, records)
                            continue
                    if state.status is not running:
                        break
        except ConflictError:
            if strict and first:
                raise
            # Another process committed to this run first; it is that process's to drive.
            self._log.info("run.conflict", run_id=state.run_id, workflow=state.workflow,
                           node=state.node, step=state.step)
            return None
        if state.status.finished:
            self._log.info(f"run.{state.status.value}", run_id=state.run_id,
                           workflow=state.workflow, node=state.node, step=state.step)
            self._finished(state, queue)
        return state

    def _dispatch(
        self, state: RunState, effect: Effect, queue: deque[_Work]
    ) -> Transition | None:
        """Hand a committed effect request to its handler; the outcome's transition, if any.

        None means the run stays parked.  The transition is not committed here: the caller
        commits it together with the node it lets run.
        """
        wait = state.wait
        assert wait is not None
        kind = effect_kind(effect)
        context = _Context(self, queue)
        # No mark of its own: every caller holds the run marked already (a drive, ``_advance``)
        # or claimed (a recovery, ``_recover_one``), so no other recovery dispatches it again.
        try:
            outcome = self.handlers[kind].handle(effect, state, context)
        except (StoreError, ConflictError):
            # The store failed under the handler (a child's create, say), not the effect:
            # the request stays committed and unresolved, and recovery dispatches it again.
            raise
        except Exception as exc:  # a handler bug or UnknownEffect: the effect failed
            outcome = Failed(type=type(exc).__qualname__, message=str(exc))
        if isinstance(outcome, Parked):
            return None
        now = self.clock()
        if isinstance(outcome, Resolved):
            try:
                return kernel.resume(self.workflow(state.workflow), state, wait.key,
                                     outcome.value, now)
            except UnencodableValue as exc:
                return kernel.reject(state, wait.key,
                                     ErrorInfo(type="UnencodableValue", message=str(exc)), now)
        self._log.warning("effect.failed", run_id=state.run_id, workflow=state.workflow,
                          node=state.node, step=state.step, effect=kind,
                          error=outcome.message)
        return kernel.reject(state, wait.key, outcome.error(), now)

    def _finished(self, child: RunState, queue: deque[_Work]) -> None:
        """A run ended: resume the parent that waits for it, if any."""
        link = child.parent
        if link is None:
            return
        try:
            parent = self.store.load(link.run_id)
        except RunNotFound:
            return
        wait = parent.wait
        if parent.status is not Status.WAITING or wait is None or wait.kind != "child" or (
            wait.key != child.run_id
        ):
            return  # detached child, or the parent moved on (cancelled, timed out)
        try:
            parent = self._handover(parent)
        except ConflictError:
            return  # the parent moved meanwhile: whoever moved it resumes it
        now = self.clock()
        if child.status is Status.COMPLETED:
            tr = kernel.resume(self.workflow(parent.workflow), parent, wait.key, child.output,
                               now)
        else:
            error = child.error or ErrorInfo(type="ChildFailed", message=child.status.value)
            tr = kernel.reject(parent, wait.key, ErrorInfo(
                type=error.type, message=f"child run {child.run_id} {child.status.value}: "
                f"{error.message}"), now)
        queue.append((parent, tr))  # committed with the parent's next node

    def _recover_child(self, parent: RunState, effect: Effect, queue: deque[_Work]) -> None:
        assert parent.wait is not None
        try:
            child = self.store.load(parent.wait.key)
        except RunNotFound:
            tr = self._dispatch(parent, effect, queue)  # the child was never created
            if tr is not None:
                queue.append((parent, tr))
            return
        if child.status.finished:
            self._finished(child, queue)
        # An unfinished child needs nothing here: recover() drives RUNNING runs itself, and a
        # waiting child is woken by whatever it waits for.

    def _start_child(
        self, workflow: str, input: Any, run_id: str, parent: ParentLink,
        queue: deque[_Work],
    ) -> RunState:
        try:
            existing = self.store.load(run_id)
        except RunNotFound:
            pass
        else:
            if existing.parent != parent:
                # A run of that id that is not this parent's child (a caller chose the id):
                # taking it as the child would hand its output to the wrong parent.
                raise RunExists(run_id)
            return existing
        # Created now, not merged with its first node: a detached parent moves on at once, and
        # must never point at a child that a crash could leave uncreated.
        tr = kernel.start(self.workflow(workflow), run_id, input, self.clock(), parent=parent)
        records: builtins.list[Record] = []
        state = self._sign(tr, records)
        try:
            self._store(None, state, records)
        except RunExists:
            # Created meanwhile by another process recovering this parent: that one is the
            # child (and its creator drives it), if it is this parent's.
            existing = self.store.load(run_id)
            if existing.parent != parent:
                raise
            return existing
        # A cancel of the parent may have landed since its request was committed, its
        # cascade finding no child yet: then this child is cancelled here, before it runs a
        # node.  (The cancel commits before its cascade looks, and this read comes after the
        # create: one of the two sees the other.)
        owner = self.store.load(parent.run_id)
        if owner.status is Status.CANCELLED and self._cancel_cascades(owner):
            try:
                return self._apply(run_id, partial(
                    self._cancel_transition, f"parent {parent.run_id} cancelled"),
                    tries=_CANCEL_TRIES)
            except RunFinished:  # the cascade got there too
                return self.store.load(run_id)
        queue.append((state, None))
        return state


def _no_unheld(run_id: str) -> AbstractContextManager[None]:
    return nullcontext()


class _Context:
    """The ``HandlerContext`` the runtime lends to handlers for one dispatch."""

    __slots__ = ("_queue", "_rt")

    def __init__(self, rt: Runtime, queue: deque[_Work]) -> None:
        self._rt = rt
        self._queue = queue

    @property
    def functions(self) -> Mapping[str, Callable[..., Any]]:
        return self._rt.functions

    def now(self) -> datetime:
        return self._rt.clock()

    def sleep(self, seconds: float) -> None:
        self._rt._sleep(seconds)

    def random(self) -> float:
        return self._rt._rand()

    def start_child(
        self, workflow: str, input: Any, run_id: str, parent: ParentLink
    ) -> RunState:
        return self._rt._start_child(workflow, input, run_id, parent, self._queue)
