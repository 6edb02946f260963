"""The ``wakepoint`` command, run as a user runs it: ``python -m wakepoint`` in a subprocess.

Covered: ``--version``, ``ledger verify``, ``ledger verify-chain``, ``keys generate``,
``keys trust``, ``worker`` and ``db upgrade``; exit codes are 0 verified / done, 1 not verified
or unreadable, 2 usage error.  Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import stat
import subprocess
import sys
import textwrap
import time
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
                                  ("nonsense",), ("ledger", "verify", "x"), ("keys",),
                                  ("keys", "trust", "--key", "k"),
                                  ("keys", "trust", "--key", "k", "--store", "s", "--log-id", "i"),
                                  ("worker", "--store", "memory:"),
                                  ("worker", "--store", "memory:", "--app", "m:a",
                                   "--concurrency", "0")])
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


# --- keys, ledger verify -----------------------------------------------------------------


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ")


def test_keys_generate_owner_only_and_never_overwrites(tmp_path: Path) -> None:
    """``keys generate`` writes a loadable key file with mode 0600 and prints its key id; a
    second call on the same path is exit 1 with one line, and the first key is untouched."""
    path = tmp_path / "keys" / "a.key"
    proc = wakepoint_cli("keys", "generate", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert proc.stdout.strip() == Signer.load(path).key_id
    before = path.read_bytes()
    again = wakepoint_cli("keys", "generate", str(path), cwd=tmp_path)
    assert_one_line_error(again, 1)
    assert "already exists" in again.stderr
    assert path.read_bytes() == before


@pytest.fixture
def trusted_run(finished_run: tuple[Path, str], tmp_path: Path) -> tuple[Path, Path]:
    """The finished run's store and a trust root for it exported by ``keys trust --store``."""
    home, _ = finished_run
    trust = tmp_path / "trust.json"
    proc = wakepoint_cli("keys", "trust", "--key", str(home / "signer.key"),
                         "--store", f"jsonl:{home}", "--out", str(trust), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return home, trust


def test_keys_trust_then_ledger_verify_ok(trusted_run: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    """A trust root exported from the store's key and log id verifies the ledger the runtime
    wrote: exit 0, an ``OK`` summary counting the 4 records under the store's key, even though
    the finished run has no ``run.sealed`` record (the CLI does not require seals yet)."""
    home, trust = trusted_run
    doc = json.loads(trust.read_text())
    key_id = Signer.load(home / "signer.key").key_id
    assert doc["log_id"] == JsonlStore(home).log_id
    assert [k["key_id"] for k in doc["keys"]] == [key_id]
    proc = wakepoint_cli("ledger", "verify", str(home), "--trust", str(trust), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"OK: {home} (full mode, 4 records in 1 runs")
    assert f"{key_id}  4" in proc.stdout
    # The same export to standard output, with the log id given instead of read.
    printed = wakepoint_cli("keys", "trust", "--key", str(home / "signer.key"),
                            "--log-id", doc["log_id"], cwd=tmp_path)
    assert printed.returncode == 0 and json.loads(printed.stdout) == doc


def test_ledger_verify_json(trusted_run: tuple[Path, Path], tmp_path: Path) -> None:
    """``--json`` prints the full report as one JSON document with ``"ok": true``;
    ``--mode chain`` is reported as such; ``jsonl:PATH`` is accepted as the source."""
    home, trust = trusted_run
    proc = wakepoint_cli("ledger", "verify", f"jsonl:{home}", "--trust", str(trust), "--json",
                         "--mode", "chain", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["error"] is None
    assert (report["mode"], report["records"], report["runs"]) == ("chain", 4, 1)


def test_ledger_verify_tampered_payload(trusted_run: tuple[Path, Path], tmp_path: Path) -> None:
    """One base64 character of a stored record body flipped: exit 1, ``FAILED`` and the first
    error is ``bad_signature`` at that record (line 1, record 0); ``--json`` says the same."""
    home, trust = trusted_run
    run_file = home / "runs" / "r1.jsonl"
    data = run_file.read_bytes()
    at = data.index(b'"payload":"') + len(b'"payload":"') + 20  # well inside the base64
    flipped = b"B" if data[at:at + 1] != b"B" else b"C"
    run_file.write_bytes(data[:at] + flipped + data[at + 1:])
    proc = wakepoint_cli("ledger", "verify", str(home), "--trust", str(trust), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("FAILED: ")
    assert "first error: bad_signature at runs/r1.jsonl:1#0" in proc.stdout
    as_json = wakepoint_cli("ledger", "verify", str(home), "--trust", str(trust), "--json",
                            cwd=tmp_path)
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert (report["error"]["code"], report["error"]["line"]) == ("bad_signature", 1)


def test_ledger_verify_usage_errors(trusted_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Exit 2 with one line: a trust root that is not one, a missing trust or anchor file, a
    source that is not a ledger; and a SQLite URL naming no file is refused, not created."""
    home, trust = trusted_run
    bad = tmp_path / "bad.json"
    bad.write_text('{"v": 1, "keys": [], "extra": true}')
    cases: list[tuple[str, ...]] = [
        (str(home), "--trust", str(bad)),
        (str(home), "--trust", str(tmp_path / "missing.json")),
        (str(home), "--trust", str(trust), "--anchor", str(tmp_path / "missing.txt")),
        (str(tmp_path), "--trust", str(trust)),
        (f"sqlite:///{tmp_path / 'none.db'}", "--trust", str(trust)),
    ]
    for case in cases:
        assert_one_line_error(wakepoint_cli("ledger", "verify", *case, cwd=tmp_path), 2)
    assert not (tmp_path / "none.db").exists()


def test_keys_trust_errors_create_nothing(tmp_path: Path) -> None:
    """``keys trust`` on a JSONL store that does not exist, or with a missing key file, is
    exit 1 with one line and creates no store; ``--out`` never replaces an existing file."""
    key = tmp_path / "a.key"
    Signer.generate().save(key)
    missing = tmp_path / "typo"
    proc = wakepoint_cli("keys", "trust", "--key", str(key), "--store", f"jsonl:{missing}",
                         cwd=tmp_path)
    assert_one_line_error(proc, 1)
    assert "no JSONL store" in proc.stderr and not missing.exists()
    proc = wakepoint_cli("keys", "trust", "--key", str(tmp_path / "nokey"), "--log-id", "x",
                         cwd=tmp_path)
    assert_one_line_error(proc, 1)
    out = tmp_path / "trust.json"
    out.write_text("keep")
    proc = wakepoint_cli("keys", "trust", "--key", str(key), "--log-id", "x", "--out",
                         str(out), cwd=tmp_path)
    assert_one_line_error(proc, 1)
    assert out.read_text() == "keep"


# --- worker ------------------------------------------------------------------------------


@pytest.mark.parametrize("app", ["nosuch:thing", "os:no_such_attribute", "no_colon"])
def test_worker_bad_app_exit_2(tmp_path: Path, app: str) -> None:
    """An ``--app`` that cannot be imported, has no such attribute, or is not
    module:attribute is exit 2 with one line and no traceback; no store is created."""
    proc = wakepoint_cli("worker", "--store", f"jsonl:{tmp_path / 's'}", "--app", app,
                         cwd=tmp_path)
    assert_one_line_error(proc, 2)
    assert not (tmp_path / "s").exists()


APP_SOURCE = """
from wakepoint import RunView, Workflow, done, wait_until

flow = Workflow("cli-timer")


@flow.node(start=True)
def nap(run: RunView):
    return wait_until(0.3, then="finish")


@flow.node
def finish(run: RunView):
    return done("woke")
"""


def test_worker_completes_a_timer_run_and_stops_on_sigterm(tmp_path: Path) -> None:
    """A run started (and parked on a 0.3 s timer) before any worker exists is completed by
    ``wakepoint worker --app module:attribute`` on the JSONL store; the ledger it leaves then
    verifies with ``ledger verify``; SIGTERM stops the worker with exit 0."""
    (tmp_path / "cli_timer_app.py").write_text(textwrap.dedent(APP_SOURCE))
    spec = importlib.util.spec_from_file_location("cli_timer_app", tmp_path / "cli_timer_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    store = tmp_path / "store"
    with Runtime(f"jsonl:{store}", [module.flow]) as rt:
        assert rt.start(module.flow, run_id="t1").status.value == "waiting"
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "wakepoint", "worker", "--store", f"jsonl:{store}",
         "--app", "cli_timer_app:flow", "--concurrency", "2"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline and worker.poll() is None:
            with JsonlStore(store) as reader:
                state = reader.load("t1")
            status = state.status.value
            if status == "completed":
                break
            time.sleep(0.1)
        assert status == "completed", (status, (tmp_path / "worker.log").read_text()[-2000:])
        assert state.output == "woke"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0, (tmp_path / "worker.log").read_text()[-2000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "worker.log").read_text()
    trust = tmp_path / "trust.json"
    exported = wakepoint_cli("keys", "trust", "--key", str(store / "signer.key"),
                             "--store", f"jsonl:{store}", "--out", str(trust), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    proc = wakepoint_cli("ledger", "verify", str(store), "--trust", str(trust), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
