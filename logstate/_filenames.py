"""Every name in a storage directory.

Owns: the names logstate gives its files (segments, the index snapshot, the
lock, temporary files, copies of torn or damaged bytes set aside), how to
make them and how to recognise them. Nothing else spells a file name.
Must never: touch a file (pure string work; ``_fs`` does the I/O).

``docs/format.md`` lists what each file holds.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "COMPACT_TMP_SUFFIX",
    "DAMAGED_SUFFIX",
    "LOCK_FILE_NAME",
    "REPLICATION_STATE_FILE_NAME",
    "RESTORING_INFIX",
    "SEGMENT_PREFIX",
    "SEGMENT_SUFFIX",
    "SNAPSHOT_FILE_NAME",
    "TMP_SUFFIX",
    "TORN_SUFFIX",
    "aside_file_name",
    "parse_segment_file_name",
    "segment_file_name",
]

SEGMENT_PREFIX: Final = "segment-"
SEGMENT_SUFFIX: Final = ".seg"
SNAPSHOT_FILE_NAME: Final = "index.snapshot"
LOCK_FILE_NAME: Final = "LOCK"
REPLICATION_STATE_FILE_NAME: Final = "replication.json"  # a changelog's state (a cache)
TMP_SUFFIX: Final = ".tmp"  # a file written whole, then renamed over its final name
COMPACT_TMP_SUFFIX: Final = ".compact.tmp"  # a compaction's output before its rename
TORN_SUFFIX: Final = ".torn"  # torn tails copied aside before truncation
DAMAGED_SUFFIX: Final = ".damaged"  # damaged ranges moved aside by salvage
# replication (logstate.replication): its state file in a store directory, and the
# directory a restore builds next to its target, ``<target>.restoring-<random hex>``
RESTORING_INFIX: Final = ".restoring-"


def segment_file_name(number: int) -> str:
    """``segment-0000000001.seg`` for segment 1."""
    return f"{SEGMENT_PREFIX}{number:010d}{SEGMENT_SUFFIX}"


def parse_segment_file_name(name: str) -> int | None:
    """The segment number of a segment file name, or None for other files."""
    if not (name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX)):
        return None
    digits = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
    # ASCII only: isdigit() also takes other scripts' digits, which int() reads or refuses
    if len(digits) != 10 or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


def aside_file_name(segment_path: str, offset: int, suffix: str, attempt: int = 0) -> str:
    """Where bytes of ``segment_path`` at ``offset`` are copied aside.

    ``suffix``: TORN_SUFFIX or DAMAGED_SUFFIX; ``attempt``: 1, 2, ... when a
    file with other bytes already has the name.
    """
    name = f"{segment_path}.{offset}{suffix}"
    return f"{name}.{attempt}" if attempt else name
