"""The group commit's cohort wait: before it syncs, the leader waits for the
threads that committed in the last few syncs, at most a bound, woken by the
last arrival.

Deterministic: the clock GroupCommit times its fdatasyncs with is fake (every
sync "takes" 100 s, so the bound is ``max_wait_s``, set per test), and what
the leader did is read from its counters (``waits``, ``waits_timed_out``),
never from how long anything took. Timeouts only turn a hang into a failure.
The cohort is counted by thread, so each writer here is a thread of its own
that runs one commit at a time (``Committer``).

    python -m pytest tests/test_commit_cohort.py -q
"""

from __future__ import annotations

import errno
import itertools
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

import pytest

from logstate._commit import COHORT_ROUNDS, GroupCommit
from logstate._errors import StorageFailedError
from logstate._lifecycle import Lifecycle
from tests.interrupts import Injector
from tests.test_commit import FakeFS, Log, commit_class, current_class

__all__ = ["commit_class"]  # (the autouse fixture: each test once per protocol)

WAIT_S: Final = 10.0  # a commit that takes longer hangs
LONG_S: Final = 60.0  # a bound no wait of these tests may reach


class Interrupt(BaseException):
    """What the test's SIGINT handler raises (as KeyboardInterrupt would)."""


def fake_clock() -> Callable[[], float]:
    ticks = itertools.count(step=100.0)
    return lambda: next(ticks)


def make(max_wait_s: float, delay: float = 0.0) -> tuple[GroupCommit, FakeFS, Log, Lifecycle]:
    """A GroupCommit on the fake file system of test_commit, with a fake clock."""
    life = Lifecycle("/fake", read_only=False)
    log = Log(life)
    fs = FakeFS(log, delay)
    commit = current_class()(fs, life, log.target, clock=fake_clock())  # type: ignore[arg-type]
    commit.max_wait_s = max_wait_s
    return commit, fs, log, life


class Committer:
    """A writer thread: runs the commits it is given, one at a time."""

    def __init__(self, commit: GroupCommit, log: Log) -> None:
        self._commit = commit
        self._log = log
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._results: queue.Queue[object] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._results.put(job())
            except BaseException as exc:  # handed to the test
                self._results.put(exc)

    def start(self, size: int = 10) -> int:
        """Write ``size`` bytes now, and commit them in this thread; their end."""
        end = self._log.write(size)
        self._jobs.put(lambda: self._commit.commit(end))
        return end

    def loop(self, commits: int, start: threading.Barrier) -> None:
        """Write and commit ``commits`` times in a closed loop, from ``start``."""

        def run() -> None:
            start.wait(WAIT_S)
            for _ in range(commits):
                self._commit.commit(self._log.write(10))

        self._jobs.put(run)

    def result(self) -> object:
        try:
            return self._results.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError("a commit never returned") from None

    def commit(self, size: int = 10) -> None:
        """Write and commit, and wait for it to return."""
        self.start(size)
        outcome = self.result()
        assert outcome is None, outcome

    def stop(self) -> None:
        self._jobs.put(None)
        self.thread.join(WAIT_S)


@pytest.fixture
def committers() -> Iterator[Callable[[GroupCommit, Log], Committer]]:
    made: list[Committer] = []

    def new(commit: GroupCommit, log: Log) -> Committer:
        made.append(Committer(commit, log))
        return made[-1]

    yield new
    for committer in made:
        committer.stop()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.001)


def leader_waits(commit: GroupCommit) -> bool:
    return commit.waiting()


def test_one_thread_never_waits() -> None:
    commit, fs, log, _life = make(max_wait_s=LONG_S)
    for _ in range(3 * COHORT_ROUNDS):
        commit.commit(log.write(10))
    assert (commit.waits, fs.calls, commit.synced_pos) == (0, 3 * COHORT_ROUNDS, fs.durable)


def test_a_thread_that_stopped_committing_leaves_the_cohort(
    committers: Callable[[GroupCommit, Log], Committer],
) -> None:
    commit, fs, log, _life = make(max_wait_s=0.01)
    gone, alone = committers(commit, log), committers(commit, log)
    gone.commit()
    for _ in range(3 * COHORT_ROUNDS):
        alone.commit()
    # waited (for nobody) only while the other thread was among the last rounds'
    assert 0 < commit.waits == commit.waits_timed_out <= COHORT_ROUNDS
    waits = commit.waits
    for _ in range(COHORT_ROUNDS):
        alone.commit()
    assert commit.waits == waits
    assert commit.synced_pos == fs.durable == log.written_pos


def test_the_wait_is_bounded_when_the_cohort_never_comes(
    committers: Callable[[GroupCommit, Log], Committer],
) -> None:
    commit, fs, log, _life = make(max_wait_s=0.05)
    writers = [committers(commit, log) for _ in range(3)]
    for writer in writers:
        writer.commit()
    calls, waits, timed_out = fs.calls, commit.waits, commit.waits_timed_out
    writers[0].commit()  # the other two are in the cohort, and never come
    assert (commit.waits, commit.waits_timed_out) == (waits + 1, timed_out + 1)
    assert fs.calls == calls + 1 and commit.synced_pos == fs.durable == log.written_pos


