"""Recovery: a torn tail is truncated (with a .broken copy), corruption is refused with the
exact file and offset, crash leftovers are cleaned up."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from walstore._native import crc32c
from walstore.errors import CommittedTruncation, CorruptionError, LogStateError, StorageError
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.meta import META_FILE, WalMeta, encode_meta, save_meta
from walstore.wal.record import FLAG_BATCH_END, KIND_EVENT, encode_record
from walstore.wal.segment import SEGMENT_HEADER_BYTES, encode_segment_header, segment_name
from walstore.wal.simfs import SimulatedFileSystem

D = Path("/wal")
INCARNATION = "ab" * 16
OPTS = WalOptions(segment_size_bytes=2048, max_record_body_bytes=300)


def build(batches: list[int], size: int = 40, fs: SimulatedFileSystem | None = None) -> SimulatedFileSystem:
    """A closed log of the given batch sizes (records of `size`-byte bodies)."""
    fs = fs if fs is not None else SimulatedFileSystem(seed=1)
    with WriteAheadLog.open(D, OPTS, fs) as log:
        for n in batches:
            first = log.last_index + 1
            # bodies with no zero byte, so zeroing any part of a record changes it
            bodies = [(b"%d." % (first + i)) * size for i in range(n)]
            log.append(log.encode([(KIND_EVENT, 0, b[:size]) for b in bodies], 1, first))
    return fs


def layout(fs: SimulatedFileSystem) -> list[tuple[Path, int, int, int]]:
    """(segment path, index, offset, size) of every record."""
    with WriteAheadLog.open(D, OPTS, fs) as log:
        out = []
        for r in log.read(1):
            seg = next(p for p in reversed(log.segment_paths) if int(p.name[:20]) <= r.index)
            out.append((seg, r.index, r.offset, r.size))
        return out


def reopen(fs: SimulatedFileSystem) -> WriteAheadLog:
    return WriteAheadLog.open(D, OPTS, fs)


def broken_files(fs: SimulatedFileSystem) -> list[str]:
    return [n for n in fs.listdir(D) if ".broken" in n]


@pytest.mark.parametrize("fill", ["zeros", "garbage"])
def test_torn_last_record_at_every_byte_is_truncated(fill: str) -> None:
    base = build([1] * 6)
    seg, index, offset, size = layout(base)[-1]
    assert index == 6
    rng = random.Random(7)
    for cut in range(size):
        fs = build([1] * 6)
        # the write reached `cut` bytes of the record; the rest is zeros (or sector garbage)
        rest = size - cut
        tail = bytes(rest) if fill == "zeros" else bytes(rng.getrandbits(8) | 1 for _ in range(rest))
        fs.damage(seg, offset + cut, tail)
        before = fs.durable_bytes(seg)[offset:]
        log = reopen(fs)
        assert log.last_index == 5, cut
        assert [r.index for r in log.read(1)] == [1, 2, 3, 4, 5]
        # all zeros from the record's start is a clean end; anything else is torn
        nonzero = cut > 0 or fill == "garbage"
        assert bool(broken_files(fs)) == nonzero, cut
        if nonzero:
            copy = fs.read_file(D / (seg.name + ".broken"))
            assert before.startswith(copy) and before[len(copy) :].strip(b"\0") == b""
        # the damaged bytes were zeroed on disk: a second open finds a clean log
        log.close()
        log = reopen(fs)
        assert log.last_index == 5 and len(broken_files(fs)) == (1 if nonzero else 0)
        # and appending continues at the torn record's index and offset
        log.append(log.encode([(KIND_EVENT, 0, b"new")], 1, 6))
        assert log.record(6).offset == offset
        log.close()


def test_broken_copy_holds_the_damaged_bytes() -> None:
    fs = build([1] * 3)
    seg, _, offset, size = layout(fs)[-1]
    torn = bytes(range(1, 20))
    fs.damage(seg, offset, torn + bytes(size - len(torn)))
    reopen(fs).close()
    copy = fs.read_file(D / (seg.name + ".broken"))
    assert copy.rstrip(b"\0") == torn
    assert fs.durable_bytes(seg)[offset : offset + size] == bytes(size)


def test_zeroed_last_record_is_a_clean_end() -> None:
    fs = build([1] * 4)
    seg, _, offset, size = layout(fs)[-1]
    fs.damage(seg, offset, bytes(size))
    log = reopen(fs)
    assert log.last_index == 3 and not broken_files(fs)


def test_zeroed_record_in_the_middle_is_corruption() -> None:
    fs = build([1] * 4)
    seg, _, offset, size = layout(fs)[1]
    fs.damage(seg, offset, bytes(size))
    with pytest.raises(CorruptionError) as exc:
        reopen(fs)
    assert (exc.value.path, exc.value.offset) == (str(seg), offset)


def test_flipped_bit_in_any_non_final_record_is_corruption_at_its_offset() -> None:
    batches = [2, 1, 3, 1, 2, 4, 1, 2, 3, 2]
    records = layout(build(batches, size=100))
    assert len({r[0] for r in records}) >= 2  # spans several segments
    rng = random.Random(3)
    for seg, index, offset, size in records[:-1]:
        for byte in {0, 4, 8, 16, 24, 31, 32, size - 1, rng.randrange(size)}:
            fs = build(batches, size=100)
            flipped = fs.durable_bytes(seg)[offset + byte] ^ (1 << rng.randrange(8))
            fs.damage(seg, offset + byte, bytes([flipped]))
            with pytest.raises(CorruptionError) as exc:
                reopen(fs)
            assert exc.value.path == str(seg), (index, byte)
            assert exc.value.offset == offset, (index, byte, exc.value)


def test_flipped_bit_in_the_final_record_is_a_torn_tail() -> None:
    fs = build([1] * 5)
    seg, _, offset, _ = layout(fs)[-1]
    fs.damage(seg, offset + 40, bytes([fs.durable_bytes(seg)[offset + 40] ^ 0x10]))
    assert reopen(fs).last_index == 4
    assert broken_files(fs)


def test_damage_at_the_end_of_a_sealed_segment_is_corruption() -> None:
    fs = build([1] * 60)
    records = layout(fs)
    first_seg = records[0][0]
    seg, _, offset, size = [r for r in records if r[0] == first_seg][-1]
    fs.damage(seg, offset + size - 1, b"\x01")  # padding of its last record
    with pytest.raises(CorruptionError) as exc:
        reopen(fs)
    assert (exc.value.path, exc.value.offset) == (str(seg), offset)
    assert "not the last" in exc.value.reason


def test_partial_batch_at_the_tail_is_dropped() -> None:
    fs = build([2, 3])
    with reopen(fs) as log:
        # a batch of 4 whose end never made it: 3 of its records reach the disk
        data = log.encode([(KIND_EVENT, 0, b"p" * 10)] * 4, 1, 6)
        log.append(data[: 3 * 48])
        assert log.last_index == 8 and log.batch_end_index == 5
    fs.crash()
    log = reopen(fs)
    assert log.last_index == 5
    log.append(log.encode([(KIND_EVENT, 0, b"q")], 1, 6))
    log.close()
    log = reopen(fs)
    assert [r.body for r in log.read(6)] == [b"q"]


def test_partial_batch_spanning_segments_is_dropped_and_later_segments_removed() -> None:
    fs = build([3])
    with reopen(fs) as log:
        data = log.encode([(KIND_EVENT, 0, b"s" * 200)] * 20, 1, 4)
        cut = len(data) - 232 * 2  # all but the last two records
        log.append(data[:cut])
        assert len(log.segment_paths) > 2
    log = reopen(fs)
    assert log.last_index == 3 and len(log.segment_paths) == 1


def test_garbage_after_a_zeroed_header_in_the_last_segment_is_torn() -> None:
    fs = build([1] * 3)
    seg, _, offset, size = layout(fs)[-1]
    fs.damage(seg, offset + size + 512, b"\xff" * 16)  # junk well past the end
    log = reopen(fs)
    assert log.last_index == 3 and broken_files(fs)
    log.close()
    assert fs.durable_bytes(seg)[offset + size :].strip(b"\0") == b""


def test_valid_record_after_a_hole_is_corruption() -> None:
    fs = build([1] * 3)
    seg, _, offset, size = layout(fs)[-1]
    stray = encode_record(KIND_EVENT, FLAG_BATCH_END, 1, 9, b"later")
    fs.damage(seg, offset + size + 64, stray)
    with pytest.raises(CorruptionError) as exc:
        reopen(fs)
    assert exc.value.offset == offset + size and "valid record follows" in exc.value.reason


def test_bad_segment_header_is_corruption() -> None:
    fs = build([1] * 60)
    seg = layout(fs)[-1][0]
    fs.damage(seg, 20, b"\x07")
    with pytest.raises(CorruptionError) as exc:
        reopen(fs)
    assert exc.value.path == str(seg) and exc.value.offset == 0


def test_gap_between_segments_is_corruption() -> None:
    fs = build([1] * 60)
    with reopen(fs) as log:
        segs = log.segment_paths
    assert len(segs) >= 3
    fs.unlink(segs[1])
    fs.fsync_dir(D)
    with pytest.raises(CorruptionError) as exc:
        reopen(fs)
    assert exc.value.path == str(segs[2])


def test_empty_segment_ahead_of_the_log_is_a_crash_leftover() -> None:
    fs = build([2])
    f = fs.create(D / segment_name(40))
    f.fallocate(OPTS.segment_size_bytes)
    f.pwritev([encode_segment_header(40)], 0, sync=True)
    fs.fsync_dir(D)
    log = reopen(fs)
    assert log.last_index == 2 and len(log.segment_paths) == 1
    assert segment_name(40) not in fs.listdir(D)


def test_missing_or_garbled_meta_is_a_clear_error() -> None:
    fs = build([2])
    good = fs.read_file(D / META_FILE)
    fs.damage(D / META_FILE, 5, b"X")
    with pytest.raises(CorruptionError) as exc:
        reopen(fs)
    assert exc.value.path == str(D / META_FILE)
    fs.damage(D / META_FILE, 5, good[5:6])
    reopen(fs).close()
    fs.unlink(D / META_FILE)
    with pytest.raises(CorruptionError) as exc:
        reopen(fs)
    assert "missing" in exc.value.reason


def test_leftover_tmp_files_are_removed() -> None:
    fs = build([2])
    for name in (segment_name(3) + ".tmp", META_FILE + ".tmp"):
        fs.create(D / name).pwritev([b"half"], 0, sync=True)
    fs.fsync_dir(D)
    reopen(fs).close()
    assert not [n for n in fs.listdir(D) if n.endswith(".tmp")]


def test_unfinished_truncation_is_completed_even_over_torn_bytes() -> None:
    """A crash while zeroing records 6..10 tore a sector of the zeroing write, and valid old
    records follow it. Without the marker that is corruption; with it, the cut finishes."""
    records = layout(build([1] * 10))
    seg, _, offset, _ = records[6]

    fs = build([1] * 10)
    fs.damage(seg, offset + 8, b"\xee" * 20)
    with pytest.raises(CorruptionError):
        reopen(fs)

    fs = build([1] * 10)
    save_meta(fs, D, WalMeta(truncate_after=5, incarnation=INCARNATION))
    fs.damage(seg, offset + 8, b"\xee" * 20)
    log = reopen(fs)
    assert log.last_index == 5 and log.meta.truncate_after is None
    log.close()
    assert reopen(fs).last_index == 5


def test_crash_with_a_torn_zeroing_sector_recovers() -> None:
    """The same through the simulated disk: the marker is durable, the zeroing write is
    pending when the crash comes and its sector being written turns to garbage."""
    for seed in range(8):
        fs = build([1] * 12, fs=SimulatedFileSystem(seed=seed))
        seg, _, offset, _ = layout(fs)[4]
        save_meta(fs, D, WalMeta(truncate_after=4, incarnation=INCARNATION))
        f = fs.open(seg)
        f.pwritev([bytes(OPTS.segment_size_bytes - offset)], offset, sync=False)
        fs.crash(garble=True)
        log = reopen(fs)
        assert log.last_index == 4, seed
        log.close()


def test_damaged_header_never_allocates_its_length() -> None:
    fs = build([1] * 3)
    seg, _, offset, _ = layout(fs)[-1]
    fs.damage(seg, offset, (0xFFFFFFFF).to_bytes(4, "little"))  # body_len 4 GiB
    log = reopen(fs)
    assert log.last_index == 2


def test_segment_header_constants() -> None:
    header = encode_segment_header(12345)
    assert len(header) == SEGMENT_HEADER_BYTES and header[:8] == b"WALSTSEG"


def test_truncate_suffix_interrupted_by_a_crash_is_finished_at_start_up() -> None:
    """truncate_suffix persists its intent, then zeroes; the disk fills mid-zeroing and the
    crash tears the sector being zeroed, leaving garbage with valid old records after it."""
    fs = build([1] * 12)
    seg, _, offset, _ = layout(fs)[4]
    log = reopen(fs)
    marker = len(encode_meta(replace(log.meta, truncate_after=4)))
    fs.fail_writes_after(marker + 16)  # the marker fits, 16 bytes of the zeroing do
    with pytest.raises(StorageError):
        log.truncate_suffix(4)
    assert fs.durable_bytes(seg)[offset + 16 : offset + 24] != bytes(8)  # old record 5 intact
    fs.clear_faults()
    fs.crash(garble=True)
    log = reopen(fs)
    assert log.last_index == 4 and log.meta.truncate_after is None


# -- identity and the recorded commit index (issue: a lost disk never makes the cluster forget)


def test_a_new_directory_gets_an_incarnation_that_reopening_keeps() -> None:
    fs = SimulatedFileSystem(seed=3)
    with WriteAheadLog.open(D, OPTS, fs) as log:
        assert log.created and len(log.incarnation) == 32
        first = log.incarnation
    with reopen(fs) as log:
        assert not log.created and log.incarnation == first


def test_a_format_1_directory_keeps_its_promise_and_is_given_an_incarnation() -> None:
    fs = build([1] * 3)
    obj: dict[str, object] = {"format": 1, "promised_epoch": 9, "epoch_history": [[1, 1]], "truncate_after": None}
    obj["crc32c"] = crc32c(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    fs.unlink(D / META_FILE)
    f = fs.create(D / META_FILE)
    f.pwritev([raw], 0, sync=True)
    f.close()
    with reopen(fs) as log:
        assert not log.created  # an upgrade, not an amnesia
        assert log.promised_epoch == 9 and len(log.incarnation) == 32 and log.last_index == 3
        named = log.incarnation
    with reopen(fs) as log:
        assert log.incarnation == named


def test_truncation_at_or_below_the_recorded_commit_is_refused() -> None:
    fs = build([1] * 10)
    with reopen(fs) as log:
        log.set_known_commit(6)
        log.set_known_commit(4)  # never goes back
        assert log.known_commit == 6
        with pytest.raises(CommittedTruncation, match="after index 5: entries up to 6"):
            log.truncate_suffix(5)
        assert log.last_index == 10
        log.truncate_suffix(6)
        assert log.last_index == 6
        with pytest.raises(LogStateError):
            log.set_known_commit(7)  # not held: says nothing about our entries
    with reopen(fs) as log:
        assert (log.known_commit, log.last_index) == (6, 6)


def test_a_log_missing_committed_entries_refuses_to_open_and_changes_nothing() -> None:
    """A torn tail above the recorded commit index is a crash (repaired); at or below it,
    entries that were fsynced and acknowledged are gone: damage, never repaired away."""
    fs = build([1] * 10)
    seg, index, offset, size = layout(fs)[-1]
    assert index == 10
    with reopen(fs) as log:
        log.set_known_commit(9)
    fs.damage(seg, offset, bytes(size))
    with reopen(fs) as log:  # index 10 was never known committed: a torn write
        assert log.last_index == 9
    seg, index, offset, size = layout(fs)[-1]
    fs.damage(seg, offset, bytes(size))
    before = {name: fs.read_file(D / name) for name in fs.listdir(D)}
    with pytest.raises(CorruptionError, match="up to 9 were recorded as committed"):
        reopen(fs)
    assert {name: fs.read_file(D / name) for name in fs.listdir(D)} == before
