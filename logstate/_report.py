"""What an open found and did to the files: the recovery report.

Owns: ``RecoveryReport`` and its rows (``TornTail``, ``SalvagedRange``).
Must never: do anything but hold what recovery tells it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["RecoveryReport", "SalvagedRange", "TornTail"]


class TornTail(NamedTuple):
    """A torn write cut off the end of the newest segment (a tuple: unpacks in order)."""

    path: str  # the segment
    offset: int  # where the cut bytes began
    size: int  # bytes cut
    aside_path: str  # their copy ("" when not copied: copy_torn_tails=False, read-only)


class SalvagedRange(NamedTuple):
    """Damaged bytes salvage removed from a segment (or only reported, read-only)."""

    path: str  # the segment
    offset: int
    size: int  # bytes
    reason: str  # what was wrong with them


@dataclass
class RecoveryReport:
    """What open found and did: torn tails cut, damage salvaged or refused."""

    segments: int = 0
    records: int = 0
    torn_tails: list[TornTail] = field(default_factory=list)
    salvaged: list[SalvagedRange] = field(default_factory=list)
    missing_segments: list[int] = field(default_factory=list)
    snapshot_used: bool = False  # the index came from index.snapshot (plus a scan of newer bytes)
    snapshot_refused: str = ""  # why an index.snapshot present was not used ("" otherwise)

    @property
    def clean(self) -> bool:
        return not (self.torn_tails or self.salvaged or self.missing_segments)
