"""The fault proxy against an echo server: each mode does what its docstring says.

The echo server records what it received, so a test can tell "the proxy dropped it" from
"the server got it and the answer was dropped". Waits are on the proxy's counters, not sleeps;
the only timed waits are the delay measurement and one "nothing arrives" check (blackhole),
where no event exists to wait for.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import trio
from harness.proxy import Direction, FaultProxy, Kind

from walstore.errors import ConfigError

HOST = "127.0.0.1"
TIMEOUT_S = 5.0


class EchoServer:
    """A threaded echo server on a port the OS chose; keeps every byte it received."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = int(self.listener.getsockname()[1])
        self.received = bytearray()
        self.cond = threading.Condition()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                with self.cond:
                    self.received += data
                    self.cond.notify_all()
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def wait_received(self, count: int) -> bytes:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.received) >= count, TIMEOUT_S):
                raise TimeoutError(f"echo server got {len(self.received)} of {count} bytes")
            return bytes(self.received)

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown does.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(TIMEOUT_S)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy((HOST, echo.port), name="test-proxy") as p:
        yield p


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=TIMEOUT_S)
    return sock


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    out = bytearray()
    while len(out) < count:
        data = sock.recv(count - len(out))
        if not data:
            raise EOFError(f"connection closed after {len(out)} of {count} bytes")
        out += data
    return bytes(out)


def round_trip(sock: socket.socket, data: bytes) -> float:
    started = time.monotonic()
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data
    return time.monotonic() - started


def test_pass_forwards_both_ways_and_binds_its_own_port(proxy: FaultProxy, echo: EchoServer) -> None:
    assert proxy.port not in (0, echo.port)
    with connect(proxy) as sock:
        payload = bytes(range(256)) * 1000  # larger than one chunk: exercises the queue
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
    stats = proxy.wait_stats(lambda s: s.active == 0)
    assert stats.accepted == 1
    assert stats.forwarded_a_to_b == stats.forwarded_b_to_a == len(payload)


