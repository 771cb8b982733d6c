"""Power loss at many points of seeded workloads: what survives, checked like ALICE.

A workload runs on :class:`tests.faultfs.CrashFS`. Before every mutating
file-system call (a crash point) the test takes possible on-disk states of a
power loss at that moment: only what is known durable, everything (a process
crash), and random mixes (unsynced bytes kept, dropped, cut, zero- or
garbage-filled; directory operations not yet fsynced lost). After the
workload, each state is written to a fresh directory and opened with the
normal file system; the recovered contents must equal the model's state at
some point of the history between the last durability point and the
operation in flight (ALICE's checks: values byte-exact, surviving writes form
a prefix, everything acknowledged after a sync is present). Every recovery
runs ``_check()`` and is reopened once more, which must give the same state.

    python -m pytest tests/test_power_loss.py -q
"""

from __future__ import annotations

import copy
import errno
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

import pytest

from logstate import InMemoryStorage, LocalFileStorage
from logstate._filenames import COMPACT_TMP_SUFFIX, SEGMENT_SUFFIX
from logstate._format import SEGMENT_HEADER_SIZE

from .faultfs import CrashFS, CrashState, LogicalState, no_hooks, observed_state, open_storage
from .helpers import kill

SEGMENT_SIZE: Final = 4096  # small: the workloads roll segments often
# Segment headers are torn only into "short" or "zero-filled" here; a header torn into
# part data then zeros or garbage is its own test below (it fails: see its docstring).
INTACT_HEADER: Final = SEGMENT_HEADER_SIZE
STORE: Final = "store"
DELETED: Final[Any] = object()


# ---------------------------------------------------------------------- history and recovery
@dataclass
class History:
    """The model's states: ``states[i]`` after operation ``i`` (0: the empty store).

    ``durable``: index of the newest state every power loss must keep (all
    earlier ones are then implied: a state is a prefix of the history).
    """

    states: list[LogicalState]
    names: list[str] = field(default_factory=lambda: ["(empty store)"])
    acked: int = 0
    durable: int = 0

    def begin(self, name: str, state: LogicalState) -> None:
        """An operation starts; ``state`` is what the store holds once it returns."""
        assert self.acked == len(self.states) - 1, "one operation at a time"
        self.names.append(name)  # first: the sync thread's crash points read names[newest]
        self.states.append(copy.deepcopy(state))

    def ack(self, durable: bool) -> None:
        """The operation returned; ``durable``: the store promises it survives power loss."""
        self.acked = len(self.states) - 1
        if durable:
            self.durable = self.acked

    @property
    def newest(self) -> int:
        """The highest state a power loss may leave: the operation in flight, if any."""
        return len(self.states) - 1


@dataclass
class CrashPoint:
    state: CrashState
    low: int  # allowed history indices: low..high
    high: int
    acked: int  # the newest acknowledged state at that moment
    where: str  # the call about to run, and the operation in flight


def recover(state: CrashState, target: Path) -> LogicalState:
    """Write ``state``, open it with the normal file system twice; the contents (checked)."""
    CrashFS.materialize(state, target)
    with LocalFileStorage(target / STORE, sync="none", auto_compact=False) as store:
        store._check()
        first = observed_state(store)
    with LocalFileStorage(target / STORE, sync="none", auto_compact=False) as store:
        store._check()
        second = observed_state(store)
        assert store.report.clean, f"second open repaired again: {store.report}"
    assert second == first, "reopening a recovered store changed its contents"
    return first


def describe(state: LogicalState) -> str:
    namespaces, checkpoint = state
    parts = [
        f"{ns or '<root>'}: {{{', '.join(f'{k}={_short(v)}' for k, v in sorted(items.items()))}}}"
        for ns, items in sorted(namespaces.items())
    ]
    return "; ".join(parts) + f"; checkpoint={checkpoint!r}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


@dataclass
class Verified:
    distinct: int  # distinct on-disk states recovered
    rolled_back: int  # crash points whose state lost acknowledged (unsynced) operations


