"""The rule for tests of the C path: they fail, never skip, when it is missing.

Unless ``LOGSTATE_PURE=1`` is set (pure Python asked for: then they skip).
"""

from __future__ import annotations

from types import ModuleType

import pytest

from logstate import _native


def native_extension() -> ModuleType:
    """``logstate._cnative`` as the C path uses it; skip under LOGSTATE_PURE=1, else fail."""
    if _native.EXT is None:
        if _native.PURE_REQUESTED:
            pytest.skip("LOGSTATE_PURE is set: the C path is off")
        pytest.fail(f"the C path is not active: {_native.REASON}")
    return _native.EXT
