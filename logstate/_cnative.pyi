"""Types of ``logstate._cnative``, the optional C core (csrc/); each part's names in its block."""

from typing import Any

# --- scan (csrc/scan.c): the replay scan of an open without a snapshot
SCAN_LAYOUT: dict[str, int]

def replay_records(
    window: bytes, offset: int, namespaces: dict[str, Any], segment: int, shift: int, /
) -> tuple[int, int, int, int]: ...

# --- end of scan
