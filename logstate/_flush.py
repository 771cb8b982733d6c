"""The flush path: a group of sets and deletes of one namespace's keys.

Owns: ``KeysWriter.write_keys`` (``Engine.write_keys``: an
``InMemoryStorage.flush``), the group record of keys it writes without
per-operation tuples, and its index update; a part of ``_writer.Writer``
(a base class of it: the same lock, appender and keydir). On the C path
(``_native.EXT``) the body is encoded and the index updated in C
(csrc/fast.c ``encode_keys``, ``index_keys``: copies of the Python code here,
which stays the reference and runs whenever the index watches sets).
Must never: write a flush as more than one record, read values, or wait for
a sync under the write lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from logstate import _format as fmt
from logstate._append import Appender
from logstate._format import REC_CHECKPOINT, REC_GROUP, RECORD_OVERHEAD
from logstate._keydir import Keydir
from logstate._location import KIND_GROUP_OP, location_size
from logstate._native import EXT
from logstate._options import EngineOptions
from logstate._scan import value_expiry

__all__ = ["KeysWriter"]

_encode_keys = None if EXT is None else EXT.encode_keys
_index_keys = None if EXT is None else EXT.index_keys


class KeysWriter:
    """``write_keys`` of ``_writer.Writer`` (which sets these fields)."""

    __slots__ = ()
    _options: EngineOptions
    _lock: threading.Lock
    _appender: Appender
    _keydir: Keydir
    _fast: bool
    write_group: Callable[..., int]
    _after_write: Callable[[int, bool], None]
    check_writable: Callable[[], None]

    def write_keys(
        self,
        ns: str,
        ns_bytes: bytes,
        keys: list[str],
        values: list[bytes | None],
        checkpoint: bytes | None = None,
        durable: bool = False,
        expiring: bool = False,
    ) -> int:
        """Set (or, where the value is None, delete) ``keys`` of ``ns`` as ONE group.

        The same record :meth:`write_group` writes for these operations, by a
        path with no per-operation tuples (InMemoryStorage.flush). Keys must
        be valid (checked with ``encode_key``) and distinct.

        Returns:
            The number of operations written (the checkpoint counts as one).
        """
        compress_from = self._options.compress_min_size
        count = len(keys) + (checkpoint is not None)
        ops: list[bytes] | None = None
        if (
            _encode_keys is not None
            and self._fast
            and count >= 2
            and type(keys) is list
            and type(values) is list
        ):
            # the C path: the body below in one allocation (copy of the Python encode)
            body = _encode_keys(ns_bytes, keys, values, checkpoint)
            if compress_from is None or len(body) - fmt.GROUP_HEADER_SIZE < compress_from:
                return self._write_keys_body(
                    ns, ns_bytes, keys, values, checkpoint, durable, expiring, body, None
                )
        ops = fmt.encode_key_ops(ns_bytes, keys, values)
        if checkpoint is not None:
            ops.append(fmt.encode_op(REC_CHECKPOINT, checkpoint))
        if count < 2 or (compress_from is not None and sum(map(len, ops)) >= compress_from):
            # one record, or a compressed group: the general path
            pairs = [(op[4], op[fmt.GROUP_OP_SIZE :]) for op in ops[: len(keys)]]
            names = [(ns, key) for key in keys]
            return self.write_group(
                pairs, checkpoint, names=names, durable=durable, expiring=expiring
            )
        body = fmt.GROUP_HEADER.pack(0, count) + b"".join(ops)
        return self._write_keys_body(
            ns, ns_bytes, keys, values, checkpoint, durable, expiring, body, ops
        )

    def _write_keys_body(
        self,
        ns: str,
        ns_bytes: bytes,
        keys: list[str],
        values: list[bytes | None],
        checkpoint: bytes | None,
        durable: bool,
        expiring: bool,
        body: bytes,
        ops: list[bytes] | None,
    ) -> int:
        """:meth:`write_keys` of an uncompressed group: its ``body`` encoded
        already, and its ``ops`` (None: encoded by C, and not split)."""
        count = len(keys) + (checkpoint is not None)
        ap = self._appender
        with self._lock:
            self.check_writable()
            index = self._keydir.require(ns)
            try:
                segment, offset, _size, end_pos = ap.write(REC_GROUP, body)
                op_offset = offset + RECORD_OVERHEAD + fmt.GROUP_HEADER_SIZE
                high = segment << 74 | KIND_GROUP_OP
                live = 0
                get = index.get
                ordered = bool(self._keydir.ordered)
                self._keydir.watch = self._keydir.watch or expiring
                check_expiry = expiring or bool(self._keydir.expiring)
                if ops is None and _index_keys is not None and not ordered and not check_expiry:
                    # the C path: copy of the loop below without views or expiry
                    live = _index_keys(index, len(ns_bytes), keys, values, high, op_offset)
                    if checkpoint is not None:
                        op_size = fmt.GROUP_OP_SIZE + len(checkpoint)
                        op_offset += len(body) - fmt.GROUP_HEADER_SIZE - op_size
                        self._keydir.checkpoint = high | op_offset << 34 | op_size << 2
                    ops = []  # (done: live is added below)
                if ops is None:  # C encoded it, the index watches: each op's size
                    ops = fmt.encode_key_ops(ns_bytes, keys, values)
                    if checkpoint is not None:
                        ops.append(fmt.encode_op(REC_CHECKPOINT, checkpoint))
                for key, value, op in zip(keys, values, ops, strict=False):
                    op_size = len(op)
                    if value is None:
                        if ordered:  # noted first: Keydir.put
                            self._keydir.note_key(ns, key)
                        old = index.pop(key, None)
                        if old is not None:
                            live -= location_size(old)
                    else:
                        old = get(key)
                        if old is None and ordered:
                            self._keydir.note_key(ns, key)
                        index[key] = high | op_offset << 34 | op_size << 2
                        live += op_size if old is None else op_size - location_size(old)
                    if check_expiry:
                        self._keydir.note_expiry(
                            ns, key, None if value is None else value_expiry(value)
                        )
                    op_offset += op_size
                if checkpoint is not None and ops:
                    self._keydir.checkpoint = high | op_offset << 34 | len(ops[-1]) << 2
                self._keydir.live_bytes += live
            except BaseException:
                ap.interrupted()
                raise
            ap.in_flight = None
        self._after_write(end_pos, durable)
        return count
