"""The store's additions of issue 13: ``expected_version: "exists"``, binary payloads,
filtered and backward log reads, and consumer positions (tracking), rule by rule over the
same in-memory log as tests/test_store.py."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store import TS, MemLog, append, ev

import walstore.store as store_module
from walstore.errors import ConflictError, CorruptionError, EntriesReplaced, ValidationError
from walstore.event import (
    EXISTS,
    FLAG_BINARY_PAYLOAD,
    AppendResult,
    NewEvent,
    StoredEvent,
    Tracking,
    decode_event_body,
    decode_tracking_body,
    encode_event_body,
    encode_tracking_body,
)
from walstore.service import Direction, LogRead
from walstore.store import HASH_MASK, KIND_EPOCH_START, KIND_EVENT, KIND_TRACKING, EventStore, Prepared


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


# ---------------------------------------------------------------- consumer positions (tracking)


class TLog(MemLog):
    """The in-memory log, writing each prepared batch with its record kinds."""

    def write_prepared(self, store: EventStore, prepared: Prepared) -> int:
        first = len(self.records) + 1
        for kind, _, body in prepared.records():
            self.append(kind, body)
        store.pending_added(first, prepared)
        return first


@pytest.fixture
def tlog() -> TLog:
    return TLog()


@pytest.fixture
def tstore(tlog: TLog, mask: int) -> EventStore:
    return EventStore(tlog, hash_mask=mask)


def tappend(store: EventStore, log: TLog, events: list[NewEvent], tracking: Tracking | None) -> list[AppendResult]:
    log.apply_all(store)
    prepared = store.prepare(events, timestamp_us=TS, next_log_index=len(log.records) + 1, tracking=tracking)
    if prepared.bodies:
        log.write_prepared(store, prepared)
    log.apply_all(store)
    return store.results(prepared)


def test_tracking_commits_with_the_batch_and_only_grows(tstore: EventStore, tlog: TLog) -> None:
    assert tstore.consumer_position("c") is None
    results = tappend(tstore, tlog, [ev("1"), ev("2")], Tracking("c", 5))
    assert [r.index for r in results] == [1, 2]
    assert tstore.consumer_position("c") == 5
    # the tracking record is the batch's last record and carries BATCH_END; not an event
    assert [k for k, _ in tlog.records] == [KIND_EVENT, KIND_EVENT, KIND_TRACKING]
    assert tstore.last_applied_event_index == 2
    for position in (5, 4, 1):
        with pytest.raises(ConflictError) as info:
            tstore.prepare([ev("x")], tracking=Tracking("c", position))
        assert info.value.code == "tracking_conflict" and info.value.http_status == 409
        assert info.value.details == {"consumer": "c", "position": position, "stored_position": 5}
    # another consumer is independent; a tracking alone (no events) is a batch too
    assert tappend(tstore, tlog, [], Tracking("d", 1)) == []
    assert tappend(tstore, tlog, [ev("3")], Tracking("c", 6))[0].index == 3
    assert (tstore.consumer_position("c"), tstore.consumer_position("d")) == (6, 1)
    assert [e.id for e in tstore.read_log(1, 10).events] == ["1", "2", "3"]


def test_a_conflicting_batch_writes_nothing(tstore: EventStore, tlog: TLog) -> None:
    tappend(tstore, tlog, [ev("1")], Tracking("c", 3))
    before = list(tlog.records)
    with pytest.raises(ConflictError):
        tappend(tstore, tlog, [ev("2")], Tracking("c", 3))
    assert tlog.records == before and tstore.lookup("2") is None


def test_pending_tracking_counts_so_two_concurrent_batches_cannot_both_pass(tstore: EventStore, tlog: TLog) -> None:
    first = tstore.prepare([ev("1")], timestamp_us=TS, tracking=Tracking("c", 10))
    tlog.write_prepared(tstore, first)  # in flight, not applied
    with pytest.raises(ConflictError) as info:
        tstore.prepare([ev("2")], tracking=Tracking("c", 10))
    assert info.value.details["stored_position"] == 10
    with pytest.raises(ConflictError):
        tstore.prepare([], tracking=Tracking("c", 7))
    second = tstore.prepare([ev("2")], timestamp_us=TS, tracking=Tracking("c", 11))
    tlog.write_prepared(tstore, second)
    assert tstore.consumer_position("c") is None  # applied state only
    assert tstore.apply_own(len(tlog.records)) == 4  # events and tracking, from memory
    assert tstore.consumer_position("c") == 11
    assert [r.index for r in tstore.results(first)] == [1]
    assert [r.index for r in tstore.results(second)] == [2]
    # a leadership change forgets pending positions: only the applied one counts
    third = tstore.prepare([], timestamp_us=TS, tracking=Tracking("c", 12))
    tlog.write_prepared(tstore, third)
    tstore.pending_clear()
    tlog.truncate(4)
    tstore.prepare([], tracking=Tracking("c", 12))


def test_whole_repeat_with_its_tracking_is_idempotent(tstore: EventStore, tlog: TLog) -> None:
    first = tappend(tstore, tlog, [ev("1"), ev("2", "b")], Tracking("c", 5))
    records = len(tlog.records)
    assert tappend(tstore, tlog, [ev("1"), ev("2", "b")], Tracking("c", 5)) == first
    assert len(tlog.records) == records  # nothing written
    # a repeat of a pending batch waits for it, and is idempotent too
    pending = tstore.prepare([ev("3")], timestamp_us=TS, tracking=Tracking("c", 6))
    tlog.write_prepared(tstore, pending)
    again = tstore.prepare([ev("3")], timestamp_us=TS, tracking=Tracking("c", 6))
    assert again.bodies == [] and again.wait_log_index == len(tlog.records) - 1
    tlog.apply_all(tstore)
    assert tstore.results(again) == tstore.results(pending)
    # a partial repeat is a new batch: its tracking must move forward
    with pytest.raises(ConflictError):
        tstore.prepare([ev("1"), ev("new")], tracking=Tracking("c", 6))
    # a whole repeat whose tracking was never stored writes it now
    result = tappend(tstore, tlog, [ev("1")], Tracking("e", 1))
    assert result == first[:1] and tstore.consumer_position("e") == 1
    assert tlog.records[-1][0] == KIND_TRACKING


def test_rebuild_restores_positions(tlog: TLog, mask: int) -> None:
    store = EventStore(tlog, hash_mask=mask)
    tappend(store, tlog, [ev("1")], Tracking("c", 1))
    tlog.append(KIND_EPOCH_START, b"{}")
    tappend(store, tlog, [ev("2"), ev("3")], Tracking("c", 9))
    tappend(store, tlog, [], Tracking("d", 4))
    restarted = EventStore(tlog, hash_mask=mask)
    assert restarted.rebuild(tlog.as_records()) == len(tlog.records)
    assert (restarted.consumer_position("c"), restarted.consumer_position("d")) == (9, 4)
    assert [e.index for e in restarted.read_log(1, 10).events] == [1, 2, 3]
    with pytest.raises(ConflictError):
        restarted.prepare([], tracking=Tracking("c", 9))


def test_a_position_that_does_not_grow_in_the_log_is_corruption(tstore: EventStore, tlog: TLog) -> None:
    tappend(tstore, tlog, [], Tracking("c", 5))
    tlog.append(KIND_TRACKING, encode_tracking_body(Tracking("c", 5)))
    with pytest.raises(CorruptionError, match="position 5"):
        tlog.apply_all(tstore)
    assert tstore.consumer_position("c") == 5 and tstore.last_applied_log_index == 1


def test_a_diverged_log_drops_pending_tracking(tstore: EventStore, tlog: TLog) -> None:
    prepared = tstore.prepare([], timestamp_us=TS, tracking=Tracking("c", 3))
    tlog.write_prepared(tstore, prepared)
    tlog.truncate(0)
    tlog.append(KIND_EPOCH_START, b"{}")  # another leader's record where ours was
    tlog.apply_all(tstore)
    tstore.prepare([], tracking=Tracking("c", 3))  # no longer pending
    with pytest.raises(EntriesReplaced):
        tstore.results(prepared)


@pytest.mark.parametrize(
    "tracking", [Tracking("", 1), Tracking("c", 0), Tracking("c", -1), Tracking("x" * 257, 1), Tracking("c", 2**63)]
)
def test_bad_tracking_is_invalid(tstore: EventStore, tracking: Tracking) -> None:
    with pytest.raises(ValidationError):
        tstore.prepare([ev("1")], tracking=tracking)


def test_tracking_body_round_trip_and_damage() -> None:
    body = encode_tracking_body(Tracking("cönsumer", 2**63 - 1))
    assert decode_tracking_body(body, 1) == Tracking("cönsumer", 2**63 - 1)
    for damaged in (body[:10], body[:-1], b"\x02" + body[1:], body[:1] + b"\x01" + body[2:]):
        with pytest.raises(CorruptionError):
            decode_tracking_body(damaged, 1)


def test_tracking_kind_agrees_with_the_wal() -> None:
    from walstore.wal import record

    assert store_module.KIND_TRACKING == record.KIND_TRACKING
    assert record.KIND_NAMES[record.KIND_TRACKING] == "TRACKING"
