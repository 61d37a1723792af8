"""What ``Client`` and ``AsyncClient`` share, with no I/O: building requests, decoding
answers, the retry decisions of one call, the paging of reads and the state of a
subscription. The two clients only move bytes and sleep; every decision is made here, so
they cannot drift apart, and tests can drive each decision without a server.

Retry rules (``Call``), for every request:

- 2xx: done. A 4xx: a definite answer, raised as its typed error (never retried).
- 503: nothing was stored. Retry after the server's ``Retry-After``; when the answer names
  a ``leader_id`` whose URL is known (``Router`` learns node ids from ``GET /status``),
  go there at once instead.
- 504 or another 5xx, or a connection lost after the request went out: the write may be
  stored. Retry with the same ids (the server answers a repeat with the stored result).
- A connection that could not be made: the next URL, at once; after every URL failed in a
  row, with a growing pause.
- Nothing is retried past the call's deadline: then ``OutcomeUnknown`` for a write that
  may have been stored, else ``Unavailable``.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import httpx
import orjson

from walstore.client.errors import (
    BadRequest,
    Conflict,
    DuplicateEventId,
    NotFound,
    OutcomeUnknown,
    ProtocolViolation,
    TrackingConflict,
    Unavailable,
    WalstoreClientError,
    WrongExpectedVersion,
)
from walstore.client.models import (
    AppendResult,
    BatchResult,
    Direction,
    EventData,
    ExpectedVersion,
    LogPage,
    RecordedEvent,
    Tracking,
)
from walstore.client.simple import parse_url

# The server's MAX_READ_LIMIT is 10,000; 1000 (its default) keeps one answer a few MB.
DEFAULT_PAGE_SIZE: Final = 1000
MAX_PAGE_SIZE: Final = 10_000
# Pauses between attempts that have no Retry-After to go by (a 504, a lost connection,
# every URL refused): doubled each time, from the first to the cap.
FIRST_BACKOFF_S: Final = 0.1
MAX_BACKOFF_S: Final = 2.0
# GET /status on nodes whose id is not known yet, to follow a leader hint: short, because
# it is only an optimisation (a follower forwards writes to the leader anyway).
PROBE_TIMEOUT_S: Final = 1.0
# The server sends ``: heartbeat`` after 15 s without events; three missed ones mean the
# stream is dead even if TCP has not noticed (a partition, a paused node).
SERVER_HEARTBEAT_S: Final = 15.0
DEFAULT_HEARTBEAT_TIMEOUT_S: Final = 3 * SERVER_HEARTBEAT_S
# 503 codes that are about the node that answered, not the cluster: another node may
# take the request now.
NODE_LOCAL_CODES: Final = frozenset({"shutting_down", "storage_failed", "safety_halt", "disk_full", "not_caught_up"})

Kind = Literal["read", "write"]


# -- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, ready for either client: ``params`` go into the query string, in
    order; ``event_ids`` are the ids a write carries (reported by ``OutcomeUnknown``)."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    kind: Kind = "read"
    event_ids: tuple[str, ...] = ()
    # An event read, which takes ``min_index`` (read-your-writes on any node).
    reads_events: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {"content-type": "application/json"} if self.body is not None else {}

    def url(self, base: str) -> str:
        query = f"?{urllib.parse.urlencode(self.params)}" if self.params else ""
        return f"{base}{self.path}{query}"


def normalise_urls(urls: str | Sequence[str]) -> list[str]:
    """``"http://a:1"`` or a list of them -> ``["http://a:1", ...]`` (no trailing slash,
    each checked by ``parse_url``); ValueError for none or a bad one."""
    given = [urls] if isinstance(urls, str) else list(urls)
    if not given:
        raise ValueError("a client needs at least one node URL")
    out: list[str] = []
    for url in given:
        host, port = parse_url(url)
        text = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        if text not in out:
            out.append(text)
    return out


def check_durations(**seconds: float) -> None:
    """ValueError naming the first of ``seconds`` that is not a positive finite number."""
    for name, value in seconds.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _dumps(value: Any) -> bytes:
    # Mappings that are not dicts (MappingProxyType, frozendicts) as objects.
    return orjson.dumps(value, default=_mapping_to_dict)


def _mapping_to_dict(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def check_expected_version(value: ExpectedVersion) -> None:
    """ValueError unless None, an int >= 0 (not a bool) or ``"exists"``."""
    if value is None or value == "exists":
        return
    if type(value) is not int or value < 0:
        raise ValueError(f"expected_version must be None, an int >= 0 or 'exists', got {value!r}")


def event_body(event: EventData, event_id: str) -> dict[str, Any]:
    """An ``EventData`` as the JSON object ``POST /events`` takes, with its id fixed."""
    out: dict[str, Any] = {"id": event_id, "type": event.type, "aggregate_id": event.aggregate_id}
    if event.payload_bytes is not None:
        if event.payload is not None:
            raise ValueError("give payload or payload_bytes, not both")
        out["payload_base64"] = base64.b64encode(bytes(event.payload_bytes)).decode("ascii")
    else:
        out["payload"] = event.payload if event.payload is not None else {}
    if event.metadata is not None:
        out["metadata"] = event.metadata
    check_expected_version(event.expected_version)
    if event.expected_version is not None:
        out["expected_version"] = event.expected_version
    return out


def new_event_id() -> str:
    return str(uuid.uuid4())


def append_request(event: EventData) -> Request:
    event_id = event.id if event.id is not None else new_event_id()
    return Request("POST", "/events", body=_dumps(event_body(event, event_id)), kind="write", event_ids=(event_id,))


def batch_request(events: Sequence[EventData], tracking: Tracking | None) -> Request:
    ids = [e.id if e.id is not None else new_event_id() for e in events]
    if len(set(ids)) != len(ids):
        raise ValueError("the same event id twice in one batch")
    body: dict[str, Any] = {"events": [event_body(e, i) for e, i in zip(events, ids, strict=True)]}
    if tracking is not None:
        if type(tracking.position) is not int or tracking.position < 1:
            raise ValueError(f"a tracking position is an int >= 1, got {tracking.position!r}")
        body["tracking"] = {"consumer": tracking.consumer, "position": tracking.position}
    elif not events:
        raise ValueError("a batch needs at least one event or a tracking position")
    return Request("POST", "/events/batch", body=_dumps(body), kind="write", event_ids=tuple(ids))


def _filter_params(types: Iterable[str] | None, aggregate_prefix: str | None) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if types is not None:
        names = list(types)
        if not names or any(not t or "," in t for t in names):
            raise ValueError(f"types must be non-empty names without commas, got {names!r}")
        params.append(("types", ",".join(names)))
    if aggregate_prefix is not None:
        params.append(("aggregate_prefix", aggregate_prefix))
    return params


def _check_direction(direction: str) -> Direction:
    if direction == "forward":
        return "forward"
    if direction == "backward":
        return "backward"
    raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")


def log_page_request(
    *,
    from_index: int | None,
    limit: int,
    types: Iterable[str] | None = None,
    aggregate_prefix: str | None = None,
    direction: str = "forward",
) -> Request:
    params: list[tuple[str, str]] = []
    if from_index is not None:
        params.append(("from_index", str(from_index)))
    params.append(("limit", str(limit)))
    params.extend(_filter_params(types, aggregate_prefix))
    if _check_direction(direction) == "backward":
        params.append(("direction", "backward"))
    return Request("GET", "/events", tuple(params), reads_events=True)


def aggregate_page_request(aggregate_id: str, *, from_version: int | None, limit: int, direction: str) -> Request:
    params: list[tuple[str, str]] = []
    if from_version is not None:
        params.append(("from_version", str(from_version)))
    params.append(("limit", str(limit)))
    params.append(("direction", _check_direction(direction)))
    return Request("GET", f"/events/{urllib.parse.quote(aggregate_id, safe='')}", tuple(params), reads_events=True)


def at_least(request: Request, min_index: int) -> Request:
    """``request`` asking the node to have applied event ``min_index`` first (it waits,
    then answers 503 ``not_caught_up``, which moves the call to the next node): a client
    then reads its own writes whichever node answers. Only event reads take it."""
    if not request.reads_events or min_index < 1:
        return request
    return replace(request, params=(*request.params, ("min_index", str(min_index))))


def consumer_request(consumer: str) -> Request:
    if not consumer:
        raise ValueError("a consumer needs a name")
    return Request("GET", f"/consumers/{urllib.parse.quote(consumer, safe='')}")


STATUS_REQUEST: Final = Request("GET", "/status")


def subscribe_request(from_index: int, types: Sequence[str] | None, aggregate_prefix: str | None) -> Request:
    params = [("from_index", str(from_index)), *_filter_params(types, aggregate_prefix)]
    return Request("GET", "/subscribe", tuple(params))


# -- answers ------------------------------------------------------------------------------------


def loads(raw: bytes) -> Any:
    """JSON -> Python: orjson, or the stdlib for what orjson refuses (integers past 64
    bits, which the server keeps as the client wrote them)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is not int:
        raise ProtocolViolation(f"the server's answer has no integer {key!r}: {str(dict(obj))[:200]}")
    return value


