"""The engine's hooks for replication, driven by a pure-Python changelog double.

What the engine promises a changelog (``logstate._hooks``), tested here
without a broker (the NATS changelog has its own tests against a real
``nats-server``):

- ``attach(engine)`` once per engine, with the engine, before any
  background thread (compactor, interval syncer) runs; the commit listener
  it adds gets every committed record; an ``attach`` that raises fails the
  open and releases the directory;
- ``Engine.ingest(records)``: records from the stream appended byte for
  byte (seqs continue the local seq exactly, CRCs checked, nothing written
  before every record is checked), durable, kept by a reopen, never given
  to the commit listener; an interrupt leaves the state before or after;
- the compaction hold: a hold that says no changes no segment; a segment
  rolled while the hold waits is not compacted;
- ``Engine.fence``: every later call on every handle raises a new
  FencedError with the same fields; ``close`` still releases the directory;
- close: the final sync and delivery first, then ``replication.close()``,
  then the release (an error of the replication's close is raised after
  it); ``abandon`` and a fork reach the replication;
- ``LocalFileStorage(changelog=, restore=)``: option conflicts, the restore
  argument, ``restore_before_open`` before the open; the replication methods
  raise ValueError without a changelog.

    python -m pytest tests/test_replication_hooks.py -q
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from logstate import (
    CorruptionError,
    FencedError,
    InMemoryStorage,
    LocalFileStorage,
    OptionConflictError,
    ReplicationError,
    ReplicationLag,
    _registry,
)
from logstate._engine import Engine
from logstate._filenames import parse_segment_file_name
from logstate._fs import OS_FS
from logstate._hooks import Changelog, Replication
from logstate._options import validate_options
from tests.helpers import kill, observed_state
from tests.test_fork import in_forked_child
from tests.test_interrupts import BEFORE, State, observed, populate, run_everywhere

WRITER = "ab" * 16  # a writer id: 32 hex characters


class Boom(Exception):
    """Raised by the double where a test asks it to."""


# ============================================================================ the double
class DoubleReplication:
    """A replication that acknowledges what its listener got when told to (``ack``)."""

    def __init__(self, changelog: DoubleChangelog, engine: Engine) -> None:
        self.changelog = changelog
        self.engine = engine
        self.delivered: list[tuple[int, bytes]] = []
        self.acked_seq = 0
        self.closed = 0
        self.abandoned = 0
        self.forked = 0

    def listener(self, seq: int, record: bytes) -> None:
        self.delivered.append((seq, record))
        self.changelog.events.append(("deliver", seq))

    def ack(self) -> None:
        if self.delivered:
            self.acked_seq = self.delivered[-1][0]

    def lag(self) -> ReplicationLag:
        unacked = [record for seq, record in self.delivered if seq > self.acked_seq]
        return ReplicationLag(len(unacked), sum(map(len, unacked)))

    def wait_replicated(self, timeout: float | None) -> bool:
        self.changelog.events.append(("wait_replicated", timeout))
        return self.lag().groups == 0

    def snapshot(
        self, progress: Callable[[str, int, int], None] | None = None
    ) -> dict[str, object]:
        if progress is not None:
            progress("done", 0, 0)
        return {"seq": self.engine.appender.seq}

    def stats(self) -> dict[str, object]:
        return {"acked_seq": self.acked_seq, "delivered": len(self.delivered)}

    def hold_compaction(self, seq: int) -> bool:
        self.changelog.events.append(("hold", seq))
        hold = self.changelog.hold
        return True if hold is None else hold(seq)

    def close(self) -> None:
        path = self.engine.path
        # what close has done when it gets here: delivered, and not yet released
        self.changelog.events.append(
            ("close", OS_FS.held_lock(path) is not None and not self.engine.life.released)
        )
        self.closed += 1
        if self.changelog.fail_close is not None:
            raise self.changelog.fail_close

    def abandon(self) -> None:
        self.changelog.events.append(("abandon", None))
        self.abandoned += 1

    def after_fork(self) -> None:
        self.forked += 1


class DoubleChangelog:
    """A changelog (``_hooks.Changelog``) that records what the engine asks of it.

    ``ingest``: records ``attach`` ingests; ``hold``: what ``hold_compaction``
    does (None: say yes); ``fail_attach`` / ``fail_close``: raised there.
    """

    def __init__(
        self,
        ingest: list[bytes] | None = None,
        hold: Any = None,
        fail_attach: BaseException | None = None,
        fail_close: BaseException | None = None,
    ) -> None:
        self.ingest = ingest or []
        self.hold = hold
        self.fail_attach = fail_attach
        self.fail_close = fail_close
        self.events: list[tuple[str, object]] = []
        self.replications: list[DoubleReplication] = []
        # (engine, compactor thread started?, syncer made?) at each attach
        self.attached: list[tuple[Engine, bool, bool]] = []

    def attach(self, engine: Engine) -> DoubleReplication:
        worker = engine.scheduler.worker
        started = worker is not None and (worker.ident is not None or worker.is_alive())
        self.attached.append((engine, started, engine.syncer is not None))
        self.events.append(("attach", engine.path))
        if self.fail_attach is not None:
            raise self.fail_attach
        replication = DoubleReplication(self, engine)
        if self.ingest:
            engine.ingest(self.ingest)
        engine.add_commit_listener(replication.listener)
        engine.compactor.hold = replication.hold_compaction
        self.replications.append(replication)
        return replication

    def restore_before_open(self, path: str, mode: str) -> None:
        self.events.append(("restore", (path, mode)))

    @property
    def replication(self) -> DoubleReplication:
        return self.replications[-1]


def as_replication(replication: DoubleReplication) -> Replication:
    return replication  # (mypy checks that the double is a Replication)


def test_the_double_is_a_changelog_and_its_replication_a_replication(tmp_path: Path) -> None:
    double = DoubleChangelog()
    changelog: Changelog = double  # (mypy checks that the double is a Changelog)
    with LocalFileStorage(tmp_path / "d", changelog=changelog) as s:
        assert s._engine.replication is as_replication(double.replication)


def source_records(directory: Path, write: Any, **options: Any) -> list[bytes]:
    """The records ``write(storage)`` commits in a fresh store, as a listener gets them."""
    got: list[tuple[int, bytes]] = []
    with LocalFileStorage(directory, sync="none", **options) as source:
        source._engine.add_commit_listener(lambda seq, record: got.append((seq, record)))
        write(source)
    assert [seq for seq, _r in got] == list(range(1, len(got) + 1))
    return [record for _seq, record in got]


def write_some(s: LocalFileStorage) -> None:
    s["a"] = "one"
    s["b"] = b"\x00\x01"
    sub = s.get_or_create_sub_storage("sub")
    sub["x"] = [1, 2]
    with s.batch() as batch:
        batch.set("c", 3)
        batch.remove("b")
    memory = InMemoryStorage(sub)
    memory["y"] = {"n": 1}
    memory.flush(checkpoint={"offset": 9})
    sub.close()


def segment_bytes(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if parse_segment_file_name(p.name) is not None
    }


# ============================================================================ attach
def test_attach_is_called_once_per_engine_with_it_before_any_background_thread_runs(
    tmp_path: Path,
) -> None:
    changelog = DoubleChangelog()
    directory = tmp_path / "d"
    s = LocalFileStorage(directory, changelog=changelog, sync="interval", auto_compact=True)
    engine = s._engine
    again = LocalFileStorage(directory)  # shares the engine: no second attach
    shared = LocalFileStorage(directory, changelog=changelog)
    sub = s.get_or_create_sub_storage("sub")
    assert again._engine is engine and shared._engine is engine
    assert changelog.attached == [(engine, False, False)]
    assert engine.replication is changelog.replication
    worker = engine.scheduler.worker
    assert worker is not None
    for _ in range(500):  # (a thread just started takes its running lock soon after)
        if worker.is_alive():
            break
        time.sleep(0.01)
    assert worker.is_alive()
    for handle in (sub, shared, again, s):
        handle.close()
    assert changelog.replication.closed == 1
    reopened = LocalFileStorage(directory, changelog=changelog)
    assert len(changelog.attached) == 2 and changelog.attached[1][0] is reopened._engine
    assert changelog.attached[1][0] is not engine
    reopened.close()


def test_records_committed_reach_the_listener_the_replication_adds(tmp_path: Path) -> None:
    changelog = DoubleChangelog()
    directory = tmp_path / "d"
    with LocalFileStorage(directory, changelog=changelog, sync="always") as s:
        write_some(s)
        delivered = list(changelog.replication.delivered)
    assert [seq for seq, _r in delivered] == list(range(1, 7))
    # the exact bytes of the records in the segment file, in order
    data = b"".join(segment_bytes(directory).values())
    position = 0
    for _seq, record in delivered:
        position = data.index(record, position) + len(record)
    assert changelog.replication.delivered == delivered  # nothing more at close


def test_stats_hold_the_replications_figures_only_with_a_changelog(tmp_path: Path) -> None:
    changelog = DoubleChangelog()
    with LocalFileStorage(tmp_path / "d", changelog=changelog, sync="always") as s:
        s["a"] = 1
        stats = s.stats()
        assert stats["replication"] == {"acked_seq": 0, "delivered": 1}
        assert stats["keys"] == 1
    with LocalFileStorage(tmp_path / "plain") as plain:
        assert "replication" not in plain.stats()


def test_an_attach_that_raises_fails_the_open_and_releases_the_directory(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "d"
    LocalFileStorage(directory).close()
    changelog = DoubleChangelog(fail_attach=Boom("no broker"))
    with pytest.raises(Boom, match="no broker"):
        LocalFileStorage(directory, changelog=changelog, auto_compact=True)
    real = os.path.realpath(directory)
    assert OS_FS.held_lock(real) is None, "the directory lock was kept"
    assert all(engine.path != real for engine in _registry.open_engines())
    with LocalFileStorage(directory) as s:  # at once, and with nothing of the failed open
        s["a"] = 1
    assert len(changelog.attached) == 1


def test_an_open_that_fails_after_attach_abandons_the_replication_and_releases(
    tmp_path: Path,
) -> None:
    changelog = DoubleChangelog()
    directory = tmp_path / "d"
    directory.mkdir()
    options = validate_options({"changelog": changelog})

    def register(engine: Engine) -> None:
        raise Boom("after attach")

    with pytest.raises(Boom):
        Engine(str(directory), options, register=register)
    assert (changelog.replication.abandoned, changelog.replication.closed) == (1, 0)
    assert OS_FS.held_lock(str(directory)) is None
    LocalFileStorage(directory).close()


# ============================================================================ ingest
def test_ingest_appends_the_streams_records_as_they_are_and_a_reopen_keeps_them(
    tmp_path: Path,
) -> None:
    records = source_records(tmp_path / "source", write_some)
    with LocalFileStorage(tmp_path / "source") as source:
        expected = observed_state(source)
        expected_checkpoint = source.checkpoint
    changelog = DoubleChangelog(ingest=records)
    target = tmp_path / "target"
    with LocalFileStorage(target, changelog=changelog, sync="none") as s:
        engine = s._engine
        assert engine.commit.synced_pos == engine.appender.written_pos, "ingest did not sync"
        assert observed_state(s) == expected
        sub = s.get_or_create_sub_storage("sub")
        assert sub.checkpoint == expected_checkpoint
        sub.close()
        assert s._engine.appender.seq == len(records)
        s._check()
        assert changelog.replication.delivered == [], "ingested records were delivered"
        s["after"] = 1  # the next local write continues the seq, and is delivered
        assert [seq for seq, _r in changelog.replication.delivered] == [len(records) + 1]
    data = b"".join(segment_bytes(target).values())
    assert b"".join(records) in data, "not appended byte for byte"
    with LocalFileStorage(target) as reopened:
        state = observed_state(reopened)
        assert state.pop("")["after"] == 1
        expected.pop("")
        assert {k: v for k, v in state.items() if k} == {k: v for k, v in expected.items() if k}
        assert reopened._engine.appender.seq == len(records) + 1
        reopened._check()


def test_ingest_refuses_seqs_that_do_not_continue_the_local_seq_and_writes_nothing(
    tmp_path: Path,
) -> None:
    records = source_records(tmp_path / "source", write_some)
    directory = tmp_path / "d"
    with LocalFileStorage(directory, sync="none") as s:
        engine = s._engine
        with pytest.raises(ValueError, match=r"record 1 has seq 3, expected 2"):
            engine.ingest([records[0], records[2]])  # a gap
        s["local"] = 1  # seq 1
        before = segment_bytes(directory)
        with pytest.raises(ValueError, match=r"record 0 has seq 1, expected 2"):
            engine.ingest(records)
        with pytest.raises(ValueError, match=r"has seq 3, expected 2"):
            engine.ingest(records[2:])
        assert segment_bytes(directory) == before
        assert engine.appender.seq == 1
        engine.ingest(records[1:])  # continues it: accepted
        assert engine.appender.seq == len(records)
        s._check()


def test_ingest_refuses_a_record_whose_checksum_fails_and_writes_nothing(
    tmp_path: Path,
) -> None:
    records = source_records(tmp_path / "source", write_some)
    directory = tmp_path / "d"
    with LocalFileStorage(directory, sync="none") as s:
        before = segment_bytes(directory)
        damaged = bytearray(records[2])
        damaged[-1] ^= 0x01
        with pytest.raises(CorruptionError, match=r"ingested record 2: .*checksum"):
            s._engine.ingest([records[0], records[1], bytes(damaged)])
        with pytest.raises(CorruptionError, match=r"ingested record 0: .*truncated"):
            s._engine.ingest([records[0][:10]])
        with pytest.raises(TypeError, match="ingested record 0 must be bytes"):
            s._engine.ingest(["text"])  # type: ignore[list-item]
        assert segment_bytes(directory) == before
        assert s._engine.appender.seq == 0
        assert len(s) == 0
        s._engine.ingest([])  # nothing: nothing written
        assert segment_bytes(directory) == before


def test_ingest_of_more_than_a_segment_rolls_and_a_reopen_reads_it_all(tmp_path: Path) -> None:
    def many(s: LocalFileStorage) -> None:
        for i in range(60):
            s[f"k{i % 25}"] = bytes([i]) * 300

    records = source_records(tmp_path / "source", many, segment_size=4096)
    with LocalFileStorage(tmp_path / "source") as source:
        expected = dict(source.items())
    directory = tmp_path / "d"
    with LocalFileStorage(directory, segment_size=4096, auto_compact=False) as s:
        s._engine.ingest(records)
        assert dict(s.items()) == expected
        assert len(s._engine.segments.segments) >= 4
        s._check()
    with LocalFileStorage(directory, recovery="strict") as reopened:
        assert dict(reopened.items()) == expected
        assert reopened._engine.appender.seq == 60


def test_ingest_at_attach_may_request_a_compaction_before_the_compactor_starts(
    tmp_path: Path,
) -> None:
    def overwrite(s: LocalFileStorage) -> None:
        for i in range(80):
            s["k"] = bytes([i]) * 400

    records = source_records(tmp_path / "source", overwrite, segment_size=4096)
    changelog = DoubleChangelog(ingest=records)
    options: dict[str, Any] = {"segment_size": 4096, "compact_min_size": 0}
    with LocalFileStorage(tmp_path / "d", changelog=changelog, **options) as s:
        s._engine.wait_for_background_compaction()
        assert s["k"] == bytes([79]) * 400
        assert ("hold", 80) in changelog.events  # the requested compaction ran, held
        assert len(s._engine.segments.segments) <= 3
        s._check()


INGESTED_AFTER: State = {"": {"a": "new", "c": 3}, "sub": {"x": [1, 2]}, "fresh": {"y": 1}}


def test_an_interrupt_at_any_point_of_an_ingest_leaves_the_before_or_the_after_state(
    tmp_path: Path,
) -> None:
    def more(s: LocalFileStorage) -> None:
        populate(s)  # seqs 1..4
        s["a"] = "new"
        with s.batch() as batch:
            batch.set("c", 3)
            batch.remove("b")
        fresh = s.get_or_create_sub_storage("fresh")
        fresh["y"] = 1
        fresh.close()

    records = source_records(tmp_path / "source", more)[4:]  # seqs 5..8
    with LocalFileStorage(tmp_path / "source") as source:
        assert observed(source) == INGESTED_AFTER
    delivered: list[int] = []

    def setup(s: LocalFileStorage) -> None:
        populate(s)
        delivered.clear()
        s._engine.add_commit_listener(lambda seq, _record: delivered.append(seq))

    def ingest(s: LocalFileStorage) -> None:
        s._engine.ingest(records)

    def never_delivered(s: LocalFileStorage, point: int) -> None:
        seq = s._engine.appender.seq
        assert seq in (4, 8), f"point {point}: local seq {seq}"
        assert (seq == 8) == (observed(s) == INGESTED_AFTER), f"point {point}"
        assert not [n for n in delivered if 5 <= n <= 8], f"point {point}: {delivered}"

    options: dict[str, Any] = {"sync": "none", "auto_compact": False}
    points = run_everywhere(
        tmp_path, setup, ingest, BEFORE, INGESTED_AFTER, options, never_delivered
    )
    assert points > 50  # (about 280: every signal point of the ingest)


# ============================================================================ compaction hold
def overwritten_store(directory: Path, changelog: DoubleChangelog) -> LocalFileStorage:
    s = LocalFileStorage(
        directory, changelog=changelog, segment_size=4096, auto_compact=False, sync="none"
    )
    for i in range(40):
        s[f"k{i % 4}"] = bytes([i]) * 300
    assert len(s._engine.segments.segments) >= 3
    return s


def test_a_hold_that_says_no_leaves_every_segment_as_it_is(tmp_path: Path) -> None:
    changelog = DoubleChangelog(hold=lambda seq: False)
    directory = tmp_path / "d"
    s = overwritten_store(directory, changelog)
    before = segment_bytes(directory)
    seq = s._engine.appender.seq
    result = s.compact()
    assert result.output is None and result.inputs == []
    assert ("hold", seq) in changelog.events
    after = segment_bytes(directory)
    assert {name: after[name] for name in before} == before, "a held segment changed"
    assert len(after) <= len(before) + 1  # (at most the new active segment of the seal)
    s._check()
    s.close()


def test_a_segment_rolled_while_the_hold_waits_is_not_compacted(tmp_path: Path) -> None:
    during: dict[str, Any] = {}

    def hold(seq: int) -> bool:
        s = during["storage"]
        engine = s._engine
        during["hi"] = engine.segments.active.number - 1
        during["at_seal"] = observed_state(s)
        # while the hold waits: writes (an overwrite, a sub-storage made and
        # another dropped) until the active segment rolls
        s["k0"] = "during the hold"
        made = s.get_or_create_sub_storage("made")
        made["z"] = 1
        made.close()
        s.delete_sub_storage("dropped")
        rolled_at = engine.segments.active.number
        i = 0
        while engine.segments.active.number == rolled_at:
            s[f"w{i}"] = b"w" * 300
            i += 1
        during["written"] = i
        during["rolled"] = segment_bytes(Path(engine.path))
        return True

    changelog = DoubleChangelog(hold=hold)
    directory = tmp_path / "d"
    s = overwritten_store(directory, changelog)
    dropped = s.get_or_create_sub_storage("dropped")
    dropped["gone"] = 1
    dropped.close()
    during["storage"] = s
    result = s.compact()
    hi = during["hi"]
    assert result.output == hi and result.inputs[-1] == hi
    assert result.inputs == sorted(n for n in result.inputs if n <= hi)
    after = segment_bytes(directory)
    for name, data in during["rolled"].items():
        number = parse_segment_file_name(name)
        assert number is not None
        if number > hi:
            assert after[name][: len(data)] == data, f"{name}, rolled during the hold, changed"
    expected: dict[str, Any] = {f"k{i}": bytes([36 + i]) * 300 for i in range(1, 4)}
    expected["k0"] = "during the hold"
    expected.update({f"w{i}": b"w" * 300 for i in range(during["written"])})
    assert dict(s.items()) == expected
    assert s.get_sub_storages() == ["made"]
    s._check()
    s.close()
    with LocalFileStorage(directory, recovery="strict") as reopened:
        assert dict(reopened.items()) == expected
        assert reopened.get_sub_storages() == ["made"]
        reopened._check()
    # A crash that loses what was written during the hold (the active
    # segment's unsynced bytes) leaves the state at the seal: the output
    # holds every value live then, overwritten during the hold or not.
    lost = tmp_path / "lost"
    lost.mkdir()
    for name, data in segment_bytes(directory).items():
        number = parse_segment_file_name(name)
        assert number is not None
        if number <= hi:
            (lost / name).write_bytes(data)
    with LocalFileStorage(lost, recovery="strict") as crashed:
        assert observed_state(crashed) == during["at_seal"]
        assert crashed["k0"] == bytes([36]) * 300
        assert crashed.get_sub_storages() == ["dropped"]


# ============================================================================ fencing
def test_a_fenced_storage_refuses_every_call_on_every_handle_with_a_new_fenced_error(
    tmp_path: Path,
) -> None:
    changelog = DoubleChangelog()
    directory = tmp_path / "d"
    s = LocalFileStorage(directory, changelog=changelog, sync="none")
    s["a"] = 1  # seq 1: acknowledged below
    sub = s.get_or_create_sub_storage("sub")  # seq 2
    sub["x"] = 2  # seq 3
    memory = InMemoryStorage(s)
    memory["m"] = 3  # pending
    batch = s.batch()
    batch.set("b", 2)
    engine = s._engine
    fence = FencedError(engine.path, "orders", "p1", WRITER, None)
    kept = engine.fence(fence, acked_seq=1)
    assert (kept.path, kept.stream, kept.partition, kept.by_writer, kept.kept_aside) == (
        engine.path,
        "orders",
        "p1",
        WRITER,
        (2, 3),
    )
    assert engine.fence(FencedError(engine.path, "x", "y", "z" * 32)) is kept  # the first stays
    calls: dict[str, Any] = {
        "get": lambda: s.get("a"),
        "getitem": lambda: s["a"],
        "in": lambda: "a" in s,
        "len": lambda: len(s),
        "iter": lambda: list(s),
        "keys": lambda: list(s.keys()),
        "items": lambda: list(s.items()),
        "values": lambda: list(s.values()),
        "get_all_keys": s.get_all_keys,
        "get_encoded": lambda: s.get_encoded("a"),
        "checkpoint": lambda: s.checkpoint,
        "set": lambda: s.set("a", 2),
        "setitem": lambda: s.__setitem__("a", 2),
        "remove": lambda: s.remove("a"),
        "clear": s.clear,
        "flush": s.flush,
        "compact": s.compact,
        "stats": s.stats,
        "batch": s.batch,
        "batch commit": batch.commit,
        "sub-storage": lambda: s.get_or_create_sub_storage("sub"),
        "new sub-storage": lambda: s.get_or_create_sub_storage("new"),
        "sub-storages": s.get_sub_storages,
        "delete sub-storage": lambda: s.delete_sub_storage("sub"),
        "sub get": lambda: sub.get("x"),
        "sub set": lambda: sub.set("x", 3),
        "sub len": lambda: len(sub),
        "memory flush": memory.flush,
        "memory over sub": lambda: InMemoryStorage(sub),
        "replication_lag": s.replication_lag,
        "wait_replicated": s.wait_replicated,
        "replication_snapshot": s.replication_snapshot,
        "memory wait_replicated": memory.wait_replicated,
        "open again": lambda: LocalFileStorage(directory),
        "open again with the changelog": lambda: LocalFileStorage(directory, changelog=changelog),
        "open again to restore": lambda: LocalFileStorage(
            directory, changelog=changelog, restore="rebase"
        ),
    }
    seen: list[FencedError] = []
    for name, call in calls.items():
        with pytest.raises(FencedError) as info:
            call()
        error = info.value
        fields = (error.path, error.stream, error.partition, error.by_writer, error.kept_aside)
        assert fields == (engine.path, "orders", "p1", WRITER, (2, 3)), name
        assert error is not kept and all(error is not other for other in seen), name
        seen.append(error)
        assert 'restore="rebase"' in str(error) and WRITER in str(error), name
    assert [e for e in changelog.events if e[0] == "restore"] == []
    sub.close()
    s.close()  # works: releases the directory without a final sync
    assert changelog.replication.closed == 1
    assert OS_FS.held_lock(engine.path) is None
    with LocalFileStorage(directory) as reopened:  # what was written before the fence
        assert dict(reopened.items()) == {"a": 1}
        assert observed_state(reopened)["sub"] == {"x": 2}


def test_a_fence_without_acked_seq_keeps_the_given_kept_aside(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path / "d", changelog=DoubleChangelog(), sync="none") as s:
        s["a"] = 1
        engine = s._engine
        kept = engine.fence(FencedError(engine.path, "orders", "p1", WRITER, (5, 9)))
        assert kept.kept_aside == (5, 9)
        with pytest.raises(FencedError) as info:
            s.get("a")
        assert info.value.kept_aside == (5, 9)
        assert engine.fence(FencedError(engine.path, "o", "p", WRITER), acked_seq=0) is kept


def test_errors_of_replication_carry_fields_and_survive_pickling() -> None:
    error = ReplicationError("orders", "p1", "wrong last sequence", seq=7)
    assert str(error) == "replication of 'p1' on stream 'orders': wrong last sequence (seq 7)"
    assert str(ReplicationError("orders", "p1", "no stream")) == (
        "replication of 'p1' on stream 'orders': no stream"
    )
    again = pickle.loads(pickle.dumps(error))
    assert (again.stream, again.partition, again.seq, str(again)) == ("orders", "p1", 7, str(error))
    fenced = FencedError("/data/p1", "orders", "p1", WRITER, (3, 4))
    copy = pickle.loads(pickle.dumps(fenced))
    assert (copy.path, copy.by_writer, copy.kept_aside, str(copy)) == (
        "/data/p1",
        WRITER,
        (3, 4),
        str(fenced),
    )
    assert "seq 3..4" in str(fenced) and "orders" in str(fenced)
    assert "every record committed here is in the stream" in str(
        FencedError("/data/p1", "orders", "p1", WRITER)
    )


# ============================================================================ close, abandon, fork
def test_close_delivers_the_last_records_before_it_closes_the_replication_then_releases(
    tmp_path: Path,
) -> None:
    changelog = DoubleChangelog()
    s = LocalFileStorage(tmp_path / "d", changelog=changelog, sync="interval", sync_interval=3600)
    s["a"] = 1
    s["b"] = 2  # not synced yet: delivered by the close's final sync
    path = s._engine.path
    assert changelog.replication.delivered == []
    s.close()
    assert [e for e in changelog.events if e[0] in ("deliver", "close")] == [
        ("deliver", 1),
        ("deliver", 2),
        ("close", True),  # the directory still held when the replication closes
    ]
    assert OS_FS.held_lock(path) is None


def test_an_error_of_the_replications_close_is_raised_once_the_directory_is_released(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    changelog = DoubleChangelog(fail_close=ReplicationError("orders", "p1", "broker gone"))
    directory = tmp_path / "d"
    s = LocalFileStorage(directory, changelog=changelog, sync="none")
    s["a"] = 1
    engine = s._engine
    with caplog.at_level(logging.ERROR, "logstate"), pytest.raises(ReplicationError):
        s.close()
    assert engine.life.released and OS_FS.held_lock(engine.path) is None
    assert "broker gone" in caplog.text
    assert changelog.replication.closed == 1
    s.close()  # closing again is a no-op
    with LocalFileStorage(directory) as reopened:
        assert reopened["a"] == 1


def test_abandon_abandons_the_replication_without_closing_it(tmp_path: Path) -> None:
    changelog = DoubleChangelog()
    s = LocalFileStorage(tmp_path / "d", changelog=changelog, sync="none")
    s["a"] = 1
    path = s._engine.path
    kill(s)
    assert (changelog.replication.abandoned, changelog.replication.closed) == (1, 0)
    assert OS_FS.held_lock(path) is None


def test_a_forked_child_tells_the_replication_to_forget_the_parents_threads(
    tmp_path: Path,
) -> None:
    changelog = DoubleChangelog()
    with LocalFileStorage(tmp_path / "d", changelog=changelog, sync="none") as s:
        s["a"] = 1
        replication = changelog.replication

        def child() -> tuple[int, int]:
            return replication.forked, replication.closed

        assert in_forked_child(child) == (1, 0)
        assert replication.forked == 0  # (the parent's is untouched)


# ============================================================================ opening
def test_a_second_open_with_another_changelog_conflicts_and_one_without_shares(
    tmp_path: Path,
) -> None:
    first, other = DoubleChangelog(), DoubleChangelog()
    directory = tmp_path / "d"
    with LocalFileStorage(directory, changelog=first) as s:
        with pytest.raises(OptionConflictError, match="changelog="):
            LocalFileStorage(directory, changelog=other)
        with (
            LocalFileStorage(directory) as shared,
            LocalFileStorage(directory, changelog=first) as same,
        ):
            assert shared._engine is s._engine is same._engine
        assert len(first.attached) == 1 and other.attached == []
    with LocalFileStorage(directory) as plain:
        with pytest.raises(OptionConflictError, match="changelog="):
            LocalFileStorage(directory, changelog=first)
        assert plain._engine.replication is None


@pytest.mark.parametrize(
    ("restore", "changelog", "error", "match"),
    [
        ("sometimes", True, ValueError, r"^restore must be None or one of 'if-missing'"),
        ("", True, ValueError, "^restore must be"),
        (1, True, TypeError, "^restore must be"),
        (b"rebase", True, TypeError, "^restore must be"),
        ("if-missing", False, ValueError, "needs a changelog"),
    ],
)
def test_a_bad_restore_argument_is_refused_before_anything_is_opened(
    tmp_path: Path, restore: Any, changelog: bool, error: type[Exception], match: str
) -> None:
    double = DoubleChangelog()
    with pytest.raises(error, match=match):
        LocalFileStorage(tmp_path / "d", changelog=double if changelog else None, restore=restore)
    assert double.events == []
    assert not (tmp_path / "d").exists()


def test_a_changelog_that_is_not_one_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^changelog must be"):
        LocalFileStorage(tmp_path / "d", changelog="nats://localhost")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^changelog must be None with read_only"):
        LocalFileStorage(tmp_path / "d", changelog=DoubleChangelog(), read_only=True)


@pytest.mark.parametrize("mode", ["if-missing", "if-behind", "rebase"])
def test_restore_before_open_runs_first_unless_the_directory_is_open_here(
    tmp_path: Path, mode: str
) -> None:
    changelog = DoubleChangelog()
    directory = tmp_path / "d"
    with LocalFileStorage(directory, changelog=changelog, restore=mode) as s:
        real = os.path.realpath(directory)  # (what the changelog is given)
        assert changelog.events[:2] == [("restore", (real, mode)), ("attach", s.path)]
        with LocalFileStorage(directory, changelog=changelog, restore=mode) as shared:
            assert shared._engine is s._engine
        assert [e for e in changelog.events if e[0] == "restore"] == [("restore", (real, mode))]


def test_the_replication_methods_need_a_changelog(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path / "d") as s:
        for call in (s.replication_lag, s.wait_replicated, s.replication_snapshot):
            with pytest.raises(ValueError, match=rf"^storage {s.path} has no changelog$"):
                call()
        memory = InMemoryStorage(s)
        with pytest.raises(ValueError, match=f"storage {s.path} has no changelog"):
            memory.replication_lag()
    unbacked = InMemoryStorage()
    for method in (unbacked.replication_lag, unbacked.wait_replicated):
        with pytest.raises(ValueError, match="without a backing storage has no changelog"):
            method()
    with pytest.raises(ValueError, match="has no changelog"):
        unbacked.replication_snapshot()


def test_the_replication_methods_reach_the_replication(tmp_path: Path) -> None:
    changelog = DoubleChangelog()
    with LocalFileStorage(tmp_path / "d", changelog=changelog, sync="always") as s:
        s["a"] = b"x"
        replication = changelog.replication
        lag = s.replication_lag()
        assert lag == ReplicationLag(1, len(replication.delivered[0][1]))
        assert (lag.groups, lag.bytes) == lag
        assert s.wait_replicated(0.5) is False
        replication.ack()
        memory = InMemoryStorage(s)
        assert memory.wait_replicated() is True
        assert memory.replication_lag() == ReplicationLag(0, 0)
        assert s.replication_snapshot() == {"seq": 1} == memory.replication_snapshot()
        assert ("wait_replicated", 0.5) in changelog.events
        assert ("wait_replicated", None) in changelog.events
        s.close()
        with pytest.raises(Exception, match="closed"):
            s.replication_lag()
