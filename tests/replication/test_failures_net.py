"""Replication across broker and network failures, with real servers, while writers commit.

- the broker SIGKILLed and restarted (same port, same store);
- the network cut for 10 s by a TCP proxy between the writers and the broker;
- the leader of an R3 stream killed in a 3-node cluster.
Each writer is a thread of this process committing InMemoryStorage flushes
(one group each, ``checkpoint=round``) and keeping every flush's outcome.
Writer processes killed or paused: test_failures.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from logstate import InMemoryStorage, LocalFileStorage
from logstate.replication import JetStreamChangelog, ReplicationError, restore
from tests.replication.servers import NatsCluster, NatsServer, TcpProxy
from tests.replication.writers import (
    assert_exactly_once,
    assert_restore_equals,
    subject_messages,
)

STORE_OPTIONS: dict[str, Any] = {"segment_size": 64 * 1024, "auto_compact": False}
KEPT_TEXT = "it is kept and will be shipped"
LOOP_BOUND_S = 120.0  # no commit loop runs longer than this


class Outcome(NamedTuple):
    round: int
    seq: int  # the local seq after the flush
    error: BaseException | None
    started: float  # time.monotonic() at the flush's call
    ended: float


class CommitLoop:
    """Commits a flush per round in a thread until :meth:`stop` (bounded by LOOP_BOUND_S)."""

    def __init__(self, store: LocalFileStorage, pause_s: float = 0.005) -> None:
        self.store = store
        self.pause_s = pause_s
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self.failure: BaseException | None = None  # anything but a ReplicationError
        self._thread = threading.Thread(target=self._run, name="commit-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + LOOP_BOUND_S
        round_ = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            round_ += 1
            memory = InMemoryStorage(self.store)
            for i in range(round_ % 9 + 1):
                memory[f"k{(round_ * 7 + i) % 150}"] = f"{round_}-{i}" * (i + 1)
            started = time.monotonic()
            error: BaseException | None = None
            try:
                memory.flush(checkpoint=round_)
            except ReplicationError as exc:
                error = exc
            except BaseException as exc:
                self.failure = exc
                return
            seq = self.store._engine.appender.seq
            self.outcomes.append(Outcome(round_, seq, error, started, time.monotonic()))
            self._stop.wait(self.pause_s)

    def wait_rounds(self, count: int, timeout_s: float = 60.0, ok: bool = True) -> None:
        """Wait until ``count`` more flushes (returned without error when ``ok``)."""

        def done() -> int:
            return sum(1 for o in list(self.outcomes) if o.error is None or not ok)

        target = done() + count
        deadline = time.monotonic() + timeout_s
        while done() < target:
            assert self.failure is None, repr(self.failure)
            assert self._thread.is_alive(), "the commit loop ended"
            assert time.monotonic() < deadline, f"not {count} more rounds in {timeout_s:g} s"
            time.sleep(0.01)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        self._thread.join(LOOP_BOUND_S)
        assert not self._thread.is_alive()
        assert self.failure is None, repr(self.failure)
        return list(self.outcomes)

    def between(self, start: float, end: float) -> list[Outcome]:
        """The flushes that were running at some time in ``[start, end]``."""
        return [o for o in list(self.outcomes) if o.started <= end and o.ended >= start]


@pytest.fixture
def loops() -> Iterator[list[CommitLoop]]:
    made: list[CommitLoop] = []
    try:
        yield made
    finally:
        for loop in made:
            loop._stop.set()
            loop._thread.join(LOOP_BOUND_S)
            with contextlib.suppress(Exception):  # (closed by the test when it passed)
                loop.store.close()


def open_writer(path: Path, servers: list[str], partition: str, **options: Any) -> LocalFileStorage:
    stream = options.pop("stream", "STATE")
    changelog = JetStreamChangelog(servers, stream, partition, **options)
    return LocalFileStorage(path, changelog=changelog, sync="always", **STORE_OPTIONS)


def finish(
    store: LocalFileStorage, servers: list[str], partition: str, stream: str = "STATE"
) -> int:
    """Wait until ``store`` is shipped whole (the stream holds it once), close it; its seq."""
    assert store.wait_replicated(60.0)
    assert store.replication_lag() == (0, 0)
    seq = store._engine.appender.seq
    assert assert_exactly_once(subject_messages(servers, partition, stream)) == seq
    store.close()
    assert assert_exactly_once(subject_messages(servers, partition, stream)) == seq
    return seq


def test_sync_commits_refused_in_an_outage_are_all_counted_and_shipped_after_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    servers = [nats_server.url]
    store = open_writer(tmp_path / "w", servers, "p.0", ack="sync", timeout=0.5)
    store["before"] = 0
    nats_server.pause()  # no answer: each sync commit fails after its timeout
    try:
        for i in range(3):
            with pytest.raises(ReplicationError, match=KEPT_TEXT):
                store[f"k{i}"] = i
        # all three are queued for the stream, not only the first
        assert store.replication_lag().groups == 3
    finally:
        nats_server.resume()
    assert finish(store, servers, "p.0") == 4  # shipped without a later commit


@pytest.mark.parametrize("ack", ["async", "sync"])
def test_a_broker_killed_and_restarted_loses_and_duplicates_nothing(
    ack: str, nats_server: NatsServer, loops: list[CommitLoop], tmp_path: Path
) -> None:
    timeout_s = 1.0
    servers = [nats_server.url]
    store = open_writer(tmp_path / "w", servers, "p.0", ack=ack, timeout=timeout_s)
    loop = CommitLoop(store)
    loops.append(loop)
    loop.wait_rounds(20)
    killed_at = time.monotonic()
    nats_server.kill()
    time.sleep(3 * timeout_s)  # an outage longer than a sync commit waits
    nats_server.restart()
    healed_at = time.monotonic()
    loop.wait_rounds(20)
    outcomes = loop.stop()
    during = loop.between(killed_at, healed_at)
    assert during
    errors = [o.error for o in outcomes if o.error is not None]
    if ack == "async":  # commits went on locally, some wholly inside the outage
        assert errors == []
        assert any(killed_at <= o.started and o.ended <= healed_at for o in during)
    else:  # each commit of the outage failed after its timeout, or waited for the restart
        assert errors, "no sync commit failed in an outage three times its timeout"
        assert all(KEPT_TEXT in str(e) for e in errors), errors[0]
        assert {o.round for o in outcomes if o.error} <= {o.round for o in during}
    print(f"{ack}: {len(during)} commits during the outage, {len(errors)} failed")
    assert finish(store, servers, "p.0") == outcomes[-1].seq
    state = assert_restore_equals(servers, "p.0", tmp_path / "w", tmp_path / "copy")
    assert state["checkpoint"] == outcomes[-1].round


def test_a_network_cut_keeps_async_commits_local_fails_sync_ones_and_heals_without_loss(
    nats_server: NatsServer,
    tcp_proxy: Callable[[int], TcpProxy],
    loops: list[CommitLoop],
    tmp_path: Path,
) -> None:
    timeout_s = 2.0
    proxy = tcp_proxy(nats_server.port)
    via_proxy = [proxy.url]
    stores = {
        ack: open_writer(tmp_path / ack, via_proxy, f"{ack}.0", ack=ack, timeout=timeout_s)
        for ack in ("async", "sync")
    }
    running = {ack: CommitLoop(store) for ack, store in stores.items()}
    loops.extend(running.values())
    for loop in running.values():
        loop.wait_rounds(10)
    cut_at = time.monotonic()
    proxy.cut()
    time.sleep(10.0)
    # the last commits are made during the cut: nothing after the heal ships them
    outcomes = {ack: loop.stop() for ack, loop in running.items()}
    healed_at = time.monotonic()
    proxy.heal()

    during_async = running["async"].between(cut_at, healed_at)
    assert all(o.error is None for o in outcomes["async"])
    assert any(cut_at <= o.started and o.ended <= healed_at for o in during_async)
    failed = [o for o in outcomes["sync"] if o.error is not None]
    assert failed, "no sync commit failed during a 10 s cut"
    for o in failed:
        assert isinstance(o.error, ReplicationError) and KEPT_TEXT in str(o.error)
        assert f"within {timeout_s:g} s" in str(o.error)
        assert o.ended - o.started < timeout_s + 5.0  # (failed, not hung)
    assert {o.round for o in failed} <= {
        o.round for o in running["sync"].between(cut_at, healed_at)
    }
    print(
        f"cut: {len(during_async)} async commits, "
        f"{len(failed)} sync commits failed after {timeout_s:g} s"
    )
    direct = [nats_server.url]
    for ack, store in stores.items():
        assert finish(store, direct, f"{ack}.0") == outcomes[ack][-1].seq
        state = assert_restore_equals(direct, f"{ack}.0", tmp_path / ack, tmp_path / f"{ack}-copy")
        assert state["checkpoint"] == outcomes[ack][-1].round


def test_killing_the_r3_stream_leader_loses_no_acknowledged_group(
    nats_cluster: NatsCluster, loops: list[CommitLoop], tmp_path: Path
) -> None:
    stream = "R3KILL"
    servers = nats_cluster.urls
    partitions = ["r.0", "r.1"]
    stores = {
        p: open_writer(
            tmp_path / p, servers, p, stream=stream, ack="sync", timeout=10.0, replicas=3
        )
        for p in partitions
    }
    running = {p: CommitLoop(store) for p, store in stores.items()}
    loops.extend(running.values())
    for loop in running.values():
        loop.wait_rounds(20)
    leader = nats_cluster.stream_leader(stream)
    try:
        leader.kill()
        for loop in running.values():
            loop.wait_rounds(20)  # after a new leader was elected
        outcomes = {p: loop.stop() for p, loop in running.items()}
        survivors = [s.url for s in nats_cluster.servers if s is not leader]
        for p in partitions:
            acknowledged = [o for o in outcomes[p] if o.error is None]
            at_stop = tmp_path / f"{p}-at-stop"
            result = restore(survivors, stream, p, at_stop, timeout=10.0)
            assert result.seq >= acknowledged[-1].seq  # every returned flush is there
            restored = LocalFileStorage(at_stop, read_only=True)
            assert restored.checkpoint >= acknowledged[-1].round
            restored.close()
            longest = max(o.ended - o.started for o in outcomes[p])
            failed = len(outcomes[p]) - len(acknowledged)
            print(f"{p}: {len(outcomes[p])} sync commits, {failed} failed, longest {longest:.1f} s")
            finish(stores[p], survivors, p, stream)
            copy = tmp_path / f"{p}-copy"
            state = assert_restore_equals(survivors, p, tmp_path / p, copy, stream=stream)
            assert state["checkpoint"] == outcomes[p][-1].round
    finally:
        leader.start(wait=False)
        nats_cluster.start()  # (waits until every member is healthy again)
