"""The auditor's verifier: ``verify(source, trust, anchor=None, mode="full") -> Report``.

What it promises.  Given a ledger (a JSONL store directory, one run file, a SQL URL, or an
export file written by ``export``), a
trust root the auditor holds, and optionally the last checkpoint the auditor holds (the
*anchor*), it decides offline, trusting nothing the writer says, whether every record is
authentic, complete and in order; if not, it names the FIRST bad thing: where it is stored
(``file:line`` plus the record's index in the line, or the SQL row), the run, the seq, a stable
error code, and expected versus actual.

How one record is checked (full mode), in this order, so the code is always the earliest
failing rule:

1. the line / row parses strictly as the store wrote it: a JSONL line must be exactly
   ``{"records":[<Envelope>...],"state":<state>}`` as msgspec encodes it, so duplicate keys,
   unknown fields, whitespace, non-canonical base64 and trailing data are ``malformed``;
2. the signing key is in the trust root (``unknown_key``) with the ``record`` role
   (``key_not_valid``);
3. Ed25519 over ``PAE(payloadType, stored body bytes)`` verifies (``bad_signature``) - before
   the body is parsed;
4. the body parses strictly and is in canonical form (sorted keys, no whitespace: re-encoding
   the parsed body must give the stored bytes back, which rules out duplicate keys; the
   signature and hash are always over the stored bytes) - ``malformed``;
5. chain rules: same log and run (``run_mismatch``, also for a run file whose name is not its
   run's), seq contiguous from 0 (``seq_gap`` / ``duplicate_seq``), ``prev`` (``genesis_mismatch``
   for seq 0, ``prev_mismatch``), lifecycle (``state_violation``: a first record that is not
   ``run.started``, a second start, anything but ``run.sealed`` after a run finished, anything
   after the seal), rotation (``rotation_unauthorized`` unless signed by the old and the new
   key; after it the old key is ``key_not_valid`` in that run);
6. the stored state of each line is the state the last record of the line signed (its
   ``state`` digest; ``state_mismatch``), so the unsigned part of a line cannot be edited;
7. a finished run ends with ``run.sealed`` (``missing_seal``).

Then, ledger-wide, over the global order (``index.jsonl`` for JSONL, ``position`` for SQL):
every record appears once, in per-run order, with its hash (``index_mismatch``); each key is
valid at each record's position (``key_not_valid``); stored checkpoints verify
(``unknown_key`` / ``bad_signature`` / ``key_not_valid``), name this log (``run_mismatch``),
never exceed the leaves before them (``behind_checkpoint``), never go backwards
(``rollback``), never disagree at one size (``equivocation``), and match the Merkle root of the
leaves (``root_mismatch``).  The anchor must verify the same way, and the ledger must not be
older than it (``rollback``) nor disagree with it (``equivocation`` against a stored
checkpoint of its size, else ``root_mismatch``).

Order of errors: run checks first, by file name and line (or row); then the global checks in
global order; then the anchor.  A torn last line (a crash mid-write) is reported as
``incomplete_tail_write`` with ``crash=True`` only when nothing worse is found: the records
before it all verified.

Modes.  ``full`` does all of the above.  ``chain`` checks hashes and links only: no signature,
no trust, no strict parse (fields are extracted from the body with a small lenient decoder, the
state is not checked) - a fast integrity scan, not an authentication.

SQL databases and export files hold the records in global order, one per row or line: they
are checked as one stream (``_Stream``), each record by its run's checker, its key's range at
its position, each stored checkpoint where it stands (reported after the run checks, as for
JSONL).  SQL rows are named ``row <position>``; positions must be dense from 1, and a hole no
run check explains is ``index_mismatch``; ``cosigs`` and ``wp_checkpoints`` (migration 0002)
are read when the schema has them.  ``export`` writes the export file (a header, one DSSE
envelope per line in global order, the stored checkpoints): the JSONL and the SQL export of
one ledger are the same bytes.

Key ranges: a record is checked against its signer's range, except a ``key.rotated``
hand-over, which the runtime writes lazily after the rotation position: the new key's range
decides, so a revoked old key may co-sign a hand-over and nothing else.  A checkpoint of size
n is signed between positions n - 1 and n: a key valid at either may sign it.

Limits (stated in the report's ``unchecked``): without a global order (a single run file, a
JSONL directory without ``index.jsonl``, an unordered export) key validity ranges,
checkpoints and the anchor cannot be checked; a SQL database still at schema 0001 holds no
checkpoints and no co-signatures.

Speed: signatures are checked through libsodium's ``crypto_sign_ed25519_verify_detached``
(no copy of the message) when PyNaCl's bundled library exports it, else through
``crypto_sign_open``; a sound run file is checked by a bulk pass whose per-record work is
C-level ``map``s (one JSON decode of the file, the signatures back to back), and index blocks
between checkpoints likewise; anything the bulk passes do not accept is checked again record
by record, which alone decides codes and positions.  ``processes > 1`` verifies run files in
worker processes.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import importlib
import os
import re
import shutil
import time
from array import array
from binascii import a2b_base64, unhexlify
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import accumulate, chain, groupby, repeat
from operator import attrgetter, itemgetter, methodcaller
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import msgspec
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    open_checkpoint,
    origin_of,
    parse_checkpoint,
)
from .logindex import INDEX_FILE, CheckpointLine, LeafLine
from .merkle import Frontier, root
from .records import PAYLOAD_TYPE, Body, Envelope, Signature, genesis, pae
from .rotation import FINISHED, ROTATED, SEALED
from .trust import TrustedKey, TrustRoot

Mode = Literal["full", "chain"]

CODES = (
    "malformed", "bad_signature", "unknown_key", "key_not_valid", "seq_gap", "duplicate_seq",
    "prev_mismatch", "genesis_mismatch", "run_mismatch", "equivocation", "state_violation",
    "state_mismatch", "root_mismatch", "behind_checkpoint", "rollback", "rotation_unauthorized",
    "missing_seal", "index_mismatch", "incomplete_tail_write",
)
"""Every error code the verifier reports; stable (a code is never renamed or reused)."""

STARTED = "run.started"


class VerifyUsageError(ValueError):
    """The verifier was asked something it cannot do (bad source, anchor without order)."""


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The first bad thing found: what (``code``), where, and expected versus actual."""

    code: str
    where: str
    """``runs/<name>.jsonl:<line>[#<record>]``, ``index.jsonl:<line>``, ``row <n>``, ``anchor``."""
    path: str | None = None
    line: int | None = None
    record: int | None = None
    """Index of the record within its line (a commit may carry several)."""
    row: int | None = None
    run_id: str | None = None
    seq: int | None = None
    position: int | None = None
    """0-based global ledger position, when known."""
    expected: str | None = None
    actual: str | None = None
    detail: str = ""


class CheckpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The latest checkpoint that verified against the ledger."""

    origin: str
    size: int
    root: str
    """Hex Merkle root."""
    where: str


class Report(msgspec.Struct, kw_only=True):
    """What ``verify`` found."""

    ok: bool
    source: str
    mode: str
    error: Problem | None = None
    crash: bool = False
    """The only problem is a torn last line: a crash mid-write, not tampering."""
    records: int = 0
    runs: int = 0
    keys: dict[str, int] = msgspec.field(default_factory=dict)
    """Records signed per key id (the first signature of each record)."""
    checkpoint: CheckpointInfo | None = None
    uncovered: int | None = None
    """Records after the last verified checkpoint; None when there is no global order."""
    unchecked: list[str] = msgspec.field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> bytes:
        """The full report as JSON (for ``--json``)."""
        return msgspec.json.encode(self)


# --- signature verification --------------------------------------------------------------


def _load_detached() -> Callable[[bytes, bytes, bytes], bool] | None:
    try:
        # PyNaCl's bundled libsodium; private, hence looked up by name and guarded.
        sodium = importlib.import_module("nacl._sodium")
        fn = ctypes.CDLL(sodium.__file__).crypto_sign_ed25519_verify_detached
    except (ImportError, OSError, AttributeError):  # pragma: no cover - depends on the wheel
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_char_p]
    fn.restype = ctypes.c_int

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


def _load_raw() -> Callable[..., int] | None:
    try:
        sodium = importlib.import_module("nacl._sodium")
        fn = ctypes.CDLL(sodium.__file__).crypto_sign_ed25519_verify_detached
    except (ImportError, OSError, AttributeError):  # pragma: no cover - depends on the wheel
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


_raw_verify = _load_raw()


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


# --- per-run checking --------------------------------------------------------------------


class _Chain(msgspec.Struct, frozen=True):
    """The body fields the chain checks need (lenient: used by ``chain`` mode)."""

    log_id: str
    run_id: str
    seq: int
    prev: str
    kind: str
    key_id: str
    key: str | None = None
    state: str | None = None


class _ChainFields(msgspec.Struct, frozen=True):
    """Only what the bulk pass of chain mode reads (decoding fewer fields is faster)."""

    log_id: str
    run_id: str
    seq: int
    prev: str
    kind: str
    key_id: str


_body_strict = msgspec.json.Decoder(Body)
_body_lenient = msgspec.json.Decoder(_Chain)
_body_chain_fields = msgspec.json.Decoder(_ChainFields)
_body_encoder = msgspec.json.Encoder(order="sorted")
_encoder = msgspec.json.Encoder()
_sha256 = hashlib.sha256


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    records: list[Envelope]
    state: msgspec.Raw


_line_decoder = msgspec.json.Decoder(_Line)


class _FastSignature(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """``records.Signature`` for the bulk pass (same fields; a test pins that)."""

    keyid: str
    sig: bytes


class _FastEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """``records.Envelope`` for the bulk pass, not tracked by the garbage collector: they
    hold no cycles, and leaving ~4 tracked objects per record out of the collector's
    generations saves about 1 us per record here."""

    payloadType: str  # DSSE spells it so
    payload: bytes
    signatures: list[_FastSignature]


class _FastLine(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    records: list[_FastEnvelope]
    state: msgspec.Raw


_lines_decoder = msgspec.json.Decoder(list[_FastLine])
_get_records = attrgetter("records")
_get_state = attrgetter("state")
_LINE_HEAD = b'{"records":'
_STATE_SEP = b',"state":'


class _Ctx(msgspec.Struct, frozen=True):
    """What a worker needs to check run files (picklable)."""

    record_keys: dict[str, bytes]
    """Key id -> public key of trusted keys with the ``record`` role."""
    other_keys: list[str]
    """Trusted key ids without the ``record`` role (``key_not_valid``, not ``unknown_key``)."""
    log_id: str | None
    mode: str
    require_seals: bool


class RunResult(msgspec.Struct):
    """One run's outcome: its leaves and where they are stored (for the global phase)."""

    path: str
    run_id: str | None = None
    log_id: str | None = None
    leaves: bytes = b""
    """Concatenated 32-byte record hashes, in seq order."""
    lines: bytes = b""
    """array('I') of the line (JSONL) or row (SQL) of each record."""
    slots: bytes = b""
    """array('H') of each record's index within its line."""
    key_segments: list[tuple[int, str]] = msgspec.field(default_factory=list)
    """(first seq, key id) each time the key whose validity range applies changes (the
    signer; for a ``key.rotated`` record, the new key)."""
    keys: dict[str, int] = msgspec.field(default_factory=dict)
    problem: Problem | None = None
    torn: Problem | None = None

    @property
    def count(self) -> int:
        return len(self.leaves) // 32

    def key_at(self, seq: int) -> str:
        found = ""
        for first, key in self.key_segments:
            if first > seq:
                break
            found = key
        return found


class _RunChecker:
    """Checks one run's records in order; ``feed`` returns the first problem."""

    def __init__(self, ctx: _Ctx, path: str, expect_name: bool) -> None:
        self.ctx = ctx
        self.path = path
        self.expect_name = expect_name
        self.full = ctx.mode == "full"
        self.run_id: str | None = None
        self.log_id: str | None = ctx.log_id
        self.seq = -1
        self.prev = ""
        self.finished = False
        self.sealed = False
        self.key: str | None = None  # after a rotation: the only key allowed in this run
        self.retired: set[str] = set()
        self.leaves = bytearray()
        self.lines = array("I")
        self.slots = array("H")
        self.keys: Counter[str] = Counter()
        self.segments: list[tuple[int, str]] = []
        self.last_kind = ""
        self.state_digest: str | None = None

    slotted = True
    """Positions name the record within its line (``file:line#slot``); a stream of one
    record per row or line does not (``row n``, ``file:line``)."""

    def where(self, line: int, slot: int | None) -> str:
        if self.path.startswith("row "):
            return self.path
        if not self.slotted:
            return f"{self.path}:{line}"
        return f"{self.path}:{line}" + ("" if slot is None else f"#{slot}")

    def problem(self, code: str, line: int, slot: int | None, detail: str, *,
                seq: int | None = None, expected: object = None,
                actual: object = None) -> Problem:
        row = line if self.path.startswith("row ") else None
        return Problem(
            code=code, where=self.where(line, slot),
            path=None if row is not None else self.path,
            line=None if row is not None else line,
            record=slot if self.slotted and row is None else None, row=row,
            run_id=self.run_id, seq=seq,
            expected=None if expected is None else str(expected),
            actual=None if actual is None else str(actual), detail=detail,
        )

    def feed(self, env: Envelope, line: int, slot: int) -> Problem | None:
        """Check one record (``env``) stored at ``line`` / ``slot``."""
        body = env.payload
        sigs = env.signatures
        if self.full:
            if env.payloadType != PAYLOAD_TYPE:
                return self.problem("malformed", line, slot, "not a wakepoint record",
                                    expected=PAYLOAD_TYPE, actual=env.payloadType)
            if not sigs:
                return self.problem("malformed", line, slot, "an envelope without signatures")
            message = pae(body)
            for sig in sigs:
                public = self.ctx.record_keys.get(sig.keyid)
                if public is None:
                    code = "key_not_valid" if sig.keyid in self.ctx.other_keys else \
                        "unknown_key"
                    return self.problem(code, line, slot, f"key {sig.keyid} may not sign "
                                        "records" if code == "key_not_valid" else
                                        f"key {sig.keyid} is not in the trust root",
                                        actual=sig.keyid)
                if not ed25519_verify(sig.sig, message, public):
                    return self.problem("bad_signature", line, slot,
                                        f"signature by {sig.keyid} does not verify",
                                        actual=sig.keyid)
            try:
                b: Body | _Chain = _body_strict.decode(body)
            except ValueError as exc:  # msgspec errors and bad UTF-8 alike
                return self.problem("malformed", line, slot, f"body: {exc}")
            if _body_encoder.encode(b) != body:
                return self.problem("malformed", line, slot,
                                    "body is not in canonical form (duplicate keys, spacing "
                                    "or key order)")
        else:
            if not sigs:
                return self.problem("malformed", line, slot, "an envelope without signatures")
            try:
                b = _body_lenient.decode(body)
            except ValueError as exc:  # msgspec errors and bad UTF-8 alike
                return self.problem("malformed", line, slot, f"body: {exc}")
        return self._chain(b, sigs[0].keyid, [s.keyid for s in sigs[1:]], body, line, slot)

    def _chain(self, b: Body | _Chain, keyid: str, cosigners: list[str], body: bytes,
               line: int, slot: int) -> Problem | None:
        seq = b.seq
        if b.key_id != keyid:
            return self.problem("malformed", line, slot, "body key_id differs from the "
                                "signature's keyid", seq=seq, expected=keyid, actual=b.key_id)
        if self.log_id is None:
            self.log_id = b.log_id
        if self.run_id is None:
            self.run_id = b.run_id
            if self.expect_name and Path(self.path).stem != _file_name(b.run_id):
                return self.problem("run_mismatch", line, slot, "a run's records in the file "
                                    "of another run", seq=seq,
                                    expected=_file_name(b.run_id), actual=Path(self.path).stem)
        if b.log_id != self.log_id or b.run_id != self.run_id:
            return self.problem("run_mismatch", line, slot, "record of another run or ledger",
                                seq=seq, expected=f"{self.log_id}/{self.run_id}",
                                actual=f"{b.log_id}/{b.run_id}")
        want = self.seq + 1
        if seq != want:
            code = "duplicate_seq" if seq < want else "seq_gap"
            return self.problem(code, line, slot, f"seq {seq} where {want} was due", seq=seq,
                                expected=want, actual=seq)
        if seq == 0:
            g = genesis(self.log_id, self.run_id)
            if b.prev != g:
                return self.problem("genesis_mismatch", line, slot, "seq 0 does not start "
                                    "from this run's genesis", seq=seq, expected=g,
                                    actual=b.prev)
        elif b.prev != self.prev:
            return self.problem("prev_mismatch", line, slot, "prev is not the previous "
                                "record's hash", seq=seq, expected=self.prev, actual=b.prev)
        kind = b.kind
        if self.sealed or (seq == 0) != (kind == STARTED) or (
                self.finished and kind != SEALED) or (kind == SEALED and not self.finished):
            return self.problem("state_violation", line, slot,
                                f"{kind} after {self.last_kind or 'nothing'}", seq=seq,
                                actual=kind)
        if self.full:
            if self.key is not None and keyid != self.key:
                return self.problem("key_not_valid", line, slot, f"{keyid} was rotated out of "
                                    "this run", seq=seq, expected=self.key, actual=keyid)
            if kind == ROTATED:
                if cosigners != [b.key] or b.key == keyid:
                    return self.problem("rotation_unauthorized", line, slot,
                                        "a rotation must be signed by the old and the new key",
                                        seq=seq, expected=f"{keyid}+{b.key}",
                                        actual="+".join([keyid, *cosigners]))
                self.retired.add(keyid)
                self.key = b.key
            elif cosigners:
                return self.problem("malformed", line, slot, "only a rotation carries "
                                    "several signatures", seq=seq)
        elif kind == ROTATED and b.key:
            self.key = b.key
        # The key whose validity range applies at this record's position: its signer, except
        # for a hand-over, which the old key may co-sign after its revocation - the new key's
        # range decides (see ``trust``).
        valid_key = b.key if kind == ROTATED and b.key else keyid
        if not self.segments or self.segments[-1][1] != valid_key:
            self.segments.append((seq, valid_key))
        h = _sha256(b"\x00" + body).digest()
        self.leaves += h
        self.lines.append(line)
        self.slots.append(slot)
        self.keys[keyid] += 1
        self.seq = seq
        self.prev = h.hex()
        self.last_kind = kind
        self.state_digest = b.state
        if kind in FINISHED:
            self.finished = True
        elif kind == SEALED:
            self.sealed = True
        return None

    def check_state(self, state: bytes, line: int, slot: int) -> Problem | None:
        """The line's stored state must be the one its last record signed (see ``kernel``:
        the digest is over the state with ``seq``/``head`` still naming the previous record;
        they are its last two fields, so the check swaps them back at the end)."""
        suffix = b',"seq":%d,"head":"%s"}' % (self.seq, self.prev.encode())
        if not state.endswith(suffix):
            return self.problem("state_mismatch", line, slot, "the stored state does not name "
                                "the line's last record", seq=self.seq)
        before = self.leaves[-64:-32].hex() if self.seq > 0 else ""
        old = state[: -len(suffix)] + b',"seq":%d,"head":"%s"}' % (self.seq - 1,
                                                                   before.encode())
        got = _sha256(old).hexdigest()
        if got != self.state_digest:
            return self.problem("state_mismatch", line, slot, "the stored state is not the "
                                "state the record signed", seq=self.seq,
                                expected=self.state_digest, actual=got)
        return None

    def finish(self, line: int) -> Problem | None:
        if self.ctx.require_seals and self.finished and not self.sealed:
            return self.problem("missing_seal", line, None, f"the run ended with "
                                f"{self.last_kind} and no {SEALED}", seq=self.seq)
        return None

    def result(self, problem: Problem | None, torn: Problem | None) -> RunResult:
        return RunResult(
            path=self.path, run_id=self.run_id, log_id=self.log_id, leaves=bytes(self.leaves),
            lines=self.lines.tobytes(), slots=self.slots.tobytes(),
            key_segments=self.segments, keys=dict(self.keys), problem=problem, torn=torn,
        )


