"""Fuzzing the pure byte decoders (logstate._format, logstate._scan, logstate._values).

Guarantee checked: any bytes given as a segment either decode or raise
logstate's CorruptionError -- never any other exception, never unbounded
memory. ("Unbounded" means: more than a small multiple of the input, plus the
decompressed size a compressed group declares, which the decoder caps at
MAX_RECORD_SIZE.) Values are decoded with ``allow_pickle=False``, where a
pickle is refused with PickleNotAllowedError (the documented outcome) and never
loaded.

Each found frame is replayed by the real recovery code, ``Keydir.apply_frame``
(logstate/_keydir.py: ``replay_frame`` and the index's rules), into the index
of the whole segment, as recovery does, and into an index of its own; it is
also decoded by the general decoders (``decode_op`` / ``decode_group``): both
must accept the same frames with the same operations, and a frame that
recovery refuses leaves the index as it was (salvage drops it and goes on).
Every location the replay indexes (a key's value, the checkpoint) is then read
back with the read path's checks (``set_record_value`` / ``set_group_op_value``
of ``Reader.get``; ``check_record`` / ``check_group_op`` + ``decode_op`` of
``Reader.read_value``; ``_reader.decompress_group`` for a compressed group) and
must pass them. The scanner must account for every byte: its frames and damage
reports tile the scanned range exactly.

Inputs: arbitrary bytes; records and groups with *correct* checksums around
arbitrary bodies (so the fuzzer gets past the CRC); and the real segments in
fuzz/corpus/*.seg mutated by bit flips, truncations, splices, insertions,
deletions and zero-filled ranges, optionally with checksums recomputed.

Run (whole file well under 20 s on 2 cores with the default profile)::

    python -m pytest fuzz -q                                # 400 examples a test
    LOGSTATE_FUZZ_PROFILE=long python -m pytest fuzz -q     # 15 000 (~6 min)

Profiles are in fuzz/conftest.py. The corpus was written by LocalFileStorage;
rewrite it (after a format change) with::

    LOGSTATE_FUZZ_WRITE_CORPUS=1 python -m pytest fuzz -q
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from logstate import CorruptionError, LocalFileStorage, PickleNotAllowedError
from logstate._crc import crc32c
from logstate._filenames import segment_file_name
from logstate._format import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    GROUP_FLAG_ZSTD,
    GROUP_HEADER,
    GROUP_HEADER_SIZE,
    GROUP_OP,
    GROUP_OP_SIZE,
    GROUP_RAW_SIZE,
    MAX_RECORD_SIZE,
    NAME_LEN,
    REC_CHECKPOINT,
    REC_CLEAR,
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
    encode_name,
    encode_segment_header,
    set_group_op_value,
    set_record_value,
)
from logstate._keydir import Keydir
from logstate._location import KIND_RECORD, Location, unpack_location
from logstate._reader import decompress_group
from logstate._scan import (
    FRAME_COMPRESSED_GROUP,
    FRAME_GROUP,
    Damage,
    Expiry,
    Frame,
    replay_frame,
    scan_records,
    value_expiry,
)
from logstate._values import decode_value, encode_value

FUZZ = settings.get_profile("logstate-fuzz")  # registered in fuzz/conftest.py
CORPUS_DIR = Path(__file__).parent / "corpus"
MEMORY_SLACK = 1 << 20  # bytes: interpreter and zstd noise on top of the bound
SEGMENT_NUMBER = 1  # of every segment decoded (the corpus files are first segments)
SEGMENT_PATH = segment_file_name(SEGMENT_NUMBER)  # names it in the index's errors


# =========================================================================== corpus
def write_corpus(directory: Path = CORPUS_DIR) -> None:
    """Write the seed segments with LocalFileStorage (the first segment of each store).

    Between them the seeds hold every record type, an uncompressed and a
    compressed group, values of every tag and nested sub-storages.
    """

    def plain_sets(store: LocalFileStorage) -> None:
        values = [None, True, False, 0, -1, 2**70, -0.0, float("nan"), "", "h\u00e9", b"\x00\xff"]
        for i, value in enumerate([*values, bytearray(b"ba"), {"k": [1, 2.5]}]):
            store[f"key{i}"] = value
        store["key1"] = "overwritten"
        del store["key2"]

    def group(store: LocalFileStorage) -> None:
        store["before"] = 1
        with store.batch() as batch:
            batch.set("a", "alpha")
            batch.set("b", [1, 2, 3])
            batch.remove("before")
        with store.batch() as batch:
            batch.clear()
            batch.set("c", b"after clear")

    def compressed_group(store: LocalFileStorage) -> None:
        with store.batch() as batch:
            for i in range(8):
                batch.set(f"item{i}", "compressible " * 4)
            batch.remove("item0")

    def sub_storages(store: LocalFileStorage) -> None:
        child = store.get_or_create_sub_storage("child")
        grandchild = child.get_or_create_sub_storage("grand")
        grandchild["g"] = 1
        child["c"] = 2
        store.get_or_create_sub_storage("other")["o"] = 3
        store["root"] = 4
        child.delete_sub_storage("grand")
        store._engine.write_group([], checkpoint=encode_value({"offset": 42}))
        store.get_or_create_sub_storage("third")
        store.delete_sub_storages()  # two or more drops: one group
        store.clear()

    def compacted(store: LocalFileStorage) -> None:
        # the compaction output replaces segment 1: marker, sub-storage, sets, checkpoint
        store.get_or_create_sub_storage("sub")["s"] = "in a sub-storage"
        for i in range(5):
            store[f"k{i}"] = i
        with store.batch() as batch:
            batch.set("grouped", b"from a group")
            batch.remove("k0")
        store._engine.write_group([], checkpoint=encode_value({"offset": 7}))
        store.compact()

    # name: (scenario, compress_min_size)
    scenarios: dict[str, tuple[Callable[[LocalFileStorage], None], int | None]] = {
        "plain_sets": (plain_sets, None),
        "group": (group, None),
        "compressed_group": (compressed_group, 0),
        "sub_storages": (sub_storages, None),
        "compacted": (compacted, None),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, (scenario, compress_min_size) in scenarios.items():
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalFileStorage(tmp, sync="none", compress_min_size=compress_min_size)
            try:
                scenario(store)
            finally:
                store.close()
            shutil.copyfile(Path(tmp) / "segment-0000000001.seg", directory / f"{name}.seg")


if os.environ.get("LOGSTATE_FUZZ_WRITE_CORPUS") == "1":  # pragma: no cover - by hand
    write_corpus()

CORPUS: dict[str, bytes] = {p.name: p.read_bytes() for p in sorted(CORPUS_DIR.glob("*.seg"))}


# =========================================================================== the decode path
def check_value(value: memoryview) -> None:
    """Decode a stored value as storage.get does, but never loading pickles."""
    with contextlib.suppress(CorruptionError, PickleNotAllowedError):
        decode_value(value, allow_pickle=False)


def read_back(data: bytes, loc: Location, ns: str, key: str) -> str:
    """Read the value at ``loc`` (in segment ``data``) with the read path's checks.

    Recovery indexed it, so every check must pass. Returns the kind of
    location read: "record", "group op" or "compressed".
    """
    if isinstance(loc, tuple):
        _number, record_offset, record_size, op_offset, op_size, _share = loc
        record = data[record_offset : record_offset + record_size]
        raw = decompress_group(SEGMENT_PATH, record_offset, record)
        located = bytes(raw[op_offset : op_offset + op_size])
        kind = "compressed"
    else:
        _number, offset, size, location_kind = unpack_location(loc)
        located = data[offset : offset + size]
        kind = "record" if location_kind == KIND_RECORD else "group op"
    if kind == "record":
        op_type = check_record(located)
        op = decode_op(op_type, located, RECORD_OVERHEAD, len(located))
        fast_read = set_record_value
    else:
        assert check_group_op(located) == GROUP_OP_SIZE
        op = decode_op(located[4], located, GROUP_OP_SIZE, len(located))
        fast_read = set_group_op_value
    assert (op.ns, op.key) == (ns, key)
    assert op.op_type == (REC_SET if key else REC_CHECKPOINT)
    value = memoryview(located)[op.value_start : op.value_end]
    if op.op_type == REC_SET:
        prefix = encode_name(ns) + encode_name(key)
        assert fast_read(located, prefix) == bytes(value)
        assert fast_read(located, encode_name(ns) + encode_name(key + "x")) is None
    check_value(value)
    return kind


def expiry_of(op: Op, buf: bytes | memoryview) -> Expiry | None:
    """What recovery must find as ``op``'s expiry: the general decoder's value, parsed."""
    if op.op_type != REC_SET:
        return None
    return value_expiry(buf[op.value_start : op.value_end])


def index_state(keydir: Keydir) -> tuple[dict[str, dict[str, Location]], Location | None, int]:
    """A copy of everything the index holds (each namespace's index as a dict)."""
    namespaces = {ns: dict(index) for ns, index in keydir.namespaces.items()}
    return copy.deepcopy(namespaces), keydir.checkpoint, keydir.live_bytes


def replay(keydir: Keydir, data: bytes, frame: Frame) -> set[str]:
    """Replay one scanned frame with ``Keydir.apply_frame``, as recovery does, and read it back.

    ``keydir`` is the index of the segment so far. The general decoders
    (``decode_op``, ``decode_group``) must accept exactly the frames that
    recovery (``replay_frame``) accepts, with the same operations, or reads
    and recovery would disagree about a segment. A frame recovery refuses
    changes nothing in ``keydir``. Returns the kinds of location read back.
    """
    start = frame.offset + RECORD_OVERHEAD
    end = frame.offset + frame.size
    try:
        if frame.record_type == REC_GROUP:
            payload = memoryview(data)[frame.offset + FRAME_HEADER_SIZE : end]
            _compressed, buf, ops = decode_group(payload, frame.offset + FRAME_HEADER_SIZE)
            general = [(g.op.op_type, g.op.ns, g.op.key, expiry_of(g.op, buf)) for g in ops]
        else:
            op = decode_op(frame.record_type, data, start, end)
            general = [(op.op_type, op.ns, op.key, expiry_of(op, data))]
    except CorruptionError:
        general = None
    before = index_state(keydir)
    try:
        keydir.apply_frame(data, frame, SEGMENT_NUMBER, 0)
    except CorruptionError:
        assert general is None, f"recovery refuses a frame the decoders accept: {general}"
        assert index_state(keydir) == before, "a refused frame changed the index"
        raise
    keydir._check()
    _kind, replayed = replay_frame(data, frame.offset, frame.size, frame.record_type)
    assert general == [(t, ns, key, e) for t, ns, key, _o, _s, e in replayed], (
        "recovery accepts a frame the decoders refuse" if general is None else "they disagree"
    )
    # what this frame indexes on its own: each of its locations, read back
    own = Keydir(SEGMENT_PATH)
    own.apply_frame(data, frame, SEGMENT_NUMBER, 0)
    own._check()
    located = [(loc, ns, key) for ns, index in own.namespaces.items() for key, loc in index.items()]
    if own.checkpoint is not None:
        located.append((own.checkpoint, "", ""))
    try:
        kinds = {read_back(data, loc, ns, key) for loc, ns, key in located}
    except CorruptionError as exc:  # not damage: recovery accepted these bytes
        raise AssertionError(f"a location recovery indexed fails the read checks: {exc}") from exc
    return kinds


def decode_segment(data: bytes, start: int) -> None:
    """Recover ``data`` as the engine does (header, scan, apply every frame to an index).

    Only CorruptionError may come out of the decoders and the index; it is
    swallowed per frame (salvage keeps going). Anything else propagates and
    fails the test.
    """
    if start:
        # the engine would refuse a file with a bad header; scan it anyway, for coverage
        with contextlib.suppress(CorruptionError):
            decode_segment_header(data)
    keydir = Keydir(SEGMENT_PATH)
    frames: list[Frame] = []
    damages: list[Damage] = []
    for frame in scan_records(data, start, damages.append):
        frames.append(frame)
        with contextlib.suppress(CorruptionError):
            replay(keydir, data, frame)
    # frames and damage reports tile [start, len(data)) exactly
    ranges = sorted([(f.offset, f.size) for f in frames] + [(d.offset, d.size) for d in damages])
    position = start
    for offset, size in ranges:
        assert offset == position and size > 0, (offset, size, position)
        position += size
    assert position == max(start, len(data))


def declared_group_size(data: bytes, start: int) -> int:
    """The largest raw size a compressed group found in ``data`` declares (capped)."""
    largest = 0
    for frame in scan_records(memoryview(data), start, lambda _damage: None):
        group_offset = frame.offset + RECORD_OVERHEAD
        minimum = RECORD_OVERHEAD + GROUP_HEADER_SIZE + GROUP_RAW_SIZE.size
        if frame.record_type == REC_GROUP and frame.size >= minimum:
            flags, _count = GROUP_HEADER.unpack_from(data, group_offset)
            if flags == GROUP_FLAG_ZSTD:
                (raw_size,) = GROUP_RAW_SIZE.unpack_from(data, group_offset + GROUP_HEADER_SIZE)
                if raw_size <= MAX_RECORD_SIZE:
                    largest = max(largest, raw_size)
    return largest


def decode_within_memory_bound(data: bytes, start: int) -> None:
    """decode_segment, asserting its peak allocation stays bounded."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    try:
        decode_segment(data, start)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    bound = 8 * len(data) + declared_group_size(data, start) + MEMORY_SLACK
    assert peak - before <= bound, f"decoding {len(data)} bytes allocated {peak - before} bytes"


# =========================================================================== byte builders
def frame_bytes(record_type: int, seq: int, body: bytes) -> bytes:
    """A record with a correct CRC around any type and body (no validation)."""
    head = FRAME_HEADER.pack(0, SEQ_SIZE + len(body), record_type)[4:] + SEQ.pack(seq)
    return struct.pack("<I", crc32c(head + body)) + head + body


def op_bytes(op_type: int, body: bytes, good_crc: bool) -> bytes:
    head = GROUP_OP.pack(0, op_type, len(body))[4:]
    crc = crc32c(head + body) ^ (0 if good_crc else 1)
    return struct.pack("<I", crc) + head + body


def zstd_frame(raw: bytes, content_size: int | None, with_size: bool) -> bytes:
    """A zstd frame of ``raw``; with ``content_size`` its header claims that size."""
    if content_size is None:
        return zstandard.ZstdCompressor(level=1, write_content_size=with_size).compress(raw)
    plain = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(raw)
    # header: magic, descriptor 0x00 (window descriptor follows), window descriptor.
    # Descriptor 0xC0 adds an 8-byte content size after the window descriptor.
    assert plain[4] == 0x00, plain[:8].hex()
    return plain[:4] + b"\xc0" + plain[5:6] + struct.pack("<Q", content_size) + plain[6:]


def refresh_checksums(data: bytearray, start: int) -> None:
    """Recompute the CRC of every frame (and uncompressed group op) that still fits."""
    offset = start
    while offset + FRAME_HEADER_SIZE <= len(data):
        _crc, length, record_type = FRAME_HEADER.unpack_from(data, offset)
        end = offset + FRAME_HEADER_SIZE + length
        if length < SEQ_SIZE or end > len(data):
            return
        if record_type == REC_GROUP and length >= SEQ_SIZE + GROUP_HEADER_SIZE:
            flags, _count = GROUP_HEADER.unpack_from(data, offset + RECORD_OVERHEAD)
            pos = offset + RECORD_OVERHEAD + GROUP_HEADER_SIZE
            while not flags & GROUP_FLAG_ZSTD and pos + GROUP_OP_SIZE <= end:
                _op_crc, _op_type, op_len = GROUP_OP.unpack_from(data, pos)
                body_end = pos + GROUP_OP_SIZE + op_len
                if body_end > end:
                    break
                struct.pack_into("<I", data, pos, crc32c(data[pos + 4 : body_end]))
                pos = body_end
        struct.pack_into("<I", data, offset, crc32c(data[offset + 4 : end]))
        offset = end


# =========================================================================== strategies
SAMPLE_VALUES = [
    encode_value(v)
    for v in (None, True, False, 0, -(2**65), 1.5, "s\u00e9", "\ud800", b"b", bytearray(b"x"), [1])
]
record_types = st.sampled_from(sorted(RECORD_TYPES)) | st.integers(0, 255)
op_types = st.sampled_from(sorted(RECORD_TYPES)) | st.integers(0, 255)
names = st.one_of(
    st.text(max_size=8).map(encode_name),
    st.sampled_from(["", "a", "a/b", "child/grand"]).map(encode_name),
    st.binary(max_size=10).map(lambda raw: NAME_LEN.pack(len(raw)) + raw),
    st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=10)).map(
        lambda t: NAME_LEN.pack(t[0]) + t[1]
    ),
    st.binary(max_size=1),
)
values = st.sampled_from(SAMPLE_VALUES) | st.binary(max_size=16)
bodies = st.one_of(
    st.tuples(names, names, values).map(b"".join),  # set
    st.tuples(names, names).map(b"".join),  # delete
    names,  # clear, create, drop
    values,  # checkpoint
    st.tuples(names, names, values, st.binary(max_size=4)).map(b"".join),
    st.binary(max_size=24),
)


nonempty_values = values.filter(bool)
ns_names = st.text(max_size=6).map(encode_name)
sub_names = st.text(min_size=1, max_size=6).map(encode_name)  # keys, sub-storages
well_formed_ops = st.one_of(
    st.tuples(st.just(REC_SET), st.tuples(ns_names, sub_names, nonempty_values).map(b"".join)),
    st.tuples(st.just(REC_DELETE), st.tuples(ns_names, sub_names).map(b"".join)),
    st.tuples(st.just(REC_CLEAR), ns_names),
    st.tuples(st.sampled_from([REC_CREATE_NS, REC_DROP_NS]), sub_names),
    st.tuples(st.just(REC_CHECKPOINT), nonempty_values),
)
any_ops = well_formed_ops | st.tuples(op_types, bodies)


@st.composite
def group_bodies(draw: st.DrawFn) -> bytes:
    """Group bodies: right or wrong counts, flags, op checksums, zstd frames and sizes."""
    ops = draw(st.lists(any_ops, max_size=6))
    bad_crcs = draw(st.sets(st.integers(0, 5), max_size=1))
    raw = b"".join(op_bytes(t, body, good_crc=i not in bad_crcs) for i, (t, body) in enumerate(ops))
    if draw(st.booleans()):  # well-formed but for the ops themselves
        if not draw(st.booleans()):
            return GROUP_HEADER.pack(0, len(ops)) + raw
        packed = zstd_frame(raw, None, with_size=draw(st.booleans()))
        return GROUP_HEADER.pack(GROUP_FLAG_ZSTD, len(ops)) + GROUP_RAW_SIZE.pack(len(raw)) + packed
    count = draw(st.just(len(ops)) | st.integers(0, 2**32 - 1) | st.integers(0, 8))
    flags = draw(st.sampled_from([0, GROUP_FLAG_ZSTD]) | st.integers(0, 255))
    if not flags & GROUP_FLAG_ZSTD:
        return GROUP_HEADER.pack(flags, count) + raw
    claimed = draw(st.none() | st.integers(0, 2**64 - 1) | st.just(len(raw)))
    packed = draw(
        st.just(zstd_frame(raw, claimed, draw(st.booleans())))
        | st.binary(max_size=32)
        | st.binary(max_size=32).map(lambda b: b"\x28\xb5\x2f\xfd" + b)
    )
    raw_size = draw(
        st.just(len(raw))
        | st.integers(0, 2 * len(raw) + 8)
        | st.sampled_from([MAX_RECORD_SIZE, MAX_RECORD_SIZE + 1, 2**32 - 1])
    )
    trailing = draw(st.binary(max_size=4))
    return GROUP_HEADER.pack(flags, count) + GROUP_RAW_SIZE.pack(raw_size) + packed + trailing


chunks = st.one_of(
    st.tuples(well_formed_ops, st.integers(0, 2**64 - 1)).map(
        lambda t: frame_bytes(t[0][0], t[1], t[0][1])
    ),
    st.tuples(record_types, st.integers(0, 2**64 - 1), bodies).map(lambda t: frame_bytes(*t)),
    st.tuples(st.just(REC_GROUP), st.integers(0, 2**64 - 1), group_bodies()).map(
        lambda t: frame_bytes(*t)
    ),
    st.binary(max_size=24),  # garbage
    st.integers(1, 40).map(bytes),  # zero-filled space
    st.tuples(st.integers(0, 2**32 - 1), record_types).map(  # a bare header, any length
        lambda t: FRAME_HEADER.pack(0, t[0], t[1])
    ),
)
segments = st.tuples(st.integers(0, 2**32 - 1), st.lists(chunks, max_size=8)).map(
    lambda t: encode_segment_header(t[0]) + b"".join(t[1])
)


class Mutation(NamedTuple):
    """One edit of a segment's bytes (positions wrap around the current length)."""

    kind: str  # flip, truncate, insert, overwrite, delete, zero, splice
    at: int
    size: int = 0  # bit number for flip; byte count for delete, zero, splice
    data: bytes = b""  # for insert and overwrite
    source: str = ""  # corpus file to splice from
    source_at: int = 0


positions = st.integers(0, 4096)
mutations = st.one_of(
    st.builds(Mutation, st.just("flip"), positions, st.integers(0, 7)),
    st.builds(Mutation, st.just("truncate"), positions),
    st.builds(Mutation, st.just("insert"), positions, data=st.binary(min_size=1, max_size=32)),
    st.builds(Mutation, st.just("overwrite"), positions, data=st.binary(min_size=1, max_size=16)),
    st.builds(Mutation, st.just("delete"), positions, st.integers(1, 64)),
    st.builds(Mutation, st.just("zero"), positions, st.integers(1, 512)),
    st.builds(
        Mutation,
        st.just("splice"),
        positions,
        st.integers(1, 256),
        source=st.sampled_from(sorted(CORPUS) or [""]),
        source_at=positions,
    ),
)


def mutate(data: bytes, steps: list[Mutation]) -> bytes:
    out = bytearray(data)
    for step in steps:
        at = step.at % (len(out) + 1)
        if step.kind == "flip" and out:
            out[at % len(out)] ^= 1 << step.size
        elif step.kind == "truncate":
            del out[at:]
        elif step.kind == "insert":
            out[at:at] = step.data
        elif step.kind == "overwrite":
            out[at : at + len(step.data)] = step.data
        elif step.kind == "delete":
            del out[at : at + step.size]
        elif step.kind == "zero":
            out[at : at + step.size] = bytes(len(out[at : at + step.size]))
        elif step.kind == "splice":
            source = CORPUS.get(step.source, b"")
            source_at = step.source_at % (len(source) + 1)
            out[at:at] = source[source_at : source_at + step.size]
    return bytes(out)


# =========================================================================== tests
def test_corpus_segments_are_clean_and_cover_every_record_type() -> None:
    assert len(CORPUS) >= 4, f"seed corpus missing in {CORPUS_DIR}"
    seen_types: set[int] = set()
    group_kinds: set[int] = set()
    read_kinds: set[str] = set()
    for name, data in CORPUS.items():
        assert decode_segment_header(data) == 1, name
        damages: list[Damage] = []
        keydir = Keydir(SEGMENT_PATH)
        for frame in scan_records(data, SEGMENT_HEADER_SIZE, damages.append):
            seen_types.add(frame.record_type)
            read_kinds |= replay(keydir, data, frame)  # a clean segment: no CorruptionError
            kind, ops = replay_frame(data, frame.offset, frame.size, frame.record_type)
            if frame.record_type == REC_GROUP:
                group_kinds.add(kind)
            seen_types.update(op[0] for op in ops)
        assert damages == [], (name, damages)
    assert seen_types == set(RECORD_TYPES)
    assert group_kinds == {FRAME_GROUP, FRAME_COMPRESSED_GROUP}
    assert read_kinds == {"record", "group op", "compressed"}


@FUZZ
@given(
    st.binary(max_size=48)
    | st.binary(max_size=40).map(lambda b: SEGMENT_MAGIC + b)
    | st.tuples(st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1), st.integers(0, 2**64 - 1))
    .map(lambda t: SEGMENT_HEADER.pack(SEGMENT_MAGIC, *t, 0)[:-4])
    .map(lambda head: head + struct.pack("<I", crc32c(head)))
)
@example(b"")
@example(encode_segment_header(7)[:-1])
def test_any_bytes_as_a_segment_header_decode_or_raise_corruption(data: bytes) -> None:
    try:
        number = decode_segment_header(data)
    except CorruptionError:
        return
    assert data[:8] == SEGMENT_MAGIC
    assert 0 <= number < 2**64


