"""Replication end to end on a real nats-server: ship, restore, point in time, takeover.

Every test starts its own server (``nats_server``) and stores in ``tmp_path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from logstate import InMemoryStorage, LocalFileStorage
from logstate.replication import (
    FencedError,
    JetStreamChangelog,
    ReplicationError,
    restorable,
    restore,
)
from logstate.replication._client import Client
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock, fill, more_changes, store_state


def changelog(
    server: NatsServer, partition: str = "orders.0", **options: Any
) -> JetStreamChangelog:
    options.setdefault("timeout", 5.0)
    return JetStreamChangelog(server.url, "STATE", partition, **options)


def open_replicated(
    path: Path, cl: JetStreamChangelog, clock: Clock, **options: Any
) -> LocalFileStorage:
    options.setdefault("sync", "none")
    options.setdefault("segment_size", 4096)
    options.setdefault("auto_compact", False)
    return LocalFileStorage(path, clock=clock, changelog=cl, **options)


def subject_seqs(
    server: NatsServer, subject: str = "logstate.STATE.orders.0"
) -> list[tuple[int, int]]:
    """The (first, last) logstate seqs of every message of the subject, in stream order."""
    client = Client.get(server.url, timeout_s=5.0)
    try:
        out = []
        for msg in client.messages("STATE", subject, 1, 5.0):
            first, last = msg.headers["Logstate-Seq"].split("-")
            if msg.headers.get("Logstate-Kind", "records") == "records":
                out.append((int(first), int(last)))
        return out
    finally:
        client.release()


def assert_exactly_once(seqs: list[tuple[int, int]], upto: int) -> None:
    expected = 1
    for first, last in seqs:
        assert first == expected, f"message {first}-{last} where {expected} was due"
        expected = last + 1
    assert expected == upto + 1


def test_async_shipping_then_restore_elsewhere_reproduces_the_store(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock)
    fill(source, clock)
    more_changes(source, clock)
    assert source.wait_replicated(10.0)
    assert source.replication_lag() == (0, 0)
    expected = store_state(source)
    last = source._engine.appender.seq
    source.close()
    assert_exactly_once(subject_seqs(nats_server), last)

    result = restore(nats_server.url, "STATE", "orders.0", tmp_path / "copy")
    assert result.seq == last
    copy = LocalFileStorage(tmp_path / "copy", clock=clock)
    assert store_state(copy) == expected
    copy.close()


def test_restore_to_past_seqs_matches_the_source_at_those_seqs(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock)
    states: dict[int, dict[str, Any]] = {}
    memory = InMemoryStorage(source)
    for round_ in range(6):
        for i in range(30):
            memory[f"k{(round_ * 7 + i) % 50}"] = f"{round_}-{i}"
        if round_ % 2:
            del memory[f"k{round_}"]
        memory.flush(checkpoint={"offset": round_})
        states[source._engine.appender.seq] = store_state(source)
    assert source.wait_replicated(10.0)
    source.close()
    for seq in list(states)[1:4]:
        target = tmp_path / f"at-{seq}"
        assert restore(nats_server.url, "STATE", "orders.0", target, until_seq=seq).seq == seq
        copy = LocalFileStorage(target, clock=clock)
        assert store_state(copy) == states[seq]
        copy.close()
    span = restorable(nats_server.url, "STATE", "orders.0")
    assert (span.oldest_seq, span.newest_seq) == (0, max(states))


def test_sync_ack_returns_after_the_broker_holds_the_group(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server, ack="sync"), clock)
    memory = InMemoryStorage(source)
    memory.update({f"k{i}": i for i in range(100)})
    memory.flush(checkpoint=7)
    assert source.replication_lag() == (0, 0)  # acknowledged before flush returned
    assert_exactly_once(subject_seqs(nats_server), source._engine.appender.seq)
    source.close()


def test_a_group_over_the_message_limit_ships_in_chunks_and_restores_whole(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(
        tmp_path / "src", changelog(nats_server), clock, compress_min_size=None
    )
    memory = InMemoryStorage(source)
    memory.update({f"big{i}": bytes([i % 256]) * 50_000 for i in range(60)})  # 3 MB: chunks
    memory.flush(checkpoint="big")
    source["after"] = 1
    assert source.wait_replicated(20.0)
    expected = store_state(source)
    source.close()
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "copy")
    copy = LocalFileStorage(tmp_path / "copy", clock=clock)
    assert store_state(copy) == expected
    copy.close()


def test_a_restart_republishes_only_what_the_broker_lacks(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    path = tmp_path / "src"
    source = open_replicated(path, changelog(nats_server), clock)
    for i in range(50):
        source[f"k{i}"] = i
    assert source.wait_replicated(10.0)
    nats_server.pause()  # the broker stops answering: commits stay local
    for i in range(50, 80):
        source[f"k{i}"] = i
    source._engine.abandon()  # the process dies with 30 records unshipped
    nats_server.resume()
    again = open_replicated(path, changelog(nats_server), clock)
    assert again.wait_replicated(10.0)
    assert_exactly_once(subject_seqs(nats_server), again._engine.appender.seq)
    again.close()


def test_restore_if_missing_then_the_new_writer_fences_the_old_one(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    old = open_replicated(tmp_path / "node-a", changelog(nats_server), clock)
    for i in range(20):
        old[f"k{i}"] = i
    assert old.wait_replicated(10.0)
    new = open_replicated(tmp_path / "node-b", changelog(nats_server), clock, restore="if-missing")
    assert new["k19"] == 19
    new["k0"] = "new writer"
    assert new.wait_replicated(10.0)
    old["k1"] = "zombie write"  # committed locally, then refused by the stream
    with pytest.raises(FencedError) as info:
        old.wait_replicated(10.0)
        old["k2"] = "refused"
    assert info.value.partition == "orders.0"
    with pytest.raises(FencedError):
        old.get("k3")
    old._engine.abandon()
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "check")
    check = LocalFileStorage(tmp_path / "check", clock=clock)
    assert check["k0"] == "new writer" and check["k1"] == 1
    check.close()
    new.close()
    with pytest.raises(FencedError):
        open_replicated(tmp_path / "node-a", changelog(nats_server), clock)


def test_restore_from_an_unreachable_broker_fails_within_the_timeout(tmp_path: Path) -> None:
    import time

    from tests.replication.servers import free_port

    started = time.monotonic()
    with pytest.raises(ReplicationError):
        restore(f"nats://127.0.0.1:{free_port()}", "STATE", "p", tmp_path / "x", timeout=1.0)
    assert time.monotonic() - started < 5.0
    assert not (tmp_path / "x").exists()


def test_logstate_snapshot_uploads_and_restore_starts_from_it(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from logstate import cli

    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock)
    fill(source, clock)
    expected = store_state(source)
    last = source._engine.appender.seq
    source.close()
    args = [nats_server.url, "--stream", "STATE", "--partition", "orders.0"]
    assert cli.main(["snapshot", *args, str(tmp_path / "src"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seq"] == last and printed["name"] == f"orders.0/{last:020d}"
    result = restore(nats_server.url, "STATE", "orders.0", tmp_path / "copy")
    assert (result.snapshot_seq, result.records, result.seq) == (last, 0, last)
    copy = LocalFileStorage(tmp_path / "copy", clock=clock)
    assert store_state(copy) == expected
    copy.close()
    assert cli.main(["snapshot", *args, str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_a_stream_the_user_made_without_the_partitions_subject_is_refused(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    client = Client.get(nats_server.url, timeout_s=5.0)
    try:
        client.ensure_stream("STATE", ["elsewhere.>"], 1, 5.0)
    finally:
        client.release()
    with pytest.raises(ReplicationError, match=r"do not take 'logstate\.STATE\.orders\.0'"):
        open_replicated(tmp_path / "s", changelog(nats_server), Clock())
    LocalFileStorage(tmp_path / "s").close()  # the directory was released
