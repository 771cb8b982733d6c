"""Replication failures of the writer, with real processes: kill -9 at exact points, a zombie.

Each writer runs in its own process (``_writer_proc.py``, with
``sys.executable``) on a real nats-server whose ``max_payload`` is 64 KiB,
so that some groups are chunked and snapshots take several object chunks.
``LOGSTATE_LONG_TESTS=1`` runs the kill loop five times longer.
Broker and network failures: test_failures_net.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from logstate import LocalFileStorage
from logstate.replication import JetStreamChangelog, restorable, restore
from tests.replication.servers import NatsServer
from tests.replication.writers import assert_restore_equals, subject_messages

SMALL_PAYLOAD = 64 * 1024
STORE_OPTIONS: dict[str, Any] = {"segment_size": 64 * 1024, "compress_min_size": None}


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", extra_config=f"max_payload: {SMALL_PAYLOAD}").start()
    try:
        yield server
    finally:
        server.kill()


def test_snapshots_upload_when_max_payload_is_below_the_object_chunk_size(
    small_server: NatsServer, tmp_path: Path
) -> None:
    store = LocalFileStorage(
        tmp_path / "src",
        changelog=JetStreamChangelog(small_server.url, "STATE", "p.0", timeout=5.0),
        **STORE_OPTIONS,
    )
    for i in range(40):
        store[f"k{i}"] = os.urandom(10_000)  # 400 KB: several chunks of under 64 KiB
    info = store.replication_snapshot()
    assert info["size"] > 3 * SMALL_PAYLOAD  # type: ignore[operator]
    store.close()
    assert_restore_equals(
        [small_server.url], "p.0", tmp_path / "src", tmp_path / "copy", **STORE_OPTIONS
    )


def test_retention_keeps_every_chunk_of_the_record_after_the_oldest_snapshot(
    small_server: NatsServer, tmp_path: Path
) -> None:
    servers = [small_server.url]
    store = LocalFileStorage(
        tmp_path / "src",
        changelog=JetStreamChangelog(servers, "STATE", "p.0", timeout=5.0, keep_snapshots=2),
        **STORE_OPTIONS,
    )
    for i in range(10):
        store[f"k{i}"] = i
    assert store.replication_snapshot()["seq"] == 10
    store["big"] = os.urandom(150_000)  # seq 11: three chunks
    store["after"] = 1
    assert store.replication_snapshot()["seq"] == 12  # retention: keeps the snapshots 10, 12
    store.close()
    messages = subject_messages(servers, "p.0")
    assert [(m.first, m.chunk and m.chunk.part) for m in messages] == [
        (11, 0),
        (11, 1),
        (11, 2),
        (12, None),
    ]
    assert restorable(servers, "STATE", "p.0").oldest_seq == 10
    for until in (10, 11, 12):
        assert (
            restore(servers, "STATE", "p.0", tmp_path / f"at-{until}", until_seq=until).seq == until
        )
