"""The leader's side of one term (walstore/replication/leader_core.py) as values: who
votes, when the commit index moves, what a quorum is. No trio, no socket: each test feeds
links, answers and the leader's own durable index and reads the decisions back."""

from __future__ import annotations

import pytest
from epoch_log import EpochLog
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore.config import PeerSpec
from walstore.errors import LogStateError
from walstore.protocol import AppendAck
from walstore.replication import rules
from walstore.replication.leader_core import LeaderCore

EPOCH = 5
LOG = EpochLog([EPOCH] * 4000)  # the leader's log: entries of this epoch only


def core(n: int = 3, *, start_index: int = 1, commit: int = 0, learners: frozenset[str] = frozenset()) -> LeaderCore:
    peers = [PeerSpec(f"n{i}", "localhost", 7000 + i) for i in range(1, n)]
    c = LeaderCore(
        epoch=EPOCH,
        start_index=start_index,
        followers=peers,
        tail_index=0,
        commit=commit,
        votes=lambda node_id, incarnation: node_id not in learners,
    )
    for p in peers:
        c.link_up(p.node_id, f"inc-{p.node_id}", tail_index=0, now=0.0)
    return c


def ack(c: LeaderCore, node_id: str, match: int, *, now: float = 1.0, own: int = 0) -> int | None:
    """``node_id`` answers a frame that ended at ``match`` with a match there."""
    c.progress[node_id].append_sent(prev=c.progress[node_id].next_index - 1, last=match, commit=c.commit)
    answer = c.answered(node_id, AppendAck(EPOCH, True, match, match, 0, 0), log=LOG, now=now, own_durable=own)
    assert isinstance(answer.outcome, rules.Matched)
    return answer.commit


# -- the commit index ----------------------------------------------------------------------


def test_a_majority_of_durable_copies_commits_the_leaders_own_counting() -> None:
    c = core()
    assert c.durable(7) is None  # the leader alone is one of three
    assert ack(c, "n1", 5, own=7) == 5  # the leader and n1 hold 5
    assert ack(c, "n2", 9, own=7) == 7  # the second highest of (7, 5, 9)
    assert c.commit == 7
    assert c.durable(12) == 9


def test_a_learners_answers_commit_nothing_until_it_votes() -> None:
    c = core(learners=frozenset({"n1", "n2"}))
    assert ack(c, "n1", 10, own=10) is None
    assert ack(c, "n2", 10, own=10) is None
    assert c.commit == 0
    c.votes = lambda node_id, incarnation: node_id == "n2"  # n2 promoted
    assert c.refresh_voters(now=2.0, own_durable=10) == 10


def test_an_older_epochs_entry_is_not_committed_by_counting_replicas() -> None:
    c = core(start_index=20)  # our EPOCH_START is entry 20: 1..19 are older epochs'
    assert ack(c, "n1", 19, own=19) is None
    assert ack(c, "n2", 19, own=19) is None
    assert c.durable(20) is None
    assert ack(c, "n1", 20, own=20) == 20  # with ours, everything before it commits


def test_the_planted_bug_commits_an_older_epochs_entry() -> None:
    c = core(start_index=20)
    c.own_epoch_only = False
    assert ack(c, "n1", 19, own=19) == 19


def test_a_term_starts_from_the_commit_index_it_inherited() -> None:
    c = core(commit=30, start_index=31)
    assert ack(c, "n1", 31, own=31) == 31
    c2 = core(commit=30, start_index=25)
    assert ack(c2, "n1", 28, own=28) is None  # held by a majority, but not above 30


def test_a_cluster_of_one_commits_what_it_holds() -> None:
    c = core(1)
    assert c.cluster_size == 1
    assert c.durable(3) == 3
    assert c.durable(3) is None
    assert c.has_quorum(now=100.0, within_s=1.0)


def test_five_nodes_need_two_followers() -> None:
    c = core(5)
    assert ack(c, "n1", 10, own=10) is None
    assert ack(c, "n3", 8, own=10) == 8


