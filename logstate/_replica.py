"""The engine's replication, as one of its parts: attached, ended once, forked, fenced.

Owns: the ``_hooks.Replication`` of one engine (or None), made by the
changelog option's ``attach`` at open; ending it exactly once (``close``
after the engine's last delivery, or ``abandon``), its errors logged and
handed back to be raised once the engine is released; its ``after_fork``;
the fence (``Engine.fence``: a ``FencedError`` given to ``Lifecycle.fail``
under the write lock, ``kept_aside`` computed there); the replication's
figures in ``stats()``.
Must never: call the replication with the write lock held, or fence an
engine other than through ``Lifecycle.fail``.
"""

from __future__ import annotations

import logging
import threading

from logstate._append import Appender
from logstate._errors import FencedError
from logstate._hooks import Changelog, Replication
from logstate._lifecycle import Lifecycle
from logstate._reader import StorageStats

__all__ = ["Replica"]

log = logging.getLogger("logstate")


class Replica:
    """The replication of the engine of directory ``path`` (``replication``: None without).

    ``lock``: the engine's write lock; ``appender``: its appender (set at open).
    """

    appender: Appender

    def __init__(self, path: str, life: Lifecycle, lock: threading.Lock) -> None:
        self.path = path
        self._life = life
        self._lock = lock
        self.replication: Replication | None = None
        self._ended = False  # its close (or abandon) returned

    def attach(self, changelog: Changelog, engine: object) -> None:
        """At open, before the background threads start: ``changelog.attach(engine)``."""
        self.replication = changelog.attach(engine)

    def end(self, abandon: bool) -> Exception | None:
        """Close (or abandon) the replication once; return its error, logged here.

        An interrupt (a BaseException) leaves it to the engine's close that
        resumes this one.
        """
        replication = self.replication
        if replication is None or self._ended:
            return None
        try:
            if abandon:
                replication.abandon()
            else:
                replication.close()
        except Exception as exc:
            self._ended = True
            log.error("%s: stopping its replication failed: %r", self.path, exc)
            return exc
        self._ended = True
        return None

    def with_stats(self, stats: StorageStats) -> StorageStats:
        """``stats`` with the replication's figures, when there is one (outside the lock)."""
        if self.replication is not None:
            stats["replication"] = self.replication.stats()
        return stats

    def fence(self, error: FencedError, acked_seq: int | None = None) -> FencedError:
        """Refuse every later call on every handle: another writer took over.

        ``Engine.fence``, the one way to fence an engine (its replication
        calls it; never with the write lock held). Under the write lock, so
        a write is done before it, or refused. From then on every call on
        every handle, reads too, raises a new FencedError with the kept
        error's fields (``Lifecycle.closed_error``); ``close`` still works
        (without a final sync) and releases the directory. A second fence
        changes nothing.

        Args:
            error: who took over (``by_writer``), on which stream and partition.
            acked_seq: the last local seq the stream acknowledged; given,
                ``kept_aside`` is set from it under the lock: (acked_seq + 1,
                the local seq), or None when nothing was left out.

        Returns:
            The FencedError kept (the first fence's).
        """
        with self._lock:
            life = self._life
            if life.fenced is None:
                if acked_seq is not None:
                    seq = self.appender.seq
                    kept = (acked_seq + 1, seq) if seq > acked_seq else None
                    e = error
                    error = FencedError(e.path, e.stream, e.partition, e.by_writer, kept)
                life.fail(error)
            assert life.fenced is not None
            return life.fenced

    def after_fork(self, lock: threading.Lock) -> None:
        """In a forked child (``lock``: the engine's new write lock): the
        replication forgets the parent's threads and connections."""
        self._lock = lock
        if self.replication is not None:
            try:
                self.replication.after_fork()
            except Exception:
                log.exception("%s: the replication's after_fork in a forked child", self.path)
