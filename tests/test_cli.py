"""The `logstate` command line: the demo, usage errors, the module entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from logstate import LocalFileStorage
from logstate.cli import main


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "logstate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_demo_survives_sigkills_and_reports_no_lost_events(tmp_path: Path) -> None:
    result = _run("demo", "--restarts", "3", "--seed", "7", "--dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    restarts = [line for line in lines if line.startswith("restart ")]
    assert len(restarts) == 3 and all(line.endswith("(ok)") for line in restarts)
    verdict = lines[-1]
    assert verdict.startswith("verdict: 3 restarts, ")
    assert "events lost = 0, counted twice = 0 -> OK" in verdict
    counted = int(verdict.split(", ")[1].split()[0])
    assert counted > 0


def test_demo_default_directory_is_state_demo(tmp_path: Path) -> None:
    result = _run("demo", "--restarts", "1", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "state" / "demo").is_dir()


def test_demo_refuses_a_directory_holding_other_data(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path / "mine") as storage:
        storage.set("precious", 1)
    result = _run("demo", "--dir", str(tmp_path / "mine"))
    assert result.returncode == 2
    assert "not the demo's" in result.stderr and "Traceback" not in result.stderr
    with LocalFileStorage(tmp_path / "mine") as storage:
        assert storage.get("precious") == 1


def test_demo_refuses_a_directory_locked_by_another_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, logstate; s = logstate.LocalFileStorage(sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.read()",
            str(tmp_path / "busy"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = _run("demo", "--dir", str(tmp_path / "busy"))
        assert result.returncode == 2
        assert "locked by process" in result.stderr and str(holder.pid) in result.stderr
    finally:
        holder.communicate("")


@pytest.mark.parametrize("argv", [[], ["bogus"], ["demo", "--restarts", "x"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_demo_rejects_zero_restarts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--restarts", "0"]) == 2
    assert "--restarts" in capsys.readouterr().err


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.startswith("logstate ")
