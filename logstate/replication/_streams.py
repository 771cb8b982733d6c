"""JetStream stream calls: create/info, publish with an expected sequence, reads, purge.

Owns: the blocking stream calls of the replication package on a shared
:class:`~._connection.Connection`: :meth:`StreamCalls.ensure_stream`,
:meth:`~StreamCalls.stream_info`, :meth:`~StreamCalls.publish` (the ack's
stream seq; 10071 is :class:`WrongLastSequence`), stored-message reads from
the stream leader (:meth:`~StreamCalls.last_message`,
:meth:`~StreamCalls.message`), ranges read in ``DIRECT.GET`` batches
(:meth:`~StreamCalls.messages`) and :meth:`~StreamCalls.purge`.
Must never: wait without a bound (each call, each batch of a range, is
bounded by its ``timeout_s``); send a message the server would refuse by
closing the connection (payload + headers over ``max_payload``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from logstate._errors import ReplicationError
from logstate.replication._connection import Connection
from logstate.replication._jsapi import (
    ERR_NO_MESSAGE,
    ERR_STREAM_NAME_IN_USE,
    ERR_STREAM_NOT_FOUND,
    ApiError,
    Message,
    api_error,
    direct_message,
    headers_size,
    stored_message,
)

__all__ = ["BATCH_BYTES", "BATCH_MESSAGES", "DUPLICATE_WINDOW_S", "PubAck", "StreamCalls"]

DUPLICATE_WINDOW_S = 120.0
# a DIRECT.GET batch: at most this many messages, and this many bytes (but
# at least one message)
BATCH_MESSAGES = 512
BATCH_BYTES = 8 << 20
# a publish answered "no responders" is sent again after these waits (doubling)
NO_RESPONDERS_FIRST_WAIT_S = 0.01
NO_RESPONDERS_MAX_WAIT_S = 0.25


class PubAck(NamedTuple):
    """A publish acknowledgement.

    Attributes:
        stream: the stream that stored the message.
        stream_seq: its seq there (a duplicate's: the first copy's).
        duplicate: the message id was seen within the duplicate window, and
            nothing new was stored.
    """

    stream: str
    stream_seq: int
    duplicate: bool


class StreamCalls(Connection):
    """The stream calls, on a shared connection (see :class:`Connection` for the rest)."""

    def __init__(self, key: Any, servers: list[str], options: dict[str, Any]) -> None:
        super().__init__(key, servers, options)
        self._direct: dict[str, bool] = {}

    def stream_info(self, stream: str, timeout_s: float) -> dict[str, Any] | None:
        """The stream's config, state and cluster as the server gives them; None if absent."""
        nc = self._connection(timeout_s)
        try:
            return self._call(
                stream,
                "stream info",
                self._api(nc, stream, f"$JS.API.STREAM.INFO.{stream}", None, timeout_s),
                timeout_s,
            )
        except ApiError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                return None
            raise

    def ensure_stream(
        self,
        stream: str,
        subjects: list[str],
        replicas: int,
        timeout_s: float,
        *,
        duplicate_window_s: float = DUPLICATE_WINDOW_S,
    ) -> dict[str, Any]:
        """Create the stream if missing (file storage, direct get, dedupe window); its info.

        An existing stream is left as it is (whatever its subjects and
        replicas: the caller checks them in the returned info).

        Raises:
            ApiError: the server refused (e.g. more replicas than servers).
        """
        info = self.stream_info(stream, timeout_s)
        if info is not None:
            return info
        config = {
            "name": stream,
            "subjects": subjects,
            "storage": "file",
            "retention": "limits",
            "discard": "old",
            "num_replicas": replicas,
            "allow_direct": True,
            "duplicate_window": int(duplicate_window_s * 1e9),
        }
        nc = self._connection(timeout_s)
        try:
            return self._call(
                stream,
                "stream create",
                self._api(nc, stream, f"$JS.API.STREAM.CREATE.{stream}", config, timeout_s),
                timeout_s,
            )
        except ApiError as exc:
            if exc.err_code != ERR_STREAM_NAME_IN_USE:
                raise
        # created meanwhile by another client, with another config: use it as it is
        info = self.stream_info(stream, timeout_s)
        if info is None:
            raise ReplicationError(stream, "", "stream reported in use, then not found")
        return info

    def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float
    ) -> int:
        """Publish to JetStream and wait for the ack; the stream seq it was stored at.

        A duplicate (same ``Nats-Msg-Id`` within the duplicate window) is
        acked with the seq of the message stored first (see
        :meth:`publish_ack` to tell). "No responders" (no stream listens on
        the subject: just created in a cluster, a leader election, or no
        stream at all) is asked again, backing off, until ``timeout_s``.

        Raises:
            WrongLastSequence: ``Nats-Expected-Last-Subject-Sequence`` did not match.
            ApiError: any other error answer.
            ReplicationError: timeout (the message may still be stored), no
                responders, payload over ``max_payload``, no connection.
        """
        return self.publish_ack(subject, payload, headers, timeout_s).stream_seq

    def publish_ack(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float
    ) -> PubAck:
        """:meth:`publish`, returning the whole ack (stream, seq, duplicate)."""
        nc = self._connection(timeout_s)
        self._check_size(subject, payload, headers)
        work = _publish(nc, subject, payload, headers, timeout_s)
        return self._call("", f"publish to {subject}", work, timeout_s)

    def start_publish(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float
    ) -> concurrent.futures.Future[PubAck] | None:
        """Start :meth:`publish_ack` on the loop and return at once: its future.

        Its result is the ack; its exception is the raw one (nats-py's, the
        loop's timeout, :class:`ApiError` and :class:`WrongLastSequence`),
        not turned into logstate's: a caller that gets one publishes again
        with :meth:`publish_ack` to learn what it means. None (nothing sent)
        when the connection is not connected now, in a forked child, from the
        loop thread, or when the message is over ``max_payload``.
        """
        nc = self._nc
        if nc is None or len(payload) + headers_size(headers) > self.max_payload:
            return None
        return self._start(_publish(nc, subject, payload, headers, timeout_s), timeout_s)

    def _check_size(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        size = len(payload) + headers_size(headers)
        if size > self.max_payload:
            # the server would close the connection ("Maximum Payload Violation")
            raise ReplicationError(
                "",
                "",
                f"publish to {subject}: {len(payload)} bytes of payload and "
                f"{size - len(payload)} of headers exceed the server's max_payload "
                f"{self.max_payload}",
            )

    def last_message(self, stream: str, subject: str, timeout_s: float) -> Message | None:
        """The subject's last message (asked of the stream leader); None if it has none.

        ``subject`` may have wildcards (the last message of any matching subject).
        """
        return self._get(stream, {"last_by_subj": subject}, timeout_s)

    def message(self, stream: str, stream_seq: int, timeout_s: float) -> Message | None:
        """The message stored at ``stream_seq`` (asked of the leader); None if there is none."""
        return self._get(stream, {"seq": stream_seq}, timeout_s)

    def _next_message(
        self, stream: str, subject: str, stream_seq: int, timeout_s: float
    ) -> Message | None:
        """The subject's first message at ``stream_seq`` or after (asked of the leader)."""
        return self._get(stream, {"seq": stream_seq, "next_by_subj": subject}, timeout_s)

    def _get(self, stream: str, request: dict[str, Any], timeout_s: float) -> Message | None:
        nc = self._connection(timeout_s)
        try:
            answer = self._call(
                stream,
                "message get",
                self._api(nc, stream, f"$JS.API.STREAM.MSG.GET.{stream}", request, timeout_s),
                timeout_s,
            )
        except ApiError as exc:
            if exc.err_code == ERR_NO_MESSAGE:
                return None
            raise
        return stored_message(answer["message"])

    def messages(
        self,
        stream: str,
        subject: str,
        from_stream_seq: int,
        timeout_s: float,
        until_stream_seq: int | None = None,
    ) -> Iterator[Message]:
        """The subject's messages in order, from ``from_stream_seq`` on.

        Up to the subject's last message when the call is made (asked of the
        stream leader), or ``until_stream_seq`` if that is lower. Read in
        batches (``DIRECT.GET``, any replica; a batch that ends short, as a
        lagging replica's may, is completed from the leader), each bounded
        by ``timeout_s``; a stream without direct get is read one message
        per request.

        Raises:
            ReplicationError: a step failed or timed out (the first ones, the
                bound and the stream's config, at the call; later ones while
                iterating).
        """
        # the bound and the way to read are settled now, at the call
        last = self.last_message(stream, subject, timeout_s)
        if last is None:
            return iter(())
        until = last.stream_seq
        if until_stream_seq is not None:
            until = min(until, until_stream_seq)
        direct = self._allows_direct(stream, timeout_s)
        return self._read(stream, subject, max(1, from_stream_seq), until, direct, timeout_s)

    def _read(
        self, stream: str, subject: str, next_seq: int, until: int, direct: bool, timeout_s: float
    ) -> Iterator[Message]:
        while next_seq <= until:
            batch: list[Message] = []
            if direct:
                batch = self._direct_batch(stream, subject, next_seq, timeout_s)
            if not batch:
                one = self._next_message(stream, subject, next_seq, timeout_s)
                batch = [one] if one is not None else []
            if not batch:
                return
            for msg in batch:
                if msg.stream_seq > until:
                    return
                yield msg
            next_seq = batch[-1].stream_seq + 1

    def _allows_direct(self, stream: str, timeout_s: float) -> bool:
        known = self._direct.get(stream)
        if known is None:
            info = self.stream_info(stream, timeout_s)
            if info is None:
                raise ApiError(
                    stream,
                    f"$JS.API.STREAM.INFO.{stream}",
                    ERR_STREAM_NOT_FOUND,
                    404,
                    "stream not found",
                )
            known = bool(info.get("config", {}).get("allow_direct"))
            self._direct[stream] = known
        return known

    def _direct_batch(
        self, stream: str, subject: str, start_seq: int, timeout_s: float
    ) -> list[Message]:
        nc = self._connection(timeout_s)
        request = json.dumps(
            {
                "seq": start_seq,
                "next_by_subj": subject,
                "batch": BATCH_MESSAGES,
                "max_bytes": BATCH_BYTES,
            }
        ).encode()

        async def work() -> list[Message]:
            # "no responders" before any message: the stream's direct-get
            # responders are not up yet (a new R3 stream electing its leader);
            # ask again until the deadline, as a publish does
            loop = asyncio.get_running_loop()
            deadline, delay_s = loop.time() + timeout_s, NO_RESPONDERS_FIRST_WAIT_S
            while True:
                try:
                    return await attempt()
                except nats.errors.NoRespondersError:
                    if loop.time() + delay_s >= deadline:
                        raise
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, NO_RESPONDERS_MAX_WAIT_S)

        async def attempt() -> list[Message]:
            out: list[Message] = []
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def take(msg: Msg) -> None:
                if done.done():
                    return
                headers = msg.headers or {}
                status = headers.get("Status")
                if not status:
                    out.append(direct_message(headers, msg.data))
                elif status in ("204", "404"):  # end of batch; nothing (more) there
                    done.set_result(None)
                elif status == "503" and not out:
                    done.set_exception(nats.errors.NoRespondersError())
                elif status == "503":  # (a batch cut short: what came is returned)
                    done.set_result(None)
                else:
                    description = headers.get("Description", "")
                    done.set_exception(ApiError(stream, "direct get", 0, int(status), description))

            sub = await nc.subscribe(nc.new_inbox(), cb=take)
            try:
                await nc.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=sub.subject)
                await done
            finally:
                await sub.unsubscribe()
            return out

        return self._call(
            stream, f"direct get of {subject} from seq {start_seq}", work(), timeout_s
        )

    def purge(self, stream: str, subject: str, before_stream_seq: int, timeout_s: float) -> int:
        """Purge the subject's messages with stream seq < ``before_stream_seq``; how many.

        ``before_stream_seq`` <= 1 purges nothing (no request is made: the
        server reads a purge "up to seq 0" as "everything").
        """
        if before_stream_seq <= 1:
            return 0
        nc = self._connection(timeout_s)
        answer = self._call(
            stream,
            f"purge of {subject}",
            self._api(
                nc,
                stream,
                f"$JS.API.STREAM.PURGE.{stream}",
                {"filter": subject, "seq": before_stream_seq},
                timeout_s,
            ),
            timeout_s,
        )
        return int(answer.get("purged", 0))


async def _publish(
    nc: NATS, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float
) -> PubAck:
    """One JetStream publish and its ack (no responders: asked again until the deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay_s = NO_RESPONDERS_FIRST_WAIT_S
    while True:
        try:
            msg = await nc.request(
                subject,
                payload,
                timeout=max(0.001, deadline - loop.time()),
                headers=headers or None,
            )
            break
        except nats.errors.NoRespondersError:
            # nothing was stored: the stream is new, electing a leader,
            # or absent; ask again until the deadline
            if loop.time() + delay_s >= deadline:
                raise
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, NO_RESPONDERS_MAX_WAIT_S)
    answer = json.loads(msg.data)
    if "error" in answer:
        raise api_error(str(answer.get("stream") or ""), subject, answer["error"])
    return PubAck(str(answer["stream"]), int(answer["seq"]), bool(answer.get("duplicate", False)))
