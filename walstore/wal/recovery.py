"""Open a log directory: find where the valid log ends, tell a torn tail from corruption, and
repair what a crash can leave behind.

``scan_log`` only reads (``walstore wal verify`` uses it as is); ``repair`` applies what the
scan found; ``cut_log`` is the one crash-safe way records leave the end of the log, shared
by recovery and ``WriteAheadLog.truncate_suffix``.

What a crash can leave, and what happens to it:

- ``*.tmp`` files (a segment or meta.json being built): deleted.
- trailing segments holding no valid record that do not continue the previous segment
  (created ahead of an append that never reached them): deleted.
- a damaged record in the last segment with no CRC-valid record after it anywhere in that
  segment (a torn write, a zeroed header with garbage after it): a torn tail. The damaged
  bytes are copied to ``<segment>.broken`` and zeroed on disk.
- records after the last BATCH_END of the log (a batch cut short): dropped, because a batch
  is atomic and nothing in it was acknowledged.
- a pending truncation (``meta.truncate_after``): finished.

Anything else is corruption and raises ``CorruptionError`` naming the file and offset: a
damaged record with a valid record after it, damage in any segment but the last, a bad
segment header, a gap between segments, a missing or damaged ``meta.json``.
"""

from __future__ import annotations

import logging
from array import array
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from walstore import _native
from walstore._native import ScanResult, ScanStop
from walstore.errors import CorruptionError
from walstore.wal.fs import FileSystem
from walstore.wal.meta import META_FILE, WalMeta, load_meta, save_meta
from walstore.wal.record import peek_header
from walstore.wal.segment import (
    SEGMENT_HEADER_BYTES,
    TMP_SUFFIX,
    SegmentState,
    open_segment,
    parse_segment_name,
    write_zeros,
)

log = logging.getLogger(__name__)

# Offsets gathered per native scan call: 512 KiB of buffer, resumed until the segment ends.
_SCAN_CHUNK_RECORDS = 1 << 16
_TAIL_PROBE_BYTES = 1 << 16


@dataclass(frozen=True, slots=True)
class TornTail:
    path: Path
    offset: int  # where the valid data of the last segment ends
    reason: str  # the scanner's verdict on the record there
    damaged_end: int  # just past the last non-zero byte after offset (8-aligned)


@dataclass(eq=False)
class LogScan:
    """What ``scan_log`` found. Nothing on disk has been changed yet."""

    directory: Path
    meta: WalMeta | None  # None: a new, empty directory
    segments: list[SegmentState]
    doomed: list[Path] = field(default_factory=list)  # trailing segments to delete
    stray: list[Path] = field(default_factory=list)  # *.tmp leftovers
    torn: TornTail | None = None
    valid_last_index: int = 0  # highest index of a valid record
    keep_index: int = 0  # highest index recovery keeps (end of the last whole batch)

    @property
    def dropped_records(self) -> int:
        return self.valid_last_index - self.keep_index

    @property
    def needs_repair(self) -> bool:
        return bool(
            self.doomed
            or self.stray
            or self.torn
            or self.dropped_records
            or (self.meta is not None and self.meta.truncate_after is not None)
        )

    def problems(self) -> list[str]:
        """One line per thing ``repair`` would fix, for verify and the start-up log."""
        lines = [f"leftover temporary file {p}" for p in self.stray]
        lines += [f"segment {p} holds no record and does not continue the log (would be deleted)" for p in self.doomed]
        if self.torn is not None:
            lines.append(
                f"torn tail at {self.torn.path} offset {self.torn.offset} ({self.torn.reason}; "
                f"{self.torn.damaged_end - self.torn.offset} bytes, would be truncated at start-up)"
            )
        if self.dropped_records:
            lines.append(
                f"incomplete batch: records {self.keep_index + 1}..{self.valid_last_index} follow the last "
                f"BATCH_END (would be dropped at start-up)"
            )
        if self.meta is not None and self.meta.truncate_after is not None:
            lines.append(f"unfinished truncation after index {self.meta.truncate_after} (would be completed)")
        return lines

    def close(self) -> None:
        for seg in self.segments:
            seg.file.close()


