"""The Quix Streams 3 store partition on one logstate directory.

Owns: :class:`LogstateStorePartition` (Quix's ``StorePartition`` ABC): one logstate directory per
partition; every Quix flush (all column families, the TTL bookkeeping and
the changelog offset) written as ONE atomic logstate group; changelog
recovery buffered and written as one group with its offset every
``recovery_batch_size`` messages and at ``complete_recovery`` / ``close``;
point reads, ordered range reads and the partition-side methods Quix's own
RocksDB transactions call (their TTL part is in ``_ttl_partition`` and
``_ttl``; the windowed and timestamped variants are in ``stores``).
Must never: report a changelog offset ahead of what is written (the offset
rides in the same group as the data it covers), write a flush or a recovery
batch in more than one group, or reach into logstate's private modules.

The transactions are Quix's own (``RocksDBPartitionTransaction``,
``WindowedRocksDBPartitionTransaction``, ``TimestampedPartitionTransaction``):
their caching, serialization, TTL stamping and window logic run unchanged on
this partition, which gives them what a ``RocksDBStorePartition`` gives them.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any, Final, Literal, cast

from quixstreams.state.base import PartitionTransactionCache, StorePartition
from quixstreams.state.metadata import (
    METADATA_CF_NAME,
    TTL_INDEX_CF_NAME,
    TTL_MIGRATION_DONE_KEY,
    TTL_SYSTEM_CF_NAME,
    Marker,
)
from quixstreams.state.recovery import ChangelogProducer
from quixstreams.state.rocksdb.metadata import CHANGELOG_OFFSET_KEY
from quixstreams.state.rocksdb.options import RocksDBOptions
from quixstreams.state.rocksdb.transaction import RocksDBPartitionTransaction
from quixstreams.state.rocksdb.types import RocksDBOptionsType
from quixstreams.state.serialization import int_from_bytes, int_to_bytes

from logstate import LocalFileStorage
from logstate.integrations.quixstreams._keys import cf_prefix, fold_key, key_to_bytes
from logstate.integrations.quixstreams._ranges import iter_range, open_storage
from logstate.integrations.quixstreams._recovery import OFFSET_KEY as _OFFSET_KEY
from logstate.integrations.quixstreams._recovery import RecoveryPartitionMethods
from logstate.integrations.quixstreams._ttl import TtlState
from logstate.integrations.quixstreams._ttl_partition import TtlPartitionMethods

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "DEFAULT_RECOVERY_BATCH_SIZE",
    "LogstateStorePartition",
    "check_partition_options",
]

logger = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_S: Final = 30.0  # about Quix's RocksDB open retries (10 x 3 s)
DEFAULT_RECOVERY_BATCH_SIZE: Final = 1000  # changelog messages per recovery group
_VALUE_CACHE_ENTRIES: Final = 16384  # values a partition keeps in memory (RocksDB: block cache)
_SYNC_MODES: Final = (None, "none", "interval", "always")


def check_partition_options(
    sync: object, lock_timeout_s: object, recovery_batch_size: object
) -> None:
    """Check the logstate options of a partition (see :class:`LogstateStorePartition`).

    Raises:
        TypeError / ValueError: naming the bad option.
    """
    if sync not in _SYNC_MODES:
        raise ValueError(f"sync must be one of {_SYNC_MODES}, got {sync!r}")
    if isinstance(lock_timeout_s, bool) or not isinstance(lock_timeout_s, (int, float)):
        raise TypeError(f"lock_timeout_s must be a number of seconds, got {lock_timeout_s!r}")
    if not lock_timeout_s >= 0:
        raise ValueError(f"lock_timeout_s must be >= 0, got {lock_timeout_s!r}")
    if type(recovery_batch_size) is not int or recovery_batch_size < 1:
        raise ValueError(f"recovery_batch_size must be an int >= 1, got {recovery_batch_size!r}")


class LogstateStorePartition(RecoveryPartitionMethods, TtlPartitionMethods, StorePartition):
    """One Quix store partition in one logstate directory.

    Args:
        path: the partition's directory (created when missing).
        options: Quix's options object (``RocksDBOptions``): its ``dumps`` /
            ``loads`` and TTL settings are used, the RocksDB tuning is not.
        changelog_producer: the partition's changelog producer, if any.
        sync: logstate's durability mode, "none", "interval" (logstate's
            default) or "always" (see logstate's docs/durability.md).
        lock_timeout_s: seconds to wait for another process to release the
            directory (a partition handed over in a rebalance).
        recovery_batch_size: changelog messages written per atomic group
            during recovery.
        stop_event: set on application shutdown; stops the lock wait.

    Raises:
        TypeError / ValueError: a bad argument (nothing is opened).
        StorageLockedError: another process still holds the directory.
        IncompatibleStateStoreError: the stored TTL format is newer than this Quix's.
    """

    # Class-level switch read by Quix's transactions: True here (TTL stamps
    # are available; the per-instance attribute says whether they are on),
    # False for the windowed and timestamped partitions (their own retention).
    uses_ttl_stamps: bool = True
    # read by Quix's RocksDB transaction on its partition: no legacy-flagged
    # store with TTL artifacts and no provisional v3.24.0 adoption exist here
    _ttl_stamped_reads_unflagged: bool = False
    _adopt_provisional: bool = False
    # warn-once flags Quix's RocksDB transaction sets on its partition
    _unstamped_read_warned: bool = False
    _double_wrap_read_warned: bool = False
    _stamped_legacy_read_warned: bool = False

    def __init__(
        self,
        path: str,
        options: RocksDBOptionsType | None = None,
        changelog_producer: ChangelogProducer | None = None,
        *,
        sync: str | None = None,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        recovery_batch_size: int = DEFAULT_RECOVERY_BATCH_SIZE,
        stop_event: threading.Event | None = None,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise TypeError(f"path must be a non-empty str, got {path!r}")
        check_partition_options(sync, lock_timeout_s, recovery_batch_size)
        opts: RocksDBOptionsType = options if options is not None else RocksDBOptions()
        super().__init__(opts.dumps, opts.loads, changelog_producer)
        self._path = path
        self._recovery_batch_size = recovery_batch_size
        self._prefixes: dict[str, str] = {}
        # recently read or written values by folded key (a bounded read cache)
        self._values: dict[str, bytes] = {}
        # a legacy-TTL backfill staged at prepare, written by the next write()
        self._pending_backfill: list[tuple[str, bytes | None]] = []
        # recovery buffer: folded key -> value (None: delete), and its offset
        self._recovery_ops: dict[str, bytes | None] = {}
        self._recovery_offset: int | None = None
        self._recovery_messages = 0
        self._recovery_saw_stamped = False
        self._recovery_saw_migration_done = False
        # keys this process put in the census; whether it held any at first
        self._recovery_census: set[bytes] = set()
        self._census_found: bool | None = None
        self._closed = True
        self._storage: LocalFileStorage = open_storage(
            path, sync, float(lock_timeout_s), stop_event
        )
        self._closed = False
        try:
            self._ttl = TtlState(opts, path, self._read, self._iterate, type(self).uses_ttl_stamps)
        except BaseException:
            self.close()
            raise
        self.uses_ttl_stamps = self._ttl.enabled_at_open
        self._ttl_flag_persisted = self.uses_ttl_stamps
        self._migration_done_at_open = (
            self._read(TTL_SYSTEM_CF_NAME, TTL_MIGRATION_DONE_KEY) is not None
        )

    # ------------------------------------------------------------------ keys
    def _prefix(self, cf_name: str) -> str:
        prefix = self._prefixes.get(cf_name)
        if prefix is None:
            prefix = self._prefixes[cf_name] = cf_prefix(cf_name)
        return prefix

    def _fold(self, cf_name: str, key: bytes) -> str:
        return fold_key(self._prefix(cf_name), cf_name, key)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the logstate store partition at {self._path!r} is closed")

    # ------------------------------------------------------------------ reads
    def get(self, key: bytes, cf_name: str = "default") -> bytes | Literal[Marker.UNDEFINED]:
        """The stored value of ``key`` in ``cf_name``, or ``Marker.UNDEFINED``.

        Raises:
            RuntimeError: the partition is closed.
            TypeError: ``key`` is not bytes.
        """
        if self._recovery_offset is not None:
            self._flush_recovery()
        prefix = self._prefixes.get(cf_name) or self._prefix(cf_name)
        if type(key) is not bytes:
            key = self._bytes_key(key)
        folded = prefix + key.decode("latin-1")
        value = self._values.get(folded)
        if value is None:
            value = self._storage.get(folded)  # a closed partition raises here
            if value is None:
                return Marker.UNDEFINED
            self._remember(folded, cast(bytes, value))
        return cast(bytes, value)

    def _remember(self, folded: str, value: bytes) -> None:
        values = self._values
        values[folded] = value
        if len(values) > _VALUE_CACHE_ENTRIES:
            del values[next(iter(values))]  # the oldest entry

    def exists(self, key: bytes, cf_name: str = "default") -> bool:
        """True when ``key`` is stored in ``cf_name``."""
        if self._recovery_offset is not None:
            self._flush_recovery()
        key = self._bytes_key(key)
        return self._storage.contains_key(self._prefix(cf_name) + key.decode("latin-1"))

    @staticmethod
    def _bytes_key(key: object) -> bytes:
        if not isinstance(key, bytes):
            raise TypeError(f"Quix state keys are bytes, got {type(key).__name__}")
        return key

    def _read(self, cf_name: str, key: bytes) -> bytes | None:
        value = self.get(key, cf_name)
        return None if value is Marker.UNDEFINED else value

    def iter_items(
        self,
        lower_bound: bytes,
        upper_bound: bytes | None = None,
        backwards: bool = False,
        cf_name: str = "default",
    ) -> Iterator[tuple[bytes, bytes]]:
        """``(key, value)`` of ``cf_name`` with ``lower_bound <= key < upper_bound``, in order.

        Raises:
            ValueError: ``backwards`` without an upper bound (as RocksDB's partition).
            TypeError: a bound is not bytes.
        """
        if backwards and upper_bound is None:
            raise ValueError("Backwards iteration requires an upper bound to seek from")
        self._check_open()
        if self._recovery_offset is not None:
            self._flush_recovery()
        prefix = self._prefix(cf_name)
        start = prefix + self._bytes_key(lower_bound).decode("latin-1")
        stop = (
            None if upper_bound is None else prefix + self._bytes_key(upper_bound).decode("latin-1")
        )
        cut = len(prefix)
        for key, value in iter_range(self._storage, start, stop, prefix, backwards):
            yield key_to_bytes(key[cut:]), value

    def _iterate(
        self, cf_name: str, lower: bytes, upper: bytes | None
    ) -> Iterator[tuple[bytes, bytes]]:
        return self.iter_items(lower, upper, cf_name=cf_name)

    def main_cf_has_user_data(self) -> bool:
        """True when the ``default`` column family holds at least one key."""
        return next(self.iter_items(b""), None) is not None

    # ------------------------------------------------------------------ writes
    def write(self, cache: PartitionTransactionCache, changelog_offset: int | None) -> None:
        """Write one Quix flush (every column family, TTL bookkeeping, offset) as ONE group.

        Raises:
            RuntimeError: the partition is closed.
            QuixKeyTooLongError: a key does not fit a logstate key (nothing written).
            OSError / logstate errors: the write failed (nothing, or all of it, is written).
        """
        self._check_open()
        if self._recovery_offset is not None:
            self._flush_recovery()
        ttl_on = self.uses_ttl_stamps
        staged_default: set[bytes] = set()
        staged_index: set[bytes] = set()
        ops: list[tuple[str, bytes | None]] = list(self._pending_backfill)  # first: the flush wins
        append = ops.append
        for cf_name in cache.get_column_families():
            prefix = self._prefix(cf_name)
            for prefix_updates in cache.get_updates(cf_name=cf_name).values():
                for key, value in prefix_updates.items():
                    append((fold_key(prefix, cf_name, key), value))
                if ttl_on and cf_name == "default":
                    staged_default.update(prefix_updates)
                elif ttl_on and cf_name == TTL_INDEX_CF_NAME:
                    staged_index.update(prefix_updates)
            for key in cache.get_deletes(cf_name=cf_name):
                append((fold_key(prefix, cf_name, key), None))
        if ttl_on:
            for ttl_cf, ttl_key, ttl_value in self._ttl.flush_ops(
                self._ttl_flag_persisted, staged_default, staged_index
            ):
                append((self._fold(ttl_cf, ttl_key), ttl_value))
        if changelog_offset is not None:
            append((_OFFSET_KEY, int_to_bytes(self._check_offset(changelog_offset))))
        self._commit(ops)
        self._pending_backfill = []
        if ttl_on:
            self._ttl_flag_persisted = True  # after the group, never before

    def _commit(self, ops: list[tuple[str, bytes | None]]) -> None:
        """Write ``ops`` as one group; the value cache follows only a written group."""
        values = self._values
        self._values = {}  # until the group is written: interrupted, the cache is empty, not stale
        with self._storage.batch() as batch:
            for key, value in ops:
                if value is None:
                    batch.remove(key)
                else:
                    batch.set(key, value)
        self._values = self._cache_written(values, ops)

    @staticmethod
    def _cache_written(
        values: dict[str, bytes], ops: list[tuple[str, bytes | None]]
    ) -> dict[str, bytes]:
        """``values`` updated with the written ``ops`` (a copy of each value: orjson's
        bytes keep their ~4 KiB allocation, a copy is right-sized)."""
        for key, value in ops:
            if value is None:
                values.pop(key, None)
            else:
                values[key] = bytes(memoryview(value))
        while len(values) > _VALUE_CACHE_ENTRIES:
            del values[next(iter(values))]  # the oldest entries
        return values

    @staticmethod
    def _check_offset(offset: object) -> int:
        if type(offset) is not int:
            raise TypeError(f"a changelog offset must be an int, got {offset!r}")
        if offset < 0:
            raise ValueError(f"a changelog offset must be >= 0, got {offset}")
        return offset

    def get_changelog_offset(self) -> int | None:
        """The changelog offset the written state is up to date with, or None.

        Buffered recovery messages are written first, so the answer is never
        ahead of (nor behind) what is stored.
        """
        raw = self._read(METADATA_CF_NAME, CHANGELOG_OFFSET_KEY)
        return None if raw is None else int_from_bytes(raw)

    def write_changelog_offset(self, offset: int) -> None:
        """Move the changelog offset without data (a skipped recovery message); buffered."""
        self._check_open()
        self._buffer([], self._check_offset(offset))

    # ------------------------------------------------------------------ lifecycle
    def begin(self) -> RocksDBPartitionTransaction:
        """A new transaction (Quix's own RocksDB transaction, on this partition)."""
        self._check_open()
        return RocksDBPartitionTransaction(
            partition=cast(Any, self),
            dumps=self._dumps,
            loads=self._loads,
            changelog_producer=self._changelog_producer,
        )

    @property
    def path(self) -> str:
        """The partition's directory."""
        return self._path

    @property
    def storage(self) -> LocalFileStorage:
        """The logstate storage (for stats and maintenance; writing to it bypasses Quix)."""
        return self._storage

    def close(self) -> None:
        """Write what recovery buffered, then release the directory. Idempotent."""
        if self._closed:
            return
        try:
            self._flush_recovery()
        finally:
            self._closed = True
            self._values = {}
            self._storage.close()

    @classmethod
    def destroy(cls, path: str) -> None:
        """Delete a (closed) partition directory and everything in it."""
        if os.path.isdir(path):
            shutil.rmtree(path)
