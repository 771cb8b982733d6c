"""Version 4 index snapshots (KeyMaps as raw arrays) and the way between the paths.

- The C path writes version 4 and reads it back into KeyMaps; it also reads a
  marshal (version 3) snapshot, as the pure path writes it and as every store
  written before version 4 has it, into KeyMaps.
- The pure path does not read version 4: it scans (the documented choice),
  and its close writes version 3 again, which the C path then uses.
- keymap_load (csrc/keymap.c) copies the location checks of
  ``_snapshot._int_locations_size`` / ``_mixed_locations_size``: the same
  locations, near every bound, are accepted or refused by both encodings.
- A crafted version 4 body (a location out of bounds, a key twice, a key that
  is not UTF-8, sizes that do not add up, trailing bytes) is refused: open
  scans instead.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from logstate import CorruptionError, InMemoryStorage, LocalFileStorage
from logstate import _format as fmt
from logstate._filenames import SNAPSHOT_FILE_NAME
from logstate._location import location_size, pack_location
from logstate._snapshot import (
    _RAW_LIMITS,
    MARSHAL_SNAPSHOT_VERSION,
    RAW_SNAPSHOT_VERSION,
    SNAPSHOT_HEADER,
    SegmentMark,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
)
from logstate._snapshot_raw import RAW_META_SIZE
from tests.keymap_support import keymap_ext

OPTIONS: dict[str, Any] = {"sync": "none", "segment_size": 4096, "auto_compact": False}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ext() -> Any:
    return keymap_ext()


def version_of(directory: Path) -> int:
    data = (directory / SNAPSHOT_FILE_NAME).read_bytes()
    return int(SNAPSHOT_HEADER.unpack_from(data, 0)[1])


def fill(directory: Path) -> dict[str, Any]:
    """A store with plain records, compressed and plain groups, a sub-storage,
    a delete and a checkpoint; what it holds."""
    with LocalFileStorage(directory, **OPTIONS, compress_min_size=0) as root:
        memory = InMemoryStorage(root)
        for i in range(300):
            memory[f"key{i:05d}"] = i
        memory.flush()
        for i in range(50):
            root.set(f"plain-é-{i}", "x" * i)
        root.remove("plain-é-3")
        with root.batch() as batch:
            batch.set("batched", 1)
        sub = root.get_or_create_sub_storage("sub")
        sub.set("inner", [1, 2])
        sub.close()
    return observed(directory)


def observed(directory: Path) -> dict[str, Any]:
    with LocalFileStorage(directory, read_only=True, use_snapshot=False) as root:
        sub = root.get_or_create_sub_storage("sub")
        try:
            return {"": dict(root.items()), "sub": dict(sub.items())}
        finally:
            sub.close()


PURE_OPEN = textwrap.dedent(
    """
    import json, sys
    from logstate import LocalFileStorage, native
    assert not native
    with LocalFileStorage(sys.argv[1], sync="none", segment_size=4096, auto_compact=False) as s:
        sub = s.get_or_create_sub_storage("sub")
        print(json.dumps([s.report.snapshot_used, dict(s.items()), dict(sub.items())]))
        sub.close()
    """
)


def open_in_pure_mode(directory: Path) -> tuple[bool, dict[str, Any]]:
    """Open (and close) ``directory`` in a pure Python process: (snapshot used, contents)."""
    env = {**os.environ, "LOGSTATE_PURE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PURE_OPEN, str(directory)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    used, root, sub = json.loads(out)
    return used, {"": root, "sub": sub}


def test_the_c_path_writes_version_4_and_reads_it_back_into_keymaps(
    ext: Any, tmp_path: Path
) -> None:
    expected = fill(tmp_path)
    assert version_of(tmp_path) == RAW_SNAPSHOT_VERSION
    with LocalFileStorage(tmp_path, **OPTIONS) as root:
        assert root.report.snapshot_used
        namespaces = root._engine.keydir.namespaces
        assert all(type(index) is ext.KeyMap for index in namespaces.values())
        assert any(type(loc) is tuple for loc in namespaces[""].values())  # compressed groups
        root._check()
    assert observed(tmp_path) == expected


def test_a_store_closed_by_the_c_path_opens_in_pure_mode_by_scanning_and_back(
    ext: Any, tmp_path: Path
) -> None:
    expected = fill(tmp_path)
    assert version_of(tmp_path) == RAW_SNAPSHOT_VERSION
    used, found = open_in_pure_mode(tmp_path)
    assert (used, found) == (False, json.loads(json.dumps(expected)))
    assert version_of(tmp_path) == MARSHAL_SNAPSHOT_VERSION  # the pure close wrote one
    with LocalFileStorage(tmp_path, **OPTIONS) as root:
        assert root.report.snapshot_used  # the marshal one, into KeyMaps
        assert type(root._engine.keydir.namespaces[""]) is ext.KeyMap
        root._check()
    assert version_of(tmp_path) == RAW_SNAPSHOT_VERSION
    assert observed(tmp_path) == expected


def test_a_store_written_by_the_pure_path_opens_under_the_c_path_from_its_snapshot(
    ext: Any, tmp_path: Path
) -> None:
    """The pure path writes today's marshal format: a store from before version 4."""
    expected = fill(tmp_path)
    open_in_pure_mode(tmp_path)  # (rewrites the snapshot as version 3)
    assert version_of(tmp_path) == MARSHAL_SNAPSHOT_VERSION
    with LocalFileStorage(tmp_path, **OPTIONS) as root:
        assert root.report.snapshot_used
        assert type(root._engine.keydir.namespaces["sub"]) is ext.KeyMap
        root._check()
    assert observed(tmp_path) == expected


