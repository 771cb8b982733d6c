"""Restore, point in time, catching up, and the standby replica.

Owns: reading a partition's records out of the stream in order, verified
(:func:`stream_records`), which snapshot a restore starts from and where it
stops (``until_seq`` / ``until_time``), the restorable range
(:func:`restorable`), what ``LocalFileStorage(restore=...)`` does before an
open (:func:`restore_for_open`), and :func:`follow`.
Must never: leave a half-built or unverified store under the target path
(the store is built aside and renamed in whole by ``_build``), skip a seq, or
turn a bad message into anything but a ``ReplicationError`` naming the
stream, the message and the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from logstate._errors import ReplicationError
from logstate._filenames import parse_segment_file_name
from logstate._fs import OS_FS
from logstate.replication import _wire as wire
from logstate.replication._build import build_store
from logstate.replication._client import Client, Message
from logstate.replication._config import ChangelogConfig, bucket_name
from logstate.replication._container import ContainerStream
from logstate.replication._state import ReplicationState, load_state, new_writer_id, save_state
from logstate.replication._stream import StreamReader
from logstate.replication._wire import MessageError

__all__ = [
    "Restorable",
    "RestoreResult",
    "follow",
    "restorable",
    "restore",
    "restore_for_open",
]

Progress = Callable[[str, int, int], None]  # (what, done, total or 0)


class RestoreResult(NamedTuple):
    """What a restore built."""

    path: str
    seq: int  # the last seq restored
    snapshot_seq: int  # the snapshot it started from (0: none)
    records: int  # records replayed from the stream after the snapshot
    stream_seq: int  # the stream seq of the last message used


class Restorable(NamedTuple):
    """The range a partition can be restored to (seqs and local commit times)."""

    oldest_seq: int
    oldest_time: float | None
    newest_seq: int
    newest_time: float | None
    snapshots: list[dict[str, Any]]


def _as_epoch_s(value: object) -> float:
    if isinstance(value, bool):
        raise TypeError(f"until_time must be a datetime, an ISO-8601 string or seconds: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"until_time {value!r} is not an ISO-8601 time") from None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"until_time {value.isoformat()} has no time zone: give one")
        return value.timestamp()
    raise TypeError(f"until_time must be a datetime, an ISO-8601 string or seconds: {value!r}")


def _snapshots(client: Client, changelog: ChangelogConfig) -> list[dict[str, Any]]:
    cl = changelog
    try:
        objects = client.list_objects(bucket_name(cl.stream), cl.timeout_s)
    except ReplicationError:
        if client.stream_info(cl.stream, cl.timeout_s) is None:
            raise
        return []  # (no bucket: no snapshot yet)
    found = []
    for obj in objects:
        if not obj.name.startswith(cl.partition + "/"):
            continue
        try:
            info = json.loads(obj.description or "{}")
            found.append({**info, "name": obj.name, "seq": int(info["seq"])})
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours
    return sorted(found, key=lambda s: s["seq"])


def _changelog(
    servers: str | Sequence[str],
    stream: str,
    partition: str,
    timeout: float,
    subject_prefix: str | None,
    connect_options: Mapping[str, Any] | None,
) -> ChangelogConfig:
    return ChangelogConfig(
        servers,
        stream,
        partition,
        timeout=timeout,
        subject_prefix=subject_prefix,
        connect_options=connect_options,
    )


def _read(cl: ChangelogConfig, msg: Message) -> wire.Received:
    """``msg`` checked; a bad one is a ReplicationError naming its stream seq."""
    try:
        return wire.read_message(msg.stream_seq, msg.headers, msg.data)
    except MessageError as exc:
        reason = f"message {exc.stream_seq} of the stream: {exc.reason}"
        raise ReplicationError(cl.stream, cl.partition, reason) from None


def restorable(
    servers: str | Sequence[str],
    stream: str,
    partition: str,
    *,
    timeout: float = 10.0,
    subject_prefix: str | None = None,
    connect_options: Mapping[str, Any] | None = None,
) -> Restorable:
    """The oldest and newest seq (and time) a partition can be restored to.

    Raises:
        ReplicationError: the broker cannot be reached within ``timeout``, or
            the stream holds nothing of the partition.
    """
    cl = _changelog(servers, stream, partition, timeout, subject_prefix, connect_options)
    client = cl.client()
    try:
        snaps = _snapshots(client, cl)
        head = client.last_message(cl.stream, cl.subject, cl.timeout_s)
        if head is None and not snaps:
            raise ReplicationError(stream, partition, "the stream holds nothing of this partition")
        newest_seq, newest_time = 0, None
        if head is not None:
            got = _read(cl, head)
            newest_seq, newest_time = got.last, got.t_last
        if snaps:
            oldest_seq, oldest_time = snaps[0]["seq"], snaps[0].get("time")
        else:
            first = next(iter(client.messages(cl.stream, cl.subject, 1, cl.timeout_s)), None)
            oldest_seq, oldest_time = 0, None
            if first is not None:
                got = _read(cl, first)
                oldest_seq, oldest_time = got.first - 1, got.t_first
        return Restorable(oldest_seq, oldest_time, max(newest_seq, oldest_seq), newest_time, snaps)
    finally:
        client.release()


def restore(
    servers: str | Sequence[str],
    stream: str,
    partition: str,
    path: str | os.PathLike[str],
    until_seq: int | None = None,
    until_time: dt.datetime | str | float | None = None,
    *,
    timeout: float = 10.0,
    subject_prefix: str | None = None,
    connect_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> RestoreResult:
    """Build the store of ``partition`` in ``path`` from the stream (docs/replication.md).

    The newest usable snapshot, then every record after it in order, each
    checked (CRC, contiguous seq, whole chunked groups); the store appears
    at ``path`` only once all of it checked out.

    Args:
        until_seq: restore up to this logstate seq (included).
        until_time: up to this local commit time: an aware ``datetime``, an
            ISO-8601 string with a zone, or epoch seconds.

    Raises:
        ReplicationError: the broker unreachable, the point asked for not
            restorable, or a bad message (naming the stream seq and reason),
            or a snapshot object whose bytes are not those its metadata
            describes; ``path`` is then untouched.
        CorruptionError / UnsupportedFormatError: the snapshot object is
            damaged or not a snapshot container (``path`` names the object
            and its bucket, ``offset`` is in the object); ``path`` untouched.
        FileExistsError: ``path`` holds something already.
    """
    if until_seq is not None and until_time is not None:
        raise ValueError("give until_seq or until_time, not both")
    if until_seq is not None and (type(until_seq) is not int or until_seq < 0):
        raise ValueError(f"until_seq must be an int >= 0, got {until_seq!r}")
    until_s = None if until_time is None else _as_epoch_s(until_time)
    cl = _changelog(servers, stream, partition, timeout, subject_prefix, connect_options)
    return _restore(cl, os.fspath(path), until_seq, until_s, progress)


def _restore(
    cl: ChangelogConfig,
    path: str,
    until_seq: int | None,
    until_s: float | None,
    progress: Progress | None,
) -> RestoreResult:
    client = cl.client()
    try:
        snaps = _snapshots(client, cl)
        usable = [
            s
            for s in snaps
            if (until_seq is None or s["seq"] <= until_seq)
            and (until_s is None or float(s.get("time", 0)) <= until_s)
        ]
        if snaps and not usable:
            raise ReplicationError(
                cl.stream,
                cl.partition,
                f"the oldest restorable point is seq {snaps[0]['seq']} (the oldest snapshot kept)",
                until_seq,
            )
        snap = usable[-1] if usable else None
        reader = StreamReader(client, cl)
        container = None
        if snap is not None:
            bucket = bucket_name(cl.stream)
            chunks = client.object_chunks(bucket, snap["name"], cl.timeout_s)
            if progress is not None:
                chunks = _counted(chunks, int(snap.get("size", 0)), progress)
            name = f"snapshot object {snap['name']} of bucket {bucket}"
            container = ContainerStream(name, chunks)
        base_seq = 0 if snap is None else int(snap["seq"])
        start = 1 if snap is None else int(snap.get("stream_seq", 0)) or 1
        counted = [0]

        def records() -> Iterator[bytes]:
            for _seq, record in reader.records(start, base_seq, until_seq, until_s):
                counted[0] += 1
                if progress is not None and counted[0] % 10_000 == 0:
                    progress("records", counted[0], 0)
                yield record
            if until_seq is not None and base_seq + counted[0] < until_seq:
                raise reader.error(
                    f"the stream holds seqs up to {base_seq + counted[0]}, not {until_seq}",
                    until_seq,
                )

        def state(last_seq: int) -> dict[str, object]:
            return ReplicationState(
                cl.stream,
                cl.partition,
                cl.subject,
                new_writer_id(),
                acked_seq=last_seq,
                acked_stream_seq=reader.last_stream_seq,
                acked_time_s=reader.last_time,
            ).__dict__

        built = build_store(
            path, container, records(), state, snapshot_seq=None if snap is None else base_seq
        )
        return RestoreResult(path, built.last_seq, base_seq, counted[0], reader.last_stream_seq)
    finally:
        client.release()


def _counted(chunks: Iterator[bytes], size: int, progress: Progress) -> Iterator[bytes]:
    """``chunks``, with the snapshot's progress reported as they pass."""
    done = 0
    progress("snapshot", 0, size)
    for chunk in chunks:
        yield chunk
        done += len(chunk)
        progress("snapshot", min(done, size), size)  # (more: refused at its end)


