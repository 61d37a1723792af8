"""The composition root: one node, every service in one trio nursery.

Start-up: open the write-ahead log (recovery repairs a torn tail or refuses corruption),
rebuild the state machine from it, then serve. The ``Replicator`` decides the role and
the commit index; this module only wires it in. Alone (no peers) the node is a cluster of
one on the same path: its election is ``LocalElection`` (no etcd, no lease), its takeover
asks nobody, it writes EPOCH_START, and an entry is committed the moment its own fsync
makes it durable, since its disk is the majority. It serves once it leads.

The write path (leader): validate against the tentative state (``store.prepare``),
submit to the group-commit writer (indexes assigned now, no await in between), ship to the
followers, wait for the commit index to pass the batch, wait until it is applied, answer.
The applier task is the only writer of the state machine: committed entries, in order.

Stopping (SIGTERM, ``shutdown()``), in this order:

1. New writes are refused at once with 503 ``shutting_down`` (from clients and, on a
   leader, forwarded by followers), and ``/health/ready`` says ``shutting_down``; the
   client port stops accepting and closes idle keep-alive connections cleanly while the
   requests in flight are answered (``walstore.http.server``).
2. A leader hands over: it waits (``HANDOVER_APPENDS_WAIT_S`` at most, milliseconds in
   practice) for its appends in flight to be answered, because resigning under them ends
   the term with their commit unseen and turns each into a 504; then it resigns in etcd, so
   the others elect a successor now instead of when this process exits. It keeps running
   (peer port included) until a successor is known and followers have stopped forwarding
   writes to it (``FORWARD_QUIET_S``): a forward cut off by the exit is a 504 too.
3. The client port's drain ends (``shutdown_grace_s``), the last batch syncs, the probe
   port (which kept answering, so the kubelet saw the 503) closes, and the node exits.

``shutdown_budget_s`` is the worst case of all that; Kubernetes' grace period covers it.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import trio
import trio.lowlevel

from walstore import pending_write, write_admission
from walstore.config import Config, PeerSpec
from walstore.election.base import Election
from walstore.election.local import LocalElection
from walstore.errors import (
    DiskFullError,
    EntriesReplaced,
    LogStateError,
    NotCaughtUp,
    OutcomeUnknown,
    StorageError,
    Truncated,
    UnavailableError,
    ValidationError,
)
from walstore.event import AppendResult, NewEvent, StoredEvent, Tracking
from walstore.http.app import HttpApp, ProbeApp
from walstore.http.server import HttpLimits, probe_limits, serve_http
from walstore.metrics import Metrics
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.replicator import Replicator
from walstore.replication.roles import Role
from walstore.runtime import Runtime
from walstore.runtime import current as current_runtime
from walstore.runtime import reset as reset_runtime
from walstore.runtime import use as use_runtime
from walstore.service import AggregateRead, Checkpoint, Direction, LogRead, NodeStatus, PeerStatus, subscription
from walstore.store import EventStore
from walstore.wal.fs import Buffer, FileSystem, RealFileSystem, WalFile
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.record import KIND_EVENT, MAX_RECORD_BODY_BYTES
from walstore.wal.writer import SLOW_ROUND_S, GroupCommitWriter, PendingAppend
from walstore.watermark import Watermark
from walstore.write_admission import Forward, Lead, Refuse

log = logging.getLogger("walstore.node")

APPLY_CHUNK_RECORDS = 4096  # records applied per step: bounds the event loop's pause
APPEND_TIMEOUT_S = 10.0  # then 504: the append may still commit, the client must check
MAX_READ_WAIT_S = 10.0  # a min_index read waits at most this long, then 503
SUBSCRIBE_PAGE_EVENTS = 512  # a subscription reads the log this many events at a time
SHUTDOWN_GRACE_S = 5.0  # the last batch gets this long to sync after the HTTP drain
# A cluster of one serves once it leads (its takeover's EPOCH_START is durable), or after
# this long anyway, so that health can say why it does not.
SOLO_LEAD_WAIT_S = 10.0
# How often the commit index is recorded in meta.json. The record only guards against
# truncation (the in-memory commit index guards first), so lagging by this much is fine.
COMMIT_RECORD_INTERVAL_S = 0.5
# A round slower than the threshold keeps the node not ready this long after it returned:
# between two slow rounds the next one is only just starting, and a probe every few seconds
# would otherwise rarely see the disk that is slow all the time.
SLOW_DISK_HOLD_S = 10.0
# After a failed fdatasync the node answers 503 storage_failed this long before it stops
# accepting: a client that connected (or sent on a keep-alive connection) just then hears a
# definite "not written" instead of a reset it cannot tell from a lost answer. Short, as the
# node holds its etcd lease until it exits.
STORAGE_FAILED_LINGER_S = 0.5
# A leader's appends in flight commit within milliseconds; one stuck behind a slow disk must
# not hold the resignation (and so the next leader) for longer than about a lease.
HANDOVER_APPENDS_WAIT_S = 2.0
# The resignation is one etcd revoke, bounded by the election itself; this is a backstop.
HANDOVER_RESIGN_S = 3.0
# After resigning, the node stays until a successor is known and followers have gone this
# long without forwarding a write here (each is refused 503 while the node runs; one in
# flight when the process exits is a 504 for its client); at most HANDOVER_SETTLE_S.
FORWARD_QUIET_S = 0.2
HANDOVER_SETTLE_S = 2.0
HANDOVER_POLL_S = 0.02
# The probe port closes last; its own grace is 1 s (probe_limits).
PROBE_STOP_S = 2.0
# The election's close at exit revokes its lease: one RPC round over the endpoints, as
# EtcdElection._revoke_now bounds it (DEFAULT_RPC_TIMEOUT_S 0.5 s x 3 members + 0.1 s).
ELECTION_CLOSE_S = 3 * 0.5 + 0.1


def shutdown_budget_s(limits: HttpLimits) -> float:
    """The longest ``Node.run`` can take from ``shutdown()`` to its return: the HTTP drain
    (hand-over running alongside it), the last sync, the probe port, the election's close.
    Kubernetes' ``terminationGracePeriodSeconds`` must exceed it, or SIGKILL cuts a drain."""
    drain = max(HANDOVER_APPENDS_WAIT_S + HANDOVER_RESIGN_S + HANDOVER_SETTLE_S, limits.shutdown_grace_s + 1)
    return drain + SHUTDOWN_GRACE_S + PROBE_STOP_S + ELECTION_CLOSE_S


