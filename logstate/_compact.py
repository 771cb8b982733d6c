"""Compaction: rewrite the live records of the sealed segments into one output.

Owns: the compaction procedure and its crash-safety protocol. The output of
compacting segments ``lo..hi`` is written under a temporary name, fsynced,
renamed over segment ``hi`` (atomic), the directory fsynced, and only then
are the inputs ``lo..hi-1`` deleted (directory fsynced again). The output's
first record (REC_COMPACTED) names the range it replaces, so a crash at any
point leaves either the old segments or the output counted, never both and
never neither: open deletes inputs that an output already covers
(``Engine._select_segments``).
Must never: touch the active segment or its file descriptor (the active
segment is sealed first, and a new one takes the writes); delete an input
before the output is durable under its final name; drop a tombstone unless
the compaction covers every older segment. Every compaction covers all
sealed segments, from the oldest, so the deletes, clears and sub-storage
drops it leaves out can hide nothing older (Bitcask lost deletes by dropping
tombstones in partial merges: its issues #82 and #148). Must never grow the
store either: an output that would be larger than its inputs is abandoned,
and the inputs stay as they are.

Writers are blocked only twice, briefly: while the live locations are listed
and while the index is switched to the output. A key written during the
compaction keeps its newer location (the switch only moves a location that
did not change meanwhile), and the output is numbered below the active
segment, so replay order stays right.

What the output holds: the live whole records, copied byte for byte; the
live operations of groups, written again as groups (not as one record each,
which would add 8 bytes per operation, or undo the compression): those of
uncompressed groups in uncompressed groups of about ``_CHUNK_BYTES``, those
of zstd-compressed groups in compressed groups (the store's ``zstd_level``)
that end at the end of an input group once they hold ``_CHUNK_BYTES`` of
operations, so that a group whose values are all live is written again
whole. No output group holds more than ``_MAX_CHUNK_BYTES`` of operations
(unless one operation is larger). Then the checkpoint, as one record.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from logstate import _format as fmt
from logstate._errors import CorruptionError, StorageClosedError
from logstate._format import REC_CREATE_NS, REC_GROUP, SEGMENT_HEADER_SIZE
from logstate._location import (
    KIND_GROUP_OP,
    KIND_RECORD,
    Location,
    Segment,
    compressed_location,
    location_segment,
    pack_location,
    unpack_location,
)

if TYPE_CHECKING:
    from logstate._engine import Engine
    from logstate._fs import FileSystem

log = logging.getLogger("logstate")

COMPACT_TMP_SUFFIX = ".compact.tmp"
_FLUSH_BYTES = 1 << 20
_CHUNK_BYTES = 1 << 20  # operations of an output group (see the module docstring)
_MAX_CHUNK_BYTES = 16 << 20


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


class _Reader:
    """Reads live records out of the input segments, one segment in memory at a time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._number = -1
        self._data = b""
        self._groups: dict[tuple[int, int], bytes | memoryview] = {}

    def _segment_data(self, number: int) -> bytes:
        """The input's bytes, read through a descriptor of its own (closed at once).

        Inputs are sealed and only a compaction (this one, under
        ``_compact_lock``) replaces or deletes their files; the segment's
        own descriptor and mapping may be closed meanwhile (open files are
        bounded, see ``Engine._add_mapping``).
        """
        if number != self._number:
            fs = self._engine._fs
            fd = fs.open_read_only(self._engine._segments[number].path)
            try:
                self._data = fs.read_all(fd)
            finally:
                fs.close(fd)
            self._number = number
            self._groups.clear()
        return self._data

    def record(
        self, location: Location, seq: int, ns: str | None = None, key: str = ""
    ) -> tuple[int, bytes]:
        """(operation type, a whole record to copy) for a live location, CRC-checked.

        ``ns``/``key``: whose value it is (None: the checkpoint); the record
        must be that key's (see :meth:`_prove`).
        """
        if type(location) is int:
            number, offset, size, kind = unpack_location(location)
            if kind == KIND_RECORD:  # copied byte for byte, seq and CRC included
                chunk = self._segment_data(number)[offset : offset + size]
                try:
                    op_type = fmt.check_record(chunk)
                except CorruptionError as exc:
                    path = self._engine._segments[number].path
                    raise CorruptionError(path, offset + exc.offset, exc.reason) from None
                self._prove(chunk, fmt.RECORD_OVERHEAD, ns, key, location)
                return op_type, chunk
        op = self.op(location, ns, key)
        return op[4], fmt.encode_record(op[4], seq, op[fmt.GROUP_OP_SIZE :])

    def _prove(
        self, data: bytes, body_start: int, ns: str | None, key: str, location: Location
    ) -> None:
        """Raise unless ``data``'s body is ``ns``/``key``'s (as every read proves it).

        A location in bounds that holds another key's record (an index
        snapshot crafted or damaged with a valid checksum) must never be
        copied: replayed, that record would be the other key's value.
        """
        if ns is None:
            return
        key_bytes = key.encode("utf-8")
        prefix = fmt.encode_name(ns) + fmt.NAME_LEN.pack(len(key_bytes)) + key_bytes
        if not data.startswith(prefix, body_start):
            number = location_segment(location)
            path = self._engine._segments[number].path
            offset = location[1] if isinstance(location, tuple) else unpack_location(location)[1]
            raise CorruptionError(path, offset, f"the index points {key!r} at another key's record")

    def op(self, location: Location, ns: str | None = None, key: str = "") -> bytes:
        """The bytes (op_crc type length body) of a live operation of a group, CRC-checked.

        ``ns``/``key``: as for :meth:`record`.
        """
        engine = self._engine
        if type(location) is int:
            number, offset, size, _kind = unpack_location(location)
            chunk = self._segment_data(number)[offset : offset + size]
            try:
                fmt.check_group_op(chunk)
            except CorruptionError as exc:
                path = engine._segments[number].path
                raise CorruptionError(path, offset + exc.offset, exc.reason) from None
            self._prove(chunk, fmt.GROUP_OP_SIZE, ns, key, location)
            return chunk
        assert isinstance(location, tuple)
        number, record_offset, record_size, op_offset, op_size = location[:5]
        data = self._segment_data(number)
        raw = self._groups.get((number, record_offset))
        if raw is None:
            record = data[record_offset : record_offset + record_size]
            raw = self._groups[(number, record_offset)] = engine._decompress_group(location, record)
        op = bytes(raw[op_offset : op_offset + op_size])
        try:
            fmt.check_group_op(op)
        except CorruptionError as exc:
            path = engine._segments[number].path
            raise CorruptionError(
                path, record_offset, f"in compressed group: {exc.reason}"
            ) from None
        self._prove(op, fmt.GROUP_OP_SIZE, ns, key, location)
        return op


