"""A failed write and an interrupt on the C path: what the pure Python path does.

Real failures through the real descriptor: the active segment's descriptor
is pointed at ``/dev/full`` (every write(2) there fails with ENOSPC, as on a
full disk) or at a read-only descriptor (EBADF). The same failure is run
once with the engine on the C path and once on the Python path
(``_writer.FAST_PATHS`` False): same exception type, errno, message and
``__cause__``, the same failed engine (the next write raises
StorageFailedError naming the OSError), the same state in memory and on
disk. An interrupt (KeyboardInterrupt from a signal handler) during a loop
of C sets leaves each set before or after: every acknowledged set is read
back after a reopen, nothing else is there.
"""

from __future__ import annotations

import os
import pathlib
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from logstate import LocalFileStorage, StorageFailedError, _handle, _reader, _writer
from tests.native_required import native_extension


@contextmanager
def path_of(fast: bool) -> Iterator[None]:
    saved = _writer.FAST_PATHS, _reader.FAST_PATHS, _handle.FAST_PATHS
    _writer.FAST_PATHS = _reader.FAST_PATHS = _handle.FAST_PATHS = fast
    try:
        yield
    finally:
        _writer.FAST_PATHS, _reader.FAST_PATHS, _handle.FAST_PATHS = saved


def _dev_full() -> int:
    return os.open("/dev/full", os.O_WRONLY)


def _read_only(path: str) -> Callable[[], int]:
    return lambda: os.open(path, os.O_RDONLY)


def _fail_once(tmp: pathlib.Path, fast: bool, make_fd: str) -> dict[str, Any]:
    """Set keys, make the active descriptor fail, set again; what happened."""
    path = str(tmp / ("fast" if fast else "pure"))
    with path_of(fast):
        store = LocalFileStorage(path, sync="none", auto_compact=False)
    for i in range(10):
        store.set(f"k{i}", b"v" * i)
    engine = store._engine
    active = engine.segments.active
    assert active is not None
    saved = os.dup(active.fd)
    bad = _dev_full() if make_fd == "full" else os.open(active.path, os.O_RDONLY)
    os.dup2(bad, active.fd)
    os.close(bad)
    before = (
        engine.appender.seq,
        engine.appender.written_pos,
        active.size,
        engine.keydir.live_bytes,
        dict(engine.keydir.namespaces[""]),
    )
    with pytest.raises(OSError) as failed:
        store.set("k3", b"new value")
    exc = failed.value
    after = (
        engine.appender.seq,
        engine.appender.written_pos,
        active.size,
        engine.keydir.live_bytes,
        dict(engine.keydir.namespaces[""]),
    )
    with pytest.raises(StorageFailedError) as refused:
        store.set("k4", b"refused")
    with pytest.raises(StorageFailedError) as refused_again:
        store.set("victor", b"refused")
    os.dup2(saved, active.fd)
    os.close(saved)
    read = [store.get(f"k{i}") for i in range(10)]
    store.close()
    store = LocalFileStorage(path, sync="none", auto_compact=False)
    reopened = {key: store.get(key) for key in store.get_all_keys()}
    store.close()
    return {
        "type": type(exc),
        "errno": exc.errno,
        "strerror": exc.strerror,
        "args": exc.args,
        "filename": exc.filename,
        "cause": exc.__cause__,
        "context": exc.__context__,
        "failed_is_exc": engine.life.failed is exc,
        "unchanged": before == after,
        "refused": (
            type(refused.value),
            str(refused.value).replace(path, "P"),
            refused.value.__cause__ is exc,
        ),
        "refused_again": refused_again.value.__cause__ is exc,
        "read": read,
        "reopened": reopened,
        "files": sorted(os.listdir(path)),
    }


@pytest.mark.parametrize("make_fd", ["full", "read-only"])
def test_a_failed_write_fails_the_engine_as_the_python_path_does(
    tmp_path: pathlib.Path, make_fd: str
) -> None:
    native_extension()
    c_path = _fail_once(tmp_path, True, make_fd)
    python_path = _fail_once(tmp_path, False, make_fd)
    assert c_path == python_path
    assert c_path["failed_is_exc"] and c_path["unchanged"] and c_path["refused_again"]
    assert c_path["errno"] == (28 if make_fd == "full" else 9)  # ENOSPC, EBADF
    assert c_path["cause"] is None and c_path["context"] is None
    assert c_path["refused"][2] is True


