"""RFC 6962 / 9162 Merkle trees, C2SP checkpoints and trust roots: known answers and exhaustive
proof checks for every tree size 1-64."""

from __future__ import annotations

import base64
import hashlib

import pytest
from wakepoint.ledger import merkle
from wakepoint.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    note_key_hash,
    open_checkpoint,
    origin_of,
    sign_checkpoint,
)
from wakepoint.ledger.keys import Signer
from wakepoint.ledger.trust import TrustError, TrustRoot

# The certificate-transparency / transparency-dev test inputs and their published answers.
LEAVES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43",
          b"\x50\x51\x52\x53\x54\x55\x56\x57",
          b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f"]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = {  # (leaf index, tree size) -> audit path
    (0, 8): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (5, 8): ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"],
}
CONSISTENCY = {  # (old size, new size) -> proof
    (1, 1): [],
    (1, 8): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (6, 8): ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
    (2, 5): ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"],
}
HASHED = [merkle.leaf_hash(x) for x in LEAVES]


def reference_mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 §2.1 written as literally as possible (recursive, over leaf hashes)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(reference_mth(leaves[:k]), reference_mth(leaves[k:]))


def test_known_roots() -> None:
    """MTH of the first n test leaves is the published root for n = 0..8."""
    assert merkle.root([]).hex() == hashlib.sha256(b"").hexdigest()
    for n, want in enumerate(ROOTS, start=1):
        assert merkle.root(HASHED[:n]).hex() == want


def test_known_inclusion_proofs() -> None:
    """Generated audit paths equal the published ones, and verify."""
    for (index, size), path in INCLUSION.items():
        proof = merkle.inclusion_proof(HASHED[:size], index)
        assert [p.hex() for p in proof] == path
        assert merkle.verify_inclusion(index, size, HASHED[index], proof,
                                       bytes.fromhex(ROOTS[size - 1]))


def test_known_consistency_proofs() -> None:
    """Generated consistency proofs equal the published ones, and verify."""
    for (old, new), path in CONSISTENCY.items():
        proof = merkle.consistency_proof(HASHED[:new], old)
        assert [p.hex() for p in proof] == path
        assert merkle.verify_consistency(old, new, bytes.fromhex(ROOTS[old - 1]),
                                         bytes.fromhex(ROOTS[new - 1]), proof)


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


def test_frontier_matches_reference_for_every_size() -> None:
    """The streaming Frontier gives the literal RFC MTH after every append up to 64 leaves."""
    leaves = _leaves(64)
    f = merkle.Frontier()
    assert f.root() == merkle.EMPTY_ROOT
    for n in range(1, 65):
        f.append(leaves[n - 1])
        assert f.root() == reference_mth(leaves[:n]) == merkle.root(leaves[:n])


def test_inclusion_exhaustive_1_to_64() -> None:
    """Every leaf of every tree size 1-64 has a proof that verifies, and only for its own
    index, leaf and root."""
    leaves = _leaves(64)
    roots = [b""] + [merkle.root(leaves[:n]) for n in range(1, 65)]
    for n in range(1, 65):
        r = roots[n]
        for i in range(n):
            proof = merkle.inclusion_proof(leaves[:n], i)
            assert merkle.verify_inclusion(i, n, leaves[i], proof, r)
            assert not merkle.verify_inclusion(i, n, leaves[(i + 1) % 64], proof, r)
            if n > 1:
                assert not merkle.verify_inclusion(i, n, leaves[i], proof, roots[n - 1])
                assert not merkle.verify_inclusion((i + 1) % n, n, leaves[i], proof, r)
            assert not merkle.verify_inclusion(i, n, leaves[i], [*proof, r], r)


def test_consistency_exhaustive_1_to_64() -> None:
    """For every 1 <= m <= n <= 64 the proof verifies; a wrong old root, new root or a
    truncated proof does not."""
    leaves = _leaves(64)
    roots = [b""] + [merkle.root(leaves[:n]) for n in range(1, 65)]
    for n in range(1, 65):
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(leaves[:n], m)
            assert merkle.verify_consistency(m, n, roots[m], roots[n], proof)
            other = roots[m - 1] if m > 1 else roots[n]
            if other != roots[m]:
                assert not merkle.verify_consistency(m, n, other, roots[n], proof)
            if m < n:
                assert not merkle.verify_consistency(m, n, roots[m], roots[n - 1], proof)
                assert not merkle.verify_consistency(m, n, roots[m], roots[n], proof[:-1])


def test_proof_arguments_out_of_range() -> None:
    """Impossible requests raise on generation and fail (never raise) on verification."""
    with pytest.raises(ValueError):
        merkle.inclusion_proof(HASHED[:3], 3)
    with pytest.raises(ValueError):
        merkle.consistency_proof(HASHED[:3], 4)
    assert not merkle.verify_inclusion(3, 3, HASHED[0], [], HASHED[0])
    assert not merkle.verify_consistency(0, 3, b"", b"", [])
    assert not merkle.verify_consistency(2, 2, HASHED[0], HASHED[1], [])


