"""The signed ledger: record encoding, hash chain, keys, and chain verification.

Every committed transition of a run becomes one DSSE-enveloped, Ed25519-signed record whose
``prev`` links to the record before it.  See ``records`` for the exact format, ``merkle`` and
``checkpoint`` for RFC 6962 trees and C2SP checkpoints, ``trust`` for the auditor's trust
root, ``logindex`` for a JSONL store's global order, ``rotation`` for ``key.rotated`` and
``run.sealed``, and ``verify`` for the auditor's verifier and the portable export file
(``export``).

``wakepoint.ledger.verify`` is the verifier *function* (the issue's public name); its module
is reached as ``from wakepoint.ledger.verify import ...`` or via ``sys.modules``.
"""

from .checkpoint import Checkpoint, CheckpointError, open_checkpoint, sign_checkpoint
from .keys import KeyFileError, Signer, key_id_of
from .records import (
    PAYLOAD_TYPE,
    Body,
    Envelope,
    Record,
    Signature,
    from_envelope,
    genesis,
    pae,
    parse_body,
    record_hash,
    sign_entries,
    verify_chain,
)
from .rotation import rotation_record, seal_record
from .trust import TrustedKey, TrustError, TrustRoot
from .verify import (
    ExportError,
    ExportHeader,
    Problem,
    Report,
    VerifyUsageError,
    export,
    render_summary,
    stored_checkpoints,
    verify,
)

__all__ = [
    "PAYLOAD_TYPE",
    "Body",
    "Checkpoint",
    "CheckpointError",
    "Envelope",
    "ExportError",
    "ExportHeader",
    "KeyFileError",
    "Problem",
    "Record",
    "Report",
    "Signature",
    "Signer",
    "TrustError",
    "TrustRoot",
    "TrustedKey",
    "VerifyUsageError",
    "export",
    "from_envelope",
    "genesis",
    "key_id_of",
    "open_checkpoint",
    "pae",
    "parse_body",
    "record_hash",
    "render_summary",
    "rotation_record",
    "seal_record",
    "sign_checkpoint",
    "sign_entries",
    "stored_checkpoints",
    "verify",
    "verify_chain",
]
