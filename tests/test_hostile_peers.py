"""Hostile peers against a real in-process 3-node cluster (real TCP, real WAL files).

A stranger or a confused node on the peer port sends: garbage, a truncated frame then
EOF, a bad CRC, a header claiming 2^32-1 bytes, a HELLO from another cluster, another
protocol version or our own node id, a message before HELLO, a replayed APPEND, a claimed
higher epoch, an APPEND of made-up entries in the current epoch. Each attack goes to a
follower and to the leader, and after each one the test checks the same promises
(``assert_unharmed``): the node closed the connection (or, where the frame was well-formed,
refused it with its real epoch), nothing in the cluster moved (same leadership object,
same epoch, no new election granted, every node's promised epoch and log bytes as before),
``/health`` answers 200, ``walstore_peer_connections_rejected_total{reason}`` on the target
grew by exactly one where the node closed on a protocol error, and a write through the
leader still commits on all three nodes.

The cluster's election is the in-memory hub: "the election agrees" is the hub's truth, so a
step-down or a new term would show up as a new entry in ``hub.history``.
"""

from __future__ import annotations

import random
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import trio
from crc32c import crc32c
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster_inprocess import InProcessCluster, in_process_cluster, replicator
from walstore import _native
from walstore.errors import OutcomeUnknown, ProtocolError, UnavailableError
from walstore.event import NewEvent, encode_event_body
from walstore.node import Node
from walstore.protocol import (
    PROTOCOL_VERSION,
    Append,
    AppendAck,
    FrameDecoder,
    FrameType,
    Hello,
    Message,
    PeerConnection,
    Prepare,
    Promise,
    encode_message,
)
from walstore.protocol.connection import CLOSED, NEED_DATA
from walstore.replication.transport import PeerChannel, PeerClosed, dial
from walstore.wal.record import FLAG_BATCH_END, KIND_EVENT

pytestmark = pytest.mark.slow

CLUSTER_ID = "event-store"  # Config's default, which the in-process cluster keeps
STRANGER = "mallory"  # a node id that is in nobody's PEERS
HUGE_EPOCH = 10**9
# How long a node may take to notice bad bytes and close: it acts on the first read.
CLOSE_WITHIN_S = 5.0
# A well-formed frame claiming an unconfirmed epoch is answered after the follower asks
# the election (VERIFY_LEADER_TIMEOUT_S = 1 s): room for that and a slow machine.
ANSWER_WITHIN_S = 5.0


def event(aggregate: str = "probe", n: int = 0) -> NewEvent:
    return NewEvent(str(uuid.uuid4()), "T", aggregate, orjson.dumps({"n": n}), b"{}", None)


def log_bytes(node: Node) -> bytes:
    return node.wal.read_raw(1, 1 << 30) if node.wal.last_index else b""


