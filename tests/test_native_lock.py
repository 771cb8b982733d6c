"""The C path's write lock (``_cnative.Lock``): threading.Lock's behaviour.

The engine's write lock on the C path (its hot paths take it directly): the
same interface, a blocking acquire that a signal handler's exception
interrupts (as ``threading.Lock``'s does), and a fresh lock in a forked
child (the engine replaces it: ``Engine.after_fork``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import ModuleType

import pytest

from logstate import LocalFileStorage
from tests.native_required import native_extension


@pytest.fixture
def ext() -> ModuleType:
    return native_extension()


def test_the_lock_behaves_as_threading_lock(ext: ModuleType) -> None:
    lock = ext.Lock()
    assert not lock.locked()
    with lock:
        assert lock.locked()
        assert lock.acquire(False) is False
        assert lock.acquire(timeout=0.01) is False
        assert lock.acquire(blocking=False) is False
    assert not lock.locked()
    assert lock.acquire() is True
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()
    with pytest.raises(ValueError):
        lock.acquire(False, 1.0)
    with pytest.raises(ValueError):
        lock.acquire(timeout=-2)


def test_another_thread_waits_and_then_gets_it(ext: ModuleType) -> None:
    lock = ext.Lock()
    lock.acquire()
    got: list[float] = []

    def wait() -> None:
        with lock:
            got.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    thread.join(0.05)
    assert got == []  # still waiting
    released = time.monotonic()
    lock.release()
    thread.join()
    assert len(got) == 1 and got[0] >= released


def test_a_signal_interrupts_a_blocked_acquire(ext: ModuleType) -> None:
    lock = ext.Lock()
    holding, done, released = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:  # holds the lock until told (at most 10 s)
        with lock:
            holding.set()
            done.wait(10)
            released.set()

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            lock.acquire()
        assert not released.is_set()  # interrupted while held, not acquired once let go
        with pytest.raises(KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            with lock:
                pass
        # interrupted while the holder still held it (not once it let go)
        assert lock.locked() and not released.is_set()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        done.set()
        holder.join()
    assert lock.acquire(False)
    lock.release()


def test_the_engine_runs_on_it_and_a_forked_child_gets_a_new_one(
    ext: ModuleType, tmp_path: object
) -> None:
    store = LocalFileStorage(str(tmp_path), sync="none", auto_compact=False)
    engine = store._engine
    assert type(engine._lock) is ext.Lock
    assert engine.writer._lock is engine._lock and engine.reader._lock is engine._lock
    store.set("a", b"1")
    held = engine._lock
    held.acquire()  # as a parent thread would hold it at the fork
    try:
        pid = os.fork()
        if pid == 0:  # the child: its engine's lock is a new one, free
            code = 0
            try:
                if engine._lock is held or type(engine._lock) is not ext.Lock:
                    code = 3
                elif not engine._lock.acquire(False):
                    code = 4
            finally:
                os._exit(code)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        held.release()
    assert store.get("a") == b"1"
    store.close()


def test_a_timeout_too_large_or_not_a_number_is_refused_as_threading_refuses_it(
    ext: ModuleType,
) -> None:
    ours, theirs = ext.Lock(), threading.Lock()
    for lock in (ours, theirs):
        with pytest.raises(OverflowError):
            lock.acquire(timeout=1e300)
        assert not lock.locked()
    with pytest.raises(ValueError):
        ours.acquire(timeout=float("nan"))
    assert not ours.locked()
