"""The C extension against independent Python references: the `crc32c` package for CRCs,
a struct-based record encoder for the WAL format, and a dict for the hash map."""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import struct
import sys
from array import array
from pathlib import Path
from types import ModuleType

import crc32c as crc_ref
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walstore
from walstore import _native as native
from walstore.errors import DiskFullError, FsyncError, NativeError

NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"
HDR = 32
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- an independent reference encoder (struct + the crc32c package) ----


def ref_record(
    body: bytes,
    kind: int,
    flags: int,
    epoch: int,
    index: int,
    *,
    reserved: bytes = bytes(6),
    pad: int = 0,
    body_len: int | None = None,
) -> bytes:
    length = len(body) if body_len is None else body_len
    rest = struct.pack("<BB6sQQ", kind, flags, reserved, epoch, index) + body
    crc = crc_ref.crc32c(rest, crc_ref.crc32c(struct.pack("<I", length)))
    padding = bytes([pad]) * ((-len(body)) % 8)
    return struct.pack("<II", length, crc) + rest + padding


def ref_batch(bodies: list[bytes], kinds: list[int], flags: list[int], epoch: int, first: int) -> bytes:
    return b"".join(
        ref_record(b, k, f, epoch, first + i) for i, (b, k, f) in enumerate(zip(bodies, kinds, flags, strict=True))
    )


def sizes(bodies: list[bytes]) -> list[int]:
    """Offsets of each record in an encoded batch."""
    out, pos = [], 0
    for b in bodies:
        out.append(pos)
        pos += native.record_size(len(b))
    return out


def batch(n: int, epoch: int = 1, first: int = 1, body_len: int = 13, last_flag: bool = True) -> bytes:
    bodies = [bytes([1 + i % 251]) * (body_len + i % 5) for i in range(n)]
    flags = [0] * n
    if last_flag and n:
        flags[-1] = native.FLAG_BATCH_END
    return native.encode_batch(bodies, [native.KIND_EVENT] * n, flags, epoch, first)


# ---- CRC32C ----


def test_crc32c_known_vector_both_paths() -> None:
    assert native.crc32c(b"123456789") == 0xE3069283
    assert native.crc32c_sw(b"123456789") == 0xE3069283
    assert native.crc32c(b"") == 0


def test_crc32c_every_length_and_alignment_matches_package() -> None:
    rng = random.Random(1)
    data = rng.randbytes(4096 + 16)
    for length in range(4097):
        start = length % 8  # vary alignment too: the hardware loop reads 8 bytes at a time
        chunk = data[start : start + length]
        want = crc_ref.crc32c(chunk)
        assert native.crc32c(chunk) == want, length
        assert native.crc32c_sw(chunk) == want, length


