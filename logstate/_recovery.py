"""Opening a storage directory: from its files to a finished index.

Owns: which segments make up the store (a finished compaction's leftover
inputs removed, gaps refused or, with salvage, filled), whether the index
snapshot can be trusted, loading each segment (its header, a torn header, a
scan of what the snapshot does not cover), the read-only open's file
identities, and saving the snapshot at close. ``recover`` returns a
finished ``Recovered`` value: the engine never sees a half-built index, and
recovery never sees a writer.
Must never: append a record, start a thread, or run after open (except
``save_snapshot``). What damage means is ``_replay``'s table; copies aside
are ``_aside``'s.
"""

from __future__ import annotations

import logging
import time
from typing import Final, NamedTuple

from logstate import _format as fmt
from logstate._aside import Aside
from logstate._errors import CorruptionError, UnsupportedFormatError
from logstate._filenames import (
    DAMAGED_SUFFIX,
    SNAPSHOT_FILE_NAME,
    TMP_SUFFIX,
    parse_segment_file_name,
    segment_file_name,
)
from logstate._format import SEGMENT_HEADER_SIZE
from logstate._fs import FileSystem
from logstate._keydir import Keydir, as_index
from logstate._options import EngineOptions
from logstate._replay import SegmentReplay, scanner
from logstate._report import RecoveryReport, SalvagedRange, TornTail
from logstate._scan import ignore_damage
from logstate._segments import Segment, SegmentSet
from logstate._snapshot import (
    TAIL_BYTES,
    SegmentMark,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
    tail_crc,
)

__all__ = ["Recovered", "SegmentVanished", "recover", "save_snapshot"]

log = logging.getLogger("logstate")

READ_ONLY_OPEN_ATTEMPTS: Final = 10  # a listed segment vanished: list again, this many times


