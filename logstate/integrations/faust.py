"""A Faust table store on logstate: ``faust.App(..., store="logstate://")``.

Owns: :class:`Store`, the ``logstate`` store of Faust (faust-streaming 0.15),
registered through the ``faust.stores`` entry point; the mapping of a table
partition to one logstate directory (as Faust's RocksDB store keeps one
database per partition), of Faust's bytes keys to logstate keys, and of the
persisted changelog offsets to reserved keys in the same directory.
Must never: patch or subclass anything of Faust but ``SerializedStore``; use
logstate's private modules; write a changelog batch as more than one record
per partition; let a persisted offset get ahead of the data it stands for.

Layout: partition ``P`` of table ``T`` lives in ``BASE/T-P.logstate`` where
``BASE`` is the app's ``tabledir`` (``logstate://``), an absolute directory
(``logstate:///srv/state``) or a directory relative to ``tabledir``
(``logstate:state``). Table keys are stored as ``bytes_to_key(key)`` (latin-1:
only characters up to U+00FF); the offset of changelog topic ``X`` is the
int under ``"\\uffffoffset\\uffff" + X``, a key no table key can equal.

Offsets versus data (the guarantee):

* ``apply_changelog_batch`` (recovery, standbys) writes each partition's
  changes and that partition's highest offset as ONE logstate group record:
  after any crash the directory holds all of it or none of it.
* ``set_persisted_offset`` (Faust calls it from the producer's delivery
  callback of a changelog message, or at commit with exactly_once) is one
  record appended after the local ``_set``/``_del`` that message stands for:
  ``Table.__setitem__`` sends the message and then writes the store in the
  same synchronous step, and the callback runs later. A directory's log is
  one ordered sequence and recovery keeps a prefix of it (process crash, any
  ``sync``; power loss with ``recovery="strict"`` or ``"prefix"``), so when
  offset ``O`` is found, every local write made before it is found too: the
  offset is never ahead of the data. The data may be ahead of the offset
  (writes whose offset was not yet recorded); Faust re-reads the changelog
  from ``O + 1`` and rewrites those keys with the same values.
* A local write that fails (key too long, I/O error) after Faust already
  sent its changelog message would break that: the partition's offset is then
  frozen (``set_persisted_offset`` writes nothing for it) until the partition
  is closed, so the next recovery replays that message.
* ``recovery="salvage"`` is refused: it may keep a later record and drop an
  earlier one, i.e. an offset without its data.
* Not covered: tables with ``use_partitioner=True`` write a key in the
  partition of the source event while the producer may put its changelog
  message (hence its offset) in another partition, i.e. another directory; as
  with RocksDB, the two are then not ordered with respect to each other.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from faust.stores import base
from faust.streams import current_event
from faust.types import TP, AppT, CollectionT, EventT
from yarl import URL

from logstate import LocalFileStorage, LogstateError, StorageLockedError

__all__ = ["DIRECTORY_SUFFIX", "MAX_KEY_SIZE", "OFFSET_KEY_PREFIX", "Store", "StoreOptions"]

#: logstate's limit on a key, in UTF-8 bytes (a latin-1 key char >= 0x80 takes 2).
MAX_KEY_SIZE: Final = 4096
#: Reserved key prefix of the persisted offsets (U+FFFF never comes out of latin-1).
OFFSET_KEY_PREFIX: Final = "\uffffoffset\uffff"
#: Suffix of a partition directory: ``{table}-{partition}.logstate``.
DIRECTORY_SUFFIX: Final = ".logstate"
_LOCK_RETRY_S: Final = 0.05  # the lock-wait poll (TODO until LocalFileStorage has lock_timeout)
_GENERATION_CHECK_S: Final = 1.0  # how often a waiting open checks for a newer rebalance


# TODO until logstate main has bytes_to_key / key_to_bytes: then import them from logstate
def _bytes_to_key(data: bytes) -> str:
    return data.decode("latin-1")


def _key_to_bytes(key: str) -> bytes:
    return key.encode("latin-1")


class StoreOptions:
    """The options of a logstate store, from the URL query and the table's ``options``.

    ``store="logstate:///srv/state?sync=always&lock_timeout=60"`` or
    ``app.Table(..., options={"sync": "always"})`` (the table's options win).

    Args:
        sync: logstate's sync mode, "none", "interval" (default) or "always".
        sync_interval: seconds between background syncs for "interval".
        segment_size: bytes at which a segment rolls.
        recovery: "prefix" (default) or "strict"; "salvage" is refused.
        auto_compact: background compaction (logstate's default: on).
        lock_timeout: seconds an assigned partition waits for another process
            to release its directory (default 30, as Faust's RocksDB retries).

    Raises:
        ValueError: an unknown option or a bad value (named in the message).
    """

    _NAMES: Final = (
        "sync",
        "sync_interval",
        "segment_size",
        "recovery",
        "auto_compact",
        "lock_timeout",
    )

    def __init__(self, query: Mapping[str, str], options: Mapping[str, Any] | None) -> None:
        given: dict[str, Any] = dict(query)
        given.update(options or {})
        unknown = sorted(set(given) - set(self._NAMES))
        if unknown:
            raise ValueError(
                f"unknown logstate store option(s) {', '.join(unknown)}; "
                f"known: {', '.join(self._NAMES)}"
            )
        self.sync: str | None = _choice(given, "sync", ("none", "interval", "always"), None)
        self.recovery: str = _choice(given, "recovery", ("strict", "prefix"), "prefix")
        self.sync_interval: float | None = _number(given, "sync_interval", float, None)
        self.segment_size: int | None = _number(given, "segment_size", int, None)
        self.lock_timeout_s: float = _number(given, "lock_timeout", float, 30.0, zero_ok=True)
        self.auto_compact: bool | None = _flag(given, "auto_compact")

    def open_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``LocalFileStorage`` (the unset ones left to logstate)."""
        arguments: dict[str, Any] = {"recovery": self.recovery}
        for name in ("sync", "sync_interval", "segment_size", "auto_compact"):
            value = getattr(self, name)
            if value is not None:
                arguments[name] = value
        return arguments


def _choice(given: Mapping[str, Any], name: str, allowed: tuple[str, ...], default: Any) -> Any:
    value = given.get(name, default)
    if value is default:
        return value
    if value not in allowed:
        why = (
            " (salvage can keep a later record without an earlier one: an offset without its data)"
            if value == "salvage"
            else ""
        )
        raise ValueError(
            f"logstate store option {name}={value!r}: expected one of {', '.join(allowed)}{why}"
        )
    return value


def _number(
    given: Mapping[str, Any], name: str, kind: type[Any], default: Any, zero_ok: bool = False
) -> Any:
    value = given.get(name)
    if value is None:
        return default
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"logstate store option {name}={value!r}: expected {kind.__name__}"
        ) from None
    if number < 0 or (number == 0 and not zero_ok):
        raise ValueError(
            f"logstate store option {name}={value!r}: must be {'>= 0' if zero_ok else '> 0'}"
        )
    return number


def _flag(given: Mapping[str, Any], name: str) -> bool | None:
    value = given.get(name)
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"logstate store option {name}={value!r}: expected true or false")


def _open_waiting(path: Path, arguments: dict[str, Any], timeout_s: float) -> LocalFileStorage:
    """Open ``path``, waiting up to ``timeout_s`` for another process to release it."""
    # TODO until logstate main has LocalFileStorage(lock_timeout=...): this poll
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return LocalFileStorage(path, **arguments)
        except StorageLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_LOCK_RETRY_S)


