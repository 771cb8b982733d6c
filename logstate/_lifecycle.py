"""Whether an engine may still be used: open, closing, closed, failed, fenced, forked.

Owns: the lifecycle flags of one engine and the one wording of each error a
call on an unusable engine raises (closed, read-only, refused after an I/O
error, a commit refused, fenced by another writer, a forked child).
``blocked`` sums up the flags for the write path's one test; ``closed`` is
the read path's one test (set by the close, and by a fence: see ``fail``).
Must never: clear ``failed`` (an engine that failed a write or sync stays
failed until it is closed and opened again), take a lock, or do I/O.

Set under the engine's write lock (``closing``, ``failed``) or by the close
(``closed``, ``released``); read without it by the lock-free read path.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from logstate._errors import (
    FencedError,
    LogstateError,
    ReadOnlyStorageError,
    StorageClosedError,
    StorageFailedError,
    StorageForkedError,
)
from logstate._native import EXT

# The C path (``_native.EXT``): a C base type holds the hot fields, so that
# the C hot paths (csrc/fast.c) read them without attribute look-ups; this
# class still owns every rule, and reads and writes them as attributes.
if TYPE_CHECKING:
    _LifeBase = object
else:
    _LifeBase = object if EXT is None else EXT.LifeBase

__all__ = ["Lifecycle"]


class Lifecycle(_LifeBase):
    """The lifecycle flags of the engine of directory ``path``."""

    __slots__ = tuple(
        name  # (those of the C base, when there is one, are its own)
        for name in (
            "blocked",
            "closed",
            "closing",
            "failed",
            "fenced",
            "final_synced",
            "forked_from",
            "path",
            "read_only",
            "released",
        )
        if not hasattr(_LifeBase, name)
    )

    def __init__(self, path: str, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self.closing = False  # close() started: no new write or compaction
        self.closed = False  # descriptors released (first step of the release)
        self.released = False  # every resource released: close() is done
        self.final_synced = False  # close() made everything durable
        self.failed: BaseException | None = None  # a write or sync failed: writes refused
        self.fenced: FencedError | None = None  # another writer took over: every call refused
        # in a child forked from the process that opened the engine: that
        # process's pid; every call raises StorageForkedError
        self.forked_from: int | None = None
        self.blocked = read_only  # any reason a write must take the slow check

    def fail(self, exc: BaseException) -> None:
        """Refuse every later write: ``exc`` (a failed write or sync) is why.

        A :class:`FencedError` (``Engine.fence``) refuses reads too: it marks
        the engine closed, the one flag the read path tests, and every later
        call raises a new FencedError with its fields (``closed_error``).
        The files stay open until the engine's close releases them.
        """
        self.blocked = True  # first: an interrupt between the two leaves writes refused
        if isinstance(exc, FencedError):
            self.fenced = exc  # (before closed: a reader that sees closed finds it)
            self.closed = True
        self.failed = exc

    def begin_close(self) -> None:
        self.blocked = True  # (first, as in fail)
        self.closing = True

    def mark_closed(self) -> None:
        self.blocked = True  # (first, as in fail)
        self.closed = True

    def mark_forked(self, owner_pid: int) -> None:
        """In a child forked from ``owner_pid``: unusable, nothing of it is the child's."""
        self.blocked = True  # (first, as in fail)
        self.forked_from = owner_pid
        self.closed = self.released = True

    def closed_error(self) -> LogstateError:
        """The error for a call on this closed engine (StorageForkedError in a forked
        child; a new FencedError with the fence's fields on a fenced engine)."""
        if self.forked_from is not None:
            return StorageForkedError(self.path, self.forked_from, os.getpid())
        fenced = self.fenced
        if fenced is not None:
            return FencedError(
                fenced.path, fenced.stream, fenced.partition, fenced.by_writer, fenced.kept_aside
            )
        return StorageClosedError(f"storage {self.path} is closed")

    def check_open(self) -> None:
        """Raise unless the engine is open (closing counts as closed)."""
        if self.closed or self.closing or self.forked_from is not None:
            raise self.closed_error()

    def check_not_forked(self) -> None:
        if self.forked_from is not None:
            raise self.closed_error()

    def check_writable(self) -> None:
        """Raise unless writes are allowed (read-only, closed, failed: in that order)."""
        if self.forked_from is not None:
            raise self.closed_error()
        if self.read_only:
            raise ReadOnlyStorageError(f"storage {self.path} was opened read-only")
        if self.closed or self.closing:
            raise self.closed_error()
        if self.failed is not None:
            raise StorageFailedError(
                f"storage {self.path} refuses writes after an earlier I/O error "
                f"({self.failed!r}); close every handle and reopen it"
            ) from self.failed

    def refuse_commit(self) -> None:
        """Raise why a commit cannot sync: an earlier I/O error, or a closed (or fenced) engine."""
        if self.failed is not None and self.fenced is None:
            raise StorageFailedError(
                f"storage {self.path}: the write was not made durable: an earlier "
                f"write or sync failed ({self.failed!r}); close every handle and reopen it"
            ) from self.failed
        raise self.closed_error()

    def closed_during(self, what: str) -> LogstateError:
        """The error of a long call (a compaction) that found the engine closing (or fenced)."""
        if self.fenced is not None:
            return self.closed_error()
        return StorageClosedError(f"storage {self.path} closed during {what}")

    def _check(self) -> None:
        # blocked is set before the flag it sums up: it may run ahead, never behind
        assert self.blocked or not (
            self.read_only or self.closing or self.closed or self.failed is not None
        ), "a flag is set but writes are not blocked"
        assert not self.released or self.closed, "released but not closed"
