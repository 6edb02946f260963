"""agent_loop: a ReAct-style agent as a durable workflow, with a person approving one tool.

The loop is a cycle of nodes, ``think -> act -> observe -> think``, bounded by the workflow's
``max_steps``:

* ``think`` asks the model for the next move.  The model goes through ``call`` like any side
  effect: with a real LLM (slow, costly, not deterministic) its answer is recorded once in the
  ledger and never recomputed after a crash.  Here it is a deterministic local function (no
  network) that reads the conversation and picks a tool or gives the final answer.
* ``act`` runs the chosen tool - a registered function - through ``call``.  A tool marked
  dangerous (``send_email``) first needs a person's approval: the run pauses on ``ask_user``
  and could wait days, surviving restarts, until someone answers.
* ``observe`` appends the tool's result (or its error) to the conversation in ``vars``.

Run it:  python examples/agent_loop.py
"""

from __future__ import annotations

import ast
import logging
import operator
from typing import Any

import structlog
from wakepoint import Runtime, RunView, Status, Workflow, ask_user, call, done, goto

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

# --- tools ---------------------------------------------------------------------------------

FACTS = {
    "population of france": "France has 68,400,000 inhabitants (2024 estimate).",
    "population of germany": "Germany has 84,600,000 inhabitants (2024 estimate).",
}


def search(query: str) -> str:
    """A local stand-in for a web search."""
    return FACTS.get(query.lower(), f"no results for {query!r}")


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def calculator(expression: str) -> int | float:
    """Arithmetic on numbers with + - * / and parentheses (no eval of arbitrary code)."""

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"unsupported expression: {ast.unparse(node)}")

    return value(ast.parse(expression, mode="eval").body)


outbox: list[dict[str, str]] = []


def send_email(to: str, body: str, idempotency_key: str) -> str:
    """The dangerous tool: it acts on the world.  The key lets a mail API drop a duplicate."""
    outbox.append({"to": to, "body": body, "idempotency_key": idempotency_key})
    return f"sent to {to}"


TOOLS = {"search": search, "calculator": calculator, "send_email": send_email}
DANGEROUS = {"send_email"}

# --- the "model": deterministic, local, reads only the conversation ------------------------


def model(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Decide the next move from the conversation: a tool call or a final answer."""
    task = messages[0]["content"]
    results = {m["tool"]: m["content"] for m in messages if m["role"] == "tool"}
    if "search" not in results:
        return {"thought": "I need the population first.", "tool": "search",
                "args": {"query": "population of France"}}
    if "calculator" not in results:
        population = "".join(ch for ch in results["search"].split(" has ")[1].split()[0]
                             if ch.isdigit())
        return {"thought": "Now double it.", "tool": "calculator",
                "args": {"expression": f"{population} * 2"}}
    answer = f"Twice the population of France is {results['calculator']:,}."
    if "send_email" not in results and "email" in task:
        return {"thought": "The task asks me to email the result.", "tool": "send_email",
                "args": {"to": "boss@example.com", "body": answer}}
    return {"thought": "I have everything.", "final": answer}


# --- the workflow: think -> act -> observe -> think ----------------------------------------

agent = Workflow("react-agent", max_steps=60)  # bounds a model that never stops


@agent.node(start=True)
def start(run: RunView):
    return goto("think", set={"messages": [{"role": "user", "content": run.input["task"]}]})


@agent.node
def think(run: RunView):
    return call("model", {"messages": run.vars["messages"]}, into="decision", then="act")


@agent.node
def act(run: RunView):
    decision = run.vars["decision"]
    if "final" in decision:
        return done({"answer": decision["final"], "messages": run.vars["messages"]})
    if decision["tool"] in DANGEROUS:
        return ask_user(
            f"The agent wants to run {decision['tool']}({decision['args']}). Allow it?",
            choices=["allow", "deny"], into="approval", then="approved",
        )
    return call(decision["tool"], decision["args"], into="observation", then="observe",
                on_error="observe")


@agent.node
def approved(run: RunView):
    decision = run.vars["decision"]
    if run.vars["approval"] == "allow":
        return call(decision["tool"], decision["args"], into="observation", then="observe",
                    on_error="observe")
    return goto("observe", set={"observation": {"error": "the user denied this tool call"}})


@agent.node
def observe(run: RunView):
    decision = run.vars["decision"]
    messages = [
        *run.vars["messages"],
        {"role": "assistant", "content": decision["thought"], "tool": decision["tool"],
         "args": decision["args"]},
        {"role": "tool", "tool": decision["tool"], "content": run.vars["observation"]},
    ]
    return goto("think", set={"messages": messages})


def main() -> int:
    with Runtime("memory:", workflows=[agent], functions={"model": model, **TOOLS}) as rt:
        task = "What is twice the population of France? Then email the result to my boss."
        print(f"task: {task}")
        state = rt.start(agent, {"task": task}, run_id="agent-1")
        for message in state.vars["messages"][1:]:
            if message["role"] == "assistant":
                print(f"  think: {message['content']}  -> {message['tool']}({message['args']})")
            else:
                print(f"  observe: {message['content']}")
        decision = state.vars["decision"]
        print(f"  think: {decision['thought']}  -> {decision['tool']}(...)")
        assert state.wait is not None
        print(f"paused ({state.status.value}) after {state.step} steps: {state.wait.prompt}")
        print("a person answers: allow")
        state = rt.respond(state.run_id, "allow")
        print(f"  observe: {state.output['messages'][-1]['content']} "
              f"(idempotency key {outbox[0]['idempotency_key']})")
        print(f"final answer: {state.output['answer']}")
        print(f"run {state.run_id}: {state.status.value} in {state.step} steps; "
              f"ledger verified: {rt.verify(state.run_id)} records")
        ok = (state.status is Status.COMPLETED and len(outbox) == 1
              and state.output["answer"] == "Twice the population of France is 136,800,000.")
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
