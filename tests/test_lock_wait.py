"""``LocalFileStorage(path, lock_timeout=s)``: waiting for another process to release a directory.

A partition handed over during a rebalance: the new owner opens the
directory while the old one is still closing it. With ``lock_timeout`` the
open waits (retrying, without blocking other opens in the process) and
succeeds once the holder is gone; after the timeout the error names the
holder's pid and the time waited, as without the wait.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from logstate import LocalFileStorage, StorageLockedError

HOLD_IN_CHILD = """
import sys
from logstate import LocalFileStorage
s = LocalFileStorage(sys.argv[1], sync="none")
s["held by"] = "child"
print("ready", flush=True)
sys.stdin.readline()
s["released by"] = "child"
s.close()
"""


def hold(directory: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_CHILD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


def release(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()


def test_open_waits_for_the_holder_to_close_then_sees_its_writes(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    child = hold(directory)
    try:
        timer = threading.Timer(0.3, release, [child])
        timer.start()
        started = time.monotonic()
        with LocalFileStorage(directory, sync="none", lock_timeout=30) as s:
            waited = time.monotonic() - started
            # the holder's last write, made after our open began, is there
            assert s["held by"] == "child" and s["released by"] == "child"
        assert waited >= 0.2  # it did wait (not a speed target: a lower bound)
        timer.join()
    finally:
        child.kill()
        child.wait()


def test_after_the_timeout_the_error_names_the_holder_and_the_wait(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    child = hold(directory)
    try:
        with pytest.raises(StorageLockedError) as caught:
            LocalFileStorage(directory, sync="none", lock_timeout=0.3)
        assert caught.value.pid == child.pid
        assert caught.value.waited_s >= 0.3
        assert str(child.pid) in str(caught.value) and "after waiting" in str(caught.value)
        # without a timeout: at once, no wait named
        with pytest.raises(StorageLockedError) as at_once:
            LocalFileStorage(directory, sync="none")
        assert at_once.value.waited_s == 0.0 and "waiting" not in str(at_once.value)
    finally:
        release(child)
        child.wait(timeout=60)
    with LocalFileStorage(directory, sync="none", lock_timeout=0) as s:
        assert s["released by"] == "child"


def test_a_waiting_open_does_not_block_other_opens_in_the_process(tmp_path: Path) -> None:
    held, free = tmp_path / "held", tmp_path / "free"
    child = hold(held)
    errors: list[BaseException] = []

    def wait_for_held() -> None:
        try:
            LocalFileStorage(held, sync="none", lock_timeout=1.0)
        except StorageLockedError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_held)
    try:
        waiter.start()
        time.sleep(0.1)
        with LocalFileStorage(free, sync="none") as s:  # while the other open waits
            s["k"] = 1
            assert waiter.is_alive()
        waiter.join()
        assert len(errors) == 1 and isinstance(errors[0], StorageLockedError)
    finally:
        release(child)
        child.wait(timeout=60)


@pytest.mark.parametrize(
    ("value", "error"),
    [("1", TypeError), (True, TypeError), (-1, ValueError), (float("nan"), ValueError),
     (float("inf"), ValueError)],
)
def test_bad_lock_timeout_is_refused_before_anything_is_opened(
    tmp_path: Path, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="lock_timeout"):
        LocalFileStorage(tmp_path / "store", lock_timeout=value)  # type: ignore[arg-type]
    assert not (tmp_path / "store").exists()