# ---------------------------------------------------------------------------- crafted bodies

MARKS = [SegmentMark(1, 1, 5000, 0), SegmentMark(2, 1, 3000, 0)]
H = fmt.SEGMENT_HEADER_SIZE


def snapshot_of(root: dict[str, Any], ext: Any | None) -> Snapshot:
    """A snapshot of ``root`` (and an empty sub-storage): dicts, or KeyMaps with ``ext``."""
    namespaces: dict[str, Any] = {"": root, "sub": {}}
    if ext is not None:
        namespaces = {ns: ext.KeyMap(index) for ns, index in namespaces.items()}
    live = sum(location_size(loc) for loc in root.values())
    return Snapshot(namespaces, None, 10, live, MARKS, {}, 0.0)


def accepted(data: bytes) -> bool:
    try:
        decode_snapshot(data)
    except CorruptionError:
        return False
    return True


def near(bound: int, rng: random.Random) -> int:
    return max(0, bound + rng.choice([-2, -1, 0, 0, 1, 2]))


def random_edge_location(rng: random.Random) -> Any:
    """A location near one of the bounds a snapshot's locations are checked against."""
    number = rng.choice([1, 1, 2, 3, 0])
    size_of = {1: 5000, 2: 3000}.get(number, 4000)
    if rng.random() < 0.6:
        kind = rng.choice([0, 0, 1, 2])
        least = fmt.RECORD_OVERHEAD if kind != 1 else fmt.GROUP_OP_SIZE
        size = near(rng.choice([least, 100, size_of - H]), rng)
        offset = near(rng.choice([H, size_of - size, 2000]), rng)
        return pack_location(number, offset, size, kind)
    least_group = fmt.RECORD_OVERHEAD + fmt.GROUP_HEADER_SIZE + fmt.GROUP_RAW_SIZE.size
    record_offset = near(rng.choice([H, 1000, size_of - least_group]), rng)
    record_size = near(rng.choice([least_group, size_of - record_offset, 500]), rng)
    op_offset = near(rng.choice([0, 10, fmt.MAX_RECORD_SIZE - 100]), rng)
    op_size = near(rng.choice([fmt.GROUP_OP_SIZE, 100, fmt.MAX_RECORD_SIZE - op_offset]), rng)
    share = near(rng.choice([0, record_size, 40]), rng)
    return (number, record_offset, record_size, op_offset, op_size, share)


