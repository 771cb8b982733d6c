"""Recovery scenarios: what open does with torn tails, bit flips and missing segments.

Each test builds a small store through the public API, damages its files the
way a crash or a failing disk would, reopens it and compares the result with
a model of the operations that must have survived. The rule checked
throughout: a torn tail of the newest segment is cut (after copying it aside);
any other damage raises CorruptionError in strict mode and is moved aside in
salvage mode; a value is never returned wrong.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from logstate import CorruptionError, LocalFileStorage, UnsupportedFormatError
from logstate import _format as fmt
from logstate._crc import crc32c
from logstate._engine import Engine
from logstate._scan import Damage, Frame, scan_records
from tests.helpers import State, observed_state

# ============================================================================ model

Op = tuple[Any, ...]


def apply_model(state: State, op: Op) -> None:
    """Apply one operation to the model (mirrors what replaying its record does)."""
    kind = op[0]
    if kind == "set":
        _, ns, key, value = op
        _ensure(state, ns)[key] = value
    elif kind == "remove":
        _, ns, key = op
        state.get(ns, {}).pop(key, None)
    elif kind == "create":
        _ensure(state, op[1])
    elif kind == "clear":
        ns = op[1]
        for name in [n for n in state if n.startswith(ns + "/") or (not ns and n)]:
            del state[name]
        if ns in state:
            state[ns].clear()
    elif kind == "drop":
        ns = op[1]
        for name in [n for n in state if n == ns or n.startswith(ns + "/")]:
            del state[name]
    elif kind == "group":
        for inner in op[1]:
            apply_model(state, inner)
    else:  # pragma: no cover - a typo in a test
        raise AssertionError(kind)


def _ensure(state: State, ns: str) -> dict[str, Any]:
    parts = ns.split("/") if ns else []
    for i in range(len(parts) + 1):
        state.setdefault("/".join(parts[:i]), {})
    return state[ns]


def model_of(ops: list[Op]) -> State:
    state: State = {"": {}}
    for op in ops:
        apply_model(state, op)
    return state


def handle_for(root: LocalFileStorage, ns: str) -> LocalFileStorage:
    handle = root
    for part in ns.split("/") if ns else []:
        handle = handle.get_or_create_sub_storage(part)
    return handle


def perform(root: LocalFileStorage, op: Op) -> None:
    """Apply one operation to a real storage (exactly one record per call)."""
    kind = op[0]
    if kind == "set":
        handle_for(root, op[1])[op[2]] = op[3]
    elif kind == "remove":
        handle_for(root, op[1]).remove(op[2])
    elif kind == "create":
        parent, _, name = op[1].rpartition("/")
        handle_for(root, parent).get_or_create_sub_storage(name)
    elif kind == "clear":
        handle_for(root, op[1]).clear()
    elif kind == "drop":
        parent, _, name = op[1].rpartition("/")
        handle_for(root, parent).delete_sub_storage(name)
    elif kind == "group":
        with root.batch() as batch:
            for inner in op[1]:
                assert inner[1] == ""
                if inner[0] == "set":
                    batch.set(inner[2], inner[3])
                else:
                    batch.remove(inner[2])
    else:  # pragma: no cover
        raise AssertionError(kind)


# Every record kind: set, set in a sub-storage, create, delete, group, clear, drop.
SMALL_STORE_OPS: list[Op] = [
    ("set", "", "alpha", 1),
    ("set", "", "beta", "two" * 3),
    ("create", "sub"),
    ("set", "sub", "gamma", b"\x00\x01" * 5),
    ("remove", "", "alpha"),
    ("group", [("set", "", "delta", 4.5), ("set", "", "eps", {"x": [1]}), ("remove", "", "beta")]),
    ("set", "", "alpha", None),
    ("clear", "sub"),
    ("create", "doomed"),
    ("set", "doomed", "eta", -(10**30)),
    ("drop", "doomed"),
    ("set", "", "zeta", True),
]


@dataclass
class BuiltStore:
    directory: Path
    segment: Path  # the newest segment
    data: bytes  # its bytes after the last operation
    ends: list[int]  # end offset of each operation's record in the newest segment
    ops: list[Op]


def build_store(directory: Path, ops: list[Op], **options: Any) -> BuiltStore:
    """Perform ``ops`` (one record each) and note where each record ends."""
    options.setdefault("sync", "none")
    ends = []
    with LocalFileStorage(directory, **options) as s:
        for op in ops:
            perform(s, op)
            ends.append(newest_segment(directory).stat().st_size)
    segment = newest_segment(directory)
    return BuiltStore(directory, segment, segment.read_bytes(), ends, ops)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.seg"))


def newest_segment(directory: Path) -> Path:
    return segments(directory)[-1]


def frames(data: bytes) -> list[Frame]:
    """The valid records of a segment's bytes (asserting there is no damage)."""
    damage: list[Damage] = []
    found = list(scan_records(data, fmt.SEGMENT_HEADER_SIZE, damage.append))
    assert not damage
    return found


