"""Read-only opens of a live store while its holder compacts.

A read-only open lists the segment files, then opens them; a compaction by
the process holding the directory renames its output over the last input
and deletes the others in between. The open lists again (a bounded number
of times) instead of failing with a raw FileNotFoundError; a segment missing
before the open is still reported as damage.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from logstate import (
    CorruptionError,
    LocalFileStorage,
    StorageChangedError,
    _filenames,
    _recovery,
    _registry,
)
from logstate import _format as fmt
from logstate._format import SEGMENT_HEADER_SIZE
from logstate._fs import FileSystem
from logstate.cli import main as cli_main

KEYS = 200


def fill(directory: Path) -> LocalFileStorage:
    """A writer with many small segments and some dead bytes (nothing compacts by itself)."""
    writer = LocalFileStorage(directory, segment_size=4096, auto_compact=False, sync="none")
    for round_ in range(3):
        for i in range(KEYS):
            writer.set(f"k{i}", round_ * 1000 + i)
    return writer


def open_read_only(fs: FileSystem, directory: Path, **options: object) -> LocalFileStorage:
    """A read-only public handle on an engine that does its I/O through ``fs``."""
    engine = _registry.acquire_engine(str(directory), {"read_only": True, **options}, False, fs=fs)
    try:
        return LocalFileStorage(directory, read_only=True)
    finally:
        _registry.release_engine(engine)  # the handle holds the only reference


class CompactAfterFirstOpen(FileSystem):
    """Runs ``compaction`` right after the open's first segment open (the newest
    segment's): the race, made certain. Records listings and vanished files."""

    def __init__(self, compaction: Callable[[], object]) -> None:
        self._compaction: Callable[[], object] | None = compaction
        self.listings = 0
        self.vanished: list[str] = []

    def list_dir(self, path: str) -> list[str]:
        self.listings += 1
        return super().list_dir(path)

    def open_read_only(self, path: str) -> int:
        try:
            fd = super().open_read_only(path)
        except FileNotFoundError:
            self.vanished.append(path)
            raise
        compaction, self._compaction = self._compaction, None
        if compaction is not None:
            compaction()
        return fd


def test_read_only_open_lists_again_when_a_compaction_deletes_listed_segments(
    tmp_path: Path,
) -> None:
    writer = fill(tmp_path)
    try:
        expected = {f"k{i}": 2000 + i for i in range(KEYS)}
        fs = CompactAfterFirstOpen(writer.compact)
        with open_read_only(fs, tmp_path) as reader:
            assert dict(reader.items()) == expected
            assert reader.report.clean
        assert fs.vanished, "the compaction must have deleted a listed segment"
        assert fs.listings == 2
    finally:
        writer.close()


class CompactAtFirstScan(FileSystem):
    """Runs ``compaction`` when the open starts reading records (after the listing
    and the headers): it renames its output over one listed file and deletes the others."""

    def __init__(self, compaction: Callable[[], object]) -> None:
        self._compaction: Callable[[], object] | None = compaction

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if offset >= SEGMENT_HEADER_SIZE:
            compaction, self._compaction = self._compaction, None
            if compaction is not None:
                compaction()
        return super().pread(fd, size, offset)


def test_read_only_open_never_mixes_files_when_a_compaction_replaces_the_listed_ones(
    tmp_path: Path,
) -> None:
    """A compaction renames its output over a listed file while the open loads it:
    the open notices the file changed (its identity), opens again, and loads the
    new layout whole: it neither fails nor mixes old and new files."""
    writer = fill(tmp_path)
    try:
        before = len([p for p in tmp_path.iterdir() if p.suffix == ".seg"])
        with open_read_only(CompactAtFirstScan(writer.compact), tmp_path) as reader:
            assert dict(reader.items()) == {f"k{i}": 2000 + i for i in range(KEYS)}
            assert reader.report.clean
            after = len([p for p in tmp_path.iterdir() if p.suffix == ".seg"])
            assert after < before
            assert reader.report.segments == after
    finally:
        writer.close()


class PhantomSegment(FileSystem):
    """Every listing names a segment that is gone when opened (a store that keeps changing)."""

    def list_dir(self, path: str) -> list[str]:
        return [*super().list_dir(path), _filenames.segment_file_name(999)]


