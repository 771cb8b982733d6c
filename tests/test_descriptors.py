"""Open files: how many descriptors a store holds, and a close whose close(2) fails.

A sealed segment is read through a mapping; at most a bounded number of them
are mapped at once (the rest are mapped again by name when read), so a store
of any number of segments works under a small ``RLIMIT_NOFILE``. Close
releases every descriptor and the directory lock whatever fails, and raises
the first ``close(2)`` error.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from logstate import InMemoryStorage, LocalFileStorage, _engine, _registry
from logstate._errors import CorruptionError
from logstate._fs import FileSystem

REPO = Path(__file__).resolve().parent.parent


def registered(directory: Path) -> list[_engine.Engine]:
    """The engines of this process's registry open on ``directory``."""
    return [e for e in _registry.open_engines() if e.path == os.path.realpath(directory)]


def descriptors_on(directory: Path) -> list[str]:
    """What this process's open descriptors refer to under ``directory`` (``ls -l
    /proc/self/fd``; a mapping's own descriptor included)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


def open_with(fs: FileSystem, directory: Path, **options: object) -> LocalFileStorage:
    """A public handle on an engine that uses ``fs`` (the handle holds the only reference)."""
    engine = _registry.acquire_engine(str(directory), dict(options), create=True, fs=fs)
    handle = LocalFileStorage(directory)
    _registry.release_engine(engine)
    assert handle._engine is engine
    return handle


# ============================================================================ the bound

STORE_SCRIPT = textwrap.dedent(
    """
    import os, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    from logstate import InMemoryStorage, LocalFileStorage, _registry
    from logstate._fs import FileSystem

    class NoSyncFS(FileSystem):  # open files are checked here, not durability: no disk waits
        def fsync(self, fd): pass
        def fdatasync(self, fd): pass
        def fsync_dir(self, path): pass

    directory = sys.argv[1]
    options = dict(segment_size=4096, auto_compact=False, sync="none")
    most = 0

    def LocalFileStorage(directory, **given):  # the public handle, on an engine using NoSyncFS
        engine = _registry.acquire_engine(directory, given, create=True, fs=NoSyncFS())
        handle = Handle(directory)
        _registry.release_engine(engine)
        return handle

    from logstate import LocalFileStorage as Handle

    def count():
        global most
        most = max(most, len(os.listdir("/proc/self/fd")))

    value = "v" * 900  # four records to a 4 KiB segment
    store = LocalFileStorage(directory, **options)
    n = 0
    while len(store._engine.segments.segments) < 2000:
        store[f"k{n}"] = f"{n}:{value}"
        n += 1
        if n % 50 == 0:
            count()
    for i in range(n):
        assert store[f"k{i}"] == f"{i}:{value}", i
        if i % 50 == 0:
            count()
    store._check()
    store.close()
    print("written", n, "segments", 2000, "most", most, flush=True)

    store = LocalFileStorage(directory, **options)  # the snapshot, checked segment by segment
    assert store.report.snapshot_used
    for i in range(0, n, 7):
        assert store[f"k{i}"] == f"{i}:{value}", i
    count()
    assert dict(store.items()) == {f"k{i}": f"{i}:{value}" for i in range(n)}
    for i in range(n, n + 200):  # writes go on, rolling past the limit
        store[f"k{i}"] = f"{i}:{value}"
        count()
    n += 200
    store.close()

    store = LocalFileStorage(directory, use_snapshot=False, **options)  # a full scan
    assert len(store._engine.segments.segments) >= 2000
    for i in range(n):
        assert store[f"k{i}"] == f"{i}:{value}", i
    count()
    store.close()

    reader = LocalFileStorage(directory, read_only=True)
    for i in reversed(range(n)):
        assert reader[f"k{i}"] == f"{i}:{value}", i
        if i % 50 == 0:
            count()
    reader.close()

    store = LocalFileStorage(directory, **options)
    for i in range(0, n, 2):
        store[f"k{i}"] = "new"
    count()
    result = store.compact()
    assert len(result.inputs) > 2000, result.inputs
    count()
    store._check()
    store.close()
    store = LocalFileStorage(directory, **options)
    assert len(store._engine.segments.segments) <= 3
    for i in range(n):
        assert store[f"k{i}"] == ("new" if i % 2 == 0 else f"{i}:{value}"), i
    store.close()
    print("ok most", most, flush=True)
    """
)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one (creating 2,000 files on a busy
    disk takes seconds), else ``tmp_path``."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="logstate-test-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_store_of_2000_segments_works_under_a_limit_of_256_open_files(fast_dir: Path) -> None:
    """2,000 sealed segments under RLIMIT_NOFILE 256: writes go on past 256
    segments, every key reads back, reopen (snapshot, full scan, read-only)
    and compaction work; the process never holds more than 64 descriptors."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", STORE_SCRIPT, str(fast_dir / "store")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok most" in done.stdout, done.stdout
    most = int(done.stdout.split()[-1])
    # 32 mappings (256 / 8) + the active segment's descriptor and mapping +
    # the lock + a few sealed descriptors not yet closed + the interpreter's own
    assert most <= 64, done.stdout


