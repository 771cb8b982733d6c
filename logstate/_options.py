"""The options of a storage directory: names, defaults, accepted values.

Owns: ``EngineOptions`` (every option a directory is opened with, shared by
its handles), their defaults, the sync, recovery and restore mode names,
the segment size bounds, and ``validate_options``: one rule for every option, a wrong
type raises TypeError and a value out of range ValueError, each naming the
option and what it accepts.
Must never: read a file or the environment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from threading import TIMEOUT_MAX
from typing import Any, Final, NamedTuple

__all__ = [
    "DEFAULT_OPTIONS",
    "MAX_SEGMENT_SIZE",
    "MAX_SYNC_INTERVAL",
    "MIN_SEGMENT_SIZE",
    "RECOVERY_MODES",
    "RESTORE_MODES",
    "SYNC_MODES",
    "EngineOptions",
    "validate_options",
]

SYNC_MODES: Final = ("none", "interval", "always")
RECOVERY_MODES: Final = ("strict", "prefix", "salvage")
RESTORE_MODES: Final = ("if-missing", "if-behind", "rebase")  # LocalFileStorage(restore=)
MIN_SEGMENT_SIZE: Final = 4096
MAX_SEGMENT_SIZE: Final = 1 << 31
MAX_SYNC_INTERVAL: Final = TIMEOUT_MAX  # seconds: the longest wait the interval syncer can make


class EngineOptions(NamedTuple):
    """Options that belong to the directory (every handle shares them)."""

    sync: str = "interval"
    sync_interval: float = 1.0  # seconds
    segment_size: int = 64 * 1024 * 1024  # bytes
    recovery: str = "strict"
    compress_min_size: int | None = 1024 * 1024  # bytes of a group's ops; None: never
    zstd_level: int = 1
    auto_compact: bool = True  # compact in the background when a segment rolls
    compact_ratio: float = 0.5  # ... and dead bytes are at least this share of the total
    compact_min_size: int = 4 * 1024 * 1024  # ... and the store holds at least this many bytes
    read_only: bool = False  # no lock, no change to any file; writes raise
    use_snapshot: bool = True  # load the index snapshot written at close, if it checks out
    copy_torn_tails: bool = True  # False: a torn tail is cut without a copy aside (full disk)
    clock: Callable[[], float] = time.time  # seconds since the epoch: expiry times (ttl=)
    # a logstate._hooks.Changelog, attached to the engine at open (typed Any:
    # _hooks and _options are independent modules of the bottom layer)
    changelog: Any = None


DEFAULT_OPTIONS: Final = EngineOptions()

_BOOL_OPTIONS: Final = ("auto_compact", "read_only", "use_snapshot", "copy_torn_tails")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return type(value) is int


def validate_options(given: dict[str, object]) -> EngineOptions:
    """Check option types and ranges; return the full option set.

    Raises:
        TypeError: an unknown option, or an option of the wrong type
            (naming the option and the type it takes).
        ValueError: an option of the right type whose value is not accepted
            (naming the option and the values it accepts).
    """
    unknown = set(given) - set(EngineOptions._fields)
    if unknown:
        raise TypeError(f"unknown storage option(s): {', '.join(sorted(unknown))}")
    opts = DEFAULT_OPTIONS._replace(**given)  # type: ignore[arg-type]
    for name, modes in (("sync", SYNC_MODES), ("recovery", RECOVERY_MODES)):
        value = getattr(opts, name)
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {value!r}")
        if value not in modes:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, modes))}, got {value!r}")
    # name: (is the type right, is the value accepted (asked of the right type only), accepts)
    checks: dict[str, tuple[Callable[[Any], bool], Callable[[Any], bool], str]] = {
        "sync_interval": (
            _is_number,
            lambda v: 0 < v <= MAX_SYNC_INTERVAL,
            f"a positive number of seconds, at most {MAX_SYNC_INTERVAL:.0f}",
        ),
        "segment_size": (
            _is_int,
            lambda v: MIN_SEGMENT_SIZE <= v <= MAX_SEGMENT_SIZE,
            f"an int from {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes",
        ),
        "compress_min_size": (
            lambda v: v is None or _is_int(v),
            lambda v: v is None or v >= 0,
            "None or an int >= 0",
        ),
        "zstd_level": (_is_int, lambda v: 1 <= v <= 22, "an int from 1 to 22"),
        "compact_ratio": (_is_number, lambda v: 0 < v < 1, "a number between 0 and 1"),
        "compact_min_size": (_is_int, lambda v: v >= 0, "an int >= 0"),
    }
    for name, (right_type, accepted, accepts) in checks.items():
        value = getattr(opts, name)
        if not right_type(value):
            raise TypeError(f"{name} must be {accepts}, got {value!r}")
        if not accepted(value):
            raise ValueError(f"{name} must be {accepts}, got {value!r}")
    for name in _BOOL_OPTIONS:
        if type(getattr(opts, name)) is not bool:
            raise TypeError(f"{name} must be a bool, got {getattr(opts, name)!r}")
    if not callable(opts.clock):
        raise TypeError(
            f"clock must be a callable returning seconds since the epoch, got {opts.clock!r}"
        )
    changelog = opts.changelog
    if changelog is not None:
        if isinstance(changelog, type) or not all(
            callable(getattr(changelog, name, None)) for name in ("attach", "restore_before_open")
        ):
            raise TypeError(
                "changelog must be None or a changelog (with attach() and "
                f"restore_before_open(), as logstate.replication.JetStreamChangelog), "
                f"got {changelog!r}"
            )
        if opts.read_only:
            raise ValueError(
                "changelog must be None with read_only=True (a read-only open writes "
                f"nothing to replicate), got {changelog!r}"
            )
    return opts._replace(
        sync_interval=float(opts.sync_interval), compact_ratio=float(opts.compact_ratio)
    )
