"""The store-wide ledger index of a JSONL store: global order and checkpoints, one file.

Run files hold each run's chain; they say nothing about the order of records *across* runs,
which checkpoints and key validity ranges need.  ``<store>/index.jsonl`` supplies it, one
line per commit (or per checkpoint), appended in commit order::

    {"run_id":"<id>","seq":<first seq>,"hashes":["<hex record_hash>", ...]}
    {"checkpoint":"<signed note text>"}

A leaf line lists the record hashes of one commit; their global positions are the running
count of leaves before them (0-based).  A checkpoint line holds a C2SP signed checkpoint
(``ledger.checkpoint``) of the leaves listed before it.  Like run files, every complete line
ends in ``\\n``; a torn last line is a crash (``incomplete_tail_write``).

This module defines the format and appends to it.  Writing the index from the store on every
commit is integration work; until then tests and tools append with ``append_leaves`` and
``append_checkpoint`` right after ``store.commit``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import msgspec

from .checkpoint import Checkpoint, origin_of, sign_checkpoint
from .keys import Signer
from .merkle import Frontier, root

INDEX_FILE = "index.jsonl"


class LeafLine(msgspec.Struct, forbid_unknown_fields=True):
    """The records one commit appended to one run."""

    run_id: str
    seq: int
    hashes: list[str]


class CheckpointLine(msgspec.Struct, forbid_unknown_fields=True):
    """A signed checkpoint stored in the ledger."""

    checkpoint: str


_encoder = msgspec.json.Encoder()


def _append(store_dir: str | os.PathLike[str], data: bytes) -> None:
    fd = os.open(Path(store_dir) / INDEX_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def leaf_line(run_id: str, first_seq: int, hashes: Sequence[str]) -> bytes:
    """The index line of one commit."""
    return _encoder.encode(LeafLine(run_id, first_seq, list(hashes))) + b"\n"


def append_leaves(
    store_dir: str | os.PathLike[str], run_id: str, first_seq: int, hashes: Sequence[str]
) -> None:
    """Append one commit's record hashes to the index."""
    _append(store_dir, leaf_line(run_id, first_seq, hashes))


def read_leaves(store_dir: str | os.PathLike[str]) -> list[bytes]:
    """Every leaf hash listed in the index, in order (complete leaf lines only)."""
    path = Path(store_dir) / INDEX_FILE
    if not path.exists():
        return []
    leaves: list[bytes] = []
    for raw in path.read_bytes().split(b"\n")[:-1]:
        if raw.startswith(b'{"run_id"'):
            line = msgspec.json.decode(raw, type=LeafLine)
            leaves.extend(bytes.fromhex(h) for h in line.hashes)
    return leaves


def make_checkpoint(log_id: str, leaves: Sequence[bytes], signer: Signer) -> str:
    """A signed checkpoint note of ``leaves`` (the whole ledger so far)."""
    return sign_checkpoint(Checkpoint(origin_of(log_id), len(leaves), root(leaves)), signer)


def sign_frontier(log_id: str, frontier: Frontier, signer: Signer) -> str:
    """A signed checkpoint note of the leaves folded into ``frontier`` (what every store's
    incremental ``checkpoint`` signs)."""
    return sign_checkpoint(Checkpoint(origin_of(log_id), frontier.size, frontier.root()),
                           signer)


def append_checkpoint(store_dir: str | os.PathLike[str], log_id: str, signer: Signer) -> str:
    """Sign a checkpoint of every leaf in the index and append it; returns the note."""
    note = make_checkpoint(log_id, read_leaves(store_dir), signer)
    _append(store_dir, _encoder.encode(CheckpointLine(note)) + b"\n")
    return note
