"""The C frame check (``csrc/scan.c`` ``check_frames``) passes what the Python checks pass.

The restore uses it twice (``logstate/replication/_build.py``): over the
segments a snapshot container brought (frames only: the last seq) and over
each record it appends after them (frames, seq and body), handing every
record it does not pass to the Python checks, which accept it or name what
is wrong. Checked here:

- differential (hypothesis): over random segments (the records of
  tests/test_native_scan.py: sets, deletes, groups, namespace records,
  checkpoints, expiring values, compressed groups, keys that are not UTF-8,
  damage, torn tails), from any offset, with and without a first seq and
  body checks, it stops where :func:`python_check` (the same walk over
  ``scan_records`` and ``replay_frame``) stops, with the same count and seq;
- its arguments: an offset outside the bytes, a seq outside 64 bits, a seq
  run that would pass 2**64;
- ``segments_last_seq`` and ``build_store`` give the same result, or the
  same error, with the C check and without it;
- a changed limit (a test's monkeypatch) keeps the Python checks.

These tests need the C path: they fail when it is not in use, unless
``LOGSTATE_PURE=1`` asks for pure Python (then they are skipped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logstate import CorruptionError, _replay, _scan
from logstate import _format as fmt
from logstate._filenames import segment_file_name
from logstate._scan import (
    FRAME_COMPRESSED_GROUP,
    SCAN_WINDOW,
    Damage,
    Frame,
    replay_frame,
    scan_records,
)
from logstate._values import TAG_EXPIRES
from logstate.replication import _build
from logstate.replication._build import build_store, segments_last_seq
from tests.test_native_scan import cnative, records, segment_bytes, set_body

__all__ = ["cnative", "python_check"]  # (the fixture, imported for the tests here)

U64 = (1 << 64) - 1
_HANDLED = (fmt.REC_SET, fmt.REC_DELETE)


def python_check(data: bytes, offset: int, first_seq: int, bodies: bool) -> tuple[int, int, int]:
    """What ``check_frames(data, offset, first_seq, bodies)`` must return, in Python.

    The whole frames ``scan_records`` yields from ``offset`` up to the first
    damage; stopping at the first whose seq is not ``first_seq`` + its index
    (``first_seq`` > 0), or (``bodies``) that is not a plain set/delete or an
    uncompressed group of them that ``replay_frame`` parses, with no value
    tagged as one with an expiry time (parsing or not: the replay's to read).
    """
    damage: list[Damage] = []
    at, count, high = offset, 0, 0
    for frame in scan_records(data, offset, damage.append):
        if damage or frame.offset != at:
            break
        if first_seq and frame.seq != first_seq + count:
            break
        if bodies:
            if frame.record_type not in (*_HANDLED, fmt.REC_GROUP):
                break
            try:
                kind, ops = replay_frame(data, frame.offset, frame.size, frame.record_type)
            except CorruptionError:
                break
            if kind == FRAME_COMPRESSED_GROUP:
                break
            if any(o[0] not in _HANDLED for o in ops) or _tagged_expiring(data, frame):
                break
        count += 1
        high = max(high, frame.seq)
        at = frame.offset + frame.size
    return at, count, high


def _tagged_expiring(data: bytes, frame: Frame) -> bool:
    """A set of this (parsed, uncompressed) record has a value tagged TAG_EXPIRES."""
    end = frame.offset + frame.size
    if frame.record_type == fmt.REC_SET:
        op = fmt.decode_op(fmt.REC_SET, data, frame.offset + fmt.RECORD_OVERHEAD, end)
        return data[op.value_start] == TAG_EXPIRES
    if frame.record_type != fmt.REC_GROUP:
        return False
    _compressed, buf, ops = fmt.decode_group(data[frame.offset + fmt.FRAME_HEADER_SIZE : end])
    return any(g.op.op_type == fmt.REC_SET and buf[g.op.value_start] == TAG_EXPIRES for g in ops)


# ============================================================================ differential
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    data=segment_bytes(1),
    start=st.integers(0, 400),
    first=st.sampled_from([0, 100, 101, 7, U64]),
    bodies=st.booleans(),
)
def test_c_and_python_checks_of_random_segments_are_equal(
    cnative: Any, data: bytes, start: int, first: int, bodies: bool
) -> None:
    offset = min(fmt.SEGMENT_HEADER_SIZE + start, len(data))
    assert cnative.check_frames(data, offset, first, bodies) == python_check(
        data, offset, first, bodies
    )
    view = memoryview(data)  # the same through the buffer protocol
    assert cnative.check_frames(view, offset, first, bodies) == python_check(
        data, offset, first, bodies
    )


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_one_record_of_each_kind_is_passed_as_python_passes_it(cnative: Any, data: Any) -> None:
    record = data.draw(records(5))
    for first in (0, 5, 6):
        for bodies in (False, True):
            got = cnative.check_frames(record, 0, first, bodies)
            assert got == python_check(record, 0, first, bodies)


# ============================================================================ arguments
def test_an_offset_outside_the_bytes_is_refused(cnative: Any) -> None:
    record = fmt.encode_record(fmt.REC_SET, 1, set_body("", "k", b"\x07v"))
    for offset in (-1, len(record) + 1):
        with pytest.raises(ValueError, match="offset out of range"):
            cnative.check_frames(record, offset, 0, True)
    assert cnative.check_frames(record, len(record), 0, True) == (len(record), 0, 0)


def test_a_seq_outside_64_bits_is_refused(cnative: Any) -> None:
    for seq in (-1, 1 << 64):
        with pytest.raises(OverflowError):
            cnative.check_frames(b"", 0, seq, True)
    with pytest.raises(TypeError):
        cnative.check_frames(b"", 0, 1.0, True)


def test_a_seq_run_stops_before_it_would_pass_two_to_the_64(cnative: Any) -> None:
    last = fmt.encode_record(fmt.REC_SET, U64, set_body("", "k", b"\x07v"))
    wrapped = fmt.encode_record(fmt.REC_SET, 0, set_body("", "k", b"\x07v"))
    assert cnative.check_frames(last + wrapped, 0, U64, True) == (len(last), 1, U64)
    assert python_check(last + wrapped, 0, U64, True) == (len(last), 1, U64)


def test_a_changed_record_size_limit_keeps_the_python_checks(
    cnative: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _replay.native_check() is cnative.check_frames
    monkeypatch.setattr(_scan, "MAX_RECORD_SIZE", 64)
    assert _replay.native_check() is None


# ============================================================================ the restore's uses
def last_seq_of(files: dict[str, bytes], directory: Path, window: int) -> tuple[Any, ...]:
    directory.mkdir()
    for file_name, data in files.items():
        (directory / file_name).write_bytes(data)
    try:
        return ("seq", segments_last_seq(str(directory), window=window))
    except CorruptionError as exc:
        return ("error", type(exc), os.path.basename(exc.path), exc.offset, exc.reason)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    segments=st.tuples(segment_bytes(1), segment_bytes(2)),
    window=st.sampled_from([61, 200, 1000, SCAN_WINDOW]),  # (records across windows)
)
def test_segments_last_seq_is_the_same_with_the_c_check_and_without(
    cnative: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    segments: tuple[bytes, ...],
    window: int,
) -> None:
    files = {segment_file_name(i + 1): data for i, data in enumerate(segments)}
    base = tmp_path_factory.mktemp("last")
    ours = last_seq_of(files, base / "c", window)
    with monkeypatch.context() as patch:
        patch.setattr(_build, "native_check", lambda: None)
        pure = last_seq_of(files, base / "pure", window)
    assert ours == pure


class _Appended:
    """A segment writer that only keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def add(self, record: bytes) -> None:
        self.records.append(record)


@pytest.mark.parametrize("native", [True, False])
def test_a_record_after_seq_two_to_the_64_minus_1_is_named_by_either_path(
    cnative: Any, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    if not native:
        monkeypatch.setattr(_build, "native_check", lambda: None)
    record = fmt.encode_record(fmt.REC_SET, 0, set_body("", "k", b"\x07v"))
    appended = _Appended()
    with pytest.raises(ValueError, match=f"has seq 0, expected {U64 + 1} "):
        _build._append_records(appended, [record], U64)  # type: ignore[arg-type]
    assert appended.records == []
    last = fmt.encode_record(fmt.REC_SET, U64, set_body("", "k", b"\x07v"))
    assert _build._append_records(appended, [last], U64 - 1) == (1, U64)  # type: ignore[arg-type]


@st.composite
def record_runs(draw: st.DrawFn) -> list[bytes]:
    """Records to append after seq 0: mostly a valid run, sometimes one out of place."""
    run = [draw(records(seq)) for seq in range(1, draw(st.integers(0, 12)) + 1)]
    out_of_place = draw(st.booleans())
    if run and out_of_place:
        at = draw(st.integers(0, len(run) - 1))
        damage = draw(st.sampled_from(["flip", "seq", "short", "long", "compacted"]))
        record = bytearray(run[at])
        if damage == "flip":
            record[draw(st.integers(0, len(record) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif damage == "seq":
            record = bytearray(fmt.encode_record(fmt.REC_SET, at + 3, set_body("", "k", b"\x07")))
        elif damage == "short":
            del record[draw(st.integers(0, len(record) - 1)) :]
        elif damage == "long":
            record += draw(st.binary(min_size=1, max_size=8))
        else:
            record = bytearray(fmt.encode_record(fmt.REC_COMPACTED, at + 1, b"\x00" * 16))
        run[at] = bytes(record)
    return run


def build_of(records_: list[bytes], target: Path) -> tuple[Any, ...]:
    try:
        result = build_store(str(target), None, iter(records_), None, segment_size=512)
    except (CorruptionError, ValueError) as exc:
        return ("error", type(exc), str(exc))
    files = {p.name: p.read_bytes() for p in sorted(target.iterdir())}
    return ("built", result, files)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(run=record_runs())
def test_build_store_is_the_same_with_the_c_check_and_without(
    cnative: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    run: list[bytes],
) -> None:
    base = tmp_path_factory.mktemp("build")
    calls: list[int] = []
    real = cnative.check_frames

    def counted(*args: Any) -> tuple[int, int, int]:
        calls.append(1)
        return real(*args)  # type: ignore[no-any-return]

    with monkeypatch.context() as patch:
        patch.setattr(_build, "native_check", lambda: counted)
        ours = build_of(run, base / "c")
    with monkeypatch.context() as patch:
        patch.setattr(_build, "native_check", lambda: None)
        pure = build_of(run, base / "pure")
    assert ours == pure
    if ours[0] == "built":
        assert len(calls) == len(run)  # the C check was asked of each record
