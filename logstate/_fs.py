"""The file system: the only module of the engine tiers that makes a system call on files.

Owns: every system call logstate makes on files and directories (open,
append, positioned read, fsync/fdatasync, truncate, rename, unlink, directory
fsync, listing, the directory lock), behind one class, :class:`FileSystem`.
Tests substitute a subclass that records calls, injects EIO/ENOSPC or
simulates a power loss; the engine and its parts receive the instance and
never call ``os`` themselves. (Above them, the CLI's and the legacy
importer's directory walks and the demo still call ``os`` directly.)
Must never: interpret bytes (that is the byte layer: ``_format``, ``_scan``) or
decide policy (that is the engine). ``OSError`` is never swallowed here: a
failed call raises.

Files are created 0600 and directories 0700. Every descriptor is opened
close-on-exec (``O_CLOEXEC``; Python's default too, PEP 446), so an exec'd
child inherits none. A forked child inherits them all: the directory locks
this process holds are closed in the child at the fork (see
:func:`_close_locks_in_child`), so that a child outliving its parent does
not keep the parent's directory locked.

POSIX only (Linux, macOS, the BSDs): the directory lock is ``flock`` and
reads are ``pread``; without ``fcntl`` (Windows) importing this module, and
so ``import logstate``, raises ImportError saying so. Where ``fcntl`` has
``F_FULLFSYNC`` (macOS, whose ``fsync`` leaves the data in the drive's
cache), every fsync and fdatasync is an ``F_FULLFSYNC``.

Every file inside a storage directory is opened with ``O_NOFOLLOW`` and
``O_NONBLOCK`` and checked with ``fstat`` before it is used: a symbolic link,
a FIFO, a socket, a device or a directory where logstate expects one of its
files raises :class:`CorruptionError` naming the file (never a write through
a link, never an open that blocks on a FIFO). The storage directory's own
path may be a symbolic link: :meth:`FileSystem.canonical_path` resolves it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import resource
import shutil
import stat
import sys
import threading
from collections.abc import Callable
from typing import Final

from logstate._errors import CorruptionError, StorageLockedError
from logstate._filenames import LOCK_FILE_NAME

try:
    import fcntl
except ImportError:  # Windows
    raise ImportError(
        "logstate needs a POSIX system (Linux, macOS or a BSD): the fcntl module "
        "(flock, F_FULLFSYNC) is not available on this platform; Windows is not supported"
    ) from None

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "LOCK_FILE_NAME",
    "OS_FS",
    "FileSystem",
    "not_regular_error",
    "sync_functions",
]

FILE_MODE = 0o600
DIR_MODE = 0o700

# F_FULLFSYNC failing with one of these: the file system does not support it
# (SQLite falls back to fsync then too). Any other error is an I/O error.
_FULLFSYNC_UNSUPPORTED = frozenset((errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY))


def sync_functions(full_fsync: int | None) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """The (fsync, fdatasync) to use, given ``fcntl.F_FULLFSYNC`` (None: the system has none).

    On macOS ``fsync`` hands the data to the drive, which may keep it in its
    volatile cache; ``fcntl(fd, F_FULLFSYNC)`` also flushes that cache. With
    it both functions are that fcntl, falling back to ``os.fsync`` only when
    the file system does not support it (ENOTSUP, EOPNOTSUPP, EINVAL,
    ENOTTY); an I/O error is raised, never retried as a plain fsync (after a
    failed sync the state of the data is unknown). Without it: ``os.fsync``
    and ``os.fdatasync`` (``os.fsync`` where there is no fdatasync).

    Returns:
        (fsync, fdatasync), each taking a file descriptor.
    """
    if full_fsync is None:
        return os.fsync, getattr(os, "fdatasync", os.fsync)
    command = full_fsync

    def fullfsync(fd: int) -> None:
        try:
            fcntl.fcntl(fd, command)
        except OSError as exc:
            if exc.errno not in _FULLFSYNC_UNSUPPORTED:
                raise
            os.fsync(fd)

    return fullfsync, fullfsync


_fsync, _fdatasync = sync_functions(getattr(fcntl, "F_FULLFSYNC", None))
_NATIVE_FDATASYNC = _fdatasync is getattr(os, "fdatasync", None)  # (not F_FULLFSYNC)

# Descriptors of the directory locks this process holds (LOCK files, flock).
# A forked child shares their open file descriptions, hence the locks: the
# child closes its copies at the fork (closing a copy leaves the parent's
# lock in place; only flock(LOCK_UN) or closing the last copy releases it).
# _locks_guard is held while a lock descriptor is opened or closed, and
# across fork(), so that the set matches the descriptors the child inherits.
# Re-entrant: the garbage collector may run inside it (at any allocation) and
# collect the last handle of ANOTHER directory, whose finalizer closes that
# engine and unlocks it in this same thread; a plain lock deadlocked there.
# Nested, that unlock touches only its own descriptor's entry.
_held_locks: dict[int, str] = {}  # descriptor -> the locked directory
_locks_guard = threading.RLock()


def _hold_locks_guard_for_fork() -> None:
    _locks_guard.acquire()


def _release_locks_guard_after_fork() -> None:
    _locks_guard.release()


def _close_locks_in_child() -> None:
    """In a forked child: close the inherited directory lock descriptors.

    Raises:
        OSError: a close failed (after trying every descriptor); Python
            reports an exception of a fork handler and the child goes on.
    """
    fds = sorted(_held_locks)
    _held_locks.clear()
    _locks_guard.release()  # taken by this thread before the fork
    errors: list[OSError] = []
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:  # pragma: no cover - closing a valid fd does not fail on Linux
            errors.append(exc)
    if errors:  # pragma: no cover
        raise errors[0]


os.register_at_fork(
    before=_hold_locks_guard_for_fork,
    after_in_parent=_release_locks_guard_after_fork,
    after_in_child=_close_locks_in_child,
)

# Added to every open of a file inside a storage directory (see the module docstring).
_SAFE_OPEN: Final = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS: Final = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def not_regular_error(path: str, mode: int) -> CorruptionError:
    """The error for ``path`` (of ``st_mode`` ``mode``) found where a logstate file belongs."""
    kind = next((name for test, name in _KINDS if test(mode)), "of an unknown kind")
    return CorruptionError(
        path,
        0,
        f"is {kind}, not a regular file; logstate writes only regular files into a storage "
        "directory and never follows a link or reads a special file there: move it out of "
        "the directory (or put the file itself in its place) and open again",
    )


def _open_regular(path: str, flags: int, mode: int = FILE_MODE) -> int:
    """``os.open`` of a regular file inside a storage directory, never through a link.

    Opens with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO does not block the open),
    checks the result is a regular file, then clears ``O_NONBLOCK``.

    Raises:
        CorruptionError: ``path`` is a symbolic link, FIFO, socket, device or
            directory (offset 0, ``reason`` names which).
        OSError: any other failure (missing file, permissions, ...).
    """
    try:
        fd = os.open(path, flags | _SAFE_OPEN, mode)
    except OSError as exc:
        # ELOOP (a link, with O_NOFOLLOW), EISDIR, ENXIO (a socket), ...: name
        # what is in the way; anything else (ENOENT, EACCES) is raised as is.
        try:
            found = os.lstat(path).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISREG(found):
            raise
        raise not_regular_error(path, found) from None
    try:
        found = os.fstat(fd).st_mode
        if not stat.S_ISREG(found):
            raise not_regular_error(path, found)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


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

    def make_dir(self, path: str) -> None:
        """Create the directory ``path`` (mode 0700); its parent must exist (no dir fsync).

        Raises:
            FileExistsError: ``path`` exists (whatever it is: never reused).
        """
        os.mkdir(path, DIR_MODE)

    def remove_tree(self, path: str) -> None:
        """Remove the directory ``path`` and everything in it (links removed, never followed).

        For a directory logstate made itself (a restore's temporary one);
        never a storage directory.
        """
        shutil.rmtree(path)

    # ------------------------------------------------------------------ files
    def create_file(self, path: str) -> int:
        """Create a new file (it must not exist) for reading and appending.

        Raises:
            FileExistsError: ``path`` exists (a symbolic link included, even
                a dangling one: it is never followed).
        """
        # O_EXCL makes it a new regular file: no O_NONBLOCK, no fstat needed
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(path, flags, FILE_MODE)

    def open_file(self, path: str) -> int:
        """Open an existing regular file for reading and appending.

        Raises:
            CorruptionError: ``path`` is not a regular file (a symbolic link,
                a FIFO, ...: see :func:`not_regular_error`).
        """
        return _open_regular(path, os.O_RDWR | os.O_APPEND)

    def open_read_only(self, path: str) -> int:
        """Open an existing regular file for reading.

        Raises:
            CorruptionError: ``path`` is not a regular file (as :meth:`open_file`).
        """
        return _open_regular(path, os.O_RDONLY)

    def close(self, fd: int) -> None:
        os.close(fd)

    def dup(self, fd: int) -> int:
        """A new descriptor of the same open file (close-on-exec): the file stays
        readable through it after its name is unlinked or renamed over."""
        return os.dup(fd)

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

    def syncs_natively(self) -> bool:
        """Whether C may call fdatasync(2) for :meth:`fdatasync` (not overridden, as above)."""
        return type(self).fdatasync is FileSystem.fdatasync and _NATIVE_FDATASYNC

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

    def data_offset(self, fd: int, offset: int) -> int:
        """The first offset from ``offset`` on that is not inside a hole (``SEEK_DATA``).

        Bytes before it read as zeros without being stored. Returns the file's
        size when only a hole follows, and ``offset`` itself where the file
        system does not report holes.
        """
        seek_data = getattr(os, "SEEK_DATA", None)
        if seek_data is None:  # pragma: no cover - Linux and macOS have it
            return offset
        try:
            return os.lseek(fd, offset, seek_data)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after offset
                return max(offset, os.fstat(fd).st_size)
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # holes not reported here
                return offset
            raise

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
        """Data and metadata to stable storage (F_FULLFSYNC where it exists)."""
        _fsync(fd)

    def fdatasync(self, fd: int) -> None:
        """Data (and the size) to stable storage (F_FULLFSYNC where it exists)."""
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
            _fsync(fd)
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
            CorruptionError: ``LOCK`` is a symbolic link, a FIFO or another
                non-regular file (refused before anything is written to it).
        """
        lock_path = os.path.join(path, LOCK_FILE_NAME)
        with _locks_guard:  # no fork between the open and the record of the descriptor
            fd = _open_regular(lock_path, os.O_RDWR | os.O_CREAT)
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
            _held_locks[fd] = path
        return fd

    def held_lock(self, path: str) -> int | None:
        """The descriptor by which this process holds ``path``'s lock (:meth:`lock_dir`), or None.

        At most one: a second ``lock_dir`` of the same directory fails while
        the first holds it (flock locks open file descriptions).
        """
        with _locks_guard:
            held = _held_locks.copy()  # (a nested unlock may change the dict meanwhile)
        for fd, locked in held.items():
            if locked == path:
                return fd
        return None

    def unlock_dir(self, fd: int, path: str | None = None) -> None:
        """Release the lock taken by :meth:`lock_dir` (closing releases the flock).

        Args:
            path: the directory ``lock_dir`` locked; given, a descriptor that
                no longer holds that directory's lock is left alone, so that
                a release interrupted and called again closes it only once
                (never a descriptor another lock reused the number for).
        """
        with _locks_guard:
            if path is None:
                _held_locks.pop(fd, None)
            elif _held_locks.get(fd) == path:
                # nothing interruptible between forgetting and closing it: a
                # signal is raised after a call returns, and ``del`` is not one
                del _held_locks[fd]
            else:
                return  # released already
            os.close(fd)


OS_FS = FileSystem()