def key_of(data: bytes, frame: Frame) -> str:
    op = fmt.decode_op(
        frame.record_type, data, frame.offset + fmt.RECORD_OVERHEAD, frame.offset + frame.size
    )
    return op.key


def copy_store(src: Path, dst: Path) -> None:
    dst.mkdir(mode=0o700)
    for path in src.iterdir():
        if path.name != "LOCK":
            (dst / path.name).write_bytes(path.read_bytes())


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def aside_files(directory: Path, suffix: str) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(suffix))


def engine_of(storage: LocalFileStorage) -> Engine:
    return storage._engine


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltStore]:
    built = build_store(tmp_path_factory.mktemp("small") / "store", SMALL_STORE_OPS)
    assert len(segments(built.directory)) == 1
    assert [f.offset + f.size for f in frames(built.data)] == built.ends
    yield built


# ============================================================================ torn tails


def test_truncating_the_newest_segment_at_every_offset_keeps_exactly_the_whole_records(
    small_store: BuiltStore, tmp_path: Path
) -> None:
    data = small_store.data
    for cut in range(len(data) + 1):
        directory = tmp_path / f"cut{cut}"
        copy_store(small_store.directory, directory)
        segment = directory / small_store.segment.name
        segment.write_bytes(data[:cut])
        whole = sum(1 for end in small_store.ends if end <= cut)
        valid_end = small_store.ends[whole - 1] if whole else fmt.SEGMENT_HEADER_SIZE
        expected = model_of(small_store.ops[:whole])

        with LocalFileStorage(directory, sync="none") as s:
            s._check()
            assert observed_state(s) == expected, f"cut at {cut}"
            report = engine_of(s).report
            torn = aside_files(directory, ".torn")
            if cut < fmt.SEGMENT_HEADER_SIZE:
                # the header itself was torn: the segment is started afresh
                assert [t.read_bytes() for t in torn] == [data[:cut]], cut
                assert report.torn_tails[0][1:3] == (0, cut)
            elif cut > valid_end:
                assert [t.read_bytes() for t in torn] == [data[valid_end:cut]], cut
                assert [r[:3] for r in report.torn_tails] == [
                    (str(segment.resolve()), valid_end, cut - valid_end)
                ]
                assert report.torn_tails[0][3] == str(torn[0].resolve())
            else:
                assert torn == [] and report.clean, cut
            # never append after bytes that were not validated
            assert segment.stat().st_size == valid_end, cut
            s["after"] = cut
            assert segment.stat().st_size > valid_end
            assert segment.read_bytes()[:valid_end] == data[:valid_end]

        with LocalFileStorage(directory, sync="none") as s:
            s._check()
            assert engine_of(s).report.clean
            expected[""]["after"] = cut
            assert observed_state(s) == expected, f"cut at {cut}, after appending"


