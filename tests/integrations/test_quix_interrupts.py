"""A KeyboardInterrupt in the middle of a Quix flush leaves the state before or after it.

The interrupt is raised from inside logstate's batch (while the group is
being assembled: nothing written, the state before) and right after the
group is written (the state after); in both cases later reads, including
the partition's value cache, and a reopen agree with the disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from quixstreams.state.metadata import Marker

import logstate
from logstate.integrations.quixstreams import LogstateStore, LogstateStorePartition


def _flush(store: LogstateStore, value: int, offset: int) -> None:
    tx = store.start_partition_transaction(0)
    for k in range(5):
        tx.set(f"k{k}", value, prefix=b"p")
    tx.prepare()
    tx.flush(changelog_offset=offset)


def _state(partition: Any) -> tuple[list[Any], int | None]:
    values = [partition.get(f'p|"k{k}"'.encode()) for k in range(5)]
    return values, partition.get_changelog_offset()


def test_interrupt_while_the_group_is_assembled_leaves_the_state_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LogstateStore(name="st", stream_id="t", base_dir=str(tmp_path))
    partition = store.assign_partition(0)
    _flush(store, 1, 1)
    original = logstate.Batch.set
    calls = {"n": 0}

    def interrupted_set(self: Any, key: str, value: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, key, value)

    monkeypatch.setattr(logstate.Batch, "set", interrupted_set)
    with pytest.raises(KeyboardInterrupt):
        _flush(store, 2, 2)
    monkeypatch.undo()
    assert _state(partition) == ([b"1"] * 5, 1)
    _flush(store, 3, 3)  # the partition is usable
    store.revoke_partition(0)
    assert _state(store.assign_partition(0)) == ([b"3"] * 5, 3)
    store.close()


def test_interrupt_after_the_group_is_written_leaves_the_state_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LogstateStore(name="st", stream_id="t", base_dir=str(tmp_path))
    partition = store.assign_partition(0)
    _flush(store, 1, 1)
    assert _state(partition) == ([b"1"] * 5, 1)  # the value cache holds the old values

    def interrupted(values: Any, ops: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(LogstateStorePartition, "_cache_written", staticmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        _flush(store, 2, 2)
    monkeypatch.undo()
    assert _state(partition) == ([b"2"] * 5, 2)  # no stale cached value
    store.revoke_partition(0)
    assert _state(store.assign_partition(0)) == ([b"2"] * 5, 2)
    store.close()


def test_interrupt_while_a_recovery_group_is_written_keeps_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "p")
    partition = LogstateStorePartition(path, recovery_batch_size=10)
    for offset in range(5):
        partition.recover_from_changelog_message(b"k", b"%d" % offset, "default", offset)

    def interrupted_set(self: Any, key: str, value: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(logstate.Batch, "set", interrupted_set)
    with pytest.raises(KeyboardInterrupt):
        partition.complete_recovery()
    monkeypatch.undo()
    assert partition.storage.get("__metadata__\0__changelog_offset__") is None  # before
    partition.complete_recovery()  # the buffer was kept: written now
    assert partition.get(b"k") == b"4" and partition.get_changelog_offset() == 4
    assert partition.get(b"other") is Marker.UNDEFINED
    partition.close()
