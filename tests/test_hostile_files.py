"""Files logstate did not write: symbolic links, FIFOs and other special files, crafted snapshots.

A storage directory may hold entries some other program put there. The
promises checked here:

- a symbolic link in place of ``LOCK`` or of a segment is refused with a
  CorruptionError naming it, by writable and read-only opens and by
  ``logstate dump``, and nothing is written through it (its target is left
  byte for byte as it was); a FIFO, a directory or another special file in
  their place is refused likewise, and never makes an open hang;
- ``index.snapshot`` being a link or a FIFO only means a full scan (it is a
  cache), and the next clean close replaces the entry itself, never its target;
- a crafted ``index.snapshot`` with a valid checksum never escapes as a
  non-logstate error and never gives an index that fails later: malformed
  marshal data, a sequence number with no room left, a location outside its
  segment, sizes that do not add up all mean a full scan;
- a location that is inside its segment but points at an older record of the
  key is what only a full scan can see: ``logstate check`` compares the
  snapshot with one and reports every difference (exit 1).

Opens that could hang on a FIFO run in a thread with a bounded wait; if one
hangs, the FIFO is opened for writing to let it go on, and the test fails.
"""

from __future__ import annotations

import contextlib
import io
import marshal
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from logstate import CorruptionError, InMemoryStorage, LocalFileStorage
from logstate import _format as fmt
from logstate._crc import crc32c
from logstate._filenames import SNAPSHOT_FILE_NAME
from logstate._location import (
    KIND_GROUP_OP,
    KIND_RECORD,
    location_size,
    pack_location,
    unpack_location,
)
from logstate._snapshot import (
    MARSHAL_SNAPSHOT_VERSION,
    SNAPSHOT_HEADER,
    SNAPSHOT_MAGIC,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
)
from logstate.cli import main

OPTIONS: dict[str, Any] = {"sync": "none", "segment_size": 4096}
HANG_TIMEOUT = 15.0  # seconds; an open that returns takes milliseconds


# ============================================================================ helpers


def build_store(directory: Path) -> dict[str, Any]:
    """Two segments (the sealed one larger): plain records, overwrites, a zstd
    group, a checkpoint."""
    expected: dict[str, Any] = {}
    with LocalFileStorage(directory, compress_min_size=0, **OPTIONS) as s:
        for i in range(40):
            s[f"k{i:02d}"] = expected[f"k{i:02d}"] = f"value {i} " + "x" * 90
        for i in range(0, 40, 4):
            s[f"k{i:02d}"] = expected[f"k{i:02d}"] = f"second value {i} " + "y" * 83
        memory = InMemoryStorage(s)
        packed = {f"g{i}": "packed " * 30 for i in range(4)}
        memory.update(packed)
        memory.flush(checkpoint={"partition": 3})
        expected.update(packed)
        s["last"] = expected["last"] = "the newest record"
    return expected


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path / "store"
    return directory, build_store(directory)


def contents(directory: Path, **options: Any) -> tuple[dict[str, Any], bool]:
    """(every root key's value, whether the open used the snapshot)."""
    with LocalFileStorage(directory, **{**OPTIONS, **options}) as s:
        return {key: s[key] for key in s.get_all_keys()}, s.report.snapshot_used


def segment_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.seg"))


def outside_file(tmp_path: Path, data: bytes = b"precious data that is not logstate's\n") -> Path:
    target = tmp_path / "outside" / "precious.bin"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(data)
    return target


def bounded(call: Callable[[], object], fifos: list[Path]) -> BaseException | None:
    """Run ``call`` in a thread; the exception it raised (None if none).

    Fails the test if it is still running after HANG_TIMEOUT (after opening
    each FIFO for writing until it returns, so that the suite goes on).
    """
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # reported to the test
            outcome["exc"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_TIMEOUT)
    if thread.is_alive():
        for _ in range(400):
            for fifo in fifos:
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(0.05)
            if not thread.is_alive():
                break
        pytest.fail(f"blocked on a FIFO for {HANG_TIMEOUT} s: {fifos}")
    return outcome.get("exc")


