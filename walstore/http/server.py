"""The HTTP/1.1 server: our sans-IO request parser (``parser.py``) driven by trio sockets.

This is the only module of ``http/`` that touches sockets. It reads a request (head, then a
bounded body), hands a ``Request`` to the application's ``handle()`` and writes the
``Response`` back; it knows nothing about events. A large batch body is the exception: the
handler reads it as it arrives (``Request.body_stream``), so it is checked without being
held whole. Modelled on hypercorn's trio
``tcp_server``, but thin.

What a connection goes through, and what ends it:

- Waiting for a request: ``header_timeout_s`` on a new connection, ``idle_timeout_s``
  between keep-alive requests; expiry closes silently.
- The head (request line + headers) must arrive whole within ``header_timeout_s`` of its
  first byte (of the connection, for the first request) (slowloris), else 408 and close;
  over ``max_header_bytes``, complete or not, is 431 and close.
- The body: ``Content-Length`` over ``max_body_bytes`` (``max_batch_body_bytes`` for a
  POST to ``/events/batch``: 413 ``batch_too_large``) is answered 413 at once, unread;
  a batch over ``max_body_bytes`` (or chunked) while ``max_batch_requests`` others are
  read or handled is answered 503 ``batches_busy`` (``Retry-After: 1``), unread;
  a chunked body is counted as its chunk sizes arrive and cut off the same way. The whole
  body must arrive within ``body_timeout_s`` (else 408). ``Expect: 100-continue`` gets its
  ``100 Continue`` when the server starts waiting for a body none of which has arrived.
- Malformed requests get 400 (501 for a transfer coding other than chunked, 505 for an
  HTTP version other than 1.0 and 1.1) and close; ``parser.py`` lists what is accepted.
- The handler runs under ``request_timeout_s`` (else 504 ``request_timeout``: for a write
  the outcome is unknown). An exception from it is logged and answered 500.
- Writing an answer may take ``write_timeout_s``; a client that does not read it is closed.
- Keep-alive and pipelining: the next request is parsed only after the response to the
  previous one is written. ``Connection: close`` is honoured; HTTP/1.0 gets one answer.
- A streaming response (Server-Sent Events) runs until the application's stream function
  returns, the client closes, or the server shuts down; then the connection closes.
- After an error answer the server half-closes and drains briefly (``LINGER_S``) before
  closing: closing a socket with unread input makes the kernel send RST, which can destroy
  the answer before the client reads it.
- Over ``max_connections`` a new connection gets a fixed 503 and is closed.

Timeouts are enforced by one watchdog task per server, not by a cancel scope per wait: a
connection keeps its current phase and deadline in plain attributes, and the watchdog,
waking every ``watchdog_tick_s(limits)`` (a tenth of the shortest timeout, within
50 ms..1 s), cancels the one scope of each connection past its deadline. The phase that
ran out decides the outcome (idle: close; head or body: 408; handler: 504; write: close).
So a timeout fires up to one tick late. Measured: two ``move_on_after`` per request cost
~12 % of a small request's CPU (contextlib wrappers and the deadline heap).

Sockets are read and written with ``os.read``/``os.write`` on the non-blocking descriptor,
waiting with ``trio.lowlevel.wait_readable``/``wait_writable`` only when the kernel says
``EAGAIN``. Measured on a bare echo server (2 cores, wrk -c64): SocketStream 12.8k req/s,
trio socket recv/send 18.7k, this 25k. Every request still passes one scheduling point
(the wait for its bytes, or an explicit checkpoint for a pipelined one), so one client
cannot hold the event loop.

Graceful stop (SIGTERM): ``HttpServer.shutdown()`` (or setting the ``shutdown`` event
given to ``serve_http``) stops accepting, ends streams, lets in-flight requests finish with
``Connection: close`` for up to ``shutdown_grace_s``, then cancels what is left and returns.
It never resets a connection, because a client cannot tell a reset from a lost answer, but
it can retry a request on a clean close between requests:

- Connections the kernel completed but nobody accepted yet (the listen backlog) would be
  reset by closing the listener, so they are accepted first, in one synchronous loop right
  before the close. Each waits up to ``SHUTDOWN_FIRST_REQUEST_S`` for its request and
  answers it 503 ``shutting_down`` with ``Connection: close``. Linux has no way to stop
  listening without resetting a handshake that completes at that very instant, so a
  connection made in those microseconds can still be reset; idle connections are closed
  only after the listeners, so that their clients' immediate reconnects are refused
  (definite) rather than caught in that instant.
- An idle keep-alive connection (between requests) with a request already in the kernel
  gets that request read and answered 503 ``shutting_down``, ``Connection: close``. With
  nothing there it is closed cleanly: FIN first, then a lingering drain (``LINGER_S``).
  Bytes that arrive after the FIN are read and dropped, never served and never reset, so
  the client sees a clean end of stream and may safely send the request again elsewhere.
- A request whose head had begun to arrive is served (the application decides what a
  stopping node answers), then the connection closes the same clean way.

Probes that strangers cannot starve: the cap above answers everything, ``/health/live``
included, with the fixed 503, so whoever can open ``max_connections`` idle connections
could make Kubernetes restart the pod. The node therefore serves the probe paths on a
second, optional port (``PROBE_PORT``) through a second ``HttpServer``: its own small cap
and short timeouts (``probe_limits``), only GET/HEAD of the health paths and ``/metrics``
(``walstore.http.app.ProbeApp``). The two servers share nothing but the process, so a
flood of either port cannot use up the other's connections. Chosen over reserving capacity
on the main port (accept past the cap, read the head within a short deadline, serve it only
if it is a probe): that reserve is itself a shared pool a stranger fills with slow heads, it
puts a parser and a deadline in front of every rejection, and a probe could still queue
behind a flood in the backlog. The probe port is reachable only by the kubelet in the
manifests (no Service lists it, no NetworkPolicy rule admits it from pods).

Nothing a client sends can stop the server: every exception inside a connection is
contained there and logged (network breakage at debug level, anything else with its
traceback).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, Protocol, TypeVar

import orjson
import trio

from walstore.errors import ConfigError
from walstore.http.parser import HttpParseError, RequestHead, RequestParser

log = logging.getLogger(__name__)

# One read: a small request arrives in one call; a 1 MiB body in 16.
RECEIVE_BYTES: Final = 64 * 1024
# The lingering close after an error answer: bounded in time and bytes so a client
# streaming a huge body cannot keep the server reading it.
LINGER_S: Final = 1.0
LINGER_MAX_BYTES: Final = 1024 * 1024
# Over-capacity rejections are cheap but each holds a socket while it lingers; beyond
# this many at once, further connections are closed without an answer.
MAX_PENDING_REJECTIONS: Final = 256
# A connection accepted from the backlog at shutdown waits this long for its first request
# (already on the way, usually) to answer it 503 instead of closing under it.
SHUTDOWN_FIRST_REQUEST_S: Final = 1.0
# accept() failing with these means the process or kernel is out of descriptors or memory:
# wait and retry instead of crashing the server (trio.serve_listeners does the same).
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))

# The watchdog wakes every tenth of the shortest timeout: a timeout fires at most 10 % late
# (one tick), never more often than 20 times a second, at least once a second.
WATCHDOG_MIN_TICK_S: Final = 0.05
WATCHDOG_MAX_TICK_S: Final = 1.0

JSON_CONTENT_TYPE: Final = b"application/json"
# The one POST target whose body may exceed max_body_bytes, up to max_batch_body_bytes.
BATCH_PATH: Final = b"/events/batch"
_STATUS_LINES: Final = {s.value: b"HTTP/1.1 %d %b\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

SendChunk = Callable[[bytes], Awaitable[None]]
"""Writes one chunk of a streaming response (bounded by ``write_timeout_s``)."""
StreamBody = Callable[[SendChunk], Awaitable[None]]
"""Produces a streaming response body by calling ``send`` until it returns."""


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-connection bounds. Every default has its reason."""

    # one event (POST /events) and everything but a batch; a bigger body is answered 413
    # without reading it
    max_body_bytes: int = 1024 * 1024
    # POST /events/batch: 10,000 events of ~1.6 KiB (the node's MAX_BATCH_BYTES)
    max_batch_body_bytes: int = 16 * 1024 * 1024
    # batches with a body over max_body_bytes (or chunked) read or handled at once; one
    # more is answered 503 batches_busy unread: a 16 MiB batch peaks at ~70 MiB of the
    # server's memory (README, "Batch limits and memory"), so 4 bound that to ~300 MiB
    max_batch_requests: int = 4
    # request line + headers + blank line, complete or still arriving; nginx allows 4 x 8 KiB,
    # Apache 8 KiB per line: 16 KiB fits every real client; more is 431
    max_header_bytes: int = 16 * 1024
    # a request head must arrive whole within this (slowloris); curl sends it in one packet
    header_timeout_s: float = 10.0
    # a 1 MiB body over a slow mobile link still fits; a stalled upload cannot pin a task
    body_timeout_s: float = 30.0
    # keep-alive connections with no request are closed after this (nginx uses 75 s)
    idle_timeout_s: float = 60.0
    # a handler (an append waiting for quorum, a min_index wait) answers within this, or 504
    request_timeout_s: float = 30.0
    # a client that stops reading its responses cannot hold a task and its buffers
    write_timeout_s: float = 30.0
    # sockets are file descriptors: the cap keeps the node serving below its fd limit
    max_connections: int = 10_000
    # in-flight requests finish at SIGTERM within this, below Kubernetes' default 30 s grace
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"HttpLimits.{name} must be > 0, got {value!r}")


