"""Hostile HTTP clients against a real ``walstore serve`` process (the embedded single node).

One server for the whole module, started with a few good events in its log. Then:
slowloris (a request head dribbled at 1 byte/s), a 64 MiB body (with and without
Content-Length), JSON nested 100k deep, invalid UTF-8, NaN/Infinity, lone surrogates,
ids over their limits, and 10,000 idle connections. After every test the process is still
running and ``GET /events`` shows exactly the good events, so no bad request changed the
log (``assert_log_is_only_the_good_events``).

The server's HTTP timeouts (``HttpLimits`` in walstore/http/server.py) are not settable
from the environment: ``walstore serve`` only maps MAX_BODY_BYTES (default 1 MiB) onto
them. So these tests run against the defaults: a request head must arrive within 10 s
(``header_timeout_s``), and at most 10,000 connections are served (``max_connections``).
"""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.test_single_node_process import Server
from walstore.client import WalstoreClient
from walstore.http.server import HttpLimits

pytestmark = pytest.mark.slow

LIMITS = HttpLimits()  # what `walstore serve` runs with (see the module docstring)
MAX_BODY_BYTES = LIMITS.max_body_bytes
IDLE_CONNECTIONS = 10_000
# The test process holds IDLE_CONNECTIONS sockets plus the ones beyond the cap, and the
# server (which inherits this limit) holds as many: room for both with some to spare.
NEEDED_FDS = IDLE_CONNECTIONS + 1024
RSS_BOUND_MB = 600


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < NEEDED_FDS:
        if hard != resource.RLIM_INFINITY and hard < NEEDED_FDS:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {NEEDED_FDS}: cannot hold {IDLE_CONNECTIONS} connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (NEEDED_FDS, hard))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[str]]]:
    """The running server and the ids of the good events in its log, in order."""
    raise_fd_limit()  # before the server starts: it inherits the limit
    root = tmp_path_factory.mktemp("hostile_http")
    server = Server(root / "data", root / "server.log")
    server.start()
    try:
        with WalstoreClient(server.url) as client:
            ids = [
                client.append({"type": "Good", "aggregate_id": f"good-{i % 2}", "payload": {"i": i}})["event_id"]
                for i in range(5)
            ]
        yield server, ids
    finally:
        assert server.proc is not None
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def server(good: tuple[Server, list[str]]) -> Iterator[Server]:
    s, ids = good
    yield s
    assert_log_is_only_the_good_events(s, ids)


def assert_log_is_only_the_good_events(server: Server, ids: list[str]) -> None:
    assert server.proc is not None and server.proc.poll() is None, "the server process died"
    with WalstoreClient(server.url) as client:
        assert client.health().status == 200
        log = client.read_log(from_index=1, limit=10_000)
    assert [e["id"] for e in log["events"]] == ids
    assert [e["index"] for e in log["events"]] == list(range(1, len(ids) + 1))


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body (every non-streaming walstore answer)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionAbortedError(f"connection closed before a whole response head: {raw!r}")
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split(" ", 2)[1]), headers, body


def assert_error(body: Any, code: str | None = None) -> None:
    """The JSON error shape: ``{"success": false, "error": {"code", "message", ...}}``."""
    assert isinstance(body, dict) and body.get("success") is False, body
    error = body["error"]
    assert isinstance(error.get("code"), str) and isinstance(error.get("message"), str), body
    if code is not None:
        assert error["code"] == code, body


def assert_closed(sock: socket.socket, timeout_s: float = 5.0) -> None:
    """The server closed the connection: EOF or reset, no more bytes."""
    sock.settimeout(timeout_s)
    try:
        assert sock.recv(65536) == b""
    except ConnectionResetError:
        pass


def get_health(server: Server) -> tuple[int, float]:
    started = time.monotonic()
    with WalstoreClient(server.url, timeout_s=5) as client:
        status = client.health().status
    return status, time.monotonic() - started


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# -- slow and big ---------------------------------------------------------------------------------


