"""The in-memory election (and the shared base types) on trio's autojumping MockClock."""

from __future__ import annotations

import itertools
import math

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore.election.base import Candidate, Election, LeaderInfo, Leadership, election_key
from walstore.election.memory import MemoryElection, MemoryElectionHub
from walstore.errors import ConfigError, ElectionError

TTL = 2.0
MARGIN = 0.5


def _conforms(election: MemoryElection) -> Election:
    return election  # mypy checks that MemoryElection implements the Election protocol


def cand(node_id: str) -> Candidate:
    return Candidate(node_id, f"{node_id}.peers:7000", f"{node_id}.http:8080")


class Campaigns:
    """Campaigns running in the background; ``next_winner()`` waits for the next win."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.send, self.receive = trio.open_memory_channel[tuple[str, Leadership]](10)
        self.won: list[tuple[str, Leadership]] = []

    def start(self, election: MemoryElection) -> None:
        async def run() -> None:
            leadership = await election.campaign(cand(election.node_id))
            await self.send.send((election.node_id, leadership))

        self.nursery.start_soon(run)

    async def next_winner(self) -> tuple[str, Leadership]:
        self.won.append(await self.receive.receive())
        return self.won[-1]

    def no_other_winner(self) -> bool:
        try:
            self.won.append(self.receive.receive_nowait())
        except trio.WouldBlock:
            return True
        return False


async def sees(election: MemoryElection, leader: LeaderInfo | None) -> None:
    async for seen in election.watch_leader():
        if seen == leader:
            return
    raise AssertionError(f"watch ended before {leader} was seen")


async def test_exactly_one_leader_at_a_time(autojump_clock: trio.testing.MockClock) -> None:
    hub = MemoryElectionHub()
    async with (
        MemoryElection(hub, "a", ttl_s=TTL) as a,
        MemoryElection(hub, "b", ttl_s=TTL) as b,
        MemoryElection(hub, "c", ttl_s=TTL) as c,
        trio.open_nursery() as nursery,
    ):
        campaigns = Campaigns(nursery)
        for election in (a, b, c):
            campaigns.start(election)
        winner, leadership = await campaigns.next_winner()
        # Keep-alives hold the lease far beyond the TTL; nobody else gets in.
        await trio.sleep(30 * TTL)
        assert campaigns.no_other_winner()
        assert not leadership.lost.is_set()
        assert leadership.is_valid()
        now = trio.current_time()
        assert now < leadership.deadline() <= now + TTL - MARGIN
        assert hub.leader() == leadership.info
        for election in (a, b, c):
            assert election.current_leader() == leadership.info
        assert [info.node_id for info in hub.history] == [winner]
        nursery.cancel_scope.cancel()


async def test_epochs_strictly_increase_across_leaderships(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = MemoryElectionHub()
    async with (
        MemoryElection(hub, "a", ttl_s=TTL) as a,
        MemoryElection(hub, "b", ttl_s=TTL) as b,
        MemoryElection(hub, "c", ttl_s=TTL) as c,
    ):
        elections = {e.node_id: e for e in (a, b, c)}
        async with trio.open_nursery() as nursery:
            campaigns = Campaigns(nursery)
            for e in elections.values():
                campaigns.start(e)
            # Hand leadership on 9 times, three different ways, re-campaigning each loser.
            for round_ in range(9):
                node_id, leadership = await campaigns.next_winner()
                if round_ % 3 == 0:
                    await elections[node_id].resign(leadership)
                elif round_ % 3 == 1:
                    assert hub.expire_lease(node_id)
                else:
                    hub.set_reachable(node_id, False)
                await leadership.lost.wait()
                hub.set_reachable(node_id, True)
                campaigns.start(elections[node_id])
            await campaigns.next_winner()
            nursery.cancel_scope.cancel()
    won = campaigns.won
    epochs = [leadership.epoch for _, leadership in won]
    assert all(x < y for x, y in itertools.pairwise(epochs)), epochs
    assert [info.epoch for info in hub.history] == epochs
    # Each one lost before the next won: never two valid leaderships at once.
    assert all(leadership.lost.is_set() for _, leadership in won[:-1])


async def test_unreachable_leader_loses_by_its_deadline_before_a_new_one_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = MemoryElectionHub()
    async with (
        MemoryElection(hub, "a", ttl_s=TTL, safety_margin_s=MARGIN) as a,
        MemoryElection(hub, "b", ttl_s=TTL, safety_margin_s=MARGIN) as b,
    ):
        first = await a.campaign(cand("a"))
        await trio.sleep(5.1)  # some keep-alives in
        deadline_at_cut = first.deadline()
        hub.set_reachable("a", False)
        cut_at = trio.current_time()
        lost_at = math.inf
        second: list[Leadership] = []
        second_at = math.inf

        async def watch_lost() -> None:
            nonlocal lost_at
            await first.lost.wait()
            lost_at = trio.current_time()

        async def campaign_b() -> None:
            nonlocal second_at
            second.append(await b.campaign(cand("b")))
            second_at = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_lost)
            nursery.start_soon(campaign_b)
        # The last successful keep-alive was sent at deadline_at_cut - TTL + MARGIN.
        last_keep_alive = deadline_at_cut - TTL + MARGIN
        assert cut_at - TTL / 3 <= last_keep_alive <= cut_at
        assert lost_at == pytest.approx(deadline_at_cut)
        assert first.lost_reason == "no successful keep-alive before the deadline"
        assert first.deadline() <= lost_at
        # The hub only frees the key a whole TTL after the last keep-alive: after the margin.
        assert second_at == pytest.approx(last_keep_alive + TTL)
        assert second_at - lost_at == pytest.approx(MARGIN)
        assert second[0].epoch > first.epoch
        # a was cut off: its view is stale (still itself); b sees itself.
        assert a.current_leader() == first.info
        assert b.current_leader() == second[0].info
        # Healing the partition does not revive anything, and a catches up.
        hub.set_reachable("a", True)
        await trio.sleep(0.1)
        assert a.current_leader() == second[0].info
        assert not first.is_valid()
        assert second[0].is_valid()


async def test_resign_hands_over_at_once(autojump_clock: trio.testing.MockClock) -> None:
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "a") as a, MemoryElection(hub, "b") as b:
        first = await a.campaign(cand("a"))
        async with trio.open_nursery() as nursery:
            campaigns = Campaigns(nursery)
            campaigns.start(b)
            await trio.sleep(10)
            resigned_at = trio.current_time()
            await a.resign(first)
            assert first.lost.is_set() and first.lost_reason == "resigned"
            await campaigns.next_winner()
            got_at = trio.current_time()
        assert got_at - resigned_at <= 0.001  # no TTL wait: the revoke deleted the key
        leader = hub.leader()
        assert leader is not None and leader.node_id == "b" and leader.epoch > first.epoch
        await a.resign(first)  # idempotent


async def test_force_leader_while_old_leader_is_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "a") as a, MemoryElection(hub, "b") as b:
        old = await a.campaign(cand("a"))
        async with trio.open_nursery() as nursery:
            campaigns = Campaigns(nursery)
            campaigns.start(b)
            await trio.sleep(1)
            hub.set_reachable("a", False)
            hub.force_leader("b")
            _, new = await campaigns.next_winner()
            # The split-brain window: a does not know yet; fencing is the epochs' job.
            assert not old.lost.is_set() and old.is_valid()
            assert new.epoch > old.epoch
            await old.lost.wait()
            assert trio.current_time() == pytest.approx(old.deadline())
        with pytest.raises(ElectionError):
            hub.force_leader("a")  # not campaigning


async def test_reachable_leader_learns_of_forced_takeover_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "a") as a, MemoryElection(hub, "b") as b:
        old = await a.campaign(cand("a"))
        async with trio.open_nursery() as nursery:
            Campaigns(nursery).start(b)
            await trio.sleep(1)
            forced_at = trio.current_time()
            hub.force_leader("b")
            await old.lost.wait()
            assert trio.current_time() == forced_at
            assert old.lost_reason == "key deleted to force b to lead"


async def test_watch_leader_sees_every_leader(autojump_clock: trio.testing.MockClock) -> None:
    hub = MemoryElectionHub()
    send, seen = trio.open_memory_channel[LeaderInfo | None](10)
    async with MemoryElection(hub, "a") as a, MemoryElection(hub, "b") as b:

        async def watch() -> None:
            async with send:
                async for leader in b.watch_leader():
                    await send.send(leader)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            assert await seen.receive() is None
            la = await a.campaign(cand("a"))
            assert await seen.receive() == la.info
            await a.resign(la)
            assert await seen.receive() is None
            lb = await b.campaign(cand("b"))
            assert await seen.receive() == lb.info
            await b.aclose()
            with pytest.raises(trio.EndOfChannel):  # closing ended the watch
                await seen.receive()
        assert lb.lost_reason == "election closed"
        assert hub.leader() is None  # closing resigned: the key is gone


async def test_aclose_fails_pending_campaign(autojump_clock: trio.testing.MockClock) -> None:
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "a") as a, MemoryElection(hub, "b") as b:
        await a.campaign(cand("a"))
        failed: list[ElectionError] = []

        async def campaign_b() -> None:
            with pytest.raises(ElectionError) as info:
                await b.campaign(cand("b"))
            failed.append(info.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(campaign_b)
            await trio.sleep(3)
            await b.aclose()
        assert "closed" in str(failed[0])
        with pytest.raises(ElectionError):
            await b.campaign(cand("b"))
        await b.aclose()  # idempotent


async def test_campaign_misuse_is_an_election_error(autojump_clock: trio.testing.MockClock) -> None:
    hub = MemoryElectionHub()
    with pytest.raises(ElectionError, match="async with"):
        await MemoryElection(hub, "a").campaign(cand("a"))
    async with MemoryElection(hub, "a") as a:
        with pytest.raises(ElectionError, match="cannot campaign"):
            await a.campaign(cand("b"))
        held = await a.campaign(cand("a"))
        async with MemoryElection(hub, "b") as b, trio.open_nursery() as nursery:
            nursery.start_soon(b.campaign, cand("b"))
            await trio.sleep(1)
            with pytest.raises(ElectionError, match="already running"):
                await b.campaign(cand("b"))
            nursery.cancel_scope.cancel()
        with pytest.raises(ElectionError, match="already leads"):
            await a.campaign(cand("a"))
        await a.resign(held)
        again = await a.campaign(cand("a"))
        assert again.epoch > held.epoch


async def test_cancelled_campaign_leaves_no_lease(autojump_clock: trio.testing.MockClock) -> None:
    hub = MemoryElectionHub()
    async with MemoryElection(hub, "a") as a, MemoryElection(hub, "b") as b:
        held = await a.campaign(cand("a"))
        with trio.move_on_after(5):
            await b.campaign(cand("b"))
        await a.resign(held)
        await trio.sleep(1)
        assert hub.leader() is None  # b gave up: it must not have grabbed the freed key


async def test_lease_settings_are_validated() -> None:
    hub = MemoryElectionHub()
    with pytest.raises(ConfigError):
        MemoryElection(hub, "a", ttl_s=0)
    with pytest.raises(ConfigError):
        MemoryElection(hub, "a", ttl_s=3, safety_margin_s=2.5)  # no room for a keep-alive
    with pytest.raises(ConfigError):
        MemoryElection(hub, "a", ttl_s=3, safety_margin_s=0)


def test_candidate_round_trips_through_json() -> None:
    c = Candidate("event-store-0", "10.0.0.1:7000", "event-store-0.svc:8080")
    info = LeaderInfo.from_json(c.to_json(), 42)
    assert info == LeaderInfo("event-store-0", 42, "10.0.0.1:7000", "event-store-0.svc:8080")
    assert info.candidate == c
    assert c.with_epoch(42) == info


@pytest.mark.parametrize(
    "bad",
    [b"", b"\xff", b"[]", b"null", b"{}", b'{"node_id": 1}', b"[" * 100_000,
     b'{"node_id":"a","peer_address":"p","http_address":"\\u0000"}',
     b'{"node_id":"a","peer_address":"p"}', b'{"node_id":"a","peer_address":"p",'
     b'"http_address":"' + b"x" * 300 + b'"}', b" " * 5000],
)  # fmt: skip
def test_bad_election_values_raise_election_error(bad: bytes) -> None:
    with pytest.raises(ElectionError):
        LeaderInfo.from_json(bad, 1)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode)))
def test_arbitrary_election_values_raise_only_election_error(data: bytes) -> None:
    try:
        info = LeaderInfo.from_json(data, 7)
    except ElectionError:
        return
    assert info.epoch == 7 and info.node_id


@pytest.mark.parametrize("node_id", ["", "a\nb", "x" * 300])
def test_bad_candidates_are_config_errors(node_id: str) -> None:
    with pytest.raises(ConfigError):
        Candidate(node_id, "p:1", "h:2")


def test_election_key() -> None:
    assert election_key("prod-1") == "/walstore/prod-1/election"
    for bad in ("", "a/b", "a b", "x" * 129, "é"):
        with pytest.raises(ConfigError):
            election_key(bad)