def verify(points: list[CrashPoint], history: History, workdir: Path) -> Verified:
    """Recover every crash point's state and check it against the history."""
    recovered: dict[object, LogicalState] = {}
    rolled_back = 0
    for i, point in enumerate(points):
        key = point.state.key()
        if key not in recovered:
            try:
                recovered[key] = recover(point.state, workdir / f"crash-{i}")
            except Exception as exc:
                pytest.fail(
                    f"recovery failed at {point.where}: {exc!r}\n"
                    f"  power-loss choices: {point.state.notes} undone: {point.state.undone}"
                )
        found = recovered[key]
        allowed = range(point.low, point.high + 1)
        if not any(history.states[j] == found for j in allowed):
            older = [j for j in range(point.low) if history.states[j] == found]
            pytest.fail(
                f"power loss at {point.where} recovered a state outside the allowed history "
                f"{point.low}..{point.high} ({history.names[point.low]!r}.."
                f"{history.names[point.high]!r}); it equals older states {older}\n"
                f"  recovered: {describe(found)}\n"
                f"  newest allowed: {describe(history.states[point.high])}\n"
                f"  power-loss choices: {point.state.notes} undone: {point.state.undone}"
            )
        if not any(history.states[j] == found for j in range(point.acked, point.high + 1)):
            rolled_back += 1
    return Verified(len(recovered), rolled_back)


class Recorder:
    """Takes crash states at crash points (``CrashFS.before``) while a workload runs."""

    def __init__(self, fs: CrashFS, history: History, rng: random.Random, randoms: int) -> None:
        self.fs = fs
        self.history = history
        self.rng = rng
        self.randoms = randoms
        self.points: list[CrashPoint] = []
        self.low_override: int | None = None  # a test's stronger claim for a stretch of calls
        self.extra: Callable[[], list[CrashState]] | None = None  # more states per point
        self.active = True

    def __call__(self, op: str, path: str) -> None:
        if self.active:
            self.capture(f"{op} {os.path.basename(path)}")

    def capture(self, call: str) -> None:
        with self.fs.lock:  # the one lock: crash points also come from the sync thread
            history = self.history
            low = history.durable if self.low_override is None else self.low_override
            high = history.newest
            where = f"{call!r} during {history.names[high]!r} (#{high})"
            states = [self.fs.durable_state(), self.fs.process_crash_state()]
            states += self.fs.crash_states(self.rng, self.randoms)
            if self.extra is not None:
                states += self.extra()
            acked = history.acked
            self.points.extend(CrashPoint(s, low, high, acked, where) for s in states)


# ---------------------------------------------------------------------- the workload
NAMESPACES: Final = ("", "a", "a/b")  # "mem" backs the InMemoryStorage and is never dropped
KEYS: Final = tuple(f"k{i}" for i in range(6))