def _optional_int(obj: Mapping[str, Any], key: str) -> int | None:
    return None if obj.get(key) is None else _int(obj, key)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolViolation(f"{what} is not a JSON object: {str(value)[:200]}")
    return value


def decode_append(body: Any) -> AppendResult:
    obj = _object(body, "the append answer")
    return AppendResult(str(obj.get("event_id")), _int(obj, "index"), _int(obj, "version"))


def decode_batch(body: Any) -> BatchResult:
    obj = _object(body, "the batch answer")
    events = [decode_append(e) for e in obj.get("events") or []]
    tracking_obj = obj.get("tracking")
    tracking = None
    if isinstance(tracking_obj, dict):
        tracking = Tracking(str(tracking_obj.get("consumer")), _int(tracking_obj, "position"))
    return BatchResult(events, _optional_int(obj, "first_index"), _optional_int(obj, "last_index"), tracking)


def decode_event(value: Any) -> RecordedEvent:
    obj = _object(value, "an event")
    payload_bytes: bytes | None = None
    encoded = obj.get("payload_base64")
    if encoded is not None:
        try:
            payload_bytes = base64.b64decode(str(encoded), validate=True)
        except binascii.Error as exc:
            raise ProtocolViolation(f"event {obj.get('id')!r}: payload_base64 is not base64 ({exc})") from None
    return RecordedEvent(
        id=str(obj.get("id")),
        type=str(obj.get("type")),
        aggregate_id=str(obj.get("aggregate_id")),
        version=_int(obj, "version"),
        index=_int(obj, "index"),
        timestamp=_int(obj, "timestamp"),
        recorded_at=obj.get("recorded_at"),
        payload=obj.get("payload") if payload_bytes is None else None,
        payload_bytes=payload_bytes,
        metadata=obj.get("metadata"),
        raw=obj,
    )


