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
from quixstreams.state.recovery import ChangelogProducer

from logstate.integrations.quixstreams._ttl import TtlState, backfill_ops, produce_backfill

__all__ = ["TtlPartitionMethods"]

logger = logging.getLogger(__name__)


class TtlPartitionMethods:
    """Quix's TTL-facing partition methods (a mixin of ``LogstateStorePartition``)."""

    # provided by the partition
    _ttl: TtlState
    _path: str
    _pending_backfill: list[tuple[str, bytes | None]]

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
