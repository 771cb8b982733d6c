"""The replication snapshot container: its byte layout, codec, and reading it back.

Owns: the byte layout of the container a snapshot is stored as (defined here
once; documented in docs/format.md, "Replication snapshot container"), its
pure encoding and decoding (:func:`encode_container_header`,
:func:`decode_container_prefix`, :func:`decode_container_header`: bytes in, a
value or ``CorruptionError`` out, never another exception, so they can be
fuzzed), reading a container file's header (:func:`read_container`) and
writing its files back as segment files (:func:`extract_container`, from a
container file or from a :class:`ContainerStream` as it arrives), each
checked against its size and CRC; and :func:`copy_chunks`, the bounded
chunked read both directions use.
Must never: hold a whole file in memory (files are copied in
``COPY_CHUNK_SIZE`` chunks, a stream's in the pieces it comes in), create a
file whose name is not a segment file name (a container's names are checked
before anything is written), or make
a system call other than through ``_fs``. Writing a container from a
capture is ``_snapshot``'s.

A container is not a store format: stores do not change, and a store
directory never holds one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from typing import Any, Final, NamedTuple

from logstate._crc import crc32c
from logstate._errors import CorruptionError, UnsupportedFormatError
from logstate._filenames import parse_segment_file_name, segment_file_name
from logstate._format import SEGMENT_HEADER_SIZE, decode_segment_header
from logstate._fs import OS_FS, FileSystem

__all__ = [
    "CONTAINER_MAGIC",
    "CONTAINER_VERSION",
    "COPY_CHUNK_SIZE",
    "ContainerFile",
    "ContainerHeader",
    "ContainerInfo",
    "ContainerStream",
    "copy_chunks",
    "decode_container_header",
    "decode_container_prefix",
    "encode_container_header",
    "extract_container",
    "read_container",
]

# --------------------------------------------------------------------------- layout
CONTAINER_MAGIC: Final = b"LGSNAP\r\n"
CONTAINER_VERSION: Final = 1
CONTAINER_PREFIX: Final = struct.Struct("<8sII")  # magic, version, header_size
CONTAINER_PREFIX_SIZE: Final = CONTAINER_PREFIX.size
assert CONTAINER_PREFIX_SIZE == 16
CONTAINER_CRC: Final = struct.Struct("<I")  # header_crc: crc32c of everything before it
CONTAINER_CRC_SIZE: Final = CONTAINER_CRC.size
assert CONTAINER_CRC_SIZE == 4
assert len(CONTAINER_MAGIC) == 8
MAX_HEADER_SIZE: Final = 1 << 26  # bytes of header JSON (about 900 000 files): a corrupt
# header_size never makes a reader allocate more
MAX_SEQ: Final = (1 << 64) - 1  # seq is a u64 in every record
MAX_FILE_SIZE: Final = (1 << 63) - 1
COPY_CHUNK_SIZE: Final = 1 << 20  # bytes read and written at a time


class ContainerFile(NamedTuple):
    """One file of a container, as its header lists it."""

    name: str  # a segment file name (``segment-0000000001.seg``)
    size: int  # bytes
    crc32c: int  # of its bytes


class ContainerHeader(NamedTuple):
    """A decoded container header."""

    seq: int  # the store's seq when the files were captured (their last record's)
    files: list[ContainerFile]  # in the order of their bytes, segment numbers ascending
    data_offset: int  # where the first file's bytes start (the header's size)

    @property
    def end_offset(self) -> int:
        """The container's size: the header and every file's bytes."""
        return self.data_offset + sum(f.size for f in self.files)


class ContainerInfo(NamedTuple):
    """A container file written by :func:`write_container`."""

    size: int  # bytes
    crc: int  # crc32c of the whole file


# --------------------------------------------------------------------------- pure codec
def _short(value: object) -> str:
    """``repr(value)``, cut to 60 characters (a damaged header may hold anything)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _files_problem(files: list[ContainerFile]) -> tuple[int, str] | None:
    """(index, reason) of the first file that a header cannot list, or None."""
    previous = 0
    for index, entry in enumerate(files):
        name, size, crc = entry
        if type(name) is not str:
            return index, f"file {index}: name is {type(name).__name__}, not a string"
        number = parse_segment_file_name(name)
        if number is None or name != segment_file_name(number):
            return index, f"file {index}: {_short(name)} is not a segment file name"
        if number <= previous:
            return index, f"file {index}: {name} does not come after segment {previous}"
        previous = number
        if type(size) is not int or not SEGMENT_HEADER_SIZE <= size <= MAX_FILE_SIZE:
            return index, f"file {index} ({name}): size {_short(size)} is not a segment's"
        if type(crc) is not int or not 0 <= crc <= 0xFFFFFFFF:
            return index, f"file {index} ({name}): crc32c {_short(crc)} is not a u32"
    return None