def test_delay_holds_each_direction_for_the_given_time(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        baseline = round_trip(sock, b"warm-up")
        proxy.delay(0.25)
        delayed = round_trip(sock, b"slow")
        proxy.delay(0.25, Direction.A_TO_B)
        assert proxy.fault(Direction.B_TO_A).kind is Kind.DELAY  # untouched by the one-way call
        proxy.heal()
        healed = round_trip(sock, b"fast again")
    # Both directions delayed: at least two delays; loose upper bound for a loaded machine.
    assert delayed >= 0.45, delayed
    assert delayed < 0.5 + 3.0
    assert healed < delayed and baseline < delayed


def test_one_way_delay_delays_only_that_direction(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.delay(0.3, Direction.B_TO_A)
        assert round_trip(sock, b"x") >= 0.27


def test_drop_discards_bytes_and_keeps_the_connection(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        proxy.drop()
        sock.sendall(b"lost")
        proxy.wait_stats(lambda s: s.dropped_a_to_b == 4)
        proxy.heal()
        # The connection still works, and what was dropped never shows up later.
        assert round_trip(sock, b"after") < TIMEOUT_S
    assert echo.wait_received(5) == b"after"


def test_one_way_drop_lets_requests_through_but_not_answers(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        proxy.drop(Direction.B_TO_A)
        sock.sendall(b"ping")
        assert echo.wait_received(4) == b"ping"
        proxy.wait_stats(lambda s: s.dropped_b_to_a == 4)
        proxy.heal()
        assert round_trip(sock, b"pong") < TIMEOUT_S  # the dropped "ping" echo never arrives


def test_blackhole_holds_bytes_until_healed(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        round_trip(sock, b"ok")
        proxy.blackhole()
        sock.sendall(b"held")
        # Nothing to wait on for "nothing happens": a short bounded look is the check.
        readable, _, _ = select.select([sock], [], [], 0.3)
        assert not readable
        assert echo.wait_received(2) == b"ok"
        assert proxy.stats().active == 1  # the connection is held open, not closed
        proxy.heal()
        assert recv_exactly(sock, 4) == b"held"
    assert echo.wait_received(6) == b"okheld"


def test_one_way_blackhole_b_to_a_holds_only_answers(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        proxy.blackhole(Direction.B_TO_A)
        sock.sendall(b"req")
        assert echo.wait_received(3) == b"req"
        readable, _, _ = select.select([sock], [], [], 0.2)
        assert not readable
        proxy.heal()
        assert recv_exactly(sock, 3) == b"req"


def test_reset_sends_rst_to_open_and_new_connections(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        round_trip(sock, b"hello")
        proxy.reset()
        assert proxy.resetting
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    # The RST may already arrive while connecting: that counts as the reset too.
    with pytest.raises(ConnectionResetError), connect(proxy) as again:
        again.sendall(b"x")
        again.recv(10)
    stats = proxy.wait_stats(lambda s: s.resets >= 2)
    assert stats.accepted == 2
    proxy.heal()
    with connect(proxy) as healed:
        assert round_trip(healed, b"back") < TIMEOUT_S


def test_corrupt_alters_every_nth_byte_one_way(proxy: FaultProxy, echo: EchoServer) -> None:
    data = bytes(100)
    with connect(proxy) as sock:
        proxy.corrupt(10, Direction.A_TO_B)
        sock.sendall(data)
        received = echo.wait_received(100)
        echoed = recv_exactly(sock, 100)
    changed = [i for i in range(100) if received[i] != data[i]]
    assert changed == list(range(9, 100, 10))
    assert echoed == received  # the way back was not corrupted
    assert proxy.stats().corrupted_a_to_b == 10


def test_corrupt_both_ways_never_cancels_out(proxy: FaultProxy) -> None:
    data = b"A" * 64
    with connect(proxy) as sock:
        proxy.corrupt(8)
        sock.sendall(data)
        echoed = recv_exactly(sock, 64)
    assert echoed != data
    assert [i for i, b in enumerate(echoed) if b != ord("A")] == list(range(7, 64, 8))
    assert {echoed[i] for i in range(7, 64, 8)} == {ord("A") + 2}


def test_target_down_resets_the_dialler() -> None:
    with socket.create_server((HOST, 0)) as gone:
        port = int(gone.getsockname()[1])
    # The RST may already arrive while connecting (the proxy resets as soon as it
    # accepts): that counts as the reset too, as in the test above.
    with FaultProxy((HOST, port)) as proxy, pytest.raises(ConnectionResetError), connect(proxy) as sock:
        sock.recv(1)


def test_bad_parameters_are_config_errors(proxy: FaultProxy) -> None:
    with pytest.raises(ConfigError):
        proxy.delay(-1)
    with pytest.raises(ConfigError):
        proxy.delay(float("nan"))
    with pytest.raises(ConfigError):
        proxy.corrupt(0)
    with pytest.raises(ConfigError):
        proxy.fault(Direction.BOTH)
    with pytest.raises(ConfigError):
        proxy.start()


def test_stop_closes_connections_and_is_idempotent(echo: EchoServer) -> None:
    proxy = FaultProxy((HOST, echo.port)).start()
    sock = connect(proxy)
    try:
        round_trip(sock, b"x")
        proxy.stop()
        proxy.stop()
        with pytest.raises((ConnectionResetError, EOFError)):
            recv_exactly(sock, 1)
        with pytest.raises(ConfigError):
            proxy.drop()
    finally:
        sock.close()


async def test_usable_from_a_trio_test(proxy: FaultProxy) -> None:
    # The setters block only briefly and never need this loop, so calling them from a
    # trio task is safe.
    stream = await trio.open_tcp_stream(*proxy.address)
    async with stream:
        proxy.delay(0.2, Direction.A_TO_B)
        started = trio.current_time()
        await stream.send_all(b"trio")
        got = b""
        while len(got) < 4:
            got += await stream.receive_some(4 - len(got))
        assert got == b"trio"
        assert trio.current_time() - started >= 0.18