class Store(base.SerializedStore[Any, Any]):
    """Faust table storage in logstate directories, one per table partition.

    Built by Faust from ``store="logstate://..."`` (see :class:`StoreOptions`
    and the module docstring for the layout and the offset guarantee).

    Args:
        url: the store URL: ``logstate://`` (the app's tabledir),
            ``logstate:///abs/dir`` or ``logstate:rel/dir`` (under tabledir);
            query parameters are options.
        app: the Faust app.
        table: the table this store serves.
        options: the table's ``options`` mapping (read, never changed).
        **kwargs: passed on to Faust's ``Store`` (table_name, key_type, ...).

    Raises:
        ValueError: a URL with a host, or a bad option.
    """

    def __init__(
        self,
        url: str | URL,
        app: AppT,
        table: CollectionT,
        *,
        options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, app, table, options=options, **kwargs)
        if self.url.host:
            raise ValueError(
                f"store URL {str(self.url)!r} names a host; a logstate store is a local "
                "directory: logstate:// (tabledir), logstate:///absolute/dir or logstate:rel/dir"
            )
        self.settings = StoreOptions(self.url.query, options)
        self.base_path = Path(app.conf.tabledir) / self.url.path  # an absolute path wins
        self._partitions: dict[int, LocalFileStorage] = {}
        self._active: set[int] = set()  # partitions served to reads (assigned, not standby)
        self._frozen: set[int] = set()  # a local write failed: offsets must not advance
        self._rebalance_lock = asyncio.Lock()

    # ------------------------------------------------------------------ partitions
    def partition_path(self, partition: int) -> Path:
        """The directory of ``partition``: ``BASE/{table}-{partition}.logstate``."""
        return self.base_path / f"{self.table_name}-{partition}{DIRECTORY_SUFFIX}"

    def _storage(self, partition: int) -> LocalFileStorage:
        """The open storage of ``partition``, opened now (no waiting) when it is not."""
        storage = self._partitions.get(partition)
        if storage is None:
            self.base_path.mkdir(parents=True, exist_ok=True)
            storage = LocalFileStorage(
                self.partition_path(partition), **self.settings.open_arguments()
            )
            self._partitions[partition] = storage
        return storage

    async def _open_partition(self, partition: int, generation_id: int | None) -> None:
        """Open ``partition``, waiting (in a thread) for another process to release it.

        Gives up, opening nothing, when a newer rebalance started meanwhile.
        """
        if partition in self._partitions:
            return
        self.base_path.mkdir(parents=True, exist_ok=True)
        path = self.partition_path(partition)
        deadline = time.monotonic() + self.settings.lock_timeout_s
        while True:
            step_s = min(_GENERATION_CHECK_S, max(0.0, deadline - time.monotonic()))
            try:
                storage = await asyncio.to_thread(
                    _open_waiting, path, self.settings.open_arguments(), step_s
                )
            except StorageLockedError:
                if time.monotonic() >= deadline:
                    self.log.error("partition %r: %s directory still locked", partition, path)
                    raise
                if generation_id is not None and generation_id != self.app.consumer_generation_id:
                    self.log.info("partition %r: rebalanced again, not opened", partition)
                    return
                continue
            if partition in self._partitions:  # opened meanwhile by a synchronous call
                storage.close()
            else:
                self._partitions[partition] = storage
            return

    def _close_partition(self, partition: int) -> None:
        self._active.discard(partition)
        self._frozen.discard(partition)  # the next assignment recovers from the offset
        storage = self._partitions.pop(partition, None)
        if storage is not None:
            storage.close()

    def _served(self) -> list[LocalFileStorage]:
        """The storages reads go over: active partitions (every open one if global)."""
        return [
            storage
            for partition, storage in sorted(self._partitions.items())
            if self.table.is_global or partition in self._active
        ]

    def _event_partition(self) -> int | None:
        """The partition of the current stream event, when reads go to it alone."""
        event = current_event()
        if event is None or self.table.is_global or self.table.use_partitioner:
            return None
        return event.message.partition

    # ------------------------------------------------------------------ keys
    def _to_key(self, key: bytes) -> str:
        if not isinstance(key, bytes):
            raise TypeError(f"table {self.table_name!r}: key must be bytes, not {type(key)}")
        text = _bytes_to_key(key)
        if not text:
            raise ValueError(f"table {self.table_name!r}: an empty key cannot be stored")
        size = len(text.encode("utf-8"))
        if size > MAX_KEY_SIZE:
            raise ValueError(
                f"table {self.table_name!r}: a key of {len(key)} bytes takes {size} bytes as a "
                f"logstate key (bytes >= 0x80 take 2); the limit is {MAX_KEY_SIZE}"
            )
        return text

    def _to_key_or_none(self, key: bytes) -> str | None:
        """For reads: a key that cannot be stored is not stored."""
        try:
            return self._to_key(key)
        except ValueError:
            return None

    @staticmethod
    def _value(value: Any) -> bytes | None:
        if value is None or isinstance(value, bytes):
            return value
        raise TypeError(f"logstate store holds a {type(value).__name__}, not bytes")

    # ------------------------------------------------------------------ SerializedStore
    def _get(self, key: bytes) -> bytes | None:
        text = self._to_key_or_none(key)
        if text is None:
            return None
        partition = self._event_partition()
        if partition is not None:
            return self._value(self._storage(partition).get(text))
        for storage in self._partitions.values():
            value = storage.get(text)
            if value is not None:
                return self._value(value)
        return None

    def _set(self, key: bytes, value: bytes | None) -> None:
        event = current_event()
        if event is None:
            raise RuntimeError(
                f"table {self.table_name!r}: the logstate store is written while a stream "
                "event is processed (its partition selects the directory); no current event"
            )
        partition = event.message.partition
        try:
            text = self._to_key(key)
            storage = self._storage(partition)
            if value is None:  # Faust's changelog: a None value deletes
                storage.remove(text)
            else:
                storage.set(text, bytes(value))
        except BaseException:
            self._frozen.add(partition)  # its changelog message is already sent
            raise
        self._active.add(partition)

    def _del(self, key: bytes) -> None:
        text = self._to_key_or_none(key)
        if text is None:
            return
        partition = self._event_partition()
        if partition is not None:
            targets = [(partition, self._storage(partition))]
        else:
            targets = list(self._partitions.items())
        for number, storage in targets:
            try:
                storage.remove(text)
            except BaseException:
                self._frozen.add(number)
                raise

    def _iterkeys(self) -> Iterator[bytes]:
        for storage in self._served():
            for text in sorted(storage.get_all_keys()):
                if not text.startswith(OFFSET_KEY_PREFIX):
                    yield _key_to_bytes(text)

    def _itervalues(self) -> Iterator[bytes | None]:
        for _, value in self._iteritems():
            yield value

    def _iteritems(self) -> Iterator[tuple[bytes, bytes]]:
        for storage in self._served():
            for text in sorted(storage.get_all_keys()):
                if text.startswith(OFFSET_KEY_PREFIX):
                    continue
                value = self._value(storage.get(text))
                if value is not None:  # not deleted while we iterate
                    yield _key_to_bytes(text), value

    def _size(self) -> int:
        return sum(
            sum(1 for text in storage.get_all_keys() if not text.startswith(OFFSET_KEY_PREFIX))
            for storage in self._served()
        )

    def _contains(self, key: bytes) -> bool:
        text = self._to_key_or_none(key)
        if text is None:
            return False
        partition = self._event_partition()
        if partition is not None:
            return self._storage(partition).contains_key(text)
        return any(storage.contains_key(text) for storage in self._partitions.values())

    def _clear(self) -> None:
        """Delete every key of the served partitions; one record per partition, offsets kept."""
        for storage in self._served():
            with storage.batch() as group:
                for text in storage.get_all_keys():
                    if not text.startswith(OFFSET_KEY_PREFIX):
                        group.remove(text)

    # ------------------------------------------------------------------ offsets
    def persisted_offset(self, tp: TP) -> int | None:
        """The last changelog offset of ``tp`` stored with the data, or None.

        Raises:
            StorageLockedError: the partition is not open and another process holds it.
        """
        value = self._storage(tp.partition).get(OFFSET_KEY_PREFIX + tp.topic)
        if value is not None and type(value) is not int:
            raise TypeError(f"offset of {tp} is a {type(value).__name__}, not an int")
        return value

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        """Store ``offset`` for ``tp``, after the local writes it stands for (see module).

        Nothing is written while the partition is frozen by a failed local write.

        Raises:
            TypeError: ``offset`` is not an int.
        """
        if type(offset) is not int:
            raise TypeError(f"offset of {tp} must be an int, not {type(offset).__name__}")
        if tp.partition in self._frozen:
            self.log.warning("offset %r of %r not stored: a local write failed", offset, tp)
            return
        self._storage(tp.partition).set(OFFSET_KEY_PREFIX + tp.topic, offset)

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT[Any]],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        """Write changelog events, and each partition's highest offset, as ONE record per partition.

        Every key is checked before anything is written: a bad one writes
        nothing. A partition whose group was written has its changes and its
        offset; one that was not has neither.

        Args:
            batch: changelog events (``event.message`` has key, value, tp, offset).
            to_key: unused (keys stay serialized bytes).
            to_value: unused.

        Raises:
            TypeError: an event without a key, or a non-bytes key or value.
            ValueError: a key that logstate cannot store (empty, too long).
        """
        changes: dict[int, list[tuple[str, bytes | None]]] = {}
        offsets: dict[TP, int] = {}
        for event in batch:
            message = event.message
            if message.key is None:
                raise TypeError(f"changelog entry is missing its key: {message}")
            changes.setdefault(message.tp.partition, []).append(
                (self._to_key(message.key), self._value(message.value))
            )
            offsets[message.tp] = max(message.offset, offsets.get(message.tp, message.offset))
        for partition in sorted(changes):
            storage = self._storage(partition)
            with storage.batch() as group:
                for text, value in changes[partition]:
                    if value is None:
                        group.remove(text)
                    else:
                        group.set(text, value)
                if partition not in self._frozen:
                    for tp, offset in offsets.items():
                        if tp.partition == partition:
                            group.set(OFFSET_KEY_PREFIX + tp.topic, offset)

    # ------------------------------------------------------------------ state
    def reset_state(self) -> None:
        """Delete every local partition directory of this table (the changelog stays).

        Each directory is checked to be free (opened and closed), then renamed
        away (atomic) and deleted: an interrupted reset leaves a partition as it
        was or gone (a leftover ``*.deleted-*`` directory is removed next time).

        Raises:
            StorageLockedError: another process holds a partition (nothing deleted).
            OSError: a rename or delete failed.
        """
        for partition in list(self._partitions):
            self._close_partition(partition)
        pattern = re.compile(re.escape(self.table_name) + r"-\d+" + re.escape(DIRECTORY_SUFFIX))
        if not self.base_path.is_dir():
            return
        names = sorted(os.listdir(self.base_path))
        found = [self.base_path / name for name in names if pattern.fullmatch(name)]
        for path in found:
            try:
                LocalFileStorage(path, auto_create_dir=False, read_only=False).close()
            except StorageLockedError:
                raise
            except LogstateError:
                pass  # damaged: deleting it is what a reset is for
        leftovers = [
            self.base_path / name
            for name in names
            if ".deleted-" in name and pattern.fullmatch(name.split(".deleted-")[0])
        ]
        for path in found:
            trash = path.with_name(f"{path.name}.deleted-{os.getpid()}")
            os.rename(path, trash)
            leftovers.append(trash)
        for path in leftovers:
            shutil.rmtree(path)

    async def need_active_standby_for(self, tp: TP) -> bool:
        """False when another process holds ``tp``'s directory (it keeps it up to date)."""
        try:
            self._storage(tp.partition)
        except StorageLockedError:
            return False
        return True

    async def on_rebalance(
        self,
        assigned: set[TP],
        revoked: set[TP],
        newly_assigned: set[TP],
        generation_id: int = 0,
    ) -> None:
        """Close the revoked partitions, open the newly assigned active ones (waiting).

        Args:
            assigned: every assigned TP (changelog TPs of this table are used).
            revoked: TPs taken away: their directories are closed.
            newly_assigned: TPs new to this worker: active ones are opened.
            generation_id: the rebalance's generation; a waiting open gives up
                when a newer one starts.

        Raises:
            StorageLockedError: a directory stayed locked for ``lock_timeout``.
        """
        if not isinstance(assigned, (set, frozenset)):
            # faust.tables.objects.ChangeloggedObjectManager passes its table first
            _, assigned, revoked, newly_assigned = (
                assigned,
                revoked,
                newly_assigned,
                generation_id,
            )
            generation_id = self.app.consumer_generation_id
        topics = set(self.table.changelog_topic.topics)
        standbys = self.app.assignor.assigned_standbys()
        async with self._rebalance_lock:
            for tp in revoked:
                if tp.topic in topics:
                    self._close_partition(tp.partition)
            self._active = {
                tp.partition for tp in assigned if tp.topic in topics and tp not in standbys
            }
            for tp in sorted(newly_assigned):
                if tp.topic in topics and tp not in standbys:
                    await self._open_partition(tp.partition, generation_id)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        """Serve reads from the recovered active partitions (opened when not yet open)."""
        topics = set(self.table.changelog_topic.topics)
        async with self._rebalance_lock:
            self._active = {tp.partition for tp in active_tps if tp.topic in topics}
            for partition in sorted(self._active):
                await self._open_partition(partition, None)

    async def on_stop(self) -> None:
        """Close every partition (each close syncs)."""
        for partition in list(self._partitions):
            self._close_partition(partition)

    async def backup_partition(
        self, tp: TP | int, flush: bool = True, purge: bool = False, keep: int = 1
    ) -> None:
        """Not supported: the changelog topic is the backup (see the docs)."""
        raise NotImplementedError("logstate store: backup_partition is not supported")

    def restore_backup(self, tp: TP | int, latest: bool = True, backup_id: int = 0) -> None:
        """Not supported: a partition is restored from its changelog topic."""
        raise NotImplementedError("logstate store: restore_backup is not supported")

    @property
    def partitions(self) -> dict[int, LocalFileStorage]:
        """The open partition storages, by partition number (a copy)."""
        return dict(self._partitions)