def test_slowloris_head_is_cut_off_after_the_header_timeout(server: Server) -> None:
    head = b"GET /health HTTP/1.1\r\nhost: slow\r\nx-padding: " + b"z" * 64 + b"\r\n\r\n"
    sock = connect(server)
    started = time.monotonic()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    answered_meanwhile = False
    try:
        for sent, byte in enumerate(head):
            sock.sendall(bytes([byte]))
            if selector.select(timeout=1.0):  # 1 byte/s, until the server speaks
                break
            if sent == 3:
                # The dribbling client holds one connection, not the server.
                status, took = get_health(server)
                assert status == 200 and took < 3.0, (status, took)
                answered_meanwhile = True
        else:
            raise AssertionError("the server waited for the whole dribbled head")
        status, _, body = read_response(sock)
        elapsed = time.monotonic() - started
        assert status == 408, body
        assert_error(orjson.loads(body), "header_timeout")
        assert LIMITS.header_timeout_s - 0.5 <= elapsed <= LIMITS.header_timeout_s + 3, elapsed
        assert_closed(sock)
        assert answered_meanwhile
    finally:
        selector.close()
        sock.close()


def stream_body(sock: socket.socket, total: int, progress: list[int], *, chunked: bool) -> None:
    """Send ``total`` body bytes (or until the server breaks the connection), counting them
    in ``progress[0]``."""
    chunk = b"x" * (256 * 1024)
    frame = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
    try:
        while progress[0] < total:
            sock.sendall(frame)
            progress[0] += len(chunk)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # reset or broken pipe: the server stopped reading, as it should


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_64_mib_body_is_refused_before_it_is_sent(server: Server, chunked: bool) -> None:
    total = 64 * 1024 * 1024
    sock = connect(server)
    framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % total
    sock.sendall(b"POST /events HTTP/1.1\r\nhost: big\r\ncontent-type: application/json\r\n%b\r\n\r\n" % framing)
    progress = [0]
    sender = threading.Thread(target=stream_body, args=(sock, total, progress), kwargs={"chunked": chunked})
    sender.start()
    try:
        status, headers, body = read_response(sock)
        sent_when_answered = progress[0]
        print(f"\n413 after {sent_when_answered / 2**20:.1f} MiB of the body was handed to the kernel")
        assert status == 413, body
        assert_error(orjson.loads(body), "payload_too_large")
        assert headers.get("connection") == "close"
        # The answer came while the client was still sending, and the server then hung up
        # instead of reading the rest.
        assert sent_when_answered < total, sent_when_answered
        sender.join(timeout=15)
        assert not sender.is_alive(), "the server kept reading the oversized body"
        assert progress[0] < total, "all 64 MiB went through"
    finally:
        sock.close()
        sender.join(timeout=5)


# -- bad JSON and bad ids -------------------------------------------------------------------------

DEEP = 100_000
EVENT = b'{"type":"T","aggregate_id":"hostile","payload":%b}'


def event_with(**fields: object) -> bytes:
    body: dict[str, object] = {"type": "T", "aggregate_id": "hostile", "payload": {}}
    body.update(fields)
    return orjson.dumps(body)


def raw_event(id_json: bytes) -> bytes:
    return b'{"id":%b,"type":"T","aggregate_id":"h","payload":{}}' % id_json


