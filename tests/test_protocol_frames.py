"""The frame codec: exact layout, any split of the input, and every kind of damage."""

from __future__ import annotations

import itertools
import struct

import crc32c as crc32c_ref
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore.errors import ProtocolError
from walstore.protocol.frames import (
    FRAME_HEADER_BYTES,
    MAGIC,
    MAX_FRAME_BYTES,
    Frame,
    FrameDecoder,
    encode_frame,
)

SETTINGS = settings(max_examples=150, deadline=None)


def decode_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
    frames: list[Frame] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    return frames


def header_only(length: int, frame_type: int = 4) -> bytes:
    # The CRC is irrelevant: a length over the limit must fail before the CRC is looked at.
    return struct.pack("<2sBBB3sII", MAGIC, 1, frame_type, 0, b"\0\0\0", length, 0)


def test_layout_matches_the_documented_format() -> None:
    frame = encode_frame(0x07, 0x00, b"abc")
    assert len(frame) == FRAME_HEADER_BYTES + 3 == 19
    assert frame[0:2] == b"WS"
    assert frame[2] == 1  # version
    assert frame[3] == 0x07  # type
    assert frame[4] == 0  # flags
    assert frame[5:8] == b"\0\0\0"
    assert int.from_bytes(frame[8:12], "little") == 3
    # Reference CRC from the independent `crc32c` package: header[0:12] then payload.
    assert int.from_bytes(frame[12:16], "little") == crc32c_ref.crc32c(frame[:12] + b"abc")
    assert frame[16:] == b"abc"


frame_st = st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300))


