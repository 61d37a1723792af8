"""EtcdElection against real etcd servers (1 and 3 members), plus the etcd3 import check.

Timing assertions are deliberately loose (a loaded 2-core machine); the measured failover
numbers are printed (run with -s to see them)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio

from walstore.election.base import Candidate, Election, LeaderInfo, Leadership
from walstore.election.etcd import EtcdElection, parse_endpoints
from walstore.election.etcd_process import EtcdCluster
from walstore.election.membership import counts, promote, register, replace
from walstore.errors import ConfigError, ElectionError

# Fixtures: etcd_server, etcd_cluster3, dead_etcd_endpoint.
pytest_plugins = ["etcd_harness"]

REPO = Path(__file__).resolve().parent.parent
TTL = 1  # etcd's minimum with the harness's 100 ms election timeout: fast tests
CLUSTER = "test"


def _conforms(election: EtcdElection) -> Election:
    return election  # mypy checks that EtcdElection implements the Election protocol


def cand(node_id: str) -> Candidate:
    return Candidate(node_id, f"{node_id}:7000", f"{node_id}:8080")


def election(endpoints: list[str], ttl_s: int = TTL) -> EtcdElection:
    return EtcdElection(endpoints, CLUSTER, ttl_s=ttl_s)


def etcd_gateway(cluster: EtcdCluster, path: str, body: Mapping[str, object]) -> dict[str, object]:
    """Talk to etcd's JSON gateway directly, bypassing the code under test."""
    url = next(m.client_url for m in cluster.members if m.running)
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        result: dict[str, object] = json.loads(response.read())
    return result


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def sees(e: EtcdElection, leader: LeaderInfo | None, timeout_s: float = 10.0) -> None:
    """Wait until ``e`` observes ``leader`` (through watch_leader: no polling)."""
    with trio.fail_after(timeout_s):
        async for seen in e.watch_leader():
            if seen == leader:
                return
    raise AssertionError(f"watch ended before {leader} was seen")


async def win(e: EtcdElection, node_id: str, timeout_s: float = 10.0) -> Leadership:
    with trio.fail_after(timeout_s):
        return await e.campaign(cand(node_id))


