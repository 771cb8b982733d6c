"""A restore refuses a stream that is not a whole, valid changelog, and leaves nothing behind.

Streams crafted message by message on a real nats-server (``_wire``'s
headers, the client's publish) around records a real store committed:
- a foreign message on the partition's subject (no logstate headers);
- a damaged message: valid headers with a wrong ``Logstate-Crc``, or a
  record with a bad CRC under a recomputed header CRC;
- a seq gap;
- a chunked record cut short by the next record.
Each time ``restore`` raises ReplicationError naming the stream, the
message's stream seq and the reason, and the target is as it was (missing,
or an empty directory). A chunked record cut short at the end of the stream
is left out (it was never whole in the stream), and a bad message after a
snapshot leaves no half-built store. A snapshot object damaged in a file's
bytes, or cut short, is refused as it streams in: CorruptionError naming the
object, its bucket and the offset; one with a chunk more than its metadata
says, by its size and digest (ReplicationError); nothing left behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from logstate import CorruptionError, LocalFileStorage
from logstate.replication import ReplicationError, restorable, restore
from logstate.replication import _wire as wire
from logstate.replication._client import Client
from logstate.replication._config import bucket_name
from logstate.replication._container import decode_container_header
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock, Records, open_store, store_state
from tests.replication.test_replication import changelog, open_replicated

STREAM = "STATE"
SUBJECT = "logstate.STATE.orders.0"
WHO = wire.Identity("orders.0", "ab" * 16, 1)


class Crafted:
    """Publishes changelog messages one by one on the subject (each on top of the last)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        client.ensure_stream(STREAM, ["logstate.STATE.>"], 1, 5.0)
        head = client.last_message(STREAM, SUBJECT, 5.0)
        self.head = 0 if head is None else head.stream_seq

    def send(self, payload: bytes, headers: dict[str, str]) -> int:
        self.head = self.client.publish(SUBJECT, payload, headers, 5.0)
        return self.head

    def records(
        self,
        first: int,
        last: int,
        payload: bytes,
        chunk: wire.Chunk | None = None,
        who: wire.Identity = WHO,
    ) -> int:
        now = time.time()
        headers = wire.message_headers(who, first, last, (now, now), payload, self.head, chunk)
        return self.send(payload, headers)


@pytest.fixture
def client(nats_server: NatsServer) -> Iterator[Client]:
    made = Client.get(nats_server.url, timeout_s=5.0)
    try:
        yield made
    finally:
        made.release()


def committed_records(tmp_path: Path, count: int = 12) -> dict[int, bytes]:
    """The exact bytes of ``count`` records a store committed, by seq (1..count)."""
    store = open_store(tmp_path / "records-source", Clock())
    records = Records(store)
    for i in range(count):
        store[f"k{i}"] = f"value {i} " * (40 if i in (5, 6) else 2)  # records 6, 7: > 300 B
    store.close()
    assert sorted(records.by_seq) == list(range(1, count + 1))
    return records.by_seq


def restore_refused(server: NatsServer, target: Path, *needles: str) -> ReplicationError:
    with pytest.raises(ReplicationError) as info:
        restore(server.url, STREAM, "orders.0", target, timeout=5.0)
    error = info.value
    assert (error.stream, error.partition) == (STREAM, "orders.0")
    text = str(error)
    assert "'STATE'" in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return error


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(
        p.name for p in tmp_path.iterdir() if ".restoring-" in p.name or ".snapshot-" in p.name
    )


def publish_good_start(crafted: Crafted, records: dict[int, bytes]) -> None:
    """Records 1-5 as three messages."""
    crafted.records(1, 2, records[1] + records[2])
    crafted.records(3, 3, records[3])
    crafted.records(4, 5, records[4] + records[5])


@pytest.mark.parametrize("target_kind", ["missing", "empty"])
def test_a_foreign_message_on_the_subject_is_refused_by_its_stream_seq(
    nats_server: NatsServer, client: Client, tmp_path: Path, target_kind: str
) -> None:
    records = committed_records(tmp_path)
    crafted = Crafted(client)
    publish_good_start(crafted, records)
    foreign = crafted.send(b'{"order": 1}', {"Content-Type": "application/json"})
    crafted.records(6, 6, records[6])
    target = tmp_path / "copy"
    if target_kind == "empty":
        target.mkdir()
    restore_refused(
        nats_server, target, f"message {foreign} of the stream", "not a logstate changelog message"
    )
    if target_kind == "empty":
        assert target.is_dir() and list(target.iterdir()) == []
    else:
        assert not target.exists()
    assert leftovers(tmp_path) == []


