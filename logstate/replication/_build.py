"""Building a store directory from a snapshot container and records: a restore's last step.

Owns: :func:`build_store`, which makes the whole directory under a temporary
name next to its target (``<target>.restoring-<random hex>``: the snapshot's
segment files, the records after it in new segments, ``replication.json``),
verifies every byte, fsyncs it, and only then renames it to the target in
one step; and :func:`segments_last_seq`, the last seq a directory's segments
hold.
Must never: leave anything at the target but a whole store (any error removes
the temporary directory and leaves the target as it was); replace a target
that holds anything; append a record it has not verified (its frame and CRC
as the scanner checks them, its body as recovery parses it, and its seq the
next one); or make a system call other than through ``_fs``. Which snapshot
and which records to restore from is the orchestration's (``_restore``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Final, NamedTuple

from logstate._errors import CorruptionError, StorageExistsError
from logstate._filenames import (
    REPLICATION_STATE_FILE_NAME,
    RESTORING_INFIX,
    parse_segment_file_name,
    segment_file_name,
)
from logstate._format import REC_COMPACTED, SEGMENT_HEADER_SIZE, decode_segment_header
from logstate._format import encode_segment_header as _encode_segment_header
from logstate._fs import OS_FS, FileSystem
from logstate._options import DEFAULT_OPTIONS
from logstate._replay import native_check
from logstate._scan import SCAN_WINDOW, Damage, WindowedScan, replay_frame, scan_records
from logstate.replication._container import (
    COPY_CHUNK_SIZE,
    ContainerStream,
    extract_container,
    read_container,
)

__all__ = ["BuildResult", "build_store", "segments_last_seq"]

MAX_SEQ: Final = (1 << 64) - 1  # a record's seq is 64 bits (the C check takes no more)

log = logging.getLogger("logstate")

DEFAULT_SEGMENT_SIZE: Final = DEFAULT_OPTIONS.segment_size


class BuildResult(NamedTuple):
    """What :func:`build_store` made."""

    last_seq: int  # the seq of the store's last record (the snapshot's when no record came)
    records: int  # records appended after the snapshot
    bytes: int  # bytes of every segment file of the new store


def build_store(
    target: str,
    container: str | ContainerStream | None,
    records: Iterable[bytes],
    state: Mapping[str, object] | Callable[[int], Mapping[str, object]] | None,
    *,
    snapshot_seq: int | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    fs: FileSystem = OS_FS,
) -> BuildResult:
    """Make a store at ``target`` from a snapshot container and the records after it.

    In a new directory ``f"{target}.restoring-{random hex}"`` next to the
    target: the container's segment files (each checked against its CRC and
    size, then every record frame in them scanned; their last seq must be the
    container's), then ``records`` appended to new segments numbered from the
    last snapshot segment + 1 (segment 1 without a container), written with
    the normal segment header (``FORMAT_VERSION``) and rolled at
    ``segment_size``, then ``state`` as ``replication.json``. Every file and
    the directory are fsynced, then the directory is renamed to ``target``
    (replacing an empty directory) and the parent directory fsynced. Without
    records and without a container, the store has one empty segment.

    Args:
        target: the store directory to make (symbolic links in it resolved);
            missing parents are created.
        container: a snapshot container file (``_snapshot``), or the
            container as it arrives (a :class:`ContainerStream`: read once,
            never copied whole), or None: the records then start at seq 1.
        records: each one exact framed logstate record (as the commit
            listener gets them: ``Engine.add_commit_listener``), seqs
            continuing the snapshot's by exactly 1 each; consumed once, as
            they come (memory stays bounded).
        state: written as JSON to ``replication.json`` (None: no file); a
            callable is called with the last seq once every record is written.
        snapshot_seq: the seq the caller knows the container is at (e.g. from
            its object's description); checked against it.
        segment_size: bytes at which the appended records roll to a new segment.

    Returns:
        The last seq, how many records were appended, the segments' bytes.

    Raises:
        StorageExistsError: ``target`` is a file, or a directory holding
            anything (checked first, and again by the rename).
        CorruptionError / UnsupportedFormatError: the container is damaged or
            not one (``path`` the container's file or the stream's name,
            ``offset`` in it); its segments'
            last seq is not its header's or ``snapshot_seq``; a record whose
            frame, CRC or body is invalid, or a compacted record (``path``
            "", ``offset`` the record's in the bytes of ``records``, ``reason``
            naming its index).
        ValueError: a record's seq is not the next one (the message names the
            expected and the found seq); ``snapshot_seq`` given without a
            container; a ``state`` that JSON cannot hold.
        TypeError: a ``state`` value JSON cannot encode.
        OSError: from the file system.

    On any error the temporary directory is removed and ``target`` is as it
    was. (One exception: the parent directory's fsync failing after the
    rename raises its OSError with the whole store at ``target``.)
    """
    if container is None and snapshot_seq not in (None, 0):
        raise ValueError(f"snapshot_seq {snapshot_seq} given without a snapshot container")
    state_bytes = None if state is None or callable(state) else _state_bytes(state)
    target = fs.canonical_path(target)
    _check_target(fs, target)
    if isinstance(container, str) and snapshot_seq is not None:
        _check_snapshot_seq(container, read_container(container, fs).seq, snapshot_seq)
    parent = os.path.dirname(target)
    if not fs.is_dir(parent):
        fs.make_dirs(parent)
    building = f"{target}{RESTORING_INFIX}{secrets.token_hex(8)}"
    fs.make_dir(building)
    renamed = False
    try:
        base_seq = 0
        total_bytes = 0
        next_number = 1
        if container is not None:
            name = container if isinstance(container, str) else container.name
            header = extract_container(container, building, fs)
            last = segments_last_seq(building, fs)
            if last != header.seq:
                raise CorruptionError(
                    name,
                    0,
                    f"its header says seq {header.seq}, its segments' records end at seq {last}",
                )
            if snapshot_seq is not None:
                _check_snapshot_seq(name, header.seq, snapshot_seq)
            base_seq = header.seq
            total_bytes = header.end_offset - header.data_offset
            if header.files:
                next_number = max(_segment_number(f.name) for f in header.files) + 1
        writer = _SegmentWriter(fs, building, next_number, segment_size)
        try:
            count, last_seq = _append_records(writer, records, base_seq)
            if count == 0 and next_number == 1:
                writer.start_segment()  # a store has at least one segment
            writer.finish()
        finally:
            writer.close()
        total_bytes += writer.bytes_written
        if callable(state):
            state_bytes = _state_bytes(state(last_seq))
        if state_bytes is not None:
            fs.write_new_file(building + "/" + REPLICATION_STATE_FILE_NAME, state_bytes)
        fs.fsync_dir(building)
        _check_target(fs, target)
        try:
            fs.rename(building, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise StorageExistsError(
                target, f"it was made while the store was built ({exc})"
            ) from exc
        renamed = True
        fs.fsync_dir(parent)
    except BaseException:
        if not renamed:
            try:
                fs.remove_tree(building)
            except OSError as exc:
                log.error("%s: removing the unfinished restore %s: %r", target, building, exc)
        raise
    return BuildResult(last_seq, count, total_bytes)


def _state_bytes(state: Mapping[str, object]) -> bytes:
    return (json.dumps(dict(state), sort_keys=True, allow_nan=False) + "\n").encode()


def _segment_number(name: str) -> int:
    """The number of a segment file name a container listed (checked by its decoder)."""
    number = parse_segment_file_name(name)
    assert number is not None
    return number


def _check_snapshot_seq(container: str, seq: int, snapshot_seq: int) -> None:
    if seq != snapshot_seq:
        raise CorruptionError(container, 0, f"it holds seq {seq}, not {snapshot_seq} as expected")


def _check_target(fs: FileSystem, target: str) -> None:
    """Raise unless ``target`` is missing or an empty directory."""
    if not fs.exists(target):
        return
    if not fs.is_dir(target):
        raise StorageExistsError(target, "it exists and is not a directory")
    entries = fs.list_dir(target)
    if entries:
        raise StorageExistsError(
            target,
            f"it is a directory holding {len(entries)} entries ({sorted(entries)[0]!r}, ...); "
            "a restore makes a missing or empty directory only",
        )


class _SegmentWriter:
    """Appends records to new segments of ``directory``, numbered from ``number``.

    A new segment starts when the next record would take the current one past
    ``segment_size`` (a larger record gets a segment of its own). Records are
    buffered up to ``COPY_CHUNK_SIZE`` bytes; each segment is fsynced when it
    is finished.
    """

    def __init__(self, fs: FileSystem, directory: str, number: int, segment_size: int) -> None:
        self._fs = fs
        self._directory = directory
        self.number = number  # of the next segment to start
        self._segment_size = segment_size
        self._fd: int | None = None
        self._size = 0  # of the current segment, buffered bytes included
        self._buffer: list[bytes] = []
        self._buffered = 0
        self.bytes_written = 0  # every segment's bytes

    def start_segment(self) -> None:
        self.finish()
        path = self._directory + "/" + segment_file_name(self.number)
        header = _encode_segment_header(self.number)  # (ValueError past the last number)
        self._fd = self._fs.create_file(path)
        self.number += 1
        self._fs.append(self._fd, header)
        self._size = len(header)
        self.bytes_written += len(header)

    def add(self, record: bytes) -> None:
        if self._fd is None or (
            self._size > SEGMENT_HEADER_SIZE and self._size + len(record) > self._segment_size
        ):
            self.start_segment()
        self._buffer.append(record)
        self._buffered += len(record)
        self._size += len(record)
        self.bytes_written += len(record)
        if self._buffered >= COPY_CHUNK_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            assert self._fd is not None
            self._fs.append(self._fd, b"".join(self._buffer))
            self._buffer = []
            self._buffered = 0

    def finish(self) -> None:
        """Write what is buffered, fsync and close the current segment."""
        if self._fd is None:
            return
        self._flush()
        self._fs.fsync(self._fd)
        self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._fs.close(fd)


def _append_records(
    writer: _SegmentWriter, records: Iterable[bytes], base_seq: int
) -> tuple[int, int]:
    """Verify and append each record; (how many, the last seq)."""
    check = native_check()
    expected = base_seq + 1
    offset = 0  # of the record in the bytes of ``records``
    count = 0
    for index, given in enumerate(records):
        record = given if type(given) is bytes else bytes(given)
        # the C checks pass the common records whole; any other record, and
        # every doubt, is _verify_record's to accept or to name
        if (
            check is None
            or expected > MAX_SEQ  # (past 64 bits: Python names the error)
            or check(record, 0, expected, True)[:2] != (len(record), 1)
        ):
            _verify_record(record, index, offset, expected, base_seq)
        writer.add(record)
        offset += len(record)
        expected += 1
        count += 1
    return count, expected - 1


def _verify_record(record: bytes, index: int, offset: int, expected: int, base_seq: int) -> None:
    """Raise unless ``record`` is one whole valid record of seq ``expected``."""

    def corrupt(reason: str, at: int = 0) -> CorruptionError:
        return CorruptionError(
            "", offset + at, f"record {index} of the records (byte {offset} of them): {reason}"
        )

    damage: list[Damage] = []
    frames = list(scan_records(record, 0, damage.append))
    if not frames or (damage and damage[0].offset < frames[0].offset):
        raise corrupt(damage[0].reason if damage else "empty", damage[0].offset if damage else 0)
    frame = frames[0]
    if frame.size != len(record):
        raise corrupt(f"{len(record) - frame.size} bytes after the record", frame.size)
    if frame.record_type == REC_COMPACTED:
        raise corrupt("a compacted record belongs only at the start of a compaction output")
    if frame.seq != expected:
        raise ValueError(
            f"record {index} of the records has seq {frame.seq}, expected {expected} (the "
            f"records must continue seq {base_seq} by exactly one each)"
        )
    try:
        replay_frame(record, 0, frame.size, frame.record_type)
    except CorruptionError as exc:
        raise corrupt(exc.reason, exc.offset) from None


def segments_last_seq(directory: str, fs: FileSystem = OS_FS, window: int = SCAN_WINDOW) -> int:
    """The largest seq of any record in the segment files of ``directory`` (0: none).

    Every segment file's header (its number the name's) and every record
    frame (length, type, CRC, as the scanner checks them) is checked, read in
    windows. Other files are ignored.

    Raises:
        CorruptionError / UnsupportedFormatError: a bad header, or damage
            anywhere in a segment (``path`` the file, ``offset`` the damage's).
        OSError: from the file system.
    """
    check = native_check()
    last = 0
    names = sorted(n for n in fs.list_dir(directory) if parse_segment_file_name(n) is not None)
    for name in names:
        path = directory + "/" + name
        fd = fs.open_read_only(path)
        try:
            try:
                number = decode_segment_header(fs.pread(fd, SEGMENT_HEADER_SIZE, 0))
            except CorruptionError as exc:
                raise type(exc)(path, exc.offset, exc.reason) from None
            if number != parse_segment_file_name(name):
                raise CorruptionError(path, 0, f"{name} holds the header of segment {number}")
            damage: list[Damage] = []

            def read(at: int, size: int, fd: int = fd) -> bytes:
                return fs.pread(fd, size, at)

            scan = WindowedScan(read, SEGMENT_HEADER_SIZE, fs.file_size(fd), damage.append, window)
            if check is not None:

                def fast(
                    window: bytes, rel: int, _start: int, damage: list[Damage] = damage
                ) -> int:
                    """The C check of the frames from ``rel`` on; where it stopped."""
                    nonlocal last
                    if damage:
                        return rel
                    stop, _count, seq = check(window, rel, 0, False)
                    last = max(last, seq)
                    return stop

                scan.fast = fast
            for _window, _start, frame in scan.frames():
                if damage:
                    break
                last = max(last, frame.seq)
            if damage:
                raise CorruptionError(path, damage[0].offset, damage[0].reason)
        finally:
            fs.close(fd)
    return last
