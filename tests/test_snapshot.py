"""Index snapshots: open trusts ``index.snapshot`` only when it checks out, else it scans.

``index.snapshot`` (logstate/_snapshot.py) is written at a clean close and
loaded by the next open instead of scanning the segments it covers; bytes
appended after it (by a process that then crashed) are scanned as usual. The
promises checked here:

- a snapshot-based open rebuilds exactly what a full scan would: the same
  contents (compared with a model of every operation), and the same index,
  checkpoint, sequence number and live bytes;
- writes made after a snapshot-based open survive a crash (SIGKILL, or an
  engine abandoned without close), deletes and clears of keys the snapshot
  holds included (nothing is resurrected); a torn tail after the snapshot is
  cut as usual;
- any doubt about the snapshot (a bit flip, a truncation, another Python or
  marshal version, a body of the wrong shape, segments missing, truncated,
  grown, rewritten or compacted since) means a full scan, never a wrong index;
- salvage and ``use_snapshot=False`` never use it; ``read_only`` may, and
  changes no file; a failed storage writes none at close; a snapshot that
  cannot be written does not make close fail and leaves no ``.tmp`` behind
  after the next open.

The trade-off a snapshot makes: open does not read the bytes it covers (only
the last TAIL_BYTES of each segment, to notice a segment that changed), so a
record damaged after it was written, outside that tail, is found when it is
read (CorruptionError), not at open. See
test_damage_in_a_covered_record_is_found_at_get_not_at_open.

Crashes are simulated in-process by abandoning the engine (``helpers.kill``): its
files are closed and its lock released without the final sync or snapshot,
as when the process is killed; one test kills a real child process.
"""

from __future__ import annotations

import copy
import errno
import json
import marshal
import os
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from logstate import (
    CorruptionError,
    InMemoryStorage,
    LocalFileStorage,
    _filenames,
    _registry,
)
from logstate import _format as fmt
from logstate._crc import crc32c
from logstate._filenames import SNAPSHOT_FILE_NAME
from logstate._fs import FileSystem
from logstate._location import (
    KIND_GROUP_OP,
    KIND_RECORD,
    pack_location,
    unpack_location,
)
from logstate._scan import Damage, Frame, scan_records
from logstate._snapshot import (
    MARSHAL_SNAPSHOT_VERSION,
    SNAPSHOT_HEADER,
    SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
    TAIL_BYTES,
    SegmentMark,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
)
from tests.helpers import kill, observed_state

OPTIONS: dict[str, Any] = {"sync": "none", "segment_size": 4096}

# ============================================================================ model

State = dict[str, dict[str, Any]]  # namespace path ("" = root) -> key -> value
Op = tuple[Any, ...]


@dataclass
class Model:
    """What the store must hold: every namespace's items and the checkpoint."""

    state: State = field(default_factory=lambda: {"": {}})
    checkpoint: Any = None

    def apply(self, op: Op) -> None:
        """Apply one operation (mirrors what replaying its record does)."""
        kind = op[0]
        if kind == "set":
            self._ensure(op[1])[op[2]] = op[3]
        elif kind == "remove":
            self.state[op[1]].pop(op[2], None)
        elif kind == "create":
            self._ensure(op[1])
        elif kind in ("clear", "drop"):
            ns = op[1]
            for name in [n for n in self.state if n and (not ns or n.startswith(ns + "/"))]:
                del self.state[name]
            if kind == "drop":
                del self.state[ns]
            else:
                self.state[ns].clear()
        elif kind == "batch":
            for inner in op[2]:
                self.apply((inner[0], op[1], *inner[1:]))
        elif kind == "flush":
            self._ensure(op[1]).update(op[2])
            self.checkpoint = op[3]
        else:  # pragma: no cover - a typo in a test
            raise AssertionError(kind)

    def _ensure(self, ns: str) -> dict[str, Any]:
        parts = ns.split("/") if ns else []
        for i in range(len(parts) + 1):
            self.state.setdefault("/".join(parts[:i]), {})
        return self.state[ns]

    def copy(self) -> Model:
        return copy.deepcopy(self)


def handle_for(root: LocalFileStorage, ns: str) -> LocalFileStorage:
    handle = root
    for part in ns.split("/") if ns else []:
        handle = handle.get_or_create_sub_storage(part)
    return handle


def perform(root: LocalFileStorage, op: Op) -> None:
    """Apply one operation to a real storage: exactly one record each."""
    kind, ns = op[0], op[1]
    parent, _, name = ns.rpartition("/")
    handle = handle_for(root, parent if kind in ("create", "drop") else ns)
    if kind == "set":
        handle[op[2]] = op[3]
    elif kind == "remove":
        handle.remove(op[2])
    elif kind == "create":
        handle.get_or_create_sub_storage(name)
    elif kind == "clear":
        handle.clear()
    elif kind == "drop":
        handle.delete_sub_storage(name)
    elif kind == "batch":
        with handle.batch() as batch:
            for inner in op[2]:
                if inner[0] == "set":
                    batch.set(inner[1], inner[2])
                else:
                    batch.remove(inner[1])
    elif kind == "flush":  # a group with a checkpoint, as InMemoryStorage writes it
        memory = InMemoryStorage(handle)
        memory.update(op[2])
        memory.flush(checkpoint=op[3])
    else:  # pragma: no cover
        raise AssertionError(kind)


def play(root: LocalFileStorage, model: Model, ops: list[Op]) -> None:
    for op in ops:
        perform(root, op)
        model.apply(op)


# the namespaces random operations work in ("empty", "quiet" and "quiet/child" are left alone)
POOL = ("", "a", "a/x", "b", "b/y", "b/y/z")


def random_value(rng: random.Random) -> Any:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randrange(-(10**12), 10**12)
    if kind == 1:
        return "v" * rng.randrange(0, 300) + str(rng.random())
    if kind == 2:
        return rng.randbytes(rng.randrange(0, 120))
    if kind == 3:
        return [rng.random(), {"n": rng.randrange(100)}, None]
    if kind == 4:
        return None
    if kind == 5:
        return rng.random()
    return rng.random() < 0.5


