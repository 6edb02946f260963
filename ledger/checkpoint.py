"""Signed checkpoints: the C2SP ``tlog-checkpoint`` text inside a C2SP ``signed-note``.

A checkpoint commits to the ledger's first ``size`` leaves (records in global order)::

    wakepoint/<log_id>          origin: one line, names the log
    1234                        tree size, decimal, no leading zeros
    <base64 32-byte root>       RFC 6962 MTH of the first ``size`` record hashes
                                (optional extension lines; none are written today)
    <empty line>
    — <key name> <base64(4-byte key hash || 64-byte Ed25519 signature)>

The signature is Ed25519 over the note text: every line above the empty line, each ending in
``\\n``.  The key name is the wakepoint ``key_id`` (``ed25519:<16 hex>``), and the 4-byte key
hash is ``SHA-256(name || 0x0A || 0x01 || public key)[:4]`` as C2SP signed-note fixes for
Ed25519, so a checkpoint exported here verifies with any signed-note tool given the key.

Choices: parsing is strict (one origin line, a canonical decimal size, a 44-character base64
root of exactly 32 bytes, canonical base64 in signature lines, no trailing data after the
signature lines, no duplicate signature by one key); signature lines by keys the caller does
not know are skipped, as signed-note says, but at least one known key must sign.  Errors are
``CheckpointError`` with the stable codes ``malformed``, ``unknown_key`` and
``bad_signature``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping

import msgspec
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from .keys import Signer

_DASH = "\u2014"
_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")
_MAX_SIZE = (1 << 63) - 1


class CheckpointError(ValueError):
    """A checkpoint note does not parse or does not verify; ``code`` is stable."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


class Checkpoint(msgspec.Struct, frozen=True):
    """What a checkpoint states: the log, how many leaves, and their Merkle root."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> bytes:
        """The note text that is signed (``\\n`` after every line)."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(),
                 *self.extensions]
        return ("\n".join(lines) + "\n").encode()


def origin_of(log_id: str) -> str:
    """The checkpoint origin line of a ledger."""
    return f"wakepoint/{log_id}"


def note_key_hash(name: str, public: bytes) -> bytes:
    """The 4-byte signed-note key hash of an Ed25519 key (C2SP signed-note)."""
    return hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4]


def sign_checkpoint(checkpoint: Checkpoint, *signers: Signer) -> str:
    """The signed note: the checkpoint text, an empty line, one signature line per signer."""
    if not signers:
        raise ValueError("a checkpoint needs at least one signer")
    text = checkpoint.text()
    sig_lines = []
    for s in signers:
        blob = note_key_hash(s.key_id, s.public) + s.sign(text)
        sig_lines.append(f"{_DASH} {s.key_id} {base64.b64encode(blob).decode()}\n")
    return text.decode() + "\n" + "".join(sig_lines)


def parse_checkpoint(text: str) -> tuple[Checkpoint, bytes, list[tuple[str, bytes, bytes]]]:
    """Split a signed note into the checkpoint, the signed text and its signature lines
    ``(name, key hash, signature)``; checks form only, not signatures."""
    head, sep, tail = text.partition("\n\n")
    if not sep or not tail.endswith("\n"):
        raise CheckpointError("malformed", "a checkpoint note needs text, an empty line and "
                              "signature lines ending in a newline")
    lines = head.split("\n")
    if len(lines) < 3:
        raise CheckpointError("malformed", "a checkpoint needs origin, size and root lines")
    origin, size_text, root_text, *extensions = lines
    if not origin or any(not line for line in extensions):
        raise CheckpointError("malformed", "empty origin or extension line")
    if not _SIZE.fullmatch(size_text) or int(size_text) > _MAX_SIZE:
        raise CheckpointError("malformed", f"tree size {size_text!r} is not a canonical decimal")
    try:
        root = base64.b64decode(root_text, validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII character (a plain ValueError)
        root = b""
    if len(root) != 32 or base64.b64encode(root).decode() != root_text:
        raise CheckpointError("malformed", f"root {root_text!r} is not 32 bytes of base64")
    sigs: list[tuple[str, bytes, bytes]] = []
    for line in tail[:-1].split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != _DASH or not parts[1]:
            raise CheckpointError("malformed", f"bad signature line {line!r}")
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:  # binascii.Error, or a non-ASCII character
            raise CheckpointError("malformed", f"bad signature line {line!r}") from None
        if base64.b64encode(blob).decode() != parts[2]:
            # Unused low bits before the padding would give one signature several
            # spellings: a note that differs from the signed one must not pass as it.
            raise CheckpointError("malformed", f"non-canonical base64 on line {line!r}")
        if len(blob) < 5:
            raise CheckpointError("malformed", f"short signature on line {line!r}")
        sigs.append((parts[1], blob[:4], blob[4:]))
    cp = Checkpoint(origin, int(size_text), root, tuple(extensions))
    return cp, (head + "\n").encode(), sigs


def open_checkpoint(text: str, keys: Mapping[str, bytes]) -> tuple[Checkpoint, list[str]]:
    """Parse and verify a signed checkpoint against ``keys`` (key id -> raw public key).

    Returns the checkpoint and the ids of the known keys whose signatures verified.  A bad
    signature by a known key is ``bad_signature`` (never skipped); no known signer at all is
    ``unknown_key``.
    """
    cp, signed, sigs = parse_checkpoint(text)
    verified: list[str] = []
    for name, key_hash, sig in sigs:
        public = keys.get(name)
        if public is None or note_key_hash(name, public) != key_hash:
            continue  # signed-note: signatures by unknown keys are ignored
        if name in verified:
            raise CheckpointError("malformed", f"two signatures by {name}")
        try:
            if len(sig) != 64:
                raise BadSignatureError
            crypto_sign_open(sig + signed, public)
        except BadSignatureError:
            raise CheckpointError("bad_signature", f"checkpoint signature by {name} does "
                                  "not verify") from None
        verified.append(name)
    if not verified:
        raise CheckpointError("unknown_key", "no trusted key signed this checkpoint")
    return cp, verified
