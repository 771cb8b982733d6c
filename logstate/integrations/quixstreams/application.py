"""Making a Quix ``Application`` keep its state in logstate; the check of what that needs.

Owns: :func:`use_logstate`, the one documented way to run a Quix app on the
logstate store, and :func:`check_quix_surface`, the list of every piece of
Quix's surface this integration relies on, each checked, with a message
naming what changed. Quix 3 accepts only its own store types
(``StateStoreManager.register_store`` raises ValueError for others;
quix-streams#1014), so the app's state manager is switched to a subclass
that registers Quix's own stores as before (changelog topics, names,
directories) and then puts the logstate store in each one's place.
Must never: change anything of Quix's but the app's one state-manager
object, or switch a store that already has partitions assigned.

Private Quix surface used (all checked by :func:`check_quix_surface`):
``Application._state_manager``, ``StateStoreManager._state_dir``,
``._rocksdb_options`` and ``._stop_event``, ``RocksDBStore._changelog_producer_factory``,
``TimestampedStore._grace_ms`` / ``._keep_duplicates``, the private TTL
helpers ``_ttl`` imports, and the partition attributes Quix's transactions
read on their partition (found by reading their source).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import tempfile
from typing import Any, Final, cast

import quixstreams
from quixstreams import Application
from quixstreams.models.topics import TopicConfig
from quixstreams.state.base import Store, StorePartition
from quixstreams.state.manager import DEFAULT_STATE_STORE_NAME, StateStoreManager, StoreTypes
from quixstreams.state.rocksdb import RocksDBStore
from quixstreams.state.rocksdb.timestamped import TimestampedStore
from quixstreams.state.rocksdb.windowed.store import WindowedRocksDBStore

from logstate.integrations.quixstreams.partition import (
    DEFAULT_LOCK_TIMEOUT_S,
    DEFAULT_RECOVERY_BATCH_SIZE,
    LogstateStorePartition,
    check_partition_options,
)
from logstate.integrations.quixstreams.stores import (
    LogstateStore,
    LogstateTimestampedStore,
    LogstateTimestampedStorePartition,
    LogstateWindowedStore,
    LogstateWindowedStorePartition,
)

__all__ = [
    "SUPPORTED_QUIX_VERSIONS",
    "QuixSurfaceChangedError",
    "check_quix_surface",
    "use_logstate",
]

SUPPORTED_QUIX_VERSIONS: Final = ">=3.28.1,<3.29"  # as pyproject's extra "quix"
_SUPPORTED_PREFIX: Final = "3.28."

# what Quix's methods we override take (a new or renamed parameter means a new Quix)
_REGISTER_PARAMETERS: Final = {
    "register_store": ("self", "stream_id", "store_name", "store_type", "changelog_config"),
    "register_windowed_store": ("self", "stream_id", "store_name", "changelog_config"),
    "register_timestamped_store": (
        "self",
        "stream_id",
        "store_name",
        "grace_ms",
        "keep_duplicates",
        "changelog_config",
    ),
}
# the modules whose transactions run on our partitions, and the class they get
_TRANSACTION_MODULES: Final = {
    "quixstreams.state.base.transaction": LogstateStorePartition,
    "quixstreams.state.rocksdb.transaction": LogstateStorePartition,
    "quixstreams.state.rocksdb.windowed.transaction": LogstateWindowedStorePartition,
    "quixstreams.state.rocksdb.timestamped": LogstateTimestampedStorePartition,
}
_STORE_PARTITION_ABSTRACT: Final = frozenset(
    {
        "begin",
        "close",
        "exists",
        "get",
        "get_changelog_offset",
        "recover_from_changelog_message",
        "write",
        "write_changelog_offset",
    }
)
_STORE_ABSTRACT: Final = frozenset({"create_new_partition"})


class QuixSurfaceChangedError(RuntimeError):
    """The installed Quix Streams differs from what the logstate store was built against.

    Attributes:
        problems: one sentence per change found.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"- {p}" for p in problems)
        super().__init__(
            f"quixstreams {quixstreams.__version__} changed what the logstate store relies on "
            f"(supported: {SUPPORTED_QUIX_VERSIONS}):\n{lines}"
        )


