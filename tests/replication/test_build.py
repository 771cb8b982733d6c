"""Building a store from a snapshot container and records (``logstate/replication/_build.py``).

The promises checked:

- capture -> container -> build gives a store whose every key of every
  sub-storage holds the same bytes (``get_encoded``: value and expiry time,
  bit for bit) and whose checkpoint and seq are the source's, over writes of
  every kind and compactions;
- the exact records committed after the capture (commit listener), appended
  by the build, give the source's state at its newest seq;
- a capture taken while a writer writes and compactions run builds the
  source's state at the capture's seq: the same as a store built from the
  commit records 1..seq alone (no snapshot), and with the records after it,
  the source's final state; a capture during a compaction's rename and
  switch too;
- a record with the wrong seq (ValueError), a bad frame, CRC or body, or a
  compacted record (CorruptionError) fails the build; a target that holds
  anything is refused (StorageExistsError); on every failure the target is
  as it was and no temporary directory is left.

    python -m pytest tests/replication/test_build.py -q
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from logstate import LocalFileStorage
from logstate._errors import CorruptionError, StorageExistsError
from logstate._filenames import COMPACT_TMP_SUFFIX, parse_segment_file_name
from logstate._format import REC_COMPACTED, REC_SET, encode_compacted_record, encode_record
from logstate._fs import FileSystem
from logstate.replication._build import BuildResult, build_store, segments_last_seq

from ..faultfs import open_storage
from .stores import Clock, Records, fill, more_changes, open_store, snapshot_of, store_state


def leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".restoring-" in n)


def built_state(path: Path, clock: Clock) -> tuple[dict[str, object], int]:
    """The state of the store at ``path`` (checked first), and its seq."""
    with open_store(path, clock) as store:
        store._engine._check()
        return store_state(store), store._engine.appender.seq


# ---------------------------------------------------------------------- snapshot only
def test_a_store_built_from_a_snapshot_equals_its_source(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path / "src", clock) as source:
        fill(source, clock)
        seq = snapshot_of(source, tmp_path / "snap")
        expected = store_state(source)
        assert source.stats()["segments"] > 2
    result = build_store(str(tmp_path / "dst"), str(tmp_path / "snap"), [], None, snapshot_seq=seq)
    assert result.last_seq == seq and result.records == 0
    state, built_seq = built_state(tmp_path / "dst", clock)
    assert state == expected
    assert built_seq == seq
    assert expected["checkpoint"] == {"offset": 41}
    assert expected[""]["lives"] is not None and "expires" not in expected[""]
    assert not leftovers(tmp_path)
    assert not (tmp_path / "dst" / "replication.json").exists()


def test_the_records_go_to_a_new_segment_after_the_snapshots(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path / "src", clock) as source:
        fill(source, clock)
        records = Records(source)
        seq = snapshot_of(source, tmp_path / "snap")
        snapshot_segments = sorted(os.listdir(tmp_path / "src"))
        source["one more"] = 1
        source["two more"] = 2
    result = build_store(str(tmp_path / "dst"), str(tmp_path / "snap"), records.between(seq), None)
    names = sorted(os.listdir(tmp_path / "dst"))
    snapshot_numbers = [parse_segment_file_name(n) for n in snapshot_segments]
    numbers = [parse_segment_file_name(n) for n in names]
    assert numbers[:-1] == [n for n in snapshot_numbers if n is not None]
    assert numbers[-1] == max(n for n in numbers[:-1] if n is not None) + 1
    assert result == BuildResult(
        seq + 2, 2, sum((tmp_path / "dst" / n).stat().st_size for n in names)
    )


# ---------------------------------------------------------------------- with records
def test_records_committed_after_the_capture_bring_the_build_to_the_source(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path / "src", clock) as source:
        fill(source, clock)
        records = Records(source)
        seq = snapshot_of(source, tmp_path / "snap")
        more_changes(source, clock)
        expected = store_state(source)
        last = source._engine.appender.seq
    after = records.between(seq)
    assert len(after) == last - seq > 50
    state_file = {"version": 1, "acked_seq": last, "writer": "ab" * 16}
    result = build_store(str(tmp_path / "dst"), str(tmp_path / "snap"), iter(after), state_file)
    assert result.last_seq == last and result.records == len(after)
    state, built_seq = built_state(tmp_path / "dst", clock)
    assert state == expected
    assert built_seq == last
    assert expected["checkpoint"] == {"offset": 99}
    assert json.loads((tmp_path / "dst" / "replication.json").read_text()) == state_file


def test_records_alone_build_the_store_without_a_snapshot(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path / "src", clock) as source:
        records = Records(source)
        fill(source, clock)
        more_changes(source, clock)
        expected = store_state(source)
    result = build_store(str(tmp_path / "dst"), None, records.between(0), None, segment_size=8192)
    assert result.records == len(records.by_seq)
    assert len(os.listdir(tmp_path / "dst")) > 3  # rolled at segment_size
    assert built_state(tmp_path / "dst", clock) == (expected, result.last_seq)


def test_nothing_at_all_builds_an_empty_store(tmp_path: Path) -> None:
    result = build_store(str(tmp_path / "a" / "dst"), None, [], None)
    assert result == BuildResult(0, 0, 24)
    assert os.listdir(tmp_path / "a" / "dst") == ["segment-0000000001.seg"]
    with LocalFileStorage(tmp_path / "a" / "dst") as store:
        assert len(store) == 0
        store["k"] = 1


def test_an_empty_target_directory_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "dst").mkdir()
    build_store(str(tmp_path / "dst"), None, [encode_record(REC_SET, 1, b"\0\0\1\0k\4\1")], None)
    with LocalFileStorage(tmp_path / "dst") as store:
        assert store["k"] == 1


# ---------------------------------------------------------------------- refused
SourceRecords = tuple[Path, int, list[bytes]]


@pytest.fixture
def source_records(tmp_path: Path) -> SourceRecords:
    """(container, its seq, the records after it) of a filled store."""
    clock = Clock()
    with open_store(tmp_path / "src", clock) as source:
        fill(source, clock)
        records = Records(source)
        seq = snapshot_of(source, tmp_path / "snap")
        more_changes(source, clock)
    return tmp_path / "snap", seq, records.between(seq)


def flipped(record: bytes, at: int) -> bytes:
    return record[:at] + bytes([record[at] ^ 0x40]) + record[at + 1 :]


def refused(tmp_path: Path, target: Path, container: Path | None, records: list[bytes]) -> str:
    """Build, which must fail; the target and the directory are as before. The error text."""
    before = sorted(os.listdir(tmp_path))
    with pytest.raises((CorruptionError, ValueError)) as failure:
        build_store(str(target), None if container is None else str(container), records, {})
    assert sorted(os.listdir(tmp_path)) == before
    assert not leftovers(tmp_path)
    return str(failure.value)


def test_a_record_with_the_wrong_seq_is_refused(
    tmp_path: Path, source_records: SourceRecords
) -> None:
    container, seq, after = source_records
    message = refused(tmp_path, tmp_path / "dst", container, after[1:])
    assert f"record 0 of the records has seq {seq + 2}, expected {seq + 1}" in message
    message = refused(tmp_path, tmp_path / "dst", container, [*after[:5], after[4], *after[5:]])
    assert f"record 5 of the records has seq {seq + 5}, expected {seq + 6}" in message
    message = refused(tmp_path, tmp_path / "dst", None, after)  # no snapshot: seq 1 first
    assert "expected 1" in message


@pytest.mark.parametrize("at", [0, 4, 8, 12, 20, -1])
def test_a_damaged_record_is_refused(
    tmp_path: Path, source_records: SourceRecords, at: int
) -> None:
    container, _seq, after = source_records
    damaged = list(after)
    damaged[7] = flipped(damaged[7], at % len(damaged[7]))
    offset = sum(map(len, after[:7]))
    with pytest.raises(CorruptionError) as failure:
        build_store(str(tmp_path / "dst"), str(container), damaged, None)
    assert failure.value.offset >= offset and "record 7 of the records" in failure.value.reason
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path)


def test_a_torn_or_padded_or_misplaced_record_is_refused(
    tmp_path: Path, source_records: SourceRecords
) -> None:
    container, seq, after = source_records
    for bad, reason in [
        (after[0][:-1], "extends past the end"),
        (after[0] + b"\0", "1 bytes after the record"),
        (b"", "empty"),
        (encode_compacted_record(seq + 1, 1), "compacted record"),
        (encode_record(REC_SET, seq + 1, b"\xff\xff"), "namespace overruns"),
    ]:
        assert reason in refused(tmp_path, tmp_path / "dst", container, [bad, *after[1:]])
    assert REC_COMPACTED == 8


def test_a_target_that_holds_anything_is_refused(
    tmp_path: Path, source_records: SourceRecords
) -> None:
    container, _seq, after = source_records
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    for target in (tmp_path / "full", tmp_path / "file"):
        with pytest.raises(StorageExistsError) as failure:
            build_store(str(target), str(container), after, None)
        assert isinstance(failure.value, FileExistsError)
        assert failure.value.path == str(target) and str(target) in str(failure.value)
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    assert (tmp_path / "file").read_text() == "a file"
    assert not leftovers(tmp_path)


def test_a_snapshot_seq_the_container_does_not_hold_is_refused(
    tmp_path: Path, source_records: SourceRecords
) -> None:
    container, seq, after = source_records
    with pytest.raises(CorruptionError, match=f"holds seq {seq}, not {seq - 1}"):
        build_store(str(tmp_path / "dst"), str(container), after, None, snapshot_seq=seq - 1)
    with pytest.raises(ValueError, match="without a snapshot container"):
        build_store(str(tmp_path / "dst"), None, after, None, snapshot_seq=seq)
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path)


def test_segments_last_seq_is_the_largest_record_seq(tmp_path: Path) -> None:
    clock = Clock()
    with open_store(tmp_path / "src", clock) as source:
        fill(source, clock)
        source.compact()  # the newest records are a compaction output's
        seq = source._engine.appender.seq
    assert segments_last_seq(str(tmp_path / "src")) == seq
    assert segments_last_seq(str(tmp_path)) == 0


# ---------------------------------------------------------------------- concurrency
def random_writes(store: LocalFileStorage, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    subs = [store.get_or_create_sub_storage(n) for n in ("p", "q")]
    handles = [store, *subs]
    while not stop.is_set():
        handle = rng.choice(handles)
        roll = rng.random()
        key = f"k{rng.randrange(300)}"
        if roll < 0.6:
            handle[key] = rng.randbytes(rng.randrange(1, 200))
        elif roll < 0.85:
            handle.remove(key)
        elif roll < 0.95:
            with handle.batch() as batch:
                for i in range(rng.randrange(1, 20)):
                    batch.set(f"b{i}", i)
        else:
            handle.set(key, "ttl", ttl=3600)
    for sub in subs:
        sub.close()


def compactions(store: LocalFileStorage, stop: threading.Event) -> None:
    while not stop.is_set():
        store.compact()
        time.sleep(0.002)


def test_captures_during_writes_and_compactions_build_the_store_at_their_seq(
    tmp_path: Path,
) -> None:
    clock = Clock()
    snaps: list[tuple[int, Path]] = []
    with open_store(tmp_path / "src", clock) as source:
        records = Records(source)
        stop = threading.Event()
        threads = [
            threading.Thread(target=random_writes, args=(source, stop, 7)),
            threading.Thread(target=compactions, args=(source, stop)),
        ]
        for thread in threads:
            thread.start()
        try:
            for i in range(4):
                time.sleep(0.15)
                snaps.append((snapshot_of(source, tmp_path / f"snap{i}"), tmp_path / f"snap{i}"))
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        source.flush()
        expected = store_state(source)
        last = source._engine.appender.seq
    assert sorted(records.by_seq) == list(range(1, last + 1))
    assert snaps[0][0] > 0 and len({seq for seq, _ in snaps}) == len(snaps)
    for i, (seq, container) in enumerate(snaps):
        build_store(str(tmp_path / f"at{i}"), str(container), [], None, snapshot_seq=seq)
        build_store(str(tmp_path / f"log{i}"), None, records.between(0, seq), None)
        at_seq = built_state(tmp_path / f"at{i}", clock)
        assert at_seq == built_state(tmp_path / f"log{i}", clock)
        assert at_seq[1] == seq
        build_store(str(tmp_path / f"all{i}"), str(container), records.between(seq), None)
        assert built_state(tmp_path / f"all{i}", clock) == (expected, last)


class PausedRename(FileSystem):
    """Holds a compaction's rename of its output: before it (``after=False``) or after it."""

    def __init__(self, after: bool) -> None:
        self.after = after
        self.armed = False  # (fill's own compaction runs through)
        self.reached = threading.Event()
        self.go_on = threading.Event()

    def rename(self, src: str, dst: str) -> None:
        if not (self.armed and src.endswith(COMPACT_TMP_SUFFIX)):
            return super().rename(src, dst)
        if self.after:
            super().rename(src, dst)
        self.reached.set()
        assert self.go_on.wait(10)
        if not self.after:
            super().rename(src, dst)


