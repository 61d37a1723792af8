"""The simulated network: in-memory peer connections between the nodes of one simulation.

Each connection is two one-way pipes. A pipe cuts what is sent into the peer protocol's own
frames (the 16-byte header says how long each is: ``protocol/frames.py``) and delivers each
frame at a time of its own on the virtual clock, so the network can act on whole frames:

- *delay*: every frame takes a random latency; in order unless reordering is on;
- *reorder*: a frame may be held back while later ones overtake it;
- *duplicate*: a frame delivered twice (a replay, which TCP itself never does: the peers
  must refuse it or be idempotent, never act on it twice);
- *drop*: a frame lost. TCP cannot lose bytes and go on, so the connection resets at that
  frame: what was sent before it is delivered, nothing after;
- *epoch_start_drop*: the same, aimed at an APPEND that carries a new leader's EPOCH_START.
  Whether that record reaches a majority decides what an older epoch's entries become
  (Raft's figure 8), and a random drop rarely lands on the one frame that carries it;
- *partition*: a pair of nodes cut apart. New connections between them fail (refused, or
  hang until the dialer's timeout), and open ones either reset at once or go silent for
  good (nothing more is delivered, as on a TCP connection whose packets are blackholed,
  until a timeout closes it);
- *crash*: a node's connections end as the kernel ends them for a killed process: what it
  sent is still delivered, then EOF; what is sent to it fails.
- *pause*: nothing the paused node sends or is sent moves until it resumes.

Everything random comes from the simulation's one seeded ``random.Random``.
"""

from __future__ import annotations

import heapq
import math
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from walstore.protocol.frames import FRAME_HEADER_BYTES
from walstore.protocol.messages import FrameType
from walstore.wal.record import KIND_EPOCH_START, RECORD_HEADER_BYTES, peek_header, record_size

_LENGTH = struct.Struct("<I")
_LENGTH_OFFSET = 8  # the payload length's place in a frame header


@dataclass
class NetworkFaults:
    """Per-frame fault rates (0 disables); latencies in virtual seconds."""

    min_latency_s: float = 0.0002
    max_latency_s: float = 0.002
    reorder: float = 0.0  # chance a frame is held back by up to reorder_delay_s
    reorder_delay_s: float = 0.05
    duplicate: float = 0.0
    drop: float = 0.0


@dataclass
class NetworkCounts:
    frames: int = 0
    dropped: int = 0
    epoch_starts_dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    blackholed: int = 0
    connections: int = 0
    refused: int = 0
    resets: int = 0


_APPEND_FIELDS_BYTES = 32  # epoch, prev index, prev epoch, commit (protocol/messages.py)


def _carries_epoch_start(frame: bytes) -> bool:
    """Whether ``frame`` is an APPEND with an EPOCH_START among its records. The sender
    encoded it, so the record headers are read without checking them."""
    if frame[3] != FrameType.APPEND:
        return False
    offset = FRAME_HEADER_BYTES + _APPEND_FIELDS_BYTES
    while offset + RECORD_HEADER_BYTES <= len(frame):
        header = peek_header(frame, offset)
        if header.kind == KIND_EPOCH_START:
            return True
        offset += record_size(header.body_len)
    return False


