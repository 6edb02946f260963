"""The auditor's trust root: which public keys may sign what, and over which ledger positions.

A trust root is a JSON file, given to an auditor out of band (it is never read from the ledger
being audited)::

    {"v": 1,
     "log_id": "jsonl-3f2a..." | null,
     "keys": [{"key_id": "ed25519:0123456789abcdef",
               "public": "<base64 32-byte Ed25519 key>",
               "roles": ["record", "checkpoint"],
               "valid_from": 0, "valid_until": null, "revoked_at": null}]}

* ``key_id`` must be ``key_id_of(public)``; a trust root that disagrees is refused on load.
* Roles: ``record`` signs ledger records (and co-signs a ``key.rotated`` record),
  ``checkpoint`` signs checkpoints.
* Positions are 0-based global ledger positions (the leaf index in the store-wide order the
  checkpoints commit to).  A key may sign the records at positions ``valid_from <= p <
  valid_until``; ``revoked_at`` (TUF-like revocation with an effective position) ends the range
  too, and is kept apart from ``valid_until`` so the report can say which one applied.
  ``null`` means unbounded.  A checkpoint of size n is signed between positions n - 1 and
  n, so a key valid at either may sign it (across a rotation at p, both keys' checkpoints of
  size p stand).
* Rotation (``rotate``; ``wakepoint keys rotate --trust``): the new key is valid from the
  rotation position with the old key's roles, and the old key is revoked from that position.
  The ``key.rotated`` record that hands each run over is signed by both keys and may come after
  that position (the runtime writes it lazily, at the run's next commit); the verifier checks
  it against the *new* key's range, so a revoked old key can still co-sign a hand-over but
  nothing else.
* ``log_id``: when set, the ledger's log id must match it (``run_mismatch`` otherwise), so
  validly signed records of another ledger under the same key are rejected.

Parsing is strict: unknown fields and duplicate key ids are ``TrustError`` (a usage error for
the CLI, exit 2), never a verification failure.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import msgspec

from ..kernel.errors import WakepointError
from .keys import Signer, key_id_of

Role = Literal["record", "checkpoint"]
ROLES: tuple[Role, ...] = ("record", "checkpoint")


class TrustError(WakepointError):
    """A trust root file is unreadable or inconsistent."""


class TrustedKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One key of the trust root."""

    key_id: str
    public: bytes
    roles: tuple[Role, ...] = ROLES
    valid_from: int = 0
    valid_until: int | None = None
    revoked_at: int | None = None

    def invalid_at(self, position: int | None) -> str | None:
        """Why this key may not sign at ``position`` (None: it may).  ``position`` None
        (no global order known) checks nothing."""
        if position is None:
            return None
        if position < self.valid_from:
            return f"{self.key_id} is valid from position {self.valid_from}, used at {position}"
        if self.revoked_at is not None and position >= self.revoked_at:
            return f"{self.key_id} is revoked from position {self.revoked_at}, used at {position}"
        if self.valid_until is not None and position >= self.valid_until:
            return f"{self.key_id} is valid until position {self.valid_until}, used at {position}"
        return None


class _TrustFile(msgspec.Struct, forbid_unknown_fields=True):
    v: int
    keys: list[TrustedKey]
    log_id: str | None = None


_decoder = msgspec.json.Decoder(_TrustFile)
_encoder = msgspec.json.Encoder()


