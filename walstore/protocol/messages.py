"""Messages of the peer protocol and their payload codecs (one message = one frame).

``FrameType`` below is the one table of frame type numbers. Payloads are little-endian;
``u8/u16/u32/u64`` are unsigned, ``bool`` is a u8 that must be 0 or 1, ``str`` is a u16
byte length and that many bytes of UTF-8, and ``rest`` is every byte to the end of the
payload (the WAL record bytes of APPEND / FETCH_RESULT, the JSON of FORWARD*):

    HELLO          u16 protocol_version, u64 epoch, str cluster_id, str node_id,
                   str incarnation (from version 2; <= 32 bytes, empty or 32 hex digits)
    PREPARE        u64 epoch, str leader_id
    PROMISE        u64 epoch, bool ok, u64 promised_epoch, u64 last_epoch, u64 last_index,
                   u64 commit_index, u32 n, n x (u64 epoch, u64 first_index)
    APPEND         u64 epoch, u64 prev_index, u64 prev_epoch, u64 leader_commit, rest entries
    APPEND_ACK     u64 epoch, bool ok, u64 match_index, u64 last_index, u64 conflict_index,
                   u64 conflict_epoch
    FETCH          u64 request_id, u64 epoch, u64 from_index, u32 max_bytes
    FETCH_RESULT   u64 request_id, u64 epoch, bool ok, u64 last_index, rest entries
    FORWARD        u64 request_id, rest body
    FORWARD_RESULT u64 request_id, u16 status (100..599), rest body
    HEARTBEAT      u64 epoch, u64 leader_commit, u64 sent_at_ms
    GOODBYE        str reason

Every length is checked against the bytes that remain before it is used, strings against
their own limit too; bytes left over after the last field are an error. There is exactly
one encoding of every message (flags 0, bools 0/1), so decode-then-encode gives back the
payload byte for byte: the fuzz target checks that.

``rest`` fields decode as read-only memoryviews into the received frame: the entries of
an APPEND reach the WAL writer without another copy. Call ``bytes()`` to keep a smaller
copy alive independently of the frame.

Decoding raises only ``ProtocolError`` (the peer's fault); encoding a value that does not
fit its field raises ``ValueError`` (our own bug).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from walstore.errors import ProtocolError
from walstore.protocol.frames import MAX_FRAME_BYTES, Frame, frame_header

# 2: HELLO carries the sender's data-directory incarnation (who may vote depends on it).
PROTOCOL_VERSION = 2
_HELLO_INCARNATION_VERSION = 2

# Node and cluster ids: config allows 63-character DNS labels; 256 bytes of UTF-8 is
# the same bound the event codec puts on ids, generous and still cheap to hold.
MAX_NAME_BYTES = 256
# An incarnation is 32 hex digits (walstore.wal.meta); empty for a peer that has none
# (a tool). Anything else is refused at decode.
MAX_INCARNATION_BYTES = 32
_HEX_DIGITS = "0123456789abcdef"
# A GOODBYE reason is a log line for the operator, not a document.
MAX_REASON_BYTES = 1024

Bytes: TypeAlias = bytes | memoryview


class FrameType(enum.IntEnum):
    """The frame type byte of every message. Numbers are wire format: never reuse one."""

    HELLO = 0x01
    PREPARE = 0x02
    PROMISE = 0x03
    APPEND = 0x04
    APPEND_ACK = 0x05
    FETCH = 0x06
    FETCH_RESULT = 0x07
    FORWARD = 0x08
    FORWARD_RESULT = 0x09
    HEARTBEAT = 0x0A
    GOODBYE = 0x0B


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HELLO = struct.Struct("<HQ")
_U64 = struct.Struct("<Q")
_PROMISE = struct.Struct("<QBQQQQI")
_HISTORY_PAIR = struct.Struct("<QQ")
_APPEND = struct.Struct("<QQQQ")
_APPEND_ACK = struct.Struct("<QBQQQQ")
_FETCH = struct.Struct("<QQQI")
_FETCH_RESULT = struct.Struct("<QQBQ")
_FORWARD_RESULT = struct.Struct("<QH")
_HEARTBEAT = struct.Struct("<QQQ")

# The biggest ``rest`` a message can carry is what a frame holds after its fixed fields;
# replication sizes APPEND and FETCH_RESULT batches against these.
MAX_APPEND_ENTRIES_BYTES = MAX_FRAME_BYTES - _APPEND.size
MAX_FETCH_ENTRIES_BYTES = MAX_FRAME_BYTES - _FETCH_RESULT.size


class _Reader:
    """Cursor over one payload; every read is bounds-checked and names what it read."""

    __slots__ = ("_name", "_pos", "_view")

    def __init__(self, name: str, payload: bytes) -> None:
        self._name = name
        self._view = memoryview(payload).toreadonly()
        self._pos = 0

    def need(self, n: int, what: str) -> None:
        remaining = len(self._view) - self._pos
        if n > remaining:
            raise ProtocolError(
                f"{self._name}: truncated at offset {self._pos}: {what} needs {n} bytes, {remaining} remain"
            )

    def fixed(self, layout: struct.Struct, what: str) -> tuple[int, ...]:
        self.need(layout.size, what)
        values: tuple[int, ...] = layout.unpack_from(self._view, self._pos)
        self._pos += layout.size
        return values

    def boolean(self, value: int, what: str) -> bool:
        if value not in (0, 1):
            raise ProtocolError(f"{self._name}: {what} must be 0 or 1, not {value}")
        return value == 1

    def string(self, limit: int, what: str) -> str:
        (length,) = self.fixed(_U16, f"{what} length")
        if length > limit:
            raise ProtocolError(f"{self._name}: {what} is {length} bytes, over the limit of {limit}")
        self.need(length, what)
        raw = self._view[self._pos : self._pos + length]
        self._pos += length
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{self._name}: {what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None

    def rest(self) -> memoryview:
        raw = self._view[self._pos :]
        self._pos = len(self._view)
        return raw

    def done(self) -> None:
        extra = len(self._view) - self._pos
        if extra:
            raise ProtocolError(f"{self._name}: {extra} unexpected bytes after the last field")


def _pack(layout: struct.Struct, name: str, *values: int) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as exc:
        raise ValueError(f"{name}: a field does not fit its wire type: {exc}") from None


def _pack_str(value: str, limit: int, name: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"{name}.{what} is {len(raw)} bytes of UTF-8, over the limit of {limit}")
    return _U16.pack(len(raw)) + raw


@dataclass(frozen=True, slots=True)
class Hello:
    """Opens a connection, both ways. ``epoch`` is the sender's promised epoch (for logs
    and for a leader to notice a peer ahead of it; not a fencing decision).
    ``incarnation`` names the sender's data directory: a leader counts a peer's promise
    or acknowledgement only when this is the incarnation the cluster records as a voter
    (``walstore.election.membership``)."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    protocol_version: int
    cluster_id: str
    node_id: str
    epoch: int
    incarnation: str = ""

    def encode_payload(self) -> list[Bytes]:
        name = "HELLO"
        parts: list[Bytes] = [
            _pack(_HELLO, name, self.protocol_version, self.epoch),
            _pack_str(self.cluster_id, MAX_NAME_BYTES, name, "cluster_id"),
            _pack_str(self.node_id, MAX_NAME_BYTES, name, "node_id"),
        ]
        # The fields of version 1 come first and keep their layout, so that a peer of
        # any version can decode enough of our HELLO to say which version we speak.
        if self.protocol_version >= _HELLO_INCARNATION_VERSION:
            parts.append(_pack_str(self.incarnation, MAX_INCARNATION_BYTES, name, "incarnation"))
        elif self.incarnation:
            raise ValueError(f"HELLO version {self.protocol_version} has no incarnation field")
        return parts

    @classmethod
    def decode_payload(cls, r: _Reader) -> Hello:
        version, epoch = r.fixed(_HELLO, "version and epoch")
        cluster_id = r.string(MAX_NAME_BYTES, "cluster_id")
        node_id = r.string(MAX_NAME_BYTES, "node_id")
        if version < _HELLO_INCARNATION_VERSION:
            # An older peer ends here; the version check after decoding names the problem.
            return cls(version, cluster_id, node_id, epoch)
        incarnation = r.string(MAX_INCARNATION_BYTES, "incarnation")
        if incarnation and (len(incarnation) != MAX_INCARNATION_BYTES or incarnation.strip(_HEX_DIGITS)):
            raise ProtocolError(f"HELLO: incarnation {incarnation!r} is not {MAX_INCARNATION_BYTES} hex digits")
        return cls(version, cluster_id, node_id, epoch, incarnation)


