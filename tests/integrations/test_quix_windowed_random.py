"""The same seeded random windowed-state operations on Quix's RocksDB store and on logstate.

Every operation goes through Quix's windowed transaction API (tumbling and
hopping windows: update, get, get_windows both ways, expire per key and for
all keys, collections, delete) on both stores; every result is compared, and
flushes with changelog offsets and reopens happen at random points too.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from quixstreams.state.base import Store
from quixstreams.state.rocksdb import RocksDBOptions
from quixstreams.state.rocksdb.windowed.store import WindowedRocksDBStore

from logstate.integrations.quixstreams import LogstateWindowedStore

PREFIXES = [b"alice", b"bob", b"\x00bin\xff", b"c|d"]


def _windows_of(timestamp_ms: int, size_ms: int, step_ms: int) -> list[tuple[int, int]]:
    """The windows a timestamp falls into (tumbling when step == size)."""
    first = timestamp_ms - timestamp_ms % step_ms
    starts = range(first, timestamp_ms - size_ms, -step_ms)
    return [(s, s + size_ms) for s in starts if s >= 0]


class _Pair:
    """One transaction on each store, opened and closed together."""

    def __init__(self, stores: list[Store]) -> None:
        self.stores = stores
        self.offset = 0
        self.nonempty: dict[str, int] = {}  # operations that returned something, by name
        for store in stores:
            store.assign_partition(0)
        self.txs: list[Any] = [s.start_partition_transaction(0) for s in stores]

    def do(self, name: str, *args: Any, **kwargs: Any) -> Any:
        results = []
        for tx in self.txs:
            result = getattr(tx, name)(*args, **kwargs)
            if result is not None and not isinstance(result, (int, str, list, tuple, dict)):
                result = list(result)  # an iterator of windows
            results.append(result)
        assert results[0] == results[1], (name, args, kwargs)
        if results[0]:
            self.nonempty[name] = self.nonempty.get(name, 0) + 1
        return results[0]

    def flush(self) -> None:
        self.offset += 1
        for tx in self.txs:
            tx.prepare(processed_offsets={"input": self.offset})
            tx.flush(changelog_offset=self.offset)
        offsets = [s.partitions[0].get_changelog_offset() for s in self.stores]
        assert offsets[0] == offsets[1]  # an empty transaction writes no offset, on both
        self.txs = [s.start_partition_transaction(0) for s in self.stores]

    def reopen(self) -> None:
        self.flush()
        for store in self.stores:
            store.revoke_partition(0)
            store.assign_partition(0)
        self.txs = [s.start_partition_transaction(0) for s in self.stores]

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.mark.parametrize(
    ("seed", "size_ms", "step_ms"),
    [(1, 100, 100), (2, 100, 25), (3, 60, 20), (4, 1000, 1000)],
    ids=["tumbling", "hopping", "hopping-small", "tumbling-long"],
)
def test_windowed_operations_match_rocksdb(
    tmp_path: Path, seed: int, size_ms: int, step_ms: int
) -> None:
    rng = random.Random(seed)
    rocks = WindowedRocksDBStore(
        name="w",
        stream_id="t",
        base_dir=str(tmp_path / "rocks"),
        options=RocksDBOptions(open_max_retries=0),
    )
    ours = LogstateWindowedStore(name="w", stream_id="t", base_dir=str(tmp_path / "logstate"))
    pair = _Pair([rocks, ours])
    now_ms = 0
    for _ in range(600):
        op = rng.random()
        prefix = rng.choice(PREFIXES)
        if op < 0.45:  # an event: aggregate into each of its windows
            now_ms += rng.randint(0, 40)
            timestamp_ms = max(0, now_ms - rng.randint(0, 2 * size_ms))  # late events too
            for start, end in _windows_of(timestamp_ms, size_ms, step_ms):
                current = pair.do("get_window", start, end, prefix=prefix)
                pair.do(
                    "update_window",
                    start,
                    end,
                    value=(current or 0) + 1,
                    timestamp_ms=timestamp_ms,
                    prefix=prefix,
                )
        elif op < 0.55:
            start = rng.randrange(0, now_ms + 1, step_ms) if now_ms else 0
            pair.do("get_window", start, start + size_ms, prefix=prefix)
        elif op < 0.65:
            low = rng.randint(-1, max(0, now_ms))
            pair.do(
                "get_windows",
                low,
                low + rng.randint(0, 5 * size_ms),
                prefix=prefix,
                backwards=rng.random() < 0.5,
            )
        elif op < 0.73:
            pair.do(
                "expire_windows",
                max_start_time=now_ms - size_ms - rng.randint(0, size_ms),
                prefix=prefix,
                collect=False,
            )
        elif op < 0.78:
            pair.do("expire_all_windows", max_end_time=now_ms - size_ms, step_ms=step_ms)
        elif op < 0.85:
            pair.do("add_to_collection", id=now_ms, value={"v": rng.random()}, prefix=prefix)
            pair.do("get_from_collection", 0, now_ms + 1, prefix=prefix)
        elif op < 0.88:
            pair.do(
                "delete_windows",
                max_start_time=now_ms - 2 * size_ms,
                delete_values=True,
                prefix=prefix,
            )
        elif op < 0.95:
            pair.flush()
        else:
            pair.reopen()
        pair.do("get_latest_timestamp", prefix=prefix)
    pair.flush()
    for prefix in PREFIXES:
        pair.do("get_windows", -1, now_ms + size_ms, prefix=prefix)
    # the sequence exercised what it compares: windows found, expired, collected
    for name in ("get_window", "get_windows", "expire_all_windows", "get_from_collection"):
        assert pair.nonempty.get(name, 0) > 0, name
    pair.close()