def _file_name(run_id: str) -> str:
    # The JSONL store's file naming (``stores.jsonl.file_name``), repeated here because
    # ``ledger`` may not import ``stores``; a test pins that the two agree.
    name = quote(run_id, safe="").replace("~", "%7E")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > 200:
        name = name[:135] + "~" + hashlib.sha256(run_id.encode()).hexdigest()
    return name


def check_run_file(path: str, rel: str, ctx: _Ctx, expect_name: bool = True) -> RunResult:
    """Check one JSONL run file; ``rel`` is how positions name it.

    A bulk pass (``_fast_run``) checks a sound file with little interpreter work per record;
    anything it does not accept - damage, a rotation, a torn line - is checked again by the
    exact record-by-record pass, which alone decides the code and position of an error.
    """
    data = Path(path).read_bytes()
    try:
        fast = _fast_run(data, rel, ctx, expect_name)
    except (ValueError, KeyError, IndexError):
        fast = None
    return fast if fast is not None else _exact_run_file(data, rel, ctx, expect_name)


_PAYLOAD_RE = re.compile(rb'\{"payloadType":"[^"]*","payload":"([^"]*)"')
_LIFECYCLE = frozenset({STARTED, SEALED, ROTATED}) | FINISHED


_get_records = attrgetter("records")
_get_payload = attrgetter("payload")
_get_type = attrgetter("payloadType")
_get_sigs = attrgetter("signatures")
_get_keyid = attrgetter("keyid")
_get_sig = attrgetter("sig")
_first = itemgetter(0)
_get_seq = attrgetter("seq")
_get_prev = attrgetter("prev")
_get_kind = attrgetter("kind")
_get_key_id = attrgetter("key_id")
_get_owner = attrgetter("run_id", "log_id")
_digest = methodcaller("digest")
_leaf_prefix = b"\x00".__add__


class _FullFile(msgspec.Struct):
    """What the bulk pass of full mode has read and authenticated in one run file."""

    bodies: list[bytes]
    keyids: list[str]
    decoded: list[Body]
    counts: list[int]
    """Records per line."""
    states: list[bytes]
    """The stored state of each line."""


def _fast_full(data: bytes, ctx: _Ctx) -> _FullFile | None:
    """Full mode's bulk read of a run file: every line in the store's exact form, one
    signature per record by a trusted record key that verifies, every body canonical."""
    # The whole file as one JSON array of lines: one decode; then each line must be exactly
    # its element encoded back (the store's exact form, and one commit per line: an element
    # spanning two lines cannot pass), with no per-line Python.
    lines = data.split(b"\n")
    lines.pop()
    decoded_lines = _lines_decoder.decode(b"[%s]" % b",".join(lines))
    if list(map(_encoder.encode, decoded_lines)) != lines:
        return None
    per_line = list(map(_get_records, decoded_lines))
    counts = list(map(len, per_line))
    if 0 in counts:
        return None
    envs: list[_FastEnvelope] = list(chain.from_iterable(per_line))
    if set(map(_get_type, envs)) != {PAYLOAD_TYPE}:
        return None
    sig_lists = list(map(_get_sigs, envs))
    if set(map(len, sig_lists)) != {1}:
        return None  # several signatures (a rotation) or none: the exact pass decides
    sigs = list(map(_first, sig_lists))
    keyids: list[str] = list(map(_get_keyid, sigs))
    publics = list(map(ctx.record_keys.get, keyids))
    if None in publics:
        return None
    bodies: list[bytes] = list(map(_get_payload, envs))
    if not verify_all(list(map(_get_sig, sigs)), list(map(pae, bodies)),
                      publics):  # type: ignore[arg-type]
        return None
    decoded = list(map(_body_strict.decode, bodies))
    if list(map(_body_encoder.encode, decoded)) != bodies:
        return None
    return _FullFile(bodies, keyids, decoded, counts,
                     list(map(bytes, map(_get_state, decoded_lines))))


