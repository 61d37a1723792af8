"""The sync client's own keep-alive connections (walstore.client._connections), against
scripted TCP servers: what a failure is called decides whether a write may have been
stored, so each way a connection can end is tried for real."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from walstore.client._connections import ConnectionPool
from walstore.client._protocol import TransportFailure
from walstore.election.etcd_process import free_ports

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

Handler = Callable[[socket.socket, int], None]


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], str]]:
    """Start a one-thread TCP server whose ``handler(conn, n)`` scripts the n-th connection."""
    servers: list[socket.socket] = []

    def start(handler: Handler) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        servers.append(listener)

        def loop() -> None:
            n = 0
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    handler(conn, n)
                n += 1

        threading.Thread(target=loop, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in servers:
        listener.close()


def test_an_answer_comes_back_and_the_connection_is_kept(serve: Callable[[Handler], str]) -> None:
    accepted: list[int] = []

    def handler(conn: socket.socket, n: int) -> None:
        accepted.append(n)
        while _read_request(conn):
            conn.sendall(OK)

    url = serve(handler)
    pool = ConnectionPool()
    for _ in range(3):
        answer = pool.request("GET", f"{url}/status?x=1", body=None, headers={}, timeout=5)
        assert (answer.status, answer.content, answer.headers["content-type"]) == (200, b"{}", "application/json")
    pool.close()
    assert accepted == [0]  # one connection served all three


def test_a_kept_connection_the_server_closed_is_replaced_without_a_failure(serve: Callable[[Handler], str]) -> None:
    def handler(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        conn.sendall(OK)  # and close: the pool still holds it as idle

    url = serve(handler)
    pool = ConnectionPool()
    assert pool.request("GET", url, body=None, headers={}, timeout=5).status == 200
    assert pool.request("POST", url, body=b'{"a":1}', headers={}, timeout=5).status == 200
    pool.close()


def test_a_refused_connection_was_not_sent() -> None:
    (port,) = free_ports(1)
    with pytest.raises(TransportFailure) as caught:
        ConnectionPool().request("GET", f"http://127.0.0.1:{port}/", body=None, headers={}, timeout=2)
    assert caught.value.kind == "not_sent"
    assert str(caught.value).startswith("ConnectError:")


def test_a_request_read_and_never_answered_may_have_been_sent(serve: Callable[[Handler], str]) -> None:
    def handler(conn: socket.socket, n: int) -> None:
        _read_request(conn)  # then close without a word: the write may have happened

    url = serve(handler)
    with pytest.raises(TransportFailure) as caught:
        ConnectionPool().request("POST", f"{url}/events", body=b"{}", headers={}, timeout=5)
    assert caught.value.kind == "maybe_sent"
    assert str(caught.value).startswith("ConnectionLost:")


def test_a_read_timeout_may_have_been_sent(serve: Callable[[Handler], str]) -> None:
    release = threading.Event()

    def handler(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        release.wait(10)

    url = serve(handler)
    try:
        with pytest.raises(TransportFailure) as caught:
            ConnectionPool().request("POST", f"{url}/events", body=b"{}", headers={}, timeout=0.3)
        assert caught.value.kind == "maybe_sent"
    finally:
        release.set()


def test_an_early_answer_to_a_body_the_server_would_not_read_is_returned(serve: Callable[[Handler], str]) -> None:
    refusal = b'{"success":false,"error":{"code":"payload_too_large"}}'

    def handler(conn: socket.socket, n: int) -> None:
        _read_request(conn)
        head = b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        conn.sendall(head % len(refusal) + refusal)
        conn.shutdown(socket.SHUT_WR)
        # Close with unread data pending: the client's send of the rest then fails (RST).

    url = serve(handler)
    answer = ConnectionPool().request("POST", f"{url}/events/batch", body=b"x" * (32 << 20), headers={}, timeout=10)
    assert answer.status == 413 and answer.content == refusal


def test_only_http_urls() -> None:
    with pytest.raises(TransportFailure) as caught:
        ConnectionPool().request("GET", "https://127.0.0.1:1/", body=None, headers={}, timeout=1)
    assert caught.value.kind == "not_sent"
