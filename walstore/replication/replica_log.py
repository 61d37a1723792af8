"""The local log as replication sees it: durable records, in-flight writes, promises.

One facade over the WAL (``WriteAheadLog`` + its ``GroupCommitWriter``) and the metadata
file, so the leader, follower and takeover code ask one object for "the epoch of entry i",
"the last entry I have submitted", "persist this promise". The tail is tracked at
*submission* (not durability) so a follower can check log matching for a pipelined APPEND
while the previous one is still syncing.
"""

from __future__ import annotations

import logging

import trio

from walstore.errors import LogStateError
from walstore.wal.log import WriteAheadLog
from walstore.wal.writer import GroupCommitWriter, PendingAppend

log = logging.getLogger("walstore.replication")


class ReplicaLog:
    def __init__(self, wal: WriteAheadLog, writer: GroupCommitWriter) -> None:
        self.wal = wal
        self.writer = writer
        self.promised_epoch = max(wal.promised_epoch, wal.last_epoch)
        # Created by the first waiter and set by the next change: every client append moves
        # the tail, and almost never is anyone waiting, so no Event per submit.
        self._tail_moved: trio.Event | None = None
        self._meta_lock = trio.Lock()

    # -- promises ----------------------------------------------------------------------

    async def promise(self, epoch: int) -> None:
        """Promise ``epoch`` durably (fsync'd meta) before answering PROMISE or accepting
        APPENDs of a new epoch. The in-memory value moves first, so from this moment
        every frame of a lower epoch is refused even while the file is being written."""
        if epoch <= self.promised_epoch:
            return
        self.promised_epoch = epoch
        async with self._meta_lock:
            await trio.to_thread.run_sync(self.wal.set_promised_epoch, self.promised_epoch)

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
    def durable_index(self) -> int:
        return self.writer.durable_index

    def read_raw(self, first: int, max_bytes: int) -> bytes:
        if first > self.wal.last_index:
            return b""
        return self.wal.read_raw(first, max_bytes)

    # -- writing -----------------------------------------------------------------------

    def submit(self, entries: list[tuple[int, int, bytes]], epoch: int) -> PendingAppend:
        pending = self.writer.submit(entries, epoch)
        self._tail_changed()
        return pending

    def submit_raw(self, data: bytes, last_index: int, last_epoch: int) -> PendingAppend:
        pending = self.writer.submit_raw(data)
        if pending.last_index != last_index or pending.last_epoch != last_epoch:
            raise LogStateError(f"raw append ended at {pending.last_index}, expected {last_index}")
        self._tail_changed()
        return pending

    async def drain(self) -> None:
        """Wait until everything submitted is durable (or raise the writer's error)."""
        await self.writer.wait_durable(self.tail_index)

    async def truncate_after(self, index: int, commit_index: int) -> None:
        if index < commit_index:
            # Committed entries are on a majority and every later leader has them: a
            # request to cut them means a bug or a hostile peer, never a real conflict.
            raise LogStateError(f"refusing to truncate after {index}: entries up to {commit_index} are committed")
        await self.drain()
        log.warning("truncating the log after index %d (was %d)", index, self.tail_index)
        await self.writer.truncate_suffix(index)
        self._tail_changed()

    def rolled_back(self) -> None:
        """The writer dropped failed batches (disk full) and moved its tail back."""
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
