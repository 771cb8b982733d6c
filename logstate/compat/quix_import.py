"""Import a legacy Quix Streams state directory (one file per key) into logstate.

The legacy layout and file format are in ../shared/reference/quix-legacy.md;
in short, one file per key, written by .NET's ``BinaryWriter``::

    file    = codec type payload crc
    codec   = "b"                                   (1 byte)
    type    = "b" | "l" | "d" | "a" | "o" | "s"     (1 byte)
    payload = bool:   1 byte, 0 or 1
              long:   int64, little-endian
              double: IEEE-754 binary64, little-endian
              binary: int32 length (little-endian, -1 = null) + bytes
              object: int32 length (-1 = null) + a Python pickle
                      (first byte 0x80, last byte ".")
              string: 7-bit-encoded length (LEB128, at most 5 bytes) + UTF-8 bytes
    crc     = zlib CRC-32 of every byte before it, 4 bytes BIG-endian

Each value is imported as what its type byte says: a ``long`` is an int, so
a bool that the legacy Python code stored as a long (its int-before-bool bug)
comes back as 0 or 1; nothing can tell the two apart.

Owns: decoding one legacy file (:func:`decode_legacy_file`, a pure function
over bytes: no I/O, so it can be fuzzed), walking a legacy directory into a
storage (:func:`import_quix_directory`): one atomic batch per (sub-)storage,
damaged or refused files reported (path and reason) and skipped; and telling
a legacy directory from a logstate one (:func:`find_legacy_state_file`).
Must never: change the source directory, write to the destination other than
through its public API, swallow an ``OSError`` from reading the source, or
unpickle anything when ``allow_pickle`` is False.
"""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from logstate._errors import CorruptionError, LogstateError, PickleNotAllowedError
from logstate._format import SEGMENT_MAGIC
from logstate.compat.quixstreams import StateType
from logstate.storage import LocalFileStorage, check_sub_storage_name, encode_key

__all__ = [
    "ImportReport",
    "LegacyFile",
    "LegacyFormatError",
    "LegacyPickleRefusedError",
    "QuixImportError",
    "SkippedFile",
    "decode_legacy_file",
    "find_legacy_state_file",
    "import_quix_directory",
    "is_legacy_temp_file",
    "parse_legacy_file",
]

CODEC_BINARY: Final = ord("b")
CRC_SIZE: Final = 4
MIN_FILE_SIZE: Final = 5  # codec + crc: shorter is malformed (reference)
MAX_7BIT_BYTES: Final = 5  # an int32 in 7-bit groups
TEMP_SUFFIXES: Final = (".tmpf", ".bckf")  # temp and backup files of the 0.5.6+ atomic write
TEMP_MARK: Final = "~"
PICKLE_FIRST_BYTE: Final = 0x80  # PROTO opcode
PICKLE_LAST_BYTE: Final = ord(".")  # STOP opcode

_CRC: Final = struct.Struct(">I")
_INT64: Final = struct.Struct("<q")
_DOUBLE: Final = struct.Struct("<d")
_INT32: Final = struct.Struct("<i")
assert _CRC.size == CRC_SIZE and _INT64.size == 8 and _DOUBLE.size == 8 and _INT32.size == 4

_TYPES: Final = {ord(member.file_code): member for member in StateType}
_HEADER_SIZE: Final = 2  # codec + type
_BOOL_SIZES: Final = {0: False, 1: True}
_MAX_DETECTION_ENTRIES: Final = 10_000  # files find_legacy_state_file looks at, at most


# ============================================================================ errors
class QuixImportError(LogstateError):
    """Base of the errors of this module: a legacy file that cannot be imported."""


class LegacyFormatError(QuixImportError, CorruptionError):
    """A legacy state file is malformed.

    Attributes:
        path: the file ("" when decoding plain bytes).
        offset: byte offset of the problem within the file.
        reason: what is wrong, in words.
    """


