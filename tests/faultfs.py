"""A file system for tests that knows what a power loss keeps, and fails chosen calls.

Owns: :class:`CrashFS`, a drop-in :class:`logstate._fs.FileSystem` that performs
every operation on a real directory (so the engine under test runs unchanged)
and, beside it, keeps a model of what is *durable*:

- per file (an inode, whatever names it has): the bytes known synced, taken
  at each ``fsync``/``fdatasync`` of that file, and the bytes a running
  process sees now;
- per directory: the entries known durable, taken at each ``fsync_dir`` of
  that directory, and the creates, renames and unlinks done since, in order.

From that model it produces the on-disk states a power loss at the current
moment may leave (:meth:`CrashFS.crash_states`), in the model of LevelDB's
fault-injection test and ALICE (Pillai et al., OSDI 2014):

- synced bytes survive;
- the bytes appended since the last sync are kept whole, dropped, cut at any
  length, or cut and followed by zeros or garbage up to any length (ALICE:
  "the size grows, then garbage, then the data"); a truncate not yet synced
  may be undone;
- directory operations not yet made durable by ``fsync_dir`` may be lost: a
  prefix of them survives (journaled metadata), or any subset that can be
  applied in order; so a created file may be missing, a rename undone (the
  old name back with its old content, the new name holding its old file or
  nothing) and an unlink undone.

:meth:`CrashFS.materialize` writes such a state into a fresh directory, which a
test then opens with the normal file system.

It also injects faults: :meth:`CrashFS.fail_nth` fails the Nth call of one
operation (or of any operation) with an ``OSError`` (EIO, ENOSPC, ...), an
``append`` optionally after writing half of its data (a short write).

Must never: decide what the engine should do with a fault (tests assert
that); model interleavings the engine cannot produce (one process, one
directory tree under ``root``). Not modelled: data blocks of one unsynced
append reaching the disk out of order (valid bytes after a hole), which a
log cannot tell from corruption.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from logstate import LocalFileStorage, _registry
from logstate._fs import DIR_MODE, FILE_MODE, LOCK_FILE_NAME, FileSystem
from tests import helpers

__all__ = [
    "MUTATING_OPS",
    "OPS",
    "READ_OPS",
    "CrashFS",
    "CrashState",
    "LogicalState",
    "observed_state",
    "open_storage",
]

READ_OPS: Final = frozenset({"list_dir", "open_file", "open_read_only", "pread", "read_all"})
MUTATING_OPS: Final = frozenset(
    {"mkdir", "create_file", "append", "fsync", "fdatasync", "truncate", "rename", "unlink"}
    | {"fsync_dir"}
)
OPS: Final = READ_OPS | MUTATING_OPS
TAIL_FATES: Final = ("keep", "drop", "cut", "zeros", "garbage")

Hook = Callable[[str, str], None]


class _File:
    """One inode: what a running process reads, and what is known durable."""

    __slots__ = ("data", "ident", "synced")

    def __init__(self, ident: int, data: bytes, synced: bytes) -> None:
        self.ident = ident
        self.data = bytearray(data)
        self.synced = synced


class _Dir:
    """One directory: current entries, durable entries, operations since the last fsync."""

    __slots__ = ("durable", "entries", "ident", "pending")

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.entries: dict[str, _File | _Dir] = {}
        self.durable: dict[str, _File | _Dir] = {}
        # (kind, name, new name or "", node): kind is create, rename or unlink
        self.pending: list[tuple[str, str, str, _File | _Dir]] = []


@dataclass
class CrashState:
    """One possible on-disk state after a power loss (paths relative to the root)."""

    dirs: list[str]
    files: dict[str, bytes]
    notes: list[str] = field(default_factory=list)  # what was chosen, for failure messages
    undone: list[str] = field(default_factory=list)  # directory operations lost, e.g. "rename a b"

    def key(self) -> tuple[tuple[str, ...], tuple[tuple[str, bytes], ...]]:
        """Equal for two states that put the same bytes on disk."""
        return tuple(self.dirs), tuple(sorted(self.files.items()))


class CrashFS(FileSystem):
    """A real file system under ``root`` plus a model of what a power loss keeps.

    Everything present under ``root`` when the instance is made counts as
    durable (it is what a disk holds after a reboot). Every path the engine
    passes must lie under ``root``.

    Args:
        root: the directory under which every path lies.
        intact_prefix: the first bytes of a file that a power loss never tears
            into part data then zeros or garbage (it may still cut them short,
            or leave zeros only): 0 tears anywhere. A file header written
            within one sector, which disks write atomically, justifies
            ``intact_prefix=SEGMENT_HEADER_SIZE``.

    Attributes:
        before: called as ``before(op, path)`` before each mutating operation
            (a crash point: the model then holds the state after the previous one).
        after: called as ``after(op, path)`` after each mutating operation succeeded.
        calls: how many times each operation (and, under None, any) was called.
        injected: the OSError :meth:`fail_nth` raised, once it has.
        injected_call: (operation, path) of that call.
    """

    def __init__(self, root: str | os.PathLike[str], intact_prefix: int = 0) -> None:
        self.intact_prefix = intact_prefix
        self.root = os.path.realpath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"CrashFS root {self.root} must be an existing directory")
        self.lock = threading.RLock()  # held by every call, hook and crash-state build
        self._next_ident = 0
        self._fds: dict[int, _File] = {}
        self._fd_paths: dict[int, str] = {}  # the name each descriptor was opened by
        self.before: Hook | None = None
        self.after: Hook | None = None
        self.calls: dict[str | None, int] = dict.fromkeys([None, *sorted(OPS)], 0)
        self.log: list[tuple[str, str]] = []  # every counted call: (operation, path)
        self._plan: tuple[str | None, int, int, bool] | None = None
        self.injected: OSError | None = None
        self.injected_call: tuple[str, str] | None = None
        self._root = self._scan(self.root)

    # ------------------------------------------------------------------ model helpers
    def _ident(self) -> int:
        self._next_ident += 1
        return self._next_ident

    def _scan(self, path: str) -> _Dir:
        node = _Dir(self._ident())
        for name in sorted(os.listdir(path)):
            if name == LOCK_FILE_NAME:
                continue  # the lock file holds nothing the engine reads back
            full = os.path.join(path, name)
            child: _File | _Dir
            if os.path.isdir(full):
                child = self._scan(full)
            else:
                data = Path(full).read_bytes()
                child = _File(self._ident(), data, data)
            node.entries[name] = child
            node.durable[name] = child
        return node

    def _relative(self, path: str) -> list[str]:
        full = os.path.abspath(path)
        if full == self.root:
            return []
        if not full.startswith(self.root + os.sep):
            raise ValueError(f"CrashFS: {full} is outside its root {self.root}")
        return full[len(self.root) + 1 :].split(os.sep)

    def _dir(self, parts: list[str]) -> _Dir:
        node: _File | _Dir = self._root
        for part in parts:
            assert isinstance(node, _Dir)
            node = node.entries[part]
        assert isinstance(node, _Dir), parts
        return node

    def _parent(self, path: str) -> tuple[_Dir, str]:
        parts = self._relative(path)
        return self._dir(parts[:-1]), parts[-1]

    def _file_at(self, path: str) -> _File:
        parent, name = self._parent(path)
        node = parent.entries[name]
        assert isinstance(node, _File), path
        return node

    # ------------------------------------------------------------------ faults
    def fail_nth(
        self, op: str | None, n: int, error: int = errno.EIO, short_write: bool = False
    ) -> None:
        """Fail the ``n``-th call from now of ``op`` (any operation in OPS when None).

        Args:
            error: the errno of the OSError raised.
            short_write: when the failing call is an ``append``, first write
                half of its data (a short write that then hits the error).
        """
        if op is not None and op not in OPS:
            raise ValueError(f"unknown operation {op!r}; one of {sorted(OPS)}")
        if n < 1:
            raise ValueError("n counts from 1")
        self._plan = (op, self.calls[op] + n, error, short_write)

    def _count(self, op: str, path: str) -> tuple[bool, int]:
        """Count a call; (short write?, errno) when it is the one to fail, else (False, 0)."""
        self.calls[op] += 1
        self.calls[None] += 1
        self.log.append((op, path))
        plan = self._plan
        if plan is None or self.calls[plan[0]] != plan[1] or plan[0] not in (None, op):
            return False, 0
        self._plan = None
        return plan[3], plan[2]

    def _fail(self, op: str, path: str, error: int) -> None:
        self.injected = OSError(error, os.strerror(error), path)
        self.injected_call = (op, path)
        raise self.injected

    def _begin(self, op: str, path: str) -> tuple[bool, int]:
        """Crash point and fault check before a call."""
        if op in MUTATING_OPS and self.before is not None:
            self.before(op, path)
        short, error = self._count(op, path)
        if error and not (op == "append" and short):
            self._fail(op, path, error)
        return short, error

    def _end(self, op: str, path: str) -> None:
        if self.after is not None:
            self.after(op, path)

    # ------------------------------------------------------------------ directories
    def make_dirs(self, path: str) -> None:
        """Create ``path`` and missing parents (under root); fsync each new entry's parent."""
        path = os.path.abspath(path)
        missing = []
        probe = path
        while not os.path.isdir(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        for directory in reversed(missing):
            with self.lock:
                parent, name = self._parent(directory)
                self._begin("mkdir", directory)
                os.mkdir(directory, DIR_MODE)
                node = _Dir(self._ident())
                parent.entries[name] = node
                parent.pending.append(("create", name, "", node))
                self._end("mkdir", directory)
            self.fsync_dir(os.path.dirname(directory))

    def list_dir(self, path: str) -> list[str]:
        with self.lock:
            self._begin("list_dir", path)
            return super().list_dir(path)

    def fsync_dir(self, path: str) -> None:
        with self.lock:
            node = self._dir(self._relative(path))
            self._begin("fsync_dir", path)
            super().fsync_dir(path)
            node.durable = dict(node.entries)
            node.pending.clear()
            self._end("fsync_dir", path)

    def rename(self, src: str, dst: str) -> None:
        with self.lock:
            parent, name = self._parent(src)
            dst_parent, new_name = self._parent(dst)
            if dst_parent is not parent:
                raise ValueError("CrashFS models renames within one directory only")
            self._begin("rename", src)
            super().rename(src, dst)
            node = parent.entries.pop(name)
            parent.entries[new_name] = node
            parent.pending.append(("rename", name, new_name, node))
            self._end("rename", src)

    def unlink(self, path: str) -> None:
        with self.lock:
            parent, name = self._parent(path)
            self._begin("unlink", path)
            super().unlink(path)
            node = parent.entries.pop(name)
            parent.pending.append(("unlink", name, "", node))
            self._end("unlink", path)

    # ------------------------------------------------------------------ files
    def create_file(self, path: str) -> int:
        with self.lock:
            parent, name = self._parent(path)
            self._begin("create_file", path)
            fd = super().create_file(path)
            node = _File(self._ident(), b"", b"")
            parent.entries[name] = node
            parent.pending.append(("create", name, "", node))
            self._fds[fd] = node
            self._fd_paths[fd] = path
            self._end("create_file", path)
            return fd

    def open_file(self, path: str) -> int:
        with self.lock:
            self._begin("open_file", path)
            fd = super().open_file(path)
            self._fds[fd] = self._file_at(path)
            self._fd_paths[fd] = path
            return fd

    def open_read_only(self, path: str) -> int:
        with self.lock:
            self._begin("open_read_only", path)
            fd = super().open_read_only(path)
            self._fds[fd] = self._file_at(path)
            self._fd_paths[fd] = path
            return fd

    def close(self, fd: int) -> None:
        with self.lock:
            self._fds.pop(fd, None)
            self._fd_paths.pop(fd, None)
            super().close(fd)

    def _path_of(self, fd: int) -> str:
        """The name ``fd`` was opened by (it may have been renamed or unlinked since)."""
        return self._fd_paths[fd]

    def append(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        with self.lock:
            node = self._fds[fd]
            where = self._path_of(fd)
            _short, error = self._begin("append", where)
            if error:  # a short write: half the data reaches the file, then the error
                half = bytes(memoryview(data)[: len(data) // 2])
                super().append(fd, half)
                node.data += half
                self._fail("append", where, error)
            super().append(fd, data)
            node.data += data
            self._end("append", where)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        with self.lock:
            self._begin("pread", self._path_of(fd))
            return super().pread(fd, size, offset)

    def read_all(self, fd: int) -> bytes:
        with self.lock:
            self._begin("read_all", self._path_of(fd))
            return super().read_all(fd)

    def _sync(self, op: str, fd: int, call: Callable[[int], None]) -> None:
        with self.lock:
            node = self._fds[fd]
            where = self._path_of(fd)
            self._begin(op, where)
            call(fd)
            node.synced = bytes(node.data)
            self._end(op, where)

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd, super().fsync)

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd, super().fdatasync)

    def truncate(self, fd: int, size: int) -> None:
        with self.lock:
            node = self._fds[fd]
            where = self._path_of(fd)
            self._begin("truncate", where)
            super().truncate(fd, size)
            del node.data[size:]
            node.data.extend(bytes(size - len(node.data)))  # ftruncate up: zeros
            self._end("truncate", where)

    def write_new_file(self, path: str, data: bytes | bytearray | memoryview) -> None:
        """As the base class, but every step goes through the model (close included)."""
        fd = self.create_file(path)
        try:
            self.append(fd, data)
            self.fsync(fd)
        finally:
            self.close(fd)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Assert the model's view of every current file matches the real directory."""
        with self.lock:
            for rel, node in self._walk(self._root, ""):
                full = os.path.join(self.root, rel)
                if isinstance(node, _Dir):
                    assert os.path.isdir(full), rel
                else:
                    assert Path(full).read_bytes() == bytes(node.data), rel

    def _walk(self, node: _Dir, prefix: str) -> Iterator[tuple[str, _File | _Dir]]:
        for name, child in node.entries.items():
            rel = prefix + name
            yield rel, child
            if isinstance(child, _Dir):
                yield from self._walk(child, rel + os.sep)

    def unsynced_bytes(self) -> int:
        """Bytes of current files not known durable (0: a power loss now loses no data)."""
        with self.lock:
            return sum(
                len(node.data) - len(node.synced)
                for _rel, node in self._walk(self._root, "")
                if isinstance(node, _File) and node.data.startswith(node.synced)
            )

    # ------------------------------------------------------------------ power loss
    def crash_states(self, rng: random.Random, n: int) -> list[CrashState]:
        """``n`` random on-disk states a power loss right now may leave."""
        with self.lock:
            return [self._crash_state(rng) for _ in range(n)]

    def durable_state(self) -> CrashState:
        """The power loss that keeps only what is known durable."""
        with self.lock:
            return self._build(lambda _d: 0, lambda f: (bytes(f.synced), "synced only"))

    def process_crash_state(self) -> CrashState:
        """The power loss that keeps everything (as if only the process died)."""
        with self.lock:
            return self._build(lambda d: len(d.pending), lambda f: (bytes(f.data), "all kept"))

    def directory_prefix_states(self, keep_unsynced: bool) -> list[CrashState]:
        """Every prefix of every directory's pending operations (one directory at a time).

        File data is either all kept or only the synced part, as chosen. With
        the other directories' operations all durable: enough to enumerate
        the directory outcomes of a step that changes one directory.
        """
        with self.lock:
            pending = [d for _r, d in self._walk_dirs() if d.pending]

            def fate(node: _File) -> tuple[bytes, str]:
                if keep_unsynced:
                    return bytes(node.data), "all kept"
                return bytes(node.synced), "synced only"

            states = []
            for target in pending or [self._root]:
                for k in range(len(target.pending) + 1):
                    states.append(self._build(_prefix_chooser(target, k), fate))
            return states

    def _walk_dirs(self) -> Iterator[tuple[str, _Dir]]:
        yield "", self._root
        for rel, node in self._walk(self._root, ""):
            if isinstance(node, _Dir):
                yield rel, node

    def _crash_state(self, rng: random.Random) -> CrashState:
        subsets: dict[int, list[bool]] = {}

        def choose(d: _Dir) -> int | list[bool]:
            if not d.pending:
                return 0
            if rng.random() < 0.5:
                return rng.randint(0, len(d.pending))  # a prefix
            subsets[d.ident] = [rng.random() < 0.5 for _ in d.pending]
            return subsets[d.ident]

        def fate(node: _File) -> tuple[bytes, str]:
            return _tail_fate(rng, node.synced, bytes(node.data), self.intact_prefix)

        return self._build(choose, fate)

    def _build(
        self,
        choose: Callable[[_Dir], int | list[bool]],
        fate: Callable[[_File], tuple[bytes, str]],
    ) -> CrashState:
        state = CrashState(dirs=[], files={})
        self._build_dir(self._root, "", choose, fate, state)
        return state

    def _build_dir(
        self,
        node: _Dir,
        prefix: str,
        choose: Callable[[_Dir], int | list[bool]],
        fate: Callable[[_File], tuple[bytes, str]],
        state: CrashState,
    ) -> None:
        entries = dict(node.durable)
        kept: int | list[bool] = choose(node)
        label = prefix.rstrip(os.sep) or "."
        applied = 0
        for i, (kind, name, new_name, child) in enumerate(node.pending):
            wanted = i < kept if isinstance(kept, int) else kept[i]
            possible = (
                name not in entries
                if kind == "create"
                else entries.get(name) is child and (kind == "unlink" or new_name != name)
            )
            if wanted and possible:
                if kind == "create":
                    entries[name] = child
                elif kind == "unlink":
                    del entries[name]
                else:
                    del entries[name]
                    entries[new_name] = child
                applied += 1
            else:
                target = f" {prefix}{new_name}" if kind == "rename" else ""
                state.undone.append(f"{kind} {prefix}{name}{target}")
        if node.pending:
            how = "prefix" if isinstance(kept, int) else "subset"
            state.notes.append(f"dir {label}: {applied}/{len(node.pending)} pending ops ({how})")
        for name, child in sorted(entries.items()):
            rel = prefix + name
            if isinstance(child, _Dir):
                state.dirs.append(rel)
                self._build_dir(child, rel + os.sep, choose, fate, state)
            else:
                data, how = fate(child)
                state.files[rel] = data
                if how != "synced only" or len(child.data) != len(child.synced):
                    state.notes.append(f"{rel}: {how}")

    # ------------------------------------------------------------------ materialize
    @staticmethod
    def materialize(state: CrashState, target: str | os.PathLike[str]) -> Path:
        """Write ``state`` into the new directory ``target`` (which must not exist)."""
        base = Path(target)
        base.mkdir(mode=DIR_MODE, parents=True)
        for rel in state.dirs:
            (base / rel).mkdir(mode=DIR_MODE)
        for rel, data in state.files.items():
            path = base / rel
            path.write_bytes(data)
            path.chmod(FILE_MODE)
        return base


def _prefix_chooser(target: _Dir, k: int) -> Callable[[_Dir], int | list[bool]]:
    """Keep the first ``k`` pending operations of ``target``, all of the others'."""
    return lambda d: k if d is target else len(d.pending)


def _tail_fate(
    rng: random.Random, synced: bytes, data: bytes, intact_prefix: int = 0
) -> tuple[bytes, str]:
    """What of a file's unsynced bytes a power loss keeps (see the module docstring).

    ``intact_prefix``: the file's first bytes are never torn into data followed
    by zeros or garbage (see :class:`CrashFS`).
    """
    if not data.startswith(synced):
        # Truncated (or rewritten) since the last sync: the change may be undone.
        if rng.random() < 0.5:
            return synced, "unsynced truncate undone"
        common = 0
        while common < min(len(synced), len(data)) and synced[common] == data[common]:
            common += 1
        base, tail = data[:common], data[common:]
        label = "truncate kept, "
    else:
        base, tail = synced, data[len(synced) :]
        label = ""
    if not tail:
        return base, label + "synced only"
    how = rng.choice(TAIL_FATES)
    n = len(tail)
    if how == "keep":
        return base + tail, f"{label}{n} unsynced bytes kept"
    if how == "drop":
        return base, f"{label}{n} unsynced bytes dropped"
    if how == "cut":
        k = rng.randint(0, n)
        return base + tail[:k], f"{label}unsynced bytes cut at {k}/{n}"
    size = rng.randint(1, n)  # the size grew this far...
    k = rng.randint(0, size - 1)  # ...but only this much data reached the disk
    if len(base) + k < intact_prefix:
        k, how = 0, "zeros"  # the atomic prefix: none of it, the size grown over zeros
    filler = bytes(size - k) if how == "zeros" else rng.randbytes(size - k)
    return base + tail[:k] + filler, f"{label}unsynced {k}/{n} bytes then {size - k} {how}"


# ---------------------------------------------------------------------- storage helpers
LogicalState = tuple[dict[str, dict[str, Any]], Any]  # ({sub-storage path: items}, checkpoint)


def open_storage(
    fs: FileSystem, directory: str | os.PathLike[str], **options: Any
) -> LocalFileStorage:
    """A public handle on an engine that does its I/O through ``fs``."""
    engine = _registry.acquire_engine(os.fspath(directory), options, create=True, fs=fs)
    try:
        handle = LocalFileStorage(directory)
    finally:
        _registry.release_engine(engine)  # the handle holds the only reference
    assert handle._engine is engine
    return handle


def observed_state(root: LocalFileStorage) -> LogicalState:
    """Every sub-storage (recursively) with its items (``helpers.observed_state``), and
    the checkpoint."""
    return helpers.observed_state(root), root.checkpoint


@contextlib.contextmanager
def no_hooks(fs: CrashFS) -> Iterator[None]:
    """Run a block without crash points (e.g. reads made by the test itself)."""
    before, after = fs.before, fs.after
    fs.before = fs.after = None
    try:
        yield
    finally:
        fs.before, fs.after = before, after
