"""Tests of the in-memory index (logstate._keydir.Keydir), without files or an engine.

A hypothesis state machine drives a Keydir with random sets, deletes,
clears, drops, namespace creations, checkpoints, replayed records (real
encoded records, scanned) and compaction moves, against a plain dict model
(namespace -> {key: location}). After every step the index equals the model,
the live bytes equal the model's own sum of the locations' sizes, the root
exists and so does every namespace's parent. Unit tests pin the reads
(``require``, ``children``), the path helpers and ``apply_frame`` on records
of every kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from logstate import SubStorageDeletedError
from logstate._format import (
    FRAME_HEADER_SIZE,
    GROUP_FLAG_ZSTD,
    GROUP_OP_SIZE,
    REC_CHECKPOINT,
    REC_CLEAR,
    REC_CREATE_NS,
    REC_DELETE,
    REC_DROP_NS,
    REC_GROUP,
    REC_SET,
    RECORD_OVERHEAD,
    SEGMENT_HEADER_SIZE,
    check_group_op,
    check_record,
    decode_group,
    decode_op,
    encode_group_body,
    encode_name,
    encode_record,
    encode_segment_header,
)
from logstate._keydir import Keydir, is_within, join_namespace
from logstate._location import (
    KIND_GROUP_OP,
    KIND_RECORD,
    Location,
    compressed_location,
    location_size,
    pack_location,
    unpack_location,
)
from logstate._reader import decompress_group
from logstate._scan import Damage, Frame, scan_records

NAMESPACES = ("", "a", "ab", "a/b", "a/c", "a/b/c", "b")  # "ab": a prefix, not a child, of "a"
SUB_NAMESPACES = NAMESPACES[1:]
KEYS = ("k0", "k1", "k2", "ключ")
ALL_OP_TYPES = (REC_SET, REC_DELETE, REC_CLEAR, REC_CREATE_NS, REC_DROP_NS, REC_CHECKPOINT)
PATH = "/data/store"


# =========================================================================== model
@dataclass
class Model:
    """What the index must hold: namespace -> key -> location, and the checkpoint."""

    namespaces: dict[str, dict[str, Location]] = field(default_factory=lambda: {"": {}})
    checkpoint: Location | None = None

    def ensure(self, ns: str) -> dict[str, Location]:
        """``ns``'s keys, creating it and every missing ancestor."""
        name = ns
        while True:
            self.namespaces.setdefault(name, {})
            if not name:
                return self.namespaces[ns]
            name = name.rpartition("/")[0]

    def below(self, ns: str) -> list[str]:
        """Namespaces strictly below ``ns`` (below the root: every other one)."""
        return [n for n in self.namespaces if n and (not ns or n.startswith(ns + "/"))]

    def set(self, ns: str, key: str, loc: Location) -> None:
        self.ensure(ns)[key] = loc

    def delete(self, ns: str, key: str) -> None:
        self.namespaces.get(ns, {}).pop(key, None)

    def clear(self, ns: str, drop_self: bool) -> None:
        for name in self.below(ns):
            del self.namespaces[name]
        if drop_self and ns:
            self.namespaces.pop(ns, None)
        elif ns in self.namespaces:
            self.namespaces[ns] = {}

    def apply(self, op_type: int, ns: str, key: str, loc: Location) -> None:
        if op_type == REC_SET:
            self.set(ns, key, loc)
        elif op_type == REC_DELETE:
            self.delete(ns, key)
        elif op_type == REC_CLEAR:
            self.clear(ns, drop_self=False)
        elif op_type == REC_CREATE_NS:
            self.ensure(ns)
        elif op_type == REC_DROP_NS:
            self.clear(ns, drop_self=True)
        elif op_type == REC_CHECKPOINT:
            self.checkpoint = loc

    def live_bytes(self) -> int:
        return sum(
            location_size(loc) for index in self.namespaces.values() for loc in index.values()
        )


