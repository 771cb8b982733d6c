"""The read path: values out of the segments, each proved to be its key's.

Owns: ``get`` (the hot path: no lock, one read from a mapping, one CRC, one
prefix comparison that proves the record is this key's), the settled read
under the write lock that arbitrates any doubt (a compaction switched
segments under an unlocked read, a mapping retired, damage to report with
its place), bulk loads of a namespace, key listings, the checkpoint, the
sizes ``stats()`` reports (``StorageStats``), and decompressing a group.
On the C path (``_native.EXT``) the common case of ``get`` runs in C
(csrc/fast.c: ``ReaderBase.get``, a copy of the marked branch of
``_get_python``, which stays the reference and runs every other case).
Must never: write, take the lock on the hot path, or return bytes whose CRC
and key were not checked.
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, TypedDict

from logstate import _format as fmt
from logstate._append import Appender
from logstate._clock import Clock
from logstate._crc import crc_bytes
from logstate._errors import CorruptionError
from logstate._filenames import segment_file_name
from logstate._format import FRAME_HEADER_SIZE, NAME_LEN, REC_SET, RECORD_OVERHEAD
from logstate._fs import FileSystem
from logstate._keydir import Index, Keydir, key_range
from logstate._lifecycle import Lifecycle
from logstate._location import (
    KIND_RECORD,
    OFFSET_MASK,
    OFFSET_SHIFT,
    SEGMENT_SHIFT,
    SIZE_MASK,
    SIZE_SHIFT,
    CompressedLocation,
    Location,
    location_segment,
    unpack_location,
)
from logstate._native import EXT
from logstate._segments import SegmentSet
from logstate._switch import PendingSwitch

__all__ = ["Reader", "StorageSizes", "StorageStats", "decompress_group"]

# the hot paths write the location shifts as literals (74, 34, 2)
assert (SEGMENT_SHIFT, OFFSET_SHIFT, SIZE_SHIFT) == (74, 34, 2)
_pack_name_len = NAME_LEN.pack
_set_record_value = fmt.set_record_value
_set_group_op_value = fmt.set_group_op_value
_crc_bytes = crc_bytes
_unpack_frame_header = fmt.FRAME_HEADER.unpack_from


class StorageSizes(TypedDict):
    """Sizes in bytes and counts of a whole directory (``Reader.sizes``)."""

    segments: int
    total_bytes: int
    live_bytes: int
    dead_bytes: int
    keys: int
    expiring_keys: int
    sub_storages: int
    last_seq: int  # the newest record's sequence number


class StorageStats(StorageSizes, total=False):
    """What ``stats()`` returns: :class:`StorageSizes` (an ``int`` each) and, with a
    changelog, ``replication``: the replication's own figures (``Replication.stats``)."""

    replication: dict[str, object]


def decompress_group(path: str, record_offset: int, record: bytes) -> bytes | memoryview:
    """The decompressed op list of the compressed group ``record`` (CRC and frame checked).

    Raises:
        CorruptionError: naming ``path`` and the offset in it.
    """
    try:
        fmt.check_record(record)
        _c, raw, _ops = fmt.decode_group(memoryview(record)[FRAME_HEADER_SIZE:])
    except CorruptionError as exc:
        raise CorruptionError(path, record_offset + exc.offset, exc.reason) from None
    return raw


# The C path: ReaderBase holds the fields its ``get`` reads (``_life``,
# ``_appender``, ``_namespaces``, ``_by_number``) and is that ``get``.
# FAST_PATHS False: Readers made from now on take the Python path only.
if TYPE_CHECKING:
    _ReaderBase = object
else:
    _ReaderBase = object if EXT is None else EXT.ReaderBase
FAST_PATHS = EXT is not None


