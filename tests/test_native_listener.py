"""The C set with a commit listener queues what the Python set queues.

With a commit listener (a changelog's shipper), ``WriterBase.set`` writes the
record and puts ``(seq, end position, record)`` on the appender's queues
itself (copy of ``Appender.queue``), then calls ``Writer.deliver`` after the
lock, as ``Writer._after_write`` does. Checked here against the pure Python
path: the same deliveries and offers (seq and exact bytes, in order), the same
files; the C path is taken; a queue that is not a plain deque sends the set to
the Python path; a raising listener gets the record again at the next set; no
collection (Python code) runs under the lock, no reference is left per set, a
failed index store is settled as in Python, four writers deliver each seq once.

    python -m pytest tests/test_native_listener.py -q
"""

from __future__ import annotations

import collections
import gc
import os
import tempfile
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from logstate import LocalFileStorage, _writer
from logstate._append import Appender

from .native_required import native_extension
from .test_commit_listener import records_in_files
from .test_native_equal import OPS, files, python_path, run

Calls = list[tuple[str, int, bytes]]


def listen(calls: Calls, early: bool) -> Callable[[LocalFileStorage], None]:
    """Attach a commit listener (and an early one) that note what they get."""

    def attach(store: LocalFileStorage) -> None:
        def listener(seq: int, record: bytes) -> None:
            calls.append(("commit", seq, record))

        def offered(seq: int, record: bytes) -> None:
            calls.append(("early", seq, record))

        store._engine.add_commit_listener(listener, offered if early else None)

    return attach


def compare(ops: list[tuple[object, ...]], early: bool, **options: Any) -> Calls:
    with tempfile.TemporaryDirectory() as tmp:
        fast_dir, pure_dir = os.path.join(tmp, "fast"), os.path.join(tmp, "pure")
        fast_calls: Calls = []
        pure_calls: Calls = []
        fast = run(fast_dir, ops, listen(fast_calls, early), **options)
        with python_path():
            pure = run(pure_dir, ops, listen(pure_calls, early), **options)
        assert fast == pure
        assert fast_calls == pure_calls
        assert files(fast_dir) == files(pure_dir)
        # every record of the files, delivered once, with its exact bytes
        delivered = {seq: record for kind, seq, record in fast_calls if kind == "commit"}
        assert len(delivered) == sum(kind == "commit" for kind, _, _ in fast_calls)
        assert delivered == records_in_files(Path(fast_dir))
        return fast_calls


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_with_a_listener_the_c_path_delivers_what_the_python_path_delivers(
    ops: list[tuple[object, ...]],
) -> None:
    native_extension()
    compare(ops, early=False)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_with_an_early_listener_the_c_path_offers_what_the_python_path_offers(
    ops: list[tuple[object, ...]],
) -> None:
    native_extension()
    calls = compare(ops, early=True, sync="always")
    # with sync="always" each record is offered before it is delivered
    order = [(seq, kind) for kind, seq, _ in calls]
    assert order == sorted(order, key=lambda item: (item[0], item[1] != "early"))


def count_python_sets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    set_python = _writer.Writer._set_python

    def counted(self: _writer.Writer, *args: Any) -> None:
        calls.append(1)
        set_python(self, *args)

    monkeypatch.setattr(_writer.Writer, "_set_python", counted)
    return calls


@pytest.mark.parametrize("early", [False, True])
def test_a_set_with_a_listener_takes_the_c_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early: bool
) -> None:
    native_extension()
    python_sets = count_python_sets(monkeypatch)
    calls: Calls = []
    store = LocalFileStorage(tmp_path, sync="always" if early else "none", auto_compact=False)
    listen(calls, early)(store)
    for i in range(50):
        store.set(f"k{i}", i)
    assert python_sets == []
    assert [seq for kind, seq, _ in calls if kind == "commit"] == list(range(1, 51))
    assert [seq for kind, seq, _ in calls if kind == "early"] == (
        list(range(1, 51)) if early else []
    )
    store.close()


