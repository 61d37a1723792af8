"""The store's additions of issue 13: ``expected_version: "exists"``, binary payloads,
filtered and backward log reads, and consumer positions (tracking), rule by rule over the
same in-memory log as tests/test_store.py."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store import TS, MemLog, append, ev

import walstore.store as store_module
from walstore.errors import ConflictError, CorruptionError, ValidationError
from walstore.event import EXISTS, FLAG_BINARY_PAYLOAD, NewEvent, StoredEvent, decode_event_body, encode_event_body
from walstore.service import Direction, LogRead
from walstore.store import HASH_MASK, KIND_EPOCH_START, EventStore


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


# ---------------------------------------------------------------- filtered and backward log reads


def _fill(store: EventStore, log: MemLog, spec: list[tuple[str, str]], *, epoch_every: int = 0) -> None:
    """Events (aggregate, type) in order, with a system record every ``epoch_every``."""
    for i, (aggregate_id, type_) in enumerate(spec, 1):
        append(store, log, ev(f"e{i}", aggregate_id, type_=type_))
        if epoch_every and i % epoch_every == 0:
            log.append(KIND_EPOCH_START, b"{}")
            log.apply_all(store)


def ids(read: LogRead) -> list[str]:
    return [e.id for e in read.events]


def idx(read: LogRead) -> list[int]:
    return [e.index for e in read.events]


def test_filters_match_types_and_prefix(store: EventStore, log: MemLog) -> None:
    _fill(store, log, [("order-1", "A"), ("user-1", "B"), ("order-2", "B"), ("order", "A"), ("ord", "C")])
    assert ids(store.read_log(1, 10, types=["B"])) == ["e2", "e3"]
    assert ids(store.read_log(1, 10, types=["A", "C"])) == ["e1", "e4", "e5"]
    assert ids(store.read_log(1, 10, aggregate_prefix="order")) == ["e1", "e3", "e4"]
    assert ids(store.read_log(1, 10, aggregate_prefix="order-", types=["B"])) == ["e3"]
    assert ids(store.read_log(1, 10, types=[])) == []
    assert ids(store.read_log(1, 10, types=["Z"])) == []
    # limit counts matching events; next_index follows the last one returned
    read = store.read_log(1, 1, types=["B"])
    assert ids(read) == ["e2"] and read.next_index == 3
    # nothing matched: the whole scan is done
    read = store.read_log(1, 10, types=["Z"])
    assert read.next_index == 6 and read.last_index == 5


def test_the_scan_budget_bounds_one_read(store: EventStore, log: MemLog) -> None:
    _fill(store, log, [("a", "Common")] * 30 + [("a", "Rare")], epoch_every=7)
    read = store.read_log(1, 10, types=["Rare"], scan_budget=10)
    assert read.events == [] and read.next_index == 11
    before = log.reads
    read = store.read_log(22, 10, types=["Rare"], scan_budget=10)
    assert [e.id for e in read.events] == ["e31"] and read.next_index == 32
    assert log.reads - before == 10  # the bodies it scanned, no more
    # unfiltered reads: the budget never cuts below limit
    assert len(store.read_log(1, 25, scan_budget=10).events) == 25


def test_backward_reads(store: EventStore, log: MemLog) -> None:
    _fill(store, log, [("a", "X"), ("b", "Y"), ("a", "X"), ("b", "Y"), ("a", "X")], epoch_every=2)
    read = store.read_log(0, 2, direction="backward")
    assert idx(read) == [5, 4] and read.next_index == 3
    assert idx(store.read_log(99, 100, direction="backward")) == [5, 4, 3, 2, 1]
    read = store.read_log(3, 100, direction="backward")
    assert idx(read) == [3, 2, 1] and read.next_index == 0
    read = store.read_log(5, 100, direction="backward", types=["Y"])
    assert idx(read) == [4, 2] and read.next_index == 0
    read = store.read_log(5, 2, direction="backward", aggregate_prefix="a", scan_budget=2)
    assert idx(read) == [5] and read.next_index == 3
    assert store.read_log(1, 1, direction="backward").next_index == 0
    for event in store.read_log(5, 5, direction="backward").events:
        assert event == store.read_log(event.index, 1).events[0]


def test_backward_read_of_an_empty_log(store: EventStore) -> None:
    read = store.read_log(0, 10, direction="backward")
    assert read.events == [] and read.next_index == 0 and read.last_index == 0


def test_filters_never_decode_non_matching_events(log: MemLog, monkeypatch: pytest.MonkeyPatch) -> None:
    store = EventStore(log)
    _fill(store, log, [("a", "Skip")] * 20 + [("b", "Take")])
    decoded: list[int] = []
    real = store_module._decode

    def counting(body: bytes | memoryview, event_index: int, log_index: int) -> StoredEvent:
        decoded.append(event_index)
        return real(body, event_index, log_index)

    monkeypatch.setattr(store_module, "_decode", counting)
    assert [e.index for e in store.read_log(1, 100, types=["Take"]).events] == [21]
    assert [e.index for e in store.read_log(0, 100, aggregate_prefix="b", direction="backward").events] == [21]
    assert decoded == [21, 21]


_TYPES = ["A", "B", "Cé"]
_AGGREGATES = ["o-1", "o-2", "o", "u-1", "ü"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.lists(st.tuples(st.sampled_from(_AGGREGATES), st.sampled_from(_TYPES)), max_size=40),
    epochs=st.integers(0, 5),
    types=st.none() | st.sets(st.sampled_from([*_TYPES, "Z"]), max_size=3),
    prefix=st.none() | st.sampled_from(["o", "o-", "u", "ü", "x", "o-1"]),
    direction=st.sampled_from(["forward", "backward"]),
    from_index=st.integers(0, 45),
    limit=st.integers(1, 12),
    budget=st.integers(1, 15),
)
def test_paged_filtered_reads_equal_a_reference_filter(
    spec: list[tuple[str, str]],
    epochs: int,
    types: set[str] | None,
    prefix: str | None,
    direction: Direction,
    from_index: int,
    limit: int,
    budget: int,
) -> None:
    log = MemLog()
    store = EventStore(log)
    _fill(store, log, spec, epoch_every=epochs)
    everything = store.read_log(1, len(spec) + 1).events
    assert len(everything) == len(spec)

    def wanted(e: StoredEvent) -> bool:
        return (types is None or e.type in types) and (prefix is None or e.aggregate_id.startswith(prefix))

    last = len(spec)
    if direction == "forward":
        start = max(from_index, 1)
        expected = [e.index for e in everything if e.index >= start and wanted(e)]
    else:
        start = last if not 0 < from_index <= last else from_index
        expected = [e.index for e in reversed(everything) if e.index <= start and wanted(e)]
    got: list[int] = []
    cursor = from_index
    for _ in range(200):
        read = store.read_log(
            cursor, limit, direction=direction, types=types, aggregate_prefix=prefix, scan_budget=budget
        )
        assert len(read.events) <= limit and read.last_index == last
        got += [e.index for e in read.events]
        assert all(wanted(e) for e in read.events)
        if direction == "forward":
            assert read.next_index >= max(cursor, 1)
            if read.next_index > last:
                break
        else:
            if read.next_index == 0:
                break
            assert read.next_index < (last if not 0 < cursor <= last else cursor)
        cursor = read.next_index
    assert got == expected
