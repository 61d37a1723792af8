"""Group commit: the one place the write-ahead log meets trio.

Callers ``submit`` batches synchronously: the entries are checked and their indexes
assigned at once, then the batch waits in a queue. One writer thread (``run`` owns it)
takes *every* queued batch, encodes them (one native call for a run of batches of one
epoch; the C part drops the GIL, so the event loop keeps going) and hands them to
``WriteAheadLog.append``: one pwritev and one fdatasync for all of them. While that runs,
new batches queue up for the next round, so the cost of an fsync is shared by everyone who
arrived during the last one. Outcomes go back to the event loop with ``run_sync_soon``.

Why a thread of our own rather than ``trio.to_thread.run_sync`` per round: ``submit``
wakes this thread directly (a plain lock), and the next round starts as soon as the event
loop has handled the last round's outcome (one ``run_sync_soon`` callback), not after a
task switch and a to_thread start. Not sooner: a round started the moment the fsync
returns is smaller, and the per-round costs outweigh the earlier start; waiting for the
loop also keeps a DiskFullError's rollback ahead of any later write. The measurements
behind these choices are in docs/performance-notes.md.

A leader ships ``pending.data`` to its followers while its own fsync runs: that encodes
the batch alone on first use (same bytes, as index and epoch are fixed at submit), and the
round then writes those bytes rather than encoding the batch again (whichever the thread
sees: both are the same bytes).

Failures:

- FsyncError: every waiter of that round and of every later batch gets it, nothing is
  reported durable, ``on_failure`` runs (the node answers what is in flight), and ``run``
  re-raises it: the node must stop (never retry a failed fsync). Later ``submit`` calls
  raise it at once.
- DiskFullError: that round's waiters get it, and so do batches queued behind it (their
  indexes followed the failed ones). The reserved tail goes back to the log's, so the next
  submit reuses the same indexes; later rounds may succeed once space returns. A leader
  that already shipped the failed records must not reuse those indexes in the same epoch
  (its followers may hold them): it should step down. ``disk_full`` stays true (and the
  ``walstore_disk_full`` gauge 1) until a round succeeds; the first failure is logged, then
  one line per LOG_EVERY_S at most.
- A round slower than ``slow_round_s`` is counted and logged the same rate-limited way;
  ``round_in_flight_s()`` shows one that has not returned yet.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from walstore import _native
from walstore.errors import DiskFullError, FsyncError, LogStateError, NativeError, StorageError, Truncated
from walstore.wal.log import WriteAheadLog
from walstore.wal.record import (
    FLAG_BATCH_END,
    KIND_EPOCH_START,
    KIND_EVENT,
    KIND_NOOP,
    KIND_TRACKING,
    RECORD_HEADER_BYTES,
    CheckedRecords,
)

if TYPE_CHECKING:
    from walstore.metrics import Metrics

logger = logging.getLogger("walstore.wal.writer")

# One round writes at most this much (plus one batch): bounds the bytes a thread holds and
# the latency the first waiter of a huge round sees.
MAX_ROUND_BYTES = 16 * 1024 * 1024
# A round (write + fdatasync) slower than this is logged and counted: NVMe takes ~1 ms and
# a network disk ~20 ms, so a second is a disk in trouble, not a busy one.
SLOW_ROUND_S = 1.0
# A disk that stays full (or slow) fails every round, one per leader frame: log the first,
# then at most one line this often, with the count of what it left out.
LOG_EVERY_S = 10.0

_U64 = 1 << 64
KIND_MAX = max(KIND_EVENT, KIND_EPOCH_START, KIND_NOOP, KIND_TRACKING)
assert {KIND_EVENT, KIND_EPOCH_START, KIND_NOOP, KIND_TRACKING} == set(range(1, KIND_MAX + 1))


class PendingAppend:
    """One submitted batch: its indexes now, its bytes when first asked for, its
    durability later.

    ``submit`` only validates and numbers the entries; the writer encodes a whole round in
    one native call. ``data`` (what a leader ships) encodes this batch alone on first use
    and keeps it: the same bytes the round writes, since indexes and epoch are fixed here.
    """

    # Slots and the parked task itself instead of a trio.Event (an Event, its ParkingLot and
    # that lot's dict per append): this object is made once per append.
    # The usual single waiter is kept in _waiter; _more holds any others (a leader's
    # durability watcher waits on the same batch as the client that submitted it).
    __slots__ = (
        "_checked",
        "_data",
        "_entries",
        "_log",
        "_more",
        "_state",
        "_waiter",
        "first_index",
        "last_epoch",
        "last_index",
        "nbytes",
    )

    def __init__(
        self,
        first_index: int,
        last_index: int,
        last_epoch: int,
        data: bytes | None = None,
        entries: Sequence[tuple[int, int, bytes]] = (),
        log: WriteAheadLog | None = None,
        nbytes: int = 0,
        checked: CheckedRecords | None = None,
    ) -> None:
        """Either ``data`` (already encoded), ``entries`` checked by ``log.encoded_size``
        (which gave ``nbytes``) to be encoded later, or ``checked`` records (validated where
        they came in, written without another scan). submit passes them positionally (hot path)."""
        self.first_index = first_index
        self.last_index = last_index
        self.last_epoch = last_epoch
        self.nbytes = len(data) if data is not None else nbytes
        self._data = data
        self._entries = entries
        self._log = log
        self._checked = checked
        # _RUNNING until finished, then None (durable) or the StorageError that stopped it.
        self._state: StorageError | object | None = _RUNNING
        self._waiter: trio.lowlevel.Task | None = None
        self._more: list[trio.lowlevel.Task] | None = None

    @property
    def data(self) -> bytes:
        """The encoded records (WAL bytes, as shipped to followers)."""
        data = self._data
        if data is None:
            if self._log is None:
                raise LogStateError("PendingAppend without data or a log to encode it")
            data = self._data = self._log.encode(self._entries, self.last_epoch, self.first_index)
        return data

    @property
    def done(self) -> bool:
        return self._state is not _RUNNING

    @property
    def failed(self) -> bool:
        """Done, and not durable: rolled back, truncated or failed with its round."""
        return isinstance(self._state, StorageError)

    @property
    def error(self) -> StorageError | None:
        """Why it failed, once it has (what ``wait_durable`` raises); else None."""
        state = self._state
        return state if isinstance(state, StorageError) else None

    async def wait_durable(self) -> None:
        """Return once the batch is fdatasync'd; raise the StorageError that stopped it."""
        if self._state is _RUNNING:
            task = _current_task()
            if self._waiter is None:
                self._waiter = task
                await _wait_task_rescheduled(self._abort_first)
            else:
                more = self._more
                if more is None:
                    more = self._more = []
                more.append(task)

                def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
                    more.remove(task)
                    return _ABORTED

                await _wait_task_rescheduled(abort)
        else:
            await _checkpoint()
        state = self._state
        if state is not None:
            assert isinstance(state, StorageError)
            raise state

    def _abort_first(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._waiter = None
        return _ABORTED

    def _finish(self, error: StorageError | None) -> None:
        """Record the outcome and wake every waiter."""
        if self._state is not _RUNNING:
            return
        self._state = error
        if self._waiter is not None:
            _reschedule(self._waiter)
            self._waiter = None
        if self._more is not None:
            for task in self._more:
                _reschedule(task)
            self._more = None


# PendingAppend._state while the batch is neither durable nor failed.
_RUNNING = object()

# Bound once: these run once or twice per append, and trio.lowlevel.X is two lookups each.
_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule
_checkpoint = trio.lowlevel.checkpoint
_ABORTED = trio.lowlevel.Abort.SUCCEEDED


class _Stop:
    """The job loop's answer when the writer is asked to stop."""


_STOP = _Stop()


@dataclass(eq=False)
class _Truncate:
    after_index: int
    done: trio.Event = field(default_factory=trio.Event)
    error: StorageError | None = None


class GroupCommitWriter:
    """``metrics`` receives the wal_* numbers; ``on_rollback(first_failed_index)`` runs in
    the event loop right after a DiskFullError rolled the reserved tail back, before any new
    submit; ``on_failure(error)`` runs in the event loop once, when a fatal error (a failed
    fdatasync) has stopped the writer and every waiter has its answer, before ``run``
    raises it. ``run`` owns the writer thread: start it in a nursery.

    ``disk_full``, ``round_in_flight_s()`` and ``last_round_s`` tell health checks what the
    disk does now; ``slow_round_s`` is the round duration that counts (and logs) as slow."""

    def __init__(
        self,
        log: WriteAheadLog,
        *,
        metrics: Metrics | None = None,
        on_rollback: Callable[[int], None] | None = None,
        on_failure: Callable[[StorageError], None] | None = None,
        max_round_bytes: int = MAX_ROUND_BYTES,
        slow_round_s: float = SLOW_ROUND_S,
        clock: Callable[[], float] = time.monotonic,
        inline: bool = False,
        round_delay_s: Callable[[], float] | None = None,
    ) -> None:
        self._log = log
        # Health times; read by the writer thread too, so time.monotonic unless inline.
        self._clock = clock
        # The simulator's mode (walstore.runtime): rounds run as a task of the event loop,
        # the same job loop without the thread, so a seed decides every interleaving.
        self._inline = inline
        self._inline_wake: trio.Event | None = None
        self._round_delay_s = round_delay_s  # inline only: the simulated disk's latency per job
        self._max_round_bytes = max_round_bytes
        self._max_body = log.options.max_record_body_bytes
        self._metrics = metrics
        self._on_rollback = on_rollback
        self._on_failure = on_failure
        self.slow_round_s = slow_round_s
        # Shared with the writer thread, under _lock: the queue and the thread's flags.
        self._lock = threading.Lock()
        # The thread sleeps on _wake, a plain lock held while nobody wakes it (a C-level
        # release; threading.Condition.notify is Python code, ~5 % of a follower's GIL time).
        self._wake = threading.Lock()
        self._wake.acquire()
        self._queue: list[PendingAppend | _Truncate] = []
        self._sleeping = False  # the thread waits on _wake (or is about to): release it once
        self._unseen = False  # an outcome the loop has not handled yet: no new job until it has
        self._stopping = False
        # Event-loop side only.
        self._submitted_index = log.last_index
        self._submitted_epoch = log.last_epoch
        self._durable_index = log.last_index
        self._durable_changed = trio.Event()
        self._failure: StorageError | None = None
        self._crash: BaseException | None = None  # what stopped the thread, if not a StorageError
        self._running = False
        # Counters for metrics, tests and the benchmark: rounds (one append + fsync each),
        # batches, and the seconds rounds spent in the writer thread.
        self.rounds = 0
        self.round_seconds = 0.0
        self.batches = 0
        # Health (event-loop side, but for _round_started_at, which the thread sets before a
        # round and the loop clears after it: a float store, atomic under the GIL). Times
        # are time.monotonic(), comparable across the thread and the loop.
        self._round_started_at: float | None = None
        self.last_round_s = 0.0  # duration of the last round that finished, good or failed
        self.last_round_ended_at = 0.0
        self.last_ok_round_at = 0.0  # when a round last succeeded (the disk took it)
        self._disk_full_since: float | None = None
        self._disk_full_rounds = 0  # rounds failed for space since the disk filled up
        self._slow_rounds_unlogged = 0
        self._last_slow_log = -math.inf
        self._last_full_log = -math.inf
        if metrics is not None:
            metrics.wal_round_in_flight_seconds.set_function(self.round_in_flight_s)
            metrics.wal_logical_bytes.set(log.data_bytes)  # what recovery found, before any round

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

    @property
    def disk_full(self) -> bool:
        """The last round failed for space and none has succeeded since: nothing this log
        is asked to write now will be written."""
        return self._disk_full_since is not None

    def round_in_flight_s(self, now: float | None = None) -> float:
        """How long the round being written and synced has been at it (0: none is)."""
        started = self._round_started_at
        if started is None:
            return 0.0
        return max(0.0, (self._clock() if now is None else now) - started)

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, entries: Sequence[tuple[int, int, bytes]], epoch: int) -> PendingAppend:
        """Reserve the next indexes for (kind, 0, body) entries, check them, and queue
        them as one atomic batch, encoded with the rest of its round or on first use of
        ``data``. The writer is the one place a batch is framed: the encoder gives its last
        record BATCH_END, so callers pass no flags. Synchronous: the indexes are known on
        return, and bad entries raise LogStateError here with nothing queued."""
        if self._failure is not None:
            raise self._failure
        if epoch < self._submitted_epoch:
            raise LogStateError(f"submit: epoch {epoch} is below the log's epoch {self._submitted_epoch}")
        first = self._submitted_index + 1
        nbytes = 0
        if len(entries) == 1 and 0 < epoch < _U64 and first < _U64:
            # encoded_size's checks for one entry, inline: a call of it is a noticeable share
            # of an append's cost (docs/performance-notes.md). Anything unusual falls through to
            # it for the checks and their error messages.
            kind, flags, body = entries[0]
            n = len(body)
            if n <= self._max_body and 1 <= kind <= KIND_MAX and not flags:
                nbytes = RECORD_HEADER_BYTES + ((n + 7) & ~7)
        if not nbytes:
            if any(flags for _, flags, _ in entries):
                # Framing is the writer's alone (its encoders mark the last record): a flag
                # from a caller, BATCH_END mid-batch above all, would split the atomic batch
                # at recovery.
                raise LogStateError("submit: entries carry no flags; the writer marks the batch's end")
            try:
                nbytes = self._log.encoded_size(entries, epoch, first)
            except LogStateError as e:
                raise LogStateError(f"submit: {e}") from None
        # A tuple: the caller's list may change after we return, and what was checked here
        # is what the round encodes (the bodies are bytes, immutable).
        return self._enqueue(
            PendingAppend(first, first + len(entries) - 1, epoch, None, tuple(entries), self._log, nbytes)
        )

    def submit_raw(self, records: CheckedRecords) -> PendingAppend:
        """Queue records encoded and checked elsewhere (a follower's copy of the leader's
        bytes, validated once by ``check_records`` where they arrived). That they continue
        the submitted tail is the caller's invariant, asserted here: nothing is queued
        otherwise."""
        self._check_alive()
        first = self._submitted_index + 1
        if records.first_index != first or records.first_epoch < self._submitted_epoch:
            raise LogStateError(
                f"submit_raw: records {records.first_index}.. of epoch {records.first_epoch} do not continue "
                f"the submitted tail {self._submitted_index} (epoch {self._submitted_epoch})"
            )
        data = records.data
        return self._enqueue(
            PendingAppend(first, records.last_index, records.last_epoch, data, (), None, len(data), records)
        )

    def _enqueue(self, pending: PendingAppend) -> PendingAppend:
        self._submitted_index = pending.last_index
        self._submitted_epoch = pending.last_epoch
        self.batches += 1
        with self._lock:
            self._queue.append(pending)
            if self._sleeping and not self._unseen:
                self._wake_thread()
        return pending

    async def truncate_suffix(self, after_index: int) -> None:
        """Drop every record > after_index, in order with the writes: batches queued before
        this call that reach past after_index fail with Truncated (never written)."""
        self._check_alive()
        if after_index < self._log.first_index - 1:
            raise LogStateError(f"truncate_suffix({after_index}): the log starts at {self._log.first_index}")
        if after_index >= self._submitted_index:
            return
        request = _Truncate(after_index)
        with self._lock:
            kept = [i for i in self._queue if not (isinstance(i, PendingAppend) and i.last_index > after_index)]
            dropped = [i for i in self._queue if isinstance(i, PendingAppend) and i.last_index > after_index]
            self._queue[:] = [*kept, request]
            if self._sleeping and not self._unseen:
                self._wake_thread()
        for item in dropped:
            item._finish(Truncated(f"records {item.first_index}..{item.last_index} were truncated"))
        self._submitted_index = after_index
        survivors = [p for p in kept if isinstance(p, PendingAppend)]
        if survivors:
            self._submitted_epoch = survivors[-1].last_epoch
        elif after_index <= self._log.last_index:
            self._submitted_epoch = self._log.epoch_at(after_index)
        await request.done.wait()
        if request.error is not None:
            raise request.error

    async def wait_durable(self, index: int) -> None:
        """Return once every index <= index is durable; raise the writer's failure."""
        while self._durable_index < index:
            if self._failure is not None:
                raise self._failure
            if index > self._submitted_index:
                # A truncation or a rollback moved the tail back under the waiter.
                raise Truncated(f"wait_durable({index}): only {self._submitted_index} submitted")
            await self._durable_changed.wait()

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise self._failure

    # -- the writer thread ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread until cancelled; raises FsyncError (fatal) or whatever
        else stopped the thread. On cancellation the round being written finishes and is
        accounted for (its fsync may already have made it durable); queued batches fail."""
        if self._running:
            raise LogStateError("GroupCommitWriter.run is already running")
        self._running = True
        if self._inline:
            try:
                await self._run_inline(task_status)
            finally:
                self._running = False
            return
        ended = trio.Event()
        with self._lock:
            self._stopping = False
            self._unseen = False
        thread = threading.Thread(
            target=self._thread_main,
            args=(trio.lowlevel.current_trio_token().run_sync_soon, ended.set),
            name="walstore-wal-writer",
            daemon=True,
        )
        thread.start()
        try:
            task_status.started()
            await ended.wait()
            # The thread stopped on its own: only a fatal error does that.
            if self._crash is not None:
                raise self._crash
            raise self._failure if self._failure is not None else StorageError("the write-ahead log writer stopped")
        except BaseException as e:
            with self._lock:
                self._stopping = True
                self._wake_thread()
            with trio.CancelScope(shield=True):
                await ended.wait()
            self._fail_all(e if isinstance(e, StorageError) else StorageError("the write-ahead log writer stopped"))
            raise
        finally:
            self._running = False

    def _wake_thread(self) -> None:
        """(Under _lock.) Release the sleeping thread, once per sleep."""
        if self._sleeping:
            self._sleeping = False
            if self._inline_wake is not None:
                self._inline_wake.set()
            else:
                self._wake.release()

    async def _run_inline(self, task_status: trio.TaskStatus[None]) -> None:
        """The writer as a task: the thread's job loop, with each outcome handled at once
        (``post`` calls straight through) and a sleep on a trio Event instead of the lock.
        Cancellation between jobs fails the queued batches, as ``run`` does; a job is never
        cut in half, because it does not await."""
        with self._lock:
            self._stopping = False
            self._unseen = False

        def post(fn: Callable[..., object], *args: object) -> None:
            fn(*args)

        try:
            task_status.started()
            while True:
                job = self._next_job()
                if isinstance(job, _Stop):
                    break
                if job is None:
                    # _next_job set _sleeping and nothing ran since: the next wake sets this.
                    wake = self._inline_wake = trio.Event()
                    await wake.wait()
                    continue
                started = self._clock()
                self._round_started_at = started
                try:
                    # The disk's latency in virtual time; other tasks run meanwhile, as they
                    # do while the thread writes.
                    await trio.sleep(self._round_delay_s() if self._round_delay_s is not None else 0.0)
                except BaseException:
                    # Stopped before the write began (a simulated crash): nothing of it reached
                    # the disk, and its waiters get the writer's failure below.
                    if isinstance(job, list):
                        self._fail_job(job, StorageError("the write-ahead log writer stopped"))
                    raise
                if not self._do_job(job, post, started):
                    break
            if self._crash is not None:
                raise self._crash
            raise self._failure if self._failure is not None else StorageError("the write-ahead log writer stopped")
        except BaseException as e:
            self._fail_all(e if isinstance(e, StorageError) else StorageError("the write-ahead log writer stopped"))
            raise

    def _thread_main(self, post: Callable[..., object], ended: Callable[[], None]) -> None:
        """The writer thread: take the whole queue as one round (or one truncation), write
        and fdatasync it, hand the outcome to the event loop. The next job waits until the
        loop has handled that outcome (``_seen``): what queues meanwhile makes the next round
        bigger, and a DiskFullError's rollback runs before anything else is written. Stops
        when asked (after the job in hand) or after a fatal error."""
        try:
            self._thread_loop(post)
        except BaseException as e:  # a bug outside a job: still a fatal outcome, not a silent stop
            post(self._thread_crashed, e)
        finally:
            # The loop outlives this thread: run() waits for this before it returns.
            post(ended)

    def _thread_loop(self, post: Callable[..., object]) -> None:
        while True:
            job = self._next_job()
            if isinstance(job, _Stop):
                return
            if job is None:
                self._wake.acquire()
                continue
            if not self._do_job(job, post):
                return

    def _next_job(self) -> list[PendingAppend] | _Truncate | _Stop | None:
        """The next round or truncation to run; None: nothing yet (``_sleeping`` is set, so
        the next submit or ``_seen`` wakes the loop); _STOP when asked to stop."""
        with self._lock:
            if self._stopping:
                return _STOP
            if self._queue and not self._unseen:
                head = self._queue[0]
                job: list[PendingAppend] | _Truncate
                if isinstance(head, _Truncate):
                    del self._queue[0]
                    job = head
                else:
                    job = self._take_round()
                self._unseen = True
                return job
            self._sleeping = True
            return None

    def _do_job(
        self, job: list[PendingAppend] | _Truncate, post: Callable[..., object], started: float | None = None
    ) -> bool:
        """Run one job and post its outcome; False when the loop must stop (fatal).
        ``started``: the clock when the round began (inline, before its simulated latency)."""
        if isinstance(job, _Truncate):
            try:
                self._log.truncate_suffix(job.after_index)
            except BaseException as e:
                post(self._truncate_done, job, e)
                return False
            post(self._truncate_done, job, None)
            return True
        clock = self._clock
        if started is None:
            started = clock()
            self._round_started_at = started
        try:
            nbytes = self._write_round(job)
        except DiskFullError as e:
            post(self._round_done, job, 0, clock() - started, e)  # the loop rolls the tail back
            return True
        except BaseException as e:
            post(self._round_done, job, 0, clock() - started, e)
            return False
        post(self._round_done, job, nbytes, clock() - started, None)
        return True

    def _take_round(self) -> list[PendingAppend]:
        """(Under _lock.) The queued appends up to the first truncation, at most
        max_round_bytes (or one)."""
        size = 0
        n = 0
        for item in self._queue:
            if not isinstance(item, PendingAppend) or (n and size + item.nbytes > self._max_round_bytes):
                break
            size += item.nbytes
            n += 1
        batch = [p for p in self._queue[:n] if isinstance(p, PendingAppend)]
        del self._queue[:n]
        return batch

    def _write_round(self, job: list[PendingAppend]) -> int:
        """Writer thread: write and fdatasync the round; return its size. A round of checked
        records only (a follower's) goes to the log as it is; any other is encoded (and
        scanned by the log's ``append``)."""
        checked = [p._checked for p in job]
        if all(c is not None for c in checked):
            records = _joined([c for c in checked if c is not None])
            self._log.append_checked(records)
            return len(records.data)
        return self._encode_and_append(_round_parts(job))

    def _encode_and_append(self, parts: list[bytes | _Run]) -> int:
        """Encode the round's runs (the C part drops the GIL, so the event loop keeps
        going), write and fdatasync it all at once; return its size."""
        try:
            chunks = [_native.encode_records(*p) if isinstance(p, tuple) else p for p in parts]
        except (NativeError, ValueError, OverflowError) as e:
            # submit checked every entry: reaching this is a bug, not bad input.
            raise LogStateError(f"cannot encode a round: {e}") from None
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._log.append(data)
        return len(data)

    # -- outcomes, in the event loop ------------------------------------------------------------

    def _seen(self) -> None:
        """The last outcome is handled: the thread may take the next job."""
        with self._lock:
            self._unseen = False
            if self._queue:
                self._wake_thread()

    def _round_done(self, batch: list[PendingAppend], nbytes: int, elapsed: float, error: BaseException | None) -> None:
        self._round_started_at = None
        self.last_round_s = elapsed
        self.last_round_ended_at = self._clock()
        if elapsed > self.slow_round_s:
            self._slow_round(elapsed, batch)
        if error is None:
            self.last_ok_round_at = self.last_round_ended_at
            if self._disk_full_since is not None:
                self._disk_full_cleared()
            self.rounds += 1
            self.round_seconds += elapsed
            self._durable_index = batch[-1].last_index
            for p in batch:
                p._finish(None)
            if self._metrics is not None:
                entries = batch[-1].last_index - batch[0].first_index + 1
                self._metrics.wal_fsync_seconds.observe(elapsed)
                self._metrics.wal_fsync_batch_events.observe(entries)
                self._metrics.wal_entries_written_total.inc(entries)
                self._metrics.wal_bytes_written_total.inc(nbytes)
                self._metrics.wal_logical_bytes.set(self._log.data_bytes)
            self._notify_durable()
            self._seen()
            return
        failure = (
            error if isinstance(error, StorageError) else StorageError(f"the write-ahead log writer failed: {error!r}")
        )
        for p in batch:
            p._finish(failure)
        if self._metrics is not None:
            kind = "other"
            if isinstance(error, DiskFullError):
                kind = "disk_full"
            elif isinstance(error, FsyncError):
                kind = "fsync"
            self._metrics.wal_write_errors_total.labels(kind=kind).inc()
        if not isinstance(error, DiskFullError):
            # FsyncError (never retry a failed fsync), LogStateError (a bug above us: the log
            # rejected our own numbering) or a crash: fatal. The thread has stopped.
            self._stop_for(error, failure)
            return
        self._disk_is_full(error, batch)
        # Queued batches were numbered after the failed ones: they cannot be written.
        self._fail_queued(error)
        self._submitted_index = self._log.last_index  # the thread waits for _seen: no write races this
        self._submitted_epoch = self._log.last_epoch
        if self._on_rollback is not None:
            self._on_rollback(batch[0].first_index)
        # Wake wait_durable() callers: what they wait for may no longer be submitted.
        self._notify_durable()
        self._seen()

    def _disk_is_full(self, error: DiskFullError, batch: list[PendingAppend]) -> None:
        """A round failed for space: say so once, then once per LOG_EVERY_S. A follower
        whose disk is full fails a round per leader frame and used to say nothing at all."""
        now = self._clock()
        self._disk_full_rounds += 1
        if self._disk_full_since is None:
            self._disk_full_since = now
            if self._metrics is not None:
                self._metrics.wal_disk_full.set(1)
        elif now - self._last_full_log < LOG_EVERY_S:
            return
        self._last_full_log = now
        logger.error(
            "disk full: records %d..%d not written (%d failed round(s) in %.1fs): %s",
            batch[0].first_index,
            batch[-1].last_index,
            self._disk_full_rounds,
            now - self._disk_full_since,
            error,
        )

    def _disk_full_cleared(self) -> None:
        assert self._disk_full_since is not None
        logger.warning(
            "disk has space again: a round succeeded after %d failed for space over %.1fs",
            self._disk_full_rounds,
            self._clock() - self._disk_full_since,
        )
        self._disk_full_since = None
        self._disk_full_rounds = 0
        self._last_full_log = -math.inf
        if self._metrics is not None:
            self._metrics.wal_disk_full.set(0)

    def _slow_round(self, elapsed: float, batch: list[PendingAppend]) -> None:
        if self._metrics is not None:
            self._metrics.wal_slow_rounds_total.inc()
        self._slow_rounds_unlogged += 1
        now = self._clock()
        if now - self._last_slow_log < LOG_EVERY_S:
            return
        self._last_slow_log = now
        logger.warning(
            "slow disk: a write + fdatasync of records %d..%d took %.2fs (threshold %.2fs; %d slow round(s) "
            "since the last such line)",
            batch[0].first_index,
            batch[-1].last_index,
            elapsed,
            self.slow_round_s,
            self._slow_rounds_unlogged,
        )
        self._slow_rounds_unlogged = 0

    def _truncate_done(self, request: _Truncate, error: BaseException | None) -> None:
        if error is None:
            self._durable_index = min(self._durable_index, request.after_index)
            request.done.set()
            self._notify_durable()
            self._seen()
            return
        failure = error if isinstance(error, StorageError) else StorageError(f"truncation failed: {error!r}")
        request.error = failure
        request.done.set()
        self._stop_for(error, failure)

    def _thread_crashed(self, error: BaseException) -> None:
        self._stop_for(error, StorageError(f"the write-ahead log writer failed: {error!r}"))

    def stop_for_fault(self, failure: StorageError) -> None:
        """A fatal fault of this log found outside the writer (rot found by a read, a
        failed fdatasync of meta.json): the writer stops as on its own failed fdatasync.
        Later submits raise ``failure``, queued batches fail with it, ``on_failure`` hears
        of it (once, whichever fault came first) and ``run`` re-raises it, so the node stops
        through its one storage-failed path. Event loop only."""
        self._stop_for(failure, failure)
        with self._lock:
            self._stopping = True
            self._wake_thread()

    def _stop_for(self, error: BaseException, failure: StorageError) -> None:
        """A fatal outcome: later submits raise it and run() re-raises it."""
        if not isinstance(error, StorageError):
            self._crash = error
        first = self._failure is None
        self._fail_all(failure)
        if first and self._on_failure is not None:
            self._on_failure(self._failure if self._failure is not None else failure)

    def _notify_durable(self) -> None:
        self._durable_changed.set()
        self._durable_changed = trio.Event()

    def _fail_queued(self, error: StorageError) -> None:
        with self._lock:
            queued, self._queue[:] = list(self._queue), []
        for item in queued:
            if isinstance(item, PendingAppend):
                item._finish(error)
            else:
                item.error = error
                item.done.set()

    @staticmethod
    def _fail_job(job: list[PendingAppend], error: StorageError) -> None:
        for pending in job:
            if not pending.done:
                pending._finish(error)

    def _fail_all(self, error: StorageError) -> None:
        if self._failure is None:
            self._failure = error
        self._fail_queued(error)
        self._notify_durable()


# One native encode call: (bodies, kinds, flags, epoch, first_index) of consecutive records.
_Run = tuple[list[bytes], bytearray, bytearray, int, int]


def encode_pending(batches: Sequence[PendingAppend]) -> bytes:
    """The records of consecutive batches as one byte string (what a leader ships).

    Batches not encoded yet are encoded a stretch at a time (consecutive, one epoch: one
    native call) and keep their bytes, so the round that writes them does not encode them
    again. Reading ``data`` batch by batch instead costs a native call (~6 us) per batch,
    and a leader under load ships frames of tens of single-event batches."""
    i, n = 0, len(batches)
    while i < n:
        first = batches[i]
        j = i + 1
        if first._data is None:
            while (
                j < n
                and batches[j]._data is None
                and batches[j].last_epoch == first.last_epoch
                and batches[j].first_index == batches[j - 1].last_index + 1
            ):
                j += 1
        if j - i > 1:
            stretch = batches[i:j]
            (run,) = _round_parts(stretch)
            assert not isinstance(run, bytes)
            try:
                encoded = _native.encode_records(*run)
            except (NativeError, ValueError, OverflowError) as e:
                raise LogStateError(f"cannot encode batches from index {first.first_index}: {e}") from None
            view = memoryview(encoded)
            pos = 0
            for p in stretch:
                p._data = bytes(view[pos : pos + p.nbytes])
                pos += p.nbytes
        i = j
    return batches[0].data if n == 1 else b"".join(p.data for p in batches)


def _joined(parts: Sequence[CheckedRecords]) -> CheckedRecords:
    """Consecutive checked batches as one (a follower's round): their bytes joined, their
    offsets shifted, nothing scanned."""
    if len(parts) == 1:
        return parts[0]
    offsets = array("Q")
    base = 0
    for before, part in zip((None, *parts), parts, strict=False):
        if before is not None and part.first_index != before.last_index + 1:
            raise LogStateError(f"a round's records jump from {before.last_index} to {part.first_index}")
        if base:
            offsets.extend([o + base for o in part.offsets])
        else:
            offsets.extend(part.offsets)
        base += len(part.data)
    first, last = parts[0], parts[-1]
    batch_end = next((p.batch_end_index for p in reversed(parts) if p.batch_end_index >= p.first_index), 0)
    return CheckedRecords(
        b"".join(p.data for p in parts),
        offsets,
        first.first_index,
        last.last_index,
        first.first_epoch,
        last.last_epoch,
        batch_end or first.first_index - 1,
    )


def _round_parts(batch: Sequence[PendingAppend]) -> list[bytes | _Run]:
    """The round as already-encoded bytes (raw appends, batches a leader encoded to ship)
    and runs of not-yet-encoded batches of one epoch, each run one native call. A round
    of single-event submits is one run: one ~60 us call instead of 256 x ~6 us."""
    parts: list[bytes | _Run] = []
    run: _Run | None = None
    for p in batch:
        data = p._data
        if data is not None:
            parts.append(data)
            run = None
            continue
        if run is None or run[3] != p.last_epoch:
            run = ([], bytearray(), bytearray(), p.last_epoch, p.first_index)
            parts.append(run)
        bodies, kinds, flags = run[0], run[1], run[2]
        for kind, flag, body in p._entries:
            bodies.append(body)
            kinds.append(kind)
            flags.append(flag)
        flags[-1] |= FLAG_BATCH_END
    return parts
