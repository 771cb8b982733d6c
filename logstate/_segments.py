"""The open segment files of a storage directory.

Owns: ``Segment`` (one open segment file: its descriptor, its mapping, its
size) and ``SegmentSet``: every segment in the store, the active one (the
only one written to), creating a segment (whole header or no file), sealing
one (mapped for reads, its descriptor let go), reading bytes back (mapping,
descriptor, or the file opened by name), the bound on open mappings and
descriptors, and the retire rule, once: a mapping or descriptor replaced by
a roll or a compaction is closed only at a later one, when no lock-free
reader can still hold it.
Must never: touch the index, decide a policy (what damage means, when to
roll or compact), or take a lock (its callers hold the engine's write lock,
or own it alone at open). Every system call goes through ``_fs``.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from typing import TYPE_CHECKING, Final

from logstate._errors import CorruptionError, StorageFailedError
from logstate._filenames import TMP_SUFFIX, segment_file_name
from logstate._format import MAX_SEGMENT_NUMBER, SEGMENT_HEADER_SIZE, encode_segment_header
from logstate._fs import FileSystem
from logstate._native import EXT

__all__ = ["MAX_MAPPED_SEGMENTS", "SEALED_FDS_KEPT", "Segment", "SegmentSet"]

# Open files: a sealed segment is read through a mapping (one descriptor
# before Python 3.13), at most this many at once, and at most 1/8 of the
# process's descriptor limit; one not mapped is mapped again by name when read.
MAX_MAPPED_SEGMENTS: Final = 128
MIN_MAPPED_SEGMENTS: Final = 4
SEALED_FDS_KEPT: Final = 8  # sealed segments' own descriptors left open while a sync runs


# The C path (``_native.EXT``): C base types hold the hot fields, so that
# the C hot paths (csrc/fast.c) read them without attribute look-ups; these
# classes still own every rule, and read and write them as attributes.
if TYPE_CHECKING:
    _SegmentBase = object
    _SegmentSetBase = object
else:
    _SegmentBase = object if EXT is None else EXT.SegmentBase
    _SegmentSetBase = object if EXT is None else EXT.SegmentSetBase


class Segment(_SegmentBase):
    """An open segment file. ``covers_from``: the lowest segment number whose
    records it holds (itself, or for a compaction output its first input).
    ``fd`` is -1 for a sealed segment whose descriptor was let go."""

    __slots__ = tuple(
        name  # (those of the C base, when there is one, are its own)
        for name in ("covers_from", "fd", "map", "mapped", "number", "path", "size")
        if not hasattr(_SegmentBase, name)
    )

    def __init__(self, number: int, path: str, fd: int, size: int, covers_from: int = 0) -> None:
        self.number = number
        self.path = path
        self.fd = fd
        self.size = size
        self.covers_from = covers_from or number
        self.map: mmap.mmap | None = None  # read-only mapping of the first ``mapped`` bytes
        self.mapped = 0


class SegmentSet(_SegmentSetBase):
    """The segments of directory ``path``, oldest first, and the active one.

    ``sync_turn``: the group commit's turn (held while a commit syncs the
    active segment's descriptor outside the write lock), wired by the engine.
    """

    def __init__(self, fs: FileSystem, path: str, read_only: bool) -> None:
        self.fs = fs
        self.path = path
        self.read_only = read_only
        self.segments: dict[int, Segment] = {}
        self.active: Segment | None = None
        self.sync_turn: threading.Lock | None = None
        self.mapping_cap = max(
            MIN_MAPPED_SEGMENTS, min(MAX_MAPPED_SEGMENTS, fs.descriptor_limit() // 8)
        )
        self.mapped: dict[Segment, None] = {}  # sealed segments with a mapping, oldest first
        self.sealed_fds: list[Segment] = []  # sealed, own descriptor still open (seal)
        self.pinned: Segment | None = None  # never unmapped: compaction renames over its file
        self.retired_maps: list[mmap.mmap] = []  # mappings replaced; closed at the next roll
        self.closing_fds: list[tuple[int, str]] = []  # a close's descriptors not closed yet
        # read-only: the identity of each file scanned at open (a live
        # writer may compact it away: open_sealed tells when)
        self.identities: dict[int, tuple[int, int]] = {}

    def file(self, name: str) -> str:
        return self.path + "/" + name

    def total_size(self) -> int:
        """Bytes of every segment."""
        return sum(segment.size for segment in self.segments.values())

    def segment_of(self, number: int, key: str) -> Segment:
        """Segment ``number``, which the index points ``key`` into.

        Raises:
            CorruptionError: there is no such segment.
        """
        segment = self.segments.get(number)
        if segment is None:
            raise CorruptionError(
                self.file(segment_file_name(number)),
                0,
                f"the index points {key!r} into segment {number}, which does not exist",
            )
        return segment

    # ------------------------------------------------------------------ create, seal
    def create(self, number: int) -> Segment:
        """Create segment ``number`` with its header, durable before it is used.

        Written under a temporary name and renamed into place: an exception
        or a crash at any point leaves no segment file without its whole
        header (a temporary file is removed by the next roll or open).
        The caller registers it in ``segments`` (with nothing interruptible
        between that and making it active).

        Raises:
            StorageFailedError: segment numbers are exhausted.
            OSError: from the file system (nothing is left behind).
        """
        path = self.file(segment_file_name(number))
        if number > MAX_SEGMENT_NUMBER:
            raise StorageFailedError(
                f"storage {self.path}: segment numbers are exhausted ({path} would exceed "
                f"segment {MAX_SEGMENT_NUMBER}); compact the store into a new directory"
            )
        tmp = path + TMP_SUFFIX
        if self.active is not None:
            for left in (tmp, path):
                if self.fs.exists(left):
                    # Made by a roll that an exception interrupted before it
                    # switched to it: never written to, as records go to the
                    # active segment only (we hold the directory lock, and
                    # open loaded every segment).
                    self.fs.unlink(left)
        fd = self.fs.create_file(tmp)
        try:
            self.fs.append(fd, encode_segment_header(number))
            self.fs.fdatasync(fd)
            self.fs.rename(tmp, path)
            self.fs.fsync_dir(self.path)
        except BaseException:
            # Nothing is in it: remove it (if that fails too, the next roll
            # or open does; one renamed already holds its whole header).
            self.fs.close(fd)
            with contextlib.suppress(OSError):
                self.fs.unlink(tmp)
            raise
        return Segment(number, path, fd, SEGMENT_HEADER_SIZE)

    def seal(self, segment: Segment, close_older: bool = True) -> None:
        """Seal ``segment``: map all its bytes for reads, and let its descriptor go.

        A roll, or a compaction's install. The mapping joins the open ones
        (:meth:`add_mapping`: beyond the cap the oldest is closed); an older
        mapping of the segment is retired (closed at the next roll). The
        segment's own descriptor stays open a while (:meth:`close_sealed_fds`):
        an unlocked reader, or a commit that took the segment as the active
        one, may be about to use it. ``close_older``: close those of segments
        sealed earlier now (a roll does; a compaction leaves segments sealed
        meanwhile to the next roll).
        """
        mapping = self.fs.map_read_only(segment.fd, segment.size)
        if segment.map is not None:
            self.retired_maps.append(segment.map)
        segment.map = mapping
        segment.mapped = segment.size if mapping is not None else 0
        if mapping is not None:
            self.add_mapping(segment)
        if segment not in self.sealed_fds:
            self.sealed_fds.append(segment)
        if close_older:
            self.close_sealed_fds(keep=1)  # those sealed at earlier rolls

    def close_retired_maps(self) -> None:
        """Close the mappings retired one roll or compaction ago (no reader left)."""
        maps, self.retired_maps = self.retired_maps, []
        for mapping in maps:
            mapping.close()

    def close_retired(self) -> None:
        """Close mappings replaced earlier, and sealed segments' descriptors but the newest.

        Readers take no lock, so a reader may still hold one just retired:
        the descriptor of the segment sealed last stays open (see
        :meth:`close_sealed_fds`).
        """
        self.close_retired_maps()
        self.close_sealed_fds(keep=1)

    def add_mapping(self, segment: Segment) -> None:
        """Count ``segment``'s new mapping among the open ones; unmap the oldest beyond the cap.

        The pinned segment is never unmapped. A reader still holding an
        unmapped segment's mapping gets ValueError and reads again under the
        lock, where the segment is mapped again by name (:meth:`map_again`);
        closing a mapping while another thread slices it is safe (a slice is
        copied under the GIL).
        """
        mapped = self.mapped
        mapped[segment] = None
        while len(mapped) > self.mapping_cap:
            victim = next(s for s in mapped if s is not self.pinned)
            del mapped[victim]
            mapping = victim.map
            victim.map = None
            victim.mapped = 0
            if mapping is not None:
                mapping.close()

    def map_again(self, segment: Segment) -> None:
        """Map a sealed segment unmapped earlier, opening its file by name.

        Under the write lock the files agree with ``segments`` (a compaction
        renames its output over its last input only while that input is
        pinned, see :meth:`pin`). A file now shorter than the segment stays
        unmapped: reading it then reports the damage.
        """
        fd = self.open_sealed(segment)
        try:
            try:
                mapping = self.fs.map_read_only(fd, segment.size)
            except ValueError:  # shorter than the segment (damaged since)
                mapping = None
            if mapping is not None:
                segment.map = mapping
                segment.mapped = segment.size
                self.add_mapping(segment)
        finally:
            self.fs.close(fd)

    def open_sealed(self, segment: Segment) -> int:
        """A new read-only descriptor of a sealed segment's file, by name (the caller closes it).

        Raises:
            CorruptionError: (a read-only open) the file is not the one
                scanned at open any more: the process holding the store
                compacted it away since.
            OSError: from the open.
        """
        expected = self.identities.get(segment.number)
        replaced = CorruptionError(
            segment.path,
            0,
            f"segment {segment.number} was replaced or removed since this read-only "
            "open (compacted by the process holding the store); open it again",
        )
        try:
            fd = self.fs.open_read_only(segment.path)
        except FileNotFoundError:
            if expected is None:
                raise
            raise replaced from None
        if expected is not None and self.fs.file_identity(fd) != expected:
            self.fs.close(fd)
            raise replaced
        return fd

    def pin(self, segment: Segment) -> None:
        """Keep ``segment`` mapped until the next compaction install.

        A compaction renames its output over its last input's file before the
        index switches to the output: reads meanwhile need the input's bytes,
        which only its mapping still holds.
        """
        if segment.map is None:
            self.map_again(segment)
        self.pinned = segment

    def close_sealed_fds(self, keep: int) -> None:
        """Close sealed segments' own descriptors, all but the newest ``keep``.

        While a sync turn runs, the newest ``SEALED_FDS_KEPT`` stay open: a
        commit takes the active segment under the lock and syncs its
        descriptor after releasing it (``GroupCommit.commit``).
        """
        sealed = self.sealed_fds
        if len(sealed) <= keep:
            return
        if self.sync_turn is not None and self.sync_turn.locked():
            keep = max(keep, SEALED_FDS_KEPT)  # a commit may be about to sync one of them
        while len(sealed) > keep:
            segment = sealed.pop(0)
            fd, segment.fd = segment.fd, -1
            if fd >= 0:  # (closed already: listed twice by a roll an interrupt repeated)
                self.fs.close(fd)

    def replace(self, inputs: list[int], output: Segment) -> None:
        """A compaction's switch: ``output`` takes the place of segments ``inputs``.

        Idempotent (an interrupted switch runs again). The inputs' mappings
        are closed now (a reader still using one reads again under the lock),
        their descriptors by :meth:`close_sealed_fds`.
        """
        self.pinned = None
        segments = self.segments
        for number in inputs:
            retired = segments.get(number)
            if retired is None or retired is output:
                continue  # retired by the interrupted run
            self.mapped.pop(retired, None)
            mapping, retired.map, retired.mapped = retired.map, None, 0
            if number == output.number:
                # in place: the key keeps its place in the order, and
                # lock-free readers (who hold this dict) never miss it
                segments[number] = output
            else:
                del segments[number]
            if mapping is not None:
                mapping.close()

    # ------------------------------------------------------------------ reads
    def read(self, segment: Segment, size: int, offset: int) -> bytes:
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
            return self.fs.pread(fd, size, offset)
        fd = self.open_sealed(segment)
        try:
            return self.fs.pread(fd, size, offset)
        finally:
            self.fs.close(fd)

    def read_whole(self, segment: Segment) -> bytes:
        """Every byte of ``segment`` (as :meth:`read`: mapping, descriptor, or by name)."""
        mapping = segment.map
        if mapping is not None and segment.mapped == segment.size:
            try:
                return mapping[:]
            except ValueError:  # unmapped meanwhile
                pass
        fd = segment.fd
        if fd >= 0:
            return self.fs.read_all(fd)
        fd = self.open_sealed(segment)
        try:
            return self.fs.read_all(fd)
        finally:
            self.fs.close(fd)

    # ------------------------------------------------------------------ release
    def release(self) -> list[tuple[str, OSError]]:
        """Close every mapping and descriptor, each whatever fails; the failures.

        Idempotent, for a close that an exception interrupted: each resource
        is taken out of its segment before it is kept for closing (nothing
        interruptible in between), so that a resumed release never sees it
        twice, and the descriptors not closed yet stay in ``closing_fds``.
        """
        failures: list[tuple[str, OSError]] = []
        segments = [*self.segments.values(), *self.sealed_fds, *self.mapped]
        maps = self.retired_maps
        fds = self.closing_fds
        for segment in segments:
            mapping, segment.map, segment.mapped = segment.map, None, 0
            if mapping is not None:
                maps.append(mapping)
            fd, segment.fd = segment.fd, -1
            if fd >= 0:
                fds.append((fd, segment.path))
        self.sealed_fds = []
        self.mapped.clear()
        self.segments.clear()
        self.pinned = None
        while maps:
            maps.pop().close()
        while fds:
            fd, path = fds.pop()
            try:
                self.fs.close(fd)
            except OSError as exc:
                failures.append((path, exc))
        return failures

    def forget_after_fork(self) -> list[int]:
        """In a forked child: drop every mapping (closed) and segment; the descriptors to close."""
        self.active = None
        segments = {*self.segments.values(), *self.sealed_fds, *self.mapped}
        self.segments.clear()
        self.sealed_fds = []
        self.mapped = {}
        self.pinned = None
        maps = self.retired_maps + [s.map for s in segments if s.map is not None]
        fds = [s.fd for s in segments if s.fd >= 0]
        self.retired_maps = []
        for segment in segments:
            segment.map = None
            segment.mapped = 0
            segment.fd = -1
        for mapping in maps:
            with contextlib.suppress(BufferError):  # a view of it still in use: left mapped
                mapping.close()
        return fds

    # ------------------------------------------------------------------ invariants
    def _check(self) -> None:
        """Assert the segments' invariants (each file's size is the segment's)."""
        assert self.active is not None
        assert self.active.number == max(self.segments)
        assert self.segments[self.active.number] is self.active
        assert list(self.segments) == sorted(self.segments), "segments out of order"
        assert len(self.mapped) <= self.mapping_cap, "more mappings than the cap"
        assert len(self.sealed_fds) <= SEALED_FDS_KEPT + 1, "sealed descriptors left open"
        for segment in self.segments.values():
            fd = segment.fd if segment.fd >= 0 else self.open_sealed(segment)
            try:
                assert self.fs.file_size(fd) == segment.size, segment.path
            finally:
                if fd != segment.fd:
                    self.fs.close(fd)
