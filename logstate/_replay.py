"""Replaying a segment's records into the index: the damage policy.

Owns: what each kind of damage the scanner reports means, decided in one
place by where it is (the newest segment or a sealed one, followed by valid
records or not) and by the recovery mode (strict / prefix / salvage): keep
the records, cut a torn tail (copied aside), drop a damaged range (salvage,
copied aside), or raise ``CorruptionError`` naming the file and offset.
Every branch names the crash it models. On the C path the common records
(valid plain sets and deletes, uncompressed groups of them) are applied by
``_cnative.replay_records`` (csrc/scan.c) as the windowed scanner reads
them; it hands every other record and all damage back to this policy.
Must never: read the bytes other than through the windowed scanner (memory
does not grow with a segment's size), or write anything but through
``_aside`` (a read-only open reports and changes nothing).

=====================  =================  ==========  ===========================
damage                 followed by        mode        what is done
=====================  =================  ==========  ===========================
newest segment's tail  nothing valid      any         torn write: cut (copied aside)
newest segment         valid records      prefix      cut from the damage on
any segment            valid records      salvage     drop the range (aside)
any segment            valid records      strict      raise (prefix too, sealed segment)
sealed segment's tail  nothing valid      salvage     drop the range (aside)
sealed segment's tail  nothing valid      strict      raise (prefix too)
=====================  =================  ==========  ===========================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from logstate import _scan
from logstate._aside import Aside
from logstate._errors import CorruptionError
from logstate._format import SEGMENT_HEADER_SIZE
from logstate._fs import FileSystem
from logstate._keydir import Index, Keydir
from logstate._native import EXT
from logstate._report import RecoveryReport, SalvagedRange, TornTail
from logstate._scan import Damage, WindowedScan
from logstate._segments import Segment

__all__ = [
    "NATIVE_CHECK",
    "NATIVE_REPLAY",
    "SegmentReplay",
    "native_check",
    "native_replay",
    "scanner",
]

# replay_records(window, offset, namespaces, segment, shift) -> (stop, records, seq, live)
ReplayRecords = Callable[[bytes, int, dict[str, Index], int, int], tuple[int, int, int, int]]
NATIVE_REPLAY: Final[ReplayRecords | None] = None if EXT is None else EXT.replay_records
"""The C scanner's replay_records (csrc/scan.c), None on the pure path."""


# check_frames(data, offset, first_seq, bodies) -> (stop, count, seq)
CheckFrames = Callable[[bytes, int, int, bool], tuple[int, int, int]]
NATIVE_CHECK: Final[CheckFrames | None] = None if EXT is None else EXT.check_frames
"""The C scanner's check_frames (csrc/scan.c: frame and body checks, no index),
None on the pure path; the restore's checks use it (replication/_build.py)."""


def _c_limits() -> bool:
    """The limits the C scanner has copies of are the Python scanner's: a test
    may change one, and the Python path then follows the changed value."""
    # (the limit the Python scanner reads: its module's name, which tests patch)
    return EXT is not None and vars(_scan)["MAX_RECORD_SIZE"] == EXT.SCAN_LAYOUT["MAX_RECORD_SIZE"]


def native_replay() -> ReplayRecords | None:
    """The C scanner to use for the next segment: None on the pure path, or
    when a test has changed a limit the C code has a copy of."""
    return NATIVE_REPLAY if NATIVE_REPLAY is not None and _c_limits() else None


def native_check() -> CheckFrames | None:
    """The C frame check to use now: None on the pure path, or when a test has
    changed a limit the C code has a copy of."""
    return NATIVE_CHECK if NATIVE_CHECK is not None and _c_limits() else None


def scanner(
    fs: FileSystem, fd: int, start: int, end: int, report: Callable[[Damage], None]
) -> WindowedScan:
    """A windowed scan of ``fd``'s bytes ``start..end`` that jumps over holes."""

    def read(offset: int, size: int) -> bytes:
        return fs.pread(fd, size, offset)

    def skip(offset: int) -> int:
        return fs.data_offset(fd, offset)

    return WindowedScan(read, start, end, report, skip=skip)


