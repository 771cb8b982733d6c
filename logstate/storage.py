"""The public API: :class:`LocalFileStorage` (and, from ``_batch``, its atomic :class:`Batch`).

Owns: the public methods of a handle and their legacy-compatible names
(get/set/remove, the ``MutableMapping`` protocol, sub-storages, maintenance),
each turned into one engine call after its arguments are checked and its
value encoded; :func:`is_storage_directory`. Argument checks are in
``_checks``, a handle's lifetime and the seam for ``Batch`` and
``InMemoryStorage`` in ``_handle``, ``Batch`` in ``_batch``, the replication
methods in ``_replicated``: all importable from here as before.
Must never: touch files or bytes directly (the engine, the file system and
the byte layer do), or let a bad argument reach the engine: every check
happens before the first byte is written, so a rejected call changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Final

from logstate._batch import Batch
from logstate._checks import (
    DEFAULT_DIRECTORY,
    MAX_SUB_STORAGE_NAME_SIZE,
    check_key,
    check_lock_timeout,
    check_open_arguments,
    check_restore,
)
from logstate._checks import check_sub_storage_name as check_sub_storage_name
from logstate._checks import encode_key as encode_key
from logstate._compact import CompactionResult
from logstate._errors import CorruptionError, KeyNotFoundError
from logstate._filenames import parse_segment_file_name
from logstate._format import MAX_KEY_SIZE, MAX_NAME_SIZE
from logstate._fs import OS_FS
from logstate._hooks import Changelog
from logstate._keydir import join_namespace
from logstate._native import EXT
from logstate._reader import StorageStats
from logstate._registry import acquire_reference
from logstate._replicated import ReplicationMethods
from logstate._report import RecoveryReport
from logstate._values import (
    BYTES_PREFIX,
    TAG_BYTES,
    TAG_EXPIRES,
    decode_value,
    encode_value,
    split_expiring,
)
from logstate._verify import SnapshotComparison, compare_snapshot_with_scan
from logstate._views import OrderedViews

__all__ = [
    "DEFAULT_DIRECTORY",
    "MAX_SUB_STORAGE_NAME_SIZE",
    "Batch",
    "LocalFileStorage",
    "check_key",
]

_MISSING: Final[Any] = object()


def is_storage_directory(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding at least one logstate segment."""
    directory = os.fspath(path)
    return OS_FS.is_dir(directory) and any(
        parse_segment_file_name(name) is not None for name in OS_FS.list_dir(directory)
    )


