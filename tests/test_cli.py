"""The ``wakepoint`` command, run as a user runs it: ``python -m wakepoint`` in a subprocess.

What exists today is ``--version`` and ``ledger verify-chain``; exit codes are 0 verified,
1 not verified or unreadable, 2 usage error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from wakepoint import Runtime, RunView, Workflow, __version__, ask_user, done
from wakepoint.kernel.types import Entry
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.records import sign_entries
from wakepoint.stores.jsonl import JsonlStore

approval = Workflow("cli-approval")


@approval.node(start=True)
def ask(run: RunView):
    return ask_user("ok?", choices=["yes", "no"], into="answer", then="finish")


@approval.node
def finish(run: RunView):
    return done(run.vars["answer"])


def wakepoint_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wakepoint", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def finished_run(tmp_path: Path) -> tuple[Path, str]:
    """A JSONL store (the embedded default layout) holding one completed run of 4 records."""
    home = tmp_path / "store"
    with Runtime(workflows=[approval], home=home) as rt:
        state = rt.start(approval, run_id="r1")
        rt.respond(state.run_id, "yes")
    return home, "r1"


def test_version(tmp_path: Path) -> None:
    """``--version`` prints the package version and exits 0."""
    proc = wakepoint_cli("--version", cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"wakepoint {__version__}")


@pytest.mark.parametrize("args", [(), ("ledger",), ("ledger", "verify-chain", "r1"),
                                  ("nonsense",)])
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A missing command, subcommand or required option is a usage error: exit 2 with usage
    on stderr."""
    proc = wakepoint_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage: wakepoint" in proc.stderr


def test_verify_chain_ok(finished_run: tuple[Path, str], tmp_path: Path) -> None:
    """A good chain verifies with the store's own key file: ``ok: 4 records``, exit 0."""
    home, run_id = finished_run
    proc = wakepoint_cli("ledger", "verify-chain", run_id, "--store", f"jsonl:{home}",
                         cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok: 4 records"), proc.stderr


def test_verify_chain_with_another_key_fails(finished_run: tuple[Path, str],
                                             tmp_path: Path) -> None:
    """With a key that did not sign the records, verification fails: exit 1, ChainError
    ``unknown_key``."""
    home, run_id = finished_run
    other = tmp_path / "other.key"
    Signer.generate().save(other)
    proc = wakepoint_cli("ledger", "verify-chain", run_id, "--store", f"jsonl:{home}",
                         "--key", str(other), cwd=tmp_path)
    assert proc.returncode == 1
    assert "ChainError" in proc.stderr and "unknown_key" in proc.stderr


def test_verify_chain_reports_a_forged_record(finished_run: tuple[Path, str],
                                              tmp_path: Path) -> None:
    """A record appended with a signature that does not match its body is reported with its
    seq and ``bad_signature``: exit 1."""
    home, run_id = finished_run
    signer = Signer.load(home / "signer.key")
    store = JsonlStore(home)
    state = store.load(run_id)
    last = store.ledger(run_id)[-1]  # a real body to borrow digests from
    body = msgspec.json.decode(last.body)
    entry = Entry(kind="node.stepped", node=body["node"], state=body["state"])
    new_state, records = sign_entries(
        signer, store.log_id, state, [entry], state.updated_at,
        prev_seq=state.seq, prev_head=state.head,
    )
    forged = msgspec.structs.replace(records[0], sig=bytes(64))
    store.commit(run_id, state.seq, new_state, [forged])
    store.close()
    proc = wakepoint_cli("ledger", "verify-chain", run_id, "--store", f"jsonl:{home}",
                         cwd=tmp_path)
    assert proc.returncode == 1
    assert "bad_signature" in proc.stderr and "seq 4" in proc.stderr, proc.stderr


def test_verify_chain_unknown_run(finished_run: tuple[Path, str], tmp_path: Path) -> None:
    """An unknown run id is exit 1 naming the run."""
    home, _ = finished_run
    proc = wakepoint_cli("ledger", "verify-chain", "nope", "--store", f"jsonl:{home}",
                         cwd=tmp_path)
    assert proc.returncode == 1
    assert "RunNotFound" in proc.stderr and "nope" in proc.stderr


def test_verify_chain_creates_nothing(tmp_path: Path) -> None:
    """A store directory that does not exist is an error (exit 1), and is not created; a
    non-JSONL store needs ``--key``."""
    missing = tmp_path / "typo"
    proc = wakepoint_cli("ledger", "verify-chain", "r1", "--store", f"jsonl:{missing}",
                         cwd=tmp_path)
    assert proc.returncode == 1 and "no JSONL store" in proc.stderr
    assert not missing.exists()
    proc = wakepoint_cli("ledger", "verify-chain", "r1", "--store", "memory:", cwd=tmp_path)
    assert proc.returncode == 1 and "--key is required" in proc.stderr


def test_db_upgrade_creates_then_is_idempotent(tmp_path: Path) -> None:
    """``wakepoint db upgrade`` builds the schema on an empty SQLite file, a second run finds
    it at head and changes nothing, and a store then opens on it without ``upgrade=True``."""
    url = f"sqlite:///{tmp_path / 'wp.db'}"
    first = wakepoint_cli("db", "upgrade", url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "upgraded an empty database" in first.stdout
    before = (tmp_path / "wp.db").read_bytes()
    second = wakepoint_cli("db", "upgrade", url, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "already at" in second.stdout
    assert (tmp_path / "wp.db").read_bytes() == before
    rt = Runtime(url, [approval], signer=tmp_path / "k.key")
    assert rt.start(approval, run_id="r").status.value == "waiting"
    rt.close()


def test_db_upgrade_refuses_a_foreign_database(tmp_path: Path) -> None:
    """A database with someone else's tables is refused with exit 1 and a message saying so,
    and nothing is written to it."""
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("create table invoices (id integer)")
    before = path.read_bytes()
    result = wakepoint_cli("db", "upgrade", f"sqlite:///{path}", cwd=tmp_path)
    assert result.returncode == 1
    assert "not a wakepoint database" in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == before