def decoded_ops(
    data: bytes, frame: Frame, segment: int, shift: int
) -> list[tuple[int, str, str, Location]]:
    """The operations of a scanned record by the general decoders, each with its location.

    Locations as docs/format.md and logstate._location define them: a whole
    record, an operation of a plain group (with its own CRC), or an
    operation of a compressed group; offsets in the segment file are the
    offsets in ``data`` less ``shift``.
    """
    record_offset = frame.offset - shift
    end = frame.offset + frame.size
    if frame.record_type != REC_GROUP:
        op = decode_op(frame.record_type, data, frame.offset + RECORD_OVERHEAD, end)
        return [
            (
                op.op_type,
                op.ns,
                op.key,
                pack_location(segment, record_offset, frame.size, KIND_RECORD),
            )
        ]
    payload = memoryview(data)[frame.offset + FRAME_HEADER_SIZE : end]
    compressed, raw, ops = decode_group(payload)
    located: list[tuple[int, str, str, Location]] = []
    for g in ops:
        loc: Location
        if compressed:
            loc = compressed_location(
                segment, record_offset, frame.size, g.op_offset, g.op_size, len(raw)
            )
        else:
            offset = record_offset + FRAME_HEADER_SIZE + g.op_offset
            loc = pack_location(segment, offset, g.op_size, KIND_GROUP_OP)
        located.append((g.op.op_type, g.op.ns, g.op.key, loc))
    return located


def scan(data: bytes, start: int) -> list[Frame]:
    damages: list[Damage] = []
    frames = list(scan_records(data, start, damages.append))
    assert damages == []
    return frames


# =========================================================================== strategies
namespaces = st.sampled_from(NAMESPACES)
keys = st.sampled_from(KEYS)
plain_locations = st.builds(
    pack_location,
    st.integers(0, 2**16),
    st.integers(0, 2**40 - 1),
    st.integers(0, 2**32 - 1),
    st.sampled_from([KIND_RECORD, KIND_GROUP_OP]),
)


@st.composite
def compressed_locations(draw: st.DrawFn) -> Location:
    raw_size = draw(st.integers(1, 2**20))
    op_offset = draw(st.integers(0, raw_size - 1))
    op_size = draw(st.integers(1, raw_size - op_offset))
    return compressed_location(
        draw(st.integers(0, 2**16)),
        draw(st.integers(0, 2**40 - 1)),
        draw(st.integers(1, 2**30)),
        op_offset,
        op_size,
        raw_size,
    )


# a small pool, so that equal locations (a compaction's stale "old" one) come up often
POOL: tuple[Location, ...] = (
    pack_location(1, 24, 40, KIND_RECORD),
    pack_location(1, 64, 33, KIND_GROUP_OP),
    pack_location(2, 24, 40, KIND_RECORD),
    compressed_location(3, 24, 100, 0, 30, 90),
    compressed_location(3, 24, 100, 30, 60, 90),
)
locations = st.one_of(st.sampled_from(POOL), plain_locations, compressed_locations())
values = st.binary(min_size=1, max_size=8) | st.integers(1, 300).map(lambda n: b"v" * n)
replay_ops = st.one_of(
    st.tuples(st.just(REC_SET), namespaces, keys, values),
    st.tuples(st.just(REC_DELETE), namespaces, keys, st.just(b"")),
    st.tuples(st.just(REC_CLEAR), namespaces, st.just(""), st.just(b"")),
    st.tuples(
        st.sampled_from([REC_CREATE_NS, REC_DROP_NS]),
        st.sampled_from(SUB_NAMESPACES),
        st.just(""),
        st.just(b""),
    ),
    st.tuples(st.just(REC_CHECKPOINT), st.just(""), st.just(""), values),
)


def op_body(op_type: int, ns: str, key: str, value: bytes) -> bytes:
    if op_type in (REC_SET, REC_DELETE):
        return encode_name(ns) + encode_name(key) + value
    if op_type == REC_CHECKPOINT:
        return value
    return encode_name(ns)


