"""The event store state machine: committed log records in, indexes and reads out.

The store applies committed records strictly in log order and answers reads from that
applied state only. It never does I/O of its own: event bodies stay in the write-ahead
log, and the store reads them back through a narrow ``BodyReader`` when a read, an
idempotency check or a hash collision needs them. It never imports trio (a test checks).

Two numberings. The log holds records at LOG indexes 1..N; most are events, a few are
system records (epoch start, no-op: one per leadership change). The API's event ``index``
is gap-free from 1, so the store keeps the log indexes of the system records in a tiny
sorted column ``sys`` and converts with bisect:

    event index of log index L  =  L - #{k : sys[k] <= L}
    log index of event index e  =  e + #{k : sys[k] - k <= e}      (sys[k] - k is sorted)

Memory is the design constraint: millions of events must not mean millions of Python
objects (each costs ~50-100 bytes and lengthens every GC pass). The applied state is:

- ``_prev``: array('Q') indexed by log index - 1, the previous log index of the same
  aggregate (0 for an aggregate's first event and for system records). Its length is the
  last applied log index. This chain lets a read of one aggregate skip the rest of the log.
- ``_ids``: U64Map hash(event id) -> log index of the first event with that id.
- ``_aggs``: U64Map hash(aggregate id) -> aggregate slot, and per slot the columns
  version, last log index and key (offset << 16 | length into ``_agg_keys``, a bytearray
  holding every aggregate id once in UTF-8).
- ``_long``: for aggregates with more than ``LONG_AGGREGATE_EVENTS`` events, an array('Q')
  of the log index of every version, so any window of a long aggregate is O(limit);
  shorter aggregates walk at most that many chain links.

A 64-bit hash hit is verified, never trusted: an aggregate hit is compared with its key
bytes (kept in memory because aggregate hits are the common case, and reading a record per
applied event would halve the start-up rate); an event id hit reads the record and peeks
its id (id hits are rare: retries and true collisions). A different key behind the same
hash goes to a small overflow dict, so a collision costs a dict entry, not a wrong answer.

Leader side, ``prepare`` validates a batch against the TENTATIVE state: applied state plus
a small overlay of appends written but not yet applied (``pending_added``). The overlay is
plain dicts because it only ever holds in-flight events; it also keeps each pending
body, so the leader applies its own appends from memory (``apply_own``) instead of reading
back what it just wrote. It shrinks as its entries are
applied, and ``pending_clear`` drops it when leadership is lost. If a record applied at a
pending log index is not the pending event (the log diverged under us), the overlay is
dropped too: it can only describe a log that no longer exists.

Decisions where the design is silent:
- The log is the truth. A version that does not follow its aggregate's previous one is
  ``CorruptionError`` (never "fixed"); a repeated event id in the log (which only a bug
  elsewhere could write) keeps the first occurrence for ``lookup`` and idempotency and is
  counted in ``duplicate_ids_applied`` rather than refusing to start.
- ``expected_version`` of an event is checked against the version just before it,
  including earlier events of the same batch: ``[A exp 0, A exp 1]`` appends two events.
  ``"exists"`` asks for a version of at least 1 (``[A exp 0, A exp "exists"]`` passes).
  A repeat (same id, same content) skips the check: it was checked the first time.
- Backward reads start at ``from_version``, or at the newest event when it is 0 or above
  the current version. Reading an unknown aggregate gives no events and version 0.
"""

from __future__ import annotations

import struct
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from walstore._native import U64Map
from walstore.errors import ConflictError, CorruptionError, EntriesReplaced, LogStateError, NotCaughtUp, ValidationError
from walstore.event import (
    BODY_FORMAT,
    EXISTS,
    MAX_BATCH_EVENTS,
    MAX_CONSUMER_BYTES,
    PREFIX_BYTES,
    AppendResult,
    NewEvent,
    StoredEvent,
    Tracking,
    decode_event_body,
    decode_tracking_body,
    encode_event_body,
    encode_tracking_body,
)
from walstore.json_text import same_json_value
from walstore.service import AggregateRead, Direction, LogRead

# Record kinds, mirroring walstore.wal.record (a test asserts they agree). The store may
# not import walstore.wal, and only needs to tell events from system records.
KIND_EVENT = 1
KIND_EPOCH_START = 2
KIND_NOOP = 3
KIND_TRACKING = 4  # a consumer position (walstore.event's tracking body); not an event
_SYSTEM_KINDS = frozenset((KIND_EPOCH_START, KIND_NOOP))

# Aggregates longer than this get a per-aggregate array of log indexes (8 bytes per event
# plus one object per aggregate); shorter ones walk their chain, at most this many links.
# 32 keeps the walk under ~5 us while only aggregates with 33+ events pay for an object.
LONG_AGGREGATE_EVENTS = 32

HASH_MASK = (1 << 64) - 1
_KEY_LEN_BITS = 16  # the body format stores key lengths in u16 fields
_KEY_LEN_MASK = (1 << _KEY_LEN_BITS) - 1
_WHERE = "<event store>"  # CorruptionError's "path" for damage the store detects
# A log read looks at most this many events (or ``limit``, if more): a filter that matches
# rarely answers a page with fewer events and a ``next_index`` further on, instead of
# scanning the whole log in one request. ~10,000 key checks are a few tens of ms.
SCAN_BUDGET_EVENTS = 10_000


