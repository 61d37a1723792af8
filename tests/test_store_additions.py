"""The store's additions of issue 13: ``expected_version: "exists"``, binary payloads,
filtered and backward log reads, and consumer positions (tracking), rule by rule over the
same in-memory log as tests/test_store.py."""

from __future__ import annotations

import pytest
from test_store import TS, MemLog, append, ev

from walstore.errors import ConflictError, CorruptionError, ValidationError
from walstore.event import EXISTS, FLAG_BINARY_PAYLOAD, NewEvent, decode_event_body, encode_event_body
from walstore.store import HASH_MASK, EventStore


@pytest.fixture(params=[HASH_MASK, 0], ids=["hash64", "all-collide"])
def mask(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def log() -> MemLog:
    return MemLog()


@pytest.fixture
def store(log: MemLog, mask: int) -> EventStore:
    return EventStore(log, hash_mask=mask)


def binary_event(event_id: str, payload: bytes, aggregate_id: str = "bin") -> NewEvent:
    return NewEvent(event_id, "Blob", aggregate_id, payload, b"{}", None, binary=True)


# ---------------------------------------------------------------- expected_version "exists"


def test_exists_needs_at_least_one_event(store: EventStore, log: MemLog) -> None:
    with pytest.raises(ConflictError) as info:
        store.prepare([NewEvent("1", "T", "a", b"{}", b"{}", EXISTS)])
    assert info.value.code == "wrong_expected_version"
    assert info.value.details == {"aggregate_id": "a", "expected_version": "exists", "current_version": 0}
    # the batch's earlier events count: [a exp 0, a exp exists] appends both
    results = append(
        store, log, NewEvent("1", "T", "a", b"{}", b"{}", 0), NewEvent("2", "T", "a", b"{}", b"{}", EXISTS)
    )
    assert [r.version for r in results] == [1, 2]
    assert [r.version for r in append(store, log, NewEvent("3", "T", "a", b"{}", b"{}", EXISTS))] == [3]
    # a pending event counts too
    prepared = store.prepare([NewEvent("4", "T", "p", b"{}", b"{}", None)], timestamp_us=TS)
    store.pending_added(log.write(prepared.bodies), prepared)
    store.prepare([NewEvent("5", "T", "p", b"{}", b"{}", EXISTS)])


@pytest.mark.parametrize("expected", [-1, "Exists", "", 1.5, True])
def test_other_expected_values_are_invalid(store: EventStore, expected: object) -> None:
    with pytest.raises(ValidationError) as info:
        store.prepare([NewEvent("1", "T", "a", b"{}", b"{}", expected)])  # type: ignore[arg-type]
    assert info.value.code == "invalid_expected_version"


# ---------------------------------------------------------------- binary payloads


@pytest.mark.parametrize("payload", [b"", b"\x00", bytes(range(256)), b"{}", b"\xff" * 1000])
def test_binary_payload_round_trips_exactly(store: EventStore, log: MemLog, payload: bytes) -> None:
    (result,) = append(store, log, binary_event("b1", payload))
    (stored,) = store.read_log(result.index, 1).events
    assert stored.binary is True and stored.payload == payload
    assert store.read_aggregate("bin").events[0].payload == payload
    # byte 1 of the body is the flags byte
    raw = log.records[-1][1]
    assert raw[1] == FLAG_BINARY_PAYLOAD


def test_json_events_have_flags_zero_and_read_as_json(store: EventStore, log: MemLog) -> None:
    append(store, log, ev("j1", payload=b'{"a":1}'))
    assert log.records[-1][1][1] == 0
    assert store.read_log(1, 1).events[0].binary is False


def test_binary_repeat_compares_bytes_exactly(store: EventStore, log: MemLog) -> None:
    first = append(store, log, binary_event("b1", b"\x01\x02"))
    assert append(store, log, binary_event("b1", b"\x01\x02")) == first
    for other in (b"\x01\x03", b"\x01\x02\x00", b""):
        with pytest.raises(ConflictError) as info:
            store.prepare([binary_event("b1", other)])
        assert info.value.code == "duplicate_event_id"
    # the same bytes as JSON text are another event
    with pytest.raises(ConflictError):
        store.prepare([NewEvent("b1", "Blob", "bin", b"\x01\x02", b"{}", None)])
    # JSON whose text is the same bytes, binary vs. not
    append(store, log, NewEvent("j", "Blob", "bin", b'{"a":1}', b"{}", None))
    with pytest.raises(ConflictError):
        store.prepare([binary_event("j", b'{"a":1}')])


def test_binary_repeat_of_a_pending_event(store: EventStore, log: MemLog) -> None:
    prepared = store.prepare([binary_event("b1", b"\x00\x01")], timestamp_us=TS)
    store.pending_added(log.write(prepared.bodies), prepared)
    store.prepare([binary_event("b1", b"\x00\x01")])
    with pytest.raises(ConflictError):
        store.prepare([binary_event("b1", b"\x00\x02")])


def test_unknown_body_flags_are_corruption() -> None:
    body = bytearray(encode_event_body(binary_event("b", b"x"), 1, TS))
    body[1] = 0x02
    with pytest.raises(CorruptionError):
        decode_event_body(bytes(body), 1)
