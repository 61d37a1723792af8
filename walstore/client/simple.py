"""A small synchronous HTTP client for walstore (the CLI, tests and load tools use it).

stdlib only (http.client, one keep-alive connection); answers are decoded JSON plus the
HTTP status, errors are raised as ``ClientError`` carrying the status and the server's
``{code, message}`` so callers can tell a definite failure (4xx) from an unknown outcome
(timeouts, 504, a dropped connection).
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# The server's MAX_READ_LIMIT: the most events one GET may ask for.
MAX_PAGE_EVENTS = 10_000


class ClientError(Exception):
    def __init__(
        self, status: int, code: str, message: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.headers = headers or {}


@dataclass(slots=True)
class Response:
    status: int
    body: Any
    headers: dict[str, str]


class WalstoreClient:
    def __init__(self, base_url: str, *, timeout_s: float = 10.0, exact_numbers: bool = False) -> None:
        self.host, self.port = parse_url(base_url)
        self.timeout_s = timeout_s
        # Decode answers with loads_exact (numbers keep their text) instead of orjson.
        self.exact_numbers = exact_numbers
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> WalstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None, *, check: bool = True) -> Response:
        data = None if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            self._conn.request(method, path, body=data, headers=headers)
            resp = self._conn.getresponse()
            raw = resp.read()
        except BaseException:
            # The connection's state is unknown after any failure: never reuse it.
            self.close()
            raise
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        ctype = resp.getheader("Content-Type", "")
        decoded: Any = raw.decode("utf-8", "replace")
        if raw and ctype.startswith("application/json"):
            try:
                decoded = loads_exact(raw) if self.exact_numbers else orjson.loads(raw)
            except ValueError:
                pass  # not what it says it is (a proxy's error page): keep the text
        out = Response(resp.status, decoded, {k.lower(): v for k, v in resp.getheaders()})
        if check and resp.status >= 400:
            err = decoded.get("error", {}) if isinstance(decoded, dict) else {}
            code, message = err.get("code", "http_error"), err.get("message", str(decoded)[:200])
            raise ClientError(resp.status, code, message, decoded, out.headers)
        return out

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/events", event).body
        return result

    def append_batch(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/events/batch", {"events": events}).body
        return result

    def read(self, aggregate_id: str, **params: Any) -> dict[str, Any]:
        path = f"/events/{urllib.parse.quote(aggregate_id, safe='')}"
        result: dict[str, Any] = self.request("GET", _with_query(path, params)).body
        return result

    def read_log(self, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", _with_query("/events", params)).body
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/status").body
        return result

    def health(self) -> Response:
        return self.request("GET", "/health", check=False)


def parse_url(base_url: str) -> tuple[str, int]:
    """``http://host:port`` (or ``host:port``) -> (host, port); ValueError saying what is
    wrong otherwise. TLS is not spoken here: put a proxy in front, or use http://."""
    text = base_url.strip()
    try:
        url = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
        port = url.port
    except ValueError as e:
        raise ValueError(f"{base_url!r} is not a URL ({e})") from None
    if url.scheme == "https":
        raise ValueError(f"{base_url!r}: https is not supported (walstore serves plain HTTP)")
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"{base_url!r}: expected http://host:port")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"{base_url!r}: expected http://host:port without a path")
    return url.hostname, port or 80


def _with_query(path: str, params: dict[str, Any]) -> str:
    given = {k: v for k, v in params.items() if v is not None}
    return f"{path}?{urllib.parse.urlencode(given)}" if given else path


# -- what the CLI builds on: exact numbers, retried appends, paged reads, a resumable tail ----


def loads_exact(raw: bytes | str) -> Any:
    """Decode JSON keeping every number's text: the server stores payloads as the client's
    JSON text, and a tool that prints them must not turn ``18446744073709551616`` into a
    float (orjson and 64-bit ints would) or ``1.10`` into ``1.1``. Numbers that would change
    become ``orjson.Fragment``s, which ``orjson.dumps`` writes back verbatim; key order is
    kept because ``json`` builds dicts in document order."""
    return json.loads(raw, parse_float=_fragment, parse_int=_int_or_fragment)