@pytest.mark.parametrize("size", [1, 4, 8, 9, 16, 17, 100, 4095, 4096])
@pytest.mark.parametrize("fill", ["zeros", "garbage"])
def test_zero_filled_or_garbage_tail_is_cut_and_reported(
    small_store: BuiltStore, tmp_path: Path, size: int, fill: str
) -> None:
    directory = tmp_path / "store"
    copy_store(small_store.directory, directory)
    segment = directory / small_store.segment.name
    tail = bytes(size) if fill == "zeros" else random.Random(size).randbytes(size)
    segment.write_bytes(small_store.data + tail)

    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        assert observed_state(s) == model_of(small_store.ops)
        report = engine_of(s).report
        (torn,) = aside_files(directory, ".torn")
        assert report.torn_tails == [
            (str(segment.resolve()), len(small_store.data), size, str(torn.resolve()))
        ]
        assert torn.read_bytes() == tail
        assert segment.read_bytes() == small_store.data
        s["more"] = 1
    with LocalFileStorage(directory, sync="none") as s:
        assert engine_of(s).report.clean
        assert s["more"] == 1 and s["zeta"] is True


def test_a_second_torn_tail_at_the_same_offset_keeps_the_first_copy(
    small_store: BuiltStore, tmp_path: Path
) -> None:
    directory = tmp_path / "store"
    copy_store(small_store.directory, directory)
    segment = directory / small_store.segment.name
    copies = []
    for tail in (b"first torn write", b"second torn write"):
        segment.write_bytes(small_store.data + tail)
        with LocalFileStorage(directory, sync="none") as s:
            report = engine_of(s).report
            assert [r[1:3] for r in report.torn_tails] == [(len(small_store.data), len(tail))]
            copies.append(Path(report.torn_tails[0][3]))
    assert copies[0] != copies[1]
    assert [c.read_bytes() for c in copies] == [b"first torn write", b"second torn write"]


def test_tail_that_looks_like_a_huge_record_header_is_cut(
    small_store: BuiltStore, tmp_path: Path
) -> None:
    directory = tmp_path / "store"
    copy_store(small_store.directory, directory)
    segment = directory / small_store.segment.name
    tail = fmt.FRAME_HEADER.pack(0x12345678, 1 << 29, fmt.REC_SET) + b"partial"
    segment.write_bytes(small_store.data + tail)
    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        assert observed_state(s) == model_of(small_store.ops)
        assert len(engine_of(s).report.torn_tails) == 1


def test_bit_flip_in_the_last_record_is_treated_as_a_torn_tail(
    small_store: BuiltStore, tmp_path: Path
) -> None:
    directory = tmp_path / "store"
    copy_store(small_store.directory, directory)
    segment = directory / small_store.segment.name
    flip_bit(segment, small_store.ends[-1] - 1)
    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        assert observed_state(s) == model_of(small_store.ops[:-1])
        (torn,) = aside_files(directory, ".torn")
        assert len(torn.read_bytes()) == small_store.ends[-1] - small_store.ends[-2]


def build_multi_segment_store(directory: Path, count: int = 60) -> dict[str, str]:
    """A store of ``count`` distinct keys over several 4 KiB segments."""
    items = {f"key{i:03d}": f"value {i} " + "v" * 150 for i in range(count)}
    with LocalFileStorage(directory, sync="none", segment_size=4096) as s:
        for key, value in items.items():
            s[key] = value
    assert len(segments(directory)) >= 3
    return items


@pytest.mark.parametrize("length", [0, 1, 10, 23])
def test_torn_header_of_the_newest_segment_is_repaired(tmp_path: Path, length: int) -> None:
    directory = tmp_path / "store"
    items = build_multi_segment_store(directory)
    newest = newest_segment(directory)
    lost = {key_of(newest.read_bytes(), f) for f in frames(newest.read_bytes())}
    original = newest.read_bytes()
    newest.write_bytes(original[:length])

    with LocalFileStorage(directory, sync="none", segment_size=4096) as s:
        s._check()
        assert dict(s.items()) == {k: v for k, v in items.items() if k not in lost}
        assert newest.read_bytes() == fmt.encode_segment_header(len(segments(directory)))
        assert [t.read_bytes() for t in aside_files(directory, ".torn")] == [original[:length]]
        s["new"] = "after repair"
    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        assert engine_of(s).report.clean
        assert s["new"] == "after repair"


