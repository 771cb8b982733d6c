"""SQLite-style I/O-error sweep: fail the Nth file-system call, for every N.

One fixed scenario (open, sets, a close and reopen, a roll, a batch, a sub-storage, an
InMemoryStorage load and flush with a checkpoint, a remove, a sub-storage
delete, a compaction, a set after it, close) runs on
:class:`tests.faultfs.CrashFS` with call N failing (EIO; ENOSPC with half of
an append written first), for N = 1, 2, ... until a run has no call N. For
each N the promises checked are:

- the call that hit the error either succeeds (the error was in work the
  code documents as best effort: deleting compacted inputs, writing the
  index snapshot at close) or raises that very OSError;
- after a raised error, every later write raises StorageFailedError caused
  by it and reaches no file, and reads return the state before or after the
  failed operation -- except where the code documents that nothing was
  changed and the store stays writable: a compaction failing before its
  rename (the temporary output is removed) and a failed read;
- reopened with the normal file system, the store passes ``_check()`` and
  holds the state before or after the failed operation (plus what was
  written after an error that left it writable); reopening again changes
  nothing, and it accepts writes.

    python -m pytest tests/test_io_error_sweep.py -q
"""

from __future__ import annotations

import copy
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

from logstate import InMemoryStorage, LocalFileStorage, StorageClosedError, StorageFailedError
from logstate._filenames import COMPACT_TMP_SUFFIX, SNAPSHOT_FILE_NAME

from .faultfs import MUTATING_OPS, READ_OPS, CrashFS, LogicalState, observed_state, open_storage

SEGMENT_SIZE: Final = 4096


@dataclass
class Run:
    """One run of the scenario: the file system, the handles it opened."""

    fs: CrashFS
    directory: Path
    sync: str
    handles: dict[str, LocalFileStorage] = field(default_factory=dict)
    mem: InMemoryStorage | None = None

    @property
    def root(self) -> LocalFileStorage:
        return self.handles[""]

    def close(self) -> None:
        """Close every handle (sub-storages first; each close syncs); raise the first error."""
        error: BaseException | None = None
        for name in sorted(self.handles, reverse=True):
            try:
                self.handles[name].close()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error


Namespaces = dict[str, dict[str, Any]]


def _open(run: Run) -> None:
    run.handles[""] = open_storage(
        run.fs, run.directory, sync=run.sync, segment_size=SEGMENT_SIZE, auto_compact=False
    )


def _reopen(run: Run) -> None:
    run.root.close()  # fdatasync, index snapshot
    _open(run)  # loads the snapshot, checks it against the segment


def _batch(run: Run) -> None:
    with run.root.batch() as batch:
        batch.set("a", b"a2" * 100)
        batch.remove("b")
        batch.set("d", 4)


def _create_sub(run: Run) -> None:
    run.handles["sub"] = run.root.get_or_create_sub_storage("sub")


def _load_memory(run: Run) -> None:
    run.mem = InMemoryStorage(run.handles["sub"])


def _flush_memory(run: Run) -> None:
    mem = run.mem
    assert mem is not None
    mem["y"] = b"Y" * 100
    del mem["x"]
    mem.flush(checkpoint={"offset": 7})


def _close(run: Run) -> None:
    run.close()


def _set(name: str, key: str, value: Any) -> Callable[[Run], None]:
    def action(run: Run) -> None:
        run.handles[name][key] = value

    return action


def _changed(change: Callable[[Namespaces], object]) -> Callable[[LogicalState], LogicalState]:
    def after(state: LogicalState) -> LogicalState:
        namespaces = copy.deepcopy(state[0])
        change(namespaces)
        return namespaces, state[1]

    return after


def _same(state: LogicalState) -> LogicalState:
    return state


def _with_checkpoint(state: LogicalState) -> LogicalState:
    namespaces = copy.deepcopy(state[0])
    namespaces["sub"] = {"y": b"Y" * 100}
    return namespaces, {"offset": 7}


