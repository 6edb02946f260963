"""Workflow definitions: named nodes, the start node, the logic id, migrations.

A workflow is a graph of plain functions ``node(run: RunView) -> Step``.  Cycles are allowed
(``max_steps`` bounds runaway loops).  Definition errors are raised as early as the information
exists:

* a duplicate node name, or a second start node, at decoration time;
* a missing start node, or a ``goto``/``then``/``on_timeout``/``on_error`` that names no node,
  when the workflow is validated - ``Workflow.validate`` - which the runtime does when the
  workflow is registered, because nodes may refer to nodes defined after them.  Targets are
  found by reading each node's source (handed in by the caller: the kernel does no I/O);
  targets computed at run time are checked when the step is taken, and a bad one fails the run
  with an error naming the node.

The *logic id* is a stable hash of the workflow id, its node names, its start node and its
declared version.  Runs record it; resuming a run whose logic id differs is refused with
``VersionMismatch`` unless a migration from the old logic id is registered
(``@wf.migration(old_id)``), in the spirit of Temporal's patching and DBOS's app versions.
"""

from __future__ import annotations

import ast
import hashlib
import textwrap
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, TypeAlias, overload

import msgspec

from .errors import WorkflowDefinitionError
from .types import Step

Migration: TypeAlias = Callable[[str | None, dict[str, Any]], tuple[str | None, dict[str, Any]]]
"""``(node, vars) -> (node, vars)``: maps a run of older logic onto the current nodes.

Applied by ``tick``, to the node the run is about to run (a waiting run is migrated at the tick
after it resumes, times out or is rejected).
"""


class RunView(msgspec.Struct, frozen=True, kw_only=True):
    """The read-only view of a run that a node receives.

    ``vars`` is a read-only mapping: a node changes vars only through the step it returns,
    which keeps every change inside one recorded transition.  The view itself is frozen.
    (A msgspec struct: one is built per node run, and it builds in a fraction of the time of a
    plain class with ``__init__``.)
    """

    run_id: str
    workflow: str
    node: str
    input: Any
    vars: Mapping[str, Any]
    now: datetime
    step: int

    def __repr__(self) -> str:
        return f"RunView(run_id={self.run_id!r}, node={self.node!r}, step={self.step})"


NodeFn: TypeAlias = Callable[[RunView], Step]

# The keyword arguments of the step constructors that name a node, and the constructors whose
# first positional argument names one (``goto``).
_TARGET_KEYWORDS = frozenset({"then", "on_timeout", "on_error", "node"})
_STEP_CONSTRUCTORS = frozenset(
    {"goto", "wait_event", "wait_until", "ask_user", "subworkflow", "call", "effect"}
)


def targets_in_source(source: str) -> set[str]:
    """Node names that a node's source passes literally to a step constructor."""
    tree = ast.parse(textwrap.dedent(source))
    found: set[str] = set()
    for item in ast.walk(tree):
        if not isinstance(item, ast.Call):
            continue
        func = item.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name not in _STEP_CONSTRUCTORS:
            continue
        literal = [a for a in item.args[:1] if name == "goto"]
        literal += [k.value for k in item.keywords if k.arg in _TARGET_KEYWORDS]
        found.update(
            a.value for a in literal if isinstance(a, ast.Constant) and isinstance(a.value, str)
        )
    return found


class Workflow:
    """A named graph of nodes.

    >>> wf = Workflow("greet")
    >>> @wf.node(start=True)
    ... def hello(run): return done(f"hello {run.input}")
    """

    def __init__(self, id: str, version: str | None = None, *, max_steps: int = 10_000) -> None:
        if not id:
            raise WorkflowDefinitionError("a workflow needs a non-empty id")
        if max_steps < 1:
            raise WorkflowDefinitionError(f"workflow {id!r}: max_steps must be at least 1")
        self.id = id
        self.version = version
        self.max_steps = max_steps
        self._nodes: dict[str, NodeFn] = {}
        self._start: str | None = None
        self._migrations: dict[str, Migration] = {}
        self._logic_id: str | None = None
        self.nodes: Mapping[str, NodeFn] = MappingProxyType(self._nodes)

    def __repr__(self) -> str:
        return f"Workflow({self.id!r}, nodes={list(self._nodes)!r})"

    @overload
    def node(self, fn: NodeFn, /) -> NodeFn: ...
    @overload
    def node(
        self, fn: None = None, /, *, start: bool = False, name: str | None = None
    ) -> Callable[[NodeFn], NodeFn]: ...

    def node(
        self, fn: NodeFn | None = None, /, *, start: bool = False, name: str | None = None
    ) -> NodeFn | Callable[[NodeFn], NodeFn]:
        """Register a node: ``@wf.node`` or ``@wf.node(start=True, name=...)``."""

        def register(f: NodeFn) -> NodeFn:
            node_name = name or f.__name__
            if node_name in self._nodes:
                raise WorkflowDefinitionError(
                    f"workflow {self.id!r}: node {node_name!r} is defined twice"
                )
            if start and self._start is not None:
                raise WorkflowDefinitionError(
                    f"workflow {self.id!r}: node {node_name!r} is marked start, but "
                    f"{self._start!r} already is"
                )
            self._nodes[node_name] = f
            if start:
                self._start = node_name
            self._logic_id = None
            return f

        return register(fn) if fn is not None else register

    @property
    def start_node(self) -> str:
        """The start node's name; raises ``WorkflowDefinitionError`` when there is none."""
        if self._start is None:
            raise WorkflowDefinitionError(
                f"workflow {self.id!r} has no start node: mark one with @wf.node(start=True)"
            )
        return self._start

    @property
    def logic_id(self) -> str:
        """Stable hash of id, node names, start node and declared version."""
        if self._logic_id is None:
            material = "\x00".join(
                ["wakepoint.logic/1", self.id, self._start or "", self.version or "",
                 *sorted(self._nodes)]
            )
            self._logic_id = hashlib.sha256(material.encode()).hexdigest()[:24]
        return self._logic_id

    def migration(self, from_logic_id: str) -> Callable[[Migration], Migration]:
        """Register ``fn(node, vars) -> (node, vars)`` for runs started under an older logic id."""

        def register(fn: Migration) -> Migration:
            self._migrations[from_logic_id] = fn
            return fn

        return register

    def migration_from(self, logic_id: str) -> Migration | None:
        """The migration registered for runs of ``logic_id``, if any."""
        return self._migrations.get(logic_id)

    def validate(self, sources: Mapping[str, str] | None = None) -> None:
        """Check the graph: a start node exists and every literal target names a node.

        ``sources`` maps node names to their source text; nodes without one are not scanned.
        """
        _ = self.start_node
        for node_name, source in (sources or {}).items():
            try:
                targets = targets_in_source(source)
            except SyntaxError:
                continue  # e.g. a lambda's partial source line: nothing to check statically
            unknown = sorted(t for t in targets if t not in self._nodes)
            if unknown:
                raise WorkflowDefinitionError(
                    f"workflow {self.id!r}: node {node_name!r} targets unknown node(s) "
                    f"{', '.join(map(repr, unknown))}"
                )

    def check_target(self, node: str) -> bool:
        """Whether ``node`` is a node of this workflow."""
        return node in self._nodes

    def names(self) -> Iterable[str]:
        """The node names, in definition order."""
        return tuple(self._nodes)
