"""Handles on a directory's shared engine: their lifetime, and the seam for writers above.

Owns: :class:`Handle`, the base of ``LocalFileStorage``: the one reference
a handle holds on the shared engine of its directory (released by
:meth:`Handle.close`, or when the handle is collected), its sub-storage
(namespace) and ``allow_pickle``, its closed state and the error a closed
handle raises; and the seam through which :class:`~logstate._batch.Batch`
and ``InMemoryStorage`` write (:meth:`Handle._write_ops`,
:meth:`Handle._write_changes`, :meth:`Handle._load_encoded`). On the C
path those fields are slots of ``_cnative.HandleBase``, whose ``set`` is the
common case of ``LocalFileStorage.set`` (docs/design.md, "The C path"). A
handle is never copied or pickled (a copy would share its one reference).
Must never: check arguments (``_checks`` does, before a handle is asked),
touch files or bytes, or decide when a write is durable (the engine does,
from its ``sync`` mode and what the caller asks).
"""

from __future__ import annotations

import contextlib
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn, TypeVar

from logstate._checks import check_ttl
from logstate._engine import Engine
from logstate._errors import LogstateError, StorageClosedError, StorageFailedError
from logstate._format import MAX_KEY_SIZE, encode_name
from logstate._native import EXT
from logstate._registry import Reference, add_reference
from logstate._values import TAG_BYTES, expiring_value
from logstate._writer import Writer

__all__ = ["Handle"]

_H = TypeVar("_H", bound="Handle")

# The C path: HandleBase holds the fields LocalFileStorage's C ``set`` reads
# (``_writer``, ``_ns``, ``_ns_bytes``, ``_closed``) and is that ``set``, a
# copy of the common case of ``LocalFileStorage._set_python``. FAST_PATHS
# False: handles made from now on take the Python path only (tests compare).
if TYPE_CHECKING:
    _HandleBase = object
else:
    _HandleBase = object if EXT is None else EXT.HandleBase
FAST_PATHS = EXT is not None
if EXT is not None and (EXT.FAST_MAX_KEY_SIZE, EXT.FAST_TAG_BYTES) != (MAX_KEY_SIZE, TAG_BYTES):
    raise ImportError("logstate._cnative was built for another MAX_KEY_SIZE or TAG_BYTES")


