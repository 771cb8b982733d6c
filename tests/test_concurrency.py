"""Concurrency scenarios: threads sharing one storage, processes contending for a directory.

Threads: writers with sync="always" share fdatasyncs (group commit) and every
acknowledged write is durable and survives reopen; readers running during
writes (and segment rolls) never see an error or a wrong value.
Processes: one directory has one writer process; another one gets
StorageLockedError naming the holder, and can open once the holder is gone.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from logstate import LocalFileStorage, StorageFailedError, StorageLockedError, _registry
from logstate._commit import GroupCommit, NativeCommit
from logstate._fs import FileSystem
from logstate._location import unpack_location
from logstate._native import EXT

# ============================================================================ threads


class SlowSyncFS(FileSystem):
    """fdatasync takes a while (so writers pile up) and records what it covered."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.fdatasyncs = 0
        self.durable_size: dict[int, int] = {}  # fd -> bytes known durable
        self._mutex = threading.Lock()

    def fdatasync(self, fd: int) -> None:
        covered = self.file_size(fd)  # bytes present when the sync starts
        time.sleep(self.delay_s)
        super().fdatasync(fd)
        with self._mutex:
            self.fdatasyncs += 1
            self.durable_size[fd] = max(self.durable_size.get(fd, 0), covered)


def run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    """Run the targets in threads; return what they raised."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported to the test
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "thread hung"
    return errors


def record_end(storage: LocalFileStorage, key: str) -> tuple[int, int]:
    """(fd of the segment, end offset) of the record holding ``key`` (root namespace).

    Decodes the engine's packed location (see the _location module docstring).
    """
    engine = storage._engine
    loc = engine.keydir.namespaces[""][key]
    assert isinstance(loc, int)
    number, offset, size, _kind = unpack_location(loc)
    segment = engine.segments.segments[number]
    return segment.fd, offset + size


def test_threads_writing_with_sync_always_share_syncs_and_every_write_survives(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    fs = SlowSyncFS(delay_s=0.003)
    engine = _registry.acquire_engine(str(directory), {"sync": "always"}, create=True, fs=fs)
    storage = LocalFileStorage(directory)
    _registry.release_engine(engine)  # the handle holds the only reference now
    writers, per_writer = 8, 20
    not_durable: list[str] = []

    def writer(w: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(per_writer):
                key = f"w{w}-{i}"
                storage[key] = (w, i)
                # acknowledged: its record must already be covered by a sync
                fd, end = record_end(storage, key)
                if fs.durable_size.get(fd, 0) < end:
                    not_durable.append(key)

        return run

    syncs_before = fs.fdatasyncs
    errors = run_threads([writer(w) for w in range(writers)])
    assert errors == []
    assert not_durable == []
    writes = writers * per_writer
    syncs = fs.fdatasyncs - syncs_before
    # 8 writers and a 3 ms sync: each sync should cover the records of the
    # writers that arrived during the previous one (about 4 here; a lock
    # handed from waiter to waiter gave about 2, i.e. 64-80 syncs)
    assert syncs <= writes // 3, f"{syncs} syncs for {writes} writes: poor group commit"
    storage.close()

    with LocalFileStorage(directory) as s:
        s._check()
        assert len(s) == writes
        for w in range(writers):
            for i in range(per_writer):
                assert s[f"w{w}-{i}"] == (w, i)


class FailingSyncFS(SlowSyncFS):
    """The Nth fdatasync (slow, so writers are waiting on it) fails with EIO."""

    def __init__(self, delay_s: float, fail_at: int) -> None:
        super().__init__(delay_s)
        self.fail_at = fail_at

    def fdatasync(self, fd: int) -> None:
        if self.fdatasyncs + 1 == self.fail_at:
            time.sleep(self.delay_s)
            with self._mutex:
                self.fdatasyncs += 1
            raise OSError(errno.EIO, "injected fdatasync failure")
        super().fdatasync(fd)


def test_writers_waiting_on_a_failed_group_sync_all_fail_and_none_hangs(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    fs = FailingSyncFS(delay_s=0.02, fail_at=3)  # open syncs once; then the writers
    engine = _registry.acquire_engine(str(directory), {"sync": "always"}, create=True, fs=fs)
    storage = LocalFileStorage(directory)
    _registry.release_engine(engine)
    acknowledged: list[str] = []
    outcomes: list[BaseException] = []
    mutex = threading.Lock()

    def writer(w: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(10):
                key = f"w{w}-{i}"
                try:
                    storage[key] = i
                except (OSError, StorageFailedError) as exc:
                    with mutex:
                        outcomes.append(exc)
                    return
                fd, end = record_end(storage, key)
                assert fs.durable_size.get(fd, 0) >= end, f"{key} acknowledged, not durable"
                with mutex:
                    acknowledged.append(key)

        return run

    errors = run_threads([writer(w) for w in range(6)])
    assert errors == []
    # every writer ended on the failure: the one whose sync failed gets the
    # OSError, the ones waiting on it StorageFailedError (never a hang, never
    # an acknowledgement of a record the failed sync was to cover)
    assert len(outcomes) == 6
    assert sum(isinstance(e, OSError) for e in outcomes) == 1
    assert all(isinstance(e, (OSError, StorageFailedError)) for e in outcomes)
    with pytest.raises(StorageFailedError):
        storage["after"] = 1
    storage.close()
    with LocalFileStorage(directory) as s:
        for key in acknowledged:
            assert key in s


def test_readers_during_writes_never_see_errors_or_wrong_values(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    storage = LocalFileStorage(directory, sync="none", segment_size=4096)  # rolls often
    keys, rounds = 20, 200
    done = threading.Event()
    wrong: list[str] = []

    def writer(first: int) -> Callable[[], None]:
        def run() -> None:
            for version in range(rounds):
                for k in range(first, keys, 2):
                    storage[f"k{k}"] = f"k{k} v{version:04d} " + "x" * (k * 7)
                if version % 10 == 0:
                    with storage.batch() as b:
                        b.set(f"g{first}", version)
                        b.set(f"h{first}", version)

        return run

    def reader() -> None:
        last_seen: dict[str, int] = {}
        while not done.is_set():
            for k in range(keys):
                key = f"k{k}"
                value = storage.get(key)
                if value is None:
                    continue
                prefix, version, filler = value.split(" ")
                if prefix != key or filler != "x" * (k * 7):
                    wrong.append(f"{key}: {value[:40]!r}")
                v = int(version[1:])
                if v < last_seen.get(key, -1):
                    wrong.append(f"{key}: went back from v{last_seen[key]} to v{v}")
                last_seen[key] = v
            for first in (0, 1):
                g, h = storage.get(f"g{first}"), storage.get(f"h{first}")
                if g is not None and h is None:
                    wrong.append("a batch was seen half applied")
            if len(storage) > 2 * keys:
                wrong.append(f"{len(storage)} keys")
            for key in list(storage):
                if not key.startswith(("g", "h", "k")):
                    wrong.append(f"unknown key {key!r}")

    def writers_then_done() -> None:
        errors = run_threads([writer(0), writer(1)])
        done.set()
        if errors:
            raise errors[0]

    errors = run_threads([writers_then_done, reader, reader])
    assert errors == []
    assert wrong == []
    assert len(list(directory.glob("segment-*.seg"))) > 3
    storage._check()
    storage.close()
    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        for k in range(keys):
            assert s[f"k{k}"].startswith(f"k{k} v{rounds - 1:04d} ")


def test_sub_storages_created_concurrently_all_exist(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    storage = LocalFileStorage(directory, sync="none")

    def creator(t: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(20):
                sub = storage.get_or_create_sub_storage(f"s{i}")
                sub[f"t{t}"] = i
                sub.close()

        return run

    assert run_threads([creator(t) for t in range(4)]) == []
    storage.close()
    with LocalFileStorage(directory, sync="none") as s:
        s._check()
        assert s.get_sub_storages() == sorted(f"s{i}" for i in range(20))
        for i in range(20):
            assert dict(s.get_or_create_sub_storage(f"s{i}").items()) == {
                f"t{t}": i for t in range(4)
            }


# ============================================================================ processes

OPEN_IN_CHILD = """
import sys
from logstate import LocalFileStorage, StorageLockedError
try:
    s = LocalFileStorage(sys.argv[1], sync="none")
