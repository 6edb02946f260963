"""The global phase: checks over a ledger's global order, after the run checks.

``_Global`` takes the records' leaves in global order and checks that every record appears
once, in per-run order, with its hash (``index_mismatch``), that each key is valid at each
record's position, the stored checkpoints where they stand and the anchor (``rollback``,
``equivocation``, ``root_mismatch``, ...).  For a JSONL store the order is ``index.jsonl``:
``_walk_index`` accepts blocks of leaf lines between checkpoint lines in bulk
(``_bulk_block``) and walks line by line what a block does not pass (``_walk_lines``), which
alone decides codes and positions; ``_global`` is the whole phase of a JSONL store.  A SQL
database or export file feeds the same ``_Global`` from ``stream``.
"""

from __future__ import annotations

import re
from array import array
from binascii import hexlify, unhexlify
from collections.abc import Sequence
from itertools import accumulate, groupby
from operator import attrgetter, itemgetter, methodcaller

import msgspec

from ._verifycore import _encoder, _index_cp, _index_leaf
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    open_checkpoint,
    origin_of,
    parse_checkpoint,
)
from .logindex import INDEX_FILE
from .merkle import Frontier, root
from .report import CheckpointInfo, Problem
from .runcheck import RunResult
from .runfile import _get_seq
from .trust import TrustedKey, TrustRoot


