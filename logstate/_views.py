"""Ordered views of a storage: ``keys()``, ``items()`` and ``values()`` with ranges.

Owns: the three view classes ``LocalFileStorage.keys/items/values(start=None,
stop=None, prefix=None, reverse=False)`` return, the check of their
arguments, and the mapping of bytes keys to str keys that keeps their order
(:func:`bytes_to_key`, :func:`key_to_bytes`).
Must never: hold a lock while user code runs (each iteration asks the engine
for the keys in range once, a copy, then reads the values one by one), or
touch the index itself (the engine's ``ordered_keys`` does, under its lock).

Order: keys compare as Python ``str`` (by code point), which is the order of
their UTF-8 bytes. ``start`` is included, ``stop`` excluded (as in a
``range``), ``prefix`` keeps only the keys that begin with it; ``reverse``
walks the same keys from the last. A view is live: each iteration sees the
storage as it is when the iteration starts; a key deleted while an
``items()`` or ``values()`` iteration runs is skipped.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from typing import TYPE_CHECKING, Any, Final, Protocol

from logstate._handle import Handle

__all__ = [
    "ItemRange",
    "KeyRange",
    "OrderedViews",
    "ValueRange",
    "bytes_to_key",
    "check_range",
    "key_to_bytes",
]

_MISSING: Final[Any] = object()


def bytes_to_key(raw: bytes) -> str:
    """The str key for the bytes key ``raw`` (each byte the code point of its value).

    Reversible (:func:`key_to_bytes`) and order-preserving: bytes keys sort
    as their str keys do (both compare element by element). A byte of 0x80
    or more takes two UTF-8 bytes in the stored key, so a bytes key of n
    bytes takes up to 2n of the 4096 bytes a key may have.

    Raises:
        TypeError: ``raw`` is not bytes (or bytearray / memoryview).
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"a bytes key must be bytes, got {type(raw).__name__}")
    return bytes(raw).decode("latin-1")


