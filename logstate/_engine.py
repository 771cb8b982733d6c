"""The segment-log engine: recovery, the in-memory index, writes, syncs.

Owns: one storage directory's segments, its in-memory index (namespace ->
key -> location), the sequence counter, the write path with its durability
modes (none / interval / always with group commit), the recovery policy that
decides what to do with damage the scanner reports, and the per-process
registry that hands out one engine per directory.
Must never: call ``os`` directly (every file-system call goes through the
``FileSystem`` instance it was given), encode bytes by hand (``_format`` and
``_values`` own the layout), or swallow an ``OSError`` from a write or sync.

Locations (what the index maps keys to) are defined in ``_location``.
"""

from __future__ import annotations

import errno
import logging
import mmap
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from logstate import _format as fmt
from logstate._compact import CompactionResult
from logstate._compact import compact as run_compaction
from logstate._errors import (
    CorruptionError,
    OptionConflictError,
    ReadOnlyStorageError,
    StorageClosedError,
    StorageFailedError,
    SubStorageDeletedError,
    UnsupportedFormatError,
)
from logstate._format import (
    FRAME_HEADER_SIZE,
    NAME_LEN,
    NS_SEPARATOR,
    REC_CHECKPOINT,
    REC_CLEAR,
    REC_CREATE_NS,
    REC_DELETE,
    REC_DROP_NS,
    REC_GROUP,
    REC_SET,
    RECORD_OVERHEAD,
    SEGMENT_HEADER_SIZE,
)
from logstate._fs import LOCK_FILE_NAME, OS_FS, FileSystem
from logstate._location import (
    KIND_GROUP_OP,
    KIND_RECORD,
    U32,
    U40,
    CompressedLocation,
    Location,
    Segment,
    location_segment,
    location_size,
    pack_location,
    sizes,
    unpack_location,
)
from logstate._snapshot import (
    SNAPSHOT_FILE_NAME,
    TAIL_BYTES,
    SegmentMark,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
    tail_crc,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "Engine",
    "EngineOptions",
    "RecoveryReport",
    "acquire_engine",
    "release_engine",
    "segment_file_name",
]

log = logging.getLogger("logstate")

SYNC_MODES: Final = ("none", "interval", "always")
RECOVERY_MODES: Final = ("strict", "prefix", "salvage")
SEGMENT_SUFFIX: Final = ".seg"
SEGMENT_PREFIX: Final = "segment-"
TORN_SUFFIX: Final = ".torn"  # torn tails copied aside before truncation
DAMAGED_SUFFIX: Final = ".damaged"  # damaged ranges moved aside by salvage
TMP_SUFFIX: Final = ".tmp"

MIN_SEGMENT_SIZE: Final = 4096
_pack_name_len = NAME_LEN.pack
_encode_record = fmt.encode_record
_set_record_value = fmt.set_record_value
_set_group_op_value = fmt.set_group_op_value
_pack_length_type_seq = fmt.LENGTH_TYPE_SEQ.pack
_pack_u32 = fmt.U32_STRUCT.pack
_crc_bytes = fmt.crc_bytes
_unpack_frame_header = fmt.FRAME_HEADER.unpack_from
_MAX_BODY_SIZE: Final = fmt.MAX_RECORD_SIZE - fmt.SEQ_SIZE
SEQ_SIZE: Final = fmt.SEQ_SIZE
NAME_LEN_SIZE: Final = NAME_LEN.size
MAX_SEGMENT_SIZE: Final = 1 << 31
# Open files: a sealed segment is read through a mapping (one descriptor
# before Python 3.13), at most this many at once, and at most 1/8 of the
# process's descriptor limit; one not mapped is mapped again by name when read.
MAX_MAPPED_SEGMENTS: Final = 128
MIN_MAPPED_SEGMENTS: Final = 4
SEALED_FDS_KEPT: Final = 8  # sealed segments' own descriptors left open while a sync runs


def segment_file_name(number: int) -> str:
    """``segment-0000000001.seg`` for segment 1."""
    return f"{SEGMENT_PREFIX}{number:010d}{SEGMENT_SUFFIX}"


def parse_segment_file_name(name: str) -> int | None:
    """The segment number of a segment file name, or None for other files."""
    if not (name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)):
        return None
    digits = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
    if len(digits) != 10 or not digits.isdigit():
        return None
    return int(digits)


class EngineOptions(NamedTuple):
    """Options that belong to the directory (every handle shares them)."""

    sync: str = "interval"
    sync_interval: float = 1.0  # seconds
    segment_size: int = 64 * 1024 * 1024  # bytes
    recovery: str = "strict"
    compress_min_size: int | None = 1024 * 1024  # bytes of a group's ops; None: never
    zstd_level: int = 1
    auto_compact: bool = True  # compact in the background when a segment rolls
    compact_ratio: float = 0.5  # ... and dead bytes are at least this share of the total
    compact_min_size: int = 4 * 1024 * 1024  # ... and the store holds at least this many bytes
    read_only: bool = False  # no lock, no change to any file; writes raise
    use_snapshot: bool = True  # load the index snapshot written at close, if it checks out


DEFAULT_OPTIONS: Final = EngineOptions()


def validate_options(given: dict[str, object]) -> EngineOptions:
    """Check option types and ranges; return the full option set.

    Raises:
        TypeError / ValueError: naming the option and what it accepts.
    """
    unknown = set(given) - set(EngineOptions._fields)
    if unknown:
        raise TypeError(f"unknown storage option(s): {', '.join(sorted(unknown))}")
    opts = DEFAULT_OPTIONS._replace(**given)  # type: ignore[arg-type]
    if opts.sync not in SYNC_MODES:
        raise ValueError(
            f"sync must be one of {', '.join(map(repr, SYNC_MODES))}, got {opts.sync!r}"
        )
    if opts.recovery not in RECOVERY_MODES:
        raise ValueError(
            f"recovery must be one of {', '.join(map(repr, RECOVERY_MODES))}, got {opts.recovery!r}"
        )
    interval = opts.sync_interval
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
        raise ValueError(f"sync_interval must be a positive number of seconds, got {interval!r}")
    size = opts.segment_size
    if type(size) is not int or not MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE:
        raise ValueError(
            f"segment_size must be an int from {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes, "
            f"got {size!r}"
        )
    cms = opts.compress_min_size
    if cms is not None and (type(cms) is not int or cms < 0):
        raise ValueError(f"compress_min_size must be None or an int >= 0, got {cms!r}")
    if type(opts.zstd_level) is not int or not 1 <= opts.zstd_level <= 22:
        raise ValueError(f"zstd_level must be an int from 1 to 22, got {opts.zstd_level!r}")
    for name in ("auto_compact", "read_only", "use_snapshot"):
        if type(getattr(opts, name)) is not bool:
            raise TypeError(f"{name} must be a bool, got {getattr(opts, name)!r}")
    ratio = opts.compact_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"compact_ratio must be a number between 0 and 1, got {ratio!r}")
    if type(opts.compact_min_size) is not int or opts.compact_min_size < 0:
        raise ValueError(f"compact_min_size must be an int >= 0, got {opts.compact_min_size!r}")
    return opts._replace(sync_interval=float(interval), compact_ratio=float(ratio))


@dataclass
class RecoveryReport:
    """What open found and did: torn tails cut, damage salvaged or refused."""

    segments: int = 0
    records: int = 0
    torn_tails: list[tuple[str, int, int, str]] = field(
        default_factory=list
    )  # path, off, size, aside
    salvaged: list[tuple[str, int, int, str]] = field(
        default_factory=list
    )  # path, off, size, reason
    missing_segments: list[int] = field(default_factory=list)
    snapshot_used: bool = False  # the index came from index.snapshot (plus a scan of newer bytes)

    @property
    def clean(self) -> bool:
        return not (self.torn_tails or self.salvaged or self.missing_segments)


def _ignore(_damage: object) -> None:
    """A scanner report nobody needs."""


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


def join_namespace(parent: str, name: str) -> str:
    return name if not parent else parent + NS_SEPARATOR + name


def _is_within(ns: str, ancestor: str) -> bool:
    """True when ``ns`` is ``ancestor`` or below it."""
    return not ancestor or ns == ancestor or ns.startswith(ancestor + NS_SEPARATOR)