@dataclass(frozen=True, slots=True)
class Prepare:
    """A new leader of ``epoch`` asks for a promise (docs/protocol.md, "Takeover")."""

    TYPE: ClassVar[FrameType] = FrameType.PREPARE
    epoch: int
    leader_id: str

    def encode_payload(self) -> list[Bytes]:
        return [
            _pack(_U64, "PREPARE", self.epoch),
            _pack_str(self.leader_id, MAX_NAME_BYTES, "PREPARE", "leader_id"),
        ]

    @classmethod
    def decode_payload(cls, r: _Reader) -> Prepare:
        (epoch,) = r.fixed(_U64, "epoch")
        return cls(epoch, r.string(MAX_NAME_BYTES, "leader_id"))


@dataclass(frozen=True, slots=True)
class Promise:
    """The answer to PREPARE. ``epoch_history`` is (epoch, first_index) pairs."""

    TYPE: ClassVar[FrameType] = FrameType.PROMISE
    epoch: int
    ok: bool
    promised_epoch: int
    last_epoch: int
    last_index: int
    commit_index: int
    epoch_history: tuple[tuple[int, int], ...]

    def encode_payload(self) -> list[Bytes]:
        name = "PROMISE"
        parts: list[Bytes] = [
            _pack(
                _PROMISE,
                name,
                self.epoch,
                self.ok,
                self.promised_epoch,
                self.last_epoch,
                self.last_index,
                self.commit_index,
                len(self.epoch_history),
            )
        ]
        parts.extend(_pack(_HISTORY_PAIR, name, epoch, first) for epoch, first in self.epoch_history)
        return parts

    @classmethod
    def decode_payload(cls, r: _Reader) -> Promise:
        epoch, ok, promised, last_epoch, last_index, commit, count = r.fixed(_PROMISE, "fixed fields")
        is_ok = r.boolean(ok, "ok")
        # Check the whole table fits before building it: a count of 2^32-1 costs nothing.
        r.need(count * _HISTORY_PAIR.size, f"epoch_history of {count} pairs")
        pairs = [r.fixed(_HISTORY_PAIR, "epoch_history pair") for _ in range(count)]
        history = tuple((pair[0], pair[1]) for pair in pairs)
        return cls(epoch, is_ok, promised, last_epoch, last_index, commit, history)