def random_op(rng: random.Random, model: Model) -> Op:
    """An operation valid on ``model`` that writes exactly one record."""
    existing = [ns for ns in POOL if ns in model.state]
    missing = [ns for ns in POOL if ns not in model.state and ns.rpartition("/")[0] in model.state]
    ns = rng.choice(existing)
    keys = sorted(model.state[ns])
    roll = rng.random()
    if roll < 0.07 and missing:
        return ("create", rng.choice(missing))
    if roll < 0.10 and ns:
        return (rng.choice(("clear", "drop")), ns)
    if roll < 0.25 and keys:
        return ("remove", ns, rng.choice(keys))
    if roll < 0.37:
        inner: list[Op] = []
        for _ in range(rng.randrange(2, 7)):
            if keys and rng.random() < 0.25:
                inner.append(("remove", rng.choice(keys)))
            else:  # compressible, so that zstd groups are kept compressed
                inner.append(("set", f"k{rng.randrange(40)}", "abc" * rng.randrange(10, 60)))
        return ("batch", ns, inner)
    if roll < 0.40:
        items = {f"m{rng.randrange(10)}": "xyz" * rng.randrange(20, 50) for _ in range(3)}
        return ("flush", ns, items, {"offset": rng.randrange(10**6)})
    return ("set", ns, f"k{rng.randrange(40)}", random_value(rng))


def play_random(root: LocalFileStorage, model: Model, rng: random.Random, count: int) -> int:
    """Perform ``count`` random operations; returns how many records they wrote."""
    for _ in range(count):
        op = random_op(rng, model)
        perform(root, op)
        model.apply(op)
    return count


def observe(root: LocalFileStorage) -> Model:
    """Every namespace, its items and the checkpoint, read through the public API."""
    return Model(observed_state(root), root.checkpoint)


# ============================================================================ store helpers


def open_store(directory: Path, **options: Any) -> LocalFileStorage:
    """Open ``directory`` afresh (asserting no engine of this process still has it open)."""
    read_only = bool(options.get("read_only", False))
    still_open = [
        e
        for e in _registry.open_engines()
        if e.path == str(directory.resolve()) and e.options.read_only == read_only
    ]
    assert still_open == [], "a handle kept the engine open: this would not be a fresh open"
    return LocalFileStorage(directory, **{**OPTIONS, **options})


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.seg"))


def snapshot_path(directory: Path) -> Path:
    return directory / SNAPSHOT_FILE_NAME


def read_snapshot(directory: Path) -> Snapshot:
    return decode_snapshot(snapshot_path(directory).read_bytes())


def frames(data: bytes) -> list[Frame]:
    """The valid records of a segment's bytes (asserting there is no damage)."""
    damage: list[Damage] = []
    found = list(scan_records(data, fmt.SEGMENT_HEADER_SIZE, damage.append))
    assert damage == []
    return found


def file_states(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file's modification time (ns) and bytes."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def snapshot_file(body: bytes, **header: int) -> bytes:
    """A marshal snapshot file around ``body`` with a correct size and CRC
    (``header`` overrides)."""
    fields = {
        "version": MARSHAL_SNAPSHOT_VERSION,
        "py_major": sys.version_info[0],
        "py_minor": sys.version_info[1],
        "marshal_version": marshal.version,
        "reserved": 0,
        "body_size": len(body),
        "body_crc": crc32c(body),
        **header,
    }
    return SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, *fields.values()) + body


def plain(namespaces: dict[Any, Any]) -> dict[Any, Any]:
    """``namespaces`` with the C path's KeyMaps as dicts (what marshal can hold)."""
    return {ns: dict(index) if hasattr(index, "raw") else index for ns, index in namespaces.items()}


def body_of(snapshot: Snapshot) -> bytes:
    """A marshal snapshot's body."""
    return encode_snapshot(snapshot._replace(namespaces=plain(snapshot.namespaces)))[
        SNAPSHOT_HEADER.size :
    ]


def assert_same_index_as_a_full_scan(storage: LocalFileStorage) -> None:
    """The engine's index equals what scanning every byte rebuilds (read-only, no snapshot)."""
    engine = storage._engine
    with LocalFileStorage(storage.path, read_only=True, use_snapshot=False) as scan:
        other = scan._engine
        assert not scan.report.snapshot_used
        assert other.keydir.namespaces == engine.keydir.namespaces
        assert other.keydir.checkpoint == engine.keydir.checkpoint
        assert other.appender.seq == engine.appender.seq
        assert other.keydir.live_bytes == engine.keydir.live_bytes


@dataclass
class Outcome:
    """What an open gave: the contents (or the error), and whether it used the snapshot."""

    result: Model | str  # the contents, or the error's type name
    snapshot_used: bool = False
    detail: str = ""


def outcome_of(directory: Path, **options: Any) -> Outcome:
    """Open, check the invariants, read everything, close; errors are part of the outcome."""
    used = False
    try:
        with open_store(directory, **options) as s:
            used = s.report.snapshot_used
            s._check()
            return Outcome(observe(s), used)
    except Exception as exc:
        return Outcome(type(exc).__name__, used, f"{exc!r} (snapshot used: {used})")


def scan_outcome(directory: Path, scratch: Path) -> Outcome:
    """The outcome of a full scan (use_snapshot=False), on a copy so ``directory`` is untouched."""
    shutil.copytree(directory, scratch)
    return outcome_of(scratch, use_snapshot=False)


# ============================================================================ the template store


@dataclass(frozen=True)
class Template:
    directory: Path
    model: Model


def build_template(directory: Path) -> Model:
    """Several segments, nested and empty sub-storages, deletes, clears, drops, a
    checkpoint, values in plain records and in uncompressed and zstd groups."""
    rng = random.Random(20240604)
    model = Model()
    with open_store(directory, compress_min_size=None) as s:  # groups stay uncompressed
        play(
            s,
            model,
            [
                ("create", "empty"),
                ("create", "quiet"),
                ("create", "quiet/child"),
                ("set", "quiet", "q", "held by the snapshot"),
                ("create", "a"),
                ("create", "b"),
                ("flush", "a", {"m0": "first"}, "checkpoint in an uncompressed group"),
            ],
        )
        play_random(s, model, rng, 150)
        # "kept" is outside POOL: these group operations stay live
        group = [("set", "g1", "in an uncompressed group"), ("set", "g2", 2)]
        play(s, model, [("create", "kept"), ("batch", "kept", group)])
    with open_store(directory, compress_min_size=0) as s:  # groups zstd-compressed
        play_random(s, model, rng, 120)
        play(s, model, [("flush", "", {"m1": "abc" * 50, "m2": "abc" * 40}, {"partition": 7})])
        play(s, model, [("set", "", "last", "the newest record")])
    return model


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    directory = tmp_path_factory.mktemp("template") / "store"
    return Template(directory, build_template(directory))


