"""walstore.http.server over real sockets: keep-alive, pipelining, chunked bodies, limits,
timeouts, the connection cap, graceful shutdown, and hostile clients.

Timeouts are exercised with small limits (tenths of a second) on the real clock: the
server waits on real sockets, which trio's MockClock would skip past.
"""

from __future__ import annotations

import random
from functools import partial

import orjson
import pytest
import trio
from fakes import FakeEventService, HttpTestClient, encode_request, start_server

from walstore.errors import ConfigError
from walstore.http.app import HttpApp
from walstore.http.server import (
    WATCHDOG_MAX_TICK_S,
    WATCHDOG_MIN_TICK_S,
    HttpLimits,
    HttpServer,
    Request,
    Response,
    SendChunk,
    serve_http,
    watchdog_tick_s,
)

EVENT = orjson.dumps({"type": "T", "aggregate_id": "a", "payload": {"n": 1}})


def post(aggregate_id: str = "a", **headers: str) -> bytes:
    body = orjson.dumps({"type": "T", "aggregate_id": aggregate_id, "payload": {}})
    return encode_request("POST", "/events", body, headers=list(headers.items()))


async def connect(port: int) -> HttpTestClient:
    return await HttpTestClient.connect(port)


# ------------------------------------------------------------------ keep-alive and pipelining


async def test_keep_alive_serves_many_requests_on_one_connection(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery)
    client = await connect(port)
    for i in range(5):
        response = await client.request("POST", "/events", EVENT)
        assert response.status == 201
        assert response.json()["index"] == i + 1
        assert response.header("connection") is None
    assert server.open_connections == 1


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(post("x") + encode_request("GET", "/events/x") + post("y") + encode_request("GET", "/nope"))
    first, read, second, missing = [await client.read_response() for _ in range(4)]
    assert (first.status, first.json()["index"]) == (201, 1)
    assert (read.status, read.json()["count"]) == (200, 1)
    assert (second.status, second.json()["index"]) == (201, 2)
    assert missing.status == 404