def made_up_entries(epoch: int, first_index: int) -> bytes:
    """One well-formed WAL record holding a well-formed event no client ever appended:
    if a node takes it, a phantom event appears in its log (not a crash)."""
    phantom = NewEvent(str(uuid.uuid4()), "Phantom", "phantom", b'{"forged":true}', b"{}", None)
    body = encode_event_body(phantom, 1, time.time_ns() // 1000)
    return _native.encode_batch([body], [KIND_EVENT], [FLAG_BATCH_END], epoch, first_index)


# -- the cluster's state, before and after ---------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """One GET over a fresh connection (``Connection: close``): status and body."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n".encode())
            raw = b""
            while chunk := await stream.receive_some(65536):
                raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def rejected_count(node: Node, reason: str) -> float:
    """``walstore_peer_connections_rejected_total{reason=...}`` as /metrics shows it."""
    status, body = await http_get(node.http_port, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "walstore_peer_connections_rejected_total" and sample.labels.get("reason") == reason:
                return float(sample.value)
    return 0.0


async def wait_converged(cluster: InProcessCluster, timeout_s: float = 10.0) -> None:
    """Every node holds the same log and has applied all of it."""
    with trio.fail_after(timeout_s):
        while True:
            nodes = list(cluster.nodes.values())
            if len({log_bytes(n) for n in nodes}) == 1 and all(n.applied.value == n.wal.last_index for n in nodes):
                return
            await trio.sleep(0.02)


async def wait_until_leading(cluster: InProcessCluster, node_id: str) -> Node:
    with trio.fail_after(10):
        while True:
            # The old leader may still be writable for a moment while its term unwinds.
            leader = await cluster.leader()
            if leader is cluster.nodes[node_id]:
                return leader
            await trio.sleep(0.02)


@dataclass
class Snapshot:
    leader: Node
    leadership: object
    epoch: int
    granted: int  # leaderships the election has ever granted
    promised: dict[str, int]
    tails: dict[str, int]
    logs: dict[str, bytes]
    rejected: float  # on the target, for the reason the attack should be counted under


async def snapshot(cluster: InProcessCluster, target: Node, reason: str | None) -> Snapshot:
    await wait_converged(cluster)
    leader = await cluster.leader()
    truth = cluster.hub.leader()
    assert truth is not None and truth.node_id == leader.config.node_id
    return Snapshot(
        leader=leader,
        leadership=replicator(leader).leadership,
        epoch=truth.epoch,
        granted=len(cluster.hub.history),
        promised={k: n.rlog.promised_epoch for k, n in cluster.nodes.items()},
        tails={k: n.rlog.tail_index for k, n in cluster.nodes.items()},
        logs={k: log_bytes(n) for k, n in cluster.nodes.items()},
        rejected=await rejected_count(target, reason) if reason else 0.0,
    )


async def assert_unharmed(cluster: InProcessCluster, before: Snapshot, target: Node, reason: str | None) -> None:
    """Nothing moved, the target is healthy, the rejection was counted, writes commit."""
    truth = cluster.hub.leader()
    assert truth is not None and (truth.node_id, truth.epoch) == (before.leader.config.node_id, before.epoch)
    assert len(cluster.hub.history) == before.granted, "the election granted a new term"
    assert replicator(before.leader).leadership is before.leadership, "the leader stepped down"
    assert replicator(before.leader).writable
    assert {k: n.rlog.promised_epoch for k, n in cluster.nodes.items()} == before.promised
    assert {k: n.rlog.tail_index for k, n in cluster.nodes.items()} == before.tails
    assert {k: log_bytes(n) for k, n in cluster.nodes.items()} == before.logs
    for node in (target, before.leader):
        status, body = await http_get(node.http_port, "/health")
        assert status == 200, body
    if reason is not None:
        assert await rejected_count(target, reason) == before.rejected + 1
    with trio.fail_after(10):
        [result] = await before.leader.append([event()])
        for node in cluster.nodes.values():
            await node.applied_events.wait_for(result.index)
            assert node.store.lookup(result.event_id) == result
    await wait_converged(cluster)


# -- raw connections -------------------------------------------------------------------------


async def connect(node: Node) -> trio.SocketStream:
    with trio.fail_after(5):
        return await trio.open_tcp_stream("127.0.0.1", node.peer_port)


async def handshake(node: Node, node_id: str | None = None, epoch: int = 0) -> trio.SocketStream:
    """A raw stream on which a valid HELLO exchange has happened (the server's HELLO is
    read and checked): what comes next is up to the test. By default the attacker
    borrows the id of another member of the cluster (strangers are refused at HELLO)."""
    if node_id is None:
        node_id = next(p.node_id for p in node.config.peers if p.node_id != node.config.node_id)
    stream = await connect(node)
    conn = PeerConnection(CLUSTER_ID, node_id, "client")
    await stream.send_all(conn.send(conn.hello(epoch)))
    with trio.fail_after(5):
        while (answer := conn.next_event()) is NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))
    assert isinstance(answer, Hello) and answer.node_id == node.config.node_id
    return stream


async def send_ignoring_close(stream: trio.SocketStream, data: bytes) -> None:
    # The node may close while we are still writing (that is the point).
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def expect_closed_by_node(stream: trio.SocketStream) -> None:
    """The node ends the connection (EOF or reset) within CLOSE_WITHIN_S, having sent no
    frame but, at most, a GOODBYE: never its HELLO or an answer."""
    received = b""
    with trio.fail_after(CLOSE_WITHIN_S):
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass  # reset: the node closed with our bytes unread
    await stream.aclose()
    decoder = FrameDecoder()
    decoder.feed(received)
    while (frame := decoder.next_frame()) is not None:
        assert frame.type == FrameType.GOODBYE, f"the node answered with a {FrameType(frame.type).name} frame"
    assert decoder.buffered_bytes == 0, f"the node sent {decoder.buffered_bytes} bytes that are not a frame"


Attack = Callable[[Node, InProcessCluster], Awaitable[None]]


