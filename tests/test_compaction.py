"""Compaction scenarios: what ``compact()`` keeps, and what a crash at any step leaves.

The promises checked (issue 4, ``logstate/_compact.py``):

- Compaction never changes the logical contents: a seeded random workload
  (sets, overwrites, removes, clears, sub-storage create/drop, plain and
  zstd-compressed batches, InMemoryStorage flushes with a checkpoint) reads
  the same as a plain dict model before and after ``compact()``, after a
  second compaction and after a reopen; deleted keys never come back; empty
  sub-storages and the checkpoint survive; disk use shrinks.
- Crash at every step: a :class:`CrashFS` raises :class:`SimulatedCrash` at
  the Nth file-system call of a compaction (before the call, or right after
  it) for N = 0, 1, 2... until a compaction completes; the crashed engine is
  abandoned without its close logic (like a killed process) and the
  directory reopens to exactly the model, with no temporary file left, and
  compacts again.
- Open deletes the inputs an output already replaces (the state "renamed but
  not yet deleted") and counts nothing twice; a delete whose tombstone the
  compaction dropped stays deleted.
- Writers running during a compaction lose nothing; readers never see an
  error or a wrong value.
- Automatic compaction keeps disk use within the bound its trigger implies;
  close during a compaction (background, or compact() in another thread)
  neither hangs nor corrupts, and no file is touched once close returned.
- Compaction never touches the active segment (its descriptor or its path).
- A read-only open of a store with compaction leftovers changes no file and
  refuses every write with ReadOnlyStorageError.

Every reopen is checked twice: loading the index snapshot written at close,
and scanning every segment (``use_snapshot=False``), which replays the
compaction output itself.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from logstate import (
    Batch,
    InMemoryStorage,
    LocalFileStorage,
    StorageClosedError,
    _engine,
    _registry,
)
from logstate._compact import CompactionResult
from logstate._filenames import (
    COMPACT_TMP_SUFFIX,
    parse_segment_file_name,
    segment_file_name,
)
from logstate._fs import FileSystem
from logstate._location import KIND_GROUP_OP, location_segment, unpack_location
from tests.helpers import observed_state

T = TypeVar("T")
State = dict[str, dict[str, Any]]  # namespace path ("" = root) -> key -> value

# segment_size 4096: the workload spreads over many small segments
OPTIONS: dict[str, Any] = {"sync": "none", "segment_size": 4096, "auto_compact": False}


# ============================================================================ model


@dataclass
class Model:
    """What the store must contain: namespaces, keys, values, the checkpoint."""

    state: State = field(default_factory=lambda: {"": {}})
    checkpoint: Any = None
    ever_set: set[tuple[str, str]] = field(default_factory=set)

    def copy(self) -> Model:
        return copy.deepcopy(self)

    def deleted(self) -> set[tuple[str, str]]:
        """(namespace, key) pairs once set and now absent: must never come back."""
        return {(ns, k) for ns, k in self.ever_set if k not in self.state.get(ns, {})}

    def ensure(self, ns: str) -> dict[str, Any]:
        parts = ns.split("/") if ns else []
        for i in range(len(parts) + 1):
            self.state.setdefault("/".join(parts[:i]), {})
        return self.state[ns]

    def set(self, ns: str, key: str, value: Any) -> None:
        self.ensure(ns)[key] = value
        self.ever_set.add((ns, key))

    def remove(self, ns: str, key: str) -> None:
        self.state[ns].pop(key, None)

    def clear(self, ns: str) -> None:
        for name in [n for n in self.state if n.startswith(ns + "/") or (n and not ns)]:
            del self.state[name]
        self.state[ns].clear()

    def drop(self, ns: str) -> None:
        for name in [n for n in self.state if n == ns or n.startswith(ns + "/")]:
            del self.state[name]


def handle_for(root: LocalFileStorage, ns: str) -> LocalFileStorage:
    """The handle of an existing namespace (opening it writes nothing)."""
    handle = root
    for part in ns.split("/") if ns else []:
        handle = handle.get_or_create_sub_storage(part)
    return handle


def assert_matches_model(root: LocalFileStorage, model: Model, when: str) -> None:
    """Contents, deleted keys, checkpoint and the engine's invariants."""
    assert observed_state(root) == model.state, f"contents differ from the model {when}"
    engine = root._engine
    resurrected = sorted(
        (ns, key)
        for ns, key in model.deleted()
        if ns in engine.keydir.namespaces and engine.contains(ns, key)
    )
    assert resurrected == [], f"deleted keys came back {when}"
    assert root.checkpoint == model.checkpoint, f"checkpoint differs {when}"
    root._check()


# ============================================================================ workload

SUB_STORAGES = ("a", "a/b", "c", "c/d", "e")  # the random ops create and drop these
KEY_POOL = tuple(f"k{i:02d}" for i in range(24))  # few keys: many overwrites


def random_value(rng: random.Random, step: int) -> Any:
    """A value of a random type that embeds ``step`` (an old version is recognisable)."""
    filler = "".join(rng.choices("abcdefghij", k=rng.randrange(0, 160)))
    kind = rng.randrange(6)
    if kind == 0:
        return step * 1000 + rng.randrange(1000)
    if kind == 1:
        return f"{step}:{filler}"
    if kind == 2:
        return f"{step}:{filler}".encode()
    if kind == 3:
        return [step, filler, rng.random()]
    if kind == 4:
        return (step, {"nested": filler})
    return {"step": step, "flag": rng.random() < 0.5}


