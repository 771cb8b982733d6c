"""The C scan into KeyMap indexes (raw UTF-8 keys, no objects) equals the Python replay.

When a namespace index is a ``KeyMap`` (exact type), ``csrc/scan.c`` checks
each key's UTF-8 in C and sets or deletes it through keymap.c's C API by its
raw bytes; a dict index keeps the object path. Checked here:

- the C UTF-8 check accepts exactly what ``bytes.decode("utf-8")`` accepts;
- non-ASCII keys are applied as the Python replay applies them; keys that are
  not valid UTF-8 (overlong, surrogates, past U+10FFFF, truncated) stop the C
  scan before their record, having applied nothing of it;
- a key whose location is a compressed group's tuple (a KeyMap side object)
  stops the C scan before the record that overwrites or deletes it (a plain
  record or a group, nothing of the group applied); the open then equals the
  pure one;
- dict and KeyMap indexes give the same result for the same records.

These tests need the C path: they fail when it is not in use, unless
``LOGSTATE_PURE=1`` asks for pure Python (then they are skipped).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import logstate
from logstate import _format as fmt
from logstate._filenames import segment_file_name
from logstate._keydir import Keydir
from logstate._native import EXT, PURE_REQUESTED
from logstate._scan import scan_records
from tests.test_native_scan import (
    HANDED_BACK,
    delete_body,
    fresh_keydir,
    group,
    name,
    op,
    open_copy,
    python_replay,
    set_body,
    state,
)


@pytest.fixture(scope="module")
def cnative() -> Any:
    """The C extension with KeyMap; fails when not in use (skips under LOGSTATE_PURE=1)."""
    if PURE_REQUESTED:
        pytest.skip("LOGSTATE_PURE=1: pure Python asked for")
    if not logstate.native or EXT is None or not hasattr(EXT, "KeyMap"):
        pytest.fail("the C path is not in use (logstate._cnative did not build or import)")
    return EXT


def utf8_ok(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ============================================================================ UTF-8
INVALID = [
    b"\x80",  # a lone continuation byte
    b"\xbf",
    b"\xc0\x80",  # overlong
    b"\xc1\xbf",
    b"\xe0\x80\x80",
    b"\xe0\x9f\xbf",
    b"\xf0\x80\x80\x80",
    b"\xf0\x8f\xbf\xbf",
    b"\xed\xa0\x80",  # surrogates
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xf5\x80\x80\x80",
    b"\xff",
    b"\xe2\x9c",  # truncated
    b"\xf0\x9f\x98",
    b"\xc3",
    b"\xe2\x28\xa1",  # a bad continuation byte
    b"\xf0\x9f\x28\x80",
]
VALID = ["é", "✓", "\U0001f600", "\x00", "\x7f", "\x80", "\u07ff", "\u0800", "\ud7ff"]
VALID += ["\ue000", "\uffff", "\U00010000", "\U0010ffff", "añb" * 5, "x" * 9 + "é"]
PIECES = st.sampled_from(INVALID + [text.encode() for text in VALID] + [b"abcdefgh", b"z"])


@given(st.one_of(st.binary(max_size=40), st.lists(PIECES, max_size=6).map(b"".join)))
@example(b"abcdefg\xc3")
@example(b"abcdefgh\xe2\x9c\x93")
def test_the_c_utf8_check_accepts_what_bytes_decode_accepts(cnative: Any, data: bytes) -> None:
    assert cnative.utf8_valid(data) is utf8_ok(data)


@pytest.mark.parametrize("bad", INVALID)
def test_every_invalid_sequence_is_refused_alone_and_inside_ascii(cnative: Any, bad: bytes) -> None:
    for data in (bad, b"abcdefgh" + bad, bad + b"abcdefgh", b"a" + bad + b"b"):
        assert not utf8_ok(data)
        assert cnative.utf8_valid(data) is False


# ============================================================================ keys
def raw_set(seq: int, ns: str, key: bytes, value: bytes = b"\x07v") -> bytes:
    body = name(ns) + len(key).to_bytes(2, "little") + key + value
    return fmt.encode_record(fmt.REC_SET, seq, body)


def test_non_ascii_keys_are_applied_as_the_python_replay_applies_them(cnative: Any) -> None:
    data = b"".join(
        [
            fmt.encode_record(fmt.REC_SET, i + 1, set_body("", k, b"\x07v"))
            for i, k in enumerate(VALID)
        ]
        + [fmt.encode_record(fmt.REC_SET, 90, set_body("", "é", b"\x07again"))]
        + [fmt.encode_record(fmt.REC_DELETE, 91, delete_body("", "\U0010ffff"))]
        + [group(92, [op(fmt.REC_SET, set_body("", k + "g", b"\x07w")) for k in VALID])]
    )
    ours, theirs = fresh_keydir(), fresh_keydir()
    assert type(ours.namespaces[""]) is cnative.KeyMap
    stop, count, _seq, live = cnative.replay_records(data, 0, ours.namespaces, 3, 0)
    assert (stop, count) == (len(data), len(VALID) + 3)
    ours.live_bytes += live
    python_replay(data, 0, theirs, 3, 0)
    assert state(ours) == state(theirs)
    assert list(ours.namespaces[""]) == list(theirs.namespaces[""])  # the same order
    ours._check()


@pytest.mark.parametrize("bad", INVALID)
@pytest.mark.parametrize("where", ["set", "delete", "group"])
def test_a_key_that_is_not_utf8_stops_the_keymap_scan_before_its_record(
    cnative: Any, bad: bytes, where: str
) -> None:
    key = b"k" + bad
    keyed = name("") + len(key).to_bytes(2, "little") + key
    record = {
        "set": fmt.encode_record(fmt.REC_SET, 5, keyed + b"\x07v"),
        "delete": fmt.encode_record(fmt.REC_DELETE, 5, keyed),
        "group": group(5, [op(fmt.REC_SET, set_body("", "first", b"\x07v")), (1, keyed + b"\x07")]),
    }[where]
    before = fmt.encode_record(fmt.REC_SET, 1, set_body("", "before", b"\x07v"))
    after = fmt.encode_record(fmt.REC_SET, 2, set_body("", "after", b"\x07v"))
    keydir = fresh_keydir()
    keydir.ensure("").update({"k": 7 << 2})  # (a delete must not reach it either)
    stop, count, seq, _live = cnative.replay_records(
        before + record + after, 0, keydir.namespaces, 1, 0
    )
    assert (stop, count, seq) == (len(before), 1, 1)
    assert list(keydir.namespaces[""]) == ["k", "before"]


@pytest.mark.parametrize("kind", sorted(HANDED_BACK))
def test_a_record_it_does_not_handle_stops_the_keymap_scan_before_it(
    cnative: Any, kind: str
) -> None:
    valid = fmt.encode_record(fmt.REC_SET, 1, set_body("", "before", b"\x07v"))
    after = fmt.encode_record(fmt.REC_SET, 2, set_body("", "after", b"\x07v"))
    data = valid + HANDED_BACK[kind] + (b"" if kind == "torn" else after)
    keydir = fresh_keydir()
    stop, count, seq, live = cnative.replay_records(data, 0, keydir.namespaces, 1, 0)
    assert (stop, count, seq, live) == (len(valid), 1, 1, len(valid))
    assert list(keydir.namespaces[""]) == ["before"]


# ============================================================================ side objects
def compressed_keydir() -> tuple[Keydir, bytes]:
    """A keydir whose "" index holds "k" at a compressed group's tuple location."""
    keydir = fresh_keydir()
    data = group(1, [op(fmt.REC_SET, set_body("", "k", b"\x07" + b"v" * 200))], compress=True)
    python_replay(data, 0, keydir, 1, 0)
    assert isinstance(keydir.namespaces[""]["k"], tuple)
    return keydir, data


