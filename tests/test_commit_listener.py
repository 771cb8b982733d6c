"""The commit listener (``Engine.add_commit_listener``), on real stores.

The contract: ``listener(seq, record)`` gets each committed record's seq and
its exact bytes (the whole framed record as written in the segment file), in
seq order, exactly once, once the record is durable by the storage's rule
(after its fdatasync with sync="always" or "interval", or a roll's, or
close's; as soon as it is written with sync="none"), outside the write lock.
A listener that raises gets the same record again at the next delivery.

Durability at call time is checked against :class:`tests.faultfs.CrashFS`'s
model: the listener looks for the record in the state a power loss at that
very moment would leave when only what is known durable survives (synced
bytes of files whose directory entries are durable).

    python -m pytest tests/test_commit_listener.py -q
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest

import logstate._format
from logstate import InMemoryStorage, LocalFileStorage
from logstate._engine import Engine
from logstate._errors import ReadOnlyStorageError, StorageClosedError, StorageFailedError
from logstate._filenames import parse_segment_file_name
from logstate._format import (
    FRAME_HEADER_SIZE,
    GROUP_FLAG_ZSTD,
    REC_CLEAR,
    REC_CREATE_NS,
    REC_DELETE,
    REC_DROP_NS,
    REC_GROUP,
    REC_SET,
    RECORD_OVERHEAD,
    SEGMENT_HEADER_SIZE,
)
from logstate._scan import Damage, scan_records

from .faultfs import CrashFS, open_storage

_HEAD: Final = struct.Struct("<IIBQ")  # crc, length, type, seq: a record's first bytes
LONG: Final = 3600.0  # an interval sync that never fires during a test
POLL_S: Final = 10.0  # how long to wait for the background sync thread


class ListenerError(Exception):
    """Raised by a test's listener on purpose."""


# ---------------------------------------------------------------------- helpers
class Recorder:
    """A commit listener that records what it gets and checks each call.

    Problems are collected, not raised: a listener's exception would reach
    the writer (or be lost in the sync thread) instead of failing the test.

    Args:
        engine: the engine it listens to (to check that its write lock is free).
        fs: a CrashFS: each record must be durable (``"durable"``) or at least
            written (``"written"``) in its model when the listener is called.
        expect: what ``fs`` must show for each record (see above).
        hook: called first with each call's seq and record; raises to make the call fail.
    """

    def __init__(
        self,
        engine: Engine,
        fs: CrashFS | None = None,
        expect: str = "durable",
        hook: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.engine = engine
        self.fs = fs
        self.expect = expect
        self.hook = hook
        self.delivered: list[tuple[int, bytes]] = []  # calls that returned
        self.attempts: list[int] = []  # every call's seq, failed ones included
        self.unsynced_at_call = 0  # records not yet durable when delivered (sync="none")
        self.threads: set[int] = set()
        self.problems: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, seq: int, record: bytes) -> None:
        with self._lock:
            self.attempts.append(seq)
            self.threads.add(threading.get_ident())
            self._inspect(seq, record)
            if self.hook is not None:
                self.hook(seq, record)
            self.delivered.append((seq, record))

    def _inspect(self, seq: int, record: bytes) -> None:
        if type(record) is not bytes:
            self.problems.append(f"seq {seq}: got a {type(record).__name__}, not bytes")
            return
        _crc, length, _type, record_seq = _HEAD.unpack_from(record)
        if record_seq != seq or FRAME_HEADER_SIZE + length != len(record):
            self.problems.append(f"seq {seq}: record of seq {record_seq}, {len(record)} bytes")
        # outside the write lock: the engine's lock is a plain Lock, so the
        # thread holding it could not take it again (another thread of the
        # test never holds it for long)
        if self.engine._lock.acquire(timeout=5):
            self.engine._lock.release()
        else:
            self.problems.append(f"seq {seq}: delivered under the write lock")
        if self.fs is not None:
            state = record_state(self.fs, record)
            if state == "durable":
                return
            if state == "written" and self.expect == "written":
                self.unsynced_at_call += 1
                return
            self.problems.append(f"seq {seq}: {state} when delivered (expected {self.expect})")

    @property
    def seqs(self) -> list[int]:
        return [seq for seq, _record in self.delivered]

    def check(self) -> None:
        assert not self.problems, self.problems
        seqs = self.seqs
        if seqs:
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"not consecutive: {seqs}"


