"""When to compact: the trigger, the background compactor, the writers' backlog.

Owns: ``compaction_due`` (pure: has a store of this size, with this many
live bytes, reached the trigger?), and ``CompactionScheduler``: whether a
background compaction is requested or running, the compactor thread and
its wake-up, the gate it holds while it runs, and the backlog rule that
holds writers back while a running compaction is a whole segment behind.
Must never: compact (it runs the callable the engine hands it), import the
engine, or take the engine's write lock except to clear its own flags.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from logstate._errors import FencedError, StorageClosedError, StorageFailedError
from logstate._lifecycle import Lifecycle
from logstate._options import EngineOptions
from logstate._worker import Worker

__all__ = ["CompactionScheduler", "compaction_due"]

log = logging.getLogger("logstate")


def compaction_due(total_size: int, live_size: int, options: EngineOptions) -> bool:
    """Has a store of ``total_size`` bytes, ``live_size`` of them live, reached the trigger?

    The trigger: the store holds at least ``compact_min_size`` bytes and
    dead bytes are at least ``compact_ratio`` of them.
    """
    dead = total_size - live_size
    return total_size >= options.compact_min_size and dead >= options.compact_ratio * total_size


class CompactionScheduler:
    """Requests background compactions of one engine and runs them in a thread.

    ``run``: one compaction (the engine's ``compact``); ``lock``: the
    engine's write lock (taken only to clear the flags after a run).
    ``compacting`` and ``backlog`` change under that lock.
    """

    def __init__(
        self,
        options: EngineOptions,
        life: Lifecycle,
        lock: threading.Lock,
        run: Callable[[], object],
        name: str,
    ) -> None:
        self._options = options
        self._life = life
        self._lock = lock
        self._run = run
        self.enabled = options.auto_compact
        self.compacting = False  # a background compaction is requested or running
        self.backlog = False  # writers wait: a running compaction is a segment behind
        # held while no compaction is requested: from here, so that a roll
        # before start() (at open: a v1 store's, an ingest's) may request one
        self._wake = threading.Lock()
        self._wake.acquire()
        self.gate = threading.Lock()  # held while a background compaction runs
        self.worker: Worker | None = Worker(self._loop, name) if self.enabled else None

    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()

    def due(self, total_size: int, live_size: int, early: bool = False) -> bool:
        """Is a compaction due? Under the write lock.

        ``early``: asked before the active segment is full (the writer's
        early roll): only when no compaction is running, since rolling early
        is what lets one start.
        """
        if not self.enabled or self._life.closing or (early and self.compacting):
            return False
        return compaction_due(total_size, live_size, self._options)

    def on_roll(self, total_size: int, live_size: int, segment_size: int) -> None:
        """A segment was sealed: request a compaction if due. Under the write lock.

        When a compaction is already running and the store has grown a
        whole segment past the trigger size, writers are held back
        (``backlog``) until it ends: disk use stays within trigger size +
        two segments.
        """
        if not self.due(total_size, live_size):
            return
        if self.compacting:
            self._hold_if_behind(total_size, live_size, segment_size)
            return
        self.compacting = True
        self._wake.release()  # C call: the request is made, or it was not

    def on_step(self, total_size: int, live_size: int, step: int) -> None:
        """The active segment grew another ``step`` bytes without a roll (a
        compaction is running, so it is not sealed early). Under the write lock.

        Once the store is a whole step past the trigger size, writers are held
        back (``backlog``) until the compaction ends, as at a roll: a slow
        compaction does not let the active segment grow to its full size.
        """
        if self.compacting and self.due(total_size, live_size):
            self._hold_if_behind(total_size, live_size, step)

    def _hold_if_behind(self, total_size: int, live_size: int, margin: int) -> None:
        options = self._options
        trigger_size = max(options.compact_min_size, live_size / (1 - options.compact_ratio))
        if total_size >= trigger_size + margin:
            self.backlog = True

    def hold_back(self) -> None:
        """Hold a writer back while compaction is a whole segment behind (outside the lock).

        Until the compaction ends: it holds the gate while it runs, and one
        requested but not started yet (its thread not scheduled) does not
        hold it yet, so the writer looks again after a short sleep.
        """
        while self.backlog and not self._life.closing:
            with self.gate:  # held by the compactor while it runs
                pass
            if self.backlog:
                time.sleep(0.0005)  # (requested, not started; or ended, flags not cleared yet)

    def wait_idle(self) -> None:
        """Return once no background compaction is requested or running."""
        while self.compacting and not self._life.closed:
            with self.gate:
                pass
            if self.compacting:
                time.sleep(0.001)  # requested, not started yet

    def stop(self) -> None:
        """Wake the compactor to exit (call with the engine closing; idempotent)."""
        self.backlog = False
        if self._wake.locked():  # only stop releases it once held: never twice
            self._wake.release()

    def after_fork(self) -> None:
        """In a forked child: a new gate (a parent thread may have held it); no thread."""
        self.gate = threading.Lock()
        self.worker = None

    def _check(self) -> None:
        assert not self.backlog or self.compacting, "writers held back with no compaction"
        assert self.enabled or not self.compacting, "a compaction requested with auto_compact off"

    def _loop(self) -> None:
        """The background compactor: one compaction per request, until close."""
        while True:
            self._wake.acquire()
            if self._life.closing:
                return
            try:
                with self.gate:
                    self._run()
            except (StorageClosedError, StorageFailedError, FencedError):
                pass  # closing, fenced, or an earlier failure already reported to writers
            except Exception:
                log.exception("%s: background compaction failed", self._life.path)
            finally:
                with self._lock:
                    self.compacting = False  # from here a roll requests a new one
                    self.backlog = False
