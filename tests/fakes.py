"""Test doubles for the HTTP layer: an ``EventService`` over the real store, and a raw HTTP client.

``FakeEventService`` is the product's ``EventStore`` (the state machine is I/O-free) over
an in-memory log, applied as soon as it is written: no WAL, no replication, no leader.
Every rule and every error code (``wrong_expected_version``, ``duplicate_event_id``,
``duplicate_id_in_batch``, ...) is therefore the store's own, not a copy that could
drift. Around it the fake lets a test inject failures
(``failures["append"] = UnavailableError(...)``), hold appends in flight
(``append_gate``), wake subscribers (``wake``) and see what reads were asked for.

``HttpTestClient`` writes raw bytes to a real socket and parses responses with its own small
parser (not h11), so the server's output is checked by a second implementation and tests
can send bytes no well-behaved client would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import trio

from walstore.errors import LogStateError, UnavailableError
from walstore.event import MAX_BATCH_EVENTS, AppendResult, NewEvent, StoredEvent, Tracking
from walstore.http.app import HttpApp
from walstore.http.server import HttpLimits, HttpServer
from walstore.service import AggregateRead, Checkpoint, Direction, LogRead, NodeStatus, subscription
from walstore.store import SCAN_BUDGET_EVENTS, EventStore

BASE_TIMESTAMP_US = 1_700_000_000_000_000


class MemoryLog:
    """Encoded event bodies at log indexes 1..N: the ``BodyReader`` the store reads back."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def body(self, log_index: int) -> bytes:
        if not 1 <= log_index <= len(self.bodies):
            raise LogStateError(f"no record at log index {log_index}")
        return self.bodies[log_index - 1]


class FakeEventService:
    """The real ``EventStore`` behind the ``EventService`` interface, with fault injection."""

    def __init__(self, node_id: str = "node-0", *, min_index_wait_s: float = 0.5) -> None:
        self.memory_log = MemoryLog()
        self.store = EventStore(self.memory_log)
        self.node_status = NodeStatus(
            id=node_id, is_leader=True, leader_id=node_id, term=1, commit_index=0, last_applied=0
        )
        self.min_index_wait_s = min_index_wait_s
        # method name -> error raised by every call of it until removed
        self.failures: dict[str, Exception] = {}
        # set to a trio.Event to hold appends until it is set; append_entered fires when one waits
        self.append_gate: trio.Event | None = None
        self.append_entered = trio.Event()
        self.read_calls: list[dict[str, Any]] = []
        self.scan_budget = SCAN_BUDGET_EVENTS  # a test may make the log reads' scans short
        self.max_batch_events = MAX_BATCH_EVENTS
        self.subscriptions_open = 0
        self.subscription_opened = trio.Event()
        self.subscription_closed = trio.Event()
        self._changed = trio.Event()

    @property
    def log(self) -> list[StoredEvent]:
        """Every applied event, in index order (read back through the store)."""
        return self.store.read_log(1, self.store.last_applied_event_index).events

    def _maybe_fail(self, method: str) -> None:
        error = self.failures.get(method)
        if error is not None:
            raise error

    def wake(self) -> None:
        """Wake every waiter (subscriptions, ``min_index`` reads) as an append would."""
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def append(self, events: Sequence[NewEvent], tracking: Tracking | None = None) -> list[AppendResult]:
        self._maybe_fail("append")
        if self.append_gate is not None:
            self.append_entered.set()
            await self.append_gate.wait()
        await trio.lowlevel.checkpoint()
        store = self.store
        # One timestamp per batch, as the leader stamps it: whole seconds from the index
        # make the seed's ``timestamp`` predictable in tests.
        next_event_index = store.last_applied_event_index + 1
        prepared = store.prepare(
            events,
            timestamp_us=BASE_TIMESTAMP_US + next_event_index * 1_000_000,
            tracking=tracking,
            max_events=self.max_batch_events,
        )
        if prepared.bodies:
            first = len(self.memory_log.bodies) + 1
            records = prepared.records()
            self.memory_log.bodies.extend(body for _, _, body in records)
            store.pending_added(first, prepared)
            for log_index, (kind, _, body) in enumerate(records, first):
                store.apply(log_index, kind, body)
            self.wake()
        return store.results(prepared)

    async def consumer_position(self, consumer: str, *, min_index: int | None = None) -> int | None:
        self._maybe_fail("consumer_position")
        await self._wait_for_index(min_index)
        return self.store.consumer_position(consumer)

    async def _wait_for_index(self, min_index: int | None) -> None:
        if min_index is None:
            return
        with trio.move_on_after(self.min_index_wait_s):
            while self.store.last_applied_event_index < min_index:
                await self._changed.wait()
            return
        raise UnavailableError(
            f"index {min_index} not applied within {self.min_index_wait_s} s",
            code="min_index_timeout",
            retry_after_s=1.0,
        )

    async def read_aggregate(
        self,
        aggregate_id: str,
        *,
        from_version: int,
        limit: int,
        direction: Direction,
        min_index: int | None,
    ) -> AggregateRead:
        self._maybe_fail("read_aggregate")
        self.read_calls.append(
            {
                "aggregate_id": aggregate_id,
                "from_version": from_version,
                "limit": limit,
                "direction": direction,
                "min_index": min_index,
            }
        )
        await self._wait_for_index(min_index)
        return self.store.read_aggregate(aggregate_id, from_version, limit, direction)

    async def read_log(
        self,
        *,
        from_index: int,
        limit: int,
        min_index: int | None,
        direction: Direction = "forward",
        types: Collection[str] | None = None,
        aggregate_prefix: str | None = None,
    ) -> LogRead:
        self._maybe_fail("read_log")
        call: dict[str, Any] = {"from_index": from_index, "limit": limit, "min_index": min_index}
        if direction != "forward" or types is not None or aggregate_prefix is not None:
            call.update(direction=direction, types=types, aggregate_prefix=aggregate_prefix)
        self.read_calls.append(call)
        await self._wait_for_index(min_index)
        return self.store.read_log(
            from_index,
            limit,
            direction=direction,
            types=types,
            aggregate_prefix=aggregate_prefix,
            scan_budget=self.scan_budget,
        )

    async def subscribe(
        self, *, from_index: int, types: Collection[str] | None = None, aggregate_prefix: str | None = None
    ) -> AsyncIterator[StoredEvent | Checkpoint]:
        self._maybe_fail("subscribe")
        self.subscriptions_open += 1
        self.subscription_opened.set()

        def read(next_index: int) -> LogRead:
            page = min(100, self.scan_budget)  # a short scan budget makes short pages
            return self.store.read_log(
                next_index, page, types=types, aggregate_prefix=aggregate_prefix, scan_budget=self.scan_budget
            )

        async def wait_for(event_index: int) -> None:
            while self.store.last_applied_event_index < event_index:
                await self._changed.wait()
                self._maybe_fail("subscribe")

        try:
            filtered = types is not None or bool(aggregate_prefix)
            async for item in subscription(read, wait_for, from_index, filtered=filtered):
                yield item
        finally:
            self.subscriptions_open -= 1
            self.subscription_closed.set()

    def status(self) -> NodeStatus:
        self._maybe_fail("status")
        last = self.store.last_applied_event_index
        return dataclasses.replace(self.node_status, commit_index=last, last_applied=last)


