"""Tests of the value codec (logstate._values): exact round-trips, pickle policy, damage."""

from __future__ import annotations

import dataclasses
import math
import pickle
import struct
import threading
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from logstate import CorruptionError, LogstateError, PickleNotAllowedError
from logstate._values import (
    TAG_BYTEARRAY,
    TAG_BYTES,
    TAG_EXPIRES,
    TAG_FALSE,
    TAG_FLOAT,
    TAG_INT,
    TAG_NONE,
    TAG_PICKLE,
    TAG_STR,
    TAG_TRUE,
    decode_value,
    encode_value,
)

ALL_TAGS = (
    TAG_NONE,
    TAG_FALSE,
    TAG_TRUE,
    TAG_INT,
    TAG_FLOAT,
    TAG_STR,
    TAG_BYTES,
    TAG_BYTEARRAY,
    TAG_PICKLE,
    TAG_EXPIRES,  # test_expiry.py
)


@dataclasses.dataclass
class Point:
    """A custom picklable class (module level, so pickle finds it by name)."""

    x: int
    y: list[str]


class TaggedStr(str):
    """A str subclass: must keep its class, so it goes through pickle."""


LOADED: list[str] = []  # what unpickling a test payload appended (it must not run when refused)


def mark_loaded(name: str) -> None:
    """Called by unpickling a ``Boom`` payload (found by name, so module level)."""
    LOADED.append(name)


def float_bits(value: float) -> bytes:
    return struct.pack("<d", value)


def round_trip(value: object, allow_pickle: bool = True) -> object:
    return decode_value(encode_value(value, allow_pickle), allow_pickle)


# --------------------------------------------------------------------------- round-trips
def test_none_and_bools_round_trip_as_one_byte_constants() -> None:
    assert encode_value(None) == bytes([TAG_NONE])
    assert encode_value(False) == bytes([TAG_FALSE])
    assert encode_value(True) == bytes([TAG_TRUE])
    assert round_trip(None) is None
    assert round_trip(True) is True
    assert round_trip(False) is False


@given(st.booleans())
def test_bool_stays_bool_and_is_never_stored_as_an_int(value: bool) -> None:
    decoded = round_trip(value)
    assert type(decoded) is bool
    assert decoded is value
    assert encode_value(value) != encode_value(int(value))


@given(st.integers() | st.integers(min_value=-(2**4000), max_value=2**4000))
@example(0)
@example(-1)
@example(127)
@example(128)
@example(-128)
@example(-129)
@example(2**63)
@example(-(2**63) - 1)
@example(2**64)
@example(10**1000)
@example(-(10**1000))
def test_int_of_any_size_round_trips_as_int(value: int) -> None:
    encoded = encode_value(value)
    assert encoded[0] == TAG_INT
    # signed two's complement, little-endian, at most one byte more than needed
    assert len(encoded) - 1 <= value.bit_length() // 8 + 1
    decoded = decode_value(encoded)
    assert type(decoded) is int
    assert decoded == value


@given(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True))
@example(0.0)
@example(-0.0)
@example(math.inf)
@example(-math.inf)
@example(math.nan)
@example(struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000001))[0])  # signalling nan
@example(struct.unpack("<d", struct.pack("<Q", 0xFFF8000000000123))[0])  # negative nan, payload
@example(5e-324)
def test_float_round_trips_bit_exactly(value: float) -> None:
    encoded = encode_value(value)
    assert encoded == bytes([TAG_FLOAT]) + float_bits(value)
    decoded = decode_value(encoded)
    assert type(decoded) is float
    assert float_bits(decoded) == float_bits(value)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_float_with_any_bit_pattern_round_trips_bit_exactly(bits: int) -> None:
    as_float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    decoded = round_trip(as_float)
    assert isinstance(decoded, float)
    assert struct.unpack("<Q", float_bits(decoded))[0] == bits


