"""Graceful stop of walstore.http.server without a single connection reset.

A reset (RST) is what a client cannot recover from: it may have destroyed an answer, and
the client cannot tell whether its request was served. So the server must, at shutdown,
answer the connections still in the listen backlog and the requests already in the kernel
(503 ``shutting_down``, ``Connection: close``), and close idle keep-alive connections with a
FIN, dropping unserved whatever arrives after it. A reset surfaces here as
``ConnectionResetError`` from a plain blocking socket.

The clients are stdlib sockets on purpose: ``connect``/``sendall`` are synchronous, so the
test can put bytes into the server's kernel buffers and call ``server.shutdown()`` before
the server's tasks have run at all (no checkpoint in between).
"""

from __future__ import annotations

import socket

import orjson
import trio
from fakes import FakeEventService, encode_request, start_server

from walstore.http.server import LINGER_S

LIVE = encode_request("GET", "/health/live")
IO_TIMEOUT_S = 5.0


def raw_connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed before {marker!r}; got {data!r}")
        data += chunk
    return data


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the server's FIN; a reset raises ConnectionResetError."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


async def in_thread(fn: object, *args: object) -> bytes:
    result: bytes = await trio.to_thread.run_sync(fn, *args)  # type: ignore[arg-type]
    return result


def assert_shutting_down(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"connection: close" in head.lower()
    assert orjson.loads(body)["error"]["code"] == "shutting_down"


async def test_connections_in_the_listen_backlog_are_answered_not_reset(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery)
    # The kernel completes these handshakes; the accept loop never runs before shutdown().
    clients = [raw_connect(port) for _ in range(3)]
    for client in clients:
        client.sendall(LIVE)
    server.shutdown()
    for client in clients:
        with client:
            assert_shutting_down(await in_thread(read_to_eof, client))


async def test_a_request_in_the_kernel_of_an_idle_connection_is_answered_not_reset(nursery: trio.Nursery) -> None:
    server, port = await start_server(nursery)
    with raw_connect(port) as client:
        client.sendall(LIVE)
        assert b'{"status":"alive"}' in await in_thread(read_until, client, b'{"status":"alive"}')
        await trio.sleep(0.05)  # the server is back to waiting: the connection is idle
        client.sendall(LIVE)  # arrives; the server has not read it when shutdown() runs
        server.shutdown()
        answer = await in_thread(read_to_eof, client)
    # Served (it was read before the idle connections were closed) or refused: either
    # way answered, with Connection: close, and then a clean end of stream.
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), answer
    if head.startswith(b"HTTP/1.1 200 "):
        assert body == b'{"status":"alive"}'
    else:
        assert_shutting_down(answer)


async def test_an_idle_connection_is_closed_with_a_fin_and_a_late_request_is_dropped(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    server, port = await start_server(nursery, service)
    with raw_connect(port) as client:
        client.sendall(LIVE)
        await in_thread(read_until, client, b'{"status":"alive"}')
        await trio.sleep(0.05)
        server.shutdown()
        assert await in_thread(read_to_eof, client) == b""  # a clean end of stream
        # A client that sends anyway (it had not seen the FIN yet): never served, never reset.
        body = orjson.dumps({"type": "T", "aggregate_id": "late", "payload": {}})
        late = encode_request("POST", "/events", body)
        client.sendall(late)
        await trio.sleep(LINGER_S / 4)
        # A reset would have come back by now; after one, this send fails (EPIPE).
        client.sendall(late)
        assert await in_thread(read_to_eof, client) == b""
    assert service.log == []


async def test_a_pipelined_request_behind_the_last_answer_does_not_reset_it(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    service.append_gate = trio.Event()
    server, port = await start_server(nursery, service)
    body = orjson.dumps({"type": "T", "aggregate_id": "a", "payload": {}})
    with raw_connect(port) as client:
        client.sendall(encode_request("POST", "/events", body))
        with trio.fail_after(IO_TIMEOUT_S):
            await service.append_entered.wait()
        client.sendall(LIVE)  # pipelined: it will never be served
        server.shutdown()
        service.append_gate.set()
        answer = await in_thread(read_to_eof, client)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201 ") and b"connection: close" in head.lower(), answer
    assert b"HTTP/1.1" not in rest  # one answer, then a clean close