class TrustRoot:
    """The keys an auditor trusts, by key id."""

    __slots__ = ("keys", "log_id")

    def __init__(self, keys: Iterable[TrustedKey], log_id: str | None = None) -> None:
        if log_id == "":
            # An empty log id would read as "none given" and let the ledger name its own.
            raise TrustError("log_id is empty: give the ledger's log id, or leave it out")
        self.log_id = log_id
        self.keys: dict[str, TrustedKey] = {}
        for k in keys:
            if k.valid_from < 0 or (k.valid_until is not None and k.valid_until < k.valid_from):
                raise TrustError(f"key {k.key_id}: validity range [{k.valid_from}, "
                                 f"{k.valid_until}) is not a range of ledger positions")
            if k.revoked_at is not None and k.revoked_at < k.valid_from:
                raise TrustError(f"key {k.key_id}: revoked at {k.revoked_at}, before its "
                                 f"validity begins ({k.valid_from})")
            if len(k.public) != 32:
                raise TrustError(f"key {k.key_id}: an Ed25519 public key is 32 bytes")
            if key_id_of(k.public) != k.key_id:
                raise TrustError(f"key id {k.key_id} does not match its public key "
                                 f"({key_id_of(k.public)})")
            if k.key_id in self.keys:
                raise TrustError(f"key {k.key_id} is listed twice")
            if not k.roles or len(set(k.roles)) != len(k.roles):
                raise TrustError(f"key {k.key_id}: roles must be non-empty and distinct")
            self.keys[k.key_id] = k

    @classmethod
    def from_signers(
        cls, signers: Iterable[Signer], *, log_id: str | None = None,
        roles: tuple[Role, ...] = ROLES,
    ) -> TrustRoot:
        """A trust root holding the public halves of ``signers``, unbounded."""
        return cls([TrustedKey(key_id=s.key_id, public=s.public, roles=roles) for s in signers],
                   log_id=log_id)

    @classmethod
    def loads(cls, data: bytes | str) -> TrustRoot:
        """Parse a trust root document."""
        try:
            doc = _decoder.decode(data)
        except (msgspec.DecodeError, binascii.Error, UnicodeDecodeError) as exc:
            raise TrustError(f"not a trust root: {exc}") from None
        if doc.v != 1:
            raise TrustError(f"unsupported trust root version {doc.v}")
        return cls(doc.keys, log_id=doc.log_id)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrustRoot:
        """Read a trust root file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise TrustError(f"{path}: {exc.strerror or exc}") from None
        try:
            return cls.loads(data)
        except TrustError as exc:
            raise TrustError(f"{path}: {exc}") from None

    def to_json(self) -> bytes:
        """The document ``loads`` reads (keys sorted by id)."""
        doc = _TrustFile(v=1, keys=[self.keys[k] for k in sorted(self.keys)], log_id=self.log_id)
        return _encoder.encode(doc)

    def with_key(self, key: TrustedKey) -> TrustRoot:
        """A copy with ``key`` added or replaced."""
        keys = dict(self.keys)
        keys[key.key_id] = key
        return TrustRoot(keys.values(), log_id=self.log_id)

    def revoke(self, key_id: str, at: int) -> TrustRoot:
        """A copy in which ``key_id`` is revoked from global position ``at`` on."""
        try:
            key = self.keys[key_id]
        except KeyError:
            raise TrustError(f"no key {key_id} to revoke") from None
        return self.with_key(msgspec.structs.replace(key, revoked_at=at))

    def rotate(self, old_key_id: str, new: Signer, at: int) -> TrustRoot:
        """A copy in which ``new`` takes over from ``old_key_id`` at global position ``at``:
        the new key holds the old one's roles from ``at`` on, the old key is revoked from
        ``at``.  Refuses a negative position, an unknown old key, a new key already trusted,
        and a position before the old key's own start."""
        if at < 0:
            raise TrustError(f"rotation position {at} is negative")
        try:
            old = self.keys[old_key_id]
        except KeyError:
            raise TrustError(f"the trust root does not hold the key being rotated "
                             f"({old_key_id})") from None
        if new.key_id in self.keys:
            raise TrustError(f"the new key {new.key_id} is already in the trust root")
        if at < old.valid_from:
            raise TrustError(f"rotation position {at} is before {old_key_id} became valid "
                             f"({old.valid_from})")
        if old.revoked_at is not None and old.revoked_at < at:
            raise TrustError(f"{old_key_id} is already revoked from position {old.revoked_at}")
        added = TrustedKey(key_id=new.key_id, public=new.public, roles=old.roles,
                           valid_from=at)
        return self.revoke(old_key_id, at).with_key(added)

    def publics(self, role: Role) -> dict[str, bytes]:
        """Key id -> raw public key of the keys holding ``role``."""
        return {k.key_id: k.public for k in self.keys.values() if role in k.roles}

    def __repr__(self) -> str:
        return f"TrustRoot({sorted(self.keys)!r}, log_id={self.log_id!r})"