class LegacyPickleRefusedError(QuixImportError, PickleNotAllowedError):
    """A legacy file holds an object (a pickle) and ``allow_pickle`` is False.

    Attributes:
        path: the file ("" when decoding plain bytes).
    """

    def __init__(self, path: str = "") -> None:
        self.path = path
        where = f"{path} holds" if path else "the file holds"
        super().__init__(
            f"{where} an object value (a Python pickle), refused: allow_pickle=False "
            "(loading a pickle can run code; allow it only for state you trust)"
        )

    def __reduce__(self) -> tuple[type[LegacyPickleRefusedError], tuple[str]]:
        return (type(self), (self.path,))


# ============================================================================ decoding (pure)
class LegacyFile(NamedTuple):
    """One legacy file, checked but not yet turned into a Python value.

    ``payload`` is the decoded payload for every type but ``Object``, whose
    payload is the pickle's bytes (or None for a null object).
    """

    type: StateType
    payload: object


def _fail(offset: int, reason: str) -> LegacyFormatError:
    return LegacyFormatError("", offset, reason)


def _read_length_prefixed(data: bytes, pos: int, end: int, what: str) -> bytes | None:
    """An int32 length (-1: null) then that many bytes, filling exactly [pos, end)."""
    if end - pos < _INT32.size:
        raise _fail(pos, f"{what} payload truncated: {end - pos} bytes where a 4-byte length is")
    (length,) = _INT32.unpack_from(data, pos)
    pos += _INT32.size
    if length == -1:
        if pos != end:
            raise _fail(pos, f"{end - pos} unexpected bytes after a null {what}")
        return None
    if length < 0:
        raise _fail(pos - _INT32.size, f"{what} length is {length} (only -1, null, is negative)")
    if length > end - pos:
        raise _fail(pos, f"{what} payload truncated: length {length}, {end - pos} bytes present")
    if length < end - pos:
        raise _fail(pos + length, f"{end - pos - length} unexpected bytes after the {what}")
    return data[pos:end]