def key_to_bytes(key: str) -> bytes:
    """The bytes key that :func:`bytes_to_key` mapped to ``key``.

    Raises:
        TypeError: ``key`` is not a str.
        ValueError: ``key`` has a code point above 255 (it was not made by
            :func:`bytes_to_key`).
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    try:
        return key.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"key {key[:40]!r} was not made by bytes_to_key: code point "
            f"U+{ord(key[exc.start]):04X} at {exc.start} is above U+00FF"
        ) from None


def check_range(start: object, stop: object, prefix: object, reverse: object) -> None:
    """Refuse view arguments of the wrong type.

    Raises:
        TypeError: ``start``, ``stop`` or ``prefix`` not a str or None;
            ``reverse`` not a bool.
    """
    for name, value in (("start", start), ("stop", stop), ("prefix", prefix)):
        if value is not None and not isinstance(value, str):
            hint = " (map bytes with logstate.bytes_to_key)" if isinstance(value, bytes) else ""
            raise TypeError(f"{name} must be a str key or None, got {type(value).__name__}{hint}")
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")


class Ranged(Protocol):
    """What a view needs of its storage."""

    def _ordered_keys(
        self, start: str | None, stop: str | None, prefix: str | None, reverse: bool
    ) -> list[str]: ...

    def _count_range(self, start: str | None, stop: str | None, prefix: str | None) -> int: ...

    def _stored_key(self, key: str) -> str: ...

    def get(self, key: str, default: Any = None) -> Any: ...

    def contains_key(self, key: str) -> bool: ...


class _Range:
    """The range a view covers (the part the three views share)."""

    _storage: Ranged
    _start: str | None
    _stop: str | None
    _prefix: str | None
    _reverse: bool

    def __init__(
        self,
        storage: Ranged,
        start: str | None,
        stop: str | None,
        prefix: str | None,
        reverse: bool,
    ) -> None:
        self._storage = storage
        self._start = start
        self._stop = stop
        self._prefix = prefix
        self._reverse = reverse

    def _keys(self, reverse: bool = False) -> list[str]:
        return self._storage._ordered_keys(
            self._start, self._stop, self._prefix, self._reverse is not reverse
        )

    def _covers(self, key: str) -> bool:
        """True when ``key``, as the storage stores it, is inside the range
        (whose bounds are taken the same way)."""
        stored = self._storage._stored_key
        key = stored(key)
        return (
            (self._start is None or key >= stored(self._start))
            and (self._stop is None or key < stored(self._stop))
            and (self._prefix is None or key.startswith(stored(self._prefix)))
        )

    def __len__(self) -> int:
        return self._storage._count_range(self._start, self._stop, self._prefix)

    def _describe(self) -> str:
        parts = [
            f"{name}={value!r}"
            for name, value in (
                ("start", self._start),
                ("stop", self._stop),
                ("prefix", self._prefix),
            )
            if value is not None
        ]
        if self._reverse:
            parts.append("reverse=True")
        return f"{type(self).__name__}({self._storage!r}{', ' if parts else ''}{', '.join(parts)})"

    def __repr__(self) -> str:
        return self._describe()


class KeyRange(_Range, KeysView[str]):
    """The keys of a storage in a range, in order (see the module docstring)."""

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __reversed__(self) -> Iterator[str]:
        return iter(self._keys(reverse=True))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._covers(key) and self._storage.contains_key(key)


class ItemRange(_Range, ItemsView[str, Any]):
    """The (key, value) pairs of a storage in a key range, in key order."""

    def _items(self, reverse: bool) -> Iterator[tuple[str, Any]]:
        get = self._storage.get
        for key in self._keys(reverse):
            value = get(key, _MISSING)
            if value is not _MISSING:  # not deleted since the keys were listed
                yield key, value

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self._items(False)

    def __reversed__(self) -> Iterator[tuple[str, Any]]:
        return self._items(True)

    def __contains__(self, item: object) -> bool:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            return False
        key, value = item
        if not self._covers(key):
            return False
        stored = self._storage.get(key, _MISSING)
        return stored is not _MISSING and (stored is value or stored == value)


class ValueRange(_Range, ValuesView[Any]):
    """The values of a storage in a key range, in key order."""

    def _values(self, reverse: bool) -> Iterator[Any]:
        get = self._storage.get
        for key in self._keys(reverse):
            value = get(key, _MISSING)
            if value is not _MISSING:
                yield value

    def __iter__(self) -> Iterator[Any]:
        return self._values(False)

    def __reversed__(self) -> Iterator[Any]:
        return self._values(True)

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for v in self._values(False))


class OrderedViews(Handle):
    """The ordered ``keys()``, ``items()`` and ``values()`` of a storage handle.

    The base of ``LocalFileStorage``, which provides ``get`` and ``contains_key``.
    """

    def _stored_key(self, key: str) -> str:
        """``key`` as this storage stores it (the legacy compat class lower-cases)."""
        return key

    if TYPE_CHECKING:  # provided by LocalFileStorage

        def get(self, key: str, default: Any = None) -> Any: ...

        def contains_key(self, key: str) -> bool: ...

    def keys(  # a KeysView with a range and an order
        self,
        start: str | None = None,
        stop: str | None = None,
        prefix: str | None = None,
        reverse: bool = False,
    ) -> KeyRange:
        """The keys of this storage in order: a live view (see docs/design.md, "Order").

        Keys compare by code point, which is the order of their UTF-8 bytes.
        ``start`` included, ``stop`` excluded, as in a range; ``prefix``: only
        keys beginning with it; ``reverse``: from the last. Iterating the
        storage itself (``for key in storage``) is not ordered (index order,
        which a compaction changes) and cheaper.
        After a few changes, an ordered read costs a few bisections, not a
        sort (the index keeps a sorted view of each sub-storage read so).

        Raises:
            TypeError: a bound is not a str or None, or ``reverse`` not a bool.
        """
        check_range(start, stop, prefix, reverse)
        return KeyRange(self, start, stop, prefix, reverse)

    def items(
        self,
        start: str | None = None,
        stop: str | None = None,
        prefix: str | None = None,
        reverse: bool = False,
    ) -> ItemRange:
        """(key, value) pairs in key order; the arguments are those of :meth:`keys`.

        Values are read one by one while the iteration runs; a key deleted
        meanwhile is skipped.
        """
        check_range(start, stop, prefix, reverse)
        return ItemRange(self, start, stop, prefix, reverse)

    def values(
        self,
        start: str | None = None,
        stop: str | None = None,
        prefix: str | None = None,
        reverse: bool = False,
    ) -> ValueRange:
        """Values in key order; the arguments are those of :meth:`keys`."""
        check_range(start, stop, prefix, reverse)
        return ValueRange(self, start, stop, prefix, reverse)

    def _ordered_keys(
        self, start: str | None, stop: str | None, prefix: str | None, reverse: bool
    ) -> list[str]:
        if self._closed:
            raise self._closed_error()
        return self._engine.ordered_keys(self._ns, start, stop, prefix, reverse)

    def _count_range(self, start: str | None, stop: str | None, prefix: str | None) -> int:
        if self._closed:
            raise self._closed_error()
        if start is None and stop is None and not prefix:
            return self._engine.count(self._ns)
        return self._engine.count_range(self._ns, start, stop, prefix)
