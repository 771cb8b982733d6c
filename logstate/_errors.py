"""The exceptions logstate raises.

Owns: every exception type of the library, each carrying the fields a caller
needs to act on it (path, offset, reason, pid; stream, partition, seq for
replication) and not only a message.
Must never: import any other logstate module (every layer imports this one).

``OSError`` raised by the operating system is never caught and renamed here:
the engine lets it propagate (after marking the storage failed where a write
or sync is involved), wrapped only as the ``__cause__`` of
:class:`StorageFailedError` on later calls.
"""

from __future__ import annotations

import errno

__all__ = [
    "CorruptionError",
    "FencedError",
    "KeyNotFoundError",
    "LogstateError",
    "OptionConflictError",
    "PickleNotAllowedError",
    "ReadOnlyStorageError",
    "ReplicationError",
    "StorageChangedError",
    "StorageClosedError",
    "StorageExistsError",
    "StorageFailedError",
    "StorageForkedError",
    "StorageLockedError",
    "SubStorageDeletedError",
    "UnsupportedFormatError",
]


class LogstateError(Exception):
    """Base class of every error logstate raises on its own account."""


class CorruptionError(LogstateError):
    """Stored bytes failed validation.

    Attributes:
        path: the file that holds the bad bytes ("" when decoding plain bytes).
        offset: byte offset of the damage within that file.
        reason: what is wrong, in words.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        where = f"{path} at offset {offset}" if path else f"offset {offset}"
        super().__init__(f"corrupt data in {where}: {reason}")

    def __reduce__(self) -> tuple[type[CorruptionError], tuple[str, int, str]]:
        return (type(self), (self.path, self.offset, self.reason))


class UnsupportedFormatError(CorruptionError):
    """A segment header has an unknown magic number or format version."""


class StorageLockedError(LogstateError):
    """Another process holds the directory's exclusive lock.

    Attributes:
        path: the storage directory.
        pid: the holder's process id, or None when it could not be read.
        waited_s: how long the open waited for the lock (``lock_timeout``), 0.0
            when it did not wait.
    """

    def __init__(self, path: str, pid: int | None, waited_s: float = 0.0) -> None:
        self.path = path
        self.pid = pid
        self.waited_s = waited_s
        holder = f"process {pid}" if pid is not None else "another process"
        waited = f" (still after waiting {waited_s:g} s)" if waited_s else ""
        super().__init__(
            f"storage directory {path} is locked by {holder}{waited} (lock file {path}/LOCK); "
            "only one process may open a storage directory at a time"
        )


class StorageChangedError(LogstateError):
    """A read-only open kept finding the directory changed under it; retry the open.

    A read-only open lists the segment files, then opens them. A compaction by
    the process that holds the directory can delete or replace a listed file
    in between; the open then starts again, a bounded number of times. This
    error means the store kept changing past those attempts (nothing is
    damaged: open it again, e.g. a moment later).

    Attributes:
        path: the storage directory.
        attempts: how many times the open was tried.
        vanished: the segment file that disappeared during the last attempt.
    """

    def __init__(self, path: str, attempts: int, vanished: str) -> None:
        self.path = path
        self.attempts = attempts
        self.vanished = vanished
        super().__init__(
            f"storage directory {path} kept changing during a read-only open: a listed "
            f"segment file vanished before it was opened in each of {attempts} attempts "
            f"(last: {vanished}; compactions by the process that holds the directory); "
            "nothing is damaged, retry the open"
        )

    def __reduce__(self) -> tuple[type[StorageChangedError], tuple[str, int, str]]:
        return (type(self), (self.path, self.attempts, self.vanished))


class StorageClosedError(LogstateError):
    """An operation was attempted on a closed storage handle."""


class StorageForkedError(StorageClosedError):
    """A storage opened by a parent process was used in a child forked from it.

    The child's copy of the open storage is closed at the fork, without
    syncing or writing anything: the directory belongs to the parent, and
    writes from a second process would corrupt the parent's view of it. A
    child that needs the storage opens the directory itself (it then gets
    :class:`StorageLockedError` while the parent has it open).

    Attributes:
        path: the storage directory.
        owner_pid: the process that opened the storage (the parent).
        pid: the forked process that tried to use it.
    """

    def __init__(self, path: str, owner_pid: int, pid: int) -> None:
        self.path = path
        self.owner_pid = owner_pid
        self.pid = pid
        super().__init__(
            f"storage {path} was opened by process {owner_pid}; process {pid} is a child "
            "forked from it and cannot use that open storage (closed in the child at the "
            "fork, nothing written); open the directory in the child instead, after the "
            "parent has closed it"
        )

    def __reduce__(self) -> tuple[type[StorageForkedError], tuple[str, int, int]]:
        return (type(self), (self.path, self.owner_pid, self.pid))


class StorageExistsError(LogstateError, FileExistsError):
    """A store was to be made at a path that already holds something (a restore's target).

    Also a :class:`FileExistsError` (``errno`` EEXIST, ``filename`` the path),
    so ``except FileExistsError`` works.

    Attributes:
        path: the target.
        reason: what is there, in words.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(errno.EEXIST, reason, path)

    def __str__(self) -> str:
        return f"cannot make a store at {self.path}: {self.reason}"

    def __reduce__(self) -> tuple[type[StorageExistsError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


class StorageFailedError(LogstateError):
    """A write or sync failed earlier; the storage refuses writes until reopened.

    After an I/O error the state of the file's unsynced bytes is unknown (see
    fsyncgate), so no later write may be acknowledged. Close every handle and
    open the directory again: recovery then decides what survived.
    """


class ReadOnlyStorageError(LogstateError):
    """A write was attempted through a storage opened with ``read_only=True``."""


class SubStorageDeletedError(LogstateError):
    """The sub-storage behind a handle was deleted (or its parent cleared)."""


class OptionConflictError(LogstateError, ValueError):
    """A directory already open in this process was opened with other options."""


class PickleNotAllowedError(LogstateError, TypeError):
    """A pickled value was about to be written or read with ``allow_pickle=False``."""


class KeyNotFoundError(LogstateError, KeyError):
    """``storage[key]`` or ``del storage[key]`` on a key that is not stored.

    Also a :class:`KeyError`, so ``except KeyError`` works as with a dict.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)

    def __str__(self) -> str:
        return f"key not found: {self.key!r}"


class ReplicationError(LogstateError):
    """Replicating a storage to (or restoring it from) its changelog stream failed.

    Attributes:
        stream: the stream's name.
        partition: the partition (the store's name in the stream).
        reason: what went wrong, in words.
        seq: the record sequence number concerned, or None.
    """

    def __init__(self, stream: str, partition: str, reason: str, seq: int | None = None) -> None:
        self.stream = stream
        self.partition = partition
        self.reason = reason
        self.seq = seq
        at = f" (seq {seq})" if seq is not None else ""
        super().__init__(f"replication of {partition!r} on stream {stream!r}: {reason}{at}")

    def __reduce__(
        self,
    ) -> tuple[type[ReplicationError], tuple[str, str, str, int | None]]:
        return (type(self), (self.stream, self.partition, self.reason, self.seq))


class FencedError(LogstateError):
    """Another writer took over this storage's partition of the stream: this one is fenced.

    Once fenced, every call on every handle of the storage raises a new
    FencedError with the same fields (reads too: this copy of the state is no
    longer the partition's); only ``close()`` works. Records committed here
    but never accepted by the stream are not in the partition's history
    (``kept_aside`` names them). Close every
    handle, then open the directory again with ``restore="rebase"`` to
    continue from the stream.

    Attributes:
        path: the storage directory.
        stream: the stream's name.
        partition: the partition.
        by_writer: the id of the writer that took over.
        kept_aside: (first, last) local seq of the records committed here but
            not in the stream, or None when there are none.
    """

    def __init__(
        self,
        path: str,
        stream: str,
        partition: str,
        by_writer: str,
        kept_aside: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self.stream = stream
        self.partition = partition
        self.by_writer = by_writer
        self.kept_aside = kept_aside
        if kept_aside is None:
            aside = "every record committed here is in the stream"
        else:
            first, last = kept_aside
            aside = (
                f"kept aside: records seq {first}..{last}, committed here but never "
                "accepted by the stream"
            )
        super().__init__(
            f"storage {path} is fenced: writer {by_writer} took over partition "
            f"{partition!r} on stream {stream!r}; every call on this storage is refused; "
            f'{aside}; close every handle and reopen it with restore="rebase"'
        )

    def __reduce__(
        self,
    ) -> tuple[type[FencedError], tuple[str, str, str, str, tuple[int, int] | None]]:
        return (
            type(self),
            (self.path, self.stream, self.partition, self.by_writer, self.kept_aside),
        )