class _Global:
    """Walks the global order: index lines, key validity, checkpoints, the anchor."""

    def __init__(self, trust: TrustRoot, log_id: str | None, results: dict[str, RunResult],
                 full: bool) -> None:
        self.trust = trust
        self.log_id = log_id
        self.results = results
        self.full = full
        self.frontier = Frontier()
        self.leaves: list[bytes] = []
        self.next_seq: dict[str, int] = {}
        self.roots: dict[int, tuple[bytes, str]] = {}  # size -> (root, where) of checkpoints
        self.last: CheckpointInfo | None = None
        self.last_size = -1
        self.fast_keys: dict[str, bool] = {}
        self.unbounded = {k for k, v in trust.keys.items()
                          if v.valid_from == 0 and v.valid_until is None and v.revoked_at is None}

    def sync(self) -> None:
        """Bring the frontier up to every leaf accepted so far."""
        if self.frontier.size < len(self.leaves):
            self.frontier.extend(self.leaves[self.frontier.size:])

    def block(self, run_id: str, seq: int, joined: bytes, number: int) -> Problem | None:
        """Accept one index line's leaves at once when nothing needs a closer look (the run
        holds exactly these hashes next, and its keys have no position bounds); otherwise
        check leaf by leaf."""
        res = self.results.get(run_id)
        n = len(joined) >> 5
        if (res is not None and seq == self.next_seq.get(run_id, 0)
                and res.leaves[seq << 5: (seq + n) << 5] == joined and seq + n <= res.count):
            fast = self.fast_keys.get(run_id)
            if fast is None:
                fast = self.fast_keys[run_id] = not self.full or all(
                    k in self.unbounded for _, k in res.key_segments)
            if fast:
                self.next_seq[run_id] = seq + n
                if n == 1:
                    self.leaves.append(joined)
                else:
                    self.leaves.extend([joined[i:i + 32] for i in range(0, len(joined), 32)])
                return None
        where = f"{INDEX_FILE}:{number}"
        for offset in range(n):
            p = self.leaf(run_id, seq + offset, joined[32 * offset: 32 * offset + 32], where)
            if p is not None:
                return p
        return None

    def leaf(self, run_id: str, seq: int, h: bytes, where: str) -> Problem | None:
        res = self.results.get(run_id)
        want = self.next_seq.get(run_id, 0)
        if res is None or seq != want or seq >= res.count:
            if res is None:
                expected, detail = "a stored run", "the index lists a run no run file holds"
            elif seq != want:
                expected, detail = f"{run_id} seq {want}", "the index lists records of a " \
                    "run out of order"
            else:
                expected, detail = f"{run_id} seq < {res.count}", f"the run file holds " \
                    f"{res.count} records; the index lists more"
            return Problem(code="index_mismatch", where=where, run_id=run_id, seq=seq,
                           position=len(self.leaves), expected=expected,
                           actual=f"{run_id} seq {seq}", detail=detail)
        stored = res.leaves[32 * seq: 32 * seq + 32]
        if stored != h:
            return Problem(code="index_mismatch", where=where, run_id=run_id, seq=seq,
                           position=len(self.leaves), expected=stored.hex(), actual=h.hex(),
                           detail="the index's hash is not the stored record's")
        position = len(self.leaves)
        if self.full:
            key_id = res.key_at(seq)
            key = self.trust.keys[key_id]
            why = key.invalid_at(position)
            if why is not None:
                line = array("I", res.lines)[seq]
                slot = array("H", res.slots)[seq]
                w = res.path if res.path.startswith("row ") else f"{res.path}:{line}#{slot}"
                return Problem(code="key_not_valid", where=w, path=res.path, line=line,
                               record=slot, run_id=run_id, seq=seq, position=position,
                               actual=key_id, detail=why)
        self.next_seq[run_id] = seq + 1
        self.leaves.append(h)
        return None

    def root_at(self, size: int) -> bytes:
        self.sync()
        if size == self.frontier.size:
            return self.frontier.root()
        return root(self.leaves[:size])

    def checkpoint(self, text: str, where: str, *, anchor: bool) -> Problem | None:
        try:
            cp, signers = open_checkpoint(text, self.trust.publics("checkpoint"))
        except CheckpointError as exc:
            code = exc.code
            if code == "unknown_key":
                names = {name for name, _, _ in parse_checkpoint(text)[2]}
                if names & set(self.trust.keys):
                    code = "key_not_valid"  # signed by a trusted key that lacks the role
            return Problem(code=code, where=where, detail=f"checkpoint: {exc.detail}")
        if self.log_id is not None and cp.origin != origin_of(self.log_id):
            return Problem(code="run_mismatch", where=where, expected=origin_of(self.log_id),
                           actual=cp.origin, detail="a checkpoint of another ledger")
        if self.full:
            for key_id in signers:
                why = _checkpoint_key_invalid(self.trust.keys[key_id], cp.size)
                if why is not None:
                    return Problem(code="key_not_valid", where=where, actual=key_id,
                                   detail=f"checkpoint: {why}")
        seen = self.roots.get(cp.size)
        if seen is not None and seen[0] != cp.root:
            return Problem(code="equivocation", where=where, position=cp.size,
                           expected=seen[0].hex(), actual=cp.root.hex(),
                           detail=f"two signed checkpoints of size {cp.size} with different "
                           f"roots (the other at {seen[1]})")
        have = len(self.leaves)
        if cp.size > have:
            code = "rollback" if anchor else "behind_checkpoint"
            return Problem(code=code, where=where, position=have, expected=str(cp.size),
                           actual=str(have), detail=f"the checkpoint covers {cp.size} records "
                           f"and the ledger holds {have}" + (" (older than the anchor)"
                                                              if anchor else " before it"))
        if not anchor and cp.size < self.last_size:
            return Problem(code="rollback", where=where, position=cp.size,
                           expected=f">= {self.last_size}", actual=str(cp.size),
                           detail="a checkpoint smaller than an earlier one")
        got = self.root_at(cp.size)
        if got != cp.root:
            return Problem(code="root_mismatch", where=where, position=cp.size,
                           expected=cp.root.hex(), actual=got.hex(),
                           detail=f"the first {cp.size} records do not have the "
                           "checkpoint's root")
        self._covered(cp, where)
        return None

    def _covered(self, cp: Checkpoint, where: str) -> None:
        self.roots[cp.size] = (cp.root, where)
        if cp.size >= self.last_size:
            self.last_size = cp.size
            self.last = CheckpointInfo(origin=cp.origin, size=cp.size, root=cp.root.hex(),
                                       where=where)


def _checkpoint_key_invalid(key: TrustedKey, size: int) -> str | None:
    """Why ``key`` may not sign a checkpoint of ``size`` records (None: it may).

    A checkpoint is signed between the writing of position ``size - 1`` and of position
    ``size``, so a key valid at either may sign it: across a rotation at position p, the old
    key's checkpoint of the first p records and the new key's of the same size both stand,
    and nothing later is the old key's."""
    why = key.invalid_at(size)
    if why is not None and size > 0 and key.invalid_at(size - 1) is None:
        return None
    return why


_LEAF_RE = re.compile(rb'\{"run_id":"([\x20\x21\x23-\x5b\x5d-\x7e]*)",'
                      rb'"seq":(0|[1-9][0-9]{0,17}),'
                      rb'"hashes":\[((?:"[0-9a-f]{64}",)*"[0-9a-f]{64}")\]\}')
"""A leaf line in canonical form whose run id is printable ASCII needing no JSON unescaping:
the common case, read without a JSON decoder.  Any other line goes through the strict decoder."""