def _partition_attributes_used(module_name: str) -> set[str]:
    """Attributes Quix's code in ``module_name`` reads on a transaction's partition."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            value = node.value
            if (isinstance(value, ast.Attribute) and value.attr == "_partition") or (
                isinstance(value, ast.Name) and value.id == "partition"
            ):
                names.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Attribute)
            and node.args[0].attr == "_partition"
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            names.add(node.args[1].value)
    return names


def check_quix_surface(app: Application | None = None) -> list[str]:
    """Every change, in the installed Quix Streams, to the surface this integration uses.

    Args:
        app: also check this application's state-manager attribute.

    Returns:
        One sentence per problem; empty when everything is as expected.
    """
    problems: list[str] = []
    if not quixstreams.__version__.startswith(_SUPPORTED_PREFIX):
        problems.append(
            f"version {quixstreams.__version__} is outside {SUPPORTED_QUIX_VERSIONS} "
            "(the store interfaces are internal to Quix and move in minor versions)"
        )
    for method, expected in _REGISTER_PARAMETERS.items():
        found = getattr(StateStoreManager, method, None)
        names = () if found is None else tuple(inspect.signature(found).parameters)
        if names != expected:
            problems.append(f"StateStoreManager.{method} takes {names}, expected {expected}")
    for cls, abstract in ((StorePartition, _STORE_PARTITION_ABSTRACT), (Store, _STORE_ABSTRACT)):
        found_abstract = set(getattr(cls, "__abstractmethods__", ()))
        if found_abstract != abstract:
            problems.append(
                f"{cls.__name__}'s abstract methods are now {sorted(found_abstract)}, "
                f"expected {sorted(abstract)}"
            )
    for module_name, partition_class in _TRANSACTION_MODULES.items():
        try:
            used = _partition_attributes_used(module_name)
        except (ImportError, OSError) as exc:
            problems.append(f"cannot read {module_name}: {exc}")
            continue
        missing = sorted(n for n in used if not hasattr(partition_class, n))
        if missing:
            problems.append(
                f"{module_name} now uses partition attribute(s) {missing}, which "
                f"{partition_class.__name__} does not provide"
            )
    with tempfile.TemporaryDirectory() as state_dir:
        manager = StateStoreManager(state_dir=state_dir)
        for attribute in ("_state_dir", "_rocksdb_options", "_stop_event"):
            if not hasattr(manager, attribute):
                problems.append(f"StateStoreManager no longer has the attribute {attribute}")
        rocks = RocksDBStore(name="probe", stream_id="probe", base_dir=state_dir)
        if not hasattr(rocks, "_changelog_producer_factory"):
            problems.append("RocksDBStore no longer has the attribute _changelog_producer_factory")
        stamped = TimestampedStore(
            name="probe", stream_id="probe", base_dir=state_dir, grace_ms=1, keep_duplicates=True
        )
        for attribute in ("_grace_ms", "_keep_duplicates"):
            if not hasattr(stamped, attribute):
                problems.append(f"TimestampedStore no longer has the attribute {attribute}")
    if app is not None and not isinstance(getattr(app, "_state_manager", None), StateStoreManager):
        problems.append("Application._state_manager is no longer the app's StateStoreManager")
    return problems


def _replacement(manager: StateStoreManager, store: Store, options: dict[str, Any]) -> Store | None:
    """The logstate store to put in place of Quix's ``store``, or None to keep it."""
    if store.partitions:
        return None  # never switch a store with open partitions
    kind: type[LogstateStore]
    extra: dict[str, Any] = {}
    if type(store) is RocksDBStore:
        kind = LogstateStore
    elif type(store) is WindowedRocksDBStore:
        kind = LogstateWindowedStore
    elif type(store) is TimestampedStore:
        kind = LogstateTimestampedStore
        extra = {"grace_ms": store._grace_ms, "keep_duplicates": store._keep_duplicates}
    else:
        return None  # MemoryStore or a store that is already ours
    return kind(
        name=store.name,
        stream_id=store.stream_id,
        base_dir=str(manager._state_dir),
        changelog_producer_factory=store._changelog_producer_factory,
        options=manager._rocksdb_options,
        stop_event=manager._stop_event,  # shutdown ends a partition's lock wait
        **extra,
        **options,
    )


