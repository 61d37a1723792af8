"""Issue 11, "no request outlives a lost leadership", on in-process clusters (real nodes and
sockets, the in-memory election; see cluster_inprocess): a leader that hears from no
majority resigns within about a lease, one silent follower costs it nothing, a forwarded
write is answered within a lease (504 once sent, 503 while not), and a leader whose event
loop stood still past its lease answers what it held the moment it runs again.

The real-process rows (SIGSTOP, partitions through the TCP proxy) are in
test_faults_process.py; these pin the same bounds down in a few seconds each.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.lowlevel

from tests.cluster_inprocess import InProcessCluster, in_process_cluster, replicator
from walstore.config import PeerSpec
from walstore.errors import OutcomeUnknown, UnavailableError
from walstore.event import NewEvent
from walstore.node import Node
from walstore.replication.forward import CONNECT_SHARE, Forwarder

LEASE_TTL_S = 2.0
# Far above every bound asserted here: a wait that ends at it is the bug, not the fix.
APPEND_TIMEOUT_S = 30.0
# Scheduling slack on a loaded 2-core machine.
SLACK_S = 0.5


def event(n: int = 0) -> NewEvent:
    return NewEvent(str(uuid.uuid4()), "T", "agg", orjson.dumps({"n": n}), b"{}", None)


def others(cluster: InProcessCluster, leader: Node) -> list[Node]:
    return [n for n in cluster.nodes.values() if n is not leader]


def hold_disks(nodes: list[Node], release: threading.Event, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nodes stay connected but sync nothing, so they answer nothing either: a follower
    answers in order, and its empty APPENDs queue behind the held write (a blackholed link
    looks the same to the leader)."""
    for node in nodes:
        real = node.writer._write_round

        def held(job: list[Any], real: Any = real) -> int:
            release.wait(60)
            return int(real(job))

        monkeypatch.setattr(node.writer, "_write_round", held)


async def wait_not_leading(node: Node, timeout_s: float) -> float:
    """Seconds until ``node`` stops being writable; TooSlowError after ``timeout_s``."""
    started = trio.current_time()
    with trio.fail_after(timeout_s):
        while True:
            if not replicator(node).writable:
                return trio.current_time() - started
            await trio.sleep(0.01)


async def test_a_leader_no_follower_answers_resigns_within_a_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off from its peers but not from etcd: it must give up within ~0.75 TTL of its last
    majority answer (it took TTL + 2 TTL, polled: ~6.5 s at a 2 s lease), so that the others
    can elect within ~a lease plus a takeover. Its waiting append is 504 when it resigns."""
    release = threading.Event()
    async with in_process_cluster(tmp_path, lease_ttl_s=LEASE_TTL_S, append_timeout_s=APPEND_TIMEOUT_S) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        await leader.append([event(1)])
        epoch = replicator(leader).epoch
        try:
            hold_disks(others(cluster, leader), release, monkeypatch)
            outcome: list[BaseException] = []
            answered_after: list[float] = []

            async def append() -> None:
                started = trio.current_time()
                try:
                    await leader.append([event(2)])
                except (OutcomeUnknown, UnavailableError) as exc:
                    outcome.append(exc)
                answered_after.append(trio.current_time() - started)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(append)
                resigned_s = await wait_not_leading(leader, 3 * LEASE_TTL_S)
        finally:
            release.set()
        assert resigned_s <= LEASE_TTL_S * 0.75 + SLACK_S, f"resigned after {resigned_s:.2f}s"
        assert [type(e) for e in outcome] == [OutcomeUnknown]
        assert answered_after[0] <= LEASE_TTL_S * 0.75 + SLACK_S
        # It resigned in etcd too (the key is free at once, not after the TTL): someone
        # else can lead with a higher epoch.
        assert cluster.hub.leader() is None or cluster.hub.leader().epoch > epoch  # type: ignore[union-attr]


async def test_one_silent_follower_costs_the_leader_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quorum is the leader plus one follower: the other may be as slow as it likes."""
    release = threading.Event()
    async with in_process_cluster(tmp_path, lease_ttl_s=LEASE_TTL_S, append_timeout_s=APPEND_TIMEOUT_S) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        await leader.append([event(1)])
        epoch = replicator(leader).epoch
        try:
            hold_disks(others(cluster, leader)[:1], release, monkeypatch)
            started = trio.current_time()
            n = 2
            while trio.current_time() - started < 3 * LEASE_TTL_S:
                with trio.fail_after(LEASE_TTL_S):
                    await leader.append([event(n)])
                n += 1
                await trio.sleep(0.2)
            assert replicator(leader).writable and replicator(leader).epoch == epoch
        finally:
            release.set()


async def test_a_forward_the_leader_never_answers_is_504_within_a_lease(tmp_path: Path) -> None:
    """A leader that has the FORWARD and says nothing (paused, or its answers blackholed):
    the client hears 504 after a TTL, not after the 30 s append timeout."""
    async with in_process_cluster(tmp_path, lease_ttl_s=LEASE_TTL_S, append_timeout_s=APPEND_TIMEOUT_S) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        follower = others(cluster, leader)[0]
        await follower.append([event(1)])  # the forwarding link is up

        async def never(events: list[NewEvent], tracking: object = None) -> Any:
            await trio.sleep_forever()

        replicator(leader).append_local = never
        follower.replicator.forwarder._channel = None  # type: ignore[union-attr]  # redial: the new handler
        started = trio.current_time()
        with trio.fail_after(LEASE_TTL_S + SLACK_S), pytest.raises(OutcomeUnknown):
            await follower.append([event(2)])
        assert trio.current_time() - started >= LEASE_TTL_S * 0.9


