"""A simulated disk for tests: crashes, torn sectors, fsync errors, a full disk.

Modelled on TigerBeetle's ``src/testing/storage.zig``: every file keeps two images, the page
cache (what reads see) and the durable image (what survives a crash). A write lands in the
page cache and is remembered as pending; ``fdatasync`` copies the file's pending ranges to
its durable image. ``crash()`` throws every page cache away, so the disk holds exactly
what was synced, and with ``garble=True`` the 512-byte sector that was being written last
holds random bytes where that write covered it (a torn sector; bytes outside the write's
range are never touched, because our record format cannot defend bytes it never wrote).

Directory entries follow the same rule: a create, rename or unlink is durable only after
``fsync_dir`` of its directory. ``mkdir`` is durable at once (the log creates its directory
once, before anything else, and tests never need to lose it).

Fault injection, all through methods (no monkeypatching):

- ``fail_next_fdatasync(count)``: the next ``count`` fdatasync calls fail with EIO. Like
  Linux after a writeback error, the pending writes are then forgotten: a *later* fdatasync
  succeeds without making them durable (the fsyncgate behaviour the log must survive by
  refusing to continue).
- ``fail_writes_after(n_bytes)``: the disk has ``n_bytes`` left. A write or allocation that
  needs more stores what fits and raises DiskFullError; so does everything after it until
  ``clear_faults()``.

Counters (``fdatasync_calls``, ``write_calls``, ``bytes_written``) let tests assert that
group commit really shares one fsync among many appends.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from walstore.errors import DiskFullError, FsyncError, StorageError
from walstore.wal.fs import Buffer, WalFile

SECTOR_BYTES = 512


@dataclass(eq=False)
class _Inode:
    data: bytearray = field(default_factory=bytearray)  # the page cache
    durable: bytearray = field(default_factory=bytearray)  # what a crash leaves
    pending: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) unsynced
    size_changed: bool = False


def _key(path: Path | PurePosixPath | str) -> str:
    return str(PurePosixPath(path))


class SimulatedFile:
    def __init__(self, fs: SimulatedFileSystem, path: Path, inode: _Inode, writable: bool) -> None:
        self._fs = fs
        self._path = path
        self._inode = inode
        self._writable = writable
        self._generation = fs._generation
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    def _check(self, write: bool = False) -> _Inode:
        if self._closed:
            raise StorageError(f"{self._path}: file is closed")
        if self._generation != self._fs._generation:
            raise StorageError(f"{self._path}: handle from before a simulated crash")
        if write and not self._writable:
            raise StorageError(f"{self._path}: opened read-only")
        return self._inode

    def size(self) -> int:
        return len(self._check().data)

    def pwritev(self, buffers: Sequence[Buffer], offset: int, *, sync: bool) -> None:
        inode = self._check(write=True)
        self._fs.write_calls += 1
        pos = offset
        for buf in buffers:
            chunk = memoryview(buf).cast("B")
            n = self._fs._take_space(len(chunk))
            self._fs._write(inode, pos, chunk[:n])
            pos += n
            if n < len(chunk):
                raise DiskFullError(f"write {self._path}: no space left on device (simulated)")
        if sync:
            self.fdatasync()

    def fdatasync(self) -> None:
        inode = self._check()
        self._fs.fdatasync_calls += 1
        if self._fs._fsync_failures > 0:
            self._fs._fsync_failures -= 1
            # Linux marks the failed pages clean: the data never reaches the durable image
            # and a retried fdatasync would wrongly report success.
            self._fs._forget_pending(inode)
            raise FsyncError(5, str(self._path))
        self._fs._sync(inode)

    def fallocate(self, length: int) -> None:
        inode = self._check(write=True)
        grow = length - len(inode.data)
        if grow > 0:
            if self._fs._take_space(grow) < grow:
                raise DiskFullError(f"fallocate {self._path}: no space left on device (simulated)")
            self._fs._resize(inode, length)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self._check().data[offset : offset + length])

    def view(self) -> memoryview:
        return memoryview(self._check().data).toreadonly()

    def truncate(self, length: int) -> None:
        self._fs._resize(self._check(write=True), length)

    def close(self) -> None:
        self._closed = True


class SimulatedFileSystem:
    """In-memory ``FileSystem`` with a crash model and fault injection (see module doc)."""

    def __init__(self, *, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._names: dict[str, _Inode] = {}
        self._durable_names: dict[str, _Inode] = {}
        self._dirs: set[str] = {"/", "."}
        # Unsynced writes of every file, oldest first: the last one is "being written".
        self._pending_order: list[tuple[_Inode, int, int]] = []
        self._generation = 0
        self._fsync_failures = 0
        self._space_left: int | None = None
        self.fdatasync_calls = 0
        self.write_calls = 0
        self.bytes_written = 0
        self.crashes = 0

    # -- fault injection and test helpers ---------------------------------------------------

    def fail_next_fdatasync(self, count: int = 1) -> None:
        self._fsync_failures = count

    def fail_writes_after(self, n_bytes: int) -> None:
        self._space_left = n_bytes

    def clear_faults(self) -> None:
        self._fsync_failures = 0
        self._space_left = None

    def crash(self, *, garble: bool = False) -> None:
        """Lose everything not synced; optionally tear the sector being written."""
        if garble and self._pending_order:
            inode, offset, length = self._pending_order[-1]
            first, last = offset // SECTOR_BYTES, (offset + length - 1) // SECTOR_BYTES
            sector = self._rng.randint(first, last)
            lo = max(offset, sector * SECTOR_BYTES)
            hi = min(offset + length, (sector + 1) * SECTOR_BYTES)
            if len(inode.durable) < hi:
                inode.durable.extend(bytes(hi - len(inode.durable)))
            inode.durable[lo:hi] = self._rng.randbytes(hi - lo)
        self._names = dict(self._durable_names)
        for inode in self._names.values():
            inode.data = bytearray(inode.durable)
            inode.pending = []
            inode.size_changed = False
        self._pending_order = []
        self._generation += 1
        self.crashes += 1

    def damage(self, path: Path, offset: int, data: bytes) -> None:
        """Overwrite bytes in both images: bit rot a test wants the log to find."""
        inode = self._lookup(path)
        for image in (inode.data, inode.durable):
            if len(image) < offset + len(data):
                raise StorageError(f"damage beyond the end of {path}")
            image[offset : offset + len(data)] = data

    def durable_bytes(self, path: Path) -> bytes:
        return bytes(self._durable_names[_key(path)].durable)

    # -- FileSystem ---------------------------------------------------------------------------

    def open(self, path: Path, *, writable: bool = True) -> WalFile:
        return SimulatedFile(self, Path(path), self._lookup(path), writable)

    def create(self, path: Path) -> WalFile:
        key = _key(path)
        self._require_dir(path)
        if key in self._names:
            raise StorageError(f"create {path}: file exists")
        inode = _Inode()
        self._names[key] = inode
        return SimulatedFile(self, Path(path), inode, True)

    def read_file(self, path: Path) -> bytes:
        return bytes(self._lookup(path).data)

    def exists(self, path: Path) -> bool:
        key = _key(path)
        return key in self._names or key in self._dirs

    def listdir(self, path: Path) -> list[str]:
        parent = PurePosixPath(path)
        if _key(path) not in self._dirs:
            raise StorageError(f"list {path}: no such directory")
        names = [PurePosixPath(k).name for k in (*self._names, *self._dirs) if PurePosixPath(k).parent == parent]
        return sorted(n for n in names if n not in ("", "."))

    def mkdir(self, path: Path) -> None:
        p = PurePosixPath(path)
        for d in (p, *p.parents):
            self._dirs.add(str(d))

    def rename(self, src: Path, dst: Path) -> None:
        self._require_dir(dst)
        inode = self._lookup(src)
        del self._names[_key(src)]
        self._names[_key(dst)] = inode

    def unlink(self, path: Path) -> None:
        self._lookup(path)
        del self._names[_key(path)]

    def fsync_dir(self, path: Path) -> None:
        if _key(path) not in self._dirs:
            raise StorageError(f"fsync {path}: no such directory")
        parent = PurePosixPath(path)
        kept = {k: v for k, v in self._durable_names.items() if PurePosixPath(k).parent != parent}
        kept.update({k: v for k, v in self._names.items() if PurePosixPath(k).parent == parent})
        self._durable_names = kept

    # -- internals ----------------------------------------------------------------------------

    def _lookup(self, path: Path | PurePosixPath) -> _Inode:
        try:
            return self._names[_key(path)]
        except KeyError:
            raise StorageError(f"{path}: no such file") from None

    def _require_dir(self, path: Path | PurePosixPath) -> None:
        if str(PurePosixPath(path).parent) not in self._dirs:
            raise StorageError(f"{path}: no such directory")

    def _take_space(self, n: int) -> int:
        if self._space_left is None:
            return n
        granted = min(n, self._space_left)
        self._space_left -= granted
        return granted

    def _write(self, inode: _Inode, offset: int, chunk: memoryview) -> None:
        n = len(chunk)
        if n == 0:
            return
        if offset + n > len(inode.data):
            self._resize(inode, offset + n)
        inode.data[offset : offset + n] = chunk
        inode.pending.append((offset, n))
        self._pending_order.append((inode, offset, n))
        self.bytes_written += n

    def _resize(self, inode: _Inode, length: int) -> None:
        # A new bytearray rather than an in-place resize: views handed out by view()
        # would make an in-place resize fail with BufferError.
        data = bytearray(length)
        keep = min(length, len(inode.data))
        data[:keep] = inode.data[:keep]
        inode.data = data
        inode.size_changed = True

    def _sync(self, inode: _Inode) -> None:
        if inode.size_changed:
            inode.durable = bytearray(inode.data)
        else:
            for offset, n in inode.pending:
                inode.durable[offset : offset + n] = inode.data[offset : offset + n]
        self._forget_pending(inode)

    def _forget_pending(self, inode: _Inode) -> None:
        inode.pending = []
        inode.size_changed = False
        self._pending_order = [p for p in self._pending_order if p[0] is not inode]
