"""Records received from a changelog stream, appended to the log as they are.

Owns: ``Ingester.ingest`` (bound as ``Engine.ingest``): the checks of the
records a replication received whole from its stream (frame and CRC, a body
that replays, seqs that continue the local seq exactly), appending them
byte for byte in runs that fit a segment, applying them to the index as
recovery would (``Keydir.apply_frame``), and making them durable. They are
never queued for the commit listener: the stream has them already.
Must never: change a record's bytes, append anything before every record of
the call was checked, or wait for the sync under the write lock.

Interrupts: each run is one ``Appender.append`` (one ``write(2)``), settled
as one by ``Appender.settle`` (all of its records or none). A call whose
records fit one segment is one run: all or nothing; a larger one may stop
between runs, leaving the store at a prefix of the records (the local seq
says where: calling again with the rest continues it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from logstate import _format as fmt
from logstate._append import Appender
from logstate._errors import CorruptionError
from logstate._format import FRAME_HEADER_SIZE, REC_COMPACTED, SEGMENT_HEADER_SIZE
from logstate._keydir import Keydir
from logstate._scan import Frame, replay_frame

__all__ = ["Ingester"]

_Checked = tuple[bytes, Frame]  # a record and its frame (offset 0 in the record)


class Ingester:
    """Ingests records into one engine (``check_writable``: the writer's, under the lock;
    ``commit``: ``GroupCommit.commit``)."""

    def __init__(
        self,
        lock: threading.Lock,
        keydir: Keydir,
        appender: Appender,
        commit: Callable[[int], None],
        check_writable: Callable[[], None],
        segment_size: int,
    ) -> None:
        self._lock = lock
        self._keydir = keydir
        self._appender = appender
        self._commit = commit
        self._check_writable = check_writable
        self._run_size = segment_size - SEGMENT_HEADER_SIZE  # bytes of records in one run

    def ingest(self, records: Sequence[bytes]) -> None:
        """Append ``records``, received from the stream, as they are; durable on return.

        Every record is checked before the first is written; the index then
        holds their operations as if this store had written them, and the
        local seq is the last one's. The commit listener is not called for
        them. An fdatasync follows in every ``sync`` mode.

        Args:
            records: whole framed records, exactly as a commit listener got
                them, in seq order; the first one's seq is the local seq + 1
                and each next one's is one more.

        Raises:
            TypeError: a record is not bytes.
            CorruptionError: a record's frame, checksum or body is bad
                (``path`` "", ``offset`` within that record; the reason
                names the record's index in ``records``). Nothing is written.
            ValueError: the seqs do not continue the local seq exactly (the
                message names the expected and the given seq), or a record
                is a compaction marker. Nothing is written.
            StorageClosedError / FencedError / StorageFailedError /
                ReadOnlyStorageError: the engine is not writable.
            OSError: a write or the sync failed (the engine then refuses
                writes); the store holds a prefix of the records (see the
                module docstring).
        """
        checked = [_checked(i, record) for i, record in enumerate(records)]
        if not checked:
            return
        ap = self._appender
        with self._lock:
            self._check_writable()
            expected = ap.seq + 1
            for i, (_record, frame) in enumerate(checked):
                if frame.seq != expected + i:
                    raise ValueError(
                        f"ingested record {i} has seq {frame.seq}, expected {expected + i}: "
                        f"records must continue the local seq ({ap.seq}) exactly"
                    )
            for run in self._runs(checked):
                data = run[0][0] if len(run) == 1 else b"".join(record for record, _f in run)
                try:
                    segment, offset = ap.append(data, ingested=True)
                    position = 0
                    for _record, frame in run:
                        self._keydir.apply_frame(
                            data, frame._replace(offset=position), segment, -offset
                        )
                        position += frame.size
                    ap.seq = run[-1][1].seq
                except BaseException:
                    ap.interrupted()  # the run whole in the file: applied; else cut
                    raise
                ap.in_flight = None
            end_pos = ap.written_pos
        self._commit(end_pos)

    def _runs(self, checked: list[_Checked]) -> list[list[_Checked]]:
        """``checked`` cut into runs of at most a segment's bytes (a larger record alone)."""
        runs: list[list[_Checked]] = [[]]
        run_size = 0
        for item in checked:
            size = item[1].size
            if runs[-1] and run_size + size > self._run_size:
                runs.append([])
                run_size = 0
            runs[-1].append(item)
            run_size += size
        return runs


def _checked(index: int, record: object) -> _Checked:
    """``record`` (the ``index``-th of a call) and its frame, once checked whole.

    Raises:
        TypeError, CorruptionError, ValueError: as ``Ingester.ingest``.
    """
    if isinstance(record, (bytearray, memoryview)):
        record = bytes(record)
    if not isinstance(record, bytes):
        raise TypeError(f"ingested record {index} must be bytes, got {type(record).__name__}")
    try:
        record_type = fmt.check_record(record)
        if record_type == REC_COMPACTED:
            raise ValueError(
                f"ingested record {index} is a compaction marker, not a record of a stream"
            )
        replay_frame(record, 0, len(record), record_type)  # its body parses (not applied)
    except CorruptionError as exc:
        raise CorruptionError("", exc.offset, f"ingested record {index}: {exc.reason}") from None
    (seq,) = fmt.SEQ.unpack_from(record, FRAME_HEADER_SIZE)
    return record, Frame(0, len(record), record_type, seq)