@dataclass(frozen=True, slots=True)
class Append:
    """AppendEntries: ``entries`` are WAL record bytes, passed through untouched."""

    TYPE: ClassVar[FrameType] = FrameType.APPEND
    epoch: int
    prev_index: int
    prev_epoch: int
    leader_commit: int
    entries: Bytes

    def encode_payload(self) -> list[Bytes]:
        head = _pack(_APPEND, "APPEND", self.epoch, self.prev_index, self.prev_epoch, self.leader_commit)
        return [head, self.entries]

    @classmethod
    def decode_payload(cls, r: _Reader) -> Append:
        epoch, prev_index, prev_epoch, leader_commit = r.fixed(_APPEND, "fixed fields")
        return cls(epoch, prev_index, prev_epoch, leader_commit, r.rest())


@dataclass(frozen=True, slots=True)
class AppendAck:
    """A follower's answer: its match index, or a conflict hint for the leader to jump to."""

    TYPE: ClassVar[FrameType] = FrameType.APPEND_ACK
    epoch: int
    ok: bool
    match_index: int
    last_index: int
    conflict_index: int
    conflict_epoch: int

    def encode_payload(self) -> list[Bytes]:
        return [
            _pack(
                _APPEND_ACK,
                "APPEND_ACK",
                self.epoch,
                self.ok,
                self.match_index,
                self.last_index,
                self.conflict_index,
                self.conflict_epoch,
            )
        ]

    @classmethod
    def decode_payload(cls, r: _Reader) -> AppendAck:
        epoch, ok, match, last, conflict_index, conflict_epoch = r.fixed(_APPEND_ACK, "fields")
        return cls(epoch, r.boolean(ok, "ok"), match, last, conflict_index, conflict_epoch)


@dataclass(frozen=True, slots=True)
class Fetch:
    """Catch-up: ask for records from ``from_index``, at most ``max_bytes`` of them."""

    TYPE: ClassVar[FrameType] = FrameType.FETCH
    request_id: int
    epoch: int
    from_index: int
    max_bytes: int

    def encode_payload(self) -> list[Bytes]:
        return [_pack(_FETCH, "FETCH", self.request_id, self.epoch, self.from_index, self.max_bytes)]

    @classmethod
    def decode_payload(cls, r: _Reader) -> Fetch:
        request_id, epoch, from_index, max_bytes = r.fixed(_FETCH, "fields")
        return cls(request_id, epoch, from_index, max_bytes)


@dataclass(frozen=True, slots=True)
class FetchResult:
    TYPE: ClassVar[FrameType] = FrameType.FETCH_RESULT
    request_id: int
    epoch: int
    ok: bool
    last_index: int
    entries: Bytes

    def encode_payload(self) -> list[Bytes]:
        head = _pack(_FETCH_RESULT, "FETCH_RESULT", self.request_id, self.epoch, self.ok, self.last_index)
        return [head, self.entries]

    @classmethod
    def decode_payload(cls, r: _Reader) -> FetchResult:
        request_id, epoch, ok, last_index = r.fixed(_FETCH_RESULT, "fixed fields")
        return cls(request_id, epoch, r.boolean(ok, "ok"), last_index, r.rest())


