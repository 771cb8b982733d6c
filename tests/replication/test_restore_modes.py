"""``LocalFileStorage(restore=...)``, restores after compactions, points in time, ``restorable``.

On a real nats-server:
- ``"if-missing"``: a missing or empty directory is restored; an existing
  store is not touched (one that is behind then refuses to open, naming
  ``"if-behind"``);
- ``"if-behind"``: a stale copy of the partition catches up from the stream,
  becomes the writer and fences the previous one;
- ``"rebase"``: a fenced directory is moved aside (``<dir>.fenced-*``) and
  restored; without it, reopening a fenced directory raises FencedError;
- a restore after compactions (automatic and explicit) equals the source;
- ``until_time`` as an aware datetime, an ISO-8601 string or epoch seconds
  (a naive datetime refused); ``restorable()``'s oldest and newest seq and time.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from logstate import InMemoryStorage, LocalFileStorage
from logstate._values import encode_value
from logstate.replication import FencedError, ReplicationError, restorable, restore
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock, fill, more_changes, store_state
from tests.replication.test_replication import (
    assert_exactly_once,
    changelog,
    open_replicated,
    subject_seqs,
)


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file of a directory (recursively) and its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "LOCK"  # (an open makes it; a close leaves it)
    }


def state_of(path: Path, clock: Clock) -> dict[str, Any]:
    store = LocalFileStorage(path, clock=clock)
    try:
        return store_state(store)
    finally:
        store.close()


def write_round(store: LocalFileStorage, round_: int, count: int = 30) -> None:
    for i in range(count):
        store[f"k{(round_ * 7 + i) % 45}"] = f"{round_}-{i}"


def test_if_missing_restores_a_missing_or_empty_directory_and_never_an_existing_store(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock)
    write_round(source, 0)
    assert source.wait_replicated(10.0)
    early = store_state(source)
    source.close()
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "stale")  # a copy at this point
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock, restore="if-missing")
    assert store_state(source) == early  # its own store: opened as it is, still the writer
    write_round(source, 1)
    assert source.wait_replicated(10.0)
    expected = store_state(source)
    source.close()

    (tmp_path / "empty").mkdir()
    for name in ("missing", "empty"):
        copy = open_replicated(tmp_path / name, changelog(nats_server), clock, restore="if-missing")
        assert store_state(copy) == expected
        copy.close()

    before = files_of(tmp_path / "stale")
    with pytest.raises(ReplicationError, match="restore='if-behind'") as info:
        open_replicated(tmp_path / "stale", changelog(nats_server), clock, restore="if-missing")
    assert info.value.stream == "STATE" and info.value.partition == "orders.0"
    assert files_of(tmp_path / "stale") == before  # not restored over, not changed
    assert state_of(tmp_path / "stale", clock) == early


def test_if_behind_catches_a_stale_copy_up_and_it_fences_the_previous_writer(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    old = open_replicated(tmp_path / "old", changelog(nats_server), clock)
    write_round(old, 0)
    assert old.wait_replicated(10.0)
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "new")  # a standby, then stale
    for round_ in range(1, 4):
        write_round(old, round_)
    assert old.wait_replicated(10.0)
    with pytest.raises(ReplicationError, match=r"behind the stream.*restore='if-behind'"):
        open_replicated(tmp_path / "new", changelog(nats_server), clock)
    expected = store_state(old)

    new = open_replicated(tmp_path / "new", changelog(nats_server), clock, restore="if-behind")
    assert store_state(new) == expected
    new["k0"] = "the new writer"
    assert new.wait_replicated(10.0)
    old["k1"] = "the old writer, fenced"  # committed locally, refused by the stream
    with pytest.raises(FencedError) as info:
        old.wait_replicated(10.0)
    assert info.value.by_writer == new.stats()["replication"]["writer"]
    assert info.value.kept_aside == (old._engine.appender.seq, old._engine.appender.seq)
    with pytest.raises(FencedError):
        old["k2"] = "refused"
    old.close()
    new.close()
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "check")
    got = state_of(tmp_path / "check", clock)
    assert got[""]["k0"] == encode_value("the new writer", True)
    assert got[""]["k1"] == expected[""]["k1"]


def test_rebase_moves_a_fenced_directory_aside_and_restores_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    a_path = tmp_path / "node-a"
    a = open_replicated(a_path, changelog(nats_server), clock)
    write_round(a, 0)
    assert a.wait_replicated(10.0)
    b = open_replicated(tmp_path / "node-b", changelog(nats_server), clock, restore="if-missing")
    b["k0"] = "b wrote"
    assert b.wait_replicated(10.0)
    a["k0"] = "a wrote, never in the stream"
    with pytest.raises(FencedError):
        a.wait_replicated(10.0)
    a.close()
    b.close()
    fenced_files = files_of(a_path)
    with pytest.raises(FencedError) as info:
        open_replicated(a_path, changelog(nats_server), clock)
    assert info.value.kept_aside is not None
    assert files_of(a_path) == fenced_files

    again = open_replicated(a_path, changelog(nats_server), clock, restore="rebase")
    assert again["k0"] == "b wrote"
    again["k1"] = "a again, the writer"
    assert again.wait_replicated(10.0)
    expected = store_state(again)
    again.close()
    aside = sorted(tmp_path.glob("node-a.fenced-*"))
    assert len(aside) == 1 and files_of(aside[0]) == fenced_files  # kept, as it was
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "check")
    assert state_of(tmp_path / "check", clock) == expected


@pytest.mark.parametrize("how", ["auto_compact", "compact"])
def test_a_restore_after_the_source_compacted_equals_the_source(
    nats_server: NatsServer, tmp_path: Path, how: str
) -> None:
    clock = Clock()
    options: dict[str, Any] = {"auto_compact": how == "auto_compact"}
    if how == "auto_compact":
        options.update(compact_min_size=0, compact_ratio=0.3)
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock, **options)
    fill(source, clock)
    for round_ in range(20):  # overwrites: most of the log becomes garbage
        write_round(source, round_, 40)
    more_changes(source, clock)
    if how == "compact":
        assert source.compact().inputs
    assert source.wait_replicated(10.0)
    stats = source.stats()
    expected = store_state(source)
    source.close()
    # the compactions dropped most records from the local log
    assert stats["segments"] < 10 and stats["dead_bytes"] < stats["live_bytes"], stats
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "copy")
    assert state_of(tmp_path / "copy", clock) == expected


def test_until_time_takes_an_aware_datetime_an_iso_string_or_epoch_seconds(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock)
    points: list[tuple[float, dict[str, Any]]] = []
    for round_ in range(3):
        write_round(source, round_)
        assert source.wait_replicated(10.0)
        points.append((time.time(), store_state(source)))
        time.sleep(0.03)  # (a message spans at most 10 ms of commit times)
    source.close()
    url = nats_server.url
    for i, (at, state) in enumerate(points):
        when = dt.datetime.fromtimestamp(at, dt.timezone.utc)
        paris = when.astimezone(dt.timezone(dt.timedelta(hours=2)))
        givens: list[Any] = [when, paris.isoformat(), at, when.isoformat().replace("+00:00", "Z")]
        for j, given in enumerate(givens):
            target = tmp_path / f"t{i}-{j}"
            restore(url, "STATE", "orders.0", target, until_time=given)
            assert state_of(target, clock) == state, (i, given)
    naive = dt.datetime.fromtimestamp(points[0][0])
    with pytest.raises(ValueError, match="no time zone"):
        restore(url, "STATE", "orders.0", tmp_path / "naive", until_time=naive)
    with pytest.raises(ValueError, match="no time zone"):
        restore(url, "STATE", "orders.0", tmp_path / "naive", until_time=naive.isoformat())
    with pytest.raises(ValueError, match="not an ISO-8601 time"):
        restore(url, "STATE", "orders.0", tmp_path / "naive", until_time="yesterday")
    assert not (tmp_path / "naive").exists()


def test_restorable_gives_the_oldest_and_newest_seq_and_time(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server, keep_snapshots=1), clock)
    started = time.time()
    write_round(source, 0)
    assert source.wait_replicated(10.0)
    written = time.time()
    span = restorable(nats_server.url, "STATE", "orders.0")
    assert (span.oldest_seq, span.newest_seq, span.snapshots) == (0, 30, [])
    assert span.oldest_time is not None and span.newest_time is not None
    assert started <= span.oldest_time <= span.newest_time <= written

    snap = source.replication_snapshot()
    write_round(source, 1)
    assert source.wait_replicated(10.0)
    later = time.time()
    source.close()
    span = restorable(nats_server.url, "STATE", "orders.0")
    assert (span.oldest_seq, span.newest_seq) == (snap["seq"], 60)
    assert span.oldest_time == snap["time"]
    assert span.newest_time is not None and written <= span.newest_time <= later
    assert [s["seq"] for s in span.snapshots] == [30]
    with pytest.raises(ReplicationError, match="holds nothing of this partition"):
        restorable(nats_server.url, "STATE", "orders.9")


def segment_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("segment-*.seg"))}


def test_compaction_waits_for_the_broker_and_never_rewrites_what_it_has_not_acknowledged(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    path = tmp_path / "src"
    source = open_replicated(path, changelog(nats_server, timeout=1.0), clock)
    for round_ in range(10):
        write_round(source, round_, 40)
    assert source.wait_replicated(10.0)
    nats_server.pause()  # the broker stops answering: commits stay local
    try:
        for round_ in range(10, 20):
            write_round(source, round_, 40)
        assert source.replication_lag().groups > 0
        before = segment_files(path)
        skipped = source.compact()  # waits (at most the changelog's timeout), then skips
        assert (skipped.inputs, skipped.output) == ([], None)
        after = segment_files(path)
        assert {name: after.get(name) for name in before} == before  # nothing rewritten
        assert source.replication_lag().groups > 0
    finally:
        nats_server.resume()
    assert source.wait_replicated(20.0)
    assert source.replication_lag() == (0, 0)
    last = source._engine.appender.seq
    assert_exactly_once(subject_seqs(nats_server), last)

    done = source.compact()  # everything acknowledged: it proceeds
    assert done.inputs and done.output is not None
    assert len(segment_files(path)) < len(before)
    source["after-compaction"] = 1
    assert source.wait_replicated(10.0)
    expected = store_state(source)
    source.close()
    assert_exactly_once(subject_seqs(nats_server), last + 1)
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "copy")
    assert state_of(tmp_path / "copy", clock) == expected


def test_wait_replicated_ships_writes_the_sync_interval_has_not_made_durable_yet(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    cl = changelog(nats_server)
    source = open_replicated(tmp_path / "src", cl, clock, sync="interval", sync_interval=60.0)
    for i in range(10):
        source[f"k{i}"] = i
    assert source.wait_replicated(10.0)
    assert_exactly_once(subject_seqs(nats_server), source._engine.appender.seq)
    memory = InMemoryStorage(source)
    memory["from-memory"] = 1
    memory.flush(checkpoint=1)
    assert memory.wait_replicated(10.0)
    assert_exactly_once(subject_seqs(nats_server), source._engine.appender.seq)
    source.close()


def test_a_copy_behind_the_purged_part_of_the_stream_is_told_to_rebase_and_rebase_works(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    old = open_replicated(tmp_path / "old", changelog(nats_server, keep_snapshots=1), clock)
    write_round(old, 0)
    assert old.wait_replicated(10.0)
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "new")  # stale from here on
    for round_ in range(1, 3):
        write_round(old, round_)
        assert old.wait_replicated(10.0)
        old.replication_snapshot()  # the stream is purged below it
    write_round(old, 3)
    assert old.wait_replicated(10.0)
    expected = store_state(old)
    before = files_of(tmp_path / "new")
    with pytest.raises(ReplicationError, match="restore='rebase'") as info:
        open_replicated(tmp_path / "new", changelog(nats_server), clock, restore="if-behind")
    assert info.value.seq == 30 and "seq 30 here" in info.value.reason
    assert files_of(tmp_path / "new") == before
    new = open_replicated(tmp_path / "new", changelog(nats_server), clock, restore="rebase")
    assert store_state(new) == expected
    new["k0"] = "the new writer"
    assert new.wait_replicated(10.0)
    old["k1"] = "fenced"
    with pytest.raises(FencedError):
        old.wait_replicated(10.0)
    old.close()
    new.close()