def random_step(
    root: LocalFileStorage, model: Model, rng: random.Random, step: int, checkpoints: bool
) -> None:
    """Perform one random operation on the store and on the model."""
    namespaces = sorted(n for n in model.state if not n.startswith("empty"))
    ns = rng.choice(namespaces)
    roll = rng.random()
    if roll < 0.45:
        key, value = rng.choice(KEY_POOL), random_value(rng, step)
        handle_for(root, ns)[key] = value
        model.set(ns, key, value)
    elif roll < 0.60:
        present = sorted(model.state[ns])
        key = rng.choice(present) if present else rng.choice(KEY_POOL)
        handle_for(root, ns).remove(key)
        model.remove(ns, key)
    elif roll < 0.70:
        handle = handle_for(root, ns)
        with handle.batch() as batch:
            if ns and rng.random() < 0.15:  # a clear of the root would drop "empty"
                batch.clear()
                model.clear(ns)
            for i in range(rng.randrange(2, 7)):
                key = rng.choice(KEY_POOL)
                if rng.random() < 0.7:
                    value = random_value(rng, step * 10 + i)
                    batch.set(key, value)
                    model.set(ns, key, value)
                else:
                    batch.remove(key)
                    model.remove(ns, key)
    elif roll < 0.78:
        candidates = [
            n for n in SUB_STORAGES if n not in model.state and n.rpartition("/")[0] in model.state
        ]
        if candidates:
            new = rng.choice(candidates)
            parent, _, name = new.rpartition("/")
            handle_for(root, parent).get_or_create_sub_storage(name)
            model.ensure(new)
    elif roll < 0.83:
        if ns:
            parent, _, name = ns.rpartition("/")
            assert handle_for(root, parent).delete_sub_storage(name)
            model.drop(ns)
    elif roll < 0.88:
        if ns:
            handle_for(root, ns).clear()
            model.clear(ns)
    else:
        memory = InMemoryStorage(handle_for(root, ns))
        for i in range(rng.randrange(0, 4)):
            key = rng.choice(KEY_POOL)
            if key in memory and rng.random() < 0.3:
                del memory[key]
                model.remove(ns, key)
            else:
                value = random_value(rng, step * 10 + i)
                memory[key] = value
                model.set(ns, key, value)
        if checkpoints:
            checkpoint = {"offsets": [step, rng.randrange(1000)]}
            memory.flush(checkpoint=checkpoint)
            model.checkpoint = copy.deepcopy(checkpoint)
        else:
            memory.flush()


@dataclass
class Template:
    """A store built once per module; tests copy its directory."""

    directory: Path
    model: Model

    def copy_to(self, directory: Path) -> Model:
        shutil.copytree(self.directory, directory)
        return self.model.copy()


def build_workload(directory: Path, seed: int) -> Model:
    """Three sessions: plain groups, zstd-compressed groups (compress_min_size=0), plain again."""
    rng = random.Random(seed)
    model = Model()
    step = 0
    with LocalFileStorage(directory, **OPTIONS, compress_min_size=None) as root:
        root.get_or_create_sub_storage("empty").get_or_create_sub_storage("inner")
        model.ensure("empty/inner")
        for _ in range(260):
            step += 1
            random_step(root, model, rng, step, checkpoints=True)
    with LocalFileStorage(directory, **OPTIONS, compress_min_size=0) as root:
        for _ in range(120):
            step += 1
            random_step(root, model, rng, step, checkpoints=True)
        with root.batch() as batch:  # a compressed group whose keys nothing overwrites
            for key in ("z1", "z2", "z3"):
                batch.set(key, f"zstd {key}" * 20)
                model.set("", key, f"zstd {key}" * 20)
            batch.remove("k00")
            model.remove("", "k00")
        memory = InMemoryStorage(root)
        memory["z4"] = "flushed with the checkpoint " * 20  # compressible: kept compressed
        model.set("", "z4", "flushed with the checkpoint " * 20)
        memory.flush(checkpoint={"topic": [1, 2, 3]})  # the last checkpoint written
        model.checkpoint = {"topic": [1, 2, 3]}
    with LocalFileStorage(directory, **OPTIONS, compress_min_size=None) as root:
        for _ in range(150):
            step += 1
            random_step(root, model, rng, step, checkpoints=False)
        with root.batch() as batch:  # an uncompressed group nothing overwrites
            batch.set("g1", "in a plain group")
            batch.set("g2", b"also in a plain group")
        model.set("", "g1", "in a plain group")
        model.set("", "g2", b"also in a plain group")
        # preconditions that make the scenario meaningful
        engine = root._engine
        locations = [loc for index in engine.keydir.namespaces.values() for loc in index.values()]
        assert any(type(loc) is tuple for loc in locations), "no value in a zstd group"
        assert any(
            type(loc) is int and unpack_location(loc)[3] == KIND_GROUP_OP for loc in locations
        ), "no value in a plain group"
        assert type(engine.keydir.checkpoint) is tuple, "checkpoint should be in a zstd group"
        assert len(engine.segments.segments) >= 8, "the workload should span many segments"
        assert engine.segments.active is not None and engine.segments.active.size > 100
        assert len(model.deleted()) >= 10
        assert observed_state(root) == model.state
    return model


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    directory = tmp_path_factory.mktemp("template") / "store"
    return Template(directory, build_workload(directory, seed=4))


# ============================================================================ files


