"""Replication on in-process clusters: quorum commit, catch-up, divergence, fencing,
takeover, forwarding. Real nodes and sockets, in-memory election (see cluster_inprocess)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.cluster_inprocess import InProcessCluster, in_process_cluster, replicator
from walstore import _native
from walstore.config import PeerSpec
from walstore.election.membership import Member
from walstore.errors import CorruptionError, OutcomeUnknown, ProtocolError, UnavailableError
from walstore.event import NewEvent
from walstore.node import Node
from walstore.protocol import (
    Append,
    AppendAck,
    Forward,
    ForwardResult,
    Heartbeat,
    Message,
    PeerConnection,
    Prepare,
    Promise,
)
from walstore.replication.follower import FollowerService
from walstore.replication.follower_core import Link
from walstore.replication.leader import LeaderTerm
from walstore.replication.leader_core import LeaderCore
from walstore.replication.promises import Superseded
from walstore.replication.replica_log import ReplicaLog
from walstore.replication.takeover import take_over
from walstore.replication.transport import PeerChannel, dial, serve_peers
from walstore.wal.log import WriteAheadLog
from walstore.wal.record import FLAG_BATCH_END, KIND_EVENT
from walstore.wal.simfs import SimulatedFileSystem
from walstore.wal.writer import GroupCommitWriter
from walstore.watermark import Watermark


def event(aggregate: str = "agg", n: int = 0, expected: int | None = None, pad: int = 0) -> NewEvent:
    payload = orjson.dumps({"n": n, "pad": "x" * pad})
    return NewEvent(str(uuid.uuid4()), "T", aggregate, payload, b"{}", expected)


def log_bytes(node: Node) -> bytes:
    wal = node.wal
    return wal.read_raw(1, 1 << 30) if wal.last_index else b""


async def wait_converged(cluster: InProcessCluster, timeout_s: float = 10.0) -> None:
    """Every running node holds the same log and has applied all of it."""
    with trio.fail_after(timeout_s):
        while True:
            nodes = list(cluster.nodes.values())
            logs = {log_bytes(n) for n in nodes}
            if len(logs) == 1 and all(n.applied.value == n.wal.last_index for n in nodes):
                return
            await trio.sleep(0.05)


async def test_writes_commit_with_one_follower_down_and_stop_with_two(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        first = await leader.append([event(n=1)])
        assert first[0].index == 1
        followers = [k for k in cluster.nodes if k != leader.config.node_id]
        await cluster.stop(followers[0])
        second = await leader.append([event(n=2)])
        assert second[0].index == 2
        await cluster.stop(followers[1])
        # Still believing in its followers, the leader appends but cannot commit: the
        # answer is "unknown", never a success.
        with pytest.raises((OutcomeUnknown, UnavailableError)):
            await leader.append([event(n=3)])
        assert leader.commit.value == leader.store.event_to_log_index(2)
        # Once it has heard from nobody for a lease, it refuses at once (definite 503).
        await trio.sleep(cluster.lease_ttl_s)
        with trio.fail_after(0.5), pytest.raises(UnavailableError) as info:
            await leader.append([event(n=4)])
        assert info.value.http_status == 503
        assert leader.store.last_applied_event_index == 2


async def test_an_append_waiting_when_the_term_ends_is_unknown_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for a commit ends with the term (504 outcome_unknown), not at the append
    timeout: the leader's appends wait on ``applied``, and a term's end interrupts it."""
    import threading

    release = threading.Event()
    async with in_process_cluster(tmp_path, append_timeout_s=30.0) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        await leader.append([event(n=1)])
        for node in cluster.nodes.values():
            if node is not leader:  # followers stay connected but sync nothing: no acks
                real = node.writer._write_round

                def held(job: list[Any], real: Any = real) -> int:
                    release.wait(30)
                    return int(real(job))

                monkeypatch.setattr(node.writer, "_write_round", held)
        outcome: list[str] = []

        async def append() -> None:
            try:
                await leader.append([event(n=2)])
            except OutcomeUnknown:
                outcome.append("unknown")
            else:
                outcome.append("committed")

        try:
            with trio.fail_after(5):  # far below the 30 s append timeout
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(append)
                    await trio.sleep(0.3)
                    assert not outcome  # waiting: no follower has synced it
                    assert leader.replicator is not None
                    leader.replicator.step_down()
        finally:
            release.set()
        assert outcome == ["unknown"]


