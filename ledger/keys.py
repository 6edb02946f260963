"""Ed25519 signing keys: generate, rotate, save with owner-only permissions, load.

A key file is JSON::

    {"type": "ed25519", "key_id": ..., "public": b64, "secret": b64,
     "previous": [{"key_id": ..., "public": b64, "secret": b64}, ...]}

``secret`` is the 32-byte seed.  ``key_id`` is ``"ed25519:"`` plus the first 16 hex digits of
SHA-256 over the public key, so an auditor can recompute it from the public key alone.

``previous`` (optional; absent for a key never rotated, so key files written before rotation
existed load unchanged) lists the keys this one replaced, most recent first.  Their secrets are
kept on purpose: a ``key.rotated`` record is signed by the old key *and* the new one
(``ledger.rotation``), and the runtime writes that record lazily, the next time it commits to
a run whose chain the old key last signed - possibly long after the rotation.  ``Signer.previous``
holds them as ``Signer`` objects; ``rotate`` makes a new current key and pushes the old one on.
A rotated key file replaces the old one atomically (``save(replace=True)``: temporary file,
fsync, rename), so a crash leaves either the old key file or the new one, never a torn one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path

import nacl.exceptions
import nacl.signing
from nacl.bindings import crypto_sign

from ..kernel.errors import WakepointError


class KeyFileError(WakepointError):
    """A key file is missing, unreadable or not a wakepoint Ed25519 key."""


def _sign_public(message: bytes, secret: bytes) -> bytes:
    return crypto_sign(message, secret)[:64]


try:
    # PyNaCl's own cffi binding of libsodium.  Calling it directly skips the wrapper's extra
    # allocations: ~8% more signatures per second, and one signature is signed per committed
    # transition.  The bytes are identical; without the module, the public wrapper is used.
    from nacl._sodium import ffi as _ffi  # type: ignore[import-not-found]  # no stubs
    from nacl._sodium import lib as _lib

    def _sign_direct(message: bytes, secret: bytes) -> bytes:
        signed = _ffi.new("unsigned char[]", len(message) + 64)
        if _lib.crypto_sign(signed, _ffi.NULL, message, len(message), secret) != 0:
            raise RuntimeError("libsodium crypto_sign failed")  # pragma: no cover
        signature: bytes = _ffi.buffer(signed, 64)[:]
        return signature

    _sign = _sign_direct
except ImportError:  # pragma: no cover - a PyNaCl without its cffi module
    _sign = _sign_public


def write_durably(temp: Path, data: bytes, mode: int) -> None:
    """Create ``temp`` (never an existing file or a planted link: ``O_EXCL``) with ``mode``,
    write all of ``data`` and fsync it; on any failure remove it again, so that no partial
    file - perhaps holding a secret key - is left behind."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]  # a short write goes on where it stopped
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    os.close(fd)


def key_id_of(public: bytes) -> str:
    """The key id of a raw 32-byte Ed25519 public key."""
    return "ed25519:" + hashlib.sha256(public).hexdigest()[:16]