def _read_7bit_length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A ``BinaryWriter.Write(string)`` length prefix: returns (length, position after)."""
    start = pos
    value = 0
    for shift in range(0, 7 * MAX_7BIT_BYTES, 7):
        if pos >= end:
            raise _fail(start, "string length prefix truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > 0x7FFFFFFF:
                raise _fail(start, f"string length {value} exceeds the int32 range")
            return value, pos
    raise _fail(start, f"string length prefix longer than {MAX_7BIT_BYTES} bytes")


def parse_legacy_file(data: bytes | bytearray | memoryview) -> LegacyFile:
    """Check one legacy state file and split it into its type and payload.

    Nothing is unpickled: an object's payload is its pickle bytes, checked only
    for the first byte 0x80 and last byte ``.`` as the legacy reader did.

    Args:
        data: the whole file.

    Returns:
        The file's :class:`StateType` and payload.

    Raises:
        LegacyFormatError: the file is malformed (its ``offset`` and
            ``reason`` say where and what): shorter than 5 bytes, not codec
            ``b``, CRC mismatch, unknown type byte, a payload that does not
            fill the file exactly, a bad length, invalid UTF-8, a bool byte
            other than 0 or 1, or an object payload that is not a pickle.
    """
    data = bytes(data)
    size = len(data)
    if size < MIN_FILE_SIZE:
        raise _fail(0, f"file is {size} bytes; a legacy state file has at least {MIN_FILE_SIZE}")
    if data[0] != CODEC_BINARY:
        raise _fail(0, f"codec byte is 0x{data[0]:02x}, not 0x62 ('b'): not a legacy state file")
    end = size - CRC_SIZE
    (stored_crc,) = _CRC.unpack_from(data, end)
    computed_crc = zlib.crc32(data[:end])
    if stored_crc != computed_crc:
        # a torn or damaged file: the legacy writer wrote the CRC last
        raise _fail(end, f"CRC mismatch: stored 0x{stored_crc:08x}, computed 0x{computed_crc:08x}")
    if end < _HEADER_SIZE:
        raise _fail(1, "the type byte is missing")
    state_type = _TYPES.get(data[1])
    if state_type is None:
        raise _fail(1, f"unknown type byte 0x{data[1]:02x} (expected one of b, l, d, a, o, s)")
    pos = _HEADER_SIZE
    payload: object
    if state_type is StateType.Bool:
        if end - pos != 1:
            raise _fail(pos, f"bool payload is {end - pos} bytes, not 1")
        bool_value = _BOOL_SIZES.get(data[pos])
        if bool_value is None:
            raise _fail(pos, f"bool byte is {data[pos]}, not 0 or 1")
        payload = bool_value
    elif state_type is StateType.Long:
        if end - pos != _INT64.size:
            raise _fail(pos, f"long payload is {end - pos} bytes, not 8")
        payload = _INT64.unpack_from(data, pos)[0]
    elif state_type is StateType.Double:
        if end - pos != _DOUBLE.size:
            raise _fail(pos, f"double payload is {end - pos} bytes, not 8")
        payload = _DOUBLE.unpack_from(data, pos)[0]
    elif state_type is StateType.Binary:
        payload = _read_length_prefixed(data, pos, end, "binary")
    elif state_type is StateType.Object:
        pickled = _read_length_prefixed(data, pos, end, "object")
        if pickled is not None:
            if not pickled or pickled[0] != PICKLE_FIRST_BYTE:
                raise _fail(pos + 4, "object payload is not a pickle (first byte is not 0x80)")
            if pickled[-1] != PICKLE_LAST_BYTE:
                raise _fail(end - 1, "object payload is not a pickle (last byte is not '.')")
        payload = pickled
    else:  # StateType.String
        length, pos = _read_7bit_length(data, pos, end)
        if length > end - pos:
            raise _fail(pos, f"string truncated: length {length}, {end - pos} bytes present")
        if length < end - pos:
            raise _fail(pos + length, f"{end - pos - length} unexpected bytes after the string")
        try:
            payload = data[pos:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(pos + exc.start, f"string is not valid UTF-8: {exc.reason}") from None
    return LegacyFile(state_type, payload)


def decode_legacy_file(
    data: bytes | bytearray | memoryview, *, allow_pickle: bool = True
) -> object:
    """The Python value of one legacy state file, as its type byte says.

    ``b`` -> bool, ``l`` -> int, ``d`` -> float, ``s`` -> str, ``a`` -> bytes
    (None when null), ``o`` -> the unpickled object (None when null).

    Args:
        data: the whole file.
        allow_pickle: False refuses an object value without unpickling it.

    Returns:
        The value.

    Raises:
        LegacyFormatError: the file is malformed (see :func:`parse_legacy_file`),
            or its object payload fails to unpickle.
        LegacyPickleRefusedError: an object value and ``allow_pickle`` is False.
        Both are :class:`QuixImportError`; nothing else is raised.
    """
    legacy = parse_legacy_file(data)
    if legacy.type is not StateType.Object or legacy.payload is None:
        return legacy.payload
    if not allow_pickle:
        raise LegacyPickleRefusedError()
    assert isinstance(legacy.payload, bytes)
    try:
        return pickle.loads(legacy.payload)
    except Exception as exc:  # anything the pickle's own code raises: the file is bad
        raise _fail(
            _HEADER_SIZE + _INT32.size,
            f"object payload does not unpickle: {type(exc).__name__}: {exc}",
        ) from exc


def is_legacy_temp_file(name: str) -> bool:
    """True for a temp or backup file of the legacy writer (not a key)."""
    return TEMP_MARK in name or name.endswith(TEMP_SUFFIXES)


# ============================================================================ detection
def find_legacy_state_file(directory: str | os.PathLike[str]) -> str | None:
    """A legacy state file below ``directory``, or None when it does not look legacy.

    None when the directory is missing, or when a file directly in it starts
    with logstate's segment magic (a logstate directory: not searched further).
    Otherwise the tree is searched (symbolic links not followed, at most
    10,000 files) for a file that parses as a legacy state file; a file whose
    first byte is not the legacy codec is not read further.

    Args:
        directory: the directory to look at.

    Returns:
        The path of the first legacy state file found, or None.

    Raises:
        OSError: a directory or file could not be read.
    """
    root = os.fspath(directory)
    if not os.path.isdir(root):
        return None
    with os.scandir(root) as scan:
        top = sorted(scan, key=lambda entry: entry.name)
    for entry in top:
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as file:
                if file.read(len(SEGMENT_MAGIC)) == SEGMENT_MAGIC:
                    return None
    examined = 0
    for parent, dir_names, file_names in os.walk(root):
        dir_names.sort()
        for name in sorted(file_names):
            examined += 1
            if examined > _MAX_DETECTION_ENTRIES:
                return None
            path = os.path.join(parent, name)
            if is_legacy_temp_file(name) or os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as file:
                if file.read(1) != b"b":
                    continue
                data = b"b" + file.read()
            try:
                parse_legacy_file(data)
            except LegacyFormatError:
                continue
            return path
    return None


# ============================================================================ import
class SkippedFile(NamedTuple):
    """A file (or directory) that was not imported, and why."""

    path: str  # relative to the source directory, "/"-separated
    reason: str


@dataclass
class ImportReport:
    """What :func:`import_quix_directory` did.

    Attributes:
        source: the legacy directory, as given.
        destination: the destination storage's directory (and sub-storage path).
        keys_imported: keys written, over all storages.
        storages_written: storages imported, each as one batch (the root included).
        sub_storages: sub-directories imported as sub-storages.
        skipped_temp_files: files skipped as temp/backup files of the legacy writer.
        malformed: files (or directories) not imported because they are damaged or invalid.
        refused: files not imported because they hold a pickle and
            ``allow_pickle`` was False.
    """

    source: str
    destination: str
    keys_imported: int = 0
    storages_written: int = 0
    sub_storages: int = 0
    skipped_temp_files: int = 0
    malformed: list[SkippedFile] = field(default_factory=list)
    refused: list[SkippedFile] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every key file was imported (temp/backup files aside)."""
        return not self.malformed and not self.refused

    def summary(self) -> list[str]:
        """The report as lines of text (what ``logstate import-quix`` prints)."""
        lines = [
            f"imported {_plural(self.keys_imported, 'key')} into "
            f"{_plural(self.storages_written, 'storage')} "
            f"({_plural(self.sub_storages, 'sub-storage')}) "
            f"from {self.source} to {self.destination}",
            f"skipped {_plural(self.skipped_temp_files, 'temp/backup file')} "
            "(names containing '~' or ending .tmpf/.bckf)",
        ]
        if self.malformed:
            lines.append(f"not imported, malformed: {_plural(len(self.malformed), 'file')}")
            lines.extend(f"  {item.path}: {item.reason}" for item in self.malformed)
        if self.refused:
            lines.append(
                "not imported, refused (pickled values with allow_pickle=False): "
                f"{_plural(len(self.refused), 'file')}"
            )
            lines.extend(f"  {item.path}: {item.reason}" for item in self.refused)
        lines.append(
            "complete: every key file was imported"
            if self.complete
            else "INCOMPLETE: the files listed above were not imported"
        )
        return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