async def test_requests_dribbled_byte_by_byte(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    for byte in post("x") + post("y"):
        await client.send_raw(bytes([byte]))
    assert [(await client.read_response()).json()["index"] for _ in range(2)] == [1, 2]


async def test_connection_close_is_honoured(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(post(connection="close") + post())  # the second must never be served
    response = await client.read_response()
    assert response.status == 201
    assert response.header("connection") == "close"
    assert await client.read_until_closed() == b""


async def test_http_1_0_gets_one_response_then_close(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(b"GET /health/live HTTP/1.0\r\n\r\n")
    response = await client.read_response()
    assert response.status == 200
    assert response.header("connection") == "close"
    assert await client.read_until_closed() == b""


# ------------------------------------------------------------------ bodies


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_chunked_request_body(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    head = b"POST /events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    await client.send_raw(head + chunked(EVENT[:10], EVENT[10:20], EVENT[20:]))
    response = await client.read_response()
    assert response.status == 201
    assert (await client.request("GET", "/events/a")).json()["events"][0]["payload"] == {"n": 1}


async def test_chunked_body_over_the_limit_is_413_and_closed(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_body_bytes=1000))
    client = await connect(port)
    head = b"POST /events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    await client.send_raw(head + b"258\r\n" + b"x" * 600 + b"\r\n")
    await client.send_raw(b"258\r\n" + b"x" * 600 + b"\r\n")  # 1200 bytes: over
    response = await client.read_response()
    assert response.status == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert response.header("connection") == "close"
    assert await client.read_until_closed() == b""


async def test_huge_content_length_is_413_without_reading_the_body(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery)
    client = await connect(port)
    size = 64 * 1024 * 1024
    await client.send_raw(
        b"POST /events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % size
    )
    # Not one body byte sent: the answer can only come from the Content-Length check.
    with trio.fail_after(5):
        response = await client.read_response()
    assert response.status == 413
    assert response.json()["error"]["limit"] == 1024 * 1024
    assert response.header("connection") == "close"
    # The server drains at most LINGER_MAX_BYTES, then resets: the 64 MiB never fit.
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        for _ in range(64):
            await client.send_raw(b"\0" * (1024 * 1024))
    assert server.open_connections == 0


async def test_expect_100_continue(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(
        b"POST /events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nexpect: 100-continue\r\n\r\n" % len(EVENT)
    )
    interim = await client.read_head()
    assert interim.status == 100
    await client.send_raw(EVENT)
    assert (await client.read_response()).status == 201


async def test_no_100_continue_when_the_body_came_with_the_head(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(
        b"POST /events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nexpect: 100-continue\r\n\r\n%s" % (len(EVENT), EVENT)
    )
    assert (await client.read_response()).status == 201  # the first answer, not a 100


async def test_chunked_request_with_trailers(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    head = b"POST /events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    await client.send_raw(head + b"%x;ext=1\r\n%s\r\n0\r\nx-checksum: 1\r\n\r\n" % (len(EVENT), EVENT))
    assert (await client.read_response()).status == 201
    assert (await client.request("GET", "/health/live")).status == 200  # the framing ended where it should


async def test_head_request_gets_the_head_only(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(encode_request("HEAD", "/health/live") + encode_request("GET", "/health/live"))
    head = await client.read_response(head_only=True)
    assert head.status == 200
    assert int(head.header("content-length") or 0) > 0
    assert (await client.read_response()).status == 200  # no body bytes came between the two


async def test_client_vanishing_mid_body_leaves_the_server_serving(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(post()[:-5])
    await client.aclose()
    second = await connect(port)
    assert (await second.request("GET", "/health/live")).status == 200


# ------------------------------------------------------------------ malformed HTTP


@pytest.mark.parametrize("split", [False, True])
async def test_oversized_head_is_431(nursery: trio.Nursery, split: bool) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_header_bytes=4096))
    client = await connect(port)
    raw = b"GET /health/live HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n"
    if split:  # h11 sees an incomplete head grow past the limit
        await client.send_raw(raw[:5000])
        with trio.fail_after(5):
            response = await client.read_response()
    else:  # the whole head in one read: measured after parsing
        await client.send_raw(raw)
        response = await client.read_response()
    assert response.status == 431
    assert response.json()["error"]["code"] == "headers_too_large"
    assert await client.read_until_closed() == b""


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_http_request"),
        (b"GET / HTTP/9.9\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /\x01 HTTP/1.1\r\nhost: t\r\n\r\n", 400, "bad_http_request"),
        (b"POST /events HTTP/1.1\r\nhost: t\r\ncontent-length: -1\r\n\r\n", 400, "bad_http_request"),
        (
            b"POST /events HTTP/1.1\r\nhost: t\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            400,
            "bad_http_request",
        ),
        (b"POST /events HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip\r\n\r\n", 501, "bad_http_request"),
        (b"POST /events HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", 400, "bad_http_request"),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400, "bad_http_request"),
    ],
)
async def test_malformed_http_is_answered_then_closed(
    nursery: trio.Nursery, raw: bytes, status: int, code: str
) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(raw)
    response = await client.read_response()
    assert response.status == status
    assert response.json()["error"]["code"] == code
    assert await client.read_until_closed() == b""
    assert (await (await connect(port)).request("GET", "/health/live")).status == 200


async def test_malformed_pipelined_request_after_a_good_one(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(encode_request("GET", "/health/live") + b"GET / HTTP/1.1\r\nno colon\r\n\r\n")
    assert (await client.read_response()).status == 200
    response = await client.read_response()
    assert response.status == 400
    assert response.json()["error"]["code"] == "bad_http_request"
    assert "malformed HTTP request" in response.json()["error"]["message"]
    assert await client.read_until_closed() == b""


async def test_random_garbage_never_stops_the_server(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(header_timeout_s=0.2, body_timeout_s=0.2))
    rng = random.Random(1234)
    prefixes = [b"", b"GET / HTTP/1.1\r\n", b"POST /events HTTP/1.1\r\ncontent-length: 5\r\n\r\n"]
    blobs = [prefixes[i % 3] + rng.randbytes(rng.randrange(1, 400)) for i in range(30)]
    answers: list[bytes] = []

    async def hostile(blob: bytes) -> None:
        client = await connect(port)
        await client.send_raw(blob)
        answers.append(await client.read_until_closed())  # an error answer then close, or a timeout close
        await client.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            for blob in blobs:
                clients.start_soon(hostile, blob)
    assert len(answers) == len(blobs)
    for answer in answers:
        assert answer == b"" or answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5"))
        assert not answer.startswith(b"HTTP/1.1 500")
    assert (await (await connect(port)).request("GET", "/health/live")).status == 200


# ------------------------------------------------------------------ timeouts


async def test_slowloris_head_is_cut_off_after_header_timeout(nursery: trio.Nursery) -> None:
    limits = HttpLimits(header_timeout_s=0.3)
    _, port = await start_server(nursery, limits=limits)
    client = await connect(port)

    async def dribble() -> None:
        await client.send_raw(b"GET /health/live HTTP/1.1\r\n")
        try:
            while True:
                await client.send_raw(b"x")
                await trio.sleep(0.02)  # pacing the attack, not synchronisation
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    nursery.start_soon(dribble)
    started = trio.current_time()
    with trio.fail_after(5):
        answer = await client.read_until_closed()
    elapsed = trio.current_time() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"header_timeout"' in answer
    assert 0.25 <= elapsed < 3


async def test_silent_new_connection_closes_after_header_timeout(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(header_timeout_s=0.2))
    client = await connect(port)
    started = trio.current_time()
    with trio.fail_after(5):
        assert await client.read_until_closed() == b""
    assert trio.current_time() - started >= 0.15


async def test_idle_keep_alive_connection_closes_after_idle_timeout(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(idle_timeout_s=0.3))
    client = await connect(port)
    assert (await client.request("GET", "/health/live")).status == 200
    started = trio.current_time()
    with trio.fail_after(5):
        assert await client.read_until_closed() == b""
    assert 0.25 <= trio.current_time() - started < 3


async def test_slow_body_is_408(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(body_timeout_s=0.2))
    client = await connect(port)
    await client.send_raw(
        b"POST /events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"
    )
    with trio.fail_after(5):
        answer = await client.read_until_closed()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"body_timeout"' in answer


async def test_handler_over_request_timeout_is_504(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    service.append_gate = trio.Event()  # never set: the append hangs
    _, port = await start_server(nursery, service, limits=HttpLimits(request_timeout_s=0.2))
    client = await connect(port)
    with trio.fail_after(5):
        response = await client.request("POST", "/events", EVENT)
    assert response.status == 504
    assert response.header("retry-after") == "1"
    assert response.json()["error"]["code"] == "request_timeout"
    assert (await client.request("GET", "/health/live")).status == 200  # keep-alive survives


class _Firehose:
    """Streams chunks for as long as the client takes them; ``ended`` is set when the
    stream is stopped."""

    def __init__(self) -> None:
        self.ended = trio.Event()

    async def handle(self, request: Request) -> Response:
        async def stream(send: SendChunk) -> None:
            try:
                while True:
                    await send(b"x" * 65536)
            finally:
                self.ended.set()

        return Response(200, stream=stream)


async def test_client_not_reading_is_closed_after_write_timeout(nursery: trio.Nursery) -> None:
    app = _Firehose()
    server = HttpServer(app, limits=HttpLimits(write_timeout_s=0.3))
    port = await nursery.start(partial(server.serve, host="127.0.0.1", port=0))
    client = await connect(port)
    started = trio.current_time()
    await client.send_raw(encode_request("GET", "/firehose"))
    with trio.fail_after(5):
        await app.ended.wait()  # the socket buffers filled, a write blocked past its timeout
    assert trio.current_time() - started >= 0.25
    with trio.fail_after(5):
        received = await client.read_until_closed()
    assert received.startswith(b"HTTP/1.1 200 ")
    assert not received.endswith(b"0\r\n\r\n")  # cut off, not a clean end of the stream
    assert server.open_connections == 0


class _AnswersAsItsDeadlinePasses:
    """Marks every connection's deadline as passed (what the watchdog does) just before it
    returns: the answer it gives must still be the one the client gets."""

    def __init__(self) -> None:
        self.server: HttpServer | None = None

    async def handle(self, request: Request) -> Response:
        assert self.server is not None
        for connection in list(self.server._connections):
            connection.expire()
        return Response(200, b'{"answered": true}')


async def test_handler_returning_as_its_deadline_passes_still_answers(nursery: trio.Nursery) -> None:
    app = _AnswersAsItsDeadlinePasses()
    server = app.server = HttpServer(app, limits=HttpLimits())
    port = await nursery.start(partial(server.serve, host="127.0.0.1", port=0))
    client = await connect(port)
    for _ in range(3):  # and keep-alive goes on
        response = await client.request("GET", "/x")
        assert (response.status, response.json()) == (200, {"answered": True})


@pytest.mark.parametrize(
    ("limits", "tick"),
    [
        (HttpLimits(), 1.0),
        (HttpLimits(request_timeout_s=2.0), 0.2),
        (HttpLimits(header_timeout_s=0.01), WATCHDOG_MIN_TICK_S),
        (HttpLimits(write_timeout_s=1000.0), WATCHDOG_MAX_TICK_S),
    ],
)
def test_watchdog_tick_is_a_tenth_of_the_shortest_timeout_within_bounds(limits: HttpLimits, tick: float) -> None:
    assert watchdog_tick_s(limits) == pytest.approx(tick)


class _Crashing:
    async def handle(self, request: Request) -> Response:
        if request.path == "/crash":
            raise RuntimeError("handler bug")
        return Response(200, b"{}")


async def test_handler_exception_is_500_and_contained(nursery: trio.Nursery) -> None:
    server = HttpServer(_Crashing(), limits=HttpLimits())
    port = await nursery.start(partial(server.serve, host="127.0.0.1", port=0))
    client = await connect(port)
    response = await client.request("GET", "/crash")
    assert response.status == 500
    assert response.json() == {
        "success": False,
        "error": {"code": "internal_error", "message": "internal server error"},
    }
    assert (await client.request("GET", "/fine")).status == 200


# ------------------------------------------------------------------ the connection cap


async def test_connections_over_the_cap_get_503(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery, limits=HttpLimits(max_connections=2))
    first, second = await connect(port), await connect(port)
    for client in (first, second):
        assert (await client.request("GET", "/health/live")).status == 200
    third = await connect(port)
    with trio.fail_after(5):
        answer = await third.read_until_closed()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1\r\n" in answer
    assert b'"too_many_connections"' in answer

    # Half-close and wait for the server's close: by then it has forgotten the connection.
    await first.stream.send_eof()
    with trio.fail_after(5):
        assert await first.read_until_closed() == b""
    assert server.open_connections == 1
    fourth = await connect(port)
    assert (await fourth.request("GET", "/health/live")).status == 200


# ------------------------------------------------------------------ graceful shutdown


async def test_shutdown_finishes_in_flight_requests_and_closes_idle_ones(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    service.append_gate = trio.Event()
    server = HttpServer(HttpApp(service), limits=HttpLimits())
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        await server.serve(host="127.0.0.1", port=0, task_status=task_status)
        stopped.set()

    port = await nursery.start(run)
    idle = await connect(port)
    assert (await idle.request("GET", "/health/live")).status == 200
    busy = await connect(port)
    await busy.send_raw(post())
    with trio.fail_after(5):
        await service.append_entered.wait()

    server.shutdown()
    with trio.fail_after(5):
        assert await idle.read_until_closed() == b""  # idle keep-alive: closed at once
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)  # no longer accepting
    assert not stopped.is_set()

    service.append_gate.set()
    response = await busy.read_response()
    assert response.status == 201  # the in-flight append still gets its answer
    assert response.header("connection") == "close"
    with trio.fail_after(5):
        await stopped.wait()


async def test_shutdown_grace_cuts_off_stuck_requests(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    service.append_gate = trio.Event()  # never set
    limits = HttpLimits(shutdown_grace_s=0.2)
    server, port = await start_server(nursery, service, limits=limits)
    client = await connect(port)
    await client.send_raw(post())
    with trio.fail_after(5):
        await service.append_entered.wait()
    server.shutdown()
    with trio.fail_after(5):
        assert await client.read_until_closed() == b""
    assert server.open_connections == 0


async def test_shutdown_ends_event_streams(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery)
    client = await connect(port)
    await client.send_raw(b"GET /subscribe HTTP/1.1\r\nhost: t\r\n\r\n")
    assert (await client.read_head()).status == 200
    server.shutdown()
    with trio.fail_after(5):
        assert await client.read_chunk() == b""
        assert await client.read_until_closed() == b""


async def test_serve_http_binds_port_zero_and_stops_on_the_shutdown_event() -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(
                serve_http,
                HttpApp(FakeEventService()),
                host="127.0.0.1",
                port=0,
                limits=HttpLimits(),
                shutdown=shutdown,
            )
        )
        assert port > 0
        client = await connect(port)
        assert (await client.request("GET", "/health/live")).status == 200
        await client.aclose()
        shutdown.set()
        nursery.cancel_scope.deadline = trio.current_time() + 5  # serve_http must return on its own
    assert not nursery.cancel_scope.cancelled_caught


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_body_bytes"):
        HttpLimits(max_body_bytes=0)
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        HttpLimits(idle_timeout_s=-1)
