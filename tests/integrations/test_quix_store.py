"""The Quix Streams store on logstate, method by method: store, partition, transactions.

Every Quix class here is the real one (quixstreams 3.28); the partition
runs Quix's own transactions, so these tests check what they get from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from quixstreams.state.base import PartitionTransactionCache
from quixstreams.state.exceptions import InvalidChangelogOffset, PartitionNotAssignedError
from quixstreams.state.metadata import Marker
from quixstreams.state.rocksdb import RocksDBOptions, RocksDBStore

from logstate import StorageLockedError
from logstate.integrations.quixstreams import (
    LogstateStore,
    LogstateStorePartition,
    LogstateTimestampedStore,
    LogstateWindowedStore,
    QuixKeyTooLongError,
    max_quix_key_size,
)
from tests.integrations.quix_helpers import ChangelogFactory


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogstateStore]:
    s = LogstateStore(name="st", stream_id="topic", base_dir=str(tmp_path))
    yield s
    s.close()


def test_partition_directory_is_laid_out_as_rocksdb_store_does(tmp_path: Path) -> None:
    s = LogstateStore(name="st", stream_id="topic", base_dir=str(tmp_path))
    partition: Any = s.assign_partition(3)
    assert isinstance(partition, LogstateStorePartition)
    assert partition.path == str(tmp_path / "st" / "topic" / "3")
    assert s.assign_partition(3) is partition  # assigning twice: the same partition
    s.revoke_partition(3)
    assert s.partitions == {}
    assert os.path.isdir(tmp_path / "st" / "topic" / "3")


def test_transaction_set_get_delete_exists_round_trip(store: LogstateStore) -> None:
    store.assign_partition(0)
    with store.start_partition_transaction(0) as tx:
        tx.set("a", {"n": 1}, prefix=b"k")
        tx.set("b", [1, 2], prefix=b"k")
        tx.set_bytes("raw", b"\x00\xff", prefix=b"k")
        assert tx.get("a", prefix=b"k") == {"n": 1}  # read-your-writes
    tx = store.start_partition_transaction(0)
    assert tx.get("a", prefix=b"k") == {"n": 1}
    assert tx.get_bytes("raw", prefix=b"k") == b"\x00\xff"
    assert tx.exists("b", prefix=b"k") and not tx.exists("c", prefix=b"k")
    assert tx.get("c", prefix=b"k", default=7) == 7
    tx.delete("a", prefix=b"k")
    assert tx.get("a", prefix=b"k") is None
    tx.prepare()
    tx.flush(changelog_offset=5)
    partition = store.partitions[0]
    assert partition.get_changelog_offset() == 5
    with store.start_partition_transaction(0) as tx2:
        assert tx2.get("a", prefix=b"k") is None and tx2.get("b", prefix=b"k") == [1, 2]


def test_flush_is_one_logstate_group_with_the_offset(store: LogstateStore) -> None:
    partition: Any = store.assign_partition(0)
    before = partition.storage.stats()
    with store.start_partition_transaction(0) as tx:
        for i in range(10):
            tx.set(f"k{i}", i, prefix=b"p")
    tx.flush  # noqa: B018 (the with block flushed without an offset)
    tx = store.start_partition_transaction(0)
    for i in range(10):
        tx.set(f"k{i}", i + 1, prefix=b"p")
    tx.prepare()
    tx.flush(changelog_offset=9)
    after = partition.storage.stats()
    assert after["keys"] - before["keys"] == 11  # 10 keys + the offset
    # nothing but the group is written: reopening sees all 10 keys and the offset together
    store.revoke_partition(0)
    partition = store.assign_partition(0)
    assert partition.get_changelog_offset() == 9
    assert all(partition.get(f'p|"k{i}"'.encode()) == str(i + 1).encode() for i in range(10))


def test_partition_get_exists_and_write_without_transaction(store: LogstateStore) -> None:
    partition: Any = store.assign_partition(0)
    cache = PartitionTransactionCache()
    cache.set(b"k1", b"v1", prefix=b"", cf_name="default")
    cache.set(b"k1", b"other", prefix=b"", cf_name="cf2")
    cache.delete(b"gone", prefix=b"")
    partition.write(cache, changelog_offset=None)
    assert partition.get(b"k1") == b"v1" and partition.get(b"k1", cf_name="cf2") == b"other"
    assert partition.get(b"gone") is Marker.UNDEFINED
    assert partition.exists(b"k1") and not partition.exists(b"k1", cf_name="cf3")
    assert partition.get_changelog_offset() is None
    partition.write_changelog_offset(12)
    assert partition.get_changelog_offset() == 12


def test_lower_changelog_offset_is_refused(store: LogstateStore) -> None:
    store.assign_partition(0)
    tx = store.start_partition_transaction(0)
    tx.set("a", 1, prefix=b"")
    tx.prepare()
    tx.flush(changelog_offset=10)
    tx = store.start_partition_transaction(0)
    tx.set("a", 2, prefix=b"")
    tx.prepare()
    with pytest.raises(InvalidChangelogOffset):
        tx.flush(changelog_offset=3)
    assert store.partitions[0].get(b'"a"') == b"1"


def test_iter_items_is_ordered_bounded_and_reversible(store: LogstateStore) -> None:
    partition: Any = store.assign_partition(0)
    cache = PartitionTransactionCache()
    keys = [b"\x00", b"a", b"a\x00", b"a\xff", b"b", b"\x80", b"\xff\xff"]
    for k in keys:
        cache.set(k, k, prefix=b"")
    cache.set(b"a", b"other cf", prefix=b"", cf_name="zz")
    partition.write(cache, None)
    assert [k for k, _ in partition.iter_items(b"")] == sorted(keys)
    assert [k for k, _ in partition.iter_items(b"a", b"b")] == [b"a", b"a\x00", b"a\xff"]
    assert [k for k, _ in partition.iter_items(b"a", b"\xff", backwards=True)] == [
        b"\x80",
        b"b",
        b"a\xff",
        b"a\x00",
        b"a",
    ]
    assert list(partition.iter_items(b"", cf_name="zz")) == [(b"a", b"other cf")]
    with pytest.raises(ValueError, match="upper bound"):
        list(partition.iter_items(b"", backwards=True))


def test_key_too_long_is_refused_naming_the_limit_and_nothing_is_written(
    store: LogstateStore,
) -> None:
    partition: Any = store.assign_partition(0)
    limit = max_quix_key_size("default")
    assert limit == 2044
    fits = b"\xff" * limit
    cache = PartitionTransactionCache()
    cache.set(fits, b"ok", prefix=b"")
    partition.write(cache, 1)
    assert partition.get(fits) == b"ok"
    cache = PartitionTransactionCache()
    cache.set(b"x", b"not written", prefix=b"")
    cache.set(b"\xff" * 2100, b"v", prefix=b"")
    with pytest.raises(QuixKeyTooLongError, match="2100 bytes in column family 'default'"):
        partition.write(cache, 2)
    assert partition.get(b"x") is Marker.UNDEFINED and partition.get_changelog_offset() == 1
    assert partition.get(b"\xff" * 5000) is Marker.UNDEFINED  # a read is only "not found"
    ascii_key = b"a" * 4000  # ASCII keys fit up to 4096 - len("default\0")
    cache = PartitionTransactionCache()
    cache.set(ascii_key, b"v", prefix=b"")
    partition.write(cache, 3)
    assert partition.get(ascii_key) == b"v"


def test_bad_arguments_raise_naming_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sync"):
        LogstateStorePartition(str(tmp_path / "p"), sync="sometimes")
    with pytest.raises(ValueError, match="recovery_batch_size"):
        LogstateStorePartition(str(tmp_path / "p"), recovery_batch_size=0)
    with pytest.raises(ValueError, match="lock_timeout_s"):
        LogstateStorePartition(str(tmp_path / "p"), lock_timeout_s=-1)
    with pytest.raises(ValueError, match="name"):
        LogstateStore(name="", stream_id=None, base_dir=str(tmp_path))
    with pytest.raises(ValueError, match="grace_ms"):
        LogstateTimestampedStore("t", "s", str(tmp_path), grace_ms=-1, keep_duplicates=False)
    partition = LogstateStorePartition(str(tmp_path / "p"))
    with pytest.raises(TypeError, match="bytes"):
        partition.get("str key")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="offset"):
        partition.write_changelog_offset("1")  # type: ignore[arg-type]
    partition.close()


def test_closed_partition_refuses_reads_and_writes(store: LogstateStore) -> None:
    partition: Any = store.assign_partition(0)
    partition.close()
    partition.close()  # idempotent
    with pytest.raises(Exception, match="closed"):
        partition.get(b"k")
    with pytest.raises(RuntimeError, match="closed"):
        partition.write(PartitionTransactionCache(), 1)
    with pytest.raises(RuntimeError, match="closed"):
        partition.begin()


def test_unassigned_partition_transaction_is_refused(store: LogstateStore) -> None:
    with pytest.raises(PartitionNotAssignedError):
        store.start_partition_transaction(4)


def test_destroy_partition_deletes_a_revoked_partition_only(store: LogstateStore) -> None:
    store.assign_partition(0)
    with pytest.raises(RuntimeError, match="revoke it first"):
        store.destroy_partition(0)
    store.revoke_partition(0)
    assert store.destroy_partition(0) is True
    assert store.destroy_partition(0) is False
    assert not os.path.exists(store.partition_path(0))


def test_another_process_holding_the_partition_is_waited_for_then_refused(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys
    import threading
    import time

    path = str(tmp_path / "p")
    LogstateStorePartition(path).close()
    code = (
        "import sys, time\n"
        "from logstate import LocalFileStorage\n"
        "s = LocalFileStorage(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "s.close()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    child = subprocess.Popen(
        [sys.executable, "-c", code, path, "1.0"], stdout=subprocess.PIPE, env=env
    )
    assert child.stdout is not None and child.stdout.readline().strip() == b"held"
    started = time.monotonic()
    partition = LogstateStorePartition(path, lock_timeout_s=10)  # the handover is waited for
    waited_s = time.monotonic() - started
    partition.close()
    child.wait(timeout=10)
    assert 0.3 < waited_s < 9
    child = subprocess.Popen(
        [sys.executable, "-c", code, path, "3"], stdout=subprocess.PIPE, env=env
    )
    assert child.stdout is not None and child.stdout.readline().strip() == b"held"
    with pytest.raises(StorageLockedError, match=str(child.pid)):
        LogstateStorePartition(path, lock_timeout_s=0.2)
    stop = threading.Event()
    stop.set()  # the application is shutting down: the wait ends at once
    started = time.monotonic()
    with pytest.raises(StorageLockedError):
        LogstateStorePartition(path, lock_timeout_s=30, stop_event=stop)
    assert time.monotonic() - started < 5
    child.kill()
    child.wait(timeout=10)


# ---------------------------------------------------------------- TTL (event time)
def test_ttl_write_flips_an_empty_store_and_expires_by_event_time(store: LogstateStore) -> None:
    partition: Any = store.assign_partition(0)
    assert partition.uses_ttl_stamps is False
    with store.start_partition_transaction(0) as tx:
        state = tx.as_state(prefix=b"key", timestamp=1_000)
        state.set("short", 1, ttl=timedelta(seconds=1))
        state.set("forever", 2)
    assert partition.uses_ttl_stamps is True
    # the stored value carries Quix's 8-byte big-endian expiry stamp
    assert partition.get(b'key|"short"')[:8] == (2_000).to_bytes(8, "big")
    tx = store.start_partition_transaction(0)
    assert tx.as_state(prefix=b"key", timestamp=1_999).get("short") == 1
    assert tx.as_state(prefix=b"key", timestamp=2_000).get("short") is None  # event time reached
    assert tx.as_state(prefix=b"key", timestamp=2_000).get("forever") == 2
    tx.as_state(prefix=b"key", timestamp=2_500).set("other", 3)
    tx.prepare()
    tx.flush(changelog_offset=1)
    assert partition.get(b'key|"short"') is Marker.UNDEFINED  # swept in that flush
    store.revoke_partition(0)
    partition = store.assign_partition(0)
    assert partition.uses_ttl_stamps is True and partition.high_water_ms == 2_500


@pytest.mark.parametrize("legacy_records_ttl", [None, timedelta(seconds=10)])
def test_ttl_on_a_populated_store_backfills_as_rocksdb_does(
    tmp_path: Path, legacy_records_ttl: timedelta | None
) -> None:
    """The first ttl= write on a store written without TTL: Quix's legacy-TTL migration."""
    options = RocksDBOptions(open_max_retries=0, legacy_records_ttl=legacy_records_ttl)
    factories = [ChangelogFactory(), ChangelogFactory()]
    stores: list[Any] = [
        RocksDBStore(
            name="s",
            stream_id="t",
            base_dir=str(tmp_path / "r"),
            options=options,
            changelog_producer_factory=cast(Any, factories[0]),
        ),
        LogstateStore(
            name="s",
            stream_id="t",
            base_dir=str(tmp_path / "l"),
            options=options,
            changelog_producer_factory=cast(Any, factories[1]),
        ),
    ]
    for store in stores:
        store.assign_partition(0)
        with store.start_partition_transaction(0) as tx:
            for k in range(5):
                tx.as_state(prefix=b"k", timestamp=100).set(f"old{k}", k)
        tx = store.start_partition_transaction(0)
        tx.as_state(prefix=b"k", timestamp=1_000).set("new", 1, ttl=timedelta(seconds=2))
        tx.as_state(prefix=b"k", timestamp=1_000).set("old0", "rewritten")
        tx.prepare(processed_offsets={"input": 1})
        tx.flush(changelog_offset=1)
        store.revoke_partition(0)
    produced = [sorted(f.producers[0].records) for f in factories]
    results = []
    for store in stores:
        partition = store.assign_partition(0)
        raw = {k: partition.get(k) for k in [b'k|"new"', *(b'k|"old%d"' % i for i in range(5))]}
        tx = store.start_partition_transaction(0)
        reads = [
            tx.as_state(prefix=b"k", timestamp=t).get(f"old{k}")
            for t in (1_500, 2_999, 11_000)
            for k in range(5)
        ]
        results.append(
            (
                partition.uses_ttl_stamps,
                raw,
                reads,
                tx.as_state(prefix=b"k", timestamp=2_999).get("new"),
            )
        )
        store.close()
    assert results[0] == results[1]
    assert produced[0] == produced[1] and len(produced[0]) >= 5  # the stamped records, on both
    assert results[1][0] is True


