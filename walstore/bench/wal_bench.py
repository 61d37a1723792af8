"""``walstore bench wal``: what the disk can do, and how much of it the WAL gets.

All on one file system (a temporary directory under ``--dir``, default the current one,
because /tmp is often tmpfs, where fdatasync costs nothing and proves nothing):

1. raw ceiling: one 4 KiB pwrite + fdatasync per operation (ops/s: the fsync rate), and
   1 MiB sequential writes + fdatasync (MB/s: the bandwidth), both into pre-allocated
   space like the WAL's segments;
2. the WAL: 300-byte event bodies appended through ``GroupCommitWriter`` by 1, 16 and 256
   concurrent trio tasks, each waiting for durability before its next append (as HTTP
   clients do): appends/s, MB/s of records written, records per fdatasync, and where the
   time went: event-loop time per append and worker-thread time (encode, write,
   fdatasync) per round. The rounds are serial: every writer waits on the one in flight,
   so the loop's per-append cost (~10 us here, about half of it trio's own task switch)
   times 256 plus one round's thread time bounds the rate. Then 256 tasks appending
   64-event batches, which divides that per-append cost by 64;
3. replay: ``WriteAheadLog.open`` of a log of N records (default 1,000,000), with the
   segment files in the page cache and after evicting them (POSIX_FADV_DONTNEED on those
   files only; nothing system-wide is dropped).

Targets: group commit at 256 writers >= half the raw sequential MB/s; replay >= 1,000,000
records/s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from walstore import _native
from walstore.wal.log import WriteAheadLog
from walstore.wal.record import KIND_EVENT, record_size
from walstore.wal.writer import GroupCommitWriter

EVENT_BODY_BYTES = 300
WRITER_COUNTS = (1, 16, 256)
BATCH_EVENTS = 64
MIB = 1 << 20


@dataclass
class WalBenchResult:
    filesystem: str = ""
    raw_4k_sync_ops: float = 0.0
    raw_seq_mb_s: float = 0.0
    writers: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # n -> (appends/s, MB/s, per fsync)
    # n -> (event-loop microseconds per append, worker-thread milliseconds per round)
    writer_costs: dict[int, tuple[float, float]] = field(default_factory=dict)
    batched_mb_s: float = 0.0
    replay_records: int = 0
    replay_warm_records_s: float = 0.0
    replay_cold_records_s: float = 0.0


def describe_filesystem(path: Path) -> str:
    """'ext4 on /dev/vda (mounted at /)' for the mount holding path."""
    real = os.path.realpath(path)
    best = ("?", "?", "/")
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                device, mount, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[2]):
                    best = (fstype, device, mount)
    except OSError:
        return "unknown file system"
    return f"{best[0]} on {best[1]} (mounted at {best[2]})"


def _raw_sync_writes(path: Path, block: int, seconds: float, max_bytes: int) -> tuple[int, int, float]:
    """(ops, bytes, elapsed) of sequential block writes + fdatasync into pre-allocated space."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _native.fallocate(fd, 0, max_bytes, str(path))
        buf = os.urandom(block)
        ops = offset = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline and offset + block <= max_bytes:
            _native.pwritev_sync(fd, offset, [buf], True, str(path))
            offset += block
            ops += 1
        return ops, offset, time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()


def _event_body(i: int) -> bytes:
    # A realistic-looking body of exactly EVENT_BODY_BYTES (content does not matter to the WAL).
    head = f'{{"n":{i},"pad":"'.encode()
    return (head + b"x" * EVENT_BODY_BYTES)[: EVENT_BODY_BYTES - 2] + b'"}'


async def _group_commit(
    directory: Path, writers: int, seconds: float, per_batch: int = 1
) -> tuple[int, float, int, float]:
    """(events, elapsed, rounds, seconds in the worker thread) with `writers` tasks
    appending batches of `per_batch` events and awaiting their durability before the next."""
    log = WriteAheadLog.open(directory)
    writer = GroupCommitWriter(log)
    count = 0
    entries = [(KIND_EVENT, 0, _event_body(0))] * per_batch
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            start = time.perf_counter()
            deadline = start + seconds

            async def client() -> None:
                nonlocal count
                while time.perf_counter() < deadline:
                    pending = writer.submit(entries, 1)
                    await pending.wait_durable()
                    count += per_batch

            async with trio.open_nursery() as clients:
                for _ in range(writers):
                    clients.start_soon(client)
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        return count, elapsed, writer.rounds, writer.round_seconds
    finally:
        log.close()


def _build_log(directory: Path, records: int) -> None:
    chunk = 20_000
    body = _event_body(0)
    with WriteAheadLog.open(directory) as log:
        while log.last_index < records:
            n = min(chunk, records - log.last_index)
            entries = [(KIND_EVENT, 0, body)] * n
            log.append(log.encode(entries, 1, log.last_index + 1), sync=False)
        log.sync()


