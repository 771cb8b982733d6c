"""Benchmarks of logstate against the stores its users would pick instead.

Regenerate docs/benchmarks.md (about 10 minutes on 2 cores)::

    python -m pip install -e '.[bench]' && python tools/bench.py --output docs/benchmarks.md

Smoke run (CI: small sizes, one repetition, asserts nothing about speed)::

    python tools/bench.py --quick

Workload (fixed seed): keys ``key-%08d``, 100-byte random values, each store in
a fresh directory, the median of ``--repeat`` runs (3 by default). The
throughput rows (set, get, durable-set, durable-set-4t, batch) run interleaved
(durable-set and durable-set-4t in the same rounds: their ratio is a target):
one repetition of every store per round, so that a slow spell of the machine
hits every store of the row. Peers are
those of the optional extra ``bench`` that import (semidbm, sqlitedict,
diskcache, lmdb, plyvel, rocksdict) and the stdlib ``dbm`` the machine has;
a peer that is missing is listed as such, never silently dropped.

Benchmarks (name: what is measured):

- ``set``: N single-key sets, each peer's default durability (logstate
  ``sync="none"``: every call is written to the OS, so it survives a killed
  process), ops/s.
- ``get``: N gets in random order after a close and reopen, ops/s.
- ``durable-set``: single-key sets that are on stable storage when the call
  returns (fsync per write), one thread; ``durable-set-4t``: the same from 4
  threads (logstate: group commit), ops/s.
- ``batch``: atomic commits of 1,000 keys, fsynced (logstate:
  ``InMemoryStorage.flush`` and ``batch()``; peers: transaction / write batch),
  keys/s.
- ``reopen``: time to open a store of N keys and read one key, s.
- ``reopen-crash``: the same open of logstate's large store after a crash:
  its ``index.snapshot`` is deleted before each open, so the open scans every
  segment (interleaved with the other large stores' plain reopen, which
  is what the ratio compares it with), s.
- ``overwrite``: 1M sets over 1,000 keys (``--quick``: 20k); bytes on disk
  (max while running, after close, after compaction where the store has it).
- ``rss``: resident memory added by a process holding N keys (open + every
  key's index in memory), bytes per key.
- ``--quix`` (a separate section, run alone): the Quix Streams store
  (``logstate.integrations.quixstreams``) against Quix's own RocksDBStore
  through Quix's transaction path: updates/s, recovery messages/s, reopen
  time, RSS growth, disk size (``python tools/bench.py --quix --repeat 5``).
- ``--replication`` (a separate section, run alone): shipping to NATS
  JetStream, its cost on flushes, and restore (``tools/bench_replication.py``
  describes the rows).

When logstate's C path is active (``logstate.native``), the set, get and
batch rows also show ``logstate (pure)`` (and ``... flush only (pure)``):
the same workload in a child process with ``LOGSTATE_PURE=1``, interleaved
with the others; ``logstate`` and the targets are the C path's.

Every row reports the ratio logstate/peer (for times and sizes: peer/logstate,
so above 1.0 means logstate is better in every column).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import logstate  # noqa: E402
from logstate import InMemoryStorage, LocalFileStorage  # noqa: E402
from logstate._filenames import SNAPSHOT_FILE_NAME  # noqa: E402

VALUE_SIZE = 100
SEED = 20261127


# ============================================================================ peers
class Store:
    """One open store of one kind: the operations the workloads need."""

    def set(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Kind:
    """A kind of store: how to open it (plain or durable) and commit a batch."""

    name = ""
    module = ""  # import name, to report a missing peer
    threads_ok = False  # may several threads write to one handle
    durable_ok = True

    def available(self) -> bool:
        try:
            __import__(self.module)
        except ImportError:
            return False
        return True

    def open(self, path: str, durable: bool = False) -> Store:
        raise NotImplementedError

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        """Write ``items`` atomically and durably."""
        raise NotImplementedError

    def compact(self, store: Store, path: str) -> bool:
        return False


class _LogstateStore(Store):
    def __init__(self, storage: LocalFileStorage) -> None:
        self.storage = storage
        self.set = storage.set  # type: ignore[method-assign]
        self.get = storage.get  # type: ignore[method-assign]

    def close(self) -> None:
        self.storage.close()


class LogstateKind(Kind):
    name = "logstate"
    module = "logstate"
    threads_ok = True

    def open(self, path: str, durable: bool = False) -> Store:
        return _LogstateStore(LocalFileStorage(path, sync="always" if durable else "none"))

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        assert isinstance(store, _LogstateStore)
        with store.storage.batch() as batch:
            for key, value in items:
                batch.set(key, value)
        store.storage.flush()

    def compact(self, store: Store, path: str) -> bool:
        assert isinstance(store, _LogstateStore)
        compact = getattr(store.storage, "compact", None)
        if compact is None:
            return False
        compact()
        return True


class LogstateMemoryKind(LogstateKind):
    """InMemoryStorage over a LocalFileStorage: only the batch workload differs."""

    name = "logstate InMemoryStorage"

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        assert isinstance(store, _LogstateStore)
        memory = getattr(store, "memory", None)
        if memory is None:
            memory = InMemoryStorage(store.storage)
            store.memory = memory  # type: ignore[attr-defined]
        for key, value in items:
            memory[key] = value
        memory.flush()


class _MappingStore(Store):
    def __init__(self, db: Any, on_set: Callable[[], None] | None = None) -> None:
        self.db = db
        self.on_set = on_set

    def set(self, key: str, value: bytes) -> None:
        self.db[key] = value
        if self.on_set is not None:
            self.on_set()

    def get(self, key: str) -> bytes:
        return self.db[key]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.db.close()


class SemidbmKind(Kind):
    name = "semidbm"
    module = "semidbm"

    def open(self, path: str, durable: bool = False) -> Store:
        import semidbm

        db = semidbm.open(path, "c")
        return _MappingStore(db, db.sync if durable else None)

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError("semidbm has no transactions")


class _SqliteDictStore(_MappingStore):
    def close(self) -> None:
        self.db.commit()
        self.db.close()


class SqlitedictKind(Kind):
    name = "sqlitedict"
    module = "sqlitedict"

    def open(self, path: str, durable: bool = False) -> Store:
        from sqlitedict import SqliteDict

        os.makedirs(path, exist_ok=True)
        # its default: no autocommit, one commit at close; durable: a commit per set
        db = SqliteDict(os.path.join(path, "db.sqlite"), autocommit=False, outer_stack=False)
        return _SqliteDictStore(db, db.commit if durable else None)

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        assert isinstance(store, _MappingStore)
        for key, value in items:
            store.db[key] = value
        store.db.commit()


class DiskcacheKind(Kind):
    name = "diskcache"
    module = "diskcache"

    def open(self, path: str, durable: bool = False) -> Store:
        import diskcache

        cache = diskcache.Cache(path, sqlite_synchronous=2 if durable else 1)
        return _MappingStore(cache)

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        assert isinstance(store, _MappingStore)
        with store.db.transact():
            for key, value in items:
                store.db[key] = value


class _LmdbStore(Store):
    def __init__(self, env: Any) -> None:
        self.env = env

    def set(self, key: str, value: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), value)

    def get(self, key: str) -> bytes:
        with self.env.begin() as txn:
            return txn.get(key.encode())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.env.close()


class LmdbKind(Kind):
    name = "lmdb"
    module = "lmdb"
    threads_ok = True

    def open(self, path: str, durable: bool = False) -> Store:
        import lmdb

        env = lmdb.open(path, map_size=4 << 30, sync=durable, metasync=durable, lock=True)
        return _LmdbStore(env)

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        assert isinstance(store, _LmdbStore)
        with store.env.begin(write=True) as txn:
            for key, value in items:
                txn.put(key.encode(), value)
        store.env.sync(True)


class _PlyvelStore(Store):
    def __init__(self, db: Any, sync: bool) -> None:
        self.db = db
        self.sync = sync

    def set(self, key: str, value: bytes) -> None:
        self.db.put(key.encode(), value, sync=self.sync)

    def get(self, key: str) -> bytes:
        return self.db.get(key.encode())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.db.close()


class PlyvelKind(Kind):
    name = "plyvel (LevelDB)"
    module = "plyvel"
    threads_ok = True

    def open(self, path: str, durable: bool = False) -> Store:
        import plyvel

        return _PlyvelStore(plyvel.DB(path, create_if_missing=True), durable)

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        assert isinstance(store, _PlyvelStore)
        with store.db.write_batch(sync=True) as batch:
            for key, value in items:
                batch.put(key.encode(), value)


class _RdictStore(Store):
    def __init__(self, db: Any, write_options: Any) -> None:
        self.db = db
        self.write_options = write_options

    def set(self, key: str, value: bytes) -> None:
        self.db.put(key, value, self.write_options)

    def get(self, key: str) -> bytes:
        return self.db[key]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.db.close()


class RocksdictKind(Kind):
    name = "rocksdict (RocksDB)"
    module = "rocksdict"
    threads_ok = True

    def open(self, path: str, durable: bool = False) -> Store:
        import rocksdict

        options = rocksdict.WriteOptions()
        options.sync = durable
        return _RdictStore(rocksdict.Rdict(path), options)

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        import rocksdict

        assert isinstance(store, _RdictStore)
        batch = rocksdict.WriteBatch()
        for key, value in items:
            batch.put(key, value)
        options = rocksdict.WriteOptions()
        options.sync = True
        store.db.write(batch, options)


class DbmKind(Kind):
    name = "dbm.gnu"
    module = "dbm.gnu"

    def open(self, path: str, durable: bool = False) -> Store:
        import dbm.gnu

        os.makedirs(path, exist_ok=True)
        db = dbm.gnu.open(os.path.join(path, "db"), "c")  # noqa: SIM115 (closed by the Store)
        return _MappingStore(db, db.sync if durable else None)

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError("dbm has no transactions")


class ShelveKind(Kind):
    name = "shelve"
    module = "shelve"

    def open(self, path: str, durable: bool = False) -> Store:
        import shelve

        os.makedirs(path, exist_ok=True)
        db = shelve.open(os.path.join(path, "db"))  # noqa: SIM115 (closed by the Store)
        return _MappingStore(db, db.sync if durable else None)

    def batch(self, store: Store, items: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError("shelve has no transactions")


PEERS: list[Kind] = [
    SemidbmKind(),
    SqlitedictKind(),
    DiskcacheKind(),
    LmdbKind(),
    PlyvelKind(),
    RocksdictKind(),
    DbmKind(),
    ShelveKind(),
]
OURS = LogstateKind()
OURS_MEMORY = LogstateMemoryKind()


# ============================================================================ harness
@dataclass
class Row:
    bench: str
    store: str
    value: float | None
    unit: str
    note: str = ""


@dataclass
class Config:
    n: int
    n_large: int
    durable_n: int
    batches: int
    overwrite_n: int
    repeat: int
    peers: list[Kind]
    only: set[str] = field(default_factory=set)


@contextlib.contextmanager
def fresh_dir(base: str) -> Iterator[str]:
    path = tempfile.mkdtemp(dir=base)
    try:
        yield os.path.join(path, "store")
    finally:
        gc.collect()
        shutil.rmtree(path, ignore_errors=True)


def dataset(n: int) -> tuple[list[str], list[bytes]]:
    rng = random.Random(SEED)
    return [f"key-{i:08d}" for i in range(n)], [rng.randbytes(VALUE_SIZE) for _ in range(n)]


def median_of(repeat: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeat))


def disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def bench_set(kind: Kind, cfg: Config, base: str) -> Row:
    keys, values = dataset(cfg.n)

    def run() -> float:
        with fresh_dir(base) as path:
            store = kind.open(path)
            start = time.perf_counter()
            for key, value in zip(keys, values, strict=True):
                store.set(key, value)
            elapsed = time.perf_counter() - start
            store.close()
            return cfg.n / elapsed

    return Row("set", kind.name, median_of(cfg.repeat, run), "ops/s")


def bench_get(kind: Kind, cfg: Config, base: str) -> Row:
    keys, values = dataset(cfg.n)
    order = keys[:]
    random.Random(SEED + 1).shuffle(order)

    def run() -> float:
        with fresh_dir(base) as path:
            store = kind.open(path)
            for key, value in zip(keys, values, strict=True):
                store.set(key, value)
            store.close()
            store = kind.open(path)
            start = time.perf_counter()
            for key in order:
                store.get(key)
            elapsed = time.perf_counter() - start
            assert store.get(keys[7]) == values[7]
            store.close()
            return cfg.n / elapsed

    return Row("get", kind.name, median_of(cfg.repeat, run), "ops/s")


def bench_durable_set(kind: Kind, cfg: Config, base: str, threads: int) -> Row:
    name = "durable-set" if threads == 1 else f"durable-set-{threads}t"
    if threads > 1 and not kind.threads_ok:
        return Row(name, kind.name, None, "ops/s", "not thread-safe for writers")
    keys, values = dataset(cfg.durable_n)

    def run() -> float:
        with fresh_dir(base) as path:
            store = kind.open(path, durable=True)
            chunks = [list(range(t, cfg.durable_n, threads)) for t in range(threads)]

            def work(indexes: list[int]) -> None:
                for i in indexes:
                    store.set(keys[i], values[i])

            workers = [threading.Thread(target=work, args=(c,)) for c in chunks]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - start
            store.close()
            return cfg.durable_n / elapsed

    return Row(name, kind.name, median_of(cfg.repeat, run), "ops/s")


def bench_flush_only(cfg: Config, base: str) -> Row:
    """InMemoryStorage.flush() of 1,000 changed keys, timing the flush alone
    (the sets before it are dict writes at memory speed)."""
    keys, values = dataset(1000 * cfg.batches)

    def run() -> float:
        with fresh_dir(base) as path:
            backing = LocalFileStorage(path, sync="interval")
            memory = InMemoryStorage(backing)
            elapsed = 0.0
            for b in range(cfg.batches):
                for i in range(b * 1000, (b + 1) * 1000):
                    memory[keys[i]] = values[i]
                start = time.perf_counter()
                memory.flush()
                elapsed += time.perf_counter() - start
            backing.close()
            return len(keys) / elapsed

    return Row("batch", FLUSH_ONLY, median_of(cfg.repeat, run), "keys/s")


def bench_batch(kind: Kind, cfg: Config, base: str) -> Row:
    keys, values = dataset(1000 * cfg.batches)
    items = list(zip(keys, values, strict=True))

    def run() -> float:
        with fresh_dir(base) as path:
            store = kind.open(path, durable=False)
            start = time.perf_counter()
            for b in range(cfg.batches):
                kind.batch(store, items[b * 1000 : (b + 1) * 1000])
            elapsed = time.perf_counter() - start
            store.close()
            return len(items) / elapsed

    try:
        return Row("batch", kind.name, median_of(cfg.repeat, run), "keys/s")
    except NotImplementedError as exc:
        return Row("batch", kind.name, None, "keys/s", str(exc))


def bench_reopen(kind: Kind, cfg: Config, base: str, n: int) -> Row:
    keys, values = dataset(n)
    with fresh_dir(base) as path:
        store = kind.open(path)
        for key, value in zip(keys, values, strict=True):
            store.set(key, value)
        store.close()

        def run() -> float:
            gc.collect()
            start = time.perf_counter()
            store = kind.open(path)
            store.get(keys[n // 2])
            elapsed = time.perf_counter() - start
            store.close()
            return elapsed

        return Row(f"reopen-{n // 1000}k", kind.name, median_of(cfg.repeat, run), "s")


def bench_reopen_crash(kinds: list[Kind], cfg: Config, base: str, n: int) -> list[Row]:
    """Open of N keys after a crash (logstate: no index snapshot, a full scan),
    interleaved with the other stores' reopen: one open of each store per round."""
    keys, values = dataset(n)
    name = f"reopen-crash-{n // 1000}k"
    times: dict[str, list[float]] = {kind.name: [] for kind in kinds}
    with contextlib.ExitStack() as stack:
        paths: dict[str, str] = {}
        for kind in kinds:
            path = paths[kind.name] = stack.enter_context(fresh_dir(base))
            store = kind.open(path)
            for key, value in zip(keys, values, strict=True):
                store.set(key, value)
            store.close()
        for _ in range(cfg.repeat):
            for kind in kinds:
                path = paths[kind.name]
                if kind is OURS:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(path, SNAPSHOT_FILE_NAME))
                gc.collect()
                start = time.perf_counter()
                store = kind.open(path)
                store.get(keys[n // 2])
                times[kind.name].append(time.perf_counter() - start)
                store.close()
    return [Row(name, kind.name, statistics.median(times[kind.name]), "s") for kind in kinds]


def bench_overwrite(kind: Kind, cfg: Config, base: str) -> list[Row]:
    rng = random.Random(SEED + 2)
    values = [rng.randbytes(VALUE_SIZE) for _ in range(1000)]
    live = 1000 * (len("key-00000000") + VALUE_SIZE)
    with fresh_dir(base) as path:
        store = kind.open(path)
        peak = 0
        for i in range(cfg.overwrite_n):
            store.set(f"key-{i % 1000:08d}", values[(i * 7) % 1000])
            if i % 20000 == 0:
                peak = max(peak, disk_bytes(path))
        peak = max(peak, disk_bytes(path))
        store.close()
        after_close = disk_bytes(path)
        store = kind.open(path)
        compacted = kind.compact(store, path)
        store.close()
        after_compaction = disk_bytes(path) if compacted else None
    note = f"live data {live:,} B"
    return [
        Row("overwrite-disk-peak", kind.name, peak / live, "x live", note),
        Row("overwrite-disk-closed", kind.name, after_close / live, "x live", note),
        Row(
            "overwrite-disk-compacted",
            kind.name,
            None if after_compaction is None else after_compaction / live,
            "x live",
            note if after_compaction is not None else "no compaction",
        ),
    ]


RSS_CHILD = r"""
import os, sys, gc, resource
sys.path.insert(0, sys.argv[4])
sys.setrecursionlimit(10000)
from tools.bench import KINDS_BY_NAME
kind = KINDS_BY_NAME[sys.argv[1]]
path, n = sys.argv[2], int(sys.argv[3])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
keys = [f"key-{i:08d}" for i in range(n)]
gc.collect()
before = rss()
store = kind.open(path)
store.get(keys[n // 2])
gc.collect()
print(rss() - before)
store.close()
"""


def bench_rss(kind: Kind, cfg: Config, base: str, n: int) -> Row:
    keys, values = dataset(n)
    with fresh_dir(base) as path:
        store = kind.open(path)
        for key, value in zip(keys, values, strict=True):
            store.set(key, value)
        store.close()
        out = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, kind.name, path, str(n), ROOT],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return Row(f"rss-{n // 1000}k", kind.name, int(out.strip()) / n, "B/key")


KINDS_BY_NAME = {k.name: k for k in [OURS, OURS_MEMORY, *PEERS]}


# ============================================================================ report
LARGE_PEERS = {"logstate", "semidbm", "lmdb", "plyvel", "rocksdict"}
HIGHER_IS_BETTER = {"ops/s": True, "keys/s": True, "s": False, "x live": False, "B/key": False}


def run_all(cfg: Config, base: str, log: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    kinds = [OURS, *cfg.peers]

    def want(name: str) -> bool:
        return not cfg.only or name in cfg.only

    def each(name: str, fn: Callable[[Kind], Row | list[Row]], which: list[Kind]) -> None:
        if not want(name):
            return
        for kind in which:
            log(f"{name}: {kind.name} ...")
            try:
                result = fn(kind)
            except Exception as exc:  # a peer failing must not hide the others
                result = Row(name, kind.name, None, "", f"failed: {exc!r:.80}")
            rows.extend(result if isinstance(result, list) else [result])

    def interleaved(
        name: str,
        fn: Callable[[Kind, Config], Row],
        which: list[Kind],
        extra: Callable[[Config], Row] | None = None,
        pure: list[tuple[str, str]] = [],  # noqa: B006 (never changed)
        paired: tuple[str, Callable[[Kind, Config], Row]] | None = None,
    ) -> None:
        """Like ``each``, but one repetition of every store per round, ``cfg.repeat``
        rounds: a slow spell of the machine (this VM varies by +-20%) then hits
        every store of the row, not only the one that happened to run in it.
        ``paired``: a second row (name, fn) run in the same rounds, after the
        first row's stores (a target that is the ratio of the two rows then
        compares repetitions made at the same time)."""
        names = [n for n in [name, *([paired[0]] if paired else [])] if want(n)]
        if not names:
            return
        once = dataclasses.replace(cfg, repeat=1)
        values: dict[tuple[str, str], list[float]] = {}
        failed: dict[tuple[str, str], Row] = {}
        template: dict[tuple[str, str], Row] = {}
        for round_number in range(cfg.repeat):
            jobs: list[tuple[str, str, Callable[[], Row]]] = []
            for row_name, row_fn in [(name, fn), *([paired] if paired else [])]:
                if row_name not in names:
                    continue
                jobs += [
                    (row_name, kind.name, functools.partial(row_fn, kind, once)) for kind in which
                ]
            if extra is not None:
                jobs.append((name, FLUSH_ONLY, lambda: extra(once)))
            for store, child_bench in pure if logstate.native else []:
                pure_job = functools.partial(bench_pure, child_bench, store, once, base)
                jobs.append((name, store, pure_job))
            for row_name, store, job in jobs:
                if (row_name, store) in failed:
                    continue
                log(f"{row_name}: {store} (round {round_number + 1}/{cfg.repeat}) ...")
                try:
                    row = job()
                except Exception as exc:  # a peer failing must not hide the others
                    failed[row_name, store] = Row(row_name, store, None, "", f"failed: {exc!r:.80}")
                    continue
                template[row_name, store] = row
                if row.value is not None:
                    values.setdefault((row_name, store), []).append(row.value)
        pure_stores = [store for store, _bench in pure] if logstate.native else []
        for row_name in names:
            stores = [*(k.name for k in which)]
            if row_name == name:
                stores += [*([FLUSH_ONLY] if extra else []), *pure_stores]
            for store in stores:
                if (row_name, store) in failed:
                    rows.append(failed[row_name, store])
                    continue
                row = template[row_name, store]
                got = values.get((row_name, store))
                rows.append(dataclasses.replace(row, value=statistics.median(got) if got else None))

    interleaved("set", lambda k, c: bench_set(k, c, base), kinds, pure=[(PURE, "set")])
    interleaved("get", lambda k, c: bench_get(k, c, base), kinds, pure=[(PURE, "get")])
    interleaved(
        "durable-set",
        lambda k, c: bench_durable_set(k, c, base, 1),
        kinds,
        paired=("durable-set-4t", lambda k, c: bench_durable_set(k, c, base, 4)),
    )
    interleaved(
        "batch",
        lambda k, c: bench_batch(k, c, base),
        [OURS_MEMORY, *kinds],
        extra=lambda c: bench_flush_only(c, base),
        pure=[(FLUSH_ONLY_PURE, "flush-only")],
    )
    # the million-operation workloads: logstate and the fast peers only (the
    # SQLite-based stores and shelve take minutes each there, and no target
    # names them)
    fast = [k for k in kinds if k.name.split()[0] in LARGE_PEERS]
    each("reopen", lambda k: bench_reopen(k, cfg, base, cfg.n), kinds)
    each("reopen-large", lambda k: bench_reopen(k, cfg, base, cfg.n_large), fast)
    if want("reopen-crash"):
        log("reopen-crash: interleaved ...")
        rows.extend(bench_reopen_crash(fast, cfg, base, cfg.n_large))
    each("overwrite", lambda k: bench_overwrite(k, cfg, base), fast)
    each("rss", lambda k: bench_rss(k, cfg, base, cfg.n), kinds)
    each("rss-large", lambda k: bench_rss(k, cfg, base, cfg.n_large), fast)
    return rows


def ratio(ours: float | None, peer: float | None, unit: str) -> str:
    if ours is None or peer is None or ours == 0 or peer == 0:
        return ""
    value = ours / peer if HIGHER_IS_BETTER.get(unit, True) else peer / ours
    return f"{value:.2f}"


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit in ("ops/s", "keys/s"):
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value:.3f}"
    return f"{value:,.2f}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_kib / 1024 / 1024:.0f} GiB RAM; "
        f"Linux {platform.release()}; Python {platform.python_version()}; "
        f"logstate {logstate.__version__}"
    )


