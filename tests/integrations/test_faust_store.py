"""The Faust store on logstate, driven as a Faust table drives it.

Real Faust objects throughout: an App (never started: no broker), its
tables and their stores, Message and Event for changelog batches and for the
current stream event of a write. Other processes holding a directory are
real child processes (``sys.executable``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import faust
import faust.stores
import pytest
from faust.assignor import PartitionAssignor
from faust.assignor.client_assignment import ClientAssignment
from faust.events import Event
from faust.streams import _current_event
from faust.types import TP
from faust.types.tuples import Message, RecordMetadata

from logstate import LocalFileStorage, StorageLockedError
from logstate.integrations.faust import MAX_KEY_SIZE, OFFSET_KEY_PREFIX, Store

ROOT = str(Path(__file__).resolve().parents[2])
_stores: list[Store] = []


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Close every store a test made, so that no open handle is left to the collector."""
    yield
    while _stores:
        asyncio.run(_stores.pop().on_stop())


def store_of(table: Any) -> Store:
    data = table.data
    assert isinstance(data, Store)
    _stores.append(data)
    return data


def make_app(datadir: Path, store: str = "logstate://") -> faust.App:
    return faust.App("tapp", broker="kafka://localhost:1", datadir=str(datadir), store=store)


def make_table(
    datadir: Path, store: str | None = None, name: str = "tab", **kwargs: Any
) -> tuple[faust.App, Any, Store]:
    app = make_app(datadir)
    table = app.Table(name, partitions=4, store=store, **kwargs)
    return app, table, store_of(table)


def changelog_event(app: faust.App, tp: TP, offset: int, key: bytes, value: bytes | None) -> Any:
    message = Message(tp.topic, tp.partition, offset, 0.0, 0, None, key, value, None)
    return Event(app, key, value, None, message)


@contextmanager
def processing(app: faust.App, partition: int) -> Iterator[None]:
    """The current stream event is a source message of ``partition`` (as in an agent).

    A table write sends its changelog message (a future, queued in the never
    started producer's buffer): an event loop is set for the block.
    """
    message = Message("source", partition, 0, 0.0, 0, None, b"k", b"v", None)
    event = Event(app, b"k", b"v", None, message)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)
        asyncio.set_event_loop(None)
        loop.close()


def changelog_tp(table: Any, partition: int) -> TP:
    return TP(table.changelog_topic_name, partition)


def close(store: Store) -> None:
    asyncio.run(store.on_stop())


def hold_directory(path: Path, seconds: float) -> subprocess.Popen[str]:
    """A child process that holds ``path`` open for ``seconds``, then closes it."""
    code = (
        "import sys, time\n"
        "from logstate import LocalFileStorage\n"
        "s = LocalFileStorage(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "s.close()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


# ---------------------------------------------------------------------- registration
def test_by_url_finds_the_logstate_store_through_the_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="faust.stores")}
    assert names.get("logstate") == "logstate.integrations.faust:Store"
    assert faust.stores.by_url("logstate://") is Store
    assert faust.stores.by_url("logstate:///srv/state?sync=always") is Store


def test_app_store_url_and_table_store_url_build_logstate_stores(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    default = app.Table("a")
    own = app.Table("b", store=f"logstate://{tmp_path / 'own'}")
    relative = app.Table("c", store="logstate:rel/dir")
    assert isinstance(default.data, Store) and isinstance(own.data, Store)
    assert isinstance(relative.data, Store)  # none opens a partition: nothing to close
    assert default.data.base_path == Path(app.conf.tabledir)
    assert own.data.base_path == tmp_path / "own"
    assert relative.data.base_path == Path(app.conf.tabledir) / "rel" / "dir"
    assert default.data.partition_path(3) == Path(app.conf.tabledir) / "a-3.logstate"


def test_store_url_with_a_host_is_refused_with_the_reason(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    with pytest.raises(ValueError, match="names a host"):
        _ = app.Table("a", store="logstate://somehost/dir").data


# ---------------------------------------------------------------------- options
def test_options_come_from_the_url_query_and_the_table_options(tmp_path: Path) -> None:
    _, _, data = make_table(
        tmp_path,
        "logstate://?sync=always&lock_timeout=2.5&segment_size=65536",
        options={"auto_compact": False, "sync_interval": 0.5},
    )
    assert data.open_arguments == {
        "recovery": "prefix",
        "sync": "always",
        "sync_interval": 0.5,
        "segment_size": 65536,
        "auto_compact": False,
    }
    assert data.lock_timeout_s == 2.5


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("logstate://?colour=red", None, "unknown logstate store option"),
        ("logstate://", {"write_buffer_size": 1}, "write_buffer_size"),
        ("logstate://?sync=sometimes", None, "sync='sometimes'"),
        ("logstate://?recovery=salvage", None, "keep an offset and drop its data"),
        ("logstate://?lock_timeout=-1", None, "must be >= 0"),
        ("logstate://?lock_timeout=nan", None, "must be >= 0"),
        ("logstate://", {"sync_interval": float("inf")}, "must be > 0"),
        ("logstate://?segment_size=0", None, "must be > 0"),
        ("logstate://?segment_size=big", None, "expected int"),
        ("logstate://?auto_compact=maybe", None, "expected true or false"),
    ],
)
def test_bad_options_are_refused_naming_the_option(
    tmp_path: Path, url: str, options: dict[str, Any] | None, message: str
) -> None:
    app = make_app(tmp_path)
    with pytest.raises(ValueError, match=message):
        _ = app.Table("a", store=url, options=options).data


