"""Changelog messages: what one JetStream message carries (pure, no I/O).

Owns: the header names and their formats, message ids, how committed records
are packed into messages (runs of whole records, or the chunks of one record
too large for a message), and reading messages back: header parsing, the
payload checksum, the records inside, chunk assembly and seq continuity
(:class:`Replay`).
Must never: do I/O, read clocks, log, or decide what to do about a bad
message: it raises :class:`MessageError` (stream seq + reason) and the caller
(restore, the shipper's open) turns that into a ``ReplicationError``.

A message's payload is the exact bytes of the records as the local log holds
them, so each record keeps its own CRC-32C and seq end to end. See
docs/replication.md ("What is in the stream") for the header table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, NamedTuple

from logstate._crc import crc_bytes
from logstate._scan import Damage, scan_records

__all__ = [
    "Chunk",
    "Identity",
    "MessageError",
    "Pending",
    "Received",
    "Replay",
    "check_partition",
    "chunk_record",
    "message_headers",
    "message_id",
    "plan_run",
    "read_message",
    "split_records",
    "subject_covered",
]

# header names
H_MSG_ID: Final = "Nats-Msg-Id"
H_EXPECTED: Final = "Nats-Expected-Last-Subject-Sequence"
H_SEQ: Final = "Logstate-Seq"
H_WRITER: Final = "Logstate-Writer"
H_EPOCH: Final = "Logstate-Epoch"
H_TIME: Final = "Logstate-Time"
H_CHUNK: Final = "Logstate-Chunk"
H_KIND: Final = "Logstate-Kind"
H_CRC: Final = "Logstate-Crc"

KIND_RECORDS: Final = "records"
KIND_MARKER: Final = "marker"

HEADER_ROOM: Final = 4096  # bytes of a message kept for headers and protocol
MAX_TIME_SPAN_S: Final = 0.010  # a message spans at most this much commit time
PARTITION_RE: Final = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\Z")
MAX_PARTITION_SIZE: Final = 200
_WRITER_RE: Final = re.compile(r"[0-9a-f]{32}\Z")


class MessageError(ValueError):
    """A message of the stream that is not a well-formed changelog message."""

    def __init__(self, stream_seq: int, reason: str) -> None:
        self.stream_seq = stream_seq
        self.reason = reason
        super().__init__(f"stream message {stream_seq}: {reason}")


class Identity(NamedTuple):
    """Who publishes: the partition, the writer's id and its epoch."""

    partition: str
    writer: str
    epoch: int


class Pending(NamedTuple):
    """A committed record waiting to be published."""

    seq: int
    record: bytes
    time_s: float  # when it was delivered as committed (epoch seconds)


class Chunk(NamedTuple):
    """Where a chunk sits in the record it is part of."""

    part: int  # from 0
    parts: int
    offset: int
    total_size: int


def check_partition(partition: str) -> str:
    """The partition name, or ValueError naming what is wrong with it."""
    if not isinstance(partition, str):
        raise TypeError(f"partition must be a str, got {type(partition).__name__}")
    if len(partition) > MAX_PARTITION_SIZE or not PARTITION_RE.match(partition):
        raise ValueError(
            f"partition {partition!r}: use letters, digits, '_' and '-' in tokens "
            f"joined by '.', at most {MAX_PARTITION_SIZE} characters"
        )
    return partition


def subject_covered(patterns: Sequence[str], subject: str) -> bool:
    """Does one of a stream's subject patterns (NATS ``*`` and ``>``) take ``subject``?"""
    tokens = subject.split(".")
    for pattern in patterns:
        parts = pattern.split(".")
        for i, part in enumerate(parts):
            if part == ">":
                if len(tokens) > i:
                    return True
                break
            if i >= len(tokens) or (part != "*" and part != tokens[i]):
                break
        else:
            if len(parts) == len(tokens):
                return True
    return False


def message_id(who: Identity, first: int, last: int, chunk: Chunk | None = None) -> str:
    """The ``Nats-Msg-Id`` of a message: partition, epoch and seq range (and chunk)."""
    base = f"{who.partition}:{who.epoch}:{first}-{last}"
    return base if chunk is None else f"{base}:{chunk.part}/{chunk.parts}"


def plan_run(pending: Sequence[Pending], limit_size: int, span_s: float = MAX_TIME_SPAN_S) -> int:
    """How many records from the front of ``pending`` the next message takes (>= 1).

    Whole records while they fit in ``limit_size`` bytes and were committed
    within ``span_s`` of the first; a first record larger than the limit
    goes alone (and is chunked by :func:`chunk_record`).
    """
    if not pending:
        raise ValueError("nothing to publish")
    size = len(pending[0].record)
    t_first = pending[0].time_s
    count = 1
    for item in pending[1 : len(pending)]:
        size += len(item.record)
        if size > limit_size or item.time_s - t_first > span_s:
            break
        count += 1
    return count


