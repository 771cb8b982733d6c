"""The changelog message layer (pure): packing, chunking, reading back, replay checks."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from logstate import _format as fmt
from logstate.replication import _wire as wire
from logstate.replication._wire import Identity, MessageError, Pending, Replay

WHO = Identity("orders.0", "ab" * 16, 3)


def record(seq: int, size: int = 10) -> bytes:
    body = fmt.encode_name("") + fmt.encode_name(f"k{seq}") + b"v" * size
    return fmt.encode_record(fmt.REC_SET, seq, body)


def message(
    first: int, last: int, payload: bytes, stream_seq: int = 1, chunk: wire.Chunk | None = None
) -> wire.Received:
    headers = wire.message_headers(WHO, first, last, (1.0, 1.001), payload, stream_seq - 1, chunk)
    return wire.read_message(stream_seq, headers, payload)


def test_a_run_holds_whole_records_up_to_the_size_limit() -> None:
    pending = [Pending(s, record(s, 100), 1.0) for s in range(1, 11)]
    size = len(pending[0].record)
    assert wire.plan_run(pending, size * 3) == 3
    assert wire.plan_run(pending, size * 3 - 1) == 2
    assert wire.plan_run(pending, 1) == 1  # a first record over the limit goes alone


def test_a_run_spans_at_most_the_time_limit() -> None:
    pending = [
        Pending(1, record(1), 1.0),
        Pending(2, record(2), 1.005),
        Pending(3, record(3), 1.02),
    ]
    assert wire.plan_run(pending, 1 << 20) == 2


def test_message_round_trip_gives_the_exact_records() -> None:
    recs = [record(s) for s in range(5, 9)]
    got = message(5, 8, b"".join(recs), stream_seq=42)
    assert (got.first, got.last, got.writer, got.epoch, got.stream_seq) == (5, 8, WHO.writer, 3, 42)
    assert got.msg_id == "orders.0:3:5-8"
    assert wire.split_records(got) == [(5 + i, r) for i, r in enumerate(recs)]


def test_a_damaged_payload_is_refused_by_its_checksum() -> None:
    payload = record(1)
    headers = wire.message_headers(WHO, 1, 1, (1.0, 1.0), payload, 0)
    bad = bytearray(payload)
    bad[-1] ^= 1
    with pytest.raises(MessageError, match="checksum") as info:
        wire.read_message(7, headers, bytes(bad))
    assert info.value.stream_seq == 7


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Logstate-Seq": None}, "not a logstate changelog message"),
        ({"Logstate-Writer": "zz"}, "malformed writer id"),
        ({"Logstate-Seq": "3-1"}, "not a range"),
        ({"Logstate-Epoch": "x"}, "not a number"),
        ({"Logstate-Time": "now"}, "malformed Logstate-Time"),
        ({"Logstate-Kind": "other"}, "unknown message kind"),
    ],
)
def test_malformed_headers_are_named(change: dict[str, str | None], reason: str) -> None:
    payload = record(1)
    headers = wire.message_headers(WHO, 1, 1, (1.0, 1.0), payload, 0)
    for name, value in change.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    with pytest.raises(MessageError, match=reason):
        wire.read_message(1, headers, payload)


def test_headers_that_disagree_with_the_payload_are_refused() -> None:
    with pytest.raises(MessageError, match="payload holds seqs 1-2, headers say 1-3"):
        wire.split_records(message(1, 3, record(1) + record(2)))
    with pytest.raises(MessageError, match="record seq 3 where 2 was expected"):
        wire.split_records(message(1, 2, record(1) + record(3)))
    with pytest.raises(MessageError, match="damaged record"):
        wire.split_records(message(1, 1, record(1)[:-1]))


def test_replay_refuses_a_gap_and_names_the_message() -> None:
    replay = Replay(0)
    assert replay.feed(message(1, 2, record(1) + record(2), stream_seq=1)) == [
        (1, record(1)),
        (2, record(2)),
    ]
    with pytest.raises(MessageError, match="seq gap: records 4-4 follow seq 2") as info:
        replay.feed(message(4, 4, record(4), stream_seq=9))
    assert info.value.stream_seq == 9


def test_replay_skips_what_it_holds_and_trims_a_message_it_starts_inside() -> None:
    replay = Replay(3)
    assert replay.feed(message(1, 2, record(1) + record(2))) == []
    got = replay.feed(message(3, 5, record(3) + record(4) + record(5)))
    assert [seq for seq, _ in got] == [4, 5]
    assert replay.last_seq == 5


def test_chunks_restore_only_whole() -> None:
    big = record(7, 5000)
    chunks = wire.chunk_record(big, 1024)
    assert len(chunks) == -(-len(big) // 1024) and b"".join(p for _, p in chunks) == big
    replay = Replay(6)
    out: list[tuple[int, bytes]] = []
    for i, (chunk, part) in enumerate(chunks):
        out += replay.feed(message(7, 7, part, stream_seq=10 + i, chunk=chunk))
        assert (replay.pending_chunk is None) == (i == len(chunks) - 1)
    assert out == [(7, big)]


def test_a_chunk_out_of_place_is_refused() -> None:
    chunks = wire.chunk_record(record(1, 3000), 1024)
    replay = Replay(0)
    replay.feed(message(1, 1, chunks[0][1], chunk=chunks[0][0]))
    with pytest.raises(MessageError, match="chunk 2/3 where 1 was due"):
        replay.feed(message(1, 1, chunks[2][1], stream_seq=3, chunk=chunks[2][0]))
    fresh = Replay(0)
    with pytest.raises(MessageError, match="chunk 1 without chunk 0"):
        fresh.feed(message(1, 1, chunks[1][1], chunk=chunks[1][0]))
    cut = Replay(0)
    cut.feed(message(1, 1, chunks[0][1], chunk=chunks[0][0]))
    with pytest.raises(MessageError, match="cut short"):
        cut.feed(message(2, 2, record(2), stream_seq=5))


def test_a_marker_past_the_replay_point_is_a_gap() -> None:
    headers = wire.message_headers(WHO, 9, 9, (1.0, 1.0), b"", 4, kind=wire.KIND_MARKER)
    marker = wire.read_message(5, headers, b"")
    assert Replay(9).feed(marker) == []
    with pytest.raises(MessageError, match="re-based on a snapshot at seq 9"):
        Replay(3).feed(marker)


def test_partition_names_are_subject_tokens() -> None:
    assert wire.check_partition("orders.0") == "orders.0"
    for bad in ("", "a..b", "a b", "a.*", "a.>", "x" * 201):
        with pytest.raises(ValueError, match="partition"):
            wire.check_partition(bad)


@given(
    headers=st.dictionaries(
        st.sampled_from(
            [
                wire.H_SEQ,
                wire.H_WRITER,
                wire.H_EPOCH,
                wire.H_TIME,
                wire.H_CRC,
                wire.H_CHUNK,
                wire.H_KIND,
            ]
        ),
        st.text(max_size=40),
    ),
    payload=st.binary(max_size=200),
)
def test_reading_any_message_either_parses_or_raises_message_error(
    headers: dict[str, str], payload: bytes
) -> None:
    try:
        got = wire.read_message(1, headers, payload)
    except MessageError:
        return
    with contextlib.suppress(MessageError):
        Replay(0).feed(got)


def test_past_the_starting_point_a_seq_stored_twice_is_refused() -> None:
    replay = Replay(0)
    replay.feed(message(1, 2, record(1) + record(2), stream_seq=1))
    with pytest.raises(MessageError, match=r"overlap .* a seq stored twice") as info:
        replay.feed(message(2, 3, record(2) + record(3), stream_seq=2))
    assert info.value.stream_seq == 2
    again = Replay(0)
    again.feed(message(1, 2, record(1) + record(2), stream_seq=1))
    with pytest.raises(MessageError, match="overlap"):
        again.feed(message(1, 1, record(1), stream_seq=2))  # (once skipped silently)


def test_unfinished_chunks_are_dropped_when_a_new_epoch_starts_at_their_seq() -> None:
    chunks = wire.chunk_record(record(1, 3000), 1024)
    replay = Replay(0)
    replay.feed(message(1, 1, chunks[0][1], chunk=chunks[0][0]))
    later = Identity(WHO.partition, WHO.writer, WHO.epoch + 1)
    payload = record(1, 5)
    headers = wire.message_headers(later, 1, 1, (2.0, 2.0), payload, 1)
    assert replay.feed(wire.read_message(2, headers, payload)) == [(1, payload)]
    same_epoch = Replay(0)
    same_epoch.feed(message(1, 1, chunks[0][1], chunk=chunks[0][0]))
    with pytest.raises(MessageError, match="cut short"):
        same_epoch.feed(message(1, 1, payload, stream_seq=2))


def test_subject_patterns_are_matched_as_nats_does() -> None:
    subject = "logstate.STATE.orders.0"
    assert wire.subject_covered(["logstate.STATE.>"], subject)
    assert wire.subject_covered(["other", "logstate.*.orders.*"], subject)
    assert wire.subject_covered([">"], subject)
    assert not wire.subject_covered(["logstate.STATE"], subject)
    assert not wire.subject_covered(["logstate.STATE.orders.0.>"], subject)
    assert not wire.subject_covered(["logstate.*.orders"], subject)
    assert not wire.subject_covered([], subject)