def prime(commit: GroupCommit, writers: list[Committer]) -> tuple[int, int]:
    """Each writer commits once (each may wait for the others, briefly), then
    the bound is raised out of reach; the waits and timeouts so far."""
    bound_s, commit.max_wait_s = commit.max_wait_s, 0.01
    for writer in writers:
        writer.commit()
    commit.max_wait_s = bound_s
    return commit.waits, commit.waits_timed_out


def test_the_last_arrival_ends_the_leaders_wait_and_one_sync_covers_all(
    committers: Callable[[GroupCommit, Log], Committer],
) -> None:
    commit, fs, log, _life = make(max_wait_s=LONG_S)
    writers = [committers(commit, log) for _ in range(3)]
    waits, timed_out = prime(commit, writers)
    calls = fs.calls
    ends = [writers[0].start()]
    wait_until(lambda: leader_waits(commit), "the leader waits for its cohort")
    ends += [writer.start() for writer in writers[1:]]
    assert [writer.result() for writer in writers] == [None, None, None]
    assert (commit.waits, commit.waits_timed_out) == (waits + 1, timed_out)  # woken
    assert fs.calls == calls + 1, "the arrivals were not covered by the leader's sync"
    assert commit.synced_pos == fs.durable == max(ends) and not leader_waits(commit)


def test_closed_loop_writers_are_covered_by_one_sync_per_round(
    committers: Callable[[GroupCommit, Log], Committer],
) -> None:
    """Without the wait, four writers split into cohorts: two syncs or more a round.

    The bound is short enough for the ends of the run, where the writers that
    finished first are still expected for ``COHORT_ROUNDS`` syncs.
    """
    commit, fs, log, _life = make(max_wait_s=0.2, delay=0.002)  # (a sync lets others run)
    writers = [committers(commit, log) for _ in range(4)]
    rounds = 40
    start = threading.Barrier(len(writers))
    for writer in writers:
        writer.loop(rounds, start)
    assert [writer.result() for writer in writers] == [None] * 4
    assert commit.waits_timed_out <= 2 * COHORT_ROUNDS
    assert fs.calls <= rounds + 2 * COHORT_ROUNDS, f"{fs.calls} syncs for {rounds} rounds of 4"
    assert commit.synced_pos == fs.durable == log.written_pos == 4 * rounds * 10
    commit._check(log.written_pos)


def test_a_failed_sync_after_the_wait_fails_every_waiter(
    committers: Callable[[GroupCommit, Log], Committer],
) -> None:
    commit, fs, log, life = make(max_wait_s=LONG_S)
    writers = [committers(commit, log) for _ in range(3)]
    waits, timed_out = prime(commit, writers)
    calls, synced = fs.calls, commit.synced_pos
    fs.fail_with = errno.EIO
    writers[0].start()
    wait_until(lambda: leader_waits(commit), "the leader waits for its cohort")
    for writer in writers[1:]:
        writer.start()
    outcomes = [writer.result() for writer in writers]
    # the thread that synced gets the OSError: the waiting leader (GroupCommit),
    # or the last arrival, which leads the round itself (NativeCommit: either
    # of the two started after the leader waits)
    synced_by = [i for i, outcome in enumerate(outcomes) if type(outcome) is OSError]
    assert synced_by == [0] if type(commit) is GroupCommit else synced_by in ([1], [2])
    failure = outcomes.pop(synced_by[0])
    assert isinstance(failure, OSError) and failure.errno == errno.EIO
    assert [type(o) for o in outcomes] == [StorageFailedError] * 2
    assert (commit.waits, commit.waits_timed_out) == (waits + 1, timed_out)
    assert fs.calls == calls + 1 and commit.synced_pos == synced
    assert life.failed is failure


