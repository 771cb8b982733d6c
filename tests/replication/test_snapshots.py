"""Replication snapshots and retention on a real nats-server.

- ``replication_snapshot()`` (LocalFileStorage and InMemoryStorage) puts the
  store in bucket ``<stream>_snapshots`` as ``<partition>/<seq:020d>``;
- automatic snapshots every ``snapshot_every`` bytes shipped;
- ``keep_snapshots`` kept, older ones deleted; the subject's messages below
  the oldest kept snapshot purged, never its newest (the writer goes on
  publishing), never a part of a chunked record a kept snapshot needs;
- the subject stays bounded under an overwrite load;
- a restore after a purge starts from a snapshot and equals the source; a
  restore to a seq before the oldest kept snapshot names the oldest
  restorable seq.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from logstate import InMemoryStorage, LocalFileStorage
from logstate.replication import ReplicationError, restorable, restore
from logstate.replication._client import Client
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock, Records, fill, open_store, store_state
from tests.replication.test_replication import changelog, open_replicated

SUBJECT = "logstate.STATE.orders.0"
BUCKET = "STATE_snapshots"
WAIT_S = 20.0  # bound of every poll below


def snapshot_objects(server: NatsServer) -> dict[str, dict[str, Any]]:
    """The partition's snapshot objects: name -> description."""
    client = Client.get(server.url, timeout_s=5.0)
    try:
        if client.stream_info(f"OBJ_{BUCKET}", 5.0) is None:
            return {}  # (no snapshot yet: no bucket)
        return {
            o.name: json.loads(o.description)
            for o in client.list_objects(BUCKET, 5.0)
            if o.name.startswith("orders.0/")
        }
    finally:
        client.release()


def subject_messages(server: NatsServer) -> list[tuple[int, str, int, int]]:
    """(stream seq, kind, first, last) of every message of the subject, in order."""
    client = Client.get(server.url, timeout_s=5.0)
    try:
        out = []
        for msg in client.messages("STATE", SUBJECT, 1, 5.0):
            first, last = msg.headers["Logstate-Seq"].split("-")
            kind = msg.headers.get("Logstate-Kind", "records")
            out.append((msg.stream_seq, kind, int(first), int(last)))
        return out
    finally:
        client.release()