except StorageLockedError as exc:
    print(exc.pid)
    print(exc.path)
    print(exc)
    sys.exit(3)
s["written by"] = "child"
s.close()
"""

HOLD_IN_CHILD = """
import sys
from logstate import LocalFileStorage
s = LocalFileStorage(sys.argv[1], sync="none")
s["held by"] = "child"
print("ready", flush=True)
sys.stdin.readline()
s.close()
"""


def run_child(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", OPEN_IN_CHILD, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_second_process_gets_storage_locked_error_naming_the_holder(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    storage = LocalFileStorage(directory, sync="none")
    storage["k"] = 1
    result = run_child(directory)
    assert result.returncode == 3, result.stderr
    pid, path, message = result.stdout.splitlines()[:3]
    assert int(pid) == os.getpid()
    assert path == storage.path
    assert str(os.getpid()) in message and storage.path in message

    storage.close()
    result = run_child(directory)
    assert result.returncode == 0, result.stdout + result.stderr
    with LocalFileStorage(directory, sync="none") as s:
        assert s["written by"] == "child" and s["k"] == 1


def test_directory_held_by_another_process_raises_here_until_it_exits(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_CHILD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StorageLockedError) as info:
            LocalFileStorage(directory)
        assert info.value.pid == child.pid
        assert str(child.pid) in str(info.value)
        assert info.value.path == os.path.realpath(directory)
        with pytest.raises(StorageLockedError):  # the failed open left nothing behind
            LocalFileStorage(directory)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with LocalFileStorage(directory, sync="none") as s:
        assert s["held by"] == "child"


WRITE_THEN_WAIT_IN_CHILD = """
import sys, time
from logstate import LocalFileStorage
s = LocalFileStorage(sys.argv[1], sync="none")
for i in range(200):
    s[f"k{i}"] = i
