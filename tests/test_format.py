"""Tests of the byte format (_format, _crc, _scan): headers, framing, scanning, groups, ops.

Buffers are built in memory and damaged byte by byte; no files are involved.
"""

from __future__ import annotations

import mmap
import pathlib
import struct
from collections.abc import Iterator

import pytest
import zstandard
from hypothesis import example, given
from hypothesis import strategies as st

from logstate import CorruptionError, UnsupportedFormatError, _crc, _native, _scan
from logstate import _format as fmt
from logstate._crc import crc32c
from logstate._format import (
    FORMAT_VERSION,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    GROUP_FLAG_ZSTD,
    GROUP_HEADER,
    GROUP_OP,
    GROUP_OP_SIZE,
    GROUP_RAW_SIZE,
    MAX_RECORD_SIZE,
    MAX_RECORD_TYPE,
    MAX_SEGMENT_NUMBER,
    NAME_LEN,
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
    SEGMENT_HEADER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SEQ,
    SEQ_SIZE,
    Op,
    check_group_op,
    check_record,
    decode_group,
    decode_op,
    decode_segment_header,
    encode_group_body,
    encode_group_ops,
    encode_name,
    encode_record,
    encode_segment_header,
    set_group_op_value,
    set_record_value,
)
from logstate._scan import (
    FRAME_COMPRESSED_GROUP,
    FRAME_GROUP,
    FRAME_PLAIN,
    Damage,
    Frame,
    replay_frame,
    scan_records,
)
from logstate._values import encode_value


# =========================================================================== helpers
def scan(data: bytes | memoryview, start: int = 0) -> tuple[list[Frame], list[Damage]]:
    damages: list[Damage] = []
    frames = list(scan_records(data, start, damages.append))
    return frames, damages


def set_body(ns: str, key: str, value: object) -> bytes:
    return encode_name(ns) + encode_name(key) + encode_value(value)


def raw_frame(record_type: int, length: int, payload: bytes) -> bytes:
    """A frame with any type and length field, and a CRC that matches its bytes."""
    head = FRAME_HEADER.pack(0, length, record_type)[4:]
    return struct.pack("<I", crc32c(head + payload)) + head + payload


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def sample_records() -> list[bytes]:
    """A small log of different records (a set, a delete, a group, a checkpoint)."""
    group = encode_group_body(
        [(REC_SET, set_body("", "g1", 1)), (REC_DELETE, encode_name("") + encode_name("a"))]
    )
    return [
        encode_record(REC_SET, 1, set_body("", "a", "alpha")),
        encode_record(REC_DELETE, 2, encode_name("") + encode_name("a")),
        encode_record(REC_GROUP, 3, group),
        encode_record(REC_CHECKPOINT, 4, encode_value(42)),
    ]


def boundaries(records: list[bytes]) -> list[int]:
    """Offsets where each record starts, then the end."""
    offsets = [0]
    for record in records:
        offsets.append(offsets[-1] + len(record))
    return offsets


def group_payload(body: bytes, seq: int = 1) -> bytes:
    """What decode_group takes: the record's payload (seq + group body)."""
    return SEQ.pack(seq) + body


def op_bytes(op_type: int, body: bytes) -> bytes:
    return encode_group_ops([(op_type, body)])


def all_op_kinds() -> list[tuple[int, bytes]]:
    return [
        (REC_SET, set_body("a/b", "k\u00e9y", [1, 2])),
        (REC_DELETE, encode_name("a/b") + encode_name("key")),
        (REC_CLEAR, encode_name("")),
        (REC_CREATE_NS, encode_name("a")),
        (REC_DROP_NS, encode_name("a/b")),
        (REC_CHECKPOINT, encode_value({"offset": 7})),
    ]


# =========================================================================== CRC
def test_crc32c_matches_the_castagnoli_check_value_and_continues() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(b"56789", crc32c(b"1234")) == crc32c(b"123456789")
    assert crc32c(memoryview(b"123456789")) == crc32c(bytearray(b"123456789"))


def test_the_hardware_crc_is_the_one_in_use() -> None:
    # google-crc32c is a dependency: if its extension stops importing, every
    # read and write silently gets 4-60x slower; say so here instead. (The C
    # path, when active, uses its own: tests/test_native_crc.py.)
    if _native.EXT is not None:
        assert _crc.CRC_IMPLEMENTATION.startswith("logstate._cnative")
    else:
        assert _crc.CRC_IMPLEMENTATION == "google-crc32c"


@given(st.binary(max_size=3000), st.binary(max_size=300))
@example(b"", b"")
@example(b"123456789", b"")
def test_both_crc_implementations_agree(data: bytes, more: bytes) -> None:
    expected = _crc.crcmod_crc32c(data + more)
    assert crc32c(data + more) == expected
    assert _crc.crc_bytes(data + more) == expected
    assert crc32c(more, crc32c(data)) == expected
    assert crc32c(memoryview(data + more)) == expected
    assert crc32c(bytearray(data + more)) == expected
    assert _crc.crcmod_crc32c(more, _crc.crcmod_crc32c(data)) == expected


