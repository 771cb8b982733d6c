"""``logstate demo``: a counter that survives being killed with SIGKILL.

Owns: the demo's worker (counts the events of a deterministic synthetic
stream into a storage, acknowledging each event only after its write
returned) and its supervisor (kills the worker at random moments, restarts it,
and checks after each restart that the count resumed from the last
acknowledged event, then that no event was lost or counted twice).
Must never: reach below the public API (it shows what a user's service does).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Final, TextIO

from logstate.storage import LocalFileStorage

CATEGORIES: Final = ("click", "view", "scroll", "purchase", "share", "like", "error")
OFFSET_KEY: Final = "offset"
MARKER_KEY: Final = "demo"


class DemoRefusedError(Exception):
    """The demo will not run in the given directory."""


def event_category(seed: int, index: int) -> str:
    """The category of event ``index`` of the synthetic stream (deterministic)."""
    mixed = (index * 2654435761 + seed * 40503 + 12345) & 0xFFFFFFFF
    mixed ^= mixed >> 15
    return CATEGORIES[mixed % len(CATEGORIES)]


def run_worker(directory: str, seed: int, out: TextIO) -> None:
    """Count events from where the storage says we stopped; never returns on its own.

    Each event's counter and the stream offset are written as one atomic
    batch; "ack N" is printed only after that write returned, i.e. after the
    bytes are in the operating system (sync="none" survives a killed process).
    """
    storage = LocalFileStorage(directory, sync="none")
    offset = storage.get(OFFSET_KEY, 0)
    out.write(f"start {offset}\n")
    out.flush()
    index = offset
    while True:
        category = event_category(seed, index)
        key = "count:" + category
        count = storage.get(key, 0) + 1
        with storage.batch() as batch:
            batch.set(key, count)
            batch.set(OFFSET_KEY, index + 1)
        index += 1
        out.write(f"ack {index}\n")
        out.flush()  # an acknowledgement counts once the supervisor can read it
        if index % 64 == 0:
            time.sleep(0.001)  # a stream has gaps; also lets the kill land anywhere


def _prepare(directory: str, seed: int) -> None:
    """Start from an empty demo storage; refuse a directory that holds other data.

    A directory left by an earlier demo run (its root holds the demo's marker
    key) is removed first, so every run starts from an empty log.
    """
    if os.path.isdir(directory) and os.listdir(directory):
        with LocalFileStorage(directory, auto_create_dir=False) as storage:
            is_demo = storage.contains_key(MARKER_KEY)
        if not is_demo:
            raise DemoRefusedError(
                f"{directory} holds data that is not the demo's; "
                "choose another directory with --dir"
            )
        shutil.rmtree(directory)
    with LocalFileStorage(directory) as storage:
        storage.set(MARKER_KEY, {"seed": seed})
        storage.flush()


def _read_lines(stream: TextIO, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.strip())


def _spawn(directory: str, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "logstate", "demo-worker", directory, "--seed", str(seed)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "0"},
    )


def run_demo(directory: str, restarts: int, seed: int, out: TextIO) -> bool:
    """Run the supervisor; print one line per restart and a verdict; True if nothing was lost."""
    rng = random.Random(seed)
    _prepare(directory, seed)
    out.write(
        f"logstate demo: counting a synthetic event stream into {directory}; "
        f"the worker is killed with SIGKILL {restarts} times\n"
    )
    last_ack = 0
    ok = True
    for run in range(restarts + 1):
        lines: list[str] = []
        worker = _spawn(directory, seed)
        assert worker.stdout is not None
        reader = threading.Thread(target=_read_lines, args=(worker.stdout, lines), daemon=True)
        reader.start()
        # let it start and work for a random while, then kill it mid-stream
        deadline = time.monotonic() + 10.0
        while not lines and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.01)
        if not lines or not lines[0].startswith("start "):
            worker.kill()
            worker.wait()
            out.write(f"worker failed to start (exit code {worker.returncode})\n")
            return False
        resumed = int(lines[0].split()[1])
        if run == 0:
            out.write(f"run 0: worker started at event {resumed}\n")
        else:
            # sync="none" writes reach the OS before "ack": a SIGKILL loses
            # nothing acknowledged; the one in flight may or may not be there.
            verdict = "ok" if resumed in (last_ack, last_ack + 1) else "EVENTS LOST"
            ok = ok and verdict == "ok"
            out.write(
                f"restart {run}: worker was killed after acknowledging event {last_ack}; "
                f"count resumed at {resumed} ({verdict})\n"
            )
        if run == restarts:
            time.sleep(rng.uniform(0.2, 0.6))
        else:
            time.sleep(rng.uniform(0.3, 1.2))
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        reader.join()
        acks = [int(line.split()[1]) for line in lines if line.startswith("ack ")]
        if acks:
            last_ack = acks[-1]
        out.flush()
    # Final audit: counters must equal a recount of the stream up to the offset.
    with LocalFileStorage(directory) as storage:
        offset = storage.get(OFFSET_KEY, 0)
        stored = {c: storage.get("count:" + c, 0) for c in CATEGORIES}
    expected = Counter(event_category(seed, i) for i in range(offset))
    lost = max(0, last_ack - offset)
    double = sum(max(0, stored[c] - expected[c]) for c in CATEGORIES)
    missing = sum(max(0, expected[c] - stored[c]) for c in CATEGORIES)
    ok = ok and lost == 0 and double == 0 and missing == 0
    out.write(
        f"verdict: {restarts} restarts, {offset} events counted, events lost = {lost + missing}, "
        f"counted twice = {double} -> {'OK' if ok else 'FAILED'}\n"
    )
    out.flush()
    return ok
