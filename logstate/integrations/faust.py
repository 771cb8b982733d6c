"""A Faust table store on logstate: ``faust.App(..., store="logstate://")``.

Owns: :class:`Store` (faust-streaming 0.15; registered through the
``faust.stores`` entry point): one logstate directory per table partition, as
Faust's RocksDB store keeps one database per partition; Faust's bytes keys as
logstate keys; the persisted changelog offsets as reserved keys beside them.
Must never: patch Faust; use logstate's private modules; write one
partition's share of a changelog batch as more than one record; store an
offset ahead of the data it stands for.

Layout: partition P of table T is the directory ``BASE/T-P.logstate`` (BASE:
the URL's path, see :class:`Store`). A key is ``bytes_to_key(key)`` (code
points up to U+00FF); the offset of changelog topic X is an int under
``OFFSET_KEY_PREFIX + X``, which holds U+FFFF: no table key equals it.

Offsets and data, the guarantee: after a crash (a process crash with any
``sync``; a power loss with ``recovery="strict"`` or ``"prefix"``), a stored
offset O of a partition is never ahead of its data: every local write made
before O was stored is there. The data may be ahead of O; Faust re-reads the
changelog from O + 1 and rewrites those keys (a local write whose changelog
message was never delivered stays, as with RocksDB's store). Why:

* ``apply_changelog_batch`` (recovery, standbys) writes a partition's changes
  and its highest offset as ONE group record: all of it or none after a crash.
* ``set_persisted_offset`` is called from the delivery callback of a changelog
  message (or at commit, with exactly_once), which runs after the local write
  of that message (``Table.__setitem__`` sends, then writes the store, in one
  synchronous step). The offset is one record appended after that write to
  the same directory's log, and recovery keeps a prefix of a log.
* A local write that fails after Faust sent its changelog message (key too
  long, I/O error) freezes the partition's offset (``set_persisted_offset``
  writes nothing for it) until the partition is closed; the next recovery
  replays that message.
* ``recovery="salvage"`` is refused: it can keep a later record (an offset)
  and drop an earlier one (its data).

Not covered: ``use_partitioner=True`` writes a key in the source event's
partition, its changelog offset in the one the producer picks (as RocksDB's).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from faust.stores import base
from faust.streams import current_event
from faust.types import TP, AppT, CollectionT, EventT
from yarl import URL

from logstate import LocalFileStorage, LogstateError, StorageLockedError, bytes_to_key, key_to_bytes

__all__ = ["DIRECTORY_SUFFIX", "MAX_KEY_SIZE", "OFFSET_KEY_PREFIX", "Store", "check_options"]

MAX_KEY_SIZE: Final = 4096  # logstate's limit on a key, UTF-8 bytes (a byte >= 0x80 takes 2)
OFFSET_KEY_PREFIX: Final = "\uffffoffset\uffff"  # of the offset keys: U+FFFF is never a byte
DIRECTORY_SUFFIX: Final = ".logstate"  # of a partition directory, {table}-{partition}.logstate
_TABLE_KEYS_STOP: Final = "\u0100"  # every table key sorts before it, every offset key after
_OPENER: Final = ThreadPoolExecutor(thread_name_prefix="logstate-faust-open")  # waiting opens
_CHOICES: Final = {"sync": ("none", "interval", "always"), "recovery": ("strict", "prefix")}
_NUMBERS: Final = {"sync_interval": float, "segment_size": int, "lock_timeout": float}
_FLAGS: Final = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def check_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """The store options in ``given`` (URL query text or table options), checked.

    Args:
        given: option names to values; :class:`Store` lists the options.

    Returns:
        The options, converted from text where the URL gave text.

    Raises:
        ValueError: an unknown option or a bad value (both named).
    """
    checked: dict[str, Any] = {}
    for name, value in given.items():
        bad = f"logstate store option {name}={value!r}"
        if name in _CHOICES:
            if value not in _CHOICES[name]:
                why = " (it can keep an offset and drop its data)" if value == "salvage" else ""
                raise ValueError(f"{bad}: expected one of {', '.join(_CHOICES[name])}{why}")
            checked[name] = value
        elif name == "auto_compact":
            if str(value).lower() not in _FLAGS:
                raise ValueError(f"{bad}: expected true or false")
            checked[name] = _FLAGS[str(value).lower()]
        elif name in _NUMBERS:
            kind = _NUMBERS[name]
            try:
                if isinstance(value, bool) or (kind is int and isinstance(value, float)):
                    raise ValueError(value)
                number = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{bad}: expected {kind.__name__}") from None
            if not math.isfinite(number) or number < 0 or (number == 0 and name != "lock_timeout"):
                raise ValueError(f"{bad}: must be {'>= 0' if name == 'lock_timeout' else '> 0'}")
            checked[name] = number
        else:
            known = ", ".join(sorted([*_CHOICES, *_NUMBERS, "auto_compact"]))
            raise ValueError(f"unknown logstate store option {name!r}; known: {known}")
    return checked


def _checked_value(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    raise TypeError(f"a logstate store holds bytes, not a {type(value).__name__}")


def _close_opened(job: Future[LocalFileStorage]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().close()


class Store(base.SerializedStore[Any, Any]):
    """Faust table storage in logstate directories, one per table partition.

    Options, from the URL query (``logstate:///srv/x?sync=always``) or the
    table's ``options`` (which win): ``sync`` ("none", "interval": default,
    "always"), ``sync_interval`` (s), ``segment_size`` (bytes), ``auto_compact``
    (true/false), ``recovery`` ("prefix": default, "strict"; not "salvage") and
    ``lock_timeout`` (s an assigned partition waits for another process to
    release its directory; default 30, as RocksDB's 30 retries).

    Args:
        url: ``logstate://`` (tabledir), ``logstate:///abs/dir`` or
            ``logstate:rel/dir`` (under tabledir), with options as its query.
        app: the Faust app.
        table: the table this store serves.
        options: the table's ``options`` mapping (read, never changed).
        **kwargs: for Faust's ``Store`` (table_name, key_type, loop, ...).

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
                f"store URL {str(self.url)!r} names a host; a logstate store is a local directory:"
                " logstate:// (tabledir), logstate:///absolute/dir or logstate:rel/dir"
            )
        checked = check_options({**self.url.query, **(options or {})})
        self.lock_timeout_s: float = checked.pop("lock_timeout", 30.0)
        self.open_arguments: dict[str, Any] = {"recovery": "prefix", **checked}
        self.base_path = Path(app.conf.tabledir) / self.url.path  # an absolute path wins
        self._partitions: dict[int, LocalFileStorage] = {}
        self._active: set[int] = set()  # partitions served to reads (assigned, not standby)
        self._frozen: set[int] = set()  # a local write failed: offsets must not advance
        self._rebalance_lock = asyncio.Lock()

    def partition_path(self, partition: int) -> Path:
        """The directory of ``partition``: ``BASE/{table}-{partition}.logstate``."""
        return self.base_path / f"{self.table_name}-{partition}{DIRECTORY_SUFFIX}"

    def _storage(self, partition: int) -> LocalFileStorage:
        """The open storage of ``partition``, opened now (no waiting) when it is not."""
        storage = self._partitions.get(partition)
        if storage is None:
            self.base_path.mkdir(parents=True, exist_ok=True)
            storage = LocalFileStorage(self.partition_path(partition), **self.open_arguments)
            self._partitions[partition] = storage
        return storage

    async def _open_partition(self, partition: int, generation_id: int | None) -> None:
        """Open ``partition``, waiting (in a thread) for its lock; give up on a newer rebalance."""
        if partition in self._partitions:
            return
        self.base_path.mkdir(parents=True, exist_ok=True)
        path = self.partition_path(partition)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            step_s = min(1.0, max(0.0, deadline - time.monotonic()))  # then: a newer rebalance?
            job = _OPENER.submit(LocalFileStorage, path, lock_timeout=step_s, **self.open_arguments)
            try:
                storage = await asyncio.wrap_future(job)
            except asyncio.CancelledError:  # the thread goes on: what it opens is closed
                job.add_done_callback(_close_opened)
                raise
            except StorageLockedError:
                if time.monotonic() >= deadline:
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

    def _served(self) -> list[tuple[int, LocalFileStorage]]:
        """The partitions reads go over: the active ones (every open one if global)."""
        return [
            (partition, storage)
            for partition, storage in sorted(self._partitions.items())
            if self.table.is_global or partition in self._active
        ]

    def _event_partition(self) -> int | None:
        """The partition of the current stream event, when reads go to it alone."""
        event = current_event()
        if event is None or self.table.is_global or self.table.use_partitioner:
            return None
        return event.message.partition

    def _to_key(self, key: bytes) -> str:
        text = bytes_to_key(key)  # TypeError for a key that is not bytes
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
        try:
            return self._to_key(key)
        except ValueError:  # for reads: a key that cannot be stored is not stored
            return None

    def _holders(self, key: bytes) -> tuple[str, list[tuple[int, LocalFileStorage]]]:
        """``key`` as text and where it may be: the current event's partition (as RocksDB's
        store, unless global or use_partitioner), else every open one; none if unstorable."""
        text = self._to_key_or_none(key)
        if text is None:
            return "", []
        partition = self._event_partition()
        if partition is not None:
            return text, [(partition, self._storage(partition))]
        return text, sorted(self._partitions.items())

    def _get(self, key: bytes) -> bytes | None:
        text, holders = self._holders(key)
        for _, storage in holders:
            value = storage.get(text)
            if value is not None:
                return _checked_value(value)
        return None

    def _contains(self, key: bytes) -> bool:
        text, holders = self._holders(key)
        return any(storage.contains_key(text) for _, storage in holders)

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
        text, holders = self._holders(key)
        for partition, storage in holders:
            try:
                storage.remove(text)
            except BaseException:
                self._frozen.add(partition)
                raise

    def _iterkeys(self) -> Iterator[bytes]:  # in key order per partition, as RocksDB's
        for _, storage in self._served():
            for text in storage.keys(stop=_TABLE_KEYS_STOP):
                yield key_to_bytes(text)

    def _itervalues(self) -> Iterator[bytes | None]:
        for _, value in self._iteritems():
            yield value

    def _iteritems(self) -> Iterator[tuple[bytes, bytes]]:
        for _, storage in self._served():
            for text, value in storage.items(stop=_TABLE_KEYS_STOP):
                checked = _checked_value(value)
                if checked is not None:
                    yield key_to_bytes(text), checked

    def _size(self) -> int:
        return sum(len(storage.keys(stop=_TABLE_KEYS_STOP)) for _, storage in self._served())

    def _clear(self) -> None:
        """Delete every key of the served partitions; one record per partition, offsets kept."""
        for partition, storage in self._served():
            try:
                with storage.batch() as group:
                    for text in list(storage.keys(stop=_TABLE_KEYS_STOP)):
                        group.remove(text)
            except BaseException:
                self._frozen.add(partition)  # Table.clear() sent the deletes already
                raise

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
        """Write changelog events and each partition's highest offset: ONE record per partition.

        Every key is checked before anything is written (a bad one writes
        nothing); a partition then has its changes and its offset, or neither.

        Args:
            batch: changelog events (``event.message``: tp, offset, key, value).
            to_key: unused (keys stay bytes), as RocksDB's store.
            to_value: unused.

        Raises:
            TypeError: an event without a key; a key or value that is not bytes.
            ValueError: a key logstate cannot store (empty, too long).
        """
        changes: dict[int, list[tuple[str, bytes | None]]] = {}
        offsets: dict[TP, int] = {}
        for event in batch:
            message = event.message
            if message.key is None:
                raise TypeError(f"changelog entry is missing its key: {message}")
            changes.setdefault(message.tp.partition, []).append(
                (self._to_key(message.key), _checked_value(message.value))
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

    def reset_state(self) -> None:
        """Delete every local partition directory of this table (the changelog stays).

        All are checked to be free (opened, closed), then each is renamed away
        (atomic) and deleted: an interrupted reset leaves a partition whole or
        gone (a leftover ``*.deleted-*`` directory is removed the next time).

        Raises:
            StorageLockedError: another process holds a partition (nothing deleted).
            OSError: a rename or delete failed.
        """
        for partition in list(self._partitions):
            self._close_partition(partition)
        own = re.compile(re.escape(self.table_name) + r"-\d+\.logstate(\.deleted-\d+)?")
        names = sorted(os.listdir(self.base_path)) if self.base_path.is_dir() else []
        paths = [self.base_path / name for name in names if own.fullmatch(name)]
        live = [path for path in paths if path.name.endswith(DIRECTORY_SUFFIX)]
        for path in live:  # all free? (nothing is deleted before they all are)
            try:
                LocalFileStorage(path, auto_create_dir=False, **self.open_arguments).close()
            except LogstateError as exc:  # damaged: deleting it is what a reset is for
                if isinstance(exc, StorageLockedError):
                    raise
        for path in paths:  # leftovers of an interrupted reset first: a rename may reuse a name
            if path not in live:
                shutil.rmtree(path)
        for path in live:
            shutil.rmtree(path.rename(path.with_name(f"{path.name}.deleted-{os.getpid()}")))

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
        """Close revoked partitions; open newly assigned active ones, waiting for their locks.

        Args:
            assigned: every TP of this worker (only this table's changelog TPs count).
            revoked: TPs taken away: closed.
            newly_assigned: TPs new to this worker: opened unless standby (at first write).
            generation_id: a waiting open gives up when a newer rebalance starts.

        Raises:
            StorageLockedError: a directory still locked after ``lock_timeout``.
        """
        if not isinstance(assigned, (set, frozenset)):  # ChangeloggedObjectManager: table first
            assigned, revoked, newly_assigned = revoked, newly_assigned, generation_id
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