class Signer:
    """Holds one Ed25519 signing key and signs ledger records with it."""

    __slots__ = ("_raw", "_signing_key", "key_id", "previous", "public")

    def __init__(self, signing_key: nacl.signing.SigningKey,
                 previous: tuple[Signer, ...] = ()) -> None:
        self._signing_key = signing_key
        self.previous: tuple[Signer, ...] = previous
        """The keys this one replaced, most recent first (empty if never rotated).  Each of
        them has an empty ``previous`` itself: the history lives on the current key."""
        # libsodium's 64-byte secret key: calling crypto_sign on it directly skips PyNaCl's
        # wrapper objects on the hot path (one signature per committed transition).
        self._raw: bytes = signing_key._signing_key
        self.public: bytes = bytes(signing_key.verify_key)
        self.key_id: str = key_id_of(self.public)

    @classmethod
    def generate(cls) -> Signer:
        """A new random key."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """A key from its 32-byte seed (deterministic; for tests and key files)."""
        return cls(nacl.signing.SigningKey(seed))

    def rotate(self) -> Signer:
        """A new random current key whose ``previous`` is this key, then this key's own
        history (most recent first)."""
        return Signer(nacl.signing.SigningKey.generate(), (self._alone(), *self.previous))

    def _alone(self) -> Signer:
        return self if not self.previous else Signer(self._signing_key)

    def find(self, key_id: str) -> Signer | None:
        """This key or the previous key with id ``key_id``, if held."""
        for signer in (self, *self.previous):
            if signer.key_id == key_id:
                return signer
        return None

    @property
    def verify_key(self) -> nacl.signing.VerifyKey:
        """The public half, for verification."""
        return self._signing_key.verify_key

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return _sign(message, self._raw)

    def _doc(self) -> dict[str, str]:
        return {
            "key_id": self.key_id,
            "public": base64.b64encode(self.public).decode(),
            "secret": base64.b64encode(bytes(self._signing_key)).decode(),
        }

    def save(self, path: str | os.PathLike[str], *, replace: bool = False) -> None:
        """Write the key file, readable by its owner only.  Refuses to overwrite one
        (``FileExistsError``) unless ``replace`` (a rotation), which swaps it atomically."""
        doc: dict[str, object] = {"type": "ed25519", **self._doc()}
        if self.previous:
            doc["previous"] = [p._doc() for p in self.previous]
        data = json.dumps(doc, indent=2).encode()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target, made durable, then linked into place: a crash mid-write
        # leaves only a stray temporary file, never a torn key file that blocks every later
        # start; and link() refuses to replace a key another process created meanwhile.  A
        # rotation means to replace it, and rename() does so atomically.
        temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        write_durably(temp, data + b"\n", 0o600)
        if replace:
            os.replace(temp, target)  # atomic: readers see the old file or the new one
        else:
            try:
                os.link(temp, target)
            finally:
                os.unlink(temp)
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Signer:
        """Read a key file written by ``save``; ``KeyFileError`` says what is wrong."""
        try:
            doc = json.loads(Path(path).read_bytes())
            if not isinstance(doc, dict) or doc.get("type") != "ed25519":
                raise KeyFileError(f"{path}: not an ed25519 key file")
            signer = cls._entry(doc)
            history = doc.get("previous", [])
            if not isinstance(history, list):
                raise KeyFileError(f"{path}: 'previous' must be a list of keys")
            previous = tuple(cls._entry(entry) for entry in history)
        except KeyFileError as exc:
            if not str(exc).startswith(f"{path}:"):
                raise KeyFileError(f"{path}: {exc}") from None
            raise
        except FileNotFoundError:
            raise KeyFileError(f"{path}: no such key file") from None
        except (OSError, ValueError, KeyError, TypeError, nacl.exceptions.CryptoError) as exc:
            raise KeyFileError(f"{path}: unreadable key file: {exc}") from None
        ids = [signer.key_id, *(p.key_id for p in previous)]
        if len(set(ids)) != len(ids):
            raise KeyFileError(f"{path}: a key appears twice in its own history")
        signer.previous = previous
        return signer

    @classmethod
    def _entry(cls, doc: object) -> Signer:
        """One key of a key file (the current key or a previous one), checked against its
        ``key_id``."""
        if not isinstance(doc, dict):
            raise KeyFileError("a key entry must be an object")
        signer = cls.from_seed(base64.b64decode(doc["secret"], validate=True))
        if doc.get("key_id") != signer.key_id:
            raise KeyFileError(f"key_id {doc.get('key_id')!r} does not match the key "
                               f"({signer.key_id})")
        return signer

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Signer:
        """Load the key file at ``path``, generating it first if there is none."""
        try:
            return cls.load(path)
        except KeyFileError:
            if Path(path).exists():
                raise
        signer = cls.generate()
        try:
            signer.save(path)
        except FileExistsError:  # another process created it first: use theirs
            return cls.load(path)
        return signer
