"""The in-memory index: namespace -> key -> location, the checkpoint, live bytes.

Owns: every mutation rule of the index, written once: a set, a delete, a
clear or drop of a namespace with everything below it, a namespace's
creation, a checkpoint, one replayed record (``apply_frame``: recovery, the
settling of an interrupted write, the decoder fuzzer), a compaction's
conditional move (``move_unchanged``: only locations that did not change
meanwhile, Bitcask's conditional put), and the live-byte count that follows
each of them (the bytes of the records the index points to).
Must never: do I/O, take a lock or start a thread (the caller holds the
engine's write lock, or owns the index alone, at open), or decode bytes
beyond ``_scan.replay_frame``'s tuples.

Each namespace's index comes from :func:`new_index`: a dict (pure path) or a
``KeyMap`` (csrc/keymap.c, the C path: the same mapping API and order).

The write path's hot loops (``Writer.set``, ``write_group``,
``write_keys``) keep inlined copies of :meth:`Keydir.put`, each marked;
``_check`` (live bytes equal the sum of the locations' sizes) guards them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Final, TypeAlias

from logstate import _scan
from logstate._errors import SubStorageDeletedError
from logstate._format import (
    NS_SEPARATOR,
    REC_CHECKPOINT,
    REC_CLEAR,
    REC_CREATE_NS,
    REC_DELETE,
    REC_DROP_NS,
    REC_SET,
)
from logstate._location import (
    KIND_GROUP_OP,
    OFFSET_SHIFT,
    SEGMENT_SHIFT,
    SIZE_SHIFT,
    Location,
    compressed_location,
    location_segment,
    location_size,
    total_size,
)
from logstate._native import EXT
from logstate._sortedkeys import SortedKeys, key_range
from logstate._values import TAG_EXPIRES

# The C path (``_native.EXT``): a C base type holds the hot fields, so that
# the C hot paths (csrc/fast.c) read them without attribute look-ups; this
# class still owns every rule, and reads and writes them as attributes.
if TYPE_CHECKING:
    _KeydirBase = object
else:
    _KeydirBase = object if EXT is None else EXT.KeydirBase

if TYPE_CHECKING:
    from logstate._cnative import KeyMap

__all__ = [
    "Index",
    "Keydir",
    "SortedKeys",
    "as_index",
    "is_within",
    "join_namespace",
    "key_range",
    "new_index",
]

# the replay loop writes the location shifts as literals
assert (SEGMENT_SHIFT, OFFSET_SHIFT, SIZE_SHIFT) == (74, 34, 2)

Index: TypeAlias = "dict[str, Location] | KeyMap"  # one namespace's: either, by mapping API
_KEYMAP: Final = getattr(EXT, "KeyMap", None)  # (None: pure, or a build without keymap.c)
new_index: Final[Callable[[], Index]] = dict if _KEYMAP is None else _KEYMAP
"""An empty namespace index: every one the keydir creates is made by this."""


def as_index(index: dict[str, Location]) -> Index:
    """``index`` (a marshal snapshot's dict) as :func:`new_index` holds it."""
    converted: Index = index if _KEYMAP is None else _KEYMAP(index)
    return converted


def join_namespace(parent: str, name: str) -> str:
    """The path of sub-storage ``name`` below ``parent`` ("" is the root)."""
    return name if not parent else parent + NS_SEPARATOR + name


def is_within(ns: str, ancestor: str) -> bool:
    """True when ``ns`` is ``ancestor`` or below it."""
    return not ancestor or ns == ancestor or ns.startswith(ancestor + NS_SEPARATOR)


class Keydir(_KeydirBase):
    """The index of one storage directory (``path`` names it in errors).

    ``namespaces`` maps each namespace ("" is the root) to its keys'
    locations; those mappings (from :func:`new_index`: KeyMaps on the C path,
    dicts on the pure one) are the index itself (the hot paths use them
    directly, through the mapping API only). ``live_bytes``: the sum of :func:`location_size` over
    every location. ``ordered``: a :class:`SortedKeys` view of each
    namespace that had an ordered read; every change of a namespace's key
    set calls :meth:`note_key` (the hot paths too, behind a test of
    ``ordered``), so the views stay exact.

    ``expiring``: namespace -> key -> deadline (seconds, the storage's
    clock) of each key whose value has an expiry time; every set calls
    :meth:`note_expiry` when its value has one or when ``expiring`` is not
    empty (a set without one clears the key's). An expired key stays in
    the index (and in ``live_bytes``) until compaction drops it; readers
    hide it (:meth:`is_expired`, :meth:`expired_keys`). ``clock_floor``: the
    newest time the store is known to have seen (written with its expiring
    values, saved in the snapshot, raised by every reader of the clock):
    the clock never reads earlier than it, so a clock set back never makes
    an expired key live again.

    ``watch``: True once this index has had an ordered view or an expiry
    time (it stays True): the hot set path (``Writer.set``) then calls
    :meth:`note_set` before each store, and pays one attribute test
    otherwise.
    """

    __slots__ = tuple(
        name  # (those of the C base, when there is one, are its own)
        for name in (
            "checkpoint",
            "clock_floor",
            "expiring",
            "live_bytes",
            "namespaces",
            "ordered",
            "path",
            "watch",
        )
        if not hasattr(_KeydirBase, name)
    )

    def __init__(
        self,
        path: str,
        namespaces: dict[str, Index] | None = None,
        checkpoint: Location | None = None,
        live_bytes: int = 0,
    ) -> None:
        self.path = path
        self.namespaces: dict[str, Index] = {"": new_index()} if namespaces is None else namespaces
        self.checkpoint = checkpoint
        self.live_bytes = live_bytes
        self.ordered: dict[str, SortedKeys] = {}
        self.expiring: dict[str, dict[str, float]] = {}
        self.clock_floor = 0.0
        self.watch = False

    # ------------------------------------------------------------------ reads
    def require(self, ns: str) -> Index:
        """The index of namespace ``ns``.

        Raises:
            SubStorageDeletedError: it does not exist (deleted by another handle).
        """
        index = self.namespaces.get(ns)
        if index is None:
            raise self.deleted_error(ns)
        return index

    def deleted_error(self, ns: str) -> SubStorageDeletedError:
        return SubStorageDeletedError(f"sub-storage {ns!r} of {self.path} was deleted")

    def children(self, ns: str) -> list[str]:
        """Names (not paths) of the namespaces directly below ``ns``, sorted."""
        prefix = ns + NS_SEPARATOR if ns else ""
        return sorted(
            n[len(prefix) :]
            for n in self.namespaces
            if n and n.startswith(prefix) and NS_SEPARATOR not in n[len(prefix) :]
        )

    def key_count(self) -> int:
        return sum(len(index) for index in self.namespaces.values())

    def live_in(self, segments: set[int]) -> list[tuple[Location, str, str]]:
        """(location, namespace, key) of every key whose value is in ``segments``."""
        return [
            (loc, ns, key)
            for ns, index in self.namespaces.items()
            for key, loc in index.items()
            if location_segment(loc) in segments
        ]

    def sorted_keys(self, ns: str) -> list[str]:
        """The keys of ``ns`` in order (the list is the view's own: copy before
        releasing the lock the caller holds)."""
        index = self.require(ns)
        view = self.ordered.get(ns)
        if view is None:
            view = self.ordered[ns] = SortedKeys(index)
            self.watch = True
            return view.keys
        return view.resolve(index)

    def note_key(self, ns: str, key: str) -> None:
        """``key`` of ``ns`` was added or removed: tell the ordered view, if any."""
        view = self.ordered.get(ns)
        if view is not None:
            view.changed.append(key)
            if len(view.changed) > view.limit:
                del self.ordered[ns]

    def note_expiry(self, ns: str, key: str, expiry: _scan.Expiry | None) -> None:
        """``key`` of ``ns`` was set to a value with ``expiry`` (deadline_s,
        written_s), or without one (None)."""
        if expiry is not None:
            self.watch = True
            found = self.expiring.get(ns)
            if found is None:
                found = self.expiring[ns] = {}
            found[key] = expiry[0]
            if expiry[1] > self.clock_floor:
                self.clock_floor = expiry[1]
        else:
            found = self.expiring.get(ns)
            if found is not None and found.pop(key, None) is not None and not found:
                del self.expiring[ns]

    def note_set(self, ns: str, key: str, is_new: bool, value: bytes) -> None:
        """A set of ``key`` of ``ns`` to the encoded ``value`` is about to be
        stored (``is_new``: the key is not indexed): tell the ordered view,
        and keep the expiry table. Called before the store (see :meth:`put`)
        and after the record is written, so an interrupt in between is
        settled by replaying the record."""
        if is_new and self.ordered:
            self.note_key(ns, key)
        if self.expiring or value[0] == TAG_EXPIRES:
            self.note_expiry(ns, key, _scan.value_expiry(value))

    def is_expired(self, ns: str, key: str, now_s: float) -> bool:
        found = self.expiring.get(ns)
        if found is None:
            return False
        deadline_s = found.get(key)
        return deadline_s is not None and deadline_s <= now_s

    def expired_keys(self, ns: str, now_s: float) -> list[str]:
        """The keys of ``ns`` that expired at ``now_s`` (still in the index)."""
        found = self.expiring.get(ns)
        if not found:
            return []
        return [key for key, deadline_s in found.items() if deadline_s <= now_s]

    def expired_bytes(self, now_s: float) -> int:
        """The live bytes of the keys that expired at ``now_s`` (dead, until compaction)."""
        namespaces = self.namespaces
        return sum(
            location_size(namespaces[ns][key])
            for ns in self.expiring
            for key in self.expired_keys(ns, now_s)
        )

    def sub_namespaces(self) -> list[str]:
        """Every namespace but the root, parents before children."""
        return sorted((n for n in self.namespaces if n), key=lambda n: (n.count(NS_SEPARATOR), n))

    # ------------------------------------------------------------------ changes
    def ensure(self, ns: str) -> Index:
        """The index of ``ns``, created (with any missing parent) if absent.

        The write path always creates a parent first; replay creates what is
        missing so that it is total.
        """
        index = self.namespaces.get(ns)
        if index is None:
            parts = ns.split(NS_SEPARATOR)
            for i in range(1, len(parts) + 1):
                index = self.namespaces.setdefault(NS_SEPARATOR.join(parts[:i]), new_index())
        assert index is not None
        return index

    def put(self, ns: str, index: Index, key: str, loc: Location) -> None:
        """Point ``key`` of ``index`` (of ``ns``) at ``loc``; account for the live bytes.

        A new key is noted on the ordered view before it is stored: an
        interrupt in between leaves a noted key that did not change, which
        the view tolerates (the other order would leave a change unnoted).
        """
        old = index.get(key)
        if old is None and self.ordered:
            self.note_key(ns, key)
        index[key] = loc
        self.live_bytes += location_size(loc) - (0 if old is None else location_size(old))

    def delete(self, ns: str, key: str) -> None:
        """Delete ``key`` of ``ns`` (absent: nothing but the expiry table is touched).

        The view is told first and the expiry time dropped whether the key
        was there or not, so that re-applying a delete an interrupt cut
        short (recovery's settle) finishes it.
        """
        found = self.namespaces.get(ns)
        if found is not None:
            if self.ordered:
                self.note_key(ns, key)
            old = found.pop(key, None)
            if old is not None:
                self.live_bytes -= location_size(old)
            if self.expiring:
                self.note_expiry(ns, key, None)

    def clear(self, ns: str, drop_self: bool) -> None:
        """Empty ``ns`` and drop every namespace below it; ``drop_self``: drop ``ns`` too."""
        namespaces = self.namespaces
        for name in [n for n in self.ordered if is_within(n, ns)]:
            del self.ordered[name]
        for name in [n for n in self.expiring if is_within(n, ns)]:
            del self.expiring[name]
        for name in [n for n in namespaces if n and is_within(n, ns) and n != ns]:
            self.live_bytes -= total_size(namespaces.pop(name))
        if drop_self and ns:
            self.live_bytes -= total_size(namespaces.pop(ns, {}))
        else:
            index = namespaces.get(ns)
            if index is not None:
                self.live_bytes -= total_size(index)
                index.clear()

    def apply(
        self, op_type: int, ns: str, key: str, loc: Location, expiry: _scan.Expiry | None = None
    ) -> None:
        """Apply one operation (of a record or a group) whose bytes are at ``loc``.

        ``expiry``: (deadline_s, written_s) of a set's value, if it has one.
        """
        if op_type == REC_SET:
            self.put(ns, self.ensure(ns), key, loc)
            if expiry is not None or self.expiring:
                self.note_expiry(ns, key, expiry)
        elif op_type == REC_DELETE:
            self.delete(ns, key)
        elif op_type == REC_CLEAR:
            self.clear(ns, drop_self=False)
        elif op_type == REC_CREATE_NS:
            self.ensure(ns)
        elif op_type == REC_DROP_NS:
            self.clear(ns, drop_self=True)
        elif op_type == REC_CHECKPOINT:
            self.checkpoint = loc

    def apply_frame(self, data: bytes, frame: _scan.Frame, segment: int, shift: int) -> None:
        """Apply one scanned record of ``segment`` (its bytes in ``data``) to the index.

        ``shift``: subtracted from the record's offset in ``data`` to give its
        offset in the segment file (a window's start, bytes a salvage rewrite
        removes before it).
        """
        kind, ops = _scan.replay_frame(data, frame.offset, frame.size, frame.record_type)
        namespaces = self.namespaces
        high = segment << 74  # (literal shifts: asserted equal to _location's at import)
        compressed = kind == _scan.FRAME_COMPRESSED_GROUP and ops
        raw_size = ops[-1][3] + ops[-1][4] if compressed else 0  # the decompressed op list
        for op_type, ns, key, op_offset, op_size, expiry in ops:
            loc: Location
            if kind == _scan.FRAME_PLAIN:
                loc = high | (op_offset - shift) << 34 | op_size << 2  # KIND_RECORD
            elif kind == _scan.FRAME_GROUP:
                loc = high | (op_offset - shift) << 34 | op_size << 2 | KIND_GROUP_OP
            else:
                loc = compressed_location(
                    segment, frame.offset - shift, frame.size, op_offset, op_size, raw_size
                )
                op_size = loc[5]  # its share of the record's bytes on disk
            if op_type == REC_SET:
                # self.put(self.ensure(ns), key, loc), inlined: replay's common case
                index = namespaces.get(ns)
                if index is None:
                    index = self.ensure(ns)
                old = index.get(key)
                if expiry is not None or self.watch:  # noted first, as in put
                    if old is None and self.ordered:  # (a settled write of a live store)
                        self.note_key(ns, key)
                    self.note_expiry(ns, key, expiry)
                index[key] = loc
                self.live_bytes += op_size if old is None else op_size - location_size(old)
            else:
                self.apply(op_type, ns, key, loc)

    def move_unchanged(self, moved: Sequence[tuple[str, str, Location, Location | None]]) -> None:
        """Point each (ns, key, old, new) key at ``new`` where it still points at ``old``.

        A ``new`` of None: the key expired and the compaction dropped it;
        it is deleted where it still points at ``old``.
        """
        namespaces = self.namespaces
        for ns, key, old, new in moved:
            index = namespaces.get(ns)
            if index is not None and index.get(key) == old:
                if new is None:
                    self.delete(ns, key)
                else:
                    index[key] = new
                    self.live_bytes += location_size(new) - location_size(old)

    def recount(self) -> None:
        """Count the live bytes again from the locations, and drop what an
        interrupted step may have left stale (after a repaired step): the
        expiry times of keys no longer indexed, the ordered views."""
        self.live_bytes = sum(total_size(index) for index in self.namespaces.values())
        self.ordered.clear()
        for ns, deadlines in list(self.expiring.items()):
            index = self.namespaces.get(ns, {})
            for key in [k for k in deadlines if k not in index]:
                del deadlines[key]
            if not deadlines:
                del self.expiring[ns]

    # ------------------------------------------------------------------ invariants
    def _check(self) -> None:
        """Assert the index's invariants."""
        assert "" in self.namespaces, "root namespace missing"
        for ns in self.namespaces:
            if ns:
                parent = ns.rpartition(NS_SEPARATOR)[0]
                assert parent in self.namespaces, f"namespace {ns!r} without parent"
        live = sum(total_size(index) for index in self.namespaces.values())
        assert self.live_bytes == live, f"live bytes {self.live_bytes}, index says {live}"
        for index in self.namespaces.values():
            if not isinstance(index, dict):
                index._check()  # a KeyMap's own invariants
        for ns, view in self.ordered.items():
            assert ns in self.namespaces, f"ordered view of missing namespace {ns!r}"
            index = self.namespaces[ns]
            keys = view.keys
            assert all(a < b for a, b in pairwise(keys)), f"view of {ns!r} not sorted"
            noted = set(view.changed)
            stale = (set(keys) ^ index.keys()) - noted
            assert not stale, f"ordered view of {ns!r} misses changes of {sorted(stale)[:5]}"
        assert self.watch or not (self.ordered or self.expiring), "views or times unwatched"
        for ns, deadlines in self.expiring.items():
            assert deadlines, f"empty expiry table of {ns!r}"
            assert ns in self.namespaces, f"expiry table of missing namespace {ns!r}"
            extra = deadlines.keys() - self.namespaces[ns].keys()
            assert not extra, f"deadlines of keys not in {ns!r}: {sorted(extra)[:5]}"
