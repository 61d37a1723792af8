"""One node's replica state as one sans-IO state machine (walstore/replication/
replica_core.py): a term from the election won to writable and back as events in and
actions out, each decision on its own, the invariants between the parts broken on
purpose, and a hypothesis state machine that plays the shell and the rest of the world in
any order they can happen. No trio, no disk."""

from __future__ import annotations

import pytest
from follower_shell import MemLog, Shell, append
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from walstore.config import PeerSpec
from walstore.election.base import LeaderInfo
from walstore.election.membership import Member
from walstore.errors import ElectionError, FsyncError, LogStateError, UnavailableError
from walstore.protocol import AppendAck
from walstore.replication import replica_events as ev
from walstore.replication.follower_core import Link
from walstore.replication.leader_core import LeaderCore
from walstore.replication.promises import Superseded
from walstore.replication.replica_core import Phase, ReplicaCore
from walstore.replication.roles import Role

ME = LeaderInfo("n0", 7, "n0:7000", "n0:8080")
OTHER = LeaderInfo("n1", 9, "n1:7000", "n1:8080")
PEERS = [PeerSpec("n1", "localhost", 7001), PeerSpec("n2", "localhost", 7002)]


def member(node_id: str, *, voter: bool = True, revision: int = 1) -> Member:
    return Member(node_id, f"inc-{node_id}", voter, revision)


VOTERS = {n: member(n) for n in ("n0", "n1", "n2")}


class PromisingLog(MemLog):
    """Enough of a log for the core: its entries' epochs, the epoch promised, what the
    follower core reads, and the data directory's incarnation."""

    def __init__(self, epochs: list[int], promised_epoch: int, incarnation: str = "inc-n0") -> None:
        super().__init__(epochs, promised=promised_epoch)
        self.incarnation = incarnation


class Commit:
    value = 3


def replica(promised: int = 7, commit: Commit | None = None) -> tuple[ReplicaCore, PromisingLog, Commit]:
    log = PromisingLog([1, 1, 4, 4], promised)
    index = commit or Commit()
    return ReplicaCore("n0", log, lambda: index.value, followers=PEERS), log, index


def lead(core: ReplicaCore, log: PromisingLog, commit: Commit, *, writable: bool = True) -> LeaderCore:
    """The events of a term as the shell feeds them, up to leading."""
    assert core.on(ev.Won(7, ME)) == [ev.ReadMembers()]
    assert core.on(ev.MembersRead(VOTERS)) == [ev.TakeOver(7, VOTERS)]
    assert core.on(ev.TakenOver()) == [ev.SubmitEpochStart(7)]
    log.epochs.append(7)
    start, leader = core.on(ev.EpochStartSubmitted(5))
    assert isinstance(start, ev.StartTerm) and leader == ev.AwaitApplied(5)
    if writable:
        commit.value = 5
        assert core.on(ev.EpochStartApplied(5)) == [ev.Writable(7, 5), ev.WatchQuorum()]
    return start.core


# -- a term, event by event --------------------------------------------------------------


def test_a_term_from_the_election_to_writable_and_back() -> None:
    core, log, commit = replica()
    assert not core.has_quorum(now=1.0, within_s=2.0)  # a follower has no quorum to ask
    leader = lead(core, log, commit, writable=False)
    assert (core.roles.role, core.leader, core.phase) == (Role.LEADER, leader, Phase.COMMITTING)
    assert (leader.epoch, leader.start_index, leader.commit, leader.cluster_size) == (7, 5, 3, 3)
    assert leader.progress["n1"].next_index == 6  # after our tail, the EPOCH_START
    assert not core.roles.writable
    commit.value = 5
    assert core.on(ev.EpochStartApplied(5)) == [ev.Writable(7, 5), ev.WatchQuorum()]
    assert core.roles.writable and core.phase is Phase.LEADING
    assert core.on(ev.QuorumLost(1.5, "n1 silent")) == [
        ev.EndTerm("no quorum of followers for 1.5s (n1 silent); resigning")
    ]
    assert not core.roles.writable and core.phase is Phase.ENDING
    assert core.on(ev.TermEnded(OTHER)) == []
    assert (core.roles.role, core.leader, core.roles.leader_id, core.phase) == (Role.FOLLOWER, None, "n1", Phase.IDLE)


