"""The replication rules (walstore/replication/rules.py), value by value: log matching, where
an APPEND's records go, what a HEARTBEAT may commit, the commit rule, what an APPEND_ACK
means. No trio, no disk: a log here is a list of epochs, one per entry."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import pytest
from epoch_log import EpochLog, records
from hypothesis import given
from hypothesis import strategies as st

from walstore.errors import LogStateError, ProtocolError
from walstore.protocol import AppendAck
from walstore.replication import rules
from walstore.replication.rules import Accept, Drain, Fenced, Matched, Refuse, Resend, Stale

# -- log matching --------------------------------------------------------------------------


def test_prev_index_zero_always_matches() -> None:
    assert rules.match_prev(EpochLog([]), 0, 0) is None
    assert rules.match_prev(EpochLog([1, 2]), 0, 0) is None


def test_prev_past_our_tail_is_refused_with_our_next_index() -> None:
    assert rules.match_prev(EpochLog([1, 1]), 5, 1) == Refuse(conflict_index=3)


def test_prev_of_another_epoch_is_refused_with_our_first_index_of_that_epoch() -> None:
    log = EpochLog([1, 2, 2, 2])
    # The leader has epoch 3 at index 4; ours is 2, which we hold from index 2.
    assert rules.match_prev(log, 4, 3) == Refuse(conflict_index=2, conflict_epoch=2)
    assert rules.match_prev(log, 4, 2) is None


def test_prev_in_flight_asks_for_a_drain_and_is_a_bug_after_one() -> None:
    log = EpochLog([1, 1, 2], in_flight=1)
    assert rules.match_prev(log, 3, 2) == Drain()
    # Submitted after the drain began (through 2): drain again.
    assert rules.match_prev(log, 3, 2, drained_through=2) == Drain()
    # Written by the drain through 3, yet unknown: a broken invariant, not a refusal.
    with pytest.raises(LogStateError, match="unknown after a drain through 3"):
        rules.match_prev(log, 3, 2, drained_through=3)
    log.in_flight = 0
    assert rules.match_prev(log, 3, 2, drained_through=3) is None


def test_a_drain_that_cut_the_tail_refuses_with_the_new_tail() -> None:
    log = EpochLog([1, 1, 1], in_flight=2)
    assert rules.match_prev(log, 3, 1) == Drain()
    log.epochs, log.in_flight = [1], 0  # another leader's cut while we waited
    assert rules.match_prev(log, 3, 1, drained_through=3) == Refuse(conflict_index=2)


# -- placing an APPEND's records -----------------------------------------------------------


def test_an_empty_append_acknowledges_prev_and_commits_no_further() -> None:
    log = EpochLog([1, 1, 1])
    assert rules.place_records(log, 2, None, 9) == Accept(match=2, commit_to=2)
    assert rules.place_records(log, 2, None, 1) == Accept(match=2, commit_to=1)


def test_new_records_at_the_tail_are_written_whole() -> None:
    log = EpochLog([1, 1])
    assert rules.place_records(log, 2, records(3, [1, 2]), 3) == Accept(match=4, commit_to=3, write_from=0)


def test_a_resend_of_what_we_hold_writes_nothing() -> None:
    log = EpochLog([1, 1, 2, 2])
    assert rules.place_records(log, 1, records(2, [1, 2, 2]), 0) == Accept(match=4, commit_to=0)


def test_an_overlapping_resend_writes_only_the_new_part() -> None:
    log = EpochLog([1, 1, 2])
    assert rules.place_records(log, 1, records(2, [1, 2, 2, 2]), 0) == Accept(match=5, commit_to=0, write_from=2)


def test_a_divergent_suffix_is_cut_where_the_epochs_first_differ() -> None:
    log = EpochLog([1, 1, 2, 2, 2])
    placed = rules.place_records(log, 2, records(3, [3, 3]), 4)
    assert placed == Accept(match=4, commit_to=4, write_from=0, truncate_after=2)
    placed = rules.place_records(log, 2, records(3, [2, 3]), 4)
    assert placed == Accept(match=4, commit_to=4, write_from=1, truncate_after=3)


def test_records_without_a_batch_end_are_not_acknowledged() -> None:
    # Recovery would drop a trailing partial batch: claiming it would be a lie.
    log = EpochLog([1])
    placed = rules.place_records(log, 1, records(2, [1, 1], batch_end=False), 5)
    assert placed == Accept(match=1, commit_to=1, write_from=0)


def test_a_record_in_flight_here_asks_for_a_drain_and_is_a_bug_after_one() -> None:
    log = EpochLog([1, 1, 1], in_flight=2)
    batch = records(2, [1, 1, 1])
    assert rules.place_records(log, 1, batch, 0) == Drain()
    with pytest.raises(LogStateError, match="unknown after a drain through 3"):
        rules.place_records(log, 1, batch, 0, drained_through=3)
    log.in_flight = 0
    assert rules.place_records(log, 1, batch, 0, drained_through=3) == Accept(match=4, commit_to=0, write_from=2)


def test_records_that_do_not_follow_prev_break_an_invariant() -> None:
    with pytest.raises(LogStateError, match="placed after 1"):
        rules.place_records(EpochLog([1, 1]), 1, records(3, [1]), 0)
    with pytest.raises(LogStateError, match="past the tail"):
        rules.place_records(EpochLog([1]), 2, records(3, [1]), 0)


@given(
    shared=st.lists(st.integers(1, 3), max_size=6),
    mine=st.lists(st.integers(1, 3), max_size=6),
    theirs=st.lists(st.integers(4, 6), min_size=1, max_size=6),
    back=st.integers(0, 6),
)
def test_after_placing_our_log_equals_the_leaders_up_to_the_match(
    shared: list[int], mine: list[int], theirs: list[int], back: int
) -> None:
    """A follower holding ``shared + mine``, a leader holding ``shared + theirs`` (later
    epochs: the leader's suffix is newer) and sending from any point in the shared prefix.
    Carrying out the decision leaves the follower's log equal to the leader's up to the
    acknowledged index, and the entries up to prev untouched."""
    shared = sorted(shared)
    mine = sorted(mine)
    follower = EpochLog(shared + mine)
    leader = shared + sorted(theirs)
    prev = max(0, len(shared) - back)
    assert rules.match_prev(follower, prev, leader[prev - 1] if prev else 0) is None
    placed = rules.place_records(follower, prev, records(prev + 1, leader[prev:]), len(leader))
    assert isinstance(placed, Accept)
    before = list(follower.epochs)
    if placed.write_from is not None:
        cut = placed.truncate_after if placed.truncate_after is not None else follower.tail_index
        assert cut >= prev
        assert cut == prev + placed.write_from
        follower.epochs = follower.epochs[:cut] + leader[cut:]
    else:
        assert placed.truncate_after is None
    assert follower.epochs[: placed.match] == leader[: placed.match]
    assert placed.match == len(leader)
    assert follower.epochs[:prev] == before[:prev]
    assert placed.commit_to <= placed.match


# -- heartbeats ----------------------------------------------------------------------------


def heartbeat(**changes: object) -> int:
    args: dict[str, object] = dict(
        epoch=5,
        sender="n1",
        leader_commit=9,
        link_epoch=5,
        link_matched=7,
        confirmed=(5, "n1"),
        promised_epoch=5,
        tail_index=8,
        commit=3,
    )
    args.update(changes)
    return rules.heartbeat_commit(**args)  # type: ignore[arg-type]


def test_a_heartbeat_commits_up_to_what_the_link_matched() -> None:
    assert heartbeat() == 7
    assert heartbeat(leader_commit=6) == 6
    assert heartbeat(tail_index=4) == 4


@pytest.mark.parametrize(
    "changes",
    [
        {"link_epoch": 4},  # the link matched under another epoch
        {"promised_epoch": 6},  # we promised a later leader since
        {"confirmed": (5, "n2")},  # the election confirmed someone else
        {"confirmed": None},
        {"sender": "n2"},
        {"link_matched": 3},  # nothing past our commit
        {"commit": 8},
    ],
)
def test_a_heartbeat_is_a_no_op_otherwise(changes: dict[str, object]) -> None:
    assert heartbeat(**changes) == 0


# -- the commit rule -----------------------------------------------------------------------


def test_a_majority_commits_the_index_it_holds() -> None:
    assert rules.majority_commit(10, [7, 3], cluster_size=3, start_index=5, commit=0) == 7
    assert rules.majority_commit(10, [7, 3, 9, 1], cluster_size=5, start_index=5, commit=0) == 7
    assert rules.majority_commit(4, [], cluster_size=1, start_index=1, commit=0) == 4


def test_the_commit_index_never_moves_back() -> None:
    assert rules.majority_commit(10, [7, 3], cluster_size=3, start_index=5, commit=7) is None
    assert rules.majority_commit(10, [6, 3], cluster_size=3, start_index=5, commit=7) is None


def test_an_older_epochs_entry_is_not_committed_by_counting_replicas() -> None:
    """Raft's figure 8: a majority holding entries before our EPOCH_START commits nothing;
    the planted bug (own_epoch_only=False) commits them."""
    assert rules.majority_commit(6, [3, 3], cluster_size=3, start_index=5, commit=2) is None
    assert rules.majority_commit(6, [4, 4], cluster_size=3, start_index=5, commit=2) is None  # the entry before
    assert rules.majority_commit(6, [3, 3], cluster_size=3, start_index=5, commit=2, own_epoch_only=False) == 3
    assert rules.majority_commit(6, [5, 3], cluster_size=3, start_index=5, commit=2) == 5


def test_a_learner_counts_as_holding_nothing() -> None:
    assert rules.majority_commit(10, [0, 0], cluster_size=3, start_index=1, commit=0) is None


def test_the_wrong_number_of_match_indexes_breaks_an_invariant() -> None:
    with pytest.raises(LogStateError, match="2 match indexes for a cluster of 3"):
        rules.majority_commit(10, [7], cluster_size=3, start_index=1, commit=0)


# -- APPEND_ACK ----------------------------------------------------------------------------


def ack_outcome(ack: AppendAck, log: EpochLog | None = None, **changes: int) -> object:
    args = dict(sent_last=10, sent_generation=2, generation=2, match_index=4, next_index=11)
    args.update(changes)
    return rules.on_append_ack(ack, peer="n1", epoch=5, log=log or EpochLog([1] * 10), **args)


def test_an_ack_moves_the_match_only_up() -> None:
    assert ack_outcome(AppendAck(5, True, 8, 8, 0, 0)) == Matched(8, on_current_link=True)
    assert ack_outcome(AppendAck(5, True, 3, 8, 0, 0)) == Matched(None, on_current_link=True)
    assert ack_outcome(AppendAck(5, True, 8, 8, 0, 0), sent_generation=1) == Matched(8, on_current_link=False)


def test_an_ack_beyond_what_was_sent_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="acknowledged index 11, beyond the 10 sent"):
        ack_outcome(AppendAck(5, True, 11, 11, 0, 0))


def test_a_refusal_of_a_higher_epoch_ends_the_term() -> None:
    assert ack_outcome(AppendAck(7, False, 0, 3, 0, 0)) == Fenced(7)
    assert ack_outcome(AppendAck(7, False, 0, 3, 0, 0), sent_generation=1) == Fenced(7)


def test_a_refusal_of_an_older_frame_is_stale() -> None:
    assert ack_outcome(AppendAck(5, False, 0, 3, 4, 0), sent_generation=1) == Stale()


def test_a_refusal_resends_from_the_followers_hint() -> None:
    assert ack_outcome(AppendAck(5, False, 0, 6, 0, 0)) == Resend(7)  # its next index
    assert ack_outcome(AppendAck(5, False, 0, 9, 3, 0)) == Resend(3)  # its conflict hint
    assert ack_outcome(AppendAck(5, False, 0, 30, 0, 0), next_index=5) == Resend(4)  # one back at least
    assert ack_outcome(AppendAck(5, False, 0, 0, 0, 0), next_index=1) == Resend(1)  # never below 1


def test_a_refusal_naming_an_epoch_we_hold_resumes_after_our_last_entry_of_it() -> None:
    ours = EpochLog([1, 1, 2, 2, 4, 4, 4])  # epoch 2 is ours at 3..4; epoch 4 from 5
    assert ack_outcome(AppendAck(5, False, 0, 9, 8, 2), log=ours, next_index=9) == Resend(5)
    # An epoch we never had: the hint stands.
    assert ack_outcome(AppendAck(5, False, 0, 9, 6, 3), log=ours, next_index=9) == Resend(6)


# -- takeover: which log a new leader adopts ---------------------------------------------


def position(node_id: str, epochs: Sequence[int]) -> rules.LogPosition:
    log = EpochLog(epochs)
    return rules.LogPosition(node_id, epochs[-1] if epochs else 0, len(epochs), tuple(log.epoch_history()))


def test_the_common_prefix_ends_where_the_epoch_runs_part() -> None:
    assert rules.common_prefix(position("a", [1, 1, 2, 2]), position("b", [1, 1, 2, 2])) == 4
    assert rules.common_prefix(position("a", [1, 1, 2]), position("b", [1, 1, 2, 2, 2])) == 3
    assert rules.common_prefix(position("a", [1, 1, 3, 3]), position("b", [1, 1, 4])) == 2
    assert rules.common_prefix(position("a", [1, 3]), position("b", [2, 2])) == 0
    assert rules.common_prefix(position("a", []), position("b", [1])) == 0


@given(
    prefix=st.lists(st.integers(1, 4), max_size=8),
    a=st.lists(st.integers(3, 6), max_size=6),
    b=st.lists(st.integers(3, 6), max_size=6),
)
def test_the_common_prefix_of_two_leaders_suffixes_is_the_shared_log(
    prefix: list[int], a: list[int], b: list[int]
) -> None:
    """Two logs that share ``prefix`` and then hold entries of different leaders (epochs
    no other log has: odd ones on one side, even on the other) agree exactly up to it."""
    prefix = sorted(prefix)
    base = prefix[-1] if prefix else 0
    left = prefix + sorted(base + 2 * e + 1 for e in a)
    right = prefix + sorted(base + 2 * e + 2 for e in b)
    assert rules.common_prefix(position("a", left), position("b", right)) == len(prefix)
    assert rules.common_prefix(position("b", right), position("a", left)) == len(prefix)


def test_a_new_leader_keeps_its_log_when_it_is_the_most_advanced() -> None:
    mine = position("n0", [1, 1, 2])
    assert rules.choose_log(mine, [mine, position("n1", [1, 1]), position("n2", [1, 1, 2])], tail_index=3) is None


def test_a_new_leader_fetches_a_longer_log_of_the_same_epoch_without_a_cut() -> None:
    mine, longer = position("n0", [1, 1]), position("n1", [1, 1, 1, 1])
    assert rules.choose_log(mine, [mine, longer], tail_index=2) == rules.Adopt(longer, None)


def test_a_new_leader_cuts_its_divergent_suffix_before_fetching() -> None:
    # Our entries of epoch 3 were never committed: a later leader (epoch 4) wrote there.
    mine, newer = position("n0", [1, 1, 3, 3, 3]), position("n1", [1, 1, 4])
    assert rules.choose_log(mine, [mine, newer], tail_index=5) == rules.Adopt(newer, 2)
    # A log of a later epoch wins even when shorter; a longer one of an older epoch does not.
    older = position("n2", [1, 1, 3, 3, 3, 3, 3])
    assert rules.choose_log(mine, [mine, older, newer], tail_index=5) == rules.Adopt(newer, 2)


# -- sans-IO -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    ["rules", "progress", "leader_core", "follower_core", "promises", "roles", "replica_events", "replica_core"],
)
def test_the_sans_io_core_imports_no_trio(module: str) -> None:
    probe = f"import sys, walstore.replication.{module}; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


# -- the leader's watch over its lease and quorum ----------------------------------------


def watch(now: float, answered_at: Sequence[float] = (), **changes: object) -> object:
    args: dict[str, object] = dict(
        deadline=100.0, lost=False, needed=1, grace_s=1.5, stall_s=0.25, planned_wake=now, answered_at=answered_at
    )
    args.update(changes)
    return rules.watch_quorum(now=now, **args)  # type: ignore[arg-type]


def test_a_lost_or_expired_lease_steps_down_first() -> None:
    assert watch(10.0, [9.9], lost=True) == rules.StepDown(lost=True)
    assert watch(100.0, [99.9]) == rules.StepDown(lost=False)  # the deadline, to the tick
    assert watch(10.0, [], lost=True, needed=0) == rules.StepDown(lost=True)


def test_the_watch_sleeps_until_the_quorum_or_the_lease_would_run_out() -> None:
    assert watch(10.0, [9.0, 2.0]) == rules.WakeAt(10.5)  # the most recent answer + grace
    assert watch(10.0, [9.0, 9.5], needed=2) == rules.WakeAt(10.5)  # the 2nd most recent
    assert watch(10.0, [9.9], deadline=10.2) == rules.WakeAt(10.2)  # the lease runs out first
    assert watch(10.0, [], needed=0, deadline=30.0) == rules.WakeAt(30.0)  # a cluster of one


def test_no_answers_from_a_majority_within_the_grace_resigns() -> None:
    assert watch(10.0, [8.5]) == rules.Resign()
    assert watch(10.0, []) == rules.Resign()  # nobody connected
    assert watch(10.0, [9.9], needed=2) == rules.Resign()  # one answer of the two needed


def test_a_watch_that_woke_late_looks_again_a_heartbeat_later_before_resigning() -> None:
    # Planned for 9.0, woke at 10.0: our loop stalled, the answers may be unread.
    assert watch(10.0, [8.0], planned_wake=9.0) == rules.WakeAt(10.25)
    assert watch(10.25, [8.0], planned_wake=10.25) == rules.Resign()  # on time now: resign
    assert watch(10.3, [10.1], planned_wake=10.25) == rules.WakeAt(10.1 + 1.5)  # they answered


@given(
    now=st.floats(0, 1e6, allow_nan=False),
    heard_back=st.floats(0, 10, allow_nan=False),
    grace_s=st.floats(1e-3, 10, allow_nan=False),
    late=st.floats(0, 1, allow_nan=False),
)
def test_the_watch_never_wakes_at_or_before_now(now: float, heard_back: float, grace_s: float, late: float) -> None:
    """The busy loop the simulator found: ``now - heard_at < grace`` while
    ``heard_at + grace == now`` in floating point. Whatever the floats, a WakeAt is later
    than now (the rule checks it too)."""
    heard_at = now - heard_back
    decision = watch(now, [heard_at], grace_s=grace_s, deadline=now + 50.0, planned_wake=now - late)
    assert isinstance(decision, rules.Resign) or (isinstance(decision, rules.WakeAt) and decision.at > now)


def test_the_float_edge_that_once_busy_looped() -> None:
    heard_at, grace_s = 134.364, 2.558
    now = heard_at + grace_s  # 136.922
    assert now - heard_at < grace_s  # 2.5579999999999927: the old test said the quorum held
    assert watch(now, [heard_at], grace_s=grace_s, deadline=now + 50) == rules.Resign()  # not WakeAt(now)
