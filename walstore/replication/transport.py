"""TCP for the peer protocol: the only sockets of ``replication/``.

A ``PeerChannel`` drives one sans-IO ``PeerConnection`` over one trio stream: HELLO both
ways first, then messages. Every connection is used one way round: the side that dialled
sends requests (PREPARE, APPEND, FETCH, FORWARD, HEARTBEAT) and the side that accepted
answers them (PROMISE, APPEND_ACK, FETCH_RESULT, FORWARD_RESULT) in order; a HEARTBEAT
(the commit index alone) is the one request with no answer. So a leader dials each
follower for replication, and a follower dials the leader to forward client writes.

Anything a peer sends that is not our protocol (garbage, a bad CRC, an oversized length,
another cluster's id) ends that connection with a logged reason and a counted metric; the
node itself carries on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence

import trio

from walstore import runtime
from walstore.errors import ProtocolError
from walstore.protocol import CLOSED, NEED_DATA, Message, PeerConnection, Signal

log = logging.getLogger("walstore.peer")

RECEIVE_CHUNK_BYTES = 256 * 1024
# An accepted connection that sends nothing for this long is closed: a leader sends a
# heartbeat several times per lease TTL, and a follower's forwarding link redials on use.
INBOUND_IDLE_TIMEOUT_S = 60.0
# Peers are a handful of nodes, each with a few connections; strangers must not be able to
# use up the file descriptors the HTTP server needs.
MAX_INBOUND_CONNECTIONS = 128
# A HELLO is a few dozen bytes: a peer that cannot send one in this time is not a peer.
HANDSHAKE_TIMEOUT_S = 5.0


class PeerClosed(Exception):
    """The connection ended (EOF, reset, or we closed it); not a protocol violation."""


class PeerChannel:
    def __init__(
        self, stream: trio.abc.Stream, conn: PeerConnection, remote: str, *, idle_timeout_s: float = math.inf
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.remote = remote
        self.idle_timeout_s = idle_timeout_s
        self._send_lock = trio.Lock()

    @property
    def peer_id(self) -> str:
        return self.conn.peer_node_id or "?"

    async def send(self, message: Message) -> None:
        await self.send_many((message,))

    async def send_many(self, messages: Sequence[Message]) -> None:
        data = self.conn.send_many(messages)
        # An uncontended trio.Lock.acquire() yields to the scheduler before returning: on a
        # busy leader that is one whole pass over every runnable HTTP task before each
        # APPEND leaves. Take a free lock without yielding; send_all still checkpoints.
        if self._send_lock.locked():
            await self._send_lock.acquire()
        else:
            self._send_lock.acquire_nowait()
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerClosed(f"send to {self.remote}: {exc!r}") from exc
        finally:
            self._send_lock.release()

    async def receive(self) -> Message:
        """The next message; PeerClosed at EOF; ProtocolError for bad bytes."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                try:
                    if self.idle_timeout_s == math.inf:
                        # No cancel scope when there is no timeout: entering and leaving
                        # one costs ~10 us per receive (measured), on every leader link.
                        data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
                    else:
                        with trio.fail_after(self.idle_timeout_s):
                            data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
                except trio.TooSlowError:
                    raise PeerClosed(f"{self.remote} sent nothing for {self.idle_timeout_s}s") from None
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise PeerClosed(f"receive from {self.remote}: {exc!r}") from exc
                self.conn.receive_data(data)
                continue
            if event is CLOSED:
                raise PeerClosed(f"{self.remote} closed the connection")
            assert not isinstance(event, Signal)
            return event

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


async def dial(
    host: str,
    port: int,
    *,
    cluster_id: str,
    node_id: str,
    epoch: int,
    incarnation: str = "",
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> PeerChannel:
    """Connect and exchange HELLOs. Raises OSError, PeerClosed, ProtocolError, TooSlowError.
    The peer's incarnation is then ``channel.conn.peer_incarnation``."""
    with trio.fail_after(timeout_s):
        stream = await runtime.current().network.connect(host, port)
        conn = PeerConnection(cluster_id, node_id, "client", incarnation=incarnation)
        channel = PeerChannel(stream, conn, f"{host}:{port}")
        try:
            await channel.send(channel.conn.hello(epoch))
            await channel.receive()  # the state machine only lets a HELLO through here
        except BaseException:
            await channel.aclose()
            raise
    return channel


Handler = Callable[[PeerChannel], Awaitable[None]]


async def serve_peers(
    host: str,
    port: int,
    *,
    cluster_id: str,
    node_id: str,
    epoch: Callable[[], int],
    handler: Handler,
    on_rejected: Callable[[str], None] = lambda reason: None,
    known_peers: frozenset[str] | None = None,
    incarnation: str = "",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept peer connections; after the HELLO exchange each runs ``handler``. Only node
    ids in ``known_peers`` (when given) are served."""
    open_connections = 0

    network = runtime.current().network

    async def one(stream: trio.abc.Stream) -> None:
        nonlocal open_connections
        if open_connections >= MAX_INBOUND_CONNECTIONS:
            log.warning("refusing a peer connection: %d already open", open_connections)
            on_rejected("too_many_connections")
            await stream.aclose()
            return
        open_connections += 1
        try:
            await serve_one(stream)
        finally:
            open_connections -= 1

    async def serve_one(stream: trio.abc.Stream) -> None:
        remote = network.remote_name(stream)
        conn = PeerConnection(cluster_id, node_id, "server", incarnation=incarnation)
        channel = PeerChannel(stream, conn, remote, idle_timeout_s=INBOUND_IDLE_TIMEOUT_S)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await channel.receive()  # HELLO (anything else is a ProtocolError)
                if known_peers is not None and channel.conn.peer_node_id not in known_peers:
                    raise ProtocolError(
                        f"unknown node id {channel.conn.peer_node_id!r}: not one of the cluster's peers"
                    )
                await channel.send(channel.conn.hello(epoch()))
            await handler(channel)
        except* ProtocolError as group:
            for exc in _leaves(group):
                log.warning("closing peer connection from %s (%s): %s", remote, channel.peer_id, exc)
                on_rejected(_reason_label(str(exc)))
        except* trio.TooSlowError:
            log.warning("closing peer connection from %s: no HELLO within %ss", remote, HANDSHAKE_TIMEOUT_S)
            on_rejected("handshake_timeout")
        except* PeerClosed:
            pass
        finally:
            await channel.aclose()

    listeners, bound = await network.listen(host, port)
    task_status.started(bound)
    await trio.serve_listeners(one, listeners)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _reason_label(reason: str) -> str:
    """A small fixed set of metric labels out of free-form reasons (bounded cardinality)."""
    for key in ("cluster id", "version", "crc", "length", "magic", "unknown node", "unknown", "size", "closed"):
        if key in reason.lower():
            return key.replace(" ", "_")
    return "other"