class _Queue(collections.deque):  # type: ignore[type-arg]
    """A queue that is not exactly a deque: the C set leaves it to Python."""


@pytest.mark.parametrize("which", ["_undelivered", "_unoffered"])
def test_a_queue_that_is_not_a_plain_deque_sends_the_set_to_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    native_extension()
    python_sets = count_python_sets(monkeypatch)
    calls: Calls = []
    store = LocalFileStorage(tmp_path, sync="always", auto_compact=False)
    listen(calls, early=True)(store)
    appender: Appender = store._engine.appender
    setattr(appender, which, _Queue(getattr(appender, which)))
    for i in range(10):
        store.set(f"k{i}", i)
    assert len(python_sets) == 10
    assert [seq for kind, seq, _ in calls if kind == "commit"] == list(range(1, 11))
    assert [seq for kind, seq, _ in calls if kind == "early"] == list(range(1, 11))
    store.close()


def test_a_raising_listener_gets_the_record_again_at_the_next_set(tmp_path: Path) -> None:
    native_extension()
    seen: list[int] = []
    fail = {3}

    def listener(seq: int, record: bytes) -> None:
        if seq in fail:
            fail.discard(seq)
            raise RuntimeError(f"listener refused {seq}")
        seen.append(seq)

    store = LocalFileStorage(tmp_path, sync="none", auto_compact=False)
    store._engine.add_commit_listener(listener)
    store.set("a", 1)
    store.set("b", 2)
    with pytest.raises(RuntimeError, match="listener refused 3"):
        store.set("c", 3)
    assert store.get("c") == 3  # stored all the same
    assert seen == [1, 2]
    store.set("d", 4)
    assert seen == [1, 2, 3, 4]
    store.close()
    assert sorted(records_in_files(tmp_path)) == [1, 2, 3, 4]


def test_the_c_set_queues_the_entries_the_python_set_queues(tmp_path: Path) -> None:
    """Before the sync that makes them durable (sync="interval", a long
    interval): the same (seq, end position, record) wait in both queues."""
    native_extension()
    queues = []
    for name, pure in (("fast", False), ("pure", True)):
        if pure:
            with python_path():
                store = LocalFileStorage(tmp_path / name, sync="interval", sync_interval=3600)
        else:
            store = LocalFileStorage(tmp_path / name, sync="interval", sync_interval=3600)
        calls: Calls = []
        listen(calls, early=True)(store)
        for i in range(20):
            store.set(f"k{i % 7}", bytes(i))
        appender = store._engine.appender
        queues.append((list(appender._undelivered), list(appender._unoffered), list(calls)))
        assert calls == []  # nothing durable yet
        store.close()
        assert [seq for kind, seq, _ in calls if kind == "commit"] == list(range(1, 21))
    assert queues[0] == queues[1]
    undelivered = queues[0][0]
    assert [seq for seq, _, _ in undelivered] == list(range(1, 21))
    ends = [end for _, end, _ in undelivered]
    assert ends == [sum(len(r) for _, _, r in undelivered[: i + 1]) for i in range(20)]