async def attack_both(
    cluster: InProcessCluster, attack: Attack, reason: str | None, roles: tuple[str, ...] = ("follower", "leader")
) -> None:
    """Run ``attack`` against a follower, then against the leader, checking after each."""
    await cluster.start_all()
    leader = await cluster.leader()
    follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
    for target in [{"follower": follower, "leader": leader}[role] for role in roles]:
        before = await snapshot(cluster, target, reason)
        await attack(target, cluster)
        await assert_unharmed(cluster, before, target, reason)


def frame_with_length(frame_type: int, length: int) -> bytes:
    """A bare 16-byte header (see frames.py) claiming ``length`` payload bytes, with a CRC
    that would be right for the header alone."""
    head = struct.pack("<2sBBB3sI", b"WS", 1, frame_type, 0, b"\0\0\0", length)
    return head + struct.pack("<I", crc32c(head))


def heartbeat_append(node: Node) -> bytes:
    """A well-formed empty APPEND (a heartbeat) in the node's current epoch."""
    r = node.rlog
    return encode_message(Append(r.promised_epoch, r.tail_index, r.tail_epoch, 0, b""))


# -- the attacks -----------------------------------------------------------------------------


async def test_garbage_bytes_close_the_connection(tmp_path: Path) -> None:
    junk = random.Random(7).randbytes(64 * 1024)

    async def attack(target: Node, cluster: InProcessCluster) -> None:
        # An HTTP client on the peer port, before any HELLO...
        stream = await connect(target)
        await send_ignoring_close(stream, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n" + junk)
        await expect_closed_by_node(stream)

    async def after_hello(target: Node, cluster: InProcessCluster) -> None:
        # ...and random bytes once the handshake is done.
        stream = await handshake(target)
        await send_ignoring_close(stream, b"\x00" + junk)
        await expect_closed_by_node(stream)

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, attack, "magic")
        leader = await cluster.leader()
        follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
        for target in (follower, leader):
            before = await snapshot(cluster, target, "magic")
            await after_hello(target, cluster)
            await assert_unharmed(cluster, before, target, "magic")


async def test_truncated_frame_then_eof_closes_the_connection(tmp_path: Path) -> None:
    async def attack(target: Node, cluster: InProcessCluster) -> None:
        # Half a HELLO, then EOF...
        stream = await connect(target)
        hello = encode_message(Hello(PROTOCOL_VERSION, CLUSTER_ID, STRANGER, 0))
        await stream.send_all(hello[: len(hello) // 2])
        await stream.send_eof()
        await expect_closed_by_node(stream)

    async def after_hello(target: Node, cluster: InProcessCluster) -> None:
        # ...and, after a handshake, an APPEND carrying a record, cut inside the record.
        stream = await handshake(target)
        r = target.rlog
        frame = encode_message(
            Append(r.promised_epoch, r.tail_index, r.tail_epoch, 0, made_up_entries(r.promised_epoch, r.tail_index + 1))
        )
        await stream.send_all(frame[: len(frame) - 7])
        await stream.send_eof()
        await expect_closed_by_node(stream)

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, attack, "closed")
        leader = await cluster.leader()
        follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
        for target in (follower, leader):
            before = await snapshot(cluster, target, "closed")
            await after_hello(target, cluster)
            await assert_unharmed(cluster, before, target, "closed")


async def test_bad_crc_closes_the_connection(tmp_path: Path) -> None:
    async def attack(target: Node, cluster: InProcessCluster) -> None:
        # A valid HELLO, then an APPEND carrying a record, one payload bit flipped: the
        # frame CRC must stop it before the record's own CRC is even looked at.
        stream = await handshake(target)
        r = target.rlog
        frame = bytearray(
            encode_message(
                Append(
                    r.promised_epoch, r.tail_index, r.tail_epoch, 0, made_up_entries(r.promised_epoch, r.tail_index + 1)
                )
            )
        )
        frame[-20] ^= 0x10
        await send_ignoring_close(stream, bytes(frame))
        await expect_closed_by_node(stream)

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, attack, "crc")
        # A HELLO with a bad CRC never gets a HELLO back.
        leader = await cluster.leader()
        for target in list(cluster.nodes.values()):
            before = await snapshot(cluster, target, "crc")
            hello = bytearray(encode_message(Hello(PROTOCOL_VERSION, CLUSTER_ID, STRANGER, 0)))
            hello[-1] ^= 0x01
            stream = await connect(target)
            await send_ignoring_close(stream, bytes(hello))
            await expect_closed_by_node(stream)
            await assert_unharmed(cluster, before, target, "crc")
        assert (await cluster.leader()) is leader