def listing(directory: Path) -> dict[str, str]:
    """name -> sha256 of every file (LOCK aside): what a read-only open must not change."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.name != "LOCK"
    }


def segment_numbers(directory: Path) -> list[int]:
    return sorted(
        n for n in (parse_segment_file_name(p.name) for p in directory.iterdir()) if n is not None
    )


def disk_bytes(directory: Path) -> int:
    """Bytes of every segment file, temporary outputs included."""
    total = 0
    for entry in os.scandir(directory):
        if entry.name.startswith("segment-"):
            with contextlib.suppress(FileNotFoundError):  # deleted by a compaction meanwhile
                total += entry.stat().st_size
    return total


def temporary_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# An open after a clean close loads the index snapshot instead of replaying the
# segments; the second way replays them, the compaction output's records included.
REOPENS: dict[str, dict[str, Any]] = {
    "using the index snapshot": {},
    "scanning every segment": {"use_snapshot": False},
}


def reopened(directory: Path, **options: Any) -> Iterator[tuple[str, LocalFileStorage]]:
    """Open ``directory`` once per way of loading the index, in turn."""
    for how, extra in REOPENS.items():
        with LocalFileStorage(directory, **options, **extra) as root:
            yield how, root


def copies(directory: Path) -> Iterator[tuple[str, Path]]:
    """``directory`` and a copy of it, one per way of loading the index: for a
    state that the first open changes (leftovers it deletes, a stale snapshot)."""
    paths = [directory]
    for i in range(1, len(REOPENS)):
        paths.append(directory.with_name(f"{directory.name}-{i}"))
        shutil.copytree(directory, paths[-1])
    yield from zip(REOPENS, paths, strict=True)


def open_with(fs: FileSystem, directory: Path, **options: Any) -> LocalFileStorage:
    """A public handle on an engine that uses ``fs`` (the handle holds the only reference)."""
    engine = _registry.acquire_engine(str(directory), options, create=True, fs=fs)
    handle = LocalFileStorage(directory)
    _registry.release_engine(engine)
    assert handle._engine is engine
    return handle


def inside_roll() -> bool:
    """True when called (through the file system) from ``Appender.roll``: sealing the
    active segment and creating the next one, which writers do too."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "roll" and frame.f_code.co_filename.endswith("_append.py"):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class TrackingFS(FileSystem):
    """Keeps the set of descriptors it opened and not yet closed (to find leaks)."""

    def __init__(self) -> None:
        self.open_fds: set[int] = set()
        self._fds_lock = threading.Lock()

    def _opened(self, fd: int) -> int:
        with self._fds_lock:
            self.open_fds.add(fd)
        return fd

    def _closing(self, fd: int) -> None:
        with self._fds_lock:
            assert fd in self.open_fds, f"close of descriptor {fd}, which is not open"
            self.open_fds.discard(fd)

    def create_file(self, path: str) -> int:
        return self._opened(super().create_file(path))

    def open_file(self, path: str) -> int:
        return self._opened(super().open_file(path))

    def open_read_only(self, path: str) -> int:
        return self._opened(super().open_read_only(path))

    def lock_dir(self, path: str) -> int:
        return self._opened(super().lock_dir(path))

    def close(self, fd: int) -> None:
        self._closing(fd)
        super().close(fd)

    def unlock_dir(self, fd: int, path: str | None = None) -> None:
        self._closing(fd)
        super().unlock_dir(fd, path)

    def write_new_file(self, path: str, data: bytes | bytearray | memoryview) -> None:
        fd = self.create_file(path)
        try:
            self.append(fd, data)
            self.fsync(fd)
        finally:
            self.close(fd)


# ============================================================================ 1. contents


def test_compaction_keeps_contents_sub_storages_and_checkpoint_and_shrinks_the_disk(
    tmp_path: Path, template: Template
) -> None:
    directory = tmp_path / "store"
    model = template.copy_to(directory)
    with LocalFileStorage(directory, **OPTIONS) as root:
        assert_matches_model(root, model, "before compaction")
        bytes_before = disk_bytes(directory)
        numbers_before = segment_numbers(directory)

        result = root.compact()
        assert result.inputs == numbers_before, "every segment is sealed and compacted"
        assert result.output == numbers_before[-1]
        assert result.bytes_after < result.bytes_before
        assert_matches_model(root, model, "after compaction")
        assert root.get_sub_storages() == sorted(n for n in model.state if n and "/" not in n)
        assert dict(root.get_or_create_sub_storage("empty").items()) == {}
        assert segment_numbers(directory) == [result.output, result.output + 1]
        bytes_after = disk_bytes(directory)
        assert bytes_after < bytes_before / 2, (bytes_before, bytes_after)
        stats = root.stats()
        assert stats["total_bytes"] == bytes_after
        assert stats["keys"] == sum(len(keys) for keys in model.state.values())
        assert stats["sub_storages"] == len(model.state) - 1

        again = root.compact()  # twice in a row: the output is compacted alone
        assert again.inputs == [result.output]
        assert again.bytes_after <= again.bytes_before
        assert_matches_model(root, model, "after a second compaction")
        assert root.stats() == stats
        assert temporary_files(directory) == []

    for how, root in reopened(directory, **OPTIONS):
        assert_matches_model(root, model, f"after reopening the compacted store {how}")
        assert root._engine.report.clean
        assert root.stats() == stats, f"reopen {how} must count what the engine counted"
    with LocalFileStorage(directory, **OPTIONS) as root:
        root["after"] = "reopen"
        model.set("", "after", "reopen")
        root.compact()
        assert_matches_model(root, model, "after compacting the reopened store")
    for how, root in reopened(directory, **OPTIONS):
        assert_matches_model(root, model, f"after the last reopen {how}")


# ======================================================================= 2. crash at every step


class SimulatedCrash(BaseException):
    """The process died here (not an Exception: nothing may catch it and carry on)."""


class CrashFS(TrackingFS):
    """Counts every file-system call once armed; at call ``crash_at`` the process "dies".

    ``crash_after`` False: the call never happens. True: the call completes,
    then the process dies before using its result. Once crashed, every call
    raises without effect (a dead process does nothing more).
    """

    def __init__(self) -> None:
        super().__init__()
        self.crash_at: int | None = None
        self.crash_after = False
        self.crashed = False
        self.abandoning = False
        self.steps: list[str] = []

    def arm(self, crash_at: int, crash_after: bool) -> None:
        self.crash_at, self.crash_after, self.steps = crash_at, crash_after, []

    def _run(self, name: str, call: Callable[[], T]) -> T:
        if self.crashed:
            raise SimulatedCrash(f"{name} called after the crash")
        if self.crash_at is None:
            return call()
        step = len(self.steps)
        self.steps.append(name)
        if step != self.crash_at:
            return call()
        self.crashed = True
        if self.crash_after:
            call()
        raise SimulatedCrash(f"crash at step {step}: {name}")

    def abandon(self, engine: _engine.Engine) -> None:
        """Drop a crashed engine like a killed process: no sync, no cleanup, fds released."""
        self.crash_at, self.crashed, self.abandoning = None, False, True
        _registry.abandon_engine(engine)
        for fd in sorted(self.open_fds):  # e.g. the temporary output's descriptor
            FileSystem.close(self, fd)
        self.open_fds.clear()

    def close(self, fd: int) -> None:
        if self.abandoning and fd not in self.open_fds:
            return  # the crash interrupted a close loop: never close a number twice
        self._run("close", lambda: TrackingFS.close(self, fd))


def _counted_step(name: str) -> Callable[..., Any]:
    def method(self: CrashFS, *args: Any) -> Any:
        return self._run(name, lambda: getattr(TrackingFS, name)(self, *args))

    method.__name__ = method.__qualname__ = name
    return method


# Every public call of the file-system layer (present and future) counts as one step.
for _name, _value in vars(FileSystem).items():
    if callable(_value) and not _name.startswith("_") and _name not in vars(CrashFS):
        setattr(CrashFS, _name, _counted_step(_name))