def record_state(fs: CrashFS, record: bytes) -> str:
    """Where ``record`` is now: "durable" (in what only-synced power loss keeps),
    "written" (in the files a running process reads), or "absent"."""
    with fs.lock:
        if any(record in data for data in fs.durable_state().files.values()):
            return "durable"
        if any(record in data for data in fs.process_crash_state().files.values()):
            return "written"
        return "absent"


def records_in_files(directory: Path) -> dict[int, bytes]:
    """Every record of every segment file of ``directory``: seq -> exact bytes."""
    found: dict[int, bytes] = {}
    damage: list[Damage] = []
    for name in sorted(os.listdir(directory)):
        if parse_segment_file_name(name) is None:
            continue
        data = (directory / name).read_bytes()
        for frame in scan_records(data, SEGMENT_HEADER_SIZE, damage.append):
            assert frame.seq not in found, f"seq {frame.seq} twice in the files"
            found[frame.seq] = data[frame.offset : frame.offset + frame.size]
    assert not damage, damage
    return found


def record_type(record: bytes) -> int:
    _crc, _length, rtype, _seq = _HEAD.unpack_from(record)
    return int(rtype)


def is_compressed_group(record: bytes) -> bool:
    return record_type(record) == REC_GROUP and bool(record[RECORD_OVERHEAD] & GROUP_FLAG_ZSTD)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + POLL_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def crash_store(tmp_path: Path, **options: Any) -> tuple[CrashFS, LocalFileStorage, Path]:
    fs = CrashFS(tmp_path)
    directory = tmp_path / "store"
    return fs, open_storage(fs, directory, **options), directory


# ---------------------------------------------------------------------- every kind of write
# (name, write, record type, compressed with compress_min_size=0, durable with sync="interval")
Step = tuple[str, Callable[[dict[str, Any]], None], int, bool, bool]


def _batch(h: dict[str, Any]) -> None:
    with h["root"].batch() as batch:
        batch["b1"] = "b" * 300
        batch["b2"] = "b" * 300
        batch.remove("absent")


def _flush(h: dict[str, Any]) -> None:
    memory = InMemoryStorage(h["root"])
    memory["m1"] = "m" * 300
    memory["m2"] = "m" * 300
    assert memory.flush(checkpoint={"offset": 42}) == 3


def _create(name: str, parent: str = "root") -> Callable[[dict[str, Any]], None]:
    def create(h: dict[str, Any]) -> None:
        h[name] = h[parent].get_or_create_sub_storage(name)

    return create


STEPS: Final[list[Step]] = [
    ("set", lambda h: h["root"].set("a", 1), REC_SET, False, False),
    ("overwrite", lambda h: h["root"].set("a", "x" * 100), REC_SET, False, False),
    ("delete", lambda h: h["root"].remove("a"), REC_DELETE, False, False),
    ("create sub-storage", _create("sub"), REC_CREATE_NS, False, False),
    ("set in it", lambda h: h["sub"].set("k", b"v"), REC_SET, False, False),
    ("create nested", _create("inner", "sub"), REC_CREATE_NS, False, False),
    ("clear", lambda h: h["sub"].clear(), REC_CLEAR, False, False),
    ("batch", _batch, REC_GROUP, True, False),
    ("flush with checkpoint", _flush, REC_GROUP, True, True),
    ("drop one", lambda h: h["root"].delete_sub_storage("sub"), REC_DROP_NS, False, False),
    ("create x", _create("x"), REC_CREATE_NS, False, False),
    ("create y", _create("y"), REC_CREATE_NS, False, False),
    ("drop several", lambda h: h["root"].delete_sub_storages(), REC_GROUP, False, False),
    ("set after", lambda h: h["root"].set("z", [1, 2, 3]), REC_SET, False, False),
]


