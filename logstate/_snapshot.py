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
from typing import Any, Final, NamedTuple, overload

import zstandard

from logstate._errors import CorruptionError
from logstate._format import crc32c

SNAPSHOT_FILE_NAME: Final = "index.snapshot"
SNAPSHOT_MAGIC: Final = b"\x89LGSNAP\n"
SNAPSHOT_VERSION: Final = 2
SNAPSHOT_FLAG_ZSTD: Final = 0x0001  # the body is one zstd frame of the marshal bytes
SNAPSHOT_ZSTD_LEVEL: Final = 1
SNAPSHOT_HEADER: Final = struct.Struct("<8sHBBHHQI")
assert SNAPSHOT_HEADER.size == 28
TAIL_BYTES: Final = 4096
MAX_MARK_FIELD: Final = 1 << 48  # segment numbers, sizes and offsets are far below this


class SegmentMark(NamedTuple):
    """What a snapshot remembers of one segment, to check it is unchanged."""

    number: int
    covers_from: int
    size: int
    tail_crc: int


class Snapshot(NamedTuple):
    namespaces: dict[str, dict[str, Any]]
    checkpoint: Any
    seq: int
    live_bytes: int
    segments: list[SegmentMark]


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
    flags = 0
    body = marshal.dumps(
        (
            snapshot.namespaces,
            snapshot.checkpoint,
            snapshot.seq,
            snapshot.live_bytes,
            [tuple(mark) for mark in snapshot.segments],
        )
    )
    if max_size is not None and SNAPSHOT_HEADER.size + len(body) > max_size:
        body = zstandard.ZstdCompressor(level=SNAPSHOT_ZSTD_LEVEL).compress(body)
        flags = SNAPSHOT_FLAG_ZSTD
        if SNAPSHOT_HEADER.size + len(body) > max_size:
            return None
    header = SNAPSHOT_HEADER.pack(
        SNAPSHOT_MAGIC,
        SNAPSHOT_VERSION,
        sys.version_info[0],
        sys.version_info[1],
        marshal.version,
        flags,
        len(body),
        crc32c(body),
    )
    return header + body


def decode_snapshot(data: bytes) -> Snapshot:
    """Decode and sanity-check a snapshot.

    Raises:
        CorruptionError: anything wrong (the caller then scans instead);
            ``reason`` says what.
    """
    if len(data) < SNAPSHOT_HEADER.size:
        raise CorruptionError("", 0, "snapshot header truncated")
    magic, version, major, minor, marshal_version, flags, size, crc = SNAPSHOT_HEADER.unpack_from(
        data, 0
    )
    if magic != SNAPSHOT_MAGIC or version != SNAPSHOT_VERSION or flags & ~SNAPSHOT_FLAG_ZSTD:
        raise CorruptionError("", 0, "not a logstate index snapshot of a known version")
    if (major, minor) != sys.version_info[:2] or marshal_version != marshal.version:
        raise CorruptionError(
            "", 0, f"snapshot written by Python {major}.{minor} (marshal {marshal_version})"
        )
    body: bytes | memoryview = memoryview(data)[SNAPSHOT_HEADER.size :]
    if len(body) != size or crc32c(body) != crc:
        raise CorruptionError("", SNAPSHOT_HEADER.size, "snapshot body checksum mismatch")
    if flags & SNAPSHOT_FLAG_ZSTD:
        body = _decompress(body)
    try:
        namespaces, checkpoint, seq, live_bytes, raw_marks = marshal.loads(body)
        marks = [SegmentMark(*mark) for mark in raw_marks]
    except (ValueError, TypeError, EOFError) as exc:
        raise CorruptionError("", SNAPSHOT_HEADER.size, f"snapshot body: {exc}") from None
    if not (
        type(namespaces) is dict
        and "" in namespaces
        and type(seq) is int
        and type(live_bytes) is int
        and all(type(index) is dict for index in namespaces.values())
        and all(type(f) is int and 0 <= f < MAX_MARK_FIELD for mark in marks for f in mark)
        and marks
    ):
        raise CorruptionError("", SNAPSHOT_HEADER.size, "snapshot body has the wrong shape")
    bad = CorruptionError("", SNAPSHOT_HEADER.size, "snapshot holds a bad key or location")
    numbers = {mark.number for mark in marks}
    if not _is_location(checkpoint, numbers, allow_none=True):
        raise bad
    for ns, index in namespaces.items():
        if type(ns) is not str or (ns and ns.rpartition("/")[0] not in namespaces):
            raise bad
        if not set(map(type, index)) <= {str}:
            raise bad
        kinds = set(map(type, index.values()))
        if not index:
            continue
        if kinds == {int}:
            # Each int location's segment is not checked one by one (that
            # would cost a third of the load time): the range is, and every
            # read checks the record's CRC and key, and names a missing
            # segment as corruption.
            if min(index.values()) < 1 << 74 or max(index.values()) >> 74 > max(numbers):
                raise bad
        elif not kinds <= {int, tuple} or not all(
            _is_location(loc, numbers) for loc in index.values()
        ):
            raise bad
    return Snapshot(namespaces, checkpoint, seq, live_bytes, marks)


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


def _is_location(loc: object, numbers: set[int], allow_none: bool = False) -> bool:
    """A packed int or a compressed-group tuple naming one of ``numbers``."""
    if loc is None:
        return allow_none
    if type(loc) is int:
        return loc >= 0 and loc >> 74 in numbers
    return (
        type(loc) is tuple
        and len(loc) == 6
        and all(type(x) is int and 0 <= x < MAX_MARK_FIELD for x in loc)
        and loc[0] in numbers
        and loc[5] <= loc[2]  # a share of the record's bytes
    )


def tail_crc(data: bytes | memoryview) -> int:
    """The ``tail_crc`` of a segment whose first ``size`` bytes end with ``data``."""
    return crc32c(data[-TAIL_BYTES:])
