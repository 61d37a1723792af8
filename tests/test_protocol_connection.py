"""PeerConnection: the handshake, the state table walked exhaustively, EOF, limits, and
hostile input (only ProtocolError ever escapes, with a reason for the named cases)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore.errors import ProtocolError
from walstore.protocol import (
    CLOSED,
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    MAX_HANDSHAKE_FRAME_BYTES,
    NEED_DATA,
    PROTOCOL_VERSION,
    TRANSITIONS,
    Append,
    FrameType,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    PeerConnection,
    Role,
    Signal,
    State,
    encode_frame,
    encode_message,
)
from walstore.protocol.connection import Act

SETTINGS = settings(max_examples=100, deadline=None)
CLUSTER = "cluster-1"


def pair() -> tuple[PeerConnection, PeerConnection]:
    return PeerConnection(CLUSTER, "node-a", "client"), PeerConnection(CLUSTER, "node-b", "server")


def open_pair() -> tuple[PeerConnection, PeerConnection]:
    client, server = pair()
    server.receive_data(client.send(client.hello(3)))
    assert server.next_event() == Hello(PROTOCOL_VERSION, CLUSTER, "node-a", 3)
    assert server.state is State.HELLO_RECEIVED
    client.receive_data(server.send(server.hello(4)))
    assert client.next_event() == Hello(PROTOCOL_VERSION, CLUSTER, "node-b", 4)
    return client, server


def events(conn: PeerConnection) -> list[Message | Signal]:
    out: list[Message | Signal] = []
    while True:
        event = conn.next_event()
        out.append(event)
        if isinstance(event, Signal):
            return out


def test_handshake_opens_both_sides_and_names_the_peer() -> None:
    client, server = open_pair()
    assert client.state is State.OPEN and server.state is State.OPEN
    assert (client.peer_node_id, client.peer_epoch) == ("node-b", 4)
    assert (server.peer_node_id, server.peer_epoch) == ("node-a", 3)
    server.receive_data(client.send(Heartbeat(3, 10, 99)))
    assert events(server) == [Heartbeat(3, 10, 99), NEED_DATA]


def test_peer_node_id_is_unknown_before_the_handshake() -> None:
    client, server = pair()
    assert client.peer_node_id is None and server.peer_node_id is None


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (
            Hello(PROTOCOL_VERSION, "cluster-2", "node-a", 0),
            "cluster id mismatch: peer 'node-a' is in cluster 'cluster-2', we are in 'cluster-1'",
        ),
        (
            Hello(PROTOCOL_VERSION + 1, CLUSTER, "node-a", 0),
            f"protocol version mismatch: peer 'node-a' speaks {PROTOCOL_VERSION + 1}, we speak {PROTOCOL_VERSION}",
        ),
        (
            Hello(PROTOCOL_VERSION, CLUSTER, "node-b", 0),
            "peer claims our own node id 'node-b': connected to ourselves?",
        ),
        (Hello(PROTOCOL_VERSION, CLUSTER, "", 0), "peer HELLO has an empty node id"),
    ],
)
def test_server_refuses_a_bad_hello_with_a_reason(hello: Hello, reason: str) -> None:
    _, server = pair()
    server.receive_data(encode_message(hello))
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.reason == reason
    assert server.state is State.ERROR
    assert server.peer_node_id is None
    # The transport tells the peer why with a stateless GOODBYE; the peer sees the reason.
    client = PeerConnection(CLUSTER, "node-a", "client")
    client.send(client.hello())
    client.receive_data(encode_message(Goodbye(info.value.reason)))
    client.receive_data(b"")
    assert events(client) == [Goodbye(reason), CLOSED]


def test_client_refuses_a_server_from_another_cluster() -> None:
    client = PeerConnection(CLUSTER, "node-a", "client")
    server = PeerConnection("cluster-2", "node-b", "server")
    client.send(client.hello())
    client.receive_data(encode_message(server.hello()))
    with pytest.raises(ProtocolError, match="peer 'node-b' is in cluster 'cluster-2', we are in 'cluster-1'"):
        client.next_event()


def test_a_message_before_hello_is_refused_from_its_header_alone() -> None:
    _, server = pair()
    frame = encode_message(Append(1, 0, 0, 0, b"x" * 100))
    server.receive_data(frame[:FRAME_HEADER_BYTES])
    with pytest.raises(ProtocolError, match="peer sent APPEND before the handshake finished"):
        server.next_event()


def test_sending_before_the_handshake_is_refused() -> None:
    client, _ = pair()
    with pytest.raises(ProtocolError, match="cannot send HEARTBEAT in state start"):
        client.send(Heartbeat(1, 1, 1))
    client, _ = pair()
    client.send(client.hello())
    with pytest.raises(ProtocolError, match="cannot send APPEND in state hello-sent"):
        client.send(Append(1, 0, 0, 0, b""))


def test_our_hello_must_name_this_connection() -> None:
    client, _ = pair()
    with pytest.raises(ProtocolError, match="cannot send a HELLO for 'node-z'"):
        client.send(Hello(PROTOCOL_VERSION, CLUSTER, "node-z", 0))


def test_before_the_handshake_frames_are_capped_at_a_few_kib() -> None:
    _, server = pair()
    header = encode_frame(FrameType.HELLO, 0, bytes(MAX_HANDSHAKE_FRAME_BYTES + 1))[:FRAME_HEADER_BYTES]
    server.receive_data(header)
    with pytest.raises(ProtocolError, match=f"over the limit of {MAX_HANDSHAKE_FRAME_BYTES} bytes"):
        server.next_event()


def test_after_the_handshake_the_full_limit_applies_and_a_huge_length_fails_from_the_header() -> None:
    client, server = open_pair()
    big = Append(1, 0, 0, 0, bytes(MAX_HANDSHAKE_FRAME_BYTES * 4))
    server.receive_data(client.send(big))
    assert events(server) == [big, NEED_DATA]
    header = (2**32 - 1).to_bytes(4, "little")
    server.receive_data(encode_message(Heartbeat(1, 1, 1))[:8] + header + bytes(4))
    with pytest.raises(ProtocolError, match=f"frame length 4294967295 is over the limit of {MAX_FRAME_BYTES}"):
        server.next_event()


def test_after_an_error_every_call_raises() -> None:
    _, server = pair()
    server.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="bad frame magic"):
        server.next_event()
    calls: list[Callable[[], object]] = [
        server.next_event,
        lambda: server.receive_data(b"WS"),
        lambda: server.send(server.hello()),
        lambda: server.send_many([]),
    ]
    for call in calls:
        with pytest.raises(ProtocolError, match="connection already failed: bad frame magic"):
            call()


def test_a_clean_eof_is_closed_and_stays_closed() -> None:
    client, server = open_pair()
    server.receive_data(client.send(Heartbeat(1, 2, 3)))
    server.receive_data(b"")
    assert events(server) == [Heartbeat(1, 2, 3), CLOSED]
    assert server.next_event() is CLOSED
    assert server.state is State.CLOSED
    with pytest.raises(ProtocolError, match="cannot send HEARTBEAT in state closed"):
        server.send(Heartbeat(1, 2, 3))


def test_eof_mid_frame_is_an_error_that_counts_the_bytes() -> None:
    client, server = open_pair()
    frame = client.send(Heartbeat(1, 2, 3))
    server.receive_data(frame[:-5])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(ProtocolError, match=f"mid-frame \\({len(frame) - 5} bytes of an incomplete frame\\)"):
        server.next_event()


def test_data_after_eof_is_refused() -> None:
    _, server = pair()
    server.receive_data(b"")
    with pytest.raises(ProtocolError, match="after EOF"):
        server.receive_data(b"WS")


def test_receive_buffer_is_bounded() -> None:
    server = PeerConnection(CLUSTER, "node-b", "server", max_frame_bytes=MAX_HANDSHAKE_FRAME_BYTES)
    assert server.max_buffered_bytes < 2 * 1024 * 1024
    chunk = encode_message(Hello(PROTOCOL_VERSION, CLUSTER, "node-a", 0))
    fits = (server.max_buffered_bytes // len(chunk)) * chunk
    server.receive_data(fits)  # never drained
    with pytest.raises(ProtocolError, match="call next_event\\(\\) until NEED_DATA"):
        server.receive_data(chunk)


def test_goodbye_from_the_peer_ends_its_stream() -> None:
    client, server = open_pair()
    server.receive_data(client.send_many([Heartbeat(1, 1, 1), Goodbye("shutting down")]))
    assert events(server) == [Heartbeat(1, 1, 1), Goodbye("shutting down"), NEED_DATA]
    assert server.state is State.GOODBYE_RECEIVED
    with pytest.raises(ProtocolError, match="cannot send HEARTBEAT in state goodbye-received"):
        server.send(Heartbeat(1, 1, 1))


def test_a_frame_after_goodbye_is_refused() -> None:
    _client, server = open_pair()
    server.receive_data(encode_message(Goodbye("bye")) + encode_message(Heartbeat(1, 1, 1)))
    assert server.next_event() == Goodbye("bye")
    with pytest.raises(ProtocolError, match="peer sent HEARTBEAT in state goodbye-received"):
        server.next_event()


def test_after_our_goodbye_in_flight_frames_are_checked_and_dropped() -> None:
    client, server = open_pair()
    server.send(Goodbye("stepping down"))
    server.receive_data(client.send_many([Heartbeat(1, 1, 1), Goodbye("ok")]))
    server.receive_data(b"")
    assert events(server) == [Goodbye("ok"), CLOSED]
    # Garbage is still garbage after a goodbye.
    client, server = open_pair()
    server.send(Goodbye("stepping down"))
    server.receive_data(b"WS\x09")
    with pytest.raises(ProtocolError, match="unsupported frame version 9"):
        server.next_event()


# -- the whole table, walked -------------------------------------------------------------

# How to put a connection of each role into each state, from the peer's side of the wire.
ROUTES: dict[tuple[Role, State], list[Act]] = {
    ("client", State.START): [],
    ("client", State.HELLO_SENT): [Act.SEND_HELLO],
    ("client", State.OPEN): [Act.SEND_HELLO, Act.RECV_HELLO],
    ("client", State.GOODBYE_SENT): [Act.SEND_HELLO, Act.RECV_HELLO, Act.SEND_GOODBYE],
    ("client", State.GOODBYE_RECEIVED): [Act.SEND_HELLO, Act.RECV_HELLO, Act.RECV_GOODBYE],
    ("client", State.CLOSED): [Act.SEND_HELLO, Act.RECV_HELLO, Act.RECV_GOODBYE, Act.SEND_GOODBYE],
    ("server", State.START): [],
    ("server", State.HELLO_RECEIVED): [Act.RECV_HELLO],
    ("server", State.OPEN): [Act.RECV_HELLO, Act.SEND_HELLO],
    ("server", State.GOODBYE_SENT): [Act.RECV_HELLO, Act.SEND_HELLO, Act.SEND_GOODBYE],
    ("server", State.GOODBYE_RECEIVED): [Act.RECV_HELLO, Act.SEND_HELLO, Act.RECV_GOODBYE],
    ("server", State.CLOSED): [Act.RECV_HELLO, Act.SEND_HELLO, Act.SEND_GOODBYE, Act.RECV_GOODBYE],
}


def do(conn: PeerConnection, act: Act) -> Message | Signal | bytes:
    peer_hello = Hello(PROTOCOL_VERSION, CLUSTER, "node-peer", 0)
    if act is Act.SEND_HELLO:
        return conn.send(conn.hello())
    if act is Act.SEND_GOODBYE:
        return conn.send(Goodbye("bye"))
    if act is Act.SEND_OTHER:
        return conn.send(Heartbeat(1, 1, 1))
    received: dict[Act, Message] = {Act.RECV_HELLO: peer_hello, Act.RECV_GOODBYE: Goodbye("bye")}
    message = received.get(act, Heartbeat(1, 1, 1))
    conn.receive_data(encode_message(message))
    return conn.next_event()


@pytest.mark.parametrize("role_state", list(ROUTES), ids=lambda rs: f"{rs[0]}-{rs[1].value}")
@pytest.mark.parametrize("act", list(Act), ids=lambda a: a.name)
def test_every_state_and_input_follows_the_table(role_state: tuple[Role, State], act: Act) -> None:
    role, state = role_state
    conn = PeerConnection(CLUSTER, "node-me", role)
    for step in ROUTES[role_state]:
        do(conn, step)
    assert conn.state is state
    expected = TRANSITIONS.get((role, state, act))
    if expected is None:
        with pytest.raises(ProtocolError):
            do(conn, act)
        assert conn.state is State.ERROR
        return
    next_state, deliver = expected
    result = do(conn, act)
    assert conn.state is next_state
    if act.name.startswith("RECV"):
        assert (result is not NEED_DATA) == deliver


def test_every_reachable_state_has_a_route() -> None:
    reachable = {(role, s) for (role, _, _), (s, _) in TRANSITIONS.items()} | {
        ("client", State.START),
        ("server", State.START),
    }
    assert reachable <= set(ROUTES)


# -- hostile input -----------------------------------------------------------------------


def valid_session_bytes() -> bytes:
    client = PeerConnection(CLUSTER, "node-a", "client")
    return client.send(client.hello()) + encode_message(Heartbeat(1, 2, 3))


def feed_all(conn: PeerConnection, chunks: list[bytes]) -> list[Message | Signal]:
    out: list[Message | Signal] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        out.extend(events(conn))
    return out


def test_every_flipped_bit_of_a_session_kills_the_connection_with_protocol_error() -> None:
    session = valid_session_bytes()
    for pos in range(len(session)):
        for bit in range(8):
            damaged = bytearray(session)
            damaged[pos] ^= 1 << bit
            server = PeerConnection(CLUSTER, "node-b", "server")
            with pytest.raises(ProtocolError):
                feed_all(server, [bytes(damaged), b""])


@SETTINGS
@given(
    role=st.sampled_from(["client", "server"]),
    prefix=st.booleans(),
    chunks=st.lists(st.binary(max_size=64), max_size=6),
)
def test_random_bytes_raise_only_protocol_error(role: Role, prefix: bool, chunks: list[bytes]) -> None:
    conn = PeerConnection(CLUSTER, "node-b", role)
    if role == "client":
        conn.send(conn.hello())
    # Half the time, start with a valid HELLO so the garbage lands on an open connection.
    lead = [encode_message(Hello(PROTOCOL_VERSION, CLUSTER, "node-a", 0))] if prefix else []
    try:
        got = feed_all(conn, [*lead, *[c for c in chunks if c], b""])
    except ProtocolError as exc:
        assert exc.reason
        assert conn.state is State.ERROR
    else:
        assert got[-1] is CLOSED


def test_importing_the_protocol_does_not_import_trio() -> None:
    code = "import sys, walstore.protocol; sys.exit('trio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or "walstore.protocol imported trio"
