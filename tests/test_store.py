"""The event store state machine, rule by rule, over an in-memory log of encoded bodies.

Most tests run twice: with the real 64-bit hash and with ``hash_mask=0``, where every id
and every aggregate id hashes to the same key, so each rule is also checked through the
collision paths (overflow dicts, verified hits).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from walstore.errors import ConflictError, CorruptionError, EntriesReplaced, LogStateError, NotCaughtUp, ValidationError
from walstore.event import MAX_BATCH_EVENTS, AppendResult, NewEvent, encode_event_body
from walstore.store import (
    HASH_MASK,
    KIND_EPOCH_START,
    KIND_EVENT,
    KIND_NOOP,
    LONG_AGGREGATE_EVENTS,
    EventStore,
    Prepared,
)

TS = 1_700_000_000_000_000


@dataclass(frozen=True)
class Rec:
    index: int
    kind: int
    body: bytes | memoryview


class MemLog:
    """The log as the store sees it: records at log indexes 1..N, read back by index."""

    def __init__(self) -> None:
        self.records: list[tuple[int, bytes]] = []
        self.reads = 0

    def body(self, log_index: int) -> bytes:
        if not 1 <= log_index <= len(self.records):
            raise LogStateError(f"no record {log_index}")
        self.reads += 1
        return self.records[log_index - 1][1]

    def append(self, kind: int, body: bytes = b"") -> int:
        self.records.append((kind, body))
        return len(self.records)

    def write(self, bodies: list[bytes]) -> int:
        first = len(self.records) + 1
        for body in bodies:
            self.append(KIND_EVENT, body)
        return first

    def truncate(self, last: int) -> None:
        del self.records[last:]

    def apply_all(self, store: EventStore, through: int | None = None) -> None:
        end = len(self.records) if through is None else through
        for log_index in range(store.last_applied_log_index + 1, end + 1):
            kind, body = self.records[log_index - 1]
            store.apply(log_index, kind, body)

    def as_records(self) -> Iterator[Rec]:
        for i, (kind, body) in enumerate(self.records, 1):
            yield Rec(i, kind, body)


def ev(
    event_id: str,
    aggregate_id: str = "agg",
    *,
    expected: int | None = None,
    payload: bytes = b"{}",
    type_: str = "Happened",
) -> NewEvent:
    return NewEvent(event_id, type_, aggregate_id, payload, b'{"m":1}', expected)


def body(event_id: str, aggregate_id: str, version: int, payload: bytes = b"{}") -> bytes:
    return encode_event_body(ev(event_id, aggregate_id, payload=payload), version, TS)


@pytest.fixture(params=[HASH_MASK, 0], ids=["hash64", "all-collide"])
def mask(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def log() -> MemLog:
    return MemLog()


@pytest.fixture
def store(log: MemLog, mask: int) -> EventStore:
    return EventStore(log, hash_mask=mask)


def append(store: EventStore, log: MemLog, *events: NewEvent) -> list[AppendResult]:
    """The leader path: prepare, write, pending_added, commit and apply, results."""
    log.apply_all(store)  # a leader serves writes once it has applied its epoch start
    prepared = store.prepare(events, timestamp_us=TS, next_log_index=len(log.records) + 1)
    if prepared.bodies:
        store.pending_added(log.write(prepared.bodies), prepared)
    log.apply_all(store)
    return store.results(prepared)


# ---------------------------------------------------------------- applying and positions


def test_apply_in_order_and_refuse_gaps_and_repeats(store: EventStore, log: MemLog) -> None:
    log.write([body("e1", "a", 1), body("e2", "a", 2), body("e3", "a", 3)])
    store.apply(1, KIND_EVENT, log.body(1))
    with pytest.raises(LogStateError):
        store.apply(3, KIND_EVENT, log.body(3))
    with pytest.raises(LogStateError):
        store.apply(1, KIND_EVENT, log.body(1))
    store.apply(2, KIND_EVENT, log.body(2))
    assert store.last_applied_log_index == 2
    assert store.aggregate_version("a") == 2


def test_unknown_record_kind_is_corruption(store: EventStore) -> None:
    with pytest.raises(CorruptionError) as info:
        store.apply(1, 9, b"")
    assert info.value.offset == 1
    assert store.last_applied_log_index == 0


def test_record_kinds_agree_with_the_wal() -> None:
    from walstore.wal import record

    assert (record.KIND_EVENT, record.KIND_EPOCH_START, record.KIND_NOOP) == (
        KIND_EVENT,
        KIND_EPOCH_START,
        KIND_NOOP,
    )


def _mixed_log(log: MemLog, store: EventStore) -> None:
    # log: S E E S S E S E   (S = system record)
    log.append(KIND_EPOCH_START)
    log.write([body("e1", "a", 1), body("e2", "b", 1)])
    log.append(KIND_NOOP)
    log.append(KIND_EPOCH_START)
    log.write([body("e3", "a", 2)])
    log.append(KIND_EPOCH_START)
    log.write([body("e4", "b", 2)])
    log.apply_all(store)


def test_event_and_log_index_conversions(store: EventStore, log: MemLog) -> None:
    _mixed_log(log, store)
    assert store.last_applied_log_index == 8
    assert store.last_applied_event_index == 4
    assert [store.event_to_log_index(e) for e in range(1, 5)] == [2, 3, 6, 8]
    assert [store.log_to_event_index(i) for i in (2, 3, 6, 8)] == [1, 2, 3, 4]
    # a system record's position counts the events before it
    assert [store.log_to_event_index(i) for i in (0, 1, 4, 5, 7)] == [0, 0, 2, 2, 3]
    for bad in (0, 5):
        with pytest.raises(LogStateError):
            store.event_to_log_index(bad)
    with pytest.raises(LogStateError):
        store.log_to_event_index(9)


def test_conversions_agree_on_many_layouts(log: MemLog) -> None:
    store = EventStore(log)
    pattern = "SSEESEEEESESSSEESE" * 5
    versions = 0
    for c in pattern:
        if c == "S":
            log.append(KIND_NOOP)
        else:
            versions += 1
            log.write([body(f"e{versions}", "a", versions)])
    log.apply_all(store)
    event_logs = [i for i, c in enumerate(pattern, 1) if c == "E"]
    for e, log_index in enumerate(event_logs, 1):
        assert store.event_to_log_index(e) == log_index
        assert store.log_to_event_index(log_index) == e


def test_version_must_follow_the_aggregate(store: EventStore, log: MemLog) -> None:
    with pytest.raises(CorruptionError) as info:
        store.apply(1, KIND_EVENT, body("e1", "a", 2))
    assert info.value.offset == 1 and "version" in info.value.reason
    log.write([body("e1", "a", 1)])
    store.apply(1, KIND_EVENT, log.body(1))
    with pytest.raises(CorruptionError):
        store.apply(2, KIND_EVENT, body("e2", "a", 3))
    with pytest.raises(CorruptionError):
        store.apply(2, KIND_EVENT, body("e2", "a", 1))
    # a refused record changed nothing: the right one still applies
    assert store.last_applied_log_index == 1
    assert store.lookup("e2") is None
    log.write([body("e2", "a", 2)])
    store.apply(2, KIND_EVENT, log.body(2))
    assert store.aggregate_version("a") == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:10],
        lambda b: b[:-1],
        lambda b: b + b"x",
        lambda b: b"\x02" + b[1:],
        lambda b: b"",
    ],
    ids=["short-prefix", "short", "long", "format", "empty"],
)
def test_damaged_bodies_are_corruption_in_apply_and_rebuild(store: EventStore, log: MemLog, damage: object) -> None:
    assert callable(damage)
    bad = damage(body("e1", "a", 1))
    with pytest.raises(CorruptionError):
        store.apply(1, KIND_EVENT, bad)
    fresh = EventStore(log)
    with pytest.raises(CorruptionError):
        fresh.rebuild([Rec(1, KIND_EVENT, body("e0", "a", 1)), Rec(2, KIND_EVENT, bad)])
    assert fresh.last_applied_log_index == 1
    assert store.last_applied_log_index == 0


def test_invalid_utf8_in_the_log_is_corruption_on_read(store: EventStore, log: MemLog) -> None:
    raw = bytearray(body("e1", "a", 1))
    raw[-10] = 0xFF  # the type's last byte (payload and metadata follow): keys still parse
    log.append(KIND_EVENT, bytes(raw))
    log.apply_all(store)
    with pytest.raises(CorruptionError):
        store.read_log(1, 10)
    with pytest.raises(CorruptionError):
        store.read_aggregate("a")


# ---------------------------------------------------------------- reads


def test_lookup_sees_applied_events_only(store: EventStore, log: MemLog) -> None:
    log.append(KIND_EPOCH_START)
    append(store, log, ev("x", "a"), ev("y", "b"))
    assert store.lookup("y") == AppendResult("y", 2, 1)
    assert store.lookup("nope") is None
    prepared = store.prepare([ev("z", "a")], timestamp_us=TS)
    store.pending_added(log.write(prepared.bodies), prepared)
    assert store.lookup("z") is None  # pending, not applied
    log.apply_all(store)
    assert store.lookup("z") == AppendResult("z", 3, 2)
    with pytest.raises(ValidationError):
        store.lookup("\ud800")


def test_read_aggregate_windows(store: EventStore, log: MemLog) -> None:
    for i in range(1, 8):
        log.append(KIND_NOOP) if i == 4 else None
        append(store, log, ev(f"a{i}", "a"), ev(f"b{i}", "b"))

    def versions(**kw: object) -> list[int]:
        read = store.read_aggregate("a", **kw)  # type: ignore[arg-type]
        assert read.version == 7
        assert all(e.aggregate_id == "a" for e in read.events)
        return [e.version for e in read.events]

    assert versions() == [1, 2, 3, 4, 5, 6, 7]
    assert versions(from_version=3, limit=2) == [3, 4]
    assert versions(from_version=6, limit=10) == [6, 7]
    assert versions(from_version=8) == []
    assert versions(limit=0) == []
    assert versions(direction="backward") == [7, 6, 5, 4, 3, 2, 1]
    assert versions(direction="backward", limit=2) == [7, 6]
    assert versions(direction="backward", from_version=3) == [3, 2, 1]
    assert versions(direction="backward", from_version=99, limit=1) == [7]
    read = store.read_aggregate("a", from_version=4, limit=1)
    event = read.events[0]
    assert (event.id, event.type, event.payload, event.metadata, event.timestamp_us) == (
        "a4",
        "Happened",
        b"{}",
        b'{"m":1}',
        TS,
    )
    assert event.index == 7  # API index: a1 b1 a2 b2 a3 b3 [noop] a4
    assert store.read_aggregate("nobody").events == []
    assert store.read_aggregate("nobody").version == 0


@pytest.mark.parametrize(
    "kw",
    [{"from_version": -1}, {"limit": -1}, {"direction": "sideways"}],
)
def test_read_aggregate_rejects_bad_arguments(store: EventStore, kw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        store.read_aggregate("a", **kw)  # type: ignore[arg-type]


def test_long_aggregate_reads_are_windows_not_scans(store: EventStore, log: MemLog) -> None:
    n = LONG_AGGREGATE_EVENTS * 4 + 3
    for i in range(1, n + 1):
        append(store, log, ev(f"l{i}", "long"), ev(f"s{i}", f"short{i % 3}"))
    log.reads = 0
    read = store.read_aggregate("long", from_version=2, limit=3)
    assert [e.version for e in read.events] == [2, 3, 4]
    assert [e.index for e in read.events] == [3, 5, 7]
    assert log.reads == 3  # one body per event returned, none for the walk
    back = store.read_aggregate("long", direction="backward", from_version=n - 1, limit=2)
    assert [e.version for e in back.events] == [n - 1, n - 2]
    full = store.read_aggregate("long", limit=10_000)
    assert [e.version for e in full.events] == list(range(1, n + 1))
    assert [e.version for e in store.read_aggregate("short1", limit=1000).events] == list(
        range(1, len(range(1, n + 1, 3)) + 1)
    )


def test_read_log_skips_system_records(store: EventStore, log: MemLog) -> None:
    _mixed_log(log, store)
    read = store.read_log(1, 100)
    assert read.last_index == 4
    assert [(e.index, e.id) for e in read.events] == [(1, "e1"), (2, "e2"), (3, "e3"), (4, "e4")]
    assert [e.id for e in store.read_log(2, 2).events] == ["e2", "e3"]
    assert [e.id for e in store.read_log(0, 1).events] == ["e1"]
    assert [e.id for e in store.read_log(4, 9).events] == ["e4"]
    assert store.read_log(5, 10).events == []
    assert store.read_log(1, 0).events == []
    with pytest.raises(ValidationError):
        store.read_log(-1, 10)


# ---------------------------------------------------------------- prepare: versions


def test_versions_come_from_the_tentative_state(store: EventStore, log: MemLog) -> None:
    assert append(store, log, ev("1", "a"), ev("2", "b"), ev("3", "a")) == [
        AppendResult("1", 1, 1),
        AppendResult("2", 2, 1),
        AppendResult("3", 3, 2),
    ]
    # two batches in flight: the second sees the first (pending) without it being applied
    p1 = store.prepare([ev("4", "a")], timestamp_us=TS)
    store.pending_added(log.write(p1.bodies), p1)
    p2 = store.prepare([ev("5", "a", expected=3), ev("6", "a", expected=4)], timestamp_us=TS)
    store.pending_added(log.write(p2.bodies), p2)
    assert store.pending_count == 3
    log.apply_all(store)
    assert store.pending_count == 0
    assert store.results(p1) == [AppendResult("4", 4, 3)]
    assert store.results(p2) == [AppendResult("5", 5, 4), AppendResult("6", 6, 5)]


def test_expected_version_rules(store: EventStore, log: MemLog) -> None:
    append(store, log, ev("1", "a", expected=0))
    with pytest.raises(ConflictError) as info:
        store.prepare([ev("2", "a", expected=0)])
    err = info.value
    assert err.code == "wrong_expected_version" and err.http_status == 409
    assert err.details == {"aggregate_id": "a", "expected_version": 0, "current_version": 1}
    with pytest.raises(ConflictError) as info:
        store.prepare([ev("2", "b", expected=1)])
    assert info.value.details["current_version"] == 0
    # inside a batch the check sees the batch's earlier events
    assert [r.version for r in append(store, log, ev("2", "a", expected=1), ev("3", "a", expected=2))] == [
        2,
        3,
    ]
    with pytest.raises(ConflictError):
        store.prepare([ev("4", "a", expected=3), ev("5", "a", expected=3)])
    assert [r.version for r in append(store, log, ev("6", "a"))] == [4]  # None = any
    with pytest.raises(ValidationError):
        store.prepare([ev("7", "a", expected=-1)])


def test_a_failed_batch_changes_nothing(store: EventStore, log: MemLog) -> None:
    append(store, log, ev("1", "a"))
    with pytest.raises(ConflictError):
        store.prepare([ev("2", "b"), ev("3", "a", expected=7)])
    # "2" was never appended: a new batch may use it, and b is still new
    assert append(store, log, ev("2", "b", expected=0)) == [AppendResult("2", 2, 1)]


# ---------------------------------------------------------------- prepare: ids


def test_repeated_id_same_content_returns_the_first_result(store: EventStore, log: MemLog) -> None:
    first = append(store, log, ev("x", "a", payload=b'{"n":1}'), ev("y", "b"))
    again = store.prepare([ev("x", "a", payload=b'{"n":1}', expected=0), ev("y", "b")])
    assert again.bodies == [] and again.wait_log_index == 0
    assert store.results(again) == first
    # a mixed batch appends only the new event and answers the repeat with its first result
    mixed = append(store, log, ev("x", "a", payload=b'{"n":1}'), ev("z", "a"))
    assert mixed == [first[0], AppendResult("z", 3, 2)]
    assert store.last_applied_event_index == 3


def test_repeated_id_other_content_conflicts(store: EventStore, log: MemLog) -> None:
    append(store, log, ev("x", "a", payload=b'{"n":1}'))
    for other in (
        ev("x", "a", payload=b'{"n":2}'),
        ev("x", "b", payload=b'{"n":1}'),
        ev("x", "a", payload=b'{"n":1}', type_="Other"),
    ):
        with pytest.raises(ConflictError) as info:
            store.prepare([other])
        assert info.value.code == "duplicate_event_id"
        assert info.value.details == {"event_id": "x"}


def test_repeat_of_a_pending_event_waits_for_it(store: EventStore, log: MemLog) -> None:
    append(store, log, ev("0", "a"))
    p1 = store.prepare([ev("x", "a"), ev("y", "b")], timestamp_us=TS)
    store.pending_added(log.write(p1.bodies), p1)
    with pytest.raises(ConflictError):
        store.prepare([ev("y", "c")])
    p2 = store.prepare([ev("y", "b")], timestamp_us=TS)
    assert p2.bodies == [] and p2.wait_log_index == 3
    with pytest.raises(LogStateError):
        store.results(p2)  # not applied yet
    log.apply_all(store)
    assert store.results(p2) == [AppendResult("y", 3, 1)]


def test_same_id_twice_in_a_batch_is_invalid(store: EventStore) -> None:
    with pytest.raises(ValidationError) as info:
        store.prepare([ev("x", "a"), ev("y", "a"), ev("x", "b")])
    assert info.value.http_status == 400 and info.value.details == {"event_id": "x"}


@pytest.mark.parametrize(
    "events",
    [
        [],
        [ev(f"e{i}") for i in range(MAX_BATCH_EVENTS + 1)],
        [ev("")],
        [ev("\ud800")],
        [ev("x", "\udfff")],
        [ev("x" * 300)],
    ],
    ids=["empty", "too-many", "empty-id", "surrogate-id", "surrogate-aggregate", "long-id"],
)
def test_bad_batches_are_validation_errors(store: EventStore, events: list[NewEvent]) -> None:
    with pytest.raises(ValidationError):
        store.prepare(events)


# ---------------------------------------------------------------- pending overlay


def test_pending_added_guards(store: EventStore, log: MemLog) -> None:
    p1 = store.prepare([ev("1", "a")], timestamp_us=TS)
    p2 = store.prepare([ev("2", "a")], timestamp_us=TS)
    with pytest.raises(LogStateError):
        store.pending_added(1, p1)  # stale: p2 was prepared after it
    with pytest.raises(LogStateError):
        store.pending_added(0, p2)
    store.pending_added(log.write(p2.bodies), p2)
    with pytest.raises(LogStateError):
        store.pending_added(2, p2)  # twice
    with pytest.raises(NotCaughtUp):
        store.prepare([ev("3", "a")], next_log_index=5)  # the log holds records we never saw
    repeat = store.prepare([ev("2", "a")])
    with pytest.raises(LogStateError):
        store.pending_added(2, repeat)  # nothing to write
    with pytest.raises(LogStateError):
        _ = p1.wait_log_index  # never added


def test_pending_clear_forgets_the_overlay(store: EventStore, log: MemLog) -> None:
    append(store, log, ev("1", "a"))
    p = store.prepare([ev("2", "a")], timestamp_us=TS)
    store.pending_added(log.write(p.bodies), p)
    store.pending_clear()
    assert store.pending_count == 0
    # the pending append vanished with the old leadership (truncated by the new leader)
    log.truncate(1)
    log.append(KIND_EPOCH_START)
    log.apply_all(store)
    again = append(store, log, ev("3", "a", expected=1), ev("2", "b"))
    assert again == [AppendResult("3", 2, 2), AppendResult("2", 3, 1)]
    with pytest.raises(EntriesReplaced):
        store.results(p)  # its record was replaced and its id now means something else


def test_results_of_a_batch_applied_as_written_read_nothing_back(store: EventStore, log: MemLog) -> None:
    append(store, log, ev("1", "a"))
    p = store.prepare([ev("2", "a"), ev("3", "b")], timestamp_us=TS)
    store.pending_added(log.write(p.bodies), p)
    log.apply_all(store)
    reads = log.reads
    assert store.results(p) == [AppendResult("2", 2, 2), AppendResult("3", 3, 1)]
    assert log.reads == reads  # confirmed when applied: no decode on the append path


def test_apply_own_applies_pending_events_from_memory_up_to_a_gap(store: EventStore, log: MemLog, mask: int) -> None:
    append(store, log, ev("1", "a"))
    p1 = store.prepare([ev("2", "a"), ev("3", "b")], timestamp_us=TS)
    store.pending_added(log.write(p1.bodies), p1)
    log.append(KIND_NOOP)  # not ours: apply_own must stop in front of it
    p2 = store.prepare([ev("4", "a")], timestamp_us=TS)
    store.pending_added(log.write(p2.bodies), p2)
    reads = log.reads
    assert store.apply_own(2) == 1  # only up to what the caller says is committed
    assert store.apply_own(10) == 1  # then index 3; index 4 is the NOOP
    assert store.last_applied_log_index == 3
    if mask:  # with every hash colliding, verifying an id hit reads the earlier record
        assert log.reads == reads
    assert store.apply_own(10) == 0
    log.apply_all(store)  # the NOOP and then "4", read from the log
    assert store.results(p1) == [AppendResult("2", 2, 2), AppendResult("3", 3, 1)]
    assert store.results(p2) == [AppendResult("4", 4, 3)]
    assert store.read_aggregate("a").version == 3
    assert [e.id for e in store.read_log(1).events] == ["1", "2", "3", "4"]


def test_apply_own_has_nothing_after_the_overlay_is_dropped(store: EventStore, log: MemLog) -> None:
    p = store.prepare([ev("1", "a")], timestamp_us=TS)
    store.pending_added(log.write(p.bodies), p)
    store.pending_clear()  # leadership lost: the log decides what is at index 1
    assert store.apply_own(1) == 0
    assert store.last_applied_log_index == 0


def test_results_answer_event_indexes_across_system_records(store: EventStore, log: MemLog) -> None:
    log.append(KIND_EPOCH_START)
    log.apply_all(store)
    p = store.prepare([ev("1", "a")], timestamp_us=TS, next_log_index=2)
    store.pending_added(log.write(p.bodies), p)
    log.append(KIND_NOOP)
    p2 = store.prepare([ev("2", "a")], timestamp_us=TS)
    store.pending_added(log.write(p2.bodies), p2)
    log.apply_all(store)
    assert store.results(p) == [AppendResult("1", 1, 1)]
    assert store.results(p2) == [AppendResult("2", 2, 2)]
    assert store.lookup("2") == AppendResult("2", 2, 2)


def test_pending_that_commits_after_clear_still_resolves(store: EventStore, log: MemLog) -> None:
    p = store.prepare([ev("1", "a")], timestamp_us=TS)
    store.pending_added(log.write(p.bodies), p)
    store.pending_clear()
    log.append(KIND_EPOCH_START)
    log.apply_all(store)
    assert store.results(p) == [AppendResult("1", 1, 1)]


@pytest.mark.parametrize("replacement", ["event", "system"])
def test_a_diverged_log_drops_the_overlay(store: EventStore, log: MemLog, replacement: str) -> None:
    append(store, log, ev("1", "a"))
    p = store.prepare([ev("2", "a"), ev("3", "b")], timestamp_us=TS)
    store.pending_added(log.write(p.bodies), p)
    # a new leader replaced our suffix without us stepping down first
    log.truncate(1)
    if replacement == "event":
        log.write([body("other", "a", 2)])
    else:
        log.append(KIND_EPOCH_START)
    log.apply_all(store)
    assert store.pending_count == 0
    with pytest.raises(LogStateError):
        store.results(p)
    # "3" is free again and b is new: nothing of the lost batch leaks into validation
    assert append(store, log, ev("3", "b", expected=0))[0].version == 1


def test_results_follow_the_id_when_the_record_moved(store: EventStore, log: MemLog) -> None:
    p = store.prepare([ev("1", "a")], timestamp_us=TS)
    store.pending_added(log.write(p.bodies), p)
    store.pending_clear()
    # the new leader's log has an epoch start first, then the same event (forwarded retry)
    log.truncate(0)
    log.append(KIND_EPOCH_START)
    log.write([body("1", "a", 1)])
    log.records[1] = (KIND_EVENT, encode_event_body(ev("1", "a"), 1, TS))
    log.apply_all(store)
    assert store.results(p) == [AppendResult("1", 1, 1)]


# ---------------------------------------------------------------- duplicates, rebuild


def test_duplicate_id_in_the_log_keeps_the_first(store: EventStore, log: MemLog) -> None:
    log.write([body("x", "a", 1), body("y", "a", 2), body("x", "b", 1)])
    log.apply_all(store)
    assert store.duplicate_ids_applied == 1
    assert store.lookup("x") == AppendResult("x", 1, 1)
    assert store.aggregate_version("b") == 1


def _assert_same_state(a: EventStore, b: EventStore, ids: list[str], aggregates: list[str]) -> None:
    assert a.last_applied_log_index == b.last_applied_log_index
    assert a.read_log(1, 10_000) == b.read_log(1, 10_000)
    for event_id in ids:
        assert a.lookup(event_id) == b.lookup(event_id)
    for agg in aggregates:
        assert a.read_aggregate(agg, limit=10_000) == b.read_aggregate(agg, limit=10_000)
        assert a.read_aggregate(agg, limit=3, direction="backward") == b.read_aggregate(
            agg, limit=3, direction="backward"
        )
    assert a.duplicate_ids_applied == b.duplicate_ids_applied


@pytest.mark.parametrize("memoryviews", [False, True])
def test_rebuild_matches_apply(log: MemLog, mask: int, memoryviews: bool) -> None:
    versions: dict[str, int] = {}
    ids = []
    for i in range(300):
        if i % 37 == 0:
            log.append(KIND_EPOCH_START)
        agg = "hot" if i % 3 == 0 else f"agg-{i % 11}"
        versions[agg] = versions.get(agg, 0) + 1
        event_id = f"id-{i}" if i % 50 != 49 else "id-7"  # a few duplicate ids in the log
        ids.append(event_id)
        log.write([body(event_id, agg, versions[agg])])
    one_by_one = EventStore(log, hash_mask=mask)
    log.apply_all(one_by_one)
    rebuilt = EventStore(log, hash_mask=mask)
    records = list(log.as_records())
    if memoryviews:
        records = [Rec(r.index, r.kind, memoryview(bytes(r.body))) for r in records]
    assert rebuilt.rebuild(records) == len(records)
    _assert_same_state(one_by_one, rebuilt, [*ids, "missing"], [*versions, "missing"])
    assert rebuilt.duplicate_ids_applied == 6
    # rebuild continues a store that already holds state (the verified path)
    more = len(log.records)
    log.write([body("late", "hot", versions["hot"] + 1)])
    assert rebuilt.rebuild(list(log.as_records())[more:]) == 1
    assert rebuilt.lookup("late") == AppendResult("late", 301, versions["hot"] + 1)


def test_rebuild_tells_colliding_aggregates_apart() -> None:
    # every key collides and the ids are the same length: only the key bytes tell "b" at
    # version 2 from "a" at version 1 + 1
    log = MemLog()
    log.write([body("1", "a", 1), body("2", "b", 1), body("3", "b", 2), body("4", "a", 2)])
    rebuilt = EventStore(log, hash_mask=0)
    rebuilt.rebuild(log.as_records())
    assert [(e.id, e.version) for e in rebuilt.read_aggregate("b").events] == [("2", 1), ("3", 2)]
    assert [(e.id, e.version) for e in rebuilt.read_aggregate("a").events] == [("1", 1), ("4", 2)]


def test_rebuild_stops_at_damage_with_a_consistent_id_index(log: MemLog) -> None:
    log.write([body("x", "a", 1), body("y", "a", 2), body("x", "b", 1), body("z", "a", 4)])
    store = EventStore(log)
    with pytest.raises(CorruptionError):
        store.rebuild(log.as_records())
    assert store.last_applied_log_index == 3
    assert store.lookup("x") == AppendResult("x", 1, 1)  # the first, not the later duplicate
    assert store.lookup("z") is None


def test_collisions_are_resolved_not_trusted() -> None:
    log = MemLog()
    store = EventStore(log, hash_mask=0)
    append(store, log, ev("x", "a"), ev("y", "b"), ev("z", "a"))
    assert store.aggregate_count == 2
    assert store.aggregate_version("a") == 2 and store.aggregate_version("b") == 1
    assert store.aggregate_version("c") == 0
    assert [r.version for r in append(store, log, ev("w", "c", expected=0))] == [1]
    assert store.lookup("y") == AppendResult("y", 2, 1)
    assert store.lookup("q") is None


def test_nbytes_counts_the_columns(store: EventStore, log: MemLog) -> None:
    empty = store.nbytes
    append(store, log, *(ev(str(i), f"a{i % 5}") for i in range(500)))
    assert store.nbytes > empty + 500 * 8


def test_importing_the_store_does_not_import_trio() -> None:
    code = "import sys, walstore.store; assert 'trio' not in sys.modules, 'trio imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_prepared_is_opaque_to_writes(store: EventStore) -> None:
    prepared = store.prepare([ev("1", "a"), ev("2", "a")], timestamp_us=TS)
    assert isinstance(prepared, Prepared)
    assert prepared.bodies == [body("1", "a", 1), body("2", "a", 2)]
    assert not prepared.added