class _OutputNotSmaller(Exception):
    """The output has outgrown its inputs: compacting would grow the store."""


class _Output:
    """The output file being written: buffered appends, and the size it must stay within."""

    def __init__(self, fs: FileSystem, fd: int, header: bytes, limit: int) -> None:
        self._fs = fs
        self._fd = fd
        self._limit = limit
        self.buffer = bytearray(header)
        self.written = 0

    def add(self, record: bytes) -> int:
        """Append ``record``; return its offset in the file.

        Raises:
            _OutputNotSmaller: the output now holds more bytes than its inputs.
        """
        offset = self.written + len(self.buffer)
        if offset + len(record) > self._limit:
            raise _OutputNotSmaller
        self.buffer += record
        if len(self.buffer) >= _FLUSH_BYTES:
            self.flush()
        return offset

    def flush(self) -> None:
        self._fs.append(self._fd, self.buffer)
        self.written += len(self.buffer)
        self.buffer.clear()


@dataclass
class _Chunk:
    """Live operations of groups, waiting to be written as one output group."""

    compress: bool  # they come from zstd-compressed groups
    ops: list[bytes] = field(default_factory=list)
    entries: list[tuple[str, str, Location]] = field(default_factory=list)  # ns, key, old
    size: int = 0
    source: object = None  # the input group of the last operation

    def add(self, op: bytes, source: object, entry: tuple[str, str, Location]) -> bool:
        """Take ``op`` (of input group ``source``); True when the chunk must be
        written out first (then call :meth:`write`, and ``add`` again)."""
        if self.ops and (
            self.size + len(op) > _MAX_CHUNK_BYTES
            or (self.size >= _CHUNK_BYTES and source != self.source)
        ):
            return True
        self.ops.append(op)
        self.entries.append(entry)
        self.size += len(op)
        self.source = source
        return False

    def write(
        self,
        out: _Output,
        number: int,
        seq: int,
        zstd_level: int,
        moved: list[tuple[str, str, Location, Location]],
    ) -> None:
        """Write the chunk as one group record of segment ``number``; empty it."""
        raw = b"".join(self.ops)
        body = fmt.group_body(raw, len(self.ops), 0 if self.compress else None, zstd_level)
        record = fmt.encode_record(REC_GROUP, seq, body)
        offset = out.add(record)
        compressed = body[0] & fmt.GROUP_FLAG_ZSTD
        op_offset = 0 if compressed else offset + fmt.RECORD_OVERHEAD + fmt.GROUP_HEADER_SIZE
        for (ns, key, old), op in zip(self.entries, self.ops, strict=True):
            size = len(op)
            new: Location
            if compressed:
                new = compressed_location(number, offset, len(record), op_offset, size, len(raw))
            else:
                new = pack_location(number, op_offset, size, KIND_GROUP_OP)
            moved.append((ns, key, old, new))
            op_offset += size
        self.ops.clear()
        self.entries.clear()
        self.size = 0


