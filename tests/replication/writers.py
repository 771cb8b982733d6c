"""What the replication failure tests share: writer processes and exact stream checks.

- ``WriterProc``: ``_writer_proc.py`` run with ``sys.executable``, its
  stdout lines collected by a thread (``wait_line`` waits for one, bounded);
  ``Writers``: the fixture's set of them, every one killed at teardown;
- ``subject_messages``: every message of a partition's subject, read with
  the client and parsed;
- ``assert_exactly_once``: the records in the stream are seqs 1..N, each
  once, in order (whole chunked records), markers left out;
- ``assert_restore_equals``: a restore into a new directory holds exactly
  what a local store holds.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from logstate import LocalFileStorage
from logstate.replication import _wire as wire
from logstate.replication import restore
from logstate.replication._client import Client
from tests.replication.stores import store_state

WRITER_SCRIPT = Path(__file__).with_name("_writer_proc.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
STREAM = "STATE"
WAIT_S = 60.0  # the bound of any one wait on a writer process


class WriterProc:
    """One writer process (see ``_writer_proc.py`` for its arguments and lines)."""

    def __init__(self, log_path: Path, args: Sequence[str]) -> None:
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        with open(log_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(WRITER_SCRIPT), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="writer-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def stderr_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no stderr: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def wait_line(self, prefix: str, timeout_s: float = WAIT_S) -> str:
        """The next line starting with ``prefix`` (lines before it are skipped)."""
        line = self.wait_line_or_exit(prefix, timeout_s)
        if line is None:
            raise AssertionError(
                f"writer exited ({self.proc.wait(WAIT_S)}) before a {prefix!r} line; "
                f"stdout tail {self.lines[-5:]}; stderr:\n{self.stderr_tail()}"
            )
        return line

    def wait_line_or_exit(self, prefix: str, timeout_s: float = WAIT_S) -> str | None:
        """:meth:`wait_line`, or None when the process ends first."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"writer printed no {prefix!r} line in {timeout_s:g} s; stderr:\n"
                    + self.stderr_tail()
                )
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                return None
            if line.startswith(prefix + " ") or line == prefix:
                return line

    def wait(self, timeout_s: float = WAIT_S) -> int:
        """Its exit code (negative: the signal); the stdout reader joined."""
        code = self.proc.wait(timeout_s)
        self._reader.join(timeout_s)
        return code

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.signal(signal.SIGCONT)  # (a stopped process dies at once either way)

    def acks(self) -> list[tuple[int, int]]:
        """(round, seq) of every ``ack`` line so far."""
        return [
            (int(parts[1]), int(parts[2]))
            for parts in (line.split() for line in list(self.lines))
            if parts[0] == "ack"
        ]

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(WAIT_S)
        if self.proc.stdout is not None:
            self._reader.join(WAIT_S)
            self.proc.stdout.close()


class Writers:
    """Starts writer processes; :meth:`close` kills whatever is left (the fixture's teardown)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[WriterProc] = []

    def start(
        self, path: Path, servers: Sequence[str], partition: str, *options: str
    ) -> WriterProc:
        log_path = self.log_dir / f"writer-{len(self.started)}.stderr"
        writer = WriterProc(log_path, [str(path), ",".join(servers), partition, *options])
        self.started.append(writer)
        return writer

    def close(self) -> None:
        for writer in self.started:
            writer.close()


class Opened(NamedTuple):
    """A writer's ``open`` line."""

    local_seq: int
    writer: str
    epoch: int
    checkpoint: int


def parse_open(line: str) -> Opened:
    _, seq, writer, epoch, checkpoint = line.split()
    return Opened(int(seq), writer, int(epoch), int(checkpoint))


def subject_messages(
    servers: Sequence[str], partition: str, stream: str = STREAM
) -> list[wire.Received]:
    """Every message of the partition's subject, in stream order, parsed (CRC checked)."""
    client = Client.get(list(servers), timeout_s=10.0)
    try:
        subject = f"logstate.{stream}.{partition}"
        return [
            wire.read_message(msg.stream_seq, msg.headers, msg.data)
            for msg in client.messages(stream, subject, 1, 10.0)
        ]
    finally:
        client.release()


def assert_exactly_once(messages: Sequence[wire.Received], first_seq: int = 1) -> int:
    """The record messages hold seqs ``first_seq..N`` once each, in order; N.

    A chunked record counts once, when its last chunk comes, and only if its
    chunks came in order, none twice. Markers are left out.
    """
    seqs: list[int] = []
    chunks: list[int] = []  # the chunk indexes of the record being assembled
    problems: list[str] = []
    for msg in messages:
        if msg.kind != wire.KIND_RECORDS:
            continue
        if msg.chunk is None:
            if chunks:
                problems.append(f"message {msg.stream_seq} cuts a chunked record short")
                chunks = []
            seqs.extend(range(msg.first, msg.last + 1))
            continue
        if msg.chunk.part != len(chunks):
            problems.append(
                f"message {msg.stream_seq}: chunk {msg.chunk.part} of seq {msg.first} "
                f"where chunk {len(chunks)} was due"
            )
        chunks.append(msg.chunk.part)
        if msg.chunk.part + 1 == msg.chunk.parts:
            seqs.append(msg.first)
            chunks = []
    if chunks:
        problems.append(f"the stream ends inside a chunked record ({len(chunks)} chunks)")
    last = max(seqs, default=first_seq - 1)
    duplicates = len(seqs) - len(set(seqs))
    gaps = len(set(range(first_seq, last + 1)) - set(seqs))
    assert (duplicates, gaps, problems) == (0, 0, []), (
        f"{duplicates} duplicate seqs, {gaps} missing seqs, {problems[:5]}"
    )
    assert seqs == list(range(first_seq, last + 1)), "seqs out of order"
    return last


def assert_restore_equals(
    servers: Sequence[str],
    partition: str,
    local_path: Path,
    target: Path,
    stream: str = STREAM,
    **options: Any,
) -> dict[str, Any]:
    """Restore ``partition`` into ``target``: it holds what ``local_path`` holds; that state."""
    result = restore(list(servers), stream, partition, target, timeout=10.0)
    local = LocalFileStorage(local_path, read_only=True, **options)
    copy = LocalFileStorage(target, read_only=True, **options)
    try:
        expected = store_state(local)
        assert result.seq == local._engine.appender.seq
        assert store_state(copy) == expected
        return expected
    finally:
        copy.close()
        local.close()
