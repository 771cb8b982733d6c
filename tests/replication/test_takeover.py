"""Takeovers in the awkward places, on a real nats-server.

- the old writer died with a chunked record cut between its chunks: the
  restored writer takes over on top of those chunks, and the stream stays
  restorable;
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from logstate import LocalFileStorage
from logstate.replication import ReplicationError, restore
from logstate.replication import _wire as wire
from logstate.replication._client import Client
from logstate.replication._state import load_state
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock, store_state
from tests.replication.test_replication import changelog, open_replicated


@pytest.fixture
def cut_chunks(nats_server: NatsServer) -> Iterator[tuple[list[str], threading.Event]]:
    """Publishes of the writers listed refuse every chunk after chunk 0 (a crash there)."""
    client = Client.get(nats_server.url, timeout_s=5.0)
    real = client.publish_ack
    writers: list[str] = []
    stored = threading.Event()

    def publish(subject: str, payload: bytes, headers: dict[str, str], timeout_s: float) -> Any:
        chunk = headers.get(wire.H_CHUNK)
        if headers.get(wire.H_WRITER) in writers and chunk is not None:
            if not chunk.startswith("0/"):
                raise ReplicationError("STATE", "orders.0", "the writer died here")
            ack = real(subject, payload, headers, timeout_s)
            stored.set()
            return ack
        return real(subject, payload, headers, timeout_s)

    client.publish_ack = publish  # type: ignore[method-assign]
    try:
        yield writers, stored
    finally:
        del client.publish_ack
        client.release()


def test_a_takeover_on_top_of_a_cut_chunked_record_keeps_the_stream_restorable(
    nats_server: NatsServer, tmp_path: Path, cut_chunks: tuple[list[str], threading.Event]
) -> None:
    writers, stored = cut_chunks
    clock = Clock()
    old = open_replicated(tmp_path / "a", changelog(nats_server), clock, compress_min_size=None)
    for i in range(5):
        old[f"k{i}"] = i
    assert old.wait_replicated(10.0)
    state = load_state(str(tmp_path / "a"))
    assert state is not None
    writers.append(state.writer)
    old["big"] = os.urandom(1_500_000)  # two chunks: only the first reaches the stream
    assert stored.wait(10.0)
    old._engine.abandon()  # the old writer dies there

    new = open_replicated(tmp_path / "b", changelog(nats_server), clock, restore="if-missing")
    assert "big" not in new and new["k4"] == 4
    new["after"] = "new writer"
    new["big2"] = os.urandom(1_200_000)  # chunked too
    assert new.wait_replicated(10.0)
    expected = store_state(new)
    new.close()
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "check")
    check = LocalFileStorage(tmp_path / "check", clock=clock)
    assert store_state(check) == expected
    check.close()


def test_a_writer_whose_state_file_is_stale_is_behind_not_diverged(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    old = open_replicated(tmp_path / "a", changelog(nats_server), clock)
    for i in range(30):
        old[f"k{i}"] = i
        assert old.wait_replicated(10.0)  # (its own message: the first ack is saved)
    last = old._engine.appender.seq
    old._engine.abandon()  # killed: its replication.json is saved at most once a second
    state = load_state(str(tmp_path / "a"))
    assert state is not None and state.acked_seq < last  # (stale: what this test is about)

    new = open_replicated(tmp_path / "b", changelog(nats_server), clock, restore="if-missing")
    new["k0"] = "new writer"
    assert new.wait_replicated(10.0)
    new.close()
    # every record of the old copy is in the stream: it is behind, and catches up
    again = open_replicated(tmp_path / "a", changelog(nats_server), clock, restore="if-behind")
    assert again["k0"] == "new writer" and again["k29"] == 29
    again.close()


def test_a_power_loss_of_the_record_being_chunked_gives_its_seq_to_a_new_epoch(
    nats_server: NatsServer, tmp_path: Path, cut_chunks: tuple[list[str], threading.Event]
) -> None:
    # sync="none": the record whose first chunk reached the stream is lost
    # locally (a power loss takes the unsynced tail); the next record takes its
    # seq, under a new epoch, and a restore drops the unfinished chunks
    writers, stored = cut_chunks
    clock = Clock()
    path = tmp_path / "a"
    cl = changelog(nats_server)
    writer = open_replicated(path, cl, clock, compress_min_size=None, segment_size=1 << 24)
    for i in range(5):
        writer[f"k{i}"] = i
    writer.flush()
    assert writer.wait_replicated(10.0)
    state = load_state(str(path))
    assert state is not None
    writers.append(state.writer)
    engine = writer._engine
    active = engine.segments.active
    assert active is not None
    cut_at = active.size  # where the big record starts: the power loss cuts it off
    writer["big"] = os.urandom(1_500_000)
    assert stored.wait(10.0)
    seq_lost = engine.appender.seq
    engine.abandon()
    writers.clear()  # (the publishes go through from here on)
    os.truncate(active.path, cut_at)

    again = open_replicated(path, changelog(nats_server), clock, compress_min_size=None)
    assert "big" not in again and again._engine.appender.seq == seq_lost - 1
    again["other"] = os.urandom(1_300_000)  # seq_lost again: other data, chunked
    again["after"] = 1
    assert again.wait_replicated(10.0)
    expected = store_state(again)
    again.close()
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "check")
    check = LocalFileStorage(tmp_path / "check", clock=clock)
    assert store_state(check) == expected
    check.close()
