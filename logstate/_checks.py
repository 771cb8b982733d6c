"""Argument checks of the public API: keys, sub-storage names, the storage directory.

Owns: what a valid key, sub-storage name, storage directory and ``restore``
argument is,
the exact ``str`` a ``str`` subclass becomes, and the TypeError or ValueError
that says what is wrong with an argument.
Must never: touch the engine, files or stored bytes, or accept what the byte
format cannot hold (a key over ``MAX_KEY_SIZE`` bytes; a name with ``/``).
Every check runs before the first byte is written, so a rejected call
changes nothing.
"""

from __future__ import annotations

import os
import threading
from typing import Final

from logstate._format import MAX_KEY_SIZE
from logstate._options import RESTORE_MODES

MAX_TTL: Final = 1e12  # seconds (31,700 years): deadlines stay finite and exact to the microsecond

__all__ = [
    "DEFAULT_DIRECTORY",
    "MAX_SUB_STORAGE_NAME_SIZE",
    "check_key",
    "check_open_arguments",
    "check_restore",
    "check_sub_storage_name",
    "encode_key",
]

DEFAULT_DIRECTORY: Final = "./state"
MAX_SUB_STORAGE_NAME_SIZE: Final = 255  # UTF-8 bytes, like a file name
_FORBIDDEN_NAME_CHARS: Final = frozenset("/\\\0")


def encode_key(key: object) -> bytes:
    """Check a key and return its UTF-8 bytes.

    Raises:
        TypeError: the key is not a str.
        ValueError: empty, longer than MAX_KEY_SIZE bytes, or not encodable.
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}: {key!r:.80}")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"key {key!r:.80} cannot be encoded as UTF-8: {exc.reason}") from None
    if not raw:
        raise ValueError("key must not be empty")
    if len(raw) > MAX_KEY_SIZE:
        raise ValueError(f"key is {len(raw)} bytes in UTF-8; the limit is {MAX_KEY_SIZE}")
    return raw


def check_key(key: object) -> tuple[str, bytes]:
    """Check a key; return it as an exact ``str`` with its UTF-8 bytes.

    A ``str`` subclass (an ``enum.StrEnum`` member, say) becomes the plain
    ``str`` of the same characters: the index, the records and every key
    handed back hold exact ``str`` (the subclass's type is not stored, and
    its ``__str__``, which StrEnum and others override, is not used).

    Raises:
        TypeError / ValueError: as :func:`encode_key`.
    """
    raw = encode_key(key)
    if type(key) is str:
        return key, raw
    assert isinstance(key, str)  # encode_key raised otherwise
    return str.__str__(key), raw


def check_sub_storage_name(name: object) -> str:
    """Check a sub-storage name.

    Returns:
        The name as an exact ``str`` (a ``str`` subclass is converted).

    Raises:
        TypeError: not a str.
        ValueError: empty, ``.`` or ``..``, contains ``/``, ``\\`` or NUL, or
            longer than MAX_SUB_STORAGE_NAME_SIZE UTF-8 bytes.
    """
    if not isinstance(name, str):
        raise TypeError(f"sub-storage name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("sub-storage name must not be empty")
    if name in (".", ".."):
        raise ValueError(f"sub-storage name must not be {name!r}")
    bad = _FORBIDDEN_NAME_CHARS.intersection(name)
    if bad:
        raise ValueError(
            f"sub-storage name {name!r:.80} contains forbidden character(s) "
            f"{', '.join(sorted(map(repr, bad)))}"
        )
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"sub-storage name {name!r:.80} is not valid UTF-8: {exc.reason}"
        ) from None
    if size > MAX_SUB_STORAGE_NAME_SIZE:
        raise ValueError(
            f"sub-storage name is {size} bytes; the limit is {MAX_SUB_STORAGE_NAME_SIZE}"
        )
    return name if type(name) is str else str.__str__(name)


def check_ttl(ttl: object) -> float:
    """``ttl`` of a ``set`` as seconds.

    Raises:
        TypeError: not an int or float.
        ValueError: not positive, or not finite.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be seconds as an int or float, got {type(ttl).__name__}")
    if not 0 < ttl < MAX_TTL:  # also refuses nan
        raise ValueError(f"ttl must be a positive number of seconds below 1e12, got {ttl!r}")
    return float(ttl)


def check_lock_timeout(lock_timeout: object) -> float:
    """``lock_timeout`` of ``LocalFileStorage(...)`` as seconds (0.0: do not wait).

    Raises:
        TypeError: not an int or float (None is 0.0).
        ValueError: negative, not finite, or beyond ``threading.TIMEOUT_MAX``.
    """
    if lock_timeout is None:
        return 0.0
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)):
        raise TypeError(
            f"lock_timeout must be seconds as an int or float, got {type(lock_timeout).__name__}"
        )
    if not 0 <= lock_timeout <= threading.TIMEOUT_MAX:  # also refuses nan
        raise ValueError(
            f"lock_timeout must be from 0 to {threading.TIMEOUT_MAX:g} seconds, "
            f"got {lock_timeout!r}"
        )
    return float(lock_timeout)


def check_restore(restore: object, changelog: object) -> str | None:
    """``LocalFileStorage(restore=)``: None, or a restore mode with a changelog to restore from.

    Raises:
        TypeError: ``restore`` is neither None nor a str.
        ValueError: not one of ``RESTORE_MODES``, or given without a changelog.
    """
    if restore is None:
        return None
    accepts = f"None or one of {', '.join(map(repr, RESTORE_MODES))}"
    if not isinstance(restore, str):
        raise TypeError(f"restore must be {accepts}, got {restore!r}")
    if restore not in RESTORE_MODES:
        raise ValueError(f"restore must be {accepts}, got {restore!r}")
    if changelog is None:
        raise ValueError(f"restore={restore!r} needs a changelog to restore from (changelog=)")
    return restore


def check_open_arguments(
    storage_directory: object, auto_create_dir: object, allow_pickle: object
) -> str:
    """Check the arguments of ``LocalFileStorage(...)`` that the engine does not.

    (The engine checks the options it takes: ``sync``, ``segment_size``, ...)

    Returns:
        The directory as a text path (``./state`` for None).

    Raises:
        TypeError: the directory is not a str or os.PathLike;
            ``auto_create_dir`` or ``allow_pickle`` is not a bool.
        ValueError: the directory is empty or a bytes path.
    """
    if storage_directory is None:
        storage_directory = DEFAULT_DIRECTORY
    if not isinstance(storage_directory, (str, os.PathLike)):
        raise TypeError(
            "storage_directory must be a str or os.PathLike, "
            f"got {type(storage_directory).__name__}"
        )
    path = os.fspath(storage_directory)
    if not isinstance(path, str) or not path:
        raise ValueError(f"storage_directory must be a non-empty text path, got {path!r}")
    if not isinstance(auto_create_dir, bool):
        raise TypeError(f"auto_create_dir must be a bool, got {type(auto_create_dir).__name__}")
    if not isinstance(allow_pickle, bool):
        raise TypeError(f"allow_pickle must be a bool, got {type(allow_pickle).__name__}")
    return path
