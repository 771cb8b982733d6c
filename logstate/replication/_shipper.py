"""The shipper: publishes an engine's committed records to its partition's subject.

Owns: the queue of committed records not yet acknowledged by the broker (fed
by the engine's commit listener, bounded by ``max_lag_bytes``), the one
thread that publishes them in seq order (runs of whole records, a record
over the message limit in chunks), what an answer means (acknowledged; a
lost ack found stored; taken over by another writer: fenced), the waits of
``ack="sync"`` writers and of a full backlog, and the lag.
Must never: publish a seq twice or out of order, skip one, drop a record it
was given before the broker acknowledged it, or hold the engine's write
lock (it is called outside it, from the thread that made a record durable).

With ``ack="sync"`` the engine also offers each record just before the
fdatasync that makes it durable (:meth:`Shipper.offer`, the early listener):
it is queued and published while the disk syncs, and ``on_commit`` then only
waits for it. A record is queued once whichever comes first.

Waits use one plain lock per waiter, released by the shipper: an interrupt
(KeyboardInterrupt) in a waiter leaves nothing held.

Batching: with ``ack="async"`` and nobody waiting for an acknowledgement,
the thread lets the records of ``LINGER_S`` after the oldest queued one
gather before it publishes (each message has a fixed cost in this process,
paid under the GIL by the threads that commit); a commit wakes the thread
only when it sleeps on an empty queue, and a waiter always wakes it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from logstate._errors import FencedError, ReplicationError
from logstate._hooks import ReplicationLag
from logstate.replication import _loop
from logstate.replication import _wire as wire
from logstate.replication._client import Client, WrongLastSequence
from logstate.replication._wire import Identity, Pending

__all__ = ["Shipper"]

log = logging.getLogger("logstate.replication")

_RETRY_FIRST_S: Final = 0.05
_RETRY_MAX_S: Final = 2.0
# ack="async": how long the oldest queued record may wait for others to share its message
LINGER_S: Final = wire.MAX_TIME_SPAN_S


class _Waiter:
    __slots__ = ("lock", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.lock = threading.Lock()
        self.lock.acquire()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # (woken already)
            self.lock.release()


class Shipper:
    """Publishes committed records of one partition (see the module docstring).

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
            if seq > self.queued_seq:  # (else offered before its fdatasync)
                self._queue(seq, record)
            self.told_seq = seq
            over = self.pending_bytes > self.max_lag_bytes
            idle = self._idle
        if idle or self._sync:
            self._poke()
        if self._sync:
            self._wait_for(seq, "the broker did not acknowledge it")
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
            self._queue(seq, record)
        self._poke()

    def _queue(self, seq: int, record: bytes) -> None:
        """Under ``_lock``: append the record ``queued_seq + 1`` and count it."""
        pending = self._pending
        # queued already when an interrupt fell between the append and
        # the count (then maybe shipped): count it, never queue it twice
        if not (pending and pending[-1].seq == seq) and self.acked_seq < seq:
            if seq != self.queued_seq + 1:
                raise AssertionError(f"commit seq {seq} after {self.queued_seq}")
            pending.append(Pending(seq, record, time.time()))
        self.pending_bytes, self.queued_seq = self.pending_bytes + len(record), seq

    def _refused(self, fenced: FencedError) -> FencedError:
        return FencedError(
            fenced.path, fenced.stream, fenced.partition, fenced.by_writer, fenced.kept_aside
        )

    def _poke(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._wake.release()

    def _wait_for(self, seq: int, why: str) -> None:
        if not self.wait_acked(seq, self.timeout_s):
            if self.fenced is not None:
                raise self._refused(self.fenced)
            raise ReplicationError(
                self.stream,
                self.who.partition,
                f"committed locally, {why} within {self.timeout_s:g} s "
                f"({self._last_error_text()}); it is kept and will be shipped: "
                "do not apply the change again",
                seq,
            )

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
                if self.fenced is not None:
                    raise self._refused(self.fenced)
                raise ReplicationError(
                    self.stream,
                    self.who.partition,
                    f"committed locally, but the changelog backlog is over "
                    f"max_lag_bytes={self.max_lag_bytes} for {self.timeout_s:g} s "
                    f"({self._last_error_text()}); it is kept and will be shipped: "
                    "do not apply the change again",
                    self.queued_seq,
                )

    def _last_error_text(self) -> str:
        error = self.last_error
        return "no answer yet" if error is None else f"last error: {error}"

    def wait_acked(self, seq: int, timeout_s: float | None) -> bool:
        """Wait until the broker acknowledged ``seq``; False on timeout or when fenced."""
        with self._lock:
            if self.acked_seq >= seq:
                return True
            if self.fenced is not None:
                return False
            waiter = _Waiter(seq)
            self._waiters.append(waiter)
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

    # ------------------------------------------------------------------ the thread
    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self, ship_first: bool) -> None:
        """Stop the thread; ``ship_first``: after shipping what is queued (bounded).

        On the loop thread (a storage the garbage collector closed there)
        nothing is waited for: the loop would wait on itself. The records
        not shipped stay in the local log, shipped at the next open.
        """
        on_loop = _loop.on_loop_thread()
        if ship_first and self.fenced is None and not on_loop:
            with self._lock:
                target = self.queued_seq
            if not self.wait_acked(target, self.timeout_s):
                log.warning(
                    "%s: closing with %d records not acknowledged by the broker; "
                    "they are kept in the local log and shipped at the next open",
                    self.who.partition,
                    len(self._pending),
                )
        self._stopping = True
        self._poke()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and not on_loop:
            thread.join(self.timeout_s + 1.0)
        self._report_ack()  # (the engine's final delivery came before: all of it is told)

    def forget(self) -> None:
        """In a forked child: the thread is not there; never publish from here."""
        self._stopping = True
        self._thread = None

    def _run(self) -> None:
        retry_s = _RETRY_FIRST_S
        while not self._stopping:
            with self._lock:
                head = self._pending[0] if self._pending else None
                self._idle = head is None
                hurry = self._sync or bool(self._waiters)
                full = self.pending_bytes >= self._client.max_payload - wire.HEADER_ROOM
            if head is None:
                self._wake.acquire(timeout=0.5)
                continue
            age_s = time.time() - head.time_s  # (< 0: the clock stepped back; no wait)
            if not (hurry or full) and 0 <= age_s < LINGER_S:
                self._wake.acquire(timeout=LINGER_S - age_s)
                continue
            try:
                self._ship_next()
                retry_s = _RETRY_FIRST_S
            except FencedError:
                return
            except ReplicationError as exc:  # a timeout, a lost connection: try again
                self.last_error = exc
                log.debug("%s: publish failed, retrying: %s", self.who.partition, exc)
                self._wake.acquire(timeout=retry_s)
                retry_s = min(retry_s * 2, _RETRY_MAX_S)
            except Exception as exc:  # a bug: keep it visible, keep the records
                self.last_error = exc
                log.exception("%s: shipper error; retrying", self.who.partition)
                self._wake.acquire(timeout=_RETRY_MAX_S)

    def _ship_next(self) -> None:
        limit = self._client.max_payload - wire.HEADER_ROOM
        with self._lock:
            run = list(itertools.islice(self._pending, 1 + limit // 16))
        count = wire.plan_run(run, limit)
        run = run[:count]
        first, last = run[0].seq, run[-1].seq
        times = (run[0].time_s, run[-1].time_s)
        if count == 1 and len(run[0].record) > limit:
            start_stream_seq = 0  # (unknown when chunks stored before a crash are skipped)
            for chunk, part in wire.chunk_record(run[0].record, limit):
                resume = self.resume_chunk
                if resume is not None and resume >= (first, chunk.part):
                    continue  # stored already (before a crash or a lost ack)
                stream_seq, _ = self._publish(first, last, times, part, chunk)
                if chunk.part == 0:
                    start_stream_seq = stream_seq
                self.resume_chunk = (first, chunk.part)
            self.resume_chunk = None
            stored_last = last
        else:
            payload = b"".join(p.record for p in run)
            stream_seq, stored_last = self._publish(first, last, times, payload)
            start_stream_seq = stream_seq
        with self._lock:
            size = 0
            while self._pending and self._pending[0].seq <= stored_last:
                size += len(self._pending.popleft().record)
            self.pending_bytes -= size
            self.acked_seq = stored_last
            waiters = [w for w in self._waiters if w.seq <= stored_last]
        self.shipped_bytes += size
        self.acked_messages.append((stored_last, start_stream_seq))
        for waiter in waiters:
            waiter.wake()
        self._report_ack(stored_last, stream_seq)

    def _report_ack(self, last_seq: int | None = None, stream_seq: int = 0) -> None:
        """``on_ack`` with the newest acknowledged point whose records
        :meth:`on_commit` has had (durable locally).

        With ``ack="sync"`` the broker may acknowledge a record before its
        local fdatasync returned (:meth:`offer`); the point ``on_ack`` saves
        must never pass the local log, or a power loss would make the next
        open take this copy for a diverged one. Such an acknowledgement is
        reported at the next one, or at :meth:`stop`.
        """
        with self._lock:
            if last_seq is not None:
                self._acks_ahead.append((last_seq, stream_seq))
            point = None
            while self._acks_ahead and self._acks_ahead[0][0] <= self.told_seq:
                point = self._acks_ahead.popleft()
        if point is not None:
            self._on_ack(*point)

    def _publish(
        self,
        first: int,
        last: int,
        times: tuple[float, float],
        payload: bytes,
        chunk: wire.Chunk | None = None,
    ) -> tuple[int, int]:
        """Publish one message on top of the current head.

        Returns:
            (its stream seq, the last seq the stream now holds): that is
            ``last``, or less when an earlier attempt of ours, sent again by
            the client after a reconnect, holds a shorter run.
        """
        headers = wire.message_headers(
            self.who, first, last, times, payload, self.head_stream_seq, chunk
        )
        try:
            ack = self._client.publish_ack(self.subject, payload, headers, self.timeout_s)
            stream_seq = ack.stream_seq
            if ack.duplicate:  # (an R3 stream: ids hold no writer, so it may be another's)
                stored = self._client.message(self.stream, stream_seq, self.timeout_s)
                if stored is None:  # (purged: ask again; past the window the head tells)
                    raise ReplicationError(self.stream, self.who.partition, "duplicate", first)
                by = stored.headers.get(wire.H_WRITER, "")
                if by != self.who.writer:
                    self._fence(by, first)
                    raise self.fenced_now()
        except WrongLastSequence:
            # the head moved: an earlier attempt of ours (its ack lost, or sent
            # by the client after a reconnect), or another writer's message
            stream_seq, stored_last = self._head_moved(first, last, headers[wire.H_MSG_ID])
        else:
            stored_last = last
        self.head_stream_seq = stream_seq
        return stream_seq, stored_last

    def _head_moved(self, first: int, last: int, msg_id: str) -> tuple[int, int]:
        last_msg = self._client.last_message(self.stream, self.subject, self.timeout_s)
        head = None
        if last_msg is not None:
            with contextlib.suppress(wire.MessageError):
                head = wire.read_message(last_msg.stream_seq, last_msg.headers, last_msg.data)
        if head is not None and head.writer == self.who.writer and head.epoch == self.who.epoch:
            if head.msg_id == msg_id:
                return head.stream_seq, last
            if head.first == first and head.chunk is None and head.last <= last:
                return head.stream_seq, head.last
            if head.first == first and head.chunk is not None:
                self.head_stream_seq = head.stream_seq
                self.resume_chunk = (first, head.chunk.part)
                raise ReplicationError(
                    self.stream, self.who.partition, "resuming a chunked record", first
                )
            if head.last == first - 1:  # our message before this one: the head we expect
                self.head_stream_seq = head.stream_seq
                raise ReplicationError(self.stream, self.who.partition, "head re-read", first)
        by = "" if last_msg is None else last_msg.headers.get(wire.H_WRITER, "")
        self._fence(by, first)
        raise self.fenced_now()

    def fenced_now(self) -> FencedError:
        fenced = self.fenced
        assert fenced is not None
        return self._refused(fenced)

    def _fence(self, by_writer: str, first_unacked: int) -> None:
        with self._lock:
            kept = (first_unacked, self.queued_seq) if self.queued_seq >= first_unacked else None
            error = self._fenced_error(by_writer, kept)
        log.error("%s", error)
        try:
            error = self._on_fenced(error)  # the engine refuses every call from here on
        finally:
            with self._lock:
                self.fenced = error
                waiters = list(self._waiters)
            for waiter in waiters:
                waiter.wake()

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
