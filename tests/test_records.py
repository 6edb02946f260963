"""The record body's canonical form: sorted keys, absent fields omitted, no whitespace.

``Body`` declares its fields in sorted order so that the writer encodes it without sorting
at every record; these tests pin that the bytes are exactly msgspec's sorted-key form.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from wakepoint.ledger.records import Body, encode_body, parse_body

_sorted = msgspec.json.Encoder(order="sorted")
_text = st.text(max_size=12)
_optional = st.none() | _text


def test_body_fields_are_declared_in_sorted_order() -> None:
    assert list(Body.__struct_fields__) == sorted(Body.__struct_fields__)


@given(
    effect=_optional, key=_optional, key_id=_text, kind=_text, log_id=_text, next=_optional,
    node=_optional, payload=_optional, prev=_text, run_id=_text,
    seq=st.integers(0, 2**62), state=_optional, seconds=st.integers(0, 10**9),
)
@settings(deadline=None)  # a stalled machine must not fail an example on time alone
def test_encode_body_is_the_sorted_key_form(
    effect: str | None, key: str | None, key_id: str, kind: str, log_id: str,
    next: str | None, node: str | None, payload: str | None, prev: str, run_id: str,
    seq: int, state: str | None, seconds: int,
) -> None:
    body = Body(
        v=1, log_id=log_id, run_id=run_id, seq=seq, prev=prev, kind=kind,
        ts=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds, microseconds=seq % 10**6),
        key_id=key_id, node=node, next=next, effect=effect, key=key, payload=payload, state=state,
    )
    data = encode_body(body)
    assert data == _sorted.encode(body)
    keys = list(json.loads(data))
    assert keys == sorted(keys)
    assert None not in json.loads(data).values()  # absent fields are omitted, not null
    assert parse_body(data) == body