@pytest.fixture
def sigint_raises_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise Interrupt

    previous = signal.signal(signal.SIGINT, handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_main_when(condition: Callable[[], bool], what: str) -> threading.Thread:
    main = threading.main_thread().ident
    assert main is not None

    def run() -> None:
        wait_until(condition, what)
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.usefixtures("sigint_raises_interrupt")
def test_an_interrupt_in_the_leaders_wait_lets_the_others_sync(
    committers: Callable[[GroupCommit, Log], Committer],
) -> None:
    assert threading.current_thread() is threading.main_thread()
    commit, fs, log, _life = make(max_wait_s=LONG_S)
    others = [committers(commit, log) for _ in range(2)]
    commit.max_wait_s = 0.01
    commit.commit(log.write(10))  # the main thread is the third of the cohort
    prime(commit, others)
    commit.max_wait_s = LONG_S
    calls = fs.calls
    arrived: list[int] = []

    def the_second_has_arrived() -> bool:
        if not arrived and leader_waits(commit):
            arrived.append(others[0].start())  # 2 of 3: the leader keeps waiting
        if not arrived or commit._pending_of(others[0].thread.ident or 0) != arrived[0]:
            return False
        commit.max_wait_s = 0.05  # the next leader's bound (the third never comes)
        return True

    kill = interrupt_main_when(the_second_has_arrived, "the second writer arrived")
    with pytest.raises(Interrupt):
        commit.commit(log.write(10))
    kill.join(WAIT_S)
    timed_out = commit.waits_timed_out
    assert others[0].result() is None  # it led the next sync itself
    commit._check(log.written_pos)
    assert not commit.turn.locked() and commit.idle() and not leader_waits(commit)
    assert fs.calls == calls + 1 and commit.synced_pos == fs.durable == log.written_pos
    assert commit.waits_timed_out <= timed_out + 1  # waited for the third, bounded
    commit.commit(log.write(10))  # and the interrupted thread commits again
    assert commit.synced_pos == fs.durable == log.written_pos


@pytest.mark.usefixtures("sigint_raises_interrupt")
def test_an_interrupted_arrival_does_not_hang_the_leader(
    committers: Callable[[GroupCommit, Log], Committer],
) -> None:
    commit, fs, log, _life = make(max_wait_s=0.5)
    leader, third = committers(commit, log), committers(commit, log)
    prime(commit, [leader, third])
    commit.commit(log.write(10))  # the main thread is in the cohort
    leader.start()
    wait_until(lambda: leader_waits(commit), "the leader waits for its cohort")
    main = threading.get_ident()
    end = log.write(10)
    kill = interrupt_main_when(lambda: commit._pending_of(main) == end, "the main thread arrived")
    with pytest.raises(Interrupt):  # waiting for the leader's round, or arriving
        commit.commit(end)
        time.sleep(WAIT_S)  # (covered before the signal came: wait for it here)
    kill.join(WAIT_S)
    assert leader.result() is None
    commit._check(log.written_pos)
    assert not commit.turn.locked() and commit.idle()
    # its commit, abandoned, is covered and no longer counts as an arrival
    assert commit.synced_pos == fs.durable == log.written_pos and commit._arrived() == 0


def test_after_fork_the_cohort_is_empty() -> None:
    commit, _fs, log, _life = make(max_wait_s=LONG_S)
    commit.commit(log.write(10))
    commit.after_fork()
    assert (commit._tracked(), commit.waiting(), commit.idle()) == (0, False, True)


def test_an_interrupt_at_any_point_of_a_waiting_leader_leaves_the_commit_whole(
    committers: Callable[[GroupCommit, Log], Committer],
) -> None:
    """Every point where a signal can land in a commit that waits for its
    cohort (which never comes: the wait ends at its bound)."""
    for point in itertools.count():
        commit, fs, log, _life = make(max_wait_s=0.001)
        commit.commit(log.write(10))  # the main thread, then two more, are the cohort
        prime(commit, [committers(commit, log) for _ in range(2)])
        waits, end = commit.waits, log.write(10)
        injector = Injector(point)
        interrupted = injector.run(lambda: commit.commit(end))  # noqa: B023 (run at once)
        where = injector.fired_at
        commit._check(log.written_pos)
        assert not commit.turn.locked() and commit.idle(), where
        assert commit.synced_pos <= fs.durable, f"claimed unsynced bytes, interrupted at {where}"
        commit.commit(end)  # the same thread commits again: covered, nothing left waiting
        assert commit.synced_pos == fs.durable == log.written_pos, where
        if not interrupted:
            assert point > 0 and commit.waits > waits, "the commit never waited"
            return
        assert point < 200, "still interrupted after 200 points"


@pytest.mark.usefixtures("sigint_raises_interrupt")
def test_an_interrupt_at_any_point_of_an_arrival_never_hangs_the_waiting_leader(
    committers: Callable[[GroupCommit, Log], Committer],
) -> None:
    """The main thread arrives while another thread leads and waits for it."""
    for point in itertools.count():
        commit, fs, log, _life = make(max_wait_s=0.01)
        leader = committers(commit, log)
        commit.commit(log.write(10))
        prime(commit, [leader])
        commit.max_wait_s = 0.2  # (an arrival not counted costs the leader this)
        leader.start()
        wait_until(lambda: leader_waits(commit), "the leader waits for its cohort")  # noqa: B023
        end = log.write(10)
        injector = Injector(point)
        interrupted = injector.run(lambda: commit.commit(end))  # noqa: B023 (run at once)
        where = injector.fired_at
        assert leader.result() is None, where
        commit._check(log.written_pos)
        assert not commit.turn.locked() and commit.idle(), where
        commit.commit(end)
        assert commit.synced_pos == fs.durable == log.written_pos, where
        if not interrupted:
            return
        assert point < 200, "still interrupted after 200 points"