class _SpaceWatch:
    """The node's file system, noting ENOSPC on files it creates: the metadata file (a
    promise before every takeover) and new segments. A full disk that fails a takeover's
    promise never reaches the writer, yet is why there is no leader; every other call is
    passed straight through (only created files are wrapped, so reads of the segments
    opened at start-up pay nothing)."""

    def __init__(self, inner: FileSystem, clock: Callable[[], float]) -> None:
        self.inner = inner
        self.clock = clock  # the writer's clock (the runtime's monotonic): full_at is compared with its times
        self.full_at: float | None = None  # clock() of the last ENOSPC, until a write succeeds

    def create(self, path: Path) -> WalFile:
        try:
            return _WatchedFile(self, self.inner.create(path))
        except DiskFullError:
            self.full_at = self.clock()
            raise

    def open(self, path: Path, *, writable: bool = True) -> WalFile:
        return self.inner.open(path, writable=writable)

    def read_file(self, path: Path) -> bytes:
        return self.inner.read_file(path)

    def exists(self, path: Path) -> bool:
        return self.inner.exists(path)

    def listdir(self, path: Path) -> list[str]:
        return self.inner.listdir(path)

    def mkdir(self, path: Path) -> None:
        self.inner.mkdir(path)

    def rename(self, src: Path, dst: Path) -> None:
        self.inner.rename(src, dst)

    def unlink(self, path: Path) -> None:
        self.inner.unlink(path)

    def fsync_dir(self, path: Path) -> None:
        self.inner.fsync_dir(path)


class _WatchedFile:
    def __init__(self, watch: _SpaceWatch, inner: WalFile) -> None:
        self._watch = watch
        self._inner = inner

    @property
    def path(self) -> Path:
        return self._inner.path

    def size(self) -> int:
        return self._inner.size()

    def pwritev(self, buffers: Sequence[Buffer], offset: int, *, sync: bool) -> None:
        try:
            self._inner.pwritev(buffers, offset, sync=sync)
        except DiskFullError:
            self._watch.full_at = self._watch.clock()
            raise
        self._watch.full_at = None

    def fdatasync(self) -> None:
        self._inner.fdatasync()

    def fallocate(self, length: int) -> None:
        try:
            self._inner.fallocate(length)
        except DiskFullError:
            self._watch.full_at = self._watch.clock()
            raise

    def pread(self, offset: int, length: int) -> bytes:
        return self._inner.pread(offset, length)

    def view(self) -> memoryview:
        return self._inner.view()

    def truncate(self, length: int) -> None:
        self._inner.truncate(length)

    def close(self) -> None:
        self._inner.close()


