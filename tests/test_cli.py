"""The `logstate` command line, every command through its entry points.

Each command runs in-process (``logstate.cli.main([...])`` with capsys) and at
least once as a real ``python -m logstate`` subprocess. Stores are built
through the public API and damaged byte by byte (as in test_recovery.py);
legacy Quix trees are written from the format description (as in
test_quix_import.py). A store held by a live process is simulated by a child
process that keeps a LocalFileStorage open until its stdin closes.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import pytest

import logstate
from logstate import CorruptionError, LocalFileStorage, _native
from logstate import _format as fmt
from logstate._scan import Damage, Frame, scan_records
from logstate.cli import Progress, main

# ============================================================================ helpers


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m logstate ARGS`` in a child process (stderr is a pipe, not a TTY)."""
    return subprocess.run(
        [sys.executable, "-m", "logstate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=120,
    )


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every entry below ``directory`` (relative path) and each file's bytes."""
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.seg"))


def frames_of(data: bytes) -> list[Frame]:
    """The valid records of a segment's bytes (asserting there is no damage)."""
    damage: list[Damage] = []
    found = list(scan_records(data, fmt.SEGMENT_HEADER_SIZE, damage.append))
    assert not damage
    return found


def frame_at(data: bytes, position: int) -> Frame:
    """The record that holds byte ``position``."""
    (frame,) = [f for f in frames_of(data) if f.offset <= position < f.offset + f.size]
    return frame


def key_of(data: bytes, frame: Frame) -> str:
    start = frame.offset + fmt.RECORD_OVERHEAD
    return fmt.decode_op(frame.record_type, data, start, frame.offset + frame.size).key


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def damaged_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("DAMAGED ")]


def one_error_line(err: str, command: str) -> str:
    """The single line a failing command must write to stderr (no traceback)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"logstate {command}: "), err
    return lines[0]


def build_keys_store(directory: Path, count: int = 60) -> dict[str, str]:
    """``count`` distinct keys over several 4 KiB segments (no overwrite, no compaction)."""
    items = {f"key{i:03d}": f"value {i:03d} " + "v" * 150 for i in range(count)}
    with LocalFileStorage(directory, sync="none", segment_size=4096, auto_compact=False) as s:
        for key, value in items.items():
            s[key] = value
    assert len(segment_files(directory)) >= 3
    return items


def build_garbage_store(directory: Path) -> None:
    """Overwritten keys over several segments (dead bytes), nested sub-storages."""
    with LocalFileStorage(directory, sync="none", segment_size=4096, auto_compact=False) as s:
        for generation in range(10):
            for i in range(10):
                s[f"k{i}"] = f"{generation} " + "x" * 100
        s.remove("k9")
        with s.get_or_create_sub_storage("sub") as sub:
            sub["a"] = 1
            with sub.get_or_create_sub_storage("deep") as deep:
                deep["b"] = "é"
    assert len(segment_files(directory)) >= 3


class LoadRecorder:
    """Unpickling one of these records the call: proof of whether a pickle was loaded."""

    loads: ClassVar[list[str]] = []

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record_load, ("loaded",))


def _record_load(what: str) -> dict[str, str]:
    LoadRecorder.loads.append(what)
    return {"was": what}


EVERY_TYPE: dict[str, Any] = {
    "str": "héllo\n",
    "int": -(10**30),
    "float": 2.5,
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "true": True,
    "false": False,
    "none": None,
    "bytes": b"\x00\xff\x10",
    "bytearray": bytearray(b"ab\x00"),
    "dict": {"a": [1, 2]},
    "recorder": LoadRecorder(),
}

# (type, value) that `dump` must print for each key of EVERY_TYPE
EXPECTED_DUMP: dict[str, tuple[str, Any]] = {
    "str": ("str", "héllo\n"),
    "int": ("int", -(10**30)),
    "float": ("float", 2.5),
    "nan": ("float", "nan"),
    "inf": ("float", "inf"),
    "-inf": ("float", "-inf"),
    "true": ("bool", True),
    "false": ("bool", False),
    "none": ("NoneType", None),
    "bytes": ("bytes", base64.b64encode(b"\x00\xff\x10").decode()),
    "bytearray": ("bytearray", base64.b64encode(b"ab\x00").decode()),
    "dict": ("pickle", None),
    "recorder": ("pickle", None),
}


def build_typed_store(directory: Path) -> None:
    with LocalFileStorage(directory, sync="none") as s:
        for key, value in EVERY_TYPE.items():
            s[key] = value
        with s.get_or_create_sub_storage("sub") as sub:
            sub["x"] = 1
            with sub.get_or_create_sub_storage("deep") as deep:
                deep["y"] = b"\x01"
        with s.get_or_create_sub_storage("empty"):
            pass


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"dump wrote a bare {name}: not JSON")


def parse_dump(out: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Each JSON line of ``dump`` by (storage, key); strict JSON (no bare NaN)."""
    lines = [json.loads(line, parse_constant=_reject_constant) for line in out.splitlines()]
    by_key = {(line["storage"], line["key"]): line for line in lines}
    assert len(by_key) == len(lines), "a key was dumped twice"
    return by_key