def probe_limits() -> HttpLimits:
    """The probe port's limits: the kubelet opens a connection per probe and Prometheus
    one per scrape, and neither sends a body, so a small cap and short timeouts serve them
    while a stranger who does get in holds a slot for seconds, not minutes."""
    return HttpLimits(
        max_body_bytes=1024,  # probes send no body
        max_header_bytes=8 * 1024,
        header_timeout_s=2.0,  # a probe's head is one packet; its own timeout is 2-3 s
        body_timeout_s=2.0,
        idle_timeout_s=10.0,  # below a 15 s scrape interval: idle scrapers do not pile up
        request_timeout_s=5.0,  # /metrics renders in milliseconds
        write_timeout_s=5.0,
        max_connections=64,  # 3 probes and a scraper, with room for retries
        shutdown_grace_s=1.0,  # probes are answered at once; nothing long to wait for
    )


class BodyStream(Protocol):
    """A large request body that the handler reads as it arrives (``Request.body_stream``)."""

    async def next_piece(self) -> bytes | None:
        """The body's next bytes (at least one), or None once all of it was returned.
        Waits under the body's deadline; a malformed or cut-off body raises HttpParseError."""
        ...


class Request:
    """One parsed request. Header names are lowercase bytes.

    The body is read in full before the handler runs (``body``), except a large batch body
    (over ``max_body_bytes``, or chunked, to ``BATCH_PATH``): then ``body`` is b"" and the
    handler reads ``body_stream``. A handler that answers before reading it all closes the
    connection after its answer."""

    __slots__ = ("body", "body_stream", "content_type", "headers", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        content_type: str | None,
        body_stream: BodyStream | None = None,
    ) -> None:
        self.method = method
        self.path = path  # still percent-encoded
        self.query = query  # the raw bytes after "?"
        self.headers = headers
        self.body = body
        self.content_type = content_type
        self.body_stream = body_stream

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Response:
    """What a handler answers. ``stream`` set: a streaming body (``body`` is ignored and
    the length is unknown, so HTTP/1.1 chunked framing is used); ``route`` is the route
    template, for metrics."""

    __slots__ = ("body", "content_type", "headers", "route", "status", "stream")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: bytes = JSON_CONTENT_TYPE,
        headers: list[tuple[bytes, bytes]] | None = None,
        stream: StreamBody | None = None,
        route: str = "",
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.stream = stream
        self.route = route