class Node:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        election: Election | None = None,
        fs: FileSystem | None = None,
        http_limits: HttpLimits | None = None,
        append_timeout_s: float = APPEND_TIMEOUT_S,
        slow_disk_s: float = SLOW_ROUND_S,
        runtime: Runtime | None = None,
    ) -> None:
        self.config = config
        # The seams to the world outside (walstore.runtime): real ones unless simulated.
        self.runtime = runtime if runtime is not None else current_runtime()
        self.append_timeout_s = append_timeout_s
        # A write + fdatasync round slower than this (or one in flight for longer) makes the
        # node not ready: a leader whose disk stalls holds every write of the cluster.
        self.slow_disk_s = slow_disk_s
        self.metrics = metrics or Metrics()
        self._election = election
        self._real_disk = fs is None
        self._space = _SpaceWatch(fs if fs is not None else RealFileSystem(), self.runtime.monotonic)
        self.http_limits = http_limits or HttpLimits(
            max_body_bytes=config.max_body_bytes,
            max_batch_body_bytes=config.max_batch_bytes,
            header_timeout_s=config.http_header_timeout_s,
            idle_timeout_s=config.http_idle_timeout_s,
            max_connections=config.http_max_connections,
        )
        self.commit = Watermark()  # log index committed (durable on a majority)
        self.applied = Watermark()  # log index applied to the store
        self.applied_events = Watermark()  # API (event) index applied
        self.http_port = 0
        self.peer_port = 0
        self.probe_port: int | None = None
        # Appends between validation and their answer: a leader resigns only once it is 0.
        self._appends_in_flight = 0
        self._appends_done: trio.Event | None = None  # set when the count reaches 0
        self._last_refused_at = -math.inf  # a write refused while stopping (trio clock)
        self.started = trio.Event()
        self.stopping = False
        self.replicator: Replicator | None = None  # set at start
        self._shutdown = trio.Event()
        self._http_done = trio.Event()
        self._http_started = self._probes_started = False  # their ports are opening or open
        # The probe port stops last (after the client port): set to stop it, set when done.
        self._probes_stop, self._probes_done = trio.Event(), trio.Event()

    # -- life cycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        # Every task this node starts inherits its runtime (walstore.runtime).
        token = use_runtime(self.runtime)
        try:
            await self._run(task_status)
        finally:
            reset_runtime(token)

    async def _run(self, task_status: trio.TaskStatus[Node]) -> None:
        cfg = self.config
        # A record must fit one segment; small test segments therefore cap record size.
        max_body = min(MAX_RECORD_BODY_BYTES, cfg.segment_size_bytes - 128)
        options = WalOptions(segment_size_bytes=cfg.segment_size_bytes, max_record_body_bytes=max_body)
        self.wal = await self.runtime.run_sync(self._open_wal, options)
        self.writer = GroupCommitWriter(
            self.wal,
            metrics=self.metrics,
            on_rollback=self._on_rollback,
            on_failure=self._on_storage_failed,
            slow_round_s=self.slow_disk_s,
            clock=self.runtime.monotonic,
            inline=self.runtime.inline_writer,
            round_delay_s=self.runtime.disk_delay_s,
        )
        # The writer sets this gauge from WAL rounds alone; the node also knows about a full
        # disk that failed a promise (metadata), so the gauge reports what health reports.
        self.metrics.wal_disk_full.set_function(lambda: float(self.disk_full))
        self.metrics.track_wal_directory(cfg.data_dir)
        self.rlog = ReplicaLog(self.wal, self.writer, on_halt=self._on_halt)
        self.store = EventStore(self.rlog)  # event bodies are read from the log's owner
        async with AsyncExitStack() as stack:
            # The election's own tasks must outlive the node's nursery: enter it first.
            election = await stack.enter_async_context(self._make_election())
            # HTTP runs in a nursery of its own, around everything else: when a failed
            # fdatasync stops the writer, every task that waits on the log fails with it
            # and the inner nursery ends, but the requests in flight still get their answer
            # (503 or 504, see _on_storage_failed) before the node exits.
            async with trio.open_nursery() as outer:
                try:
                    async with trio.open_nursery() as nursery:
                        await self._serve(nursery, outer, election, task_status)
                except BaseException:
                    if self.writer.failure is None:
                        raise
                    with trio.CancelScope(shield=True):
                        await trio.sleep(STORAGE_FAILED_LINGER_S)
                        self._shutdown.set()
                        # Ports that never opened (the disk failed during start-up) have
                        # nothing to drain: waiting for them would only delay the exit.
                        if self._http_started:
                            with trio.move_on_after(self.http_limits.shutdown_grace_s + 1):
                                await self._http_done.wait()
                        self._probes_stop.set()
                        if self._probes_started:
                            with trio.move_on_after(PROBE_STOP_S):
                                await self._probes_done.wait()
                    raise

    async def _serve(
        self,
        nursery: trio.Nursery,
        http_nursery: trio.Nursery,
        election: Election,
        task_status: trio.TaskStatus[Node],
    ) -> None:
        cfg = self.config
        await nursery.start(self.writer.run)
        self.commit.on_advance = self._apply_ready
        nursery.start_soon(self._apply_committed)
        nursery.start_soon(self._expire_waits)
        nursery.start_soon(self._record_commit_forever)
        replicator = await self._start_replicator(election, nursery)
        if not replicator.others:
            # A cluster of one leads as soon as its takeover has written EPOCH_START, a
            # few milliseconds: serve from then on, as the node of one always has. Bounded,
            # so that a node whose disk cannot take that record still answers health.
            with trio.move_on_after(SOLO_LEAD_WAIT_S):
                await replicator.first_writable.wait()
        app = HttpApp(self, metrics=self.metrics, draining=lambda: self.stopping, max_batch_events=cfg.max_batch_events)
        http_done = self._http_done
        probes_stop, probes_done = self._probes_stop, self._probes_done

        async def http(task_status: trio.TaskStatus[int]) -> None:
            try:
                await serve_http(
                    app,
                    host=cfg.http_host,
                    port=cfg.http_port,
                    limits=self.http_limits,
                    shutdown=self._shutdown,
                    task_status=task_status,
                )
            finally:
                http_done.set()

        async def probes(task_status: trio.TaskStatus[int]) -> None:
            try:
                await serve_http(
                    ProbeApp(app),
                    host=cfg.http_host,
                    port=cfg.probe_port or 0,
                    limits=probe_limits(),
                    shutdown=probes_stop,
                    task_status=task_status,
                )
            finally:
                probes_done.set()

        if cfg.probe_port is not None and self.runtime.serve_http:
            self._probes_started = True
            self.probe_port = await http_nursery.start(probes)
        else:
            probes_done.set()
        if self.runtime.serve_http:
            self._http_started = True
            self.http_port = await http_nursery.start(http)
        else:
            http_done.set()  # the simulator calls the service directly
        self.started.set()
        log.info(
            "node %s serving HTTP on %s:%d%s; log %d..%d",
            cfg.node_id,
            cfg.http_host,
            self.http_port,
            f", peers on {cfg.peer_host}:{self.peer_port}" if cfg.clustered else " (single node, no etcd)",
            self.rlog.first_index,
            self.rlog.written_index,
        )
        task_status.started(self)
        await self._shutdown.wait()
        # The client port is draining already (the same event): it stops accepting and
        # returns once the requests in flight have their answers (bounded by its grace
        # period). Meanwhile a leader hands over; then the last batch syncs.
        drained_by = trio.current_time() + self.http_limits.shutdown_grace_s + 1
        await self._hand_over()
        with trio.move_on_after(max(0.0, drained_by - trio.current_time())):
            await http_done.wait()
        with trio.move_on_after(SHUTDOWN_GRACE_S):
            await self.rlog.wait_durable(self.rlog.tail_index)
            await self._record_commit()
        probes_stop.set()
        with trio.move_on_after(PROBE_STOP_S):
            await probes_done.wait()
        nursery.cancel_scope.cancel()

    async def _hand_over(self) -> None:
        """A leader stopping: let its appends in flight be answered, then resign (see the
        module docstring for why in this order)."""
        replicator = self._replicator
        if replicator.role is Role.FOLLOWER:
            return
        started = trio.current_time()
        if self._appends_in_flight:
            self._appends_done = trio.Event()
            with trio.move_on_after(HANDOVER_APPENDS_WAIT_S):
                await self._appends_done.wait()
        if not replicator.others:
            return  # a cluster of one: nobody to hand over to
        waited = trio.current_time() - started
        still = self._appends_in_flight
        resigned = False
        with trio.move_on_after(HANDOVER_RESIGN_S):
            resigned = await replicator.resign_now()
        if not resigned:
            log.warning("stopping: the leadership was not resigned (waited %.0f ms for appends)", 1000 * waited)
            return
        resigned_at = trio.current_time()
        log.info(
            "stopping: resigned the leadership after %.0f ms (%d appends still in flight)",
            1000 * (resigned_at - started),
            still,
        )
        me = self.config.node_id
        with trio.move_on_after(HANDOVER_SETTLE_S):
            while True:
                now = trio.current_time()
                successor = replicator.leader_id
                if successor not in (None, me) and now - max(self._last_refused_at, resigned_at) >= FORWARD_QUIET_S:
                    break
                await trio.sleep(HANDOVER_POLL_S)
        log.info(
            "stopping: successor %s; no write forwarded here for %.0f ms",
            replicator.leader_id,
            1000 * (trio.current_time() - max(self._last_refused_at, resigned_at)),
        )

    def shutdown(self) -> None:
        self.stopping = True
        self._shutdown.set()

    async def run_until_signalled(self) -> None:
        """``walstore serve``: SIGTERM/SIGINT stop the node gracefully (exit 0)."""
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        self.shutdown()
                        return

            nursery.start_soon(on_signal)
            await self.run()
            nursery.cancel_scope.cancel()

    def _open_wal(self, options: WalOptions) -> WriteAheadLog:
        if self._real_disk:
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
        return WriteAheadLog.open(self.config.data_dir, options, fs=self._space)

    def _make_election(self) -> Election:
        if self._election is not None:
            return self._election
        if not self.config.clustered:
            # Every grant above anything this log has promised or written (LocalElection).
            rlog = self.rlog
            return LocalElection(self.config.node_id, lambda: max(rlog.promised_epoch, rlog.tail_epoch) + 1)
        from walstore.election.etcd import EtcdElection

        # etcd leases are whole seconds.
        return EtcdElection(
            list(self.config.etcd_endpoints),
            self.config.cluster_id,
            ttl_s=max(1, math.ceil(self.config.lease_ttl_s)),
        )

    async def _start_replicator(self, election: Election, nursery: trio.Nursery) -> Replicator:
        # Entries up to the recorded commit index were committed when we learned it, and
        # are never truncated: they can be applied before any leader is heard from.
        self.commit.advance(self.rlog.known_commit)
        http_host = self.config.me.host if self.config.me else "localhost"
        self.replicator = Replicator(
            self.config,
            self.rlog,
            self.commit,
            election,
            self.metrics,
            append_local=self._append_forwarded,
            on_term_end=self._on_term_end,
            http_address=f"{http_host}:{self.config.http_port}",
            applied=self.applied,
        )
        self.peer_port = await nursery.start(self.replicator.run)
        return self.replicator

    @property
    def _replicator(self) -> Replicator:
        if self.replicator is None:  # not assert: it must hold under -O too
            raise RuntimeError("the node has not started")
        return self.replicator

    # -- commit and apply ------------------------------------------------------------------

    async def _apply_committed(self) -> None:
        while True:
            target = self.applied.value + 1
            await self.commit.wait_for(target)
            if self.commit.value < target:
                continue  # interrupted: a term ended; keep waiting
            if self.rlog.written_index < target:
                # Committed on a majority before our own fsync, or after our copy was lost
                # (a leader whose disk filled up): wait for the entries to be here.
                if self.rlog.tail_index < target:
                    await self.rlog.wait_tail_moved()
                    continue
                try:
                    await self.rlog.wait_durable(target)
                except (Truncated, DiskFullError):
                    continue  # rolled back or truncated meanwhile; look again
            self._apply_now(min(self.commit.value, self.rlog.written_index, target + APPLY_CHUNK_RECORDS - 1))
            await trio.lowlevel.checkpoint()

    def _apply_ready(self, commit: int) -> None:
        """``commit.on_advance``: a leader's own appends that are committed and in our log
        are applied right here, from memory (``EventStore.apply_own``). Whatever must be
        read back from the log is left to the applier task: a read error there stops the
        node, as it should, not the replication task that happened to move the commit."""
        upto = min(commit, self.rlog.written_index)
        if upto > self.store.last_applied_log_index and self.store.apply_own(upto):
            self._publish_applied()

    async def _record_commit_forever(self) -> None:
        """Keep meta.json's commit index (what no truncation may cut) close behind the
        commit index: one small fsync'd file write per interval at most, never per entry."""
        while True:
            await trio.sleep(COMMIT_RECORD_INTERVAL_S)
            try:
                await self._record_commit()
            except DiskFullError as exc:
                log.warning("cannot record the commit index in meta.json: %s", exc)

    async def _record_commit(self) -> None:
        # Only what is durable here: on a leader the commit index can run ahead of its disk.
        index = min(self.commit.value, self.rlog.durable_index, self.rlog.written_index)
        if index > self.rlog.known_commit:
            await self.rlog.persist_commit(index)

    def _on_halt(self, reason: str) -> None:
        """``ReplicaLog.halt``: a safety invariant was about to break. Stop taking writes
        (the replica refuses APPENDs, a leader steps down and never campaigns again);
        keep serving reads and health so that an operator can look."""
        self.metrics.safety_halted.set(1)
        self._replicator.step_down(f"the log halted: {reason}")

    async def _expire_waits(self) -> None:
        """The append timeout, for every waiting append at once (see ``watermark``): a
        wait may end up to one tick late, a twentieth of the timeout."""
        tick = min(1.0, max(0.01, self.append_timeout_s / 20))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            self.commit.expire(now)
            self.applied.expire(now)

    def _apply_now(self, upto: int) -> None:
        store = self.store
        if upto > store.last_applied_log_index:
            store.apply_own(upto)  # a leader's own appends: from memory, not read back
            first = store.last_applied_log_index + 1
            if upto >= first:
                store.rebuild(self.rlog.records_to_apply(first, upto))
        self._publish_applied()

    def _publish_applied(self) -> None:
        self.applied.advance(self.store.last_applied_log_index)
        self.applied_events.advance(self.store.last_applied_event_index)

    def _on_term_end(self) -> None:
        self.store.pending_clear()
        # Appends waiting for a commit of this term: outcome unknown (they wait on applied).
        self.commit.interrupt()
        self.applied.interrupt()

    def _on_rollback(self, first_failed_index: int) -> None:
        """The writer dropped every batch from ``first_failed_index`` (disk full): runs in
        the writer task before anyone else can prepare, so the tentative state and the
        log's tail move back together."""
        self.store.pending_clear()
        self.rlog.rolled_back()
        self.applied.interrupt()  # alone: appends waiting to be applied look at their batch
        self.applied_events.interrupt()  # a forward's read-your-writes wait: it cannot be applied here now
        replicator = self._replicator
        if replicator.role is not Role.FOLLOWER and replicator.others:
            # Followers may already hold the failed records: reusing their indexes in this
            # epoch would break log matching. Step down; the next leader sorts it out. A
            # cluster of one keeps leading: nobody else saw them.
            log.error("disk full on the leader: stepping down")
            replicator.step_down("disk full on the leader")

    def _on_storage_failed(self, error: StorageError) -> None:
        """The writer stopped for good (a failed fdatasync; never retried): runs in the event
        loop once every batch it held has failed. An expected outcome of a bad disk, so one
        line and no traceback; the node exits once the requests in flight are answered.
        Appends waiting for their commit are woken now: none of them can be applied here any
        more, and each answers 504 (it was submitted, so it may be on disk or on followers)."""
        log.critical("write-ahead log failed, the node stops: %s: %s", type(error).__name__, error)
        self.commit.interrupt()
        self.applied.interrupt()
        self.applied_events.interrupt()  # min_index reads: nothing more will be applied here

    def _stop_on_broken_invariant(self, exc: LogStateError) -> None:
        """A bug: the node stops through the writer, as on a failed fdatasync (health,
        metrics, one CRITICAL line, the exit), rather than answer 500 and carry on."""
        if self.writer.failure is None:
            self.writer.stop_for_fault(exc)

    def _storage_read_error(self, exc: StorageError) -> Exception:
        """What a read that failed on the log answers. After a failed fdatasync, or rot
        found by a read (ReplicaLog stops the writer with it), the log refuses every call:
        an expected 503 on a stopping node. A broken invariant stops the node the same way."""
        if isinstance(exc, LogStateError):
            self._stop_on_broken_invariant(exc)
        failure = self.writer.failure
        return write_admission.storage_failed(failure) if failure is not None else exc

    # -- EventService ------------------------------------------------------------------------

    def _admit(self, *, forwarded: bool) -> Lead | Forward[PeerSpec] | Refuse:
        """Where a write goes now (``write_admission.admit`` on this node's state)."""
        r = self._replicator
        leading = r.writable
        # Every append asks: what a branch does not read is not computed (a leader reads
        # neither whom to forward to nor its disk's fullness here; a follower no quorum).
        quorum = leading and r.has_quorum()
        return write_admission.admit(
            forwarded=forwarded,
            log_failure=self.writer.failure,
            stopping=self.stopping,
            halted=self.rlog.halted,
            leading=leading,
            lease_valid=leading and r.still_leading(),
            quorum=quorum,
            quorum_report=r.quorum_report() if leading and not quorum else "",
            leader_id=r.leader_id,
            leader=None if leading else r.leader_peer(),
            disk_full=not leading and self.disk_full,
        )

    async def append(self, events: Sequence[NewEvent], tracking: Tracking | None = None) -> list[AppendResult]:
        admission = self._admit(forwarded=False)
        if isinstance(admission, Refuse):
            raise admission.error
        if isinstance(admission, Lead):
            return await self._lead_append(list(events), tracking)
        # A lease TTL, not the append timeout: a leader that has not answered by then is
        # paused, cut off or failing over, and it resigns within that time when it cannot
        # reach a majority (Replicator._quorum_grace_s); waiting longer only holds the
        # client while another leader may already be serving.
        forward_s = self.config.lease_ttl_s
        deadline = trio.current_time() + forward_s
        try:
            results: list[AppendResult] = await self._replicator.forwarder.forward(
                admission.leader, events, forward_s, tracking=tracking
            )
        except UnavailableError as exc:
            refused = write_admission.forward_refused(exc, self.disk_full)
            if refused is exc:
                raise
            raise refused from exc
        # Read-your-writes on this node too: wait (briefly) until the batch is applied here,
        # within the same TTL, or a heartbeat interval (TTL/8) past a late answer: the
        # commit reaches us with the leader's next frame. If it does not, our link from the
        # leader is down; the write, which the leader did acknowledge, is answered anyway.
        # Not at all while our own log cannot take records (disk full): they will not
        # arrive in time, and the write is already committed on the leader.
        target = max((r.index for r in results), default=0)
        with trio.move_on_at(max(deadline, trio.current_time() + forward_s / 8)):
            while self.applied_events.value < target and not self.writer.disk_full:
                await self.applied_events.wait_for(target)
        return results

    async def _append_forwarded(self, events: list[NewEvent], tracking: Tracking | None = None) -> list[AppendResult]:
        """A write a follower forwarded to us: taken only in a term we lead; a stopping
        leader refuses it (definite: nothing written) and notes when, so it resigns only
        once its followers have stopped sending (_hand_over)."""
        admission = self._admit(forwarded=True)
        if isinstance(admission, Refuse):
            if admission.error.code == "shutting_down":
                self._last_refused_at = trio.current_time()
            raise admission.error
        return await self._lead_append(events, tracking)

    async def _lead_append(self, events: list[NewEvent], tracking: Tracking | None) -> list[AppendResult]:
        # Admitted just now, with no await since: this node leads a term that takes
        # writes. Counted, so a stopping leader resigns once each has its answer.
        self._appends_in_flight += 1
        try:
            return await self._append_in_term(events, tracking)
        except LogStateError as exc:
            # The batch may have been submitted already: its outcome is unknown, not a
            # definite failure.
            self._stop_on_broken_invariant(exc)
            raise OutcomeUnknown(f"this node stopped on a broken invariant: {exc}") from exc
        finally:
            self._appends_in_flight -= 1
            if not self._appends_in_flight and self._appends_done is not None:
                self._appends_done.set()

    async def _append_in_term(self, events: list[NewEvent], tracking: Tracking | None) -> list[AppendResult]:
        replicator = self._replicator
        try:
            prepared = self.store.prepare(
                events,
                timestamp_us=self.runtime.wall_time_ns() // 1000,
                next_log_index=self.rlog.tail_index + 1,
                tracking=tracking,
                max_events=self.config.max_batch_events,
            )
        except NotCaughtUp as exc:  # the log holds entries not applied yet (a new term)
            raise UnavailableError(f"catching up: {exc}", code="not_caught_up", retry_after_s=0.2) from exc
        own: PendingAppend | None = None
        if prepared.bodies:
            entries = prepared.records()
            pending = replicator.submit(entries)
            self.store.pending_added(pending.first_index, prepared)
            self.metrics.events_appended_total.inc(len(entries) - (entries[-1][0] != KIND_EVENT))
            if not replicator.others:
                own = pending  # alone, a rollback of its batch is definite: nobody else has it
        # With new records, wait_log_index is the last of them (pending.last_index).
        await self._wait_applied(prepared.wait_log_index, own, ours=bool(prepared.bodies))
        if prepared.bodies and not replicator.still_leading():
            # Checked again right before answering: a pause (GC, SIGSTOP) may have outlived
            # the lease since the commit was seen.
            raise OutcomeUnknown("leadership lost before the answer; the write is committed")
        try:
            return self.store.results(prepared)
        except EntriesReplaced as exc:  # our records were replaced by another leader's
            raise OutcomeUnknown(f"the batch's log entries were replaced: {exc}") from exc

    async def _wait_applied(self, index: int, own: PendingAppend | None = None, *, ours: bool = False) -> None:
        """Until ``index`` is applied; OutcomeUnknown after the append timeout.

        ``ours``: the records up to ``index`` are this leader's, still to be committed. A
        commit is applied the moment it is seen (``_apply_ready``), so waiting on
        ``applied`` alone wakes the append once, not for the commit and again a scheduler
        pass later for the applier (each ~0.5-1.3 ms on a busy leader at 16 connections).
        A term's end interrupts the wait (``_on_term_end``): not committed by then is 504
        at once. ``own``: a single node's batch, whose disk-full rollback also wakes this
        wait (``_on_rollback``) and is answered 503, as nothing of it was written."""
        if self.applied.value >= index:
            return
        deadline = trio.current_time() + self.append_timeout_s
        woken = False
        while True:
            answer = pending_write.verdict(
                index=index,
                applied=self.applied.value,
                commit=self.commit.value,
                committing=ours,
                own_failure=own.error if own is not None else None,
                log_failure=self.writer.failure,
                past_deadline=trio.current_time() >= deadline,
                woken=woken,
            )
            if answer is pending_write.Wait.APPLIED:
                return
            if isinstance(answer, UnavailableError):
                raise answer
            await self.applied.wait_for(index, deadline)
            woken = True

    async def _wait_for_event_index(self, min_index: int | None) -> None:
        if not min_index:
            return
        with trio.move_on_after(MAX_READ_WAIT_S):
            while self.applied_events.value < min_index and self.writer.failure is None:
                await self.applied_events.wait_for(min_index)
        failure = self.writer.failure
        if self.applied_events.value < min_index and failure is not None:
            raise write_admission.storage_failed(failure)
        if self.applied_events.value < min_index:
            raise UnavailableError(
                f"index {min_index} is not applied on this node yet (applied {self.applied_events.value})",
                code="not_caught_up",
            )

    async def read_aggregate(
        self, aggregate_id: str, *, from_version: int, limit: int, direction: Direction, min_index: int | None
    ) -> AggregateRead:
        await self._wait_for_event_index(min_index)
        try:
            return self.store.read_aggregate(aggregate_id, from_version, limit, direction)
        except StorageError as exc:
            raise self._storage_read_error(exc) from exc

    async def read_log(
        self,
        *,
        from_index: int,
        limit: int,
        min_index: int | None,
        direction: Direction = "forward",
        types: Collection[str] | None = None,
        aggregate_prefix: str | None = None,
    ) -> LogRead:
        await self._wait_for_event_index(min_index)
        try:
            return self.store.read_log(
                from_index, limit, direction=direction, types=types, aggregate_prefix=aggregate_prefix
            )
        except StorageError as exc:
            raise self._storage_read_error(exc) from exc

    async def subscribe(
        self, *, from_index: int, types: Collection[str] | None = None, aggregate_prefix: str | None = None
    ) -> AsyncIterator[StoredEvent | Checkpoint]:
        if from_index < 0:
            raise ValidationError("from_index must be >= 0")
        store = self.store

        def read(next_index: int) -> LogRead:
            try:
                return store.read_log(next_index, SUBSCRIBE_PAGE_EVENTS, types=types, aggregate_prefix=aggregate_prefix)
            except StorageError as exc:
                raise self._storage_read_error(exc) from exc

        filtered = types is not None or bool(aggregate_prefix)
        async for item in subscription(read, self.applied_events.wait_for, max(from_index, 1), filtered=filtered):
            yield item

    @property
    def disk_full(self) -> bool:
        """This node's disk refused the last write it was asked for: a WAL round (the
        writer's own flag) or the metadata file, unless a WAL round succeeded since."""
        if self.writer.disk_full:
            return True
        full_at = self._space.full_at
        return full_at is not None and full_at > self.writer.last_ok_round_at

    def storage_not_ready(self) -> list[str]:
        """What this node's own disk says against taking traffic: ``storage_failed`` (the
        writer stopped; the node is exiting), ``disk_full``, ``slow_disk`` (a round in flight
        longer than slow_disk_s, or one that took longer and returned less than
        SLOW_DISK_HOLD_S ago)."""
        if not self.started.is_set():
            return []
        w = self.writer
        if w.failure is not None:
            return ["storage_failed"]
        reasons = []
        if self.disk_full:
            reasons.append("disk_full")
        now = self.runtime.monotonic()
        slow_now = w.round_in_flight_s(now) > self.slow_disk_s
        slow_lately = w.last_round_s > self.slow_disk_s and now - w.last_round_ended_at < SLOW_DISK_HOLD_S
        if slow_now or slow_lately:
            reasons.append("slow_disk")
        return reasons

    async def consumer_position(self, consumer: str, *, min_index: int | None = None) -> int | None:
        await self._wait_for_event_index(min_index)
        return self.store.consumer_position(consumer)

    def status(self) -> NodeStatus:
        store = self.store
        commit_events = (
            store.log_to_event_index(min(self.commit.value, self.applied.value)) if self.started.is_set() else 0
        )
        extra: dict[str, object] = {
            "log_commit_index": self.commit.value,
            "log_last_applied": self.applied.value,
            "log_durable_index": self.rlog.durable_index if self.started.is_set() else 0,
            "promised_epoch": self.rlog.promised_epoch if self.started.is_set() else 0,
            "incarnation": self.rlog.incarnation if self.started.is_set() else None,
            "known_commit_index": self.rlog.known_commit if self.started.is_set() else 0,
            "safety_halt": self.rlog.halted if self.started.is_set() else None,
            "aggregates": store.aggregate_count if self.started.is_set() else 0,
            "http_port": self.http_port,
            "peer_port": self.peer_port,
            "probe_port": self.probe_port,
        }
        # Why not ready, most fundamental first; ready is "no reason". The disk's own reasons
        # count on every role: a follower with a full disk falls behind while it would
        # otherwise look caught up, and a leader with a stalled fsync holds every write.
        reasons = self.storage_not_ready()
        if self.started.is_set() and self.rlog.halted is not None:
            reasons.insert(0, "safety_halt")
        if self.stopping:
            reasons.insert(0, "stopping")
        if not self.started.is_set():
            reasons.insert(0, "starting")
        extra["not_ready"] = reasons
        r = self.replicator
        if r is None:  # still opening its log
            return NodeStatus(
                id=self.config.node_id,
                is_leader=False,
                leader_id=None,
                term=0,
                commit_index=0,
                last_applied=0,
                role=Role.FOLLOWER.value,
                ready=False,
                healthy=not self.stopping,
                extra=extra,
            )
        peers = []
        progress = {p.peer.node_id: p for p in r.peer_progress()}
        # Only the leader knows how far each peer is; a follower lists none.
        for peer in r.others if r.role.value == "leader" else []:
            p = progress.get(peer.node_id)
            match = p.match_index if p else 0
            peers.append(
                PeerStatus(
                    id=peer.node_id,
                    address=peer.address,
                    connected=bool(p and p.connected),
                    match_index=match,
                    lag=max(0, self.rlog.tail_index - match) if p else -1,
                    voter=bool(p and p.voter),
                )
            )
        caught_up = self.applied.value >= self.commit.value and self.commit.value > 0
        extra["voter"] = r.votes
        if self.writer.failure is not None:
            pass  # the node is exiting: whom it follows says nothing more
        elif r.leader_id is None:
            reasons.append("no_leader")
        elif not caught_up:
            reasons.append("not_caught_up")
        return NodeStatus(
            id=self.config.node_id,
            is_leader=r.writable,
            leader_id=r.leader_id,
            term=r.epoch,
            commit_index=commit_events,
            last_applied=store.last_applied_event_index,
            role=r.role.value,
            ready=not reasons,
            healthy=not self.stopping and self.writer.failure is None,
            peers=peers,
            extra=extra,
        )
