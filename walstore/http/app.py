"""The HTTP API's routes: requests in, ``EventService`` calls, JSON out.

The seed's shapes are the contract; everything else is additive:

========================  =========================================================
POST /events              201 {success, event_id, index, version}
POST /events/batch        201 {success, events: [{event_id, index, version}],
                          first_index, last_index}, plus ``tracking`` when the batch
                          carried a consumer position (then ``events`` may be empty,
                          and both indexes are null); 409 ``tracking_conflict``
GET /consumers/{consumer} 200 {consumer, position}: the stored position, null if none
GET /events/{aggregate}   200 {events, count, version}. An aggregate with no events is
                          200 with ``events: []`` and ``version: 0``: for an event
                          store "no events yet" is an answer, not an error, and
                          ``expected_version: 0`` appends to exactly that state.
                          (``GET /events/batch`` reads the aggregate named "batch".)
GET /events               200 {events, count, last_index, next_index}: the global log,
                          filtered by ``types`` / ``aggregate_prefix``, forward or
                          ``direction=backward``; ``next_index`` is where the scan
                          stopped (the next page starts there; 0 backward at the start).
GET /subscribe            Server-Sent Events: ``id: <index>`` and one ``data:`` JSON
                          event per message, catch-up then live, a ``: heartbeat``
                          comment after ``heartbeat_interval_s`` of silence. Without
                          ``from_index``, ``Last-Event-ID`` resumes after that index.
                          With filters, also ``event: checkpoint`` messages whose
                          ``id:`` is the last index scanned.
GET /status               NodeStatus: the seed's fields, then role, ready, healthy,
                          peers, then ``extra`` (never overriding the fields before)
GET /health               seed shape; 200 healthy, 503 unhealthy
GET /health/live          200 while the process serves HTTP
GET /health/ready         200 when ready (has a leader, caught up, its disk neither
                          full, failed nor slow), else 503 with ``reasons``; 503
                          ``shutting_down`` (the error shape) while the node drains
GET /metrics              Prometheus text
GET /openapi.json         this API's OpenAPI 3.1 description (docs/openapi.yaml)
========================  =========================================================

``ProbeApp`` serves only the health paths and ``/metrics`` (anything else is 404) for the
probe port, whose connection cap strangers on the client port cannot use up
(``walstore.http.server``'s docstring says why a separate port).

An event renders as ``{id, type, timestamp (Unix seconds, the seed's shape), aggregate_id,
payload, metadata, version, index, recorded_at (RFC 3339, microseconds)}``; an event
appended with ``payload_base64`` has ``payload_base64`` (its exact bytes) in place of
``payload``. Payload and
metadata are the JSON text the client sent (``walstore.json_text``), embedded with
``orjson.Fragment`` rather than parsed again. HEAD is
answered like GET without a body.

Errors: a ``RequestError`` is its ``http_status`` with ``{"success": false, "error":
{"code", "message", ...details}}``; ``UnavailableError`` is 503 (``OutcomeUnknown`` 504)
with ``Retry-After`` and the same shape plus ``retry_after_s`` and ``leader_id`` when
known; an unknown path is 404 ``not_found``, a known path with another method 405
``method_not_allowed`` with ``Allow``; anything unexpected is logged and 500.
"""

from __future__ import annotations

import base64
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Set
from functools import partial
from importlib.resources import files
from typing import Final

import orjson
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from walstore.errors import RequestError, UnavailableError, WalstoreError
from walstore.event import MAX_BATCH_EVENTS, NewEvent, StoredEvent, Tracking
from walstore.http.batch_stream import BatchStreamParser
from walstore.http.server import Request, Response, SendChunk, error_body, error_response
from walstore.http.validation import (
    SubscribeParams,
    check_content_type,
    parse_aggregate_id_segment,
    parse_aggregate_read_query,
    parse_append_request,
    parse_batch_with_tracking,
    parse_consumer_segment,
    parse_log_read_query,
    parse_min_index_query,
    parse_subscribe_query,
)
from walstore.metrics import Metrics
from walstore.service import Checkpoint, EventService, NodeStatus

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