def json_response(
    status: int, obj: object, *, headers: list[tuple[bytes, bytes]] | None = None, route: str = ""
) -> Response:
    return Response(status, orjson.dumps(obj), headers=headers, route=route)


def error_body(code: str, message: str, details: dict[str, object] | None = None) -> bytes:
    """``{"success": false, "error": {"code", "message", ...details}}``."""
    error: dict[str, object] = {"code": code, "message": message}
    if details:
        for key, value in details.items():
            error.setdefault(key, value)
    # default=str: details come from exceptions and must never make the answer itself fail
    return orjson.dumps({"success": False, "error": error}, default=str)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    route: str = "",
    **details: object,
) -> Response:
    return Response(status, error_body(code, message, details), headers=headers, route=route)


class RequestHandler(Protocol):
    """The application the server drives (``walstore.http.app.HttpApp``)."""

    async def handle(self, request: Request) -> Response: ...


class _DateHeader:
    """RFC 9110 wants a Date header; formatting one per request is wasted work, so the
    value is rebuilt once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


_date = _DateHeader()


def _over_capacity_answer() -> bytes:
    body = error_body("too_many_connections", "the server is at its connection limit; retry")
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


_OVER_CAPACITY_ANSWER: Final = _over_capacity_answer()


def _shutting_down_answer() -> bytes:
    body = error_body("shutting_down", "this node is shutting down; retry on another node")
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


_SHUTTING_DOWN_ANSWER: Final = _shutting_down_answer()


def _batches_busy_answer() -> bytes:
    body = error_body("batches_busy", "this node is reading as many large batches as it takes at once; retry")
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


_BATCHES_BUSY_ANSWER: Final = _batches_busy_answer()
_NETWORK_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError)


def _only_network_errors(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_network_errors(inner) for inner in exc.exceptions)
    return isinstance(exc, _NETWORK_ERRORS)


async def _linger(stream: trio.SocketStream) -> None:
    with trio.move_on_after(LINGER_S):
        try:
            await stream.send_eof()
            drained = 0
            while drained < LINGER_MAX_BYTES:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return
                drained += len(data)
        except _NETWORK_ERRORS:
            pass


def watchdog_tick_s(limits: HttpLimits) -> float:
    """How often the watchdog checks deadlines: a timeout fires up to this much late."""
    shortest = min(
        limits.header_timeout_s,
        limits.body_timeout_s,
        limits.idle_timeout_s,
        limits.request_timeout_s,
        limits.write_timeout_s,
    )
    return min(max(shortest / 10, WATCHDOG_MIN_TICK_S), WATCHDOG_MAX_TICK_S)


class HttpServer:
    """Accepts connections, runs one ``_Connection`` task per client and one watchdog
    task that enforces their timeouts."""

    def __init__(self, app: RequestHandler, *, limits: HttpLimits) -> None:
        self.app = app
        self.limits = limits
        self.port: int | None = None
        self._connections: set[_Connection] = set()
        self._closing = False
        self._accept_scope: trio.CancelScope | None = None
        self._pending_rejections = 0
        # Requests to BATCH_PATH with a body over max_body_bytes (or chunked) being read or
        # handled: at most limits.max_batch_requests (each may cost several of its bodies).
        self.batch_requests = 0

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def shutdown(self) -> None:
        """Begin a graceful stop; ``serve()`` returns once in-flight requests are done."""
        if self._closing:
            return
        self._closing = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()  # serve() closes the listeners, then the idle connections
        else:
            self._close_idle_connections()

    def _close_idle_connections(self) -> None:
        for connection in list(self._connections):
            connection.on_shutdown()

    async def serve(
        self, *, host: str, port: int, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind (port 0: any free port), report the bound port, serve until shutdown() or
        cancellation."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            self.port = int(listeners[0].socket.getsockname()[1])
            async with trio.open_nursery() as watchdog:
                watchdog.start_soon(self._watchdog)
                async with trio.open_nursery() as connections:
                    with trio.CancelScope() as accept_scope:
                        self._accept_scope = accept_scope
                        if self._closing:
                            accept_scope.cancel()
                        async with trio.open_nursery() as acceptors:
                            for listener in listeners:
                                acceptors.start_soon(self._accept_loop, listener, connections)
                            task_status.started(self.port)
                    # Shutting down: take what the kernel already accepted, close the
                    # listeners (no await in between, so nothing new queues up unseen), then
                    # give the connections their grace period; the nursery exits when the
                    # last one closes.
                    for listener in listeners:
                        self._take_backlog(listener, connections)
                        listener.socket.close()
                    # Only now: a client whose idle connection is closed reconnects at once,
                    # and must find the port closed (refused: definite), not a listener
                    # about to close under its fresh connection (reset).
                    self._close_idle_connections()
                    connections.cancel_scope.deadline = trio.current_time() + self.limits.shutdown_grace_s
                watchdog.cancel_scope.cancel()
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

    async def _watchdog(self) -> None:
        tick = watchdog_tick_s(self.limits)
        connections = self._connections
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for connection in connections:
                if connection.deadline < now:
                    connection.expire()

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept() failed: %s; retrying in 100 ms", exc)
                await trio.sleep(0.1)
                continue
            if len(self._connections) >= self.limits.max_connections:
                if self._pending_rejections < MAX_PENDING_REJECTIONS:
                    self._pending_rejections += 1
                    connections.start_soon(self._reject_over_capacity, stream)
                else:
                    stream.socket.close()
                continue
            # Counted here, not when the task starts, so a burst of accepts cannot pass the cap.
            connection = _Connection(self, stream)
            self._connections.add(connection)
            connections.start_soon(self._run_connection, connection)

    def _take_backlog(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        """Accept every connection waiting in ``listener``'s backlog, synchronously: closing
        a listener resets them, and their clients may already have sent a request. They are
        served as closing connections (503 ``shutting_down``), whatever the cap."""
        # A duplicate descriptor of the same (non-blocking) socket: stdlib accept() without
        # an await, so the listener can be closed right after the last one.
        with socket.socket(fileno=os.dup(listener.socket.fileno())) as backlog:
            while True:
                try:
                    raw, _ = backlog.accept()
                except OSError:  # BlockingIOError: the backlog is empty
                    return
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
                connection = _Connection(self, stream)
                self._connections.add(connection)
                connections.start_soon(self._run_connection, connection)

    async def _reject_over_capacity(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(self.limits.write_timeout_s):
                await stream.send_all(_OVER_CAPACITY_ANSWER)
                await _linger(stream)
        except _NETWORK_ERRORS:
            pass
        finally:
            self._pending_rejections -= 1
            await trio.aclose_forcefully(stream)

    async def _run_connection(self, connection: _Connection) -> None:
        try:
            await connection.run()
        except Exception as exc:
            if _only_network_errors(exc):
                log.debug("HTTP connection %s ended: %r", connection.peer(), exc)
            else:
                log.exception("HTTP connection %s failed", connection.peer())
        finally:
            connection.deadline = math.inf
            self._connections.discard(connection)
            await trio.aclose_forcefully(connection.stream)


# What a connection is doing: the watchdog records the phase whose deadline passed, and
# the connection answers accordingly (see _Connection.run).
_IDLE: Final = 0  # waiting for the first byte of a request
_HEAD: Final = 1  # reading a request head
_BODY: Final = 2  # reading a request body
_HANDLER: Final = 3  # the application is handling the request
_WRITE: Final = 4  # writing (a blocked write: the client is not reading)
_STREAM: Final = 5  # a streaming response, between chunks (no deadline)
_LINGER: Final = 6  # draining after an error answer
_T = TypeVar("_T")
_NOT_EXPIRED: Final = -1

# What follows an answer that had to wait for a fresh cancel scope.
_THEN_CONTINUE: Final = 0
_THEN_CLOSE: Final = 1
_THEN_LINGER: Final = 2
_THEN_SHUTDOWN: Final = 3  # closing between requests: _close_for_shutdown

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_checkpoint = trio.lowlevel.checkpoint


class _Connection:
    """One client connection.

    ``run()`` serves requests inside one cancel scope for the connection's life; the
    watchdog cancels it when ``deadline`` passes, recording ``phase`` in ``expired``. An
    answer still owed after that (504, 408) is written in a new scope. The code checks
    ``expired`` after every wait that returned normally: a deadline that passed just as
    the wait ended is handled like one that passed during it.
    """

    __slots__ = (
        "app",
        "deadline",
        "expired",
        "fd",
        "head_only",
        "holds_batch_slot",
        "keep_alive",
        "limits",
        "parser",
        "pending",
        "phase",
        "responding",
        "scope",
        "served",
        "server",
        "stream",
        "stream_scope",
    )

    def __init__(self, server: HttpServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.app = server.app
        self.limits = limits = server.limits
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.parser = RequestParser(
            limits.max_header_bytes, limits.max_body_bytes, {BATCH_PATH: limits.max_batch_body_bytes}
        )
        self.phase = _IDLE
        self.deadline = math.inf
        self.expired = _NOT_EXPIRED
        # Made here, entered by run(): a shutdown before the task starts still lands.
        self.scope = trio.CancelScope()
        # An encoded answer owed after the scope ran out, and what follows it.
        self.pending: tuple[bytes, int] | None = None
        # The current request's: keep the connection after it; a HEAD request.
        self.keep_alive = False
        self.head_only = False
        # A request has been answered (later waits for a head are keep-alive idle waits).
        self.served = False
        # True once the first byte of an answer to the current request may have been sent:
        # from then on an error can only close the connection.
        self.responding = False
        self.stream_scope: trio.CancelScope | None = None
        # This connection's request is a large batch, counted in server.batch_requests.
        self.holds_batch_slot = False

    def peer(self) -> str:
        try:
            host, port, *_ = self.stream.socket.getpeername()
        except (OSError, ValueError):
            return "?"
        return f"{host}:{port}"

    def expire(self) -> None:
        """The deadline of the current phase passed (watchdog) or shutdown wants an idle
        connection gone: cancel the connection's scope, remembering the phase."""
        if self.expired == _NOT_EXPIRED:
            self.expired = self.phase
            self.deadline = math.inf
            self.scope.cancel()

    def on_shutdown(self) -> None:
        # A connection between requests closes now; one inside a request finishes it.
        if self.phase == _IDLE:
            self.expire()
        if self.stream_scope is not None:
            self.stream_scope.cancel()

    async def run(self) -> None:
        scope = self.scope
        limits = self.limits
        while True:
            with scope:
                await self._serve()
                return
            # Only the cancellation of our own scope (watchdog, shutdown) gets here;
            # one from outside (the server's grace period) propagates.
            expired = self.expired
            self.expired = _NOT_EXPIRED
            if self.pending is None:
                if expired == _HANDLER:
                    keep_alive = self.keep_alive and not self.server.closing
                    response = error_response(
                        504,
                        "request_timeout",
                        f"the request did not finish within {limits.request_timeout_s} s; a write may still be applied",
                        headers=[(b"retry-after", b"1")],
                    )
                    data = _encode_response(response, keep_alive=keep_alive, head_only=self.head_only)
                    self.pending = (data, _THEN_CONTINUE if keep_alive else _THEN_CLOSE)
                elif expired in (_HEAD, _BODY):
                    if expired == _HEAD:
                        response = error_response(
                            408, "header_timeout", f"request head not received within {limits.header_timeout_s} s"
                        )
                    else:
                        response = error_response(
                            408, "body_timeout", f"request body not received within {limits.body_timeout_s} s"
                        )
                    self.pending = (_encode_response(response, keep_alive=False), _THEN_LINGER)
                elif expired == _IDLE and self.server.closing and not self.parser.has_buffered:
                    self.pending = (b"", _THEN_SHUTDOWN)
                elif not (expired == _IDLE and self.parser.has_buffered):
                    return  # idle, a write the client does not take, the linger: close
                # else: a request arrived just as the idle deadline passed: serve it
            self.scope = scope = trio.CancelScope()

    async def _serve(self) -> None:
        try:
            if self.pending is not None:
                data, then = self.pending
                self.pending = None
                if then == _THEN_LINGER:
                    await self._answer_and_linger(data)
                    return
                if then == _THEN_SHUTDOWN:
                    await self._close_for_shutdown()
                    return
                self.responding = True
                self.phase = _WRITE
                self.deadline = trio.current_time() + self.limits.write_timeout_s
                await self._send(data)
                self.responding = False
                self.served = True
                if then == _THEN_CLOSE:
                    return
            await self._serve_requests()
        except HttpParseError as exc:
            if not self.responding:
                await self._answer_and_linger(_encode_response(_parse_error_response(exc), keep_alive=False))

    async def _serve_requests(self) -> None:
        limits = self.limits
        server = self.server
        app = self.app
        parser = self.parser
        try:
            while True:
                self._release_batch_slot()  # the previous request's answer is out
                head = await self._receive_head()
                if head is None:
                    return
                path, _, query = head.target.partition(b"?")
                # Only a batch may be this large: at most max_batch_requests at once, each
                # read by its handler as it arrives (the handler's deadline starts at its end).
                stream: _BodyStream | None = None
                if (head.chunked or head.content_length > limits.max_body_bytes) and path == BATCH_PATH:
                    if not self._take_batch_slot():
                        await self._answer_and_linger(_BATCHES_BUSY_ANSWER)
                        return
                    stream = _BodyStream(self, head)
                    body = b""
                    self.phase = _BODY
                    self.deadline = trio.current_time() + limits.body_timeout_s
                else:
                    whole = parser.next_body() if head.content_length or head.chunked else b""
                    body = await self._receive_body(head) if whole is None else whole
                    self.phase = _HANDLER
                    self.deadline = trio.current_time() + limits.request_timeout_s
                request = Request(
                    head.method, path.decode("ascii"), query, head.headers, body, head.content_type, stream
                )
                del body  # the request holds it; a handler may drop it once parsed
                self.keep_alive = keep_alive = head.keep_alive
                self.head_only = head_only = head.method == "HEAD"
                try:
                    response = await app.handle(request)
                except Exception:
                    log.exception("handler failed for %s %s", head.method, request.path)
                    response = error_response(500, "internal_error", "internal server error")
                keep_alive = keep_alive and not server.closing
                # Answered before the whole body came (refused as it arrived): the rest of
                # it is unread, so this answer ends the connection, after a lingering drain.
                unread_body = stream is not None and not stream.done
                keep_alive = keep_alive and not unread_body
                if response.stream is not None and not head_only:
                    if self.expired != _NOT_EXPIRED:
                        await _checkpoint()  # the deadline passed as it returned: 504
                    await self._send_stream(response, chunked=head.http_version == b"1.1")
                    return
                data = _encode_response(response, keep_alive=keep_alive, head_only=head_only)
                if self.expired != _NOT_EXPIRED:
                    # The deadline passed just as the handler returned: its answer is here, so
                    # send it (from a fresh scope: this one is cancelled) instead of a 504.
                    then = _THEN_LINGER if unread_body else _THEN_CONTINUE if keep_alive else _THEN_CLOSE
                    self.pending = (data, then)
                    await _checkpoint()
                if unread_body:
                    await self._answer_and_linger(data)
                    return
                self.responding = True
                await self._send(data)
                self.responding = False
                self.served = True
                if not keep_alive:
                    if head.keep_alive:
                        # Closed only because the server is stopping: a pipelined request may
                        # be on its way, and a plain close would reset it with our answer.
                        await self._close_for_shutdown(answer_unread=False)
                    return
        finally:
            self._release_batch_slot()

    def _take_batch_slot(self) -> bool:
        server = self.server
        if server.batch_requests >= self.limits.max_batch_requests:
            return False
        server.batch_requests += 1
        self.holds_batch_slot = True
        return True

    def _release_batch_slot(self) -> None:
        if self.holds_batch_slot:
            self.holds_batch_slot = False
            self.server.batch_requests -= 1

    async def _receive(self) -> bytes:
        """The next bytes from the client (b"" when it closed its side)."""
        fd = self.fd
        while True:
            await _wait_readable(fd)
            try:
                return os.read(fd, RECEIVE_BYTES)
            except BlockingIOError:
                pass

    async def _read_more(self) -> bool:
        """Read into the parser; False when the client closed its side."""
        data = await self._receive()
        if data:
            self.parser.feed(data)
        if self.expired != _NOT_EXPIRED:
            # The deadline passed just as the bytes came: let the cancellation land now,
            # with the bytes kept (an idle connection's request is then still served).
            await _checkpoint()
        return bool(data)

    async def _send(self, data: bytes) -> None:
        """Write all of ``data``. A write the kernel takes at once (the usual case) needs no
        deadline; one that blocks runs in the _WRITE phase, so the caller sets the phase
        it wants afterwards."""
        fd = self.fd
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        self.phase = _WRITE
        self.deadline = trio.current_time() + self.limits.write_timeout_s
        view = memoryview(data)
        while sent < len(data):
            await _wait_writable(fd)
            try:
                sent += os.write(fd, view[sent:])
            except BlockingIOError:
                pass

    async def _receive_head(self) -> RequestHead | None:
        """The next request's head; None when the client closed between requests."""
        parser = self.parser
        limits = self.limits
        if parser.has_buffered:
            # A pipelined request: pass a scheduling point, as a socket wait would.
            self.phase = _HEAD
            self.deadline = trio.current_time() + limits.header_timeout_s
            await _checkpoint()
            head = parser.next_head()
            if head is not None:
                return head
        else:
            if self.server.closing:
                await self._close_for_shutdown()
                return None
            # Nothing of the next request is here: the connection is idle, the one state
            # in which shutdown() closes it at once.
            self.phase = _IDLE
            self.deadline = trio.current_time() + (limits.idle_timeout_s if self.served else limits.header_timeout_s)
            if not await self._read_more():
                return None
            head = parser.next_head()  # usually the whole head came in that one read
            if head is not None:
                return head
            self.phase = _HEAD
            if self.served:  # the first request's head counts from the connection's start
                self.deadline = trio.current_time() + limits.header_timeout_s
        return await self._read_until(parser.next_head, "head")

    async def _receive_body(self, head: RequestHead) -> bytes:
        parser = self.parser
        self.phase = _BODY
        self.deadline = deadline = trio.current_time() + self.limits.body_timeout_s
        if head.expect_continue and not parser.body_started:
            await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.phase = _BODY
            self.deadline = deadline
        return await self._read_until(parser.next_body, "body")

    async def next_body_piece(self, head: RequestHead, *, first: bool) -> tuple[bytes, bool]:
        """The next bytes of a streamed body (see ``_BodyStream``) and whether it has ended."""
        parser = self.parser
        if first and head.expect_continue and not parser.body_started:
            deadline = self.deadline
            await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.phase = _BODY  # one that blocked ran in _WRITE
            self.deadline = deadline
        piece, done = parser.next_body_piece()
        while not piece and not done:
            if not await self._read_more():
                parser.feed_eof()
                raise HttpParseError(400, "bad_http_request", "connection closed inside the request body")
            piece, done = parser.next_body_piece()
        if done:
            self.phase = _HANDLER
            self.deadline = trio.current_time() + self.limits.request_timeout_s
        return piece, done

    async def _read_until(self, take: Callable[[], _T | None], part: str) -> _T:
        """Read until ``take`` (the parser's next_head or next_body) has its part."""
        while True:
            if not await self._read_more():
                self.parser.feed_eof()
                raise HttpParseError(400, "bad_http_request", f"connection closed inside the request {part}")
            got = take()
            if got is not None:
                return got

    async def _close_for_shutdown(self, *, answer_unread: bool = True) -> None:
        """Close between requests without ever resetting the client (see the module
        docstring): a request already here is answered 503 ``shutting_down`` (when
        ``answer_unread``), otherwise FIN, then drain and drop what still comes."""
        if answer_unread and not self.served and not self.parser.has_buffered:
            # Accepted from the backlog as the server stopped: its request is usually on
            # the way. A deadline of its own, not the watchdog's: this runs once, at the end.
            self.deadline = math.inf
            with trio.move_on_after(SHUTDOWN_FIRST_REQUEST_S):
                await _wait_readable(self.fd)
        unread = self.parser.has_buffered
        if not unread:
            # Look without waiting; no await from here to the FIN, so a request either is
            # read now (and answered) or arrives after the FIN (and is dropped unserved).
            try:
                data = os.read(self.fd, RECEIVE_BYTES)
            except BlockingIOError:
                data = None
            if data == b"":
                return  # the client has closed its side: nothing to answer, nothing to reset
            unread = data is not None
        await self._answer_and_linger(_SHUTTING_DOWN_ANSWER if unread and answer_unread else b"")

    async def _answer_and_linger(self, data: bytes) -> None:
        """Write an error answer and close after a lingering drain (bounded in bytes here,
        in time by the watchdog)."""
        self.responding = True
        self.phase = _WRITE
        self.deadline = trio.current_time() + self.limits.write_timeout_s
        await self._send(data)
        self.phase = _LINGER
        self.deadline = trio.current_time() + LINGER_S
        self.stream.socket.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < LINGER_MAX_BYTES:
            received = await self._receive()
            if not received:
                return
            drained += len(received)

    async def _send_stream(self, response: Response, *, chunked: bool) -> None:
        assert response.stream is not None
        self.responding = True
        await self._send(_encode_head(response, None, keep_alive=False, chunked=chunked))
        self.phase = _STREAM
        self.deadline = math.inf
        # A chunk cut off by a cancellation leaves the framing broken: then the body must
        # not be terminated cleanly, or the client would take a torn chunk for the end.
        torn = False

        async def send_chunk(chunk: bytes) -> None:
            nonlocal torn
            if not chunk:
                return  # an empty chunk is the chunked terminator
            torn = True
            await self._send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            self.phase = _STREAM
            self.deadline = math.inf
            torn = False

        async with trio.open_nursery() as nursery:
            self.stream_scope = nursery.cancel_scope
            if self.server.closing:
                nursery.cancel_scope.cancel()
            nursery.start_soon(self._cancel_when_client_leaves, nursery.cancel_scope)
            await response.stream(send_chunk)
            nursery.cancel_scope.cancel()
        self.stream_scope = None
        if chunked and not torn:
            await self._send(b"0\r\n\r\n")

    async def _cancel_when_client_leaves(self, scope: trio.CancelScope) -> None:
        # Without this a stream with nothing to say would notice a closed client only at
        # its next heartbeat. Bytes that arrive are a pipelined request that will never be
        # served (the connection closes after a stream): dropped, but bounded.
        received = 0
        try:
            while received <= self.limits.max_header_bytes:
                data = await self._receive()
                if not data:
                    break
                received += len(data)
        except _NETWORK_ERRORS:
            pass
        scope.cancel()


