"""What ``close()`` guarantees: every handle's close syncs; the last one also unlocks.

Handles share one engine per directory (sub-storages, repeated opens in one
process). Closing any of them makes everything written so far durable
(fdatasync); the engine, its files and the directory lock go with the last
handle. A SIGTERM turned into SystemExit, with the program closing its
storage on the way out, loses no acknowledged write even with
``sync="interval"`` and a long interval.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from logstate import LocalFileStorage, StorageClosedError, StorageLockedError, _registry
from logstate._format import SEGMENT_HEADER_SIZE
from logstate._fs import OS_FS, FileSystem


class CountingFS(FileSystem):
    """Counts fdatasync calls."""

    def __init__(self) -> None:
        self.fdatasyncs = 0

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        self.fdatasyncs += 1


def open_with(fs: FileSystem, directory: Path, **options: object) -> LocalFileStorage:
    """A public handle on an engine that uses ``fs`` (the handle holds the only reference)."""
    engine = _registry.acquire_engine(str(directory), options, create=True, fs=fs)
    try:
        return LocalFileStorage(directory)
    finally:
        _registry.release_engine(engine)


def lock_is_held(directory: Path) -> bool:
    """True when the directory's flock is held (by any open file description)."""
    try:
        fd = OS_FS.lock_dir(str(directory))
    except StorageLockedError:
        return True
    OS_FS.unlock_dir(fd)
    return False


@pytest.mark.parametrize("sync", ["none", "interval"])
def test_root_close_syncs_while_a_sub_storage_handle_keeps_the_directory_open(
    tmp_path: Path, sync: str
) -> None:
    fs = CountingFS()
    root = open_with(fs, tmp_path, sync=sync, sync_interval=60.0)
    sub = root.get_or_create_sub_storage("sub")
    root.set("written-through-root", 1)
    sub.set("written-through-sub", 2)
    before = fs.fdatasyncs
    root.close()
    assert fs.fdatasyncs == before + 1, "close() of the root must sync"
    assert root.closed and not sub.closed
    assert lock_is_held(tmp_path), "the lock goes with the last handle"
    with pytest.raises(StorageClosedError):
        root.get("written-through-root")
    sub.set("after-root-close", 3)
    before = fs.fdatasyncs
    sub.close()
    assert fs.fdatasyncs > before
    assert not lock_is_held(tmp_path)
    with LocalFileStorage(tmp_path) as reopened:
        assert reopened["written-through-root"] == 1
        with reopened.get_or_create_sub_storage("sub") as again:
            assert dict(again.items()) == {"written-through-sub": 2, "after-root-close": 3}


def test_sub_storage_close_syncs_and_a_second_close_does_nothing(tmp_path: Path) -> None:
    fs = CountingFS()
    root = open_with(fs, tmp_path, sync="none")
    sub = root.get_or_create_sub_storage("sub")
    sub.set("k", 1)
    before = fs.fdatasyncs
    sub.close()
    assert fs.fdatasyncs == before + 1
    sub.close()
    root.close()  # nothing new written since: the last close syncs once more, as always
    assert fs.fdatasyncs == before + 2


def test_close_of_a_read_only_handle_does_not_sync(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path) as writer:
        writer.get_or_create_sub_storage("sub").close()
    fs = CountingFS()
    engine = _registry.acquire_engine(str(tmp_path), {"read_only": True}, create=False, fs=fs)
    root = LocalFileStorage(tmp_path, read_only=True)
    _registry.release_engine(engine)
    sub = root.get_or_create_sub_storage("sub")
    root.close()
    sub.close()
    assert fs.fdatasyncs == 0


