"""Quix's event-time TTL stamps on a logstate partition: what RocksDB's partition does for them.

Owns: the partition side of Quix Streams' per-write TTL (3.24+) that
``RocksDBPartitionTransaction`` calls on its partition: the per-instance
``uses_ttl_stamps`` flip flag, the event-time high-water mark (kept in the
``__metadata__`` column family, as RocksDB keeps it), the bounded sweep of
the ``__ttl_index__`` column family (into the transaction cache, or into the
flush's own group when changelog tombstones are off), and the replay of a
``__ttl_stamped__`` changelog record (expired-at-frontier drop, index entry).
The stamp layout, the index key layout and the validators are Quix's own
(``quixstreams.state.rocksdb.ttl_codec`` and the RocksDB transaction's
``_safe_decode_stamp``), imported, never re-declared.
The legacy-TTL backfill (the first ``ttl=`` write on a populated store)
stamps every stored value as RocksDB's does, produces the stamped records to
the changelog and waits for their delivery, and hands the operations to the
flush, which writes them in its one group with the flip flag: all of the
migration or none, so RocksDB's resume ledger is not needed. A MIXED
recovery (an interrupted migration replayed) is completed the same way at
``complete_recovery``, with RocksDB's expiry rule (:meth:`TtlState.completion_expiry`).
Must never: read the wall clock for an expiry decision (Quix's TTL is event
time: the high-water mark), write anything itself (it hands operations to
the partition's one atomic group), or stamp a leftover legacy record of a
MIXED recovery with an expiry already past (it keeps it never-expiring).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

from quixstreams.state.base import PartitionTransactionCache
from quixstreams.state.base.migration_flush import (
    MigrationDeliveryPhase,
    MigrationFlushVerdict,
    confirm_migration_delivery,
)
from quixstreams.state.exceptions import ChangelogFlushError
from quixstreams.state.metadata import (
    CHANGELOG_CF_MESSAGE_HEADER,
    CHANGELOG_PROCESSED_OFFSETS_MESSAGE_HEADER,
    CHANGELOG_TTL_STAMPED_HEADER,
    METADATA_CF_NAME,
    TTL_INDEX_CF_NAME,
    TTL_MIGRATION_DONE_KEY,
    TTL_SYSTEM_CF_NAME,
)
from quixstreams.state.recovery import ChangelogProducer
from quixstreams.state.rocksdb.exceptions import IncompatibleStateStoreError
from quixstreams.state.rocksdb.metadata import (
    STATE_FORMAT_VERSION,
    STATE_FORMAT_VERSION_KEY,
    TTL_ENABLED_KEY,
    TTL_HIGH_WATER_KEY,
)
from quixstreams.state.rocksdb.options import RocksDBOptions
from quixstreams.state.rocksdb.partition import _own_stamp_if_stamped, _unwrap_double_stamp
from quixstreams.state.rocksdb.transaction import _safe_decode_stamp, _ttl_to_ms
from quixstreams.state.rocksdb.ttl_codec import (
    _MAX_PLAUSIBLE_STAMP_MS,
    SENTINEL_NEVER,
    clamp_additive_expiry,
    decode_index_key,
    encode_index_key,
    encode_ttl_value,
)
from quixstreams.state.rocksdb.types import RocksDBOptionsType
from quixstreams.state.serialization import int_from_bytes, int_to_bytes
from quixstreams.utils.json import dumps as json_dumps

__all__ = [
    "TtlState",
    "backfill_ops",
    "flip_metadata_ops",
    "migration_done_ops",
    "produce_backfill",
]

logger = logging.getLogger(__name__)

# delivery confirmation of a backfill's changelog records (RocksDB's: 25 s x 10)
_BACKFILL_FLUSH_SLICE_S = 25.0
_BACKFILL_FLUSH_MAX_SLICES = 10

# (cf_name, key, value or None for a delete): one operation of an atomic group
Op = tuple[str, bytes, bytes | None]
# (cf_name, key) of a delete the sweep decided
Delete = tuple[str, bytes]
ReadFunc = Callable[[str, bytes], bytes | None]
RangeFunc = Callable[[str, bytes, bytes | None], Iterator[tuple[bytes, bytes]]]


def migration_done_ops() -> list[Op]:
    """The flip flag and the "migration done" marker, written with a completed migration."""
    return [
        *flip_metadata_ops(),
        (TTL_SYSTEM_CF_NAME, TTL_MIGRATION_DONE_KEY, int_to_bytes(STATE_FORMAT_VERSION)),
    ]


def flip_metadata_ops() -> list[Op]:
    """The metadata writes that mark a partition as flipped into TTL mode."""
    return [
        (METADATA_CF_NAME, TTL_ENABLED_KEY, b"\x01"),
        (METADATA_CF_NAME, STATE_FORMAT_VERSION_KEY, int_to_bytes(STATE_FORMAT_VERSION)),
    ]


class TtlState:
    """The TTL bookkeeping of one partition (see the module docstring).

    Args:
        options: Quix's options object (its TTL scalars are read once).
        path: the partition's directory, for messages.
        read: reads one committed value of ``(cf, key)``, or None.
        iterate: ordered committed ``(key, value)`` of a cf in ``[lower, upper)``.
        class_uses_ttl_stamps: False for windowed/timestamped partitions.

    Raises:
        ValueError: ``max_evictions_per_flush`` is not a positive int.
        IncompatibleStateStoreError: the stored TTL format is newer than this Quix's.
    """

    def __init__(
        self,
        options: RocksDBOptionsType | None,
        path: str,
        read: ReadFunc,
        iterate: RangeFunc,
        class_uses_ttl_stamps: bool,
    ) -> None:
        opts: RocksDBOptionsType = options if options is not None else RocksDBOptions()
        if not isinstance(opts.max_evictions_per_flush, int) or opts.max_evictions_per_flush <= 0:
            raise ValueError(
                "max_evictions_per_flush must be a strictly positive int, "
                f"got {opts.max_evictions_per_flush!r}"
            )
        self.max_evictions_per_flush: int = opts.max_evictions_per_flush
        self.legacy_records_ttl: timedelta | None = opts.legacy_records_ttl
        self.legacy_backfill_chunk_size: int = opts.legacy_backfill_chunk_size
        self.ttl_changelog_tombstones: bool = opts.ttl_changelog_tombstones
        self._path = path
        self._read = read
        self._iterate = iterate
        self.enabled_at_open = (
            class_uses_ttl_stamps and read(METADATA_CF_NAME, TTL_ENABLED_KEY) is not None
        )
        self.high_water_ms: int | None = None
        self._high_water_warned = False
        # recovery: the event-time frontier captured at the first stamped replay
        self._frontier_captured = False
        self._frontier_ms: int | None = None
        # a MIXED recovery's completion: the wall clock at the first stamped
        # replay and the latest surviving stamp (RocksDB's expiry evidence)
        self.recovery_now_ms: int | None = None
        self.max_survivor_ms: int | None = None
        if self.enabled_at_open:
            self._check_format_version()
        self._load_high_water()

    # ------------------------------------------------------------------ open
    def _check_format_version(self) -> None:
        raw = self._read(METADATA_CF_NAME, STATE_FORMAT_VERSION_KEY)
        if raw is None:
            return
        try:
            version = int_from_bytes(raw)
        except Exception:
            version = -1
        if version <= 0 or version > STATE_FORMAT_VERSION:
            raise IncompatibleStateStoreError(
                f"state at {self._path!r} has TTL format version {version}; this Quix "
                f"Streams writes version {STATE_FORMAT_VERSION}"
            )

    def _load_high_water(self) -> None:
        raw = self._read(METADATA_CF_NAME, TTL_HIGH_WATER_KEY)
        if raw is None:
            return
        try:
            loaded = int_from_bytes(raw)
        except Exception:
            logger.warning("Failed to decode the persisted TTL high-water at %s", self._path)
            return
        if loaded < _MAX_PLAUSIBLE_STAMP_MS:
            self.high_water_ms = loaded

    # ------------------------------------------------------------------ live path
    def advance_high_water(self, timestamp: int | None) -> None:
        """Advance the high-water mark (negative and implausible timestamps are ignored)."""
        if timestamp is None or timestamp < 0:
            return
        if timestamp >= _MAX_PLAUSIBLE_STAMP_MS:
            if not self._high_water_warned:
                self._high_water_warned = True
                logger.warning(
                    "Ignoring implausibly large event-time timestamp %d (>= %d) for the "
                    "TTL high-water at path=%s",
                    timestamp,
                    _MAX_PLAUSIBLE_STAMP_MS,
                    self._path,
                )
            return
        if self.high_water_ms is None or timestamp > self.high_water_ms:
            self.high_water_ms = timestamp

    def flush_ops(
        self, flag_persisted: bool, staged_default: set[bytes], staged_index: set[bytes]
    ) -> list[Op]:
        """The TTL operations a flush of a flipped partition adds to its group.

        The flip flag (again, until one group holding it was written: a flip
        staged at prepare whose flush was aborted must not leave stamped
        values without it), the high-water mark, and the local sweep when
        changelog tombstones are off.
        """
        ops: list[Op] = []
        if not flag_persisted:
            ops.extend(flip_metadata_ops())
        if self.high_water_ms is not None:
            ops.append((METADATA_CF_NAME, TTL_HIGH_WATER_KEY, int_to_bytes(self.high_water_ms)))
        if not self.ttl_changelog_tombstones:
            for cf_name, key in self._sweep(staged_default, staged_index):
                ops.append((cf_name, key, None))
        return ops

    def sweep_into_cache(
        self,
        cache: PartitionTransactionCache,
        staged_default: set[bytes],
        staged_index: set[bytes],
    ) -> None:
        """Stage the sweep's deletes into ``cache`` (the changelog-tombstone path)."""
        for cf_name, key in self._sweep(staged_default, staged_index):
            cache.delete(key, prefix=b"", cf_name=cf_name)

    def _sweep(self, staged_default: set[bytes], staged_index: set[bytes]) -> Iterator[Delete]:
        """RocksDB's bounded sweep: (cf, key) deletes of expired values and stale index keys."""
        now_ms = self.high_water_ms
        if now_ms is None:
            return
        upper = int_to_bytes(now_ms + 1) if now_ms < SENTINEL_NEVER else None
        visited = 0
        for index_key, _ in self._iterate(TTL_INDEX_CF_NAME, b"", upper):
            if visited >= self.max_evictions_per_flush:
                break
            stale = index_key not in staged_index
            try:
                expires_at, user_key = decode_index_key(index_key)
            except ValueError:
                visited += 1
                if stale:
                    yield TTL_INDEX_CF_NAME, index_key
                continue
            if expires_at > now_ms:
                break
            visited += 1
            main = self._read("default", user_key)
            decoded = None if main is None else _safe_decode_stamp(main)
            if (
                decoded is not None
                and decoded[0] != SENTINEL_NEVER
                and decoded[0] == expires_at
                and user_key not in staged_default
            ):
                yield "default", user_key
            if stale:
                yield TTL_INDEX_CF_NAME, index_key

    # ------------------------------------------------------------------ recovery
    def replay_default(self, key: bytes, value: bytes) -> list[Op]:
        """The operations that apply one ``__ttl_stamped__`` default-CF changelog record."""
        decoded = _safe_decode_stamp(value)
        if decoded is None:
            stamped, stamp = encode_ttl_value(SENTINEL_NEVER, value), SENTINEL_NEVER
        else:
            unwrapped = _unwrap_double_stamp(value, int(time.time() * 1000))
            if unwrapped is not None:
                stamp, stamped = unwrapped
            else:
                stamped, stamp = value, decoded[0]
        if stamp != SENTINEL_NEVER:
            if self.recovery_now_ms is None:
                self.recovery_now_ms = int(time.time() * 1000)
            if not self._frontier_captured:
                self._frontier_ms = self.high_water_ms
                self._frontier_captured = True
            if self._frontier_ms is not None and stamp <= self._frontier_ms:
                return [("default", key, None)]  # expired against the recovery frontier
            if self.max_survivor_ms is None or stamp > self.max_survivor_ms:
                self.max_survivor_ms = stamp
            return [
                ("default", key, stamped),
                (TTL_INDEX_CF_NAME, encode_index_key(stamp, key), b""),
            ]
        return [("default", key, stamped)]

    def completion_expiry(self, max_index_stamp_ms: int | None) -> int:
        """The expiry RocksDB gives the leftover legacy records of a MIXED recovery.

        With ``legacy_records_ttl``: the later of (recovery wall clock + that
        ttl) and the latest surviving stamp, clamped; without it: the latest
        surviving stamp when it is still ahead of the recovery clock, else
        never-expires (no mass delete).
        """
        now_ms = (
            self.recovery_now_ms if self.recovery_now_ms is not None else int(time.time() * 1000)
        )
        survivor = self.max_survivor_ms if self.max_survivor_ms is not None else max_index_stamp_ms
        if self.legacy_records_ttl is not None:
            expiry = now_ms + _ttl_to_ms(self.legacy_records_ttl)
            if survivor is not None and survivor > expiry:
                expiry = survivor
            return clamp_additive_expiry(expiry)
        if survivor is not None and survivor > now_ms:
            return survivor
        return SENTINEL_NEVER