def open_and_read(directory: Path, **options: Any) -> Callable[[], object]:
    return lambda: contents(directory, **options)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in this thread: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_refused(exc: BaseException | None, path: Path, kind: str) -> None:
    assert isinstance(exc, CorruptionError), repr(exc)
    assert (exc.path, exc.offset) == (str(path.parent.resolve() / path.name), 0), exc
    assert kind in exc.reason and "not a regular file" in exc.reason, exc.reason


# ============================================================================ 1. symbolic links


@pytest.mark.parametrize("dangling", [False, True], ids=["to a file", "dangling"])
def test_a_lock_symlink_is_refused_and_nothing_is_written_through_it(
    store: tuple[Path, dict[str, Any]], tmp_path: Path, dangling: bool
) -> None:
    directory, expected = store
    target = outside_file(tmp_path)
    before = target.read_bytes()
    if dangling:
        target.unlink()
    lock = directory / "LOCK"
    lock.unlink()
    lock.symlink_to(target)
    with pytest.raises(CorruptionError) as raised:
        contents(directory)
    assert_refused(raised.value, lock, "a symbolic link")
    if dangling:
        assert not os.path.lexists(target), "open created the link's target"
    else:
        assert target.read_bytes() == before
    assert contents(directory, read_only=True)[0] == expected  # read-only never takes the lock


@pytest.mark.parametrize("which", ["newest", "sealed"])
@pytest.mark.parametrize("target_kind", ["a segment moved out", "another file"])
def test_a_segment_symlink_is_refused_by_every_open_and_its_target_is_untouched(
    store: tuple[Path, dict[str, Any]], tmp_path: Path, which: str, target_kind: str
) -> None:
    directory, _expected = store
    segment = segment_paths(directory)[-1 if which == "newest" else 0]
    if target_kind == "another file":
        target = outside_file(tmp_path)
        segment.unlink()
    else:
        target = tmp_path / "outside" / segment.name
        target.parent.mkdir()
        segment.rename(target)
    before = target.read_bytes()
    segment.symlink_to(target)
    for options in ({}, {"read_only": True}, {"recovery": "salvage"}):
        with pytest.raises(CorruptionError) as raised:
            contents(directory, **options)
        assert_refused(raised.value, segment, "a symbolic link")
    code, out, err = run_cli("dump", str(directory))
    assert (code, out) == (2, "")
    assert err.startswith("logstate dump: corrupt data in ") and "symbolic link" in err
    code, out, _err = run_cli("check", str(directory))
    assert code == 1 and f"DAMAGED {directory.resolve() / segment.name}" in out
    assert target.read_bytes() == before
    assert segment.is_symlink()


