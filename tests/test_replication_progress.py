"""One follower's stream as the leader keeps it (walstore/replication/progress.py), value
by value: what a new link or a new incarnation resets, when the next frame waits, what a
caught-up follower is sent, what each answer does to the stream. No trio, no socket."""

from __future__ import annotations

import pytest
from epoch_log import EpochLog, records
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore.config import PeerSpec
from walstore.errors import LogStateError, ProtocolError
from walstore.protocol import AppendAck
from walstore.replication import rules
from walstore.replication.progress import (
    PIPELINE_MIN_ENTRIES,
    WINDOW,
    FollowerProgress,
    Idle,
    SendHeartbeat,
    reachable_voters,
)

EPOCH = 5


def stream(**fields: object) -> FollowerProgress:
    progress = FollowerProgress(PeerSpec("n1", "localhost", 1))
    for name, value in fields.items():
        setattr(progress, name, value)
    return progress


def ok(match: int) -> AppendAck:
    return AppendAck(EPOCH, True, match, match, 0, 0)


def refused(last_index: int, conflict_index: int = 0, *, epoch: int = EPOCH) -> AppendAck:
    return AppendAck(epoch, False, 0, last_index, conflict_index, 0)


# -- the link ------------------------------------------------------------------------------


def test_the_first_link_starts_at_our_tail() -> None:
    p = stream()
    assert p.link_up("inc-a", tail_index=40) is None
    assert (p.connected, p.incarnation, p.match_index, p.next_index, p.generation) == (True, "inc-a", 0, 41, 1)


def test_a_new_link_resumes_after_what_was_acknowledged() -> None:
    p = stream()
    p.link_up("inc-a", tail_index=10)
    p.append_sent(prev=10, last=12, commit=3)
    p.answered(ok(12), epoch=EPOCH, log=EpochLog([1] * 14), now=1.0)
    p.append_sent(prev=12, last=14, commit=3)  # lost with the link
    p.link_down()
    assert p.link_up("inc-a", tail_index=20) is None
    assert (p.match_index, p.next_index, list(p.in_flight), p.acked_on_link) == (12, 13, [], False)


def test_another_incarnation_starts_again_from_nothing() -> None:
    p = stream()
    p.link_up("inc-a", tail_index=10)
    p.append_sent(prev=10, last=12, commit=3)
    p.answered(ok(12), epoch=EPOCH, log=EpochLog([1] * 12), now=1.0)
    p.set_voter(False, now=2.0)
    assert p.link_up("inc-b", tail_index=30) == "inc-a"
    assert (p.incarnation, p.match_index, p.next_index, p.learner_since) == ("inc-b", 0, 31, None)


def test_a_learner_is_timed_from_when_it_was_first_seen() -> None:
    p = stream()
    p.set_voter(False, now=5.0)
    p.set_voter(False, now=9.0)
    assert (p.voter, p.learner_since) == (False, 5.0)
    p.set_voter(True, now=10.0)
    assert (p.voter, p.learner_since) == (True, None)


def test_only_connected_voters_that_answered_lately_make_a_quorum() -> None:
    fresh_voter = stream(voter=True, connected=True, last_ack_at=10.0)
    old_voter = stream(voter=True, connected=True, last_ack_at=4.0)
    learner = stream(voter=False, connected=True, last_ack_at=10.0)
    gone = stream(voter=True, connected=False, last_ack_at=10.0)
    assert reachable_voters([fresh_voter, old_voter, learner, gone], since=5.0) == 1


# -- sending -------------------------------------------------------------------------------


def test_with_nothing_in_flight_the_next_frame_goes_at_once() -> None:
    p = stream(next_index=11)
    assert not p.must_hold(tail_index=12)


def test_a_few_new_entries_wait_for_the_unanswered_frame() -> None:
    p = stream(next_index=11)
    p.append_sent(prev=10, last=11, commit=0)
    assert p.must_hold(tail_index=13)
    assert not p.must_hold(tail_index=11)  # nothing waiting: a commit-only change is never held


def test_a_follower_far_behind_is_pipelined_up_to_the_window() -> None:
    p = stream(next_index=1)
    tail = 1 + (WINDOW + 1) * PIPELINE_MIN_ENTRIES
    sent = 0
    while not p.must_hold(tail_index=tail):
        p.append_sent(prev=p.next_index - 1, last=p.next_index + 99, commit=0)
        sent += 1
    assert sent == WINDOW


def test_a_caught_up_follower_hears_of_a_new_commit_in_a_heartbeat_once_its_link_matched() -> None:
    p = stream(next_index=11, sent_commit=8)
    assert p.when_caught_up(commit=8) == Idle()
    assert p.when_caught_up(commit=10) is None  # nothing matched on this link: an empty APPEND
    p.acked_on_link = True
    assert p.when_caught_up(commit=10) == SendHeartbeat(10)
    p.heartbeat_sent(10)
    assert p.when_caught_up(commit=10) == Idle()


def test_a_sent_frame_moves_the_stream_on() -> None:
    p = stream(next_index=11, generation=3)
    p.append_sent(prev=10, last=14, commit=7)
    p.append_sent(prev=14, last=None, commit=8)  # empty: proves we lead, carries the commit
    assert (p.next_index, list(p.in_flight), p.sent_commit) == (15, [(3, 14), (3, 14)], 8)


