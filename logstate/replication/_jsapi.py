"""Pure pieces of the JetStream wire API the client needs: parsing, error types, names.

Owns: the JetStream API subjects and codes logstate uses, the parsing of
message headers (``NATS/1.0`` blocks), RFC 3339 nanosecond timestamps and
stored-message answers (``STREAM.MSG.GET`` JSON and ``DIRECT.GET`` headers)
into :class:`Message`; the error types a server answer maps to.
Must never: do I/O, import nats-py, or read a clock.
"""

from __future__ import annotations

import base64
import calendar
import functools
import re
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from logstate._errors import ReplicationError

__all__ = [
    "DIRECT_HEADERS",
    "ERR_NO_MESSAGE",
    "ERR_STREAM_NAME_IN_USE",
    "ERR_STREAM_NOT_FOUND",
    "ERR_WRONG_LAST_SEQUENCE",
    "ApiError",
    "Message",
    "ObjectInfo",
    "ObjectNotFound",
    "WrongLastSequence",
    "api_error",
    "direct_message",
    "headers_size",
    "parse_headers",
    "parse_time",
    "stored_message",
]

ERR_NO_MESSAGE = 10037  # "no message found" (STREAM.MSG.GET)
ERR_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
ERR_STREAM_NOT_FOUND = 10059
ERR_WRONG_LAST_SEQUENCE = 10071  # Nats-Expected-Last-Subject-Sequence did not match

# headers a DIRECT.GET answer adds to the stored message's own headers
DIRECT_HEADERS = frozenset(
    (
        "Nats-Stream",
        "Nats-Subject",
        "Nats-Sequence",
        "Nats-Time-Stamp",
        "Nats-Num-Pending",
        "Nats-Last-Sequence",
    )
)

_WRONG_LAST_RE = re.compile(r"wrong last sequence: (\d+)")
_TIME_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


class Message(NamedTuple):
    """One message stored in a stream.

    Attributes:
        stream_seq: its sequence number in the stream.
        subject: its subject.
        headers: the headers it was published with (a later value of a
            repeated header wins).
        data: its payload.
        time_s: when the server stored it, epoch seconds.
    """

    stream_seq: int
    subject: str
    headers: dict[str, str]
    data: bytes
    time_s: float


class ObjectInfo(NamedTuple):
    """One object of an object store bucket (deleted objects are never listed).

    Attributes:
        name: the object's name.
        size: its size in bytes.
        description: the description it was put with ("" when none).
        mtime: when it was put, epoch seconds (the putting client's clock).
    """

    name: str
    size: int
    description: str
    mtime: float


class ApiError(ReplicationError):
    """The server answered a JetStream API call with an error.

    Attributes:
        err_code: JetStream's error code (10071, 10059 ...), 0 when it gave none.
        code: the HTTP-like status (400, 404, 503 ...).
        description: the server's words.
        subject: the subject or API subject the call was made on.
    """

    def __init__(
        self, stream: str, subject: str, err_code: int, code: int, description: str
    ) -> None:
        self.subject = subject
        self.err_code = err_code
        self.code = code
        self.description = description
        super().__init__(
            stream, "", f"{subject}: server error {err_code} (status {code}): {description}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.stream, self.subject, self.err_code, self.code, self.description),
        )


class WrongLastSequence(ApiError):
    """A publish with ``Nats-Expected-Last-Subject-Sequence`` found another last sequence.

    JetStream error 10071. Nothing was stored by this publish.

    Attributes:
        last_seq: the subject's actual last stream seq, from the server's
            description ("wrong last sequence: N"); None if it had no number.
    """

    def __init__(
        self, stream: str, subject: str, err_code: int, code: int, description: str
    ) -> None:
        super().__init__(stream, subject, err_code, code, description)
        match = _WRONG_LAST_RE.search(description)
        self.last_seq: int | None = int(match.group(1)) if match else None


class ObjectNotFound(ReplicationError, KeyError):
    """The bucket has no object of that name (also a :class:`KeyError`).

    Attributes:
        bucket: the object store bucket.
        name: the object's name.
    """

    def __init__(self, bucket: str, name: str) -> None:
        self.bucket = bucket
        self.name = name
        super().__init__(f"OBJ_{bucket}", "", f"object {name!r} not found in bucket {bucket!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.bucket, self.name))

    def __str__(self) -> str:
        return ReplicationError.__str__(self)


def api_error(stream: str, subject: str, error: Mapping[str, Any]) -> ApiError:
    """The exception for the ``"error"`` object of a JetStream API answer."""
    err_code = int(error.get("err_code") or 0)
    code = int(error.get("code") or 0)
    description = str(error.get("description") or "")
    cls = WrongLastSequence if err_code == ERR_WRONG_LAST_SEQUENCE else ApiError
    return cls(stream, subject, err_code, code, description)


def parse_headers(block: bytes) -> dict[str, str]:
    """The headers of a ``NATS/1.0`` header block (status line dropped)."""
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().decode("utf-8", "replace")] = value.strip().decode(
                "utf-8", "replace"
            )
    return headers


def headers_size(headers: Mapping[str, str]) -> int:
    """Bytes of the ``NATS/1.0`` block that carries ``headers`` (0 for none)."""
    if not headers:
        return 0
    fields = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    return len(b"NATS/1.0\r\n") + fields + 2


@functools.lru_cache(maxsize=256)
def _whole_seconds(whole: str) -> int:
    # the messages of a batch share few distinct seconds: strptime is slow
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))


def parse_time(text: str) -> float:
    """Epoch seconds of an RFC 3339 time with up to nanoseconds ("...T23:31:03.1814893Z").

    Raises:
        ValueError: not such a time.
    """
    match = _TIME_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    whole, fraction, zone = match.groups()
    seconds = float(_whole_seconds(whole))
    if fraction:
        seconds += int(fraction) / 10 ** len(fraction)
    if zone != "Z":
        offset_s = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
        seconds -= offset_s if zone[0] == "+" else -offset_s
    return seconds


def stored_message(answer: Mapping[str, Any]) -> Message:
    """The :class:`Message` of a ``STREAM.MSG.GET`` answer's ``"message"`` object."""
    hdrs = answer.get("hdrs")
    data = answer.get("data")
    return Message(
        stream_seq=int(answer["seq"]),
        subject=str(answer["subject"]),
        headers=parse_headers(base64.b64decode(hdrs)) if hdrs else {},
        data=base64.b64decode(data) if data else b"",
        time_s=parse_time(str(answer["time"])),
    )


def direct_message(headers: Mapping[str, str], data: bytes) -> Message:
    """The :class:`Message` of one ``DIRECT.GET`` answer (the ``Nats-*`` it adds removed).

    Raises:
        KeyError: ``headers`` lacks ``Nats-Sequence`` or ``Nats-Subject``.
    """
    stamp = headers.get("Nats-Time-Stamp")
    return Message(
        stream_seq=int(headers["Nats-Sequence"]),
        subject=headers["Nats-Subject"],
        headers={k: v for k, v in headers.items() if k not in DIRECT_HEADERS},
        data=bytes(data),
        time_s=parse_time(stamp) if stamp else 0.0,
    )