FLUSH_ONLY = "logstate InMemoryStorage.flush only"
PURE = "logstate (pure)"
FLUSH_ONLY_PURE = FLUSH_ONLY + " (pure)"


def bench_pure(bench: str, store: str, cfg: Config, base: str) -> Row:
    """One run of ``bench`` ("set", "get", "flush-only") by logstate's pure
    Python path: this script in a child process with LOGSTATE_PURE=1."""
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--pure-child",
            f"{bench},{cfg.n},{cfg.durable_n},{cfg.batches},{base}",
        ],
        env={**os.environ, "LOGSTATE_PURE": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name, value, unit = out.strip().split("\t")
    return Row(name, store, float(value), unit)


def _pure_child(spec: str) -> int:
    """The child of :func:`bench_pure`: one run, printed as ``bench\tvalue\tunit``."""
    bench, n, durable_n, batches, base = spec.split(",", 4)
    assert not logstate.native, "the child must run the pure Python path"
    cfg = Config(int(n), int(n), int(durable_n), int(batches), 0, 1, [])
    if bench == "set":
        row = bench_set(OURS, cfg, base)
    elif bench == "get":
        row = bench_get(OURS, cfg, base)
    else:
        row = bench_flush_only(cfg, base)
    print(f"{row.bench}\t{row.value}\t{row.unit}")
    return 0


def _value(rows: list[Row], bench: str, store: str) -> float | None:
    return next((r.value for r in rows if r.bench == bench and r.store == store), None)


def targets(rows: list[Row], cfg: Config) -> list[str]:
    """The issue's targets, each as measured ratio vs goal (from this run's rows)."""
    large = f"{cfg.n_large // 1000}k"

    def line(name: str, value: float | None, goal: str, ok: bool | None) -> str:
        shown = "n/a" if value is None else f"{value:.2f}"
        verdict = "" if ok is None else ("met" if ok else "NOT met")
        return f"| {name} | {shown} | {goal} | {verdict} |"

    def rel(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    ours = OURS.name
    out = ["| target | measured | goal | |", "|---|---:|---|---|"]
    v = rel(_value(rows, "set", ours), _value(rows, "set", "semidbm"))
    out.append(line("set vs semidbm", v, ">= 1.0", None if v is None else v >= 1.0))
    v = rel(_value(rows, "get", ours), _value(rows, "get", "semidbm"))
    out.append(line("get vs semidbm", v, ">= 1.0", None if v is None else v >= 1.0))
    v = rel(_value(rows, "batch", FLUSH_ONLY), _value(rows, "batch", "plyvel (LevelDB)"))
    out.append(
        line(
            "InMemoryStorage.flush vs plyvel write_batch(sync)",
            v,
            ">= 0.7",
            None if v is None else v >= 0.7,
        )
    )
    v = rel(_value(rows, "durable-set-4t", ours), _value(rows, "durable-set", ours))
    out.append(line("durable set, 4 threads vs 1", v, ">= 2.5", None if v is None else v >= 2.5))
    v = rel(_value(rows, f"reopen-{large}", ours), _value(rows, f"reopen-{large}", "semidbm"))
    out.append(
        line(f"reopen {large}: time vs semidbm", v, "<= 0.5", None if v is None else v <= 0.5)
    )
    v = rel(_value(rows, f"reopen-crash-{large}", ours), _value(rows, f"reopen-{large}", "semidbm"))
    if v is None:  # this run had no reopen row: the crash row's own semidbm reopen
        v = rel(
            _value(rows, f"reopen-crash-{large}", ours),
            _value(rows, f"reopen-crash-{large}", "semidbm"),
        )
    out.append(
        line(
            f"open {large} after a crash (no snapshot): time vs semidbm reopen",
            v,
            "<= 0.3",
            None if v is None else v <= 0.3,
        )
    )
    v = _value(rows, "overwrite-disk-compacted", ours)
    out.append(
        line("disk after compaction / live data", v, "<= 2.0", None if v is None else v <= 2.0)
    )
    v = rel(_value(rows, f"rss-{large}", ours), _value(rows, f"rss-{large}", "semidbm"))
    out.append(
        line(f"RSS per key at {large} vs semidbm", v, "<= 1.0", None if v is None else v <= 1.0)
    )
    return out


def report(rows: list[Row], cfg: Config, command: str, missing: list[str]) -> str:
    def is_ours(store: str) -> bool:
        return store.startswith("logstate")

    ours = {r.bench: r for r in rows if r.store == OURS.name}
    lines = [
        f"Machine: {machine()}",
        "",
        f"Command: `{command}`",
        "",
        f"logstate: {'the C path (logstate._cnative)' if logstate.native else 'pure Python'}"
        + (f"; `{PURE}` rows: the pure Python path (LOGSTATE_PURE=1)" if logstate.native else ""),
        "",
        f"Sizes: N = {cfg.n:,} keys (large: {cfg.n_large:,}), durable sets = {cfg.durable_n:,}, "
        f"batches = {cfg.batches} x 1,000 keys, overwrite = {cfg.overwrite_n:,} sets over "
        f"1,000 keys, median of {cfg.repeat}.",
        "",
        *targets(rows, cfg),
        "",
        "| benchmark | store | value | unit | logstate vs peer | note |",
        "|---|---|---:|---|---:|---|",
    ]
    for r in rows:
        reference = ours.get(r.bench)
        if r.bench == "batch":
            reference = next(
                (x for x in rows if x.bench == "batch" and x.store == FLUSH_ONLY), reference
            )
        rel = (
            "" if is_ours(r.store) or reference is None else ratio(reference.value, r.value, r.unit)
        )
        value = fmt_value(r.value, r.unit)
        lines.append(f"| {r.bench} | {r.store} | {value} | {r.unit} | {rel} | {r.note} |")
    if missing:
        lines += ["", f"Peers not installed (not measured): {', '.join(missing)}."]
    lines += [
        "",
        "Ratios: above 1.00 means logstate is better (faster, smaller). For `batch`, peers",
        "are compared with `logstate InMemoryStorage.flush only` (the flush of 1,000 changed",
        "keys, atomic and fsynced, timed alone); `logstate InMemoryStorage` also times the",
        "1,000 dict writes before each flush, `logstate` a `batch()` plus `flush()`.",
    ]
    return "\n".join(lines) + "\n"


# ============================================================================ Quix Streams
# A separate section (``--quix``): the logstate Quix Streams store against Quix's
# own RocksDBStore, through Quix's transaction path. Each (store, round) runs in
# a child process (RSS growth is that child's), rounds interleaved.
QUIX_CHILD = r"""
import json, os, random, sys, time
sys.path.insert(0, sys.argv[5])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
kind, base, txs, per_tx = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
keys_n = 5000
from quixstreams.state.rocksdb import RocksDBOptions, RocksDBStore
from logstate.integrations.quixstreams import LogstateStore
def make():
    if kind == "rocksdb":
        return RocksDBStore(name="bench", stream_id="t", base_dir=base)
    return LogstateStore(name="bench", stream_id="t", base_dir=base)
rng = random.Random(20261201)
before = rss()
store = make()
store.assign_partition(0)
started = time.perf_counter()
for i in range(1, txs + 1):
    tx = store.start_partition_transaction(0)
    state = tx.as_state(prefix=b"user-key")
    for _ in range(per_tx):
        key = f"k{rng.randrange(keys_n)}"
        value = state.get(key) or {"count": 0, "sum": 0.0, "last": ""}
        value["count"] += 1
        value["sum"] += 1.5
        value["last"] = f"e{i:08d}"
        state.set(key, value)
    tx.prepare(processed_offsets={"input": i})
    tx.flush(changelog_offset=i)
elapsed = time.perf_counter() - started
grown = rss() - before
store.close()
disk = 0
for root, _dirs, files in os.walk(base):
    disk += sum(os.path.getsize(os.path.join(root, f)) for f in files)
started = time.perf_counter()
store = make()
partition = store.assign_partition(0)
assert partition.get_changelog_offset() == txs
store.start_partition_transaction(0).as_state(prefix=b"user-key").get("k1")
reopen_s = time.perf_counter() - started
if kind == "logstate":
    partition.storage.compact()  # what auto-compaction does once a segment rolls
store.close()
compacted = 0
for root, _dirs, files in os.walk(base):
    compacted += sum(os.path.getsize(os.path.join(root, f)) for f in files)
# recovery: the same number of changelog messages into a fresh partition, as Quix's
# RecoveryPartition hands them over (one call each), then complete_recovery()
messages = [(f'user-key|"k{rng.randrange(keys_n)}"'.encode(),
             b'{"count":%d,"sum":%d.5,"last":"e%08d"}' % (n, n, n)) for n in range(txs * per_tx)]
base = os.path.join(base, "recovered")
store = make()
partition = store.assign_partition(0)
started = time.perf_counter()
for offset, (key, value) in enumerate(messages):
    partition.recover_from_changelog_message(key=key, value=value, cf_name="default",
                                             offset=offset)
partition.complete_recovery()
recovery_rate = len(messages) / (time.perf_counter() - started)
assert partition.get_changelog_offset() == len(messages) - 1
store.close()
print(json.dumps({"rate": txs * per_tx / elapsed, "reopen_s": reopen_s, "rss": grown,
                  "disk": disk, "disk_compacted": compacted, "recovery": recovery_rate}))
"""
QUIX_KINDS = ("logstate", "rocksdb")


def bench_quix(
    base: str, txs: int, per_tx: int, repeat: int, log: Callable[[str], None]
) -> list[Row]:
    """Key updates/s, recovery messages/s, reopen time, RSS growth and disk size:
    logstate's Quix store vs Quix's RocksDBStore (``txs`` transactions of ``per_tx``
    read-modify-write updates of ~60-byte JSON values over 5,000 keys, each flushed
    with a changelog offset; then as many changelog messages recovered into a fresh
    partition)."""
    got: dict[str, dict[str, list[float]]] = {k: {} for k in QUIX_KINDS}
    for round_number in range(repeat):
        for kind in QUIX_KINDS:
            log(f"quix: {kind} (round {round_number + 1}/{repeat}) ...")
            with fresh_dir(base) as path:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-W",
                        "ignore",
                        "-c",
                        QUIX_CHILD,
                        kind,
                        path,
                        str(txs),
                        str(per_tx),
                        ROOT,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            import json

            for name, value in json.loads(out.strip().splitlines()[-1]).items():
                got[kind].setdefault(name, []).append(value)
    rows = []
    for kind in QUIX_KINDS:
        med = {name: statistics.median(v) for name, v in got[kind].items()}
        rows.append(Row("quix-updates", kind, med["rate"], "ops/s"))
        rows.append(Row("quix-recovery", kind, med["recovery"], "ops/s"))
        rows.append(Row("quix-reopen", kind, med["reopen_s"], "s"))
        rows.append(Row("quix-rss-growth", kind, med["rss"] / 2**20, "MiB"))
        rows.append(Row("quix-disk", kind, med["disk"] / 2**20, "MiB"))
        rows.append(Row("quix-disk-compacted", kind, med["disk_compacted"] / 2**20, "MiB"))
    return rows


def quix_report(rows: list[Row], command: str, txs: int, per_tx: int, repeat: int) -> str:
    """The Quix section as a markdown table, with the ratio logstate/RocksDB per row."""
    lines = [
        f"Quix Streams store, {txs} transactions x {per_tx} read-modify-write updates over "
        f"5,000 keys (JSON ~60 B), changelog offset per flush; median of {repeat} "
        "interleaved rounds, each in a fresh child process.",
        "",
        f"Machine: {machine()}",
        f"Command: `{command}`",
        "",
        "| benchmark | logstate | RocksDBStore | ratio (above 1.0: logstate better) |",
        "|---|---|---|---|",
    ]
    by = {(r.bench, r.store): r for r in rows}
    for bench in (
        "quix-updates",
        "quix-recovery",
        "quix-reopen",
        "quix-rss-growth",
        "quix-disk",
        "quix-disk-compacted",
    ):
        ours, peer = by[(bench, "logstate")], by[(bench, "rocksdb")]
        assert ours.value is not None and peer.value is not None
        better = ours.value / peer.value if ours.unit == "ops/s" else peer.value / ours.value
        lines.append(
            f"| {bench} | {ours.value:,.3f} {ours.unit} | {peer.value:,.3f} {peer.unit} "
            f"| {better:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _main_replication(args: argparse.Namespace, argv: list[str] | None) -> int:
    from tools import bench_replication as repl

    cfg = repl.ReplicationConfig.make(args.quick, args.repeat)
    only = {x for x in args.only.split(",") if x}
    base = tempfile.mkdtemp(prefix="logstate-bench-", dir=args.tmp)
    try:
        rows = repl.run_replication(
            cfg, base, lambda msg: print(msg, file=sys.stderr, flush=True), only
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = repl.replication_report(rows, cfg, command.strip())
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--peers", default="", help="comma-separated peer names (default: all)")
    parser.add_argument("--output", help="write the markdown table to this file")
    parser.add_argument(
        "--tmp", default=None, help="directory for the stores (default: system tmp)"
    )
    parser.add_argument(
        "--quix",
        action="store_true",
        help="only the Quix Streams section (logstate vs RocksDBStore)",
    )
    parser.add_argument("--pure-child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--replication",
        action="store_true",
        help="only the replication section (tools/bench_replication.py)",
    )
    args = parser.parse_args(argv)
    if args.pure_child:
        return _pure_child(args.pure_child)
    if args.replication:
        return _main_replication(args, argv)
    if args.quix:
        txs, per_tx, repeat = (200, 20, 1) if args.quick else (2000, 20, args.repeat or 3)
        base = tempfile.mkdtemp(prefix="logstate-bench-", dir=args.tmp)
        try:
            quix_rows = bench_quix(base, txs, per_tx, repeat, lambda m: print(m, file=sys.stderr))
        finally:
            shutil.rmtree(base, ignore_errors=True)
        command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = quix_report(quix_rows, command.strip(), txs, per_tx, repeat)
        print(text)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        return 0
    if args.quick:
        cfg = Config(2000, 5000, 50, 2, 20000, 1, [])
    else:
        cfg = Config(100_000, 1_000_000, 2000, 20, 1_000_000, 3, [])
    if args.repeat:
        cfg.repeat = args.repeat
    cfg.only = {x for x in args.only.split(",") if x}
    wanted = {x.strip() for x in args.peers.split(",") if x.strip()}
    missing = []
    for kind in PEERS:
        if wanted and kind.name.split()[0] not in wanted:
            continue
        if kind.available():
            cfg.peers.append(kind)
        else:
            missing.append(kind.name)
    base = tempfile.mkdtemp(prefix="logstate-bench-", dir=args.tmp)
    try:
        rows = run_all(cfg, base, lambda msg: print(msg, file=sys.stderr, flush=True))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(rows, cfg, command.strip(), missing)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
