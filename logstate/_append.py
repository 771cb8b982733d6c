"""The tail of the log: appending records, rolling segments, settling an interrupted append.

Owns: the sequence counter, ``written_pos`` (bytes appended since open),
the record being appended while its bookkeeping is unfinished
(``in_flight``: one record, or a run of records ingested from a changelog
stream), when the active segment rolls (its early-roll size), and the
commit listeners' queue: each committed record's seq and exact bytes,
delivered in seq order once durable by the storage's rule (ingested records
are not: the stream has them).
Must never: decide what a record means for the index beyond replaying it
(``Keydir.apply_frame``), wait for a sync while holding the write lock, or
count a byte durable before its fdatasync returned.

Every method runs under the engine's write lock unless it says otherwise.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from logstate import _format as fmt
from logstate._clock import Clock
from logstate._errors import CorruptionError, StorageFailedError
from logstate._format import SEGMENT_HEADER_SIZE
from logstate._fs import FileSystem
from logstate._keydir import Keydir
from logstate._lifecycle import Lifecycle
from logstate._native import EXT
from logstate._options import EngineOptions
from logstate._scan import ignore_damage, scan_records
from logstate._schedule import CompactionScheduler
from logstate._segments import Segment, SegmentSet
from logstate._switch import PendingSwitch

__all__ = ["Appender", "CommitListener"]

# called with (seq, exact record bytes) of each committed record, in seq order
CommitListener = Callable[[int, bytes], None]


# The C path (``_native.EXT``): a C base type holds the hot fields, so that
# the C hot paths (csrc/fast.c) read them without attribute look-ups; this
# class still owns every rule, and reads and writes them as attributes.
if TYPE_CHECKING:
    _AppendBase = object
else:
    _AppendBase = object if EXT is None else EXT.AppendBase


class Appender(_AppendBase):
    """Appends records to the active segment of ``segments``."""

    def __init__(
        self,
        fs: FileSystem,
        options: EngineOptions,
        life: Lifecycle,
        segments: SegmentSet,
        keydir: Keydir,
        switch: PendingSwitch,
        scheduler: CompactionScheduler,
        seq: int,
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._fs = fs
        self._life = life
        self._segments = segments
        self._keydir = keydir
        self._switch = switch
        self._scheduler = scheduler
        self.seq = seq
        self.written_pos = 0  # bytes appended since open (all segments)
        # odd while a C set's record is in the index before its write
        # (csrc/fast.c set_and_commit; the Python path never changes it): a
        # read of the index alone (Reader.contains, Reader.count) then
        # settles under the write lock
        self._write_seq = 0
        # (segment, offset, size, written_pos before, ingested) of the record
        # (or run of ingested records) being appended while its bookkeeping is
        # not finished: see settle
        self.in_flight: tuple[Segment, int, int, int, bool] | None = None
        self.segment_size = options.segment_size
        # Early roll: compaction covers sealed segments only, so the active
        # segment is looked at every roll_step bytes past roll_size, and
        # sealed there when the store is due for compaction: a small, hot
        # store does not fill a whole segment with dead records first.
        self.roll_step = (
            max(options.compact_min_size // 4, 64 * 1024)
            if options.auto_compact
            else options.segment_size
        )
        active = segments.active
        assert active is not None
        self.roll_size = min(self.segment_size, active.size + self.roll_step)
        self.durable_when_written = options.sync == "none"
        self.durable_pos: Callable[[int], None] = _no_durable_pos  # GroupCommit.advance
        # commit listeners (see add_listener)
        self.listener: CommitListener | None = None
        self._undelivered: deque[tuple[int, int, bytes]] = deque()  # seq, end pos, record
        self._delivered_seq = 0  # the last seq the listener returned from
        self._delivering = threading.Lock()
        # the early listener (see add_listener): records written, not offered yet
        self.early: CommitListener | None = None
        self._unoffered: deque[tuple[int, int, bytes]] = deque()  # seq, end pos, record
        self._offering = threading.Lock()

    # ------------------------------------------------------------------ append
    def append(self, record: bytes, ingested: bool = False) -> tuple[int, int]:
        """Append one whole record to the active segment (rolling first if due).

        The caller clears ``in_flight`` once its index bookkeeping is done
        too; until then an exception anywhere leaves it for :meth:`settle`.
        ``ingested``: ``record`` is a run of whole records received from a
        changelog stream (``_ingest``), never queued for the commit listener.

        Returns:
            (segment number, offset) of the record.
        """
        active = self._segments.active
        assert active is not None
        size = len(record)
        if active.size + size > self.roll_size and active.size > SEGMENT_HEADER_SIZE:
            total, live = self._segments.total_size(), self._keydir.live_bytes
            if active.size + size > self.segment_size or self._scheduler.due(
                total, live, early=True
            ):
                active = self.roll()
            else:  # look again after another step (and hold writers back if far behind)
                self._scheduler.on_step(total, live, self.roll_step)
                self.roll_size = min(self.segment_size, active.size + size + self.roll_step)
        offset = active.size
        self.in_flight = (active, offset, size, self.written_pos, ingested)
        try:
            self._fs.append(active.fd, record)
        except OSError as exc:
            self._life.fail(exc)
            raise
        active.size = offset + size
        self.written_pos += size
        return active.number, offset

    def write(self, record_type: int, body: bytes) -> tuple[int, int, int, int]:
        """Frame and append one record.

        Returns:
            (segment, offset, record size, end position)
        """
        seq = self.seq + 1
        record = fmt.encode_record(record_type, seq, body)  # (a refused record takes no seq)
        segment, offset = self.append(record)
        self.seq = seq  # (not before: a record an interrupt cut takes no seq either)
        if self.listener is not None:
            self.queue(seq, self.written_pos, record)
        return segment, offset, len(record), self.written_pos

    def roll(self) -> Segment:
        """Seal the active segment (durable) and start the next one.

        Interrupted before the switch, it leaves the old segment active and
        can run again (``SegmentSet.create`` replaces a next segment left
        half-made); the old one is sealed (mapped, its descriptor let go)
        only once it is no longer the active one.
        """
        segments = self._segments
        old = segments.active
        assert old is not None
        try:
            self._fs.fdatasync(old.fd)
            new = segments.create(old.number + 1)
        except (OSError, StorageFailedError) as exc:
            self._life.fail(exc)
            raise
        segments.segments[new.number] = new  # with the switch: nothing interruptible between
        segments.active = new
        try:
            segments.close_retired_maps()  # retired one roll ago: no reader left
            segments.seal(old)  # sealed: its bytes never change again
        except OSError as exc:
            self._life.fail(exc)
            raise
        self.roll_size = min(self.segment_size, SEGMENT_HEADER_SIZE + self.roll_step)
        self.written_pos += SEGMENT_HEADER_SIZE
        # Every byte written so far is durable (the old segment's fdatasync,
        # the new header's).
        self.durable_pos(self.written_pos)
        keydir = self._keydir
        live = keydir.live_bytes
        if keydir.expiring:  # expired values are dead bytes to the trigger too
            live -= keydir.expired_bytes(self._clock.now())
        self._scheduler.on_roll(segments.total_size(), live, self.segment_size)
        return new

    def sync_target(self) -> tuple[int, int]:
        """What a commit's fdatasync covers: (written_pos, active descriptor).

        Raises why no sync may run (after a failed write or sync never sync
        again and report success: fsyncgate; a closed engine's descriptors
        are gone, or reused).
        """
        life = self._life
        if life.failed is not None or life.closed:
            life.refuse_commit()
        active = self._segments.active
        assert active is not None
        return self.written_pos, active.fd

    # ------------------------------------------------------------------ interrupts
    def settle(self) -> None:
        """Finish, or undo, what an exception interrupted.

        A compaction switch left unfinished is finished first. An exception
        (KeyboardInterrupt, SystemExit from a signal handler) can land
        between any two bytecodes of a write: after ``write(2)`` returned but
        before the segment size, the written position and the index were
        updated. The file says which state is true: the record is whole in
        the file (the after state: its bookkeeping is redone from its bytes,
        as recovery would), or it is not there at all, or only part of it is
        (the before state: the part is cut off). A run of ingested records
        is settled the same way, as one: all of it or none. Every step is
        idempotent, so a second interrupt here leaves ``in_flight`` set and
        the next call under the lock settles it again.
        """
        if self._switch.pending is not None:
            self._switch.finish()
        pending = self.in_flight
        if pending is None:
            return
        segment, offset, size, pos_before, ingested = pending
        if self._life.failed is not None or segment is not self._segments.active:
            # A failed write (the engine refuses writes; the next open cuts
            # what it left) or a segment already sealed: nothing to redo.
            self.in_flight = None
            return
        try:
            on_disk = self._fs.file_size(segment.fd)
            if on_disk >= offset + size:
                record = self._fs.pread(segment.fd, size, offset)
                frames = list(scan_records(record, 0, ignore_damage))
                # one record written, or a run ingested: whole records, nothing else
                if not frames or sum(frame.size for frame in frames) != size:
                    raise CorruptionError(
                        segment.path, offset, "interrupted record reads back wrong"
                    )
                for frame in frames:
                    self._keydir.apply_frame(record, frame, segment.number, -offset)
                segment.size = offset + size
                self.written_pos = pos_before + size
                if frames[-1].seq > self.seq:  # an ingested run: its seqs are the local ones
                    self.seq = frames[-1].seq
                if self.listener is not None and not ingested and not self._queued(frames[0].seq):
                    self.queue(frames[0].seq, self.written_pos, record)
            else:
                if on_disk > offset:
                    self._fs.truncate(segment.fd, offset)  # a part of an unacknowledged record
                segment.size = offset
                self.written_pos = pos_before
        except (OSError, CorruptionError) as exc:
            self._life.fail(exc)  # the file cannot be trusted to say: refuse writes until reopen
            self.in_flight = None
            raise
        self._keydir.recount()
        self.in_flight = None

    def interrupted(self) -> None:
        """In an ``except BaseException``: settle what the exception cut short."""
        if self.in_flight is not None or self._switch.pending is not None:
            self.settle()

    # ------------------------------------------------------------------ listeners
    def add_listener(self, listener: CommitListener, early: CommitListener | None = None) -> None:
        """Call ``listener(seq, record)`` for each record committed from now on.

        In seq order, exactly once each, once the record is durable by the
        storage's own rule: after its fdatasync with sync="always" or
        "interval" (or a roll's, or close's), as soon as it is written with
        sync="none". Called outside the write lock, from the thread whose
        sync made it durable. A listener that raises gets the same record
        again at the next delivery (the exception propagates to that call);
        so does one interrupted (KeyboardInterrupt) in the few bytecodes
        between its return and the record being marked delivered: a
        consumer that must never see a record twice keeps the last seq it
        took (the seq is in every record).

        ``early(seq, record)``, when given, is offered each record once it is
        written whole and a commit's fdatasync is about to make it durable
        (:meth:`offer`), in seq order, before ``listener`` gets it: a
        changelog sends it while the disk syncs. It must not block or raise,
        may see a record again (an interrupt) or never (a record made
        durable by a roll, a close or sync="none" goes to ``listener`` only).
        """
        if self.listener is not None:
            raise ValueError("a commit listener is already set")
        self.listener = listener
        self.early = early

    def queue(self, seq: int, end_pos: int, record: bytes) -> None:
        """Hold a committed record for the listener until it is durable.

        Copied in C by ``WriterBase.set`` (csrc/fast.c ``queue_record``: the
        same tuple on both deques; tests/test_native_listener.py)."""
        self._undelivered.append((seq, end_pos, record))
        if self.early is not None:
            self._unoffered.append((seq, end_pos, record))

    def _queued(self, seq: int) -> bool:
        """Was the record ``seq`` (the newest written) queued or delivered already?"""
        undelivered = self._undelivered
        return seq <= self._delivered_seq or bool(undelivered and undelivered[-1][0] >= seq)

    def deliver(self, durable_pos: int) -> None:
        """Give the listener every queued record that ends at or before ``durable_pos``.

        Outside the write lock (and inside the sync turn, when a commit calls it).
        """
        listener = self.listener
        if listener is None:
            return
        undelivered = self._undelivered
        with self._delivering:
            while undelivered and undelivered[0][1] <= durable_pos:
                seq, _end, record = undelivered[0]
                if seq > self._delivered_seq:  # (else delivered: an interrupt stopped the pop)
                    listener(seq, record)
                    self._delivered_seq = seq
                undelivered.popleft()
        if self._unoffered:  # (delivered without an offer: a roll's or close's sync)
            self._forget_offers(self._delivered_seq)

    def offer(self, written_pos: int) -> None:
        """Give the early listener every written record that ends at or before
        ``written_pos`` (``GroupCommit.before_sync``: just before the fdatasync
        that makes them durable).

        Outside the write lock, inside the sync turn; never waits for
        :meth:`deliver` (its listener may wait for a broker).
        """
        early = self.early
        if early is None:
            return
        unoffered = self._unoffered
        with self._offering:
            while unoffered and unoffered[0][1] <= written_pos:
                seq, _end, record = unoffered[0]
                if seq > self._delivered_seq:
                    early(seq, record)
                unoffered.popleft()

    def _forget_offers(self, delivered_seq: int) -> None:
        """Drop the offers of records delivered already."""
        unoffered = self._unoffered
        with self._offering:
            while unoffered and unoffered[0][0] <= delivered_seq:
                unoffered.popleft()

    def after_fork(self) -> None:
        """In a forked child: new delivery locks (a parent thread may have held them)."""
        self._delivering = threading.Lock()
        self._offering = threading.Lock()

    def _check(self) -> None:
        assert self.in_flight is None, "an interrupted append left unsettled"
        if self._undelivered:
            seqs = [item[0] for item in self._undelivered]
            assert seqs == sorted(seqs), "commit queue out of order"


def _no_durable_pos(_pos: int) -> None:
    """Until the engine wires the group commit in."""
