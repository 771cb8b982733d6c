"""Typed value encoding: Python value <-> ``tag byte + data``.

Owns: the value tags and the exact round-trip rules (bool stays bool, ints of
any size, floats bit-exact, bytearray stays bytearray, anything else through
pickle protocol 5).
Must never: do I/O, import ``os``/``time``/``logging``, or know about records
and files (the framing lives in ``_format``).

Dispatch is on the exact type (``type(v) is int``), so ``True`` is never
stored as ``1`` (the legacy bug) and a subclass of ``str`` keeps its class
through pickle.
"""

from __future__ import annotations

import pickle
import struct
from typing import Final

from logstate._errors import CorruptionError, PickleNotAllowedError

__all__ = [
    "EXPIRES_HEADER",
    "TAG_BYTEARRAY",
    "TAG_BYTES",
    "TAG_EXPIRES",
    "TAG_FALSE",
    "TAG_FLOAT",
    "TAG_INT",
    "TAG_NONE",
    "TAG_PICKLE",
    "TAG_STR",
    "TAG_TRUE",
    "decode_value",
    "encode_value",
    "expiring_value",
    "split_expiring",
]

# Value tags: the first byte of every encoded value. 0 is never a tag.
TAG_NONE: Final = 1
TAG_FALSE: Final = 2
TAG_TRUE: Final = 3
TAG_INT: Final = 4  # signed little-endian two's complement, minimal length (>= 1 byte)
TAG_FLOAT: Final = 5  # IEEE-754 binary64 little-endian: bit-exact (-0.0, inf, nan payloads)
TAG_STR: Final = 6  # UTF-8 with surrogatepass, so every Python str round-trips
TAG_BYTES: Final = 7
TAG_BYTEARRAY: Final = 8
TAG_PICKLE: Final = 9  # pickle protocol 5
# A value with an expiry time (format 2): deadline and write time, seconds
# since the epoch (IEEE-754 binary64, little-endian), then the value itself
# (tag + data, never another TAG_EXPIRES).
TAG_EXPIRES: Final = 10

PICKLE_PROTOCOL: Final = 5

_FLOAT: Final = struct.Struct("<d")
assert _FLOAT.size == 8
EXPIRES_HEADER: Final = struct.Struct("<Bdd")  # TAG_EXPIRES, deadline_s, written_s
assert EXPIRES_HEADER.size == 17

_INF: Final = float("inf")
_NONE_BYTES: Final = bytes((TAG_NONE,))
_FALSE_BYTES: Final = bytes((TAG_FALSE,))
_TRUE_BYTES: Final = bytes((TAG_TRUE,))
_STR_PREFIX: Final = bytes((TAG_STR,))
BYTES_PREFIX: Final = bytes((TAG_BYTES,))
_BYTEARRAY_PREFIX: Final = bytes((TAG_BYTEARRAY,))
_INT_PREFIX: Final = bytes((TAG_INT,))
_FLOAT_PREFIX: Final = bytes((TAG_FLOAT,))
_PICKLE_PREFIX: Final = bytes((TAG_PICKLE,))


def encode_value(value: object, allow_pickle: bool = True) -> bytes:
    """Encode one value as ``tag + data``.

    Args:
        value: any value; types without a tag of their own go through pickle.
        allow_pickle: when False, a value that would need pickle is refused.

    Returns:
        The encoded bytes (at least one byte: the tag).

    Raises:
        PickleNotAllowedError: the value needs pickle and ``allow_pickle`` is False.
        TypeError: the value cannot be pickled (a lambda, an open file, ...).
    """
    t = type(value)
    if t is str:
        text: str = value  # type: ignore[assignment]
        return _STR_PREFIX + text.encode("utf-8", "surrogatepass")
    if t is bytes:
        return BYTES_PREFIX + value  # type: ignore[operator]
    if t is int:
        n: int = value  # type: ignore[assignment]
        return _INT_PREFIX + n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    if t is float:
        return _FLOAT_PREFIX + _FLOAT.pack(value)
    if t is bool:
        return _TRUE_BYTES if value else _FALSE_BYTES
    if value is None:
        return _NONE_BYTES
    if t is bytearray:
        array: bytearray = value  # type: ignore[assignment]
        return _BYTEARRAY_PREFIX + bytes(array)
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"value of type {t.__qualname__} would be stored with pickle, "
            "and this storage was opened with allow_pickle=False"
        )
    try:
        data = pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    except Exception as exc:  # pickle raises many types (PicklingError, TypeError, AttributeError)
        raise TypeError(
            f"cannot store a value of type {t.__qualname__}: pickling it failed: {exc}"
        ) from exc
    return _PICKLE_PREFIX + data


