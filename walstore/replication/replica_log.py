"""The local log as replication sees it: durable records, in-flight writes, promises.

The one owner of the log: a facade over the WAL (``WriteAheadLog`` + its
``GroupCommitWriter``) and the metadata file. The node, the leader, follower and takeover
code ask it, and nothing else, for "the epoch of entry i", "the last entry submitted,
written, durable", "wait until i is durable", "persist this promise", "persist what I
know is committed". The node, which builds the writer, also runs it and asks it how the
disk is doing (failed, full, slow): storage health, not the log's contents.

Committed entries are never truncated: ``truncate_after`` refuses any cut below the highest
commit index this node has learned (in memory or recorded in meta.json), raises
``CommittedTruncation`` and *halts* the replica: it stops taking writes for good (until a
restart), says so in a log line, a metric and ``/health/ready``, and deletes nothing. The tail is tracked at
*submission* (not durability) so a follower can check log matching for a pipelined APPEND
while the previous one is still syncing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from walstore import runtime
from walstore.errors import CommittedTruncation, CorruptionError, FsyncError
from walstore.wal.log import WriteAheadLog
from walstore.wal.record import CheckedRecords, Record, check_records
from walstore.wal.writer import GroupCommitWriter, PendingAppend

log = logging.getLogger("walstore.replication")

# A follower's checked batches are kept until applied, so the applier decodes them from
# memory instead of reading and scanning them back from the segments. Past this much (a
# follower whose commit index stalls), the oldest are dropped and read from disk instead.
UNAPPLIED_CACHE_BYTES = 64 << 20


class ReplicaLog:
    def __init__(
        self, wal: WriteAheadLog, writer: GroupCommitWriter, *, on_halt: Callable[[str], None] = lambda reason: None
    ) -> None:
        self.wal = wal
        self.writer = writer
        self.on_halt = on_halt
        self.halted: str | None = None  # why this replica stopped taking writes
        self.promised_epoch = max(wal.promised_epoch, wal.last_epoch)
        # The promise the disk holds (meta.json, or entries of that epoch in the log): at
        # most promised_epoch, which moves first. Below it after a promise failed to persist.
        self.durable_promise = self.promised_epoch
        # Created by the first waiter and set by the next change: every client append moves
        # the tail, and almost never is anyone waiting, so no Event per submit.
        self._tail_moved: trio.Event | None = None
        self._meta_lock = trio.Lock()
        # Batches from submit_raw not applied yet, consecutive, oldest first.
        self._unapplied: deque[CheckedRecords] = deque()
        self._unapplied_bytes = 0

    # -- promises ----------------------------------------------------------------------

    async def promise(self, epoch: int) -> None:
        """Promise ``epoch`` durably (fsync'd meta) before answering PROMISE or accepting
        APPENDs of a new epoch. The in-memory value moves first, so from this moment
        every frame of a lower epoch is refused even while the file is being written. A
        promise whose write failed (disk full) is written again by the next call for that
        epoch: it counts only once it is on disk."""
        if epoch <= self.durable_promise:
            return
        self.promised_epoch = max(self.promised_epoch, epoch)
        async with self._meta_lock:
            target = self.promised_epoch
            if target > self.durable_promise:  # else persisted while we waited for the lock
                await self._write_meta(self.wal.set_promised_epoch, target)
                self.durable_promise = target

    @property
    def incarnation(self) -> str:
        return self.wal.incarnation

    async def persist_commit(self, index: int) -> None:
        """Record durably that entries up to ``index`` (held and durable here) are
        committed. Lazy: the node calls this as the commit index moves, not per entry."""
        if index <= self.wal.known_commit:
            return
        async with self._meta_lock:
            await self._write_meta(self.wal.set_known_commit, index)

    async def _write_meta(self, write: Callable[[int], None], value: int) -> None:
        """A meta.json write, in a worker thread. Its failed fdatasync poisoned the log:
        the writer stops with it, so the node stops as on a failed round (never retried)."""
        try:
            await runtime.current().run_sync(write, value)
        except FsyncError as exc:
            self.writer.stop_for_fault(exc)
            raise

    def halt(self, reason: str) -> None:
        """Stop taking writes: a safety invariant was about to break. Idempotent."""
        if self.halted is not None:
            return
        self.halted = reason
        log.critical("SAFETY HALT: %s; this node takes no more writes until an operator has looked", reason)
        self.on_halt(reason)

    # -- reading -----------------------------------------------------------------------

    @property
    def tail_index(self) -> int:
        """The last entry submitted (durable or not): the writer's reserved tail."""
        return self.writer.submitted_index

    @property
    def tail_epoch(self) -> int:
        return self.writer.submitted_epoch

    def epoch_history(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.wal.epoch_history)

    def epoch_at(self, index: int) -> int | None:
        """Epoch of entry ``index``: 0 for index 0, None when not (yet) in the log."""
        if index == 0:
            return 0
        if index == self.tail_index:
            return self.tail_epoch
        if index <= self.wal.last_index:
            return self.wal.epoch_at(index)
        return None

    @property
    def written_index(self) -> int:
        """The last entry in the segments (written; durable up to ``durable_index``)."""
        return self.wal.last_index

    @property
    def first_index(self) -> int:
        return self.wal.first_index

    @property
    def durable_index(self) -> int:
        return self.writer.durable_index

    @property
    def known_commit(self) -> int:
        """The commit index recorded in meta.json (no truncation may cut below it)."""
        return self.wal.known_commit

    async def wait_durable(self, index: int) -> None:
        """Until entry ``index`` is durable here; Truncated or a StorageError if it never
        will be (rolled back, truncated, or the log failed)."""
        await self.writer.wait_durable(index)

    def body(self, index: int) -> bytes:
        """The body of entry ``index``, from the segments."""
        try:
            return self.wal.body(index)
        except CorruptionError as exc:
            raise self._rot_found(exc) from None

    def records_to_apply(self, first: int, last: int) -> list[Record]:
        """Records ``first..last``, durable here, for the applier (which asks in order):
        from the checked batches still in memory when they hold the whole range, else read
        back from the segments. Batches before ``first`` are applied: they are let go."""
        cache = self._unapplied
        while cache and cache[0].last_index < first:
            self._unapplied_bytes -= len(cache.popleft().data)
        if not cache or cache[0].first_index > first or cache[-1].last_index < last:
            try:
                return self.wal.read(first, last)
            except CorruptionError as exc:
                raise self._rot_found(exc) from None
        out: list[Record] = []
        for batch in cache:
            if batch.first_index > last:
                break
            out += batch.records(max(first, batch.first_index), min(last, batch.last_index))
        return out

    def _forget_unapplied(self) -> None:
        self._unapplied.clear()
        self._unapplied_bytes = 0

    def read_raw(self, first: int, max_bytes: int) -> bytes:
        if first > self.wal.last_index:
            return b""
        try:
            return self.wal.read_raw(first, max_bytes)
        except CorruptionError as exc:
            raise self._rot_found(exc) from None

    def _rot_found(self, exc: CorruptionError) -> CorruptionError:
        """Rot in a record this log wrote, found by a read (an apply, a client's read, a
        FETCH, a leader's stream): the disk's fault, fatal for this node. The writer stops
        with it, so the node stops through its one storage-failed path (one CRITICAL line,
        503 storage_failed, not ready), whoever found it."""
        if self.writer.failure is None:
            self.writer.stop_for_fault(exc)
        return exc

    # -- writing -----------------------------------------------------------------------

    def submit(self, entries: list[tuple[int, int, bytes]], epoch: int) -> PendingAppend:
        pending = self.writer.submit(entries, epoch)
        self._tail_changed()
        return pending

    def submit_raw(self, records: CheckedRecords) -> PendingAppend:
        """Queue a leader's records, checked where they arrived (``check_records``)."""
        pending = self.writer.submit_raw(records)
        cache = self._unapplied
        if cache and cache[-1].last_index + 1 != records.first_index:
            self._forget_unapplied()  # not consecutive (cannot happen: truncation clears it)
        cache.append(records)
        self._unapplied_bytes += len(records.data)
        while self._unapplied_bytes > UNAPPLIED_CACHE_BYTES and len(cache) > 1:
            self._unapplied_bytes -= len(cache.popleft().data)
        self._tail_changed()
        return pending

    def check_records(self, data: bytes, first_index: int, *, min_epoch: int) -> CheckedRecords:
        """Validate a peer's records against this log's limits (the one check they get)."""
        return check_records(data, first_index, min_epoch=min_epoch, max_body=self.wal.options.max_record_body_bytes)

    async def drain(self) -> None:
        """Wait until everything submitted is durable (or raise the writer's error)."""
        await self.writer.wait_durable(self.tail_index)

    async def truncate_after(self, index: int, commit_index: int, *, asked_by: str) -> None:
        """Drop every entry after ``index``; ``commit_index`` is the caller's in-memory
        commit index. CommittedTruncation (and a halt) if that would cut a committed entry."""
        self._refuse_committed_cut(index, commit_index, asked_by)
        async with self._meta_lock:  # no commit index is recorded while we cut
            await self.drain()
            self._refuse_committed_cut(index, commit_index, asked_by)
            log.warning("truncating the log after index %d (was %d), asked by %s", index, self.tail_index, asked_by)
            self._forget_unapplied()  # the writer drops what was queued after index too
            await self.writer.truncate_suffix(index)
        self._tail_changed()

    def _refuse_committed_cut(self, index: int, commit_index: int, asked_by: str) -> None:
        known = max(commit_index, self.wal.known_commit)
        if index < known:
            # Committed entries are on a majority of voters and every later leader has
            # them: a request to cut them means a bug, a hostile peer or a lost disk
            # elsewhere, never a real conflict. Refuse, keep the data, stop taking writes.
            exc = CommittedTruncation(index, known, f"asked by {asked_by}")
            self.halt(str(exc))
            raise exc

    def rolled_back(self) -> None:
        """The writer dropped failed batches (disk full) and moved its tail back."""
        self._forget_unapplied()
        self._tail_changed()

    def _tail_changed(self) -> None:
        event = self._tail_moved
        if event is not None:
            self._tail_moved = None
            event.set()

    async def wait_tail_moved(self) -> None:
        """Until the next submission, truncation or rollback."""
        if self._tail_moved is None:
            self._tail_moved = trio.Event()
        await self._tail_moved.wait()
