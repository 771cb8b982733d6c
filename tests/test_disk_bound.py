"""Disk use of a hot store is bounded by its live data, not by the segment size.

Compaction covers sealed segments only; with the default 64 MiB segments a
small store under a steady overwrite load would fill a whole segment with
dead records before anything is reclaimed. The active segment is therefore
looked at every ``compact_min_size / 4`` bytes and sealed early when the
store is due for compaction (``Engine._roll_size``): disk use, measured as
every segment file plus a compaction's temporary output, stays within
``max(2 x live, compact_min_size) + compact_min_size`` with the default
options, at every moment sampled.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest

from logstate import LocalFileStorage
from logstate._options import DEFAULT_OPTIONS


def disk_bytes(directory: Path) -> int:
    """Bytes of every segment and temporary compaction output in ``directory``."""
    total = 0
    for entry in os.scandir(directory):
        if entry.name.endswith((".seg", ".tmp")):
            with contextlib.suppress(FileNotFoundError):  # deleted by the compaction meanwhile
                total += entry.stat().st_size
    return total


@pytest.mark.parametrize("keys", [20, 6_000])
def test_a_hot_store_stays_within_twice_its_live_data_plus_the_compaction_trigger(
    tmp_path: Path, keys: int
) -> None:
    value = b"v" * 200
    with LocalFileStorage(tmp_path, sync="none") as store:  # every other option the default
        engine = store._engine
        for k in range(keys):
            store[f"k{k}"] = value
        live = engine.stats()["live_bytes"]
        trigger = DEFAULT_OPTIONS.compact_min_size
        bound = max(2 * live, trigger) + trigger
        written = 0
        peak = 0
        i = 0
        while written < 6 * bound:  # several compactions' worth of dead records
            store[f"k{i % keys}"] = value
            written += 240
            i += 1
            if i % 500 == 0:
                peak = max(peak, disk_bytes(tmp_path))
        engine.wait_for_background_compaction()
        peak = max(peak, disk_bytes(tmp_path))
        assert engine.stats()["live_bytes"] == live
        assert peak <= bound, f"disk use reached {peak} bytes; bound {bound} (live {live})"
        assert len(store) == keys


def test_a_writer_is_held_back_while_the_compaction_is_requested_but_not_started(
    tmp_path: Path,
) -> None:
    # the compactor thread not scheduled yet: it does not hold the gate, and a
    # writer held back by the backlog must wait for it all the same
    with LocalFileStorage(tmp_path, sync="none", compact_min_size=4096) as store:
        scheduler = store._engine.scheduler
        lock = store._engine._lock
        with lock:
            scheduler.compacting = scheduler.backlog = True  # (as on_roll leaves them)
        assert not scheduler.gate.locked()
        held = threading.Thread(target=scheduler.hold_back)
        held.start()
        held.join(0.2)
        assert held.is_alive(), "the writer was let through before the compaction ran"
        with lock:
            scheduler.compacting = scheduler.backlog = False  # (as the compactor's end does)
        held.join(5.0)
        assert not held.is_alive()


def test_a_running_compaction_too_far_behind_holds_writers_back_between_rolls(
    tmp_path: Path,
) -> None:
    # with a compaction running, the active segment is not sealed early; every
    # step it grows past the trigger size by a whole step holds writers back
    with LocalFileStorage(tmp_path, sync="none", compact_min_size=1 << 20) as store:
        scheduler = store._engine.scheduler
        step = store._engine.appender.roll_step
        trigger = 1 << 20  # (live bytes are few: the minimum size is the trigger)
        with store._engine._lock:
            scheduler.on_step(trigger + step, 0, step)
            assert not scheduler.backlog  # no compaction running: nothing to wait for
            scheduler.compacting = True
            scheduler.on_step(trigger + step - 1, 0, step)
            assert not scheduler.backlog  # not a whole step behind yet
            scheduler.on_step(trigger + step, 0, step)
            assert scheduler.backlog
            scheduler.compacting = scheduler.backlog = False
