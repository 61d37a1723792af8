"""/metrics on an in-process 3-node cluster: every node, follower or leader, reports the
term, role, leader and indexes its /status reports; a leader that steps down drops its
per-follower series; the WAL and election counters count on every node."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster_inprocess import InProcessCluster, in_process_cluster, replicator
from walstore.client import WalstoreClient
from walstore.event import NewEvent
from walstore.node import Node

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def get(cluster: InProcessCluster, node_id: str, path: str) -> str:
    def fetch() -> str:
        with WalstoreClient(cluster.url(node_id)) as client:
            body = client.request("GET", path).body
            return body if isinstance(body, str) else orjson.dumps(body).decode()

    return await trio.to_thread.run_sync(fetch)


async def scrape(cluster: InProcessCluster, node_id: str) -> Samples:
    text = await get(cluster, node_id, "/metrics")
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def assert_metrics_match_status(cluster: InProcessCluster, node_id: str) -> Samples:
    status = orjson.loads(await get(cluster, node_id, "/status"))
    samples = await scrape(cluster, node_id)
    assert value(samples, "walstore_term") == status["term"], node_id
    assert value(samples, "walstore_is_leader") == int(status["is_leader"]), node_id
    assert value(samples, "walstore_role", role=status["role"]) == 1, node_id
    assert value(samples, "walstore_leader_info", leader=status["leader_id"] or "") == int(bool(status["leader_id"]))
    assert value(samples, "walstore_commit_index") == status["commit_index"], node_id
    assert value(samples, "walstore_last_applied") == status["last_applied"], node_id
    assert value(samples, "walstore_log_commit_index") == status["log_commit_index"], node_id
    return samples


async def settled(cluster: InProcessCluster, leader: Node, applied: int) -> None:
    """Every node follows ``leader`` and has applied event ``applied``."""
    with trio.fail_after(10):
        while True:
            statuses = [n.status() for n in cluster.nodes.values()]
            if all(s.leader_id == leader.config.node_id and s.last_applied >= applied for s in statuses) and all(
                s.commit_index == s.last_applied for s in statuses
            ):
                return
            await trio.sleep(0.02)


def replication_series(samples: Samples) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    return [key for key in samples if key[0].startswith("walstore_replication_")]


async def test_every_node_reports_its_status_and_an_ex_leader_drops_follower_series(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, lease_ttl_s=1.0) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        await leader.append([NewEvent(str(uuid.uuid4()), "T", "agg", b"{}", b"{}", None)])
        await settled(cluster, leader, applied=1)
        first = leader.config.node_id
        for node_id in cluster.nodes:
            samples = await assert_metrics_match_status(cluster, node_id)
            # EPOCH_START and the event were written on every node, not only the leader.
            assert (value(samples, "walstore_wal_entries_written_total") or 0) >= 2, node_id
            assert (value(samples, "walstore_elections_total") or 0) >= 1, node_id
            assert (value(samples, "walstore_leader_changes_total") or 0) >= 1, node_id
            if node_id == first:
                assert {dict(labels)["peer"] for _, labels in replication_series(samples)} == set(cluster.nodes) - {
                    first
                }
                assert value(samples, "walstore_elections_won_total") == 1
            else:
                assert replication_series(samples) == [], node_id
                assert value(samples, "walstore_term") == leader.status().term  # was never set on a follower

        replicator(leader).step_down()
        with trio.fail_after(10):
            while True:
                new = await cluster.leader()
                if new.config.node_id != first:
                    break
                await trio.sleep(0.05)
        await new.append([NewEvent(str(uuid.uuid4()), "T", "agg", b"{}", b"{}", None)])
        await settled(cluster, new, applied=2)
        for node_id in cluster.nodes:
            await assert_metrics_match_status(cluster, node_id)
        ex_leader = await scrape(cluster, first)
        assert replication_series(ex_leader) == []  # they stayed forever before
        assert value(ex_leader, "walstore_step_downs_total") == 1
        assert (value(ex_leader, "walstore_leader_changes_total") or 0) >= 2


async def test_lag_in_entries_and_seconds_while_a_follower_is_down(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, lease_ttl_s=1.0) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        await leader.append([NewEvent(str(uuid.uuid4()), "T", "agg", b"{}", b"{}", None)])
        await settled(cluster, leader, applied=1)
        me = leader.config.node_id
        down, up = sorted(set(cluster.nodes) - {me})
        samples = await scrape(cluster, me)
        for peer in (down, up):
            assert value(samples, "walstore_replication_lag_entries", peer=peer) == 0
            assert value(samples, "walstore_replication_lag_seconds", peer=peer) == 0
        await cluster.stop(down)
        for _ in range(3):
            await leader.append([NewEvent(str(uuid.uuid4()), "T", "agg", b"{}", b"{}", None)])
        behind_since = trio.current_time()
        await trio.sleep(0.5)
        samples = await scrape(cluster, me)
        assert value(samples, "walstore_replication_lag_entries", peer=down) == 3
        lag_s = value(samples, "walstore_replication_lag_seconds", peer=down)
        assert lag_s is not None and 0.5 <= lag_s <= trio.current_time() - behind_since + 0.5
        assert value(samples, "walstore_replication_peer_connected", peer=down) == 0
        assert value(samples, "walstore_replication_lag_seconds", peer=up) == 0
