"""Checking JSONL run files: ``check_run_file`` for one, ``_check_files`` for a store's (in
worker processes when asked).

A sound run file is checked by a bulk pass (``_fast_run``) whose per-record work is C-level
``map``s: one decode of the file's lines and one encode back (``msgspec``'s
``decode_lines`` / ``encode_lines``: equal bytes prove the store's exact form, one commit
per line), the signatures back to back (``verify_all``), the bodies' canonical form by the
same decode-and-encode over all bodies joined by newlines, the stored states by maps.  It
never reports an error; anything it does not accept is checked again by the exact pass
(``_exact_run_file``), which parses each line strictly and feeds ``runcheck._RunChecker``, the
only judge of codes and positions.  The bulk pass is a speed device that knows the JSONL byte
layout, which is why it lives here and not next to the rules.

Chain mode checks links, not form: its bulk pass reads the bodies with a lenient JSON decoder
(unknown fields skipped, states not parsed), its exact pass by string search; on lines in the
store's form both read the same bodies.  What only the exact pass notices (so only in a file
the bulk pass declines for another reason) is form: an envelope naming another key than its
body, two commits on one line.  Each record's fields do come from its own body in both: a
body that is not exactly one JSON object is declined (see ``_bulk_run``).
"""

from __future__ import annotations

import base64
import os
from array import array
from binascii import hexlify
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import accumulate, chain, compress, repeat
from operator import attrgetter, itemgetter, neg
from pathlib import Path
from typing import Any, Literal

import msgspec

from ._verifycore import Progress, _encoder, _line_decoder, _sha256
from .records import PAYLOAD_TYPE, Body, Envelope, Signature, genesis, pae
from .rotation import FINISHED, ROTATED, SEALED
from .runcheck import (
    STARTED,
    RunResult,
    _body_encoder,
    _body_strict,
    _ChainFields,
    _Ctx,
    _file_name,
    _RunChecker,
)
from .sigverify import verify_all

_body_chain_fields = msgspec.json.Decoder(_ChainFields)


