"""The byte format of segment files: headers, framed records, operations, groups.

Owns: every constant and struct of the on-disk layout (documented once, as a
grammar with an example, in docs/format.md), the CRC-32C, encoding of records,
and the scanner that walks a segment's bytes and *reports* damage.
Must never: do I/O, read clocks, log, or decide what to do about damage (the
engine's recovery policy does that). Every function works on plain ``bytes``
or ``memoryview`` so that the fuzzers can drive it without files.

Layout summary (docs/format.md has the full grammar)::

    segment = header record*
    header  = magic:8 version:u16 reserved:u16 segment_number:u64 header_crc:u32
    record  = crc:u32 length:u32 type:u8 payload[length]      crc covers length..payload
    payload = seq:u64 body
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple

import crcmod.predefined
import zstandard

from logstate._errors import CorruptionError, UnsupportedFormatError

# --------------------------------------------------------------------------- CRC-32C
# Two implementations of the same function, chosen at import:
# - google-crc32c's C extension (Google's crc32c library), which uses the CPU's
#   CRC-32C instruction (SSE 4.2 / ARMv8) when there is one: about 130 ns for
#   a 130-byte record against crcmod's 600 ns, 43 us per MiB against 2.6 ms.
#   It takes only ``bytes`` (not memoryview or bytearray).
# - crcmod's table-driven C extension, the fallback where google-crc32c's
#   extension does not import. Its pure-Python fallback is ~50x slower
#   still, so logstate refuses to run on it.
# Both compute CRC-32C (Castagnoli); tests check them against each other.
_CRC_XOR: Final = 0xFFFFFFFF

# crcmod's own function: C extension or pure Python, always importable.
crcmod_crc32c: Final[Callable[..., int]] = crcmod.predefined.mkCrcFun("crc-32c")


def _google_crc32c() -> Any:
    """google-crc32c's C extension module, or None where it does not import.

    (Tests force the fallback by putting None in ``sys.modules`` for it.)
    """
    try:
        return importlib.import_module("google_crc32c._crc32c")
    except ImportError:
        return None


_hw = _google_crc32c()
crc_bytes: Callable[[bytes], int]
"""CRC-32C of a ``bytes`` object (the hot paths' entry: no type check)."""

if _hw is not None:
    CRC_IMPLEMENTATION = "google-crc32c"
    _extend: Callable[[int, bytes], int] = _hw.extend
    crc_bytes = _hw.value

    def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
        """CRC-32C (Castagnoli) of ``data``, continuing from ``crc`` (0 to start)."""
        if type(data) is not bytes:
            data = bytes(data)
        return _extend(crc, data)

else:
    try:
        from crcmod._crcfunext import _crc32r
    except ImportError:  # pragma: no cover
        raise ImportError(
            "logstate needs google-crc32c's or crcmod's C extension for CRC-32C; only "
            "pure-Python fallbacks are importable. Reinstall with a C compiler and the "
            "Python headers available: python -m pip install --force-reinstall "
            "google-crc32c crcmod"
        ) from None
    CRC_IMPLEMENTATION = "crcmod"
    _table: bytes = crcmod_crc32c.__defaults__[1]  # type: ignore[index]

    def crc_bytes(data: bytes) -> int:
        return _crc32r(data, _CRC_XOR, _table) ^ _CRC_XOR  # type: ignore[no-any-return]

    def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
        """CRC-32C (Castagnoli) of ``data``, continuing from ``crc`` (0 to start)."""
        return _crc32r(data, crc ^ _CRC_XOR, _table) ^ _CRC_XOR  # type: ignore[no-any-return]


assert crc32c(b"123456789") == 0xE3069283, "crc-32c check value"

# --------------------------------------------------------------------------- segment header
SEGMENT_MAGIC: Final = b"\x89LGSEG\r\n"
FORMAT_VERSION: Final = 1
SEGMENT_HEADER: Final = struct.Struct("<8sHHQI")  # magic, version, reserved, number, crc
SEGMENT_HEADER_SIZE: Final = SEGMENT_HEADER.size
assert SEGMENT_HEADER_SIZE == 24
MAX_SEGMENT_NUMBER: Final = (1 << 32) - 1

# --------------------------------------------------------------------------- record frame
FRAME_HEADER: Final = struct.Struct("<IIB")  # crc, length, type
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size
assert FRAME_HEADER_SIZE == 9
SEQ: Final = struct.Struct("<Q")
SEQ_SIZE: Final = SEQ.size
assert SEQ_SIZE == 8
# crc is over everything after itself: length, type, payload
LENGTH_TYPE_SEQ: Final = struct.Struct("<IBQ")
assert LENGTH_TYPE_SEQ.size == 13
RECORD_OVERHEAD: Final = FRAME_HEADER_SIZE + SEQ_SIZE  # bytes before the body
_CRC_LENGTH_TYPE_SEQ: Final = struct.Struct("<IIBQ")
assert _CRC_LENGTH_TYPE_SEQ.size == RECORD_OVERHEAD == 17
MIN_PAYLOAD_SIZE: Final = SEQ_SIZE  # so length 0 is never valid
MAX_RECORD_SIZE: Final = 1 << 30  # bound on `length`: what a corrupt length can make us allocate

# Record (and group operation) types. 0 is invalid: zero-filled space is never a record.
REC_SET: Final = 1  # body = ns key value
REC_DELETE: Final = 2  # body = ns key
REC_CLEAR: Final = 3  # body = ns            (keys of ns and every sub-storage below it)
REC_GROUP: Final = 4  # body = group         (many operations, one frame, one CRC)
REC_CREATE_NS: Final = 5  # body = ns
REC_DROP_NS: Final = 6  # body = ns          (clear, then forget the sub-storage itself)
REC_CHECKPOINT: Final = 7  # body = value    (caller's checkpoint, e.g. input offsets)
REC_COMPACTED: Final = 8  # body = covers_from:u64 (first record of a compaction output)
MAX_RECORD_TYPE: Final = 8
COVERS_FROM: Final = struct.Struct("<Q")  # body of REC_COMPACTED
RECORD_TYPES: Final = frozenset(range(1, MAX_RECORD_TYPE + 1))
OP_TYPES: Final = RECORD_TYPES - {REC_GROUP, REC_COMPACTED}  # what a group may hold
RECORD_TYPE_NAMES: Final = {
    REC_SET: "set",
    REC_DELETE: "delete",
    REC_CLEAR: "clear",
    REC_GROUP: "group",
    REC_CREATE_NS: "create-sub-storage",
    REC_DROP_NS: "drop-sub-storage",
    REC_CHECKPOINT: "checkpoint",
    REC_COMPACTED: "compacted",
}

# Names (namespace path, key): u16 length + UTF-8.
NAME_LEN: Final = struct.Struct("<H")
MAX_NAME_SIZE: Final = 0xFFFF
MAX_KEY_SIZE: Final = 4096  # UTF-8 bytes of a key: a policy bound, well below MAX_NAME_SIZE
NS_SEPARATOR: Final = "/"  # joins sub-storage names into a namespace path; "" is the root

# Group body: flags u8, count u32, then ops (or, if compressed, raw_size u32 + zstd frame).
GROUP_HEADER: Final = struct.Struct("<BI")
GROUP_HEADER_SIZE: Final = GROUP_HEADER.size
assert GROUP_HEADER_SIZE == 5
GROUP_FLAG_ZSTD: Final = 0x01
GROUP_RAW_SIZE: Final = struct.Struct("<I")
# One operation inside a group: its own crc (so a point read of one value needs
# only the op's bytes), type, length, body. op_crc covers type, length and body.
GROUP_OP: Final = struct.Struct("<IBI")
GROUP_OP_SIZE: Final = GROUP_OP.size
assert GROUP_OP_SIZE == 9
_OP_TYPE_LEN: Final = struct.Struct("<BI")


# =========================================================================== segment header
def encode_segment_header(segment_number: int) -> bytes:
    """The 24-byte header that starts segment ``segment_number``."""
    if not 0 <= segment_number <= MAX_SEGMENT_NUMBER:
        raise ValueError(f"segment number out of range: {segment_number}")
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 0, segment_number, 0)
    return head[:-4] + struct.pack("<I", crc32c(head[:-4]))