class LimitFS(FileSystem):
    """The real file system, reporting a descriptor limit of ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def descriptor_limit(self) -> int:
        return self.limit


def test_mapped_segments_are_capped_at_an_eighth_of_the_descriptor_limit(fast_dir: Path) -> None:
    directory = fast_dir / "store"
    store = open_with(LimitFS(64), directory, segment_size=4096, auto_compact=False, sync="none")
    engine = store._engine
    bound = 8 + 9 + 3  # mappings, sealed descriptors not closed yet, active (+ mapping) + lock
    model = {}
    for i in range(600):  # about 150 segments
        store[f"k{i}"] = f"{i}" * 300
        model[f"k{i}"] = f"{i}" * 300
        if i % 10 == 0:
            assert len(descriptors_on(directory)) <= bound, i
    assert len(engine.segments.segments) > 100
    rng = random.Random(5)
    for _ in range(400):
        key = rng.choice(list(model))
        assert store[key] == model[key]
    assert len(descriptors_on(directory)) <= bound
    assert dict(store.items()) == model  # load_namespace reads unmapped segments by name
    store._check()
    assert len(descriptors_on(directory)) <= bound
    assert engine.segments.mapping_cap == 8
    assert len(engine.segments.mapped) <= 8
    store.close()
    assert descriptors_on(directory) == []


def test_readers_racing_unmapping_and_compaction_read_every_value_right(fast_dir: Path) -> None:
    """Threads reading (get, items) while others force mappings out (cap 4) and a
    compaction switches the files: every value read is the one written."""
    directory = fast_dir / "store"
    store = open_with(LimitFS(32), directory, segment_size=4096, auto_compact=False, sync="none")
    model = {f"k{i}": f"{i}" * 200 for i in range(300)}
    for key, value in model.items():
        store[key] = value
    errors: list[BaseException] = []
    compactions = 0

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        keys = list(model)
        try:
            for _ in range(3000):
                key = rng.choice(keys)
                assert store[key] == model[key], key
                if rng.random() < 0.02:
                    assert dict(store.items()) == model
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads) and not errors:
            store.compact()
            compactions += 1
            for key in list(model)[:50]:  # new segments to compact next time
                store[key] = model[key]
    finally:
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "hung"
    assert errors == []
    assert compactions >= 2
    assert len(store._engine.segments.mapped) <= 4
    store._check()
    store.close()
    with LocalFileStorage(directory) as again:
        assert dict(again.items()) == model


# ============================================================================ close(2) fails


class FailingCloseFS(FileSystem):
    """Once armed, every close of a segment's descriptor closes it, then raises EIO
    (what close(2) does on NFS or FUSE: the descriptor is gone, the error reported)."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.armed = False
        self.failed: list[str] = []

    def create_file(self, path: str) -> int:
        fd = super().create_file(path)
        self.paths[fd] = path.removesuffix(".tmp")  # (a new segment is renamed into place)
        return fd

    def open_file(self, path: str) -> int:
        fd = super().open_file(path)
        self.paths[fd] = path
        return fd

    def open_read_only(self, path: str) -> int:
        fd = super().open_read_only(path)
        self.paths[fd] = path
        return fd

    def close(self, fd: int) -> None:
        path = self.paths.pop(fd, "")
        super().close(fd)
        if self.armed and path.endswith(".seg"):
            self.failed.append(path)
            raise OSError(errno.EIO, "injected close failure", path)