def test_read_only_open_of_a_store_that_keeps_changing_raises_storage_changed_error(
    tmp_path: Path,
) -> None:
    fill(tmp_path).close()
    with pytest.raises(StorageChangedError) as info:
        open_read_only(PhantomSegment(), tmp_path)
    error = info.value
    assert error.path == str(tmp_path.resolve())
    assert error.attempts == _recovery.READ_ONLY_OPEN_ATTEMPTS
    assert error.vanished.endswith(_filenames.segment_file_name(999))
    assert "retry" in str(error)
    assert pickle.loads(pickle.dumps(error)).attempts == error.attempts
    assert not any(e.options.read_only for e in _registry.open_engines())


def test_segment_missing_before_a_read_only_open_is_still_damage(tmp_path: Path) -> None:
    writer = fill(tmp_path)
    writer.close()
    segments = sorted(p for p in tmp_path.iterdir() if p.suffix == ".seg")
    assert len(segments) > 3
    os.unlink(segments[1])
    with pytest.raises(CorruptionError, match="is missing"):
        LocalFileStorage(tmp_path, read_only=True, use_snapshot=False)
    with LocalFileStorage(tmp_path, read_only=True, recovery="salvage") as salvaged:
        assert salvaged.report.missing_segments == [2]


class HeaderWrittenAfterFirstRead(FileSystem):
    """The holder finishes creating a segment (its header) just after the open first reads it."""

    def __init__(self, path: Path, header: bytes) -> None:
        self._path = path
        self._header: bytes | None = header
        self.short_reads = 0

    def file_size(self, fd: int) -> int:
        size = super().file_size(fd)
        if size == 0 and self._header is not None:
            self.short_reads += 1
            with open(self._path, "ab") as f:
                f.write(self._header)
            self._header = None
        return size


def newest_segment_being_created(directory: Path) -> Path:
    """A closed store plus an empty newest segment (as a roll makes it, before its header)."""
    fill(directory).close()
    numbers = [_filenames.parse_segment_file_name(p.name) for p in directory.iterdir()]
    newest = directory / _filenames.segment_file_name(max(n for n in numbers if n is not None) + 1)
    newest.touch()
    return newest


def test_read_only_open_waits_for_the_header_of_a_segment_being_created(tmp_path: Path) -> None:
    newest = newest_segment_being_created(tmp_path)
    number = _filenames.parse_segment_file_name(newest.name)
    assert number is not None
    fs = HeaderWrittenAfterFirstRead(newest, fmt.encode_segment_header(number))
    with open_read_only(fs, tmp_path, use_snapshot=False) as reader:
        assert fs.short_reads == 1
        assert reader.report.clean, reader.report
        assert reader.report.segments == number
        assert dict(reader.items()) == {f"k{i}": 2000 + i for i in range(KEYS)}


def test_read_only_open_still_reports_a_newest_segment_left_without_header(
    tmp_path: Path,
) -> None:
    newest = newest_segment_being_created(tmp_path)
    with LocalFileStorage(tmp_path, read_only=True) as reader:
        assert reader.report.torn_tails == [(str(newest.resolve()), 0, 0, "")]
        assert len(reader) == KEYS
    assert newest.stat().st_size == 0  # read-only: nothing changed


@contextlib.contextmanager
def compacting(writer: LocalFileStorage) -> Iterator[list[int]]:
    """A thread that rewrites keys and compacts in a loop; yields [compactions done]."""
    stop = threading.Event()
    done = [0]
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            n = 0
            while not stop.is_set():
                for i in range(60):
                    writer.set(f"k{(n * 60 + i) % KEYS}", n)
                writer.compact()
                n += 1
                done[0] = n
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()
        assert not errors, errors


def test_read_only_opens_succeed_while_the_holder_compacts_in_a_loop(tmp_path: Path) -> None:
    writer = fill(tmp_path)
    try:
        with compacting(writer) as done:
            for _ in range(300):
                with LocalFileStorage(tmp_path, read_only=True) as reader:
                    assert len(reader) == KEYS
                    assert sorted(reader.get_all_keys()) == sorted(f"k{i}" for i in range(KEYS))
            assert done[0] > 0
    finally:
        writer.close()


@pytest.mark.parametrize("command", ["check", "dump", "stats"])
def test_cli_read_only_commands_exit_0_while_the_holder_compacts(
    tmp_path: Path, command: str
) -> None:
    writer = fill(tmp_path)
    try:
        with compacting(writer) as done:
            for _ in range(40):
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = cli_main([command, str(tmp_path)])
                assert code == 0, (out.getvalue()[-500:], err.getvalue())
            assert done[0] > 0
    finally:
        writer.close()