@pytest.mark.parametrize("compress", [None, 0], ids=["plain", "compressed"])
@pytest.mark.parametrize("sync", ["always", "interval", "none"])
def test_every_kind_of_write_is_delivered_once_with_its_exact_bytes(
    tmp_path: Path, sync: str, compress: int | None
) -> None:
    fs, root, directory = crash_store(
        tmp_path, sync=sync, sync_interval=LONG, compress_min_size=compress, auto_compact=False
    )
    engine = root._engine
    listener = Recorder(engine, fs, "written" if sync == "none" else "durable")
    engine.add_commit_listener(listener)
    handles: dict[str, Any] = {"root": root}
    kinds: dict[int, tuple[str, int, bool]] = {}  # seq -> step name, type, compressed
    durable_seq = 0
    for name, step, rtype, compressed, durable_in_interval in STEPS:
        before = engine.appender.seq
        step(handles)
        seq = engine.appender.seq
        assert seq == before + 1, f"{name}: wrote {seq - before} records"
        kinds[seq] = (name, rtype, compressed and compress == 0)
        if sync != "interval" or durable_in_interval:
            durable_seq = seq
        # delivered by the time the write returns, and nothing not yet durable
        assert listener.seqs == list(range(1, durable_seq + 1)), name
    for name, handle in handles.items():
        if name != "root":
            handle.close()
    assert listener.seqs == list(range(1, engine.appender.seq + 1))  # closing a sub syncs
    root.close()
    listener.check()
    if sync == "none":  # as soon as written: before any fdatasync
        assert listener.unsynced_at_call == len(STEPS)

    in_files = records_in_files(directory)
    assert sorted(in_files) == listener.seqs == sorted(kinds)
    for seq, record in listener.delivered:
        name, rtype, compressed = kinds[seq]
        assert record == in_files[seq], name
        assert record_type(record) == rtype, name
        assert is_compressed_group(record) == compressed, name


# ---------------------------------------------------------------------- when: the sync rule
@pytest.mark.parametrize("trigger", ["flush", "engine sync", "roll", "close"])
def test_interval_delivers_nothing_until_a_sync_then_everything(
    tmp_path: Path, trigger: str
) -> None:
    fs, store, directory = crash_store(
        tmp_path, sync="interval", sync_interval=LONG, segment_size=4096, auto_compact=False
    )
    engine = store._engine
    listener = Recorder(engine, fs)
    engine.add_commit_listener(listener)
    syncs = fs.calls["fdatasync"]
    for i in range(5):
        store[f"k{i}"] = "v" * 100
    assert fs.calls["fdatasync"] == syncs
    assert listener.delivered == []
    written = engine.appender.seq
    if trigger == "flush":
        store.flush()
    elif trigger == "engine sync":
        engine.sync()
    elif trigger == "roll":
        segments = len(engine.segments.segments)
        while len(engine.segments.segments) == segments:
            assert listener.delivered == []
            store[f"k{engine.appender.seq}"] = "v" * 200
        written = engine.appender.seq - 1  # the record that rolled is in the new segment
    else:
        store.close()
    assert fs.calls["fdatasync"] > syncs
    assert listener.seqs == list(range(1, written + 1))
    if trigger != "close":
        store.close()
    listener.check()
    assert listener.seqs == sorted(records_in_files(directory))


def test_interval_background_sync_delivers_from_its_thread(tmp_path: Path) -> None:
    fs, store, directory = crash_store(tmp_path, sync="interval", sync_interval=0.01)
    engine = store._engine
    listener = Recorder(engine, fs)
    engine.add_commit_listener(listener)
    for i in range(20):
        store[f"k{i}"] = i
    wait_for(lambda: len(listener.delivered) == 20, "the interval sync")
    # (a write's own delivery may pass on what the thread had just synced)
    assert engine.syncer is not None and engine.syncer.worker.ident in listener.threads
    store.close()
    listener.check()
    assert listener.seqs == sorted(records_in_files(directory))