# (name, action, the logical state once it succeeded)
STEPS: Final[list[tuple[str, Callable[[Run], object], Callable[[LogicalState], LogicalState]]]] = [
    ("open", _open, _same),
    ("set a", _set("", "a", b"A" * 300), _changed(lambda n: n[""].update(a=b"A" * 300))),
    ("set b", _set("", "b", b"B" * 1500), _changed(lambda n: n[""].update(b=b"B" * 1500))),
    ("close and reopen", _reopen, _same),
    ("set c (rolls)", _set("", "c", b"C" * 2500), _changed(lambda n: n[""].update(c=b"C" * 2500))),
    (
        "batch",
        _batch,
        _changed(lambda n: (n[""].update(a=b"a2" * 100, d=4), n[""].pop("b"))),
    ),
    ("create sub-storage", _create_sub, _changed(lambda n: n.update(sub={}))),
    ("set sub/x", _set("sub", "x", {"n": 1}), _changed(lambda n: n["sub"].update(x={"n": 1}))),
    ("InMemoryStorage load", _load_memory, _same),
    ("InMemoryStorage flush with checkpoint", _flush_memory, _with_checkpoint),
    ("remove a", lambda run: run.root.remove("a"), _changed(lambda n: n[""].pop("a"))),
    (
        "delete sub-storage",
        lambda run: run.root.delete_sub_storage("sub"),
        _changed(lambda n: n.pop("sub")),
    ),
    ("compact", lambda run: run.root.compact(), _same),
    ("set e", _set("", "e", b"E"), _changed(lambda n: n[""].update(e=b"E"))),
    ("close", _close, _same),
]

EMPTY: Final[LogicalState] = ({"": {}}, None)


def expected_states() -> list[LogicalState]:
    """states[i]: the logical state after step i-1 (states[0]: before the first)."""
    states = [EMPTY]
    for _name, _action, after in STEPS:
        states.append(after(states[-1]))
    return states


LATER_WRITES: Final[dict[str, Callable[[Run], object]]] = {
    "set": lambda run: run.root.set("z", 1),
    "remove": lambda run: run.root.remove("c"),
    "clear": lambda run: run.root.clear(),
    "batch": lambda run: _batch(run),
    "flush": lambda run: run.root.flush(),
    "create sub-storage": lambda run: run.root.get_or_create_sub_storage("other"),
    "delete sub-storages": lambda run: run.root.delete_sub_storages(),
    "compact": lambda run: run.root.compact(),
}


def stays_writable(step: str, call: tuple[str, str]) -> bool:
    """What the code documents for an error in ``call`` during ``step``: True when
    nothing was changed and writes go on, False when writes are refused until reopen."""
    op, path = call
    if op in READ_OPS - {"open_file"}:  # (open_file opens for appending too)
        return True  # a failed read changes nothing on disk
    if step == "compact":
        # compact(): "before the rename nothing is changed (the temporary file is
        # removed), after it the storage refuses writes until reopened"; the roll
        # that seals the active segment first is a write like any other, and so is
        # reopening the installed output for reading.
        return path.endswith(COMPACT_TMP_SUFFIX) and op != "rename"
    return False


def best_effort(step: str, call: tuple[str, str]) -> bool:
    """Errors the code documents as logged, not raised."""
    op, path = call
    if step == "compact":
        return op in ("unlink", "fsync_dir")  # deleting the compacted inputs: open will
    if step in ("close", "close and reopen"):
        # the index snapshot is a cache: not written, or not loaded (open scans instead)
        return SNAPSHOT_FILE_NAME in path or op in ("pread", "open_read_only")
    return False


def _with_root_key(state: LogicalState, key: str, value: Any) -> LogicalState:
    namespaces = copy.deepcopy(state[0])
    namespaces[""][key] = value
    return namespaces, state[1]


def mutating_calls(fs: CrashFS) -> int:
    return sum(fs.calls[op] for op in MUTATING_OPS)


TORN_TAILS_CUT: list[str] = []  # stores whose reopen cut a torn tail (short writes)


def reopened_state(directory: Path) -> LogicalState:
    """Open with the normal file system twice; the (checked, stable) contents."""
    with LocalFileStorage(directory, sync="none") as store:
        store._check()
        state = observed_state(store)
        if store.report.torn_tails:
            TORN_TAILS_CUT.append(str(directory))
    with LocalFileStorage(directory, sync="none") as store:
        store._check()
        assert store.report.clean, f"the second reopen repaired again: {store.report}"
        assert observed_state(store) == state, "a second reopen changed the contents"
        store["written after reopen"] = True
    with LocalFileStorage(directory, sync="none") as store:
        assert store["written after reopen"] is True
        store.remove("written after reopen")
    return state