@pytest.mark.parametrize("size", [24, 4096])
def test_zero_filled_newest_segment_is_repaired(tmp_path: Path, size: int) -> None:
    directory = tmp_path / "store"
    items = build_multi_segment_store(directory)
    newest = newest_segment(directory)
    lost = {key_of(newest.read_bytes(), f) for f in frames(newest.read_bytes())}
    newest.write_bytes(bytes(size))  # the file system kept the size, not the data

    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        assert dict(s.items()) == {k: v for k, v in items.items() if k not in lost}
        assert newest.stat().st_size == fmt.SEGMENT_HEADER_SIZE
        assert [t.read_bytes() for t in aside_files(directory, ".torn")] == [bytes(size)]


def test_zeroed_header_followed_by_valid_records_is_refused_not_cut(tmp_path: Path) -> None:
    # The header is durable before any record is appended, so valid records
    # after a zeroed header are not a torn write: cutting them would silently
    # drop acknowledged data. Strict refuses; salvage repairs the header.
    directory = tmp_path / "store"
    items = build_multi_segment_store(directory)
    newest = newest_segment(directory)
    data = newest.read_bytes()
    assert frames(data)  # the newest segment holds records
    damaged = bytes(fmt.SEGMENT_HEADER_SIZE) + data[fmt.SEGMENT_HEADER_SIZE :]
    newest.write_bytes(damaged)
    with pytest.raises(CorruptionError) as info:
        LocalFileStorage(directory, sync="none", use_snapshot=False)
    assert info.value.path == str(newest.resolve())
    assert info.value.offset == 0
    assert "salvage" in str(info.value)
    assert newest.read_bytes() == damaged
    assert aside_files(directory, ".torn") == []

    with LocalFileStorage(directory, sync="none", recovery="salvage") as s:
        s._check()
        assert dict(s.items()) == items  # every record kept
    assert newest.read_bytes() == data  # a fresh header, the same records
    (aside,) = aside_files(directory, ".damaged")
    assert aside.read_bytes() == bytes(fmt.SEGMENT_HEADER_SIZE)
    with LocalFileStorage(directory, sync="none") as s:  # strict again
        assert dict(s.items()) == items


def test_segment_of_an_unknown_format_version_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    build_store(directory, SMALL_STORE_OPS[:2])
    segment = newest_segment(directory)
    data = segment.read_bytes()
    head = fmt.SEGMENT_HEADER.pack(fmt.SEGMENT_MAGIC, fmt.FORMAT_VERSION + 1, 0, 1, 0)[:-4]
    header = head + crc32c(head).to_bytes(4, "little")
    segment.write_bytes(header + data[fmt.SEGMENT_HEADER_SIZE :])
    for recovery in ("strict", "salvage"):
        with pytest.raises(UnsupportedFormatError) as info:
            LocalFileStorage(directory, sync="none", recovery=recovery)
        assert info.value.path == str(segment.resolve())
        assert "version" in info.value.reason
    assert segment.read_bytes() == header + data[fmt.SEGMENT_HEADER_SIZE :]  # untouched


# ============================================================================ damage in the middle


