"""The C scan of an open without a snapshot gives the pure replay's index, exactly.

``csrc/scan.c``'s ``replay_records`` applies the common records of a segment
(valid plain sets and deletes, uncompressed groups of them) and hands every
other record, and all damage, back to the Python replay. Checked here:

- its copies of the layout constants equal ``_format``'s and ``_location``'s;
- record by record, it applies what ``Keydir.apply_frame`` applies (the same
  location ints, live bytes, seq), and stops, having applied nothing of it, at
  each kind of record it does not handle;
- differential (hypothesis): random segments (valid records, groups, namespace
  records, checkpoints, expiring values, compressed groups and overwrites of
  their keys, non-ASCII keys and keys that are not UTF-8, damage, torn
  tails) opened in every recovery mode through the C path and through the pure
  path give equal indexes, seq, live bytes, reports, files and errors;
- a changed limit (a test's monkeypatch) and an index that watches expiry keep
  the Python path.

These tests need the C path: they fail when it is not in use, unless
``LOGSTATE_PURE=1`` asks for pure Python (then they are skipped).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logstate
from logstate import CorruptionError, LocalFileStorage, _location, _replay, _scan
from logstate import _format as fmt
from logstate._filenames import SNAPSHOT_FILE_NAME, segment_file_name
from logstate._fs import FileSystem
from logstate._keydir import Keydir
from logstate._native import EXT, PURE_REQUESTED
from logstate._options import EngineOptions
from logstate._recovery import recover
from logstate._scan import scan_records
from logstate._values import TAG_EXPIRES, encode_value, expiring_value


@pytest.fixture
def cnative() -> Any:
    """The C extension; fails when it is not in use (skips under LOGSTATE_PURE=1)."""
    if PURE_REQUESTED:
        pytest.skip("LOGSTATE_PURE=1: pure Python asked for")
    if not logstate.native or EXT is None:
        pytest.fail("the C path is not in use (logstate._cnative did not build or import)")
    return EXT


# ============================================================================ records
def name(text: str) -> bytes:
    return fmt.encode_name(text)


def set_body(ns: str, key: str, value: bytes) -> bytes:
    return name(ns) + name(key) + value


def delete_body(ns: str, key: str) -> bytes:
    return name(ns) + name(key)


def op(op_type: int, body: bytes) -> tuple[int, bytes]:
    return (op_type, body)


def group(seq: int, ops: list[tuple[int, bytes]], compress: bool = False) -> bytes:
    body = fmt.encode_group_body(ops, compress_min_size=0 if compress else None)
    return fmt.encode_record(fmt.REC_GROUP, seq, body)


def python_replay(data: bytes, start: int, keydir: Keydir, segment: int, shift: int) -> int:
    """Keydir.apply_frame over every valid record of data[start:], to the first damage."""
    damaged: list[Any] = []
    end = start
    for frame in scan_records(data, start, damaged.append):
        if damaged:
            break
        keydir.apply_frame(data, frame, segment, shift)
        end = frame.offset + frame.size
    return end


def fresh_keydir(*namespaces: str) -> Keydir:
    keydir = Keydir("test")
    for ns in namespaces:
        keydir.ensure(ns)
    return keydir


def state(keydir: Keydir) -> tuple[Any, ...]:
    return (keydir.namespaces, keydir.live_bytes, keydir.checkpoint, keydir.expiring)


# ============================================================================ constants
def test_scan_layout_copies_format_and_location_constants(cnative: Any) -> None:
    expected = {
        name: getattr(fmt, name)
        for name in (
            "FRAME_HEADER_SIZE",
            "RECORD_OVERHEAD",
            "MIN_PAYLOAD_SIZE",
            "MAX_RECORD_SIZE",
            "MAX_RECORD_TYPE",
            "REC_SET",
            "REC_DELETE",
            "REC_GROUP",
            "GROUP_HEADER_SIZE",
            "GROUP_OP_SIZE",
        )
    }
    expected["TAG_EXPIRES"] = TAG_EXPIRES
    for name in ("SEGMENT_SHIFT", "OFFSET_SHIFT", "SIZE_SHIFT", "KIND_RECORD", "KIND_GROUP_OP"):
        expected[name] = getattr(_location, name)
    assert expected == cnative.SCAN_LAYOUT


# ============================================================================ record by record
def test_plain_sets_and_deletes_give_apply_frames_locations_and_live_bytes(cnative: Any) -> None:
    records = [
        fmt.encode_record(fmt.REC_SET, 1, set_body("", "a", b"\x07one")),
        fmt.encode_record(fmt.REC_SET, 5, set_body("", "b", b"\x07two")),
        fmt.encode_record(fmt.REC_SET, 3, set_body("", "a", b"\x07three")),
        fmt.encode_record(fmt.REC_DELETE, 4, delete_body("", "b")),
        fmt.encode_record(fmt.REC_DELETE, 2, delete_body("", "never-set")),
        fmt.encode_record(fmt.REC_DELETE, 6, delete_body("absent-ns", "x")),
        fmt.encode_record(fmt.REC_SET, 7, set_body("", "é✓", b"\x07unicode")),
    ]
    data = b"pad" + b"".join(records)
    ours, theirs = fresh_keydir(), fresh_keydir()
    stop, count, seq, live = cnative.replay_records(data, 3, ours.namespaces, 9, -1000)
    assert (stop, count, seq) == (len(data), len(records), 7)
    ours.live_bytes += live
    assert python_replay(data, 3, theirs, 9, -1000) == len(data)
    assert state(ours) == state(theirs)
    at = 3 + len(records[0]) + len(records[1]) + 1000
    assert ours.namespaces[""]["a"] == _location.pack_location(9, at, len(records[2]), 0)
    ours._check()


def test_groups_give_apply_frames_op_locations(cnative: Any) -> None:
    big = [op(fmt.REC_SET, set_body("", f"k{i}", b"\x07" + bytes(i % 7))) for i in range(300)]
    data = b"".join(
        [
            group(1, [op(fmt.REC_SET, set_body("", "a", b"\x07x")), op(2, delete_body("", "a"))]),
            group(2, [op(fmt.REC_SET, set_body("s", "a", b"\x07y"))]),
            group(3, []),
            group(4, big),  # more ops than the C scanner's stack room
            group(5, [op(fmt.REC_DELETE, delete_body("", f"k{i}")) for i in range(0, 300, 3)]),
        ]
    )
    ours, theirs = fresh_keydir("s"), fresh_keydir("s")
    stop, count, seq, live = cnative.replay_records(data, 0, ours.namespaces, 2, 0)
    assert (stop, count, seq) == (len(data), 5, 5)
    ours.live_bytes += live
    python_replay(data, 0, theirs, 2, 0)
    assert state(ours) == state(theirs)
    ours._check()


def test_locations_past_one_gib_into_a_segment_are_exact(cnative: Any) -> None:
    data = fmt.encode_record(fmt.REC_SET, 1, set_body("", "far", b"\x07v")) + group(
        2, [op(fmt.REC_SET, set_body("", "op", b"\x07w"))]
    )
    for shift in (-(1 << 30), -(1 << 39) + 4096, -(3 << 33)):
        ours, theirs = fresh_keydir(), fresh_keydir()
        assert cnative.replay_records(data, 0, ours.namespaces, 70000, shift)[1] == 2
        python_replay(data, 0, theirs, 70000, shift)
        assert ours.namespaces == theirs.namespaces


def test_an_index_that_is_not_a_dict_is_updated_through_the_mapping_protocol(
    cnative: Any,
) -> None:
    class Mapping(dict[str, Any]):  # not an exact dict: the generic protocol
        pass

    data = b"".join(
        [
            fmt.encode_record(fmt.REC_SET, 1, set_body("", "a", b"\x07one")),
            fmt.encode_record(fmt.REC_SET, 2, set_body("", "a", b"\x07two")),
            fmt.encode_record(fmt.REC_DELETE, 3, delete_body("", "a")),
            fmt.encode_record(fmt.REC_DELETE, 4, delete_body("", "zz")),
            fmt.encode_record(fmt.REC_SET, 5, set_body("", "b", b"\x07three")),
        ]
    )
    namespaces: dict[str, Any] = {"": Mapping()}
    stop, count, _seq, live = cnative.replay_records(data, 0, namespaces, 1, 0)
    theirs = fresh_keydir()
    python_replay(data, 0, theirs, 1, 0)
    assert (stop, count, live) == (len(data), 5, theirs.live_bytes)
    assert type(namespaces[""]) is Mapping and dict(namespaces[""]) == theirs.namespaces[""]


HANDED_BACK = {
    "checksum": fmt.encode_record(fmt.REC_SET, 9, set_body("", "k", b"\x07v"))[:-1] + b"?",
    "torn": fmt.encode_record(fmt.REC_SET, 9, set_body("", "k", b"\x07v"))[:-2],
    "zeros": bytes(40),
    "create": fmt.encode_record(fmt.REC_CREATE_NS, 9, name("s")),
    "clear": fmt.encode_record(fmt.REC_CLEAR, 9, name("")),
    "drop": fmt.encode_record(fmt.REC_DROP_NS, 9, name("t")),
    "checkpoint": fmt.encode_record(fmt.REC_CHECKPOINT, 9, b"\x07cp"),
    "compacted": fmt.encode_compacted_record(9, 1),
    "compressed": group(9, [op(fmt.REC_SET, set_body("", "k", b"\x07" + b"v" * 200))], True),
    "expiring": fmt.encode_record(
        fmt.REC_SET, 9, set_body("", "k", expiring_value(encode_value(1), 5.0, 1.0))
    ),
    "new namespace": fmt.encode_record(fmt.REC_SET, 9, set_body("new", "k", b"\x07v")),
    "bad utf-8 key": fmt.encode_record(fmt.REC_SET, 9, name("") + b"\x01\x00\xff" + b"\x07v"),
    "bad utf-8 ns": fmt.encode_record(fmt.REC_DELETE, 9, b"\x01\x00\xff" + name("k")),
    "surrogate key": fmt.encode_record(fmt.REC_SET, 9, name("") + b"\x03\x00\xed\xa0\x80\x07"),
    "empty key": fmt.encode_record(fmt.REC_SET, 9, name("") + name("") + b"\x07v"),
    "no value": fmt.encode_record(fmt.REC_SET, 9, name("") + name("k")),
    "delete with value": fmt.encode_record(fmt.REC_DELETE, 9, name("") + name("k") + b"x"),
    "clear in group": group(
        9, [op(fmt.REC_SET, set_body("", "k", b"\x07v")), op(fmt.REC_CLEAR, name(""))]
    ),
    "group op crc": (lambda g: g[:-1] + bytes([g[-1] ^ 1]))(
        group(9, [op(fmt.REC_SET, set_body("", "k", b"\x07v"))])
    ),
    "group flags": fmt.encode_record(fmt.REC_GROUP, 9, b"\x02\x00\x00\x00\x00"),
    "group count": fmt.encode_record(fmt.REC_GROUP, 9, b"\x00\x05\x00\x00\x00"),
    "group trailing": fmt.encode_record(fmt.REC_GROUP, 9, b"\x00\x00\x00\x00\x00x"),
}


@pytest.mark.parametrize("kind", sorted(HANDED_BACK))
def test_a_record_it_does_not_handle_stops_the_c_scan_before_it(cnative: Any, kind: str) -> None:
    # the valid record after it must make a torn record look damaged, not short
    valid = fmt.encode_record(fmt.REC_SET, 1, set_body("", "before", b"\x07v"))
    after = fmt.encode_record(fmt.REC_SET, 2, set_body("", "after", b"\x07v"))
    tail = b"" if kind == "torn" else after
    data = valid + HANDED_BACK[kind] + tail
    namespaces: dict[str, Any] = {"": {}}
    stop, count, seq, live = cnative.replay_records(data, 0, namespaces, 1, 0)
    assert (stop, count, seq, live) == (len(valid), 1, 1, len(valid))
    assert list(namespaces[""]) == ["before"]


def test_an_index_that_watches_expiry_keeps_the_python_path(
    cnative: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    applied = spy_on_native(monkeypatch)
    with LocalFileStorage(tmp_path, sync="none", auto_compact=False) as store:
        for i in range(3):
            store.set(f"plain{i}", i)
        store.set("ttl", 2, ttl=1000)
        for i in range(50):
            store.set(f"k{i}", i)
    (tmp_path / SNAPSHOT_FILE_NAME).unlink()
    with LocalFileStorage(tmp_path) as store:
        assert store["k49"] == 49 and store["ttl"] == 2
    # the C scan stops at the expiring value: every record after it is Python's
    assert applied and sum(applied) <= 3


def test_a_changed_record_size_limit_keeps_the_python_path(
    cnative: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _replay.native_replay() is cnative.replay_records
    monkeypatch.setattr(_scan, "MAX_RECORD_SIZE", 64)
    assert _replay.native_replay() is None


def spy_on_native(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many records each call of the C scanner applied."""
    applied: list[int] = []
    real = _replay.NATIVE_REPLAY
    assert real is not None

    def spy(*args: Any) -> tuple[int, int, int, int]:
        result = real(*args)
        if result[1]:
            applied.append(result[1])
        return result

    monkeypatch.setattr(_replay, "NATIVE_REPLAY", spy)
    return applied