def test_the_quorum_is_the_terms() -> None:
    core, log, commit = replica()
    leader = lead(core, log, commit)
    leader.link_up("n1", "inc-n1", tail_index=4, now=0.0)
    leader.progress["n1"].last_ack_at = 1.0
    assert core.has_quorum(now=2.0, within_s=2.0)
    core.on(ev.StepDownRequested("stopping"))
    core.on(ev.TermEnded(None))
    assert not core.has_quorum(now=2.0, within_s=2.0)


@pytest.mark.parametrize(
    ("error", "resigns"),
    [
        (UnavailableError("no majority"), True),
        (Superseded(9, "n1"), True),
        (ElectionError("etcd"), True),
        (OSError("reset"), True),
        (FsyncError(5, "meta.json"), False),
        (LogStateError("broken"), False),
    ],
)
def test_a_failed_takeover_resigns_or_stops_the_node(error: BaseException, resigns: bool) -> None:
    core, _, _ = replica()
    core.on(ev.Won(7, ME))
    core.on(ev.MembersRead(VOTERS))
    actions = core.on(ev.TakeoverRaised(error))
    if resigns:
        assert actions == [ev.EndTerm(f"takeover of epoch 7 failed: {error!r}")]
    else:
        assert actions == [ev.Stop(error)]
    assert core.leader is None
    core.on(ev.TermEnded(None))
    assert core.phase is Phase.IDLE


def test_reading_the_members_can_fail_the_takeover() -> None:
    core, _, _ = replica()
    core.on(ev.Won(7, ME))
    assert core.on(ev.TakeoverRaised(ElectionError("etcd down"))) == [
        ev.EndTerm("takeover of epoch 7 failed: ElectionError('etcd down')")
    ]


def test_only_a_higher_epoch_of_another_node_ends_the_term() -> None:
    core, log, commit = replica()
    lead(core, log, commit)
    assert core.on(ev.LeaderSeen("n1", 7)) == []  # our own epoch: no newer leader
    assert core.on(ev.LeaderSeen("n0", 9)) == []  # ourselves
    assert core.on(ev.ElectionNames(None)) == []  # the election names nobody: the lease decides
    assert core.on(ev.ElectionNames(LeaderInfo("n2", 6, "", ""))) == []
    assert core.roles.writable
    assert core.on(ev.ElectionNames(LeaderInfo("n2", 8, "", ""))) == [
        ev.EndTerm("the election names n2 leading epoch 8: stepping down")
    ]
    assert not core.roles.writable
    # The term ends once: every later reason is the same end.
    assert core.on(ev.LeaderSeen("n1", 9)) == []
    assert core.on(ev.LeaseLost("expired")) == []


def test_a_term_ends_at_once_on_a_lost_lease_in_any_phase() -> None:
    for steps in range(5):
        core, log, _ = replica()
        events: list[ev.Event] = [ev.Won(7, ME), ev.MembersRead(VOTERS), ev.TakenOver(), ev.EpochStartSubmitted(5)]
        log.epochs.append(7)
        for event in events[:steps]:
            core.on(event)
        actions = core.on(ev.LeaseLost("keep-alive failed"))
        assert actions == ([ev.EndTerm("leadership of epoch 7 lost: keep-alive failed")] if steps else [])
        assert not core.roles.writable


def test_answers_on_their_way_when_the_term_ends_are_dropped() -> None:
    core, log, commit = replica()
    lead(core, log, commit, writable=False)
    core.on(ev.StepDownRequested("disk full on the leader"))
    commit.value = 5
    assert core.on(ev.EpochStartApplied(5)) == []  # the wait returned before the cancel landed
    assert not core.roles.writable
    assert core.on(ev.MembersRead(VOTERS)) == []


def test_a_leader_no_longer_recorded_as_a_voter_steps_down() -> None:
    core, log, commit = replica()
    lead(core, log, commit)
    replaced = dict(VOTERS, n0=Member("n0", None, False, 2))  # `walstore member replace n0`
    assert core.on(ev.MembersRead(replaced)) == [
        ev.EndTerm("this node is no longer recorded as a voter: stepping down")
    ]


