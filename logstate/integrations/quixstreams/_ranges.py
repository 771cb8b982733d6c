"""Ordered iteration over a key range of one logstate storage, and the lock wait at open.

Owns: the two places where this integration needs logstate's ordered views
and its lock wait: ``iter_range`` and ``open_storage``.
Must never: reach into logstate's private modules, or hand out a key
outside ``[start, stop)`` or not under ``prefix``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import cast

from logstate import LocalFileStorage, StorageLockedError

__all__ = ["iter_range", "open_storage"]

_STOP_POLL_S = 0.5  # how often a lock wait looks at the application's stop signal


def iter_range(
    storage: LocalFileStorage, start: str, stop: str | None, prefix: str, reverse: bool
) -> Iterator[tuple[str, bytes]]:
    """``(key, value)`` of the keys ``k`` with ``start <= k < stop`` under ``prefix``, in order.

    Values are read as the iteration reaches them; a key removed meanwhile
    is skipped (logstate's ordered view).
    """
    items = storage.items(start=start, stop=stop, prefix=prefix, reverse=reverse)
    return cast(Iterator[tuple[str, bytes]], iter(items))


def open_storage(
    path: str,
    sync: str | None,
    lock_timeout_s: float,
    stop_event: threading.Event | None = None,
) -> LocalFileStorage:
    """Open the partition directory ``path``, waiting up to ``lock_timeout_s`` for its lock.

    A partition moving between processes is still held by the process that
    had it until that one closes it (Quix's RocksDB open retries likewise).
    With a ``stop_event`` the wait is cut into slices so that shutdown ends it.

    Raises:
        StorageLockedError: another process still holds it after the wait
            (naming the holder's pid), or ``stop_event`` was set meanwhile.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    if stop_event is None:
        return LocalFileStorage(path, sync=sync, lock_timeout=lock_timeout_s)
    remaining_s = lock_timeout_s
    while True:
        slice_s = min(remaining_s, _STOP_POLL_S)
        try:
            return LocalFileStorage(path, sync=sync, lock_timeout=slice_s)
        except StorageLockedError:
            remaining_s -= slice_s
            if remaining_s <= 0 or stop_event.is_set():
                raise