def _holds_store(path: str) -> bool:
    if not OS_FS.is_dir(path):
        return False
    return any(parse_segment_file_name(name) is not None for name in OS_FS.list_dir(path))


def restore_for_open(cl: ChangelogConfig, path: str, mode: str) -> None:
    """What ``LocalFileStorage(path, changelog=cl, restore=mode)`` does before it opens."""
    path = os.path.abspath(path)
    if _holds_store(path):
        if mode != "rebase":
            return  # if-missing: it is there; if-behind: the open catches it up
        aside = f"{path}.fenced-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        OS_FS.rename(path, aside)
        OS_FS.fsync_dir(os.path.dirname(path))
    elif OS_FS.is_dir(path) and OS_FS.list_dir(path):
        leftover = [n for n in OS_FS.list_dir(path) if n != "LOCK"]
        if leftover:
            raise FileExistsError(
                f"{path} holds files that are not a logstate store: {', '.join(leftover[:5])}"
            )
    client = cl.client()
    try:
        if client.stream_info(cl.stream, cl.timeout_s) is None:
            return  # no stream yet: a new partition, which the open starts
        empty = client.last_message(cl.stream, cl.subject, cl.timeout_s) is None
        if empty and not _snapshots(client, cl):
            return  # a new partition: the open starts it
    finally:
        client.release()
    _restore(cl, path, None, None, None)  # (an empty directory: the build renames over it)


