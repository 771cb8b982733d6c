"""Expiry: ``set(key, value, ttl=seconds)`` on LocalFileStorage, Batch and InMemoryStorage.

An expired key reads as missing for ``get``, ``in``, ``len`` and every
listing; compaction drops it and ``stats`` counts it dead; a clock set back
never makes it live again (within a process, across a clean close, and
across a crash as far as the store recorded the time: see
docs/durability.md); the expiry survives reopen with and without the index
snapshot, and through a zstd-compressed group. The clock is injected.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from logstate import InMemoryStorage, LocalFileStorage, _rewrite
from logstate._format import SEGMENT_HEADER, decode_segment_header
from logstate._snapshot import decode_snapshot, encode_snapshot
from logstate._values import TAG_EXPIRES, decode_value, encode_value, expiring_value
from logstate.cli import main
from tests.interrupts import Injector

from .helpers import kill

DATA_V1 = Path(__file__).parent / "data" / "store-v1"


class Clock:
    """A settable clock (seconds)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def visible(s: LocalFileStorage) -> dict[str, Any]:
    """Everything every read path shows, checked to agree."""
    items = dict(s.items())
    assert set(s.get_all_keys()) == set(items) == set(s)
    assert list(s.keys()) == sorted(items)
    assert len(s) == len(items) == len(s.keys()) == len(s.keys(prefix=""))
    for key in items:
        assert key in s and s.contains_key(key) and s.get(key, "missing") == items[key]
    return items


def test_a_key_reads_as_missing_everywhere_once_its_ttl_has_passed(tmp_path: Path) -> None:
    clock = Clock()
    with LocalFileStorage(tmp_path / "s", clock=clock, sync="none") as s:
        s.set("short", "a", ttl=10)
        s.set("long", "b", ttl=100)
        s["plain"] = "c"
        assert visible(s) == {"long": "b", "plain": "c", "short": "a"}
        clock.now += 9.999
        assert "short" in s
        clock.now += 0.001  # the deadline itself: expired
        assert visible(s) == {"long": "b", "plain": "c"}
        assert s.get("short") is None and "short" not in list(s.keys())
        with pytest.raises(KeyError):
            s["short"]
        assert len(s.keys(start="m")) == 1  # only "plain"
        assert s.get_encoded("short") is None
        with pytest.raises(KeyError):
            del s["short"]  # an expired key is not there to delete
        s._check()


def test_a_set_without_ttl_clears_the_expiry_and_a_set_with_one_adds_it(tmp_path: Path) -> None:
    clock = Clock()
    with LocalFileStorage(tmp_path / "s", clock=clock, sync="none") as s:
        s.set("k", 1, ttl=5)
        s.set("k", 2)  # no ttl: never expires
        s["p"] = 1
        s.set("p", 2, ttl=5)
        with s.batch() as b:
            b.set("g", 1, ttl=5)
            b.set("g", 2)  # the later op of the group wins
            b.set("h", 1, ttl=5)
        clock.now += 60
        assert visible(s) == {"k": 2, "g": 2}
        s._check()


def test_a_clock_set_back_never_makes_an_expired_key_live_again(tmp_path: Path) -> None:
    clock = Clock()
    directory = tmp_path / "s"
    with LocalFileStorage(directory, clock=clock, sync="none") as s:
        for i in range(100):  # enough bytes for the close to write an index snapshot
            s[f"filler{i}"] = "x" * 50
        s.set("k", "v", ttl=10)
        clock.now += 20
        assert "k" not in s
        clock.now -= 3600  # NTP steps the clock back an hour
        assert "k" not in s and s.get("k") is None and len(s) == 100
    # a clean close saved the newest time seen (in the snapshot): still expired
    with LocalFileStorage(directory, clock=clock, sync="none") as s:
        assert s.report.snapshot_used
        assert "k" not in s and len(s) == 100
        s.set("fresh", 1, ttl=30)  # counted from the newest time seen, not the clock
        clock.now += 3600  # time stands at the newest seen until the clock is past it
        assert "fresh" in s
        clock.now += 10 + 30
        assert "fresh" not in s


def test_after_a_crash_the_newest_expiring_write_bounds_the_clock(tmp_path: Path) -> None:
    """No snapshot after a kill: the clock floor is the newest time written with a value."""
    clock = Clock(1000.0)
    directory = tmp_path / "s"
    s = LocalFileStorage(directory, clock=clock, sync="none")
    s.set("k", "v", ttl=10)  # written at 1000, expires at 1010
    clock.now = 1020.0
    s.set("later", "w", ttl=1000)  # written at 1020
    kill(s)
    clock.now = 1005.0  # set back before k's deadline
    with LocalFileStorage(directory, clock=clock, sync="none") as s:
        assert not s.report.snapshot_used
        assert "k" not in s and s.get("later") == "w"


