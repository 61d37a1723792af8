"""``Client``: the synchronous walstore client. Every decision (what to
send, what an answer means, whether and where to retry, how paging and subscriptions
advance) is ``walstore.client._protocol``'s; this module only sends, sleeps and yields.
Request/answer calls go over ``_connections`` (http.client keep-alive connections, a
fraction of httpx's CPU per request; that module says why); subscriptions stream over
httpx.Client, and with a ``transport`` given (tests put faults or counters there) every
call goes through httpx on that transport. ``AsyncClient`` (``_async.py``) is the same on top of httpx.AsyncClient."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from walstore.client import _protocol as p
from walstore.client._connections import ConnectionPool
from walstore.client.errors import WalstoreClientError
from walstore.client.models import (
    AppendResult,
    BatchResult,
    EventData,
    ExpectedVersion,
    LogPage,
    RecordedEvent,
    Tracking,
)


class Client:
    """A walstore cluster, through any of its nodes' URLs.

    ``timeout`` bounds one HTTP attempt; ``retry_deadline`` bounds a whole call with its
    retries (503s, 504s, lost connections, failover), after which a write that may have
    been stored raises ``OutcomeUnknown`` and anything else ``Unavailable``. Event ids
    are made here (uuid4) before the first attempt, so a retried write is never stored
    twice. ``heartbeat_timeout`` is how long a subscription waits on a silent stream
    (the server sends a heartbeat every 15 s) before it reconnects. With
    ``read_your_writes`` (the default) every event read asks the node for ``min_index``
    = the highest index this client's writes were answered with, so a read after a
    failover, or on another node, still sees them. One Client may be shared by threads
    (both its connection pools are thread-safe); a Subscription belongs to the
    thread iterating it."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        timeout: float = 10.0,
        retry_deadline: float = 35.0,
        heartbeat_timeout: float = p.DEFAULT_HEARTBEAT_TIMEOUT_S,
        read_your_writes: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        p.check_durations(timeout=timeout, retry_deadline=retry_deadline, heartbeat_timeout=heartbeat_timeout)
        self.router = p.Router(urls)
        self.timeout = timeout
        self.retry_deadline = retry_deadline
        self.heartbeat_timeout = heartbeat_timeout
        self.read_your_writes = read_your_writes
        # The highest event index a write of this client was answered with; a lock, since
        # one Client may serve many threads (httpx.Client is thread-safe) and max() is two steps.
        self.written_index = 0
        self._written_lock = threading.Lock()
        self._http = httpx.Client(timeout=timeout, transport=transport, trust_env=False)
        self._pool = ConnectionPool() if transport is None else None

    @property
    def urls(self) -> list[str]:
        return list(self.router.urls)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the retry loop ---------------------------------------------------------------------

    def _call(self, request: p.Request) -> Any:
        if self.read_your_writes:
            request = p.at_least(request, self.written_index)
        call = p.Call(request, self.router, deadline=time.monotonic() + self.retry_deadline, timeout=self.timeout)
        while True:
            step = self._attempt(call, request)
            if isinstance(step, p.Done):
                return step.body
            if isinstance(step, p.Fail):
                raise step.error
            for url in step.probe:
                self._probe(url)
            if step.wait_s > 0:
                time.sleep(step.wait_s)

    def _attempt(self, call: p.Call, request: p.Request) -> p.Step:
        timeout = call.attempt_timeout(time.monotonic())
        if self._pool is not None:
            try:
                raw = self._pool.request(
                    request.method, request.url(call.url), body=request.body, headers=request.headers, timeout=timeout
                )
            except p.TransportFailure as exc:
                return call.failed(exc, time.monotonic())
            return call.answered(raw.status, raw.headers, raw.content, time.monotonic())
        try:
            response = self._http.request(
                request.method, request.url(call.url), content=request.body, headers=request.headers, timeout=timeout
            )
        except httpx.TransportError as exc:
            return call.failed(exc, time.monotonic())
        return call.answered(response.status_code, response.headers, response.content, time.monotonic())

    def _probe(self, url: str) -> None:
        """Learn which node ``url`` is; any failure only means we still do not know."""
        target = p.STATUS_REQUEST.url(url)
        try:
            if self._pool is not None:
                raw = self._pool.request("GET", target, body=None, headers={}, timeout=p.PROBE_TIMEOUT_S)
                status, headers, content = raw.status, raw.headers, raw.content
            else:
                response = self._http.get(target, timeout=p.PROBE_TIMEOUT_S)
                status, headers, content = response.status_code, response.headers, response.content
        except (p.TransportFailure, httpx.HTTPError):
            return
        del status  # a node says who it is whatever its health
        self.router.learn(url, p.decode_body(content, headers.get("content-type")))

    # -- writes -----------------------------------------------------------------------------

    def append(
        self,
        aggregate_id: str,
        type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        payload_bytes: bytes | None = None,
        metadata: Mapping[str, Any] | None = None,
        expected_version: ExpectedVersion = None,
        event_id: str | None = None,
    ) -> AppendResult:
        """Append one event (``POST /events``); retried with the same id until answered."""
        event = EventData(aggregate_id, type, payload, payload_bytes, metadata, expected_version, event_id)
        result = p.decode_append(self._call(p.append_request(event)))
        self._wrote(result.index)
        return result

    def append_batch(self, events: Sequence[EventData], *, tracking: Tracking | None = None) -> BatchResult:
        """Append events atomically (``POST /events/batch``), with a consumer position if given."""
        result = p.decode_batch(self._call(p.batch_request(events, tracking)))
        self._wrote(result.last_index or 0)
        return result

    def _wrote(self, index: int) -> None:
        with self._written_lock:
            self.written_index = max(self.written_index, index)

    # -- reads ------------------------------------------------------------------------------

    def read_log_page(
        self,
        *,
        from_index: int | None = None,
        limit: int = p.DEFAULT_PAGE_SIZE,
        types: Sequence[str] | None = None,
        aggregate_prefix: str | None = None,
        direction: str = "forward",
    ) -> LogPage:
        """One ``GET /events``: at most ``limit`` matching events and where to go on."""
        request = p.log_page_request(
            from_index=from_index, limit=limit, types=types, aggregate_prefix=aggregate_prefix, direction=direction
        )
        page = p.decode_log_page(self._call(request))
        kept = [e for e in page.events if p.matches(e, types, aggregate_prefix)]
        return LogPage(kept, page.next_index, page.last_index)

    def read_log(
        self,
        *,
        from_index: int | None = None,
        types: Sequence[str] | None = None,
        aggregate_prefix: str | None = None,
        direction: str = "forward",
        limit: int | None = None,
        page_size: int = p.DEFAULT_PAGE_SIZE,
    ) -> Iterator[RecordedEvent]:
        """The global log (from index 1 forward, or from the last index backward), page by
        page, up to its end as the pages find it (or ``limit`` events)."""
        pager = p.LogPager(
            from_index=from_index,
            types=types,
            aggregate_prefix=aggregate_prefix,
            direction=direction,
            limit=limit,
            page_size=page_size,
        )
        while not pager.done:
            yield from pager.feed(p.decode_log_page(self._call(pager.request())))

    def read_aggregate(
        self,
        aggregate_id: str,
        *,
        from_version: int | None = None,
        direction: str = "forward",
        limit: int | None = None,
        page_size: int = p.DEFAULT_PAGE_SIZE,
    ) -> Iterator[RecordedEvent]:
        """One aggregate's events (from version 1 forward, or from the newest backward)."""
        pager = p.AggregatePager(
            aggregate_id, from_version=from_version, direction=direction, limit=limit, page_size=page_size
        )
        while not pager.done:
            yield from pager.feed(p.decode_aggregate_page(self._call(pager.request())))

    def consumer_position(self, consumer: str) -> int | None:
        """The consumer's stored position (``GET /consumers/{consumer}``); None if never stored."""
        return p.decode_consumer(self._call(p.consumer_request(consumer)))

    def status(self) -> dict[str, Any]:
        """``GET /status`` of the node the client is using now."""
        body = p.decode_status(self._call(p.STATUS_REQUEST))
        self.router.learn(self.router.current, body)
        return body

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(
        self,
        *,
        from_index: int = 1,
        types: Sequence[str] | None = None,
        aggregate_prefix: str | None = None,
    ) -> Subscription:
        """Every matching event from ``from_index`` on, in index order, then live, for as
        long as it is iterated. Reconnects (to the next node after a failure) from the last
        delivered or checkpointed index, so no event is skipped or delivered twice."""
        state = p.SubscriptionState(from_index, types, aggregate_prefix)
        return Subscription(self, state)


