"""One seed, start to finish: build the cluster, run load and faults, heal, check.

``simulate(seed, options)`` is a pure function of its arguments: one ``random.Random(seed)``
feeds the network, the disks, the nemesis, the clients and the nodes' identities, trio's
own scheduler is seeded with it, and time is trio's ``MockClock`` (it jumps ahead whenever
every task waits), so a seed's run is the same run each time (``Trace.digest``).

After the load phase every fault is healed and every node restarted (a node whose log is
corrupt gets an empty disk, as the operator's procedure says: docs/membership.md), and the
cluster must converge. Then:

- the history checker (``walstore.checker``): nothing acknowledged lost, no duplicates,
  one order, reads are windows of it (promises 1-4, docs/fault-model.md);
- the invariants watched during the run: every node's applied events agree with every
  other node's at each index (checked as they are applied), a node's commit index never
  goes back while its process runs, epochs granted by the election only grow, and each
  node's replica core holds its invariants between transitions too (``ReplicaCore.check``);
- no node halted on a safety check (the guard firing means something upstream broke),
  no error outside ``WalstoreError`` escaped a node (it would have been a 500), and the
  healed cluster converged (a liveness check: a leader, everyone caught up).
"""

from __future__ import annotations

import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from walstore import planted_bugs
from walstore.checker import check
from walstore.errors import LogStateError, StorageError
from walstore.node import Node
from walstore.sim.cluster import SIM_FRAME_BYTES, SIM_SEGMENT_BYTES, SimCluster
from walstore.sim.faults import Nemesis
from walstore.sim.kinds import DEFAULT_KINDS, FRAME_KINDS, KINDS
from walstore.sim.network import NetworkFaults, SimNetwork
from walstore.sim.trace import Trace, capture_logs
from walstore.sim.workload import Workload

CONVERGE_TIMEOUT_S = 120.0  # virtual seconds for the healed cluster to settle
BUSY_STEPS = 200_000  # task steps at one virtual instant: a busy loop (see _BusyLoopWatchdog)


