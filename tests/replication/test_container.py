"""The snapshot container (``logstate/replication/_container.py``) and capture (``_snapshot.py``).

The promises checked:

- the header codec round-trips, and its decoder, given any bytes (random, or
  a valid header damaged anywhere), returns a header or raises
  CorruptionError, never another exception (the fuzzer's guarantee);
- a container file's size and crc32c are those ``write_container`` reports,
  its layout the one docs/format.md describes;
- a flipped byte anywhere in a container (its prefix, its header JSON, its
  header CRC, any file's bytes), a truncated container or one with bytes
  after its last file is refused by ``extract_container`` and so by
  ``build_store``: CorruptionError naming the container and the offset of the
  field or of the file at fault, the target untouched; the same, with the
  same offsets, when the container comes as a stream (a ``ContainerStream``
  in pieces of any size, as a restore reads a snapshot object), whose own
  errors pass through, its iterator closed (a stream is checked as it comes:
  with two faults, it names the first it meets, where a file's size is
  checked first);
- a capture is a moment: files compacted away or appended to afterwards still
  give the bytes captured.

    python -m pytest tests/replication/test_container.py -q
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstate._crc import crc32c
from logstate._errors import CorruptionError, UnsupportedFormatError
from logstate._fs import OS_FS
from logstate.replication._build import build_store
from logstate.replication._container import (
    CONTAINER_MAGIC,
    ContainerFile,
    ContainerStream,
    decode_container_header,
    encode_container_header,
    extract_container,
    read_container,
)
from logstate.replication._snapshot import capture, write_container

from .stores import Clock, fill, more_changes, open_store, store_state

FILES = [
    ContainerFile("segment-0000000003.seg", 4096, 0xDEADBEEF),
    ContainerFile("segment-0000000004.seg", 24, 0),
]


# ---------------------------------------------------------------------- codec
def test_the_header_round_trips_and_lays_out_as_documented() -> None:
    block = encode_container_header(42, FILES)
    header = decode_container_header(block + b"file bytes are ignored")
    assert header.seq == 42 and header.files == FILES and header.data_offset == len(block)
    assert header.end_offset == len(block) + 4096 + 24
    magic, version, size = struct.unpack_from("<8sII", block)
    assert (magic, version) == (b"LGSNAP\r\n", 1) and magic == CONTAINER_MAGIC
    assert block[16 : 16 + size].startswith(b'{"seq":42,"files":[{"name":"segment-0000000003.seg"')
    assert struct.unpack_from("<I", block, 16 + size)[0] == crc32c(block[: 16 + size])
    assert len(block) == 16 + size + 4


def test_the_example_in_docs_format_md_is_what_write_container_writes(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text()
    section = doc.split("## Replication snapshot container", 1)[1]
    dump = section.split("```", 4)[3]  # the second block: the xxd dump
    documented = b"".join(
        bytes.fromhex(line.split(":", 1)[1][:48]) for line in dump.strip().splitlines()
    )
    with open_store(tmp_path / "src", Clock()) as store:
        store["k"] = 1
        with capture(store._engine) as captured:
            write_container(captured, str(tmp_path / "snap"))
    assert (tmp_path / "snap").read_bytes() == documented
    assert len(documented) == 151


@pytest.mark.parametrize(
    ("seq", "files", "reason"),
    [
        (-1, FILES, "not a u64"),
        (1 << 64, FILES, "not a u64"),
        (1, [FILES[1], FILES[0]], "does not come after segment 4"),
        (1, [FILES[0], FILES[0]], "does not come after"),
        (1, [ContainerFile("../etc/passwd", 24, 0)], "not a segment file name"),
        (1, [ContainerFile("segment-1.seg", 24, 0)], "not a segment file name"),
        (1, [ContainerFile("segment-0000000001.seg", 23, 0)], "not a segment's"),
        (1, [ContainerFile("segment-0000000001.seg", 24, 1 << 32)], "not a u32"),
    ],
)
def test_the_encoder_refuses_what_a_header_cannot_list(
    seq: int, files: list[ContainerFile], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        encode_container_header(seq, files)


def header_with(json_text: bytes) -> bytes:
    head = struct.pack("<8sII", CONTAINER_MAGIC, 1, len(json_text)) + json_text
    return head + struct.pack("<I", crc32c(head))


@pytest.mark.parametrize(
    ("data", "offset", "reason"),
    [
        (b"LGSNAP\r", 0, "truncated"),
        (b"LGSNAP\n\n" + bytes(8), 0, "not a logstate snapshot container"),
        (struct.pack("<8sII", CONTAINER_MAGIC, 2, 5), 8, "version 2 is not supported"),
        (struct.pack("<8sII", CONTAINER_MAGIC, 1, 0), 12, "out of range"),
        (struct.pack("<8sII", CONTAINER_MAGIC, 1, 1 << 30), 12, "out of range"),
        (header_with(b"{}")[:-1], 21, "truncated"),
        (header_with(b"{}")[:-1] + b"\0", 18, "checksum mismatch"),
        (header_with(b"{"), 16, "not JSON"),
        (header_with(b"\xff"), 16, "not JSON"),
        (header_with(b"[" * 100_000), 16, "not JSON"),
        (header_with(b"[]"), 16, "not a JSON object"),
        (header_with(b'{"seq":true,"files":[]}'), 16, "seq True is not a u64"),
        (header_with(b'{"seq":1.0,"files":[]}'), 16, "not a u64"),
        (header_with(b'{"seq":1,"files":{}}'), 16, "files is not a list"),
        (header_with(b'{"seq":1,"files":[1]}'), 16, "file 0 not an object"),
        (header_with(b'{"seq":1,"files":[{}]}'), 16, "file 0: name is NoneType"),
    ],
)
def test_the_decoder_names_what_is_wrong_and_where(data: bytes, offset: int, reason: str) -> None:
    with pytest.raises(CorruptionError) as failure:
        decode_container_header(data)
    assert failure.value.offset == offset and reason in failure.value.reason
    assert isinstance(failure.value, UnsupportedFormatError) == (offset in (0, 8) and len(data) > 8)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_the_decoder_parses_any_bytes_or_raises_corruption_error(data: bytes) -> None:
    for candidate in (data, CONTAINER_MAGIC + data, header_with(data)):
        with contextlib.suppress(CorruptionError):
            decode_container_header(candidate)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_a_damaged_header_is_refused_or_decodes_to_a_valid_one(data: st.DataObject) -> None:
    block = bytearray(encode_container_header(7, FILES))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(block) - 1))
        block[at] = data.draw(st.integers(0, 255))
    try:
        header = decode_container_header(bytes(block))
    except CorruptionError:
        return
    assert encode_container_header(header.seq, header.files)  # (what decodes can be written)


# ---------------------------------------------------------------------- files
@pytest.fixture
def container(tmp_path: Path) -> tuple[Path, dict[str, object], Clock]:
    """A container of a filled store, and the store's state at the capture."""
    clock = Clock()
    with open_store(tmp_path / "src", clock) as source:
        fill(source, clock)
        with capture(source._engine) as captured:
            expected = store_state(source)
            more_changes(source, clock)  # compacts: captured files are deleted
            assert not all(os.path.exists(f.path) for f in captured.files)
            info = write_container(captured, str(tmp_path / "snap"))
    data = (tmp_path / "snap").read_bytes()
    assert (info.size, info.crc) == (len(data), crc32c(data))
    return tmp_path / "snap", expected, clock


