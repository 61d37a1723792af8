"""Events: the validated shapes that cross the API, and their bytes inside a WAL record.

An event record's body (kind EVENT in ``walstore.wal.record``) is, little-endian:

    offset size field
    0      1    body format (BODY_FORMAT = 1)
    1      1    flags: bit 0 FLAG_BINARY_PAYLOAD (the payload is raw bytes, not JSON
                text; records written before it existed hold 0); other bits 0
    2      2    id length in bytes
    4      2    aggregate_id length
    6      2    type length
    8      4    payload length (JSON text, or raw bytes with FLAG_BINARY_PAYLOAD)
    12     4    metadata JSON length
    16     8    version: position inside the aggregate, from 1, gap-free
    24     8    timestamp: microseconds since the Unix epoch, set by the leader (signed)
    32     ...  id, aggregate_id, type (UTF-8), payload, metadata JSON

The fixed prefix lets start-up rebuild the indexes (id, aggregate, version) without
parsing JSON; payload and metadata are stored as the JSON text the client sent (validated,
whitespace outside strings removed: ``walstore.json_text``), so reads copy them into
responses without re-encoding and every number and key order comes back as sent. A
binary payload (``payload_base64`` in the API) is stored as its decoded bytes, exactly.

Pure: no I/O, no trio.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Literal

from walstore.errors import CorruptionError
from walstore.json_text import same_json_value

BODY_FORMAT = 1
FLAG_BINARY_PAYLOAD: Final = 0x01  # body byte 1: the payload is bytes, not JSON text
_KNOWN_BODY_FLAGS: Final = FLAG_BINARY_PAYLOAD
_PREFIX = struct.Struct("<BBHHHIIQq")
PREFIX_BYTES = _PREFIX.size  # 32

# ``expected_version``: None = any, an int N >= 0 = exactly N, EXISTS = at least one event.
EXISTS: Final = "exists"
ExpectedVersion = int | Literal["exists"] | None

# Limits, checked by the HTTP validation and again by the codec. Why these numbers:
# a UUID is 36 bytes; EventStoreDB caps stream names at ~2 KiB but real aggregate ids are
# short, and every id lives in memory indexes, so 256 bytes keeps them cheap.
MAX_ID_BYTES = 256
MAX_AGGREGATE_ID_BYTES = 256
MAX_TYPE_BYTES = 256
# payload + metadata of one event; the HTTP body limit (1 MiB default) bounds it first.
MAX_EVENT_BYTES = 4 * 1024 * 1024
# events in one atomic batch by default (the node's MAX_BATCH_EVENTS setting): one batch
# is one group-commit unit, and one APPEND unit when shipped from the leader's memory
# (walstore.config checks that the largest batch fits one peer frame).
MAX_BATCH_EVENTS = 10_000


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One validated event as a client asked to append it."""

    id: str
    type: str
    aggregate_id: str
    payload: bytes  # the client's JSON text of an object, whitespace removed (json_text)
    metadata: bytes  # the same, for metadata
    expected_version: ExpectedVersion = None  # 0 = aggregate must be new; None = any
    binary: bool = False  # payload holds raw bytes (payload_base64), not JSON text

    def same_content(self, other: StoredEvent) -> bool:
        """Idempotency: a repeated id is the same append when these fields match (a
        binary payload byte for byte, JSON by value)."""
        return (
            self.type == other.type
            and self.aggregate_id == other.aggregate_id
            and self.binary == other.binary
            and (self.payload == other.payload if self.binary else same_json_value(self.payload, other.payload))
            and same_json_value(self.metadata, other.metadata)
        )


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event as the log holds it."""

    index: int
    version: int
    timestamp_us: int
    id: str
    type: str
    aggregate_id: str
    payload: bytes
    metadata: bytes
    binary: bool = False  # payload is raw bytes (rendered as payload_base64)


@dataclass(frozen=True, slots=True)
class AppendResult:
    event_id: str
    index: int
    version: int


def encode_event_body(event: NewEvent, version: int, timestamp_us: int) -> bytes:
    id_b = event.id.encode()
    agg_b = event.aggregate_id.encode()
    type_b = event.type.encode()
    if len(id_b) > MAX_ID_BYTES or len(agg_b) > MAX_AGGREGATE_ID_BYTES or len(type_b) > MAX_TYPE_BYTES:
        raise ValueError("event id, aggregate_id or type over its limit")
    if len(event.payload) + len(event.metadata) > MAX_EVENT_BYTES:
        raise ValueError("event payload and metadata over MAX_EVENT_BYTES")
    prefix = _PREFIX.pack(
        BODY_FORMAT,
        FLAG_BINARY_PAYLOAD if event.binary else 0,
        len(id_b),
        len(agg_b),
        len(type_b),
        len(event.payload),
        len(event.metadata),
        version,
        timestamp_us,
    )
    return b"".join((prefix, id_b, agg_b, type_b, event.payload, event.metadata))


def _unpack_prefix(body: bytes | memoryview, index: int) -> tuple[int, int, int, int, int, int, int, int]:
    if len(body) < PREFIX_BYTES:
        raise CorruptionError("<record body>", index, "event body shorter than its prefix")
    fmt, flags, id_n, agg_n, type_n, pay_n, meta_n, version, ts = _PREFIX.unpack_from(body)
    if fmt != BODY_FORMAT:
        raise CorruptionError("<record body>", index, f"unknown event body format {fmt}")
    if flags & ~_KNOWN_BODY_FLAGS:
        raise CorruptionError("<record body>", index, f"unknown event body flags {flags:#04x}")
    if PREFIX_BYTES + id_n + agg_n + type_n + pay_n + meta_n != len(body):
        raise CorruptionError("<record body>", index, "event body lengths do not add up")
    return flags, id_n, agg_n, type_n, pay_n, meta_n, version, ts


def peek_event_keys(body: bytes | memoryview, index: int = 0) -> tuple[str, str, int]:
    """(id, aggregate_id, version) without touching payload or metadata: the start-up path."""
    _, id_n, agg_n, _, _, _, version, _ = _unpack_prefix(body, index)
    mv = memoryview(body)
    p = PREFIX_BYTES
    try:
        event_id = str(mv[p : p + id_n], "utf-8")
        aggregate_id = str(mv[p + id_n : p + id_n + agg_n], "utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptionError("<record body>", index, f"event id or aggregate id is not UTF-8: {exc}") from None
    return event_id, aggregate_id, version


def decode_event_body(body: bytes | memoryview, index: int) -> StoredEvent:
    flags, id_n, agg_n, type_n, pay_n, meta_n, version, ts = _unpack_prefix(body, index)
    mv = memoryview(body)
    p = PREFIX_BYTES
    try:
        event_id = str(mv[p : p + id_n], "utf-8")
        p += id_n
        aggregate_id = str(mv[p : p + agg_n], "utf-8")
        p += agg_n
        type_ = str(mv[p : p + type_n], "utf-8")
        p += type_n
    except UnicodeDecodeError as exc:
        raise CorruptionError("<record body>", index, f"event text field is not UTF-8: {exc}") from None
    payload = bytes(mv[p : p + pay_n])
    p += pay_n
    metadata = bytes(mv[p : p + meta_n])
    binary = bool(flags & FLAG_BINARY_PAYLOAD)
    return StoredEvent(index, version, ts, event_id, type_, aggregate_id, payload, metadata, binary)


# ---------------------------------------------------------------------------- tracking
#
# A TRACKING record (kind 4 in walstore.wal.record) stores one consumer's position, in the
# same atomic batch as the events it was written with (it is the batch's last record).
# Its body, little-endian:
#
#     offset size field
#     0      1    body format (TRACKING_FORMAT = 1)
#     1      1    reserved, 0
#     2      2    consumer name length in bytes
#     4      4    reserved, 0
#     8      8    position, >= 1 (signed 64-bit range)
#     16     ...  consumer name (UTF-8)

TRACKING_FORMAT = 1
_TRACKING = struct.Struct("<BBHIq")
TRACKING_PREFIX_BYTES = _TRACKING.size  # 16
MAX_CONSUMER_BYTES = 256  # like an aggregate id: a URL path segment, kept in memory


@dataclass(frozen=True, slots=True)
class Tracking:
    """A consumer's position, committed together with a batch: ``position`` must be
    above the consumer's stored one."""

    consumer: str
    position: int