# ---------------------------------------------------------------------- SIGTERM
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from logstate import LocalFileStorage, _registry
    from logstate._fs import FileSystem

    class LoggedFS(FileSystem):
        def fdatasync(self, fd):
            super().fdatasync(fd)
            sys.stdout.write(f"synced {os.fstat(fd).st_size}\\n")
            sys.stdout.flush()

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one graceful stop
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    options = {"sync": "interval", "sync_interval": 60.0}
    engine = _registry.acquire_engine(sys.argv[1], options, True, fs=LoggedFS())
    storage = LocalFileStorage(sys.argv[1])
    _registry.release_engine(engine)
    try:
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        i = 0
        while True:
            storage.set(f"k{i}", i)
            sys.stdout.write(f"ack {i}\\n")  # one write: the key is acknowledged
            sys.stdout.flush()
            i += 1
    finally:
        storage.close()
        sys.stdout.write("closed\\n")
        sys.stdout.flush()
    """
)


def test_sigterm_handled_as_system_exit_with_sync_interval_loses_no_acknowledged_write(
    tmp_path: Path,
) -> None:
    """What is proven: after the child exits, every acknowledged key is in the file
    and reopens with its value; the child's close() ran an fdatasync after its last
    write, which returned, and covered the whole segment (its size then is the
    file's final size); the 60 s interval never synced meanwhile. A power loss
    cannot be simulated here: durability rests on fdatasync's contract."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    err_path = tmp_path / "child.stderr"
    with open(err_path, "w") as err_file:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
            env=env,
        )
    watchdog = threading.Timer(60, child.kill)  # bounded: a hang fails, never blocks
    watchdog.start()
    try:
        assert child.stdout is not None
        lines = []
        acks_read = 0
        signalled = False
        for line in child.stdout:  # to EOF (the child's exit), buffered lines included
            lines.append(line)
            acks_read += line.startswith("ack ")
            if acks_read >= 300 and not signalled:
                child.send_signal(signal.SIGTERM)
                signalled = True
        child.wait()
    finally:
        watchdog.cancel()
        if child.poll() is None:  # pragma: no cover - only when the test fails
            child.kill()
            child.wait()
    err = err_path.read_text()
    assert signalled, err
    assert child.returncode == 0, err
    out = "".join(lines)
    events = out.splitlines()
    acked = [int(m.group(1)) for line in events if (m := re.fullmatch(r"ack (\d+)", line))]
    assert len(acked) >= 300 and acked == list(range(len(acked)))
    assert events[-1] == "closed", events[-5:]
    last_ack = max(i for i, line in enumerate(events) if line.startswith("ack "))
    synced_after = [int(line.split()[1]) for line in events[last_ack:] if line.startswith("synced")]
    assert synced_after, "close() must fdatasync after the last write"
    synced_before = [int(x.split()[1]) for x in events[:last_ack] if x.startswith("synced")]
    assert synced_before == [SEGMENT_HEADER_SIZE], "only the new segment's header was synced"
    segments = sorted(p for p in tmp_path.iterdir() if p.suffix == ".seg")
    assert len(segments) == 1
    assert synced_after[-1] == os.stat(segments[0]).st_size
    for use_snapshot in (False, True):
        with LocalFileStorage(tmp_path, use_snapshot=use_snapshot) as reopened:
            assert reopened.report.clean
            for i in acked:
                assert reopened[f"k{i}"] == i


GC_INSIDE_THE_LOCK_GUARD = """
import gc, sys
import logstate._fs as fs
from logstate import LocalFileStorage

class Holder:
    pass

gc.disable()
holder = Holder()
holder.cycle = holder
holder.storage = LocalFileStorage(sys.argv[1])  # never closed; only a cycle reaches it
del holder
with fs._locks_guard:  # as inside lock_dir / held_lock / unlock_dir when an allocation collects
    gc.collect()  # the finalizer closes that engine and unlocks its directory, in this thread
with LocalFileStorage(sys.argv[1]) as s:  # released: this process opens it again
    s["after"] = 1
print("no deadlock")
"""


def test_a_handle_collected_inside_the_lock_guard_closes_without_deadlock(tmp_path: Path) -> None:
    """The garbage collector may run while this thread opens or closes another
    directory's lock; collecting an unclosed handle there closes its engine in
    this same thread, which re-enters the guard."""
    result = subprocess.run(
        [sys.executable, "-c", GC_INSIDE_THE_LOCK_GUARD, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no deadlock"


def test_a_handle_collected_while_another_thread_holds_the_registry_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    # An open holding the registry lock may wait for a thread (the replication's
    # event loop) in which the garbage collector runs a handle's finalizer:
    # that finalizer must not wait for the registry lock.
    import gc

    from logstate import _registry

    storage = LocalFileStorage(tmp_path / "s")
    storage["k"] = 1
    engine = storage._engine
    box: list[object] = [storage]
    box.append(box)  # a cycle: only the collector frees the handle
    del storage, box
    collected = threading.Event()
    holding = threading.Event()
    done = threading.Event()

    def hold_registry() -> None:
        with _registry._registry_lock:
            holding.set()
            collected.wait(10.0)  # (an open waiting on the collecting thread)
        done.set()

    holder = threading.Thread(target=hold_registry)
    gc.disable()
    try:
        holder.start()
        assert holding.wait(10.0)

        def collect() -> None:
            gc.collect()
            collected.set()

        collector = threading.Thread(target=collect)
        collector.start()
        assert collected.wait(5.0), "the finalizer waited for the registry lock"
    finally:
        gc.enable()
        holder.join(10.0)
        assert done.is_set()
    for _ in range(200):  # the release ran in its own thread once the lock was free
        if engine.closed:
            break
        time.sleep(0.01)
    assert engine.closed