@pytest.fixture
def store(template: Template, tmp_path: Path) -> Path:
    """A fresh copy of the template store (closed cleanly: it has a snapshot)."""
    directory = tmp_path / "store"
    shutil.copytree(template.directory, directory)
    return directory


# ============================================================================ 1. clean close


def test_template_store_holds_every_kind_of_location_a_snapshot_carries(template: Template) -> None:
    snapshot = read_snapshot(template.directory)
    locations = [loc for index in snapshot.namespaces.values() for loc in index.values()]
    kinds = {"compressed" if type(loc) is tuple else int(loc) & 3 for loc in locations}
    assert kinds == {"compressed", KIND_RECORD, KIND_GROUP_OP}
    assert type(snapshot.checkpoint) is tuple, "the checkpoint is in a zstd group"
    assert len(snapshot.segments) >= 4
    assert [m.number for m in snapshot.segments] == [
        int(p.name[8:18]) for p in segments(template.directory)
    ]
    assert template.model.state["empty"] == {} and template.model.state["quiet/child"] == {}
    assert len([ns for ns in template.model.state if ns.count("/") >= 1]) >= 2


def test_clean_close_then_open_loads_the_snapshot_and_rebuilds_exactly_the_same_contents(
    template: Template, store: Path
) -> None:
    with open_store(store) as s:
        assert s.report.snapshot_used
        assert s.report.records == 0, "nothing the snapshot covers is scanned"
        assert s.report.clean
        assert observe(s) == template.model
        s._check()
        assert_same_index_as_a_full_scan(s)


def test_repeated_reopen_cycles_keep_using_a_fresh_snapshot(
    template: Template, store: Path
) -> None:
    model = template.model.copy()
    rng = random.Random(7)
    for cycle in range(4):
        with open_store(store, compress_min_size=0 if cycle % 2 else None) as s:
            assert s.report.snapshot_used, cycle
            assert s.report.records == 0, cycle
            assert observe(s) == model, cycle
            play_random(s, model, rng, 40)
    with open_store(store) as s:
        assert s.report.snapshot_used
        assert observe(s) == model
        s._check()
        assert_same_index_as_a_full_scan(s)


# ============================================================================ 2. crash after


def ops_on_covered_data(model: Model) -> list[Op]:
    """Deletes, clears, drops and overwrites of what the snapshot holds."""
    root_keys = sorted(model.state[""])
    assert len(root_keys) >= 3
    sub = next(ns for ns in POOL if ns and model.state.get(ns))
    return [
        ("remove", "", root_keys[0]),
        ("set", "", root_keys[1], "overwritten after the snapshot"),
        ("clear", "quiet"),  # its key "q" and its child "quiet/child"
        ("drop", "empty"),
        ("batch", sub, [("remove", min(model.state[sub])), ("set", "new-in-group", 1)]),
        ("flush", "quiet", {}, "checkpoint after the snapshot"),
    ]


@pytest.mark.parametrize(
    ("random_ops", "segment_size"),
    [(0, 1 << 20), (150, 4096)],
    ids=["appended-to-the-covered-segment", "rolled-to-new-segments"],
)
def test_writes_after_a_snapshot_open_survive_a_crash_and_deletes_stay_deleted(
    template: Template, store: Path, random_ops: int, segment_size: int
) -> None:
    model = template.model.copy()
    before = [p.name for p in segments(store)]
    s = open_store(store, segment_size=segment_size, compress_min_size=0)
    assert s.report.snapshot_used
    ops = ops_on_covered_data(model)
    play(s, model, ops)
    records = len(ops) + play_random(s, model, random.Random(3), random_ops)
    kill(s)
    assert snapshot_path(store).read_bytes() == snapshot_path(template.directory).read_bytes()
    after = [p.name for p in segments(store)]
    assert (after == before) == (random_ops == 0)

    with open_store(store) as s:
        assert s.report.snapshot_used, "the snapshot still covers a prefix of the log"
        assert s.report.records == records, "exactly the records after the snapshot are scanned"
        assert s.report.clean
        found = observe(s)
        assert found == model
        # no resurrection of what the snapshot held
        assert "empty" not in found.state and "quiet/child" not in found.state
        assert found.state["quiet"] == {}
        assert ops[0][2] not in found.state[""]
        s._check()
        assert_same_index_as_a_full_scan(s)
    with open_store(store) as s:  # and the snapshot written at that close covers it all
        assert s.report.snapshot_used and s.report.records == 0
        assert observe(s) == model