async def test_length_2_to_the_32_closes_before_any_allocation(tmp_path: Path) -> None:
    async def before_hello(target: Node, cluster: InProcessCluster) -> None:
        stream = await connect(target)
        await send_ignoring_close(stream, frame_with_length(FrameType.HELLO, 2**32 - 1))
        await expect_closed_by_node(stream)

    async def after_hello(target: Node, cluster: InProcessCluster) -> None:
        # Past the handshake the frame limit is 32 MiB, not 4 KiB: still far below 4 GiB.
        stream = await handshake(target)
        await send_ignoring_close(stream, frame_with_length(FrameType.APPEND, 2**32 - 1) + b"\0" * 4096)
        await expect_closed_by_node(stream)

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, before_hello, "length")
        leader = await cluster.leader()
        follower = next(n for k, n in cluster.nodes.items() if k != leader.config.node_id)
        for target in (follower, leader):
            before = await snapshot(cluster, target, "length")
            await after_hello(target, cluster)
            await assert_unharmed(cluster, before, target, "length")


async def test_hello_from_another_cluster_is_refused(tmp_path: Path) -> None:
    async def attack(target: Node, cluster: InProcessCluster) -> None:
        stream = await connect(target)
        await send_ignoring_close(stream, encode_message(Hello(PROTOCOL_VERSION, "other-cluster", STRANGER, 0)))
        await expect_closed_by_node(stream)

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, attack, "cluster_id")


async def test_hello_with_another_protocol_version_is_refused(tmp_path: Path) -> None:
    async def attack(target: Node, cluster: InProcessCluster) -> None:
        stream = await connect(target)
        await send_ignoring_close(stream, encode_message(Hello(PROTOCOL_VERSION + 1, CLUSTER_ID, STRANGER, 0)))
        await expect_closed_by_node(stream)

    async def frame_version(target: Node, cluster: InProcessCluster) -> None:
        # The frame format byte (offset 2) rather than the HELLO's protocol version.
        hello = bytearray(encode_message(Hello(PROTOCOL_VERSION, CLUSTER_ID, STRANGER, 0)))
        hello[2] = 2
        stream = await connect(target)
        await send_ignoring_close(stream, bytes(hello))
        await expect_closed_by_node(stream)

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, attack, "version")
        for target in list(cluster.nodes.values()):
            before = await snapshot(cluster, target, "version")
            await frame_version(target, cluster)
            await assert_unharmed(cluster, before, target, "version")


async def test_message_before_hello_is_refused(tmp_path: Path) -> None:
    async def attack(target: Node, cluster: InProcessCluster) -> None:
        stream = await connect(target)
        await send_ignoring_close(stream, heartbeat_append(target))
        await expect_closed_by_node(stream)

    async def prepare_first(target: Node, cluster: InProcessCluster) -> None:
        stream = await connect(target)
        await send_ignoring_close(stream, encode_message(Prepare(HUGE_EPOCH, STRANGER)))
        await expect_closed_by_node(stream)

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, attack, "other")
        for target in list(cluster.nodes.values()):
            before = await snapshot(cluster, target, "other")
            await prepare_first(target, cluster)
            await assert_unharmed(cluster, before, target, "other")


async def test_hello_claiming_the_targets_own_node_id_is_refused(tmp_path: Path) -> None:
    async def attack(target: Node, cluster: InProcessCluster) -> None:
        stream = await connect(target)
        hello = Hello(PROTOCOL_VERSION, CLUSTER_ID, target.config.node_id, target.rlog.promised_epoch)
        await send_ignoring_close(stream, encode_message(hello))
        await expect_closed_by_node(stream)

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, attack, "other")


# -- well-formed frames that must change nothing -----------------------------------------------


async def request(channel: PeerChannel, message: Message) -> Message | None:
    """Send one request; its answer, or None when the node closed the connection instead."""
    with trio.fail_after(ANSWER_WITHIN_S):
        try:
            await channel.send(message)
            return await channel.receive()
        except (PeerClosed, ProtocolError):
            return None


def assert_refused(answer: Message | None, real_epoch: int) -> None:
    """Closing is a refusal; an answer must be a refusal carrying the node's real epoch."""
    if answer is None:
        return
    if isinstance(answer, AppendAck):
        assert not answer.ok and answer.epoch == real_epoch, answer
    elif isinstance(answer, Promise):
        assert not answer.ok and answer.promised_epoch == real_epoch, answer
    else:
        raise AssertionError(f"unexpected answer {answer!r}")