def _events(obj: Mapping[str, Any]) -> list[RecordedEvent]:
    events = obj.get("events")
    if not isinstance(events, list):
        raise ProtocolViolation(f"the answer has no events list: {str(dict(obj))[:200]}")
    return [decode_event(e) for e in events]


def decode_log_page(body: Any) -> LogPage:
    obj = _object(body, "the log answer")
    return LogPage(_events(obj), _int(obj, "next_index"), _int(obj, "last_index"))


@dataclass(frozen=True, slots=True)
class AggregatePage:
    events: list[RecordedEvent]
    version: int  # the aggregate's version when the server answered


def decode_aggregate_page(body: Any) -> AggregatePage:
    obj = _object(body, "the aggregate answer")
    return AggregatePage(_events(obj), _int(obj, "version"))


def decode_consumer(body: Any) -> int | None:
    return _optional_int(_object(body, "the consumer answer"), "position")


def decode_status(body: Any) -> dict[str, Any]:
    return _object(body, "the status answer")


def matches(event: RecordedEvent, types: Sequence[str] | None, aggregate_prefix: str | None) -> bool:
    """The contract's filter rule (type among ``types`` and aggregate id starting with the
    prefix), applied again on the client: a server without filters ignores the parameters,
    and the caller still gets only what it asked for."""
    if types is not None and event.type not in types:
        return False
    return aggregate_prefix is None or event.aggregate_id.startswith(aggregate_prefix)


