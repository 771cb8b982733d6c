"""A replicated writer in its own process, for the failure tests (killed, paused, fenced).

Run: ``python tests/replication/_writer_proc.py DIR SERVERS PARTITION [options]``
(``SERVERS``: URLs joined by ``,``). It opens ``LocalFileStorage(DIR,
changelog=JetStreamChangelog(SERVERS, "STATE", PARTITION, ack=...),
sync="always")`` and commits rounds: round ``r`` is one InMemoryStorage
flush with ``checkpoint=r`` (some large enough to be chunked), resuming
after the checkpoint found at open. Every line it prints is flushed at once:

- ``open <local seq> <writer id> <epoch> <checkpoint round>`` after the open;
- ``ack <round> <seq>`` after a flush returned (async: durable here; sync:
  acknowledged by the broker too);
- ``error <round> <seq> <message>`` a flush raised ReplicationError;
- ``snap <seq>`` a ``replication_snapshot()`` returned;
- ``dying <point>`` just before it kills itself at ``--kill-at``;
- ``fenced <by writer> <first>-<last>|none`` a FencedError, with its
  ``kept_aside`` (then it exits 3);
- ``done <seq>`` after ``--rounds`` rounds and a clean close (exit 0).

``--kill-at POINT:N`` makes the process SIGKILL itself (a real kill -9, at
an exact place) the Nth time it reaches POINT: ``before-publish`` (a record
durable here, not sent), ``after-publish`` (stored in the stream, its ack
never seen), ``mid-chunks`` (before a chunk other than the first of a
chunked record: the stream holds part of it), ``mid-snapshot`` (inside the
snapshot upload, after its first chunk was read).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from logstate import InMemoryStorage, LocalFileStorage
from logstate.replication import (
    FencedError,
    JetStreamChangelog,
    ReplicationError,
    _client,
)

BIG_VALUE_SIZE = 30_000  # three of them: a group over a 64 KiB message, chunked


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def die(point: str) -> None:
    say(f"dying {point}")
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill_point(spec: str) -> None:
    """Make the process kill itself at the Nth ``point`` (see the module docstring)."""
    point, _, nth = spec.partition(":")
    target = int(nth or "1")
    seen = [0]

    def reached() -> bool:
        seen[0] += 1
        return seen[0] == target

    if point == "mid-snapshot":
        readinto = _client._FileReader.readinto

        def killing_readinto(self: Any, buffer: Any) -> int:
            if getattr(self, "_calls", 0) == 1 and reached():
                die(point)
            self._calls = getattr(self, "_calls", 0) + 1
            return readinto(self, buffer)

        _client._FileReader.readinto = killing_readinto  # type: ignore[method-assign]
        return
    if point not in ("before-publish", "after-publish", "mid-chunks"):
        raise SystemExit(f"unknown kill point {point!r}")
    publish_ack = _client.Client.publish_ack  # (what the shipper publishes with)

    def killing_publish_ack(
        self: Any, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float
    ) -> Any:
        records = headers.get("Logstate-Kind", "records") == "records" and "Logstate-Seq" in headers
        chunk = headers.get("Logstate-Chunk")
        if records and point == "before-publish" and reached():
            die(point)
        if records and point == "mid-chunks" and chunk and not chunk.startswith("0/") and reached():
            die(point)
        ack = publish_ack(self, subject, payload, headers, timeout_s)
        if records and point == "after-publish" and reached():
            die(point)
        return ack

    _client.Client.publish_ack = killing_publish_ack  # type: ignore[method-assign]


def commit_round(store: LocalFileStorage, rng: random.Random, round_: int, big: bool) -> None:
    memory = InMemoryStorage(store)
    for _ in range(rng.randint(1, 25)):
        key = f"k{rng.randrange(300)}"
        if rng.random() < 0.15:
            memory.pop(key, None)
        else:
            memory[key] = f"{round_}:" + "v" * rng.randrange(200)
    if big:
        for i in range(3):
            memory[f"big{i}"] = rng.randbytes(BIG_VALUE_SIZE)
    memory.flush(checkpoint=round_)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("servers")
    parser.add_argument("partition")
    parser.add_argument("--ack", default="async")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--big-every", type=int, default=7)
    parser.add_argument("--snapshot-every", type=int, default=0)
    parser.add_argument("--compact-every", type=int, default=0)
    parser.add_argument("--keep-snapshots", type=int, default=50)
    parser.add_argument("--restore", default=None)
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--pause-s", type=float, default=0.0, help="sleep between rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kill_at:
        install_kill_point(args.kill_at)
    changelog = JetStreamChangelog(
        args.servers.split(","),
        "STATE",
        args.partition,
        ack=args.ack,
        timeout=args.timeout,
        keep_snapshots=args.keep_snapshots,
    )
    store = LocalFileStorage(
        args.dir,
        changelog=changelog,
        restore=args.restore,
        sync="always",
        segment_size=64 * 1024,
        compress_min_size=None,
        auto_compact=False,
    )
    try:
        repl: Any = store.stats()["replication"]
        start = int(store.checkpoint or 0)
        say(f"open {store._engine.appender.seq} {repl['writer']} {repl['epoch']} {start}")
        for round_ in range(start + 1, start + 1 + args.rounds):
            rng = random.Random(args.seed * 1_000_003 + round_)
            try:
                commit_round(store, rng, round_, big=round_ % args.big_every == 0)
            except ReplicationError as exc:
                say(f"error {round_} {store._engine.appender.seq} {exc}")
            else:
                say(f"ack {round_} {store._engine.appender.seq}")
            if args.snapshot_every and round_ % args.snapshot_every == 0:
                info = store.replication_snapshot()
                say(f"snap {info['seq']}")
            if args.compact_every and round_ % args.compact_every == 0:
                store.compact()
            if args.pause_s:
                time.sleep(args.pause_s)
        store.close()
    except FencedError as exc:
        kept = exc.kept_aside
        say(f"fenced {exc.by_writer} {'none' if kept is None else f'{kept[0]}-{kept[1]}'}")
        store.close()
        return 3
    say(f"done {store._engine.appender.seq}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