BAD_BODIES = [
    # (path, body, expected error code)
    pytest.param("/events", EVENT % (b'{"a":' * DEEP + b"1" + b"}" * DEEP), "invalid_json", id="nested-100k-objects"),
    pytest.param("/events", b"[" * DEEP + b"]" * DEEP, "invalid_json", id="nested-100k-arrays"),
    pytest.param("/events/batch", b'{"events":[%b]}' % (b"[" * DEEP + b"]" * DEEP), "invalid_json", id="nested-batch"),
    pytest.param("/events", EVENT % b'{"s":"\xff\xfe"}', "invalid_json", id="invalid-utf8"),
    pytest.param("/events", EVENT % b'{"s":"\xc0\xaf"}', "invalid_json", id="invalid-utf8-overlong"),
    pytest.param("/events", raw_event(b'"\xe2\x28\xa1"'), "invalid_json", id="invalid-utf8-in-id"),
    pytest.param("/events", EVENT % b'{"x":NaN}', "invalid_json", id="nan"),
    pytest.param("/events", EVENT % b'{"x":Infinity}', "invalid_json", id="infinity"),
    pytest.param("/events", EVENT % b'{"x":-Infinity}', "invalid_json", id="minus-infinity"),
    pytest.param("/events", EVENT % b'{"s":"\\ud800"}', "invalid_json", id="lone-surrogate-escaped"),
    pytest.param("/events", raw_event(b'"\\udfff"'), "invalid_json", id="lone-surrogate-escaped-in-id"),
    pytest.param("/events", EVENT % b'{"s":"\xed\xa0\x80"}', "invalid_json", id="lone-surrogate-utf8-encoded"),
    pytest.param("/events", event_with(id="i" * 257), "invalid_field", id="id-257-bytes"),
    pytest.param("/events", event_with(id="i" * 600_000), "invalid_field", id="id-600k-bytes"),
    pytest.param("/events", event_with(id="\u00e9" * 129), "invalid_field", id="id-258-bytes-of-utf8"),
    pytest.param("/events", event_with(id="abc\u0000def"), "invalid_field", id="id-with-nul"),
    pytest.param("/events", event_with(aggregate_id="a" * 257), "invalid_field", id="aggregate-id-257-bytes"),
    pytest.param("/events", event_with(type="t" * 100_000), "invalid_field", id="type-100k-bytes"),
    pytest.param(
        "/events", raw_event(b'"v","expected_version":18446744073709551616'), "invalid_field", id="version-2-to-the-64"
    ),
    pytest.param(
        "/events/batch",
        orjson.dumps({"events": [{"id": "b" * 1000, "type": "T", "aggregate_id": "h", "payload": {}}]}),
        "invalid_field",
        id="huge-id-in-batch",
    ),
]


@pytest.mark.parametrize(("path", "body", "code"), BAD_BODIES)
def test_bad_json_and_oversized_ids_get_400_with_the_error_shape(
    server: Server, path: str, body: bytes, code: str
) -> None:
    assert len(body) <= MAX_BODY_BYTES, "the case must reach the JSON parser, not the body limit"
    with WalstoreClient(server.url, timeout_s=10) as client:
        response = client.request("POST", path, body, check=False)
    assert response.status == 400, response.body
    assert_error(response.body, code)


def test_oversized_aggregate_id_in_the_path_gets_400(server: Server) -> None:
    with WalstoreClient(server.url) as client:
        for segment in ("a" * 257, "%C3%A9" * 129, "%FF%FE", "%ED%A0%80", "a%00b"):
            response = client.request("GET", f"/events/{segment}", check=False)
            assert response.status == 400, (segment, response.body)
            assert_error(response.body, "invalid_field")


# -- many idle connections ------------------------------------------------------------------------

KEEP_ALIVE_REQUEST = b"GET /health/live HTTP/1.1\r\nhost: idle\r\n\r\n"


def open_idle(server: Server, count: int) -> list[socket.socket]:
    """``count`` keep-alive connections, each idle after one answered request (so the
    server holds them for ``idle_timeout_s``, 60 s, not the 10 s header timeout). Opened
    in batches and each answer read before the next batch: the server's pace, never more
    than a batch in its accept backlog."""
    opened: list[socket.socket] = []
    while len(opened) < count:
        batch = [connect(server) for _ in range(min(500, count - len(opened)))]
        opened += batch
        for sock in batch:
            sock.sendall(KEEP_ALIVE_REQUEST)
        for sock in batch:
            status, headers, _ = read_response(sock)
            assert status == 200 and headers.get("connection") != "close", (status, headers)
    return opened