def encode_container_header(seq: int, files: list[ContainerFile]) -> bytes:
    """The bytes of a container up to its first file: prefix, header JSON, header CRC.

    Raises:
        ValueError: ``seq`` is not a u64, or a file that a header cannot list
            (not a segment file name, numbers not ascending, a size below a
            segment header's, a CRC that is not a u32).
    """
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"container seq {_short(seq)} is not a u64")
    problem = _files_problem(files)
    if problem is not None:
        raise ValueError(f"container header: {problem[1]}")
    document = {
        "seq": seq,
        "files": [{"name": f.name, "size": f.size, "crc32c": f.crc32c} for f in files],
    }
    header = json.dumps(document, separators=(",", ":")).encode("ascii")
    if len(header) > MAX_HEADER_SIZE:
        raise ValueError(f"container header of {len(header)} bytes exceeds {MAX_HEADER_SIZE}")
    head = CONTAINER_PREFIX.pack(CONTAINER_MAGIC, CONTAINER_VERSION, len(header)) + header
    return head + CONTAINER_CRC.pack(crc32c(head))


def decode_container_prefix(data: bytes | memoryview) -> int:
    """Check a container's first 16 bytes; the size of the whole header block.

    The header block is the prefix, the header JSON and the header CRC: the
    bytes to pass to :func:`decode_container_header`.

    Raises:
        CorruptionError: fewer than 16 bytes (offset 0); a header size of 0 or
            above ``MAX_HEADER_SIZE`` (offset 12). ``path`` is "".
        UnsupportedFormatError: not a container (magic, offset 0), or a
            version this code does not read (offset 8).
    """
    if len(data) < CONTAINER_PREFIX_SIZE:
        raise CorruptionError("", 0, f"container truncated ({len(data)} of 16 prefix bytes)")
    magic, version, header_size = CONTAINER_PREFIX.unpack_from(data, 0)
    if magic != CONTAINER_MAGIC:
        raise UnsupportedFormatError(
            "", 0, f"not a logstate snapshot container (magic {bytes(magic)!r})"
        )
    if version != CONTAINER_VERSION:
        raise UnsupportedFormatError(
            "",
            8,
            f"snapshot container version {version} is not supported (this logstate reads "
            f"version {CONTAINER_VERSION}); upgrade logstate to restore from it",
        )
    if not 0 < header_size <= MAX_HEADER_SIZE:
        raise CorruptionError("", 12, f"container header size {header_size} is out of range")
    return CONTAINER_PREFIX_SIZE + int(header_size) + CONTAINER_CRC_SIZE


