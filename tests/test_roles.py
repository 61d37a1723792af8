"""The role machine's state (walstore/replication/roles.py): the transitions it has, and
the ones it refuses as broken invariants."""

from __future__ import annotations

import pytest

from walstore.election.base import LeaderInfo
from walstore.errors import DiskFullError, FsyncError, LogStateError, UnavailableError
from walstore.replication.promises import Superseded
from walstore.replication.roles import Role, Roles, TakeoverFailed

ME = LeaderInfo("n0", 7, "n0:7000", "n0:8080")
OTHER = LeaderInfo("n1", 8, "n1:7000", "n1:8080")


def test_a_term_from_election_to_writable_and_back() -> None:
    roles = Roles("n0")
    roles.won(7, ME)
    assert (roles.role, roles.term_epoch, roles.leader_id, roles.writable) == (Role.TAKEOVER, 7, "n0", False)
    roles.took_over()
    assert (roles.role, roles.writable) == (Role.LEADER, False)
    roles.became_writable()
    assert roles.writable
    roles.observed(OTHER)  # a leader knows it leads, whatever a stale watch says
    assert roles.leader_id == "n0"
    roles.stop_writes()
    assert (roles.role, roles.writable) == (Role.LEADER, False)
    assert roles.ended(OTHER) is True
    assert (roles.role, roles.term_epoch, roles.leader_id) == (Role.FOLLOWER, 0, "n1")


def test_a_term_ending_forgets_itself_as_the_leader() -> None:
    roles = Roles("n0")
    roles.won(7, ME)
    assert roles.ended(ME) is True  # the election still names us: we know better
    assert roles.leader is None and roles.ended(None) is False


def test_a_follower_takes_the_elections_word_for_the_leader() -> None:
    roles = Roles("n0")
    roles.observed(OTHER)
    assert roles.leader_id == "n1"
    roles.observed(None)
    assert roles.leader_id is None


@pytest.mark.parametrize(
    "steps, message",
    [
        (["won", "won"], "won epoch 7 while candidate"),
        (["took_over"], "took over epoch 0 while follower"),
        (["won", "became_writable"], "writable while candidate"),
        (["became_writable"], "writable while follower"),
        (["won", "took_over", "took_over"], "took over epoch 7 while leader"),
    ],
)
def test_transitions_the_machine_does_not_have_are_broken_invariants(steps: list[str], message: str) -> None:
    roles = Roles("n0")
    calls = {
        "won": lambda: roles.won(7, ME),
        "took_over": roles.took_over,
        "became_writable": roles.became_writable,
    }
    with pytest.raises(LogStateError, match=message):
        for step in steps:
            calls[step]()


def test_winning_as_another_node_or_epoch_zero_is_a_broken_invariant() -> None:
    with pytest.raises(LogStateError, match="won epoch 8 as n1"):
        Roles("n0").won(8, OTHER)
    with pytest.raises(LogStateError, match="won epoch 0"):
        Roles("n0").won(0, ME)


@pytest.mark.parametrize("role", ["takeover", "leader"])
def test_only_another_node_with_a_higher_epoch_ends_our_term(role: str) -> None:
    roles = Roles("n0")
    roles.won(7, ME)
    if role == "leader":
        roles.took_over()
    assert roles.yields_to("n1", 8)
    assert not roles.yields_to("n1", 7)  # our own epoch, or an older one, is no newer leader
    assert not roles.yields_to("n1", 3)
    assert not roles.yields_to("n0", 9)  # ourselves: nobody to yield to


def test_a_follower_has_no_term_to_end() -> None:
    assert not Roles("n0").yields_to("n1", 100)


@pytest.mark.parametrize(
    ("error", "means"),
    [
        (LogStateError("replica invariant broken: a gap"), TakeoverFailed.STOP),
        (FsyncError(5, "/wal/meta.json.tmp"), TakeoverFailed.STOP),
        (Superseded(9, "n2"), TakeoverFailed.RESIGN),
        (UnavailableError("no majority promised", code="no_quorum"), TakeoverFailed.RESIGN),
        (DiskFullError("no space left for the promise"), TakeoverFailed.RESIGN),
        (ConnectionResetError(), TakeoverFailed.RESIGN),
    ],
)
def test_a_failed_takeover_resigns_unless_our_own_log_broke(error: BaseException, means: TakeoverFailed) -> None:
    assert Roles.after_failed_takeover(error) is means
