"""Writing a compaction's output: the plan, the live records read, the output file.

Owns: the compaction plan (``plan_compaction``: what is live in the sealed
segments, listed under the write lock, as data) and ``write_output``: the
output written under its temporary name and made durable, every record it
copies proved to be its key's, an output that would not be smaller
abandoned.
Must never: take a lock, touch the active segment, rename the output, or
change the index (``_compact`` installs it, ``_switch`` switches to it).

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

from dataclasses import dataclass, field
from typing import NamedTuple

from logstate import _format as fmt
from logstate._errors import CorruptionError
from logstate._filenames import COMPACT_TMP_SUFFIX
from logstate._format import REC_CREATE_NS, REC_GROUP
from logstate._fs import FileSystem
from logstate._keydir import Keydir
from logstate._lifecycle import Lifecycle
from logstate._location import (
    KIND_GROUP_OP,
    KIND_RECORD,
    Location,
    compressed_location,
    location_segment,
    pack_location,
    unpack_location,
)
from logstate._reader import decompress_group
from logstate._segments import Segment, SegmentSet
from logstate._switch import Moved

__all__ = ["CompactionPlan", "Written", "plan_compaction", "write_output"]

_FLUSH_BYTES = 1 << 20
_CHUNK_BYTES = 1 << 20  # operations of an output group (see the module docstring)
_MAX_CHUNK_BYTES = 16 << 20


class _Reader:
    """Reads live records out of the input segments, one segment in memory at a time."""

    def __init__(self, fs: FileSystem, segments: dict[int, Segment]) -> None:
        self._fs = fs
        self._segments = segments  # the inputs
        self._number = -1
        self._data = b""
        self._groups: dict[tuple[int, int], bytes | memoryview] = {}

    def _segment_data(self, number: int) -> bytes:
        """The input's bytes, read through a descriptor of its own (closed at once).

        Inputs are sealed and only a compaction (this one, under
        the compaction lock) replaces or deletes their files; the segment's
        own descriptor and mapping may be closed meanwhile (open files are
        bounded, see ``SegmentSet.add_mapping``).
        """
        if number != self._number:
            fs = self._fs
            fd = fs.open_read_only(self._segments[number].path)
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
                    path = self._segments[number].path
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
            path = self._segments[number].path
            offset = location[1] if isinstance(location, tuple) else unpack_location(location)[1]
            raise CorruptionError(path, offset, f"the index points {key!r} at another key's record")

    def op(self, location: Location, ns: str | None = None, key: str = "") -> bytes:
        """The bytes (op_crc type length body) of a live operation of a group, CRC-checked.

        ``ns``/``key``: as for :meth:`record`.
        """
        if type(location) is int:
            number, offset, size, _kind = unpack_location(location)
            chunk = self._segment_data(number)[offset : offset + size]
            try:
                fmt.check_group_op(chunk)
            except CorruptionError as exc:
                path = self._segments[number].path
                raise CorruptionError(path, offset + exc.offset, exc.reason) from None
            self._prove(chunk, fmt.GROUP_OP_SIZE, ns, key, location)
            return chunk
        assert isinstance(location, tuple)
        number, record_offset, record_size, op_offset, op_size = location[:5]
        data = self._segment_data(number)
        raw = self._groups.get((number, record_offset))
        if raw is None:
            record = data[record_offset : record_offset + record_size]
            path = self._segments[number].path
            raw = self._groups[(number, record_offset)] = decompress_group(
                path, record_offset, record
            )
        op = bytes(raw[op_offset : op_offset + op_size])
        try:
            fmt.check_group_op(op)
        except CorruptionError as exc:
            path = self._segments[number].path
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
        moved: Moved,
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


def _read_order(item: tuple[Location, str, str]) -> tuple[int, int, int]:
    location = item[0]
    if type(location) is int:
        number, offset, _size, _kind = unpack_location(location)
        return number, offset, 0
    assert isinstance(location, tuple)
    return location[0], location[1], location[3]


class CompactionPlan(NamedTuple):
    """What one compaction rewrites (listed under the write lock, as data).

    ``live``: (location, namespace, key) of every live value in the inputs,
    in read order; ``namespaces``: every sub-storage, parents first (the
    output creates them all, so that empty ones survive the inputs);
    ``expired``: (location, namespace, key) of the values in the inputs
    that had expired when the plan was made: not copied, and deleted from
    the index at the switch where the key still points at them.
    """

    inputs: list[int]
    segments: dict[int, Segment]
    live: list[tuple[Location, str, str]]
    namespaces: list[str]
    checkpoint: Location | None  # when it is in the inputs
    seq: int
    covers_from: int
    expired: list[tuple[Location, str, str]]


def plan_compaction(
    segments: SegmentSet, keydir: Keydir, seq: int, now_s: float
) -> CompactionPlan | None:
    """The plan for compacting every sealed segment, or None when there is none.

    Call under the write lock, with the active segment just sealed.
    ``now_s``: the storage's clock; values that expired by then are dropped.
    """
    active = segments.active
    assert active is not None
    inputs = sorted(n for n in segments.segments if n != active.number)
    if not inputs:
        return None
    input_set = set(inputs)
    live = keydir.live_in(input_set)
    expired: list[tuple[Location, str, str]] = []
    if keydir.expiring:
        kept: list[tuple[Location, str, str]] = []
        for entry in live:
            (expired if keydir.is_expired(entry[1], entry[2], now_s) else kept).append(entry)
        live = kept
    live.sort(key=_read_order)
    checkpoint = keydir.checkpoint
    if checkpoint is not None and location_segment(checkpoint) not in input_set:
        checkpoint = None
    chosen = {n: segments.segments[n] for n in inputs}
    return CompactionPlan(
        inputs,
        chosen,
        live,
        keydir.sub_namespaces(),
        checkpoint,
        seq,
        chosen[inputs[0]].covers_from,
        expired,
    )


class Written(NamedTuple):
    """A compaction output, durable under its temporary name."""

    fd: int
    tmp_path: str
    moved: Moved
    new_checkpoint: int | None
    size: int


def write_output(
    fs: FileSystem,
    plan: CompactionPlan,
    zstd_level: int,
    life: Lifecycle,
) -> Written | None:
    """Write the plan's output under its temporary name and make it durable.

    Returns None (and leaves nothing) when the output would not be smaller
    than its inputs.

    Raises:
        StorageClosedError: the engine began closing (nothing is left).
        CorruptionError: a live record failed its checksum or is not its key's.
        OSError: from the file system (the temporary file is removed).
    """
    hi = plan.inputs[-1]
    seq = plan.seq
    tmp_path = plan.segments[hi].path + COMPACT_TMP_SUFFIX
    if fs.exists(tmp_path):
        fs.unlink(tmp_path)
    fd = fs.create_file(tmp_path)
    moved: Moved = [(ns, key, loc, None) for loc, ns, key in plan.expired]
    new_checkpoint: int | None = None
    try:
        limit = sum(s.size for s in plan.segments.values())
        out = _Output(fs, fd, fmt.encode_segment_header(hi), limit)
        out.add(fmt.encode_compacted_record(seq, plan.covers_from))
        for ns in plan.namespaces:
            out.add(fmt.encode_record(REC_CREATE_NS, seq, fmt.encode_name(ns)))
        reader = _Reader(fs, plan.segments)
        plain, packed = _Chunk(compress=False), _Chunk(compress=True)
        for loc, ns, key in plan.live:
            if type(loc) is int and loc & 3 == KIND_RECORD:
                _op_type, record = reader.record(loc, seq, ns, key)
                offset = out.add(record)
                moved.append((ns, key, loc, pack_location(hi, offset, len(record), KIND_RECORD)))
            else:
                op = reader.op(loc, ns, key)
                # the input group: a compressed one's place; each plain op its own
                chunk, source = (packed, loc[:2]) if isinstance(loc, tuple) else (plain, loc)
                if chunk.add(op, source, (ns, key, loc)):
                    chunk.write(out, hi, seq, zstd_level, moved)
                    chunk.add(op, source, (ns, key, loc))
            if life.closing:
                raise life.closed_during("compaction")
        for chunk in (plain, packed):
            if chunk.ops:
                chunk.write(out, hi, seq, zstd_level, moved)
        if plan.checkpoint is not None:
            _op_type, record = reader.record(plan.checkpoint, seq)
            offset = out.add(record)
            new_checkpoint = pack_location(hi, offset, len(record), KIND_RECORD)
        out.flush()
        fs.fdatasync(fd)
    except BaseException as exc:
        fs.close(fd)
        fs.unlink(tmp_path)
        if isinstance(exc, _OutputNotSmaller):
            return None
        raise
    return Written(fd, tmp_path, moved, new_checkpoint, out.written)