@pytest.mark.parametrize("use_snapshot", [True, False])
def test_expiry_survives_a_reopen_with_and_without_the_snapshot(
    tmp_path: Path, use_snapshot: bool
) -> None:
    clock = Clock()
    directory = tmp_path / "s"
    with LocalFileStorage(directory, clock=clock, sync="none") as s:
        s.set("k", 1, ttl=10)
        sub = s.get_or_create_sub_storage("sub")
        sub.set("j", 2, ttl=20)
        sub.close()
        s["plain"] = "x" * 2000  # enough bytes for the close to write an index snapshot
    with LocalFileStorage(directory, clock=clock, use_snapshot=use_snapshot) as s:
        assert s.report.snapshot_used is use_snapshot
        sub = s.get_or_create_sub_storage("sub")
        assert visible(s) == {"k": 1, "plain": "x" * 2000} and visible(sub) == {"j": 2}
        clock.now += 15
        assert visible(s) == {"plain": "x" * 2000} and visible(sub) == {"j": 2}
        clock.now += 10
        assert visible(sub) == {}
        sub.close()
        s._check()


def test_expiry_inside_a_compressed_group_is_found_by_a_scan(tmp_path: Path) -> None:
    clock = Clock()
    directory = tmp_path / "s"
    s = LocalFileStorage(directory, clock=clock, compress_min_size=0, sync="none")
    with s, s.batch() as b:
        for i in range(20):
            b.set(f"k{i:02d}", "x" * 100, ttl=10 if i % 2 else None)
    with LocalFileStorage(directory, clock=clock, use_snapshot=False) as s:
        assert len(s) == 20
        clock.now += 11
        assert sorted(s) == [f"k{i:02d}" for i in range(0, 20, 2)]
        s._check()


def test_compaction_drops_expired_records_and_stats_count_them_dead(tmp_path: Path) -> None:
    clock = Clock()
    directory = tmp_path / "s"
    with LocalFileStorage(directory, clock=clock, sync="none", auto_compact=False) as s:
        for i in range(200):
            s.set(f"e{i:03d}", "v" * 200, ttl=10)
        s.set("kept", "k", ttl=1000)
        s["plain"] = 1
        before = s.stats()
        assert before["keys"] == 202 and before["expiring_keys"] == 201
        clock.now += 11
        expired = s.stats()
        assert expired["keys"] == 2 and expired["expiring_keys"] == 1
        assert expired["dead_bytes"] - before["dead_bytes"] > 200 * 200  # the expired records
        assert expired["total_bytes"] == before["total_bytes"]
        result = s.compact()
        assert result.output is not None and result.bytes_after < result.bytes_before
        after = s.stats()
        assert after["keys"] == 2 and after["total_bytes"] < 10_000
        assert s._engine.keydir.key_count() == 2  # gone from the index, not only hidden
        s._check()
        assert visible(s) == {"kept": "k", "plain": 1}
    clock.now -= 5  # set back: what compaction dropped is gone for good
    with LocalFileStorage(directory, clock=clock, use_snapshot=False) as s:
        assert visible(s) == {"kept": "k", "plain": 1}
        clock.now += 2000
        assert visible(s) == {"plain": 1}


def test_expired_bytes_start_a_background_compaction(tmp_path: Path) -> None:
    clock = Clock()
    options: dict[str, Any] = {"segment_size": 64 * 1024, "compact_min_size": 0}
    with LocalFileStorage(tmp_path / "s", clock=clock, sync="none", **options) as s:
        for i in range(100):  # about 100 KiB, all live until they expire
            s.set(f"e{i:03d}", "v" * 1000, ttl=10)
        s._engine.wait_for_background_compaction()
        assert s._engine.keydir.key_count() == 100  # nothing dead yet: nothing compacted
        clock.now += 11
        for i in range(70):  # rolls a segment: the trigger sees the expired bytes as dead
            s[f"p{i:03d}"] = "w" * 1000
        s._engine.wait_for_background_compaction()
        s._check()
        assert s._engine.keydir.key_count() < 170  # expired keys dropped from the index
        assert len(s) == 70