def backfill_ops(
    items: Iterator[tuple[bytes, bytes]],
    expires_at_ms: int,
    staged_default_keys: set[bytes],
    skip_already_stamped: bool,
) -> tuple[list[Op], list[tuple[bytes, bytes]]]:
    """RocksDB's legacy-TTL backfill of every stored default-CF value, as operations.

    Each value not re-written by the triggering flush is stamped with
    ``expires_at_ms`` and indexed; a value that already is a TTL stamp is
    left byte-identical and indexed at its own expiry (never wrapped twice).

    Returns:
        The operations (for the flush's one group) and the ``(key, stamped
        value)`` records to produce to the changelog.
    """
    ops: list[Op] = []
    produce: list[tuple[bytes, bytes]] = []
    now_ms = int(time.time() * 1000)
    for key, value in items:
        if key in staged_default_keys:
            continue
        own = _own_stamp_if_stamped(value, now_ms) if skip_already_stamped else None
        if own is not None:
            if own != SENTINEL_NEVER:
                ops.append((TTL_INDEX_CF_NAME, encode_index_key(own, key), b""))
            continue
        stamped = encode_ttl_value(expires_at_ms, value)
        ops.append(("default", key, stamped))
        if expires_at_ms != SENTINEL_NEVER:
            ops.append((TTL_INDEX_CF_NAME, encode_index_key(expires_at_ms, key), b""))
        produce.append((key, stamped))
    return ops, produce