def test_keymap_load_accepts_and_refuses_the_same_locations_as_the_marshal_checks(
    ext: Any,
) -> None:
    """keymap.c copies _int_locations_size and _mixed_locations_size: proved equal."""
    rng = random.Random(11)
    outcomes = {True: 0, False: 0}
    for _ in range(1500):
        loc = random_edge_location(rng)
        root = {"good": pack_location(1, H, 100, 0), "edge": loc}
        marshal_file = encode_snapshot(snapshot_of(root, None))
        raw_file = encode_snapshot(snapshot_of(root, ext))
        assert SNAPSHOT_HEADER.unpack_from(raw_file, 0)[1] == RAW_SNAPSHOT_VERSION
        verdict = accepted(marshal_file)
        assert accepted(raw_file) == verdict, loc
        outcomes[verdict] += 1
        if verdict:
            assert decode_snapshot(raw_file).namespaces == decode_snapshot(marshal_file).namespaces
    assert min(outcomes.values()) > 200  # both sides of the bounds were tried


def raw_file_of(root: dict[str, Any], ext: Any) -> bytearray:
    data = encode_snapshot(snapshot_of(root, ext))
    assert SNAPSHOT_HEADER.unpack_from(data, 0)[1] == RAW_SNAPSHOT_VERSION
    return bytearray(data)


def with_body(data: bytearray, body: bytes) -> bytes:
    """``data``'s header around ``body`` (size and CRC made right)."""
    from logstate._crc import crc32c

    fields = list(SNAPSHOT_HEADER.unpack_from(data, 0))
    fields[6], fields[7] = len(body), crc32c(body)
    return SNAPSHOT_HEADER.pack(*fields) + body


def arena_start(data: bytes | bytearray) -> int:
    """Offset in the body of the first namespace's arena."""
    body = data[SNAPSHOT_HEADER.size :]
    meta_size: int = RAW_META_SIZE.unpack_from(body, 0)[0]
    return RAW_META_SIZE.size + meta_size


def patched(data: bytearray, at: int, new: bytes) -> bytes:
    body = bytearray(data[SNAPSHOT_HEADER.size :])
    body[at : at + len(new)] = new
    return with_body(data, bytes(body))


def test_a_valid_raw_body_is_accepted_as_is(ext: Any) -> None:
    data = raw_file_of({"a": pack_location(1, H, 100, 0), "b": pack_location(2, H, 50, 1)}, ext)
    assert accepted(bytes(data))


