"""Checking one run's records in order: ``_RunChecker``, its context ``_Ctx`` and its outcome
``RunResult``.

The checker applies the per-record rules 2-7 of ``ledger.verify`` (trust, signature, strict
body, chain, lifecycle, rotation, stored state, seal) to envelopes in seq order, and it alone
decides the code and position of a bad record.  It does no I/O: whatever reads the storage
feeds it - ``runfile`` (a JSONL run file, line by line) and ``stream`` (SQL rows and export
lines, one checker per run) - so every source reports the same codes for the same damage.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import msgspec

from ._verifycore import _sha256
from .records import PAYLOAD_TYPE, Body, Envelope, genesis, pae
from .report import Problem
from .rotation import FINISHED, ROTATED, SEALED
from .sigverify import ed25519_verify
from .trust import TrustRoot

STARTED = "run.started"


class _ChainFields(msgspec.Struct, frozen=True):
    """Only what the bulk pass of chain mode reads (decoding fewer fields is faster)."""

    log_id: str
    run_id: str
    seq: int
    prev: str
    kind: str
    key_id: str


class _Chain(_ChainFields, frozen=True):
    """The body fields the chain checks need (lenient: used by ``chain`` mode)."""

    key: str | None = None
    state: str | None = None


_body_strict = msgspec.json.Decoder(Body)
_body_lenient = msgspec.json.Decoder(_Chain)


_body_encoder = msgspec.json.Encoder(order="sorted")


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


def _ctx(trust: TrustRoot, mode: str, require_seals: bool, log_id: str | None) -> _Ctx:
    record = trust.publics("record")
    return _Ctx(record_keys=record, other_keys=[k for k in trust.keys if k not in record],
                log_id=trust.log_id or log_id, mode=mode, require_seals=require_seals)