class SegmentReplay:
    """Replays segments into ``keydir`` under one recovery mode; ``seq``: the highest seen.

    ``map_limit`` (read-only opens): for a segment with damage left in
    place, where its last valid record ends (its bytes beyond are never
    mapped).
    """

    def __init__(
        self,
        fs: FileSystem,
        keydir: Keydir,
        aside: Aside,
        report: RecoveryReport,
        recovery: str,
        read_only: bool,
    ) -> None:
        self._fs = fs
        self._keydir = keydir
        self._aside = aside
        self.report = report
        self.recovery = recovery
        self.read_only = read_only
        self.seq = 0
        self.map_limit: dict[int, int] = {}

    def scan(self, segment: Segment, base: int, end: int, is_newest: bool) -> None:
        """Apply the records of the segment's bytes from file offset ``base`` to ``end``.

        The bytes are read in windows (:class:`_scan.WindowedScan`); every
        offset here is a file offset. The recovery policy lives here: what
        each kind of damage the scanner reports means, depending on where it
        is and on the recovery mode.
        """
        apply_frame = self._keydir.apply_frame
        path = segment.path
        number = segment.number
        read_only = self.read_only
        pending: list[Damage] = []
        salvage = self.recovery == "salvage"
        assert base == 0 or not salvage, "salvage never starts from a snapshot"
        removed = 0  # bytes a salvage rewrite removes before the current record
        dropped: list[Damage] = []
        scan_from = SEGMENT_HEADER_SIZE if base == 0 else base
        prefix = self.recovery == "prefix" and is_newest
        scan = scanner(self._fs, segment.fd, scan_from, end, pending.append)
        last_end = scan_from  # where the last valid record ends
        keydir = self._keydir
        replay_records = native_replay()
        if replay_records is not None:

            def fast(window: bytes, rel: int, window_start: int) -> int:
                """The C scanner: applies the records from ``rel`` on that it
                handles (valid plain sets and deletes, uncompressed groups of
                them; apply_frame's result exactly), returns where it stopped.
                Damage already reported (pending: its record must be decided
                here first) and an index that watches expiry or ordered views
                keep the Python path."""
                nonlocal last_end
                if pending or keydir.watch:
                    return rel
                stop, records, seq, live = replay_records(
                    window, rel, keydir.namespaces, number, removed - window_start
                )
                if records:
                    self.report.records += records
                    if seq > self.seq:
                        self.seq = seq
                    keydir.live_bytes += live
                    last_end = window_start + stop
                return stop

            scan.fast = fast
        for window, window_start, frame in scan.frames():
            if pending and prefix:
                # Damage followed by valid records in the newest segment: with
                # sync="none"/"interval" a power loss can persist unsynced pages
                # out of order. "prefix" keeps the records before the first
                # damage (a prefix of the history) and cuts the rest, valid
                # records included, as a torn tail (copied aside).
                damage = pending[0]
                pending[:] = [Damage(damage.offset, scan.end - damage.offset, damage.reason)]
                break
            if pending:
                # Damage followed by a valid record: not a torn write (a torn
                # write has nothing valid after it). Strict refuses to guess.
                damage = pending[0]
                if not salvage:
                    raise CorruptionError(
                        path,
                        damage.offset,
                        f"{damage.reason} ({damage.size} bytes), followed by valid records; "
                        "open with recovery='prefix' to keep the records before it (newest "
                        "segment only) or 'salvage' to keep every valid record",
                    )
                dropped.extend(pending)
                if not read_only:  # read-only salvage rewrites nothing: offsets stay
                    removed += sum(d.size for d in pending)
                pending.clear()
            at = window_start + frame.offset
            try:
                # locations: window offset + window_start - removed = file offset
                if frame.seq > self.seq:
                    self.seq = frame.seq
                apply_frame(window, frame, number, removed - window_start)
            except CorruptionError as exc:
                # A record whose checksum is right but whose body does not parse.
                if prefix:
                    pending[:] = [Damage(at, scan.end - at, exc.reason)]
                    break
                if not salvage:
                    raise CorruptionError(path, window_start + exc.offset, exc.reason) from None
                dropped.append(Damage(at, frame.size, exc.reason))
                if not read_only:
                    removed += frame.size
            else:
                last_end = at + frame.size
            self.report.records += 1
        end = scan.end
        valid_end = end - sum(d.size for d in pending)
        if pending:
            tail = pending[0]
            if is_newest:
                # The writer died in the middle of appending (or the disk kept
                # size but not data: zeros or garbage). Nothing valid follows,
                # so this is a torn write: keep the bytes aside, cut them off.
                pass
            elif not salvage:
                raise CorruptionError(
                    path,
                    tail.offset,
                    f"{tail.reason} at the end of a sealed segment "
                    "(only the newest segment may have a torn tail); open with "
                    "recovery='salvage' to keep the valid records",
                )
            else:
                dropped.extend(pending)
                pending = []
        if read_only:
            # Report, change nothing (a live writer may be appending the tail).
            for damage in dropped:
                self.report.salvaged.append(
                    SalvagedRange(path, damage.offset, damage.size, damage.reason)
                )
            if pending:
                torn = TornTail(path, valid_end, end - valid_end, "")
                self.report.torn_tails.append(torn)
            segment.size = end
            if dropped or pending:
                self.map_limit[number] = last_end  # never map the damaged bytes
            return
        if dropped:
            self._aside.salvage_rewrite(segment, end, dropped + pending)
            segment.size = end - sum(d.size for d in dropped + pending)
            return
        if pending:
            self._aside.cut_tail(segment, valid_end, end, pending[0].reason)
        segment.size = valid_end