def _fast_run(data: bytes, rel: str, ctx: _Ctx, expect_name: bool) -> RunResult | None:
    """Bulk check of a whole run file; None means "not proven sound here, use the exact
    pass".  It never reports an error itself, so it only has to be sound, not precise.

    Speed: per record there is as little interpreter work as possible - every per-record
    step is a ``map`` of a C function (attribute getters, decoders, hashing, the libsodium
    call, one decode of the file as a JSON array) over a whole file's records."""
    if not data.endswith(b"\n"):
        return None
    full: _FullFile | None = None
    decoded_bodies: list[Body] | list[_ChainFields]
    if ctx.mode == "full":
        full = _fast_full(data, ctx)
        if full is None:
            return None
        bodies, keyids, decoded_bodies = full.bodies, full.keyids, full.decoded
    else:
        # One pass of a compiled pattern over the whole file; line numbers are only needed
        # to report an error, and errors are the exact pass's business.  (Splitting the file
        # on the constant envelope head was tried: slower, it copies every line's state.)
        if not data.startswith(_LINE_HEAD):
            return None
        found = _PAYLOAD_RE.findall(data)
        if not found:
            return None
        bodies = list(map(a2b_base64, found))
        decoded_bodies = list(map(_body_chain_fields.decode, bodies))
        keyids = list(map(_get_key_id, decoded_bodies))  # unsigned: body and envelope agree
    n = len(bodies)
    first = decoded_bodies[0]
    run_id, log_id = first.run_id, ctx.log_id or first.log_id
    if expect_name and Path(rel).stem != _file_name(run_id):
        return None
    hashes = list(map(_digest, map(_sha256, map(_leaf_prefix, bodies))))
    hexes = list(map(bytes.hex, hashes))
    kinds = list(map(_get_kind, decoded_bodies))
    if (
        list(map(_get_seq, decoded_bodies)) != list(range(n))
        or list(map(_get_prev, decoded_bodies)) != [genesis(log_id, run_id), *hexes[:-1]]
        or set(map(_get_owner, decoded_bodies)) != {(run_id, log_id)}
        or (full is not None and list(map(_get_key_id, decoded_bodies)) != keyids)
        or kinds[0] != STARTED
        or not _lifecycle_ok(kinds, ctx.require_seals)
    ):
        return None
    line_of = array("I")
    slots = b""
    if full is not None:
        counts = full.counts
        last_of_line = [k - 1 for k in accumulate(counts)]
        if not _states_ok(last_of_line, full.states, hexes, full.decoded):
            return None
        line_of.extend(chain.from_iterable(map(repeat, range(1, len(counts) + 1), counts)))
        slots = array("H", chain.from_iterable(map(range, counts))).tobytes()
    segments = [(i, k) for i, k in enumerate(keyids) if not i or keyids[i - 1] != k] \
        if len(set(keyids)) > 1 else [(0, keyids[0])]
    return RunResult(
        path=rel, run_id=run_id, log_id=first.log_id, leaves=b"".join(hashes),
        lines=line_of.tobytes(), slots=slots, key_segments=segments,
        keys=dict(Counter(keyids)),
    )


def _states_ok(last_of_line: list[int], states: list[bytes], hexes: list[str],
               bodies: Sequence[Body]) -> bool:
    """Each line's stored state is the one its last record signed (see ``check_state``).
    (A version built of C-level maps was tried: slower, its intermediate lists cost more
    than this loop's interpreter work; the hashing dominates either way.)"""
    for last, state in zip(last_of_line, states, strict=True):
        suffix = b',"seq":%d,"head":"%s"}' % (last, hexes[last].encode())
        if not state.endswith(suffix):
            return False
        before = hexes[last - 1] if last else ""
        old = state[: -len(suffix)] + b',"seq":%d,"head":"%s"}' % (last - 1, before.encode())
        if _sha256(old).hexdigest() != bodies[last].state:
            return False
    return True


def _lifecycle_ok(kinds: list[str], require_seals: bool) -> bool:
    """One start, at seq 0; a finish only last or just before the seal; a seal only last and
    only after a finish.  Rotations are left to the exact pass (they change who may sign)."""
    n = len(kinds)
    finished = False
    for i, k in enumerate(kinds):
        if k not in _LIFECYCLE:
            continue
        if k == STARTED:
            if i:
                return False
        elif k in FINISHED:
            if i < n - 2 or (i == n - 2 and kinds[-1] != SEALED) or finished:
                return False
            finished = True
        elif k != SEALED or i != n - 1 or not finished:
            return False
    return not (require_seals and finished and kinds[-1] != SEALED)


def _exact_run_file(data: bytes, rel: str, ctx: _Ctx, expect_name: bool) -> RunResult:
    chk = _RunChecker(ctx, rel, expect_name)
    lines = data.split(b"\n")
    tail = lines.pop()
    torn = None
    if tail:
        torn = chk.problem("incomplete_tail_write", len(lines) + 1, None,
                           f"the last line has no newline ({len(tail)} bytes): a write that "
                           "never completed")
    full = ctx.mode == "full"
    number = 0
    for number, raw in enumerate(lines, start=1):
        if full:
            try:
                decoded = _line_decoder.decode(raw)
            except ValueError as exc:  # msgspec errors and bad UTF-8 alike
                return chk.result(chk.problem("malformed", number, None, str(exc)), torn)
            state = bytes(decoded.state)
            envs = decoded.records
            if raw != b"%s%s%s%s}" % (_LINE_HEAD, _encoder.encode(envs), _STATE_SEP, state):
                return chk.result(chk.problem("malformed", number, None, "the line is not "
                                              "in the store's exact form (duplicate or "
                                              "reordered keys, spacing, base64)"), torn)
        else:
            try:
                envs, state = _fast_envelopes(raw)
            except ValueError as exc:
                return chk.result(chk.problem("malformed", number, None, str(exc)), torn)
        if not envs:
            return chk.result(chk.problem("malformed", number, None, "a commit without "
                                          "records"), torn)
        for slot, env in enumerate(envs):
            p = chk.feed(env, number, slot)
            if p is not None:
                return chk.result(p, torn)
        if full:
            p = chk.check_state(state, number, len(envs) - 1)
            if p is not None:
                return chk.result(p, torn)
    if number == 0 and torn is None:
        return chk.result(chk.problem("malformed", 1, None, "an empty run file"), None)
    return chk.result(chk.finish(number), torn)


def _fast_envelopes(raw: bytes) -> tuple[list[Envelope], bytes]:
    """Chain mode: pull payloads and key ids out of a line without parsing its state."""
    if not raw.startswith(_LINE_HEAD):
        raise ValueError("not a commit line")
    end = raw.find(_STATE_SEP)  # the first: envelopes cannot contain it, a state can
    if end < 0:
        raise ValueError("no state in the commit line")
    envs = []
    pos = 0
    find = raw.find
    while True:
        start = find(b'"payload":"', pos, end)
        if start < 0:
            break
        start += 11
        stop = find(b'"', start, end)
        k = find(b'"keyid":"', stop, end) + 9
        kend = find(b'"', k, end)
        if stop < 0 or k < 9 or kend < 0:
            raise ValueError("truncated envelope")
        envs.append(Envelope(PAYLOAD_TYPE, base64.b64decode(raw[start:stop]),
                             [Signature(raw[k:kend].decode(), b"")]))
        pos = kend
    return envs, b""


# --- the global phase --------------------------------------------------------------------


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


_index_leaf = msgspec.json.Decoder(LeafLine)
_index_cp = msgspec.json.Decoder(CheckpointLine)


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
_join_str = "".join
_count_seps = methodcaller("count", b'","')
_inner = itemgetter(slice(2, -2))
_no_seps = methodcaller("replace", b'","', b"")