# --- checkpoints -------------------------------------------------------------------------

KEY = Signer.from_seed(b"\x07" * 32)


def test_checkpoint_round_trip_and_form() -> None:
    """A signed checkpoint is the C2SP text, an empty line and an em-dash signature line whose
    blob starts with the signed-note key hash; it opens with the key."""
    cp = Checkpoint(origin_of("log-1"), 8, bytes.fromhex(ROOTS[7]))
    note = sign_checkpoint(cp, KEY)
    text, _, sig = note.partition("\n\n")
    assert text == "wakepoint/log-1\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg="
    assert sig.startswith(f"\u2014 {KEY.key_id} ")
    assert note_key_hash(KEY.key_id, KEY.public) == hashlib.sha256(
        KEY.key_id.encode() + b"\n\x01" + KEY.public).digest()[:4]
    got, signers = open_checkpoint(note, {KEY.key_id: KEY.public})
    assert got == cp and signers == [KEY.key_id]


@pytest.mark.parametrize(("edit", "code"), [
    (lambda n: n.replace("\n8\n", "\n9\n"), "bad_signature"),
    (lambda n: n.replace("\n8\n", "\n08\n"), "malformed"),
    (lambda n: n.replace("\n\n", "\n"), "malformed"),
    (lambda n: n[:-1], "malformed"),
    (lambda n: n.replace(KEY.key_id, "ed25519:0000000000000000"), "unknown_key"),
    (lambda n: n + n.partition("\n\n")[2], "malformed"),
    # A non-ASCII character in the root or a signature (base64 raised a plain ValueError).
    (lambda n: n.replace("\n8\n", "\n8\n\u00e9", 1), "malformed"),
    (lambda n: n[:-3] + "\u00e9=\n", "malformed"),
])
def test_checkpoint_rejections(edit, code) -> None:  # type: ignore[no-untyped-def]
    """Edited, non-canonical, torn, unsigned or doubly signed notes get their stable code."""
    note = sign_checkpoint(Checkpoint("o", 8, bytes(32)), KEY)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(edit(note), {KEY.key_id: KEY.public})
    assert info.value.code == code


# --- trust roots -------------------------------------------------------------------------


def test_trust_root_round_trip_and_ranges() -> None:
    """A trust root survives to_json/loads; validity and revocation are half-open ranges."""
    t = TrustRoot.from_signers([KEY], log_id="L").revoke(KEY.key_id, 10)
    again = TrustRoot.loads(t.to_json())
    key = again.keys[KEY.key_id]
    assert again.log_id == "L" and key.revoked_at == 10
    assert key.invalid_at(9) is None and key.invalid_at(None) is None
    assert "revoked" in (key.invalid_at(10) or "")


@pytest.mark.parametrize("doc", [
    b'{"v":1,"keys":[],"extra":1}',
    b'{"v":2,"keys":[]}',
    b'{"v":1,"keys":[{"key_id":"ed25519:0000000000000000","public":"' + b"A" * 43 + b'="}]}',
    b"not json",
    b'{"v":1,"keys":[],"log_id":"\xff"}',  # not UTF-8
    b'{"v":1,"keys":[],"log_id":""}',  # would read as "no log id given"
    *(b'{"v":1,"keys":[{"key_id":"%s","public":"%s","roles":["record"],%s}]}' % (
        KEY.key_id.encode(), base64.b64encode(KEY.public), fields)
      for fields in (b'"valid_from":-1', b'"valid_from":5,"valid_until":2',
                     b'"valid_from":5,"revoked_at":1')),
])
def test_trust_root_strict(doc: bytes) -> None:
    """Unknown fields, other versions, key ids that do not match their key, bytes that are
    not UTF-8, an empty log id, validity ranges that are not ranges: TrustError."""
    with pytest.raises(TrustError):
        TrustRoot.loads(doc)


def test_checkpoint_signature_base64_must_be_canonical() -> None:
    """A signature line whose base64 differs only in the unused bits before the padding
    decodes to the same signature; it is still another text, so it is ``malformed``
    (found by the tamper suite's random byte edits)."""
    import base64

    from wakepoint.ledger.checkpoint import (
        Checkpoint,
        CheckpointError,
        parse_checkpoint,
        sign_checkpoint,
    )
    from wakepoint.ledger.keys import Signer

    signer = Signer.from_seed(b"\x01" * 32)
    note = sign_checkpoint(Checkpoint("wakepoint/x", 1, bytes(32)), signer)
    sig = note.rsplit(" ", 1)[1].rstrip("\n")
    assert sig.endswith("=") and not sig.endswith("==")  # 68 bytes: two unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = sig[:-2] + alphabet[alphabet.index(sig[-2]) ^ 1] + "="
    assert base64.b64decode(twin) == base64.b64decode(sig)
    assert parse_checkpoint(note)[2]
    with pytest.raises(CheckpointError) as err:
        parse_checkpoint(note.replace(sig, twin))
    assert err.value.code == "malformed"
