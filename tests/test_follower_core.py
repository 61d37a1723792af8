"""The follower's sans-IO core (walstore/replication/follower_core.py), need by need: what
each request asks to have done, in which order, and what it answers when a need succeeds,
fails or is refused. No trio, no disk: the log is a list of epochs that the driver below
changes as the shell would (a cut cuts, a write appends, a drain writes what was in
flight, a promise moves the promised epoch)."""

from __future__ import annotations

import pytest
from epoch_log import records
from follower_shell import MemLog, Shell, append

from walstore.errors import LogStateError, ProtocolError
from walstore.protocol import Append, AppendAck, Fetch, FetchResult, Heartbeat, Prepare, Promise
from walstore.replication.follower_core import (
    Answer,
    CutAfter,
    FollowerCore,
    LeaderSeen,
    Link,
    PersistPromise,
    VerifyLeader,
    WriteRecords,
)

LEADER = "n1"


def core_on(log: MemLog, commit: int = 0) -> tuple[FollowerCore, Shell]:
    return FollowerCore(log, lambda: commit), Shell(log)


# -- epoch fencing -------------------------------------------------------------------------


def test_a_new_epoch_is_confirmed_promised_and_then_written() -> None:
    log = MemLog([1, 1], promised=1)
    core, shell = core_on(log)
    link = Link()
    answer = shell.run(core.on_append(append(3, 2, 1, [3, 3], leader_commit=2), LEADER, link))
    assert shell.kinds() == ["VerifyLeader", "PersistPromise", "LeaderSeen", "WriteRecords"]
    assert answer == Answer(AppendAck(3, True, 4, 4, 0, 0), durable_at=4, commit_to=2)
    assert (log.epochs, log.promised_epoch, core.confirmed) == ([1, 1, 3, 3], 3, (3, LEADER))
    assert (link.epoch, link.matched) == (3, 4)


def test_a_confirmed_leader_is_not_asked_about_again() -> None:
    log = MemLog([1, 1], promised=1)
    core, shell = core_on(log)
    shell.run(core.on_append(append(3, 2, 1, [3]), LEADER, Link()))
    shell.needs.clear()
    shell.run(core.on_append(append(3, 3, 3, [3]), LEADER, Link()))
    assert shell.kinds() == ["LeaderSeen", "WriteRecords"]  # promised already, too


def test_an_epoch_the_election_does_not_confirm_is_refused_unpromised() -> None:
    log = MemLog([1, 1], promised=1)
    core, shell = core_on(log)
    shell.election_confirms = False
    link = Link(epoch=1, matched=2)
    answer = shell.run(core.on_append(append(3, 2, 1, [3]), "n2", link))
    assert shell.kinds() == ["VerifyLeader"]
    assert answer.message == AppendAck(1, False, 0, 2, 0, 0) and answer.durable_at == 0
    assert (log.promised_epoch, core.confirmed, link.matched) == (1, None, 0)


def test_a_lower_epoch_is_refused_with_our_promise_and_needs_nothing() -> None:
    log = MemLog([1, 4], promised=4)
    core, shell = core_on(log)
    answer = shell.run(core.on_append(append(3, 2, 4, [4]), LEADER, Link()))
    assert (shell.kinds(), answer.message) == ([], AppendAck(4, False, 0, 2, 0, 0))


def test_a_promise_made_while_the_election_was_asked_wins() -> None:
    log = MemLog([1], promised=1)
    core, shell = core_on(log)
    shell.during_verify = lambda: setattr(log, "promised_epoch", 5)  # another leader's PREPARE
    answer = shell.run(core.on_append(append(3, 1, 1, [3]), LEADER, Link()))
    assert shell.kinds() == ["VerifyLeader"]
    assert answer.message == AppendAck(5, False, 0, 1, 0, 0) and core.confirmed is None