# =========================================================================== state machine
class KeydirMachine(RuleBasedStateMachine):
    """Random index changes against the dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.keydir = Keydir(PATH)
        self.namespaces = self.keydir.namespaces  # never replaced: readers hold it
        self.model = Model()

    @rule(ns=namespaces, key=keys, loc=locations)
    def put(self, ns: str, key: str, loc: Location) -> None:
        self.keydir.put(ns, self.keydir.ensure(ns), key, loc)
        self.model.set(ns, key, loc)

    @rule(op_type=st.sampled_from(ALL_OP_TYPES), ns=namespaces, key=keys, loc=locations)
    def apply(self, op_type: int, ns: str, key: str, loc: Location) -> None:
        self.keydir.apply(op_type, ns, key, loc)
        self.model.apply(op_type, ns, key, loc)

    @rule(ns=namespaces, key=keys)
    def delete(self, ns: str, key: str) -> None:
        self.keydir.delete(ns, key)
        self.model.delete(ns, key)

    @rule(ns=namespaces)
    def ordered_read(self, ns: str) -> None:
        """An ordered read makes (or brings up to date) the namespace's sorted view."""
        index = self.keydir.namespaces.get(ns)
        if index is None:
            with pytest.raises(SubStorageDeletedError):
                self.keydir.sorted_keys(ns)
        else:
            assert self.keydir.sorted_keys(ns) == sorted(index)

    @rule(ns=namespaces, drop_self=st.booleans())
    def clear(self, ns: str, drop_self: bool) -> None:
        self.keydir.clear(ns, drop_self)
        self.model.clear(ns, drop_self)

    @rule(
        ops=st.lists(replay_ops, min_size=1, max_size=5),
        kind=st.sampled_from(["plain", "group", "compressed"]),
        segment=st.integers(0, 2**16),
        lead=st.integers(0, 64),
        shift_back=st.integers(0, 2**20),
    )
    def replay(
        self,
        ops: list[tuple[int, str, str, bytes]],
        kind: str,
        segment: int,
        lead: int,
        shift_back: int,
    ) -> None:
        """One real record (a single op, a group, a compressed group), scanned and applied."""
        bodies = [(t, op_body(t, ns, key, value)) for t, ns, key, value in ops]
        if kind == "plain":
            record = encode_record(bodies[0][0], 1, bodies[0][1])
        else:
            min_size = 0 if kind == "compressed" else None
            record = encode_record(REC_GROUP, 1, encode_group_body(bodies, min_size, 1))
        data = b"\xaa" * lead + record  # the record at ``lead`` in a window
        shift = lead - shift_back  # ... which starts at file offset shift_back - lead
        (frame,) = scan(data, lead)
        self.keydir.apply_frame(data, frame, segment, shift)
        for op_type, ns, key, loc in decoded_ops(data, frame, segment, shift):
            self.model.apply(op_type, ns, key, loc)

    @precondition(lambda self: any(self.model.namespaces.values()))
    @rule(
        moves=st.lists(
            st.tuples(namespaces, keys, st.booleans(), locations, locations), max_size=6
        ),
        data=st.data(),
    )
    def move_unchanged(
        self, moves: list[tuple[str, str, bool, Location, Location]], data: st.DataObject
    ) -> None:
        """A compaction's switch: moved only where the key still points at the old location."""
        # some moves of keys that are indexed, as a compaction copied them
        present = [(ns, key) for ns, index in self.model.namespaces.items() for key in index]
        copied = data.draw(st.lists(st.sampled_from(present), max_size=4))
        moved: list[tuple[str, str, Location, Location]] = [
            (ns, key, self.model.namespaces[ns][key], data.draw(locations)) for ns, key in copied
        ]
        for ns, key, current, stale, new in moves:
            # current: the key's location now, if any (else a stale one); stale:
            # the key changed (or went) after the compaction copied it
            old = self.model.namespaces.get(ns, {}).get(key, stale) if current else stale
            moved.append((ns, key, old, new))
        self.keydir.move_unchanged(moved)
        for ns, key, old, new in moved:
            index = self.model.namespaces.get(ns)
            if index is not None and key in index and index[key] == old:
                index[key] = new

    @rule()
    def recount(self) -> None:
        self.keydir.recount()

    @invariant()
    def index_equals_the_model(self) -> None:
        assert self.keydir.namespaces is self.namespaces
        assert self.keydir.namespaces == self.model.namespaces
        assert self.keydir.checkpoint == self.model.checkpoint

    @invariant()
    def live_bytes_are_the_sizes_of_the_models_locations(self) -> None:
        assert self.keydir.live_bytes == self.model.live_bytes()

    @invariant()
    def root_and_every_parent_exist(self) -> None:
        assert "" in self.keydir.namespaces
        for ns in self.keydir.namespaces:
            if ns:
                assert ns.rpartition("/")[0] in self.keydir.namespaces, ns
        self.keydir._check()


KeydirMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKeydir = KeydirMachine.TestCase


# =========================================================================== unit tests
def test_require_of_a_missing_namespace_names_the_sub_storage_and_the_path() -> None:
    keydir = Keydir(PATH)
    index = keydir.ensure("a/b")
    assert keydir.require("a/b") is index
    assert keydir.require("") is keydir.namespaces[""]
    keydir.clear("a", drop_self=True)
    for missing in ("a", "a/b", "never"):
        with pytest.raises(SubStorageDeletedError) as info:
            keydir.require(missing)
        assert repr(missing) in str(info.value)
        assert PATH in str(info.value)


def test_children_are_the_sorted_names_directly_below() -> None:
    keydir = Keydir(PATH)
    for ns in ("b", "a/y", "a/x/deep", "ab", "a"):
        keydir.ensure(ns)
    assert keydir.children("") == ["a", "ab", "b"]
    assert keydir.children("a") == ["x", "y"]  # not "ab", not "x/deep"
    assert keydir.children("a/x") == ["deep"]
    assert keydir.children("a/x/deep") == []
    assert keydir.children("missing") == []


def test_ensure_creates_every_missing_parent() -> None:
    keydir = Keydir(PATH)
    keydir.ensure("a/b/c")
    assert sorted(keydir.namespaces) == ["", "a", "a/b", "a/b/c"]
    keydir._check()


def test_join_namespace_and_is_within() -> None:
    assert join_namespace("", "a") == "a"
    assert join_namespace("a", "b") == "a/b"
    assert join_namespace("a/b", "c") == "a/b/c"
    assert is_within("a", "a")
    assert is_within("a/b", "a")
    assert is_within("a/b/c", "a")
    assert is_within("a", "")
    assert is_within("", "")
    assert not is_within("ab", "a")  # a prefix of the name is not an ancestor
    assert not is_within("a", "a/b")
    assert not is_within("", "a")
    assert not is_within("b/a", "a")


def test_clear_keeps_the_namespace_and_drops_what_is_below_it() -> None:
    keydir = Keydir(PATH)
    loc = pack_location(1, 24, 50, KIND_RECORD)
    for ns in ("a", "a/b", "ab"):
        keydir.put(ns, keydir.ensure(ns), "k", loc)
    index = keydir.namespaces["a"]
    keydir.clear("a", drop_self=False)
    assert keydir.namespaces == {"": {}, "a": {}, "ab": {"k": loc}}
    assert keydir.namespaces["a"] is index  # emptied in place: handles keep using it
    assert keydir.live_bytes == 50
    keydir.clear("a", drop_self=True)
    assert keydir.namespaces == {"": {}, "ab": {"k": loc}}
    keydir.clear("", drop_self=True)  # the root is never dropped, only emptied
    assert keydir.namespaces == {"": {}}
    assert keydir.live_bytes == 0