# ------------------------------------------------------------------------ the client


@dataclass
class HttpTestResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class HttpTestClient:
    """One client connection with a byte buffer; responses parsed by hand."""

    stream: trio.SocketStream
    buffer: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(cls, port: int) -> HttpTestClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        self.buffer += data
        return True

    async def _read_until(self, marker: bytes) -> bytes:
        while (at := self.buffer.find(marker)) < 0:
            if not await self._fill():
                raise EOFError(f"connection closed; buffered {bytes(self.buffer)!r}")
        out = bytes(self.buffer[:at])
        del self.buffer[: at + len(marker)]
        return out

    async def _read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._fill():
                raise EOFError(f"connection closed after {len(self.buffer)} of {n} bytes")
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def read_head(self) -> HttpTestResponse:
        head = (await self._read_until(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        version, status, reason = [*status_line.split(" ", 2), ""][:3]
        assert version == "HTTP/1.1", status_line
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        response = HttpTestResponse(int(status), reason, headers)
        response.chunked = (response.header("transfer-encoding") or "").lower() == "chunked"
        return response

    async def read_chunk(self) -> bytes:
        """One chunk of a chunked body; b"" is the terminating chunk."""
        size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
        data = await self._read_exactly(size)
        assert await self._read_exactly(2) == b"\r\n"
        return data

    async def read_response(self, *, head_only: bool = False) -> HttpTestResponse:
        response = await self.read_head()
        if head_only or response.status in (204, 304) or response.status < 200:
            return response
        if response.chunked:
            parts = []
            while chunk := await self.read_chunk():
                parts.append(chunk)
            response.body = b"".join(parts)
        elif (length := response.header("content-length")) is not None:
            response.body = await self._read_exactly(int(length))
        else:
            while await self._fill():
                pass
            response.body = bytes(self.buffer)
            self.buffer.clear()
        return response

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        *,
        json: Any = None,
        content_type: str | None = "application/json",
        headers: Sequence[tuple[str, str]] = (),
    ) -> HttpTestResponse:
        await self.send_raw(encode_request(method, target, body, json=json, content_type=content_type, headers=headers))
        return await self.read_response(head_only=method == "HEAD")

    async def read_until_closed(self) -> bytes:
        """Everything until the server closes (EOF or reset)."""
        try:
            while await self._fill():
                pass
        except trio.BrokenResourceError:
            pass
        out = bytes(self.buffer)
        self.buffer.clear()
        return out


def encode_request(
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    json: Any = None,
    content_type: str | None = "application/json",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    if json is not None:
        body = orjson.dumps(json)
    lines = [f"{method} {target} HTTP/1.1", "host: test"]
    if body is not None:
        lines.append(f"content-length: {len(body)}")
        if content_type is not None:
            lines.append(f"content-type: {content_type}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def start_server(
    nursery: trio.Nursery,
    service: FakeEventService | None = None,
    *,
    limits: HttpLimits | None = None,
    app: HttpApp | None = None,
) -> tuple[HttpServer, int]:
    """Serve on 127.0.0.1, port 0; returns the server and the port the OS gave it."""
    if app is None:
        app = HttpApp(service if service is not None else FakeEventService())
    server = HttpServer(app, limits=limits if limits is not None else HttpLimits())
    port = await nursery.start(partial(server.serve, host="127.0.0.1", port=0))
    return server, port