def test_a_key_written_again_during_compaction_is_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drop is conditional: only where the index still points at the expired record."""
    clock = Clock()
    with LocalFileStorage(tmp_path / "s", clock=clock, sync="none", auto_compact=False) as s:
        s.set("k", "old", ttl=1)
        s.set("j", "old", ttl=1)
        s["x"] = 1
        clock.now += 5
        original = _rewrite.write_output

        def write_output(*args: Any, **kwargs: Any) -> Any:
            s["k"] = "new"  # written after the plan listed k as expired, before the switch
            return original(*args, **kwargs)

        monkeypatch.setattr("logstate._compact.write_output", write_output)
        s.compact()
        assert s["k"] == "new" and "j" not in s
        assert s._engine.keydir.key_count() == 2  # j dropped, k kept
        s._check()


def test_batch_and_in_memory_storage_take_a_ttl(tmp_path: Path) -> None:
    clock = Clock()
    directory = tmp_path / "s"
    with LocalFileStorage(directory, clock=clock, sync="none") as s:
        m = InMemoryStorage(s)
        m.set("short", {"n": 1}, ttl=10)  # a mutable value, watched
        m.set("long", "l", ttl=100)
        m["plain"] = "p"
        m["short"]["n"] = 2  # mutated in place: flushed with its expiry
        m.flush(checkpoint=1)
        assert s.get("short") == {"n": 2}
        m2 = InMemoryStorage(s)  # loaded with the expiry times
        clock.now += 11
        for view in (m, m2):
            assert dict(view.items()) == {"long": "l", "plain": "p"}
            assert "short" not in view and len(view) == 2 and view.get("short") is None
        assert dict(s.items()) == {"long": "l", "plain": "p"}
        m2.flush()  # nothing to write for an expired key
        clock.now += 100
        assert dict(m2.items()) == {"plain": "p"} and dict(s.items()) == {"plain": "p"}


def test_in_memory_storage_without_backing_has_its_own_clock() -> None:
    clock = Clock()
    m = InMemoryStorage(clock=clock)
    m.set("k", 1, ttl=1)
    assert m["k"] == 1
    clock.now += 1
    assert "k" not in m and len(m) == 0
    clock.now -= 100
    assert "k" not in m
    with pytest.raises(TypeError, match="clock"):
        InMemoryStorage(clock=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ttl", "error"),
    [("1", TypeError), (True, TypeError), (0, ValueError), (-1, ValueError),
     (float("nan"), ValueError), (float("inf"), ValueError), (1e13, ValueError)],
)
def test_a_bad_ttl_is_refused_and_changes_nothing(
    tmp_path: Path, ttl: object, error: type[Exception]
) -> None:
    with LocalFileStorage(tmp_path / "s", sync="none") as s:
        s["k"] = "kept"
        size = s.stats()["total_bytes"]
        with pytest.raises(error, match="ttl"):
            s.set("k", "new", ttl=ttl)  # type: ignore[arg-type]
        with pytest.raises(error, match="ttl"), s.batch() as b:
            b.set("k", "new", ttl=ttl)  # type: ignore[arg-type]
        with pytest.raises(error, match="ttl"):
            InMemoryStorage(s).set("k", "new", ttl=ttl)  # type: ignore[arg-type]
        assert s["k"] == "kept" and s.stats()["total_bytes"] == size


def test_expiring_values_round_trip_and_refuse_damage() -> None:
    inner = encode_value([1, "x"])
    wrapped = expiring_value(inner, 2000.5, 1000.25)
    assert wrapped[0] == TAG_EXPIRES and decode_value(wrapped) == [1, "x"]
    from logstate import CorruptionError

    for bad in (
        wrapped[:17],  # no value
        expiring_value(inner, 1000.0, 2000.0),  # written after its deadline
        expiring_value(inner, float("nan"), 1.0),
        expiring_value(expiring_value(inner, 5.0, 1.0), 5.0, 1.0),  # nested
    ):
        with pytest.raises(CorruptionError, match="expiring value"):
            decode_value(bad)


def test_new_segments_are_format_2_and_a_format_1_store_takes_expiring_writes(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    shutil.copytree(DATA_V1, directory)
    clock = Clock()
    with LocalFileStorage(directory, clock=clock, segment_size=4096) as s:
        s.set("expiring", 1, ttl=5)
        newest = max(directory.glob("segment-*.seg"))
        header = newest.read_bytes()[: SEGMENT_HEADER.size]
        assert SEGMENT_HEADER.unpack(header)[1] == 2 and decode_segment_header(header) >= 2
        first = (directory / "segment-0000000001.seg").read_bytes()[: SEGMENT_HEADER.size]
        assert SEGMENT_HEADER.unpack(first)[1] == 1  # the old segments stay as they were
        clock.now += 10
        assert "expiring" not in s and s["k000"] == 0
    with LocalFileStorage(directory, clock=clock, use_snapshot=False) as s:
        assert "expiring" not in s and s["k000"] == 0


def test_a_snapshot_with_a_bad_expiry_table_is_refused_for_a_scan(tmp_path: Path) -> None:
    clock = Clock()
    directory = tmp_path / "s"
    with LocalFileStorage(directory, clock=clock, sync="none") as s:
        for i in range(50):
            s.set(f"k{i}", "v" * 40, ttl=10)
    path = directory / "index.snapshot"
    good = decode_snapshot(path.read_bytes())
    assert good.expiring[""]["k0"] == clock.now + 10 and good.clock_floor == clock.now
    for bad in (
        good._replace(expiring={"": {"missing key": 1.0}}),
        good._replace(expiring={"no such sub-storage": {"k0": 1.0}}),
        good._replace(expiring={"": {"k0": float("nan")}}),
        good._replace(expiring={"": {}}),
        good._replace(clock_floor=float("inf")),
    ):
        path.write_bytes(encode_snapshot(bad))
        with LocalFileStorage(directory, clock=clock, read_only=True) as s:
            assert not s.report.snapshot_used and "expiry table" in s.report.snapshot_refused
            assert len(s) == 50


# =========================================================================== found in review
class Trap:
    """A pickled value that would leave a mark if it were ever loaded."""

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.mark).touch, ())


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def test_dump_and_check_never_load_a_pickle_that_has_a_ttl(tmp_path: Path) -> None:
    directory, mark = tmp_path / "s", tmp_path / "loaded"
    with LocalFileStorage(directory, sync="none") as s:
        s.set("trap", Trap(str(mark)), ttl=3600)
        s.set("raw", b"xy", ttl=3600)
        s["plain"] = 1
    mark.unlink(missing_ok=True)  # (pickling it ran nothing; be sure)
    code, out = run_cli("dump", str(directory))
    assert code == 0 and not mark.exists()
    lines = {line["key"]: line for line in map(json.loads, out.splitlines())}
    assert lines["trap"]["type"] == "pickle" and lines["trap"]["value"] is None
    assert lines["raw"]["type"] == "bytes" and lines["raw"]["value"] == "eHk="
    assert lines["raw"]["expires_at"] > 0 and "expires_at" not in lines["plain"]
    code, out = run_cli("check", str(directory))
    assert code == 0 and not mark.exists(), out


def test_a_flushed_value_that_expired_in_memory_first_reads_expired_everywhere(
    tmp_path: Path,
) -> None:
    clock = Clock()
    with LocalFileStorage(tmp_path / "s", clock=clock, sync="none") as s:
        m = InMemoryStorage(s)
        m.set("k", 1, ttl=10)
        clock.now += 20
        assert m.get("k") is None  # forgotten in memory; its pending write stays
        m.flush()
        s._check()
        assert visible(s) == {}
        s.compact()
        assert s._engine.keydir.key_count() == 0


def test_an_interrupt_while_memory_forgets_an_expired_key_leaves_it_flushable(
    tmp_path: Path,
) -> None:
    for point in range(500):
        clock = Clock()
        s = LocalFileStorage(tmp_path / f"p{point}", clock=clock, sync="none")
        m = InMemoryStorage(s)
        m.set("k", [1], ttl=10)  # a mutable value: watched
        m.flush()
        clock.now += 20
        interrupted = Injector(point).run(lambda m=m: m.get("k"))  # type: ignore[misc]
        assert m.get("k") is None and "k" not in m
        m["probe"] = point
        m.flush()
        assert dict(s.items()) == {"probe": point}
        s.close()
        if not interrupted:
            assert point > 0
            return
    raise AssertionError("still interrupted after 500 points")


def test_loading_a_sub_storage_while_ttl_writers_run_never_fails(tmp_path: Path) -> None:
    """The expiry table is read under the write lock that its writers hold."""
    with LocalFileStorage(tmp_path / "s", sync="none", auto_compact=False) as s:
        for i in range(2000):
            s.set(f"k{i}", i, ttl=3600)
        stop = threading.Event()

        def write() -> None:
            i = 0
            while not stop.is_set():
                s.set(f"n{i}", i, ttl=3600)
                i += 1

        writer = threading.Thread(target=write)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        writer.start()
        try:
            for _ in range(5):
                assert len(InMemoryStorage(s)) >= 2000
        finally:
            stop.set()
            writer.join()
            sys.setswitchinterval(interval)
        s._check()


def test_compat_ordered_views_fold_their_bounds_as_the_keys(tmp_path: Path) -> None:
    from logstate.compat.quixstreams import LocalFileStorage as LegacyStorage

    with LegacyStorage(tmp_path / "s") as s:
        s["Abc"] = 1
        s["abd"] = 2
        s["b"] = 3
        view = s.keys(prefix="AB")
        assert list(view) == ["abc", "abd"] and len(view) == 2
        assert "ABC" in view and "abc" in view and "b" not in view
        assert list(s.items(start="ABD")) == [("abd", 2), ("b", 3)]
