"""Drop-in replacements for the legacy ``quixstreams`` 0.5.x state classes.

Change ``from quixstreams.state import LocalFileStorage`` (or ``InMemoryStorage``,
``StateValue``, ``StateType``) to ``from logstate.compat.quixstreams import ...``
and the calls keep working, with the legacy behaviours that code may depend on:

- the file store folds every key to lower case (``is_case_sensitive`` is
  False) in every method that takes a key, and folds sub-storage names as the
  legacy store did with its sub-directories;
- ``set`` accepts a :class:`StateValue` and stores the value it wraps;
- the legacy method names (``has_key``, ``get_all_keys``, sub-storage calls)
  and ``InMemoryStorage.flush(*args, **kwargs)`` as a commit callback.

Everything else is logstate's, and the legacy defects stay fixed here too:
values round-trip with their exact type (``True`` stays ``True``, a
``bytearray`` stays a ``bytearray``, ints of any size), every write is a
checksummed record in the segment log, and a flush is one atomic record.

Owns: the key folding, the StateValue unwrapping and the legacy names, as thin
subclasses of :class:`logstate.storage.LocalFileStorage` and
:class:`logstate.memory.InMemoryStorage`; refusing to open a legacy directory
(:class:`LegacyStateDirectoryError`, detected by
:func:`logstate.compat.quix_import.find_legacy_state_file`). ``StateType`` is
:mod:`logstate.compat._legacy`'s, re-exported here.
Must never: touch files or bytes, re-implement storage behaviour (every call
ends in the core class's method), or copy a legacy defect listed in
docs/migrating-from-quix.md.
"""

from __future__ import annotations

import os
from typing import Any

from logstate import memory as _memory
from logstate import storage as _storage
from logstate._errors import LogstateError
from logstate.compat._legacy import StateType
from logstate.compat.quix_import import find_legacy_state_file

__all__ = [
    "InMemoryStorage",
    "LegacyStateDirectoryError",
    "LocalFileStorage",
    "StateType",
    "StateValue",
]


class LegacyStateDirectoryError(LogstateError):
    """The directory holds legacy Quix Streams state files (one file per key).

    logstate does not read them in place, and opening the directory anyway
    would start from an empty state beside them; they are imported once
    with ``logstate import-quix`` (see docs/migrating-from-quix.md).

    Attributes:
        path: the storage directory given.
        legacy_file: one legacy state file found below it.
    """

    def __init__(self, path: str, legacy_file: str) -> None:
        self.path = path
        self.legacy_file = legacy_file
        super().__init__(
            f"{path} holds legacy quixstreams state files (e.g. {legacy_file}), which "
            "logstate does not read in place; import them once, e.g. "
            f"`mv {path} {path}-quix && logstate import-quix {path}-quix {path}` "
            "(see docs/migrating-from-quix.md)"
        )

    def __reduce__(self) -> tuple[type[LegacyStateDirectoryError], tuple[str, str]]:
        return (type(self), (self.path, self.legacy_file))


class StateValue:
    """A value with its :class:`StateType`: the legacy ``quixstreams.state.StateValue``.

    ``storage.set(key, StateValue(v))`` stores ``v`` itself; ``get`` returns
    the plain value, as the legacy ``get`` did.

    Unlike the legacy class, the type is decided with ``bool`` before ``int``
    (``StateValue(True).type`` is ``Bool``, not ``Long``) and the value is kept
    as given (a ``bytearray`` is not turned into ``bytes``). Nothing is pickled
    here: a value that cannot be stored fails in ``set``.

    Args:
        value: any value, or another StateValue (whose type and value are copied).
    """

    __slots__ = ("_type", "_value")

    def __init__(self, value: Any) -> None:
        if isinstance(value, StateValue):
            self._type: StateType = value.type
            self._value: Any = value.value
            return
        self._value = value
        if isinstance(value, bool):
            self._type = StateType.Bool
        elif isinstance(value, int):
            self._type = StateType.Long
        elif isinstance(value, float):
            self._type = StateType.Double
        elif isinstance(value, str):
            self._type = StateType.String
        elif isinstance(value, (bytes, bytearray)):
            self._type = StateType.Binary
        else:
            self._type = StateType.Object

    @property
    def type(self) -> StateType:
        """The state type of the wrapped value."""
        return self._type

    @property
    def value(self) -> Any:
        """The wrapped value."""
        return self._value

    def __repr__(self) -> str:
        return f"StateValue({self._value!r:.80}, type={self._type.name})"


