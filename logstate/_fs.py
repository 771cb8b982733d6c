"""The only module that touches the file system.

Owns: every system call logstate makes on files and directories (open,
append, positioned read, fsync/fdatasync, truncate, rename, unlink, directory
fsync, listing, the directory lock), behind one class, :class:`FileSystem`.
Tests substitute a subclass that records calls, injects EIO/ENOSPC or
simulates a power loss; the engine receives the instance and never calls
``os`` itself.
Must never: interpret bytes (that is ``_format``) or decide policy (that is
the engine). ``OSError`` is never swallowed here: a failed call raises.

Files are created 0600 and directories 0700.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import resource
import sys
from collections.abc import Callable

from logstate._errors import StorageLockedError

__all__ = ["DIR_MODE", "FILE_MODE", "LOCK_FILE_NAME", "OS_FS", "FileSystem"]

FILE_MODE = 0o600
DIR_MODE = 0o700
LOCK_FILE_NAME = "LOCK"

_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class FileSystem:
    """Thin wrappers over ``os``; one instance is shared by every engine."""

    # ------------------------------------------------------------------ paths
    def canonical_path(self, path: str) -> str:
        """Absolute path with symlinks resolved (the registry's key)."""
        return os.path.realpath(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def make_dirs(self, path: str) -> None:
        """Create ``path`` (mode 0700) and missing parents; fsync each new entry's parent."""
        path = os.path.abspath(path)
        missing = []
        probe = path
        while not os.path.isdir(probe):
            missing.append(probe)
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, DIR_MODE)
            self.fsync_dir(os.path.dirname(directory))

    def list_dir(self, path: str) -> list[str]:
        return os.listdir(path)

    # ------------------------------------------------------------------ files
    def create_file(self, path: str) -> int:
        """Create a new file (it must not exist) for reading and appending."""
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)

    def open_file(self, path: str) -> int:
        """Open an existing file for reading and appending."""
        return os.open(path, os.O_RDWR | os.O_APPEND)

    def open_read_only(self, path: str) -> int:
        return os.open(path, os.O_RDONLY)

    def close(self, fd: int) -> None:
        os.close(fd)

    def file_size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def file_identity(self, fd: int) -> tuple[int, int]:
        """(device, inode) of the open file: tells a file from another put under its name."""
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def append(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at the end of the file (loops over short writes).

        Raises:
            OSError: the write failed; part of ``data`` may have been written.
        """
        written = os.write(fd, data)
        if written == len(data):
            return
        view = memoryview(data)
        while written < len(view):
            n = os.write(fd, view[written:])
            if n == 0:  # pragma: no cover - POSIX write never returns 0 for n > 0
                raise OSError(errno.EIO, "write returned 0")
            written += n

    def raw_write_function(self) -> Callable[[int, bytes], int] | None:
        """``os.write`` itself, for a hot path that finishes short writes with :meth:`append`.

        None when a subclass overrides :meth:`append` (tests inject faults
        there, and must see every write).
        """
        return os.write if type(self).append is FileSystem.append else None

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` (fewer only at end of file)."""
        return os.pread(fd, size, offset)

    def read_all(self, fd: int) -> bytes:
        """The whole file's content."""
        size = os.fstat(fd).st_size
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(size - offset, 1 << 24), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def map_read_only(self, fd: int, size: int) -> mmap.mmap | None:
        """A read-only shared mapping of the first ``size`` bytes (None when size is 0).

        Reads through it cost no system call. The caller maps only bytes that
        exist and are never truncated while mapped (sealed segments). Before
        Python 3.13 the mapping keeps a duplicate of ``fd`` until it is closed
        (closing ``fd`` does not release it): every open mapping costs one
        descriptor. From 3.13 on it keeps none (``trackfd=False``).
        """
        if size <= 0:
            return None
        if sys.version_info >= (3, 13):
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, trackfd=False)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)

    def descriptor_limit(self) -> int:
        """The process's soft limit on open descriptors (``RLIMIT_NOFILE``); 2**20 if unlimited."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return 1 << 20 if soft == resource.RLIM_INFINITY or soft > 1 << 20 else soft

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        _fdatasync(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def write_new_file(self, path: str, data: bytes | bytearray | memoryview) -> None:
        """Create ``path`` exclusively, write ``data``, fsync, close (no dir fsync)."""
        fd = self.create_file(path)
        try:
            self.append(fd, data)
            self.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ directory entries
    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries (creates, renames, unlinks) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ lock
    def lock_dir(self, path: str) -> int:
        """Take the directory's exclusive lock (``LOCK`` file, flock) for this process.

        Returns:
            The lock file's descriptor; pass it to :meth:`unlock_dir`.

        Raises:
            StorageLockedError: another process (or another open file
                description) holds the lock; names the holder's pid when known.
        """
        lock_path = os.path.join(path, LOCK_FILE_NAME)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                pid: int | None = int(text) if text.isdigit() else None
            finally:
                os.close(fd)
            raise StorageLockedError(path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlock_dir(self, fd: int) -> None:
        """Release the lock taken by :meth:`lock_dir` (closing releases the flock)."""
        os.close(fd)


OS_FS = FileSystem()
