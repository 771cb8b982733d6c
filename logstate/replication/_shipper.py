"""The shipper: publishes an engine's committed records to its partition's subject.

Owns: the one thread that publishes the records of its queue
(:class:`~._queue.ShipQueue`, the base class) in seq order (runs of whole
records, a record over the message limit in chunks), and what an answer
means (acknowledged; a lost ack found stored; taken over by another writer:
fenced).
Must never: publish a seq twice or out of order, skip one, or publish while
a first try (:mod:`._first_try`) is out.

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
from typing import Final

from logstate._errors import FencedError, ReplicationError
from logstate.replication import _loop
from logstate.replication import _wire as wire
from logstate.replication._client import WrongLastSequence
from logstate.replication._queue import ShipQueue

__all__ = ["Shipper"]

log = logging.getLogger("logstate.replication")

_RETRY_FIRST_S: Final = 0.05
_RETRY_MAX_S: Final = 2.0
# ack="async": how long the oldest queued record may wait for others to share its message
LINGER_S: Final = wire.MAX_TIME_SPAN_S


class Shipper(ShipQueue):
    """Publishes committed records of one partition (see the module docstring
    and :class:`ShipQueue`'s, whose constructor it takes)."""

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
            self._report_ack()  # (a first try's ack)
            with self._lock:
                first = self._first.future
                head = self._pending[0] if self._pending else None
                self._idle = head is None
                hurry = self._sync or bool(self._waiters)
                full = self.pending_bytes >= self._client.max_payload - wire.HEADER_ROOM
            if first is not None:  # (wait for it; past its deadline, take it over)
                left = self._first.deadline - time.monotonic()
                if first.done():  # (answered, and its callback not run: an interrupt)
                    self._first_done(first)
                elif left > 0:
                    self._wake.acquire(timeout=min(left, 0.5))
                else:
                    first.cancel()
                    self._first_done(first)
                continue
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
            if self._first.future is not None:
                return  # (a first try started meanwhile)
            run = list(itertools.islice(self._pending, 1 + limit // 16))
            self._shipping = True  # (no first try until this run is answered)
        try:
            self._ship_run(run, limit)
        finally:
            self._shipping = False

    def _ship_run(self, run: list[wire.Pending], limit: int) -> None:
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
            waiters = self._stored(stored_last, stream_seq, start_stream_seq)
            self._shipping = False  # (answered: a first try may start)
        for waiter in waiters:
            waiter.wake()
        self._report_ack()

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