def test_an_open_without_snapshot_is_applied_by_the_c_scan(
    cnative: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with LocalFileStorage(tmp_path, sync="none", auto_compact=False, segment_size=4096) as store:
        for i in range(300):
            store.set(f"k{i}", "v" * (i % 13))
        store.get_or_create_sub_storage("sub").set("x", 1)
    (tmp_path / SNAPSHOT_FILE_NAME).unlink()
    applied = spy_on_native(monkeypatch)
    with LocalFileStorage(tmp_path) as store:
        assert (
            store["k298"] == "v" * (298 % 13) and store.get_or_create_sub_storage("sub")["x"] == 1
        )
    assert sum(applied) >= 200  # all but the first record of each segment (and window)


# ============================================================================ differential
NAMESPACES = ["", "a", "a/b"]
KEYS = st.sampled_from(["k", "k2", "é", "✓key", "x" * 40, "\U0001f600", "\x00z"])
# keys that are not valid UTF-8 (overlong, surrogate, past U+10FFFF, truncated)
BAD_KEYS = st.sampled_from(
    [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"k\xe2\x9c"]
)
VALUES = st.binary(min_size=0, max_size=30).map(lambda raw: b"\x07" + raw)


@st.composite
def records(draw: st.DrawFn, seq: int) -> bytes:
    ns = draw(st.sampled_from(NAMESPACES))
    kind = draw(
        st.sampled_from(
            ["set"] * 6
            + ["delete"] * 2
            + ["group"] * 3
            + ["create", "drop", "clear"]
            + ["checkpoint", "expiring", "compressed", "bad"]
        )
    )
    if kind == "set":
        return fmt.encode_record(fmt.REC_SET, seq, set_body(ns, draw(KEYS), draw(VALUES)))
    if kind == "delete":
        return fmt.encode_record(fmt.REC_DELETE, seq, delete_body(ns, draw(KEYS)))
    if kind in ("group", "compressed"):
        ops = draw(
            st.lists(
                st.one_of(
                    st.builds(lambda k, v: op(1, set_body(ns, k, v)), KEYS, VALUES),
                    st.builds(lambda k: op(2, delete_body(ns, k)), KEYS),
                    st.just(op(fmt.REC_CREATE_NS, name("a"))),
                ),
                max_size=80,
            )
        )
        return group(seq, ops, compress=kind == "compressed")
    if kind in ("create", "drop", "clear"):
        ns = ns or "a"
        record_type = {"create": 5, "drop": 6, "clear": 3}[kind]
        return fmt.encode_record(record_type, seq, name(ns))
    if kind == "checkpoint":
        return fmt.encode_record(fmt.REC_CHECKPOINT, seq, b"\x07" + draw(st.binary(max_size=8)))
    if kind == "expiring":
        value = expiring_value(encode_value(1), draw(st.floats(0, 1e9)), 1.0)
        return fmt.encode_record(fmt.REC_SET, seq, set_body(ns, draw(KEYS), value))
    bad = draw(BAD_KEYS)  # bad utf-8
    return fmt.encode_record(
        fmt.REC_SET, seq, name(ns) + len(bad).to_bytes(2, "little") + bad + b"\x07"
    )


@st.composite
def segment_bytes(draw: st.DrawFn, number: int) -> bytes:
    count = draw(st.integers(0, 25))
    body = b"".join(draw(records(number * 100 + i)) for i in range(count))
    data = bytearray(fmt.encode_segment_header(number) + body)
    for _ in range(draw(st.integers(0, 2))):
        damage = draw(st.sampled_from(["flip", "zeros", "truncate", "garbage"]))
        if len(data) <= fmt.SEGMENT_HEADER_SIZE:
            break
        at = draw(st.integers(fmt.SEGMENT_HEADER_SIZE, len(data) - 1))
        if damage == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif damage == "zeros":
            data[at : at + draw(st.integers(1, 40))] = bytes(draw(st.integers(1, 40)))
        elif damage == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=30))
    return bytes(data)


