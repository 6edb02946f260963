"""Workflow definitions: node registration, validation of literal targets, the logic id.

Sources for ``validate`` are read here with ``inspect.getsource`` (the kernel does no I/O; the
caller hands it the text).
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

import pytest
from wakepoint.kernel import (
    RunView,
    Step,
    Workflow,
    WorkflowDefinitionError,
    ask_user,
    done,
    goto,
    wait_event,
)
from wakepoint.kernel.workflow import targets_in_source


def _finish(run: RunView) -> Step:
    return done()


# --- registration ------------------------------------------------------------------------------


def test_node_decorator_registers_nodes_in_definition_order() -> None:
    """``@wf.node``, ``@wf.node(start=True)`` and ``name=`` register the function unchanged,
    in definition order; ``nodes`` is a read-only mapping."""
    wf = Workflow("reg")

    @wf.node(start=True)
    def first(run: RunView) -> Step:
        return goto("second")

    @wf.node
    def second(run: RunView) -> Step:
        return done()

    renamed = wf.node(name="third")(_finish)
    assert renamed is _finish
    assert wf.names() == ("first", "second", "third")
    assert wf.nodes["first"] is first
    assert wf.nodes["second"] is second
    assert wf.start_node == "first"
    assert wf.check_target("third")
    assert not wf.check_target("_finish")
    with pytest.raises(TypeError):
        wf.nodes["x"] = _finish  # type: ignore[index]
    assert repr(wf) == "Workflow('reg', nodes=['first', 'second', 'third'])"


def test_duplicate_node_is_refused_naming_it() -> None:
    """A second node of the same name raises at decoration time, naming it."""
    wf = Workflow("dup")
    wf.node(_finish, name="a")
    with pytest.raises(WorkflowDefinitionError, match=r"workflow 'dup': node 'a' is defined twice"):
        wf.node(_finish, name="a")
    assert wf.names() == ("a",)


def test_second_start_node_is_refused_naming_both() -> None:
    """A second start node raises at decoration time, naming it and the first one."""
    wf = Workflow("two")
    wf.node(_finish, start=True, name="a")
    with pytest.raises(WorkflowDefinitionError, match=r"node 'b' is marked start, but 'a'"):
        wf.node(_finish, start=True, name="b")
    assert (wf.start_node, wf.names()) == ("a", ("a",))


def test_missing_start_node_is_refused() -> None:
    """Without a start node, ``start_node`` and ``validate`` raise naming the workflow."""
    wf = Workflow("headless")
    wf.node(_finish, name="a")
    with pytest.raises(WorkflowDefinitionError, match=r"workflow 'headless' has no start node"):
        _ = wf.start_node
    with pytest.raises(WorkflowDefinitionError, match="no start node"):
        wf.validate()


@pytest.mark.parametrize(
    ("bad_id", "max_steps", "match"),
    [("", 10, "non-empty id"), ("w", 0, "max_steps must be at least 1"),
     ("w", -5, "max_steps must be at least 1")],
)
def test_bad_workflow_arguments_are_refused(bad_id: str, max_steps: int, match: str) -> None:
    """An empty id and ``max_steps < 1`` are refused."""
    with pytest.raises(WorkflowDefinitionError, match=match):
        Workflow(bad_id, max_steps=max_steps)


def test_workflow_keeps_its_arguments() -> None:
    """id, version and max_steps are kept as given; the smallest max_steps is 1."""
    wf = Workflow("w", "2024-05", max_steps=1)
    assert (wf.id, wf.version, wf.max_steps) == ("w", "2024-05", 1)
    assert Workflow("w").max_steps == 10_000


# --- validation of literal targets -------------------------------------------------------------


def _ok_graph() -> tuple[Workflow, dict[str, str]]:
    """A workflow whose nodes refer to nodes defined after them, with their sources."""
    wf = Workflow("graph")

    @wf.node(start=True)
    def begin(run: RunView) -> Step:
        if run.input:
            return goto("later", set={"x": 1})
        return wait_event("k", into="v", then="later", deadline=None, on_timeout="begin")

    @wf.node
    def later(run: RunView) -> Step:
        return ask_user("?", then="begin", on_timeout="later")

    sources = {name: inspect.getsource(fn) for name, fn in wf.nodes.items()}
    return wf, sources


def test_validate_accepts_known_targets_including_forward_references() -> None:
    """Targets that name nodes (even nodes defined later) pass validation."""
    wf, sources = _ok_graph()
    wf.validate(sources)
    wf.validate()
    wf.validate({})


@pytest.mark.parametrize(
    "body",
    [
        'return goto("x")',
        'return wait_event("key", then="x")',
        'return ask_user("q", then="a", on_timeout="x")',
        'return call("fn", then="a", on_error="x")',
        'return effect("kind", then="a", on_error="x")',
        'return subworkflow("child", then="a", on_error="x")',
        'return wait_until(5, then="x")',
    ],
)
def test_validate_names_the_node_and_the_unknown_target(body: str) -> None:
    """A literal goto/then/on_timeout/on_error target that names no node raises
    ``WorkflowDefinitionError`` naming the node and the target."""
    wf = Workflow("v")
    wf.node(_finish, start=True, name="a")
    source = f"def a(run):\n    {body}\n"
    with pytest.raises(WorkflowDefinitionError, match=r"node 'a' targets unknown node\(s\) 'x'"):
        wf.validate({"a": source})


def test_validate_lists_every_unknown_target_sorted() -> None:
    """All unknown targets of a node are named, sorted."""
    wf = Workflow("v")
    wf.node(_finish, start=True, name="a")
    source = 'def a(run):\n    return goto("zz") if run else call("f", then="b", on_error="a")\n'
    with pytest.raises(WorkflowDefinitionError, match=r"unknown node\(s\) 'b', 'zz'$"):
        wf.validate({"a": source})


def test_validate_skips_a_source_that_does_not_parse() -> None:
    """A source that is not valid Python (e.g. a lambda's partial line) is skipped, and the
    nodes after it are still checked."""
    wf = Workflow("v")
    wf.node(_finish, start=True, name="a")
    wf.node(_finish, name="b")
    broken = '    wf.node(lambda run: goto("x"),\n'
    wf.validate({"a": broken})
    with pytest.raises(WorkflowDefinitionError, match="node 'b'"):
        wf.validate({"a": broken, "b": 'goto("x")'})


def test_targets_in_source_finds_literal_targets() -> None:
    """Literal node names are found in ``goto(...)`` and ``k.goto(...)`` (first argument or
    ``node=``), and in ``then``/``on_timeout``/``on_error`` of every step constructor."""
    source = textwrap.dedent(
        """
        def node(run):
            if run.input == 1:
                return goto("plain")
            if run.input == 2:
                return k.goto("attr", set={"a": 1})
            if run.input == 3:
                return kernel.steps.goto(node="kw")
            if run.input == 4:
                return wait_event("not-a-node", then="ev", on_timeout="evt")
            if run.input == 5:
                return ask_user("not-a-node", then="ask", on_timeout="esc")
            if run.input == 6:
                return subworkflow("not-a-node", then="sub", on_error="suberr")
            if run.input == 7:
                return call("not-a-node", ["x"], then="cl", on_error="clerr")
            return effect("not-a-node", then="eff", on_error="efferr")
        """
    )
    assert targets_in_source(source) == {
        "plain", "attr", "kw", "ev", "evt", "ask", "esc", "sub", "suberr", "cl", "clerr",
        "eff", "efferr",
    }


def test_targets_in_source_ignores_what_is_not_a_literal_target() -> None:
    """Computed targets, non-string constants, other calls, other keywords and first arguments
    of constructors other than goto are not targets."""
    source = """
        def node(run):
            name = pick(then="no1")
            print("no2")
            handlers[0]("no3", then="no4")
            obj.method(then="no5")
            wait_until(5, then=name)
            goto(name)
            goto(3)
            goto()
            call("no6", into="no7", then=run.input)
            return ask_user("no8", choices=["no9"])
    """
    assert targets_in_source(source) == set()


def test_targets_in_source_needs_parseable_source() -> None:
    """A source that does not parse raises ``SyntaxError`` (``validate`` skips it)."""
    with pytest.raises(SyntaxError):
        targets_in_source("def (:")


# --- logic id ----------------------------------------------------------------------------------


def _defined(
    wf_id: str = "w",
    version: str | None = None,
    nodes: tuple[str, ...] = ("a", "b"),
    start: str = "a",
    max_steps: int = 10_000,
) -> Workflow:
    wf = Workflow(wf_id, version, max_steps=max_steps)
    for name in nodes:
        wf.node(_finish, name=name, start=name == start)
    return wf


def test_logic_id_is_stable_across_equal_definitions() -> None:
    """Two equal definitions (node order, node bodies and max_steps aside) have one logic id."""
    first = _defined()
    assert first.logic_id == _defined().logic_id
    assert first.logic_id == _defined(nodes=("b", "a")).logic_id
    assert first.logic_id == _defined(max_steps=7).logic_id
    other_bodies = Workflow("w")
    other_bodies.node(lambda run: goto("b"), name="a", start=True)
    other_bodies.node(lambda run: done(1), name="b")
    assert first.logic_id == other_bodies.logic_id
    assert len(first.logic_id) == 24
    assert int(first.logic_id, 16) >= 0


@pytest.mark.parametrize(
    "changed",
    [
        {"nodes": ("a", "b", "c")},
        {"nodes": ("a", "c")},
        {"start": "b"},
        {"version": "2"},
        {"wf_id": "w2"},
    ],
    ids=["node-added", "node-renamed", "start-changed", "version-changed", "id-changed"],
)
def test_logic_id_changes_with_the_logic(changed: dict[str, Any]) -> None:
    """Adding or renaming a node, moving the start, or changing version or id changes it."""
    assert _defined(**changed).logic_id != _defined().logic_id


def test_logic_id_follows_later_registrations() -> None:
    """The logic id is recomputed after a node is added to an already-hashed workflow."""
    wf = _defined()
    before = wf.logic_id
    assert wf.logic_id == before  # cached: the same value again
    wf.node(_finish, name="c")
    assert wf.logic_id == _defined(nodes=("a", "b", "c")).logic_id != before


def test_logic_id_without_a_start_node_differs_from_any_with_one() -> None:
    """A workflow with no start node still has a logic id (distinct from each start choice)."""
    headless = Workflow("w")
    headless.node(_finish, name="a")
    headless.node(_finish, name="b")
    assert headless.logic_id not in {_defined(start="a").logic_id, _defined(start="b").logic_id}


def test_migrations_are_registered_by_old_logic_id() -> None:
    """``@wf.migration(old)`` registers (and returns) the function; others have none."""
    wf = _defined()

    @wf.migration("0123")
    def move(node: str | None, old: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        return node, old

    assert wf.migration_from("0123") is move
    assert wf.migration_from("4567") is None
    assert wf.migration_from(wf.logic_id) is None

