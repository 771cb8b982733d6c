"""Durability: group commit and the interval syncer.

Owns: the sync turn and its per-round gates, ``synced_pos`` (how many of the
bytes appended since open are known durable), and the interval syncer's
thread and timer.
Must never: write bytes; sync after a failure (fsyncgate: a failed fdatasync
may have dropped the dirty pages, so a later one that succeeds proves
nothing) or after close; move ``synced_pos`` before an fdatasync returned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from logstate._fs import FileSystem
from logstate._lifecycle import Lifecycle
from logstate._worker import Worker

__all__ = ["GroupCommit", "IntervalSyncer"]

log = logging.getLogger("logstate")

# Under the engine's write lock: (bytes written so far, the active segment's
# descriptor), or raise why no sync may run (Lifecycle.refuse_commit).
SyncTarget = Callable[[], tuple[int, int]]


class GroupCommit:
    """Make written bytes durable; concurrent callers share one fdatasync.

    ``target``: returns, under the write lock, what a sync would cover (see
    ``SyncTarget``). ``listener``: called after each fdatasync that moved
    ``synced_pos`` forward (and at close), with the new position, in the
    sync turn and outside the write lock (``Appender.deliver``).
    """

    def __init__(self, fs: FileSystem, life: Lifecycle, target: SyncTarget) -> None:
        self._fs = fs
        self._life = life
        self._target = target
        self.turn = threading.Lock()  # the fdatasync turn
        self._gate = threading.Lock()  # held by the leader during its sync
        self.synced_pos = 0  # bytes appended since open known durable
        self.listener: Callable[[int], None] | None = None

    def commit(self, end_pos: int) -> None:
        """Make every byte up to ``end_pos`` durable; concurrent callers share one sync.

        Group commit, leader and followers: the caller that takes the sync
        turn fdatasyncs everything written so far. A caller arriving while a
        sync runs does not queue for the turn: it waits for that round's gate
        (a lock the leader holds during its sync), so that every caller the
        sync covered returns when it ends, and the first one it did not cover
        leads the next sync, which covers all of them.

        Interrupt-safe: the turn and the gates are C locks taken with
        ``with`` (released whatever is raised), and ``synced_pos`` moves
        only after the fdatasync returned, to the position read before it.

        Raises:
            StorageFailedError: an earlier write or sync failed.
            StorageClosedError: the engine closed before the bytes were synced.
            OSError: this fdatasync failed (the engine then refuses writes).
        """
        while self.synced_pos < end_pos:
            if self.turn.locked():
                # a sync is running: wait for the end of its round (a gate
                # already open is the previous round's: look again)
                gate = self._gate
                if gate.locked():
                    with gate:
                        pass
                else:
                    time.sleep(0)  # let the leader publish its gate
                continue
            with self.turn:
                if self.synced_pos >= end_pos:
                    return  # another writer's fdatasync covered ours
                gate = threading.Lock()
                with gate:
                    self._gate = gate
                    target, fd = self._target()
                    try:
                        self._fs.fdatasync(fd)
                    except OSError as exc:
                        self._life.fail(exc)
                        raise
                    if target > self.synced_pos:
                        self.synced_pos = target
                        if self.listener is not None:
                            self.listener(target)
            return

    def advance(self, durable_pos: int) -> None:
        """Every byte up to ``durable_pos`` is durable (a roll synced it).

        No lock: ``synced_pos`` only ever holds a position that is durable,
        and a racing commit can only store a lower one.
        """
        if self.synced_pos < durable_pos:
            self.synced_pos = durable_pos

    def final_sync(self, fd: int | None, written_pos: int, notify: bool = True) -> None:
        """close(): make every byte durable, in the sync turn (no commit after it).

        ``notify``: tell the listener here (the engine passes False and
        delivers after it saved the index snapshot, so that a listener that
        raises cannot cost the snapshot).
        """
        with self.turn:
            if fd is not None:
                try:
                    self._fs.fdatasync(fd)
                except OSError as exc:
                    self._life.fail(exc)  # writers still waiting must not sync again
                    raise
            # every byte is durable now: a writer still on its way to
            # commit must find its record covered, not sync a closed fd
            self._life.final_synced = True
            self.advance(written_pos)
            if notify and self.listener is not None:
                self.listener(written_pos)

    def after_fork(self) -> None:
        """In a forked child: new locks (a parent thread may have held these)."""
        self.turn = threading.Lock()
        self._gate = threading.Lock()

    def _check(self, written_pos: int) -> None:
        assert 0 <= self.synced_pos <= written_pos, (
            f"synced position {self.synced_pos} beyond the {written_pos} bytes written"
        )


class IntervalSyncer:
    """sync="interval": every ``interval_s`` seconds, fdatasync what was written since.

    Waits on ``_stop`` (held until :meth:`stop` releases it) with a timeout
    instead of being notified by writers: the write path does no work for
    it, and no writer can leave it stuck. A failed sync ends it (the engine
    refuses writes); a commit listener that raises in it is logged, and the
    thread keeps syncing (the record is delivered again at the next delivery).
    """

    def __init__(
        self,
        commit: GroupCommit,
        life: Lifecycle,
        written_pos: Callable[[], int],
        interval_s: float,
        name: str,
    ) -> None:
        self._commit = commit
        self._life = life
        self._written_pos = written_pos
        self._interval_s = interval_s
        self._stop = threading.Lock()
        self.worker = Worker(self._loop, name)

    def start(self) -> None:
        self._stop.acquire()  # released by stop(): wakes the thread to exit
        self.worker.start()

    def stop(self) -> None:
        """Wake the thread to exit (idempotent; call with the engine closing)."""
        if self._stop.locked():  # only stop releases it once held: never twice
            self._stop.release()

    def _loop(self) -> None:
        life = self._life
        while not self._stop.acquire(timeout=self._interval_s):
            if life.closing:
                return
            written = self._written_pos()
            if written <= self._commit.synced_pos or life.failed is not None:
                continue
            try:
                self._commit.commit(written)
            except Exception as exc:
                if life.failed is not None:
                    # Recorded in life.failed by commit: every later write raises.
                    log.error("%s: background sync failed: %r; writes are refused", life.path, exc)
                    return
                if life.closed or life.closing:
                    return  # (StorageClosedError: closed before the sync)
                # The sync succeeded and the commit listener raised: its
                # record is delivered again at the next delivery; keep syncing.
                log.error("%s: the commit listener raised %r", life.path, exc)
        self._stop.release()  # taken only to wait: give it back
