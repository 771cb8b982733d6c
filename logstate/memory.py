"""The public :class:`InMemoryStorage`: a dict at memory speed, flushed atomically.

Owns: the in-memory dict, the record of what changed since the last flush
(keys set, keys deleted), the watch on mutable values handed out,
and turning a flush into ONE group record on the backing storage (whose
replication methods it hands on).
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
import time
import weakref
from collections.abc import Callable, Iterator, MutableMapping
from types import TracebackType
from typing import Any, Final

from logstate._checks import check_key, check_ttl, encode_key
from logstate._hooks import ReplicationLag
from logstate._values import (
    TAG_EXPIRES,
    decode_value,
    encode_value,
    expiring_value,
    split_expiring,
)
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
        self,
        backing_storage: LocalFileStorage | str | os.PathLike[str] | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if clock is not None and (backing_storage is not None or not callable(clock)):
            raise TypeError(
                "clock must be a callable, and only for an InMemoryStorage without a backing "
                "storage (one with a backing storage uses that storage's clock)"
            )
        self._own_clock = clock if clock is not None else time.time
        self._clock_floor = 0.0
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
        self._expiry: dict[str, tuple[float, float]] = {}  # key -> (deadline_s, written_s)
        self._pending_expiring = False  # a pending value has an expiry time
        self._allow_pickle = True
        if backing_storage is not None:
            raw, allow = backing_storage._load_encoded()  # expired keys left out
            self._allow_pickle = allow
            for key, encoded in raw.items():
                if encoded[0] == TAG_EXPIRES:
                    deadline_s, written_s, encoded = split_expiring(encoded)
                    self._expiry[key] = (deadline_s, written_s)
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

    # ------------------------------------------------------------------ expiry
    def _now(self) -> float:
        """The clock expiry counts with: the backing storage's, or this object's own
        (never earlier than it read before, as the backing storage's)."""
        if self._backing is not None:
            return self._backing._now()
        now_s = self._own_clock()
        with self._lock:
            if now_s > self._clock_floor:
                self._clock_floor = now_s
            return self._clock_floor

    def _expired(self, key: str) -> bool:
        """True (and the key forgotten in memory) when ``key`` has expired.

        Its pending write, if any, stays: the backing storage then holds a
        value that reads as expired there too, never an older value.
        """
        expiry = self._expiry.get(key)
        if expiry is None or expiry[0] > self._now():
            return False
        with self._lock:
            if self._expiry.get(key) is expiry:
                # in this order: an interrupt in between leaves a key still
                # expiring (finished by the next call), never a watched key
                # without a value, nor a value without its expiry
                self._watched.pop(key, None)
                self._data.pop(key, None)
                del self._expiry[key]
        return True

    def _drop_expired(self) -> None:
        """Forget every expired key in memory (see :meth:`_expired`)."""
        if self._expiry:
            now_s = self._now()
            with self._lock:  # (a set in another thread changes the dict)
                expired = [k for k, (deadline_s, _w) in self._expiry.items() if deadline_s <= now_s]
            for key in expired:
                self._expired(key)

    def _encoded(self, key: str, value: Any) -> bytes:
        """``value``'s bytes for the backing storage, with ``key``'s expiry time if any."""
        encoded = encode_value(value, self._allow_pickle)
        expiry = self._expiry.get(key)
        return encoded if expiry is None else expiring_value(encoded, *expiry)

    # ------------------------------------------------------------------ writes
    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Set ``key`` to ``value`` in memory (persisted by the next flush).

        Args:
            ttl: seconds after which the key expires (the backing storage's
                clock): from then on it reads as missing here, and after a
                flush in the backing storage too. None: never (and an
                earlier ttl of the key is cleared).

        Raises:
            TypeError / ValueError: a bad key or ttl; with a backing storage,
                a value it cannot store (checked now, not at flush).
            PickleNotAllowedError: the value needs pickle and the backing
                storage has allow_pickle=False.
        """
        if type(key) is str:
            encode_key(key)
        else:
            key = check_key(key)[0]  # a str subclass is kept as exact str
        expiry = None
        if ttl is not None:
            now_s = self._now()
            expiry = (now_s + check_ttl(ttl), now_s)
        if self._backing is None:
            with self._lock:
                self._data[key] = value
                if expiry is not None:
                    self._expiry[key] = expiry
                else:
                    self._expiry.pop(key, None)
            return
        encoded = encode_value(value, self._allow_pickle)
        if expiry is not None:
            encoded = expiring_value(encoded, *expiry)
        with self._lock:
            self._data[key] = value
            self._pending[key] = encoded
            if expiry is not None:
                self._pending_expiring = True  # (before the value can be written)
                self._expiry[key] = expiry
            elif self._expiry:
                self._expiry.pop(key, None)
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
            if key not in self._data or self._expired(key):
                return False
            del self._data[key]
            self._watched.pop(key, None)
            self._expiry.pop(key, None)
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
            self._expiry.clear()

    # ------------------------------------------------------------------ reads
    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        value = self._data.get(key, _MISSING)
        if value is _MISSING or (self._expiry and self._expired(key)):
            return default
        if type(value) not in _IMMUTABLE and self._backing is not None and key not in self._watched:
            self._watch(key, value)
        return value

    def _watch(self, key: str, value: Any) -> None:
        """Start watching a mutable value being handed out: remember its bytes now."""
        with self._lock:
            if key not in self._watched and self._data.get(key, _MISSING) is value:
                self._watched[key] = self._encoded(key, value)

    def contains_key(self, key: str) -> bool:
        return key in self._data and not (self._expiry and self._expired(key))

    def has_key(self, key: str) -> bool:
        """Legacy name of :meth:`contains_key`."""
        return self.contains_key(key)

    def get_all_keys(self) -> list[str]:
        self._drop_expired()
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
        return isinstance(key, str) and self.contains_key(key)

    def __iter__(self) -> Iterator[str]:
        self._drop_expired()
        return iter(list(self._data))

    def __len__(self) -> int:
        self._drop_expired()
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
                    expiry = self._expiry.get(key)
                    if expiry is not None:
                        encoded = expiring_value(encoded, *expiry)
                    if key in changes or encoded != last:
                        changes[key] = encoded
                        rewritten[key] = encoded
            # ONE group, durable on return unless sync="none"; with nothing to
            # write, nothing is written (StorageClosedError if the backing is closed)
            # expiring: some value written has an expiry time (a pending one
            # may have expired here meanwhile: it is written all the same)
            expiring = self._pending_expiring or bool(rewritten and self._expiry)
            written = backing._write_changes(
                list(changes), list(changes.values()), checkpoint_bytes, expiring
            )
            self._pending = {}
            self._pending_expiring = False
            watched.update(rewritten)
            return written

    # ------------------------------------------------------------------ replication
    def _replicated(self) -> LocalFileStorage:
        if self._backing is None:
            raise ValueError("storage InMemoryStorage without a backing storage has no changelog")
        return self._backing

    def replication_lag(self) -> ReplicationLag:
        """The backing storage's :meth:`~LocalFileStorage.replication_lag` (what was
        flushed and not acknowledged by the stream yet; pending changes are not in it).

        Raises:
            ValueError: no backing storage, or it has no changelog.
            StorageClosedError / FencedError: as the backing storage's.
        """
        return self._replicated().replication_lag()

    def wait_replicated(self, timeout: float | None = None) -> bool:
        """The backing storage's :meth:`~LocalFileStorage.wait_replicated`: wait until
        every flush so far is acknowledged by the stream (at most ``timeout`` s).

        Returns:
            True when the lag is zero, False when ``timeout`` passed first.

        Raises:
            ValueError: no backing storage, or it has no changelog.
            StorageClosedError / FencedError: as the backing storage's.
        """
        return self._replicated().wait_replicated(timeout)

    def replication_snapshot(
        self, progress: Callable[[str, int, int], None] | None = None
    ) -> dict[str, object]:
        """The backing storage's :meth:`~LocalFileStorage.replication_snapshot`
        (of what was flushed).

        Returns:
            What was stored, as the changelog describes it.

        Raises:
            ValueError: no backing storage, or it has no changelog.
            StorageClosedError / FencedError / ReplicationError: as the backing storage's.
        """
        return self._replicated().replication_snapshot(progress)


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
