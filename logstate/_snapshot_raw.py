"""The body of a version 4 index snapshot: each KeyMap as its raw arrays.

Owns: the byte layout of a version 4 snapshot's body (docs/format.md)::

    body     = meta_size:u32 meta keymap*
    meta     = JSON (UTF-8) {"namespaces": [[name, count, arena_size,
               side_count], ...], plus the other fields of the snapshot}
    keymap   = arena(arena_size bytes) side(side_count x RAW_SIDE_ENTRY)

one ``keymap`` per listed namespace, in the listed order; ``arena`` is what
``KeyMap.raw`` gives (records in insertion order, little-endian: see
csrc/keymap.c), ``side`` its compressed-group locations, six u64 each.
Must never: do I/O, trust the bytes (``keymap_load`` checks every record and
location against the segment marks; ``_snapshot`` checks the rest), or be
reached without the C path (``EXT``): the pure path does not read version 4.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from logstate._errors import CorruptionError
from logstate._native import EXT

if TYPE_CHECKING:
    from logstate._cnative import KeyMap

__all__ = ["RAW_AVAILABLE", "RAW_META_SIZE", "RAW_SIDE_ENTRY", "decode_raw_body", "encode_raw_body"]

RAW_AVAILABLE: Final = hasattr(EXT, "keymap_load")
"""True when the C path is in use and has KeyMaps: version 4 is read and written."""

RAW_META_SIZE: Final = struct.Struct("<I")
RAW_SIDE_ENTRY: Final = struct.Struct("<6Q")  # a compressed-group location's six fields
assert RAW_META_SIZE.size == 4 and RAW_SIDE_ENTRY.size == 48
_HEADER_SIZE: Final = 28  # (_snapshot.SNAPSHOT_HEADER: offsets in errors count from the file)


def encode_raw_body(namespaces: Mapping[str, KeyMap], meta: dict[str, Any]) -> bytes | None:
    """The body for ``namespaces`` (every one a KeyMap) and the other ``meta``
    fields (JSON's types), or None when a location is one the raw form
    cannot hold (not an int of up to 128 bits or six ints below 2**64):
    then the caller writes a marshal snapshot."""
    listed: list[list[Any]] = []
    parts: list[bytes] = []
    for ns, index in namespaces.items():
        count, arena, sides = index.raw()
        try:
            side = b"".join(RAW_SIDE_ENTRY.pack(*loc) for loc in sides)  # type: ignore[misc]
        except (struct.error, TypeError):
            return None
        listed.append([ns, count, len(arena), len(sides)])
        parts += (arena, side)
    text = json.dumps({"namespaces": listed, **meta}, separators=(",", ":")).encode()
    return b"".join((RAW_META_SIZE.pack(len(text)), text, *parts))


def decode_raw_body(
    body: bytes | memoryview, limits: tuple[int, int, int, int, int, int]
) -> tuple[dict[str, KeyMap], dict[str, int], dict[str, Any]]:
    """(namespaces, each one's total location size, the meta's other fields).

    Every KeyMap is loaded by ``keymap_load`` (the records, their keys'
    UTF-8 and every location against the marks in ``meta["segments"]`` and
    ``limits``, see ``_snapshot._RAW_LIMITS``).

    Raises:
        CorruptionError: anything wrong (the caller then scans).
    """
    assert EXT is not None and RAW_AVAILABLE  # (version 4 is read only on the C path)
    try:
        (meta_size,) = RAW_META_SIZE.unpack_from(body, 0)
        end = RAW_META_SIZE.size + meta_size
        meta = json.loads(bytes(body[RAW_META_SIZE.size : end]))
        listed = meta.pop("namespaces")
        pairs = [(mark[0], mark[2]) for mark in meta["segments"]]
        if len(body) < end or not all(
            type(entry) is list and len(entry) == 4 and type(entry[0]) is str for entry in listed
        ):
            raise ValueError("not [name, count, arena_size, side_count] of each namespace")
    except Exception as exc:  # (JSON logstate did not write: any error means "scan")
        raise CorruptionError(
            "", _HEADER_SIZE, f"snapshot body: {type(exc).__name__}: {exc}"
        ) from None
    pos = end
    namespaces: dict[str, KeyMap] = {}
    sizes: dict[str, int] = {}
    for name, count, arena_size, side_count in listed:
        try:
            if name in namespaces or not all(
                type(n) is int for n in (count, arena_size, side_count)
            ):
                raise ValueError("listed twice, or not by its sizes")
            namespaces[name], sizes[name] = EXT.keymap_load(
                body, pos, count, arena_size, side_count, pairs, limits
            )
        except (ValueError, TypeError, OverflowError) as exc:
            raise CorruptionError("", _HEADER_SIZE, f"snapshot namespace {name!r}: {exc}") from None
        pos += arena_size + RAW_SIDE_ENTRY.size * side_count
    if pos != len(body):
        raise CorruptionError("", _HEADER_SIZE, "snapshot body has trailing bytes")
    return namespaces, sizes, meta
