"""In-process clusters for replication tests: real nodes, real TCP on loopback, real WAL
files in a temp dir, and the in-memory election (so a test can cut a node off from
"etcd", expire leases, or force a leader). Nodes can be stopped and restarted on the
same data dir and ports.

trio's MockClock is not used here (a departure from the issue's wording): the nodes do
real socket and fsync I/O in threads, and an autojumping clock fires timeouts while a
thread is still writing. Short leases (0.5-1 s) keep these tests to a few seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from walstore.config import Config, from_env
from walstore.election.etcd_process import free_ports
from walstore.election.memory import MemoryElection, MemoryElectionHub
from walstore.node import Node
from walstore.replication.replicator import Replicator
from walstore.wal.fs import FileSystem


def replicator(node: Node) -> Replicator:
    """The node's replicator, which every node in these clusters has once started."""
    assert node.replicator is not None, f"{node.config.node_id} has no replicator"
    return node.replicator


class InProcessCluster:
    def __init__(
        self,
        root: Path,
        nursery: trio.Nursery,
        *,
        size: int = 3,
        lease_ttl_s: float = 2.0,  # 1 s leases lapse when a loaded CI machine stalls the loop
        append_timeout_s: float = 3.0,
    ) -> None:
        self.root = root
        self.nursery = nursery
        self.hub = MemoryElectionHub()
        self.lease_ttl_s = lease_ttl_s
        self.append_timeout_s = append_timeout_s
        ports = free_ports(2 * size)  # one call: all distinct
        self.peer_ports = {f"n{i}": ports[2 * i] for i in range(size)}
        self.http_ports = {f"n{i}": ports[2 * i + 1] for i in range(size)}
        self.nodes: dict[str, Node] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._stopped: dict[str, trio.Event] = {}

    def config(self, node_id: str) -> Config:
        peers = ",".join(f"{k}=127.0.0.1:{p}" for k, p in self.peer_ports.items())
        return from_env(
            {
                "NODE_ID": node_id,
                "DATA_DIR": str(self.root / node_id),
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": str(self.http_ports[node_id]),
                "PEER_HOST": "127.0.0.1",
                "PEER_PORT": str(self.peer_ports[node_id]),
                "PEERS": peers,
                "LEASE_TTL_S": str(self.lease_ttl_s),
                "SEGMENT_SIZE_BYTES": str(1 << 20),
            }
        )

    async def start(self, node_id: str, *, fs: FileSystem | None = None) -> Node:
        """Start (or restart) a node; ``fs`` swaps its disk for a simulated one."""
        node = Node(
            self.config(node_id),
            election=MemoryElection(self.hub, node_id, ttl_s=self.lease_ttl_s),
            append_timeout_s=self.append_timeout_s,
            fs=fs,
        )
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[Node]) -> None:
            try:
                with scope:
                    await node.run(task_status=task_status)
            finally:
                stopped.set()

        await self.nursery.start(run)
        self.nodes[node_id], self._scopes[node_id], self._stopped[node_id] = node, scope, stopped
        return node

    async def start_all(self, fs: Mapping[str, FileSystem] | None = None) -> None:
        for node_id in self.peer_ports:
            await self.start(node_id, fs=(fs or {}).get(node_id))

    async def stop(self, node_id: str) -> None:
        """Like kill -9 as far as the others can tell: the node's tasks are cancelled."""
        self._scopes[node_id].cancel()
        await self._stopped[node_id].wait()
        del self.nodes[node_id]

    async def stop_all(self) -> None:
        for node_id in list(self.nodes):
            await self.stop(node_id)

    async def leader(self, timeout_s: float = 10.0) -> Node:
        with trio.fail_after(timeout_s):
            while True:
                for node in self.nodes.values():
                    if node.replicator is not None and node.replicator.writable:
                        return node
                await trio.sleep(0.02)

    def url(self, node_id: str) -> str:
        return f"http://127.0.0.1:{self.http_ports[node_id]}"


@asynccontextmanager
async def in_process_cluster(root: Path, **kwargs: object) -> AsyncIterator[InProcessCluster]:
    async with trio.open_nursery() as nursery:
        cluster = InProcessCluster(root, nursery, **kwargs)  # type: ignore[arg-type]
        try:
            yield cluster
        finally:
            await cluster.stop_all()