def test_frames_of_one_generation_never_go_backwards() -> None:
    p = stream(next_index=11)
    p.append_sent(prev=10, last=14, commit=0)
    with pytest.raises(LogStateError, match="ending at 12 sent after one ending at 14"):
        p.append_sent(prev=10, last=12, commit=0)
    with pytest.raises(LogStateError, match="an APPEND after 14 ending at 13"):
        p.append_sent(prev=14, last=13, commit=0)


# -- answers -------------------------------------------------------------------------------


def test_an_acceptance_moves_the_match_and_marks_the_link() -> None:
    p = stream()
    p.link_up("inc-a", tail_index=10)
    p.append_sent(prev=10, last=12, commit=0)
    assert p.answered(ok(12), epoch=EPOCH, log=EpochLog([1] * 12), now=3.0) == rules.Matched(12, on_current_link=True)
    assert (p.match_index, p.acked_on_link, p.last_ack_at, list(p.in_flight)) == (12, True, 3.0, [])


def test_a_refusal_resends_in_a_new_generation_and_older_answers_are_stale() -> None:
    p = stream()
    p.link_up("inc-a", tail_index=10)
    p.append_sent(prev=10, last=12, commit=0)
    p.append_sent(prev=12, last=14, commit=0)
    p.acked_on_link = True
    log = EpochLog([1] * 14)
    assert p.answered(refused(last_index=6), epoch=EPOCH, log=log, now=1.0) == rules.Resend(7)
    assert (p.next_index, p.generation, p.acked_on_link) == (7, 2, False)
    assert p.answered(refused(last_index=6), epoch=EPOCH, log=log, now=1.0) == rules.Stale()
    assert (p.next_index, p.generation) == (7, 2)


def test_an_acceptance_of_an_older_generation_counts_but_does_not_mark_the_link() -> None:
    p = stream()
    p.link_up("inc-a", tail_index=10)
    p.append_sent(prev=4, last=6, commit=0)
    p.generation += 1  # a resend happened after this frame went out
    assert p.answered(ok(6), epoch=EPOCH, log=EpochLog([1] * 10), now=1.0) == rules.Matched(6, on_current_link=False)
    assert (p.match_index, p.acked_on_link) == (6, False)


def test_a_higher_epoch_fences_us_and_changes_nothing_else() -> None:
    p = stream()
    p.link_up("inc-a", tail_index=10)
    p.append_sent(prev=10, last=12, commit=0)
    assert p.answered(refused(3, epoch=EPOCH + 2), epoch=EPOCH, log=EpochLog([1] * 12), now=1.0) == rules.Fenced(7)
    assert (p.next_index, p.generation) == (13, 1)


def test_an_answer_to_nothing_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="unexpected APPEND_ACK from n1"):
        stream().answered(ok(3), epoch=EPOCH, log=EpochLog([1] * 3), now=1.0)


# -- a whole stream against a follower whose log diverged ----------------------------------


@st.composite
def diverged_logs(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Our log and a follower's, as epochs per entry, sharing a prefix and then diverged the
    only way two logs can: each suffix written by leaders of epochs the other never saw (one
    leader per epoch, so an epoch's entries are the same wherever they are). Ours ends with
    this term's EPOCH_START, of an epoch above all of them."""
    common = sorted(draw(st.lists(st.integers(1, 3), max_size=20)))
    base = common[-1] if common else 1
    ours = common + sorted(draw(st.lists(st.sampled_from([base + 2, base + 4]), max_size=20)))
    theirs = common + sorted(draw(st.lists(st.sampled_from([base + 1, base + 3]), max_size=20)))
    return [*ours, base + 6], theirs


@settings(max_examples=300, deadline=None)
@given(logs=diverged_logs(), frame=st.integers(1, 8))
def test_the_stream_brings_any_follower_to_our_log(logs: tuple[list[int], list[int]], frame: int) -> None:
    """A follower answering as follower.py does (the rules' log matching and placement)
    ends up holding exactly our log, and the match index never passes what it holds of it."""
    ours, follower = logs
    epoch = ours[-1]
    leader_log = EpochLog(ours)
    p = stream()
    p.link_up("inc-a", tail_index=len(ours))
    for _ in range(2 * (len(ours) + len(follower)) + 4):
        if p.match_index == len(ours):
            break
        prev = p.next_index - 1
        last = min(len(ours), prev + frame)
        p.append_sent(prev=prev, last=last if last > prev else None, commit=0)
        theirs = EpochLog(follower)
        refusal = rules.match_prev(theirs, prev, leader_log.epoch_at(prev) or 0)
        if refusal is None:
            placed = rules.place_records(theirs, prev, records(prev + 1, ours[prev:last]) if last > prev else None, 0)
            assert isinstance(placed, rules.Accept)
            if placed.write_from is not None:
                start = prev + placed.write_from
                follower = follower[:start] + ours[start:last]
            ack = AppendAck(epoch, True, placed.match, max(placed.match, len(follower)), 0, 0)
        else:
            assert isinstance(refusal, rules.Refuse)
            ack = AppendAck(epoch, False, 0, len(follower), refusal.conflict_index, refusal.conflict_epoch)
        p.answered(ack, epoch=epoch, log=leader_log, now=0.0)
        assert follower[: p.match_index] == ours[: p.match_index]
    assert follower == ours and p.match_index == len(ours)
