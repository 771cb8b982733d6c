"""The replication commands of the ``logstate`` command line, on a real nats-server.

Through ``logstate.cli.main([...])`` with capsys (and one ``python -m
logstate restore`` subprocess): ``restore`` (whole, ``--until-seq``,
``--until-time``, ``--json``), ``restore --list``, ``follow`` (a standby kept
current while a writer writes, then promoted: the old writer is fenced),
``stats`` (the replication section from ``replication.json`` with no broker
running, ``--live`` with one). Exit codes: 0, or 2 with one line on stderr
naming the problem.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from logstate import LocalFileStorage
from logstate.cli import main
from logstate.replication import FencedError
from tests.replication.servers import NatsServer, free_port
from tests.replication.stores import Clock, fill, store_state
from tests.replication.test_replication import changelog, open_replicated
from tests.test_cli import _env

PARTITION = ["--stream", "STATE", "--partition", "orders.0"]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys: pytest.CaptureFixture[str], command: str, *argv: str) -> str:
    """Run a command that must fail: exit 2, one line on stderr; that line."""
    code, out, err = run_main(capsys, command, *argv)
    assert code == 2, (code, out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"logstate {command}: "), err
    return err


def state_of(path: Path, clock: Clock) -> dict[str, Any]:
    store = LocalFileStorage(path, clock=clock)
    try:
        return store_state(store)
    finally:
        store.close()


def made_source(server: NatsServer, tmp_path: Path, clock: Clock) -> dict[str, Any]:
    """A replicated store: fill, a snapshot, more writes with a point in time between.

    Returns the states and points: "mid_seq", "mid" (state at it), "mid_time",
    "last_seq", "last" (state at the end).
    """
    source = open_replicated(tmp_path / "src", changelog(server), clock)
    fill(source, clock)
    source.replication_snapshot()
    for i in range(30):
        source[f"after{i}"] = i
    assert source.wait_replicated(10.0)
    points: dict[str, Any] = {"mid_seq": source._engine.appender.seq, "mid": store_state(source)}
    time.sleep(0.03)  # (a message spans at most 10 ms of commit times)
    points["mid_time"] = time.time()
    time.sleep(0.03)
    for i in range(30):
        source[f"after{i}"] = -i
    assert source.wait_replicated(10.0)
    points["last_seq"] = source._engine.appender.seq
    points["last"] = store_state(source)
    source.close()
    return points


def test_restore_builds_the_store_to_the_end_a_seq_or_a_time_and_lists_the_range(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    points = made_source(nats_server, tmp_path, clock)
    url = nats_server.url

    code, out, _ = run_main(capsys, "restore", url, *PARTITION, str(tmp_path / "whole"))
    assert code == 0
    assert f"restored orders.0 to seq {points['last_seq']:,} in {tmp_path / 'whole'}" in out
    assert state_of(tmp_path / "whole", clock) == points["last"]

    code, out, _ = run_main(
        capsys, "restore", url, *PARTITION, str(tmp_path / "at-seq"),
        "--until-seq", str(points["mid_seq"]), "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out)
    assert summary["seq"] == points["mid_seq"] and summary["snapshot_seq"] > 0
    assert summary["dir"] == str(tmp_path / "at-seq")
    assert state_of(tmp_path / "at-seq", clock) == points["mid"]

    iso = dt.datetime.fromtimestamp(points["mid_time"], dt.timezone.utc).isoformat()
    code, out, _ = run_main(
        capsys, "restore", url, *PARTITION, str(tmp_path / "at-time"), "--until-time", iso
    )
    assert code == 0 and f"to seq {points['mid_seq']:,}" in out
    assert state_of(tmp_path / "at-time", clock) == points["mid"]

    code, out, _ = run_main(capsys, "restore", url, *PARTITION, "--list", "--json")
    assert code == 0
    span = json.loads(out)
    assert span["newest_seq"] == points["last_seq"]
    assert span["oldest_seq"] == summary["snapshot_seq"]  # (the oldest snapshot kept)
    assert [s["seq"] for s in span["snapshots"]] == [summary["snapshot_seq"]]
    assert span["newest_time"].endswith("+00:00")
    code, out, _ = run_main(capsys, "restore", url, *PARTITION, "--list")
    assert code == 0 and f"newest:            seq {points['last_seq']:,}" in out


def test_restore_errors_exit_2_with_one_line_naming_the_problem(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock)
    source["k"] = "v"
    assert source.wait_replicated(10.0)
    source.close()
    url = nats_server.url
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")

    err = refused(capsys, "restore", url, *PARTITION, str(tmp_path / "full"))
    assert str(tmp_path / "full") in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    err = refused(
        capsys,
        "restore",
        url,
        *PARTITION,
        str(tmp_path / "x"),
        "--until-time",
        "2024-01-01T00:00:00",
    )
    assert "no time zone" in err
    err = refused(capsys, "restore", url, *PARTITION, str(tmp_path / "x"), "--until-time", "soon")
    assert "'soon' is not an ISO-8601 time" in err
    err = refused(capsys, "restore", url, *PARTITION, str(tmp_path / "x"), "--until-seq", "-1")
    assert "until_seq" in err
    err = refused(capsys, "restore", url, *PARTITION, str(tmp_path / "x"), "--until-seq", "99")
    assert "not 99" in err
    err = refused(capsys, "restore", url, "--stream", "STATE", "--partition", "a b", "--list")
    assert "partition 'a b'" in err
    err = refused(capsys, "restore", url, "--stream", "STATE", "--partition", "nothing", "--list")
    assert "holds nothing of this partition" in err
    err = refused(capsys, "restore", url, *PARTITION)
    assert "DIR is required" in err
    dead = f"nats://127.0.0.1:{free_port()}"
    err = refused(capsys, "restore", dead, *PARTITION, str(tmp_path / "x"), "--timeout", "0.5")
    assert "cannot connect" in err
    assert not (tmp_path / "x").exists()


def test_follow_keeps_a_standby_current_and_its_promotion_fences_the_old_writer(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    writer = open_replicated(tmp_path / "writer", changelog(nats_server), clock)
    for i in range(50):
        writer[f"k{i}"] = i
    assert writer.wait_replicated(10.0)
    stop = threading.Event()
    written = [0]

    def write() -> None:
        for i in range(100_000):  # (bounded; stopped by the event)
            if stop.wait(0.002):
                return
            writer[f"k{i % 50}"] = f"while following {i}"
            written[0] = i + 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        code, out, err = run_main(
            capsys, "follow", nats_server.url, *PARTITION, str(tmp_path / "standby"),
            "--seconds", "1.5", "--poll", "0.05", "--json",
        )  # fmt: skip
    finally:
        stop.set()
        thread.join(10.0)
    assert code == 0, err
    statuses = [json.loads(line) for line in out.splitlines()]
    assert len(statuses) >= 3 and written[0] > 0
    assert all(set(s) == {"local_seq", "stream_seq", "lag"} for s in statuses)
    seqs = [s["local_seq"] for s in statuses]
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0] >= 50  # it kept up while written
    assert writer.wait_replicated(10.0)
    expected = store_state(writer)

    standby = LocalFileStorage(
        tmp_path / "standby", clock=clock, changelog=changelog(nats_server), restore="if-behind"
    )
    assert store_state(standby) == expected  # caught up the rest at its promotion
    standby["k0"] = "the promoted standby"
    assert standby.wait_replicated(10.0)
    writer["k1"] = "the old writer"
    with pytest.raises(FencedError):
        writer.wait_replicated(10.0)
    writer.close()
    standby.close()


def test_stats_reads_replication_json_without_a_broker_and_asks_it_with_live(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    path = tmp_path / "src"
    source = open_replicated(path, changelog(nats_server), clock)
    for i in range(40):
        source[f"k{i}"] = i
    snap = source.replication_snapshot()
    source["last"] = 1
    assert source.wait_replicated(10.0)
    last = source._engine.appender.seq
    writer = str(source.stats()["replication"]["writer"])
    source.close()
    nats_server.kill()  # no broker at all

    code, out, err = run_main(capsys, "stats", str(path), "--json")
    assert code == 0, err
    replication = json.loads(out)["replication"]
    assert replication["stream"] == "STATE" and replication["partition"] == "orders.0"
    assert (replication["writer"], replication["acked_seq"]) == (writer, last)
    assert replication["epoch"] == 1 and replication["fenced"] is None
    assert replication["last_snapshot"]["seq"] == snap["seq"]
    assert "lag_records" not in replication
    code, out, _ = run_main(capsys, "stats", str(path))
    assert code == 0
    assert f"acknowledged:  seq {last:,}" in out and f"last snapshot: seq {snap['seq']:,}" in out
    err = refused(capsys, "stats", str(path), "--live", nats_server.url, "--timeout", "0.5")
    assert "cannot connect" in err

    nats_server.start()
    code, out, err = run_main(capsys, "stats", str(path), "--json", "--live", nats_server.url)
    assert code == 0, err
    replication = json.loads(out)["replication"]
    assert (replication["stream_newest_seq"], replication["lag_records"]) == (last, 0)
    code, out, _ = run_main(capsys, "stats", str(path), "--live", nats_server.url)
    assert code == 0 and f"stream:        seq {last:,}; lag 0 records" in out

    plain = LocalFileStorage(tmp_path / "plain")
    plain["k"] = 1
    plain.close()
    code, out, _ = run_main(capsys, "stats", str(tmp_path / "plain"), "--json")
    assert code == 0 and "replication" not in json.loads(out)


def test_python_m_logstate_restore_runs_and_fails_with_exit_2(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = Clock()
    source = open_replicated(tmp_path / "src", changelog(nats_server), clock)
    for i in range(25):
        source[f"k{i}"] = i
    assert source.wait_replicated(10.0)
    expected = store_state(source)
    source.close()
    argv = [sys.executable, "-m", "logstate", "restore", nats_server.url, *PARTITION]
    done = subprocess.run(
        [*argv, str(tmp_path / "copy"), "--json"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["seq"] == 25
    assert state_of(tmp_path / "copy", clock) == expected
    again = subprocess.run(
        [*argv, str(tmp_path / "copy")], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and str(tmp_path / "copy") in again.stderr