def decode_segment_header(data: bytes | memoryview) -> int:
    """Validate a segment header and return its segment number.

    Raises:
        CorruptionError: fewer than 24 bytes, or a header CRC mismatch (offset 0).
        UnsupportedFormatError: not a logstate segment (magic), or a format
            version this code does not know.
    """
    if len(data) < SEGMENT_HEADER_SIZE:
        raise CorruptionError("", 0, f"segment header truncated ({len(data)} of 24 bytes)")
    magic, version, _reserved, number, crc = SEGMENT_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise UnsupportedFormatError("", 0, f"not a logstate segment (magic {bytes(magic)!r})")
    if crc != crc32c(data[: SEGMENT_HEADER_SIZE - 4]):
        raise CorruptionError("", 0, "segment header checksum mismatch")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            "",
            0,
            f"segment format version {version} is not supported (this logstate reads "
            f"version {FORMAT_VERSION}); upgrade logstate to open it",
        )
    return int(number)


# =========================================================================== encoding
def encode_name(name: str) -> bytes:
    """u16 length + UTF-8 of a namespace path or key (the caller bounds its size)."""
    raw = name.encode("utf-8")
    return NAME_LEN.pack(len(raw)) + raw


def encode_set_body(ns: bytes, key: bytes, value: bytes) -> bytes:
    """Body of a set: encoded namespace, encoded key, encoded value (to the end)."""
    return ns + key + value