def _fragment(text: str) -> orjson.Fragment:
    return orjson.Fragment(text.encode())


def _int_or_fragment(text: str) -> int | orjson.Fragment:
    value = int(text)
    # orjson.dumps refuses ints outside 64 bits; past them the text itself is the value.
    return value if -(1 << 63) <= value < (1 << 64) else orjson.Fragment(text.encode())


# The server answers 503 only when the event was not stored and will not be (no leader,
# no quorum, a forward never sent: walstore.replication.forward); 504 and any other 5xx,
# a lost connection or our own timeout leave the outcome unknown. Every one of them may
# succeed when asked again with the same id.
DEFINITE_UNAVAILABLE = 503
# How long one attempt may wait for its answer beyond the server's own append timeout
# (walstore.node.APPEND_TIMEOUT_S, 10 s): the server then answers 504 itself, which is
# better news than our socket timing out.
SERVER_APPEND_TIMEOUT_S = 10.0
ATTEMPT_MARGIN_S = 5.0
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
# A Retry-After longer than this is a hint we cap, not a promise we wait out.
MAX_RETRY_AFTER_S = 5.0


class OutcomeUnknownError(Exception):
    """Every attempt of an append failed, and at least one may have reached a server: the
    event may or may not be stored. Retrying with the same id is always safe."""

    def __init__(self, event_id: str, last_error: str) -> None:
        super().__init__(f"outcome unknown for event {event_id} ({last_error}); retry with --id {event_id}")
        self.event_id = event_id
        self.last_error = last_error


class UnreachableError(Exception):
    """No attempt reached any server: nothing was sent, nothing changed."""


@dataclass(slots=True)
class Attempt:
    url: str
    error: str
    retry_after_s: float | None = None


def _retry_after(err: ClientError) -> float | None:
    raw = err.headers.get("retry-after")
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(raw))) if raw is not None else None
    except ValueError:
        return None


def _is_connect_failure(exc: BaseException) -> bool:
    # Refused or unroutable: the request never left this machine, so it cannot have landed.
    return isinstance(exc, ConnectionRefusedError | socket.gaierror) or (
        isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL)
    )