def prepare_several_inputs(root: LocalFileStorage, model: Model) -> None:
    """Nothing more: the template spans many segments, its active one not empty."""


def prepare_tombstones_newer_than_the_sets_they_hide(root: LocalFileStorage, model: Model) -> None:
    """Compact once (in this session), then hide keys of the output from newer segments.

    The compaction under test then covers the first output (the sets) and the
    segments holding the deletes, clears and drops that hide them; a key
    deleted before being set again must keep its newer value.
    """
    root.compact()
    output = max(root._engine.segments.segments) - 1
    in_output = [
        (ns, key)
        for ns, index in root._engine.keydir.namespaces.items()
        for key, loc in index.items()
        if location_segment(loc) == output and not ns.startswith("empty")
    ]
    assert len(in_output) > 20
    for ns, key in in_output[::3]:
        handle_for(root, ns).remove(key)
        model.remove(ns, key)
    root.remove("z1")  # a key of the compressed group: deleted, then set again
    model.remove("", "z1")
    for i in range(60):  # push the tombstones into sealed segments
        root[f"filler{i % 7}"] = "f" * 120
        model.set("", f"filler{i % 7}", "f" * 120)
    root["z1"] = "set again after its delete"
    model.set("", "z1", "set again after its delete")
    subs = sorted(n for n in model.state if n and not n.startswith("empty"))
    assert subs, "the workload should leave sub-storages"
    handle_for(root, subs[0]).clear()
    model.clear(subs[0])
    if len(subs) > 1 and not subs[-1].startswith(subs[0] + "/"):
        parent, _, name = subs[-1].rpartition("/")
        handle_for(root, parent).delete_sub_storage(name)
        model.drop(subs[-1])
    memory = InMemoryStorage(root)
    memory.flush(checkpoint="a plain checkpoint record")  # no change: checkpoint only
    model.checkpoint = "a plain checkpoint record"
    for i in range(40):
        root[f"filler{i % 5}"] = "g" * 120
        model.set("", f"filler{i % 5}", "g" * 120)
    root.remove("filler0")
    model.remove("", "filler0")


def prepare_recompaction_of_a_compacted_store(root: LocalFileStorage, model: Model) -> None:
    """Compact once: the next compaction rewrites the output alone (no roll)."""
    root.compact()


SCENARIOS: dict[str, Callable[[LocalFileStorage, Model], None]] = {
    "several-inputs": prepare_several_inputs,
    "tombstones-newer-than-the-sets-they-hide": prepare_tombstones_newer_than_the_sets_they_hide,
    "recompaction-of-a-compacted-store": prepare_recompaction_of_a_compacted_store,
}


def compaction_steps(directory: Path) -> list[str]:
    """The file-system calls a compaction of (a copy of) ``directory`` makes, in order."""
    copy_dir = directory.parent / f"{directory.name}-steps"
    shutil.copytree(directory, copy_dir)
    fs = CrashFS()
    root = open_with(fs, copy_dir, **OPTIONS)
    fs.arm(-1, crash_after=False)  # count, never crash
    root._engine.compact()
    fs.crash_at = None
    root.close()
    shutil.rmtree(copy_dir)
    return fs.steps


# (the output keeps the descriptor it was written with: no open after the rename)
STEP_KINDS = {"create_file", "append", "fdatasync", "close", "rename", "fsync_dir"}


def crash_compaction(
    directory: Path, model: Model, scenario: str, crash_at: int, crash_after: bool
) -> tuple[bool, list[str]]:
    """Run the scenario's compaction with a crash at step ``crash_at``.

    Returns:
        (crashed, the steps counted); the engine is abandoned when it crashed,
        closed normally otherwise.
    """
    fs = CrashFS()
    root = open_with(fs, directory, **OPTIONS)
    engine = root._engine
    SCENARIOS[scenario](root, model)
    assert_matches_model(root, model, "before the compaction under test")
    fs.arm(crash_at, crash_after)
    try:
        engine.compact()
    except SimulatedCrash:
        fs.abandon(engine)
        return True, fs.steps
    fs.crash_at = None
    assert_matches_model(root, model, "after a compaction that did not crash")
    root.close()
    assert fs.open_fds == set(), "descriptors left open after close"
    return False, fs.steps


def check_reopens_to_the_model(directory: Path, model: Model, when: str) -> None:
    """Open the crashed store both ways (on copies); the first one then compacts again."""
    for how, path in copies(directory):
        with LocalFileStorage(path, **OPTIONS, **REOPENS[how]) as root:
            assert temporary_files(path) == [], f"temporary files left {when}, open {how}"
            assert_matches_model(root, model, f"{when}, open {how}")
            if path == directory:
                result = root.compact()
                assert result.output is not None
                assert_matches_model(root, model, f"{when}, compacted again")
        if path != directory:
            shutil.rmtree(path)
    with LocalFileStorage(directory, **OPTIONS, use_snapshot=False) as root:
        assert_matches_model(root, model, f"{when}, compacted again, reopened")
        assert len(segment_numbers(directory)) == 2


