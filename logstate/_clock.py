"""The storage's clock: the time expiry is counted and read with.

Owns: reading the clock given at open (``time.time`` by default) and the
rule that it never goes back: :meth:`Clock.now` is the newest of what the
clock says and every time the store has seen (``Keydir.clock_floor``,
saved in the index snapshot and written with every expiring value), so a
clock set back never makes an expired key live again.
Must never: sleep, write, or take any lock but its own (a leaf: taken
inside the engine's write lock or alone, nothing is taken inside it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from logstate._keydir import Keydir

__all__ = ["Clock"]


class Clock:
    """The clock of one engine; the floor lives in its keydir (it is persisted with it)."""

    def __init__(self, read: Callable[[], float], keydir: Keydir) -> None:
        self._read = read
        self._keydir = keydir
        self._lock = threading.Lock()

    def now(self) -> float:
        """Seconds since the epoch, never earlier than any time this store has seen."""
        now_s = self._read()
        with self._lock:
            keydir = self._keydir
            if now_s > keydir.clock_floor:
                keydir.clock_floor = now_s
            else:
                now_s = keydir.clock_floor
        return now_s

    def after_fork(self) -> None:
        """A new lock in a forked child (a parent thread may have held this one)."""
        self._lock = threading.Lock()