def open_copy(files: dict[str, bytes], directory: Path, recovery: str, native: bool) -> Any:
    directory.mkdir()
    for file_name, data in files.items():
        (directory / file_name).write_bytes(data)
    options = EngineOptions(recovery=recovery)
    saved = _replay.NATIVE_REPLAY
    if not native:
        _replay.NATIVE_REPLAY = None  # type: ignore[misc]
    try:
        recovered = recover(FileSystem(), str(directory), options)
    except CorruptionError as exc:
        return ("error", type(exc), os.path.basename(exc.path), exc.offset, exc.reason)
    finally:
        _replay.NATIVE_REPLAY = saved  # type: ignore[misc]
    recovered.segments.release()
    keydir = recovered.keydir
    keydir._check()
    report = recovered.report
    torn = [(os.path.basename(t.path), t.offset, t.size) for t in report.torn_tails]
    salvaged = [(os.path.basename(s.path), s.offset, s.size, s.reason) for s in report.salvaged]
    on_disk = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    return (
        state(keydir),
        keydir.clock_floor,
        recovered.seq,
        report.records,
        torn,
        salvaged,
        on_disk,
    )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    segments=st.lists(st.integers(), min_size=1, max_size=2).flatmap(
        lambda numbers: st.tuples(*(segment_bytes(i + 1) for i in range(len(numbers))))
    ),
    recovery=st.sampled_from(["strict", "prefix", "salvage"]),
)
def test_c_and_pure_replay_of_random_segments_are_equal(
    cnative: Any,
    tmp_path_factory: pytest.TempPathFactory,
    segments: tuple[bytes, ...],
    recovery: str,
) -> None:
    files = {segment_file_name(i + 1): data for i, data in enumerate(segments)}
    base = tmp_path_factory.mktemp("diff")
    pure = open_copy(files, base / "pure", recovery, native=False)
    ours = open_copy(files, base / "c", recovery, native=True)
    shutil.rmtree(base)
    assert ours == pure