_FALLBACK_ROUND_TRIP = """
import sys
if sys.argv[1] == "crcmod":
    sys.modules["google_crc32c._crc32c"] = None  # as on a platform without its wheel
from logstate import LocalFileStorage, _crc
assert _crc.CRC_IMPLEMENTATION == sys.argv[1], _crc.CRC_IMPLEMENTATION
store = LocalFileStorage(sys.argv[2])
seen = {key: store.get(key) for key in store.get_all_keys()}
with store.batch() as batch:
    for i in range(50):
        batch.set(f"{sys.argv[1]}-group-{i}", i * 7)
store.set(sys.argv[1] + "-plain", b"x" * 200)
store.close()
print(sorted(seen.items()))
"""


def test_a_store_written_with_one_crc_implementation_reads_with_the_other(
    tmp_path: pathlib.Path,
) -> None:
    import os
    import subprocess
    import sys

    path = str(tmp_path / "store")

    def run(implementation: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _FALLBACK_ROUND_TRIP, implementation, path],
            env={**os.environ, "LOGSTATE_PURE": "1"},  # (the C path's own CRC: test_native_crc)
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run("crcmod") == "[]\n"
    written_by_crcmod = run("google-crc32c")
    assert "('crcmod-group-49', 343)" in written_by_crcmod
    assert "('crcmod-plain', b'" + "x" * 200 + "')" in written_by_crcmod
    read_back = run("crcmod")
    assert "('google-crc32c-group-0', 0)" in read_back
    assert "('google-crc32c-plain', b'" + "x" * 200 + "')" in read_back


# =========================================================================== segment header
@given(st.integers(0, MAX_SEGMENT_NUMBER))
@example(0)
@example(1)
@example(MAX_SEGMENT_NUMBER)
def test_segment_header_round_trips_its_number(number: int) -> None:
    header = encode_segment_header(number)
    assert len(header) == SEGMENT_HEADER_SIZE == 24
    assert decode_segment_header(header) == number


def test_segment_header_layout_is_magic_version_reserved_number_crc() -> None:
    header = encode_segment_header(5)
    magic, version, reserved, number, crc = SEGMENT_HEADER.unpack(header)
    assert magic == SEGMENT_MAGIC == b"\x89LGSEG\r\n"
    assert (version, reserved, number) == (FORMAT_VERSION, 0, 5)
    assert crc == crc32c(header[:20])


@pytest.mark.parametrize("number", [-1, MAX_SEGMENT_NUMBER + 1, 2**64])
def test_encode_segment_header_refuses_out_of_range_numbers(number: int) -> None:
    with pytest.raises(ValueError, match="segment number"):
        encode_segment_header(number)


def test_segment_header_is_decoded_at_the_start_of_a_whole_segment() -> None:
    data = encode_segment_header(9) + encode_record(REC_SET, 1, set_body("", "k", 1))
    assert decode_segment_header(data) == 9
    assert decode_segment_header(memoryview(data)) == 9


@pytest.mark.parametrize("size", range(SEGMENT_HEADER_SIZE))
def test_truncated_segment_header_is_corruption(size: int) -> None:
    with pytest.raises(CorruptionError, match="truncated") as info:
        decode_segment_header(encode_segment_header(1)[:size])
    assert not isinstance(info.value, UnsupportedFormatError)
    assert info.value.offset == 0


@pytest.mark.parametrize("bit", range(len(SEGMENT_MAGIC) * 8))
def test_segment_header_with_bad_magic_is_unsupported_format(bit: int) -> None:
    with pytest.raises(UnsupportedFormatError, match="not a logstate segment"):
        decode_segment_header(flip(encode_segment_header(1), bit))


def test_file_of_another_kind_is_unsupported_format() -> None:
    with pytest.raises(UnsupportedFormatError):
        decode_segment_header(b"SQLite format 3\x00" + bytes(16))


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 0xFFFF])
def test_unknown_version_with_a_correct_crc_is_unsupported_format(version: int) -> None:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, version, 0, 1, 0)[:-4]
    header = head + struct.pack("<I", crc32c(head))
    with pytest.raises(UnsupportedFormatError, match=f"version {version}") as info:
        decode_segment_header(header)
    assert isinstance(info.value, CorruptionError)  # callers may catch either


@pytest.mark.parametrize("bit", range(len(SEGMENT_MAGIC) * 8, SEGMENT_HEADER_SIZE * 8))
def test_any_bit_flip_after_the_magic_is_a_header_checksum_mismatch(bit: int) -> None:
    # a flipped version bit too: the CRC is checked before the version is trusted
    with pytest.raises(CorruptionError, match="checksum") as info:
        decode_segment_header(flip(encode_segment_header(3), bit))
    assert not isinstance(info.value, UnsupportedFormatError)


# =========================================================================== record frame
def test_encoded_record_layout_is_crc_length_type_seq_body() -> None:
    body = b"body bytes"
    record = encode_record(REC_CHECKPOINT, 0x0102030405060708, body)
    crc, length, record_type = FRAME_HEADER.unpack_from(record)
    assert length == SEQ_SIZE + len(body)
    assert record_type == REC_CHECKPOINT
    assert SEQ.unpack_from(record, FRAME_HEADER_SIZE) == (0x0102030405060708,)
    assert record[RECORD_OVERHEAD:] == body
    assert len(record) == RECORD_OVERHEAD + len(body) == FRAME_HEADER_SIZE + length
    assert crc == crc32c(record[4:])  # covers length, type and payload