def chunk_record(record: bytes, limit_size: int) -> list[tuple[Chunk, bytes]]:
    """The chunks of a record larger than ``limit_size`` (each at most that)."""
    total = len(record)
    count = -(-total // limit_size)
    return [
        (Chunk(i, count, i * limit_size, total), record[i * limit_size : (i + 1) * limit_size])
        for i in range(count)
    ]


def message_headers(
    who: Identity,
    first: int,
    last: int,
    times_s: tuple[float, float],
    payload: bytes,
    expected_stream_seq: int,
    chunk: Chunk | None = None,
    kind: str = KIND_RECORDS,
) -> dict[str, str]:
    """The headers of one message (see the module docstring)."""
    headers = {
        H_MSG_ID: message_id(who, first, last, chunk)
        if kind == KIND_RECORDS
        else f"{who.partition}:{who.epoch}:marker:{expected_stream_seq}",
        H_EXPECTED: str(expected_stream_seq),
        H_SEQ: f"{first}-{last}",
        H_WRITER: who.writer,
        H_EPOCH: str(who.epoch),
        H_TIME: f"{times_s[0]:.6f} {times_s[1]:.6f}",
        H_CRC: f"{crc_bytes(payload):08x}",
    }
    if kind != KIND_RECORDS:
        headers[H_KIND] = kind
    if chunk is not None:
        headers[H_CHUNK] = f"{chunk.part}/{chunk.parts} {chunk.offset} {chunk.total_size}"
    return headers


class Received(NamedTuple):
    """A changelog message read back, its headers checked."""

    stream_seq: int
    kind: str
    writer: str
    epoch: int
    first: int
    last: int
    t_first: float
    t_last: float
    chunk: Chunk | None
    msg_id: str
    payload: bytes


def _int(stream_seq: int, name: str, text: str) -> int:
    if not text.isdigit():
        raise MessageError(stream_seq, f"header {name} is not a number: {text!r}")
    return int(text)


def read_message(stream_seq: int, headers: dict[str, str] | None, payload: bytes) -> Received:
    """Check a message's headers and payload checksum.

    Raises:
        MessageError: a header missing or malformed, or the payload's CRC wrong.
    """
    if not headers or H_SEQ not in headers:
        raise MessageError(stream_seq, "not a logstate changelog message (no Logstate-Seq header)")
    for name in (H_WRITER, H_EPOCH, H_TIME, H_CRC):
        if name not in headers:
            raise MessageError(stream_seq, f"header {name} missing")
    kind = headers.get(H_KIND, KIND_RECORDS)
    if kind not in (KIND_RECORDS, KIND_MARKER):
        raise MessageError(stream_seq, f"unknown message kind {kind!r}")
    writer = headers[H_WRITER]
    if not _WRITER_RE.match(writer):
        raise MessageError(stream_seq, f"malformed writer id {writer!r}")
    seq_text = headers[H_SEQ].split("-")
    if len(seq_text) != 2:
        raise MessageError(stream_seq, f"malformed {H_SEQ} {headers[H_SEQ]!r}")
    first, last = (_int(stream_seq, H_SEQ, part) for part in seq_text)
    if first > last or first < 1:
        raise MessageError(stream_seq, f"seq range {first}-{last} is not a range")
    times = headers[H_TIME].split()
    try:
        t_first, t_last = (float(t) for t in times)
    except ValueError:
        raise MessageError(stream_seq, f"malformed {H_TIME} {headers[H_TIME]!r}") from None
    crc_text = headers[H_CRC]
    try:
        crc = int(crc_text, 16)
    except ValueError:
        raise MessageError(stream_seq, f"malformed {H_CRC} {crc_text!r}") from None
    if crc_bytes(payload) != crc:
        raise MessageError(stream_seq, "payload checksum mismatch (the message is damaged)")
    chunk = None
    if H_CHUNK in headers:
        parts = headers[H_CHUNK].replace("/", " ").split()
        if len(parts) != 4:
            raise MessageError(stream_seq, f"malformed {H_CHUNK} {headers[H_CHUNK]!r}")
        index, count, offset, total = (_int(stream_seq, H_CHUNK, p) for p in parts)
        if first != last or not 0 <= index < count or offset + len(payload) > total:
            raise MessageError(stream_seq, f"chunk {headers[H_CHUNK]!r} does not fit its record")
        chunk = Chunk(index, count, offset, total)
    if kind == KIND_MARKER and payload:
        raise MessageError(stream_seq, "a marker message with a payload")
    return Received(
        stream_seq,
        kind,
        writer,
        _int(stream_seq, H_EPOCH, headers[H_EPOCH]),
        first,
        last,
        t_first,
        t_last,
        chunk,
        headers.get(H_MSG_ID, ""),
        payload,
    )


def split_records(msg: Received, payload: bytes | None = None) -> list[tuple[int, bytes]]:
    """The (seq, exact bytes) of the records a message (or an assembled record) holds.

    Raises:
        MessageError: the payload is not whole valid records numbered
            ``first..last`` one after the other.
    """
    data = msg.payload if payload is None else payload
    damage: list[Damage] = []
    records: list[tuple[int, bytes]] = []
    expected = msg.first
    for frame in scan_records(data, 0, damage.append):
        if damage:
            break
        if frame.seq != expected:
            raise MessageError(
                msg.stream_seq, f"record seq {frame.seq} where {expected} was expected"
            )
        records.append((frame.seq, data[frame.offset : frame.offset + frame.size]))
        expected += 1
    if damage:
        bad = damage[0]
        raise MessageError(
            msg.stream_seq, f"damaged record at payload offset {bad.offset}: {bad.reason}"
        )
    if expected != msg.last + 1:
        raise MessageError(
            msg.stream_seq,
            f"payload holds seqs {msg.first}-{expected - 1}, headers say {msg.first}-{msg.last}",
        )
    return records


class Replay:
    """Reads a partition's messages in stream order: whole records, contiguous seqs.

    ``after_seq``: the last seq already held (the snapshot's); messages
    whose records all lie at or below it are skipped (the stream keeps one
    message before the oldest snapshot). ``feed`` returns the records a
    message completes; a gap, an overlap past ``after_seq``, or a chunk out
    of place raises :class:`MessageError`. ``pending_chunk`` is set while a
    record's chunks are incomplete: at the end of the stream that record is
    not whole, and is left out (it was never fully shipped).
    """

    def __init__(self, after_seq: int) -> None:
        self.last_seq = after_seq
        self.pending_chunk: Received | None = None
        self._parts: list[bytes] = []
        self.last_message: Received | None = None
        self.started = False  # a message past the starting point was read

    def feed(self, msg: Received) -> list[tuple[int, bytes]]:
        self.last_message = msg
        if msg.kind == KIND_MARKER:
            if self.pending_chunk is not None:
                raise MessageError(msg.stream_seq, "a marker inside a chunked record")
            if msg.last > self.last_seq:
                raise MessageError(
                    msg.stream_seq,
                    f"seq gap: the stream was re-based on a snapshot at seq {msg.last} "
                    f"after seq {self.last_seq}: restore from that snapshot",
                )
            return []
        head = self.pending_chunk
        if (
            head is not None
            and msg.first == head.first
            and (msg.writer != head.writer or msg.epoch > head.epoch)
        ):
            # its writer died between the chunks, and another (or the same one
            # after losing the record locally: a new epoch) wrote at that seq:
            # the record was never whole in the stream, drop it
            head = self.pending_chunk = None
            self._parts = []
        if head is not None and (msg.chunk is None or msg.first != head.first):
            raise MessageError(
                msg.stream_seq, f"the chunked record {head.first} is cut short by this message"
            )
        if self.started and head is None and msg.first <= self.last_seq:
            # past the starting point every seq is in the stream once
            raise MessageError(
                msg.stream_seq,
                f"seqs {msg.first}-{msg.last} overlap what the stream held before "
                f"(up to seq {self.last_seq}): a seq stored twice",
            )
        if msg.last <= self.last_seq and self.pending_chunk is None:
            return []  # before the starting point (kept by retention, or a snapshot's)
        self.started = True
        if msg.first <= self.last_seq < msg.last and msg.chunk is None:
            # the starting point falls inside this message: keep what follows it
            after = self.last_seq
            records = [r for r in split_records(msg) if r[0] > after]
            self.last_seq = msg.last
            return records
        if head is None and msg.first != self.last_seq + 1:
            raise MessageError(
                msg.stream_seq,
                f"seq gap: records {msg.first}-{msg.last} follow seq {self.last_seq}",
            )
        if msg.chunk is None:
            records = split_records(msg)
            self.last_seq = msg.last
            return records
        return self._chunk(msg)

    def _chunk(self, msg: Received) -> list[tuple[int, bytes]]:
        chunk = msg.chunk
        assert chunk is not None
        head = self.pending_chunk
        if head is None:
            if chunk.part != 0:
                raise MessageError(msg.stream_seq, f"chunk {chunk.part} without chunk 0")
            self.pending_chunk = msg
            self._parts = []
        else:
            assert head.chunk is not None
            expected = len(self._parts)
            if (
                chunk.part != expected
                or chunk.parts != head.chunk.parts
                or chunk.total_size != head.chunk.total_size
                or msg.first != head.first
            ):
                raise MessageError(
                    msg.stream_seq, f"chunk {chunk.part}/{chunk.parts} where {expected} was due"
                )
        if chunk.offset != sum(len(p) for p in self._parts):
            raise MessageError(msg.stream_seq, f"chunk offset {chunk.offset} does not follow")
        self._parts.append(msg.payload)
        if chunk.part + 1 < chunk.parts:
            return []
        record = b"".join(self._parts)
        self.pending_chunk = None
        self._parts = []
        if len(record) != chunk.total_size:
            raise MessageError(msg.stream_seq, "chunks do not add up to the record's size")
        records = split_records(msg, record)
        self.last_seq = msg.last
        return records
