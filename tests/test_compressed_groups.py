"""zstd-compressed groups: live bytes, compaction and the index snapshot.

The promises checked (logstate/_location.py, _compact.py, _snapshot.py):

- Live bytes count a value of a compressed group by its share of the bytes
  the record takes on disk, not by its decompressed size: ``stats()`` never
  reports negative dead bytes, after a flush, after partial overwrites and
  deletes of the group's keys, and after a reopen (scan or snapshot), and
  ``_check()`` holds (live bytes == sizes of the indexed locations <= disk);
  the automatic compaction trigger, which reads the same figures, sees a
  dead compressed group.
- Compaction never grows the store: values of compressed groups stay in
  compressed groups, operations of uncompressed groups stay in groups, and
  an output that would outgrow its inputs is abandoned (nothing changes).
  Every value reads back after the compaction and after reopening, with
  and without the snapshot.
- ``index.snapshot`` is never larger than the segments it indexes: its body
  is compressed when the plain one would be, and none is written (a stale
  one is removed) when even that is larger.
- A store whose snapshot was written in the version-1 layout (5-field
  compressed locations) still opens, by scanning.
"""

from __future__ import annotations

import marshal
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from logstate import InMemoryStorage, LocalFileStorage, _filenames, _recovery
from logstate import _format as fmt
from logstate._crc import crc32c
from logstate._filenames import SNAPSHOT_FILE_NAME
from logstate._location import total_size
from logstate._snapshot import (
    SNAPSHOT_HEADER,
    SNAPSHOT_MAGIC,
    decode_snapshot,
    encode_snapshot,
)

SMALL: dict[str, Any] = {"sync": "none", "segment_size": 4096, "auto_compact": False}


def segment_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("segment-"))


def assert_live_bytes_fit_the_disk(storage: LocalFileStorage) -> None:
    """Cheap form of ``_check()``'s live-bytes part (``_check`` reads every value)."""
    engine = storage._engine
    live = sum(total_size(index) for index in engine.keydir.namespaces.values())
    stats = storage.stats()
    assert stats["live_bytes"] == live
    assert 0 <= stats["dead_bytes"] == stats["total_bytes"] - live, stats


def flush_keys(storage: LocalFileStorage, count: int, start: int = 0) -> dict[str, int]:
    memory = InMemoryStorage(storage)
    values = {f"key{i:07d}": i for i in range(start, start + count)}
    for key, value in values.items():
        memory[key] = value
    memory.flush()
    return values


def contents(storage: LocalFileStorage) -> dict[str, Any]:
    """Every value of the root storage, loaded group by group (not one get per key)."""
    return dict(InMemoryStorage(storage).items())


def compressed_values(storage: LocalFileStorage) -> int:
    return sum(type(loc) is tuple for loc in storage._engine.keydir.namespaces[""].values())


# ============================================================================ live bytes


def test_dead_bytes_are_never_negative_after_a_compressed_flush_and_partial_overwrites(
    tmp_path: Path,
) -> None:
    with LocalFileStorage(tmp_path, sync="none", compress_min_size=0) as root:
        flush_keys(root, 5_000)
        assert compressed_values(root) == 5_000
        stats = root.stats()
        assert 0 <= stats["dead_bytes"] <= fmt.SEGMENT_HEADER_SIZE, stats
        assert_live_bytes_fit_the_disk(root)
        dead = [stats["dead_bytes"]]
        for step in range(4):  # overwrite and delete a fifth of the group's keys at a time
            with root.batch() as batch:
                for i in range(step * 1000, step * 1000 + 500):
                    batch.set(f"key{i:07d}", "new")
                for i in range(step * 1000 + 500, step * 1000 + 1000):
                    batch.remove(f"key{i:07d}")
            assert_live_bytes_fit_the_disk(root)
            dead.append(root.stats()["dead_bytes"])
        assert dead == sorted(dead) and dead[-1] > dead[0], dead
        total = root.stats()["total_bytes"]
        assert root.stats()["live_bytes"] <= total
        live = root.stats()["live_bytes"]
    for use_snapshot in (True, False):
        with LocalFileStorage(tmp_path, sync="none", use_snapshot=use_snapshot) as again:
            assert again.report.snapshot_used == use_snapshot
            assert again.stats()["live_bytes"] == live
            assert_live_bytes_fit_the_disk(again)


def test_shares_of_a_compressed_group_add_up_to_its_record() -> None:
    from logstate._location import compressed_location, location_size

    record_size, offsets = 777, [0, 9, 40, 41, 400, 2_000]
    raw_size = 2_345
    ends = [*offsets[1:], raw_size]
    shares = [
        location_size(compressed_location(1, 24, record_size, start, end - start, raw_size))
        for start, end in zip(offsets, ends, strict=True)
    ]
    assert sum(shares) == record_size
    for share, start, end in zip(shares, offsets, ends, strict=True):
        assert abs(share - (end - start) * record_size / raw_size) < 1


# ============================================================================ compaction


