"""tools/open_cost.py counts the instructions of an open, a scan and a compaction.

valgrind is required (as for tools/instructions.py): a missing one fails the
test, so the open/scan/compaction rows in docs/benchmarks.md stay
reproducible.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "open_cost.py"


def test_open_cost_tool_counts_a_scan_above_a_snapshot_open_under_callgrind() -> None:
    valgrind = shutil.which("valgrind") or "/usr/bin/valgrind"
    if not Path(valgrind).exists():
        pytest.fail("valgrind is not installed (tools/open_cost.py needs it)")
    command = [sys.executable, str(TOOL), "--sets", "3000", "--keys", "3000", "--flushes", "1"]
    done = subprocess.run(
        [*command, "--json", "--valgrind", valgrind],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert result["repo"] == str(ROOT)
    assert result["none"] > 0
    # the snapshot spares the scan of 3,000 records; compaction scans, then rewrites
    assert 0 < result["open"] < result["scan"] < result["compact"]
