"""Group commit: the one place the write-ahead log meets trio.

Callers ``submit`` batches synchronously: indexes are assigned and the records encoded at
once (so a leader can ship ``pending.data`` to followers while its own fsync runs), then
the batch waits in a queue. One writer task takes *every* queued batch, concatenates them
and hands them to ``WriteAheadLog.append`` in one ``trio.to_thread.run_sync`` call: one
pwritev and one fdatasync for all of them. While that runs, new batches queue up for the
next round, so the cost of an fsync is shared by everyone who arrived during the last one.

Failures:

- FsyncError: every waiter of that round and of every later batch gets it, nothing is
  reported durable, and ``run`` re-raises it: the node must stop (never retry a failed
  fsync). Later ``submit`` calls raise it at once.
- DiskFullError: that round's waiters get it, and so do batches queued behind it (their
  indexes followed the failed ones). The reserved tail goes back to the log's, so the next
  submit reuses the same indexes; later rounds may succeed once space returns. A leader
  that already shipped the failed records must not reuse those indexes in the same epoch
  (its followers may hold them): it should step down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from walstore import _native
from walstore._native import ScanStop
from walstore.errors import DiskFullError, FsyncError, LogStateError, StorageError
from walstore.wal.log import WriteAheadLog

if TYPE_CHECKING:
    from walstore.metrics import Metrics

# One round writes at most this much (plus one batch): bounds the bytes a thread holds and
# the latency the first waiter of a huge round sees.
MAX_ROUND_BYTES = 16 * 1024 * 1024


class PendingAppend:
    """One submitted batch: its indexes and bytes now, its durability later."""

    def __init__(self, first_index: int, last_index: int, last_epoch: int, data: bytes) -> None:
        self.first_index = first_index
        self.last_index = last_index
        self.last_epoch = last_epoch
        self.data = data
        self._done = trio.Event()
        self._error: StorageError | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait_durable(self) -> None:
        """Return once the batch is fdatasync'd; raise the StorageError that stopped it."""
        await self._done.wait()
        if self._error is not None:
            raise self._error

    def _finish(self, error: StorageError | None) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()


@dataclass(eq=False)
class _Truncate:
    after_index: int
    done: trio.Event = field(default_factory=trio.Event)
    error: StorageError | None = None


