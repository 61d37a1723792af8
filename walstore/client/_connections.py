"""Keep-alive HTTP/1.1 connections for the synchronous ``Client``'s request/answer calls.

Why not httpx here: one GET through ``httpx.Client`` costs about 550 us of CPU, through
``http.client`` about 110 us (a 1,500-request loop against one node, both measured in the
same run). An application drives the sync client from many threads and the GIL makes
that CPU its ceiling, so every command pays it several times (eventsourcing's repository
reads, then saves). Subscriptions, which stream, stay on httpx.

A pool per origin hands a thread an idle connection or makes one; a connection is owned by
one thread between ``request`` and its return, so ``http.client``'s lack of thread safety
never matters. Errors come out as ``TransportFailure`` with the one distinction the retry
logic needs: could the request have reached the server (``maybe_sent``) or not.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from walstore.client._protocol import TransportFailure, describe

# idle connections kept per origin; more are opened when more threads call at once
MAX_IDLE_PER_ORIGIN: Final = 32


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names
    content: bytes


class _Origin:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()


class ConnectionPool:
    """Thread-safe keep-alive connections to any number of ``http://host:port`` origins."""

    def __init__(self) -> None:
        self._origins: dict[str, _Origin] = {}
        self._lock = threading.Lock()
        self._closed = False

    def request(
        self, method: str, url: str, *, body: bytes | None, headers: Mapping[str, str], timeout: float
    ) -> RawResponse:
        split = urllib.parse.urlsplit(url)
        if split.scheme != "http" or not split.hostname:
            raise TransportFailure("not_sent", f"{url}: only http:// URLs are supported")
        origin = self._origin(split.hostname, split.port or 80)
        target = split.path or "/"
        if split.query:
            target = f"{target}?{split.query}"
        conn, reused = self._take(origin, timeout)
        try:
            try:
                response = self._exchange(conn, method, target, body, headers)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if not reused:
                    raise TransportFailure("maybe_sent", f"ConnectionLost: {describe(exc)}") from exc
                # A kept-alive connection the server had already closed: the classic race of
                # keep-alive. Every walstore write carries its ids, so sending it again on a
                # fresh connection is safe whatever the first attempt did.
                conn = self._connect(origin, timeout)
                response = self._exchange(conn, method, target, body, headers)
        except TransportFailure:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransportFailure("maybe_sent", f"ConnectionLost: {describe(exc)}") from exc
        if response[3]:
            self._give_back(origin, conn)
        else:
            conn.close()
        return RawResponse(response[0], response[1], response[2])

    @staticmethod
    def _exchange(
        conn: http.client.HTTPConnection, method: str, target: str, body: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, str], bytes, bool]:
        try:
            conn.request(method, target, body=body, headers=dict(headers))
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The server may have answered before reading the whole body and closed (a 413
            # for an over-long Content-Length): its answer is still there to read.
            try:
                answer = conn.getresponse()
            except (OSError, http.client.HTTPException):
                raise exc from None
        else:
            answer = conn.getresponse()
        content = answer.read()
        names = {k.lower(): v for k, v in answer.getheaders()}
        return answer.status, names, content, not answer.will_close

    def _origin(self, host: str, port: int) -> _Origin:
        key = f"{host}:{port}"
        with self._lock:
            origin = self._origins.get(key)
            if origin is None:
                origin = self._origins[key] = _Origin(host, port)
            return origin

    def _take(self, origin: _Origin, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        with origin.lock:
            conn = origin.idle.pop() if origin.idle else None
        if conn is not None:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            return conn, True
        return self._connect(origin, timeout), False

    @staticmethod
    def _connect(origin: _Origin, timeout: float) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(origin.host, origin.port, timeout=timeout)
        try:
            conn.connect()
        except OSError as exc:  # refused, unreachable, connect timeout: nothing was sent
            conn.close()
            raise TransportFailure("not_sent", f"ConnectError: {describe(exc)}") from exc
        if conn.sock is not None:
            # A request is headers then body in two writes; without this, Nagle holds the
            # body until the headers are acknowledged.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _give_back(self, origin: _Origin, conn: http.client.HTTPConnection) -> None:
        with origin.lock:
            if not self._closed and len(origin.idle) < MAX_IDLE_PER_ORIGIN:
                origin.idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            origins = list(self._origins.values())
        for origin in origins:
            with origin.lock:
                idle, origin.idle = origin.idle, []
            for conn in idle:
                conn.close()
