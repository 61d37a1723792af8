"""GroupCommitWriter: ordering, group commit, durability, failures, truncation (pytest-trio)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore import _native
from walstore.errors import (
    CorruptionError,
    DiskFullError,
    FsyncError,
    InvalidRecords,
    LogStateError,
    StorageError,
    Truncated,
)
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.record import FLAG_BATCH_END, KIND_EPOCH_START, KIND_EVENT, check_records
from walstore.wal.simfs import SimulatedFileSystem
from walstore.wal.writer import GroupCommitWriter, PendingAppend, encode_pending

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
            records = check_records(
                leader.read_raw(writer.submitted_index + 1, 200), writer.submitted_index + 1, min_epoch=2
            )
            pending = writer.submit_raw(records)
        await pending.wait_durable()
        # checked records that do not continue the log are refused before they are queued
        with pytest.raises(LogStateError):
            writer.submit_raw(check_records(leader.read_raw(3, 200), 3, min_epoch=2))
        nursery.cancel_scope.cancel()
    assert [(r.index, r.body) for r in follower.read(1)] == [(r.index, r.body) for r in leader.read(1)]


async def test_a_round_of_checked_batches_is_written_without_a_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A follower's records are checked once, where they arrive: several checked batches
    in one round reach the disk joined, offsets shifted, and the log never scans them."""
    leader, _ = open_log()
    for i in range(5):
        leader.append(leader.encode([ev(f"e{i}"), ev(f"f{i}" * (i + 1))], 1 + i // 2, leader.last_index + 1))
    follower, fs = open_log()
    writer = GroupCommitWriter(follower)
    batches = []
    index = 1
    while index <= leader.last_index:
        raw = leader.read_raw(index, 1)  # one batch at a time
        batches.append(check_records(raw, index, min_epoch=1))
        index = batches[-1].last_index + 1
    scans: list[int] = []
    real_scan = _native.scan

    def counting_scan(*args: object, **kwargs: object) -> object:
        scans.append(1)
        return real_scan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_native, "scan", counting_scan)
    pendings = [writer.submit_raw(b) for b in batches]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await pendings[-1].wait_durable()
        nursery.cancel_scope.cancel()
    assert writer.rounds == 1 and not scans
    monkeypatch.setattr(_native, "scan", real_scan)
    assert follower.epoch_history == leader.epoch_history
    fs.crash()
    reopened, _ = open_log(fs)
    assert [(r.index, r.epoch, r.body, r.flags) for r in reopened.read(1)] == [
        (r.index, r.epoch, r.body, r.flags) for r in leader.read(1)
    ]


def test_check_records_refuses_what_is_not_the_next_records() -> None:
    log, _ = open_log()
    data = log.encode([ev("a"), ev("b"), ev("c")], 3, 7)
    records = check_records(data, 7, min_epoch=3)
    assert (records.first_index, records.last_index, records.first_epoch, records.last_epoch) == (7, 9, 3, 3)
    assert records.batch_end_index == 9
    tail = records.suffix(1)
    assert (tail.first_index, tail.data, list(tail.offsets)) == (8, data[records.offsets[1] :], [0, tail.offsets[1]])
    assert records.suffix(0) is records
    flipped = bytearray(data)
    flipped[40] ^= 1
    for bad, first, min_epoch in [
        (b"", 7, 3),  # nothing
        (data, 8, 3),  # another index
        (data, 7, 4),  # an epoch going back
        (bytes(flipped), 7, 3),  # a bad CRC
        (data + bytes(8), 7, 3),  # trailing zeros
        (data[:-8], 7, 3),  # a cut record
    ]:
        with pytest.raises(InvalidRecords):
            check_records(bad, first, min_epoch=min_epoch)


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


@pytest.mark.parametrize("inline", [False, True])
async def test_a_fault_found_outside_the_writer_stops_it_as_its_own_would(inline: bool) -> None:
    """Rot found by a read, or a failed fdatasync of meta.json: stop_for_fault makes the
    writer stop as on its own failed round (queued batches fail, later submits raise,
    on_failure hears once, run re-raises), so the node has one storage-failed path."""
    log, _fs = open_log()
    heard: list[StorageError] = []
    writer = GroupCommitWriter(log, on_failure=heard.append, inline=inline)
    ok = writer.submit([ev("ok")], 1)
    rot = CorruptionError("/wal/00000000000000000001.wal", 64, "crc mismatch")
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await ok.wait_durable()
            queued = writer.submit([ev("queued")], 1)  # no await since: still queued, or in a round
            writer.stop_for_fault(rot)
            writer.stop_for_fault(FsyncError(5, "/wal/meta.json.tmp"))  # a second fault: heard of once
    assert raised.group_contains(CorruptionError)
    assert writer.failure is rot and heard == [rot]
    try:
        await queued.wait_durable()  # the thread had taken it into a round: written and synced
        assert not inline, "the inline writer had not run since the submit"
    except CorruptionError:
        pass  # failed with the fault, not left waiting
    with pytest.raises(CorruptionError):
        writer.submit([ev("later")], 1)
    with pytest.raises(CorruptionError):
        await writer.wait_durable(2)


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
        with pytest.raises(Truncated):
            await queued.wait_durable()
        assert writer.submitted_index == 5 and writer.durable_index == 5 and log.last_index == 5
        after = writer.submit([(KIND_EVENT, 0, b"new")], 2)
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


# -- rounds are encoded at write time, in one native call per run of batches ----------------------


async def test_a_round_is_encoded_byte_for_byte_as_each_batch_alone() -> None:
    """Single events, multi-entry batches, an epoch change, raw bytes and batches whose
    ``data`` a leader already took: the round on disk is exactly their per-batch encodings."""
    log, _ = open_log()
    writer = GroupCommitWriter(log)
    other, _ = open_log()  # encodes each batch alone, as PendingAppend.data does
    pendings = [
        writer.submit([ev("one")], 1),
        writer.submit([ev("two-a"), ev("two-b"), ev("two-c")], 1),
        writer.submit([(KIND_EPOCH_START, 0, b"{}")], 2),
        writer.submit([ev("")], 2),  # an empty body: header only
        writer.submit([ev("x" * 13)], 2),
    ]
    shipped = pendings[1].data  # taken before the round, as a leader does right after submit
    raw = other.encode([ev("raw")], 2, writer.submitted_index + 1)
    pendings.append(writer.submit_raw(check_records(raw, writer.submitted_index + 1, min_epoch=2)))
    pendings.append(writer.submit([ev("last")], 3))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await pendings[-1].wait_durable()
        nursery.cancel_scope.cancel()
    assert writer.rounds == 1 and all(p.done for p in pendings)
    expected = [
        other.encode([ev("one")], 1, 1),
        other.encode([ev("two-a"), ev("two-b"), ev("two-c")], 1, 2),
        other.encode([(KIND_EPOCH_START, 0, b"{}")], 2, 5),
        other.encode([ev("")], 2, 6),
        other.encode([ev("x" * 13)], 2, 7),
        other.encode([ev("raw")], 2, 8),
        other.encode([ev("last")], 3, 9),
    ]
    assert [p.data for p in pendings] == expected and shipped == expected[1]
    assert [p.nbytes for p in pendings] == [len(e) for e in expected]
    assert log.read_raw(1, 1 << 20) == b"".join(expected)
    # BATCH_END on the last record of each submit, and nowhere else
    assert [r.index for r in log.read(1) if r.batch_end] == [1, 4, 5, 6, 7, 8, 9]
    assert log.epoch_history == [(1, 1), (2, 5), (3, 9)]


@given(
    batches=st.lists(
        st.tuples(
            st.lists(
                st.tuples(st.sampled_from([1, 2, 3]), st.just(0), st.binary(max_size=40)),
                min_size=1,
                max_size=4,
            ),
            st.integers(0, 1),  # epoch step
            st.booleans(),  # take .data before the round
        ),
        min_size=1,
        max_size=12,
    )
)
@settings(max_examples=60, deadline=None)
def test_round_encoding_matches_per_batch_encoding(
    batches: list[tuple[list[tuple[int, int, bytes]], int, bool]],
) -> None:
    async def main() -> None:
        log, _ = open_log()
        writer = GroupCommitWriter(log)
        epoch, expected, pendings = 1, [], []
        for entries, step, take in batches:
            epoch += step
            pending = writer.submit(entries, epoch)
            expected.append(log.encode(entries, epoch, pending.first_index))
            if take:
                assert pending.data == expected[-1]
            pendings.append(pending)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await pendings[-1].wait_durable()
            nursery.cancel_scope.cancel()
        assert log.read_raw(1, 1 << 20) == b"".join(expected)
        assert [p.data for p in pendings] == expected

    trio.run(main)


async def test_bad_entries_fail_their_submit_and_queue_nothing() -> None:
    log, _ = open_log()
    writer = GroupCommitWriter(log)
    good = writer.submit([ev("ok")], 1)
    bad: list[tuple[list[tuple[int, int, bytes]], int]] = [
        ([(KIND_EVENT, 0, bytes(OPTS.max_record_body_bytes + 1))], 1),  # over the body limit
        ([ev("fine"), (KIND_EVENT, 0, bytes(OPTS.max_record_body_bytes + 1))], 1),
        ([(0, 0, b"kind 0")], 1),
        ([(5, 0, b"unknown kind")], 1),  # 4 is TRACKING
        ([(KIND_EVENT, 2, b"unknown flag")], 1),
        ([(KIND_EVENT, FLAG_BATCH_END, b"framed by the caller")], 1),  # the writer frames batches
        ([ev("a"), (KIND_EVENT, FLAG_BATCH_END, b"a batch end mid-batch"), ev("c")], 1),
        ([ev("epoch too big")], 1 << 64),
    ]
    for entries, epoch in bad:
        with pytest.raises(LogStateError, match=r"^submit: "):
            writer.submit(entries, epoch)
    assert writer.submitted_index == 1 and writer.batches == 1
    empty, _ = open_log()
    with pytest.raises(LogStateError):
        GroupCommitWriter(empty).submit([ev("epoch 0")], 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await good.wait_durable()
        nursery.cancel_scope.cancel()
    assert [r.body for r in log.read(1)] == [b"ok"]


async def test_a_failed_fdatasync_reports_no_append_of_its_round_durable() -> None:
    log, fs = open_log()
    writer = GroupCommitWriter(log)
    outcomes: dict[int, BaseException | None] = {}
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await writer.submit([ev("before")], 1).wait_durable()
            fs.fail_next_fdatasync()

            async def client(i: int) -> None:
                pending = writer.submit([ev(f"r{i}")], 1)
                try:
                    await pending.wait_durable()
                except FsyncError as e:
                    outcomes[i] = e
                else:
                    outcomes[i] = None
                assert pending.done

            for i in range(40):
                nursery.start_soon(client, i)
    assert raised.group_contains(FsyncError)
    assert len(outcomes) == 40 and all(isinstance(e, FsyncError) for e in outcomes.values())
    assert writer.durable_index == 1
    fs.crash()
    log, _ = open_log(fs)
    assert log.last_index == 1


async def test_two_waiters_on_one_append_and_a_cancelled_one() -> None:
    """A leader and its client both wait on the same append; a waiter that gives up
    (cancelled) leaves the others and the append unaffected."""
    log, _ = open_log()
    writer = GroupCommitWriter(log)
    pending = writer.submit([ev("shared")], 1)
    woke: list[str] = []

    async def wait(name: str) -> None:
        await pending.wait_durable()
        woke.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "a")
        nursery.start_soon(wait, "b")
        with trio.CancelScope() as gave_up:
            nursery.start_soon(lambda: _cancel_soon(gave_up))
            await pending.wait_durable()
        assert gave_up.cancelled_caught and not pending.done
        await nursery.start(writer.run)
        await pending.wait_durable()  # a third waiter after the cancelled one
        await pending.wait_durable()  # done already: returns at once (still a checkpoint)
        nursery.cancel_scope.cancel()
    assert sorted(woke) == ["a", "b"] and writer.durable_index == 1


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.lowlevel.checkpoint()
    scope.cancel()


async def test_changing_the_entries_list_after_submit_changes_nothing() -> None:
    log, _ = open_log()
    writer = GroupCommitWriter(log)
    entries = [ev("checked")]
    pending = writer.submit(entries, 1)
    entries[0] = (KIND_EVENT, 0, bytes(OPTS.max_record_body_bytes + 1))  # would not encode
    entries.append(ev("extra"))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await pending.wait_durable()
        nursery.cancel_scope.cancel()
    assert [r.body for r in log.read(1)] == [b"checked"]


async def test_encode_pending_ships_the_bytes_each_batch_would_and_the_round_reuses_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log, _ = open_log()
    writer = GroupCommitWriter(log)
    other, _ = open_log()
    pendings = [
        writer.submit([ev("a")], 1),
        writer.submit([ev("b"), ev("c")], 1),
        writer.submit([ev("d")], 1),
        writer.submit([(KIND_EPOCH_START, 0, b"{}")], 2),  # an epoch change splits the stretch
        writer.submit([ev("e")], 2),
        writer.submit([ev("f")], 2),
    ]
    already = pendings[2].data  # shipped earlier: it splits the stretch too, and is kept
    expected = [
        other.encode([ev("a")], 1, 1),
        other.encode([ev("b"), ev("c")], 1, 2),
        other.encode([ev("d")], 1, 4),
        other.encode([(KIND_EPOCH_START, 0, b"{}")], 2, 5),
        other.encode([ev("e")], 2, 6),
        other.encode([ev("f")], 2, 7),
    ]
    calls: list[int] = []
    real = _native.encode_records

    def counting(bodies: list[bytes], *args: Any) -> bytearray:
        calls.append(len(bodies))
        return real(bodies, *args)

    monkeypatch.setattr(_native, "encode_records", counting)
    assert encode_pending(pendings) == b"".join(expected)
    assert calls == [3, 3]  # a+b+c in epoch 1, then the epoch start+e+f: a call per stretch
    assert [p.data for p in pendings] == expected
    assert pendings[2].data is already
    assert encode_pending(pendings[4:5]) == expected[4]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await pendings[-1].wait_durable()
        nursery.cancel_scope.cancel()
    assert log.read_raw(1, 100_000) == b"".join(expected)


# -- the writer thread ----------------------------------------------------------------------------


def _hold_first_round(
    writer: GroupCommitWriter, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any, list[tuple[int, int]]]:
    """Make the writer thread stop inside its first round until ``release`` is set;
    ``inside`` is set once it is there; ``rounds`` records (records in the round, the
    durable index the event loop had published) as each round starts."""
    import threading

    inside, release = threading.Event(), threading.Event()
    sizes: list[tuple[int, int]] = []
    real = writer._encode_and_append

    def held(parts: list[Any]) -> int:
        sizes.append((sum(len(p[0]) if isinstance(p, tuple) else 1 for p in parts), writer.durable_index))
        if len(sizes) == 1:
            inside.set()
            release.wait(10)
        return real(parts)

    monkeypatch.setattr(writer, "_encode_and_append", held)
    return inside, release, sizes


async def test_batches_submitted_during_a_round_are_the_next_round(monkeypatch: pytest.MonkeyPatch) -> None:
    log, _ = open_log()
    writer = GroupCommitWriter(log)
    inside, release, sizes = _hold_first_round(writer, monkeypatch)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        first = writer.submit([ev("first")], 1)
        await trio.to_thread.run_sync(inside.wait, 10)
        later = [writer.submit([ev(f"later{i}")], 1) for i in range(20)]
        release.set()
        await later[-1].wait_durable()
        assert first.done and all(p.done for p in later)
        nursery.cancel_scope.cancel()
    # one round for all 20, started only once the loop had taken the first round's outcome
    assert sizes == [(1, 0), (20, 1)] and writer.rounds == 2


async def test_cancelling_the_writer_mid_round_finishes_and_accounts_that_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The round being written when run() is cancelled completes and counts as durable;
    what was still queued fails (never written)."""
    log, fs = open_log()
    writer = GroupCommitWriter(log)
    inside, release, _ = _hold_first_round(writer, monkeypatch)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        in_round = writer.submit([ev("in the round")], 1)
        await trio.to_thread.run_sync(inside.wait, 10)
        queued = writer.submit([ev("queued")], 1)
        nursery.cancel_scope.cancel()
        trio.lowlevel.current_trio_token().run_sync_soon(release.set)  # once run() waits for it
    assert in_round.done and writer.durable_index == 1
    await in_round.wait_durable()  # succeeded
    with pytest.raises(StorageError):
        await queued.wait_durable()
    fs.crash()
    log, _ = open_log(fs)
    assert [r.body for r in log.read(1)] == [b"in the round"]


@pytest.mark.parametrize("where", ["_write_round", "_take_round"])  # in a round, and around one
async def test_a_crash_in_the_writer_thread_stops_the_writer_and_fails_waiters(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    log, _ = open_log()
    writer = GroupCommitWriter(log)

    def broken(*args: Any) -> int:
        raise RuntimeError("a bug in the round")

    monkeypatch.setattr(writer, where, broken)
    pending = writer.submit([ev("doomed")], 1)
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            with pytest.raises(StorageError):
                await pending.wait_durable()
    assert raised.group_contains(RuntimeError, match="a bug in the round")
    assert writer.durable_index == 0
    with pytest.raises(StorageError):
        writer.submit([ev("later")], 1)