_EVENTS_PREFIX: Final = "/events/"
_AGGREGATE_ROUTE: Final = "/events/{aggregate_id}"
_CONSUMERS_PREFIX: Final = "/consumers/"
_CONSUMER_ROUTE: Final = "/consumers/{consumer}"
_UNMATCHED_ROUTE: Final = "unmatched"
_METRICS_CONTENT_TYPE: Final = CONTENT_TYPE_LATEST.encode()
_SSE_HEADERS: Final = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_SSE_HEARTBEAT: Final = b": heartbeat\n\n"
# Retry-After is whole seconds; an hour caps a nonsense hint from a buggy caller.
_MAX_RETRY_AFTER_S: Final = 3600
# Events already waiting in the subscription channel go out in one socket write.
_SSE_COALESCE_EVENTS: Final = 128
# A filtered subscription sends a checkpoint (``event: checkpoint``, ``id:`` the last index
# scanned) once its scan is this far past the last id sent, or after CHECKPOINT_IDLE_S with
# nothing sent: a client that resumes need not scan again what matched nothing.
CHECKPOINT_EVERY_SCANNED: Final = 10_000
CHECKPOINT_IDLE_S: Final = 1.0


@functools.lru_cache(maxsize=4096)
def _utc_second(seconds: int) -> str:
    # Events of one read mostly share their second: format it once, not per event.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def recorded_at(timestamp_us: int) -> str:
    """RFC 3339 in UTC with microseconds: the full time the leader recorded (the seed's
    ``timestamp`` keeps whole seconds)."""
    seconds, micros = divmod(timestamp_us, 1_000_000)
    return f"{_utc_second(seconds)}.{micros:06d}Z"


def event_json(event: StoredEvent) -> dict[str, object]:
    if event.binary:
        return {
            "id": event.id,
            "type": event.type,
            "timestamp": event.timestamp_us // 1_000_000,
            "aggregate_id": event.aggregate_id,
            "payload_base64": base64.b64encode(event.payload).decode("ascii"),
            "metadata": orjson.Fragment(event.metadata),
            "version": event.version,
            "index": event.index,
            "recorded_at": recorded_at(event.timestamp_us),
        }
    return {
        "id": event.id,
        "type": event.type,
        "timestamp": event.timestamp_us // 1_000_000,
        "aggregate_id": event.aggregate_id,
        "payload": orjson.Fragment(event.payload),
        "metadata": orjson.Fragment(event.metadata),
        "version": event.version,
        "index": event.index,
        "recorded_at": recorded_at(event.timestamp_us),
    }


def _sse_message(event: StoredEvent) -> bytes:
    # orjson's output has no raw newline, so one data: line always holds the whole event.
    return b"id: %d\ndata: %s\n\n" % (event.index, orjson.dumps(event_json(event)))


def _sse_checkpoint(index: int) -> bytes:
    # ``id:`` set, so an SSE client's Last-Event-ID resumes after it.
    return b'id: %d\nevent: checkpoint\ndata: {"index":%d}\n\n' % (index, index)


def request_error_response(exc: RequestError) -> Response:
    return Response(exc.http_status, error_body(exc.code, exc.message, exc.details))


def unavailable_response(exc: UnavailableError) -> Response:
    hint = exc.retry_after_s
    retry_after = 1 if not math.isfinite(hint) or hint <= 1 else min(math.ceil(hint), _MAX_RETRY_AFTER_S)
    details: dict[str, object] = {"retry_after_s": retry_after}
    if exc.leader_id is not None:
        details["leader_id"] = exc.leader_id
    return Response(
        exc.http_status,
        error_body(exc.code, exc.message, details),
        headers=[(b"retry-after", b"%d" % retry_after)],
    )


def status_json(status: NodeStatus) -> dict[str, object]:
    body: dict[str, object] = {
        "id": status.id,
        "is_leader": status.is_leader,
        "leader_id": status.leader_id,
        "term": status.term,
        "commit_index": status.commit_index,
        "last_applied": status.last_applied,
        "role": status.role,
        "ready": status.ready,
        "healthy": status.healthy,
        "peers": [
            {
                "id": peer.id,
                "address": peer.address,
                "connected": peer.connected,
                "match_index": peer.match_index,
                "lag": peer.lag,
                "voter": peer.voter,
            }
            for peer in status.peers
        ],
    }
    for key, value in status.extra.items():
        body.setdefault(key, value)
    return body