@given(st.sampled_from(sorted(RECORD_TYPES)), st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_encoded_record_is_found_by_the_scanner(record_type: int, seq: int, body: bytes) -> None:
    prefix = b"\x00" * 3
    record = encode_record(record_type, seq, body)
    frames, damages = scan(prefix + record, start=len(prefix))
    assert frames == [Frame(len(prefix), len(record), record_type, seq)]
    assert damages == []
    assert check_record(record) == record_type


def test_scanner_starts_at_the_given_offset() -> None:
    data = encode_segment_header(1) + b"".join(sample_records())
    frames, damages = scan(data, SEGMENT_HEADER_SIZE)
    starts = boundaries(sample_records())[:-1]
    assert [f.offset for f in frames] == [SEGMENT_HEADER_SIZE + s for s in starts]
    assert damages == []


def test_record_crc_covers_length_type_and_payload() -> None:
    record = encode_record(REC_SET, 7, set_body("ns", "key", "value"))
    for bit in range(len(record) * 8):
        damaged = flip(record, bit)
        frames, damages = scan(damaged)
        assert frames == [], bit
        assert [(d.offset, d.size) for d in damages] == [(0, len(record))], bit
        with pytest.raises(CorruptionError):
            check_record(damaged)


@pytest.mark.parametrize("size", [1, 8, 9, 16, 17, 100, 4096])
def test_zero_filled_space_is_never_a_record(size: int) -> None:
    frames, damages = scan(bytes(size))
    assert frames == []
    assert len(damages) == 1
    assert (damages[0].offset, damages[0].size) == (0, size)
    expected = "zero-filled space" if size >= FRAME_HEADER_SIZE else "truncated record header"
    assert expected in damages[0].reason


def test_zero_filled_tail_after_records_is_one_damage_reaching_the_end() -> None:
    records = b"".join(sample_records())
    frames, damages = scan(records + bytes(512))
    assert len(frames) == len(sample_records())
    assert damages == [Damage(len(records), 512, "zero-filled space")]


@pytest.mark.parametrize("record_type", [0, MAX_RECORD_TYPE + 1, 0x80, 0xFF])
def test_record_type_outside_the_known_types_is_invalid_even_with_a_correct_crc(
    record_type: int,
) -> None:
    payload = SEQ.pack(1) + set_body("", "k", 1)
    frames, damages = scan(raw_frame(record_type, len(payload), payload))
    assert frames == []
    assert len(damages) == 1 and f"invalid record type {record_type}" in damages[0].reason


@pytest.mark.parametrize("length", range(SEQ_SIZE))
def test_record_length_below_the_seq_size_is_invalid_even_with_a_correct_crc(length: int) -> None:
    frames, damages = scan(raw_frame(REC_SET, length, bytes(length)) + bytes(16))
    assert frames == []
    assert f"invalid record length {length}" in damages[0].reason


def test_record_of_only_a_seq_is_a_frame_whose_body_does_not_parse() -> None:
    record = encode_record(REC_SET, 1, b"")
    assert scan(record) == ([Frame(0, RECORD_OVERHEAD, REC_SET, 1)], [])
    with pytest.raises(CorruptionError):
        decode_op(REC_SET, record, RECORD_OVERHEAD, len(record))


def test_length_above_max_record_size_is_invalid_without_reading_the_record() -> None:
    header = FRAME_HEADER.pack(0, MAX_RECORD_SIZE + 1, REC_SET) + bytes(SEQ_SIZE)
    frames, damages = scan(header)
    assert frames == []
    assert f"invalid record length {MAX_RECORD_SIZE + 1}" in damages[0].reason


def test_length_of_max_record_size_past_the_end_of_data_is_a_torn_record() -> None:
    header = FRAME_HEADER.pack(0, MAX_RECORD_SIZE, REC_SET) + bytes(SEQ_SIZE)
    frames, damages = scan(header)
    assert frames == []
    assert damages == [Damage(0, len(header), damages[0].reason)]
    assert "extends past the end" in damages[0].reason


def test_max_record_size_bounds_encoder_and_scanner_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "MAX_RECORD_SIZE", 64)
    monkeypatch.setattr(_scan, "MAX_RECORD_SIZE", 64)
    at_limit = encode_record(REC_CHECKPOINT, 1, b"v" * (64 - SEQ_SIZE))
    assert scan(at_limit)[0] == [Frame(0, FRAME_HEADER_SIZE + 64, REC_CHECKPOINT, 1)]
    with pytest.raises(ValueError, match="MAX_RECORD_SIZE"):
        encode_record(REC_CHECKPOINT, 1, b"v" * (64 - SEQ_SIZE + 1))
    over = raw_frame(REC_CHECKPOINT, 65, SEQ.pack(1) + b"v" * 57)
    frames, damages = scan(over)
    assert frames == [] and "invalid record length 65" in damages[0].reason


def test_encode_record_refuses_a_body_that_readers_would_refuse() -> None:
    # Regression: a record longer than MAX_RECORD_SIZE was written, then
    # dropped as damage (a torn tail) at the next open. The mapping is never
    # touched: the size check comes first.
    with mmap.mmap(-1, MAX_RECORD_SIZE - SEQ_SIZE + 1) as big:
        view = memoryview(big)
        try:
            with pytest.raises(ValueError, match="MAX_RECORD_SIZE"):
                encode_record(REC_SET, 1, view)
        finally:
            view.release()