def test_a_promise_that_did_not_reach_the_disk_refuses_the_frame_until_it_does() -> None:
    log = MemLog([1], promised=1)
    core, shell = core_on(log)
    shell.promise_fails = True
    for _ in range(2):  # the in-memory promise moved up; still not on disk: still refused
        shell.needs.clear()
        answer = shell.run(core.on_append(append(3, 1, 1, [3]), LEADER, Link()))
        assert shell.kinds()[-1] == "PersistPromise"  # no LeaderSeen, no write
        assert isinstance(answer.message, AppendAck) and not answer.message.ok
        assert (log.epochs, log.promised_epoch, log.durable_promise) == ([1], 3, 1)
    shell.promise_fails = False  # space again: the next frame writes the promise, then the records
    shell.needs.clear()
    answer = shell.run(core.on_append(append(3, 1, 1, [3]), LEADER, Link()))
    assert shell.kinds() == ["PersistPromise", "LeaderSeen", "WriteRecords"]
    assert isinstance(answer.message, AppendAck) and answer.message.ok and log.durable_promise == 3


# -- log matching and placement ------------------------------------------------------------


def test_a_prev_that_does_not_match_is_refused_with_a_hint_and_clears_the_link() -> None:
    log = MemLog([1, 2, 2, 2], promised=3)
    core, shell = core_on(log)
    core.confirmed = (3, LEADER)
    link = Link(epoch=3, matched=1)
    answer = shell.run(core.on_append(append(3, 4, 3, [3]), LEADER, link))
    assert answer.message == AppendAck(3, False, 0, 4, 2, 2)  # our epoch 2 starts at 2
    assert (link.epoch, link.matched, log.epochs) == (0, 0, [1, 2, 2, 2])


def test_a_divergent_suffix_is_cut_then_written() -> None:
    log = MemLog([1, 2, 2], promised=3)
    core, shell = core_on(log, commit=1)
    core.confirmed = (3, LEADER)
    answer = shell.run(core.on_append(append(3, 1, 1, [3, 3, 3]), LEADER, Link()))
    assert shell.kinds() == ["LeaderSeen", "CutAfter", "WriteRecords"]
    cut, write = shell.needs[1:]
    assert cut == CutAfter(1, 1, asked_by="n1 (epoch 3)")
    assert isinstance(write, WriteRecords) and write.records.first_index == 2
    assert log.epochs == [1, 3, 3, 3]
    assert answer.message == AppendAck(3, True, 4, 4, 0, 0)


def test_a_refused_cut_answers_a_refusal_and_writes_nothing() -> None:
    log = MemLog([1, 2, 2], promised=3)
    core, shell = core_on(log, commit=3)
    core.confirmed = (3, LEADER)
    shell.cut_refused = True
    answer = shell.run(core.on_append(append(3, 1, 1, [3, 3]), LEADER, Link()))
    assert shell.kinds()[-1] == "CutAfter"
    assert isinstance(answer.message, AppendAck) and not answer.message.ok
    assert log.epochs == [1, 2, 2]


def test_a_resend_of_what_we_hold_writes_nothing_and_is_acknowledged() -> None:
    log = MemLog([1, 3, 3], promised=3)
    core, shell = core_on(log)
    core.confirmed = (3, LEADER)
    answer = shell.run(core.on_append(append(3, 1, 1, [3, 3], leader_commit=9), LEADER, Link()))
    assert "WriteRecords" not in shell.kinds()
    assert answer == Answer(AppendAck(3, True, 3, 3, 0, 0), durable_at=3, commit_to=3)


def test_entries_still_in_flight_are_drained_before_they_are_matched() -> None:
    log = MemLog([1, 3, 3], promised=3, in_flight=2)
    core, shell = core_on(log)
    core.confirmed = (3, LEADER)
    answer = shell.run(core.on_append(append(3, 3, 3, [3]), LEADER, Link()))
    assert shell.kinds() == ["LeaderSeen", "DrainWriter", "WriteRecords"]
    assert isinstance(answer.message, AppendAck) and answer.message.match_index == 4


def test_records_that_fail_their_check_are_a_protocol_error() -> None:
    log = MemLog([1], promised=3)
    core, shell = core_on(log)
    core.confirmed = (3, LEADER)
    bad = bytearray(records(2, [3]).data)
    bad[-1] ^= 1
    with pytest.raises(ProtocolError, match="APPEND entries from n1 are not valid records"):
        shell.run(core.on_append(Append(3, 1, 1, 0, bytes(bad)), LEADER, Link()))
    assert log.epochs == [1]