def test_a_leader_promotes_a_learner_that_holds_the_commit_index() -> None:
    core, log, commit = replica()
    leader = lead(core, log, commit)
    learners = dict(VOTERS, n1=member("n1", voter=False, revision=4), n2=member("n2", voter=False, revision=5))
    assert core.on(ev.MembersRead(learners)) == [ev.RefreshVoters()]  # neither is connected
    leader.link_up("n1", "inc-n1", tail_index=5, now=0.0)
    leader.link_up("n2", "inc-n2", tail_index=5, now=0.0)
    leader.progress["n1"].match_index = 5  # holds the commit index
    leader.progress["n2"].match_index = 4  # one behind
    assert core.on(ev.MembersRead(learners)) == [ev.RefreshVoters(), ev.Promote(learners["n1"], 7, 5)]
    # A learner connected with another data directory than its record: not promoted.
    other_disk = dict(learners, n1=Member("n1", "inc-other", False, 6))
    assert core.on(ev.MembersRead(other_disk)) == [ev.RefreshVoters()]


def test_no_promotion_before_the_term_is_writable() -> None:
    core, log, commit = replica()
    leader = lead(core, log, commit, writable=False)
    leader.link_up("n1", "inc-n1", tail_index=5, now=0.0)
    leader.progress["n1"].match_index = 5
    assert core.on(ev.MembersRead(dict(VOTERS, n1=member("n1", voter=False)))) == [ev.RefreshVoters()]


def test_a_followers_member_reads_are_kept_and_ask_for_nothing() -> None:
    core, _, _ = replica()
    assert not core.votes_self
    assert core.on(ev.MembersRead(VOTERS)) == []
    assert core.votes_self and core.votes("n1", "inc-n1") and not core.votes("n1", "inc-other")


# -- the follower side, checked against the term ---------------------------------------------


def test_a_newer_leaders_append_ends_our_term_before_it_changes_the_log() -> None:
    core, log, commit = replica()
    lead(core, log, commit)
    ended: list[list[ev.Action]] = []
    shell = Shell(log, leader_seen=lambda epoch, leader_id: ended.append(core.on(ev.LeaderSeen(leader_id, epoch))))
    answer = shell.run(core.handle(append(9, 5, 7, [9, 9]), "n1", Link()))
    assert answer.message is not None and answer.message.ok  # type: ignore[union-attr]
    assert ended == [[ev.EndTerm("leader n1 holds epoch 9, above ours: stepping down")]]
    assert shell.kinds() == ["VerifyLeader", "PersistPromise", "LeaderSeen", "WriteRecords"]
    assert (log.epochs[-2:], core.phase, core.roles.writable) == ([9, 9], Phase.ENDING, False)


def test_another_leaders_append_while_we_lead_is_a_broken_invariant() -> None:
    core, log, commit = replica()
    lead(core, log, commit)
    shell = Shell(log)  # a shell that never tells the role machine about the leader it saw
    with pytest.raises(LogStateError, match="n1's APPEND changes the log while this node leads epoch 7"):
        shell.run(core.handle(append(9, 5, 7, [9]), "n1", Link()))
    assert log.epochs[-1] == 7  # nothing written


def test_a_stale_leaders_append_is_refused_while_we_lead() -> None:
    core, log, commit = replica()
    lead(core, log, commit)
    shell = Shell(log)
    answer = shell.run(core.handle(append(4, 4, 4, [4]), "n1", Link()))
    assert answer.message is not None and not answer.message.ok  # type: ignore[union-attr]
    assert shell.kinds() == [] and core.roles.writable


def test_another_holder_of_our_epoch_is_a_broken_invariant() -> None:
    core, log, commit = replica()
    lead(core, log, commit)
    core.follower.confirmed = (7, "n1")  # the election confirmed n1 for the epoch we won
    with pytest.raises(LogStateError, match="n1 confirmed as the holder of epoch 7, which this node won"):
        core.check()


# -- the events the phase does not expect, and the invariants ------------------------------


@pytest.mark.parametrize(
    "event",
    [
        ev.TakenOver(),
        ev.EpochStartSubmitted(5),
        ev.EpochStartApplied(5),
        ev.QuorumLost(1.0, ""),
        ev.LeaseDeadlinePassed(),
    ],
)
def test_a_terms_answer_outside_its_term_is_a_broken_invariant(event: ev.Event) -> None:
    core, _, _ = replica()
    with pytest.raises(LogStateError, match="while idle"):
        core.on(event)


def test_winning_twice_is_a_broken_invariant() -> None:
    core, _, _ = replica()
    core.on(ev.Won(7, ME))
    with pytest.raises(LogStateError, match="Won while reading members"):
        core.on(ev.Won(8, LeaderInfo("n0", 8, "", "")))