@pytest.mark.parametrize("sync", ["always", "none"])
def test_delivered_when_the_write_returns(tmp_path: Path, sync: str) -> None:
    fs, store, _directory = crash_store(tmp_path, sync=sync, segment_size=4096, auto_compact=False)
    engine = store._engine
    listener = Recorder(engine, fs, "written" if sync == "none" else "durable")
    engine.add_commit_listener(listener)
    for i in range(60):  # rolls a few segments
        store[f"k{i % 7}"] = "v" * 150
        assert listener.seqs == list(range(1, engine.appender.seq + 1))
    assert len(engine.segments.segments) > 2
    store.close()
    listener.check()
    assert listener.threads == {threading.get_ident()}
    if sync == "none":  # each one before the roll that synced it
        assert listener.unsynced_at_call == 60


# ---------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("with_model", [False, True], ids=["os", "crashfs"])
@pytest.mark.parametrize("sync", ["always", "none"])
def test_concurrent_writers_get_every_record_delivered_once_in_order(
    tmp_path: Path, sync: str, with_model: bool
) -> None:
    threads, per_thread = 4, 100
    directory = tmp_path / "store"
    fs: CrashFS | None = None
    options: dict[str, Any] = {"sync": sync, "segment_size": 16384, "auto_compact": False}
    if with_model:
        fs = CrashFS(tmp_path)
        store = open_storage(fs, directory, **options)
    else:
        store = LocalFileStorage(directory, **options)
    engine = store._engine
    listener = Recorder(engine, fs, "written" if sync == "none" else "durable")
    tokens: set[bytes] = set()

    def collect(_seq: int, record: bytes) -> None:  # (called under the recorder's lock)
        tokens.update(re.findall(rb"<t\d+-\d+>", record))
        time.sleep(0.0002)  # a slow listener: deliveries from several threads overlap

    listener.hook = collect
    engine.add_commit_listener(listener)
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                token = f"<t{t}-{i}>"
                store[f"t{t}-{i % 5}"] = token
                # acknowledged: durable, hence delivered already
                assert token.encode() in tokens, token
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    total = threads * per_thread
    assert listener.seqs == list(range(1, total + 1))
    assert len(tokens) == total
    assert fs is None or fs.calls["fdatasync"] < total  # (group commit shared some)
    store.close()
    listener.check()
    in_files = records_in_files(directory)
    assert sorted(in_files) == listener.seqs
    assert all(record == in_files[seq] for seq, record in listener.delivered)


# ---------------------------------------------------------------------- compaction
@pytest.mark.parametrize("sync", ["always", "interval"])
def test_compaction_copies_are_not_delivered(tmp_path: Path, sync: str) -> None:
    directory = tmp_path / "store"
    store = LocalFileStorage(
        directory, sync=sync, sync_interval=LONG, segment_size=4096, auto_compact=False
    )
    engine = store._engine
    listener = Recorder(engine)
    engine.add_commit_listener(listener)
    for i in range(150):
        store[f"k{i % 5}"] = f"{i}:" + "v" * 100
    written = engine.appender.seq
    original = records_in_files(directory)  # (the active segment's too: written, not synced)
    if sync == "always":
        assert listener.seqs == list(range(1, written + 1))
    result = store.compact()
    assert result.output is not None and result.records > 0
    if sync == "interval":
        store.flush()  # the compaction's roll made them durable: delivered now
    assert listener.seqs == list(range(1, written + 1))
    assert all(record == original[seq] for seq, record in listener.delivered)
    store["after"] = 1
    assert listener.seqs[-1] == written + 1 or sync == "interval"
    store.close()
    listener.check()
    assert listener.seqs == list(range(1, written + 2))


# ---------------------------------------------------------------------- a listener that raises
def fail_once_at(seqs: set[int]) -> Callable[[int, bytes], None]:
    """Raise ListenerError at the first call for each of ``seqs``."""
    pending = set(seqs)

    def fail(seq: int, _record: bytes) -> None:
        if seq in pending:
            pending.discard(seq)
            raise ListenerError(seq)

    return fail


