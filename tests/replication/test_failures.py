"""Replication failures of the writer, with real processes: kill -9 at exact points, a zombie.

Each writer runs in its own process (``_writer_proc.py``, with
``sys.executable``) on a real nats-server whose ``max_payload`` is 64 KiB,
so that some groups are chunked and snapshots take several object chunks.
``LOGSTATE_LONG_TESTS=1`` runs the kill loop five times longer.
Broker and network failures: test_failures_net.py.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from logstate import LocalFileStorage
from logstate.replication import FencedError, JetStreamChangelog, restorable, restore
from logstate.replication._replicator import SNAPSHOT_TMP_NAME
from tests.replication.servers import NatsServer
from tests.replication.writers import (
    Writers,
    assert_exactly_once,
    assert_restore_equals,
    parse_open,
    subject_messages,
)

SMALL_PAYLOAD = 64 * 1024
STORE_OPTIONS: dict[str, Any] = {"segment_size": 64 * 1024, "compress_min_size": None}
LONG = os.environ.get("LOGSTATE_LONG_TESTS") == "1"


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", extra_config=f"max_payload: {SMALL_PAYLOAD}").start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def writers(tmp_path: Path) -> Iterator[Writers]:
    made = Writers(tmp_path)
    try:
        yield made
    finally:
        made.close()


def reopen_and_ship(path: Path, servers: list[str], partition: str) -> int:
    """Open ``path`` with its changelog once more, wait until all is shipped; its seq."""
    store = LocalFileStorage(
        path,
        changelog=JetStreamChangelog(servers, "STATE", partition, timeout=10.0),
        sync="always",
        auto_compact=False,
        **STORE_OPTIONS,
    )
    try:
        assert store.wait_replicated(30.0)
        assert store.replication_lag() == (0, 0)
        return store._engine.appender.seq
    finally:
        store.close()


# the kill points, in turn: None is a SIGKILL from here after a random delay
KILL_POINTS = [
    None,
    "before-publish",
    "mid-chunks",
    None,
    "mid-snapshot",
    "after-publish",
    None,
    "mid-chunks",
]


def test_kill_9_of_the_writer_anywhere_loses_and_duplicates_nothing(
    small_server: NatsServer, writers: Writers, tmp_path: Path
) -> None:
    seed = int(os.environ.get("LOGSTATE_TEST_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = len(KILL_POINTS) * (5 if LONG else 1)
    path = tmp_path / "writer"
    servers = [small_server.url]
    last_round = last_seq = 0  # the last round acknowledged to its caller, and its seq
    unshipped_above: int | None = None  # a kill left a durable record not in the stream
    for i in range(kills):
        point = KILL_POINTS[i % len(KILL_POINTS)]
        ack = "sync" if i % 3 == 2 else "async"
        options = ["--ack", ack, "--big-every", "4", "--snapshot-every", "6"]
        options += ["--keep-snapshots", "1000", "--compact-every", "17", "--seed", str(seed + i)]
        if point is not None:
            options += ["--kill-at", f"{point}:{rng.randint(1, 3)}"]
        writer = writers.start(path, servers, "p.0", *options)
        context = f"seed {seed}, kill {i} ({point or 'random delay'}, {ack})"
        # (a kill point may be reached while the open ships what an earlier run left)
        line = writer.wait_line("open") if point is None else writer.wait_line_or_exit("open")
        if line is not None:
            opened = parse_open(line)
            # sync="always": what a flush acknowledged survives the kill
            assert opened.local_seq >= last_seq and opened.checkpoint >= last_round, context
            if unshipped_above is not None:
                assert opened.local_seq > unshipped_above, context
                unshipped_above = None
        if point is None:
            time.sleep(rng.uniform(0.05, 1.2))
            writer.kill()
        assert writer.wait() == -signal.SIGKILL, f"{context}: {writer.stderr_tail()}"
        if point is not None:
            assert f"dying {point}" in writer.lines, context
        for round_, seq in writer.acks():
            last_round, last_seq = max(last_round, round_), max(last_seq, seq)
        head = subject_messages(servers, "p.0")[-1]
        if point == "mid-chunks":  # the stream holds the first chunks of a record only
            assert head.chunk is not None and head.chunk.part + 1 < head.chunk.parts, context
        if point == "before-publish":  # (a chunked record counts once whole)
            whole = head.chunk is None or head.chunk.part + 1 == head.chunk.parts
            unshipped_above = head.last if whole else head.first - 1
        if point == "mid-snapshot":
            assert (path / SNAPSHOT_TMP_NAME).exists(), context
    assert last_round > 0

    final_seq = reopen_and_ship(path, servers, "p.0")
    assert not (path / SNAPSHOT_TMP_NAME).exists()  # (recovery removed the leftover)
    messages = subject_messages(servers, "p.0")
    assert assert_exactly_once(messages) == final_seq >= last_seq
    chunked = sum(1 for m in messages if m.chunk is not None and m.chunk.part == 0)
    print(
        f"seed {seed}: {kills} kills, {final_seq} seqs in {len(messages)} messages, "
        f"{chunked} chunked records, last acknowledged round {last_round}"
    )
    state = assert_restore_equals(servers, "p.0", path, tmp_path / "restored", **STORE_OPTIONS)
    assert state["checkpoint"] >= last_round
    assert restorable(servers, "STATE", "p.0").newest_seq == final_seq


def test_a_paused_zombie_writer_is_fenced_and_the_stream_keeps_only_the_new_history(
    small_server: NatsServer, writers: Writers, tmp_path: Path
) -> None:
    servers = [small_server.url]
    old = writers.start(
        tmp_path / "node-a", servers, "p.0", "--pause-s", "0.02", "--snapshot-every", "10"
    )
    old_open = parse_open(old.wait_line("open"))
    for _ in range(15):
        old.wait_line("ack")
    old.signal(signal.SIGSTOP)  # a zombie: alive, holding its connection, not running
    new = writers.start(
        tmp_path / "node-b", servers, "p.0", "--restore", "if-missing", "--rounds", "20"
    )
    new_open = parse_open(new.wait_line("open"))
    assert new.wait_line("done")
    assert new.wait() == 0
    old.signal(signal.SIGCONT)  # it commits locally again, and publishes
    fenced = old.wait_line("fenced").split(maxsplit=2)
    assert old.wait() == 3
    assert fenced[1] == new_open.writer

    messages = subject_messages(servers, "p.0")
    writers_in_order = [m.writer for m in messages]
    taken_at = writers_in_order.index(new_open.writer)  # the new writer's first message
    assert set(writers_in_order[:taken_at]) == {old_open.writer}
    assert set(writers_in_order[taken_at:]) == {new_open.writer}  # the zombie never got in
    takeover = messages[taken_at - 1]  # the old writer's last message: restored from
    assert new_open.local_seq == takeover.last and new_open.epoch == takeover.epoch + 1
    assert {m.epoch for m in messages[taken_at:]} == {new_open.epoch}
    assert assert_exactly_once(messages) == takeover.last + len(new.acks())
    # it learns by publishing what it committed after the takeover: that is set aside
    first, last = (int(seq) for seq in fenced[2].split("-"))
    assert first == takeover.last + 1 <= last
    assert_restore_equals(servers, "p.0", tmp_path / "node-b", tmp_path / "check", **STORE_OPTIONS)
    with pytest.raises(FencedError) as info:
        LocalFileStorage(
            tmp_path / "node-a",
            changelog=JetStreamChangelog(servers, "STATE", "p.0", timeout=5.0),
            **STORE_OPTIONS,
        )
    assert info.value.by_writer == new_open.writer


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
