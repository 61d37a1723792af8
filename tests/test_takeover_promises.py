"""A takeover's promises (walstore/replication/promises.py), answer by answer: what counts,
when there are enough, which log is adopted. No trio, no socket."""

from __future__ import annotations

import pytest

from walstore.errors import LogStateError, UnavailableError
from walstore.protocol import AppendAck, Promise
from walstore.replication.promises import Counted, PromiseTally, Superseded
from walstore.replication.rules import Adopt, LogPosition

EPOCH = 6
MINE = LogPosition("n0", 4, 10, ((1, 1), (4, 8)))
VOTERS = {("n0", "inc0"), ("n1", "inc1"), ("n2", "inc2"), ("n3", "inc3"), ("n4", "inc4")}


def tally(cluster_size: int = 3) -> PromiseTally:
    return PromiseTally(EPOCH, MINE, cluster_size=cluster_size, votes=lambda n, inc: (n, inc) in VOTERS)


def promise(last_epoch: int, last_index: int, history: tuple[tuple[int, int], ...], *, ok: bool = True) -> Promise:
    return Promise(EPOCH, ok, EPOCH if ok else 5, last_epoch, last_index, 0, history)


def test_a_voters_promise_makes_a_majority_of_three_with_ours() -> None:
    t = tally()
    assert not t.enough
    assert t.answer("n1", "inc1", promise(4, 9, ((1, 1), (4, 8)))) is Counted.VOTE
    assert t.enough and sorted(t.promises) == ["n0", "n1"]
    assert t.decide(tail_index=10) is None  # ours is the most advanced


def test_the_most_advanced_log_of_the_majority_is_adopted() -> None:
    t = tally()
    t.answer("n1", "inc1", promise(5, 12, ((1, 1), (4, 8), (5, 11))))
    assert t.decide(tail_index=10) == Adopt(LogPosition("n1", 5, 12, ((1, 1), (4, 8), (5, 11))), None)


def test_a_learners_promise_fences_but_does_not_count() -> None:
    t = tally()
    assert t.answer("n1", "a-new-disk", promise(5, 40, ((5, 1),))) is Counted.LEARNER
    assert not t.enough and t.learners == ["n1"]
    with pytest.raises(UnavailableError, match=r"promises from 1 voter\(s\) \['n0'\], 2 needed .*\['n1'\]"):
        t.decide(tail_index=10)


def test_a_refusal_counts_nothing_and_a_newer_promise_supersedes_us() -> None:
    t = tally()
    refusal = Promise(EPOCH, False, EPOCH, 4, 9, 0, ())  # promised nothing higher: just no
    assert t.answer("n1", "inc1", refusal) is Counted.REFUSED
    with pytest.raises(Superseded, match="n2 promised epoch 9"):
        t.answer("n2", "inc2", Promise(EPOCH, False, 9, 4, 9, 0, ()))
    assert sorted(t.promises) == ["n0"]


def test_another_frame_in_answer_to_prepare_is_ignored() -> None:
    t = tally()
    assert t.answer("n1", "inc1", AppendAck(EPOCH, True, 1, 1, 0, 0)) is Counted.NOT_A_PROMISE
    assert not t.enough


def test_five_nodes_need_two_voters_besides_us() -> None:
    t = tally(cluster_size=5)
    t.answer("n1", "inc1", promise(4, 9, ((1, 1), (4, 8))))
    assert not t.enough
    t.answer("n2", "inc2", promise(4, 10, ((1, 1), (4, 8))))
    assert t.enough


def test_a_second_promise_from_one_peer_is_a_broken_invariant() -> None:
    t = tally()
    t.answer("n1", "inc1", promise(4, 9, ((1, 1), (4, 8))))
    with pytest.raises(LogStateError, match="a second promise from n1"):
        t.answer("n1", "inc1", promise(4, 9, ((1, 1), (4, 8))))


def test_a_cluster_of_one_is_its_own_majority() -> None:
    t = PromiseTally(EPOCH, MINE, cluster_size=1, votes=lambda n, inc: True)
    assert t.enough and t.decide(tail_index=10) is None
