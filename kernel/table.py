"""The transition table: every legal ``(status, input) -> statuses`` pair, in one place.

Rules of this module (after h11's ``_state.py``):

* Everything that decides *whether* a run may take an input lives here.  ``transitions.py``
  decides *what* the new state looks like, and asserts that its result is listed here.
* A run is created RUNNING by ``start``; ``start`` has no source status, so it is not a row.
* RUNNING accepts ``tick`` (run one node) and ``cancel``.  A tick may keep the run RUNNING
  (``goto``), park it WAITING (an effect), or finish it (``done``, ``fail``, an exception in the
  node, ``max_steps`` exceeded).
* WAITING accepts ``resume`` (the awaited payload arrived), ``reject`` (the effect failed),
  ``timeout`` (the deadline passed) and ``cancel``.  ``reject`` and ``timeout`` either continue
  at the node's error/timeout branch (RUNNING) or fail the run.
* COMPLETED, FAILED and CANCELLED are terminal: they accept nothing.
* A table miss raises the error class that explains it and changes nothing: ``RunFinished``
  for a terminal run, ``NotRunning`` for a tick of a waiting run, ``NotWaiting`` for a
  resume/reject/timeout of a running run.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

from .errors import IllegalTransition, NotRunning, NotWaiting, RunFinished
from .types import Status

Input: TypeAlias = Literal["tick", "resume", "reject", "timeout", "cancel"]

INPUTS: Final[tuple[Input, ...]] = ("tick", "resume", "reject", "timeout", "cancel")

R, W = Status.RUNNING, Status.WAITING
C, F, X = Status.COMPLETED, Status.FAILED, Status.CANCELLED

TABLE: Final[dict[tuple[Status, Input], frozenset[Status]]] = {
    (R, "tick"): frozenset({R, W, C, F}),
    (R, "cancel"): frozenset({X}),
    (W, "resume"): frozenset({R}),
    (W, "reject"): frozenset({R, F}),
    (W, "timeout"): frozenset({R, F}),
    (W, "cancel"): frozenset({X}),
}


def check(run_id: str, status: Status, input: Input) -> frozenset[Status]:
    """Return the statuses ``input`` may lead to from ``status``, or raise why it may not."""
    try:
        return TABLE[(status, input)]
    except KeyError:
        raise _refusal(run_id, status, input) from None


def _refusal(run_id: str, status: Status, input: Input) -> IllegalTransition:
    if status.finished:
        return RunFinished(run_id, status.value, input, "it has finished")
    if status is Status.WAITING:
        return NotRunning(run_id, status.value, input, "it is waiting; resume or cancel it")
    return NotWaiting(run_id, status.value, input, "it is not waiting")