def scan_segment(
    view: memoryview, first_index: int, min_epoch: int, max_body: int
) -> tuple[array[int], ScanResult, int | None]:
    """Every valid record from the segment's start: (offsets, final scan result, index of
    the last BATCH_END record or None)."""
    offsets: array[int] = array("Q")
    start, index, epoch = SEGMENT_HEADER_BYTES, first_index, min_epoch
    batch_end: int | None = None
    while True:
        res = _native.scan(view, start, index, max_body, _SCAN_CHUNK_RECORDS, min_epoch=epoch)
        offsets.extend(res.offsets)
        if res.batch_end_offset:
            batch_end = res.batch_end_index
        if res.stop is not ScanStop.FULL:
            return offsets, res, batch_end
        start, index, epoch = res.end_offset, res.next_index, res.last_epoch


def nonzero_end(view: memoryview, start: int) -> int:
    """Just past the last non-zero byte at or after start, rounded up to 8 (start if none)."""
    stop = len(view)
    while stop > start:
        lo = max(start, stop - _TAIL_PROBE_BYTES)
        chunk = view[lo:stop]
        if not _native.is_zero(chunk):
            end = lo + len(bytes(chunk).rstrip(b"\0"))
            return min(len(view), (end + 7) & ~7)
        stop = lo
    return start


def scan_log(fs: FileSystem, directory: Path, *, max_body: int, writable: bool) -> LogScan:
    """Open and check every segment; raise CorruptionError for anything that is not a
    crash's leftovers. The caller owns the returned segments' files (``LogScan.close``)."""
    names = fs.listdir(directory)
    stray = [directory / n for n in names if n.endswith(TMP_SUFFIX)]
    seg_names = sorted((first, n) for n in names if (first := parse_segment_name(n)) is not None)
    meta = load_meta(fs, directory)
    if meta is None:
        if seg_names:
            raise CorruptionError(
                str(directory / META_FILE), 0, "metadata file missing from a directory that holds segments"
            )
        return LogScan(directory, None, [], stray=stray)
    cut = meta.truncate_after
    scan = LogScan(directory, meta, [], stray=stray)
    results: list[tuple[SegmentState, ScanResult, int | None]] = []
    try:
        for i, (named_first, name) in enumerate(seg_names):
            path = directory / name
            if cut is not None and i > 0 and named_first > cut + 1:
                scan.doomed.append(path)  # past an unfinished truncation: garbage by intent
                continue
            f, first = open_segment(fs, path, writable=writable)
            seg = SegmentState(path, f, first, f.size())
            scan.segments.append(seg)
            min_epoch = results[-1][0].last_epoch if results else 0
            seg.offsets, res, batch_end = scan_segment(f.view(), first, min_epoch, max_body)
            seg.end = res.end_offset
            seg.last_epoch = res.last_epoch
            results.append((seg, res, batch_end))
        _drop_discontinuous_tail(scan, results, max_body)
        _classify_damage(scan, results, max_body)
    except BaseException:
        scan.close()
        raise
    if scan.segments:
        last = scan.segments[-1]
        scan.valid_last_index = last.next_index - 1
        batch_ends = [b for _, _, b in results if b is not None]
        keep = batch_ends[-1] if batch_ends else scan.segments[0].first_index - 1
        if cut is not None:
            keep = min(keep, cut)
        scan.keep_index = max(min(keep, scan.valid_last_index), scan.segments[0].first_index - 1)
    return scan