def _evict(directory: Path) -> None:
    for p in directory.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed_open(directory: Path) -> tuple[int, float]:
    start = time.perf_counter()
    log = WriteAheadLog.open(directory)
    elapsed = time.perf_counter() - start
    n = log.last_index
    log.close()
    return n, elapsed


def run_wal_bench(
    base_dir: Path,
    *,
    replay_records: int = 1_000_000,
    seconds: float = 3.0,
    out: Callable[[str], object] = print,
) -> WalBenchResult:
    result = WalBenchResult()
    base_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".walstore-bench-", dir=base_dir))
    try:
        result.filesystem = describe_filesystem(tmp)
        out(f"walstore bench wal: {tmp} on {result.filesystem}")
        if result.filesystem.startswith("tmpfs"):
            out("  warning: tmpfs keeps everything in memory; fdatasync is free and the numbers mean little")

        ops, _, elapsed = _raw_sync_writes(tmp / "raw4k", 4096, seconds, 1 << 30)
        result.raw_4k_sync_ops = ops / elapsed
        _, nbytes, elapsed = _raw_sync_writes(tmp / "raw1m", MIB, seconds, 2 << 30)
        result.raw_seq_mb_s = nbytes / MIB / elapsed
        out(f"raw ceiling   4 KiB write + fdatasync: {result.raw_4k_sync_ops:10.0f} ops/s")
        out(f"raw ceiling   1 MiB write + fdatasync: {result.raw_seq_mb_s:10.1f} MB/s")

        rec_bytes = record_size(EVENT_BODY_BYTES)
        for n in WRITER_COUNTS:
            appends, elapsed, rounds, in_thread = trio.run(_group_commit, tmp / f"wal-{n}", n, seconds)
            rate = appends / elapsed
            mb_s = rate * rec_bytes / MIB
            per_sync = appends / max(rounds, 1)
            result.writers[n] = (rate, mb_s, per_sync)
            loop_us = (elapsed - in_thread) / max(appends, 1) * 1e6
            thread_ms = in_thread / max(rounds, 1) * 1e3
            result.writer_costs[n] = (loop_us, thread_ms)
            out(
                f"wal {n:3d} writer(s), {EVENT_BODY_BYTES} B events: {rate:10.0f} appends/s {mb_s:8.1f} MB/s "
                f"{per_sync:6.1f} appends/fsync | {rate / result.raw_4k_sync_ops:5.2f}x raw fsync rate, "
                f"{mb_s / result.raw_seq_mb_s:5.1%} of raw MB/s | loop {loop_us:5.1f} us/append, "
                f"thread {thread_ms:5.2f} ms/round"
            )
            shutil.rmtree(tmp / f"wal-{n}")
        # The same path with the event loop's per-append cost divided by 64: how close the
        # WAL's own I/O (one pwritev + one fdatasync per round) gets to the raw bandwidth.
        events, elapsed, rounds, _ = trio.run(_group_commit, tmp / "wal-batches", 256, seconds, BATCH_EVENTS)
        mb_s = events / elapsed * rec_bytes / MIB
        result.batched_mb_s = mb_s
        out(
            f"wal 256 writers x {BATCH_EVENTS}-event batches: {events / elapsed:10.0f} events/s {mb_s:8.1f} MB/s "
            f"{events / max(rounds, 1):6.0f} events/fsync | {mb_s / result.raw_seq_mb_s:5.1%} of raw MB/s"
        )
        shutil.rmtree(tmp / "wal-batches")

        replay_dir = tmp / "replay"
        build_start = time.perf_counter()
        _build_log(replay_dir, replay_records)
        out(f"replay: built {replay_records} records in {time.perf_counter() - build_start:.1f} s")
        n, elapsed = _timed_open(replay_dir)
        result.replay_records = n
        result.replay_warm_records_s = n / elapsed
        _evict(replay_dir)
        n, elapsed_cold = _timed_open(replay_dir)
        result.replay_cold_records_s = n / elapsed_cold
        out(
            f"replay (WriteAheadLog.open) of {n} records: {result.replay_warm_records_s:12.0f} records/s in page "
            f"cache ({elapsed:.2f} s), {result.replay_cold_records_s:12.0f} records/s from disk ({elapsed_cold:.2f} s)"
        )
        gc_ratio = result.writers[WRITER_COUNTS[-1]][1] / result.raw_seq_mb_s
        out(
            f"targets: 256-writer group commit >= 50% of raw MB/s: {gc_ratio:.1%} "
            f"({'met' if gc_ratio >= 0.5 else 'NOT met'}); replay >= 1,000,000 records/s: "
            f"{result.replay_warm_records_s:,.0f} ({'met' if result.replay_warm_records_s >= 1e6 else 'NOT met'})"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