_pack_length_type_seq = LENGTH_TYPE_SEQ.pack
U32_STRUCT: Final = struct.Struct("<I")
_pack_u32 = U32_STRUCT.pack
_unpack_u32 = U32_STRUCT.unpack_from


def record_too_large(length: int) -> ValueError:
    """The error for a record whose ``length`` field would exceed MAX_RECORD_SIZE."""
    return ValueError(
        f"record of {length} bytes exceeds the limit of {MAX_RECORD_SIZE} (MAX_RECORD_SIZE)"
    )


def encode_record(record_type: int, seq: int, body: bytes | bytearray | memoryview) -> bytes:
    """Frame one record: crc, length, type, seq, body.

    Raises:
        ValueError: ``length`` (8 + body size) would exceed MAX_RECORD_SIZE, so
            every reader would refuse the record as damage.
    """
    length = SEQ_SIZE + len(body)
    if length > MAX_RECORD_SIZE:
        raise record_too_large(length)
    rest = _pack_length_type_seq(length, record_type, seq) + body
    return _pack_u32(crc_bytes(rest)) + rest


def set_record_value(data: bytes, prefix: bytes) -> bytes | None:
    """The encoded value of a whole set record read on its own, if it checks out.

    ``prefix`` is the expected ``ns key`` encoding. Returns None when the
    record is not exactly a valid set record of that key (the caller then
    finds out why with :func:`check_record` and :func:`decode_op`).
    """
    size = len(data)
    if (
        size > RECORD_OVERHEAD + len(prefix)
        and data[8] == REC_SET
        and _unpack_u32(data, 4)[0] + FRAME_HEADER_SIZE == size
        and data.startswith(prefix, RECORD_OVERHEAD)
        and _unpack_u32(data, 0)[0] == crc_bytes(data[4:])
    ):
        return data[RECORD_OVERHEAD + len(prefix) :]
    return None


def set_group_op_value(data: bytes, prefix: bytes) -> bytes | None:
    """Like :func:`set_record_value`, for one set operation of a group read on its own."""
    size = len(data)
    if (
        size > GROUP_OP_SIZE + len(prefix)
        and data[4] == REC_SET
        and _unpack_u32(data, 5)[0] + GROUP_OP_SIZE == size
        and data.startswith(prefix, GROUP_OP_SIZE)
        and _unpack_u32(data, 0)[0] == crc_bytes(data[4:])
    ):
        return data[GROUP_OP_SIZE + len(prefix) :]
    return None


def encode_group_ops(ops: list[tuple[int, bytes]]) -> bytes:
    """The op list of a group: for each (type, body), op_crc type length body."""
    parts: list[bytes] = []
    append = parts.append
    pack_head = _OP_TYPE_LEN.pack
    pack_crc = _pack_u32
    crc_of = crc_bytes
    allowed = OP_TYPES
    for op_type, body in ops:
        if op_type not in allowed:
            raise ValueError(f"operation type {op_type} cannot be part of a group")
        rest = pack_head(op_type, len(body)) + body
        append(pack_crc(crc_of(rest)))
        append(rest)
    return b"".join(parts)