# =========================================================================== scanning damage
def test_truncated_trailing_record_is_reported_as_torn_tail() -> None:
    records = sample_records()
    data = b"".join(records)
    starts = boundaries(records)
    for cut in range(len(data) + 1):
        frames, damages = scan(data[:cut])
        whole = [i for i in range(len(records)) if starts[i + 1] <= cut]
        assert [f.offset for f in frames] == [starts[i] for i in whole], cut
        if cut in starts:
            assert damages == [], cut
        else:
            torn_at = starts[len(whole)]
            assert [(d.offset, d.size) for d in damages] == [(torn_at, cut - torn_at)], cut


def test_damage_in_the_middle_is_reported_and_scanning_resumes_at_the_next_record() -> None:
    records = sample_records()
    starts = boundaries(records)
    middle = 2  # the group
    for bit in range(len(records[middle]) * 8):
        damaged = b"".join([*records[:middle], flip(records[middle], bit), *records[middle + 1 :]])
        frames, damages = scan(damaged)
        assert [f.offset for f in frames] == [s for i, s in enumerate(starts[:-1]) if i != middle]
        assert [(d.offset, d.size) for d in damages] == [(starts[middle], len(records[middle]))]


@pytest.mark.parametrize(
    "garbage", [b"\x01", b"\xff" * 7, bytes(40), b"not a record at all, just text"]
)
def test_garbage_between_records_is_reported_and_skipped(garbage: bytes) -> None:
    records = sample_records()
    data = records[0] + garbage + b"".join(records[1:])
    frames, damages = scan(data)
    assert len(frames) == len(records)
    assert damages == [Damage(len(records[0]), len(garbage), damages[0].reason)]


def test_overwritten_record_start_is_damage_followed_by_the_valid_records() -> None:
    records = sample_records()
    data = bytearray(b"".join(records))
    data[0:4] = b"\x00\x00\x00\x00"
    frames, damages = scan(bytes(data))
    assert [f.offset for f in frames] == boundaries(records)[1:-1]
    assert [(d.offset, d.size, d.reason) for d in damages] == [
        (0, len(records[0]), "record checksum mismatch")
    ]


def test_frames_and_damage_tile_the_scanned_range() -> None:
    records = sample_records()
    data = records[0] + b"junk" + records[1] + bytes(30) + records[2] + records[3][:-3]
    frames, damages = scan(data)
    ranges = sorted([(f.offset, f.size) for f in frames] + [(d.offset, d.size) for d in damages])
    position = 0
    for offset, size in ranges:
        assert offset == position
        position += size
    assert position == len(data)
    assert len(frames) == 3 and len(damages) == 3


# =========================================================================== check_record / op
def test_check_record_returns_the_type_of_a_whole_record() -> None:
    for record_type, body in all_op_kinds():
        assert check_record(encode_record(record_type, 9, body)) == record_type


def test_check_record_refuses_truncated_extended_or_altered_records() -> None:
    record = encode_record(REC_SET, 1, set_body("", "k", "v"))
    with pytest.raises(CorruptionError, match="truncated"):
        check_record(record[: RECORD_OVERHEAD - 1])
    with pytest.raises(CorruptionError, match="length mismatch"):
        check_record(record[:-1])
    with pytest.raises(CorruptionError, match="length mismatch"):
        check_record(record + b"\x00")
    with pytest.raises(CorruptionError, match="checksum"):
        check_record(record[:-1] + bytes([record[-1] ^ 0x40]))


def test_check_group_op_verifies_one_operation_read_on_its_own() -> None:
    op = op_bytes(REC_SET, set_body("", "k", 3))
    assert check_group_op(op) == GROUP_OP_SIZE
    assert check_group_op(memoryview(op)) == GROUP_OP_SIZE
    with pytest.raises(CorruptionError, match="truncated"):
        check_group_op(op[: GROUP_OP_SIZE - 1])
    with pytest.raises(CorruptionError, match="length mismatch"):
        check_group_op(op[:-1])
    with pytest.raises(CorruptionError, match="length mismatch"):
        check_group_op(op + b"x")
    for bit in range(len(op) * 8):
        with pytest.raises(CorruptionError):
            check_group_op(flip(op, bit))


# =========================================================================== decode_op
@pytest.mark.parametrize("op_type, body", all_op_kinds(), ids=lambda v: str(v)[:20])
def test_decode_op_decodes_every_operation_type(op_type: int, body: bytes) -> None:
    record = encode_record(op_type, 1, body)
    op = decode_op(op_type, record, RECORD_OVERHEAD, len(record))
    assert op.op_type == op_type
    expected = {
        REC_SET: Op(REC_SET, "a/b", "k\u00e9y", -2, -2),
        REC_DELETE: Op(REC_DELETE, "a/b", "key", -1, -1),
        REC_CLEAR: Op(REC_CLEAR, "", "", -1, -1),
        REC_CREATE_NS: Op(REC_CREATE_NS, "a", "", -1, -1),
        REC_DROP_NS: Op(REC_DROP_NS, "a/b", "", -1, -1),
        REC_CHECKPOINT: Op(REC_CHECKPOINT, "", "", -2, -2),
    }[op_type]
    assert (op.ns, op.key) == (expected.ns, expected.key)
    if expected.value_start == -2:  # an operation with a value: it is the body's tail
        value = record[op.value_start : op.value_end]
        assert value == (encode_value([1, 2]) if op_type == REC_SET else body)
        assert op.value_end == len(record)
    else:
        assert (op.value_start, op.value_end) == (-1, -1)


