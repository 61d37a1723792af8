"""A single node is a cluster of one: the same replicator, takeover, EPOCH_START and commit
rule as a leader of three, on ``LocalElection`` (docs/architecture.md, "The path of one
write"). Here: the election itself, and a real node (real WAL files, real sockets) that
takes that path, across restarts."""

from __future__ import annotations

import itertools
import math
import socket
import uuid
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from walstore.config import from_env
from walstore.election.base import Candidate
from walstore.election.local import LocalElection
from walstore.election.membership import encode_member, register
from walstore.errors import ElectionError
from walstore.event import NewEvent
from walstore.node import Node
from walstore.replication.roles import Role
from walstore.wal.log import WriteAheadLog
from walstore.wal.record import KIND_EPOCH_START

ME = Candidate("solo", "127.0.0.1:7070", "127.0.0.1:8080")


async def test_a_campaign_is_granted_at_once_and_never_expires(autojump_clock: trio.testing.MockClock) -> None:
    epochs = itertools.count(5)
    async with LocalElection("solo", lambda: next(epochs)) as election:
        leadership = await election.campaign(ME)
        assert leadership.epoch == 5 and leadership.deadline() == math.inf
        assert election.current_leader() == leadership.info
        await trio.sleep(86_400)  # no lease to run out: a virtual day later
        assert leadership.is_valid()
        with pytest.raises(ElectionError, match="already leads"):
            await election.campaign(ME)
        await election.resign(leadership)
        assert leadership.lost.is_set() and election.current_leader() is None
        again = await election.campaign(ME)
        assert again.epoch == 6  # the next epoch, from the callable (the node's own log)
    assert again.lost.is_set()  # closing the election ends the leadership


async def test_only_its_own_node_campaigns() -> None:
    async with LocalElection("solo", lambda: 1) as election:
        with pytest.raises(ElectionError, match="cannot campaign"):
            await election.campaign(Candidate("other", "h:1", "h:2"))
    with pytest.raises(ElectionError, match="closed"):
        await election.campaign(ME)


async def test_member_records_are_compare_and_swap() -> None:
    async with LocalElection("solo", lambda: 1) as election:
        member = await register(election, "solo", "inc-1")
        assert member.voter and member.incarnation == "inc-1"  # the first start of the only member
        record = encode_member("inc-2", False)
        assert not await election.write_member("solo", record, expect_revision=member.revision + 1)
        assert not await election.write_member("solo", record, expect_revision=member.revision, leader_epoch=1)
        leadership = await election.campaign(ME)
        assert await election.write_member("solo", record, expect_revision=member.revision, leader_epoch=1)
        assert (await election.read_members())["solo"].incarnation == "inc-2"
        await election.resign(leadership)


async def test_a_single_node_leads_through_the_replicator_and_each_start_takes_a_higher_epoch(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "wal"
    config = from_env({"DATA_DIR": str(data_dir), "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "0"})
    terms = []
    for start in range(3):
        async with trio.open_nursery() as nursery:
            node: Node = await nursery.start(Node(config).run)
            replicator = node.replicator
            assert replicator is not None and replicator.others == []
            assert replicator.role is Role.LEADER and replicator.writable  # serving means leading
            status = node.status()
            assert status.is_leader and status.role == "leader" and status.ready and status.peers == []
            assert status.leader_id == config.node_id and node.peer_port == 0  # no peer port
            event = NewEvent(str(uuid.uuid4()), "Started", "node", orjson.dumps({"start": start}), b"{}")
            results = await node.append([event])
            assert results[0].version == start + 1  # what earlier starts wrote is all there
            term = replicator.term
            assert term is not None and not term._cache  # no follower: no tail cache to hold
            terms.append(status.term)
            node.shutdown()
    assert terms[0] < terms[1] < terms[2]
    wal = WriteAheadLog.open(data_dir)
    starts = [r.epoch for r in wal.read(1) if r.kind == KIND_EPOCH_START]
    wal.close()
    assert starts == terms  # one EPOCH_START per start, each in its own higher epoch


async def test_a_single_node_opens_no_peer_port(tmp_path: Path) -> None:
    """The configured peer port stays free: a cluster of one listens to nobody."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = from_env(
        {
            "DATA_DIR": str(tmp_path / "wal"),
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": "0",
            "PEER_HOST": "127.0.0.1",
            "PEER_PORT": str(port),
        }
    )
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(Node(config).run)
        with socket.socket() as again:
            again.bind(("127.0.0.1", port))  # would fail with EADDRINUSE had the node bound it
        node.shutdown()