@SETTINGS
@given(frames=st.lists(frame_st, min_size=1, max_size=8), data=st.data())
def test_frames_round_trip_whole_byte_by_byte_and_at_random_splits(
    frames: list[tuple[int, int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(t, f, p) for t, f, p in frames)
    expected = [Frame(t, f, p) for t, f, p in frames]

    assert decode_all(FrameDecoder(), [stream]) == expected
    assert decode_all(FrameDecoder(), [stream[i : i + 1] for i in range(len(stream))]) == expected
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    decoder = FrameDecoder()
    assert decode_all(decoder, chunks) == expected
    assert decoder.buffered_bytes == 0


def test_many_small_frames_in_one_buffer_come_out_in_order() -> None:
    # Enough bytes that the decoder compacts its buffer part-way through.
    payloads = [i.to_bytes(4, "little") * (i % 7) for i in range(20_000)]
    stream = b"".join(encode_frame(1, 0, p) for p in payloads)
    decoder = FrameDecoder()
    frames = decode_all(decoder, [stream[:100_001], stream[100_001:]])
    assert [f.payload for f in frames] == payloads
    assert decoder.buffered_bytes == 0


def test_every_truncation_waits_for_more_and_keeps_every_byte() -> None:
    frame = encode_frame(3, 0, b"0123456789" * 5)
    for cut in range(len(frame)):
        decoder = FrameDecoder()
        decoder.feed(frame[:cut])
        assert decoder.next_frame() is None
        assert decoder.buffered_bytes == cut
        decoder.feed(frame[cut:])
        assert decoder.next_frame() == Frame(3, 0, b"0123456789" * 5)


@pytest.mark.parametrize("length", [2**32 - 1, MAX_FRAME_BYTES + 1])
def test_oversized_length_fails_from_the_header_alone(length: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(header_only(length))
    assert decoder.buffered_bytes == FRAME_HEADER_BYTES  # nothing of a payload held
    with pytest.raises(ProtocolError, match=f"frame length {length} is over the limit of {MAX_FRAME_BYTES}"):
        decoder.next_frame()
    assert decoder.buffered_bytes == 0  # and what there was is dropped


def test_a_frame_of_exactly_the_maximum_is_accepted() -> None:
    decoder = FrameDecoder()
    decoder.feed(header_only(MAX_FRAME_BYTES))
    assert decoder.next_frame() is None  # legal length: waits for the payload
    payload = bytes(MAX_FRAME_BYTES)
    assert decode_all(FrameDecoder(), [encode_frame(4, 0, payload)]) == [Frame(4, 0, payload)]
    with pytest.raises(ValueError, match="over MAX_FRAME_BYTES"):
        encode_frame(4, 0, payload + b"x")


def test_a_lowered_limit_applies_to_the_next_header() -> None:
    decoder = FrameDecoder(max_payload_bytes=10)
    decoder.feed(header_only(11))
    with pytest.raises(ProtocolError, match="frame length 11 is over the limit of 10 bytes"):
        decoder.next_frame()


def test_every_flipped_bit_of_a_valid_frame_is_caught() -> None:
    frame = encode_frame(0x04, 0, b"entries: raw WAL bytes")
    length = len(frame) - FRAME_HEADER_BYTES
    for pos in range(len(frame)):
        for bit in range(8):
            damaged = bytearray(frame)
            damaged[pos] ^= 1 << bit
            decoder = FrameDecoder()
            decoder.feed(damaged)
            if pos in (8, 9, 10, 11):
                new_length = int.from_bytes(damaged[8:12], "little")
                if new_length > MAX_FRAME_BYTES:
                    expect = "frame length"
                elif new_length > length:
                    # A longer (legal) length only means "more to come" until EOF.
                    assert decoder.next_frame() is None, (pos, bit)
                    continue
                else:
                    expect = "CRC mismatch"
            else:
                expect = {0: "magic", 1: "magic", 2: "version", 5: "reserved", 6: "reserved", 7: "reserved"}.get(
                    pos, "CRC mismatch"
                )
            with pytest.raises(ProtocolError, match=expect):
                decoder.next_frame()


def test_named_header_errors_carry_a_reason() -> None:
    good = encode_frame(1, 0, b"x")
    cases = {
        b"XS" + good[2:]: r"bad frame magic b'XS' \(expected b'WS'\)",
        good[:2] + b"\x02" + good[3:]: r"unsupported frame version 2 \(we speak 1\)",
        good[:6] + b"\x01" + good[7:]: "reserved header bytes are not zero: 000100",
        good[:12] + bytes(4) + good[16:]: "frame CRC mismatch",
    }
    for raw, reason in cases.items():
        decoder = FrameDecoder()
        decoder.feed(raw)
        with pytest.raises(ProtocolError, match=reason):
            decoder.next_frame()


def test_garbage_fails_on_its_first_byte() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"G")  # e.g. an HTTP client on the peer port
    with pytest.raises(ProtocolError, match="bad frame magic b'G'"):
        decoder.next_frame()


def test_a_failed_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"nope")
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    with pytest.raises(ProtocolError, match="already failed: bad frame magic"):
        decoder.feed(encode_frame(1, 0, b""))
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.next_frame()


def test_header_hook_refuses_before_the_payload_arrives() -> None:
    seen: list[tuple[int, int, int]] = []

    def refuse_type_9(frame_type: int, flags: int, length: int) -> None:
        seen.append((frame_type, flags, length))
        if frame_type == 9:
            raise ProtocolError("type 9 not welcome")

    decoder = FrameDecoder(check_header=refuse_type_9)
    decoder.feed(encode_frame(9, 0, b"payload")[:FRAME_HEADER_BYTES])
    with pytest.raises(ProtocolError, match="type 9 not welcome"):
        decoder.next_frame()
    assert seen == [(9, 0, 7)]


@SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8))
def test_random_bytes_raise_only_protocol_error(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    try:
        frames = decode_all(decoder, chunks)
    except ProtocolError:
        return
    # Random bytes cannot carry a matching CRC: if nothing failed, nothing came out, and
    # what is held is the start of a frame that is still incomplete.
    assert frames == []
    assert decoder.buffered_bytes == sum(map(len, chunks))


@SETTINGS
@given(valid=frame_st, junk=st.binary(min_size=1, max_size=40))
def test_junk_after_a_valid_frame_never_yields_a_second_frame(valid: tuple[int, int, bytes], junk: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(*valid) + junk)
    assert decoder.next_frame() == Frame(*valid)
    try:
        assert decoder.next_frame() is None
    except ProtocolError:
        pass


def test_bad_arguments_to_the_encoder_are_value_errors() -> None:
    with pytest.raises(ValueError):
        encode_frame(256, 0, b"")
    with pytest.raises(ValueError):
        encode_frame(1, -1, b"")
    with pytest.raises(ValueError):
        FrameDecoder(max_payload_bytes=MAX_FRAME_BYTES + 1)
