"""A stopping leader hands over before it drains (in-process cluster, in-memory election):
the successor is elected while the old leader is still answering its last requests, not
after it exits, and writes to the stopping node are refused definitely (503), never 504."""

from __future__ import annotations

from pathlib import Path

import orjson
import trio
from fakes import HttpTestClient, encode_request

from tests.cluster_inprocess import in_process_cluster, replicator

EVENT = orjson.dumps({"type": "T", "aggregate_id": "drain", "payload": {}})


async def test_a_stopping_leader_resigns_while_it_still_drains(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        old = await cluster.leader()
        old_id = old.config.node_id
        client = await HttpTestClient.connect(old.http_port)
        assert (await client.request("POST", "/events", EVENT)).status == 201
        # A read that waits (min_index far ahead) holds the old leader's drain open for
        # seconds: it is answered before the HTTP server stops, or cut off by its grace.
        slow = await HttpTestClient.connect(old.http_port)
        await slow.send_raw(encode_request("GET", "/events?min_index=1000000"))
        await trio.sleep(0.1)

        stop_at = trio.current_time()
        old.shutdown()
        # A write that reaches the stopping node now (before its HTTP server has even
        # heard of the stop) is refused, definitely.
        answer = await client.request("POST", "/events", EVENT)
        assert answer.status == 503 and answer.json()["error"]["code"] == "shutting_down"

        with trio.fail_after(cluster.lease_ttl_s):  # resigned, not expired
            while True:
                successors = [
                    n for i, n in cluster.nodes.items() if i != old_id and n.replicator and n.replicator.writable
                ]
                if successors:
                    break
                await trio.sleep(0.01)
        handover_s = trio.current_time() - stop_at
        assert not replicator(old).writable
        assert old.stopping and old_id in cluster.nodes  # still draining: its run() has not returned
        assert handover_s < cluster.lease_ttl_s
        # The successor takes writes while the old leader is still finishing up.
        (successor,) = successors
        writer = await HttpTestClient.connect(successor.http_port)
        assert (await writer.request("POST", "/events", EVENT)).status == 201
        for c in (client, slow, writer):
            await c.aclose()
