"""CRC-32C (Castagnoli), the checksum of every record, operation and header.

Owns: the choice, made once at import, of the implementation (logstate's own
C extension when the C path is active, ``_native.EXT``; else google-crc32c's
C extension, else crcmod's), ``crc_bytes`` for the hot paths and ``crc32c``
for everything else, and the check that the choice computes CRC-32C.
Must never: do I/O, read clocks, log, know about records or segments, or run
on a pure-Python CRC (importing logstate fails instead).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Final

import crcmod.predefined

from logstate._native import EXT

# Three implementations of the same function, chosen at import:
# - logstate._cnative's (csrc/crc.c) when the C path is active: the CPU's
#   CRC-32C instruction where it has one (chosen at run time), else a
#   slicing-by-8 table; it takes any bytes-like object.
# - google-crc32c's C extension (Google's crc32c library), which uses the CPU's
#   CRC-32C instruction (SSE 4.2 / ARMv8) when there is one: about 130 ns for
#   a 130-byte record against crcmod's 600 ns, 43 us per MiB against 2.6 ms.
#   It takes only ``bytes`` (not memoryview or bytearray).
# - crcmod's table-driven C extension, the fallback where google-crc32c's
#   extension does not import. Its pure-Python fallback is ~50x slower
#   still, so logstate refuses to run on it.
# Both compute CRC-32C (Castagnoli); tests check them against each other.
_CRC_XOR: Final = 0xFFFFFFFF

# crcmod's own function: C extension or pure Python, always importable.
crcmod_crc32c: Final[Callable[..., int]] = crcmod.predefined.mkCrcFun("crc-32c")


def _google_crc32c() -> Any:
    """google-crc32c's C extension module, or None where it does not import.

    (Tests force the fallback by putting None in ``sys.modules`` for it.)
    """
    try:
        return importlib.import_module("google_crc32c._crc32c")
    except ImportError:
        return None


_hw = _google_crc32c()
crc_bytes: Callable[[bytes], int]
"""CRC-32C of a ``bytes`` object (the hot paths' entry: no type check)."""

if _hw is not None:
    CRC_IMPLEMENTATION = "google-crc32c"
    _extend: Callable[[int, bytes], int] = _hw.extend
    crc_bytes = _hw.value

    def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
        """CRC-32C (Castagnoli) of ``data``, continuing from ``crc`` (0 to start)."""
        if type(data) is not bytes:
            data = bytes(data)
        return _extend(crc, data)

else:
    try:
        from crcmod._crcfunext import _crc32r
    except ImportError:  # pragma: no cover
        raise ImportError(
            "logstate needs google-crc32c's or crcmod's C extension for CRC-32C; only "
            "pure-Python fallbacks are importable. Reinstall with a C compiler and the "
            "Python headers available: python -m pip install --force-reinstall "
            "google-crc32c crcmod"
        ) from None
    CRC_IMPLEMENTATION = "crcmod"
    _table: bytes = crcmod_crc32c.__defaults__[1]  # type: ignore[index]

    def crc_bytes(data: bytes) -> int:
        return _crc32r(data, _CRC_XOR, _table) ^ _CRC_XOR  # type: ignore[no-any-return]

    def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
        """CRC-32C (Castagnoli) of ``data``, continuing from ``crc`` (0 to start)."""
        return _crc32r(data, crc ^ _CRC_XOR, _table) ^ _CRC_XOR  # type: ignore[no-any-return]


if EXT is not None:  # the C path: logstate's own, for any bytes-like object
    CRC_IMPLEMENTATION = f"logstate._cnative ({EXT.crc_implementation()})"
    crc_bytes = EXT.crc32c
    crc32c = EXT.crc32c


assert crc32c(b"123456789") == 0xE3069283, "crc-32c check value"