def test_move_unchanged_moves_only_keys_still_at_their_old_location() -> None:
    keydir = Keydir(PATH)
    old = {k: pack_location(1, 24 + 100 * i, 100, KIND_RECORD) for i, k in enumerate("abcd")}
    new = {k: pack_location(5, 24 + 10 * i, 90, KIND_RECORD) for i, k in enumerate("abcd")}
    rewritten = compressed_location(2, 24, 70, 0, 10, 10)
    for key, loc in old.items():
        keydir.put("ns", keydir.ensure("ns"), key, loc)
    keydir.put("ns", keydir.namespaces["ns"], "b", rewritten)  # set again after the copy
    keydir.delete("ns", "c")  # deleted after the copy
    in_group = compressed_location(3, 24, 80, 10, 20, 40)  # share 40
    keydir.put("ns", keydir.namespaces["ns"], "e", in_group)
    moved: list[tuple[str, str, Location, Location]] = [("ns", k, old[k], new[k]) for k in "abcd"]
    moved.append(("ns", "e", compressed_location(3, 24, 80, 10, 20, 40), new["a"]))  # equal
    moved.append(("gone", "a", old["a"], new["a"]))  # its namespace was dropped
    keydir.move_unchanged(moved)
    assert keydir.namespaces == {
        "": {},
        "ns": {"a": new["a"], "b": rewritten, "d": new["d"], "e": new["a"]},
    }
    assert keydir.live_bytes == 90 + 70 + 90 + 90
    keydir._check()


def test_recount_repairs_the_live_bytes() -> None:
    keydir = Keydir(PATH)
    keydir.ensure("a")["k"] = pack_location(1, 24, 77, KIND_RECORD)  # not through put
    keydir.recount()
    assert keydir.live_bytes == 77


SEGMENT = 7
RECORD_OPS: list[tuple[int, str, str, bytes]] = [
    (REC_SET, "", "root", b"\x01one"),
    (REC_CREATE_NS, "a", "", b""),
    (REC_SET, "a", "k", b"\x01two"),
    (REC_SET, "a/b", "deep", b"\x01created with its parents"),
    (REC_SET, "", "gone", b"\x01x"),
    (REC_DELETE, "", "gone", b""),
    (REC_CHECKPOINT, "", "", b"\x01offsets"),
]
GROUP_OPS: list[tuple[int, str, str, bytes]] = [
    (REC_SET, "a", "k", b"\x01overwritten in a group"),
    (REC_SET, "c/d", "k", b"\x01in c/d, c created with it"),
    (REC_DELETE, "", "root", b""),
    (REC_SET, "", "root", b"\x01set again"),
    (REC_CHECKPOINT, "", "", b"\x01from a group"),
]
COMPRESSED_OPS: list[tuple[int, str, str, bytes]] = [
    *[(REC_SET, "z", f"item{i}", b"\x01" + b"compressible " * 8) for i in range(6)],
    (REC_DROP_NS, "c", "", b""),
    (REC_CLEAR, "a", "", b""),
    (REC_SET, "a", "after clear", b"\x01" + b"compressible " * 8),
    (REC_CHECKPOINT, "", "", b"\x01" + b"compressed checkpoint " * 4),
]


def segment_bytes() -> tuple[bytes, list[bool]]:
    """A segment with plain records, a group and a compressed group (and which compress)."""
    records = [
        encode_record(t, seq, op_body(t, ns, k, v))
        for seq, (t, ns, k, v) in enumerate(RECORD_OPS, 1)
    ]
    bodies = [
        encode_group_body([(t, op_body(t, ns, k, v)) for t, ns, k, v in GROUP_OPS], None),
        encode_group_body([(t, op_body(t, ns, k, v)) for t, ns, k, v in COMPRESSED_OPS], 0),
    ]
    records += [encode_record(REC_GROUP, 100 + i, body) for i, body in enumerate(bodies)]
    return encode_segment_header(SEGMENT) + b"".join(records), [
        body[0] == GROUP_FLAG_ZSTD for body in bodies
    ]


