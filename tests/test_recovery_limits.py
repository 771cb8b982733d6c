"""Recovery at the limits: huge (sparse) segments under a memory limit, and a full disk.

- Open and ``logstate check`` scan segments in bounded windows: memory does
  not grow with a segment's size (checked in a subprocess under RLIMIT_AS),
  and the windowed scanner reports exactly what the whole-buffer scanner does.
- A torn tail is copied aside through a temporary file and a rename: a failed
  open (ENOSPC) leaves no partial copy, a copy with the same bytes is reused,
  the error names the way out (``logstate repair DIR --no-copy``), and once
  space is freed a normal open succeeds. Zero-filled runs are copied as holes.
- Salvage's placeholder for a missing segment is written atomically: a full
  disk cannot leave a headerless segment in the middle of the sequence.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from logstate import LocalFileStorage, StorageFailedError, _engine, _registry
from logstate import _format as fmt
from logstate._fs import FileSystem
from logstate._scan import SCAN_WINDOW, Damage, WindowedScan, scan_records
from logstate.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


# ============================================================================ helpers
def make_store(directory: Path, count: int = 20, **options: Any) -> dict[str, str]:
    items = {f"k{i}": f"value {i} " * 10 for i in range(count)}
    with LocalFileStorage(directory, sync="none", auto_compact=False, **options) as s:
        for key, value in items.items():
            s[key] = value
    (directory / "index.snapshot").unlink(missing_ok=True)
    return items


def newest_segment(directory: Path) -> Path:
    return sorted(directory.glob("segment-*.seg"))[-1]


def copies(directory: Path, suffix: str = ".torn") -> list[str]:
    """Names of the aside copies (and their temporary files) in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if suffix in p.name)