class Handle(_HandleBase):
    """One reference on an engine, for one sub-storage of its directory.

    Closing releases the reference (the last one closes the engine); a handle
    never closed is released when it is collected, or at exit (legacy code
    never closes its storages).

    The seam: ``Batch`` and ``InMemoryStorage`` reach a handle only through
    :meth:`_write_ops`, :meth:`_write_changes` and :meth:`_load_encoded`
    (and a ``Batch``, which a handle makes for itself, reads the identity
    attributes ``_ns``, ``_ns_bytes`` and ``_allow_pickle``, set once by
    :meth:`_attach` and never changed).
    """

    # set by _attach (from LocalFileStorage.__init__ or _new_handle)
    _engine: Engine
    _ns: str
    _ns_bytes: bytes
    _allow_pickle: bool
    _closed: bool
    _writer: Writer | None  # the engine's writer (C set); None: the Python path
    _reference: Reference
    _finalizer: weakref.finalize[[], Handle]

    def _attach(self, reference: Reference, ns: str, allow_pickle: bool) -> None:
        self._reference = reference
        self._engine = reference.engine
        self._ns = ns
        self._ns_bytes = encode_name(ns)
        self._allow_pickle = allow_pickle
        self._closed = False
        self._writer = reference.engine.writer if FAST_PATHS else None
        # the reference is released by close(), or when the handle is
        # collected (or at exit: legacy code never closes its storages)
        self._finalizer = weakref.finalize(self, reference.release_collected)

    @classmethod
    def _new_handle(cls: type[_H], engine: Engine, ns: str, allow_pickle: bool) -> _H:
        """A new handle of this class on ``engine`` (one more reference), for ``ns``."""
        reference = add_reference(engine)
        handle = cls.__new__(cls)
        handle._attach(reference, ns, allow_pickle)
        return handle

    def __copy__(self) -> NoReturn:
        raise TypeError(
            f"a {type(self).__name__} handle cannot be copied or pickled: "
            "open the directory again for another handle"
        )

    def __deepcopy__(self, memo: object) -> NoReturn:
        self.__copy__()

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        self.__copy__()

    def _closed_error(self) -> LogstateError:
        life = self._engine.life
        # an inherited handle in a forked child, or any handle of a fenced engine
        if life.forked_from is not None or life.fenced is not None:
            return life.closed_error()
        return StorageClosedError(f"storage handle on {self.path} is closed")

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> str:
        """The storage directory (absolute, symlinks resolved)."""
        return self._engine.path

    @property
    def name(self) -> str:
        """The sub-storage path (``a/b``) of this handle; "" for the directory's root."""
        return self._ns

    @property
    def closed(self) -> bool:
        return self._closed or self._engine.closed

    # ------------------------------------------------------------------ the seam
    def _write_ops(
        self, ops: list[tuple[int, bytes]], names: list[tuple[str, str]], expiring: bool = False
    ) -> int:
        """Write ``ops`` (type, body) as ONE group record; ``names``: (namespace, key) of each.

        ``expiring``: some set's value has an expiry time (``_expiring``).

        For :meth:`Batch.commit <logstate._batch.Batch.commit>`: durable as
        the ``sync`` mode says (as a ``set``).

        Returns:
            How many operations were written.

        Raises:
            StorageClosedError: this handle (or its engine) is closed.
            Others: as ``Engine.write_group``.
        """
        if self.closed:  # the handle, or its engine (in a forked child, say)
            raise self._closed_error()
        return self._engine.write_group(ops, names=names, expiring=expiring)

    def _write_changes(
        self,
        keys: list[str],
        values: list[bytes | None],
        checkpoint: bytes | None,
        expiring: bool = False,
    ) -> int:
        """Set (a value of None: delete) ``keys`` and store ``checkpoint``, as ONE group.

        For :meth:`InMemoryStorage.flush <logstate.memory.InMemoryStorage.flush>`:
        the group is durable on return unless the engine's ``sync`` is
        "none" (``Engine.write_keys(..., durable=True)``). ``keys`` are valid
        (checked by ``encode_key``) and distinct; ``values`` are encoded
        values (``encode_value``), one per key.

        Returns:
            How many operations were written (the checkpoint counts as one);
            0 when there are none (nothing is written then).

        Raises:
            StorageClosedError: this handle (or its engine) is closed, also
                when there is nothing to write.
            OSError / StorageFailedError / SubStorageDeletedError: as
                ``Engine.write_keys``.
        """
        if self.closed:
            raise self._closed_error()
        if not keys and checkpoint is None:
            return 0
        return self._engine.write_keys(
            self._ns, self._ns_bytes, keys, values, checkpoint, durable=True, expiring=expiring
        )

    def _expiring(self, encoded: bytes, ttl: object) -> bytes:
        """``encoded`` with the expiry time ``ttl`` seconds from the storage's clock.

        Raises:
            TypeError / ValueError: a bad ``ttl`` (``check_ttl``).
        """
        ttl_s = check_ttl(ttl)
        now_s = self._engine.now()
        return expiring_value(encoded, now_s + ttl_s, now_s)

    def _now(self) -> float:
        """The storage's clock (``Reader.now``): never earlier than it read before."""
        return self._engine.now()

    def _load_encoded(self) -> tuple[dict[str, bytes | memoryview], bool]:
        """Every key of this (sub-)storage with its stored value bytes, and ``allow_pickle``.

        For ``InMemoryStorage``, which decodes the values with that
        ``allow_pickle`` and encodes its own with it.

        Raises:
            CorruptionError: a record fails its checksum.
        """
        return self._engine.load_namespace(self._ns), self._allow_pickle

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Sync, then release this handle; the last handle of a directory closes it.

        Every close syncs (fdatasync of everything written so far, in every
        sync mode), also while other handles (sub-storages, other opens in
        this process) keep the directory open; the last handle also writes
        the index snapshot, closes the files and releases the directory lock.
        Nothing is synced on a read-only or failed storage. Closing twice is
        allowed. Every other call on a closed handle raises
        :class:`StorageClosedError`.

        Raises:
            OSError: the sync failed (the handle is released all the same;
                the storage then refuses writes until reopened).
        """
        if not self._closed:
            # Released and synced before the handle is marked closed: an
            # interrupt in between leaves a handle whose close() can be called
            # again, and does both (releasing twice releases once).
            self._reference.release()
            engine = self._engine
            try:
                if not (engine.closed or engine.options.read_only or engine.failed is not None):
                    # closed meanwhile (after its own final sync) or failed: nothing to do
                    with contextlib.suppress(StorageClosedError, StorageFailedError):
                        engine.sync()  # other handles keep it open: sync what was written
            except OSError:
                self._closed = True  # released all the same
                self._finalizer.detach()
                raise
            self._closed = True
            self._finalizer.detach()

    def __enter__(self: _H) -> _H:
        if self._closed:
            raise self._closed_error()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check(self) -> None:
        """Assert the invariants of the engine behind this handle."""
        self._engine._check()
