"""A Quix Streams 3 state store on logstate (see docs/integrations.md).

Run a Quix app on it with :func:`use_logstate`::

    from quixstreams import Application
    from logstate.integrations.quixstreams import use_logstate

    app = Application(broker_address="...", consumer_group="...")
    use_logstate(app)

Modules: ``_keys`` (column family + bytes key -> one logstate key),
``_ranges`` (ordered ranges, the lock wait), ``_ttl`` and ``_ttl_partition``
(Quix's event-time TTL on a partition), ``partition`` (the store partition), ``stores`` (the stores,
windowed and timestamped variants), ``application`` (``use_logstate`` and
the check of the Quix surface it needs).
This package imports quixstreams (extra ``quix``); nothing else in logstate does.
"""

from logstate.integrations.quixstreams._keys import QuixKeyTooLongError, max_quix_key_size
from logstate.integrations.quixstreams.application import (
    SUPPORTED_QUIX_VERSIONS,
    QuixSurfaceChangedError,
    check_quix_surface,
    use_logstate,
)
from logstate.integrations.quixstreams.partition import LogstateStorePartition
from logstate.integrations.quixstreams.stores import (
    LogstateStore,
    LogstateTimestampedStore,
    LogstateTimestampedStorePartition,
    LogstateWindowedStore,
    LogstateWindowedStorePartition,
)

__all__ = [
    "SUPPORTED_QUIX_VERSIONS",
    "LogstateStore",
    "LogstateStorePartition",
    "LogstateTimestampedStore",
    "LogstateTimestampedStorePartition",
    "LogstateWindowedStore",
    "LogstateWindowedStorePartition",
    "QuixKeyTooLongError",
    "QuixSurfaceChangedError",
    "check_quix_surface",
    "max_quix_key_size",
    "use_logstate",
]
