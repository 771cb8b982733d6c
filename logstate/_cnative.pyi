"""Types of ``logstate._cnative``, the optional C core (``csrc/``).

Only what Python code uses; each part of the extension has its own block.
Python code reaches the module through ``logstate._native.EXT``.
"""

from collections.abc import (
    Callable,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    Sequence,
    ValuesView,
)
from typing import Any

from typing_extensions import Buffer

from logstate._location import Location

# ---- keymap.c: the compact index --------------------------------------------------

class KeyMap(MutableMapping[str, Location]):
    """A compact str -> location mapping, in insertion order (``csrc/keymap.c``)."""

    def __init__(self, items: Mapping[str, Location] = ..., /) -> None: ...
    def __getitem__(self, key: str, /) -> Location: ...
    def __setitem__(self, key: str, value: Location, /) -> None: ...
    def __delitem__(self, key: str, /) -> None: ...
    def __iter__(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...
    def keys(self) -> KeysView[str]: ...
    def values(self) -> ValuesView[Location]: ...
    def items(self) -> ItemsView[str, Location]: ...
    def copy(self) -> KeyMap: ...
    def total_size(self) -> int:
        """The sum of ``_location.location_size`` over the values."""
    def raw(self) -> tuple[int, bytes, list[Location]]:
        """(count, arena bytes, side objects): the form an index snapshot stores."""
    def _check(self) -> None: ...

def keymap_load(
    data: bytes | memoryview,
    offset: int,
    count: int,
    arena_size: int,
    side_count: int,
    marks: Sequence[tuple[int, int]],
    limits: tuple[int, int, int, int, int, int],
    /,
) -> tuple[KeyMap, int]:
    """A KeyMap from its raw form in ``data``, every location checked; (map, total size).

    Raises:
        ValueError: the bytes are not a raw KeyMap whose locations fit ``marks``.
    """

# ---- end of keymap.c ----------------------------------------------------------------

# --- scan (csrc/scan.c): the replay scan of an open without a snapshot
SCAN_LAYOUT: dict[str, int]

def replay_records(
    window: bytes, offset: int, namespaces: dict[str, Any], segment: int, shift: int, /
) -> tuple[int, int, int, int]: ...
def check_frames(
    data: bytes | memoryview, offset: int, first_seq: int, bodies: bool, /
) -> tuple[int, int, int]:
    """(stop, count, highest seq) of the whole valid records of ``data[offset:]``."""

def utf8_valid(data: bytes, /) -> bool:
    """``data`` is what ``bytes.decode("utf-8")`` accepts (the C check of a KeyMap key)."""

# --- end of scan

# ---- crc.c: CRC-32C ----
def crc32c(data: Buffer, crc: int = 0, /) -> int: ...
def crc_implementation() -> str: ...
def _force_crc_table(force: bool, /) -> str: ...

# ---- end crc.c ----

# ---- fast.c: the hot paths of set, get and flush ----

class Lock:
    """The engine's write lock: threading.Lock's interface."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *args: object) -> None: ...

COMMIT_COHORT_ROUNDS: int

class CommitBase:
    turn: Any  # a Lock (GroupCommit's is a threading.Lock: the same interface)
    writer: Any
    listener: Callable[[int], None] | None
    before_sync: Callable[[int], None] | None
    _native_sync: bool
    _native_clock: bool
    synced_pos: int
    rounds: int
    waits: int
    waits_timed_out: int
    max_wait_s: float
    _last_sync_s: float
    def commit(self, end_pos: int, /) -> None: ...
    def advance(self, durable_pos: int, /) -> None: ...
    def _reset_after_fork(self) -> None: ...
    def _state(self) -> tuple[bool, bool, int, int]: ...
    def _pending_of(self, ident: int, /) -> int | None: ...
    def _hold_mutex(self) -> None: ...
    def _release_mutex(self) -> None: ...

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
    _write_seq: int
    in_flight: Any
    listener: Any
    early: Any
    _undelivered: Any
    _unoffered: Any

class WriterBase:
    _one_release_sets: int
    def set(
        self, ns: str, ns_bytes: bytes, key: str, key_bytes: bytes, value: bytes, /
    ) -> None: ...

class ReaderBase:
    def get(self, ns: str, ns_bytes: bytes, key: str, /) -> bytes | memoryview | None: ...

class HandleBase:
    _writer: Any
    _ns: str
    _ns_bytes: bytes
    _closed: bool
    _engine: Any
    _allow_pickle: bool
    def set(self, key: str, value: Any, ttl: float | None = None) -> None: ...

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
FAST_MAX_KEY_SIZE: int
FAST_TAG_BYTES: int

# ---- end fast.c ----
