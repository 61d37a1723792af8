"""The only importer of the compiled C extension ``walstore._walstore_native``.

Typed wrappers over native/walstore_native.h: buffers go in with ``ffi.from_buffer`` (no
copies), a negative return code comes back as an exception from ``walstore.errors``
(``NativeError``; ``FsyncError`` when a sync fails; ``DiskFullError`` for ENOSPC). cffi
releases the GIL around every C call, so the writer thread's I/O never blocks the loop.

The record-format constants live here because the C encodes and scans that format;
``walstore.wal.record`` re-exports them. The format itself is documented in
native/walstore_native.h.

On import, a repository checkout (native/ next to the package) is checked against the
hash compiled into the module, so editing the C without ``make build-native`` fails loudly
instead of running old code.
"""

from __future__ import annotations

import enum
import errno as _errno
import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from walstore.errors import DiskFullError, FsyncError, NativeError

_REBUILD_HINT = "run `make build-native`"
_HASHED_SUFFIXES = (".c", ".h", ".cdef")

try:
    import walstore._walstore_native as _compiled
except ImportError as exc:  # a fresh checkout, or a build for another Python
    raise ImportError(
        f"walstore's C extension (walstore._walstore_native) is not built or cannot load ({exc}); {_REBUILD_HINT}"
    ) from exc

_ffi: Any = _compiled.ffi
_lib: Any = _compiled.lib

# ---- record format constants (see native/walstore_native.h) ----
RECORD_HEADER_BYTES: int = _lib.WS_RECORD_HEADER_BYTES
MAX_RECORD_BODY_BYTES: int = _lib.WS_MAX_RECORD_BODY_BYTES
KIND_EVENT: int = _lib.WS_KIND_EVENT
KIND_EPOCH_START: int = _lib.WS_KIND_EPOCH_START
KIND_NOOP: int = _lib.WS_KIND_NOOP
KIND_TRACKING: int = _lib.WS_KIND_TRACKING
FLAG_BATCH_END: int = _lib.WS_FLAG_BATCH_END


class ScanStop(enum.IntEnum):
    """Why ``scan`` stopped; values are the C ``WS_SCAN_*`` codes."""

    END_ZERO = 0  # the rest of the buffer is zero: the clean end of the data
    BAD_LENGTH = 1
    BAD_CRC = 2
    BAD_KIND = 3
    BAD_INDEX = 4
    BAD_EPOCH = 5
    BAD_PADDING = 6
    TRUNCATED = 7
    FULL = 8  # offsets_cap reached; call again from end_offset
    BAD_RESERVED = 9


@dataclass(frozen=True, slots=True)
class ScanResult:
    offsets: array[int]  # 'Q': offset of every valid record found, in order
    count: int
    end_offset: int  # just past the last valid record (start if none)
    next_index: int
    last_epoch: int  # min_epoch if no record was found
    batch_end_offset: int  # just past the last valid BATCH_END record; 0 if none
    batch_end_index: int  # its index; expected_index - 1 if none
    stop: ScanStop

    @property
    def reason(self) -> str:
        return self.stop.name


