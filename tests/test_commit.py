"""GroupCommit alone: a fake file system (only ``fdatasync``) and a real Lifecycle.

The sync target is the engine's own rule, ``Appender.sync_target``, run on a
stand-in for the appender (``Log``): what GroupCommit gets from the engine,
without an engine. ``FakeFS`` counts fdatasyncs, can hold one until the test
lets it return, or fail it; ``durable`` is what the fake disk holds: the
target read before the fdatasync, once that fdatasync returned.

Every test runs against both protocols: ``GroupCommit`` (pure Python, the
reference) and, on the C path, ``NativeCommit`` (csrc/commit.c), which then
calls the fake file system and the target from C.

    python -m pytest tests/test_commit.py -q
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Final

import pytest

from logstate._append import Appender
from logstate._commit import GroupCommit, NativeCommit
from logstate._errors import StorageClosedError, StorageFailedError
from logstate._lifecycle import Lifecycle
from logstate._native import EXT

FD: Final = 7
WAIT_S: Final = 10.0

# the protocols under test; commit_class (autouse) picks one per test run
COMMIT_CLASSES: Final[list[type[GroupCommit]]] = [GroupCommit] + (
    [] if EXT is None else [NativeCommit]
)
_in_use: list[type[GroupCommit]] = [GroupCommit]


@pytest.fixture(params=COMMIT_CLASSES, ids=lambda cls: cls.__name__, autouse=True)
def commit_class(request: pytest.FixtureRequest) -> Iterator[type[GroupCommit]]:
    """Each test, once per protocol: make() builds that class."""
    _in_use[0] = request.param
    yield request.param
    _in_use[0] = GroupCommit


class Log:
    """The appender's side: bytes written so far and the active descriptor."""

    def __init__(self, life: Lifecycle) -> None:
        self._life = life
        self._segments = SimpleNamespace(active=SimpleNamespace(fd=FD))
        self.written_pos = 0
        self.lock = threading.Lock()  # the engine's write lock
        self.targeted = 0  # the target of the sync in progress (or last)

    def write(self, size: int) -> int:
        with self.lock:
            self.written_pos += size
            return self.written_pos

    def target(self) -> tuple[int, int]:
        with self.lock:
            pos, fd = Appender.sync_target(self)  # type: ignore[arg-type]
            self.targeted = pos
            return pos, fd


class FakeFS:
    """``fdatasync`` only: counted, optionally slow, held or failing."""

    def __init__(self, log: Log, delay: float = 0.0) -> None:
        self.log = log
        self.delay = delay
        self.calls = 0
        self.durable = 0
        self.hold: threading.Event | None = None  # set: the held fdatasync returns
        self.entered = threading.Event()  # an fdatasync has started
        self.fail_with: int | None = None  # errno of the next fdatasync
        self.lock = threading.Lock()

    def fdatasync(self, fd: int) -> None:
        assert fd == FD
        with self.lock:
            self.calls += 1
            covers = self.log.targeted
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(WAIT_S), "the test never let the fdatasync return"
        if self.delay:
            time.sleep(self.delay)
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise OSError(error, "injected")
        with self.lock:
            self.durable = max(self.durable, covers)


def current_class() -> type[GroupCommit]:
    """The protocol the running test is for (commit_class)."""
    return _in_use[0]


def make(delay: float = 0.0) -> tuple[GroupCommit, FakeFS, Log, Lifecycle]:
    life = Lifecycle("/fake", read_only=False)
    log = Log(life)
    fs = FakeFS(log, delay)
    return _in_use[0](fs, life, log.target), fs, log, life  # type: ignore[arg-type]