def produce_backfill(
    producer: ChangelogProducer | None,
    records: list[tuple[bytes, bytes]],
    path: str,
    with_marker: bool = False,
) -> None:
    """Produce the backfilled records and wait for their delivery (changelog first).

    ``with_marker``: then the durable "migration done" marker (its own system
    column family, after the last stamped record), as Quix's completion does.

    Raises:
        ChangelogFlushError: the records were not confirmed delivered (nothing
            is written locally then: the flush fails and is retried whole).
    """
    if producer is None or not (records or with_marker):
        return
    headers: dict[str, str | bytes] = {
        CHANGELOG_CF_MESSAGE_HEADER: "default",
        CHANGELOG_PROCESSED_OFFSETS_MESSAGE_HEADER: json_dumps(None),
        CHANGELOG_TTL_STAMPED_HEADER: b"\x01",
    }
    phase = MigrationDeliveryPhase()
    for key, stamped in records:
        producer.produce(
            key=key, value=stamped, headers=headers, migration=True, on_delivery=phase.on_delivery
        )
        phase.record_produced()
    if with_marker:
        producer.produce(
            key=TTL_MIGRATION_DONE_KEY,
            value=int_to_bytes(STATE_FORMAT_VERSION),
            headers={
                CHANGELOG_CF_MESSAGE_HEADER: TTL_SYSTEM_CF_NAME,
                CHANGELOG_PROCESSED_OFFSETS_MESSAGE_HEADER: json_dumps(None),
            },
            migration=True,
            on_delivery=phase.on_delivery,
        )
        phase.record_produced()
    outcome = confirm_migration_delivery(
        producer,
        counters=phase.counters,
        slice_timeout_s=_BACKFILL_FLUSH_SLICE_S,
        max_slices=_BACKFILL_FLUSH_MAX_SLICES,
    )
    if outcome.verdict not in (
        MigrationFlushVerdict.CONFIRMED,
        MigrationFlushVerdict.INDETERMINATE,
    ):
        raise ChangelogFlushError(
            f"{outcome.outstanding} legacy-TTL backfill changelog record(s) of the logstate "
            f"store at {path!r} were not confirmed delivered ({outcome.verdict.value}); "
            "nothing was written locally, so the store never gets ahead of the changelog"
        )
