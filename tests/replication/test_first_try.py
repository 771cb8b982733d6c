"""The first try: the committing thread starts the publish, on a real server.

- a sync commit that is the only record queued is published by the thread
  that commits it (from the offer before its fdatasync, or from the commit
  listener with sync="none"), never by the shipper's thread, one message each;
- a first try whose answer is lost (the broker stored it) is published again
  by the shipper's thread under the same message id, and stored once;
- a first try answered "duplicate", or not at all, is left to the shipper's
  thread (taken over at its deadline): stored once, nothing hangs;
- writers in four threads: every seq once, in order;
- with ``ack="async"`` a record of ``FIRST_TRY_MIN_BYTES`` or more is
  published at once by the thread that committed it; a smaller one is left
  to the shipper's thread (which lets others join it).

    python -m pytest tests/replication/test_first_try.py -q
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from logstate import InMemoryStorage, LocalFileStorage
from logstate.replication import ReplicationError
from logstate.replication._client import Client
from logstate.replication._queue import FIRST_TRY_MIN_BYTES, ShipQueue
from logstate.replication._replicator import Replicator
from logstate.replication._shipper import Shipper
from logstate.replication._streams import PubAck
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock
from tests.replication.test_listener_interrupt import _interrupt_after_queue_append
from tests.replication.test_replication import (
    assert_exactly_once,
    changelog,
    open_replicated,
    subject_seqs,
)

Answer = concurrent.futures.Future[PubAck]


def sync_store(server: NatsServer, path: Path, sync: str, **options: Any) -> LocalFileStorage:
    store = open_replicated(path, changelog(server, ack="sync", **options), Clock(), sync=sync)
    assert store.wait_replicated(10.0)
    return store


def client_of(store: LocalFileStorage) -> Client:
    """The replication client of ``store`` (one shared connection)."""
    replicator = store._engine.replication
    assert isinstance(replicator, Replicator)
    return replicator.client


def count_thread_publishes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The messages the shipper's thread publishes (``Shipper._ship_next`` calls)."""
    calls: list[int] = []
    ship_next = Shipper._ship_next

    def counted(self: Shipper) -> None:
        calls.append(1)
        ship_next(self)

    monkeypatch.setattr(Shipper, "_ship_next", counted)
    return calls


def first_tries(
    monkeypatch: pytest.MonkeyPatch,
    store: LocalFileStorage,
    answer: Callable[[Answer], Answer] | None = None,
) -> list[str]:
    """Note the thread of each first try; ``answer(real_future) -> future``, when
    given, replaces the answer the committing thread gets."""
    client = client_of(store)
    real = client.start_publish
    threads: list[str] = []

    def start(subject: str, payload: bytes, headers: dict[str, str], timeout_s: float) -> Any:
        threads.append(threading.current_thread().name)
        future = real(subject, payload, headers, timeout_s)
        assert future is not None  # (connected: it was sent)
        return future if answer is None else answer(future)

    monkeypatch.setattr(client, "start_publish", start)
    return threads


@pytest.mark.parametrize("sync", ["always", "none"])
def test_a_sync_commit_is_published_by_the_thread_that_commits_it(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str
) -> None:
    store = sync_store(nats_server, tmp_path / "a", sync)
    by_thread = count_thread_publishes(monkeypatch)
    tries = first_tries(monkeypatch, store)
    for i in range(5):
        store[f"k{i}"] = i  # returns once acknowledged
        assert store.replication_lag() == (0, 0)
    assert tries == [threading.current_thread().name] * 5
    assert by_thread == []
    assert subject_seqs(nats_server) == [(i, i) for i in range(1, 6)]
    store.close()