def _bulk_block(g: _Global, lines: list[bytes]) -> bool:
    """Accept a block of leaf lines (between checkpoint lines) at once, or change nothing
    and return False (the line-by-line walk then finds the exact problem).

    Accepted only when the block is in canonical form (decoded as one JSON array and
    encoded back to the same bytes; every ``hashes`` exactly ``["<64 lower-case hex>",
    ...]``), each run's lines continue its records exactly (seqs contiguous from where the
    run stood, hashes equal to its stored leaves), and no key involved has a position bound
    (those need a check per position).  The per-line work is C-level - one decode, one
    encode, maps, a stable sort that groups lines by run; Python runs once per run of the
    block, not per line."""
    block = b"[%s]" % b",".join(lines)
    try:
        decoded = _leaf_block.decode(block)
    except ValueError:
        return False
    if _encoder.encode(decoded) != block:
        return False
    raws = list(map(bytes, map(_get_hashes, decoded)))
    # Each raw value is one JSON array, so ``"]["`` only occurs between two of them: the
    # block's hashes are the parts of one array; all 64 lower-case hex digits.
    parts = b"".join(raws).replace(b'"]["', b'","')
    if not (parts.startswith(b'["') and parts.endswith(b'"]')):
        return False
    pieces = parts[2:-2].split(b'","')
    counts = [n + 1 for n in map(_count_seps, raws)]
    if set(map(len, pieces)) != {64} or len(pieces) != sum(counts):
        return False
    try:
        raw = unhexlify(b"".join(pieces))
    except ValueError:
        return False
    if raw.hex().encode() != b"".join(pieces):  # upper case: one spelling per hash
        return False
    hexes = list(map(_no_seps, map(_inner, raws)))
    run_ids = list(map(_get_run_id, decoded))
    seqs = list(map(_get_seq, decoded))
    order = sorted(range(len(decoded)), key=run_ids.__getitem__)
    ends: dict[str, int] = {}
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
        if end > res.count or b"".join(map(hexes.__getitem__, members)) != \
                res.leaves[start << 5:end << 5].hex().encode():
            return False
        if g.full:
            fast = g.fast_keys.get(run_id)
            if fast is None:
                fast = g.fast_keys[run_id] = all(k in g.unbounded for _, k in res.key_segments)
            if not fast:
                return False
        ends[run_id] = end
    g.next_seq.update(ends)
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


# --- sources -----------------------------------------------------------------------------


Progress = Callable[[int, int, int], None]
"""``progress(records checked, work done, work total)``; work is bytes of run files or
elements of a stream."""


def _check_chunk(args: tuple[list[tuple[str, str]], _Ctx]) -> list[RunResult]:
    files, ctx = args
    return [check_run_file(path, rel, ctx) for path, rel in files]


def _check_files(files: list[tuple[str, str]], ctx: _Ctx, processes: int,
                 progress: Progress | None = None) -> list[RunResult]:
    if progress is not None:
        sizes = {path: os.path.getsize(path) for path, _ in files}
        total = sum(sizes.values())
    if processes <= 1 or len(files) < 2:
        if progress is None:
            return _check_chunk((files, ctx))
        results, records, done = [], 0, 0
        for path, rel in files:
            res = check_run_file(path, rel, ctx)
            results.append(res)
            records += res.count
            done += sizes[path]
            progress(records, done, total)
        return results
    # Balance by size: the largest files first, each to the least-loaded worker.
    sized = sorted(files, key=lambda f: -os.path.getsize(f[0]))
    chunks: list[list[tuple[str, str]]] = [[] for _ in range(processes * 4)]
    loads = [0] * len(chunks)
    for f in sized:
        i = loads.index(min(loads))
        chunks[i].append(f)
        loads[i] += os.path.getsize(f[0])
    with ProcessPoolExecutor(processes) as pool:
        out: list[RunResult] = []
        done = 0
        used = [c for c in chunks if c]
        for chunk, part in zip(used, pool.map(_check_chunk, [(c, ctx) for c in used]),
                               strict=True):
            out.extend(part)
            if progress is not None:
                done += sum(sizes[path] for path, _ in chunk)
                progress(sum(r.count for r in out), done, total)
    return out


def _ctx(trust: TrustRoot, mode: str, require_seals: bool, log_id: str | None) -> _Ctx:
    record = trust.publics("record")
    return _Ctx(record_keys=record, other_keys=[k for k in trust.keys if k not in record],
                log_id=trust.log_id or log_id, mode=mode, require_seals=require_seals)


def _finish_runs(results: Iterable[RunResult], report: Report,
                 log_id: str | None) -> tuple[Problem | None, Problem | None]:
    """First run problem (by path, then position) and first torn line; fills the counts."""
    problem: Problem | None = None
    torn: Problem | None = None
    keys: Counter[str] = Counter()
    for res in sorted(results, key=lambda r: r.path):
        report.runs += 1
        report.records += res.count
        keys.update(res.keys)
        if problem is None and res.problem is not None:
            problem = res.problem
        if problem is None and log_id is not None and res.log_id not in (None, log_id):
            problem = Problem(code="run_mismatch", where=f"{res.path}:1#0", path=res.path,
                              line=1, record=0, run_id=res.run_id, seq=0, expected=log_id,
                              actual=res.log_id, detail="a run of another ledger")
        if torn is None and res.torn is not None:
            torn = res.torn
    report.keys = dict(sorted(keys.items()))
    return problem, torn


def _read_log_id(root_dir: Path) -> str | None:
    try:
        return str(msgspec.json.decode((root_dir / "log.json").read_bytes())["log_id"])
    except (OSError, msgspec.DecodeError, KeyError, TypeError):
        return None


def verify(
    source: str | os.PathLike[str],
    trust: TrustRoot,
    anchor: str | None = None,
    mode: Mode = "full",
    *,
    processes: int = 1,
    require_seals: bool = True,
    progress: Progress | None = None,
) -> Report:
    """Verify a ledger; see the module docstring for every rule and the order of errors.

    ``source``: a JSONL store directory, one ``.jsonl`` run file, or a SQLAlchemy URL
    (``sqlite:///...``, ``postgresql+psycopg://...``).  ``anchor``: the text of the last
    signed checkpoint the auditor holds.  ``processes``: worker processes for run files.
    ``require_seals``: a finished run must end with ``run.sealed``.  ``progress`` is called
    now and then with (records checked, work done, work total).  Raises
    ``VerifyUsageError`` for a source it cannot read or an anchor it cannot place.
    """
    if mode not in ("full", "chain"):
        raise VerifyUsageError(f"unknown mode {mode!r}: use full or chain")
    started = time.perf_counter()
    text = os.fspath(source)
    report = Report(ok=False, source=text, mode=mode)
    if "://" in text:
        _verify_sql(text, trust, anchor, report, mode, require_seals, progress)
    else:
        _verify_jsonl(Path(text), trust, anchor, report, mode, processes, require_seals,
                      progress)
    report.ok = report.error is None
    report.seconds = round(time.perf_counter() - started, 6)
    return report


def _verify_jsonl(path: Path, trust: TrustRoot, anchor: str | None, report: Report,
                  mode: str, processes: int, require_seals: bool,
                  progress: Progress | None) -> None:
    if path.is_file() and is_export(path):
        _verify_export(path, trust, anchor, report, mode, require_seals, progress)
        return
    if path.is_file():
        if anchor is not None:
            raise VerifyUsageError("an anchor needs the whole store (a single run file has no "
                                   "global order)")
        ctx = _ctx(trust, mode, require_seals, None)
        res = check_run_file(str(path), path.name, ctx, expect_name=False)
        problem, torn = _finish_runs([res], report, trust.log_id)
        report.unchecked = ["key_validity", "checkpoints"]
        report.error = problem or torn
        report.crash = problem is None and torn is not None
        return
    if not (path / "runs").is_dir():
        raise VerifyUsageError(f"{path}: not a JSONL store (no runs/ directory) nor a run file")
    log_id = trust.log_id or _read_log_id(path)
    ctx = _ctx(trust, mode, require_seals, log_id)
    files = sorted((str(f), f"runs/{f.name}") for f in (path / "runs").iterdir()
                   if f.name.endswith(".jsonl"))
    results = _check_files(files, ctx, processes, progress)
    problem, torn = _finish_runs(results, report, log_id)
    if problem is not None:
        report.error = problem
        return
    index = path / INDEX_FILE
    if mode == "chain":
        if anchor is not None:
            raise VerifyUsageError("an anchor needs full mode")
        report.unchecked = ["signatures", "state", "index", "key_validity", "checkpoints"]
        report.error = torn
        report.crash = torn is not None
        return
    if not index.exists():
        if anchor is not None:
            raise VerifyUsageError(f"{path}: no {INDEX_FILE}, so the anchor cannot be placed")
        report.unchecked = ["key_validity", "checkpoints"]
        report.error = torn
        report.crash = torn is not None
        return
    by_run = {r.run_id: r for r in results if r.run_id is not None}
    g = _Global(trust, log_id or next((r.log_id for r in results if r.log_id), None), by_run,
                mode == "full")
    report.error = _global(g, index.read_bytes(), anchor, results) or torn
    report.crash = report.error is not None and report.error.code == "incomplete_tail_write"
    report.checkpoint = g.last
    report.uncovered = len(g.leaves) - max(g.last_size, 0)


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


