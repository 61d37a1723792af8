"""The probe port (PROBE_PORT) of a real single node, in-process: Kubernetes' probes keep
answering while strangers hold every connection of the client port, a flood of the probe
port leaves the client port serving, the probe port offers nothing else, and readiness
says ``shutting_down`` while the node drains."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import trio
from fakes import HttpTestClient, encode_request

from walstore.config import from_env
from walstore.errors import ConfigError
from walstore.http.server import HttpLimits, probe_limits
from walstore.node import Node

CAP = 8  # the client port's max_connections in these tests
EVENT = orjson.dumps({"type": "T", "aggregate_id": "a", "payload": {}})


@dataclass
class Ports:
    node: Node
    http: int
    probe: int


async def start_node(nursery: trio.Nursery, tmp_path: Path, *, shutdown_grace_s: float = 10.0) -> Ports:
    config = from_env(
        {
            "DATA_DIR": str(tmp_path / "wal"),
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": "0",
            "PROBE_PORT": "0",
            "HTTP_MAX_CONNECTIONS": str(CAP),
        }
    )
    limits = HttpLimits(max_connections=CAP, shutdown_grace_s=shutdown_grace_s)
    node: Node = await nursery.start(Node(config, http_limits=limits).run)
    assert node.probe_port
    return Ports(node, node.http_port, node.probe_port)


@pytest.fixture
async def ports(tmp_path: Path) -> AsyncIterator[Ports]:
    async with trio.open_nursery() as nursery:
        p = await start_node(nursery, tmp_path)
        yield p
        p.node.shutdown()


async def hold_idle_connections(stack: AsyncExitStack, port: int, n: int) -> list[HttpTestClient]:
    """``n`` keep-alive connections, each answered once (so the server has surely counted
    it), then left idle, as an attacker would."""
    clients = []
    for _ in range(n):
        client = await HttpTestClient.connect(port)
        stack.push_async_callback(client.aclose)
        assert (await client.request("GET", "/health/live")).status == 200
        clients.append(client)
    return clients


async def get(port: int, path: str) -> tuple[int, object]:
    client = await HttpTestClient.connect(port)
    try:
        with trio.fail_after(5):
            response = await client.request("GET", path)
    finally:
        await client.aclose()
    return response.status, response.json() if response.body.startswith(b"{") else response.body


async def test_probes_answer_while_strangers_hold_every_client_connection(ports: Ports) -> None:
    async with AsyncExitStack() as stack:
        await hold_idle_connections(stack, ports.http, CAP)
        # The client port is full: a normal request, and a probe there, get the fixed 503.
        stranger = await HttpTestClient.connect(ports.http)
        stack.push_async_callback(stranger.aclose)
        with trio.fail_after(5):
            answer = await stranger.read_until_closed()
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"too_many_connections"' in answer
        # The probe port does not care.
        assert await get(ports.probe, "/health/live") == (200, {"status": "alive"})
        status, body = await get(ports.probe, "/health/ready")
        assert status == 200 and isinstance(body, dict) and body["status"] == "ready"
        status, _ = await get(ports.probe, "/health")
        assert status == 200
        status, metrics = await get(ports.probe, "/metrics")
        assert status == 200 and isinstance(metrics, bytes) and b"walstore_is_leader" in metrics


async def test_a_flood_of_the_probe_port_leaves_the_client_port_serving(ports: Ports) -> None:
    probe_cap = probe_limits().max_connections
    async with AsyncExitStack() as stack:
        await hold_idle_connections(stack, ports.probe, probe_cap)
        over = await HttpTestClient.connect(ports.probe)
        stack.push_async_callback(over.aclose)
        with trio.fail_after(5):
            assert (await over.read_until_closed()).startswith(b"HTTP/1.1 503 ")  # its own cap
        client = await HttpTestClient.connect(ports.http)
        stack.push_async_callback(client.aclose)
        assert (await client.request("POST", "/events", EVENT)).status == 201
        assert (await client.request("GET", "/health/live")).status == 200


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(encode_request("GET", "/events/a"), 404, "not_found", id="a_read"),
        pytest.param(encode_request("POST", "/events", EVENT), 404, "not_found", id="a_write"),
        pytest.param(encode_request("GET", "/status"), 404, "not_found", id="status"),
        pytest.param(encode_request("POST", "/health/live", b"{}"), 405, "method_not_allowed", id="post_probe"),
        pytest.param(b"GET /health/live HTTP/1.1\r\nhost: t\r\nbad header\r\n\r\n", 400, None, id="malformed"),
        pytest.param(b"\x16\x03\x01\x00\xa5garbage\r\n\r\n", 400, None, id="tls_hello"),
    ],
)
async def test_the_probe_port_serves_nothing_else_and_bad_input_is_a_4xx_json(
    ports: Ports, request_bytes: bytes, status: int, code: str | None
) -> None:
    client = await HttpTestClient.connect(ports.probe)
    try:
        await client.send_raw(request_bytes)
        with trio.fail_after(5):
            response = await client.read_response()
    finally:
        await client.aclose()
    assert response.status == status
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code
    assert response.json()["success"] is False


async def test_readiness_says_shutting_down_on_the_probe_port_while_the_node_drains(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        p = await start_node(nursery, tmp_path, shutdown_grace_s=1.0)
        # A read that waits (min_index far ahead) keeps the drain going for its grace.
        slow = await HttpTestClient.connect(p.http)
        await slow.send_raw(encode_request("GET", "/events?min_index=1000000"))
        await trio.sleep(0.1)
        p.node.shutdown()
        await trio.sleep(0.1)
        status, body = await get(p.probe, "/health/ready")
        assert status == 503
        assert isinstance(body, dict) and body["error"]["code"] == "shutting_down" and body["success"] is False
        assert (await get(p.probe, "/health/live"))[0] == 200
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", p.http)  # the client port accepts no more
        with trio.fail_after(5):
            answer = await slow.read_until_closed()  # cut off at the end of the grace
        await slow.aclose()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 5")


def test_probe_port_is_off_unless_set_and_validated() -> None:
    assert from_env({}).probe_port is None
    assert from_env({"PROBE_PORT": "0"}).probe_port == 0
    assert from_env({"PROBE_PORT": "8081"}).probe_port == 8081
    for bad in ("x", "70000", "8080", "7070"):
        with pytest.raises(ConfigError, match="PROBE_PORT"):
            from_env({"PROBE_PORT": bad})
