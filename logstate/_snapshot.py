"""Index snapshots: the in-memory index saved at close, so open need not scan.

Owns: the byte layout of ``index.snapshot`` (documented in docs/format.md)
and the checks that decide whether a snapshot may be trusted.
Must never: do I/O, or be trusted without those checks: a snapshot is only
a cache of what scanning the segments would rebuild, and any doubt (wrong
checksum, other Python version, segments that changed since) means "scan".

Layout (version 2)::

    snapshot = magic:8 version:u16 py_major:u8 py_minor:u8 marshal_version:u16
               flags:u16 body_size:u64 body_crc:u32 body
    body     = marshal((namespaces, checkpoint, seq, live_bytes, segments))
               or, with flag bit 0 (SNAPSHOT_FLAG_ZSTD), one zstd frame of it
    segments = [(number, covers_from, size, tail_crc), ...]   # in order

Version 4 (the C path's, written when every namespace's index is a
``KeyMap``: ``csrc/keymap.c``) stores each index as its raw arrays,
little-endian, independent of the Python version (the header's py_major,
py_minor and marshal_version are 0)::

    body     = meta_size:u32 meta(JSON, UTF-8) keymap*
    meta     = {"namespaces": [[name, count, arena_size, side_count], ...],
                "checkpoint", "seq", "live_bytes", "segments", "expiring",
                "clock_floor"}  # the fields of version 3, a tuple as a list
    keymap   = arena(arena_size bytes) side(side_count x 6 u64)

``arena`` is the KeyMap's records in insertion order (see keymap.c and
``_snapshot_raw``); the C loader (``keymap_load``) checks every record and location against the
segment marks in one pass and rebuilds the hash table. The pure path reads
versions 2 and 3 only: a version 4 snapshot makes it scan, and its close
writes version 3 again; the C path reads all three (a marshal snapshot's
dicts become KeyMaps).

Version 1 (before compressed locations carried their share of the record's
bytes, see ``_location``) had 5-tuples and no flags; it is not read (open
scans instead, and the next close writes version 2).

Size: a snapshot is a cache, never worth more disk than the data it
indexes. The body is compressed only when the plain one would be larger
than the segments (values in compressed groups: a tuple of six ints per key
against a few compressed bytes), and :func:`encode_snapshot` gives None
when even the compressed one is larger (then none is written).

``tail_crc`` is the CRC-32C of the last min(size, TAIL_BYTES) bytes of the
segment below ``size``: open re-reads those bytes, so a segment that was
rewritten, truncated or replaced since the snapshot is noticed. Segments
are append-only, so bytes past ``size`` (written after the snapshot, by a
process that then crashed) are scanned as usual.

marshal is used because it rebuilds a dict of a million keys several times
faster than anything decoded in Python; its format depends on the Python
version, which the header records. marshal is not meant for untrusted input:
open a directory from an untrusted source with ``use_snapshot=False``.
"""

from __future__ import annotations

import marshal
import struct
import sys
from collections.abc import Iterable
from typing import Any, Final, NamedTuple, overload

import zstandard

from logstate._crc import crc32c
from logstate._errors import CorruptionError
from logstate._format import (
    GROUP_HEADER_SIZE,
    GROUP_OP_SIZE,
    GROUP_RAW_SIZE,
    MAX_NAME_SIZE,
    MAX_RECORD_SIZE,
    NS_SEPARATOR,
    RECORD_OVERHEAD,
    SEGMENT_HEADER_SIZE,
    SEQ_SIZE,
)
from logstate._location import OFFSET_MASK, OFFSET_SHIFT, SEGMENT_SHIFT, SIZE_MASK, SIZE_SHIFT
from logstate._snapshot_raw import RAW_AVAILABLE, decode_raw_body, encode_raw_body

