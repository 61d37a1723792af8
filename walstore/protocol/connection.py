"""One peer connection as a pure state machine, in h11's shape: bytes in, messages out.

    conn = PeerConnection(cluster_id, node_id, role="client")
    sock.send(conn.send(conn.hello(epoch)))
    conn.receive_data(sock.recv())          # b"" means the peer closed (EOF)
    while (event := conn.next_event()) is not NEED_DATA: ...

The transport owns the socket; this object owns the rules. Every transition lives in
``TRANSITIONS``: (role, state, what happened) -> (next state, deliver?). Anything not in
the table is refused. The handshake: the client sends HELLO, the server checks it and
answers with its own HELLO, the client checks that; both are then OPEN. Before OPEN only
HELLO and GOODBYE may cross, and frames are capped at MAX_HANDSHAKE_FRAME_BYTES, so a
stranger on the peer port cannot make us buffer more than a few KiB.

Errors: anything wrong, whether the peer's bytes or our own misuse (sending before the
handshake, sending after GOODBYE), raises ``ProtocolError`` with a reason and kills the
connection: every later call raises again. The transport then sends
``encode_message(Goodbye(reason))`` (stateless) if it wants the peer to know, and closes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Literal, NoReturn

from walstore.errors import ProtocolError
from walstore.protocol.frames import FRAME_HEADER_BYTES, MAX_FRAME_BYTES, FrameDecoder
from walstore.protocol.messages import (
    PROTOCOL_VERSION,
    Bytes,
    FrameType,
    Goodbye,
    Hello,
    Message,
    check_known,
    decode_message,
    encode_parts,
    frame_type_name,
)

Role = Literal["client", "server"]

# HELLO is at most 2 + 8 + 2 * (2 + 256) bytes and GOODBYE 2 + 1024: 4 KiB covers both.
MAX_HANDSHAKE_FRAME_BYTES = 4096
# Room for one socket read past a whole frame; a transport that drains next_event()
# after every receive_data() never comes near it.
RECEIVE_SLACK_BYTES = 1024 * 1024


class Signal(enum.Enum):
    """What next_event() returns when it has no message."""

    NEED_DATA = "NEED_DATA"  # call receive_data() with more bytes first
    CLOSED = "CLOSED"  # the peer closed (EOF) and every frame has been handed out


NEED_DATA = Signal.NEED_DATA
CLOSED = Signal.CLOSED


class State(enum.Enum):
    START = "start"  # nothing exchanged yet
    HELLO_SENT = "hello-sent"  # client: our HELLO is out, waiting for the server's
    HELLO_RECEIVED = "hello-received"  # server: the client's HELLO checked, ours is due
    OPEN = "open"  # handshake done: any message but HELLO, both ways
    GOODBYE_SENT = "goodbye-sent"  # we said goodbye: in-flight frames are checked and dropped
    GOODBYE_RECEIVED = "goodbye-received"  # the peer said goodbye: it must send nothing more
    CLOSED = "closed"  # both said goodbye, or the peer's EOF was handed out
    ERROR = "error"  # a ProtocolError happened; every call raises


class Act(enum.Enum):
    SEND_HELLO = "send HELLO"
    SEND_GOODBYE = "send GOODBYE"
    SEND_OTHER = "send"
    RECV_HELLO = "receive HELLO"
    RECV_GOODBYE = "receive GOODBYE"
    RECV_OTHER = "receive"


def _build_transitions() -> dict[tuple[Role, State, Act], tuple[State, bool]]:
    table: dict[tuple[Role, State, Act], tuple[State, bool]] = {
        ("client", State.START, Act.SEND_HELLO): (State.HELLO_SENT, True),
        ("client", State.HELLO_SENT, Act.RECV_HELLO): (State.OPEN, True),
        ("server", State.START, Act.RECV_HELLO): (State.HELLO_RECEIVED, True),
        ("server", State.HELLO_RECEIVED, Act.SEND_HELLO): (State.OPEN, True),
    }
    roles: tuple[Role, Role] = ("client", "server")
    for role in roles:
        table[(role, State.OPEN, Act.SEND_OTHER)] = (State.OPEN, True)
        table[(role, State.OPEN, Act.RECV_OTHER)] = (State.OPEN, True)
        # Either side may give up with a reason at any point before it closes.
        for state in (State.START, State.HELLO_SENT, State.HELLO_RECEIVED, State.OPEN):
            table[(role, state, Act.SEND_GOODBYE)] = (State.GOODBYE_SENT, True)
            table[(role, state, Act.RECV_GOODBYE)] = (State.GOODBYE_RECEIVED, True)
        # After our GOODBYE the peer may still have frames in flight: they are decoded
        # (garbage still fails) but not delivered; the peer's GOODBYE ends it.
        table[(role, State.GOODBYE_SENT, Act.RECV_HELLO)] = (State.GOODBYE_SENT, False)
        table[(role, State.GOODBYE_SENT, Act.RECV_OTHER)] = (State.GOODBYE_SENT, False)
        table[(role, State.GOODBYE_SENT, Act.RECV_GOODBYE)] = (State.CLOSED, True)
        table[(role, State.GOODBYE_RECEIVED, Act.SEND_GOODBYE)] = (State.CLOSED, True)
    return table


TRANSITIONS = _build_transitions()

_HANDSHAKE_STATES = frozenset({State.START, State.HELLO_SENT, State.HELLO_RECEIVED})


def _send_act(message: Message) -> Act:
    if isinstance(message, Hello):
        return Act.SEND_HELLO
    if isinstance(message, Goodbye):
        return Act.SEND_GOODBYE
    return Act.SEND_OTHER


_RECV_ACTS = {int(FrameType.HELLO): Act.RECV_HELLO, int(FrameType.GOODBYE): Act.RECV_GOODBYE}


def _recv_act(frame_type: int) -> Act:
    return _RECV_ACTS.get(frame_type, Act.RECV_OTHER)


class PeerConnection:
    def __init__(
        self,
        our_cluster_id: str,
        our_node_id: str,
        role: Role,
        *,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        incarnation: str = "",
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        if not our_node_id:
            raise ValueError("our_node_id must not be empty")
        if not MAX_HANDSHAKE_FRAME_BYTES <= max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be within {MAX_HANDSHAKE_FRAME_BYTES}..{MAX_FRAME_BYTES}")
        self.our_cluster_id = our_cluster_id
        self.our_node_id = our_node_id
        self.our_incarnation = incarnation
        self.role: Role = role
        self.max_frame_bytes = max_frame_bytes
        self.max_buffered_bytes = max_frame_bytes + FRAME_HEADER_BYTES + RECEIVE_SLACK_BYTES
        self.peer_node_id: str | None = None  # set once the peer's HELLO is accepted
        self.peer_epoch: int | None = None  # the epoch the peer's HELLO announced
        self.peer_incarnation = ""  # the data-directory incarnation the peer's HELLO named
        self._state = State.START
        self._eof = False
        self._error: ProtocolError | None = None
        self._decoder = FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES, check_header=self._check_header)

    @property
    def state(self) -> State:
        return self._state

    def hello(self, epoch: int = 0) -> Hello:
        """Our HELLO, announcing ``epoch`` (our promised epoch)."""
        return Hello(PROTOCOL_VERSION, self.our_cluster_id, self.our_node_id, epoch, self.our_incarnation)

    # -- receiving ---------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the socket; ``b""`` means the peer closed its side (EOF)."""
        self._raise_if_dead()
        if self._eof:
            self._fail("receive_data() called after EOF")
        if not data:
            self._eof = True
            return
        if self._decoder.buffered_bytes + len(data) > self.max_buffered_bytes:
            self._fail(
                f"receive buffer would hold {self._decoder.buffered_bytes + len(data)} bytes, over "
                f"{self.max_buffered_bytes}: call next_event() until NEED_DATA before receiving more"
            )
        self._decoder.feed(data)

    def next_event(self) -> Message | Signal:
        """The next message from the peer, ``NEED_DATA``, or ``CLOSED`` after EOF."""
        self._raise_if_dead()
        try:
            while True:
                frame = self._decoder.next_frame()
                if frame is None:
                    return self._no_frame()
                message = decode_message(frame)
                next_state, deliver = self._transition(_recv_act(frame.type), frame.type)
                if isinstance(message, Hello) and deliver:
                    self._accept_hello(message)
                self._enter(next_state)
                if deliver:
                    return message
        except ProtocolError as exc:
            self._die(exc)
            raise

    def _no_frame(self) -> Signal:
        if not self._eof:
            return NEED_DATA
        if self._decoder.buffered_bytes:
            self._fail(
                f"peer closed the connection mid-frame ({self._decoder.buffered_bytes} bytes of an incomplete frame)"
            )
        self._state = State.CLOSED
        return CLOSED

    def _check_header(self, frame_type: int, flags: int, length: int) -> None:
        # Runs as soon as a header is in: an unknown type or a frame the state does not
        # allow is refused before its payload is buffered.
        check_known(frame_type, flags)
        self._transition(_recv_act(frame_type), frame_type)

    def _accept_hello(self, hello: Hello) -> None:
        who = repr(hello.node_id)
        if hello.protocol_version != PROTOCOL_VERSION:
            self._fail(
                f"protocol version mismatch: peer {who} speaks {hello.protocol_version}, we speak {PROTOCOL_VERSION}"
            )
        if hello.cluster_id != self.our_cluster_id:
            self._fail(
                f"cluster id mismatch: peer {who} is in cluster {hello.cluster_id!r}, we are in {self.our_cluster_id!r}"
            )
        if not hello.node_id:
            self._fail("peer HELLO has an empty node id")
        if hello.node_id == self.our_node_id:
            self._fail(f"peer claims our own node id {who}: connected to ourselves?")
        self.peer_node_id = hello.node_id
        self.peer_epoch = hello.epoch
        self.peer_incarnation = hello.incarnation

    # -- sending -----------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """The bytes of one frame carrying ``message``; write them to the socket."""
        return self.send_many((message,))

    def send_many(self, messages: Iterable[Message]) -> bytes:
        """Many frames as one buffer: one socket write for a whole burst of APPENDs."""
        self._raise_if_dead()
        parts: list[Bytes] = []
        try:
            for message in messages:
                next_state, _ = self._transition(_send_act(message), message.TYPE, sending=True)
                if isinstance(message, Hello):
                    self._check_our_hello(message)
                encode_parts(message, parts)
                self._enter(next_state)
        except ProtocolError as exc:
            self._die(exc)
            raise
        return b"".join(parts)

    def _check_our_hello(self, hello: Hello) -> None:
        if (hello.protocol_version, hello.cluster_id, hello.node_id) != (
            PROTOCOL_VERSION,
            self.our_cluster_id,
            self.our_node_id,
        ):
            self._fail(
                f"cannot send a HELLO for {hello.node_id!r} in {hello.cluster_id!r} "
                f"v{hello.protocol_version}: "
                f"this connection is {self.our_node_id!r} in {self.our_cluster_id!r} v{PROTOCOL_VERSION}"
            )

    # -- the table ---------------------------------------------------------------------

    def _transition(self, act: Act, frame_type: int, *, sending: bool = False) -> tuple[State, bool]:
        found = TRANSITIONS.get((self.role, self._state, act))
        if found is not None:
            return found
        # The name only for the error: FrameType(x).name on every frame cost ~1 us each.
        name = frame_type_name(frame_type)
        if sending:
            self._fail(f"cannot send {name} in state {self._state.value} ({self.role})")
        if self._state in _HANDSHAKE_STATES:
            self._fail(f"peer sent {name} before the handshake finished (state {self._state.value}, {self.role})")
        self._fail(f"peer sent {name} in state {self._state.value} ({self.role})")

    def _enter(self, state: State) -> None:
        if state is State.OPEN and self._state is not State.OPEN:
            self._decoder.max_payload_bytes = self.max_frame_bytes
        self._state = state

    def _fail(self, reason: str) -> NoReturn:
        exc = ProtocolError(reason)
        self._die(exc)
        raise exc

    def _die(self, exc: ProtocolError) -> None:
        if self._error is None:
            self._error = exc
            self._state = State.ERROR

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise ProtocolError(f"connection already failed: {self._error.reason}")