@dataclass(frozen=True, slots=True)
class Forward:
    """A client write (the request's JSON body) relayed from a follower to the leader."""

    TYPE: ClassVar[FrameType] = FrameType.FORWARD
    request_id: int
    body: Bytes

    def encode_payload(self) -> list[Bytes]:
        return [_pack(_U64, "FORWARD", self.request_id), self.body]

    @classmethod
    def decode_payload(cls, r: _Reader) -> Forward:
        (request_id,) = r.fixed(_U64, "request_id")
        return cls(request_id, r.rest())


@dataclass(frozen=True, slots=True)
class ForwardResult:
    """The leader's answer to FORWARD: an HTTP status and the JSON body to relay."""

    TYPE: ClassVar[FrameType] = FrameType.FORWARD_RESULT
    request_id: int
    status: int
    body: Bytes

    def encode_payload(self) -> list[Bytes]:
        if not 100 <= self.status <= 599:
            raise ValueError(f"FORWARD_RESULT.status {self.status} is not an HTTP status")
        return [_pack(_FORWARD_RESULT, "FORWARD_RESULT", self.request_id, self.status), self.body]

    @classmethod
    def decode_payload(cls, r: _Reader) -> ForwardResult:
        request_id, status = r.fixed(_FORWARD_RESULT, "fixed fields")
        if not 100 <= status <= 599:
            raise ProtocolError(f"FORWARD_RESULT: status {status} is not an HTTP status")
        return cls(request_id, status, r.rest())


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Leader liveness and commit index when there is nothing to append.
    ``sent_at_ms`` is the leader's monotonic clock, echoed for round-trip times only."""

    TYPE: ClassVar[FrameType] = FrameType.HEARTBEAT
    epoch: int
    leader_commit: int
    sent_at_ms: int

    def encode_payload(self) -> list[Bytes]:
        return [_pack(_HEARTBEAT, "HEARTBEAT", self.epoch, self.leader_commit, self.sent_at_ms)]

    @classmethod
    def decode_payload(cls, r: _Reader) -> Heartbeat:
        epoch, leader_commit, sent_at_ms = r.fixed(_HEARTBEAT, "fields")
        return cls(epoch, leader_commit, sent_at_ms)


@dataclass(frozen=True, slots=True)
class Goodbye:
    """A polite close: the sender says why, then closes its side."""

    TYPE: ClassVar[FrameType] = FrameType.GOODBYE
    reason: str

    def encode_payload(self) -> list[Bytes]:
        return [_pack_str(self.reason, MAX_REASON_BYTES, "GOODBYE", "reason")]

    @classmethod
    def decode_payload(cls, r: _Reader) -> Goodbye:
        return cls(r.string(MAX_REASON_BYTES, "reason"))


Message: TypeAlias = (
    Hello | Prepare | Promise | Append | AppendAck | Fetch | FetchResult | Forward | ForwardResult | Heartbeat | Goodbye
)

_DECODERS: dict[int, Callable[[_Reader], Message]] = {
    cls.TYPE: cls.decode_payload
    for cls in (
        Hello,
        Prepare,
        Promise,
        Append,
        AppendAck,
        Fetch,
        FetchResult,
        Forward,
        ForwardResult,
        Heartbeat,
        Goodbye,
    )
}
assert set(_DECODERS) == set(FrameType), "every FrameType needs a message class"
_NAMES = {int(t): t.name for t in FrameType}  # FrameType(x).name costs two Python calls


def frame_type_name(frame_type: int) -> str:
    name = _NAMES.get(frame_type)
    return name if name is not None else f"unknown type {frame_type:#04x}"


def check_known(frame_type: int, flags: int) -> None:
    """Refuse an unknown type or flags from the header alone, before the payload arrives."""
    if frame_type not in _DECODERS:
        raise ProtocolError(f"unknown frame type {frame_type:#04x}")
    if flags:
        raise ProtocolError(f"{FrameType(frame_type).name}: flags {flags:#04x} are not defined in version 1")


def decode_message(frame: Frame) -> Message:
    """The message in one frame (whose CRC the frame decoder already checked)."""
    check_known(frame.type, frame.flags)
    reader = _Reader(_NAMES[frame.type], frame.payload)
    message = _DECODERS[frame.type](reader)
    reader.done()
    return message


def encode_parts(message: Message, out: list[Bytes]) -> None:
    """Append the frame of ``message`` to ``out`` as parts (header first), so a caller can
    join many frames with one copy of every payload byte."""
    payload = message.encode_payload()
    out.append(frame_header(message.TYPE, 0, payload))
    out.extend(payload)


def encode_message(message: Message) -> bytes:
    """One whole frame. Stateless: a transport can use it for the GOODBYE it sends after
    its connection object died of a ProtocolError."""
    parts: list[Bytes] = []
    encode_parts(message, parts)
    return b"".join(parts)