@FUZZ
@given(st.binary(max_size=512))
@example(bytes(64))
@example(b"\xff" * 64)
def test_scanning_arbitrary_bytes_raises_only_corruption(data: bytes) -> None:
    decode_within_memory_bound(data, 0)


@FUZZ
@given(segments)
def test_records_with_correct_checksums_around_any_body_raise_only_corruption(
    data: bytes,
) -> None:
    decode_within_memory_bound(data, SEGMENT_HEADER_SIZE)


@FUZZ
@given(
    st.sampled_from(sorted(CORPUS) or [""]),
    st.lists(mutations, min_size=1, max_size=6),
    st.booleans(),
)
def test_mutated_real_segments_raise_only_corruption(
    seed: str, steps: list[Mutation], recompute: bool
) -> None:
    data = mutate(CORPUS.get(seed, b""), steps)
    if recompute:
        fixed = bytearray(data)
        refresh_checksums(fixed, SEGMENT_HEADER_SIZE)
        data = bytes(fixed)
    decode_within_memory_bound(data, SEGMENT_HEADER_SIZE)


@FUZZ
@given(
    st.binary(max_size=64)
    | st.tuples(st.integers(0, 12), st.binary(max_size=24)).map(lambda t: bytes([t[0]]) + t[1])
    | st.sampled_from(SAMPLE_VALUES).map(lambda b: b[:1] + b[1:][::-1])
)
@example(b"\x09\x80\x05garbage")
def test_decode_value_without_pickle_raises_only_corruption_or_refuses(data: bytes) -> None:
    with contextlib.suppress(CorruptionError, PickleNotAllowedError):
        decode_value(data, allow_pickle=False)
