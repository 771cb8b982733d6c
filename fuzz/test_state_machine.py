"""Recovery fuzzing: a hypothesis state machine drives LocalFileStorage against a plain model.

Property checked. A ``RuleBasedStateMachine`` runs sets, removes, clears,
sub-storage creates and deletes, batches (some rolled back by an exception),
InMemoryStorage flushes with checkpoints, explicit syncs, compactions
(explicit, and in the background with ``auto_compact``; each step waits for
the background compaction it started, so that runs replay), clean close+reopen
and simulated crashes on a real directory (segment_size 4096, so segments
roll every few operations; sync "none", "interval" or "always").

- After every step: the storage (every sub-storage, key, value and the
  checkpoint) equals the model, and ``Engine._check()`` holds.
- A simulated crash abandons the engine without closing it (no final sync,
  no index snapshot; ``Engine._release_resources`` and removal from the
  registry, after the background threads have stopped), optionally after an
  *unacknowledged* operation (written, but the caller never saw it return),
  then damages the newest segment the way a torn write would: cut at any
  offset after the last durable point (the last explicit sync, close,
  compaction or segment roll; with sync="always", the last acknowledged
  operation) and/or zeros or garbage appended. Synced bytes are never
  damaged. After the reopen:

  * the state equals the model at a point of the history between the last
    durable point and the last operation (a prefix of the history), and
    exactly the point that the cut offset implies: every operation whose
    record lies wholly before the cut, none after it;
  * groups (batches, flushes, multi-drops) are all or nothing and deleted
    keys stay deleted (both follow from the above; a failure names the keys
    that were lost, resurrected or torn);
  * a read-only open sees the same state before the repair, a torn tail is
    reported exactly when the cut is not at a record boundary or bytes were
    appended, reopening twice gives the same state, and ``_check()`` holds.

- A crash inside a compaction (the output still under its temporary name;
  or renamed over its last input with the other inputs not yet deleted)
  loses nothing: the reopened state equals the model.

Run (the default profile takes ~30 s on 2 cores; the long one is a soak)::

    python -m pytest fuzz/test_state_machine.py -q
    LOGSTATE_FUZZ_PROFILE=long python -m pytest fuzz/test_state_machine.py -q

A failure prints the shrunk steps and a ``@reproduce_failure`` blob
(``print_blob``, fuzz/conftest.py); paste the blob above ``TestRecovery`` to
replay it.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from logstate import InMemoryStorage, LocalFileStorage
from logstate._filenames import COMPACT_TMP_SUFFIX, parse_segment_file_name
from logstate._format import NS_SEPARATOR, SEGMENT_HEADER_SIZE
from tests.helpers import kill

LONG = os.environ.get("LOGSTATE_FUZZ_PROFILE") == "long"
SEGMENT_SIZE = 4096  # bytes: the minimum, so segments roll every few operations
NAMES = ("a", "b", "c")  # sub-storage names
MAX_DEPTH = 2  # sub-storages nest at most this deep ("a/b")
KEYS = ("k0", "k1", "k2", "k3", "k4", "ключ", "x" * 300)

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=16),
    st.binary(max_size=32),
    st.builds(lambda n, b: bytes([b]) * n, st.integers(100, 1200), st.integers(0, 255)),
    st.lists(st.integers(-9, 9), max_size=3),  # pickled; mutated in place by flushes
)
keys = st.sampled_from(KEYS)
batch_ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, values),
        st.tuples(st.just("remove"), keys),
        st.just(("clear",)),
    ),
    max_size=6,
)
memory_ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, values),
        st.tuples(st.just("remove"), keys),
        st.just(("clear",)),
        st.tuples(st.just("append"), keys, st.integers(-9, 9)),  # in place, if a list
    ),
    max_size=5,
)
checkpoints = st.one_of(st.none(), st.integers(0, 10**9))  # None: flush without one
tails = st.one_of(
    st.just(b""),
    st.integers(1, 80).map(bytes),  # size grew, data never written: zeros
    st.binary(min_size=1, max_size=80),  # garbage
)
FULL_SHARE = 1 << 16
Ops = list[tuple[Any, ...]]  # ("set", key, value), ("remove", key), ("clear",), ("append", ...)
Rounds = list[tuple[Ops, int | None]]  # InMemoryStorage changes, then a flush (checkpoint)
IN_FLIGHT = ("none", "set", "remove", "clear", "delete sub-storage", "batch", "memory flush")


def within(ns: str, ancestor: str) -> bool:
    """True when namespace ``ns`` is ``ancestor`` or below it."""
    return not ancestor or ns == ancestor or ns.startswith(ancestor + NS_SEPARATOR)


def join(parent: str, name: str) -> str:
    return name if not parent else parent + NS_SEPARATOR + name


@dataclass
class Model:
    """What the storage must hold: namespace -> key -> value, and the checkpoint."""

    namespaces: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    checkpoint: Any = None

    def copy(self) -> Model:
        return copy.deepcopy(self)

    def clear(self, ns: str) -> None:
        """Keys of ``ns`` and every sub-storage below it (REC_CLEAR)."""
        for name in [n for n in self.namespaces if n != ns and within(n, ns)]:
            del self.namespaces[name]
        self.namespaces[ns].clear()

    def drop(self, ns: str) -> None:
        for name in [n for n in self.namespaces if within(n, ns)]:
            del self.namespaces[name]


def describe_difference(actual: Model, expected: Model) -> list[str]:
    """What differs, named the way the crash properties are (lost, resurrected, wrong)."""
    lines = []
    for ns in sorted(set(actual.namespaces) | set(expected.namespaces)):
        if ns not in actual.namespaces:
            lines.append(f"sub-storage {ns!r} lost")
            continue
        if ns not in expected.namespaces:
            lines.append(f"sub-storage {ns!r} present: resurrected or never created")
            continue
        got, want = actual.namespaces[ns], expected.namespaces[ns]
        for key in sorted(set(got) | set(want)):
            if key not in got:
                lines.append(f"{ns}/{key[:20]}: lost (expected {want[key]!r:.60})")
            elif key not in want:
                lines.append(f"{ns}/{key[:20]}: resurrected or torn group ({got[key]!r:.60})")
            elif got[key] != want[key]:
                lines.append(f"{ns}/{key[:20]}: {got[key]!r:.60}, expected {want[key]!r:.60}")
    if actual.checkpoint != expected.checkpoint:
        lines.append(f"checkpoint {actual.checkpoint!r}, expected {expected.checkpoint!r}")
    return lines


def read_state(root: LocalFileStorage) -> Model:
    """Everything the storage holds, through the public API."""
    state = Model({}, root.checkpoint)

    def walk(handle: LocalFileStorage, ns: str) -> None:
        state.namespaces[ns] = {key: handle.get(key) for key in handle.get_all_keys()}
        for name in handle.get_sub_storages():
            child = handle.get_or_create_sub_storage(name)  # exists: writes nothing
            try:
                walk(child, join(ns, name))
            finally:
                child.close()

    walk(root, "")
    return state


@dataclass
class Point:
    """The model right after one operation, and where the log ended then."""

    model: Model
    end: tuple[int, int]  # (newest segment number, its size in bytes)
    what: str
    acknowledged: bool


class _Rollback(Exception):
    """Raised inside a batch block: the batch must be discarded."""


class RecoveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="logstate-fuzz-sm-")
        self.path = os.path.join(self.directory, "store")
        self.options: dict[str, Any] = {}
        self.root: LocalFileStorage | None = None
        self.model = Model()
        # history[0] is durable; later points may be lost by a crash, newest last
        self.history: list[Point] = []
        self.in_flight = False  # the operation running now will not be acknowledged

    # ------------------------------------------------------------------ helpers
    def _open(self, **extra: Any) -> LocalFileStorage:
        return LocalFileStorage(self.path, **{**self.options, **extra})

    def _storage(self) -> LocalFileStorage:
        assert self.root is not None
        return self.root

    def _segments(self) -> dict[int, str]:
        found = {}
        for name in os.listdir(self.path):
            number = parse_segment_file_name(name)
            if number is not None:
                found[number] = os.path.join(self.path, name)
        return found

    def _end(self) -> tuple[int, int]:
        """(number, size) of the newest segment: where the next record goes."""
        segments = self._segments()
        newest = max(segments)
        return newest, os.path.getsize(segments[newest])

    def _written(self, what: str, durable: bool = False) -> None:
        """Record the model after an operation; ``durable``: synced before it returned.

        A background compaction the operation started is waited for first:
        it rolls the active segment, which makes earlier records durable, so
        its timing would decide what a later crash may lose and hypothesis
        could not replay (or shrink) a run.
        """
        self._storage()._engine.wait_for_background_compaction()
        point = Point(self.model.copy(), self._end(), what, not self.in_flight)
        if self.in_flight:
            self.history.append(point)
        elif durable or self.options["sync"] == "always":
            self.history = [point]
        else:
            self.history.append(point)

    @contextmanager
    def _handle(self, ns: str) -> Iterator[LocalFileStorage]:
        """A handle on existing namespace ``ns`` (closed afterwards, so close really closes)."""
        root = self._storage()
        if not ns:
            yield root
            return
        opened = []
        handle = root
        try:
            for name in ns.split(NS_SEPARATOR):
                handle = handle.get_or_create_sub_storage(name)  # exists: writes nothing
                opened.append(handle)
            yield handle
        finally:
            for each in opened:
                each.close()

    def _draw_ns(self, data: st.DataObject, max_depth: int = MAX_DEPTH) -> str:
        names = sorted(n for n in self.model.namespaces if n.count(NS_SEPARATOR) < max_depth)
        return data.draw(st.sampled_from(names), label="namespace")

    def _abandon(self) -> None:
        """The process dies: no close, no final sync, no index snapshot.

        A background compaction is let finish first (its timing would decide
        what the crash leaves, and hypothesis could not replay a run); then
        the process is killed (``tests.helpers.kill``): the threads stop, the
        interval sync thread without syncing, and the engine is forgotten.
        """
        root = self._storage()
        root._engine.wait_for_background_compaction()
        kill(root)
        self.root = None

    # ------------------------------------------------------------------ operations
    def _set(self, ns: str, key: str, value: Any) -> None:
        with self._handle(ns) as handle:
            handle.set(key, value)
        self.model.namespaces[ns][key] = copy.deepcopy(value)
        self._written(f"set {ns}/{key[:10]}")

    def _remove(self, ns: str, key: str) -> None:
        with self._handle(ns) as handle:
            handle.remove(key)
        self.model.namespaces[ns].pop(key, None)
        self._written(f"remove {ns}/{key[:10]}")

    def _clear(self, ns: str) -> None:
        with self._handle(ns) as handle:
            handle.clear()
        self.model.clear(ns)
        self._written(f"clear {ns!r}")

    def _delete_sub_storage(self, parent: str, name: str) -> None:
        ns = join(parent, name)
        with self._handle(parent) as handle:
            existed = handle.delete_sub_storage(name)
        assert existed == (ns in self.model.namespaces), ns
        self.model.drop(ns)
        self._written(f"delete sub-storage {ns}")

    def _batch(self, ns: str, ops: Ops, rollback: bool) -> None:
        try:
            with self._handle(ns) as handle, handle.batch() as batch:
                for op in ops:
                    if op[0] == "set":
                        batch.set(op[1], op[2])
                    elif op[0] == "remove":
                        batch.remove(op[1])
                    else:
                        batch.clear()
                if rollback:
                    raise _Rollback
        except _Rollback:
            return  # nothing written, nothing changed
        for op in ops:
            if op[0] == "set":
                self.model.namespaces[ns][op[1]] = copy.deepcopy(op[2])
            elif op[0] == "remove":
                self.model.namespaces[ns].pop(op[1], None)
            else:
                self.model.clear(ns)
        self._written(f"batch of {len(ops)} on {ns!r}")

    def _memory_flush(self, ns: str, rounds: Rounds) -> None:
        with self._handle(ns) as handle:
            memory = InMemoryStorage(handle)
            shadow = copy.deepcopy(self.model.namespaces[ns])
            assert dict(memory.items()) == shadow, "InMemoryStorage loaded other values"
            for ops, checkpoint in rounds:
                for op in ops:
                    if op[0] == "set":
                        memory.set(op[1], copy.deepcopy(op[2]))
                        shadow[op[1]] = copy.deepcopy(op[2])
                    elif op[0] == "remove":
                        memory.remove(op[1])
                        shadow.pop(op[1], None)
                    elif op[0] == "clear":
                        memory.clear()  # its keys only: sub-storages stay
                        shadow.clear()
                    else:
                        value = memory.get(op[1])
                        if type(value) is list:  # mutated in place: the flush must see it
                            value.append(op[2])
                            shadow[op[1]].append(op[2])
                if checkpoint is None:
                    memory.flush()
                else:
                    memory.flush(checkpoint=checkpoint)
                    self.model.checkpoint = checkpoint
                self.model.namespaces[ns] = copy.deepcopy(shadow)
                self._written(f"memory flush on {ns!r}", durable=self.options["sync"] != "none")

    # ------------------------------------------------------------------ rules
    @initialize(
        sync=st.sampled_from(["none", "interval", "always"]),
        auto_compact=st.booleans(),
        compress=st.booleans(),
    )
    def open_store(self, sync: str, auto_compact: bool, compress: bool) -> None:
        self.options = {
            "sync": sync,
            "sync_interval": 0.005,
            "segment_size": SEGMENT_SIZE,
            "auto_compact": auto_compact,
            "compact_ratio": 0.3,
            "compact_min_size": 0,
            "compress_min_size": 64 if compress else None,
        }
        self.root = self._open()
        self._written("open", durable=True)

    @rule(data=st.data(), key=keys, value=values)
    def set(self, data: st.DataObject, key: str, value: Any) -> None:
        self._set(self._draw_ns(data), key, value)

    @rule(data=st.data(), key=keys)
    def remove(self, data: st.DataObject, key: str) -> None:
        self._remove(self._draw_ns(data), key)

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        self._clear(self._draw_ns(data))

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def create_sub_storage(self, data: st.DataObject, name: str) -> None:
        parent = self._draw_ns(data, MAX_DEPTH - 1)
        with self._handle(parent) as handle:
            handle.get_or_create_sub_storage(name).close()
        self.model.namespaces.setdefault(join(parent, name), {})
        self._written(f"create sub-storage {join(parent, name)}")

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def delete_sub_storage(self, data: st.DataObject, name: str) -> None:
        self._delete_sub_storage(self._draw_ns(data, MAX_DEPTH - 1), name)

    @rule(data=st.data(), ops=batch_ops, rollback=st.booleans())
    def batch(self, data: st.DataObject, ops: Ops, rollback: bool) -> None:
        self._batch(self._draw_ns(data), ops, rollback)

    @rule(
        data=st.data(),
        rounds=st.lists(st.tuples(memory_ops, checkpoints), min_size=1, max_size=2),
    )
    def memory_flush(self, data: st.DataObject, rounds: Rounds) -> None:
        self._memory_flush(self._draw_ns(data), rounds)

    @rule()
    def sync(self) -> None:
        self._storage().flush()
        self._written("sync", durable=True)

    @rule()
    def compact(self) -> None:
        self._storage().compact()
        self._written("compact", durable=True)

    @rule(use_snapshot=st.booleans())
    def close_and_reopen(self, use_snapshot: bool) -> None:
        root = self._storage()
        engine = root._engine
        root.close()
        assert engine.closed, "a handle left open kept the engine open"
        self.root = self._open(use_snapshot=use_snapshot)
        self._written("reopen", durable=True)

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(IN_FLIGHT), label="unacknowledged operation")
        if kind != "none":
            self.in_flight = True
            try:
                self._run_unacknowledged(kind, data)
            finally:
                self.in_flight = False
        self._abandon()
        # ---- damage what a crash may damage: the newest segment after the durable point
        newest, size = self._end()
        base = self.history[0]
        durable_size = base.end[1] if base.end[0] == newest else SEGMENT_HEADER_SIZE
        # Drawn as a share of the damageable range, not as an offset: the range
        # depends on when background compactions rolled, and hypothesis needs
        # the same draws for the same choices.
        share = data.draw(st.integers(0, FULL_SHARE), label="share of the unsynced bytes kept")
        keep = durable_size + (size - durable_size) * share // FULL_SHARE
        tail = data.draw(tails, label="bytes appended")
        segment_path = self._segments()[newest]
        with open(segment_path, "r+b") as segment:
            original = segment.read()
            segment.truncate(keep)
            segment.seek(keep)
            segment.write(tail)
        damaged = original[:keep] + tail
        # The appended bytes may happen to repeat the cut ones (a zero tail
        # after a cut in a run of zeros): those bytes are intact, not damage.
        intact = keep
        while intact < min(len(damaged), size) and damaged[intact] == original[intact]:
            intact += 1
        boundaries = {durable_size} | {p.end[1] for p in self.history if p.end[0] == newest}
        whole = max(b for b in boundaries if b <= intact)  # where the last whole record ends
        expected = max(i for i, p in enumerate(self.history) if p.end <= (newest, whole))
        self._recover(expected, torn=len(damaged) != whole)

    def _run_unacknowledged(self, kind: str, data: st.DataObject) -> None:
        """One more operation, written but (as far as the caller knows) never returned."""
        if kind == "set":
            self._set(self._draw_ns(data), data.draw(keys), data.draw(values))
        elif kind == "remove":
            self._remove(self._draw_ns(data), data.draw(keys))
        elif kind == "clear":
            self._clear(self._draw_ns(data))
        elif kind == "delete sub-storage":
            parent = self._draw_ns(data, MAX_DEPTH - 1)
            self._delete_sub_storage(parent, data.draw(st.sampled_from(NAMES)))
        elif kind == "batch":
            self._batch(self._draw_ns(data), data.draw(batch_ops), rollback=False)
        else:
            ops = data.draw(memory_ops)
            self._memory_flush(self._draw_ns(data), [(ops, data.draw(checkpoints))])

    def _recover(self, expected: int, torn: bool) -> None:
        """Reopen after a crash and check the recovery properties (module docstring)."""
        want = self.history[expected]
        history = "\n".join(
            f"  {i}: {p.what} end={p.end}{'' if p.acknowledged else ' (unacknowledged)'}"
            for i, p in enumerate(self.history)
        )

        def check(actual: Model, when: str) -> None:
            if actual == want.model:
                return
            matches = [i for i, p in enumerate(self.history) if p.model == actual]
            raise AssertionError(
                f"{when}: state is not history point {expected} ({want.what}); "
                f"it matches points {matches or 'none: not a prefix of the history'}\n"
                + "\n".join(describe_difference(actual, want.model))
                + f"\nhistory since the last durable point:\n{history}"
            )

        with self._open(read_only=True) as read_only:
            check(read_state(read_only), "read-only open after the crash")
            read_only._check()
        root = self.root = self._open()
        assert bool(root.report.torn_tails) == torn, (root.report, torn)
        check(read_state(root), "open after the crash")
        root._check()
        root.close()
        self.root = self._open()
        check(read_state(self.root), "second open after the crash")
        self.model = want.model.copy()
        self._written("recovered", durable=True)

    @rule(stage=st.sampled_from(["output not renamed", "inputs not deleted"]))
    def crash_inside_compaction(self, stage: str) -> None:
        root = self._storage()
        root._engine.wait_for_background_compaction()
        if stage == "output not renamed":
            # the output was being written under its temporary name
            sealed = sorted(self._segments())[:-1]
            if sealed:
                path = self._segments()[sealed[-1]] + COMPACT_TMP_SUFFIX
                with open(path, "wb") as out, open(self._segments()[sealed[0]], "rb") as src:
                    out.write(src.read()[: SEGMENT_SIZE // 3])
        else:
            # the output was renamed over the last input; the others not deleted yet
            saved = {}
            for number, path in self._segments().items():
                with open(path, "rb") as segment:
                    saved[number] = (path, segment.read())
            result = root.compact()
            for number in result.inputs[:-1]:
                path, content = saved[number]
                with open(path, "xb") as segment:
                    segment.write(content)
        self._written(f"crash inside compaction: {stage}", durable=True)
        self._abandon()
        self._recover(0, torn=False)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def storage_equals_model(self) -> None:
        if self.root is None:
            return
        actual = read_state(self.root)
        assert actual == self.model, "\n".join(describe_difference(actual, self.model))
        self.root._check()

    def teardown(self) -> None:
        try:
            if self.root is not None:
                self.root.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


RecoveryMachine.TestCase.settings = settings(
    settings.get_profile("logstate-fuzz"),  # registered in fuzz/conftest.py
    max_examples=2_000 if LONG else 100,
    stateful_step_count=60 if LONG else 30,
)
TestRecovery = RecoveryMachine.TestCase
