"""A real 3-node cluster (`walstore serve` processes) electing its leader through a real
etcd: writes through every node, byte-identical logs at the end (compared with
`walstore wal dump` on each), a follower killed and restarted catches up, and a read with
`min_index` on a follower sees the write the leader just acknowledged."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.cluster import ProcessCluster

from walstore.client import WalstoreClient, append_with_retry

pytest_plugins = ["harness.cluster"]
pytestmark = pytest.mark.slow

APPEND_RETRY_S = 30.0


def _append(url: str, aggregate: str, n: int) -> dict[str, object]:
    # As an application would: a 503 (no quorum answered lately: a follower's fsync stalled
    # on a busy CI disk) stored nothing, and a retry with the same id never duplicates.
    event = {"id": str(uuid.uuid4()), "type": "T", "aggregate_id": aggregate, "payload": {"n": n}}
    return append_with_retry([url], event, timeout_s=APPEND_RETRY_S)


def _dumps_without_volatile_fields(cluster: ProcessCluster, node_id: str) -> list[tuple[object, ...]]:
    # Everything that makes two WAL records identical: index, epoch, kind, flags, body.
    return [
        tuple(sorted((k, str(v)) for k, v in r.items() if k not in ("file", "offset", "path")))
        for r in cluster.dump_log(node_id)
    ]


def test_three_nodes_one_log(cluster_factory: Callable[..., ProcessCluster], tmp_path: Path) -> None:
    cluster = cluster_factory()
    leader = cluster.wait_ready()
    ids = cluster.live_ids()
    acked = [_append(cluster.url(node_id), f"agg-{i % 4}", i) for i in range(30) for node_id in ids]
    assert [a["index"] for a in acked] == list(range(1, len(acked) + 1))

    # Read-your-writes on a follower: the leader acknowledged it, the follower waits for it.
    follower = next(i for i in ids if i != leader)
    last = _append(cluster.url(leader), "ryw", 1)
    with WalstoreClient(cluster.url(follower)) as client:
        seen = client.read("ryw", min_index=last["index"])
    assert seen["version"] == 1 and seen["events"][0]["id"] == last["event_id"]

    # A follower killed and restarted catches up with what it missed.
    cluster.kill(follower)
    missed = [_append(cluster.url(leader), "missed", i) for i in range(50)]
    cluster.start_node(follower)
    cluster.wait_caught_up()
    with WalstoreClient(cluster.url(follower)) as client:
        assert client.read("missed", limit=100)["version"] == 50
        assert client.read("missed", limit=100)["events"][-1]["id"] == missed[-1]["event_id"]

    logs = cluster.final_logs()
    assert len({tuple(e["id"] for e in log) for log in logs.values()}) == 1
    cluster.stop_all()  # dump the WAL files of stopped nodes: nothing changes under the reader
    dumps = {node_id: _dumps_without_volatile_fields(cluster, node_id) for node_id in ids}
    first = dumps[ids[0]]
    assert len(first) >= len(acked) + 1 + len(missed)  # events plus EPOCH_START records
    for node_id in ids[1:]:
        assert dumps[node_id] == first, f"{node_id}'s log differs from {ids[0]}'s"