def _source_hash(native_dir: Path) -> str:
    """Same bytes, same order as ``source_hash`` in native/build_native.py."""
    digest = hashlib.sha256()
    names = sorted(
        p.name
        for p in native_dir.iterdir()
        if not p.name.startswith(".") and (p.name.endswith(_HASHED_SUFFIXES) or p.name == "build_native.py")
    )
    for name in names:
        data = (native_dir / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _checkout_native_dir() -> Path | None:
    """native/ of the repository this package sits in, or None for an installed wheel."""
    candidate = Path(__file__).resolve().parent.parent / "native"
    return candidate if (candidate / "build_native.py").is_file() else None


def check_source_hash(compiled_hash: str, native_dir: Path | None) -> None:
    """Raise ImportError if the C sources in native_dir are not what was compiled."""
    if native_dir is None:
        return
    current = _source_hash(native_dir)
    if current != compiled_hash:
        raise ImportError(
            f"walstore's C extension is stale: {module_path()} was built from sources with "
            f"hash {compiled_hash[:12]}, but {native_dir} now hashes to {current[:12]}; "
            f"{_REBUILD_HINT}"
        )


def compiled_source_hash() -> str:
    return str(_ffi.string(_lib.ws_source_hash()).decode("ascii"))


def module_path() -> str:
    """Path of the shared object that was loaded."""
    return str(_compiled.__file__)


check_source_hash(compiled_source_hash(), _checkout_native_dir())


def _raise_errno(rc: int, what: str) -> NoReturn:
    raise NativeError(-rc, what)


# ---- CRC32C ----


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C of data, continuing from value (``crc32c`` package semantics)."""
    ptr = _ffi.from_buffer("uint8_t[]", data)
    return int(_lib.ws_crc32c(value, ptr, len(ptr)))


def crc32c_sw(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """The table implementation, whatever the CPU offers (for tests and comparisons)."""
    ptr = _ffi.from_buffer("uint8_t[]", data)
    return int(_lib.ws_crc32c_sw(value, ptr, len(ptr)))


def hw_crc_available() -> bool:
    return bool(_lib.ws_crc32c_hw_available())


# ---- records ----


def record_size(body_len: int) -> int:
    """Bytes a record with this body occupies, padding included."""
    return RECORD_HEADER_BYTES + ((body_len + 7) & ~7)


def encode_batch(
    bodies: Sequence[bytes],
    kinds: Sequence[int] | bytes,
    flags: Sequence[int] | bytes | None,
    epoch: int,
    first_index: int,
) -> bytes:
    """Encode bodies as consecutive records first_index, first_index+1, ... of epoch.

    flags None means no flags; a batch's atomicity comes from FLAG_BATCH_END on its last
    record, which the caller sets.
    """
    n = len(bodies)
    if len(kinds) != n or (flags is not None and len(flags) != n):
        raise NativeError(_errno.EINVAL, f"encode_batch: {n} bodies but {len(kinds)} kinds")
    try:
        kind_bytes = bytes(kinds)
        flag_bytes = bytes(flags) if flags is not None else bytes(n)
    except ValueError as exc:
        raise NativeError(_errno.EINVAL, f"encode_batch: kind or flag out of range ({exc})") from exc
    return bytes(encode_records(bodies, kind_bytes, flag_bytes, epoch, first_index))


def encode_records(
    bodies: Sequence[bytes], kinds: bytes | bytearray, flags: bytes | bytearray, epoch: int, first_index: int
) -> bytearray:
    """encode_batch's core: one byte of kind and of flags per body, the result not copied
    into bytes (a group-commit round is ~100 KB). A one-record call (~6 us) is nearly all
    fixed cost; a 256-record round took ~80 us, ~0.3 us a record (measured): encode rounds."""
    n = len(bodies)
    if len(kinds) != n or len(flags) != n:
        raise NativeError(_errno.EINVAL, f"encode_records: {n} bodies, {len(kinds)} kinds, {len(flags)} flags")
    joined = bodies[0] if n == 1 else b"".join(bodies)
    lens = array("I")
    try:
        lens.extend(map(len, bodies))
    except OverflowError:
        raise NativeError(_errno.EMSGSIZE, "encode_records: a body over 4 GiB") from None
    if n and max(lens) > MAX_RECORD_BODY_BYTES:  # before allocating anything that big
        raise NativeError(_errno.EMSGSIZE, f"encode_records: body of {max(lens)} bytes")
    joined_ptr = _ffi.from_buffer("uint8_t[]", joined)
    lens_ptr = _ffi.from_buffer("uint32_t[]", lens)
    kinds_ptr = _ffi.from_buffer("uint8_t[]", kinds)
    flags_ptr = _ffi.from_buffer("uint8_t[]", flags)
    out_len = _ffi.new("size_t *")
    what = f"encode_records(epoch={epoch}, first_index={first_index}, n={n})"
    if n == 1:
        total = record_size(lens[0])
    else:
        # A sizing call (validates everything, writes nothing): cheaper than summing the
        # padded sizes in Python once a round holds more than a few records.
        rc = _lib.ws_encode_batch(
            joined_ptr, lens_ptr, kinds_ptr, flags_ptr, n, epoch, first_index, _ffi.NULL, 0, out_len
        )
        if rc < 0 and rc != -_errno.ENOBUFS:
            _raise_errno(rc, what)
        total = int(out_len[0])
    out = bytearray(total)
    rc = _lib.ws_encode_batch(
        joined_ptr,
        lens_ptr,
        kinds_ptr,
        flags_ptr,
        n,
        epoch,
        first_index,
        _ffi.from_buffer("uint8_t[]", out, require_writable=True),
        total,
        out_len,
    )
    if rc < 0:
        _raise_errno(rc, what)
    return out


def scan(
    buf: bytes | bytearray | memoryview,
    start: int,
    expected_index: int,
    max_body: int = MAX_RECORD_BODY_BYTES,
    offsets_cap: int | None = None,
    *,
    min_epoch: int = 0,
    collect_offsets: bool = True,
) -> ScanResult:
    """Validate records from start (8-aligned) and say where and why it stopped.

    offsets_cap None leaves room for every record buf could hold; a smaller cap stops with
    FULL and the caller resumes at end_offset with next_index and min_epoch=last_epoch.
    collect_offsets=False only verifies (no offsets, never FULL).
    """
    view = memoryview(buf).cast("B")
    length = len(view)
    if start < 0 or start > length or start % 8:
        raise NativeError(_errno.EINVAL, f"scan: start {start} not an 8-aligned offset in {length} bytes")
    if collect_offsets:
        cap = (length - start) // RECORD_HEADER_BYTES if offsets_cap is None else offsets_cap
        offsets = array("Q", [0]) * cap
        offsets_ptr = _ffi.from_buffer("uint64_t[]", offsets, require_writable=True)
    else:
        cap = 0
        offsets = array("Q")
        offsets_ptr = _ffi.NULL
    res = _ffi.new("ws_scan_result *")
    rc = _lib.ws_scan(
        _ffi.from_buffer("uint8_t[]", view),
        length,
        start,
        expected_index,
        min_epoch,
        max_body,
        offsets_ptr,
        cap,
        res,
    )
    if rc < 0:
        _raise_errno(rc, f"scan(start={start}, expected_index={expected_index}, max_body={max_body})")
    count = int(res.count)
    if collect_offsets:
        _ffi.release(offsets_ptr)  # the array cannot shrink while C holds its buffer
        del offsets[count:]
    return ScanResult(
        offsets=offsets,
        count=count,
        end_offset=int(res.end_offset),
        next_index=int(res.next_index),
        last_epoch=int(res.last_epoch),
        batch_end_offset=int(res.batch_end_offset),
        batch_end_index=int(res.batch_end_index),
        stop=ScanStop(res.reason),
    )


def find_valid_record(
    buf: bytes | bytearray | memoryview, start: int, max_body: int = MAX_RECORD_BODY_BYTES
) -> int | None:
    """Offset of the first CRC-valid record at an 8-aligned offset > start, or None.

    Valid records after a damaged one mean corruption; none means a torn tail.
    """
    view = memoryview(buf).cast("B")
    found = _ffi.new("size_t *")
    rc = _lib.ws_find_valid_record(_ffi.from_buffer("uint8_t[]", view), len(view), max(start, 0), max_body, found)
    if rc < 0:
        _raise_errno(rc, f"find_valid_record(start={start}, max_body={max_body})")
    return int(found[0]) if rc == 1 else None


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    view = memoryview(buf).cast("B")
    return bool(_lib.ws_is_zero(_ffi.from_buffer("uint8_t[]", view), len(view)))


# ---- file I/O (call from a worker thread: these block on the disk) ----


def pwritev_sync(
    fd: int,
    offset: int,
    bufs: Sequence[bytes | bytearray | memoryview],
    sync: bool,
    path: str | None = None,
) -> None:
    """Write every buffer at offset in one pwritev (looping on short writes), then one
    fdatasync if sync. path only names the file in errors.

    Raises FsyncError if the sync fails (fatal: never retry, never ack), DiskFullError on
    ENOSPC/EDQUOT while writing, NativeError for any other failure.
    """
    what = path if path is not None else f"fd {fd}"
    keep = [_ffi.from_buffer("uint8_t[]", b) for b in bufs]
    size = sum(len(k) for k in keep)
    try:
        ptrs = _ffi.new("uint8_t *[]", keep) if keep else _ffi.NULL
        lens = _ffi.new("size_t[]", [len(k) for k in keep]) if keep else _ffi.NULL
        step = _ffi.new("int *")
        rc = _lib.ws_pwritev_sync(fd, offset, ptrs, lens, len(keep), 1 if sync else 0, step)
    finally:
        # Give the buffers back now, not when this frame dies: a failed write's error is
        # kept for good (the log is poisoned) and its traceback keeps this frame, so the
        # exports would outlive everything and pin the caller's memoryviews into garbage
        # cycles, which crashed the interpreter at exit (SIGSEGV while collecting them).
        for k in keep:
            _ffi.release(k)
    if rc == 0:
        return
    err = -rc
    if step[0] == _lib.WS_STEP_SYNC:
        raise FsyncError(err, what)
    if err in (_errno.ENOSPC, _errno.EDQUOT):
        raise DiskFullError(f"no space to write {size} bytes at {what}:{offset}")
    raise NativeError(err, f"pwritev {what} at offset {offset}")


def fdatasync(fd: int, path: str | None = None) -> None:
    """fdatasync, retried only on EINTR; any failure raises FsyncError."""
    rc = _lib.ws_fdatasync(fd)
    if rc < 0:
        raise FsyncError(-rc, path if path is not None else f"fd {fd}")


def fallocate(fd: int, offset: int, length: int, path: str | None = None) -> None:
    """Reserve [offset, offset+length) on disk (zero-filling past the end if the file
    system cannot preallocate), so later appends cannot fail for space."""
    rc = _lib.ws_fallocate(fd, offset, length)
    if rc == 0:
        return
    what = path if path is not None else f"fd {fd}"
    if -rc in (_errno.ENOSPC, _errno.EDQUOT):
        raise DiskFullError(f"no space to preallocate {length} bytes at {what}:{offset}")
    raise NativeError(-rc, f"fallocate {what} [{offset}, +{length})")


# ---- u64 -> u64 map ----

# Module-level bindings: the per-call attribute lookups cost as much as the lookup itself.
_map_get = _lib.ws_map_get
_map_put = _lib.ws_map_put


class U64Map:
    """A compact u64 -> u64 hash map in C: about 16-46 bytes per entry instead of a dict's
    ~100 plus two int objects, for indexes with millions of events.

    Keys and values must be in [0, 2**64); string keys are ``hash(s) & 0xFFFF_FFFF_FFFF_FFFF``
    (collisions are the caller's to resolve). Not thread-safe: cffi drops the GIL during the
    calls, so one thread (the store's) must own a map.
    """

    __slots__ = ("_map", "_out")

    def __init__(self, capacity_hint: int = 0) -> None:
        ptr = _lib.ws_map_new(capacity_hint)
        if ptr == _ffi.NULL:
            raise MemoryError(f"U64Map: cannot allocate for {capacity_hint} entries")
        self._map: Any = _ffi.gc(ptr, _lib.ws_map_free)
        self._out: Any = _ffi.new("uint64_t *")

    def get(self, key: int) -> int | None:
        out = self._out
        if _map_get(self._map, key, out):
            return int(out[0])
        return None

    def __contains__(self, key: int) -> bool:
        return bool(_map_get(self._map, key, self._out))

    def put(self, key: int, value: int) -> None:
        if _map_put(self._map, key, value) < 0:
            raise MemoryError(f"U64Map: cannot grow past {len(self)} entries")

    def put_many(self, keys: Sequence[int] | array[int], values: Sequence[int] | array[int]) -> None:
        """put() for each pair, in order, in one C call (about 20x faster than a loop)."""
        key_arr = keys if isinstance(keys, array) and keys.typecode == "Q" else array("Q", keys)
        val_arr = values if isinstance(values, array) and values.typecode == "Q" else array("Q", values)
        if len(key_arr) != len(val_arr):
            raise NativeError(_errno.EINVAL, f"U64Map.put_many: {len(key_arr)} keys, {len(val_arr)} values")
        rc = _lib.ws_map_put_many(
            self._map,
            _ffi.from_buffer("uint64_t[]", key_arr),
            _ffi.from_buffer("uint64_t[]", val_arr),
            len(key_arr),
        )
        if rc < 0:
            raise MemoryError(f"U64Map: cannot grow past {len(self)} entries")

    def get_many(self, keys: Sequence[int] | array[int]) -> list[int | None]:
        """get() for each key in one C call."""
        key_arr = keys if isinstance(keys, array) and keys.typecode == "Q" else array("Q", keys)
        n = len(key_arr)
        values = array("Q", [0]) * n
        found = bytearray(n)
        _lib.ws_map_get_many(
            self._map,
            _ffi.from_buffer("uint64_t[]", key_arr),
            n,
            _ffi.from_buffer("uint64_t[]", values, require_writable=True),
            _ffi.from_buffer("uint8_t[]", found, require_writable=True),
        )
        return [v if f else None for v, f in zip(values, found, strict=True)]

    def delete(self, key: int) -> bool:
        return bool(_lib.ws_map_del(self._map, key))

    def __len__(self) -> int:
        return int(_lib.ws_map_len(self._map))

    @property
    def nbytes(self) -> int:
        """Heap bytes held by the C side."""
        return int(_lib.ws_map_bytes(self._map))