def test_a_message_whose_payload_does_not_match_its_crc_header_is_refused(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    records = committed_records(tmp_path)
    crafted = Crafted(client)
    publish_good_start(crafted, records)
    payload = records[6] + records[7]
    now = time.time()
    headers = wire.message_headers(WHO, 6, 7, (now, now), payload, crafted.head)
    damaged = bytearray(payload)
    damaged[len(records[6]) + 20] ^= 0x01  # one bit of record 7, the header CRC left as it was
    bad = crafted.send(bytes(damaged), headers)
    restore_refused(
        nats_server, tmp_path / "copy", f"message {bad} of the stream", "payload checksum mismatch"
    )
    assert not (tmp_path / "copy").exists() and leftovers(tmp_path) == []


def test_a_damaged_record_under_a_recomputed_message_crc_is_refused(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    records = committed_records(tmp_path)
    crafted = Crafted(client)
    publish_good_start(crafted, records)
    damaged = bytearray(records[6] + records[7])
    damaged[len(records[6]) + 20] ^= 0x01  # inside record 7: its own CRC no longer matches
    bad = crafted.records(6, 7, bytes(damaged))  # the header CRC is the damaged payload's
    restore_refused(
        nats_server, tmp_path / "copy", f"message {bad} of the stream", "damaged record"
    )
    assert not (tmp_path / "copy").exists() and leftovers(tmp_path) == []


def test_a_seq_gap_is_refused(nats_server: NatsServer, client: Client, tmp_path: Path) -> None:
    records = committed_records(tmp_path)
    crafted = Crafted(client)
    publish_good_start(crafted, records)
    bad = crafted.records(7, 8, records[7] + records[8])  # 6 is missing
    restore_refused(
        nats_server,
        tmp_path / "copy",
        f"message {bad} of the stream",
        "seq gap: records 7-8 follow seq 5",
    )
    assert not (tmp_path / "copy").exists() and leftovers(tmp_path) == []


def test_a_chunked_record_cut_short_by_the_next_record_is_refused(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    records = committed_records(tmp_path)
    crafted = Crafted(client)
    publish_good_start(crafted, records)
    crafted.records(6, 6, records[6])
    chunks = wire.chunk_record(records[7], 150)
    assert len(chunks) >= 3
    for chunk, part in chunks[:-1]:  # the last chunk never came
        crafted.records(7, 7, part, chunk)
    bad = crafted.records(8, 8, records[8])
    restore_refused(
        nats_server,
        tmp_path / "copy",
        f"message {bad} of the stream",
        "the chunked record 7 is cut short by this message",
    )
    assert not (tmp_path / "copy").exists() and leftovers(tmp_path) == []


def test_whole_chunks_restore_and_a_chunked_record_cut_at_the_end_is_left_out(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    records = committed_records(tmp_path)
    crafted = Crafted(client)
    publish_good_start(crafted, records)
    chunks = wire.chunk_record(records[6], 100)
    assert len(chunks) >= 3
    for chunk, part in chunks:
        crafted.records(6, 6, part, chunk)
    chunks = wire.chunk_record(records[7], 150)
    for chunk, part in chunks[:-1]:
        crafted.records(7, 7, part, chunk)
    result = restore(nats_server.url, STREAM, "orders.0", tmp_path / "copy", timeout=5.0)
    assert result.seq == 6  # record 7 was never whole in the stream
    copy = LocalFileStorage(tmp_path / "copy")
    assert copy["k5"] == "value 5 " * 40 and "k6" not in copy
    copy.close()


def test_a_bad_message_after_a_snapshot_leaves_no_half_built_store(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server, ack="sync"), clock)
    for i in range(20):
        source[f"k{i}"] = i
    source.replication_snapshot()
    source["after"] = "snapshot"
    last = source._engine.appender.seq
    writer = str(source.stats()["replication"]["writer"])
    expected = store_state(source)
    source.close()
    crafted = Crafted(client)
    who = wire.Identity("orders.0", writer, 1)
    damaged = bytearray(committed_records(tmp_path)[1])
    damaged[-1] ^= 0xFF  # its CRC no longer matches
    bad = crafted.records(last + 1, last + 1, bytes(damaged), who=who)
    target = tmp_path / "copy"
    restore_refused(nats_server, target, f"message {bad} of the stream", "damaged record")
    assert not target.exists() and leftovers(tmp_path) == []
    # up to the last good seq it restores
    restore(nats_server.url, STREAM, "orders.0", target, until_seq=last, timeout=5.0)
    copy = LocalFileStorage(target, clock=clock)
    assert store_state(copy) == expected
    copy.close()


def test_a_damaged_or_short_snapshot_object_is_refused_naming_it_and_leaves_nothing(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server, ack="sync"), clock)
    for i in range(300):
        source[f"k{i}"] = f"value {i} " * 20
    source.replication_snapshot()
    source["after"] = "snapshot"
    expected = store_state(source)
    source.close()
    bucket = bucket_name(STREAM)
    [snap] = client.list_objects(bucket, 5.0)
    client.get_object(bucket, snap.name, str(tmp_path / "snap"), 5.0)
    good = (tmp_path / "snap").read_bytes()
    header = decode_container_header(good)
    middle = header.data_offset + header.files[0].size // 2
    flipped = good[:middle] + bytes([good[middle] ^ 0x10]) + good[middle + 1 :]
    target = tmp_path / "copy"
    for data, offset, reason in [
        (flipped, header.data_offset, f"{header.files[0].name}"),
        (good[:-100], len(good) - 100, "container truncated"),
    ]:
        (tmp_path / "snap").write_bytes(data)  # the same name and description, other bytes
        client.put_object(bucket, snap.name, str(tmp_path / "snap"), snap.description, 5.0)
        with pytest.raises(CorruptionError) as failure:
            restore(nats_server.url, STREAM, "orders.0", target, timeout=5.0)
        assert failure.value.path == f"snapshot object {snap.name} of bucket {bucket}"
        assert failure.value.offset == offset and reason in failure.value.reason
        assert not target.exists() and leftovers(tmp_path) == []
    # whole and valid, then one chunk more than its metadata says: its size and
    # digest, checked after its last chunk, refuse it before the store is renamed
    (tmp_path / "snap").write_bytes(good)
    client.put_object(bucket, snap.name, str(tmp_path / "snap"), snap.description, 5.0)
    nuid = client.object_info(bucket, snap.name, 5.0)["nuid"]
    client.publish(f"$O.{bucket}.C.{nuid}", b"more", {}, 5.0)
    with pytest.raises(ReplicationError, match=f"got {len(good) + 4} bytes in .* digest"):
        restore(nats_server.url, STREAM, "orders.0", target, timeout=5.0)
    assert not target.exists() and leftovers(tmp_path) == []
    client.put_object(bucket, snap.name, str(tmp_path / "snap"), snap.description, 5.0)
    restore(nats_server.url, STREAM, "orders.0", target, timeout=5.0)
    copy = LocalFileStorage(target, clock=clock)
    assert store_state(copy) == expected
    copy.close()


def test_a_writer_refuses_a_subject_whose_last_message_is_foreign_and_leaves_nothing_open(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    records = committed_records(tmp_path)
    crafted = Crafted(client)
    publish_good_start(crafted, records)
    foreign = crafted.send(b"not ours", {"Nats-Msg-Id": "someone-else"})
    with pytest.raises(ReplicationError, match="not a logstate changelog message") as info:
        open_replicated(tmp_path / "writer", changelog(nats_server), Clock())
    assert info.value.stream == STREAM
    with pytest.raises(ReplicationError, match=f"message {foreign} of the stream: not a"):
        restorable(nats_server.url, STREAM, "orders.0", timeout=5.0)
    plain = LocalFileStorage(tmp_path / "writer")  # the directory was released
    plain.close()


def test_restorable_names_a_foreign_first_message_of_the_subject(
    nats_server: NatsServer, client: Client, tmp_path: Path
) -> None:
    records = committed_records(tmp_path)
    crafted = Crafted(client)
    foreign = crafted.send(b"not ours", {})
    publish_good_start(crafted, records)
    with pytest.raises(ReplicationError, match=f"message {foreign} of the stream: not a") as info:
        restorable(nats_server.url, STREAM, "orders.0", timeout=5.0)
    assert info.value.seq is None  # (a stream seq is not a record seq)
