"""``logstate --help`` lists the user-facing commands only."""

from __future__ import annotations

import contextlib
import io

import pytest

from logstate.cli import main


def test_help_lists_no_hidden_command_and_no_suppress_marker() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = out.getvalue()
    assert "SUPPRESS" not in text
    assert "demo-worker" not in text
    for command in ("compact", "check", "stats", "dump", "repair", "import-quix", "demo"):
        assert f"\n    {command}" in text, command


def test_hidden_demo_worker_command_still_parses() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["demo-worker", "--help"])
    assert info.value.code == 0
    assert "--seed" in out.getvalue()
