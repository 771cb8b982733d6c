"""How a Quix column family and bytes key become one logstate key, and back.

Owns: the folding of ``(column family, bytes key)`` into one ``str`` key of
one logstate storage (``cf + "\\0" + latin-1(key)``), the key range of a
column family, the size limit that folding puts on a Quix key and the error
that names it.
Must never: touch a storage, or fold two different ``(cf, key)`` pairs into
the same string (NUL never occurs in a Quix column family name, and latin-1
is a bijection between bytes and the code points 0-255).

Order: Python ``str`` order is code-point order, and latin-1 maps byte value
= code point, so within one column family the folded keys sort exactly as
RocksDB's bytewise comparator sorts the bytes keys. logstate keys are at most
4096 UTF-8 bytes; a key byte below 0x80 costs one UTF-8 byte and a byte from
0x80 up costs two, so a Quix key of ``n`` bytes always fits when
``len(cf) + 1 + 2 * n <= 4096`` (2,044 bytes in the ``default`` column
family, whatever they hold) and an ASCII key fits up to ``4095 - len(cf)``
bytes.
"""

from __future__ import annotations

from typing import Final

from logstate import bytes_to_key, key_to_bytes

__all__ = [
    "MAX_FOLDED_KEY_SIZE",
    "QuixKeyTooLongError",
    "bytes_to_key",
    "cf_prefix",
    "fold_key",
    "key_to_bytes",
    "max_quix_key_size",
]

MAX_FOLDED_KEY_SIZE: Final = 4096  # logstate's key limit, UTF-8 bytes
_SEPARATOR: Final = "\0"


class QuixKeyTooLongError(ValueError):
    """A Quix state key too long to be stored as a logstate key.

    Attributes:
        cf_name: the column family of the key.
        key_size: the key's size in bytes.
        folded_size: the UTF-8 size of the folded logstate key.
    """

    def __init__(self, cf_name: str, key_size: int, folded_size: int) -> None:
        self.cf_name = cf_name
        self.key_size = key_size
        self.folded_size = folded_size
        super().__init__(
            f"Quix state key of {key_size} bytes in column family {cf_name!r} is too long "
            f"for the logstate store: it folds into a {folded_size}-byte logstate key and the "
            f"limit is {MAX_FOLDED_KEY_SIZE} (bytes from 0x80 count twice); any key of up to "
            f"{max_quix_key_size(cf_name)} bytes fits"
        )


def max_quix_key_size(cf_name: str) -> int:
    """The size in bytes up to which every Quix key of ``cf_name`` fits, whatever its bytes."""
    return (MAX_FOLDED_KEY_SIZE - len(cf_prefix(cf_name).encode("utf-8"))) // 2


def cf_prefix(cf_name: str) -> str:
    """The prefix every folded key of column family ``cf_name`` starts with.

    Raises:
        ValueError: the name is empty or holds NUL.
    """
    if not cf_name or _SEPARATOR in cf_name:
        raise ValueError(f"column family name must be non-empty and without NUL: {cf_name!r}")
    return cf_name + _SEPARATOR


def fold_key(prefix: str, cf_name: str, key: bytes) -> str:
    """The logstate key of ``key`` in the column family whose prefix is ``prefix``.

    Raises:
        TypeError: ``key`` is not bytes.
        QuixKeyTooLongError: the folded key would exceed 4096 UTF-8 bytes.
    """
    if type(key) is not bytes:
        if not isinstance(key, bytes):
            raise TypeError(f"Quix state keys are bytes, got {type(key).__name__}")
        key = bytes(key)
    folded = prefix + key.decode("latin-1")
    if len(folded) > MAX_FOLDED_KEY_SIZE // 2:  # only then can it be too long
        size = len(folded.encode("utf-8"))
        if size > MAX_FOLDED_KEY_SIZE:
            raise QuixKeyTooLongError(cf_name, len(key), size)
    return folded
