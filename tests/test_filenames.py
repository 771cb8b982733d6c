"""Tests of the file names of a storage directory (logstate._filenames)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from logstate import LocalFileStorage
from logstate._filenames import (
    COMPACT_TMP_SUFFIX,
    DAMAGED_SUFFIX,
    LOCK_FILE_NAME,
    SNAPSHOT_FILE_NAME,
    TMP_SUFFIX,
    TORN_SUFFIX,
    aside_file_name,
    parse_segment_file_name,
    segment_file_name,
)
from logstate._format import MAX_SEGMENT_NUMBER


def test_segment_file_name_has_ten_digits() -> None:
    assert segment_file_name(0) == "segment-0000000000.seg"
    assert segment_file_name(1) == "segment-0000000001.seg"
    assert segment_file_name(1234567890) == "segment-1234567890.seg"
    assert segment_file_name(MAX_SEGMENT_NUMBER) == "segment-4294967295.seg"


@given(st.integers(0, MAX_SEGMENT_NUMBER))
def test_every_segment_number_round_trips_through_its_file_name(number: int) -> None:
    assert parse_segment_file_name(segment_file_name(number)) == number


@pytest.mark.parametrize(
    "name",
    [
        "segment-000000001.seg",  # nine digits
        "segment-00000000001.seg",  # eleven
        "segment-.seg",
        "segment-0000000001",  # no suffix
        "0000000001.seg",  # no prefix
        "segment-0000000001.seg" + TMP_SUFFIX,
        "segment-0000000001.seg" + COMPACT_TMP_SUFFIX,
        "segment-0000000001.seg.24" + TORN_SUFFIX,
        "segment-0000000001.seg.24" + DAMAGED_SUFFIX + ".1",
        "Segment-0000000001.seg",
        "segment_0000000001.seg",
        "segment-0000000001.SEG",
        "segment-0000000001.segx",
        "xsegment-0000000001.seg",
        "segment-00000000a1.seg",
        "segment-+000000001.seg",
        "segment--000000001.seg",
        "segment- 000000001.seg",
        "segment-000000001 .seg",
        "segment-0x00000001.seg",
        "segment-0_00000001.seg",
        "segment-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661.seg",  # Arabic-Indic
        "segment-000000000\u00b2.seg",  # superscript two: isdigit(), but int() refuses it
        "segment-\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11.seg",  # fullwidth
        SNAPSHOT_FILE_NAME,
        LOCK_FILE_NAME,
        "",
    ],
)
def test_a_near_miss_is_not_a_segment_file_name(name: str) -> None:
    assert parse_segment_file_name(name) is None


def test_aside_file_name_names_the_segment_the_offset_and_the_kind() -> None:
    path = "/data/store/segment-0000000003.seg"
    assert aside_file_name(path, 4096, TORN_SUFFIX) == path + ".4096.torn"
    assert aside_file_name(path, 24, DAMAGED_SUFFIX) == path + ".24.damaged"
    assert aside_file_name(path, 24, DAMAGED_SUFFIX, attempt=0) == path + ".24.damaged"
    assert aside_file_name(path, 24, DAMAGED_SUFFIX, attempt=1) == path + ".24.damaged.1"
    assert aside_file_name(path, 0, TORN_SUFFIX, attempt=12) == path + ".0.torn.12"


def test_an_aside_file_is_not_taken_for_a_segment() -> None:
    name = segment_file_name(3)
    for aside in (
        aside_file_name(name, 24, TORN_SUFFIX),
        aside_file_name(name, 24, DAMAGED_SUFFIX, attempt=2),
    ):
        assert parse_segment_file_name(aside) is None


def test_a_stray_file_named_with_other_digits_does_not_stop_an_open(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, sync="none") as store:
        store["k"] = 1
    for stray in ("segment-000000000\u00b2.seg", "segment-" + "\u0660" * 9 + "\u0662.seg"):
        (tmp_path / stray).write_bytes(b"not a segment")
    with LocalFileStorage(tmp_path, sync="none") as store:
        assert store["k"] == 1
