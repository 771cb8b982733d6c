"""The write path: what each operation appends and how it changes the index.

Owns: the operations (set, delete, clear, create and drop sub-storages, a
group of operations, a flush of changed keys) and which of them wait for a
sync: every one with sync="always", a flush asked to be durable unless
sync="none". The hot ``set`` and the group loops keep marked inline copies
of ``Appender.append`` and ``Keydir.put``.
On the C path (``_native.EXT``) the common case of ``set`` and the loops
of ``write_keys`` run in C (csrc/fast.c: ``WriterBase.set``, ``encode_keys``,
``index_keys``), copies of the marked Python code here, which stays the
reference and runs every case C does not take (``_set_python``).
Must never: read values, wait for a sync or a compaction while holding the
write lock, or encode a record other than through ``_format`` (the marked
inline copy in ``set`` excepted: ``tests/test_format.py`` proves it equal).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from logstate import _format as fmt
from logstate._append import Appender
from logstate._clock import Clock
from logstate._commit import GroupCommit, NativeCommit
from logstate._crc import crc_bytes
from logstate._flush import KeysWriter
from logstate._format import (
    NAME_LEN,
    NS_SEPARATOR,
    REC_CHECKPOINT,
    REC_CLEAR,
    REC_CREATE_NS,
    REC_DELETE,
    REC_DROP_NS,
    REC_GROUP,
    REC_SET,
    RECORD_OVERHEAD,
    SEGMENT_HEADER_SIZE,
    SEQ_SIZE,
)
from logstate._fs import FileSystem
from logstate._keydir import Index, Keydir
from logstate._lifecycle import Lifecycle
from logstate._location import (
    KIND_GROUP_OP,
    KIND_RECORD,
    OFFSET_SHIFT,
    SEGMENT_SHIFT,
    SIZE_MASK,
    SIZE_SHIFT,
    Location,
    compressed_location,
    location_size,
    pack_location,
)
from logstate._native import EXT
from logstate._options import EngineOptions
from logstate._scan import Expiry, set_body_value, value_expiry
from logstate._schedule import CompactionScheduler
from logstate._segments import SegmentSet

__all__ = ["Writer"]


def _expiry(check: bool, op_type: int, body: bytes) -> Expiry | None:
    """(deadline_s, written_s) of a set op's value, when ``check`` (else None)."""
    return value_expiry(set_body_value(body)) if check and op_type == REC_SET else None


# the hot paths write the location shifts as literals (74, 34, 2)
assert (SEGMENT_SHIFT, OFFSET_SHIFT, SIZE_SHIFT) == (74, 34, 2)
_pack_name_len = NAME_LEN.pack
_pack_length_type_seq = fmt.LENGTH_TYPE_SEQ.pack
_pack_u32 = fmt.U32_STRUCT.pack
_crc_bytes = crc_bytes
_MAX_BODY_SIZE = fmt.MAX_RECORD_SIZE - fmt.SEQ_SIZE

_NAME_LEN_SIZE = NAME_LEN.size

# The C path: WriterBase holds the fields its ``set`` reads (``_lock``,
# ``_life``, ``_appender`` ...) and is that ``set``. FAST_PATHS False: Writers
# made from now on take the Python path only (tests compare the two paths).
if TYPE_CHECKING:
    _WriterBase = object
else:
    _WriterBase = object if EXT is None else EXT.WriterBase
FAST_PATHS = EXT is not None


