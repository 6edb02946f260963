"""Key rotation in the middle of runs, as the runtime will write it: the key file rotates at
a global position, the trust root moves with it, and each run still open is handed over by a
``key.rotated`` record signed by both keys at its next commit - possibly long after the
rotation position, while the old key is already revoked."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on it
from ledger_fixtures import Ledger
from msgspec.structs import replace
from wakepoint.ledger.logindex import read_leaves
from wakepoint.ledger.trust import TrustRoot
from wakepoint.ledger.verify import Report, verify


def rotated_ledger(path: Path, *, cosign: bool = True,
                   hand_over_b: bool = True) -> tuple[Ledger, TrustRoot, int]:
    """Runs ``a`` and ``b`` start under the first key; the key rotates at the current
    position; ``a`` is handed over and finished at once; then a third run ``c`` starts under
    the new key; only then is ``b`` handed over (its old key revoked for 5 records by now)
    and finished.  A checkpoint by the new key closes it."""
    led = Ledger(path)
    old = led.signer
    led.start("a")
    led.start("b")
    at = len(read_leaves(path))
    new = old.rotate()
    trust = led.trust().rotate(old.key_id, new, at)
    led.rotate("a", new, cosign=cosign, old_key=new.previous[0])
    led.finish("a")
    led.start("c")
    if hand_over_b:
        led.rotate("b", new, old_key=new.previous[0])
    led.finish("b")
    led.finish("c")
    led.cp_signer = new
    led.checkpoint()
    led.close()
    return led, trust, at


def first(report: Report) -> tuple[str, str, int | None]:
    assert report.error is not None
    return report.error.code, report.error.where, report.error.position


def test_rotation_mid_run_verifies(tmp_path: Path) -> None:
    """The whole ledger verifies against the rotated trust root (and its JSON form); both
    keys are counted; the old key signed the two hand-overs, which sit after the rotation
    position."""
    led, trust, at = rotated_ledger(tmp_path / "s")
    report = verify(led.path, TrustRoot.loads(trust.to_json()))
    assert report.ok, report.error
    assert report.records == len(read_leaves(led.path)) and report.uncovered == 0
    old_id, new_id = led.signer.key_id, next(k for k in trust.keys if k != led.signer.key_id)
    assert report.keys[old_id] == at + 2  # the records before ``at`` plus two hand-overs
    assert report.keys[new_id] == report.records - at - 2
    assert report.checkpoint is not None and report.checkpoint.size == report.records


def test_rotation_signed_by_one_key_is_unauthorized(tmp_path: Path) -> None:
    """The hand-over of ``a`` carries the old key's signature only."""
    led, trust, _ = rotated_ledger(tmp_path / "s", cosign=False)
    assert first(verify(led.path, trust))[:2] == ("rotation_unauthorized", "runs/a.jsonl:3#0")


def test_old_key_after_its_revocation_is_key_not_valid(tmp_path: Path) -> None:
    """Run ``b`` is never handed over: the runtime goes on with the new key, so ``b``'s next
    record changes key without a rotation - but a writer that kept signing ``b`` with the
    old key past the rotation position is caught at that record's global position."""
    led = Ledger(tmp_path / "s")
    old = led.signer
    led.start("b")
    at = len(read_leaves(led.path))
    new = old.rotate()
    trust = led.trust().rotate(old.key_id, new, at)
    led.finish("b")  # still the old key
    led.close()
    code, where, position = first(verify(led.path, trust))
    assert (code, where, position) == ("key_not_valid", "runs/b.jsonl:3#0", at)


def test_without_the_rotated_trust_root_the_new_key_is_unknown(tmp_path: Path) -> None:
    """An auditor whose trust root predates the rotation does not trust the new key."""
    led, _, _ = rotated_ledger(tmp_path / "s")
    assert first(verify(led.path, led.trust()))[:2] == ("unknown_key", "runs/a.jsonl:3#0")


def test_hand_over_before_the_new_key_is_valid(tmp_path: Path) -> None:
    """A trust root whose rotation position lies after the hand-over record: the new key
    co-signed before its range starts - ``key_not_valid`` at the hand-over."""
    led, trust, at = rotated_ledger(tmp_path / "s")
    late = TrustRoot([replace(k, valid_from=at + 1) if k.valid_from else k
                      for k in trust.keys.values()], log_id=trust.log_id)
    code, where, position = first(verify(led.path, late))
    assert (code, where, position) == ("key_not_valid", "runs/a.jsonl:3#0", at)


def test_checkpoints_across_a_rotation(tmp_path: Path) -> None:
    """A checkpoint of exactly the rotation position may be signed by the old key or by the
    new one (it is signed between the two positions); a larger one by the old key is
    ``key_not_valid``."""
    led = Ledger(tmp_path / "s")
    old = led.signer
    led.start("a")
    at = len(read_leaves(led.path))
    new = old.rotate()
    trust = led.trust().rotate(old.key_id, new, at)
    led.checkpoint()  # size ``at``, old key
    led.cp_signer = new
    led.checkpoint()  # size ``at``, new key: the same root
    assert verify(led.path, trust).ok
    led.rotate("a", new, old_key=new.previous[0])
    led.cp_signer = old
    led.checkpoint()  # size ``at + 1``, old key
    led.close()
    code, where, _ = first(verify(led.path, trust))
    index_lines = (led.path / "index.jsonl").read_bytes().count(b"\n")
    assert (code, where) == ("key_not_valid", f"index.jsonl:{index_lines}")
