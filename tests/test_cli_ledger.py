"""``wakepoint keys rotate``, ``ledger export`` and ``ledger checkpoint``, run as a user runs
them (``python -m wakepoint`` in a subprocess); and the progress bar of ``ledger verify``."""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on it
from ledger_fixtures import interleaved
from wakepoint import cli
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.logindex import read_leaves
from wakepoint.ledger.trust import TrustRoot
from wakepoint.ledger.verify import verify


def wakepoint_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wakepoint", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_keys_rotate_moves_key_file_and_trust_root(tmp_path: Path) -> None:
    """``keys rotate`` keeps the old key as previous (file stays 0600), and with ``--trust
    --at`` moves the trust root: new key valid from the position, old revoked there."""
    key = tmp_path / "k.key"
    assert wakepoint_cli("keys", "generate", str(key), cwd=tmp_path).returncode == 0
    old = Signer.load(key)
    trust = tmp_path / "trust.json"
    trust.write_bytes(TrustRoot.from_signers([old], log_id="L").to_json())
    proc = wakepoint_cli("keys", "rotate", str(key), "--trust", str(trust), "--at", "12",
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    new = Signer.load(key)
    assert new.key_id != old.key_id and [p.key_id for p in new.previous] == [old.key_id]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert f"{old.key_id} -> {new.key_id}" in proc.stdout
    root = TrustRoot.load(trust)
    assert root.keys[old.key_id].revoked_at == 12
    assert root.keys[new.key_id].valid_from == 12 and root.log_id == "L"
    again = wakepoint_cli("keys", "rotate", str(key), cwd=tmp_path)  # no trust root: key only
    assert again.returncode == 0, again.stderr
    assert [p.key_id for p in Signer.load(key).previous] == [new.key_id, old.key_id]
    assert TrustRoot.load(trust).keys == root.keys


def test_keys_rotate_finishes_a_rotation_whose_trust_root_was_not_written(
    tmp_path: Path,
) -> None:
    """The key file is replaced first; if the trust root's write then failed, running the
    same command again finishes that rotation (the trust root learns the current key) instead
    of rotating once more - before, the re-run rotated again and then refused, and no
    command could bring the trust root up to date."""
    key = tmp_path / "k.key"
    first = Signer.generate()
    first.save(key)
    trust = tmp_path / "trust.json"
    trust.write_bytes(TrustRoot.from_signers([first], log_id="L").to_json())
    current = first.rotate()
    current.save(key, replace=True)  # the rotation whose trust root write failed
    proc = wakepoint_cli("keys", "rotate", str(key), "--trust", str(trust), "--at", "20",
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "finished the rotation" in proc.stdout
    assert Signer.load(key).key_id == current.key_id  # not rotated again
    root = TrustRoot.load(trust)
    assert root.keys[current.key_id].valid_from == 20
    assert root.keys[first.key_id].revoked_at == 20


def test_keys_rotate_errors(tmp_path: Path) -> None:
    """``--trust`` without ``--at`` (or a negative one) is a usage error; a trust root that
    does not hold the key is exit 2 and leaves the key file as it was; no key file is 1."""
    key = tmp_path / "k.key"
    Signer.from_seed(b"\x01" * 32).save(key)
    before = key.read_bytes()
    trust = tmp_path / "trust.json"
    trust.write_bytes(TrustRoot.from_signers([Signer.from_seed(b"\x02" * 32)]).to_json())
    one_line_error(wakepoint_cli("keys", "rotate", str(key), "--trust", str(trust),
                                 cwd=tmp_path), 2)
    assert wakepoint_cli("keys", "rotate", str(key), "--at", "-1",
                         cwd=tmp_path).returncode == 2
    proc = wakepoint_cli("keys", "rotate", str(key), "--trust", str(trust), "--at", "3",
                         cwd=tmp_path)
    one_line_error(proc, 2)
    assert "does not hold" in proc.stderr and key.read_bytes() == before
    one_line_error(wakepoint_cli("keys", "rotate", str(tmp_path / "none.key"), cwd=tmp_path), 1)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    led = interleaved(tmp_path / "store", 2)
    led.close()
    (tmp_path / "trust.json").write_bytes(led.trust().to_json())
    return led.path


def test_ledger_export_then_verify(store: Path, tmp_path: Path) -> None:
    """``ledger export`` writes a file ``ledger verify`` accepts with the same counts; it
    never replaces a file; a missing store is exit 1."""
    proc = wakepoint_cli("ledger", "export", "--store", f"jsonl:{store}", "out.export",
                         cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok: 12 records -> out.export")
    verified = wakepoint_cli("ledger", "verify", "out.export", "--trust", "trust.json",
                             "--json", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout
    report = json.loads(verified.stdout)
    assert (report["ok"], report["records"], report["runs"], report["uncovered"]) == (
        True, 12, 2, 0)
    one_line_error(wakepoint_cli("ledger", "export", "--store", str(store), "out.export",
                                 cwd=tmp_path), 1)
    one_line_error(wakepoint_cli("ledger", "export", "--store", "jsonl:nowhere", "x.export",
                                 cwd=tmp_path), 1)
    assert not (tmp_path / "x.export").exists()


def test_ledger_checkpoint_print_export_anchor(store: Path, tmp_path: Path) -> None:
    """``ledger checkpoint`` prints the latest stored checkpoint; ``--export`` writes it as
    an anchor ``ledger verify --anchor`` reads; it refuses to move the anchor back."""
    proc = wakepoint_cli("ledger", "checkpoint", "--store", str(store), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == "12" and proc.stdout.endswith("\n")
    exported = wakepoint_cli("ledger", "checkpoint", "--store", str(store), "--export",
                             "anchor.txt", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "anchor.txt").read_text() == proc.stdout
    ok = wakepoint_cli("ledger", "verify", str(store), "--trust", "trust.json", "--anchor",
                       "anchor.txt", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    # The auditor's anchor is newer than the store's latest checkpoint: refused, unchanged.
    newer = interleaved(tmp_path / "newer", 3)
    newer.close()
    held = tmp_path / "held.txt"
    wakepoint_cli("ledger", "checkpoint", "--store", str(newer.path), "--export", str(held),
                  cwd=tmp_path)
    text = held.read_text()
    back = wakepoint_cli("ledger", "checkpoint", "--store", str(store), "--export", str(held),
                         cwd=tmp_path)
    one_line_error(back, 1)
    assert "rollback" in back.stderr and held.read_text() == text


def _index_store(root: Path, leaves: list[bytes], signer: Signer) -> None:
    """A bare JSONL store whose index lists ``leaves`` and a checkpoint of all of them."""
    from wakepoint.ledger.logindex import INDEX_FILE, append_leaves, make_checkpoint

    (root / "runs").mkdir(parents=True)
    for leaf in leaves:
        append_leaves(root, "r", 0, [leaf.hex()])
    with open(root / INDEX_FILE, "ab") as f:
        f.write(json.dumps({"checkpoint": make_checkpoint("L", leaves, signer)}).encode()
                + b"\n")


def test_ledger_checkpoint_export_refuses_a_larger_checkpoint_of_another_history(
    tmp_path: Path,
) -> None:
    """A larger checkpoint replaces the anchor only if it extends it: a store whose record 2
    was rewritten and that grew past the anchor is a fork, refused (before: the anchor
    moved to it); one that only grew is accepted."""
    import hashlib

    from wakepoint.ledger.logindex import make_checkpoint

    signer = Signer.generate()
    h = [hashlib.sha256(x).digest() for x in (b"a", b"b", b"c", b"d", b"X")]
    anchor = tmp_path / "anchor.txt"
    held = make_checkpoint("L", h[:3], signer)
    anchor.write_text(held)
    _index_store(tmp_path / "fork", [h[0], h[4], h[2], h[3]], signer)
    proc = wakepoint_cli("ledger", "checkpoint", "--store", f"jsonl:{tmp_path / 'fork'}",
                         "--export", str(anchor), cwd=tmp_path)
    one_line_error(proc, 1)
    assert "fork" in proc.stderr and anchor.read_text() == held
    _index_store(tmp_path / "grown", h[:4], signer)
    proc = wakepoint_cli("ledger", "checkpoint", "--store", f"jsonl:{tmp_path / 'grown'}",
                         "--export", str(anchor), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert anchor.read_text().splitlines()[1] == "4"


def test_ledger_checkpoint_none_stored(tmp_path: Path) -> None:
    """A store without checkpoints: exit 1 with one clear line."""
    led = interleaved(tmp_path / "s", 1, checkpoint=False)
    led.close()
    proc = wakepoint_cli("ledger", "checkpoint", "--store", f"jsonl:{led.path}", cwd=tmp_path)
    one_line_error(proc, 1)
    assert "no signed checkpoint" in proc.stderr


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_big_ledgers(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """The bar draws on a terminal once the threshold of records is passed, erases itself at
    the end, and never draws on a pipe; ``verify`` reports progress up to its total."""
    bar = cli._Progress(Tty())
    bar(cli.PROGRESS_MIN_RECORDS - 1, 10, 100)
    assert bar.stream.getvalue() == ""
    bar(cli.PROGRESS_MIN_RECORDS, 50, 100)
    assert "verifying [" in bar.stream.getvalue() and " 50%" in bar.stream.getvalue()
    bar.done()
    assert bar.stream.getvalue().endswith("\r\x1b[2K")
    pipe = cli._Progress(io.StringIO())
    pipe(10 ** 9, 50, 100)
    pipe.done()
    assert pipe.stream.getvalue() == ""
    led = interleaved(tmp_path / "s", 3)
    led.close()
    seen: list[tuple[int, int, int]] = []
    assert verify(led.path, led.trust(), progress=lambda *a: seen.append(a)).ok
    assert seen[-1][0] == len(read_leaves(led.path)) and seen[-1][1] == seen[-1][2]


def test_sqlite_store_export_and_checkpoint(tmp_path: Path) -> None:
    """On a SQLite store: ``ledger checkpoint`` prints the latest stored checkpoint, which
    verifies the export as an anchor; a missing database file is exit 1 and is not created."""
    from ledger_fixtures import workflow
    from wakepoint import Runtime
    from wakepoint.stores import open_store

    url = f"sqlite:///{tmp_path / 'w.db'}"
    store = open_store(url, durability="none", upgrade=True)
    signer = Signer.from_seed(b"\x03" * 32)
    with Runtime(store, workflows=[workflow()], signer=signer) as rt:
        rt.start("audit", 1, run_id="a")
        rt.send_event("go:a")
    store = open_store(url, durability="none")
    note = store.checkpoint(signer)  # type: ignore[attr-defined]
    store.close()
    (tmp_path / "trust.json").write_bytes(
        TrustRoot.from_signers([signer], log_id=note.split("\n")[0].removeprefix(
            "wakepoint/")).to_json())
    printed = wakepoint_cli("ledger", "checkpoint", "--store", url, cwd=tmp_path)
    assert printed.returncode == 0 and printed.stdout.split("\n")[1] == note.split("\n")[1]
    (tmp_path / "anchor.txt").write_text(printed.stdout)
    assert wakepoint_cli("ledger", "export", "--store", url, "w.export",
                         cwd=tmp_path).returncode == 0
    ok = wakepoint_cli("ledger", "verify", "w.export", "--trust", "trust.json", "--anchor",
                       "anchor.txt", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout
    missing = wakepoint_cli("ledger", "checkpoint", "--store",
                            f"sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path)
    one_line_error(missing, 1)
    assert not (tmp_path / "none.db").exists()
