"""Changelog recovery on the logstate store, through Quix's own ``RecoveryPartition``.

Recovered messages are written in groups of ``recovery_batch_size`` with
their offset; ``get_changelog_offset`` is never ahead of what is written,
and an interrupted recovery resumes from the last written group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from quixstreams.state.metadata import CHANGELOG_TTL_STAMPED_HEADER, Marker
from quixstreams.state.recovery import RecoveryPartition
from quixstreams.state.rocksdb import RocksDBOptions, RocksDBStorePartition
from quixstreams.state.rocksdb.ttl_codec import SENTINEL_NEVER, encode_ttl_value

from logstate.integrations.quixstreams import LogstateStorePartition, QuixKeyTooLongError
from tests.integrations.quix_helpers import ChangelogMessage, RecordingChangelog, as_message

ROOT = Path(__file__).resolve().parents[2]


def _recovery_partition(
    partition: LogstateStorePartition, committed: int = 10**9
) -> RecoveryPartition:
    return RecoveryPartition(
        changelog_name="changelog",
        partition_num=0,
        store_partition=partition,
        committed_offsets={"input": committed},
        lowwater=0,
        highwater=10**6,
    )


def test_recovery_is_written_in_batches_with_the_offset(tmp_path: Path) -> None:
    path = str(tmp_path / "p")
    partition = LogstateStorePartition(path, recovery_batch_size=100)
    rp = _recovery_partition(partition)
    for offset in range(250):
        rp.recover_from_changelog_message(
            as_message(ChangelogMessage(f"k{offset % 30}".encode(), str(offset).encode(), offset))
        )
    # two groups written (offsets 0-99, 100-199); 50 messages buffered, not reported
    storage = partition.storage
    assert storage.get("__metadata__\0__changelog_offset__") == (199).to_bytes(8, "big")
    rp.complete_recovery()
    assert partition.get_changelog_offset() == 249
    assert partition.get(b"k9") == b"249"
    partition.close()
    reopened = LogstateStorePartition(path)
    assert reopened.get_changelog_offset() == 249
    assert all(
        reopened.get(f"k{i}".encode()) == str(240 + i - (0 if i < 10 else 30)).encode()
        for i in range(30)
    )
    reopened.close()


def test_reading_during_recovery_writes_the_buffer_first(tmp_path: Path) -> None:
    partition = LogstateStorePartition(str(tmp_path / "p"), recovery_batch_size=1000)
    rp = _recovery_partition(partition)
    rp.recover_from_changelog_message(as_message(ChangelogMessage(b"a", b"1", 0)))
    rp.recover_from_changelog_message(as_message(ChangelogMessage(b"a", None, 1)))
    rp.recover_from_changelog_message(as_message(ChangelogMessage(b"b", b"2", 2)))
    assert partition.get_changelog_offset() == 2  # written, then read
    assert partition.get(b"a") is Marker.UNDEFINED and partition.get(b"b") == b"2"
    partition.close()


def test_skipped_messages_still_move_the_offset(tmp_path: Path) -> None:
    partition = LogstateStorePartition(str(tmp_path / "p"))
    rp = _recovery_partition(partition, committed=5)
    rp.recover_from_changelog_message(
        as_message(ChangelogMessage(b"a", b"1", 0, processed_offsets={"input": 3}))
    )
    rp.recover_from_changelog_message(  # produced but its input offset was never committed
        as_message(ChangelogMessage(b"b", b"1", 1, processed_offsets={"input": 7}))
    )
    rp.complete_recovery()
    assert partition.get_changelog_offset() == 1
    assert partition.get(b"a") == b"1" and partition.get(b"b") is Marker.UNDEFINED
    partition.close()


def test_close_during_recovery_writes_the_buffer(tmp_path: Path) -> None:
    path = str(tmp_path / "p")
    partition = LogstateStorePartition(path, recovery_batch_size=1000)
    rp = _recovery_partition(partition)
    for offset in range(10):
        rp.recover_from_changelog_message(
            as_message(ChangelogMessage(b"k", str(offset).encode(), offset))
        )
    partition.close()  # a revoke mid-recovery
    reopened = LogstateStorePartition(path)
    assert reopened.get_changelog_offset() == 9 and reopened.get(b"k") == b"9"
    reopened.close()


_KILLED_RECOVERY = """
import os, sys
from quixstreams.state.recovery import RecoveryPartition
from quixstreams.state.rocksdb import RocksDBOptions, RocksDBStorePartition
from logstate.integrations.quixstreams import LogstateStorePartition
from tests.integrations.quix_helpers import ChangelogMessage
partition = LogstateStorePartition(sys.argv[1], recovery_batch_size=50)
rp = RecoveryPartition(changelog_name="c", partition_num=0, store_partition=partition,
                       committed_offsets={}, lowwater=0, highwater=10**6)