def run_with_fault(tmp_path: Path, n: int, error: int, short_write: bool, sync: str) -> str | None:
    """Run the scenario with call ``n`` failing; check every promise.

    Returns:
        A one-line outcome, or None when the scenario has fewer than ``n`` calls.
    """
    disk = tmp_path / f"disk-{n}"
    disk.mkdir()
    fs = CrashFS(disk)
    run = Run(fs, disk / "store", sync)
    states = expected_states()
    fs.fail_nth(None, n, error, short_write)
    failed_step: int | None = None
    swallowed: list[str] = []
    raised: BaseException | None = None
    for i, (name, action, _after) in enumerate(STEPS):
        try:
            action(run)
        except BaseException as exc:
            raised = exc
            failed_step = i
            break
        finally:
            if fs.injected is not None and failed_step is None and not swallowed:
                swallowed.append(name)
    if fs.injected is None:
        assert raised is None, f"an error nobody injected: {raised!r}"
        run.close()
        return None
    call = fs.injected_call
    assert call is not None

    if failed_step is None:
        # The error did not reach the caller: it must be one the code documents as
        # best effort, and the store went on to the final state.
        step = swallowed[0]
        assert best_effort(step, call), f"{step}: error in {call} was swallowed"
        assert reopened_state(run.directory) == states[-1]
        return f"{step}: {call[0]} error logged, not raised"

    step, before, after = STEPS[failed_step][0], states[failed_step], states[failed_step + 1]
    assert raised is fs.injected, f"{step}: {call} raised {raised!r}, not the injected error"
    allowed = [before, after]
    if step == "open":
        outcome = "open failed"
    elif step in ("close", "close and reopen"):
        for write in LATER_WRITES.values():
            with pytest.raises(StorageClosedError):
                write(run)
        outcome = "raised; store closed"
    elif stays_writable(step, call):
        engine = run.root._engine
        assert engine.failed is None, f"{step}: {call} refused writes: {engine.failed!r}"
        assert observed_state(run.root) in allowed
        run.root["after the error"] = True
        if step == "compact":
            run.root.compact()  # a retry succeeds
        allowed = [_with_root_key(s, "after the error", True) for s in allowed]
        assert observed_state(run.root) in allowed
        outcome = "raised; still writable"
    else:
        engine = run.root._engine
        assert engine.failed is fs.injected, f"{step}: {call} did not fail the store"
        calls = mutating_calls(fs)
        for what, write in LATER_WRITES.items():
            with pytest.raises(StorageFailedError) as refused:
                write(run)
                pytest.fail(f"{what} accepted after the error")
            assert refused.value.__cause__ is fs.injected, what
        if run.mem is not None:
            with pytest.raises(StorageFailedError):
                run.mem.flush(checkpoint={"offset": 8})
        assert mutating_calls(fs) == calls, "a write or sync reached the disk after the error"
        assert observed_state(run.root) in allowed, "reads after the error"
        outcome = "raised; writes refused"
    run.close()
    assert reopened_state(run.directory) in allowed, f"{step}: {call}"
    return f"{step}: {call[0]} -> {outcome}"


PASSES: Final = {
    # name: (errno, short write for append, sync mode)
    "EIO, sync=always": (errno.EIO, False, "always"),
    "ENOSPC with short writes, sync=always": (errno.ENOSPC, True, "always"),
    "EIO, sync=none": (errno.EIO, False, "none"),
}


def test_scenario_without_faults_reaches_the_model_state(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    fs = CrashFS(disk)
    run = Run(fs, disk / "store", "always")
    states = expected_states()
    for i, (name, action, _after) in enumerate(STEPS):
        action(run)
        if run.handles and not run.root.closed:
            assert observed_state(run.root) == states[i + 1], name
            run.root._check()
    assert fs.injected is None
    assert reopened_state(run.directory) == states[-1]
    assert fs.calls["rename"] >= 2 and fs.calls["unlink"] >= 1, "compaction and snapshot ran"


@pytest.mark.parametrize("fault", PASSES)
def test_every_failing_call_is_either_survived_or_raised_and_reopens_to_before_or_after(
    tmp_path: Path, fault: str
) -> None:
    error, short_write, sync = PASSES[fault]
    TORN_TAILS_CUT.clear()
    outcomes: dict[str, int] = {}
    n = 0
    while True:
        n += 1
        outcome = run_with_fault(tmp_path, n, error, short_write, sync)
        if outcome is None:
            break
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert n > 40, "the scenario made fewer calls than expected"
    # every kind of outcome the code documents was reached
    kinds = {o.split(" -> ")[-1].split(": ")[-1] for o in outcomes}
    assert "raised; writes refused" in kinds
    assert "raised; still writable" in kinds
    assert any("logged, not raised" in o for o in outcomes)
    assert any(o.startswith("compact:") and "still writable" in o for o in outcomes)
    assert any(o.startswith("compact:") and "refused" in o for o in outcomes)
    if short_write:  # half-written records were found and cut at reopen
        assert sum("/disk-" in d for d in TORN_TAILS_CUT) >= 5, TORN_TAILS_CUT
