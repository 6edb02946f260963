"""Key files with a rotation history: ``Signer.rotate``, ``previous``, saving and loading,
old key files, damaged histories; and ``TrustRoot.rotate``."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from wakepoint.ledger.keys import KeyFileError, Signer
from wakepoint.ledger.trust import TrustError, TrustRoot

OLD = Signer.from_seed(b"\x01" * 32)


def test_a_key_never_rotated_has_no_previous(tmp_path: Path) -> None:
    """A fresh key and a key file written before rotation existed (no ``previous`` field)
    load with ``previous == ()``."""
    path = tmp_path / "k.key"
    OLD.save(path)
    assert "previous" not in json.loads(path.read_text())
    assert Signer.load(path).previous == ()
    assert Signer.generate().previous == ()


def test_rotate_keeps_history_most_recent_first(tmp_path: Path) -> None:
    """Two rotations: the current key is new, ``previous`` lists the second key then the
    first, each with its secret (it can still sign) and no nested history; the file
    round-trips and stays owner-only."""
    second = OLD.rotate()
    third = second.rotate()
    assert third.key_id not in (OLD.key_id, second.key_id)
    assert [p.key_id for p in third.previous] == [second.key_id, OLD.key_id]
    assert all(p.previous == () for p in third.previous)
    assert third.previous[1].sign(b"m") == OLD.sign(b"m")
    path = tmp_path / "k.key"
    second.save(path)
    with pytest.raises(FileExistsError):
        third.save(path)
    third.save(path, replace=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Signer.load(path)
    assert loaded.key_id == third.key_id
    assert [p.key_id for p in loaded.previous] == [second.key_id, OLD.key_id]
    assert loaded.find(OLD.key_id) is not None and loaded.find("ed25519:nope") is None
    assert [f.name for f in tmp_path.iterdir()] == ["k.key"]  # no temporary file left


@pytest.mark.parametrize("damage", [
    lambda doc: doc.update(previous={"not": "a list"}),
    lambda doc: doc["previous"][0].update(key_id="ed25519:0000000000000000"),
    lambda doc: doc["previous"][0].pop("secret"),
    lambda doc: doc["previous"].append(doc["previous"][0]),
    lambda doc: doc["previous"].append("x"),
])
def test_a_damaged_history_is_a_key_file_error(tmp_path: Path, damage) -> None:  # type: ignore[no-untyped-def]
    """A history that is not a list, a key whose id does not match, a missing secret, a
    key listed twice, an entry that is not an object: ``KeyFileError`` naming the file."""
    path = tmp_path / "k.key"
    OLD.rotate().save(path)
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match=r"k\.key"):
        Signer.load(path)


def test_a_key_file_that_is_not_an_object(tmp_path: Path) -> None:
    """JSON that is not an object is not a key file."""
    path = tmp_path / "k.key"
    path.write_text("[1, 2]")
    with pytest.raises(KeyFileError, match="not an ed25519 key file"):
        Signer.load(path)


def test_trust_root_rotation() -> None:
    """The new key gets the old key's roles from the position on; the old one is revoked
    there; bad rotations are refused."""
    new = OLD.rotate()
    root = TrustRoot.from_signers([OLD], log_id="L", roles=("record",))
    rotated = root.rotate(OLD.key_id, new, 7)
    assert rotated.keys[OLD.key_id].revoked_at == 7
    added = rotated.keys[new.key_id]
    assert (added.valid_from, added.roles, added.revoked_at) == (7, ("record",), None)
    assert rotated.log_id == "L"
    assert TrustRoot.loads(rotated.to_json()).keys == rotated.keys
    assert added.invalid_at(6) is not None and added.invalid_at(7) is None
    with pytest.raises(TrustError, match="negative"):
        root.rotate(OLD.key_id, new, -1)
    with pytest.raises(TrustError, match="does not hold"):
        root.rotate(new.key_id, OLD, 3)
    with pytest.raises(TrustError, match="already in the trust root"):
        rotated.rotate(OLD.key_id, new, 9)
    with pytest.raises(TrustError, match="before"):
        rotated.rotate(new.key_id, new.rotate(), 3)
    with pytest.raises(TrustError, match="already revoked"):
        rotated.rotate(OLD.key_id, new.rotate(), 9)


def test_a_key_file_is_written_whole_even_through_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.write`` may write less than asked: the rest follows (one call used to be all),
    so the key file is never torn."""
    import os

    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:7])))
    signer = Signer.generate()
    signer.save(tmp_path / "k.key")
    monkeypatch.undo()
    assert Signer.load(tmp_path / "k.key").key_id == signer.key_id


def test_a_failed_key_write_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (a full disk) leaves neither the key file nor its temporary file,
    which would hold part of a secret key."""
    import errno
    import os

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        Signer.generate().save(tmp_path / "k.key")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