class Workload:
    """Seeded operations on a store, each mirrored in a plain model.

    Durability promises per sync mode (what ``History.ack`` is told):
    "always": every operation once it returns; "interval": flush(),
    InMemoryStorage.flush(), close, and every background sync that completed
    (it covers what was acknowledged when it started); "none": flush() and close.
    """

    def __init__(self, fs: CrashFS, rng: random.Random, sync: str, **options: Any) -> None:
        self.fs = fs
        self.rng = rng
        self.sync = sync
        self.directory = Path(fs.root) / STORE
        self.options: dict[str, Any] = {
            "sync": sync,
            "segment_size": SEGMENT_SIZE,
            "auto_compact": False,
            "compress_min_size": 300,
            **options,
        }
        if sync == "interval":
            self.options.setdefault("sync_interval", 0.002)
        self.model: dict[str, dict[str, Any]] = {"": {}}
        self.checkpoint: Any = None
        self.history = History([self.state()])
        self.handles: dict[str, LocalFileStorage] = {}
        self.mem_items: dict[str, Any] = {}  # the InMemoryStorage's dict (flushed or not)
        self.counter = 0
        self._sync_started: dict[str, int] = {}
        self.background_syncs = 0
        self.mem: InMemoryStorage | None = None
        if sync == "interval":
            fs.after = self._background_sync_done

    # ------------------------------------------------------------------ model
    def state(self) -> LogicalState:
        return copy.deepcopy(self.model), self.checkpoint

    def _background_sync_done(self, op: str, path: str) -> None:
        thread = threading.current_thread().name
        if op == "fdatasync" and thread.startswith("logstate-sync"):
            started = self._sync_started.pop(thread, None)
            self.background_syncs += 1
            if started is not None and started > self.history.durable:
                self.history.durable = started

    def note_background_sync_start(self, op: str) -> None:
        thread = threading.current_thread().name
        if op == "fdatasync" and thread.startswith("logstate-sync"):
            self._sync_started[thread] = self.history.acked

    def run(
        self,
        name: str,
        after: dict[str, dict[str, Any]],
        action: Callable[[], object],
        checkpoint: Any = DELETED,
        durable: bool | None = None,
    ) -> None:
        """Run ``action``; ``after`` (and ``checkpoint``) is the model once it returns."""
        next_checkpoint = self.checkpoint if checkpoint is DELETED else checkpoint
        self.history.begin(name, (after, next_checkpoint))
        action()
        self.model = copy.deepcopy(after)
        self.checkpoint = next_checkpoint
        self.history.ack(self.sync == "always" if durable is None else durable)

    def value(self) -> Any:
        self.counter += 1
        kind = self.rng.random()
        if kind < 0.1:
            return self.counter
        if kind < 0.2:
            return f"text {self.counter}"
        return self.rng.randbytes(self.rng.choice((1, 40, 250, 700, 1500)))

    # ------------------------------------------------------------------ sessions
    def open(self) -> None:
        root = open_storage(self.fs, self.directory, **self.options)
        self.handles = {"": root}
        for ns in sorted(n for n in self.model if n):
            self.handles[ns] = self._child(ns)
        self.mem = InMemoryStorage(self.handles["mem"]) if "mem" in self.model else None
        self.mem_items = dict(self.model.get("mem", {}))

    def _child(self, ns: str) -> LocalFileStorage:
        parent, _sep, name = ns.rpartition("/")
        return self.handles[parent].get_or_create_sub_storage(name)

    def close(self) -> None:
        for ns in sorted(self.handles, reverse=True):
            self.handles[ns].close()
        self.handles = {}

    def start(self) -> None:
        """Open the store and create the sub-storage behind the InMemoryStorage."""
        after: dict[str, dict[str, Any]] = {"": {}, "mem": {}}

        def action() -> None:
            self.open()
            self.handles["mem"] = self.handles[""].get_or_create_sub_storage("mem")
            self.mem = InMemoryStorage(self.handles["mem"])

        self.run("open, create sub-storage mem", after, action)

    def reopen(self) -> None:
        def action() -> None:
            self.close()
            self.open()

        self.run("close and reopen", self.state()[0], action, durable=True)

    # ------------------------------------------------------------------ operations
    def step(self) -> None:
        rng = self.rng
        choice = rng.random()
        present = [ns for ns in NAMESPACES if ns in self.model]
        if choice < 0.35:
            ns, key, value = rng.choice(present), rng.choice(KEYS), self.value()
            after = copy.deepcopy(self.model)
            after[ns][key] = value
            self.run(f"set {ns}/{key}", after, lambda: self.handles[ns].set(key, value))
        elif choice < 0.45:
            ns, key = rng.choice(present), rng.choice(KEYS)
            after = copy.deepcopy(self.model)
            after[ns].pop(key, None)
            self.run(f"remove {ns}/{key}", after, lambda: self.handles[ns].remove(key))
        elif choice < 0.57:
            self.batch(rng.choice(present))
        elif choice < 0.67:
            self.memory_flush()
        elif choice < 0.75:
            self.sub_storage(rng.choice(("a", "a/b")))
        elif choice < 0.78 and "a" in self.model:
            self.clear("a")
        elif choice < 0.85:
            self.run("flush", self.state()[0], lambda: self.handles[""].flush(), durable=True)
        elif choice < 0.92:
            self.run("compact", self.state()[0], lambda: self.handles[""].compact())
        elif choice < 0.96:
            self.reopen()
        elif self.sync == "interval":
            self.run("sleep", self.state()[0], lambda: time.sleep(0.006))

    def batch(self, ns: str) -> None:
        rng = self.rng
        after = copy.deepcopy(self.model)
        handle = self.handles[ns]
        batch = handle.batch()
        if ns and rng.random() < 0.2:  # (the root's clear would drop "mem")
            batch.clear()
            after[ns] = {}
            for name in [n for n in after if n.startswith(ns + "/")]:
                del after[name]
        for _ in range(rng.randint(2, 5)):
            key = rng.choice(KEYS)
            if rng.random() < 0.7:
                value = self.value()
                batch.set(key, value)
                after[ns][key] = value
            else:
                batch.remove(key)
                after[ns].pop(key, None)

        def action() -> None:
            batch.commit()
            self._drop_handles_not_in(after)

        self.run(f"batch on {ns or '<root>'}", after, action)

    def _drop_handles_not_in(self, after: dict[str, dict[str, Any]]) -> None:
        for ns in [n for n in self.handles if n not in after]:
            self.handles.pop(ns).close()
        if "mem" not in after:
            self.mem = None

    def memory_flush(self) -> None:
        rng = self.rng
        mem = self.mem
        assert mem is not None
        for _ in range(rng.randint(1, 4)):
            key = rng.choice(KEYS)
            if rng.random() < 0.75:
                value = self.value()
                mem[key] = value
                self.mem_items[key] = value
            else:
                mem.remove(key)
                self.mem_items.pop(key, None)
        self.counter += 1
        checkpoint = {"offset": self.counter}
        after = copy.deepcopy(self.model)
        after["mem"] = dict(self.mem_items)
        self.run(
            "InMemoryStorage.flush",
            after,
            lambda: mem.flush(checkpoint=checkpoint),
            checkpoint=checkpoint,
            durable=self.sync != "none",
        )

    def sub_storage(self, ns: str) -> None:
        after = copy.deepcopy(self.model)
        parent, _sep, name = ns.rpartition("/")
        if ns in self.model:
            for n in [n for n in after if n == ns or n.startswith(ns + "/")]:
                del after[n]

            def drop() -> None:
                self.handles[parent].delete_sub_storage(name)
                self._drop_handles_not_in(after)

            self.run(f"delete sub-storage {ns}", after, drop)
        elif parent in self.model:
            after[ns] = {}

            def create() -> None:
                self.handles[ns] = self._child(ns)

            self.run(f"create sub-storage {ns}", after, create)

    def clear(self, ns: str) -> None:
        after = copy.deepcopy(self.model)
        after[ns] = {}
        for n in [n for n in after if n.startswith(ns + "/")]:
            del after[n]

        def action() -> None:
            self.handles[ns].clear()
            self._drop_handles_not_in(after)

        self.run(f"clear {ns}", after, action)


