"""The partition methods Quix's RocksDB transaction calls for TTL, on a logstate partition.

Owns: :class:`TtlPartitionMethods`, the mixin of ``LogstateStorePartition``
with the names Quix's ``RocksDBPartitionTransaction`` reads on its partition
(``high_water_ms``, ``advance_high_water``, ``sweep_expired_into_cache``,
``backfill_legacy_records``, the TTL option properties and the v3.24.0
adoption no-ops), each handing over to ``_ttl.TtlState`` or staging
operations for the partition's next group.
Must never: write to the storage itself (the partition's ``write`` does, in
one group), or change these names (they are Quix's).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

from quixstreams.state.base import PartitionTransactionCache
from quixstreams.state.metadata import TTL_BACKFILL_PENDING_CF_NAME, TTL_INDEX_CF_NAME
from quixstreams.state.recovery import ChangelogProducer
from quixstreams.state.rocksdb.ttl_codec import decode_index_key

from logstate.integrations.quixstreams._ttl import (
    TtlState,
    backfill_ops,
    migration_done_ops,
    produce_backfill,
)

__all__ = ["TtlPartitionMethods"]

logger = logging.getLogger(__name__)


class TtlPartitionMethods:
    """Quix's TTL-facing partition methods (a mixin of ``LogstateStorePartition``)."""

    # provided by the partition
    _ttl: TtlState
    _path: str
    _pending_backfill: list[tuple[str, bytes | None]]
    _changelog_producer: ChangelogProducer | None

    if TYPE_CHECKING:

        def iter_items(
            self,
            lower_bound: bytes,
            upper_bound: bytes | None = None,
            backwards: bool = False,
            cf_name: str = "default",
        ) -> Iterator[tuple[bytes, bytes]]: ...

        def _fold(self, cf_name: str, key: bytes) -> str: ...

        def _prefix(self, cf_name: str) -> str: ...

        def _read(self, cf_name: str, key: bytes) -> bytes | None: ...

        def _commit(self, ops: list[tuple[str, bytes | None]]) -> None: ...

    @property
    def high_water_ms(self) -> int | None:
        """The highest record event time seen (ms), or None."""
        return self._ttl.high_water_ms

    @property
    def max_evictions_per_flush(self) -> int:
        """Cap on the sweep's visits per flush."""
        return self._ttl.max_evictions_per_flush

    @property
    def legacy_records_ttl(self) -> timedelta | None:
        """Quix's ``legacy_records_ttl`` option (the uniform expiry of a legacy-TTL backfill)."""
        return self._ttl.legacy_records_ttl

    @property
    def legacy_backfill_chunk_size(self) -> int:
        """Quix's ``legacy_backfill_chunk_size`` option."""
        return self._ttl.legacy_backfill_chunk_size

    @property
    def ttl_changelog_tombstones(self) -> bool:
        """Whether TTL evictions are produced to the changelog as tombstones."""
        return self._ttl.ttl_changelog_tombstones

    def advance_high_water(self, timestamp: int | None) -> None:
        """Advance the event-time high-water mark (never backwards)."""
        self._ttl.advance_high_water(timestamp)

    def _now_ms(self) -> int:
        """Wall-clock ms: Quix uses it only to classify stamps, never to expire."""
        return int(time.time() * 1000)

    def sweep_expired_into_cache(
        self,
        cache: PartitionTransactionCache,
        staged_default_keys: set[bytes],
        staged_ttl_index_keys: set[bytes],
    ) -> None:
        """Stage the deletes of expired values (and their index entries) into ``cache``."""
        self._ttl.sweep_into_cache(cache, staged_default_keys, staged_ttl_index_keys)

    def backfill_legacy_records(
        self,
        expires_at_ms: int,
        changelog_producer: ChangelogProducer | None,
        processed_offsets: dict[str, int] | None,
        staged_default_keys: set[bytes],
        chunk_size: int,
        skip_already_stamped: bool = True,
    ) -> int:
        """Quix's legacy-TTL backfill: every stored value stamped, in the next flush's group.

        Called by Quix's transaction at prepare when the first ``ttl=`` write
        meets a populated store. The stamped records go to the changelog first
        (delivery confirmed); the local writes join the flush's one group, with
        the flip flag. ``chunk_size`` is not used (one group).

        Returns:
            How many values were stamped.

        Raises:
            ChangelogFlushError: the changelog records were not confirmed delivered.
        """
        del processed_offsets, chunk_size  # Quix's backfill headers carry no offsets either
        ops, records = backfill_ops(
            self.iter_items(b""), expires_at_ms, staged_default_keys, skip_already_stamped
        )
        produce_backfill(changelog_producer, records, self._path)
        self._pending_backfill = [(self._fold(cf, k), v) for cf, k, v in ops]
        logger.info(
            "TTL legacy backfill of %d record(s) staged for the next flush path=%s",
            len(records),
            self._path,
        )
        return len(records)

    def get_or_create_column_family(self, cf_name: str) -> None:
        """Nothing to create: a column family is a key prefix here."""
        self._prefix(cf_name)

    def corroborate_adoption(self) -> None:
        """No provisional v3.24.0 adoption exists on this store."""

    def finalize_corroboration_teardown(self) -> None:
        """No provisional v3.24.0 adoption exists on this store."""

    def _max_index_stamp_ms(self) -> int | None:
        """The latest expiry in the ``__ttl_index__`` column family, or None."""
        for index_key, _ in self.iter_items(
            b"", b"\xff" * 9, backwards=True, cf_name=TTL_INDEX_CF_NAME
        ):
            try:
                return decode_index_key(index_key)[0]
            except ValueError:
                continue
        return None

    def _complete_ttl_migration(self, leftovers: list[bytes]) -> None:
        """Finish a MIXED recovery's migration as Quix's RocksDB partition does, in one group.

        The leftover legacy records (replayed without the ``__ttl_stamped__``
        header and not superseded) are stamped with RocksDB's completion expiry
        and indexed; they and the "migration done" marker go to the changelog
        first (delivery confirmed), then every local write is one group with
        the flip flag and the marker. No leftovers: only the marker.

        Raises:
            ChangelogFlushError: the changelog records were not confirmed delivered.
        """
        present = [(k, v) for k in leftovers if (v := self._read("default", k)) is not None]
        expires_at_ms = self._ttl.completion_expiry(self._max_index_stamp_ms()) if present else 0
        ops, records = backfill_ops(iter(present), expires_at_ms, set(), True)
        produce_backfill(self._changelog_producer, records, self._path, with_marker=True)
        ops.extend(migration_done_ops())
        ops.extend((TTL_BACKFILL_PENDING_CF_NAME, k, None) for k in leftovers)  # the census, done
        self._commit([(self._fold(cf, k), v) for cf, k, v in ops])
        logger.info(
            "Recovery: completed the legacy-TTL migration at path=%s; stamped %d leftover "
            "record(s) with expiry=%d",
            self._path,
            len(records),
            expires_at_ms,
        )
