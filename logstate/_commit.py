"""Durability: group commit and the interval syncer.

Owns: the sync turn and its per-round gates, ``synced_pos`` (how many of the
bytes appended since open are known durable), the cohort estimate and the
leader's bounded wait for it, and the interval syncer's thread and timer.
``GroupCommit`` is the reference; on the C path the engine uses
``NativeCommit``, the same protocol in C (csrc/commit.c).
Must never: write bytes; sync after a failure (fsyncgate: a failed fdatasync
may have dropped the dirty pages, so a later one that succeeds proves
nothing) or after close; move ``synced_pos`` before an fdatasync returned;
wait unboundedly for a writer, or at all when one thread commits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from _thread import get_ident
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from logstate._fs import FileSystem
from logstate._lifecycle import Lifecycle
from logstate._native import EXT
from logstate._worker import Worker

__all__ = [
    "COHORT_ROUNDS",
    "MAX_WAIT_S",
    "WAIT_FRACTION",
    "GroupCommit",
    "IntervalSyncer",
    "NativeCommit",
    "new_group_commit",
]

log = logging.getLogger("logstate")

# The cohort wait (GroupCommit._await_cohort): a leader waits at most
# WAIT_FRACTION of the last fdatasync's duration, and never more than
# MAX_WAIT_S, for the threads that committed in the last COHORT_ROUNDS syncs.
MAX_WAIT_S: Final = 200e-6
WAIT_FRACTION: Final = 0.5
COHORT_ROUNDS: Final = 4

# Under the engine's write lock: (bytes written so far, the active segment's
# descriptor), or raise why no sync may run (Lifecycle.refuse_commit).
SyncTarget = Callable[[], tuple[int, int]]


class GroupCommit:
    """Make written bytes durable; concurrent callers share one fdatasync.

    ``target``: returns, under the write lock, what a sync would cover (see
    ``SyncTarget``). ``listener``: called after each fdatasync that moved
    ``synced_pos`` forward (and at close), with the new position, in the
    sync turn and outside the write lock (``Appender.deliver``).
    ``before_sync``: called by a commit's leader, in the sync turn and outside
    the write lock, with the position its fdatasync is about to cover, just
    before that fdatasync (``Appender.offer``: a changelog with ``ack="sync"``
    sends what was written while the disk makes it durable). It must not
    block and must not raise (an exception from it is logged; the sync runs).
    ``clock``: seconds, to time each fdatasync (the bound of the next wait).
    """

    def __init__(
        self,
        fs: FileSystem,
        life: Lifecycle,
        target: SyncTarget,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._fs = fs
        self._life = life
        self._target = target
        self._clock = clock
        self.turn = threading.Lock()  # the fdatasync turn
        self._gate = threading.Lock()  # held by the leader during its sync
        self.synced_pos = 0  # bytes appended since open known durable
        self.listener: Callable[[int], None] | None = None
        self.before_sync: Callable[[int], None] | None = None
        # the cohort wait (see _await_cohort)
        self.max_wait_s = MAX_WAIT_S
        self.rounds = 0  # fdatasyncs led by commits
        self.waits = 0  # of which the leader waited for its cohort first
        self.waits_timed_out = 0  # of which the wait ended at its bound
        self._last_sync_s = 0.0  # how long the last commit's fdatasync took
        self._seen: dict[int, int] = {}  # thread -> the round of its last commit
        self._pending: dict[int, int] = {}  # thread -> end of its last commit
        self._expected = 0  # arrivals the waiting leader waits for
        self._wake: threading.Lock | None = None  # held by a waiting leader

    def commit(self, end_pos: int) -> None:
        """Make every byte up to ``end_pos`` durable; concurrent callers share one sync.

        Group commit, leader and followers: the caller that takes the sync
        turn fdatasyncs everything written so far. A caller arriving while a
        sync runs does not queue for the turn: it waits for that round's gate
        (a lock the leader holds during its sync), so that every caller the
        sync covered returns when it ends, and the first one it did not cover
        leads the next sync, which covers all of them. Before it syncs, the
        leader waits a bounded time for the rest of its cohort to arrive
        (:meth:`_await_cohort`), woken by the last arrival.

        Interrupt-safe: the turn, the gates and the wake-up are C locks
        taken with ``with`` or inside ``try`` (released whatever is raised),
        and ``synced_pos`` moves only after the fdatasync returned, to the
        position read before it. An arrival is two dict stores, each whole:
        one interrupted in between is at worst not counted, costing one
        leader its bounded wait.

        Raises:
            StorageFailedError: an earlier write or sync failed.
            StorageClosedError: the engine closed before the bytes were synced.
            OSError: this fdatasync failed (the engine then refuses writes).
        """
        if self.synced_pos >= end_pos:
            return  # covered already (a roll's or another writer's sync)
        # arrive: written up to end_pos, waiting for a sync
        me = get_ident()
        self._pending[me] = end_pos
        self._seen[me] = self.rounds
        if self._wake is not None:
            self._arrive()
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
                    cohort = len(self._seen) > 1  # (one thread: no wait, no timing)
                    if cohort:
                        self._await_cohort()
                    target, fd = self._target()
                    if self.before_sync is not None and target > self.synced_pos:
                        self._offer(target)
                    started = self._clock() if cohort else 0.0
                    try:
                        self._fs.fdatasync(fd)
                    except OSError as exc:
                        self._life.fail(exc)
                        raise
                    if cohort:
                        self._last_sync_s = self._clock() - started
                    self.rounds += 1
                    if target > self.synced_pos:
                        self.synced_pos = target
                        if self.listener is not None:
                            self.listener(target)
            return

    def _offer(self, target: int) -> None:
        """``before_sync(target)``; an exception from it is logged, never raised
        (the fdatasync and the listener, which gets every record again, still run)."""
        before_sync = self.before_sync
        assert before_sync is not None
        try:
            before_sync(target)
        except Exception as exc:
            log.error("%s: the before-sync hook raised %r", self._life.path, exc)

    def _await_cohort(self) -> None:
        """In the sync turn, before reading the target: wait for the cohort.

        With closed-loop writers and one sync at a time, the writers a sync
        wakes append during the next one and split into two cohorts, each
        sync covering about half of them. So the leader first waits for the
        writers about to append: the cohort is the threads that committed in
        the last ``COHORT_ROUNDS`` syncs, the arrivals those whose commit is
        not covered yet. It waits only when at least two threads are in the
        cohort and fewer have arrived, at most ``WAIT_FRACTION`` of the last
        sync's duration and ``max_wait_s``, and is woken by the last
        arrival (:meth:`_arrive`). Threads gone from the cohort are dropped
        from the maps (a racing arrival dropped too is counted at its next
        commit). The wake-up lock is a leaf: the leader waits on it in the
        turn and the gate, holding no engine lock; arrivals release it
        holding nothing.
        """
        low = self.rounds - COHORT_ROUNDS
        seen = self._seen
        expected = 0
        for ident, last in list(seen.items()):
            if last >= low:
                expected += 1
            else:
                seen.pop(ident, None)
                self._pending.pop(ident, None)
        bound_s = min(self._last_sync_s * WAIT_FRACTION, self.max_wait_s)
        if expected < 2 or bound_s <= 0.0:
            return
        wake = threading.Lock()
        wake.acquire()
        try:
            self._expected = expected
            self._wake = wake  # published before counting: no arrival is missed
            if self._arrived() >= expected:
                return
            self.waits += 1
            if not wake.acquire(timeout=bound_s):
                self.waits_timed_out += 1
        finally:
            self._wake = None

    def _arrived(self) -> int:
        """How many threads' commits are waiting for a sync (not covered yet)."""
        synced = self.synced_pos
        return sum(1 for end in list(self._pending.values()) if end > synced)

    def _arrive(self) -> None:
        """An arrival while a leader waits: wake it if the cohort is complete."""
        wake = self._wake
        if wake is not None and self._arrived() >= self._expected:
            with contextlib.suppress(RuntimeError):  # released already, by another arrival
                wake.release()

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
        """In a forked child: new locks (a parent thread may have held these),
        and no cohort (the parent's other threads do not exist here)."""
        self.turn = threading.Lock()
        self._gate = threading.Lock()
        self._wake = None
        self._seen = {}
        self._pending = {}

    def idle(self) -> bool:
        """Whether no round runs now (its gate open, no leader waiting for its cohort)."""
        return not self._gate.locked() and self._wake is None

    def waiting(self) -> bool:
        """Whether a leader waits for its cohort now."""
        return self._wake is not None

    def _pending_of(self, ident: int) -> int | None:
        """The end of thread ``ident``'s last commit (None: none known)."""
        return self._pending.get(ident)

    def _tracked(self) -> int:
        """How many threads the cohort count knows."""
        return len(self._seen)

    def _check(self, written_pos: int) -> None:
        assert 0 <= self.synced_pos <= written_pos, (
            f"synced position {self.synced_pos} beyond the {written_pos} bytes written"
        )
        assert self._wake is None or self.turn.locked(), "a wake-up left by no waiting leader"


