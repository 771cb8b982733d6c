"""Where a value lives: the packed location ints of the index, and segment handles.

Owns: the packing of (segment, offset, size, kind) into one int, the tuple
that locates a value inside a compressed group, and the ``Segment`` record of
an open segment file.
Must never: do I/O (a ``Segment`` only carries its file descriptor).

A location is packed into one int to keep memory per key low::

    location = segment << 74 | offset << 34 | size << 2 | kind

40 bits of offset, 32 of size: the int stays within three 30-bit digits (36
bytes) for segment numbers below 2**16. ``kind`` is KIND_RECORD (the bytes
are a whole record) or KIND_GROUP_OP (one operation inside an uncompressed
group, with its own CRC). A value inside a zstd-compressed group is located
by a plain tuple (segment, record_offset, record_size, op_offset, op_size,
share), op_offset counted in the decompressed operation list; plain tuples
(not a NamedTuple) so that index snapshots can marshal them.

``share`` is the operation's part of the bytes the compressed record takes
on disk (``op_size`` counts decompressed bytes): the record's size spread
over its operations in proportion to their decompressed sizes, rounded so
that the shares of one group add up to exactly ``record_size``
(:func:`compressed_location`). The live bytes of the index are the sum of
:func:`location_size` over it, so they never exceed the segments' bytes.
"""

from __future__ import annotations

import mmap
from typing import Final

KIND_RECORD: Final = 0
KIND_GROUP_OP: Final = 1
SEGMENT_SHIFT: Final = 74
OFFSET_SHIFT: Final = 34
SIZE_SHIFT: Final = 2
U32: Final = 0xFFFFFFFF  # size field
U40: Final = (1 << 40) - 1  # offset field: segments up to 1 TiB

CompressedLocation = tuple[int, int, int, int, int, int]
Location = int | CompressedLocation


def pack_location(segment: int, offset: int, size: int, kind: int) -> int:
    return segment << SEGMENT_SHIFT | offset << OFFSET_SHIFT | size << SIZE_SHIFT | kind


def unpack_location(location: int) -> tuple[int, int, int, int]:
    """(segment, offset, size, kind) of a packed location."""
    return location >> 74, (location >> 34) & U40, (location >> 2) & U32, location & 3


def compressed_location(
    segment: int, record_offset: int, record_size: int, op_offset: int, op_size: int, raw_size: int
) -> CompressedLocation:
    """The location of the operation at ``op_offset`` of a compressed group.

    ``raw_size``: the decompressed size of the group's operation list. The
    share is ``floor(end * record_size / raw_size) - floor(start * ...)``:
    each share is within one byte of the proportional one, and the shares
    of all the group's operations add up to ``record_size`` exactly.
    """
    end = op_offset + op_size
    share = end * record_size // raw_size - op_offset * record_size // raw_size
    return (segment, record_offset, record_size, op_offset, op_size, share)


def location_size(location: Location) -> int:
    """Bytes the location's record (or group operation, or share of a
    compressed group) takes on disk."""
    if type(location) is int:
        return (location >> 2) & U32
    assert isinstance(location, tuple)
    return location[5]


def location_segment(location: Location) -> int:
    """The segment number a location points into."""
    if type(location) is int:
        return location >> 74
    assert isinstance(location, tuple)
    return location[0]


def sizes(index: dict[str, Location]) -> int:
    """Total bytes of every location in ``index``."""
    return sum(map(location_size, index.values()))


class Segment:
    """An open segment file. ``covers_from``: the lowest segment number whose
    records it holds (itself, or for a compaction output its first input)."""

    __slots__ = ("covers_from", "fd", "map", "mapped", "number", "path", "size")

    def __init__(self, number: int, path: str, fd: int, size: int, covers_from: int = 0) -> None:
        self.number = number
        self.path = path
        self.fd = fd
        self.size = size
        self.covers_from = covers_from or number
        self.map: mmap.mmap | None = None  # read-only mapping of the first ``mapped`` bytes
        self.mapped = 0