@given(
    st.text(max_size=20),
    st.text(min_size=1, max_size=20),
    st.binary(min_size=1, max_size=40),
)
def test_decode_op_round_trips_any_set(ns: str, key: str, value: bytes) -> None:
    body = encode_name(ns) + encode_name(key) + value
    op = decode_op(REC_SET, body, 0, len(body))
    assert (op.ns, op.key, body[op.value_start : op.value_end]) == (ns, key, value)


MALFORMED_BODIES = [
    (REC_SET, b"", "namespace length truncated"),
    (REC_SET, b"\x00", "namespace length truncated"),
    (REC_SET, NAME_LEN.pack(5) + b"ab", "overruns"),
    (REC_SET, encode_name("") + b"\x01", "key length truncated"),
    (REC_SET, encode_name("") + NAME_LEN.pack(9) + b"k", "overruns"),
    (REC_SET, encode_name("") + encode_name("k"), "no value"),
    (REC_SET, NAME_LEN.pack(1) + b"\xff" + encode_name("k") + b"\x01", "UTF-8"),
    (REC_SET, encode_name("") + NAME_LEN.pack(2) + b"\xed\xa0" + b"\x01", "UTF-8"),
    (REC_DELETE, encode_name("") + encode_name(""), "empty key"),
    (REC_DELETE, encode_name("") + encode_name("k") + b"\x00", "unexpected bytes"),
    (REC_DELETE, encode_name(""), "key length truncated"),
    (REC_CLEAR, b"", "namespace length truncated"),
    (REC_CLEAR, encode_name("a") + b"\x00", "unexpected bytes"),
    (REC_CREATE_NS, encode_name(""), "root"),
    (REC_DROP_NS, encode_name(""), "root"),
    (REC_CREATE_NS, encode_name("a") + b"zz", "unexpected bytes"),
    (REC_CHECKPOINT, b"", "no value"),
    (REC_GROUP, encode_name("a"), "unknown operation type 4"),
    (0, encode_name("a"), "unknown operation type 0"),
    (MAX_RECORD_TYPE + 1, encode_name("a"), f"unknown operation type {MAX_RECORD_TYPE + 1}"),
    (REC_COMPACTED, encode_name("a"), "compacted record body is not 8 bytes"),
]


@pytest.mark.parametrize("op_type, body, reason", MALFORMED_BODIES)
def test_decode_op_refuses_a_malformed_body(op_type: int, body: bytes, reason: str) -> None:
    with pytest.raises(CorruptionError, match=reason):
        decode_op(op_type, body, 0, len(body))


@pytest.mark.parametrize("op_type, body, reason", MALFORMED_BODIES)
def test_replay_frame_refuses_every_body_decode_op_refuses(
    op_type: int, body: bytes, reason: str
) -> None:
    record = b"\x00" * 5 + raw_frame(op_type, SEQ_SIZE + len(body), SEQ.pack(1) + body)
    with pytest.raises(CorruptionError):
        replay_frame(record, 5, len(record) - 5, op_type)


def test_decode_op_error_offsets_include_the_base() -> None:
    body = encode_name("") + encode_name("k")
    with pytest.raises(CorruptionError) as info:
        decode_op(REC_SET, b"pad" + body, 3, 3 + len(body), base=1000)
    assert info.value.offset == 1000 + 3 + len(body)
    assert info.value.path == ""


def test_decode_op_reads_only_its_own_range_of_the_buffer() -> None:
    body = encode_name("n") + encode_name("k")
    buf = b"\xff\xff" + body + b"\xff\xff"
    op = decode_op(REC_DELETE, buf, 2, 2 + len(body))
    assert (op.ns, op.key) == ("n", "k")


# =========================================================================== groups
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.text(max_size=5), st.text(min_size=1, max_size=8), st.binary(min_size=1)).map(
            lambda t: (REC_SET, encode_name(t[0]) + encode_name(t[1]) + t[2])
        ),
        st.tuples(st.text(max_size=5), st.text(min_size=1, max_size=8)).map(
            lambda t: (REC_DELETE, encode_name(t[0]) + encode_name(t[1]))
        ),
        st.text(max_size=5).map(lambda ns: (REC_CLEAR, encode_name(ns))),
        st.text(min_size=1, max_size=5).map(lambda ns: (REC_CREATE_NS, encode_name(ns))),
        st.text(min_size=1, max_size=5).map(lambda ns: (REC_DROP_NS, encode_name(ns))),
        st.binary(min_size=1, max_size=20).map(lambda v: (REC_CHECKPOINT, v)),
    ),
    max_size=12,
)


def expected_ops(ops: list[tuple[int, bytes]]) -> list[tuple[int, str, str]]:
    return [(t, *(lambda op: (op.ns, op.key))(decode_op(t, body, 0, len(body)))) for t, body in ops]


def located_ops(
    buf: bytes | memoryview, offsets: list[tuple[int, int]]
) -> Iterator[tuple[int, str, str, bytes]]:
    """Each op read on its own from (offset, size), as the engine's reads do."""
    for offset, size in offsets:
        data = bytes(buf[offset : offset + size])
        check_group_op(data)
        op = decode_op(data[4], data, GROUP_OP_SIZE, len(data))
        value = data[op.value_start : op.value_end] if op.value_start >= 0 else b""
        yield op.op_type, op.ns, op.key, value