class FullDisk(FileSystem):
    """Every append fails with ENOSPC after writing half of its data, while ``full``."""

    def __init__(self) -> None:
        self.full = True

    def append(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        if self.full and len(data):
            super().append(fd, memoryview(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().append(fd, data)


def open_with(fs: FileSystem, directory: Path, **options: Any) -> _engine.Engine:
    """Open an engine through ``fs`` and close it again (the report stays readable)."""
    engine = _registry.acquire_engine(str(directory), options, create=False, fs=fs)
    _registry.release_engine(engine)
    return engine


# ============================================================================ windowed scan
def _segment_bytes(rng: random.Random) -> bytes:
    """A segment's bytes: records (some larger than small windows), damage, tails."""
    parts = [fmt.encode_segment_header(1)]
    for seq in range(1, rng.randint(2, 40)):
        value = rng.randbytes(rng.choice((0, 3, 40, 300, 2000)))
        body = f"k{seq}".encode() + b"\x05" + value
        record = fmt.encode_record(fmt.REC_SET, seq, body)
        fate = rng.random()
        if fate < 0.08:
            parts.append(bytes(rng.randint(1, 200)))  # zero-filled space
        elif fate < 0.16:
            parts.append(rng.randbytes(rng.randint(1, 200)))  # garbage
        elif fate < 0.22:
            flipped = bytearray(record)
            flipped[rng.randrange(len(record))] ^= 1 << rng.randrange(8)  # bit flip
            record = bytes(flipped)
        elif fate < 0.25:
            record = fmt.FRAME_HEADER.pack(1, rng.randint(8, 1 << 30), fmt.REC_SET)
        parts.append(record)
    tail = rng.random()
    if tail < 0.3:
        parts.append(bytes(rng.randint(1, 5000)))
    elif tail < 0.5:
        parts[-1] = parts[-1][: rng.randrange(len(parts[-1]) + 1)]
    return b"".join(parts)


@pytest.mark.parametrize("window", [fmt.RECORD_OVERHEAD, 18, 25, 64, 257, 4096, 1 << 24])
def test_windowed_scan_reports_exactly_what_the_whole_buffer_scan_reports(window: int) -> None:
    rng = random.Random(window)
    for _ in range(60):
        data = _segment_bytes(rng)
        for start in (fmt.SEGMENT_HEADER_SIZE, rng.randrange(len(data) + 1)):
            expected_damage: list[Damage] = []
            expected = list(scan_records(data, start, expected_damage.append))
            reads: list[int] = []

            def read(offset: int, size: int, data: bytes = data, reads: list[int] = reads) -> bytes:
                reads.append(size)
                return data[offset : offset + size]

            def skip(offset: int, data: bytes = data) -> int:
                """Where the run of zeros at ``offset`` ends (as a file's hole would)."""
                stripped = data[offset:].lstrip(b"\0")
                return len(data) - len(stripped)

            damage: list[Damage] = []
            holes = skip if rng.random() < 0.5 else None
            scan = WindowedScan(read, start, len(data), damage.append, window, holes)
            found = []
            for buf, buf_start, frame in scan.frames():
                # the frame's bytes are in the window it came with
                assert (
                    buf[frame.offset : frame.offset + frame.size]
                    == data[buf_start + frame.offset : buf_start + frame.offset + frame.size]
                )
                found.append(frame._replace(offset=buf_start + frame.offset))
            assert found == expected
            assert damage == expected_damage
            largest = max((f.size for f in expected), default=0)
            assert max(reads, default=0) <= max(window, largest)


# ============================================================================ huge segments
SPARSE_SIZE = 3 << 30  # bytes of the newest segment: zeros after the valid records
GARBAGE_AT = 2 << 30  # ... but for some garbage here

_LIMITED = textwrap.dedent(
    """
    import os, resource, sys
    directory = sys.argv[1]
    with open("/proc/self/statm") as f:
        vsz = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vsz + (512 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        bytearray(1 << 30)
    except MemoryError:
        print("limit works")
    from logstate import LocalFileStorage
    from logstate.cli import main
    with LocalFileStorage(directory, read_only=True) as s:
        print("read-only", len(s), s.report.torn_tails[0][1:3])
    print("check exit", main(["check", directory]))
    with LocalFileStorage(directory, sync="none") as s:
        print("writable", len(s), s.report.torn_tails[0][1:3])
        s["after"] = 1
    with LocalFileStorage(directory, sync="none") as s:
        print("reopened", len(s), s.report.clean)
    """
)


def test_a_sparse_multi_gib_newest_segment_opens_and_checks_under_a_memory_limit(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    items = make_store(directory)
    segment = newest_segment(directory)
    valid = segment.stat().st_size
    garbage = b"not a record " * 5000  # no record type byte in it
    with open(segment, "r+b") as f:  # zeros, garbage far in, zeros
        f.truncate(SPARSE_SIZE)
        f.seek(GARBAGE_AT)
        f.write(garbage)
    run = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "Traceback" not in out and "MemoryError" not in out, out
    lines = run.stdout.splitlines()
    torn = (valid, SPARSE_SIZE - valid)
    assert lines[0] == "limit works"
    assert lines[1] == f"read-only {len(items)} {torn}"
    assert "torn tail" in run.stdout and "check exit 1" in lines
    assert f"writable {len(items)} {torn}" in lines
    assert lines[-1] == f"reopened {len(items) + 1} True"
    (aside,) = directory.glob("*.torn")
    # the zero-filled runs are kept as holes: little disk space, the same bytes
    assert aside.stat().st_size == SPARSE_SIZE - valid
    assert aside.stat().st_blocks * 512 <= 2 * SCAN_WINDOW  # the window around the garbage
    with open(aside, "rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20)
        f.seek(GARBAGE_AT - valid - 1)
        assert f.read(len(garbage) + 2) == b"\0" + garbage + b"\0"
    assert segment.stat().st_size > valid


# ============================================================================ full disk
def test_failed_opens_on_a_full_disk_leave_no_copy_and_name_the_way_out(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    items = make_store(directory)
    segment = newest_segment(directory)
    valid = segment.read_bytes()
    tail = b"\x01torn write " * 50
    segment.write_bytes(valid + tail)
    fs = FullDisk()
    for _ in range(3):  # a restart loop
        with pytest.raises(OSError) as info:
            open_with(fs, directory)
        assert copies(directory) == []  # no partial copy is left behind
        assert segment.read_bytes() == valid + tail  # nothing was cut
        assert info.value.errno == errno.ENOSPC
        message = str(info.value)
        assert "no space left" in message and "torn tail" in message
        assert f"logstate repair {directory.resolve()} --no-copy" in message
    fs.full = False  # space freed
    engine = open_with(fs, directory)
    (aside,) = copies(directory)
    assert (directory / aside).read_bytes() == tail
    assert engine.report.torn_tails == [
        (str(segment.resolve()), len(valid), len(tail), str((directory / aside).resolve()))
    ]
    with LocalFileStorage(directory) as s:
        assert s.report.clean and dict(s.items()) == items


def test_a_copy_left_by_an_open_that_failed_after_making_it_is_reused(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    make_store(directory)
    segment = newest_segment(directory)
    tail = b"\x02torn" * 30
    segment.write_bytes(segment.read_bytes() + tail)

    class TruncateFails(FileSystem):
        def truncate(self, fd: int, size: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(OSError):
        open_with(TruncateFails(), directory)
    assert copies(directory) == [f"{segment.name}.{segment.stat().st_size - len(tail)}.torn"]
    with LocalFileStorage(directory) as s:
        assert Path(s.report.torn_tails[0][3]).name == copies(directory)[0]
    assert copies(directory) == [copies(directory)[0]]


def test_repair_no_copy_cuts_a_torn_tail_without_copying_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    items = make_store(directory)
    segment = newest_segment(directory)
    valid = segment.read_bytes()
    segment.write_bytes(valid + b"\x03torn" * 20)
    assert cli_main(["repair", str(directory), "--no-copy"]) == 0
    out = capsys.readouterr().out
    assert f"at offset {len(valid)}, 100 bytes (not kept: --no-copy)" in out
    assert copies(directory) == [] and segment.read_bytes() == valid
    with LocalFileStorage(directory) as s:
        assert s.report.clean and dict(s.items()) == items


def test_salvage_of_a_missing_segment_on_a_full_disk_leaves_a_store_that_reopens(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    items = make_store(directory, count=150, segment_size=4096)
    segments = sorted(directory.glob("segment-*.seg"))
    assert len(segments) >= 3
    lost = segments[1]
    with LocalFileStorage(directory, read_only=True, recovery="salvage") as s:
        kept = dict(s.items())
    lost.unlink()
    with LocalFileStorage(directory, read_only=True, recovery="salvage") as s:
        kept = dict(s.items())
    assert kept != items
    with pytest.raises(OSError) as info:
        open_with(FullDisk(), directory, recovery="salvage")
    assert info.value.errno == errno.ENOSPC
    assert not lost.exists()  # no headerless segment in the middle of the sequence
    with LocalFileStorage(directory, recovery="salvage") as s:
        assert s.report.missing_segments == [int(lost.name[8:18])]
        assert dict(s.items()) == kept
    with LocalFileStorage(directory) as s:  # the loss was recorded: strict opens again
        assert s.report.clean and dict(s.items()) == kept


# ============================================================================ a real full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); FullDisk covers it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: Path) -> None:
    """Write ``path`` until the disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"x" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_store_that_hit_a_full_disk_reopens_once_space_is_freed(small_disk: Path) -> None:
    directory = small_disk / "store"
    s = LocalFileStorage(directory, sync="always", auto_compact=False)
    for i in range(10):
        s[f"k{i}"] = "v" * 100
    acknowledged = dict(s.items())
    fill(small_disk / "filler")
    with pytest.raises(OSError) as info:
        s["big"] = b"b" * 100_000
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(StorageFailedError):  # the failed handle stays failed
        s["more"] = 1
    s.close()
    for _ in range(3):  # a restart loop on the full disk
        with pytest.raises(OSError) as info:
            LocalFileStorage(directory)
        assert info.value.errno == errno.ENOSPC
        assert "--no-copy" in str(info.value)
        assert copies(directory) == []
    (small_disk / "filler").unlink()
    with LocalFileStorage(directory) as again:
        assert dict(again.items()) == acknowledged
        (torn,) = again.report.torn_tails
        assert copies(directory) == [Path(torn[3]).name]
        again["after"] = 1
    with LocalFileStorage(directory) as again:
        assert again.report.clean and again["after"] == 1


def test_repair_no_copy_recovers_a_store_on_a_disk_that_stays_full(small_disk: Path) -> None:
    directory = small_disk / "store"
    s = LocalFileStorage(directory, sync="always", auto_compact=False)
    for i in range(10):
        s[f"k{i}"] = "v" * 100
    acknowledged = dict(s.items())
    fill(small_disk / "filler")
    with pytest.raises(OSError):
        s["big"] = b"b" * 100_000
    s.close()
    with pytest.raises(OSError):
        LocalFileStorage(directory)
    assert cli_main(["repair", str(directory), "--no-copy"]) == 0
    assert copies(directory) == []
    with LocalFileStorage(directory, read_only=True) as again:
        assert again.report.clean and dict(again.items()) == acknowledged