class _Pipe:
    """One direction of a connection: frames from ``src`` to ``dst``."""

    def __init__(self, net: SimNetwork, src: str, dst: str) -> None:
        self.net = net
        self.src = src
        self.dst = dst
        self._partial = bytearray()
        self._queue: list[tuple[float, int, bytes]] = []  # (deliver at, seq, frame)
        self._ready = bytearray()  # delivered, not yet read
        self._last_at = 0.0  # in-order delivery: no frame before the previous one
        self._changed = trio.Event()
        self.eof = False  # the sender closed: EOF after what is queued
        self.reset = False  # the connection was reset: both ends fail
        self.silent = False  # blackholed: nothing more is ever delivered
        self.reset_after_queued = False  # a dropped frame: reset once what came before it is read

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.reset or self.eof or self.reset_after_queued:
            raise trio.BrokenResourceError(f"connection {self.src}->{self.dst} is closed")
        self._partial += data
        while len(self._partial) >= FRAME_HEADER_BYTES:
            (length,) = _LENGTH.unpack_from(self._partial, _LENGTH_OFFSET)
            total = FRAME_HEADER_BYTES + length
            if len(self._partial) < total:
                break
            frame = bytes(self._partial[:total])
            del self._partial[:total]
            self._schedule(frame)

    def _schedule(self, frame: bytes) -> None:
        net = self.net
        counts = net.counts
        counts.frames += 1
        if net.is_cut(self.src, self.dst):
            self.go_silent()
        if self.silent:
            counts.blackholed += 1
            return
        faults, rng = net.faults, net.rng
        if faults.drop and rng.random() < faults.drop:
            counts.dropped += 1
            net.note("net", f"drop a frame {self.src}->{self.dst} (type {frame[3]}): the connection resets")
            self.reset_after_queued = True
            self._wake()
            return
        if net.epoch_start_lost is not None and _carries_epoch_start(frame) and net.epoch_start_lost(self.src):
            counts.epoch_starts_dropped += 1
            net.note("net", f"drop an APPEND {self.src}->{self.dst} carrying an EPOCH_START: the connection resets")
            self.reset_after_queued = True
            self._wake()
            return
        copies = 1
        if faults.duplicate and rng.random() < faults.duplicate:
            counts.duplicated += 1
            copies = 2
            net.note("net", f"duplicate a frame {self.src}->{self.dst} (type {frame[3]})")
        now = trio.current_time()
        for _ in range(copies):
            at = now + rng.uniform(faults.min_latency_s, faults.max_latency_s)
            if faults.reorder and rng.random() < faults.reorder:
                counts.reordered += 1
                at += rng.uniform(0.0, faults.reorder_delay_s)  # later frames may overtake it
            else:
                at = max(at, self._last_at)
                self._last_at = at
            net.seq += 1
            heapq.heappush(self._queue, (at, net.seq, frame))
        self._wake()

    def go_silent(self) -> None:
        if not self.silent:
            self.silent = True
            self._queue.clear()
            self._partial.clear()

    def break_(self) -> None:
        self.reset = True
        self._wake()

    def close_send(self) -> None:
        self.eof = True
        self._wake()

    async def receive(self, max_bytes: int) -> bytes:
        while True:
            await self.net.gate(self.dst)
            if self.reset:
                raise trio.BrokenResourceError(f"connection {self.src}->{self.dst} was reset")
            now = trio.current_time()
            while self._queue and self._queue[0][0] <= now:
                self._ready += heapq.heappop(self._queue)[2]
            if self._ready:
                out = bytes(self._ready[:max_bytes])
                del self._ready[:max_bytes]
                return out
            if self.reset_after_queued and not self._queue:
                self.reset = True
                raise trio.BrokenResourceError(f"connection {self.src}->{self.dst} was reset")
            if self.eof and not self._queue:
                return b""
            wake_at = self._queue[0][0] if self._queue else math.inf
            changed = self._changed
            with trio.move_on_at(wake_at):
                await changed.wait()


class SimStream(trio.abc.Stream):
    """One end of a simulated connection."""

    def __init__(self, net: SimNetwork, owner: str, remote_node: str, remote: str, out: _Pipe, into: _Pipe) -> None:
        self._net = net
        self.owner = owner
        self.remote_node = remote_node
        self.remote = remote  # host:port, for log lines
        self._out = out
        self._in = into
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        await self._net.gate(self.owner)
        self._out.send(data)
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        return await self._in.receive(max_bytes or 65536)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.close_send()
            self._in.break_()  # what the other end sends now fails
            self._net.forget(self)
        await trio.lowlevel.checkpoint()


class _Listener(trio.abc.Listener[SimStream]):
    def __init__(self, net: SimNetwork, owner: str, address: tuple[str, int]) -> None:
        self._net = net
        self.owner = owner
        self.address = address
        self._send, self._receive = trio.open_memory_channel[SimStream](math.inf)
        self.closed = False

    def offer(self, stream: SimStream) -> None:
        self._send.send_nowait(stream)

    async def accept(self) -> SimStream:
        if self.closed:
            raise trio.ClosedResourceError("listener closed")
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._net.unlisten(self)
            self._send.close()


class Endpoint:
    """One node's view of the network: ``walstore.runtime.Network``."""

    def __init__(self, net: SimNetwork, node_id: str) -> None:
        self._net = net
        self.node_id = node_id

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        return await self._net.connect(self.node_id, host, port)

    async def listen(self, host: str, port: int) -> tuple[list[trio.abc.Listener[Any]], int]:
        return [self._net.listen(self.node_id, host, port)], port

    def remote_name(self, stream: trio.abc.Stream) -> str:
        return stream.remote if isinstance(stream, SimStream) else "?"