class BodyReader(Protocol):
    """Reads the body of the record at a log index (already applied, so it exists)."""

    def body(self, log_index: int) -> bytes | memoryview: ...


class LogRecord(Protocol):
    """What ``rebuild`` needs of a log record (the WAL's ``Record`` has these fields)."""

    @property
    def index(self) -> int: ...

    @property
    def kind(self) -> int: ...

    @property
    def body(self) -> bytes | memoryview: ...


@dataclass(slots=True)
class _Planned:
    """One event of a prepared batch: new (body ``offset`` >= 0) or a repeat."""

    event: NewEvent
    id_utf8: bytes
    version: int
    offset: int  # position in Prepared.bodies, -1 for a repeat
    log_index: int  # 0 until known (new events: set by pending_added)
    result: AppendResult | None  # a repeat of an applied event: the answer is final


class Prepared:
    """A validated batch: ``bodies`` to write as consecutive log records, in order.

    Protocol: ``prepare`` -> write ``bodies`` (if any) -> ``pending_added(first_log_index,
    prepared)`` with no await in between -> wait until ``wait_log_index`` is applied ->
    ``results(prepared)``. A batch of repeats only has no bodies and skips the write.
    """

    __slots__ = ("_first_log_index", "_planned", "_token", "_tracking", "_wait", "bodies", "tracking")

    def __init__(
        self,
        bodies: list[bytes],
        planned: list[_Planned],
        token: int,
        tracking: Tracking | None = None,
        tracking_plan: _TrackingPlan | None = None,
    ) -> None:
        self.bodies = bodies
        self._planned = planned
        self._token = token
        # The batch's consumer position: answered back on success. Written as the last
        # body when ``_tracking`` is set; None there for an idempotent repeat.
        self.tracking = tracking
        self._tracking = tracking_plan
        self._first_log_index = 0
        # Repeats of pending events wait for their original; set again by pending_added.
        self._wait = max((p.log_index for p in planned), default=0)

    @property
    def added(self) -> bool:
        return self._first_log_index > 0

    def records(self) -> list[tuple[int, int, bytes]]:
        """(kind, flags, body) of what to write: the events, then the tracking record if
        any. One submit is one atomic batch; the WAL marks its end (BATCH_END), here
        nothing does."""
        entries = [(KIND_EVENT, 0, body) for body in self.bodies]
        if self._tracking is not None:
            entries[-1] = (KIND_TRACKING, 0, self.bodies[-1])
        return entries

    @property
    def wait_log_index(self) -> int:
        """The log index to wait for before ``results``: the last new record, or the
        pending original of a repeat (0 = nothing to wait for)."""
        if self.bodies and not self.added:
            raise LogStateError("wait_log_index of a prepared batch before pending_added")
        return self._wait


@dataclass(slots=True)
class _TrackingPlan:
    """The tracking record of a prepared batch (always its last body)."""

    tracking: Tracking
    body: bytes
    log_index: int = 0  # set by pending_added
    applied: bool = False  # applied as written at log_index


@dataclass(frozen=True, slots=True)
class _Pending:
    log_index: int
    version: int
    event: NewEvent
    id_utf8: bytes
    plan: _Planned  # answered when this record is applied as written
    body: bytes  # what was written at log_index (``apply_own``)


def _same_content(a: NewEvent, b: NewEvent) -> bool:
    return (
        a.type == b.type
        and a.aggregate_id == b.aggregate_id
        and a.binary == b.binary
        and (a.payload == b.payload if a.binary else same_json_value(a.payload, b.payload))
        and same_json_value(a.metadata, b.metadata)
    )


# The fixed prefix of an event body up to its version (layout in walstore.event): start-up
# reads only these and slices the id and aggregate id as bytes. peek_event_keys decodes
# both to str and costs ~1.8 us; this costs ~0.5 us of the ~3 us budget per event.
_KEYS = struct.Struct("<BxHHHIIQ")


def _event_keys(body: bytes | memoryview, log_index: int) -> tuple[bytes, bytes, int]:
    """(id, aggregate id, version) of an event body, ids as UTF-8 bytes."""
    try:
        fmt, id_n, agg_n, type_n, pay_n, meta_n, version = _KEYS.unpack_from(body)
    except struct.error:
        raise CorruptionError(_WHERE, log_index, "event body shorter than its prefix") from None
    if fmt != BODY_FORMAT or PREFIX_BYTES + id_n + agg_n + type_n + pay_n + meta_n != len(body):
        raise CorruptionError(_WHERE, log_index, "event body format or lengths are wrong")
    id_end = PREFIX_BYTES + id_n
    event_id = body[PREFIX_BYTES:id_end]
    aggregate_id = body[id_end : id_end + agg_n]
    if type(event_id) is not bytes:  # a memoryview into the log's buffer
        return bytes(event_id), bytes(aggregate_id), version
    return event_id, aggregate_id, version  # type: ignore[return-value]


def _check_tracking(tracking: Tracking) -> None:
    name = _utf8(tracking.consumer, "consumer")
    if not name or len(name) > MAX_CONSUMER_BYTES:
        raise ValidationError(f"a consumer name has 1..{MAX_CONSUMER_BYTES} bytes", code="invalid_tracking")
    position = tracking.position
    if type(position) is not int or not 1 <= position < 1 << 63:
        raise ValidationError("a tracking position is an integer >= 1", code="invalid_tracking")


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise ValidationError(f"{what} is not valid UTF-8 text (lone surrogate)") from None