def test_a_first_try_whose_answer_is_lost_is_stored_once(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sync_store(nats_server, tmp_path / "a", "always")
    by_thread = count_thread_publishes(monkeypatch)

    def lost(real: Answer) -> Answer:
        out: Answer = concurrent.futures.Future()
        real.add_done_callback(lambda _: out.set_exception(TimeoutError("answer lost (test)")))
        return out

    tries = first_tries(monkeypatch, store, lost)
    for i in range(3):
        store[f"k{i}"] = i
    # each record published once by the shipper's thread: again after its first
    # try (the broker's 10071, then its own id), or with none (the thread busy)
    assert len(by_thread) == 3 and 1 <= len(tries) <= 3
    assert subject_seqs(nats_server) == [(1, 1), (2, 2), (3, 3)]
    store.close()


def test_a_first_try_answered_duplicate_is_published_by_the_shipper(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sync_store(nats_server, tmp_path / "a", "always")
    by_thread = count_thread_publishes(monkeypatch)

    def duplicate(*_args: object) -> Answer:
        out: Answer = concurrent.futures.Future()
        out.set_result(PubAck("STATE", 999, True))  # (and nothing was sent)
        return out

    monkeypatch.setattr(client_of(store), "start_publish", duplicate)
    store["k"] = 1
    assert len(by_thread) == 1
    assert subject_seqs(nats_server) == [(1, 1)]
    store.close()


def test_a_first_try_with_no_answer_is_taken_over_and_nothing_hangs(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sync_store(nats_server, tmp_path / "a", "always", timeout=0.5)
    never: list[Answer] = []

    def silent(*_args: object) -> Answer:
        never.append(concurrent.futures.Future())  # (nothing sent, never answered)
        return never[-1]

    monkeypatch.setattr(client_of(store), "start_publish", silent)
    with pytest.raises(ReplicationError, match="kept and will be shipped"):
        store["k"] = 1
    # the shipper's thread takes it over at its deadline (timeout + 2 s) and publishes it
    assert store.wait_replicated(10.0)
    assert never[0].cancelled()
    assert subject_seqs(nats_server) == [(1, 1)]
    assert store["k"] == 1
    store.close()


def test_writers_in_four_threads_ship_every_seq_once_in_order(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    store = sync_store(nats_server, tmp_path / "a", "always")
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(40):
                store[f"t{n}-{i}"] = i
        except BaseException as exc:  # (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.replication_lag() == (0, 0)
    assert_exactly_once(subject_seqs(nats_server), 160)
    store.close()


def test_an_async_commit_of_a_large_record_is_published_at_once_by_its_thread(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_replicated(tmp_path / "a", changelog(nats_server), Clock(), sync="none")
    assert store.wait_replicated(10.0)
    by_thread = count_thread_publishes(monkeypatch)
    tries = first_tries(monkeypatch, store)
    memory = InMemoryStorage(store)
    for i in range(FIRST_TRY_MIN_BYTES // 100 + 1):
        memory[f"k{i}"] = b"v" * 100  # one group over FIRST_TRY_MIN_BYTES
    memory.flush()
    store["small"] = 1  # under it: left to the shipper's thread, which lingers
    assert store.wait_replicated(10.0)
    assert tries == [threading.current_thread().name]
    assert len(by_thread) == 1
    assert subject_seqs(nats_server) == [(1, 1), (2, 2)]
    store.close()


def test_a_first_try_answered_before_its_callback_is_added_is_claimed_off_the_committing_thread(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A future done when its callback is added runs the callback in the
    committing thread, where an interrupt may land: the shipper's thread
    claims it instead (never half-marked acknowledged by an interrupt)."""
    store = sync_store(nats_server, tmp_path / "a", "always")
    claimed_in: list[str] = []
    first_done = ShipQueue._first_done

    def noted(self: ShipQueue, first: Answer) -> None:
        claimed_in.append(threading.current_thread().name)
        first_done(self, first)

    monkeypatch.setattr(ShipQueue, "_first_done", noted)

    def answered(real: Answer) -> Answer:
        real.result(5.0)  # (done before the caller adds its callback)
        return real

    tries = first_tries(monkeypatch, store, answered)
    for i in range(3):
        store[f"k{i}"] = i
    assert len(tries) == 3
    assert claimed_in and threading.current_thread().name not in claimed_in
    assert subject_seqs(nats_server) == [(1, 1), (2, 2), (3, 3)]
    assert store.replication_lag() == (0, 0)
    store.close()


def test_no_first_try_starts_while_the_shippers_thread_publishes(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an interrupt between the queue's append and its count, the record
    is delivered again while the shipper's thread publishes it: no first try
    of it (or of the next) may start meanwhile."""
    store = sync_store(nats_server, tmp_path / "a", "always")
    store["k0"] = 0
    client = client_of(store)
    in_publish = threading.Event()
    overlaps: list[str] = []
    real_publish, real_start = client.publish_ack, client.start_publish

    def publish_ack(subject: str, payload: bytes, headers: dict[str, str], t: float) -> Any:
        in_publish.set()  # (the shipper's thread)
        try:
            time.sleep(0.3)
            return real_publish(subject, payload, headers, t)
        finally:
            in_publish.clear()

    def start_publish(subject: str, payload: bytes, headers: dict[str, str], t: float) -> Any:
        if in_publish.is_set():
            overlaps.append(headers["Logstate-Seq"])
        return real_start(subject, payload, headers, t)

    monkeypatch.setattr(client, "publish_ack", publish_ack)
    monkeypatch.setattr(client, "start_publish", start_publish)
    tracer, fired = _interrupt_after_queue_append()
    sys.settrace(tracer)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            store["k1"] = 1
    finally:
        sys.settrace(None)
    assert fired[0]
    assert in_publish.wait(2.0)  # the shipper's thread found seq 2 queued
    store["k2"] = 2  # delivers seq 2 again, then seq 3
    assert store.wait_replicated(5.0)
    assert overlaps == []
    assert_exactly_once(subject_seqs(nats_server), 3)
    store.close()
