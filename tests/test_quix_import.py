"""logstate.compat.quix_import: reading legacy Quix Streams state files and directories.

Legacy files are built here byte by byte from the format description in
../shared/reference/quix-legacy.md (a small .NET ``BinaryWriter`` in
``LegacyWriter``), never by the code under test, and a few are spelled out as
hex literals so that a byte-order mistake shared by writer and reader fails.

The fuzz tests at the end state their guarantee: ``decode_legacy_file`` on any
bytes returns a value or raises ``QuixImportError``, never another exception.
Inputs with a correct CRC are decoded with ``allow_pickle=False`` only: a
mutated pickle may ask the unpickler for gigabytes (a huge memo index), and
unpickling is not this module's to fuzz.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import logstate
from logstate import CorruptionError, PickleNotAllowedError
from logstate.compat import quix_import
from logstate.compat.quix_import import (
    ImportReport,
    LegacyFormatError,
    LegacyPickleRefusedError,
    QuixImportError,
    SkippedFile,
    decode_legacy_file,
    find_legacy_state_file,
    import_quix_directory,
    is_legacy_temp_file,
    parse_legacy_file,
)
from logstate.compat.quixstreams import LocalFileStorage as CompatStorage
from logstate.compat.quixstreams import StateType

# ============================================================================ the legacy writer


def seven_bit_length(length: int) -> bytes:
    """``BinaryWriter.Write7BitEncodedInt``: 7 bits a byte, low first, high bit = more."""
    out = bytearray()
    while length >= 0x80:
        out.append(length & 0x7F | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out)


class LegacyWriter:
    """The legacy file layout: codec, type, payload, big-endian zlib CRC-32."""

    @staticmethod
    def file(type_code: bytes, payload: bytes, *, codec: bytes = b"b") -> bytes:
        body = codec + type_code + payload
        return body + zlib.crc32(body).to_bytes(4, "big")

    @classmethod
    def boolean(cls, value: bool) -> bytes:
        return cls.file(b"b", b"\x01" if value else b"\x00")

    @classmethod
    def int64(cls, value: int) -> bytes:
        return cls.file(b"l", struct.pack("<q", value))

    @classmethod
    def double(cls, value: float) -> bytes:
        return cls.file(b"d", struct.pack("<d", value))

    @classmethod
    def binary(cls, value: bytes | None) -> bytes:
        if value is None:
            return cls.file(b"a", struct.pack("<i", -1))
        return cls.file(b"a", struct.pack("<i", len(value)) + value)

    @classmethod
    def pickled(cls, value: object, *, null: bool = False) -> bytes:
        if null:
            return cls.file(b"o", struct.pack("<i", -1))
        raw = pickle.dumps(value)
        return cls.file(b"o", struct.pack("<i", len(raw)) + raw)

    @classmethod
    def string(cls, value: str) -> bytes:
        raw = value.encode("utf-8")
        return cls.file(b"s", seven_bit_length(len(raw)) + raw)


W = LegacyWriter


def same_value(a: object, b: object) -> bool:
    """Equal and of the same exact type; floats compared bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    """Create ``files`` (relative paths, "/"-separated) below ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def contents(storage: logstate.LocalFileStorage) -> dict[str, Any]:
    """Every key and sub-storage below ``storage``, as nested dicts (sub-storages as "name/")."""
    out: dict[str, Any] = {key: storage[key] for key in storage.get_all_keys()}
    for name in storage.get_sub_storages():
        with storage.get_or_create_sub_storage(name) as sub:
            out[name + "/"] = contents(sub)
    return out


@pytest.fixture
def dst(tmp_path: Path) -> Iterator[logstate.LocalFileStorage]:
    with logstate.LocalFileStorage(tmp_path / "dst", sync="none") as storage:
        yield storage


class SideEffect:
    """Unpickling one of these records the call: proof of whether a pickle was loaded."""

    calls: list[str] = []  # noqa: RUF012 - a deliberate global record

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (record_unpickle, ("loaded",))


def record_unpickle(what: str) -> str:
    SideEffect.calls.append(what)
    return what


# ============================================================================ the writer itself


def test_seven_bit_length_prefix_matches_binarywriter() -> None:
    assert seven_bit_length(0) == b"\x00"
    assert seven_bit_length(127) == b"\x7f"
    assert seven_bit_length(128) == b"\x80\x01"
    assert seven_bit_length(200) == b"\xc8\x01"
    assert seven_bit_length(16384) == b"\x80\x80\x01"
    assert seven_bit_length(0x7FFFFFFF) == b"\xff\xff\xff\xff\x07"


def test_hex_literal_files_decode_to_their_values() -> None:
    # long 1: little-endian int64, then CRC-32 big-endian
    assert decode_legacy_file(bytes.fromhex("62 6c 01 00 00 00 00 00 00 00 40 65 ce 15")) == 1
    # string "hé": 7-bit length 3 (UTF-8 bytes, not characters)
    assert decode_legacy_file(bytes.fromhex("62 73 03 68 c3 a9 51 20 3f 5a")) == "hé"
    assert decode_legacy_file(bytes.fromhex("62 62 01 94 de ff ef")) is True
    assert W.int64(1) == bytes.fromhex("62 6c 01 00 00 00 00 00 00 00 40 65 ce 15")


# ============================================================================ decoding every type


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (W.boolean(True), True),
        (W.boolean(False), False),
        (W.int64(0), 0),
        (W.int64(-1), -1),
        (W.int64(2**63 - 1), 2**63 - 1),
        (W.int64(-(2**63)), -(2**63)),
        (W.double(12.51), 12.51),
        (W.double(-0.0), -0.0),
        (W.double(math.inf), math.inf),
        (W.double(-math.inf), -math.inf),
        (W.double(math.nan), math.nan),
        (W.binary(b""), b""),
        (W.binary(b"\x00\xffdata"), b"\x00\xffdata"),
        (W.binary(None), None),
        (W.string(""), ""),
        (W.string("test"), "test"),
        (W.string("x" * 300), "x" * 300),  # two-byte length prefix
        (W.string("é" * 100), "é" * 100),  # 200 UTF-8 bytes: prefix counts bytes
        (W.string("€" * 5000), "€" * 5000),  # 15000 bytes: two-byte prefix, 3-byte chars
        (W.pickled({"test": "me", "n": [1, 2.5]}), {"test": "me", "n": [1, 2.5]}),
        (W.pickled(None, null=True), None),
        (W.pickled(None), None),  # a pickled None
    ],
    ids=repr,
)
def test_each_type_imports_as_what_its_type_byte_says(data: bytes, expected: object) -> None:
    assert same_value(decode_legacy_file(data), expected)


def test_a_bool_the_legacy_code_stored_as_long_comes_back_as_int() -> None:
    value = decode_legacy_file(W.int64(1))
    assert value == 1 and type(value) is int


def test_binary_comes_back_as_bytes_not_bytearray() -> None:
    assert type(decode_legacy_file(W.binary(b"x"))) is bytes


def test_parse_returns_the_type_and_leaves_the_pickle_unloaded() -> None:
    SideEffect.calls.clear()
    parsed = parse_legacy_file(W.pickled(SideEffect()))
    assert parsed.type is StateType.Object
    assert isinstance(parsed.payload, bytes) and parsed.payload[:1] == b"\x80"
    assert SideEffect.calls == []
    assert parse_legacy_file(W.int64(5)) == (StateType.Long, 5)
    assert parse_legacy_file(bytearray(W.string("s"))).payload == "s"
    assert parse_legacy_file(memoryview(W.boolean(True))).type is StateType.Bool


def test_allow_pickle_false_refuses_an_object_without_loading_it() -> None:
    SideEffect.calls.clear()
    with pytest.raises(LegacyPickleRefusedError, match="allow_pickle=False") as info:
        decode_legacy_file(W.pickled(SideEffect()), allow_pickle=False)
    assert isinstance(info.value, PickleNotAllowedError) and isinstance(info.value, QuixImportError)
    assert SideEffect.calls == []
    assert decode_legacy_file(W.pickled(None, null=True), allow_pickle=False) is None
    assert decode_legacy_file(W.int64(3), allow_pickle=False) == 3
    assert decode_legacy_file(W.pickled(SideEffect())) == "loaded"
    assert SideEffect.calls == ["loaded"]


def test_errors_survive_pickling_with_their_fields() -> None:
    error = LegacyFormatError("", 3, "why")
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.offset, again.reason) == (LegacyFormatError, 3, "why")
    refused = pickle.loads(pickle.dumps(LegacyPickleRefusedError("a/b")))
    assert refused.path == "a/b"


# ============================================================================ malformed files


def with_crc(body: bytes) -> bytes:
    """``body`` with a correct CRC: the damage is past the checksum's reach."""
    return body + zlib.crc32(body).to_bytes(4, "big")


