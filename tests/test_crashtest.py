"""A short round of the kill -9 torture (tools/crashtest.py): 5 SIGKILLs, no violation.

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
