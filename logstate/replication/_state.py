"""The changelog's state file in a store directory (``replication.json``).

Owns: what the file holds (the writer id, its epoch, the last seq the broker
acknowledged, the snapshots uploaded, a takeover seen) and its atomic write
(a temporary file, fsynced, renamed over the old one, the directory fsynced).
Must never: be the truth about the stream: the stream's last message is, and
every open reads it. The file is a cache for ``logstate stats`` without a
broker and the home of the writer id; a lost or stale file costs a look at
the broker, never data.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from logstate._filenames import REPLICATION_STATE_FILE_NAME, TMP_SUFFIX
from logstate._fs import OS_FS, FileSystem

__all__ = ["STATE_VERSION", "ReplicationState", "load_state", "new_writer_id", "save_state"]

STATE_VERSION: Final = 1


def new_writer_id() -> str:
    """A random writer id (32 hex digits)."""
    return secrets.token_hex(16)


@dataclass
class ReplicationState:
    """The contents of ``replication.json``."""

    stream: str
    partition: str
    subject: str
    writer: str
    epoch: int = 0
    acked_seq: int = 0  # the last logstate seq the broker acknowledged
    acked_stream_seq: int = 0  # its message's stream seq
    acked_time_s: float = 0.0
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    fenced: dict[str, Any] | None = None  # {"by_writer", "epoch", "kept_aside": [a, b] | None}
    version: int = STATE_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()


def state_path(directory: str) -> str:
    return os.path.join(directory, REPLICATION_STATE_FILE_NAME)


def load_state(directory: str, fs: FileSystem = OS_FS) -> ReplicationState | None:
    """The state file of ``directory``, or None when it has none (or an unreadable one).

    An unreadable file is treated as missing: it is a cache (see the module
    docstring), and the writer id it held is then made anew, which only
    costs an epoch at the next publish.
    """
    path = state_path(directory)
    if not fs.exists(path):
        return None
    try:
        fd = fs.open_read_only(path)
        try:
            data = json.loads(fs.read_all(fd))
        finally:
            fs.close(fd)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return None
        return ReplicationState(**data)
    except (OSError, ValueError, TypeError):
        return None


def save_state(directory: str, state: ReplicationState, fs: FileSystem = OS_FS) -> None:
    """Replace the state file atomically (write, fsync, rename, fsync the directory)."""
    path = state_path(directory)
    tmp = path + TMP_SUFFIX
    with contextlib.suppress(FileNotFoundError):
        fs.unlink(tmp)  # left by a crash between its write and its rename
    fs.write_new_file(tmp, state.to_json())
    fs.rename(tmp, path)
    fs.fsync_dir(directory)
