"""The engine: one open storage directory, its parts wired together.

Owns: the directory lock, the write lock, the close, and the parts, each the
owner of one kind of state (``docs/design.md`` draws them and their flows):

- ``life`` (``_lifecycle.Lifecycle``): closing, closed, failed, forked;
- ``keydir`` (``_keydir.Keydir``): the index and its live bytes;
- ``clock`` (``_clock.Clock``): the time expiry is counted with, never back;
- ``segments`` (``_segments.SegmentSet``): the open segment files;
- ``appender`` (``_append.Appender``): seq, written bytes, the record in
  flight, rolls, commit listeners;
- ``commit`` (``_commit.GroupCommit``) and ``syncer``
  (``_commit.IntervalSyncer``): what is durable;
- ``switch`` (``_switch.PendingSwitch``): a compaction's unfinished switch;
- ``scheduler`` (``_schedule.CompactionScheduler``) and ``compactor``
  (``_compact.Compactor``): when and how to compact;
- ``writer`` (``_writer.Writer``) and ``reader`` (``_reader.Reader``): the
  operations; ``ingest`` (``_ingest.Ingester``): records from a changelog
  stream;
- ``replica`` (``_replica.Replica``): the changelog's replication (also
  ``replication``), attached before the background threads start, closed
  after the final delivery; ``fence`` (every later call raises FencedError).

Open locks the directory, lets ``_recovery.recover`` rebuild the segments
and the index, and wires the parts; the handles then call the writer's and
the reader's methods directly (bound here as the engine's ``set``, ``get``
and so on: no delegation layer on the hot paths).

Locks, in the order they may be taken (never the other way):

1. ``_close_lock``: one ``close()`` at a time.
2. ``compactor.lock``: one compaction at a time (then ``_lock`` for its
   short steps: listing the plan, recording and finishing the switch; a
   replication's hold waits between them, holding this lock only).
3. ``scheduler.gate``: held by the background compactor while it runs
   (writers held back by a backlog wait on it, holding nothing).
4. ``commit.turn``: the fdatasync turn; its leader takes ``_lock`` briefly
   to read what to sync, then syncs without it. Per-round gates let
   followers wait for the round that covers them.
5. ``_lock``: the write lock. Guards every field the writer, the appender,
   the keydir, the segment set and the switch change (``seq``,
   ``written_pos``, ``in_flight``, the index, ``live_bytes``, the segments,
   their mappings and descriptors, ``scheduler.compacting`` and
   ``backlog``, ``life.closing``, ``life.failed``). Lock-free readers read
   the index and the mappings without it and verify what they read; a doubt
   is settled by reading again under it.
6. ``appender``'s delivery lock, then its offer lock: the commit and early
   listeners' calls (in the sync turn, never in ``_lock``). The one exception: a
   listener may call ``fence``, which takes ``_lock`` (no thread waits for
   this lock while holding ``_lock``, so no cycle); a replication never
   calls into the engine with ``_lock`` held.
7. ``clock``'s lock: a leaf (``Clock.now`` raises the clock floor under
   it; taken inside ``_lock`` or alone, nothing is taken inside it).

``commit.synced_pos`` moves only forward, to a position an fdatasync (or a
roll's) covered; ``life.closed`` and ``life.released`` are set by the close
(``closed`` by a fence too).

Must never: encode or decode bytes, or call the file system beyond locking
and unlocking the directory and closing what a forked child inherited.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from logstate._append import Appender, CommitListener
from logstate._clock import Clock
from logstate._commit import GroupCommit, IntervalSyncer, new_group_commit
from logstate._compact import CompactionResult, Compactor
from logstate._filenames import LOCK_FILE_NAME
from logstate._format import FORMAT_VERSION
from logstate._fs import OS_FS, FileSystem
from logstate._hooks import Replication
from logstate._ingest import Ingester
from logstate._keydir import Keydir
from logstate._lifecycle import Lifecycle
from logstate._native import EXT
from logstate._options import EngineOptions
from logstate._reader import Reader, StorageStats
from logstate._recovery import recover, save_snapshot
from logstate._replica import Replica
from logstate._report import RecoveryReport
from logstate._schedule import CompactionScheduler
from logstate._segments import SegmentSet
from logstate._switch import PendingSwitch
from logstate._writer import Writer

__all__ = ["Engine"]

log = logging.getLogger("logstate")


class Engine:
    """One open storage directory. Use ``_registry.acquire_reference`` to get one.

    ``register``: called with the engine as soon as it is open, so that an
    exception before the caller has it leaves it to be found and closed,
    not lost.

    Raises:
        StorageLockedError, CorruptionError, OSError: from opening.
    """

    appender: Appender
    commit: GroupCommit
    compactor: Compactor
    keydir: Keydir
    reader: Reader
    scheduler: CompactionScheduler
    switch: PendingSwitch
    syncer: IntervalSyncer | None
    writer: Writer

    def __init__(
        self,
        path: str,
        options: EngineOptions,
        fs: FileSystem = OS_FS,
        register: Callable[[Engine], None] | None = None,
    ) -> None:
        self.path = path
        self.options = options
        self.fs = fs
        self.life = Lifecycle(path, options.read_only)
        # Every lock is a plain C lock taken with ``with``: an exception raised
        # between two bytecodes (KeyboardInterrupt, SystemExit from a signal
        # handler) can never leave one held (threading.Condition and Event
        # are Python code that can be interrupted half-way; none is used).
        # on the C path a C lock (threading.Lock's interface), which C takes directly
        self._lock = threading.Lock() if EXT is None else EXT.Lock()
        self._close_lock = threading.Lock()
        self.refs = 0  # handles on it (changed by _registry under its lock)
        self._lock_fd: int | None = None
        self._lock_free = False  # no lock of this directory held in this process before open
        self.report = RecoveryReport()
        self.segments = SegmentSet(fs, path, options.read_only)  # (until recovery's)
        self.syncer = None
        self.replica = Replica(path, self.life, self._lock)
        try:
            self._open()
            if register is not None:
                register(self)  # (nothing interruptible after _open returned)
        except BaseException:
            try:
                self._release_after_failed_open()
            except OSError as release_error:  # the open's own error is the one raised
                log.error("%s: releasing after a failed open: %r", path, release_error)
            except BaseException:
                # a second exception (another interrupt) stopped the release
                # part-way: finish it, so that the directory is released
                try:
                    self._release_after_failed_open()
                except OSError as release_error:
                    log.error("%s: releasing after a failed open: %r", path, release_error)
                raise
            raise

    def _open(self) -> None:
        fs, path, options, life, lock = self.fs, self.path, self.options, self.life, self._lock
        if not options.read_only:
            self._lock_free = fs.held_lock(path) is None
            self._lock_fd = fs.lock_dir(path)
        recovered = recover(fs, path, options)
        self.segments = segments = recovered.segments
        self.keydir = keydir = recovered.keydir
        self.report = recovered.report
        self.switch = switch = PendingSwitch(fs, segments, keydir, life)
        self.scheduler = scheduler = CompactionScheduler(
            options, life, lock, self.compact, f"logstate-compact:{path}"
        )
        self.clock = clock = Clock(options.clock, keydir)
        self.appender = appender = Appender(
            fs, options, life, segments, keydir, switch, scheduler, recovered.seq, clock
        )
        self.commit = commit = new_group_commit(fs, life, self._sync_target)
        segments.sync_turn = commit.turn
        appender.durable_pos = commit.advance
        self.writer = writer = Writer(
            fs, options, lock, life, keydir, segments, appender, commit, scheduler, clock
        )
        self.reader = reader = Reader(fs, lock, life, keydir, segments, appender, switch, clock)
        self.compactor = Compactor(
            fs,
            life,
            lock,
            segments,
            keydir,
            switch,
            appender,
            options.zstd_level,
            writer.check_writable,
            clock.now,
        )
        # the handles call the parts directly (no delegation on the hot paths)
        self.set = writer.set
        self.set_expiring = writer.set_expiring
        self.delete = writer.delete
        self.clear = writer.clear
        self.create_namespace = writer.create_namespace
        self.drop_namespaces = writer.drop_namespaces
        self.write_group = writer.write_group
        self.write_keys = writer.write_keys
        self.sync = writer.sync
        self.get = reader.get
        self.where = reader.where
        self.contains = reader.contains
        self.load_namespace = reader.load_namespace
        self.keys = reader.keys
        self.count = reader.count
        self.ordered_keys = reader.ordered_keys
        self.count_range = reader.count_range
        self.now = clock.now
        self.child_namespaces = reader.child_namespaces
        self.checkpoint = reader.checkpoint
        self.ingest = Ingester(
            lock, keydir, appender, commit.commit, writer.check_writable, options.segment_size
        ).ingest
        self.replica.appender = appender
        self.fence = self.replica.fence
        if options.read_only:
            return
        if recovered.active_version < FORMAT_VERSION:
            # a store written by an older logstate: new records (which may hold
            # what that version cannot read) go to a segment of this version
            with lock:
                appender.roll()
        if options.changelog is not None:  # (may ingest, listen, hold compactions)
            self.replica.attach(options.changelog, self)
        # Background threads are started here, never on a write path: a
        # Thread.start() interrupted half-way can leave the new thread stuck.
        if options.sync == "interval":
            self.syncer = IntervalSyncer(
                commit, life, self._written_pos, options.sync_interval, f"logstate-sync:{path}"
            )
            self.syncer.start()
        scheduler.start()

    def _sync_target(self) -> tuple[int, int]:
        with self._lock:
            return self.appender.sync_target()

    def _written_pos(self) -> int:
        return self.appender.written_pos

    def _release_after_failed_open(self) -> None:
        """Release what a failed open took (idempotent: it may be interrupted too)."""
        self.life.begin_close()  # threads started already exit at their next wake-up
        if self.syncer is not None:
            self.syncer.stop()
        scheduler: CompactionScheduler | None = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop()
        if self._lock_fd is None and self._lock_free:
            # lock_dir took the lock, and the exception came before its
            # descriptor was stored: release it all the same
            self._lock_fd = self.fs.held_lock(self.path)
        self.replica.end(abandon=True)  # (the open failed after attach)
        self._release_resources()

    # ------------------------------------------------------------------ operations
    def add_commit_listener(
        self, listener: CommitListener, early: CommitListener | None = None
    ) -> None:
        """Call ``listener(seq, record)`` with each record committed from now on
        (see ``Appender.add_listener``: in seq order, once durable; ``early``
        offered each one just before the fdatasync that makes it durable)."""
        with self._lock:
            self.writer.check_writable()
            self.commit.listener = self.appender.deliver  # (first: does nothing without one)
            self.appender.add_listener(listener, early)  # (refuses a second one)
            self.commit.before_sync = None if early is None else self.appender.offer

    @property
    def replication(self) -> Replication | None:
        """The changelog's replication of this engine (``Changelog.attach``), or None."""
        return self.replica.replication

    def compact(self) -> CompactionResult:
        """Compact every sealed segment now (see ``_compact``); returns what it did."""
        self.life.check_not_forked()
        return self.compactor.compact()

    def stats(self) -> StorageStats:
        """Sizes in bytes: total on disk, live (pointed to by the index), dead; counts;
        the replication's figures when there is one (``Replica.with_stats``)."""
        life = self.life
        if life.forked_from is not None or life.fenced is not None:
            raise life.closed_error()
        return self.replica.with_stats(self.reader.sizes())

    def wait_for_background_compaction(self) -> None:
        """Return once no background compaction is requested or running (for tests, tools)."""
        self.scheduler.wait_idle()

    @property
    def closed(self) -> bool:
        return self.life.closed

    @property
    def failed(self) -> BaseException | None:
        return self.life.failed

    def worker_idents(self) -> list[int | None]:
        """Thread idents of this engine's background threads (interval sync, compactor)."""
        workers = [self.syncer.worker if self.syncer is not None else None]
        scheduler: CompactionScheduler | None = getattr(self, "scheduler", None)
        workers.append(scheduler.worker if scheduler is not None else None)
        return [w.ident for w in workers if w is not None]

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Stop the background threads, sync (unless failed), close files, release the lock.

        Resumable: an exception that interrupts it part-way (a
        KeyboardInterrupt, a SystemExit from a signal handler) leaves every
        step either done or not started, and the next ``close()`` (or the
        next open of this directory in this process) finishes it.

        Whatever fails, every mapping and descriptor is closed (or its close
        attempted) and the directory lock released before close returns or
        raises: the same process can open the directory again at once.

        With a replication: ``replication.close()`` after the final sync and
        the last delivery to the commit listener, before the release.

        Raises:
            OSError: the final sync failed, or else the first ``close(2)`` that
                failed (EIO on NFS or FUSE: what the file system reports at
                close); a later failure is logged.
            Exception: what ``replication.close()`` raised, once all is released
                (logged; a failed sync or close(2) is raised instead).
        """
        life = self.life
        with self._close_lock:  # a C lock: released whatever interrupts the close
            if life.released:
                return
            with self._lock:
                life.begin_close()
            try:
                self._stop_background()
                if not (life.final_synced or life.failed or life.read_only or life.closed):
                    self._final_sync()
            except OSError as failure:
                # the final sync failed: release everything all the same, and
                # raise that error (a close(2) failing too is logged)
                try:
                    self.replica.end(abandon=False)
                    with self.commit.turn, self._lock:
                        self._release_resources()
                except OSError as exc:
                    log.error("%s: closing after %r: %r", self.path, failure, exc)
                raise
            # (an interrupt above leaves the rest to the close that resumes this one)
            replication_error = self.replica.end(abandon=False)
            with self.commit.turn, self._lock:  # no commit is between its read and its sync
                self._release_resources()  # raises the first close(2) that failed
            if replication_error is not None:
                raise replication_error

    def abandon(self) -> None:
        """Leave the files as a killed process would (tests, crash tools).

        No final sync, no index snapshot: the background threads stop (the
        interval syncer without syncing; a running compaction finishes or
        stops before its rename), every descriptor is closed and the lock
        released. What was written stays in the files (the OS has it).
        """
        with self._lock:
            self.life.begin_close()
        self._stop_background(settle=False)  # a killed process repairs nothing
        self.replica.end(abandon=True)  # (its error is logged)
        with self.commit.turn, self._lock:
            self._release_resources()

    def _stop_background(self, settle: bool = True) -> None:
        """Stop the interval sync thread and the compactor; wait for a running compaction.

        Call after ``life.begin_close()``: no new compaction is requested
        then, and a running one stops before its rename (one past it finishes).
        """
        with self._lock:
            if self.syncer is not None:
                self.syncer.stop()
            self.scheduler.stop()
            if settle:
                self.appender.interrupted()  # a write or compaction switch cut short: finish it
        for worker in (self.syncer.worker if self.syncer else None, self.scheduler.worker):
            if worker is not None and worker.ident != threading.get_ident():
                worker.join()
        with self.compactor.lock:  # compact() in another thread
            pass

    def _final_sync(self) -> None:
        """close(): make every byte durable, then save the index snapshot."""
        active = self.segments.active
        written_pos = self.appender.written_pos
        self.commit.final_sync(active.fd if active else None, written_pos, notify=False)
        try:
            save_snapshot(self.fs, self.segments, self.keydir, self.appender.seq)
        except OSError as exc:  # a cache: the next open scans instead
            log.warning("%s: index snapshot not written: %r", self.path, exc)
        # last: a commit listener that raises here leaves the store whole
        # (its error is raised by close, which still releases everything)
        self.appender.deliver(written_pos)

    def _release_resources(self) -> None:
        """Close every mapping and descriptor, release the lock: each one whatever fails.

        Idempotent, for a close that an exception interrupted: the segment
        set's release is resumable, and the lock's descriptor is forgotten
        only once ``unlock_dir`` (idempotent for its directory) released it.

        Raises:
            OSError: the first close that failed, once everything is released
                (the others are logged).
        """
        self.life.mark_closed()  # first: unlocked readers check it before anything else
        failures: list[tuple[str, OSError]] = []
        done = False
        try:
            failures = self.segments.release()
            done = True
        finally:
            lock_fd = self._lock_fd
            if lock_fd is not None:
                try:
                    self.fs.unlock_dir(lock_fd, self.path)  # a resumed close may call it again
                except OSError as exc:
                    failures.append((self.path + "/" + LOCK_FILE_NAME, exc))
                self._lock_fd = None
            # an interrupt above: not released, so that a close resumes it
            self.life.released = done
        for path, error in failures[1:]:
            log.error("%s: closing %s failed too: %r", self.path, path, error)
        if failures:
            raise failures[0][1]

    def after_fork(self, owner_pid: int) -> None:
        """In a child forked from ``owner_pid``: make this inherited engine unusable.

        Writes nothing and syncs nothing (the files belong to the parent),
        takes no lock (a parent thread may have held any of them at the
        fork: the child has no such thread to release them; each part is
        given new ones), and closes the child's copies of the segment
        descriptors and mappings (the parent's stay open). The directory
        lock's descriptor is closed by ``_fs``'s fork handler; closing the
        child's copy leaves the parent's lock held. Marked closed, every
        call raises :class:`StorageForkedError`. Threads (interval sync,
        compaction) do not survive a fork.
        """
        self.life.mark_forked(owner_pid)
        lock = self._lock = threading.Lock() if EXT is None else EXT.Lock()
        self._close_lock = threading.Lock()
        self._lock_fd = None
        self.syncer = None
        self.replica.after_fork(lock)
        if not hasattr(self, "writer"):
            return  # forked while it was opening: nothing else was made
        self.appender.in_flight = None
        self.switch.pending = None
        self.writer._lock = self.reader._lock = self.scheduler._lock = lock
        self.clock.after_fork()
        self.compactor.after_fork(lock)
        self.commit.after_fork()
        self.segments.sync_turn = self.commit.turn
        self.appender.after_fork()
        self.scheduler.after_fork()
        for fd in self.segments.forget_after_fork():
            try:
                self.fs.close(fd)
            except OSError:  # pragma: no cover - close of a valid fd does not fail on Linux
                log.exception("%s: closing an inherited descriptor in a forked child", self.path)

    # ------------------------------------------------------------------ invariants
    def _check(self) -> None:
        """Assert the engine's invariants, each part's (tests call this after each step)."""
        self.life.check_not_forked()
        with self._lock:
            self.appender.interrupted()  # what an exception cut short is settled first
            self.life._check()
            self.keydir._check()
            self.switch._check()
            self.appender._check()
            self.commit._check(self.appender.written_pos)
            self.scheduler._check()
            live = self.keydir.live_bytes
            total = self.segments.total_size()
            assert self.life.closed or live <= total, (
                f"live bytes {live} exceed the {total} on disk"
            )
            if self.life.closed:
                return
            self.segments._check()
            for ns, index in self.keydir.namespaces.items():
                for key, loc in index.items():
                    value = self.reader.read_value(loc, ns, key)
                    assert len(value) >= 1