@pytest.mark.parametrize("compacted", [False, True])
def test_a_close_whose_close_fails_releases_the_lock_and_raises(
    tmp_path: Path, compacted: bool
) -> None:
    directory = tmp_path / "store"
    fs = FailingCloseFS()
    store = open_with(fs, directory, segment_size=4096, auto_compact=False)
    model = {f"k{i}": f"{i}" * 100 for i in range(200)}
    for key, value in model.items():
        store[key] = value
    if compacted:
        store.compact()
        store["after"] = "compaction"
        model["after"] = "compaction"
    fs.armed = True
    with pytest.raises(OSError) as raised:
        store.close()
    assert raised.value.errno == errno.EIO
    assert fs.failed, "no segment descriptor was closed"
    assert store.closed
    assert registered(directory) == []  # the registry entry is gone
    assert descriptors_on(directory) == []  # every descriptor released, the lock's too
    with LocalFileStorage(directory) as again:  # the same process reopens at once
        assert dict(again.items()) == model
        again._check()


def test_a_failed_close_still_raises_the_failed_final_sync_first(tmp_path: Path) -> None:
    class FailingSyncAndCloseFS(FailingCloseFS):
        def fdatasync(self, fd: int) -> None:
            if self.armed:
                raise OSError(errno.ENOSPC, "injected sync failure")
            super().fdatasync(fd)

    directory = tmp_path / "store"
    fs = FailingSyncAndCloseFS()
    store = open_with(fs, directory, segment_size=4096, sync="none")
    store["a"] = 1
    fs.armed = True
    with pytest.raises(OSError) as raised:
        store.close()
    assert raised.value.errno == errno.ENOSPC  # the sync's: what was written is not durable
    assert descriptors_on(directory) == []
    assert registered(directory) == []
    with LocalFileStorage(directory) as again:
        assert again["a"] == 1


def test_every_read_path_reads_right_through_a_mapping_closed_under_it(fast_dir: Path) -> None:
    """A reader that took a segment's mapping just before it was unmapped finds it
    closed: get, items (load_namespace), checkpoint, _check, the compaction
    reader and the snapshot written at close all read the bytes again (by name)."""
    directory = fast_dir / "store"
    store = open_with(LimitFS(64), directory, segment_size=4096, auto_compact=False, sync="none")
    model: dict[str, object] = {f"k{i}": f"{i}" * 200 for i in range(60)}
    for key, value in model.items():
        store[key] = value
    memory = InMemoryStorage(store)
    for i in range(5):
        memory[f"m{i}"] = i
        model[f"m{i}"] = i
    memory.flush(checkpoint="cp")  # a group, and the checkpoint, in a sealed segment
    store["last"] = "x"
    model["last"] = "x"
    engine = store._engine
    sealed = [s for s in engine.segments.segments.values() if s is not engine.segments.active]
    assert len(sealed) > 3 and all(s.map is not None and s.fd < 0 for s in sealed[:-1])
    for segment in sealed:
        assert segment.map is not None
        segment.map.close()  # still referenced: what an unlocked reader holds
    assert all(store[key] == value for key, value in model.items())
    for segment in sealed:
        if segment.map is not None:
            segment.map.close()
    assert dict(store.items()) == model
    assert store.checkpoint == "cp"
    store._check()
    for segment in engine.segments.segments.values():
        if segment is not engine.segments.active and segment.map is not None:
            segment.map.close()
    store.compact()
    assert dict(store.items()) == model
    for segment in engine.segments.segments.values():
        if segment is not engine.segments.active and segment.map is not None:
            segment.map.close()
    store.close()
    with LocalFileStorage(directory) as again:
        assert again.report.snapshot_used  # the tails were read right at close
        assert dict(again.items()) == model
        assert again.checkpoint == "cp"


def test_a_read_only_open_tells_a_segment_compacted_away_by_the_writer(fast_dir: Path) -> None:
    """A read-only open maps only its newest sealed segments (cap 4 here): an older
    one the writer compacted away since is reported as such, never read as
    another file; what it still maps reads as at its open."""
    directory = fast_dir / "store"
    writer = open_with(LimitFS(1024), directory, segment_size=4096, auto_compact=False)
    model = {f"k{i}": f"{i}" * 200 for i in range(100)}
    for key, value in model.items():
        writer[key] = value
    engine = _registry.acquire_engine(
        str(directory), {"read_only": True}, create=False, fs=LimitFS(32)
    )
    reader = LocalFileStorage(directory, read_only=True)
    _registry.release_engine(engine)
    try:
        writer["k0"] = "new"
        writer.compact()
        assert writer["k0"] == "new"
        assert reader["k99"] == model["k99"]  # in a segment still mapped
        with pytest.raises(CorruptionError, match="replaced or removed since this read-only open"):
            reader["k0"]  # in the first segment: deleted by the compaction
    finally:
        reader.close()
        writer.close()
    with LocalFileStorage(directory, read_only=True) as again:
        assert again["k0"] == "new"
        assert again["k99"] == model["k99"]