async def lose(leadership: Leadership, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        await leadership.lost.wait()


class Campaigns:
    """Run campaigns in the background; ``next_winner()`` waits for the next one to win."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.send, self.receive = trio.open_memory_channel[tuple[str, Leadership, float]](10)
        self.won: list[tuple[str, Leadership, float]] = []

    def start(self, e: EtcdElection, node_id: str) -> None:
        async def run() -> None:
            leadership = await e.campaign(cand(node_id))
            await self.send.send((node_id, leadership, trio.current_time()))

        self.nursery.start_soon(run)

    async def next_winner(self, timeout_s: float = 10.0) -> tuple[str, Leadership, float]:
        with trio.fail_after(timeout_s):
            self.won.append(await self.receive.receive())
        return self.won[-1]

    def no_other_winner(self) -> bool:
        try:
            self.won.append(self.receive.receive_nowait())
        except trio.WouldBlock:
            return True
        return False


def test_etcd3_imports_cleanly_with_current_protobuf() -> None:
    code = (
        "import walstore.election.etcd as m\n"
        "e = m.load_etcd3()\n"
        "import google.protobuf as pb\n"
        "from google.protobuf.internal import api_implementation as impl\n"
        "r = e.etcdrpc.LeaseGrantRequest(TTL=2, ID=None)\n"
        "assert r.SerializeToString() == b'\\x08\\x02'\n"
        "print(pb.__version__, impl.Type())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    version, implementation = done.stdout.split()
    assert int(version.split(".")[0]) >= 4
    assert implementation == "python"


def test_protobuf_c_backend_gives_a_clear_election_error() -> None:
    code = (
        "import walstore.election.etcd as m\n"
        "from walstore.errors import ElectionError\n"
        "try:\n"
        "    m.load_etcd3()\n"
        "except ElectionError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="upb")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python" in done.stdout


def test_settings_are_validated() -> None:
    assert parse_endpoints("a:1, http://b:2/") == [("a", 1), ("b", 2)]
    assert parse_endpoints(["[::1]:2379"]) == [("[::1]", 2379)]
    for bad in ("", "a", "a:b", "a:0", "a:70000", ":1", "https://a:1"):
        with pytest.raises(ConfigError):
            parse_endpoints(bad)
    with pytest.raises(ConfigError):
        EtcdElection(["a:1"], CLUSTER, ttl_s=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        EtcdElection(["a:1"], "bad/cluster")
    with pytest.raises(ConfigError):
        EtcdElection(["a:1"], CLUSTER, rpc_timeout_s=0)


async def test_one_winner_then_higher_epochs_on_resign_and_lost_keep_alive(
    etcd_server: EtcdCluster,
) -> None:
    eps = etcd_server.endpoints
    async with (
        election(eps) as a, election(eps) as b, election(eps) as c, election(eps) as watcher,
        trio.open_nursery() as nursery,
    ):  # fmt: skip
        by_name = {"a": a, "b": b, "c": c}
        campaigns = Campaigns(nursery)
        for name, e in by_name.items():
            campaigns.start(e, name)
        first_name, first, _ = await campaigns.next_winner()
        await trio.sleep(3 * TTL)  # keep-alives hold it: nobody else wins
        assert campaigns.no_other_winner()
        assert first.is_valid()
        await sees(watcher, first.info)

        # 1. Resign: another candidate wins at once, with a higher epoch.
        resigned_at = trio.current_time()
        await by_name[first_name].resign(first)
        assert first.lost_reason == "resigned"
        second_name, second, second_at = await campaigns.next_winner()
        assert second_name != first_name and second.epoch > first.epoch
        assert second_at - resigned_at < TTL  # the revoke freed the key; no lease expiry wait
        await sees(watcher, second.info)

        # 2. The winner's keep-alives stop: it loses by its deadline, then a third wins.
        suspended_at = trio.current_time()
        deadline = second.deadline()
        by_name[second_name].suspend_keep_alive()
        await lose(second)
        lost_after = trio.current_time() - suspended_at
        assert second.lost_reason == "no successful keep-alive before the deadline"
        assert trio.current_time() >= deadline - 0.05
        third_name, third, _ = await campaigns.next_winner()
        assert third_name not in (first_name, second_name)
        assert third.epoch > second.epoch
        print(f"\nkeep-alives stopped -> lost after {lost_after:.3f}s (TTL {TTL}s)")
        assert lost_after <= TTL + 0.5
        for e in (a, b, c, watcher):
            await sees(e, third.info)
        nursery.cancel_scope.cancel()


async def test_watch_leader_follows_changes(etcd_server: EtcdCluster) -> None:
    eps = etcd_server.endpoints
    send, seen = trio.open_memory_channel[LeaderInfo | None](10)
    async with election(eps) as a, election(eps) as b, election(eps) as watcher:

        async def watch() -> None:
            async with send:
                async for leader in watcher.watch_leader():
                    await send.send(leader)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with trio.fail_after(10):
                assert await seen.receive() is None
                la = await win(a, "a")
                assert await seen.receive() == la.info
                await a.resign(la)
                assert await seen.receive() is None
                lb = await win(b, "b")
                assert await seen.receive() == lb.info
                await watcher.aclose()
                with pytest.raises(trio.EndOfChannel):  # closing ended the watch
                    await seen.receive()
        assert lb.epoch > la.epoch


async def test_key_deleted_behind_our_back_ends_leadership(etcd_server: EtcdCluster) -> None:
    async with election(etcd_server.endpoints) as a:
        held = await win(a, "a")
        # An operator deletes the key (etcdctl del): the watch tells the holder at once.
        deleted_at = trio.current_time()
        await trio.to_thread.run_sync(
            etcd_gateway, etcd_server, "/v3/kv/deleterange", {"key": b64(f"/walstore/{CLUSTER}/election")}
        )
        await lose(held)
        assert held.lost_reason == "election key deleted or taken over"
        assert trio.current_time() - deleted_at < TTL
        # It can win again, with a higher epoch.
        again = await win(a, "a")
        assert again.epoch > held.epoch


async def test_garbage_in_the_key_is_no_leader(etcd_server: EtcdCluster) -> None:
    await trio.to_thread.run_sync(
        etcd_gateway, etcd_server, "/v3/kv/put",
        {"key": b64(f"/walstore/{CLUSTER}/election"), "value": b64("not json")},
    )  # fmt: skip
    async with election(etcd_server.endpoints) as a:
        with trio.move_on_after(0.3):
            await a.campaign(cand("a"))  # the key is taken (by garbage): it waits
        assert a.current_leader() is None


async def test_etcd_stopped_then_restarted(etcd_server: EtcdCluster) -> None:
    async with election(etcd_server.endpoints) as a, election(etcd_server.endpoints) as b:
        held = await win(a, "a")
        await trio.sleep(TTL)
        stopped_at = trio.current_time()
        await trio.to_thread.run_sync(etcd_server.stop_member, 0)
        await lose(held)
        lost_after = trio.current_time() - stopped_at
        print(f"\netcd stopped -> leader lost after {lost_after:.3f}s (TTL {TTL}s)")
        assert lost_after <= TTL + 0.5
        assert held.lost_reason == "no successful keep-alive before the deadline"
        assert not held.is_valid()

        # etcd comes back with its data: the old lease has expired there (or will), and a
        # new campaign wins with a higher epoch; observers resync.
        await trio.to_thread.run_sync(etcd_server.start_member, 0)
        with trio.fail_after(15):
            new = await win(b, "b")
        assert new.epoch > held.epoch
        await sees(a, new.info)


async def test_a_dead_endpoint_first_in_the_list_is_skipped(etcd_server: EtcdCluster, dead_etcd_endpoint: str) -> None:
    endpoints = [dead_etcd_endpoint, *etcd_server.endpoints]
    async with election(endpoints) as a:
        with trio.fail_after(5):
            held = await win(a, "a")
        await trio.sleep(3 * TTL)  # many keep-alives, each one past the dead endpoint
        assert held.is_valid()
        await sees(a, held.info)


async def test_all_endpoints_dead_campaign_keeps_trying(dead_etcd_endpoint: str) -> None:
    async with election([dead_etcd_endpoint]) as a:
        with trio.move_on_after(0.5) as scope:
            await a.campaign(cand("a"))
        assert scope.cancelled_caught
        assert a.current_leader() is None


async def test_aclose_fails_a_pending_campaign(etcd_server: EtcdCluster) -> None:
    async with election(etcd_server.endpoints) as a, election(etcd_server.endpoints) as b:
        held = await win(a, "a")
        errors: list[ElectionError] = []

        async def campaign_b() -> None:
            try:
                await b.campaign(cand("b"))
            except ElectionError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(campaign_b)
            await sees(b, held.info)
            await b.aclose()
        assert errors and "closed" in str(errors[0])
        with pytest.raises(ElectionError):
            await b.campaign(cand("b"))


async def test_cancelled_campaign_leaves_the_key_free(etcd_server: EtcdCluster) -> None:
    eps = etcd_server.endpoints
    async with election(eps) as a, election(eps) as b:
        held = await win(a, "a")
        with trio.move_on_after(0.3):
            await b.campaign(cand("b"))
        await a.resign(held)
        await sees(b, None)
        await trio.sleep(0.3)
        result = await trio.to_thread.run_sync(
            etcd_gateway, etcd_server, "/v3/kv/range", {"key": b64(f"/walstore/{CLUSTER}/election")}
        )
        assert "kvs" not in result  # nobody holds it: b's abandoned campaign left nothing


async def test_campaign_cancelled_at_any_moment_leaves_no_key_behind(etcd_server: EtcdCluster) -> None:
    """Cancel campaigns on a free key at many points of their grant/transaction round trip:
    if one is cancelled after its transaction landed, its lease must be revoked with it."""
    key = {"key": b64(f"/walstore/{CLUSTER}/election")}
    async with election(etcd_server.endpoints) as a:
        outcomes = {"won": 0, "cancelled": 0}
        for attempt in range(40):
            held: Leadership | None = None
            with trio.move_on_after(attempt * 0.0005):
                held = await a.campaign(cand("a"))
            if held is not None:
                outcomes["won"] += 1
                await a.resign(held)
            else:
                outcomes["cancelled"] += 1
            result = await trio.to_thread.run_sync(etcd_gateway, etcd_server, "/v3/kv/range", key)
            assert "kvs" not in result, f"attempt {attempt}: a cancelled campaign left {result}"
        assert outcomes["cancelled"] > 0 and outcomes["won"] > 0, outcomes


async def test_three_member_cluster_survives_a_killed_and_a_paused_member(
    etcd_cluster3: EtcdCluster,
) -> None:
    cluster = etcd_cluster3
    raft_leader = await trio.to_thread.run_sync(cluster.leader_index)
    assert raft_leader is not None
    # Fail a member that is not raft leader (a raft re-election is etcd's business, not
    # ours), and list it first so that every election starts out talking to it.
    victim = (raft_leader + 1) % 3
    eps = [cluster.endpoints[victim]] + [e for i, e in enumerate(cluster.endpoints) if i != victim]
    async with (
        election(eps, ttl_s=2) as a, election(eps, ttl_s=2) as b, election(eps, ttl_s=2) as c,
        trio.open_nursery() as nursery,
    ):  # fmt: skip
        by_name = {"a": a, "b": b, "c": c}
        campaigns = Campaigns(nursery)
        for name, e in by_name.items():
            campaigns.start(e, name)
        first_name, first, _ = await campaigns.next_winner()

        await trio.to_thread.run_sync(cluster.kill_member, victim)
        await trio.sleep(2)  # three keep-alive rounds, through the other members
        assert first.is_valid(), first.lost_reason
        assert campaigns.no_other_winner()

        await by_name[first_name].resign(first)
        _, second, _ = await campaigns.next_winner()
        assert second.epoch > first.epoch

        # Restart it, then hang it (SIGSTOP: connections open, nothing answers).
        await trio.to_thread.run_sync(cluster.start_member, victim)
        await trio.to_thread.run_sync(cluster.pause_member, victim)
        try:
            await trio.sleep(2)
            assert second.is_valid(), second.lost_reason
        finally:
            await trio.to_thread.run_sync(cluster.resume_member, victim)
        for e in (a, b, c):
            await sees(e, second.info)
        nursery.cancel_scope.cancel()


async def test_member_records_on_etcd_follow_the_same_rule(etcd_server: EtcdCluster) -> None:
    """The membership transitions of test_membership, on a real etcd: first start votes,
    another incarnation is a learner, only the current epoch promotes, replace is refused
    below a voting majority, and a record an operator garbled gives nobody a vote."""
    cluster = f"members-{uuid.uuid4().hex[:12]}"
    inc = [f"{n:032x}" for n in (1, 2, 3, 4)]
    async with (
        EtcdElection(etcd_server.endpoints, cluster, ttl_s=TTL) as e0,
        EtcdElection(etcd_server.endpoints, cluster, ttl_s=TTL) as e1,
    ):
        assert (await register(e0, "n0", inc[0])).voter
        assert (await register(e1, "n1", inc[1])).voter
        assert (await register(e1, "n2", inc[2])).voter
        learner = await register(e1, "n1", inc[3])
        assert (learner.incarnation, learner.voter) == (inc[3], False)
        assert (await register(e1, "n1", inc[3])) == learner  # restarting changes nothing
        held = await e0.campaign(Candidate("n0", "n0:7000", "n0:8080"))
        assert not await promote(e0, learner, held.epoch - 1)
        assert await promote(e0, learner, held.epoch)
        assert counts(await e1.read_members(), "n1", inc[3])
        await e0.resign(held)
        assert (await replace(e1, "n2", 3)).incarnation is None
        with pytest.raises(ElectionError, match="fewer than a majority"):
            await replace(e1, "n0", 3)
        relearn = await register(e1, "n2", inc[2])
        assert not relearn.voter  # replaced: whatever disk it brings, it starts as a learner
        assert not await promote(e0, relearn, held.epoch)  # the key is gone: no leader promotes
        await trio.to_thread.run_sync(
            etcd_gateway, etcd_server, "/v3/kv/put",
            {"key": b64(f"/walstore/{cluster}/members/n9"), "value": b64("not json")},
        )  # fmt: skip
        assert "n9" not in await e0.read_members()


def test_a_watch_started_on_a_closed_channel_is_an_election_error(dead_etcd_endpoint: str) -> None:
    """aclose() can close the gRPC channel while the observer's thread is starting a watch
    (seen from `walstore member list`, which opens and closes an election at once): that
    is an ElectionError like any other failed call, not a ValueError escaping the nursery."""
    from walstore.election.etcd import _Endpoints, _WatchStream

    endpoints = _Endpoints(parse_endpoints(dead_etcd_endpoint), 0.5)
    client = endpoints.client(0)
    client.channel.close()
    with pytest.raises(ElectionError, match="watch could not start"):
        _WatchStream(client, "/walstore/test/election", 1)
    endpoints.close()
