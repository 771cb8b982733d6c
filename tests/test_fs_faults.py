"""File-system faults: a failing write or sync is reported once, then writes are refused.

A :class:`FaultyFS` (a subclass of logstate._fs.FileSystem, injected through
``acquire_engine``) fails the Nth ``append`` or ``fdatasync`` with EIO or
ENOSPC, optionally after writing part of the data. The promises checked:
the failing call raises that OSError itself; every later write raises
StorageFailedError whose __cause__ is it, and nothing more is written or
synced (a failed fsync is never retried and then reported as a success);
reads keep working; reopening with the normal file system yields the state
from before or after the failed call, never anything else.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from logstate import Batch, LocalFileStorage, StorageFailedError, _engine, _options, _registry
from logstate._fs import FileSystem
from tests.helpers import State, observed_state


class FaultyFS(FileSystem):
    """Fails a chosen call (the Nth append or fdatasync from now) and counts every call."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"append": 0, "fdatasync": 0}
        self._plan: dict[str, tuple[int, int, bool]] = {}  # call -> (nth, errno, partial)
        self.raised: OSError | None = None
        self.before_failing: threading.Event | None = None  # waited on before raising

    def fail(self, call: str, nth: int = 1, error: int = errno.EIO, partial: bool = False) -> None:
        """Make the ``nth`` next ``call`` fail with ``error``.

        Args:
            partial: for append, write the first half of the data before failing
                (a short write that then hits ENOSPC/EIO).
        """
        self._plan[call] = (self.calls[call] + nth, error, partial)

    def _maybe_fail(self, call: str) -> tuple[bool, int]:
        self.calls[call] += 1
        plan = self._plan.get(call)
        if plan is None or plan[0] != self.calls[call]:
            return False, 0
        del self._plan[call]
        return plan[2], plan[1]

    def _raise(self, error: int) -> None:
        if self.before_failing is not None:
            self.before_failing.wait(timeout=30)
        self.raised = OSError(error, os.strerror(error))
        raise self.raised

    def append(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        partial, error = self._maybe_fail("append")
        if error:
            if partial:
                super().append(fd, memoryview(data)[: len(data) // 2])
            self._raise(error)
        super().append(fd, data)

    def fdatasync(self, fd: int) -> None:
        _partial, error = self._maybe_fail("fdatasync")
        if error:
            self._raise(error)
        super().fdatasync(fd)


def open_with(fs: FileSystem, directory: Path, **options: Any) -> LocalFileStorage:
    """A public handle on an engine that uses ``fs``."""
    engine = _registry.acquire_engine(str(directory), options, create=True, fs=fs)
    handle = LocalFileStorage(directory)
    _registry.release_engine(engine)  # the handle now holds the only reference
    assert handle._engine is engine
    return handle


def populate(s: LocalFileStorage) -> None:
    s["a"] = "old"
    s["b"] = 1
    s.get_or_create_sub_storage("sub")["x"] = [1, 2]


# the operation that hits the fault, and the state it leads to when it succeeds
def op_set(s: LocalFileStorage) -> None:
    s["a"] = "new"


def op_batch(s: LocalFileStorage) -> None:
    with s.batch() as b:
        b.set("a", "new")
        b.set("c", 3)
        b.remove("b")


def op_clear(s: LocalFileStorage) -> None:
    s.clear()


def op_create_sub(s: LocalFileStorage) -> None:
    s.get_or_create_sub_storage("fresh")


def op_delete_sub(s: LocalFileStorage) -> None:
    s.delete_sub_storage("sub")


BEFORE: State = {"": {"a": "old", "b": 1}, "sub": {"x": [1, 2]}}
OPERATIONS: dict[str, tuple[Callable[[LocalFileStorage], None], State]] = {
    "set": (op_set, {"": {"a": "new", "b": 1}, "sub": {"x": [1, 2]}}),
    "batch": (op_batch, {"": {"a": "new", "c": 3}, "sub": {"x": [1, 2]}}),
    "clear": (op_clear, {"": {}}),
    "create_sub": (op_create_sub, {**BEFORE, "fresh": {}}),
    "delete_sub": (op_delete_sub, {"": {"a": "old", "b": 1}}),
}

FAULTS = {
    # name: (failing call, errno, partial write, sync mode)
    "append-EIO": ("append", errno.EIO, False, "none"),
    "append-ENOSPC-short-write": ("append", errno.ENOSPC, True, "none"),
    "fdatasync-EIO-sync-always": ("fdatasync", errno.EIO, False, "always"),
    "fdatasync-ENOSPC-sync-always": ("fdatasync", errno.ENOSPC, False, "always"),
}


def batch_of_one(s: LocalFileStorage) -> Batch:
    batch = s.batch()
    batch.set("y", 1)
    return batch


LATER_WRITES: dict[str, Callable[[LocalFileStorage], object]] = {
    "set": lambda s: s.set("z", 1),
    "setitem": lambda s: s.__setitem__("b", 2),
    "remove-existing": lambda s: s.remove("b"),
    "remove-missing": lambda s: s.remove("missing"),
    "clear": lambda s: s.clear(),
    "batch": lambda s: batch_of_one(s).commit(),
    "create-sub": lambda s: s.get_or_create_sub_storage("other"),
    "delete-sub": lambda s: s.delete_sub_storage("sub"),
    "delete-subs": lambda s: s.delete_sub_storages(),
    "flush": lambda s: s.flush(),
}


@pytest.fixture
def faulty() -> Iterator[FaultyFS]:
    fs = FaultyFS()
    yield fs
    left_open = [e for e in _registry.open_engines() if e.fs is fs]
    for engine in left_open:
        engine.close()
    assert left_open == [], "engine left open"


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_failed_write_raises_the_os_error_then_refuses_writes_and_reopens_to_before_or_after(
    tmp_path: Path, faulty: FaultyFS, fault: str, operation: str
) -> None:
    call, error, partial, sync = FAULTS[fault]
    run, after = OPERATIONS[operation]
    directory = tmp_path / "store"
    s = open_with(faulty, directory, sync=sync)
    populate(s)
    sub = s.get_or_create_sub_storage("sub")
    faulty.fail(call, error=error, partial=partial)

    with pytest.raises(OSError) as info:
        run(s)
    assert info.value is faulty.raised
    assert info.value.errno == error
    calls = dict(faulty.calls)

    for name, write in LATER_WRITES.items():
        with pytest.raises(StorageFailedError, match="refuses writes") as refused:
            write(s)
            pytest.fail(f"{name} was accepted after the failure")
        assert refused.value.__cause__ is faulty.raised, name
    with pytest.raises(StorageFailedError):
        sub["x"] = 0
    assert faulty.calls == calls, "nothing may be written or synced after the failure"

    # reads still work
    if operation not in ("batch", "clear"):
        assert s["b"] == 1
    assert s.get("a") in ("old", "new", None)
    if operation not in ("clear", "delete_sub"):
        assert sub["x"] == [1, 2]
    assert observed_state(s) in (BEFORE, after)

    sub.close()
    s.close()  # no final sync on a failed storage, and no error
    assert faulty.calls == calls

    with LocalFileStorage(directory, sync="none") as again:
        again._check()
        state = observed_state(again)
        assert state in (BEFORE, after)
        if call == "append":
            assert state == BEFORE  # the record never reached the file whole
        assert bool(again._engine.report.torn_tails) == partial
        again["after reopen"] = True  # writable again
    with LocalFileStorage(directory, sync="none") as again:
        assert again["after reopen"] is True
        assert again._engine.report.clean


def test_failed_fsync_with_sync_always_is_not_retried_or_acknowledged(
    tmp_path: Path, faulty: FaultyFS
) -> None:
    s = open_with(faulty, tmp_path / "store", sync="always")
    s["a"] = 1
    faulty.fail("fdatasync")
    syncs = faulty.calls["fdatasync"]
    with pytest.raises(OSError):
        s["a"] = 2
    assert faulty.calls["fdatasync"] == syncs + 1
    for _ in range(3):
        with pytest.raises(StorageFailedError):
            s.flush()
        with pytest.raises(StorageFailedError):
            s["a"] = 3
    assert faulty.calls["fdatasync"] == syncs + 1, "a failed fsync must not be retried"
    s.close()
    assert faulty.calls["fdatasync"] == syncs + 1, "close must not sync a failed storage"


def test_writers_sharing_a_failed_group_sync_all_get_an_error(
    tmp_path: Path, faulty: FaultyFS
) -> None:
    s = open_with(faulty, tmp_path / "store", sync="always")
    s["warm"] = 0
    release = threading.Event()
    faulty.before_failing = release
    faulty.fail("fdatasync")
    outcomes: dict[str, BaseException | None] = {}

    def writer(key: str) -> None:
        try:
            s[key] = key
            outcomes[key] = None
        except BaseException as exc:
            outcomes[key] = exc

    syncs = faulty.calls["fdatasync"]
    first = threading.Thread(target=writer, args=("first",))
    first.start()
    while faulty.calls["fdatasync"] == syncs:  # wait until it is inside the failing sync
        time.sleep(0.001)
    others = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(3)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 30
    while len(s) < 5 and time.monotonic() < deadline:  # all appended, waiting for a sync
        time.sleep(0.001)
    release.set()
    for t in [first, *others]:
        t.join(timeout=30)
    assert isinstance(outcomes["first"], OSError)
    for key in ("w0", "w1", "w2"):
        outcome = outcomes[key]
        assert isinstance(outcome, (OSError, StorageFailedError)), (key, outcome)
    assert faulty.calls["fdatasync"] == syncs + 1, "the waiting writers must not sync again"
    s.close()


def test_failed_background_sync_refuses_later_writes(tmp_path: Path, faulty: FaultyFS) -> None:
    s = open_with(faulty, tmp_path / "store", sync="interval", sync_interval=0.01)
    faulty.fail("fdatasync")
    s["a"] = 1  # acknowledged at once: "interval" promises only a later sync
    deadline = time.monotonic() + 10
    while faulty.raised is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert faulty.raised is not None
    time.sleep(0.02)
    with pytest.raises(StorageFailedError) as info:
        s["b"] = 2
    assert info.value.__cause__ is faulty.raised
    assert s["a"] == 1
    s.close()
    with LocalFileStorage(tmp_path / "store", sync="none") as again:
        assert again["a"] == 1 and "b" not in again


def test_failed_sync_while_rolling_to_a_new_segment_refuses_writes(
    tmp_path: Path, faulty: FaultyFS
) -> None:
    directory = tmp_path / "store"
    s = open_with(faulty, directory, sync="none", segment_size=4096)
    written = {}
    for i in range(15):
        written[f"k{i}"] = "v" * 200
        s[f"k{i}"] = written[f"k{i}"]
    assert len(list(directory.glob("segment-*.seg"))) == 1
    faulty.fail("fdatasync")  # with sync="none", the next one seals the full segment
    with pytest.raises(OSError):
        for i in range(15, 30):
            s[f"k{i}"] = "v" * 200
            written[f"k{i}"] = "v" * 200
    with pytest.raises(StorageFailedError):
        s["more"] = 1
    assert dict(s.items()) == written
    s.close()
    with LocalFileStorage(directory, sync="none", segment_size=4096) as again:
        again._check()
        assert dict(again.items()) == written
        again["more"] = 1
        assert again["more"] == 1


def test_failed_open_releases_the_directory(tmp_path: Path, faulty: FaultyFS) -> None:
    directory = tmp_path / "store"
    faulty.fail("fdatasync")  # the first segment's header sync
    with pytest.raises(OSError):
        _registry.acquire_engine(str(directory), {}, create=True, fs=faulty)
    with LocalFileStorage(directory, sync="none") as s:
        s["k"] = 1
    with LocalFileStorage(directory, sync="none") as s:
        assert s["k"] == 1


def test_engine_constructed_directly_on_a_faulty_fs_refuses_writes_after_a_failure(
    tmp_path: Path, faulty: FaultyFS
) -> None:
    directory = tmp_path / "store"
    directory.mkdir()
    options = _options.validate_options({"sync": "none"})
    engine = _engine.Engine(str(directory), options, faulty)
    s = LocalFileStorage._new_handle(engine, "", True)  # the handle's reference closes it
    s["k"] = 1
    faulty.fail("append", error=errno.ENOSPC)
    with pytest.raises(OSError) as info:
        s["j"] = 2
    assert info.value.errno == errno.ENOSPC
    assert engine.failed is faulty.raised
    with pytest.raises(StorageFailedError):
        s.remove("k")
    assert s["k"] == 1 and "j" not in s
    s.close()
    assert engine.closed
    with LocalFileStorage(directory, sync="none") as again:
        assert dict(again.items()) == {"k": 1}
