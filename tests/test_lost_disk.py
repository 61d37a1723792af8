"""A lost disk never makes the cluster forget: in-process clusters (real nodes, sockets and
WAL files, the in-memory election) in which a data directory is wiped.

The real-process versions of the same scenarios, with a real etcd and SIGSTOP, are fault
rows in test_faults_lost_disk.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio
from test_replication import event, wait_converged

from tests.cluster_inprocess import InProcessCluster, in_process_cluster, replicator
from walstore.errors import CommittedTruncation, OutcomeUnknown, UnavailableError
from walstore.event import AppendResult
from walstore.node import Node


def wipe(cluster: InProcessCluster, node_id: str) -> None:
    shutil.rmtree(cluster.root / node_id)


async def wait_voter(cluster: InProcessCluster, node_id: str, timeout_s: float = 15.0) -> float:
    """Seconds until ``node_id``'s current incarnation is recorded as a voter."""
    started = trio.current_time()
    with trio.fail_after(timeout_s):
        while True:
            node = cluster.nodes[node_id]
            record = cluster.hub.read_members("test").get(node_id)
            if record is not None and record.votes_as(node.wal.incarnation):
                return trio.current_time() - started
            await trio.sleep(0.05)


def assert_holds(node: Node, acked: list[AppendResult]) -> None:
    for result in acked:
        assert node.store.lookup(result.event_id) == result, (node.config.node_id, result)


async def test_a_lagging_node_and_a_wiped_one_elect_nobody_and_nothing_acked_is_lost(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, append_timeout_s=1.0) as cluster:
        await cluster.start_all()
        a = await cluster.leader()
        a_id = a.config.node_id
        b_id, c_id = (k for k in cluster.nodes if k != a_id)
        acked = [r for i in range(5) for r in await a.append([event(f"agg{i}", i)])]
        await cluster.stop(b_id)  # B lags from here on
        acked += [r for i in range(200) for r in await a.append([event(f"agg{i % 9}", i)])]
        await cluster.stop(a_id)
        await cluster.stop(c_id)
        wipe(cluster, c_id)
        await cluster.start(c_id)  # empty, same node id: an amnesiac
        await cluster.start(b_id)
        # B and the empty C are no majority: no leader, every write refused, for as long
        # as the only full copy (A) is down.
        deadline = trio.current_time() + 4 * cluster.lease_ttl_s
        refused = 0
        while trio.current_time() < deadline:
            for node_id in (b_id, c_id):
                node = cluster.nodes[node_id]
                assert not replicator(node).writable, f"{node_id} leads without a majority of voters"
                with pytest.raises((UnavailableError, OutcomeUnknown)):
                    await node.append([event("late", 0)])
                refused += 1
            await trio.sleep(0.1)
        assert refused > 10
        members = cluster.hub.read_members("test")
        assert not members[c_id].voter and members[c_id].incarnation == cluster.nodes[c_id].wal.incarnation
        await cluster.start(a_id)
        leader = await cluster.leader(timeout_s=15)
        acked += await leader.append([event("after", 1)])
        await wait_voter(cluster, c_id)
        await wait_converged(cluster, timeout_s=15)
        for node in cluster.nodes.values():
            assert_holds(node, acked)
            assert node.rlog.halted is None
        # one order: every replica holds the same events at the same index
        assert len({n.store.read_log(1, 10_000).events == cluster.nodes[a_id].store.read_log(1, 10_000).events
                    for n in cluster.nodes.values()}) == 1  # fmt: skip


async def test_the_wiped_node_ahead_waits_for_the_other_full_copy(tmp_path: Path) -> None:
    """The variant: the leader is the one wiped, the follower that held everything is down."""
    async with in_process_cluster(tmp_path, append_timeout_s=1.0) as cluster:
        await cluster.start_all()
        a = await cluster.leader()
        a_id = a.config.node_id
        b_id, c_id = (k for k in cluster.nodes if k != a_id)
        await cluster.stop(b_id)
        acked = [r for i in range(100) for r in await a.append([event(f"agg{i % 5}", i)])]
        await cluster.stop(a_id)
        await cluster.stop(c_id)
        wipe(cluster, a_id)
        await cluster.start(a_id)
        await cluster.start(b_id)
        await trio.sleep(3 * cluster.lease_ttl_s)
        for node_id in (a_id, b_id):
            assert not replicator(cluster.nodes[node_id]).writable
        await cluster.start(c_id)
        leader = await cluster.leader(timeout_s=15)
        assert leader.config.node_id != a_id  # a learner never campaigns
        await wait_voter(cluster, a_id)
        await wait_converged(cluster, timeout_s=15)
        for node in cluster.nodes.values():
            assert_holds(node, acked)


async def test_a_wiped_follower_rejoins_as_a_learner_votes_again_and_the_leader_can_go(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        a = await cluster.leader()
        a_id = a.config.node_id
        c_id = next(k for k in cluster.nodes if k != a_id)
        acked = [r for i in range(50) for r in await a.append([event(f"agg{i % 5}", i)])]
        await cluster.stop(c_id)
        wipe(cluster, c_id)
        await cluster.start(c_id)
        waited = await wait_voter(cluster, c_id)
        assert waited < 10
        with trio.fail_after(5):
            while cluster.nodes[c_id].metrics.voter._value.get() != 1:  # noqa: ASYNC110 (polls a gauge)
                await trio.sleep(0.05)
        acked += await a.append([event("x", 1)])
        await cluster.stop(a_id)  # C's vote is now needed, and it holds everything
        leader = await cluster.leader(timeout_s=15)
        acked += await leader.append([event("y", 1)])
        await wait_converged(cluster)
        for node in cluster.nodes.values():
            assert_holds(node, acked)


async def test_a_follower_asked_to_truncate_committed_entries_refuses_and_halts(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        a = await cluster.leader()
        follower = next(n for k, n in cluster.nodes.items() if k != a.config.node_id)
        for i in range(20):
            await a.append([event("agg", i)])
        await wait_converged(cluster)
        with trio.fail_after(5):
            while follower.wal.known_commit < follower.commit.value:  # noqa: ASYNC110 (polls meta.json)
                await trio.sleep(0.05)  # recorded within an interval
        last = follower.wal.last_index
        with pytest.raises(CommittedTruncation):
            await follower.rlog.truncate_after(3, 0, asked_by="a test")
        assert follower.wal.last_index == last  # nothing deleted
        assert follower.rlog.halted is not None
        assert follower.metrics.safety_halted._value.get() == 1
        assert follower.status().ready is False
        with pytest.raises(UnavailableError) as info:
            await follower.append([event("agg", 99)])
        assert info.value.code == "safety_halt"
