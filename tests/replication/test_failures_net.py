"""Replication across broker and network failures, with real servers, while writers commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from logstate import LocalFileStorage
from logstate.replication import JetStreamChangelog, ReplicationError
from tests.replication.servers import NatsServer
from tests.replication.writers import assert_exactly_once, subject_messages

STORE_OPTIONS: dict[str, Any] = {"segment_size": 64 * 1024, "auto_compact": False}
KEPT_TEXT = "it is kept and will be shipped"


def open_writer(path: Path, servers: list[str], partition: str, **options: Any) -> LocalFileStorage:
    stream = options.pop("stream", "STATE")
    changelog = JetStreamChangelog(servers, stream, partition, **options)
    return LocalFileStorage(path, changelog=changelog, sync="always", **STORE_OPTIONS)


def finish(
    store: LocalFileStorage, servers: list[str], partition: str, stream: str = "STATE"
) -> int:
    """Wait until ``store`` is shipped whole (the stream holds it once), close it; its seq."""
    assert store.wait_replicated(60.0)
    assert store.replication_lag() == (0, 0)
    seq = store._engine.appender.seq
    assert assert_exactly_once(subject_messages(servers, partition, stream)) == seq
    store.close()
    assert assert_exactly_once(subject_messages(servers, partition, stream)) == seq
    return seq


def test_sync_commits_refused_in_an_outage_are_all_counted_and_shipped_after_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    servers = [nats_server.url]
    store = open_writer(tmp_path / "w", servers, "p.0", ack="sync", timeout=0.5)
    store["before"] = 0
    nats_server.pause()  # no answer: each sync commit fails after its timeout
    try:
        for i in range(3):
            with pytest.raises(ReplicationError, match=KEPT_TEXT):
                store[f"k{i}"] = i
        # all three are queued for the stream, not only the first
        assert store.replication_lag().groups == 3
    finally:
        nats_server.resume()
    assert finish(store, servers, "p.0") == 4  # shipped without a later commit