@pytest.mark.parametrize("when", ["fail-before-the-call", "stop-right-after-the-call"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crash_at_every_step_of_compaction_reopens_to_the_same_contents(
    tmp_path: Path, template: Template, scenario: str, when: str
) -> None:
    crash_at = 0
    while True:
        directory = tmp_path / f"crash-{crash_at}"
        model = template.copy_to(directory)
        crashed, steps = crash_compaction(
            directory, model, scenario, crash_at, when == "stop-right-after-the-call"
        )
        where = f"after a crash at step {crash_at} ({steps[-1] if crashed else 'none'})"
        check_reopens_to_the_model(directory, model, where)
        shutil.rmtree(directory)
        if not crashed:
            break
        crash_at += 1
    assert crash_at == len(steps), "every step of the compaction was crashed once"
    several_inputs = scenario != "recompaction-of-a-compacted-store"
    required = STEP_KINDS | {"unlink"} if several_inputs else STEP_KINDS
    assert set(steps) >= required, f"steps seen: {steps}"


# ============================================================================ 3. tombstones


def active_number(engine: _engine.Engine) -> int:
    assert engine.segments.active is not None
    return engine.segments.active.number


def build_victim_store(directory: Path) -> dict[str, Any]:
    """'victim' and a sub-storage's keys set in segment 1, hidden from segment 3 on.

    Returns:
        The expected root contents.
    """
    expected: dict[str, Any] = {}
    with LocalFileStorage(directory, **OPTIONS) as root:
        root["victim"] = "must stay deleted"
        sub = root.get_or_create_sub_storage("sub")
        sub["hidden"] = "cleared later"
        doomed = root.get_or_create_sub_storage("doomed")
        doomed["x"] = "dropped later"
        engine = root._engine
        assert location_segment(engine.keydir.namespaces[""]["victim"]) == 1
        i = 0
        while active_number(engine) < 3:
            root[f"fill{i % 9}"] = f"{i}" * 100
            expected[f"fill{i % 9}"] = f"{i}" * 100
            i += 1
        root.remove("victim")
        sub.clear()
        root.delete_sub_storage("doomed")
        assert active_number(engine) >= 3
        for j in range(30):  # seal the tombstones too
            root[f"more{j % 4}"] = f"{j}" * 100
            expected[f"more{j % 4}"] = f"{j}" * 100
    return expected


def test_key_deleted_segments_after_its_set_stays_deleted_after_compaction_and_reopen(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    expected = build_victim_store(directory)
    with LocalFileStorage(directory, **OPTIONS) as root:
        root.compact()
        assert "victim" not in root
        assert dict(root.items()) == expected
        assert dict(root.get_or_create_sub_storage("sub").items()) == {}
        assert root.get_sub_storages() == ["sub"]
    for how, root in reopened(directory, **OPTIONS):
        assert "victim" not in root and root.get("victim") is None, how
        assert dict(root.items()) == expected, how
        assert root.get_sub_storages() == ["sub"], how
        assert dict(root.get_or_create_sub_storage("sub").items()) == {}, how
        root._check()


def test_open_deletes_inputs_left_behind_by_a_compaction_and_counts_nothing_twice(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    expected = build_victim_store(directory)
    saved = tmp_path / "saved"
    shutil.copytree(directory, saved)
    with LocalFileStorage(directory, **OPTIONS) as root:
        result = root.compact()
        assert result.output is not None and len(result.inputs) >= 4
    clean = tmp_path / "clean"
    shutil.copytree(directory, clean)
    # the state "output renamed into place, inputs not yet deleted"
    for number in result.inputs[:-1]:
        name = segment_file_name(number)
        assert not (directory / name).exists()
        shutil.copy2(saved / name, directory / name)
    with LocalFileStorage(clean, **OPTIONS) as reference:
        reference_stats = reference.stats()
    for how, path in copies(directory):
        with LocalFileStorage(path, **OPTIONS, **REOPENS[how]) as root:
            assert segment_numbers(path) == [result.output, result.output + 1], how
            assert "victim" not in root, f"a delete whose tombstone was dropped came back ({how})"
            assert dict(root.items()) == expected, how
            assert root.get_sub_storages() == ["sub"], how
            assert dict(root.get_or_create_sub_storage("sub").items()) == {}, how
            assert root.stats() == reference_stats, f"leftover inputs were counted ({how})"
            assert len(root) == len(expected), how
            root._check()


def test_crash_right_after_the_rename_leaves_inputs_that_open_deletes(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    expected = build_victim_store(directory)
    numbers = segment_numbers(directory)
    steps = compaction_steps(directory)
    fs = CrashFS()
    root = open_with(fs, directory, **OPTIONS)
    # the compaction's rename: the last one (the roll that seals the active segment first
    # renames its new segment into place)
    fs.arm(max(i for i, name in enumerate(steps) if name == "rename"), crash_after=True)
    with pytest.raises(SimulatedCrash):
        root._engine.compact()
    fs.abandon(root._engine)
    left = segment_numbers(directory)
    assert left == [*numbers, numbers[-1] + 1], "inputs left next to the renamed output"
    assert temporary_files(directory) == []
    for how, path in copies(directory):
        with LocalFileStorage(path, **OPTIONS, **REOPENS[how]) as again:
            assert segment_numbers(path) == [numbers[-1], numbers[-1] + 1], how
            assert "victim" not in again, how
            assert dict(again.items()) == expected, how
            assert dict(again.get_or_create_sub_storage("sub").items()) == {}, how
            assert again.get_sub_storages() == ["sub"], how
            again._check()


# ============================================================================ 4. concurrency

DELETED: Any = object()


def test_writers_running_during_compactions_lose_no_write_and_resurrect_no_delete(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    root = LocalFileStorage(directory, **OPTIONS)
    stop = threading.Event()
    models: list[dict[tuple[str, str], Any]] = [{} for _ in range(3)]  # (ns, key) -> value
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        rng = random.Random(number)
        mine = models[number]
        sub = root.get_or_create_sub_storage(f"w{number}")
        step = 0
        try:
            while not stop.is_set() or step < 300:
                step += 1
                key = f"w{number}-{rng.randrange(150)}"
                roll = rng.random()
                if roll < 0.5:
                    root[key] = f"{key}={step}"
                    mine["", key] = f"{key}={step}"
                elif roll < 0.7:
                    root.remove(key)
                    mine["", key] = DELETED
                elif roll < 0.85:
                    with root.batch() as batch:
                        for i in range(rng.randrange(1, 6)):
                            other = f"w{number}-{rng.randrange(150)}"
                            if rng.random() < 0.7:
                                batch.set(other, f"{other}={step}.{i}")
                                mine["", other] = f"{other}={step}.{i}"
                            else:
                                batch.remove(other)
                                mine["", other] = DELETED
                elif roll < 0.98:
                    sub[f"s{step % 20}"] = step
                    mine[sub.name, f"s{step % 20}"] = step
                else:
                    sub.clear()
                    for ns, k in mine:
                        if ns:
                            mine[ns, k] = DELETED
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    compactions = 0
    try:
        while compactions < 12 and not errors:
            time.sleep(0.01)
            result = root.compact()
            compactions += result.output is not None
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert errors == []
    assert compactions == 12

    def expected() -> State:
        state: State = {"": {}, "w0": {}, "w1": {}, "w2": {}}
        for mine in models:
            for (ns, key), value in mine.items():
                if value is not DELETED:
                    state[ns][key] = value
        return state

    assert observed_state(root) == expected(), "a write was lost or a delete undone"
    root._check()
    root.close()
    for how, again in reopened(directory, **OPTIONS):
        assert observed_state(again) == expected(), f"after reopen {how}"
        again._check()


def test_readers_during_compaction_never_get_an_error_or_a_wrong_value(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    root = LocalFileStorage(directory, sync="none", segment_size=1 << 20, auto_compact=False)
    keys = [f"r{i}" for i in range(4000)]
    for version in range(3):  # dead versions: every compaction moves every key
        for key in keys:
            root[key] = f"{key}:v{version}"
    stop = threading.Event()
    problems: list[str] = []

    def reader(start: int) -> None:
        i = start
        while not stop.is_set() and len(problems) < 5:
            key = keys[i % len(keys)]
            try:
                value = root[key]
                if value != f"{key}:v2":
                    problems.append(f"{key} read as {value!r}")
            except BaseException as exc:
                problems.append(f"{key}: {exc!r}")
            i += 7

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: readers run during the switch
    readers = [threading.Thread(target=reader, args=(n * 1000,)) for n in range(2)]
    try:
        for t in readers:
            t.start()
        deadline = time.monotonic() + 4
        compactions = 0
        while time.monotonic() < deadline and compactions < 20 and not problems:
            root["other"] = compactions  # something new to seal
            root.compact()
            compactions += 1
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=30)
        sys.setswitchinterval(old_interval)
    root.close()
    assert problems == [], f"readers during compaction saw: {problems}"


# ====================================================================== 5. automatic compaction

AUTO_SEGMENT_SIZE = 8192
AUTO_RATIO = 0.5
AUTO_MIN_SIZE = 16384
AUTO: dict[str, Any] = {
    "sync": "none",
    "segment_size": AUTO_SEGMENT_SIZE,
    "auto_compact": True,
    "compact_ratio": AUTO_RATIO,
    "compact_min_size": AUTO_MIN_SIZE,
}


def overwrite_key(i: int) -> tuple[str, str]:
    """The i-th set of the overwrite-heavy load: 50 keys, records of one size."""
    return f"key{i % 50:03d}", f"value-{i:08d}-" + "x" * 40


def test_automatic_compaction_keeps_disk_use_within_the_trigger_bound(tmp_path: Path) -> None:
    """Bound on disk use while 20,000 sets overwrite 50 keys.

    With L live bytes, ratio r, minimum size m and segment size S, a roll
    starts a compaction once the store holds T = max(m, L / (1 - r)) bytes
    (then dead >= r * total). The roll before did not trigger, so at most
    T + S bytes are sealed when a compaction starts; while it runs the disk
    also holds the segment it sealed early (< S), the active one being filled
    (< S) and its temporary output (about L < S). Hence:

        disk bytes    <= T + 3 * S
        segment files <= 3 + ceil((T + S) / (S - R))   (R: one record's size;
                         a segment rolls only when the next record does not fit)
    """
    directory = tmp_path / "store"
    root = LocalFileStorage(directory, **AUTO)
    model: dict[str, str] = {}
    for i in range(50):
        key, value = overwrite_key(i)
        root[key] = value
        model[key] = value
    live_bytes = root.stats()["live_bytes"]
    record_size = live_bytes // 50
    segment_size = AUTO_SEGMENT_SIZE
    trigger = max(AUTO_MIN_SIZE, live_bytes / (1 - AUTO_RATIO))
    max_bytes = trigger + 3 * segment_size
    max_files = 3 + math.ceil((trigger + segment_size) / (segment_size - record_size))
    peak_bytes = peak_files = 0
    for i in range(50, 20_000):
        key, value = overwrite_key(i)
        root[key] = value
        model[key] = value
        if i % 5 == 0:
            peak_bytes = max(peak_bytes, disk_bytes(directory))
            peak_files = max(peak_files, len(segment_numbers(directory)))
    closer = threading.Thread(target=root.close)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "close hung"
    for how, again in reopened(directory, **AUTO):
        assert dict(again.items()) == model, how
        again._check()
    assert peak_bytes <= max_bytes, (
        f"disk reached {peak_bytes} bytes; bound {max_bytes:.0f} "
        f"(T={trigger:.0f}, S={segment_size})"
    )
    assert peak_files <= max_files, f"{peak_files} segment files; bound {max_files}"


class PausingFS(TrackingFS):
    """Stops the background compaction thread at its first ``method`` call (rolls aside)."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.reached = threading.Event()
        self.release = threading.Event()

    def _pause(self, method: str) -> None:
        if (
            method == self.method
            and not self.reached.is_set()
            and threading.current_thread().name.startswith("logstate-compact")
            and not inside_roll()
        ):
            self.reached.set()
            assert self.release.wait(timeout=30)

    def create_file(self, path: str) -> int:
        self._pause("create_file")
        return super().create_file(path)

    def append(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        self._pause("append")
        super().append(fd, data)

    def fdatasync(self, fd: int) -> None:
        self._pause("fdatasync")
        super().fdatasync(fd)

    def rename(self, src: str, dst: str) -> None:
        self._pause("rename")
        super().rename(src, dst)

    def fsync_dir(self, path: str) -> None:
        self._pause("fsync_dir")
        super().fsync_dir(path)

    def open_file(self, path: str) -> int:
        self._pause("open_file")
        return super().open_file(path)

    def unlink(self, path: str) -> None:
        self._pause("unlink")
        super().unlink(path)


@pytest.mark.parametrize(
    "paused_at",
    ["create_file", "append", "fdatasync", "rename", "fsync_dir", "unlink"],
)
def test_close_during_a_background_compaction_neither_hangs_nor_corrupts(
    tmp_path: Path, paused_at: str
) -> None:
    directory = tmp_path / "store"
    fs = PausingFS(paused_at)
    root = open_with(fs, directory, **AUTO)
    engine = root._engine
    model: dict[str, str] = {}
    refused: list[BaseException] = []

    def writer() -> None:  # in a thread: a writer may wait for the paused compaction
        i = 0
        try:
            while not fs.reached.is_set() and i < 100_000:
                key, value = overwrite_key(i)
                root[key] = value
                model[key] = value  # acknowledged
                i += 1
        except StorageClosedError as exc:
            refused.append(exc)

    writing = threading.Thread(target=writer)
    writing.start()
    assert fs.reached.wait(timeout=30), "no background compaction started"
    closer = threading.Thread(target=root.close)
    closer.start()
    deadline = time.monotonic() + 10
    while not engine.life.closing and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.life.closing
    fs.release.set()
    closer.join(timeout=30)
    writing.join(timeout=30)
    assert not closer.is_alive(), "close hung on the background compaction"
    assert not writing.is_alive()
    assert engine.closed
    assert fs.open_fds == set(), "descriptors left open by close"
    assert temporary_files(directory) == [], "a stopped compaction left its output"
    for how, again in reopened(directory, **AUTO):
        assert temporary_files(directory) == [], how
        assert dict(again.items()) == model, how
        assert again._engine.report.clean, how
        again._check()


class CallerPausingFS(TrackingFS):
    """Stops a thread named ``compactor`` at its first ``method`` call (rolls aside) and
    records every call that thread makes after ``closed`` is set."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.reached = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()
        self.after_close: list[str] = []

    def _pause(self, method: str) -> None:
        if threading.current_thread().name != "compactor":
            return
        if method == self.method and not self.reached.is_set() and not inside_roll():
            self.reached.set()
            assert self.release.wait(timeout=30)
        if self.closed.is_set():
            self.after_close.append(method)


def _pausing_call(name: str) -> Callable[..., Any]:
    def method(self: CallerPausingFS, *args: Any) -> Any:
        self._pause(name)
        return getattr(TrackingFS, name)(self, *args)

    method.__name__ = method.__qualname__ = name
    return method


for _name, _value in vars(FileSystem).items():
    if callable(_value) and not _name.startswith("_"):
        setattr(CallerPausingFS, _name, _pausing_call(_name))


@pytest.mark.parametrize("paused_at", ["read_all", "create_file", "rename", "unlink"])
def test_close_lets_no_compaction_started_by_another_thread_touch_files_afterwards(
    tmp_path: Path, paused_at: str
) -> None:
    """A compaction run with compact() in another thread (a maintenance thread) and a
    close: close may wait for it or stop it, but once close has returned (directory
    lock released, descriptors closed) the compaction must not touch a file."""
    directory = tmp_path / "store"
    fs = CallerPausingFS(paused_at)
    root = open_with(fs, directory, **OPTIONS)
    model: dict[str, str] = {}
    for i in range(400):
        root[f"k{i % 30}"] = f"{i}" * 50
        model[f"k{i % 30}"] = f"{i}" * 50
    outcome: list[object] = []

    def compactor() -> None:
        try:
            outcome.append(root.compact())
        except BaseException as exc:
            outcome.append(exc)

    def closer() -> None:
        root.close()
        fs.closed.set()

    compacting = threading.Thread(target=compactor, name="compactor")
    compacting.start()
    assert fs.reached.wait(timeout=10)
    closing = threading.Thread(target=closer)
    closing.start()
    closing.join(timeout=0.5)  # returns now only if close does not wait for the compaction
    fs.release.set()
    compacting.join(timeout=30)
    closing.join(timeout=30)
    assert not closing.is_alive() and not compacting.is_alive(), "hung"
    assert fs.after_close == [], f"calls after close() returned; compact() gave {outcome!r}"
    assert len(outcome) == 1
    assert not isinstance(outcome[0], BaseException) or isinstance(
        outcome[0], StorageClosedError
    ), f"compact() raised {outcome[0]!r}"
    assert fs.open_fds == set(), "descriptors left open"
    for how, again in reopened(directory, **OPTIONS):
        assert temporary_files(directory) == [], how
        assert dict(again.items()) == model, how
        again._check()


# ============================================================================ 6. active segment


@dataclass
class Call:
    thread: int
    method: str
    path: str
    in_roll: bool


class SpyFS(TrackingFS):
    """Records each call with the path it concerns (a descriptor is mapped to its file)."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.calls: list[Call] = []
        self.paths: dict[int, str] = {}
        self._calls_lock = threading.Lock()
        self.compactor: int | None = None  # thread ident of the compacting thread
        self.other_appends = 0  # appends by other threads (the writers)
        self.appends_while_held = 0  # writers' appends the compaction waits for

    def _hold(self) -> None:
        """Keep the compaction (at its output's creation) until writers appended enough."""
        target = self.other_appends + self.appends_while_held
        deadline = time.monotonic() + 30
        while self.other_appends < target and time.monotonic() < deadline:
            time.sleep(0.001)

    def _note(self, method: str, path: str) -> None:
        if self.recording:
            with self._calls_lock:
                self.calls.append(Call(threading.get_ident(), method, path, inside_roll()))

    def _fd(self, method: str, fd: int) -> None:
        self._note(method, self.paths.get(fd, f"fd {fd}"))

    def create_file(self, path: str) -> int:
        self._note("create_file", path)
        if path.endswith(COMPACT_TMP_SUFFIX) and threading.get_ident() == self.compactor:
            self._hold()
        fd = super().create_file(path)
        self.paths[fd] = path
        return fd

    def open_file(self, path: str) -> int:
        self._note("open_file", path)
        fd = super().open_file(path)
        self.paths[fd] = path
        return fd

    def open_read_only(self, path: str) -> int:
        self._note("open_read_only", path)
        fd = super().open_read_only(path)
        self.paths[fd] = path
        return fd

    def close(self, fd: int) -> None:
        self._fd("close", fd)
        super().close(fd)

    def append(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        self._fd("append", fd)
        super().append(fd, data)
        if threading.get_ident() != self.compactor:
            self.other_appends += 1

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self._fd("pread", fd)
        return super().pread(fd, size, offset)

    def read_all(self, fd: int) -> bytes:
        self._fd("read_all", fd)
        return super().read_all(fd)

    def fsync(self, fd: int) -> None:
        self._fd("fsync", fd)
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._fd("fdatasync", fd)
        super().fdatasync(fd)

    def truncate(self, fd: int, size: int) -> None:
        self._fd("truncate", fd)
        super().truncate(fd, size)

    def file_size(self, fd: int) -> int:
        self._fd("file_size", fd)
        return super().file_size(fd)

    def rename(self, src: str, dst: str) -> None:
        self._note("rename", f"{src} -> {dst}")
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self._note("unlink", path)
        super().unlink(path)


def check_compaction_calls(calls: list[Call], result: CompactionResult, newest: int) -> None:
    """The compacting thread's calls (rolls aside) touch only its inputs and its output.

    Segments numbered above the output were active at some time during the
    compaction (the one its roll created, and any a writer's roll created):
    no call may concern them.
    """
    assert result.output is not None
    path = str(Path(calls[0].path).parent) if calls else ""
    name = segment_file_name
    active = {f"{path}/{name(n)}" for n in range(result.output + 1, newest + 1)}
    inputs = {f"{path}/{name(n)}" for n in result.inputs}
    tmp = f"{path}/{name(result.output)}{COMPACT_TMP_SUFFIX}"
    for call in calls:
        if call.in_roll:
            continue  # sealing the active segment and creating the next: what writers do
        assert not any(p in call.path for p in active), ("touched an active segment", call)
        if call.method in ("append", "fdatasync", "fsync", "truncate"):
            assert call.path == tmp, ("wrote to a file other than its output", call)
        elif call.method == "rename":
            assert call.path == f"{tmp} -> {path}/{name(result.output)}", call
        elif call.method == "unlink":
            assert call.path in inputs | {tmp}, call


def test_compaction_never_touches_the_active_segment(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    fs = SpyFS()
    root = open_with(fs, directory, **OPTIONS)
    engine = root._engine
    for i in range(300):
        root[f"k{i % 40}"] = f"{i}" * 50
    model = dict(root.items())
    stop = threading.Event()
    written: list[tuple[str, str]] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            root[f"w{i % 60}"] = f"{i}" * 50
            written.append((f"w{i % 60}", f"{i}" * 50))
            i += 1

    thread = threading.Thread(target=writer)
    me = fs.compactor = threading.get_ident()
    fs.appends_while_held = 120  # about two segments: the writer rolls during the compaction
    thread.start()
    try:
        for _ in range(4):
            fs.calls = []
            fs.recording = True
            result = root.compact()
            fs.recording = False
            newest = max(engine.segments.segments)
            calls = [c for c in fs.calls if c.thread == me]
            assert any(c.in_roll for c in calls), "the active segment should have been sealed"
            rolled = [c for c in fs.calls if c.thread != me and c.method == "create_file"]
            assert rolled, "the writer should have rolled to a new segment meanwhile"
            check_compaction_calls(calls, result, newest)
    finally:
        stop.set()
        thread.join(timeout=30)
    # every open segment's descriptor still refers to the file under its name
    # (a sealed segment's is closed: it is read through a mapping, or by name)
    for segment in engine.segments.segments.values():
        if segment.fd >= 0:
            assert os.fstat(segment.fd).st_ino == os.stat(segment.path).st_ino, segment.path
    for key, value in written:
        model[key] = value
    assert dict(root.items()) == model
    root.close()
    for how, again in reopened(directory, **OPTIONS):
        assert dict(again.items()) == model, how
        again._check()


# ============================================================================ 7. read-only


def one_op_batch(root: LocalFileStorage) -> Batch:
    batch = root.batch()
    batch.set("new", 1)
    return batch


def leave_inputs_after_the_rename(directory: Path) -> None:
    saved = directory.parent / "saved"
    shutil.copytree(directory, saved)
    with LocalFileStorage(directory, **OPTIONS) as root:
        result = root.compact()
    for number in result.inputs[:-1]:
        shutil.copy2(saved / segment_file_name(number), directory / segment_file_name(number))


def leave_a_temporary_output(directory: Path) -> None:
    steps = compaction_steps(directory)
    created = [i for i, name in enumerate(steps) if name == "create_file"][-1]
    fs = CrashFS()
    root = open_with(fs, directory, **OPTIONS)
    fs.arm(steps.index("append", created), crash_after=True)  # output half written
    with pytest.raises(SimulatedCrash):
        root._engine.compact()
    fs.abandon(root._engine)
    assert temporary_files(directory) != []


def leave_nothing(directory: Path) -> None:
    """The template as it is: many segments, the active one not empty."""


LEFTOVERS: dict[str, Callable[[Path], None]] = {
    "no-leftover": leave_nothing,
    "inputs-after-rename": leave_inputs_after_the_rename,
    "temporary-output": leave_a_temporary_output,
}
# every write a read-only handle must refuse; each is tried on its own read-only open
READ_ONLY_REFUSALS: dict[str, Callable[[LocalFileStorage], object]] = {
    "set": lambda r: r.set("new", 1),
    "set-of-a-value-that-rolls-the-segment": lambda r: r.set("big", "x" * 5000),
    "setitem-in-a-sub-storage": lambda r: r.get_or_create_sub_storage("empty").__setitem__("k", 1),
    "remove": lambda r: r.remove("z2"),
    "clear": lambda r: r.get_or_create_sub_storage("empty").clear(),
    "batch": lambda r: one_op_batch(r).commit(),
    "create-sub-storage": lambda r: r.get_or_create_sub_storage("fresh"),
    "delete-sub-storage": lambda r: r.delete_sub_storage("empty"),
    "flush": lambda r: r.flush(),
    "compact": lambda r: r.compact(),
}


@pytest.mark.parametrize("leftover", LEFTOVERS)
def test_read_only_open_refuses_writes_and_changes_no_file_even_with_compaction_leftovers(
    tmp_path: Path, template: Template, leftover: str
) -> None:
    directory = tmp_path / "store"
    model = template.copy_to(directory)
    LEFTOVERS[leftover](directory)
    files = listing(directory)
    for how, root in reopened(directory, read_only=True, segment_size=4096):
        assert_matches_model(root, model, f"in a read-only open {how}")
        assert listing(directory) == files, f"a read-only open {how} changed files"

    outcomes: dict[str, str] = {}
    changed: list[str] = []
    for name, attempt in READ_ONLY_REFUSALS.items():
        root = LocalFileStorage(directory, read_only=True, segment_size=4096)
        try:
            attempt(root)
            outcomes[name] = "accepted"
        except Exception as exc:
            outcomes[name] = type(exc).__name__
        finally:
            root.close()
        if listing(directory) != files:
            changed.append(name)
            files = listing(directory)
    expected = dict.fromkeys(READ_ONLY_REFUSALS, "ReadOnlyStorageError")
    assert (outcomes, changed) == (expected, []), "(outcomes, attempts that changed files)"

    with LocalFileStorage(directory, **OPTIONS) as again:  # a writer cleans up
        assert temporary_files(directory) == []
        assert_matches_model(again, model, "after a writable open")
