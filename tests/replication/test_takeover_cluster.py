"""Fencing on an R3 stream (a real 3-node cluster).

An R3 stream answers a repeated ``Nats-Msg-Id`` with a duplicate ack
before it checks the expected last sequence; the id holds partition, epoch
and seqs, not the writer: two writers that took over from the same head
publish the same ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from logstate import LocalFileStorage
from logstate.replication import FencedError, JetStreamChangelog
from tests.replication.servers import NatsCluster
from tests.replication.stores import Clock


def _open(path: Path, cluster: NatsCluster, clock: Clock, **options: Any) -> LocalFileStorage:
    cl = JetStreamChangelog(cluster.urls, "TAKEOVERDUP", "orders.0", replicas=3, timeout=5.0)
    return LocalFileStorage(
        path, clock=clock, changelog=cl, sync="none", auto_compact=False, **options
    )


def test_two_writers_taking_over_the_same_head_on_r3_fence_the_second(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    clock = Clock()
    first = _open(tmp_path / "a", nats_cluster, clock)
    for i in range(5):
        first[f"k{i}"] = i
    assert first.wait_replicated(10.0)
    first.close()
    b = _open(tmp_path / "b", nats_cluster, clock, restore="if-missing")
    c = _open(tmp_path / "c", nats_cluster, clock, restore="if-missing")  # the same head
    b["x"] = "b's write"
    assert b.wait_replicated(10.0)
    c["x"] = "c's write"  # the same seq, epoch and so message id as b's
    with pytest.raises(FencedError):
        c.wait_replicated(10.0)
        c["y"] = "refused"
        c.wait_replicated(10.0)
    c._engine.abandon()
    assert b.wait_replicated(10.0)
    b.close()