def test_no_collection_runs_under_the_write_lock_of_a_c_set_with_a_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collection runs Python code (finalizers): never while C holds the lock."""
    native_extension()
    python_sets = count_python_sets(monkeypatch)
    store = LocalFileStorage(tmp_path, sync="interval", sync_interval=3600, auto_compact=False)
    store._engine.add_commit_listener(lambda seq, record: None)
    lock = store._engine._lock
    seen = {"collections": 0, "under_lock": 0}
    me = threading.get_ident()

    def watch(phase: str, info: dict[str, int]) -> None:
        # (another thread may collect while this one holds the lock in write(2))
        if phase == "start" and threading.get_ident() == me:
            seen["collections"] += 1
            seen["under_lock"] += lock.locked()

    keep = [(i, i, i) for i in range(2000)]  # (empties the free list of 3-tuples)
    threshold = gc.get_threshold()
    gc.callbacks.append(watch)
    gc.set_threshold(1)
    try:
        for i in range(2000):
            store.set(f"k{i}", b"v")  # records wait for the sync: their tuples stay
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(watch)
    assert python_sets == []
    assert seen["collections"] > 0  # (the check ran)
    assert seen["under_lock"] == 0
    del keep
    store.close()


def test_c_sets_with_a_listener_leave_nothing_behind(tmp_path: Path) -> None:
    """No reference kept per set: memory after 40,000 sets as after 20,000."""
    native_extension()
    store = LocalFileStorage(tmp_path, sync="none", auto_compact=False)
    store._engine.add_commit_listener(lambda seq, record: None)
    value = b"v" * 100

    def sets(start: int) -> None:
        for i in range(start, start + 20_000):
            store.set(f"k{i % 1000}", value)

    sets(0)  # (the index and the queues at their size)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        sets(20_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, grown  # (a tuple or record kept per set: over 2 MB)
    store.close()


class _RefusesOnce(dict):  # type: ignore[type-arg]
    """An index whose next store of ``refuse`` raises (then succeeds)."""

    refuse: str | None = None

    def __setitem__(self, key: str, value: object) -> None:
        if key == self.refuse:
            self.refuse = None
            raise RuntimeError(f"store of {key} refused (test)")
        super().__setitem__(key, value)


def test_a_failed_index_store_with_a_listener_is_settled_as_the_python_path_settles_it(
    tmp_path: Path,
) -> None:
    native_extension()
    results = []
    for name, pure in (("fast", False), ("pure", True)):
        if pure:
            with python_path():
                store = LocalFileStorage(tmp_path / name, sync="none", auto_compact=False)
        else:
            store = LocalFileStorage(tmp_path / name, sync="none", auto_compact=False)
        calls: Calls = []
        listen(calls, early=False)(store)
        namespaces = store._engine.keydir.namespaces
        index = namespaces[""] = _RefusesOnce(namespaces[""])
        store.set("a", 1)
        index.refuse = "b"
        with pytest.raises(RuntimeError, match="store of b refused"):
            store.set("b", 2)
        assert store.get("b") == 2  # whole on disk: settled into the index
        store.set("c", 3)
        results.append([(kind, seq) for kind, seq, _ in calls])
        namespaces[""] = dict(index)  # (the snapshot marshals dicts)
        store.close()
    assert results[0] == results[1] == [("commit", 1), ("commit", 2), ("commit", 3)]
    assert files(str(tmp_path / "fast")) == files(str(tmp_path / "pure"))


def test_writers_in_four_threads_with_a_listener_deliver_every_seq_once_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    native_extension()
    store = LocalFileStorage(tmp_path, sync="none", auto_compact=False)
    seqs: list[int] = []
    store._engine.add_commit_listener(lambda seq, record: seqs.append(seq))

    def write(n: int) -> None:
        for i in range(2000):
            store.set(f"t{n}-{i % 300}", i)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert seqs == list(range(1, 8001))
    assert sorted(records_in_files(tmp_path)) == seqs


def test_a_backlog_set_during_a_c_set_holds_the_writer_back_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``Writer._after_write``: the backlog is looked at after the delivery."""
    native_extension()
    python_sets = count_python_sets(monkeypatch)
    held: list[int] = []
    monkeypatch.setattr(_writer.Writer, "_hold_back", lambda self: held.append(1))
    store = LocalFileStorage(tmp_path, sync="none", auto_compact=False)
    scheduler = store._engine.scheduler

    def listener(seq: int, record: bytes) -> None:
        scheduler.backlog = seq == 2  # (as another writer's roll would, meanwhile)

    store._engine.add_commit_listener(listener)
    store.set("a", 1)
    assert held == []
    store.set("b", 2)
    assert held == [1]
    scheduler.backlog = False
    store.set("c", 3)
    assert held == [1] and python_sets == []
    store.close()