def encode_key_ops(ns_bytes: bytes, keys: list[str], values: list[bytes | None]) -> list[bytes]:
    """Group operations on keys of one namespace, one ``bytes`` per operation.

    For each key: a set to its encoded value, or a delete where the value is
    None; each element is ``op_crc type length body`` as
    :func:`encode_group_ops` writes it. The flush path of InMemoryStorage: one
    pass, no intermediate (type, body) pairs. Keys are valid (the callers
    checked them with ``encode_key``); ``ns_bytes`` is ``encode_name(ns)``.
    """
    # type, length, namespace and the key's length in one pack
    pack_head = struct.Struct(f"<BI{len(ns_bytes)}sH").pack
    pack_crc = U32_STRUCT.pack
    crc_of = crc_bytes
    fixed = len(ns_bytes) + NAME_LEN.size
    ops: list[bytes] = []
    append = ops.append
    for key, value in zip(keys, values, strict=True):
        raw = key.encode("utf-8")
        if value is None:
            rest = pack_head(REC_DELETE, fixed + len(raw), ns_bytes, len(raw)) + raw
        else:
            rest = (
                pack_head(REC_SET, fixed + len(raw) + len(value), ns_bytes, len(raw)) + raw + value
            )
        append(pack_crc(crc_of(rest)) + rest)
    return ops


def encode_op(op_type: int, body: bytes) -> bytes:
    """One group operation: ``op_crc type length body``."""
    rest = _OP_TYPE_LEN.pack(op_type, len(body)) + body
    return U32_STRUCT.pack(crc_bytes(rest)) + rest


def encode_group_body(
    ops: list[tuple[int, bytes]], compress_min_size: int | None = None, zstd_level: int = 3
) -> bytes:
    """Body of a group record (flags, count, ops), compressed when large.

    Args:
        ops: (operation type, operation body) pairs, applied in order.
        compress_min_size: compress the op list with zstandard when it is at
            least this many bytes (None: never). Kept only if it is smaller.
        zstd_level: zstandard compression level.
    """
    return group_body(encode_group_ops(ops), len(ops), compress_min_size, zstd_level)


def group_body(
    raw: bytes, count: int, compress_min_size: int | None = None, zstd_level: int = 3
) -> bytes:
    """Like :func:`encode_group_body`, for ``count`` operations already encoded in ``raw``."""
    # raw_size is bounded by MAX_RECORD_SIZE on decoding: never compress more
    if compress_min_size is not None and compress_min_size <= len(raw) <= MAX_RECORD_SIZE:
        packed = zstandard.ZstdCompressor(level=zstd_level).compress(raw)
        if len(packed) + GROUP_RAW_SIZE.size < len(raw):
            return (
                GROUP_HEADER.pack(GROUP_FLAG_ZSTD, count) + GROUP_RAW_SIZE.pack(len(raw)) + packed
            )
    return GROUP_HEADER.pack(0, count) + raw


def group_raw_size(body: bytes) -> int:
    """The decompressed size of the op list of a compressed group's ``body``."""
    size: int = GROUP_RAW_SIZE.unpack_from(body, GROUP_HEADER_SIZE)[0]
    return size


# =========================================================================== decoding
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


class Op(NamedTuple):
    """One decoded operation (a single record's, or one inside a group)."""

    op_type: int
    ns: str
    key: str  # "" for operations without a key
    value_start: int  # offset of the encoded value in the decoded buffer (-1: none)
    value_end: int


def _read_name(
    buf: bytes | memoryview, pos: int, end: int, what: str, base: int
) -> tuple[str, int]:
    if pos + 2 > end:
        raise CorruptionError("", base + pos, f"{what} length truncated")
    (size,) = NAME_LEN.unpack_from(buf, pos)
    pos += 2
    if pos + size > end:
        raise CorruptionError("", base + pos, f"{what} of {size} bytes overruns its record")
    try:
        return bytes(buf[pos : pos + size]).decode("utf-8"), pos + size
    except UnicodeDecodeError:
        raise CorruptionError("", base + pos, f"{what} is not valid UTF-8") from None


