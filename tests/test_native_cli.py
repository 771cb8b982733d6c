"""``logstate stats`` says which path runs: the C extension, or pure Python and why."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from logstate import LocalFileStorage
from tests.native_required import native_extension


def _stats(directory: pathlib.Path, pure: str, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "logstate", "stats", str(directory), *extra],
        env={**os.environ, "LOGSTATE_PURE": pure},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_stats_names_the_path_in_text_and_json(tmp_path: pathlib.Path) -> None:
    native_extension()
    directory = tmp_path / "store"
    with LocalFileStorage(directory) as storage:
        storage.set("a", 1)
    assert "  native:        C extension\n" in _stats(directory, "0")
    assert "  native:        pure Python (LOGSTATE_PURE is set)\n" in _stats(directory, "1")
    c_path = json.loads(_stats(directory, "0", "--json"))
    pure = json.loads(_stats(directory, "1", "--json"))
    assert (c_path["native"], c_path["native_reason"]) == (True, "C extension in use")
    assert (pure["native"], pure["native_reason"]) == (False, "LOGSTATE_PURE is set")