class _FastSignature(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """``records.Signature`` for the bulk pass (same fields; a test pins that)."""

    keyid: str
    sig: bytes


class _FastEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """``records.Envelope`` for the bulk pass, not tracked by the garbage collector: they
    hold no cycles, and leaving ~4 tracked objects per record out of the collector's
    generations saves about 1 us per record here.  The payload type can only be
    ``PAYLOAD_TYPE`` (the decoder hands back one shared string, no copy per record; a test
    pins it to ``records``) and there is exactly one signature (several - a rotation - or
    none fail to decode: the exact pass decides)."""

    payloadType: Literal["application/vnd.wakepoint.record+json"]  # DSSE spells it so
    payload: bytes
    signatures: tuple[_FastSignature]


class _FastLine(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    records: list[_FastEnvelope]
    state: msgspec.Raw


_line_decoder_fast = msgspec.json.Decoder(_FastLine)


class _ChainEnvelope(msgspec.Struct, gc=False):
    """Chain mode's bulk read of an envelope: the body only (other fields are skipped)."""

    payload: bytes


class _ChainLine(msgspec.Struct, gc=False):
    records: list[_ChainEnvelope]


_chain_line_decoder = msgspec.json.Decoder(_ChainLine)
_PAE_FORMAT = pae(b"").removesuffix(b"0 ") + b"%d %s"
"""``pae(body) == _PAE_FORMAT % (len(body), body)``: a C-level format (``map(pae, ...)``
ran a Python frame per record); a test pins the equality."""
_get_records = attrgetter("records")
_get_state = attrgetter("state")
_LINE_HEAD = b'{"records":'
_STATE_SEP = b',"state":'


def check_run_file(path: str, rel: str, ctx: _Ctx, expect_name: bool = True) -> RunResult:
    """Check one JSONL run file; ``rel`` is how positions name it.

    A bulk pass (``_fast_run``) checks a sound file with little interpreter work per record;
    anything it does not accept - damage, a rotation, a torn line - is checked again by the
    exact record-by-record pass, which alone decides the code and position of an error.
    """
    with open(path, "rb", buffering=0) as f:  # unbuffered: one read of the whole file
        data = f.readall()
    fast = _fast_run(data, rel, ctx, expect_name)
    return fast if fast is not None else _exact_run_file(data, rel, ctx, expect_name)


_LIFECYCLE = frozenset({STARTED, SEALED, ROTATED}) | FINISHED


_get_payload = attrgetter("payload")
_get_sigs = attrgetter("signatures")
_get_keyid = attrgetter("keyid")
_get_sig = attrgetter("sig")
_first = itemgetter(0)
_last = itemgetter(-1)
_OPEN, _CLOSE = {ord("{")}, {ord("}")}
"""The first and last byte of every body a bulk chain pass accepts (as sets of ints)."""
_get_seq = attrgetter("seq")
_get_prev = attrgetter("prev")
_get_kind = attrgetter("kind")
_get_key_id = attrgetter("key_id")
_get_run_id = attrgetter("run_id")
_get_log_id = attrgetter("log_id")
_get_state_digest = attrgetter("state")
# Hashing many messages: copies of a hash state (after the leaf prefix, or empty) fed by C-level
# maps.  Copying a state is cheaper than building a hash object (OpenSSL fetches the algorithm
# for each) and feeding the prefix to a copy spares a concatenated copy of every body:
# 0.88 -> 0.68 us per ~400-byte body here.
_LEAF_STATE = _sha256(b"\x00")
_EMPTY_STATE = _sha256()
_Hash = type(_EMPTY_STATE)


def _consume(it: Iterator[None]) -> None:
    deque(it, 0)


def _hash_states(start: Any, n: int) -> list[Any]:
    """``n`` copies of the hash state ``start``."""
    return list(map(_Hash.copy, repeat(start, n)))


def _leaf_hashes(bodies: list[bytes]) -> list[bytes]:
    """``SHA-256(0x00 || body)`` of each body (the record hashes)."""
    states = _hash_states(_LEAF_STATE, len(bodies))
    _consume(map(_Hash.update, states, bodies))
    return list(map(_Hash.digest, states))
_is_lifecycle = _LIFECYCLE.__contains__


class _FullFile(msgspec.Struct):
    """What the bulk pass of full mode has read and authenticated in one run file."""

    bodies: list[bytes]
    keyids: list[str]
    decoded: list[Body]
    counts: list[int]
    """Records per line."""
    states: list[msgspec.Raw]
    """The stored state of each line."""


def _fast_full(data: bytes, ctx: _Ctx) -> _FullFile | None:
    """Full mode's bulk read of a run file: every line in the store's exact form, one
    signature per record by a trusted record key that verifies, every body canonical."""
    # Exact form: the file decoded line by line and encoded back, one element per line, must
    # give the file's bytes back - which also proves one commit per line (an element spread
    # over two lines, or two on one line, cannot encode to the same bytes).  Two C calls.
    decoded_lines = _line_decoder_fast.decode_lines(data)
    if _encoder.encode_lines(decoded_lines) != data:
        return None
    per_line = list(map(_get_records, decoded_lines))
    counts = list(map(len, per_line))
    if 0 in counts:
        return None
    envs: list[_FastEnvelope] = list(chain.from_iterable(per_line))
    sigs = list(map(_first, map(_get_sigs, envs)))  # one each: the decoder checked
    keyids: list[str] = list(map(_get_keyid, sigs))
    publics = list(map(ctx.record_keys.get, keyids))
    if None in publics:
        return None
    bodies: list[bytes] = list(map(_get_payload, envs))
    if not verify_all(list(map(_get_sig, sigs)),
                      list(map(_PAE_FORMAT.__mod__, zip(map(len, bodies), bodies, strict=True))),
                      publics):  # type: ignore[arg-type]
        return None
    # Canonical bodies: the same proof as for the lines, over the bodies joined by newlines.
    # A body holding a newline would split in two; then the element count differs (the
    # encoded form has exactly one newline per element).
    joined = b"\n".join([*bodies, b""])
    decoded: list[Body] = _body_strict.decode_lines(joined)
    if len(decoded) != len(bodies) or _body_encoder.encode_lines(decoded) != joined:
        return None
    return _FullFile(bodies, keyids, decoded, counts, list(map(_get_state, decoded_lines)))


def _fast_run(data: bytes, rel: str, ctx: _Ctx, expect_name: bool) -> RunResult | None:
    """Bulk check of a whole run file; None means "not proven sound here, use the exact
    pass".  It never reports an error itself, so it only has to be sound, not precise.

    Speed: per record there is as little interpreter work as possible - every per-record
    step is a ``map`` of a C function (attribute getters, decoders, hashing, the libsodium
    call, one decode of the file's lines) over a whole file's records."""
    try:
        return _bulk_run(data, rel, ctx, expect_name)
    except (ValueError, KeyError, IndexError):  # msgspec errors and bad UTF-8 among them
        return None


def _bulk_run(data: bytes, rel: str, ctx: _Ctx, expect_name: bool) -> RunResult | None:
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
        # Chain mode checks no form (module docstring): one lenient decode of the lines.
        if not data.startswith(_LINE_HEAD):
            return None
        bodies = list(map(_get_payload, chain.from_iterable(map(
            _get_records, _chain_line_decoder.decode_lines(data)))))
        if not bodies:
            return None
        # The bodies are decoded joined by newlines (one call: decoding each on its own
        # costs ~0.65 us more per record).  That reader takes any number of documents per
        # line, so the count alone proves nothing (an empty body and a body of two
        # documents make it up).  It does once every body starts with "{" and ends with
        # "}": each then yields at least one document, and none can run on into the next
        # ("}" then "{" never continues a JSON value), so n bodies giving n documents give
        # one each, in order.
        n_bodies = len(bodies)
        if set(map(_first, bodies)) != _OPEN or set(map(_last, bodies)) != _CLOSE:
            return None
        joined = b"\n".join([*bodies, b""])
        decoded_bodies = _body_chain_fields.decode_lines(joined)
        if len(decoded_bodies) != n_bodies:
            return None
        keyids = list(map(_get_key_id, decoded_bodies))  # unsigned: the bodies' key ids
    n = len(bodies)
    first = decoded_bodies[0]
    run_id, log_id = first.run_id, ctx.log_id or first.log_id
    if expect_name and Path(rel).stem != _file_name(run_id):
        return None
    hashes = _leaf_hashes(bodies)
    leaves = b"".join(hashes)
    kinds = list(map(_get_kind, decoded_bodies))
    # The links, compared as one string: every prev 64 characters long, so the joined
    # strings are equal only when each prev is its predecessor's hash (or the genesis).
    prevs = list(map(_get_prev, decoded_bodies))
    if (
        list(map(_get_seq, decoded_bodies)) != list(range(n))
        or set(map(len, prevs)) != {64}
        or "".join(prevs) != genesis(log_id, run_id) + leaves[:-32].hex()
        or set(map(_get_run_id, decoded_bodies)) != {run_id}
        or set(map(_get_log_id, decoded_bodies)) != {log_id}
        or (full is not None and list(map(_get_key_id, decoded_bodies)) != keyids)
        or kinds[0] != STARTED
        or not _lifecycle_ok(kinds, ctx.require_seals)
    ):
        return None
    lines = slots = b""
    if full is not None:
        if not _states_ok(full.counts, full.states, hashes, full.decoded):
            return None
        lines, slots = _positions(full.counts)
    keys = dict(Counter(keyids))
    segments = [(i, k) for i, k in enumerate(keyids) if not i or keyids[i - 1] != k] \
        if len(keys) > 1 else [(0, keyids[0])]
    return RunResult(
        path=rel, run_id=run_id, log_id=first.log_id, leaves=leaves,
        lines=lines, slots=slots, key_segments=segments, keys=keys,
    )


_TAIL = b',"seq":%d,"head":"%s"}'


def _states_ok(counts: list[int], states: list[msgspec.Raw], hashes: list[bytes],
               bodies: Sequence[Body]) -> bool:
    """Each line's stored state is the one its last record signed (see ``check_state``):
    it ends with ``,"seq":<last>,"head":"<its hash>"}``, and with that ending swapped for
    the one naming the record before, its SHA-256 is the last record's ``state`` digest.
    Every step is a C-level ``map`` over the lines (no Python frame per line)."""
    n = len(hashes)
    # tails[k + 1]: how a state whose last record is k ends (tails[0]: before any record).
    tails = list(map(_TAIL.__mod__, zip(range(-1, n), [b"", *map(hexlify, hashes)],
                                        strict=True)))
    m = len(counts)
    if m == n:  # one record per line, the common case
        new, old = tails[1:], tails[:-1]
        digests = list(map(_get_state_digest, bodies))
    elif counts.count(1) == m - 1 and counts[-1] > 1:  # a finish and seal in the last line
        new, old = tails[1:m], tails[:m - 1]
        new.append(tails[n])
        old.append(tails[n - 1])
        digests = list(map(_get_state_digest, bodies[:m - 1]))
        digests.append(bodies[n - 1].state)
    else:
        ends = list(accumulate(counts))
        lasts = [k - 1 for k in ends]
        new = list(map(tails.__getitem__, ends))
        old = list(map(tails.__getitem__, lasts))
        digests = list(map(_get_state_digest, map(bodies.__getitem__, lasts)))
    raw = list(map(bytes, states))
    if not all(map(bytes.endswith, raw, new)):
        return False
    # SHA-256 of each state with its ending swapped: the state without the ending, then
    # the old ending, fed to copies of an empty hash state (no concatenated copies).
    hs = _hash_states(_EMPTY_STATE, len(raw))
    _consume(map(_Hash.update, hs, map(bytes.__getitem__, raw, map(slice, map(neg, map(
        len, new))))))
    _consume(map(_Hash.update, hs, old))
    return list(map(_Hash.hexdigest, hs)) == digests


def _positions(counts: list[int]) -> tuple[bytes, bytes]:
    """``RunResult.lines`` and ``.slots`` of a file whose lines hold ``counts`` records.
    Built for one record per line, with the few lines that hold more (a run's finish and
    seal are one commit) spliced in; many such lines take the general construction."""
    n = len(counts)
    multi = list(compress(range(n), map((1).__ne__, counts)))
    if len(multi) > 8:
        line_of = array("I", chain.from_iterable(map(repeat, range(1, n + 1), counts)))
        slots = array("H", chain.from_iterable(map(range, counts)))
        return line_of.tobytes(), slots.tobytes()
    line_of = array("I", range(1, n + 1))
    slots = array("H", [0]) * n
    for i in reversed(multi):  # from the end, so earlier indices stay put
        extra = counts[i] - 1
        line_of[i + 1:i + 1] = array("I", [i + 1]) * extra
        slots[i + 1:i + 1] = array("H", range(1, extra + 1))
    return line_of.tobytes(), slots.tobytes()


def _lifecycle_ok(kinds: list[str], require_seals: bool) -> bool:
    """One start, at seq 0; a finish only last or just before the seal; a seal only last and
    only after a finish.  Rotations are left to the exact pass (they change who may sign).
    Only the records of a lifecycle kind are visited (found by a C-level ``compress``)."""
    n = len(kinds)
    finished = False
    for i in compress(range(n), map(_is_lifecycle, kinds)):
        k = kinds[i]
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
        # An empty file is not a run: the JSONL store makes a run's file empty to lock it
        # before its first line, so a crash or a power loss can leave one behind (the store
        # treats it as a create that never returned).  It holds no record to verify; records
        # the index lists for it are the index walk's to report (``index_mismatch``).
        return chk.result(None, None)
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