def test_the_c_path_is_the_one_that_failed(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(The comparison above is of two paths: the C one did take the write.)"""
    native_extension()
    taken: list[str] = []
    original = _writer.Writer._set_python

    def counted(self: _writer.Writer, *args: Any) -> None:
        taken.append("python")
        original(self, *args)

    monkeypatch.setattr(_writer.Writer, "_set_python", counted)
    store = LocalFileStorage(str(tmp_path / "s"), sync="none", auto_compact=False)
    store.set("a", b"1")
    active = store._engine.segments.active
    assert active is not None
    saved = os.dup(active.fd)
    full = _dev_full()
    os.dup2(full, active.fd)
    os.close(full)
    with pytest.raises(OSError):
        store.set("b", b"2")
    assert taken == []  # the failure came from C
    with pytest.raises(StorageFailedError):
        store.set("c", b"3")
    assert taken == ["python"]  # a failed engine: the Python path refuses
    os.dup2(saved, active.fd)
    os.close(saved)
    store.close()


def test_an_interrupt_during_c_sets_leaves_each_before_or_after(tmp_path: pathlib.Path) -> None:
    native_extension()
    path = str(tmp_path / "s")
    store = LocalFileStorage(path, sync="none", auto_compact=False)
    acknowledged: dict[str, bytes] = {}
    interrupts = 0

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    value = b""
    try:
        i = 0
        while interrupts < 30:
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.0005 + (interrupts % 7) * 0.0003)
                while True:
                    key, value = f"k{i % 5000}", os.urandom(8) * (1 + i % 13)
                    store.set(key, value)
                    acknowledged[key] = value
                    i += 1
            except KeyboardInterrupt:
                interrupts += 1
                # the set cut short is there whole or not at all
                engine = store._engine
                assert engine.appender.in_flight is None
                active = engine.segments.active
                assert active is not None and active.size == os.fstat(active.fd).st_size
                key = f"k{i % 5000}"
                if store.get(key) not in (acknowledged.get(key), value):
                    raise AssertionError(key) from None
                acknowledged[key] = store.get(key)
                if acknowledged[key] is None:
                    del acknowledged[key]
                i += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    store._engine.keydir._check() if hasattr(store._engine.keydir, "_check") else None
    store.close()
    store = LocalFileStorage(path, sync="none", auto_compact=False)
    assert {key: store.get(key) for key in store.get_all_keys()} == acknowledged
    store.close()


@pytest.mark.parametrize("where", ["value", "key", "type", "length", "crc", "index"])
def test_the_c_get_never_returns_a_damaged_record(tmp_path: pathlib.Path, where: str) -> None:
    """A record damaged on disk under a mapping: the C get hands it to the Python
    path, which raises CorruptionError naming the file and offset."""
    from logstate import CorruptionError

    native_extension()
    path = str(tmp_path / "s")
    store = LocalFileStorage(path, sync="none", auto_compact=False)
    store.set("victim", b"v" * 50)
    store.set("victor", b"o" * 50)
    store.close()
    store = LocalFileStorage(path, sync="none", auto_compact=False)  # sealed and mapped now
    engine = store._engine
    loc = engine.keydir.namespaces[""]["victim"]
    assert isinstance(loc, int)
    number, offset = loc >> 74, (loc >> 34) & ((1 << 40) - 1)
    segment = engine.segments.segments[number]
    assert segment.map is not None
    if where == "index":  # the index points at another key's (valid) record
        engine.keydir.namespaces[""]["victim"] = engine.keydir.namespaces[""]["victor"]
        with pytest.raises(CorruptionError, match="index points to key 'victor'"):
            store.get("victim")
        store.close()
        return
    at = {"crc": 0, "length": 5, "type": 8, "key": 17 + 2 + 2, "value": 17 + 2 + 6 + 10}[where]
    with open(segment.path, "r+b") as file:  # (the shared mapping sees it)
        file.seek(offset + at)
        byte = file.read(1)
        file.seek(offset + at)
        file.write(bytes([byte[0] ^ 0x41]))
    assert segment.map[offset + at] == byte[0] ^ 0x41
    with pytest.raises(CorruptionError) as damaged:
        store.get("victim")
    assert damaged.value.path == segment.path
    assert store.get("victor") == b"o" * 50
    store.close()