def decode_container_header(data: bytes | memoryview) -> ContainerHeader:
    """Decode a container's header block (bytes after it are ignored).

    Checked in this order: the prefix (:func:`decode_container_prefix`), the
    block's length, the header CRC, the JSON, its fields (``seq`` a u64,
    ``files`` a list of ``{"name", "size", "crc32c"}`` as
    :func:`encode_container_header` allows them; other keys are ignored).

    Raises:
        CorruptionError / UnsupportedFormatError: the first check that fails,
            with the offset of the field at fault; never another exception.
            ``path`` is "" (the caller knows the file).
    """
    block_size = decode_container_prefix(data)
    if len(data) < block_size:
        raise CorruptionError(
            "", len(data), f"container header truncated ({len(data)} of {block_size} bytes)"
        )
    crc_offset = block_size - CONTAINER_CRC_SIZE
    (stored,) = CONTAINER_CRC.unpack_from(data, crc_offset)
    if stored != crc32c(data[:crc_offset]):
        raise CorruptionError("", crc_offset, "container header checksum mismatch")
    json_offset = CONTAINER_PREFIX_SIZE
    try:
        document = json.loads(bytes(data[json_offset:crc_offset]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptionError("", json_offset, f"container header is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CorruptionError("", json_offset, "container header is not a JSON object")
    seq = document.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise CorruptionError("", json_offset, f"container header: seq {_short(seq)} is not a u64")
    listed = document.get("files")
    if not isinstance(listed, list):
        raise CorruptionError("", json_offset, "container header: files is not a list")
    files: list[ContainerFile] = []
    for index, item in enumerate(listed):
        if not isinstance(item, dict):
            raise CorruptionError("", json_offset, f"container header: file {index} not an object")
        name: Any = item.get("name")
        size: Any = item.get("size")
        crc: Any = item.get("crc32c")
        files.append(ContainerFile(name, size, crc))  # (checked below)
    problem = _files_problem(files)
    if problem is not None:
        raise CorruptionError("", json_offset, f"container header: {problem[1]}")
    return ContainerHeader(seq, files, block_size)


# --------------------------------------------------------------------------- files
def copy_chunks(
    fs: FileSystem, fd: int, size: int, path: str, what: str, start: int = 0
) -> Iterator[bytes]:
    """The ``size`` bytes of ``fd`` from ``start``, in chunks of at most ``COPY_CHUNK_SIZE``.

    Raises:
        CorruptionError: the file ends before them (``path``, the offset where
            it ends; ``reason`` names ``what``).
    """
    position = start
    end = start + size
    while position < end:
        chunk = fs.pread(fd, min(COPY_CHUNK_SIZE, end - position), position)
        if not chunk:
            raise CorruptionError(
                path, position, f"{what}: the file ends {end - position} bytes before its end"
            )
        yield chunk
        position += len(chunk)


def _in_file(path: str, exc: CorruptionError) -> CorruptionError:
    """``exc`` (from a decoder: path "") as an error in file ``path``."""
    return type(exc)(path, exc.offset, exc.reason)


def _read_header(fs: FileSystem, fd: int, path: str) -> ContainerHeader:
    """The header of the container open as ``fd``, checked against the file's size."""
    prefix = fs.pread(fd, CONTAINER_PREFIX_SIZE, 0)
    try:
        block_size = decode_container_prefix(prefix)
        header = decode_container_header(prefix + fs.pread(fd, block_size - len(prefix), 16))
    except CorruptionError as exc:
        raise _in_file(path, exc) from None
    size = fs.file_size(fd)
    end = header.end_offset
    if size < end:
        raise CorruptionError(
            path, size, f"container truncated: {size} bytes, its header describes {end}"
        )
    if size > end:
        raise CorruptionError(path, end, f"{size - end} bytes after the container's last file")
    return header


def read_container(path: str, fs: FileSystem = OS_FS) -> ContainerHeader:
    """The header of container file ``path`` (``files``: name, size, crc32c of each).

    Checks the header (as :func:`decode_container_header`) and that the file
    is exactly as long as the header says; the files' bytes are not read.

    Raises:
        CorruptionError / UnsupportedFormatError: named with ``path`` and the offset.
        OSError: from the file system.
    """
    fd = fs.open_read_only(path)
    try:
        return _read_header(fs, fd, path)
    finally:
        fs.close(fd)


class ContainerStream(NamedTuple):
    """A container read as it arrives, not from a file (a snapshot object's chunks)."""

    name: str  # what errors name as its ``path`` (e.g. the object and its bucket)
    chunks: Iterable[bytes]  # its bytes in order, in pieces of any size; consumed once


class _Pieces:
    """The bytes of a :class:`ContainerStream`, taken in order and counted."""

    def __init__(self, source: ContainerStream) -> None:
        self._name = source.name
        self._chunks = iter(source.chunks)
        self._held = memoryview(b"")  # the chunk taken from the stream last
        self._at = 0  # in it, of the next byte not given out
        self.offset = 0  # in the stream, of the next byte given out

    def _next(self) -> bool:
        """Hold the stream's next non-empty chunk; False at its end."""
        for chunk in self._chunks:
            if chunk:
                self._held, self._at = memoryview(chunk).cast("B"), 0
                return True
        return False

    def _piece(self, limit: int) -> bytes:
        """At most the next ``limit`` bytes; b"" at the stream's end."""
        if self._at >= len(self._held) and not self._next():
            return b""
        at = self._at
        piece = bytes(self._held[at : at + limit])  # (a copy of the piece only)
        self._at = at + len(piece)
        self.offset += len(piece)
        return piece

    def take(self, size: int, what: str) -> Iterator[bytes]:
        """The next ``size`` bytes, in pieces.

        Raises:
            CorruptionError: the stream ends before them (the offset where it
                ends; ``reason`` names ``what``).
        """
        end = self.offset + size
        while self.offset < end:
            piece = self._piece(end - self.offset)
            if not piece:
                raise CorruptionError(
                    self._name,
                    self.offset,
                    f"{what}: container truncated, {end - self.offset} bytes short of "
                    "the size its header gives",
                )
            yield piece

    def read(self, size: int) -> bytes:
        """The next ``size`` bytes, or fewer when the stream ends first."""
        pieces: list[bytes] = []
        end = self.offset + size
        while self.offset < end and (piece := self._piece(end - self.offset)):
            pieces.append(piece)
        return b"".join(pieces)

    def rest(self) -> int:
        """Read the stream to its end; how many bytes were left."""
        left = len(self._held) - self._at
        while self._next():
            left += len(self._held)
        self._held, self._at = memoryview(b""), 0
        return left

    def close(self) -> None:
        """Close the stream's iterator where it has a ``close`` (a generator's
        cleanup runs now, not when it is collected)."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def extract_container(
    source: str | ContainerStream, into_dir: str, fs: FileSystem = OS_FS
) -> ContainerHeader:
    """Write the files of a container into the directory ``into_dir``, each checked.

    ``source`` is the container's file, or a :class:`ContainerStream` (read
    once, as it comes: no copy of the container is kept). Each file is
    created (it must not exist), copied in chunks, fsynced; then the
    directory is fsynced. Each file's bytes must match its size and crc32c,
    and start with the segment header of the number its name has; a stream
    must end where the last file does (it is read to its end).
    On an error, files already written stay (the caller removes the
    directory: a restore builds in a temporary one).

    Returns:
        The container's header.

    Raises:
        CorruptionError / UnsupportedFormatError: the file's path (a stream's
            name) and the offset in it (of the header field, or of the first
            byte of the file at fault; ``reason`` names the file).
        OSError: from the file system (FileExistsError: a file exists already).
        Any exception of a stream's ``chunks`` as it is read.
    """
    if not isinstance(source, str):
        return _extract_stream(source, into_dir, fs)
    fd = fs.open_read_only(source)
    try:
        header = _read_header(fs, fd, source)
        offset = header.data_offset
        for entry in header.files:
            what = f"container, in {entry.name}"
            pieces = copy_chunks(fs, fd, entry.size, source, what, offset)
            _extract_file(fs, pieces, source, offset, entry, into_dir + "/" + entry.name)
            offset += entry.size
    finally:
        fs.close(fd)
    fs.fsync_dir(into_dir)
    return header


def _extract_stream(source: ContainerStream, into_dir: str, fs: FileSystem) -> ContainerHeader:
    """:func:`extract_container` of a stream."""
    pieces = _Pieces(source)
    try:
        prefix = pieces.read(CONTAINER_PREFIX_SIZE)
        try:
            block_size = decode_container_prefix(prefix)
            header = decode_container_header(prefix + pieces.read(block_size - len(prefix)))
        except CorruptionError as exc:
            raise _in_file(source.name, exc) from None
        offset = header.data_offset
        for entry in header.files:
            what = f"container, in {entry.name}"
            out_path = into_dir + "/" + entry.name
            _extract_file(fs, pieces.take(entry.size, what), source.name, offset, entry, out_path)
            offset += entry.size
        left = pieces.rest()
    finally:
        pieces.close()
    if left:
        raise CorruptionError(source.name, offset, f"{left} bytes after the container's last file")
    fs.fsync_dir(into_dir)
    return header


def _extract_file(
    fs: FileSystem,
    pieces: Iterable[bytes],
    path: str,
    offset: int,
    entry: ContainerFile,
    out_path: str,
) -> None:
    """Write one file (``entry``: its bytes ``pieces``, at ``offset`` in container
    ``path``) to ``out_path``; check it."""
    out = fs.create_file(out_path)
    try:
        crc = 0
        head = b""
        end = offset + entry.size
        for chunk in pieces:
            if len(head) < SEGMENT_HEADER_SIZE:
                head += chunk[: SEGMENT_HEADER_SIZE - len(head)]
            fs.append(out, chunk)
            crc = crc32c(chunk, crc)
        if crc != entry.crc32c:
            raise CorruptionError(
                path,
                offset,
                f"{entry.name} (bytes {offset} to {end}) has crc32c 0x{crc:08x}, "
                f"the header says 0x{entry.crc32c:08x}",
            )
        try:
            number = decode_segment_header(head)
        except CorruptionError as exc:
            raise type(exc)(path, offset + exc.offset, f"{entry.name}: {exc.reason}") from None
        if segment_file_name(number) != entry.name:
            raise CorruptionError(
                path, offset, f"{entry.name} holds the header of segment {number}"
            )
        fs.fsync(out)
    finally:
        fs.close(out)
