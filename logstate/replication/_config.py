"""A changelog's options: the broker, the stream, the partition, and how to ship.

Owns: the option checks and defaults, the names derived from them (the
partition's subject, the snapshot bucket and object names), and the shared
broker connection they open (``client()``).
Must never: open a store or hold state of one (``_replicator`` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from logstate._errors import ReplicationError
from logstate.replication import _wire as wire
from logstate.replication._client import Client

__all__ = ["ACK_MODES", "RESTORE_MODES", "ChangelogConfig", "bucket_name", "snapshot_name"]

ACK_MODES: Final = ("async", "sync")
RESTORE_MODES: Final = ("if-missing", "if-behind", "rebase")


def _positive(name: str, value: object, kind: type = int) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise TypeError(
            f"{name} must be {'a number' if kind is float else 'an int'}, got {value!r}"
        )
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def bucket_name(stream: str) -> str:
    """The object store bucket of a stream's replication snapshots."""
    return f"{stream}_snapshots"


def snapshot_name(partition: str, seq: int) -> str:
    return f"{partition}/{seq:020d}"


class ChangelogConfig:
    """The options of one partition's changelog (``JetStreamChangelog``'s arguments).

    Args:
        servers: a ``nats://`` URL, or several (a cluster).
        stream: the JetStream stream; created (file storage, ``replicas``)
            when missing, used as it is when it exists.
        partition: this storage's name in the stream (subject tokens:
            letters, digits, ``_``, ``-``, joined by ``.``).
        ack: ``"async"`` (a commit returns after the local fsync; a
            background shipper publishes) or ``"sync"`` (a commit that made
            a record durable returns once the broker acknowledged it; the
            publish is sent while the local fdatasync runs).
        timeout: seconds any one broker operation may take; a sync commit
            waits at most this long, then raises ``ReplicationError``.
        max_lag_bytes: the bound on records committed but not acknowledged;
            past it writers wait (at most ``timeout``).
        snapshot_every: bytes shipped between two automatic snapshots.
        keep_snapshots: snapshots kept; stream messages older than the
            oldest kept are purged.
        replicas: the stream's replicas when this creates it.
        subject_prefix: the partition's subject is ``prefix.partition``
            (default ``logstate.<stream>``).
        connect_options: passed to ``nats.connect`` (``tls=``,
            ``user_credentials=``, ``token=`` ...).

    Raises:
        TypeError / ValueError: an option of the wrong type or value.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        stream: str,
        partition: str,
        *,
        ack: str = "async",
        timeout: float = 10.0,
        max_lag_bytes: int = 64 * 1024 * 1024,
        snapshot_every: int = 256 * 1024 * 1024,
        keep_snapshots: int = 2,
        replicas: int = 1,
        subject_prefix: str | None = None,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(servers, str):
            servers = [servers]
        if not servers or not all(isinstance(s, str) and s for s in servers):
            raise TypeError(f"servers must be a URL or a list of URLs, got {servers!r}")
        if not isinstance(stream, str) or not wire.PARTITION_RE.match(stream) or "." in stream:
            raise ValueError(f"stream {stream!r}: letters, digits, '_' and '-' only")
        if ack not in ACK_MODES:
            raise ValueError(f"ack must be 'async' or 'sync', got {ack!r}")
        self.servers = list(servers)
        self.stream = stream
        self.partition = wire.check_partition(partition)
        self.ack = ack
        self.timeout_s = float(_positive("timeout", timeout, float))
        self.max_lag_bytes = _positive("max_lag_bytes", max_lag_bytes)
        self.snapshot_every = _positive("snapshot_every", snapshot_every)
        self.keep_snapshots = _positive("keep_snapshots", keep_snapshots)
        self.replicas = _positive("replicas", replicas)
        prefix = subject_prefix if subject_prefix is not None else f"logstate.{stream}"
        self.subject_prefix = prefix
        self.subject = f"{prefix}.{partition}"
        self.connect_options = dict(connect_options or {})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.servers!r}, stream={self.stream!r}, "
            f"partition={self.partition!r}, ack={self.ack!r})"
        )

    def ensure_stream(self, client: Client) -> None:
        """Create the stream if missing; refuse one (the user made) whose subjects
        do not take the partition's.

        Raises:
            ReplicationError: naming the stream's subjects and the one needed.
        """
        info = client.ensure_stream(
            self.stream, [f"{self.subject_prefix}.>"], self.replicas, self.timeout_s
        )
        subjects = list(info.get("config", {}).get("subjects") or [])
        if not wire.subject_covered(subjects, self.subject):
            raise ReplicationError(
                self.stream,
                self.partition,
                f"the stream's subjects {subjects} do not take {self.subject!r}: add "
                f"{self.subject_prefix + '.>'!r} to them, or pass subject_prefix=",
            )

    def client(self) -> Client:
        return Client.get(
            self.servers, timeout_s=self.timeout_s, connect_options=self.connect_options
        )
