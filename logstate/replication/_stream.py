"""Reading a partition's records out of the stream, in order and verified.

Owns: the walk over a subject's messages from a stream seq on, each checked
(``_wire.read_message``, ``_wire.Replay``: CRC, contiguous seqs, whole
chunked records), where it stops (``until_seq``, ``until_time``), and the
stream seq and time of the last whole message read.
Must never: skip a seq, or raise anything but ``ReplicationError`` (naming
the stream, the message and the reason) for a bad message.
"""

from __future__ import annotations

from collections.abc import Iterator

from logstate._errors import ReplicationError
from logstate.replication import _wire as wire
from logstate.replication._client import Client
from logstate.replication._config import ChangelogConfig
from logstate.replication._wire import MessageError

__all__ = ["StreamReader", "check_still_held", "stream_records"]


class StreamReader:
    """The verified records of a subject from a stream seq on (see stream_records)."""

    def __init__(self, client: Client, changelog: ChangelogConfig) -> None:
        self.client = client
        self.changelog = changelog
        self.last_stream_seq = 0
        self.last_time = 0.0

    def error(self, reason: str, seq: int | None = None) -> ReplicationError:
        return ReplicationError(self.changelog.stream, self.changelog.partition, reason, seq)

    def records(
        self,
        from_stream_seq: int,
        after_seq: int,
        until_seq: int | None = None,
        until_time: float | None = None,
    ) -> Iterator[tuple[int, bytes]]:
        cl = self.changelog
        replay = wire.Replay(after_seq)
        try:
            for msg in self.client.messages(
                cl.stream, cl.subject, max(from_stream_seq, 1), cl.timeout_s
            ):
                got = wire.read_message(msg.stream_seq, msg.headers, msg.data)
                if until_time is not None and got.t_last > until_time and got.last > after_seq:
                    return
                for seq, record in replay.feed(got):
                    if until_seq is not None and seq > until_seq:
                        return
                    yield seq, record
                if replay.pending_chunk is None:
                    self.last_stream_seq = msg.stream_seq
                    self.last_time = got.t_last
                if until_seq is not None and replay.last_seq >= until_seq:
                    return
        except MessageError as exc:
            raise self.error(f"message {exc.stream_seq} of the stream: {exc.reason}") from None


def stream_records(
    client: Client,
    changelog: ChangelogConfig,
    from_stream_seq: int,
    after_seq: int,
    until_seq: int | None = None,
) -> Iterator[tuple[int, bytes]]:
    """The records after ``after_seq`` (to ``until_seq``), from message ``from_stream_seq`` on."""
    return StreamReader(client, changelog).records(from_stream_seq, after_seq, until_seq)


def check_still_held(
    client: Client, changelog: ChangelogConfig, from_stream_seq: int, local: int, path: str
) -> None:
    """Raise unless the subject, from ``from_stream_seq`` on, starts at or before ``local + 1``.

    A catch-up of a copy at seq ``local`` needs every record after it; a
    purge below a snapshot may have taken them. A first message whose
    ``Logstate-Seq`` is not a seq range passes: the verified read names it.

    Raises:
        ReplicationError: the stream starts past ``local + 1``; it names ``restore='rebase'``.
    """
    cl = changelog
    msg = next(
        iter(client.messages(cl.stream, cl.subject, max(from_stream_seq, 1), cl.timeout_s)), None
    )
    text = "" if msg is None else msg.headers.get(wire.H_SEQ, "").split("-")[0]
    if text.isdigit() and int(text) > local + 1:
        raise ReplicationError(
            cl.stream,
            cl.partition,
            f"{path} is behind what the stream still holds (from seq {text}, purged below a "
            f"snapshot; seq {local} here): open it with restore='rebase' to restore it from "
            "the snapshot (it holds nothing the stream lacks)",
            local,
        )
