"""The shipper's queue: committed records until the broker acknowledged them.

Owns: the queue of committed records not yet acknowledged by the broker (fed
by the engine's commit listener, bounded by ``max_lag_bytes``), the waits
of ``ack="sync"`` writers and of a full backlog, the lag, the
acknowledgements not yet reported to ``on_ack``, and the first try of
:mod:`._first_try`. The thread that publishes the queue is
:class:`~._shipper.Shipper`'s, a subclass.
Must never: drop a record it was given before the broker acknowledged it,
queue one twice, or hold the engine's write lock (it is called outside it,
from the thread that made a record durable).

With ``ack="sync"`` the engine also offers each record just before the
fdatasync that makes it durable (:meth:`ShipQueue.offer`, the early
listener): it is queued and published while the disk syncs, and
``on_commit`` then only waits for it. A record is queued once whichever
comes first. When it is the only record queued and nothing is being
published, the committing thread starts its publish itself (the first
try); the loop thread marks it acknowledged, or leaves it to the shipper's
thread. With ``ack="async"`` so does the thread that commits a record of
``FIRST_TRY_MIN_BYTES`` or more (nothing would join it in its message).

Waits use one plain lock per waiter, released by the shipper: an interrupt
(KeyboardInterrupt) in a waiter leaves nothing held.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from logstate._errors import FencedError, ReplicationError
from logstate._hooks import ReplicationLag
from logstate.replication import _loop
from logstate.replication._client import Client
from logstate.replication._first_try import FirstTry
from logstate.replication._streams import PubAck
from logstate.replication._wire import Identity, Pending

__all__ = ["FIRST_TRY_MIN_BYTES", "ShipQueue"]

# ack="async": a record this large is published by the thread that committed
# it, at once (a first try): it fills a message of its own well enough
FIRST_TRY_MIN_BYTES = 64 * 1024


class _Waiter:
    __slots__ = ("lock", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.lock = threading.Lock()
        self.lock.acquire()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # (woken already)
            self.lock.release()


class ShipQueue:
    """The queue of one partition's committed records (see the module docstring).

    ``head_stream_seq``: the stream seq of the subject's last message when
    the shipper starts (what the first publish expects); ``acked_seq``: the
    last logstate seq the stream holds. ``on_ack(last_seq, stream_seq)`` is
    called from the shipper's thread after each acknowledged message (never
    with a seq ``on_commit`` has not had: see ``_report_ack``);
    ``on_fenced(error)`` once, when another writer has taken over (it
    returns the error kept, its ``kept_aside`` counted under the engine's lock).
    """

    def __init__(
        self,
        client: Client,
        stream: str,
        subject: str,
        who: Identity,
        *,
        head_stream_seq: int,
        acked_seq: int,
        ack: str,
        timeout_s: float,
        max_lag_bytes: int,
        on_ack: Callable[[int, int], None],
        on_fenced: Callable[[FencedError], FencedError],
        fenced_error: Callable[[str, tuple[int, int] | None], FencedError],
    ) -> None:
        self._client = client
        self.stream = stream
        self.subject = subject
        self.who = who
        self.head_stream_seq = head_stream_seq
        self.acked_seq = acked_seq
        self._sync = ack == "sync"
        self.timeout_s = timeout_s
        self.max_lag_bytes = max_lag_bytes
        self._on_ack = on_ack
        self._on_fenced = on_fenced
        self._fenced_error = fenced_error
        self._lock = threading.Lock()  # guards the fields below
        self._pending: deque[Pending] = deque()
        self.pending_bytes = 0
        self.queued_seq = acked_seq  # the last seq handed to the queue
        self.told_seq = acked_seq  # the last seq on_commit was called for
        # acknowledged (last seq, stream seq) not yet reported to on_ack (see _report_ack)
        self._acks_ahead: deque[tuple[int, int]] = deque()
        self._waiters: list[_Waiter] = []
        self._wake = threading.Lock()  # released to wake the shipper thread
        self._wake.acquire()
        self._idle = False  # the thread sleeps on an empty queue: a commit wakes it
        self.fenced: FencedError | None = None
        self.last_error: BaseException | None = None
        self.shipped_bytes = 0  # payload bytes acknowledged since start
        # (last seq, stream seq of its first message: of chunk 0 for a chunked
        # record, 0 when not known) of each record run acknowledged here
        self.acked_messages: deque[tuple[int, int]] = deque(maxlen=100_000)
        # (seq, chunk index) of the subject's head when it is a chunk of a
        # record not yet whole in the stream (a crash cut its chunks): resumed after it
        self.resume_chunk: tuple[int, int] | None = None
        self._first = FirstTry(client, subject, who, timeout_s)  # (guarded by _lock)
        self._shipping = False  # the shipper's thread publishes (no first try meanwhile)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the queue
    def add_backlog(self, records: list[tuple[int, bytes]], time_s: float) -> None:
        """Queue records read from the local log at open (before the listener)."""
        with self._lock:
            for seq, record in records:
                if seq != self.queued_seq + 1:
                    raise ValueError(f"backlog seq {seq} where {self.queued_seq + 1} was due")
                self._pending.append(Pending(seq, record, time_s))
                self.pending_bytes += len(record)
                self.queued_seq = self.told_seq = seq

    def on_commit(self, seq: int, record: bytes) -> None:
        """The engine's commit listener: queue a durable record (unless offered
        already), then wait if due."""
        fenced = self.fenced
        if fenced is not None:
            raise self._refused(fenced)
        with self._lock:
            if seq <= self.told_seq:
                # delivered again after this call raised (a sync timeout, a full
                # backlog) for the commit that made it: queued already, and that
                # commit was told. Waiting here again would keep the engine from
                # handing over the records committed after it, which would then
                # count in no lag and be shipped by no one until a later commit.
                return
            first = None
            # (not queued when offered before its fdatasync, or appended already)
            if seq > self.queued_seq and self._queue(seq, record):
                first = self._start_first()
            self.told_seq = seq
            over = self.pending_bytes > self.max_lag_bytes
            poke = (self._idle or self._sync) and self._first.future is None
        if first is not None:
            first.add_done_callback(self._answered)
        elif poke:
            self._poke()
        if self._sync:
            self._wait_for(seq, "the broker did not acknowledge it")
            if self._acks_ahead:  # (a first try's: the shipper's thread reports it)
                self._poke()
        elif over:
            self._wait_room()

    def offer(self, seq: int, record: bytes) -> None:
        """The engine's early listener with ``ack="sync"``: queue a record written
        whole, just before the fdatasync that makes it durable, so that its
        publish and that sync overlap; :meth:`on_commit` then only waits. A
        record not next in line is left to ``on_commit``. Never blocks or raises.
        """
        with self._lock:
            if self.fenced is not None or seq != self.queued_seq + 1:
                return
            first = self._start_first() if self._queue(seq, record) else None
        if first is None:
            self._poke()
        else:
            first.add_done_callback(self._answered)

    def _start_first(self) -> concurrent.futures.Future[PubAck] | None:
        """Under ``_lock``: the first try of the one queued record, if nothing
        else is queued or being published."""
        if len(self._pending) != 1 or self._stopping or self.resume_chunk or self._shipping:
            return None
        if not self._sync and len(self._pending[0].record) < FIRST_TRY_MIN_BYTES:
            return None  # (ack="async": small records wait for others to share a message)
        return self._first.start(self._pending[0], self.head_stream_seq)

    def _answered(self, first: concurrent.futures.Future[PubAck]) -> None:
        """A first try's done callback: on the loop thread, :meth:`_first_done`;
        in the committing thread (the future was done when it was added, so
        the callback runs there, where an interrupt may land), the shipper's
        thread claims it instead."""
        if _loop.on_loop_thread():
            self._first_done(first)
        else:
            self._poke()

    def _first_done(self, first: concurrent.futures.Future[PubAck]) -> None:
        """A first try answered (on the loop thread) or was taken over (by the
        shipper's thread): acknowledged, or left to the shipper's thread."""
        waiters: list[_Waiter] = []
        with self._lock:
            claimed = self._first.claim(first)
            if claimed is None:
                return  # (claimed already)
            head, ack = claimed
            if ack is not None:
                waiters = self._stored(head.seq, ack.stream_seq, ack.stream_seq)
                self.head_stream_seq = ack.stream_seq  # (after: never ahead of the queue)
            # an ack to report (by the shipper's thread; a sync commit whose
            # record it is not told yet wakes it after its wait)
            ahead = self._acks_ahead
            told = bool(ahead) and ahead[0][0] <= self.told_seq
            more = ack is None or bool(self._pending) or told
        for waiter in waiters:
            waiter.wake()
        if more:
            self._poke()

    def _queue(self, seq: int, record: bytes) -> bool:
        """Under ``_lock``: append the record ``queued_seq + 1`` and count it;
        False when it was appended already (then maybe being shipped)."""
        pending = self._pending
        # queued already when an interrupt fell between the append and
        # the count (then maybe shipped): count it, never queue it twice
        appended = not (pending and pending[-1].seq == seq) and self.acked_seq < seq
        if appended:
            if seq != self.queued_seq + 1:
                raise AssertionError(f"commit seq {seq} after {self.queued_seq}")
            pending.append(Pending(seq, record, time.time()))
        self.pending_bytes, self.queued_seq = self.pending_bytes + len(record), seq
        return appended

    def _refused(self, fenced: FencedError) -> FencedError:
        return FencedError(
            fenced.path, fenced.stream, fenced.partition, fenced.by_writer, fenced.kept_aside
        )

    def _poke(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._wake.release()

    def _wait_for(self, seq: int, why: str) -> None:
        if not self.wait_acked(seq, self.timeout_s):
            raise self._not_acked(f"{why} within {self.timeout_s:g} s", seq)

    def _wait_room(self) -> None:
        """A full backlog: wait (at most the timeout) until it is below the bound."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            with self._lock:
                if self.pending_bytes <= self.max_lag_bytes:
                    return
                target = self._pending[0].seq if self._pending else self.acked_seq
            left = deadline - time.monotonic()
            if left <= 0 or not self.wait_acked(target, left):
                why = f"but the changelog backlog is over max_lag_bytes={self.max_lag_bytes}"
                raise self._not_acked(f"{why} for {self.timeout_s:g} s", self.queued_seq)

    def _not_acked(self, why: str, seq: int) -> FencedError | ReplicationError:
        """Why a wait for the broker ended: fenced, or not acknowledged (yet)."""
        if self.fenced is not None:
            return self._refused(self.fenced)
        error = self.last_error
        text = "no answer yet" if error is None else f"last error: {error}"
        return ReplicationError(
            self.stream,
            self.who.partition,
            f"committed locally, {why} ({text}); it is kept and will be shipped: "
            "do not apply the change again",
            seq,
        )

    def wait_acked(self, seq: int, timeout_s: float | None) -> bool:
        """Wait until the broker acknowledged ``seq``; False on timeout or when fenced."""
        with self._lock:
            if self.acked_seq >= seq:
                return True
            if self.fenced is not None:
                return False
            waiter = _Waiter(seq)
            self._waiters.append(waiter)
            poke = self._first.future is None  # (else the first try's answer wakes it)
        if poke:
            self._poke()  # (a lingering shipper publishes now)
        try:
            got = waiter.lock.acquire(timeout=-1 if timeout_s is None else max(timeout_s, 0))
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        return got and self.acked_seq >= seq

    def lag(self) -> ReplicationLag:
        with self._lock:
            return ReplicationLag(len(self._pending), self.pending_bytes)

    def _stored(self, stored_last: int, stream_seq: int, start_stream_seq: int) -> list[_Waiter]:
        """Under ``_lock``: the stream holds every seq to ``stored_last`` (its last
        message at ``stream_seq``): drop them from the queue; the waiters to wake."""
        pending = self._pending
        gone = sum(1 for _ in itertools.takewhile(lambda p: p.seq <= stored_last, pending))
        size = sum(len(pending[i].record) for i in range(gone))
        self.pending_bytes -= size  # (counted before the records go)
        for _ in range(gone):
            pending.popleft()
        self.acked_seq = stored_last
        self.shipped_bytes += size
        self.acked_messages.append((stored_last, start_stream_seq))
        self._acks_ahead.append((stored_last, stream_seq))
        return [w for w in self._waiters if w.seq <= stored_last]

    def _report_ack(self) -> None:
        """``on_ack`` with the newest acknowledged point whose records
        :meth:`on_commit` has had (durable locally).

        With ``ack="sync"`` the broker may acknowledge a record before its
        local fdatasync returned (:meth:`offer`); the point ``on_ack`` saves
        must never pass the local log, or a power loss would make the next
        open take this copy for a diverged one. Such an acknowledgement is
        reported at the next one, or at :meth:`stop`. A first try's is
        reported by the shipper's thread, which the commit that waited for it
        wakes (:meth:`on_commit`).
        """
        with self._lock:
            point = None
            while self._acks_ahead and self._acks_ahead[0][0] <= self.told_seq:
                point = self._acks_ahead.popleft()
        if point is not None:
            self._on_ack(*point)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "acked_seq": self.acked_seq,
                "queued_seq": self.queued_seq,
                "lag_records": len(self._pending),
                "lag_bytes": self.pending_bytes,
                "epoch": self.who.epoch,
                "writer": self.who.writer,
                "fenced": self.fenced is not None,
                "last_error": None if self.last_error is None else str(self.last_error),
            }