async def test_follower_restarted_catches_up_byte_identical(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        lagger = next(k for k in cluster.nodes if k != leader.config.node_id)
        await cluster.stop(lagger)
        for i in range(300):  # ~3 MiB: several 1 MiB segments to catch up from
            await leader.append([event(f"a{i % 7}", i, pad=2000) for _ in range(5)])
        await cluster.start(lagger)
        await wait_converged(cluster)
        assert cluster.nodes[lagger].store.last_applied_event_index == 1500
        assert len(cluster.nodes[lagger].wal.segment_paths) > 1


async def test_divergent_uncommitted_suffix_is_truncated(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path, append_timeout_s=0.5) as cluster:
        await cluster.start_all()
        old = await cluster.leader()
        old_id = old.config.node_id
        committed = await old.append([event("x", 1)])
        others = [k for k in cluster.nodes if k != old_id]
        for k in others:
            await cluster.stop(k)
        # Appended on the old leader only: never committed, never acknowledged.
        for i in range(3):
            with pytest.raises((OutcomeUnknown, UnavailableError)):
                await old.append([event("x", 100 + i)])
        stale_tail = old.wal.last_index
        await cluster.stop(old_id)
        for k in others:
            await cluster.start(k)
        new = await cluster.leader()
        fresh = await new.append([event("y", 2)])
        await cluster.start(old_id)
        await wait_converged(cluster)
        rejoined = cluster.nodes[old_id]
        assert rejoined.wal.last_index <= stale_tail + 2
        assert rejoined.store.read_aggregate("x", 1, 100, "forward").version == 1
        assert rejoined.store.lookup(committed[0].event_id) == committed[0]
        assert rejoined.store.lookup(fresh[0].event_id) == fresh[0]


async def test_deposed_leader_frames_are_rejected(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        first = await cluster.leader()
        # Depose the first leader so that an older epoch exists to replay frames from.
        first_epoch = replicator(first).epoch
        cluster.hub.expire_lease(first.config.node_id)
        with trio.fail_after(10):
            while replicator(leader := await cluster.leader()).epoch <= first_epoch:  # noqa: ASYNC110 - polls state across nodes
                await trio.sleep(0.05)
        await leader.append([event()])
        await wait_converged(cluster)  # nothing legitimate is still on its way to the follower
        follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
        epoch = follower.rlog.promised_epoch
        assert epoch > 1
        before = log_bytes(follower)
        tail = follower.wal.last_index
        stale = _native.encode_batch([b"late"], [KIND_EVENT], [FLAG_BATCH_END], epoch - 1, tail + 1)
        # Pretend to be the leader of an older epoch (same cluster, a known node id).
        channel = await dial(
            "127.0.0.1", follower.peer_port, cluster_id="event-store", node_id=leader.config.node_id, epoch=epoch - 1
        )
        try:
            await channel.send(Append(epoch - 1, tail, follower.wal.last_epoch, tail + 1, stale))
            ack = await channel.receive()
            await channel.send(Prepare(epoch - 1, leader.config.node_id))
            promise = await channel.receive()
        finally:
            await channel.aclose()
        assert isinstance(ack, AppendAck) and not ack.ok and ack.epoch == epoch
        assert isinstance(promise, Promise) and not promise.ok and promise.promised_epoch == epoch
        assert log_bytes(follower) == before


async def test_claimed_higher_epoch_without_election_changes_nothing(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
        epoch = follower.rlog.promised_epoch
        other = next(k for k in cluster.nodes if k not in (leader.config.node_id, follower.config.node_id))
        channel = await dial("127.0.0.1", follower.peer_port, cluster_id="event-store", node_id=other, epoch=10**9)
        try:
            await channel.send(Prepare(10**9, other))
            promise = await channel.receive()
        finally:
            await channel.aclose()
        assert isinstance(promise, Promise) and not promise.ok
        assert follower.rlog.promised_epoch == epoch
        assert replicator(leader).writable
        result = await leader.append([event()])
        assert result[0].index >= 1


async def test_takeover_adopts_most_advanced_log(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        ids = list(cluster.nodes)
        behind = next(k for k in ids if k != leader.config.node_id)
        await cluster.stop(behind)
        acked = [await leader.append([event("z", i)]) for i in range(20)]
        await cluster.stop(leader.config.node_id)
        node = await cluster.start(behind)
        cluster.hub.force_leader(behind)
        new = await cluster.leader()
        assert new is node  # the node that missed the writes leads, having fetched them
        for result in acked:
            assert new.store.lookup(result[0].event_id) == result[0]
        assert new.store.read_aggregate("z", 1, 100, "forward").version == 20


async def test_writes_through_a_follower_are_forwarded_and_readable_there(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
        results = await follower.append([event("f", 1), event("g", 1)])
        assert [r.index for r in results] == [1, 2]
        read = await follower.read_aggregate("f", from_version=1, limit=10, direction="forward", min_index=2)
        assert read.version == 1 and read.events[0].id == results[0].event_id
        # A conflict on the leader comes back as the same 409 through the follower.
        from walstore.errors import ConflictError

        with pytest.raises(ConflictError):
            await follower.append([event("f", 2, expected=0)])


async def test_disk_full_on_the_leader_steps_it_down_without_reusing_indexes(tmp_path: Path) -> None:
    """ENOSPC on the leader: its failed batch may already be on the followers, so it must
    stop appending in that epoch at once (reusing those indexes with other content would
    split the log), step down, and catch up as a follower once space returns."""
    disks = {k: SimulatedFileSystem(seed=i) for i, k in enumerate(["n0", "n1", "n2"])}
    async with in_process_cluster(tmp_path, append_timeout_s=2.0) as cluster:
        await cluster.start_all(fs=disks)
        old = await cluster.leader()
        acked = [await old.append([event("d", i)]) for i in range(10)]
        disks[old.config.node_id].fail_writes_after(3000)
        outcomes = {"ok": 0, "unavailable": 0}
        with trio.move_on_after(15):
            for i in range(200):
                try:
                    acked.append(await (await cluster.leader()).append([event("d", 100 + i)]))
                    outcomes["ok"] += 1
                except (OutcomeUnknown, UnavailableError):
                    outcomes["unavailable"] += 1
        new = await cluster.leader()
        assert new is not old and outcomes["ok"] > 0
        disks[old.config.node_id].clear_faults()
        await wait_converged(cluster, timeout_s=20)
        for node in cluster.nodes.values():
            for result in acked:
                assert node.store.lookup(result[0].event_id) == result[0]


# -- HEARTBEAT: the commit index alone, unanswered -----------------------------------------

EPOCH = 7


async def _local_log(tmp_path: Path, nursery: trio.Nursery) -> ReplicaLog:
    wal = WriteAheadLog.open(tmp_path / "wal")
    writer = GroupCommitWriter(wal)
    await nursery.start(writer.run)
    return ReplicaLog(wal, writer)


def _records(first: int, count: int, epoch: int = EPOCH) -> bytes:
    flags = [0] * (count - 1) + [FLAG_BATCH_END]
    return _native.encode_batch([b"r%d" % i for i in range(count)], [KIND_EVENT] * count, flags, epoch, first)


async def _linked_pair(ours: str, theirs: str) -> tuple[PeerChannel, PeerChannel]:
    """Two PeerChannels over an in-memory stream pair, HELLOs exchanged: (dialler, acceptor)."""
    a, b = trio.testing.memory_stream_pair()
    client = PeerChannel(a, PeerConnection("event-store", ours, "client"), "mem-client")
    server = PeerChannel(b, PeerConnection("event-store", theirs, "server"), "mem-server")
    await client.send(client.conn.hello(EPOCH))
    await server.receive()
    await server.send(server.conn.hello(0))
    await client.receive()
    return client, server


async def test_heartbeat_moves_a_followers_commit_only_up_to_what_its_link_matched(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        rlog = await _local_log(tmp_path, nursery)
        commit = Watermark()

        async def verify(epoch: int, leader_id: str) -> bool:
            return (epoch, leader_id) == (EPOCH, "leader")

        service = FollowerService(rlog, commit, verify_leader=verify, on_leader_seen=lambda e, n: None)
        leader, follower = await _linked_pair("leader", "follower")

        async def serve() -> None:
            await service.serve(follower, await follower.receive())

        nursery.start_soon(serve)

        async def append(prev: int, prev_epoch: int, leader_commit: int, entries: bytes = b"") -> AppendAck:
            # Answers leave in request order, so once this APPEND is answered every
            # HEARTBEAT sent before it has been dealt with.
            await leader.send(Append(EPOCH, prev, prev_epoch, leader_commit, entries))
            ack = await leader.receive()
            assert isinstance(ack, AppendAck)
            return ack

        # Nothing matched on this link yet: a HEARTBEAT changes nothing (and is not answered).
        await leader.send(Heartbeat(EPOCH, 1000, 0))
        ack = await append(0, 0, 0, _records(1, 3))
        assert ack.ok and ack.match_index == 3 and commit.value == 0
        await leader.send(Heartbeat(EPOCH, 2, 0))
        assert (await append(3, EPOCH, 0)).ok
        assert commit.value == 2
        # Never past what the link matched, whatever the leader claims.
        await leader.send(Heartbeat(EPOCH, 1000, 0))
        assert (await append(3, EPOCH, 0)).ok
        assert commit.value == 3
        # Another epoch than the matched one: ignored.
        assert (await append(3, EPOCH, 3, _records(4, 2))).match_index == 5
        # An empty APPEND at 3 proves our log equal to the leader's only up to 3, though
        # we hold 5: a HEARTBEAT after it moves the commit no further than 3.
        assert (await append(3, EPOCH, 3)).match_index == 3
        await leader.send(Heartbeat(EPOCH, 5, 0))
        assert (await append(3, EPOCH, 3)).ok
        assert commit.value == 3
        assert (await append(5, EPOCH, 3)).match_index == 5
        await leader.send(Heartbeat(EPOCH + 1, 5, 0))
        assert (await append(5, EPOCH, 3)).ok
        assert commit.value == 3
        # A refused APPEND forgets what the link matched.
        assert (await append(5, EPOCH, 3, _records(6, 2))).match_index == 7
        assert not (await append(99, EPOCH, 3)).ok
        await leader.send(Heartbeat(EPOCH, 7, 0))
        assert (await append(7, EPOCH, 5)).ok
        assert commit.value == 5
        await leader.send(Heartbeat(EPOCH, 7, 0))
        assert (await append(7, EPOCH, 5)).ok
        assert commit.value == 7
        nursery.cancel_scope.cancel()


async def test_heartbeat_from_an_unconfirmed_peer_changes_nothing(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        rlog = await _local_log(tmp_path, nursery)
        commit = Watermark()

        async def nobody(epoch: int, leader_id: str) -> bool:
            return False

        service = FollowerService(rlog, commit, verify_leader=nobody, on_leader_seen=lambda e, n: None)
        peer, follower = await _linked_pair("stranger", "follower")

        async def serve() -> None:
            await service.serve(follower, await follower.receive())

        nursery.start_soon(serve)
        await peer.send(Heartbeat(EPOCH, 1000, 0))
        await peer.send(Append(EPOCH, 0, 0, 1000, _records(1, 2)))
        ack = await peer.receive()
        await peer.send(Heartbeat(EPOCH, 1000, 0))
        await peer.send(Append(EPOCH, 0, 0, 1000, b""))
        second = await peer.receive()
        assert isinstance(ack, AppendAck) and not ack.ok
        assert isinstance(second, AppendAck) and not second.ok
        assert commit.value == 0 and rlog.tail_index == 0
        nursery.cancel_scope.cancel()


async def test_leader_ships_cached_batches_and_sends_the_commit_in_an_unanswered_heartbeat(tmp_path: Path) -> None:
    """A fake follower that acknowledges every APPEND: the leader streams submitted batches
    from its tail cache (several per frame when they queued up), then tells the new commit
    index in a HEARTBEAT, and carries on without an answer to it."""
    received: list[Message] = []
    frames: trio.MemorySendChannel[Message]
    frames, frames_out = trio.open_memory_channel[Message](100)

    async def fake_follower(channel: PeerChannel) -> None:
        while True:
            message = await channel.receive()
            received.append(message)
            await frames.send(message)
            if isinstance(message, Append):
                last = _native.scan(bytes(message.entries), 0, message.prev_index + 1).next_index - 1
                await channel.send(AppendAck(message.epoch, True, last, last, 0, 0))

    async with trio.open_nursery() as nursery:
        rlog, term = await _term_with_fake_follower(tmp_path, nursery, fake_follower)
        commit = term.commit
        first = rlog.submit([(KIND_EVENT, 0, b"one")], EPOCH)
        second = rlog.submit([(KIND_EVENT, 0, b"two"), (KIND_EVENT, 0, b"three")], EPOCH)
        term.appended(first)
        term.appended(second)
        nursery.start_soon(term.run)
        with trio.fail_after(10):
            append = await frames_out.receive()
            assert isinstance(append, Append) and append.prev_index == 0
            assert bytes(append.entries) == first.data + second.data
            beat = await frames_out.receive()
            assert isinstance(beat, Heartbeat) and beat.epoch == EPOCH and beat.leader_commit == 3
            assert commit.value == 3
            third = rlog.submit([(KIND_EVENT, 0, b"four")], EPOCH)
            term.appended(third)
            following = await frames_out.receive()
            assert isinstance(following, Append) and following.prev_index == 3 and following.leader_commit == 3
            assert bytes(following.entries) == third.data
            assert isinstance(await frames_out.receive(), Heartbeat)
        assert commit.value == 4
        assert [type(m).__name__ for m in received] == ["Append", "Heartbeat", "Append", "Heartbeat"]
        nursery.cancel_scope.cancel()


async def _held_follower_term(
    tmp_path: Path, nursery: trio.Nursery, release: trio.Event, received: list[Append]
) -> tuple[ReplicaLog, LeaderTerm, trio.MemoryReceiveChannel[Append]]:
    """A leader term whose one (fake) follower reads every frame but answers nothing until
    ``release`` is set, then acknowledges every APPEND it got, in order."""
    frames, frames_out = trio.open_memory_channel[Append](1000)

    async def fake_follower(channel: PeerChannel) -> None:
        unanswered, to_answer = trio.open_memory_channel[Append](1000)

        async def answer() -> None:
            await release.wait()
            async for message in to_answer:
                last = _native.scan(bytes(message.entries), 0, message.prev_index + 1).next_index - 1
                await channel.send(AppendAck(message.epoch, True, max(last, message.prev_index), last, 0, 0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            while True:
                message = await channel.receive()
                if isinstance(message, Append):
                    received.append(message)
                    await frames.send(message)
                    await unanswered.send(message)

    rlog, term = await _term_with_fake_follower(tmp_path, nursery, fake_follower)
    return rlog, term, frames_out


async def _follower_listener(nursery: trio.Nursery, handler: Callable[[PeerChannel], Awaitable[None]]) -> int:
    """A real peer listener for node "follower" whose connections ``handler`` serves: its port."""
    port: int = await nursery.start(
        lambda task_status: serve_peers(
            "127.0.0.1",
            0,
            cluster_id="event-store",
            node_id="follower",
            epoch=lambda: 0,
            handler=handler,
            task_status=task_status,
        )
    )
    return port


async def _term_with_fake_follower(
    tmp_path: Path, nursery: trio.Nursery, handler: Callable[[PeerChannel], Awaitable[None]]
) -> tuple[ReplicaLog, LeaderTerm]:
    """A local log and a leader term (not running yet) whose one follower is ``handler``
    behind a real peer listener."""
    rlog = await _local_log(tmp_path, nursery)
    port = await _follower_listener(nursery, handler)
    commit = Watermark()
    core = LeaderCore(
        epoch=EPOCH,
        start_index=1,
        followers=[PeerSpec("follower", "127.0.0.1", port)],
        tail_index=rlog.tail_index,
        commit=commit.value,
        votes=lambda node_id, incarnation: True,
    )
    term = LeaderTerm(
        core=core,
        node_id="leader",
        cluster_id="event-store",
        rlog=rlog,
        commit=commit,
        heartbeat_s=3600,  # no idle heartbeat gets in the way
        on_higher_epoch=lambda epoch, peer: None,
    )
    term.progress["follower"].next_index = 1
    return rlog, term


async def test_a_peer_that_promised_a_newer_epoch_supersedes_the_takeover(tmp_path: Path) -> None:
    """take_over raises Superseded itself, not inside an ExceptionGroup from its nursery
    that the role machine's `except Superseded` would miss (it stopped the node: found by
    the simulator, seed 5258 with 5 nodes)."""

    async def newer_promise(channel: PeerChannel) -> None:
        prepare = await channel.receive()
        assert isinstance(prepare, Prepare)
        await channel.send(Promise(prepare.epoch, False, prepare.epoch + 5, 0, 0, 0, ()))

    async with trio.open_nursery() as nursery:
        rlog = await _local_log(tmp_path, nursery)
        port = await _follower_listener(nursery, newer_promise)
        members = {"leader": Member("leader", rlog.incarnation, True, 1)}
        with trio.fail_after(10), pytest.raises(Superseded, match="follower promised epoch 12"):
            await take_over(
                epoch=7,
                node_id="leader",
                cluster_id="event-store",
                peers=[PeerSpec("follower", "127.0.0.1", port)],
                rlog=rlog,
                commit=Watermark(),
                timeout_s=5.0,
                members=members,
            )
        nursery.cancel_scope.cancel()


async def test_a_takeover_every_peer_has_answered_without_a_majority_fails_at_once(tmp_path: Path) -> None:
    """Nothing more can come once every peer has answered: the takeover fails then, not at
    its timeout (seen in the fault matrix: a first takeover whose member records were read
    before the others registered counted both as learners and waited out the lease)."""

    async def promise(channel: PeerChannel) -> None:
        prepare = await channel.receive()
        assert isinstance(prepare, Prepare)
        await channel.send(Promise(prepare.epoch, True, prepare.epoch, 0, 0, 0, ()))

    async with trio.open_nursery() as nursery:
        rlog = await _local_log(tmp_path, nursery)
        ports = [await _follower_listener(nursery, promise) for _ in range(2)]
        members = {"leader": Member("leader", rlog.incarnation, True, 1)}  # the peers not recorded yet
        # The hang guard is far below the takeover's own timeout: reaching it is the bug.
        with trio.fail_after(60), pytest.raises(UnavailableError, match=r"learners not counted: \['f0', 'f1'\]"):
            await take_over(
                epoch=7,
                node_id="leader",
                cluster_id="event-store",
                peers=[PeerSpec(f"f{i}", "127.0.0.1", port) for i, port in enumerate(ports)],
                rlog=rlog,
                commit=Watermark(),
                timeout_s=3600.0,
                members=members,
            )
        nursery.cancel_scope.cancel()


async def test_rot_found_reading_the_leaders_log_for_a_follower_stops_the_term(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the stream alone: a stream stopped for good would leave that follower behind for
    the whole term, retrying nothing (found by the simulator, seeds 2185 and 2313: the
    healed cluster never converged)."""

    async def silent_follower(channel: PeerChannel) -> None:
        while True:
            await channel.receive()

    async with trio.open_nursery() as nursery:
        rlog, term = await _term_with_fake_follower(tmp_path, nursery, silent_follower)
        rlog.submit([(KIND_EVENT, 0, b"sealed")], EPOCH)  # not in the term's tail cache: read from disk
        await rlog.drain()

        def rotten(first: int, max_bytes: int) -> bytes:
            raise CorruptionError("/wal/00000000000000000001.wal", 64, "crc mismatch")

        monkeypatch.setattr(rlog, "read_raw", rotten)
        with trio.fail_after(10), pytest.RaisesGroup(pytest.RaisesExc(CorruptionError), flatten_subgroups=True):
            await term.run()
        nursery.cancel_scope.cancel()


async def test_batches_submitted_while_a_frame_is_unanswered_go_out_as_one_frame(tmp_path: Path) -> None:
    """Under client load one frame is in flight: what arrives meanwhile waits for its answer
    and then travels together (fewer frames, wake-ups and answers on both sides)."""
    release = trio.Event()
    received: list[Append] = []
    async with trio.open_nursery() as nursery:
        rlog, term, frames_out = await _held_follower_term(tmp_path, nursery, release, received)
        first = rlog.submit([(KIND_EVENT, 0, b"first")], EPOCH)
        term.appended(first)
        nursery.start_soon(term.run)
        with trio.fail_after(10):
            assert bytes((await frames_out.receive()).entries) == first.data
            later = []
            for i in range(5):
                pending = rlog.submit([(KIND_EVENT, 0, b"later-%d" % i)], EPOCH)
                term.appended(pending)
                later.append(pending)
                await trio.sleep(0.01)  # the sender runs between submits: it must still wait
            assert len(received) == 1  # nothing more while the first is unanswered
            release.set()
            second = await frames_out.receive()
        assert second.prev_index == 1 and bytes(second.entries) == b"".join(p.data for p in later)
        nursery.cancel_scope.cancel()


async def test_a_follower_far_behind_gets_frames_pipelined(tmp_path: Path) -> None:
    """Catching up (at least PIPELINE_MIN_ENTRIES waiting), several frames leave before the
    first answer, up to WINDOW."""
    from walstore.replication import progress as progress_module

    release = trio.Event()
    received: list[Append] = []
    async with trio.open_nursery() as nursery:
        rlog, term, frames_out = await _held_follower_term(tmp_path, nursery, release, received)
        term.max_append_bytes = 4096  # many frames for the backlog
        backlog = 3 * progress_module.PIPELINE_MIN_ENTRIES  # > WINDOW frames of ~100 entries beyond it
        for i in range(backlog):
            term.appended(rlog.submit([(KIND_EVENT, 0, b"b%d" % i)], EPOCH))
        nursery.start_soon(term.run)
        with trio.fail_after(10):
            for _ in range(progress_module.WINDOW):
                await frames_out.receive()
            await trio.sleep(0.2)
            assert len(received) == progress_module.WINDOW  # the window is full: no more yet
            release.set()
            while (
                received[-1].prev_index
                + _native.scan(bytes(received[-1].entries), 0, received[-1].prev_index + 1).count
                < backlog
            ):
                await frames_out.receive()
        nursery.cancel_scope.cancel()


async def test_a_resend_overlapping_records_still_in_flight_is_taken_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader that reconnects resends from the follower's last acknowledged index, which
    can overlap records the follower has submitted but not yet synced. Their epoch is not
    in the log yet: the follower waits for them to be written and compares then (it used
    to stop with LogStateError, found by the simulator, seed 107)."""
    import threading

    release = threading.Event()
    async with trio.open_nursery() as nursery:
        rlog = await _local_log(tmp_path, nursery)
        real = rlog.writer._write_round

        def held(job: list[Any]) -> int:
            release.wait(10)
            return int(real(job))

        monkeypatch.setattr(rlog.writer, "_write_round", held)

        async def verify(epoch: int, leader_id: str) -> bool:
            return True

        service = FollowerService(rlog, Watermark(), verify_leader=verify, on_leader_seen=lambda e, n: None)
        first = await service.handle(Append(EPOCH, 0, 0, 0, _records(1, 3)), "leader", Link())
        assert rlog.tail_index == 3 and rlog.durable_index == 0  # in flight

        async def write_soon() -> None:
            await trio.sleep(0.2)
            release.set()

        nursery.start_soon(write_soon)
        again = await service.handle(Append(EPOCH, 0, 0, 0, _records(1, 5)), "leader", Link())  # a new connection
        acks = [first.message, again.message]
        assert all(isinstance(a, AppendAck) and a.ok for a in acks)
        assert [a.match_index for a in acks if isinstance(a, AppendAck)] == [3, 5] and rlog.tail_index == 5
        await rlog.drain()
        assert [r.index for r in rlog.wal.read(1)] == [1, 2, 3, 4, 5]
        nursery.cancel_scope.cancel()


async def test_a_replayed_forward_is_refused_not_appended_again() -> None:
    """TCP never replays a frame; a FORWARD received twice on one connection is a broken
    or hostile peer. Acting on the copy appended a write whose client had been told it
    failed (503 not_leader from a node still taking over; found by the simulator, seed
    7084): the leader closes the connection instead, and appends the request once."""
    from walstore.replication.forward import encode_events, serve_forwards

    follower, leader = await _linked_pair("follower", "leader")
    appended: list[list[NewEvent]] = []

    async def append(events: list[NewEvent], tracking: object) -> list[Any]:
        appended.append(events)
        raise UnavailableError("not the leader", code="not_leader")

    forward = Forward(7, encode_events([NewEvent(str(uuid.uuid4()), "T", "agg", b"{}", b"{}", None)], None))
    await follower.send(forward)
    first = await leader.receive()
    assert isinstance(first, Forward)
    with (
        trio.fail_after(5),
        pytest.RaisesGroup(pytest.RaisesExc(ProtocolError, match="request 7 received twice"), flatten_subgroups=True),
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_forwards, leader, first, append)
            answer = await follower.receive()
            assert isinstance(answer, ForwardResult) and answer.status == 503
            await follower.send(forward)  # the replay
    assert len(appended) == 1