class SegmentVanished(Exception):
    """A segment file named by the directory listing was gone when opened (read-only open)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class Recovered(NamedTuple):
    """What an open rebuilt: every segment (the newest active), the index, the
    highest sequence number in the files, and what was found and done."""

    segments: SegmentSet
    keydir: Keydir
    seq: int
    report: RecoveryReport
    active_version: int  # the format version of the active segment's header


def _header_torn(data: bytes) -> bool:
    """Could ``data`` be a segment whose header write was torn by a crash?

    True for a file shorter than a header, a zeroed header, or a header that
    fails its magic or checksum. False for a valid header, and for a header
    of another format version (whole and checksummed: written by a newer
    logstate, not torn).
    """
    if len(data) < SEGMENT_HEADER_SIZE or not any(data[:SEGMENT_HEADER_SIZE]):
        return True
    try:
        fmt.decode_segment_header(data)
    except UnsupportedFormatError:
        return bytes(data[: len(fmt.SEGMENT_MAGIC)]) != fmt.SEGMENT_MAGIC
    except CorruptionError:
        return True
    return False


def recover(fs: FileSystem, path: str, options: EngineOptions) -> Recovered:
    """Open the segments of ``path`` (locked by the caller unless read-only).

    Raises:
        CorruptionError: damage the recovery mode does not accept (path and
            offset named); UnsupportedFormatError: a newer format.
        SegmentVanished: (read-only) a listed segment vanished meanwhile.
        FileNotFoundError: (read-only) the directory holds no segment.
        OSError: from the file system.
    """
    recovery = _Recovery(fs, path, options)
    try:
        return recovery.run()
    except BaseException:
        failures = recovery.segments.release()  # the open's own error is the one raised
        for segment_path, error in failures:
            log.error("%s: closing %s after a failed open: %r", path, segment_path, error)
        raise


class _Recovery:
    """One open's work: its report, the segments and index it builds."""

    def __init__(self, fs: FileSystem, path: str, options: EngineOptions) -> None:
        self._fs = fs
        self.path = path
        self.options = options
        self.read_only = options.read_only
        self.report = RecoveryReport()
        self.versions: dict[int, int] = {}  # segment number -> its header's format version
        self.segments = SegmentSet(fs, path, options.read_only)
        self.keydir = Keydir(path)
        self.aside = Aside(fs, path, options.copy_torn_tails, self.report)
        self.replay = SegmentReplay(
            fs, self.keydir, self.aside, self.report, options.recovery, options.read_only
        )
        self.covers: dict[int, int] = {}
        self.listed: dict[int, tuple[int, int]] = {}  # read-only: the file _covers_from read

    def run(self) -> Recovered:
        read_only = self.read_only
        segments = self.segments
        names = self._fs.list_dir(self.path)
        if not read_only:
            for name in names:
                if name.endswith(TMP_SUFFIX):
                    # A crash during a compaction or a salvage rewrite left a
                    # temporary file; the originals are still in place.
                    self._fs.unlink(segments.file(name))
        numbers = sorted(n for n in (parse_segment_file_name(x) for x in names) if n is not None)
        numbers = self._select_segments(numbers)
        # salvage checks every byte: it never trusts a snapshot
        use_snapshot = self.options.use_snapshot and self.options.recovery != "salvage"
        starts = self._load_snapshot(numbers) if use_snapshot else {}
        for i, number in enumerate(numbers):
            self._load_segment(
                number, is_newest=(number == numbers[-1]), start=starts.get(number, 0)
            )
            if number != numbers[-1]:  # sealed: the newest ones mapped, no descriptor kept
                mapped = i >= len(numbers) - 1 - segments.mapping_cap
                self._seal_loaded(segments.segments[number], mapped)
        self.report.segments = len(numbers)
        if numbers:
            active = segments.segments[numbers[-1]]
            size = self._map_size(active)
            active.map = self._fs.map_read_only(active.fd, size)
            active.mapped = size if active.map is not None else 0
            if not read_only:
                # What a crashed writer left unsynced is readable now: make it
                # durable before anyone acts on it (flush() syncs only what
                # this process writes).
                self._fs.fdatasync(active.fd)
        elif read_only:
            raise FileNotFoundError(f"{self.path} holds no logstate segment (read-only open)")
        else:
            active = segments.segments[1] = segments.create(1)
        segments.active = active
        version = self.versions.get(active.number, fmt.FORMAT_VERSION)
        return Recovered(segments, self.keydir, self.replay.seq, self.report, version)

    def _map_size(self, segment: Segment) -> int:
        """How much of ``segment`` to map at open: all of it, but for a read-only
        open never the damaged bytes after its last valid record."""
        return min(segment.size, self.replay.map_limit.get(segment.number, segment.size))

    def _seal_loaded(self, segment: Segment, mapped: bool) -> None:
        """After its scan: map a sealed segment (``mapped``), close its descriptor."""
        fd, segment.fd = segment.fd, -1
        try:
            if self.read_only:  # a live writer may compact it away: tell when (open_sealed)
                self.segments.identities[segment.number] = self._fs.file_identity(fd)
            if mapped:
                size = self._map_size(segment)
                segment.map = self._fs.map_read_only(fd, size)
                if segment.map is not None:
                    segment.mapped = size
                    self.segments.add_mapping(segment)
        finally:
            self._fs.close(fd)

    def _covers_from(self, number: int) -> int:
        """The first segment number whose records segment ``number`` holds.

        A read-only open records which file it read (``_listed``): the load
        must find the same file there (see :func:`_open_engine`).

        Raises:
            SegmentVanished: read-only open, and the file is gone.
        """
        path = self.segments.file(segment_file_name(number))
        try:
            fd = self._fs.open_read_only(path)
        except FileNotFoundError:
            if not self.read_only:
                raise
            raise SegmentVanished(path) from None
        try:
            if self.read_only:
                self.listed[number] = self._fs.file_identity(fd)
            start = self._fs.pread(fd, fmt.SEGMENT_START_SIZE, 0)
        finally:
            self._fs.close(fd)
        covers_from = fmt.compacted_covers_from(start)
        if covers_from is None:
            return number
        if not 1 <= covers_from <= number:
            raise CorruptionError(
                self.segments.file(segment_file_name(number)),
                SEGMENT_HEADER_SIZE,
                f"compaction output {number} claims to cover from segment {covers_from}",
            )
        return covers_from

    def _select_segments(self, numbers: list[int]) -> list[int]:
        """The segments to load, in order; leftovers of a finished compaction removed.

        A compaction output ``n`` that covers ``lo..n`` replaces every segment
        numbered ``lo..n-1``: those still present are inputs the crashed
        compaction had not deleted yet (it deletes them only after the output
        is durable), so they are deleted now, never loaded. The rest must
        chain without gaps from segment 1.
        """
        kept: list[int] = []
        covers: dict[int, int] = {}
        low = None
        superseded = []
        for number in reversed(numbers):
            if low is not None and number >= low:
                superseded.append(number)
                continue
            covers[number] = low = self._covers_from(number)
            kept.append(number)
        kept.reverse()
        if superseded and not self.read_only:
            for number in superseded:
                self._fs.unlink(self.segments.file(segment_file_name(number)))
            self._fs.fsync_dir(self.path)
            log.warning(
                "%s: removed segments %s left by an interrupted compaction",
                self.path,
                sorted(superseded),
            )
        expected = 1
        for number in kept:
            if covers[number] != expected:
                missing = list(range(expected, covers[number]))
                self._missing_segments(missing, before=number)
            expected = number + 1
        self.covers = covers
        return kept

    def _open_listed(self, number: int, path: str) -> int:
        """Read-only open: segment ``number``'s file, the same one ``_covers_from`` read.

        Raises:
            SegmentVanished: it is gone, or another file is under its name
                (a compaction renamed its output over it): the open is retried.
        """
        try:
            fd = self._fs.open_read_only(path)
        except FileNotFoundError:
            raise SegmentVanished(path) from None
        if self._fs.file_identity(fd) != self.listed.get(number):
            self._fs.close(fd)
            raise SegmentVanished(path)
        return fd

    def _missing_segments(self, missing: list[int], before: int) -> None:
        if self.options.recovery != "salvage":
            raise CorruptionError(
                self.segments.file(segment_file_name(missing[0])),
                0,
                f"segment {missing[0]} is missing (segments {missing[0]}..{missing[-1]} "
                f"before segment {before}); open with recovery='salvage' to accept the loss",
            )
        self.report.missing_segments.extend(missing)
        if self.read_only:
            return  # reported only: a read-only open changes nothing
        log.warning(
            "%s: segments %s are missing; replaced by empty segments (salvage)",
            self.path,
            missing,
        )
        for lost in missing:
            # An empty segment in the gap records that salvage accepted
            # the loss, so that later strict opens do not fail again. It is
            # written whole under a temporary name and renamed: a failure
            # (a full disk) must not leave a headerless segment in the
            # middle of the sequence, which no open could read.
            path = self.segments.file(segment_file_name(lost))
            self._fs.write_new_file(path + TMP_SUFFIX, fmt.encode_segment_header(lost))
            self._fs.rename(path + TMP_SUFFIX, path)
        self._fs.fsync_dir(self.path)

    def _file(self, name: str) -> str:
        return self.path + "/" + name

    def _load_snapshot(self, numbers: list[int]) -> dict[int, int]:
        """Load the index snapshot if it matches the segments; {segment: scan from}.

        A segment the snapshot covers whole is not scanned (start = its size);
        the one it covers in part is scanned from where the snapshot stops;
        newer segments are scanned whole. Any mismatch: {} (scan everything).
        """
        path = self.segments.file(SNAPSHOT_FILE_NAME)
        if not self._fs.exists(path):
            return {}
        try:
            fd = self._fs.open_read_only(path)
            try:
                snapshot = decode_snapshot(self._fs.read_all(fd))
            except CorruptionError as exc:
                raise CorruptionError(path, exc.offset, exc.reason) from None
            finally:
                self._fs.close(fd)
            marks = snapshot.segments
            if [m.number for m in marks] != numbers[: len(marks)] or not marks:
                raise CorruptionError(path, 0, "snapshot names other segments")
            for i, mark in enumerate(marks):
                seg_fd = self._fs.open_read_only(self.segments.file(segment_file_name(mark.number)))
                try:
                    size = self._fs.file_size(seg_fd)
                    start = max(0, mark.size - TAIL_BYTES)
                    tail = self._fs.pread(seg_fd, mark.size - start, start)
                finally:
                    self._fs.close(seg_fd)
                last = i == len(marks) - 1
                if (
                    mark.covers_from != self.covers[mark.number]
                    or size < mark.size
                    or (size != mark.size and not last)
                    or len(tail) != mark.size - start
                    or tail_crc(tail) != mark.tail_crc
                ):
                    raise CorruptionError(path, 0, f"segment {mark.number} changed since")
        except (CorruptionError, OSError, ValueError, OverflowError) as exc:
            log.info("%s: index snapshot not used (%s); scanning the segments", self.path, exc)
            self.report.snapshot_refused = str(exc)
            return {}
        keydir = self.keydir
        # (a marshal snapshot's dicts become KeyMaps on the C path)
        keydir.namespaces = {
            ns: as_index(index) if type(index) is dict else index
            for ns, index in snapshot.namespaces.items()
        }
        keydir.checkpoint = snapshot.checkpoint
        keydir.live_bytes = snapshot.live_bytes
        keydir.expiring = snapshot.expiring
        keydir.watch = bool(snapshot.expiring)
        keydir.clock_floor = snapshot.clock_floor
        self.replay.seq = snapshot.seq
        self.report.snapshot_used = True
        return {mark.number: mark.size for mark in marks}

    def _load_segment(self, number: int, is_newest: bool, start: int = 0) -> None:
        path = self.segments.file(segment_file_name(number))
        read_only = self.read_only
        fd = self._open_listed(number, path) if read_only else self._fs.open_file(path)
        segment = Segment(number, path, fd, 0, self.covers[number])
        self.segments.segments[number] = segment
        size = self._fs.file_size(fd)
        if start > SEGMENT_HEADER_SIZE:
            # The index snapshot covers the bytes below ``start``: read the
            # header and what was appended after the snapshot, nothing else.
            self._check_header(path, number, self._fs.pread(fd, SEGMENT_HEADER_SIZE, 0))
            segment.size = size
            if size > start:
                self.replay.scan(segment, start, size, is_newest)
            return
        # Only the header is read here; the records are scanned in windows
        # (memory does not grow with the segment's size).
        head = self._fs.pread(fd, SEGMENT_HEADER_SIZE, 0) if size else b""
        if read_only and is_newest and len(head) < SEGMENT_HEADER_SIZE:
            head = self._wait_for_header(fd, head)
            size = self._fs.file_size(fd)
        salvage = self.options.recovery == "salvage"
        follow: list[bool] = []

        def records_follow() -> bool:
            """Is there a valid record anywhere after the header? (scanned once, if asked)"""
            if not follow:
                scan = scanner(self._fs, fd, SEGMENT_HEADER_SIZE, size, ignore_damage)
                follow.append(next(scan.frames(), None) is not None)
            return follow[0]

        if is_newest and _header_torn(head) and not records_follow():
            # Crash while the segment was being created: its header never
            # reached the disk whole (short, zeros, or garbage from a power
            # loss before the header's fdatasync), and nothing valid follows.
            if read_only:
                self.report.torn_tails.append(TornTail(path, 0, size, ""))
                return
            self.aside.cut_tail(segment, 0, size, "incomplete segment header")
            self._fs.append(fd, fmt.encode_segment_header(number))
            self._fs.fdatasync(fd)
            segment.size = SEGMENT_HEADER_SIZE
            return
        try:
            self._check_header(path, number, head)
        except CorruptionError as exc:
            # A whole header of another version, or a file with no logstate
            # record in it: never guess. A damaged header before valid
            # records (the header was durable before them): damage.
            foreign = isinstance(exc, UnsupportedFormatError) and not _header_torn(head)
            if foreign or not (salvage and records_follow()):
                if not foreign and records_follow():
                    raise CorruptionError(
                        path,
                        exc.offset,
                        f"{exc.reason}; valid records follow the header: open with "
                        "recovery='salvage' to keep them",
                    ) from None
                raise
            # Salvage: the header is damaged but the file is in the sequence:
            # report it, keep its bytes aside, and read on with a new header
            # (the scan starts after the header: its bytes are not read).
            self.report.salvaged.append(SalvagedRange(path, 0, SEGMENT_HEADER_SIZE, exc.reason))
            if not self.read_only:
                aside = self.aside.copy_aside(segment, 0, SEGMENT_HEADER_SIZE, DAMAGED_SUFFIX)
                log.warning("%s: damaged header (%s) moved to %s", path, exc.reason, aside)
                self.aside.salvage_rewrite(segment, size, [], fmt.encode_segment_header(number))
        self.replay.scan(segment, 0, size, is_newest)

    def _wait_for_header(self, fd: int, data: bytes) -> bytes:
        """The newest segment's header once it is whole (read-only open).

        A newest segment shorter than a header is either being created right
        now by the process holding the directory (a roll: the file exists a
        moment before its header is written) or the leftover of a crash
        during its creation. Read it again a few times with a short backoff;
        still short, it is reported as a torn tail (as before).
        """
        for attempt in range(READ_ONLY_OPEN_ATTEMPTS):
            time.sleep(min(0.001 * 2**attempt, 0.05))
            data = self._fs.pread(fd, SEGMENT_HEADER_SIZE, 0)
            if len(data) >= SEGMENT_HEADER_SIZE:
                break
        return data

    def _check_header(self, path: str, number: int, data: bytes) -> None:
        try:
            found = fmt.decode_segment_header(data)
        except CorruptionError as exc:
            raise type(exc)(path, exc.offset, exc.reason) from None
        if found != number:
            raise CorruptionError(path, 0, f"header says segment {found}, file name says {number}")
        self.versions[number] = fmt.SEGMENT_HEADER.unpack_from(data, 0)[1]


def save_snapshot(fs: FileSystem, segments: SegmentSet, keydir: Keydir, seq: int) -> None:
    """Save the index for the next open (at close, after the final sync)."""
    marks = []
    for segment in segments.segments.values():
        start = max(0, segment.size - TAIL_BYTES)
        tail = segments.read(segment, segment.size - start, start)
        marks.append(SegmentMark(segment.number, segment.covers_from, segment.size, tail_crc(tail)))
    data = encode_snapshot(
        Snapshot(
            keydir.namespaces,
            keydir.checkpoint,
            seq,
            keydir.live_bytes,
            marks,
            keydir.expiring,
            keydir.clock_floor,
        ),
        max_size=sum(mark.size for mark in marks),
    )
    path = segments.file(SNAPSHOT_FILE_NAME)
    if data is None:
        # Larger than the data it indexes, even compressed: open scans
        # instead; an older snapshot would only be read to be refused.
        log.info("%s: index snapshot not written (larger than the segments)", segments.path)
        if fs.exists(path):
            fs.unlink(path)
        return
    tmp = path + TMP_SUFFIX
    if fs.exists(tmp):
        fs.unlink(tmp)
    fs.write_new_file(tmp, data)
    fs.rename(tmp, path)
