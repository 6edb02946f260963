"""The LangGraph driver: the peer workloads (see ``driver_common``) on LangGraph's StateGraph.

Stores: ``InMemorySaver`` (memory) and ``SqliteSaver`` from ``langgraph-checkpoint-sqlite``
(sqlite, its durable default) on one connection to ``DIR/langgraph.db``.  Every run is its
own thread (``thread_id``); graphs run with LangGraph's default durability (``"async"``:
checkpoints are written while the next step already runs), which is what a user who does
not choose gets, or with ``--durability sync`` (the harness's ``langgraph-sync`` variant).

* linear: a StateGraph of ten nodes in a line, each returning ``{"i": n}``.
* pause: the ``ask`` node calls ``interrupt("ok?")``; the outside sees the interrupt in
  ``invoke``'s result and resumes with ``invoke(Command(resume="yes"), config)``.
* crash: ten nodes; the restarted process calls ``invoke(None, config)`` on the same thread,
  which continues from the last checkpoint that reached the database.
* sleep: LangGraph has no durable timer (nothing in the graph runtime wakes a thread at a
  time), so the driver answers ``unsupported`` rather than fake one with ``time.sleep``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, TypedDict

import driver_common as common
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt


class State(TypedDict, total=False):
    i: int
    answer: Any


def saver(store: str, directory: Path) -> Any:
    """The checkpointer of a ``--store`` name."""
    if store == "memory":
        return InMemorySaver()
    # check_same_thread=False: LangGraph may write checkpoints from its background executor.
    return SqliteSaver(sqlite3.connect(directory / "langgraph.db", check_same_thread=False))


def line(node: Any) -> StateGraph:
    """A graph of ``NODES`` nodes in a line; ``node(n)`` builds node n (1-based)."""
    graph = StateGraph(State)
    previous = START
    for n in range(1, common.NODES + 1):
        graph.add_node(f"n{n}", node(n))
        graph.add_edge(previous, f"n{n}")
        previous = f"n{n}"
    graph.add_edge(previous, END)
    return graph


def set_value(n: int) -> Any:
    return lambda state: {"i": n}


def approval_graph() -> StateGraph:
    graph = StateGraph(State)

    def ask(state: State) -> State:
        return {"answer": interrupt("ok?")}

    def end(state: State) -> State:
        return {"i": 1}

    graph.add_node("ask", ask)
    graph.add_node("end", end)
    graph.add_edge(START, "ask")
    graph.add_edge("ask", "end")
    graph.add_edge("end", END)
    return graph


def main() -> None:
    args = common.parse()
    directory = args.dir.resolve()
    # --durability: the harness's "langgraph-sync" variant; absent, LangGraph's default.
    mode: dict[str, Any] = {"durability": args.durability} if args.durability else {}
    if args.workload == "sleep":
        common.finish(unsupported="LangGraph has no durable timer: no component resumes a "
                                  "thread at a time (a node's time.sleep dies with the process)")
    if args.workload == "linear":
        app = line(set_value).compile(checkpointer=saver(args.store, directory))
        finals: list[Any] = []

        def drive() -> None:
            for r in range(args.runs):
                finals.append(app.invoke({"i": 0}, {"configurable": {"thread_id": f"r{r}"}},
                                         **mode))

        wall, cpu = common.timed(drive)
        common.finish(steps=args.runs * common.NODES,
                      completed=sum(f.get("i") == common.NODES for f in finals),
                      wall=wall, cpu=cpu)
    elif args.workload == "pause":
        app = approval_graph().compile(checkpointer=saver("sqlite", directory))
        answers: list[Any] = []

        def cycle() -> None:
            for r in range(args.runs):
                config: Any = {"configurable": {"thread_id": f"a{r}"}}
                paused = app.invoke({"i": 0}, config, **mode)
                assert "__interrupt__" in paused  # waiting for the person
                answers.append(app.invoke(Command(resume="yes"), config, **mode)["answer"])

        wall, cpu = common.timed(cycle)
        common.finish(cycles=args.runs, completed=answers.count("yes"), wall=wall, cpu=cpu)
    else:
        def crash_node(n: int) -> Any:
            def node(state: State) -> State:
                common.crash_step(directory, n)
                return {"i": n}
            return node

        app = line(crash_node).compile(checkpointer=saver("sqlite", directory))
        config: Any = {"configurable": {"thread_id": "crash"}}
        if args.phase == "start":
            app.invoke({"i": 0}, config, **mode)
            common.finish(error="step 5 did not kill the process")
        ready = time.time()
        final = app.invoke(None, config, **mode)  # continue the thread from its last checkpoint
        common.finish(done_at=time.time(), **common.readiness(ready),
                      completed=final.get("i") == common.NODES)


if __name__ == "__main__":
    main()
