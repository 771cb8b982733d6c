"""The retention purge against a shipper in the middle of a chunked record.

A snapshot's retention may run while the shipper is between the chunks of
a large record: the purge must keep every message the kept snapshot needs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from logstate import LocalFileStorage
from logstate.replication import _wire as wire
from logstate.replication import restore
from logstate.replication._client import Client
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock, store_state
from tests.replication.test_replication import changelog, open_replicated


def test_retention_during_a_chunked_record_keeps_what_the_snapshot_needs(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    cl = changelog(nats_server, keep_snapshots=1)
    source = open_replicated(tmp_path / "src", cl, clock, compress_min_size=None)
    for i in range(20):
        source[f"k{i}"] = i
    assert source.wait_replicated(10.0)

    client = Client.get(nats_server.url, timeout_s=5.0)
    real_publish, real_list = client.publish_ack, client.list_objects
    in_retention, chunks_in_flight, release = (threading.Event() for _ in range(3))

    def publish(subject: str, payload: bytes, headers: dict[str, str], timeout_s: float) -> Any:
        if headers.get(wire.H_CHUNK, "").startswith("2/"):
            chunks_in_flight.set()  # chunks 0 and 1 are stored
            release.wait(10.0)
        return real_publish(subject, payload, headers, timeout_s)

    def list_objects(bucket: str, timeout_s: float) -> Any:
        in_retention.set()  # the snapshot (at the seq before the big record) is stored
        chunks_in_flight.wait(10.0)
        return real_list(bucket, timeout_s)

    client.publish_ack = publish  # type: ignore[method-assign]
    client.list_objects = list_objects  # type: ignore[method-assign]
    snapper = threading.Thread(target=source.replication_snapshot)
    try:
        snapper.start()
        assert in_retention.wait(10.0)
        source["big"] = os.urandom(2_500_000)  # three chunks
        snapper.join(20.0)
        assert not snapper.is_alive()
        assert chunks_in_flight.is_set()  # (the retention ran between the chunks)
    finally:
        release.set()
        del client.publish_ack, client.list_objects
        client.release()
    assert source.wait_replicated(10.0)
    expected = store_state(source)
    source.close()
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "copy")
    copy = LocalFileStorage(tmp_path / "copy", clock=clock)
    assert store_state(copy) == expected
    copy.close()