def test_negative_zero_keeps_its_sign() -> None:
    decoded = round_trip(-0.0)
    assert isinstance(decoded, float)
    assert math.copysign(1.0, decoded) == -1.0


@given(
    st.text(st.characters(exclude_categories=()))  # surrogates included
    | st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010))  # mostly surrogates
)
@example("")
@example("\ud800")  # lone high surrogate
@example("\udfff")  # lone low surrogate
@example("a\udc80b")
@example("\U0010ffff")
@example("\x00")
def test_str_round_trips_including_lone_surrogates(value: str) -> None:
    encoded = encode_value(value)
    assert encoded[0] == TAG_STR
    decoded = decode_value(encoded)
    assert type(decoded) is str
    assert decoded == value


def test_empty_str_is_just_its_tag() -> None:
    assert encode_value("") == bytes([TAG_STR])
    assert round_trip("") == ""


@given(st.binary())
@example(b"")
def test_bytes_round_trip_as_bytes(value: bytes) -> None:
    encoded = encode_value(value)
    assert encoded == bytes([TAG_BYTES]) + value
    decoded = decode_value(encoded)
    assert type(decoded) is bytes
    assert decoded == value


@given(st.binary().map(bytearray))
@example(bytearray())
def test_bytearray_stays_bytearray(value: bytearray) -> None:
    encoded = encode_value(value)
    assert encoded[0] == TAG_BYTEARRAY
    decoded = decode_value(encoded)
    assert type(decoded) is bytearray
    assert decoded == value


def test_bytes_and_bytearray_with_equal_content_decode_to_their_own_types() -> None:
    assert type(round_trip(b"abc")) is bytes
    assert type(round_trip(bytearray(b"abc"))) is bytearray


picklable = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.binary(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=5), children, max_size=4)
        | st.tuples(children, children)
        | st.frozensets(st.integers(), max_size=4)
    ),
    max_leaves=12,
).filter(lambda v: type(v) in (list, dict, tuple, frozenset))


@given(picklable)
def test_containers_round_trip_through_pickle(value: object) -> None:
    encoded = encode_value(value)
    assert encoded[0] == TAG_PICKLE
    assert pickle.loads(encoded[1:]) == value
    decoded = decode_value(encoded)
    assert type(decoded) is type(value)
    assert decoded == value


@given(st.builds(Point, st.integers(), st.lists(st.text(max_size=3), max_size=3)))
def test_custom_picklable_object_round_trips_with_its_class(value: Point) -> None:
    decoded = round_trip(value)
    assert type(decoded) is Point
    assert decoded == value


@pytest.mark.parametrize(
    "value",
    [TaggedStr("x"), OrderedDict(a=1), {1, 2}, 1 + 2j, range(3), Point(1, ["a"])],
    ids=["str-subclass", "ordereddict", "set", "complex", "range", "dataclass"],
)
def test_values_without_a_tag_of_their_own_keep_their_exact_type(value: object) -> None:
    encoded = encode_value(value)
    assert encoded[0] == TAG_PICKLE
    decoded = decode_value(encoded)
    assert type(decoded) is type(value)
    assert decoded == value


def test_decoding_accepts_a_memoryview() -> None:
    for value in (None, True, 7, 2.5, "s", b"b", bytearray(b"ba"), [1]):
        view = memoryview(b"\x00" + encode_value(value) + b"\x00")[1:-1]
        assert decode_value(view) == value


# --------------------------------------------------------------------------- pickle policy
@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, Point(1, []), TaggedStr("x"), (1,)])
def test_allow_pickle_false_refuses_to_encode_a_value_needing_pickle(value: object) -> None:
    with pytest.raises(PickleNotAllowedError) as info:
        encode_value(value, allow_pickle=False)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, LogstateError)
    assert type(value).__qualname__ in str(info.value)


def test_allow_pickle_false_refuses_to_decode_a_pickle() -> None:
    encoded = encode_value({"a": 1})
    with pytest.raises(PickleNotAllowedError) as info:
        decode_value(encoded, allow_pickle=False)
    assert isinstance(info.value, TypeError)
    assert not isinstance(info.value, CorruptionError)


