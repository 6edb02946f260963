"""The ``wakepoint`` command, run as a user runs it: ``python -m wakepoint`` in a subprocess.

Covered: ``--version``, ``ledger verify``, ``ledger verify-chain``, ``keys generate``,
``keys trust``, ``worker``, ``db upgrade``, ``run``, ``runs list|show|timeline``, ``respond``,
``send`` and ``cancel``; exit codes are 0 verified / done, 1 not verified
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
    """A JSONL store (the embedded default layout) holding one completed run of 5 records
    (four transitions and the seal)."""
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
    """A good chain verifies with the store's own key file: ``ok: 5 records`` (four
    transitions and the seal), exit 0."""
    home, run_id = finished_run
    proc = wakepoint_cli("ledger", "verify-chain", run_id, "--store", f"jsonl:{home}",
                         cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok: 5 records"), proc.stderr


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
    last = store.ledger(run_id)[-2]  # a real node record (before the seal) to borrow from
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
    assert "bad_signature" in proc.stderr and "seq 5" in proc.stderr, proc.stderr


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
    wrote: exit 0, an ``OK`` summary counting the 5 records (the last is ``run.sealed``)
    under the store's key."""
    home, trust = trusted_run
    doc = json.loads(trust.read_text())
    key_id = Signer.load(home / "signer.key").key_id
    assert doc["log_id"] == JsonlStore(home).log_id
    assert [k["key_id"] for k in doc["keys"]] == [key_id]
    proc = wakepoint_cli("ledger", "verify", str(home), "--trust", str(trust), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"OK: {home} (full mode, 5 records in 1 runs")
    assert f"{key_id}  5" in proc.stdout
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
    assert (report["mode"], report["records"], report["runs"]) == ("chain", 5, 1)


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


# --- run, runs, respond, send, cancel: the operator's terminal session --------------------

SESSION_APP = """
from wakepoint import RunView, Workflow, ask_user, done, wait_event

approval = Workflow("session-approval")


@approval.node(start=True)
def ask(run: RunView):
    return ask_user("Ship release?", choices=["ship", "hold"], into="answer", then="finish")


@approval.node
def finish(run: RunView):
    return done({"answer": run.vars["answer"], "input": run.input})


parcel = Workflow("session-parcel")


@parcel.node(start=True)
def park(run: RunView):
    return wait_event("parcel-arrived", into="parcel", then="unpack")


@parcel.node
def unpack(run: RunView):
    return done(run.vars["parcel"])


both = [approval, parcel]
"""


@pytest.fixture
def session(tmp_path: Path) -> Path:
    """A directory holding ``session_app.py``: an ask_user workflow and an event workflow."""
    (tmp_path / "session_app.py").write_text(textwrap.dedent(SESSION_APP))
    return tmp_path