class Writer(KeysWriter, _WriterBase):
    """Writes the operations of one engine (every method takes the write lock)."""

    def __init__(
        self,
        fs: FileSystem,
        options: EngineOptions,
        lock: threading.Lock,
        life: Lifecycle,
        keydir: Keydir,
        segments: SegmentSet,
        appender: Appender,
        commit: GroupCommit,
        scheduler: CompactionScheduler,
        clock: Clock,
    ) -> None:
        self._now = clock.now
        self._fs = fs
        self._options = options
        self._lock = lock
        self._life = life
        self._keydir = keydir
        self._namespaces = keydir.namespaces  # (never replaced after open)
        self._segments = segments
        self._appender = appender
        self._commit = commit.commit
        self._commit_part = commit
        self._scheduler = scheduler
        self._os_write = fs.raw_write_function()
        self._sync_always = options.sync == "always"
        self._fast = FAST_PATHS
        if EXT is not None:
            self._scheduler_state = vars(scheduler)  # (C reads its "backlog" there)
            self._module_state = globals()  # (C reads _MAX_BODY_SIZE there: tests patch it)
            if isinstance(commit, NativeCommit):
                commit.writer = self  # (C reads the sync target from this writer's fields)

    def check_writable(self) -> None:
        """Raise unless writes are allowed; finish an interrupted write first. Under the lock."""
        life = self._life
        if life.forked_from is not None:
            raise life.closed_error()
        self._appender.interrupted()
        life.check_writable()

    def sync(self) -> None:
        """Make everything written so far durable now (fdatasync)."""
        ap = self._appender
        with self._lock:
            if self._life.closed:
                raise self._life.closed_error()
            self.check_writable()
            end_pos = ap.written_pos
        self._commit(end_pos)
        if ap.listener is not None:
            self.deliver()

    def _append_applied(self, record_type: int, body: bytes, apply: Callable[[], object]) -> int:
        """Under the lock: append one record, then ``apply`` it to the index; its end position.

        An exception anywhere in between is settled from the file (the
        record whole: the after state, replayed; else the before state).
        """
        ap = self._appender
        try:
            end_pos = ap.write(record_type, body)[3]
            apply()
        except BaseException:
            ap.interrupted()
            raise
        ap.in_flight = None
        return end_pos

    def _after_write(self, end_pos: int, durable: bool = False) -> None:
        """After a write, outside the lock: the sync it waits for (every write with
        sync="always"; a ``durable`` one unless sync="none"), the commit
        listener, and the compaction backlog."""
        ap = self._appender
        if self._sync_always or (durable and not ap.durable_when_written):
            self._commit(end_pos)
        if ap.listener is not None:
            self.deliver()
        if self._scheduler.backlog:
            self._scheduler.hold_back()

    def _hold_back(self) -> None:
        """The C set's last step when the compaction backlog is set (see ``_after_write``)."""
        self._scheduler.hold_back()

    def deliver(self) -> None:
        """Give the commit listener what is durable now (outside the lock)."""
        ap = self._appender
        ap.deliver(ap.written_pos if ap.durable_when_written else self._commit_part.synced_pos)

    def _set_python(
        self, ns: str, ns_bytes: bytes, key: str, key_bytes: bytes, value: bytes
    ) -> None:
        """Store an encoded value under ``key`` in namespace ``ns``.

        The hot path: one lock, one encode, one write; ``Appender.append``
        and ``Keydir.put`` inlined (marked copies, checked by ``_check``).
        On the C path, ``WriterBase.set`` is a copy of its common case (the
        branch that writes with ``os_write``) and calls this for the rest.
        """
        body_size = len(ns_bytes) + _NAME_LEN_SIZE + len(key_bytes) + len(value)
        ap = self._appender
        with self._lock:
            if self._life.blocked or ap.in_flight is not None:
                self.check_writable()
            index = self._namespaces.get(ns)
            if index is None:
                raise self._keydir.deleted_error(ns)
            if body_size > _MAX_BODY_SIZE:
                raise fmt.record_too_large(SEQ_SIZE + body_size)
            seq = ap.seq + 1  # taken once the record is written (settle: from the file)
            # fmt.encode_record(REC_SET, seq, ns key value), inlined: one join
            rest = b"".join(
                (
                    _pack_length_type_seq(SEQ_SIZE + body_size, REC_SET, seq),
                    ns_bytes,
                    _pack_name_len(len(key_bytes)),
                    key_bytes,
                    value,
                )
            )
            record = _pack_u32(_crc_bytes(rest)) + rest
            size = len(record)
            active = self._segments.active
            assert active is not None
            offset = active.size
            if offset + size > ap.roll_size and offset > SEGMENT_HEADER_SIZE:
                try:
                    segment, offset = ap.append(record)
                    ap.seq = seq
                    if self._keydir.watch:
                        self._keydir.note_set(ns, key, key not in index, value)
                    self._keydir.put(ns, index, key, segment << 74 | offset << 34 | size << 2)
                    if ap.listener is not None:
                        ap.queue(seq, ap.written_pos, record)
                except BaseException:
                    ap.interrupted()
                    raise
                ap.in_flight = None
                end_pos = ap.written_pos
            else:
                pos_before = ap.written_pos
                try:
                    # one write(2) straight from here when the file system is
                    # the plain one (a test's may inject faults in append)
                    os_write = self._os_write
                    written = 0 if os_write is None else os_write(active.fd, record)
                    if written != size:  # a short write, or a file system of a test's
                        self._fs.append(
                            active.fd, memoryview(record)[written:] if written else record
                        )
                    active.size = offset + size
                    ap.seq = seq
                    ap.written_pos = end_pos = pos_before + size
                    old = index.get(key)
                    if self._keydir.watch:  # views or expiry times to keep: noted first
                        self._keydir.note_set(ns, key, old is None, value)
                    index[key] = active.number << 74 | offset << 34 | size << 2  # KIND_RECORD
                    if old is None:
                        self._keydir.live_bytes += size
                    elif type(old) is int:
                        self._keydir.live_bytes += size - ((old >> 2) & SIZE_MASK)
                    else:
                        self._keydir.live_bytes += size - location_size(old)
                    if ap.listener is not None:
                        ap.queue(seq, end_pos, record)
                except OSError as exc:
                    self._life.fail(exc)
                    raise
                except BaseException:
                    # interrupted: no store before this one, so that no call
                    # can be interrupted again before _in_flight is set
                    ap.in_flight = (active, offset, size, pos_before, False)
                    ap.settle()
                    raise
        # self._after_write(end_pos), inlined: the hot path
        if self._sync_always:
            self._commit(end_pos)
        if ap.listener is not None:
            self.deliver()
        if self._scheduler.backlog:
            self._scheduler.hold_back()

    if EXT is None:
        set = _set_python  # (on the C path: WriterBase.set)

    def set_expiring(self, ns: str, ns_bytes: bytes, key: str, key_bytes: bytes, v: bytes) -> None:
        """:meth:`set` of a value with an expiry time (TAG_EXPIRES): the index
        watches sets from now on (``Keydir.watch``), so the set notes it."""
        self._keydir.watch = True
        self.set(ns, ns_bytes, key, key_bytes, v)

    def delete(self, ns: str, ns_bytes: bytes, key: str, key_bytes: bytes) -> bool:
        """Delete ``key``; write nothing and return False when it is absent (or expired:
        it reads as absent, and compaction drops it)."""
        keydir = self._keydir
        with self._lock:
            self.check_writable()
            if key not in keydir.require(ns) or (
                keydir.expiring and keydir.is_expired(ns, key, self._now())
            ):
                return False
            body = ns_bytes + NAME_LEN.pack(len(key_bytes)) + key_bytes
            end_pos = self._append_applied(REC_DELETE, body, lambda: keydir.delete(ns, key))
        self._after_write(end_pos)
        return True

    def clear(self, ns: str) -> None:
        """Remove every key of ``ns`` and every sub-storage below it: one record."""
        keydir = self._keydir
        with self._lock:
            self.check_writable()
            keydir.require(ns)
            end_pos = self._append_applied(
                REC_CLEAR, fmt.encode_name(ns), lambda: keydir.clear(ns, drop_self=False)
            )
        self._after_write(end_pos)

    def create_namespace(self, ns: str) -> None:
        """Make sub-storage ``ns`` exist (its parent must exist)."""
        keydir = self._keydir
        with self._lock:
            if ns in self._namespaces and not (self._life.closed or self._life.closing):
                return  # nothing to write: a read, allowed after a failed write
            self.check_writable()
            parent = ns.rpartition(NS_SEPARATOR)[0]
            keydir.require(parent)
            end_pos = self._append_applied(
                REC_CREATE_NS, fmt.encode_name(ns), lambda: keydir.ensure(ns)
            )
        self._after_write(end_pos)

    def drop_namespaces(self, namespaces: list[str]) -> int:
        """Delete the given sub-storages (with everything below them) atomically.

        Returns:
            How many of them existed (only those are written).
        """
        keydir = self._keydir
        with self._lock:
            self.check_writable()
            present = [ns for ns in namespaces if ns in self._namespaces]
            if not present:
                return 0
            if len(present) == 1:
                record_type, body = REC_DROP_NS, fmt.encode_name(present[0])
            else:
                record_type = REC_GROUP
                body = fmt.encode_group_body([(REC_DROP_NS, fmt.encode_name(ns)) for ns in present])

            def drop() -> None:
                for ns in present:
                    keydir.clear(ns, drop_self=True)

            end_pos = self._append_applied(record_type, body, drop)
        self._after_write(end_pos)
        return len(present)

    def write_group(
        self,
        ops: list[tuple[int, bytes]],
        checkpoint: bytes | None = None,
        names: list[tuple[str, str]] | None = None,
        durable: bool = False,
        expiring: bool = False,
    ) -> int:
        """Append ``ops`` (type, body) as ONE group record: all of them or none survive.

        A single operation is written as a plain record. Namespaces named by
        the operations must exist (or be created earlier in the group).

        Args:
            ops: (operation type, encoded body) pairs, applied in order.
            checkpoint: an encoded value stored as the group's last operation.
            names: (namespace, key) of each op, from a caller that built the
                bodies itself (Batch, InMemoryStorage): the bodies are then
                not decoded again. Without it every body is decoded (checked).
            expiring: some set's value has an expiry time (TAG_EXPIRES): the
                index notes the deadlines (it does anyway once it holds one).

        Returns:
            The number of operations written.
        """
        if names is None:
            names = []
            for op_type, body in ops:
                op = fmt.decode_op(op_type, body, 0, len(body))
                names.append((op.ns, op.key))
        else:
            names = list(names)
        if checkpoint is not None:
            ops = [*ops, (REC_CHECKPOINT, checkpoint)]
            names.append(("", ""))
        if not ops:
            return 0
        ap = self._appender
        with self._lock:
            self.check_writable()
            created: set[str] = set()
            namespaces = self._namespaces
            for (op_type, _body), (ns, _key) in zip(ops, names, strict=True):
                if op_type == REC_CREATE_NS:
                    created.add(ns)
                elif ns not in namespaces and ns not in created and op_type != REC_CHECKPOINT:
                    self._keydir.require(ns)
            self._keydir.watch = self._keydir.watch or expiring  # (sticky: Keydir.watch)
            check_expiry = expiring or bool(self._keydir.expiring)
            try:
                if len(ops) == 1:
                    segment, offset, size, end_pos = ap.write(ops[0][0], ops[0][1])
                    ns, key = names[0]
                    loc = pack_location(segment, offset, size, KIND_RECORD)
                    self._keydir.apply(ops[0][0], ns, key, loc, _expiry(check_expiry, *ops[0]))
                else:
                    body = fmt.encode_group_body(
                        ops, self._options.compress_min_size, self._options.zstd_level
                    )
                    segment, offset, size, end_pos = ap.write(REC_GROUP, body)
                    compressed = body[0] & fmt.GROUP_FLAG_ZSTD
                    raw_size = fmt.group_raw_size(body) if compressed else 0
                    # where each op landed: in the file, or in the decompressed op list
                    op_offset = (
                        0 if compressed else offset + RECORD_OVERHEAD + fmt.GROUP_HEADER_SIZE
                    )
                    apply = self._keydir.apply
                    op_header = fmt.GROUP_OP_SIZE
                    high = segment << 74 | KIND_GROUP_OP
                    live = 0
                    current_ns: str | None = None
                    index: Index = {}
                    for (op_type, op_body), (ns, key) in zip(ops, names, strict=True):
                        op_size = op_header + len(op_body)
                        if op_type == REC_SET and not compressed:
                            # the common case, inlined: one dict store per key
                            if ns != current_ns:
                                index = self._keydir.ensure(ns)
                                current_ns = ns
                            old = index.get(key)
                            if old is None and self._keydir.ordered:  # noted first
                                self._keydir.note_key(ns, key)
                            index[key] = high | op_offset << 34 | op_size << 2
                            live += op_size if old is None else op_size - location_size(old)
                            if check_expiry:
                                self._keydir.note_expiry(ns, key, _expiry(True, REC_SET, op_body))
                        else:
                            self._keydir.live_bytes += live
                            live = 0
                            current_ns = None  # a clear or drop may replace the dict
                            where: Location
                            if compressed:
                                where = compressed_location(
                                    segment, offset, size, op_offset, op_size, raw_size
                                )
                            else:
                                where = pack_location(segment, op_offset, op_size, KIND_GROUP_OP)
                            apply(op_type, ns, key, where, _expiry(check_expiry, op_type, op_body))
                        op_offset += op_size
                    self._keydir.live_bytes += live
            except BaseException:
                ap.interrupted()
                raise
            ap.in_flight = None
        self._after_write(end_pos, durable)
        return len(ops)
