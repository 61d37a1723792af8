"""Replication on in-process clusters: quorum commit, catch-up, divergence, fencing,
takeover, forwarding. Real nodes and sockets, in-memory election (see cluster_inprocess)."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest
import trio

from tests.cluster_inprocess import InProcessCluster, in_process_cluster, replicator
from walstore import _native
from walstore.errors import OutcomeUnknown, UnavailableError
from walstore.event import NewEvent
from walstore.node import Node
from walstore.protocol import Append, AppendAck, Prepare, Promise
from walstore.replication.transport import dial
from walstore.wal.record import FLAG_BATCH_END, KIND_EVENT
from walstore.wal.simfs import SimulatedFileSystem


def event(aggregate: str = "agg", n: int = 0, expected: int | None = None, pad: int = 0) -> NewEvent:
    payload = orjson.dumps({"n": n, "pad": "x" * pad})
    return NewEvent(str(uuid.uuid4()), "T", aggregate, payload, b"{}", expected)


def log_bytes(node: Node) -> bytes:
    wal = node.wal
    return wal.read_raw(1, 1 << 30) if wal.last_index else b""


async def wait_converged(cluster: InProcessCluster, timeout_s: float = 10.0) -> None:
    """Every running node holds the same log and has applied all of it."""
    with trio.fail_after(timeout_s):
        while True:
            nodes = list(cluster.nodes.values())
            logs = {log_bytes(n) for n in nodes}
            if len(logs) == 1 and all(n.applied.value == n.wal.last_index for n in nodes):
                return
            await trio.sleep(0.05)


async def test_writes_commit_with_one_follower_down_and_stop_with_two(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        first = await leader.append([event(n=1)])
        assert first[0].index == 1
        followers = [k for k in cluster.nodes if k != leader.config.node_id]
        await cluster.stop(followers[0])
        second = await leader.append([event(n=2)])
        assert second[0].index == 2
        await cluster.stop(followers[1])
        # Still believing in its followers, the leader appends but cannot commit: the
        # answer is "unknown", never a success.
        with pytest.raises((OutcomeUnknown, UnavailableError)):
            await leader.append([event(n=3)])
        assert leader.commit.value == leader.store.event_to_log_index(2)
        # Once it has heard from nobody for a lease, it refuses at once (definite 503).
        await trio.sleep(cluster.lease_ttl_s)
        with trio.fail_after(0.5), pytest.raises(UnavailableError) as info:
            await leader.append([event(n=4)])
        assert info.value.http_status == 503
        assert leader.store.last_applied_event_index == 2


async def test_follower_restarted_catches_up_byte_identical(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        lagger = next(k for k in cluster.nodes if k != leader.config.node_id)
        await cluster.stop(lagger)
        for i in range(300):  # ~3 MiB: several 1 MiB segments to catch up from
            await leader.append([event(f"a{i % 7}", i, pad=2000) for _ in range(5)])
        await cluster.start(lagger)
        await wait_converged(cluster)
        assert cluster.nodes[lagger].store.last_applied_event_index == 1500
        assert len(cluster.nodes[lagger].wal.segment_paths) > 1


async def test_divergent_uncommitted_suffix_is_truncated(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, append_timeout_s=0.5) as cluster:
        await cluster.start_all()
        old = await cluster.leader()
        old_id = old.config.node_id
        committed = await old.append([event("x", 1)])
        others = [k for k in cluster.nodes if k != old_id]
        for k in others:
            await cluster.stop(k)
        # Appended on the old leader only: never committed, never acknowledged.
        for i in range(3):
            with pytest.raises((OutcomeUnknown, UnavailableError)):
                await old.append([event("x", 100 + i)])
        stale_tail = old.wal.last_index
        await cluster.stop(old_id)
        for k in others:
            await cluster.start(k)
        new = await cluster.leader()
        fresh = await new.append([event("y", 2)])
        await cluster.start(old_id)
        await wait_converged(cluster)
        rejoined = cluster.nodes[old_id]
        assert rejoined.wal.last_index <= stale_tail + 2
        assert rejoined.store.read_aggregate("x", 1, 100, "forward").version == 1
        assert rejoined.store.lookup(committed[0].event_id) == committed[0]
        assert rejoined.store.lookup(fresh[0].event_id) == fresh[0]


async def test_deposed_leader_frames_are_rejected(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        first = await cluster.leader()
        # Depose the first leader so that an older epoch exists to replay frames from.
        first_epoch = replicator(first).epoch
        cluster.hub.expire_lease(first.config.node_id)
        with trio.fail_after(10):
            while replicator(leader := await cluster.leader()).epoch <= first_epoch:  # noqa: ASYNC110 - polls state across nodes
                await trio.sleep(0.05)
        await leader.append([event()])
        await wait_converged(cluster)  # nothing legitimate is still on its way to the follower
        follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
        epoch = follower.rlog.promised_epoch
        assert epoch > 1
        before = log_bytes(follower)
        tail = follower.wal.last_index
        stale = _native.encode_batch([b"late"], [KIND_EVENT], [FLAG_BATCH_END], epoch - 1, tail + 1)
        # Pretend to be the leader of an older epoch (same cluster, a known node id).
        channel = await dial(
            "127.0.0.1", follower.peer_port, cluster_id="event-store", node_id=leader.config.node_id, epoch=epoch - 1
        )
        try:
            await channel.send(Append(epoch - 1, tail, follower.wal.last_epoch, tail + 1, stale))
            ack = await channel.receive()
            await channel.send(Prepare(epoch - 1, leader.config.node_id))
            promise = await channel.receive()
        finally:
            await channel.aclose()
        assert isinstance(ack, AppendAck) and not ack.ok and ack.epoch == epoch
        assert isinstance(promise, Promise) and not promise.ok and promise.promised_epoch == epoch
        assert log_bytes(follower) == before


async def test_claimed_higher_epoch_without_election_changes_nothing(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
        epoch = follower.rlog.promised_epoch
        other = next(k for k in cluster.nodes if k not in (leader.config.node_id, follower.config.node_id))
        channel = await dial("127.0.0.1", follower.peer_port, cluster_id="event-store", node_id=other, epoch=10**9)
        try:
            await channel.send(Prepare(10**9, other))
            promise = await channel.receive()
        finally:
            await channel.aclose()
        assert isinstance(promise, Promise) and not promise.ok
        assert follower.rlog.promised_epoch == epoch
        assert replicator(leader).writable
        result = await leader.append([event()])
        assert result[0].index >= 1


async def test_takeover_adopts_most_advanced_log(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        ids = list(cluster.nodes)
        behind = next(k for k in ids if k != leader.config.node_id)
        await cluster.stop(behind)
        acked = [await leader.append([event("z", i)]) for i in range(20)]
        await cluster.stop(leader.config.node_id)
        node = await cluster.start(behind)
        cluster.hub.force_leader(behind)
        new = await cluster.leader()
        assert new is node  # the node that missed the writes leads, having fetched them
        for result in acked:
            assert new.store.lookup(result[0].event_id) == result[0]
        assert new.store.read_aggregate("z", 1, 100, "forward").version == 20


async def test_writes_through_a_follower_are_forwarded_and_readable_there(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
        results = await follower.append([event("f", 1), event("g", 1)])
        assert [r.index for r in results] == [1, 2]
        read = await follower.read_aggregate("f", from_version=1, limit=10, direction="forward", min_index=2)
        assert read.version == 1 and read.events[0].id == results[0].event_id
        # A conflict on the leader comes back as the same 409 through the follower.
        from walstore.errors import ConflictError

        with pytest.raises(ConflictError):
            await follower.append([event("f", 2, expected=0)])


async def test_disk_full_on_the_leader_steps_it_down_without_reusing_indexes(tmp_path: Path) -> None:
    """ENOSPC on the leader: its failed batch may already be on the followers, so it must
    stop appending in that epoch at once (reusing those indexes with other content would
    split the log), step down, and catch up as a follower once space returns."""
    disks = {k: SimulatedFileSystem(seed=i) for i, k in enumerate(["n0", "n1", "n2"])}
    async with in_process_cluster(tmp_path, append_timeout_s=2.0) as cluster:
        await cluster.start_all(fs=disks)
        old = await cluster.leader()
        acked = [await old.append([event("d", i)]) for i in range(10)]
        disks[old.config.node_id].fail_writes_after(3000)
        outcomes = {"ok": 0, "unavailable": 0}
        with trio.move_on_after(15):
            for i in range(200):
                try:
                    acked.append(await (await cluster.leader()).append([event("d", 100 + i)]))
                    outcomes["ok"] += 1
                except (OutcomeUnknown, UnavailableError):
                    outcomes["unavailable"] += 1
        new = await cluster.leader()
        assert new is not old and outcomes["ok"] > 0
        disks[old.config.node_id].clear_faults()
        await wait_converged(cluster, timeout_s=20)
        for node in cluster.nodes.values():
            for result in acked:
                assert node.store.lookup(result[0].event_id) == result[0]
