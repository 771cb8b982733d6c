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

import _thread
import contextlib
import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from logstate import _format as fmt
from logstate._compact import CompactionResult
from logstate._compact import compact as run_compaction
from logstate._errors import (
    CorruptionError,
    OptionConflictError,
    ReadOnlyStorageError,
    StorageChangedError,
    StorageClosedError,
    StorageFailedError,
    StorageForkedError,
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
    compressed_location,
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
    "acquire_reference",
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
READ_ONLY_OPEN_ATTEMPTS: Final = 10  # a listed segment vanished: list again, this many times
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


class _SegmentVanished(Exception):
    """A segment file named by the directory listing was gone when opened (read-only open)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class Worker:
    """A background thread of an engine (interval sync, compactor).

    Started with ``_thread.start_new_thread``, not ``threading.Thread.start``:
    the latter waits on a Python ``Event`` that an interrupt (Ctrl-C during an
    open) can leave with its lock in a wrong state, replacing the
    KeyboardInterrupt with a RuntimeError. ``join`` waits on a C lock the
    thread holds while it runs (a thread not started yet exits at once: it
    finds the engine closing).
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self.name = name
        self.ident: int | None = None
        self._running = threading.Lock()

    def start(self) -> None:
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        with self._running:
            self.ident = threading.get_ident()
            threading.current_thread().name = self.name
            self._target()

    def is_alive(self) -> bool:
        return self._running.locked()

    def join(self) -> None:
        """Wait for the thread to finish (at once if it has not started)."""
        with self._running:
            pass


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
    copy_torn_tails: bool = True  # False: a torn tail is cut without a copy aside (full disk)


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
    for name in ("auto_compact", "read_only", "use_snapshot", "copy_torn_tails"):
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
    snapshot_refused: str = ""  # why an index.snapshot present was not used ("" otherwise)

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

    # In a child forked from the process that opened this engine: that
    # process's pid (see _after_fork_in_child); every method then raises.
    _forked_from: int | None = None

    def __init__(
        self,
        path: str,
        options: EngineOptions,
        fs: FileSystem = OS_FS,
        registry_key: str | None = None,
    ) -> None:
        """Open ``path``; ``registry_key``: register the engine there (under
        ``_registry_lock``) as soon as it is open, so that an exception before
        the caller has it leaves it to be found and closed, not lost."""
        self.path = path
        self.options = options
        self._fs = fs
        self._os_write = fs.raw_write_function()
        # Every lock is a plain C lock taken with ``with``: an exception raised
        # between two bytecodes (KeyboardInterrupt, SystemExit from a signal
        # handler) can never leave one held (threading.Condition and Event
        # are Python code that can be interrupted half-way; none is used).
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # the fdatasync turn (group commit)
        self._sync_gate = threading.Lock()  # held by the leader during its sync (_commit)
        self._close_lock = threading.Lock()  # held while a close() runs
        self._stop_sync = threading.Lock()  # held until close: the interval thread's timer
        self._wake_compactor = threading.Lock()  # held while no compaction is requested
        self._compaction_gate = threading.Lock()  # held while a background compaction runs
        # (segment, offset, size, written_pos before) of the record being
        # appended while its bookkeeping is not finished: see _settle
        self._in_flight: tuple[Segment, int, int, int] | None = None
        self._switch_runs = 0  # runs of the pending compaction switch (_switch_to_output)
        # a compaction's index switch an exception interrupted: see _switch_to_output
        self._installing: (
            tuple[
                list[tuple[str, str, Location, Location]],
                Location | None,
                int | None,
                list[int],
                Segment,
                str | None,  # the output's temporary name: the rename may not have happened
            ]
            | None
        ) = None
        self._renaming = False  # that compaction's rename is running: no other call decides it
        self._namespaces: dict[str, dict[str, Location]] = {"": {}}
        self._segments: dict[int, Segment] = {}
        self._active: Segment | None = None
        self._seq = 0
        self._written_pos = 0  # bytes appended since open (all segments)
        self._synced_pos = 0  # bytes of that known durable
        self._closing = False
        self._closed = False
        self._released = False  # _release_resources finished
        self._final_synced = False  # close() made everything durable
        self._failed: BaseException | None = None
        self._refs = 0
        self._lock_fd: int | None = None
        self._thread: Worker | None = None
        self._checkpoint: Location | None = None
        self._covers: dict[int, int] = {}
        self._listed: dict[int, tuple[int, int]] = {}  # read-only: the file _covers_from read
        self._live_bytes = 0  # bytes of the records the index points to
        self._compact_lock = threading.Lock()
        self._compact_thread: Worker | None = None  # the background compactor
        self._retired_maps: list[mmap.mmap] = []  # mappings replaced; closed at the next roll
        self._closing_fds: list[tuple[int, str]] = []  # a close's descriptors not closed yet
        self._mapped: dict[Segment, None] = {}  # sealed segments with a mapping, oldest first
        self._mapping_cap = max(
            MIN_MAPPED_SEGMENTS, min(MAX_MAPPED_SEGMENTS, fs.descriptor_limit() // 8)
        )
        self._sealed_fds: list[Segment] = []  # sealed, own descriptor still open (_map)
        self._pinned: Segment | None = None  # never unmapped: compaction renames over its file
        self._identities: dict[int, tuple[int, int]] = {}  # read-only: files scanned at open
        self._backlog = False  # writers wait: a running compaction is a segment behind
        self._compacting = False  # a background compaction is requested or running (_lock)
        self._sync_always = options.sync == "always"
        self._sync_interval = options.sync == "interval"
        self._segment_size = options.segment_size
        # Early roll: compaction covers sealed segments only, so the active
        # segment is looked at every _roll_step bytes past _roll_size, and
        # sealed there when the store is due for compaction: a small, hot
        # store does not fill a whole segment with dead records first.
        self._roll_step = (
            max(options.compact_min_size // 4, 64 * 1024)
            if options.auto_compact
            else options.segment_size
        )
        self._roll_size = options.segment_size  # bytes of the active segment; set at open
        self._read_only = options.read_only
        self.report = RecoveryReport()
        self._lock_free = False  # no lock of this directory held in this process before _open
        try:
            self._open()
            if registry_key is not None:
                _registry[registry_key] = self  # (nothing interruptible after _open returned)
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

    def _release_after_failed_open(self) -> None:
        """Release what a failed open took (idempotent: it may be interrupted too)."""
        self._closing = True  # threads started already exit at their next wake-up
        for wake in (self._stop_sync, self._wake_compactor):
            if wake.locked():
                wake.release()
        if self._lock_fd is None and self._lock_free:
            # lock_dir took the lock, and the exception came before its
            # descriptor was stored: release it all the same
            self._lock_fd = self._fs.held_lock(self.path)
        self._release_resources()

    # ================================================================== open / recovery
    def _open(self) -> None:
        read_only = self.options.read_only
        # read-only: where each segment's last valid record ends (a torn tail
        # or dropped damage after it stays in the file and is never mapped)
        self._map_limit: dict[int, int] = {}
        if not read_only:
            self._lock_free = self._fs.held_lock(self.path) is None
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
            size = self._map_size(self._active)
            self._active.map = self._fs.map_read_only(self._active.fd, size)
            self._active.mapped = size if self._active.map is not None else 0
            if not read_only:
                # What a crashed writer left unsynced is readable now: make it
                # durable before anyone acts on it (flush() syncs only what
                # this process writes).
                self._fs.fdatasync(self._active.fd)
        elif read_only:
            raise FileNotFoundError(f"{self.path} holds no logstate segment (read-only open)")
        else:
            self._active = self._segments[1] = self._create_segment(1)
        assert self._active is not None
        self._roll_size = min(self._segment_size, self._active.size + self._roll_step)
        if read_only:
            return
        # Background threads are started here, never on a write path: a
        # Thread.start() interrupted half-way can leave the new thread stuck.
        if self._sync_interval:
            self._stop_sync.acquire()  # released by close: wakes the thread to exit
            self._thread = Worker(self._interval_loop, f"logstate-sync:{self.path}")
            self._thread.start()
        if self.options.auto_compact:
            self._wake_compactor.acquire()  # released by a roll that requests a compaction
            self._compact_thread = Worker(self._compactor_loop, f"logstate-compact:{self.path}")
            self._compact_thread.start()

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
        if segment not in self._sealed_fds:
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
                size = self._map_size(segment)
                segment.map = self._fs.map_read_only(fd, size)
                if segment.map is not None:
                    segment.mapped = size
                    self._add_mapping(segment)
        finally:
            self._fs.close(fd)

    def _map_size(self, segment: Segment) -> int:
        """How much of ``segment`` to map at open: all of it, but for a read-only
        open never the damaged bytes after its last valid record."""
        return min(segment.size, self._map_limit.get(segment.number, segment.size))

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
        if self._sync_lock.locked():  # a commit may be about to sync one of them
            keep = max(keep, SEALED_FDS_KEPT)
        while len(sealed) > keep:
            segment = sealed.pop(0)
            fd, segment.fd = segment.fd, -1
            if fd >= 0:  # (closed already: listed twice by a roll an interrupt repeated)
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
        """The first segment number whose records segment ``number`` holds.

        A read-only open records which file it read (``_listed``): the load
        must find the same file there (see :func:`_open_engine`).

        Raises:
            _SegmentVanished: read-only open, and the file is gone.
        """
        path = self._file(segment_file_name(number))
        try:
            fd = self._fs.open_read_only(path)
        except FileNotFoundError:
            if not self._read_only:
                raise
            raise _SegmentVanished(path) from None
        try:
            if self._read_only:
                self._listed[number] = self._fs.file_identity(fd)
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

    def _open_listed(self, number: int, path: str) -> int:
        """Read-only open: segment ``number``'s file, the same one ``_covers_from`` read.

        Raises:
            _SegmentVanished: it is gone, or another file is under its name
                (a compaction renamed its output over it): the open is retried.
        """
        try:
            fd = self._fs.open_read_only(path)
        except FileNotFoundError:
            raise _SegmentVanished(path) from None
        if self._fs.file_identity(fd) != self._listed.get(number):
            self._fs.close(fd)
            raise _SegmentVanished(path)
        return fd

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
            # the loss, so that later strict opens do not fail again. It is
            # written whole under a temporary name and renamed: a failure
            # (a full disk) must not leave a headerless segment in the
            # middle of the sequence, which no open could read.
            path = self._file(segment_file_name(lost))
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
        path = self._file(SNAPSHOT_FILE_NAME)
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
            self.report.snapshot_refused = str(exc)
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
            Snapshot(self._namespaces, self._checkpoint, self._seq, self._live_bytes, marks),
            max_size=sum(mark.size for mark in marks),
        )
        path = self._file(SNAPSHOT_FILE_NAME)
        if data is None:
            # Larger than the data it indexes, even compressed: open scans
            # instead; an older snapshot would only be read to be refused.
            log.info("%s: index snapshot not written (larger than the segments)", self.path)
            if self._fs.exists(path):
                self._fs.unlink(path)
            return
        tmp = path + TMP_SUFFIX
        if self._fs.exists(tmp):
            self._fs.unlink(tmp)
        self._fs.write_new_file(tmp, data)
        self._fs.rename(tmp, path)

    def _load_segment(self, number: int, is_newest: bool, start: int = 0) -> None:
        path = self._file(segment_file_name(number))
        read_only = self.options.read_only
        fd = self._open_listed(number, path) if read_only else self._fs.open_file(path)
        segment = Segment(number, path, fd, 0, self._covers[number])
        self._segments[number] = segment
        size = self._fs.file_size(fd)
        if start > SEGMENT_HEADER_SIZE:
            # The index snapshot covers the bytes below ``start``: read the
            # header and what was appended after the snapshot, nothing else.
            self._check_header(path, number, self._fs.pread(fd, SEGMENT_HEADER_SIZE, 0))
            segment.size = size
            if size > start:
                self._scan_segment(segment, start, size, is_newest)
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
                scan = self._scanner(fd, SEGMENT_HEADER_SIZE, size, _ignore)
                follow.append(next(scan.frames(), None) is not None)
            return follow[0]

        if is_newest and _header_torn(head) and not records_follow():
            # Crash while the segment was being created: its header never
            # reached the disk whole (short, zeros, or garbage from a power
            # loss before the header's fdatasync), and nothing valid follows.
            if read_only:
                self.report.torn_tails.append((path, 0, size, ""))
                return
            self._cut_tail(segment, 0, size, "incomplete segment header")
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
            self.report.salvaged.append((path, 0, SEGMENT_HEADER_SIZE, exc.reason))
            if not self.options.read_only:
                aside = self._copy_aside(segment, 0, SEGMENT_HEADER_SIZE, DAMAGED_SUFFIX)
                log.warning("%s: damaged header (%s) moved to %s", path, exc.reason, aside)
                self._salvage_rewrite(segment, size, [], fmt.encode_segment_header(number))
        self._scan_segment(segment, 0, size, is_newest)

    def _scanner(
        self, fd: int, start: int, end: int, report: Callable[[fmt.Damage], None]
    ) -> fmt.WindowedScan:
        """A windowed scan of ``fd``'s bytes ``start..end`` that jumps over holes."""
        fs = self._fs

        def read(offset: int, size: int) -> bytes:
            return fs.pread(fd, size, offset)

        def skip(offset: int) -> int:
            return fs.data_offset(fd, offset)

        return fmt.WindowedScan(read, start, end, report, skip=skip)

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

    def _scan_segment(self, segment: Segment, base: int, end: int, is_newest: bool) -> None:
        """Apply the records of the segment's bytes from file offset ``base`` to ``end``.

        The bytes are read in windows (:class:`fmt.WindowedScan`); every
        offset here is a file offset. The recovery policy lives here: what
        each kind of damage the scanner reports means, depending on where it
        is and on the recovery mode.
        """
        path = segment.path
        number = segment.number
        read_only = self.options.read_only
        pending: list[fmt.Damage] = []
        salvage = self.options.recovery == "salvage"
        assert base == 0 or not salvage, "salvage never starts from a snapshot"
        removed = 0  # bytes a salvage rewrite removes before the current record
        dropped: list[fmt.Damage] = []
        scan_from = SEGMENT_HEADER_SIZE if base == 0 else base
        prefix = self.options.recovery == "prefix" and is_newest
        scan = self._scanner(segment.fd, scan_from, end, pending.append)
        last_end = scan_from  # where the last valid record ends
        for window, window_start, frame in scan.frames():
            if pending and prefix:
                # Damage followed by valid records in the newest segment: with
                # sync="none"/"interval" a power loss can persist unsynced pages
                # out of order. "prefix" keeps the records before the first
                # damage (a prefix of the history) and cuts the rest, valid
                # records included, as a torn tail (copied aside).
                damage = pending[0]
                pending[:] = [fmt.Damage(damage.offset, scan.end - damage.offset, damage.reason)]
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
                self._apply_frame(window, frame, number, removed - window_start)
            except CorruptionError as exc:
                # A record whose checksum is right but whose body does not parse.
                if prefix:
                    pending[:] = [fmt.Damage(at, scan.end - at, exc.reason)]
                    break
                if not salvage:
                    raise CorruptionError(path, window_start + exc.offset, exc.reason) from None
                dropped.append(fmt.Damage(at, frame.size, exc.reason))
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
                self.report.salvaged.append((path, damage.offset, damage.size, damage.reason))
            if pending:
                torn = (path, valid_end, end - valid_end, "")
                self.report.torn_tails.append(torn)
            segment.size = end
            if dropped or pending:
                self._map_limit[number] = last_end  # never map the damaged bytes
            return
        if dropped:
            self._salvage_rewrite(segment, end, dropped + pending)
            segment.size = end - sum(d.size for d in dropped + pending)
            return
        if pending:
            self._cut_tail(segment, valid_end, end, pending[0].reason)
        segment.size = valid_end

    def _cut_tail(self, segment: Segment, offset: int, end: int, reason: str) -> None:
        """Copy the bytes ``offset..end`` aside (unless copy_torn_tails is off), cut there."""
        size = end - offset
        aside = ""
        if self.options.copy_torn_tails:
            aside = self._copy_aside(segment, offset, size, TORN_SUFFIX)
        self._fs.truncate(segment.fd, offset)
        self._fs.fsync(segment.fd)
        self.report.torn_tails.append((segment.path, offset, size, aside))
        log.warning(
            "%s: torn write at offset %d (%s): %d bytes %s and cut off",
            segment.path,
            offset,
            reason,
            size,
            f"copied to {aside}" if aside else "not copied (copy_torn_tails=False)",
        )

    def _copy_aside(self, segment: Segment, offset: int, size: int, suffix: str) -> str:
        """Keep the segment's bytes ``offset..offset+size`` in a file beside it; its path.

        At most one copy per position and content: a copy with the same
        bytes (left by an open that failed after making it) is reused; a new
        one is written under a temporary name, made durable and renamed, so
        that a failure leaves no partial copy (the next open removes the
        temporary file). Copied in windows; runs of zeros become holes.

        Raises:
            OSError: ENOSPC/EDQUOT with a message naming the way out, or the
                file system's error.
        """
        name = f"{segment.path}.{offset}{suffix}"
        candidate, n = name, 1
        while self._fs.exists(candidate):
            if self._same_bytes(candidate, segment.fd, offset, size):
                self._fs.fsync_dir(self.path)
                return candidate
            candidate = f"{name}.{n}"
            n += 1
        tmp = candidate + TMP_SUFFIX
        created = False
        try:
            fd = self._fs.create_file(tmp)
            created = True
            try:
                self._copy_range(segment.fd, offset, size, fd)
                self._fs.fsync(fd)
            finally:
                self._fs.close(fd)
            self._fs.rename(tmp, candidate)
            created = False
            self._fs.fsync_dir(self.path)
        except OSError as exc:
            if created:
                self._discard_tmp(tmp)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            what = "torn tail" if suffix == TORN_SUFFIX else "damaged bytes"
            way_out = (
                f"; or cut it without a copy: logstate repair {self.path} --no-copy "
                "(its bytes are then not kept)"
                if suffix == TORN_SUFFIX
                else ""
            )
            raise OSError(
                exc.errno,
                f"no space left on the disk to copy the {what} of {segment.path} "
                f"({size} bytes at offset {offset}) aside before it is cut: free space "
                f"and open again{way_out}",
                tmp,
            ) from exc
        return candidate

    def _copy_range(self, src: int, offset: int, size: int, dst: int) -> None:
        """Append ``src``'s bytes ``offset..offset+size`` to the new file ``dst``, in windows.

        A window of zeros is not written: the file is extended over it (a
        hole), so that a zero-filled torn tail costs no disk space.
        """
        start = written = self._fs.file_size(dst)  # dst's size so far
        position = 0
        while position < size:
            data_at = self._fs.data_offset(src, offset + position) - offset
            if data_at > position:  # a hole: zeros, not read
                position = min(size, data_at)
                continue
            chunk = self._fs.pread(src, min(fmt.SCAN_WINDOW, size - position), offset + position)
            if not chunk:
                raise OSError(errno.EIO, f"file shorter than expected at offset {offset}")
            if chunk.count(0) != len(chunk):
                if written < start + position:
                    self._fs.truncate(dst, start + position)
                self._fs.append(dst, chunk)
                written = start + position + len(chunk)
            position += len(chunk)
        if written < start + size:
            self._fs.truncate(dst, start + size)

    def _discard_tmp(self, tmp: str) -> None:
        """Remove a temporary file a failed write left (if that fails too, the next open does)."""
        try:
            self._fs.unlink(tmp)
        except OSError as cleanup:
            log.warning("%s: could not remove %s: %r", self.path, tmp, cleanup)

    def _same_bytes(self, path: str, src: int, offset: int, size: int) -> bool:
        """Does file ``path`` hold exactly ``src``'s bytes ``offset..offset+size``?

        A link or another special file there is not a copy (never read through).
        """
        try:
            fd = self._fs.open_read_only(path)
        except CorruptionError:
            return False
        try:
            if self._fs.file_size(fd) != size:
                return False
            position = 0
            while position < size:
                length = min(fmt.SCAN_WINDOW, size - position)
                mine = self._fs.pread(fd, length, position)
                if not mine or mine != self._fs.pread(src, length, offset + position):
                    return False
                position += len(mine)
            return True
        finally:
            self._fs.close(fd)

    def _salvage_rewrite(
        self, segment: Segment, end: int, damaged: list[fmt.Damage], header: bytes = b""
    ) -> None:
        """Move damaged ranges aside and rewrite the segment without them (in windows).

        ``header``: written instead of the segment's first bytes (a damaged header).
        """
        damaged = sorted(damaged)
        for damage in damaged:
            aside = self._copy_aside(segment, damage.offset, damage.size, DAMAGED_SUFFIX)
            self.report.salvaged.append((segment.path, damage.offset, damage.size, damage.reason))
            log.warning(
                "%s: %d damaged bytes at offset %d (%s) moved to %s",
                segment.path,
                damage.size,
                damage.offset,
                damage.reason,
                aside,
            )
        tmp = segment.path + TMP_SUFFIX
        fd = self._fs.create_file(tmp)
        try:
            try:
                position = 0
                if header:
                    self._fs.append(fd, header)
                    position = len(header)
                for damage in damaged:
                    self._copy_range(segment.fd, position, damage.offset - position, fd)
                    position = damage.offset + damage.size
                self._copy_range(segment.fd, position, end - position, fd)
                self._fs.fsync(fd)
            finally:
                self._fs.close(fd)
        except OSError as exc:
            self._discard_tmp(tmp)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise OSError(
                exc.errno,
                f"no space left on the disk to rewrite {segment.path} without its damaged "
                f"bytes (salvage needs room for a copy of the segment, {end} bytes): free "
                "space and open again",
                tmp,
            ) from exc
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
        compressed = kind == fmt.FRAME_COMPRESSED_GROUP and ops
        raw_size = ops[-1][3] + ops[-1][4] if compressed else 0  # the decompressed op list
        for op_type, ns, key, op_offset, op_size in ops:
            loc: Location
            if kind == fmt.FRAME_PLAIN:
                loc = high | (op_offset - shift) << 34 | op_size << 2  # KIND_RECORD
            elif kind == fmt.FRAME_GROUP:
                loc = high | (op_offset - shift) << 34 | op_size << 2 | KIND_GROUP_OP
            else:
                loc = compressed_location(
                    segment, frame.offset - shift, frame.size, op_offset, op_size, raw_size
                )
                op_size = loc[5]  # its share of the record's bytes on disk
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
        """Create segment ``number`` with its header, durable before it is used.

        Written under a temporary name and renamed into place: an exception
        or a crash at any point leaves no segment file without its whole
        header (a temporary file is removed by the next roll or open).
        The caller registers it in ``_segments`` (with nothing interruptible
        between that and making it active).
        """
        if number > fmt.MAX_SEGMENT_NUMBER:
            raise StorageFailedError(f"{self.path}: segment numbers exhausted")
        path = self._file(segment_file_name(number))
        tmp = path + TMP_SUFFIX
        if self._active is not None:
            for left in (tmp, path):
                if self._fs.exists(left):
                    # Made by a roll that an exception interrupted before it
                    # switched to it: never written to, as records go to the
                    # active segment only (we hold the directory lock, and
                    # open loaded every segment).
                    self._fs.unlink(left)
        fd = self._fs.create_file(tmp)
        try:
            self._fs.append(fd, fmt.encode_segment_header(number))
            self._fs.fdatasync(fd)
            self._fs.rename(tmp, path)
            self._fs.fsync_dir(self.path)
        except BaseException:
            # Nothing is in it: remove it (if that fails too, the next roll
            # or open does; one renamed already holds its whole header).
            self._fs.close(fd)
            with contextlib.suppress(OSError):
                self._fs.unlink(tmp)
            raise
        return Segment(number, path, fd, SEGMENT_HEADER_SIZE)

    # ================================================================== write path
    def _check_writable(self) -> None:
        """Raise unless writes are allowed; finish an interrupted write first. Under ``_lock``."""
        if self._forked_from is not None:
            raise self._closed_error()
        if self._in_flight is not None or self._installing is not None:
            self._settle()
        if self.options.read_only:
            raise ReadOnlyStorageError(f"storage {self.path} was opened read-only")
        if self._closed or self._closing:
            raise self._closed_error()
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
        if active.size + size > self._roll_size and active.size > SEGMENT_HEADER_SIZE:
            if active.size + size > self._segment_size or self._compaction_due(early=True):
                active = self._roll()
            else:  # look again after another step
                self._roll_size = min(self._segment_size, active.size + size + self._roll_step)
        offset = active.size
        # The caller clears _in_flight once its index bookkeeping is done too;
        # until then an exception anywhere leaves it for _settle.
        self._in_flight = (active, offset, size, self._written_pos)
        try:
            self._fs.append(active.fd, record)
        except OSError as exc:
            self._failed = exc
            raise
        active.size = offset + size
        self._written_pos += size
        return active.number, offset

    def _settle(self) -> None:
        """Finish, or undo, the record an exception interrupted. Under ``_lock``.

        An exception (KeyboardInterrupt, SystemExit from a signal handler)
        can land between any two bytecodes of a write: after ``write(2)``
        returned but before the segment size, the written position and the
        index were updated. The file says which state is true: the record is
        whole in the file (the after state: its bookkeeping is redone from
        its bytes, as recovery would), or it is not there at all, or only
        part of it is (the before state: the part is cut off). Every step is
        idempotent, so a second interrupt here leaves ``_in_flight`` set and
        the next call under the lock settles it again.
        """
        if self._installing is not None:
            self._switch_to_output()
        pending = self._in_flight
        if pending is None:
            return
        segment, offset, size, pos_before = pending
        if self._failed is not None or segment is not self._active:
            # A failed write (the engine refuses writes; the next open cuts
            # what it left) or a segment already sealed: nothing to redo.
            self._in_flight = None
            return
        try:
            on_disk = self._fs.file_size(segment.fd)
            if on_disk >= offset + size:
                record = self._fs.pread(segment.fd, size, offset)
                frames = list(fmt.scan_records(record, 0, _ignore))
                if len(frames) != 1 or frames[0].size != size:
                    raise CorruptionError(
                        segment.path, offset, "interrupted record reads back wrong"
                    )
                self._apply_frame(record, frames[0], segment.number, -offset)
                segment.size = offset + size
                self._written_pos = pos_before + size
            else:
                if on_disk > offset:
                    self._fs.truncate(segment.fd, offset)  # a part of an unacknowledged record
                segment.size = offset
                self._written_pos = pos_before
        except (OSError, CorruptionError) as exc:
            self._failed = exc  # the file cannot be trusted to say: refuse writes until reopen
            self._in_flight = None
            raise
        self._live_bytes = sum(sizes(index) for index in self._namespaces.values())
        self._in_flight = None

    def _interrupted(self) -> None:
        """In an ``except BaseException``: settle what the exception cut short."""
        if self._in_flight is not None or self._installing is not None:
            self._settle()

    def _roll(self) -> Segment:
        """Seal the active segment (durable) and start the next one.

        Interrupted before the switch, it leaves the old segment active and
        can run again (``_create_segment`` replaces a next segment left
        half-made); the old one is sealed (``_map``: mapped, its descriptor
        let go) only once it is no longer the active one.
        """
        old = self._active
        assert old is not None
        try:
            self._fs.fdatasync(old.fd)
            new = self._create_segment(old.number + 1)
        except OSError as exc:
            self._failed = exc
            raise
        self._segments[new.number] = new  # with the switch: nothing interruptible between
        self._active = new
        try:
            for mapping in self._retired_maps:  # retired one roll ago: no reader left
                mapping.close()
            self._retired_maps.clear()
            self._map(old)  # sealed: its bytes never change again
        except OSError as exc:
            self._failed = exc
            raise
        self._roll_size = min(self._segment_size, SEGMENT_HEADER_SIZE + self._roll_step)
        self._written_pos += SEGMENT_HEADER_SIZE
        # Every byte written so far is durable (the old segment's fdatasync,
        # the new header's). No lock: _synced_pos only ever holds a position
        # that is durable, and a racing _commit can only store a lower one.
        if self._synced_pos < self._written_pos:
            self._synced_pos = self._written_pos
        self._maybe_start_compaction()
        return new

    def _commit(self, end_pos: int) -> None:
        """Make every byte up to ``end_pos`` durable; concurrent callers share one sync.

        Group commit, leader and followers: the caller that takes the sync
        turn (``_sync_lock``) fdatasyncs everything written so far. A caller
        arriving while a sync runs does not queue for the turn: it waits for
        that round's gate (a lock the leader holds during its sync), so that
        every caller the sync covered returns when it ends, and the first one
        it did not cover leads the next sync, which covers all of them.

        Interrupt-safe: the turn and the gates are C locks taken with
        ``with`` (released whatever is raised), and ``_synced_pos`` moves
        only after the fdatasync returned, to the position read before it.
        """
        while self._synced_pos < end_pos:
            if self._sync_lock.locked():
                # a sync is running: wait for the end of its round (a gate
                # already open is the previous round's: look again)
                gate = self._sync_gate
                if gate.locked():
                    with gate:
                        pass
                else:
                    time.sleep(0)  # let the leader publish its gate
                continue
            with self._sync_lock:
                if self._synced_pos >= end_pos:
                    return  # another writer's fdatasync covered ours
                gate = threading.Lock()
                with gate:
                    self._sync_gate = gate
                    with self._lock:
                        if self._failed is not None or self._closed:
                            # After a failed write or sync (close()'s too) never
                            # sync again and report success (fsyncgate); a closed
                            # engine's descriptors are gone (or reused).
                            self._refuse_commit()
                        target = self._written_pos
                        active = self._active
                        assert active is not None
                    try:
                        self._fs.fdatasync(active.fd)
                    except OSError as exc:
                        self._failed = exc
                        raise
                    if target > self._synced_pos:
                        self._synced_pos = target
            return

    def _refuse_commit(self) -> None:
        """Raise why a commit cannot sync: an earlier I/O error, or a closed engine."""
        if self._failed is not None:
            raise StorageFailedError(
                f"storage {self.path}: the write was not made durable: an earlier "
                f"write or sync failed ({self._failed!r}); close every handle and reopen it"
            ) from self._failed
        raise StorageClosedError(f"storage {self.path} is closed")

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
            if (
                self._failed is not None
                or self._closing
                or self._closed
                or self._read_only
                or self._in_flight is not None
            ):
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
            if offset + size > self._roll_size and offset > SEGMENT_HEADER_SIZE:
                try:
                    segment, offset = self._append(record)
                    self._index_set(index, key, segment << 74 | offset << 34 | size << 2)
                except BaseException:
                    self._interrupted()
                    raise
                self._in_flight = None
                end_pos = self._written_pos
            else:
                pos_before = self._written_pos
                try:
                    # one write(2) straight from here when the file system is
                    # the plain one (a test's may inject faults in append)
                    os_write = self._os_write
                    written = 0 if os_write is None else os_write(active.fd, record)
                    if written != size:  # a short write, or a file system of a test's
                        self._fs.append(
                            active.fd, memoryview(record)[written:] if written else record
                        )
                    active.size = offset + size
                    self._written_pos = end_pos = pos_before + size
                    old = index.get(key)
                    index[key] = active.number << 74 | offset << 34 | size << 2  # KIND_RECORD
                    if old is None:
                        self._live_bytes += size
                    elif type(old) is int:
                        self._live_bytes += size - ((old >> 2) & U32)
                    else:
                        self._live_bytes += size - location_size(old)
                except OSError as exc:
                    self._failed = exc
                    raise
                except BaseException:
                    # interrupted: no store before this one, so that no call
                    # can be interrupted again before _in_flight is set
                    self._in_flight = (active, offset, size, pos_before)
                    self._settle()
                    raise
        if self._sync_always:
            self._commit(end_pos)
        if self._backlog:
            self._wait_for_compaction()

    def _index_set(self, index: dict[str, Location], key: str, loc: Location) -> None:
        """Point ``key`` at ``loc`` and account for the live bytes."""
        old = index.get(key)
        index[key] = loc
        self._live_bytes += location_size(loc) - (0 if old is None else location_size(old))

    def delete(self, ns: str, ns_bytes: bytes, key: str, key_bytes: bytes) -> bool:
        """Delete ``key``; write nothing and return False when it is absent."""
        with self._lock:
            self._check_writable()
            index = self._namespace(ns)
            if key not in index:
                return False
            try:
                *_, end_pos = self._write(
                    REC_DELETE, ns_bytes + NAME_LEN.pack(len(key_bytes)) + key_bytes
                )
                self._live_bytes -= location_size(index.pop(key))
            except BaseException:
                self._interrupted()
                raise
            self._in_flight = None
        if self._sync_always:
            self._commit(end_pos)
        return True

    def clear(self, ns: str) -> None:
        """Remove every key of ``ns`` and every sub-storage below it: one record."""
        with self._lock:
            self._check_writable()
            self._namespace(ns)
            try:
                *_, end_pos = self._write(REC_CLEAR, fmt.encode_name(ns))
                self._clear_namespace(ns, drop_self=False)
            except BaseException:
                self._interrupted()
                raise
            self._in_flight = None
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
            try:
                *_, end_pos = self._write(REC_CREATE_NS, fmt.encode_name(ns))
                self._namespaces[ns] = {}
            except BaseException:
                self._interrupted()
                raise
            self._in_flight = None
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
                record_type, body = REC_DROP_NS, fmt.encode_name(present[0])
            else:
                record_type = REC_GROUP
                body = fmt.encode_group_body([(REC_DROP_NS, fmt.encode_name(ns)) for ns in present])
            try:
                *_, end_pos = self._write(record_type, body)
                for ns in present:
                    self._clear_namespace(ns, drop_self=True)
            except BaseException:
                self._interrupted()
                raise
            self._in_flight = None
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
            try:
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
                    raw_size = fmt.group_raw_size(body) if compressed else 0
                    # where each op landed: in the file, or in the decompressed op list
                    op_offset = (
                        0 if compressed else offset + RECORD_OVERHEAD + fmt.GROUP_HEADER_SIZE
                    )
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
                                where = compressed_location(
                                    segment, offset, size, op_offset, op_size, raw_size
                                )
                            else:
                                where = pack_location(segment, op_offset, op_size, KIND_GROUP_OP)
                            apply(op_type, ns, key, where)
                        op_offset += op_size
                    self._live_bytes += live
            except BaseException:
                self._interrupted()
                raise
            self._in_flight = None
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
        durable: bool = False,
    ) -> int:
        """Set (or, where the value is None, delete) ``keys`` of ``ns`` as ONE group.

        The same record :meth:`write_group` writes for these operations, by a
        path with no per-operation tuples (InMemoryStorage.flush). Keys must
        be valid (checked with ``encode_key``) and distinct.

        Args:
            durable: True: on return the group is also durable (fdatasync,
                shared with concurrent syncs as in sync="always"), unless
                ``sync`` is "none". False: durable as the ``sync`` mode says.

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
            written = self.write_group(pairs, checkpoint, names=[(ns, key) for key in keys])
            if written and durable and not self._sync_always and self.options.sync != "none":
                self._commit(self._written_pos)  # at least this group's end
            return written
        body = fmt.GROUP_HEADER.pack(0, count) + b"".join(ops)
        with self._lock:
            self._check_writable()
            index = self._namespace(ns)  # raises SubStorageDeletedError
            try:
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
            except BaseException:
                self._interrupted()
                raise
            self._in_flight = None
        if self._sync_always or (durable and self.options.sync != "none"):
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
        if self._forked_from is not None:
            raise self._closed_error()
        return run_compaction(self)

    def stats(self) -> dict[str, int]:
        """Sizes in bytes: total on disk, live (pointed to by the index), dead; counts."""
        if self._forked_from is not None:
            raise self._closed_error()
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

    def _compaction_due(self, early: bool = False) -> bool:
        """Has the store reached the automatic compaction trigger? Under ``_lock``.

        The trigger: the store holds at least ``compact_min_size`` bytes and
        dead bytes are at least ``compact_ratio`` of them. ``early``: asked
        before the active segment is full (see ``_roll_size``): only when no
        compaction is running, since rolling early is what lets one start.
        """
        options = self.options
        if not options.auto_compact or self._closing or (early and self._compacting):
            return False
        total = sum(segment.size for segment in self._segments.values())
        dead = total - self._live_bytes
        return total >= options.compact_min_size and dead >= options.compact_ratio * total

    def _maybe_start_compaction(self) -> None:
        """Request a background compaction when the trigger is reached. Under ``_lock``.

        When a compaction is already running and the store has grown a
        whole segment past the trigger size, writers are held back
        (``_backlog``) until it ends: disk use stays within trigger size +
        two segments.
        """
        if not self._compaction_due():
            return
        options = self.options
        if self._compacting:
            trigger_size = max(
                options.compact_min_size, self._live_bytes / (1 - options.compact_ratio)
            )
            total = sum(segment.size for segment in self._segments.values())
            if total >= trigger_size + self._segment_size:
                self._backlog = True
            return
        self._compacting = True
        self._wake_compactor.release()  # C call: the request is made, or it was not

    def _compactor_loop(self) -> None:
        """The background compactor: one compaction per request, until close."""
        while True:
            self._wake_compactor.acquire()
            if self._closing:
                return
            try:
                with self._compaction_gate:
                    run_compaction(self)
            except (StorageClosedError, StorageFailedError):
                pass  # closing, or an earlier failure already reported to writers
            except Exception:
                log.exception("%s: background compaction failed", self.path)
            finally:
                with self._lock:
                    self._compacting = False  # from here a roll requests a new one
                    self._backlog = False

    def _wait_for_compaction(self) -> None:
        """Hold a writer back while compaction is a whole segment behind (outside ``_lock``)."""
        if self._backlog and not self._closing:
            with self._compaction_gate:  # held by the compactor while it runs
                pass

    def wait_for_background_compaction(self) -> None:
        """Return once no background compaction is requested or running (for tests, tools)."""
        while self._compacting and not self._closed:
            with self._compaction_gate:
                pass
            if self._compacting:
                time.sleep(0.001)  # requested, not started yet

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

    def _install_compaction(self, output: Segment) -> None:
        """Point the index at the compaction ``output`` (renamed into place), where
        nothing changed meanwhile: finish the switch ``compact`` recorded."""
        with self._lock:
            pending = self._installing
            if pending is None or pending[4] is not output:
                return  # finished meanwhile by another call (_settle)
            try:
                self._switch_to_output(renamed=True)
            except (OSError, ValueError) as exc:  # mapping the output failed
                # the files changed under the engine: reopen (nothing switched;
                # the pinned mapping still serves the replaced segment's reads)
                self._failed = exc
                self._installing = None
                raise
            except BaseException:
                self._interrupted()  # an interrupt: finish the switch (idempotent)
                raise

    def _renamed_over(self, output: Segment) -> bool:
        """Is ``output``'s file (the compaction's, by its descriptor) under its final name?"""
        try:
            fd = self._fs.open_read_only(output.path)
        except FileNotFoundError:
            return False
        try:
            return self._fs.file_identity(fd) == self._fs.file_identity(output.fd)
        finally:
            self._fs.close(fd)

    def _switch_to_output(self, renamed: bool = False) -> None:
        """The index switch of a compaction (``compact`` records it in
        ``_installing`` before its rename). Under ``_lock``; idempotent.

        The output reuses the last input's number, so until the switch is
        whole, a location with that number is ambiguous: an interrupted
        switch is finished by the next call under the lock (``_settle``).
        While the output's temporary name is recorded, the file system says
        whether the rename happened (``_renamed_over``); ``renamed``: the
        compaction itself says it did, and deletes the other inputs itself.
        Every step can run again; the record changes only after it.
        """
        pending = self._installing
        if pending is None:
            return
        moved, old_checkpoint, new_checkpoint, inputs, output, tmp_path = pending
        if tmp_path is not None:
            if self._renaming and not renamed:
                return  # the compaction's rename is running: it decides (the index stays)
            if not renamed and (output.fd < 0 or not self._renamed_over(output)):
                # interrupted before the rename: the compaction never happened
                fd, output.fd = output.fd, -1
                if fd >= 0:
                    self._fs.close(fd)
                if self._fs.exists(tmp_path):
                    self._fs.unlink(tmp_path)
                self._pinned = None
                self._installing = None
                return
            if not renamed and self._failed is None:
                # interrupted around the rename, which happened: the rename
                # made durable, then the other inputs go (the compaction that
                # would have deleted them was cut short; else open deletes them)
                with contextlib.suppress(OSError):
                    self._fs.fsync_dir(self.path)
                    for number in inputs[:-1]:
                        with contextlib.suppress(FileNotFoundError):
                            self._fs.unlink(self._file(segment_file_name(number)))
            self._map(output, close_older=False)  # again if repeated: the new mapping counts
            self._installing = (moved, old_checkpoint, new_checkpoint, inputs, output, None)
        self._switch_runs += 1  # a second run: the first may have moved a key, not its bytes
        for ns, key, old, new in moved:
            index = self._namespaces.get(ns)
            if index is not None and index.get(key) == old:
                index[key] = new
                self._live_bytes += location_size(new) - location_size(old)
        if self._switch_runs > 1:
            self._live_bytes = sum(sizes(index) for index in self._namespaces.values())
        if new_checkpoint is not None and self._checkpoint == old_checkpoint:
            self._checkpoint = new_checkpoint
        self._pinned = None
        for number in inputs:
            retired = self._segments.get(number)
            if retired is None or retired is output:
                continue  # retired by the interrupted run
            # sealed: its mapping closed now (a reader still using it reads
            # again under the lock), its descriptor by _close_sealed_fds
            del self._segments[number]
            self._mapped.pop(retired, None)
            mapping, retired.map, retired.mapped = retired.map, None, 0
            if mapping is not None:
                mapping.close()
        self._segments[output.number] = output
        self._segments = dict(sorted(self._segments.items()))
        self._installing = None
        self._switch_runs = 0

    # ================================================================== durability
    def sync(self) -> None:
        """Make everything written so far durable now (fdatasync)."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._check_writable()
            end_pos = self._written_pos
        self._commit(end_pos)

    def _interval_loop(self) -> None:
        """sync="interval": every ``sync_interval`` s, fdatasync what was written since.

        Waits on ``_stop_sync`` (held until close releases it) with a
        timeout instead of being notified by writers: the write path does
        no work for it, and no writer can leave it stuck.
        """
        interval = self.options.sync_interval
        while not self._stop_sync.acquire(timeout=interval):
            if self._closing:
                return
            if self._written_pos <= self._synced_pos or self._failed is not None:
                continue
            try:
                self._commit(self._written_pos)
            except (OSError, StorageFailedError) as exc:
                # Recorded in _failed by _commit: every later write raises.
                log.error("%s: background sync failed: %r; writes are refused", self.path, exc)
                return
            except StorageClosedError:
                return
        self._stop_sync.release()  # taken only to wait: give it back

    # ================================================================== reads
    def get(self, ns: str, ns_bytes: bytes, key: str) -> bytes | memoryview | None:
        """The encoded value of ``key`` in ``ns`` (CRC-verified), or None.

        The hot path: one positioned read, one CRC, one prefix comparison
        that proves the record is this key's; anything unusual (a value in a
        compressed group, a mismatch to report) takes :meth:`_read_value`.
        """
        if self._closed:
            raise self._closed_error()
        if self._in_flight is not None:
            return self._read_settled(ns, key)
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
        if self._closed:
            raise StorageClosedError(f"storage {self.path} is closed")
        with self._lock:
            if self._closed or self._closing:
                raise self._closed_error()
            self._interrupted()  # a write or switch an exception cut short: finish it
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
        number, record_offset, record_size = loc[:3]
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
        number, record_offset, _record_size, op_offset, op_size = loc[:5]
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
            raise self._closed_error()
        if self._in_flight is not None or self._installing is not None:
            with self._lock:
                self._interrupted()
        return self._namespace(ns)

    def has_namespace(self, ns: str) -> bool:
        if self._forked_from is not None:
            raise self._closed_error()
        return ns in self._namespaces

    def child_namespaces(self, ns: str) -> list[str]:
        """Names (not paths) of the sub-storages directly below ``ns``."""
        if self._closed:
            raise self._closed_error()
        prefix = ns + NS_SEPARATOR if ns else ""
        with self._lock:
            self._interrupted()  # a create or drop an exception cut short: finish it
            return sorted(
                n[len(prefix) :]
                for n in self._namespaces
                if n and n.startswith(prefix) and NS_SEPARATOR not in n[len(prefix) :]
            )

    def checkpoint(self) -> bytes | memoryview | None:
        """The encoded value of the last checkpoint written, or None."""
        if self._closed:
            raise self._closed_error()
        with self._lock:  # rare: read it where the index and the files agree
            if self._closed:
                raise self._closed_error()
            self._interrupted()  # a write or switch an exception cut short: finish it
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
        """Stop the background threads, sync (unless failed), close files, release the lock.

        Resumable: an exception that interrupts it part-way (a
        KeyboardInterrupt, a SystemExit from a signal handler) leaves every
        step either done or not started, and the next ``close()`` (or the
        next open of this directory in this process) finishes it.

        Whatever fails, every mapping and descriptor is closed (or its close
        attempted) and the directory lock released before close returns or
        raises: the same process can open the directory again at once.

        Raises:
            OSError: the final sync failed, or else the first ``close(2)`` that
                failed (EIO on NFS or FUSE: what the file system reports at
                close); a later failure is logged.
        """
        with self._close_lock:  # a C lock: released whatever interrupts the close
            if self._released:
                return
            with self._lock:
                self._closing = True
            try:
                self._stop_background()
                if not (self._final_synced or self._failed or self._read_only or self._closed):
                    self._final_sync()
            except OSError as failure:
                # the final sync failed: release everything all the same, and
                # raise that error (a close(2) failing too is logged)
                try:
                    with self._sync_lock, self._lock:
                        self._release_resources()
                except OSError as exc:
                    log.error("%s: closing after %r: %r", self.path, failure, exc)
                raise
            # (an interrupt above leaves the rest to the close that resumes this one)
            with self._sync_lock, self._lock:  # no commit is between its read and its sync
                self._release_resources()  # raises the first close(2) that failed

    def _stop_background(self) -> None:
        """Stop the interval sync thread and the compactor; wait for a running compaction.

        Call after setting ``_closing``: no new compaction is requested then,
        and a running one stops before its rename (one past it finishes).
        """
        with self._lock:
            for wake in (self._stop_sync, self._wake_compactor):
                if wake.locked():  # only close releases them once held: never twice
                    wake.release()
            self._backlog = False
            self._interrupted()  # a write or compaction switch cut short: finish it
        for thread in (self._thread, self._compact_thread):
            if thread is not None and thread.ident != threading.get_ident():
                thread.join()
        with self._compact_lock:  # compact() in another thread
            pass

    def _final_sync(self) -> None:
        """close(): make every byte durable, then save the index snapshot."""
        with self._sync_lock:
            active = self._active
            if active is not None:
                try:
                    self._fs.fdatasync(active.fd)
                except OSError as exc:
                    self._failed = exc  # writers still waiting must not sync again
                    raise
            # every byte is durable now: a writer still on its way to
            # _commit must find its record covered, not sync a closed fd
            self._final_synced = True
            if self._synced_pos < self._written_pos:
                self._synced_pos = self._written_pos
        try:
            self._write_snapshot()
        except OSError as exc:  # a cache: the next open scans instead
            log.warning("%s: index snapshot not written: %r", self.path, exc)

    def _worker_idents(self) -> list[int | None]:
        """Thread idents of this engine's background threads (interval sync, compactor)."""
        return [w.ident for w in (self._thread, self._compact_thread) if w is not None]

    def _closed_error(self) -> StorageClosedError:
        """The error for a call on this closed engine (StorageForkedError in a forked child)."""
        if self._forked_from is not None:
            return StorageForkedError(self.path, self._forked_from, os.getpid())
        return StorageClosedError(f"storage {self.path} is closed")

    def _after_fork(self, owner_pid: int) -> None:
        """In a child forked from ``owner_pid``: make this inherited engine unusable.

        Writes nothing and syncs nothing (the files belong to the parent),
        takes no lock (a parent thread may have held any of them at the
        fork: the child has no such thread to release them), and closes the
        child's copies of the segment descriptors and mappings (the parent's
        stay open). The directory lock's descriptor is closed by ``_fs``'s
        fork handler; closing the child's copy leaves the parent's lock held.
        Marked closed, the hot paths take their slow checks, which raise
        :class:`StorageForkedError`. Threads (interval sync, compaction) do
        not survive a fork.
        """
        self._forked_from = owner_pid
        self._closed = True
        self._released = True  # close() returns at once: nothing here is the child's
        self._in_flight = self._installing = None
        self._lock = threading.Lock()
        self._compact_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._sync_gate = threading.Lock()
        self._compaction_gate = threading.Lock()
        self._lock_fd = None
        self._thread = None
        self._compact_thread = None
        self._active = None
        segments = {*self._segments.values(), *self._sealed_fds, *self._mapped}
        self._segments = {}
        self._sealed_fds = []
        self._mapped = {}
        self._pinned = None
        maps = self._retired_maps + [s.map for s in segments if s.map is not None]
        fds = [s.fd for s in segments if s.fd >= 0]
        self._retired_maps = []
        for segment in segments:
            segment.map = None
            segment.mapped = 0
            segment.fd = -1
        for mapping in maps:
            with contextlib.suppress(BufferError):  # a view of it still in use: left mapped
                mapping.close()
        for fd in fds:
            try:
                self._fs.close(fd)
            except OSError:  # pragma: no cover - close of a valid fd does not fail on Linux
                log.exception("%s: closing an inherited descriptor in a forked child", self.path)

    def _release_resources(self) -> None:
        """Close every mapping and descriptor, release the lock: each one whatever fails.

        Idempotent, for a close that an exception interrupted: each resource
        is taken out of the engine before it is closed, and the lock's
        descriptor is forgotten only once ``unlock_dir`` (idempotent for its
        directory) released it.

        Raises:
            OSError: the first close that failed, once everything is released
                (the others are logged).
        """
        self._closed = True  # first: unlocked readers check it before anything else
        failures: list[tuple[str, OSError]] = []
        done = False
        try:
            segments = [*self._segments.values(), *self._sealed_fds, *self._mapped]
            maps = self._retired_maps
            fds = self._closing_fds  # kept on the engine: a resumed close closes the rest
            for segment in segments:
                # each taken out before it is kept for closing (nothing
                # interruptible in between): a resumed close never sees it twice
                mapping, segment.map, segment.mapped = segment.map, None, 0
                if mapping is not None:
                    maps.append(mapping)
                fd, segment.fd = segment.fd, -1
                if fd >= 0:
                    fds.append((fd, segment.path))
            self._sealed_fds = []
            self._mapped.clear()
            self._segments.clear()
            self._pinned = None
            while maps:
                maps.pop().close()
            while fds:
                fd, path = fds.pop()
                try:
                    self._fs.close(fd)
                except OSError as exc:
                    failures.append((path, exc))
            done = True
        finally:
            lock_fd = self._lock_fd
            if lock_fd is not None:
                try:
                    self._fs.unlock_dir(lock_fd, self.path)  # a resumed close may call it again
                except OSError as exc:
                    failures.append((self._file(LOCK_FILE_NAME), exc))
                self._lock_fd = None
            # an interrupt above: not released, so that a close resumes it
            self._released = done
        for path, error in failures[1:]:
            log.error("%s: closing %s failed too: %r", self.path, path, error)
        if failures:
            raise failures[0][1]

    # ================================================================== invariants
    def _check(self) -> None:
        """Assert the engine's invariants (tests call this after each step)."""
        if self._forked_from is not None:
            raise self._closed_error()
        with self._lock:
            assert "" in self._namespaces, "root namespace missing"
            for ns in self._namespaces:
                if ns:
                    parent = ns.rpartition(NS_SEPARATOR)[0]
                    assert parent in self._namespaces, f"namespace {ns!r} without parent"
            assert self._synced_pos <= self._written_pos
            live = sum(sizes(index) for index in self._namespaces.values())
            assert self._live_bytes == live, f"live bytes {self._live_bytes}, index says {live}"
            total = sum(segment.size for segment in self._segments.values())
            assert self._closed or live <= total, f"live bytes {live} exceed the {total} on disk"
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
_registry_lock = threading.RLock()  # re-entrant: a lost Reference may be released inside it