def test_writes_after_a_snapshot_open_survive_a_killed_process(
    template: Template, store: Path
) -> None:
    model = template.model.copy()
    root_keys = sorted(model.state[""])
    ops: list[Op] = [  # (kind, sub-storage name, key, value) for the child
        ("remove", "", root_keys[0], None),
        ("set", "", root_keys[1], "after"),
        ("clear", "quiet", None, None),
        ("set", "quiet", "child-key", [1, 2, 3]),
        *(("set", "", f"new{i}", "w" * 300) for i in range(20)),  # rolls to new segments
    ]
    child = textwrap.dedent(
        """
        import json, os, signal, sys
        from logstate import LocalFileStorage
        s = LocalFileStorage(sys.argv[1], sync="none", segment_size=4096)
        print(s.report.snapshot_used, flush=True)
        for kind, ns, key, value in json.loads(sys.argv[2]):
            handle = s.get_or_create_sub_storage(ns) if ns else s
            if kind == "set":
                handle[key] = value
            elif kind == "remove":
                handle.remove(key)
            else:
                handle.clear()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    ran = subprocess.run(
        [sys.executable, "-c", child, str(store), json.dumps([list(op) for op in ops])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == -9, ran.stderr
    assert ran.stdout.strip() == "True"
    for op in ops:
        model.apply({"set": op, "remove": op[:3], "clear": op[:2]}[op[0]])
    with open_store(store) as s:
        assert s.report.snapshot_used
        assert s.report.records == len(ops)
        assert observe(s) == model
        s._check()


@pytest.mark.parametrize("kept", ["1 byte", "frame header", "header and seq", "all but 1 byte"])
@pytest.mark.parametrize("records_before", [0, 5], ids=["torn-at-the-snapshot-end", "after-5"])
def test_torn_tail_after_the_snapshot_is_cut_and_the_covered_prefix_still_used(
    template: Template, store: Path, kept: str, records_before: int
) -> None:
    model = template.model.copy()
    covered = read_snapshot(store).segments[-1]
    s = open_store(store, segment_size=1 << 20)
    play(s, model, [("set", "", f"ok{i}", i) for i in range(records_before)])
    newest = segments(store)[-1]
    start = newest.stat().st_size
    assert (start == covered.size) == (records_before == 0)
    perform(s, ("set", "", "torn", "t" * 200))
    size = newest.stat().st_size - start
    kill(s)
    keep = {
        "1 byte": 1,
        "frame header": fmt.FRAME_HEADER_SIZE,
        "header and seq": fmt.RECORD_OVERHEAD,
        "all but 1 byte": size - 1,
    }[kept]
    torn = newest.read_bytes()[start : start + keep]
    os.truncate(newest, start + keep)

    with open_store(store) as s:
        assert s.report.snapshot_used
        assert s.report.records == records_before
        [(path, offset, length, aside)] = s.report.torn_tails
        assert (Path(path), offset, length) == (newest, start, keep)
        assert Path(aside).read_bytes() == torn, "cut bytes are copied aside first"
        assert newest.stat().st_size == start
        assert observe(s) == model
        s._check()


def test_zero_filled_space_after_the_snapshot_is_cut(template: Template, store: Path) -> None:
    s = open_store(store)
    kill(s)
    newest = segments(store)[-1]
    covered = newest.stat().st_size
    with newest.open("ab") as f:
        f.write(bytes(3000))  # file system extended the file, data never written
    with open_store(store) as s:
        assert s.report.snapshot_used
        assert [t[1:3] for t in s.report.torn_tails] == [(covered, 3000)]
        assert observe(s) == template.model
        s._check()


def test_an_older_snapshot_is_a_valid_prefix_and_the_rest_is_scanned(
    template: Template, store: Path
) -> None:
    """A snapshot whose rename at close was lost (the previous one survives) still matches."""
    old = snapshot_path(store).read_bytes()
    model = template.model.copy()
    with open_store(store) as s:
        play(s, model, ops_on_covered_data(model))
        play_random(s, model, random.Random(11), 60)
    snapshot_path(store).write_bytes(old)
    with open_store(store) as s:
        assert s.report.snapshot_used
        assert s.report.records > 0
        assert observe(s) == model
        s._check()
        assert_same_index_as_a_full_scan(s)


# ============================================================================ 3. bad snapshots

HEADER_FIELD_OFFSETS = {  # byte ranges of SNAPSHOT_HEADER's fields
    "magic": range(0, 8),
    "version": range(8, 10),
    "py_major": range(10, 11),
    "py_minor": range(11, 12),
    "marshal_version": range(12, 14),
    "reserved": range(14, 16),
    "body_size": range(16, 24),
    "body_crc": range(24, 28),
}
assert sum(map(len, HEADER_FIELD_OFFSETS.values())) == SNAPSHOT_HEADER.size


def test_bit_flip_anywhere_in_the_snapshot_means_a_full_scan(
    template: Template, store: Path
) -> None:
    original = snapshot_path(store).read_bytes()
    rng = random.Random(5)
    positions = sorted(
        set(range(SNAPSHOT_HEADER.size))
        | set(rng.sample(range(SNAPSHOT_HEADER.size, len(original)), 80))
        | {SNAPSHOT_HEADER.size, len(original) - 1}
    )
    wrong = []
    for position in positions:
        damaged = bytearray(original)
        damaged[position] ^= 1 << (position % 8)
        snapshot_path(store).write_bytes(bytes(damaged))
        with open_store(store) as s:
            used = s.report.snapshot_used
            found = observe(s)
            s._check()
        # a flip in the reserved field is checked by its own test
        must_scan = position not in HEADER_FIELD_OFFSETS["reserved"]
        if found != template.model or (used and must_scan):
            wrong.append((position, used))
    assert wrong == []


def test_nonzero_reserved_header_field_is_refused(store: Path) -> None:
    """The header has no checksum: a flipped reserved bit (or a future flag this
    version does not know) must not be accepted silently."""
    original = snapshot_path(store).read_bytes()
    body = original[SNAPSHOT_HEADER.size :]
    snapshot_path(store).write_bytes(snapshot_file(body, reserved=1))
    with open_store(store) as s:
        assert not s.report.snapshot_used


HEADER_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty file": lambda d: b"",
    "one byte": lambda d: d[:1],
    "truncated header": lambda d: d[: SNAPSHOT_HEADER.size - 1],
    "header only": lambda d: d[: SNAPSHOT_HEADER.size],
    "truncated body": lambda d: d[: SNAPSHOT_HEADER.size + (len(d) - SNAPSHOT_HEADER.size) // 2],
    "last byte missing": lambda d: d[:-1],
    "extra byte": lambda d: d + b"\0",
    "zero-filled": lambda d: bytes(len(d)),
    "wrong magic": lambda d: b"\x89LGSEG\r\n" + d[8:],
    "unknown snapshot version": lambda d: snapshot_file(
        d[SNAPSHOT_HEADER.size :], version=SNAPSHOT_VERSION + 1
    ),
    "other Python minor version": lambda d: snapshot_file(
        d[SNAPSHOT_HEADER.size :], py_minor=sys.version_info[1] + 1
    ),
    "other Python major version": lambda d: snapshot_file(
        d[SNAPSHOT_HEADER.size :], py_major=sys.version_info[0] - 1
    ),
    "other marshal version": lambda d: snapshot_file(
        d[SNAPSHOT_HEADER.size :], marshal_version=marshal.version - 1
    ),
    "body size too large": lambda d: snapshot_file(
        d[SNAPSHOT_HEADER.size :], body_size=len(d) - SNAPSHOT_HEADER.size + 1
    ),
}


@pytest.mark.parametrize("damage", HEADER_DAMAGE)
def test_damaged_or_foreign_snapshot_file_means_a_full_scan(
    template: Template, store: Path, damage: str
) -> None:
    path = snapshot_path(store)
    path.write_bytes(HEADER_DAMAGE[damage](path.read_bytes()))
    outcome = outcome_of(store)
    assert (outcome.result, outcome.snapshot_used) == (template.model, False), outcome.detail


def test_every_truncation_of_the_header_means_a_full_scan(template: Template, store: Path) -> None:
    original = snapshot_path(store).read_bytes()
    wrong = []
    for length in range(SNAPSHOT_HEADER.size + 2):
        snapshot_path(store).write_bytes(original[:length])
        outcome = outcome_of(store)
        if (outcome.result, outcome.snapshot_used) != (template.model, False):
            wrong.append((length, outcome))
    assert wrong == []


def _with_namespace(snap: Snapshot, ns: Any, index: Any) -> Snapshot:
    return snap._replace(namespaces={**snap.namespaces, ns: index})


def _with_location(snap: Snapshot, key: Any, location: Any) -> Snapshot:
    return _with_namespace(snap, "", {**snap.namespaces[""], key: location})


def _with_mark(snap: Snapshot, i: int, mark: Any) -> Snapshot:
    marks = list(snap.segments)
    marks[i] = mark
    return snap._replace(segments=marks)


def _fields(snap: Snapshot) -> tuple[Any, ...]:
    return (plain(snap.namespaces), snap.checkpoint, snap.seq, snap.live_bytes, snap.segments)


GHOST = pack_location(999, fmt.SEGMENT_HEADER_SIZE, 40, KIND_RECORD)  # no segment 999

BAD_BODIES: dict[str, Callable[[Snapshot], bytes]] = {
    # not a body at all
    "not marshal data": lambda s: b"\xff\x00 not marshal",
    "truncated marshal data": lambda s: body_of(s)[:-3],
    "an int": lambda s: marshal.dumps(42),
    "a tuple of four": lambda s: marshal.dumps(_fields(s)[:4]),
    "a tuple of six": lambda s: marshal.dumps((*_fields(s)[:4], [], 0)),
    # wrong shape of a field
    "namespaces is a list": lambda s: marshal.dumps(([], *_fields(s)[1:4], [])),
    "root namespace missing": lambda s: body_of(
        s._replace(namespaces={k: v for k, v in s.namespaces.items() if k})
    ),
    "namespace name is an int": lambda s: body_of(_with_namespace(s, 7, {})),
    "index is a list": lambda s: body_of(_with_namespace(s, "a", [])),
    "location is a str": lambda s: body_of(_with_location(s, "odd", "x")),
    "compressed location of four fields": lambda s: body_of(_with_location(s, "odd", (1, 2, 3, 4))),
    "compressed location with a negative field": lambda s: body_of(
        _with_location(s, "odd", (1, -2, 3, 4, 5))
    ),
    "seq is a str": lambda s: body_of(s._replace(seq="1")),  # type: ignore[arg-type]
    "live bytes is a float": lambda s: body_of(s._replace(live_bytes=1.5)),  # type: ignore[arg-type]
    "segments is an int": lambda s: marshal.dumps((*_fields(s)[:4], 3)),
    "mark of three fields": lambda s: marshal.dumps(
        (*_fields(s)[:4], [tuple(m)[:3] for m in s.segments])
    ),
    "mark field is a str": lambda s: body_of(_with_mark(s, 0, SegmentMark(1, 1, "9", 0))),  # type: ignore[arg-type]
    "checkpoint is a str": lambda s: body_of(s._replace(checkpoint="somewhere")),
    "checkpoint is a tuple of two": lambda s: body_of(s._replace(checkpoint=(1, 2))),
    "key is an int": lambda s: body_of(_with_location(s, 5, s.namespaces[""]["last"])),
    "sub-storage without its parent": lambda s: body_of(_with_namespace(s, "orphan/child", {})),
    # values no segment can have
    "location in a segment that does not exist": lambda s: body_of(
        _with_location(s, "ghost", GHOST)
    ),
    "mark with a negative size": lambda s: body_of(
        _with_mark(s, -1, s.segments[-1]._replace(size=-1))
    ),
    "mark with a size past 2**63": lambda s: body_of(
        _with_mark(s, -1, s.segments[-1]._replace(size=1 << 70))
    ),
    "mark of another segment number": lambda s: body_of(
        _with_mark(s, 0, s.segments[0]._replace(number=s.segments[0].number + 100))
    ),
    "mark covering from another segment": lambda s: body_of(
        _with_mark(s, -1, s.segments[-1]._replace(covers_from=1))
    ),
    "no marks": lambda s: body_of(s._replace(segments=[])),
    # a segment between two named ones is not named: scanning it on top of the
    # snapshot's index would replay older records over newer ones
    "a middle mark left out": lambda s: body_of(
        s._replace(segments=s.segments[:1] + s.segments[2:])
    ),
    "marks out of order": lambda s: body_of(
        s._replace(segments=[s.segments[1], s.segments[0], *s.segments[2:]])
    ),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_snapshot_body_of_the_wrong_shape_with_a_valid_checksum_means_a_full_scan(
    template: Template, store: Path, case: str
) -> None:
    """A valid checksum only rules out accidental damage; a body this version of
    logstate would never write (a field of the wrong type, a location or mark that no
    segment can have) must still mean "scan", not an index that fails later: the
    issue asks for the snapshot's pointers to be bounds-checked, with a fallback."""
    path = snapshot_path(store)
    body = BAD_BODIES[case](decode_snapshot(path.read_bytes()))
    path.write_bytes(snapshot_file(body))
    outcome = outcome_of(store)
    assert (outcome.result, outcome.snapshot_used) == (template.model, False), outcome.detail


# ---------------------------------------------------------------------------- segments changed


def live_record(directory: Path, sealed: bool) -> tuple[Path, int]:
    """A segment (sealed or the newest) and the offset of a live plain record in it.

    Taken from the root namespace, which no operation clears: losing or renaming
    this record changes what a scan finds.
    """
    snap = read_snapshot(directory)
    newest = snap.segments[-1].number
    for location in snap.namespaces[""].values():
        if type(location) is int and location & 3 == KIND_RECORD:
            number, offset, _size, _kind = unpack_location(location)
            if (number < newest) == sealed:
                return directory / _filenames.segment_file_name(number), offset
    raise AssertionError("the template has no such record")


def _frame_at(data: bytes, offset: int) -> Frame:
    [frame] = [f for f in frames(data) if f.offset == offset]
    return frame


def rename_key_in_place(directory: Path, sealed: bool) -> None:
    """Rewrite a live record with another key of the same length (valid CRC, same size)."""
    segment, offset = live_record(directory, sealed)
    data = segment.read_bytes()
    frame = _frame_at(data, offset)
    start, end = frame.offset + fmt.RECORD_OVERHEAD, frame.offset + frame.size
    op = fmt.decode_op(frame.record_type, data, start, end)
    key = op.key.encode()
    prefix = fmt.encode_name(op.ns) + fmt.NAME_LEN.pack(len(key)) + key
    body = data[start:end]
    assert body.startswith(prefix)
    body = prefix[: -len(key)] + b"#" * len(key) + body[len(prefix) :]
    record = fmt.encode_record(frame.record_type, frame.seq, body)
    assert len(record) == frame.size
    segment.write_bytes(data[: frame.offset] + record + data[end:])


def truncate_at_live_record(directory: Path, sealed: bool, inside: int = 0) -> None:
    segment, offset = live_record(directory, sealed)
    os.truncate(segment, offset + inside)


def zero_from_live_record(directory: Path) -> None:
    """Zero the newest segment from a live record on (same length), as a lost write would."""
    segment, offset = live_record(directory, sealed=False)
    data = segment.read_bytes()
    segment.write_bytes(data[:offset] + bytes(len(data) - offset))


def append_to_sealed(directory: Path, data: bytes) -> None:
    with segments(directory)[1].open("ab") as f:
        f.write(data)


def delete_segments(directory: Path, which: slice) -> None:
    for path in segments(directory)[which]:
        path.unlink()


def replace_sealed_by_the_next(directory: Path) -> None:
    paths = segments(directory)
    paths[1].write_bytes(paths[2].read_bytes())


APPENDED_RECORD = fmt.encode_record(
    fmt.REC_SET, 1 << 40, fmt.encode_name("") + fmt.encode_name("appended") + b"\x00"
)

SEGMENT_CHANGES: dict[str, Callable[[Path], None]] = {
    "newest truncated at a live record": lambda d: truncate_at_live_record(d, sealed=False),
    "newest truncated inside a live record": lambda d: truncate_at_live_record(d, False, 9),
    "sealed truncated at a live record": lambda d: truncate_at_live_record(d, sealed=True),
    "sealed truncated inside a live record": lambda d: truncate_at_live_record(d, True, 9),
    "sealed grew by a valid record": lambda d: append_to_sealed(d, APPENDED_RECORD),
    "sealed grew by zeros": lambda d: append_to_sealed(d, bytes(100)),
    "newest live record rewritten, same length": lambda d: rename_key_in_place(d, False),
    "sealed live record rewritten, same length": lambda d: rename_key_in_place(d, True),
    "newest zero-filled from a live record, same length": zero_from_live_record,
    "sealed replaced by the next one": replace_sealed_by_the_next,
    "every segment deleted": lambda d: delete_segments(d, slice(None)),
    "first segment deleted": lambda d: delete_segments(d, slice(0, 1)),
}


@pytest.mark.parametrize("change", SEGMENT_CHANGES)
def test_segment_changed_since_the_snapshot_means_a_full_scan(
    template: Template, store: Path, tmp_path: Path, change: str
) -> None:
    SEGMENT_CHANGES[change](store)
    expected = scan_outcome(store, tmp_path / "scanned")
    # trusting the snapshot would give the template's contents: the case discriminates
    assert expected.result != template.model, "this change does not alter what a scan finds"
    outcome = outcome_of(store)
    assert outcome.result == expected.result, outcome.detail
    assert not outcome.snapshot_used


def test_snapshot_naming_a_segment_that_no_longer_exists_means_a_full_scan(
    template: Template, store: Path, tmp_path: Path
) -> None:
    """A newer snapshot (more segments) restored next to older segments."""
    newer = tmp_path / "newer"
    shutil.copytree(store, newer)
    with open_store(newer) as s:
        for i in range(30):
            s[f"more{i}"] = "m" * 300
    assert len(read_snapshot(newer).segments) > len(segments(store))
    shutil.copy(snapshot_path(newer), snapshot_path(store))
    outcome = outcome_of(store)
    assert (outcome.result, outcome.snapshot_used) == (template.model, False), outcome.detail


def test_snapshot_of_another_store_means_a_full_scan(
    template: Template, store: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    model = Model()
    with open_store(other) as s:
        play_random(s, model, random.Random(99), 300)
    assert len(segments(other)) >= len(segments(store))
    shutil.copy(snapshot_path(other), snapshot_path(store))
    outcome = outcome_of(store)
    assert (outcome.result, outcome.snapshot_used) == (template.model, False), outcome.detail


def test_compaction_after_the_snapshot_then_a_crash_means_a_full_scan(
    template: Template, store: Path
) -> None:
    model = template.model.copy()
    s = open_store(store, compress_min_size=0)
    assert s.report.snapshot_used
    play(s, model, ops_on_covered_data(model))
    result = s.compact()
    assert result.output is not None and len(result.inputs) >= 4
    play_random(s, model, random.Random(8), 20)
    kill(s)
    outcome = outcome_of(store)
    assert (outcome.result, outcome.snapshot_used) == (model, False), outcome.detail


def test_compaction_output_taking_the_only_segments_number_is_not_mistaken_for_it(
    tmp_path: Path,
) -> None:
    """Compacting a store of one segment renames the output over that segment: same
    number, same covers_from, and (here) larger than the snapshot's size, so only the
    tail checksum can tell that it is another file."""
    directory = tmp_path / "store"
    model = Model()
    big = {"segment_size": 1 << 20}
    with open_store(directory, **big) as s:
        play(s, model, [("set", "", f"k{i}", f"first {i}") for i in range(50)])
    [mark] = read_snapshot(directory).segments
    s = open_store(directory, **big)
    assert s.report.snapshot_used
    play(s, model, [("remove", "", "k0"), ("set", "", "k1", "second")])
    play(s, model, [("set", "", f"n{i}", "n" * 100) for i in range(60)])
    assert s.compact().inputs == [1]
    kill(s)
    first = segments(directory)[0]
    assert first.name == "segment-0000000001.seg"
    assert first.stat().st_size >= mark.size, "the size check alone cannot tell"
    outcome = outcome_of(directory, **big)
    assert (outcome.result, outcome.snapshot_used) == (model, False), outcome.detail


class InputsNotDeleted(FileSystem):
    """No segment file can be deleted: compaction leaves its inputs (as if it crashed
    after renaming its output into place, before deleting them)."""

    def unlink(self, path: str) -> None:
        if path.endswith(".seg"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().unlink(path)


def open_with(fs: FileSystem, directory: Path, **options: Any) -> LocalFileStorage:
    """A public handle on an engine that uses ``fs``."""
    engine = _registry.acquire_engine(str(directory), {**OPTIONS, **options}, create=True, fs=fs)
    handle = LocalFileStorage(directory)
    _registry.release_engine(engine)  # the handle now holds the only reference
    assert handle._engine is engine
    return handle


def test_crash_between_compaction_rename_and_input_deletion_means_a_full_scan(
    template: Template, store: Path
) -> None:
    model = template.model.copy()
    s = open_with(InputsNotDeleted(), store)
    assert s.report.snapshot_used
    play(s, model, ops_on_covered_data(model))
    result = s.compact()
    leftovers = [p for p in segments(store) if int(p.name[8:18]) in result.inputs[:-1]]
    assert leftovers, "the inputs are still there"
    kill(s)
    outcome = outcome_of(store)
    assert (outcome.result, outcome.snapshot_used) == (model, False), outcome.detail
    assert not any(p.exists() for p in leftovers), "open removed the compacted inputs"


# ============================================================================ 4. who may use it


def test_salvage_never_uses_the_snapshot(template: Template, store: Path) -> None:
    with open_store(store, recovery="salvage") as s:
        assert not s.report.snapshot_used
        assert s.report.records > 0
        assert observe(s) == template.model
        s._check()


def test_use_snapshot_false_never_uses_it(template: Template, store: Path) -> None:
    with open_store(store, use_snapshot=False) as s:
        assert not s.report.snapshot_used
        assert s.report.records > 0
        assert observe(s) == template.model
        s._check()


def test_use_snapshot_must_be_a_bool(store: Path) -> None:
    with pytest.raises(TypeError, match="use_snapshot"):
        LocalFileStorage(store, use_snapshot=1)  # type: ignore[arg-type]


def _torn_tail_after_the_snapshot(directory: Path) -> None:
    s = open_store(directory)
    s["written after the snapshot"] = "x" * 100
    kill(s)
    newest = segments(directory)[-1]
    os.truncate(newest, newest.stat().st_size - 10)


def _leftover_tmp(directory: Path) -> None:
    (directory / (SNAPSHOT_FILE_NAME + ".tmp")).write_bytes(b"half")


READ_ONLY_SETUPS: dict[str, tuple[Callable[[Path], None], bool]] = {
    # setup, whether the snapshot can be used
    "clean": (lambda d: None, True),
    "torn tail after the snapshot": (_torn_tail_after_the_snapshot, True),
    "damaged snapshot": (lambda d: flip_bit(snapshot_path(d), SNAPSHOT_HEADER.size + 3), False),
    "leftover tmp": (_leftover_tmp, True),
}


@pytest.mark.parametrize("setup", READ_ONLY_SETUPS)
def test_read_only_open_may_use_the_snapshot_and_changes_no_file(
    template: Template, store: Path, setup: str
) -> None:
    prepare, usable = READ_ONLY_SETUPS[setup]
    prepare(store)
    before = file_states(store)
    with open_store(store, read_only=True) as s:
        assert s.report.snapshot_used == usable
        assert observe(s) == template.model
        s._check()
        if setup.startswith("torn"):
            [(_path, offset, _size, aside)] = s.report.torn_tails  # reported, not cut
            assert (offset, aside) == (read_snapshot(store).segments[-1].size, "")
    assert file_states(store) == before


# ============================================================================ 5. failures


class FailingAppend(FileSystem):
    """The next append fails with ENOSPC after writing half its data."""

    armed = False

    def append(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        if self.armed:
            self.armed = False
            super().append(fd, memoryview(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().append(fd, data)


@pytest.mark.parametrize("previous", [False, True], ids=["first-session", "has-a-snapshot"])
def test_failed_storage_writes_no_snapshot_at_close(tmp_path: Path, previous: bool) -> None:
    directory = tmp_path / "store"
    model = Model()
    rng = random.Random(12)
    if previous:
        with open_store(directory) as s:
            play_random(s, model, rng, 60)
    before = file_states(directory).get(SNAPSHOT_FILE_NAME) if previous else None
    fs = FailingAppend()
    s = open_with(fs, directory, segment_size=1 << 20)  # no roll: the record itself fails
    assert s.report.snapshot_used == previous
    play_random(s, model, rng, 30)
    fs.armed = True
    with pytest.raises(OSError):
        s["fails"] = "f" * 100
    assert s._engine.failed is not None
    s.close()
    assert file_states(directory).get(SNAPSHOT_FILE_NAME) == before
    assert not list(directory.glob("*.tmp"))
    with open_store(directory) as s:
        assert s.report.snapshot_used == previous
        assert len(s.report.torn_tails) == 1  # the half-written record
        assert observe(s) == model
        s._check()


class SnapshotWriteFails(FileSystem):
    """Writing ``index.snapshot`` fails at ``step``."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.failed = False

    def _fail(self, error: int) -> None:
        self.failed = True
        raise OSError(error, os.strerror(error))

    def write_new_file(self, path: str, data: bytes | bytearray | memoryview) -> None:
        if not path.endswith(SNAPSHOT_FILE_NAME + ".tmp") or self.step == "rename":
            super().write_new_file(path, data)
            return
        if self.step == "create":
            self._fail(errno.ENOSPC)
        fd = self.create_file(path)
        try:
            if self.step == "short write":
                self.append(fd, memoryview(data)[: len(data) // 2])
                self._fail(errno.ENOSPC)
            self.append(fd, data)
            self._fail(errno.EIO)  # step "fsync"
        finally:
            self.close(fd)

    def rename(self, src: str, dst: str) -> None:
        if dst.endswith(SNAPSHOT_FILE_NAME) and self.step == "rename":
            self._fail(errno.EIO)
        super().rename(src, dst)


@pytest.mark.parametrize("step", ["create", "short write", "fsync", "rename"])
@pytest.mark.parametrize("previous", [False, True], ids=["first-session", "has-a-snapshot"])
def test_failed_snapshot_write_does_not_fail_close_and_its_tmp_is_removed_at_open(
    tmp_path: Path, step: str, previous: bool
) -> None:
    directory = tmp_path / "store"
    model = Model()
    rng = random.Random(13)
    if previous:
        with open_store(directory) as s:
            play_random(s, model, rng, 60)
    before = file_states(directory).get(SNAPSHOT_FILE_NAME) if previous else None
    fs = SnapshotWriteFails(step)
    s = open_with(fs, directory)
    play(s, model, [("remove", "", k) for k in sorted(model.state[""])[:3]])
    play_random(s, model, rng, 40)
    s.close()  # no error
    assert fs.failed and s.closed
    assert file_states(directory).get(SNAPSHOT_FILE_NAME) == before
    with open_store(directory) as s:
        assert not list(directory.glob("*.tmp"))
        # the previous snapshot, if any, still covers a prefix: it may be used
        assert s.report.snapshot_used == previous
        assert observe(s) == model
        s._check()
    with open_store(directory) as s:
        assert s.report.snapshot_used and s.report.records == 0
        assert observe(s) == model


def test_a_directory_in_the_way_of_the_snapshot_does_not_fail_open_or_close(
    template: Template, store: Path
) -> None:
    snapshot_path(store).unlink()
    snapshot_path(store).mkdir()
    for _ in range(2):
        with open_store(store) as s:  # close: the rename over a directory fails
            assert not s.report.snapshot_used
            assert observe(s) == template.model
        assert snapshot_path(store).is_dir()
    with open_store(store) as s:
        assert not list(store.glob("*.tmp"))
    snapshot_path(store).rmdir()
    with open_store(store):
        pass
    with open_store(store) as s:
        assert s.report.snapshot_used
        assert observe(s) == template.model


# ============================================================================ 6. the trade-off


@dataclass(frozen=True)
class EarlyRecords:
    directory: Path
    model: Model
    targets: dict[str, tuple[Any, set[str]]]  # name -> (location, keys it damages)


def build_early_records(directory: Path) -> EarlyRecords:
    """One segment of 1 MiB: the records damaged later come first, then > TAIL_BYTES of others."""
    model = Model()
    big = {"segment_size": 1 << 20}
    with open_store(directory, compress_min_size=None, **big) as s:
        play(s, model, [("set", "", "target", "precious " * 20)])
        play(s, model, [("batch", "", [("set", "g1", "group one"), ("set", "g2", "group two")])])
    with open_store(directory, compress_min_size=0, **big) as s:
        play(s, model, [("batch", "", [("set", "z1", "zz" * 200), ("set", "z2", "zy" * 150)])])
        play(s, model, [("set", "", f"filler{i}", "f" * 200) for i in range(40)])
    index = read_snapshot(directory).namespaces[""]
    targets = {
        "plain record": (index["target"], {"target"}),
        "op of an uncompressed group": (index["g1"], {"g1"}),
        "zstd group": (index["z1"], {"z1", "z2"}),
    }
    assert type(index["target"]) is int and index["target"] & 3 == KIND_RECORD
    assert type(index["g1"]) is int and index["g1"] & 3 == KIND_GROUP_OP
    assert type(index["z1"]) is tuple
    return EarlyRecords(directory, model, targets)


def _byte_range(location: Any) -> tuple[int, int]:
    if type(location) is int:
        _segment, offset, size, _kind = unpack_location(location)
        return offset, size
    return location[1], location[2]


@pytest.fixture
def early(tmp_path: Path) -> EarlyRecords:
    return build_early_records(tmp_path / "early")


@pytest.mark.parametrize("target", ["plain record", "op of an uncompressed group", "zstd group"])
def test_damage_in_a_covered_record_is_found_at_get_not_at_open(
    early: EarlyRecords, target: str
) -> None:
    """The snapshot's trade-off: open reads only the last TAIL_BYTES of each covered
    segment, so a record damaged (bit rot, a stray write) after the snapshot was
    written, outside that tail, is not noticed at open as a full scan would (strict
    would refuse to open). It is noticed when read: get() raises CorruptionError,
    never returns a wrong value, and the other keys read fine. ``logstate check``
    or ``use_snapshot=False`` finds it at once."""
    location, damaged_keys = early.targets[target]
    offset, size = _byte_range(location)
    segment = segments(early.directory)[0]
    assert offset + size < segment.stat().st_size - TAIL_BYTES
    others = {k: v for k, v in early.model.state[""].items() if k not in damaged_keys}
    positions = sorted({offset, offset + 4, offset + 8, offset + size // 2, offset + size - 1})
    for position in positions:
        flip_bit(segment, position, position % 8)
        with open_store(early.directory) as s:
            assert s.report.snapshot_used, position
            for key in damaged_keys:
                with pytest.raises(CorruptionError):
                    s.get(key)
                with pytest.raises(CorruptionError):
                    s[key]
            assert {k: s[k] for k in others} == others
            with pytest.raises(CorruptionError):
                s._check()
        with pytest.raises(CorruptionError):
            open_store(early.directory, use_snapshot=False)
        flip_bit(segment, position, position % 8)  # repair it for the next position
    with open_store(early.directory) as s:
        assert observe(s) == early.model


def test_damage_inside_the_checked_tail_is_found_at_open(early: EarlyRecords) -> None:
    segment = segments(early.directory)[0]
    flip_bit(segment, segment.stat().st_size - 2000)  # a filler record, not the last one
    with pytest.raises(CorruptionError):
        open_store(early.directory)


def test_salvage_finds_damage_the_snapshot_would_not_show(early: EarlyRecords) -> None:
    offset, size = _byte_range(early.targets["plain record"][0])
    flip_bit(segments(early.directory)[0], offset + size // 2)
    with open_store(early.directory, recovery="salvage", segment_size=1 << 20) as s:
        assert not s.report.snapshot_used
        assert [entry[1:3] for entry in s.report.salvaged] == [(offset, size)]
        expected = {k: v for k, v in early.model.state[""].items() if k != "target"}
        assert observe(s).state[""] == expected
        s._check()