@given(ops_strategy)
def test_uncompressed_group_round_trips(ops: list[tuple[int, bytes]]) -> None:
    body = encode_group_body(ops)
    assert body[0] == 0
    record = encode_record(REC_GROUP, 5, body)
    assert scan(record) == ([Frame(0, len(record), REC_GROUP, 5)], [])
    payload = memoryview(record)[FRAME_HEADER_SIZE:]
    compressed, buf, decoded = decode_group(payload)
    assert not compressed
    assert [(g.op.op_type, g.op.ns, g.op.key) for g in decoded] == expected_ops(ops)
    located = list(located_ops(buf, [(g.op_offset, g.op_size) for g in decoded]))
    assert [(t, ns, key) for t, ns, key, _v in located] == expected_ops(ops)
    # op offsets are relative to the payload: in the file, + FRAME_HEADER_SIZE
    for g, (_t, body_bytes) in zip(decoded, ops, strict=True):
        body_offset = FRAME_HEADER_SIZE + g.op_offset + GROUP_OP_SIZE
        assert record[body_offset : body_offset + len(body_bytes)] == body_bytes


@given(ops_strategy.filter(bool))
def test_compressed_group_round_trips(ops: list[tuple[int, bytes]]) -> None:
    ops = ops * 4  # repetition: always worth compressing
    body = encode_group_body(ops, compress_min_size=0)
    assert body[0] == GROUP_FLAG_ZSTD
    (raw_size,) = GROUP_RAW_SIZE.unpack_from(body, 5)
    assert raw_size == len(encode_group_ops(ops))
    record = encode_record(REC_GROUP, 6, body)
    compressed, buf, decoded = decode_group(memoryview(record)[FRAME_HEADER_SIZE:])
    assert compressed
    assert bytes(buf) == encode_group_ops(ops)  # offsets are in the decompressed ops
    assert [(g.op.op_type, g.op.ns, g.op.key) for g in decoded] == expected_ops(ops)
    located = list(located_ops(buf, [(g.op_offset, g.op_size) for g in decoded]))
    assert [(t, ns, key) for t, ns, key, _v in located] == expected_ops(ops)


def test_group_below_compress_min_size_or_incompressible_is_stored_plain() -> None:
    ops = [(REC_SET, set_body("", "k", "x" * 100))]
    assert encode_group_body(ops, compress_min_size=None)[0] == 0
    assert encode_group_body(ops, compress_min_size=10_000)[0] == 0
    assert encode_group_body(ops, compress_min_size=0)[0] == GROUP_FLAG_ZSTD
    tiny = [(REC_CHECKPOINT, b"\x07\x9a\x1f")]
    assert encode_group_body(tiny, compress_min_size=0)[0] == 0  # zstd would be larger


def test_group_larger_than_max_record_size_is_never_compressed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: decode_group refuses raw_size > MAX_RECORD_SIZE, so the
    # encoder must not compress (and so hide) a larger op list.
    ops = [(REC_SET, set_body("", "k", "x" * 200))]
    monkeypatch.setattr(fmt, "MAX_RECORD_SIZE", 100)
    assert encode_group_body(ops, compress_min_size=0)[0] == 0


def test_encode_group_ops_refuses_types_a_group_cannot_hold() -> None:
    for op_type in (0, REC_GROUP, 8):
        with pytest.raises(ValueError, match="cannot be part of a group"):
            encode_group_ops([(op_type, encode_name("a"))])
    assert encode_group_ops([]) == b""


def test_group_operation_layout_is_crc_type_length_body() -> None:
    body = set_body("", "k", 1)
    op = op_bytes(REC_SET, body)
    crc, op_type, length = GROUP_OP.unpack_from(op)
    assert (op_type, length) == (REC_SET, len(body))
    assert op[GROUP_OP_SIZE:] == body
    assert crc == crc32c(op[4:])


def test_group_operation_checksum_mismatch_is_corruption() -> None:
    ops = [(REC_SET, set_body("", "a", 1)), (REC_DELETE, encode_name("") + encode_name("b"))]
    body = encode_group_body(ops)
    first_op = GROUP_HEADER.size
    for bit in range(first_op * 8, len(body) * 8):
        damaged = flip(body, bit)
        with pytest.raises(CorruptionError):
            decode_group(group_payload(damaged))


def test_group_operation_checksum_is_checked_even_when_the_record_crc_is_right() -> None:
    # Regression: recovery's fast decoder skipped the per-op CRC (the record
    # CRC covers those bytes), so it applied operations that reads refuse.
    op = bytearray(op_bytes(REC_SET, set_body("", "k", 1)))
    op[0] ^= 0xFF
    body = GROUP_HEADER.pack(0, 1) + bytes(op)
    record = encode_record(REC_GROUP, 1, body)
    assert scan(record)[0] != []  # the record itself checks out
    with pytest.raises(CorruptionError, match="checksum"):
        decode_group(memoryview(record)[FRAME_HEADER_SIZE:])
    with pytest.raises(CorruptionError, match="checksum"):
        replay_frame(record, 0, len(record), REC_GROUP)


