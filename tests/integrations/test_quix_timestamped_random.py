"""The same seeded random timestamped-state operations on Quix's TimestampedStore and on logstate.

Joins and lookups keep their state in a timestamped store: values per key
and timestamp, read back as "latest at or before t" or as an interval, and
expired by ``grace_ms`` at flush. Every result is compared between the two.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from quixstreams.state.rocksdb import RocksDBOptions
from quixstreams.state.rocksdb.timestamped import TimestampedStore

from logstate.integrations.quixstreams import LogstateTimestampedStore

PREFIXES = [b"left", b"right", b"\xff\x00"]


@pytest.mark.parametrize("keep_duplicates", [False, True])
def test_timestamped_operations_match_rocksdb(tmp_path: Path, keep_duplicates: bool) -> None:
    rng = random.Random(11 + keep_duplicates)
    common: dict[str, Any] = {"grace_ms": 50, "keep_duplicates": keep_duplicates}
    stores: list[Any] = [
        TimestampedStore(
            name="j",
            stream_id="t",
            base_dir=str(tmp_path / "rocks"),
            options=RocksDBOptions(open_max_retries=0),
            **common,
        ),
        LogstateTimestampedStore(name="j", stream_id="t", base_dir=str(tmp_path / "ls"), **common),
    ]
    for store in stores:
        store.assign_partition(0)
    txs = [s.start_partition_transaction(0) for s in stores]
    offset = 0
    now_ms = 0
    found = 0
    for _ in range(500):
        op = rng.random()
        prefix = rng.choice(PREFIXES)
        results: list[Any] = []
        if op < 0.45:
            now_ms += rng.randint(0, 10)
            timestamp = max(0, now_ms - rng.randint(0, 80))
            value = {"v": rng.randint(0, 9)}
            for tx in txs:
                tx.set_for_timestamp(timestamp, value, prefix=prefix)
        elif op < 0.75:
            at = max(0, now_ms - rng.randint(0, 100))
            results = [tx.get_latest(at, prefix=prefix) for tx in txs]
        elif op < 0.85:
            start = max(0, now_ms - rng.randint(0, 100))
            end = start + rng.randint(0, 60)
            results = [tx.get_interval(start, end, prefix=prefix) for tx in txs]
        elif op < 0.9:
            start = max(0, now_ms - rng.randint(50, 150))
            results = [tx.delete_interval(start, start + 20, prefix=prefix) for tx in txs]
        else:
            offset += 1
            for tx in txs:
                tx.prepare(processed_offsets={"input": offset})
                tx.flush(changelog_offset=offset)
            if rng.random() < 0.3:
                for store in stores:
                    store.revoke_partition(0)
                    store.assign_partition(0)
            txs = [s.start_partition_transaction(0) for s in stores]
        if results:
            assert results[0] == results[1], (op, prefix, now_ms)
            found += bool(results[0])
    assert found > 50  # the sequence did find values to compare
    for store in stores:
        store.close()