SNAPSHOT_MAGIC: Final = b"\x89LGSNAP\n"
MARSHAL_SNAPSHOT_VERSION: Final = 3  # 3 added the expiry table and the clock floor
RAW_SNAPSHOT_VERSION: Final = 4  # KeyMaps as raw arrays
# written: by the C path when every index is a KeyMap (else a marshal one)
SNAPSHOT_VERSION: Final = RAW_SNAPSHOT_VERSION if RAW_AVAILABLE else MARSHAL_SNAPSHOT_VERSION
# read: a 2 is a 3 without expiring keys; a 4 only where the C path can load it
READ_SNAPSHOT_VERSIONS: Final = (2, 3, 4) if RAW_AVAILABLE else (2, 3)
SNAPSHOT_FLAG_ZSTD: Final = 0x0001  # the body is one zstd frame of the marshal bytes
SNAPSHOT_ZSTD_LEVEL: Final = 1
SNAPSHOT_HEADER: Final = struct.Struct("<8sHBBHHQI")
assert SNAPSHOT_HEADER.size == 28
_INF: Final = float("inf")
TAIL_BYTES: Final = 4096
MAX_MARK_FIELD: Final = 1 << 48  # segment numbers, sizes and offsets are far below this
# A snapshot's sequence number must be below this: the record field holds
# 2**64 - 1, and a store opened from the snapshot must be able to write (2**63
# more records: no store comes near it).
MAX_SEQ: Final = 1 << (8 * SEQ_SIZE - 1)


class SegmentMark(NamedTuple):
    """What a snapshot remembers of one segment, to check it is unchanged."""

    number: int
    covers_from: int
    size: int
    tail_crc: int


class Snapshot(NamedTuple):
    namespaces: dict[str, Any]  # ns -> its index: a dict, or a KeyMap (version 4)
    checkpoint: Any
    seq: int
    live_bytes: int
    segments: list[SegmentMark]
    expiring: dict[str, dict[str, float]]  # ns -> key -> deadline_s (Keydir.expiring)
    clock_floor: float  # Keydir.clock_floor


@overload
def encode_snapshot(snapshot: Snapshot) -> bytes: ...
@overload
def encode_snapshot(snapshot: Snapshot, max_size: int) -> bytes | None: ...
def encode_snapshot(snapshot: Snapshot, max_size: int | None = None) -> bytes | None:
    """The bytes of ``index.snapshot`` for ``snapshot``.

    Args:
        max_size: the most bytes the file may take (the segments' size):
            a larger body is compressed, and if that is still too large
            the result is None. None: no bound, never compressed.
    """
    fitted = None
    version = RAW_SNAPSHOT_VERSION
    if RAW_AVAILABLE and all(type(i) is not dict for i in snapshot.namespaces.values()):
        raw = encode_raw_body(snapshot.namespaces, _raw_meta(snapshot))
        fitted = None if raw is None else _fit(raw, max_size)
    if fitted is None:  # (the pure path; or a raw body too large for a tiny store)
        version = MARSHAL_SNAPSHOT_VERSION
        fitted = _fit(_encode_marshal_body(snapshot), max_size)
        if fitted is None:
            return None
    body, flags = fitted
    pinned = version != RAW_SNAPSHOT_VERSION  # marshal's bytes depend on the Python version
    header = SNAPSHOT_HEADER.pack(
        SNAPSHOT_MAGIC,
        version,
        sys.version_info[0] if pinned else 0,
        sys.version_info[1] if pinned else 0,
        marshal.version if pinned else 0,
        flags,
        len(body),
        crc32c(body),
    )
    return header + body


def _fit(body: bytes, max_size: int | None) -> tuple[bytes, int] | None:
    """(body, flags): ``body`` as it is, or compressed when a file of it would
    be over ``max_size``; None when even that is over."""
    if max_size is None or SNAPSHOT_HEADER.size + len(body) <= max_size:
        return body, 0
    packed = zstandard.ZstdCompressor(level=SNAPSHOT_ZSTD_LEVEL).compress(body)
    return (packed, SNAPSHOT_FLAG_ZSTD) if SNAPSHOT_HEADER.size + len(packed) <= max_size else None


def _raw_meta(snapshot: Snapshot) -> dict[str, Any]:
    """The fields of a version 4 body's meta but its namespaces (JSON's types)."""
    checkpoint = snapshot.checkpoint
    return {
        "checkpoint": list(checkpoint) if type(checkpoint) is tuple else checkpoint,
        "seq": snapshot.seq,
        "live_bytes": snapshot.live_bytes,
        "segments": [list(mark) for mark in snapshot.segments],
        "expiring": snapshot.expiring,
        "clock_floor": snapshot.clock_floor,
    }


