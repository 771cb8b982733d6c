"""The first try of a publish, started by the committing thread.

Owns: at most one publish that the thread committing a record started on the
event loop itself (with ``ack="sync"`` just before the fdatasync that makes
the record durable; with ``ack="async"`` for a record of
``FIRST_TRY_MIN_BYTES`` or more, once durable): its future, the record and a
deadline, and what its answer means. The shipper's thread would add two
hand-overs between threads (from the committing thread to it, and from it
back to the waiter) to the round trip every ``ack="sync"`` commit waits for;
with ``ack="async"`` its work would land in the commits that come next.
Must never: wait (it runs in the committing thread's sync turn, and its
answer on the loop thread); decide anything but "stored, acknowledged" or
"not known": anything else (an error, a timeout, a duplicate, a loop that
gives no answer by the deadline) leaves the record to the shipper's thread,
which publishes it again under the same message id, as after a lost ack.

The shipper holds its lock around :meth:`FirstTry.start` and
:meth:`FirstTry.claim`; while a first try is out, nothing else is published.
"""

from __future__ import annotations

import concurrent.futures
import time

from logstate.replication import _loop
from logstate.replication import _wire as wire
from logstate.replication._client import Client
from logstate.replication._streams import PubAck
from logstate.replication._wire import Identity, Pending

__all__ = ["FirstTry"]


class FirstTry:
    """At most one publish out, started by a committing thread (see the module docstring)."""

    def __init__(self, client: Client, subject: str, who: Identity, timeout_s: float) -> None:
        self._client = client
        self._subject = subject
        self._who = who
        self._timeout_s = timeout_s
        self.future: concurrent.futures.Future[PubAck] | None = None
        self._pending: Pending | None = None
        self.deadline = 0.0  # (monotonic) past it the shipper's thread takes it over

    def start(
        self, head: Pending, head_stream_seq: int
    ) -> concurrent.futures.Future[PubAck] | None:
        """Publish ``head`` alone on top of the message at ``head_stream_seq``;
        its future, or None (nothing sent: one out already, a record over the
        message limit, not connected now, the loop thread, a forked child)."""
        if (
            self.future is not None
            or len(head.record) > self._client.max_payload - wire.HEADER_ROOM
        ):
            return None
        times = (head.time_s, head.time_s)
        headers = wire.message_headers(
            self._who, head.seq, head.seq, times, head.record, head_stream_seq
        )
        future = self._client.start_publish(self._subject, head.record, headers, self._timeout_s)
        if future is not None:
            self.future, self._pending = future, head
            self.deadline = time.monotonic() + self._timeout_s + _loop.HANDOVER_GRACE_S
        return future

    def claim(
        self, future: concurrent.futures.Future[PubAck]
    ) -> tuple[Pending, PubAck | None] | None:
        """``future`` done (or cancelled): its record and its ack when the stream
        stored it as a new message (None: not known, publish it again), once;
        None when it was claimed already."""
        head = self._pending
        if self.future is not future or head is None:
            return None
        self.future = self._pending = None
        if future.cancelled() or not future.done() or future.exception() is not None:
            return head, None
        ack = future.result()
        return head, None if ack.duplicate else ack