STREAM = "snapshot object p/42 of bucket B"  # the name a stream's errors carry


def pieces(data: bytes) -> Iterator[bytes]:
    """``data`` in pieces of 1, 100 and 4,093 bytes in turn (boundaries anywhere)."""
    at = 0
    for size in itertools.cycle((1, 100, 4093)):
        if at >= len(data):
            return
        yield data[at : at + size]
        at += size


def source_of(kind: str, path: Path) -> str | ContainerStream:
    """The container at ``path`` as ``build_store`` is given it: its file, or a
    stream (in pieces, or in one piece)."""
    if kind == "file":
        return str(path)
    data = path.read_bytes()
    return ContainerStream(STREAM, pieces(data) if kind == "stream" else [data])


def name_of(kind: str, path: Path) -> str:
    """What a ``CorruptionError`` about that source names as its ``path``."""
    return str(path) if kind == "file" else STREAM


SOURCES = pytest.mark.parametrize("kind", ["file", "stream", "one-piece stream"])


@SOURCES
def test_a_capture_keeps_the_bytes_of_files_compacted_or_appended_since(
    tmp_path: Path, container: tuple[Path, dict[str, object], Clock], kind: str
) -> None:
    path, expected, clock = container
    build_store(str(tmp_path / "dst"), source_of(kind, path), [], None)
    with open_store(tmp_path / "dst", clock) as built:
        assert store_state(built) == expected


