"""One node's part in the cluster: the role state machine's tasks and everything it starts.

Roles and transitions (docs/architecture.md, "State machines"; the state and its legal
transitions are ``roles.Roles``, sans-IO):

    FOLLOWER  --campaign won------------------->  TAKEOVER
    TAKEOVER  --majority promised, log adopted->  LEADER (writable once EPOCH_START commits)
    TAKEOVER  --superseded / no quorum / lost-->  FOLLOWER (resign, campaign again)
    LEADER    --lease lost / resigned---------->  FOLLOWER
    LEADER    --peer reports a higher epoch---->  FOLLOWER, if the election agrees
    any       --fdatasync failed--------------->  (the process stops: never retried)

Every voter campaigns all the time; etcd picks one. Followers answer the leader's frames
(``FollowerService``) and forward client writes to it (``Forwarder``); the leader streams
its log to every follower (``LeaderTerm``). A cluster of one (no ``others``) runs the same
machine on ``LocalElection``: it wins at once, its takeover asks nobody, and its own
fsync is the majority; it opens no peer port.

Membership (``walstore.election.membership``): at start the node records its data
directory's incarnation in etcd (a new directory of a known member becomes a learner). A
learner never campaigns; it answers APPENDs like any follower. The leader re-reads the
member records every ``MEMBER_REFRESH_S``, counts only voters, and promotes a learner
once it has acknowledged everything up to the leader's commit index. A halted replica
(``ReplicaLog.halt``) steps down and never campaigns again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import orjson
import trio

from walstore import planted_bugs
from walstore.config import Config, PeerSpec
from walstore.election.base import SAFETY_MARGIN_FRACTION, Candidate, Election, LeaderInfo, Leadership
from walstore.election.membership import Member, counts, promote, register
from walstore.errors import ElectionError, UnavailableError, WalstoreError
from walstore.event import AppendResult, NewEvent, Tracking
from walstore.metrics import Metrics
from walstore.protocol import Forward, Message
from walstore.replication import rules
from walstore.replication.follower import FollowerService
from walstore.replication.forward import Forwarder, serve_forwards
from walstore.replication.leader import LeaderTerm
from walstore.replication.progress import FollowerProgress
from walstore.replication.promises import Superseded
from walstore.replication.replica_core import ReplicaCore
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.roles import Role, Roles, TakeoverFailed
from walstore.replication.takeover import take_over
from walstore.replication.transport import PeerChannel, PeerClosed, serve_peers
from walstore.wal.record import KIND_EPOCH_START
from walstore.wal.writer import PendingAppend
from walstore.watermark import Watermark

log = logging.getLogger("walstore.replicator")

# How long a follower waits for the election to confirm a leader that claims a new epoch.
VERIFY_LEADER_TIMEOUT_S = 1.0
# How often the member records are re-read (by a leader, to count and promote; by a
# learner, to learn it may campaign). A read of a few small keys: cheap for etcd.
MEMBER_REFRESH_S = 0.5


class Replicator:
    def __init__(
        self,
        config: Config,
        rlog: ReplicaLog,
        commit: Watermark,
        election: Election,
        metrics: Metrics,
        *,
        append_local: Callable[[list[NewEvent], Tracking | None], Awaitable[list[AppendResult]]],
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
        # A cluster of one (the embedded single node) lists no peers: it is its own member.
        self.me = config.me or PeerSpec(config.node_id, config.peer_host, config.peer_port)
        self.others = [p for p in config.peers if p.node_id != config.node_id]
        self.candidate = Candidate(config.node_id, self.me.address, http_address)
        self.leadership: Leadership | None = None
        self.term: LeaderTerm | None = None
        self.first_writable = trio.Event()  # set the first time this node became writable
        self.follower = FollowerService(
            rlog, commit, verify_leader=self._verify_leader, on_leader_seen=self._on_leader_seen
        )
        # The replica's state: role, epoch won, writable, who leads, and the leader core
        # of the term we lead.
        self.core = ReplicaCore(config.node_id, rlog, lambda: commit.value)
        self.forwarder = Forwarder(node_id=config.node_id, cluster_id=config.cluster_id, epoch=self._epoch)
        self._stop_leading: trio.CancelScope | None = None
        self.peer_port = 0
        self.members: dict[str, Member] = {}  # the member records as last read
        self.registered = trio.Event()  # our incarnation is recorded (voter or learner)
        self.stopping = False  # set by resign_now: a stopping node campaigns no more

    def _epoch(self) -> int:
        return self.rlog.promised_epoch

    @property
    def roles(self) -> Roles:
        return self.core.roles

    @property
    def role(self) -> Role:
        return self.roles.role

    @property
    def writable(self) -> bool:
        """A leader whose EPOCH_START has committed and is applied."""
        return self.roles.writable

    @property
    def leader(self) -> LeaderInfo | None:
        """Who leads, as far as we know."""
        return self.roles.leader

    @property
    def epoch(self) -> int:
        return self.roles.term_epoch if self.role is Role.LEADER else self.rlog.promised_epoch

    # -- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.others:  # a cluster of one has nobody to listen to, or forward to
                await self._serve_peers(nursery)
            nursery.start_soon(self._register)
            nursery.start_soon(self._watch_leader)
            nursery.start_soon(self._campaign_forever)
            task_status.started(self.peer_port)

    async def _serve_peers(self, nursery: trio.Nursery) -> None:
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
                incarnation=self.rlog.incarnation,
                task_status=task_status,
            )
        )
        nursery.start_soon(self.forwarder.run)

    async def _on_connection(self, channel: PeerChannel) -> None:
        first: Message = await channel.receive()
        if isinstance(first, Forward):
            await serve_forwards(channel, first, self.append_local)
        else:
            await self.follower.serve(channel, first)

    async def _watch_leader(self) -> None:
        # aclosing: an iterator left by a return or a cancellation is closed here, not by
        # the garbage collector at some later moment (trio's finaliser then runs it as a
        # task of its own, which makes the simulator's runs depend on the collector).
        async with contextlib.aclosing(self.election.watch_leader()) as leaders:
            async for leader in leaders:
                self.metrics.leader_observed(leader.node_id if leader else None, leader.epoch if leader else 0)
                self.core.observed(leader)

    async def _verify_leader(self, epoch: int, leader_id: str) -> bool:
        """Does the election say ``leader_id`` holds ``epoch``? Waits briefly for our
        view of etcd to catch up with a leader that has just won."""
        with trio.move_on_after(VERIFY_LEADER_TIMEOUT_S):
            async with contextlib.aclosing(self.election.watch_leader()) as leaders:
                async for leader in leaders:
                    if leader is not None and leader.epoch == epoch and leader.node_id == leader_id:
                        return True
                    if leader is not None and leader.epoch > epoch:
                        return False
        return False

    def _on_leader_seen(self, epoch: int, leader_id: str) -> None:
        if self.roles.yields_to(leader_id, epoch):
            log.warning("leader %s holds epoch %d, above ours: stepping down", leader_id, epoch)
            self.step_down()

    def _on_higher_epoch(self, epoch: int, peer_id: str) -> None:
        # A peer's word alone never deposes us (it could be confused or hostile): ask
        # the election. A real newer leader means our lease is gone, and `lost` fires.
        log.warning("%s reports epoch %d above ours (%d); checking the election", peer_id, epoch, self.epoch)
        leader = self.election.current_leader()
        if leader is not None and self.roles.yields_to(leader.node_id, leader.epoch):
            self.step_down()

    def step_down(self) -> None:
        # Synchronously: no append may be submitted in this epoch from here on (after a
        # disk-full rollback, new appends would reuse indexes followers already hold).
        self.core.stop_writes()
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
        self.stopping = True  # and never campaign again: the node is going
        self.step_down()
        await self.election.resign(leadership)
        return True

    # -- membership ----------------------------------------------------------------------

    @property
    def votes(self) -> bool:
        """This node's data directory is recorded as a voter (as last read)."""
        return counts(self.members, self.config.node_id, self.rlog.incarnation)

    def _votes(self, node_id: str, incarnation: str) -> bool:
        return counts(self.members, node_id, incarnation)

    def _set_members(self, members: dict[str, Member]) -> None:
        self.members = members
        self.metrics.voter.set(1 if self.votes else 0)

    async def _register(self) -> None:
        """Record our incarnation (retried until etcd answers: until then nobody counts
        us, which is safe, and we do not campaign)."""
        retry_s = MEMBER_REFRESH_S
        while True:
            try:
                await register(self.election, self.config.node_id, self.rlog.incarnation)
                self._set_members(await self.election.read_members())
                break
            except ElectionError as exc:
                log.warning("cannot record this node's incarnation yet: %s", exc)
                await trio.sleep(retry_s)
                retry_s = min(retry_s * 2, 5.0)
        self.registered.set()

    async def _until_voter(self) -> None:
        """Until this node may campaign: registered, recorded as a voter, not halted, not
        stopping."""
        await self.registered.wait()
        while self.rlog.halted is not None or self.stopping or not self.votes:
            await trio.sleep(MEMBER_REFRESH_S)
            if self.rlog.halted is not None or self.stopping:
                continue
            try:
                self._set_members(await self.election.read_members())
            except ElectionError as exc:
                log.debug("reading member records: %s", exc)
        return

    async def _maintain_members(self, term: LeaderTerm, leadership: Leadership) -> None:
        """Leader: keep the voter view fresh, and promote learners that have caught up."""
        while True:
            await trio.sleep(MEMBER_REFRESH_S)
            try:
                self._set_members(await self.election.read_members())
            except ElectionError as exc:
                log.debug("reading member records: %s", exc)
                continue
            if not self.votes:
                log.warning("this node is no longer recorded as a voter: stepping down")
                self.step_down()
                return
            term.refresh_voters()
            if self.writable:
                await self._promote_caught_up(term, leadership)

    async def _promote_caught_up(self, term: LeaderTerm, leadership: Leadership) -> None:
        for progress in term.progress.values():
            node_id = progress.peer.node_id
            record = self.members.get(node_id)
            if progress.voter or not progress.connected or record is None or record.voter:
                continue
            if record.incarnation != progress.incarnation:
                continue  # not registered yet (or replaced): nothing to promote
            commit = self.commit.value
            if progress.match_index < commit:
                continue
            try:
                promoted = await promote(self.election, record, leadership.epoch)
            except ElectionError as exc:
                log.warning("promoting %s: %s", node_id, exc)
                continue
            if not promoted:
                continue  # the record or the leadership changed: look again next time
            waited = trio.current_time() - progress.learner_since if progress.learner_since is not None else 0.0
            log.info(
                "%s (incarnation %s) holds everything up to the commit index %d: now a voter (a learner for %.1fs)",
                node_id,
                progress.incarnation,
                commit,
                waited,
            )
            self.metrics.learner_promotions_total.inc()
            with contextlib.suppress(ElectionError):
                self._set_members(await self.election.read_members())
            term.refresh_voters()

    # -- leading -------------------------------------------------------------------------

    async def _campaign_forever(self) -> None:
        while True:
            await self._until_voter()
            leadership = await self.election.campaign(self.candidate)
            self.metrics.elections_won_total.inc()
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
        self.core.won(epoch, leadership.info)
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
                    # Read after winning: no promotion by an older leader can land later
                    # (promote() checks the election key's epoch in the same transaction).
                    self._set_members(await self.election.read_members())
                    await take_over(
                        epoch=epoch,
                        node_id=self.config.node_id,
                        cluster_id=self.config.cluster_id,
                        peers=self.others,
                        rlog=self.rlog,
                        commit=self.commit,
                        timeout_s=self.config.lease_ttl_s,
                        members=self.members,
                    )
                except (Superseded, WalstoreError, PeerClosed, OSError, trio.TooSlowError) as exc:
                    if self.roles.after_failed_takeover(exc) is TakeoverFailed.STOP:
                        raise
                    log.warning("takeover of epoch %d failed: %r", epoch, exc)
                    scope.cancel()
                    return
                body = orjson.dumps({"epoch": epoch, "leader": self.config.node_id})
                pending = self.rlog.submit([(KIND_EPOCH_START, 0, body)], epoch)
                self.metrics.append_times.clear()
                self.metrics.append_times.appended(pending.first_index)
                core = self.core.took_over(
                    start_index=pending.first_index,
                    followers=self.others,
                    votes=self._votes,
                    own_epoch_only="commit_older_epoch" not in planted_bugs.active,
                )
                self.term = LeaderTerm(
                    core=core,
                    node_id=self.config.node_id,
                    cluster_id=self.config.cluster_id,
                    rlog=self.rlog,
                    commit=self.commit,
                    heartbeat_s=self.config.lease_ttl_s / 8,
                    on_higher_epoch=self._on_higher_epoch,
                    incarnation=self.rlog.incarnation,
                    max_append_bytes=self.config.replication_frame_bytes,
                )
                self.term.appended(pending)
                nursery.start_soon(self.term.run)
                nursery.start_soon(self._maintain_members, self.term, leadership)
                while self.commit.value < pending.first_index:
                    await self.commit.wait_for(pending.first_index)
                # Validation needs the whole log applied: wait for our EPOCH_START to be.
                await self.applied.wait_for(pending.first_index)
                self.core.became_writable()
                self.first_writable.set()
                log.info("leading epoch %d from index %d", epoch, pending.first_index)
                await self._lead_while_quorum(self.term)
                log.warning(
                    "epoch %d: no quorum of followers for %.1fs (%s); resigning",
                    epoch,
                    self._quorum_grace_s,
                    self.quorum_report(),
                )
                scope.cancel()

    @property
    def _quorum_grace_s(self) -> float:
        # How long a leader may go without answers from a majority of followers. Sized
        # like the lease itself: etcd gives a silent holder a TTL, and we stop acking
        # SAFETY_MARGIN_FRACTION before it runs out, so a leader cut off from its peers is
        # gone as early as a dead one would be and failover stays ~TTL + takeover
        # (it was 2 TTL after a TTL of silence, polled: ~7 s against a 2 s lease). Still
        # 6 heartbeats (TTL/8 apart): one slow follower costs nothing while the other
        # answers, and both must be silent for 0.75 TTL at once.
        return self.config.lease_ttl_s * (1 - SAFETY_MARGIN_FRACTION)

    async def _lead_while_quorum(self, term: LeaderTerm) -> None:
        """Return once no majority of followers has answered for ``_quorum_grace_s`` (the
        caller resigns): a leader cut off from its followers but not from etcd would hold
        the lease forever and the majority could never elect anyone. Step down at once
        when the lease deadline passes.

        Event-driven rather than polled: it sleeps until the moment the quorum or the lease
        would run out and looks again, so it is late by a scheduler pass, not a poll
        interval. After a SIGSTOP that moment has long passed when the loop runs again; the
        election backend's keep-alive task sees the same deadline and sets ``lost``, but
        ending the term here too means the waiting requests (interrupted by ``_end_term``)
        never depend on one backend task being scheduled first."""
        leadership = self.leadership
        if leadership is None:  # not assert: it must hold under -O too
            raise RuntimeError("watching the quorum of a term with no leadership")
        # Learners count here, unlike for commit: a leader that still reaches a learner is
        # how the learner gets caught up and promoted back into a voter majority. In 3
        # nodes no voter majority can form elsewhere meanwhile; in 5, a leader that reaches
        # one voter and one learner holds the lease that three voters cut off from it could
        # otherwise use (a trade-off, docs/membership.md).
        needed = term.core.cluster_size // 2  # followers that make a majority with us (0: alone)
        wake_at = trio.current_time()
        while True:
            decision = rules.watch_quorum(
                now=trio.current_time(),
                deadline=leadership.deadline(),
                lost=leadership.lost.is_set(),
                answered_at=term.core.answered_at(),
                needed=needed,
                grace_s=self._quorum_grace_s,
                stall_s=self.config.lease_ttl_s / 8,  # one heartbeat interval
                planned_wake=wake_at,
            )
            if isinstance(decision, rules.Resign):
                return
            if isinstance(decision, rules.StepDown):
                if not decision.lost:  # else cancel_when_lost says why
                    log.warning("epoch %d: lease deadline passed; stepping down", term.epoch)
                self.step_down()
                await trio.sleep_forever()  # step_down cancelled us: _lead ends here
            wake_at = decision.at
            await trio.sleep_until(wake_at)

    def _end_term(self, leadership: Leadership) -> None:
        if self.core.ended(self.election.current_leader()):
            self.metrics.step_downs_total.inc()
        self.term = None
        self._stop_leading = None
        self.on_term_end()

    # -- used by the node ----------------------------------------------------------------

    def submit(self, entries: list[tuple[int, int, bytes]]) -> PendingAppend:
        """Leader only: append ``entries`` in this epoch and ship them to the followers."""
        # The node admitted the write a moment ago (walstore.write_admission); this is the
        # replicator's own guard, not a second admission.
        if not self.still_leading() or self.term is None:
            raise UnavailableError("not the leader", code="not_leader", leader_id=self.leader_id)
        pending = self.rlog.submit(entries, self.term.epoch)
        self.metrics.append_times.appended(pending.first_index)
        self.term.appended(pending)
        return pending

    def has_quorum(self) -> bool:
        """Leader: a majority of voters answered within a lease (a write taken without one
        would wait its whole timeout for a commit that cannot come)."""
        return self.core.has_quorum(now=trio.current_time(), within_s=self.config.lease_ttl_s)

    def quorum_report(self) -> str:
        """Each follower as the quorum sees it, for a refusal's message."""
        return self.core.quorum_report(now=trio.current_time())

    def still_leading(self) -> bool:
        return self.writable and self.leadership is not None and self.leadership.is_valid()

    @property
    def leader_id(self) -> str | None:
        return self.roles.leader_id

    def leader_peer(self) -> PeerSpec | None:
        if self.leader is None or self.leader.node_id == self.config.node_id:
            return None
        return next((p for p in self.others if p.node_id == self.leader.node_id), None)

    def peer_progress(self) -> list[FollowerProgress]:
        return list(self.term.progress.values()) if self.term else []
