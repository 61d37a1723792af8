"""Segment files: naming, the 32-byte segment header, creation and opening.

A segment is a pre-allocated, zero-filled file of fixed size. Header (little-endian)::

    offset size field
    0      8    magic b"WALSTSEG"
    8      4    format version (u32, 1)
    12     4    crc32c of header bytes [0,12) then [16,32)
    16     8    first_index (u64): index of the first record the segment holds
    24     8    reserved (0)

Records follow from offset 32 (see ``walstore.wal.record``); the data ends where a zeroed
8-aligned record header begins. The file is named ``f"{first_index:020d}.wal"`` so that
``ls`` lists segments in log order.

Creation is atomic: the file is built as ``<name>.tmp`` (allocate, write the header,
fdatasync), renamed into place and the directory fsynced. A crash mid-creation therefore
leaves a ``.tmp`` file that recovery deletes, never a segment with a missing header.
"""

from __future__ import annotations

import contextlib
import re
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from walstore._native import crc32c
from walstore.errors import CorruptionError, StorageError
from walstore.wal.fs import FileSystem, WalFile

SEGMENT_MAGIC = b"WALSTSEG"
SEGMENT_VERSION = 1
SEGMENT_HEADER_BYTES = 32
SEGMENT_SUFFIX = ".wal"
TMP_SUFFIX = ".tmp"
_HEADER = struct.Struct("<8sIIQQ")
_NAME = re.compile(r"^(\d{20})\.wal$")


def segment_name(first_index: int) -> str:
    return f"{first_index:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """first_index from a segment file name, None for any other file."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def encode_segment_header(first_index: int) -> bytes:
    raw = bytearray(_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, first_index, 0))
    struct.pack_into("<I", raw, 12, crc32c(raw[16:], crc32c(raw[:12])))
    return bytes(raw)


def decode_segment_header(buf: bytes | memoryview, path: str) -> int:
    """Verify a segment header; return its first_index or raise CorruptionError."""
    if len(buf) < SEGMENT_HEADER_BYTES:
        raise CorruptionError(path, 0, f"segment file of {len(buf)} bytes has no complete header")
    magic, version, crc, first_index, reserved = _HEADER.unpack_from(buf, 0)
    if magic != SEGMENT_MAGIC:
        raise CorruptionError(path, 0, f"bad segment magic {bytes(magic)!r}")
    mv = memoryview(buf)
    actual = crc32c(mv[16:SEGMENT_HEADER_BYTES], crc32c(mv[:12]))
    if actual != crc:
        raise CorruptionError(path, 0, f"segment header crc mismatch: stored {crc:#010x}, computed {actual:#010x}")
    if version != SEGMENT_VERSION:
        raise CorruptionError(path, 8, f"unknown segment format version {version}")
    if first_index < 1 or reserved:
        raise CorruptionError(path, 16, "segment header fields out of range")
    return int(first_index)


def create_segment(fs: FileSystem, directory: Path, first_index: int, size_bytes: int) -> WalFile:
    """Create, pre-allocate and durably install a new segment; return it open for writing."""
    path = directory / segment_name(first_index)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    if fs.exists(tmp):
        fs.unlink(tmp)
    f = fs.create(tmp)
    try:
        f.fallocate(size_bytes)
        f.pwritev([encode_segment_header(first_index)], 0, sync=True)
        fs.rename(tmp, path)
        fs.fsync_dir(directory)
    except BaseException:
        f.close()
        # Best effort: a leftover .tmp is harmless (recovery deletes it), the error is not.
        with contextlib.suppress(StorageError):
            if fs.exists(tmp):
                fs.unlink(tmp)
        raise
    f.close()
    # Reopen under the final name so the handle's path (used in every error) is right.
    return fs.open(path, writable=True)


def open_segment(fs: FileSystem, path: Path, *, writable: bool) -> tuple[WalFile, int]:
    """Open an existing segment and check its header: (file, first_index)."""
    f = fs.open(path, writable=writable)
    try:
        first_index = decode_segment_header(f.pread(0, SEGMENT_HEADER_BYTES), str(path))
        named = parse_segment_name(path.name)
        if named is not None and named != first_index:
            raise CorruptionError(str(path), 16, f"header says first index {first_index}, name says {named}")
    except BaseException:
        f.close()
        raise
    return f, first_index


@dataclass(eq=False)
class SegmentState:
    """One open segment as the log holds it in memory.

    ``offsets`` has one u64 per record (8 bytes each, no Python object per record): the
    start of record ``first_index + i`` is ``offsets[i]``.
    """

    path: Path
    file: WalFile
    first_index: int
    size: int
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    end: int = SEGMENT_HEADER_BYTES  # just past the last record: where the next one goes
    last_epoch: int = 0  # epoch of the last record (of an earlier segment if none here)
    dirty: bool = False  # written since the last fdatasync
    # A failed write may have left bytes in [end, junk_end); the next write covers them
    # with zeros so no stale record can ever follow the end of the data.
    junk_end: int = 0

    @property
    def next_index(self) -> int:
        return self.first_index + len(self.offsets)

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.offsets) - 1

    def offset_of(self, index: int) -> int:
        return self.offsets[index - self.first_index]

    def record_end(self, index: int) -> int:
        i = index - self.first_index + 1
        return self.offsets[i] if i < len(self.offsets) else self.end


_ZEROS = bytes(1 << 20)
_MAX_ZERO_WRITE = 256 << 20  # keeps one pwritev well under IOV_MAX buffers


def write_zeros(f: WalFile, start: int, stop: int, *, sync: bool) -> None:
    """Overwrite [start, stop) with zeros (one pwritev per 256 MiB)."""
    zeros = memoryview(_ZEROS)
    while start < stop:
        n = min(stop - start, _MAX_ZERO_WRITE)
        bufs = [zeros[: min(len(zeros), n - done)] for done in range(0, n, len(zeros))]
        f.pwritev(bufs, start, sync=sync and start + n >= stop)
        start += n
