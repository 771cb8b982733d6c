"""A compaction's switch from its inputs to its output, finished whatever interrupts it.

Owns: the switch a compaction records before it renames its output over its
last input (``pending``), whether that rename is running, and the switch
itself: the keys that did not change meanwhile moved to the output
(``Keydir.move_unchanged``), the checkpoint likewise, the inputs replaced by
the output in the segment set. Each step can run again; the record changes
only after it. An exception (KeyboardInterrupt, SystemExit from a signal
handler) anywhere leaves the switch to the next call under the write lock
(``finish``), which asks the file system whether the rename happened.
Must never: write or rename the output (``_compact`` does), or run without
the engine's write lock held.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

from logstate._filenames import segment_file_name
from logstate._fs import FileSystem
from logstate._keydir import Keydir
from logstate._lifecycle import Lifecycle
from logstate._location import Location
from logstate._segments import Segment, SegmentSet

__all__ = ["Moved", "PendingSwitch", "Switch"]

# (ns, key, old location, new location; None: an expired key the output dropped)
Moved = list[tuple[str, str, Location, Location | None]]


class Switch(NamedTuple):
    """A compaction's switch, recorded before its rename."""

    moved: Moved
    old_checkpoint: Location | None
    new_checkpoint: int | None
    inputs: list[int]
    output: Segment
    tmp_path: str | None  # the output's temporary name: the rename may not have happened


class PendingSwitch:
    """The compaction switch of one engine that is recorded and not finished."""

    def __init__(
        self, fs: FileSystem, segments: SegmentSet, keydir: Keydir, life: Lifecycle
    ) -> None:
        self._fs = fs
        self._segments = segments
        self._keydir = keydir
        self._life = life
        self.pending: Switch | None = None
        self.renaming = False  # the compaction's rename is running: no other call decides it
        self._runs = 0  # runs of the pending switch (a rerun recounts the live bytes)

    def record(self, switch: Switch, last_input: Segment) -> None:
        """Record ``switch`` before the rename, ``last_input`` (the file renamed
        over) pinned. Under the write lock."""
        self._segments.pin(last_input)
        self.renaming = True
        self.pending = switch

    def install(self, output: Segment) -> None:
        """Point the index at ``output`` (renamed into place) where nothing changed
        meanwhile: finish the recorded switch. Takes no lock: call under it."""
        pending = self.pending
        if pending is None or pending.output is not output:
            return  # finished meanwhile by another call (settle)
        try:
            self.finish(renamed=True)
        except (OSError, ValueError) as exc:  # mapping the output failed
            # the files changed under the engine: reopen (nothing switched;
            # the pinned mapping still serves the replaced segment's reads)
            self._life.fail(exc)
            self.pending = None
            raise

    def _renamed_over(self, output: Segment) -> bool:
        """Is ``output``'s file (the compaction's, by its descriptor) under its final name?"""
        try:
            fd = self._fs.open_read_only(output.path)
        except FileNotFoundError:
            return False
        try:
            return self._fs.file_identity(fd) == self._fs.file_identity(output.fd)
        finally:
            self._fs.close(fd)

    def finish(self, renamed: bool = False) -> None:
        """Finish the recorded switch (or drop it, if its rename never happened). Idempotent.

        The output reuses the last input's number, so until the switch is
        whole, a location with that number is ambiguous: an interrupted
        switch is finished by the next call under the lock. While the
        output's temporary name is recorded, the file system says whether
        the rename happened (``_renamed_over``); ``renamed``: the compaction
        itself says it did, and deletes the other inputs itself.
        """
        pending = self.pending
        if pending is None:
            return
        segments = self._segments
        output = pending.output
        if pending.tmp_path is not None:
            if self.renaming and not renamed:
                return  # the compaction's rename is running: it decides (the index stays)
            if not renamed and (output.fd < 0 or not self._renamed_over(output)):
                # interrupted before the rename: the compaction never happened
                fd, output.fd = output.fd, -1
                if fd >= 0:
                    self._fs.close(fd)
                if self._fs.exists(pending.tmp_path):
                    self._fs.unlink(pending.tmp_path)
                segments.pinned = None
                self.pending = None
                return
            if not renamed and self._life.failed is None:
                # interrupted around the rename, which happened: the rename
                # made durable, then the other inputs go (the compaction that
                # would have deleted them was cut short; else open deletes them)
                with contextlib.suppress(OSError):
                    self._fs.fsync_dir(segments.path)
                    for number in pending.inputs[:-1]:
                        with contextlib.suppress(FileNotFoundError):
                            self._fs.unlink(segments.file(segment_file_name(number)))
            segments.seal(output, close_older=False)  # again if repeated: the new mapping counts
            self.pending = pending = pending._replace(tmp_path=None)
        self._runs += 1  # a second run: the first may have moved a key, not its bytes
        keydir = self._keydir
        keydir.move_unchanged(pending.moved)
        if self._runs > 1:
            keydir.recount()
        if pending.new_checkpoint is not None and keydir.checkpoint == pending.old_checkpoint:
            keydir.checkpoint = pending.new_checkpoint
        segments.replace(pending.inputs, output)
        self.pending = None
        self._runs = 0

    def _check(self) -> None:
        assert self.pending is not None or not self.renaming, "a rename without its switch"
