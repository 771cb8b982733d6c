"""The replication methods of a storage handle: lag, waiting for it, snapshots.

Owns: :class:`ReplicationMethods`, a base of ``LocalFileStorage``:
``replication_lag()``, ``wait_replicated()`` and ``replication_snapshot()``,
each one call of the engine's replication (``_hooks.Replication``) after the
handle's checks, and the error of a storage opened without a changelog.
Must never: reach the stream itself, or hold a lock while the replication
runs (it may wait for the broker).
"""

from __future__ import annotations

from collections.abc import Callable

from logstate._handle import Handle
from logstate._hooks import Replication, ReplicationLag

__all__ = ["ReplicationMethods"]


class ReplicationMethods(Handle):
    """The replication methods of a handle (``LocalFileStorage(..., changelog=)``)."""

    def _replication(self) -> Replication:
        """The engine's replication, once this handle may be used.

        Raises:
            StorageClosedError / FencedError: the handle or its engine is closed,
                or the engine was fenced.
            ValueError: the directory was opened without a changelog.
        """
        if self._closed:
            raise self._closed_error()
        engine = self._engine
        if engine.life.closed:  # (fenced: FencedError)
            raise engine.life.closed_error()
        replication = engine.replication
        if replication is None:
            raise ValueError(f"storage {self.path} has no changelog")
        return replication

    def replication_lag(self) -> ReplicationLag:
        """What is committed here and not yet acknowledged by the stream.

        Returns:
            ReplicationLag(groups, bytes): committed records (writes,
            batches, flushes) and their bytes; (0, 0) when replicated.

        Raises:
            ValueError: the storage has no changelog.
            StorageClosedError / FencedError: closed, or fenced by another writer.
        """
        return self._replication().lag()

    def wait_replicated(self, timeout: float | None = None) -> bool:
        """Wait until everything written so far is acknowledged by the stream.

        Writes the sync mode has not made durable yet (``sync="interval"``)
        are made durable first: a record is shipped once it is durable here.

        Args:
            timeout: seconds to wait at most; None: no bound.

        Returns:
            True when the lag is zero, False when ``timeout`` passed first.

        Raises:
            ValueError: the storage has no changelog.
            StorageClosedError / FencedError: closed, or fenced by another writer.
            OSError: making the writes durable failed (as for ``flush()``).
        """
        replication = self._replication()
        engine = self._engine
        if engine.options.sync == "interval":  # (the others deliver once written or synced)
            engine.sync()
        return replication.wait_replicated(timeout)

    def replication_snapshot(
        self, progress: Callable[[str, int, int], None] | None = None
    ) -> dict[str, object]:
        """Store a snapshot of the whole directory with the stream now.

        A restore starts from the newest snapshot and replays the stream's
        records after it; older records can then be purged from the stream.

        Args:
            progress: called with (step, bytes done, bytes in all) as the
                snapshot is captured, written and uploaded (``logstate
                snapshot`` shows it on a terminal).

        Returns:
            What was stored (as the changelog describes it: name, seq, size...).

        Raises:
            ValueError: the storage has no changelog.
            StorageClosedError / FencedError: closed, or fenced by another writer.
            ReplicationError: the snapshot could not be stored.
        """
        return self._replication().snapshot(progress)
