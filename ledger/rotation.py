"""Records that are not kernel transitions: ``key.rotated`` and ``run.sealed``.

* ``key.rotated`` hands a run's chain from one key to another, TUF-style: the record is signed
  by BOTH keys (one DSSE envelope, two signatures: old first, new second).  Its body is signed
  as the old key (``key_id``) and names the new one in ``key``.  After it, the old key may not
  sign in that run (``key_not_valid``); the trust root ends the old key's range for the rest of
  the ledger.  A rotation carrying only one valid signature proves nothing about the new key's
  holder and is ``rotation_unauthorized``.
* ``run.sealed`` closes a finished run: nothing may follow it (``state_violation``), and a
  finished run without one is ``missing_seal``.

Both carry the digest of the run's state, as kernel records do, so the stored state of their
line is covered too.  Both return the state with its ledger head moved, ready for
``store.commit(run_id, old.seq, state, [record])``.  Writing them from the runtime is
integration work.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from ..kernel.codec import digest, encode_state
from ..kernel.types import RunState
from .keys import Signer
from .records import (
    BODY_VERSION,
    Body,
    Record,
    Signature,
    encode_body,
    genesis,
    pae,
    record_hash,
)

ROTATED = "key.rotated"
SEALED = "run.sealed"
FINISHED = frozenset({"run.completed", "run.failed", "run.cancelled"})



def _sign(
    signer: Signer, cosigners: tuple[Signer, ...], log_id: str, state: RunState, kind: str,
    ts: datetime, key: str | None,
) -> tuple[RunState, Record]:
    seq = state.seq + 1
    body = encode_body(Body(
        v=BODY_VERSION, log_id=log_id, run_id=state.run_id, seq=seq,
        prev=state.head or genesis(log_id, state.run_id), kind=kind, ts=ts,
        key_id=signer.key_id, key=key,
        # The kernel's convention: the digest of the new state with seq/head still naming
        # the previous record; only seq/head change here, so that is ``state`` as given.
        state=digest(encode_state(state)),
    ))
    message = pae(body)
    rec = Record(
        run_id=state.run_id, seq=seq, key_id=signer.key_id, body=body,
        sig=signer.sign(message), hash=record_hash(body),
        cosigs=tuple(Signature(keyid=c.key_id, sig=c.sign(message)) for c in cosigners),
    )
    return msgspec.structs.replace(state, seq=seq, head=rec.hash), rec


def rotation_record(
    old: Signer, new: Signer, log_id: str, state: RunState, ts: datetime
) -> tuple[RunState, Record]:
    """A ``key.rotated`` record handing ``state``'s chain from ``old`` to ``new``."""
    return _sign(old, (new,), log_id, state, ROTATED, ts, new.key_id)


def seal_record(
    signer: Signer, log_id: str, state: RunState, ts: datetime
) -> tuple[RunState, Record]:
    """The ``run.sealed`` record closing a finished run."""
    return _sign(signer, (), log_id, state, SEALED, ts, None)