# --- record streams: SQL databases and export files ----------------------------------------
#
# Both hold the records in global order, one per row or line, so they are checked in one pass:
# each record goes to its run's checker (routed by the run id read leniently from the body;
# the checker verifies the signature before it parses anything), its key's range is checked at
# its position, and each checkpoint is checked where it stands in the stream.


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


class _Stream:
    """Checks a stream of ``_Item`` in global order."""

    def __init__(self, trust: TrustRoot, log_id: str | None, mode: str, require_seals: bool,
                 label: Callable[[int], str], ordered: bool = True) -> None:
        self.trust = trust
        self.full = mode == "full"
        self.ordered = ordered
        self.ctx = _ctx(trust, mode, require_seals, log_id)
        self.label = label
        self.checkers: dict[str, _RunChecker] = {}
        self.g = _Global(trust, self.ctx.log_id, {}, self.full)
        self.keys: Counter[str] = Counter()
        self.next_row = 1
        self.late: Problem | None = None
        """The first stored checkpoint that failed.  As for a JSONL store, the run checks
        come first (they name the damaged record), then the checks of the global order."""
        self.hole: Problem | None = None
        """The first gap in SQL positions (dense from 1): a deleted row.  Reported after the
        run checks, which name a deletion inside a run more precisely (``seq_gap``), so it
        decides only when nothing else shows the deletion (the tail of an unfinished run)."""

    def checker(self, run_id: str, where: str) -> _RunChecker:
        chk = self.checkers.get(run_id)
        if chk is None:
            chk = self.checkers[run_id] = _RunChecker(self.ctx, where, expect_name=False)
            chk.slotted = False
        # A row names itself; a line is named by its file (the checker adds the number).
        chk.path = where if where.startswith("row ") else where.rpartition(":")[0]
        return chk

    def feed(self, item: _Item) -> Problem | None:
        where = item.where or self.label(item.number)
        if item.problem is not None:
            if where.startswith("row "):
                return Problem(code="malformed", where=where, row=item.number,
                               detail=item.problem)
            return Problem(code="malformed", where=where, path=where.rpartition(":")[0],
                           line=item.number, detail=item.problem)
        if item.note is not None:
            if self.ordered and self.late is None:
                self.late = self.g.checkpoint(item.note, where, anchor=False)
            return None
        env = item.env
        assert env is not None
        if item.seq is not None:  # a SQL row
            if item.number != self.next_row and self.hole is None:
                self.hole = Problem(code="index_mismatch", where=where, row=item.number,
                                    position=len(self.g.leaves), expected=str(self.next_row),
                                    actual=str(item.number),
                                    detail="positions are dense from 1: rows are missing "
                                    "before this one")
            self.next_row = item.number + 1
        try:
            run_id = item.run_id if item.run_id is not None else _route.decode(env.payload).run_id
        except ValueError:
            run_id = ""  # unreadable: a fresh checker reports it (bad signature or malformed)
        chk = self.checker(run_id, where)
        if chk.run_id is None and item.run_id is not None:
            chk.run_id = item.run_id  # the row's run: a body of another run is run_mismatch
        p = chk.feed(env, item.number, 0)
        if p is None and item.run_id is not None and chk.run_id != item.run_id:
            p = chk.problem("run_mismatch", item.number, None, "the row's run_id differs from "
                            "the body's", seq=chk.seq, expected=chk.run_id, actual=item.run_id)
        if p is None and item.seq is not None and (item.seq != chk.seq
                                                   or item.stored_hash != chk.prev):
            p = chk.problem("malformed", item.number, None, "the row's seq/record_hash differ "
                            "from the record", seq=chk.seq)
        if p is None and self.full and self.ordered:
            key_id = chk.segments[-1][1]
            why = self.trust.keys[key_id].invalid_at(len(self.g.leaves))
            if why is not None:
                p = chk.problem("key_not_valid", item.number, None, why, seq=chk.seq,
                                actual=key_id)
                p = msgspec.structs.replace(p, position=len(self.g.leaves))
        if p is not None:
            return p
        self.g.leaves.append(bytes(chk.leaves[-32:]))
        return None

    def finish(self, report: Report, anchor: str | None, problem: Problem | None,
               torn: Problem | None) -> None:
        if problem is None:
            for chk in self.checkers.values():
                problem = chk.finish(chk.lines[-1] if chk.lines else 0)
                if problem is not None:
                    break
        if problem is None:
            problem = self.hole or self.late
        if problem is None and anchor is not None:
            problem = self.g.checkpoint(anchor, "anchor", anchor=True)
        for chk in self.checkers.values():
            self.keys.update(chk.keys)
        report.keys = dict(sorted(self.keys.items()))
        report.records = len(self.g.leaves)
        report.runs = len(self.checkers)
        report.error = problem or torn
        report.crash = problem is None and torn is not None
        if self.ordered:
            report.checkpoint = self.g.last
            report.uncovered = len(self.g.leaves) - max(self.g.last_size, 0)

    def run(self, items: Iterable[_Item], report: Report, anchor: str | None,
            torn: Problem | None = None, progress: Progress | None = None,
            total: int | None = None) -> None:
        """Check ``items`` in order; ``total`` (for progress) defaults to their number."""
        problem = None
        if total is None:
            items = list(items)
            total = len(items)
        for done, item in enumerate(items, start=1):
            problem = self.feed(item)
            if problem is not None:
                break
            if progress is not None and not done % 10_000:
                progress(len(self.g.leaves), done, total)
        self.finish(report, anchor, problem, torn)


_cosigs = msgspec.json.Decoder(list[Signature])


class _SqlSource(msgspec.Struct):
    """A SQL store's ledger, read as a stream (memory stays flat however large it is)."""

    log_id: str | None
    lacks: list[str]
    """What the schema cannot hold (before migration 0002: ``checkpoints``, ``rotation``)."""
    total: int
    """Records (for progress)."""
    items: Iterator[_Item]
    """Records in global order (with ``cosigs`` when the schema has that column) and the
    stored checkpoints (when it has ``wp_checkpoints``), each right after the last record
    it covers.  Close it when stopping early (it holds a connection)."""