def _unwrap(value: Any) -> Any:
    """The value to store: the wrapped value of a StateValue, else ``value``."""
    return value.value if isinstance(value, StateValue) else value


def _fold(key: str) -> str:
    """A key as the legacy file store kept it: lower-cased (a non-str passes through,
    for the core to reject with its own error)."""
    return key.lower() if isinstance(key, str) else key


def _fold_bound(bound: str | None) -> str | None:
    """A view bound as the keys it compares with are stored: lower-cased."""
    return None if bound is None else bound.lower()


class _FoldingBatch(_storage.Batch):
    """A batch of a compat file storage: keys folded, StateValues unwrapped."""

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Add a set of the lower-cased ``key`` (see :meth:`Batch.set`)."""
        super().set(_fold(key), _unwrap(value), ttl)

    def remove(self, key: str) -> None:
        """Add a delete of the lower-cased ``key`` (see :meth:`Batch.remove`)."""
        super().remove(_fold(key))

    __setitem__ = set


class LocalFileStorage(_storage.LocalFileStorage):
    """The legacy file store's API on logstate's engine: keys are case-insensitive.

    Every method that takes a key folds it to lower case first, so ``"Key1"``
    and ``"key1"`` are one key and :meth:`get_all_keys` returns ``"key1"``,
    as the legacy store (one file per lower-cased key) did. Sub-storage names
    are folded the same way. ``set`` accepts a :class:`StateValue`.

    The arguments, errors, durability and atomicity are those of
    :class:`logstate.storage.LocalFileStorage` (``storage_directory=None`` is
    ``./state``; ``auto_create_dir``; the keyword-only logstate options). As
    there, opening a directory again without closing it gives another handle
    on the same open directory.

    A directory written through the case-sensitive main API may hold keys with
    upper-case letters; this class lists them but cannot read them by name.

    Raises:
        LegacyStateDirectoryError: the directory holds the legacy store's files
            (checked before anything is created in it, and only while it holds
            no logstate segment): import them with ``logstate import-quix``.
        Others: as :class:`logstate.storage.LocalFileStorage`.
    """

    def __init__(
        self,
        storage_directory: str | os.PathLike[str] | None = None,
        auto_create_dir: bool = True,
        **options: Any,
    ) -> None:
        directory = _storage.DEFAULT_DIRECTORY if storage_directory is None else storage_directory
        if isinstance(directory, (str, os.PathLike)):
            legacy_file = find_legacy_state_file(directory)
            if legacy_file is not None:
                raise LegacyStateDirectoryError(os.fspath(directory), legacy_file)
        super().__init__(storage_directory, auto_create_dir, **options)

    @property
    def is_case_sensitive(self) -> bool:
        """False: keys are lower-cased, as in the legacy file store."""
        return False

    # ------------------------------------------------------------------ ordered views
    def _ordered_keys(
        self, start: str | None, stop: str | None, prefix: str | None, reverse: bool
    ) -> list[str]:
        """The ordered views' keys, with their bounds lower-cased as every key is."""
        return super()._ordered_keys(
            _fold_bound(start), _fold_bound(stop), _fold_bound(prefix), reverse
        )

    def _count_range(self, start: str | None, stop: str | None, prefix: str | None) -> int:
        return super()._count_range(_fold_bound(start), _fold_bound(stop), _fold_bound(prefix))

    def _stored_key(self, key: str) -> str:
        return _fold(key)

    # ------------------------------------------------------------------ key/value
    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` (or the value a :class:`StateValue` wraps) under ``key.lower()``.

        ``ttl``: as :meth:`logstate.storage.LocalFileStorage.set`.

        Raises:
            TypeError / ValueError / PickleNotAllowedError / OSError: as
                :meth:`logstate.storage.LocalFileStorage.set`.
        """
        super().set(_fold(key), _unwrap(value), ttl)

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key.lower()``, or ``default``.

        Raises:
            TypeError / CorruptionError / PickleNotAllowedError: as
                :meth:`logstate.storage.LocalFileStorage.get`.
        """
        return super().get(_fold(key), default)

    def remove(self, key: str) -> None:
        """Delete ``key.lower()``; no error when it is not stored."""
        super().remove(_fold(key))

    def contains_key(self, key: str) -> bool:
        """True when ``key.lower()`` is stored. Raises TypeError for a non-str key."""
        return super().contains_key(_fold(key))

    def has_key(self, key: str) -> bool:
        """Legacy name of :meth:`contains_key`."""
        return super().contains_key(_fold(key))

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(_fold(key))

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(_fold(key))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return super().contains_key(key.lower())

    def batch(self) -> _storage.Batch:
        """An atomic batch whose ``set``/``remove`` fold keys like this storage.

        See :meth:`logstate.storage.LocalFileStorage.batch`.
        """
        if self._closed:
            raise self._closed_error()
        return _FoldingBatch(self)

    # ------------------------------------------------------------------ sub-storages
    def get_or_create_sub_storage(self, name: str) -> LocalFileStorage:
        """The sub-storage ``name.lower()`` below this one (a compat storage), created when missing.

        Raises:
            TypeError / ValueError: a bad name (see
                :func:`logstate.storage.check_sub_storage_name`).
        """
        sub = super().get_or_create_sub_storage(_fold(name))
        assert isinstance(sub, LocalFileStorage)  # _new_handle builds type(self)
        return sub

    def delete_sub_storage(self, name: str) -> bool:
        """Delete sub-storage ``name.lower()`` and everything below it (one record).

        Returns:
            True if it existed.
        """
        return super().delete_sub_storage(_fold(name))


class InMemoryStorage(_memory.InMemoryStorage):
    """The legacy in-memory store: a dict, flushed to a backing storage as one atomic record.

    ``flush(*args, **kwargs)`` ignores its arguments, so it can be assigned as a
    commit callback (``topic_consumer.on_committing = storage.flush``).
    ``set`` accepts a :class:`StateValue`.

    Keys are kept as given (``is_case_sensitive`` True), as in the legacy
    in-memory store, except over a case-insensitive backing storage (a
    compat :class:`LocalFileStorage`): there keys are lower-cased at once. The
    legacy store lower-cased them only when flushing, so a key's case changed
    across a restart and ``"A"`` and ``"a"`` overwrote each other on disk.

    Args:
        backing_storage: a :class:`LocalFileStorage` (compat or logstate's) or
            one of its sub-storages, loaded now and flushed to; None for a plain
            dict whose ``flush()`` does nothing.

    Raises:
        TypeError / CorruptionError / PickleNotAllowedError: as
            :class:`logstate.memory.InMemoryStorage`.
    """

    def __init__(self, backing_storage: _storage.LocalFileStorage | None = None) -> None:
        super().__init__(backing_storage)
        self._fold_keys = backing_storage is not None and not backing_storage.is_case_sensitive

    def _key(self, key: str) -> str:
        return _fold(key) if self._fold_keys else key

    @property
    def is_case_sensitive(self) -> bool:
        """False over a case-insensitive backing storage, else True."""
        return not self._fold_keys

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Set ``key`` to ``value`` (or the value a :class:`StateValue` wraps) in memory.

        ``ttl``: as :meth:`logstate.memory.InMemoryStorage.set`.

        Raises:
            TypeError / ValueError / PickleNotAllowedError: as
                :meth:`logstate.memory.InMemoryStorage.set`.
        """
        super().set(self._key(key), _unwrap(value), ttl)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        return super().get(self._key(key), default)

    def remove(self, key: str) -> None:
        """Delete ``key``; no error when it is missing."""
        super().remove(self._key(key))

    def contains_key(self, key: str) -> bool:
        """True when ``key`` is in the storage."""
        return super().contains_key(self._key(key))

    def has_key(self, key: str) -> bool:
        """Legacy name of :meth:`contains_key`."""
        return super().contains_key(self._key(key))

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(self._key(key))

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(self._key(key))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return super().__contains__(self._key(key))
