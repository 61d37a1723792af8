"""A follower applies its leader's records from the checked batches in memory.

The records were checked once when they arrived (``check_records``); reading them back from
the segments to apply them would scan the same bytes a fourth time. What the applier gets
from memory must be exactly what the segments hold, and whenever memory does not hold the
whole range (a truncation, a rollback, a cache past its bound) it reads the disk instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from walstore.replication import replica_log
from walstore.replication.replica_log import ReplicaLog
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.record import FLAG_BATCH_END, KIND_EVENT, Record, check_records
from walstore.wal.simfs import SimulatedFileSystem
from walstore.wal.writer import GroupCommitWriter

OPTS = WalOptions(segment_size_bytes=4096, max_record_body_bytes=1024)
D = Path("/data")


def _leader_log() -> WriteAheadLog:
    leader = WriteAheadLog.open(D, OPTS, SimulatedFileSystem())
    for i in range(12):
        entries = [(KIND_EVENT, 0, f"e{i}-{j}".encode() * (1 + i % 5)) for j in range(1 + i % 3)]
        leader.append(leader.encode(entries, 1 + i // 4, leader.last_index + 1))
    return leader


def _shape(records: list[Record]) -> list[tuple[int, int, int, int, bytes]]:
    return [(r.index, r.epoch, r.kind, r.flags, bytes(r.body)) for r in records]


async def _follow(rlog: ReplicaLog, leader: WriteAheadLog, upto: int) -> None:
    while rlog.tail_index < upto:
        first = rlog.tail_index + 1
        raw = leader.read_raw(first, 1)  # a batch per "frame"
        rlog.submit_raw(check_records(raw, first, min_epoch=rlog.tail_epoch))
    await rlog.drain()


async def test_the_applier_reads_checked_batches_from_memory_exactly_as_the_disk_holds_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    leader = _leader_log()
    wal = WriteAheadLog.open(D, OPTS, SimulatedFileSystem())
    writer = GroupCommitWriter(wal)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        rlog = ReplicaLog(wal, writer)
        await _follow(rlog, leader, leader.last_index)
        disk_reads: list[tuple[int, int]] = []
        real_read = wal.read

        def counted(first: int, last: int | None = None, max_bytes: int | None = None) -> list[Record]:
            disk_reads.append((first, last or 0))
            return real_read(first, last, max_bytes)

        monkeypatch.setattr(wal, "read", counted)
        # The applier asks in order, in chunks that do not follow batch boundaries.
        got: list[Record] = []
        for first, last in [(1, 1), (2, 5), (6, 6), (7, leader.last_index)]:
            got += rlog.records_to_apply(first, last)
        assert not disk_reads
        assert _shape(got) == _shape(real_read(1)) == _shape(leader.read(1))
        nursery.cancel_scope.cancel()


async def test_after_a_truncation_or_past_its_bound_the_applier_reads_the_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    leader = _leader_log()
    wal = WriteAheadLog.open(D, OPTS, SimulatedFileSystem())
    writer = GroupCommitWriter(wal)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        rlog = ReplicaLog(wal, writer)
        await _follow(rlog, leader, 10)
        await rlog.truncate_after(6, 0, asked_by="a test")
        # Another leader's record where ours was: memory must not answer with the old one.
        other = WriteAheadLog.open(D, OPTS, SimulatedFileSystem())
        other.append(other.encode([(KIND_EVENT, FLAG_BATCH_END, b"x")] * 7, 9, 1))
        rlog.submit_raw(check_records(other.read_raw(7, 1 << 20), 7, min_epoch=rlog.tail_epoch))
        await rlog.drain()
        assert _shape(rlog.records_to_apply(5, 7)) == _shape(wal.read(5, 7))
        assert rlog.records_to_apply(7, 7)[0].body == b"x" and rlog.records_to_apply(7, 7)[0].epoch == 9

        # A cache bound smaller than one batch keeps only the newest batch: older ranges
        # come from the disk, and still match.
        monkeypatch.setattr(replica_log, "UNAPPLIED_CACHE_BYTES", 1)
        wal2 = WriteAheadLog.open(D, OPTS, SimulatedFileSystem())
        writer2 = GroupCommitWriter(wal2)
        await nursery.start(writer2.run)
        rlog2 = ReplicaLog(wal2, writer2)
        await _follow(rlog2, leader, leader.last_index)
        assert len(rlog2._unapplied) == 1
        assert _shape(rlog2.records_to_apply(1, leader.last_index)) == _shape(leader.read(1))
        nursery.cancel_scope.cancel()
