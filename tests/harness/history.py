"""A load client that records a history: K worker threads append (and read) for T seconds
against a set of walstore nodes and write every operation down for ``walstore.checker``.

Threads with blocking ``http.client`` rather than trio tasks: simple, obviously correct, and a
fault test can run it in the background while its own thread kills and pauses processes.
Each worker keeps one keep-alive connection per node and picks a node at random per
operation. The load is small and deliberately conflicting: a few aggregates, some appends
with ``expected_version`` (many get 409, which exercises the definite-failure path), some
with client-chosen ids (an ``info`` one is retried once with the same id and body, which
exercises idempotency), and reads of each aggregate's newest versions with ``min_index`` set
to the highest index acknowledged before the read began (read-your-writes on any node).

History format: a list of dicts, written as JSON lines when ``history_path`` is given::

    {"op": "append", "worker", "key", "aggregate", "id", "expected_version", "node", "start",
     "end", "status", "index", "version", "http_status", "error_code"}
    {"op": "read", "worker", "aggregate", "from_version", "limit", "min_index", "node",
     "start", "end", "status", "events": [[id, index, version], ...], "http_status",
     "error_code"}

``start``/``end`` are ``time.monotonic()`` of this process. ``key`` names the logical append
and is stored in the event's payload under ``checker.KEY_FIELD``; ``id`` is the client's id,
or the server's once acknowledged. Outcomes:

- ``ok``: 201 (append) / 200 (read).
- ``fail`` (definitely not applied): any 4xx (409 conflicts, 400 ...), 503, or a connection
  that could not be opened (nothing was sent).
- ``info`` (may or may not be applied): a timeout, a connection lost after the request was
  sent, 504, any other 5xx, an unreadable answer.

``retry_clean_close`` makes the workers behave like a careful HTTP/1.1 client (urllib3's
``is_connection_dropped``, RFC 9112 9.3.1): a keep-alive connection the server has closed
while it sat idle is noticed before reuse and replaced, and a request on a reused connection
answered by a clean end of stream (EOF, not a byte of an answer, not a reset) is sent once
more on a new connection. That is safe only if the server never serves a request it then
closes on without answering, which is what walstore's graceful stop promises; a server
that broke the promise would show up in the checker as a duplicate. What happened is counted
in ``LoadClient.connection_events``.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import itertools
import random
import select
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson

from walstore.checker import KEY_FIELD
from walstore.errors import ConfigError, ValidationError

# Hard ceiling on operations per run whatever the settings say: history memory stays bounded.
MAX_OPS_CEILING = 1_000_000


@dataclass(frozen=True, slots=True)
class LoadConfig:
    workers: int = 4
    duration_s: float = 3.0
    max_ops: int = 20_000  # across all workers; the run stops at whichever limit comes first
    aggregates: int = 5  # few, so appends to one aggregate race each other
    read_ratio: float = 0.1
    expected_version_ratio: float = 0.3
    client_id_ratio: float = 0.5
    retry_info_ratio: float = 0.5  # of info appends with a client id: retried once
    read_window: int = 10  # a read asks for the newest this-many versions (limit 5x that)
    request_timeout_s: float = 5.0  # below the server's 10 s append timeout: we see info first
    seed: int | None = None
    aggregate_prefix: str = "history"
    retry_clean_close: bool = False  # see the module docstring

    def validate(self) -> LoadConfig:
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers {self.workers}: between 1 and 64")
        if not 0 < self.duration_s <= 3600:
            raise ConfigError(f"duration_s {self.duration_s}: above 0, at most an hour")
        if not 1 <= self.max_ops <= MAX_OPS_CEILING:
            raise ConfigError(f"max_ops {self.max_ops}: between 1 and {MAX_OPS_CEILING}")
        if not 1 <= self.aggregates <= 10_000:
            raise ConfigError(f"aggregates {self.aggregates}: between 1 and 10000")
        for name in ("read_ratio", "expected_version_ratio", "client_id_ratio", "retry_info_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: between 0 and 1")
        if not 1 <= self.read_window <= 1000:
            raise ConfigError(f"read_window {self.read_window}: between 1 and 1000")
        if not 0 < self.request_timeout_s <= 600:
            raise ConfigError(f"request_timeout_s {self.request_timeout_s}: above 0, at most 600")
        return self


def classify(http_status: int) -> str:
    """ok / fail / info for an HTTP answer (see the module docstring)."""
    if http_status in (200, 201):
        return "ok"
    if 400 <= http_status < 500 or http_status == 503:
        return "fail"
    return "info"


class _ConnectFailed(Exception):
    """The connection could not be opened: nothing was sent, so the outcome is definite."""


@dataclass(slots=True)
class _Answer:
    http_status: int | None
    body: Any
    status: str
    error_code: str | None


class _Shared:
    """What workers learn from each other: aggregate versions and the highest acked index."""

    def __init__(self, max_ops: int) -> None:
        self.lock = threading.Lock()
        self.versions: dict[str, int] = {}
        self.max_acked_index = 0
        self._budget = max_ops

    def take_op(self) -> bool:
        with self.lock:
            if self._budget <= 0:
                return False
            self._budget -= 1
            return True

    def saw_version(self, aggregate: str, version: int) -> None:
        with self.lock:
            if version > self.versions.get(aggregate, 0):
                self.versions[aggregate] = version

    def saw_ack(self, aggregate: str, index: int, version: int) -> None:
        with self.lock:
            self.max_acked_index = max(self.max_acked_index, index)
            if version > self.versions.get(aggregate, 0):
                self.versions[aggregate] = version

    def version(self, aggregate: str) -> int:
        with self.lock:
            return self.versions.get(aggregate, 0)


class LoadClient:
    """``with LoadClient(nodes, duration_s=10) as load: <faults>`` then ``load.history``;
    or ``run_load(nodes, ...)``. ``nodes`` maps node id -> base URL (the id is recorded), or
    is a list of URLs (the URL is recorded)."""

    def __init__(
        self,
        nodes: Mapping[str, str] | Sequence[str],
        config: LoadConfig | None = None,
        *,
        history_path: Path | None = None,
        **overrides: Any,
    ) -> None:
        self.config = replace(config or LoadConfig(), **overrides).validate()
        targets = dict(nodes) if isinstance(nodes, Mapping) else {url: url for url in nodes}
        if not targets:
            raise ConfigError("the load client needs at least one node")
        self._targets = [(name, _host_port(url)) for name, url in sorted(targets.items())]
        self.history_path = history_path
        self.run_id = uuid.uuid4().hex[:8]  # keeps keys and aggregates apart across runs
        seed = self.config.seed if self.config.seed is not None else random.randrange(2**32)
        self.seed = seed
        self._aggregates = [f"{self.config.aggregate_prefix}-{self.run_id}-{i}" for i in range(self.config.aggregates)]
        self._shared = _Shared(self.config.max_ops)
        self._records: list[dict[str, Any]] = []
        self._records_lock = threading.Lock()
        self._out: IO[bytes] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._deadline = 0.0
        # closed_while_idle / reset_while_idle: noticed before reuse; clean_close_retried
        self.connection_events: collections.Counter[str] = collections.Counter()

    # -- running ---------------------------------------------------------------------------

    def start(self) -> LoadClient:
        if self._threads:
            raise ConfigError("load client already started")
        if self.history_path is not None:
            self._out = open(self.history_path, "ab")  # noqa: SIM115 (closed in join)
        self._deadline = time.monotonic() + self.config.duration_s
        for worker in range(self.config.workers):
            thread = threading.Thread(target=self._worker_main, args=(worker,), name=f"load-{worker}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        """Ask the workers to stop after their current operation."""
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Wait for the run to end by itself (or after ``stop()``); returns the history.
        A worker bug is re-raised here rather than silently shortening the history."""
        limit = timeout_s if timeout_s is not None else self.config.duration_s + 2 * self.config.request_timeout_s + 10
        deadline = time.monotonic() + limit
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if self._out is not None and not alive:
            self._out.close()
            self._out = None
        if alive:
            raise TimeoutError(f"load workers {alive} still running after {limit:.1f}s")
        if self._errors:
            raise self._errors[0]
        return self.history

    def __enter__(self) -> LoadClient:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.stop()
            with contextlib.suppress(Exception):
                self.join()
            return
        self.join()

    @property
    def history(self) -> list[dict[str, Any]]:
        with self._records_lock:
            return list(self._records)

    # -- one worker ------------------------------------------------------------------------

    def _worker_main(self, worker: int) -> None:
        rng = random.Random(self.seed * 1000 + worker)
        conns: dict[str, http.client.HTTPConnection] = {}
        counter = itertools.count()
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline and self._shared.take_op():
                if rng.random() < self.config.read_ratio:
                    self._read(worker, rng, conns)
                else:
                    self._append(worker, rng, conns, next(counter))
        except BaseException as exc:  # a harness bug: surfaced by join()
            self._errors.append(exc)
        finally:
            for conn in conns.values():
                conn.close()

    def _append(self, worker: int, rng: random.Random, conns: dict[str, http.client.HTTPConnection], n: int) -> None:
        cfg = self.config
        aggregate = rng.choice(self._aggregates)
        key = f"{self.run_id}-w{worker}-{n}"
        client_id = str(uuid.UUID(int=rng.getrandbits(128), version=4)) if rng.random() < cfg.client_id_ratio else None
        expected = self._shared.version(aggregate) if rng.random() < cfg.expected_version_ratio else None
        body: dict[str, Any] = {
            "type": "HistoryTest",
            "aggregate_id": aggregate,
            "payload": {KEY_FIELD: key, "worker": worker, "n": n},
            "metadata": {"run": self.run_id},
        }
        if client_id is not None:
            body["id"] = client_id
        if expected is not None:
            body["expected_version"] = expected
        raw = orjson.dumps(body)
        attempts = 2 if client_id is not None and rng.random() < cfg.retry_info_ratio else 1
        for _ in range(attempts):
            node, address = rng.choice(self._targets)
            start = time.monotonic()
            answer = self._call(conns, node, address, "POST", "/events", raw)
            end = time.monotonic()
            index = version = None
            event_id = client_id
            if answer.status == "ok":
                try:
                    index, version = int(answer.body["index"]), int(answer.body["version"])
                    event_id = str(answer.body["event_id"])
                except (KeyError, TypeError, ValueError):
                    # 201 with a body we cannot read: it may be applied, we don't know where.
                    answer.status, answer.error_code = "info", "bad_answer"
                else:
                    self._shared.saw_ack(aggregate, index, version)
            elif answer.error_code == "wrong_expected_version":
                current = _detail(answer.body, "current_version")
                if isinstance(current, int):
                    self._shared.saw_version(aggregate, current)
            self._record(
                {
                    "op": "append",
                    "worker": worker,
                    "key": key,
                    "aggregate": aggregate,
                    "id": event_id,
                    "expected_version": expected,
                    "node": node,
                    "start": start,
                    "end": end,
                    "status": answer.status,
                    "index": index,
                    "version": version,
                    "http_status": answer.http_status,
                    "error_code": answer.error_code,
                }
            )
            if answer.status != "info" or self._stop.is_set():
                return

    def _read(self, worker: int, rng: random.Random, conns: dict[str, http.client.HTTPConnection]) -> None:
        cfg = self.config
        aggregate = rng.choice(self._aggregates)
        with self._shared.lock:
            min_index = self._shared.max_acked_index
            known = self._shared.versions.get(aggregate, 0)
        from_version = max(1, known - cfg.read_window + 1)
        limit = cfg.read_window * 5
        query = urllib.parse.urlencode({"from_version": from_version, "limit": limit, "min_index": min_index})
        path = f"/events/{urllib.parse.quote(aggregate, safe='')}?{query}"
        node, address = rng.choice(self._targets)
        start = time.monotonic()
        answer = self._call(conns, node, address, "GET", path, None)
        end = time.monotonic()
        events: list[list[Any]] | None = None
        if answer.status == "ok":
            try:
                events = [[str(e["id"]), int(e["index"]), int(e["version"])] for e in answer.body["events"]]
            except (KeyError, TypeError, ValueError):
                answer.status, answer.error_code = "info", "bad_answer"
        self._record(
            {
                "op": "read",
                "worker": worker,
                "aggregate": aggregate,
                "from_version": from_version,
                "limit": limit,
                "min_index": min_index,
                "node": node,
                "start": start,
                "end": end,
                "status": answer.status,
                "events": events,
                "http_status": answer.http_status,
                "error_code": answer.error_code,
            }
        )

    def _call(
        self,
        conns: dict[str, http.client.HTTPConnection],
        node: str,
        address: tuple[str, int],
        method: str,
        path: str,
        body: bytes | None,
    ) -> _Answer:
        if not self.config.retry_clean_close:
            return self._call_once(conns, node, address, method, path, body)
        conn = conns.get(node)
        if conn is not None and conn.sock is not None:
            dropped = _dropped_by_peer(conn.sock)
            if dropped is not None:
                self._count(dropped)
                _drop(conns, node)
        reused = node in conns
        answer = self._call_once(conns, node, address, method, path, body)
        if reused and answer.error_code == "connection_lost:RemoteDisconnected":
            # A clean close between requests (the server had not seen ours): send it again.
            self._count("clean_close_retried")
            answer = self._call_once(conns, node, address, method, path, body)
        return answer

    def _count(self, event: str) -> None:
        with self._records_lock:
            self.connection_events[event] += 1

    def _call_once(
        self,
        conns: dict[str, http.client.HTTPConnection],
        node: str,
        address: tuple[str, int],
        method: str,
        path: str,
        body: bytes | None,
    ) -> _Answer:
        conn = conns.get(node)
        try:
            if conn is None or conn.sock is None:
                conn = http.client.HTTPConnection(*address, timeout=self.config.request_timeout_s)
                conns[node] = conn
                try:
                    conn.connect()
                except OSError as exc:
                    raise _ConnectFailed(type(exc).__name__) from exc
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            if (response.getheader("Connection") or "").lower() == "close":
                conn.close()
        except _ConnectFailed as exc:
            conns.pop(node, None)
            return _Answer(None, None, "fail", f"connect_failed:{exc}")
        except TimeoutError:  # (socket.timeout) before OSError, whose subclass it is
            _drop(conns, node)
            return _Answer(None, None, "info", "timeout")
        except (OSError, http.client.HTTPException) as exc:
            # Sent, or possibly sent: the server may have applied it.
            _drop(conns, node)
            return _Answer(None, None, "info", f"connection_lost:{type(exc).__name__}")
        status = classify(response.status)
        try:
            decoded = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return _Answer(response.status, None, "info" if status == "ok" else status, "bad_json")
        code = _error_code(decoded) if status != "ok" else None
        return _Answer(
            response.status, decoded, status, code or (None if status == "ok" else f"http_{response.status}")
        )

    def _record(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record) + b"\n" if self._out is not None else b""
        with self._records_lock:
            self._records.append(record)
            if self._out is not None:
                self._out.write(line)


