"""logstate.compat._legacy: one legacy Quix Streams state file, from its bytes alone.

No file is written here: the format module takes bytes, so every test hands
it bytes. The valid files are hex literals spelled out from the format
description (../shared/reference/quix-legacy.md: codec, type, payload,
big-endian zlib CRC-32), never produced by the code under test.
"""

from __future__ import annotations

import ast
import inspect
import zlib

import pytest

from logstate import CorruptionError
from logstate.compat import _legacy, quix_import, quixstreams
from logstate.compat._legacy import (
    LegacyFormatError,
    QuixImportError,
    StateType,
    decode_legacy_file,
    parse_legacy_file,
)

LONG_1 = bytes.fromhex("62 6c 01 00 00 00 00 00 00 00 40 65 ce 15")  # long 1
STRING_HE = bytes.fromhex("62 73 03 68 c3 a9 51 20 3f 5a")  # string "hé" (3 UTF-8 bytes)
BOOL_TRUE = bytes.fromhex("62 62 01 94 de ff ef")  # bool True


def with_crc(body: bytes) -> bytes:
    """``body`` with its CRC-32 appended big-endian, as the legacy writer did."""
    return body + zlib.crc32(body).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("data", "expected"),
    [(LONG_1, 1), (STRING_HE, "hé"), (BOOL_TRUE, True)],
    ids=["long", "string", "bool"],
)
def test_a_valid_file_decodes_from_its_bytes_to_its_value(data: bytes, expected: object) -> None:
    value = decode_legacy_file(data)
    assert value == expected and type(value) is type(expected)


def test_parsing_gives_the_type_the_type_byte_names() -> None:
    assert parse_legacy_file(LONG_1) == (StateType.Long, 1)
    assert parse_legacy_file(memoryview(STRING_HE)).type is StateType.String
    assert parse_legacy_file(bytearray(BOOL_TRUE)).type is StateType.Bool


@pytest.mark.parametrize(
    ("data", "reason", "offset"),
    [
        (LONG_1[:2] + b"\x02" + LONG_1[3:], "CRC mismatch", 10),  # one payload byte changed
        (LONG_1[:4], "file is 4 bytes", 0),  # torn before the CRC
        (with_crc(b"bz\x00"), "unknown type byte 0x7a", 1),
        (with_crc(b"bs\x05abc"), "string truncated: length 5, 3 bytes present", 3),
    ],
    ids=["flipped byte", "truncated", "unknown type", "short string"],
)
def test_a_damaged_file_is_rejected_with_an_error_naming_the_problem(
    data: bytes, reason: str, offset: int
) -> None:
    with pytest.raises(LegacyFormatError) as info:
        decode_legacy_file(data)
    error = info.value
    assert reason in error.reason and reason in str(error)
    assert error.offset == offset
    assert error.path == ""  # plain bytes: no file to name
    assert isinstance(error, CorruptionError) and isinstance(error, QuixImportError)


def test_each_state_type_has_the_letter_of_the_legacy_files() -> None:
    codes = {member: member.file_code for member in StateType}
    assert codes == {
        StateType.Binary: "a",
        StateType.Bool: "b",
        StateType.Long: "l",
        StateType.Double: "d",
        StateType.String: "s",
        StateType.Object: "o",
    }
    assert all(StateType.from_file_code(code) is member for member, code in codes.items())
    with pytest.raises(ValueError, match="not a legacy state type code"):
        StateType.from_file_code("x")


def test_the_format_module_does_no_io() -> None:
    tree = ast.parse(inspect.getsource(_legacy))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {
        "__future__",
        "enum",
        "pickle",
        "struct",
        "typing",
        "zlib",
        "logstate._errors",
    }
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"open", "print", "input", "__import__"}


def test_the_compat_modules_still_offer_the_format_names() -> None:
    assert quixstreams.StateType is StateType
    for name in _legacy.__all__:
        assert getattr(quix_import, name) is getattr(_legacy, name), name