def test_extract_writes_every_file_with_its_size(
    tmp_path: Path, container: tuple[Path, dict[str, object], Clock]
) -> None:
    path, _expected, _clock = container
    header = read_container(str(path))
    (tmp_path / "out").mkdir()
    assert extract_container(str(path), str(tmp_path / "out")) == header
    assert sorted(os.listdir(tmp_path / "out")) == [f.name for f in header.files]
    for entry in header.files:
        assert (tmp_path / "out" / entry.name).stat().st_size == entry.size
    with pytest.raises(FileExistsError):  # never over a file
        extract_container(str(path), str(tmp_path / "out"))


def damaged_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset to flip, offset the error must name): every header byte, then files' bytes."""
    header = read_container(str(path))
    crc_at = header.data_offset - 4
    cases = [(at, 0) for at in range(8)]  # magic
    cases += [(at, 8) for at in range(8, 12)]  # version
    cases += [(at, -1) for at in range(12, 16)]  # header size: any of several errors
    cases += [(at, crc_at) for at in range(16, header.data_offset)]  # JSON, CRC
    start = header.data_offset
    for entry in header.files:
        for at in (0, 5, 23, 24, entry.size // 2, entry.size - 1):
            cases.append((start + at, start))
        start += entry.size
    return cases


@SOURCES
def test_a_flipped_byte_anywhere_in_a_container_is_refused_with_its_place(
    tmp_path: Path, container: tuple[Path, dict[str, object], Clock], kind: str
) -> None:
    path, _expected, _clock = container
    good = path.read_bytes()
    (tmp_path / "empty").mkdir()
    cases = damaged_offsets(path)
    assert len(cases) > 100
    for at, expected_offset in cases:
        damaged = bytearray(good)
        damaged[at] ^= 0x01
        path.write_bytes(damaged)
        for target in (tmp_path / "dst", tmp_path / "empty"):
            with pytest.raises(CorruptionError) as failure:
                build_store(str(target), source_of(kind, path), [], None)
            assert failure.value.path == name_of(kind, path), at
            if expected_offset >= 0:
                assert failure.value.offset == expected_offset, (at, failure.value)
        assert not (tmp_path / "dst").exists() and os.listdir(tmp_path / "empty") == []
        assert not [n for n in os.listdir(tmp_path) if ".restoring-" in n]
    path.write_bytes(good)
    build_store(str(tmp_path / "dst"), source_of(kind, path), [], None)  # (it was good)


@SOURCES
def test_a_truncated_or_extended_container_is_refused(
    tmp_path: Path, container: tuple[Path, dict[str, object], Clock], kind: str
) -> None:
    path, _expected, _clock = container
    good = path.read_bytes()
    header = read_container(str(path))
    for data, offset, reason in [
        (good[:-1], len(good) - 1, "container truncated"),
        (good[: header.data_offset], header.data_offset, "container truncated"),
        (good[:20], 20, "truncated"),
        (good[:10], 0, "truncated"),
        (b"", 0, "truncated"),
        (good + b"\0", len(good), "1 bytes after the container's last file"),
        (good + bytes(5000), len(good), "5000 bytes after the container's last file"),
    ]:
        path.write_bytes(data)
        with pytest.raises(CorruptionError) as failure:
            build_store(str(tmp_path / "dst"), source_of(kind, path), [], None)
        assert (failure.value.path, failure.value.offset) == (name_of(kind, path), offset)
        assert reason in failure.value.reason
        assert not (tmp_path / "dst").exists()
        assert not [n for n in os.listdir(tmp_path) if ".restoring-" in n]


def test_a_streams_own_error_passes_through_and_its_iterator_is_closed(
    tmp_path: Path, container: tuple[Path, dict[str, object], Clock]
) -> None:
    path, _expected, _clock = container
    good = path.read_bytes()
    header = read_container(str(path))
    closed: list[int] = []

    class Lost(Exception):
        pass

    def failing(after: int) -> Iterator[bytes]:
        try:
            yield from pieces(good[:after])
            raise Lost(after)
        finally:
            closed.append(after)

    def damaged_then_more() -> Iterator[bytes]:
        try:
            yield good[: header.data_offset] + bytes(header.files[0].size)  # its CRC is wrong
            yield good[header.data_offset + header.files[0].size :]
        finally:
            closed.append(-1)

    for after in (0, 10, header.data_offset + 3, len(good)):  # len: after the last byte
        with pytest.raises(Lost):
            build_store(str(tmp_path / "dst"), ContainerStream(STREAM, failing(after)), [], None)
        assert closed[-1] == after and not (tmp_path / "dst").exists()
    with pytest.raises(CorruptionError) as failure:
        build_store(str(tmp_path / "dst"), ContainerStream(STREAM, damaged_then_more()), [], None)
    assert (failure.value.path, failure.value.offset) == (STREAM, header.data_offset)
    assert closed[-1] == -1  # closed at the error, not left to the collector
    assert not (tmp_path / "dst").exists()
    assert not [n for n in os.listdir(tmp_path) if ".restoring-" in n]


def test_a_header_whose_seq_is_not_the_segments_is_refused(
    tmp_path: Path, container: tuple[Path, dict[str, object], Clock]
) -> None:
    path, _expected, _clock = container
    good = path.read_bytes()
    header = read_container(str(path))
    for seq in (header.seq - 1, header.seq + 1):
        path.write_bytes(encode_container_header(seq, header.files) + good[header.data_offset :])
        with pytest.raises(CorruptionError, match=f"header says seq {seq}, its segments' records"):
            build_store(str(tmp_path / "dst"), str(path), [], None)
        assert not (tmp_path / "dst").exists()


def test_a_closed_capture_is_not_written(tmp_path: Path) -> None:
    with open_store(tmp_path / "src", Clock()) as source:
        source["k"] = 1
        captured = capture(source._engine)
        captured.close()
        captured.close()
        with pytest.raises(ValueError, match="closed"):
            write_container(captured, str(tmp_path / "snap"))
    assert not (tmp_path / "snap").exists()
    assert OS_FS.exists(str(tmp_path / "src"))


def test_a_captured_file_cut_short_since_is_reported_and_no_container_is_left(
    tmp_path: Path,
) -> None:
    with open_store(tmp_path / "src", Clock()) as source:
        for i in range(100):
            source[f"k{i}"] = "v" * 50
        captured = capture(source._engine)
    with captured:
        active = captured.files[-1]
        os.truncate(active.path, active.size - 10)  # (not something a store does)
        with pytest.raises(CorruptionError) as failure:
            write_container(captured, str(tmp_path / "snap"), durable=True)
    assert (failure.value.path, failure.value.offset) == (active.path, active.size - 10)
    assert "10 bytes before its end" in failure.value.reason
    assert not (tmp_path / "snap").exists()