@FAST
@given(st.binary(max_size=300), st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_crc32c_chains_like_the_package(a: bytes, b: bytes, seed: int) -> None:
    assert native.crc32c(b, native.crc32c(a)) == native.crc32c(a + b)
    assert native.crc32c_sw(b, native.crc32c_sw(a)) == native.crc32c(a + b)
    assert native.crc32c(a, seed) == crc_ref.crc32c(a, seed)


def test_crc32c_accepts_any_buffer_without_copy() -> None:
    data = bytes(range(256)) * 3
    want = crc_ref.crc32c(data)
    assert native.crc32c(bytearray(data)) == want
    assert native.crc32c(memoryview(data)) == want
    assert native.crc32c(memoryview(data)[5:100]) == crc_ref.crc32c(data[5:100])
    words = memoryview(data).cast("I")  # a non-byte format counts bytes, not items
    assert native.crc32c(words) == want


def test_hw_crc_flag_is_a_bool() -> None:
    assert isinstance(native.hw_crc_available(), bool)
    if os.uname().machine == "x86_64":
        with open("/proc/cpuinfo") as f:
            assert native.hw_crc_available() == ("sse4_2" in f.read())


# ---- encoding ----


@FAST
@given(
    st.lists(
        st.tuples(st.binary(max_size=70), st.integers(1, 3), st.integers(0, 1)),
        max_size=12,
    ),
    st.integers(1, 2**64 - 1),
    st.integers(1, 2**40),
)
def test_encode_batch_matches_reference_and_scans_back(
    records: list[tuple[bytes, int, int]], epoch: int, first: int
) -> None:
    bodies = [r[0] for r in records]
    kinds = [r[1] for r in records]
    flags = [r[2] for r in records]
    encoded = native.encode_batch(bodies, kinds, flags, epoch, first)
    assert encoded == ref_batch(bodies, kinds, flags, epoch, first)
    assert len(encoded) == sum(native.record_size(len(b)) for b in bodies)

    res = native.scan(encoded + bytes(64), 0, first)
    assert list(res.offsets) == sizes(bodies)
    assert (res.count, res.next_index, res.end_offset) == (len(bodies), first + len(bodies), len(encoded))
    assert res.stop is native.ScanStop.END_ZERO
    assert res.last_epoch == (epoch if bodies else 0)
    ends = [i for i, f in enumerate(flags) if f]
    if ends:
        last = ends[-1]
        assert res.batch_end_index == first + last
        assert res.batch_end_offset == sizes(bodies)[last] + native.record_size(len(bodies[last]))
    else:
        assert (res.batch_end_offset, res.batch_end_index) == (0, first - 1)


def test_encode_batch_flags_none_and_bytes_kinds() -> None:
    enc = native.encode_batch([b"a", b"bc"], bytes([1, 3]), None, 2, 5)
    assert enc == ref_batch([b"a", b"bc"], [1, 3], [0, 0], 2, 5)
    assert native.encode_batch([], [], None, 1, 1) == b""


@pytest.mark.parametrize(
    ("bodies", "kinds", "flags", "epoch", "first", "code"),
    [
        ([b"x"], [0], None, 1, 1, errno.EINVAL),  # kind 0 is never valid
        ([b"x"], [5], None, 1, 1, errno.EINVAL),  # 4 is TRACKING, the last kind
        ([b"x"], [1], [2], 1, 1, errno.EINVAL),  # unknown flag bit
        ([b"x"], [1], None, 0, 1, errno.EINVAL),  # epoch 0
        ([b"x"], [1], None, 1, 0, errno.EINVAL),  # index 0
        ([b"x", b"y"], [1], None, 1, 1, errno.EINVAL),  # length mismatch
        ([b"x"], [256], None, 1, 1, errno.EINVAL),
        ([b"x", b"y"], [1, 1], None, 1, 2**64 - 1, errno.EOVERFLOW),
    ],
)
def test_encode_batch_rejects_bad_arguments(
    bodies: list[bytes], kinds: list[int], flags: list[int] | None, epoch: int, first: int, code: int
) -> None:
    with pytest.raises(NativeError) as info:
        native.encode_batch(bodies, kinds, flags, epoch, first)
    assert info.value.errno == code


def test_encode_batch_rejects_oversized_body_before_c() -> None:
    with pytest.raises(NativeError) as info:
        native.encode_batch([bytes(native.MAX_RECORD_BODY_BYTES + 1)], [1], None, 1, 1)
    assert info.value.errno == errno.EMSGSIZE


@FAST
@given(
    st.lists(st.tuples(st.binary(max_size=70), st.integers(1, 3), st.integers(0, 1)), min_size=1, max_size=40),
    st.integers(1, 2**64 - 1),
    st.integers(1, 2**40),
)
def test_encode_records_is_encode_batch_without_the_copy(
    records: list[tuple[bytes, int, int]], epoch: int, first: int
) -> None:
    bodies = [r[0] for r in records]
    kinds = bytes(r[1] for r in records)
    flags = bytes(r[2] for r in records)
    out = native.encode_records(bodies, kinds, flags, epoch, first)
    assert isinstance(out, bytearray)
    assert out == native.encode_batch(bodies, kinds, flags, epoch, first)
    assert out == ref_batch(bodies, list(kinds), list(flags), epoch, first)


@pytest.mark.parametrize(
    ("bodies", "kinds", "flags", "code"),
    [
        ([b"x", b"y"], b"\x01", b"\x00\x00", errno.EINVAL),  # one kind short
        ([b"x"], b"\x01", b"", errno.EINVAL),
        ([b"x", b"y"], b"\x01\x05", b"\x00\x00", errno.EINVAL),  # the sizing call refuses it
        ([b"x", bytes(native.MAX_RECORD_BODY_BYTES + 1)], b"\x01\x01", b"\x00\x00", errno.EMSGSIZE),
        ([bytes(native.MAX_RECORD_BODY_BYTES + 1)], b"\x01", b"\x00", errno.EMSGSIZE),
    ],
)
def test_encode_records_rejects_bad_arguments(bodies: list[bytes], kinds: bytes, flags: bytes, code: int) -> None:
    with pytest.raises(NativeError) as info:
        native.encode_records(bodies, kinds, flags, 1, 1)
    assert info.value.errno == code


def test_record_size_and_constants() -> None:
    assert [native.record_size(n) for n in (0, 1, 7, 8, 9, 16)] == [32, 40, 40, 40, 48, 48]
    assert native.RECORD_HEADER_BYTES == 32
    assert native.MAX_RECORD_BODY_BYTES == 16 * 1024 * 1024
    assert (native.KIND_EVENT, native.KIND_EPOCH_START, native.KIND_NOOP) == (1, 2, 3)
    assert native.FLAG_BATCH_END == 1
    for stop in native.ScanStop:
        assert native._ffi.string(native._lib.ws_scan_reason_name(stop.value)).decode() == stop.name
        assert getattr(native._lib, f"WS_SCAN_{stop.name}") == stop.value


# ---- scanning: every stop reason on purpose ----


def test_scan_all_zero_is_end_zero() -> None:
    res = native.scan(bytes(4096), 0, 7)
    assert (res.count, res.end_offset, res.next_index, res.stop) == (0, 0, 7, native.ScanStop.END_ZERO)
    assert (res.batch_end_offset, res.batch_end_index) == (0, 6)
    assert native.scan(b"", 0, 1).stop is native.ScanStop.END_ZERO


def test_scan_flipped_body_byte_is_bad_crc_at_that_record() -> None:
    data = bytearray(batch(3) + bytes(64))
    second = native.scan(data, 0, 1).offsets[1]
    data[second + HDR + 2] ^= 0x01
    res = native.scan(data, 0, 1)
    assert (res.count, res.end_offset, res.stop) == (1, second, native.ScanStop.BAD_CRC)


def test_scan_huge_length_is_bad_length() -> None:
    data = bytearray(batch(2) + bytes(64))
    second = native.scan(data, 0, 1).offsets[1]
    data[second : second + 4] = struct.pack("<I", 0xFFFFFFFF)
    res = native.scan(data, 0, 1)
    assert (res.count, res.end_offset, res.stop) == (1, second, native.ScanStop.BAD_LENGTH)
    # a caller-chosen bound below the format's limit applies too
    res = native.scan(batch(1, body_len=100), 0, 1, max_body=64)
    assert (res.count, res.stop) == (0, native.ScanStop.BAD_LENGTH)


def test_scan_index_gap_is_bad_index() -> None:
    data = batch(2, first=1) + batch(2, first=4) + bytes(64)
    res = native.scan(data, 0, 1)
    assert (res.count, res.next_index, res.stop) == (2, 3, native.ScanStop.BAD_INDEX)
    assert native.scan(data, 0, 2).stop is native.ScanStop.BAD_INDEX  # wrong first index too


def test_scan_truncated_record_and_partial_header() -> None:
    data = batch(3)
    offsets = native.scan(data, 0, 1).offsets
    res = native.scan(data[:-3], 0, 1)
    assert (res.count, res.end_offset, res.stop) == (2, offsets[2], native.ScanStop.TRUNCATED)
    res = native.scan(data[: offsets[2] + 20], 0, 1)  # only part of the header made it
    assert (res.count, res.stop) == (2, native.ScanStop.TRUNCATED)


def test_scan_every_cut_point_keeps_exactly_the_complete_records() -> None:
    """A torn tail: cut anywhere, the complete records survive and nothing else does.
    With zeros after the cut (a preallocated segment) a record also survives when the
    bytes it lost were zeros anyway (its padding, the high bytes of epoch and index)."""
    data = batch(4, body_len=5)
    ends = [*list(native.scan(data, 0, 1).offsets)[1:], len(data)]
    for cut in range(len(data) + 1):
        res = native.scan(data[:cut], 0, 1)
        complete = sum(1 for e in ends if e <= cut)
        assert res.count == complete, cut
        assert res.end_offset == (ends[complete - 1] if complete else 0)
        assert res.stop is (native.ScanStop.END_ZERO if cut == res.end_offset else native.ScanStop.TRUNCATED)

        padded = data[:cut] + bytes(128)
        res = native.scan(padded, 0, 1)
        complete = sum(1 for e in ends if e <= cut or not any(data[cut:e]))
        assert res.count == complete, cut
        assert res.end_offset == (ends[complete - 1] if complete else 0)
        if any(padded[res.end_offset :]):
            assert res.stop in (native.ScanStop.TRUNCATED, native.ScanStop.BAD_CRC), cut
        else:
            assert res.stop is native.ScanStop.END_ZERO, cut


def test_scan_every_bit_flip_is_caught_at_or_before_its_record() -> None:
    data = batch(3, body_len=3) + bytes(32)
    offsets = list(native.scan(data, 0, 1).offsets)
    used = offsets[-1] + native.record_size(5)
    for bit in range(used * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        record = sum(1 for o in offsets if o <= bit // 8) - 1
        res = native.scan(damaged, 0, 1)
        assert (res.count, res.end_offset) == (record, offsets[record]), bit
        assert res.stop is not native.ScanStop.END_ZERO, bit


def test_scan_decreasing_or_zero_epoch_is_bad_epoch() -> None:
    data = batch(2, epoch=5, first=1, last_flag=False) + batch(1, epoch=4, first=3)
    res = native.scan(data, 0, 1)
    assert (res.count, res.last_epoch, res.stop) == (2, 5, native.ScanStop.BAD_EPOCH)
    zero = ref_record(b"abc", 1, 0, 0, 1)
    assert native.scan(zero, 0, 1).stop is native.ScanStop.BAD_EPOCH
    # min_epoch carries the previous epoch across calls
    assert native.scan(batch(1, epoch=3), 0, 1, min_epoch=4).stop is native.ScanStop.BAD_EPOCH
    assert native.scan(batch(1, epoch=4), 0, 1, min_epoch=4).count == 1


def test_scan_nonzero_padding_is_bad_padding() -> None:
    data = ref_record(b"abc", 1, 0, 1, 1) + ref_record(b"abcde", 1, 0, 1, 2, pad=7)
    res = native.scan(data, 0, 1)
    assert (res.count, res.end_offset, res.stop) == (1, 40, native.ScanStop.BAD_PADDING)


@pytest.mark.parametrize("kind", [0, 5, 255])
def test_scan_unknown_kind_with_valid_crc_is_bad_kind(kind: int) -> None:
    res = native.scan(ref_record(b"x", kind, 0, 1, 1), 0, 1)
    assert (res.count, res.stop) == (0, native.ScanStop.BAD_KIND)


def test_scan_accepts_every_kind_up_to_tracking() -> None:
    data = b"".join(ref_record(b"x", kind, 0, 1, kind) for kind in (1, 2, 3, 4))
    res = native.scan(data, 0, 1)
    assert (res.count, res.stop) == (4, native.ScanStop.END_ZERO)
    assert native.KIND_TRACKING == 4


@pytest.mark.parametrize(("flags", "reserved"), [(2, bytes(6)), (0x80, bytes(6)), (0, b"\0\0\0\0\0\1")])
def test_scan_reserved_bits_are_bad_reserved(flags: int, reserved: bytes) -> None:
    res = native.scan(ref_record(b"x", 1, flags, 1, 1, reserved=reserved), 0, 1)
    assert (res.count, res.stop) == (0, native.ScanStop.BAD_RESERVED)


def test_scan_full_resumes_to_the_same_result() -> None:
    data = batch(10, first=100) + bytes(32)
    whole = native.scan(data, 0, 100)
    assert whole.count == 10 and whole.stop is native.ScanStop.END_ZERO
    collected: list[int] = []
    start, index, epoch = 0, 100, 0
    while True:
        part = native.scan(data, start, index, offsets_cap=3, min_epoch=epoch)
        collected += part.offsets
        start, index, epoch = part.end_offset, part.next_index, part.last_epoch
        if part.stop is not native.ScanStop.FULL:
            break
        assert part.count == 3
    assert collected == list(whole.offsets)
    assert (start, index, part.stop) == (whole.end_offset, 110, native.ScanStop.END_ZERO)
    # exactly enough room at the end of the data is END_ZERO, not FULL
    assert native.scan(data, 0, 100, offsets_cap=10).stop is native.ScanStop.END_ZERO


def test_scan_verify_only_and_start_offset() -> None:
    data = batch(5) + bytes(8)
    res = native.scan(data, 0, 1, collect_offsets=False)
    assert (res.count, len(res.offsets), res.stop) == (5, 0, native.ScanStop.END_ZERO)
    offsets = native.scan(data, 0, 1).offsets
    res = native.scan(data, offsets[2], 3)
    assert list(res.offsets) == list(offsets[2:])
    assert native.scan(memoryview(bytearray(data)), 0, 1).count == 5


@pytest.mark.parametrize(("start", "index", "max_body"), [(3, 1, 100), (4096, 1, 100), (0, 0, 100), (0, 1, 2**25)])
def test_scan_bad_arguments_raise_native_error(start: int, index: int, max_body: int) -> None:
    with pytest.raises(NativeError) as info:
        native.scan(bytes(64), start, index, max_body)
    assert info.value.errno == errno.EINVAL


# ---- find_valid_record / is_zero ----


def test_find_valid_record_after_garbage() -> None:
    rng = random.Random(7)
    garbage = rng.randbytes(800)
    record = ref_record(b"payload", 1, 1, 9, 12345)
    data = garbage + record + rng.randbytes(40)
    assert native.find_valid_record(data, 0) == 800
    assert native.find_valid_record(data, 799) == 800
    assert native.find_valid_record(data, 800) is None  # strictly after start
    # only 8-aligned offsets count
    assert native.find_valid_record(b"\1" * 4 + record, 0) is None


def test_find_valid_record_none_on_zeros_and_garbage() -> None:
    assert native.find_valid_record(bytes(1 << 16), 0) is None
    rng = random.Random(3)
    assert native.find_valid_record(rng.randbytes(1 << 16), 0) is None
    assert native.find_valid_record(b"", 0) is None
    damaged = bytearray(ref_record(b"abc", 1, 0, 1, 1))
    damaged[HDR] ^= 1
    assert native.find_valid_record(bytes(8) + damaged, 0) is None


def test_find_valid_record_tells_torn_tail_from_corruption() -> None:
    data = bytearray(batch(4) + bytes(256))
    offsets = native.scan(data, 0, 1).offsets
    data[offsets[1] + HDR] ^= 0xFF
    res = native.scan(data, 0, 1)
    assert res.stop is native.ScanStop.BAD_CRC
    assert native.find_valid_record(data, res.end_offset) == offsets[2]  # corruption
    torn = batch(4)[: offsets[3] + 10] + bytes(256)
    res = native.scan(torn, 0, 1)
    assert (res.count, res.end_offset) == (3, offsets[3])
    assert native.find_valid_record(torn, res.end_offset) is None  # torn tail


def test_is_zero() -> None:
    assert native.is_zero(b"")
    assert native.is_zero(bytes(100_000))
    assert not native.is_zero(bytes(99_999) + b"\1")
    assert not native.is_zero(b"\1" + bytes(10))
    assert native.is_zero(memoryview(bytearray(64)))


# ---- file I/O ----


def test_pwritev_sync_writes_all_buffers_at_offset(tmp_path: Path) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"#" * 10)
    parts: list[bytes | bytearray | memoryview] = [
        b"abc",
        bytearray(b""),
        bytearray(b"defg"),
        memoryview(b"xyz123")[1:4],
    ]
    fd = os.open(path, os.O_RDWR)
    try:
        native.pwritev_sync(fd, 16, parts, True)
        native.pwritev_sync(fd, 2, [b"!"], False)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"##!#######" + bytes(6) + b"abcdefgyz1"


def test_pwritev_sync_many_buffers_spans_several_syscalls(tmp_path: Path) -> None:
    parts = [bytes([i % 256]) * (1 + i % 7) for i in range(1500)]  # > the 256-iovec chunk
    fd = os.open(tmp_path / "seg", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        native.pwritev_sync(fd, 0, parts, True)
        native.pwritev_sync(fd, 0, [], True)  # nothing to write: just the sync
    finally:
        os.close(fd)
    assert (tmp_path / "seg").read_bytes() == b"".join(parts)


def test_pwritev_sync_bad_fd_is_native_error() -> None:
    with pytest.raises(NativeError) as info:
        native.pwritev_sync(-1, 0, [b"x"], True)
    assert info.value.errno == errno.EBADF
    assert not isinstance(info.value, FsyncError)


def test_pwritev_sync_write_to_pipe_fails_in_write_step() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(NativeError) as info:
            native.pwritev_sync(w, 0, [b"x"], True)
        assert info.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)


def test_sync_failure_is_fsync_error() -> None:
    r, w = os.pipe()  # fdatasync on a pipe fails with EINVAL
    try:
        with pytest.raises(FsyncError) as info:
            native.pwritev_sync(w, 0, [], True, path="the-pipe")
        assert info.value.errno == errno.EINVAL
        assert info.value.path == "the-pipe"
        with pytest.raises(FsyncError):
            native.fdatasync(w)
    finally:
        os.close(r)
        os.close(w)


def test_enospc_on_write_is_disk_full() -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(DiskFullError):
            native.pwritev_sync(fd, 0, [b"x" * 100], False)
    finally:
        os.close(fd)


def test_fallocate_extends_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"keep")
    fd = os.open(path, os.O_RDWR)
    try:
        native.fallocate(fd, 0, 1 << 20)
        native.fallocate(fd, 0, 0)
        native.fdatasync(fd)
        with pytest.raises(NativeError) as info:
            native.fallocate(fd, -1, 10)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 1 << 20 and data[:4] == b"keep" and native.is_zero(data[4:])


def test_fallocate_on_pipe_is_native_error() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(NativeError) as info:
            native.fallocate(w, 0, 10)
        assert info.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)


