"""The HTTP API's additions of issue 13 over real sockets and the real store
(``fakes.FakeEventService``): ``expected_version: "exists"``, ``payload_base64``, log
filters, backward reads, SSE checkpoints, consumer positions and the batch limits."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from fakes import FakeEventService, HttpTestClient, HttpTestResponse, start_server

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
