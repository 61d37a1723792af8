"""The file-system seam of the write-ahead log.

The log never calls ``os`` directly: it talks to a ``FileSystem`` and the ``WalFile`` handles
it opens. ``RealFileSystem`` is the production one (one native ``pwritev`` plus one
``fdatasync`` per batch); ``walstore.wal.simfs.SimulatedFileSystem`` is the test one that
models crashes and faults. Keeping the seam this small is what lets tests inject "the next
fdatasync fails with EIO" or "the disk fills after N bytes" without monkeypatching.

Error contract, for both implementations: every method raises only
``walstore.errors.StorageError`` subclasses, never ``OSError``:

- ``FsyncError``    fdatasync failed, or a write failed with EIO (the page cache state is
                    unknown afterwards, so callers treat it as fatal);
- ``DiskFullError`` ENOSPC / EDQUOT: nothing of the write may be assumed durable;
- ``StorageError``  anything else (permissions, a missing file, ...), naming the path.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from walstore import _native
from walstore.errors import DiskFullError, FsyncError, NativeError, StorageError

Buffer = bytes | bytearray | memoryview

_DISK_FULL_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT})


class WalFile(Protocol):
    """An open file of the log. Offsets are absolute; there is no file position."""

    @property
    def path(self) -> Path: ...

    def size(self) -> int: ...

    def pwritev(self, buffers: Sequence[Buffer], offset: int, *, sync: bool) -> None:
        """Write every buffer back to back from ``offset`` in one call; when ``sync``,
        fdatasync before returning (one round trip for the common append)."""
        ...

    def fdatasync(self) -> None: ...

    def fallocate(self, length: int) -> None:
        """Reserve ``length`` bytes (zero-filled) so later writes cannot hit ENOSPC."""
        ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def view(self) -> memoryview:
        """A read-only view of the whole file as the page cache holds it (written, synced or
        not). Valid until the file changes size or is closed."""
        ...

    def truncate(self, length: int) -> None: ...

    def close(self) -> None: ...


class FileSystem(Protocol):
    def open(self, path: Path, *, writable: bool = True) -> WalFile: ...

    def create(self, path: Path) -> WalFile:
        """Create a new empty file; fails if it exists. Its name is durable only after
        ``fsync_dir`` of its directory."""
        ...

    def read_file(self, path: Path) -> bytes: ...

    def exists(self, path: Path) -> bool: ...

    def listdir(self, path: Path) -> list[str]: ...

    def mkdir(self, path: Path) -> None:
        """Create the directory and its parents if missing (durably)."""
        ...

    def rename(self, src: Path, dst: Path) -> None: ...

    def unlink(self, path: Path) -> None: ...

    def fsync_dir(self, path: Path) -> None: ...


def storage_error(err: int, what: str, path: Path | str) -> StorageError:
    """Map an errno to the error family of the seam (see the module docstring)."""
    if err in _DISK_FULL_ERRNOS:
        return DiskFullError(f"{what} {path}: no space left on device")
    if err == _errno.EIO:
        return FsyncError(err, str(path))
    return StorageError(f"{what} {path}: [{_errno.errorcode.get(err, err)}] {os.strerror(err)}")


@contextlib.contextmanager
def os_errors(what: str, path: Path | str) -> Iterator[None]:
    """Turn OSError / NativeError raised inside the block into the seam's errors."""
    try:
        yield
    except NativeError as e:
        raise storage_error(e.errno, what, path) from e
    except OSError as e:
        raise storage_error(e.errno or _errno.EIO, what, path) from e


class RealFile:
    """A file descriptor plus a lazily created shared read-only mapping."""

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd = fd
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    @property
    def path(self) -> Path:
        return self._path

    def size(self) -> int:
        with os_errors("stat", self._path):
            return os.fstat(self._fd).st_size

    def pwritev(self, buffers: Sequence[Buffer], offset: int, *, sync: bool) -> None:
        with os_errors("write", self._path):
            _native.pwritev_sync(self._fd, offset, buffers, sync, str(self._path))

    def fdatasync(self) -> None:
        with os_errors("fdatasync", self._path):
            _native.fdatasync(self._fd, str(self._path))

    def fallocate(self, length: int) -> None:
        self._drop_map()
        with os_errors("fallocate", self._path):
            _native.fallocate(self._fd, 0, length, str(self._path))

    def pread(self, offset: int, length: int) -> bytes:
        with os_errors("read", self._path):
            return os.pread(self._fd, length, offset)

    def view(self) -> memoryview:
        # Cached: segment files change size only through this handle (fallocate/truncate
        # drop the mapping), so no fstat per read.
        if self._view is None:
            size = self.size()
            if size == 0:
                return memoryview(b"")
            # MAP_SHARED over the page cache: writes made with pwritev are visible at once,
            # so one mapping per segment serves every later read.
            with os_errors("mmap", self._path):
                self._map = mmap.mmap(self._fd, size, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
        return self._view

    def _drop_map(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            # A caller may still hold a slice of the view; the mapping then lives until
            # that slice is garbage collected instead of failing the close.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None

    def truncate(self, length: int) -> None:
        self._drop_map()
        with os_errors("truncate", self._path):
            os.ftruncate(self._fd, length)

    def close(self) -> None:
        self._drop_map()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with os_errors("close", self._path):
                os.close(fd)


class RealFileSystem:
    """The production seam: POSIX calls plus walstore._native for the hot path."""

    def open(self, path: Path, *, writable: bool = True) -> WalFile:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        with os_errors("open", path):
            return RealFile(path, os.open(path, flags))

    def create(self, path: Path) -> WalFile:
        with os_errors("create", path):
            return RealFile(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))

    def read_file(self, path: Path) -> bytes:
        with os_errors("read", path):
            return path.read_bytes()

    def exists(self, path: Path) -> bool:
        return path.exists()

    def listdir(self, path: Path) -> list[str]:
        with os_errors("list", path):
            return sorted(os.listdir(path))

    def mkdir(self, path: Path) -> None:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        with os_errors("mkdir", path):
            os.makedirs(path, 0o755, exist_ok=True)
        # A new directory entry is durable only once its parent is fsynced.
        for p in reversed(missing):
            self.fsync_dir(p.parent)

    def rename(self, src: Path, dst: Path) -> None:
        with os_errors("rename", src):
            os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        with os_errors("unlink", path):
            os.unlink(path)

    def fsync_dir(self, path: Path) -> None:
        with os_errors("fsync directory", path):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