def _decode(body: bytes | memoryview, event_index: int, log_index: int) -> StoredEvent:
    try:
        return decode_event_body(body, event_index)
    except UnicodeDecodeError as exc:
        raise CorruptionError(_WHERE, log_index, f"event text is not UTF-8: {exc}") from None


_Match = Callable[[bytes | memoryview, int], bool]
_NAME_LENGTHS = struct.Struct("<HHH")  # id, aggregate_id and type lengths, at body offset 2


def _matcher(types: Collection[str] | None, aggregate_prefix: str | None) -> _Match | None:
    """A test of an event body against the log filters, on its key bytes only (None: no
    filter). The body's lengths were checked when it was applied."""
    wanted = None if types is None else frozenset(_utf8(t, "type") for t in types)
    prefix = _utf8(aggregate_prefix, "aggregate_prefix") if aggregate_prefix else b""
    if wanted is None and not prefix:
        return None
    prefix_n = len(prefix)

    def match(body: bytes | memoryview, log_index: int) -> bool:
        try:
            id_n, agg_n, type_n = _NAME_LENGTHS.unpack_from(body, 2)
        except struct.error:
            raise CorruptionError(_WHERE, log_index, "event body shorter than its prefix") from None
        start = PREFIX_BYTES + id_n
        if prefix_n and (agg_n < prefix_n or body[start : start + prefix_n] != prefix):
            return False
        start += agg_n
        return wanted is None or body[start : start + type_n] in wanted

    return match


