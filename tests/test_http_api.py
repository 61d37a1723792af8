"""The HTTP API over real sockets: every route's shape (the seed's keys exactly), the
extensions, bad input with its status and code, error mapping, and Server-Sent Events.

The service behind the routes is the product's ``EventStore`` (``fakes.FakeEventService``
wraps it with fault injection only), so the codes asserted here are the ones users get."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
import trio
from fakes import FakeEventService, HttpTestClient, HttpTestResponse, start_server
from prometheus_client.core import Metric

from walstore.errors import OutcomeUnknown, StorageError, UnavailableError
from walstore.http.app import HttpApp
from walstore.metrics import Metrics
from walstore.service import NodeStatus, PeerStatus

SEED_EVENT = {
    "type": "UserCreated",
    "aggregate_id": "user-123",
    "payload": {"name": "John Doe", "email": "john@example.com"},
    "metadata": {"source": "api"},
}
EVENT_KEYS = ["id", "type", "timestamp", "aggregate_id", "payload", "metadata", "version", "index", "recorded_at"]


@pytest.fixture
def service() -> FakeEventService:
    return FakeEventService("event-store-0")


@pytest.fixture
async def port(nursery: trio.Nursery, service: FakeEventService) -> int:
    _, bound = await start_server(nursery, service)
    return bound


@pytest.fixture
async def client(port: int) -> AsyncIterator[HttpTestClient]:
    connection = await HttpTestClient.connect(port)
    yield connection
    await connection.aclose()


def error_of(response: HttpTestResponse) -> dict[str, Any]:
    body = response.json()
    assert list(body) == ["success", "error"]
    assert body["success"] is False
    error: dict[str, Any] = body["error"]
    assert isinstance(error["message"], str)
    return error


async def append(client: HttpTestClient, **fields: Any) -> dict[str, Any]:
    response = await client.request("POST", "/events", json={**SEED_EVENT, **fields})
    assert response.status == 201, response.body
    result: dict[str, Any] = response.json()
    return result


# ------------------------------------------------------------------ writes


async def test_post_event_seed_shape(client: HttpTestClient, service: FakeEventService) -> None:
    response = await client.request("POST", "/events", json=SEED_EVENT)
    assert response.status == 201
    assert response.reason == "Created"
    assert response.header("content-type") == "application/json"
    body = response.json()
    assert list(body) == ["success", "event_id", "index", "version"]
    assert body["success"] is True
    assert (body["index"], body["version"]) == (1, 1)
    stored = service.log[0]
    assert stored.id == body["event_id"]
    assert stored.payload == b'{"name":"John Doe","email":"john@example.com"}'
    assert stored.metadata == b'{"source":"api"}'


async def test_post_with_client_id_is_idempotent_and_conflicts_on_other_content(client: HttpTestClient) -> None:
    first = await append(client, id="evt-1")
    assert first["event_id"] == "evt-1"
    assert await append(client, id="evt-1") == first
    response = await client.request("POST", "/events", json={**SEED_EVENT, "id": "evt-1", "type": "Other"})
    assert response.status == 409
    error = error_of(response)
    assert error["code"] == "duplicate_event_id"
    assert error["event_id"] == "evt-1"


async def test_expected_version_mismatch_is_409_with_details(client: HttpTestClient) -> None:
    assert (await append(client, expected_version=0))["version"] == 1
    response = await client.request("POST", "/events", json={**SEED_EVENT, "expected_version": 0})
    assert response.status == 409
    error = error_of(response)
    assert error["code"] == "wrong_expected_version"
    assert error["current_version"] == 1
    assert error["expected_version"] == 0


async def test_post_batch_shape(client: HttpTestClient, service: FakeEventService) -> None:
    events = [
        {**SEED_EVENT, "aggregate_id": "a", "expected_version": 0},
        {**SEED_EVENT, "aggregate_id": "b"},
        {**SEED_EVENT, "aggregate_id": "a", "expected_version": 1},
    ]
    response = await client.request("POST", "/events/batch", json={"events": events})
    assert response.status == 201
    body = response.json()
    assert list(body) == ["success", "events", "first_index", "last_index"]
    assert body["success"] is True
    assert [list(e) for e in body["events"]] == [["event_id", "index", "version"]] * 3
    assert [(e["index"], e["version"]) for e in body["events"]] == [(1, 1), (2, 1), (3, 2)]
    assert (body["first_index"], body["last_index"]) == (1, 3)
    assert [e.id for e in service.log] == [e["event_id"] for e in body["events"]]


async def test_batch_conflict_appends_nothing(client: HttpTestClient, service: FakeEventService) -> None:
    events = [{**SEED_EVENT, "aggregate_id": "a"}, {**SEED_EVENT, "aggregate_id": "b", "expected_version": 3}]
    response = await client.request("POST", "/events/batch", json={"events": events})
    assert response.status == 409
    assert service.log == []


async def test_batch_repeated_whole_returns_the_first_answer(client: HttpTestClient, service: FakeEventService) -> None:
    events = [{**SEED_EVENT, "id": "b-1", "aggregate_id": "a"}, {**SEED_EVENT, "id": "b-2", "aggregate_id": "a"}]
    first = await client.request("POST", "/events/batch", json={"events": events})
    again = await client.request("POST", "/events/batch", json={"events": events})
    assert (first.status, again.status) == (201, 201)
    assert again.json() == first.json()
    assert len(service.log) == 2


async def test_same_id_twice_in_one_batch_is_400(client: HttpTestClient, service: FakeEventService) -> None:
    events = [{**SEED_EVENT, "id": "twice"}, {**SEED_EVENT, "id": "twice", "aggregate_id": "other"}]
    response = await client.request("POST", "/events/batch", json={"events": events})
    assert response.status == 400
    error = error_of(response)
    assert (error["code"], error["field"], error["event_index"]) == ("duplicate_id", "id", 1)
    assert service.log == []


# ------------------------------------------------------------------ reads


async def test_read_aggregate_seed_shape(client: HttpTestClient) -> None:
    written = await append(client)
    response = await client.request("GET", "/events/user-123")
    assert response.status == 200
    body = response.json()
    assert list(body) == ["events", "count", "version"]
    assert (body["count"], body["version"]) == (1, 1)
    (event,) = body["events"]
    assert list(event) == EVENT_KEYS
    assert event["id"] == written["event_id"]
    assert event["type"] == "UserCreated"
    assert event["timestamp"] == 1_700_000_001  # whole Unix seconds, as the seed had
    assert event["aggregate_id"] == "user-123"
    assert event["payload"] == SEED_EVENT["payload"]
    assert event["metadata"] == {"source": "api"}
    assert (event["version"], event["index"]) == (1, 1)


async def test_unknown_aggregate_is_empty_not_404(client: HttpTestClient) -> None:
    response = await client.request("GET", "/events/nobody")
    assert response.status == 200
    assert response.json() == {"events": [], "count": 0, "version": 0}


async def test_read_aggregate_paging_and_direction(client: HttpTestClient, service: FakeEventService) -> None:
    for _ in range(5):
        await append(client, aggregate_id="acc")
    await append(client, aggregate_id="other")

    async def versions(query: str) -> list[int]:
        response = await client.request("GET", f"/events/acc?{query}")
        assert response.status == 200
        body = response.json()
        assert body["version"] == 5
        assert body["count"] == len(body["events"])
        return [e["version"] for e in body["events"]]

    assert await versions("") == [1, 2, 3, 4, 5]
    assert await versions("from_version=2&limit=2") == [2, 3]
    assert await versions("direction=backward") == [5, 4, 3, 2, 1]
    assert await versions("direction=backward&from_version=3&limit=2") == [3, 2]
    assert await versions("min_index=6") == [1, 2, 3, 4, 5]
    assert service.read_calls[-1]["min_index"] == 6


async def test_percent_encoded_aggregate_id(client: HttpTestClient) -> None:
    await append(client, aggregate_id="user 1é")
    response = await client.request("GET", "/events/user%201%C3%A9")
    assert response.json()["count"] == 1


async def test_read_log_shape_and_paging(client: HttpTestClient) -> None:
    for i in range(5):
        await append(client, aggregate_id=f"agg-{i}")
    response = await client.request("GET", "/events?from_index=2&limit=3")
    assert response.status == 200
    body = response.json()
    assert list(body) == ["events", "count", "last_index", "next_index"]
    assert [e["index"] for e in body["events"]] == [2, 3, 4]
    assert all(list(e) == EVENT_KEYS for e in body["events"])
    assert (body["count"], body["last_index"], body["next_index"]) == (3, 5, 5)
    tail = (await client.request("GET", "/events?from_index=6")).json()
    assert (tail["events"], tail["count"], tail["last_index"], tail["next_index"]) == ([], 0, 5, 6)


async def test_min_index_timeout_is_503_with_retry_after(client: HttpTestClient) -> None:
    response = await client.request("GET", "/events?min_index=10")
    assert response.status == 503
    assert response.header("retry-after") == "1"
    assert error_of(response)["code"] == "min_index_timeout"


# ------------------------------------------------------------------ node state


async def test_status_seed_fields_first_then_extensions(nursery: trio.Nursery) -> None:
    service = FakeEventService("event-store-1")
    service.node_status = NodeStatus(
        id="event-store-1",
        is_leader=False,
        leader_id="event-store-0",
        term=5,
        commit_index=0,
        last_applied=0,
        role="follower",
        ready=True,
        peers=[PeerStatus("event-store-0", "10.0.0.1:7000", True, 100, 0)],
        extra={"wal_segments": 3, "id": "must-not-override"},
    )
    _, port = await start_server(nursery, service)
    client = await HttpTestClient.connect(port)
    body = (await client.request("GET", "/status")).json()
    assert list(body)[:6] == ["id", "is_leader", "leader_id", "term", "commit_index", "last_applied"]
    assert body["id"] == "event-store-1"
    assert (body["is_leader"], body["leader_id"], body["term"]) == (False, "event-store-0", 5)
    assert (body["role"], body["ready"]) == ("follower", True)
    assert body["peers"] == [
        {
            "id": "event-store-0",
            "address": "10.0.0.1:7000",
            "connected": True,
            "match_index": 100,
            "lag": 0,
            "voter": False,
        }
    ]
    assert body["wal_segments"] == 3


async def test_health_seed_shape(client: HttpTestClient, service: FakeEventService) -> None:
    response = await client.request("GET", "/health")
    assert response.status == 200
    body = response.json()
    assert list(body) == ["status", "node_id", "is_leader", "leader_id", "timestamp"]
    assert body["status"] == "healthy"
    assert (body["node_id"], body["is_leader"], body["leader_id"]) == ("event-store-0", True, "event-store-0")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["timestamp"])

    service.node_status = NodeStatus("event-store-0", False, None, 1, 0, 0, healthy=False)
    response = await client.request("GET", "/health")
    assert response.status == 503
    assert response.json()["status"] == "unhealthy"


async def test_liveness_and_readiness(client: HttpTestClient, service: FakeEventService) -> None:
    assert (await client.request("GET", "/health/live")).status == 200
    assert (await client.request("GET", "/health/ready")).status == 200
    service.node_status = NodeStatus("event-store-0", False, None, 1, 0, 0, role="candidate", ready=False)
    response = await client.request("GET", "/health/ready")
    assert response.status == 503
    assert response.json()["status"] == "not_ready"
    assert (await client.request("GET", "/health/live")).status == 200


async def test_metrics_is_prometheus_text_with_request_histogram(client: HttpTestClient) -> None:
    await append(client)
    response = await client.request("GET", "/metrics")
    assert response.status == 200
    assert (response.header("content-type") or "").startswith("text/plain")
    text = response.body.decode()
    assert 'walstore_http_request_seconds_count{route="/events",status="201"} 1.0' in text
    assert "walstore_commit_index" in text


async def test_head_is_get_without_body(client: HttpTestClient) -> None:
    get = await client.request("GET", "/health/live")
    head = await client.request("HEAD", "/health/live")
    assert head.status == 200
    assert head.body == b""
    assert head.header("content-length") == get.header("content-length") == str(len(get.body))
    assert (await client.request("GET", "/health/live")).status == 200  # framing intact after HEAD


# ------------------------------------------------------------------ routing errors


async def test_unknown_route_is_404_json(client: HttpTestClient) -> None:
    for target in ("/nope", "/events/a/b", "/events/", "/", "/health/"):
        response = await client.request("GET", target)
        assert response.status == 404, target
        assert error_of(response)["code"] == "not_found"


async def test_wrong_method_is_405_with_allow(client: HttpTestClient) -> None:
    response = await client.request("DELETE", "/events")
    assert response.status == 405
    assert response.header("allow") == "GET, HEAD, POST"
    assert error_of(response)["code"] == "method_not_allowed"
    response = await client.request("POST", "/events/user-1", json=SEED_EVENT)
    assert response.status == 405
    assert response.header("allow") == "GET, HEAD"
    assert (await client.request("PUT", "/events/batch", b"{}")).header("allow") == "GET, HEAD, POST"


# ------------------------------------------------------------------ bad input over HTTP


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"type": "T", "aggregate_id": "a", "payload": {"x": NaN}}', "invalid_json"),
        (b'{"type": "\xff\xfe", "aggregate_id": "a", "payload": {}}', "invalid_json"),
        (b'{"type": "\\udfff", "aggregate_id": "a", "payload": {}}', "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b"[]", "invalid_body"),
        (orjson.dumps({**SEED_EVENT, "id": "x" * 100_000}), "invalid_field"),
        (orjson.dumps({**SEED_EVENT, "aggregate_id": "a\x00b"}), "invalid_field"),
        (orjson.dumps({**SEED_EVENT, "expected_version": True}), "invalid_field"),
        (orjson.dumps({**SEED_EVENT, "surprise": 1}), "unknown_field"),
        (orjson.dumps({"type": "T", "aggregate_id": "a"}), "missing_field"),
    ],
)
async def test_bad_bodies_are_400(client: HttpTestClient, service: FakeEventService, raw: bytes, code: str) -> None:
    response = await client.request("POST", "/events", raw)
    assert response.status == 400
    assert error_of(response)["code"] == code
    assert service.log == []
    assert (await client.request("GET", "/health/live")).status == 200  # the connection survives


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/json; charset=latin-1"])
async def test_wrong_content_type_is_415(client: HttpTestClient, content_type: str | None) -> None:
    response = await client.request("POST", "/events", orjson.dumps(SEED_EVENT), content_type=content_type)
    assert response.status == 415
    assert error_of(response)["code"] == "unsupported_media_type"


async def test_bad_query_is_400_naming_the_parameter(client: HttpTestClient) -> None:
    response = await client.request("GET", "/events/a?limit=0")
    assert response.status == 400
    error = error_of(response)
    assert (error["code"], error["parameter"]) == ("invalid_query", "limit")
    assert (await client.request("GET", "/events/a%FF")).status == 400


# ------------------------------------------------------------------ service errors


async def test_unavailable_is_503_with_retry_after_and_leader(
    client: HttpTestClient, service: FakeEventService
) -> None:
    service.failures["append"] = UnavailableError("no leader", code="no_leader", retry_after_s=1.5, leader_id="n2")
    response = await client.request("POST", "/events", json=SEED_EVENT)
    assert response.status == 503
    assert response.header("retry-after") == "2"
    error = error_of(response)
    assert (error["code"], error["leader_id"], error["retry_after_s"]) == ("no_leader", "n2", 2)


async def test_outcome_unknown_is_504_with_retry_after(client: HttpTestClient, service: FakeEventService) -> None:
    service.failures["append"] = OutcomeUnknown("commit not seen in time")
    response = await client.request("POST", "/events/batch", json={"events": [SEED_EVENT]})
    assert response.status == 504
    assert response.header("retry-after") == "1"
    error = error_of(response)
    assert error["code"] == "outcome_unknown"
    assert "leader_id" not in error


@pytest.mark.parametrize("error", [StorageError("disk on fire"), RuntimeError("bug")])
async def test_unexpected_service_errors_are_500_and_contained(
    client: HttpTestClient, service: FakeEventService, error: Exception
) -> None:
    service.failures["append"] = error
    response = await client.request("POST", "/events", json=SEED_EVENT)
    assert response.status == 500
    assert error_of(response) == {"code": "internal_error", "message": "internal server error"}
    assert (await client.request("GET", "/health/live")).status == 200


# ------------------------------------------------------------------ Server-Sent Events


def sse_messages(raw: bytes) -> list[dict[str, Any]]:
    messages = []
    for block in raw.split(b"\n\n"):
        if not block or block.startswith(b":"):
            continue
        fields = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        messages.append({"id": int(fields[b"id"]), "data": orjson.loads(fields[b"data"])})
    return messages


async def read_sse(client: HttpTestClient, count: int) -> list[dict[str, Any]]:
    raw = b""
    with trio.fail_after(10):
        while len(sse_messages(raw)) < count:
            raw += await client.read_chunk()
    return sse_messages(raw)


async def test_subscribe_delivers_catch_up_then_live(client: HttpTestClient, port: int) -> None:
    for i in range(3):
        await append(client, aggregate_id=f"a{i}")
    await client.send_raw(b"GET /subscribe?from_index=2 HTTP/1.1\r\nhost: t\r\n\r\n")
    head = await client.read_head()
    assert head.status == 200
    assert head.header("content-type") == "text/event-stream"
    assert head.header("cache-control") == "no-cache"
    assert head.chunked
    caught_up = await read_sse(client, 2)
    assert [m["id"] for m in caught_up] == [2, 3]
    assert [m["data"]["index"] for m in caught_up] == [2, 3]
    assert list(caught_up[0]["data"]) == EVENT_KEYS

    other = await HttpTestClient.connect(port)
    live = await append(other, aggregate_id="live")
    (message,) = await read_sse(client, 1)
    assert message["id"] == live["index"] == 4
    assert message["data"]["aggregate_id"] == "live"
    await other.aclose()


async def test_subscribe_resumes_after_last_event_id(client: HttpTestClient) -> None:
    for i in range(3):
        await append(client, aggregate_id=f"a{i}")
    await client.send_raw(b"GET /subscribe HTTP/1.1\r\nhost: t\r\nlast-event-id: 2\r\n\r\n")
    assert (await client.read_head()).status == 200
    assert [m["id"] for m in await read_sse(client, 1)] == [3]


async def test_subscribe_sends_heartbeats(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, app=HttpApp(FakeEventService(), heartbeat_interval_s=0.05))
    client = await HttpTestClient.connect(port)
    await client.send_raw(b"GET /subscribe HTTP/1.1\r\nhost: t\r\n\r\n")
    assert (await client.read_head()).status == 200
    with trio.fail_after(5):
        assert await client.read_chunk() == b": heartbeat\n\n"


async def test_subscription_ending_ends_the_stream_cleanly(client: HttpTestClient, service: FakeEventService) -> None:
    await client.send_raw(b"GET /subscribe HTTP/1.1\r\nhost: t\r\n\r\n")
    head = await client.read_head()
    assert head.header("connection") == "close"
    service.failures["subscribe"] = UnavailableError("stepping down")
    service.wake()  # wakes the subscription, which then fails
    with trio.fail_after(5):
        assert await client.read_chunk() == b""  # the terminating chunk: a clean end
        assert await client.read_until_closed() == b""


async def test_client_leaving_closes_the_subscription(client: HttpTestClient, service: FakeEventService) -> None:
    await client.send_raw(b"GET /subscribe HTTP/1.1\r\nhost: t\r\n\r\n")
    assert (await client.read_head()).status == 200
    with trio.fail_after(5):
        await service.subscription_opened.wait()
    assert service.subscriptions_open == 1
    await client.aclose()
    with trio.fail_after(5):
        await service.subscription_closed.wait()
    assert service.subscriptions_open == 0


async def test_subscribe_bad_from_index_is_400(client: HttpTestClient) -> None:
    response = await client.request("GET", "/subscribe?from_index=0")
    assert response.status == 400
    assert error_of(response)["parameter"] == "from_index"


async def test_metrics_renders_off_the_event_loop(nursery: trio.Nursery, service: FakeEventService) -> None:
    """A render costs milliseconds of CPU; on the loop it held every other request."""
    render_s = 0.3

    class SlowMetrics(Metrics):
        def render(self, state: Sequence[Metric] = ()) -> bytes:
            self.thread = threading.get_ident()
            time.sleep(render_s)  # holds the thread it runs in, as a real render's CPU does
            return super().render(state)

    metrics = SlowMetrics()
    _, bound = await start_server(nursery, app=HttpApp(service, metrics=metrics))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    nursery.start_soon(tick)
    connection = await HttpTestClient.connect(bound)
    try:
        started = ticks
        response = await connection.request("GET", "/metrics")
    finally:
        await connection.aclose()
    assert response.status == 200 and b"walstore_term" in response.body
    assert metrics.thread != threading.get_ident()
    assert ticks - started >= render_s / 0.01 / 3  # the loop kept running meanwhile
