"""Blocking, thread-safe access to NATS JetStream for the replication package.

Owns: :class:`Client`, the one object the rest of the package uses: a
shared, reference-counted connection (:mod:`._connection`) with the stream
calls (:mod:`._streams`) and, here, the object store calls (bucket create,
put streamed from a file, get verified into a file or as chunks, list,
delete). Every call is bounded by its ``timeout_s``; a long transfer (a range
of messages, an object) by ``timeout_s`` per step (one batch, one chunk).
Must never: touch a file but through :mod:`logstate._fs`; rename an
``OSError`` of the file system into a replication error; leave a partial
file where :meth:`Client.get_object` was asked to write.

Errors (all :class:`ReplicationError`): a server's error answer is
:class:`ApiError` (with ``err_code``, ``code``, ``description``; 10071 on
a publish is :class:`WrongLastSequence`, with ``last_seq``); a timeout, no
responders, a refused or lost connection is a plain
:class:`ReplicationError` whose ``reason`` says which; a missing object is
:class:`ObjectNotFound` (also a ``KeyError``).

The API, every method blocking::

    Client.get(servers, *, timeout_s, connect_options=None) -> Client
    client.release() -> None
    client.max_payload: int
    client.ensure_stream(stream, subjects, replicas, timeout_s, *, duplicate_window_s=120.0)
        -> dict
    client.stream_info(stream, timeout_s) -> dict | None
    client.publish(subject, payload, headers, timeout_s) -> int
    client.publish_ack(subject, payload, headers, timeout_s) -> PubAck
    client.last_message(stream, subject, timeout_s) -> Message | None
    client.message(stream, stream_seq, timeout_s) -> Message | None
    client.messages(stream, subject, from_stream_seq, timeout_s, until_stream_seq=None)
        -> Iterator[Message]
    client.purge(stream, subject, before_stream_seq, timeout_s) -> int
    client.ensure_bucket(bucket, replicas, timeout_s) -> None
    client.put_object(bucket, name, file_path, description, timeout_s) -> None
    client.get_object(bucket, name, dest_path, timeout_s) -> None
    client.object_chunks(bucket, name, timeout_s) -> Iterator[bytes]
    client.object_info(bucket, name, timeout_s) -> dict
    client.list_objects(bucket, timeout_s) -> list[ObjectInfo]
    client.delete_object(bucket, name, timeout_s) -> bool
    client.connection_stats() -> dict
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

import nats.js.errors
from nats.js import api as js_api

from logstate._errors import ReplicationError
from logstate._fs import OS_FS, FileSystem
from logstate.replication._jsapi import (
    ERR_STREAM_NAME_IN_USE,
    ApiError,
    Message,
    ObjectInfo,
    ObjectNotFound,
    WrongLastSequence,
    parse_time,
)
from logstate.replication._streams import PubAck, StreamCalls

__all__ = [
    "OBJECT_CHUNK_SIZE",
    "ApiError",
    "Client",
    "Message",
    "ObjectInfo",
    "ObjectNotFound",
    "PubAck",
    "ReplicationError",
    "WrongLastSequence",
]

OBJECT_CHUNK_SIZE = 128 * 1024  # nats-py's default chunk size (object store put)
# a chunk leaves this much of the server's max_payload to the protocol
OBJECT_CHUNK_ROOM = 4096


def _obj_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


class _FileReader(io.BufferedIOBase):
    """A file read through :mod:`logstate._fs` (pread), for nats-py's object put."""

    def __init__(self, fs: FileSystem, fd: int) -> None:
        super().__init__()
        self._fs = fs
        self._fd = fd
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._fs.pread(self._fd, len(view), self._offset)
        view[: len(data)] = data
        self._offset += len(data)
        return len(data)


