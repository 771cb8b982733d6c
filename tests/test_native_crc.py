"""CRC-32C of the C extension: equal to crcmod's, both implementations, any alignment."""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import ModuleType

import pytest

from logstate import _crc
from tests.native_required import native_extension


@pytest.fixture(params=["instruction", "table"])
def ext(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The extension, running the CPU instruction (where it has one) or the table."""
    ext = native_extension()
    name = ext._force_crc_table(request.param == "table")
    if request.param == "table":
        assert name == "table"
    try:
        yield ext
    finally:
        ext._force_crc_table(False)


def test_every_length_and_offset_equals_crcmod(ext: ModuleType) -> None:
    rng = random.Random(13)
    for length in range(301):
        data = rng.randbytes(length + 16)
        for start in range(9):
            chunk = data[start : start + length]
            expected = _crc.crcmod_crc32c(chunk)
            assert ext.crc32c(chunk) == expected, (length, start)
            assert ext.crc32c(memoryview(data)[start : start + length]) == expected
            assert ext.crc32c(bytearray(chunk)) == expected


def test_continuation_equals_the_whole(ext: ModuleType) -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = rng.randbytes(rng.randrange(0, 400))
        cut = rng.randrange(0, len(data) + 1)
        start = rng.randrange(0, 1 << 32)
        assert ext.crc32c(data[cut:], ext.crc32c(data[:cut])) == _crc.crcmod_crc32c(data)
        assert ext.crc32c(data, start) == _crc.crcmod_crc32c(data, start)


def test_large_inputs_of_every_buffer_type(ext: ModuleType) -> None:
    data = random.Random(3).randbytes((1 << 20) + 5)  # summed with the GIL released
    expected = _crc.crcmod_crc32c(data)
    assert ext.crc32c(data) == expected
    assert ext.crc32c(bytearray(data)) == expected
    assert ext.crc32c(memoryview(data)) == expected
    assert ext.crc32c(b"123456789") == 0xE3069283


def test_bad_arguments_raise() -> None:
    ext = native_extension()
    with pytest.raises(TypeError):
        ext.crc32c("text")
    with pytest.raises(OverflowError):
        ext.crc32c(b"", 1 << 32)
    with pytest.raises(TypeError):
        ext.crc32c()


def test_the_instruction_is_chosen_where_the_cpu_has_it() -> None:
    ext = native_extension()
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpuinfo.read()
    if " sse4_2" in flags:
        assert ext.crc_implementation() == "sse4.2"
    assert f"logstate._cnative ({ext.crc_implementation()})" == _crc.CRC_IMPLEMENTATION
    assert _crc.crc_bytes is ext.crc32c
