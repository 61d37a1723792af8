"""The write-ahead log: a directory of segments holding one gap-free sequence of records.

``WriteAheadLog`` is synchronous and knows nothing of trio; ``walstore.wal.writer`` drives
it from a worker thread. Appends take already-encoded records (``encode`` builds them, or
they arrive from a leader), are validated with the native scanner before a byte is
written, and reach the disk with one pwritev + one fdatasync per segment touched.

Durability rules this module keeps:

- A batch that spills into new segments has those segments created (pre-allocated,
  header synced, directory synced) *before* any of its bytes are written, so running out
  of space never leaves half a batch durable; segments are synced in log order.
- fdatasync failing poisons the log: every later call raises FsyncError. After a failed
  fsync the kernel may have dropped the dirty pages and a retry would lie (fsyncgate).
- A write failing for space (DiskFullError) rolls the in-memory tail back: the next append
  starts at the same index and offset, and covers the failed write's leftovers with zeros.
- Records leave the end of the log only through ``recovery.cut_log`` (crash-safe).

Memory: per record one u64 offset in an ``array('Q')`` per segment. Reads go through the
segment's shared mapping (or the simulated page cache) and return bytes.

Threads: one thread at a time may call the mutating methods (the group-commit writer's).
Reads of indexes <= ``last_index`` may run in another thread during an append: appends only
extend the arrays and publish ``last_index`` last. They must not overlap truncate_suffix.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from walstore import _native
from walstore._native import ScanStop
from walstore.errors import (
    CommittedTruncation,
    ConfigError,
    CorruptionError,
    FsyncError,
    LogStateError,
    NativeError,
    StorageError,
)
from walstore.wal.fs import FileSystem, RealFileSystem
from walstore.wal.meta import WalMeta, load_meta, new_incarnation, save_meta
from walstore.wal.record import (
    _HEADER,
    FLAG_BATCH_END,
    KIND_NAMES,
    MAX_RECORD_BODY_BYTES,
    RECORD_HEADER_BYTES,
    CheckedRecords,
    Record,
    decode_record,
    peek_header,
    record_size,
)
from walstore.wal.recovery import LogScan, cut_log, epoch_changes, epoch_history, repair, scan_log
from walstore.wal.segment import SEGMENT_HEADER_BYTES, SegmentState, create_segment, write_zeros

_ZEROS = memoryview(bytes(1 << 20))
# Reads of at least this many records verify them with one native scan per segment (~4.5 us
# a record, measured) instead of record by record (~9.5 us); the scan's fixed cost (~20 us)
# makes it slower below this.
_SCAN_READ_MIN_RECORDS = 8
_U64 = 1 << 64
_KINDS = frozenset(KIND_NAMES)


@dataclass(frozen=True, slots=True)
class WalOptions:
    # Fewer, larger files vs. the time to pre-allocate one on rotation (~ms on ext4/xfs).
    segment_size_bytes: int = 64 * 1024 * 1024
    # The format's own ceiling; the HTTP and peer layers bound events far below it.
    max_record_body_bytes: int = MAX_RECORD_BODY_BYTES

    def __post_init__(self) -> None:
        if not 1 <= self.max_record_body_bytes <= MAX_RECORD_BODY_BYTES:
            raise ConfigError(f"max_record_body_bytes: between 1 and {MAX_RECORD_BODY_BYTES}")
        smallest = SEGMENT_HEADER_BYTES + record_size(self.max_record_body_bytes)
        if not smallest <= self.segment_size_bytes <= 1 << 40 or self.segment_size_bytes % 8:
            raise ConfigError(f"segment_size_bytes: a multiple of 8 between {smallest} (one maximal record) and 1 TiB")


class WriteAheadLog:
    """Open with ``WriteAheadLog.open``; see the module docstring for the rules."""

    def __init__(
        self, directory: Path, options: WalOptions, fs: FileSystem, segments: list[SegmentState], meta: WalMeta
    ) -> None:
        self._directory = directory
        self._options = options
        self._fs = fs
        self._segments = segments
        self._meta = meta
        # True when this open created the directory and its identity (it was new).
        self.created = False
        self._poisoned: StorageError | None = None
        # meta.json is read-modify-written by truncation (writer thread) and promises.
        self._meta_lock = threading.Lock()
        self._closed = False
        # Set while truncate_suffix zeroes records in the writer thread, before it moves
        # _last_index back: a raw read on the event loop may meet those zeroes meanwhile.
        self._cutting = False
        self._history = epoch_history(segments)
        self._last_index = segments[-1].next_index - 1
        self._last_epoch = self._tail_epoch()
        self._batch_end_index = self._find_batch_end(self._last_index)

    @classmethod
    def open(cls, directory: Path, options: WalOptions | None = None, fs: FileSystem | None = None) -> WriteAheadLog:
        """Open (creating if new) the log in ``directory``: recover, repair a crash's
        leftovers, refuse corruption (CorruptionError naming file and offset)."""
        options = options if options is not None else WalOptions()
        fs = fs if fs is not None else RealFileSystem()
        directory = Path(directory)
        fs.mkdir(directory)
        scan = scan_log(fs, directory, max_body=options.max_record_body_bytes, writable=True)
        created = scan.meta is None
        try:
            if scan.meta is None:
                for path in scan.stray:
                    fs.unlink(path)
                meta = WalMeta(incarnation=new_incarnation())
                save_meta(fs, directory, meta)
            else:
                if not scan.meta.incarnation:
                    # A format-1 directory: intact, promises and all; it only lacks a name.
                    scan.meta = replace(scan.meta, incarnation=new_incarnation())
                    save_meta(fs, directory, scan.meta)
                _check_keeps_committed(directory, scan)
                meta = repair(fs, scan) if scan.needs_repair else scan.meta
            segments = scan.segments
            if not segments:
                segments.append(_new_segment_state(fs, directory, 1, options.segment_size_bytes, 0))
        except BaseException:
            scan.close()
            raise
        log = cls(directory, options, fs, segments, meta)
        log.created = created
        return log

    # -- state --------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def fs(self) -> FileSystem:
        return self._fs

    @property
    def options(self) -> WalOptions:
        return self._options

    @property
    def first_index(self) -> int:
        """Index of the first record (1 for a new log; the next index when empty)."""
        return self._segments[0].first_index

    @property
    def last_index(self) -> int:
        """Index of the last record written (0 for a new log)."""
        return self._last_index

    @property
    def last_epoch(self) -> int:
        """Epoch of the last record (0 when empty)."""
        return self._last_epoch

    @property
    def batch_end_index(self) -> int:
        """Index of the last record that closes a batch. Recovery keeps exactly the log up
        to here, so a follower must acknowledge no further than this."""
        return self._batch_end_index

    @property
    def epoch_history(self) -> list[tuple[int, int]]:
        """[(epoch, first index of that epoch in this log)], oldest first."""
        return list(self._history)

    @property
    def meta(self) -> WalMeta:
        """meta.json as this log last read or wrote it."""
        return self._meta

    @property
    def promised_epoch(self) -> int:
        return self._meta.promised_epoch

    @property
    def incarnation(self) -> str:
        """This data directory's identity (see ``walstore.wal.meta``)."""
        return self._meta.incarnation

    @property
    def known_commit(self) -> int:
        """The highest index this log has recorded as committed: never truncated."""
        return self._meta.commit_index

    @property
    def data_bytes(self) -> int:
        """Bytes of records held in the segments (headers and pre-allocated space excluded)."""
        return sum(s.end - SEGMENT_HEADER_BYTES for s in self._segments)

    @property
    def segment_paths(self) -> list[Path]:
        return [s.path for s in self._segments]

    @property
    def poisoned(self) -> bool:
        return self._poisoned is not None

    # -- writing ------------------------------------------------------------------------------

    def encode(self, entries: Sequence[tuple[int, int, bytes]], epoch: int, first_index: int) -> bytes:
        """Encode (kind, flags, body) entries as records first_index.. of epoch. One call is
        one atomic batch: the last record gets BATCH_END whatever its flags said."""
        if not entries:
            return b""
        limit = self._options.max_record_body_bytes
        bodies: list[bytes] = []
        kinds = bytearray()
        flags = bytearray()
        try:
            for kind, flag, body in entries:
                if len(body) > limit:
                    raise LogStateError(f"record body of {len(body)} bytes is over the limit {limit}")
                bodies.append(body)
                kinds.append(kind)
                flags.append(flag)
            flags[-1] |= FLAG_BATCH_END
            # encode_records directly, not encode_batch: a leader encodes every batch it
            # ships this way; skipping the list-to-bytes conversions measured 35k -> 33k
            # instructions for a one-event batch.
            return bytes(_native.encode_records(bodies, kinds, flags, epoch, first_index))
        except (NativeError, ValueError, OverflowError) as e:
            raise LogStateError(f"cannot encode {len(entries)} records at index {first_index}: {e}") from None

    def encoded_size(self, entries: Sequence[tuple[int, int, bytes]], epoch: int, first_index: int) -> int:
        """Check (kind, flags, body) entries as ``encode`` would (same LogStateError), without
        encoding them; return the bytes they will take. The group-commit writer checks at
        submit and encodes a whole round later, so a bad entry still fails its own submit."""
        if not entries:
            raise LogStateError("a batch needs at least one entry")
        if not (1 <= epoch < _U64 and first_index >= 1 and first_index + len(entries) <= _U64):
            raise LogStateError(f"cannot encode {len(entries)} records at index {first_index} of epoch {epoch}")
        limit = self._options.max_record_body_bytes
        size = 0
        for kind, flags, body in entries:
            n = len(body)
            if n > limit:
                raise LogStateError(f"record body of {n} bytes is over the limit {limit}")
            if kind not in _KINDS or flags & ~FLAG_BATCH_END:
                raise LogStateError(f"cannot encode a record of kind {kind} with flags {flags:#x}")
            size += RECORD_HEADER_BYTES + ((n + 7) & ~7)
        return size

    def append(self, data: bytes | bytearray | memoryview, *, sync: bool = True) -> int:
        """Append encoded records that start exactly at last_index + 1; return the new
        last_index. Raises LogStateError (nothing written) for bytes that are not the next
        valid records, DiskFullError (nothing durable, tail rolled back), FsyncError (fatal).
        The bytes are scanned here; records checked already go to ``append_checked``."""
        self._check_usable()
        mv = memoryview(data).cast("B")
        if not len(mv):
            if sync:
                self.sync()
            return self._last_index
        res = _native.scan(mv, 0, self._last_index + 1, self._options.max_record_body_bytes, min_epoch=self._last_epoch)
        if res.stop is not ScanStop.END_ZERO or res.end_offset != len(mv):
            why = "trailing zero bytes" if res.stop is ScanStop.END_ZERO else res.reason
            raise LogStateError(
                f"append: bytes at offset {res.end_offset} of {len(mv)} are not record {res.next_index} "
                f"(epoch >= {res.last_epoch}): {why}"
            )
        return self._append_valid(mv, res.offsets, res.next_index - 1, res.last_epoch, res.batch_end_index, sync)

    def append_checked(self, records: CheckedRecords, *, sync: bool = True) -> int:
        """``append`` for records ``check_records`` validated (a follower's copy of its
        leader's bytes): not scanned again. That they continue this log is an invariant of
        the caller (the writer numbers its queue from our tail), asserted here."""
        self._check_usable()
        if records.first_index != self._last_index + 1 or records.first_epoch < self._last_epoch:
            raise LogStateError(
                f"append_checked: records {records.first_index}.. of epoch {records.first_epoch} do not continue "
                f"the log at {self._last_index} (epoch {self._last_epoch})"
            )
        mv = memoryview(records.data).cast("B")
        return self._append_valid(
            mv, records.offsets, records.last_index, records.last_epoch, records.batch_end_index, sync
        )

    def _append_valid(
        self, mv: memoryview, offsets: array[int], last_index: int, last_epoch: int, batch_end_index: int, sync: bool
    ) -> int:
        first = self._last_index + 1
        try:
            plan, created = self._plan(mv, offsets)
        except FsyncError as e:  # creating a segment syncs too
            self._poison(e)
            raise
        self._write(mv, plan, created, sync)
        # Publish: arrays first, last_index last (concurrent readers check against it).
        for seg, a, b, lo, hi in plan:
            shift = seg.end - a
            seg.offsets.extend([o + shift for o in offsets[lo:hi]])
            seg.end += b - a
            seg.junk_end = 0
            seg.last_epoch = peek_header(mv, offsets[hi - 1]).epoch
        self._history += epoch_changes(mv, offsets, first, self._last_epoch)
        if batch_end_index >= first:
            self._batch_end_index = batch_end_index
        self._last_epoch = last_epoch
        self._last_index = last_index
        return self._last_index

    def _plan(
        self, mv: memoryview, offsets: Sequence[int]
    ) -> tuple[list[tuple[SegmentState, int, int, int, int]], list[SegmentState]]:
        """Split the records at segment boundaries: [(segment, data start, data end, first
        record, end record)], creating the new segments needed (before any write)."""
        plan: list[tuple[SegmentState, int, int, int, int]] = []
        created: list[SegmentState] = []
        n, total = len(offsets), len(mv)
        pos, rec = 0, 0
        seg = self._segments[-1]
        seg_end = seg.end  # where the next piece would go in seg, as planned so far
        try:
            while rec < n:
                limit = pos + seg.size - seg_end
                k = n if limit >= total else bisect.bisect_right(offsets, limit, lo=rec) - 1
                if k <= rec:
                    if seg_end == SEGMENT_HEADER_BYTES:
                        raise LogStateError(f"record {self._last_index + 1 + rec} does not fit in an empty segment")
                    seg = _new_segment_state(
                        self._fs,
                        self._directory,
                        self._last_index + 1 + rec,
                        self._options.segment_size_bytes,
                        seg.last_epoch,
                    )
                    seg_end = seg.end
                    created.append(seg)
                    self._segments.append(seg)
                    continue
                end = offsets[k] if k < n else total
                plan.append((seg, pos, end, rec, k))
                seg_end += end - pos
                pos, rec = end, k
        except BaseException:
            self._discard_segments(created)
            raise
        return plan, created

    def _write(
        self,
        mv: memoryview,
        plan: list[tuple[SegmentState, int, int, int, int]],
        created: list[SegmentState],
        sync: bool,
    ) -> None:
        dirty = [s for s in self._segments if s.dirty]
        # The common case, one segment and nothing else pending: a single native call.
        single = sync and len(plan) == 1 and all(s is plan[0][0] for s in dirty)
        written: list[tuple[SegmentState, int]] = []
        try:
            for seg, a, b, _, _ in plan:
                bufs = [mv[a:b]]
                pad = seg.junk_end - (seg.end + b - a)
                while pad > 0:
                    bufs.append(_ZEROS[: min(pad, len(_ZEROS))])
                    pad -= len(_ZEROS)
                written.append((seg, seg.end + b - a))
                seg.file.pwritev(bufs, seg.end, sync=single)
                seg.dirty = not single
                seg.junk_end = 0  # covered by this write's data and zeros
            if sync and not single:
                self._sync_dirty()
        except FsyncError as e:
            # Not durable, and after a failed fdatasync the kernel may keep those pages in
            # the page cache, clean and readable. The next process on this boot would read
            # the records as if they were on disk and append after them, and a later power
            # loss would leave a hole in the middle of its log, which then refuses to open.
            # Zero them in the page cache (no sync: nothing can be synced now). Found by the
            # simulator (docs/simulation.md).
            for seg, end in written:
                with contextlib.suppress(StorageError):
                    write_zeros(seg.file, seg.end, end, sync=False)
            self._poison(e)
            raise
        except StorageError:
            # Not durable and not acknowledged: forget it. Its bytes may lie past the end
            # (whole records of it, even whole batches): zero them now if the disk lets us,
            # else before the next write or sync, so no fsync can ever make them durable.
            for seg, end in written:
                seg.junk_end = max(seg.junk_end, end)
                with contextlib.suppress(StorageError):
                    self._zero_junk(seg)
            self._discard_segments(created)
            raise

    def _discard_segments(self, created: list[SegmentState]) -> None:
        """Remove segments created for an append that failed, so the tail is as before."""
        if not created:
            return
        try:
            for seg in reversed(created):
                self._segments.remove(seg)
                seg.file.close()
                self._fs.unlink(seg.path)
            self._fs.fsync_dir(self._directory)
        except StorageError as e:
            # Memory and disk now disagree about the segment list: stop rather than guess.
            self._poison(e)
            raise

    def sync(self) -> None:
        """fdatasync every segment written since its last sync, in log order."""
        self._check_usable()
        try:
            self._sync_dirty()
        except FsyncError as e:
            self._poison(e)
            raise

    def _sync_dirty(self) -> None:
        for seg in self._segments:
            self._zero_junk(seg)
        # In log order: a later segment is never more durable than an earlier one, which is
        # what lets recovery call a gap after a crash a leftover rather than corruption.
        for seg in self._segments:
            if seg.dirty:
                seg.file.fdatasync()
                seg.dirty = False

    def _zero_junk(self, seg: SegmentState) -> None:
        if seg.junk_end > seg.end:
            write_zeros(seg.file, seg.end, seg.junk_end, sync=False)
            seg.dirty = True
        seg.junk_end = 0

    def truncate_suffix(self, after_index: int) -> None:
        """Drop every record with index > after_index, durably (zeroed on disk, later
        segments deleted). A no-op when after_index >= last_index."""
        self._check_usable()
        if after_index < self.first_index - 1:
            raise LogStateError(f"truncate_suffix({after_index}): the log starts at {self.first_index}")
        if after_index >= self._last_index:
            return
        if after_index < self._meta.commit_index:
            # The last line of defence; ReplicaLog refuses first, with the in-memory commit.
            raise CommittedTruncation(after_index, self._meta.commit_index, "recorded in meta.json")
        self._cutting = True
        try:
            # Earlier segments first: cut_log syncs the last one, and it must not become
            # durable ahead of unsynced records before it.
            self._sync_dirty()
            self._meta = cut_log(self._fs, self._directory, self._segments, after_index, meta_lock=self._meta_lock)
        except StorageError as e:
            # cut_log stopped between steps; the marker in meta.json lets a restart finish it.
            self._poison(e)
            self._cutting = False
            raise
        self._last_index = after_index
        self._cutting = False
        self._last_epoch = self._tail_epoch()
        self._history = [p for p in self._history if p[1] <= after_index]
        self._batch_end_index = self._find_batch_end(after_index)

    def set_known_commit(self, index: int) -> None:
        """Record durably that entries up to ``index`` are committed (only ever raised;
        a lower value is ignored). Blocking I/O: call it from a worker thread. ``index``
        must be held by this log: a commit index we do not hold says nothing about our
        entries."""
        self._check_usable()
        if index > self._last_index:
            raise LogStateError(f"known commit {index} is beyond the log's last index {self._last_index}")
        with self._meta_lock:
            current = load_meta(self._fs, self._directory) or self._meta
            if index <= current.commit_index:
                self._meta = current
                return
            meta = replace(current, commit_index=index, epoch_history=tuple(self._history))
            try:
                save_meta(self._fs, self._directory, meta)
            except FsyncError as e:
                self._poison(e)
                raise
            self._meta = meta

    def set_promised_epoch(self, epoch: int) -> None:
        """Persist a takeover promise (and the current epoch history) before answering it.
        Blocking I/O (fsyncs): call it from a worker thread. Safe to call while the writer
        thread appends or truncates; use it rather than writing meta.json directly, which
        could erase an unfinished truncation's marker."""
        self._check_usable()
        with self._meta_lock:
            current = load_meta(self._fs, self._directory) or self._meta
            if epoch < current.promised_epoch:
                raise LogStateError(f"promised epoch cannot go back from {current.promised_epoch} to {epoch}")
            meta = replace(current, promised_epoch=epoch, epoch_history=tuple(self._history))
            if meta != current:
                try:
                    save_meta(self._fs, self._directory, meta)
                except FsyncError as e:
                    self._poison(e)
                    raise
            self._meta = meta

    # -- reading ------------------------------------------------------------------------------

    def _segment_of(self, index: int) -> SegmentState:
        i = bisect.bisect_right(self._segments, index, key=lambda s: s.first_index) - 1
        return self._segments[max(i, 0)]

    def _check_range(self, index: int) -> None:
        if not self.first_index <= index <= self._last_index:
            raise LogStateError(f"index {index} is outside the log [{self.first_index}, {self._last_index}]")

    def record(self, index: int) -> Record:
        self._check_usable()
        self._check_range(index)
        seg = self._segment_of(index)
        return self._decode(seg, seg.offset_of(index), index)

    def body(self, index: int) -> bytes:
        """The body of record ``index``, its CRC checked: what a read needs.

        ``record()`` re-checks everything (kind, flags, reserved bytes, padding) and builds
        a Record; the scanner checked all of that when the log opened or the record was
        appended, and only bit rot since then can change it, which the CRC catches. Reads
        of an aggregate fetch one body per event, so this halves their decoding cost. A
        mismatch is reported exactly as ``record()`` reports it."""
        self._check_usable()
        self._check_range(index)
        seg = self._segment_of(index)
        offset = seg.offset_of(index)
        view = seg.file.view()
        body_len, crc, _, _, _, _, _, found = _HEADER.unpack_from(view, offset)
        start = offset + RECORD_HEADER_BYTES
        end = start + body_len
        if (
            found != index
            or end > len(view)
            or _native.crc32c(view[offset + 8 : end], _native.crc32c(view[offset : offset + 4])) != crc
        ):
            return self._decode(seg, offset, index).body  # raises the precise error
        return bytes(view[start:end])

    def _decode(self, seg: SegmentState, offset: int, index: int) -> Record:
        rec = decode_record(seg.file.view(), offset, max_body=self._options.max_record_body_bytes, path=str(seg.path))
        if rec.index != index:
            raise LogStateError(f"{seg.path} offset {offset}: expected record {index}, found {rec.index}")
        return rec

    def epoch_at(self, index: int) -> int:
        """Epoch of record ``index``; 0 for index first_index - 1 of a log starting at 1
        (the empty prefix), as log matching needs for "prev index 0"."""
        self._check_usable()
        if index == 0:
            return 0
        self._check_range(index)
        seg = self._segment_of(index)
        return peek_header(seg.file.view(), seg.offset_of(index)).epoch

    def read(self, first: int, last: int | None = None, max_bytes: int | None = None) -> list[Record]:
        """Records first..last (default: to the end), stopping before max_bytes would be
        exceeded (but always at least one record). [] when first == last_index + 1."""
        self._check_usable()
        if not self.first_index <= first <= self._last_index + 1:
            raise LogStateError(f"read from {first}: the log holds [{self.first_index}, {self._last_index}]")
        last = self._last_index if last is None else min(last, self._last_index)
        if max_bytes is None and last - first >= _SCAN_READ_MIN_RECORDS:
            return self._read_scanned(first, last)
        records: list[Record] = []
        total = 0
        index = first
        while index <= last:
            seg = self._segment_of(index)
            while index <= last and index < seg.next_index:
                rec = self._decode(seg, seg.offset_of(index), index)
                if max_bytes is not None and records and total + rec.size > max_bytes:
                    return records
                records.append(rec)
                total += rec.size
                index += 1
        return records

    def _read_scanned(self, first: int, last: int) -> list[Record]:
        """``read`` without a byte budget: each segment's stretch is verified by ONE native
        scan (CRC, lengths, kinds, indexes, padding), then only sliced here. The applier
        reads every appended record back, a group-commit round at a time, so this is on
        the append path."""
        records: list[Record] = []
        max_body = self._options.max_record_body_bytes
        unpack = _HEADER.unpack_from
        index = first
        while index <= last:
            seg = self._segment_of(index)
            stop_index = min(last, seg.last_index)
            count = stop_index - index + 1
            start = seg.offset_of(index)
            end = seg.record_end(stop_index)
            view = seg.file.view()
            res = _native.scan(view[:end], start, index, max_body, count)
            if res.count != count or res.end_offset != end:
                # Damaged since it was opened: name the record, file and offset exactly
                # (CorruptionError); a record that then decodes cleanly would be a bug.
                bad = index + res.count
                self._decode(seg, seg.offset_of(bad), bad)
                raise LogStateError(
                    f"{seg.path} offset {res.end_offset}: the scan stopped at record {bad} "
                    f"({res.reason}), which decodes"
                )
            for offset in res.offsets[:count]:
                body_len, _, kind, flags, _, _, epoch, idx = unpack(view, offset)
                body = bytes(view[offset + RECORD_HEADER_BYTES : offset + RECORD_HEADER_BYTES + body_len])
                records.append(Record(kind, flags, epoch, idx, body, offset, record_size(body_len)))
            index = stop_index + 1
        return records

    def read_raw(self, first: int, max_bytes: int) -> bytes:
        """Encoded records from ``first``, as stored: whole records, ending at a batch end
        whenever one fits in max_bytes (a batch is split only when it alone is bigger than
        max_bytes; a single record bigger than max_bytes is returned whole). b"" at the end."""
        self._check_usable()
        if not self.first_index <= first <= self._last_index + 1:
            raise LogStateError(f"read from {first}: the log holds [{self.first_index}, {self._last_index}]")
        if first > self._last_index:
            return b""
        last = self._last_index
        si = self._segments.index(self._segment_of(first))
        start = self._segments[si].offset_of(first)
        pieces: list[tuple[SegmentState, int, int]] = []
        cut: tuple[int, int] | None = None  # (piece number, end offset) of the last batch end
        budget, index = max_bytes, first
        while True:
            seg = self._segments[si]
            known_end = seg.record_end(min(last, seg.last_index)) if seg.offsets else seg.end
            stop = min(known_end, start + budget)
            res = _native.scan(
                seg.file.view()[:stop], start, index, self._options.max_record_body_bytes, collect_offsets=False
            )
            # The budget cut the view inside a record: the scan meets a record running past
            # it (TRUNCATED) or, when the cut leaves less than a header whose visible bytes
            # happen to be zero (a length whose low byte is 0), what looks like the end
            # (END_ZERO).
            at_cut = res.stop == ScanStop.TRUNCATED or (
                res.stop == ScanStop.END_ZERO and res.end_offset + RECORD_HEADER_BYTES > stop
            )
            cut_by_budget = at_cut and stop < known_end
            stopped_short = res.stop not in (ScanStop.END_ZERO, ScanStop.TRUNCATED) or bool(
                seg.offsets and res.end_offset < stop and not cut_by_budget
            )
            # Zeroes (or a torn record) left by a truncation running in the writer thread
            # are the new end, not damage.
            if stopped_short and not self._being_cut(res.next_index):
                # Damaged since it was opened (rot): a fault of the disk, named exactly by
                # CorruptionError, not a broken invariant. Rot in a length can look like a
                # record running past the end, or like the end itself, before the records
                # this segment is known to hold end. Only a record that decodes cleanly
                # where the scan stopped would be a bug.
                self._decode(seg, res.end_offset, res.next_index)
                raise LogStateError(
                    f"{seg.path} offset {res.end_offset}: the scan stopped at record {res.next_index} "
                    f"({res.reason}), which decodes"
                )
            if res.end_offset > start:
                pieces.append((seg, start, res.end_offset))
                if res.batch_end_offset:
                    cut = (len(pieces) - 1, res.batch_end_offset)
            budget -= res.end_offset - start
            index = res.next_index
            if (
                stopped_short
                or index > last
                or res.end_offset < seg.end
                or budget <= 0
                or si + 1 == len(self._segments)
            ):
                break
            si += 1
            start = SEGMENT_HEADER_BYTES
        if cut is not None:
            piece, end = cut
            pieces = pieces[: piece + 1]
            pieces[-1] = (pieces[-1][0], pieces[-1][1], end)
        elif not pieces:
            # One record bigger than the budget: returned whole, checked first (the scan
            # above stopped inside it, so it has not been).
            seg = self._segments[self._segments.index(self._segment_of(first))]
            begin = seg.offset_of(first)
            try:
                self._decode(seg, begin, first)
            except CorruptionError:
                if self._being_cut(first):
                    return b""  # cut meanwhile: nothing from here on
                raise
            pieces = [(seg, begin, seg.record_end(first))]
        return b"".join(s.file.view()[a:b] for s, a, b in pieces)

    def _being_cut(self, index: int) -> bool:
        """Whether record ``index`` is being (or has just been) truncated away by the
        writer thread, so that a reader meeting zeroes there has met the cut, not rot."""
        return self._cutting or index > self._last_index

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Sync what is pending (unless poisoned) and close every file. Idempotent."""
        if self._closed:
            return
        try:
            if self._poisoned is None:
                with contextlib.suppress(StorageError):
                    self._sync_dirty()
        finally:
            self._closed = True
            for seg in self._segments:
                seg.file.close()

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        e = self._poisoned
        if isinstance(e, FsyncError):
            raise FsyncError(e.errno, e.path) from e
        if e is not None:
            raise StorageError(f"the write-ahead log is unusable after an earlier failure: {e}") from e
        if self._closed:
            raise LogStateError(f"the write-ahead log in {self._directory} is closed")

    def _poison(self, e: StorageError) -> None:
        if self._poisoned is None:
            self._poisoned = e

    def _tail_epoch(self) -> int:
        for seg in reversed(self._segments):
            if seg.offsets:
                return peek_header(seg.file.view(), seg.offsets[-1]).epoch
        return 0

    def _find_batch_end(self, index: int) -> int:
        """The highest index <= index whose record closes a batch (first_index - 1 if none)."""
        while index >= self.first_index:
            seg = self._segment_of(index)
            view = seg.file.view()
            for i in range(index - seg.first_index, -1, -1):
                if peek_header(view, seg.offsets[i]).flags & FLAG_BATCH_END:
                    return seg.first_index + i
            index = seg.first_index - 1
        return self.first_index - 1


def _new_segment_state(fs: FileSystem, directory: Path, first_index: int, size: int, last_epoch: int) -> SegmentState:
    f = create_segment(fs, directory, first_index, size)
    return SegmentState(directory / f.path.name, f, first_index, size, last_epoch=last_epoch)


def _check_keeps_committed(directory: Path, scan: LogScan) -> None:
    """Refuse to open (and so to repair) a log that ends below what it knew was committed:
    those entries were fsynced and acknowledged, so their loss is damage, not a torn write,
    and repairing would delete the evidence."""
    assert scan.meta is not None
    committed = scan.meta.commit_index
    if scan.keep_index < committed:
        raise CorruptionError(
            str(directory),
            0,
            f"the log's valid records end at index {scan.keep_index}, but entries up to {committed} "
            "were recorded as committed: acknowledged data is missing from this disk",
        )
