"""InMemoryStorage: dict protocol, flush as one atomic group, in-place mutations, checkpoints."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from logstate import InMemoryStorage, LocalFileStorage, PickleNotAllowedError
from logstate._filenames import segment_file_name
from logstate._format import REC_DELETE, REC_SET, encode_name
from logstate._values import encode_value

from .faultfs import CrashFS, open_storage


def _segment(path: Path) -> Path:
    return path / segment_file_name(1)


def _reopen(path: Path) -> dict[str, object]:
    with LocalFileStorage(path) as storage:
        return {key: storage[key] for key in storage}


def test_plain_in_memory_storage_is_a_dict_and_flush_writes_nothing() -> None:
    storage = InMemoryStorage()
    storage["a"] = 1
    storage.set("b", [1])
    assert storage.get("a") == 1 and storage["b"] == [1]
    assert storage.get("missing", "dflt") == "dflt"
    assert sorted(storage) == ["a", "b"] and len(storage) == 2
    assert storage.contains_key("a") and storage.has_key("b") and "a" in storage
    assert storage.pop("a") == 1 and "a" not in storage
    assert storage.setdefault("c", 3) == 3
    storage.update({"d": 4})
    assert dict(storage.items()) == {"b": [1], "c": 3, "d": 4}
    assert storage.popitem() in [("b", [1]), ("c", 3), ("d", 4)]
    storage.remove("nope")  # no error
    with pytest.raises(KeyError):
        del storage["nope"]
    with pytest.raises(KeyError):
        storage["nope"]
    storage.clear()
    assert len(storage) == 0
    assert storage.flush() == 0
    assert storage.is_case_sensitive is True
    assert storage.get_all_keys() == []


def test_loads_backing_contents_at_construction(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as backing:
        for i in range(50):
            backing.set(f"k{i}", {"i": i})
        with backing.batch() as batch:
            batch.set("grouped", b"g")
        storage = InMemoryStorage(backing)
        assert len(storage) == 51
        assert storage["k7"] == {"i": 7} and storage["grouped"] == b"g"


def test_loads_values_of_a_compressed_group(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, compress_min_size=0) as backing:
        with backing.batch() as batch:
            for i in range(100):
                batch.set(f"k{i}", "x" * 50)
        storage = InMemoryStorage(backing)
        assert {storage[f"k{i}"] for i in range(100)} == {"x" * 50}
        assert backing.get("k99") == "x" * 50


def test_flush_writes_only_the_changes_as_one_group_and_returns_their_count(tmp_path: Path) -> None:
    backing = LocalFileStorage(tmp_path, sync="always")
    storage = InMemoryStorage(backing)
    for i in range(10):
        storage[f"k{i}"] = i
    assert storage.flush() == 10
    size = _segment(tmp_path).stat().st_size
    assert storage.flush() == 0, "a flush with no changes writes nothing"
    assert _segment(tmp_path).stat().st_size == size
    storage["k1"] = 100
    del storage["k2"]
    assert storage.flush() == 2
    backing.close()
    assert _reopen(tmp_path) == {f"k{i}": i for i in range(10) if i != 2} | {"k1": 100}


def test_flush_accepts_positional_arguments_as_a_commit_callback(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as backing:
        storage = InMemoryStorage(backing)
        on_committing = storage.flush
        storage["a"] = 1
        assert on_committing(object()) == 1  # the callback receives the consumer
        storage["b"] = 2
        assert on_committing(object(), "extra", kw=1) == 1


def test_clear_is_flushed_as_deletes_of_its_keys_and_spares_sub_storages(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as backing:
        backing.set("old", 1)
        backing.set("older", 0)
        other = backing.get_or_create_sub_storage("other")
        other["x"] = 1
        storage = InMemoryStorage(backing)
        storage.clear()
        storage["new"] = 2
        assert storage.flush() == 3  # delete old, delete older, set new: one group
        assert backing.get_sub_storages() == ["other"] and other["x"] == 1
        other.close()
    assert _reopen(tmp_path) == {"new": 2}
    with LocalFileStorage(tmp_path) as backing:
        assert backing.get_or_create_sub_storage("other")["x"] == 1


def test_in_place_mutation_of_a_value_read_from_the_storage_is_persisted(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as backing:
        storage = InMemoryStorage(backing)
        storage["counts"] = {"a": 1}
        storage.flush()
        storage["counts"]["a"] += 1
        assert storage.flush() == 1
        counts = storage["counts"]  # a reference kept across flushes
        storage.flush()
        counts["b"] = 5
        assert storage.flush() == 1
        assert storage.flush() == 0, "an unchanged watched value is not rewritten"
    assert _reopen(tmp_path) == {"counts": {"a": 2, "b": 5}}


def test_mutation_of_a_value_loaded_from_disk_is_persisted(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as backing:
        backing.set("lst", [1])
        backing.set("untouched", {"x": 1})
        storage = InMemoryStorage(backing)
        storage.get("lst").append(2)
        assert storage.flush() == 1, "only the mutated value is written"
    assert _reopen(tmp_path) == {"lst": [1, 2], "untouched": {"x": 1}}


def test_mutation_after_set_before_flush_is_persisted(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as backing:
        storage = InMemoryStorage(backing)
        value: dict[str, int] = {}
        storage["v"] = value
        value["late"] = 1
        storage.flush()
    assert _reopen(tmp_path) == {"v": {"late": 1}}


def test_checkpoint_is_stored_in_the_same_group_and_readable_after_reopen(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as backing:
        assert backing.checkpoint is None
        storage = InMemoryStorage(backing)
        storage["k"] = 1
        assert storage.flush(None, checkpoint={"partition-0": 41}) == 2
        assert backing.checkpoint == {"partition-0": 41}
        assert storage.flush(checkpoint={"partition-0": 42}) == 1, "a checkpoint alone is written"
    with LocalFileStorage(tmp_path) as backing:
        assert backing.checkpoint == {"partition-0": 42}
        assert backing.get_all_keys() == ["k"]


def test_unstorable_value_fails_at_set_time_and_changes_nothing(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as backing:
        storage = InMemoryStorage(backing)
        storage["ok"] = 1
        with pytest.raises(TypeError, match="function"):
            storage["bad"] = lambda: None
        assert "bad" not in storage
        with pytest.raises(TypeError):
            storage[3] = "x"  # type: ignore[index]
        with pytest.raises(ValueError):
            storage[""] = "x"
        assert storage.flush() == 1
    assert _reopen(tmp_path) == {"ok": 1}


def test_pickled_values_follow_the_backing_storage_allow_pickle(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, allow_pickle=False) as backing:
        storage = InMemoryStorage(backing)
        storage["s"] = "text"
        with pytest.raises(PickleNotAllowedError):
            storage["d"] = {"a": 1}


def test_backing_storage_must_be_a_local_file_storage() -> None:
    with pytest.raises(TypeError, match="LocalFileStorage"):
        InMemoryStorage({})  # type: ignore[arg-type]


def test_flush_on_a_closed_backing_storage_raises_and_keeps_the_changes(tmp_path: Path) -> None:
    backing = LocalFileStorage(tmp_path)
    storage = InMemoryStorage(backing)
    storage["a"] = 1
    backing.close()
    from logstate import StorageClosedError

    with pytest.raises(StorageClosedError):
        storage.flush()
    assert storage.pending_changes() == 1


def test_flush_on_a_closed_backing_storage_raises_also_with_nothing_to_write(
    tmp_path: Path,
) -> None:
    from logstate import StorageClosedError

    backing = LocalFileStorage(tmp_path)
    storage = InMemoryStorage(backing)
    backing.close()
    with pytest.raises(StorageClosedError):
        storage.flush()


def test_sub_storage_as_backing(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as root:
        sub = root.get_or_create_sub_storage("state")
        storage = InMemoryStorage(sub)
        storage["x"] = 1
        storage.flush()
        assert sub.get("x") == 1 and root.get("x") is None
        sub.close()


def test_concurrent_writers_and_flushes_never_lose_a_change(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, sync="none") as backing:
        storage = InMemoryStorage(backing)

        def writer(n: int) -> None:
            for i in range(300):
                storage[f"t{n}-{i}"] = i

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        flusher_stop = threading.Event()

        def flusher() -> None:
            while not flusher_stop.is_set():
                storage.flush()

        f = threading.Thread(target=flusher)
        f.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flusher_stop.set()
        f.join()
        storage.flush()
    assert _reopen(tmp_path) == {f"t{n}-{i}": i for n in range(4) for i in range(300)}


def test_batch_is_one_group_and_an_exception_discards_it(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as storage:
        storage["keep"] = 0
        size = _segment(tmp_path).stat().st_size
        with pytest.raises(RuntimeError), storage.batch() as batch:
            batch.set("a", 1)
            raise RuntimeError("boom")
        assert _segment(tmp_path).stat().st_size == size
        assert "a" not in storage
        with storage.batch() as batch:
            batch.set("a", 1)
            batch.set("b", 2)
            assert "a" not in storage, "reads inside the block see the storage as before"
            batch.remove("keep")
        assert sorted(storage) == ["a", "b"]
    assert os.path.getsize(_segment(tmp_path)) > size


def test_a_group_larger_than_the_segment_size_goes_into_one_segment_whole(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path, segment_size=4096, compress_min_size=None) as backing:
        backing.set("first", 1)
        storage = InMemoryStorage(backing)
        for i in range(200):
            storage[f"k{i}"] = "v" * 50  # ~13 KB of operations: three times the segment size
        storage.flush()
        backing.set("after", 2)
        segments = sorted(p.name for p in tmp_path.glob("segment-*.seg"))
        assert len(segments) == 3, segments  # the group alone in segment 2, "after" in 3
        sizes = [(tmp_path / name).stat().st_size for name in segments]
        assert sizes[1] > 3 * 4096
    with LocalFileStorage(tmp_path) as reopened:
        assert len(reopened) == 202
        assert reopened["k199"] == "v" * 50
        reopened._check()


@pytest.mark.parametrize(
    "options",
    [{}, {"compress_min_size": 0}],
    ids=["plain group", "compressed group"],
)
def test_flush_of_sets_deletes_and_a_checkpoint_round_trips(
    tmp_path: Path, options: dict[str, object]
) -> None:
    with LocalFileStorage(tmp_path, **options) as backing:  # type: ignore[arg-type]
        storage = InMemoryStorage(backing)
        for i in range(50):
            storage[f"k{i}"] = i
        storage.flush()
        for i in range(0, 50, 3):
            del storage[f"k{i}"]
        storage["k1"] = "one"
        storage["new"] = [1, 2]
        assert storage.flush(checkpoint="cp") == 17 + 2 + 1
        backing._check()  # index, live bytes and every record agree
        expected = dict(storage.items())
    with LocalFileStorage(tmp_path) as reopened:
        reopened._check()
        assert reopened.checkpoint == "cp"
        assert {key: reopened[key] for key in reopened} == expected


def test_flush_of_one_change_is_a_plain_record(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as backing:
        storage = InMemoryStorage(backing)
        storage["only"] = b"value"
        assert storage.flush() == 1
        size = _segment(tmp_path).stat().st_size
        del storage["only"]
        assert storage.flush() == 1
        assert _segment(tmp_path).stat().st_size > size
        backing._check()
    with LocalFileStorage(tmp_path) as reopened:
        assert "only" not in reopened


FLUSH_SHAPES: dict[str, tuple[dict[str, object], object, int | None]] = {
    # (changes, checkpoint (None: no checkpoint), compress_min_size): each takes
    # one of write_keys's two paths
    "group": ({"a": 1, "b": [2], "c": "three"}, None, None),
    "group and checkpoint": ({"a": 1, "b": 2}, {"offset": 7}, None),
    "one key: a plain record": ({"only": b"value"}, None, None),
    "checkpoint only": ({}, {"offset": 8}, None),
    "compressed group": ({"a": "x" * 100, "b": "y" * 100}, None, 1),
}


@pytest.mark.parametrize("shape", FLUSH_SHAPES, ids=list(FLUSH_SHAPES))
def test_flush_with_sync_interval_returns_with_its_bytes_synced(tmp_path: Path, shape: str) -> None:
    # A flush is durable when it returns, in every sync mode but "none": the
    # interval thread (an hour here) is not what syncs it.
    changes, checkpoint, compress_min_size = FLUSH_SHAPES[shape]
    fs = CrashFS(tmp_path)
    backing = open_storage(
        fs,
        tmp_path / "store",
        sync="interval",
        sync_interval=3600.0,
        auto_compact=False,
        compress_min_size=compress_min_size,
    )
    try:
        storage = InMemoryStorage(backing)
        backing["plain set"] = 1
        assert fs.unsynced_bytes() > 0  # a set is not synced before the interval
        for key, value in changes.items():
            storage[key] = value
        syncs = fs.calls["fdatasync"]
        if checkpoint is None:
            assert storage.flush() == len(changes)
        else:
            assert storage.flush(checkpoint=checkpoint) == len(changes) + 1
        assert fs.calls["fdatasync"] == syncs + 1
        assert fs.unsynced_bytes() == 0, "the flush returned before its bytes were synced"
        power_loss = fs.durable_state()  # now, not after close() (which syncs)
        assert storage.flush() == 0  # nothing changed: no write, no sync
        assert fs.calls["fdatasync"] == syncs + 1
    finally:
        backing.close()
    reopened = CrashFS.materialize(power_loss, tmp_path / "after power loss")
    with LocalFileStorage(reopened / "store") as after:
        assert {key: after[key] for key in changes} == changes
        assert after.checkpoint == checkpoint


def test_flush_with_sync_none_leaves_the_sync_to_the_os(tmp_path: Path) -> None:
    fs = CrashFS(tmp_path)
    backing = open_storage(fs, tmp_path / "store", sync="none", auto_compact=False)
    try:
        storage = InMemoryStorage(backing)
        storage.update({"a": 1, "b": 2})
        syncs = fs.calls["fdatasync"]
        assert storage.flush() == 2
        assert fs.calls["fdatasync"] == syncs
        assert fs.unsynced_bytes() > 0
    finally:
        backing.close()


@pytest.mark.parametrize(
    "compress_min_size",
    [None, 1, 130, 200],
    # 130: the key operations alone are below it, with the checkpoint above
    # (a review found write_keys left the checkpoint out of that decision)
    ids=["never compressed", "always compressed", "checkpoint tips it", "never reached"],
)
def test_flush_writes_the_same_bytes_as_the_general_group_path(
    tmp_path: Path, compress_min_size: int | None
) -> None:
    # Engine.write_keys (the flush path) must produce exactly the record that
    # write_group (Batch's path, the reference) produces for the same operations.
    changes: dict[str, object] = {"a": 1, "é": "x" * 30, "gone": None, "z": [1, 2]}

    def build(path: Path, via_flush: bool) -> bytes:
        with LocalFileStorage(path, compress_min_size=compress_min_size) as backing:
            backing.set("gone", 0)
            sub = backing.get_or_create_sub_storage("sub")
            sub.set("gone", 0)
            engine, ns_bytes = sub._engine, sub._ns_bytes
            keys = list(changes)
            values = [None if v is None else encode_value(v) for v in changes.values()]
            checkpoint = encode_value({"p": "c" * 40})
            if via_flush:
                assert engine.write_keys(sub._ns, ns_bytes, keys, values, checkpoint) == 5
            else:
                ops = [
                    (REC_DELETE, ns_bytes + encode_name(k))
                    if v is None
                    else (REC_SET, ns_bytes + encode_name(k) + v)
                    for k, v in zip(keys, values, strict=True)
                ]
                assert engine.write_group(ops, checkpoint) == 5
            backing._check()
            assert sub.get_all_keys() == ["a", "é", "z"]
            assert backing.checkpoint == {"p": "c" * 40}
        return _segment(path).read_bytes()

    assert build(tmp_path / "flush", True) == build(tmp_path / "group", False)


# =========================================================================== context manager
def test_with_block_flushes_on_a_clean_exit_and_closes_what_it_opened(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    with InMemoryStorage(directory) as m:
        m["a"] = 1
        backing = m.backing_storage
        assert backing is not None and not backing.closed
    assert backing.closed  # it opened it (from the path): it closed it
    with LocalFileStorage(directory) as s:
        assert s["a"] == 1


def test_with_block_writes_nothing_on_an_exception(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path / "s") as s:
        s["a"] = 0
        with pytest.raises(RuntimeError), InMemoryStorage(s) as m:
            m["a"] = 1
            m["b"] = 2
            raise RuntimeError("stop")
        assert not s.closed  # the caller's storage stays open
        assert dict(s.items()) == {"a": 0}
        with InMemoryStorage(s) as m2:
            m2["b"] = 3
        assert not s.closed and dict(s.items()) == {"a": 0, "b": 3}


def test_a_backing_storage_that_fails_to_load_is_closed_again(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    with LocalFileStorage(directory) as s:
        s["obj"] = {1, 2}  # a pickle: a read with allow_pickle=False refuses it
    with LocalFileStorage(directory, allow_pickle=False) as strict:
        with pytest.raises(PickleNotAllowedError):
            InMemoryStorage(strict)
        assert not strict.closed  # the caller's: left open
    with pytest.raises(TypeError, match="directory path"):
        InMemoryStorage(3)  # type: ignore[arg-type]
