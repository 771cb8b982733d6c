"""The Quix Streams 3 stores on logstate, and the windowed and timestamped partitions.

Owns: :class:`LogstateStore` (Quix's ``Store`` ABC, constructed as Quix's
own ``RocksDBStore`` is: ``name``, ``stream_id``, ``base_dir``,
``changelog_producer_factory``, ``options``, plus logstate's ``sync``,
``lock_timeout_s`` and ``recovery_batch_size``), its windowed and timestamped
variants, the directory layout (``base_dir/<store name>/<stream_id>/<partition>``,
RocksDBStore's), and the windowed and timestamped partitions (Quix's own
windowed and timestamped transactions on a logstate partition).
Must never: open a partition directory anywhere but where RocksDBStore would
put it, or delete one that is open.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from quixstreams.state.base import Store
from quixstreams.state.recovery import ChangelogProducerFactory
from quixstreams.state.rocksdb.timestamped import TimestampedPartitionTransaction
from quixstreams.state.rocksdb.types import RocksDBOptionsType
from quixstreams.state.rocksdb.windowed.transaction import WindowedRocksDBPartitionTransaction

from logstate.integrations.quixstreams.partition import (
    DEFAULT_LOCK_TIMEOUT_S,
    DEFAULT_RECOVERY_BATCH_SIZE,
    LogstateStorePartition,
    check_partition_options,
)

__all__ = [
    "LogstateStore",
    "LogstateTimestampedStore",
    "LogstateTimestampedStorePartition",
    "LogstateWindowedStore",
    "LogstateWindowedStorePartition",
]


class LogstateWindowedStorePartition(LogstateStorePartition):
    """A windowed partition (tumbling, hopping, sliding windows): no TTL stamps."""

    uses_ttl_stamps = False

    def iter_keys(self, cf_name: str = "default") -> Iterator[bytes]:
        """Every key of ``cf_name``, in order."""
        for key, _ in self.iter_items(b"", cf_name=cf_name):
            yield key

    def begin(self) -> WindowedRocksDBPartitionTransaction:
        """A new windowed transaction (Quix's own)."""
        self._check_open()
        return WindowedRocksDBPartitionTransaction(
            partition=cast(Any, self),
            dumps=self._dumps,
            loads=self._loads,
            changelog_producer=self._changelog_producer,
        )


class LogstateTimestampedStorePartition(LogstateStorePartition):
    """A timestamped partition (joins, lookups): no TTL stamps, ``grace_ms`` retention.

    Args:
        grace_ms: how long a key's older values stay eligible (ms).
        keep_duplicates: keep every value of a timestamp, not only the last.
        path, options, ...: as :class:`LogstateStorePartition`.
    """

    uses_ttl_stamps = False

    def __init__(
        self, path: str, *args: Any, grace_ms: int, keep_duplicates: bool, **kwargs: Any
    ) -> None:
        if type(grace_ms) is not int or grace_ms < 0:
            raise ValueError(f"grace_ms must be an int >= 0, got {grace_ms!r}")
        super().__init__(path, *args, **kwargs)
        self._grace_ms = grace_ms
        self._keep_duplicates = bool(keep_duplicates)

    def begin(self) -> TimestampedPartitionTransaction:
        """A new timestamped transaction (Quix's own)."""
        self._check_open()
        return TimestampedPartitionTransaction(
            partition=cast(Any, self),
            dumps=self._dumps,
            loads=self._loads,
            grace_ms=self._grace_ms,
            keep_duplicates=self._keep_duplicates,
            changelog_producer=self._changelog_producer,
        )


class LogstateStore(Store):
    """A Quix store whose partitions are logstate directories.

    Args:
        name: the store name.
        stream_id: the stream (topic) id, or None.
        base_dir: the state directory (Quix passes ``<state_dir>/<consumer group>``).
        changelog_producer_factory: Quix's changelog producer factory, if changelogs are used.
        options: Quix's ``RocksDBOptions`` (``dumps``/``loads`` and TTL settings are used).
        sync: logstate's durability mode ("none", "interval", "always"; None: logstate's default).
        lock_timeout_s: seconds a partition open waits for another process's lock.
        recovery_batch_size: changelog messages per atomic group during recovery.
        stop_event: the application's stop signal; ends a lock wait early.

    Raises:
        TypeError / ValueError: a bad argument.
    """

    def __init__(
        self,
        name: str,
        stream_id: str | None,
        base_dir: str,
        changelog_producer_factory: ChangelogProducerFactory | None = None,
        options: RocksDBOptionsType | None = None,
        *,
        sync: str | None = None,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        recovery_batch_size: int = DEFAULT_RECOVERY_BATCH_SIZE,
        stop_event: threading.Event | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if not isinstance(base_dir, (str, Path)) or not str(base_dir):
            raise TypeError(f"base_dir must be a directory path, got {base_dir!r}")
        check_partition_options(sync, lock_timeout_s, recovery_batch_size)
        super().__init__(name, stream_id)
        partitions_dir = Path(base_dir).absolute() / name
        if stream_id:
            partitions_dir = partitions_dir / stream_id
        self._partitions_dir = partitions_dir
        self._changelog_producer_factory = changelog_producer_factory
        self._options = options
        self._partition_kwargs: dict[str, Any] = {
            "sync": sync,
            "lock_timeout_s": lock_timeout_s,
            "recovery_batch_size": recovery_batch_size,
            "stop_event": stop_event,
        }

    def partition_path(self, partition: int) -> str:
        """The directory of partition number ``partition``."""
        return str(self._partitions_dir / str(partition))

    def create_new_partition(self, partition: int) -> LogstateStorePartition:
        """Open partition ``partition`` (created when missing; waits for another process's lock)."""
        if type(partition) is not int or partition < 0:
            raise ValueError(f"partition must be an int >= 0, got {partition!r}")
        producer = None
        if self._changelog_producer_factory is not None:
            producer = self._changelog_producer_factory.get_partition_producer(partition)
        return self._open_partition(self.partition_path(partition), producer)

    def _open_partition(self, path: str, producer: Any) -> LogstateStorePartition:
        return LogstateStorePartition(path, self._options, producer, **self._partition_kwargs)

    def destroy_partition(self, partition: int) -> bool:
        """Delete the persisted data of partition ``partition`` (revoked first).

        Returns:
            True when there was a directory to delete.

        Raises:
            RuntimeError: the partition is still assigned (open).
        """
        if partition in self._partitions:
            raise RuntimeError(
                f'partition {partition} of store "{self.name}" is assigned; revoke it first'
            )
        path = self.partition_path(partition)
        if not Path(path).exists():
            return False
        LogstateStorePartition.destroy(path)
        return True


class LogstateWindowedStore(LogstateStore):
    """A windowed Quix store on logstate (what ``register_windowed_store`` makes)."""

    def _open_partition(self, path: str, producer: Any) -> LogstateWindowedStorePartition:
        return LogstateWindowedStorePartition(
            path, self._options, producer, **self._partition_kwargs
        )


class LogstateTimestampedStore(LogstateStore):
    """A timestamped Quix store on logstate (joins and lookups).

    Args:
        grace_ms: retention of older values of a key (ms).
        keep_duplicates: keep every value of one timestamp.
        name, stream_id, base_dir, ...: as :class:`LogstateStore`.
    """

    def __init__(
        self,
        name: str,
        stream_id: str | None,
        base_dir: str,
        grace_ms: int,
        keep_duplicates: bool,
        changelog_producer_factory: ChangelogProducerFactory | None = None,
        options: RocksDBOptionsType | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, stream_id, base_dir, changelog_producer_factory, options, **kwargs)
        if type(grace_ms) is not int or grace_ms < 0:
            raise ValueError(f"grace_ms must be an int >= 0, got {grace_ms!r}")
        self._grace_ms = grace_ms
        self._keep_duplicates = bool(keep_duplicates)

    def _open_partition(self, path: str, producer: Any) -> LogstateTimestampedStorePartition:
        return LogstateTimestampedStorePartition(
            path,
            self._options,
            producer,
            grace_ms=self._grace_ms,
            keep_duplicates=self._keep_duplicates,
            **self._partition_kwargs,
        )
