"""A promise counts once it is on disk: ReplicaLog.promise on a disk that fills up.

The in-memory promise moves first (frames of lower epochs are refused from that moment),
but a promise whose meta.json write failed was not made: the next call for the same
epoch writes it again, and only a written one survives a crash. (Before, the next call
saw the in-memory epoch and returned at once, so a follower accepted that leader's
frames on a promise that a restart would forget.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from walstore.errors import DiskFullError
from walstore.replication.replica_log import ReplicaLog
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.simfs import SimulatedFileSystem
from walstore.wal.writer import GroupCommitWriter

OPTS = WalOptions(segment_size_bytes=4096, max_record_body_bytes=1024)
D = Path("/data")


@asynccontextmanager
async def replica_log(fs: SimulatedFileSystem) -> AsyncIterator[ReplicaLog]:
    """A ReplicaLog on ``fs`` with its writer running, for the block."""
    wal = WriteAheadLog.open(D, OPTS, fs)
    writer = GroupCommitWriter(wal)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        yield ReplicaLog(wal, writer)
        nursery.cancel_scope.cancel()


async def test_a_promise_that_did_not_reach_the_disk_is_written_by_the_next_call() -> None:
    fs = SimulatedFileSystem()
    async with replica_log(fs) as rlog:
        await rlog.promise(2)
        assert (rlog.promised_epoch, rlog.durable_promise) == (2, 2)
        fs.fail_writes_after(0)
        with pytest.raises(DiskFullError):
            await rlog.promise(5)
        assert (rlog.promised_epoch, rlog.durable_promise) == (5, 2)  # refusing below 5, not promised on disk
        with pytest.raises(DiskFullError):
            await rlog.promise(5)  # tried again, not taken as done
        fs.clear_faults()
        await rlog.promise(5)
        assert (rlog.promised_epoch, rlog.durable_promise) == (5, 5)
        await rlog.promise(4)  # below: nothing to do
        assert (rlog.promised_epoch, rlog.durable_promise) == (5, 5)
    fs.crash()
    reopened = WriteAheadLog.open(D, OPTS, fs)
    assert reopened.promised_epoch == 5


async def test_a_promise_lost_to_a_full_disk_is_forgotten_by_a_crash() -> None:
    """What the retry protects: the in-memory promise alone does not survive."""
    fs = SimulatedFileSystem()
    async with replica_log(fs) as rlog:
        fs.fail_writes_after(0)
        with pytest.raises(DiskFullError):
            await rlog.promise(7)
        assert rlog.promised_epoch == 7
    fs.crash()
    assert WriteAheadLog.open(D, OPTS, fs).promised_epoch == 0
