"""WAL records: the on-disk format and a pure-Python decoder for single records (sans-IO).

Format (all integers little-endian; every record starts 8-aligned)::

    offset size field
    0      4    body_len  u32, <= MAX_RECORD_BODY_BYTES (16 MiB), checked before any use
    4      4    crc       CRC32C of header bytes [0,4) then [8, 32+body_len): the header
                          without its own crc field, then the body. Padding is not covered
                          but must be zero.
    8      1    kind      1 EVENT, 2 EPOCH_START, 3 NOOP, 4 TRACKING. 0 is invalid, so a
                          zeroed header is never a record: a zeroed header is where the
                          data ends.
    9      1    flags     bit 0 BATCH_END: the last record of an atomic batch; others 0
    10     2    reserved  0
    12     4    reserved  0
    16     8    epoch     u64 >= 1, non-decreasing along the log
    24     8    index     u64 >= 1, consecutive along the log
    32     n    body
    32+n   pad  zeros to the next multiple of 8: record_size(n) = 32 + ((n + 7) & ~7)

The 8-byte alignment keeps every length word inside one disk sector, so a torn write can
cut or zero a record but never leave half a length pointing into the next one.

Batches are encoded by the native ``encode_batch`` and scanned by the native scanner; this
module decodes one record at a known offset (reads, tools, tests) and keeps a reference
encoder in pure Python that tests hold the C encoder to.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from walstore._native import (
    FLAG_BATCH_END,
    KIND_EPOCH_START,
    KIND_EVENT,
    KIND_NOOP,
    KIND_TRACKING,
    MAX_RECORD_BODY_BYTES,
    RECORD_HEADER_BYTES,
    ScanStop,
    crc32c,
    record_size,
    scan,
)
from walstore.errors import CorruptionError, InvalidRecords, LogStateError

__all__ = [
    "FLAG_BATCH_END",
    "KIND_EPOCH_START",
    "KIND_EVENT",
    "KIND_NAMES",
    "KIND_NOOP",
    "KIND_TRACKING",
    "MAX_RECORD_BODY_BYTES",
    "RECORD_HEADER_BYTES",
    "CheckedRecords",
    "Record",
    "RecordHeader",
    "check_records",
    "decode_record",
    "encode_record",
    "peek_header",
    "record_size",
]

KIND_NAMES = {KIND_EVENT: "EVENT", KIND_EPOCH_START: "EPOCH_START", KIND_NOOP: "NOOP", KIND_TRACKING: "TRACKING"}

# body_len, crc, kind, flags, reserved16, reserved32, epoch, index
_HEADER = struct.Struct("<IIBBHIQQ")
assert _HEADER.size == RECORD_HEADER_BYTES


@dataclass(frozen=True, slots=True)
class RecordHeader:
    body_len: int
    crc: int
    kind: int
    flags: int
    epoch: int
    index: int

    @property
    def size(self) -> int:
        return record_size(self.body_len)


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded record. ``offset`` is where it starts in its segment (or buffer)."""

    kind: int
    flags: int
    epoch: int
    index: int
    body: bytes
    offset: int
    size: int

    @property
    def batch_end(self) -> bool:
        return bool(self.flags & FLAG_BATCH_END)


def peek_header(buf: bytes | bytearray | memoryview, offset: int) -> RecordHeader:
    """The header at ``offset`` without checking the CRC: for records already validated
    (by the scanner at open or at append) whose epoch or flags a caller needs."""
    body_len, crc, kind, flags, _, _, epoch, index = _HEADER.unpack_from(buf, offset)
    return RecordHeader(body_len, crc, kind, flags, epoch, index)


@dataclass(frozen=True, slots=True)
class CheckedRecords:
    """Encoded records that passed the one validation at the trust boundary
    (``check_records``): CRC, lengths, kinds, flags, padding, consecutive indexes
    ``first_index..last_index`` and epochs from ``first_epoch`` up to ``last_epoch`` that
    never decrease. ``offsets`` holds where each record starts in ``data``.

    The writer and the log take these without scanning the bytes again: a follower's copy
    of the leader's records is checked once, when it arrives, not again on submit and on
    append. Only ``check_records`` and ``suffix`` build one."""

    data: bytes
    offsets: array[int]
    first_index: int
    last_index: int
    first_epoch: int
    last_epoch: int
    batch_end_index: int  # the last record that ends a batch; first_index - 1 if none

    def suffix(self, k: int) -> CheckedRecords:
        """The records from the k-th (0-based) on: what a follower writes when it already
        holds the first k."""
        if k == 0:
            return self
        if not 0 < k < len(self.offsets):
            raise LogStateError(f"suffix({k}) of {len(self.offsets)} records")
        base = self.offsets[k]
        offsets = array("Q", [o - base for o in self.offsets[k:]])
        return CheckedRecords(
            self.data[base:],
            offsets,
            self.first_index + k,
            self.last_index,
            peek_header(self.data, base).epoch,
            self.last_epoch,
            self.batch_end_index,
        )

    def records(self, first: int, last: int) -> list[Record]:
        """Records ``first..last`` (within this batch) decoded from memory: the CRC was
        checked when the batch was, so only the headers are read."""
        if not self.first_index <= first <= last <= self.last_index:
            raise LogStateError(f"records({first}, {last}) of a batch holding {self.first_index}..{self.last_index}")
        data, unpack = self.data, _HEADER.unpack_from
        out: list[Record] = []
        for offset in self.offsets[first - self.first_index : last - self.first_index + 1]:
            body_len, _, kind, flags, _, _, epoch, index = unpack(data, offset)
            body = data[offset + RECORD_HEADER_BYTES : offset + RECORD_HEADER_BYTES + body_len]
            out.append(Record(kind, flags, epoch, index, body, offset, record_size(body_len)))
        return out