HOLDER_SCRIPT = (
    "import sys, logstate\n"
    "s = logstate.LocalFileStorage(sys.argv[1], sync='none', auto_compact=False)\n"
    "for i in range(5):\n"
    "    s[f'live{i}'] = i\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


@contextlib.contextmanager
def held_open(directory: Path) -> Iterator[subprocess.Popen[str]]:
    """A live process that holds ``directory`` open (and wrote live0..live4 to it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.communicate("", timeout=60)


# ---------------------------------------------------------------------------- legacy files
def legacy_file(type_code: bytes, payload: bytes) -> bytes:
    """codec 'b', type, payload, big-endian zlib CRC-32 (../shared/reference/quix-legacy.md)."""
    body = b"b" + type_code + payload
    return body + zlib.crc32(body).to_bytes(4, "big")


def legacy_int64(value: int) -> bytes:
    return legacy_file(b"l", struct.pack("<q", value))


def legacy_string(value: str) -> bytes:
    raw = value.encode("utf-8")
    prefix = bytearray()
    length = len(raw)
    while length >= 0x80:  # BinaryWriter's 7-bit length
        prefix.append(length & 0x7F | 0x80)
        length >>= 7
    prefix.append(length)
    return legacy_file(b"s", bytes(prefix) + raw)


def legacy_object(value: object) -> bytes:
    raw = pickle.dumps(value)
    return legacy_file(b"o", struct.pack("<i", len(raw)) + raw)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def legacy_tree() -> dict[str, bytes]:
    """6 root keys, 1 in topic/, 1 in topic/stream/; 3 temp/backup files; nothing malformed."""
    return {
        "count": legacy_int64(3),
        "name": legacy_string("hé"),
        "flag": legacy_file(b"b", b"\x01"),
        "ratio": legacy_file(b"d", struct.pack("<d", 0.5)),
        "blob": legacy_file(b"a", struct.pack("<i", 2) + b"\x00\x01"),
        "obj": legacy_object({"a": 1}),
        "count.tmpf": legacy_int64(99),
        "name.bckf": legacy_string("old"),
        "flag~1": legacy_int64(98),
        "topic/other": legacy_string("x"),
        "topic/stream/SCALAR": legacy_int64(7),
    }


LEGACY_CONTENTS: dict[str, Any] = {
    "count": 3,
    "name": "hé",
    "flag": True,
    "ratio": 0.5,
    "blob": b"\x00\x01",
    "obj": {"a": 1},
    "topic/": {"other": "x", "stream/": {"SCALAR": 7}},
}


def contents(storage: LocalFileStorage) -> dict[str, Any]:
    """Every key and sub-storage below ``storage``, as nested dicts (sub-storages as "name/")."""
    out: dict[str, Any] = {key: storage[key] for key in storage.get_all_keys()}
    for name in storage.get_sub_storages():
        with storage.get_or_create_sub_storage(name) as sub:
            out[name + "/"] = contents(sub)
    return out


class FakeTTY(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


# ============================================================================ usage


def test_the_console_script_runs_cli_main() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "logstate"]
    assert script.value == "logstate.cli:main"


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.startswith("logstate ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["demo", "--restarts", "x"],
        ["compact"],
        ["check"],
        ["stats"],
        ["dump"],
        ["repair"],
        ["import-quix"],
        ["import-quix", "only-the-source"],
        ["compact", "a", "b"],
        ["check", "d", "--bogus"],
        ["stats", "d", "--keys-only"],
        ["dump", "d", "--json"],
        ["repair", "d", "--unpickle"],
        ["import-quix", "s", "d", "--unpickle"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert "usage:" in err and out == ""


@pytest.mark.parametrize("argv", [["check"], ["import-quix", "only-the-source"], ["nope"]])
def test_usage_errors_exit_2_from_the_module_entry_point(argv: list[str]) -> None:
    result = _run(*argv)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


# ============================================================================ a missing directory


@pytest.mark.parametrize("command", ["compact", "check", "stats", "dump", "repair"])
def test_a_missing_directory_is_one_error_line_and_nothing_is_created(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "such"
    code, out, err = run_main(capsys, command, str(missing))
    assert code == 2 and out == ""
    assert str(missing) in one_error_line(err, command)
    assert not (tmp_path / "no").exists()

    result = _run(command, str(missing))
    assert result.returncode == 2 and result.stdout == ""
    assert one_error_line(result.stderr, command) == one_error_line(err, command)
    assert not (tmp_path / "no").exists()


def test_import_quix_from_a_missing_source_creates_no_destination(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing, destination = tmp_path / "no-legacy", tmp_path / "dst"
    code, out, err = run_main(capsys, "import-quix", str(missing), str(destination))
    assert code == 2 and out == ""
    assert str(missing) in one_error_line(err, "import-quix")
    result = _run("import-quix", str(missing), str(tmp_path / "dst2"))
    assert result.returncode == 2
    one_error_line(result.stderr, "import-quix")
    # a typo in the source must not leave an empty store behind
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["compact", "check", "stats", "dump", "repair"])
def test_a_file_instead_of_a_directory_is_one_error_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "afile"
    path.write_bytes(b"not a store")
    code, out, err = run_main(capsys, command, str(path))
    assert code == 2 and out == ""
    assert "not a directory" in one_error_line(err, command)
    assert sorted(tmp_path.iterdir()) == [path] and path.read_bytes() == b"not a store"


@pytest.mark.parametrize("command", ["compact", "check", "stats", "dump", "repair"])
def test_a_directory_that_is_not_a_store_is_refused_and_left_untouched(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # e.g. `logstate repair /var/lib` by mistake: no LOCK, no segment may appear there
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")
    before = snapshot(directory)
    code, out, err = run_main(capsys, command, str(directory))
    assert code == 2, out
    one_error_line(err, command)
    assert snapshot(directory) == before


# ============================================================================ a held store


@pytest.mark.parametrize("command", ["compact", "repair", "import-quix"])
def test_writing_commands_refuse_a_store_held_by_a_live_process(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_garbage_store(directory)
    legacy = tmp_path / "legacy"
    write_tree(legacy, {"k": legacy_int64(1)})
    argv = (
        [command, str(directory)]
        if command != "import-quix"
        else [command, str(legacy), str(directory)]
    )
    with held_open(directory) as holder:
        before = snapshot(directory)
        code, out, err = run_main(capsys, *argv)
        assert code == 2 and out == ""
        line = one_error_line(err, command)
        assert "locked by process" in line and str(holder.pid) in line
        assert str(directory.resolve() / "LOCK") in line
        assert snapshot(directory) == before

        result = _run(*argv)
        assert result.returncode == 2 and result.stdout == ""
        assert one_error_line(result.stderr, command) == line
        assert snapshot(directory) == before


@pytest.mark.parametrize("command", ["check", "stats", "dump"])
def test_reading_commands_work_on_a_held_store_and_change_no_file(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_garbage_store(directory)
    with held_open(directory):
        before = snapshot(directory)
        code, out, err = run_main(capsys, command, str(directory))
        assert (code, err) == (0, ""), out + err
        assert snapshot(directory) == before
        result = _run(command, str(directory))
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout == out
        assert snapshot(directory) == before
    if command == "dump":  # what the live writer wrote is visible
        dumped = parse_dump(out)
        assert {("", f"live{i}") for i in range(5)} <= set(dumped)
        assert dumped[("", "live3")]["value"] == 3
    elif command == "stats":
        assert "keys:          16 (all storages)" in out  # k0..k8, live0..4, a, b


def test_a_torn_tail_left_by_a_live_writer_is_reported_and_not_cut(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_garbage_store(directory)
    garbage = b"\x17 half-written record"
    with held_open(directory):
        newest = segment_files(directory)[-1]
        valid_size = newest.stat().st_size
        with open(newest, "ab") as file:
            file.write(garbage)
        before = snapshot(directory)

        code, out, err = run_main(capsys, "check", str(directory))
        assert (code, err) == (1, "")
        (line,) = damaged_lines(out)
        assert f"{newest.resolve()} at offset {valid_size}: {len(garbage)} bytes" in line
        assert "torn tail" in line
        assert snapshot(directory) == before

        result = _run("check", "--quiet", str(directory))
        assert (result.returncode, result.stderr, result.stdout) == (1, "", out)

        for command in ("stats", "dump"):
            code, out, err = run_main(capsys, command, str(directory))
            assert (code, err) == (0, ""), command
        assert ("", "live4") in parse_dump(out)
        assert snapshot(directory) == before
        assert newest.read_bytes().endswith(garbage)


# ============================================================================ check


def test_check_a_clean_store_exits_0_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_garbage_store(directory)
    before = snapshot(directory)
    code, out, err = run_main(capsys, "check", str(directory))
    assert (code, err) == (0, "")
    assert damaged_lines(out) == []
    summary = out.strip().splitlines()[-1]
    assert summary.startswith(f"{directory}: clean: {len(segment_files(directory))} segment(s), ")
    assert summary.endswith(", 11 live value(s) verified, 0 problem(s)")
    assert snapshot(directory) == before

    result = _run("check", str(directory))
    assert (result.returncode, result.stdout, result.stderr) == (0, out, "")
    assert snapshot(directory) == before


def test_check_reports_a_bit_flip_in_the_middle_of_a_segment_with_file_and_offset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_keys_store(directory)
    first = segment_files(directory)[0]
    found = frames_of(first.read_bytes())
    victim = found[len(found) // 2]
    flip_bit(first, victim.offset + victim.size // 2, bit=3)
    before = snapshot(directory)
    code, out, err = run_main(capsys, "check", str(directory))
    assert (code, err) == (1, "")
    (line,) = damaged_lines(out)
    assert f"{first.resolve()} at offset {victim.offset}: {victim.size} damaged bytes" in line
    assert out.strip().splitlines()[-1].endswith(", 1 problem(s)")
    assert ": damaged: " in out
    assert snapshot(directory) == before  # nothing moved aside, nothing cut


def build_value_store(directory: Path) -> None:
    """A plain set record and a zstd-compressed group, each followed by valid records."""
    with LocalFileStorage(directory, sync="none", compress_min_size=1024) as s:
        s["before"] = 1
        s["plain"] = "PLAIN-MARKER" * 10
        with s.batch() as batch:
            batch["packed"] = "P" * 4000
            batch["packed2"] = "Q" * 4000
        s["after"] = 2


@pytest.mark.parametrize("where", ["plain record", "compressed group"])
def test_check_reports_a_damaged_value_with_file_and_offset(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_value_store(directory)
    (segment,) = segment_files(directory)
    data = segment.read_bytes()
    if where == "plain record":
        position = data.index(b"PLAIN-MARKER") + 30
    else:
        group = [f for f in frames_of(data) if f.record_type == fmt.REC_GROUP][-1]
        position = group.offset + group.size - 3
    victim = frame_at(data, position)
    flip_bit(segment, position, bit=5)
    code, out, err = run_main(capsys, "check", str(directory))
    assert (code, err) == (1, "")
    (line,) = damaged_lines(out)
    assert f"{segment.resolve()} at offset {victim.offset}: " in line


def append_raw_set(segment: Path, seq: int, key: str, encoded_value: bytes) -> int:
    """Append a set record whose checksum is right, whatever its value; returns its offset."""
    body = fmt.encode_name("") + fmt.encode_name(key) + encoded_value
    offset = segment.stat().st_size
    with open(segment, "ab") as file:
        file.write(fmt.encode_record(fmt.REC_SET, seq, body))
    return offset


def test_check_reports_a_value_that_does_not_decode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The record's checksum is right but its value has an unknown tag: every
    # read of the key fails, so a store holding it is not clean.
    directory = tmp_path / "store"
    with LocalFileStorage(directory, sync="none") as s:
        s["good"] = 1
    (segment,) = segment_files(directory)
    offset = append_raw_set(segment, 1000, "bad", b"\xee\x01")
    (directory / "index.snapshot").unlink(missing_ok=True)
    with LocalFileStorage(directory, read_only=True) as s, pytest.raises(CorruptionError):
        s.get("bad")
    code, out, _err = run_main(capsys, "check", str(directory))
    assert code == 1, out
    (line,) = damaged_lines(out)
    assert f"{segment.resolve()} at offset {offset}" in line


def test_check_reports_a_missing_segment_naming_its_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_keys_store(directory)
    second = segment_files(directory)[1]
    second.unlink()
    before = snapshot(directory)
    code, out, _err = run_main(capsys, "check", str(directory))
    assert code == 1
    assert snapshot(directory) == before  # read-only: no empty segment put in the gap
    (line,) = damaged_lines(out)
    assert "missing" in line
    assert second.name in line


def test_check_of_a_missing_segment_warns_nothing_on_stderr(tmp_path: Path) -> None:
    # The finding is the DAMAGED line on stdout. A read-only check puts no
    # empty segment in the gap, so nothing may claim it "replaced" one.
    directory = tmp_path / "store"
    build_keys_store(directory)
    segment_files(directory)[1].unlink()
    before = snapshot(directory)
    result = _run("check", str(directory))
    assert result.returncode == 1
    assert len(damaged_lines(result.stdout)) == 1
    assert snapshot(directory) == before
    assert result.stderr == ""


@pytest.mark.parametrize("layout", ["same segment", "two segments"])
def test_check_lists_every_problem(
    layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_keys_store(directory)
    first, second = segment_files(directory)[:2]
    in_first = frames_of(first.read_bytes())
    victims = [(first, in_first[1])]
    if layout == "same segment":
        victims.append((first, in_first[-3]))
    else:
        victims.append((second, frames_of(second.read_bytes())[2]))
    for path, frame in victims:
        flip_bit(path, frame.offset + frame.size - 10)
    code, out, err = run_main(capsys, "check", "--quiet", str(directory))
    assert (code, err) == (1, "")
    lines = damaged_lines(out)
    assert len(lines) == 2, out
    for line, (path, frame) in zip(lines, victims, strict=True):
        assert f"{path.resolve()} at offset {frame.offset}: {frame.size} damaged bytes" in line
    assert out.strip().splitlines()[-1].endswith(", 2 problem(s)")


def test_check_lists_a_damaged_segment_header_and_the_damage_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_keys_store(directory)
    first, second = segment_files(directory)[:2]
    flip_bit(first, 10)  # in the header of segment 1
    victim = frames_of(second.read_bytes())[3]
    flip_bit(second, victim.offset + victim.size // 2)
    code, out, _err = run_main(capsys, "check", str(directory))
    assert code == 1
    lines = damaged_lines(out)
    assert any(f"{first.resolve()} at offset 0" in line for line in lines), out
    assert any(f"{second.resolve()} at offset {victim.offset}" in line for line in lines), out


# ============================================================================ stats


def test_stats_prints_what_storage_stats_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_garbage_store(directory)
    before = snapshot(directory)
    code, out, err = run_main(capsys, "stats", str(directory))
    assert (code, err) == (0, "")
    assert snapshot(directory) == before
    with LocalFileStorage(directory) as s:
        stats = s.stats()
    ratio = stats["dead_bytes"] / stats["total_bytes"]
    assert out.splitlines() == [
        str(directory),
        f"  keys:          {stats['keys']:,} (all storages)",
        "  sub-storages:  2 (sub, sub/deep)",
        f"  segments:      {stats['segments']}",
        f"  total:         {stats['total_bytes']:,} bytes ({stats['total_bytes'] / 2**20:.2f} MiB)",
        f"  live:          {stats['live_bytes']:,} bytes ({stats['live_bytes'] / 2**20:.2f} MiB)",
        f"  dead:          {stats['dead_bytes']:,} bytes ({stats['dead_bytes'] / 2**20:.2f} MiB)",
        f"  garbage ratio: {ratio:.2%}",
        "  native:        "
        + ("C extension" if logstate.native else f"pure Python ({_native.REASON})"),
    ]


def test_stats_json_equals_storage_stats_and_the_garbage_ratio_is_dead_over_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_garbage_store(directory)
    code, out, err = run_main(capsys, "stats", "--json", str(directory))
    assert (code, err) == (0, "")
    result = _run("stats", str(directory), "--json")
    assert (result.returncode, result.stdout, result.stderr) == (0, out, "")
    printed = json.loads(out)
    with LocalFileStorage(directory) as s:
        stats = s.stats()
    assert {name: printed[name] for name in stats} == stats
    assert set(printed) == {*stats, "garbage_ratio", "sub_storage_names", "native", "native_reason"}
    assert printed["native"] is logstate.native
    assert printed["sub_storage_names"] == ["sub", "sub/deep"]
    assert printed["sub_storages"] == 2 and printed["keys"] == 11
    # the sizes are the files' sizes, and the ratio is dead / total
    assert printed["total_bytes"] == sum(p.stat().st_size for p in segment_files(directory))
    assert printed["garbage_ratio"] == round(stats["dead_bytes"] / stats["total_bytes"], 4)
    assert printed["garbage_ratio"] > 0.5  # nine of ten generations are dead


# ============================================================================ dump


def test_dump_prints_every_type_as_a_json_line_and_loads_no_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_typed_store(directory)
    LoadRecorder.loads.clear()
    code, out, err = run_main(capsys, "dump", str(directory))
    assert (code, err) == (0, "")
    assert LoadRecorder.loads == []  # a pickle was never loaded
    dumped = parse_dump(out)
    expected = {
        ("", key): {"storage": "", "key": key, "type": t, "value": v}
        for key, (t, v) in EXPECTED_DUMP.items()
    }
    expected[("sub", "x")] = {"storage": "sub", "key": "x", "type": "int", "value": 1}
    expected[("sub/deep", "y")] = {
        "storage": "sub/deep",
        "key": "y",
        "type": "bytes",
        "value": base64.b64encode(b"\x01").decode(),
    }
    assert dumped == expected
    assert base64.b64decode(dumped[("", "bytes")]["value"]) == b"\x00\xff\x10"

    result = _run("dump", str(directory))
    assert (result.returncode, result.stderr) == (0, "")
    assert parse_dump(result.stdout) == expected


def test_dump_unpickle_loads_pickled_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_typed_store(directory)
    LoadRecorder.loads.clear()
    code, out, err = run_main(capsys, "dump", "--unpickle", str(directory))
    assert (code, err) == (0, "")
    assert LoadRecorder.loads == ["loaded"]
    dumped = parse_dump(out)
    assert dumped[("", "dict")]["type"] == "pickle:builtins.dict"
    assert dumped[("", "dict")]["value"] == repr({"a": [1, 2]})
    assert dumped[("", "recorder")]["value"] == repr({"was": "loaded"})
    assert dumped[("", "nan")]["value"] == "nan"  # the other types are as without --unpickle


def test_dump_keys_only_prints_storage_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_typed_store(directory)
    code, out, err = run_main(capsys, "dump", "--keys-only", str(directory))
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert all(set(line) == {"storage", "key"} for line in lines)
    assert sorted((line["storage"], line["key"]) for line in lines) == sorted(
        [("", key) for key in EVERY_TYPE] + [("sub", "x"), ("sub/deep", "y")]
    )
    result = _run("dump", "--keys-only", str(directory))
    assert (result.returncode, result.stdout, result.stderr) == (0, out, "")


def test_dump_of_a_value_that_does_not_decode_names_its_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    with LocalFileStorage(directory, sync="none") as s:
        s["good"] = 1
    (segment,) = segment_files(directory)
    append_raw_set(segment, 1000, "bad", b"\xee\x01")
    (directory / "index.snapshot").unlink(missing_ok=True)
    code, _out, err = run_main(capsys, "dump", str(directory))
    assert code in (1, 2)
    assert str(segment.resolve()) in one_error_line(err, "dump")


# ============================================================================ repair


def damage_middle_record(directory: Path) -> tuple[Path, Frame, bytes, str]:
    """Flip a bit in a record in the middle of the first segment.

    Returns the segment, the record, the segment's damaged bytes and the lost key.
    """
    first = segment_files(directory)[0]
    data = first.read_bytes()
    found = frames_of(data)
    victim = found[len(found) // 2]
    lost = key_of(data, victim)
    flip_bit(first, victim.offset + victim.size // 2)
    return first, victim, first.read_bytes(), lost


def check_repaired(
    directory: Path,
    items: dict[str, str],
    out: str,
    segment: Path,
    victim: Frame,
    damaged: bytes,
    lost: str,
) -> None:
    where = f"{segment.resolve()} at offset {victim.offset}"
    assert f"dropped {victim.size} damaged bytes: {where}" in out
    assert out.strip().splitlines()[-1] == (
        f"{directory}: repaired; the records in the ranges above are lost; "
        f"{len(items) - 1} keys kept"
    )
    (aside,) = sorted(directory.glob("*.damaged"))
    assert aside.name == f"{segment.name}.{victim.offset}.damaged"
    assert aside.read_bytes() == damaged[victim.offset : victim.offset + victim.size]
    with LocalFileStorage(directory) as s:  # strict: opens without complaint
        assert s.report.clean
        assert dict(s.items()) == {k: v for k, v in items.items() if k != lost}


def test_repair_drops_a_damaged_record_keeps_its_bytes_and_every_other_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    items = build_keys_store(directory)
    shutil.copytree(directory, tmp_path / "copy")
    segment, victim, damaged, lost = damage_middle_record(directory)
    code, out, _err = run_main(capsys, "repair", str(directory))
    assert code == 0
    check_repaired(directory, items, out, segment, victim, damaged, lost)

    copy = tmp_path / "copy"
    segment, victim, damaged, lost = damage_middle_record(copy)
    result = _run("repair", str(copy))
    assert result.returncode == 0, result.stderr
    check_repaired(copy, items, result.stdout, segment, victim, damaged, lost)


def test_repair_writes_nothing_to_stderr_when_it_succeeds(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    build_keys_store(directory)
    damage_middle_record(directory)
    result = _run("repair", str(directory))
    assert result.returncode == 0
    assert "dropped " in result.stdout
    assert result.stderr == ""  # what was lost is on stdout, once


def test_repair_of_a_clean_store_says_nothing_to_repair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    items = build_keys_store(directory)
    code, out, err = run_main(capsys, "repair", str(directory))
    assert (code, err) == (0, "")
    assert out == f"{directory}: nothing to repair; {len(items)} keys\n"
    assert sorted(directory.glob("*.damaged")) == []


def test_repair_cuts_a_torn_tail_into_a_torn_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    items = build_keys_store(directory)
    newest = segment_files(directory)[-1]
    valid = newest.read_bytes()
    newest.write_bytes(valid + b"\x00torn")
    code, out, _err = run_main(capsys, "repair", str(directory))
    assert code == 0
    (torn,) = sorted(directory.glob("*.torn"))
    assert torn.read_bytes() == b"\x00torn" and newest.read_bytes() == valid
    assert f"cut a torn tail: {newest.resolve()} at offset {len(valid)}, 5 bytes" in out
    assert str(torn.resolve()) in out
    assert (
        out.strip()
        .splitlines()[-1]
        .endswith(f"repaired a torn tail; nothing else was damaged; {len(items)} keys")
    )


def test_repair_of_a_damaged_segment_header_keeps_the_valid_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    items = build_keys_store(directory)
    second = segment_files(directory)[1]
    header = second.read_bytes()[: fmt.SEGMENT_HEADER_SIZE]
    flip_bit(second, 10)
    code, out, err = run_main(capsys, "repair", str(directory))
    assert code == 0, out + err
    asides = [p.read_bytes() for p in directory.glob("*.damaged")]
    assert any(header[:10] in data for data in asides)  # the damaged header is kept aside
    with LocalFileStorage(directory) as s:
        assert s.report.clean
        kept = dict(s.items())
    assert kept == {k: v for k, v in items.items() if k in kept}
    assert len(kept) >= len(items) - 25  # at most one segment's records are lost


# ============================================================================ compact


def check_compacted(directory: Path, out: str, sizes_before: int) -> None:
    sizes_after = sum(p.stat().st_size for p in segment_files(directory))
    assert sizes_after < sizes_before
    match = re.search(r"before: ([\d,]+) bytes .* in (\d+) segment", out)
    assert match is not None, out
    assert int(match[1].replace(",", "")) == sizes_before
    match = re.search(r"after:  ([\d,]+) bytes .* in (\d+) segment", out)
    assert match is not None, out
    assert int(match[1].replace(",", "")) == sizes_after
    assert int(match[2]) == len(segment_files(directory))
    assert out.startswith(f"compacted {directory}: ")


def test_compact_reclaims_space_and_keeps_every_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "store"
    build_garbage_store(directory)
    build_typed_store(directory)  # every value type, more sub-storages
    shutil.copytree(directory, tmp_path / "copy")
    _, dump_before, _ = run_main(capsys, "dump", str(directory))
    sizes_before = sum(p.stat().st_size for p in segment_files(directory))

    code, out, err = run_main(capsys, "compact", str(directory))
    assert (code, err) == (0, "")
    check_compacted(directory, out, sizes_before)
    _, dump_after, _ = run_main(capsys, "dump", str(directory))
    assert parse_dump(dump_after) == parse_dump(dump_before)
    code, out, err = run_main(capsys, "check", str(directory))
    assert code == 0, out

    copy = tmp_path / "copy"
    result = _run("compact", "--quiet", str(copy))
    assert (result.returncode, result.stderr) == (0, "")
    check_compacted(copy, result.stdout, sizes_before)
    _, dump_copy, _ = run_main(capsys, "dump", str(copy))
    assert parse_dump(dump_copy) == parse_dump(dump_before)


# ============================================================================ import-quix


def test_import_quix_imports_a_tree_skips_temp_files_and_lists_malformed_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy, destination = tmp_path / "legacy", tmp_path / "dst"
    files = legacy_tree()
    broken = bytearray(legacy_int64(5))
    broken[-1] ^= 0xFF
    files["topic/broken"] = bytes(broken)
    write_tree(legacy, files)
    source_before = snapshot(legacy)
    code, out, err = run_main(capsys, "import-quix", str(legacy), str(destination))
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0] == (
        f"imported 8 keys into 3 storages (2 sub-storages) from {legacy} to {destination.resolve()}"
    )
    assert lines[1].startswith("skipped 3 temp/backup files")
    assert "not imported, malformed: 1 file" in lines
    assert any(line.startswith("  topic/broken: CRC mismatch") for line in lines), out
    assert lines[-1].startswith("INCOMPLETE")
    assert snapshot(legacy) == source_before
    with LocalFileStorage(destination) as s:
        assert contents(s) == LEGACY_CONTENTS


def test_import_quix_of_a_clean_tree_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy = tmp_path / "legacy"
    write_tree(legacy, legacy_tree())
    code, out, err = run_main(capsys, "import-quix", str(legacy), str(tmp_path / "a"))
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == "complete: every key file was imported"
    result = _run("import-quix", str(legacy), str(tmp_path / "b"))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.splitlines()[0].startswith("imported 8 keys into 3 storages")
    for name in ("a", "b"):
        with LocalFileStorage(tmp_path / name) as s:
            assert contents(s) == LEGACY_CONTENTS


def test_import_quix_no_pickle_refuses_object_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy, destination = tmp_path / "legacy", tmp_path / "dst"
    write_tree(legacy, {**legacy_tree(), "topic/obj2": legacy_object([1])})
    code, out, err = run_main(capsys, "import-quix", "--no-pickle", str(legacy), str(destination))
    assert (code, err) == (1, "")
    assert "not imported, refused (pickled values with allow_pickle=False): 2 files" in out
    assert "  obj: an object value (a pickle)" in out.splitlines()
    assert "  topic/obj2: an object value (a pickle)" in out.splitlines()
    expected = {k: v for k, v in LEGACY_CONTENTS.items() if k != "obj"}
    with LocalFileStorage(destination) as s:
        assert contents(s) == expected


# ============================================================================ progress


def test_progress_writes_only_to_a_terminal_and_not_when_quiet() -> None:
    terminal = FakeTTY()
    progress = Progress(quiet=False, stream=terminal)
    progress.show("checked 10,000 values")
    assert terminal.getvalue() == "\r" + "checked 10,000 values".ljust(100)
    progress.done()
    assert terminal.getvalue().endswith("\r" + " " * 100 + "\r")  # the line is wiped

    for quiet, stream in [(True, FakeTTY()), (False, io.StringIO())]:
        silent = Progress(quiet=quiet, stream=stream)
        silent.show("anything")
        silent.done()
        assert stream.getvalue() == ""

    unused = FakeTTY()
    Progress(quiet=False, stream=unused).done()  # nothing shown: nothing to wipe
    assert unused.getvalue() == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_import_quix_shows_progress_on_a_terminal_unless_quiet(
    quiet: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = tmp_path / "legacy"
    write_tree(legacy, legacy_tree())
    terminal = FakeTTY()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["import-quix", str(legacy), str(tmp_path / "dst")] + (["--quiet"] if quiet else [])
    assert main(argv) == 0
    shown = terminal.getvalue()
    if quiet:
        assert shown == ""
    else:
        assert "imported (root): 6 keys" in shown and "imported topic/stream: 1 keys" in shown
        assert shown.endswith("\r" + " " * 100 + "\r")
    assert capsys.readouterr().out.splitlines()[-1] == "complete: every key file was imported"


@pytest.mark.parametrize("quiet", [False, True])
def test_check_shows_progress_on_a_terminal_unless_quiet(
    quiet: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "store"
    with LocalFileStorage(directory, sync="none") as s, s.batch() as batch:
        for i in range(10_001):
            batch[f"k{i}"] = i
    terminal = FakeTTY()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["check", str(directory)] + (["--quiet"] if quiet else [])) == 0
    if quiet:
        assert terminal.getvalue() == ""
    else:
        assert "checked 10,000 values" in terminal.getvalue()
    assert "10,001 live value(s) verified" in capsys.readouterr().out


# ============================================================================ demo


def test_demo_survives_sigkills_and_reports_no_lost_events(tmp_path: Path) -> None:
    result = _run("demo", "--restarts", "3", "--seed", "7", "--dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    restarts = [line for line in lines if line.startswith("restart ")]
    assert len(restarts) == 3 and all(line.endswith("(ok)") for line in restarts)
    verdict = lines[-1]
    assert verdict.startswith("verdict: 3 restarts, ")
    assert "events lost = 0, counted twice = 0 -> OK" in verdict
    counted = int(verdict.split(", ")[1].split()[0])
    assert counted > 0


def test_demo_runs_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_main(
        capsys, "demo", "--restarts", "1", "--seed", "3", "--dir", str(tmp_path / "demo")
    )
    assert code == 0, out
    assert out.strip().splitlines()[-1].endswith("events lost = 0, counted twice = 0 -> OK")


def test_demo_default_directory_is_state_demo(tmp_path: Path) -> None:
    result = _run("demo", "--restarts", "1", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "state" / "demo").is_dir()


def test_demo_refuses_a_directory_holding_other_data(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path / "mine") as storage:
        storage.set("precious", 1)
    result = _run("demo", "--dir", str(tmp_path / "mine"))
    assert result.returncode == 2
    assert "not the demo's" in result.stderr and "Traceback" not in result.stderr
    with LocalFileStorage(tmp_path / "mine") as storage:
        assert storage.get("precious") == 1


def test_demo_refuses_a_directory_locked_by_another_process(tmp_path: Path) -> None:
    with held_open(tmp_path / "busy") as holder:
        result = _run("demo", "--dir", str(tmp_path / "busy"))
        assert result.returncode == 2
        assert "locked by process" in result.stderr and str(holder.pid) in result.stderr


def test_demo_rejects_zero_restarts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--restarts", "0"]) == 2
    assert "--restarts" in capsys.readouterr().err