class _BodyStream:
    """``BodyStream`` for one request on one connection. The body's deadline
    (``body_timeout_s``) runs from the head to the body's end, as for a body read whole."""

    __slots__ = ("_connection", "_head", "_started", "done")

    def __init__(self, connection: _Connection, head: RequestHead) -> None:
        self._connection = connection
        self._head = head
        self._started = False
        self.done = False

    async def next_piece(self) -> bytes | None:
        if self.done:
            return None
        first = not self._started
        self._started = True
        piece, self.done = await self._connection.next_body_piece(self._head, first=first)
        return piece or None  # empty only with done: next_body_piece waits for bytes


def _parse_error_response(error: HttpParseError) -> Response:
    message = error.message if error.status in (413, 431, 505) else f"malformed HTTP request: {error.message}"
    if error.limit is None:
        return error_response(error.status, error.code, message)
    return error_response(error.status, error.code, message, limit=error.limit)


def _encode_head(response: Response, content_length: int | None, *, keep_alive: bool, chunked: bool = False) -> bytes:
    status = response.status
    parts = [
        _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status,
        b"content-type: ",
        response.content_type,
        b"\r\ndate: ",
        _date.value(),
        b"\r\n",
    ]
    if content_length is not None:
        parts += (b"content-length: ", b"%d" % content_length, b"\r\n")
    elif chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if response.headers:
        for name, value in response.headers:
            parts += (name, b": ", value, b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _encode_response(response: Response, *, keep_alive: bool, head_only: bool = False) -> bytes:
    """A complete response with a Content-Length body (HEAD: the head alone)."""
    body = response.body
    head = _encode_head(response, len(body), keep_alive=keep_alive)
    return head if head_only or not body else head + body


async def serve_http(
    app: RequestHandler,
    *,
    host: str,
    port: int,
    limits: HttpLimits,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` (0 = any free port; the bound port is passed to
    ``task_status.started``) until cancelled, or until ``shutdown`` is set and the
    graceful stop has finished."""
    server = HttpServer(app, limits=limits)
    async with trio.open_nursery() as nursery:
        if shutdown is not None:

            async def stop_when_set(event: trio.Event) -> None:
                await event.wait()
                server.shutdown()

            nursery.start_soon(stop_when_set, shutdown)
        await server.serve(host=host, port=port, task_status=task_status)
        nursery.cancel_scope.cancel()