class _LeafRaw(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A leaf line with its hashes left as raw JSON: decoding 64-character strings one by
    one costs more than checking them in bulk (``_bulk_block``).  Field names and order are
    ``logindex.LeafLine``'s, so encoding it back gives the canonical line."""

    run_id: str
    seq: int
    hashes: msgspec.Raw


_leaf_block = msgspec.json.Decoder(list[_LeafRaw])
_get_hashes = attrgetter("hashes")
_get_run_id = attrgetter("run_id")
_count_seps = methodcaller("count", b'","')


def _block_hashes(raws: list[bytes]) -> bytes | None:
    """The hashes of a block's lines, concatenated (32 bytes each, in order), when every
    ``hashes`` value in ``raws`` is exactly ``["<64 lower-case hex>",...]``; else None.

    Why the test below proves that, with a few whole-block C calls instead of a split per
    hash: ``raw`` is the hashes the hex digits of all the values spell (``unhexlify`` fails on
    any other character; ``"[],`` are dropped first).  ``want`` is the one canonical array of
    those hashes.  Joined, the values with every ``"]["`` made ``","`` must be ``want``: so
    the joined values are ``want`` with some separators ``,`` written ``][`` instead - a row
    of arrays of 64-digit lower-case strings (``want`` has no other quotes or brackets, and
    hex spelled differently, upper case for one, would not re-spell the same).  Each value is
    one complete JSON value (the decoder checked) starting at a ``[`` of that row, so it ends
    at the next ``]``: each value is one of those arrays."""
    joined = b"".join(raws)
    try:
        raw = unhexlify(joined.translate(None, b'"[],'))
    except ValueError:  # a character that is not a hex digit, or an odd count of them
        return None
    if not raw or len(raw) & 31:
        return None
    want = b'["%s"]' % hexlify(raw, b",", 32).replace(b",", b'","')
    return raw if joined.replace(b'"]["', b'","') == want else None


_head = itemgetter(slice(0, 9))
_end = itemgetter(slice(-2, None))
_LEAF_HEAD, _LEAF_END = {b'{"run_id"'}, {b"]}"}


def _bulk_block(g: _Global, lines: list[bytes]) -> bool:
    """Accept a block of leaf lines (between checkpoint lines) at once, or change nothing
    and return False (the line-by-line walk then finds the exact problem).

    Accepted only when the block is in canonical form (decoded as one JSON array and
    encoded back to the same bytes; every ``hashes`` exactly ``["<64 lower-case hex>",
    ...]``, see ``_block_hashes``), each run's lines continue its records exactly (seqs
    contiguous from where the run stood, hashes equal to its stored leaves), and no key
    involved has a position bound (those need a check per position).  The per-line work is
    C-level - one decode, one encode, maps, a stable sort that groups lines by run; Python
    runs once per run of the block, not per line."""
    # Joined by commas, a line cut in two at a comma between hashes (a byte made a newline)
    # would decode as the one it was: each line must hold exactly one leaf line.  Every line
    # starting one (``{"run_id"``) and ending one (``]}``, the last field closing), and as
    # many decoded as there are lines, leave no room for a line holding a part or two.
    if (set(map(_head, lines)) != _LEAF_HEAD or set(map(_end, lines)) != _LEAF_END):
        return False
    block = b"[%s]" % b",".join(lines)
    try:
        decoded = _leaf_block.decode(block)
    except ValueError:
        return False
    if len(decoded) != len(lines) or _encoder.encode(decoded) != block:
        return False
    raws = list(map(bytes, map(_get_hashes, decoded)))
    raw = _block_hashes(raws)
    if raw is None:
        return False
    counts = [n + 1 for n in map(_count_seps, raws)]  # hashes per line
    ends = list(accumulate(counts))
    if ends[-1] << 5 != len(raw):
        return False
    # Each line's hashes as bytes (a slice of ``raw``), compared per run below.
    chunks = list(map(raw.__getitem__, map(slice, map((32).__mul__, [0, *ends[:-1]]),
                                           map((32).__mul__, ends))))
    run_ids = list(map(_get_run_id, decoded))
    seqs = list(map(_get_seq, decoded))
    order = sorted(range(len(decoded)), key=run_ids.__getitem__)
    next_ends: dict[str, int] = {}
    for run_id, group in groupby(order, key=run_ids.__getitem__):
        res = g.results.get(run_id)
        if res is None:
            return False
        members = list(group)
        start = g.next_seq.get(run_id, 0)
        mine = list(map(counts.__getitem__, members))
        if list(map(seqs.__getitem__, members)) != list(accumulate(mine[:-1],
                                                                   initial=start)):
            return False
        end = start + sum(mine)
        if end > res.count or b"".join(map(chunks.__getitem__, members)) != \
                res.leaves[start << 5:end << 5]:
            return False
        if g.full:
            fast = g.fast_keys.get(run_id)
            if fast is None:
                fast = g.fast_keys[run_id] = all(k in g.unbounded for _, k in res.key_segments)
            if not fast:
                return False
        next_ends[run_id] = end
    g.next_seq.update(next_ends)
    g.leaves.extend(map(raw.__getitem__, map(slice, range(0, len(raw), 32),
                                             range(32, len(raw) + 32, 32))))
    return True


def _walk_index(g: _Global, data: bytes) -> Problem | None:
    lines = data.split(b"\n")
    tail = lines.pop()
    # Blocks of leaf lines between checkpoint lines go in bulk when they can; a block that
    # does not is walked line by line below, which alone decides codes and positions.
    start = 0
    while start < len(lines):
        stop = start
        while stop < len(lines) and not lines[stop].startswith(b'{"checkpoint"'):
            stop += 1
        if stop > start and not _bulk_block(g, lines[start:stop]):
            break
        if stop < len(lines):
            p = _walk_lines(g, lines, stop, stop + 1)
            if p is not None:
                return p
        start = stop + 1
    else:
        start = len(lines)
    p = _walk_lines(g, lines, start, len(lines))
    if p is not None:
        return p
    if tail:
        return Problem(code="incomplete_tail_write", where=f"{INDEX_FILE}:{len(lines) + 1}",
                       detail="the index's last line has no newline")
    return None


def _walk_lines(g: _Global, lines: list[bytes], first: int, stop: int) -> Problem | None:
    """Walk ``lines[first:stop]`` one by one (1-based line numbers)."""
    decode_leaf = _index_leaf.decode
    encode = _encoder.encode
    fullmatch = _LEAF_RE.fullmatch
    block = g.block
    for number, raw in enumerate(lines[first:stop], start=first + 1):
        m = fullmatch(raw)
        if m is not None:
            run_id_raw, seq_raw, hashes_raw = m.groups()
            p = block(run_id_raw.decode(), int(seq_raw),
                      unhexlify(hashes_raw[1:-1].replace(b'","', b"")), number)
            if p is not None:
                return p
            continue
        where = f"{INDEX_FILE}:{number}"
        try:
            if raw.startswith(b'{"checkpoint"'):
                cp_line = _index_cp.decode(raw)
                if encode(cp_line) != raw:
                    raise ValueError("not in canonical form")
                p = g.checkpoint(cp_line.checkpoint, where, anchor=False)
                if p is not None:
                    return p
                continue
            leaf_line = decode_leaf(raw)
            if encode(leaf_line) != raw:
                raise ValueError("not in canonical form")
            text = "".join(leaf_line.hashes)
            joined = bytes.fromhex(text)
            # Lower-case hex only: one spelling per hash, so no edit of the index is neutral.
            if (not leaf_line.hashes or joined.hex() != text
                    or any(len(h) != 64 for h in leaf_line.hashes)):
                raise ValueError("hashes must be 32-byte lower-case hex digests")
        except ValueError as exc:  # msgspec errors and bad UTF-8 alike
            return Problem(code="malformed", where=where, detail=f"index: {exc}")
        p = block(leaf_line.run_id, leaf_line.seq, joined, number)
        if p is not None:
            return p
    return None


def _global(g: _Global, index: bytes, anchor: str | None,
            results: Sequence[RunResult]) -> Problem | None:
    p = _walk_index(g, index)
    if p is not None and p.code != "incomplete_tail_write":
        return p
    torn_index = p
    for res in sorted(results, key=lambda r: r.path):
        done = g.next_seq.get(res.run_id or "", 0)
        if done < res.count:
            line = array("I", res.lines)[done]
            slot = array("H", res.slots)[done]
            return Problem(code="index_mismatch", where=f"{res.path}:{line}#{slot}",
                           path=res.path, line=line, record=slot, run_id=res.run_id, seq=done,
                           detail="a stored record the index does not list")
    if anchor is not None:
        p = g.checkpoint(anchor, "anchor", anchor=True)
        if p is not None:
            return p
    return torn_index
