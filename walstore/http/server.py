"""The HTTP/1.1 server: h11's sans-IO state machine driven by trio sockets.

This is the only module of ``http/`` that touches sockets. It reads a request (head, then a
bounded body), hands a ``Request`` to the application's ``handle()`` and writes the
``Response`` back; it knows nothing about events. Modelled on hypercorn's trio
``tcp_server``, but thin and on h11 directly.

What a connection goes through, and what ends it:

- Waiting for a request: ``header_timeout_s`` on a new connection, ``idle_timeout_s``
  between keep-alive requests; expiry closes silently.
- The head (request line + headers) must arrive whole within ``header_timeout_s`` of its
  first byte (slowloris), else 408 and close; over ``max_header_bytes`` is 431 and close.
- The body: ``Content-Length`` over ``max_body_bytes`` is answered 413 at once, unread;
  a chunked body is counted as it arrives and cut off the same way. The whole body must
  arrive within ``body_timeout_s`` (else 408).
- The handler runs under ``request_timeout_s`` (else 504 ``request_timeout``: for a write
  the outcome is unknown). An exception from it is logged and answered 500.
- Keep-alive and pipelining come from h11: the next request is parsed only after the
  response to the previous one is written. ``Connection: close`` is honoured.
- A streaming response (Server-Sent Events) runs until the application's stream function
  returns, the client closes, or the server shuts down; then the connection closes.
- After an error answer the server half-closes and drains briefly (``LINGER_S``) before
  closing: closing a socket with unread input makes the kernel send RST, which can destroy
  the answer before the client reads it.
- Over ``max_connections`` a new connection gets a fixed 503 and is closed.

Graceful stop (SIGTERM): ``HttpServer.shutdown()`` (or setting the ``shutdown`` event
given to ``serve_http``) stops accepting, closes idle keep-alive connections, ends
streams, lets in-flight requests finish with ``Connection: close`` for up to
``shutdown_grace_s``, then cancels what is left and returns.

Nothing a client sends can stop the server: every exception inside a connection is
contained there and logged (network breakage at debug level, anything else with its
traceback).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, Protocol

import h11
import orjson
import trio

from walstore.errors import ConfigError

log = logging.getLogger(__name__)

# One receive_some: a small request arrives in one call; a 1 MiB body in 16.
RECEIVE_BYTES: Final = 64 * 1024
# The lingering close after an error answer: bounded in time and bytes so a client
# streaming a huge body cannot keep the server reading it.
LINGER_S: Final = 1.0
LINGER_MAX_BYTES: Final = 1024 * 1024
# Over-capacity rejections are cheap but each holds a socket while it lingers; beyond
# this many at once, further connections are closed without an answer.
MAX_PENDING_REJECTIONS: Final = 256
# accept() failing with these means the process or kernel is out of descriptors or memory:
# wait and retry instead of crashing the server (trio.serve_listeners does the same).
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))

JSON_CONTENT_TYPE: Final = b"application/json"
_STATUS_LINES: Final = {s.value: b"HTTP/1.1 %d %b\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

SendChunk = Callable[[bytes], Awaitable[None]]
"""Writes one chunk of a streaming response (bounded by ``write_timeout_s``)."""
StreamBody = Callable[[SendChunk], Awaitable[None]]
"""Produces a streaming response body by calling ``send`` until it returns."""


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-connection bounds. Every default has its reason."""

    # a batch of 1000 small events fits; a bigger body is answered 413 without reading it
    max_body_bytes: int = 1024 * 1024
    # request line + headers (h11's max_incomplete_event_size); nginx allows 4 x 8 KiB,
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


class Request:
    """One parsed request, body read in full. Header names are lowercase bytes."""

    __slots__ = ("body", "content_type", "headers", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        content_type: str | None,
    ) -> None:
        self.method = method
        self.path = path  # still percent-encoded
        self.query = query  # the raw bytes after "?"
        self.headers = headers
        self.body = body
        self.content_type = content_type

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


