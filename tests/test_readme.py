"""The README's Python examples run as written (docs are executed as tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"readme_example_{index}"}
    source = BLOCKS[index]
    server = None
    if "nats://127.0.0.1:4222" in source:
        # the example as written, on a broker the test starts (a free port)
        from tests.replication.servers import NatsServer

        server = NatsServer(tmp_path / "nats").start()
        source = source.replace("nats://127.0.0.1:4222", server.url)
    try:
        exec(compile(source, f"README.md example {index}", "exec"), namespace)
        _close_all(namespace)
    finally:
        if server is not None:
            server.kill()


def _close_all(namespace: dict[str, object]) -> None:
    for value in list(namespace.values()):
        close = getattr(value, "close", None)
        if callable(close) and type(value).__module__.startswith("logstate"):
            close()