async def test_replayed_append_is_idempotent_and_an_old_one_changes_nothing(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        leader_id = leader.config.node_id
        for i in range(3):
            await leader.append([event("replayed", i), event("replayed", 100 + i)])
        await wait_converged(cluster)
        # The APPEND the leader sent for its last two batches, byte for byte: the entries
        # on the wire are the WAL record bytes.
        epoch, last = leader.rlog.promised_epoch, leader.wal.last_index
        prev = last - 4
        captured = Append(
            epoch, prev, leader.wal.epoch_at(prev), leader.commit.value, leader.wal.read_raw(prev + 1, 1 << 20)
        )
        follower = next(n for k, n in cluster.nodes.items() if k != leader_id)
        other = next(k for k in cluster.nodes if k not in (leader_id, follower.config.node_id))

        # Replayed twice, then once more after the log has grown: same acks, same bytes.
        before = await snapshot(cluster, follower, None)
        channel = await dial("127.0.0.1", follower.peer_port, cluster_id=CLUSTER_ID, node_id=leader_id, epoch=epoch)
        try:
            for _ in range(2):
                answer = await request(channel, captured)
                assert isinstance(answer, AppendAck) and answer.ok and answer.match_index == last, answer
        finally:
            await channel.aclose()
        await assert_unharmed(cluster, before, follower, None)
        grown = follower.wal.last_index
        assert grown > last
        before = await snapshot(cluster, follower, None)
        channel = await dial("127.0.0.1", follower.peer_port, cluster_id=CLUSTER_ID, node_id=leader_id, epoch=epoch)
        try:
            answer = await request(channel, captured)
            # Acknowledges what the frame carried, and keeps the newer entries after it.
            assert isinstance(answer, AppendAck) and answer.ok and answer.match_index == last, answer
            assert answer.last_index == grown
        finally:
            await channel.aclose()
        await assert_unharmed(cluster, before, follower, None)

        # The leader wrote those entries itself: a replay to it may be acked or refused,
        # but must change nothing.
        before = await snapshot(cluster, leader, None)
        channel = await dial("127.0.0.1", leader.peer_port, cluster_id=CLUSTER_ID, node_id=other, epoch=epoch)
        try:
            answer = await request(channel, captured)
            assert answer is None or isinstance(answer, AppendAck), answer
        finally:
            await channel.aclose()
        await assert_unharmed(cluster, before, leader, None)

        # A new term: the captured frame is now from a deposed epoch and is refused.
        cluster.hub.force_leader(other)
        new_leader = await wait_until_leading(cluster, other)
        await new_leader.append([event("new-term")])
        await wait_converged(cluster)
        new_epoch = follower.rlog.promised_epoch
        assert new_epoch > epoch
        kept = log_bytes(follower)
        channel = await dial("127.0.0.1", follower.peer_port, cluster_id=CLUSTER_ID, node_id=leader_id, epoch=epoch)
        try:
            assert_refused(await request(channel, captured), new_epoch)
        finally:
            await channel.aclose()
        assert follower.rlog.promised_epoch == new_epoch
        assert log_bytes(follower) == kept
        assert replicator(cluster.nodes[other]).writable


async def test_claimed_higher_epoch_from_a_non_leader_changes_nothing(tmp_path: Path) -> None:
    async def attack(target: Node, cluster: InProcessCluster) -> None:
        leader = await cluster.leader()
        real = target.rlog.promised_epoch
        # A real member that is not the leader, and a stranger; PREPARE and APPEND.
        claimants = [k for k in cluster.nodes if k not in (leader.config.node_id, target.config.node_id)]
        # A stranger (a node id outside PEERS) does not even get past HELLO.
        with pytest.raises((PeerClosed, ProtocolError, OSError)):
            stranger = await dial("127.0.0.1", target.peer_port, cluster_id=CLUSTER_ID, node_id=STRANGER, epoch=0)
            await request(stranger, Prepare(HUGE_EPOCH, STRANGER))
        for claimant in claimants[:1]:
            channel = await dial(
                "127.0.0.1", target.peer_port, cluster_id=CLUSTER_ID, node_id=claimant, epoch=HUGE_EPOCH
            )
            try:
                assert_refused(await request(channel, Prepare(HUGE_EPOCH, claimant)), real)
            finally:
                await channel.aclose()
            channel = await dial(
                "127.0.0.1", target.peer_port, cluster_id=CLUSTER_ID, node_id=claimant, epoch=HUGE_EPOCH
            )
            try:
                r = target.rlog
                forged = Append(
                    HUGE_EPOCH, r.tail_index, r.tail_epoch, 0, made_up_entries(HUGE_EPOCH, r.tail_index + 1)
                )
                assert_refused(await request(channel, forged), real)
            finally:
                await channel.aclose()

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, attack, None)


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_append_in_the_current_epoch_from_a_non_leader_is_refused(tmp_path: Path, role: str) -> None:
    """Only the leader of an epoch writes entries of that epoch. A member that is not the
    leader (confused, or its id spoofed) must not get made-up entries into any log, the
    leader's own included."""

    async def attack(target: Node, cluster: InProcessCluster) -> None:
        leader = await cluster.leader()
        claimant = next(k for k in cluster.nodes if k not in (leader.config.node_id, target.config.node_id))
        r = target.rlog
        epoch = r.promised_epoch
        channel = await dial("127.0.0.1", target.peer_port, cluster_id=CLUSTER_ID, node_id=claimant, epoch=epoch)
        try:
            forged = Append(epoch, r.tail_index, r.tail_epoch, 0, made_up_entries(epoch, r.tail_index + 1))
            assert_refused(await request(channel, forged), epoch)
        finally:
            await channel.aclose()

    async with in_process_cluster(tmp_path) as cluster:
        await attack_both(cluster, attack, None, roles=(role,))


