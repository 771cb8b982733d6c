"""Background threads of an engine (interval sync, compactor).

Owns: starting and joining one thread so that an interrupt cannot break it.
Must never: hold engine state or a lock other than its own running lock.
"""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable

__all__ = ["Worker"]


class Worker:
    """A background thread of an engine (interval sync, compactor).

    Started with ``_thread.start_new_thread``, not ``threading.Thread.start``:
    the latter waits on a Python ``Event`` that an interrupt (Ctrl-C during an
    open) can leave with its lock in a wrong state, replacing the
    KeyboardInterrupt with a RuntimeError. ``join`` waits on a C lock the
    thread holds while it runs (a thread not started yet exits at once: it
    finds the engine closing).
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self.name = name
        self.ident: int | None = None
        self._running = threading.Lock()

    def start(self) -> None:
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        with self._running:
            self.ident = threading.get_ident()
            threading.current_thread().name = self.name
            self._target()

    def is_alive(self) -> bool:
        return self._running.locked()

    def join(self) -> None:
        """Wait for the thread to finish (at once if it has not started)."""
        with self._running:
            pass