OVERWRITES = {
    "set": fmt.encode_record(fmt.REC_SET, 2, set_body("", "k", b"\x07new")),
    "delete": fmt.encode_record(fmt.REC_DELETE, 2, delete_body("", "k")),
    "group set": group(
        2,
        [
            op(fmt.REC_SET, set_body("", "other", b"\x07o")),
            op(fmt.REC_SET, set_body("", "k", b"\x07n")),
        ],
    ),
    "group delete": group(
        2,
        [
            op(fmt.REC_SET, set_body("", "other", b"\x07o")),
            op(fmt.REC_DELETE, delete_body("", "k")),
        ],
    ),
}


@pytest.mark.parametrize("kind", sorted(OVERWRITES))
def test_overwriting_a_compressed_groups_location_stops_the_c_scan_before_it(
    cnative: Any, kind: str
) -> None:
    ours, first = compressed_keydir()
    theirs, _ = compressed_keydir()
    lead = fmt.encode_record(fmt.REC_SET, 3, set_body("", "lead", b"\x07l"))
    data = first + lead + OVERWRITES[kind]
    start = len(first)
    stop, count, _seq, live = cnative.replay_records(data, start, ours.namespaces, 1, 0)
    assert (stop, count) == (start + len(lead), 1)  # nothing of the overwrite applied
    assert list(ours.namespaces[""]) == ["k", "lead"]
    assert isinstance(ours.namespaces[""]["k"], tuple)
    # the Python path takes the record, then the C scan goes on after it
    frame = next(iter(scan_records(data, stop, lambda damage: None)))
    ours.apply_frame(data, frame, 1, 0)
    tail = fmt.encode_record(fmt.REC_SET, 4, set_body("", "k", b"\x07t"))
    data += tail
    again = cnative.replay_records(data, stop + frame.size, ours.namespaces, 1, 0)
    assert again[:2] == (len(data), 1)
    ours.live_bytes += live + again[3]
    python_replay(data, start, theirs, 1, 0)
    assert state(ours) == state(theirs)
    ours._check()