def test_ttl_sweep_is_local_only_when_changelog_tombstones_are_off(tmp_path: Path) -> None:
    options = RocksDBOptions(ttl_changelog_tombstones=False)
    s = LogstateStore(name="st", stream_id="t", base_dir=str(tmp_path), options=options)
    partition: Any = s.assign_partition(0)
    with s.start_partition_transaction(0) as tx:
        tx.as_state(prefix=b"k", timestamp=10).set("a", 1, ttl=timedelta(milliseconds=5))
    with s.start_partition_transaction(0) as tx:
        tx.as_state(prefix=b"k", timestamp=100).set("b", 2)
    assert partition.get(b'k|"a"') is Marker.UNDEFINED
    s.close()


# ---------------------------------------------------------------- windowed, timestamped
def test_windowed_transaction_updates_gets_and_expires_windows(tmp_path: Path) -> None:
    s = LogstateWindowedStore(name="w", stream_id="t", base_dir=str(tmp_path))
    s.assign_partition(0)
    tx: Any = s.start_partition_transaction(0)
    tx.update_window(0, 10, value=1, timestamp_ms=1, prefix=b"a")
    tx.update_window(10, 20, value=2, timestamp_ms=11, prefix=b"a")
    tx.update_window(0, 10, value=5, timestamp_ms=2, prefix=b"b")
    tx.prepare()
    tx.flush(changelog_offset=1)
    tx = s.start_partition_transaction(0)
    assert tx.get_window(0, 10, prefix=b"a") == 1
    # start_from_ms is exclusive, as on RocksDB
    assert tx.get_windows(0, 100, prefix=b"a") == [((10, 20), 2, b"a")]
    assert tx.get_windows(-1, 100, prefix=b"a") == [((0, 10), 1, b"a"), ((10, 20), 2, b"a")]
    assert tx.get_windows(-1, 100, prefix=b"a", backwards=True) == [
        ((10, 20), 2, b"a"),
        ((0, 10), 1, b"a"),
    ]
    expired = list(tx.expire_windows(max_start_time=5, prefix=b"a"))
    assert expired == [((0, 10), 1, [], b"a")]
    assert tx.get_window(0, 10, prefix=b"a") is None
    assert sorted(tx.keys()) != []
    tx.prepare()
    tx.flush(changelog_offset=2)
    partition: Any = s.partitions[0]
    assert partition.uses_ttl_stamps is False
    assert [k for k in partition.iter_keys()]
    s.close()


def test_timestamped_transaction_gets_latest_within_grace(tmp_path: Path) -> None:
    s = LogstateTimestampedStore("ts", "t", str(tmp_path), grace_ms=100, keep_duplicates=False)
    s.assign_partition(0)
    tsx: Any
    with s.start_partition_transaction(0) as tsx:
        tsx.set_for_timestamp(10, "v10", prefix=b"k")
        tsx.set_for_timestamp(20, "v20", prefix=b"k")
    tx2: Any = s.start_partition_transaction(0)
    assert tx2.get_latest(15, prefix=b"k") == "v10"
    assert tx2.get_latest(25, prefix=b"k") == "v20"
    assert tx2.get_latest(5, prefix=b"k") is None
    s.close()
