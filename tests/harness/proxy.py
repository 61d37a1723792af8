"""A TCP fault proxy: one listening port forwarding to one target, with faults a test can
switch at any moment (pass, delay, drop, blackhole, reset, corrupt; one way or both).

It runs its own trio loop in a background thread, so a plain synchronous test and a
pytest-trio test drive it the same way: every setter is a short blocking call that returns
once the proxy's loop has applied the change (it never awaits the caller's loop, so calling
it from inside another trio run cannot deadlock). Directions are named after who dialled:
``a`` is the side that connected to the proxy, ``b`` is the target.

Fault semantics, per direction:

=============  ==============================================================================
pass           forward every byte as it arrives
delay(s)       every chunk is delivered ``s`` seconds after the proxy read it (order kept)
drop           read and discard: the sender sees a healthy connection, the receiver nothing
blackhole      stop reading and stop writing: bytes wait in kernel buffers and connections stay
               open (a partition TCP has not noticed yet); when healed, the held bytes flow
corrupt(n)     add 1 (mod 256) to every n-th byte of the stream (counted per connection and
               direction; +1 rather than a XOR so corrupting both ways never cancels out)
reset          (whole link) every open connection, and every new one while the mode holds, is
               closed with an RST (SO_LINGER 0): the peer sees ECONNRESET
=============  ==============================================================================

Memory is bounded: each direction of a connection holds at most ``QUEUE_CHUNKS`` chunks of at
most ``CHUNK_BYTES`` read but not yet written (delay and blackhole stop reading when full), and
at most ``MAX_CONNECTIONS`` connections are open at once (more are reset).
"""

from __future__ import annotations

import enum
import math
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from types import TracebackType

import trio

from walstore.errors import ConfigError

CHUNK_BYTES = 64 * 1024
QUEUE_CHUNKS = 16  # with CHUNK_BYTES: at most 1 MiB in flight per connection direction
MAX_CONNECTIONS = 256  # peer links use a handful; this only stops a runaway test
CONNECT_TIMEOUT_S = 5.0
# A setter waits this long for the proxy loop to apply it; the loop only ever does a few
# non-blocking steps per change, so hitting this means the proxy thread is gone.
APPLY_TIMEOUT_S = 5.0
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0

_LINGER_RST = struct.pack("ii", 1, 0)


class Direction(enum.Enum):
    BOTH = "both"
    A_TO_B = "a_to_b"  # from the dialling side to the target
    B_TO_A = "b_to_a"  # from the target back to the dialling side


class Kind(enum.Enum):
    PASS = "pass"
    DELAY = "delay"
    DROP = "drop"
    BLACKHOLE = "blackhole"
    CORRUPT = "corrupt"


@dataclass(frozen=True, slots=True)
class Fault:
    """What one direction does to the bytes it carries."""

    kind: Kind = Kind.PASS
    delay_s: float = 0.0
    corrupt_every: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise ConfigError(f"delay must be a finite number of seconds >= 0, got {self.delay_s}")
        if self.kind is Kind.CORRUPT and self.corrupt_every < 1:
            raise ConfigError(f"corrupt needs every_n_bytes >= 1, got {self.corrupt_every}")


