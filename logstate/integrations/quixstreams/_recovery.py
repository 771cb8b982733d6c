"""Changelog recovery of a logstate Quix partition: buffered, written in groups.

Owns: :class:`RecoveryPartitionMethods`, the mixin of ``LogstateStorePartition``
with Quix's recovery calls (``recover_from_changelog_message``,
``complete_recovery``, ``has_incomplete_ttl_migration``): messages buffered
and written with their offset as one group every ``recovery_batch_size``
messages (and at completion, at close, before any read), the flip to TTL
stamps a stamped changelog makes, and the census of leftover legacy records
of a MIXED changelog, kept in the local ``__ttl_backfill_pending__`` column
family as Quix's RocksDB partition keeps it.
Must never: report an offset ahead of what is written, or change any state
for a message it refuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from quixstreams.state.metadata import (
    LOCAL_ONLY_CFS,
    METADATA_CF_NAME,
    TTL_BACKFILL_PENDING_CF_NAME,
    TTL_MIGRATION_DONE_KEY,
    TTL_SYSTEM_CF_NAME,
)
from quixstreams.state.rocksdb.metadata import CHANGELOG_OFFSET_KEY
from quixstreams.state.serialization import int_to_bytes

from logstate.integrations.quixstreams._keys import QuixKeyTooLongError, cf_prefix, fold_key
from logstate.integrations.quixstreams._ttl import Op, TtlState, flip_metadata_ops

__all__ = ["OFFSET_KEY", "RecoveryPartitionMethods"]

# the folded key of the changelog offset (Quix's metadata column family)
OFFSET_KEY: Final = fold_key(cf_prefix(METADATA_CF_NAME), METADATA_CF_NAME, CHANGELOG_OFFSET_KEY)


class RecoveryPartitionMethods:
    """Quix's recovery-facing partition methods (a mixin of ``LogstateStorePartition``)."""

    # provided by the partition
    uses_ttl_stamps: bool
    _ttl: TtlState
    _recovery_batch_size: int
    _recovery_ops: dict[str, bytes | None]
    _recovery_offset: int | None
    _recovery_messages: int
    _recovery_saw_stamped: bool
    _recovery_saw_migration_done: bool
    _recovery_census: set[bytes]
    _census_found: bool | None
    _migration_done_at_open: bool

    if TYPE_CHECKING:

        def _check_open(self) -> None: ...

        @staticmethod
        def _bytes_key(key: object) -> bytes: ...

        @staticmethod
        def _check_offset(offset: object) -> int: ...

        def _fold(self, cf_name: str, key: bytes) -> str: ...

        def _iterate(
            self, cf_name: str, lower: bytes, upper: bytes | None
        ) -> Iterator[tuple[bytes, bytes]]: ...

        def _commit(self, ops: list[tuple[str, bytes | None]]) -> None: ...

        def _complete_ttl_migration(self, leftovers: list[bytes]) -> None: ...

    def recover_from_changelog_message(
        self,
        key: bytes,
        value: bytes | None,
        cf_name: str,
        offset: int,
        ttl_stamped: bool = False,
    ) -> None:
        """Apply one changelog message; written with its offset in the next recovery group.

        Raises:
            RuntimeError: the partition is closed.
            TypeError / ValueError: a bad key, value or offset (nothing buffered).
            QuixKeyTooLongError: the key does not fit a logstate key.
        """
        self._check_open()
        key = self._bytes_key(key)
        if value is not None and not isinstance(value, bytes):
            raise TypeError(f"a changelog value must be bytes or None, got {type(value).__name__}")
        offset = self._check_offset(offset)
        saved = (
            self.uses_ttl_stamps,
            self._recovery_saw_stamped,
            self._recovery_saw_migration_done,
        )
        try:
            census = self._recovery_ops_for(key, value, cf_name, offset, ttl_stamped)
        except QuixKeyTooLongError:  # (from folding, before anything is buffered)
            self.uses_ttl_stamps, self._recovery_saw_stamped = saved[0], saved[1]
            self._recovery_saw_migration_done = saved[2]
            raise
        if census is True:
            self._recovery_census.add(key)
        elif census is False:
            self._recovery_census.discard(key)

    def _recovery_ops_for(
        self, key: bytes, value: bytes | None, cf_name: str, offset: int, ttl_stamped: bool
    ) -> bool | None:
        """Buffer one changelog message's ops with its offset (``_buffer``);
        True / False: its key joined / left the census; None: neither."""
        ops: list[Op] = []
        census: bool | None = None
        class_ttl = type(self).uses_ttl_stamps
        if class_ttl and cf_name == TTL_SYSTEM_CF_NAME and key == TTL_MIGRATION_DONE_KEY:
            self._recovery_saw_migration_done = True
            if not self.uses_ttl_stamps:
                self.uses_ttl_stamps = True
                ops.extend(flip_metadata_ops())
        if class_ttl and not self.uses_ttl_stamps and cf_name == "default" and ttl_stamped:
            self.uses_ttl_stamps = True
            ops.extend(flip_metadata_ops())
        if class_ttl and cf_name == "default" and not self._migration_done():
            # the census of leftover legacy records, kept in a local column
            # family written with the data and the offset (as RocksDB's
            # __ttl_backfill_pending__): a recovery cut short keeps it. A key
            # joins it once, and leaves it only if it may be in it.
            if ttl_stamped:
                self._recovery_saw_stamped = True
            if not ttl_stamped and value is not None:
                if key not in self._recovery_census:  # (in it already: nothing to write)
                    ops.append((TTL_BACKFILL_PENDING_CF_NAME, key, b""))
                    census = True
            elif key in self._recovery_census or self._census_at_open():
                ops.append((TTL_BACKFILL_PENDING_CF_NAME, key, None))
                census = False
        if not self.uses_ttl_stamps or (cf_name == "default" and not ttl_stamped):
            ops.append((cf_name, key, value))
        elif cf_name in LOCAL_ONLY_CFS:
            pass
        elif value is None or cf_name != "default":
            ops.append((cf_name, key, value))
        else:
            ops.extend(self._ttl.replay_default(key, value))
        self._buffer(ops, offset)
        return census

    def _census_at_open(self) -> bool:
        """Whether the partition held a census when this recovery began (read once)."""
        if self._census_found is None:
            self._census_found = bool(self._pending_census())
        return self._census_found

    def _migration_done(self) -> bool:
        return self._migration_done_at_open or self._recovery_saw_migration_done

    def _buffer(self, ops: list[Op], offset: int) -> None:
        folded = [(self._fold(cf_name, key), value) for cf_name, key, value in ops]
        self._recovery_ops.update(folded)
        self._recovery_offset = offset
        self._recovery_messages += 1
        if self._recovery_messages >= self._recovery_batch_size:
            self._flush_recovery()

    def _flush_recovery(self) -> None:
        """Write the buffered recovery messages and their offset as one group."""
        if self._recovery_offset is None:
            return
        self._check_open()
        ops = list(self._recovery_ops.items())
        ops.append((OFFSET_KEY, int_to_bytes(self._recovery_offset)))
        self._commit(ops)
        # cleared after the group: an interruption before this line writes it again, same state
        self._recovery_ops = {}
        self._recovery_offset = None
        self._recovery_messages = 0

    def complete_recovery(self) -> None:
        """Write what recovery buffered; finish a MIXED changelog's legacy-TTL migration.

        Raises:
            ChangelogFlushError: the completion's changelog records were not
                confirmed delivered (nothing of the completion is written).
        """
        self._flush_recovery()
        leftovers = self._pending_census()
        self._recovery_census = set()
        self._census_found = False  # (emptied below, whatever the branch)
        saw_stamped = self._recovery_saw_stamped
        self._recovery_saw_stamped = False
        if self._migration_done() or not self.uses_ttl_stamps:
            if leftovers:  # a census that no migration needs any more
                self._commit(
                    [(self._fold(TTL_BACKFILL_PENDING_CF_NAME, k), None) for k in leftovers]
                )
            return  # migrated already, or a store without TTL: nothing to complete
        if saw_stamped or self._ttl.enabled_at_open:
            self._complete_ttl_migration(leftovers)

    def _pending_census(self) -> list[bytes]:
        """The keys of the leftover legacy records a MIXED recovery censused, in order."""
        return [key for key, _value in self._iterate(TTL_BACKFILL_PENDING_CF_NAME, b"", None)]

    def has_incomplete_ttl_migration(self) -> bool:
        """True when a recovery censused leftover legacy records (a MIXED changelog)
        and the migration is not done: Quix's recovery then runs
        :meth:`complete_recovery` even when the offset has caught up."""
        if not self.uses_ttl_stamps or self._migration_done():
            return False
        return next(iter(self._iterate(TTL_BACKFILL_PENDING_CF_NAME, b"", None)), None) is not None
