"""The HTTP API through a real single node (in-process: real WAL files, real sockets):
the seed's shapes exactly, the extensions, and the semantics of versions and ids."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from walstore.client import ClientError, WalstoreClient
from walstore.config import from_env
from walstore.node import Node


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    config = from_env({"DATA_DIR": str(tmp_path / "wal"), "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "0"})
    async with trio.open_nursery() as nursery:
        n: Node = await nursery.start(Node(config).run)
        yield n
        n.shutdown()


async def call(node: Node, fn_name: str, *args: object, **kwargs: object) -> object:
    def run() -> object:
        with WalstoreClient(f"http://127.0.0.1:{node.http_port}") as client:
            return getattr(client, fn_name)(*args, **kwargs)

    return await trio.to_thread.run_sync(run)


SEED_EVENT = {
    "type": "UserCreated",
    "aggregate_id": "user-123",
    "payload": {"name": "John Doe", "email": "john@example.com"},
    "metadata": {"source": "api"},
}


async def test_seed_shapes(node: Node) -> None:
    created = await call(node, "append", SEED_EVENT)
    assert isinstance(created, dict)
    assert list(created) == ["success", "event_id", "index", "version"]
    assert created["success"] is True and created["index"] == 1 and created["version"] == 1
    uuid.UUID(str(created["event_id"]))

    read = await call(node, "read", "user-123")
    assert isinstance(read, dict) and read["count"] == 1 and read["version"] == 1
    event = read["events"][0]
    for key in ("id", "type", "timestamp", "aggregate_id", "payload"):
        assert key in event
    assert event["payload"] == SEED_EVENT["payload"] and event["metadata"] == {"source": "api"}
    assert isinstance(event["timestamp"], int)

    status = await call(node, "status")
    assert isinstance(status, dict)
    assert list(status)[:6] == ["id", "is_leader", "leader_id", "term", "commit_index", "last_applied"]
    assert status["is_leader"] is True and status["leader_id"] == status["id"] == "event-store-0"
    assert status["commit_index"] == status["last_applied"] == 1

    def health() -> tuple[int, dict[str, object]]:
        with WalstoreClient(f"http://127.0.0.1:{node.http_port}") as client:
            r = client.health()
            return r.status, r.body

    code, body = await trio.to_thread.run_sync(health)
    assert code == 200
    assert list(body) == ["status", "node_id", "is_leader", "leader_id", "timestamp"]
    assert body["status"] == "healthy"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(body["timestamp"]))


async def test_versions_ids_and_batches(node: Node) -> None:
    first = await call(node, "append", {**SEED_EVENT, "id": "e-1", "expected_version": 0})
    again = await call(node, "append", {**SEED_EVENT, "id": "e-1", "expected_version": 0})
    assert again == first  # same id, same content: the first result
    with pytest.raises(ClientError) as conflict:
        await call(node, "append", {**SEED_EVENT, "id": "e-1", "payload": {"other": 1}})
    assert conflict.value.status == 409 and conflict.value.code == "duplicate_event_id"
    with pytest.raises(ClientError) as wrong:
        await call(node, "append", {**SEED_EVENT, "expected_version": 5})
    assert wrong.value.status == 409 and wrong.value.code == "wrong_expected_version"
    assert "1" in wrong.value.message  # names the current version

    batch = await call(
        node,
        "append_batch",
        [
            {"type": "A", "aggregate_id": "user-123", "payload": {}, "expected_version": 1},
            {"type": "B", "aggregate_id": "order-9", "payload": {}, "expected_version": 0},
        ],
    )
    assert isinstance(batch, dict)
    assert [(e["index"], e["version"]) for e in batch["events"]] == [(2, 2), (3, 1)]
    # All or nothing: one bad expectation fails the whole batch and writes nothing.
    with pytest.raises(ClientError):
        await call(
            node,
            "append_batch",
            [
                {"type": "C", "aggregate_id": "x", "payload": {}},
                {"type": "D", "aggregate_id": "order-9", "payload": {}, "expected_version": 0},
            ],
        )
    log = await call(node, "read_log", from_index=1, limit=10)
    assert isinstance(log, dict) and [e["index"] for e in log["events"]] == [1, 2, 3]
    backward = await call(node, "read", "user-123", direction="backward", limit=1)
    assert isinstance(backward, dict) and backward["events"][0]["version"] == 2
    window = await call(node, "read", "user-123", from_version=2)
    assert isinstance(window, dict) and [e["version"] for e in window["events"]] == [2]
    unknown = await call(node, "read", "nobody")
    assert unknown == {"events": [], "count": 0, "version": 0}


async def test_metrics_and_probes(node: Node) -> None:
    await call(node, "append", SEED_EVENT)

    def get(path: str) -> tuple[int, str]:
        with WalstoreClient(f"http://127.0.0.1:{node.http_port}") as client:
            r = client.request("GET", path, check=False)
            return r.status, r.body if isinstance(r.body, str) else str(r.body)

    assert (await trio.to_thread.run_sync(get, "/health/live"))[0] == 200
    assert (await trio.to_thread.run_sync(get, "/health/ready"))[0] == 200
    code, text = await trio.to_thread.run_sync(get, "/metrics")
    assert code == 200
    for name in (
        "walstore_events_appended_total 1.0",
        "walstore_wal_fsync_seconds_count",
        "walstore_wal_fsync_batch_events_bucket",
        "walstore_wal_bytes_written_total",
        'walstore_http_request_seconds_count{route="/events",status="201"}',
        "walstore_commit_index",
        "walstore_last_applied 1.0",
    ):
        assert name in text, name


async def test_subscribe_catches_up_then_follows(node: Node) -> None:
    await call(node, "append", {**SEED_EVENT, "id": "s-1"})
    stream = await trio.open_tcp_stream("127.0.0.1", node.http_port)
    await stream.send_all(b"GET /subscribe?from_index=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    with trio.fail_after(10):
        while b"s-1" not in received:
            received += await stream.receive_some(65536)
        await call(node, "append", {**SEED_EVENT, "id": "s-2"})
        while b"s-2" not in received:
            received += await stream.receive_some(65536)
    assert b"text/event-stream" in received
    await stream.aclose()


async def test_issue13_additions_through_a_real_node(node: Node) -> None:
    """Binary payloads, "exists", tracking, filters, backward reads and a filtered
    subscription's checkpoint, over a real node's WAL and HTTP port (the restart path is
    in tests/test_replication_batches.py)."""
    from fakes import HttpTestClient

    port = node.http_port
    client = await HttpTestClient.connect(port)
    events = [
        {"type": "Blob", "aggregate_id": "b-1", "payload_base64": "AAEC/w=="},
        {"type": "Made", "aggregate_id": "o-1", "payload": {"n": 1}},
        {"type": "Made", "aggregate_id": "o-2", "payload": {"n": 2}, "expected_version": 0},
        {"type": "Other", "aggregate_id": "o-1", "payload": {"n": 3}, "expected_version": "exists"},
    ]
    response = await client.request(
        "POST", "/events/batch", json={"events": events, "tracking": {"consumer": "proj", "position": 4}}
    )
    assert response.status == 201, response.body
    stale = await client.request(
        "POST", "/events/batch", json={"events": [], "tracking": {"consumer": "proj", "position": 4}}
    )
    assert stale.status == 409 and stale.json()["error"]["stored_position"] == 4
    assert (await client.request("GET", "/consumers/proj")).json() == {"consumer": "proj", "position": 4}
    page = (await client.request("GET", "/events?types=Made&aggregate_prefix=o-")).json()
    assert [e["index"] for e in page["events"]] == [2, 3] and page["next_index"] == 5
    page = (await client.request("GET", "/events?direction=backward&limit=2")).json()
    assert [e["index"] for e in page["events"]] == [4, 3] and page["next_index"] == 2
    (blob,) = (await client.request("GET", "/events/b-1")).json()["events"]
    assert blob["payload_base64"] == "AAEC/w==" and "payload" not in blob

    sub = await HttpTestClient.connect(port)
    await sub.send_raw(b"GET /subscribe?types=Blob HTTP/1.1\r\nhost: t\r\n\r\n")
    assert (await sub.read_head()).status == 200
    raw = b""
    with trio.fail_after(30):
        while b"event: checkpoint" not in raw:
            raw += await sub.read_chunk()
    assert raw.startswith(b"id: 1\ndata: ")
    assert raw.endswith(b'id: 4\nevent: checkpoint\ndata: {"index":4}\n\n')
    await sub.aclose()
    await client.aclose()
