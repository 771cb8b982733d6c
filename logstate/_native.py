"""Which path runs: the optional C core (``logstate._cnative``) or pure Python.

Owns: the one decision, made once at import, whether the C extension is in
use: it is when it was built and imports, unless ``LOGSTATE_PURE=1`` is set
in the environment (which forces pure Python, the reference). Every module
that has a C fast path asks ``EXT`` here, never imports ``_cnative`` itself.
Must never: do I/O beyond the import, or decide anything about records.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Final

__all__ = ["ACTIVE", "EXT", "PURE_REQUESTED", "REASON"]

PURE_REQUESTED: Final = os.environ.get("LOGSTATE_PURE", "") not in ("", "0")


def _load() -> tuple[ModuleType | None, str]:
    if PURE_REQUESTED:
        return None, "LOGSTATE_PURE is set"
    try:
        return importlib.import_module("logstate._cnative"), "C extension in use"
    except ImportError as exc:
        return None, f"C extension not importable ({exc})"


EXT, REASON = _load()
"""The C extension module (None: pure Python), and why."""

ACTIVE: Final = EXT is not None
"""True when the C path is in use."""