# -- a hostile node where a follower should be ---------------------------------------------------


async def impostor(
    port: int,
    node_id: str,
    answer: Callable[[Append], AppendAck],
    seen: trio.Event,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Listen on a stopped follower's peer port, speak the protocol correctly, and answer
    every APPEND the leader sends with ``answer(append)``."""

    async def one(stream: trio.SocketStream) -> None:
        conn = PeerConnection(CLUSTER_ID, node_id, "server")
        async with stream:
            try:
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        conn.receive_data(await stream.receive_some(1 << 20))
                    elif event is CLOSED:
                        return
                    elif isinstance(event, Hello):
                        await stream.send_all(conn.send(conn.hello(HUGE_EPOCH)))
                    elif isinstance(event, Append):
                        await stream.send_all(conn.send(answer(event)))
                        seen.set()
            except (trio.BrokenResourceError, ProtocolError):
                return

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(one, listeners)


async def test_follower_impostor_claiming_a_higher_epoch_does_not_depose_the_leader(tmp_path: Path) -> None:
    async with in_process_cluster(tmp_path) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        victim = next(k for k in cluster.nodes if k != leader.config.node_id)
        await cluster.stop(victim)
        await leader.append([event()])
        truth = cluster.hub.leader()
        granted = len(cluster.hub.history)
        leadership = replicator(leader).leadership
        seen = trio.Event()

        def higher_epoch(append: Append) -> AppendAck:
            return AppendAck(HUGE_EPOCH, False, 0, 0, 0, 0)

        async with trio.open_nursery() as nursery:
            await nursery.start(impostor, cluster.peer_ports[victim], victim, higher_epoch, seen)
            with trio.fail_after(10):
                await seen.wait()
            # Writes keep committing with the one honest follower, under the same term.
            for i in range(5):
                await leader.append([event(n=i)])
            nursery.cancel_scope.cancel()
        assert cluster.hub.leader() == truth and len(cluster.hub.history) == granted
        assert replicator(leader).leadership is leadership and replicator(leader).writable


async def test_follower_impostor_acking_entries_never_sent_cannot_commit_them(tmp_path: Path) -> None:
    """With the one honest follower down, the only ack the leader gets is an impostor's
    claiming a match index far past anything it was sent: the leader must not count it,
    so nothing new commits (an acknowledged write would be on one disk only)."""
    async with in_process_cluster(tmp_path, append_timeout_s=1.0) as cluster:
        await cluster.start_all()
        leader = await cluster.leader()
        victim, honest = (k for k in cluster.nodes if k != leader.config.node_id)
        await cluster.stop(victim)
        await leader.append([event()])
        committed = leader.commit.value
        seen = trio.Event()

        def lie(append: Append) -> AppendAck:
            return AppendAck(append.epoch, True, HUGE_EPOCH, HUGE_EPOCH, 0, 0)

        async with trio.open_nursery() as nursery:
            await nursery.start(impostor, cluster.peer_ports[victim], victim, lie, seen)
            with trio.fail_after(10):
                await seen.wait()
            await cluster.stop(honest)
            with pytest.raises((OutcomeUnknown, UnavailableError)):
                await leader.append([event(n=1)])
            assert leader.commit.value == committed
            nursery.cancel_scope.cancel()
