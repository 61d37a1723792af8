"""FORWARD's JSON of events (follower -> leader) keeps what validation accepted: binary
payloads byte for byte, ``expected_version`` "exists", and tracking."""

from __future__ import annotations

import pytest

from walstore.errors import ValidationError
from walstore.event import EXISTS, NewEvent
from walstore.replication.forward import decode_events, encode_events


def test_binary_payload_and_exists_survive_forwarding() -> None:
    events = [
        NewEvent("1", "T", "a", bytes(range(256)), b'{"m":1}', EXISTS, binary=True),
        NewEvent("2", "T", "a", b'{"x":[1,2]}', b"{}", 3),
        NewEvent("3", "T", "b", b"{}", b"{}", None),
    ]
    assert decode_events(encode_events(events)) == events


def test_the_clients_json_text_survives_forwarding_exactly() -> None:
    # Key order, the digits of decimals and of integers past 64 bits, and escapes: what
    # walstore.json_text kept on the follower is what the leader stores.
    payload = b'{"z":1.10,"a":123456789012345678901234567890,"e":1E+2,"s":"\\u00e9"}'
    events = [NewEvent("1", "T", "a", payload, b'{"b":2,"a":-0.0}', None)]
    (decoded,) = decode_events(encode_events(events))
    assert decoded.payload == payload and decoded.metadata == b'{"b":2,"a":-0.0}'


@pytest.mark.parametrize(
    "body",
    [
        b"junk",
        b'[{"id":"1"}]',
        b'[{"id":"1","type":"T","aggregate_id":"a","payload_base64":"*","metadata":{},"expected_version":null}]',
        b'[{"id":"1","type":"T","aggregate_id":"a","payload_text":"{}","metadata_text":"{}","expected_version":"any"}]',
        b'[{"id":"1","type":"T","aggregate_id":"a","payload_text":{},"metadata_text":"{}","expected_version":null}]',
    ],
)
def test_junk_is_a_validation_error(body: bytes) -> None:
    with pytest.raises(ValidationError):
        decode_events(body)