def _switch_stores(manager: StateStoreManager, options: dict[str, Any]) -> None:
    for stores in manager.stores.values():
        for name, store in list(stores.items()):
            replacement = _replacement(manager, store, options)
            if replacement is not None:
                stores[name] = replacement


class _LogstateStateStoreManager(StateStoreManager):
    """Quix's state manager, registering logstate stores in place of RocksDB ones."""

    _logstate_options: dict[str, Any]

    def register_store(
        self,
        stream_id: str | None,
        store_name: str = DEFAULT_STATE_STORE_NAME,
        store_type: StoreTypes | None = None,
        changelog_config: TopicConfig | None = None,
    ) -> None:
        if cast(object, store_type) is LogstateStore:
            store_type = RocksDBStore  # registered as Quix's own, then switched
        super().register_store(stream_id, store_name, store_type, changelog_config)
        _switch_stores(self, self._logstate_options)

    def register_windowed_store(
        self, stream_id: str, store_name: str, changelog_config: TopicConfig | None = None
    ) -> None:
        super().register_windowed_store(stream_id, store_name, changelog_config)
        _switch_stores(self, self._logstate_options)

    def register_timestamped_store(
        self,
        stream_id: str,
        store_name: str,
        grace_ms: int,
        keep_duplicates: bool,
        changelog_config: TopicConfig | None = None,
    ) -> None:
        super().register_timestamped_store(
            stream_id, store_name, grace_ms, keep_duplicates, changelog_config
        )
        _switch_stores(self, self._logstate_options)


def use_logstate(
    app: Application,
    *,
    sync: str | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    recovery_batch_size: int = DEFAULT_RECOVERY_BATCH_SIZE,
) -> None:
    """Make ``app`` keep every RocksDB-backed store (plain, windowed, timestamped) in logstate.

    Call it once, before ``app.run()`` (before or after the dataframes are
    defined). Stores keep their names, changelog topics and directories
    (``<state_dir>/<consumer group>/<store>/<topic>/<partition>``, now logstate
    directories). A ``MemoryStore`` is left as it is.

    Args:
        app: the Quix ``Application``.
        sync: logstate's durability mode ("none", "interval", "always"; None: logstate's default).
        lock_timeout_s: seconds a partition open waits for another process to release it.
        recovery_batch_size: changelog messages written per atomic group during recovery.

    Raises:
        TypeError: ``app`` is not a Quix Application.
        ValueError: a bad option.
        QuixSurfaceChangedError: the installed Quix differs from the supported one
            (the message names every change).
    """
    if not isinstance(app, Application):
        raise TypeError(f"use_logstate needs a quixstreams Application, got {type(app).__name__}")
    problems = check_quix_surface(app)
    if problems:
        raise QuixSurfaceChangedError(problems)
    options: dict[str, Any] = {
        "sync": sync,
        "lock_timeout_s": lock_timeout_s,
        "recovery_batch_size": recovery_batch_size,
    }
    check_partition_options(sync, lock_timeout_s, recovery_batch_size)  # now, not at assignment
    manager: StateStoreManager = app._state_manager
    manager.__class__ = _LogstateStateStoreManager
    assert isinstance(manager, _LogstateStateStoreManager)
    manager._logstate_options = options
    _switch_stores(manager, options)