def _sql_source(url: str) -> _SqlSource:
    """Open a SQL store's ledger for reading (``VerifyUsageError`` if it is not one)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        raise VerifyUsageError(f"cannot open {url}: {exc}") from None
    try:
        with engine.connect() as conn:
            inspector = sqlalchemy.inspect(conn)
            tables = set(inspector.get_table_names())
            if "wp_records" not in tables:
                raise VerifyUsageError(f"{url}: not a wakepoint SQL store (no wp_records)")
            columns = {c["name"] for c in inspector.get_columns("wp_records")}
            total = int(conn.execute(sqlalchemy.text(
                "SELECT count(*) FROM wp_records")).scalar_one())
            log_id = None
            if "wp_meta" in tables:
                found = conn.execute(sqlalchemy.text("SELECT log_id FROM wp_meta")).all()
                log_id = str(found[0][0]) if len(found) == 1 else None
            notes: list[tuple[int, str]] = []
            if "wp_checkpoints" in tables:
                notes = _sql_checkpoints(conn)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise VerifyUsageError(f"cannot read the ledger of {url}: {exc}") from None
    cosigs = "cosigs" in columns
    lacks = [name for name, present in (("checkpoints", "wp_checkpoints" in tables),
                                        ("rotation", cosigs)) if not present]
    return _SqlSource(log_id, lacks, total,
                      _place(_sql_rows(engine, url, cosigs), notes))


def _sql_rows(engine: object, url: str, cosigs: bool) -> Iterator[_Item]:
    """The records of ``wp_records`` in position order, fetched in batches."""
    import sqlalchemy

    statement = sqlalchemy.text(
        "SELECT position, run_id, seq, key_id, body, sig, record_hash" +
        (", cosigs" if cosigs else "") + " FROM wp_records ORDER BY position")
    try:
        with engine.connect() as conn:  # type: ignore[attr-defined]
            result = conn.execution_options(stream_results=True, yield_per=2000).execute(
                statement)
            try:
                for row in result:
                    yield _sql_item(row, cosigs)
            finally:
                result.close()  # a server-side cursor on PostgreSQL: closed when we stop early
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise VerifyUsageError(f"cannot read the ledger of {url}: {exc}") from None
    finally:
        engine.dispose()  # type: ignore[attr-defined]


def _sql_item(row: Any, cosigs: bool) -> _Item:
    """One ``wp_records`` row as a stream item (a SQLAlchemy row: untyped)."""
    position, run_id, seq, key_id, body, sig, stored_hash = row[:7]
    problem = None
    extra: list[Signature] = []
    raw = row[7] if cosigs else None
    if raw:
        try:
            extra = _cosigs.decode(raw if isinstance(raw, str) else bytes(raw))
        except ValueError as exc:
            problem = f"cosigs: {exc}"
    env = Envelope(PAYLOAD_TYPE, bytes(body), [Signature(key_id, bytes(sig)), *extra])
    return _Item(int(position), env=env, run_id=run_id, seq=int(seq),
                 stored_hash=stored_hash, problem=problem)


def _sql_checkpoints(conn: object) -> list[tuple[int, str]]:
    """The checkpoint notes of ``wp_checkpoints`` (migration 0002: one per tree size, the
    primary key), smallest first, with that key."""
    import sqlalchemy

    rows = conn.execute(sqlalchemy.text(  # type: ignore[attr-defined]
        "SELECT size, checkpoint FROM wp_checkpoints ORDER BY size")).all()
    return [(int(r[0]), r[1] if isinstance(r[1], str)
             else bytes(r[1]).decode("utf-8", "replace")) for r in rows]


def _place(items: Iterable[_Item], notes: Sequence[tuple[int, str]]) -> Iterator[_Item]:
    """Interleave checkpoint notes (row key, note) into records: each right after the record
    its own stated size ends at, never before an earlier note; a note that does not parse
    goes where it was found in order (it is reported ``malformed``), one whose size exceeds
    the records at the end (``behind_checkpoint``).  Positions name a note by its row's key
    (``wp_checkpoints size=<n>``)."""
    placed: list[tuple[int, _Item]] = []
    for k, (key, note) in enumerate(notes, start=1):
        try:
            size = parse_checkpoint(note)[0].size
        except CheckpointError:
            size = 0
        placed.append((size, _Item(-k, note=note, where=f"wp_checkpoints size={key}")))
    waiting = iter(placed)
    nxt = next(waiting, None)
    for count, item in enumerate(items):
        while nxt is not None and nxt[0] <= count:
            yield nxt[1]
            nxt = next(waiting, None)
        yield item
    while nxt is not None:
        yield nxt[1]
        nxt = next(waiting, None)


def _sql_label(number: int) -> str:
    return f"row {number}"


def _verify_sql(url: str, trust: TrustRoot, anchor: str | None, report: Report, mode: str,
                require_seals: bool, progress: Progress | None = None) -> None:
    if mode == "chain" and anchor is not None:
        raise VerifyUsageError("an anchor needs full mode")
    source = _sql_source(url)
    stream = _Stream(trust, trust.log_id or source.log_id, mode, require_seals, _sql_label)
    try:
        stream.run(source.items, report, anchor, progress=progress, total=source.total)
    finally:
        source.items.close()  # type: ignore[attr-defined]
    report.unchecked = (["signatures", "key_validity", "checkpoints"] if mode == "chain"
                        else source.lacks)


# --- export files ------------------------------------------------------------------------

EXPORT_FORMAT = "wakepoint-ledger-export"
"""The ``format`` value of an export file's header line."""


class ExportHeader(msgspec.Struct, forbid_unknown_fields=True):
    """The first line of an export file.  ``ordered``: records are in the store's global
    order and checkpoints stand where they were taken (false for a JSONL store without
    ``index.jsonl``: records then come run by run, and key ranges and checkpoints cannot be
    checked)."""

    format: str
    v: int
    log_id: str
    ordered: bool
    records: int
    """How many record lines follow (a cut export is ``malformed``, not a shorter ledger)."""


_header_decoder = msgspec.json.Decoder(ExportHeader)
_env_decoder = msgspec.json.Decoder(Envelope)
_EXPORT_HEAD = b'{"format":"' + EXPORT_FORMAT.encode() + b'"'


def is_export(path: Path) -> bool:
    """Whether ``path`` is a file starting with an export header."""
    try:
        with path.open("rb") as f:
            return f.read(len(_EXPORT_HEAD)) == _EXPORT_HEAD
    except OSError:
        return False


def _export_items(data: bytes) -> tuple[ExportHeader, list[_Item], int | None]:
    """The header, the items, and the line number of a torn last line (if any)."""
    lines = data.split(b"\n")
    tail = lines.pop()
    torn = len(lines) + 1 if tail else None
    try:
        header = _header_decoder.decode(lines[0])
    except (ValueError, IndexError) as exc:
        raise VerifyUsageError(f"not a ledger export: header: {exc}") from None
    if header.format != EXPORT_FORMAT or header.v != 1:
        raise VerifyUsageError(f"unsupported export {header.format} v{header.v}")
    items: list[_Item] = []
    count = 0
    for number, raw in enumerate(lines[1:], start=2):
        try:
            if raw.startswith(b'{"checkpoint"'):
                cp = _index_cp.decode(raw)
                if _encoder.encode(cp) != raw:
                    raise ValueError("not in canonical form")
                items.append(_Item(number, note=cp.checkpoint))
                continue
            env = _env_decoder.decode(raw)
            if _encoder.encode(env) != raw:
                raise ValueError("not in canonical form")
            items.append(_Item(number, env=env))
            count += 1
        except ValueError as exc:  # msgspec errors and bad UTF-8 alike
            items.append(_Item(number, problem=f"export line: {exc}"))
            break
    if torn is None and count != header.records and items and items[-1].problem is None:
        items.append(_Item(len(lines) + 1, problem=f"the header announces {header.records} "
                           f"records and the export holds {count}: a cut or padded export"))
    return header, items, torn


def _verify_export(path: Path, trust: TrustRoot, anchor: str | None, report: Report,
                   mode: str, require_seals: bool, progress: Progress | None = None) -> None:
    header, items, torn_at = _export_items(path.read_bytes())
    name = path.name
    if anchor is not None and (mode == "chain" or not header.ordered):
        raise VerifyUsageError("an anchor needs full mode and an ordered export")
    stream = _Stream(trust, trust.log_id or header.log_id, mode, require_seals,
                     lambda n: f"{name}:{n}", ordered=header.ordered)
    torn = None
    if torn_at is not None:
        torn = Problem(code="incomplete_tail_write", where=f"{name}:{torn_at}", path=name,
                       line=torn_at, detail="the export's last line has no newline")
    stream.run(items, report, anchor, torn, progress)
    if mode == "chain":
        report.unchecked = ["signatures", "key_validity", "checkpoints"]
    elif not header.ordered:
        report.unchecked = ["key_validity", "checkpoints"]