@pytest.mark.parametrize("flags", [0x02, 0x80, 0xFF, 0x03])
def test_unknown_group_flags_are_corruption(flags: int) -> None:
    body = bytearray(encode_group_body([(REC_CLEAR, encode_name(""))]))
    body[0] = flags
    with pytest.raises(CorruptionError, match="unknown group flags"):
        decode_group(group_payload(bytes(body)))


@pytest.mark.parametrize("count", [0, 1, 3, 2**32 - 1])
def test_group_count_that_does_not_match_its_operations_is_corruption(count: int) -> None:
    ops = encode_group_ops([(REC_CLEAR, encode_name("")), (REC_CLEAR, encode_name("a"))])
    with pytest.raises(CorruptionError):
        decode_group(group_payload(GROUP_HEADER.pack(0, count) + ops))


def test_empty_group_decodes_to_no_operations() -> None:
    assert decode_group(group_payload(GROUP_HEADER.pack(0, 0)))[2] == []


@pytest.mark.parametrize("size", range(SEQ_SIZE + GROUP_HEADER.size))
def test_truncated_group_header_is_corruption(size: int) -> None:
    payload = group_payload(encode_group_body([(REC_CLEAR, encode_name(""))]))
    with pytest.raises(CorruptionError, match="group header truncated"):
        decode_group(payload[:size])


def test_group_inside_a_group_is_corruption() -> None:
    inner = encode_group_body([(REC_CLEAR, encode_name(""))])
    head = struct.pack("<BI", REC_GROUP, len(inner))
    op = struct.pack("<I", crc32c(head + inner)) + head + inner
    with pytest.raises(CorruptionError, match="operation type 4 inside a group"):
        decode_group(group_payload(GROUP_HEADER.pack(0, 1) + op))


def compressed_body(raw: bytes, raw_size: int, frame: bytes | None = None, count: int = 1) -> bytes:
    packed = zstandard.ZstdCompressor().compress(raw) if frame is None else frame
    return GROUP_HEADER.pack(GROUP_FLAG_ZSTD, count) + GROUP_RAW_SIZE.pack(raw_size) + packed


def test_compressed_group_with_a_wrong_raw_size_is_corruption() -> None:
    raw = encode_group_ops([(REC_SET, set_body("", "k", "v" * 50))])
    assert decode_group(group_payload(compressed_body(raw, len(raw))))[0]
    for raw_size in (0, len(raw) - 1, len(raw) + 1):
        with pytest.raises(CorruptionError, match="compressed group"):
            decode_group(group_payload(compressed_body(raw, raw_size)))


def test_compressed_group_claiming_more_than_max_record_size_is_corruption() -> None:
    raw = encode_group_ops([(REC_CLEAR, encode_name(""))])
    with pytest.raises(CorruptionError, match="claims"):
        decode_group(group_payload(compressed_body(raw, MAX_RECORD_SIZE + 1)))


def test_compressed_group_whose_zstd_frame_declares_another_size_is_refused_unread() -> None:
    # Regression: zstandard allocates the content size a frame header declares
    # (max_output_size is ignored then), so a corrupt header could make a
    # small record allocate gigabytes or raise MemoryError.
    raw = encode_group_ops([(REC_CLEAR, encode_name(""))])
    plain = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    assert plain[4] == 0x00  # descriptor: no content size, a window descriptor follows
    for declared in (len(raw) + 1, 2**33, 2**62):
        frame = plain[:4] + b"\xc0" + plain[5:6] + struct.pack("<Q", declared) + plain[6:]
        with pytest.raises(CorruptionError, match=f"declares {declared} bytes"):
            decode_group(group_payload(compressed_body(raw, len(raw), frame)))
    # a frame without a declared size is bounded by raw_size instead
    assert decode_group(group_payload(compressed_body(raw, len(raw), plain)))[2]


@pytest.mark.parametrize(
    "frame", [b"", b"\x28\xb5\x2f\xfd", b"not zstd at all", b"\x28\xb5\x2f\xfd\x20\x05garbage"]
)
def test_compressed_group_that_does_not_decompress_is_corruption(frame: bytes) -> None:
    with pytest.raises(CorruptionError, match="compressed group"):
        decode_group(group_payload(compressed_body(b"xxxxx", 5, frame)))


def test_compressed_group_with_its_size_truncated_is_corruption() -> None:
    body = GROUP_HEADER.pack(GROUP_FLAG_ZSTD, 1) + b"\x01\x00"
    with pytest.raises(CorruptionError, match="size truncated"):
        decode_group(group_payload(body))


def test_decode_group_error_offsets_include_the_base() -> None:
    with pytest.raises(CorruptionError) as info:
        decode_group(group_payload(GROUP_HEADER.pack(0x40, 0)), base=500)
    assert info.value.offset == 500 + SEQ_SIZE


# =========================================================================== recovery decoder
@given(ops_strategy, st.booleans())
def test_replay_frame_locates_every_operation_of_a_group(
    ops: list[tuple[int, bytes]], compress: bool
) -> None:
    prefix = encode_record(REC_CLEAR, 1, encode_name(""))
    record = encode_record(REC_GROUP, 2, encode_group_body(ops * 2, 0 if compress else None))
    data = prefix + record
    kind, replayed = replay_frame(data, len(prefix), len(record), REC_GROUP)
    assert [(t, ns, key) for t, ns, key, _o, _s, _e in replayed] == expected_ops(ops * 2)
    _c, buf, _ops = decode_group(memoryview(record)[FRAME_HEADER_SIZE:])
    if kind == FRAME_COMPRESSED_GROUP:
        source: bytes | memoryview = buf  # offsets in the decompressed op list
    else:
        assert kind == FRAME_GROUP
        source = data  # offsets in the scanned data
    offsets = [(offset, size) for _t, _n, _k, offset, size, _e in replayed]
    assert [op[:3] for op in located_ops(source, offsets)] == expected_ops(ops * 2)


