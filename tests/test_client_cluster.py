"""The clients on a real 3-node cluster electing through a real etcd: two subscribers (the
sync client, and the async one under trio in its own thread) read while a writer appends;
the leader, which all three are talking to, is killed with SIGKILL mid-subscription; after
failover each subscriber has every acknowledged event exactly once, in index order, with
no gap, the same as the new leader's log. A third subscriber, filtered by type and
aggregate prefix (on the leader too), resumes after the kill with exactly the matching
events. How long the failover took for the writer and the subscribers is printed, not
asserted."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import pytest
import trio
from harness.cluster import ProcessCluster

from walstore.client import AsyncClient, Client
from walstore.client.models import AppendResult, RecordedEvent

pytestmark = [pytest.mark.slow, pytest.mark.fault]

BEFORE_KILL = 40
AFTER_KILL = 40
SEEN_BEFORE_KILL = 10  # the subscription is really under way when the leader dies
JOIN_TIMEOUT_S = 60.0
FILTER_PREFIX = "acct-1"  # acct-1 and, for the sentinel, acct-1end


def test_subscriber_sees_every_acknowledged_event_once_across_a_leader_kill(
    cluster_factory: Callable[..., ProcessCluster],
) -> None:
    cluster = cluster_factory()
    leader = cluster.wait_ready()
    others = [i for i in cluster.ids if i != leader]
    # Both clients start on the leader, so the kill breaks the stream and the writes alike.
    urls = [cluster.url(leader), *(cluster.url(i) for i in others)]
    sentinel = str(uuid.uuid4())

    received: list[tuple[float, RecordedEvent]] = []
    seen_enough = threading.Event()
    failure: list[BaseException] = []
    reconnects: list[int] = []
    errors: list[str] = []

    def subscribe() -> None:
        try:
            with Client(urls, retry_deadline=30.0) as client, client.subscribe() as subscription:
                for event in subscription:
                    received.append((time.monotonic(), event))
                    if len(received) >= SEEN_BEFORE_KILL:
                        seen_enough.set()
                    if event.id == sentinel:
                        reconnects.append(subscription.reconnects)
                        errors.append(subscription.last_error)
                        return
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
            seen_enough.set()

    async_received: list[tuple[float, RecordedEvent]] = []
    async_reconnects: list[int] = []

    async def subscribe_async() -> None:
        async with AsyncClient(urls, retry_deadline=30.0) as client, client.subscribe() as subscription:
            async for event in subscription:
                async_received.append((time.monotonic(), event))
                if event.id == sentinel:
                    async_reconnects.append(subscription.reconnects)
                    return

    def run_async_subscriber() -> None:
        try:
            trio.run(subscribe_async)
        except BaseException as exc:
            failure.append(exc)

    # A filtered one: the server skips what does not match (checkpoints carry it along).
    filtered: list[RecordedEvent] = []
    filtered_reconnects: list[int] = []

    def subscribe_filtered() -> None:
        try:
            with (
                Client(urls, retry_deadline=30.0) as client,
                client.subscribe(types=["Deposited", "Sentinel"], aggregate_prefix=FILTER_PREFIX) as subscription,
            ):
                for event in subscription:
                    filtered.append(event)
                    if event.id == sentinel:
                        filtered_reconnects.append(subscription.reconnects)
                        return
        except BaseException as exc:
            failure.append(exc)

    filtered_subscriber = threading.Thread(target=subscribe_filtered, name="filtered-subscriber", daemon=True)
    filtered_subscriber.start()
    subscriber = threading.Thread(target=subscribe, name="subscriber", daemon=True)
    subscriber.start()
    async_subscriber = threading.Thread(target=run_async_subscriber, name="async-subscriber", daemon=True)
    async_subscriber.start()
    acked: list[AppendResult] = []
    with Client(urls, retry_deadline=30.0) as writer:
        for n in range(BEFORE_KILL):
            acked.append(writer.append(f"acct-{n % 5}", "Deposited", {"n": n}))
        assert seen_enough.wait(JOIN_TIMEOUT_S) and not failure, failure
        while len(async_received) < SEEN_BEFORE_KILL and not failure and async_subscriber.is_alive():
            time.sleep(0.05)  # the async subscriber is under way too (bounded by the join below)
        killed_at = time.monotonic()
        cluster.kill(leader)  # SIGKILL, by pid
        for n in range(BEFORE_KILL, BEFORE_KILL + AFTER_KILL):
            acked.append(writer.append(f"acct-{n % 5}", "Deposited", {"n": n}))
            if n == BEFORE_KILL:
                first_ack_after = time.monotonic()
        acked.append(writer.append(f"{FILTER_PREFIX}end", "Sentinel", {}, event_id=sentinel))
    subscriber.join(JOIN_TIMEOUT_S)
    async_subscriber.join(JOIN_TIMEOUT_S)
    filtered_subscriber.join(JOIN_TIMEOUT_S)
    assert not filtered_subscriber.is_alive(), f"the filtered one stopped at {len(filtered)} events"
    assert not subscriber.is_alive(), f"the subscriber stopped at {received[-1][1].index if received else None}"
    assert not async_subscriber.is_alive(), f"the async one stopped at {len(async_received)} events"
    assert not failure, failure

    delivered = [event.index for _, event in received]
    # Exactly once, in order, no gap: the indexes are 1, 2, 3, ... up to the sentinel.
    assert delivered == list(range(1, len(delivered) + 1))
    assert {a.index for a in acked} <= set(delivered)
    by_index = {event.index: event for _, event in received}
    assert all(by_index[a.index].id == a.event_id for a in acked)
    # The new leader's log holds the same events under the same indexes.
    new_leader = cluster.wait_ready()
    assert new_leader != leader
    log = cluster.read_log(new_leader)
    assert [(e["index"], e["id"]) for e in log] == [(e.index, e.id) for _, e in received]
    assert [(e.index, e.id) for _, e in async_received] == [(e.index, e.id) for _, e in received]
    matching = [(e.index, e.id) for _, e in received if e.aggregate_id.startswith(FILTER_PREFIX)]
    assert [(e.index, e.id) for e in filtered] == matching and len(matching) > AFTER_KILL // 5

    # The kill broke the subscriber's stream (it was on the leader) and the client reopened it.
    assert reconnects and reconnects[0] >= 1, (reconnects, errors)
    assert async_reconnects and async_reconnects[0] >= 1, async_reconnects
    assert filtered_reconnects and filtered_reconnects[0] >= 1, filtered_reconnects
    last_before = acked[BEFORE_KILL - 1].index
    first_new = next(t for t, e in received if e.index > last_before)
    first_new_async = next(t for t, e in async_received if e.index > last_before)
    print(
        f"subscriber: {len(delivered)} events, {sum(t < killed_at for t, _ in received)} before the kill, "
        f"{reconnects[0]} reconnection(s) (last: {errors[0]}); kill -> first acknowledged write "
        f"{first_ack_after - killed_at:.2f} s, kill -> first new event delivered {first_new - killed_at:.2f} s "
        f"(async subscriber: {first_new_async - killed_at:.2f} s)"
    )