class EventStore:
    """Applied state of the log plus the leader's pending overlay. Not thread-safe: one
    trio thread owns it (prepare and pending_added run with no await between them)."""

    def __init__(self, reader: BodyReader, *, hash_mask: int = HASH_MASK) -> None:
        self._reader = reader
        # Map keys are Python's hash of the UTF-8 bytes of an id, masked to 64 bits. The
        # maps live in memory and are rebuilt at start-up, so per-process hash
        # randomisation does not matter, and hashing bytes lets start-up skip decoding.
        # The mask is a seam: tests pass a tiny one to force collisions everywhere.
        self._mask = hash_mask
        self._prev = array("Q")
        self._sys = array("Q")
        self._sys_adj = array("Q")  # _sys[k] - k: sorted, for event -> log index
        self._ids = U64Map()
        self._id_overflow: dict[bytes, int] = {}
        self._aggs = U64Map()
        self._agg_overflow: dict[bytes, int] = {}
        self._agg_version = array("Q")
        self._agg_last = array("Q")
        self._agg_key = array("Q")
        self._agg_keys = bytearray()
        self._long: dict[int, array[int]] = {}
        self.duplicate_ids_applied = 0
        # leader overlay
        self._pending_ids: dict[str, _Pending] = {}
        self._pending_by_log: dict[int, _Pending] = {}  # ascending log indexes
        self._pending_versions: dict[str, int] = {}
        self._pending_last = 0
        self._token = 0  # bumped by anything that invalidates an outstanding Prepared
        # consumer positions: applied, and the leader's pending ones (by log index, and the
        # highest pending position per consumer)
        self._consumers: dict[str, int] = {}
        self._pending_tracking: dict[int, _TrackingPlan] = {}
        self._pending_positions: dict[str, int] = {}

    # ------------------------------------------------------------------ positions

    @property
    def last_applied_log_index(self) -> int:
        return len(self._prev)

    @property
    def last_applied_event_index(self) -> int:
        return len(self._prev) - len(self._sys)

    @property
    def aggregate_count(self) -> int:
        return len(self._agg_version)

    @property
    def pending_count(self) -> int:
        return len(self._pending_by_log)

    @property
    def next_log_index(self) -> int:
        """Where the next prepared batch must land for the tentative state to be right:
        just past everything applied or pending."""
        return max(len(self._prev), self._pending_last) + 1

    def log_to_event_index(self, log_index: int) -> int:
        """The number of events at log indexes 1..log_index: for an event, its API index."""
        if not 0 <= log_index <= len(self._prev):
            raise LogStateError(f"log index {log_index} is not applied (last {len(self._prev)})")
        return log_index - bisect_right(self._sys, log_index)

    def event_to_log_index(self, event_index: int) -> int:
        """The log index of the event with API index ``event_index`` (applied events only)."""
        if not 1 <= event_index <= self.last_applied_event_index:
            raise LogStateError(f"event index {event_index} is not applied (last {self.last_applied_event_index})")
        return event_index + bisect_right(self._sys_adj, event_index)

    @property
    def nbytes(self) -> int:
        """Bytes held by the applied-state columns and maps (not the Python dicts)."""
        cols = (self._prev, self._sys, self._sys_adj, self._agg_version, self._agg_last, self._agg_key)
        total = sum(c.buffer_info()[1] * c.itemsize for c in cols)
        total += sum(c.buffer_info()[1] * c.itemsize for c in self._long.values())
        return total + len(self._agg_keys) + self._ids.nbytes + self._aggs.nbytes

    # ------------------------------------------------------------------ applying

    def apply(self, log_index: int, kind: int, body: bytes | memoryview) -> None:
        """Apply the committed record at ``log_index``; records come strictly in order.
        A CorruptionError leaves the applied state as it was."""
        if log_index != len(self._prev) + 1:
            raise LogStateError(f"apply of log index {log_index}, expected {len(self._prev) + 1}")
        if kind == KIND_EVENT:
            self._apply_event(log_index, body, True)
        elif kind == KIND_TRACKING:
            self._apply_tracking(log_index, body)
        elif kind in _SYSTEM_KINDS:
            self._sys_adj.append(log_index - len(self._sys))
            self._sys.append(log_index)
            self._prev.append(0)
            if log_index in self._pending_by_log or log_index in self._pending_tracking:
                self._drop_pending()  # our append there was replaced: the log diverged
        else:
            raise CorruptionError(_WHERE, log_index, f"unknown record kind {kind}")

    def _apply_tracking(self, log_index: int, body: bytes | memoryview) -> None:
        try:
            tracking = decode_tracking_body(body, log_index)
        except CorruptionError as exc:
            raise CorruptionError(_WHERE, log_index, exc.reason) from None
        stored = self._consumers.get(tracking.consumer, 0)
        # The invariant a tracking conflict protects: a consumer's position only grows.
        # Checked on every apply (not an assert, which -O would strip): a log that breaks
        # it was written by a bug, and the state machine refuses it like any damage.
        if tracking.position <= stored:
            raise CorruptionError(
                _WHERE,
                log_index,
                f"consumer {tracking.consumer!r} is at position {stored}; the record moves it to {tracking.position}",
            )
        if log_index in self._pending_by_log:
            self._drop_pending()  # an event of ours was to be here: the log diverged
        self._sys_adj.append(log_index - len(self._sys))
        self._sys.append(log_index)
        self._prev.append(0)
        self._consumers[tracking.consumer] = tracking.position
        tracked = self._pending_tracking.pop(log_index, None)
        if tracked is None:
            return
        if tracked.tracking != tracking:
            self._drop_pending()
            return
        tracked.applied = True
        if self._pending_positions.get(tracking.consumer) == tracking.position:
            del self._pending_positions[tracking.consumer]

    def consumer_position(self, consumer: str) -> int | None:
        """The applied position of a consumer, None when it never stored one."""
        return self._consumers.get(consumer)

    def apply_own(self, upto: int) -> int:
        """Apply, from memory, the leader's own pending events that come next in the log,
        up to log index ``upto`` (committed and in the local log); returns how many.

        The bodies are the very bytes ``prepare`` encoded and the log was given, and the
        overlay is dropped whenever the log at a pending index could differ (leadership
        lost, disk-full rollback, another record applied there): reading them back from
        the log would only re-check a CRC over the page cache, at ~5-10 us an event on
        the append path. Anything not pending (epoch starts, another leader's records)
        stops this; the caller applies the rest from the log with ``rebuild``."""
        n = 0
        pending_by_log = self._pending_by_log
        log_index = len(self._prev) + 1
        while log_index <= upto:
            pending = pending_by_log.get(log_index)
            if pending is None:
                tracked = self._pending_tracking.get(log_index)
                if tracked is None:
                    break
                self._apply_tracking(log_index, tracked.body)
                n += 1
                log_index += 1
                continue
            self._apply_event(log_index, pending.body, True)
            n += 1
            log_index += 1
        return n

    def rebuild(self, records: Iterable[LogRecord]) -> int:
        """Apply records in order (start-up: the whole log); returns how many.

        Into an empty id index, ids are put without the per-event "seen before?" probe
        (one C call of ~0.5 us out of ~3). If the map then holds fewer ids than events
        were applied, some hash repeated (a collision or a duplicate id) and a later put
        replaced an earlier one: the ids of the rebuilt range are indexed again, verified.
        """
        if len(self._ids) or self._id_overflow or self._pending_by_log or self._pending_tracking:
            n = 0
            for record in records:
                self.apply(record.index, record.kind, record.body)
                n += 1
            return n
        first = len(self._prev) + 1
        try:
            return self._rebuild_fast(records)
        finally:
            if len(self._ids) != self.last_applied_event_index:
                self._reindex_ids(first)

    def _rebuild_fast(self, records: Iterable[LogRecord]) -> int:
        # The steps of _apply_event inlined with every attribute in a local: this loop is
        # the start-up time. Anything unusual (a system record, a gap, a memoryview body,
        # damage, a hash hit on another aggregate, an aggregate becoming long) takes the
        # general path, which also raises the right error.
        prev = self._prev
        agg_version = self._agg_version
        agg_last = self._agg_last
        agg_key = self._agg_key
        agg_keys = self._agg_keys
        ids_put = self._ids.put
        aggs_get = self._aggs.get
        aggs_put = self._aggs.put
        long_get = self._long.get
        mask = self._mask
        unpack = _KEYS.unpack_from
        general = self._apply_event
        n = 0
        for record in records:
            n += 1
            log_index = record.index
            body = record.body
            if record.kind != KIND_EVENT or log_index != len(prev) + 1 or type(body) is not bytes:
                self.apply(log_index, record.kind, body)
                continue
            if len(body) < PREFIX_BYTES:
                general(log_index, body, False)
                continue
            fmt, id_n, agg_n, type_n, pay_n, meta_n, version = unpack(body)
            if fmt != BODY_FORMAT or PREFIX_BYTES + id_n + agg_n + type_n + pay_n + meta_n != len(body):
                general(log_index, body, False)
                continue
            id_end = PREFIX_BYTES + id_n
            aggregate_id = body[id_end : id_end + agg_n]
            agg_hash = hash(aggregate_id) & mask
            slot = aggs_get(agg_hash)
            if slot is None:
                if version != 1:
                    general(log_index, body, False)
                    continue
                ids_put(hash(body[PREFIX_BYTES:id_end]) & mask, log_index)
                aggs_put(agg_hash, len(agg_version))
                agg_key.append(len(agg_keys) << _KEY_LEN_BITS | agg_n)
                agg_keys += aggregate_id
                agg_version.append(1)
                agg_last.append(log_index)
                prev.append(0)
                continue
            key = agg_key[slot]
            positions = long_get(slot) if version > LONG_AGGREGATE_EVENTS else None
            if (
                version != agg_version[slot] + 1
                or key & _KEY_LEN_MASK != agg_n
                or not agg_keys.startswith(aggregate_id, key >> _KEY_LEN_BITS)
                or (positions is None and version > LONG_AGGREGATE_EVENTS)
            ):
                general(log_index, body, False)
                continue
            ids_put(hash(body[PREFIX_BYTES:id_end]) & mask, log_index)
            prev.append(agg_last[slot])
            agg_version[slot] = version
            agg_last[slot] = log_index
            if positions is not None:
                positions.append(log_index)
        return n

    def _reindex_ids(self, first: int) -> None:
        """Rebuild the id index of log indexes first.. (the slow path of ``rebuild``)."""
        self._ids = U64Map()
        self._id_overflow.clear()
        self.duplicate_ids_applied = 0
        for log_index in range(first, len(self._prev) + 1):
            if not self._is_event(log_index):
                continue
            event_id = _event_keys(self._reader.body(log_index), log_index)[0]
            self._index_id(event_id, log_index)

    def _apply_event(self, log_index: int, body: bytes | memoryview, verify_id: bool) -> None:
        # Validate everything before the first mutation, so a CorruptionError leaves the
        # applied state as it was.
        event_id, aggregate_id, version = _event_keys(body, log_index)
        agg_hash = hash(aggregate_id) & self._mask
        slot = self._aggs.get(agg_hash)
        hash_free = slot is None
        if slot is not None:
            key = self._agg_key[slot]
            start = key >> _KEY_LEN_BITS
            if self._agg_keys[start : start + (key & _KEY_LEN_MASK)] != aggregate_id:
                slot = self._agg_overflow.get(aggregate_id)
        if slot is None:
            prev = 0
            expected = 1
        else:
            prev = self._agg_last[slot]
            expected = self._agg_version[slot] + 1
        if version != expected:
            raise CorruptionError(
                _WHERE,
                log_index,
                f"aggregate {aggregate_id!r} has version {expected - 1}; the record holds version {version}",
            )
        if verify_id:
            self._index_id(event_id, log_index)
        else:
            self._ids.put(hash(event_id) & self._mask, log_index)
        if slot is None:
            slot = len(self._agg_version)
            self._agg_key.append(len(self._agg_keys) << _KEY_LEN_BITS | len(aggregate_id))
            self._agg_keys += aggregate_id
            self._agg_version.append(version)
            self._agg_last.append(log_index)
            if hash_free:
                self._aggs.put(agg_hash, slot)
            else:
                self._agg_overflow[aggregate_id] = slot
        else:
            self._agg_version[slot] = version
            self._agg_last[slot] = log_index
        self._prev.append(prev)
        if version > LONG_AGGREGATE_EVENTS:
            positions = self._long.get(slot)
            if positions is None:
                positions = self._long[slot] = self._walk_chain(prev, version - 1, 1, version - 1)
            positions.append(log_index)
        if self._pending_by_log:
            self._pending_applied(log_index, event_id, version)
        if self._pending_tracking and log_index in self._pending_tracking:
            self._drop_pending()  # our tracking record was to be here: the log diverged

    def _find_aggregate(self, aggregate_id: bytes) -> int:
        """The slot of an applied aggregate, or -1."""
        slot = self._aggs.get(hash(aggregate_id) & self._mask)
        if slot is None:
            return -1
        key = self._agg_key[slot]
        start = key >> _KEY_LEN_BITS
        if self._agg_keys[start : start + (key & _KEY_LEN_MASK)] == aggregate_id:
            return slot
        return self._agg_overflow.get(aggregate_id, -1)

    def _index_id(self, event_id: bytes, log_index: int) -> None:
        id_hash = hash(event_id) & self._mask
        hit = self._ids.get(id_hash)
        if hit is None:
            self._ids.put(id_hash, log_index)
        elif event_id in self._id_overflow or self._id_at(hit) == event_id:
            self.duplicate_ids_applied += 1
        else:
            self._id_overflow[event_id] = log_index

    def _id_at(self, log_index: int) -> bytes:
        return _event_keys(self._reader.body(log_index), log_index)[0]

    def _applied_log_index_of_id(self, event_id: bytes) -> int | None:
        hit = self._ids.get(hash(event_id) & self._mask)
        if hit is None:
            return None
        if self._id_at(hit) == event_id:
            return hit
        return self._id_overflow.get(event_id)

    def _walk_chain(self, log_index: int, version: int, lo: int, hi: int) -> array[int]:
        """Log indexes of versions lo..hi (ascending), walking back from ``log_index``
        which holds ``version``."""
        out = array("Q", bytes(8 * (hi - lo + 1)))
        prev = self._prev
        while version >= lo:
            if version <= hi:
                out[version - lo] = log_index
            log_index = prev[log_index - 1]
            version -= 1
        return out

    # ------------------------------------------------------------------ reads

    def aggregate_version(self, aggregate_id: str) -> int:
        """The applied version of an aggregate (0 = no events)."""
        slot = self._find_aggregate(_utf8(aggregate_id, "aggregate_id"))
        return 0 if slot < 0 else self._agg_version[slot]

    def lookup(self, event_id: str) -> AppendResult | None:
        """Where an applied event id landed (the first occurrence), or None."""
        log_index = self._applied_log_index_of_id(_utf8(event_id, "event id"))
        if log_index is None:
            return None
        version = _event_keys(self._reader.body(log_index), log_index)[2]
        return AppendResult(event_id, self.log_to_event_index(log_index), version)

    def read_aggregate(
        self,
        aggregate_id: str,
        from_version: int = 0,
        limit: int = 100,
        direction: Direction = "forward",
    ) -> AggregateRead:
        """At most ``limit`` events of one aggregate, forward from ``from_version`` (0 and 1
        both mean the first) or backward from it (0 = from the newest)."""
        if from_version < 0 or limit < 0:
            raise ValidationError("from_version and limit must not be negative", from_version=from_version, limit=limit)
        if direction not in ("forward", "backward"):
            raise ValidationError("direction must be forward or backward", direction=direction)
        slot = self._find_aggregate(_utf8(aggregate_id, "aggregate_id"))
        if slot < 0:
            return AggregateRead([], 0)
        current = self._agg_version[slot]
        if direction == "forward":
            lo = max(from_version, 1)
            hi = min(current, lo + limit - 1)
        else:
            hi = current if from_version == 0 or from_version > current else from_version
            lo = max(1, hi - limit + 1)
        if limit == 0 or lo > hi:
            return AggregateRead([], current)
        positions = self._long.get(slot)
        if positions is not None:
            window = positions[lo - 1 : hi]
        else:
            window = self._walk_chain(self._agg_last[slot], current, lo, hi)
        events = [self._read_event(log_index) for log_index in window]
        for i, event in enumerate(events):
            if event.aggregate_id != aggregate_id or event.version != lo + i:
                raise CorruptionError(
                    _WHERE,
                    window[i],
                    f"index says {aggregate_id!r} version {lo + i}, the record holds "
                    f"{event.aggregate_id!r} version {event.version}",
                )
        if direction == "backward":
            events.reverse()
        return AggregateRead(events, current)

    def read_log(
        self,
        from_index: int = 1,
        limit: int = 100,
        *,
        direction: Direction = "forward",
        types: Collection[str] | None = None,
        aggregate_prefix: str | None = None,
        scan_budget: int = SCAN_BUDGET_EVENTS,
    ) -> LogRead:
        """At most ``limit`` applied events that match the filters, from API index
        ``from_index``: forward (0 means 1), or backward (0 or past the end means the last).

        ``types`` (an event matches when its type is one of them) and ``aggregate_prefix``
        (its aggregate id starts with it) are checked on the record body's fixed prefix and
        key bytes: a non-matching event's JSON is never decoded. At most
        ``max(scan_budget, limit)`` events are looked at, so a rare filter answers with
        fewer events (maybe none) and ``next_index`` says where the scan stopped: forward
        the next index to read, backward the next lower one (0 = the start was reached)."""
        if from_index < 0 or limit < 0 or scan_budget < 1:
            raise ValidationError("from_index and limit must not be negative", from_index=from_index, limit=limit)
        if direction not in ("forward", "backward"):
            raise ValidationError("direction must be forward or backward", direction=direction)
        match = _matcher(types, aggregate_prefix)
        last = self.last_applied_event_index
        budget = max(scan_budget, limit)
        if direction == "backward":
            return self._read_log_backward(last if not 0 < from_index <= last else from_index, limit, budget, match)
        first = max(from_index, 1)
        if limit == 0 or first > last:
            return LogRead([], last, first)
        end = min(last, first + budget - 1)
        log_index = self.event_to_log_index(first)
        sys_log = self._sys
        k = bisect_right(sys_log, log_index)  # next system record at or after log_index + 1
        reader = self._reader
        events: list[StoredEvent] = []
        event_index = first
        while event_index <= end:
            body = reader.body(log_index)
            if match is None or match(body, log_index):
                events.append(_decode(body, event_index, log_index))
            event_index += 1
            if len(events) == limit:
                break
            log_index += 1
            while k < len(sys_log) and sys_log[k] == log_index:
                log_index += 1
                k += 1
        return LogRead(events, last, event_index)

    def _read_log_backward(self, start: int, limit: int, budget: int, match: _Match | None) -> LogRead:
        last = self.last_applied_event_index
        if limit == 0 or start < 1:
            return LogRead([], last, max(start, 0))
        end = max(1, start - budget + 1)
        log_index = self.event_to_log_index(start)
        sys_log = self._sys
        k = bisect_right(sys_log, log_index) - 1  # last system record below log_index
        reader = self._reader
        events: list[StoredEvent] = []
        event_index = start
        while event_index >= end:
            body = reader.body(log_index)
            if match is None or match(body, log_index):
                events.append(_decode(body, event_index, log_index))
            event_index -= 1
            if len(events) == limit:
                break
            log_index -= 1
            while k >= 0 and sys_log[k] == log_index:
                log_index -= 1
                k -= 1
        return LogRead(events, last, event_index)

    def _is_event(self, log_index: int) -> bool:
        k = bisect_right(self._sys, log_index)
        return k == 0 or self._sys[k - 1] != log_index

    def _read_event(self, log_index: int) -> StoredEvent:
        return _decode(self._reader.body(log_index), self.log_to_event_index(log_index), log_index)

    # ------------------------------------------------------------------ leader side

    def prepare(
        self,
        events: Sequence[NewEvent],
        *,
        timestamp_us: int | None = None,
        next_log_index: int | None = None,
        tracking: Tracking | None = None,
        max_events: int = MAX_BATCH_EVENTS,
    ) -> Prepared:
        """Validate an atomic batch against applied + pending state and encode what to write.

        Raises ValidationError (empty or oversized batch, an id twice in it, a bad event)
        and ConflictError (``wrong_expected_version``, ``duplicate_event_id``); nothing is
        changed when it raises. Pass the writer's ``next_log_index`` to have the store
        refuse (NotCaughtUp, before anything is written) when the log holds records it
        has neither applied nor seen as pending: versions computed without them could
        collide with theirs. A new leader therefore applies through its epoch start first.

        ``tracking``: the batch also stores that consumer position (its last record), and
        is refused with ConflictError ``tracking_conflict`` unless the position is above
        the consumer's applied and pending ones. A batch whose events are all repeats of
        earlier appends is their idempotent answer when the position is already stored
        (it committed with them), and writes nothing. With a ``tracking``, ``events`` may
        be empty.
        """
        if next_log_index is not None and next_log_index != self.next_log_index:
            raise NotCaughtUp(
                f"the log's next index is {next_log_index} but the store knows the log up to "
                f"{self.next_log_index - 1}: apply the rest before preparing"
            )
        if not events and tracking is None:
            raise ValidationError("a batch needs at least one event", code="empty_batch")
        if tracking is not None:
            _check_tracking(tracking)
        if len(events) > max_events:
            raise ValidationError(
                f"a batch holds at most {max_events} events",
                code="batch_too_large",
                count=len(events),
            )
        seen: set[str] = set()
        for event in events:
            if event.id in seen:
                raise ValidationError(
                    "the same event id twice in one batch", code="duplicate_id_in_batch", event_id=event.id
                )
            seen.add(event.id)
        if timestamp_us is None:
            timestamp_us = time.time_ns() // 1000
        batch_versions: dict[str, int] = {}
        planned: list[_Planned] = []
        bodies: list[bytes] = []
        for event in events:
            expected = event.expected_version
            if expected is not None and expected != EXISTS and (type(expected) is not int or expected < 0):
                raise ValidationError(
                    'expected_version must be an integer >= 0 or "exists"',
                    code="invalid_expected_version",
                    event_id=event.id,
                )
            id_utf8 = _utf8(event.id, "event id")
            if not id_utf8:
                raise ValidationError("an event needs a non-empty id", code="invalid_event_id")
            repeat = self._find_repeat(event, id_utf8)
            if repeat is not None:
                planned.append(repeat)
                continue
            current = batch_versions.get(event.aggregate_id)
            if current is None:
                current = self._tentative_version(event.aggregate_id)
            if expected is not None and (current == 0 if expected == EXISTS else expected != current):
                wanted = "at least one event" if expected == EXISTS else f"version {expected}"
                raise ConflictError(
                    f"aggregate {event.aggregate_id!r} is at version {current}; expected {wanted}",
                    code="wrong_expected_version",
                    aggregate_id=event.aggregate_id,
                    expected_version=event.expected_version,
                    current_version=current,
                )
            version = current + 1
            try:
                body = encode_event_body(event, version, timestamp_us)
            except (ValueError, OverflowError, struct.error) as exc:  # over a limit, surrogate, range
                raise ValidationError(f"event {event.id!r}: {exc}", event_id=event.id) from None
            batch_versions[event.aggregate_id] = version
            planned.append(_Planned(event, id_utf8, version, len(bodies), 0, None))
            bodies.append(body)
        tracked = None
        if tracking is not None:
            stored = self._tentative_position(tracking.consumer)
            if not (events and not bodies and stored >= tracking.position):  # not a whole repeat
                if tracking.position <= stored:
                    raise ConflictError(
                        f"consumer {tracking.consumer!r} is at position {stored}, not below {tracking.position}",
                        code="tracking_conflict",
                        consumer=tracking.consumer,
                        position=tracking.position,
                        stored_position=stored,
                    )
                tracked = _TrackingPlan(tracking, encode_tracking_body(tracking))
                bodies.append(tracked.body)
        self._token += 1
        return Prepared(bodies, planned, self._token, tracking, tracked)

    def _tentative_position(self, consumer: str) -> int:
        pending = self._pending_positions.get(consumer)
        return pending if pending is not None else self._consumers.get(consumer, 0)

    def _find_repeat(self, event: NewEvent, id_utf8: bytes) -> _Planned | None:
        """The plan for an id seen before (applied or pending); ConflictError if it was
        seen with other content; None for a new id."""
        pending = self._pending_ids.get(event.id)
        if pending is not None:
            if not _same_content(event, pending.event):
                raise self._duplicate(event)
            return _Planned(event, id_utf8, pending.version, -1, pending.log_index, None)
        log_index = self._applied_log_index_of_id(id_utf8)
        if log_index is None:
            return None
        stored = self._read_event(log_index)
        if not event.same_content(stored):
            raise self._duplicate(event)
        result = AppendResult(event.id, stored.index, stored.version)
        return _Planned(event, id_utf8, stored.version, -1, 0, result)

    @staticmethod
    def _duplicate(event: NewEvent) -> ConflictError:
        return ConflictError(
            f"event id {event.id!r} was already used for another event",
            code="duplicate_event_id",
            event_id=event.id,
        )

    def _tentative_version(self, aggregate_id: str) -> int:
        pending = self._pending_versions.get(aggregate_id)
        return pending if pending is not None else self.aggregate_version(aggregate_id)

    def pending_added(self, first_log_index: int, prepared: Prepared) -> None:
        """``prepared.bodies`` were written at ``first_log_index``.. : later prepares see
        them. Must follow ``prepare`` with nothing else (no await) in between."""
        if prepared._token != self._token:
            raise LogStateError("pending_added of a stale prepare (a later prepare, add or clear ran)")
        if not prepared.bodies:
            raise LogStateError("pending_added of a batch with nothing to write")
        floor = max(len(self._prev), self._pending_last)
        if first_log_index <= floor:
            raise LogStateError(f"pending batch at log index {first_log_index}, at or below {floor}")
        self._token += 1
        prepared._first_log_index = first_log_index
        for plan in prepared._planned:
            if plan.offset < 0:
                continue
            plan.log_index = first_log_index + plan.offset
            pending = _Pending(
                plan.log_index, plan.version, plan.event, plan.id_utf8, plan, prepared.bodies[plan.offset]
            )
            self._pending_ids[plan.event.id] = pending
            self._pending_by_log[plan.log_index] = pending
            self._pending_versions[plan.event.aggregate_id] = plan.version
        tracked = prepared._tracking
        if tracked is not None:
            tracked.log_index = first_log_index + len(prepared.bodies) - 1
            self._pending_tracking[tracked.log_index] = tracked
            self._pending_positions[tracked.tracking.consumer] = tracked.tracking.position
        self._pending_last = first_log_index + len(prepared.bodies) - 1
        prepared._wait = max(prepared._wait, self._pending_last)

    def pending_clear(self) -> None:
        """Leadership lost: pending appends may still commit, or never; either way the
        next leadership starts from applied state only."""
        self._drop_pending()

    def _drop_pending(self) -> None:
        self._pending_ids.clear()
        self._pending_by_log.clear()
        self._pending_versions.clear()
        self._pending_tracking.clear()
        self._pending_positions.clear()
        self._pending_last = 0
        self._token += 1

    def _pending_applied(self, log_index: int, event_id: bytes, version: int) -> None:
        pending = self._pending_by_log.pop(log_index, None)
        if pending is None:
            return  # not one of ours (e.g. committed before our first append)
        if pending.id_utf8 != event_id or pending.version != version:
            self._drop_pending()  # our append there was replaced: the log diverged
            return
        del self._pending_ids[pending.event.id]
        # Applied exactly as written: the answer is known now, so ``results`` need not
        # read the record back (a decode and CRC check per event on the append path).
        pending.plan.result = AppendResult(pending.event.id, log_index - len(self._sys), version)
        aggregate_id = pending.event.aggregate_id
        if self._pending_versions.get(aggregate_id) == version:
            del self._pending_versions[aggregate_id]

    def results(self, prepared: Prepared) -> list[AppendResult]:
        """The answer for every event of an applied batch, in input order.

        Raises LogStateError if the batch is not applied yet (a bug in the caller), and
        EntriesReplaced if a record it was written as was replaced (leadership changed and
        the suffix was truncated) and the id is not applied anywhere else with the same
        content.
        """
        wait = prepared.wait_log_index
        if wait > len(self._prev):
            raise LogStateError(f"batch not applied yet: waiting for {wait}, applied {len(self._prev)}")
        tracked = prepared._tracking
        if tracked is not None and not tracked.applied:
            # Not seen applied as written (the overlay was dropped meanwhile): look.
            where = tracked.log_index
            if self._is_event(where) or self._reader.body(where) != tracked.body:
                raise EntriesReplaced(f"the tracking record written at log index {where} was replaced")
            tracked.applied = True
        out: list[AppendResult] = []
        for plan in prepared._planned:
            if plan.result is not None:
                out.append(plan.result)
                continue
            if self._is_event(plan.log_index):
                event_id, _, version = _event_keys(self._reader.body(plan.log_index), plan.log_index)
            else:
                event_id, version = b"", 0
            if event_id == plan.id_utf8 and version == plan.version:
                out.append(AppendResult(plan.event.id, self.log_to_event_index(plan.log_index), version))
                continue
            found = self._applied_log_index_of_id(plan.id_utf8)
            stored = None if found is None else self._read_event(found)
            if stored is None or not plan.event.same_content(stored):
                raise EntriesReplaced(f"event {plan.event.id!r} written at log index {plan.log_index} was replaced")
            out.append(AppendResult(stored.id, stored.index, stored.version))
        return out