def encode_tracking_body(tracking: Tracking) -> bytes:
    name = tracking.consumer.encode()
    if not name or len(name) > MAX_CONSUMER_BYTES:
        raise ValueError(f"consumer name of {len(name)} bytes: 1..{MAX_CONSUMER_BYTES}")
    if not 1 <= tracking.position < 1 << 63:
        raise ValueError(f"tracking position {tracking.position} is not in 1..2**63-1")
    return _TRACKING.pack(TRACKING_FORMAT, 0, len(name), 0, tracking.position) + name


def decode_tracking_body(body: bytes | memoryview, index: int) -> Tracking:
    if len(body) < TRACKING_PREFIX_BYTES:
        raise CorruptionError("<record body>", index, "tracking body shorter than its prefix")
    fmt, res8, name_n, res32, position = _TRACKING.unpack_from(body)
    if fmt != TRACKING_FORMAT or res8 or res32:
        raise CorruptionError("<record body>", index, f"unknown tracking body format {fmt} or reserved bytes set")
    if TRACKING_PREFIX_BYTES + name_n != len(body) or not name_n or name_n > MAX_CONSUMER_BYTES:
        raise CorruptionError("<record body>", index, "tracking body lengths do not add up")
    if position < 1:
        raise CorruptionError("<record body>", index, f"tracking position {position} is not >= 1")
    try:
        consumer = str(memoryview(body)[TRACKING_PREFIX_BYTES:], "utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptionError("<record body>", index, f"consumer name is not UTF-8: {exc}") from None
    return Tracking(consumer, position)