def run_workload(
    tmp_path: Path, seed: int, sync: str, steps: int, randoms: int
) -> tuple[Workload, Recorder]:
    disk = tmp_path / "disk"
    disk.mkdir(parents=True)
    fs = CrashFS(disk, intact_prefix=INTACT_HEADER)
    rng = random.Random(seed)
    workload = Workload(fs, rng, sync)
    recorder = Recorder(fs, workload.history, random.Random(seed + 1000), randoms)

    def before(op: str, path: str) -> None:
        workload.note_background_sync_start(op)
        recorder(op, path)

    fs.before = before
    workload.start()
    for _ in range(steps):
        workload.step()
    recorder.capture("end of workload")
    with no_hooks(fs):
        workload.close()
    fs.check()
    return workload, recorder


# ---------------------------------------------------------------------- the model itself
def test_crash_model_keeps_synced_bytes_and_tears_only_the_unsynced_tail(tmp_path: Path) -> None:
    fs = CrashFS(tmp_path)
    fd = fs.create_file(str(tmp_path / "f"))
    fs.append(fd, b"synced")
    fs.fdatasync(fd)
    fs.fsync_dir(str(tmp_path))
    fs.append(fd, b"+unsynced")
    fs.close(fd)
    assert fs.durable_state().files == {"f": b"synced"}
    assert fs.process_crash_state().files == {"f": b"synced+unsynced"}
    seen = {s.files["f"] for s in fs.crash_states(random.Random(0), 300)}
    assert all(data.startswith(b"synced") and len(data) <= 15 for data in seen)
    assert {b"synced", b"synced+unsynced", b"synced+uns"} <= seen
    assert any(data.endswith(b"\0") for data in seen), "no zero-filled tail"
    assert len(seen) > 12


