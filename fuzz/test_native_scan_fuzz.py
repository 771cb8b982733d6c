"""Fuzzing the C scanner of an open without a snapshot (csrc/scan.c ``replay_records``).

Guarantee checked: any bytes given to the C scanner, from any offset, never
crash it and never raise; it returns where it stopped, within the bytes, and
what it applied up to there is exactly what the pure replay applies to the
same records (``Keydir.apply_frame`` over ``scan_records``' frames: the
same indexes, live bytes and highest seq): the records it consumed tile the
bytes from the start offset to where it stopped, with no damage among them,
and none of them has an expiry time. What it does not handle (damage, other
record types, bodies that do not parse) it leaves to the Python path.

The C frame check (``check_frames``, the restore's) is given the same bytes
and must stop where ``tests/test_native_check.py``'s ``python_check`` stops.

Inputs: those of fuzz/test_decoder_fuzz.py: arbitrary bytes; records and
groups with correct checksums around arbitrary bodies; the real segments of
fuzz/corpus/ mutated, optionally with checksums recomputed.

Run (a few seconds with the default profile; fuzz/conftest.py has the profiles)::

    python -m pytest fuzz/test_native_scan_fuzz.py -q
    LOGSTATE_FUZZ_PROFILE=long python -m pytest fuzz/test_native_scan_fuzz.py -q

Without the C path the tests fail (skipped when ``LOGSTATE_PURE=1`` asks for pure Python).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from test_decoder_fuzz import (  # fuzz/ is on sys.path: pytest puts it there
    CORPUS,
    FUZZ,
    Mutation,
    mutate,
    mutations,
    refresh_checksums,
    segments,
)

from logstate._format import SEGMENT_HEADER_SIZE
from logstate._keydir import Keydir
from logstate._native import EXT, PURE_REQUESTED
from logstate._scan import Damage, scan_records
from tests.test_native_check import python_check


@pytest.fixture(autouse=True, scope="module")
def _c_path_in_use() -> None:
    """These tests need the C path: they fail without it, unless LOGSTATE_PURE=1 asks for that."""
    if PURE_REQUESTED:
        pytest.skip("LOGSTATE_PURE=1: pure Python asked for")
    if EXT is None:
        pytest.fail("the C path is not in use (logstate._cnative did not build or import)")


# namespaces the index already has (a set into another one is handed back)
NAMESPACES = ("", "a", "a/b", "child", "child/grand")
SEGMENT = 7
shifts = st.sampled_from([0, -(1 << 30), -12345, -(1 << 39)])


def check_native_replay(data: bytes, start: int, shift: int) -> None:
    """The C scanner from ``start`` applies exactly what the pure replay does up to its stop."""
    assert EXT is not None
    theirs = Keydir("fuzz")
    for ns in NAMESPACES:
        theirs.ensure(ns)
    namespaces = copy.deepcopy(theirs.namespaces)
    stop, records, seq, live = EXT.replay_records(data, start, namespaces, SEGMENT, shift)
    assert start <= stop <= max(start, len(data))
    damage: list[Damage] = []
    applied = 0
    high = 0
    at = start
    first = 1  # the first frame's seq (a first_seq for check_frames)
    for frame in scan_records(data, start, damage.append):
        first = frame.seq if at == start else first
        if frame.offset >= stop:
            break
        assert not damage, f"the C scan applied records past damage at {damage[0]}"
        assert frame.offset == at, "the C scan skipped bytes"
        theirs.apply_frame(data, frame, SEGMENT, shift)  # must not raise: C took it
        applied += 1
        high = max(high, frame.seq)
        at = frame.offset + frame.size
    assert at == stop, "the C scan stopped inside a record"
    assert (records, seq, live) == (applied, high, theirs.live_bytes)
    assert namespaces == theirs.namespaces
    assert not theirs.expiring, "the C scan applied a value with an expiry time"
    # the frame check (check_frames) over the same bytes passes what Python passes
    for first_seq in sorted({0, 1, first}):
        for bodies in (False, True):
            got = EXT.check_frames(data, start, first_seq, bodies)
            assert got == python_check(data, start, first_seq, bodies)


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 64), shifts)
@example(bytes(64), 0, 0)
@example(b"\xff" * 64, 0, 0)
def test_arbitrary_bytes_never_crash_the_c_scanner(data: bytes, start: int, shift: int) -> None:
    check_native_replay(data, min(start, len(data)), shift)


@FUZZ
@given(segments, shifts)
def test_records_with_correct_checksums_around_any_body_replay_as_in_python(
    data: bytes, shift: int
) -> None:
    check_native_replay(data, SEGMENT_HEADER_SIZE, shift)


@FUZZ
@given(
    st.sampled_from(sorted(CORPUS) or [""]),
    st.lists(mutations, min_size=0, max_size=6),
    st.booleans(),
    shifts,
)
def test_mutated_real_segments_replay_as_in_python(
    seed: str, steps: list[Mutation], recompute: bool, shift: int
) -> None:
    data = mutate(CORPUS.get(seed, b""), steps)
    if recompute:
        fixed = bytearray(data)
        refresh_checksums(fixed, SEGMENT_HEADER_SIZE)
        data = bytes(fixed)
    check_native_replay(data, min(SEGMENT_HEADER_SIZE, len(data)), shift)


def test_an_offset_or_shift_that_puts_a_location_out_of_range_is_refused() -> None:
    assert EXT is not None
    namespaces: dict[str, Any] = {"": {}}
    for start, shift in ((-1, 0), (10, 0), (2, 3), (0, 5 - (1 << 40) - 1)):
        with pytest.raises(ValueError, match="out of range"):
            EXT.replay_records(b"short", start, namespaces, SEGMENT, shift)
    assert EXT.replay_records(b"short", 2, namespaces, SEGMENT, 2) == (2, 0, 0, 0)
