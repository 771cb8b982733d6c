"""tools/instructions.py measures callgrind instructions per operation end to end.

valgrind is part of every machine this project runs on, so a missing
valgrind fails the test (it is not skipped): the per-operation counts in
docs/benchmarks.md must stay reproducible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.instructions import parse_args, read_total_ir

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "instructions.py"


def _valgrind() -> str:
    found = shutil.which("valgrind") or (
        "/usr/bin/valgrind" if os.access("/usr/bin/valgrind", os.X_OK) else None
    )
    if found is None:
        pytest.fail(
            "valgrind is not installed (needed by tools/instructions.py, which measures "
            "the instruction counts in docs/benchmarks.md): apt-get install valgrind"
        )
    return found


def test_instructions_tool_reports_the_cost_of_one_set_under_callgrind(tmp_path: Path) -> None:
    valgrind = _valgrind()
    ops = 200
    command = [sys.executable, str(TOOL), "--ops", str(ops), "--rows", "set", "--json"]
    command += ["--valgrind", valgrind, "--repo", str(ROOT), "--keep", str(tmp_path)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert Path(report["logstate"]) == ROOT / "logstate"
    assert report["ops"] == ops
    assert set(report["rows"]) == {"set"}
    row = report["rows"]["set"]
    # only the measured calls are counted: the empty run is a few thousand
    # instructions (the call and the empty loop), not the interpreter's start-up
    assert 0 <= row["ir_zero"] < 100_000, row
    assert row["per_op"] == round((row["ir_ops"] - row["ir_zero"]) / ops, 1)
    # a set is thousands of instructions: well above nothing, well below a runaway
    assert 2_000 < row["per_op"] < 200_000, row
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["callgrind.set-0.out", "callgrind.set-200.out"], kept
    assert read_total_ir(str(tmp_path / "callgrind.set-200.out")) == row["ir_ops"]


def test_total_ir_is_read_from_the_summary_line(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text("# callgrind format\nevents: Ir\nfn=main\n0 12\nsummary: 3456789\n")
    assert read_total_ir(str(out)) == 3456789
    out.write_text("events: Ir\n")
    with pytest.raises(ValueError, match="no summary/totals line"):
        read_total_ir(str(out))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rows", "flush", "--ops", "1500"], "multiple of 1000 for the flush row"),
        (["--rows", "set,bogus"], "unknown bogus"),
        (["--ops", "0"], "--ops must be at least 1"),
        (["--repo", "/nonexistent-checkout"], "no logstate/__init__.py"),
    ],
)
def test_instructions_tool_refuses_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