class FollowStatus(NamedTuple):
    """One look of the standby replica at its stream."""

    local_seq: int
    stream_seq: int  # the partition's newest seq in the stream
    lag: int  # records the replica lacks


def follow(
    cl: ChangelogConfig,
    path: str,
    on_status: Callable[[FollowStatus], None],
    stop: Callable[[], bool],
    poll_s: float = 0.2,
) -> None:
    """Keep ``path`` a current copy of the partition until ``stop()`` (docs/replication.md).

    Restores it first if it holds no store; then appends the stream's new
    records as they come. Other processes may read it with ``read_only=True``;
    opening it with the changelog as the writer promotes it.
    """
    from logstate.storage import LocalFileStorage  # (the public API, above the engine)

    path = os.path.abspath(path)
    if not _holds_store(path):
        _restore(cl, path, None, None, None)
    storage = LocalFileStorage(path)
    client = cl.client()
    try:
        engine = storage._engine
        reader = StreamReader(client, cl)
        while not stop():
            state = load_state(path)
            if state is None:
                raise ReplicationError(cl.stream, cl.partition, f"{path} has no replication state")
            local = engine.appender.seq
            start = state.acked_stream_seq + 1 if state.acked_seq <= local else 1
            batch: list[bytes] = []
            for _seq, record in reader.records(start, local):
                batch.append(record)
                if len(batch) >= 10_000:
                    break
            if batch:
                engine.ingest(batch)
                state.acked_seq = engine.appender.seq
                state.acked_stream_seq = reader.last_stream_seq
                state.acked_time_s = reader.last_time
                save_state(path, state)
            head = client.last_message(cl.stream, cl.subject, cl.timeout_s)
            newest = engine.appender.seq
            if head is not None:
                newest = _read(cl, head).last
            on_status(
                FollowStatus(engine.appender.seq, newest, max(newest - engine.appender.seq, 0))
            )
            if not batch:
                time.sleep(poll_s)
    finally:
        client.release()
        storage.close()
