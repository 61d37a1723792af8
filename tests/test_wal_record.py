"""Record, segment header and meta.json codecs: round trips, every damage, arbitrary bytes."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore import _native
from walstore._native import crc32c
from walstore.errors import CorruptionError, LogStateError
from walstore.wal.meta import WalMeta, decode_meta, encode_meta
from walstore.wal.record import (
    FLAG_BATCH_END,
    KIND_EPOCH_START,
    KIND_EVENT,
    KIND_NOOP,
    RECORD_HEADER_BYTES,
    decode_record,
    encode_record,
    peek_header,
    record_size,
)
from walstore.wal.segment import decode_segment_header, encode_segment_header, parse_segment_name, segment_name

bodies = st.binary(max_size=300)
kinds = st.sampled_from([KIND_EVENT, KIND_EPOCH_START, KIND_NOOP])
u63 = st.integers(1, 2**63)


def test_known_layout() -> None:
    rec = encode_record(KIND_EVENT, FLAG_BATCH_END, 7, 42, b"hello")
    assert len(rec) == record_size(5) == 40
    body_len, crc, kind, flags, r16, r32, epoch, index = struct.unpack_from("<IIBBHIQQ", rec)
    assert (body_len, kind, flags, r16, r32, epoch, index) == (5, KIND_EVENT, FLAG_BATCH_END, 0, 0, 7, 42)
    assert crc == _native.crc32c(rec[8:37], _native.crc32c(rec[:4]))
    assert rec[32:37] == b"hello" and rec[37:] == bytes(3)
    assert _native.crc32c(b"123456789") == 0xE3069283


@settings(max_examples=200, deadline=None)
@given(kind=kinds, batch_end=st.booleans(), epoch=u63, index=u63, body=bodies)
def test_round_trip_and_native_agree(kind: int, batch_end: bool, epoch: int, index: int, body: bytes) -> None:
    flags = FLAG_BATCH_END if batch_end else 0
    rec = encode_record(kind, flags, epoch, index, body)
    assert rec == _native.encode_batch([body], [kind], [flags], epoch, index)
    got = decode_record(rec)
    assert (got.kind, got.flags, got.epoch, got.index, got.body, got.size) == (
        kind,
        flags,
        epoch,
        index,
        body,
        len(rec),
    )
    assert got.batch_end == batch_end
    h = peek_header(rec, 0)
    assert (h.body_len, h.epoch, h.index, h.size) == (len(body), epoch, index, len(rec))


def test_every_single_bit_flip_is_detected() -> None:
    rec = encode_record(KIND_EVENT, 0, 3, 9, b"some body bytes!")
    for bit in range(len(rec) * 8):
        damaged = bytearray(rec)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptionError) as exc:
            decode_record(bytes(damaged), path="seg")
        assert exc.value.path == "seg" and exc.value.offset == 0


def test_every_truncation_is_detected() -> None:
    rec = encode_record(KIND_EVENT, 0, 3, 9, b"x" * 21)
    for n in range(len(rec)):
        with pytest.raises(CorruptionError):
            decode_record(rec[:n])


def test_offsets_are_reported() -> None:
    two = encode_record(KIND_EVENT, 0, 1, 1, b"a") + encode_record(KIND_EVENT, 0, 1, 2, b"b")
    assert decode_record(two, 40).index == 2
    with pytest.raises(CorruptionError) as exc:
        decode_record(two[:-1], 40, path="f")
    assert exc.value.offset == 40
    with pytest.raises(CorruptionError):
        decode_record(two, 4)  # not 8-aligned


def test_limits_and_bad_fields() -> None:
    rec = bytearray(encode_record(KIND_EVENT, 0, 1, 1, b"abc"))
    with pytest.raises(CorruptionError, match="over the limit"):
        decode_record(rec, max_body=2)
    with pytest.raises(CorruptionError, match="zeroed"):
        decode_record(bytes(64))
    for bad in ((KIND_EVENT, 2, 1, 1), (0, 0, 1, 1), (KIND_EVENT, 0, 0, 1), (KIND_EVENT, 0, 1, 0)):
        with pytest.raises(LogStateError):
            encode_record(*bad, b"")
    # a huge length word is refused before anything is read or allocated
    huge = struct.pack("<I", 0xFFFFFFFF) + bytes(RECORD_HEADER_BYTES - 4)
    with pytest.raises(CorruptionError, match="over the limit"):
        decode_record(huge)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 64))
def test_arbitrary_bytes_raise_only_corruption(data: bytes, offset: int) -> None:
    try:
        decode_record(data, offset)
    except CorruptionError:
        pass


def test_segment_header_round_trip_and_damage() -> None:
    header = encode_segment_header(123)
    assert decode_segment_header(header, "s") == 123
    assert segment_name(123) == "00000000000000000123.wal" and parse_segment_name(segment_name(123)) == 123
    assert parse_segment_name("meta.json") is None and parse_segment_name("123.wal") is None
    for i in range(len(header)):
        damaged = bytearray(header)
        damaged[i] ^= 0x80
        with pytest.raises(CorruptionError):
            decode_segment_header(bytes(damaged), "s")
    with pytest.raises(CorruptionError):
        decode_segment_header(header[:31], "s")


INCARNATION = "0123456789abcdef" * 2


def test_meta_round_trip_and_damage() -> None:
    meta = WalMeta(
        promised_epoch=9, epoch_history=((1, 1), (4, 100)), truncate_after=None, incarnation=INCARNATION, commit_index=7
    )
    raw = encode_meta(meta)
    assert decode_meta(raw) == meta
    assert decode_meta(encode_meta(WalMeta(truncate_after=5, incarnation=INCARNATION))).truncate_after == 5
    for i in range(len(raw) - 1):
        damaged = bytearray(raw)
        damaged[i] ^= 0x01
        with pytest.raises(CorruptionError):
            decode_meta(bytes(damaged), "m")
    with pytest.raises(LogStateError):
        WalMeta(epoch_history=((3, 1), (2, 5)))
    with pytest.raises(LogStateError):
        encode_meta(WalMeta())  # never written without an identity
    with pytest.raises(LogStateError):
        WalMeta(incarnation="not-hex")


def test_format_1_meta_reads_as_intact_without_an_identity() -> None:
    """A directory written before incarnations: its promises are kept, its incarnation is
    empty (the log names it at open), and its commit index is unknown (0)."""
    obj: dict[str, object] = {"format": 1, "promised_epoch": 4, "epoch_history": [[2, 1]], "truncate_after": None}
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    obj["crc32c"] = crc32c(body)
    meta = decode_meta(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    assert meta == WalMeta(promised_epoch=4, epoch_history=((2, 1),), incarnation="", commit_index=0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_arbitrary_meta_bytes_raise_only_corruption(data: bytes) -> None:
    try:
        decode_meta(data, "m")
    except CorruptionError:
        pass
