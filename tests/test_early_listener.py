"""The early listener (``Engine.add_commit_listener(listener, early)``), on real stores.

The contract (``Appender.add_listener``): ``early(seq, record)`` is offered
each record once it is written whole and a commit's fdatasync is about to
make it durable, in seq order, before the commit listener gets it; a record
made durable otherwise (a roll's or close's sync, sync="none") goes to the
commit listener only, and nothing is held for an offer that never comes. An
early listener that raises is logged: the fdatasync runs and the commit
listener still gets the record. A changelog with ``ack="sync"`` publishes
what it is offered while the disk syncs (tests/replication/test_early_publish.py).

Checked against :class:`tests.faultfs.CrashFS`'s model: at each offer the
record is in the files a running process reads and not yet in what a power
loss keeps.

    python -m pytest tests/test_early_listener.py -q
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from logstate import InMemoryStorage, LocalFileStorage
from logstate._format import FRAME_HEADER_SIZE

from .faultfs import CrashFS, open_storage
from .test_commit_listener import Recorder, record_state


class Offers:
    """An early listener: what it is offered, and where each record was then."""

    def __init__(self, fs: CrashFS, listener: Recorder) -> None:
        self.fs = fs
        self.listener = listener
        self.offered: list[int] = []
        self.states: list[str] = []
        self.delivered_before: list[int] = []  # records the listener had at each offer
        self._lock = threading.Lock()

    def __call__(self, seq: int, record: bytes) -> None:
        with self._lock:
            self.offered.append(seq)
            self.states.append(record_state(self.fs, record))
            self.delivered_before.append(len(self.listener.delivered))
            at = FRAME_HEADER_SIZE  # (a problem raised here would only be logged)
            if record[at : at + 8] != seq.to_bytes(8, "little"):
                self.listener.problems.append(f"offer {seq}: another seq's record")


def listened(tmp_path: Path, **options: Any) -> tuple[LocalFileStorage, Recorder, Offers]:
    fs = CrashFS(tmp_path)
    store = open_storage(fs, tmp_path / "store", **options)
    engine = store._engine
    listener = Recorder(engine, fs)
    offers = Offers(fs, listener)
    engine.add_commit_listener(listener, offers)
    return store, listener, offers


@pytest.mark.parametrize("sync", ["always", "interval"])
def test_each_record_is_offered_written_and_not_yet_durable_then_delivered(
    tmp_path: Path, sync: str
) -> None:
    store, listener, offers = listened(tmp_path, sync=sync, sync_interval=3600)
    for i in range(5):
        if sync == "always":
            store[f"k{i}"] = i
        else:
            memory = InMemoryStorage(store)
            memory[f"k{i}"] = i
            memory[f"j{i}"] = -i
            memory.flush()
    store.close()
    listener.check()
    assert offers.offered == listener.seqs == list(range(1, 6))
    assert offers.states == ["written"] * 5  # before its fdatasync, never after
    assert offers.delivered_before == [0, 1, 2, 3, 4]  # offered before it was delivered
    assert not store._engine.appender._unoffered


@pytest.mark.parametrize("how", ["none", "roll", "close"])
def test_a_record_made_durable_without_a_commit_is_delivered_and_not_held(
    tmp_path: Path, how: str
) -> None:
    sync = "none" if how == "none" else "interval"
    store, listener, offers = listened(
        tmp_path, sync=sync, sync_interval=3600, segment_size=4096, auto_compact=False
    )
    appender = store._engine.appender
    listener.expect = "written" if how == "none" else "durable"  # (sync="none": when written)
    count = 40 if how == "roll" else 5
    for i in range(count):
        store[f"k{i}"] = "v" * 200  # (roll: past 4 KiB, the segment rolls, durable)
    if how == "none":
        assert listener.seqs == list(range(1, count + 1)) and not appender._unoffered
    store.close()
    listener.check()
    assert listener.seqs == list(range(1, count + 1))
    assert offers.offered == []
    assert not appender._unoffered and not appender._undelivered


def test_an_early_listener_that_raises_is_logged_and_the_commit_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs = CrashFS(tmp_path)
    store = open_storage(fs, tmp_path / "store", sync="always")
    listener = Recorder(store._engine, fs)

    def early(seq: int, record: bytes) -> None:
        raise RuntimeError(f"offer {seq} refused")

    store._engine.add_commit_listener(listener, early)
    with caplog.at_level(logging.ERROR, logger="logstate"):
        store["a"] = 1
        store["b"] = 2
    assert "offer 1 refused" in caplog.text and "offer 2 refused" in caplog.text
    listener.check()
    assert listener.seqs == [1, 2]  # each delivered once durable, as without it
    assert not listener.problems
    store.close()
    with LocalFileStorage(tmp_path / "store") as again:
        assert (again["a"], again["b"]) == (1, 2)


def test_concurrent_writers_get_every_record_offered_once_in_order(tmp_path: Path) -> None:
    store, listener, offers = listened(tmp_path, sync="always")

    def write(t: int) -> None:
        for i in range(50):
            store[f"t{t}-{i}"] = i

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    listener.check()
    assert listener.seqs == list(range(1, 201))
    assert offers.offered == sorted(set(offers.offered))  # in order, none twice
    assert len(offers.offered) > 150  # (a roll's or close's sync may take a few)
    assert set(offers.states) == {"written"}