def test_writable_before_the_epoch_start_commits_is_a_broken_invariant() -> None:
    core, log, commit = replica()
    lead(core, log, commit, writable=False)
    with pytest.raises(LogStateError, match="EPOCH_START 5 applied at commit 3"):
        core.on(ev.EpochStartApplied(5))
    commit.value = 6
    with pytest.raises(LogStateError, match="EPOCH_START 6 applied at commit 6; the term began at 5"):
        core.on(ev.EpochStartApplied(6))


def test_leading_an_epoch_not_promised_is_a_broken_invariant() -> None:
    core, _, _ = replica(promised=6)  # the takeover's promise of 7 never happened
    core.on(ev.Won(7, ME))
    core.on(ev.MembersRead(VOTERS))
    core.on(ev.TakenOver())
    with pytest.raises(LogStateError, match="leading epoch 7 with a promise of only 6"):
        core.on(ev.EpochStartSubmitted(5))


def test_a_leader_core_outside_a_term_is_a_broken_invariant() -> None:
    core, log, commit = replica()
    leader = lead(core, log, commit)
    core.on(ev.StepDownRequested("x"))
    core.on(ev.TermEnded(None))
    core.leader = leader
    with pytest.raises(LogStateError, match="a follower with a leader core"):
        core.check()


def test_a_leader_core_of_another_epoch_is_a_broken_invariant() -> None:
    core, log, commit = replica()
    lead(core, log, commit)
    core.roles.term_epoch = 8
    with pytest.raises(LogStateError, match="leading epoch 8 with the core of epoch 7"):
        core.check()


def test_a_leader_without_its_core_is_a_broken_invariant() -> None:
    core, log, commit = replica()
    lead(core, log, commit)
    core.leader = None
    with pytest.raises(LogStateError, match="a leader without a leader core"):
        core.check()


def test_writable_while_ending_is_a_broken_invariant() -> None:
    core, log, commit = replica()
    lead(core, log, commit)
    core.phase = Phase.ENDING
    with pytest.raises(LogStateError, match="writable as a leader"):
        core.check()


# -- the shell and the world in any order --------------------------------------------------

ERRORS: list[BaseException] = [
    UnavailableError("no majority"),
    Superseded(99, "n1"),
    OSError("reset"),
    FsyncError(5, "meta.json"),
    LogStateError("broken"),
]