def stored_checkpoints(source: str | os.PathLike[str]) -> list[str]:
    """The signed checkpoint notes a store holds, oldest first (not verified): the
    checkpoint lines of a JSONL store's ``index.jsonl``, or the ``wp_checkpoints`` rows of a
    SQL store (none before migration 0002)."""
    text = os.fspath(source)
    if "://" not in text:
        path = Path(text.removeprefix("jsonl:"))
        if not (path / "runs").is_dir():
            raise VerifyUsageError(f"{path}: not a JSONL store (no runs/ directory)")
        index = path / INDEX_FILE
        if not index.exists():
            return []
        lines = index.read_bytes().split(b"\n")[:-1]
        notes = []
        for number, raw in enumerate(lines, start=1):
            if raw.startswith(b'{"checkpoint"'):
                try:
                    notes.append(_index_cp.decode(raw).checkpoint)
                except ValueError as exc:
                    raise VerifyUsageError(f"{INDEX_FILE}:{number}: {exc}") from None
        return notes
    import sqlalchemy

    engine = sqlalchemy.create_engine(text)
    try:
        with engine.connect() as conn:
            inspector = sqlalchemy.inspect(conn)
            if "wp_checkpoints" not in inspector.get_table_names():
                return []
            return [note for _, note in _sql_checkpoints(conn)]
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise VerifyUsageError(f"cannot read the checkpoints of {text}: {exc}") from None
    finally:
        engine.dispose()


class ExportError(ValueError):
    """The store's records cannot be exported as they stand (run files and index disagree,
    a damaged line): ``ledger verify`` on the store says exactly what is wrong."""


def _jsonl_export(root_dir: Path) -> tuple[str, bool, list[bytes]]:
    """Log id, ordered, and the export's body lines of a JSONL store."""
    log_id = _read_log_id(root_dir)
    if log_id is None:
        raise ExportError(f"{root_dir}: no readable log.json")
    runs: dict[str, list[Envelope]] = {}
    for f in sorted((root_dir / "runs").iterdir()):
        if not f.name.endswith(".jsonl"):
            continue
        envs: list[Envelope] = []
        lines = f.read_bytes().split(b"\n")
        lines.pop()  # a torn last line is a write that never completed: not in the ledger
        for number, raw in enumerate(lines, start=1):
            try:
                envs.extend(_line_decoder.decode(raw).records)
            except ValueError as exc:
                raise ExportError(f"runs/{f.name}:{number}: {exc}") from None
        if envs:
            try:
                run_id = _route.decode(envs[0].payload).run_id
            except ValueError as exc:
                raise ExportError(f"runs/{f.name}:1: {exc}") from None
            runs[run_id] = envs
    index = root_dir / INDEX_FILE
    if not index.exists():
        return log_id, False, [_encoder.encode(e) for envs in runs.values() for e in envs]
    out: list[bytes] = []
    done: dict[str, int] = {}
    lines = index.read_bytes().split(b"\n")
    lines.pop()
    for number, raw in enumerate(lines, start=1):
        if raw.startswith(b'{"checkpoint"'):
            out.append(raw)
            continue
        try:
            leaf = _index_leaf.decode(raw)
        except ValueError as exc:
            raise ExportError(f"{INDEX_FILE}:{number}: {exc}") from None
        envs = runs.get(leaf.run_id, [])
        for offset, h in enumerate(leaf.hashes):
            seq = leaf.seq + offset
            if (seq != done.get(leaf.run_id, 0) or seq >= len(envs)
                    or _sha256(b"\x00" + envs[seq].payload).hexdigest() != h):
                raise ExportError(f"{INDEX_FILE}:{number}: the index and the run files "
                                  f"disagree at {leaf.run_id!r} seq {seq}")
            done[leaf.run_id] = seq + 1
            out.append(_encoder.encode(envs[seq]))
    for run_id, envs in runs.items():
        if done.get(run_id, 0) != len(envs):
            raise ExportError(f"run {run_id!r} holds records the index does not list")
    return log_id, True, out


def _sql_export_lines(url: str) -> tuple[str, Iterator[bytes]]:
    source = _sql_source(url)
    if source.log_id is None:
        source.items.close()  # type: ignore[attr-defined]
        raise ExportError(f"{url}: no log id in wp_meta")

    def lines() -> Iterator[bytes]:
        position = 0
        try:
            for item in source.items:
                if item.note is not None:
                    yield _encoder.encode(CheckpointLine(item.note))
                    continue
                position += 1
                if item.problem is not None:
                    raise ExportError(f"{url}: row {item.number}: {item.problem}")
                if item.number != position:
                    raise ExportError(f"{url}: record positions are not dense from 1 (rows "
                                      f"were deleted before row {item.number})")
                yield _encoder.encode(item.env)
        finally:
            source.items.close()  # type: ignore[attr-defined]

    return source.log_id, lines()


def export(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write the ledger of ``source`` (a JSONL store directory or a SQLAlchemy URL) to the
    new file ``out`` as an export file (see docs/AUDIT.md); returns the number of records.

    The export is a transcription, not a verification: records and checkpoints as stored,
    in global order.  Refuses (``ExportError``) a store whose records cannot be put in order
    (run files and index disagree, SQL positions with holes) and (``FileExistsError``) an
    existing ``out``.  A SQL ledger is streamed (memory stays flat)."""
    text = os.fspath(source)
    body: Iterable[bytes]
    if "://" in text:
        log_id, body = _sql_export_lines(text)
        ordered = True
    else:
        path = Path(text.removeprefix("jsonl:"))
        if not (path / "runs").is_dir():
            raise ExportError(f"{path}: not a JSONL store (no runs/ directory)")
        log_id, ordered, body = _jsonl_export(path)
    target = Path(out)
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} exists")
    stem = f".{target.name}.{os.getpid()}"
    lines_file = target.with_name(stem + ".lines")
    temp = target.with_name(stem + ".tmp")
    records = 0
    try:
        # The header states the record count, known only at the end: the lines go to a side
        # file first, then header and lines to the file that is linked into place.
        with open(lines_file, "xb") as f:
            for line in body:
                records += not line.startswith(b'{"checkpoint"')
                f.write(line + b"\n")
        header = _encoder.encode(ExportHeader(EXPORT_FORMAT, 1, log_id, ordered, records))
        with open(temp, "xb") as f, open(lines_file, "rb") as lines:
            f.write(header + b"\n")
            shutil.copyfileobj(lines, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.link(temp, target)  # never replaces an existing file
    finally:
        for leftover in (lines_file, temp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return records


# --- presentation ------------------------------------------------------------------------


def render_summary(report: Report) -> str:
    """A one-screen human summary of a report (the CLI prints it without ``--json``)."""
    lines = [
        f"{'OK' if report.ok else 'FAILED'}: {report.source} ({report.mode} mode, "
        f"{report.records} records in {report.runs} runs, {report.seconds:.2f}s)",
    ]
    e = report.error
    if e is not None:
        kind = "crash (torn write)" if report.crash else "error"
        lines.append(f"  first {kind}: {e.code} at {e.where}")
        if e.run_id is not None:
            lines.append(f"    run {e.run_id!r} seq {e.seq}")
        if e.expected is not None:
            lines.append(f"    expected {e.expected}")
        if e.actual is not None:
            lines.append(f"    actual   {e.actual}")
        if e.detail:
            lines.append(f"    {e.detail}")
    if report.keys:
        lines.append("  records per key:")
        lines.extend(f"    {k}  {n}" for k, n in report.keys.items())
    cp = report.checkpoint
    if cp is not None:
        lines.append(f"  last checkpoint: size {cp.size} root {cp.root[:16]}... at {cp.where}")
    elif report.uncovered is not None:
        lines.append("  no checkpoint covers this ledger")
    if report.uncovered is not None:
        lines.append(f"  records after the last checkpoint: {report.uncovered}")
    if report.unchecked:
        lines.append(f"  not checked here: {', '.join(report.unchecked)}")
    return "\n".join(lines)