@pytest.mark.parametrize("after", [False, True], ids=["before-rename", "after-rename"])
def test_a_capture_during_a_compactions_rename_builds_the_store(
    tmp_path: Path, after: bool
) -> None:
    # The segment renamed over must have no descriptor of its own (sealed at
    # open), so that only its name could be opened: a compaction of an
    # expired compaction output, with nothing written since the last one.
    clock = Clock()
    with open_store(tmp_path / "src", clock) as source:
        fill(source, clock)
        for i in range(100):
            source.set(f"t{i}", "expiring " * 5, ttl=10)
        source.compact()
    fs = PausedRename(after)
    source = open_storage(fs, tmp_path / "src", sync="none", segment_size=4096, clock=clock)
    try:
        records = Records(source)
        clock.now_s += 20
        fs.armed = True
        compaction = threading.Thread(target=source.compact)
        compaction.start()
        assert fs.reached.wait(10)
        engine = source._engine
        pending = engine.switch.pending
        assert pending is not None and engine.segments.segments[pending.output.number].fd == -1
        source["during"] = "the rename"
        seq = snapshot_of(source, tmp_path / "snap")
        source["after"] = "the capture"
        fs.go_on.set()
        compaction.join()
        expected = store_state(source)
    finally:
        fs.go_on.set()
        source.close()
    assert "t1" not in expected[""] and expected[""]["during"] is not None
    build_store(str(tmp_path / "dst"), str(tmp_path / "snap"), records.between(seq), None)
    assert built_state(tmp_path / "dst", clock)[0] == expected
