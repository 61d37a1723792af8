"""``walstore.client.AsyncClient`` against one real ``walstore serve`` process, the same
scenario once under trio (pytest-trio) and once under asyncio (``asyncio.run``): typed
conflicts, an idempotent repeat, a batch, reads paging past one page both ways, and a
subscription that catches up and then sees events written while it is open."""

from __future__ import annotations

import asyncio
import uuid

import anyio
import pytest
from served_node import ServedNode

from walstore.client import AsyncClient
from walstore.client.errors import DuplicateEventId, WrongExpectedVersion
from walstore.client.models import EventData, RecordedEvent

pytestmark = pytest.mark.slow


async def scenario(url: str) -> None:
    """Everything the async client promises, with anyio primitives only, so the same code
    runs on trio and on asyncio."""
    agg = f"async-{uuid.uuid4().hex[:8]}"
    async with AsyncClient([url], retry_deadline=10.0) as client:
        first = await client.append(agg, "Created", {"n": 0})
        second = await client.append(agg, "Changed", {"n": 1}, expected_version=1)
        assert (first.version, second.version, second.index) == (1, 2, first.index + 1)
        with pytest.raises(WrongExpectedVersion) as conflict:
            await client.append(agg, "Changed", {"n": 2}, expected_version=0)
        assert conflict.value.current_version == 2
        assert await client.append(agg, "Created", {"n": 0}, event_id=first.event_id) == first
        with pytest.raises(DuplicateEventId):
            await client.append(agg, "Created", {"n": 99}, event_id=first.event_id)

        await client.append_batch([EventData(agg, "Bulk", {"n": n}) for n in range(2, 602)])
        batch = await client.append_batch([EventData(agg, "Bulk", {"n": n}) for n in range(602, 1202)])
        assert [r.version for r in batch.events] == list(range(603, 1203))
        versions = [e.version async for e in client.read_aggregate(agg, page_size=500)]
        assert versions == list(range(1, 1203))
        backward = [e.version async for e in client.read_aggregate(agg, direction="backward", limit=600)]
        assert backward == list(range(1202, 602, -1))
        indexes = [e.index async for e in client.read_log(from_index=first.index, page_size=400)]
        assert indexes == list(range(first.index, batch.events[-1].index + 1))
        page = await client.read_log_page(from_index=first.index, limit=3)
        assert [e.index for e in page.events] == [first.index, first.index + 1, first.index + 2]
        status = await client.status()
        assert status["id"] == "solo" and client.router.node_ids == {client.urls[0]: "solo"}

        # A subscription from the first event: 1202 caught up, then three written live.
        caught_up = anyio.Event()
        got: list[RecordedEvent] = []
        live: list[int] = []

        async def write_live() -> None:
            await caught_up.wait()
            for n in range(3):
                live.append((await client.append(agg, "Live", {"n": n})).index)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(write_live)
            async with client.subscribe(from_index=first.index, aggregate_prefix=agg) as subscription:
                async for event in subscription:
                    got.append(event)
                    if len(got) == 1202:
                        caught_up.set()
                    if len(got) == 1205:
                        break
                assert subscription.position == got[-1].index
        assert [e.index for e in got] == indexes + live
        assert [e.type for e in got[-3:]] == ["Live"] * 3


async def test_async_client_on_trio(node: ServedNode) -> None:
    await scenario(node.url)


def test_async_client_on_asyncio(node: ServedNode) -> None:
    asyncio.run(scenario(node.url))