@pytest.mark.parametrize("op_type, body", all_op_kinds(), ids=lambda v: str(v)[:20])
def test_replay_frame_locates_a_plain_record_at_itself(op_type: int, body: bytes) -> None:
    data = b"\x00" * 7 + encode_record(op_type, 3, body)
    kind, replayed = replay_frame(data, 7, len(data) - 7, op_type)
    op = decode_op(op_type, body, 0, len(body))
    assert (kind, replayed) == (FRAME_PLAIN, [(op_type, op.ns, op.key, 7, len(data) - 7, None)])


group_ish_bodies = st.one_of(
    ops_strategy.map(encode_group_body),
    ops_strategy.map(lambda ops: encode_group_body(ops, compress_min_size=0)),
    st.tuples(ops_strategy, st.integers(0, 400), st.integers(0, 7)).map(
        lambda t: flip(encode_group_body(t[0]), t[1] % (8 * len(encode_group_body(t[0]))))
    ),
    st.tuples(st.integers(0, 3), st.integers(0, 6), st.binary(max_size=60)).map(
        lambda t: GROUP_HEADER.pack(*t[:2]) + t[2]
    ),
)


@given(group_ish_bodies)
def test_replay_frame_accepts_and_refuses_exactly_what_decode_group_does(body: bytes) -> None:
    record = encode_record(REC_GROUP, 1, body)
    try:
        _c, _buf, decoded = decode_group(memoryview(record)[FRAME_HEADER_SIZE:])
        general: list[tuple[int, str, str]] | None = [
            (g.op.op_type, g.op.ns, g.op.key) for g in decoded
        ]
    except CorruptionError:
        general = None
    try:
        _kind, replayed = replay_frame(record, 0, len(record), REC_GROUP)
        fast: list[tuple[int, str, str]] | None = [(t, ns, k) for t, ns, k, _o, _s, _e in replayed]
    except CorruptionError:
        fast = None
    assert fast == general


@given(st.sampled_from(sorted(OP_TYPES)), st.binary(max_size=30))
def test_replay_frame_accepts_and_refuses_exactly_what_decode_op_does(
    op_type: int, body: bytes
) -> None:
    record = encode_record(op_type, 1, body)
    try:
        op = decode_op(op_type, record, RECORD_OVERHEAD, len(record))
        general: tuple[str, str] | None = (op.ns, op.key)
    except CorruptionError:
        general = None
    try:
        _kind, replayed = replay_frame(record, 0, len(record), op_type)
        fast: tuple[str, str] | None = (replayed[0][1], replayed[0][2])
    except CorruptionError:
        fast = None
    assert fast == general


# =========================================================================== read fast path
def test_set_record_value_returns_the_value_of_that_key_only() -> None:
    record = encode_record(REC_SET, 1, set_body("ns", "key", "value"))
    prefix = encode_name("ns") + encode_name("key")
    assert set_record_value(record, prefix) == encode_value("value")
    assert set_record_value(record, encode_name("ns") + encode_name("kez")) is None
    assert set_record_value(record, encode_name("") + encode_name("key")) is None
    assert set_record_value(flip(record, 8 * len(record) - 1), prefix) is None
    assert set_record_value(record[:-1], prefix) is None
    checkpoint = encode_record(REC_CHECKPOINT, 1, prefix + encode_value(1))
    assert set_record_value(checkpoint, prefix) is None


def test_set_group_op_value_returns_the_value_of_that_key_only() -> None:
    op = op_bytes(REC_SET, set_body("", "k", b"v"))
    prefix = encode_name("") + encode_name("k")
    assert set_group_op_value(op, prefix) == encode_value(b"v")
    assert set_group_op_value(op, encode_name("") + encode_name("j")) is None
    assert set_group_op_value(flip(op, 0), prefix) is None
    assert set_group_op_value(op + b"x", prefix) is None
    assert set_group_op_value(op_bytes(REC_DELETE, prefix), prefix) is None


@given(
    st.text(max_size=20),
    st.lists(
        st.tuples(st.text(min_size=1, max_size=30), st.one_of(st.none(), st.binary(max_size=200))),
        max_size=20,
    ),
)
def test_key_ops_are_the_group_ops_of_the_same_sets_and_deletes(
    ns: str, changes: list[tuple[str, bytes | None]]
) -> None:
    ns_bytes = encode_name(ns)
    keys = [key for key, _ in changes]
    values = [value for _, value in changes]
    expected = [
        fmt.encode_group_ops(
            [(REC_DELETE, ns_bytes + encode_name(key))]
            if value is None
            else [(REC_SET, ns_bytes + encode_name(key) + value)]
        )
        for key, value in changes
    ]
    assert fmt.encode_key_ops(ns_bytes, keys, values) == expected
    assert fmt.encode_op(REC_CHECKPOINT, b"cp") == fmt.encode_group_ops([(REC_CHECKPOINT, b"cp")])
