"""Types of logstate's optional C extension (csrc/); each part declares its own names."""

from typing_extensions import Buffer

# ---- crc.c: CRC-32C ----
def crc32c(data: Buffer, crc: int = 0, /) -> int: ...
def crc_implementation() -> str: ...
def _force_crc_table(force: bool, /) -> str: ...

# ---- end crc.c ----
