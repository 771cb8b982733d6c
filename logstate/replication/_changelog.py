"""``JetStreamChangelog``: the object a storage is given to replicate one partition.

Owns: the Changelog protocol the engine calls (``attach`` at open,
``restore_before_open`` for ``restore=``), and that one changelog serves one
open storage at a time.
Must never: hold a store's replication state (``_replicator``) or restore by
itself (``_restore``).
"""

from __future__ import annotations

from typing import Any

from logstate.replication._config import RESTORE_MODES, ChangelogConfig
from logstate.replication._replicator import Replicator
from logstate.replication._restore import restore_for_open

__all__ = ["JetStreamChangelog"]


class JetStreamChangelog(ChangelogConfig):
    __doc__ = (ChangelogConfig.__doc__ or "").replace(
        "The options of one partition's changelog (``JetStreamChangelog``'s arguments).",
        "The changelog of one partition on a JetStream stream (see docs/replication.md).",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mode: str | None = None  # the restore= mode of the open in progress
        self.attached: Replicator | None = None

    # ------------------------------------------------------------------ the Changelog protocol
    def restore_before_open(self, path: str, mode: str) -> None:
        """``LocalFileStorage(..., restore=mode)``: restore ``path`` first where due."""
        if mode not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {', '.join(RESTORE_MODES)}, got {mode!r}")
        self._mode = mode
        restore_for_open(self, path, mode)

    def attach(self, engine: Any) -> Replicator:
        """Called by the engine's open: start replicating it (see ``Replicator.open``)."""
        if self.attached is not None and not self.attached.closed:
            raise ValueError(f"{self!r} is already attached to {self.attached.path}")
        client = self.client()
        try:
            replicator = Replicator(self, client, engine, self._mode)
            replicator.open()
        except BaseException:
            client.release()
            raise
        finally:
            self._mode = None
        self.attached = replicator
        return replicator