def check_records(
    data: bytes, first_index: int, *, min_epoch: int, max_body: int = MAX_RECORD_BODY_BYTES
) -> CheckedRecords:
    """Validate ``data`` as whole records ``first_index``.. of epochs >= ``min_epoch`` and
    nothing else; InvalidRecords (offset, reason) for anything less. One native scan."""
    res = scan(data, 0, first_index, max_body, min_epoch=min_epoch)
    if res.stop is not ScanStop.END_ZERO or res.end_offset != len(data) or res.count == 0:
        if res.count == 0 and res.stop is ScanStop.END_ZERO:
            reason = "no records" if not data else "zero bytes where a record was expected"
        elif res.stop is ScanStop.END_ZERO:
            reason = "zero bytes after the last record"
        else:
            reason = res.reason
        raise InvalidRecords(res.end_offset, f"not record {res.next_index} (epoch >= {res.last_epoch}): {reason}")
    return CheckedRecords(
        data,
        res.offsets,
        first_index,
        res.next_index - 1,
        peek_header(data, 0).epoch,
        res.last_epoch,
        res.batch_end_index,
    )


def decode_record(
    buf: bytes | bytearray | memoryview,
    offset: int = 0,
    *,
    max_body: int = MAX_RECORD_BODY_BYTES,
    path: str = "<buffer>",
) -> Record:
    """Decode and verify the record at ``offset``; CorruptionError(path, offset, why) if
    it is not a whole valid record."""
    mv = memoryview(buf).cast("B")
    if offset % 8:
        raise CorruptionError(path, offset, "record offset is not 8-aligned")
    if offset < 0 or len(mv) - offset < RECORD_HEADER_BYTES:
        raise CorruptionError(path, offset, "truncated record header")
    body_len, crc, kind, flags, res16, res32, epoch, index = _HEADER.unpack_from(mv, offset)
    if body_len > max_body:
        raise CorruptionError(path, offset, f"body length {body_len} over the limit {max_body}")
    size = record_size(body_len)
    end = offset + RECORD_HEADER_BYTES + body_len
    if offset + size > len(mv):
        raise CorruptionError(path, offset, f"record of {size} bytes runs past the end")
    actual = crc32c(mv[offset + 8 : end], crc32c(mv[offset : offset + 4]))
    if actual != crc:
        if kind == 0 and crc == 0 and body_len == 0:
            raise CorruptionError(path, offset, "zeroed record header")
        raise CorruptionError(path, offset, f"crc mismatch: stored {crc:#010x}, computed {actual:#010x}")
    if kind not in KIND_NAMES:
        raise CorruptionError(path, offset, f"unknown record kind {kind}")
    if flags & ~FLAG_BATCH_END or res16 or res32:
        raise CorruptionError(path, offset, "unknown flag bits or non-zero reserved bytes")
    if epoch == 0 or index == 0:
        raise CorruptionError(path, offset, "epoch and index must be >= 1")
    if any(mv[end : offset + size]):
        raise CorruptionError(path, offset, "non-zero padding")
    return Record(kind, flags, epoch, index, bytes(mv[offset + RECORD_HEADER_BYTES : end]), offset, size)


def encode_record(kind: int, flags: int, epoch: int, index: int, body: bytes) -> bytes:
    """Reference encoder of one record (the log encodes batches natively)."""
    if kind not in KIND_NAMES:
        raise LogStateError(f"unknown record kind {kind}")
    if flags & ~FLAG_BATCH_END:
        raise LogStateError(f"unknown record flags {flags:#x}")
    if epoch < 1 or index < 1 or epoch >= 1 << 64 or index >= 1 << 64:
        raise LogStateError("epoch and index must be in [1, 2**64)")
    if len(body) > MAX_RECORD_BODY_BYTES:
        raise LogStateError(f"record body of {len(body)} bytes over the limit {MAX_RECORD_BODY_BYTES}")
    header = bytearray(_HEADER.pack(len(body), 0, kind, flags, 0, 0, epoch, index))
    crc = crc32c(body, crc32c(header[8:], crc32c(header[:4])))
    struct.pack_into("<I", header, 4, crc)
    return bytes(header) + body + bytes(record_size(len(body)) - RECORD_HEADER_BYTES - len(body))
