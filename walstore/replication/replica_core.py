"""One node's replica state as one sans-IO state machine: the role machine, the term this
node leads, the member records it counts by and the follower side, driven by events and
answering with actions.

``ReplicaCore.on(event)`` takes what happened (``replica_events``: the election won, the
member records read, the takeover done or failed, our EPOCH_START submitted or applied,
the lease lost, a newer leader seen, the quorum gone) and returns what to do next, in
order (ask the peers, submit the EPOCH_START, start the term, take writes, end the term,
stop the node). The trio shell (``replicator.py``) carries the actions out and feeds each
one's outcome back as the next event; it decides nothing. What the core owns:

- the role machine (``roles.Roles``: role, epoch won, writable, who leads), and the
  *phase* of the term it leads, which says which event comes next;
- the term's leader core (``leader_core.LeaderCore``: followers, voters, commit index),
  created when our EPOCH_START is submitted and dropped when the term ends;
- the member records as last read, and so who votes (``membership.counts``) and which
  learner a leader promotes;
- the follower side's core (``follower_core.FollowerCore``): another leader's request
  goes through ``handle``, which checks every step of it against the term.

A sequence event the phase does not expect is a broken invariant (the shell asked for
nothing of the kind), except while the term is ending: then an answer that was already on
its way is dropped. ``check`` states the invariants between the parts and runs after every
event and every step of a follower request, in production; the simulator also checks it
as it samples a run.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Protocol

from walstore import planted_bugs
from walstore.config import PeerSpec
from walstore.election.membership import Member, counts
from walstore.protocol import Message
from walstore.replication import replica_events as ev
from walstore.replication import rules
from walstore.replication.follower_core import (
    Answer,
    CutAfter,
    FollowerCore,
    FollowerLog,
    Handling,
    Link,
    WriteRecords,
    advance,
)
from walstore.replication.leader_core import LeaderCore
from walstore.replication.roles import Role, Roles, TakeoverFailed


class PromisedLog(FollowerLog, Protocol):
    """What the replica core reads of the local log (``ReplicaLog`` is one)."""

    @property
    def incarnation(self) -> str: ...


class Phase(enum.Enum):
    """Where the term this node leads stands: which event comes next."""

    IDLE = "idle"  # no term: a follower
    READING_MEMBERS = "reading members"  # won; the member records are being read
    TAKING_OVER = "taking over"  # asking the peers to promise
    SUBMITTING = "submitting"  # a majority promised; our EPOCH_START goes to the log
    COMMITTING = "committing"  # the term runs; our EPOCH_START is not yet applied
    LEADING = "leading"  # writable, the quorum watched
    ENDING = "ending"  # the term was told to end; its tasks are going


class ReplicaCore:
    """``log``: the node's log as the core reads it; ``commit``: the node's commit index;
    ``followers``: the other members of the cluster (none: a cluster of one)."""

    def __init__(
        self, node_id: str, log: PromisedLog, commit: Callable[[], int], *, followers: Iterable[PeerSpec] = ()
    ) -> None:
        self.log = log
        self.commit = commit
        self.followers = tuple(followers)
        self.roles = Roles(node_id)
        self.phase = Phase.IDLE
        self.leader: LeaderCore | None = None  # the term this node took over, while it lasts
        self.members: dict[str, Member] = {}  # the member records as last read
        self.follower = FollowerCore(log, commit)  # the side that answers other leaders

    # -- the one input -----------------------------------------------------------------

    def on(self, event: ev.Event) -> list[ev.Action]:
        """What to do, in order, now that ``event`` happened."""
        actions = self._on(event)
        self.check()
        return actions

    def _on(self, event: ev.Event) -> list[ev.Action]:
        match event:
            case ev.Won(epoch, me):
                self._expect(event, Phase.IDLE)
                self.roles.won(epoch, me)
                self.phase = Phase.READING_MEMBERS
                return [ev.ReadMembers()]
            case ev.MembersRead(members):
                self.members = dict(members)
                return self._members_read()
            case ev.TakenOver():
                if self._dropped(event, Phase.TAKING_OVER):
                    return []
                self.phase = Phase.SUBMITTING
                return [ev.SubmitEpochStart(self.roles.term_epoch)]
            case ev.TakeoverRaised(error):
                if self._dropped(event, Phase.READING_MEMBERS, Phase.TAKING_OVER):
                    return []
                if self.roles.after_failed_takeover(error) is TakeoverFailed.STOP:
                    return [ev.Stop(error)]
                return self._end(f"takeover of epoch {self.roles.term_epoch} failed: {error!r}")
            case ev.EpochStartSubmitted(index):
                if self._dropped(event, Phase.SUBMITTING):
                    return []
                self.roles.took_over()
                self.leader = LeaderCore(
                    epoch=self.roles.term_epoch,
                    start_index=index,
                    followers=self.followers,
                    tail_index=self.log.tail_index,
                    commit=self.commit(),
                    votes=self.votes,
                    own_epoch_only="commit_older_epoch" not in planted_bugs.active,
                )
                self.phase = Phase.COMMITTING
                return [ev.StartTerm(self.leader), ev.AwaitApplied(index)]
            case ev.EpochStartApplied(index):
                if self._dropped(event, Phase.COMMITTING):
                    return []
                leader = self._leader()
                if index != leader.start_index or self.commit() < index:
                    raise rules.broken(
                        f"EPOCH_START {index} applied at commit {self.commit()}; the term began at {leader.start_index}"
                    )
                self.roles.became_writable()
                self.phase = Phase.LEADING
                return [ev.Writable(leader.epoch, index), ev.WatchQuorum()]
            case ev.QuorumLost(grace_s, report):
                if self._dropped(event, Phase.LEADING):
                    return []
                return self._end(f"no quorum of followers for {grace_s:.1f}s ({report}); resigning")
            case ev.LeaseDeadlinePassed():
                if self._dropped(event, Phase.LEADING):
                    return []
                return self._end("the lease deadline passed; stepping down")
            case ev.LeaseLost(reason):
                return self._end(f"leadership of epoch {self.roles.term_epoch} lost: {reason}")
            case ev.LeaderSeen(leader_id, epoch):
                if not self.roles.yields_to(leader_id, epoch):
                    return []
                return self._end(f"leader {leader_id} holds epoch {epoch}, above ours: stepping down")
            case ev.ElectionNames(leader):
                if leader is None or not self.roles.yields_to(leader.node_id, leader.epoch):
                    return []
                return self._end(f"the election names {leader.node_id} leading epoch {leader.epoch}: stepping down")
            case ev.StepDownRequested(reason):
                return self._end(reason)
            case ev.TermEnded(current):
                self.roles.ended(current)
                self.leader = None
                self.phase = Phase.IDLE
                return []
            case ev.LeaderObserved(leader):
                self.roles.observed(leader)
                return []
        raise rules.broken(f"an event the replica core does not know: {event!r}")

    # -- the follower's requests -------------------------------------------------------

    def handle(self, message: Message, peer_id: str, link: Link) -> Handling:
        """The follower core's handler of a leader's request (``FollowerCore.handle``),
        with the invariants between it and the term checked at every step: no other
        leader's APPEND changes this node's log while it leads a term, and the follower
        never confirms another node as the holder of the epoch this node won."""
        handling = self.follower.handle(message, peer_id, link)
        try:
            step = advance(handling)
            while not isinstance(step, Answer):
                self.check()
                if isinstance(step, WriteRecords | CutAfter) and self.phase in (Phase.COMMITTING, Phase.LEADING):
                    raise rules.broken(
                        f"{peer_id}'s APPEND changes the log while this node leads epoch {self.roles.term_epoch}"
                    )
                try:
                    result = yield step
                except Exception as exc:  # an outcome the shell throws in: the follower core decides
                    step = advance(handling, failure=exc)
                else:
                    step = advance(handling, result)
            self.check()
            return step
        finally:
            handling.close()

    # -- the steps ---------------------------------------------------------------------

    def _members_read(self) -> list[ev.Action]:
        if self.phase is Phase.READING_MEMBERS:
            # Read after winning: no promotion by an older leader can land later
            # (promote() checks the election key's epoch in the same transaction).
            self.phase = Phase.TAKING_OVER
            return [ev.TakeOver(self.roles.term_epoch, dict(self.members))]
        if self.phase not in (Phase.COMMITTING, Phase.LEADING):
            return []  # a follower's read (or a term's, answered late): only kept
        if not self.votes(self.roles.node_id, self.log.incarnation):
            return self._end("this node is no longer recorded as a voter: stepping down")
        actions: list[ev.Action] = [ev.RefreshVoters()]
        if self.roles.writable:
            actions.extend(self._promotions())
        return actions

    def _promotions(self) -> list[ev.Action]:
        """The learners that hold everything up to the commit index, to record as voters."""
        leader = self._leader()
        commit = self.commit()
        promote: list[ev.Action] = []
        for progress in leader.progress.values():
            record = self.members.get(progress.peer.node_id)
            if progress.voter or not progress.connected or record is None or record.voter:
                continue
            if record.incarnation != progress.incarnation:
                continue  # not registered yet (or replaced): nothing to promote
            if progress.match_index >= commit:
                promote.append(ev.Promote(record, leader.epoch, commit))
        return promote

    def _end(self, reason: str) -> list[ev.Action]:
        """End the term (once): no write is submitted in it from here on, synchronously
        (after a disk-full rollback, new appends would reuse indexes followers hold)."""
        self.roles.stop_writes()
        if self.phase in (Phase.IDLE, Phase.ENDING):
            return []
        self.phase = Phase.ENDING
        return [ev.EndTerm(reason)]

    def _expect(self, event: ev.Event, *phases: Phase) -> None:
        if self.phase not in phases:
            raise rules.broken(f"{type(event).__name__} while {self.phase.value}")

    def _dropped(self, event: ev.Event, *phases: Phase) -> bool:
        """True for a term's answer that arrives after the term was told to end (it was on
        its way, and nothing is done with it); any other unexpected one is broken."""
        if self.phase is Phase.ENDING:
            return True
        self._expect(event, *phases)
        return False

    def _leader(self) -> LeaderCore:
        if self.leader is None:  # not assert: it must hold under -O too
            raise rules.broken(f"no leader core while {self.phase.value}")
        return self.leader

    # -- questions ---------------------------------------------------------------------

    def votes(self, node_id: str, incarnation: str) -> bool:
        """Do the member records as last read count ``node_id``'s ``incarnation``?"""
        return counts(self.members, node_id, incarnation)

    @property
    def votes_self(self) -> bool:
        """This node's data directory is recorded as a voter (as last read)."""
        return self.votes(self.roles.node_id, self.log.incarnation)

    @property
    def in_term(self) -> bool:
        """Between a won election and the term's end."""
        return self.phase is not Phase.IDLE

    def has_quorum(self, *, now: float, within_s: float) -> bool:
        """A leader's question: do voters answering lately make a majority with us?"""
        return self.leader is not None and self.leader.has_quorum(now=now, within_s=within_s)

    def quorum_report(self, *, now: float) -> str:
        """What the leader hears from each follower (``LeaderCore.quorum_report``)."""
        return self.leader.quorum_report(now=now) if self.leader is not None else "not leading"

    # -- invariants --------------------------------------------------------------------

    def check(self) -> None:
        """The invariants between the parts (each part checks its own as it changes)."""
        roles, leader, phase = self.roles, self.leader, self.phase
        if (roles.role is Role.LEADER) != (leader is not None):
            raise rules.broken(f"a {roles.role.value} {'with' if leader else 'without'} a leader core")
        if leader is not None and leader.epoch != roles.term_epoch:
            raise rules.broken(f"leading epoch {roles.term_epoch} with the core of epoch {leader.epoch}")
        if roles.writable and (roles.role is not Role.LEADER or phase is not Phase.LEADING):
            raise rules.broken(f"writable as a {roles.role.value} ({phase.value})")
        if leader is not None and self.log.promised_epoch < leader.epoch:
            # The takeover promised our own epoch before the term began, and a promise
            # never goes back.
            raise rules.broken(f"leading epoch {leader.epoch} with a promise of only {self.log.promised_epoch}")
        if (phase is Phase.IDLE) != (roles.role is Role.FOLLOWER):
            raise rules.broken(f"a {roles.role.value} in the phase {phase.value}")
        if phase in (Phase.COMMITTING, Phase.LEADING) and leader is None:
            raise rules.broken(f"{phase.value} without a leader core")
        confirmed = self.follower.confirmed
        if confirmed is not None:
            epoch, leader_id = confirmed
            if roles.role is not Role.FOLLOWER and epoch == roles.term_epoch and leader_id != roles.node_id:
                # The election gives an epoch to one node: two holders is two leaders.
                raise rules.broken(f"{leader_id} confirmed as the holder of epoch {epoch}, which this node won")
