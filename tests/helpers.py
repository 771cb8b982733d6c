"""Helpers the test files share.

- ``observed_state``: every sub-storage's items, read through the public API;
- ``kill``: leave a store as a killed process (``kill -9``) would, through
  ``Engine.abandon`` (no final sync, no snapshot, the lock released).
"""

from __future__ import annotations

from typing import Any

from logstate import LocalFileStorage, _registry

State = dict[str, dict[str, Any]]


def observed_state(root: LocalFileStorage) -> State:
    """Every sub-storage (recursively, "" for ``root``) with its items, read through the API."""
    state: State = {}

    def visit(handle: LocalFileStorage, path: str) -> None:
        state[path] = dict(handle.items())
        for name in handle.get_sub_storages():
            child = handle.get_or_create_sub_storage(name)
            try:
                visit(child, f"{path}/{name}" if path else name)
            finally:
                child.close()

    visit(root, "")
    return state


def kill(handle: LocalFileStorage) -> None:
    """Simulate ``kill -9`` of the process using ``handle``: no further call reaches the disk.

    The written bytes stay in the files (the OS has them); the background
    threads stop without syncing; every descriptor is closed and the
    directory lock released; the engine is forgotten by the registry, so
    that the next open is a fresh one. Other handles on the engine are dead.
    """
    _registry.abandon_engine(handle._engine)
    handle._closed = True
    handle._finalizer.detach()