def wait_all_closed(socks: list[socket.socket], timeout_s: float) -> None:
    """Every socket in ``socks`` sees EOF or a reset within ``timeout_s``."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    open_ones = len(socks)
    deadline = time.monotonic() + timeout_s
    try:
        while open_ones:
            ready = selector.select(timeout=max(0.0, deadline - time.monotonic()))
            assert ready, f"{open_ones} of {len(socks)} connections still open after {timeout_s} s"
            for key, _ in ready:
                closed = key.fileobj
                assert isinstance(closed, socket.socket)
                selector.unregister(closed)
                assert_closed(closed, timeout_s=1)
                open_ones -= 1
    finally:
        selector.close()


def refusals(extra: list[socket.socket], expected: int, timeout_s: float = 5.0) -> int:
    """How many of ``extra`` the server refused (answered 503 and closed, or just closed)
    within ``timeout_s``; once ``expected`` have been, waits only briefly for more."""
    selector = selectors.DefaultSelector()
    for sock in extra:
        selector.register(sock, selectors.EVENT_READ)
    refused = 0
    deadline = time.monotonic() + timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            if refused >= expected:
                deadline = min(deadline, time.monotonic() + 0.5)
            for key, _ in selector.select(timeout=left):
                answered = key.fileobj
                assert isinstance(answered, socket.socket)
                selector.unregister(answered)
                refused += 1
                try:
                    status, headers, body = read_response(answered)
                except (ConnectionResetError, ConnectionAbortedError):
                    continue  # closed without an answer: allowed beyond MAX_PENDING_REJECTIONS
                assert status == 503, body
                assert_error(orjson.loads(body), "too_many_connections")
                assert headers.get("retry-after") == "1"
                assert_closed(answered)
    finally:
        selector.close()
    return refused


def test_10k_idle_connections_keep_health_answering_and_memory_bounded(server: Server) -> None:
    assert server.proc is not None
    pid = server.proc.pid
    cap = LIMITS.max_connections
    rss_before = vm_rss_mb(pid)
    silent: list[socket.socket] = []
    idle: list[socket.socket] = []
    extra: list[socket.socket] = []
    try:
        # A few connections that never send a byte: reclaimed after the header timeout.
        silent = [connect(server) for _ in range(100)]
        silent_since = time.monotonic()
        started = time.monotonic()
        idle = open_idle(server, IDLE_CONNECTIONS - len(silent) - 10)
        opened_in = time.monotonic() - started

        status, took = get_health(server)
        assert status == 200 and took < 3.0, (status, took)
        rss_at_10k = vm_rss_mb(pid)
        print(
            f"\n{len(idle)} idle + {len(silent)} silent connections opened in {opened_in:.1f} s; "
            f"VmRSS {rss_before:.0f} MB before, {rss_at_10k:.0f} MB with them open"
        )
        assert rss_at_10k < RSS_BOUND_MB

        # The silent ones are closed after the header timeout. If that moment is near, let
        # it pass first, so that the count below does not change while it is taken.
        def reclaim_silent() -> None:
            left = LIMITS.header_timeout_s + 5 - (time.monotonic() - silent_since)
            wait_all_closed(silent, timeout_s=left)
            for sock in silent:
                sock.close()
            silent.clear()

        if time.monotonic() - silent_since > LIMITS.header_timeout_s - 2:
            reclaim_silent()

        # Past the cap every new connection is refused at once: answered 503 and
        # closed, or closed. (The /health connection above may still be closing.)
        held = len(silent) + len(idle)
        extra = [connect(server) for _ in range(cap - held + 90)]
        expected = held + len(extra) - cap
        refused = refusals(extra, expected)
        print(f"{refused} of {len(extra)} connections beyond the cap refused ({expected} expected)")
        assert expected - 2 <= refused <= expected + 1, (refused, expected)
        for sock in extra:
            sock.close()
        extra = []
        # The server frees those slots as it notices the closes: /health answers again
        # within moments (a refusal in the meantime is the cap doing its job).
        deadline = time.monotonic() + 5
        while (status := get_health(server)[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200

        if silent:
            reclaim_silent()
        # The idle keep-alive connections (60 s) are still open.
        readable = selectors.DefaultSelector()
        for sock in idle[:: len(idle) // 50]:
            readable.register(sock, selectors.EVENT_READ)
        assert readable.select(timeout=0) == [], "idle keep-alive connections were closed early"
        readable.close()
    finally:
        for sock in silent + idle + extra:
            sock.close()
