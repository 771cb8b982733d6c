"""logstate: durable local key-value state for long-lived Python services.

Every write is a checksummed record appended to a segment log in a local
directory; the in-memory index is rebuilt on open, and recovery repairs a torn
tail left by a crash. See README.md and docs/.
"""

from logstate._errors import (
    CorruptionError,
    FencedError,
    KeyNotFoundError,
    LogstateError,
    OptionConflictError,
    PickleNotAllowedError,
    ReadOnlyStorageError,
    ReplicationError,
    StorageChangedError,
    StorageClosedError,
    StorageFailedError,
    StorageForkedError,
    StorageLockedError,
    SubStorageDeletedError,
    UnsupportedFormatError,
)
from logstate._hooks import ReplicationLag
from logstate._native import ACTIVE as native
from logstate._views import bytes_to_key, key_to_bytes
from logstate.memory import InMemoryStorage
from logstate.storage import Batch, LocalFileStorage

__all__ = [
    "Batch",
    "CorruptionError",
    "FencedError",
    "InMemoryStorage",
    "KeyNotFoundError",
    "LocalFileStorage",
    "LogstateError",
    "OptionConflictError",
    "PickleNotAllowedError",
    "ReadOnlyStorageError",
    "ReplicationError",
    "ReplicationLag",
    "StorageChangedError",
    "StorageClosedError",
    "StorageFailedError",
    "StorageForkedError",
    "StorageLockedError",
    "SubStorageDeletedError",
    "UnsupportedFormatError",
    "bytes_to_key",
    "key_to_bytes",
    "native",
]

__version__ = "0.1.0"
