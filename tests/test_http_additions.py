"""The HTTP API's additions of issue 13 over real sockets and the real store
(``fakes.FakeEventService``): ``expected_version: "exists"``, ``payload_base64``, log
filters, backward reads, SSE checkpoints, consumer positions and the batch limits."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import trio
from fakes import FakeEventService, HttpTestClient, HttpTestResponse, encode_request, start_server

from walstore.http.app import HttpApp
from walstore.http.server import HttpLimits

SEED_EVENT = {"type": "UserCreated", "aggregate_id": "user-123", "payload": {"name": "Jo"}}


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
    assert list(body) == ["success", "error"] and body["success"] is False
    error: dict[str, Any] = body["error"]
    assert isinstance(error["message"], str)
    return error


async def post(client: HttpTestClient, **fields: Any) -> HttpTestResponse:
    return await client.request("POST", "/events", json={**SEED_EVENT, **fields})


# ---------------------------------------------------------------- expected_version "exists"


async def test_exists_conflicts_on_a_new_aggregate_then_passes(client: HttpTestClient) -> None:
    response = await post(client, expected_version="exists")
    assert response.status == 409
    error = error_of(response)
    assert error["code"] == "wrong_expected_version"
    assert error["current_version"] == 0 and error["expected_version"] == "exists"
    assert (await post(client)).status == 201
    response = await post(client, expected_version="exists")
    assert response.status == 201 and response.json()["version"] == 2


@pytest.mark.parametrize("value", ["EXISTS", "any", "", -1, 1.5, True, [], {}])
async def test_other_expected_versions_are_400(client: HttpTestClient, service: FakeEventService, value: Any) -> None:
    response = await post(client, expected_version=value)
    assert response.status == 400
    error = error_of(response)
    assert (error["code"], error["field"]) == ("invalid_field", "expected_version")
    assert '"exists"' in error["message"]
    assert service.log == []


async def test_exists_in_a_batch(client: HttpTestClient, service: FakeEventService) -> None:
    batch = {
        "events": [
            {**SEED_EVENT, "aggregate_id": "n", "expected_version": 0},
            {**SEED_EVENT, "aggregate_id": "n", "expected_version": "exists"},
        ]
    }
    response = await client.request("POST", "/events/batch", json=batch)
    assert response.status == 201, response.body
    bad = {
        "events": [
            {**SEED_EVENT, "aggregate_id": "m"},
            {**SEED_EVENT, "aggregate_id": "o", "expected_version": "exists"},
        ]
    }
    response = await client.request("POST", "/events/batch", json=bad)
    assert response.status == 409
    assert len(service.log) == 2  # nothing of the failed batch


# ---------------------------------------------------------------- binary payloads


@pytest.mark.parametrize("raw", [b"", b"\x00", bytes(range(256)), b"\xff\xfe{}"])
async def test_payload_base64_round_trips(client: HttpTestClient, raw: bytes) -> None:
    text = base64.b64encode(raw).decode()
    response = await post(client, payload=None, payload_base64=text)
    assert response.status == 400  # "payload": null next to payload_base64 is still both
    event = {"type": "Blob", "aggregate_id": "b", "payload_base64": text, "metadata": {"k": 1}}
    response = await client.request("POST", "/events", json=event)
    assert response.status == 201, response.body
    index = response.json()["index"]
    for target in (f"/events?from_index={index}&limit=1", "/events/b"):
        (got,) = (await client.request("GET", target)).json()["events"]
        assert got["payload_base64"] == text
        assert "payload" not in got
        assert list(got) == [
            "id",
            "type",
            "timestamp",
            "aggregate_id",
            "payload_base64",
            "metadata",
            "version",
            "index",
            "recorded_at",
        ]
        assert base64.b64decode(got["payload_base64"]) == raw
        assert got["metadata"] == {"k": 1}


async def test_binary_repeat_is_idempotent_and_other_bytes_conflict(client: HttpTestClient) -> None:
    event = {"id": "e1", "type": "Blob", "aggregate_id": "b", "payload_base64": "AAEC"}
    first = await client.request("POST", "/events", json=event)
    assert first.status == 201
    again = await client.request("POST", "/events", json=event)
    assert again.status == 201 and again.json() == first.json()
    other = await client.request("POST", "/events", json={**event, "payload_base64": "AAED"})
    assert other.status == 409 and error_of(other)["code"] == "duplicate_event_id"


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"payload": {}, "payload_base64": "AA=="}, "invalid_field", "payload_base64"),
        ({"payload_base64": "AA"}, "invalid_field", "payload_base64"),  # no padding
        ({"payload_base64": "AB=="}, "invalid_field", "payload_base64"),  # non-canonical
        ({"payload_base64": "A*=="}, "invalid_field", "payload_base64"),
        ({"payload_base64": "AA==\n"}, "invalid_field", "payload_base64"),
        ({"payload_base64": "-_8="}, "invalid_field", "payload_base64"),  # url-safe alphabet
        ({"payload_base64": 12}, "invalid_field", "payload_base64"),
        ({"payload_base64": "é"}, "invalid_field", "payload_base64"),
        ({}, "missing_field", "payload"),
    ],
)
async def test_bad_payload_base64_is_400(
    client: HttpTestClient, service: FakeEventService, fields: dict[str, Any], code: str, field: str
) -> None:
    event = {"type": "Blob", "aggregate_id": "b", **fields}
    for target, body in (("/events", event), ("/events/batch", {"events": [event]})):
        response = await client.request("POST", target, json=body)
        assert response.status == 400, response.body
        error = error_of(response)
        assert (error["code"], error["field"]) == (code, field)
    assert service.log == []


# ---------------------------------------------------------------- filters, backward reads


async def fill(client: HttpTestClient, spec: list[tuple[str, str]]) -> None:
    events = [{"type": t, "aggregate_id": a, "payload": {"n": i}} for i, (a, t) in enumerate(spec, 1)]
    response = await client.request("POST", "/events/batch", json={"events": events})
    assert response.status == 201, response.body


def indexes(body: dict[str, Any]) -> list[int]:
    return [e["index"] for e in body["events"]]


async def get_log(client: HttpTestClient, query: str) -> dict[str, Any]:
    response = await client.request("GET", f"/events?{query}")
    assert response.status == 200, response.body
    body: dict[str, Any] = response.json()
    assert list(body) == ["events", "count", "last_index", "next_index"]
    assert body["count"] == len(body["events"])
    return body


async def test_read_log_filters(client: HttpTestClient) -> None:
    await fill(client, [("order-1", "A"), ("user-1", "B"), ("order-2", "B"), ("order-3", "C,D"), ("o", "A")])
    assert indexes(await get_log(client, "types=B")) == [2, 3]
    assert indexes(await get_log(client, "types=A,B")) == [1, 2, 3, 5]
    assert indexes(await get_log(client, "aggregate_prefix=order-")) == [1, 3, 4]
    assert indexes(await get_log(client, "aggregate_prefix=order-&types=B")) == [3]
    assert indexes(await get_log(client, "aggregate_prefix=ord%65r-2")) == [3]
    body = await get_log(client, "types=B&limit=1")
    assert indexes(body) == [2] and body["next_index"] == 3 and body["last_index"] == 5
    body = await get_log(client, "types=Z")
    assert indexes(body) == [] and body["next_index"] == 6
    body = await get_log(client, "from_index=9&types=A")
    assert body["next_index"] == 9  # past the end: read from there again later


async def test_read_log_scan_budget_moves_next_index(client: HttpTestClient, service: FakeEventService) -> None:
    await fill(client, [("a", "Common")] * 29 + [("a", "Rare")])
    service.scan_budget = 10
    body = await get_log(client, "types=Rare&limit=5")
    assert body["events"] == [] and body["next_index"] == 11
    body = await get_log(client, f"types=Rare&limit=5&from_index={body['next_index']}")
    assert body["events"] == [] and body["next_index"] == 21
    body = await get_log(client, f"types=Rare&limit=5&from_index={body['next_index']}")
    assert [e["index"] for e in body["events"]] == [30] and body["next_index"] == 31


async def test_read_log_backward(client: HttpTestClient) -> None:
    await fill(client, [("a", "X"), ("b", "Y"), ("a", "X"), ("b", "Y")])
    body = await get_log(client, "direction=backward")
    assert indexes(body) == [4, 3, 2, 1] and body["next_index"] == 0
    body = await get_log(client, "direction=backward&limit=3")
    assert indexes(body) == [4, 3, 2] and body["next_index"] == 1
    body = await get_log(client, "direction=backward&from_index=3&types=Y")
    assert indexes(body) == [2] and body["next_index"] == 0
    body = await get_log(client, "direction=backward&from_index=99&limit=1")
    assert indexes(body) == [4] and body["next_index"] == 3
    forward = await get_log(client, "direction=forward")
    assert indexes(forward) == [1, 2, 3, 4] and forward["next_index"] == 5


async def test_backward_read_of_an_empty_log(client: HttpTestClient) -> None:
    body = await get_log(client, "direction=backward")
    assert body == {"events": [], "count": 0, "last_index": 0, "next_index": 0}


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("types=", "types"),
        ("types=A,,B", "types"),
        ("types=A&types=B", "types"),
        ("types=%01", "types"),
        ("types=" + ",".join(f"T{i}" for i in range(101)), "types"),
        ("types=" + "x" * 257, "types"),
        ("aggregate_prefix=", "aggregate_prefix"),
        ("aggregate_prefix=" + "x" * 257, "aggregate_prefix"),
        ("direction=sideways", "direction"),
        ("direction=backward&from_index=0", "from_index"),
    ],
)
async def test_bad_filters_are_400(client: HttpTestClient, query: str, parameter: str) -> None:
    for path in ("/events", "/subscribe"):
        if path == "/subscribe" and parameter in ("direction", "from_index"):
            continue
        response = await client.request("GET", f"{path}?{query}")
        assert response.status == 400, (path, response.body)
        error = error_of(response)
        assert (error["code"], error["parameter"]) == ("invalid_query", parameter)


# ---------------------------------------------------------------- SSE checkpoints


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block or block.startswith(":"):
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append(fields)
    return out


async def read_messages(client: HttpTestClient, n: int) -> list[dict[str, Any]]:
    raw = b""
    with trio.fail_after(10):
        while len(parse_sse(raw)) < n or not raw.endswith(b"\n\n"):
            raw += await client.read_chunk()
    messages = parse_sse(raw)
    assert len(messages) == n, messages
    return messages


async def subscribe(port: int, query: str, headers: str = "") -> HttpTestClient:
    client = await HttpTestClient.connect(port)
    await client.send_raw(f"GET /subscribe?{query} HTTP/1.1\r\nhost: t\r\n{headers}\r\n".encode())
    head = await client.read_head()
    assert head.status == 200
    return client


async def test_filtered_subscription_sends_matches_and_an_idle_checkpoint(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    _, port = await start_server(nursery, app=HttpApp(service, checkpoint_idle_s=0.01))
    writer = await HttpTestClient.connect(port)
    await fill(writer, [("a", "X"), ("b", "Y"), ("a", "X"), ("a", "Z")])
    sub = await subscribe(port, "types=Y")
    first, checkpoint = await read_messages(sub, 2)
    assert first["id"] == "2" and "event" not in first
    assert orjson.loads(first["data"])["type"] == "Y"
    assert checkpoint == {"id": "4", "event": "checkpoint", "data": '{"index":4}'}
    # live: a match, then scanned non-matches and another checkpoint
    await fill(writer, [("c", "Y"), ("c", "X")])
    live, checkpoint = await read_messages(sub, 2)
    assert live["id"] == "5"
    assert checkpoint == {"id": "6", "event": "checkpoint", "data": '{"index":6}'}
    # resume from the checkpoint's id: nothing before it comes again
    again = await subscribe(port, "aggregate_prefix=c", "last-event-id: 6\r\n")
    await fill(writer, [("c", "W")])
    (message,) = await read_messages(again, 1)
    assert message["id"] == "7"
    for c in (writer, sub, again):
        await c.aclose()


async def test_unfiltered_subscription_sends_no_checkpoints(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    _, port = await start_server(nursery, app=HttpApp(service, checkpoint_idle_s=0.01, heartbeat_interval_s=0.05))
    writer = await HttpTestClient.connect(port)
    await fill(writer, [("a", "X"), ("b", "Y")])
    sub = await subscribe(port, "from_index=1")
    assert [m["id"] for m in await read_messages(sub, 2)] == ["1", "2"]
    with trio.fail_after(10):
        assert await sub.read_chunk() == b": heartbeat\n\n"


async def test_a_long_scan_sends_checkpoints_while_it_runs(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    service.scan_budget = 7
    # idle checkpoints off (an hour): only the every-N-scanned rule can send one
    app = HttpApp(service, checkpoint_idle_s=3600, checkpoint_every_scanned=20)
    _, port = await start_server(nursery, app=app)
    writer = await HttpTestClient.connect(port)
    await fill(writer, [("a", "Common")] * 50 + [("a", "Rare")])
    sub = await subscribe(port, "types=Rare")
    messages = await read_messages(sub, 3)
    assert [m.get("event") for m in messages] == ["checkpoint", "checkpoint", None]
    ids = [int(m["id"]) for m in messages]
    assert ids[0] >= 20 and ids[1] - ids[0] >= 20 and ids[1] < 51 and ids[2] == 51
    for c in (writer, sub):
        await c.aclose()


# ---------------------------------------------------------------- consumer positions


async def test_batch_with_tracking_and_get_consumer(client: HttpTestClient, service: FakeEventService) -> None:
    response = await client.request("GET", "/consumers/projector")
    assert response.status == 200 and response.json() == {"consumer": "projector", "position": None}
    events: list[dict[str, Any]] = [SEED_EVENT, {**SEED_EVENT, "id": "x1"}]
    batch = {"events": events, "tracking": {"consumer": "projector", "position": 3}}
    response = await client.request("POST", "/events/batch", json=batch)
    assert response.status == 201, response.body
    body = response.json()
    assert list(body) == ["success", "events", "first_index", "last_index", "tracking"]
    assert (body["first_index"], body["last_index"]) == (1, 2)
    assert body["tracking"] == {"consumer": "projector", "position": 3}
    response = await client.request("GET", "/consumers/projector?min_index=2")
    assert response.json() == {"consumer": "projector", "position": 3}
    # the same batch again: its events are exact repeats, and its tracking committed with them
    again = await client.request("POST", "/events/batch", json={**batch, "events": events[1:]})
    assert again.status == 201 and again.json()["events"] == body["events"][1:]
    # only a tracking: no events, null indexes
    response = await client.request(
        "POST", "/events/batch", json={"events": [], "tracking": {"consumer": "p2", "position": 1}}
    )
    assert response.status == 201, response.body
    assert response.json() == {
        "success": True,
        "events": [],
        "first_index": None,
        "last_index": None,
        "tracking": {"consumer": "p2", "position": 1},
    }
    assert len(service.log) == 2


async def test_tracking_conflict_is_409_and_writes_nothing(client: HttpTestClient, service: FakeEventService) -> None:
    ok = {"events": [SEED_EVENT], "tracking": {"consumer": "c", "position": 5}}
    assert (await client.request("POST", "/events/batch", json=ok)).status == 201
    for position in (5, 2):
        stale = {
            "events": [{**SEED_EVENT, "aggregate_id": "other"}],
            "tracking": {"consumer": "c", "position": position},
        }
        response = await client.request("POST", "/events/batch", json=stale)
        assert response.status == 409
        error = error_of(response)
        assert error["code"] == "tracking_conflict"
        assert (error["consumer"], error["position"], error["stored_position"]) == ("c", position, 5)
    assert len(service.log) == 1
    assert (await client.request("GET", "/consumers/c")).json()["position"] == 5


async def test_a_batch_without_tracking_answers_the_seed_shape(client: HttpTestClient) -> None:
    response = await client.request("POST", "/events/batch", json={"events": [SEED_EVENT], "tracking": None})
    assert response.status == 201
    assert list(response.json()) == ["success", "events", "first_index", "last_index"]


@pytest.mark.parametrize(
    ("tracking", "code", "field"),
    [
        ([], "invalid_field", "tracking"),
        ({"consumer": "c"}, "missing_field", "tracking.position"),
        ({"position": 1}, "missing_field", "tracking.consumer"),
        ({"consumer": "c", "position": 1, "x": 1}, "unknown_field", "tracking.x"),
        ({"consumer": "c", "position": 0}, "invalid_field", "tracking.position"),
        ({"consumer": "c", "position": True}, "invalid_field", "tracking.position"),
        ({"consumer": "c", "position": "1"}, "invalid_field", "tracking.position"),
        ({"consumer": "", "position": 1}, "invalid_field", "tracking.consumer"),
        ({"consumer": "a/b", "position": 1}, "invalid_field", "tracking.consumer"),
        ({"consumer": "..", "position": 1}, "invalid_field", "tracking.consumer"),
        ({"consumer": "x" * 257, "position": 1}, "invalid_field", "tracking.consumer"),
        ({"consumer": 5, "position": 1}, "invalid_field", "tracking.consumer"),
    ],
)
async def test_bad_tracking_is_400(
    client: HttpTestClient, service: FakeEventService, tracking: Any, code: str, field: str
) -> None:
    response = await client.request("POST", "/events/batch", json={"events": [SEED_EVENT], "tracking": tracking})
    assert response.status == 400, response.body
    error = error_of(response)
    assert (error["code"], error["field"]) == (code, field)
    assert service.log == []


async def test_empty_batch_without_tracking_is_still_400(client: HttpTestClient) -> None:
    response = await client.request("POST", "/events/batch", json={"events": []})
    assert response.status == 400 and error_of(response)["code"] == "empty_batch"


@pytest.mark.parametrize(
    ("target", "status"),
    [("/consumers/", 404), ("/consumers/a/b", 404), ("/consumers/%2e%2e", 400), ("/consumers/%ff", 400)],
)
async def test_bad_consumer_paths(client: HttpTestClient, target: str, status: int) -> None:
    response = await client.request("GET", target)
    assert response.status == status, response.body


async def test_consumers_route_methods(client: HttpTestClient) -> None:
    response = await client.request("POST", "/consumers/c", json={})
    assert response.status == 405 and response.header("allow") == "GET, HEAD"


# ---------------------------------------------------------------- batch limits


async def test_over_limit_batch_content_length_is_refused_unread(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    _, port = await start_server(nursery, service, limits=HttpLimits(max_body_bytes=1024, max_batch_body_bytes=4096))
    client = await HttpTestClient.connect(port)
    # the head only: the answer must come without the body ever being sent
    await client.send_raw(
        b"POST /events/batch HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 4097\r\n\r\n"
    )
    with trio.fail_after(10):
        response = await client.read_response()
    assert response.status == 413
    error = error_of(response)
    assert (error["code"], error["limit"]) == ("batch_too_large", 4096)
    assert service.log == []


async def test_batch_and_single_event_bodies_have_their_own_limits(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    _, port = await start_server(nursery, service, limits=HttpLimits(max_body_bytes=1024, max_batch_body_bytes=8192))
    client = await HttpTestClient.connect(port)
    big = {"type": "T", "aggregate_id": "a", "payload": {"s": "x" * 2000}}
    response = await client.request("POST", "/events", json=big)
    assert response.status == 413 and error_of(response)["code"] == "payload_too_large"
    client = await HttpTestClient.connect(port)
    response = await client.request("POST", "/events/batch", json={"events": [big, {**big, "aggregate_id": "b"}]})
    assert response.status == 201, response.body  # ~4 KiB: over the single-event limit, under the batch one
    # chunked bodies are counted against the same limit
    body = orjson.dumps({"events": [big] * 5})
    raw = (
        b"POST /events/batch HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    )
    await client.send_raw(raw)
    response = await client.read_response()
    assert response.status == 413 and error_of(response)["code"] == "batch_too_large"
    assert len(service.log) == 2


async def test_too_many_events_names_the_configured_limit(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    service.max_batch_events = 5
    _, port = await start_server(nursery, app=HttpApp(service, max_batch_events=5))
    client = await HttpTestClient.connect(port)
    events = [{**SEED_EVENT, "aggregate_id": f"a{i}"} for i in range(6)]
    response = await client.request("POST", "/events/batch", json={"events": events})
    assert response.status == 400
    error = error_of(response)
    assert (error["code"], error["limit"]) == ("too_many_events", 5)
    response = await client.request("POST", "/events/batch", json={"events": events[:5]})
    assert response.status == 201
    assert len(service.log) == 5


async def test_a_10000_event_batch_is_one_atomic_append(client: HttpTestClient, service: FakeEventService) -> None:
    events: list[dict[str, Any]] = [
        {"type": "T", "aggregate_id": f"agg-{i % 97}", "payload": {"i": i}} for i in range(10_000)
    ]
    events[-1]["expected_version"] = 0  # agg-... already has events by then: the whole batch fails
    response = await client.request("POST", "/events/batch", json={"events": events})
    assert response.status == 409 and service.log == []
    del events[-1]["expected_version"]
    response = await client.request(
        "POST", "/events/batch", json={"events": events, "tracking": {"consumer": "c", "position": 1}}
    )
    assert response.status == 201, response.body[:200]
    body = response.json()
    assert (body["first_index"], body["last_index"], len(body["events"])) == (1, 10_000, 10_000)
    assert len(service.log) == 10_000
    too_many = await client.request("POST", "/events/batch", json={"events": [*events, SEED_EVENT]})
    assert too_many.status == 400 and error_of(too_many)["limit"] == 10_000


async def test_large_batches_in_flight_are_capped(nursery: trio.Nursery) -> None:
    service = FakeEventService()
    limits = HttpLimits(max_body_bytes=1024, max_batch_body_bytes=64 * 1024, max_batch_requests=1)
    _, port = await start_server(nursery, service, limits=limits)
    big = {"events": [{"type": "T", "aggregate_id": f"a{i}", "payload": {"s": "x" * 200}} for i in range(10)]}
    service.append_gate = trio.Event()
    first = await HttpTestClient.connect(port)
    await first.send_raw(encode_request("POST", "/events/batch", json=big))
    with trio.fail_after(10):
        await service.append_entered.wait()  # the first large batch is being handled
    second = await HttpTestClient.connect(port)
    with trio.fail_after(10):  # without the cap it would wait behind the gate
        response = await second.request("POST", "/events/batch", json=big)
    assert response.status == 503 and response.header("retry-after") == "1"
    assert error_of(response)["code"] == "batches_busy"
    service.append_gate.set()
    assert (await first.read_response()).status == 201
    service.append_gate = None
    # its slot is free again once it is answered, and small batches never take one
    third = await HttpTestClient.connect(port)
    other = {"events": [{**event, "aggregate_id": f"b{i}"} for i, event in enumerate(big["events"])]}
    assert (await third.request("POST", "/events/batch", json=other)).status == 201
    small = {"events": [{"type": "T", "aggregate_id": "s", "payload": {}}]}
    assert (await third.request("POST", "/events/batch", json=small)).status == 201
    assert len(service.log) == 21
