"""The pure JetStream wire pieces (``logstate.replication._jsapi``): parsing and errors.

Times parse to the nanosecond digits the server sends, in any zone; header
blocks parse as the server stores them; the header size is the one the
server counts against ``max_payload`` (checked against a server in
test_client); every error pickles with its fields.
"""

from __future__ import annotations

import base64
import calendar
import pickle

import pytest

from logstate._errors import ReplicationError
from logstate.replication._jsapi import (
    ApiError,
    ObjectNotFound,
    WrongLastSequence,
    api_error,
    direct_message,
    headers_size,
    parse_headers,
    parse_time,
    stored_message,
)

EPOCH_2026 = calendar.timegm((2026, 12, 1, 23, 31, 3, 0, 0, 0))


def test_times_parse_with_nanoseconds_and_zones() -> None:
    assert parse_time("2026-12-01T23:31:03Z") == EPOCH_2026
    assert parse_time("2026-12-01T23:31:03.181489303Z") == pytest.approx(EPOCH_2026 + 0.181489303)
    assert parse_time("2026-12-01T23:31:03.5+01:00") == EPOCH_2026 + 0.5 - 3600
    assert parse_time("2026-12-01T23:31:03.25-00:30") == EPOCH_2026 + 0.25 + 1800
    with pytest.raises(ValueError, match="not an RFC 3339 time"):
        parse_time("yesterday")


def test_header_blocks_parse_and_size_as_sent() -> None:
    block = b"NATS/1.0\r\nNats-Msg-Id: p:1:1-1\r\nLogstate-Seq: 1-1\r\n\r\n"
    headers = parse_headers(block)
    assert headers == {"Nats-Msg-Id": "p:1:1-1", "Logstate-Seq": "1-1"}
    assert headers_size(headers) == len(block)
    assert headers_size({}) == 0


def test_stored_and_direct_answers_become_the_same_message() -> None:
    block = b"NATS/1.0\r\nK: v\r\n\r\n"
    stored = stored_message(
        {
            "subject": "s.a",
            "seq": 7,
            "hdrs": base64.b64encode(block).decode(),
            "data": base64.b64encode(b"payload").decode(),
            "time": "2026-12-01T23:31:03.5Z",
        }
    )
    direct = direct_message(
        {
            "K": "v",
            "Nats-Stream": "S",
            "Nats-Subject": "s.a",
            "Nats-Sequence": "7",
            "Nats-Time-Stamp": "2026-12-01T23:31:03.5Z",
            "Nats-Num-Pending": "0",
            "Nats-Last-Sequence": "3",
        },
        b"payload",
    )
    assert stored == direct
    assert stored.headers == {"K": "v"} and stored.time_s == EPOCH_2026 + 0.5
    empty = stored_message({"subject": "s.b", "seq": 8, "time": "2026-12-01T23:31:03Z"})
    assert (empty.headers, empty.data) == ({}, b"")


def test_error_answers_map_to_typed_errors_that_pickle_with_their_fields() -> None:
    wrong = api_error(
        "S", "s.a", {"code": 400, "err_code": 10071, "description": "wrong last sequence: 12"}
    )
    assert isinstance(wrong, WrongLastSequence) and isinstance(wrong, ReplicationError)
    assert (wrong.stream, wrong.subject, wrong.last_seq) == ("S", "s.a", 12)
    other = api_error("S", "x", {"code": 404, "err_code": 10059, "description": "stream not found"})
    assert type(other) is ApiError and other.err_code == 10059
    assert "10059" in str(other) and "stream not found" in str(other)
    missing = ObjectNotFound("snaps", "p/1")
    assert isinstance(missing, KeyError)
    assert (
        str(missing)
        == "replication of '' on stream 'OBJ_snaps': object 'p/1' not found in bucket 'snaps'"
    )
    plain = ReplicationError("S", "p", "lost", seq=5)
    assert str(plain) == "replication of 'p' on stream 'S': lost (seq 5)"
    for error in (wrong, other, missing, plain):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert vars(back) == vars(error)
