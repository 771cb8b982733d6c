"""fork(): a child process never uses, changes or keeps locked its parent's open storage.

A child forked after the parent opened a storage gets StorageForkedError from
every call on an inherited handle (the parent's data stays intact); a new open
in the child is an open by another process (StorageLockedError while the
parent holds the directory, a normal open once it is released); the child's
exit (finalizers, atexit) writes and syncs nothing and never hangs, whatever
locks parent threads held at the fork; and a child that never touched the
storage does not keep the directory locked after the parent dies (nor does
an exec'd child).

Children report through a pipe (pickled results) and end with ``os._exit``
(or, where the exit path itself is tested, ``sys.exit`` in a subprocess that
forks). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from logstate import (
    InMemoryStorage,
    LocalFileStorage,
    StorageClosedError,
    StorageForkedError,
    StorageLockedError,
)

WAIT_S = 20.0  # bound on every wait for a child (a hang fails the test, never blocks it)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _read_exactly_all(fd: int, deadline: float) -> bytes:
    """Everything written to pipe ``fd`` until it is closed, or raise at the deadline."""
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError("the child neither answered nor exited (hung)")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _wait_child(pid: int, deadline: float) -> int:
    """The exit status of child ``pid``; kill it and raise when it outlives the deadline."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"child {pid} did not exit (hung)")
        time.sleep(0.01)


