"""The public :class:`InMemoryStorage`: a dict at memory speed, flushed atomically.

Owns: the in-memory dict, the record of what changed since the last flush
(keys set, keys deleted), the watch on mutable values handed out,
and turning a flush into ONE group record on the backing storage.
Must never: write anything outside :meth:`InMemoryStorage.flush`, or write a
flush in more than one record (a crash must leave all of it or none).

The rule for values mutated in place (``storage["counts"]["a"] += 1``): every
value of a mutable type (anything but str, bytes, int, float, bool, None) that
the storage hands out (``get``, ``[]``, ``values()``, ``items()``) or is given
(``set``) is *watched* until the key is set to an immutable value, deleted or
cleared: its bytes are taken when it is first handed out. Each flush
re-encodes the watched values and writes those whose bytes changed since
they were last written. Immutable values are encoded once, when
set. So a flush costs the keys changed plus the mutable values in use, never
a re-serialisation of every untouched key.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator, MutableMapping
from types import TracebackType
from typing import Any, Final

from logstate._checks import check_key, encode_key
from logstate._values import decode_value, encode_value
from logstate.storage import LocalFileStorage

__all__ = ["InMemoryStorage"]

_IMMUTABLE: Final = frozenset((str, bytes, int, float, bool, type(None)))
_MISSING: Final[Any] = object()
# every live instance, for the fork handler (by id: a mapping is not hashable)
_instances: weakref.WeakValueDictionary[int, InMemoryStorage] = weakref.WeakValueDictionary()


class InMemoryStorage(MutableMapping[str, Any]):
    """A dict of state, persisted by :meth:`flush` as one atomic record group.

    Args:
        backing_storage: a :class:`LocalFileStorage` (or one of its
            sub-storages) to load from now and flush to; a directory path,
            opened here as ``LocalFileStorage(path)`` (and closed by
            :meth:`close` or the ``with`` block); None for a plain
            in-memory storage whose ``flush()`` does nothing.

    As a context manager: a clean exit from the ``with`` block flushes (no
    checkpoint), an exception leaves every change since the last flush
    unwritten (as ``Batch`` does); either way the backing storage is closed
    if this object opened it, and left open if the caller passed it.

    Raises:
        TypeError: ``backing_storage`` is not a LocalFileStorage, a path or None.
        CorruptionError / PickleNotAllowedError: from loading the backing data.
        StorageLockedError / OSError: from opening a path.

    Thread-safe: one lock guards every change and the flush, so a flush sees
    (and writes) a consistent state; reads are plain dict reads.
    """

    def __init__(
        self, backing_storage: LocalFileStorage | str | os.PathLike[str] | None = None
    ) -> None:
        self._owns_backing = False
        if isinstance(backing_storage, (str, os.PathLike)):
            backing_storage = LocalFileStorage(backing_storage)
            self._owns_backing = True
        elif backing_storage is not None and not isinstance(backing_storage, LocalFileStorage):
            raise TypeError(
                "backing_storage must be a logstate LocalFileStorage, a directory path or "
                f"None, got {type(backing_storage).__name__}"
            )
        try:
            self._load(backing_storage)
        except BaseException:
            if self._owns_backing:
                assert backing_storage is not None
                backing_storage.close()
            raise

    def _load(self, backing_storage: LocalFileStorage | None) -> None:
        self._backing = backing_storage
        self._lock = threading.RLock()
        _instances[id(self)] = self
        self._data: dict[str, Any] = {}
        self._pending: dict[str, bytes | None] = {}  # key -> encoded value, or None: deleted
        self._watched: dict[str, bytes] = {}  # mutable values handed out -> bytes last written
        self._allow_pickle = True
        if backing_storage is not None:
            raw, allow = backing_storage._load_encoded()
            self._allow_pickle = allow
            for key, encoded in raw.items():
                value = decode_value(encoded, allow)
                self._data[key] = value

    # ------------------------------------------------------------------ properties
    @property
    def backing_storage(self) -> LocalFileStorage | None:
        return self._backing

    @property
    def is_case_sensitive(self) -> bool:
        """True: keys are kept as given."""
        return True

    # ------------------------------------------------------------------ writes
    def set(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value`` in memory (persisted by the next flush).

        Raises:
            TypeError / ValueError: a bad key; with a backing storage, a value
                it cannot store (checked now, not at flush).
            PickleNotAllowedError: the value needs pickle and the backing
                storage has allow_pickle=False.
        """
        if type(key) is str:
            encode_key(key)
        else:
            key = check_key(key)[0]  # a str subclass is kept as exact str
        if self._backing is None:
            self._data[key] = value
            return
        encoded = encode_value(value, self._allow_pickle)
        with self._lock:
            self._data[key] = value
            self._pending[key] = encoded
            if type(value) in _IMMUTABLE:
                self._watched.pop(key, None)
            else:
                self._watched[key] = encoded  # re-encoded at flush: it may change before then

    def remove(self, key: str) -> None:
        """Delete ``key``; no error when it is missing."""
        self._delete(key)

    def _delete(self, key: str) -> bool:
        if type(key) is not str:
            key = check_key(key)[0]
        with self._lock:
            if key not in self._data:
                return False
            del self._data[key]
            self._watched.pop(key, None)
            if self._backing is not None:
                self._pending[key] = None
            return True

    def clear(self) -> None:
        """Remove every key (persisted by the next flush as deletes of those keys).

        Only this storage's keys: sub-storages of the backing storage, which
        an InMemoryStorage does not hold, are left alone (a clear record
        would remove them too).
        """
        with self._lock:
            if self._backing is not None:
                for key in self._data:
                    self._pending[key] = None
            self._data.clear()
            self._watched.clear()

    # ------------------------------------------------------------------ reads
    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if type(value) not in _IMMUTABLE and self._backing is not None and key not in self._watched:
            self._watch(key, value)
        return value

    def _watch(self, key: str, value: Any) -> None:
        """Start watching a mutable value being handed out: remember its bytes now."""
        with self._lock:
            if key not in self._watched and self._data.get(key, _MISSING) is value:
                self._watched[key] = encode_value(value, self._allow_pickle)

    def contains_key(self, key: str) -> bool:
        return key in self._data

    def has_key(self, key: str) -> bool:
        """Legacy name of :meth:`contains_key`."""
        return key in self._data

    def get_all_keys(self) -> list[str]:
        return list(self._data)

    # ------------------------------------------------------------------ MutableMapping
    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        if not self._delete(key):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        backing = f" backed by {self._backing!r}" if self._backing is not None else ""
        return f"<InMemoryStorage {len(self._data)} keys{backing}>"

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the backing storage if this object opened it (from a path).

        Nothing is flushed: call :meth:`flush` first. A backing storage the
        caller passed is left open (the caller closes it). Closing twice is
        allowed.
        """
        if self._owns_backing and self._backing is not None:
            self._backing.close()

    def __enter__(self) -> InMemoryStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()

    # ------------------------------------------------------------------ flush
    def pending_changes(self) -> int:
        """How many operations the next flush would write at least (watched values aside)."""
        return len(self._pending)

    def flush(self, *args: object, checkpoint: Any = _MISSING, **kwargs: object) -> int:
        """Persist every change since the last flush as ONE atomic record group.

        Positional and other keyword arguments are accepted and ignored, so
        that ``consumer.on_committing = storage.flush`` works.

        Args:
            checkpoint: a value (e.g. the input offsets) stored in the same
                group; ``backing.checkpoint`` returns it after a reopen.

        Returns:
            The number of operations written (0: nothing had changed; a
            checkpoint counts as one). Without a backing storage, always 0.

        Raises:
            OSError / StorageFailedError / StorageClosedError: the write or the
                sync failed; the changes stay pending (the backing storage
                refuses writes until it is reopened).
        """
        backing = self._backing
        if backing is None:
            return 0
        checkpoint_bytes = None
        if checkpoint is not _MISSING:
            checkpoint_bytes = encode_value(checkpoint, self._allow_pickle)
        with self._lock:
            changes = self._pending
            rewritten: dict[str, bytes] = {}
            watched = self._watched
            if watched:  # mutable values: take their bytes as of now
                changes = dict(changes)
                allow = self._allow_pickle
                for key, last in watched.items():
                    encoded = encode_value(self._data[key], allow)
                    if key in changes or encoded != last:
                        changes[key] = encoded
                        rewritten[key] = encoded
            # ONE group, durable on return unless sync="none"; with nothing to
            # write, nothing is written (StorageClosedError if the backing is closed)
            written = backing._write_changes(
                list(changes), list(changes.values()), checkpoint_bytes
            )
            self._pending = {}
            watched.update(rewritten)
            return written


def _new_locks_in_child() -> None:
    """In a forked child: a new lock for every InMemoryStorage.

    A parent thread may have held one at the fork (in a flush, say); the
    child has no such thread to release it. The dicts stay usable in the
    child; a flush to a backing storage inherited from the parent raises
    StorageForkedError.
    """
    for storage in list(_instances.values()):
        storage._lock = threading.RLock()


os.register_at_fork(after_in_child=_new_locks_in_child)
