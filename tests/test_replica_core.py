"""One node's replica state in one object (walstore/replication/replica_core.py): a term
from the election to writable and back, and the invariants between its parts, each
broken on purpose. No trio, no disk."""

from __future__ import annotations

import pytest
from epoch_log import EpochLog
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from walstore.config import PeerSpec
from walstore.election.base import LeaderInfo
from walstore.errors import LogStateError
from walstore.protocol import AppendAck
from walstore.replication.leader_core import LeaderCore
from walstore.replication.replica_core import ReplicaCore
from walstore.replication.roles import Role

ME = LeaderInfo("n0", 7, "n0:7000", "n0:8080")
OTHER = LeaderInfo("n1", 9, "n1:7000", "n1:8080")
PEERS = [PeerSpec("n1", "localhost", 7001), PeerSpec("n2", "localhost", 7002)]


class PromisingLog(EpochLog):
    """Enough of a log for the core: its entries' epochs and the epoch promised."""

    def __init__(self, epochs: list[int], promised_epoch: int) -> None:
        super().__init__(epochs)
        self.promised_epoch = promised_epoch


def replica(promised: int = 7, commit: int = 3) -> ReplicaCore:
    log = PromisingLog([1, 1, 4, 4], promised)
    return ReplicaCore("n0", log, lambda: commit)


def lead(core: ReplicaCore) -> LeaderCore:
    core.won(7, ME)
    return core.took_over(start_index=5, followers=PEERS, votes=lambda node_id, incarnation: True)


def test_a_term_from_the_election_to_writable_and_back() -> None:
    core = replica()
    assert not core.has_quorum(now=1.0, within_s=2.0)  # a follower has no quorum to ask
    leader = lead(core)
    assert (core.roles.role, core.leader) == (Role.LEADER, leader)
    assert (leader.epoch, leader.start_index, leader.commit, leader.cluster_size) == (7, 5, 3, 3)
    assert leader.progress["n1"].next_index == 5  # after our tail
    core.became_writable()
    assert core.roles.writable
    assert core.ended(OTHER) is True
    assert (core.roles.role, core.leader, core.roles.leader_id) == (Role.FOLLOWER, None, "n1")


def test_the_quorum_is_the_terms() -> None:
    core = replica()
    leader = lead(core)
    leader.link_up("n1", "inc-1", tail_index=4, now=0.0)
    leader.progress["n1"].last_ack_at = 1.0
    assert core.has_quorum(now=2.0, within_s=2.0)
    core.ended(None)
    assert not core.has_quorum(now=2.0, within_s=2.0)


def test_a_takeover_that_failed_leaves_no_leader_core() -> None:
    core = replica()
    core.won(7, ME)
    assert core.leader is None
    assert core.ended(None) is True
    assert core.leader is None


def test_leading_an_epoch_not_promised_is_a_broken_invariant() -> None:
    core = replica(promised=6)  # the takeover's promise of 7 never happened
    core.won(7, ME)
    with pytest.raises(LogStateError, match="leading epoch 7 with a promise of only 6"):
        core.took_over(start_index=5, followers=PEERS, votes=lambda node_id, incarnation: True)


def test_a_leader_core_outside_a_term_is_a_broken_invariant() -> None:
    core = replica()
    lead(core)
    core.roles.ended(None)  # the role ended behind the core's back
    with pytest.raises(LogStateError, match="a follower with a leader core"):
        core.check()


def test_a_leader_core_of_another_epoch_is_a_broken_invariant() -> None:
    core = replica(promised=8)
    leader = lead(core)
    leader.epoch = 8
    with pytest.raises(LogStateError, match="leading epoch 7 with the core of epoch 8"):
        core.check()


def test_a_leader_without_its_core_is_a_broken_invariant() -> None:
    core = replica()
    lead(core)
    core.leader = None
    with pytest.raises(LogStateError, match="a leader without a leader core"):
        core.check()


# -- any order of the election's events -----------------------------------------------------


class ReplicaLife(RuleBasedStateMachine):
    """The election's events in any order a node can see them (terms won and lost at any
    step, higher promises arriving from other leaders, followers answering), fed to one
    ReplicaCore as the replicator feeds it: ``check`` never fires on a legal history,
    and what it promises holds after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.log = PromisingLog([1] * 10, promised_epoch=1)
        self.commit = 0
        self.core = ReplicaCore("n0", self.log, lambda: self.commit)
        self.epoch = 1  # the election's last epoch
        self.term_commit = 0

    @precondition(lambda self: self.core.roles.role is Role.FOLLOWER)
    @rule(ahead=st.integers(1, 3))
    def win(self, ahead: int) -> None:
        self.epoch += ahead
        self.core.won(self.epoch, LeaderInfo("n0", self.epoch, "n0:7000", "n0:8080"))

    @precondition(lambda self: self.core.roles.role is Role.TAKEOVER)
    @rule()
    def take_over(self) -> None:
        # take_over promised the epoch won (unless a higher promise came first)
        self.log.promised_epoch = max(self.log.promised_epoch, self.core.roles.term_epoch)
        self.log.epochs.append(self.core.roles.term_epoch)  # our EPOCH_START
        self.core.took_over(start_index=self.log.tail_index, followers=PEERS, votes=lambda node_id, incarnation: True)
        self.term_commit = self.commit

    @precondition(lambda self: self.core.roles.role is Role.LEADER and not self.core.roles.writable)
    @rule()
    def epoch_start_applied(self) -> None:
        self.core.became_writable()

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

    @rule(higher=st.integers(0, 2))
    def another_leader_promised(self, higher: int) -> None:
        self.log.promised_epoch = max(self.log.promised_epoch, self.epoch + higher)

    @rule()
    def lease_lost(self) -> None:
        self.core.stop_writes()

    @rule(current=st.sampled_from([None, "me", "other"]))
    def term_ends(self, current: str | None) -> None:
        info = {
            None: None,
            "me": LeaderInfo("n0", self.epoch, "", ""),
            "other": LeaderInfo("n1", self.epoch + 1, "", ""),
        }
        self.core.ended(info[current])
        assert self.core.leader is None and self.core.roles.role is Role.FOLLOWER
        assert not self.core.has_quorum(now=1.0, within_s=2.0)

    @rule(epoch=st.integers(0, 8))
    def leader_observed(self, epoch: int) -> None:
        self.core.observed(LeaderInfo("n1", epoch, "", "") if epoch else None)

    @invariant()
    def parts_agree(self) -> None:
        self.core.check()
        roles, leader = self.core.roles, self.core.leader
        assert not roles.writable or (leader is not None and roles.leader_id == "n0")
        if leader is not None:
            assert leader.epoch == roles.term_epoch <= self.log.promised_epoch
            assert leader.commit == self.commit


TestReplicaLife = ReplicaLife.TestCase
TestReplicaLife.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