@dataclass(frozen=True)
class SimOptions:
    nodes: int = 3
    seconds: float = 10.0  # virtual seconds of load and faults
    clients: int = 3
    aggregates: int = 4
    # Short leases: virtual time has no CPU stalls to ride out, and more failovers fit in a
    # second of it. Fault durations scale with the lease.
    lease_ttl_s: float = 1.0
    append_timeout_s: float = 2.0
    faults: tuple[str, ...] = DEFAULT_KINDS + FRAME_KINDS
    mean_fault_gap_s: float = 0.8
    frame_fault_rate: float = 0.002  # per frame, for each enabled frame kind
    # How often a node that just won an election crashes 0-20 ms into its takeover (with
    # "crash" enabled): the moment that decides what an older epoch's entries become.
    takeover_crash_rate: float = 0.15
    # Record bytes per APPEND; None: each seed draws one of SIM_FRAME_BYTES.
    replication_frame_bytes: int | None = None
    # WAL segment size (SIM_SEGMENT_BYTES). A seed's history depends on it: a regression
    # seed found under another size names that size to replay as it was found.
    segment_bytes: int = SIM_SEGMENT_BYTES
    plant: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(KINDS) - set(FRAME_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {', '.join(KINDS + FRAME_KINDS)}")
        if self.nodes not in (1, 3, 5):
            raise ValueError("nodes must be 1, 3 or 5")


@dataclass
class SeedResult:
    seed: int
    violations: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    acked: int = 0
    failed: int = 0
    unknown: int = 0
    events: int = 0  # in the final log
    virtual_s: float = 0.0
    wall_s: float = 0.0
    digest: str = ""
    trace: Trace = field(default_factory=Trace)

    @property
    def ok(self) -> bool:
        return not self.violations


def simulate(seed: int, options: SimOptions | None = None) -> SeedResult:
    options = options or SimOptions()
    result = SeedResult(seed)
    started = time.perf_counter()
    planted_bugs.enable(*options.plant)
    # trio's scheduler: each batch of runnable tasks is put in creation order and then
    # shuffled by trio's own Random, seeded here. This is trio's switch for Hypothesis; off,
    # tasks woken at one instant run in an order that depends on memory addresses (trio's
    # deadline heap breaks ties by id()).
    run_module: Any = trio._core._run
    trio_random = run_module._r
    saved = trio_random.getstate(), run_module._ALLOW_DETERMINISTIC_SCHEDULING
    trio_random.seed(seed)
    run_module._ALLOW_DETERMINISTIC_SCHEDULING = True
    try:
        with capture_logs(result.trace):
            clock = trio.testing.MockClock(autojump_threshold=0)
            watchdog = _BusyLoopWatchdog(result)
            trio.run(_main, seed, options, result, watchdog, clock=clock, instruments=[watchdog])
    finally:
        trio_random.setstate(saved[0])
        run_module._ALLOW_DETERMINISTIC_SCHEDULING = saved[1]
        planted_bugs.enable()
    result.wall_s = time.perf_counter() - started
    result.faults = result.trace.faults
    result.digest = result.trace.digest()
    return result


class _BusyLoopWatchdog(trio.abc.Instrument):
    """The virtual clock moves only when every task waits. A task that never waits (a loop
    that sleeps until a moment already past) freezes it, and the run would never end: after
    BUSY_STEPS task steps at one instant, report the task and end the seed."""

    def __init__(self, result: SeedResult) -> None:
        self.result = result
        self.scope: trio.CancelScope | None = None
        self._at = -1.0
        self._steps = 0
        self._by_task: Counter[str] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        now = trio.current_time()
        if now != self._at:
            self._at, self._steps = now, 0
            self._by_task.clear()
            return
        self._steps += 1
        if self._steps > BUSY_STEPS // 2:
            self._by_task[task.name] += 1
        if self._steps == BUSY_STEPS and self.scope is not None:
            name, _ = self._by_task.most_common(1)[0]
            self.result.violations.append(f"busy_loop: {name} ran {BUSY_STEPS} steps at virtual {now:.4f}s")
            self.result.trace.note("check", f"VIOLATION busy_loop: {name} never lets the clock move")
            self.scope.cancel()


async def _main(seed: int, options: SimOptions, result: SeedResult, watchdog: _BusyLoopWatchdog) -> None:
    with trio.CancelScope() as scope:
        watchdog.scope = scope
        await _run_seed(seed, options, result)


async def _run_seed(seed: int, options: SimOptions, result: SeedResult) -> None:
    rng = random.Random(seed)
    trace = result.trace
    trace.note("sim", f"seed {seed}: {options.nodes} nodes, {options.seconds}s, plant={list(options.plant)}")

    def unexpected(who: str, exc: BaseException) -> None:
        result.violations.append(f"server_error: {who}: {exc!r}")
        for line in traceback.format_exception(exc)[-12:]:
            trace.note("error", line.rstrip())

    rate = options.frame_fault_rate
    net = SimNetwork(
        rng,
        trace.note,
        faults=NetworkFaults(
            drop=rate if "drop" in options.faults else 0.0,
            duplicate=rate if "duplicate" in options.faults else 0.0,
            reorder=10 * rate if "reorder" in options.faults else 0.0,
        ),
    )
    frame_bytes = options.replication_frame_bytes or rng.choice(SIM_FRAME_BYTES)
    trace.note("sim", f"APPEND frames of at most {frame_bytes} record bytes")
    async with trio.open_nursery() as nursery:
        cluster = SimCluster(
            nursery,
            rng,
            trace,
            net,
            size=options.nodes,
            lease_ttl_s=options.lease_ttl_s,
            append_timeout_s=options.append_timeout_s,
            on_unexpected=unexpected,
            replication_frame_bytes=frame_bytes,
            segment_bytes=options.segment_bytes,
        )
        for node_id in cluster.ids:
            cluster.start(node_id)
        workload = Workload(
            cluster, rng, trace, clients=options.clients, aggregates=options.aggregates, on_unexpected=unexpected
        )
        nemesis = Nemesis(
            cluster,
            net,
            rng,
            trace,
            options.faults,
            mean_gap_s=options.mean_fault_gap_s,
            takeover_crash_rate=options.takeover_crash_rate,
            # One frame per takeover and follower carries an EPOCH_START: aimed, so more often.
            epoch_start_drop_rate=min(1.0, 50 * rate) if "epoch_start_drop" in options.faults else 0.0,
        )
        watch = _Invariants(cluster, result, trace)
        until = options.seconds
        async with trio.open_nursery() as phase:
            phase.start_soon(workload.run, until)
            phase.start_soon(nemesis.run, until, phase)
            phase.start_soon(_supervise, cluster, nemesis, rng, trace)
            phase.start_soon(watch.run)
            # Until the load ends and the clients' last calls are answered, or an invariant
            # breaks: the trace up to that moment is the story, and nothing after it helps.
            with trio.move_on_after(until + options.append_timeout_s + 2 * options.lease_ttl_s + 1):
                await watch.violated.wait()
            phase.cancel_scope.cancel()
        converged: bool | None = None
        if not watch.violated.is_set():
            trace.note("sim", "load over: healing every fault")
            await _heal(cluster, net, trace)
            converged = await _converge(cluster, trace)
            watch.sample()
        result.acked, result.failed, result.unknown = workload.acked, workload.failed, workload.unknown
        _count_frame_faults(net, trace)
        _final_check(cluster, workload, result, converged)
        result.virtual_s = trio.current_time()
        nursery.cancel_scope.cancel()


def _count_frame_faults(net: SimNetwork, trace: Trace) -> None:
    """The per-frame faults, counted by the network, join the nemesis's faults by kind."""
    counts = net.counts
    for kind, n in (
        ("drop", counts.dropped),
        ("duplicate", counts.duplicated),
        ("reorder", counts.reordered),
        ("epoch_start_drop", counts.epoch_starts_dropped),
    ):
        if n:
            trace.faults[kind] += n


async def _supervise(cluster: SimCluster, nemesis: Nemesis, rng: random.Random, trace: Trace) -> None:
    """The operator (or Kubernetes): a node that exited by itself is started again a little
    later; one that cannot start because its log is corrupt gets a new, empty disk."""
    while True:
        await trio.sleep(0.25)
        for slot in cluster.nodes.values():
            if slot.up or slot.exit_reason is None:
                continue
            reason, slot.exit_reason = slot.exit_reason, None
            if "CorruptionError" in reason:
                trace.note("sim", f"operator: {slot.node_id}'s log is corrupt; replacing its disk")
                await cluster.wipe(slot.node_id)
                nemesis.disk_replaced(slot.node_id)

            async def later(node_id: str = slot.node_id) -> None:
                await trio.sleep(rng.uniform(0.2, 1.5))
                if not cluster.nodes[node_id].up:
                    cluster.start(node_id)

            cluster.nursery.start_soon(later)


class _Invariants:
    """Watched while the run goes: applied events agree across nodes at every index, a
    running node's commit index never goes back, election epochs only grow."""

    def __init__(self, cluster: SimCluster, result: SeedResult, trace: Trace) -> None:
        self.cluster = cluster
        self.result = result
        self.trace = trace
        self.by_index: dict[int, tuple[str, str]] = {}  # event index -> (event id, first node seen on)
        # Keyed by node process: (node id, start number). Not id(node): a crashed node's
        # object is freed and its id reused by a later process, which then inherits the
        # dead one's marks (a false "commit went back", found that way).
        self.checked: dict[tuple[str, int], int] = {}  # last event index compared
        self.commit: dict[tuple[str, int], int] = {}
        # Log index -> (epoch, node) of the entry some node held there when it counted it
        # committed; and per node process, the last index recorded.
        self.committed: dict[int, tuple[int, str]] = {}
        self.committed_upto: dict[tuple[str, int], int] = {}
        self.epochs_seen = 0
        self.reported: set[str] = set()
        self.violated = trio.Event()
        cluster.on_crash = lambda node_id: self.sample()

    async def run(self) -> None:
        while True:
            await trio.sleep(0.1)
            self.sample()

    def _violation(self, kind: str, text: str, *, key: str | None = None) -> None:
        key = key or kind
        if key in self.reported:
            return
        self.reported.add(key)
        self.result.violations.append(f"{kind}: {text}")
        self.trace.note("check", f"VIOLATION {kind}: {text}")
        self.violated.set()

    def sample(self) -> None:
        for slot in self.cluster.nodes.values():
            node = slot.node
            if node is None or not node.started.is_set():
                continue
            key = (slot.node_id, slot.starts)
            commit = node.commit.value
            if commit < self.commit.get(key, 0):
                self._violation("commit_went_back", f"{slot.node_id}: {self.commit[key]} -> {commit}")
            self.commit[key] = commit
            self._committed_entries_stay(slot.node_id, node, key)
            self._compare_applied(slot.node_id, node, key)
            if node.replicator is not None:
                try:  # the invariants between the replica's parts, between its transitions too
                    node.replicator.core.check()
                except LogStateError as exc:
                    self._violation("replica_core", f"{slot.node_id}: {exc}", key=f"core {slot.node_id}")
            if node.rlog.halted is not None and slot.halted is None:
                slot.halted = node.rlog.halted
                self._violation("safety_halt", f"{slot.node_id}: {node.rlog.halted}", key=f"halt {slot.node_id}")
        self._acks_are_durable()
        history = self.cluster.hub.history
        for info in history[self.epochs_seen :]:
            if self.epochs_seen and info.epoch <= history[self.epochs_seen - 1].epoch:
                self._violation("epoch_went_back", f"{info.node_id} got epoch {info.epoch} after a higher one")
            self.epochs_seen += 1

    def _acks_are_durable(self) -> None:
        """What the leader counts as a follower's (its match index) is on that follower's
        disk, while the follower is in the leader's epoch and the same incarnation."""
        leader = self.cluster.leader()
        if leader is None or leader.replicator is None:
            return
        epoch = leader.replicator.epoch
        for progress in leader.replicator.peer_progress():
            follower = self.cluster.nodes[progress.peer.node_id].node
            if follower is None or not follower.started.is_set() or follower.writer.failure is not None:
                continue
            if progress.incarnation != follower.rlog.incarnation or follower.rlog.promised_epoch != epoch:
                continue
            if progress.match_index > follower.rlog.durable_index:
                self._violation(
                    "acked_not_durable",
                    f"{leader.config.node_id} counts {progress.peer.node_id} up to {progress.match_index}, "
                    f"its disk holds up to {follower.rlog.durable_index}",
                )

    def _committed_entries_stay(self, node_id: str, node: Node, key: tuple[str, int]) -> None:
        """Raft's state machine safety, on log entries rather than applied events: once any
        node counts an index committed, every node that later counts it committed holds the
        same entry there (same epoch: one leader per epoch wrote it). Stronger than the
        applied-events check: it sees a commit that no client, read or apply saw yet, such
        as a leader's that lasted a moment before it died."""
        if node.writer.failure is not None or node.wal.poisoned:
            # A poisoned log (a failed fdatasync, of a segment or of meta.json) refuses
            # reads; the node is stopping and says so. (Seed 2039: a promise's fdatasync
            # failed, and this read stopped the simulator itself.)
            return
        upto = min(node.commit.value, node.rlog.written_index)
        start = max(self.committed_upto.get(key, 0), node.rlog.first_index - 1) + 1
        for index in range(start, upto + 1):
            epoch = node.rlog.epoch_at(index)
            assert epoch is not None  # written, so in the log
            seen = self.committed.get(index)
            if seen is None:
                self.committed[index] = (epoch, node_id)
            elif seen[0] != epoch:
                self._violation(
                    "committed_entry_replaced",
                    f"log index {index}: {seen[1]} counted epoch {seen[0]}'s entry committed, "
                    f"{node_id} counts epoch {epoch}'s",
                )
                return
        self.committed_upto[key] = max(self.committed_upto.get(key, 0), upto)

    def _compare_applied(self, node_id: str, node: Node, key: tuple[str, int]) -> None:
        start = self.checked.get(key, 0) + 1
        upto = node.applied_events.value
        while start <= upto:
            try:
                page = node.store.read_log(start, 1000)
            except StorageError:
                break  # a poisoned log (failed fsync) or rot found by its CRC: the node says so itself
            if not page.events:
                break
            for event in page.events:
                seen = self.by_index.get(event.index)
                if seen is None:
                    self.by_index[event.index] = (event.id, node_id)
                elif seen[0] != event.id:
                    self._violation(
                        "applied_diverged",
                        f"index {event.index}: {node_id} applied {event.id[:8]}, {seen[1]} applied {seen[0][:8]}",
                    )
            start = page.events[-1].index + 1
        self.checked[key] = start - 1


async def _heal(cluster: SimCluster, net: SimNetwork, trace: Trace) -> None:
    net.heal_all()
    net.faults.drop = net.faults.duplicate = net.faults.reorder = 0.0
    net.epoch_start_lost = None
    for slot in cluster.nodes.values():
        slot.disk.fs.clear_faults()
        slot.disk.slow_until = 0.0
    # Wait out pauses, then make everyone reachable and running.
    latest = max((net.paused_until(n) for n in cluster.ids), default=0.0)
    if latest > trio.current_time():
        await trio.sleep_until(latest)
    for node_id in cluster.ids:
        slot = cluster.nodes[node_id]
        if slot.up:
            cluster.hub.set_reachable(node_id, True)
            continue
        if slot.exit_reason is not None and "CorruptionError" in slot.exit_reason:
            await cluster.wipe(node_id)
        slot.exit_reason = None
        cluster.start(node_id)


async def _converge(cluster: SimCluster, trace: Trace) -> bool:
    """Wait until a leader leads and every node has applied its commit index."""
    with trio.move_on_after(CONVERGE_TIMEOUT_S):
        while True:
            await trio.sleep(0.25)
            for slot in cluster.nodes.values():
                if not slot.up and slot.exit_reason is not None:
                    reason, slot.exit_reason = slot.exit_reason, None
                    if "CorruptionError" in reason:
                        await cluster.wipe(slot.node_id)
                    cluster.start(slot.node_id)
            leader = cluster.leader()
            if leader is None or len(cluster.running()) < len(cluster.ids):
                continue
            target = leader.commit.value
            if leader.applied.value < target:
                continue
            if all(n.applied.value >= target and n.commit.value >= target for n in cluster.running()):
                trace.note("sim", f"converged: leader {leader.config.node_id}, commit {target}")
                return True
    trace.note("sim", "did not converge")
    return False


def _final_log(node: Node) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    start = 1
    while True:
        page = node.store.read_log(start, 1000)
        if not page.events:
            return events
        for e in page.events:
            events.append(
                {
                    "id": e.id,
                    "aggregate_id": e.aggregate_id,
                    "version": e.version,
                    "index": e.index,
                    "payload": _payload(e.payload),
                }
            )
        start = page.events[-1].index + 1


def _payload(raw: bytes) -> Any:
    import json

    return json.loads(raw)


def _final_check(cluster: SimCluster, workload: Workload, result: SeedResult, converged: bool | None) -> None:
    """``converged`` None: the run stopped at a broken invariant, before healing."""
    for slot in cluster.nodes.values():
        node = slot.node
        if node is not None and node.started.is_set() and node.rlog.halted is not None:
            slot.halted = node.rlog.halted
        halt = f"safety_halt: {slot.node_id}: {slot.halted}"
        if slot.halted is not None and halt not in result.violations:
            result.violations.append(halt)
    if converged is False:
        result.violations.append("stuck: the healed cluster did not converge within the timeout")
    logs: dict[str, list[dict[str, Any]]] = {}
    for node in cluster.running():
        try:
            logs[node.config.node_id] = _final_log(node)
        except StorageError as exc:
            # Rot in a sealed record (the "corrupt" fault) found by its CRC on this read, or
            # a log poisoned by a failed fsync: the node refuses to serve it, which is
            # right; its copy cannot be compared.
            result.trace.note("sim", f"{node.config.node_id}: final read refused ({exc}); not compared")
    complete = list(logs) if converged else []
    if not logs:
        result.violations.append("stuck: no node is running at the end")
        return
    report = check(workload.history, logs, complete_nodes=complete)
    result.events = max(len(v) for v in logs.values())
    for violation in report.violations:
        result.violations.append(str(violation))
    for kind, count in report.counts.items():
        if count and not any(v.kind == kind for v in report.violations):
            result.violations.append(f"{kind}: {count}")
    if converged is not True:
        result.trace.note("sim", f"final logs: { {k: len(v) for k, v in logs.items()} }")