def _drop_discontinuous_tail(
    scan: LogScan, results: list[tuple[SegmentState, ScanResult, int | None]], max_body: int
) -> None:
    """A segment that does not start where the previous one ends is a crash leftover only
    if it and every later one hold no record at all; otherwise the log has a hole."""
    for j in range(1, len(results)):
        prev, seg = results[j - 1][0], results[j][0]
        if seg.first_index == prev.next_index:
            continue
        for later, res, _ in results[j:]:
            holds_records = len(later.offsets) > 0 or (
                res.stop is not ScanStop.END_ZERO
                and _native.find_valid_record(later.file.view(), SEGMENT_HEADER_BYTES - 8, max_body) is not None
            )
            if holds_records:
                prev_res = results[j - 1][1]
                if prev_res.stop is not ScanStop.END_ZERO:
                    # The gap is where the previous segment's data stops: name that damage.
                    raise CorruptionError(
                        str(prev.path), prev_res.end_offset, f"{prev_res.reason} in a segment that is not the last"
                    )
                raise CorruptionError(
                    str(seg.path),
                    16,
                    f"segment starts at index {seg.first_index} but the previous segment "
                    f"({prev.path.name}) ends at index {prev.next_index - 1}",
                )
        for later, _, _ in results[j:]:
            later.file.close()
            scan.doomed.append(later.path)
        del results[j:]
        del scan.segments[j:]
        return


def _classify_damage(scan: LogScan, results: list[tuple[SegmentState, ScanResult, int | None]], max_body: int) -> None:
    cut = scan.meta.truncate_after if scan.meta is not None else None
    for j, (seg, res, _) in enumerate(results):
        if res.stop is ScanStop.END_ZERO:
            continue
        if cut is not None and seg.next_index - 1 >= cut:
            # Everything up to the cut is intact; what follows is being truncated anyway.
            view = seg.file.view()
            scan.torn = TornTail(
                seg.path, seg.end, f"{res.reason} after the truncation point", nonzero_end(view, seg.end)
            )
            continue
        if j != len(results) - 1:
            raise CorruptionError(str(seg.path), res.end_offset, f"{res.reason} in a segment that is not the last")
        view = seg.file.view()
        found = _native.find_valid_record(view, res.end_offset, max_body)
        if found is not None:
            raise CorruptionError(
                str(seg.path), res.end_offset, f"{res.reason}, and a valid record follows at offset {found}"
            )
        scan.torn = TornTail(seg.path, res.end_offset, res.reason, nonzero_end(view, res.end_offset))


def epoch_changes(
    buf: bytes | bytearray | memoryview, offsets: array[int], first_index: int, prev_epoch: int
) -> list[tuple[int, int]]:
    """[(epoch, index)] for every record whose epoch differs from the one before it
    (``prev_epoch`` before the first). Epochs never decrease along the log, so each change
    is found by bisection: O(changes * log n) header reads instead of one per record."""
    found: list[tuple[int, int]] = []

    def epoch(i: int) -> int:
        return peek_header(buf, offsets[i]).epoch

    def bisect(lo: int, hi: int, e_lo: int, e_hi: int) -> None:
        # records lo < hi with epochs e_lo <= e_hi: report each i in (lo, hi] where it rises
        if e_lo == e_hi:
            return
        if hi == lo + 1:
            found.append((e_hi, first_index + hi))
            return
        mid = (lo + hi) // 2
        e_mid = epoch(mid)
        bisect(lo, mid, e_lo, e_mid)
        bisect(mid, hi, e_mid, e_hi)

    n = len(offsets)
    if n:
        first = epoch(0)
        if first != prev_epoch:
            found.append((first, first_index))
        bisect(0, n - 1, first, epoch(n - 1))
    return found


def epoch_history(segments: list[SegmentState]) -> list[tuple[int, int]]:
    """[(epoch, first index of that epoch)] read from the records themselves."""
    history: list[tuple[int, int]] = []
    for seg in segments:
        prev = history[-1][0] if history else 0
        history += epoch_changes(seg.file.view(), seg.offsets, seg.first_index, prev)
    return history


def _broken_path(fs: FileSystem, path: Path) -> Path:
    candidate = path.with_name(path.name + ".broken")
    n = 1
    while fs.exists(candidate):
        candidate = path.with_name(f"{path.name}.broken.{n}")
        n += 1
    return candidate