def test_crash_model_may_lose_creates_renames_and_unlinks_until_the_directory_is_fsynced(
    tmp_path: Path,
) -> None:
    fs = CrashFS(tmp_path)
    fs.write_new_file(str(tmp_path / "old"), b"old content")
    fs.write_new_file(str(tmp_path / "doomed"), b"doomed")
    fs.fsync_dir(str(tmp_path))
    fs.write_new_file(str(tmp_path / "new.tmp"), b"new content")
    fs.rename(str(tmp_path / "new.tmp"), str(tmp_path / "old"))
    fs.unlink(str(tmp_path / "doomed"))
    outcomes = {
        tuple(sorted(s.files.items()))
        for s in [
            *fs.directory_prefix_states(keep_unsynced=False),
            *fs.crash_states(random.Random(1), 200),
        ]
    }
    assert outcomes == {
        (("doomed", b"doomed"), ("old", b"old content")),  # nothing durable
        (("doomed", b"doomed"), ("new.tmp", b"new content"), ("old", b"old content")),
        (("doomed", b"doomed"), ("old", b"new content")),  # rename kept, unlink lost
        (("old", b"new content"),),  # everything
        (("old", b"old content"),),  # (subset) create lost, unlink kept
        (("new.tmp", b"new content"), ("old", b"old content")),  # rename lost
    }
    fs.fsync_dir(str(tmp_path))
    assert fs.durable_state().files == {"old": b"new content"}


def test_fail_nth_fails_exactly_that_call_and_a_short_write_leaves_half(tmp_path: Path) -> None:
    fs = CrashFS(tmp_path)
    fd = fs.create_file(str(tmp_path / "f"))
    fs.fail_nth("append", 2, errno.ENOSPC, short_write=True)
    fs.append(fd, b"1234")
    with pytest.raises(OSError) as info:
        fs.append(fd, b"abcdef")
    assert info.value is fs.injected and info.value.errno == errno.ENOSPC
    assert fs.injected_call == ("append", str(tmp_path / "f"))
    fs.append(fd, b"!")  # the plan is spent
    fs.fail_nth(None, 1)
    with pytest.raises(OSError):
        fs.fdatasync(fd)
    fs.close(fd)
    assert (tmp_path / "f").read_bytes() == b"1234abc!"
    fs.check()
    assert fs.durable_state().files == {}, "neither the data nor the entry was made durable"


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sync_always_power_loss_at_every_step_keeps_every_acknowledged_operation(
    tmp_path: Path, seed: int
) -> None:
    workload, recorder = run_workload(tmp_path, seed, "always", steps=45, randoms=1)
    verified = verify(recorder.points, workload.history, tmp_path / "recovered")
    assert len(recorder.points) > 200 and verified.distinct > 50
    assert verified.rolled_back == 0