class GroupCommitWriter:
    """``limiter`` bounds the worker threads (trio's default limiter if None); ``metrics``
    receives the wal_* numbers; ``on_rollback(first_failed_index)`` runs in the writer task
    right after a DiskFullError rolled the reserved tail back, before any new submit."""

    def __init__(
        self,
        log: WriteAheadLog,
        limiter: trio.CapacityLimiter | None = None,
        *,
        metrics: Metrics | None = None,
        on_rollback: Callable[[int], None] | None = None,
        max_round_bytes: int = MAX_ROUND_BYTES,
    ) -> None:
        self._log = log
        self._max_round_bytes = max_round_bytes
        self._limiter = limiter
        self._metrics = metrics
        self._on_rollback = on_rollback
        self._queue: list[PendingAppend | _Truncate] = []
        self._wakeup = trio.Event()
        self._submitted_index = log.last_index
        self._submitted_epoch = log.last_epoch
        self._durable_index = log.last_index
        self._durable_changed = trio.Event()
        self._failure: StorageError | None = None
        self._running = False
        # Counters for metrics and tests: rounds (one append + fsync each) and batches.
        self.rounds = 0
        self.batches = 0

    @property
    def log(self) -> WriteAheadLog:
        return self._log

    @property
    def submitted_index(self) -> int:
        """Highest index handed out (the reserved tail)."""
        return self._submitted_index

    @property
    def submitted_epoch(self) -> int:
        """Epoch of the record at submitted_index (0 for an empty log)."""
        return self._submitted_epoch

    @property
    def durable_index(self) -> int:
        """Highest index known to be fdatasync'd."""
        return self._durable_index

    @property
    def failure(self) -> StorageError | None:
        """The fatal error that stopped the writer, if any."""
        return self._failure

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, entries: Sequence[tuple[int, int, bytes]], epoch: int) -> PendingAppend:
        """Reserve the next indexes for (kind, flags, body) entries, encode them as one
        atomic batch and queue them. Synchronous: the indexes are known on return."""
        self._check_alive()
        if not entries:
            raise LogStateError("submit: a batch needs at least one entry")
        if epoch < self._submitted_epoch:
            raise LogStateError(f"submit: epoch {epoch} is below the log's epoch {self._submitted_epoch}")
        first = self._submitted_index + 1
        data = self._log.encode(entries, epoch, first)
        return self._enqueue(PendingAppend(first, first + len(entries) - 1, epoch, data))

    def submit_raw(self, data: bytes) -> PendingAppend:
        """Queue records encoded elsewhere (a follower's copy of the leader's bytes). They
        must start at submitted_index + 1; checked now, so a bad frame never reaches the
        queue."""
        self._check_alive()
        first = self._submitted_index + 1
        max_body = self._log.options.max_record_body_bytes
        res = _native.scan(data, 0, first, max_body, min_epoch=self._submitted_epoch, collect_offsets=False)
        if res.stop is not ScanStop.END_ZERO or res.end_offset != len(data) or res.count == 0:
            raise LogStateError(
                f"submit_raw: bytes at offset {res.end_offset} of {len(data)} are not record {res.next_index} "
                f"({res.reason if res.count or res.stop is not ScanStop.END_ZERO else 'no records'})"
            )
        return self._enqueue(PendingAppend(first, res.next_index - 1, res.last_epoch, bytes(data)))

    def _enqueue(self, pending: PendingAppend) -> PendingAppend:
        self._submitted_index = pending.last_index
        self._submitted_epoch = pending.last_epoch
        self._queue.append(pending)
        self.batches += 1
        self._wakeup.set()
        return pending

    async def truncate_suffix(self, after_index: int) -> None:
        """Drop every record > after_index, in order with the writes: batches queued before
        this call that reach past after_index fail with LogStateError (never written)."""
        self._check_alive()
        if after_index < self._log.first_index - 1:
            raise LogStateError(f"truncate_suffix({after_index}): the log starts at {self._log.first_index}")
        if after_index >= self._submitted_index:
            return
        kept: list[PendingAppend | _Truncate] = []
        for item in self._queue:
            if isinstance(item, PendingAppend) and item.last_index > after_index:
                item._finish(LogStateError(f"records {item.first_index}..{item.last_index} were truncated"))
            else:
                kept.append(item)
        request = _Truncate(after_index)
        self._queue = [*kept, request]
        self._submitted_index = after_index
        survivors = [p for p in kept if isinstance(p, PendingAppend)]
        if survivors:
            self._submitted_epoch = survivors[-1].last_epoch
        elif after_index <= self._log.last_index:
            self._submitted_epoch = self._log.epoch_at(after_index)
        self._wakeup.set()
        await request.done.wait()
        if request.error is not None:
            raise request.error

    async def wait_durable(self, index: int) -> None:
        """Return once every index <= index is durable; raise the writer's failure."""
        while self._durable_index < index:
            if self._failure is not None:
                raise self._failure
            if index > self._submitted_index:
                raise LogStateError(f"wait_durable({index}): only {self._submitted_index} submitted")
            await self._durable_changed.wait()

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise self._failure

    # -- the writer task ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task. Returns only by cancellation; raises FsyncError (fatal)."""
        if self._running:
            raise LogStateError("GroupCommitWriter.run is already running")
        self._running = True
        task_status.started()
        try:
            while True:
                if not self._queue:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                head = self._queue[0]
                if isinstance(head, _Truncate):
                    del self._queue[0]
                    await self._truncate(head)
                else:
                    await self._write_round()
        except BaseException as e:
            failure = e if isinstance(e, StorageError) else StorageError("the write-ahead log writer stopped")
            self._fail_all(failure)
            raise
        finally:
            self._running = False

    def _take_round(self) -> list[PendingAppend]:
        """The queued appends up to the first truncation, at most max_round_bytes (or one)."""
        size = 0
        n = 0
        for item in self._queue:
            if not isinstance(item, PendingAppend) or (n and size + len(item.data) > self._max_round_bytes):
                break
            size += len(item.data)
            n += 1
        batch = [p for p in self._queue[:n] if isinstance(p, PendingAppend)]
        del self._queue[:n]
        return batch

    async def _write_round(self) -> None:
        batch = self._take_round()
        data = batch[0].data if len(batch) == 1 else b"".join(p.data for p in batch)
        started = time.perf_counter()
        try:
            # Not abandoned on cancel: the round finishes and is accounted for either way.
            await trio.to_thread.run_sync(self._log.append, data, limiter=self._limiter)
        except FsyncError as e:
            for p in batch:
                p._finish(e)
            raise
        except DiskFullError as e:
            for p in batch:
                p._finish(e)
            # Queued batches were numbered after the failed ones: they cannot be written.
            self._fail_queued(e)
            self._submitted_index = self._log.last_index
            self._submitted_epoch = self._log.last_epoch
            if self._on_rollback is not None:
                self._on_rollback(batch[0].first_index)
            # Wake wait_durable() callers: what they wait for may no longer be submitted.
            self._notify_durable()
            return
        except LogStateError as e:
            # A bug above us (the log rejected our own numbering): fail loudly, not silently.
            for p in batch:
                p._finish(e)
            raise
        self.rounds += 1
        if self._metrics is not None:
            self._metrics.wal_fsync_seconds.observe(time.perf_counter() - started)
            self._metrics.wal_fsync_batch_events.observe(batch[-1].last_index - batch[0].first_index + 1)
            self._metrics.wal_bytes_written_total.inc(len(data))
            self._metrics.wal_size_bytes.set(self._log.data_bytes)
        self._durable_index = batch[-1].last_index
        for p in batch:
            p._finish(None)
        self._notify_durable()

    async def _truncate(self, request: _Truncate) -> None:
        try:
            await trio.to_thread.run_sync(self._log.truncate_suffix, request.after_index, limiter=self._limiter)
        except StorageError as e:
            request.error = e
            request.done.set()
            raise
        self._durable_index = min(self._durable_index, request.after_index)
        request.done.set()
        self._notify_durable()

    def _notify_durable(self) -> None:
        self._durable_changed.set()
        self._durable_changed = trio.Event()

    def _fail_queued(self, error: StorageError) -> None:
        for item in self._queue:
            if isinstance(item, PendingAppend):
                item._finish(error)
            else:
                item.error = error
                item.done.set()
        self._queue = []

    def _fail_all(self, error: StorageError) -> None:
        if self._failure is None:
            self._failure = error
        self._fail_queued(error)
        self._notify_durable()
