"""One node's part in the cluster: the role state machine and everything it starts.

Roles and transitions, in one place (STYLE.md 5):

    FOLLOWER  --campaign won------------------->  TAKEOVER
    TAKEOVER  --majority promised, log adopted->  LEADER (writable once EPOCH_START commits)
    TAKEOVER  --superseded / no quorum / lost-->  FOLLOWER (resign, campaign again)
    LEADER    --lease lost / resigned---------->  FOLLOWER
    LEADER    --peer reports a higher epoch---->  FOLLOWER, if the election agrees
    any       --fdatasync failed--------------->  (the process stops: never retried)

Every node campaigns all the time; etcd picks one. Followers answer the leader's frames
(``FollowerService``) and forward client writes to it (``Forwarder``); the leader streams
its log to every follower (``LeaderTerm``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable

import orjson
import trio

from walstore.config import Config, PeerSpec
from walstore.election.base import Candidate, Election, LeaderInfo, Leadership
from walstore.errors import UnavailableError, WalstoreError
from walstore.event import AppendResult, NewEvent
from walstore.metrics import Metrics
from walstore.protocol import Forward, Message
from walstore.replication.follower import FollowerService
from walstore.replication.forward import Forwarder, serve_forwards
from walstore.replication.leader import FollowerProgress, LeaderTerm
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.takeover import Superseded, take_over
from walstore.replication.transport import PeerChannel, PeerClosed, serve_peers
from walstore.wal.record import FLAG_BATCH_END, KIND_EPOCH_START
from walstore.wal.writer import PendingAppend
from walstore.watermark import Watermark

log = logging.getLogger("walstore.replicator")

# How long a follower waits for the election to confirm a leader that claims a new epoch.
VERIFY_LEADER_TIMEOUT_S = 1.0


class Role(enum.Enum):
    FOLLOWER = "follower"
    TAKEOVER = "candidate"
    LEADER = "leader"


class Replicator:
    def __init__(
        self,
        config: Config,
        rlog: ReplicaLog,
        commit: Watermark,
        election: Election,
        metrics: Metrics,
        *,
        append_local: Callable[[list[NewEvent]], Awaitable[list[AppendResult]]],
        on_term_end: Callable[[], None],
        http_address: str,
        applied: Watermark,
    ) -> None:
        self.config = config
        self.rlog = rlog
        self.commit = commit
        self.applied = applied
        self.election = election
        self.metrics = metrics
        self.append_local = append_local
        self.on_term_end = on_term_end
        me = config.me
        assert me is not None
        self.me = me
        self.others = [p for p in config.peers if p.node_id != config.node_id]
        self.candidate = Candidate(config.node_id, me.address, http_address)
        self.role = Role.FOLLOWER
        self.leader: LeaderInfo | None = None  # who leads, as far as we know
        self.leadership: Leadership | None = None
        self.term: LeaderTerm | None = None
        self.writable = False  # leader whose EPOCH_START has committed
        self.follower = FollowerService(
            rlog, commit, verify_leader=self._verify_leader, on_leader_seen=self._on_leader_seen
        )
        self.forwarder = Forwarder(node_id=config.node_id, cluster_id=config.cluster_id, epoch=self._epoch)
        self._stop_leading: trio.CancelScope | None = None
        self.peer_port = 0

    def _epoch(self) -> int:
        return self.rlog.promised_epoch

    @property
    def epoch(self) -> int:
        return self.leadership.epoch if self.role is Role.LEADER and self.leadership else self.rlog.promised_epoch

    # -- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.peer_port = await nursery.start(
                lambda task_status: serve_peers(
                    self.config.peer_host,
                    self.config.peer_port,
                    cluster_id=self.config.cluster_id,
                    node_id=self.config.node_id,
                    epoch=self._epoch,
                    handler=self._on_connection,
                    on_rejected=lambda reason: self.metrics.peer_connections_rejected_total.labels(reason).inc(),
                    known_peers=frozenset(p.node_id for p in self.others),
                    task_status=task_status,
                )
            )
            nursery.start_soon(self.forwarder.run)
            nursery.start_soon(self._watch_leader)
            nursery.start_soon(self._campaign_forever)
            task_status.started(self.peer_port)

    async def _on_connection(self, channel: PeerChannel) -> None:
        first: Message = await channel.receive()
        if isinstance(first, Forward):
            await serve_forwards(channel, first, self.append_local)
        else:
            await self.follower.serve(channel, first)

    async def _watch_leader(self) -> None:
        async for leader in self.election.watch_leader():
            if self.role is not Role.LEADER:
                self.leader = leader

    async def _verify_leader(self, epoch: int, leader_id: str) -> bool:
        """Does the election say ``leader_id`` holds ``epoch``? Waits briefly for our
        view of etcd to catch up with a leader that has just won."""
        with trio.move_on_after(VERIFY_LEADER_TIMEOUT_S):
            async for leader in self.election.watch_leader():
                if leader is not None and leader.epoch == epoch and leader.node_id == leader_id:
                    return True
                if leader is not None and leader.epoch > epoch:
                    return False
        return False

    def _on_leader_seen(self, epoch: int, leader_id: str) -> None:
        if self.role is not Role.FOLLOWER and leader_id != self.config.node_id and epoch > self.epoch:
            log.warning("leader %s holds epoch %d, above ours: stepping down", leader_id, epoch)
            self.step_down()

    def _on_higher_epoch(self, epoch: int, peer_id: str) -> None:
        # A peer's word alone never deposes us (it could be confused or hostile): ask
        # the election. A real newer leader means our lease is gone, and `lost` fires.
        log.warning("%s reports epoch %d above ours (%d); checking the election", peer_id, epoch, self.epoch)
        leader = self.election.current_leader()
        if leader is not None and leader.epoch > self.epoch:
            self.step_down()

    def step_down(self) -> None:
        # Synchronously: no append may be submitted in this epoch from here on (after a
        # disk-full rollback, new appends would reuse indexes followers already hold).
        self.writable = False
        if self._stop_leading is not None:
            self._stop_leading.cancel()

    async def resign_now(self) -> bool:
        """For a node that is stopping: end the term and give up the etcd leadership at
        once, so that another node is elected now rather than when this one exits (or its
        lease runs out). False if it did not lead. The campaign loop ends the term and
        resigns too; resigning twice is harmless."""
        leadership = self.leadership
        if self.role is Role.FOLLOWER or leadership is None:
            return False
        self.step_down()
        await self.election.resign(leadership)
        return True

    async def _campaign_forever(self) -> None:
        while True:
            leadership = await self.election.campaign(self.candidate)
            self.metrics.elections_total.inc()
            try:
                await self._lead(leadership)
            finally:
                self._end_term(leadership)
                with trio.CancelScope(shield=True):
                    await self.election.resign(leadership)
            # Let another node win before campaigning again (we may be the problem).
            await trio.sleep(self.config.lease_ttl_s / 2)

    async def _lead(self, leadership: Leadership) -> None:
        epoch = leadership.epoch
        self.leadership = leadership
        self.role = Role.TAKEOVER
        self.leader = leadership.info
        log.info("won the election with epoch %d; taking over", epoch)
        with trio.CancelScope() as scope:
            self._stop_leading = scope
            async with trio.open_nursery() as nursery:

                async def cancel_when_lost() -> None:
                    await leadership.lost.wait()
                    log.warning("leadership of epoch %d lost: %s", epoch, leadership.lost_reason)
                    scope.cancel()

                nursery.start_soon(cancel_when_lost)
                try:
                    await take_over(
                        epoch=epoch,
                        node_id=self.config.node_id,
                        cluster_id=self.config.cluster_id,
                        peers=self.others,
                        rlog=self.rlog,
                        commit=self.commit,
                        timeout_s=self.config.lease_ttl_s,
                    )
                except (Superseded, WalstoreError, PeerClosed, OSError, trio.TooSlowError) as exc:
                    # No majority, a newer promise, or the peer we fetch from failed:
                    # resign and campaign again (the log is intact; FsyncError is fatal
                    # elsewhere, in the writer task).
                    log.warning("takeover of epoch %d failed: %r", epoch, exc)
                    scope.cancel()
                    return
                body = orjson.dumps({"epoch": epoch, "leader": self.config.node_id})
                pending = self.rlog.submit([(KIND_EPOCH_START, FLAG_BATCH_END, body)], epoch)
                self.term = LeaderTerm(
                    epoch=epoch,
                    start_index=pending.first_index,
                    node_id=self.config.node_id,
                    cluster_id=self.config.cluster_id,
                    rlog=self.rlog,
                    followers=self.others,
                    commit=self.commit,
                    heartbeat_s=self.config.lease_ttl_s / 8,
                    on_higher_epoch=self._on_higher_epoch,
                    on_progress=self._on_progress,
                )
                self.term.appended(pending)
                self.role = Role.LEADER
                self.metrics.is_leader.set(1)
                self.metrics.term.set(epoch)
                nursery.start_soon(self.term.run)
                while self.commit.value < pending.first_index:
                    await self.commit.wait_for(pending.first_index)
                # Validation needs the whole log applied: wait for our EPOCH_START to be.
                await self.applied.wait_for(pending.first_index)
                self.writable = True
                log.info("leading epoch %d from index %d", epoch, pending.first_index)
                await self._lead_while_quorum(self.term)
                log.warning("epoch %d: no quorum of followers for %.1fs; resigning", epoch, self._quorum_grace_s)
                scope.cancel()

    @property
    def _quorum_grace_s(self) -> float:
        return 2 * self.config.lease_ttl_s

    async def _lead_while_quorum(self, term: LeaderTerm) -> None:
        """A leader cut off from its followers but not from etcd would hold the lease
        forever and the majority could never elect anyone: resign after a grace period."""
        lost_since: float | None = None
        while True:
            await trio.sleep(self.config.lease_ttl_s / 4)
            if term.has_quorum(self.config.lease_ttl_s):
                lost_since = None
            elif lost_since is None:
                lost_since = trio.current_time()
            elif trio.current_time() - lost_since >= self._quorum_grace_s:
                return

    def _end_term(self, leadership: Leadership) -> None:
        if self.role is not Role.FOLLOWER:
            self.metrics.step_downs_total.inc()
        self.role = Role.FOLLOWER
        self.writable = False
        self.term = None
        self._stop_leading = None
        self.leader = self.election.current_leader()
        if self.leader is not None and self.leader.node_id == self.config.node_id:
            self.leader = None
        self.metrics.is_leader.set(0)
        self.on_term_end()

    def _on_progress(self, progress: FollowerProgress) -> None:
        peer = progress.peer.node_id
        self.metrics.replication_match_index.labels(peer).set(progress.match_index)
        self.metrics.replication_lag_entries.labels(peer).set(max(0, self.rlog.tail_index - progress.match_index))

    # -- used by the node ----------------------------------------------------------------

    def submit(self, entries: list[tuple[int, int, bytes]]) -> PendingAppend:
        """Leader only: append ``entries`` in this epoch and ship them to the followers."""
        if not self.writable or self.term is None or self.leadership is None or not self.leadership.is_valid():
            raise UnavailableError("not the leader", code="not_leader", leader_id=self.leader_id)
        if not self.term.has_quorum(self.config.lease_ttl_s):
            # Definite: nothing was written. Better a quick 503 than a 504 after a timeout.
            raise UnavailableError("no quorum of followers reachable", code="no_quorum", leader_id=self.leader_id)
        pending = self.rlog.submit(entries, self.term.epoch)
        self.term.appended(pending)
        return pending

    def still_leading(self) -> bool:
        return self.writable and self.leadership is not None and self.leadership.is_valid()

    @property
    def leader_id(self) -> str | None:
        if self.role is Role.LEADER:
            return self.config.node_id
        return self.leader.node_id if self.leader else None

    def leader_peer(self) -> PeerSpec | None:
        if self.leader is None or self.leader.node_id == self.config.node_id:
            return None
        return next((p for p in self.others if p.node_id == self.leader.node_id), None)

    def peer_progress(self) -> list[FollowerProgress]:
        return list(self.term.progress.values()) if self.term else []
