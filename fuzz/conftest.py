"""Hypothesis profiles of the fuzzers in this directory.

Two profiles are registered; ``LOGSTATE_FUZZ_PROFILE`` picks one and registers
it again under the name ``logstate-fuzz``, which every fuzz test passes to
``@settings``. Nothing is loaded globally, so the profile of tests/ is not
changed by collecting fuzz/.

    python -m pytest fuzz -q                            # default: 400 examples a test (~6 s)
    LOGSTATE_FUZZ_PROFILE=long python -m pytest fuzz -q   # 15 000 examples a test (~6 min)

Failing examples are shrunk and printed by hypothesis itself, with the
``@reproduce_failure`` blob (``print_blob=True``); they are also kept in the
local example database (``.hypothesis/``) and replayed first on the next run.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "logstate-fuzz-default",
    max_examples=400,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile(
    "logstate-fuzz-long",
    max_examples=15_000,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)

_CHOICE = os.environ.get("LOGSTATE_FUZZ_PROFILE", "default")
if _CHOICE not in ("default", "long"):
    raise pytest.UsageError(f"LOGSTATE_FUZZ_PROFILE must be 'default' or 'long', got {_CHOICE!r}")
settings.register_profile("logstate-fuzz", parent=settings.get_profile(f"logstate-fuzz-{_CHOICE}"))