class HttpApp:
    """Routes requests to an ``EventService``; the server calls ``handle``."""

    def __init__(
        self,
        service: EventService,
        *,
        metrics: Metrics | None = None,
        heartbeat_interval_s: float = 15.0,
        subscribe_buffer_events: int = 1024,
        draining: Callable[[], bool] | None = None,
        checkpoint_idle_s: float = CHECKPOINT_IDLE_S,
        checkpoint_every_scanned: int = CHECKPOINT_EVERY_SCANNED,
        max_batch_events: int = MAX_BATCH_EVENTS,
    ) -> None:
        self.service = service
        # True while the node is stopping: readiness then says so in so many words, so a
        # probe or an operator sees why the node left the Service
        self.draining = draining
        self.metrics = metrics if metrics is not None else Metrics()
        # an SSE comment this often keeps proxies from timing the stream out and lets
        # the server notice a vanished client
        self.heartbeat_interval_s = heartbeat_interval_s
        # events read ahead of a slow SSE client; beyond it the subscription waits
        self.subscribe_buffer_events = subscribe_buffer_events
        self.checkpoint_idle_s = checkpoint_idle_s
        self.checkpoint_every_scanned = checkpoint_every_scanned
        self.max_batch_events = max_batch_events  # POST /events/batch: more is 400 too_many_events
        self._render_limiter = trio.CapacityLimiter(1)  # /metrics renders, see _metrics
        get = "GET"
        self._routes: dict[str, tuple[str, dict[str, Handler]]] = {
            "/events": ("/events", {get: self._read_log, "POST": self._append}),
            "/events/batch": ("/events/batch", {"POST": self._append_batch, get: self._read_aggregate}),
            "/subscribe": ("/subscribe", {get: self._subscribe}),
            "/status": ("/status", {get: self._status}),
            "/health": ("/health", {get: self._health}),
            "/health/live": ("/health/live", {get: self._live}),
            "/health/ready": ("/health/ready", {get: self._ready}),
            "/metrics": ("/metrics", {get: self._metrics}),
            "/openapi.json": ("/openapi.json", {get: self._openapi}),
        }
        self._aggregate_route: tuple[str, dict[str, Handler]] = (
            _AGGREGATE_ROUTE,
            {get: self._read_aggregate},
        )
        self._consumer_route: tuple[str, dict[str, Handler]] = (_CONSUMER_ROUTE, {get: self._read_consumer})

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        route, handler = self._resolve(request)
        try:
            response = await handler(request)
        except RequestError as exc:
            response = request_error_response(exc)
        except UnavailableError as exc:
            response = unavailable_response(exc)
        except Exception:
            # Counted under its route like any answer; the server would only log it.
            log.exception("%s %s failed", request.method, request.path)
            response = error_response(500, "internal_error", "internal server error")
        self.metrics.observe_http(route, response.status, time.perf_counter() - started)
        return response

    def _resolve(self, request: Request) -> tuple[str, Handler]:
        path = request.path
        entry = self._routes.get(path)
        if entry is None:
            if path.startswith(_CONSUMERS_PREFIX):
                segment = path[len(_CONSUMERS_PREFIX) :]
                if not segment or "/" in segment:
                    return _UNMATCHED_ROUTE, _not_found
                entry = self._consumer_route
            else:
                segment = path[len(_EVENTS_PREFIX) :] if path.startswith(_EVENTS_PREFIX) else ""
                if not segment or "/" in segment:
                    return _UNMATCHED_ROUTE, _not_found
                entry = self._aggregate_route
        route, methods = entry
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            return route, partial(_method_not_allowed, methods)
        return route, handler

    # ---------------------------------------------------------------- writes

    async def _append(self, request: Request) -> Response:
        event = parse_append_request(request.body, request.content_type)
        (result,) = await self.service.append([event])
        body = {"success": True, "event_id": result.event_id, "index": result.index, "version": result.version}
        return Response(201, orjson.dumps(body))

    async def _append_batch(self, request: Request) -> Response:
        if request.body_stream is None:
            events, tracking = parse_batch_with_tracking(
                request.body, request.content_type, max_events=self.max_batch_events
            )
            request.body = b""  # not held while the batch commits
        else:
            events, tracking = await self._read_batch_stream(request)
        results = await (self.service.append(events) if tracking is None else self.service.append(events, tracking))
        body: dict[str, object] = {
            "success": True,
            "events": [{"event_id": r.event_id, "index": r.index, "version": r.version} for r in results],
            "first_index": results[0].index if results else None,
            "last_index": results[-1].index if results else None,
        }
        if tracking is not None:
            body["tracking"] = {"consumer": tracking.consumer, "position": tracking.position}
        return Response(201, orjson.dumps(body))

    async def _read_batch_stream(self, request: Request) -> tuple[list[NewEvent], Tracking | None]:
        """A large batch body, checked event by event as it arrives (``batch_stream``): the
        body is never held whole, and a bad event is refused before the rest is read."""
        assert request.body_stream is not None
        check_content_type(request.content_type)
        parser = BatchStreamParser(max_events=self.max_batch_events)
        while (piece := await request.body_stream.next_piece()) is not None:
            parser.feed(piece)
        return parser.finish()

    async def _read_consumer(self, request: Request) -> Response:
        consumer = parse_consumer_segment(request.path[len(_CONSUMERS_PREFIX) :])
        min_index = parse_min_index_query(request.query)
        position = await self.service.consumer_position(consumer, min_index=min_index)
        return Response(200, orjson.dumps({"consumer": consumer, "position": position}))

    # ---------------------------------------------------------------- reads

    async def _read_aggregate(self, request: Request) -> Response:
        aggregate_id = parse_aggregate_id_segment(request.path[len(_EVENTS_PREFIX) :])
        params = parse_aggregate_read_query(request.query)
        read = await self.service.read_aggregate(
            aggregate_id,
            from_version=params.from_version,
            limit=params.limit,
            direction=params.direction,
            min_index=params.min_index,
        )
        events = [event_json(e) for e in read.events]
        return Response(200, orjson.dumps({"events": events, "count": len(events), "version": read.version}))

    async def _read_log(self, request: Request) -> Response:
        params = parse_log_read_query(request.query)
        if params.direction == "forward" and params.types is None and params.aggregate_prefix is None:
            read = await self.service.read_log(
                from_index=params.from_index, limit=params.limit, min_index=params.min_index
            )
        else:
            read = await self.service.read_log(
                from_index=params.from_index,
                limit=params.limit,
                min_index=params.min_index,
                direction=params.direction,
                types=params.types,
                aggregate_prefix=params.aggregate_prefix,
            )
        events = [event_json(e) for e in read.events]
        body = {"events": events, "count": len(events), "last_index": read.last_index, "next_index": read.next_index}
        return Response(200, orjson.dumps(body))

    async def _subscribe(self, request: Request) -> Response:
        last_event_id = request.header(b"last-event-id")
        params = parse_subscribe_query(
            request.query,
            last_event_id=None if last_event_id is None else last_event_id.decode("latin-1"),
        )
        return Response(
            200,
            content_type=b"text/event-stream",
            headers=list(_SSE_HEADERS),
            stream=partial(self._stream_events, params),
        )

    async def _stream_events(self, params: SubscribeParams, send: SendChunk) -> None:
        """Events as they come; with a filter, also a checkpoint of the last index scanned
        once the scan is ``checkpoint_every_scanned`` past the last id sent, or nothing
        was sent for ``checkpoint_idle_s`` (the service reports scan progress as
        ``Checkpoint`` items; this decides which to send). A heartbeat comment after
        ``heartbeat_interval_s`` of silence."""
        sender, receiver = trio.open_memory_channel[StoredEvent | Checkpoint](self.subscribe_buffer_events)
        last_id = params.from_index - 1  # what the client holds (its Last-Event-ID)
        scanned = 0  # a checkpoint not sent yet (0: none)
        last_send_at = trio.current_time()
        async with receiver, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump_subscription, params, sender)
            while True:
                first: StoredEvent | Checkpoint | None = None
                quiet_s = self.checkpoint_idle_s if scanned else self.heartbeat_interval_s
                with trio.move_on_at(last_send_at + quiet_s):
                    try:
                        first = await receiver.receive()
                    except trio.EndOfChannel:
                        return  # the subscription ended: end the response; the client reconnects
                messages: list[bytes] = []
                if first is None:
                    if scanned:
                        messages.append(_sse_checkpoint(scanned))
                        last_id, scanned = scanned, 0
                    else:
                        messages.append(_SSE_HEARTBEAT)
                item = first
                while item is not None:
                    if isinstance(item, Checkpoint):
                        if item.index - last_id >= self.checkpoint_every_scanned:
                            messages.append(_sse_checkpoint(item.index))
                            last_id, scanned = item.index, 0
                        elif item.index > last_id:
                            scanned = item.index
                    else:
                        messages.append(_sse_message(item))
                        last_id = item.index
                        if scanned <= last_id:
                            scanned = 0
                    if len(messages) >= _SSE_COALESCE_EVENTS:
                        break
                    try:
                        item = receiver.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if messages:
                    await send(b"".join(messages))
                    last_send_at = trio.current_time()

    async def _pump_subscription(
        self, params: SubscribeParams, sender: trio.MemorySendChannel[StoredEvent | Checkpoint]
    ) -> None:
        from_index = params.from_index
        if params.types is None and params.aggregate_prefix is None:
            events = self.service.subscribe(from_index=from_index)
        else:
            events = self.service.subscribe(
                from_index=from_index, types=params.types, aggregate_prefix=params.aggregate_prefix
            )
        async with sender:
            try:
                async for event in events:
                    await sender.send(event)
            except WalstoreError as exc:
                log.info("subscription from index %d ended: %s", from_index, exc)
            finally:
                # An async generator must be closed explicitly under trio, or its cleanup
                # runs later in the garbage collector, outside any task.
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                        await aclose()

    # ---------------------------------------------------------------- node state

    async def _status(self, request: Request) -> Response:
        return Response(200, orjson.dumps(status_json(self.service.status()), default=str))

    async def _health(self, request: Request) -> Response:
        status = self.service.status()
        body = {
            "status": "healthy" if status.healthy else "unhealthy",
            "node_id": status.id,
            "is_leader": status.is_leader,
            "leader_id": status.leader_id,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return Response(200 if status.healthy else 503, orjson.dumps(body))

    async def _live(self, request: Request) -> Response:
        return Response(200, b'{"status":"alive"}')

    async def _ready(self, request: Request) -> Response:
        status = self.service.status()
        if self.draining is not None and self.draining():
            return error_response(
                503,
                "shutting_down",
                "this node is shutting down",
                headers=[(b"retry-after", b"1")],
                node_id=status.id,
                leader_id=status.leader_id,
            )
        body: dict[str, object] = {
            "status": "ready" if status.ready else "not_ready",
            "node_id": status.id,
            "is_leader": status.is_leader,
            "leader_id": status.leader_id,
        }
        if not status.ready:
            # Why, so a probe's log or an operator's curl says it without a second request
            # (no_leader, not_caught_up, disk_full, slow_disk, storage_failed, stopping).
            body["reasons"] = status.extra.get("not_ready", [])
        return Response(200 if status.ready else 503, orjson.dumps(body))

    async def _metrics(self, request: Request) -> Response:
        # The state gauges come from the same status as /status, so the two agree; they
        # are built here, on the loop that owns that state, in a few tens of microseconds.
        state = self.metrics.state_families(self.service.status())
        # Rendering the text is the expensive part (5-14 ms of CPU: prometheus_client formats
        # and escapes every sample): in a worker thread it no longer holds the event loop,
        # which takes the GIL back within a switch interval (5 ms). One render at a time, so
        # a burst of scrapes cannot crowd the loop out of the GIL.
        body = await trio.to_thread.run_sync(self.metrics.render, state, limiter=self._render_limiter)
        return Response(200, body, content_type=_METRICS_CONTENT_TYPE)

    async def _openapi(self, request: Request) -> Response:
        return Response(200, _openapi_document())


@functools.cache
def _openapi_document() -> bytes:
    # docs/openapi.yaml as JSON (`make openapi`), shipped inside the package.
    return files("walstore.http").joinpath("openapi.json").read_bytes()


async def _not_found(request: Request) -> Response:
    return error_response(404, "not_found", f"no route for {request.path[:200]}")


async def _method_not_allowed(methods: dict[str, Handler], request: Request) -> Response:
    allowed = sorted({*methods, "HEAD"} if "GET" in methods else methods)
    return error_response(
        405,
        "method_not_allowed",
        f"{request.method} is not allowed here",
        headers=[(b"allow", ", ".join(allowed).encode())],
        allowed=allowed,
    )


PROBE_PATHS: Final[Set[str]] = frozenset(("/health", "/health/live", "/health/ready", "/metrics"))


class ProbeApp:
    """The probe port's application: the health paths and ``/metrics`` of ``app`` (with
    its 405 for other methods), 404 for everything else, so the port that only the kubelet
    can reach offers nothing that reads or writes events."""

    def __init__(self, app: HttpApp) -> None:
        self.app = app

    async def handle(self, request: Request) -> Response:
        if request.path in PROBE_PATHS:
            return await self.app.handle(request)
        return error_response(404, "not_found", f"the probe port serves only {', '.join(sorted(PROBE_PATHS))}")
