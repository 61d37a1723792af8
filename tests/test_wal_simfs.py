"""The simulated disk itself: what survives a crash, torn sectors, injected faults."""

from __future__ import annotations

from pathlib import Path

import pytest

from walstore.errors import DiskFullError, FsyncError, StorageError
from walstore.wal.simfs import SECTOR_BYTES, SimulatedFileSystem

D = Path("/d")


def fresh() -> SimulatedFileSystem:
    fs = SimulatedFileSystem(seed=5)
    fs.mkdir(D)
    return fs


def test_only_synced_writes_and_synced_names_survive() -> None:
    fs = fresh()
    f = fs.create(D / "a")
    f.pwritev([b"hello"], 0, sync=True)
    fs.fsync_dir(D)
    f.pwritev([b"world"], 5, sync=False)
    assert f.pread(0, 10) == b"helloworld" and bytes(f.view()) == b"helloworld"
    fs.create(D / "b")  # never fsynced into the directory
    fs.crash()
    assert fs.listdir(D) == ["a"]
    assert fs.read_file(D / "a") == b"hello"
    with pytest.raises(StorageError):
        f.pread(0, 1)  # handles die with the crash


def test_rename_and_unlink_are_durable_only_after_fsync_dir() -> None:
    fs = fresh()
    f = fs.create(D / "x.tmp")
    f.pwritev([b"new"], 0, sync=True)
    fs.fsync_dir(D)
    fs.rename(D / "x.tmp", D / "x")
    fs.crash()
    assert fs.listdir(D) == ["x.tmp"]
    fs.rename(D / "x.tmp", D / "x")
    fs.fsync_dir(D)
    fs.unlink(D / "x")
    fs.crash()
    assert fs.listdir(D) == ["x"]


def test_garble_tears_one_sector_of_the_last_write_only() -> None:
    fs = fresh()
    f = fs.create(D / "s")
    f.fallocate(4 * SECTOR_BYTES)
    f.pwritev([b"\x11" * 700], 0, sync=True)
    fs.fsync_dir(D)
    f.pwritev([b"\x22" * 1000], 700, sync=False)
    fs.crash(garble=True)
    after = fs.read_file(D / "s")
    assert after[:700] == b"\x11" * 700  # synced bytes outside the write are never touched
    changed = [i for i in range(700, len(after)) if after[i] != 0]
    assert changed, "one sector of the pending write holds garbage"
    lo, hi = min(changed), max(changed)
    assert lo // SECTOR_BYTES == hi // SECTOR_BYTES and lo >= 700 and hi < 1700


def test_failed_fdatasync_forgets_the_pending_writes() -> None:
    fs = fresh()
    f = fs.create(D / "a")
    fs.fsync_dir(D)
    f.pwritev([b"abc"], 0, sync=False)
    fs.fail_next_fdatasync()
    with pytest.raises(FsyncError):
        f.fdatasync()
    f.fdatasync()  # "succeeds": the kernel already dropped the error and the pages
    fs.crash()
    assert fs.read_file(D / "a") == b""


def test_disk_full_after_n_bytes_writes_a_prefix() -> None:
    fs = fresh()
    f = fs.create(D / "a")
    fs.fsync_dir(D)
    fs.fail_writes_after(4)
    with pytest.raises(DiskFullError):
        f.pwritev([b"ab", b"cdef"], 0, sync=True)
    assert f.pread(0, 10) == b"abcd"
    with pytest.raises(DiskFullError):
        f.fallocate(100)
    fs.clear_faults()
    f.pwritev([b"xy"], 4, sync=True)
    assert f.pread(0, 10) == b"abcdxy"
    assert fs.fdatasync_calls == 1 and fs.write_calls == 2


def test_views_survive_growth() -> None:
    fs = fresh()
    f = fs.create(D / "a")
    view = f.view()
    f.fallocate(64)
    f.pwritev([b"z"], 100, sync=False)
    assert len(view) == 0 and len(f.view()) == 101