class _CloseWith(Exception):
    """Answer this and close the connection (408, 413)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


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


class HttpServer:
    """Accepts connections and runs one ``_Connection`` task per client."""

    def __init__(self, app: RequestHandler, *, limits: HttpLimits) -> None:
        self.app = app
        self.limits = limits
        self.port: int | None = None
        self._connections: set[_Connection] = set()
        self._closing = False
        self._accept_scope: trio.CancelScope | None = None
        self._pending_rejections = 0

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
            self._accept_scope.cancel()
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
            async with trio.open_nursery() as connections:
                with trio.CancelScope() as accept_scope:
                    self._accept_scope = accept_scope
                    if self._closing:
                        accept_scope.cancel()
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(self._accept_loop, listener, connections)
                        task_status.started(self.port)
                # Shutting down: refuse new connections at once, then give the ones we
                # have their grace period; the nursery exits when the last one closes.
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
                connections.cancel_scope.deadline = trio.current_time() + self.limits.shutdown_grace_s
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()

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
            self._connections.discard(connection)
            await trio.aclose_forcefully(connection.stream)


class _Connection:
    """One client connection.

    h11 parses each request (a fresh ``h11.Connection`` per request, fed the bytes left
    over from the previous one, so pipelined requests carry over). Responses are written
    here, not by h11: its send path (header re-validation, framing state) measured ~45 us
    per response on the 2-core development machine, a fifth of the per-request budget,
    and every header we send is our own, never a client's.
    """

    __slots__ = ("app", "idle_scope", "limits", "parser", "responding", "server", "stream", "stream_scope")

    def __init__(self, server: HttpServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.app = server.app
        self.limits = server.limits
        self.stream = stream
        self.parser = self._new_parser()
        # True once the first byte of an answer to the current request may have been sent:
        # from then on an error can only close the connection.
        self.responding = False
        self.idle_scope: trio.CancelScope | None = None
        self.stream_scope: trio.CancelScope | None = None

    def _new_parser(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)

    def peer(self) -> str:
        try:
            host, port, *_ = self.stream.socket.getpeername()
        except (OSError, ValueError):
            return "?"
        return f"{host}:{port}"

    def on_shutdown(self) -> None:
        # A connection between requests closes now; one inside a request finishes it.
        if self.idle_scope is not None:
            self.idle_scope.cancel()
        if self.stream_scope is not None:
            self.stream_scope.cancel()

    async def run(self) -> None:
        try:
            first = True
            buffered = False
            while True:
                request = await self._receive_head(first, buffered)
                if request is None or not await self._serve(request):
                    return
                first = False
                leftover, closed = self.parser.trailing_data
                self.parser = parser = self._new_parser()
                self.responding = False
                buffered = bool(leftover) or closed
                if leftover:
                    parser.receive_data(leftover)
                if closed:
                    parser.receive_data(b"")
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            code = "headers_too_large" if status == 431 else "bad_http_request"
            await self._close_with(error_response(status, code, f"malformed HTTP request: {exc}"))
        except _CloseWith as close:
            await self._close_with(close.response)

    async def _receive_into_parser(self, deadline: float) -> bool:
        """Read once more into the parser; False if the deadline passed first."""
        with trio.move_on_at(deadline):
            self.parser.receive_data(await self.stream.receive_some(RECEIVE_BYTES))
            return True
        return False

    async def _receive_head(self, first: bool, buffered: bool) -> h11.Request | None:
        """The next request's head; None when the client closed or the wait timed out.
        ``buffered``: the parser already holds bytes (a pipelined request)."""
        parser = self.parser
        limits = self.limits
        started = trio.current_time()
        event: object = parser.next_event() if buffered else h11.NEED_DATA
        if not buffered:
            # Nothing of the next request is here: the connection is idle, the one state
            # in which shutdown() closes it at once.
            if self.server.closing:
                return None
            with trio.move_on_after(limits.header_timeout_s if first else limits.idle_timeout_s) as idle:
                self.idle_scope = idle
                data = await self.stream.receive_some(RECEIVE_BYTES)
            self.idle_scope = None
            if idle.cancelled_caught:
                return None
            if not first:
                started = trio.current_time()
            parser.receive_data(data)
            event = parser.next_event()  # usually the whole head came in that one read
        deadline = started + limits.header_timeout_s
        while event is h11.NEED_DATA:
            if not await self._receive_into_parser(deadline):
                raise _CloseWith(
                    error_response(
                        408, "header_timeout", f"request head not received within {limits.header_timeout_s} s"
                    )
                )
            event = parser.next_event()
        if type(event) is h11.Request:
            return event
        return None  # ConnectionClosed: the client went away between requests

    async def _receive_body(self, content_length: int) -> bytes:
        parser = self.parser
        limits = self.limits
        if content_length > limits.max_body_bytes:
            raise _CloseWith(self._too_large(content_length))
        chunks: list[bytes] = []
        size = 0
        deadline = 0.0
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                if not deadline:
                    deadline = trio.current_time() + limits.body_timeout_s
                    if parser.they_are_waiting_for_100_continue:
                        await self._send_bytes(b"HTTP/1.1 100 Continue\r\n\r\n")
                if not await self._receive_into_parser(deadline):
                    raise _CloseWith(
                        error_response(
                            408, "body_timeout", f"request body not received within {limits.body_timeout_s} s"
                        )
                    )
            elif type(event) is h11.Data:
                size += len(event.data)
                if size > limits.max_body_bytes:
                    raise _CloseWith(self._too_large(size))
                chunks.append(event.data)
            elif type(event) is h11.EndOfMessage:
                return b"".join(chunks)
            else:
                raise h11.RemoteProtocolError("connection closed inside the request body")

    def _too_large(self, size: int) -> Response:
        limit = self.limits.max_body_bytes
        return error_response(
            413,
            "payload_too_large",
            f"request body of {size}+ bytes is over the {limit}-byte limit",
            limit=limit,
        )

    async def _serve(self, event: h11.Request) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        if event.http_version != b"1.1" and event.http_version != b"1.0":
            raise _CloseWith(error_response(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served"))
        content_type: str | None = None
        content_length = 0  # chunked bodies are counted as they arrive
        keep_alive = event.http_version == b"1.1"
        # h11 bounds only a head that arrives in pieces; one that came whole in a single
        # read is measured here, so the limit holds however the bytes were split.
        head_bytes = len(event.target)
        for name, value in event.headers:
            head_bytes += len(name) + len(value)
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                content_length = int(value)  # h11 has checked it is digits
            elif name == b"connection" and b"close" in (t.strip() for t in value.lower().split(b",")):
                keep_alive = False
        if head_bytes > self.limits.max_header_bytes:
            raise _CloseWith(
                error_response(
                    431,
                    "headers_too_large",
                    f"request head over the {self.limits.max_header_bytes}-byte limit",
                    limit=self.limits.max_header_bytes,
                )
            )
        body = await self._receive_body(content_length)
        path, _, query = event.target.partition(b"?")
        method = event.method.decode("ascii")
        request = Request(method, path.decode("ascii"), query, event.headers, body, content_type)

        head_only = method == "HEAD"
        response: Response | None = None
        with trio.move_on_after(self.limits.request_timeout_s) as scope:
            try:
                response = await self.app.handle(request)
            except Exception:
                log.exception("handler failed for %s %s", method, request.path)
                response = error_response(500, "internal_error", "internal server error")
            if response.stream is None or head_only:
                # The handler's scope times the write too: one cancel scope per request
                # instead of two is measurably cheaper on the hot path.
                scope.deadline = trio.current_time() + self.limits.write_timeout_s
                keep_alive = keep_alive and not self.server.closing
                self.responding = True
                await self.stream.send_all(_encode_response(response, keep_alive=keep_alive, head_only=head_only))
                return keep_alive
        if self.responding:
            raise trio.TooSlowError(f"response not taken by the client within {self.limits.write_timeout_s} s")
        keep_alive = keep_alive and not self.server.closing
        self.responding = True
        if response is None:
            response = error_response(
                504,
                "request_timeout",
                f"the request did not finish within {self.limits.request_timeout_s} s; a write may still be applied",
                headers=[(b"retry-after", b"1")],
            )
            await self._send_bytes(_encode_response(response, keep_alive=keep_alive, head_only=head_only))
            return keep_alive
        await self._send_stream(response, chunked=event.http_version == b"1.1")
        return False

    async def _send_bytes(self, data: bytes) -> None:
        with trio.fail_after(self.limits.write_timeout_s):
            await self.stream.send_all(data)

    async def _close_with(self, response: Response) -> None:
        """Answer (unless an answer has begun) and close after a lingering drain."""
        if self.responding:
            return
        self.responding = True
        try:
            await self._send_bytes(_encode_response(response, keep_alive=False))
        except _NETWORK_ERRORS:
            return
        await _linger(self.stream)

    async def _send_stream(self, response: Response, *, chunked: bool) -> None:
        assert response.stream is not None
        head = _encode_head(response, None, keep_alive=False, chunked=chunked)
        await self._send_bytes(head)
        # A chunk cut off by a cancellation leaves the framing broken: then the body must
        # not be terminated cleanly, or the client would take a torn chunk for the end.
        torn = False

        async def send_chunk(chunk: bytes) -> None:
            nonlocal torn
            if not chunk:
                return  # an empty chunk is the chunked terminator
            torn = True
            await self._send_bytes(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
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
            with trio.move_on_after(self.limits.write_timeout_s):
                await self.stream.send_all(b"0\r\n\r\n")

    async def _cancel_when_client_leaves(self, scope: trio.CancelScope) -> None:
        # Without this a stream with nothing to say would notice a closed client only at
        # its next heartbeat. Bytes that arrive are a pipelined request that will never be
        # served (the connection closes after a stream): dropped, but bounded.
        received = 0
        try:
            while received <= self.limits.max_header_bytes:
                data = await self.stream.receive_some(RECEIVE_BYTES)
                if not data:
                    break
                received += len(data)
        except _NETWORK_ERRORS:
            pass
        scope.cancel()


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