def _depth_first(ns: str) -> tuple[int, str]:
    return ns.count("/"), ns


def _read_order(item: tuple[Location, str, str]) -> tuple[int, int, int]:
    location = item[0]
    if type(location) is int:
        number, offset, _size, _kind = unpack_location(location)
        return number, offset, 0
    assert isinstance(location, tuple)
    return location[0], location[1], location[3]


def compact(engine: Engine) -> CompactionResult:
    """Compact every sealed segment of ``engine`` into one (see the module docstring).

    Raises:
        StorageClosedError / StorageFailedError / ReadOnlyStorageError: not writable.
        CorruptionError: a live record failed its checksum (nothing is changed).
        OSError: from the file system; before the rename nothing is changed
            (the temporary file is removed), after it the storage refuses
            writes until reopened.
    """
    fs = engine._fs
    with engine._compact_lock:
        # ---- 1. seal, and list what is live in the sealed segments
        with engine._lock:
            engine._check_writable()
            engine._close_retired_fds()
            active = engine._active
            assert active is not None
            if active.size > SEGMENT_HEADER_SIZE:
                engine._roll()
            active = engine._active
            assert active is not None
            inputs = sorted(n for n in engine._segments if n != active.number)
            if not inputs:
                return CompactionResult()
            input_set = set(inputs)
            live = [
                (loc, ns, key)
                for ns, index in engine._namespaces.items()
                for key, loc in index.items()
                if location_segment(loc) in input_set
            ]
            namespaces = sorted(
                (n for n in engine._namespaces if n), key=lambda n: (n.count("/"), n)
            )
            checkpoint = engine._checkpoint
            if checkpoint is not None and location_segment(checkpoint) not in input_set:
                checkpoint = None
            seq = engine._seq
            segments = {n: engine._segments[n] for n in inputs}
        hi = inputs[-1]
        lo = segments[inputs[0]].covers_from
        result = CompactionResult(inputs, hi, sum(s.size for s in segments.values()))
        live.sort(key=_read_order)

        # ---- 2. write the output under a temporary name, make it durable
        final_path = segments[hi].path
        tmp_path = final_path + COMPACT_TMP_SUFFIX
        if fs.exists(tmp_path):
            fs.unlink(tmp_path)
        fd = fs.create_file(tmp_path)
        moved: list[tuple[str, str, Location, Location]] = []
        new_checkpoint: int | None = None
        level = engine.options.zstd_level
        try:
            out = _Output(fs, fd, fmt.encode_segment_header(hi), result.bytes_before)
            out.add(fmt.encode_compacted_record(seq, lo))
            for ns in namespaces:
                out.add(fmt.encode_record(REC_CREATE_NS, seq, fmt.encode_name(ns)))
            reader = _Reader(engine)
            plain, packed = _Chunk(compress=False), _Chunk(compress=True)
            for loc, ns, key in live:
                if type(loc) is int and loc & 3 == KIND_RECORD:
                    _op_type, record = reader.record(loc, seq, ns, key)
                    offset = out.add(record)
                    moved.append(
                        (ns, key, loc, pack_location(hi, offset, len(record), KIND_RECORD))
                    )
                else:
                    op = reader.op(loc, ns, key)
                    # the input group: a compressed one's place; each plain op its own
                    chunk, source = (packed, loc[:2]) if isinstance(loc, tuple) else (plain, loc)
                    if chunk.add(op, source, (ns, key, loc)):
                        chunk.write(out, hi, seq, level, moved)
                        chunk.add(op, source, (ns, key, loc))
                if engine._closing:
                    raise StorageClosedError(f"storage {engine.path} closed during compaction")
            for chunk in (plain, packed):
                if chunk.ops:
                    chunk.write(out, hi, seq, level, moved)
            if checkpoint is not None:
                _op_type, record = reader.record(checkpoint, seq)
                offset = out.add(record)
                new_checkpoint = pack_location(hi, offset, len(record), KIND_RECORD)
            out.flush()
            written = out.written
            fs.fdatasync(fd)
        except BaseException as exc:
            fs.close(fd)
            fs.unlink(tmp_path)
            if isinstance(exc, _OutputNotSmaller):
                log.info(
                    "%s: compacting segments %s would not make them smaller; left as they are",
                    engine.path,
                    inputs,
                )
                before = result.bytes_before
                return CompactionResult(bytes_before=before, bytes_after=before)
            raise
        result.bytes_after = written
        result.records = len(moved)

        # ---- 3. install: rename over the last input; from here on a crash
        # leaves the output counted and the other inputs deleted at open.
        # Until the index switches, reads of the last input need its bytes:
        # its mapping holds them (pinned, never unmapped), its name no more.
        # The output keeps the descriptor it was written with: after the
        # rename it is the segment's. The switch is recorded (``_installing``)
        # before the rename: an exception anywhere from here on leaves it to
        # be finished (or, if the rename did not happen, dropped) by the next
        # call under the lock, never forgotten; while the rename runs
        # (``_renaming``, no lock held) no other call decides it.
        recorded = False
        try:
            with engine._lock:
                if engine._closing or engine._closed:
                    raise StorageClosedError(f"storage {engine.path} closed during compaction")
                engine._pin(segments[hi])
                output = Segment(hi, final_path, fd, written, lo)
                engine._renaming = True
                engine._installing = (moved, checkpoint, new_checkpoint, inputs, output, tmp_path)
                recorded = True
            fs.rename(tmp_path, final_path)
            engine._renaming = False
            fs.fsync_dir(engine.path)
        except BaseException as exc:
            engine._renaming = False  # (first: nothing interruptible before it)
            if not recorded:  # nothing changed: the output is dropped
                fs.close(fd)
                fs.unlink(tmp_path)
                raise
            if isinstance(exc, OSError):
                engine._failed = exc
            # the file system says whether the rename happened, and the
            # engine follows it (switch to the output, or drop it)
            with engine._lock:
                engine._interrupted()
            raise
        # ---- 4. switch the index to the output (locations that did not change)
        engine._install_compaction(output)
        # ---- 5. delete the other inputs (open would delete them after a crash)
        try:
            for number in inputs[:-1]:
                with contextlib.suppress(FileNotFoundError):  # (an interrupted call's settle)
                    fs.unlink(segments[number].path)
            fs.fsync_dir(engine.path)
        except OSError as exc:
            log.warning("%s: could not delete compacted segments (%r); open will", engine.path, exc)
        log.info(
            "%s: compacted segments %s into %s: %d -> %d bytes",
            engine.path,
            inputs,
            hi,
            result.bytes_before,
            result.bytes_after,
        )
        return result