class Client(StreamCalls):
    """A shared NATS connection with the stream and object store calls (see the module).

    Get one with :meth:`get` (same servers and options: the same client),
    give it back with :meth:`release`; thread-safe, callable from a thread
    that runs its own asyncio loop.
    """

    def ensure_bucket(self, bucket: str, replicas: int, timeout_s: float) -> None:
        """Create the object store bucket (file storage) if missing; an existing one is kept."""
        if self.stream_info(_obj_stream(bucket), timeout_s) is not None:
            return
        nc = self._connection(timeout_s)
        config = js_api.ObjectStoreConfig(storage=js_api.StorageType.FILE, replicas=replicas)

        async def work() -> None:
            await nc.jetstream(timeout=timeout_s).create_object_store(bucket, config=config)

        try:
            self._call(_obj_stream(bucket), f"create bucket {bucket}", work(), timeout_s)
        except ApiError as exc:
            if exc.err_code != ERR_STREAM_NAME_IN_USE:
                raise

    def put_object(
        self,
        bucket: str,
        name: str,
        file_path: str,
        description: str,
        timeout_s: float,
        *,
        fs: FileSystem = OS_FS,
    ) -> None:
        """Put the file's content as object ``name`` (streamed in 128 KiB chunks).

        A previous object of that name is replaced (its chunks purged).
        Each chunk's publish is bounded by ``timeout_s``. Chunks are
        ``OBJECT_CHUNK_SIZE`` bytes, less on a server whose ``max_payload``
        is smaller (nats-py would refuse a chunk over it).

        Raises:
            OSError: reading the file failed.
            ReplicationError: a chunk or the metadata was not stored.
        """
        nc = self._connection(timeout_s)
        chunk_size = min(OBJECT_CHUNK_SIZE, self.max_payload - OBJECT_CHUNK_ROOM)
        fd = fs.open_read_only(file_path)
        try:
            chunks = fs.file_size(fd) // chunk_size + 1
            reader = _FileReader(fs, fd)
            meta = js_api.ObjectMeta(
                name=name,
                description=description,
                options=js_api.ObjectMetaOptions(max_chunk_size=chunk_size),
            )

            async def work() -> None:
                js = nc.jetstream(timeout=timeout_s)
                store = await js.object_store(bucket)
                await store.put(name, reader, meta=meta)

            self._call(
                _obj_stream(bucket),
                f"put object {name}",
                work(),
                timeout_s,
                total_s=timeout_s * (chunks + 4),
            )
        finally:
            fs.close(fd)

    def object_info(self, bucket: str, name: str, timeout_s: float) -> dict[str, Any]:
        """The object's metadata (nats-py's JSON: name, nuid, size, chunks, digest ...).

        Raises:
            ObjectNotFound: no such object (or it was deleted).
        """
        found = self.last_message(_obj_stream(bucket), _meta_subject(bucket, name), timeout_s)
        info: dict[str, Any] = json.loads(found.data) if found is not None else {}
        if not info or info.get("deleted"):
            raise ObjectNotFound(bucket, name)
        return info

    def get_object(
        self, bucket: str, name: str, dest_path: str, timeout_s: float, *, fs: FileSystem = OS_FS
    ) -> None:
        """Write object ``name`` to ``dest_path`` (created, must not exist), digest verified.

        Its chunks as :meth:`object_chunks` gives them; the file is
        fdatasync'd before it is closed. On any failure the partial file is
        removed.

        Raises:
            ObjectNotFound: no such object.
            ReplicationError: as :meth:`object_chunks`.
            OSError: creating or writing ``dest_path`` failed.
        """
        chunks = self.object_chunks(bucket, name, timeout_s)
        fd = fs.create_file(dest_path)
        try:
            for chunk in chunks:
                fs.append(fd, chunk)
            fs.fdatasync(fd)
        except BaseException:
            fs.close(fd)
            fs.unlink(dest_path)
            raise
        fs.close(fd)

    def object_chunks(self, bucket: str, name: str, timeout_s: float) -> Iterator[bytes]:
        """The bytes of object ``name``, chunk by chunk, as they arrive.

        Its metadata is read at the call; the chunks are read in batches, each
        bounded by ``timeout_s``, as the iterator is consumed. The size and
        the SHA-256 digest are checked after the last chunk, before the
        iterator ends: a consumer that reads it to its end has had exactly the
        object's bytes, or an error (what it did with the chunks before is
        its own to undo).

        Raises:
            ObjectNotFound: no such object (at the call).
            ReplicationError: the object is a link (at the call); a batch
                timed out, or the size, chunk count or digest does not match
                the metadata (while iterating).
        """
        info = self.object_info(bucket, name, timeout_s)
        stream = _obj_stream(bucket)
        if (info.get("options") or {}).get("link"):
            raise ReplicationError(stream, "", f"object {name!r} is a link (not supported)")
        return self._object_chunks(stream, bucket, name, info, timeout_s)

    def _object_chunks(
        self, stream: str, bucket: str, name: str, info: dict[str, Any], timeout_s: float
    ) -> Iterator[bytes]:
        digest = hashlib.sha256()
        size = chunks = 0
        if info.get("size"):
            subject = f"$O.{bucket}.C.{info['nuid']}"
            for msg in self.messages(stream, subject, 1, timeout_s):
                digest.update(msg.data)
                size += len(msg.data)
                chunks += 1
                yield msg.data
        expected = str(info.get("digest") or "")
        got = "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode()
        if size != int(info.get("size") or 0) or (expected and got != expected):
            raise ReplicationError(
                stream,
                "",
                f"object {name!r}: got {size} bytes in {chunks} chunks, "
                f"digest {got}; its metadata says {info.get('size')} bytes in "
                f"{info.get('chunks')} chunks, digest {expected}",
            )

    def list_objects(self, bucket: str, timeout_s: float) -> list[ObjectInfo]:
        """Every object of the bucket not deleted, in the order they were last put."""
        found: dict[str, ObjectInfo] = {}
        for msg in self.messages(_obj_stream(bucket), f"$O.{bucket}.M.>", 1, timeout_s):
            info = json.loads(msg.data)
            name = str(info.get("name", ""))
            found.pop(name, None)
            if not info.get("deleted"):
                mtime = str(info.get("mtime") or "")
                found[name] = ObjectInfo(
                    name=name,
                    size=int(info.get("size") or 0),
                    description=str(info.get("description") or ""),
                    mtime=parse_time(mtime) if mtime else msg.time_s,
                )
        return list(found.values())

    def delete_object(self, bucket: str, name: str, timeout_s: float) -> bool:
        """Delete object ``name`` (its chunks purged); False when there was none."""
        nc = self._connection(timeout_s)

        async def work() -> bool:
            store = await nc.jetstream(timeout=timeout_s).object_store(bucket)
            try:
                await store.delete(name)
            except nats.js.errors.NotFoundError:
                return False
            return True

        return self._call(
            _obj_stream(bucket), f"delete object {name}", work(), timeout_s, total_s=timeout_s * 3
        )