def error_from(status: int, body: Any, reason: str = "") -> WalstoreClientError:
    """The typed error for a 4xx answer (``{"success": false, "error": {...}}``)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"code": "http_error", "message": str(body)[:200] or reason}
    code = str(err.get("code", "http_error"))
    message = str(err.get("message", ""))
    details = {k: v for k, v in err.items() if k not in ("code", "message")}
    cls: type[WalstoreClientError]
    if code == "wrong_expected_version":
        cls = WrongExpectedVersion
    elif code == "duplicate_event_id":
        cls = DuplicateEventId
    elif code == "tracking_conflict":
        cls = TrackingConflict
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    else:
        cls = BadRequest
    return cls(message, status=status, code=code, details=details)


def decode_body(raw: bytes, content_type: str | None) -> Any:
    """JSON if it says so and is; else the text (a proxy's error page)."""
    if raw and (content_type or "").startswith("application/json"):
        try:
            return loads(raw)
        except ValueError:
            pass
    return raw.decode("utf-8", "replace")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: the server never sends one; fall back to backoff
    return max(0.0, seconds) if seconds == seconds else None


# -- the nodes --------------------------------------------------------------------------------


class Router:
    """The node URLs, which one to ask next, and the node id behind each URL once a
    ``/status`` has told it (a leader hint names a node id, not a URL)."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.urls = normalise_urls(urls)
        self._current = 0
        self.node_ids: dict[str, str] = {}

    @property
    def current(self) -> str:
        return self.urls[self._current]

    def advance(self, from_url: str) -> str:
        """The URL after ``from_url`` (the node that failed), which becomes the current one."""
        position = self.urls.index(from_url) if from_url in self.urls else self._current
        self._current = (position + 1) % len(self.urls)
        return self.current

    def prefer(self, url: str) -> None:
        if url in self.urls:
            self._current = self.urls.index(url)

    def url_of(self, node_id: str) -> str | None:
        return next((u for u, i in self.node_ids.items() if i == node_id), None)

    def unknown(self) -> list[str]:
        return [u for u in self.urls if u not in self.node_ids]

    def learn(self, url: str, status: Any) -> None:
        """Remember which node ``url`` is (from its ``GET /status`` answer)."""
        if not isinstance(status, dict):
            return
        node_id = status.get("id")
        if isinstance(node_id, str) and node_id:
            self.node_ids[url] = node_id


# -- one call's attempts ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done:
    body: Any


@dataclass(frozen=True, slots=True)
class Fail:
    error: WalstoreClientError


@dataclass(frozen=True, slots=True)
class Retry:
    """Sleep ``wait_s``, GET /status on ``probe`` first (to learn node ids), then ask ``url``."""

    url: str
    wait_s: float
    probe: list[str] = field(default_factory=list)


Step = Done | Fail | Retry
FailureKind = Literal["not_sent", "maybe_sent"]


class TransportFailure(Exception):
    """A request that got no answer, from the sync client's own connections
    (``_connections``), already sorted into ``kind``."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind


def failure_kind(exc: httpx.TransportError | TransportFailure) -> FailureKind:
    """Whether a transport error can have let the request reach a server: a connection
    that was never made (refused, no route, connect timeout, no free pooled connection)
    cannot; anything after it was made (a reset, a read timeout, a half answer) can."""
    if isinstance(exc, TransportFailure):
        return exc.kind
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.UnsupportedProtocol):
        return "not_sent"
    return "maybe_sent"


