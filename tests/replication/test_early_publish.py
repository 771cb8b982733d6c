"""With ``ack="sync"`` a commit is published while its local fdatasync runs, on a real nats-server.

- the broker holds each record before the fdatasync that makes it durable
  locally has returned (the publish and the sync overlap: a commit costs
  about the longer of the two, not their sum);
- a power loss in that window (the stream holds the record, the local disk
  kept only what was synced before): the next open finds the stream ahead
  of the local log with its own writer id and takes the record back from
  the stream (``Engine.ingest``), so its seq is never given to other data,
  and a restore elsewhere equals the reopened store;
- the state file never holds an acknowledged point past the local log,
  even when the broker acknowledged a record before its fdatasync returned:
  after such a power loss and a takeover by another copy, the old copy is
  "behind" (it catches up with ``restore="if-behind"``), not diverged;
- a commit whose fdatasync fails after its publish: the storage refuses
  writes, and reopened it holds the commit (the OS kept the written bytes);
- with ``ack="async"`` nothing is published before it is durable locally.

    python -m pytest tests/replication/test_early_publish.py -q
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from logstate import LocalFileStorage, StorageFailedError
from logstate._fs import FileSystem
from logstate.replication import ReplicationError, restore
from tests.faultfs import open_storage
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock, store_state
from tests.replication.test_replication import changelog, open_replicated, subject_seqs


class SyncWatch(FileSystem):
    """Runs ``before(fd)`` once, at the next fdatasync, before it syncs; keeps
    each file's size at its last fdatasync (what a power loss keeps of it)."""

    def __init__(self) -> None:
        self.before: Callable[[int], None] | None = None
        self.synced: dict[str, int] = {}

    def fdatasync(self, fd: int) -> None:
        hook, self.before = self.before, None
        if hook is not None:
            hook(fd)
        super().fdatasync(fd)
        self.synced[os.readlink(f"/proc/self/fd/{fd}")] = os.fstat(fd).st_size

    def power_loss_copy(self, fd: int, store: Path, copy: Path) -> int:
        """Copy ``store`` to ``copy`` as a power loss now would leave it: the
        segment open as ``fd`` cut back to its last fdatasync. The bytes cut."""
        segment = os.readlink(f"/proc/self/fd/{fd}")
        shutil.copytree(store, copy)
        os.truncate(copy / os.path.basename(segment), self.synced[segment])
        return os.path.getsize(segment) - self.synced[segment]


def watched_store(
    fs: SyncWatch, path: Path, server: NatsServer, ack: str, **options: Any
) -> LocalFileStorage:
    """A store with a changelog and sync="always", its I/O through ``fs``."""
    return open_storage(fs, path, changelog=changelog(server, ack=ack), sync="always", **options)


