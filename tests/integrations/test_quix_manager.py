"""Quix's ``StateStoreManager`` on logstate, switched by ``use_logstate``, driven as Quix does.

Also the surface test: :func:`check_quix_surface` finds nothing on the
supported Quix, and names the change when a piece of that surface moves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from quixstreams import Application
from quixstreams.state.manager import StateStoreManager
from quixstreams.state.memory import MemoryStore
from quixstreams.state.rocksdb.transaction import RocksDBPartitionTransaction

from logstate.integrations.quixstreams import (
    LogstateStore,
    LogstateTimestampedStore,
    LogstateWindowedStore,
    QuixSurfaceChangedError,
    check_quix_surface,
    use_logstate,
)
from logstate.integrations.quixstreams import application as application_module


def _app(tmp_path: Path) -> Application:
    return Application(
        broker_address="127.0.0.1:1",  # never contacted: nothing here runs the app
        consumer_group="group",
        state_dir=str(tmp_path),
        use_changelog_topics=False,
    )


def _manager(app: Application) -> StateStoreManager:
    manager: StateStoreManager = app._state_manager
    return manager


def test_surface_of_the_installed_quix_is_the_supported_one() -> None:
    problems = check_quix_surface()
    assert problems == [], "\n".join(problems)


def test_use_logstate_registers_logstate_stores_where_quix_registers_its_own(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path)
    manager = _manager(app)
    manager.register_store("early", "default")  # defined before use_logstate: switched too
    use_logstate(app, sync="none", lock_timeout_s=5, recovery_batch_size=10)
    assert _manager(app) is manager  # the app's own manager object, same references
    manager.register_store("topic", "default")
    manager.register_windowed_store("topic", "tumbling_window_1000_sum")
    manager.register_timestamped_store("topic", "join", grace_ms=50, keep_duplicates=True)
    manager.register_store("topic", "mem", store_type=MemoryStore)
    stores = manager.stores
    assert type(stores["early"]["default"]) is LogstateStore
    assert type(stores["topic"]["default"]) is LogstateStore
    assert type(stores["topic"]["tumbling_window_1000_sum"]) is LogstateWindowedStore
    assert type(stores["topic"]["join"]) is LogstateTimestampedStore
    assert type(stores["topic"]["mem"]) is MemoryStore
    # the app's shutdown signal reaches the partitions' lock wait
    assert (
        cast(Any, stores["topic"]["default"])._partition_kwargs["stop_event"]
        is cast(Any, manager)._stop_event
    )


def test_manager_assign_transact_revoke_reopen(tmp_path: Path) -> None:
    app = _app(tmp_path)
    use_logstate(app)
    manager = _manager(app)
    manager.init()
    manager.register_store("topic", "default")
    manager.register_windowed_store("topic", "win")
    assigned = manager.on_partition_assign("topic", 0, committed_offsets={})
    assert set(assigned) == {"default", "win"}
    assert cast(Any, assigned["default"]).path == str(
        tmp_path / "group" / "default" / "topic" / "0"
    )
    store = manager.get_store("topic", "default")
    tx = store.start_partition_transaction(0)
    assert isinstance(tx, RocksDBPartitionTransaction)
    for offset in range(1, 4):
        tx = store.start_partition_transaction(0)
        state = tx.as_state(prefix=b"key", timestamp=offset)
        state.set("count", (state.get("count") or 0) + 1)
        tx.prepare(processed_offsets={"topic": offset})
        tx.flush(changelog_offset=offset)
    win = manager.get_store("topic", "win")
    wtx: Any = win.start_partition_transaction(0)
    wtx.update_window(0, 1000, value=41, timestamp_ms=5, prefix=b"key")
    wtx.prepare()
    wtx.flush(changelog_offset=7)
    manager.on_partition_revoke("topic", 0)
    assert store.partitions == {} and win.partitions == {}
    manager.on_partition_assign("topic", 0, committed_offsets={})  # reopen
    tx = store.start_partition_transaction(0)
    assert tx.as_state(prefix=b"key").get("count") == 3
    assert store.partitions[0].get_changelog_offset() == 3
    wtx = win.start_partition_transaction(0)
    assert wtx.get_window(0, 1000, prefix=b"key") == 41
    assert manager.destroy_partition_state("topic", 0) == ["default", "win"]
    manager.close()


def test_use_logstate_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Application"):
        use_logstate(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sync"):
        use_logstate(_app(tmp_path), sync="sometimes")


def test_a_changed_quix_surface_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What a Quix release that moves the surface looks like: a loud, named failure."""

    def register_store(self: Any, stream_id: Any, name: Any, kind: Any = None) -> None: ...

    monkeypatch.setattr(StateStoreManager, "register_store", register_store)
    monkeypatch.setattr(
        application_module,
        "_TRANSACTION_MODULES",
        {"quixstreams.state.rocksdb.transaction": object},
    )
    monkeypatch.setattr("quixstreams.__version__", "3.29.0")
    app = _app(tmp_path)
    del app._state_manager
    with pytest.raises(QuixSurfaceChangedError) as raised:
        use_logstate(app)
    message = str(raised.value)
    assert "StateStoreManager.register_store takes ('self', 'stream_id', 'name', 'kind')" in message
    assert "partition attribute(s) [" in message and "'advance_high_water'" in message
    assert "version 3.29.0 is outside >=3.28.1,<3.29" in message
    assert "Application._state_manager" in message
