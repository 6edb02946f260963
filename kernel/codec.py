"""Encoding and digests of kernel values (pure: bytes in, bytes out).

One encoder and one decoder per type are built once at import (msgspec's advice: reuse them).
Digests are hex SHA-256 over msgspec's JSON encoding, the same bytes the stores persist.
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType
from typing import Any

import msgspec

from .errors import UnencodableValue
from .types import Effect, RunState


def _enc_hook(value: Any) -> Any:
    # A node may hand back the read-only ``run.vars`` view (or a part of it) as a value.
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise TypeError(f"Encoding objects of type {type(value).__name__} is unsupported")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_state_decoder = msgspec.json.Decoder(RunState)
_effect_decoder: msgspec.json.Decoder[Effect] = msgspec.json.Decoder(Effect)


def encode(value: Any) -> bytes:
    """JSON-encode any persistable value (raises msgspec's errors unchanged)."""
    return _encoder.encode(value)


def encode_state(state: RunState) -> bytes:
    """JSON-encode a run state."""
    return _encoder.encode(state)


def decode_state(data: bytes | memoryview) -> RunState:
    """Decode a run state; raises ``msgspec.DecodeError`` / ``ValidationError`` on bad bytes."""
    return _state_decoder.decode(data)


def decode_effect(data: bytes) -> Effect:
    """Decode one tagged effect."""
    return _effect_decoder.decode(data)


def digest(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError)
"""What msgspec raises for a value it cannot encode (RecursionError: cyclic or too deep)."""


def value_digest(value: Any, where: str, *args: object) -> str:
    """Hex digest of a value's encoding; ``UnencodableValue`` naming ``where`` if it has none.

    With ``args``, ``where`` is a ``str.format`` pattern filled in only on that error: the
    name is built for every transition otherwise, at more than the cost of the digest.
    """
    try:
        return hashlib.sha256(_encoder.encode(value)).hexdigest()
    except ENCODE_ERRORS as exc:
        name = where.format(*args) if args else where
        raise UnencodableValue(name, explain(value, exc)) from None


def explain(value: Any, exc: BaseException) -> str:
    """Point at the first unencodable part of a dict or list, for a message a person can act on."""
    if isinstance(exc, RecursionError):
        # Descending into a cyclic value would recurse without end; say what it is instead.
        return f"{type(value).__name__} value is cyclic or nested too deeply to encode"
    parts: Any = ()
    if isinstance(value, dict):
        parts = ((f"key {k!r}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        parts = ((f"item {i}", v) for i, v in enumerate(value))
    for label, item in parts:
        try:
            _encoder.encode(item)
        except ENCODE_ERRORS as inner:
            return f"{label}: {explain(item, inner)}"
    return f"{type(value).__name__} value: {exc}"