def in_forked_child(body: Callable[[], Any]) -> Any:
    """Run ``body`` in a forked child; return what it returned (pickled through a pipe)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            try:
                result: Any = ("ok", body())
            except BaseException as exc:
                result = ("raised", exc)
            try:
                data = pickle.dumps(result)
            except Exception as exc:
                data = pickle.dumps(("raised", RuntimeError(f"unpicklable result: {exc!r}")))
            os.write(write_end, data)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + WAIT_S
    try:
        data = _read_exactly_all(read_end, deadline)
    finally:
        os.close(read_end)
        status = _wait_child(pid, deadline)
    assert status == 0, f"child exited with {status}"
    kind, value = pickle.loads(data)
    if kind == "raised":
        raise AssertionError(f"the child raised {value!r}") from value
    return value


def store_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of the store and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def fill(storage: LocalFileStorage, n: int = 100) -> dict[str, Any]:
    """``n`` keys written in one batch (one sync whatever the mode); returns them."""
    expected: dict[str, Any] = {f"k{i}": {"i": i, "pad": "x" * (i % 50)} for i in range(n)}
    with storage.batch() as batch:
        for key, value in expected.items():
            batch.set(key, value)
    return expected


def outcome(call: Callable[[], object]) -> tuple[str, Any]:
    """("ok", repr of the result) or ("raised", the exception), for reporting from a child."""
    try:
        return "ok", repr(call())
    except Exception as exc:
        return "raised", exc


# ============================================================================ inherited handles


def test_inherited_storage_in_a_forked_child_raises_storage_forked_error_and_the_parent_is_intact(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    storage = LocalFileStorage(directory, sync="always")
    expected = fill(storage)
    sub = storage.get_or_create_sub_storage("sub")
    sub["s"] = "in sub"
    memory = InMemoryStorage(storage.get_or_create_sub_storage("mem"))
    memory["m"] = [1, 2]
    memory.flush(checkpoint={"offset": 7})
    memory["m2"] = "pending"
    before = store_bytes(directory)
    parent = os.getpid()

    def child() -> dict[str, Any]:
        calls: dict[str, Callable[[], object]] = {
            "set": lambda: storage.set("from_child", 1),
            "setitem": lambda: storage.__setitem__("k1", "overwritten by the child"),
            "get": lambda: storage.get("k1"),
            "getitem": lambda: storage["k2"],
            "get_encoded": lambda: storage.get_encoded("k3"),
            "contains": lambda: "k1" in storage,
            "keys": storage.get_all_keys,
            "len": lambda: len(storage),
            "iter": lambda: list(storage),
            "remove": lambda: storage.remove("k4"),
            "delitem": lambda: storage.__delitem__("k5"),
            "clear": storage.clear,
            "batch": lambda: storage.batch().commit(),
            "batch_with_ops": lambda: _batch_set(storage),
            "flush": storage.flush,
            "compact": storage.compact,
            "stats": storage.stats,
            "checkpoint": lambda: storage.checkpoint,
            "create_sub": lambda: storage.get_or_create_sub_storage("new"),
            "existing_sub": lambda: storage.get_or_create_sub_storage("sub"),
            "sub_storages": storage.get_sub_storages,
            "delete_sub": lambda: storage.delete_sub_storage("sub"),
            "delete_subs": storage.delete_sub_storages,
            "sub_set": lambda: sub.set("s", "child"),
            "sub_get": lambda: sub.get("s"),
            "memory_load": lambda: InMemoryStorage(storage),
            "memory_flush": memory.flush,
            "engine_check": storage._check,
        }
        results = {name: outcome(call) for name, call in calls.items()}
        results["memory_local_write"] = outcome(lambda: memory.__setitem__("local", 1))
        results["closed"] = ("ok", storage.closed)
        storage.close()  # allowed, writes nothing
        results["after_close"] = outcome(lambda: storage.get("k1"))
        return {"pid": os.getpid(), "results": results}

    answer = in_forked_child(child)
    child_pid = answer["pid"]
    for name, (kind, value) in answer["results"].items():
        if name in ("memory_local_write", "closed"):
            continue
        assert kind == "raised", f"{name} in the child did not raise: {value}"
        assert isinstance(value, StorageForkedError), f"{name}: {value!r}"
        assert isinstance(value, StorageClosedError)
        assert (value.path, value.owner_pid, value.pid) == (storage.path, parent, child_pid)
        assert storage.path in str(value) and str(parent) in str(value)
        assert str(child_pid) in str(value)
    assert answer["results"]["memory_local_write"][0] == "ok"  # the child's own dict
    assert answer["results"]["closed"] == ("ok", True)

    # nothing of the store changed; the parent reads, writes, compacts, reopens clean
    assert store_bytes(directory) == before
    storage._check()
    assert {key: storage[key] for key in expected} == expected
    assert sub["s"] == "in sub"
    storage["after"] = "parent write"
    memory.flush()
    storage.compact()
    storage._check()
    for handle in (sub, storage):
        handle.close()
    reopened = LocalFileStorage(directory)
    try:
        assert reopened.report.clean
        assert {key: reopened[key] for key in expected} == expected
        assert reopened["after"] == "parent write"
        assert "from_child" not in reopened
        assert reopened.get_or_create_sub_storage("sub")["s"] == "in sub"
        assert reopened.get_or_create_sub_storage("mem")["m2"] == "pending"
        assert reopened.checkpoint == {"offset": 7}
        reopened._check()
    finally:
        reopened.close()


def _batch_set(storage: LocalFileStorage) -> int:
    batch = storage.batch()
    batch.set("b", 1)
    return batch.commit()


def test_storage_forked_error_pickles_with_its_fields() -> None:
    error = pickle.loads(pickle.dumps(StorageForkedError("/some/dir", 10, 11)))
    assert isinstance(error, StorageForkedError)
    assert (error.path, error.owner_pid, error.pid) == ("/some/dir", 10, 11)


# ============================================================================ new opens in a child


def test_a_new_open_in_a_forked_child_is_an_open_by_another_process(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    storage = LocalFileStorage(directory)
    storage["parent"] = "p"
    storage.flush()
    parent = os.getpid()
    go_read, go_write = os.pipe()
    said_read, said_write = os.pipe()

    def child() -> dict[str, Any]:
        os.close(go_write)
        os.close(said_read)
        try:
            LocalFileStorage(directory)
            first: tuple[str, int | None] = ("opened", None)
        except StorageLockedError as exc:
            first = ("StorageLockedError", exc.pid)
        os.write(said_write, b"1")
        os.close(said_write)
        assert os.read(go_read, 1) == b"1"  # the parent has closed the storage
        with LocalFileStorage(directory) as mine:
            seen = mine["parent"]
            mine["child"] = "c"
            mine._check()
        return {"first": first, "seen": seen}

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            try:
                result: tuple[str, Any] = ("ok", child())
            except Exception as exc:
                result = ("raised", repr(exc))
            os.write(write_end, pickle.dumps(result))
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    os.close(go_read)
    os.close(said_write)
    deadline = time.monotonic() + WAIT_S
    try:
        assert _read_exactly_all(said_read, deadline) == b"1"
        storage.close()
        os.write(go_write, b"1")
        kind, answer = pickle.loads(_read_exactly_all(read_end, deadline))
    finally:
        for fd in (read_end, said_read, go_write):
            os.close(fd)
        status = _wait_child(pid, deadline)
    assert status == 0
    assert kind == "ok", answer
    assert answer["first"] == ("StorageLockedError", parent)
    assert answer["seen"] == "p"
    with LocalFileStorage(directory) as reopened:
        assert dict(reopened.items()) == {"parent": "p", "child": "c"}
        assert reopened.report.clean


# ============================================================================ the child's exit

RECORDING = textwrap.dedent(
    """
    import os
    from logstate._fs import FileSystem

    LOG = os.open(os.environ["FS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def recording(name, call):
        def method(self, *args):
            os.write(LOG, f"{os.getpid()} {name}\\n".encode())
            return call(self, *args)
        return method

    for name in ("fdatasync", "fsync", "append", "write_new_file", "rename", "unlink",
                 "truncate", "create_file", "open_file", "fsync_dir", "lock_dir",
                 "unlock_dir", "make_dirs"):
        setattr(FileSystem, name, recording(name, getattr(FileSystem, name)))
    """
)

EXIT_SCRIPT = RECORDING + textwrap.dedent(
    """
    import gc, json, multiprocessing, sys, time
    from logstate import InMemoryStorage, LocalFileStorage, StorageForkedError

    directory = sys.argv[1]
    storage = LocalFileStorage(directory, sync="interval", sync_interval=0.01,
                               segment_size=4096, compact_min_size=0, compact_ratio=0.1)
    sub = storage.get_or_create_sub_storage("sub")
    memory = InMemoryStorage(storage)
    for i in range(160):  # rolls segments: background compactions run meanwhile
        storage[f"k{i % 40}"] = "v" * 100 + str(i)
    memory["m"] = 1
    memory.flush()
    sub["s"] = 1
    storage.flush()
    storage._engine.wait_for_background_compaction()  # the parent's own changes files
    time.sleep(0.05)  # the interval thread is idle, waiting for the next write

    def forked(body):
        pid = os.fork()
        if pid == 0:
            body()
            os._exit(99)  # not reached: body exits
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return "hung"

    def exits_at_once():  # atexit runs the handles' finalizers
        sys.exit(0)

    def drops_its_handles():  # finalizers run at gc, then atexit
        global storage, sub, memory
        try:
            storage["x"] = 1
            code = 1
        except StorageForkedError:
            code = 0
        del storage, sub, memory
        gc.collect()
        sys.exit(code)

    def target(handle):
        try:
            handle["y"] = 2
        except StorageForkedError:
            sys.exit(0)
        sys.exit(1)

    def multiprocessing_fork():
        process = multiprocessing.get_context("fork").Process(target=target, args=(storage,))
        process.start()
        process.join(20)
        sys.exit(process.exitcode if process.exitcode is not None else 2)

    def contents():
        return {n: open(os.path.join(directory, n), "rb").read() for n in os.listdir(directory)}

    before = contents()
    codes = {body.__name__: forked(body) for body in
             (exits_at_once, drops_its_handles, multiprocessing_fork)}
    after = contents()
    storage["after"] = 1
    storage._check()
    storage.close()
    print(json.dumps({"parent": os.getpid(), "codes": codes, "unchanged": before == after,
                      "changed": sorted(n for n in set(before) | set(after)
                                        if before.get(n) != after.get(n))}))
    """
)


def test_a_forked_child_exiting_writes_and_syncs_nothing_in_the_parent_store(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    fs_log = tmp_path / "fs.log"
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(directory)],
        env={**_env(), "FS_LOG": str(fs_log)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == {
        "exits_at_once": 0,
        "drops_its_handles": 0,
        "multiprocessing_fork": 0,
    }, done.stderr
    assert result["unchanged"], f"the children changed {result['changed']}"
    calls = [line.split() for line in fs_log.read_text().splitlines()]
    by_children = [(pid, op) for pid, op in calls if int(pid) != result["parent"]]
    assert by_children == [], "file-system calls made by forked children"
    with LocalFileStorage(directory) as reopened:
        assert reopened.report.clean
        assert reopened["after"] == 1
        assert "x" not in reopened and "y" not in reopened
        reopened._check()


HELD_LOCKS_SCRIPT = textwrap.dedent(
    """
    import contextlib, json, os, sys, threading, time
    from logstate import (InMemoryStorage, LocalFileStorage, StorageForkedError,
                          StorageLockedError, _registry)

    directory = sys.argv[1]
    storage = LocalFileStorage(directory, sync="always")
    memory = InMemoryStorage(storage)
    with storage.batch() as batch:
        for i in range(50):
            batch.set(f"k{i}", i)
    engine = storage._engine
    held, release = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def commit_inner_lock():  # GroupCommit's round gate, or the C commit's mutex
        commit = engine.commit
        if not hasattr(commit, "_hold_mutex"):
            with commit._gate:
                yield
            return
        commit._hold_mutex()
        try:
            yield
        finally:
            commit._release_mutex()

    def hold():  # what a parent thread may hold at the fork: every lock at once
        with (engine._lock, engine.compactor.lock, engine.commit.turn, commit_inner_lock(),
              engine._close_lock, engine.scheduler.gate, engine.appender._delivering,
              _registry._registry_lock, memory._lock):
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    if not held.wait(30):  # (the thread failed: fail now rather than hang)
        sys.exit("the locks were never all held")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        report = {}
        calls = {
            "set": lambda: storage.set("x", 1),
            "get": lambda: storage.get("k1"),
            "keys": storage.get_all_keys,
            "remove": lambda: storage.remove("k1"),
            "clear": storage.clear,
            "batch": lambda: storage.batch().commit(),
            "flush": storage.flush,
            "compact": storage.compact,
            "stats": storage.stats,
            "checkpoint": lambda: storage.checkpoint,
            "sub": lambda: storage.get_or_create_sub_storage("s"),
            "memory_set": lambda: memory.set("local", 1),
            "memory_flush": memory.flush,
            "new_open": lambda: LocalFileStorage(directory),
        }
        for name, call in calls.items():
            try:
                call()
                report[name] = "ok"
            except (StorageForkedError, StorageLockedError) as exc:
                report[name] = type(exc).__name__
            os.write(write_end, (json.dumps([name, report[name]]) + "\\n").encode())
        os.close(write_end)
        sys.exit(0)  # finalizers and atexit run
    os.close(write_end)
    deadline = time.monotonic() + 20
    status = "hung"
    while time.monotonic() < deadline:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    answers = dict(json.loads(line) for line in os.read(read_end, 1 << 20).decode().splitlines())
    release.set()
    thread.join()
    storage["after"] = 1
    storage._check()
    storage.close()
    print(json.dumps({"status": status, "answers": answers}))
    """
)


def test_a_forked_child_never_blocks_on_locks_parent_threads_held_at_the_fork(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    done = subprocess.run(
        [sys.executable, "-c", HELD_LOCKS_SCRIPT, str(directory)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 0, f"the child {result['status']}; it answered {result['answers']}"
    expected = {
        name: "StorageForkedError"
        for name in (
            "set",
            "get",
            "keys",
            "remove",
            "clear",
            "batch",
            "flush",
            "compact",
            "stats",
            "checkpoint",
            "sub",
            "memory_flush",
        )
    }
    expected["memory_set"] = "ok"
    expected["new_open"] = "StorageLockedError"
    assert result["answers"] == expected
    with LocalFileStorage(directory) as reopened:
        assert reopened.report.clean
        assert len(reopened) == 51


# ============================================================================ the lock, parent gone

IDLE_CHILD_SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from logstate import LocalFileStorage

    directory, how = sys.argv[1], sys.argv[2]
    storage = LocalFileStorage(directory)
    for i in range(20):
        storage[f"k{i}"] = i
    storage.flush()
    if how == "exec":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 close_fds=False)
        print(f"child {child.pid}", flush=True)
    else:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # never touches the storage
            os.write(write_end, b"1")
            time.sleep(60)
            os._exit(0)
        assert os.read(read_end, 1) == b"1"  # the child is past the fork
        print(f"child {pid}", flush=True)
    print("parent ready", flush=True)
    if how == "exit":
        sys.exit(0)  # a normal exit: the finalizer closes the storage
    time.sleep(60)
    """
)


def _proc_fds(pid: int) -> list[str]:
    """What the open descriptors of process ``pid`` point to ([] where /proc is missing)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for entry in fd_dir.iterdir() if fd_dir.is_dir() else []:
        with contextlib.suppress(OSError):  # closed meanwhile
            targets.append(os.readlink(entry))
    return targets


@pytest.fixture
def spawned() -> Iterator[list[int]]:
    """Pids of processes a test started indirectly; killed (by pid) at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["sigkill", "exit", "exec"])
def test_a_child_that_never_touched_the_store_does_not_keep_it_locked_after_the_parent_dies(
    tmp_path: Path, how: str, spawned: list[int]
) -> None:
    directory = tmp_path / "store"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            IDLE_CHILD_SCRIPT,
            str(directory),
            how,
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = 0
        for line in parent.stdout:
            if line.startswith("child "):
                child = int(line.split()[1])
                spawned.append(child)
            if line.startswith("parent ready"):
                break
        assert child, "the parent script did not start its child"
        if how == "exit":
            assert parent.wait(WAIT_S) == 0
        else:
            parent.send_signal(signal.SIGKILL)
            parent.wait(WAIT_S)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    os.kill(child, 0)  # still alive
    with LocalFileStorage(directory) as reopened:  # no StorageLockedError
        assert dict(reopened.items()) == {f"k{i}": i for i in range(20)}
        assert reopened.report.clean
    # the child holds no descriptor (lock file, segments) nor mapping of the store
    real = os.path.realpath(directory)
    assert [t for t in _proc_fds(child) if t.startswith(real)] == []
    maps = Path(f"/proc/{child}/maps")
    if maps.exists():
        assert real not in maps.read_text()