@pytest.mark.parametrize("seed", [4, 5])
def test_sync_none_power_loss_leaves_a_prefix_with_everything_flushed(
    tmp_path: Path, seed: int
) -> None:
    workload, recorder = run_workload(tmp_path, seed, "none", steps=50, randoms=2)
    history = workload.history
    assert history.durable > 0, "the workload must flush"
    verified = verify(recorder.points, history, tmp_path / "recovered")
    assert verified.distinct > 50
    assert verified.rolled_back > 0, "no power loss lost an unsynced suffix: a weak test"


@pytest.mark.parametrize("seed", [6, 7])
def test_sync_interval_power_loss_keeps_what_the_last_background_sync_covered(
    tmp_path: Path, seed: int
) -> None:
    workload, recorder = run_workload(tmp_path, seed, "interval", steps=50, randoms=2)
    history = workload.history
    background = [n for n in history.names if n == "sleep"]
    assert background, "the workload must give the background sync time to run"
    assert workload.background_syncs > 0
    verify(recorder.points, history, tmp_path / "recovered")


def _compaction_store(tmp_path: Path, seed: int) -> tuple[Workload, Recorder]:
    """A store with overwrites, deletes, a cleared and a dropped sub-storage, compressed
    groups and a checkpoint spread over several segments; every write flushed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    fs = CrashFS(disk, intact_prefix=INTACT_HEADER)
    workload = Workload(fs, random.Random(seed), "none", compress_min_size=100)
    recorder = Recorder(fs, workload.history, random.Random(seed), randoms=3)
    recorder.active = False
    fs.before = recorder
    workload.start()
    for _ in range(40):
        workload.step()
    workload.sub_storage("a")
    workload.sub_storage("a")  # created (or dropped) again: both kinds of record exist
    workload.memory_flush()
    workload.run("flush", workload.state()[0], lambda: workload.handles[""].flush(), durable=True)
    return workload, recorder


@pytest.mark.parametrize("seed", [11, 12])
def test_compaction_interrupted_by_power_loss_at_every_step_keeps_the_logical_contents(
    tmp_path: Path, seed: int
) -> None:
    workload, recorder = _compaction_store(tmp_path, seed)
    fs = workload.fs
    recorder.extra = lambda: [
        *fs.directory_prefix_states(keep_unsynced=False),
        *fs.directory_prefix_states(keep_unsynced=True),
    ]
    for round_ in range(2):
        recorder.active = True
        before = len(recorder.points)
        compact = workload.handles[""].compact
        workload.run(f"compaction {round_}", workload.state()[0], compact, durable=True)
        recorder.capture("after compaction")
        recorder.active = False
        assert len(recorder.points) > before
        # more history for the second compaction, whose input is the first one's output
        for _ in range(8):
            workload.step()
        workload.run("flush", workload.state()[0], workload.handles[""].flush, durable=True)
    with no_hooks(fs):
        workload.close()
    for point in recorder.points:  # compaction changes no logical content
        assert workload.history.states[point.low] == workload.history.states[point.high]
    verify(recorder.points, workload.history, tmp_path / "recovered")

    undone = [u for p in recorder.points for u in p.state.undone]
    assert any(u.startswith("rename") and COMPACT_TMP_SUFFIX in u for u in undone)
    assert any(u.startswith("unlink") and u.endswith(SEGMENT_SUFFIX) for u in undone)
    assert any(
        any(name.endswith(COMPACT_TMP_SUFFIX) for name in p.state.files) for p in recorder.points
    ), "no state kept the temporary output"


def test_power_loss_during_a_roll_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """sync="none": the roll fdatasyncs the full segment before creating the next one and
    fsyncs the directory before appending to it, so whatever happens to the new segment
    (missing entry, empty, torn or zero-filled header), every write acknowledged before the
    roll survives, and the record that triggered the roll is not yet in any file."""
    disk = tmp_path / "disk"
    disk.mkdir()
    fs = CrashFS(disk, intact_prefix=INTACT_HEADER)
    workload = Workload(fs, random.Random(21), "none")
    recorder = Recorder(fs, workload.history, random.Random(22), randoms=6)
    recorder.extra = lambda: [
        *fs.directory_prefix_states(keep_unsynced=False),
        *fs.directory_prefix_states(keep_unsynced=True),
    ]
    rolling = {"segment": ""}

    def before(op: str, path: str) -> None:
        name = os.path.basename(path)
        if op == "fdatasync" and not rolling["segment"]:
            rolling["segment"] = "sealing"  # the roll's first call: the old segment's sync
            return  # not synced yet: nothing new is promised
        if rolling["segment"]:
            if op == "create_file":
                rolling["segment"] = name
            recorder.low_override = workload.history.acked
            recorder.capture(f"{op} {name} (rolling to {rolling['segment']})")
            recorder.low_override = None

    def after(op: str, path: str) -> None:
        if op == "fsync_dir" and rolling["segment"] not in ("", "sealing"):
            recorder.low_override = workload.history.acked
            recorder.capture(f"after the roll to {rolling['segment']}")
            recorder.low_override = None
            rolling["segment"] = ""

    workload.start()
    fs.before, fs.after = before, after
    for i in range(40):
        after_state = copy.deepcopy(workload.model)
        key, value = f"k{i % 9}", bytes([i]) * 700
        after_state[""][key] = value
        workload.run(f"set {key}", after_state, partial(workload.handles[""].set, key, value))
    with no_hooks(fs):
        workload.close()
    verify(recorder.points, workload.history, tmp_path / "recovered")

    during = [p for p in recorder.points if "rolling to segment-" in p.where]
    new_segments: list[bytes | None] = []  # per state: the new segment's bytes, None if lost
    for point in during:
        name = point.where.split("rolling to ")[1].split(")")[0]
        new_segments.append(point.state.files.get(f"{STORE}/{name}"))
    assert len({p.where.split("rolling to ")[1].split(")")[0] for p in during}) >= 4
    assert any(data is None for data in new_segments), "no state lost the new segment"
    assert any(data is not None and len(data) < SEGMENT_HEADER_SIZE for data in new_segments)
    assert any(data is not None and len(data) == SEGMENT_HEADER_SIZE for data in new_segments)


@pytest.mark.parametrize("tear", ["part of the header then zeros", "garbage"])
def test_a_new_segment_whose_header_a_power_loss_tore_opens_as_an_empty_segment(
    tmp_path: Path, tear: str
) -> None:
    """A power loss between the roll's header append and its fdatasync may leave the new
    segment (newest, nothing acknowledged in it) holding a torn header: its first bytes
    then zeros, or garbage (ALICE: the size grows, then garbage, then the data). Nothing
    valid follows, so it is a torn write like the zero-filled header open already
    repairs, and every write acknowledged before the roll must come back. (A new
    segment is now written under a temporary name and renamed into place whole; the
    torn header under the segment's name is what earlier versions could leave.)"""
    disk = tmp_path / "disk"
    disk.mkdir()
    fs = CrashFS(disk)
    root = open_storage(fs, disk / STORE, sync="none", segment_size=SEGMENT_SIZE)
    states: list[CrashState] = []
    new_segment = {"name": ""}
    written: dict[str, Any] = {}
    acknowledged: dict[str, Any] = {}

    def before(op: str, path: str) -> None:
        if op == "create_file" and path.removesuffix(".tmp").endswith(SEGMENT_SUFFIX):
            new_segment["name"] = f"{STORE}/{os.path.basename(path)}"
        elif op == "fdatasync" and new_segment["name"] and not states:
            states.append(fs.process_crash_state())  # the header appended, not synced
            acknowledged.update(written)

    fs.before = before
    for i in range(12):
        if new_segment["name"]:
            break
        root[f"k{i}"] = bytes([i]) * 700
        written[f"k{i}"] = bytes([i]) * 700
    fs.before = None
    root.close()
    assert states, "the workload did not roll"
    header = states[0].files[new_segment["name"]]
    assert len(header) == SEGMENT_HEADER_SIZE
    rng = random.Random(5)
    failures = []
    for k in range(SEGMENT_HEADER_SIZE) if tear != "garbage" else range(3):
        if tear == "garbage":
            torn = rng.randbytes(SEGMENT_HEADER_SIZE)
        else:
            torn = header[:k] + bytes(SEGMENT_HEADER_SIZE - k)
        files = {**states[0].files}
        del files[new_segment["name"]]
        files[new_segment["name"].removesuffix(".tmp")] = torn
        crash = CrashState(dirs=states[0].dirs, files=files)
        try:
            recovered = recover(crash, tmp_path / f"torn-{k}")
        except Exception as exc:
            failures.append(f"{torn.hex()}: {exc!r}")
            continue
        if recovered != ({"": acknowledged}, None):
            failures.append(f"{torn.hex()}: recovered {describe(recovered)}")
    assert not failures, f"torn headers ({tear}) not repaired:\n" + "\n".join(failures)


@pytest.mark.parametrize("sync", ["none", "interval"])
def test_flush_after_reopening_a_killed_process_store_makes_what_it_reads_durable(
    tmp_path: Path, sync: str
) -> None:
    """flush() promises "every write so far durable now": after a process crash the
    records the previous process left in the page cache are read back by the new
    process, so its flush() must make them durable too."""
    disk = tmp_path / "disk"
    disk.mkdir()
    fs = CrashFS(disk)
    options: dict[str, Any] = {"sync": sync, "sync_interval": 3600.0}
    first = open_storage(fs, disk / STORE, **options)
    first["synced"] = b"s"
    first.flush()
    first["unsynced"] = b"u"  # acknowledged; the process dies before any sync
    kill(first)

    second = open_storage(fs, disk / STORE, **options)
    assert second["unsynced"] == b"u"  # the new process reads it...
    second.flush()  # ...and asks for everything so far to be durable
    crash = fs.durable_state()
    kill(second)
    recovered = recover(crash, tmp_path / "recovered")
    assert recovered == ({"": {"synced": b"s", "unsynced": b"u"}}, None), (
        "a record read and flushed by the reopened store was lost by a power loss"
    )


def _torn_states(tmp_path: Path) -> Iterator[CrashState]:
    """Power-loss states of a sync="none" store whose newest segment has a torn tail."""
    _workload, recorder = run_workload(tmp_path / "source", 31, "none", steps=30, randoms=4)
    torn = [
        p.state
        for p in recorder.points
        if any(" then " in note and SEGMENT_SUFFIX in note for note in p.state.notes)
    ]
    assert len(torn) >= 3
    return iter(random.Random(32).sample(torn, 3))


def test_recovery_interrupted_by_power_loss_and_the_writes_after_it_survive(
    tmp_path: Path,
) -> None:
    """A torn tail is copied aside and cut at open: a power loss during that repair, or
    after acknowledged writes that follow it (sync="always"), recovers the repaired
    state plus every acknowledged write."""
    for n, crash in enumerate(_torn_states(tmp_path)):
        expected = recover(crash, tmp_path / f"expected-{n}")
        disk = tmp_path / f"disk-{n}"
        CrashFS.materialize(crash, disk)
        fs = CrashFS(disk, intact_prefix=INTACT_HEADER)
        history = History([expected])
        recorder = Recorder(fs, history, random.Random(n), randoms=3)
        fs.before = recorder
        history.begin("open (repairs the torn tail)", expected)
        root = open_storage(fs, disk / STORE, sync="always", auto_compact=False)
        history.ack(durable=True)
        assert not root.report.clean
        model = copy.deepcopy(expected[0])
        for i in range(6):
            model[""][f"new{i}"] = b"n" * (i * 100 + 1)
            history.begin(f"set new{i}", (copy.deepcopy(model), expected[1]))
            root[f"new{i}"] = b"n" * (i * 100 + 1)
            history.ack(durable=True)
        recorder.capture("end")
        with no_hooks(fs):
            root.close()
        verify(recorder.points, history, tmp_path / f"recovered-{n}")
