"""The legacy Quix Streams state file format: one file per key, as bytes.

The legacy layout and file format are in ../shared/reference/quix-legacy.md;
in short, one file per key, written by .NET's ``BinaryWriter``::

    file    = codec type payload crc
    codec   = "b"                                   (1 byte)
    type    = "b" | "l" | "d" | "a" | "o" | "s"     (1 byte)
    payload = bool:   1 byte, 0 or 1
              long:   int64, little-endian
              double: IEEE-754 binary64, little-endian
              binary: int32 length (little-endian, -1 = null) + bytes
              object: int32 length (-1 = null) + a Python pickle
                      (first byte 0x80, last byte ".")
              string: 7-bit-encoded length (LEB128, at most 5 bytes) + UTF-8 bytes
    crc     = zlib CRC-32 of every byte before it, 4 bytes BIG-endian

Each value decodes as what its type byte says: a ``long`` is an int, so a
bool that the legacy Python code stored as a long (its int-before-bool bug)
comes back as 0 or 1; nothing can tell the two apart.

Owns: :class:`StateType` and its one-letter file codes; checking and
splitting one legacy file's bytes (:func:`parse_legacy_file`) and turning
them into a Python value (:func:`decode_legacy_file`); the errors of a
legacy file that cannot be decoded (:class:`QuixImportError` and its
subclasses); the names of the legacy writer's temp and backup files
(:func:`is_legacy_temp_file`).
Must never: do I/O (no ``os``, no ``open``, no clocks, no logging: it works
on bytes and names given to it, so it can be fuzzed and tested without
files), import another module of :mod:`logstate.compat` (they import this
one), or unpickle anything when ``allow_pickle`` is False.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from enum import Enum
from typing import Final, NamedTuple

from logstate._errors import CorruptionError, LogstateError, PickleNotAllowedError

__all__ = [
    "CODEC_BINARY",
    "CRC_SIZE",
    "MAX_7BIT_BYTES",
    "MIN_FILE_SIZE",
    "PICKLE_FIRST_BYTE",
    "PICKLE_LAST_BYTE",
    "TEMP_MARK",
    "TEMP_SUFFIXES",
    "LegacyFile",
    "LegacyFormatError",
    "LegacyPickleRefusedError",
    "QuixImportError",
    "StateType",
    "decode_legacy_file",
    "is_legacy_temp_file",
    "parse_legacy_file",
]

CODEC_BINARY: Final = ord("b")
CRC_SIZE: Final = 4
MIN_FILE_SIZE: Final = 5  # codec + crc: shorter is malformed (reference)
MAX_7BIT_BYTES: Final = 5  # an int32 in 7-bit groups
TEMP_SUFFIXES: Final = (".tmpf", ".bckf")  # temp and backup files of the 0.5.6+ atomic write
TEMP_MARK: Final = "~"
PICKLE_FIRST_BYTE: Final = 0x80  # PROTO opcode
PICKLE_LAST_BYTE: Final = ord(".")  # STOP opcode

_CRC: Final = struct.Struct(">I")
_INT64: Final = struct.Struct("<q")
_DOUBLE: Final = struct.Struct("<d")
_INT32: Final = struct.Struct("<i")
assert _CRC.size == CRC_SIZE and _INT64.size == 8 and _DOUBLE.size == 8 and _INT32.size == 4

_HEADER_SIZE: Final = 2  # codec + type
_BOOL_SIZES: Final = {0: False, 1: True}


# ============================================================================ types
class StateType(Enum):
    """The type of a legacy state value: the legacy ``quixstreams.state.StateType``.

    The member names and numbers are the legacy Python enum's. The one-letter
    codes of the legacy files (``'b'`` bool, ``'l'`` long, ...) are
    :attr:`file_code`. It is the type of a
    :class:`logstate.compat.quixstreams.StateValue`, and importable from there.
    """

    Binary = 0
    Bool = 1
    Long = 2
    Double = 3
    String = 4
    Object = 5

    @property
    def file_code(self) -> str:
        """The type byte (one ASCII letter) of this type in a legacy state file."""
        return _FILE_CODES[self]

    @classmethod
    def from_file_code(cls, code: str) -> StateType:
        """The type whose legacy file type byte is ``code``.

        Raises:
            ValueError: ``code`` is not one of ``b l d a o s``.
        """
        for member, member_code in _FILE_CODES.items():
            if member_code == code:
                return member
        raise ValueError(f"{code!r} is not a legacy state type code (b, l, d, a, o or s)")


_FILE_CODES: dict[StateType, str] = {
    StateType.Binary: "a",
    StateType.Bool: "b",
    StateType.Long: "l",
    StateType.Double: "d",
    StateType.String: "s",
    StateType.Object: "o",
}
_TYPES: Final = {ord(member.file_code): member for member in StateType}


# ============================================================================ errors
class QuixImportError(LogstateError):
    """Base of the errors of a legacy file that cannot be imported."""


class LegacyFormatError(QuixImportError, CorruptionError):
    """A legacy state file is malformed.

    Attributes:
        path: the file ("" when decoding plain bytes).
        offset: byte offset of the problem within the file.
        reason: what is wrong, in words.
    """


class LegacyPickleRefusedError(QuixImportError, PickleNotAllowedError):
    """A legacy file holds an object (a pickle) and ``allow_pickle`` is False.

    Attributes:
        path: the file ("" when decoding plain bytes).
    """

    def __init__(self, path: str = "") -> None:
        self.path = path
        where = f"{path} holds" if path else "the file holds"
        super().__init__(
            f"{where} an object value (a Python pickle), refused: allow_pickle=False "
            "(loading a pickle can run code; allow it only for state you trust)"
        )

    def __reduce__(self) -> tuple[type[LegacyPickleRefusedError], tuple[str]]:
        return (type(self), (self.path,))


# ============================================================================ decoding
class LegacyFile(NamedTuple):
    """One legacy file, checked but not yet turned into a Python value.

    ``payload`` is the decoded payload for every type but ``Object``, whose
    payload is the pickle's bytes (or None for a null object).
    """

    type: StateType
    payload: object


def _fail(offset: int, reason: str) -> LegacyFormatError:
    return LegacyFormatError("", offset, reason)


def _read_length_prefixed(data: bytes, pos: int, end: int, what: str) -> bytes | None:
    """An int32 length (-1: null) then that many bytes, filling exactly [pos, end)."""
    if end - pos < _INT32.size:
        raise _fail(pos, f"{what} payload truncated: {end - pos} bytes where a 4-byte length is")
    (length,) = _INT32.unpack_from(data, pos)
    pos += _INT32.size
    if length == -1:
        if pos != end:
            raise _fail(pos, f"{end - pos} unexpected bytes after a null {what}")
        return None
    if length < 0:
        raise _fail(pos - _INT32.size, f"{what} length is {length} (only -1, null, is negative)")
    if length > end - pos:
        raise _fail(pos, f"{what} payload truncated: length {length}, {end - pos} bytes present")
    if length < end - pos:
        raise _fail(pos + length, f"{end - pos - length} unexpected bytes after the {what}")
    return data[pos:end]


def _read_7bit_length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A ``BinaryWriter.Write(string)`` length prefix: returns (length, position after)."""
    start = pos
    value = 0
    for shift in range(0, 7 * MAX_7BIT_BYTES, 7):
        if pos >= end:
            raise _fail(start, "string length prefix truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > 0x7FFFFFFF:
                raise _fail(start, f"string length {value} exceeds the int32 range")
            return value, pos
    raise _fail(start, f"string length prefix longer than {MAX_7BIT_BYTES} bytes")


def parse_legacy_file(data: bytes | bytearray | memoryview) -> LegacyFile:
    """Check one legacy state file and split it into its type and payload.

    Nothing is unpickled: an object's payload is its pickle bytes, checked only
    for the first byte 0x80 and last byte ``.`` as the legacy reader did.

    Args:
        data: the whole file.

    Returns:
        The file's :class:`StateType` and payload.

    Raises:
        LegacyFormatError: the file is malformed (its ``offset`` and
            ``reason`` say where and what): shorter than 5 bytes, not codec
            ``b``, CRC mismatch, unknown type byte, a payload that does not
            fill the file exactly, a bad length, invalid UTF-8, a bool byte
            other than 0 or 1, or an object payload that is not a pickle.
    """
    data = bytes(data)
    size = len(data)
    if size < MIN_FILE_SIZE:
        raise _fail(0, f"file is {size} bytes; a legacy state file has at least {MIN_FILE_SIZE}")
    if data[0] != CODEC_BINARY:
        raise _fail(0, f"codec byte is 0x{data[0]:02x}, not 0x62 ('b'): not a legacy state file")
    end = size - CRC_SIZE
    (stored_crc,) = _CRC.unpack_from(data, end)
    computed_crc = zlib.crc32(data[:end])
    if stored_crc != computed_crc:
        # a torn or damaged file: the legacy writer wrote the CRC last
        raise _fail(end, f"CRC mismatch: stored 0x{stored_crc:08x}, computed 0x{computed_crc:08x}")
    if end < _HEADER_SIZE:
        raise _fail(1, "the type byte is missing")
    state_type = _TYPES.get(data[1])
    if state_type is None:
        raise _fail(1, f"unknown type byte 0x{data[1]:02x} (expected one of b, l, d, a, o, s)")
    pos = _HEADER_SIZE
    payload: object
    if state_type is StateType.Bool:
        if end - pos != 1:
            raise _fail(pos, f"bool payload is {end - pos} bytes, not 1")
        bool_value = _BOOL_SIZES.get(data[pos])
        if bool_value is None:
            raise _fail(pos, f"bool byte is {data[pos]}, not 0 or 1")
        payload = bool_value
    elif state_type is StateType.Long:
        if end - pos != _INT64.size:
            raise _fail(pos, f"long payload is {end - pos} bytes, not 8")
        payload = _INT64.unpack_from(data, pos)[0]
    elif state_type is StateType.Double:
        if end - pos != _DOUBLE.size:
            raise _fail(pos, f"double payload is {end - pos} bytes, not 8")
        payload = _DOUBLE.unpack_from(data, pos)[0]
    elif state_type is StateType.Binary:
        payload = _read_length_prefixed(data, pos, end, "binary")
    elif state_type is StateType.Object:
        pickled = _read_length_prefixed(data, pos, end, "object")
        if pickled is not None:
            if not pickled or pickled[0] != PICKLE_FIRST_BYTE:
                raise _fail(pos + 4, "object payload is not a pickle (first byte is not 0x80)")
            if pickled[-1] != PICKLE_LAST_BYTE:
                raise _fail(end - 1, "object payload is not a pickle (last byte is not '.')")
        payload = pickled
    else:  # StateType.String
        length, pos = _read_7bit_length(data, pos, end)
        if length > end - pos:
            raise _fail(pos, f"string truncated: length {length}, {end - pos} bytes present")
        if length < end - pos:
            raise _fail(pos + length, f"{end - pos - length} unexpected bytes after the string")
        try:
            payload = data[pos:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(pos + exc.start, f"string is not valid UTF-8: {exc.reason}") from None
    return LegacyFile(state_type, payload)


def decode_legacy_file(
    data: bytes | bytearray | memoryview, *, allow_pickle: bool = True
) -> object:
    """The Python value of one legacy state file, as its type byte says.

    ``b`` -> bool, ``l`` -> int, ``d`` -> float, ``s`` -> str, ``a`` -> bytes
    (None when null), ``o`` -> the unpickled object (None when null).

    Args:
        data: the whole file.
        allow_pickle: False refuses an object value without unpickling it.

    Returns:
        The value.

    Raises:
        LegacyFormatError: the file is malformed (see :func:`parse_legacy_file`),
            or its object payload fails to unpickle.
        LegacyPickleRefusedError: an object value and ``allow_pickle`` is False.
        Both are :class:`QuixImportError`; nothing else is raised.
    """
    legacy = parse_legacy_file(data)
    if legacy.type is not StateType.Object or legacy.payload is None:
        return legacy.payload
    if not allow_pickle:
        raise LegacyPickleRefusedError()
    assert isinstance(legacy.payload, bytes)
    try:
        return pickle.loads(legacy.payload)
    except Exception as exc:  # anything the pickle's own code raises: the file is bad
        raise _fail(
            _HEADER_SIZE + _INT32.size,
            f"object payload does not unpickle: {type(exc).__name__}: {exc}",
        ) from exc


def is_legacy_temp_file(name: str) -> bool:
    """True for a temp or backup file of the legacy writer (not a key)."""
    return TEMP_MARK in name or name.endswith(TEMP_SUFFIXES)
