"""Walking a segment's bytes: the scanners that report damage, and the replay fast path.

Owns: the scan of a segment's records (:func:`scan_records` over bytes in
memory, :class:`WindowedScan` over bytes read window by window), what it
yields (``Frame``) and reports (``Damage``), resynchronisation after damage,
and :func:`replay_frame`, recovery's decoder of a scanned record.
Must never: do I/O itself (a ``WindowedScan`` reads only through the
function it is given), read clocks, log, or decide what to do about damage
(the engine's recovery policy does that); nor define any of the layout
(that is ``_format``'s) or accept a record that ``_format``'s decoders refuse.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple

from logstate._crc import crc32c, crc_bytes
from logstate._errors import CorruptionError
from logstate._format import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    GROUP_FLAG_ZSTD,
    GROUP_HEADER,
    GROUP_HEADER_SIZE,
    GROUP_OP_SIZE,
    MAX_RECORD_SIZE,
    MAX_RECORD_TYPE,
    MIN_PAYLOAD_SIZE,
    OP_TYPE_LEN,
    OP_TYPES,
    REC_CHECKPOINT,
    REC_CLEAR,
    REC_COMPACTED,
    REC_CREATE_NS,
    REC_DELETE,
    REC_DROP_NS,
    REC_GROUP,
    REC_SET,
    RECORD_OVERHEAD,
    RECORD_TYPES,
    U32_STRUCT,
    decode_group,
    decode_op,
)
from logstate._values import TAG_EXPIRES, split_expiring

# a record's first fields (crc, length, type, seq), read by the scanners in one unpack
_CRC_LENGTH_TYPE_SEQ: Final = struct.Struct("<IIBQ")
assert _CRC_LENGTH_TYPE_SEQ.size == RECORD_OVERHEAD == 17
# Bound once: a method of a name imported from another module costs a bound
# method object per call (the compiler emits no LOAD_METHOD for imported names).
_unpack_u32 = U32_STRUCT.unpack_from
_unpack_frame_header = FRAME_HEADER.unpack_from
_unpack_group_header = GROUP_HEADER.unpack_from


# =========================================================================== scanning
class Frame(NamedTuple):
    """One record found by the scanner (CRC already verified)."""

    offset: int  # of the frame in the scanned buffer
    size: int  # whole frame, header included
    record_type: int
    seq: int


class Damage(NamedTuple):
    """A damaged byte range reported by the scanner."""

    offset: int
    size: int
    reason: str


def _frame_error(data: bytes | memoryview, offset: int, end: int) -> str | int:
    """Validate the frame at ``offset``: its size, or why it is not a record."""
    if offset + FRAME_HEADER_SIZE > end:
        return f"truncated record header ({end - offset} bytes before end of data)"
    crc, length, record_type = _unpack_frame_header(data, offset)
    if length == 0 and record_type == 0:
        return "zero-filled space"
    if record_type not in RECORD_TYPES:
        return f"invalid record type {record_type}"
    if length < MIN_PAYLOAD_SIZE or length > MAX_RECORD_SIZE:
        return f"invalid record length {length}"
    frame_end = offset + FRAME_HEADER_SIZE + length
    if frame_end > end:
        return f"record of {length} bytes extends past the end of data"
    if crc != crc32c(data[offset + 4 : frame_end]):
        return "record checksum mismatch"
    size: int = frame_end - offset
    return size


def _resync(data: bytes | memoryview, offset: int, end: int) -> int:
    """First offset after ``offset`` where a valid record starts, or ``end``."""
    candidate = offset + 1
    last = end - RECORD_OVERHEAD
    while candidate <= last:
        # cheap filters before the CRC: a valid type byte and a plausible length
        record_type = data[candidate + 8]
        if 0 < record_type <= MAX_RECORD_TYPE:
            size = _frame_error(data, candidate, end)
            if isinstance(size, int):
                return candidate
        candidate += 1
    return end


def ignore_damage(_damage: Damage) -> None:
    """A ``report`` for a scan whose caller needs no damage report."""


def scan_records(
    data: bytes | memoryview, start: int, report: Callable[[Damage], None]
) -> Iterator[Frame]:
    """Walk the records of a segment's bytes from ``start`` to the end.

    Yields every record whose frame and CRC are valid, in order. Damaged
    ranges are passed to ``report`` (offset, size, reason) and skipped: after a
    bad frame the scanner resynchronises on the next offset where a valid
    record starts, so the caller can tell a torn tail (damage reaching the end
    of the data) from damage followed by valid records.

    Limits: a valid-looking record inside a damaged range (e.g. a stored value
    that itself contains logstate record bytes) is taken as a record by
    resynchronisation; a checksum cannot tell it apart.
    """
    end = len(data)
    offset = start
    unpack = _CRC_LENGTH_TYPE_SEQ.unpack_from
    crc_of: Callable[[Any], int] = crc_bytes if isinstance(data, bytes) else crc32c
    while offset < end:
        # fast path: a whole, valid record (the checks _frame_error makes)
        if offset + RECORD_OVERHEAD <= end:
            crc, length, record_type, seq = unpack(data, offset)
            frame_end = offset + FRAME_HEADER_SIZE + length
            if (
                0 < record_type <= MAX_RECORD_TYPE
                and MIN_PAYLOAD_SIZE <= length <= MAX_RECORD_SIZE
                and frame_end <= end
                and crc == crc_of(data[offset + 4 : frame_end])
            ):
                yield Frame(offset, frame_end - offset, record_type, seq)
                offset = frame_end
                continue
        reason = _frame_error(data, offset, end)
        assert isinstance(reason, str), "fast path and _frame_error disagree"
        next_offset = _resync(data, offset, end)
        report(Damage(offset, next_offset - offset, reason))
        offset = next_offset


SCAN_WINDOW: Final = 16 * 1024 * 1024  # bytes a windowed scan reads at a time
_TYPE_BYTES: Final = tuple(bytes([t]) for t in range(1, MAX_RECORD_TYPE + 1))


class WindowedScan:
    """:func:`scan_records` over bytes read window by window (a segment file).

    Memory stays bounded by the window and by the largest valid record, not
    by the data's size: the bytes ``start..end`` are read through ``read``
    (``read(offset, size)`` returns ``size`` bytes, fewer only at the end of
    the data) in windows of ``window`` bytes. A record larger than a window is
    read whole once its checksum has been verified in windows. Frames, damage
    reports (offsets in the data, not in a window), resynchronisation and so
    the torn-tail decision are exactly those of :func:`scan_records` over
    the same bytes (tests/test_recovery_limits.py checks that).

    ``end`` drops to where the data stopped when ``read`` returns fewer bytes
    than asked (the file got shorter while it was read). ``skip(offset)``,
    when given, returns the first offset from ``offset`` on that may hold a
    non-zero byte (the end of a file's hole): resynchronisation jumps over
    zeros there without reading them (no record type byte is zero).
    """

    def __init__(
        self,
        read: Callable[[int, int], bytes],
        start: int,
        end: int,
        report: Callable[[Damage], None],
        window: int = SCAN_WINDOW,
        skip: Callable[[int], int] | None = None,
    ) -> None:
        if window < RECORD_OVERHEAD:
            raise ValueError(f"window must be at least {RECORD_OVERHEAD} bytes, got {window}")
        self._read = read
        self.start = start
        self.end = end
        self._report = report
        self._window = window
        self._buf = b""
        self._buf_start = start
        self._skip = skip
        # A replay's fast path (the C scanner, _replay.SegmentReplay.scan), called
        # as (window, index, window's offset) before each record of the fast path:
        # applies the records it handles, returns the index of the first it does not.
        self.fast: Callable[[bytes, int, int], int] | None = None
        # resync: where each type byte next occurs in the window (see _next_type_byte)
        self._found_in: tuple[bytes, int] | None = None
        self._found: list[int] = []

    def _ensure(self, offset: int, size: int) -> int:
        """Make the window hold ``offset..offset+size`` (clipped at the end); its index there."""
        rel = offset - self._buf_start
        if rel >= 0 and rel + size <= len(self._buf):
            return rel
        want = min(max(self._window, size), self.end - offset)
        data = self._read(offset, want)
        if type(data) is not bytes:
            data = bytes(data)
        self._buf = data
        self._buf_start = offset
        if len(data) < want:
            self.end = offset + len(data)
        return 0

    def _crc(self, start: int, stop: int) -> int:
        """CRC-32C of the data's bytes ``start..stop``, read in windows (a large record)."""
        crc = 0
        position = start
        while position < stop:
            chunk = self._read(position, min(self._window, stop - position))
            if not chunk:
                return -1  # the file got shorter: no record here
            crc = crc32c(chunk, crc)
            position += len(chunk)
        return crc

    def _frame_error(self, offset: int) -> str | int:
        """:func:`_frame_error` at data offset ``offset``."""
        end = self.end
        if offset + FRAME_HEADER_SIZE > end:
            return f"truncated record header ({end - offset} bytes before end of data)"
        rel = self._ensure(offset, min(RECORD_OVERHEAD, end - offset))
        if rel + FRAME_HEADER_SIZE > len(self._buf):
            end = self.end
            return f"truncated record header ({end - offset} bytes before end of data)"
        crc, length, record_type = _unpack_frame_header(self._buf, rel)
        if length == 0 and record_type == 0:
            return "zero-filled space"
        if record_type not in RECORD_TYPES:
            return f"invalid record type {record_type}"
        if length < MIN_PAYLOAD_SIZE or length > MAX_RECORD_SIZE:
            return f"invalid record length {length}"
        frame_end = offset + FRAME_HEADER_SIZE + length
        if frame_end > self.end:
            return f"record of {length} bytes extends past the end of data"
        size: int = frame_end - offset
        if size <= self._window:
            rel = self._ensure(offset, size)
            found = crc32c(self._buf[rel + 4 : rel + size])
        else:
            found = self._crc(offset + 4, frame_end)
        if crc != found:
            return "record checksum mismatch"
        return size

    def _next_type_byte(self, lo: int, stop: int) -> int:
        """Index of the first valid record type byte in ``window[lo:stop]``, or -1.

        One ``find`` per type byte, remembered while the window and ``stop``
        stay the same and ``lo`` has not passed it: linear in the window.
        """
        buf = self._buf
        if self._found_in is None or self._found_in[0] is not buf or self._found_in[1] != stop:
            self._found_in = (buf, stop)
            self._found = [-2] * len(_TYPE_BYTES)  # -2: not looked for yet
        found = self._found
        best = -1
        for i, type_byte in enumerate(_TYPE_BYTES):
            at = found[i]
            if at != -1 and at < lo:
                at = found[i] = buf.find(type_byte, lo, stop)
            if at != -1 and (best == -1 or at < best):
                best = at
        return best

    def _resync(self, offset: int) -> int:
        """:func:`_resync`: the first offset after ``offset`` where a valid record starts."""
        candidate = offset + 1
        while candidate <= self.end - RECORD_OVERHEAD:
            last = self.end - RECORD_OVERHEAD
            if self._skip is not None and (
                candidate + RECORD_OVERHEAD > self._buf_start + len(self._buf)
                or candidate < self._buf_start
            ):
                # a new window is needed: first jump over a hole (zeros)
                data_at = self._skip(candidate + 8)
                if data_at - 8 > candidate:
                    candidate = data_at - 8
                    continue
            rel = self._ensure(candidate, RECORD_OVERHEAD)
            buf = self._buf
            # only offsets whose type byte is valid can start a record
            stop = min(len(buf), last - self._buf_start + 9)
            found = self._next_type_byte(rel + 8, stop)
            if found == -1:
                candidate = self._buf_start + stop - 8
                continue
            candidate = self._buf_start + found - 8
            if isinstance(self._frame_error(candidate), int):
                return candidate
            candidate += 1
        return self.end

    def frames(self) -> Iterator[tuple[bytes, int, Frame]]:
        """Every valid record, as (window, data offset of the window, frame in the window).

        ``frame.offset`` is an index into the window (its data offset is
        ``window_start + frame.offset``); damage goes to ``report``.
        """
        unpack = _CRC_LENGTH_TYPE_SEQ.unpack_from
        fast = self.fast
        offset = self.start
        while offset < self.end:
            buf = self._buf
            rel = offset - self._buf_start
            n = len(buf)
            if rel >= 0:
                # fast path: whole, valid records inside the window (a copy of
                # scan_records' fast path, kept inline for speed, and copied in
                # csrc/scan.c's replay_records; the two are
                # proved equal by tests/test_recovery_limits.py::
                # test_windowed_scan_reports_exactly_what_the_whole_buffer_scan_reports)
                while rel + RECORD_OVERHEAD <= n:
                    if fast is not None:
                        rel = fast(buf, rel, self._buf_start)
                        if rel + RECORD_OVERHEAD > n:
                            break
                    crc, length, record_type, seq = unpack(buf, rel)
                    frame_end = rel + FRAME_HEADER_SIZE + length
                    if (
                        0 < record_type <= MAX_RECORD_TYPE
                        and MIN_PAYLOAD_SIZE <= length <= MAX_RECORD_SIZE
                        and frame_end <= n
                        and crc == crc_bytes(buf[rel + 4 : frame_end])
                    ):
                        yield buf, self._buf_start, Frame(rel, frame_end - rel, record_type, seq)
                        rel = frame_end
                        continue
                    break
                offset = self._buf_start + rel
                if offset >= self.end:
                    break
            found = self._frame_error(offset)
            if isinstance(found, int):
                rel = self._ensure(offset, found)
                _crc, _length, record_type, seq = unpack(self._buf, rel)
                yield self._buf, self._buf_start, Frame(rel, found, record_type, seq)
                offset += found
                continue
            next_offset = self._resync(offset)
            self._report(Damage(offset, next_offset - offset, found))
            offset = next_offset


# =========================================================================== replay fast path
# Recovery decodes every record of every segment, so it has its own loop with
# no per-field function calls. It must accept and reject exactly what
# decode_op / decode_group do (tests/test_format.py and fuzz/ check them against
# each other), so the per-op CRCs inside a group are checked here too: the
# record's CRC covering them does not make a wrong op CRC acceptable (reads
# check it, and would refuse an operation that recovery had applied).
# Copied in csrc/scan.c's replay_records (with Keydir.apply_frame's locations and
# live bytes) for plain sets/deletes and uncompressed groups of them; proved equal
# by tests/test_native_scan.py and fuzz/test_native_scan_fuzz.py.
FRAME_PLAIN: Final = 0  # the op is the whole record
FRAME_GROUP: Final = 1  # op offsets are positions in the scanned data
FRAME_COMPRESSED_GROUP: Final = 2  # op offsets are positions in the decompressed op list

# op_type, ns, key, op_offset, op_size, expiry: (deadline_s, written_s) of a set
# whose value is a TAG_EXPIRES one (None otherwise, and for a malformed one:
# reading that value reports it, with its place)
Expiry = tuple[float, float]
ReplayOp = tuple[int, str, str, int, int, "Expiry | None"]
assert TAG_EXPIRES == 10  # the replay loop writes it as a literal
_KEYED: Final = frozenset((REC_SET, REC_DELETE))
_NS_ONLY: Final = frozenset((REC_CLEAR, REC_CREATE_NS, REC_DROP_NS))


def value_expiry(value: bytes | memoryview) -> Expiry | None:
    """(deadline_s, written_s) of an encoded value with an expiry time, else None.

    None also for a TAG_EXPIRES value that does not parse: the index then
    treats it as a value without expiry, and reading it raises the
    CorruptionError that names its place.
    """
    if not value or value[0] != TAG_EXPIRES:
        return None
    try:
        deadline_s, written_s, _inner = split_expiring(value)
    except CorruptionError:
        return None
    return deadline_s, written_s


def set_body_value(body: bytes) -> memoryview:
    """The encoded value of a set op's body (``ns key value``, as ``encode_op`` wrote it)."""
    p = 2 + (body[0] | body[1] << 8)
    return memoryview(body)[p + 2 + (body[p] | body[p + 1] << 8) :]


def _replay_op(
    op_type: int, buf: bytes, start: int, end: int, base: int
) -> tuple[str, str, Expiry | None]:
    """(ns, key, expiry) of the op body ``buf[start:end]``, checked like :func:`decode_op`."""
    if op_type in _KEYED:
        if start + 2 > end:
            raise CorruptionError("", base + start, "namespace length truncated")
        p = start + 2 + (buf[start] | buf[start + 1] << 8)
        if p + 2 > end:
            raise CorruptionError("", base + start, "namespace overruns its record")
        q = p + 2 + (buf[p] | buf[p + 1] << 8)
        if q > end or (op_type == REC_SET and q == end) or (op_type == REC_DELETE and q != end):
            raise CorruptionError("", base + p, "key or value does not fit its record")
        try:
            ns = buf[start + 2 : p].decode("utf-8") if p > start + 2 else ""
            key = buf[p + 2 : q].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptionError("", base + start, "name is not valid UTF-8") from None
        if not key:
            kind = "set" if op_type == REC_SET else "delete"
            raise CorruptionError("", base + start, f"{kind} record with an empty key")
        if op_type == REC_SET and buf[q] == 10:  # TAG_EXPIRES (asserted at import)
            return ns, key, value_expiry(memoryview(buf)[q:end])
        return ns, key, None
    if op_type in _NS_ONLY or op_type in (REC_CHECKPOINT, REC_COMPACTED):
        op = decode_op(op_type, buf, start, end, base)
        return op.ns, op.key, None
    raise CorruptionError("", base + start, f"unknown operation type {op_type}")


def replay_frame(
    data: bytes, offset: int, size: int, record_type: int
) -> tuple[int, list[ReplayOp]]:
    """The operations of a scanned (CRC-verified) record, for recovery.

    Returns:
        (frame kind, ops): FRAME_PLAIN with one op located at the record
        itself, FRAME_GROUP with ops located in ``data``, or
        FRAME_COMPRESSED_GROUP with ops located in the decompressed op list.

    Raises:
        CorruptionError: a body that does not parse (offsets in ``data``).
    """
    end = offset + size
    start = offset + RECORD_OVERHEAD
    if record_type != REC_GROUP:
        ns, key, expiry = _replay_op(record_type, data, start, end, 0)
        return FRAME_PLAIN, [(record_type, ns, key, offset, size, expiry)]
    if start + GROUP_HEADER_SIZE > end:
        raise CorruptionError("", start, "group header truncated")
    flags, count = _unpack_group_header(data, start)
    pos = start + GROUP_HEADER_SIZE
    if flags == GROUP_FLAG_ZSTD:
        # large and rare: the general decoder (it also checks each op's CRC)
        payload = memoryview(data)[offset + FRAME_HEADER_SIZE : end]
        _c, raw, decoded = decode_group(payload, offset + FRAME_HEADER_SIZE)
        return FRAME_COMPRESSED_GROUP, [
            (
                g.op.op_type,
                g.op.ns,
                g.op.key,
                g.op_offset,
                g.op_size,
                value_expiry(raw[g.op.value_start : g.op.value_end])
                if g.op.op_type == REC_SET
                else None,
            )
            for g in decoded
        ]
    if flags:
        raise CorruptionError("", start, f"unknown group flags 0x{flags:02x}")
    if count * GROUP_OP_SIZE > end - pos:
        raise CorruptionError("", start, f"group claims {count} operations, too many")
    ops: list[ReplayOp] = []
    unpack = OP_TYPE_LEN.unpack_from
    for _ in range(count):
        body = pos + GROUP_OP_SIZE
        if body > end:
            raise CorruptionError("", pos, "group operation header truncated")
        op_type, op_len = unpack(data, pos + 4)
        op_end = body + op_len
        if op_end > end:
            raise CorruptionError("", pos, "group operation overruns its group")
        if _unpack_u32(data, pos)[0] != crc32c(data[pos + 4 : op_end]):
            raise CorruptionError("", pos, "group operation checksum mismatch")
        if op_type not in OP_TYPES:
            raise CorruptionError("", pos, f"operation type {op_type} inside a group")
        ns, key, expiry = _replay_op(op_type, data, body, op_end, 0)
        ops.append((op_type, ns, key, pos, op_end - pos, expiry))
        pos = op_end
    if pos != end:
        raise CorruptionError("", pos, f"{end - pos} bytes after the group's last operation")
    return FRAME_GROUP, ops
