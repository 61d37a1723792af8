"""The client's side of the server's issue-13 features, against a real node: binary
payloads round-trip byte for byte, ``expected_version="exists"``, filtered and backward
reads of the global log (paging on ``next_index`` when the server returns fewer events
than asked), a filtered subscription whose checkpoints move its resume point while
nothing matches, and the batch limits (10,000 events, 16 MiB) as typed errors."""

from __future__ import annotations

import threading
import time

import pytest
from client_fixtures import fresh
from served_node import ServedNode

from walstore.client import AsyncClient, Client
from walstore.client.errors import BadRequest, WrongExpectedVersion
from walstore.client.models import EventData, RecordedEvent

pytestmark = pytest.mark.slow

WAIT_S = 30.0


def test_binary_payloads_come_back_byte_for_byte(client: Client) -> None:
    agg = fresh("blob")
    blobs = [bytes(range(256)), b"", b"\xff\xfe not utf-8 \x00", b'{"looks": "like json"}']
    first = client.append(agg, "Blob", payload_bytes=blobs[0], metadata={"kind": "raw"})
    client.append_batch([EventData(agg, "Blob", payload_bytes=b) for b in blobs[1:]])
    events = list(client.read_aggregate(agg))
    assert [e.payload_bytes for e in events] == blobs
    assert all(e.payload is None for e in events) and events[0].metadata == {"kind": "raw"}
    # Repeating a binary event by its id is the same idempotent success.
    assert (
        client.append(agg, "Blob", payload_bytes=blobs[0], metadata={"kind": "raw"}, event_id=first.event_id) == first
    )
    with client.subscribe(from_index=first.index) as subscription:
        assert next(subscription).payload_bytes == blobs[0]


def test_expected_version_exists(client: Client) -> None:
    agg = fresh("exists")
    with pytest.raises(WrongExpectedVersion) as caught:
        client.append(agg, "T", {}, expected_version="exists")
    assert caught.value.current_version == 0
    client.append(agg, "T", {})
    assert client.append(agg, "T", {}, expected_version="exists").version == 2


def test_filtered_and_backward_log_reads_page_to_the_end(client: Client) -> None:
    prefix = fresh("filt")
    wanted_type = fresh("Wanted")
    # Mostly noise, a few matches spread out: pages come back short of their limit.
    events = [EventData(f"{prefix}-{n % 3}", wanted_type if n % 97 == 0 else "Noise", {"n": n}) for n in range(1500)]
    results = [
        r for start in range(0, len(events), 500) for r in client.append_batch(events[start : start + 500]).events
    ]
    matching = [r.index for r, e in zip(results, events, strict=True) if e.type == wanted_type]
    got = [e.index for e in client.read_log(types=[wanted_type], page_size=3)]
    assert got == matching
    by_prefix = [e.index for e in client.read_log(from_index=results[0].index, aggregate_prefix=f"{prefix}-1")]
    assert by_prefix == [r.index for r, e in zip(results, events, strict=True) if e.aggregate_id == f"{prefix}-1"]
    both = [e.index for e in client.read_log(types=[wanted_type], aggregate_prefix=f"{prefix}-0")]
    assert both == [
        r.index
        for r, e in zip(results, events, strict=True)
        if e.type == wanted_type and e.aggregate_id == f"{prefix}-0"
    ]
    page = client.read_log_page(types=[wanted_type], limit=2)
    assert [e.index for e in page.events] == matching[:2] and page.next_index == matching[1] + 1

    forward = [e.index for e in client.read_log()]
    assert [e.index for e in client.read_log(direction="backward", page_size=400)] == forward[::-1]
    assert [e.index for e in client.read_log(direction="backward", types=[wanted_type], page_size=2)] == matching[::-1]
    last = results[-1].index
    assert [e.index for e in client.read_log(from_index=last, direction="backward", limit=5)] == list(
        range(last, last - 5, -1)
    )


def test_a_filtered_subscription_moves_its_resume_point_on_checkpoints(node: ServedNode, client: Client) -> None:
    prefix = fresh("sub")
    first = client.append(f"{prefix}-a", "Wanted", {"n": 0})
    noise = client.append_batch([EventData(fresh("noise"), "Noise", {"n": n}) for n in range(50)])
    assert noise.last_index is not None
    last_noise: int = noise.last_index
    got: list[RecordedEvent] = []
    with Client(node.url) as reader, reader.subscribe(from_index=first.index, aggregate_prefix=prefix) as subscription:
        got.append(next(subscription))
        position_seen: list[int] = []

        def write_once_the_noise_was_passed() -> None:
            # Nothing matches after the first event: only a checkpoint can move the position.
            deadline = time.monotonic() + WAIT_S
            while subscription.position < last_noise and time.monotonic() < deadline:
                time.sleep(0.05)
            position_seen.append(subscription.position)
            client.append(f"{prefix}-b", "Wanted", {"n": 1})

        writer = threading.Thread(target=write_once_the_noise_was_passed)
        writer.start()
        got.append(next(subscription))
        writer.join()
    assert position_seen and position_seen[0] >= last_noise
    assert [e.payload["n"] for e in got] == [0, 1] and got[1].index > last_noise


async def test_the_async_client_speaks_the_same_features(node: ServedNode) -> None:
    agg = fresh("async-blob")
    async with AsyncClient(node.url) as client:
        await client.append(agg, "Blob", payload_bytes=b"\x00\x01")
        await client.append_batch([EventData(agg, "Blob", payload_bytes=b"\x02", expected_version="exists")])
        assert [e.payload_bytes async for e in client.read_aggregate(agg)] == [b"\x00\x01", b"\x02"]
        assert [e.aggregate_id async for e in client.read_log(aggregate_prefix=agg)] == [agg, agg]
        backward = [e.version async for e in client.read_log(aggregate_prefix=agg, direction="backward")]
        assert backward == [2, 1]


def test_batch_limits_are_typed_and_large_batches_pass(client: Client) -> None:
    agg = fresh("large")
    result = client.append_batch([EventData(agg, "T", {"n": n}) for n in range(2500)])  # past the old 1000
    assert len(result.events) == 2500 and result.events[-1].version == 2500
    with pytest.raises(BadRequest) as many:
        client.append_batch([EventData(agg, "T", {}) for _ in range(10_001)])
    assert many.value.status == 400 and many.value.code == "too_many_events" and many.value.details["limit"] == 10_000
    # Over 16 MiB: refused from its Content-Length, a definite answer, not a lost connection.
    big = {"s": "x" * (100 * 1024)}
    with pytest.raises(BadRequest) as large:
        client.append_batch([EventData(agg, "T", big) for _ in range(170)])
    assert large.value.status == 413 and large.value.code == "batch_too_large"
    assert large.value.details["limit"] == 16 * 1024 * 1024
    assert len(list(client.read_aggregate(agg))) == 2500
