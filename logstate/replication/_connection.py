"""One shared NATS connection, reference counted, on the replication event loop.

Owns: the process's NATS connections (one per distinct servers + options,
shared and reference counted by :meth:`Connection.get` /
:meth:`Connection.release`), their first connect (bounded) and background
reconnects (forever), and :meth:`Connection._call`, which runs a coroutine
on the loop of :mod:`._loop` with a bound and turns nats-py's exceptions
into logstate's (:class:`ReplicationError`, :class:`ApiError`).
Must never: run a coroutine in the caller's thread; wait without a bound;
let a nats-py exception out of a call.

Connections: the first connect is bounded by ``timeout_s`` (every server
listed is tried, again and again, until then); once connected, a lost
connection is re-established in the background forever (every
``reconnect_time_wait``, 0.5 s by default) and calls made meanwhile time
out. A connection nats-py closed for good (an authorization error) is
connected anew by the next call. A publish made while disconnected is
buffered by nats-py and may reach the server after its call timed out.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import json
import logging
import os
import sys
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, cast

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from logstate._errors import ReplicationError
from logstate.replication import _loop
from logstate.replication._jsapi import ApiError, api_error

__all__ = ["DEFAULT_CONNECT_OPTIONS", "Connection"]

T = TypeVar("T")
C = TypeVar("C", bound="Connection")
_log = logging.getLogger("logstate.replication")

# options logstate sets unless connect_options says otherwise (and connect_timeout,
# min(timeout_s, 2 s), name "logstate-<pid>", error/disconnect/reconnect callbacks)
DEFAULT_CONNECT_OPTIONS: dict[str, Any] = {
    "allow_reconnect": True,
    "max_reconnect_attempts": -1,  # after the first connect: reconnect forever
    "reconnect_time_wait": 0.5,
    "ping_interval": 5,  # a silent (hung, partitioned) server is dropped after 10-15 s
    "max_outstanding_pings": 2,
}
CLOSE_TIMEOUT_S = 2.0


def _servers_list(servers: str | Sequence[str]) -> list[str]:
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    found = [item.strip() for item in items if item.strip()]
    if not found:
        raise ValueError(f"no NATS server URL in {servers!r}")
    return found


def _option_key(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


class Connection:
    """One shared NATS connection; every call blocks, bounded by ``timeout_s``.

    Get one with :meth:`get`, give it back with :meth:`release`. Safe to call
    from any thread, including one running its own asyncio loop (never from
    the replication loop thread itself). In a forked child a connection of
    the parent raises :class:`ReplicationError`: call :meth:`get` again there.

    Attributes:
        servers: the server URLs.
        max_payload: the largest message the server accepts (its INFO
            ``max_payload``), bytes: payload and headers together.
        disconnects, reconnects: counts since the first connect.
        last_error: the last error nats-py reported ("" when none).
    """

    _registry: ClassVar[dict[Any, Connection]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, key: Any, servers: list[str], options: dict[str, Any]) -> None:
        self._key = key
        self.servers = servers
        self._options = options
        self._refs = 0
        self._pid = os.getpid()
        self._nc: NATS | None = None
        self._connect_lock = threading.Lock()
        self._released = False
        self.max_payload = 0
        self.last_error: str = ""
        # the last few distinct errors nats-py reported (a refused auth is an
        # AuthorizationError, then the server's reset)
        self._recent_errors: collections.deque[str] = collections.deque(maxlen=3)
        self.disconnects = 0
        self.reconnects = 0

    @classmethod
    def get(
        cls: type[C],
        servers: str | Sequence[str],
        *,
        timeout_s: float,
        connect_options: Mapping[str, Any] | None = None,
    ) -> C:
        """The shared connection of ``servers`` + ``connect_options``, connected.

        The same servers and options (compared by value; an unhashable option
        by identity) give the same object, until its last :meth:`release`.

        Args:
            servers: one URL, comma-separated URLs or a sequence of them.
            timeout_s: bound of the first connect.
            connect_options: passed to ``nats.connect`` (``tls``,
                ``user_credentials``, ``token``, ``user``, ``password``, and
                any other), over logstate's :data:`DEFAULT_CONNECT_OPTIONS`.

        Raises:
            ReplicationError: no server could be connected within ``timeout_s``.
            ValueError: ``servers`` names no URL.
        """
        urls = _servers_list(servers)
        options = dict(connect_options or {})
        key = (cls, tuple(urls), tuple(sorted((k, _option_key(v)) for k, v in options.items())))
        with cls._registry_lock:
            found = cls._registry.get(key)
            if found is None:
                found = cls(key, urls, options)
                cls._registry[key] = found
            found._refs += 1
        client = cast(C, found)
        try:
            client._connection(timeout_s)
        except BaseException:
            client.release()
            raise
        return client

    @classmethod
    def _forget_in_child(cls) -> None:
        # a forked child: the parent's connections live on a loop the child
        # does not run; they are never closed nor shared here (nor collected:
        # finalizing their transports would close sockets the child shares)
        _loop.keep_in_child(cls._registry)
        cls._registry = {}
        cls._registry_lock = threading.Lock()

    def release(self) -> None:
        """Give back one :meth:`get`; the last one closes the connection (bounded, 2 s)."""
        if self._pid != os.getpid():
            return  # the parent's client, in a forked child: nothing of it is ours
        with self._registry_lock:
            if self._released:
                return
            self._refs -= 1
            if self._refs > 0:
                return
            self._released = True
            if self._registry.get(self._key) is self:
                del self._registry[self._key]
            nc, self._nc = self._nc, None
        if nc is not None:
            try:
                _loop.run(asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S), CLOSE_TIMEOUT_S)
            except (Exception, asyncio.CancelledError) as exc:
                _log.debug("closing the NATS connection to %s: %r", self.servers, exc)

    def _connection(self, timeout_s: float) -> NATS:
        if self._pid != os.getpid():
            raise ReplicationError(
                "",
                "",
                f"this NATS connection belongs to process {self._pid}, and process "
                f"{os.getpid()} is a child forked from it: get a new one in the child",
            )
        if self._released:
            raise ReplicationError("", "", f"the NATS connection to {self.servers} was released")
        nc = self._nc
        if nc is not None and not nc.is_closed:
            return nc
        if not self._connect_lock.acquire(timeout=timeout_s):
            raise ReplicationError(
                "", "", f"connecting to {self.servers}: busy for {timeout_s:g} s"
            )
        try:
            nc = self._nc
            if nc is None or nc.is_closed:
                nc = self._connect(timeout_s)
                self._nc = nc
                self.max_payload = nc.max_payload
            return nc
        finally:
            self._connect_lock.release()

    def _connect(self, timeout_s: float) -> NATS:
        nc = NATS()

        async def error_cb(exc: Exception) -> None:
            self.last_error = repr(exc)
            if self.last_error in self._recent_errors:
                self._recent_errors.remove(self.last_error)
            self._recent_errors.append(self.last_error)
            _log.debug("NATS %s: %r", self.servers, exc)

        async def disconnected_cb() -> None:
            self.disconnects += 1

        async def reconnected_cb() -> None:
            self.reconnects += 1

        options: dict[str, Any] = {
            **DEFAULT_CONNECT_OPTIONS,
            "connect_timeout": max(0.1, min(timeout_s, 2.0)),
            "name": f"logstate-{os.getpid()}",
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            **self._options,
        }

        async def connect() -> None:
            try:
                await asyncio.wait_for(nc.connect(self.servers, **options), timeout_s)
            except BaseException:
                # the first connect failed: stop its retries, free what it made
                try:
                    await asyncio.wait_for(nc.close(), 1.0)
                except (Exception, asyncio.CancelledError) as exc:
                    _log.debug("closing a failed NATS connect: %r", exc)
                raise

        self._recent_errors.clear()
        try:
            _loop.run(connect(), timeout_s)
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError, TimeoutError):
            raise ReplicationError(
                "",
                "",
                f"cannot connect to {self.servers} within {timeout_s:g} s "
                f"(errors: {'; '.join(self._recent_errors) or 'none'})",
            ) from None
        except (nats.errors.Error, OSError) as exc:
            raise ReplicationError("", "", f"cannot connect to {self.servers}: {exc!r}") from exc
        return nc

    def connection_stats(self) -> dict[str, object]:
        """Where the connection stands: connected URL, disconnects, reconnects, last error."""
        nc = self._nc
        url = nc.connected_url if nc is not None else None
        return {
            "servers": list(self.servers),
            "connected": bool(nc is not None and nc.is_connected),
            "connected_url": url.geturl() if url is not None else None,
            "disconnects": self.disconnects,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------ plumbing
    def _call(
        self,
        stream: str,
        what: str,
        work: Coroutine[Any, Any, T],
        timeout_s: float,
        total_s: float | None = None,
    ) -> T:
        """Run ``work`` on the loop bounded by ``total_s`` (default ``timeout_s``)."""
        bound = timeout_s if total_s is None else total_s
        try:
            try:
                return _loop.run(_bounded(work, bound), bound)
            finally:
                if inspect.getcoroutinestate(work) == inspect.CORO_CREATED:
                    work.close()  # the loop refused it: no "never awaited" warning
        except ReplicationError:
            raise
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError, TimeoutError):
            raise ReplicationError(
                stream,
                "",
                f"{what}: no answer within {bound:g} s"
                f"{'' if self.connected else ' (not connected: ' + (self.last_error or '?') + ')'}",
            ) from None
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            raise ReplicationError(
                stream,
                "",
                f"{what}: no responders (no stream for the subject, or JetStream not available)",
            ) from None
        except nats.js.errors.APIError as exc:
            raise ApiError(
                stream, what, exc.err_code or 0, exc.code or 0, exc.description or ""
            ) from None
        except nats.errors.Error as exc:
            raise ReplicationError(stream, "", f"{what}: {type(exc).__name__}: {exc}") from exc

    def _start(
        self, work: Coroutine[Any, Any, T], timeout_s: float
    ) -> concurrent.futures.Future[T] | None:
        """Start ``work`` on the loop bounded by ``timeout_s`` and return at once:
        its future, whose exception is nats-py's or the loop's as raised
        (not turned into logstate's); None (``work`` closed) when not
        connected now, in a forked child or from the loop thread."""
        nc = self._nc
        if self._pid != os.getpid() or self._released or nc is None or not nc.is_connected:
            work.close()
            return None
        try:
            future = _loop.submit(_bounded(work, timeout_s))
        except RuntimeError:  # (no loop thread can start: the interpreter shuts down)
            future = None
        if future is None:
            work.close()  # (never started: no "never awaited" warning)
        return future

    @property
    def connected(self) -> bool:
        nc = self._nc
        return bool(nc is not None and nc.is_connected)

    async def _api(
        self, nc: NATS, stream: str, subject: str, body: Mapping[str, Any] | None, timeout_s: float
    ) -> dict[str, Any]:
        payload = json.dumps(body).encode() if body is not None else b""
        msg = await nc.request(subject, payload, timeout=timeout_s)
        answer: dict[str, Any] = json.loads(msg.data)
        if "error" in answer:
            raise api_error(stream, subject, answer["error"])
        return answer


async def _bounded(work: Coroutine[Any, Any, T], bound: float) -> T:
    """``work`` with a deadline of ``bound`` seconds."""
    if sys.version_info >= (3, 11):
        # a deadline on this task: no task of its own around ``work``, so
        # fewer loop steps, each one more hand-over of the GIL between
        # threads (a publish is the call made for every message)
        async with asyncio.timeout(bound):
            return await work
    return await asyncio.wait_for(work, bound)


os.register_at_fork(after_in_child=Connection._forget_in_child)
