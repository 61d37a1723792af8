"""One node's part in the cluster: the replica core's trio shell, and everything it starts.

The core (``replica_core.ReplicaCore``, sans-IO) decides every step of a term from the
events it is fed; this module feeds it (the election won, the member records read, the
takeover's outcome, the lease lost, a newer leader seen) and carries out the actions it
returns (ask the peers, submit the EPOCH_START, start the term's tasks, wait for the
commit, watch the quorum, promote a learner, end the term, stop the node).

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

import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

import orjson
import trio

from walstore.config import Config, PeerSpec
from walstore.election.base import SAFETY_MARGIN_FRACTION, Candidate, Election, LeaderInfo, Leadership
from walstore.election.membership import Member, counts, promote, register
from walstore.errors import ElectionError, UnavailableError, WalstoreError
from walstore.event import AppendResult, NewEvent, Tracking
from walstore.metrics import Metrics
from walstore.protocol import Forward, Message
from walstore.replication import replica_events as ev
from walstore.replication import rules
from walstore.replication.follower import FollowerService
from walstore.replication.forward import Forwarder, serve_forwards
from walstore.replication.leader import LeaderTerm
from walstore.replication.leader_core import LeaderCore
from walstore.replication.progress import FollowerProgress
from walstore.replication.promises import Superseded
from walstore.replication.replica_core import Phase, ReplicaCore
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.roles import Role, Roles
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
        # The replica's state: role, epoch won, writable, who leads, the leader core of
        # the term we lead, the member records, and the follower side's core.
        self.core = ReplicaCore(config.node_id, rlog, lambda: commit.value, followers=self.others)
        self.follower = FollowerService(
            rlog, commit, verify_leader=self._verify_leader, on_leader_seen=self._on_leader_seen, replica=self.core
        )
        self.forwarder = Forwarder(node_id=config.node_id, cluster_id=config.cluster_id, epoch=self._epoch)
        self._stop_leading: trio.CancelScope | None = None  # the term's, while it lasts
        self._term_nursery: trio.Nursery | None = None
        self._epoch_start: PendingAppend | None = None  # this term's EPOCH_START
        self.peer_port = 0
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
                self._feed_now(ev.LeaderObserved(leader))

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
        self._feed_now(ev.LeaderSeen(leader_id, epoch))

    def _on_higher_epoch(self, epoch: int, peer_id: str) -> None:
        # A peer's word alone never deposes us (it could be confused or hostile): ask
        # the election. A real newer leader means our lease is gone, and `lost` fires.
        log.warning("%s reports epoch %d above ours (%d); checking the election", peer_id, epoch, self.epoch)
        self._feed_now(ev.ElectionNames(self.election.current_leader()))

    def step_down(self, reason: str = "asked to step down") -> None:
        """End the term we lead, if any; no append is submitted in it from now on."""
        self._feed_now(ev.StepDownRequested(reason))

    async def resign_now(self) -> bool:
        """For a node that is stopping: end the term and give up the etcd leadership at
        once, so that another node is elected now rather than when this one exits (or its
        lease runs out). False if it did not lead. The campaign loop ends the term and
        resigns too; resigning twice is harmless."""
        leadership = self.leadership
        if self.role is Role.FOLLOWER or leadership is None:
            return False
        self.stopping = True  # and never campaign again: the node is going
        self.step_down("the node is stopping")
        await self.election.resign(leadership)
        return True

    # -- membership ----------------------------------------------------------------------

    @property
    def members(self) -> dict[str, Member]:
        """The member records as last read."""
        return self.core.members

    @property
    def votes(self) -> bool:
        """This node's data directory is recorded as a voter (as last read)."""
        return self.core.votes_self

    def _set_members(self, members: dict[str, Member]) -> None:
        """A read outside the term's own steps (registration, a learner's wait)."""
        self._feed_now(self._read(members))

    def _read(self, members: dict[str, Member]) -> ev.MembersRead:
        """``members`` as just read, as the core's event (and the voter metric)."""
        self.metrics.voter.set(1 if counts(members, self.config.node_id, self.rlog.incarnation) else 0)
        return ev.MembersRead(members)

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

    async def _maintain_members(self) -> None:
        """Leader: keep the voter view fresh, and promote learners that have caught up
        (the core says whom; ``_carry_out`` asks etcd)."""
        while True:
            await trio.sleep(MEMBER_REFRESH_S)
            try:
                members = await self.election.read_members()
            except ElectionError as exc:
                log.debug("reading member records: %s", exc)
                continue
            await self._carry_out_all(self.core.on(self._read(members)))

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
        """One term, from the election won to its end: the core says each step, this
        carries it out and feeds back what came of it."""
        self.leadership = leadership
        log.info("won the election with epoch %d; taking over", leadership.epoch)
        with trio.CancelScope() as scope:
            self._stop_leading = scope
            async with trio.open_nursery() as nursery:
                self._term_nursery = nursery

                async def end_when_lost() -> None:
                    await leadership.lost.wait()
                    self._feed_now(ev.LeaseLost(leadership.lost_reason or "lost"))

                nursery.start_soon(end_when_lost)
                await self._carry_out_all(self.core.on(ev.Won(leadership.epoch, leadership.info)))
                # Only an ended term runs out of steps (EndTerm cancelled the scope: the
                # nursery's exit ends its tasks); anything else left the term half done.
                if self.core.phase is not Phase.ENDING:
                    raise rules.broken(
                        f"the term of epoch {leadership.epoch} ran out of steps while {self.core.phase.value}"
                    )

    async def _carry_out_all(self, actions: list[ev.Action]) -> None:
        """Carry out ``actions`` in order, and whatever the core asks for as their
        outcomes come back."""
        queue = collections.deque(actions)
        while queue:
            event = await self._carry_out(queue.popleft())
            if event is not None:
                queue.extend(self.core.on(event))

    async def _carry_out(self, action: ev.Action) -> ev.Event | None:
        """Do ``action``; the event that says how it came out, if it has one."""
        match action:
            case ev.ReadMembers():
                try:
                    return self._read(await self.election.read_members())
                except ElectionError as exc:
                    return ev.TakeoverRaised(exc)
            case ev.TakeOver(epoch, members):
                try:
                    await take_over(
                        epoch=epoch,
                        node_id=self.config.node_id,
                        cluster_id=self.config.cluster_id,
                        peers=self.others,
                        rlog=self.rlog,
                        commit=self.commit,
                        timeout_s=self.config.lease_ttl_s,
                        members=members,
                    )
                except (Superseded, WalstoreError, PeerClosed, OSError, trio.TooSlowError) as exc:
                    return ev.TakeoverRaised(exc)
                return ev.TakenOver()
            case ev.SubmitEpochStart(epoch):
                body = orjson.dumps({"epoch": epoch, "leader": self.config.node_id})
                self._epoch_start = self.rlog.submit([(KIND_EPOCH_START, 0, body)], epoch)
                self.metrics.append_times.clear()
                self.metrics.append_times.appended(self._epoch_start.first_index)
                return ev.EpochStartSubmitted(self._epoch_start.first_index)
            case ev.StartTerm(core):
                self._start_term(core)
                return None
            case ev.AwaitApplied(index):
                while self.commit.value < index:
                    await self.commit.wait_for(index)
                # Validation needs the whole log applied: wait for our EPOCH_START to be.
                await self.applied.wait_for(index)
                return ev.EpochStartApplied(index)
            case ev.Writable(epoch, index):
                self.first_writable.set()
                log.info("leading epoch %d from index %d", epoch, index)
                return None
            case ev.WatchQuorum():
                return await self._watch_quorum()
            case ev.Promote(member, epoch, commit):
                return await self._promote(member, epoch, commit)
        self._carry_out_now(action)
        return None

    def _feed_now(self, event: ev.Event) -> None:
        """An event from outside the term's steps (another task, a callback)."""
        for action in self.core.on(event):
            self._carry_out_now(action)

    def _carry_out_now(self, action: ev.Action) -> None:
        """The actions that need no waiting; the core asks for no other outside a term's
        steps."""
        match action:
            case ev.RefreshVoters():
                if self.term is not None:
                    self.term.refresh_voters()
            case ev.EndTerm(reason):
                log.warning("epoch %d: %s", self.leadership.epoch if self.leadership else 0, reason)
                if self._stop_leading is not None:
                    self._stop_leading.cancel()
            case ev.Stop(error):
                raise error
            case _:
                raise rules.broken(f"{type(action).__name__} asked for outside a term's steps")

    def _start_term(self, core: LeaderCore) -> None:
        if self._term_nursery is None or self._epoch_start is None:  # not assert: it must hold under -O too
            raise rules.broken("a term started outside _lead")
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
        self.term.appended(self._epoch_start)
        self._term_nursery.start_soon(self.term.run)
        self._term_nursery.start_soon(self._maintain_members)

    async def _promote(self, member: Member, epoch: int, commit: int) -> ev.Event | None:
        """Record ``member`` as a voter; the member records read again if it worked."""
        try:
            if not await promote(self.election, member, epoch):
                return None  # the record or the leadership changed: look again next time
        except ElectionError as exc:
            log.warning("promoting %s: %s", member.node_id, exc)
            return None
        progress = self.term.progress.get(member.node_id) if self.term is not None else None
        since = progress.learner_since if progress is not None else None
        log.info(
            "%s (incarnation %s) holds everything up to the commit index %d: now a voter (a learner for %.1fs)",
            member.node_id,
            member.incarnation,
            commit,
            trio.current_time() - since if since is not None else 0.0,
        )
        self.metrics.learner_promotions_total.inc()
        try:
            return self._read(await self.election.read_members())
        except ElectionError:
            return None

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

    async def _watch_quorum(self) -> ev.QuorumLost | ev.LeaseDeadlinePassed | ev.LeaseLost:
        """Return once no majority of followers has answered for ``_quorum_grace_s`` (the
        term ends and we resign): a leader cut off from its followers but not from etcd
        would hold the lease forever and the majority could never elect anyone. Return
        at once when the lease deadline passes.

        ev.Event-driven rather than polled: it sleeps until the moment the quorum or the lease
        would run out and looks again, so it is late by a scheduler pass, not a poll
        interval. After a SIGSTOP that moment has long passed when the loop runs again; the
        election backend's keep-alive task sees the same deadline and sets ``lost``, but
        ending the term here too means the waiting requests (interrupted by ``_end_term``)
        never depend on one backend task being scheduled first."""
        leadership, term = self.leadership, self.term
        if leadership is None or term is None:  # not assert: it must hold under -O too
            raise rules.broken("watching the quorum of a term with no leadership")
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
                return ev.QuorumLost(self._quorum_grace_s, self.quorum_report())
            if isinstance(decision, rules.StepDown):
                return ev.LeaseLost(leadership.lost_reason or "lost") if decision.lost else ev.LeaseDeadlinePassed()
            wake_at = decision.at
            await trio.sleep_until(wake_at)

    def _end_term(self, leadership: Leadership) -> None:
        if self.core.in_term:
            self.metrics.step_downs_total.inc()
        self._feed_now(ev.TermEnded(self.election.current_leader()))
        self.term = None
        self._stop_leading = None
        self._term_nursery = None
        self._epoch_start = None
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
