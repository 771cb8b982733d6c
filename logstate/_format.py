"""The byte layout of segment files: headers, framed records, operations, groups.

Owns: every constant and struct of the on-disk layout (documented once, as a
grammar with an example, in docs/format.md), the encoding of headers, records
and groups, and their decoding and read checks, one record or operation at a
time (the CRC-32C is ``_crc``'s; walking a whole segment is ``_scan``'s).
Must never: do I/O, read clocks, log, import ``_scan``, or decide what to do
about damage (the engine's recovery policy does that). Every function works on
plain ``bytes`` or ``memoryview`` so that the fuzzers can drive it without files.

Layout summary (docs/format.md has the full grammar)::

    segment = header record*
    header  = magic:8 version:u16 reserved:u16 segment_number:u64 header_crc:u32
    record  = crc:u32 length:u32 type:u8 payload[length]      crc covers length..payload
    payload = seq:u64 body
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

import zstandard

from logstate._crc import crc32c, crc_bytes
from logstate._errors import CorruptionError, UnsupportedFormatError

# --------------------------------------------------------------------------- segment header
SEGMENT_MAGIC: Final = b"\x89LGSEG\r\n"
FORMAT_VERSION: Final = 2  # written; 2 added TAG_EXPIRES values (docs/format.md)
READ_VERSIONS: Final = (1, 2)  # read: 1 is 2 without expiring values
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
assert COVERS_FROM.size == 8
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
assert NAME_LEN.size == 2
MAX_NAME_SIZE: Final = 0xFFFF
MAX_KEY_SIZE: Final = 4096  # UTF-8 bytes of a key: a policy bound, well below MAX_NAME_SIZE
NS_SEPARATOR: Final = "/"  # joins sub-storage names into a namespace path; "" is the root

# Group body: flags u8, count u32, then ops (or, if compressed, raw_size u32 + zstd frame).
GROUP_HEADER: Final = struct.Struct("<BI")
GROUP_HEADER_SIZE: Final = GROUP_HEADER.size
assert GROUP_HEADER_SIZE == 5
GROUP_FLAG_ZSTD: Final = 0x01
GROUP_RAW_SIZE: Final = struct.Struct("<I")
assert GROUP_RAW_SIZE.size == 4
# One operation inside a group: its own crc (so a point read of one value needs
# only the op's bytes), type, length, body. op_crc covers type, length and body.
GROUP_OP: Final = struct.Struct("<IBI")
GROUP_OP_SIZE: Final = GROUP_OP.size
assert GROUP_OP_SIZE == 9
OP_TYPE_LEN: Final = struct.Struct("<BI")  # an op after its crc: what op_crc covers first
assert OP_TYPE_LEN.size == 5
U32_STRUCT: Final = struct.Struct("<I")  # a crc
assert U32_STRUCT.size == 4


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
    if version not in READ_VERSIONS:
        raise UnsupportedFormatError(
            "",
            0,
            f"segment format version {version} is not supported (this logstate reads "
            f"versions 1 to {FORMAT_VERSION}); upgrade logstate to open it",
        )
    return int(number)


# =========================================================================== encoding
def encode_name(name: str) -> bytes:
    """u16 length + UTF-8 of a namespace path or key (the caller bounds its size)."""
    raw = name.encode("utf-8")
    return NAME_LEN.pack(len(raw)) + raw


_pack_length_type_seq = LENGTH_TYPE_SEQ.pack
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
    pack_head = OP_TYPE_LEN.pack
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
    rest = OP_TYPE_LEN.pack(op_type, len(body)) + body
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
        buf, pos, end = raw, 0, raw_size  # offsets inside raw from here on
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
    crc, length, record_type = FRAME_HEADER.unpack_from(data, 0)
    if record_type != REC_COMPACTED or FRAME_HEADER_SIZE + length != COMPACTED_RECORD_SIZE:
        return None
    if crc != crc32c(data[4:]):
        return None
    (covers_from,) = COVERS_FROM.unpack_from(data, RECORD_OVERHEAD)
    return int(covers_from)
