"""The replication package's asyncio event loop: one daemon thread per process.

Owns: the process's private event loop on which every NATS connection of
logstate lives, started lazily in a daemon thread, and :func:`run`, which
hands a coroutine to it from any other thread and waits for the result with
a bound (:func:`submit`: starts it and returns its future). After
``os.fork`` the child forgets the parent's loop (it has no thread in the
child) and starts its own on first use.
Must never: run a coroutine in the caller's thread (no ``asyncio.run``, no
``run_until_complete``: the caller may be running a loop of its own, as
Faust's threads do); wait without a timeout; be called from its own loop
thread (that would wait on itself: :func:`run` raises instead).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "keep_in_child", "loop_thread", "on_loop_thread", "run", "submit"]

T = TypeVar("T")

# how much longer than the coroutine's own bound the caller waits for the
# loop thread to hand the result over (a busy loop, a slow cancellation)
HANDOVER_GRACE_S = 2.0


class LoopThread:
    """An event loop running forever in a daemon thread of this process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="logstate-nats-loop", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``coro`` on the loop; wait at most ``timeout_s + HANDOVER_GRACE_S``.

        ``coro`` is expected to bound itself (``asyncio.wait_for``) within
        ``timeout_s``; the wait here only guards against a stuck loop.

        Raises:
            RuntimeError: called from the loop thread itself, or in a forked
                child with the parent's loop.
            TimeoutError: no result in time (the coroutine is cancelled).
            Exception: whatever ``coro`` raised.
        """
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "a blocking logstate replication call was made from the replication "
                "event loop thread itself (it would wait on itself)"
            )
        if os.getpid() != self.pid:
            coro.close()
            raise RuntimeError(
                f"the replication event loop belongs to process {self.pid}, not to its "
                f"forked child {os.getpid()}"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s + HANDOVER_GRACE_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the replication event loop gave no result within {timeout_s:g} s"
            ) from None

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T] | None:
        """Start ``coro`` on the loop and return at once: its future (done on
        the loop thread), or None, ``coro`` closed, from the loop thread
        itself or in a forked child. ``coro`` must bound itself."""
        if threading.current_thread() is self.thread or os.getpid() != self.pid:
            coro.close()
            return None
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # (the loop is closed)
            coro.close()
            raise


_lock = threading.Lock()
_current: LoopThread | None = None
# a forked child keeps the parent's loop objects referenced, never collected:
# finalizing them would close descriptors and sockets the child shares
_orphans: list[object] = []


def loop_thread() -> LoopThread:
    """This process's loop thread, started on first use."""
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            _current = LoopThread()
        return _current


def run(coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """:meth:`LoopThread.run` on this process's loop."""
    return loop_thread().run(coro, timeout_s)


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T] | None:
    """:meth:`LoopThread.submit` on this process's loop."""
    return loop_thread().submit(coro)


def on_loop_thread() -> bool:
    """Is the caller the loop thread? (A garbage-collected storage may close there:
    it must then not wait for anything the loop does.)"""
    current = _current
    return current is not None and threading.current_thread() is current.thread


def keep_in_child(obj: object) -> None:
    """Keep ``obj`` (something of the parent's, in a forked child) referenced for good."""
    _orphans.append(obj)


def _forget_in_child() -> None:
    # the parent's loop thread does not exist in the child; its lock may
    # have been held by another parent thread at the fork
    global _current, _lock
    if _current is not None:
        _orphans.append(_current)
    _current = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