@dataclass
class SimNetwork:
    rng: random.Random
    note: Callable[[str, str], None]
    faults: NetworkFaults = field(default_factory=NetworkFaults)
    counts: NetworkCounts = field(default_factory=NetworkCounts)
    seq: int = 0
    # Asked, with the sender, about each APPEND that carries an EPOCH_START: True drops it
    # (the nemesis decides, and may kill the sender before it resends).
    epoch_start_lost: Callable[[str], bool] | None = None
    # Pairs cut apart, and whether new connections between them are refused (True) or hang.
    _cuts: dict[frozenset[str], bool] = field(default_factory=dict)
    _listeners: dict[tuple[str, int], _Listener] = field(default_factory=dict)
    # A dict, not a set: iteration in creation order keeps a seed's run the same run.
    _streams: dict[SimStream, None] = field(default_factory=dict)
    _paused_until: dict[str, float] = field(default_factory=dict)

    def endpoint(self, node_id: str) -> Endpoint:
        return Endpoint(self, node_id)

    # -- faults ---------------------------------------------------------------------------

    def is_cut(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._cuts

    def cut(self, a: str, b: str, *, reset: bool) -> None:
        """Partition a from b. ``reset``: open connections reset and new ones are refused;
        otherwise open connections go silent and new ones hang."""
        self._cuts[frozenset((a, b))] = reset
        for stream in list(self._streams):
            if {stream.owner, stream.remote_node} == {a, b}:
                if reset:
                    self.counts.resets += 1
                    stream._out.break_()
                    stream._in.break_()
                else:
                    stream._out.go_silent()
                    stream._in.go_silent()

    def heal(self, a: str, b: str) -> None:
        self._cuts.pop(frozenset((a, b)), None)

    def heal_all(self) -> None:
        self._cuts.clear()

    def crash(self, node_id: str) -> None:
        """The node's process is gone: its listeners close, its connections end."""
        for listener in [x for x in self._listeners.values() if x.owner == node_id]:
            listener.close()
        for stream in [s for s in self._streams if s.owner == node_id]:
            stream._closed = True
            stream._out.close_send()
            stream._in.break_()
            self._streams.pop(stream, None)

    def pause(self, node_id: str, until: float) -> None:
        self._paused_until[node_id] = max(until, self._paused_until.get(node_id, 0.0))

    def paused_until(self, node_id: str) -> float:
        return self._paused_until.get(node_id, 0.0)

    async def gate(self, node_id: str) -> None:
        """Hold a paused node's I/O until it resumes."""
        until = self._paused_until.get(node_id, 0.0)
        if until > trio.current_time():
            await trio.sleep_until(until)

    # -- connections ----------------------------------------------------------------------

    def listen(self, node_id: str, host: str, port: int) -> _Listener:
        address = (host, port)
        old = self._listeners.get(address)
        if old is not None and not old.closed:
            raise OSError(98, f"address {host}:{port} already in use")
        listener = _Listener(self, node_id, address)
        self._listeners[address] = listener
        return listener

    def unlisten(self, listener: _Listener) -> None:
        if self._listeners.get(listener.address) is listener:
            del self._listeners[listener.address]

    async def connect(self, src: str, host: str, port: int) -> SimStream:
        await self.gate(src)
        listener = self._listeners.get((host, port))
        dst = listener.owner if listener is not None else host
        refused = self._cuts.get(frozenset((src, dst)))
        if refused is False:
            await trio.sleep_forever()  # blackholed: the dialer's own timeout ends this
        if listener is None or listener.closed or refused:
            self.counts.refused += 1
            await trio.lowlevel.checkpoint()
            raise ConnectionRefusedError(111, f"connection to {host}:{port} refused")
        await trio.sleep(self.rng.uniform(self.faults.min_latency_s, self.faults.max_latency_s))
        if listener.closed:
            raise ConnectionRefusedError(111, f"connection to {host}:{port} refused")
        out, back = _Pipe(self, src, dst), _Pipe(self, dst, src)
        client = SimStream(self, src, dst, f"{host}:{port}", out, back)
        server = SimStream(self, dst, src, f"{src}:{40000 + self.counts.connections % 20000}", back, out)
        self._streams[client] = None
        self._streams[server] = None
        self.counts.connections += 1
        listener.offer(server)
        return client

    def forget(self, stream: SimStream) -> None:
        self._streams.pop(stream, None)
