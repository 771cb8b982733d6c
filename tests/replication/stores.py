"""What the replication tests share: source stores, their full state, the commit records.

- ``Clock``: a clock the tests move by hand (ttl values expire when told);
- ``open_store``: a small-segment store on that clock (many segments, rolls);
- ``fill`` / ``more_changes``: writes of every kind (sub-storages, sets,
  overwrites, deletes, ttl values, an InMemoryStorage flush with a checkpoint,
  a batch, a sub-storage drop, a compaction);
- ``store_state``: every sub-storage's keys with their stored bytes
  (``get_encoded``: bit for bit, expiry times included), and the checkpoint;
- ``Records``: a commit listener keeping each committed record's exact bytes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from logstate import InMemoryStorage, LocalFileStorage
from logstate.replication._snapshot import capture, write_container

T0 = 1_700_000_000.0


class Clock:
    """``now()`` returns what the test set (shared by a source and the stores built from it)."""

    def __init__(self) -> None:
        self.now_s = T0

    def __call__(self) -> float:
        return self.now_s


def open_store(path: Path, clock: Clock, **options: Any) -> LocalFileStorage:
    options.setdefault("sync", "none")
    options.setdefault("segment_size", 4096)
    options.setdefault("auto_compact", False)
    return LocalFileStorage(path, clock=clock, **options)


def fill(store: LocalFileStorage, clock: Clock) -> None:
    """Writes of every kind, a compaction among them; leaves several segments."""
    for i in range(200):
        store[f"k{i}"] = f"value {i} " * (i % 7 + 1)
    a = store.get_or_create_sub_storage("a")
    b = a.get_or_create_sub_storage("b")
    store.get_or_create_sub_storage("empty")
    for i in range(50):
        a[f"x{i}"] = bytes(range(i % 256)) * 3
        b.set(f"y{i}", i * 1.5)
    store.set("lives", [1, 2, 3], ttl=3600)
    store.set("expires", "soon", ttl=10)
    a.set("also-expires", b"x" * 100, ttl=5)
    for i in range(0, 200, 3):
        del store[f"k{i}"]
    memory = InMemoryStorage(a)
    for i in range(40):
        memory[f"m{i}"] = {"n": i}
    memory.set("m-ttl", 7, ttl=3600)
    memory.flush(checkpoint={"offset": 41})
    clock.now_s += 20  # "expires" and "also-expires" are expired now
    store.compact()  # drops the deleted and the expired
    for i in range(100, 150):
        store[f"k{i}"] = f"{i}" * 40  # overwrites after the compaction (rolls)
    with store.batch() as batch:
        batch.set("batched", True)
        batch.remove("k1")
    a.close()
    b.close()


def more_changes(store: LocalFileStorage, clock: Clock) -> None:
    """More writes of every kind after ``fill``: a clear, a drop, a flush, a compaction."""
    c = store.get_or_create_sub_storage("c")
    for i in range(60):
        c[f"c{i}"] = "c" * i
        store[f"k{i}"] = -i
    store.delete_sub_storage("empty")
    b = store.get_or_create_sub_storage("a").get_or_create_sub_storage("b")
    b.clear()
    b["after-clear"] = None
    store.compact()
    memory = InMemoryStorage(c)
    memory["new"] = "from memory"
    del memory["c3"]
    memory.flush(checkpoint={"offset": 99})
    store.set("late-ttl", 1, ttl=30)
    clock.now_s += 1
    c.close()
    b.close()


def store_state(root: LocalFileStorage) -> dict[str, Any]:
    """Every sub-storage (recursively; "" for ``root``) -> {key: stored bytes}, and the checkpoint.

    Sorted listings, so that the order in which keys were written (which
    compaction and reopening change) does not count.
    """
    state: dict[str, Any] = {}

    def visit(handle: LocalFileStorage, path: str) -> None:
        keys = sorted(handle.get_all_keys())
        state[path] = {key: handle.get_encoded(key) for key in keys}
        for name in handle.get_sub_storages():
            child = handle.get_or_create_sub_storage(name)
            try:
                visit(child, f"{path}/{name}" if path else name)
            finally:
                child.close()

    visit(root, "")
    state["checkpoint"] = root.checkpoint
    return state


class Records:
    """A commit listener: each committed record's exact bytes, by seq."""

    def __init__(self, store: LocalFileStorage) -> None:
        self._lock = threading.Lock()
        self.by_seq: dict[int, bytes] = {}
        store._engine.add_commit_listener(self)

    def __call__(self, seq: int, record: bytes) -> None:
        with self._lock:
            assert seq not in self.by_seq, f"seq {seq} delivered twice"
            self.by_seq[seq] = record

    def between(self, after: int, upto: int | None = None) -> list[bytes]:
        """The records of seqs ``after + 1 .. upto`` (the newest without ``upto``), in order."""
        with self._lock:
            last = max(self.by_seq, default=after) if upto is None else upto
            return [self.by_seq[seq] for seq in range(after + 1, last + 1)]


def snapshot_of(store: LocalFileStorage, out_path: Path) -> int:
    """Capture ``store`` and write its container to ``out_path``; the capture's seq."""
    with capture(store._engine) as captured:
        write_container(captured, str(out_path))
        return captured.seq
