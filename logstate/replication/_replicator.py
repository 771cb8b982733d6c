"""One open engine's replication: what an open does with the stream, snapshots, retention.

Owns: ``Replicator.open`` (the writer id and epoch, the stream's head
against the local log, catching up, taking over, refusing a diverged copy,
the local records still to ship), the replication snapshots (capture, wait
for the broker, upload, retention), and the state file's updates.
Must never: reuse a seq the stream holds for other data, let compaction
rewrite a record the broker has not acknowledged (``hold_compaction``), or
publish from a forked child.

docs/replication.md is the user's account of all of this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from logstate._errors import FencedError, ReplicationError
from logstate._format import SEGMENT_HEADER_SIZE
from logstate._fs import OS_FS
from logstate._hooks import ReplicationLag
from logstate._scan import ignore_damage, scan_records
from logstate.replication import _loop
from logstate.replication import _wire as wire
from logstate.replication._client import Client
from logstate.replication._config import ChangelogConfig, bucket_name, snapshot_name
from logstate.replication._shipper import Shipper
from logstate.replication._snapshot import capture, write_container
from logstate.replication._state import ReplicationState, load_state, new_writer_id, save_state
from logstate.replication._stream import check_still_held, stream_records
from logstate.replication._wire import Identity, MessageError

__all__ = ["Replicator"]

log = logging.getLogger("logstate.replication")

Progress = Callable[[str, int, int], None]  # (step, bytes done, bytes in all)
SNAPSHOT_TMP_NAME: Final = "replication-snapshot.tmp"  # (removed by recovery if left)
_STATE_SAVE_EVERY_S: Final = 1.0


def _no_progress(_step: str, _done: int, _total: int) -> None:
    """A ``progress`` that shows nothing."""


class Replicator:
    """One open engine's replication (the engine's ``replication``)."""

    def __init__(
        self, changelog: ChangelogConfig, client: Client, engine: Any, mode: str | None
    ) -> None:
        self.changelog = changelog
        self.client = client
        self.engine = engine
        self.path: str = engine.path
        self.mode = mode  # the open's restore= mode
        self.closed = False
        self.state: ReplicationState | None = None
        self.shipper: Shipper | None = None
        self._state_lock = threading.Lock()
        self._saved_at = 0.0
        self._snapshot_lock = threading.Lock()
        self._snapshot_thread: threading.Thread | None = None
        self._bytes_at_snapshot = 0

    # ------------------------------------------------------------------ open
    def _error(self, reason: str, seq: int | None = None) -> ReplicationError:
        return ReplicationError(self.changelog.stream, self.changelog.partition, reason, seq)

    def _fenced_error(self, by_writer: str, kept: tuple[int, int] | None) -> FencedError:
        cl = self.changelog
        return FencedError(self.path, cl.stream, cl.partition, by_writer, kept)

    def head(self) -> wire.Received | None:
        cl = self.changelog
        msg = self.client.last_message(cl.stream, cl.subject, cl.timeout_s)
        if msg is None:
            return None
        try:
            return wire.read_message(msg.stream_seq, msg.headers, msg.data)
        except MessageError as exc:
            raise self._error(f"the subject's last message is not usable: {exc}") from None

    def open(self) -> None:
        cl, engine = self.changelog, self.engine
        cl.ensure_stream(self.client)
        state = load_state(self.path)
        if state is not None and (state.stream, state.partition) != (cl.stream, cl.partition):
            raise self._error(
                f"{self.path} replicates partition {state.partition!r} of stream "
                f"{state.stream!r}, not this one"
            )
        if state is None:
            state = ReplicationState(cl.stream, cl.partition, cl.subject, new_writer_id())
        if state.fenced is not None:
            kept = state.fenced.get("kept_aside")
            raise self._fenced_error(
                str(state.fenced.get("by_writer", "")), None if kept is None else tuple(kept)
            )
        self.state = state
        local = engine.appender.seq
        head = self.head()
        resume: tuple[int, int] | None = None
        if head is None:
            epoch, head_stream_seq, acked = max(state.epoch, 1), 0, 0
        else:
            head_last = head.last
            cut = head.chunk is not None and head.chunk.part + 1 < head.chunk.parts
            if cut:
                head_last = head.first - 1  # its record is not whole in the stream yet
            if head.writer != state.writer and local > state.acked_seq:
                self._own_messages_after(state, local)  # (the file may lag: a crash)
            if head.writer == state.writer:
                if cut and head.chunk is not None:  # (only its own writer resumes them)
                    resume = (head.first, head.chunk.part)
                epoch, head_stream_seq = head.epoch, head.stream_seq
                if head_last > local:  # a power loss after shipping: take back what is lost
                    self._catch_up(state, local, head_last)
                    local = head_last
                if resume is not None and local < resume[0]:
                    # a power loss took the record whose chunks were being shipped:
                    # the seq goes to other data, so under a new epoch (a restore
                    # drops the unfinished chunks when the next epoch starts there)
                    resume = None
                    epoch += 1
                acked = head_last
            elif local >= head_last and (
                head.stream_seq == state.acked_stream_seq
                or (cut and state.acked_seq == head_last and self._cut_chunks_after(state, head))
            ):
                # restored from (or caught up to) this head: take the partition over
                epoch, head_stream_seq, acked = head.epoch + 1, head.stream_seq, head_last
            elif local == state.acked_seq and local <= head_last:
                if self.mode != "if-behind":
                    raise self._error(
                        f"{self.path} is behind the stream (local seq {local}, stream seq "
                        f"{head_last}, written by another writer): open it with "
                        "restore='if-behind' to catch up",
                        local,
                    )
                self._catch_up(state, local, head_last)
                local = head_last
                epoch, head_stream_seq, acked = head.epoch + 1, head.stream_seq, head_last
            else:
                # local commits the stream never got, and another writer wrote after them
                kept = (state.acked_seq + 1, local) if local > state.acked_seq else None
                error = self._fenced_error(head.writer, kept)
                state.fenced = {"by_writer": head.writer, "epoch": head.epoch, "kept_aside": kept}
                save_state(self.path, state)
                raise error
        tail = self._local_tail(acked, local)
        if tail is None:  # the local log no longer holds them: re-base the stream on a snapshot
            log.warning(
                "%s: local records %d-%d are compacted away; re-basing the changelog on a "
                "snapshot at seq %d",
                self.path,
                acked + 1,
                local,
                local,
            )
        state.epoch = epoch
        shipper = Shipper(
            self.client,
            cl.stream,
            cl.subject,
            Identity(cl.partition, state.writer, epoch),
            head_stream_seq=head_stream_seq,
            acked_seq=acked,
            ack=cl.ack,
            timeout_s=cl.timeout_s,
            max_lag_bytes=cl.max_lag_bytes,
            on_ack=self._on_ack,
            on_fenced=self._on_fenced,
            fenced_error=self._fenced_error,
        )
        shipper.resume_chunk = resume
        self.shipper = shipper
        if tail is None:
            self._rebase(local)
        else:
            shipper.add_backlog(tail, time.time())
        state.acked_seq, state.acked_stream_seq = shipper.acked_seq, shipper.head_stream_seq
        save_state(self.path, state)
        engine.compactor.hold = self.hold_compaction
        engine.add_commit_listener(shipper.on_commit, shipper.offer if cl.ack == "sync" else None)
        shipper.start(f"logstate-ship:{self.path}")

    def _own_messages_after(self, state: ReplicationState, local: int) -> None:
        """Move ``state``'s acknowledged point over this writer's messages the stream
        holds after it (up to ``local``): the file is saved at most once a second."""
        cl = self.changelog
        for msg in self.client.messages(
            cl.stream, cl.subject, state.acked_stream_seq + 1, cl.timeout_s
        ):
            try:
                got = wire.read_message(msg.stream_seq, msg.headers, msg.data)
            except MessageError:
                return
            if got.writer != state.writer or got.kind != wire.KIND_RECORDS:
                return
            if got.first != state.acked_seq + 1 or got.last > local:
                return
            if got.chunk is None or got.chunk.part + 1 == got.chunk.parts:
                state.acked_seq, state.acked_stream_seq = got.last, got.stream_seq

    def _cut_chunks_after(self, state: ReplicationState, head: wire.Received) -> bool:
        """Are the subject's messages after this copy's point only the chunks of
        ``head``'s record, which its writer never finished (died between them)?"""
        cl = self.changelog
        after = state.acked_stream_seq
        if after <= 0:
            return False
        for msg in self.client.messages(
            cl.stream, cl.subject, after + 1, cl.timeout_s, until_stream_seq=head.stream_seq
        ):
            try:
                got = wire.read_message(msg.stream_seq, msg.headers, msg.data)
            except MessageError:
                return False
            if got.chunk is None or got.first != head.first or got.writer != head.writer:
                return False
        return True

    def _catch_up(self, state: ReplicationState, local: int, until: int) -> None:
        """Append the stream's records after ``local`` (up to ``until``) to the local log."""
        start = state.acked_stream_seq + 1 if 0 < state.acked_seq <= local else 1
        check_still_held(self.client, self.changelog, start, local, self.path)
        records = [
            rec
            for rec in stream_records(self.client, self.changelog, start, local, until_seq=until)
        ]
        if (records and records[-1][0] != until) or (not records and until > local):
            raise self._error(f"the stream lacks records {local + 1}-{until} to catch up", local)
        self.engine.ingest([rec for _seq, rec in records])
        log.info("%s: caught up from the stream: seqs %d-%d", self.path, local + 1, until)

    def _local_tail(self, after: int, local: int) -> list[tuple[int, bytes]] | None:
        """The local records ``after+1 .. local`` as written, or None if they are gone."""
        if local <= after:
            return []
        segments = self.engine.segments
        found: dict[int, bytes] = {}
        for number in sorted(segments.segments, reverse=True):
            data = segments.read_whole(segments.segments[number])
            lowest = None
            for frame in scan_records(data, SEGMENT_HEADER_SIZE, ignore_damage):
                seq = frame.seq
                lowest = seq if lowest is None else min(lowest, seq)
                if after < seq <= local and seq not in found:
                    found[seq] = data[frame.offset : frame.offset + frame.size]
            if lowest is not None and lowest <= after + 1:
                break
        if len(found) != local - after:
            return None
        return [(seq, found[seq]) for seq in range(after + 1, local + 1)]

    def _rebase(self, local: int) -> None:
        """Upload a snapshot at ``local``, then a marker: the stream continues from there."""
        shipper = self.shipper
        assert shipper is not None
        shipper.acked_seq = shipper.queued_seq = shipper.told_seq = local
        self._upload_snapshot(stream_seq=0)
        who = shipper.who
        headers = wire.message_headers(
            who,
            local,
            local,
            (time.time(), time.time()),
            b"",
            shipper.head_stream_seq,
            kind=wire.KIND_MARKER,
        )
        cl = self.changelog
        shipper.head_stream_seq = self.client.publish(cl.subject, b"", headers, cl.timeout_s)

    # ------------------------------------------------------------------ shipper callbacks
    def _on_ack(self, last_seq: int, stream_seq: int) -> None:
        state = self.state
        assert state is not None and self.shipper is not None
        with self._state_lock:
            state.acked_seq, state.acked_stream_seq = last_seq, stream_seq
            state.acked_time_s = time.time()
            now = time.monotonic()
            if now - self._saved_at >= _STATE_SAVE_EVERY_S:
                self._saved_at = now
                self._save()
        shipped = self.shipper.shipped_bytes
        if shipped - self._bytes_at_snapshot >= self.changelog.snapshot_every:
            self._bytes_at_snapshot = shipped
            self._start_snapshot_thread()

    def _save(self) -> None:
        state = self.state
        assert state is not None
        try:
            save_state(self.path, state)
        except OSError as exc:  # a cache: stats may be stale, nothing is lost
            log.warning("%s: saving the replication state: %r", self.path, exc)

    def _on_fenced(self, error: FencedError) -> FencedError:
        state, shipper = self.state, self.shipper
        assert state is not None and shipper is not None
        error = self.engine.fence(error, acked_seq=shipper.acked_seq)
        with self._state_lock:
            state.fenced = {
                "by_writer": error.by_writer,
                "epoch": state.epoch,
                "kept_aside": None if error.kept_aside is None else list(error.kept_aside),
            }
            self._save()
        return error

    # ------------------------------------------------------------------ snapshots
    def _start_snapshot_thread(self) -> None:
        thread = self._snapshot_thread
        if self.closed or (thread is not None and thread.is_alive()):  # (none at close)
            return

        def run() -> None:
            try:
                self.snapshot()
            except Exception as exc:
                log.warning("%s: replication snapshot failed: %s", self.path, exc)

        self._snapshot_thread = threading.Thread(
            target=run, name=f"logstate-snapshot:{self.path}", daemon=True
        )
        self._snapshot_thread.start()

    def snapshot(self, progress: Progress | None = None) -> dict[str, object]:
        """Upload the store at its current seq, then apply retention (see the docs)."""
        self._check_usable()
        with self._snapshot_lock:
            info = self._upload_snapshot(stream_seq=None, progress=progress)
            self._retention()
            return info

    def _upload_snapshot(
        self, stream_seq: int | None, progress: Progress | None = None
    ) -> dict[str, object]:
        cl, shipper, state = self.changelog, self.shipper, self.state
        assert shipper is not None and state is not None
        show = progress if progress is not None else _no_progress
        cap = capture(self.engine)
        tmp = os.path.join(self.path, SNAPSHOT_TMP_NAME)
        try:
            show("waiting for the broker", 0, cap.size)
            if not shipper.wait_acked(cap.seq, cl.timeout_s):
                if shipper.fenced is not None:
                    raise shipper.fenced_now()
                raise self._error(
                    "snapshot: the broker did not acknowledge the records it holds", cap.seq
                )
            if stream_seq is None:
                stream_seq = self._stream_seq_of(cap.seq)
            with contextlib.suppress(FileNotFoundError):
                OS_FS.unlink(tmp)
            show("writing the snapshot", 0, cap.size)
            written = write_container(cap, tmp)
            show("uploading", 0, written.size)
            info: dict[str, object] = {
                "name": snapshot_name(cl.partition, cap.seq),
                "seq": cap.seq,
                "stream_seq": stream_seq,
                "time": time.time(),
                "writer": shipper.who.writer,
                "epoch": shipper.who.epoch,
                "size": written.size,
            }
            self.client.ensure_bucket(bucket_name(cl.stream), cl.replicas, cl.timeout_s)
            self.client.put_object(
                bucket_name(cl.stream), str(info["name"]), tmp, json.dumps(info), cl.timeout_s
            )
            show("uploaded", written.size, written.size)
        finally:
            cap.close()
            with contextlib.suppress(FileNotFoundError):
                OS_FS.unlink(tmp)
        with self._state_lock:
            state.snapshots = [*state.snapshots, info][-cl.keep_snapshots :]
            self._save()
        return info

    def _stream_seq_of(self, seq: int) -> int:
        """The stream seq of the message holding ``seq`` (0: unknown, read from the start)."""
        shipper = self.shipper
        assert shipper is not None
        previous_last = None
        for last, stream_seq in list(shipper.acked_messages):
            if last >= seq and previous_last is not None and previous_last < seq:
                return stream_seq
            previous_last = last
        return 0

    def _retention(self) -> None:
        """Keep ``keep_snapshots`` snapshots; purge messages only they no longer need."""
        cl, shipper = self.changelog, self.shipper
        assert shipper is not None
        bucket = bucket_name(cl.stream)
        mine = sorted(
            (
                o
                for o in self.client.list_objects(bucket, cl.timeout_s)
                if o.name.startswith(cl.partition + "/")
            ),
            key=lambda o: o.name,
        )
        if len(mine) < cl.keep_snapshots:
            return
        for old in mine[: -cl.keep_snapshots]:
            self.client.delete_object(bucket, old.name, cl.timeout_s)
        oldest_seq = int(mine[-cl.keep_snapshots].name.rsplit("/", 1)[1])
        # the first message past the oldest kept snapshot's seq, found among those
        # this process acknowledged (messages before it hold only older seqs);
        # past the last one known, that message itself (the head may be a chunk
        # of a record whose first chunks the snapshot needs)
        before = None
        known = list(shipper.acked_messages)
        for i, (last, stream_seq) in enumerate(known):
            if last <= oldest_seq:
                before = known[i + 1][1] if i + 1 < len(known) else stream_seq
        if not before:
            return  # not known here yet: the next snapshot's retention purges
        purged = self.client.purge(cl.stream, cl.subject, before, cl.timeout_s)
        log.info("%s: purged %d changelog messages below stream seq %d", self.path, purged, before)

    # ------------------------------------------------------------------ the Replication protocol
    def _check_usable(self) -> None:
        shipper = self.shipper
        if shipper is not None and shipper.fenced is not None:
            raise shipper.fenced_now()

    def lag(self) -> ReplicationLag:
        assert self.shipper is not None
        return self.shipper.lag()

    def wait_replicated(self, timeout: float | None) -> bool:
        shipper = self.shipper
        assert shipper is not None
        self._check_usable()
        if shipper.wait_acked(shipper.queued_seq, timeout):
            return True
        self._check_usable()  # fenced during the wait: that, not a timeout
        return False

    def hold_compaction(self, seq: int) -> bool:
        shipper = self.shipper
        if shipper is None or shipper.fenced is not None:
            return False
        return shipper.wait_acked(seq, self.changelog.timeout_s)

    def stats(self) -> dict[str, object]:
        state, shipper = self.state, self.shipper
        assert state is not None and shipper is not None
        out: dict[str, object] = {
            "stream": self.changelog.stream,
            "partition": self.changelog.partition,
            "ack": self.changelog.ack,
        }
        out.update(shipper.stats())
        out["last_snapshot"] = state.snapshots[-1] if state.snapshots else None
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.shipper is not None:
                self.shipper.stop(ship_first=True)
            thread = self._snapshot_thread
            if thread is not None:
                thread.join(self.changelog.timeout_s)
            with self._state_lock:
                self._save()
        finally:
            if _loop.on_loop_thread():  # (collected there: the loop cannot wait on itself)
                threading.Thread(target=self.client.release, daemon=True).start()
            else:
                self.client.release()

    def abandon(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.shipper is not None:
            self.shipper.stop(ship_first=False)
        self.client.release()

    def after_fork(self) -> None:
        self.closed = True
        if self.shipper is not None:
            self.shipper.forget()