def test_compacting_200000_keys_of_one_compressed_flush_never_grows_the_store(
    tmp_path: Path,
) -> None:
    with LocalFileStorage(tmp_path, sync="none", auto_compact=False) as root:
        model = flush_keys(root, 200_000)  # ~5 MB of operations: compressed (default 1 MiB)
        assert compressed_values(root) == 200_000
        everything_live = root.compact()
        assert everything_live.bytes_after <= everything_live.bytes_before
        # a quarter of the keys deleted or overwritten: there is something to reclaim
        memory = InMemoryStorage(root)
        for i in range(0, 200_000, 4):
            key = f"key{i:07d}"
            if i % 8:
                memory[key] = -i
                model[key] = -i
            else:
                del memory[key]
                del model[key]
        memory.flush()
        before = segment_bytes(tmp_path)
        result = root.compact()
        assert result.output is not None
        assert result.bytes_after <= result.bytes_before
        assert result.bytes_after < 0.9 * result.bytes_before
        assert segment_bytes(tmp_path) <= before
        assert compressed_values(root) == len(model), "the values stay compressed"
        assert_live_bytes_fit_the_disk(root)
    for use_snapshot in (True, False):  # every value, read back from the compacted files
        with LocalFileStorage(tmp_path, sync="none", use_snapshot=use_snapshot) as again:
            assert again.report.snapshot_used == use_snapshot
            assert contents(again) == model
            assert_live_bytes_fit_the_disk(again)


def test_compacting_a_live_uncompressed_batch_never_grows_the_store(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, **SMALL, compress_min_size=None) as root:
        with root.batch() as batch:
            for i in range(300):
                batch.set(f"k{i}", i)
        root.set("gone", "x" * 600)
        root.remove("gone")
        result = root.compact()
        assert result.output is not None
        assert result.bytes_after <= result.bytes_before
        root._check()
        assert dict(root.items()) == {f"k{i}": i for i in range(300)}


def test_compaction_that_would_not_shrink_the_store_leaves_it_as_it_is(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, **SMALL) as root:
        for i in range(20):
            root.set(f"k{i}", i)  # all live: the output would only add its first record
        before = (tmp_path / _filenames.segment_file_name(1)).read_bytes()
        result = root.compact()
        assert result.bytes_after <= result.bytes_before
        assert (result.output, result.inputs, result.reclaimed_bytes) == (None, [], 0)
        assert (tmp_path / _filenames.segment_file_name(1)).read_bytes() == before
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        root._check()
        assert dict(root.items()) == {f"k{i}": i for i in range(20)}


KEYS = st.sampled_from([f"k{i}" for i in range(12)])
VALUES = st.one_of(st.integers(0, 5), st.text(alphabet="ab", max_size=300))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, VALUES),
        st.tuples(st.just("remove"), KEYS),
        st.tuples(st.just("batch"), st.lists(st.tuples(KEYS, VALUES), min_size=2, max_size=30)),
        st.tuples(st.just("flush"), st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=30)),
        st.tuples(st.just("compact")),
    ),
    max_size=25,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, compress_min_size=st.sampled_from([0, 200, None]))
@example(
    ops=[("flush", [(f"k{i}", "ab" * 100) for i in range(12)]), ("compact",)], compress_min_size=0
)
def test_compaction_never_grows_the_store_over_plain_and_compressed_writes(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[Any, ...]],
    compress_min_size: int | None,
) -> None:
    directory = tmp_path_factory.mktemp("mix")
    model: dict[str, Any] = {}
    with LocalFileStorage(directory, **SMALL, compress_min_size=compress_min_size) as root:
        sub = root.get_or_create_sub_storage("sub")
        for op in [*ops, ("compact",)]:
            if op[0] == "set":
                root.set(op[1], op[2])
                model[op[1]] = op[2]
            elif op[0] == "remove":
                root.remove(op[1])
                model.pop(op[1], None)
            elif op[0] == "batch":
                with root.batch() as batch:
                    for key, value in op[1]:
                        batch.set(key, value)
                        model[key] = value
                sub.set("n", len(op[1]))
            elif op[0] == "flush":
                memory = InMemoryStorage(root)
                for key, value in op[1]:
                    memory[key] = value
                    model[key] = value
                memory.flush(checkpoint=len(model))
            else:
                result = root.compact()
                assert result.bytes_after <= result.bytes_before, result
            assert_live_bytes_fit_the_disk(root)
        root._check()
        assert dict(root.items()) == model
        # what the compactions installed is exactly what replaying their output rebuilds
        with LocalFileStorage(directory, read_only=True, use_snapshot=False) as scan:
            engine, other = root._engine, scan._engine
            assert other.keydir.namespaces == engine.keydir.namespaces
            assert other.keydir.checkpoint == engine.keydir.checkpoint
            assert other.keydir.live_bytes == engine.keydir.live_bytes
        sub.close()
    for use_snapshot in (True, False):
        with LocalFileStorage(directory, **SMALL, use_snapshot=use_snapshot) as again:
            again._check()
            assert dict(again.items()) == model


# ============================================================================ snapshot


