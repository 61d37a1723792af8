"""One node's replica state in one object (walstore/replication/replica_core.py): a term
from the election to writable and back, and the invariants between its parts, each
broken on purpose. No trio, no disk."""

from __future__ import annotations

import pytest
from epoch_log import EpochLog

from walstore.config import PeerSpec
from walstore.election.base import LeaderInfo
from walstore.errors import LogStateError
from walstore.replication.follower_core import FollowerCore
from walstore.replication.leader_core import LeaderCore
from walstore.replication.replica_core import ReplicaCore
from walstore.replication.roles import Role

ME = LeaderInfo("n0", 7, "n0:7000", "n0:8080")
OTHER = LeaderInfo("n1", 9, "n1:7000", "n1:8080")
PEERS = [PeerSpec("n1", "localhost", 7001), PeerSpec("n2", "localhost", 7002)]


class PromisingLog(EpochLog):
    """Enough of a log for the cores: its entries' epochs and the epoch promised."""

    def __init__(self, epochs: list[int], promised_epoch: int) -> None:
        super().__init__(epochs)
        self.promised_epoch = promised_epoch
        self.durable_promise = promised_epoch
        self.halted: str | None = None


def replica(promised: int = 7, commit: int = 3) -> ReplicaCore:
    log = PromisingLog([1, 1, 4, 4], promised)
    return ReplicaCore("n0", log, lambda: commit, FollowerCore(log, lambda: commit))  # type: ignore[arg-type]


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