class Subscription:
    """An iterator of ``RecordedEvent`` over ``GET /subscribe``; ``position`` is the resume
    point (the last index delivered or passed by a checkpoint). ``close()`` (or leaving a
    ``with`` block) ends it."""

    def __init__(self, client: Client, state: p.SubscriptionState) -> None:
        self._client = client
        self._state = state
        self._reconnects: p.Reconnects | None = None
        self._events = self._run()

    @property
    def position(self) -> int:
        return self._state.position

    @property
    def reconnects(self) -> int:
        """How many times the stream broke and was reopened (for logs and tests)."""
        return self._reconnects.count if self._reconnects is not None else 0

    @property
    def last_error(self) -> str:
        """Why the stream last broke ("" if it never did)."""
        return self._reconnects.last_error if self._reconnects is not None else ""

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> RecordedEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self) -> Generator[RecordedEvent, None, None]:
        client = self._client
        reconnects = self._reconnects = p.Reconnects(client.router, client.retry_deadline, time.monotonic())
        timeout = httpx.Timeout(client.timeout, read=client.heartbeat_timeout)
        while True:
            request = self._state.request()
            try:
                with client._http.stream("GET", request.url(reconnects.url), timeout=timeout) as response:
                    if response.status_code != 200:
                        response.read()
                        reason = self._refused(response.status_code, response.content, response.headers)
                    else:
                        reconnects.answered(time.monotonic())
                        parser = p.SseParser()
                        for line in response.iter_lines():
                            reconnects.receiving(time.monotonic())
                            message = parser.feed(line)
                            if message is None:
                                continue
                            event = self._state.accept(message)
                            if event is not None:
                                yield event
                        reason = "the server ended the stream"
            except p.StreamBroken as exc:
                reason = str(exc)
            except httpx.TransportError as exc:
                reason = p.describe(exc)
            wait = reconnects.broken(reason, time.monotonic())
            if wait > 0:
                time.sleep(wait)

    @staticmethod
    def _refused(status: int, raw: bytes, headers: Mapping[str, str]) -> str:
        error = p.error_from(status, p.decode_body(raw, headers.get("content-type")))
        if status < 500:
            raise error  # a definite no (a bad filter): reconnecting gets the same
        return f"HTTP {status} {error.code}"


__all__ = ["Client", "Subscription", "WalstoreClientError"]
