"""Message codecs: every message round-trips through frames and a live connection, at any
split of the bytes; malformed payloads raise ProtocolError with a reason, nothing else."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore.errors import ProtocolError
from walstore.protocol import (
    MAX_NAME_BYTES,
    MAX_REASON_BYTES,
    PROTOCOL_VERSION,
    Append,
    AppendAck,
    Fetch,
    FetchResult,
    Forward,
    ForwardResult,
    Frame,
    FrameDecoder,
    FrameType,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    PeerConnection,
    Prepare,
    Promise,
    Signal,
    decode_message,
    encode_frame,
    encode_message,
)

SETTINGS = settings(max_examples=120, deadline=None)

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
blob = st.binary(max_size=200)


def name(max_bytes: int) -> st.SearchStrategy[str]:
    return st.text(max_size=40).filter(lambda s: len(s.encode()) <= max_bytes)


MESSAGE_STRATEGIES: dict[FrameType, st.SearchStrategy[Message]] = {
    FrameType.HELLO: st.builds(Hello, u16, name(MAX_NAME_BYTES), name(MAX_NAME_BYTES), u64),
    FrameType.PREPARE: st.builds(Prepare, u64, name(MAX_NAME_BYTES)),
    FrameType.PROMISE: st.builds(
        Promise, u64, st.booleans(), u64, u64, u64, u64, st.lists(st.tuples(u64, u64), max_size=20).map(tuple)
    ),
    FrameType.APPEND: st.builds(Append, u64, u64, u64, u64, blob),
    FrameType.APPEND_ACK: st.builds(AppendAck, u64, st.booleans(), u64, u64, u64, u64),
    FrameType.FETCH: st.builds(Fetch, u64, u64, u64, u32),
    FrameType.FETCH_RESULT: st.builds(FetchResult, u64, u64, st.booleans(), u64, blob),
    FrameType.FORWARD: st.builds(Forward, u64, blob),
    FrameType.FORWARD_RESULT: st.builds(ForwardResult, u64, st.integers(100, 599), blob),
    FrameType.HEARTBEAT: st.builds(Heartbeat, u64, u64, u64),
    FrameType.GOODBYE: st.builds(Goodbye, name(MAX_REASON_BYTES)),
}
any_message = st.one_of(*MESSAGE_STRATEGIES.values())
# What may cross an open connection: everything but HELLO (handshake only) and GOODBYE
# (it ends the stream).
stream_message = st.one_of(*(s for t, s in MESSAGE_STRATEGIES.items() if t not in (FrameType.HELLO, FrameType.GOODBYE)))


def test_strategies_cover_every_frame_type() -> None:
    assert set(MESSAGE_STRATEGIES) == set(FrameType)


def test_frame_type_numbers_are_the_wire_format() -> None:
    # Changing a number breaks every peer running the old code: this table is frozen.
    assert {t.name: t.value for t in FrameType} == {
        "HELLO": 1,
        "PREPARE": 2,
        "PROMISE": 3,
        "APPEND": 4,
        "APPEND_ACK": 5,
        "FETCH": 6,
        "FETCH_RESULT": 7,
        "FORWARD": 8,
        "FORWARD_RESULT": 9,
        "HEARTBEAT": 10,
        "GOODBYE": 11,
    }


def decode_frames(stream: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.feed(stream)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    assert decoder.buffered_bytes == 0
    return frames


@SETTINGS
@given(any_message)
def test_every_message_round_trips_and_encodes_canonically(message: Message) -> None:
    raw = encode_message(message)
    (frame,) = decode_frames(raw)
    assert frame.type == message.TYPE
    decoded = decode_message(frame)
    assert decoded == message
    assert type(decoded) is type(message)
    assert encode_message(decoded) == raw  # exactly one encoding per message


def open_pair() -> tuple[PeerConnection, PeerConnection]:
    client = PeerConnection("cluster-1", "node-a", "client")
    server = PeerConnection("cluster-1", "node-b", "server")
    server.receive_data(client.send(client.hello(3)))
    assert server.next_event() == Hello(PROTOCOL_VERSION, "cluster-1", "node-a", 3)
    client.receive_data(server.send(server.hello(4)))
    assert client.next_event() == Hello(PROTOCOL_VERSION, "cluster-1", "node-b", 4)
    return client, server


def drain(conn: PeerConnection) -> list[Message]:
    out: list[Message] = []
    while True:
        event = conn.next_event()
        if isinstance(event, Signal):
            return out
        out.append(event)


@SETTINGS
@given(messages=st.lists(stream_message, min_size=1, max_size=6), data=st.data())
def test_messages_cross_a_connection_whole_byte_by_byte_and_at_random_splits(
    messages: list[Message], data: st.DataObject
) -> None:
    client, server = open_pair()
    stream = client.send_many(messages)  # many frames, one buffer
    assert stream == b"".join(encode_message(m) for m in messages)

    _, whole = open_pair()
    whole.receive_data(stream)
    assert drain(whole) == messages

    _, bytewise = open_pair()
    got: list[Message] = []
    for i in range(len(stream)):
        bytewise.receive_data(stream[i : i + 1])
        got.extend(drain(bytewise))
    assert got == messages

    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    got = []
    for a, b in itertools.pairwise(bounds):
        if a < b:
            server.receive_data(stream[a:b])
        got.extend(drain(server))
    assert got == messages
    # And back the other way, server to client.
    client.receive_data(server.send_many(messages))
    assert drain(client) == messages


def test_append_entries_are_a_view_into_the_frame_not_a_copy() -> None:
    entries = bytes(range(256)) * 64
    (frame,) = decode_frames(encode_message(Append(7, 10, 6, 9, entries)))
    message = decode_message(frame)
    assert isinstance(message, Append)
    assert isinstance(message.entries, memoryview)
    assert message.entries.readonly
    assert message.entries.obj is frame.payload  # zero-copy: same buffer as the frame
    assert message.entries == entries


def payload_frame(frame_type: FrameType, payload: bytes, flags: int = 0) -> Frame:
    return Frame(frame_type, flags, payload)


def fixed_size(message: Message) -> int:
    """Payload bytes before any ``rest`` field (which may legally be cut short)."""
    payload = encode_message(message)[16:]
    if isinstance(message, (Append, FetchResult)):
        return len(payload) - len(message.entries)
    if isinstance(message, (Forward, ForwardResult)):
        return len(payload) - len(message.body)
    return len(payload)


EXAMPLES: list[Message] = [
    Hello(1, "cluster-1", "node-a", 5),
    Hello(2, "cluster-1", "node-a", 5, "0123456789abcdef0123456789abcdef"),
    Prepare(9, "node-a"),
    Promise(9, True, 9, 8, 120, 110, ((1, 1), (5, 40), (8, 100))),
    Append(9, 120, 8, 110, b"\x01" * 64),
    AppendAck(9, False, 0, 130, 101, 8),
    Fetch(77, 9, 1, 1 << 20),
    FetchResult(77, 9, True, 120, b"\x02" * 40),
    Forward(78, b'{"type": "x"}'),
    ForwardResult(78, 201, b'{"success": true}'),
    Heartbeat(9, 110, 123456789),
    Goodbye("cluster id mismatch"),
]


def test_examples_cover_every_frame_type() -> None:
    assert {m.TYPE for m in EXAMPLES} == set(FrameType)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE.name)
def test_every_truncation_of_the_fixed_fields_is_refused(message: Message) -> None:
    payload = encode_message(message)[16:]
    for cut in range(fixed_size(message)):
        with pytest.raises(ProtocolError, match=f"{message.TYPE.name}: truncated at offset"):
            decode_message(payload_frame(message.TYPE, payload[:cut]))


# Messages that end in a rest field (entries, body) have no trailing bytes by construction.
WITHOUT_REST = [m for m in EXAMPLES if not isinstance(m, (Append, FetchResult, Forward, ForwardResult))]


@pytest.mark.parametrize("message", WITHOUT_REST, ids=lambda m: m.TYPE.name)
def test_trailing_bytes_are_refused(message: Message) -> None:
    payload = encode_message(message)[16:] + b"\x00"
    with pytest.raises(ProtocolError, match=f"{message.TYPE.name}: 1 unexpected bytes after the last field"):
        decode_message(payload_frame(message.TYPE, payload))


def test_named_payload_errors() -> None:
    hello = encode_message(Hello(1, "c", "n", 0))[16:]
    cases: list[tuple[Frame, str]] = [
        # A bool that is neither 0 nor 1.
        (
            payload_frame(FrameType.APPEND_ACK, struct.pack("<QBQQQQ", 1, 2, 0, 0, 0, 0)),
            "APPEND_ACK: ok must be 0 or 1, not 2",
        ),
        # A string length over its limit, whether or not the bytes follow.
        (
            payload_frame(FrameType.GOODBYE, struct.pack("<H", MAX_REASON_BYTES + 1)),
            f"GOODBYE: reason is {MAX_REASON_BYTES + 1} bytes, over the limit of {MAX_REASON_BYTES}",
        ),
        (
            payload_frame(FrameType.PREPARE, struct.pack("<QH", 1, 300) + b"x" * 300),
            "PREPARE: leader_id is 300 bytes, over the limit of 256",
        ),
        # A string length past the end of the payload.
        (payload_frame(FrameType.GOODBYE, struct.pack("<H", 10) + b"abc"), "GOODBYE: truncated at offset 2"),
        # Bytes that are not UTF-8.
        (payload_frame(FrameType.GOODBYE, struct.pack("<H", 2) + b"\xc3\x28"), "GOODBYE: reason is not UTF-8"),
        (payload_frame(FrameType.HELLO, hello[:-1] + b"\xff"), "HELLO: node_id is not UTF-8"),
        # An epoch history that claims 2^32-1 pairs: refused before it is built.
        (
            payload_frame(FrameType.PROMISE, struct.pack("<QBQQQQI", 1, 1, 1, 1, 1, 1, 2**32 - 1)),
            "PROMISE: truncated at offset 45: epoch_history of 4294967295 pairs needs 68719476720 bytes, 0 remain",
        ),
        (payload_frame(FrameType.FORWARD_RESULT, struct.pack("<QH", 1, 99)), "status 99 is not an HTTP status"),
        (payload_frame(FrameType.FORWARD_RESULT, struct.pack("<QH", 1, 600)), "status 600 is not an HTTP status"),
        (Frame(0, 0, b""), "unknown frame type 0x00"),
        (Frame(0x0C, 0, b""), "unknown frame type 0x0c"),
        (Frame(0xFF, 0, b""), "unknown frame type 0xff"),
        (payload_frame(FrameType.HEARTBEAT, bytes(24), flags=0x80), "HEARTBEAT: flags 0x80 are not defined"),
    ]
    for frame, reason in cases:
        with pytest.raises(ProtocolError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            decode_message(frame)


@SETTINGS
@given(frame_type=st.integers(0, 255), flags=st.sampled_from([0, 0, 0, 1]), payload=st.binary(max_size=120))
def test_random_payloads_raise_only_protocol_error(frame_type: int, flags: int, payload: bytes) -> None:
    try:
        message = decode_message(Frame(frame_type, flags, payload))
    except ProtocolError:
        return
    # What decodes is canonical: it encodes back to the very same frame.
    assert encode_message(message) == encode_frame(frame_type, flags, payload)


@pytest.mark.parametrize(
    "message",
    [
        Heartbeat(2**64, 0, 0),
        Heartbeat(-1, 0, 0),
        Fetch(1, 1, 1, 2**32),
        Hello(2**16, "c", "n", 0),
        Prepare(1, "x" * (MAX_NAME_BYTES + 1)),
        Hello(1, "é" * 129, "n", 0),  # 258 bytes of UTF-8 in 129 characters
        Goodbye("x" * (MAX_REASON_BYTES + 1)),
        ForwardResult(1, 42, b""),
        Promise(1, True, 1, 1, 1, 1, ((2**64, 1),)),
    ],
    ids=repr,
)
def test_values_that_do_not_fit_are_refused_on_encode(message: Message) -> None:
    with pytest.raises(ValueError):
        encode_message(message)