def test_allow_pickle_false_does_not_load_the_pickle() -> None:
    class Boom:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (mark_loaded, ("boom",))

    LOADED.clear()
    encoded = encode_value(Boom())
    with pytest.raises(PickleNotAllowedError):
        decode_value(encoded, allow_pickle=False)
    assert LOADED == []
    decode_value(encoded, allow_pickle=True)
    assert LOADED == ["boom"]


@given(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.binary().map(bytearray)
)
def test_allow_pickle_false_still_stores_every_tagged_type(value: object) -> None:
    encoded = encode_value(value, allow_pickle=False)
    assert encoded[0] != TAG_PICKLE
    assert encoded == encode_value(value)
    decoded = decode_value(encoded, allow_pickle=False)
    assert type(decoded) is type(value)
    assert decoded == value


# --------------------------------------------------------------------------- unpicklable
def test_unpicklable_value_raises_type_error_naming_its_type() -> None:
    with pytest.raises(TypeError, match="function") as info:
        encode_value(lambda: 1)
    assert not isinstance(info.value, PickleNotAllowedError)


def test_unpicklable_local_class_instance_raises_type_error_naming_its_class() -> None:
    class Local:
        pass

    with pytest.raises(TypeError, match="Local"):
        encode_value(Local())


def test_value_holding_a_lock_is_refused_with_type_error() -> None:
    with pytest.raises(TypeError, match="dict"):
        encode_value({"lock": threading.Lock()})


# --------------------------------------------------------------------------- damage
def test_empty_encoding_is_corruption() -> None:
    with pytest.raises(CorruptionError, match="empty"):
        decode_value(b"")


@pytest.mark.parametrize("tag", sorted(set(range(256)) - set(ALL_TAGS)))
def test_unknown_tag_is_corruption(tag: int) -> None:
    with pytest.raises(CorruptionError, match=f"unknown value tag {tag}"):
        decode_value(bytes([tag, 1, 2]))


@pytest.mark.parametrize("size", [0, 1, 7, 9, 16])
def test_float_with_wrong_length_is_corruption(size: int) -> None:
    with pytest.raises(CorruptionError, match="float"):
        decode_value(bytes([TAG_FLOAT]) + b"\x00" * size)


@pytest.mark.parametrize("tag", [TAG_NONE, TAG_FALSE, TAG_TRUE])
@pytest.mark.parametrize("trailing", [b"\x00", b"\x01", b"abc"])
def test_constant_with_trailing_bytes_is_corruption(tag: int, trailing: bytes) -> None:
    with pytest.raises(CorruptionError, match="trailing"):
        decode_value(bytes([tag]) + trailing)


def test_int_with_no_bytes_is_corruption() -> None:
    with pytest.raises(CorruptionError, match="integer"):
        decode_value(bytes([TAG_INT]))


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xf0\x28\x8c\xbc", b"\xc0\xaf", b"\xf8\x88\x80"],
    ids=["ff", "truncated-2", "bad-continuation", "truncated-3", "bad-4", "overlong", "5-byte"],
)
def test_str_with_bad_utf8_is_corruption(data: bytes) -> None:
    with pytest.raises(CorruptionError, match="UTF-8"):
        decode_value(bytes([TAG_STR]) + data)


def test_unloadable_pickle_is_corruption() -> None:
    with pytest.raises(CorruptionError, match="pickle"):
        decode_value(bytes([TAG_PICKLE]) + b"\x80\x05garbage")
    with pytest.raises(CorruptionError, match="pickle"):
        decode_value(bytes([TAG_PICKLE]))


def test_corruption_error_of_a_value_has_offset_zero_and_no_path() -> None:
    with pytest.raises(CorruptionError) as info:
        decode_value(bytes([TAG_FLOAT, 1]))
    assert info.value.path == ""
    assert info.value.offset == 0
    assert "float" in info.value.reason
