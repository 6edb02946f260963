"""Codecs and small types the verifier's modules share (internal).

The store formats as the verifier reads them: the JSON encoder whose output is the stores'
exact form, a JSONL run file's commit line (``_Line``), the two kinds of ``index.jsonl`` line,
the lenient run-id probe of a record body (``_Route``), a JSONL store's ``log.json``;
``_Item``, one element of a record stream as the SQL and export readers produce it and
``stream._Stream`` consumes it; and ``Progress``, the type of ``verify``'s progress callback.
They live in one module below the readers and the checkers so that ``export`` (which
transcribes a store) and the checkers decode with the same decoders without importing each
other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import msgspec

from .logindex import CheckpointLine, LeafLine
from .records import Envelope

Progress = Callable[[int, int, int], None]
"""``progress(records checked, work done, work total)``; work is bytes of run files or
elements of a stream."""


_encoder = msgspec.json.Encoder()
_sha256 = hashlib.sha256


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    records: list[Envelope]
    state: msgspec.Raw


_line_decoder = msgspec.json.Decoder(_Line)


_index_leaf = msgspec.json.Decoder(LeafLine)
_index_cp = msgspec.json.Decoder(CheckpointLine)


class _Item(msgspec.Struct, frozen=True):
    """One element of a stream: a record (``env``) or a checkpoint note (``note``)."""

    number: int
    """Row (SQL position) or line number (export), as positions name it."""
    env: Envelope | None = None
    note: str | None = None
    run_id: str | None = None
    """SQL: the row's ``run_id`` column, which must agree with the body."""
    seq: int | None = None
    stored_hash: str | None = None
    problem: str | None = None
    """The element could not be read (``malformed``)."""
    where: str | None = None
    """How positions name a stored checkpoint outside the numbering of records (SQL)."""


class _Route(msgspec.Struct):
    run_id: str = ""


_route = msgspec.json.Decoder(_Route)


def _read_log_id(root_dir: Path) -> str | None:
    try:
        return str(msgspec.json.decode((root_dir / "log.json").read_bytes())["log_id"])
    except (OSError, msgspec.DecodeError, KeyError, TypeError):
        return None
