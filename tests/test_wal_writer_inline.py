"""GroupCommitWriter's inline mode (the simulator's): the same job loop as the thread, run as
a task on the event loop, with the simulated disk's latency in virtual time."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from walstore.errors import DiskFullError, FsyncError, StorageError, Truncated
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.record import KIND_EVENT
from walstore.wal.simfs import SimulatedFileSystem
from walstore.wal.writer import GroupCommitWriter

D = Path("/wal")
OPTS = WalOptions(segment_size_bytes=4096, max_record_body_bytes=256)


def ev(text: str) -> tuple[int, int, bytes]:
    return (KIND_EVENT, 0, text.encode())


def inline_writer(delay_s: float = 0.0) -> tuple[GroupCommitWriter, WriteAheadLog, SimulatedFileSystem]:
    fs = SimulatedFileSystem()
    log = WriteAheadLog.open(D, OPTS, fs)
    writer = GroupCommitWriter(log, inline=True, clock=trio.current_time, round_delay_s=lambda: delay_s)
    return writer, log, fs


async def test_submitters_during_a_round_share_the_next_fsync(autojump_clock: trio.testing.MockClock) -> None:
    writer, log, fs = inline_writer(delay_s=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)

        async def client(i: int) -> None:
            await writer.submit([ev(f"e{i}")], 1).wait_durable()

        async with trio.open_nursery() as clients:
            for i in range(40):
                clients.start_soon(client, i)
        nursery.cancel_scope.cancel()
    assert writer.durable_index == 40
    assert [r.index for r in log.read(1)] == list(range(1, 41))
    assert writer.rounds < 40  # group commit: batches that queued during a round went together
    assert fs.fdatasync_calls >= writer.rounds


async def test_durable_only_after_the_round_and_its_latency(autojump_clock: trio.testing.MockClock) -> None:
    writer, _log, fs = inline_writer(delay_s=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        started = trio.current_time()
        pending = writer.submit([ev("a")], 1)
        await trio.sleep(0.25)
        assert not pending.done and writer.durable_index == 0  # the disk is still "writing"
        assert writer.round_in_flight_s() == pytest.approx(0.25)
        await pending.wait_durable()
        assert trio.current_time() - started == pytest.approx(0.5)
        assert writer.last_round_s == pytest.approx(0.5)  # virtual seconds, not the CPU's
        nursery.cancel_scope.cancel()
    fs.crash()
    assert [r.index for r in WriteAheadLog.open(D, OPTS, fs).read(1)] == [1]


async def test_a_failed_fdatasync_fails_the_round_and_stops_the_writer(autojump_clock: trio.testing.MockClock) -> None:
    writer, _log, fs = inline_writer()
    fs.fail_next_fdatasync()
    stopped: list[BaseExceptionGroup[FsyncError]] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            pending = writer.submit([ev("a")], 1)
            with pytest.raises(FsyncError):
                await pending.wait_durable()
            with pytest.raises(FsyncError):
                writer.submit([ev("b")], 1)
            await trio.sleep_forever()  # run() ends by raising the failure
    except* FsyncError as group:
        stopped.append(group)
    assert stopped and isinstance(writer.failure, FsyncError)


async def test_disk_full_rolls_back_and_a_later_round_succeeds(autojump_clock: trio.testing.MockClock) -> None:
    writer, log, fs = inline_writer()
    rolled_back: list[int] = []
    writer._on_rollback = rolled_back.append
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.submit([ev("a")], 1).wait_durable()
        fs.fail_writes_after(0)
        with pytest.raises(DiskFullError):
            await writer.submit([ev("b" * 200)], 1).wait_durable()
        assert rolled_back == [2] and writer.disk_full and writer.submitted_index == 1
        fs.clear_faults()
        again = writer.submit([ev("c")], 1)
        assert again.first_index == 2  # the failed index is reused: nothing of it was written
        await again.wait_durable()
        assert not writer.disk_full
        nursery.cancel_scope.cancel()
    assert [r.body for r in log.read(1)] == [b"a", b"c"]


async def test_truncation_runs_in_order_with_the_writes(autojump_clock: trio.testing.MockClock) -> None:
    writer, log, _fs = inline_writer(delay_s=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.submit([ev("a"), ev("b"), ev("c")], 1).wait_durable()
        doomed = writer.submit([ev("d")], 1)
        await writer.truncate_suffix(1)
        with pytest.raises(Truncated):
            await doomed.wait_durable()
        await writer.submit([ev("e")], 2).wait_durable()
        nursery.cancel_scope.cancel()
    assert [(r.index, r.body) for r in log.read(1)] == [(1, b"a"), (2, b"e")]


async def test_cancelled_during_the_disk_latency_nothing_is_written_and_waiters_fail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    writer, log, fs = inline_writer(delay_s=1.0)
    outcome: list[BaseException | None] = []
    async with trio.open_nursery() as outer, trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        pending = writer.submit([ev("a")], 1)
        queued_later = writer.submit([ev("b")], 1)

        async def wait() -> None:
            try:
                await pending.wait_durable()
                outcome.append(None)
            except StorageError as exc:
                outcome.append(exc)

        outer.start_soon(wait)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()  # a crash before the write began
    assert len(outcome) == 1 and isinstance(outcome[0], StorageError)
    with pytest.raises(StorageError):
        await queued_later.wait_durable()
    fs.crash()
    assert WriteAheadLog.open(D, OPTS, fs).read(1) == []
    del log
