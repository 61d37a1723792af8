"""A simulated cluster: real ``Node`` code on simulated disks, network and etcd.

Each node is the product's ``walstore.node.Node``, started with a ``Runtime`` of its own
(``walstore.runtime``): its peers are reached through ``SimNetwork``, its data directory is
a ``SimulatedFileSystem`` that survives its crashes (or is thrown away, for a lost disk),
its blocking calls and WAL rounds run inline on the virtual clock, and its election is a
``MemoryElection`` on one shared hub that plays etcd. This module only starts, crashes,
restarts, wipes and pauses nodes; which faults happen when is ``faults.py``'s business.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from walstore.config import REPLICATION_FRAME_BYTES, Config, from_env
from walstore.election.base import Candidate
from walstore.election.memory import MemoryElection, MemoryElectionHub
from walstore.errors import LogStateError, StorageError
from walstore.node import Node
from walstore.runtime import Runtime
from walstore.sim.network import SimNetwork
from walstore.sim.trace import Trace
from walstore.wal.simfs import SimulatedFileSystem

PEER_PORT = 7000
# The simulated wall clock starts here (2026-01-01T00:00:00Z), so timestamps look real.
WALL_CLOCK_BASE_NS = 1_767_225_600 * 10**9
# Small segments, so that a short run seals some: read corruption needs a sealed one, and
# at 64 KiB the default mix of 60 seeds sealed too few to inject it once (16 KiB: 9).
# Below Config's floor on purpose: only the simulator builds such a config.
SIM_SEGMENT_BYTES = 16 * 1024
# APPEND frame sizes a seed draws from (Config.replication_frame_bytes), also below its floor.
# Small frames split a catch-up across many frames (64 bytes: one record each), so that a
# follower acknowledges part of a leader's log at a time; with 4 MiB frames the simulator's
# small logs travel whole.
SIM_FRAME_BYTES = (64, 512, 4096, REPLICATION_FRAME_BYTES)


class SimElectionHub(MemoryElectionHub):
    """The in-memory etcd, telling the nemesis of every leadership it grants (so that it
    can crash a new leader in the middle of its takeover)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_grant: Callable[[str], None] = lambda node_id: None

    def try_acquire(self, candidate: Candidate, ttl_s: float) -> Any:
        lease = super().try_acquire(candidate, ttl_s)
        if lease is not None:
            self.on_grant(candidate.node_id)
        return lease


class SimDisk:
    """One node's disk: the simulated file system plus latency the writer waits for."""

    def __init__(self, seed: int) -> None:
        self.fs = SimulatedFileSystem(seed=seed)
        self.slow_until = 0.0
        self.slow_s = 0.0
        self.base_s = 0.0005

    def round_delay_s(self) -> float:
        if trio.current_time() < self.slow_until:
            return self.slow_s
        return self.base_s


class SimNode:
    """One member's slot: its disk outlives its processes."""

    def __init__(self, node_id: str, disk: SimDisk) -> None:
        self.node_id = node_id
        self.disk = disk
        self.node: Node | None = None
        self.scope: trio.CancelScope | None = None
        self.stopped: trio.Event | None = None
        self.starts = 0
        self.exit_reason: str | None = None  # why the last process ended by itself
        self.crashing: trio.Event | None = None  # set once the process being killed is gone
        self.halted: str | None = None

    @property
    def up(self) -> bool:
        return self.node is not None