def _encode_marshal_body(snapshot: Snapshot) -> bytes:
    """The body of a version 3 snapshot (every index a dict: KeyMaps are copied)."""
    namespaces = {
        ns: index if type(index) is dict else dict(index)
        for ns, index in snapshot.namespaces.items()
    }
    return marshal.dumps(
        (
            namespaces,
            snapshot.checkpoint,
            snapshot.seq,
            snapshot.live_bytes,
            [tuple(mark) for mark in snapshot.segments],
            snapshot.expiring or None,  # (None: a byte, where a tiny store's snapshot
            snapshot.clock_floor or None,  # must stay below its segments' size)
        )
    )


def decode_snapshot(data: bytes) -> Snapshot:
    """Decode and sanity-check a snapshot.

    Every field is checked against what logstate itself could have written:
    the shape and types, ``seq`` below :data:`MAX_SEQ`, every segment mark's
    size within the offset field, every location (and the checkpoint's)
    inside the byte range of the segment it names, between the header and
    the mark's size, no smaller than the smallest record or operation, of a
    known kind, and ``live_bytes`` equal to the sum of the locations' sizes.
    What no check of the snapshot alone can tell (a location inside its
    segment but at another record) is caught when the value is read, which
    proves the record is that key's, and by ``logstate check``, which
    compares the snapshot with a full scan.

    Raises:
        CorruptionError: anything wrong (the caller then scans instead);
            ``reason`` says what.
    """
    if len(data) < SNAPSHOT_HEADER.size:
        raise CorruptionError("", 0, "snapshot header truncated")
    magic, version, major, minor, marshal_version, flags, size, crc = SNAPSHOT_HEADER.unpack_from(
        data, 0
    )
    known = magic == SNAPSHOT_MAGIC and version in READ_SNAPSHOT_VERSIONS
    if not known or flags & ~SNAPSHOT_FLAG_ZSTD:
        raise CorruptionError("", 0, "not a logstate index snapshot of a known version")
    pinned = version != RAW_SNAPSHOT_VERSION  # (a version 4 has zeros there)
    found = (major, minor, marshal_version)
    if found != ((*sys.version_info[:2], marshal.version) if pinned else (0, 0, 0)):
        raise CorruptionError(
            "", 0, f"snapshot written by Python {major}.{minor} (marshal {marshal_version})"
        )
    body: bytes | memoryview = memoryview(data)[SNAPSHOT_HEADER.size :]
    if len(body) != size or crc32c(body) != crc:
        raise CorruptionError("", SNAPSHOT_HEADER.size, "snapshot body checksum mismatch")
    if flags & SNAPSHOT_FLAG_ZSTD:
        body = _decompress(body)
    if not pinned:
        namespaces, sizes, meta = decode_raw_body(body, _RAW_LIMITS)
        try:
            checkpoint = meta["checkpoint"]
            checkpoint = tuple(checkpoint) if type(checkpoint) is list else checkpoint
            marks = [SegmentMark(*mark) for mark in meta["segments"]]
            fields = (checkpoint, meta["seq"], meta["live_bytes"], marks)
            times = (meta["expiring"], meta["clock_floor"])
        except Exception as exc:  # (JSON logstate did not write)
            raise CorruptionError(
                "", SNAPSHOT_HEADER.size, f"snapshot body: {type(exc).__name__}: {exc}"
            ) from None
        return _checked_snapshot(namespaces, *fields, *times, sizes)
    try:
        fields = marshal.loads(body)
        expiring: Any = {}
        clock_floor: Any = 0.0
        if version == 2:
            namespaces, checkpoint, seq, live_bytes, raw_marks = fields
        else:
            namespaces, checkpoint, seq, live_bytes, raw_marks, expiring, clock_floor = fields
            expiring = {} if expiring is None else expiring
            clock_floor = 0.0 if clock_floor is None else clock_floor
        marks = [SegmentMark(*mark) for mark in raw_marks]
    except Exception as exc:
        # marshal runs no code of the data's choosing, so whatever it raises
        # comes from bytes logstate did not write: ValueError, EOFError and
        # TypeError, but also SystemError (a code object with bad fields),
        # MemoryError or RecursionError. Any of them means "scan".
        raise CorruptionError(
            "", SNAPSHOT_HEADER.size, f"snapshot body: {type(exc).__name__}: {exc}"
        ) from None
    return _checked_snapshot(
        namespaces, checkpoint, seq, live_bytes, marks, expiring, clock_floor, None
    )


