"""Frame codec of the peer protocol: cut a TCP byte stream into checked frames.

A peer connection is a sequence of frames. Every frame is a fixed 16-byte header and a
payload; all integers are little-endian (like the WAL record and the event body, so the
entries an APPEND carries and the header around them read the same way in a hex dump):

    offset size field
    0      2    magic, the ASCII bytes "WS" (0x57 0x53)
    2      1    frame format version (FRAME_VERSION = 1)
    3      1    type: which message the payload holds (the table in messages.py)
    4      1    flags: message-specific bits; version 1 defines none, so they must be 0
    5      3    reserved, must be zero
    8      4    payload length in bytes, at most MAX_FRAME_BYTES
    12     4    CRC32C (Castagnoli) of header bytes 0..11 followed by the payload,
                computed as one stream (crc32c(payload, crc32c(header[0:12])))
    16     ...  payload

The CRC covers the header too, so a flipped type or length bit is caught, not only a
damaged payload. TCP's own 16-bit checksum misses real corruption on long-lived links
(bad NICs, middleboxes), and the entries we pass on go straight into followers' logs.

The length is checked the moment the 16 header bytes are in, before one byte of the
payload is buffered: a peer (or a port scanner) that claims 4 GiB gets a ProtocolError,
not an allocation. A decoder never holds more than one incomplete frame.

Anything wrong (magic, version, reserved bits, length, CRC, a type the caller does not
accept) raises ``ProtocolError`` with a reason; there is no resynchronisation, because
a stream that lost its framing cannot be trusted again: the connection closes.

Pure: no sockets, no trio.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from walstore._native import crc32c
from walstore.errors import ProtocolError

MAGIC = b"WS"
FRAME_VERSION = 1
_HEADER = struct.Struct("<2sBBB3sII")
FRAME_HEADER_BYTES = _HEADER.size  # 16
_CRC_OFFSET = 12  # the CRC covers header[0:12], then the payload
_RESERVED = b"\x00\x00\x00"

# Largest payload one frame may carry. Why 32 MiB: an APPEND must hold at least one whole
# WAL record (up to 16 MiB of body, MAX_RECORD_BODY_BYTES) and one whole atomic batch (a
# batch is never split across frames; the HTTP body limit, 1 MiB by default, bounds it),
# with room for several batches per APPEND; yet a node with a handful of peers bounds its
# receive buffers to tens of MiB. etcd's rafthttp allows 512 MiB per message because it
# ships snapshots in one message; we never do: catch-up is paged by FETCH.max_bytes.
MAX_FRAME_BYTES = 32 * 1024 * 1024

# A header hook: (type, flags, payload_length) -> None, raising ProtocolError to refuse
# a frame before its payload is buffered.
HeaderCheck = Callable[[int, int, int], None]


class Frame(NamedTuple):
    type: int
    flags: int
    payload: bytes


def frame_header(frame_type: int, flags: int, payload_parts: list[bytes | memoryview]) -> bytes:
    """The 16 header bytes for a payload given as parts (the parts are not joined here,
    so a caller can hand header and parts to one ``b"".join`` and copy the payload once)."""
    length = 0
    for part in payload_parts:
        length += len(part)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame payload of {length} bytes is over MAX_FRAME_BYTES ({MAX_FRAME_BYTES})")
    if not 0 <= frame_type <= 0xFF or not 0 <= flags <= 0xFF:
        raise ValueError(f"frame type {frame_type} or flags {flags} do not fit in a byte")
    head = _HEADER.pack(MAGIC, FRAME_VERSION, frame_type, flags, _RESERVED, length, 0)
    crc = crc32c(head[:_CRC_OFFSET])
    for part in payload_parts:
        crc = crc32c(part, crc)
    return head[:_CRC_OFFSET] + crc.to_bytes(4, "little")


def encode_frame(frame_type: int, flags: int, payload: bytes | memoryview) -> bytes:
    """One whole frame: header and payload."""
    return frame_header(frame_type, flags, [payload]) + payload


class FrameDecoder:
    """Accepts bytes in any split (``feed``) and hands out whole, checked frames
    (``next_frame``). After the first ProtocolError every call raises it again."""

    def __init__(self, max_payload_bytes: int = MAX_FRAME_BYTES, check_header: HeaderCheck | None = None):
        if not 0 <= max_payload_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_payload_bytes must be within 0..{MAX_FRAME_BYTES}")
        # Mutable on purpose: a connection lowers it until the handshake is done, so an
        # unauthenticated peer can make us buffer a few KiB, not 32 MiB.
        self.max_payload_bytes = max_payload_bytes
        self._check_header = check_header
        # Unconsumed input is _buf[_pos:]; consumed bytes are dropped lazily, so many
        # small frames in one read cost one compaction, not one memmove each.
        self._buf = bytearray()
        self._pos = 0
        self._error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet handed out as a frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._raise_if_failed()
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None if more bytes are needed."""
        self._raise_if_failed()
        try:
            return self._next_frame()
        except ProtocolError as exc:
            self._error = exc
            # Nothing here will ever be read again; let it go now.
            self._buf = bytearray()
            self._pos = 0
            raise

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise ProtocolError(f"frame stream already failed: {self._error.reason}")

    def _next_frame(self) -> Frame | None:
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available < FRAME_HEADER_BYTES:
            # Garbage (or an HTTP client on the peer port) fails on its first bytes
            # instead of waiting for a whole header that may never come.
            self._check_lead(bytes(buf[pos : pos + min(available, len(MAGIC) + 1)]))
            return None
        magic, version, frame_type, flags, reserved, length, crc = _HEADER.unpack_from(buf, pos)
        if magic != MAGIC or version != FRAME_VERSION:
            self._check_lead(bytes(buf[pos : pos + len(MAGIC) + 1]))
        if reserved != _RESERVED:
            raise ProtocolError(f"reserved header bytes are not zero: {reserved.hex()}")
        if length > self.max_payload_bytes:
            raise ProtocolError(
                f"frame length {length} is over the limit of {self.max_payload_bytes} bytes (type {frame_type})"
            )
        if self._check_header is not None:
            self._check_header(frame_type, flags, length)
        end = pos + FRAME_HEADER_BYTES + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            actual = crc32c(view[pos + FRAME_HEADER_BYTES : end], crc32c(view[pos : pos + _CRC_OFFSET]))
            if actual != crc:
                raise ProtocolError(
                    f"frame CRC mismatch (type {frame_type}, length {length}): "
                    f"header says {crc:#010x}, bytes give {actual:#010x}"
                )
            payload = bytes(view[pos + FRAME_HEADER_BYTES : end])
        self._consume(end)
        return Frame(frame_type, flags, payload)

    @staticmethod
    def _check_lead(lead: bytes) -> None:
        """Magic and version, from as many of their three bytes as have arrived."""
        magic = lead[: len(MAGIC)]
        if not MAGIC.startswith(magic):
            raise ProtocolError(f"bad frame magic {magic!r} (expected {MAGIC!r})")
        if len(lead) > len(MAGIC) and lead[len(MAGIC)] != FRAME_VERSION:
            raise ProtocolError(f"unsupported frame version {lead[len(MAGIC)]} (we speak {FRAME_VERSION})")

    def _consume(self, end: int) -> None:
        if end == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif end > 65536 and end * 2 > len(self._buf):
            del self._buf[:end]
            self._pos = 0
        else:
            self._pos = end