ProgressCallback = Callable[[str, int], None]


def import_quix_directory(
    src: str | os.PathLike[str],
    dst_storage: LocalFileStorage,
    *,
    allow_pickle: bool = True,
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Import a legacy state directory into ``dst_storage``.

    Every file of ``src`` is a key (its name) of the root storage, every
    sub-directory a sub-storage of the same name, recursively. Files whose
    name contains ``~`` or ends in ``.tmpf`` / ``.bckf`` are skipped and
    counted. A malformed file, a name that is not a valid key or sub-storage
    name, or (with ``allow_pickle=False``) an object value is reported in the
    returned report and skipped; the import goes on.

    The keys of each storage are written as ONE atomic batch, after all its
    files were read: a crash or error leaves each storage with all of its
    imported keys or none of them. Keys already in the destination and not in
    ``src`` are kept; keys in both are overwritten. Running the import again
    after a failure is safe (it writes the same values).

    Args:
        src: the legacy storage directory (e.g. ``./state``, or one state's
            directory below it).
        dst_storage: an open logstate :class:`LocalFileStorage` (or a
            sub-storage, or a compat one) to import into.
        allow_pickle: False refuses object values (Python pickles) instead of
            loading them: use it for a directory you do not trust.
        progress: called as ``progress(storage_path, keys_written)`` after each
            storage's batch is committed (``storage_path`` is relative to
            ``src``, "" for the root).

    Returns:
        An :class:`ImportReport` (``summary()`` gives it as lines of text).

    Raises:
        NotADirectoryError / FileNotFoundError: ``src`` is not a directory.
        OSError: a file or directory of ``src`` could not be read (the storage
            being imported then gets nothing; those before it are written).
        StorageClosedError / StorageFailedError / OSError: writing failed.
    """
    root = os.fspath(src)
    if not os.path.isdir(root):
        if os.path.exists(root):
            raise NotADirectoryError(f"legacy state path {root} is not a directory")
        raise FileNotFoundError(f"legacy state directory {root} does not exist")
    destination = dst_storage.path + (
        f" (sub-storage {dst_storage.name})" if dst_storage.name else ""
    )
    report = ImportReport(source=root, destination=destination)
    _import_storage(root, "", dst_storage, allow_pickle, progress, report)
    return report


def _import_storage(
    directory: str,
    relative: str,
    storage: LocalFileStorage,
    allow_pickle: bool,
    progress: ProgressCallback | None,
    report: ImportReport,
) -> None:
    """Import one directory's key files as one batch, then each sub-directory."""
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    values: dict[str, object] = {}
    sub_directories: list[os.DirEntry[str]] = []
    for entry in entries:
        rel_path = f"{relative}/{entry.name}" if relative else entry.name
        if entry.is_dir(follow_symlinks=False):
            sub_directories.append(entry)
            continue
        if not entry.is_file(follow_symlinks=False):
            report.malformed.append(
                SkippedFile(rel_path, "not a regular file or directory (e.g. a symbolic link)")
            )
            continue
        if is_legacy_temp_file(entry.name):
            report.skipped_temp_files += 1
            continue
        try:
            encode_key(entry.name)
        except ValueError as exc:
            report.malformed.append(SkippedFile(rel_path, f"file name is not a valid key: {exc}"))
            continue
        with open(entry.path, "rb") as file:
            data = file.read()
        try:
            values[entry.name] = decode_legacy_file(data, allow_pickle=allow_pickle)
        except LegacyPickleRefusedError:
            report.refused.append(SkippedFile(rel_path, "an object value (a pickle)"))
        except LegacyFormatError as exc:
            report.malformed.append(SkippedFile(rel_path, f"{exc.reason} (offset {exc.offset})"))

    with storage.batch() as batch:
        for key, value in values.items():
            rel_path = f"{relative}/{key}" if relative else key
            try:
                batch.set(key, value)
            except PickleNotAllowedError:  # the destination has allow_pickle=False
                report.refused.append(
                    SkippedFile(rel_path, "the destination refuses pickled values")
                )
            except (TypeError, ValueError) as exc:  # a value the destination cannot store
                report.malformed.append(
                    SkippedFile(rel_path, f"the destination cannot store the value: {exc}")
                )
    written = len(batch)
    report.keys_imported += written
    report.storages_written += 1
    if progress is not None:
        progress(relative, written)

    for entry in sub_directories:
        rel_path = f"{relative}/{entry.name}" if relative else entry.name
        try:
            check_sub_storage_name(entry.name)
        except ValueError as exc:
            report.malformed.append(
                SkippedFile(
                    rel_path + "/", f"directory name is not a valid sub-storage name: {exc}"
                )
            )
            continue
        sub = storage.get_or_create_sub_storage(entry.name)
        try:
            report.sub_storages += 1
            _import_storage(entry.path, rel_path, sub, allow_pickle, progress, report)
        finally:
            sub.close()
