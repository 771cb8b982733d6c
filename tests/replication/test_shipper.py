"""The shipper's batching on a real nats-server: what shares a message, what is not held back.

With ``ack="async"`` the shipper lets the records of ``LINGER_S`` after the
oldest queued one gather into one message; a waiter (``wait_replicated``,
a sync commit) makes it publish at once.
"""

from __future__ import annotations

import time
from pathlib import Path

from logstate.replication import _shipper
from tests.replication.servers import NatsServer
from tests.replication.stores import Clock
from tests.replication.test_replication import (
    assert_exactly_once,
    changelog,
    open_replicated,
    subject_seqs,
)


def test_async_commits_within_the_linger_share_one_message(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    source = open_replicated(tmp_path / "src", changelog(nats_server), Clock())
    assert source.wait_replicated(10.0)  # (the open's own messages, if any, are out)
    before = len(subject_seqs(nats_server))
    gap_s = _shipper.LINGER_S / 10
    for i in range(3):  # an idle shipper wakes at the first, then lets the others join
        source[f"k{i}"] = i
        time.sleep(gap_s)
    assert source.wait_replicated(10.0)
    seqs = subject_seqs(nats_server)
    assert seqs[before:] == [(1, 3)]
    assert_exactly_once(seqs, 3)
    source.close()


def test_sync_commits_are_not_held_back_to_share_a_message(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    source = open_replicated(tmp_path / "src", changelog(nats_server, ack="sync"), Clock())
    for i in range(3):
        source[f"k{i}"] = i  # returns once acknowledged: each in its own message
        assert source.replication_lag() == (0, 0)
    assert subject_seqs(nats_server) == [(1, 1), (2, 2), (3, 3)]
    source.close()
