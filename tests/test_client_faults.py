"""The client's retries against a real node behind a fault proxy (``harness.proxy``):
an answer lost on the way back is retried with the same event id and the event is stored
once; a write whose every answer is lost ends in ``OutcomeUnknown`` naming its ids, and
sending it again with those ids stores it exactly once; a dead URL in the list is passed
over; with nothing reachable a write is ``Unavailable`` (nothing can have been stored)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import trio
from harness.proxy import Direction, FaultProxy
from served_node import ServedNode

from walstore.client import AsyncClient, Client
from walstore.client.errors import OutcomeUnknown, Unavailable
from walstore.client.models import EventData
from walstore.client.simple import parse_url
from walstore.election.etcd_process import free_ports

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(node: ServedNode) -> Iterator[FaultProxy]:
    with FaultProxy(parse_url(node.url), name="client->node") as p:
        yield p


def proxied(p: FaultProxy) -> str:
    return f"http://127.0.0.1:{p.port}"


def test_a_lost_answer_is_retried_with_the_same_id_and_stored_once(node: ServedNode, proxy: FaultProxy) -> None:
    agg = f"lost-{uuid.uuid4().hex[:8]}"
    proxy.drop(Direction.B_TO_A)  # the request reaches the node; its answer never comes back

    def heal_once_an_answer_was_dropped() -> None:
        proxy.wait_stats(lambda s: s.dropped_b_to_a > 0, timeout_s=20.0)
        proxy.heal()

    healer = threading.Thread(target=heal_once_an_answer_was_dropped)
    healer.start()
    try:
        with Client(proxied(proxy), timeout=1.0, retry_deadline=30.0) as client:
            result = client.append(agg, "T", {"n": 1})
    finally:
        healer.join()
    assert proxy.stats().dropped_b_to_a > 0  # the first attempt's answer really was lost
    with Client(node.url) as direct:
        stored = list(direct.read_aggregate(agg))
    assert [(e.id, e.index, e.version) for e in stored] == [(result.event_id, result.index, 1)]


async def test_the_async_client_retries_a_lost_answer_with_the_same_id_too(node: ServedNode, proxy: FaultProxy) -> None:
    agg = f"lost-async-{uuid.uuid4().hex[:8]}"
    proxy.drop(Direction.B_TO_A)

    def heal_once_an_answer_was_dropped() -> None:
        proxy.wait_stats(lambda s: s.dropped_b_to_a > 0, timeout_s=20.0)
        proxy.heal()

    healer = threading.Thread(target=heal_once_an_answer_was_dropped)
    healer.start()
    try:
        async with AsyncClient(proxied(proxy), timeout=1.0, retry_deadline=30.0) as client:
            result = await client.append_batch([EventData(agg, "T", {"n": n}) for n in range(2)])
    finally:
        await trio.to_thread.run_sync(healer.join)
    async with AsyncClient(node.url) as direct:
        stored = [e.id async for e in direct.read_aggregate(agg)]
    assert stored == [r.event_id for r in result.events]


def test_outcome_unknown_names_the_ids_and_resending_them_stores_once(node: ServedNode, proxy: FaultProxy) -> None:
    agg = f"unknown-{uuid.uuid4().hex[:8]}"
    events = [EventData(agg, "T", {"n": n}) for n in range(3)]
    proxy.drop(Direction.B_TO_A)
    with Client(proxied(proxy), timeout=0.5, retry_deadline=2.0) as client:
        with pytest.raises(OutcomeUnknown) as caught:
            client.append_batch(events)
        ids = caught.value.event_ids
        assert len(ids) == 3 and len(set(ids)) == 3
        proxy.heal()
        # The way out of OutcomeUnknown: the same events with the same ids.
        again = client.append_batch(
            [EventData(e.aggregate_id, e.type, e.payload, id=i) for e, i in zip(events, ids, strict=True)]
        )
    assert [r.event_id for r in again.events] == ids
    with Client(node.url) as direct:
        assert [e.id for e in direct.read_aggregate(agg)] == ids  # stored once, in order


def test_a_dead_url_is_passed_over(node: ServedNode) -> None:
    (dead_port,) = free_ports(1)
    with Client([f"http://127.0.0.1:{dead_port}", node.url], retry_deadline=10.0) as client:
        result = client.append(f"over-{uuid.uuid4().hex[:8]}", "T", {})
        assert result.version == 1
        assert client.router.current == node.url.replace("localhost", "127.0.0.1")  # and kept


def test_nothing_reachable_is_unavailable_not_unknown() -> None:
    ports = free_ports(2)
    with (
        Client([f"http://127.0.0.1:{p}" for p in ports], retry_deadline=1.0) as client,
        pytest.raises(Unavailable) as caught,
    ):
        client.append("nowhere", "T", {})
    assert caught.value.status is None and "ConnectError" in caught.value.message


def test_a_silent_stream_is_detected_and_resumed_on_the_next_node(node: ServedNode, proxy: FaultProxy) -> None:
    agg = f"silent-{uuid.uuid4().hex[:8]}"
    with Client(node.url) as writer:
        first = [writer.append(agg, "T", {"n": n}) for n in range(3)]
        # The proxy first, the node itself second: the subscription starts on the proxy.
        urls = [proxied(proxy), node.url]
        with (
            Client(urls, heartbeat_timeout=1.0) as client,
            client.subscribe(from_index=first[0].index, aggregate_prefix=agg) as subscription,
        ):
            got = [next(subscription) for _ in range(3)]
            assert subscription.reconnects == 0
            # TCP stays up but nothing flows: only the missing heartbeats tell.
            proxy.blackhole()
            more = [writer.append(agg, "T", {"n": n}) for n in range(3, 6)]
            got += [next(subscription) for _ in range(3)]
            assert subscription.reconnects >= 1 and "ReadTimeout" in subscription.last_error
    assert [e.index for e in got] == [r.index for r in first + more]