start = partition.get_changelog_offset()
start = 0 if start is None else start + 1
for offset in range(start, 1000):
    message = ChangelogMessage(b"k%d" % (offset % 3), b"%d" % offset, offset)
    rp.recover_from_changelog_message(message)
    if offset == int(sys.argv[2]):
        os.kill(os.getpid(), 9)
rp.complete_recovery()
partition.close()
"""


def test_interrupted_recovery_resumes_from_the_last_written_group(tmp_path: Path) -> None:
    path = str(tmp_path / "p")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = [sys.executable, "-W", "ignore", "-c", _KILLED_RECOVERY, path]
    killed = subprocess.run([*run, "437"], env=env, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    partition = LogstateStorePartition(path)
    offset = partition.get_changelog_offset()
    assert offset == 399  # the groups of 50 up to 399 were written; 400-437 were buffered
    for k in range(3):  # the data is exactly that of offset 399
        last = max(o for o in range(offset + 1) if o % 3 == k)
        assert partition.get(b"k%d" % k) == b"%d" % last
    partition.close()
    finished = subprocess.run([*run, "-1"], env=env, timeout=60)
    assert finished.returncode == 0
    partition = LogstateStorePartition(path)
    assert partition.get_changelog_offset() == 999
    assert [partition.get(b"k%d" % k) for k in range(3)] == [b"999", b"997", b"998"]
    partition.close()


def test_ttl_stamped_changelog_flips_the_store_and_drops_expired_records(tmp_path: Path) -> None:
    path = str(tmp_path / "p")
    partition = LogstateStorePartition(path)
    partition.advance_high_water(5_000)  # the event-time frontier at recovery
    rp = _recovery_partition(partition)
    stamped = [(CHANGELOG_TTL_STAMPED_HEADER, b"\x01")]
    rp.recover_from_changelog_message(
        as_message(
            ChangelogMessage(b"old", encode_ttl_value(4_000, b"1"), 0, extra_headers=stamped)
        )
    )
    rp.recover_from_changelog_message(
        as_message(
            ChangelogMessage(b"live", encode_ttl_value(9_000, b"2"), 1, extra_headers=stamped)
        )
    )
    rp.recover_from_changelog_message(
        as_message(
            ChangelogMessage(
                b"ever", encode_ttl_value(SENTINEL_NEVER, b"3"), 2, extra_headers=stamped
            )
        )
    )
    rp.complete_recovery()
    assert partition.uses_ttl_stamps is True
    assert partition.get(b"old") is Marker.UNDEFINED
    tx = partition.begin()
    assert tx.get(b"live", prefix=b"", timestamp=8_999) == 2
    assert tx.get(b"ever", prefix=b"", timestamp=8_999) == 3
    partition.close()
    reopened = LogstateStorePartition(path)
    assert reopened.uses_ttl_stamps is True
    tx = reopened.begin()
    assert tx.get(b"live", prefix=b"", timestamp=9_000) is None  # expired by event time
    reopened.close()


@pytest.mark.parametrize("stamps_ahead", [True, False], ids=["survivors-ahead", "all-past"])
def test_mixed_changelog_completes_the_migration_as_rocksdb_does(
    tmp_path: Path, stamps_ahead: bool
) -> None:
    """Legacy records left beside stamped ones (an interrupted legacy-TTL migration)."""
    base_ms = int(time.time() * 1000) + 3_600_000 if stamps_ahead else 1_000_000_000_000
    stamped = [(CHANGELOG_TTL_STAMPED_HEADER, b"\x01")]
    messages = [
        ChangelogMessage(b"k1", b"1", 0),
        ChangelogMessage(b"k2", b"2", 1),
        ChangelogMessage(b"k3", b"3", 2),
        ChangelogMessage(b"k1", encode_ttl_value(base_ms, b"11"), 3, extra_headers=stamped),
        ChangelogMessage(b"k4", encode_ttl_value(base_ms + 5, b"4"), 4, extra_headers=stamped),
        ChangelogMessage(b"k2", None, 5),
    ]
    changelogs = [RecordingChangelog(), RecordingChangelog()]
    partitions: list[Any] = [
        RocksDBStorePartition(
            str(tmp_path / "rocks"),
            options=RocksDBOptions(open_max_retries=0),
            changelog_producer=cast(Any, changelogs[0]),
        ),
        LogstateStorePartition(str(tmp_path / "ls"), changelog_producer=cast(Any, changelogs[1])),
    ]
    for partition in partitions:
        rp = _recovery_partition(partition)
        for message in messages:
            rp.recover_from_changelog_message(as_message(message))
        rp.complete_recovery()
    stored = [
        [p.get(k) for k in (b"k1", b"k2", b"k3", b"k4")] + [p.uses_ttl_stamps] for p in partitions
    ]
    assert stored[0] == stored[1]
    assert changelogs[0].records == changelogs[1].records
    assert [key for key, _, _ in changelogs[1].records] == [b"k3", b"__ttl_migration_done__"]
    expected_k3 = base_ms + 5 if stamps_ahead else SENTINEL_NEVER  # the latest survivor, or never
    assert stored[1][2] == encode_ttl_value(expected_k3, b"3")
    for partition in partitions:
        partition.close()
    reopened = LogstateStorePartition(str(tmp_path / "ls"))  # the marker makes it final
    assert reopened.uses_ttl_stamps is True
    assert reopened.get(b"__ttl_migration_done__", "__ttl_system__") is not Marker.UNDEFINED
    reopened.close()


def test_a_mixed_recovery_cut_short_before_completion_is_completed_after_a_restart(
    tmp_path: Path,
) -> None:
    """The census of leftover legacy records is on disk with the data, as RocksDB's is:
    a restart with the offset caught up still completes the migration, as RocksDB does."""
    options = RocksDBOptions(legacy_records_ttl=timedelta(hours=1))
    future_ms = int(time.time() * 1000) + 10**7
    rocks_path, ours_path = str(tmp_path / "rocks"), str(tmp_path / "ours")
    rocks = RocksDBStorePartition(rocks_path, options=options)
    ours = LogstateStorePartition(ours_path, options=options, recovery_batch_size=1)
    for partition in (rocks, ours):
        partition.recover_from_changelog_message(
            key=b"legacy", value=b'"old"', cf_name="default", offset=0
        )
        partition.recover_from_changelog_message(
            key=b"new",
            value=encode_ttl_value(future_ms, b'"new"'),
            cf_name="default",
            offset=1,
            ttl_stamped=True,
        )
        partition.close()  # revoked (or killed) before complete_recovery
    rocks = RocksDBStorePartition(rocks_path, options=options)
    ours = LogstateStorePartition(ours_path, options=options, recovery_batch_size=1)
    try:
        assert rocks.get_changelog_offset() == ours.get_changelog_offset() == 1
        assert rocks.has_incomplete_ttl_migration() is True
        assert ours.has_incomplete_ttl_migration() is True
        for partition in (rocks, ours):
            partition.complete_recovery()
        stamped = rocks.get(b"legacy")
        assert stamped != b'"old"' and ours.get(b"legacy") == stamped  # stamped, as RocksDB
        assert ours.has_incomplete_ttl_migration() is False
    finally:
        rocks.close()
        ours.close()


def test_a_recovery_message_refused_for_its_key_changes_nothing(tmp_path: Path) -> None:
    ours = LogstateStorePartition(str(tmp_path / "ours"), recovery_batch_size=1)
    try:
        with pytest.raises(QuixKeyTooLongError):
            ours.recover_from_changelog_message(
                key=b"\xff" * 3000,
                value=encode_ttl_value(SENTINEL_NEVER, b"1"),
                cf_name="default",
                offset=0,
                ttl_stamped=True,
            )
        assert ours.uses_ttl_stamps is False
        assert ours.get_changelog_offset() is None
    finally:
        ours.close()
