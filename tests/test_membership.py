"""Who may vote (walstore.election.membership): the record transitions on the in-memory
hub, and a property test of the voting rule against a model of disks being lost."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from walstore.election.base import Candidate
from walstore.election.membership import (
    Member,
    counts,
    decode_member,
    encode_member,
    majority,
    promote,
    register,
    replace,
    voter_quorum,
)
from walstore.election.memory import MemoryElection, MemoryElectionHub
from walstore.errors import ElectionError

A, B, C = ("a" * 32, "b" * 32, "c" * 32)


async def test_first_start_votes_and_another_incarnation_is_a_learner() -> None:
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "n0") as election:
        first = await register(election, "n0", A)
        assert (first.incarnation, first.voter) == (A, True)
        again = await register(election, "n0", A)
        assert again == first  # the same directory restarting changes nothing
        wiped = await register(election, "n0", B)
        assert (wiped.incarnation, wiped.voter) == (B, False)
        # The old disk coming back does not vote either: only the recorded incarnation does.
        members = await election.read_members()
        assert not counts(members, "n0", A) and not counts(members, "n0", B)
        back = await register(election, "n0", A)
        assert (back.incarnation, back.voter) == (A, False)


async def test_only_the_current_leader_promotes() -> None:
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "n0") as e0, MemoryElection(hub, "n1") as e1:
        await register(e1, "n1", A)
        learner = await register(e1, "n1", B)
        leadership = await e0.campaign(Candidate("n0", "h:1", "h:2"))
        # A stale epoch (an old leader's) is refused by the same transaction.
        assert not await promote(e0, learner, leadership.epoch - 1)
        assert not (await e0.read_members())["n1"].voter
        assert await promote(e0, learner, leadership.epoch)
        assert counts(await e0.read_members(), "n1", B)
        # The record moved on: a second promotion with the old revision does nothing.
        assert not await promote(e0, learner, leadership.epoch)
        await e0.resign(leadership)
        relearn = await register(e1, "n1", C)
        assert not await promote(e0, relearn, leadership.epoch)  # no longer leading


async def test_replace_refuses_to_leave_no_voting_majority() -> None:
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "op") as election:
        for node_id, inc in (("n0", A), ("n1", B), ("n2", C)):
            await register(election, node_id, inc)
        with pytest.raises(ElectionError, match="no member 'n9'"):
            await replace(election, "n9", 3)
        gone = await replace(election, "n2", 3)
        assert (gone.incarnation, gone.voter) == (None, False)
        with pytest.raises(ElectionError, match="fewer than a majority"):
            await replace(election, "n1", 3)
        assert (await election.read_members())["n1"].voter
        # Whatever disk n2 brings next, it starts as a learner.
        assert not (await register(election, "n2", C)).voter


async def test_a_node_cut_off_from_the_election_can_neither_read_nor_write_records() -> None:
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "n0") as election:
        hub.set_reachable("n0", False)
        with pytest.raises(ElectionError):
            await register(election, "n0", A)
        hub.set_reachable("n0", True)
        assert (await register(election, "n0", A)).voter


def test_member_records_parse_strictly() -> None:
    assert decode_member("n", encode_member(A, True), 7) == Member("n", A, True, 7)
    assert decode_member("n", encode_member(None, False), 7).votes_as("") is False
    for bad in (b"{", b"[]", b'{"incarnation": 1, "voter": true}', b'{"incarnation": null}', b"x" * 2000):
        with pytest.raises(ElectionError):
            decode_member("n", bad, 1)


async def test_unparsable_records_give_nobody_a_vote() -> None:
    hub = MemoryElectionHub()
    hub.members["n0"] = (b"not json", 1)
    async with MemoryElection(hub, "n1") as election:
        await register(election, "n1", A)
        assert set(await election.read_members()) == {"n1"}


# -- the voting rule against a model ------------------------------------------------------


@dataclass
class _Node:
    incarnation: int
    log: int  # entries held, a prefix of the one history (divergence is not modelled here)


@dataclass
class _Model:
    """Nodes, their disks and the member records, with one committed index ``commit``."""

    nodes: list[_Node]
    records: dict[int, tuple[int | None, bool]]
    commit: int = 0
    next_incarnation: int = field(default=100)

    def members(self) -> dict[str, Member]:
        return {
            str(i): Member(str(i), None if inc is None else f"{inc:032x}", voter, 1)
            for i, (inc, voter) in self.records.items()
        }

    def presented(self, i: int) -> str:
        return f"{self.nodes[i].incarnation:032x}"


def _model(size: int) -> _Model:
    return _Model([_Node(i + 1, 0) for i in range(size)], {i: (i + 1, True) for i in range(size)})


def _step(m: _Model, op: tuple[str, int, int]) -> None:
    kind, who, amount = op
    size = len(m.nodes)
    i = who % size
    members = m.members()
    if kind == "commit":
        # The leader's rule: an index commits once a majority of *voters* holds it.
        target = max(n.log for n in m.nodes) + 1 + amount % 3
        holders = sorted(range(size), key=lambda k: (k - i) % size)[: majority(size) + amount % 2]
        for k in holders:
            m.nodes[k].log = max(m.nodes[k].log, target)
        if voter_quorum(members, {str(k): m.presented(k) for k in holders}, size):
            m.commit = max(m.commit, target)
    elif kind == "wipe":
        m.next_incarnation += 1
        m.nodes[i] = _Node(m.next_incarnation, 0)
        if amount % 2:  # registered already; otherwise the old record still stands
            m.records[i] = (m.next_incarnation, False)
    elif kind == "catch_up":
        m.nodes[i].log = max(m.nodes[i].log, min(amount, max(n.log for n in m.nodes)))
    elif kind == "promote":
        inc, voter = m.records[i]
        if not voter and inc == m.nodes[i].incarnation and m.nodes[i].log >= m.commit:
            m.records[i] = (inc, True)  # only after catching up to the commit index
    elif kind == "replace":
        voters = sum(1 for k, (_, v) in m.records.items() if v and k != i)
        if voters >= majority(size):
            m.records[i] = (None, False)


_OPS = st.tuples(
    st.sampled_from(["commit", "wipe", "catch_up", "promote", "replace"]),
    st.integers(0, 4),
    st.integers(0, 50),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([3, 5]), st.lists(_OPS, max_size=30))
# The lost-disk shapes, as fixed seeds: an empty learner promoted too early, and a wiped
# node of a committing majority that has not registered its new directory yet.
@example(3, [("commit", 0, 0), ("wipe", 0, 1), ("promote", 0, 0)])
@example(3, [("commit", 0, 0), ("wipe", 1, 0), ("commit", 2, 0)])
def test_no_voter_majority_lacks_a_committed_entry(size: int, ops: list[tuple[str, int, int]]) -> None:
    """With any mix of voters, learners and amnesiacs (registered or not yet), every set of
    nodes that the rule accepts as a promise majority holds the committed entries: the
    takeover adopts the most advanced of their logs, so nothing committed is lost."""
    m = _model(size)
    for op in ops:
        _step(m, op)
        members = m.members()
        for subset in range(1, 1 << size):
            chosen = [k for k in range(size) if subset >> k & 1]
            if voter_quorum(members, {str(k): m.presented(k) for k in chosen}, size):
                assert max(m.nodes[k].log for k in chosen) >= m.commit, (m, chosen)


def test_the_rule_counts_neither_learners_nor_amnesiacs() -> None:
    """The lost-disk scenario itself: a lagging voter and a wiped node are no majority,
    whether or not the wiped node has registered its new incarnation yet."""
    voters = {k: Member(k, inc, True, 1) for k, inc in (("a", A), ("b", B), ("c", C))}
    assert voter_quorum(voters, {"a": A, "b": B}, 3)
    assert not voter_quorum(voters, {"b": B, "c": "d" * 32}, 3)  # c wiped, not registered
    registered = dict(voters, c=Member("c", "d" * 32, False, 2))
    assert not voter_quorum(registered, {"b": B, "c": "d" * 32}, 3)  # c registered: a learner
    assert not voter_quorum(voters, {"b": B, "c": ""}, 3)  # no incarnation: never a voter


async def test_memory_election_checks_in_trio() -> None:
    # The hub's lease expiry runs on trio's clock: a promotion after the lease ran out fails.
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "n0", ttl_s=1.0) as e0, MemoryElection(hub, "n1", ttl_s=1.0) as e1:
        await register(e1, "n1", A)
        learner = await register(e1, "n1", B)
        leadership = await e0.campaign(Candidate("n0", "h:1", "h:2"))
        hub.set_reachable("n0", False)
        await trio.sleep(1.1)
        hub.set_reachable("n0", True)
        assert not await promote(e0, learner, leadership.epoch)