def test_the_leaders_durable_index_never_goes_back() -> None:
    c = core()
    c.durable(10)
    with pytest.raises(LogStateError, match="durable index going from 10 to 9"):
        c.durable(9)


def test_a_new_incarnation_of_a_follower_counts_from_nothing_and_as_the_records_say() -> None:
    c = core()
    ack(c, "n1", 10, own=10)
    assert c.commit == 10
    c.votes = lambda node_id, incarnation: incarnation != "wiped"
    assert c.link_up("n1", "wiped", tail_index=10, now=3.0) == "inc-n1"
    p = c.progress["n1"]
    assert (p.match_index, p.voter, p.learner_since) == (0, False, 3.0)
    assert c.commit == 10  # what was committed stays committed


# -- quorum ----------------------------------------------------------------------------------


def test_a_quorum_is_voters_connected_and_answering_lately() -> None:
    c = core(learners=frozenset({"n2"}))
    assert not c.has_quorum(now=1.0, within_s=2.0)  # linked, but nobody answered yet
    ack(c, "n2", 1, now=1.0)  # a learner
    assert not c.has_quorum(now=1.5, within_s=2.0)
    ack(c, "n1", 1, now=1.0)
    assert c.has_quorum(now=2.9, within_s=2.0)
    assert not c.has_quorum(now=3.1, within_s=2.0)  # answered too long ago
    c.link_down("n1")
    assert not c.has_quorum(now=1.5, within_s=2.0)  # gone, whenever it last answered


def test_the_quorum_watch_hears_every_connected_follower_learners_too() -> None:
    c = core(learners=frozenset({"n2"}))
    ack(c, "n1", 1, now=4.0)
    ack(c, "n2", 1, now=5.0)
    assert sorted(c.answered_at()) == [4.0, 5.0]
    c.link_down("n1")
    assert c.answered_at() == [5.0]


def test_a_refusal_of_a_higher_epoch_fences_the_term() -> None:
    c = core()
    c.progress["n1"].append_sent(prev=0, last=3, commit=0)
    answer = c.answered("n1", AppendAck(EPOCH + 1, False, 0, 0, 0, 0), log=LOG, now=1.0, own_durable=3)
    assert answer.outcome == rules.Fenced(EPOCH + 1)
    assert (answer.progressed, answer.commit, c.commit) == (False, None, 0)


# -- any order of answers ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    n=st.sampled_from([1, 3, 5]),
    start_index=st.integers(1, 30),
    steps=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 60), st.booleans()), max_size=60),
)
def test_the_commit_index_only_grows_and_is_always_held_by_a_voter_majority(
    n: int, start_index: int, steps: list[tuple[int, int, bool]]
) -> None:
    """Answers from any follower, the leader's fsyncs and promotions in any order: every
    commit the core reports is at or after the term's start, higher than the one before,
    and held durably by a majority of voters at that moment."""
    learners = {f"n{i}" for i in range(1, n) if i % 2 == 0}
    c = core(n, start_index=start_index, learners=frozenset(learners))
    own = 0
    last = 0
    for who, grow, promote in steps:
        if promote and learners:
            learners.pop()
            commit = c.refresh_voters(now=2.0, own_durable=own)
        elif who == 0 or n == 1:
            own += grow
            commit = c.durable(own)
        else:
            node_id = f"n{1 + who % (n - 1)}"
            target = c.progress[node_id].match_index + grow
            commit = ack(c, node_id, target, own=own)
        if commit is not None:
            holders = (own >= commit) + sum(
                1 for p in c.progress.values() if p.peer.node_id not in learners and p.match_index >= commit
            )
            assert commit > last and commit >= start_index and holders > n // 2
            last = commit
        assert c.commit == last


def test_the_quorum_report_says_what_the_leader_hears_from_each_follower() -> None:
    c = core(learners=frozenset({"n2"}))
    ack(c, "n1", 1, now=4.0)
    assert c.quorum_report(now=6.5) == "n1 answered 2.5s ago, n2 connected, no answer yet (a learner: no vote)"
    c.link_down("n1")
    assert c.quorum_report(now=6.5).startswith("n1 not connected, ")