print("written", flush=True)
time.sleep(60)
"""


def test_sigkilled_holder_releases_the_lock_and_its_acknowledged_writes_survive(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITE_THEN_WAIT_IN_CHILD, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written"
        with pytest.raises(StorageLockedError):
            LocalFileStorage(directory)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    with LocalFileStorage(directory, sync="none") as s:  # sync="none" survives SIGKILL
        s._check()
        assert dict(s.items()) == {f"k{i}": i for i in range(200)}


class FailNextSyncFS(FileSystem):
    """The next fdatasync after ``arm()`` fails with EIO, then calls ``on_fail``."""

    def __init__(self) -> None:
        self.armed = False
        self.on_fail: Callable[[], None] = lambda: None

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            self.armed = False
            self.on_fail()
            raise OSError(errno.EIO, "injected fdatasync failure")
        super().fdatasync(fd)


def test_a_writer_racing_a_close_whose_sync_fails_is_not_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression (review): close()'s fdatasync failed, then a sync="always"
    # writer whose record was already appended synced again and was
    # acknowledged (fsyncgate), or synced a descriptor close() had released.
    fs = FailNextSyncFS()
    in_commit, go = threading.Event(), threading.Event()
    # the engine's class: the C protocol (NativeCommit) on the C path
    commit_class = GroupCommit if EXT is None else NativeCommit
    commit = commit_class.commit

    def held_commit(self: GroupCommit, end_pos: int) -> None:
        if threading.current_thread().name == "writer":
            in_commit.set()  # appended, not yet synced: held here
            go.wait(10)
        commit(self, end_pos)

    # (patched before the open: the writer binds the commit method at open)
    monkeypatch.setattr(commit_class, "commit", held_commit)
    engine = _registry.acquire_engine(str(tmp_path), {"sync": "always"}, create=True, fs=fs)
    storage = LocalFileStorage(tmp_path)
    _registry.release_engine(engine)
    outcome: list[object] = []

    def writer() -> None:
        try:
            storage["late"] = 1
            outcome.append("acknowledged")
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=writer, name="writer")
    thread.start()
    assert in_commit.wait(10)
    fs.armed = True
    fs.on_fail = go.set  # the writer goes on while close()'s sync is failing
    with pytest.raises(OSError, match="injected"):
        engine.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], StorageFailedError), outcome