# ---- build freshness ----


def load_build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("walstore_build_native_under_test", NATIVE_DIR / "build_native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stale_build_is_an_import_error_naming_make_build_native() -> None:
    with pytest.raises(ImportError, match="make build-native") as info:
        native.check_source_hash("0" * 64, NATIVE_DIR)
    assert "stale" in str(info.value)
    native.check_source_hash(native.compiled_source_hash(), NATIVE_DIR)
    native.check_source_hash("anything", None)  # an installed wheel has no sources to compare


def test_loaded_module_is_built_from_these_sources() -> None:
    assert native.compiled_source_hash() == native._source_hash(NATIVE_DIR)
    assert Path(native.module_path()).is_file()


def test_build_script_and_wrapper_hash_alike_and_pick_up_new_files(tmp_path: Path) -> None:
    build = load_build_script()
    assert build.source_hash(str(NATIVE_DIR)) == native._source_hash(NATIVE_DIR)
    for name in ("walstore_native.h", "walstore_native.c", "build_native.py"):
        (tmp_path / name).write_bytes((NATIVE_DIR / name).read_bytes())
    before = native._source_hash(tmp_path)
    (tmp_path / "walstore_map.c").write_text("int ws_extra(void) { return 7; }\n")
    (tmp_path / "walstore_map.cdef").write_text("int ws_extra(void);\n")
    (tmp_path / ".walstore_map.c.swp").write_text("editor noise")
    after = native._source_hash(tmp_path)
    assert after != before and after == build.source_hash(str(tmp_path))
    assert [Path(p).name for p in build.c_sources(str(tmp_path))] == ["walstore_map.c", "walstore_native.c"]
    cdef = build.cdef_text(str(tmp_path))
    assert "int ws_extra(void);" in cdef and "ws_scan_result" in cdef and "#include" not in cdef
    build.make_builder(str(tmp_path))  # the combined cdef parses


def test_missing_module_is_an_import_error_naming_make_build_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "walstore._walstore_native", None)
    monkeypatch.delattr(walstore, "_walstore_native", raising=False)
    spec = importlib.util.spec_from_file_location("walstore._native_probe", native.__file__)
    assert spec is not None and spec.loader is not None
    with pytest.raises(ImportError, match="make build-native"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# ---- U64Map ----

KEY_POOL = [0, 1, 2, 3, 2**64 - 1, 2**63, 17, 33, 49, 65] + [i << 40 for i in range(1, 8)]
op_strategy = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "del", "get"]),
        st.one_of(st.sampled_from(KEY_POOL), st.integers(0, 2**64 - 1)),
        st.integers(0, 2**64 - 1),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(op_strategy, st.integers(0, 100))
