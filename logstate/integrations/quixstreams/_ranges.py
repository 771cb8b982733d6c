"""Ordered iteration over a key range of one logstate storage, and the lock wait at open.

Owns: the two places where this integration needs something logstate's
public API is getting (ordered range views; waiting for a directory lock):
``iter_range`` and ``open_storage``.
Must never: reach into logstate's private modules, or hand out a key
outside ``[start, stop)`` or not under ``prefix``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

from logstate import LocalFileStorage, StorageLockedError

__all__ = ["iter_range", "open_storage"]


def iter_range(
    storage: LocalFileStorage, start: str, stop: str | None, prefix: str, reverse: bool
) -> Iterator[tuple[str, bytes]]:
    """``(key, value)`` of the keys ``k`` with ``start <= k < stop`` under ``prefix``, in order.

    Values are read as the iteration reaches them; a key removed meanwhile
    is skipped.
    """
    # TODO until logstate main has ordered views: storage.items(start=, stop=, prefix=, reverse=)
    keys = [
        k
        for k in storage.get_all_keys()
        if k.startswith(prefix) and k >= start and (stop is None or k < stop)
    ]
    keys.sort(reverse=reverse)
    for key in keys:
        value = storage.get(key)
        if value is not None:
            yield key, value


def open_storage(
    path: str,
    sync: str | None,
    lock_timeout_s: float,
    stop_event: threading.Event | None = None,
) -> LocalFileStorage:
    """Open the partition directory ``path``, waiting up to ``lock_timeout_s`` for its lock.

    A partition moving between processes is still held by the process that
    had it until that one closes it (Quix's RocksDB open retries likewise).

    Raises:
        StorageLockedError: another process still holds it after the wait
            (naming the holder's pid), or ``stop_event`` was set meanwhile.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    # TODO until logstate main has LocalFileStorage(path, lock_timeout=seconds)
    deadline = time.monotonic() + lock_timeout_s
    pause_s = 0.02
    while True:
        try:
            return LocalFileStorage(path, sync=sync)
        except StorageLockedError:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or (stop_event is not None and stop_event.is_set()):
                raise
            if stop_event is not None:
                stop_event.wait(min(pause_s, remaining_s))
            else:
                time.sleep(min(pause_s, remaining_s))
            pause_s = min(pause_s * 2, 0.5)
