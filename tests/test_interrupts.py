"""An interrupted call leaves the storage in the before or the after state.

KeyboardInterrupt (Ctrl-C) and SystemExit from a SIGTERM handler are raised
between bytecodes. Each test here runs one call once for every point where a
signal can land in logstate's code (see ``tests/interrupts.py``), raising an
exception there, and checks after each run that:

- what the storage returns is exactly the state before or after the call;
- the engine's bookkeeping agrees with its files (``_check()``), and a
  later write, flush and close work and do not hang;
- a strict reopen finds the same state on disk as was seen in memory;
- with ``sync="always"``, no byte counts as durable that was not synced.

A watchdog (``faulthandler``) turns a hang into a failure with tracebacks.
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from logstate import InMemoryStorage, LocalFileStorage, _registry
from logstate._append import Appender
from logstate._format import SEGMENT_HEADER_SIZE
from logstate._fs import FileSystem
from tests.interrupts import Injector, Interrupt

State = dict[str, dict[str, Any]]

# An interrupt injected inside a __del__ (a lost Reference releasing itself)
# is swallowed and reported by Python, as a real signal landing there would be.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    stderr = sys.__stderr__
    assert stderr is not None
    faulthandler.dump_traceback_later(240, exit=True, file=stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


class SyncRecordingFS(FileSystem):
    """Remembers, per descriptor, the file size at its last successful fdatasync."""

    def __init__(self) -> None:
        self.synced_size: dict[int, int] = {}

    def fdatasync(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        super().fdatasync(fd)
        self.synced_size[fd] = size


def open_store(directory: Path, fs: FileSystem | None = None, **options: Any) -> LocalFileStorage:
    if fs is None:
        return LocalFileStorage(directory, **options)
    engine = _registry.acquire_engine(str(directory), options, create=True, fs=fs)
    handle = LocalFileStorage(directory)
    _registry.release_engine(engine)  # the handle holds the only reference
    return handle


def observed(root: LocalFileStorage) -> State:
    state: State = {"": dict(root.items())}
    for name in root.get_sub_storages():
        sub = root.get_or_create_sub_storage(name)
        state[name] = dict(sub.items())
        sub.close()
    return state


def populate(s: LocalFileStorage) -> None:
    s["a"] = "old"
    s["b"] = 1
    sub = s.get_or_create_sub_storage("sub")
    sub["x"] = [1, 2]
    sub.close()


BEFORE: State = {"": {"a": "old", "b": 1}, "sub": {"x": [1, 2]}}


def op_set(s: LocalFileStorage) -> None:
    s["a"] = "new"


def op_set_new_key(s: LocalFileStorage) -> None:
    s["c"] = b"\x00" * 300


def op_remove(s: LocalFileStorage) -> None:
    s.remove("b")


def op_batch(s: LocalFileStorage) -> None:
    with s.batch() as b:
        b.set("a", "new")
        b.set("c", 3)
        b.remove("b")


def op_clear(s: LocalFileStorage) -> None:
    s.clear()


def op_create_sub(s: LocalFileStorage) -> None:
    s.get_or_create_sub_storage("fresh").close()


def op_delete_sub(s: LocalFileStorage) -> None:
    s.delete_sub_storage("sub")


def op_flush_memory(s: LocalFileStorage) -> None:
    memory = InMemoryStorage(s)
    memory["a"] = "new"
    memory["c"] = {"n": 3}
    del memory["b"]
    memory.flush(checkpoint={"offset": 7})


def op_set_ttl(s: LocalFileStorage) -> None:
    s.set("a", "new", ttl=3600)


def op_batch_ttl(s: LocalFileStorage) -> None:
    with s.batch() as b:
        b.set("a", "new", ttl=3600)
        b.set("c", 3, ttl=3600)
        b.remove("b")


def op_flush_memory_ttl(s: LocalFileStorage) -> None:
    memory = InMemoryStorage(s)
    memory.set("a", "new", ttl=3600)
    memory.set("c", {"n": 3}, ttl=3600)
    memory.flush(checkpoint={"offset": 7})


def op_compact(s: LocalFileStorage) -> None:
    s.compact()


def op_sync(s: LocalFileStorage) -> None:
    s.flush()


OPERATIONS: dict[str, tuple[Callable[[LocalFileStorage], None], State]] = {
    "set": (op_set, {"": {"a": "new", "b": 1}, "sub": {"x": [1, 2]}}),
    "set_new_key": (op_set_new_key, {"": {**BEFORE[""], "c": b"\x00" * 300}, "sub": {"x": [1, 2]}}),
    "remove": (op_remove, {"": {"a": "old"}, "sub": {"x": [1, 2]}}),
    "batch": (op_batch, {"": {"a": "new", "c": 3}, "sub": {"x": [1, 2]}}),
    "clear": (op_clear, {"": {}}),
    "create_sub": (op_create_sub, {**BEFORE, "fresh": {}}),
    "delete_sub": (op_delete_sub, {"": BEFORE[""]}),
    "flush_memory": (op_flush_memory, {"": {"a": "new", "c": {"n": 3}}, "sub": {"x": [1, 2]}}),
    "set_ttl": (op_set_ttl, {"": {"a": "new", "b": 1}, "sub": {"x": [1, 2]}}),
    "batch_ttl": (op_batch_ttl, {"": {"a": "new", "c": 3}, "sub": {"x": [1, 2]}}),
    "flush_memory_ttl": (
        op_flush_memory_ttl,
        {"": {"a": "new", "b": 1, "c": {"n": 3}}, "sub": {"x": [1, 2]}},
    ),
    "compact": (op_compact, BEFORE),
    "sync": (op_sync, BEFORE),
}


def check_durable_claim(handle: LocalFileStorage, fs: SyncRecordingFS) -> None:
    """The engine never counts a byte durable that no fdatasync covered."""
    engine = handle._engine
    active = engine.segments.active
    assert active is not None
    claimed = engine.commit.synced_pos - (engine.appender.written_pos - active.size)
    if claimed > 0:
        assert fs.synced_size.get(active.fd, 0) >= claimed, (
            f"synced_pos claims {claimed} bytes of the active segment durable, "
            f"fdatasync covered {fs.synced_size.get(active.fd, 0)}"
        )


def still_writable(handle: LocalFileStorage, point: int, where: str | None) -> None:
    """A write and a flush after the interrupt work, and do not hang (bounded wait)."""
    errors: list[BaseException] = []

    def write() -> None:
        try:
            handle["probe"] = point
            handle.flush()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), f"interrupted at {where}: a later write hangs"
    assert not errors, f"interrupted at {where}: a later write fails: {errors[0]!r}"
    assert handle["probe"] == point


def run_everywhere(
    tmp_path: Path,
    setup: Callable[[LocalFileStorage], None],
    op: Callable[[LocalFileStorage], None],
    before: State,
    after: State,
    options: dict[str, Any],
    check: Callable[[LocalFileStorage, int], None] | None = None,
    max_points: int = 2000,
) -> int:
    """Run ``op`` once per signal point, interrupted there; returns how many points."""
    outcomes = {"before": 0, "after": 0}
    for point in range(max_points):
        directory = tmp_path / f"p{point}"
        fs = SyncRecordingFS()
        handle = open_store(directory, fs, **options)
        setup(handle)
        injector = Injector(point)
        if not injector.run(lambda handle=handle: op(handle)):  # type: ignore[misc]
            assert observed(handle) == after
            handle.close()
            assert point > 0, "the operation passed no signal point: the test did nothing"
            if before != after:  # both outcomes were reached: the points span the write
                assert outcomes["before"] and outcomes["after"], outcomes
            return point
        where = injector.fired_at
        state = observed(handle)
        assert state in (before, after), f"interrupted at {where}: {state}"
        outcomes["before" if state == before else "after"] += 1
        handle._check()
        if options.get("sync") == "always":
            check_durable_claim(handle, fs)
        if check is not None:
            check(handle, point)
        still_writable(handle, point, where)
        handle.close()
        reopened = LocalFileStorage(directory, recovery="strict")
        on_disk = observed(reopened)
        assert on_disk.get("", {}).pop("probe") == point, f"interrupted at {where}"
        assert on_disk == state, f"interrupted at {where}: memory {state}, disk {on_disk}"
        reopened._check()
        reopened.close()
    raise AssertionError(f"{op.__name__} still interrupted after {max_points} points")


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_an_interrupt_at_any_point_of_a_write_leaves_the_before_or_the_after_state(
    tmp_path: Path, name: str
) -> None:
    op, after = OPERATIONS[name]
    options: dict[str, Any] = {"sync": "none", "auto_compact": False}
    run_everywhere(tmp_path, populate, op, BEFORE, after, options)


@pytest.mark.parametrize("name", ["set", "batch", "flush_memory", "sync"])
def test_an_interrupt_inside_group_commit_never_hangs_or_claims_unsynced_bytes(
    tmp_path: Path, name: str
) -> None:
    op, after = OPERATIONS[name]

    def turn_is_free(handle: LocalFileStorage, point: int) -> None:
        engine = handle._engine
        assert not engine._lock.locked(), "the write lock was left taken"
        assert not engine.commit.turn.locked(), "the sync turn was left taken"
        assert engine.commit.idle(), "a sync round was left running (its gate taken)"

    run_everywhere(tmp_path, populate, op, BEFORE, after, {"sync": "always"}, turn_is_free)


def test_an_interrupt_in_a_set_that_rolls_the_segment_leaves_before_or_after(
    tmp_path: Path,
) -> None:
    def fill(s: LocalFileStorage) -> None:
        populate(s)
        segments = s._engine.segments
        while segments.active is not None and segments.active.size < 4096 - 200:
            s["filler"] = b"f" * 100

    big = "n" * 300  # more than the 200 bytes left: its record goes to a new segment

    def after_state() -> State:
        return {"": {"a": big, "b": 1, "filler": b"f" * 100}, "sub": {"x": [1, 2]}}

    before: State = {"": {"a": "old", "b": 1, "filler": b"f" * 100}, "sub": {"x": [1, 2]}}

    def big_set(s: LocalFileStorage) -> None:
        s["a"] = big
        s["a"] = big

    def whole_segment_files(s: LocalFileStorage, point: int) -> None:
        # (a close now must leave no half-made newest segment for the next open to cut)
        for path in Path(s._engine.path).glob("segment-*.seg"):
            size = path.stat().st_size
            assert size >= SEGMENT_HEADER_SIZE, f"point {point}: {path.name} holds {size} bytes"

    run_everywhere(
        tmp_path,
        fill,
        big_set,
        before,
        after_state(),
        {"sync": "none", "segment_size": 4096, "auto_compact": False},
        whole_segment_files,
    )


COMPACTED_CHECKPOINT = {"offset": 7}
COMPACTED_STATE: State = {"": {"a": "old", "b": 1, "dead": 0}, "sub": {"x": [1, 2]}}


class Ticking:
    """A clock that moves one second at each reading (from now)."""

    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        self.now_s += 1.0
        return self.now_s


def open_dead_store(directory: Path) -> LocalFileStorage:
    """Several segments, mostly dead bytes, expired keys and a checkpoint: a
    compaction replaces them (its output renamed over the last of them) and
    drops the expired keys."""
    s = LocalFileStorage(
        directory, sync="none", segment_size=4096, auto_compact=False, clock=Ticking()
    )
    populate(s)
    for i in range(4):
        s.set(f"expired{i}", b"e" * 900, ttl=1.5)  # gone two readings of the clock later
    for i in range(16):
        s["dead"] = b"d" * 900 + bytes([i])
    memory = InMemoryStorage(s)
    memory["dead"] = 0
    memory.flush(checkpoint=COMPACTED_CHECKPOINT)
    assert len(s._engine.segments.segments) > 3
    return s


def check_compacted_store(
    handle: LocalFileStorage, directory: Path, point: int, where: str | None
) -> None:
    """The checkpoint (read first), the contents, and the files agree; a second
    compaction (which reads the segments by name) and a reopen see the same."""
    assert handle.checkpoint == COMPACTED_CHECKPOINT, f"interrupted at {where}"
    assert observed(handle) == COMPACTED_STATE, f"interrupted at {where}"
    handle._check()
    handle["probe"] = point
    handle.compact()
    handle._check()
    assert handle.checkpoint == COMPACTED_CHECKPOINT, f"interrupted at {where}"
    handle.close()
    reopened = LocalFileStorage(directory, recovery="strict")
    on_disk = observed(reopened)
    assert on_disk[""].pop("probe") == point, f"interrupted at {where}"
    assert on_disk == COMPACTED_STATE, f"interrupted at {where}: {on_disk}"
    assert reopened.checkpoint == COMPACTED_CHECKPOINT
    reopened._check()
    reopened.close()


def test_an_interrupt_at_any_point_of_a_compaction_that_replaces_segments_leaves_before_or_after(
    tmp_path: Path,
) -> None:
    replaced = 0
    for point in range(3000):
        directory = tmp_path / f"p{point}"
        handle = open_dead_store(directory)
        injector = Injector(point)
        interrupted = injector.run(handle.compact)
        replaced += len(handle._engine.segments.segments) <= 2
        check_compacted_store(handle, directory, point, injector.fired_at)
        if not interrupted:
            assert point > 0 and replaced, (point, replaced)
            return
    raise AssertionError("compact still interrupted after 3000 points")


def interrupt_compaction_and_its_repair(
    handle: LocalFileStorage, point: int, monkeypatch: pytest.MonkeyPatch
) -> bool:
    """``compact()`` interrupted at its signal point ``point``, and again (a second
    Ctrl-C) at the start of the repair its exception handler runs
    (``Appender.interrupted``, a function start: a signal point): what the
    first interrupt cut short is left to the next call. True if interrupted."""
    injector = Injector(point)
    original = Appender.interrupted
    second: list[str] = []

    def interrupted(self: Appender) -> None:
        if injector.fired_at is not None and not second:
            second.append(injector.fired_at)
            raise Interrupt("a second interrupt, at the start of the repair")
        original(self)

    with monkeypatch.context() as patch:
        patch.setattr(Appender, "interrupted", interrupted)
        return injector.run(handle.compact)


def switch_left_after_the_rename(handle: LocalFileStorage) -> bool:
    """Is a compaction switch left to the next call, its output renamed into place?"""
    pending = handle._engine.switch.pending
    return pending is not None and (
        pending.tmp_path is None or not os.path.exists(pending.tmp_path)
    )


def test_a_compaction_switch_interrupted_again_while_it_is_finished_leaves_before_or_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted after its rename, and again while it repairs that, a compaction
    leaves its index switch to the next call; that call interrupted too (a third
    Ctrl-C) leaves it to the one after: reads between them (the checkpoint first)
    see one state. (One interrupt is not enough: compact() finishes its own switch.)"""
    for first in range(3000):  # the first point past the rename
        handle = open_dead_store(tmp_path / f"first{first}")
        interrupt_compaction_and_its_repair(handle, first, monkeypatch)
        pending = switch_left_after_the_rename(handle)
        handle.close()
        if pending:
            break
    else:
        raise AssertionError("no interrupt of compact() left its switch to the next call")
    for point in range(3000):
        directory = tmp_path / f"p{point}"
        handle = open_dead_store(directory)
        assert interrupt_compaction_and_its_repair(handle, first, monkeypatch)
        assert switch_left_after_the_rename(handle)
        injector = Injector(point)
        interrupted = injector.run(handle.get_sub_storages)  # finishes the switch
        check_compacted_store(handle, directory, point, injector.fired_at)
        if not interrupted:
            assert point > 0
            return
    raise AssertionError("get_sub_storages still interrupted after 3000 points")