def wait_for(what: str, check: Any) -> Any:
    """Poll ``check()`` until it returns something true (at most WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S:g} s")
        time.sleep(0.02)


def restored_state(server: NatsServer, target: Path, clock: Clock, **kwargs: Any) -> Any:
    result = restore(server.url, "STATE", "orders.0", target, **kwargs)
    copy = LocalFileStorage(target, clock=clock)
    try:
        return result, store_state(copy)
    finally:
        copy.close()


def test_replication_snapshot_of_a_storage_and_of_an_in_memory_storage_is_in_the_bucket(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock)
    fill(source, clock)
    first = source.replication_snapshot()
    seq = source._engine.appender.seq
    assert first["seq"] == seq and first["name"] == f"orders.0/{seq:020d}"
    memory = InMemoryStorage(source)
    memory["from-memory"] = "x"
    memory.flush(checkpoint="m")
    second = memory.replication_snapshot()
    second_seq = int(str(second["seq"]))
    assert second_seq == source._engine.appender.seq > seq
    objects = snapshot_objects(nats_server)
    assert sorted(objects) == [f"orders.0/{seq:020d}", f"orders.0/{second_seq:020d}"]
    assert objects[str(second["name"])]["size"] == second["size"]
    replication: Any = source.stats()["replication"]
    assert replication["last_snapshot"]["seq"] == second_seq
    expected = store_state(source)
    source.close()
    result, state = restored_state(nats_server, tmp_path / "copy", clock)
    assert (result.snapshot_seq, result.records) == (second["seq"], 0)
    assert state == expected
    with pytest.raises(ValueError, match="no changelog"):
        InMemoryStorage().replication_snapshot()


def automatic_writes(store: LocalFileStorage, start: int, stop: int) -> None:
    for i in range(start, stop):
        store[f"k{i % 50}"] = f"{i:05d}" * 40


def test_automatic_snapshots_come_every_snapshot_every_bytes_and_the_oldest_are_deleted(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    # the record sizes, from the same writes to a store without a changelog
    twin = open_store(tmp_path / "twin", clock)
    records = Records(twin)
    automatic_writes(twin, 0, 600)
    twin.close()
    shipped, second_due = 0, 0  # the seq whose ack makes 40 KB shipped: the 2nd trigger
    for seq, record in sorted(records.by_seq.items()):
        shipped += len(record)
        if shipped >= 40_000:
            second_due = seq
            break

    cl = changelog(nats_server, ack="sync", snapshot_every=20_000, keep_snapshots=2)
    source = open_replicated(tmp_path / "src", cl, clock)
    automatic_writes(source, 0, 50)  # ~12 KB shipped: below snapshot_every
    assert source.wait_replicated(10.0)
    assert snapshot_objects(nats_server) == {}
    automatic_writes(source, 50, 600)  # ~140 KB more: about seven automatic snapshots
    source.close()  # (joins the snapshot running)
    objects = snapshot_objects(nats_server)
    seqs = sorted(int(name.rsplit("/", 1)[1]) for name in objects)
    assert len(seqs) == 2 and all(objects[f"orders.0/{s:020d}"]["seq"] == s for s in seqs)
    assert seqs[0] >= second_due > 0  # the first one (from 20 KB on) was deleted


def test_retention_purges_below_the_oldest_kept_snapshot_and_the_writer_goes_on(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    cl = changelog(nats_server, ack="sync", keep_snapshots=2)
    source = open_replicated(tmp_path / "src", cl, clock)
    states: dict[int, Any] = {}
    snaps = []
    for round_ in range(4):
        for i in range(30):
            source[f"k{(round_ * 11 + i) % 40}"] = f"{round_}-{i}"
        states[source._engine.appender.seq] = store_state(source)
        snaps.append(source.replication_snapshot()["seq"])
    kept = sorted(int(n.rsplit("/", 1)[1]) for n in snapshot_objects(nats_server))
    assert kept == snaps[-2:]
    messages = subject_messages(nats_server)
    # nothing wholly below the oldest kept snapshot is left, but the subject's newest is there
    assert messages[0][3] > kept[0] >= messages[0][2] - 1
    assert messages[-1][3] == source._engine.appender.seq
    for i in range(20):  # publishing goes on over the purged subject
        source[f"after{i}"] = i
    assert source.wait_replicated(10.0)
    states[source._engine.appender.seq] = store_state(source)
    source.replication_snapshot()  # a purge with the head the newest message
    source["last"] = "one"
    assert source.wait_replicated(10.0)
    assert subject_messages(nats_server)[-1][3] == source._engine.appender.seq
    expected = store_state(source)
    source.close()

    result, state = restored_state(nats_server, tmp_path / "copy", clock)
    assert state == expected and result.snapshot_seq > 0
    oldest = min(int(n.rsplit("/", 1)[1]) for n in snapshot_objects(nats_server))
    assert restorable(nats_server.url, "STATE", "orders.0").oldest_seq == oldest
    for seq in states:
        if seq >= oldest:
            _, state = restored_state(nats_server, tmp_path / f"at-{seq}", clock, until_seq=seq)
            assert state == states[seq]
    with pytest.raises(ReplicationError, match=f"oldest restorable point is seq {oldest}") as info:
        restore(nats_server.url, "STATE", "orders.0", tmp_path / "too-old", until_seq=oldest - 1)
    assert info.value.stream == "STATE" and info.value.partition == "orders.0"
    assert not (tmp_path / "too-old").exists()


def test_retention_never_purges_the_subjects_newest_message_and_the_writer_goes_on(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    cl = changelog(nats_server, ack="sync", keep_snapshots=1)
    source = open_replicated(tmp_path / "src", cl, clock)
    for round_ in range(3):
        for i in range(10):
            source[f"k{i}"] = f"{round_}-{i}"
        seq = source._engine.appender.seq
        assert source.replication_snapshot()["seq"] == seq  # covers the newest message
        messages = subject_messages(nats_server)
        assert [m[2:] for m in messages] == [(seq, seq)]  # only the newest is left
    for i in range(5):  # its expected last subject seq still matches: no fencing
        source[f"after{i}"] = i
    assert source.wait_replicated(10.0)
    assert subject_messages(nats_server)[-1][3] == source._engine.appender.seq
    expected = store_state(source)
    source.close()
    result, state = restored_state(nats_server, tmp_path / "copy", clock)
    assert state == expected and (result.snapshot_seq, result.records) == (30, 5)


def test_retention_keeps_every_chunk_of_a_large_record_after_the_oldest_snapshot(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    cl = changelog(nats_server, ack="sync", keep_snapshots=2)
    source = open_replicated(tmp_path / "src", cl, clock, compress_min_size=None)
    for i in range(20):
        source[f"k{i}"] = i
    oldest = int(str(source.replication_snapshot()["seq"]))
    source["big"] = os.urandom(2_500_000)  # one record in 3 chunks, right after the snapshot
    big_state = store_state(source)
    for i in range(20):
        source[f"k{i}"] = -i
    source.replication_snapshot()  # the second one: retention purges below the first
    expected = store_state(source)
    source.close()
    _, state = restored_state(nats_server, tmp_path / "at-big", clock, until_seq=oldest + 1)
    assert state == big_state
    _, state = restored_state(nats_server, tmp_path / "copy", clock)
    assert state == expected


def test_an_overwrite_load_keeps_the_subject_bounded_and_restorable(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    cl = changelog(nats_server, ack="sync", snapshot_every=16_384, keep_snapshots=2)
    source = open_replicated(
        tmp_path / "src", cl, clock, auto_compact=True, compact_min_size=0, segment_size=16_384
    )
    rounds = 40
    for round_ in range(rounds):
        for i in range(100):
            source[f"key{i}"] = f"{round_}:{i}:" + "v" * 60
    expected = store_state(source)
    last = source._engine.appender.seq
    source.close()  # (joins the last snapshot and its retention)
    assert last == rounds * 100
    kept = sorted(int(name.rsplit("/", 1)[1]) for name in snapshot_objects(nats_server))
    assert len(kept) == 2
    counted = subject_messages(nats_server)
    # sync acks: one message per record; everything up to the oldest kept snapshot is purged
    assert [m[2] for m in counted] == list(range(kept[0] + 1, last + 1))
    # a snapshot every ~16 KB of ~100 B records: the subject holds a fraction of the 4000
    assert len(counted) < last // 2
    result, state = restored_state(nats_server, tmp_path / "copy", clock)
    assert state == expected and result.snapshot_seq == kept[-1]