def describe(exc: BaseException) -> str:
    if isinstance(exc, TransportFailure):
        return str(exc)  # already "ConnectError: ..." or "ConnectionLost: ..."
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Call:
    """The attempts of one request until it is done, failed, or out of time. Feed it what
    happened (``answered`` / ``failed``) with the current monotonic time; it says what to
    do next. It never sleeps or sends anything itself."""

    def __init__(self, request: Request, router: Router, *, deadline: float, timeout: float) -> None:
        self.request = request
        self.router = router
        self.deadline = deadline
        self.timeout = timeout
        self.url = router.current
        self.attempts = 0
        self.maybe_stored = False
        self._backoff = FIRST_BACKOFF_S
        self._refused_in_row = 0
        self._hinted: set[str] = set()
        self._probed = False  # asked the unknown nodes who they are (once per call)
        self._last: WalstoreClientError | None = None

    def attempt_timeout(self, now: float) -> float:
        """The attempt's own timeout: the client's, cut to what is left of the deadline."""
        return max(0.05, min(self.timeout, self.deadline - now))

    def answered(self, status: int, headers: Mapping[str, str], raw: bytes, now: float) -> Step:
        self.attempts += 1
        self._refused_in_row = 0
        body = decode_body(raw, headers.get("content-type"))
        if 200 <= status < 300:
            self.router.prefer(self.url)
            return Done(body)
        if status < 500:
            return Fail(error_from(status, body))
        error = error_from(status, body)
        if status == 503:
            wait = _retry_after(headers.get("retry-after"))
            self._last = Unavailable(error.message, status=status, code=error.code, details=error.details)
            leader_id = error.details.get("leader_id")
            if isinstance(leader_id, str) and leader_id:
                leader_url = self.router.url_of(leader_id)
                if leader_url is not None and leader_url != self.url and leader_url not in self._hinted:
                    self._hinted.add(leader_url)
                    return self._retry(leader_url, 0.0, now)
                if leader_url is None and self.router.unknown() and not self._probed:
                    self._probed = True
                    return self._retry(self.url, 0.0, now, probe=self.router.unknown())
            next_url = self.router.advance(self.url) if error.code in NODE_LOCAL_CODES else self.url
            return self._retry(next_url, wait if wait is not None else self._next_backoff(), now)
        # 504 outcome_unknown, a 500, a proxy's 502: the request may have been carried out.
        self.maybe_stored = True
        self._last = error
        return self._retry(self.url, self._next_backoff(), now)

    def failed(self, exc: httpx.TransportError | TransportFailure, now: float) -> Step:
        self.attempts += 1
        kind = failure_kind(exc)
        text = f"{self.url}: {describe(exc)}"
        if kind == "maybe_sent":
            self.maybe_stored = True
            self._refused_in_row = 0
            wait = self._next_backoff()
        else:
            self._refused_in_row += 1
            # The next URL at once, until every one has refused in a row.
            wait = self._next_backoff() if self._refused_in_row >= len(self.router.urls) else 0.0
            if self._refused_in_row >= len(self.router.urls):
                self._refused_in_row = 0
        if self._last is None or self._last.status is None or kind == "maybe_sent":
            self._last = WalstoreClientError(text)
        return self._retry(self.router.advance(self.url), wait, now)

    def _next_backoff(self) -> float:
        wait = self._backoff
        self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)
        return wait

    def _retry(self, url: str, wait: float, now: float, probe: list[str] | None = None) -> Step:
        if now + wait >= self.deadline:
            return Fail(self.give_up())
        self.url = url
        return Retry(url, wait, probe or [])

    def give_up(self) -> WalstoreClientError:
        last = self._last
        what = f"{self.request.method} {self.request.path}"
        summary = f"{what}: no success in {self.attempts} attempts; last: {last.message if last else 'none'}"
        status = last.status if last is not None else None
        code = last.code if last is not None else None
        details = last.details if last is not None else None
        if self.request.kind == "write" and self.maybe_stored:
            return OutcomeUnknown(summary, event_ids=self.request.event_ids, status=status, code=code, details=details)
        return Unavailable(summary, status=status, code=code, details=details)


