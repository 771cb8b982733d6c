"""SIGKILL through the Quix transaction path: no torn flush, offsets monotonic.

A child process runs Quix transactions on the logstate store (10 keys set to
``i``, flushed with changelog offset ``i``) and is killed with SIGKILL at
random times; after each kill the store is reopened and must hold all 10
keys equal to its changelog offset, never lower than after the previous kill.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from logstate.integrations.quixstreams import LogstateStore

ROOT = Path(__file__).resolve().parents[2]
KEYS = 10
KILLS = 24

_CHILD = """
import sys
from logstate.integrations.quixstreams import LogstateStore
store = LogstateStore(name="st", stream_id="t", base_dir=sys.argv[1], sync="none")
partition = store.assign_partition(0)
i = (partition.get_changelog_offset() or 0) + 1
print("ready", flush=True)
while True:
    tx = store.start_partition_transaction(0)
    state = tx.as_state(prefix=b"key")
    for k in range(10):
        state.set(f"k{k}", i)
    tx.prepare(processed_offsets={"input": i})
    tx.flush(changelog_offset=i)
    i += 1
"""


def _check(base_dir: str) -> int:
    store = LogstateStore(name="st", stream_id="t", base_dir=base_dir)
    store.assign_partition(0)
    offset = store.partitions[0].get_changelog_offset() or 0
    tx = store.start_partition_transaction(0)
    state = tx.as_state(prefix=b"key")
    values = [state.get(f"k{k}") for k in range(KEYS)]
    store.close()
    expected = [offset] * KEYS if offset else [None] * KEYS
    assert values == expected, f"torn flush at offset {offset}: {values}"
    return offset


def test_sigkill_mid_transactions_never_tears_a_flush(tmp_path: Path) -> None:
    rng = random.Random(7)
    base_dir = str(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    last = 0
    progressed = 0
    for _ in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", _CHILD, base_dir],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
        offset = _check(base_dir)
        assert offset >= last, f"changelog offset went back from {last} to {offset}"
        progressed += offset > last
        last = offset
    assert progressed >= KILLS // 2  # the kills did land mid-run, after real work
