"""Compaction: rewrite the live records of the sealed segments into one output.

Owns: the compaction procedure and its crash-safety protocol. The output of
compacting segments ``lo..hi`` is written under a temporary name, fsynced,
renamed over segment ``hi`` (atomic), the directory fsynced, and only then
are the inputs ``lo..hi-1`` deleted (directory fsynced again). The output's
first record (REC_COMPACTED) names the range it replaces, so a crash at any
point leaves either the old segments or the output counted, never both and
never neither: open deletes inputs that an output already covers
(``_recovery``).
Must never: touch the active segment or its file descriptor (the active
segment is sealed first, and a new one takes the writes); delete an input
before the output is durable under its final name; drop a tombstone unless
the compaction covers every older segment; rewrite a record a replication
has not had acknowledged (``hold``). Every compaction covers the segments
sealed when it starts, from the oldest, so the deletes, clears and
sub-storage drops it leaves out can hide nothing older (Bitcask lost deletes
by dropping tombstones in partial merges: its issues #82 and #148). Must
never grow the store either: an output that would be larger than its inputs
is abandoned, and the inputs stay as they are.

The replication's hold (``Compactor.hold``, set by ``Changelog.attach``):
after the seal and the plan, with the write lock released, ``hold(seq)``
waits (bounded) until the stream acknowledged every record up to the seal's
``seq``, so every record the plan rewrites; False cancels the compaction
(nothing changed). The plan stays the one made at the seal: it covers the
segments sealed then, not those rolled during the wait, and its output is
the state at the seal (what was written during the wait only stays newer
where the switch finds it, as for any write during a compaction). A plan
made after the wait would drop the older value of a key overwritten in the
wait: a crash losing that unsynced overwrite would lose the key.

Writers are blocked only twice, briefly: while the live locations are listed
and while the index is switched to the output. A key written during the
compaction keeps its newer location (the switch only moves a location that
did not change meanwhile), and the output is numbered below the active
segment, so replay order stays right.

What the output holds, and how it is written: ``_rewrite``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from logstate._append import Appender
from logstate._format import SEGMENT_HEADER_SIZE
from logstate._fs import FileSystem
from logstate._keydir import Keydir
from logstate._lifecycle import Lifecycle
from logstate._rewrite import plan_compaction, write_output
from logstate._segments import Segment, SegmentSet
from logstate._switch import PendingSwitch, Switch

__all__ = ["CompactionResult", "Compactor"]

log = logging.getLogger("logstate")


@dataclass
class CompactionResult:
    """What one compaction did (all sizes in bytes).

    ``output`` None: nothing was compacted (no sealed segment, or an output
    that would have been larger than its inputs; then ``bytes_after`` equals
    ``bytes_before`` and nothing changed on disk).
    """

    inputs: list[int] = field(default_factory=list)
    output: int | None = None
    bytes_before: int = 0  # of the inputs
    bytes_after: int = 0  # of the output
    records: int = 0  # live records copied

    @property
    def reclaimed_bytes(self) -> int:
        return self.bytes_before - self.bytes_after


class Compactor:
    """Runs compactions of one engine: one at a time (``lock``), by the protocol above.

    ``check_writable``: under the write lock, raises unless the engine is
    writable (finishing an interrupted write first).
    """

    def __init__(
        self,
        fs: FileSystem,
        life: Lifecycle,
        write_lock: threading.Lock,
        segments: SegmentSet,
        keydir: Keydir,
        switch: PendingSwitch,
        appender: Appender,
        zstd_level: int,
        check_writable: Callable[[], None],
        now: Callable[[], float],
    ) -> None:
        self._fs = fs
        self._life = life
        self._write_lock = write_lock
        self._segments = segments
        self._keydir = keydir
        self._switch = switch
        self._appender = appender
        self._zstd_level = zstd_level
        self._check_writable = check_writable
        self._now = now  # the storage's clock: values expired by then are dropped
        self.lock = threading.Lock()  # held while a compaction runs
        # a replication's Replication.hold_compaction (see the module docstring)
        self.hold: Callable[[int], bool] | None = None

    def _prepare(self) -> int:
        """Under the lock: check writable, seal the active segment if it holds
        records; the sequence number the output's records carry."""
        self._check_writable()
        segments = self._segments
        segments.close_retired()
        active = segments.active
        assert active is not None
        if active.size > SEGMENT_HEADER_SIZE:
            self._appender.roll()
        return self._appender.seq

    def compact(self) -> CompactionResult:
        """Compact every sealed segment into one (see the module docstring).

        Raises:
            StorageClosedError / StorageFailedError / ReadOnlyStorageError: not writable.
            CorruptionError: a live record failed its checksum (nothing is changed).
            OSError: from the file system; before the rename nothing is changed
                (the temporary file is removed), after it the storage refuses
                writes until reopened.
        """
        fs = self._fs
        life = self._life
        path = self._segments.path
        with self.lock:
            # ---- 1. seal, and list what is live in the sealed segments
            with self._write_lock:
                seq = self._prepare()
                plan = plan_compaction(self._segments, self._keydir, seq, self._now())
            if plan is None:
                return CompactionResult()
            hold = self.hold
            if hold is not None:
                # ---- 1b. wait until the stream has every record up to seq
                # (the plan's inputs hold none after it)
                if not hold(seq):
                    log.info("%s: compaction held back: records up to %d not replicated", path, seq)
                    return CompactionResult()
                if life.closing or life.closed:  # (closed or fenced meanwhile)
                    raise life.closed_during("compaction")
            inputs = plan.inputs
            hi = inputs[-1]
            before = sum(s.size for s in plan.segments.values())
            # ---- 2. write the output under a temporary name, make it durable
            written = write_output(fs, plan, self._zstd_level, life)
            if written is None:
                log.info(
                    "%s: compacting segments %s would not make them smaller; left as they are",
                    path,
                    inputs,
                )
                return CompactionResult(bytes_before=before, bytes_after=before)
            result = CompactionResult(inputs, hi, before, written.size, len(written.moved))
            # ---- 3. install: rename over the last input; from here on a crash
            # leaves the output counted and the other inputs deleted at open.
            # Until the index switches, reads of the last input need its bytes:
            # its mapping holds them (pinned, never unmapped), its name no more.
            # The output keeps the descriptor it was written with: after the
            # rename it is the segment's. The switch is recorded before the
            # rename: an exception anywhere from here on leaves it to be
            # finished (or, if the rename did not happen, dropped) by the next
            # call under the lock, never forgotten; while the rename runs
            # (``renaming``, no lock held) no other call decides it.
            final_path = plan.segments[hi].path
            switch = self._switch
            recorded = False
            try:
                with self._write_lock:
                    if life.closing or life.closed:
                        raise life.closed_during("compaction")
                    output = Segment(hi, final_path, written.fd, written.size, plan.covers_from)
                    switch.record(
                        Switch(
                            written.moved,
                            plan.checkpoint,
                            written.new_checkpoint,
                            inputs,
                            output,
                            written.tmp_path,
                        ),
                        plan.segments[hi],
                    )
                    recorded = True
                fs.rename(written.tmp_path, final_path)
                switch.renaming = False
                fs.fsync_dir(path)
            except BaseException as exc:
                switch.renaming = False  # (first: nothing interruptible before it)
                pending = switch.pending
                if pending is not None and pending.tmp_path == written.tmp_path:
                    recorded = True  # interrupted between the record and the flag
                if not recorded:  # nothing changed: the output is dropped
                    fs.close(written.fd)
                    fs.unlink(written.tmp_path)
                    raise
                if isinstance(exc, OSError):
                    life.fail(exc)
                # the file system says whether the rename happened, and the
                # engine follows it (switch to the output, or drop it)
                with self._write_lock:
                    self._appender.interrupted()
                raise
            # ---- 4. switch the index to the output (locations that did not change)
            with self._write_lock:
                try:
                    switch.install(output)
                except BaseException:
                    self._appender.interrupted()  # an interrupt: finish the switch (idempotent)
                    raise
            # ---- 5. delete the other inputs (open would delete them after a crash)
            try:
                for number in inputs[:-1]:
                    with contextlib.suppress(FileNotFoundError):  # (an interrupted call's settle)
                        fs.unlink(plan.segments[number].path)
                fs.fsync_dir(path)
            except OSError as exc:
                log.warning("%s: could not delete compacted segments (%r); open will", path, exc)
            log.info(
                "%s: compacted segments %s into %s: %d -> %d bytes",
                path,
                inputs,
                hi,
                result.bytes_before,
                result.bytes_after,
            )
            return result

    def after_fork(self, write_lock: threading.Lock) -> None:
        """In a forked child: new locks (a parent thread may have held these)."""
        self._write_lock = write_lock
        self.lock = threading.Lock()