def _checked_snapshot(
    namespaces: Any,
    checkpoint: Any,
    seq: Any,
    live_bytes: Any,
    marks: list[SegmentMark],
    expiring: Any,
    clock_floor: Any,
    sizes: dict[str, int] | None,
) -> Snapshot:
    """The checks of :func:`decode_snapshot` on decoded fields; ``sizes``: the
    total size of each namespace's locations, already checked (KeyMaps,
    ``keymap_load``), or None (dicts: checked here)."""
    if not (
        type(namespaces) is dict
        and "" in namespaces
        and type(seq) is int
        and type(live_bytes) is int
        and (sizes is not None or all(type(index) is dict for index in namespaces.values()))
        and all(type(f) is int and 0 <= f < MAX_MARK_FIELD for mark in marks for f in mark)
        and marks
    ):
        raise CorruptionError("", SNAPSHOT_HEADER.size, "snapshot body has the wrong shape")
    if not 0 <= seq < MAX_SEQ:
        raise CorruptionError(
            "", SNAPSHOT_HEADER.size, f"snapshot sequence number {seq} is out of range"
        )
    if any(mark.size > OFFSET_MASK for mark in marks):
        raise CorruptionError("", SNAPSHOT_HEADER.size, "snapshot names a segment past 1 TiB")
    bad = CorruptionError("", SNAPSHOT_HEADER.size, "snapshot holds a bad key or location")
    # [low, high) of a packed location in each segment: offset >= header;
    # the end (``loc + (size << 34)`` puts offset + size in the offset field)
    # at most the mark's size
    low = {m.number: m.number << SEGMENT_SHIFT | SEGMENT_HEADER_SIZE << OFFSET_SHIFT for m in marks}
    high = {m.number: m.number << SEGMENT_SHIFT | (m.size + 1) << OFFSET_SHIFT for m in marks}
    limits = {mark.number: mark.size for mark in marks}
    if checkpoint is not None and _mixed_locations_size([checkpoint], low, high, limits) is None:
        raise bad
    total = 0
    for ns, index in namespaces.items():
        if type(ns) is not str or (ns and ns.rpartition(NS_SEPARATOR)[0] not in namespaces):
            raise bad
        try:
            # every name a str (join raises TypeError) that UTF-8 can encode
            # (a KeyMap's keys were checked by keymap_load)
            ns.encode("utf-8")
            if sizes is not None:
                total += sizes[ns]
                continue
            "".join(index).encode("utf-8")
        except (TypeError, ValueError):
            raise bad from None
        try:
            found = _int_locations_size(index.values(), low, high)
        except TypeError:  # compressed-group tuples among them (or garbage)
            found = _mixed_locations_size(index.values(), low, high, limits)
        if found is None:
            raise bad
        total += found
    if live_bytes != total:
        raise CorruptionError(
            "",
            SNAPSHOT_HEADER.size,
            f"snapshot says {live_bytes} live bytes, its locations add up to {total}",
        )
    if not _expiry_table_fits(expiring, clock_floor, namespaces):
        raise CorruptionError("", SNAPSHOT_HEADER.size, "snapshot holds a bad expiry table")
    return Snapshot(namespaces, checkpoint, seq, live_bytes, marks, expiring, clock_floor)


def _expiry_table_fits(expiring: Any, clock_floor: Any, namespaces: dict[str, Any]) -> bool:
    """True when ``expiring`` is ns -> key -> finite deadline, for keys in ``namespaces``,
    none empty, and ``clock_floor`` a finite time."""
    if type(clock_floor) is not float or not 0.0 <= clock_floor < _INF:
        return False
    if type(expiring) is not dict:
        return False
    for ns, deadlines in expiring.items():
        index = namespaces.get(ns) if type(ns) is str else None
        if index is None or type(deadlines) is not dict or not deadlines:
            return False
        for key, deadline_s in deadlines.items():
            if type(deadline_s) is not float or not 0.0 <= deadline_s < _INF or key not in index:
                return False
    return True


