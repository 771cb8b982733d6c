"""Short rounds of the kill -9 and interrupt torture (tools/crashtest.py), no violation.

The long round (thousands of kills) is run by hand; its command and result
are recorded in docs/durability.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "crashtest.py"
SUMMARY = re.compile(r"kills=(\d+) operations verified=(\d+) violations=(\d+)")
INTERRUPTED = re.compile(r"kills=(\d+) interrupts=(\d+) operations verified=(\d+) violations=(\d+)")


def test_short_kill_round_verifies_acknowledged_operations_without_violation(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--kills", "5", "--seed", "7", "--dir", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = SUMMARY.fullmatch(result.stdout.splitlines()[-1])
    assert summary is not None, result.stdout
    kills, verified, violations = map(int, summary.groups())
    assert (kills, violations) == (5, 0), result.stdout
    assert verified > 0, "no operation was acknowledged: the round tested nothing"


def test_short_interrupt_round_leaves_every_interrupted_operation_before_or_after(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--interrupts", "150", "--seed", "5", "--dir", str(store)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = INTERRUPTED.fullmatch(result.stdout.splitlines()[-1])
    assert summary is not None, result.stdout
    _kills, interrupts, verified, violations = map(int, summary.groups())
    assert violations == 0, result.stdout
    assert interrupts >= 150 and verified > 0, result.stdout
