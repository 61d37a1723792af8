"""On a real 3-node cluster (``walstore serve`` processes, a real etcd), across a kill -9 of
the leader, every node's /metrics agrees with its /status: term, role, leader, commit and
applied index. Followers included (``walstore_term`` used to be a leader-only number), in
one index space per name (commit - applied used to be stuck at the number of terms), and
the per-follower series only on the node that leads now."""

from __future__ import annotations

import http.client
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from harness.cluster import ProcessCluster
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.fault

Factory = Callable[..., ProcessCluster]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

LEASE_TTL_S = 2.0
AGREE_WITHIN_S = 5.0  # /status and /metrics are two requests; with no writes they agree at once
REPLICATION = (
    "walstore_replication_match_index",
    "walstore_replication_lag_entries",
    "walstore_replication_lag_seconds",
)


def get(cluster: ProcessCluster, node_id: str, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", cluster.node(node_id).http_port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (node_id, path, response.status, body[:200])
        return body
    finally:
        conn.close()


def append(cluster: ProcessCluster, node_id: str, n: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", cluster.node(node_id).http_port, timeout=10)
    try:
        for i in range(n):
            body = orjson.dumps({"type": "T", "aggregate_id": "m", "payload": {"i": i}, "id": str(uuid.uuid4())})
            conn.request("POST", "/events", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 201, (node_id, response.status, response.read())
            response.read()
    finally:
        conn.close()


def scrape(cluster: ProcessCluster, node_id: str) -> Samples:
    text = get(cluster, node_id, "/metrics").decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def disagreements(status: dict[str, Any], samples: Samples) -> list[str]:
    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    expected: list[tuple[str, dict[str, str], float]] = [
        ("walstore_term", {}, status["term"]),
        ("walstore_is_leader", {}, int(status["is_leader"])),
        ("walstore_role", {"role": status["role"]}, 1),
        ("walstore_leader_info", {"leader": status["leader_id"] or ""}, int(bool(status["leader_id"]))),
        ("walstore_commit_index", {}, status["commit_index"]),
        ("walstore_last_applied", {}, status["last_applied"]),
        ("walstore_log_commit_index", {}, status["log_commit_index"]),
        ("walstore_log_last_applied", {}, status["log_last_applied"]),
    ]
    wrong = [
        f"{name}{labels or ''} = {value(name, **labels)}, /status {want}"
        for name, labels, want in expected
        if value(name, **labels) != want
    ]
    other_roles = [labels for (name, labels), v in samples.items() if name == "walstore_role" and v == 1]
    if len(other_roles) != 1:
        wrong.append(f"walstore_role is 1 for {other_roles}")
    peers = {dict(labels)["peer"] for name, labels in samples if name in REPLICATION}
    listed = {p["id"] for p in status["peers"] if p["lag"] >= 0}
    if peers != listed:
        wrong.append(f"replication series for {sorted(peers)}, /status lists progress for {sorted(listed)}")
    return wrong


def assert_agree(cluster: ProcessCluster, node_id: str) -> tuple[dict[str, Any], Samples]:
    deadline = time.monotonic() + AGREE_WITHIN_S
    while True:
        status = orjson.loads(get(cluster, node_id, "/status"))
        samples = scrape(cluster, node_id)
        wrong = disagreements(status, samples)
        if not wrong:
            return status, samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{node_id}: /metrics disagrees with /status: {wrong}")
        time.sleep(0.1)


def counter(samples: Samples, name: str) -> float:
    return samples.get((name, ()), 0.0)


def test_every_nodes_metrics_agree_with_its_status_across_a_leader_kill(cluster_factory: Factory) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, lease_ttl_s=LEASE_TTL_S)
    leader = cluster.wait_ready()
    append(cluster, leader, 5)
    cluster.wait_caught_up()
    first_term = 0
    for node_id in cluster.ids:
        status, samples = assert_agree(cluster, node_id)
        first_term = status["term"]
        assert status["role"] == ("leader" if node_id == leader else "follower")
        # Caught up and idle: committed is applied, in the one space both are in.
        assert counter(samples, "walstore_commit_index") == counter(samples, "walstore_last_applied") == 5
        assert counter(samples, "walstore_wal_entries_written_total") >= 6, node_id  # EPOCH_START + 5 events

    cluster.kill(leader, signal.SIGKILL)
    survivors = [i for i in cluster.ids if i != leader]
    successor = cluster.wait_ready(nodes=survivors)
    append(cluster, successor, 3)
    cluster.wait_caught_up(nodes=survivors)
    cluster.start_node(leader)  # the old leader comes back as a follower
    cluster.wait_caught_up()
    for node_id in cluster.ids:
        status, samples = assert_agree(cluster, node_id)
        assert status["leader_id"] == successor and status["term"] > first_term, (node_id, status)
        assert counter(samples, "walstore_commit_index") == counter(samples, "walstore_last_applied") == 8
        if node_id in survivors:
            # Both terms were seen begin by every node that lived through them.
            assert counter(samples, "walstore_elections_total") >= 2, node_id
            assert counter(samples, "walstore_leader_changes_total") >= 2, node_id
    ex_leader = scrape(cluster, leader)
    assert not [key for key in ex_leader if key[0] in REPLICATION]
    assert {dict(labels)["peer"] for name, labels in scrape(cluster, successor) if name in REPLICATION} == {
        i for i in cluster.ids if i != successor
    }
