"""The signed ledger: record encoding, hash chain, keys, and chain verification.

Every committed transition of a run becomes one DSSE-enveloped, Ed25519-signed record whose
``prev`` links to the record before it.  See ``records`` for the exact format.
"""

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

__all__ = [
    "PAYLOAD_TYPE",
    "Body",
    "Envelope",
    "KeyFileError",
    "Record",
    "Signature",
    "Signer",
    "from_envelope",
    "genesis",
    "key_id_of",
    "pae",
    "parse_body",
    "record_hash",
    "sign_entries",
    "verify_chain",
]
