"""Consumer positions through the client, against a real node: a position committed with
its batch, ``TrackingConflict`` carrying the stored position (and nothing of the refused
batch written), a batch that carries only a position, and ``consumer_position``."""

from __future__ import annotations

import uuid

import pytest
from client_fixtures import fresh
from served_node import ServedNode

from walstore.client import AsyncClient, Client
from walstore.client.errors import TrackingConflict
from walstore.client.models import EventData, Tracking

pytestmark = pytest.mark.slow


def test_consumer_positions_commit_with_their_batch(client: Client) -> None:
    consumer = fresh("projector")
    agg = fresh("proj")
    assert client.consumer_position(consumer) is None
    result = client.append_batch([EventData(agg, "Projected", {"n": 1})], tracking=Tracking(consumer, 5))
    assert result.tracking == Tracking(consumer, 5) and len(result.events) == 1
    assert client.consumer_position(consumer) == 5
    with pytest.raises(TrackingConflict) as caught:
        client.append_batch([EventData(agg, "Projected", {"n": 2})], tracking=Tracking(consumer, 5))
    assert caught.value.stored_position == 5 and caught.value.position == 5 and caught.value.consumer == consumer
    assert [e.payload["n"] for e in client.read_aggregate(agg)] == [1]  # nothing of the refused batch
    only = client.append_batch([], tracking=Tracking(consumer, 9))
    assert only.events == [] and only.first_index is None and only.last_index is None
    assert client.consumer_position(consumer) == 9


def test_a_retried_batch_with_its_tracking_is_the_same_success(client: Client) -> None:
    consumer = fresh("retrying")
    agg = fresh("retry")
    events = [EventData(agg, "T", {"n": n}, id=str(uuid.uuid4())) for n in range(2)]
    first = client.append_batch(events, tracking=Tracking(consumer, 4))
    # What a retry after a lost answer sends: the same events, ids and position.
    again = client.append_batch(events, tracking=Tracking(consumer, 4))
    assert again.events == first.events
    assert client.consumer_position(consumer) == 4
    assert len(list(client.read_aggregate(agg))) == 2


async def test_the_async_client_tracks_too(node: ServedNode) -> None:
    consumer = fresh("async-consumer")
    async with AsyncClient(node.url) as client:
        assert await client.consumer_position(consumer) is None
        await client.append_batch([EventData(fresh("a"), "T", {})], tracking=Tracking(consumer, 3))
        assert await client.consumer_position(consumer) == 3
        with pytest.raises(TrackingConflict) as caught:
            await client.append_batch([], tracking=Tracking(consumer, 2))
        assert caught.value.stored_position == 3
