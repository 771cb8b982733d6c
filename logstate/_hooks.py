"""The seams between the engine and a replication of it: what each side calls.

Owns: the :class:`Changelog` protocol (a replication target given as
``LocalFileStorage(..., changelog=)``: it restores a directory before it is
opened and attaches to each engine opened on it), the :class:`Replication`
protocol (what ``Changelog.attach`` returns: the one replication of one open
engine, which the engine closes, abandons and forks with itself), and
:class:`ReplicationLag`.
Must never: import another logstate module (it is the bottom layer, next to
``_options``), do I/O, or hold state.

What the engine does with them (``_engine``, ``_compact``, ``storage``):

- open: ``changelog.restore_before_open(path, restore)`` before the engine
  is made, when ``restore`` is given; then ``changelog.attach(engine)``
  once per engine, after recovery and before any background thread starts.
  ``attach`` may call ``engine.ingest(records)``,
  ``engine.add_commit_listener(listener)`` and set
  ``engine.compactor.hold = replication.hold_compaction``; it must leave
  nothing running when it raises (the open then fails and releases the
  directory);
- close: the final sync and the last delivery to the commit listener
  first, then ``replication.close()``, then the files and the directory
  lock are released (whatever ``close`` raises);
- ``abandon()`` (a killed process): ``replication.abandon()``; a forked
  child: ``replication.after_fork()``;
- compaction: ``hold_compaction(seq)`` outside the write lock before any
  sealed record is rewritten; False cancels that compaction;
- another writer took over: the replication calls ``engine.fence(error)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

__all__ = ["Changelog", "Replication", "ReplicationLag"]


class ReplicationLag(NamedTuple):
    """What is committed locally and not yet acknowledged by the stream.

    Attributes:
        groups: committed records (writes, batches, flushes) not acknowledged.
        bytes: their size in bytes, as framed records.
    """

    groups: int
    bytes: int


class Replication(Protocol):
    """The replication of one open engine (made by :meth:`Changelog.attach`).

    Called from any thread, never with the engine's write lock held.
    """

    def lag(self) -> ReplicationLag:
        """What is committed and not acknowledged yet (``replication_lag()``)."""
        ...

    def wait_replicated(self, timeout: float | None) -> bool:
        """Wait until the lag is zero, at most ``timeout`` seconds (None: no bound).

        Returns:
            True when the lag is zero, False when the timeout passed first.
        """
        ...

    def snapshot(
        self, progress: Callable[[str, int, int], None] | None = None
    ) -> dict[str, object]:
        """Take a snapshot of the store into the stream's snapshot store now
        (``replication_snapshot()``); returns what was stored. ``progress``:
        called with (step, bytes done, bytes in all) as it goes."""
        ...

    def stats(self) -> dict[str, object]:
        """Figures for ``stats()["replication"]`` (acknowledged seq, lag, ...)."""
        ...

    def hold_compaction(self, seq: int) -> bool:
        """Wait (bounded) until every record up to ``seq`` is acknowledged.

        Called by a compaction after it sealed the segments it will rewrite,
        outside the engine's write lock; records seq <= ``seq`` are in them.

        Returns:
            True: compact; False: do not (not acknowledged in time).
        """
        ...

    def close(self) -> None:
        """Ship what is left (bounded by a timeout), stop the threads.

        Called once the engine's last commit was delivered, before the
        engine releases its files; called again if an interrupt stopped it.
        """
        ...

    def abandon(self) -> None:
        """Stop the threads and ship nothing (a killed process; tests)."""
        ...

    def after_fork(self) -> None:
        """In a forked child: forget the threads and connections (the parent's)."""
        ...


class Changelog(Protocol):
    """A replication target of a storage directory (``JetStreamChangelog``)."""

    def attach(self, engine: Any) -> Replication:
        """Start replicating ``engine`` (a ``logstate._engine.Engine``) just opened."""
        ...

    def restore_before_open(self, path: str, mode: str) -> None:
        """Restore directory ``path`` from the stream, as ``mode`` says
        ("if-missing", "if-behind" or "rebase"), before it is opened."""
        ...