@pytest.mark.parametrize("sync", ["none", "interval", "always"])
def test_an_interrupt_at_any_point_of_close_releases_the_directory(
    tmp_path: Path, sync: str
) -> None:
    """Interrupted anywhere, a close either did not start or can be finished:
    close() again, or a new open in this process, gets the directory, and
    nothing written is lost."""
    for point in range(2000):
        directory = tmp_path / f"p{point}"
        handle = LocalFileStorage(directory, sync=sync)
        populate(handle)
        sub = handle.get_or_create_sub_storage("sub")  # a second handle, closed first
        sub.close()
        injector = Injector(point)
        if not injector.run(handle.close):
            assert handle.closed
            assert point > 0
            break
        if point % 2:
            handle.close()  # finish it by hand ...
            assert handle.closed
        # ... or let the next open finish it
        reopened = LocalFileStorage(directory, sync=sync)
        assert observed(reopened) == BEFORE, f"interrupted at {injector.fired_at}"
        assert reopened._engine is not handle._engine or not handle.closed
        reopened._check()
        reopened.close()
        handle.close()
        left = [e.path for e in _registry.open_engines() if e.path == str(directory)]
        assert not left, "an engine was left registered"
    else:
        raise AssertionError("close still interrupted after 2000 points")


@pytest.mark.parametrize("sync", ["none", "interval"])
def test_an_interrupt_at_any_point_of_an_open_leaves_the_directory_to_the_next_open(
    tmp_path: Path, sync: str
) -> None:
    """Interrupted anywhere (after the lock is taken, after the engine is made,
    before a handle has it), an open holds nothing a new open would need:
    the directory lock is released, or the engine is registered to be closed."""
    directory = tmp_path / "store"
    handle = LocalFileStorage(directory, sync="none")
    populate(handle)
    handle.close()
    for point in range(3000):
        opened: list[LocalFileStorage] = []
        injector = Injector(point)
        done = not injector.run(
            lambda opened=opened: opened.append(LocalFileStorage(directory, sync=sync))  # type: ignore[misc]
        )
        for each in opened:
            each.close()
        reopened = LocalFileStorage(directory, sync=sync)
        assert observed(reopened) == BEFORE, f"interrupted at {injector.fired_at}"
        reopened._check()
        reopened.close()
        left = [e.path for e in _registry.open_engines() if e.path == str(directory)]
        assert not left, f"interrupted at {injector.fired_at}: an engine was left registered"
        if done:
            assert point > 0
            return
    raise AssertionError("open still interrupted after 3000 points")