def test_u64map_behaves_like_a_dict(ops: list[tuple[str, int, int]], hint: int) -> None:
    m = native.U64Map(hint)
    model: dict[int, int] = {}
    for op, key, value in ops:
        if op == "put":
            m.put(key, value)
            model[key] = value
        elif op == "del":
            assert m.delete(key) == (key in model)
            model.pop(key, None)
        else:
            assert m.get(key) == model.get(key)
        assert len(m) == len(model)
    for key in set(KEY_POOL) | set(model):
        assert m.get(key) == model.get(key)
        assert (key in m) == (key in model)


def test_u64map_churn_with_backward_shift_deletes() -> None:
    rng = random.Random(11)
    keys = [rng.getrandbits(64) for _ in range(3000)] + list(range(1, 3000))  # random and sequential
    m = native.U64Map()
    for i, k in enumerate(keys):
        m.put(k, i)
    model = {k: i for i, k in enumerate(keys)}
    assert len(m) == len(model)
    order = list(model)
    rng.shuffle(order)
    for j, k in enumerate(order):
        assert m.delete(k)
        del model[k]
        if j % 97 == 0:  # every survivor must still be reachable after the shifts
            assert all(m.get(x) == v for x, v in model.items())
    assert len(m) == 0 and m.get(order[0]) is None and not m.delete(order[0])


