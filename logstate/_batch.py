"""The atomic :class:`Batch` of ``LocalFileStorage.batch()``.

Owns: collecting a handle's sets, deletes and clears, each checked and
encoded when it is added, and handing them to the handle as ONE group
record at commit (:meth:`Handle._write_ops <logstate._handle.Handle._write_ops>`).
Must never: write anything before :meth:`Batch.commit`, write a batch as more
than one record (a crash must leave all of it or none), or write a batch
twice.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from logstate._checks import check_key
from logstate._format import NAME_LEN, REC_CLEAR, REC_DELETE, REC_SET
from logstate._handle import Handle
from logstate._values import encode_value

__all__ = ["Batch"]


class Batch:
    """Operations collected for one atomic group record (see LocalFileStorage.batch).

    Each call checks its arguments at once (a bad key or value raises in the
    block, and the batch is then discarded if the exception leaves the block).
    """

    def __init__(self, storage: Handle) -> None:
        self._storage = storage
        self._ops: list[tuple[int, bytes]] = []
        self._names: list[tuple[str, str]] = []  # (namespace, key) of each op
        self._expiring = False  # a set with a ttl was added
        self._done = False

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("this batch has already been committed or discarded")

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Add a set of ``key`` to ``value``; ``ttl`` as in ``LocalFileStorage.set``
        (counted from this call, not from the commit)."""
        self._check_open()
        key, raw_key = check_key(key)
        value_bytes = encode_value(value, self._storage._allow_pickle)
        storage = self._storage
        if ttl is not None:
            value_bytes = storage._expiring(value_bytes, ttl)
            self._expiring = True
        self._ops.append(
            (REC_SET, storage._ns_bytes + NAME_LEN.pack(len(raw_key)) + raw_key + value_bytes)
        )
        self._names.append((storage._ns, key))

    def remove(self, key: str) -> None:
        """Add a delete of ``key`` (no error when it is not stored)."""
        self._check_open()
        key, raw_key = check_key(key)
        storage = self._storage
        self._ops.append((REC_DELETE, storage._ns_bytes + NAME_LEN.pack(len(raw_key)) + raw_key))
        self._names.append((storage._ns, key))

    def clear(self) -> None:
        """Add a clear of the storage (keys and sub-storages), applied in order."""
        self._check_open()
        self._ops.append((REC_CLEAR, self._storage._ns_bytes))
        self._names.append((self._storage._ns, ""))

    __setitem__ = set

    def __len__(self) -> int:
        return len(self._ops)

    def commit(self) -> int:
        """Write the operations as one group; returns how many were written."""
        self._check_open()
        self._done = True
        return self._storage._write_ops(self._ops, self._names, self._expiring)

    def discard(self) -> None:
        """Drop the operations without writing anything."""
        self._done = True
        self._ops.clear()
        self._names.clear()

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
