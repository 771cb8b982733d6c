"""Replication snapshots: capturing a store's segment files at a seq, and writing their container.

Owns: :func:`capture` (under the engine's write lock: which segment files, how
many bytes of each, a descriptor of each, and the seq they end at) and
:func:`write_container`, which streams a capture into a container file (the
layout is ``_container``'s). The upload and the object store are not here
(network: ``_client``).
Must never: read a file's bytes while holding the engine's write lock, read a
captured file past its captured size, hold a whole file in memory, or make a
system call other than through ``_fs``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NamedTuple

from logstate._crc import crc32c
from logstate._errors import CorruptionError
from logstate._filenames import parse_segment_file_name, segment_file_name
from logstate._fs import FileSystem
from logstate.replication._container import (
    ContainerFile,
    ContainerInfo,
    copy_chunks,
    encode_container_header,
)

if TYPE_CHECKING:
    from logstate._engine import Engine

__all__ = ["Capture", "CapturedFile", "capture", "write_container"]


# --------------------------------------------------------------------------- capture
class CapturedFile(NamedTuple):
    """One segment file of a capture: read it through ``fd``, only its first ``size`` bytes."""

    name: str  # segment file name
    size: int  # bytes captured (the active segment: the records written by then)
    fd: int  # a read descriptor of its own (the file may be unlinked or replaced since)
    path: str  # where it was when captured (for messages)

    @property
    def number(self) -> int:
        number = parse_segment_file_name(self.name)
        assert number is not None
        return number


class Capture:
    """The segment files of a store as they were at ``seq``; :meth:`close` releases them.

    Also a context manager (closes on exit).
    """

    def __init__(self, fs: FileSystem, seq: int, files: list[CapturedFile]) -> None:
        self.fs = fs
        self.seq = seq
        self.files = files
        self.closed = False

    @property
    def size(self) -> int:
        """Bytes of every captured file."""
        return sum(f.size for f in self.files)

    def close(self) -> None:
        """Close every descriptor (idempotent).

        Raises:
            OSError: the first ``close(2)`` that failed, after trying every one.
        """
        if self.closed:
            return
        self.closed = True
        first: OSError | None = None
        for captured in self.files:
            try:
                self.fs.close(captured.fd)
            except OSError as exc:  # pragma: no cover - close of a valid fd does not fail
                first = first or exc
        if first is not None:  # pragma: no cover
            raise first

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Capture seq={self.seq} files={len(self.files)} size={self.size}>"


def capture(engine: Engine) -> Capture:
    """Capture the segment files of ``engine`` at its current seq; quick, under its write lock.

    Under the lock: an interrupted write or compaction switch is settled
    first (as every writer does); then each segment's number and size (the
    active one's: the records written so far), a read descriptor of each
    (its own descriptor duplicated, or its file opened by name), and the
    appender's seq. No file is read. After the lock, compaction may delete
    or replace the files and writers append to the active one: the
    descriptors still read the captured bytes, and no byte below a captured
    size ever changes (sealed segments never change; the active one is only
    appended to).

    A compaction between its rename and its switch (``switch.pending``) has
    renamed, or is renaming, its output over its last input, whose name then
    no longer reads the input: its output is captured in place of its inputs
    (the output's own descriptor duplicated), the state a crash at that moment
    recovers to, and the same one.

    Returns:
        A :class:`Capture`; the caller closes it.

    Raises:
        StorageClosedError / StorageFailedError / ReadOnlyStorageError: the
            engine is not writable (its sizes may then count bytes that a
            failed write left unknown).
        OSError: from duplicating or opening a descriptor (none is left open).
    """
    fs = engine.fs
    files: list[CapturedFile] = []
    with engine._lock:
        engine.writer.check_writable()  # settles an interrupted write or switch first
        segments = engine.segments
        chosen = dict(segments.segments)
        pending = engine.switch.pending
        if pending is not None:
            for number in pending.inputs:
                chosen.pop(number, None)
            chosen[pending.output.number] = pending.output
            assert pending.output.fd >= 0, "a recorded compaction output without its descriptor"
        try:
            for number in sorted(chosen):
                segment = chosen[number]
                # its own descriptor, else its name (names agree with segments here)
                fd = fs.dup(segment.fd) if segment.fd >= 0 else segments.open_sealed(segment)
                name = segment_file_name(number)
                files.append(CapturedFile(name, segment.size, fd, segment.path))
        except BaseException:
            for captured in files:
                with contextlib.suppress(OSError):
                    fs.close(captured.fd)
            raise
        seq = engine.appender.seq
    return Capture(fs, seq, files)


# --------------------------------------------------------------------------- container
def _file_crc(fs: FileSystem, captured: CapturedFile) -> int:
    crc = 0
    for chunk in copy_chunks(fs, captured.fd, captured.size, captured.path, captured.name):
        crc = crc32c(chunk, crc)
    return crc


def write_container(capture: Capture, out_path: str, *, durable: bool = False) -> ContainerInfo:
    """Write the container of ``capture`` to a new file ``out_path``.

    Each file is read twice, in chunks (memory stays bounded): once for the
    CRCs the header lists before the bytes, once to copy it. ``durable``:
    fsync the container before returning (the default leaves it to the
    page cache: an upload reads it back at once).

    Returns:
        The container's size and crc32c.

    Raises:
        FileExistsError: ``out_path`` exists.
        CorruptionError: a captured file is shorter than captured, or its
            bytes changed between the two reads (``path`` the captured file).
        OSError: from the file system. On any error ``out_path`` is removed.
    """
    fs = capture.fs
    if capture.closed:
        raise ValueError("the capture is closed")
    entries = [ContainerFile(f.name, f.size, _file_crc(fs, f)) for f in capture.files]
    header = encode_container_header(capture.seq, entries)
    fd = fs.create_file(out_path)
    try:
        fs.append(fd, header)
        total_crc = crc32c(header)
        for captured, entry in zip(capture.files, entries, strict=True):
            crc = 0
            for chunk in copy_chunks(fs, captured.fd, captured.size, captured.path, captured.name):
                fs.append(fd, chunk)
                crc = crc32c(chunk, crc)
                total_crc = crc32c(chunk, total_crc)
            if crc != entry.crc32c:
                raise CorruptionError(
                    captured.path, 0, f"{captured.name} changed while it was copied"
                )
        if durable:
            fs.fsync(fd)
    except BaseException:
        fs.close(fd)
        with contextlib.suppress(OSError):
            fs.unlink(out_path)
        raise
    fs.close(fd)
    return ContainerInfo(len(header) + capture.size, total_crc)
