"""Fuzzing the version 4 index snapshot decoder (logstate._snapshot_raw, keymap_load in C).

Guarantee checked: any bytes given as a version 4 snapshot (random bodies, and
mutations of a valid one: bit flips, byte overwrites, truncations,
insertions, deletions, each with the header's size and checksum made right so
that the body itself is decoded) either decode or raise logstate's
CorruptionError -- never any other exception, never a crash. What decodes is
never trusted beyond what the checks prove: every KeyMap passes its own
``_check``, every location passes the marshal path's checks
(``_snapshot._int_locations_size`` / ``_mixed_locations_size``) against the
snapshot's marks, and the live bytes add up.

Needs the C path (tests/keymap_support: fails without it, skips under
``LOGSTATE_PURE=1``). Run::

    python -m pytest fuzz/test_snapshot_raw_fuzz.py -q
    LOGSTATE_FUZZ_PROFILE=long python -m pytest fuzz/test_snapshot_raw_fuzz.py -q
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from logstate import CorruptionError
from logstate import _format as fmt
from logstate._crc import crc32c
from logstate._location import compressed_location, location_size, pack_location
from logstate._snapshot import (
    RAW_SNAPSHOT_VERSION,
    SNAPSHOT_HEADER,
    SNAPSHOT_MAGIC,
    SegmentMark,
    Snapshot,
    _int_locations_size,
    _mixed_locations_size,
    decode_snapshot,
    encode_snapshot,
)
from tests.keymap_support import keymap_ext

H = fmt.SEGMENT_HEADER_SIZE
MARKS = [SegmentMark(1, 1, 50_000, 0), SegmentMark(2, 1, 9_000, 0)]


def valid_file() -> bytes:
    """A version 4 snapshot of two namespaces: plain, group and compressed locations."""
    ext = keymap_ext()
    root: dict[str, Any] = {
        f"key-{i:04d}": pack_location(1, H + 100 * i, 60 + i, i % 2) for i in range(40)
    }
    root["é-unicode-\U0001f600"] = pack_location(2, H, 200, 0)
    for i in range(5):
        root[f"group-{i}"] = compressed_location(2, 1000, 800, 30 * i, 30, 150)
    sub = {"inner": pack_location(2, 3000, 100, 0)}
    live = sum(location_size(v) for v in (*root.values(), *sub.values()))
    namespaces = {"": ext.KeyMap(root), "sub": ext.KeyMap(sub)}
    snapshot = Snapshot(namespaces, None, 99, live, MARKS, {"sub": {"inner": 5.0}}, 1.0)
    data = encode_snapshot(snapshot)
    assert SNAPSHOT_HEADER.unpack_from(data, 0)[1] == RAW_SNAPSHOT_VERSION
    return data


def file_of(body: bytes, flags: int = 0) -> bytes:
    header = SNAPSHOT_HEADER.pack(
        SNAPSHOT_MAGIC, RAW_SNAPSHOT_VERSION, 0, 0, 0, flags, len(body), crc32c(body)
    )
    return header + body


def check_decodes_or_refuses(data: bytes) -> None:
    try:
        snapshot = decode_snapshot(data)
    except CorruptionError:
        return
    marks = snapshot.segments
    low = {m.number: m.number << 74 | H << 34 for m in marks}
    high = {m.number: m.number << 74 | (m.size + 1) << 34 for m in marks}
    limits = {m.number: m.size for m in marks}
    total = 0
    for index in snapshot.namespaces.values():
        index._check()
        found = _mixed_locations_size(list(index.values()), low, high, limits)
        assert found is not None, "a location the marshal checks refuse was trusted"
        plain = [loc for loc in index.values() if type(loc) is int]
        assert _int_locations_size(plain, low, high) is not None
        total += found
    assert total == snapshot.live_bytes


VALID: list[bytes] = []


def valid() -> bytes:
    if not VALID:
        VALID.append(valid_file())
    return VALID[0]


def test_the_valid_file_decodes() -> None:
    check_decodes_or_refuses(valid())
    assert decode_snapshot(valid()).seq == 99


@settings(settings.get_profile("logstate-fuzz"))
@given(st.binary(max_size=600))
def test_random_bodies_decode_or_raise_corruption_error(body: bytes) -> None:
    keymap_ext()
    check_decodes_or_refuses(file_of(body))


MUTATION = st.tuples(
    st.sampled_from(["flip", "set", "truncate", "insert", "delete"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=1, max_value=32),
)


@settings(settings.get_profile("logstate-fuzz"))
@given(st.lists(MUTATION, min_size=1, max_size=4))
def test_mutations_of_a_valid_body_decode_or_raise_corruption_error(
    mutations: list[tuple[str, int, int, int]],
) -> None:
    body = bytearray(valid()[SNAPSHOT_HEADER.size :])
    for what, at, byte, count in mutations:
        at %= len(body) + 1
        if what == "flip" and at < len(body):
            body[at] ^= 1 << (byte % 8)
        elif what == "set" and at < len(body):
            body[at] = byte
        elif what == "truncate":
            del body[at:]
        elif what == "insert":
            body[at:at] = bytes([byte]) * count
        elif what == "delete":
            del body[at : at + count]
    check_decodes_or_refuses(file_of(bytes(body)))