def test_a_halted_replica_refuses_every_append() -> None:
    log = MemLog([1], promised=3)
    log.halted = "asked to cut a committed entry"
    core, shell = core_on(log)
    answer = shell.run(core.on_append(append(3, 1, 1, [3]), LEADER, Link()))
    assert shell.kinds() == [] and isinstance(answer.message, AppendAck) and not answer.message.ok


def test_two_appends_at_once_are_a_broken_invariant_and_a_closed_one_frees_the_log() -> None:
    log = MemLog([1], promised=1)
    core, _ = core_on(log)
    first = core.on_append(append(3, 1, 1, [3]), LEADER, Link())
    assert next(first) == VerifyLeader(3, LEADER)  # suspended, asking the election
    with pytest.raises(LogStateError, match="two APPENDs"):
        next(core.on_append(append(3, 1, 1, [3]), LEADER, Link()))
    first.close()  # the link was cancelled: the shell closes the handler
    assert next(core.on_append(append(3, 1, 1, [3]), LEADER, Link())) == VerifyLeader(3, LEADER)


def test_a_need_answered_with_the_wrong_kind_is_a_broken_invariant() -> None:
    core, _ = core_on(MemLog([1], promised=1))
    handling = core.on_append(append(3, 1, 1, [3]), LEADER, Link())
    next(handling)
    with pytest.raises(LogStateError, match="answered with str, not bool"):
        handling.send("yes")


# -- HEARTBEAT, PREPARE, FETCH ---------------------------------------------------------------


def test_a_heartbeat_commits_only_what_its_link_matched() -> None:
    log = MemLog([1], promised=1)
    core, shell = core_on(log)
    link = Link()
    assert core.on_heartbeat(Heartbeat(3, 5, 0), LEADER, link) is None  # nothing matched yet
    shell.run(core.on_append(append(3, 1, 1, [3, 3]), LEADER, link))
    assert core.on_heartbeat(Heartbeat(3, 9, 0), LEADER, link) == Answer(None, durable_at=3, commit_to=3)
    assert core.on_heartbeat(Heartbeat(3, 9, 0), "n2", link) is None  # not the confirmed leader


def test_a_prepare_is_promised_after_a_drain_and_reports_the_log() -> None:
    log = MemLog([1, 2, 2], promised=2, in_flight=1)
    core, shell = core_on(log, commit=1)
    answer = shell.run(core.on_prepare(Prepare(4, LEADER), LEADER))
    assert shell.kinds() == ["VerifyLeader", "PersistPromise", "LeaderSeen", "DrainWriter"]
    assert answer.message == Promise(
        epoch=4, ok=True, promised_epoch=4, last_epoch=2, last_index=3, commit_index=1, epoch_history=((1, 1), (2, 2))
    )


def test_a_prepare_naming_another_leader_than_its_sender_is_refused() -> None:
    core, shell = core_on(MemLog([1], promised=1))
    answer = shell.run(core.on_prepare(Prepare(4, "n2"), LEADER))
    assert shell.kinds() == [] and isinstance(answer.message, Promise) and not answer.message.ok


def test_a_fetch_reads_unless_its_epoch_is_below_our_promise() -> None:
    core, shell = core_on(MemLog([1, 2], promised=2))
    assert shell.run(core.on_fetch(Fetch(7, 2, 1, 4096))).message == FetchResult(7, 2, True, 2, b"records from 1")
    assert shell.run(core.on_fetch(Fetch(8, 1, 1, 4096))).message == FetchResult(8, 2, False, 2, b"")
    assert shell.kinds() == ["ReadRecords"]


def test_an_acknowledgement_that_did_not_become_durable_is_replaced_by_a_refusal() -> None:
    core, _ = core_on(MemLog([1, 1, 1], promised=2))
    assert core.not_durable() == AppendAck(2, False, 0, 3, 4, 0)


def test_leader_seen_follows_the_promise() -> None:
    log = MemLog([1], promised=1)
    core, shell = core_on(log)
    shell.run(core.on_append(append(3, 1, 1), LEADER, Link()))
    assert shell.needs[1:] == [PersistPromise(3), LeaderSeen(3, LEADER)]