class _NoBase:
    """NativeCommit's base without the C extension (it is then never made)."""


if TYPE_CHECKING:
    from logstate._cnative import CommitBase as _CommitBase
else:
    _CommitBase = _NoBase if EXT is None else EXT.CommitBase
    if EXT is not None:
        assert EXT.COMMIT_COHORT_ROUNDS == COHORT_ROUNDS, "csrc/commit.c copies COHORT_ROUNDS"


class NativeCommit(_CommitBase, GroupCommit):
    """GroupCommit with its protocol in C (csrc/commit.c, the C path).

    ``commit`` and ``advance`` are the C base's: GroupCommit's rules (the
    reference, which the C code copies), with the GIL released from a
    commit's arrival to the end of its round, so that followers wait and a
    leader waits for its cohort, reads the target and syncs without taking
    it. ``final_sync`` and ``_offer`` are GroupCommit's. ``writer`` (set by
    the engine once it made the writer): the C commit then reads the sync
    target from the writer's C fields under the write lock, unless the
    engine failed, closes or is closed (then ``target`` decides, and
    raises); it calls fdatasync(2) itself when ``fs`` syncs with it, and
    times with the monotonic clock when ``clock`` is ``time.perf_counter``.
    Otherwise (a test's file system or clock) it calls them, with the GIL.
    """

    def __init__(
        self,
        fs: FileSystem,
        life: Lifecycle,
        target: SyncTarget,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        assert EXT is not None
        self._fs = fs
        self._life = life
        self._target = target
        self._clock = clock
        self.turn = EXT.Lock()
        self.max_wait_s = MAX_WAIT_S
        self._native_sync = isinstance(fs, FileSystem) and fs.syncs_natively()
        self._native_clock = clock is time.perf_counter

    def after_fork(self) -> None:
        """In a forked child: a new turn and mutex, no round, no cohort."""
        assert EXT is not None
        self.turn = EXT.Lock()
        self._reset_after_fork()

    def idle(self) -> bool:
        """Whether no round runs now (no leader, none waiting for its cohort)."""
        leading, waiting, _tracked, _arrived = self._state()
        return not leading and not waiting

    def waiting(self) -> bool:
        """Whether a leader waits for its cohort now."""
        return self._state()[1]

    def _arrived(self) -> int:
        """How many threads' commits wait for a sync (not covered yet)."""
        return self._state()[3]

    def _tracked(self) -> int:
        """How many threads the cohort count knows."""
        return self._state()[2]

    def _check(self, written_pos: int) -> None:
        # (a round's leader waits for its cohort before it takes the turn:
        # no check ties the round to the turn while commits may run)
        assert 0 <= self.synced_pos <= written_pos, (
            f"synced position {self.synced_pos} beyond the {written_pos} bytes written"
        )


def new_group_commit(fs: FileSystem, life: Lifecycle, target: SyncTarget) -> GroupCommit:
    """The engine's group commit: the C one on the C path, else the reference."""
    if EXT is None:
        return GroupCommit(fs, life, target)
    return NativeCommit(fs, life, target)


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