# positions inside a record: crc, length, type, seq, body start, middle, last byte
def flip_positions(size: int) -> list[int]:
    return sorted({0, 4, 8, 9, fmt.RECORD_OVERHEAD, size // 2, size - 1})


@pytest.mark.parametrize("victim", range(len(SMALL_STORE_OPS) - 1))
def test_bit_flip_in_the_middle_of_the_log_raises_in_strict_and_is_moved_aside_in_salvage(
    small_store: BuiltStore, tmp_path: Path, victim: int
) -> None:
    start = small_store.ends[victim - 1] if victim else fmt.SEGMENT_HEADER_SIZE
    size = small_store.ends[victim] - start
    survivors = small_store.ops[:victim] + small_store.ops[victim + 1 :]
    for position in flip_positions(size):
        directory = tmp_path / f"flip{position}"
        copy_store(small_store.directory, directory)
        segment = directory / small_store.segment.name
        flip_bit(segment, start + position, bit=position % 8)
        damaged = segment.read_bytes()

        with pytest.raises(CorruptionError) as info:
            LocalFileStorage(directory, sync="none")
        assert info.value.path == str(segment.resolve())
        assert info.value.offset == start
        assert segment.read_bytes() == damaged  # strict changes nothing
        assert aside_files(directory, ".damaged") == []

        with LocalFileStorage(directory, sync="none", recovery="salvage") as s:
            s._check()
            assert observed_state(s) == model_of(survivors), position
            report = engine_of(s).report
            assert [r[:3] for r in report.salvaged] == [(str(segment.resolve()), start, size)]
            (aside,) = aside_files(directory, ".damaged")
            assert aside.read_bytes() == damaged[start : start + size]
            assert segment.read_bytes() == damaged[:start] + damaged[start + size :]
            s["after"] = position
        with LocalFileStorage(directory, sync="none") as s:  # strict is happy again
            s._check()
            assert engine_of(s).report.clean
            assert s["after"] == position


def test_damage_in_the_middle_and_a_torn_tail_are_both_handled_by_salvage(
    small_store: BuiltStore, tmp_path: Path
) -> None:
    directory = tmp_path / "store"
    copy_store(small_store.directory, directory)
    segment = directory / small_store.segment.name
    flip_bit(segment, small_store.ends[0] + 3)  # record 1 of 9
    segment.write_bytes(segment.read_bytes()[: small_store.ends[-1] - 2])  # last one torn
    with LocalFileStorage(directory, sync="none", recovery="salvage") as s:
        s._check()
        assert observed_state(s) == model_of(small_store.ops[:1] + small_store.ops[2:-1])
        s["after"] = 1
    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        assert s["after"] == 1


@pytest.mark.parametrize("where", ["middle", "last"])
def test_bit_flip_in_a_sealed_segment_raises_in_strict_and_salvage_keeps_the_rest(
    tmp_path: Path, where: str
) -> None:
    directory = tmp_path / "store"
    items = build_multi_segment_store(directory)
    first = segments(directory)[0]
    data = first.read_bytes()
    found = frames(data)
    victim = found[len(found) // 2] if where == "middle" else found[-1]
    flip_bit(first, victim.offset + victim.size // 2)

    with pytest.raises(CorruptionError) as info:
        LocalFileStorage(directory, sync="none")
    assert info.value.path == str(first.resolve())
    assert info.value.offset == victim.offset

    with LocalFileStorage(directory, sync="none", recovery="salvage") as s:
        s._check()
        lost = key_of(data, victim)
        assert dict(s.items()) == {k: v for k, v in items.items() if k != lost}
        assert len(aside_files(directory, ".damaged")) == 1
    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        assert len(s) == len(items) - 1


def test_missing_middle_segment_raises_naming_it_and_salvage_continues(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    items = build_multi_segment_store(directory)
    second = segments(directory)[1]
    data = second.read_bytes()
    lost = {key_of(data, f) for f in frames(data)}
    second.unlink()

    with pytest.raises(CorruptionError) as info:
        LocalFileStorage(directory, sync="none")
    assert info.value.path == str(second.resolve())
    assert "missing" in info.value.reason

    with LocalFileStorage(directory, sync="none", recovery="salvage") as s:
        s._check()
        assert engine_of(s).report.missing_segments == [2]
        assert dict(s.items()) == {k: v for k, v in items.items() if k not in lost}
        s["after"] = 1
        assert s["after"] == 1
    # salvage left an empty segment in the gap: the loss is accepted once
    assert second.exists()
    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        assert engine_of(s).report.clean
        assert s["after"] == 1


# ============================================================================ damage after open


def test_bit_flip_after_open_is_detected_at_get_time(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    with LocalFileStorage(directory, sync="none", compress_min_size=1024) as s:
        s["plain"] = "PLAIN-MARKER" * 4
        with s.batch() as b:  # small: an uncompressed group
            b["grouped"] = "GROUP-MARKER" * 4
            b["other"] = 1
        with s.batch() as b:  # large: a compressed group
            b["packed"] = "P" * 4000
            b["packed2"] = "Q" * 4000
        s["intact"] = "fine"
        segment = newest_segment(directory)
        data = segment.read_bytes()
        compressed = [f for f in frames(data) if f.record_type == fmt.REC_GROUP][-1]
        targets = {
            "plain": data.index(b"PLAIN-MARKER") + 5,
            "grouped": data.index(b"GROUP-MARKER") + 5,
            "packed": compressed.offset + compressed.size - 3,
        }
        fd = os.open(segment, os.O_RDWR)
        try:
            for key, offset in targets.items():
                (byte,) = os.pread(fd, 1, offset)
                os.pwrite(fd, bytes([byte ^ 0x10]), offset)
                with pytest.raises(CorruptionError) as info:
                    s.get(key)
                assert info.value.path == str(segment.resolve())
                assert info.value.offset <= offset
                os.pwrite(fd, bytes([byte]), offset)  # repair for the next case
                assert s.get(key) is not None
        finally:
            os.close(fd)
        assert s["intact"] == "fine"
        assert s["packed2"] == "Q" * 4000


def test_damage_after_open_never_returns_another_keys_value(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    with LocalFileStorage(directory, sync="none") as s:
        s["a"] = "value of a"
        s["b"] = "value of b"
        segment = newest_segment(directory)
        found = frames(segment.read_bytes())
        # overwrite a's record with b's (same length, valid CRC): a bad index pointer
        data = segment.read_bytes()
        record_b = data[found[1].offset : found[1].offset + found[1].size]
        assert found[0].size == found[1].size
        fd = os.open(segment, os.O_RDWR)
        try:
            os.pwrite(fd, record_b, found[0].offset)
        finally:
            os.close(fd)
        with pytest.raises(CorruptionError):
            s["a"]
        assert s["b"] == "value of b"


# ============================================================================ recovery="prefix"


def test_prefix_recovery_keeps_the_records_before_the_first_damage_of_the_newest_segment(
    tmp_path: Path,
) -> None:
    """A power loss with sync="interval" can persist unsynced pages out of order:
    a hole followed by later records. "prefix" keeps a prefix of the history."""
    directory = tmp_path / "store"
    with LocalFileStorage(directory, sync="none", use_snapshot=False) as s:
        for i in range(10):
            s[f"k{i}"] = i
        s.remove("k1")
    segment = segments(directory)[-1]
    data = bytearray(segment.read_bytes())
    records = list(frames(bytes(data)))
    victim = records[4]  # k4's record; k5.. and the delete of k1 follow it
    data[victim.offset + 12] ^= 0x40
    segment.write_bytes(bytes(data))

    with pytest.raises(CorruptionError) as info:
        LocalFileStorage(directory)
    assert info.value.offset == victim.offset and "prefix" in str(info.value)

    with LocalFileStorage(directory, recovery="prefix") as s:
        s._check()
        assert {k: s[k] for k in s} == {"k0": 0, "k1": 1, "k2": 2, "k3": 3}
        (torn,) = engine_of(s).report.torn_tails
        assert torn[1] == victim.offset and torn[2] == len(data) - victim.offset
        assert Path(torn[3]).read_bytes() == bytes(data[victim.offset :])
        s["new"] = 1
    with LocalFileStorage(directory) as s:  # strict again: the log is clean now
        assert s["new"] == 1 and "k4" not in s


def test_prefix_recovery_still_refuses_damage_in_a_sealed_segment(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    build_multi_segment_store(directory)
    first = segments(directory)[0]
    data = bytearray(first.read_bytes())
    middle = list(frames(bytes(data)))[1]
    data[middle.offset + 12] ^= 0x01
    first.write_bytes(bytes(data))
    with pytest.raises(CorruptionError) as info:
        LocalFileStorage(directory, recovery="prefix", use_snapshot=False)
    assert info.value.path == str(first.resolve())
