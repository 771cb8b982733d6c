"""Types of logstate's optional C extension (csrc/); each part declares its own names."""

from typing_extensions import Buffer

# ---- crc.c: CRC-32C ----
def crc32c(data: Buffer, crc: int = 0, /) -> int: ...
def crc_implementation() -> str: ...
def _force_crc_table(force: bool, /) -> str: ...

# ---- end crc.c ----

# ---- fast.c: the hot paths of set, get and flush ----
from typing import Any  # noqa: E402

class Lock:
    """The engine's write lock: threading.Lock's interface."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *args: object) -> None: ...

class LifeBase:
    blocked: bool
    closed: bool

class SegmentBase:
    number: int
    fd: int
    size: int
    map: Any
    mapped: int

class SegmentSetBase:
    active: Any
    segments: Any

class KeydirBase:
    watch: bool
    live_bytes: int

class AppendBase:
    seq: int
    written_pos: int
    roll_size: int
    in_flight: Any
    listener: Any

class WriterBase:
    def set(
        self, ns: str, ns_bytes: bytes, key: str, key_bytes: bytes, value: bytes, /
    ) -> None: ...

class ReaderBase:
    def get(self, ns: str, ns_bytes: bytes, key: str, /) -> bytes | memoryview | None: ...

def encode_keys(
    ns_bytes: bytes, keys: list[str], values: list[bytes | None], checkpoint: bytes | None, /
) -> bytes: ...
def index_keys(
    index: Any,
    ns_size: int,
    keys: list[str],
    values: list[bytes | None],
    high: int,
    op_offset: int,
    /,
) -> int: ...

FAST_RECORD_OVERHEAD: int

# ---- end fast.c ----