class SimCluster:
    def __init__(
        self,
        nursery: trio.Nursery,
        rng: random.Random,
        trace: Trace,
        net: SimNetwork,
        *,
        size: int,
        lease_ttl_s: float,
        append_timeout_s: float,
        on_unexpected: Callable[[str, BaseException], None],
        replication_frame_bytes: int = REPLICATION_FRAME_BYTES,
        segment_bytes: int = SIM_SEGMENT_BYTES,
    ) -> None:
        self.nursery = nursery
        self.replication_frame_bytes = replication_frame_bytes
        self.segment_bytes = segment_bytes
        # Called as a node is killed, before anything of it is gone: the invariant watcher
        # takes its last look at what the process counted committed.
        self.on_crash: Callable[[str], None] | None = None
        self.rng = rng
        self.trace = trace
        self.net = net
        self.hub = SimElectionHub()
        self.lease_ttl_s = lease_ttl_s
        self.append_timeout_s = append_timeout_s
        self.on_unexpected = on_unexpected
        self.ids = [f"n{i}" for i in range(size)]
        self.nodes = {n: SimNode(n, SimDisk(rng.getrandbits(32))) for n in self.ids}

    # -- configuration --------------------------------------------------------------------

    def config(self, node_id: str) -> Config:
        cfg = from_env(
            {
                "NODE_ID": node_id,
                "DATA_DIR": f"/sim/{node_id}",
                "PEER_HOST": node_id,
                "PEER_PORT": str(PEER_PORT),
                "PEERS": ",".join(f"{n}={n}:{PEER_PORT}" for n in self.ids),
                "LEASE_TTL_S": str(self.lease_ttl_s),
                "CLUSTER_ID": "sim",
            }
        )
        return dataclasses.replace(
            cfg, segment_size_bytes=self.segment_bytes, replication_frame_bytes=self.replication_frame_bytes
        )

    def runtime(self, node_id: str) -> Runtime:
        net, disk, rng = self.net, self.nodes[node_id].disk, self.rng

        async def run_sync(fn: Callable[..., Any], *args: object) -> Any:
            await net.gate(node_id)
            await trio.sleep(disk.round_delay_s())
            return fn(*args)

        def round_delay_s() -> float:
            pause = max(0.0, net.paused_until(node_id) - trio.current_time())
            return pause + disk.round_delay_s()

        return Runtime(
            network=net.endpoint(node_id),
            run_sync=run_sync,
            wall_time_ns=lambda: WALL_CLOCK_BASE_NS + int(trio.current_time() * 1e9),
            monotonic=trio.current_time,
            token_hex=lambda n: rng.getrandbits(8 * n).to_bytes(n, "big").hex(),
            inline_writer=True,
            serve_http=False,
            disk_delay_s=round_delay_s,
        )

    # -- life cycle -----------------------------------------------------------------------

    def start(self, node_id: str) -> None:
        slot = self.nodes[node_id]
        if slot.crashing is not None:
            # Killed right now (its tasks are ending, its disk not yet power-cycled): start
            # the next process only once the last one is gone, as a machine would reboot.
            crashing = slot.crashing

            async def once_gone() -> None:
                await crashing.wait()
                if self.nodes[node_id].node is None:
                    self.start(node_id)

            self.nursery.start_soon(once_gone)
            return
        assert slot.node is None, f"{node_id} is already running"
        slot.starts += 1
        node = Node(
            self.config(node_id),
            election=MemoryElection(self.hub, node_id, ttl_s=self.lease_ttl_s),
            fs=slot.disk.fs,
            append_timeout_s=self.append_timeout_s,
            runtime=self.runtime(node_id),
        )
        scope = trio.CancelScope()
        stopped = trio.Event()
        slot.node, slot.scope, slot.stopped, slot.exit_reason = node, scope, stopped, None
        self.hub.set_reachable(node_id, True)
        self.trace.note(node_id, f"start #{slot.starts}")

        async def run() -> None:
            try:
                with scope:
                    await node.run()
            except BaseException as exc:
                leaves = _leaves(exc)
                if not leaves:
                    raise  # only cancellation: the whole simulation is ending
                # A failed fsync, a corrupt log: the process exits, as it should. A broken
                # invariant of the log (LogStateError) is a bug, whatever stopped on it.
                if all(isinstance(e, StorageError) and not isinstance(e, LogStateError) for e in leaves):
                    slot.exit_reason = "; ".join(f"{type(e).__name__}: {e}" for e in leaves)
                    self.trace.note(node_id, f"exited: {slot.exit_reason}")
                else:
                    slot.exit_reason = f"{type(exc).__name__}: {exc}"
                    self.trace.note(node_id, f"exited with an unexpected error: {exc!r}")
                    self.on_unexpected(node_id, exc)
            finally:
                if node.started.is_set() and node.rlog.halted is not None:
                    slot.halted = node.rlog.halted
                if slot.node is node:
                    self.net.crash(node_id)
                    slot.node = None
                stopped.set()

        self.nursery.start_soon(run)

    async def crash(self, node_id: str, *, torn: bool = False) -> None:
        """kill -9 (or power loss): unsynced writes are gone, with ``torn`` the last
        sector being written holds garbage. The lease is not revoked: it expires."""
        slot = self.nodes[node_id]
        if slot.node is None:
            return
        if self.on_crash is not None:
            self.on_crash(node_id)
        self.trace.note(node_id, f"crash{' (torn write)' if torn else ''}")
        node = slot.node
        if node.started.is_set() and node.rlog.halted is not None:
            slot.halted = node.rlog.halted
        slot.node = None
        slot.crashing = gone = trio.Event()
        self.hub.set_reachable(node_id, False)  # a dead process revokes nothing
        self.net.crash(node_id)
        assert slot.scope is not None and slot.stopped is not None
        slot.scope.cancel()
        await slot.stopped.wait()
        slot.disk.fs.crash(garble=torn)
        slot.crashing = None
        gone.set()

    async def wipe(self, node_id: str) -> None:
        """The node's disk is lost: it comes back (later) with an empty data directory."""
        await self.crash(node_id)
        self.trace.note(node_id, "disk lost")
        self.nodes[node_id].disk = SimDisk(self.rng.getrandbits(32))

    async def restart(self, node_id: str) -> None:
        await self.crash(node_id)
        if self.nodes[node_id].node is None:  # not started meanwhile by a fault's undo
            self.start(node_id)

    def pause(self, node_id: str, seconds: float) -> None:
        """SIGSTOP for ``seconds``: none of its I/O (peers, disk, etcd) moves meanwhile."""
        until = trio.current_time() + seconds
        self.net.pause(node_id, until)
        self.hub.set_reachable(node_id, False)

        async def resume() -> None:
            await trio.sleep_until(until)
            if self.nodes[node_id].up:
                self.hub.set_reachable(node_id, True)
                self.trace.note(node_id, "resumed")

        self.nursery.start_soon(resume)

    # -- views ----------------------------------------------------------------------------

    def running(self) -> list[Node]:
        return [s.node for s in self.nodes.values() if s.node is not None and s.node.started.is_set()]

    def leader(self) -> Node | None:
        for node in self.running():
            if node.replicator is not None and node.replicator.writable:
                return node
        return None

    def data_dir(self, node_id: str) -> Path:
        return Path(f"/sim/{node_id}")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for inner in exc.exceptions:
            out.extend(_leaves(inner))
        return [e for e in out if not isinstance(e, trio.Cancelled)]
    return [exc]