def run(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "a commit never returned"


def test_a_commit_syncs_once_and_a_covered_one_not_again() -> None:
    commit, fs, log, _life = make()
    end = log.write(100)
    commit.commit(end)
    assert (fs.calls, fs.durable, commit.synced_pos) == (1, 100, 100)
    commit.commit(end)  # covered already
    commit.commit(50)
    assert fs.calls == 1


def test_concurrent_commits_share_fdatasyncs() -> None:
    writers = 32
    commit, fs, log, _life = make(delay=0.02)
    start = threading.Barrier(writers)
    problems: list[str] = []

    def writer() -> None:
        start.wait()
        end = log.write(10)
        commit.commit(end)
        if fs.durable < end:  # returned before a sync covered it
            problems.append(f"returned at {end} with {fs.durable} durable")

    run([threading.Thread(target=writer) for _ in range(writers)])
    assert not problems, problems
    assert commit.synced_pos == fs.durable == writers * 10
    # a leader syncs, the others wait for its round, the next leader covers them all
    assert fs.calls <= writers // 4, fs.calls


def test_synced_pos_moves_only_after_the_fdatasync_returned() -> None:
    commit, fs, log, _life = make()
    fs.hold = threading.Event()
    listened: list[int] = []
    commit.listener = listened.append
    first = log.write(100)
    returned: list[int] = []

    def committer(end: int) -> None:
        commit.commit(end)
        returned.append(end)

    leader = threading.Thread(target=committer, args=(first,))
    leader.start()
    assert fs.entered.wait(WAIT_S)
    later = log.write(50)  # written during the sync: not covered by it
    follower = threading.Thread(target=committer, args=(later,))
    follower.start()
    time.sleep(0.05)
    assert commit.synced_pos == 0 and listened == [] and returned == []
    fs.hold.set()
    leader.join(WAIT_S)
    follower.join(WAIT_S)
    assert sorted(returned) == [first, later]
    assert fs.calls == 2  # the follower led a second round for its bytes
    assert listened == [100, 150]  # the target read before each sync, after it returned
    assert commit.synced_pos == fs.durable == 150


def test_a_failed_fdatasync_fails_the_lifecycle_and_is_never_retried() -> None:
    commit, fs, log, life = make()
    fs.hold = threading.Event()
    fs.fail_with = errno.EIO
    listened: list[int] = []
    commit.listener = listened.append
    end = log.write(100)
    outcomes: list[BaseException | None] = []

    def committer(end: int) -> None:
        try:
            commit.commit(end)
        except (OSError, StorageFailedError) as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)

    leader = threading.Thread(target=committer, args=(end,))
    leader.start()
    assert fs.entered.wait(WAIT_S)
    followers = [threading.Thread(target=committer, args=(log.write(10),)) for _ in range(4)]
    for follower in followers:
        follower.start()
    time.sleep(0.05)
    fs.hold.set()
    for thread in [leader, *followers]:
        thread.join(WAIT_S)
    assert fs.calls == 1, "synced again after a failed fdatasync (fsyncgate)"
    assert isinstance(life.failed, OSError) and life.failed.errno == errno.EIO
    assert sum(type(o) is OSError for o in outcomes) == 1  # the leader's own error
    assert sum(type(o) is StorageFailedError for o in outcomes) == 4  # never success
    assert commit.synced_pos == 0 and listened == []
    with pytest.raises(StorageFailedError):  # and later commits, without syncing
        commit.commit(log.write(10))
    assert fs.calls == 1


def test_a_failed_final_sync_fails_the_lifecycle_too() -> None:
    commit, fs, log, life = make()
    fs.fail_with = errno.ENOSPC
    end = log.write(100)
    with pytest.raises(OSError):
        commit.final_sync(FD, end)
    assert life.failed is not None and not life.final_synced
    with pytest.raises(StorageFailedError):
        commit.commit(end)
    assert fs.calls == 1 and commit.synced_pos == 0


def test_a_final_sync_covers_everything_and_tells_the_listener() -> None:
    commit, fs, log, life = make()
    listened: list[int] = []
    commit.listener = listened.append
    end = log.write(100)
    commit.final_sync(FD, end)
    assert (fs.calls, commit.synced_pos, listened, life.final_synced) == (1, 100, [100], True)
    commit.commit(end)  # a writer still on its way: covered, no sync of a closed descriptor
    assert fs.calls == 1


def test_a_closed_lifecycle_refuses_without_syncing() -> None:
    commit, fs, log, life = make()
    commit.commit(log.write(10))
    life.begin_close()
    life.mark_closed()
    with pytest.raises(StorageClosedError):
        commit.commit(log.write(10))
    assert fs.calls == 1 and commit.synced_pos == 10


def test_advance_only_moves_forward() -> None:
    commit, fs, log, _life = make()
    commit.advance(200)  # a roll synced everything up to here
    commit.advance(100)
    assert commit.synced_pos == 200
    log.write(150)
    commit.commit(150)
    assert fs.calls == 0


def test_lifecycle_blocks_writes_before_it_sets_the_flag_that_blocks_them() -> None:
    """An interrupt between the two assignments must leave writes refused (the slow check)."""
    order: list[str] = []

    class Recording(Lifecycle):
        def __setattr__(self, name: str, value: object) -> None:
            order.append(name)
            super().__setattr__(name, value)

    calls: list[tuple[Callable[[Lifecycle], None], str]] = [
        (lambda life: life.fail(OSError(5, "EIO")), "failed"),
        (lambda life: life.begin_close(), "closing"),
        (lambda life: life.mark_closed(), "closed"),
        (lambda life: life.mark_forked(1), "forked_from"),
    ]
    for call, flag in calls:
        life = Recording("/store", read_only=False)
        order.clear()
        call(life)
        assert order.index("blocked") < order.index(flag), (flag, order)
        life._check()
