"""The examples run as a user runs them: ``python examples/NAME.py`` in a fresh interpreter.

Each test runs one example as a subprocess of ``sys.executable`` (the interpreter with
wakepoint installed) with its working directory in ``tmp_path``, so nothing is written into
the repository, and checks the exit code and the facts the example prints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path, expect: int = 0) -> str:
    """Run ``examples/name`` with ``args``; return stdout + stderr, asserting the exit code."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{output}"
    return output


def test_every_example_is_tested() -> None:
    """Every file in ``examples/`` has a test here, so none can rot unnoticed."""
    tested = {"hello.py", "ask_user.py", "wait_until.py", "wait_event.py", "subworkflow.py",
              "call_retries.py", "agent_loop.py", "worker_jsonl.py", "worker_postgres.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_examples_import_only_the_public_api(path: Path) -> None:
    """Examples import wakepoint only through its public modules - ``wakepoint`` and, for
    workers, ``wakepoint.scheduler`` - and each opens with a docstring saying what it shows."""
    source = path.read_text()
    assert source.startswith('"""'), f"{path.name} has no module docstring"
    imports = re.findall(r"^\s*(?:from|import)\s+(wakepoint\S*)", source, re.MULTILINE)
    assert "wakepoint" in imports, imports
    assert set(imports) <= {"wakepoint", "wakepoint.scheduler"}, imports


def test_hello(tmp_path: Path) -> None:
    """hello: three nodes chained by ``goto`` with vars, finished by ``done``; four signed
    records whose chain verifies."""
    out = run_example("hello.py", cwd=tmp_path)
    assert "completed" in out
    assert "output: {'message': 'HELLO, WORLD!', 'steps_before_done': 3}" in out
    assert "node.stepped    greet -> shout" in out
    assert "chain verified: 5 records ok" in out


def test_ask_user_demo_three_processes(tmp_path: Path) -> None:
    """ask_user demo: process 1 starts a run that pauses on a question and exits; process 2
    answers and the run completes; process 3 verifies the chain with the key file; then the
    auditor's CLI verifies the whole ledger (seal, index, checkpoint) against a trust root.
    Three different pids, one store on disk under ``--home``."""
    home = tmp_path / "home"
    out = run_example("ask_user.py", "demo", "--home", str(home), cwd=tmp_path)
    pids = re.findall(r"\[pid (\d+)\]", out)
    assert len(pids) == 3 and len(set(pids)) == 3, out
    assert "it is waiting" in out
    assert "question: Approve 450 EUR for 'conference ticket' by ada?" in out
    assert "answered 'approve'; the run is completed" in out
    assert re.search(r"chain: ok \(5 records\)", out), out
    # The auditor's step: trust root from the public key, then the full offline verification.
    assert "python -m wakepoint ledger verify" in out
    assert re.search(r"OK: \S+ \(full mode, 5 records in 1 runs", out), out
    assert "last checkpoint: size 5" in out and "records after the last checkpoint: 0" in out
    assert "demo: ok" in out
    assert (home / "signer.key").is_file()
    assert not (tmp_path / ".wakepoint").exists()  # --home was honoured


def test_ask_user_commands_and_bad_answers(tmp_path: Path) -> None:
    """The subcommands one by one (default ``--home`` is ``./.wakepoint`` in the working
    directory): an answer outside the choices is refused with exit 1 and leaves the run
    waiting; a second answer after completion is refused too; verify says ok."""
    out = run_example("ask_user.py", "start", cwd=tmp_path)
    found = re.search(r"^run_id: (\S+)$", out, re.MULTILINE)
    assert found, out
    run_id = found.group(1)
    assert (tmp_path / ".wakepoint" / "signer.key").is_file()

    out = run_example("ask_user.py", "answer", run_id, "maybe", cwd=tmp_path, expect=1)
    assert "'maybe' is not one of the choices ['approve', 'reject']" in out
    out = run_example("ask_user.py", "answer", run_id, "reject", cwd=tmp_path)
    assert "'decision': 'reject'" in out
    out = run_example("ask_user.py", "answer", run_id, "approve", cwd=tmp_path, expect=1)
    assert "cannot answer" in out and "completed" in out

    out = run_example("ask_user.py", "verify", run_id, cwd=tmp_path)
    assert "chain: ok (5 records)" in out


def test_ask_user_verify_without_key_fails(tmp_path: Path) -> None:
    """verify refuses (exit 1) when the home has no key file, instead of making a new key."""
    out = run_example("ask_user.py", "verify", "nope", "--home", str(tmp_path / "empty"),
                      cwd=tmp_path, expect=1)
    assert "no key file" in out
    assert not (tmp_path / "empty").exists()


def test_wait_until(tmp_path: Path) -> None:
    """wait_until: a 1 s timer survives closing the runtime; a reopened runtime finds it with
    ``next_due()``, does not fire it early, and ``wake_due()`` completes the run."""
    out = run_example("wait_until.py", cwd=tmp_path)
    assert "waiting (timer)" in out
    assert "woken before it is due: 0 run(s)" in out
    assert "woken when due: 1 run(s); remind-1: completed" in out
    assert "reminder: stand up" in out
    assert out.rstrip().endswith("ok")


def test_wait_event(tmp_path: Path) -> None:
    """wait_event: ``send_event`` resumes the run waiting on that key (and nobody for an
    unknown key); a run whose deadline passes continues at ``on_timeout`` with
    ``{"timed_out": True}``."""
    out = run_example("wait_event.py", cwd=tmp_path)
    assert "send_event('order:A1') resumed 1 run(s)" in out
    assert "send_event('order:Z9') resumed 0 run(s)" in out
    assert "'payment': {'timed_out': True}" in out
    assert "shipped: ['A1', 'B2']; cancelled: ['C3']" in out


def test_subworkflow(tmp_path: Path) -> None:
    """subworkflow: wait mode delivers the child's output, detach mode its run id, a failed
    child sends the parent to ``on_error``, and cancel cascades to the waiting child."""
    out = run_example("subworkflow.py", cwd=tmp_path)
    assert "parent completed: {'total': 25, 'receipt_run': 'order-1.6'}" in out
    assert "detached child order-1.6 (receipt): completed" in out
    assert "child order-2.4: failed (card expired)" in out
    assert "parent completed at payment_failed" in out
    assert "child cancelled: parent order-3 cancelled: customer withdrew the order" in out
    assert out.rstrip().endswith("ok")


def test_call_retries(tmp_path: Path) -> None:
    """call: a function failing twice with ConnectionError succeeds on attempt 3 with the same
    idempotency key ``run_id:step`` each time; a KeyError (not in ``retry_on``) is tried once
    and goes to ``on_error``."""
    out = run_example("call_retries.py", cwd=tmp_path)
    assert "3 attempts, one idempotency key: ['checkout-1:2']" in out
    assert "lookup attempts for 'zed': 1" in out
    assert "{'error': {'type': 'KeyError'" in out
    assert out.rstrip().endswith("ok")


def test_agent_loop(tmp_path: Path) -> None:
    """agent_loop: the deterministic agent searches, calculates, pauses for approval before
    the dangerous tool, and after "allow" gives the same final answer on every run."""
    out = run_example("agent_loop.py", cwd=tmp_path)
    assert "-> search({'query': 'population of France'})" in out
    assert "-> calculator({'expression': '68400000 * 2'})" in out
    assert "paused (waiting)" in out and "send_email" in out
    assert "final answer: Twice the population of France is 136,800,000." in out
    assert "idempotency key agent-1:" in out
    assert out.rstrip().endswith("ok")
    assert run_example("agent_loop.py", cwd=tmp_path) == out  # deterministic


def test_readme_quick_start(tmp_path: Path) -> None:
    """The README's quick start, pasted into ``approve.py`` as the README says, prints what the
    README shows: ``start`` in one process pauses the run, ``yes`` in another completes it and
    its ledger verifies."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    transcript = section.split("```text\n", 1)[1].split("```", 1)[0]
    (tmp_path / "approve.py").write_text(code)
    expected: dict[str, list[str]] = {}
    for line in transcript.splitlines():
        if line.startswith("$ python approve.py "):
            command = line.removeprefix("$ python approve.py ")
            expected[command] = []
        else:
            expected[command].append(line)
    assert list(expected) == ["start", "yes"]
    for command, lines in expected.items():
        proc = subprocess.run([sys.executable, "approve.py", command], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        printed = proc.stdout.splitlines()
        missing = [line for line in lines if line not in printed]
        assert not missing, proc.stdout
    assert (tmp_path / ".wakepoint" / "signer.key").is_file()




def test_worker_jsonl(tmp_path: Path) -> None:
    """worker_jsonl: a worker wakes timers on the JSONL default without ``wake_due()``; after
    a stop, a new worker resumes the overdue runs at start-up; every ledger verifies."""
    out = run_example("worker_jsonl.py", cwd=tmp_path)
    assert len(re.findall(r"r\d: woken +[\d.]+ ms after due", out)) == 5, out
    assert "r5: resumed by the new worker" in out and "r6: resumed by the new worker" in out
    assert "ledgers verified: 35 records in 7 runs" in out
    assert out.rstrip().endswith("ok")


def test_worker_postgres(tmp_path: Path, pg_server: Any) -> None:
    """worker_postgres: two worker processes share one PostgreSQL database; every run
    completes and every ``call`` runs exactly once."""
    url = pg_server.create_database("examples_worker")
    out = run_example("worker_postgres.py", url, "--home", str(tmp_path / "home"),
                      cwd=tmp_path)
    assert "40/40 runs completed" in out, out
    assert "every call ran once: True" in out, out
