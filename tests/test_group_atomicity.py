"""A flush (one group record) survives a crash whole or not at all.

Two crash models:
- SIGKILL of a process that flushes in a loop, at random moments
  (LOGSTATE_LONG_TESTS=1 runs 200 kills; the default run is a short round);
- a torn write: the newest segment cut at every byte offset inside a group.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from logstate import LocalFileStorage
from logstate._filenames import segment_file_name
from logstate._format import GROUP_FLAG_ZSTD, REC_GROUP, RECORD_OVERHEAD

LONG = os.environ.get("LOGSTATE_LONG_TESTS") == "1"
KILLS = 200 if LONG else 16
K = 20  # keys set to the flush number by every flush

CHILD = r"""
import os, sys
from logstate import InMemoryStorage, LocalFileStorage
path, sync, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
backing = LocalFileStorage(path, sync=sync)
storage = InMemoryStorage(backing)
n = backing.checkpoint or 0
while True:
    n += 1
    for i in range(k):
        storage[f"k{i}"] = n
    storage.pop(f"tmp{n - 1}", None)
    storage[f"tmp{n}"] = n
    storage.flush(checkpoint=n)
    os.write(1, f"{n}\n".encode())
"""


def _verify(path: Path, acknowledged: int) -> int:
    """Open the store, check the flush invariants, return the flush number found."""
    with LocalFileStorage(path) as storage:
        storage._check()
        values = {storage.get(f"k{i}") for i in range(K)}
        if acknowledged == 0 and values == {None}:
            return 0
        assert len(values) == 1, f"torn group: keys carry different flush numbers {values}"
        (found,) = values
        assert isinstance(found, int)
        assert found >= acknowledged, f"flush {acknowledged} was acknowledged, found {found}"
        tmp_keys = [key for key in storage if key.startswith("tmp")]
        assert tmp_keys == [f"tmp{found}"], f"deleted keys came back: {tmp_keys}"
        assert storage.checkpoint == found, "checkpoint is not from the same group"
        return found


@pytest.mark.parametrize("sync", ["always", "none"])
def test_flush_survives_sigkill_whole_or_not_at_all(tmp_path: Path, sync: str) -> None:
    rng = random.Random(f"group-kill-{sync}")
    path = tmp_path / "store"
    acknowledged = 0
    last_found = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for _ in range(KILLS // 2):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), sync, str(K)],
            stdout=subprocess.PIPE,
            env=env,
        )
        time.sleep(rng.uniform(0.12, 0.35))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL, "the child must still be running when killed"
        lines = out.decode().split()
        if lines:
            acknowledged = int(lines[-1])
        found = _verify(path, acknowledged)
        assert found >= last_found
        last_found = found
    assert last_found > 0, "no flush completed in any round: the test did not exercise anything"


def _build_store(path: Path, compress: bool) -> tuple[int, int]:
    """A store whose newest record is a 5-op group; returns (group offset, group end)."""
    with LocalFileStorage(path, compress_min_size=0 if compress else None) as storage:
        storage.set("before", 1)
        with storage.batch() as batch:
            batch.set("before2", 2)
            batch.remove("absent")
        start = (path / segment_file_name(1)).stat().st_size
        with storage.batch() as batch:
            for i in range(4):
                batch.set(f"g{i}", str(i) * 64)
            batch.remove("before")
        end = (path / segment_file_name(1)).stat().st_size
    return start, end


@pytest.mark.parametrize("compress", [False, True])
def test_truncation_inside_a_group_never_exposes_part_of_it(tmp_path: Path, compress: bool) -> None:
    source = tmp_path / "source"
    start, end = _build_store(source, compress)
    assert end - start > 40
    data = (source / segment_file_name(1)).read_bytes()
    flags = data[start + RECORD_OVERHEAD]
    assert data[start + 8] == REC_GROUP and flags == (GROUP_FLAG_ZSTD if compress else 0)
    for cut in range(start, end + 1):
        target = tmp_path / f"cut{cut}"
        target.mkdir()
        (target / segment_file_name(1)).write_bytes(data[:cut])
        with LocalFileStorage(target) as storage:
            contents = {key: storage[key] for key in storage}
            storage._check()
        if cut == end:
            assert contents == {"before2": 2} | {f"g{i}": str(i) * 64 for i in range(4)}
        else:
            assert contents == {"before": 1, "before2": 2}, f"cut at {cut}: {contents}"
        shutil.rmtree(target)