# Smallest size << 2 of a location of each kind (index: the kind); a kind
# outside the tuple is refused by the IndexError.
_MIN_SIZE: Final = (RECORD_OVERHEAD << SIZE_SHIFT, GROUP_OP_SIZE << SIZE_SHIFT)
_SIZE_BITS: Final = SIZE_MASK << SIZE_SHIFT
_MIN_GROUP_RECORD: Final = RECORD_OVERHEAD + GROUP_HEADER_SIZE + GROUP_RAW_SIZE.size
# The bounds keymap_load checks a KeyMap's locations against: the same as
# _int_locations_size's and _mixed_locations_size's (csrc/keymap.c copies
# those two rules, marked there; tests/test_keymap_snapshot.py proves them
# equal), and a key's UTF-8 length.
_RAW_LIMITS: Final = (
    SEGMENT_HEADER_SIZE,
    RECORD_OVERHEAD,
    GROUP_OP_SIZE,
    _MIN_GROUP_RECORD,
    MAX_RECORD_SIZE,
    MAX_NAME_SIZE,
)


def _int_locations_size(
    values: Iterable[Any], low: dict[int, int], high: dict[int, int]
) -> int | None:
    """Total size of packed-int locations, or None when one is out of bounds.

    The hot loop of a marshal snapshot's load (one pass over every key): no
    call, no unpacking. csrc/keymap.c (``keymap_load``) copies this rule and
    :func:`_mixed_locations_size`'s for a version 4 snapshot. ``low``/``high``
    map each segment number to the range its packed locations must fall in
    (see :func:`decode_snapshot`).

    Raises:
        TypeError: a value is not an int (a compressed-group tuple, or
            something else): the caller checks them one by one.
    """
    total = 0
    min_size = _MIN_SIZE
    size_bits = _SIZE_BITS
    try:
        for loc in values:
            t = loc & size_bits  # size << 2
            if t < min_size[loc & 3] or not low[loc >> 74] <= loc < high[loc >> 74] - (t << 32):
                return None
            total += t
    except (KeyError, IndexError):  # no such segment; kind 2 or 3
        return None
    return total >> SIZE_SHIFT


def _mixed_locations_size(
    values: Iterable[Any], low: dict[int, int], high: dict[int, int], limits: dict[int, int]
) -> int | None:
    """As :func:`_int_locations_size` for values that may be compressed-group tuples."""
    total = 0
    for loc in values:
        if type(loc) is int:
            found = _int_locations_size((loc,), low, high)
            if found is None:
                return None
            total += found
        elif type(loc) is tuple and len(loc) == 6 and all(type(x) is int for x in loc):
            number, record_offset, record_size, op_offset, op_size, share = loc
            limit = limits.get(number)
            if not (
                limit is not None
                and record_offset >= SEGMENT_HEADER_SIZE
                and _MIN_GROUP_RECORD <= record_size <= limit - record_offset
                and op_offset >= 0
                and GROUP_OP_SIZE <= op_size <= MAX_RECORD_SIZE - op_offset
                and 0 <= share <= record_size  # its share of the record's bytes on disk
            ):
                return None
            total += share
        else:
            return None
    return total


def _decompress(body: bytes | memoryview) -> bytes:
    """The marshal bytes of a compressed body (its frame must declare its size)."""
    packed = bytes(body)
    try:
        content_size = zstandard.frame_content_size(packed)
        if content_size < 0:
            raise CorruptionError("", SNAPSHOT_HEADER.size, "snapshot zstd frame without a size")
        raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=content_size)
    except zstandard.ZstdError as exc:
        raise CorruptionError("", SNAPSHOT_HEADER.size, f"snapshot body: {exc}") from None
    if len(raw) != content_size:
        raise CorruptionError("", SNAPSHOT_HEADER.size, "snapshot body has the wrong size")
    return raw


def tail_crc(data: bytes | memoryview) -> int:
    """The ``tail_crc`` of a segment whose first ``size`` bytes end with ``data``."""
    return crc32c(data[-TAIL_BYTES:])
