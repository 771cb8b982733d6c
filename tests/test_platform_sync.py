"""Platform-dependent syncs and the POSIX requirement.

Where ``fcntl`` has ``F_FULLFSYNC`` (macOS), every fsync and fdatasync is an
``F_FULLFSYNC`` (plain ``fsync`` does not flush the drive's cache there),
falling back to ``fsync`` only when the file system does not support it.
Without ``fcntl`` (Windows) ``import logstate`` fails naming the POSIX
requirement. We run on Linux: the macOS selection is tested by substitution.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from logstate import _fs

F_FULLFSYNC = 51  # its value on macOS; Linux's fcntl has no such constant


class Calls:
    """Records fcntl.fcntl and os.fsync calls; fcntl fails with ``error`` when set."""

    def __init__(self, error: int | None = None) -> None:
        self.error = error
        self.fcntl: list[tuple[int, int]] = []
        self.fsync: list[int] = []

    def fake_fcntl(self, fd: int, command: int, *args: object) -> int:
        self.fcntl.append((fd, command))
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        return 0

    def fake_fsync(self, fd: int) -> None:
        self.fsync.append(fd)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    recorder = Calls()
    monkeypatch.setattr(fcntl, "fcntl", recorder.fake_fcntl)  # the module _fs calls
    monkeypatch.setattr(os, "fsync", recorder.fake_fsync)
    return recorder


def test_without_f_fullfsync_the_plain_fsync_and_fdatasync_are_used() -> None:
    fsync, fdatasync = _fs.sync_functions(None)
    assert fsync is os.fsync
    assert fdatasync is getattr(os, "fdatasync", os.fsync)
    if not hasattr(fcntl, "F_FULLFSYNC"):  # Linux: what the module chose at import
        assert (_fs._fsync, _fs._fdatasync) == (fsync, fdatasync)


def test_with_f_fullfsync_every_sync_of_the_file_system_is_a_full_fsync(
    calls: Calls, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fsync, fdatasync = _fs.sync_functions(F_FULLFSYNC)
    monkeypatch.setattr(_fs, "_fsync", fsync)
    monkeypatch.setattr(_fs, "_fdatasync", fdatasync)
    fs = _fs.FileSystem()
    fd = fs.create_file(str(tmp_path / "f"))
    try:
        fs.fsync(fd)
        fs.fdatasync(fd)
    finally:
        fs.close(fd)
    fs.fsync_dir(str(tmp_path))
    fs.write_new_file(str(tmp_path / "g"), b"data")
    assert [command for _fd, command in calls.fcntl] == [F_FULLFSYNC] * 4
    assert calls.fcntl[0][0] == fd and calls.fcntl[1][0] == fd
    assert calls.fsync == []


@pytest.mark.parametrize(
    "error",
    [errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY],
    ids=["ENOTSUP", "EOPNOTSUPP", "EINVAL", "ENOTTY"],
)
def test_full_fsync_unsupported_by_the_file_system_falls_back_to_fsync(
    calls: Calls, error: int
) -> None:
    calls.error = error
    fsync, fdatasync = _fs.sync_functions(F_FULLFSYNC)
    fsync(7)
    fdatasync(8)
    assert calls.fcntl == [(7, F_FULLFSYNC), (8, F_FULLFSYNC)]
    assert calls.fsync == [7, 8]


@pytest.mark.parametrize(
    "error", [errno.EIO, errno.ENOSPC, errno.EBADF], ids=["EIO", "ENOSPC", "EBADF"]
)
def test_full_fsync_io_error_is_raised_not_retried_as_fsync(calls: Calls, error: int) -> None:
    calls.error = error
    fsync, fdatasync = _fs.sync_functions(F_FULLFSYNC)
    for sync in (fsync, fdatasync):
        with pytest.raises(OSError) as info:
            sync(7)
        assert info.value.errno == error
    assert calls.fsync == []


def test_import_without_fcntl_fails_naming_the_posix_requirement() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["fcntl"] = None  # what Windows has: no fcntl module
        try:
            import logstate
        except ImportError as exc:
            print(type(exc).__name__, exc)
        else:
            print("imported")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("ImportError "), line
    assert "POSIX" in line and "Windows is not supported" in line
    assert "ModuleNotFoundError" not in line