def test_an_open_with_overwritten_compressed_groups_equals_the_pure_one(
    cnative: Any, tmp_path: Path
) -> None:
    records = [
        group(
            1, [op(fmt.REC_SET, set_body("", f"k{i}", b"\x07" + b"v" * 90)) for i in range(4)], True
        ),
        fmt.encode_record(fmt.REC_SET, 2, set_body("", "k0", b"\x07plain")),
        fmt.encode_record(fmt.REC_DELETE, 3, delete_body("", "k1")),
        group(
            4,
            [
                op(fmt.REC_SET, set_body("", "new", b"\x07n")),
                op(fmt.REC_SET, set_body("", "k2", b"\x07x")),
            ],
        ),
        fmt.encode_record(fmt.REC_SET, 5, set_body("", "k3", b"\x07e")),
        fmt.encode_record(fmt.REC_SET, 6, set_body("", "k3", b"\x07again")),
        raw_set(7, "", "é✓".encode()),
    ]
    files = {segment_file_name(1): fmt.encode_segment_header(1) + b"".join(records)}
    for recovery in ("strict", "salvage"):
        pure = open_copy(files, tmp_path / f"pure-{recovery}", recovery, native=False)
        ours = open_copy(files, tmp_path / f"c-{recovery}", recovery, native=True)
        assert ours == pure
    shutil.rmtree(tmp_path / "pure-strict")


# ============================================================================ dict and KeyMap
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "delete", "group"]),
            st.sampled_from(["k", "é", "\U0001f600", "x" * 20, "k2"]),
            st.sampled_from(["", "a"]),
        ),
        max_size=30,
    )
)
def test_dict_and_keymap_indexes_give_the_same_result(cnative: Any, plan: list[Any]) -> None:
    records = []
    for seq, (kind, key, ns) in enumerate(plan, 1):
        if kind == "set":
            records.append(
                fmt.encode_record(fmt.REC_SET, seq, set_body(ns, key, b"\x07" + bytes(seq)))
            )
        elif kind == "delete":
            records.append(fmt.encode_record(fmt.REC_DELETE, seq, delete_body(ns, key)))
        else:
            ops = [
                op(fmt.REC_SET, set_body(ns, key, b"\x07g")),
                op(fmt.REC_DELETE, delete_body("a", key)),
            ]
            records.append(group(seq, ops + ops[:1]))
    data = b"".join(records)
    as_dicts: dict[str, Any] = {"": {}, "a": {}}
    as_keymaps: dict[str, Any] = {"": cnative.KeyMap(), "a": cnative.KeyMap()}
    first = cnative.replay_records(data, 0, as_dicts, 4, -77)
    second = cnative.replay_records(data, 0, as_keymaps, 4, -77)
    assert first == second and first[:2] == (len(data), len(records))
    for ns, index in as_keymaps.items():
        assert list(index.items()) == list(as_dicts[ns].items())
