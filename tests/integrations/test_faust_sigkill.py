"""A Faust table on logstate survives SIGKILL: no torn batch, no offset ahead of its data.

A child process (``sys.executable``) builds a real Faust app and table on the
logstate store and applies changelog batches in a loop: batch ``i`` sets
every key of both partitions to ``i`` with changelog offset ``i``, and the
child prints ``i`` once ``apply_changelog_batch`` has returned. The parent
SIGKILLs it at a random moment, ~20 times, and after each kill opens the
table and checks, per partition: every key equals the persisted offset (a
batch is all there or not at all, offset included), the offset never goes
back, and it is at least the last acknowledged batch. Seeded; ~15 s here.

A second child writes as a table's agent does: ``_set`` of every key to
``i`` under a current stream event, then ``set_persisted_offset(tp, i)``
(what the changelog delivery callback does). After each kill every key is
at least the stored offset: the offset is never ahead of the data.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import faust
from faust.types import TP

from logstate.integrations.faust import Store

ROOT = str(Path(__file__).resolve().parents[2])
KILLS = 20
KILLS_OF_TABLE_WRITES = 8
STORE_URL = "logstate://?segment_size=32768"  # segment rolls (and compactions) under the kills
KEYS = [b"k%d" % n for n in range(12)] + [bytes([0xFF, n]) for n in range(0, 256, 64)]

CHILD = """
import sys
import faust
from faust.events import Event
from faust.types import TP
from faust.types.tuples import Message

datadir, url, mode = sys.argv[1], sys.argv[2], sys.argv[4]
keys = [bytes.fromhex(k) for k in sys.argv[3].split(",")]
app = faust.App("crash", broker="kafka://localhost:1", datadir=datadir, store=url)
table = app.Table("t", partitions=2)
tps = [TP(table.changelog_topic_name, p) for p in (0, 1)]
written = tps[:1] if mode == "writes" else tps
i = min(table.data.persisted_offset(tp) or 0 for tp in written) + 1
print("ready", flush=True)
if mode == "writes":
    import weakref
    from faust.streams import _current_event
    source = Message("source", 0, 0, 0.0, 0, None, b"s", b"s", None)
    event = Event(app, b"s", b"s", None, source)
    _current_event.set(weakref.ref(event))
    while True:
        for k in keys:
            table.data._set(k, b"%d" % i)
        table.data.set_persisted_offset(tps[0], i)
        print(i, flush=True)
        i += 1
while True:
    value = b"%d" % i
    table.apply_changelog_batch([
        Event(app, k, value, None,
              Message(tp.topic, tp.partition, i, 0.0, 0, None, k, value, None))
        for tp in tps for k in keys
    ])
    print(i, flush=True)
    i += 1
"""


def open_table(datadir: Path) -> tuple[Store, list[TP]]:
    app = faust.App("crash", broker="kafka://localhost:1", datadir=str(datadir), store=STORE_URL)
    table = app.Table("t", partitions=2)
    data = table.data
    assert isinstance(data, Store)
    return data, [TP(table.changelog_topic.topics[0], p) for p in (0, 1)]


def run_and_kill(datadir: Path, mode: str, rng: random.Random) -> list[int]:
    """Start the child in ``mode``, SIGKILL it at a random moment; its acknowledged ``i``."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(datadir),
            STORE_URL,
            ",".join(k.hex() for k in KEYS),
            mode,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.0, 0.08))
    child.send_signal(signal.SIGKILL)
    output, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return [int(line) for line in output.split()]


def test_changelog_batches_and_offsets_survive_sigkill_whole(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    previous: dict[TP, int] = {}
    acknowledged_total = 0
    started = time.monotonic()
    for _ in range(KILLS):
        acknowledged = run_and_kill(tmp_path, "batches", rng)
        acknowledged_total += len(acknowledged)

        data, tps = open_table(tmp_path)
        asyncio.run(data.on_recovery_completed(set(tps), set()))
        offsets = {tp: data.persisted_offset(tp) for tp in tps}
        for tp in tps:
            offset = offsets[tp]
            storage = data.partitions[tp.partition]
            values = {key: storage.get(key.decode("latin-1")) for key in KEYS}
            if offset is None:
                assert set(values.values()) == {None}, "data without its offset"
                continue
            assert set(values.values()) == {b"%d" % offset}, f"torn batch in {tp}: {values}"
            assert offset >= previous.get(tp, 0), "offset went back"
            if acknowledged:
                assert acknowledged[-1] <= offset <= acknowledged[-1] + 1
            previous[tp] = offset
        first, second = offsets[tps[0]], offsets[tps[1]]
        if first is not None and second is not None:
            assert first - second in (0, 1)  # partition 0's group is written first
        asyncio.run(data.on_stop())
    assert acknowledged_total > KILLS  # the kills landed while batches were being written
    assert time.monotonic() - started < 60


def test_table_writes_then_offset_never_leave_the_offset_ahead_of_the_data(
    tmp_path: Path,
) -> None:
    rng = random.Random(1201)
    previous = 0
    acknowledged_total = 0
    for _ in range(KILLS_OF_TABLE_WRITES):
        acknowledged = run_and_kill(tmp_path, "writes", rng)
        acknowledged_total += len(acknowledged)
        data, tps = open_table(tmp_path)
        offset = data.persisted_offset(tps[0])
        storage = data.partitions[0]
        values = [storage.get(key.decode("latin-1")) for key in KEYS]
        if offset is None:
            offset = 0
        else:
            assert offset >= previous, "offset went back"
        assert all(v is not None and int(v) >= offset for v in values), "offset ahead of data"
        if acknowledged:
            assert acknowledged[-1] <= offset <= acknowledged[-1] + 1
            assert all(v is not None and int(v) <= acknowledged[-1] + 2 for v in values)
        previous = offset
        asyncio.run(data.on_stop())
    assert acknowledged_total > KILLS_OF_TABLE_WRITES
