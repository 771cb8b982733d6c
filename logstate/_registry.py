"""One engine per storage directory per process, shared by every handle.

Owns: the registry of open engines (keyed by canonical path, a read-only
open apart), the reference count of each (one per handle, released once),
waiting for an engine whose last handle is closing it, retrying a read-only
open that a live writer's compaction raced, a changelog's restore before a
directory is opened (never while this process has it open), and
forgetting the parent's engines in a forked child.
Must never: open a file itself (``Engine`` does), or close an engine that a
handle still references.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable

from logstate._engine import Engine
from logstate._errors import OptionConflictError, StorageChangedError, StorageLockedError
from logstate._fs import OS_FS, FileSystem
from logstate._options import EngineOptions, validate_options
from logstate._recovery import READ_ONLY_OPEN_ATTEMPTS, SegmentVanished

__all__ = [
    "Reference",
    "abandon_engine",
    "acquire_engine",
    "acquire_reference",
    "add_reference",
    "open_engines",
    "release_engine",
]

log = logging.getLogger("logstate")

_registry: dict[str, Engine] = {}
_registry_lock = threading.RLock()  # re-entrant: a lost Reference may be released inside it


def acquire_reference(
    path: str,
    given: dict[str, object],
    create: bool,
    fs: FileSystem = OS_FS,
    lock_timeout_s: float = 0.0,
    restore: str | None = None,
) -> Reference:
    """A new reference on the engine for directory ``path``, opened if needed.

    Args:
        path: the storage directory.
        given: options the caller passed explicitly; others take the open
            engine's values (or the defaults when it is opened now).
        create: create the directory when missing.
        lock_timeout_s: how long to wait for another process to release the
            directory's lock (a partition handed over in a rebalance): the
            open is retried, 10 ms apart at first and at most 200 ms apart,
            without holding the registry's lock meanwhile. 0: fail at once.
        restore: a restore mode (checked by ``_checks.check_restore``): the
            changelog option's ``restore_before_open(path, restore)`` runs
            first, under the registry's lock, unless the directory is open
            in this process (its engine is then shared as it is).

    Raises:
        OptionConflictError: the directory is already open with other values
            for options in ``given``.
        FileNotFoundError: missing directory and ``create`` is False.
        StorageLockedError: from opening; after ``lock_timeout_s``, naming the
            holder's pid and the time waited.
        FencedError: the directory is open in this process by a fenced engine
            (close every handle of it first).
        CorruptionError, OSError: from opening; others from the restore.
    """
    if lock_timeout_s <= 0:
        return _acquire(path, given, create, fs, restore)
    started = time.monotonic()
    pause_s = 0.01
    while True:
        try:
            return _acquire(path, given, create, fs, restore)
        except StorageLockedError as exc:
            waited_s = time.monotonic() - started
            if waited_s >= lock_timeout_s:
                raise StorageLockedError(exc.path, exc.pid, round(waited_s, 3)) from None
            time.sleep(min(pause_s, lock_timeout_s - waited_s))
            pause_s = min(pause_s * 2, 0.2)


def _acquire(
    path: str, given: dict[str, object], create: bool, fs: FileSystem, restore: str | None
) -> Reference:
    """:func:`acquire_reference`, one attempt."""
    options = validate_options(given)
    if restore is not None:
        _restore_unless_open(path, options, restore, fs)
    if not fs.is_dir(path):
        if fs.exists(path):
            raise NotADirectoryError(f"storage path {path} exists and is not a directory")
        if options.read_only:
            raise FileNotFoundError(
                f"storage directory {path} does not exist (a read-only open creates nothing)"
            )
        if not create:
            raise FileNotFoundError(
                f"storage directory {path} does not exist (auto_create_dir=False)"
            )
        fs.make_dirs(path)
    real = fs.canonical_path(path)
    key = real + ("\0read-only" if options.read_only else "")
    while True:
        with _registry_lock:
            engine = _registry.get(key)
            closing = engine is not None and engine.refs == 0 and not engine.life.released
            if not closing:
                return _share_or_open(engine, key, real, options, given, fs)
        # The last handle is closing it (final sync, snapshot): wait for that
        # close, or finish one that an exception interrupted, then open anew.
        assert engine is not None
        try:
            engine.close()
        except OSError as exc:  # the closing handle's error, raised there too
            log.warning("%s: closing the previous engine failed: %r", engine.path, exc)


def _restore_unless_open(path: str, options: EngineOptions, restore: str, fs: FileSystem) -> None:
    """The changelog's restore of ``path`` (passed canonical: absolute, symlinks
    resolved) before it is opened, unless this process has it open (shared as it
    is then; a fenced one raises). Waits for a closing one."""
    key = fs.canonical_path(path)
    while True:
        with _registry_lock:
            engine = _registry.get(key)
            if engine is None or engine.life.released:
                # under the lock: no open of the directory in this process meanwhile
                options.changelog.restore_before_open(key, restore)
                return
            if engine.refs > 0:
                if engine.life.fenced is not None:
                    raise engine.life.closed_error()
                return
        try:
            engine.close()  # its last handle is closing it: wait for that (as _acquire)
        except OSError as exc:  # the closing handle's error, raised there too
            log.warning("%s: closing the previous engine failed: %r", engine.path, exc)


def acquire_engine(
    path: str,
    given: dict[str, object],
    create: bool,
    fs: FileSystem = OS_FS,
) -> Engine:
    """:func:`acquire_reference` for a caller that releases with ``release_engine(engine)``."""
    reference = acquire_reference(path, given, create, fs)
    reference.released = True  # the count is the caller's now
    return reference.engine


def _share_or_open(
    engine: Engine | None,
    key: str,
    real: str,
    options: EngineOptions,
    given: dict[str, object],
    fs: FileSystem,
) -> Reference:
    """Under ``_registry_lock``: one more reference on ``engine``, or a new engine."""
    if engine is not None and not engine.life.released:
        if engine.life.fenced is not None:  # every call on it is refused: so is a new handle
            raise engine.life.closed_error()
        conflicts = [
            f"{name}={value!r} (open with {getattr(engine.options, name)!r})"
            for name, value in given.items()
            if name != "recovery" and getattr(options, name) != getattr(engine.options, name)
        ]
        if conflicts:
            raise OptionConflictError(
                f"storage directory {real} is already open in this process with other "
                f"options: {', '.join(conflicts)}; close it first or pass the same options"
            )
    else:
        engine = _open_engine(real, options, fs, key)  # registers it
    return _counted(engine)


def _open_engine(path: str, options: EngineOptions, fs: FileSystem, key: str) -> Engine:
    """A new engine; a read-only open of a live store retried over a compaction's switch.

    The process holding the directory may compact while a read-only open
    lists and loads it: a compaction renames its output over its last input,
    then deletes the other inputs. The directory is consistent at every
    moment, so the open is consistent unless a listed segment vanished, or
    was replaced, before it was loaded (``SegmentVanished``). The open is
    then done again, up to READ_ONLY_OPEN_ATTEMPTS times with a short
    backoff. A segment that was already missing is absent from the listing:
    a gap in the sequence, reported as always (CorruptionError, or
    ``missing_segments``). The engine registers itself under ``key`` once
    open (an exception on the way back leaves it there for the next open
    to close, not lost with the directory lock held).

    Raises:
        StorageChangedError: a listed segment vanished in every attempt.
    """

    def register(engine: Engine) -> None:
        _registry[key] = engine

    if not options.read_only:
        return Engine(path, options, fs, register)
    vanished = ""
    for attempt in range(READ_ONLY_OPEN_ATTEMPTS):
        if attempt:
            time.sleep(min(0.001 * 2**attempt, 0.05))
        try:
            return Engine(path, options, fs, register)
        except SegmentVanished as exc:
            vanished = exc.path
            log.debug("%s vanished during a read-only open: opening again", vanished)
    raise StorageChangedError(path, READ_ONLY_OPEN_ATTEMPTS, vanished)


def _counted(engine: Engine) -> Reference:
    """Count one more reference on ``engine``. Under ``_registry_lock``.

    The count and the Reference that gives it back are made together, with
    nothing interruptible in between: a Reference lost to an interrupt
    before its caller stored it releases the count when it is collected.
    """
    reference = Reference(engine)
    engine.refs += 1
    reference.released = False
    return reference


def add_reference(engine: Engine) -> Reference:
    """One more handle shares ``engine`` (a sub-storage handle)."""
    with _registry_lock:
        if engine.closed:
            raise engine.life.closed_error()
        return _counted(engine)


class Reference:
    """One handle's reference on an engine; released once, however often asked.

    Made by :func:`acquire_reference` and :func:`add_reference` only. One
    that is collected unreleased (lost to an interrupt between its making and
    its handle) releases itself.
    """

    __slots__ = ("engine", "released")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.released = True  # until _counted counts it

    def release(self) -> None:
        """Drop this reference (see :func:`release_engine`); later calls do nothing."""
        release_engine(self.engine, self)

    def release_collected(self) -> None:
        """The release of a handle the garbage collector took (its finalizer).

        The collector runs finalizers in whatever thread allocates: one that
        another thread, holding the registry lock, may be waiting on (an open
        whose changelog waits for the replication's event loop thread). So it
        never waits for that lock: when it is taken, the release runs in a
        thread of its own.
        """
        if not _registry_lock.acquire(blocking=False):
            threading.Thread(
                target=self.release, name=f"logstate-release:{self.engine.path}", daemon=True
            ).start()
            return
        _registry_lock.release()  # (free now: a later wait for it is brief)
        self.release()

    def __del__(self) -> None:
        if not getattr(self, "released", True):  # (an __init__ cut short set nothing)
            try:
                self.release_collected()
            except Exception:  # pragma: no cover - nothing to raise to in a finalizer
                log.exception("%s: releasing a lost reference", self.engine.path)


def release_engine(engine: Engine, reference: Reference | None = None) -> None:
    """Drop one reference; the last one closes the engine and releases the lock.

    The engine stays registered while it closes, so that a new open of the
    same directory in this process waits for the close (or finishes one an
    exception interrupted) instead of finding the directory locked by itself.

    Args:
        reference: the handle's reference; dropping it twice drops one.
    """
    with _registry_lock:
        if reference is not None:
            if reference.released:
                return
            reference.released = True  # with the decrement: no call in between
        engine.refs -= 1
        if engine.refs > 0:
            return
    if threading.get_ident() in engine.worker_idents():
        # The last reference was dropped by the garbage collector inside one
        # of the engine's own threads (which may hold the engine's locks):
        # close it from another thread, never from this one.
        threading.Thread(
            target=_close_unreferenced, args=(engine,), name=f"logstate-close:{engine.path}"
        ).start()
        return
    _close_unreferenced(engine)


def _close_unreferenced(engine: Engine) -> None:
    """Close an engine whose last reference was dropped; unregister it once released."""
    try:
        engine.close()
    except BaseException:
        if not engine.life.released:
            # An interrupt stopped the close part-way: finish it, so that
            # the directory is released (a failed sync already released it).
            engine.close()
        raise
    finally:
        key = engine.path + ("\0read-only" if engine.options.read_only else "")
        with _registry_lock:
            if _registry.get(key) is engine and engine.life.released:
                del _registry[key]


def open_engines() -> Iterable[Engine]:
    """Engines currently open in this process (for tests and diagnostics)."""
    with _registry_lock:
        return list(_registry.values())


_registry_pid = os.getpid()  # the process whose engines the registry holds


def _after_fork_in_child() -> None:
    """In a forked child: forget the parent's engines, and make them unusable.

    The child is another process: a new open of a directory is a fresh open
    (StorageLockedError while the parent holds it), and an inherited handle
    raises StorageForkedError. The registry lock is created anew: a parent
    thread may have held it at the fork.
    """
    global _registry_lock, _registry_pid
    _registry_lock = threading.RLock()
    owner, _registry_pid = _registry_pid, os.getpid()
    engines = list(_registry.values())
    _registry.clear()
    for engine in engines:
        engine.after_fork(owner)


os.register_at_fork(after_in_child=_after_fork_in_child)


def abandon_engine(engine: Engine) -> None:
    """Drop ``engine`` as a killed process would (``Engine.abandon``) and forget it."""
    engine.abandon()
    with _registry_lock:
        for key in [k for k, e in _registry.items() if e is engine]:
            del _registry[key]