def append_with_retry(
    urls: Sequence[str],
    event: dict[str, Any],
    *,
    timeout_s: float,
    on_retry: Callable[[Attempt], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """POST ``event`` (which must carry its ``id``) until it is answered 201, a definite
    4xx (ClientError), or ``timeout_s`` has passed. 5xx answers and lost connections are
    retried with the same id, moving on to the next URL after a connection failure, and
    waiting out the server's Retry-After. The server answers a repeat of a stored event
    with that event, so a retry never makes a duplicate.

    When time runs out: OutcomeUnknownError if any attempt may have been delivered; else
    the last 503 (ClientError) if a server answered; else UnreachableError. Only the first
    leaves the event's fate open."""
    if "id" not in event:
        raise ValueError("append_with_retry needs an event id: retries must name the same event")
    deadline = clock() + timeout_s
    backoff = FIRST_BACKOFF_S
    maybe_delivered = False
    unavailable: ClientError | None = None
    last = ""
    turn = 0
    while True:
        url = urls[turn % len(urls)]
        remaining = deadline - clock()
        attempt_timeout = max(0.5, min(remaining, SERVER_APPEND_TIMEOUT_S + ATTEMPT_MARGIN_S))
        wait: float | None = None
        try:
            with WalstoreClient(url, timeout_s=attempt_timeout) as client:
                return client.append(event)
        except ClientError as e:
            if e.status < 500:
                raise  # a definite no (4xx): asking again gets the same answer
            maybe_delivered |= e.status != DEFINITE_UNAVAILABLE
            unavailable = e
            last = f"{url}: {e}"
            wait = _retry_after(e)
        except (OSError, http.client.HTTPException) as e:
            if not _is_connect_failure(e):
                maybe_delivered = True
            last = f"{url}: {type(e).__name__}: {e}"
            turn += 1  # that node is down or cut off: try the next one
        if wait is None:
            wait = backoff
            backoff = min(MAX_BACKOFF_S, backoff * 2)
        if clock() + wait >= deadline:
            if maybe_delivered:
                raise OutcomeUnknownError(str(event["id"]), last)
            if unavailable is not None:
                raise unavailable
            raise UnreachableError(last)
        if on_retry is not None:
            on_retry(Attempt(url, last, wait))
        sleep(wait)


def iter_log(
    client: WalstoreClient, *, from_index: int = 1, limit: int | None = None, page: int = MAX_PAGE_EVENTS
) -> Iterator[dict[str, Any]]:
    """Every event of the global log from ``from_index`` (or the first ``limit``), page by
    page: the server caps one answer (1000 by default), and stopping there silently is
    how a tool loses data without anyone noticing."""
    left = limit
    next_index = from_index
    while left is None or left > 0:
        size = page if left is None else min(page, left)
        body = client.read_log(from_index=next_index, limit=size)
        events = body.get("events") or []
        if not events:
            return
        yield from events
        if left is not None:
            left -= len(events)
        next_index = int(body.get("next_index") or events[-1]["index"] + 1)


def iter_aggregate(
    client: WalstoreClient,
    aggregate_id: str,
    *,
    from_version: int | None = None,
    limit: int | None = None,
    direction: str = "forward",
    page: int = MAX_PAGE_EVENTS,
) -> Iterator[dict[str, Any]]:
    """One aggregate's events, page by page (forward from ``from_version``, or backward)."""
    left = limit
    version = from_version
    while left is None or left > 0:
        size = page if left is None else min(page, left)
        body = client.read(aggregate_id, from_version=version, limit=size, direction=direction)
        events = body.get("events") or []
        if not events:
            return
        yield from events
        if left is not None:
            left -= len(events)
        version = int(events[-1]["version"]) + (1 if direction == "forward" else -1)
        if version < 1:
            return


@dataclass(slots=True)
class SseMessage:
    id: str | None
    data: str


def parse_sse(lines: Iterable[bytes]) -> Iterator[SseMessage]:
    """Server-Sent Events from raw lines (the WHATWG format: ``field: value`` lines, a blank
    line ends a message, ``:`` lines are comments such as heartbeats)."""
    event_id: str | None = None
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield SseMessage(event_id, "\n".join(data))
            event_id, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = value
        elif name == "data":
            data.append(value)


def follow(
    urls: Sequence[str],
    *,
    from_index: int,
    idle_timeout_s: float,
    on_reconnect: Callable[[str, str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[SseMessage]:
    """Follow ``GET /subscribe`` forever: catch-up, then live. When the stream breaks (the
    node restarted, failed over, or went silent for ``idle_timeout_s``, several missed
    heartbeats) it reconnects, to the next URL after a failure, sending ``Last-Event-ID`` so
    that the stream resumes right after the last event seen: nothing skipped, nothing twice.

    UnreachableError if the very first connection fails on every URL (a typo in the URL
    should not look like a quiet log)."""
    last_id: str | None = None
    turn = 0
    connected_once = False
    failures = 0
    while True:
        url = urls[turn % len(urls)]
        parts = parse_url(url)
        conn = http.client.HTTPConnection(parts[0], parts[1], timeout=idle_timeout_s)
        reason = ""
        try:
            if last_id is None:
                conn.request("GET", f"/subscribe?from_index={from_index}")
            else:
                conn.request("GET", "/subscribe", headers={"Last-Event-ID": last_id})
            resp = conn.getresponse()
            if resp.status != 200:
                reason = f"HTTP {resp.status}"
            else:
                connected_once, failures = True, 0
                for message in parse_sse(resp):
                    if message.id is not None:
                        last_id = message.id
                    yield message
                reason = "the server ended the stream"
        except (OSError, http.client.HTTPException) as e:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            conn.close()
        failures += 1
        if not connected_once and failures >= len(urls):
            raise UnreachableError(f"{url}: {reason}")
        turn += 1
        if on_reconnect is not None:
            on_reconnect(url, reason)
        sleep(min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** min(failures, 5)))


def discover(url: str, status: dict[str, Any]) -> list[tuple[str, str]]:
    """(node id, URL) of the peers a node's /status lists. A status names peers by their
    peer-protocol address only, so each is guessed to serve HTTP on the asking node's HTTP
    port, as every pod of the Kubernetes StatefulSet does; ``cluster_status`` checks the
    answer comes from the node it expects before trusting it."""
    host, port = parse_url(url)
    http_port = status.get("http_port") or port
    found = []
    for peer in status.get("peers") or []:
        peer_host = str(peer.get("address", "")).rpartition(":")[0].strip("[]") or host
        found.append((str(peer["id"]), f"http://{peer_host}:{http_port}"))
    return found


def cluster_status(
    urls: Sequence[str], *, names: Mapping[str, str] | None = None, timeout_s: float = 2.0
) -> list[dict[str, Any]]:
    """One row per node (id, url, role, term, leader, commit, applied, lag, ready, error),
    in the order given; with one URL, its peers are discovered from its /status. ``names``
    (URL -> node id, e.g. from cluster.json) names the nodes that do not answer and checks
    the ones that do. ``lag`` is how many committed events the node has yet to apply,
    against the leader's commit index (the highest-term node that says it leads)."""
    rows: list[dict[str, Any]] = []
    expected: dict[str, str | None] = {u: (names or {}).get(u) for u in urls}
    leader_view: dict[str, dict[str, Any]] = {}
    pending = list(urls)
    while pending:
        url = pending.pop(0)
        row: dict[str, Any] = {"id": expected[url], "url": url, "error": None}
        try:
            with WalstoreClient(url, timeout_s=timeout_s) as client:
                s = client.status()
        except (ClientError, OSError, http.client.HTTPException, ValueError) as e:
            row["error"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            rows.append(row)
            continue
        if expected[url] is not None and s.get("id") != expected[url]:
            row["error"] = f"answered as {s.get('id')!r}, not as the peer {expected[url]!r}"
            rows.append(row)
            continue
        row.update(
            id=s.get("id"),
            role=s.get("role"),
            term=s.get("term"),
            leader=s.get("leader_id"),
            commit=s.get("commit_index"),
            applied=s.get("last_applied"),
            ready=s.get("ready"),
            is_leader=bool(s.get("is_leader")),
        )
        rows.append(row)
        for peer in s.get("peers") or []:
            leader_view[str(peer["id"])] = peer
        if len(urls) == 1:
            for peer_id, peer_url in discover(url, s):
                if peer_url not in expected:
                    expected[peer_url] = peer_id
                    pending.append(peer_url)
                else:
                    # Nodes on one host with different HTTP ports: the guess names the
                    # asking node again. Show what the leader knows and say what to pass.
                    peer = next(p for p in s["peers"] if str(p["id"]) == peer_id)
                    unknown = f"HTTP address unknown (peer address {peer.get('address')}); pass a --url for each node"
                    rows.append({"id": peer_id, "url": None, "error": unknown})
    leaders = [r for r in rows if r.get("is_leader")]
    commit = int(max(leaders, key=lambda r: int(r["term"] or 0))["commit"]) if leaders else None
    for row in rows:
        applied = row.get("applied")
        row["lag"] = commit - int(applied) if commit is not None and applied is not None else None
        if row["error"] and row["id"] in leader_view:
            peer = leader_view[row["id"]]
            row["error"] += f" (the leader sees it {'connected' if peer.get('connected') else 'DOWN'})"
        row.pop("is_leader", None)
    return rows