MALFORMED: dict[str, tuple[bytes, str, int]] = {
    # name: (file, reason fragment, offset)
    "empty": (b"", "file is 0 bytes", 0),
    "short": (W.boolean(True)[:4], "file is 4 bytes", 0),
    "bad codec": (W.file(b"l", struct.pack("<q", 1), codec=b"c"), "codec byte is 0x63", 0),
    "bad crc": (W.int64(7)[:-1] + b"\x00", "CRC mismatch", 10),
    "flipped payload bit": (
        W.int64(7)[:2] + b"\x06" + W.int64(7)[3:],
        "CRC mismatch",
        10,
    ),
    "crc little-endian": (
        b"bl"
        + struct.pack("<q", 1)
        + zlib.crc32(b"bl" + struct.pack("<q", 1)).to_bytes(4, "little"),
        "CRC mismatch",
        10,
    ),
    "missing type": (with_crc(b"b"), "type byte is missing", 1),
    "bad type": (with_crc(b"bx\x01"), "unknown type byte 0x78", 1),
    "bool too long": (with_crc(b"bb\x01\x00"), "bool payload is 2 bytes", 2),
    "bool empty": (with_crc(b"bb"), "bool payload is 0 bytes", 2),
    "bool not 0 or 1": (with_crc(b"bb\x02"), "bool byte is 2", 2),
    "long truncated": (with_crc(b"bl" + b"\x01" * 7), "long payload is 7 bytes", 2),
    "double too long": (with_crc(b"bd" + b"\x00" * 9), "double payload is 9 bytes", 2),
    "binary truncated payload": (
        with_crc(b"ba" + struct.pack("<i", 10) + b"abc"),
        "binary payload truncated: length 10, 3 bytes present",
        6,
    ),
    "binary truncated length": (with_crc(b"ba\x01\x00"), "binary payload truncated", 2),
    "binary negative length": (
        with_crc(b"ba" + struct.pack("<i", -2)),
        "binary length is -2",
        2,
    ),
    "binary trailing bytes": (
        with_crc(b"ba" + struct.pack("<i", 1) + b"ab"),
        "1 unexpected bytes after the binary",
        7,
    ),
    "null binary with bytes": (
        with_crc(b"ba" + struct.pack("<i", -1) + b"z"),
        "1 unexpected bytes after a null binary",
        6,
    ),
    "string truncated": (
        with_crc(b"bs" + seven_bit_length(300) + b"x" * 299),
        "string truncated: length 300, 299 bytes present",
        4,
    ),
    "string trailing bytes": (
        with_crc(b"bs\x01ab"),
        "1 unexpected bytes after the string",
        4,
    ),
    "string prefix unterminated": (with_crc(b"bs\x80"), "string length prefix truncated", 2),
    "string prefix too long": (
        with_crc(b"bs" + b"\x80" * 5 + b"\x01"),
        "longer than 5 bytes",
        2,
    ),
    "string length beyond int32": (
        with_crc(b"bs\xff\xff\xff\xff\x0f"),
        "exceeds the int32 range",
        2,
    ),
    "string invalid utf-8": (with_crc(b"bs\x03a\xffb"), "not valid UTF-8", 4),
    "object without pickle header": (
        with_crc(b"bo" + struct.pack("<i", 2) + b"N."),
        "first byte is not 0x80",
        6,
    ),
    "object without stop byte": (
        with_crc(b"bo" + struct.pack("<i", 3) + b"\x80\x04N"),
        "last byte is not '.'",
        8,
    ),
    "object empty": (with_crc(b"bo" + struct.pack("<i", 0)), "not a pickle", 6),
    "object of a missing module": (
        with_crc(b"bo" + struct.pack("<i", 29) + b"\x80\x02cno_such_module_q\nthing\nq\x00."),
        "does not unpickle: ModuleNotFoundError",
        6,
    ),
    "object does not unpickle": (
        with_crc(b"bo" + struct.pack("<i", 4) + b"\x80\x04\xff."),
        "does not unpickle",
        6,
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_raises_legacy_format_error_naming_what_is_wrong(name: str) -> None:
    data, reason, offset = MALFORMED[name]
    with pytest.raises(LegacyFormatError) as info:
        decode_legacy_file(data)
    error = info.value
    assert reason in error.reason
    assert error.offset == offset
    assert isinstance(error, CorruptionError) and isinstance(error, QuixImportError)
    assert reason in str(error)


def test_a_file_of_codec_and_crc_only_is_not_the_minimum_but_still_malformed() -> None:
    assert len(with_crc(b"b")) == 5  # long enough, valid CRC, no type byte
    with pytest.raises(LegacyFormatError, match="type byte is missing"):
        decode_legacy_file(with_crc(b"b"))


# ============================================================================ importing a directory


def legacy_tree() -> dict[str, bytes]:
    """A legacy state directory: state/<topic>/<stream>/<state>/<key>, with debris."""
    return {
        "scalar": W.int64(5),
        "name": W.string("é" * 100),
        "flag": W.boolean(True),
        "ratio": W.double(-0.0),
        "blob": W.binary(b"\x00\x01"),
        "nothing": W.binary(None),
        "obj": W.pickled({"a": [1, 2]}),
        "count~": W.int64(1),  # temp / backup files of the legacy writer: not keys
        "count.tmpf": W.int64(2),
        "count.bckf": W.int64(3),
        "topic-a/stream-1/counts/click": W.int64(41),
        "topic-a/stream-1/counts/view": W.int64(-2),
        "topic-a/stream-1/counts/click.tmpf": b"garbage",
        "topic-a/stream-1/last/scalar": W.string("x" * 200),
        "topic-a/bad-short": b"bl\x01",
        "broken/bad-crc": W.int64(7)[:-1] + b"\x00",
        "broken/bad-codec": W.file(b"l", struct.pack("<q", 1), codec=b"x"),
        "broken/bad-type": with_crc(b"bq\x00"),
        "broken/truncated": with_crc(b"ba" + struct.pack("<i", 10) + b"abc"),
        "broken/fine": W.boolean(False),
    }


def test_import_brings_every_type_and_sub_storage_and_skips_debris(
    tmp_path: Path, dst: logstate.LocalFileStorage
) -> None:
    src = tmp_path / "state"
    write_tree(src, legacy_tree())
    (src / "topic-b").mkdir()  # an empty sub-storage

    report = import_quix_directory(src, dst)

    imported = contents(dst)
    expected = {
        "scalar": 5,
        "name": "é" * 100,
        "flag": True,
        "ratio": -0.0,
        "blob": b"\x00\x01",
        "nothing": None,
        "obj": {"a": [1, 2]},
        "broken/": {"fine": False},
        "topic-a/": {
            "stream-1/": {
                "counts/": {"click": 41, "view": -2},
                "last/": {"scalar": "x" * 200},
            },
        },
        "topic-b/": {},
    }
    assert imported == expected
    assert same_value(imported["ratio"], -0.0) and imported["flag"] is True
    assert report.keys_imported == 11
    assert report.sub_storages == 6  # broken, topic-a, stream-1, counts, last, topic-b
    assert report.storages_written == 7
    assert report.skipped_temp_files == 4
    assert report.refused == []
    assert [item.path for item in report.malformed] == [
        "broken/bad-codec",
        "broken/bad-crc",
        "broken/bad-type",
        "broken/truncated",
        "topic-a/bad-short",
    ]
    reasons = dict(report.malformed)
    assert "codec byte is 0x78" in reasons["broken/bad-codec"]
    assert "CRC mismatch" in reasons["broken/bad-crc"]
    assert "unknown type byte 0x71" in reasons["broken/bad-type"]
    assert "truncated" in reasons["broken/truncated"]
    assert "file is 3 bytes" in reasons["topic-a/bad-short"]
    assert not report.complete
    dst._check()
    # the source is left as it was
    assert sorted(p.name for p in src.iterdir()) == sorted(
        {name.split("/")[0] for name in legacy_tree()} | {"topic-b"}
    )


def test_each_storage_is_written_as_one_group(
    tmp_path: Path, dst: logstate.LocalFileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "state"
    write_tree(src, legacy_tree())
    groups: list[list[int]] = []
    engine = dst._engine
    original = engine.write_group  # the writer's, bound by the engine at open

    def spy(
        ops: list[tuple[int, bytes]],
        checkpoint: bytes | None = None,
        names: list[tuple[str, str]] | None = None,
        expiring: bool = False,
    ) -> int:
        groups.append([op_type for op_type, _ in ops])
        return original(ops, checkpoint, names, expiring=expiring)

    monkeypatch.setattr(engine, "write_group", spy)
    set_calls: list[str] = []
    monkeypatch.setattr(engine, "set", lambda *args: set_calls.append(str(args[2])))
    # (on the C path a handle's set reaches the writer without engine.set)
    monkeypatch.setattr(
        logstate.LocalFileStorage, "set", lambda self, key, *args: set_calls.append(key)
    )

    import_quix_directory(src, dst)

    # root, broken, topic-a (no valid key: empty group), stream-1 (none), counts, last
    assert sorted(len(group) for group in groups) == [0, 0, 1, 1, 2, 7]
    assert set_calls == []  # never a key outside a group


def test_an_error_while_reading_a_storage_writes_none_of_its_keys(
    tmp_path: Path, dst: logstate.LocalFileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "state"
    write_tree(
        src,
        {
            "root-key": W.int64(1),
            "sub/a": W.int64(1),
            "sub/b": W.int64(2),  # reading this one fails: "a" was already read
            "sub/c": W.int64(3),
        },
    )
    real_open = open

    def failing_open(path: str, mode: str) -> Any:
        if path.endswith(os.sep + "b"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, mode)

    monkeypatch.setattr(quix_import, "open", failing_open, raising=False)

    with pytest.raises(PermissionError):
        import_quix_directory(src, dst)

    assert dst.get_all_keys() == ["root-key"]  # the storage before: all of it
    with dst.get_or_create_sub_storage("sub") as sub:
        assert sub.get_all_keys() == []  # the failing storage: none of it


def test_a_failed_group_write_leaves_the_storage_without_any_key(
    tmp_path: Path, dst: logstate.LocalFileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "state"
    write_tree(src, {"r1": W.int64(1), "r2": W.int64(2), "sub/a": W.int64(1), "sub/b": W.int64(2)})
    engine = dst._engine
    original = engine.write_group  # the writer's, bound by the engine at open
    calls = 0

    def fail_second(
        ops: list[tuple[int, bytes]],
        checkpoint: bytes | None = None,
        names: list[tuple[str, str]] | None = None,
        expiring: bool = False,
    ) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(5, "Input/output error")
        return original(ops, checkpoint, names, expiring=expiring)

    monkeypatch.setattr(engine, "write_group", fail_second)
    with pytest.raises(OSError, match="Input/output error"):
        import_quix_directory(src, dst)
    monkeypatch.setattr(engine, "write_group", original)

    assert sorted(dst.get_all_keys()) == ["r1", "r2"]
    with dst.get_or_create_sub_storage("sub") as sub:
        assert sub.get_all_keys() == []

    # running it again completes the import
    report = import_quix_directory(src, dst)
    assert report.keys_imported == 4 and report.complete
    with dst.get_or_create_sub_storage("sub") as sub:
        assert sub["a"] == 1 and sub["b"] == 2


def test_import_with_allow_pickle_false_refuses_object_files_and_imports_the_rest(
    tmp_path: Path, dst: logstate.LocalFileStorage
) -> None:
    SideEffect.calls.clear()
    src = tmp_path / "state"
    write_tree(src, {"obj": W.pickled(SideEffect()), "n": W.int64(1), "t/o2": W.pickled([1])})

    report = import_quix_directory(src, dst, allow_pickle=False)

    assert SideEffect.calls == []
    assert contents(dst) == {"n": 1, "t/": {}}
    assert report.refused == [
        SkippedFile("obj", "an object value (a pickle)"),
        SkippedFile("t/o2", "an object value (a pickle)"),
    ]
    assert report.malformed == [] and not report.complete
    assert any("refused" in line for line in report.summary())


def test_a_destination_refusing_pickles_lists_the_object_files_as_refused(
    tmp_path: Path,
) -> None:
    src = tmp_path / "state"
    write_tree(src, {"obj": W.pickled({"a": 1}), "n": W.int64(1)})
    with logstate.LocalFileStorage(tmp_path / "dst", allow_pickle=False) as strict:
        report = import_quix_directory(src, strict)
        assert strict.get_all_keys() == ["n"]
    assert report.refused == [SkippedFile("obj", "the destination refuses pickled values")]


def test_existing_destination_keys_are_kept_and_imported_keys_overwrite(
    tmp_path: Path, dst: logstate.LocalFileStorage
) -> None:
    dst.set("kept", "mine")
    dst.set("scalar", "old")
    src = tmp_path / "state"
    write_tree(src, {"scalar": W.int64(5)})
    import_quix_directory(src, dst)
    assert contents(dst) == {"kept": "mine", "scalar": 5}


def test_progress_is_called_after_each_storage_with_its_key_count(
    tmp_path: Path, dst: logstate.LocalFileStorage
) -> None:
    src = tmp_path / "state"
    write_tree(src, legacy_tree())
    calls: list[tuple[str, int]] = []
    import_quix_directory(src, dst, progress=lambda path, count: calls.append((path, count)))
    assert calls == [
        ("", 7),
        ("broken", 1),
        ("topic-a", 0),
        ("topic-a/stream-1", 0),
        ("topic-a/stream-1/counts", 2),
        ("topic-a/stream-1/last", 1),
    ]


def test_import_into_a_compat_storage_and_into_a_sub_storage(tmp_path: Path) -> None:
    src = tmp_path / "state"
    write_tree(src, {"count": W.int64(3), "topic/key": W.string("v")})
    compat = CompatStorage(tmp_path / "dst")
    target = compat.get_or_create_sub_storage("Imported")
    report = import_quix_directory(src, target)
    assert "(sub-storage imported)" in report.destination
    assert target.get("COUNT") == 3
    assert target.get_or_create_sub_storage("TOPIC").get("Key") == "v"


def test_names_that_are_not_valid_keys_or_sub_storages_are_reported(
    tmp_path: Path, dst: logstate.LocalFileStorage
) -> None:
    src = tmp_path / "state"
    write_tree(src, {"good": W.int64(1), "back\\slash/k": W.int64(2), "real/k": W.int64(4)})
    fd = os.open(os.fsencode(src) + b"/bad-\xff", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, W.int64(3))
    os.close(fd)
    (src / "link").symlink_to(src / "good")
    (src / "dirlink").symlink_to(src / "real", target_is_directory=True)

    report = import_quix_directory(src, dst)

    assert dst.get_all_keys() == ["good"] and dst.get_sub_storages() == ["real"]
    reasons = {item.path: item.reason for item in report.malformed}
    assert set(reasons) == {"back\\slash/", "bad-\udcff", "dirlink", "link"}
    assert "not a valid sub-storage name" in reasons["back\\slash/"]
    assert "not a valid key" in reasons["bad-\udcff"]
    assert "not a regular file" in reasons["link"]
    assert "not a regular file" in reasons["dirlink"]  # never followed: no loops


def test_source_must_be_a_directory(tmp_path: Path, dst: logstate.LocalFileStorage) -> None:
    with pytest.raises(FileNotFoundError):
        import_quix_directory(tmp_path / "missing", dst)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        import_quix_directory(tmp_path / "file", dst)


@pytest.mark.parametrize(
    ("name", "is_temp"),
    [
        ("key~", True),
        ("~key", True),
        ("k~ey", True),
        ("key.tmpf", True),
        ("key.bckf", True),
        ("key", False),
        ("key.tmp", False),
        ("tmpf", False),
        ("key.TMPF", False),
    ],
)
def test_temp_and_backup_file_names_are_recognised(name: str, is_temp: bool) -> None:
    assert is_legacy_temp_file(name) is is_temp


def test_summary_lists_counts_and_every_file_not_imported() -> None:
    report = ImportReport(
        source="./state",
        destination="/srv/app/state-logstate",
        keys_imported=1,
        storages_written=1,
        skipped_temp_files=2,
        malformed=[SkippedFile("a/b", "CRC mismatch (offset 10)")],
        refused=[SkippedFile("o", "an object value (a pickle)")],
    )
    assert report.summary() == [
        "imported 1 key into 1 storage (0 sub-storages) from ./state to /srv/app/state-logstate",
        "skipped 2 temp/backup files (names containing '~' or ending .tmpf/.bckf)",
        "not imported, malformed: 1 file",
        "  a/b: CRC mismatch (offset 10)",
        "not imported, refused (pickled values with allow_pickle=False): 1 file",
        "  o: an object value (a pickle)",
        "INCOMPLETE: the files listed above were not imported",
    ]
    clean = ImportReport(source="s", destination="d", keys_imported=2, storages_written=1)
    assert clean.summary()[-1] == "complete: every key file was imported"
    assert clean.summary()[0].startswith("imported 2 keys into 1 storage ")


def test_the_example_run_in_the_migration_guide_is_what_the_import_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guide = (Path(__file__).parent.parent / "docs" / "migrating-from-quix.md").read_text()
    command = "$ logstate import-quix ./state-quix ./state\n"
    assert command in guide
    shown = guide.split(command, 1)[1].split("```", 1)[0].splitlines()
    monkeypatch.chdir(tmp_path)
    write_tree(
        Path("state-quix"),
        {
            "clicks/stream-1/counts/home": W.int64(41),
            "clicks/stream-1/counts/cart": W.int64(7),
            "clicks/stream-1/counts/cart.tmpf": W.int64(8),
            "clicks/stream-1/last-seen/scalar": W.string("2024-03-01T10:00:00Z"),
            "clicks/stream-2/counts/home": W.int64(3),
            "clicks/stream-2/counts/checkout": W.int64(9)[:7],  # torn by a crash
            "clicks/stream-2/average/scalar": W.double(12.5),
            "sessions/stream-1/open/u42": W.pickled(
                {"started": 1709287200, "pages": ["home", "cart"]}
            ),
        },
    )
    with logstate.LocalFileStorage("./state") as storage:
        report = import_quix_directory("./state-quix", storage)
        printed = [line.replace(storage.path, "/tmp/myapp/state") for line in report.summary()]
    assert printed == shown


# ============================================================================ detection


def test_find_legacy_state_file_finds_a_nested_key_file(tmp_path: Path) -> None:
    write_tree(tmp_path / "state", {"t/s/n/key.tmpf": W.int64(1), "t/s/n/key": W.int64(1)})
    found = find_legacy_state_file(tmp_path / "state")
    assert found == str(tmp_path / "state" / "t" / "s" / "n" / "key")


def test_find_legacy_state_file_ignores_what_is_not_legacy_state(tmp_path: Path) -> None:
    assert find_legacy_state_file(tmp_path / "missing") is None
    write_tree(
        tmp_path / "other",
        {
            "a.tmpf": W.int64(1),  # temp files are not keys
            "b~": W.int64(1),
            "broken": W.int64(1)[:-1],  # no valid legacy file
            "notes": b"begins with b",
        },
    )
    (tmp_path / "other" / "link").symlink_to(tmp_path / "elsewhere")
    write_tree(tmp_path / "elsewhere", {"key": W.int64(1)})
    assert find_legacy_state_file(tmp_path / "other") is None


def test_find_legacy_state_file_skips_a_logstate_directory(tmp_path: Path) -> None:
    with logstate.LocalFileStorage(tmp_path / "store") as storage:
        storage.set("k", 1)
    write_tree(tmp_path / "store", {"stray": W.int64(1)})
    assert find_legacy_state_file(tmp_path / "store") is None


# ============================================================================ fuzz
# Guarantee: decode_legacy_file(any bytes) returns a value or raises
# QuixImportError -- never any other exception.


def check_decodes_or_raises_module_error(data: bytes, allow_pickle: bool) -> None:
    with contextlib.suppress(QuixImportError):
        decode_legacy_file(data, allow_pickle=allow_pickle)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), allow_pickle=st.booleans())
def test_fuzz_arbitrary_bytes_decode_or_raise_the_module_error(
    data: bytes, allow_pickle: bool
) -> None:
    check_decodes_or_raises_module_error(data, allow_pickle)


@settings(max_examples=500, deadline=None)
@given(
    codec=st.sampled_from([b"b", b"b", b"b", b"x"]),
    type_code=st.sampled_from([b"b", b"l", b"d", b"a", b"o", b"s", b"?"]),
    payload=st.one_of(
        st.binary(max_size=40),
        st.tuples(st.integers(-3, 50), st.binary(max_size=40)).map(
            lambda t: struct.pack("<i", t[0]) + t[1]
        ),
        st.tuples(st.integers(0, 2**35), st.binary(max_size=40)).map(
            lambda t: seven_bit_length(t[0]) + t[1]
        ),
        st.binary(max_size=30).map(lambda b: struct.pack("<i", len(b) + 2) + b"\x80" + b + b"."),
    ),
)
def test_fuzz_files_with_a_valid_crc_decode_or_raise_the_module_error(
    codec: bytes, type_code: bytes, payload: bytes
) -> None:
    check_decodes_or_raises_module_error(with_crc(codec + type_code + payload), False)


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        st.booleans().map(lambda v: (W.boolean(v), v)),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: (W.int64(v), v)),
        st.floats(allow_nan=True).map(lambda v: (W.double(v), v)),
        st.binary().map(lambda v: (W.binary(v), v)),
        st.text(alphabet=st.characters(codec="utf-8")).map(lambda v: (W.string(v), v)),
    )
)
def test_fuzz_every_written_value_reads_back_exactly(value: tuple[bytes, object]) -> None:
    data, expected = value
    assert same_value(decode_legacy_file(data, allow_pickle=False), expected)