def test_index_snapshot_is_no_larger_than_the_segments_after_a_compressed_flush(
    tmp_path: Path,
) -> None:
    with LocalFileStorage(tmp_path, sync="none") as root:
        model = flush_keys(root, 60_000)
        assert compressed_values(root) == 60_000
    snapshot = tmp_path / SNAPSHOT_FILE_NAME
    assert snapshot.exists()
    assert snapshot.stat().st_size <= segment_bytes(tmp_path)
    with LocalFileStorage(tmp_path, sync="none") as again:
        assert again.report.snapshot_used and again.report.records == 0
        assert contents(again) == model
        assert_live_bytes_fit_the_disk(again)


def test_plain_stores_keep_an_uncompressed_snapshot(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, **SMALL) as root:
        for i in range(200):
            root.set(f"k{i}", "v" * 50)
    data = (tmp_path / SNAPSHOT_FILE_NAME).read_bytes()
    assert SNAPSHOT_HEADER.unpack_from(data)[5] == 0, "flags: not compressed"
    assert len(data) <= segment_bytes(tmp_path)


def test_no_snapshot_is_written_when_even_compressed_it_outweighs_the_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalFileStorage(tmp_path, **SMALL) as root:
        for i in range(50):
            root.set(f"k{i}", i)
    assert (tmp_path / SNAPSHOT_FILE_NAME).exists()  # a stale one, from the first close
    encode = encode_snapshot

    def tiny_bound(snapshot: Any, max_size: int | None = None) -> bytes | None:
        return encode(snapshot, max_size=SNAPSHOT_HEADER.size)

    monkeypatch.setattr(_recovery, "encode_snapshot", tiny_bound)
    with LocalFileStorage(tmp_path, **SMALL) as root:
        root.set("more", 1)
    assert not (tmp_path / SNAPSHOT_FILE_NAME).exists(), "the stale snapshot is removed"
    monkeypatch.undo()
    with LocalFileStorage(tmp_path, **SMALL) as again:
        assert not again.report.snapshot_used
        again._check()
        assert dict(again.items()) == {**{f"k{i}": i for i in range(50)}, "more": 1}


def version_1_snapshot(data: bytes) -> bytes:
    """The version-1 file for the index of a version-2 snapshot ``data``: what
    logstate wrote before compressed locations had a sixth field (5-tuples,
    live bytes counting their decompressed sizes, header version 1, no flags)."""
    snap = decode_snapshot(data)

    def old(loc: Any) -> Any:
        return loc[:5] if type(loc) is tuple else loc

    namespaces = {
        ns: {k: old(v) for k, v in index.items()} for ns, index in snap.namespaces.items()
    }
    live = sum(
        (v[4] if type(v) is tuple else (v >> 2) & 0xFFFFFFFF)
        for index in namespaces.values()
        for v in index.values()
    )
    body = marshal.dumps(
        (namespaces, old(snap.checkpoint), snap.seq, live, [tuple(m) for m in snap.segments])
    )
    header = SNAPSHOT_HEADER.pack(
        SNAPSHOT_MAGIC, 1, *sys.version_info[:2], marshal.version, 0, len(body), crc32c(body)
    )
    return header + body


def test_a_store_with_a_version_1_snapshot_still_opens_by_scanning(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, **SMALL, compress_min_size=0) as root:
        model: dict[str, Any] = dict(flush_keys(root, 300))
        root.set("plain", "record")
        model["plain"] = "record"
    path = tmp_path / SNAPSHOT_FILE_NAME
    path.write_bytes(version_1_snapshot(path.read_bytes()))
    with LocalFileStorage(tmp_path, **SMALL) as root:
        assert not root.report.snapshot_used
        root._check()
        assert contents(root) == model
    with LocalFileStorage(tmp_path, **SMALL) as root:  # the close wrote a version-2 one
        assert root.report.snapshot_used
        root._check()
        assert contents(root) == model
    assert os.path.getsize(path) <= segment_bytes(tmp_path)


def test_automatic_compaction_counts_a_compressed_groups_dead_share(tmp_path: Path) -> None:
    """Two flushes of the same keys: the first group is dead, half the store. The
    trigger (at the roll the third flush causes) sees it, and compacts."""
    options: dict[str, Any] = {
        "sync": "none",
        "segment_size": 64 * 1024,
        "compress_min_size": 0,
        "auto_compact": True,
        "compact_ratio": 0.4,
        "compact_min_size": 0,
    }
    with LocalFileStorage(tmp_path, **options) as root:
        flush_keys(root, 3_000)
        flush_keys(root, 3_000)
        engine = root._engine
        assert len(engine.segments.segments) == 1 and not engine.scheduler.compacting
        stats = root.stats()
        assert stats["dead_bytes"] >= 0.4 * stats["total_bytes"], stats
        model = flush_keys(root, 3_000)  # does not fit: a roll, where the trigger is read
        engine.wait_for_background_compaction()
        after = root.stats()["total_bytes"]
        assert after < stats["total_bytes"], "the dead group did not start a compaction"
        assert_live_bytes_fit_the_disk(root)
        assert contents(root) == model