def decode_op(op_type: int, buf: bytes | memoryview, start: int, end: int, base: int = 0) -> Op:
    """Decode the body of an operation occupying ``buf[start:end]``.

    ``base`` is added to offsets in errors (the buffer's position in its file).

    Raises:
        CorruptionError: unknown type or a body that does not parse exactly.
    """
    if op_type == REC_SET:
        ns, pos = _read_name(buf, start, end, "namespace", base)
        key, pos = _read_name(buf, pos, end, "key", base)
        if not key:
            raise CorruptionError("", base + start, "set record with an empty key")
        if pos >= end:
            raise CorruptionError("", base + pos, "set record has no value")
        return Op(op_type, ns, key, pos, end)
    if op_type == REC_DELETE:
        ns, pos = _read_name(buf, start, end, "namespace", base)
        key, pos = _read_name(buf, pos, end, "key", base)
        if not key:
            raise CorruptionError("", base + start, "delete record with an empty key")
    elif op_type in (REC_CLEAR, REC_CREATE_NS, REC_DROP_NS):
        ns, pos = _read_name(buf, start, end, "namespace", base)
        key = ""
        if op_type != REC_CLEAR and not ns:
            raise CorruptionError("", base + start, "sub-storage record names the root")
    elif op_type == REC_CHECKPOINT:
        if start >= end:
            raise CorruptionError("", base + start, "checkpoint record has no value")
        return Op(op_type, "", "", start, end)
    elif op_type == REC_COMPACTED:
        if end - start != COVERS_FROM.size:
            raise CorruptionError("", base + start, "compacted record body is not 8 bytes")
        return Op(op_type, "", "", start, end)
    else:
        raise CorruptionError("", base + start, f"unknown operation type {op_type}")
    if pos != end:
        raise CorruptionError("", base + pos, f"{end - pos} unexpected bytes after the body")
    return Op(op_type, ns, key, -1, -1)


class GroupOp(NamedTuple):
    """An operation inside a group, with where its bytes are."""

    op: Op
    op_offset: int  # offset of the op (its crc) in the op buffer
    op_size: int  # bytes of the op, its 9-byte header included


def decode_group(
    payload: bytes | memoryview, base: int = 0
) -> tuple[bool, bytes | memoryview, list[GroupOp]]:
    """Decode a group record's payload (the bytes after the frame header).

    Args:
        payload: seq + group body, as found in the record.
        base: position of ``payload`` in its file, for error offsets.

    Returns:
        (compressed, op buffer, ops): the op buffer is a view into ``payload``
        for an uncompressed group (op offsets are relative to ``payload``), or
        the decompressed bytes for a compressed one (offsets relative to them).

    Raises:
        CorruptionError: a count, size, checksum or operation that does not fit.
    """
    pos = SEQ_SIZE
    if len(payload) < pos + GROUP_HEADER_SIZE:
        raise CorruptionError("", base + pos, "group header truncated")
    flags, count = GROUP_HEADER.unpack_from(payload, pos)
    pos += GROUP_HEADER_SIZE
    if flags & ~GROUP_FLAG_ZSTD:
        raise CorruptionError("", base + SEQ_SIZE, f"unknown group flags 0x{flags:02x}")
    buf: bytes | memoryview = payload
    end = len(payload)
    compressed = bool(flags & GROUP_FLAG_ZSTD)
    if compressed:
        if pos + GROUP_RAW_SIZE.size > end:
            raise CorruptionError("", base + pos, "compressed group size truncated")
        (raw_size,) = GROUP_RAW_SIZE.unpack_from(payload, pos)
        if raw_size > MAX_RECORD_SIZE:
            raise CorruptionError("", base + pos, f"compressed group claims {raw_size} bytes")
        pos += GROUP_RAW_SIZE.size
        packed = bytes(payload[pos:])
        try:
            # decompress() allocates the content size a frame header declares,
            # ignoring max_output_size: refuse a header that disagrees with
            # raw_size before it makes us allocate (up to 2**64 bytes).
            content_size = zstandard.frame_content_size(packed)  # -1: not declared
            if content_size not in (-1, raw_size):
                raise CorruptionError(
                    "",
                    base + pos,
                    f"compressed group's zstd frame declares {content_size} "
                    f"bytes, expected {raw_size}",
                )
            raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=raw_size)
        except zstandard.ZstdError as exc:
            raise CorruptionError(
                "", base + pos, f"compressed group does not decompress: {exc}"
            ) from None
        if len(raw) != raw_size:
            raise CorruptionError(
                "", base + pos, f"compressed group gave {len(raw)} bytes, expected {raw_size}"
            )
        buf, pos, end, base = raw, 0, raw_size, base  # offsets inside raw from here on
    if count * GROUP_OP_SIZE > end - pos:
        raise CorruptionError("", base + SEQ_SIZE, f"group claims {count} operations, too many")
    ops: list[GroupOp] = []
    for _ in range(count):
        if pos + GROUP_OP_SIZE > end:
            raise CorruptionError("", base + pos, "group operation header truncated")
        crc, op_type, op_len = GROUP_OP.unpack_from(buf, pos)
        body_start = pos + GROUP_OP_SIZE
        body_end = body_start + op_len
        if body_end > end:
            raise CorruptionError("", base + pos, "group operation overruns its group")
        if crc != crc32c(buf[pos + 4 : body_end]):
            raise CorruptionError("", base + pos, "group operation checksum mismatch")
        if op_type not in OP_TYPES:
            raise CorruptionError("", base + pos, f"operation type {op_type} inside a group")
        ops.append(
            GroupOp(decode_op(op_type, buf, body_start, body_end, base), pos, body_end - pos)
        )
        pos = body_end
    if pos != end:
        raise CorruptionError("", base + pos, f"{end - pos} bytes after the group's last operation")
    return compressed, buf, ops