async def test_a_forward_to_a_deposed_leader_is_504_as_soon_as_a_new_epoch_is_promised(tmp_path: Path) -> None:
    """Once this follower has promised a newer leader's epoch, the old one can commit
    nothing more: a write waiting on it is 504 then, not at the end of its lease-long bound
    (clients stuck there stretched the failover the fault rows measure by up to a TTL)."""
    async with in_process_cluster(tmp_path, lease_ttl_s=LEASE_TTL_S, append_timeout_s=APPEND_TIMEOUT_S) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        follower, successor = others(cluster, leader)
        await follower.append([event(1)])

        async def never(events: list[NewEvent], tracking: object = None) -> Any:
            await trio.sleep_forever()

        replicator(leader).append_local = never
        replicator(follower).forwarder._channel = None  # redial: the new handler
        outcome: list[BaseException] = []
        answered = trio.Event()

        async def append() -> None:
            try:
                await follower.append([event(2)])
            except (OutcomeUnknown, UnavailableError) as exc:
                outcome.append(exc)
            answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append)
            await trio.sleep(0.2)
            assert not answered.is_set()
            epoch = follower.rlog.promised_epoch
            forced_at = trio.current_time()
            cluster.hub.force_leader(successor.config.node_id)
            # The successor's takeover (PREPARE, then our promise) takes ~0.1 s here; the
            # forward's own bound would end 1.8 s after the force.
            with trio.fail_after(LEASE_TTL_S / 2):
                await answered.wait()
            answered_after_s = trio.current_time() - forced_at
        assert [type(e) for e in outcome] == [OutcomeUnknown]
        assert follower.rlog.promised_epoch > epoch
        print(f"answered {answered_after_s:.3f}s after the new leader was forced")


async def test_a_forward_to_a_leader_that_never_shakes_hands_is_503_within_its_bound() -> None:
    """TCP accepted, no HELLO (a SIGSTOPped leader: the kernel still accepts): nothing was
    sent, so 503, after the quarter of the forward's bound it may spend connecting, rather
    than after the 5 s handshake timeout (and then the bound on top of it)."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        accepted: list[trio.SocketStream] = []

        async def hold(stream: trio.SocketStream) -> None:
            accepted.append(stream)
            await trio.sleep_forever()

        nursery.start_soon(trio.serve_listeners, hold, listeners)
        forwarder = Forwarder(node_id="n1", cluster_id="c", epoch=lambda: 1)
        nursery.start_soon(forwarder.run)
        await trio.lowlevel.checkpoint()  # let run() open the forwarder's nursery
        bound_s = LEASE_TTL_S
        started = trio.current_time()
        with trio.fail_after(bound_s * CONNECT_SHARE + SLACK_S), pytest.raises(UnavailableError):
            await forwarder.forward(PeerSpec("n0", "127.0.0.1", port), [event(1)], bound_s)
        assert trio.current_time() - started >= bound_s * CONNECT_SHARE * 0.9
        assert accepted, "the listener never saw the connection: the test tested nothing"
        nursery.cancel_scope.cancel()


async def test_a_leader_stopped_past_its_lease_answers_what_it_held_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP in-process: the event loop stands still (a blocking sleep) past the lease
    deadline while an append waits for a commit. Nothing can answer during the stop; at
    the first scheduler pass after it the deadline has passed, and the append must be
    answered then (504), not by a later timer or the 30 s append timeout."""
    release = threading.Event()
    async with in_process_cluster(tmp_path, lease_ttl_s=LEASE_TTL_S, append_timeout_s=APPEND_TIMEOUT_S) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        await leader.append([event(1)])
        answered_at: list[float] = []
        outcome: list[BaseException] = []
        try:
            hold_disks(others(cluster, leader), release, monkeypatch)

            async def append() -> None:
                try:
                    await leader.append([event(2)])
                except (OutcomeUnknown, UnavailableError) as exc:
                    outcome.append(exc)
                answered_at.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(append)
                await trio.sleep(0.1)
                assert not answered_at
                leadership = replicator(leader).leadership
                assert leadership is not None
                # Stop until past the lease deadline (and the quorum grace, whichever
                # comes later does not matter: both have passed when the loop runs again).
                stop_s = max(leadership.deadline() - trio.current_time(), LEASE_TTL_S * 0.75) + 0.2
                time.sleep(stop_s)  # noqa: ASYNC251 -- the point: the whole loop stands still
                resumed_at = trio.current_time()
        finally:
            release.set()
        assert answered_at, "the append was never answered"
        assert answered_at[0] - resumed_at <= 0.1, f"answered {answered_at[0] - resumed_at:.2f}s after resuming"
        assert [type(e) for e in outcome] == [OutcomeUnknown]
