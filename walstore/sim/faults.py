"""Which faults a simulation injects, and when: the nemesis.

Faults come in kinds (``KINDS``); a run enables some of them. Every step the nemesis waits a
random while, picks an enabled kind and a victim, and injects it; most faults are undone a
random while later (a partition heals, a crashed node restarts, a slow disk recovers), so
faults overlap: a lost disk while another node is partitioned, a leader paused while a
follower's fsync fails, and so on. Combinations are the point (docs/fault-model.md).
The nemesis never leaves more than a minority of the voters without their data: a wiped
or rotted node counts until a leader has caught it up and made it a voter again. Losing a
majority's disks loses data by definition, and stops the cluster by design
(docs/membership.md); neither is a bug the simulator should report.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import PurePosixPath

import trio

from walstore.election.membership import decode_member
from walstore.sim.cluster import SimCluster
from walstore.sim.kinds import KINDS
from walstore.sim.network import SimNetwork
from walstore.sim.trace import Trace
from walstore.wal.segment import SEGMENT_SUFFIX


class Nemesis:
    def __init__(
        self,
        cluster: SimCluster,
        net: SimNetwork,
        rng: random.Random,
        trace: Trace,
        kinds: Sequence[str],
        *,
        mean_gap_s: float,
        takeover_crash_rate: float = 0.15,
        epoch_start_drop_rate: float = 0.0,
    ) -> None:
        self.cluster = cluster
        self.net = net
        self.rng = rng
        self.trace = trace
        self.kinds = [k for k in kinds if k in KINDS]
        self.mean_gap_s = mean_gap_s
        self.takeover_crash_rate = takeover_crash_rate
        self._damaged: set[str] = set()  # rotted disks not yet replaced by the operator
        # Emptied disks (lost, or replaced by the operator) whose node is not yet a voter
        # again with its new data directory: amnesiacs, whatever the member records say
        # before the node has registered its new incarnation.
        self._emptied: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._until = 0.0
        if "crash" in self.kinds:
            cluster.hub.on_grant = self._on_grant
        self.epoch_start_drop_rate = epoch_start_drop_rate
        self._doom_next = 0  # figure8: this many more leaders lose their EPOCH_START and die
        self._doomed: set[str] = set()
        if epoch_start_drop_rate or "figure8" in self.kinds:
            net.epoch_start_lost = self._epoch_start_lost

    def _on_grant(self, node_id: str) -> None:
        """A node just won an election: sometimes it crashes in the middle of its takeover
        (before or while it writes and ships its EPOCH_START), the moment that decides what
        an older epoch's entries become."""
        if not self._active() or self.rng.random() >= self.takeover_crash_rate:
            return
        self._crash_soon(node_id, self.rng.uniform(0.0, 0.02), "winning an election (mid-takeover)")

    def _epoch_start_lost(self, node_id: str) -> bool:
        """The network asks about each APPEND that carries an EPOCH_START (``node_id`` sent
        it): whether it is lost. A lost one's sender sometimes dies before it resends, so
        the record stays on its own disk (if its fsync made it) while what it shipped
        before counts on the follower. A doomed leader (``figure8``) loses every one."""
        if node_id in self._doomed:
            return True
        if self._doom_next and self._active():
            self._doom_next -= 1
            self._doomed.add(node_id)
            self._crash_soon(node_id, self.rng.uniform(0.001, 0.03), "its EPOCH_START reached no one")
            return True
        if not self.epoch_start_drop_rate or self.rng.random() >= self.epoch_start_drop_rate:
            return False
        if "crash" in self.kinds and self._active() and self.rng.random() < 0.5:
            self._crash_soon(node_id, self.rng.uniform(0.001, 0.1), "its EPOCH_START was lost")
        return True

    def _active(self) -> bool:
        return self._nursery is not None and trio.current_time() < self._until

    def _crash_soon(self, node_id: str, delay: float, why: str) -> None:
        assert self._nursery is not None
        down_for = self.rng.uniform(0.1, 3 * self.cluster.lease_ttl_s)

        async def crash_it() -> None:
            await trio.sleep(delay)
            if self.cluster.nodes[node_id].up:
                self.trace.fault("crash", f"{node_id} {delay * 1000:.1f} ms after {why}, back in {down_for:.2f}s")
                await self.cluster.crash(node_id)
            self._doomed.discard(node_id)
            await self._later(down_for, lambda: self._start(node_id))

        self._nursery.start_soon(crash_it)

    async def run(self, until: float, nursery: trio.Nursery) -> None:
        if not self.kinds:
            return
        self._nursery, self._until = nursery, until
        try:
            while True:
                await trio.sleep(self.rng.expovariate(1.0 / self.mean_gap_s))
                if trio.current_time() >= until:
                    return
                kind = self.rng.choice(self.kinds)
                await self._inject(kind, nursery)
        finally:
            self._nursery = None  # no takeover crash scheduled into a finished phase

    async def _later(self, delay: float, undo: Callable[[], Awaitable[None]]) -> None:
        """Undo a fault after ``delay`` (cancelled with the load phase; healing covers it)."""
        await trio.sleep(delay)
        await undo()

    def _victim(self, *, leader_bias: float = 0.5) -> str:
        leader = self.cluster.leader()
        if leader is not None and self.rng.random() < leader_bias:
            return leader.config.node_id
        return self.rng.choice(self.cluster.ids)

    async def _inject(self, kind: str, nursery: trio.Nursery) -> None:
        c, rng, ttl = self.cluster, self.rng, self.cluster.lease_ttl_s
        victim = self._victim(leader_bias=1.0 if kind in ("cut_crash", "figure8") else 0.5)
        slot = c.nodes[victim]
        minority = (len(c.ids) - 1) // 2
        if kind in ("crash", "torn", "lost_disk") and slot.up:
            if kind == "lost_disk" and len(self.amnesiacs() - {victim}) >= minority:
                return
            down_for = rng.uniform(0.1, 4 * ttl)
            self.trace.fault(kind, f"{victim}, back in {down_for:.2f}s")
            if kind == "lost_disk":
                self._emptied.add(victim)
                await c.wipe(victim)
            else:
                await c.crash(victim, torn=kind == "torn")
            nursery.start_soon(self._later, down_for, lambda: self._start(victim))
        elif kind in ("cut_crash", "figure8") and slot.up:
            # Silent to every peer for a moment while its clients still write to it, then
            # killed: entries of its epoch that only its own disk holds, the start of
            # Raft's figure 8 (docs/simulation.md). figure8 then dooms the next two leaders:
            # each one's EPOCH_START reaches no one, and it dies a moment later.
            if kind == "figure8":
                if self._doom_next or c.leader() is not slot.node:
                    return
                self._doom_next = 2
            cut_for = rng.uniform(0.005, 0.4 * ttl)
            down_for = rng.uniform(0.1, 3 * ttl)
            self.trace.fault(kind, f"{victim} silent for {cut_for * 1000:.0f} ms, then killed, back in {down_for:.2f}s")
            for other in c.ids:
                if other != victim:
                    self.net.cut(victim, other, reset=False)

            async def crash_then_heal() -> None:
                await trio.sleep(cut_for)
                await c.crash(victim)
                await self._heal_all_of(victim)
                await self._later(down_for, lambda: self._start(victim))

            nursery.start_soon(crash_then_heal)
        elif kind == "restart" and slot.up:
            self.trace.fault(kind, victim)
            await c.restart(victim)
        elif kind == "fsync_eio" and slot.up:
            self.trace.fault(kind, f"{victim}: the next fdatasync fails")
            slot.disk.fs.fail_next_fdatasync()
        elif kind == "enospc" and slot.up:
            room = rng.choice([0, 512, 4096, 65536])
            lasts = rng.uniform(0.2, 3 * ttl)
            self.trace.fault(kind, f"{victim}: {room} bytes left for {lasts:.2f}s")
            fs = slot.disk.fs
            fs.fail_writes_after(room)
            nursery.start_soon(self._later, lasts, lambda: self._space_back(victim, fs))
        elif kind == "slow_disk":
            slot.disk.slow_s = rng.choice([0.05, 0.3, 1.0, 2 * ttl])
            slot.disk.slow_until = trio.current_time() + rng.uniform(0.5, 3 * ttl)
            self.trace.fault(kind, f"{victim}: rounds take {slot.disk.slow_s:.2f}s until {slot.disk.slow_until:.2f}")
        elif kind == "corrupt":
            self._corrupt(victim)
        elif kind in ("partition", "blackhole"):
            other = rng.choice([n for n in c.ids if n != victim])
            lasts = rng.uniform(0.2, 4 * ttl)
            self.trace.fault(kind, f"{victim} | {other} for {lasts:.2f}s")
            self.net.cut(victim, other, reset=kind == "partition")
            nursery.start_soon(self._later, lasts, lambda: self._heal(victim, other))
        elif kind == "isolate":
            lasts = rng.uniform(0.2, 4 * ttl)
            reset = rng.random() < 0.5
            self.trace.fault(kind, f"{victim} from everyone for {lasts:.2f}s ({'reset' if reset else 'silent'})")
            for other in c.ids:
                if other != victim:
                    self.net.cut(victim, other, reset=reset)
            nursery.start_soon(self._later, lasts, lambda: self._heal_all_of(victim))
        elif kind == "pause" and slot.up:
            seconds = rng.uniform(0.5 * ttl, 3 * ttl)
            self.trace.fault(kind, f"{victim} for {seconds:.2f}s (lease {ttl}s)")
            c.pause(victim, seconds)
        elif kind == "lease_expiry":
            leader = c.leader()
            if leader is not None and rng.random() < 0.5:
                # The split-brain window: etcd ends the lease of a leader that cannot hear
                # it (cut off from etcd), so another node may win while the old one still
                # believes it leads until its own deadline. Epoch fencing must cover this.
                # Half of those also cut it from one peer (a partial partition): the new
                # leader's PREPARE cannot reach it, while the other follower still can.
                old = leader.config.node_id
                lasts = rng.uniform(0.5, 2 * ttl)
                peer = rng.choice([n for n in c.ids if n != old]) if rng.random() < 0.5 else None
                cut = f" and from {peer}" if peer else ""
                self.trace.fault(kind, f"{old} cut from etcd{cut} for {lasts:.2f}s, and its lease ends now")
                c.hub.set_reachable(old, False)
                if peer is not None:
                    self.net.cut(old, peer, reset=rng.random() < 0.5)
                    nursery.start_soon(self._later, lasts, lambda: self._heal(old, peer))
                c.hub.expire_lease()
                nursery.start_soon(self._later, lasts, lambda: self._etcd_back([old]))
            else:
                self.trace.fault(kind, "the leader's lease ends now")
                c.hub.expire_lease()
        elif kind == "etcd_cut":
            lasts = rng.uniform(0.2, 3 * ttl)
            self.trace.fault(kind, f"{victim} cannot reach etcd for {lasts:.2f}s")
            c.hub.set_reachable(victim, False)
            nursery.start_soon(self._later, lasts, lambda: self._etcd_back([victim]))
        elif kind == "etcd_down":
            lasts = rng.uniform(0.2, 2 * ttl)
            self.trace.fault(kind, f"etcd unavailable for {lasts:.2f}s")
            for n in c.ids:
                c.hub.set_reachable(n, False)
            nursery.start_soon(self._later, lasts, lambda: self._etcd_back(c.ids))

    def amnesiacs(self) -> set[str]:
        """Nodes without the data their vote stands for: a learner (a new incarnation not
        yet caught up and promoted), one whose disk is gone, or one with rot in its log."""
        out = set(self._damaged)
        for node_id in self.cluster.ids:
            record = self.cluster.hub.members.get(node_id)
            member = decode_member(node_id, *record) if record is not None else None
            if member is not None and not member.voter:
                out.add(node_id)
            if self.cluster.nodes[node_id].disk.fs.crashes == 0 and not self.cluster.nodes[node_id].up:
                out.add(node_id)  # wiped and not started again yet
            if node_id in self._emptied:
                node = self.cluster.nodes[node_id].node
                promoted = (
                    member is not None
                    and member.voter
                    and node is not None
                    and node.started.is_set()
                    and node.rlog.incarnation == member.incarnation
                )
                if promoted:
                    self._emptied.discard(node_id)  # caught up and a voter again
                else:
                    out.add(node_id)
        return out

    def disk_replaced(self, node_id: str) -> None:
        self._damaged.discard(node_id)
        self._emptied.add(node_id)  # an empty disk now: a learner until promoted

    async def _start(self, node_id: str) -> None:
        slot = self.cluster.nodes[node_id]
        if not slot.up:
            self.cluster.start(node_id)

    async def _space_back(self, node_id: str, fs: object) -> None:
        slot = self.cluster.nodes[node_id]
        if slot.disk.fs is fs:
            slot.disk.fs.clear_faults()
            self.trace.note("fault", f"{node_id}: disk has space again")

    async def _heal(self, a: str, b: str) -> None:
        self.net.heal(a, b)
        self.trace.note("fault", f"healed {a} | {b}")

    async def _heal_all_of(self, a: str) -> None:
        for other in self.cluster.ids:
            if other != a:
                self.net.heal(a, other)
        self.trace.note("fault", f"healed {a}")

    async def _etcd_back(self, nodes: Sequence[str]) -> None:
        for n in nodes:
            # A paused node stays cut off until it resumes; a stopped one until it starts.
            if self.cluster.nodes[n].up and self.net.paused_until(n) <= trio.current_time():
                self.cluster.hub.set_reachable(n, True)
        self.trace.note("fault", f"etcd reachable again for {', '.join(nodes)}")

    def _corrupt(self, node_id: str) -> None:
        """Flip a byte inside a sealed segment (not the newest one, which recovery may
        legitimately cut back as a torn tail)."""
        fs = self.cluster.nodes[node_id].disk.fs
        directory = self.cluster.data_dir(node_id)
        if not fs.exists(directory):
            return
        segments = sorted(n for n in fs.listdir(directory) if n.endswith(SEGMENT_SUFFIX))
        if len(segments) < 2 or len(self.amnesiacs() - {node_id}) >= (len(self.cluster.ids) - 1) // 2:
            return
        name = self.rng.choice(segments[:-1])
        path = PurePosixPath(directory) / name
        data = fs.read_file(path)  # type: ignore[arg-type]
        used = len(data.rstrip(b"\x00"))
        if used < 64:
            return
        offset = self.rng.randrange(32, used)
        fs.damage(path, offset, bytes([data[offset] ^ (1 << self.rng.randrange(8))]))  # type: ignore[arg-type]
        self._damaged.add(node_id)  # until the operator has replaced the disk
        self.trace.fault("corrupt", f"{node_id}: bit flipped in {name} at {offset}")