def cut_log(
    fs: FileSystem,
    directory: Path,
    segments: list[SegmentState],
    after_index: int,
    *,
    damaged: TornTail | None = None,
    meta_lock: AbstractContextManager[object] | None = None,
) -> WalMeta:
    """Remove every record with index > after_index, durably, surviving a crash at any
    point; returns the metadata now on disk. ``damaged`` extends the zeroing over a torn
    tail's bytes when its segment is the one that remains last. ``meta_lock`` serialises
    the read-modify-write of meta.json with other writers of it (promises).

    Order: (1) persist ``truncate_after`` when valid records go; (2) delete whole segments
    past the cut, newest first, then fsync the directory, so a crash leaves a prefix of
    segments; (3) zero the rest of the last one and fdatasync; (4) clear the marker.
    """
    lock = meta_lock if meta_lock is not None else nullcontext()
    removing = bool(segments) and after_index < segments[-1].next_index - 1
    with lock:
        meta = _current_meta(fs, directory)
        if removing and meta.truncate_after != after_index:
            meta = replace(meta, truncate_after=after_index)
            save_meta(fs, directory, meta)
    unlinked = False
    while len(segments) > 1 and segments[-1].first_index > after_index + 1:
        seg = segments.pop()
        seg.file.close()
        fs.unlink(seg.path)
        unlinked = True
    if unlinked:
        fs.fsync_dir(directory)
    if segments:
        seg = segments[-1]
        keep = max(0, after_index - seg.first_index + 1)
        start = seg.offsets[keep] if keep < len(seg.offsets) else seg.end
        stop = max(seg.end, seg.junk_end)
        if damaged is not None and damaged.path == seg.path:
            stop = max(stop, damaged.damaged_end)
        if stop > start:
            write_zeros(seg.file, start, stop, sync=True)
        elif seg.dirty:
            seg.file.fdatasync()
        del seg.offsets[keep:]
        seg.end, seg.junk_end, seg.dirty = start, 0, False
        if seg.offsets:
            seg.last_epoch = peek_header(seg.file.view(), seg.offsets[-1]).epoch
    with lock:
        meta = _current_meta(fs, directory)
        if meta.truncate_after is not None:
            history = tuple(p for p in meta.epoch_history if p[1] <= after_index)
            meta = replace(meta, truncate_after=None, epoch_history=history)
            save_meta(fs, directory, meta)
    return meta


def _current_meta(fs: FileSystem, directory: Path) -> WalMeta:
    # Re-read rather than trust a cached copy: promises are saved by other code paths.
    meta = load_meta(fs, directory)
    if meta is None:
        raise CorruptionError(str(directory / META_FILE), 0, "metadata file disappeared")
    return meta


def repair(fs: FileSystem, scan: LogScan) -> WalMeta:
    """Apply what ``scan_log`` found (see the module docstring); returns the meta on disk."""
    assert scan.meta is not None
    meta = scan.meta
    for problem in scan.problems():
        log.warning("write-ahead log recovery: %s", problem)
    for path in scan.stray:
        fs.unlink(path)
    for path in reversed(scan.doomed):
        fs.unlink(path)
    if scan.stray or scan.doomed:
        fs.fsync_dir(scan.directory)
    if scan.torn is not None:
        torn = scan.torn
        seg = scan.segments[-1]
        assert seg.path == torn.path
        broken = _broken_path(fs, torn.path)
        f = fs.create(broken)
        try:
            f.pwritev([seg.file.view()[torn.offset : torn.damaged_end]], 0, sync=True)
        finally:
            f.close()
        fs.fsync_dir(scan.directory)
        log.warning(
            "write-ahead log recovery: copied %s bytes of the torn tail to %s", torn.damaged_end - torn.offset, broken
        )
    if scan.torn is not None or scan.dropped_records or meta.truncate_after is not None:
        # The segments' in-memory tail still reaches valid_last_index: cut_log zeroes from
        # the first dropped record through the damaged bytes.
        meta = cut_log(fs, scan.directory, scan.segments, scan.keep_index, damaged=scan.torn)
    # Clean, with a repaired tail or not, the scan's view of the directory is now the disk's.
    scan.doomed, scan.stray, scan.torn = [], [], None
    scan.valid_last_index = scan.keep_index
    scan.meta = meta
    return meta