PASS = Fault()


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Counters since start; a snapshot, safe to keep."""

    accepted: int = 0
    active: int = 0
    resets: int = 0  # connections this proxy closed with RST
    forwarded_a_to_b: int = 0
    forwarded_b_to_a: int = 0
    dropped_a_to_b: int = 0
    dropped_b_to_a: int = 0
    corrupted_a_to_b: int = 0  # bytes altered
    corrupted_b_to_a: int = 0


def _directions(direction: Direction) -> tuple[Direction, ...]:
    return (Direction.A_TO_B, Direction.B_TO_A) if direction is Direction.BOTH else (direction,)


def _abort(stream: trio.SocketStream) -> None:
    """Close with an RST instead of a FIN. Synchronous: trio's socket close wakes any task
    blocked on it with ClosedResourceError."""
    sock = stream.socket
    if sock.fileno() == -1:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass  # already dead: closing is all that is left
    sock.close()


class _Link:
    """One proxied connection: the dialling side ``a`` and our connection to the target."""

    def __init__(self, a: trio.SocketStream, b: trio.SocketStream) -> None:
        self.a = a
        self.b = b
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        _abort(self.a)
        _abort(self.b)


class FaultProxy:
    """``FaultProxy(target=(host, port))``: start(), then point a client at ``port``."""

    def __init__(
        self,
        target: tuple[str, int],
        listen_port: int = 0,
        *,
        listen_host: str = "127.0.0.1",
        name: str = "",
    ) -> None:
        self.target = target
        self.listen_host = listen_host
        self.port = listen_port
        self.name = name or f"proxy->{target[0]}:{target[1]}"
        self._faults = {Direction.A_TO_B: PASS, Direction.B_TO_A: PASS}
        self._reset_mode = False
        self._links: set[_Link] = set()
        self._stats = ProxyStats()
        self._stats_changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._changed: trio.Event | None = None

    # -- life cycle (any thread) ---------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise ConfigError(f"{self.name} already started")
        self._thread = threading.Thread(target=self._thread_main, name=self.name, daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise TimeoutError(f"{self.name} did not start within {START_TIMEOUT_S}s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Close every connection and the listener, end the thread. Idempotent."""
        thread, token = self._thread, self._token
        if thread is None or not thread.is_alive() or token is None:
            return
        stop = self._stop
        assert stop is not None
        try:
            token.run_sync_soon(stop.set)
        except trio.RunFinishedError:
            pass
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            raise TimeoutError(f"{self.name} did not stop within {STOP_TIMEOUT_S}s")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    # -- faults (any thread; each returns once applied) -----------------------------------

    def heal(self) -> None:
        """Back to pass both ways; held (blackholed) bytes start flowing again."""
        self.set_fault(PASS, Direction.BOTH)

    def delay(self, seconds: float, direction: Direction = Direction.BOTH) -> None:
        self.set_fault(Fault(Kind.DELAY, delay_s=seconds), direction)

    def drop(self, direction: Direction = Direction.BOTH) -> None:
        self.set_fault(Fault(Kind.DROP), direction)

    def blackhole(self, direction: Direction = Direction.BOTH) -> None:
        self.set_fault(Fault(Kind.BLACKHOLE), direction)

    def corrupt(self, every_n_bytes: int, direction: Direction = Direction.BOTH) -> None:
        self.set_fault(Fault(Kind.CORRUPT, corrupt_every=every_n_bytes), direction)

    def reset(self) -> None:
        """RST every open connection and every new one until ``heal()`` (or another fault)."""

        def apply() -> None:
            self._reset_mode = True
            for link in list(self._links):
                self._abort_link(link)

        self._in_loop(apply)

    def set_fault(self, fault: Fault, direction: Direction = Direction.BOTH) -> None:
        def apply() -> None:
            self._reset_mode = False
            for d in _directions(direction):
                self._faults[d] = fault
            self._wake()

        self._in_loop(apply)

    def retarget(self, target: tuple[str, int]) -> None:
        """New connections go to ``target`` (open ones keep theirs)."""

        def apply() -> None:
            self.target = target

        self._in_loop(apply)

    def fault(self, direction: Direction) -> Fault:
        if direction is Direction.BOTH:
            raise ConfigError("ask for one direction: A_TO_B or B_TO_A")
        return self._faults[direction]

    @property
    def resetting(self) -> bool:
        return self._reset_mode

    # -- observation (any thread) ----------------------------------------------------------

    def stats(self) -> ProxyStats:
        with self._stats_changed:
            return self._stats

    def wait_stats(self, predicate: Callable[[ProxyStats], bool], timeout_s: float = 5.0) -> ProxyStats:
        """Block until ``predicate(stats)`` holds (checked at every change); TimeoutError after
        ``timeout_s`` with the last stats in the message."""
        deadline = time.monotonic() + timeout_s
        with self._stats_changed:
            while not predicate(self._stats):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name}: condition not met within {timeout_s}s; stats {self._stats}")
                self._stats_changed.wait(remaining)
            return self._stats

    # -- inside the proxy's loop -----------------------------------------------------------

    def _in_loop(self, fn: Callable[[], None]) -> None:
        token = self._token
        if token is None or self._thread is None or not self._thread.is_alive():
            raise ConfigError(f"{self.name} is not running")
        if threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # handed to the caller's thread
                failure.append(exc)
            finally:
                done.set()

        token.run_sync_soon(run)
        if not done.wait(APPLY_TIMEOUT_S):
            raise TimeoutError(f"{self.name}: the proxy loop did not apply a change within {APPLY_TIMEOUT_S}s")
        if failure:
            raise failure[0]

    def _count(self, **deltas: int) -> None:
        with self._stats_changed:
            current = self._stats
            self._stats = replace(current, **{k: getattr(current, k) + v for k, v in deltas.items()})
            self._stats_changed.notify_all()

    def _wake(self) -> None:
        # Tasks waiting out a blackhole re-read their direction's fault after every change.
        old, self._changed = self._changed, trio.Event()
        if old is not None:
            old.set()

    def _abort_link(self, link: _Link) -> None:
        if not link.aborted:
            link.abort()
            self._count(resets=1)

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._started.set()  # never leave start() waiting if the loop died early

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        self._changed = trio.Event()
        listeners = await trio.open_tcp_listeners(self.port, host=self.listen_host)
        self.port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._serve_one, listeners)
            self._started.set()
            await self._stop.wait()
            for link in list(self._links):
                link.abort()
            nursery.cancel_scope.cancel()

    async def _serve_one(self, a: trio.SocketStream) -> None:
        self._count(accepted=1)
        if self._reset_mode or len(self._links) >= MAX_CONNECTIONS:
            _abort(a)
            self._count(resets=1)
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                b = await trio.open_tcp_stream(*self.target)
        except (OSError, trio.TooSlowError):
            # The target is down: the dialler sees a reset, like a refused connection.
            _abort(a)
            self._count(resets=1)
            return
        link = _Link(a, b)
        self._links.add(link)
        self._count(active=1)
        try:
            if self._reset_mode:  # reset was switched on while we dialled
                self._abort_link(link)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, link, a, b, Direction.A_TO_B)
                nursery.start_soon(self._pipe, link, b, a, Direction.B_TO_A)
        finally:
            self._links.discard(link)
            self._count(active=-1)
            with trio.CancelScope(shield=True):
                await a.aclose()
                await b.aclose()

    async def _pipe(self, link: _Link, src: trio.SocketStream, dst: trio.SocketStream, direction: Direction) -> None:
        """One direction: a reader task fills a bounded queue, a writer drains it."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUE_CHUNKS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guarded, link, self._read_side, src, send, direction)
            nursery.start_soon(self._guarded, link, self._write_side, dst, receive, direction)

    async def _guarded(self, link: _Link, side: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await side(*args)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # One side broke (or we reset it): the whole connection goes, as TCP's would.
            self._abort_link(link)

    async def _hold_while_blackholed(self, direction: Direction) -> None:
        while self._faults[direction].kind is Kind.BLACKHOLE:
            changed = self._changed
            assert changed is not None
            await changed.wait()

    async def _read_side(
        self, src: trio.SocketStream, send: trio.MemorySendChannel[tuple[float, bytes]], direction: Direction
    ) -> None:
        offset = 0  # stream position, for corrupt's every-n-th byte
        async with send:
            while True:
                await self._hold_while_blackholed(direction)
                data = await src.receive_some(CHUNK_BYTES)
                if not data:
                    return  # EOF: the writer forwards it after the queue drains
                fault = self._faults[direction]
                if fault.kind is Kind.DROP:
                    self._count(**{f"dropped_{direction.value}": len(data)})
                    offset += len(data)
                    continue
                if fault.kind is Kind.CORRUPT:
                    data, altered = _corrupt(data, offset, fault.corrupt_every)
                    self._count(**{f"corrupted_{direction.value}": altered})
                offset += len(data)
                deliver_at = trio.current_time() + (fault.delay_s if fault.kind is Kind.DELAY else 0.0)
                await send.send((deliver_at, data))

    async def _write_side(
        self, dst: trio.SocketStream, receive: trio.MemoryReceiveChannel[tuple[float, bytes]], direction: Direction
    ) -> None:
        async with receive:
            async for deliver_at, data in receive:
                await trio.sleep_until(deliver_at)
                await self._hold_while_blackholed(direction)
                await dst.send_all(data)
                self._count(**{f"forwarded_{direction.value}": len(data)})
            await dst.send_eof()


def _corrupt(data: bytes, offset: int, every: int) -> tuple[bytes, int]:
    """Add 1 to each byte whose 1-based stream position is a multiple of ``every``."""
    first = (every - 1 - offset) % every  # index in ``data`` of the first byte to alter
    if first >= len(data):
        return data, 0
    out = bytearray(data)
    for i in range(first, len(out), every):
        out[i] = (out[i] + 1) & 0xFF
    return bytes(out), len(range(first, len(out), every))