def test_an_index_snapshot_symlink_is_ignored_and_replaced_not_written_through(
    store: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    directory, expected = store
    snapshot = directory / SNAPSHOT_FILE_NAME
    target = tmp_path / "outside" / "index.snapshot"
    target.parent.mkdir()
    snapshot.rename(target)  # a valid snapshot of this very store
    before = target.read_bytes()
    snapshot.symlink_to(target)
    assert contents(directory, read_only=True) == (expected, False)
    assert snapshot.is_symlink()
    assert contents(directory) == (expected, False)  # its close writes a snapshot
    assert not snapshot.is_symlink() and snapshot.is_file()
    assert target.read_bytes() == before
    assert contents(directory) == (expected, True)


def test_a_storage_directory_reached_through_a_symlink_still_opens(
    store: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    directory, expected = store
    link = tmp_path / "link-to-store"
    link.symlink_to(directory)
    assert contents(link) == (expected, True)
    assert contents(link, read_only=True) == (expected, True)


def test_symlinks_among_temporary_and_aside_files_are_never_written_through(
    store: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A ``*.tmp`` link is removed at open (the link, not its target); a link
    where a torn tail's aside file would go makes it take the next name."""
    directory, expected = store
    target = outside_file(tmp_path)
    before = target.read_bytes()
    (directory / "index.snapshot.tmp").symlink_to(target)
    newest = segment_paths(directory)[-1]
    size = newest.stat().st_size
    with newest.open("ab") as f:
        f.write(b"\x07" * 13)  # a torn write
    aside = Path(f"{newest}.{size}.torn")
    aside.symlink_to(target)
    with LocalFileStorage(directory, **OPTIONS) as s:
        assert s.report.torn_tails == [(str(newest), size, 13, f"{aside}.1")]
        assert {key: s[key] for key in s.get_all_keys()} == expected
    assert not os.path.lexists(directory / "index.snapshot.tmp")
    assert Path(f"{aside}.1").read_bytes() == b"\x07" * 13
    assert target.read_bytes() == before


# ============================================================================ 2. FIFOs, directories


@pytest.mark.parametrize("which", ["newest", "sealed"])
def test_a_fifo_segment_is_refused_without_hanging_by_every_open_and_dump(
    store: tuple[Path, dict[str, Any]], which: str
) -> None:
    directory, _expected = store
    segment = segment_paths(directory)[-1 if which == "newest" else 0]
    segment.unlink()
    os.mkfifo(segment)
    for options in ({}, {"read_only": True}):
        assert_refused(bounded(open_and_read(directory, **options), [segment]), segment, "a FIFO")
    results: list[tuple[int, str, str]] = []
    assert bounded(lambda: results.append(run_cli("dump", str(directory))), [segment]) is None
    ((code, out, err),) = results
    assert (code, out) == (2, "")
    assert err.startswith("logstate dump: ") and "is a FIFO" in err and str(segment) in err


def test_a_fifo_index_snapshot_means_a_scan_and_is_replaced_at_close(
    store: tuple[Path, dict[str, Any]],
) -> None:
    directory, expected = store
    snapshot = directory / SNAPSHOT_FILE_NAME
    snapshot.unlink()
    os.mkfifo(snapshot)
    found: list[tuple[dict[str, Any], bool]] = []
    assert bounded(lambda: found.append(contents(directory, read_only=True)), [snapshot]) is None
    results: list[tuple[int, str, str]] = []
    dump = lambda: results.append(run_cli("dump", "--keys-only", str(directory)))  # noqa: E731
    assert bounded(dump, [snapshot]) is None
    assert results[0][0] == 0 and results[0][1].count("\n") == len(expected)
    assert bounded(lambda: found.append(contents(directory)), [snapshot]) is None
    assert found == [(expected, False), (expected, False)]
    assert snapshot.is_file() and not snapshot.is_fifo()  # the close replaced it
    assert contents(directory) == (expected, True)


@pytest.mark.parametrize("kind", ["FIFO", "directory"])
def test_a_lock_that_is_a_fifo_or_directory_is_refused(
    store: tuple[Path, dict[str, Any]], kind: str
) -> None:
    directory, _expected = store
    lock = directory / "LOCK"
    lock.unlink()
    if kind == "FIFO":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    assert_refused(bounded(open_and_read(directory), [lock]), lock, f"a {kind}")


def test_a_directory_in_place_of_a_segment_is_refused_naming_it(
    store: tuple[Path, dict[str, Any]],
) -> None:
    directory, _expected = store
    segment = segment_paths(directory)[0]
    segment.unlink()
    segment.mkdir()
    for options in ({}, {"read_only": True}):
        with pytest.raises(CorruptionError) as raised:
            contents(directory, **options)
        assert_refused(raised.value, segment, "a directory")


# ============================================================================ 3. crafted snapshots


def snapshot_file(body: bytes) -> bytes:
    """A snapshot file around ``body`` with a correct header, size and checksum."""
    return (
        SNAPSHOT_HEADER.pack(
            SNAPSHOT_MAGIC,
            MARSHAL_SNAPSHOT_VERSION,
            sys.version_info[0],
            sys.version_info[1],
            marshal.version,
            0,
            len(body),
            crc32c(body),
        )
        + body
    )


def rewrite_snapshot(directory: Path, change: Callable[[Snapshot], Snapshot]) -> None:
    path = directory / SNAPSHOT_FILE_NAME
    path.write_bytes(encode_snapshot(change(decode_snapshot(path.read_bytes()))))


def with_location(snap: Snapshot, key: str, location: Any) -> Snapshot:
    """``snap`` with root ``key`` at ``location``, live bytes adjusted to add up."""
    root = {**snap.namespaces[""], key: location}
    namespaces = {**snap.namespaces, "": root}
    live = sum(location_size(loc) for index in namespaces.values() for loc in index.values())
    return snap._replace(namespaces=namespaces, live_bytes=live)


def a_location(snap: Snapshot, kind: str, sealed: bool = True) -> tuple[str, Any]:
    """A root key and its location: a plain record, or a value in a zstd group."""
    first = snap.segments[0].number
    for key, loc in snap.namespaces[""].items():
        if kind == "compressed" and type(loc) is tuple:
            return key, loc
        if (
            kind == "record"
            and type(loc) is int
            and loc & 3 == KIND_RECORD
            and (unpack_location(loc)[0] == first) == sealed
        ):
            return key, loc
    raise AssertionError(f"no {kind} location in the store")


def _moved(snap: Snapshot, sealed: bool = True, **fields: int) -> Snapshot:
    """A location with some fields changed (segment, offset, size, kind)."""
    key, loc = a_location(snap, "record", sealed)
    number, offset, size, loc_kind = unpack_location(loc)
    parts = {"segment": number, "offset": offset, "size": size, "kind": loc_kind, **fields}
    return with_location(snap, key, pack_location(*parts.values()))


def _first_mark_size(snap: Snapshot) -> int:
    return snap.segments[0].size


def _group(snap: Snapshot, **fields: int) -> Snapshot:
    key, loc = a_location(snap, "compressed")
    names = ("segment", "record_offset", "record_size", "op_offset", "op_size", "share")
    parts = dict(zip(names, loc, strict=True))
    parts.update(fields)
    return with_location(snap, key, tuple(parts.values()))


OUT_OF_BOUNDS: dict[str, Callable[[Snapshot], Snapshot]] = {
    "end one byte past its segment": lambda s: _moved(s, offset=_first_mark_size(s) - 40, size=41),
    # past the newest segment's size, but within the (larger) sealed one's
    "offset past the newest segment": lambda s: _moved(
        s, sealed=False, offset=s.segments[-1].size + 8
    ),
    "offset inside the segment header": lambda s: _moved(s, offset=4),
    "size below the smallest record": lambda s: _moved(s, size=fmt.RECORD_OVERHEAD - 1),
    "size below the smallest group operation": lambda s: _moved(
        s, size=fmt.GROUP_OP_SIZE - 1, kind=KIND_GROUP_OP
    ),
    "kind 2": lambda s: _moved(s, kind=2),
    "kind 3": lambda s: _moved(s, kind=3),
    "compressed group past its segment": lambda s: _group(s, record_size=1 << 20),
    "compressed group inside the header": lambda s: _group(s, record_offset=3),
    "compressed share larger than its record": lambda s: _group(s, share=1 << 30),
    "compressed operation below the smallest": lambda s: _group(s, op_size=2),
    "checkpoint past its segment": lambda s: s._replace(
        checkpoint=(*s.checkpoint[:2], 1 << 20, *s.checkpoint[3:])
    ),
    "live bytes that do not add up": lambda s: s._replace(live_bytes=s.live_bytes + 1),
    "negative live bytes": lambda s: s._replace(live_bytes=-1),
    "a key UTF-8 cannot encode": lambda s: with_location(
        s, "bad\udc80key", a_location(s, "record")[1]
    ),
}


def test_the_store_has_the_locations_the_crafted_cases_alter(
    store: tuple[Path, dict[str, Any]],
) -> None:
    directory, _expected = store
    snap = decode_snapshot((directory / SNAPSHOT_FILE_NAME).read_bytes())
    assert len(snap.segments) >= 2 and type(snap.checkpoint) is tuple
    assert snap.segments[0].size > snap.segments[-1].size + 8 + 200
    a_location(snap, "record", sealed=True)
    a_location(snap, "compressed")
    for case in OUT_OF_BOUNDS.values():
        case(snap)


@pytest.mark.parametrize("case", OUT_OF_BOUNDS)
def test_a_snapshot_location_or_size_out_of_bounds_means_a_full_scan(
    store: tuple[Path, dict[str, Any]], case: str
) -> None:
    directory, expected = store
    rewrite_snapshot(directory, OUT_OF_BOUNDS[case])
    assert contents(directory, read_only=True) == (expected, False)
    code, _out, _err = run_cli("check", str(directory))
    assert code == 0  # check reports snapshot differences only if open would use it


def test_malformed_marshal_data_that_raises_system_error_means_a_full_scan(
    store: tuple[Path, dict[str, Any]],
) -> None:
    directory, expected = store
    code = bytearray(marshal.dumps(compile("x = 1", "crafted", "exec")))
    code[1:5] = (0xFFFFFFFF).to_bytes(4, "little")  # argcount: marshal raises SystemError
    with pytest.raises(SystemError):
        marshal.loads(bytes(code))
    (directory / SNAPSHOT_FILE_NAME).write_bytes(snapshot_file(bytes(code)))
    with LocalFileStorage(directory, read_only=True) as s:
        assert not s.report.snapshot_used
        assert "SystemError" in s.report.snapshot_refused
        assert {key: s[key] for key in s.get_all_keys()} == expected
    code_, out, err = run_cli("dump", "--keys-only", str(directory))
    assert (code_, err, out.count("\n")) == (0, "", len(expected))


@pytest.mark.parametrize("seq", [2**64 - 1, 2**63, -1], ids=["2**64-1", "2**63", "-1"])
def test_a_snapshot_sequence_number_without_room_to_write_means_a_full_scan(
    store: tuple[Path, dict[str, Any]], seq: int
) -> None:
    directory, expected = store
    rewrite_snapshot(directory, lambda s: s._replace(seq=seq))
    with LocalFileStorage(directory, **OPTIONS) as s:
        assert not s.report.snapshot_used
        assert "sequence number" in s.report.snapshot_refused
        s["after"] = "a write works"
        expected["after"] = "a write works"
    assert contents(directory) == (expected, True)


def test_check_reports_a_snapshot_location_at_an_older_record_of_the_key(
    tmp_path: Path,
) -> None:
    """In bounds and a record of the right key: only a full scan tells it is stale."""
    directory = tmp_path / "store"
    with LocalFileStorage(directory, **OPTIONS) as s:
        # (values long enough that the store's snapshot, raw or marshal, is
        # below its segments' size: one is written)
        s["k"] = "old value" * 8
        s["other"] = 1
        s.flush()
        old = s._engine.keydir.namespaces[""]["k"]
        s["k"] = "new value" * 8  # the same size
        new = s._engine.keydir.namespaces[""]["k"]
    assert type(old) is int and type(new) is int
    assert location_size(old) == location_size(new)
    rewrite_snapshot(directory, lambda snap: with_location(snap, "k", old))
    with LocalFileStorage(directory, read_only=True) as s:
        assert s.report.snapshot_used and s["k"] == "old value" * 8  # what open cannot tell
    code, out, err = run_cli("check", str(directory))
    assert (code, err) == (1, "")
    lines = [line for line in out.splitlines() if line.startswith("DAMAGED ")]
    assert lines == [
        f"DAMAGED {directory.resolve() / SNAPSHOT_FILE_NAME}: key 'k' of the root storage: "
        f"the snapshot gives segment-0000000001.seg offset {unpack_location(old)[1]} "
        f"({location_size(old)}-byte record), a full scan segment-0000000001.seg offset "
        f"{unpack_location(new)[1]} ({location_size(new)}-byte record)"
    ]
    assert "index.snapshot: 1 difference(s) from a full scan" in out
    assert out.strip().splitlines()[-1].endswith(", 1 problem(s)")


def test_check_reports_every_snapshot_field_that_differs_from_a_full_scan(
    store: tuple[Path, dict[str, Any]],
) -> None:
    directory, _expected = store
    snap = decode_snapshot((directory / SNAPSHOT_FILE_NAME).read_bytes())
    (key_a, loc_a), (key_b, loc_b) = list(snap.namespaces[""].items())[:2]

    def change(s: Snapshot) -> Snapshot:
        root = dict(s.namespaces[""])
        root[key_a], root[key_b] = loc_b, loc_a  # two keys swapped
        del root["last"]  # a key missing
        namespaces = {**s.namespaces, "": root, "ghost": {}}  # a sub-storage added
        live = sum(location_size(x) for index in namespaces.values() for x in index.values())
        return s._replace(namespaces=namespaces, seq=s.seq - 1, live_bytes=live)

    rewrite_snapshot(directory, change)
    code, out, _err = run_cli("check", str(directory))
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith("DAMAGED ")]
    subjects = [line.split(": ")[1] for line in lines]
    assert subjects == [
        f"key {key_a!r} of the root storage",
        f"key {key_b!r} of the root storage",
        "key 'last' of the root storage",
        "sub-storage 'ghost'",
        "the sequence number",
        "the live bytes",
    ]
    assert ", a full scan absent" in lines[3] and "the snapshot gives absent" in lines[2]
    assert f"the snapshot gives {snap.seq - 1}, a full scan {snap.seq}" in lines[4]


def test_check_reports_an_expiry_time_the_snapshot_changed(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    with LocalFileStorage(directory, sync="none") as s:
        for i in range(40):
            s.set(f"k{i}", "v" * 50, ttl=3600)
    snap = decode_snapshot((directory / SNAPSHOT_FILE_NAME).read_bytes())
    deadline = snap.expiring[""]["k1"]
    rewrite_snapshot(
        directory,
        lambda s: s._replace(expiring={"": {**s.expiring[""], "k1": deadline + 60.0}}),
    )
    code, out, _err = run_cli("check", str(directory))
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith("DAMAGED ")]
    assert lines == [
        f"DAMAGED {directory.resolve() / SNAPSHOT_FILE_NAME}: the expiry of key 'k1' of the "
        f"root storage: the snapshot gives expires at {deadline + 60.0!r} s, a full scan "
        f"expires at {deadline!r} s"
    ]


def test_check_of_a_clean_store_says_the_snapshot_matches_a_full_scan(
    store: tuple[Path, dict[str, Any]],
) -> None:
    directory, _expected = store
    code, out, _err = run_cli("check", str(directory))
    assert code == 0 and "index.snapshot: matches a full scan\n" in out
    (directory / SNAPSHOT_FILE_NAME).write_bytes(b"not a snapshot")
    code, out, _err = run_cli("check", str(directory))
    assert code == 0 and "index.snapshot: not compared: not used by open (" in out


def test_the_snapshot_comparison_is_skipped_when_a_writer_appended_between_the_opens(
    store: tuple[Path, dict[str, Any]],
) -> None:
    directory, _expected = store
    with LocalFileStorage(directory, read_only=True) as used, pytest.raises(ValueError):
        used.compare_snapshot_with_scan()  # not a full scan
    with LocalFileStorage(
        directory, read_only=True, use_snapshot=False, recovery="salvage"
    ) as scan:
        assert scan.compare_snapshot_with_scan() == (True, "", [])
        with LocalFileStorage(directory, **OPTIONS) as writer:
            writer["appended"] = "after the scan"
        result = scan.compare_snapshot_with_scan()
    assert (result.compared, result.differences) == (False, [])
    assert "run it again" in result.note


@pytest.mark.parametrize("kind", ["record", "group operation"])
def test_compaction_refuses_a_snapshot_location_at_another_keys_record(
    tmp_path: Path, kind: str
) -> None:
    """In bounds, with a valid CRC, but another key's: a compaction proves every
    record it copies is its key's, so it never rewrites "b"'s value as "a"'s (or
    resurrects it under its own key at the next replay); nothing changes."""
    directory = tmp_path / "store"
    with LocalFileStorage(directory, **OPTIONS) as s:
        if kind == "record":
            s["a"] = "value of a"
            s["b"] = "value of b"
        else:
            with s.batch() as batch:
                batch.set("a", "value of a")
                batch.set("b", "value of b")
        for i in range(40):  # enough data for the snapshot to be written
            s[f"pad{i}"] = "x" * 200
        b_location = s._engine.keydir.namespaces[""]["b"]
    rewrite_snapshot(directory, lambda snap: with_location(snap, "a", b_location))
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix == ".seg"}
    with LocalFileStorage(directory, **OPTIONS) as s:
        assert s.report.snapshot_used
        with pytest.raises(CorruptionError, match="another key's record"):
            s.compact()
    after = {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix == ".seg"}
    assert {name: after.get(name) for name in before} == before  # no segment rewritten
    scanned, _ = contents(directory, use_snapshot=False)
    assert scanned["a"] == "value of a" and scanned["b"] == "value of b"