def check_group_op(data: bytes | memoryview) -> int:
    """Verify one group operation read on its own; return where its body starts.

    Raises:
        CorruptionError: size or checksum mismatch (offset relative to ``data``).
    """
    if len(data) < GROUP_OP_SIZE:
        raise CorruptionError("", 0, "group operation truncated")
    crc, _op_type, op_len = GROUP_OP.unpack_from(data, 0)
    if GROUP_OP_SIZE + op_len != len(data):
        raise CorruptionError("", 0, "group operation length mismatch")
    if crc != crc32c(data[4:]):
        raise CorruptionError("", 0, "group operation checksum mismatch")
    return GROUP_OP_SIZE


def check_record(data: bytes | memoryview) -> int:
    """Verify one whole record read on its own; return its record type.

    Raises:
        CorruptionError: size, type or checksum mismatch (offset relative to ``data``).
    """
    if len(data) < RECORD_OVERHEAD:
        raise CorruptionError("", 0, "record truncated")
    crc, length, record_type = FRAME_HEADER.unpack_from(data, 0)
    if FRAME_HEADER_SIZE + length != len(data):
        raise CorruptionError("", 0, "record length mismatch")
    if crc != crc32c(data[4:]):
        raise CorruptionError("", 0, "record checksum mismatch")
    return int(record_type)


# =========================================================================== scanning
def _frame_error(data: bytes | memoryview, offset: int, end: int) -> str | int:
    """Validate the frame at ``offset``: its size, or why it is not a record."""
    if offset + FRAME_HEADER_SIZE > end:
        return f"truncated record header ({end - offset} bytes before end of data)"
    crc, length, record_type = FRAME_HEADER.unpack_from(data, offset)
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
        crc, length, record_type = FRAME_HEADER.unpack_from(self._buf, rel)
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
        offset = self.start
        while offset < self.end:
            buf = self._buf
            rel = offset - self._buf_start
            n = len(buf)
            if rel >= 0:
                # fast path: whole, valid records inside the window (a copy of
                # scan_records' fast path, kept inline for speed; the two are
                # proved equal by tests/test_recovery_limits.py::
                # test_windowed_scan_reports_exactly_what_the_whole_buffer_scan_reports)
                while rel + RECORD_OVERHEAD <= n:
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


def record_value(op: Op, buf: bytes | memoryview) -> memoryview:
    """The encoded value of a set or checkpoint operation, as a view into ``buf``."""
    return memoryview(buf)[op.value_start : op.value_end]