def test_an_interrupted_in_memory_flush_is_written_by_the_next_flush(tmp_path: Path) -> None:
    """The changes of an interrupted flush stay pending: the next flush writes
    them (again, if they were written), and the checkpoint goes with them."""
    for point in range(2000):
        directory = tmp_path / f"p{point}"
        backing = LocalFileStorage(directory, sync="none")
        memory = InMemoryStorage(backing)
        memory["a"] = {"n": 1}
        memory.flush()
        memory["a"]["n"] = 2
        memory["b"] = "x"
        injector = Injector(point)
        done = not injector.run(lambda memory=memory: memory.flush(checkpoint=5))  # type: ignore[misc]
        memory.flush(checkpoint=5)
        backing.close()
        reopened = LocalFileStorage(directory)
        assert dict(reopened.items()) == {"a": {"n": 2}, "b": "x"}, injector.fired_at
        assert reopened.checkpoint == 5
        reopened.close()
        if done:
            assert point > 0
            return
    raise AssertionError("flush still interrupted after 2000 points")


# ---------------------------------------------------------------- real signals


class Armed:
    def __init__(self) -> None:
        self.armed = False
        self.delivered = 0


def random_signals(tmp_path: Path, sync: str, interrupts: int, seed: int) -> tuple[int, int]:
    """Ops in a loop while another thread sends SIGUSR1 at random moments; the
    handler raises (as a SIGTERM handler raising SystemExit would). Every
    acknowledged write must be there, and every interrupted one before or after.

    Returns:
        (interrupts delivered inside an operation, operations acknowledged)
    """
    rng = random.Random(seed)
    state = Armed()
    main = threading.get_ident()

    def handler(signum: int, frame: object) -> None:
        if state.armed:
            state.delivered += 1
            raise Interrupt("signal")

    previous = signal.signal(signal.SIGUSR1, handler)
    stop = threading.Event()

    def sender() -> None:
        sender_rng = random.Random(seed + 1)
        while not stop.is_set():
            time.sleep(sender_rng.uniform(0, 0.0015))
            if state.armed:
                signal.pthread_kill(main, signal.SIGUSR1)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    options: dict[str, Any] = {
        "sync": sync,
        "segment_size": 16384,
        "compact_min_size": 0,
        "sync_interval": 0.01,
    }
    directory = tmp_path / sync
    model: dict[str, Any] = {}
    memory_model: dict[str, Any] = {}
    acknowledged = 0
    handle = LocalFileStorage(directory, **options)
    try:
        mem_handle = handle.get_or_create_sub_storage("mem")
        memory = InMemoryStorage(mem_handle)
        n = 0
        while state.delivered < interrupts:
            n += 1
            key = f"k{rng.randrange(40)}"
            kind = rng.choices(
                ["set", "remove", "batch", "flush", "compact", "close"], [50, 15, 10, 15, 2, 3]
            )[0]
            value = f"v{n}" * rng.randrange(1, 20)
            touched = [key]
            if kind == "batch":
                touched = [key, f"k{rng.randrange(40)}"]
            if kind == "flush":
                memory[key] = value
            if kind == "close":  # the last handle is the one interrupted
                memory.flush()
                memory_model = dict(memory.items())
                mem_handle.close()
            state.armed = True
            try:
                if kind == "set":
                    handle[key] = value
                elif kind == "remove":
                    handle.remove(key)
                elif kind == "batch":
                    with handle.batch() as b:
                        b.set(touched[0], value)
                        b.remove(touched[1])
                elif kind == "flush":
                    memory.flush()
                elif kind == "compact":
                    handle.compact()
                else:
                    handle.close()
                state.armed = False
            except Interrupt:
                state.armed = False
                interrupted = True
            else:
                interrupted = False
            if kind == "close":
                if interrupted:
                    handle.close()  # finish it
                handle = LocalFileStorage(directory, **options)
                mem_handle = handle.get_or_create_sub_storage("mem")
                memory = InMemoryStorage(mem_handle)
                assert dict(memory.items()) == memory_model
                continue
            if kind == "flush":
                if not interrupted:
                    memory_model = dict(memory.items())
                    acknowledged += 1
                continue
            if not interrupted:
                acknowledged += 1
                if kind == "set":
                    model[key] = value
                elif kind == "remove":
                    model.pop(key, None)
                elif kind == "batch":
                    model[touched[0]] = value
                    model.pop(touched[1], None)
            else:
                # before or after: whichever it is, the storage must say the same
                # from now on, in memory and on disk
                for k in touched:
                    found = handle.get(k)
                    if found is None:
                        model.pop(k, None)
                    else:
                        model[k] = found
            assert {k: handle.get(k) for k in model} == model
        memory.flush()
        memory_model = dict(memory.items())
    finally:
        stop.set()
        thread.join()
        signal.signal(signal.SIGUSR1, previous)
    root = {k: v for k, v in handle.items()}
    assert root == model
    handle._check()
    handle.close()
    reopened = LocalFileStorage(directory, recovery="strict")
    assert dict(reopened.items()) == model
    mem = reopened.get_or_create_sub_storage("mem")
    assert dict(mem.items()) == memory_model
    reopened._check()
    reopened.close()
    return state.delivered, acknowledged


@pytest.mark.parametrize("sync", ["none", "interval", "always"])
def test_random_real_signals_lose_no_acknowledged_write_and_hang_nothing(
    tmp_path: Path, sync: str
) -> None:
    delivered, acknowledged = random_signals(tmp_path, sync, interrupts=600, seed=11)
    assert delivered >= 600 and acknowledged >= 100


@pytest.fixture(autouse=True)
def registry_lock_is_free() -> Iterator[None]:
    yield
    lock = _registry._registry_lock
    free: list[bool] = []

    def probe() -> None:  # from another thread: the lock is re-entrant
        free.append(lock.acquire(timeout=1))
        if free[0]:
            lock.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert free == [True], "the registry lock was left held"
