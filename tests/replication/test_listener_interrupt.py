"""An interrupt (KeyboardInterrupt) inside the commit listener, on a real nats-server.

The engine delivers a record again when its listener raised (and offers it
again when its early listener, ack="sync", was cut); the shipper's queue
must come out of that holding each seq once.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from logstate import LocalFileStorage
from logstate.replication import restore
from logstate.replication._shipper import Shipper
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock, store_state
from tests.replication.test_replication import (
    assert_exactly_once,
    changelog,
    open_replicated,
    subject_seqs,
)


def _interrupt_after_queue_append() -> Any:
    """A trace function raising KeyboardInterrupt once, right after the shipper
    queue's append (of on_commit, or of offer with ack="sync")."""
    code = Shipper._queue.__code__
    lines, start = inspect.getsourcelines(Shipper._queue)
    append_line = next(start + i for i, text in enumerate(lines) if "pending.append(" in text)
    fired = [False]

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and not fired[0] and frame.f_lineno > append_line:
            fired[0] = True
            raise KeyboardInterrupt
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        if event == "call" and frame.f_code is code and not fired[0]:
            return local
        return None

    return tracer, fired


@pytest.mark.parametrize("ack", ["async", "sync"])
def test_an_interrupt_in_the_listener_after_queueing_ships_each_seq_once(
    nats_server: NatsServer, tmp_path: Path, ack: str
) -> None:
    clock = Clock()
    # (ack="sync", sync="always": the record is queued by its offer, before its fdatasync)
    sync = "always" if ack == "sync" else "none"
    source = open_replicated(tmp_path / "src", changelog(nats_server, ack=ack), clock, sync=sync)
    source["k0"] = 0
    assert source.wait_replicated(10.0)
    tracer, fired = _interrupt_after_queue_append()
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            source["k1"] = 1  # committed; its delivery to the shipper cut short
    finally:
        sys.settrace(None)
    assert fired[0]
    source["k2"] = 2  # delivers the cut record again, then this one
    assert source.wait_replicated(10.0)
    last = source._engine.appender.seq
    assert_exactly_once(subject_seqs(nats_server), last)
    expected = store_state(source)
    restore(nats_server.url, "STATE", "orders.0", tmp_path / "copy")
    copy = LocalFileStorage(tmp_path / "copy", clock=clock)
    assert store_state(copy) == expected
    copy.close()
    assert source.replication_lag() == (0, 0)
    source.close()