def test_u64map_million_inserts_and_bytes_per_entry() -> None:
    n = 1_000_000
    keys = array("Q", (hash(f"agg-{i}") & 0xFFFF_FFFF_FFFF_FFFF for i in range(n)))
    m = native.U64Map()
    m.put_many(keys, range(n))
    assert len(m) == n  # 64-bit hashes of distinct strings: no collisions at this size
    sample = list(range(0, n, 997))
    assert m.get_many([keys[i] for i in sample]) == sample
    assert all(m.get(keys[i]) == i for i in sample)
    per_entry = m.nbytes / n
    assert per_entry <= 48, per_entry  # 16-byte slots at 35-70% load
    sized = native.U64Map(n)
    assert sized.nbytes == m.nbytes  # a hint lands on the same power of two, without regrowth


def test_u64map_many_matches_one_at_a_time() -> None:
    rng = random.Random(5)
    keys = [rng.choice(KEY_POOL) if rng.random() < 0.3 else rng.getrandbits(64) for _ in range(5000)]
    values = [rng.getrandbits(64) for _ in keys]
    one, many = native.U64Map(), native.U64Map()
    for k, v in zip(keys, values, strict=True):
        one.put(k, v)
    many.put_many(keys, values)
    probe = keys[::3] + [rng.getrandbits(64) for _ in range(100)]
    assert many.get_many(probe) == [one.get(k) for k in probe]
    assert len(many) == len(one) == len(dict(zip(keys, values, strict=True)))
    assert many.get_many([]) == []
    with pytest.raises(NativeError):
        many.put_many([1, 2], [3])


def test_u64map_small_and_empty() -> None:
    m = native.U64Map()
    assert len(m) == 0 and m.get(0) is None and not m.delete(0)
    m.put(0, 5)
    assert m.get(0) == 5 and len(m) == 1 and 0 in m
    assert m.nbytes >= 16 * 16


def test_a_failed_pwritev_sync_gives_the_callers_buffers_back() -> None:
    # The error of a failed write is kept (the log is poisoned) with its traceback, which
    # holds the failed call's frame: that frame must not keep the caller's memoryviews
    # exported, or collecting them at exit fails ("memoryview has 1 exported buffer") and
    # the interpreter crashed.
    view = memoryview(bytearray(b"x" * 64))[8:16]
    with pytest.raises((NativeError, FsyncError)) as failed:
        native.pwritev_sync(-1, 0, [view], True)
    assert failed.value.__traceback__ is not None
    view.release()  # BufferError while an export of it is alive
