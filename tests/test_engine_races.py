"""Races between unlocked readers, writers, background compaction and close.

Regression tests for findings of the independent review of the engine.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from logstate import InMemoryStorage, LocalFileStorage, StorageLockedError, _engine, _recovery
from logstate._compact import Compactor


def test_writers_are_released_when_a_background_compaction_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A roll while a compaction is finishing must not leave writers parked forever."""
    storage = LocalFileStorage(
        tmp_path, sync="none", segment_size=4096, compact_min_size=0, auto_compact=True
    )
    engine = storage._engine
    scheduler = engine.scheduler
    release = threading.Event()

    def slow_compaction(compactor: Compactor) -> object:
        release.wait(10)
        return None

    monkeypatch.setattr(Compactor, "compact", slow_compaction)
    done = threading.Event()

    def writer() -> None:
        for i in range(400):  # many rolls of dead data: the backlog condition is reached
            storage.set("k", "v" * 200 + str(i))
        done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not scheduler.backlog and time.monotonic() < deadline and not done.is_set():
        time.sleep(0.01)
    assert scheduler.backlog, "the writer never got ahead of the compaction: test did nothing"
    release.set()  # the compaction ends: its thread clears the backlog
    assert done.wait(10), "writer still parked after the compaction ended"
    engine.wait_for_background_compaction()
    assert not scheduler.compacting and not scheduler.backlog
    storage.close()


def test_in_memory_storage_loads_while_compactions_run(tmp_path: Path) -> None:
    storage = LocalFileStorage(tmp_path, sync="none", segment_size=8192, auto_compact=False)
    sub = storage.get_or_create_sub_storage("state")
    for i in range(300):
        sub[f"k{i}"] = i
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            n = 0
            while not stop.is_set():
                storage.set(f"other{n % 50}", "x" * 100)
                n += 1
                if n % 40 == 0:
                    storage.compact()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 1.5
        loads = 0
        while time.monotonic() < deadline:
            memory = InMemoryStorage(sub)
            assert len(memory) == 300 and memory["k299"] == 299
            assert storage.checkpoint is None
            loads += 1
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert loads > 0
    sub.close()
    storage.close()


def test_reopening_while_the_last_handle_closes_waits_instead_of_locking_itself_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalFileStorage(tmp_path, sync="none")
    storage.set("k", 1)
    in_close = threading.Event()
    original = _recovery.save_snapshot  # as the engine imported it

    def slow_snapshot(*args: Any) -> None:
        in_close.set()
        time.sleep(0.3)
        original(*args)

    monkeypatch.setattr(_engine, "save_snapshot", slow_snapshot)
    closer = threading.Thread(target=storage.close)
    closer.start()
    assert in_close.wait(5)
    try:
        reopened = LocalFileStorage(tmp_path)
    except StorageLockedError as exc:  # pragma: no cover - the bug
        pytest.fail(f"reopen during close locked itself out: {exc}")
    closer.join()
    assert reopened.get("k") == 1
    assert reopened._engine is not storage._engine
    reopened.close()


def test_a_writer_reaching_its_sync_after_close_finds_its_record_covered(tmp_path: Path) -> None:
    storage = LocalFileStorage(tmp_path, sync="always")
    engine = storage._engine
    storage.set("k", 1)
    end = engine.appender.written_pos
    storage.close()
    assert engine.commit.synced_pos == engine.appender.written_pos
    engine.commit.commit(end)  # returns: covered by close's sync, no fdatasync on a closed fd
    assert engine.failed is None


def test_every_roll_after_a_finished_compaction_can_request_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compactor thread lives as long as the engine: a roll after a finished
    compaction requests the next one, and no backlog is left that nobody clears."""
    started: list[int] = []
    monkeypatch.setattr(Compactor, "compact", lambda compactor: started.append(1))
    storage = LocalFileStorage(
        tmp_path, sync="none", segment_size=4096, compact_min_size=0, auto_compact=True
    )
    engine = storage._engine
    for i in range(200):
        storage.set("k", "v" * 200 + str(i))  # rolls with mostly dead bytes
        engine.wait_for_background_compaction()
    assert len(started) >= 10, f"only {len(started)} compactions were started at the rolls"
    assert not engine.scheduler.backlog and not engine.scheduler.compacting
    storage.close()


def test_a_last_handle_collected_inside_the_compactor_closes_the_engine_from_another_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The garbage collector may drop the last handle (held only by a cycle) while
    the compactor thread holds the engine's locks: closing the engine there would
    wait for those locks forever, and every later open of the directory with it."""
    import gc

    from logstate import _compact

    collected: list[str] = []
    armed: list[bool] = []
    original = _compact.CompactionResult

    def collecting(*args: object, **kwargs: object) -> object:
        in_compactor = threading.current_thread().name.startswith("logstate-compact")
        if in_compactor and armed and not collected:
            collected.append("yes")
            gc.collect()  # the cycle holding the last handle goes here
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_compact, "CompactionResult", collecting)
    gc.disable()  # the cycle must live until the compactor collects it
    try:
        storage = LocalFileStorage(tmp_path, segment_size=65536, compact_min_size=0, sync="none")
        cycle: list[object] = [storage]
        cycle.append(cycle)
        engine = storage._engine
        for i in range(3000):
            storage[f"k{i % 10}"] = b"x" * 100
        del storage, cycle
        engine.wait_for_background_compaction()  # those the writes started, unarmed
        armed.append(True)
        with engine._lock:
            scheduler = engine.scheduler
            if not scheduler.compacting:  # (a roll may have requested one already)
                scheduler.compacting = True
                scheduler._wake.release()
        deadline = time.monotonic() + 20
        while not engine.life.released and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gc.enable()
    assert collected, "the compactor never ran: the test did nothing"
    assert engine.life.released, "the engine was never closed (its close waits on itself)"
    reopened: list[dict[str, object]] = []
    opener = threading.Thread(
        target=lambda: reopened.append(dict(LocalFileStorage(tmp_path, sync="none").items())),
        daemon=True,
    )
    opener.start()
    opener.join(20)
    assert reopened == [{f"k{i}": b"x" * 100 for i in range(10)}], "a later open hung"
