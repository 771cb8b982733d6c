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
from logstate.replication import JetStreamChangelog
from tests.replication.servers import NatsServer
from tests.replication.writers import assert_restore_equals

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