def acquire_reference(
    path: str,
    given: dict[str, object],
    create: bool,
    fs: FileSystem = OS_FS,
) -> Reference:
    """A new reference on the engine for directory ``path``, opened if needed.

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
            closing = engine is not None and engine._refs == 0 and not engine._released
            if not closing:
                return _share_or_open(engine, key, real, options, given, fs)
        # The last handle is closing it (final sync, snapshot): wait for that
        # close, or finish one that an exception interrupted, then open anew.
        assert engine is not None
        try:
            engine.close()
        except OSError as exc:  # the closing handle's error, raised there too
            log.warning("%s: closing the previous engine failed: %r", engine.path, exc)


def acquire_engine(
    path: str,
    given: dict[str, object],
    create: bool,
    fs: FileSystem = OS_FS,
) -> Engine:
    """:func:`acquire_reference` for a caller that releases with ``release_engine(engine)``."""
    reference = acquire_reference(path, given, create, fs)
    reference.released = True  # the count is the caller's now
    return reference.engine


def _share_or_open(
    engine: Engine | None,
    key: str,
    real: str,
    options: EngineOptions,
    given: dict[str, object],
    fs: FileSystem,
) -> Reference:
    """Under ``_registry_lock``: one more reference on ``engine``, or a new engine."""
    if engine is not None and not engine._released:
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
        engine = _open_engine(real, options, fs, key)  # registers it
    return _counted(engine)


def _open_engine(path: str, options: EngineOptions, fs: FileSystem, key: str) -> Engine:
    """A new engine; a read-only open of a live store retried over a compaction's switch.

    The process holding the directory may compact while a read-only open
    lists and loads it: a compaction renames its output over its last input,
    then deletes the other inputs. The directory is consistent at every
    moment, so the open is consistent unless a listed segment vanished, or
    was replaced, before it was loaded (``_SegmentVanished``). The open is
    then done again, up to READ_ONLY_OPEN_ATTEMPTS times with a short
    backoff. A segment that was already missing is absent from the listing:
    a gap in the sequence, reported as always (CorruptionError, or
    ``missing_segments``). The engine registers itself under ``key`` once
    open (an exception on the way back leaves it there for the next open
    to close, not lost with the directory lock held).

    Raises:
        StorageChangedError: a listed segment vanished in every attempt.
    """
    if not options.read_only:
        return Engine(path, options, fs, key)
    vanished = ""
    for attempt in range(READ_ONLY_OPEN_ATTEMPTS):
        if attempt:
            time.sleep(min(0.001 * 2**attempt, 0.05))
        try:
            return Engine(path, options, fs, key)
        except _SegmentVanished as exc:
            vanished = exc.path
            log.debug("%s vanished during a read-only open: opening again", vanished)
    raise StorageChangedError(path, READ_ONLY_OPEN_ATTEMPTS, vanished)


def _counted(engine: Engine) -> Reference:
    """Count one more reference on ``engine``. Under ``_registry_lock``.

    The count and the Reference that gives it back are made together, with
    nothing interruptible in between: a Reference lost to an interrupt
    before its caller stored it releases the count when it is collected.
    """
    reference = Reference(engine)
    engine._refs += 1
    reference.released = False
    return reference


def add_reference(engine: Engine) -> Reference:
    """One more handle shares ``engine`` (a sub-storage handle)."""
    with _registry_lock:
        if engine.closed:
            raise engine._closed_error()
        return _counted(engine)


class Reference:
    """One handle's reference on an engine; released once, however often asked.

    Made by :func:`acquire_reference` and :func:`add_reference` only. One
    that is collected unreleased (lost to an interrupt between its making and
    its handle) releases itself.
    """

    __slots__ = ("engine", "released")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.released = True  # until _counted counts it

    def release(self) -> None:
        """Drop this reference (see :func:`release_engine`); later calls do nothing."""
        release_engine(self.engine, self)

    def __del__(self) -> None:
        if not getattr(self, "released", True):  # (an __init__ cut short set nothing)
            try:
                release_engine(self.engine, self)
            except Exception:  # pragma: no cover - nothing to raise to in a finalizer
                log.exception("%s: releasing a lost reference", self.engine.path)


def release_engine(engine: Engine, reference: Reference | None = None) -> None:
    """Drop one reference; the last one closes the engine and releases the lock.

    The engine stays registered while it closes, so that a new open of the
    same directory in this process waits for the close (or finishes one an
    exception interrupted) instead of finding the directory locked by itself.

    Args:
        reference: the handle's reference; dropping it twice drops one.
    """
    with _registry_lock:
        if reference is not None:
            if reference.released:
                return
            reference.released = True  # with the decrement: no call in between
        engine._refs -= 1
        if engine._refs > 0:
            return
    if threading.get_ident() in engine._worker_idents():
        # The last reference was dropped by the garbage collector inside one
        # of the engine's own threads (which may hold the engine's locks):
        # close it from another thread, never from this one.
        threading.Thread(
            target=_close_unreferenced, args=(engine,), name=f"logstate-close:{engine.path}"
        ).start()
        return
    _close_unreferenced(engine)


def _close_unreferenced(engine: Engine) -> None:
    """Close an engine whose last reference was dropped; unregister it once released."""
    try:
        engine.close()
    except BaseException:
        if not engine._released:
            # An interrupt stopped the close part-way: finish it, so that
            # the directory is released (a failed sync already released it).
            engine.close()
        raise
    finally:
        key = engine.path + ("\0read-only" if engine.options.read_only else "")
        with _registry_lock:
            if _registry.get(key) is engine and engine._released:
                del _registry[key]


def open_engines() -> Iterable[Engine]:
    """Engines currently open in this process (for tests and diagnostics)."""
    with _registry_lock:
        return list(_registry.values())


_registry_pid = os.getpid()  # the process whose engines the registry holds


def _after_fork_in_child() -> None:
    """In a forked child: forget the parent's engines, and make them unusable.

    The child is another process: a new open of a directory is a fresh open
    (StorageLockedError while the parent holds it), and an inherited handle
    raises StorageForkedError. The registry lock is created anew: a parent
    thread may have held it at the fork.
    """
    global _registry_lock, _registry_pid
    _registry_lock = threading.RLock()
    owner, _registry_pid = _registry_pid, os.getpid()
    engines = list(_registry.values())
    _registry.clear()
    for engine in engines:
        engine._after_fork(owner)


os.register_at_fork(after_in_child=_after_fork_in_child)