# -- reads that page ----------------------------------------------------------------------------


def _page_size(page_size: int) -> int:
    if type(page_size) is not int or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be an int in 1..{MAX_PAGE_SIZE}, got {page_size!r}")
    return page_size


def _check_limit(limit: int | None) -> None:
    if limit is not None and (type(limit) is not int or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")


class LogPager:
    """The requests of a paged read of the global log and when it is over. Forward, it
    ends when a page's ``next_index`` has passed that page's ``last_index`` (the scan
    reached the end of the log, however few events matched); backward, at index 0."""

    def __init__(
        self,
        *,
        from_index: int | None,
        types: Sequence[str] | None,
        aggregate_prefix: str | None,
        direction: str,
        limit: int | None,
        page_size: int,
    ) -> None:
        _check_limit(limit)
        self.direction = _check_direction(direction)
        self.next_index = from_index if from_index is not None or self.direction == "backward" else 1
        self.types = list(types) if types is not None else None
        self.aggregate_prefix = aggregate_prefix
        self.left = limit
        self.page_size = _page_size(page_size)
        self.done = limit == 0 or (self.direction == "backward" and self.next_index is not None and self.next_index < 1)

    def request(self) -> Request:
        size = self.page_size if self.left is None else min(self.page_size, self.left)
        return log_page_request(
            from_index=self.next_index,
            limit=size,
            types=self.types,
            aggregate_prefix=self.aggregate_prefix,
            direction=self.direction,
        )

    def feed(self, page: LogPage) -> list[RecordedEvent]:
        """The page's events the caller gets (filtered again, cut to the limit)."""
        events = [e for e in page.events if matches(e, self.types, self.aggregate_prefix)]
        if self.left is not None:
            events = events[: self.left]
            self.left -= len(events)
        before = self.next_index
        self.next_index = page.next_index
        if self.left == 0:
            self.done = True
        elif self.direction == "forward":
            stuck = before is not None and page.next_index <= before and not page.events
            self.done = page.next_index > page.last_index or stuck
        else:
            stuck = before is not None and page.next_index >= before
            self.done = page.next_index < 1 or stuck
        return events


class AggregatePager:
    """The requests of a paged read of one aggregate, by version."""

    def __init__(
        self, aggregate_id: str, *, from_version: int | None, direction: str, limit: int | None, page_size: int
    ) -> None:
        _check_limit(limit)
        self.aggregate_id = aggregate_id
        self.direction = _check_direction(direction)
        self.next_version = from_version if from_version is not None or self.direction == "backward" else 1
        self.left = limit
        self.page_size = _page_size(page_size)
        self.done = limit == 0

    def request(self) -> Request:
        size = self.page_size if self.left is None else min(self.page_size, self.left)
        return aggregate_page_request(
            self.aggregate_id, from_version=self.next_version, limit=size, direction=self.direction
        )

    def feed(self, page: AggregatePage) -> list[RecordedEvent]:
        events = page.events if self.left is None else page.events[: self.left]
        if self.left is not None:
            self.left -= len(events)
        if not events or self.left == 0:
            self.done = True
            return events
        last = events[-1].version
        if self.direction == "forward":
            self.next_version = last + 1
            self.done = last >= page.version
        else:
            self.next_version = last - 1
            self.done = self.next_version < 1
        return events


# -- subscriptions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseMessage:
    id: str | None
    event: str | None
    data: str


class SseParser:
    """Server-Sent Events, one line at a time (the WHATWG rules this server's stream
    needs: ``field: value``, a blank line ends a message, ``:`` lines are comments)."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> SseMessage | None:
        line = line.rstrip("\r\n")
        if not line:
            message = None
            if self._data or self._event is not None:
                message = SseMessage(self._id, self._event, "\n".join(self._data))
            self._id, self._event, self._data = None, None, []
            return message
        if line.startswith(":"):
            return None  # a comment: the server's heartbeat
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


class StreamBroken(Exception):
    """The stream skipped an index it must not have skipped: reconnect from the resume point."""


class SubscriptionState:
    """Where a subscription is: ``position`` is the last index delivered to the caller or
    passed by a checkpoint, and every (re)connection asks for ``position + 1``. An event at
    or below it is a repeat and dropped; without filters an event past ``position + 1``
    means the stream skipped one, so it is dropped too and the stream reopened."""

    def __init__(self, from_index: int, types: Sequence[str] | None, aggregate_prefix: str | None) -> None:
        if type(from_index) is not int or from_index < 1:
            raise ValueError(f"from_index must be an int >= 1, got {from_index!r}")
        self.position = from_index - 1
        self.types = list(types) if types is not None else None
        self.aggregate_prefix = aggregate_prefix
        _filter_params(self.types, aggregate_prefix)  # the same checks as the request's
        self.filtered = self.types is not None or aggregate_prefix is not None

    def request(self) -> Request:
        return subscribe_request(self.position + 1, self.types, self.aggregate_prefix)

    def accept(self, message: SseMessage) -> RecordedEvent | None:
        """The event to hand to the caller, or None (a checkpoint, a repeat, a filtered one)."""
        if message.event == "checkpoint":
            index = _checkpoint_index(message)
            if index is not None and index > self.position:
                self.position = index
            return None
        if message.event not in (None, "message"):
            return None  # a kind this client does not know: nothing to deliver
        try:
            event = decode_event(loads(message.data.encode()))
        except ValueError:
            raise StreamBroken(f"unreadable event data: {message.data[:200]!r}") from None
        if event.index <= self.position:
            return None
        if not self.filtered and event.index != self.position + 1:
            raise StreamBroken(f"the stream jumped from index {self.position} to {event.index}")
        self.position = event.index
        return event if matches(event, self.types, self.aggregate_prefix) else None


def _checkpoint_index(message: SseMessage) -> int | None:
    try:
        data = loads(message.data.encode()) if message.data else None
    except ValueError:
        data = None
    if isinstance(data, dict) and type(data.get("index")) is int:
        return int(data["index"])
    if message.id is not None and message.id.isdigit():
        return int(message.id)
    return None


class Reconnects:
    """When a subscription reconnects, and where. After a stream that delivered anything
    (an event, a heartbeat), the next URL at once; after failures in a row, with a growing
    pause. Unavailable once no node has answered for ``deadline_s``: a subscription
    outlives a failover, not an outage of every node."""

    def __init__(self, router: Router, deadline_s: float, now: float) -> None:
        self.router = router
        self.deadline_s = deadline_s
        self.url = router.current
        self.last_ok = now
        self.failures = 0
        self.count = 0  # reconnections so far
        self.last_error = ""

    def answered(self, now: float) -> None:
        """A node answered 200: the clock of the deadline starts again."""
        self.last_ok = now

    def receiving(self, now: float) -> None:
        """The stream carried a line: it works, so the next break is not a failure in a
        row, and the deadline counts from now (a stream that ran for a day breaks with
        the whole deadline ahead of it)."""
        self.failures = 0
        self.last_ok = now

    def broken(self, reason: str, now: float) -> float:
        """The pause before the next connection (to ``self.url``, the next node);
        Unavailable past the deadline."""
        self.last_error = f"{self.url}: {reason}"
        if now - self.last_ok >= self.deadline_s:
            raise Unavailable(f"subscription: no node answered for {self.deadline_s:g} s; last: {self.last_error}")
        wait = 0.0 if self.failures == 0 else min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** min(self.failures - 1, 5))
        self.failures += 1
        self.count += 1
        self.url = self.router.advance(self.url)
        return wait
