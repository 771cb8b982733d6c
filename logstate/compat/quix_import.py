"""Import a legacy Quix Streams state directory (one file per key) into logstate.

The legacy file format (and the decoding of one file's bytes) is
:mod:`logstate.compat._legacy`; this module walks the directories. Every
file of a legacy storage directory is a key (its name), every sub-directory
a sub-storage of the same name, recursively; the legacy writer's temp and
backup files lie beside them.

Owns: walking a legacy directory into a storage
(:func:`import_quix_directory`): one atomic batch per (sub-)storage, damaged
or refused files reported (path and reason) and skipped; and telling a
legacy directory from a logstate one (:func:`find_legacy_state_file`).
Must never: change the source directory, write to the destination other than
through its public API, swallow an ``OSError`` from reading the source,
unpickle anything when ``allow_pickle`` is False, or parse a legacy file's
bytes itself (that is :mod:`logstate.compat._legacy`'s).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from logstate._errors import PickleNotAllowedError
from logstate._format import SEGMENT_MAGIC
from logstate.compat._legacy import CODEC_BINARY as CODEC_BINARY
from logstate.compat._legacy import CRC_SIZE as CRC_SIZE
from logstate.compat._legacy import MAX_7BIT_BYTES as MAX_7BIT_BYTES
from logstate.compat._legacy import MIN_FILE_SIZE as MIN_FILE_SIZE
from logstate.compat._legacy import PICKLE_FIRST_BYTE as PICKLE_FIRST_BYTE
from logstate.compat._legacy import PICKLE_LAST_BYTE as PICKLE_LAST_BYTE
from logstate.compat._legacy import TEMP_MARK as TEMP_MARK
from logstate.compat._legacy import TEMP_SUFFIXES as TEMP_SUFFIXES
from logstate.compat._legacy import (
    LegacyFile,
    LegacyFormatError,
    LegacyPickleRefusedError,
    QuixImportError,
    decode_legacy_file,
    is_legacy_temp_file,
    parse_legacy_file,
)
from logstate.compat._legacy import StateType as StateType
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

_MAX_DETECTION_ENTRIES: Final = 10_000  # files find_legacy_state_file looks at, at most
_CODEC: Final = bytes([CODEC_BINARY])  # the first byte of every legacy state file


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
                first = file.read(1)
                if first != _CODEC:
                    continue
                data = first + file.read()
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
