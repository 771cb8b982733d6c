"""Where a value lives: the packed location ints of the index.

Owns: the packing of (segment, offset, size, kind) into one int, and the
tuple that locates a value inside a compressed group.
Must never: do I/O (open segment files are ``_segments.Segment``).

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

from typing import Final, Protocol

KIND_RECORD: Final = 0
KIND_GROUP_OP: Final = 1
SEGMENT_SHIFT: Final = 74
OFFSET_SHIFT: Final = 34
SIZE_SHIFT: Final = 2
SIZE_MASK: Final = 0xFFFFFFFF  # size field
OFFSET_MASK: Final = (1 << 40) - 1  # offset field: segments up to 1 TiB

CompressedLocation = tuple[int, int, int, int, int, int]
Location = int | CompressedLocation


def pack_location(segment: int, offset: int, size: int, kind: int) -> int:
    return segment << SEGMENT_SHIFT | offset << OFFSET_SHIFT | size << SIZE_SHIFT | kind


def unpack_location(location: int) -> tuple[int, int, int, int]:
    """(segment, offset, size, kind) of a packed location."""
    return (
        location >> SEGMENT_SHIFT,
        (location >> OFFSET_SHIFT) & OFFSET_MASK,
        (location >> SIZE_SHIFT) & SIZE_MASK,
        location & 3,
    )


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
    compressed group) takes on disk.

    csrc/keymap.c (``km_total_size``) copies this rule for a KeyMap's
    ``total_size``; tests/test_keymap.py proves the two equal.
    """
    if type(location) is int:
        return (location >> SIZE_SHIFT) & SIZE_MASK
    assert isinstance(location, tuple)
    return location[5]


def location_segment(location: Location) -> int:
    """The segment number a location points into."""
    if type(location) is int:
        return location >> SEGMENT_SHIFT
    assert isinstance(location, tuple)
    return location[0]


class SummedIndex(Protocol):
    """An index that sums its locations' sizes itself (the C path's KeyMap)."""

    def total_size(self) -> int: ...


def total_size(index: dict[str, Location] | SummedIndex) -> int:
    """Total bytes of every location in ``index`` (a dict, or a KeyMap: in C)."""
    if isinstance(index, dict):
        return sum(map(location_size, index.values()))
    return index.total_size()