CRAFTED = {
    "a record's key length past the arena": lambda d, a: patched(
        d, a, (9999).to_bytes(4, "little")
    ),
    "a key that is not UTF-8": lambda d, a: patched(d, a + 20, b"\xff"),
    "a key twice": lambda d, a: patched(d, a + 24 + 20, b"a"),
    "a location of kind 3 without a side entry": lambda d, a: patched(d, a + 4, b"\x03"),
    "a location in a segment not listed": lambda d, a: patched(d, a + 12 + 1, b"\x7f"),
    "padding that is not zero": lambda d, a: patched(d, a + 21, b"\x01"),
    "trailing bytes": lambda d, a: with_body(d, bytes(d[SNAPSHOT_HEADER.size :]) + b"\0" * 4),
    "a truncated arena": lambda d, a: with_body(d, bytes(d[SNAPSHOT_HEADER.size : -4])),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_raw_body_is_refused(ext: Any, case: str) -> None:
    data = raw_file_of({"a": pack_location(1, H, 100, 0), "b": pack_location(2, H, 50, 1)}, ext)
    assert accepted(bytes(data))
    assert not accepted(CRAFTED[case](data, arena_start(data)))


@pytest.mark.parametrize("count", [100, 70_000])  # (a large map's table is built by regions)
def test_keymap_load_rebuilds_a_table_that_finds_every_key_and_refuses_a_key_twice(
    ext: Any, count: int
) -> None:
    km = ext.KeyMap({f"key-{i:08d}": pack_location(1, H, 100, 0) for i in range(count)})
    n, arena, _sides = km.raw()
    marks, limits = [(1, 5000)], _RAW_LIMITS
    loaded, total = ext.keymap_load(arena, 0, n, len(arena), 0, marks, limits)
    loaded._check()
    assert loaded == km and total == 100 * count
    twice = bytearray(arena)
    last = len(arena) - 32  # the last record (12-character keys: 32 bytes) takes the first's key
    twice[last + 20 : last + 32] = b"key-00000000"
    with pytest.raises(ValueError, match="twice"):
        ext.keymap_load(bytes(twice), 0, n, len(arena), 0, marks, limits)


def test_a_crafted_raw_snapshot_makes_open_scan(ext: Any, tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, **OPTIONS) as root:
        for i in range(100):
            root.set(f"key-{i:08d}", "v" * 50)
        root.get_or_create_sub_storage("sub").close()
    expected = observed(tmp_path)
    path = tmp_path / SNAPSHOT_FILE_NAME
    data = bytearray(path.read_bytes())
    header = SNAPSHOT_HEADER.unpack_from(data, 0)
    assert (header[1], header[5]) == (RAW_SNAPSHOT_VERSION, 0)  # version 4, not compressed
    path.write_bytes(patched(data, arena_start(data) + 12 + 1, b"\x7f"))  # a segment not listed
    with LocalFileStorage(tmp_path, **OPTIONS) as root:
        assert not root.report.snapshot_used
        assert "keymap location out of bounds" in root.report.snapshot_refused
    assert observed(tmp_path) == expected


# ---------------------------------------------------------------------------- the two paths agree

WORKLOAD = textwrap.dedent(
    """
    import json, sys
    from logstate import InMemoryStorage, LocalFileStorage
    options = dict(sync="none", segment_size=4096, auto_compact=False)
    with LocalFileStorage(sys.argv[1], **options, compress_min_size=0) as root:
        for round in range(3):
            for i in range(120):
                root.set(f"k{(i * 7) % 90}-é", str(round) * (i % 13))
            for i in range(0, 90, 4):
                root.remove(f"k{i}-é")
            memory = InMemoryStorage(root)
            for i in range(80):
                memory[f"m{(i * 3 + round) % 60}"] = i * round
            memory.flush()
            sub = root.get_or_create_sub_storage(f"sub{round % 2}")
            sub.set("inner", round)
            sub.close()
            root.compact()
        print(json.dumps(list(root)))  # (index order: for key in storage)
    """
)


def run_workload(directory: Path, pure: bool) -> tuple[list[str], dict[str, bytes]]:
    """(the root's keys in index order, every segment's bytes) after the workload."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LOGSTATE_PURE", None)
    if pure:
        env["LOGSTATE_PURE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD, str(directory)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    segments = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix == ".seg"}
    return json.loads(out), segments


def test_the_c_and_pure_paths_list_the_same_keys_and_write_the_same_segments(
    ext: Any, tmp_path: Path
) -> None:
    """A KeyMap iterates as a dict does (insertion order; an overwrite keeps the
    place, a key set again after a delete goes to the end): ``for key in
    storage`` (index order; ``keys()`` is sorted) lists the same order on both
    paths, and sets, flushes and compactions give the same segment bytes."""
    c_keys, c_segments = run_workload(tmp_path / "c", pure=False)
    pure_keys, pure_segments = run_workload(tmp_path / "pure", pure=True)
    assert len(c_segments) >= 2 and len(c_keys) > 100
    assert c_keys == pure_keys
    assert c_segments == pure_segments