class ReplicaLife(RuleBasedStateMachine):
    """The shell (``Replicator``) carrying out every action the core asks for, with each
    outcome it can have, while the rest of the world does what it can at any step: leases
    lost, newer leaders seen and named, higher promises from other leaders, member records
    re-read, followers answering, the node asking the term to end. What is checked after
    every step: the core's own ``check``, and that it asks only for what a correct
    replica asks for (one step of the term at a time, writable only after its EPOCH_START
    committed, one end per term, a promotion only of a caught-up learner)."""

    core_type: type[ReplicaCore] = ReplicaCore

    def __init__(self) -> None:
        super().__init__()
        self.log = PromisingLog([1] * 10, promised_epoch=1)
        self.commit = 0
        self.core = self.core_type("n0", self.log, lambda: self.commit, followers=PEERS)
        self.core.on(ev.MembersRead(VOTERS))
        self.epoch = 1  # the election's last epoch
        self.step: ev.Action | None = None  # the term's step the shell is carrying out
        self.ends = 0  # EndTerm asked for in this term
        self.stopped = False  # Stop asked for: the shell raised, the term's `finally` follows
        self.start = 0  # this term's EPOCH_START
        self.term_commit = 0

    # -- what the core asks for --------------------------------------------------------

    def feed(self, event: ev.Event) -> None:
        for action in self.core.on(event):
            self.carry_out(action)

    def carry_out(self, action: ev.Action) -> None:
        match action:
            case ev.EndTerm():
                self.ends += 1
                assert self.ends == 1, "a term ended twice"
                assert not self.core.roles.writable
                self.step = None  # the scope is cancelled: the step in flight is dropped
            case ev.Stop():
                self.stopped = True
                self.step = None
            case ev.RefreshVoters():
                leader = self.core.leader
                assert leader is not None
                commit = leader.refresh_voters(now=1.0, own_durable=leader.own_durable)
                if commit is not None:
                    assert commit > self.term_commit
                    self.term_commit = self.commit = commit
            case ev.Promote(member, epoch, commit):
                leader = self.core.leader
                assert leader is not None and self.core.roles.writable and epoch == leader.epoch
                progress = leader.progress[member.node_id]
                assert not member.voter and not progress.voter and progress.connected
                assert member.incarnation == progress.incarnation and progress.match_index >= commit == self.commit
            case ev.Writable(epoch, index):
                assert (epoch, index) == (self.core.roles.term_epoch, self.start) and self.commit >= index
            case ev.StartTerm(core):
                assert core.epoch == self.core.roles.term_epoch and core.start_index == self.start
            case _:
                assert self.step is None, f"{action} asked for while {self.step} is carried out"
                self.step = action

    # -- the shell answering the term's step -------------------------------------------

    @precondition(lambda self: self.core.phase is Phase.IDLE)
    @rule(ahead=st.integers(1, 3))
    def win(self, ahead: int) -> None:
        self.epoch += ahead
        self.ends, self.stopped = 0, False
        self.feed(ev.Won(self.epoch, LeaderInfo("n0", self.epoch, "n0:7000", "n0:8080")))
        assert self.step == ev.ReadMembers()

    @precondition(lambda self: isinstance(self.step, ev.ReadMembers))
    @rule(as_voter=st.booleans(), fails=st.sampled_from([False, False, False, True]))
    def members_read(self, as_voter: bool, fails: bool) -> None:
        self.step = None
        if fails:
            self.feed(ev.TakeoverRaised(ElectionError("etcd down")))
        else:
            self.feed(ev.MembersRead(dict(VOTERS, n0=member("n0", voter=as_voter))))

    @precondition(lambda self: isinstance(self.step, ev.TakeOver))
    @rule(error=st.none() | st.sampled_from(ERRORS))
    def take_over(self, error: BaseException | None) -> None:
        assert isinstance(self.step, ev.TakeOver) and self.step.epoch == self.core.roles.term_epoch
        self.step = None
        if error is not None:
            self.feed(ev.TakeoverRaised(error))
        else:
            # take_over promised the epoch won (unless a higher promise came first)
            self.log.promised_epoch = max(self.log.promised_epoch, self.core.roles.term_epoch)
            self.feed(ev.TakenOver())

    @precondition(lambda self: isinstance(self.step, ev.SubmitEpochStart))
    @rule()
    def submit_epoch_start(self) -> None:
        assert isinstance(self.step, ev.SubmitEpochStart)
        self.log.epochs.append(self.step.epoch)
        self.start, self.step = self.log.tail_index, None
        self.term_commit = self.commit
        self.feed(ev.EpochStartSubmitted(self.start))

    @precondition(lambda self: isinstance(self.step, ev.AwaitApplied) and self.commit >= self.step.index)
    @rule()
    def epoch_start_applied(self) -> None:
        assert isinstance(self.step, ev.AwaitApplied)
        index, self.step = self.step.index, None
        self.feed(ev.EpochStartApplied(index))

    @precondition(lambda self: isinstance(self.step, ev.WatchQuorum))
    @rule(quorum_lost=st.booleans())
    def quorum_watch_returns(self, quorum_lost: bool) -> None:
        self.step = None
        self.feed(ev.QuorumLost(1.5, "silent") if quorum_lost else ev.LeaseDeadlinePassed())

    @precondition(lambda self: self.core.phase is Phase.ENDING or (self.stopped and self.core.in_term))
    @rule(current=st.sampled_from([None, "me", "other"]), late=st.booleans())
    def term_ends(self, current: str | None, late: bool) -> None:
        if late and self.core.phase is Phase.ENDING:
            # An answer that was on its way when the scope was cancelled.
            for answer in (
                ev.TakenOver(),
                ev.EpochStartSubmitted(self.log.tail_index),
                ev.EpochStartApplied(self.start),
            ):
                assert self.core.on(answer) == []
        info = {
            None: None,
            "me": LeaderInfo("n0", self.epoch, "", ""),
            "other": LeaderInfo("n1", self.epoch + 1, "", ""),
        }
        self.feed(ev.TermEnded(info[current]))
        self.step = None
        assert self.core.leader is None and self.core.roles.role is Role.FOLLOWER
        assert not self.core.has_quorum(now=1.0, within_s=2.0)

    # -- the rest of the world, at any step ---------------------------------------------

    @precondition(lambda self: self.core.phase is Phase.COMMITTING and self.commit < self.start)
    @rule()
    def followers_hold_the_epoch_start(self) -> None:
        leader = self.core.leader
        assert leader is not None
        for who in ("n1", "n2"):
            self.follower_answers(who, durable=True)
        commit = leader.durable(self.log.tail_index)  # and the leader's own fsync
        if commit is not None:
            assert commit > self.term_commit
            self.term_commit = self.commit = commit
        assert self.commit >= self.start

    @precondition(lambda self: self.core.leader is not None)
    @rule(who=st.sampled_from(["n1", "n2"]), durable=st.booleans())
    def follower_answers(self, who: str, durable: bool) -> None:
        leader = self.core.leader
        assert leader is not None
        progress = leader.progress[who]
        if not progress.connected:
            leader.link_up(who, f"inc-{who}", tail_index=self.log.tail_index, now=0.0)
        tail = self.log.tail_index
        if progress.match_index < tail:
            progress.append_sent(prev=progress.next_index - 1, last=tail, commit=leader.commit)
            answer = leader.answered(
                who,
                AppendAck(leader.epoch, True, tail, tail, 0, 0),
                log=self.log,
                now=1.0,
                own_durable=tail if durable else leader.own_durable,
            )
            if answer.commit is not None:
                assert answer.commit > self.term_commit
                self.term_commit = self.commit = answer.commit

    @precondition(lambda self: self.core.roles.writable)
    @rule(learner=st.sampled_from(["n1", "n2"]))
    def a_leader_rereads_the_members(self, learner: str) -> None:
        # A learner among them: the first read makes it one, a later one promotes it
        # once it holds the commit index.
        self.feed(ev.MembersRead(dict(VOTERS, **{learner: member(learner, voter=False)})))

    @rule(data=st.data())
    def the_world(self, data: st.DataObject) -> None:
        """One rule for everything else that can happen at any step (so that hypothesis,
        choosing among the enabled rules alike, lets a term live long enough to lead)."""
        what = data.draw(st.sampled_from(["members", "promise", "lease", "node", "newer", "observed"]))
        if what == "members" and self.core.leader is not None:
            members = dict(VOTERS, n0=member("n0", voter=data.draw(st.sampled_from([True, True, True, False]))))
            learner = data.draw(st.sampled_from(["n1", "n2"]))
            members[learner] = member(learner, voter=False)
            self.feed(ev.MembersRead(members))
        elif what == "promise" and self.core.in_term:
            self.log.promised_epoch = max(self.log.promised_epoch, self.epoch + data.draw(st.integers(0, 2)))
        elif what in ("lease", "node") and self.core.in_term:
            self.feed(ev.LeaseLost("expired") if what == "lease" else ev.StepDownRequested("disk full on the leader"))
            assert not self.core.roles.writable
        elif what == "newer":
            # Around the epoch we won: the boundary is where the rule lives.
            who, epoch = data.draw(st.sampled_from(["n0", "n1"])), self.epoch + data.draw(st.integers(-2, 1))
            ended = self.core.roles.role is not Role.FOLLOWER and who != "n0" and epoch > self.core.roles.term_epoch
            before = self.ends
            named = data.draw(st.booleans())
            self.feed(ev.ElectionNames(LeaderInfo(who, epoch, "", "")) if named else ev.LeaderSeen(who, epoch))
            if ended:
                assert self.core.phase is Phase.ENDING and not self.core.roles.writable
            else:
                assert self.ends == before
        elif what == "observed":
            epoch = data.draw(st.integers(0, 8))
            self.feed(ev.LeaderObserved(LeaderInfo("n1", epoch, "", "") if epoch else None))

    @invariant()
    def parts_agree(self) -> None:
        self.core.check()
        roles, leader = self.core.roles, self.core.leader
        assert not roles.writable or (leader is not None and roles.leader_id == "n0" and self.commit >= self.start)
        if leader is not None:
            assert leader.epoch == roles.term_epoch <= self.log.promised_epoch
            assert leader.commit == self.commit


TestReplicaLife = ReplicaLife.TestCase
TestReplicaLife.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


class YieldsToItsOwnEpoch(ReplicaCore):
    """A planted bug: a term ends when another node is seen leading the epoch we won (a
    ``>=`` for the ``>`` of ``Roles.yields_to``)."""

    def _on(self, event: ev.Event) -> list[ev.Action]:
        if isinstance(event, ev.LeaderSeen) and event.leader_id != "n0" and event.epoch == self.roles.term_epoch:
            return self._end("seen leading our epoch")
        return super()._on(event)


def test_the_state_machine_finds_a_term_that_yields_to_its_own_epoch() -> None:
    class Planted(ReplicaLife):
        core_type = YieldsToItsOwnEpoch

    with pytest.raises(AssertionError):
        run_state_machine_as_test(Planted, settings=settings(max_examples=200, stateful_step_count=60, deadline=None))
