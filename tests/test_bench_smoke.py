"""tools/bench.py --quick runs end to end (a smoke run: it asserts nothing about speed).

Peers that are not installed (the ``bench`` extra is not part of the test
install) are listed as missing; logstate's own rows must all have a value.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_run_reports_every_logstate_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    ours = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and line.split("|")[2].strip().startswith("logstate")
    ]
    benchmarks = {line.split("|")[1].strip() for line in ours}
    expected = {"set", "get", "durable-set", "durable-set-4t", "batch", "overwrite-disk-compacted"}
    assert expected <= benchmarks, benchmarks
    assert any(b.startswith("reopen-") for b in benchmarks), benchmarks
    assert any(b.startswith("rss-") for b in benchmarks), benchmarks
    for line in ours:
        assert "n/a" not in line.split("|")[3], f"logstate row without a value: {line}"