def expiring_value(encoded: bytes, deadline_s: float, written_s: float) -> bytes:
    """``encoded`` (from :func:`encode_value`) wrapped with its expiry time.

    Args:
        deadline_s: when the value expires (seconds since the epoch; the
            storage's clock); finite.
        written_s: the storage's clock when it was written (<= deadline_s).
    """
    return EXPIRES_HEADER.pack(TAG_EXPIRES, deadline_s, written_s) + encoded


def split_expiring(data: bytes | memoryview) -> tuple[float, float, bytes | memoryview]:
    """(deadline_s, written_s, the value's own encoding) of a TAG_EXPIRES value.

    Raises:
        CorruptionError: shorter than its header, times not finite or out of
            order, or another TAG_EXPIRES inside (offset 0, path "").
    """
    if len(data) <= EXPIRES_HEADER.size:
        raise CorruptionError("", 0, f"expiring value of {len(data)} bytes is truncated")
    _tag, deadline_s, written_s = EXPIRES_HEADER.unpack_from(data, 0)
    if not (0.0 <= written_s <= deadline_s < _INF):  # also refuses nan
        raise CorruptionError(
            "", 0, f"expiring value with bad times (deadline {deadline_s!r}, written {written_s!r})"
        )
    inner = data[EXPIRES_HEADER.size :]
    if inner[0] == TAG_EXPIRES:
        raise CorruptionError("", 0, "expiring value inside an expiring value")
    return deadline_s, written_s, inner


def decode_value(data: bytes | memoryview, allow_pickle: bool = True) -> object:
    """Decode bytes produced by :func:`encode_value`.

    Args:
        data: the encoded value (tag + data), exactly.
        allow_pickle: when False, a pickled value raises instead of being loaded.

    Returns:
        The value, of the exact type it was stored with.

    Raises:
        CorruptionError: empty data, unknown tag, or a malformed payload
            (offset 0, path ""; the caller re-raises with the file position).
        PickleNotAllowedError: a pickled value and ``allow_pickle`` is False.
    """
    if not data:
        raise CorruptionError("", 0, "empty value")
    tag = data[0]
    if tag == TAG_STR:
        try:
            return bytes(data[1:]).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise CorruptionError("", 0, f"string value is not valid UTF-8: {exc}") from None
    if tag == TAG_BYTES:
        return bytes(data[1:])
    if tag == TAG_INT:
        if len(data) < 2:
            raise CorruptionError("", 0, "integer value has no bytes")
        return int.from_bytes(data[1:], "little", signed=True)
    if tag == TAG_FLOAT:
        if len(data) != 1 + _FLOAT.size:
            raise CorruptionError("", 0, f"float value has {len(data) - 1} bytes, expected 8")
        return _FLOAT.unpack_from(data, 1)[0]
    if tag in (TAG_TRUE, TAG_FALSE, TAG_NONE):
        if len(data) != 1:
            raise CorruptionError("", 0, "constant value has trailing bytes")
        return True if tag == TAG_TRUE else (False if tag == TAG_FALSE else None)
    if tag == TAG_BYTEARRAY:
        return bytearray(data[1:])
    if tag == TAG_PICKLE:
        if not allow_pickle:
            raise PickleNotAllowedError(
                "stored value is a pickle, and this storage was opened with allow_pickle=False "
                "(loading a pickle can execute code)"
            )
        try:
            return pickle.loads(data[1:])
        except Exception as exc:  # a pickle can fail in arbitrary ways
            raise CorruptionError("", 0, f"pickled value cannot be loaded: {exc!r}") from None
    if tag == TAG_EXPIRES:  # the value itself (whether it expired is the storage's business)
        inner = split_expiring(data)[2]
        try:
            return decode_value(inner, allow_pickle)
        except CorruptionError as exc:
            raise CorruptionError("", EXPIRES_HEADER.size + exc.offset, exc.reason) from None
    raise CorruptionError("", 0, f"unknown value tag {tag}")