def stream_holds(server: NatsServer, seq: int, within_s: float = 3.0) -> bool:
    """Does the partition's subject hold ``seq``, now or within ``within_s``?"""
    deadline = time.monotonic() + within_s
    while True:
        seqs = subject_seqs(server)
        if seqs and seqs[-1][1] >= seq:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def test_with_ack_sync_the_broker_holds_a_record_before_its_local_fdatasync_returns(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    fs = SyncWatch()
    store = watched_store(fs, tmp_path / "a", nats_server, "sync")
    seen: list[tuple[int, bool]] = []
    for i in range(3):

        def before(_fd: int) -> None:
            seq = store._engine.appender.seq  # the record this fdatasync is for
            seen.append((seq, stream_holds(nats_server, seq)))

        fs.before = before
        store[f"k{i}"] = i
        assert fs.before is None  # (the hook ran)
    assert seen == [(1, True), (2, True), (3, True)]
    store.close()


def test_with_ack_async_nothing_is_published_before_its_local_fdatasync(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    fs = SyncWatch()
    store = watched_store(fs, tmp_path / "a", nats_server, "async")
    seen: list[bool] = []

    def before(_fd: int) -> None:
        seen.append(stream_holds(nats_server, store._engine.appender.seq, within_s=0.3))

    fs.before = before
    store["k"] = 1
    assert seen == [False]
    assert store.wait_replicated(5.0) and stream_holds(nats_server, 1)
    store.close()


def test_a_power_loss_between_the_publish_and_the_local_fdatasync_loses_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    fs = SyncWatch()
    store = watched_store(fs, tmp_path / "a", nats_server, "sync", clock=clock, auto_compact=False)
    for i in range(10):
        store[f"k{i}"] = f"value {i}"
    cut: list[int] = []

    def power_loss(fd: int) -> None:
        # the record is in the stream, and only in the OS's cache locally:
        # the copy keeps of its segment what the last fdatasync made durable
        assert stream_holds(nats_server, 11)
        cut.append(fs.power_loss_copy(fd, tmp_path / "a", tmp_path / "b"))

    fs.before = power_loss
    store["lost locally"] = "but in the stream"
    assert cut and cut[0] > 0  # the copy lacks the record
    store._engine.abandon()  # (the old process is gone)

    again = open_replicated(tmp_path / "b", changelog(nats_server, ack="sync"), clock)
    assert again["lost locally"] == "but in the stream"
    assert again._engine.appender.seq == 11  # taken back from the stream, not reused
    again["after"] = "the power loss"
    assert again._engine.appender.seq == 12
    expected = store_state(again)
    again.close()
    assert [last for _first, last in subject_seqs(nats_server)][-1] == 12
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "restored", timeout=5.0)
    restored = LocalFileStorage(tmp_path / "restored", clock=clock)
    assert store_state(restored) == expected
    restored.close()


def test_after_a_power_loss_in_the_window_and_a_takeover_the_old_copy_is_behind_not_diverged(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    fs = SyncWatch()
    store = watched_store(fs, tmp_path / "a", nats_server, "sync", clock=clock, auto_compact=False)
    for i in range(10):
        store[f"k{i}"] = i
    replicator = store._engine.replication
    assert replicator is not None
    replicator._saved_at = -1e9  # type: ignore[attr-defined]  # (the next ack saves the file)

    def power_loss(fd: int) -> None:
        assert stream_holds(nats_server, 11)
        time.sleep(0.2)  # (time for the shipper to have reported the ack, were it to)
        assert fs.power_loss_copy(fd, tmp_path / "a", tmp_path / "b") > 0

    fs.before = power_loss
    store["lost locally"] = "in the stream"
    store._engine.abandon()
    saved = json.loads((tmp_path / "b" / "replication.json").read_text())
    assert saved["acked_seq"] <= 10  # never past what the copy's log holds

    # another copy takes the partition over from the stream (record 11 included)
    other = open_replicated(tmp_path / "c", changelog(nats_server), clock, restore="if-missing")
    assert other["lost locally"] == "in the stream"
    other["by the new writer"] = 1
    assert other.wait_replicated(10.0)
    other.close()

    with pytest.raises(ReplicationError, match="is behind the stream"):
        open_replicated(tmp_path / "b", changelog(nats_server), clock)
    again = open_replicated(tmp_path / "b", changelog(nats_server), clock, restore="if-behind")
    assert again["lost locally"] == "in the stream" and again["by the new writer"] == 1
    again.close()


def test_a_commit_whose_fdatasync_fails_after_its_publish_is_there_when_reopened(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    fs = SyncWatch()
    store = watched_store(fs, tmp_path / "a", nats_server, "sync", clock=clock)
    store["k"] = 1

    def failing(_fd: int) -> None:
        assert stream_holds(nats_server, 2)
        raise OSError(errno.EIO, "fdatasync failed (injected)")

    fs.before = failing
    with pytest.raises(OSError, match="injected"):
        store["published"] = "then its fdatasync failed"
    with pytest.raises(StorageFailedError):
        store["refused"] = "the storage refuses writes after a failed fdatasync"
    store.close()
    again = open_replicated(tmp_path / "a", changelog(nats_server, ack="sync"), clock)
    assert again["published"] == "then its fdatasync failed" and "refused" not in again
    again["after"] = 1
    assert [last for _first, last in subject_seqs(nats_server)][-1] == 3
    again.close()
