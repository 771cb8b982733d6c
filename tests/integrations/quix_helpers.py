"""Helpers of the Quix Streams integration tests: a changelog message as Kafka delivers it.

``ChangelogMessage`` has the four methods Quix's ``RecoveryPartition`` reads
of a ``confluent_kafka.Message`` (there is no broker in these tests); every
Quix class the tests drive is the real one.
"""

from __future__ import annotations

import json
from typing import Any

from quixstreams.state.metadata import (
    CHANGELOG_CF_MESSAGE_HEADER,
    CHANGELOG_PROCESSED_OFFSETS_MESSAGE_HEADER,
)


class ChangelogMessage:
    """A changelog record: key, value, offset and Quix's headers."""

    def __init__(
        self,
        key: bytes,
        value: bytes | None,
        offset: int,
        cf_name: str = "default",
        processed_offsets: dict[str, int] | None = None,
        extra_headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self._key = key
        self._value = value
        self._offset = offset
        self._headers: list[tuple[str, bytes]] = [(CHANGELOG_CF_MESSAGE_HEADER, cf_name.encode())]
        if processed_offsets is not None:
            self._headers.append(
                (CHANGELOG_PROCESSED_OFFSETS_MESSAGE_HEADER, json.dumps(processed_offsets).encode())
            )
        self._headers.extend(extra_headers or [])

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def offset(self) -> int:
        return self._offset

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def topic(self) -> str:
        return "changelog"

    def partition(self) -> int:
        return 0


def as_message(obj: Any) -> Any:
    """``obj`` typed for Quix's ``recover_from_changelog_message(changelog_message=...)``."""
    return obj


class RecordingChangelog:
    """A changelog producer that records what it is given and acks every record.

    Stands in for Kafka behind Quix's ``ChangelogProducer`` (same methods):
    ``produce`` calls the delivery callback at once, ``flush`` has nothing
    left in flight.
    """

    changelog_name = "changelog"
    partition = 0

    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes | None, dict[str, Any]]] = []

    def produce(
        self,
        key: bytes,
        value: bytes | None = None,
        headers: Any = None,
        migration: bool = False,
        on_delivery: Any = None,
    ) -> None:
        self.records.append((key, value, dict(headers or {})))
        if on_delivery is not None:
            on_delivery(None, None)

    def flush(self, timeout: float | None = None, migration: bool = False) -> int:
        return 0


class ChangelogFactory:
    """Hands one :class:`RecordingChangelog` per partition (as ``ChangelogProducerFactory``)."""

    def __init__(self) -> None:
        self.producers: dict[int, RecordingChangelog] = {}

    def get_partition_producer(self, partition_num: int) -> Any:
        return self.producers.setdefault(partition_num, RecordingChangelog())