def test_terminal_session_pause_list_respond_verify(session: Path) -> None:
    """The operator's story on the default store (``./.wakepoint``): ``run`` pauses for a
    person; ``runs list --status waiting`` shows it; ``runs show`` shows prompt and choices; a
    wrong answer is exit 1 naming the choices; the right one completes the run; ``runs
    timeline`` lists the records in order with their kinds; ``ledger verify-chain`` is ok."""
    run = wakepoint_cli("run", "session_app:approval", "--input", '{"ticket": 7}',
                        "--run-id", "rel-1", cwd=session)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "run rel-1: waiting"
    assert "Ship release?" in run.stdout and "ship, hold" in run.stdout
    assert (session / ".wakepoint").is_dir()

    listed = wakepoint_cli("runs", "list", "--status", "waiting", cwd=session)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["RUN", "ID", "WORKFLOW"]
    assert len(rows) == 1
    assert rows[0].split()[:5] == ["rel-1", "session-approval", "waiting", "ask", "2"]
    assert "user:rel-1:" in rows[0]
    assert wakepoint_cli("runs", "list", "--status", "completed",
                         cwd=session).stdout.splitlines()[1:] == []

    shown = wakepoint_cli("runs", "show", "rel-1", cwd=session)
    assert shown.returncode == 0, shown.stderr
    assert "Ship release?" in shown.stdout and "ship, hold" in shown.stdout
    assert "waiting" in shown.stdout

    wrong = wakepoint_cli("respond", "rel-1", "maybe", "--app", "session_app:both",
                          cwd=session)
    assert_one_line_error(wrong, 1)
    assert "InvalidAnswer" in wrong.stderr and "'ship', 'hold'" in wrong.stderr

    right = wakepoint_cli("respond", "rel-1", "ship", "--app", "session_app:both",
                          cwd=session)
    assert right.returncode == 0, right.stderr
    assert right.stdout.splitlines()[0] == "run rel-1: completed"
    assert '"answer":"ship"' in right.stdout and '"ticket":7' in right.stdout

    again = wakepoint_cli("respond", "rel-1", "ship", "--app", "session_app:both",
                          cwd=session)
    assert_one_line_error(again, 1)
    assert "RunFinished" in again.stderr

    timeline = wakepoint_cli("runs", "timeline", "rel-1", cwd=session)
    assert timeline.returncode == 0, timeline.stderr
    lines = timeline.stdout.splitlines()
    assert lines[0].split()[:3] == ["SEQ", "TIME", "KIND"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2", "3", "4"]
    kinds = [line.split()[3] for line in lines[1:]]
    assert kinds == ["run.started", "effect.requested", "wait.resumed", "run.completed",
                     "run.sealed"]
    key_id = Signer.load(session / ".wakepoint" / "signer.key").key_id
    assert all(line.endswith(key_id) for line in lines[1:])

    verified = wakepoint_cli("ledger", "verify-chain", "rel-1", "--store", "jsonl:.wakepoint",
                             cwd=session)
    assert (verified.returncode, verified.stdout.strip()) == (0, "ok: 5 records")


def test_send_resumes_an_event_waiting_run(session: Path) -> None:
    """``send KEY PAYLOAD_JSON`` resumes the run waiting on the event and prints its result;
    a second send finds no run waiting (exit 1, one line); bad JSON payload is exit 2."""
    store = f"jsonl:{session / 'store'}"
    run = wakepoint_cli("run", "session_app:parcel", "--run-id", "p1", "--store", store,
                        cwd=session)
    assert run.returncode == 0, run.stderr
    assert "waiting on event:parcel-arrived" in run.stdout
    waiting = wakepoint_cli("runs", "list", "--waiting-on", "parcel-arrived", "--store", store,
                            cwd=session)
    assert [row.split()[0] for row in waiting.stdout.splitlines()[1:]] == ["p1"]
    bad = wakepoint_cli("send", "parcel-arrived", "{nope", "--app", "session_app:both",
                        "--store", store, cwd=session)
    assert_one_line_error(bad, 2)
    sent = wakepoint_cli("send", "parcel-arrived", '{"box": 3}', "--app", "session_app:both",
                         "--store", store, cwd=session)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.splitlines() == ["run p1: completed", 'output: {"box":3}']
    none = wakepoint_cli("send", "parcel-arrived", "1", "--app", "session_app:both",
                         "--store", store, cwd=session)
    assert_one_line_error(none, 1)
    assert "parcel-arrived" in none.stderr


def test_cancel_a_waiting_run(session: Path) -> None:
    """``cancel`` with a reason ends a waiting run as cancelled (shown by ``runs show``); a
    second cancel is exit 1 (``RunFinished``)."""
    store = f"jsonl:{session / 'store'}"
    assert wakepoint_cli("run", "session_app:parcel", "--run-id", "c1", "--store", store,
                         cwd=session).returncode == 0
    cancelled = wakepoint_cli("cancel", "c1", "--reason", "lost in transit", "--no-cascade",
                              "--app", "session_app:both", "--store", store, cwd=session)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.splitlines()[0] == "run c1: cancelled"
    assert "lost in transit" in cancelled.stdout
    shown = wakepoint_cli("runs", "show", "c1", "--store", store, cwd=session)
    assert "cancelled" in shown.stdout and "lost in transit" in shown.stdout
    again = wakepoint_cli("cancel", "c1", "--app", "session_app:both", "--store", store,
                          cwd=session)
    assert_one_line_error(again, 1)
    assert "RunFinished" in again.stderr


def test_json_outputs_parse(session: Path) -> None:
    """With ``--json`` every command prints one JSON document on stdout (no log lines mixed
    in): ``run`` and ``respond`` a run state, ``runs list`` a list of them, ``runs show`` one,
    ``runs timeline`` the records with seq, kind and key id."""
    store = f"jsonl:{session / 'store'}"
    run = wakepoint_cli("run", "session_app:approval", "--run-id", "j1", "--store", store,
                        "--json", cwd=session)
    assert run.returncode == 0, run.stderr
    state = json.loads(run.stdout)
    assert (state["run_id"], state["status"]) == ("j1", "waiting")
    assert state["wait"]["choices"] == ["ship", "hold"]
    listed = json.loads(wakepoint_cli("runs", "list", "--store", store, "--json",
                                      cwd=session).stdout)
    assert [s["run_id"] for s in listed] == ["j1"]
    shown = json.loads(wakepoint_cli("runs", "show", "j1", "--store", store, "--json",
                                     cwd=session).stdout)
    assert shown["wait"]["prompt"] == "Ship release?"
    done_state = json.loads(wakepoint_cli("respond", "j1", "hold", "--app",
                                          "session_app:approval", "--store", store, "--json",
                                          cwd=session).stdout)
    assert done_state["status"] == "completed"
    assert done_state["output"] == {"answer": "hold", "input": None}
    records = json.loads(wakepoint_cli("runs", "timeline", "j1", "--store", store, "--json",
                                       cwd=session).stdout)
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["kind"] == "run.started" and records[-1]["kind"] == "run.sealed"
    assert all(r["key_id"].startswith("ed25519:") for r in records)


def test_unknown_run_and_missing_store(session: Path) -> None:
    """An unknown run id is exit 1 with one line naming it (``runs show``, ``runs timeline``,
    ``respond``, ``cancel``); a JSONL store that does not exist is exit 1 and is not created;
    bad ``--input`` JSON and a module holding two workflows are usage errors (exit 2)."""
    store = f"jsonl:{session / 'store'}"
    assert wakepoint_cli("run", "session_app:parcel", "--store", store,
                         cwd=session).returncode == 0
    for args in (("runs", "show", "nope"), ("runs", "timeline", "nope"),
                 ("respond", "nope", "ship", "--app", "session_app:both"),
                 ("cancel", "nope", "--app", "session_app:both")):
        proc = wakepoint_cli(*args, "--store", store, cwd=session)
        assert_one_line_error(proc, 1)
        assert "RunNotFound" in proc.stderr and "nope" in proc.stderr
    for args in (("runs", "list"), ("runs", "show", "x"),
                 ("respond", "x", "y", "--app", "session_app:both")):
        proc = wakepoint_cli(*args, cwd=session)  # the default store ./.wakepoint
        assert_one_line_error(proc, 1)
        assert "no JSONL store" in proc.stderr
    assert not (session / ".wakepoint").exists()
    plain = session / "plain"  # a directory that is not a store is not made one
    plain.mkdir()
    proc = wakepoint_cli("runs", "list", "--store", f"jsonl:{plain}", cwd=session)
    assert_one_line_error(proc, 1)
    assert "no JSONL store" in proc.stderr and list(plain.iterdir()) == []
    bad_input = wakepoint_cli("run", "session_app:parcel", "--input", "{x", "--store", store,
                              cwd=session)
    assert_one_line_error(bad_input, 2)
    for not_json in ('{"x": NaN}', "Infinity", '[-Infinity]'):  # Python's json takes these
        proc = wakepoint_cli("run", "session_app:parcel", "--input", not_json, "--store",
                             store, cwd=session)
        assert_one_line_error(proc, 2)
        assert "is not a JSON value" in proc.stderr
    two = wakepoint_cli("run", "session_app:both", "--store", store, cwd=session)
    assert_one_line_error(two, 2)
    assert "exactly one" in two.stderr