class Reader(_ReaderBase):
    """Reads the values of one engine."""

    def __init__(
        self,
        fs: FileSystem,
        lock: threading.Lock,
        life: Lifecycle,
        keydir: Keydir,
        segments: SegmentSet,
        appender: Appender,
        switch: PendingSwitch,
        clock: Clock,
    ) -> None:
        self.now = clock.now  # the storage's clock (``Clock.now``): expiry is read with it
        self._fs = fs
        self._lock = lock
        self._life = life
        self._keydir = keydir
        self._namespaces = keydir.namespaces  # (never replaced after open)
        self._segments = segments
        self._by_number = segments.segments  # (updated in place, never replaced)
        self._appender = appender
        self._switch = switch
        self.path = segments.path
        self._fast = FAST_PATHS

    def _get_python(self, ns: str, ns_bytes: bytes, key: str) -> bytes | memoryview | None:
        """The encoded value of ``key`` in ``ns`` (CRC-verified), or None.

        The hot path: one positioned read, one CRC, one prefix comparison
        that proves the record is this key's; anything unusual (a value in a
        compressed group, a mismatch to report) takes :meth:`_read_value`.
        On the C path, ``ReaderBase.get`` is a copy of its common case (a
        record in a mapping) and calls this for the rest.
        """
        if self._life.closed:
            raise self._life.closed_error()
        if self._appender.in_flight is not None:
            return self._read_settled(ns, key)
        index = self._namespaces.get(ns)
        if index is None:
            raise self._keydir.deleted_error(ns)
        loc = index.get(key)
        if loc is None:
            return None
        if type(loc) is int:
            segment = self._by_number.get(loc >> 74)
            if segment is not None:
                offset = (loc >> 34) & OFFSET_MASK
                end = offset + ((loc >> 2) & SIZE_MASK)
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

    if EXT is None:
        get = _get_python  # (on the C path: ReaderBase.get)

    def _read_settled(self, ns: str, key: str) -> bytes | memoryview | None:
        """Read ``key`` under the write lock: the slow path, and the arbiter.

        Readers take no lock, so a compaction may switch the index and the
        segment files between a reader's look-up and its read (the output
        reuses the last input's number). Under the lock the index and the
        segments agree: a failure here is real damage, raised with its place.
        """
        if self._life.closed:
            raise self._life.closed_error()
        with self._lock:
            self._life.check_open()
            self._appender.interrupted()  # a write or switch an exception cut short: finish it
            index = self._namespaces.get(ns)
            if index is None:
                raise self._keydir.deleted_error(ns)
            loc = index.get(key)
            if loc is None:
                return None
            segment = self._segments.segments.get(location_segment(loc))
            if segment is not None and segment.map is None and segment is not self._segments.active:
                self._segments.map_again(
                    segment
                )  # unmapped (beyond the cap): map it for the next reads
            return self.read_value(loc, ns, key)

    def read_value(self, loc: Location, ns: str, key: str) -> bytes | memoryview:
        """Read and fully check a value (the general path; errors say where and why)."""
        if type(loc) is int:
            size = (loc >> 2) & SIZE_MASK
            offset = (loc >> 34) & OFFSET_MASK
            segment = self._segments.segment_of(loc >> 74, key)
            data = self._segments.read(segment, size, offset)
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
        """(segment path, record offset) of ``key``'s value, for error messages
        (the directory and 0 for a key that is absent)."""
        loc = self._namespace_for_read(ns).get(key)
        if loc is None:
            return self.path, 0
        if type(loc) is int:
            number, offset, _size, _kind = unpack_location(loc)
        else:
            assert isinstance(loc, tuple)
            number, offset = loc[0], loc[1]
        return self._segments.file(segment_file_name(number)), offset

    def _decompress_group(
        self, loc: CompressedLocation, record: bytes | None = None
    ) -> bytes | memoryview:
        """The decompressed op list of the compressed group at ``loc`` (checked).

        ``record``: the group record's bytes when the caller read them already.
        """
        number, record_offset, record_size = loc[:3]
        segment = self._segments.segment_of(number, "")
        if record is None:
            record = self._segments.read(segment, record_size, record_offset)
        return decompress_group(segment.path, record_offset, record)

    def _value_in_group(
        self, raw: bytes | memoryview, loc: CompressedLocation, ns: str, key: str
    ) -> bytes | memoryview:
        """The value of ``key`` in a decompressed op list (its op CRC checked)."""
        number, record_offset, _record_size, op_offset, op_size = loc[:5]
        data = raw[op_offset : op_offset + op_size]
        path = self._segments.segments[number].path
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
        index = self._namespace_for_read(ns)
        if self._keydir.expiring and self._keydir.is_expired(ns, key, self.now()):
            return False
        appender = self._appender
        before = appender._write_seq
        present = key in index
        if before & 1 or appender._write_seq != before:
            # a C set stored a record before its write meanwhile (whose failed
            # write takes it out again): ask again once it is settled
            with self._lock:
                return key in index
        return present

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
        keydir = self._keydir
        if locked:
            items = list(index.items())
            expired = set(keydir.expired_keys(ns, self.now())) if keydir.expiring else set()
        else:
            with self._lock:  # (writers change the index and its expiry table under it)
                items = list(index.items())
                expired = set(keydir.expired_keys(ns, self.now())) if keydir.expiring else set()
        plain = sorted((loc, key) for key, loc in items if type(loc) is int)
        ns_bytes = fmt.encode_name(ns)
        result: dict[str, bytes | memoryview] = {}
        data = b""
        loaded = -1
        for loc, key in plain:
            segment = loc >> 74
            if segment != loaded:
                data = self._segments.read_whole(self._segments.segments[segment])
                loaded = segment
            offset = (loc >> 34) & OFFSET_MASK
            size = (loc >> 2) & SIZE_MASK
            chunk = data[offset : offset + size]
            value = None
            if len(chunk) == size:
                key_bytes = key.encode("utf-8")
                prefix = ns_bytes + _pack_name_len(len(key_bytes)) + key_bytes
                check = _set_record_value if loc & 3 == KIND_RECORD else _set_group_op_value
                value = check(chunk, prefix)
            result[key] = value if value is not None else self.read_value(loc, ns, key)
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
        if expired:
            return {key: result[key] for key, _loc in items if key not in expired}
        return {key: result[key] for key, _loc in items}

    def keys(self, ns: str) -> list[str]:
        """The keys of ``ns`` (index order), expired ones left out."""
        index = self._namespace_for_read(ns)
        with self._lock:
            keys = list(index)
            if self._keydir.expiring.get(ns):
                expired = set(self._keydir.expired_keys(ns, self.now()))
                return [key for key in keys if key not in expired]
            return keys

    def count(self, ns: str) -> int:
        """How many keys ``ns`` has, expired ones left out."""
        index = self._namespace_for_read(ns)
        if self._keydir.expiring.get(ns):
            with self._lock:
                return len(index) - len(self._keydir.expired_keys(ns, self.now()))
        appender = self._appender
        before = appender._write_seq
        count = len(index)
        if before & 1 or appender._write_seq != before:  # (as in contains)
            with self._lock:
                return len(index)
        return count

    def ordered_keys(
        self, ns: str, start: str | None, stop: str | None, prefix: str | None, reverse: bool
    ) -> list[str]:
        """The keys of ``ns`` in order (str order: the order of their UTF-8
        bytes) that are ``>= start``, ``< stop`` and begin with ``prefix``;
        a new list. Kept cheap by the keydir's sorted view of ``ns``: after a
        few changes, a few bisections (see ``Keydir.sorted_keys``)."""
        self._namespace_for_read(ns)
        with self._lock:  # the writers change the index (and note changes) under it
            keys = self._keydir.sorted_keys(ns)
            low, high = key_range(keys, start, stop, prefix)
            found = keys[low:high][::-1] if reverse else keys[low:high]
            if self._keydir.expiring.get(ns):
                expired = set(self._keydir.expired_keys(ns, self.now()))
                return [key for key in found if key not in expired]
            return found

    def count_range(self, ns: str, start: str | None, stop: str | None, prefix: str | None) -> int:
        """How many keys :meth:`ordered_keys` would list."""
        self._namespace_for_read(ns)
        with self._lock:
            keys = self._keydir.sorted_keys(ns)
            low, high = key_range(keys, start, stop, prefix)
            if low < high and self._keydir.expiring.get(ns):
                # an expired key (in the index) between the slice's ends is in it
                first, last = keys[low], keys[high - 1]
                expired = self._keydir.expired_keys(ns, self.now())
                return high - low - sum(1 for key in expired if first <= key <= last)
            return high - low

    def sizes(self) -> StorageStats:
        """Sizes in bytes: total on disk, live (pointed to by the index), dead; counts."""
        with self._lock:
            keydir = self._keydir
            total = self._segments.total_size()
            # expired keys are dead: still indexed until compaction drops them
            now_s = self.now() if keydir.expiring else 0.0
            expired = sum(len(keydir.expired_keys(ns, now_s)) for ns in keydir.expiring)
            live = keydir.live_bytes - (keydir.expired_bytes(now_s) if expired else 0)
            return {
                "segments": len(self._segments.segments),
                "total_bytes": total,
                "live_bytes": live,
                "dead_bytes": total - live,
                "keys": keydir.key_count() - expired,
                "expiring_keys": sum(map(len, keydir.expiring.values())) - expired,
                "sub_storages": len(keydir.namespaces) - 1,
                "last_seq": self._appender.seq,
            }

    def _namespace_for_read(self, ns: str) -> Index:
        if self._life.closed:
            raise self._life.closed_error()
        if self._appender.in_flight is not None or self._switch.pending is not None:
            with self._lock:
                self._appender.interrupted()
        return self._keydir.require(ns)

    def child_namespaces(self, ns: str) -> list[str]:
        """Names (not paths) of the sub-storages directly below ``ns``."""
        if self._life.closed:
            raise self._life.closed_error()
        with self._lock:
            self._appender.interrupted()  # a create or drop an exception cut short: finish it
            return self._keydir.children(ns)

    def checkpoint(self) -> bytes | memoryview | None:
        """The encoded value of the last checkpoint written, or None."""
        if self._life.closed:
            raise self._life.closed_error()
        with self._lock:  # rare: read it where the index and the files agree
            if self._life.closed:
                raise self._life.closed_error()
            self._appender.interrupted()  # a write or switch an exception cut short: finish it
            loc = self._keydir.checkpoint
            if loc is None:
                return None
            return self.read_value(loc, "", "")

    # ================================================================== lifecycle
