"""The store against a plain-dict model, driven by hypothesis through the leader's life.

Steps: prepare a batch (expected versions right, wrong, 0 or absent; repeated ids with the
same or other content; ids twice in a batch), write it and register it as pending, commit
(apply) a few records, restart (rebuild a fresh store from the applied prefix), change
leadership (keeping or truncating the unapplied suffix and writing an epoch start),
collect the results of applied batches, and read (aggregate forward and backward with
from_version and limit, the global log, lookups). After every step the store and the
model agree. Runs with the real hash, with a few keys colliding and with all colliding.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from walstore.errors import ConflictError, EntriesReplaced, LogStateError, ValidationError
from walstore.event import AppendResult, NewEvent, StoredEvent
from walstore.store import HASH_MASK, KIND_EPOCH_START, KIND_EVENT, EventStore, Prepared

IDS = [f"id{i}" for i in range(60)]
AGGREGATES = ["a", "b", "c"]
PAYLOADS = [b"{}", b'{"x":1}']


@dataclass(frozen=True)
class Entry:
    """A model log entry: an event with its version and timestamp, or a system record."""

    event: NewEvent | None
    version: int = 0
    ts: int = 0


@dataclass(frozen=True)
class Rec:
    index: int
    kind: int
    body: bytes


class MemLog:
    def __init__(self) -> None:
        self.records: list[tuple[int, bytes]] = []

    def body(self, log_index: int) -> bytes:
        if not 1 <= log_index <= len(self.records):
            raise LogStateError(f"no record {log_index}")
        return self.records[log_index - 1][1]


event_specs = st.tuples(
    st.sampled_from(IDS),
    st.sampled_from(AGGREGATES),
    st.sampled_from(PAYLOADS),
    st.sampled_from([None, None, "right", "right", "right", 0, 1, 2]),
)


class StoreModel(RuleBasedStateMachine):
    mask = HASH_MASK

    def __init__(self) -> None:
        super().__init__()
        self.log = MemLog()
        self.store = EventStore(self.log, hash_mask=self.mask)
        self.entries: list[Entry] = []
        self.applied = 0
        self.leader_since = 0  # log length when this leadership began
        self.pending: set[int] = set()  # log indexes of this leadership's unapplied appends
        self.in_flight: list[tuple[Prepared, list[NewEvent], list[tuple[int, int]]]] = []
        self.accepted: list[list[NewEvent]] = []  # batches a client might retry
        self.clock = 1_000

    # ------------------------------------------------------------ model helpers

    def _write(self, entry: Entry, body: bytes) -> None:
        self.entries.append(entry)
        self.log.records.append((KIND_EVENT if entry.event else KIND_EPOCH_START, body))

    def _event_index(self, log_index: int) -> int:
        return sum(1 for e in self.entries[:log_index] if e.event is not None)

    def _first_with_id(self, event_id: str, upto: int) -> int | None:
        for i, e in enumerate(self.entries[:upto], 1):
            if e.event is not None and e.event.id == event_id:
                return i
        return None

    def _version(self, aggregate_id: str, upto: int) -> int:
        return max(
            (e.version for e in self.entries[:upto] if e.event and e.event.aggregate_id == aggregate_id),
            default=0,
        )

    def _stored(self, log_index: int) -> StoredEvent:
        e = self.entries[log_index - 1]
        assert e.event is not None
        ev = e.event
        idx = self._event_index(log_index)
        return StoredEvent(idx, e.version, e.ts, ev.id, ev.type, ev.aggregate_id, ev.payload, ev.metadata)

    @staticmethod
    def _same(a: NewEvent, b: NewEvent) -> bool:
        return (a.type, a.aggregate_id, a.payload, a.metadata) == (b.type, b.aggregate_id, b.payload, b.metadata)

    # ------------------------------------------------------------ rules

    @initialize(start_with_epoch=st.booleans())
    def start(self, start_with_epoch: bool) -> None:
        if start_with_epoch:
            self._write(Entry(None), b"")
            self.leader_since = len(self.entries)

    @rule(specs=st.lists(event_specs, min_size=1, max_size=4))
    def prepare(self, specs: list[tuple[str, str, bytes, object]]) -> None:
        written = len(self.entries)
        batch: list[NewEvent] = []
        versions: dict[str, int] = {}
        for event_id, aggregate_id, payload, expected in specs:
            current = versions.get(aggregate_id, self._version(aggregate_id, written))
            exp = current if expected == "right" else expected
            assert exp is None or isinstance(exp, int)
            batch.append(NewEvent(event_id, "T", aggregate_id, payload, b"{}", exp))
            versions[aggregate_id] = current + 1
        self._submit(batch)

    @precondition(lambda self: self.accepted)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        self._submit(data.draw(st.sampled_from(self.accepted)))

    def _submit(self, batch: list[NewEvent]) -> None:
        # A leader serves writes once it has applied everything before its epoch start;
        # from then on everything unapplied is its own (the store's pending overlay).
        self._apply_through(self.leader_since)
        written = len(self.entries)
        versions: dict[str, int] = {}
        expected_error: tuple[type[Exception], str, dict[str, object]] | None = None
        plan: list[tuple[int, int]] = []  # (log index or -offset-1 for new, version)
        new_count = 0
        for event in batch:
            event_id, aggregate_id, exp = event.id, event.aggregate_id, event.expected_version
            current = versions.get(aggregate_id, self._version(aggregate_id, written))
            if expected_error is not None:
                continue
            first = self._first_with_id(event_id, written)
            if first is not None:
                original = self.entries[first - 1]
                assert original.event is not None
                if self._same(event, original.event):
                    plan.append((first, original.version))
                else:
                    expected_error = (ConflictError, "duplicate_event_id", {"event_id": event_id})
                continue
            if exp is not None and exp != current:
                expected_error = (
                    ConflictError,
                    "wrong_expected_version",
                    {"aggregate_id": aggregate_id, "expected_version": exp, "current_version": current},
                )
                continue
            versions[aggregate_id] = current + 1
            plan.append((-new_count - 1, current + 1))
            new_count += 1
        ids = [e.id for e in batch]
        if len(set(ids)) != len(ids):
            dup = next(i for n, i in enumerate(ids) if i in ids[:n])
            expected_error = (ValidationError, "duplicate_id_in_batch", {"event_id": dup})

        self.clock += 1
        try:
            prepared = self.store.prepare(batch, timestamp_us=self.clock, next_log_index=written + 1)
        except (ConflictError, ValidationError) as exc:
            assert expected_error is not None, exc
            kind, code, details = expected_error
            assert (type(exc), exc.code, exc.details) == (kind, code, details)
            note_event(f"prepare: {code}")
            return
        note_event("prepare: ok" if new_count else "prepare: all repeats")
        assert expected_error is None
        assert len(prepared.bodies) == new_count
        self.accepted.append(batch)
        if prepared.bodies:
            first_log_index = written + 1
            for p_event, (where, version) in zip(batch, plan, strict=True):
                if where < 0:
                    self._write(Entry(p_event, version, self.clock), prepared.bodies[-where - 1])
            self.store.pending_added(first_log_index, prepared)
            self.pending.update(range(first_log_index, len(self.entries) + 1))
            plan = [(first_log_index - w - 1 if w < 0 else w, v) for w, v in plan]
        self.in_flight.append((prepared, batch, plan))

    @rule(n=st.integers(min_value=1, max_value=6))
    def commit(self, n: int) -> None:
        self._apply_through(min(len(self.entries), self.applied + n))
        self.collect_results()

    def _apply_through(self, end: int) -> None:
        for log_index in range(self.applied + 1, end + 1):
            kind, body = self.log.records[log_index - 1]
            self.store.apply(log_index, kind, body)
            self.pending.discard(log_index)
        self.applied = max(self.applied, end)

    @rule(truncate=st.booleans())
    def leadership_change(self, truncate: bool) -> None:
        self.store.pending_clear()
        self.pending.clear()
        if truncate:
            del self.entries[self.applied :]
            del self.log.records[self.applied :]
        self._write(Entry(None), b"")
        self.leader_since = len(self.entries)

    def _expected_results(self, batch: list[NewEvent], plan: list[tuple[int, int]]) -> list[AppendResult] | None:
        """What an applied batch answers: each event where it was written, or, if that
        record was replaced, where its id was applied with the same content; None if any
        event is lost."""
        out: list[AppendResult] = []
        for event, (log_index, version) in zip(batch, plan, strict=True):
            e = self.entries[log_index - 1] if log_index <= len(self.entries) else Entry(None)
            if e.event is not None and e.event.id == event.id and e.version == version:
                out.append(AppendResult(event.id, self._event_index(log_index), version))
                continue
            first = self._first_with_id(event.id, self.applied)
            if first is None:
                return None
            original = self.entries[first - 1]
            assert original.event is not None
            if not self._same(event, original.event):
                return None
            out.append(AppendResult(event.id, self._event_index(first), original.version))
        return out

    @rule()
    def collect_results(self) -> None:
        still: list[tuple[Prepared, list[NewEvent], list[tuple[int, int]]]] = []
        for prepared, batch, plan in self.in_flight:
            if prepared.wait_log_index > self.applied:
                with pytest.raises(LogStateError):
                    self.store.results(prepared)
                still.append((prepared, batch, plan))
                continue
            expected = self._expected_results(batch, plan)
            if expected is None:
                with pytest.raises(EntriesReplaced):
                    self.store.results(prepared)
                note_event("results: replaced")
            else:
                assert self.store.results(prepared) == expected
                note_event("results: ok")
        self.in_flight = still

    @rule(
        aggregate_id=st.sampled_from([*AGGREGATES, "none"]),
        from_version=st.integers(min_value=0, max_value=12),
        limit=st.integers(min_value=0, max_value=12),
        backward=st.booleans(),
    )
    def read_aggregate(self, aggregate_id: str, from_version: int, limit: int, backward: bool) -> None:
        mine = [
            self._stored(i)
            for i, e in enumerate(self.entries[: self.applied], 1)
            if e.event is not None and e.event.aggregate_id == aggregate_id
        ]
        current = len(mine)
        if backward:
            start = current if from_version == 0 or from_version > current else from_version
            want = [s for s in reversed(mine) if s.version <= start][:limit]
        else:
            want = [s for s in mine if s.version >= from_version][:limit]
        got = self.store.read_aggregate(aggregate_id, from_version, limit, "backward" if backward else "forward")
        assert got.version == current
        assert got.events == want

    @rule(from_index=st.integers(min_value=0, max_value=40), limit=st.integers(min_value=0, max_value=15))
    def read_log(self, from_index: int, limit: int) -> None:
        everything = [self._stored(i) for i, e in enumerate(self.entries[: self.applied], 1) if e.event]
        got = self.store.read_log(from_index, limit)
        assert got.last_index == len(everything)
        assert got.events == everything[max(from_index, 1) - 1 :][:limit]

    @rule()
    def restart(self) -> None:
        """A node restarting rebuilds the applied prefix from the log: same answers."""
        fresh = EventStore(self.log, hash_mask=self.mask)
        records = [Rec(i, kind, body) for i, (kind, body) in enumerate(self.log.records[: self.applied], 1)]
        assert fresh.rebuild(records) == self.applied
        assert fresh.read_log(1, 10_000) == self.store.read_log(1, 10_000)
        for aggregate_id in AGGREGATES:
            assert fresh.read_aggregate(aggregate_id, 0, 100) == self.store.read_aggregate(aggregate_id, 0, 100)
        for event_id in IDS:
            assert fresh.lookup(event_id) == self.store.lookup(event_id)

    @invariant()
    def positions_agree(self) -> None:
        assert self.store.last_applied_log_index == self.applied
        assert self.store.last_applied_event_index == self._event_index(self.applied)
        assert self.store.pending_count == len(self.pending)
        for aggregate_id in AGGREGATES:
            assert self.store.aggregate_version(aggregate_id) == self._version(aggregate_id, self.applied)

    @invariant()
    def lookups_agree(self) -> None:
        seen = {e.event.id for e in self.entries if e.event is not None}
        for event_id in [*seen, "never"]:
            first = self._first_with_id(event_id, self.applied)
            want = None
            if first is not None:
                want = AppendResult(event_id, self._event_index(first), self.entries[first - 1].version)
            assert self.store.lookup(event_id) == want


class StoreModelAllCollide(StoreModel):
    mask = 0


class StoreModelSomeCollide(StoreModel):
    mask = 3


_settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = _settings
TestStoreModelAllCollide = StoreModelAllCollide.TestCase
TestStoreModelAllCollide.settings = _settings
TestStoreModelSomeCollide = StoreModelSomeCollide.TestCase
TestStoreModelSomeCollide.settings = _settings