def test_table_options_are_not_changed(tmp_path: Path) -> None:
    options = {"sync": "none"}
    make_table(tmp_path, options=options)
    assert options == {"sync": "none"}


# ---------------------------------------------------------------------- table writes
def test_table_set_get_del_write_the_partition_of_the_current_event(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    with processing(app, 2):
        table["hello"] = 3
        table["other"] = 4
        assert table["hello"] == 3 and "hello" in table
        del table["other"]
        assert "other" not in table
    assert sorted(data.partitions) == [2]
    assert data.partition_path(2).is_dir()
    with processing(app, 1):  # reads with an event go to that partition alone
        assert "hello" not in table
    assert table["hello"] == 3  # without an event: every open partition
    assert dict(table.items()) == {"hello": 3}
    assert len(table) == 1


def test_write_outside_a_stream_event_is_refused(tmp_path: Path) -> None:
    _, _, data = make_table(tmp_path)
    with pytest.raises(RuntimeError, match="no current event"):
        data._set(b"k", b"v")


def test_set_with_value_none_deletes_as_the_changelog_does(tmp_path: Path) -> None:
    app, _, data = make_table(tmp_path)
    with processing(app, 0):
        data._set(b"k", b"v")
        data._set(b"k", None)
        assert not data._contains(b"k")


def test_table_contents_survive_a_reopen(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    with processing(app, 0):
        table["a"] = [1, 2]
    with processing(app, 3):
        table["b"] = {"x": 1}
    close(data)
    _, table2, data2 = make_table(tmp_path)
    tps = {changelog_tp(table2, 0), changelog_tp(table2, 3)}
    asyncio.run(data2.on_rebalance(tps, set(), tps))
    assert dict(table2.items()) == {"a": [1, 2], "b": {"x": 1}}


def test_every_byte_value_in_keys_round_trips_in_byte_order(tmp_path: Path) -> None:
    app, _, data = make_table(tmp_path)
    keys = [bytes([b]) for b in range(256)] + [b"\x00\xff", b"\xff\x00", b"a\x00b"]
    with processing(app, 0):
        for number, key in enumerate(keys):
            data._set(key, b"%d" % number)
    assert list(data._iterkeys()) == sorted(keys)
    assert dict(data._iteritems()) == {key: b"%d" % n for n, key in enumerate(keys)}
    assert sorted(v for v in data._itervalues() if v is not None) == sorted(
        b"%d" % n for n in range(len(keys))
    )
    assert data._size() == len(keys)


def test_key_longer_than_logstate_allows_is_a_clear_error(tmp_path: Path) -> None:
    app, _, data = make_table(tmp_path)
    with processing(app, 0):
        data._set(b"a" * MAX_KEY_SIZE, b"ok")  # ASCII: one UTF-8 byte each
        with pytest.raises(ValueError, match=r"a key of 2049 bytes takes 4098 bytes"):
            data._set(b"\xe9" * 2049, b"v")  # >= 0x80: two UTF-8 bytes each
        with pytest.raises(ValueError, match="empty key"):
            data._set(b"", b"v")
        assert data._get(b"\xe9" * 2049) is None  # never stored: not found
        assert not data._contains(b"")
    assert data._get(b"a" * MAX_KEY_SIZE) == b"ok"


def test_failed_local_write_freezes_the_offset_until_the_partition_is_reopened(
    tmp_path: Path,
) -> None:
    app, table, data = make_table(tmp_path)
    tp = changelog_tp(table, 0)
    with processing(app, 0):
        data._set(b"k", b"v")
        data.set_persisted_offset(tp, 10)
        with pytest.raises(ValueError):
            data._set(b"\xe9" * 3000, b"v")  # Faust had sent its changelog message
        data.set_persisted_offset(tp, 11)  # the offset of that message: not stored
    assert data.persisted_offset(tp) == 10
    asyncio.run(data.on_rebalance(set(), {tp}, set()))  # revoked: closed
    asyncio.run(data.on_rebalance({tp}, set(), {tp}))  # assigned again
    data.set_persisted_offset(tp, 12)
    assert data.persisted_offset(tp) == 12


def test_clear_deletes_the_keys_and_keeps_the_offsets(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    tp = changelog_tp(table, 1)
    with processing(app, 1):
        table["a"] = 1
        table["b"] = 2
    data.set_persisted_offset(tp, 7)
    data.clear()
    assert len(table) == 0 and list(data._iterkeys()) == []
    assert data.persisted_offset(tp) == 7


# ---------------------------------------------------------------------- offsets
def test_persisted_offset_is_none_until_set_and_kept_per_topic_partition(tmp_path: Path) -> None:
    _, table, data = make_table(tmp_path)
    tp0, tp1 = changelog_tp(table, 0), changelog_tp(table, 1)
    assert data.persisted_offset(tp0) is None
    data.set_persisted_offset(tp0, 5)
    data.set_persisted_offset(tp1, 9)
    assert (data.persisted_offset(tp0), data.persisted_offset(tp1)) == (5, 9)
    assert data.persisted_offset(TP("another-topic", 0)) is None
    with pytest.raises(TypeError, match="must be an int"):
        data.set_persisted_offset(tp0, "6")  # type: ignore[arg-type]
    close(data)
    _, _, data2 = make_table(tmp_path)
    assert (data2.persisted_offset(tp0), data2.persisted_offset(tp1)) == (5, 9)


def test_offsets_are_not_table_keys(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    tp = changelog_tp(table, 0)
    with processing(app, 0):
        table["a"] = 1
    data.set_persisted_offset(tp, 3)
    assert list(table.keys()) == ["a"] and len(table) == 1
    assert list(data._itervalues()) == [b"1"]
    storage = data.partitions[0]
    assert storage.get(OFFSET_KEY_PREFIX + tp.topic) == 3


def test_table_write_then_its_delivery_callback_stores_the_offset(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    tp = changelog_tp(table, 2)
    with processing(app, 2):
        table["a"] = 1  # sends the changelog message, then writes the store
        future = app.producer.buffer.pending.get_nowait()
        assert data._get(b'"a"') == b"1" and data.persisted_offset(tp) is None
        # what the topic does once Kafka acknowledged the message (Topic._on_published)
        future.set_result(RecordMetadata(tp.topic, tp.partition, tp, 41))
        assert future.message.callback is not None
        future.message.callback(future)
    assert data.persisted_offset(tp) == 41
    close(data)
    _, _, data2 = make_table(tmp_path)
    assert data2.persisted_offset(tp) == 41 and data2._get(b'"a"') == b"1"


def test_apply_changelog_batch_writes_changes_and_highest_offset_per_partition(
    tmp_path: Path,
) -> None:
    app, table, data = make_table(tmp_path)
    tp0, tp2 = changelog_tp(table, 0), changelog_tp(table, 2)
    events = [
        changelog_event(app, tp0, 4, b'"a"', b"1"),
        changelog_event(app, tp2, 8, b'"b"', b"2"),
        changelog_event(app, tp0, 6, b'"a"', b"3"),
        changelog_event(app, tp0, 5, b'"c"', b"4"),
        changelog_event(app, tp0, 7, b'"c"', None),  # a delete
    ]
    table.apply_changelog_batch(events)
    assert (data.persisted_offset(tp0), data.persisted_offset(tp2)) == (7, 8)
    asyncio.run(data.on_recovery_completed({tp0, tp2}, set()))
    assert dict(table.items()) == {"a": 3, "b": 2}


def test_apply_changelog_batch_with_a_bad_key_writes_nothing(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    tp0, tp1 = changelog_tp(table, 0), changelog_tp(table, 1)
    events = [
        changelog_event(app, tp0, 1, b"good", b"1"),
        changelog_event(app, tp1, 2, b"\xe9" * 3000, b"2"),
    ]
    with pytest.raises(ValueError, match="the limit is 4096"):
        table.apply_changelog_batch(events)
    assert data.persisted_offset(tp0) is None and data.persisted_offset(tp1) is None
    assert data._get(b"good") is None
    with pytest.raises(TypeError, match="missing its key"):
        table.apply_changelog_batch([changelog_event(app, tp0, 3, None, b"1")])  # type: ignore[arg-type]


def test_apply_changelog_batch_of_many_events_writes_them_all_with_the_offset(
    tmp_path: Path,
) -> None:
    app, table, data = make_table(tmp_path)
    tp = changelog_tp(table, 0)
    data.set_persisted_offset(tp, 0)
    storage = data.partitions[0]
    before = storage.stats()
    table.apply_changelog_batch(
        [changelog_event(app, tp, n, b"k%d" % n, b"v") for n in range(1, 50)]
    )
    after = storage.stats()
    assert after["keys"] - before["keys"] == 49
    with processing(app, 0):
        assert data._get(b"k49") == b"v"
    assert data.persisted_offset(tp) == 49


# ---------------------------------------------------------------------- rebalance
def test_on_rebalance_opens_assigned_actives_and_closes_revoked(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    tp0, tp1, tp3 = (changelog_tp(table, n) for n in (0, 1, 3))
    source = TP("source", 0)
    assignor = app.assignor
    assert isinstance(assignor, PartitionAssignor)
    assignor._assignment = ClientAssignment(actives={}, standbys={table.changelog_topic_name: [3]})
    asyncio.run(data.on_rebalance({tp0, tp1, tp3, source}, set(), {tp0, tp1, tp3, source}))
    assert sorted(data.partitions) == [0, 1]  # the standby is not opened
    asyncio.run(data.on_rebalance({tp1}, {tp0, source}, set()))
    assert sorted(data.partitions) == [1]
    LocalFileStorage(data.partition_path(0)).close()  # released: another process could open it


def test_reads_go_over_active_partitions_or_all_for_a_global_table(tmp_path: Path) -> None:
    for is_global in (False, True):
        app = make_app(tmp_path / str(is_global))
        table = (app.GlobalTable if is_global else app.Table)("g", partitions=2)
        data = store_of(table)
        tp0, tp1 = changelog_tp(table, 0), changelog_tp(table, 1)
        table.apply_changelog_batch(
            [changelog_event(app, tp0, 1, b'"a"', b"1"), changelog_event(app, tp1, 1, b'"b"', b"2")]
        )
        asyncio.run(data.on_recovery_completed({tp0}, {tp1}))
        assert sorted(table.keys()) == (["a", "b"] if is_global else ["a"])
        assert table["b"] == 2  # a lookup searches every open partition, as RocksDB's


def test_on_rebalance_waits_for_another_process_to_release_the_directory(tmp_path: Path) -> None:
    _, table, data = make_table(tmp_path, "logstate://?lock_timeout=20")
    tp = changelog_tp(table, 0)
    data.base_path.mkdir(parents=True)
    child = hold_directory(data.partition_path(0), 1.0)
    started = time.monotonic()
    asyncio.run(data.on_rebalance({tp}, set(), {tp}))
    assert time.monotonic() - started >= 0.5
    assert child.wait(10) == 0
    assert sorted(data.partitions) == [0]


def test_on_rebalance_gives_up_after_lock_timeout(tmp_path: Path) -> None:
    _, table, data = make_table(tmp_path, "logstate://?lock_timeout=0.3")
    tp = changelog_tp(table, 0)
    data.base_path.mkdir(parents=True)
    child = hold_directory(data.partition_path(0), 5.0)
    try:
        with pytest.raises(StorageLockedError):
            asyncio.run(data.on_rebalance({tp}, set(), {tp}))
        assert data.partitions == {}
    finally:
        child.kill()
        child.wait()


def test_waiting_open_gives_up_when_a_newer_rebalance_starts(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path, "logstate://?lock_timeout=20")
    tp = changelog_tp(table, 0)
    data.base_path.mkdir(parents=True)
    child = hold_directory(data.partition_path(0), 5.0)
    app.consumer_generation_id = 2
    try:
        started = time.monotonic()
        asyncio.run(data.on_rebalance({tp}, set(), {tp}, generation_id=1))
        assert time.monotonic() - started < 4
        assert data.partitions == {}
    finally:
        child.kill()
        child.wait()


def test_cancelled_waiting_open_keeps_nothing_open(tmp_path: Path) -> None:
    _, table, data = make_table(tmp_path, "logstate://?lock_timeout=20")
    tp = changelog_tp(table, 0)
    data.base_path.mkdir(parents=True)
    child = hold_directory(data.partition_path(0), 0.5)

    async def rebalance_then_cancel() -> None:
        task = asyncio.ensure_future(data.on_rebalance({tp}, set(), {tp}))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(rebalance_then_cancel())
    assert child.wait(10) == 0
    assert data.partitions == {}
    probe = (
        "import sys; from logstate import LocalFileStorage; LocalFileStorage(sys.argv[1]).close()"
    )
    deadline = time.monotonic() + 10
    while True:  # the waiting thread opens the directory once it is free: it is closed again
        done = subprocess.run(
            [sys.executable, "-c", probe, str(data.partition_path(0))],
            env={**os.environ, "PYTHONPATH": ROOT},
            capture_output=True,
        )
        if done.returncode == 0:
            break
        assert b"StorageLockedError" in done.stderr and time.monotonic() < deadline


def test_changelogged_object_manager_argument_order_is_understood(tmp_path: Path) -> None:
    _, table, data = make_table(tmp_path)
    tp = changelog_tp(table, 1)
    # faust.tables.objects.ChangeloggedObjectManager calls (table, assigned, revoked, new)
    asyncio.run(data.on_rebalance(table, {tp}, set(), {tp}))  # type: ignore[arg-type]
    assert sorted(data.partitions) == [1]


def test_need_active_standby_for_is_false_while_another_process_holds_it(tmp_path: Path) -> None:
    _, table, data = make_table(tmp_path)
    data.base_path.mkdir(parents=True)
    child = hold_directory(data.partition_path(1), 5.0)
    try:
        assert asyncio.run(data.need_active_standby_for(changelog_tp(table, 1))) is False
        assert asyncio.run(data.need_active_standby_for(changelog_tp(table, 2))) is True
    finally:
        child.kill()
        child.wait()


# ---------------------------------------------------------------------- reset, stop
def test_reset_state_deletes_this_tables_partitions_only(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    other = store_of(app.Table("other", partitions=4))
    with processing(app, 0):
        table["a"] = 1
        other._set(b"x", b"1")
    with processing(app, 3):
        table["b"] = 2
    close(data)
    data.partition_path(2).mkdir()  # an empty, never-opened partition directory
    leftover = data.base_path / "tab-1.logstate.deleted-99"  # an interrupted reset's
    leftover.mkdir()
    # one left by a process of this pid (pid 1 again in a container): the name
    # this reset renames partition 0 to
    same_pid = data.base_path / f"tab-0.logstate.deleted-{os.getpid()}"
    same_pid.mkdir()
    (same_pid / "segment-0000000001.seg").write_bytes(b"left over")
    _, table2, data2 = make_table(tmp_path)
    data2.persisted_offset(changelog_tp(table2, 0))  # holds partition 0 itself
    table2.reset_state()
    assert sorted(os.listdir(data2.base_path)) == ["other-0.logstate"]
    assert data2.partitions == {} and data2.persisted_offset(changelog_tp(table2, 0)) is None
    assert other._get(b"x") == b"1"


def test_reset_state_refuses_a_partition_another_process_holds(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    with processing(app, 0):
        table["a"] = 1
    with processing(app, 1):
        table["b"] = 2
    close(data)
    child = hold_directory(data.partition_path(1), 5.0)
    try:
        with pytest.raises(StorageLockedError):
            table.reset_state()
        assert data.partition_path(0).is_dir()  # nothing deleted
    finally:
        child.kill()
        child.wait()


def test_stop_closes_every_partition(tmp_path: Path) -> None:
    app, table, data = make_table(tmp_path)
    with processing(app, 0):
        table["a"] = 1
    storage = data.partitions[0]
    close(data)
    assert storage.closed and data.partitions == {}


def test_backups_are_not_supported(tmp_path: Path) -> None:
    _, _, data = make_table(tmp_path)
    with pytest.raises(NotImplementedError):
        asyncio.run(data.backup_partition(0))
    with pytest.raises(NotImplementedError):
        data.restore_backup(0)
