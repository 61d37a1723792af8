"""GroupCommitWriter: ordering, group commit, durability, failures, truncation (pytest-trio)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio

from walstore.errors import DiskFullError, FsyncError, LogStateError, StorageError
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.record import FLAG_BATCH_END, KIND_EVENT
from walstore.wal.simfs import SimulatedFileSystem
from walstore.wal.writer import GroupCommitWriter, PendingAppend

D = Path("/wal")
OPTS = WalOptions(segment_size_bytes=4096, max_record_body_bytes=256)


def ev(text: str) -> tuple[int, int, bytes]:
    return (KIND_EVENT, 0, text.encode())


def open_log(fs: SimulatedFileSystem | None = None) -> tuple[WriteAheadLog, SimulatedFileSystem]:
    fs = fs if fs is not None else SimulatedFileSystem()
    return WriteAheadLog.open(D, OPTS, fs), fs


async def test_concurrent_submitters_get_consecutive_indexes_and_share_fsyncs() -> None:
    log, fs = open_log()
    writer = GroupCommitWriter(log)
    results: dict[int, tuple[int, int]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        syncs_before = fs.fdatasync_calls

        async def client(i: int) -> None:
            pending = writer.submit([ev(f"c{i}-a"), ev(f"c{i}-b")], 1)
            await pending.wait_durable()
            assert writer.durable_index >= pending.last_index
            results[i] = (pending.first_index, pending.last_index)

        async with trio.open_nursery() as clients:
            for i in range(50):
                clients.start_soon(client, i)
        nursery.cancel_scope.cancel()
    spans = sorted(results.values())
    assert spans[0][0] == 1 and spans[-1][1] == 100
    assert all(b[0] == a[1] + 1 and b[1] == b[0] + 1 for a, b in itertools.pairwise(spans))
    # every batch was made durable by far fewer fsyncs than batches
    assert writer.rounds < 50
    assert fs.fdatasync_calls - syncs_before <= writer.rounds + 3  # +segment creations
    records = log.read(1)
    assert [r.index for r in records] == list(range(1, 101))
    # each submit is one atomic batch: BATCH_END on its second record only
    assert [r.batch_end for r in records[:4]] == [False, True, False, True]
    for first, _last in spans:
        i = next(k for k, v in results.items() if v[0] == first)
        assert records[first - 1].body == f"c{i}-a".encode()


async def test_submit_is_synchronous_and_data_is_the_wal_bytes() -> None:
    log, _ = open_log()
    writer = GroupCommitWriter(log)
    p1 = writer.submit([ev("x")], 3)
    p2 = writer.submit([ev("y"), ev("z")], 3)
    assert (p1.first_index, p1.last_index, p2.first_index, p2.last_index) == (1, 1, 2, 3)
    assert writer.submitted_index == 3 and writer.durable_index == 0
    assert not p1.done
    with pytest.raises(LogStateError):
        writer.submit([ev("old")], 2)  # epochs never go back
    with pytest.raises(LogStateError):
        writer.submit([], 3)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await p2.wait_durable()
        await writer.wait_durable(3)
        nursery.cancel_scope.cancel()
    assert p1.done and writer.durable_index == 3
    raw = log.read_raw(1, 10_000)
    assert raw == p1.data + p2.data  # what a leader ships is exactly what it stored


async def test_durable_index_advances_only_after_fsync() -> None:
    log, fs = open_log()
    writer = GroupCommitWriter(log)
    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(5):
            pending = writer.submit([ev(str(i))], 1)
            assert writer.durable_index < pending.last_index
            await pending.wait_durable()
            seen.append(writer.durable_index)
        nursery.cancel_scope.cancel()
    assert seen == [1, 2, 3, 4, 5]
    fs.crash()
    log, _ = open_log(fs)
    assert log.last_index == 5  # durable means it survives the crash


async def test_submit_raw_follower_path() -> None:
    leader, _ = open_log()
    for i in range(6):
        leader.append(leader.encode([ev(f"e{i}"), ev(f"f{i}")], 2, leader.last_index + 1))
    follower, _ = open_log()
    writer = GroupCommitWriter(follower)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        while writer.submitted_index < leader.last_index:
            pending = writer.submit_raw(leader.read_raw(writer.submitted_index + 1, 200))
        await pending.wait_durable()
        # a frame that does not continue the log is refused before it is queued
        with pytest.raises(LogStateError):
            writer.submit_raw(leader.read_raw(3, 200))
        with pytest.raises(LogStateError):
            writer.submit_raw(b"")
        nursery.cancel_scope.cancel()
    assert [(r.index, r.body) for r in follower.read(1)] == [(r.index, r.body) for r in leader.read(1)]


async def test_fsync_failure_fails_the_batch_and_every_later_one() -> None:
    log, fs = open_log()
    writer = GroupCommitWriter(log)
    ok = writer.submit([ev("ok")], 1)
    outcomes: list[BaseException | None] = []
    with pytest.raises(BaseExceptionGroup) as raised:  # run() re-raises it: fatal for the node
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await ok.wait_durable()
            fs.fail_next_fdatasync()
            doomed = [writer.submit([ev(f"d{i}")], 1) for i in range(3)]

            async def waiter(p: PendingAppend) -> None:
                try:
                    await p.wait_durable()
                except StorageError as e:
                    outcomes.append(e)
                else:
                    outcomes.append(None)

            for p in doomed:
                nursery.start_soon(waiter, p)
    assert raised.group_contains(FsyncError)
    assert len(outcomes) == 3 and all(isinstance(e, FsyncError) for e in outcomes)
    assert writer.durable_index == 1 and isinstance(writer.failure, FsyncError)
    with pytest.raises(FsyncError):
        writer.submit([ev("later")], 1)
    with pytest.raises(FsyncError):
        await writer.wait_durable(2)
    fs.crash()
    log, _ = open_log(fs)
    assert log.last_index == 1


async def test_disk_full_fails_the_round_and_later_rounds_can_succeed() -> None:
    log, fs = open_log()
    rollbacks: list[int] = []
    writer = GroupCommitWriter(log, on_rollback=rollbacks.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.submit([ev("a")], 1).wait_durable()
        fs.fail_writes_after(10)
        failed = writer.submit([ev("b" * 100)], 1)
        with pytest.raises(DiskFullError):
            await failed.wait_durable()
        assert rollbacks == [2]
        assert writer.submitted_index == 1 and writer.durable_index == 1
        fs.clear_faults()
        again = writer.submit([ev("c")], 1)
        assert again.first_index == 2  # the failed index is reused
        await again.wait_durable()
        nursery.cancel_scope.cancel()
    fs.crash()
    log, _ = open_log(fs)
    assert [r.body for r in log.read(1)] == [b"a", b"c"]


async def test_truncate_is_serialised_with_writes() -> None:
    log, fs = open_log()
    writer = GroupCommitWriter(log)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(4):
            await writer.submit([ev(f"x{i}"), ev(f"y{i}")], 1).wait_durable()
        queued = writer.submit([ev("queued")], 1)  # index 9, not yet written
        await writer.truncate_suffix(5)
        with pytest.raises(LogStateError):
            await queued.wait_durable()
        assert writer.submitted_index == 5 and writer.durable_index == 5 and log.last_index == 5
        after = writer.submit([(KIND_EVENT, FLAG_BATCH_END, b"new")], 2)
        assert after.first_index == 6
        await after.wait_durable()
        nursery.cancel_scope.cancel()
    fs.crash()
    log, _ = open_log(fs)
    assert log.last_index == 6 and log.record(6).body == b"new" and log.epoch_at(6) == 2


async def test_cancelling_the_writer_fails_waiters_instead_of_hanging() -> None:
    log, _ = open_log()
    writer = GroupCommitWriter(log)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        nursery.cancel_scope.cancel()
    pending = None
    with pytest.raises(StorageError):
        pending = writer.submit([ev("late")], 1)
    assert pending is None


async def test_a_round_is_bounded_and_the_rest_goes_next() -> None:
    log, _ = open_log()
    writer = GroupCommitWriter(log, max_round_bytes=1000)
    pendings = [writer.submit([ev("z" * 200)], 1) for _ in range(30)]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await pendings[-1].wait_durable()
        nursery.cancel_scope.cancel()
    assert writer.rounds >= 6  # 30 x 232 bytes in rounds of at most ~1000
    assert log.last_index == 30
