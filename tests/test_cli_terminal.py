"""The operator's terminal session, in a real pseudo-terminal: each command runs as a user
types it, with stdin, stdout and stderr on a pty (so ``isatty()`` is true, as in a shell).

The story (the ``examples/ask_user.py`` workflow): ``run`` pauses for a person; ``runs list``
shows the run waiting; ``respond`` answers it; ``runs show`` shows it completed; ``keys trust``
exports the trust root; ``ledger verify`` prints the human summary, ok.  A command that fails
prints one line, no traceback - unless ``--debug``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ask_user.py"
EXPENSE = '{"amount": 120, "currency": "EUR", "what": "train", "who": "ada"}'


def in_terminal(*args: str, cwd: Path) -> tuple[int, str]:
    """Run ``python -m wakepoint ARGS`` on a fresh pty; its exit code and everything it
    wrote to the terminal (``\\r\\n`` line ends, as a terminal shows them)."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "wakepoint", *args], cwd=cwd,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end of the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(timeout=60)
    return code, b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.fixture
def session(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLE, tmp_path / "ask_user.py")
    return tmp_path


def test_pause_list_respond_show_verify_in_a_terminal(session: Path) -> None:
    """The whole operator story on the default store, every command on a terminal."""
    code, out = in_terminal("run", "ask_user:approval", "--input", EXPENSE, "--run-id", "exp-1",
                            cwd=session)
    assert code == 0, out
    assert out.splitlines()[0] == "run exp-1: waiting"
    assert "Approve 120 EUR for 'train' by ada?" in out and "approve, reject" in out

    code, out = in_terminal("runs", "list", cwd=session)
    assert code == 0, out
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["RUN", "ID", "WORKFLOW", "STATUS"]
    assert [r.split()[:3] for r in rows] == [["exp-1", "expense-approval", "waiting"]]

    code, out = in_terminal("respond", "exp-1", "approve", "--app", "ask_user:approval",
                            cwd=session)
    assert code == 0, out
    assert out.splitlines()[0] == "run exp-1: completed"

    code, out = in_terminal("runs", "show", "exp-1", cwd=session)
    assert code == 0, out
    fields = dict(line.split(None, 1) for line in out.splitlines() if " " in line.strip())
    assert fields["status"].strip() == "completed"
    assert '"decision":"approve"' in fields["output"]

    code, out = in_terminal("keys", "trust", "--key", ".wakepoint/signer.key", "--store",
                            "jsonl:.wakepoint", "--out", "trust.json", cwd=session)
    assert code == 0, out
    code, out = in_terminal("ledger", "verify", ".wakepoint", "--trust", "trust.json",
                            cwd=session)
    assert code == 0, out
    first = out.splitlines()[0]
    assert first.startswith("OK: .wakepoint (full mode, ") and "in 1 runs" in first
    assert "\x1b" not in out and "verifying [" not in out  # no bar for a small ledger


def test_errors_are_one_line_unless_debug(session: Path) -> None:
    """An unexpected failure (a run file that is a directory) is one line on the terminal
    and exit 1; ``--debug`` shows the traceback."""
    code, _ = in_terminal("run", "ask_user:approval", "--input", EXPENSE, cwd=session)
    assert code == 0
    (session / ".wakepoint" / "runs" / "odd.jsonl").mkdir()
    code, out = in_terminal("runs", "list", cwd=session)
    assert code == 1
    assert out.count("\n") == 1 and out.startswith("error: ") and "Traceback" not in out
    assert "--debug" in out
    code, out = in_terminal("--debug", "runs", "list", cwd=session)
    assert code == 1 and "Traceback (most recent call last)" in out


def test_a_closed_pipe_is_not_an_error(session: Path) -> None:
    """``wakepoint runs list | head -0``: the reader is gone before the command writes; it
    stops quietly with 141 (128 + SIGPIPE, as a shell reports it), no error line."""
    code, _ = in_terminal("run", "ask_user:approval", "--input", EXPENSE, cwd=session)
    assert code == 0
    proc = subprocess.Popen([sys.executable, "-m", "wakepoint", "runs", "list"], cwd=session,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has started
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""
    proc.stderr.close()
