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


@pytest.mark.parametrize(
    "body",
    [
        b"junk",
        b'[{"id":"1"}]',
        b'[{"id":"1","type":"T","aggregate_id":"a","payload_base64":"*","metadata":{},"expected_version":null}]',
        b'[{"id":"1","type":"T","aggregate_id":"a","payload":{},"metadata":{},"expected_version":"any"}]',
    ],
)
def test_junk_is_a_validation_error(body: bytes) -> None:
    with pytest.raises(ValidationError):
        decode_events(body)