class LocalFileStorage(OrderedViews, ReplicationMethods, MutableMapping[str, Any]):
    """A durable key-value storage in a local directory.

    Keys are non-empty ``str`` (case-sensitive); values are None, bool, int,
    float, str, bytes, bytearray or any picklable object, and come back with
    their exact type. Every write is one checksummed record appended to the
    directory's segment log (see docs/format.md); ``sync`` decides when it is
    also on stable storage (see docs/durability.md).

    Opening a directory that is already open in this process returns a new
    handle on the same engine (legacy code opens storages freely and never
    closes them); the directory is released when the last handle is closed or
    garbage-collected. Another process gets :class:`StorageLockedError`.
    ``close()``, ``closed``, ``path``, ``name`` and the ``with`` protocol are
    those of the base class, :class:`logstate._handle.Handle`; the ordered
    ``keys()``, ``items()`` and ``values()`` those of
    :class:`logstate._views.OrderedViews`; ``replication_lag()``,
    ``wait_replicated()`` and ``replication_snapshot()`` those of
    :class:`logstate._replicated.ReplicationMethods`.

    Args:
        storage_directory: the directory; None means ``./state``.
        auto_create_dir: create the directory (0700) when it does not exist.
        sync: "none" (written to the OS on return: survives a killed process),
            "interval" (plus fdatasync at most ``sync_interval`` s later; the
            default) or "always" (fdatasync before return; concurrent writers
            share one sync).
        sync_interval: seconds, for sync="interval" (default 1.0).
        segment_size: bytes at which the active segment rolls (default 64 MiB).
        recovery: "strict" (default: only a torn tail of the newest segment is
            repaired; other damage raises CorruptionError), "prefix" (as
            strict, but damage in the newest segment followed by valid records
            is cut with everything after it: the state is a prefix of the
            history; for sync="none"/"interval" after a power loss, which can
            persist unsynced pages out of order) or "salvage" (keep every valid
            record anywhere, move damaged bytes aside).
        compress_min_size: group records whose operations take at least this
            many bytes are zstd-compressed (default 1 MiB; None: never). A
            value in a compressed group costs a decompression of the whole
            group to read, until compaction rewrites it as a plain record.
        zstd_level: zstandard level for those groups (default 1).
        auto_compact: compact in the background when a segment rolls and dead
            bytes are at least ``compact_ratio`` (default 0.5) of a store of at
            least ``compact_min_size`` bytes (default 4 MiB). Default True.
        read_only: open without the lock and without changing any file (a torn
            tail is reported in ``report``, not cut); every write raises
            ReadOnlyStorageError. For inspecting a store a live process holds.
        use_snapshot: load the index snapshot written at the last close
            (``index.snapshot``) when it matches the segments, instead of
            scanning them (default True; salvage never uses it). Pass False
            for a directory from an untrusted source.
        copy_torn_tails: False cuts a torn tail at open without copying it
            aside into a ``*.torn`` file first (default True). For a full
            disk, where the copy cannot be written: ``logstate repair DIR
            --no-copy``. The cut bytes are then not kept.
        allow_pickle: False refuses to write or read pickled values (for state
            from an untrusted source: loading a pickle can run code).
        clock: the time, in seconds since the epoch, that ``set(...,
            ttl=)`` counts from and expiry is read against (default
            ``time.time``; for tests). It never reads earlier than the
            newest time the store has seen, so a clock set back never
            makes an expired key live again (see docs/durability.md).
        lock_timeout: seconds to wait for another process to release the
            directory (a partition handed over during a rebalance) before
            raising StorageLockedError; default 0: raise at once.
        changelog: replicate every committed record to this changelog (a
            ``logstate.replication.JetStreamChangelog``); attached once per
            directory open in the process. Default None: not replicated.
        restore: with a changelog, restore the directory from it before it
            is opened: "if-missing", "if-behind" or "rebase" (after a
            FencedError); default None. Skipped when the directory is open in
            this process already (that engine is shared as it is).

    Raises:
        TypeError / ValueError: a bad argument (nothing is opened).
        FileNotFoundError: missing directory and ``auto_create_dir`` is False.
        StorageLockedError: another process has the directory open (still,
            after ``lock_timeout``).
        OptionConflictError: open in this process with other explicit options
            (another changelog included).
        FencedError: open in this process by an engine another writer fenced.
        CorruptionError: damage that ``recovery`` does not allow to repair.
        ReplicationError and others: from the changelog's restore or attach
            (nothing is left open).
    """

    def __init__(
        self,
        storage_directory: str | os.PathLike[str] | None = None,
        auto_create_dir: bool = True,
        *,
        sync: str | None = None,
        sync_interval: float | None = None,
        segment_size: int | None = None,
        recovery: str | None = None,
        compress_min_size: int | object | None = _MISSING,
        zstd_level: int | None = None,
        auto_compact: bool | None = None,
        compact_ratio: float | None = None,
        compact_min_size: int | None = None,
        read_only: bool | None = None,
        use_snapshot: bool | None = None,
        copy_torn_tails: bool | None = None,
        allow_pickle: bool = True,
        lock_timeout: float | None = None,
        clock: Callable[[], float] | None = None,
        changelog: Changelog | None = None,
        restore: str | None = None,
    ) -> None:
        path = check_open_arguments(storage_directory, auto_create_dir, allow_pickle)
        lock_timeout_s = check_lock_timeout(lock_timeout)
        restore = check_restore(restore, changelog)
        given: dict[str, object] = {
            name: value
            for name, value in (
                ("sync", sync),
                ("sync_interval", sync_interval),
                ("segment_size", segment_size),
                ("recovery", recovery),
                ("zstd_level", zstd_level),
                ("auto_compact", auto_compact),
                ("compact_ratio", compact_ratio),
                ("compact_min_size", compact_min_size),
                ("read_only", read_only),
                ("use_snapshot", use_snapshot),
                ("copy_torn_tails", copy_torn_tails),
                ("clock", clock),
                ("changelog", changelog),
            )
            if value is not None
        }
        if compress_min_size is not _MISSING:
            given["compress_min_size"] = compress_min_size
        reference = acquire_reference(
            path, given, create=auto_create_dir, lock_timeout_s=lock_timeout_s, restore=restore
        )
        self._attach(reference, "", allow_pickle)

    # ------------------------------------------------------------------ properties
    @property
    def is_case_sensitive(self) -> bool:
        """True: keys are stored as given (the legacy file store lower-cased them)."""
        return True

    @property
    def checkpoint(self) -> Any:
        """The value of the last committed checkpoint (see InMemoryStorage.flush), or None."""
        if self._closed:
            raise self._closed_error()
        raw = self._engine.checkpoint()
        return None if raw is None else decode_value(raw, self._allow_pickle)

    # ------------------------------------------------------------------ key/value
    def _set_python(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (replacing any previous value).

        Args:
            ttl: seconds after which the key expires (the storage's clock,
                wall-clock time by default): from then on it reads as
                missing for ``get``, ``in``, ``len`` and every listing, and
                compaction drops it. None: it never expires (a set without
                ``ttl`` also clears an earlier one's).

        Raises:
            TypeError: key not a str; value not storable (e.g. not picklable);
                ttl not a number.
            ValueError: key empty or too long; ttl not positive or not finite.
            PickleNotAllowedError: value needs pickle and allow_pickle is False.
            StorageClosedError / StorageFailedError / SubStorageDeletedError.
            OSError: the write (or, with sync="always", the sync) failed; the
                storage then refuses writes until reopened.
        """
        if self._closed:
            raise self._closed_error()
        if type(key) is str:
            try:
                raw_key = key.encode("utf-8")
            except UnicodeEncodeError:
                raw_key = encode_key(key)  # raises with the reason
            if not raw_key or len(raw_key) > MAX_KEY_SIZE:
                encode_key(key)  # raises with the reason
        else:
            key, raw_key = check_key(key)  # a str subclass is stored as exact str
        if type(value) is bytes:  # encode_value's bytes case, inlined
            encoded = BYTES_PREFIX + value
        else:
            encoded = encode_value(value, self._allow_pickle)
        if ttl is None:
            self._engine.set(self._ns, self._ns_bytes, key, raw_key, encoded)
        else:
            encoded = self._expiring(encoded, ttl)
            self._engine.set_expiring(self._ns, self._ns_bytes, key, raw_key, encoded)

    # its errors (a missing argument, say) name it as the users call it
    _set_python.__name__, _set_python.__qualname__ = "set", "LocalFileStorage.set"
    if EXT is None:
        set = _set_python  # (on the C path: HandleBase.set, a copy of its common case)

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when there is none.

        Raises:
            TypeError: key not a str.
            CorruptionError: the stored record fails its checksum (never a wrong value).
            PickleNotAllowedError: the value is a pickle and allow_pickle is False.
        """
        if self._closed:
            raise self._closed_error()
        if type(key) is not str:
            key = check_key(key)[0]
        raw = self._engine.get(self._ns, self._ns_bytes, key)
        if raw is None:
            return default
        if type(raw) is bytes and raw[0] == TAG_BYTES:  # decode_value's bytes case, inlined
            return raw[1:]
        try:
            if raw[0] == TAG_EXPIRES:
                deadline_s, _written_s, raw = split_expiring(raw)
                if deadline_s <= self._engine.now():
                    return default
            return decode_value(raw, self._allow_pickle)
        except CorruptionError as exc:  # the record's CRC held, its value does not decode
            raise self._value_error(key, exc) from None

    def _value_error(self, key: str, exc: CorruptionError) -> CorruptionError:
        """``exc`` (from decoding ``key``'s value) with the record's file and offset."""
        path, offset = self._engine.where(self._ns, key)
        return CorruptionError(path, offset, f"value of key {key!r}: {exc.reason}")

    def decode_stored(self, key: str, encoded: bytes, allow_pickle: bool | None = None) -> Any:
        """Decode bytes from :meth:`get_encoded`; errors name the record's file and offset."""
        try:
            return decode_value(
                encoded, self._allow_pickle if allow_pickle is None else allow_pickle
            )
        except CorruptionError as exc:
            raise self._value_error(key, exc) from None

    def get_encoded(self, key: str) -> bytes | None:
        """The stored bytes of ``key``'s value (tag + data, see docs/format.md),
        CRC-verified but not decoded (no pickle is loaded), or None. For tools."""
        if self._closed:
            raise self._closed_error()
        key = check_key(key)[0]
        raw = self._engine.get(self._ns, self._ns_bytes, key)
        if raw is None or (raw[0] == TAG_EXPIRES and not self._engine.contains(self._ns, key)):
            return None  # (an expired key: missing)
        return bytes(raw)

    def remove(self, key: str) -> None:
        """Delete ``key``; no error when it is not stored."""
        self._remove(key)

    def _remove(self, key: str) -> bool:
        if self._closed:
            raise self._closed_error()
        key, raw_key = check_key(key)
        return self._engine.delete(self._ns, self._ns_bytes, key, raw_key)

    def contains_key(self, key: str) -> bool:
        """True when ``key`` is stored. Raises TypeError for a non-str key."""
        if self._closed:
            raise self._closed_error()
        if type(key) is not str:
            key = check_key(key)[0]
        return self._engine.contains(self._ns, key)

    def has_key(self, key: str) -> bool:
        """Legacy name of :meth:`contains_key`."""
        return self.contains_key(key)

    def get_all_keys(self) -> list[str]:
        """Every key of this storage (not of its sub-storages), as a new list."""
        if self._closed:
            raise self._closed_error()
        return self._engine.keys(self._ns)

    def clear(self) -> None:
        """Remove every key and every sub-storage below this one, as one atomic record."""
        if self._closed:
            raise self._closed_error()
        self._engine.clear(self._ns)

    # ------------------------------------------------------------------ MutableMapping
    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyNotFoundError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        if not self._remove(key):
            raise KeyNotFoundError(key)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return self.contains_key(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.get_all_keys())

    def __len__(self) -> int:
        if self._closed:
            raise self._closed_error()
        return self._engine.count(self._ns)

    # ------------------------------------------------------------------ batches
    def batch(self) -> Batch:
        """An atomic batch: ``with storage.batch() as b: b.set(...); b.remove(...)``.

        The operations are written as ONE group record when the block exits
        cleanly, and not at all when it raises. Reads inside the block see the
        storage as it was before the batch.
        """
        if self.closed:  # the handle, or its engine (fenced, or in a forked child)
            raise self._closed_error()
        return Batch(self)

    # ------------------------------------------------------------------ sub-storages
    def get_or_create_sub_storage(self, name: str) -> LocalFileStorage:
        """The sub-storage ``name`` below this one, created when missing.

        Raises:
            TypeError / ValueError: a bad name (see :func:`check_sub_storage_name`).
        """
        if self._closed:
            raise self._closed_error()
        ns = join_namespace(self._ns, check_sub_storage_name(name))
        if len(ns.encode("utf-8")) > MAX_NAME_SIZE:
            raise ValueError("sub-storages nested too deep: the path exceeds 65535 bytes")
        self._engine.create_namespace(ns)
        return self._new_handle(self._engine, ns, self._allow_pickle)

    def delete_sub_storage(self, name: str) -> bool:
        """Delete sub-storage ``name`` and everything below it (one record).

        Returns:
            True if it existed.
        """
        if self._closed:
            raise self._closed_error()
        ns = join_namespace(self._ns, check_sub_storage_name(name))
        return self._engine.drop_namespaces([ns]) == 1

    def delete_sub_storages(self) -> int:
        """Delete every sub-storage directly below this one (one atomic record).

        Returns:
            How many were deleted.
        """
        names = self.get_sub_storages()
        return self._engine.drop_namespaces([join_namespace(self._ns, n) for n in names])

    def get_sub_storages(self) -> list[str]:
        """Names of the sub-storages directly below this one, sorted."""
        if self._closed:
            raise self._closed_error()
        return self._engine.child_namespaces(self._ns)

    # ------------------------------------------------------------------ maintenance
    def compact(self) -> CompactionResult:
        """Reclaim the space of overwritten and deleted records now.

        Seals the active segment, rewrites the live records of every sealed
        segment into one, then deletes the old ones (crash-safe at every
        step; see docs/durability.md). Writers are blocked only briefly.

        Returns:
            What was done: inputs, output, bytes before and after.
        """
        if self._closed:
            raise self._closed_error()
        return self._engine.compact()

    def stats(self) -> StorageStats:
        """Sizes (bytes) and counts of the whole directory: segments, total,
        live and dead bytes, keys (all sub-storages), sub-storages; with a
        changelog, ``"replication"``: the replication's figures (a dict).

        Returns:
            A dict (``StorageStats``): an int for each size and count, and
            ``"replication"`` only when the storage has a changelog.
        """
        if self._closed:
            raise self._closed_error()
        return self._engine.stats()

    @property
    def report(self) -> RecoveryReport:
        """What the last open of the directory found and repaired."""
        return self._engine.report

    def compare_snapshot_with_scan(self) -> SnapshotComparison:
        """Compare what ``index.snapshot`` gives with this handle's index, a full scan.

        The handle must be open with ``read_only=True, use_snapshot=False``.
        A second, snapshot-based read-only view of the directory is opened
        and closed; every difference (sub-storage, key and location,
        checkpoint, sequence number, live bytes) is listed. ``logstate
        check`` uses it: a snapshot whose locations are in bounds but point
        at an older record of a key is found only this way.

        Raises:
            ValueError: the handle is writable or used the snapshot.
            StorageClosedError: the handle is closed.
            OSError: reading the files failed.
        """
        if self._closed:
            raise self._closed_error()
        return compare_snapshot_with_scan(self._engine)

    # ------------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Make every write so far durable now (fdatasync), whatever the sync mode."""
        if self._closed:
            raise self._closed_error()
        self._engine.sync()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        sub = f" sub-storage {self._ns!r}" if self._ns else ""
        return f"<LocalFileStorage {self._engine.path!r}{sub} ({state})>"
