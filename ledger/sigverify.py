"""Ed25519 signature checks for the verifier, through the cheapest binding available.

``ed25519_verify`` checks one signature (the exact pass), ``verify_all`` a whole file's at once
under ``map`` (the bulk pass).  Both call libsodium's ``crypto_sign_ed25519_verify_detached``
through ctypes when PyNaCl's bundled library exports it (no copy of the message), else PyNaCl's
``crypto_sign_open``.  A module of its own because it is the one place that reaches into a
private part of PyNaCl (looked up by name and guarded); the checkers see two plain functions.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Callable, Sequence

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError


def _load_raw() -> Callable[..., int] | None:
    """libsodium's ``crypto_sign_ed25519_verify_detached`` (no copy of the message)."""
    try:
        # PyNaCl's bundled libsodium; private, hence looked up by name and guarded.
        sodium = importlib.import_module("nacl._sodium")
        fn = ctypes.CDLL(sodium.__file__).crypto_sign_ed25519_verify_detached
    except (ImportError, OSError, AttributeError):  # pragma: no cover - depends on the wheel
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


_raw_verify = _load_raw()


def _load_detached() -> Callable[[bytes, bytes, bytes], bool] | None:
    fn = _raw_verify
    if fn is None:  # pragma: no cover - depends on the wheel
        return None

    def verify(sig: bytes, msg: bytes, public: bytes) -> bool:
        # Lengths are checked here because C reads 64 and 32 bytes whatever it is given.
        return len(sig) == 64 and len(public) == 32 and fn(sig, msg, len(msg), public) == 0

    return verify


def _verify_open(sig: bytes, msg: bytes, public: bytes) -> bool:
    if len(sig) != 64:
        return False
    try:
        crypto_sign_open(sig + msg, public)
    except BadSignatureError:
        return False
    return True


ed25519_verify: Callable[[bytes, bytes, bytes], bool] = _load_detached() or _verify_open
"""``ed25519_verify(sig, message, public) -> bool`` through the cheapest binding available."""


def verify_all(sigs: Sequence[bytes], messages: Sequence[bytes],
               publics: Sequence[bytes]) -> bool:
    """Whether every ``sigs[i]`` is a valid Ed25519 signature of ``messages[i]`` by
    ``publics[i]``.  The libsodium call runs under ``map``, with no Python frame per
    signature, and the signatures are checked back to back rather than between parsing
    steps: that keeps libsodium's tables and code in the CPU caches, which alone is worth
    several microseconds per signature here."""
    if _raw_verify is None:  # pragma: no cover - depends on the wheel
        return all(map(ed25519_verify, sigs, messages, publics))
    # C reads 64 and 32 bytes whatever it is given: the lengths are checked first.
    if set(map(len, sigs)) - {64} or set(map(len, publics)) - {32}:
        return False
    return not any(map(_raw_verify, sigs, messages, map(len, messages), publics))
