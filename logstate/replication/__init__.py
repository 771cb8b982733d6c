"""Replication of a storage's changelog on NATS JetStream (docs/replication.md).

``JetStreamChangelog`` is given to a storage (``LocalFileStorage(path,
changelog=...)``); ``restore`` builds a store from the stream elsewhere, up to
any restorable seq or time; ``restorable`` says which; ``follow`` keeps a
standby copy current. Needs the ``replication`` extra (nats-py).
"""

from logstate._errors import FencedError, ReplicationError
from logstate._hooks import ReplicationLag
from logstate.replication._changelog import JetStreamChangelog
from logstate.replication._restore import (
    FollowStatus,
    Restorable,
    RestoreResult,
    follow,
    restorable,
    restore,
)

__all__ = [
    "FencedError",
    "FollowStatus",
    "JetStreamChangelog",
    "ReplicationError",
    "ReplicationLag",
    "Restorable",
    "RestoreResult",
    "follow",
    "restorable",
    "restore",
]