# =========================================================================== replay fast path
# Recovery decodes every record of every segment, so it has its own loop with
# no per-field function calls. It must accept and reject exactly what
# decode_op / decode_group do (tests/test_format.py and fuzz/ check them against
# each other), so the per-op CRCs inside a group are checked here too: the
# record's CRC covering them does not make a wrong op CRC acceptable (reads
# check it, and would refuse an operation that recovery had applied).
FRAME_PLAIN: Final = 0  # the op is the whole record
FRAME_GROUP: Final = 1  # op offsets are positions in the scanned data
FRAME_COMPRESSED_GROUP: Final = 2  # op offsets are positions in the decompressed op list

ReplayOp = tuple[int, str, str, int, int]  # op_type, ns, key, op_offset, op_size
_KEYED: Final = frozenset((REC_SET, REC_DELETE))
_NS_ONLY: Final = frozenset((REC_CLEAR, REC_CREATE_NS, REC_DROP_NS))


def _replay_op(op_type: int, buf: bytes, start: int, end: int, base: int) -> tuple[str, str]:
    """(ns, key) of the op body ``buf[start:end]``, checked like :func:`decode_op`."""
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
        return ns, key
    if op_type in _NS_ONLY or op_type in (REC_CHECKPOINT, REC_COMPACTED):
        op = decode_op(op_type, buf, start, end, base)
        return op.ns, op.key
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
        ns, key = _replay_op(record_type, data, start, end, 0)
        return FRAME_PLAIN, [(record_type, ns, key, offset, size)]
    if start + GROUP_HEADER_SIZE > end:
        raise CorruptionError("", start, "group header truncated")
    flags, count = GROUP_HEADER.unpack_from(data, start)
    pos = start + GROUP_HEADER_SIZE
    if flags == GROUP_FLAG_ZSTD:
        # large and rare: the general decoder (it also checks each op's CRC)
        payload = memoryview(data)[offset + FRAME_HEADER_SIZE : end]
        _c, _raw, decoded = decode_group(payload, offset + FRAME_HEADER_SIZE)
        return FRAME_COMPRESSED_GROUP, [
            (g.op.op_type, g.op.ns, g.op.key, g.op_offset, g.op_size) for g in decoded
        ]
    if flags:
        raise CorruptionError("", start, f"unknown group flags 0x{flags:02x}")
    if count * GROUP_OP_SIZE > end - pos:
        raise CorruptionError("", start, f"group claims {count} operations, too many")
    ops: list[ReplayOp] = []
    unpack = _OP_TYPE_LEN.unpack_from
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
        ns, key = _replay_op(op_type, data, body, op_end, 0)
        ops.append((op_type, ns, key, pos, op_end - pos))
        pos = op_end
    if pos != end:
        raise CorruptionError("", pos, f"{end - pos} bytes after the group's last operation")
    return FRAME_GROUP, ops


# =========================================================================== compaction marker
COMPACTED_RECORD_SIZE: Final = RECORD_OVERHEAD + COVERS_FROM.size
SEGMENT_START_SIZE: Final = SEGMENT_HEADER_SIZE + COMPACTED_RECORD_SIZE  # what to read to know


def encode_compacted_record(seq: int, covers_from: int) -> bytes:
    """The first record of a compaction output: it replaces segments covers_from..number."""
    return encode_record(REC_COMPACTED, seq, COVERS_FROM.pack(covers_from))


def compacted_covers_from(start: bytes | memoryview) -> int | None:
    """``covers_from`` if the segment whose first bytes are ``start`` is a compaction output.

    Returns None for an ordinary segment (its first record, if any, is not a
    valid compacted record). The header itself is not validated here.
    """
    if len(start) < SEGMENT_START_SIZE:
        return None
    data = bytes(start[SEGMENT_HEADER_SIZE:SEGMENT_START_SIZE])
    if data[8] != REC_COMPACTED or check_record_ok(data) is False:
        return None
    (covers_from,) = COVERS_FROM.unpack_from(data, RECORD_OVERHEAD)
    return int(covers_from)


def check_record_ok(data: bytes) -> bool:
    """True when ``data`` is exactly one valid record."""
    try:
        check_record(data)
    except CorruptionError:
        return False
    return True