def read_back(data: bytes, loc: Location, ns: str, key: str, shift: int) -> bytes:
    """The value at ``loc`` read with the read path's checks (``data`` at file offset -shift)."""
    if isinstance(loc, tuple):
        segment, record_offset, record_size, op_offset, op_size, _share = loc
        start = record_offset + shift
        raw = decompress_group(PATH, record_offset, data[start : start + record_size])
        chunk = bytes(raw[op_offset : op_offset + op_size])
    else:
        segment, offset, size, kind = unpack_location(loc)
        chunk = data[offset + shift : offset + shift + size]
        if kind == KIND_RECORD:
            op = decode_op(check_record(chunk), chunk, RECORD_OVERHEAD, size)
            assert (segment, op.ns, op.key) == (SEGMENT, ns, key)
            return chunk[op.value_start : op.value_end]
    assert segment == SEGMENT
    check_group_op(chunk)
    op = decode_op(chunk[4], chunk, GROUP_OP_SIZE, len(chunk))
    assert (op.ns, op.key) == (ns, key)
    return chunk[op.value_start : op.value_end]


@pytest.mark.parametrize("shift", [0, 1000, -5000])
def test_apply_frame_gives_the_index_of_the_decoded_operations_applied_one_by_one(
    shift: int,
) -> None:
    segment, compressed = segment_bytes()
    assert compressed == [False, True]
    data = bytes(max(shift, 0)) + segment  # a window starting ``shift`` bytes before the file
    frames = scan(data, max(shift, 0) + SEGMENT_HEADER_SIZE)
    assert len(frames) == len(RECORD_OPS) + 2
    replayed = Keydir(PATH)
    expected = Keydir(PATH)
    for frame in frames:
        replayed.apply_frame(data, frame, SEGMENT, shift)
        for op_type, ns, key, loc in decoded_ops(data, frame, SEGMENT, shift):
            expected.apply(op_type, ns, key, loc)
        assert replayed.namespaces == expected.namespaces
        assert replayed.checkpoint == expected.checkpoint
        assert replayed.live_bytes == expected.live_bytes
        replayed._check()
    # and the index is the one the operations describe, every value readable
    final = {ns: sorted(index) for ns, index in replayed.namespaces.items()}
    assert final == {  # "a/b" went with the clear of "a", "c" with its drop
        "": ["root"],
        "a": ["after clear"],
        "z": [f"item{i}" for i in range(6)],
    }
    assert read_back(data, replayed.namespaces[""]["root"], "", "root", shift) == b"\x01set again"
    assert read_back(data, replayed.namespaces["z"]["item5"], "z", "item5", shift) == (
        b"\x01" + b"compressible " * 8
    )
    for ns, index in replayed.namespaces.items():
        for key, loc in index.items():
            assert read_back(data, loc, ns, key, shift).startswith(b"\x01"), (ns, key)
    assert replayed.checkpoint is not None
    assert read_back(data, replayed.checkpoint, "", "", shift) == (
        b"\x01" + b"compressed checkpoint " * 4
    )
    assert isinstance(replayed.namespaces["z"]["item0"], tuple)


def test_the_live_bytes_of_a_compressed_group_of_sets_are_its_size_on_disk() -> None:
    ops = [
        (REC_SET, encode_name("") + encode_name(f"k{i}") + b"\x01" + b"ab" * (i * 7))
        for i in range(9)
    ]
    body = encode_group_body(ops, 0)
    assert body[0] == GROUP_FLAG_ZSTD
    data = encode_segment_header(SEGMENT) + encode_record(REC_GROUP, 1, body)
    (frame,) = scan(data, SEGMENT_HEADER_SIZE)
    keydir = Keydir(PATH)
    keydir.apply_frame(data, frame, SEGMENT, 0)
    # each operation's share of the record: together exactly the record's bytes
    assert keydir.live_bytes == frame.size
    keydir._check()