@pytest.mark.parametrize("sync", ["always", "none"])
def test_a_raising_listener_gets_the_record_again_at_the_next_write(
    tmp_path: Path, sync: str
) -> None:
    directory = tmp_path / "store"
    store = LocalFileStorage(directory, sync=sync)
    engine = store._engine
    listener = Recorder(engine, hook=fail_once_at({1}))
    engine.add_commit_listener(listener)
    with pytest.raises(ListenerError):
        store["a"] = 1  # the write is done (and durable) all the same
    assert store["a"] == 1
    assert listener.delivered == [] and listener.attempts == [1]
    store["b"] = 2
    assert listener.seqs == [1, 2]
    store["c"] = 3
    store.flush()
    store.close()
    listener.check()
    assert listener.attempts == [1, 1, 2, 3]
    assert listener.seqs == [1, 2, 3] == sorted(records_in_files(directory))


def test_a_raising_listener_raises_in_the_flush_that_delivered(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = LocalFileStorage(directory, sync="interval", sync_interval=LONG)
    engine = store._engine
    listener = Recorder(engine, hook=fail_once_at({2}))
    engine.add_commit_listener(listener)
    store["a"] = 1
    store["b"] = 2
    store["c"] = 3
    with pytest.raises(ListenerError):
        store.flush()
    assert listener.seqs == [1] and listener.attempts == [1, 2]
    store.flush()
    assert listener.seqs == [1, 2, 3]
    store["d"] = 4
    store.flush()
    store.close()
    listener.check()
    assert listener.attempts == [1, 2, 2, 3, 4]
    assert listener.seqs == [1, 2, 3, 4] == sorted(records_in_files(directory))


def test_a_raising_listener_does_not_stop_the_interval_sync(tmp_path: Path) -> None:
    fs, store, directory = crash_store(tmp_path, sync="interval", sync_interval=0.01)
    engine = store._engine
    listener = Recorder(engine, fs, hook=fail_once_at({1}))
    engine.add_commit_listener(listener)
    store["a"] = 1
    wait_for(lambda: listener.attempts == [1], "the failed delivery")
    store["b"] = 2
    # the sync thread still syncs and delivers: record 1 again, then 2
    wait_for(lambda: listener.seqs == [1, 2], "the next background delivery")
    assert engine.syncer is not None and engine.syncer.worker.is_alive()
    assert engine.failed is None
    store["c"] = 3
    wait_for(lambda: listener.seqs == [1, 2, 3], "a later background delivery")
    store.close()
    listener.check()
    assert listener.attempts == [1, 1, 2, 3]
    assert sorted(records_in_files(directory)) == [1, 2, 3]


def test_a_listener_raising_at_close_raises_from_close_and_releases(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = LocalFileStorage(directory, sync="interval", sync_interval=LONG)
    engine = store._engine
    listener = Recorder(engine, hook=fail_once_at({1}))
    engine.add_commit_listener(listener)
    store["a"] = 1
    for i in range(100):  # enough data for an index snapshot smaller than it
        store[f"k{i}"] = "v" * 200
    with pytest.raises(ListenerError):
        store.close()
    assert engine.closed and store.closed
    with LocalFileStorage(directory) as again:  # released: opens (a new engine)
        assert again._engine is not engine
        assert again["a"] == 1
        # the listener ran after the index snapshot was saved: it cost nothing
        assert again.report.snapshot_used


# ---------------------------------------------------------------------- no gap in seqs
def test_a_group_refused_as_too_large_leaves_no_gap_in_seqs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalFileStorage(tmp_path / "store", sync="none")
    engine = store._engine
    listener = Recorder(engine)
    engine.add_commit_listener(listener)
    store["a"] = 1
    # the same path as a group of more than 1 GiB, at a size a test can afford
    monkeypatch.setattr(logstate._format, "MAX_RECORD_SIZE", 4096)
    with pytest.raises(ValueError, match="exceeds the limit"), store.batch() as batch:
        batch["big1"] = "x" * 3000
        batch["big2"] = "y" * 3000
    monkeypatch.undo()
    assert "big1" not in store
    store["b"] = 2
    store.close()
    listener.check()  # consecutive
    assert listener.seqs == [1, 2]


# ---------------------------------------------------------------------- adding a listener
def test_a_second_listener_is_refused(tmp_path: Path) -> None:
    store = LocalFileStorage(tmp_path / "store", sync="none")
    engine = store._engine
    first = Recorder(engine)
    engine.add_commit_listener(first)
    with pytest.raises(ValueError, match="already"):
        engine.add_commit_listener(Recorder(engine))
    store["a"] = 1
    store.close()
    assert first.seqs == [1]


def test_a_read_only_storage_refuses_a_listener(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    with LocalFileStorage(directory) as store:
        store["a"] = 1
    with LocalFileStorage(directory, read_only=True) as reader:
        engine = reader._engine
        with pytest.raises(ReadOnlyStorageError):
            engine.add_commit_listener(Recorder(engine))


def test_a_closed_storage_refuses_a_listener(tmp_path: Path) -> None:
    store = LocalFileStorage(tmp_path / "store")
    engine = store._engine
    store.close()
    with pytest.raises(StorageClosedError):
        engine.add_commit_listener(Recorder(engine))


def test_a_failed_storage_refuses_a_listener(tmp_path: Path) -> None:
    fs, store, _directory = crash_store(tmp_path, sync="always")
    engine = store._engine
    fs.fail_nth("append", 1)
    with pytest.raises(OSError):
        store["a"] = 1
    with pytest.raises(StorageFailedError):
        engine.add_commit_listener(Recorder(engine))
    store.close()


# ---------------------------------------------------------------------- interrupted bookkeeping
def test_a_record_already_queued_or_delivered_is_never_queued_or_delivered_again(
    tmp_path: Path,
) -> None:
    """What settle and deliver check after an interrupt cut their bookkeeping short."""
    store = LocalFileStorage(tmp_path / "store", sync="interval", sync_interval=LONG)
    engine = store._engine
    seen: list[int] = []
    engine.add_commit_listener(lambda seq, record: seen.append(seq))
    store["a"] = 1
    appender = engine.appender
    seq = appender.seq
    assert appender._queued(seq)  # queued: a settle of it must not queue it again
    assert not appender._queued(seq + 1)
    engine.sync()
    assert seen == [seq]
    assert appender._queued(seq)  # delivered counts as queued
    # an interrupt between the listener's return and the pop: the entry is still there
    appender._undelivered.appendleft((seq, 0, b"record"))
    engine.sync()
    appender.deliver(appender.written_pos)
    assert seen == [seq]  # not delivered twice
    assert not appender._undelivered
    store.close()


class _InterruptingFS(CrashFS):
    """Raises KeyboardInterrupt in the chosen ``append`` calls, before writing anything."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self.interrupt_next = False

    def append(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        if self.interrupt_next:
            self.interrupt_next = False
            raise KeyboardInterrupt
        super().append(fd, data)


@pytest.mark.parametrize("sync", ["none", "always"])
def test_a_write_an_interrupt_cut_takes_no_seq(tmp_path: Path, sync: str) -> None:
    # seqs stay contiguous: a changelog checks every seq follows the last one
    fs = _InterruptingFS(tmp_path)
    storage = open_storage(fs, tmp_path / "s", sync=sync, segment_size=4096)
    seen: list[int] = []
    storage._engine.add_commit_listener(lambda seq, _record: seen.append(seq))
    for i in range(40):  # the interrupted writes take both paths: in place and rolling
        fs.interrupt_next = True
        with pytest.raises(KeyboardInterrupt):
            storage[f"k{i}"] = "x" * 200
        storage[f"k{i}"] = "y" * 200
        fs.interrupt_next = True
        with pytest.raises(KeyboardInterrupt):
            del storage[f"k{i}"]  # (a record through Appender.write)
        assert fs.interrupt_next is False
    storage.flush()
    assert seen == list(range(1, len(seen) + 1))
    assert storage._engine.appender.seq == len(seen) == 40
    storage.close()