class Engine:
    """One open storage directory. Use :func:`acquire_engine` to get one.

    Thread-safe: one lock (``_lock``) serialises writers; reads take no lock
    (positioned reads of immutable, already-written bytes).
    """

    def __init__(self, path: str, options: EngineOptions, fs: FileSystem = OS_FS) -> None:
        self.path = path
        self.options = options
        self._fs = fs
        self._os_write = fs.raw_write_function()
        self._lock = threading.Lock()
        self._sync_cond = threading.Condition(threading.Lock())  # group commit
        self._syncing = False  # a thread is in its fdatasync turn (_sync_turn)
        self._cond = threading.Condition(threading.Lock())
        self._namespaces: dict[str, dict[str, Location]] = {"": {}}
        self._segments: dict[int, Segment] = {}
        self._active: Segment | None = None
        self._seq = 0
        self._written_pos = 0  # bytes appended since open (all segments)
        self._synced_pos = 0  # bytes of that known durable
        self._dirty = False
        self._closing = False
        self._closed = False
        self._failed: BaseException | None = None
        self._refs = 0
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._checkpoint: Location | None = None
        self._covers: dict[int, int] = {}
        self._live_bytes = 0  # bytes of the records the index points to
        self._compact_lock = threading.Lock()
        self._compact_thread: threading.Thread | None = None
        self._retired_maps: list[mmap.mmap] = []  # mappings replaced; closed at the next roll
        self._mapped: dict[Segment, None] = {}  # sealed segments with a mapping, oldest first
        self._mapping_cap = max(
            MIN_MAPPED_SEGMENTS, min(MAX_MAPPED_SEGMENTS, fs.descriptor_limit() // 8)
        )
        self._sealed_fds: list[Segment] = []  # sealed, own descriptor still open (_map)
        self._pinned: Segment | None = None  # never unmapped: compaction renames over its file
        self._identities: dict[int, tuple[int, int]] = {}  # read-only: files scanned at open
        self._backlog = False  # writers wait: a running compaction is a segment behind
        self._compacting = False  # a background compaction is running (under _lock)
        self._closed_event = threading.Event()  # set when close() has finished
        self._backlog_cond = threading.Condition(threading.Lock())
        self._sync_always = options.sync == "always"
        self._sync_interval = options.sync == "interval"
        self._segment_size = options.segment_size
        self._read_only = options.read_only
        self.report = RecoveryReport()
        try:
            self._open()
        except BaseException:
            try:
                self._release_resources()
            except OSError as release_error:  # the open's own error is the one raised
                log.error("%s: releasing after a failed open: %r", path, release_error)
            raise

    # ================================================================== open / recovery
    def _open(self) -> None:
        read_only = self.options.read_only
        if not read_only:
            self._lock_fd = self._fs.lock_dir(self.path)
        names = self._fs.list_dir(self.path)
        if not read_only:
            for name in names:
                if name.endswith(TMP_SUFFIX):
                    # A crash during a compaction or a salvage rewrite left a
                    # temporary file; the originals are still in place.
                    self._fs.unlink(self._file(name))
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
                self._seal_loaded(self._segments[number], i >= len(numbers) - 1 - self._mapping_cap)
        self.report.segments = len(numbers)
        if numbers:
            self._active = self._segments[numbers[-1]]
            self._active.map = self._fs.map_read_only(self._active.fd, self._active.size)
            self._active.mapped = self._active.size if self._active.map is not None else 0
            if not read_only:
                # What a crashed writer left unsynced is readable now: make it
                # durable before anyone acts on it (flush() syncs only what
                # this process writes).
                self._fs.fdatasync(self._active.fd)
        elif read_only:
            raise FileNotFoundError(f"{self.path} holds no logstate segment (read-only open)")
        else:
            self._active = self._create_segment(1)
        if self._sync_interval and not read_only:
            self._thread = threading.Thread(
                target=self._interval_loop, name=f"logstate-sync:{self.path}", daemon=True
            )
            self._thread.start()

    def _map(self, segment: Segment, close_older: bool = True) -> None:
        """Seal ``segment``: map all its bytes for reads, and let its descriptor go.

        Under ``_lock`` (a roll, a compaction's install). The mapping joins
        the open ones (:meth:`_add_mapping`: beyond the cap the oldest is
        closed); an older mapping of the segment is retired (closed at the
        next roll). The segment's own descriptor stays open a while
        (:meth:`_close_sealed_fds`): an unlocked reader, or a commit that
        took the segment as the active one, may be about to use it.
        ``close_older``: close those of segments sealed earlier now (a roll
        does; a compaction leaves segments sealed meanwhile to the next roll).
        """
        mapping = self._fs.map_read_only(segment.fd, segment.size)
        if segment.map is not None:
            self._retired_maps.append(segment.map)
        segment.map = mapping
        segment.mapped = segment.size if mapping is not None else 0
        if mapping is not None:
            self._add_mapping(segment)
        self._sealed_fds.append(segment)
        if close_older:
            self._close_sealed_fds(keep=1)  # those sealed at earlier rolls

    def _seal_loaded(self, segment: Segment, mapped: bool) -> None:
        """At open, after its scan: map a sealed segment (``mapped``), close its descriptor."""
        fd, segment.fd = segment.fd, -1
        try:
            if self._read_only:  # a live writer may compact it away: tell when (_open_sealed)
                self._identities[segment.number] = self._fs.file_identity(fd)
            if mapped:
                segment.map = self._fs.map_read_only(fd, segment.size)
                if segment.map is not None:
                    segment.mapped = segment.size
                    self._add_mapping(segment)
        finally:
            self._fs.close(fd)

    def _add_mapping(self, segment: Segment) -> None:
        """Count ``segment``'s new mapping among the open ones; unmap the oldest beyond the cap.

        Under ``_lock`` (or at open). The pinned segment is never unmapped. A
        reader still holding an unmapped segment's mapping gets ValueError and
        reads again under the lock, where the segment is mapped again by name
        (:meth:`_map_again`); closing a mapping while another thread slices it
        is safe (a slice is copied under the GIL).
        """
        mapped = self._mapped
        mapped[segment] = None
        while len(mapped) > self._mapping_cap:
            victim = next(s for s in mapped if s is not self._pinned)
            del mapped[victim]
            mapping = victim.map
            victim.map = None
            victim.mapped = 0
            if mapping is not None:
                mapping.close()

    def _map_again(self, segment: Segment) -> None:
        """Map a sealed segment unmapped earlier, opening its file by name. Under ``_lock``.

        Under the lock the files agree with ``_segments`` (a compaction renames
        its output over its last input only while that input is pinned, see
        :meth:`_pin`). A file now shorter than the segment stays unmapped:
        reading it then reports the damage.
        """
        fd = self._open_sealed(segment)
        try:
            try:
                mapping = self._fs.map_read_only(fd, segment.size)
            except ValueError:  # shorter than the segment (damaged since)
                mapping = None
            if mapping is not None:
                segment.map = mapping
                segment.mapped = segment.size
                self._add_mapping(segment)
        finally:
            self._fs.close(fd)

    def _open_sealed(self, segment: Segment) -> int:
        """A new read-only descriptor of a sealed segment's file, by name (the caller closes it).

        Raises:
            CorruptionError: (a read-only open) the file is not the one
                scanned at open any more: the process holding the store
                compacted it away since.
            OSError: from the open.
        """
        expected = self._identities.get(segment.number)
        replaced = CorruptionError(
            segment.path,
            0,
            f"segment {segment.number} was replaced or removed since this read-only "
            "open (compacted by the process holding the store); open it again",
        )
        try:
            fd = self._fs.open_read_only(segment.path)
        except FileNotFoundError:
            if expected is None:
                raise
            raise replaced from None
        if expected is not None and self._fs.file_identity(fd) != expected:
            self._fs.close(fd)
            raise replaced
        return fd

    def _pin(self, segment: Segment) -> None:
        """Keep ``segment`` mapped until the next compaction install. Under ``_lock``.

        A compaction renames its output over its last input's file before the
        index switches to the output: reads meanwhile need the input's bytes,
        which only its mapping still holds.
        """
        if segment.map is None:
            self._map_again(segment)
        self._pinned = segment

    def _close_sealed_fds(self, keep: int) -> None:
        """Close sealed segments' own descriptors, all but the newest ``keep``. Under ``_lock``.

        While a sync turn runs, the newest ``SEALED_FDS_KEPT`` stay open: a
        commit takes the active segment under the lock and syncs its
        descriptor after releasing it (``_commit``).
        """
        sealed = self._sealed_fds
        if len(sealed) <= keep:
            return
        with self._sync_cond:  # lock order: _lock, then _sync_cond
            if self._syncing:
                keep = max(keep, SEALED_FDS_KEPT)
        while len(sealed) > keep:
            segment = sealed.pop(0)
            fd, segment.fd = segment.fd, -1
            self._fs.close(fd)

    def _read(self, segment: Segment, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset``: from the mapping when it covers them.

        Else through the segment's descriptor, or, for a sealed segment that
        has neither now, its file opened by name. Callers verify what they
        read: unlocked, a compaction may have replaced that file meanwhile.
        """
        mapping = segment.map
        if mapping is not None and offset + size <= segment.mapped:
            try:
                return mapping[offset : offset + size]
            except ValueError:  # unmapped meanwhile
                pass
        fd = segment.fd
        if fd >= 0:
            return self._fs.pread(fd, size, offset)
        fd = self._open_sealed(segment)
        try:
            return self._fs.pread(fd, size, offset)
        finally:
            self._fs.close(fd)

    def _segment_bytes(self, segment: Segment) -> bytes:
        """Every byte of ``segment`` (as :meth:`_read`: mapping, descriptor, or by name)."""
        mapping = segment.map
        if mapping is not None and segment.mapped == segment.size:
            try:
                return mapping[:]
            except ValueError:  # unmapped meanwhile
                pass
        fd = segment.fd
        if fd >= 0:
            return self._fs.read_all(fd)
        fd = self._open_sealed(segment)
        try:
            return self._fs.read_all(fd)
        finally:
            self._fs.close(fd)

    def _covers_from(self, number: int) -> int:
        """The first segment number whose records segment ``number`` holds."""
        fd = self._fs.open_read_only(self._file(segment_file_name(number)))
        try:
            start = self._fs.pread(fd, fmt.SEGMENT_START_SIZE, 0)
        finally:
            self._fs.close(fd)
        covers_from = fmt.compacted_covers_from(start)
        if covers_from is None:
            return number
        if not 1 <= covers_from <= number:
            raise CorruptionError(
                self._file(segment_file_name(number)),
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
        if superseded and not self.options.read_only:
            for number in superseded:
                self._fs.unlink(self._file(segment_file_name(number)))
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
        self._covers = covers
        return kept

    def _missing_segments(self, missing: list[int], before: int) -> None:
        if self.options.recovery != "salvage":
            raise CorruptionError(
                self._file(segment_file_name(missing[0])),
                0,
                f"segment {missing[0]} is missing (segments {missing[0]}..{missing[-1]} "
                f"before segment {before}); open with recovery='salvage' to accept the loss",
            )
        self.report.missing_segments.extend(missing)
        if self.options.read_only:
            return  # reported only: a read-only open changes nothing
        log.warning(
            "%s: segments %s are missing; replaced by empty segments (salvage)",
            self.path,
            missing,
        )
        for lost in missing:
            # An empty segment in the gap records that salvage accepted
            # the loss, so that later strict opens do not fail again.
            self._fs.close(self._create_segment(lost).fd)
            del self._segments[lost]

    def _file(self, name: str) -> str:
        return self.path + "/" + name

    def _aside_path(self, base: str, offset: int, suffix: str) -> str:
        name = f"{base}.{offset}{suffix}"
        candidate, n = name, 1
        while self._fs.exists(candidate):
            candidate = f"{name}.{n}"
            n += 1
        return candidate

    def _load_snapshot(self, numbers: list[int]) -> dict[int, int]:
        """Load the index snapshot if it matches the segments; {segment: scan from}.

        A segment the snapshot covers whole is not scanned (start = its size);
        the one it covers in part is scanned from where the snapshot stops;
        newer segments are scanned whole. Any mismatch: {} (scan everything).
        """
        path = self._file(SNAPSHOT_FILE_NAME)
        if not self._fs.exists(path):
            return {}
        try:
            fd = self._fs.open_read_only(path)
            try:
                snapshot = decode_snapshot(self._fs.read_all(fd))
            finally:
                self._fs.close(fd)
            marks = snapshot.segments
            if [m.number for m in marks] != numbers[: len(marks)] or not marks:
                raise CorruptionError(path, 0, "snapshot names other segments")
            for i, mark in enumerate(marks):
                seg_fd = self._fs.open_read_only(self._file(segment_file_name(mark.number)))
                try:
                    size = self._fs.file_size(seg_fd)
                    start = max(0, mark.size - TAIL_BYTES)
                    tail = self._fs.pread(seg_fd, mark.size - start, start)
                finally:
                    self._fs.close(seg_fd)
                last = i == len(marks) - 1
                if (
                    mark.covers_from != self._covers[mark.number]
                    or size < mark.size
                    or (size != mark.size and not last)
                    or len(tail) != mark.size - start
                    or tail_crc(tail) != mark.tail_crc
                ):
                    raise CorruptionError(path, 0, f"segment {mark.number} changed since")
        except (CorruptionError, OSError, ValueError, OverflowError) as exc:
            log.info("%s: index snapshot not used (%s); scanning the segments", self.path, exc)
            return {}
        self._namespaces = snapshot.namespaces
        self._checkpoint = snapshot.checkpoint
        self._seq = snapshot.seq
        self._live_bytes = snapshot.live_bytes
        self.report.snapshot_used = True
        return {mark.number: mark.size for mark in marks}

    def _write_snapshot(self) -> None:
        """Save the index for the next open (at close, after the final sync)."""
        marks = []
        for segment in self._segments.values():
            start = max(0, segment.size - TAIL_BYTES)
            tail = self._read(segment, segment.size - start, start)
            marks.append(
                SegmentMark(segment.number, segment.covers_from, segment.size, tail_crc(tail))
            )
        data = encode_snapshot(
            Snapshot(self._namespaces, self._checkpoint, self._seq, self._live_bytes, marks)
        )
        path = self._file(SNAPSHOT_FILE_NAME)
        tmp = path + TMP_SUFFIX
        if self._fs.exists(tmp):
            self._fs.unlink(tmp)
        self._fs.write_new_file(tmp, data)
        self._fs.rename(tmp, path)

    def _load_segment(self, number: int, is_newest: bool, start: int = 0) -> None:
        path = self._file(segment_file_name(number))
        read_only = self.options.read_only
        fd = self._fs.open_read_only(path) if read_only else self._fs.open_file(path)
        segment = Segment(number, path, fd, 0, self._covers[number])
        self._segments[number] = segment
        if start > SEGMENT_HEADER_SIZE:
            # The index snapshot covers the bytes below ``start``: read the
            # header and what was appended after the snapshot, nothing else.
            self._check_header(path, number, self._fs.pread(fd, SEGMENT_HEADER_SIZE, 0))
            size = self._fs.file_size(fd)
            segment.size = size
            if size > start:
                appended = self._fs.pread(fd, size - start, start)
                self._scan_segment(segment, appended, start, is_newest)
            return
        data = self._fs.read_all(fd)
        salvage = self.options.recovery == "salvage"
        records_follow = bool(next(fmt.scan_records(data, SEGMENT_HEADER_SIZE, _ignore), None))
        if is_newest and _header_torn(data) and not records_follow:
            # Crash while the segment was being created: its header never
            # reached the disk whole (short, zeros, or garbage from a power
            # loss before the header's fdatasync), and nothing valid follows.
            if read_only:
                self.report.torn_tails.append((path, 0, len(data), ""))
                return
            self._cut_tail(segment, data, 0, "incomplete segment header")
            self._fs.append(fd, fmt.encode_segment_header(number))
            self._fs.fdatasync(fd)
            segment.size = SEGMENT_HEADER_SIZE
            return
        try:
            self._check_header(path, number, data)
        except CorruptionError as exc:
            # A whole header of another version, or a file with no logstate
            # record in it: never guess. A damaged header before valid
            # records (the header was durable before them): damage.
            foreign = isinstance(exc, UnsupportedFormatError) and not _header_torn(data)
            if foreign or not (salvage and records_follow):
                if not foreign and records_follow:
                    raise CorruptionError(
                        path,
                        exc.offset,
                        f"{exc.reason}; valid records follow the header: open with "
                        "recovery='salvage' to keep them",
                    ) from None
                raise
            # Salvage: the header is damaged but the file is in the sequence:
            # report it, keep its bytes aside, and read on with a new header.
            header = fmt.encode_segment_header(number)
            damaged = data[:SEGMENT_HEADER_SIZE]
            data = header + data[SEGMENT_HEADER_SIZE:]
            self.report.salvaged.append((path, 0, SEGMENT_HEADER_SIZE, exc.reason))
            if not self.options.read_only:
                aside = self._aside_path(path, 0, DAMAGED_SUFFIX)
                self._fs.write_new_file(aside, damaged)
                log.warning("%s: damaged header (%s) moved to %s", path, exc.reason, aside)
                self._salvage_rewrite(segment, data, [])
        self._scan_segment(segment, data, 0, is_newest)

    def _check_header(self, path: str, number: int, data: bytes) -> None:
        try:
            found = fmt.decode_segment_header(data)
        except CorruptionError as exc:
            raise type(exc)(path, exc.offset, exc.reason) from None
        if found != number:
            raise CorruptionError(path, 0, f"header says segment {found}, file name says {number}")

    def _scan_segment(self, segment: Segment, data: bytes, base: int, is_newest: bool) -> None:
        """Apply the records of ``data`` (the segment's bytes from file offset ``base``).

        The recovery policy lives here: what each kind of damage the scanner
        reports means, depending on where it is and on the recovery mode.
        """
        path = segment.path
        number = segment.number
        read_only = self.options.read_only
        pending: list[fmt.Damage] = []
        salvage = self.options.recovery == "salvage"
        assert base == 0 or not salvage, "salvage never starts from a snapshot"
        shift = -base  # file offset = data offset - shift (salvage: minus removed bytes)
        dropped: list[fmt.Damage] = []
        scan_from = SEGMENT_HEADER_SIZE if base == 0 else 0
        prefix = self.options.recovery == "prefix" and is_newest
        for frame in fmt.scan_records(data, scan_from, pending.append):
            if pending and prefix:
                # Damage followed by valid records in the newest segment: with
                # sync="none"/"interval" a power loss can persist unsynced pages
                # out of order. "prefix" keeps the records before the first
                # damage (a prefix of the history) and cuts the rest, valid
                # records included, as a torn tail (copied aside).
                damage = pending[0]
                pending[:] = [fmt.Damage(damage.offset, len(data) - damage.offset, damage.reason)]
                break
            if pending:
                # Damage followed by a valid record: not a torn write (a torn
                # write has nothing valid after it). Strict refuses to guess.
                damage = pending[0]
                if not salvage:
                    raise CorruptionError(
                        path,
                        base + damage.offset,
                        f"{damage.reason} ({damage.size} bytes), followed by valid records; "
                        "open with recovery='prefix' to keep the records before it (newest "
                        "segment only) or 'salvage' to keep every valid record",
                    )
                dropped.extend(pending)
                if not read_only:  # read-only salvage rewrites nothing: offsets stay
                    shift += sum(d.size for d in pending)
                pending.clear()
            try:
                self._apply_frame(data, frame, number, shift)
            except CorruptionError as exc:
                # A record whose checksum is right but whose body does not parse.
                if prefix:
                    pending[:] = [fmt.Damage(frame.offset, len(data) - frame.offset, exc.reason)]
                    break
                if not salvage:
                    raise CorruptionError(path, base + exc.offset, exc.reason) from None
                dropped.append(fmt.Damage(frame.offset, frame.size, exc.reason))
                if not read_only:
                    shift += frame.size
            self.report.records += 1
        valid_end = len(data) - sum(d.size for d in pending)
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
                    base + tail.offset,
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
                self.report.salvaged.append((path, damage.offset, damage.size, damage.reason))
            if pending:
                torn = (path, base + valid_end, len(data) - valid_end, "")
                self.report.torn_tails.append(torn)
            segment.size = base + len(data)
            return
        if dropped:
            self._salvage_rewrite(segment, data, dropped + pending)
            segment.size = len(data) - sum(d.size for d in dropped + pending)
            return
        if pending:
            self._cut_tail(segment, data[valid_end:], base + valid_end, pending[0].reason)
        segment.size = base + valid_end

    def _cut_tail(self, segment: Segment, tail: bytes, offset: int, reason: str) -> None:
        """Copy ``tail`` (the bytes from file ``offset`` on) aside, then truncate there."""
        aside = self._aside_path(segment.path, offset, TORN_SUFFIX)
        self._fs.write_new_file(aside, tail)
        self._fs.fsync_dir(self.path)
        self._fs.truncate(segment.fd, offset)
        self._fs.fsync(segment.fd)
        size = len(tail)
        self.report.torn_tails.append((segment.path, offset, size, aside))
        log.warning(
            "%s: torn write at offset %d (%s): %d bytes copied to %s and cut off",
            segment.path,
            offset,
            reason,
            size,
            aside,
        )

    def _salvage_rewrite(self, segment: Segment, data: bytes, damaged: list[fmt.Damage]) -> None:
        """Move damaged ranges aside and rewrite the segment without them."""
        damaged = sorted(damaged)
        kept = []
        position = 0
        for damage in damaged:
            aside = self._aside_path(segment.path, damage.offset, DAMAGED_SUFFIX)
            self._fs.write_new_file(aside, data[damage.offset : damage.offset + damage.size])
            self.report.salvaged.append((segment.path, damage.offset, damage.size, damage.reason))
            log.warning(
                "%s: %d damaged bytes at offset %d (%s) moved to %s",
                segment.path,
                damage.size,
                damage.offset,
                damage.reason,
                aside,
            )
            kept.append(data[position : damage.offset])
            position = damage.offset + damage.size
        kept.append(data[position:])
        tmp = segment.path + TMP_SUFFIX
        self._fs.write_new_file(tmp, b"".join(kept))
        self._fs.rename(tmp, segment.path)
        self._fs.fsync_dir(self.path)
        self._fs.close(segment.fd)
        segment.fd = self._fs.open_file(segment.path)

    def _apply_frame(self, data: bytes, frame: fmt.Frame, segment: int, shift: int) -> None:
        """Apply one scanned record to the index.

        ``shift``: bytes a salvage rewrite removes before this record, so that
        locations point into the rewritten file.
        """
        if frame.seq > self._seq:
            self._seq = frame.seq
        kind, ops = fmt.replay_frame(data, frame.offset, frame.size, frame.record_type)
        namespaces = self._namespaces
        high = segment << 74
        for op_type, ns, key, op_offset, op_size in ops:
            loc: Location
            if kind == fmt.FRAME_PLAIN:
                loc = high | (op_offset - shift) << 34 | op_size << 2  # KIND_RECORD
            elif kind == fmt.FRAME_GROUP:
                loc = high | (op_offset - shift) << 34 | op_size << 2 | KIND_GROUP_OP
            else:
                loc = (segment, frame.offset - shift, frame.size, op_offset, op_size)
            if op_type == REC_SET:
                index = namespaces.get(ns)
                if index is None:
                    index = self._namespace_for_replay(ns)
                old = index.get(key)
                index[key] = loc
                self._live_bytes += op_size if old is None else op_size - location_size(old)
            else:
                self._apply_op(op_type, ns, key, loc)

    def _apply_op(self, op_type: int, ns: str, key: str, loc: Location) -> None:
        """Apply one operation to the index (recovery and the write path share it)."""
        if op_type == REC_SET:
            index = self._namespace_for_replay(ns)
            old = index.get(key)
            index[key] = loc
            self._live_bytes += location_size(loc) - (0 if old is None else location_size(old))
        elif op_type == REC_DELETE:
            found = self._namespaces.get(ns)
            if found is not None:
                old = found.pop(key, None)
                if old is not None:
                    self._live_bytes -= location_size(old)
        elif op_type == REC_CLEAR:
            self._clear_namespace(ns, drop_self=False)
        elif op_type == REC_CREATE_NS:
            self._namespace_for_replay(ns)
        elif op_type == REC_DROP_NS:
            self._clear_namespace(ns, drop_self=True)
        elif op_type == REC_CHECKPOINT:
            self._checkpoint = loc

    def _namespace_for_replay(self, ns: str) -> dict[str, Location]:
        index = self._namespaces.get(ns)
        if index is None:
            # create it and any missing parent (a parent is always created first
            # by the write path; this only keeps replay total)
            parts = ns.split(NS_SEPARATOR)
            for i in range(1, len(parts) + 1):
                index = self._namespaces.setdefault(NS_SEPARATOR.join(parts[:i]), {})
        assert index is not None
        return index

    def _clear_namespace(self, ns: str, drop_self: bool) -> None:
        for name in [n for n in self._namespaces if n and _is_within(n, ns) and n != ns]:
            self._live_bytes -= sizes(self._namespaces.pop(name))
        if drop_self and ns:
            self._live_bytes -= sizes(self._namespaces.pop(ns, {}))
        else:
            index = self._namespaces.get(ns)
            if index is not None:
                self._live_bytes -= sizes(index)
                index.clear()

    def _create_segment(self, number: int) -> Segment:
        """Create segment ``number`` with its header, durable before it is used."""
        if number > fmt.MAX_SEGMENT_NUMBER:
            raise StorageFailedError(f"{self.path}: segment numbers exhausted")
        path = self._file(segment_file_name(number))
        fd = self._fs.create_file(path)
        try:
            self._fs.append(fd, fmt.encode_segment_header(number))
            self._fs.fdatasync(fd)
            self._fs.fsync_dir(self.path)
        except BaseException:
            # the half-made file is the newest: the next open cuts it as torn
            self._fs.close(fd)
            raise
        segment = Segment(number, path, fd, SEGMENT_HEADER_SIZE)
        self._segments[number] = segment
        return segment

    # ================================================================== write path
    def _check_writable(self) -> None:
        """Raise unless writes are allowed. Call with ``_lock`` held."""
        if self.options.read_only:
            raise ReadOnlyStorageError(f"storage {self.path} was opened read-only")
        if self._closed or self._closing:
            raise StorageClosedError(f"storage {self.path} is closed")
        if self._failed is not None:
            raise StorageFailedError(
                f"storage {self.path} refuses writes after an earlier I/O error "
                f"({self._failed!r}); close every handle and reopen it"
            ) from self._failed

    def _append(self, record: bytes) -> tuple[int, int]:
        """Append one record to the active segment. Call with ``_lock`` held.

        Returns:
            (segment number, offset) of the record.
        """
        active = self._active
        assert active is not None
        size = len(record)
        if active.size + size > self.options.segment_size and active.size > SEGMENT_HEADER_SIZE:
            active = self._roll()
        offset = active.size
        try:
            self._fs.append(active.fd, record)
        except OSError as exc:
            self._failed = exc
            raise
        active.size = offset + size
        self._written_pos += size
        if self._sync_interval and not self._dirty:
            with self._cond:
                self._dirty = True
                self._cond.notify()
        return active.number, offset

    def _roll(self) -> Segment:
        """Seal the active segment (durable) and start the next one."""
        old = self._active
        assert old is not None
        try:
            self._fs.fdatasync(old.fd)
            new = self._create_segment(old.number + 1)
            for mapping in self._retired_maps:  # retired one roll ago: no reader left
                mapping.close()
            self._retired_maps.clear()
            self._map(old)  # sealed: its bytes never change again
        except OSError as exc:
            self._failed = exc
            raise
        self._active = new
        self._written_pos += SEGMENT_HEADER_SIZE
        with self._sync_cond:  # lock order: _lock, then _sync_cond
            self._synced_pos = max(self._synced_pos, self._written_pos)
        self._maybe_start_compaction()
        return new

    def _commit(self, end_pos: int) -> None:
        """Make every byte up to ``end_pos`` durable; concurrent callers share one sync.

        Group commit, leader and followers: a caller whose bytes are not yet
        durable takes the sync turn and fdatasyncs everything written so far.
        Callers arriving during that sync wait, and are woken together when
        it ends: covered by it, or the first of them leads the next sync,
        which covers all of their records at once. (A plain lock handed from
        waiter to waiter wakes them one by one; each late wake-up then starts
        a sync of its own record alone.)
        """
        if self._synced_pos >= end_pos:
            return
        target = -1
        if not self._sync_turn(end_pos):
            return  # another writer's fdatasync covered ours
        try:
            with self._lock:
                if self._failed is not None or self._closed:
                    # After a failed write or sync (close()'s too) never sync
                    # again and report success (fsyncgate); a closed engine's
                    # descriptors are gone (or reused by another file).
                    self._refuse_commit()
                target = self._written_pos
                active = self._active
                assert active is not None
            try:
                self._fs.fdatasync(active.fd)
            except OSError as exc:
                self._failed = exc
                target = -1
                raise
        finally:
            self._end_sync_turn(target)

    def _refuse_commit(self) -> None:
        """Raise why a commit cannot sync: an earlier I/O error, or a closed engine."""
        if self._failed is not None:
            raise StorageFailedError(
                f"storage {self.path}: the write was not made durable: an earlier "
                f"write or sync failed ({self._failed!r}); close every handle and reopen it"
            ) from self._failed
        raise StorageClosedError(f"storage {self.path} is closed")

    def _sync_turn(self, end_pos: int | None) -> bool:
        """Wait for the sync turn; False (no turn taken) once ``end_pos`` is durable.

        ``end_pos`` None (close) always takes the turn. Pair with
        :meth:`_end_sync_turn`.
        """
        cond = self._sync_cond
        with cond:
            while True:
                if end_pos is not None and self._synced_pos >= end_pos:
                    return False
                if not self._syncing:
                    self._syncing = True
                    return True
                cond.wait()

    def _end_sync_turn(self, synced_to: int) -> None:
        """Give the sync turn back, recording ``synced_to`` (-1: nothing) as durable."""
        with self._sync_cond:
            if synced_to > self._synced_pos:
                self._synced_pos = synced_to
            self._syncing = False
            self._sync_cond.notify_all()

    def _write(self, record_type: int, body: bytes) -> tuple[int, int, int, int]:
        """Frame and append one record. Call with ``_lock`` held.

        Returns:
            (segment, offset, record size, end position)
        """
        self._seq += 1
        record = fmt.encode_record(record_type, self._seq, body)
        segment, offset = self._append(record)
        return segment, offset, len(record), self._written_pos

    def set(self, ns: str, ns_bytes: bytes, key: str, key_bytes: bytes, value: bytes) -> None:
        """Store an encoded value under ``key`` in namespace ``ns``.

        The hot path: one lock, one encode, one write; ``_append`` inlined.
        """
        body_size = len(ns_bytes) + NAME_LEN_SIZE + len(key_bytes) + len(value)
        with self._lock:
            if self._failed is not None or self._closing or self._closed or self._read_only:
                self._check_writable()
            index = self._namespaces.get(ns)
            if index is None:
                raise SubStorageDeletedError(f"sub-storage {ns!r} of {self.path} was deleted")
            if body_size > _MAX_BODY_SIZE:
                raise fmt.record_too_large(SEQ_SIZE + body_size)
            self._seq = seq = self._seq + 1
            # fmt.encode_record(REC_SET, seq, ns key value), inlined: one join
            rest = b"".join(
                (
                    _pack_length_type_seq(SEQ_SIZE + body_size, REC_SET, seq),
                    ns_bytes,
                    _pack_name_len(len(key_bytes)),
                    key_bytes,
                    value,
                )
            )
            record = _pack_u32(_crc_bytes(rest)) + rest
            size = len(record)
            active = self._active
            assert active is not None
            offset = active.size
            if offset + size > self._segment_size and offset > SEGMENT_HEADER_SIZE:
                segment, offset = self._append(record)
            else:
                try:
                    # one write(2) straight from here when the file system is
                    # the plain one (a test's may inject faults in append)
                    os_write = self._os_write
                    written = 0 if os_write is None else os_write(active.fd, record)
                    if written != size:  # a short write, or a file system of a test's
                        self._fs.append(
                            active.fd, memoryview(record)[written:] if written else record
                        )
                except OSError as exc:
                    self._failed = exc
                    raise
                active.size = offset + size
                self._written_pos += size
                segment = active.number
                if self._sync_interval and not self._dirty:
                    with self._cond:
                        self._dirty = True
                        self._cond.notify()
            old = index.get(key)
            index[key] = segment << 74 | offset << 34 | size << 2  # KIND_RECORD
            if old is None:
                self._live_bytes += size
            elif type(old) is int:
                self._live_bytes += size - ((old >> 2) & U32)
            else:
                self._live_bytes += size - location_size(old)
            end_pos = self._written_pos
        if self._sync_always:
            self._commit(end_pos)
        if self._backlog:
            self._wait_for_compaction()

    def delete(self, ns: str, ns_bytes: bytes, key: str, key_bytes: bytes) -> bool:
        """Delete ``key``; write nothing and return False when it is absent."""
        with self._lock:
            self._check_writable()
            index = self._namespace(ns)
            if key not in index:
                return False
            *_, end_pos = self._write(
                REC_DELETE, ns_bytes + NAME_LEN.pack(len(key_bytes)) + key_bytes
            )
            self._live_bytes -= location_size(index.pop(key))
        if self._sync_always:
            self._commit(end_pos)
        return True

    def clear(self, ns: str) -> None:
        """Remove every key of ``ns`` and every sub-storage below it: one record."""
        with self._lock:
            self._check_writable()
            self._namespace(ns)
            *_, end_pos = self._write(REC_CLEAR, fmt.encode_name(ns))
            self._clear_namespace(ns, drop_self=False)
        if self._sync_always:
            self._commit(end_pos)

    def create_namespace(self, ns: str) -> None:
        """Make sub-storage ``ns`` exist (its parent must exist)."""
        with self._lock:
            if ns in self._namespaces and not (self._closed or self._closing):
                return  # nothing to write: a read, allowed after a failed write
            self._check_writable()
            parent = ns.rpartition(NS_SEPARATOR)[0]
            self._namespace(parent)
            *_, end_pos = self._write(REC_CREATE_NS, fmt.encode_name(ns))
            self._namespaces[ns] = {}
        if self._sync_always:
            self._commit(end_pos)

    def drop_namespaces(self, namespaces: list[str]) -> int:
        """Delete the given sub-storages (with everything below them) atomically.

        Returns:
            How many of them existed (only those are written).
        """
        with self._lock:
            self._check_writable()
            present = [ns for ns in namespaces if ns in self._namespaces]
            if not present:
                return 0
            if len(present) == 1:
                *_, end_pos = self._write(REC_DROP_NS, fmt.encode_name(present[0]))
            else:
                body = fmt.encode_group_body([(REC_DROP_NS, fmt.encode_name(ns)) for ns in present])
                *_, end_pos = self._write(REC_GROUP, body)
            for ns in present:
                self._clear_namespace(ns, drop_self=True)
        if self._sync_always:
            self._commit(end_pos)
        return len(present)

    def write_group(
        self,
        ops: list[tuple[int, bytes]],
        checkpoint: bytes | None = None,
        names: list[tuple[str, str]] | None = None,
    ) -> int:
        """Append ``ops`` (type, body) as ONE group record: all of them or none survive.

        A single operation is written as a plain record. Namespaces named by
        the operations must exist (or be created earlier in the group).

        Args:
            ops: (operation type, encoded body) pairs, applied in order.
            checkpoint: an encoded value stored as the group's last operation.
            names: (namespace, key) of each op, from a caller that built the
                bodies itself (Batch, InMemoryStorage): the bodies are then
                not decoded again. Without it every body is decoded (checked).

        Returns:
            The number of operations written.
        """
        if names is None:
            names = []
            for op_type, body in ops:
                op = fmt.decode_op(op_type, body, 0, len(body))
                names.append((op.ns, op.key))
        else:
            names = list(names)
        if checkpoint is not None:
            ops = [*ops, (REC_CHECKPOINT, checkpoint)]
            names.append(("", ""))
        if not ops:
            return 0
        with self._lock:
            self._check_writable()
            created: set[str] = set()
            namespaces = self._namespaces
            for (op_type, _body), (ns, _key) in zip(ops, names, strict=True):
                if op_type == REC_CREATE_NS:
                    created.add(ns)
                elif ns not in namespaces and ns not in created and op_type != REC_CHECKPOINT:
                    self._namespace(ns)  # raises SubStorageDeletedError
            if len(ops) == 1:
                segment, offset, size, end_pos = self._write(ops[0][0], ops[0][1])
                ns, key = names[0]
                loc = pack_location(segment, offset, size, KIND_RECORD)
                self._apply_op(ops[0][0], ns, key, loc)
            else:
                body = fmt.encode_group_body(
                    ops, self.options.compress_min_size, self.options.zstd_level
                )
                segment, offset, size, end_pos = self._write(REC_GROUP, body)
                compressed = body[0] & fmt.GROUP_FLAG_ZSTD
                # where each op landed: in the file, or in the decompressed op list
                op_offset = 0 if compressed else offset + RECORD_OVERHEAD + fmt.GROUP_HEADER_SIZE
                apply = self._apply_op
                op_header = fmt.GROUP_OP_SIZE
                high = segment << 74 | KIND_GROUP_OP
                live = 0
                current_ns: str | None = None
                index: dict[str, Location] = {}
                for (op_type, op_body), (ns, key) in zip(ops, names, strict=True):
                    op_size = op_header + len(op_body)
                    if op_type == REC_SET and not compressed:
                        # the common case, inlined: one dict store per key
                        if ns != current_ns:
                            index = self._namespace_for_replay(ns)
                            current_ns = ns
                        old = index.get(key)
                        index[key] = high | op_offset << 34 | op_size << 2
                        live += op_size if old is None else op_size - location_size(old)
                    else:
                        self._live_bytes += live
                        live = 0
                        current_ns = None  # a clear or drop may replace the dict
                        where: Location
                        if compressed:
                            where = (segment, offset, size, op_offset, op_size)
                        else:
                            where = pack_location(segment, op_offset, op_size, KIND_GROUP_OP)
                        apply(op_type, ns, key, where)
                    op_offset += op_size
                self._live_bytes += live
        if self._sync_always:
            self._commit(end_pos)
        if self._backlog:
            self._wait_for_compaction()
        return len(ops)

    def write_keys(
        self,
        ns: str,
        ns_bytes: bytes,
        keys: list[str],
        values: list[bytes | None],
        checkpoint: bytes | None = None,
    ) -> int:
        """Set (or, where the value is None, delete) ``keys`` of ``ns`` as ONE group.

        The same record :meth:`write_group` writes for these operations, by a
        path with no per-operation tuples (InMemoryStorage.flush). Keys must
        be valid (checked with ``encode_key``) and distinct.

        Returns:
            The number of operations written (the checkpoint counts as one).
        """
        ops = fmt.encode_key_ops(ns_bytes, keys, values)
        if checkpoint is not None:
            ops.append(fmt.encode_op(REC_CHECKPOINT, checkpoint))
        count = len(ops)
        compress_from = self.options.compress_min_size
        if count < 2 or (compress_from is not None and sum(map(len, ops)) >= compress_from):
            # one record, or a compressed group: the general path
            pairs = [(op[4], op[fmt.GROUP_OP_SIZE :]) for op in ops[: len(keys)]]
            return self.write_group(pairs, checkpoint, names=[(ns, key) for key in keys])
        body = fmt.GROUP_HEADER.pack(0, count) + b"".join(ops)
        with self._lock:
            self._check_writable()
            index = self._namespace(ns)  # raises SubStorageDeletedError
            segment, offset, _size, end_pos = self._write(REC_GROUP, body)
            op_offset = offset + RECORD_OVERHEAD + fmt.GROUP_HEADER_SIZE
            high = segment << 74 | KIND_GROUP_OP
            live = 0
            get = index.get
            for key, value, op in zip(keys, values, ops, strict=False):
                op_size = len(op)
                if value is None:
                    old = index.pop(key, None)
                    if old is not None:
                        live -= location_size(old)
                else:
                    old = get(key)
                    index[key] = high | op_offset << 34 | op_size << 2
                    live += op_size if old is None else op_size - location_size(old)
                op_offset += op_size
            if checkpoint is not None:
                self._checkpoint = high | op_offset << 34 | len(ops[-1]) << 2
            self._live_bytes += live
        if self._sync_always:
            self._commit(end_pos)
        if self._backlog:
            self._wait_for_compaction()
        return count

    def _namespace(self, ns: str) -> dict[str, Location]:
        index = self._namespaces.get(ns)
        if index is None:
            raise SubStorageDeletedError(f"sub-storage {ns!r} of {self.path} was deleted")
        return index

    # ================================================================== compaction
    def compact(self) -> CompactionResult:
        """Compact every sealed segment now (see ``_compact``); returns what it did."""
        return run_compaction(self)

    def stats(self) -> dict[str, int]:
        """Sizes in bytes: total on disk, live (pointed to by the index), dead; counts."""
        with self._lock:
            total = sum(segment.size for segment in self._segments.values())
            return {
                "segments": len(self._segments),
                "total_bytes": total,
                "live_bytes": self._live_bytes,
                "dead_bytes": total - self._live_bytes,
                "keys": sum(len(index) for index in self._namespaces.values()),
                "sub_storages": len(self._namespaces) - 1,
            }

    def _maybe_start_compaction(self) -> None:
        """Start a background compaction when dead bytes reach the trigger. Under ``_lock``.

        The trigger: the store holds at least ``compact_min_size`` bytes and
        dead bytes are at least ``compact_ratio`` of them. When a compaction
        is already running and the store has grown a whole segment past the
        trigger size, writers are held back (``_backlog``) until it ends:
        disk use stays within trigger size + two segments.
        """
        options = self.options
        if not options.auto_compact or self._closing:
            return
        total = sum(segment.size for segment in self._segments.values())
        dead = total - self._live_bytes
        if total < options.compact_min_size or dead < options.compact_ratio * total:
            return
        if self._compacting:
            trigger_size = max(
                options.compact_min_size, self._live_bytes / (1 - options.compact_ratio)
            )
            if total >= trigger_size + self._segment_size:
                self._backlog = True
            return
        self._compacting = True
        self._compact_thread = threading.Thread(
            target=self._background_compaction, name=f"logstate-compact:{self.path}", daemon=True
        )
        self._compact_thread.start()

    def _background_compaction(self) -> None:
        try:
            run_compaction(self)
        except (StorageClosedError, StorageFailedError):
            pass  # closing, or an earlier failure already reported to writers
        except Exception:
            log.exception("%s: background compaction failed", self.path)
        finally:
            with self._lock:
                self._compacting = False  # from here a roll starts a new one
            with self._backlog_cond:
                self._backlog = False
                self._backlog_cond.notify_all()

    def _wait_for_compaction(self) -> None:
        """Hold a writer back while compaction is a whole segment behind (outside ``_lock``)."""
        with self._backlog_cond:
            while self._backlog and not self._closing:
                self._backlog_cond.wait(1.0)

    def _close_retired_fds(self) -> None:
        """Close mappings replaced earlier, and sealed segments' descriptors but the newest.

        Readers take no lock, so a reader may still hold one just retired:
        the descriptor of the segment sealed last stays open (see
        :meth:`_close_sealed_fds`). Under ``_lock``.
        """
        maps, self._retired_maps = self._retired_maps, []
        for mapping in maps:
            mapping.close()
        self._close_sealed_fds(keep=1)

    def _install_compaction(
        self,
        moved: list[tuple[str, str, Location, int]],
        old_checkpoint: Location | None,
        new_checkpoint: int | None,
        inputs: list[int],
        output: Segment,
    ) -> None:
        """Point the index at the compaction output, where nothing changed meanwhile."""
        with self._lock:
            try:
                self._map(output, close_older=False)  # first: if it fails, nothing changed
            except (OSError, ValueError) as exc:
                self._failed = exc  # the files changed under the engine: reopen
                raise
            for ns, key, old, new in moved:
                index = self._namespaces.get(ns)
                if index is not None and index.get(key) == old:
                    index[key] = new
                    self._live_bytes += location_size(new) - location_size(old)
            if new_checkpoint is not None and self._checkpoint == old_checkpoint:
                self._checkpoint = new_checkpoint
            self._pinned = None
            for number in inputs:
                # sealed: its mapping closed now (a reader still using it reads
                # again under the lock), its descriptor by _close_sealed_fds
                retired = self._segments.pop(number)
                self._mapped.pop(retired, None)
                mapping, retired.map, retired.mapped = retired.map, None, 0
                if mapping is not None:
                    mapping.close()
            self._segments[output.number] = output
            self._segments = dict(sorted(self._segments.items()))

    # ================================================================== durability
    def sync(self) -> None:
        """Make everything written so far durable now (fdatasync)."""
        with self._lock:
            if self._closed:
                raise StorageClosedError(f"storage {self.path} is closed")
            self._check_writable()
            end_pos = self._written_pos
        self._commit(end_pos)

    def _interval_loop(self) -> None:
        cond = self._cond
        interval = self.options.sync_interval
        while True:
            with cond:
                while not self._dirty and not self._closing:
                    cond.wait()
                if self._closing:
                    return
                cond.wait(interval)  # close() wakes it early; close syncs itself
                if self._closing:
                    return
                self._dirty = False
            try:
                self._commit(self._written_pos)
            except (OSError, StorageFailedError) as exc:
                # Recorded in _failed by _commit: every later write raises.
                log.error("%s: background sync failed: %r; writes are refused", self.path, exc)
                return

    # ================================================================== reads
    def get(self, ns: str, ns_bytes: bytes, key: str) -> bytes | memoryview | None:
        """The encoded value of ``key`` in ``ns`` (CRC-verified), or None.

        The hot path: one positioned read, one CRC, one prefix comparison
        that proves the record is this key's; anything unusual (a value in a
        compressed group, a mismatch to report) takes :meth:`_read_value`.
        """
        if self._closed:
            raise StorageClosedError(f"storage {self.path} is closed")
        index = self._namespaces.get(ns)
        if index is None:
            raise SubStorageDeletedError(f"sub-storage {ns!r} of {self.path} was deleted")
        loc = index.get(key)
        if loc is None:
            return None
        if type(loc) is int:
            segment = self._segments.get(loc >> 74)
            if segment is not None:
                offset = (loc >> 34) & U40
                end = offset + ((loc >> 2) & U32)
                mapping = segment.map
                try:
                    if mapping is not None and end <= segment.mapped:
                        data = mapping[offset:end]
                    else:
                        data = self._fs.pread(segment.fd, end - offset, offset)
                except (ValueError, OSError):  # a mapping or fd retired meanwhile
                    data = b""
                key_bytes = key.encode("utf-8")
                prefix = ns_bytes + _pack_name_len(len(key_bytes)) + key_bytes
                if loc & 3 == KIND_RECORD:
                    # fmt.set_record_value, inlined: the hottest read path
                    start = RECORD_OVERHEAD + len(prefix)
                    if len(data) > start:
                        crc, length, record_type = _unpack_frame_header(data)
                        if (
                            record_type == REC_SET
                            and length + FRAME_HEADER_SIZE == len(data)
                            and data.startswith(prefix, RECORD_OVERHEAD)
                            and crc == _crc_bytes(data[4:])
                        ):
                            return data[start:]
                else:
                    value = _set_group_op_value(data, prefix)
                    if value is not None:
                        return value
        return self._read_settled(ns, key)

    def _read_settled(self, ns: str, key: str) -> bytes | memoryview | None:
        """Read ``key`` under the write lock: the slow path, and the arbiter.

        Readers take no lock, so a compaction may switch the index and the
        segment files between a reader's look-up and its read (the output
        reuses the last input's number). Under the lock the index and the
        segments agree: a failure here is real damage, raised with its place.
        """
        with self._lock:
            if self._closed or self._closing:
                raise StorageClosedError(f"storage {self.path} is closed")
            index = self._namespaces.get(ns)
            if index is None:
                raise SubStorageDeletedError(f"sub-storage {ns!r} of {self.path} was deleted")
            loc = index.get(key)
            if loc is None:
                return None
            segment = self._segments.get(location_segment(loc))
            if segment is not None and segment.map is None and segment is not self._active:
                self._map_again(segment)  # unmapped (beyond the cap): map it for the next reads
            return self._read_value(loc, ns, key)

    def _read_value(self, loc: Location, ns: str, key: str) -> bytes | memoryview:
        """Read and fully check a value (the general path; errors say where and why)."""
        if type(loc) is int:
            size = (loc >> 2) & U32
            offset = (loc >> 34) & U40
            segment = self._segment_of(loc >> 74, key)
            data = self._read(segment, size, offset)
            try:
                if loc & 3 == KIND_RECORD:
                    op_type = fmt.check_record(data)
                    op = fmt.decode_op(op_type, data, RECORD_OVERHEAD, size)
                else:
                    fmt.check_group_op(data)
                    op = fmt.decode_op(data[4], data, fmt.GROUP_OP_SIZE, size)
            except CorruptionError as exc:
                raise CorruptionError(segment.path, offset + exc.offset, exc.reason) from None
        else:
            assert isinstance(loc, tuple)
            return self._value_in_group(self._decompress_group(loc), loc, ns, key)
        if op.key != key or op.ns != ns:
            # The index pointed at another key's record: never return its value.
            raise CorruptionError(
                segment.path, offset, f"index points to key {op.key!r}, expected {key!r}"
            )
        return data[op.value_start : op.value_end]

    def where(self, ns: str, key: str) -> tuple[str, int]:
        """(segment path, record offset) of ``key``'s value, for error messages."""
        loc = self._namespace_for_read(ns).get(key)
        if loc is None:
            return self.path, 0
        if type(loc) is int:
            number, offset, _size, _kind = unpack_location(loc)
        else:
            assert isinstance(loc, tuple)
            number, offset = loc[0], loc[1]
        return self._file(segment_file_name(number)), offset

    def _segment_of(self, number: int, key: str) -> Segment:
        segment = self._segments.get(number)
        if segment is None:
            raise CorruptionError(
                self._file(segment_file_name(number)),
                0,
                f"the index points {key!r} into segment {number}, which does not exist",
            )
        return segment

    def _decompress_group(
        self, loc: CompressedLocation, record: bytes | None = None
    ) -> bytes | memoryview:
        """The decompressed op list of the compressed group at ``loc`` (checked).

        ``record``: the group record's bytes when the caller read them already.
        """
        number, record_offset, record_size, _op_offset, _op_size = loc
        segment = self._segment_of(number, "")
        if record is None:
            record = self._read(segment, record_size, record_offset)
        try:
            fmt.check_record(record)
            _c, raw, _ops = fmt.decode_group(memoryview(record)[FRAME_HEADER_SIZE:])
        except CorruptionError as exc:
            raise CorruptionError(segment.path, record_offset + exc.offset, exc.reason) from None
        return raw

    def _value_in_group(
        self, raw: bytes | memoryview, loc: CompressedLocation, ns: str, key: str
    ) -> bytes | memoryview:
        """The value of ``key`` in a decompressed op list (its op CRC checked)."""
        number, record_offset, _record_size, op_offset, op_size = loc
        data = raw[op_offset : op_offset + op_size]
        path = self._segments[number].path
        try:
            fmt.check_group_op(data)
            op = fmt.decode_op(data[4], data, fmt.GROUP_OP_SIZE, op_size)
        except CorruptionError as exc:
            raise CorruptionError(
                path, record_offset, f"in compressed group, op at {op_offset}: {exc.reason}"
            ) from None
        if op.key != key or op.ns != ns:
            raise CorruptionError(
                path, record_offset, f"index points to key {op.key!r}, expected {key!r}"
            )
        return data[op.value_start : op.value_end]

    def contains(self, ns: str, key: str) -> bool:
        return key in self._namespace_for_read(ns)

    def load_namespace(self, ns: str) -> dict[str, bytes | memoryview]:
        """Every key of ``ns`` with its encoded value, CRC-checked, in one pass.

        Reads each segment that holds a value of ``ns`` once (in location
        order) instead of one positioned read per key; values inside a
        compressed group are decompressed once per group.

        Raises:
            CorruptionError: a value fails its checksum (path and offset named).
        """
        try:
            return self._load_namespace(ns, locked=False)
        except OSError as exc:
            # EBADF: a descriptor closed meanwhile; ENOENT: a segment file
            # compacted away. Anything else is a real I/O error: raised.
            if exc.errno not in (errno.EBADF, errno.ENOENT):
                raise
        except (CorruptionError, KeyError):
            pass
        # A compaction switched segments under the unlocked bulk read (stale
        # offsets, a retired descriptor or file): read again under the write
        # lock, where index and files agree; a failure there is real damage.
        with self._lock:
            return self._load_namespace(ns, locked=True)

    def _load_namespace(self, ns: str, locked: bool) -> dict[str, bytes | memoryview]:
        index = self._namespace_for_read(ns)
        if locked:
            items = list(index.items())
        else:
            with self._lock:
                items = list(index.items())
        plain = sorted((loc, key) for key, loc in items if type(loc) is int)
        result: dict[str, bytes | memoryview] = {}
        data = b""
        loaded = -1
        for loc, key in plain:
            segment = loc >> 74
            if segment != loaded:
                data = self._segment_bytes(self._segments[segment])
                loaded = segment
            offset = (loc >> 34) & U40
            size = (loc >> 2) & U32
            chunk = data[offset : offset + size]
            value = None
            if len(chunk) == size:
                key_bytes = key.encode("utf-8")
                prefix = self._ns_bytes(ns) + _pack_name_len(len(key_bytes)) + key_bytes
                check = _set_record_value if loc & 3 == KIND_RECORD else _set_group_op_value
                value = check(chunk, prefix)
            result[key] = value if value is not None else self._read_value(loc, ns, key)
        groups: dict[tuple[int, int], bytes | memoryview] = {}
        for key, location in items:
            if type(location) is int:
                continue
            assert isinstance(location, tuple)
            where = (location[0], location[1])
            raw = groups.get(where)
            if raw is None:
                raw = groups[where] = self._decompress_group(location)
            result[key] = self._value_in_group(raw, location, ns, key)
        return {key: result[key] for key, _loc in items}

    @staticmethod
    def _ns_bytes(ns: str) -> bytes:
        return fmt.encode_name(ns)

    def keys(self, ns: str) -> list[str]:
        index = self._namespace_for_read(ns)
        with self._lock:
            return list(index)

    def count(self, ns: str) -> int:
        return len(self._namespace_for_read(ns))

    def _namespace_for_read(self, ns: str) -> dict[str, Location]:
        if self._closed:
            raise StorageClosedError(f"storage {self.path} is closed")
        return self._namespace(ns)

    def has_namespace(self, ns: str) -> bool:
        return ns in self._namespaces

    def child_namespaces(self, ns: str) -> list[str]:
        """Names (not paths) of the sub-storages directly below ``ns``."""
        if self._closed:
            raise StorageClosedError(f"storage {self.path} is closed")
        prefix = ns + NS_SEPARATOR if ns else ""
        with self._lock:
            return sorted(
                n[len(prefix) :]
                for n in self._namespaces
                if n and n.startswith(prefix) and NS_SEPARATOR not in n[len(prefix) :]
            )

    def checkpoint(self) -> bytes | memoryview | None:
        """The encoded value of the last checkpoint written, or None."""
        with self._lock:  # rare: read it where the index and the files agree
            if self._closed:
                raise StorageClosedError(f"storage {self.path} is closed")
            loc = self._checkpoint
            if loc is None:
                return None
            return self._read_value(loc, "", "")

    # ================================================================== lifecycle
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    def close(self) -> None:
        """Stop the sync thread, sync (unless failed), close files, release the lock.

        Whatever fails, every mapping and descriptor is closed (or its close
        attempted) and the directory lock released before close returns or
        raises: the same process can open the directory again at once.

        Raises:
            OSError: the final sync failed, or else the first ``close(2)`` that
                failed (EIO on NFS or FUSE: what the file system reports at
                close); a later failure is logged.
        """
        with self._lock:
            if self._closed or self._closing:
                return
            self._closing = True
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._backlog_cond:
            self._backlog = False
            self._backlog_cond.notify_all()
        # A compaction (background, or compact() in another thread) sees
        # _closing and stops before its rename; one past it finishes first.
        with self._compact_lock:
            pass
        compaction = self._compact_thread
        if compaction is not None and compaction is not threading.current_thread():
            compaction.join()
        failure: BaseException | None = None
        try:
            self._sync_turn(None)
            synced_to = -1
            try:
                if self._failed is None and self._active is not None and not self.options.read_only:
                    try:
                        self._fs.fdatasync(self._active.fd)
                    except OSError as exc:
                        self._failed = exc  # writers still waiting must not sync again
                        raise
                    # every byte is durable now: a writer still on its way to
                    # _commit must find its record covered, not sync a closed fd
                    synced_to = self._written_pos
                    try:
                        self._write_snapshot()
                    except OSError as exc:  # a cache: the next open scans instead
                        log.warning("%s: index snapshot not written: %r", self.path, exc)
            finally:
                self._end_sync_turn(synced_to)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            try:
                with self._lock:  # readers that fall back to the lock see a closed engine
                    self._release_resources()
            except OSError as exc:
                if failure is None:
                    raise
                log.error("%s: closing after %r: %r", self.path, failure, exc)
            finally:
                self._closed_event.set()

    def _release_resources(self) -> None:
        """Close every mapping and descriptor, release the lock: each one whatever fails.

        Raises:
            OSError: the first close that failed, once everything is released
                (the others are logged).
        """
        self._closed = True  # first: unlocked readers check it before anything else
        failures: list[tuple[str, OSError]] = []
        try:
            segments = [*self._segments.values(), *self._sealed_fds, *self._mapped]
            maps = self._retired_maps
            fds: dict[int, str] = {}
            for segment in segments:
                if segment.map is not None:
                    maps.append(segment.map)
                    segment.map = None
                    segment.mapped = 0
                if segment.fd >= 0:
                    fds[segment.fd] = segment.path
                    segment.fd = -1
            self._retired_maps, self._sealed_fds = [], []
            self._mapped.clear()
            self._segments.clear()
            self._pinned = None
            for mapping in maps:
                mapping.close()
            for fd, path in fds.items():
                try:
                    self._fs.close(fd)
                except OSError as exc:
                    failures.append((path, exc))
        finally:
            if self._lock_fd is not None:
                lock_fd, self._lock_fd = self._lock_fd, None
                try:
                    self._fs.unlock_dir(lock_fd)
                except OSError as exc:
                    failures.append((self._file(LOCK_FILE_NAME), exc))
            self._closed = True
        for path, error in failures[1:]:
            log.error("%s: closing %s failed too: %r", self.path, path, error)
        if failures:
            raise failures[0][1]

    # ================================================================== invariants
    def _check(self) -> None:
        """Assert the engine's invariants (tests call this after each step)."""
        with self._lock:
            assert "" in self._namespaces, "root namespace missing"
            for ns in self._namespaces:
                if ns:
                    parent = ns.rpartition(NS_SEPARATOR)[0]
                    assert parent in self._namespaces, f"namespace {ns!r} without parent"
            assert self._synced_pos <= self._written_pos
            live = sum(sizes(index) for index in self._namespaces.values())
            assert self._live_bytes == live, f"live bytes {self._live_bytes}, index says {live}"
            if self._closed:
                return
            assert self._active is not None
            assert self._active.number == max(self._segments)
            assert len(self._mapped) <= self._mapping_cap, "more mappings than the cap"
            assert len(self._sealed_fds) <= SEALED_FDS_KEPT + 1, "sealed descriptors left open"
            for segment in self._segments.values():
                fd = segment.fd if segment.fd >= 0 else self._open_sealed(segment)
                try:
                    assert self._fs.file_size(fd) == segment.size, segment.path
                finally:
                    if fd != segment.fd:
                        self._fs.close(fd)
            for ns, index in self._namespaces.items():
                for key, loc in index.items():
                    value = self._read_value(loc, ns, key)
                    assert len(value) >= 1


# ====================================================================== registry
_registry: dict[str, Engine] = {}
_registry_lock = threading.Lock()


def acquire_engine(
    path: str,
    given: dict[str, object],
    create: bool,
    fs: FileSystem = OS_FS,
) -> Engine:
    """The engine for directory ``path``, opened if needed, with one more reference.

    Args:
        path: the storage directory.
        given: options the caller passed explicitly; others take the open
            engine's values (or the defaults when it is opened now).
        create: create the directory when missing.

    Raises:
        OptionConflictError: the directory is already open with other values
            for options in ``given``.
        FileNotFoundError: missing directory and ``create`` is False.
        StorageLockedError, CorruptionError, OSError: from opening.
    """
    options = validate_options(given)
    if not fs.is_dir(path):
        if fs.exists(path):
            raise NotADirectoryError(f"storage path {path} exists and is not a directory")
        if not create or options.read_only:
            raise FileNotFoundError(
                f"storage directory {path} does not exist (auto_create_dir=False)"
            )
        fs.make_dirs(path)
    real = fs.canonical_path(path)
    key = real + ("\0read-only" if options.read_only else "")
    while True:
        with _registry_lock:
            engine = _registry.get(key)
            closing = engine is not None and engine._refs == 0 and not engine.closed
            if not closing:
                return _share_or_open(engine, key, real, options, given, fs)
        # The last handle is closing it (final sync, snapshot): wait, then open anew.
        assert engine is not None
        engine._closed_event.wait()


def _share_or_open(
    engine: Engine | None,
    key: str,
    real: str,
    options: EngineOptions,
    given: dict[str, object],
    fs: FileSystem,
) -> Engine:
    """Under ``_registry_lock``: one more reference on ``engine``, or a new engine."""
    if engine is not None and not engine.closed:
        conflicts = [
            f"{name}={value!r} (open with {getattr(engine.options, name)!r})"
            for name, value in given.items()
            if name != "recovery" and getattr(options, name) != getattr(engine.options, name)
        ]
        if conflicts:
            raise OptionConflictError(
                f"storage directory {real} is already open in this process with other "
                f"options: {', '.join(conflicts)}; close it first or pass the same options"
            )
    else:
        engine = Engine(real, options, fs)
        _registry[key] = engine
    engine._refs += 1
    return engine


def add_reference(engine: Engine) -> None:
    """One more handle shares ``engine`` (a sub-storage handle)."""
    with _registry_lock:
        if engine.closed:
            raise StorageClosedError(f"storage {engine.path} is closed")
        engine._refs += 1


def release_engine(engine: Engine) -> None:
    """Drop one reference; the last one closes the engine and releases the lock.

    The engine stays registered while it closes, so that a new open of the
    same directory in this process waits for the close instead of finding
    the directory locked by itself.
    """
    with _registry_lock:
        engine._refs -= 1
        if engine._refs > 0:
            return
    try:
        engine.close()
    finally:
        key = engine.path + ("\0read-only" if engine.options.read_only else "")
        with _registry_lock:
            if _registry.get(key) is engine:
                del _registry[key]


def open_engines() -> Iterable[Engine]:
    """Engines currently open in this process (for tests and diagnostics)."""
    with _registry_lock:
        return list(_registry.values())