def _dropped_by_peer(sock: socket.socket) -> str | None:
    """Has the server ended this idle keep-alive connection? An idle connection has nothing
    to read, so anything readable is its end: ``closed_while_idle`` (EOF, or stray bytes) or
    ``reset_while_idle``; None if it is still open."""
    poller = select.poll()  # not select(): a busy test process may have fds above 1024
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return None
    try:
        sock.recv(1, socket.MSG_PEEK)
    except ConnectionResetError:
        return "reset_while_idle"
    except OSError:
        pass
    return "closed_while_idle"


def _drop(conns: dict[str, http.client.HTTPConnection], node: str) -> None:
    conn = conns.pop(node, None)
    if conn is not None:
        conn.close()


def _error_code(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        return str(code) if code is not None else None
    return None


def _detail(body: Any, name: str) -> Any:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get(name)
    return None


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"expected http://host:port, got {url!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError(f"bad port in {url!r}") from None
    return parts.hostname, port


def run_load(
    nodes: Mapping[str, str] | Sequence[str], *, history_path: Path | None = None, **config: Any
) -> list[dict[str, Any]]:
    """Run the load to completion (``duration_s`` or ``max_ops``) and return the history."""
    return LoadClient(nodes, history_path=history_path, **config).start().join()


def write_history(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "wb") as out:
        for record in records:
            out.write(orjson.dumps(record) + b"\n")


def load_history(path: Path) -> list[dict[str, Any]]:
    """A history written as JSON lines; ValidationError names the first bad line."""
    return list(_iter_history(path))


def _iter_history(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as source:
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValidationError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(record, dict):
                raise ValidationError(f"{path}:{number}: not a JSON object")
            yield record
