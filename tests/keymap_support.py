"""The C path's KeyMap for the tests that need it, never silently skipped.

``keymap_ext()`` gives ``logstate._native.EXT`` (the C extension) when it is in
use. When it is not: with ``LOGSTATE_PURE=1`` set (the pure run of the suite)
the test is skipped, as expected; otherwise the test FAILS, because an
extension that did not build must not pass for a green C run.
"""

from __future__ import annotations

from types import ModuleType

import pytest

from logstate import _native


def keymap_ext() -> ModuleType:
    """The C extension, with its KeyMap; skip under LOGSTATE_PURE=1, else fail without it."""
    if _native.EXT is None:
        if _native.PURE_REQUESTED:
            pytest.skip("LOGSTATE_PURE=1: the pure path has no KeyMap")
        pytest.fail(f"the C path is not in use ({_native.REASON}): KeyMap tests cannot run")
    if not hasattr(_native.EXT, "KeyMap"):
        pytest.fail(f"{_native.EXT.__file__} was built without csrc/keymap.c's KeyMap")
    return _native.EXT
