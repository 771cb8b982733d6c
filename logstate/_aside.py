"""Keeping damaged and torn bytes aside before recovery cuts them.

Owns: the copies open makes before it changes a segment (a torn tail cut,
a damaged range or header removed by salvage): each written whole under a
temporary name and renamed, one per position and content, runs of zeros
left as holes; the rewrite of a segment without its damaged ranges; the
report rows of what was cut or moved; the errors that name the way out
when the disk is full.
Must never: decide what is damage (``_recovery`` does), or touch the index.
"""

from __future__ import annotations

import errno
import logging

from logstate._errors import CorruptionError
from logstate._filenames import DAMAGED_SUFFIX, TMP_SUFFIX, TORN_SUFFIX, aside_file_name
from logstate._fs import FileSystem
from logstate._report import RecoveryReport, SalvagedRange, TornTail
from logstate._scan import SCAN_WINDOW, Damage
from logstate._segments import Segment

__all__ = ["Aside"]

log = logging.getLogger("logstate")


class Aside:
    """Copies aside and cuts for the segments of directory ``path``, reported in ``report``."""

    def __init__(
        self, fs: FileSystem, path: str, copy_torn_tails: bool, report: RecoveryReport
    ) -> None:
        self._fs = fs
        self.path = path
        self.copy_torn_tails = copy_torn_tails
        self.report = report

    def cut_tail(self, segment: Segment, offset: int, end: int, reason: str) -> None:
        """Copy the bytes ``offset..end`` aside (unless copy_torn_tails is off), cut there."""
        size = end - offset
        aside = ""
        if self.copy_torn_tails:
            aside = self.copy_aside(segment, offset, size, TORN_SUFFIX)
        self._fs.truncate(segment.fd, offset)
        self._fs.fsync(segment.fd)
        self.report.torn_tails.append(TornTail(segment.path, offset, size, aside))
        log.warning(
            "%s: torn write at offset %d (%s): %d bytes %s and cut off",
            segment.path,
            offset,
            reason,
            size,
            f"copied to {aside}" if aside else "not copied (copy_torn_tails=False)",
        )

    def copy_aside(self, segment: Segment, offset: int, size: int, suffix: str) -> str:
        """Keep the segment's bytes ``offset..offset+size`` in a file beside it; its path.

        At most one copy per position and content: a copy with the same
        bytes (left by an open that failed after making it) is reused; a new
        one is written under a temporary name, made durable and renamed, so
        that a failure leaves no partial copy (the next open removes the
        temporary file). Copied in windows; runs of zeros become holes.

        Raises:
            OSError: ENOSPC/EDQUOT with a message naming the way out, or the
                file system's error.
        """
        candidate, n = aside_file_name(segment.path, offset, suffix), 1
        while self._fs.exists(candidate):
            if self._same_bytes(candidate, segment.fd, offset, size):
                self._fs.fsync_dir(self.path)
                return candidate
            candidate = aside_file_name(segment.path, offset, suffix, n)
            n += 1
        tmp = candidate + TMP_SUFFIX
        created = False
        try:
            fd = self._fs.create_file(tmp)
            created = True
            try:
                self._copy_range(segment.fd, offset, size, fd)
                self._fs.fsync(fd)
            finally:
                self._fs.close(fd)
            self._fs.rename(tmp, candidate)
            created = False
            self._fs.fsync_dir(self.path)
        except OSError as exc:
            if created:
                self._discard_tmp(tmp)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            what = "torn tail" if suffix == TORN_SUFFIX else "damaged bytes"
            way_out = (
                f"; or cut it without a copy: logstate repair {self.path} --no-copy "
                "(its bytes are then not kept)"
                if suffix == TORN_SUFFIX
                else ""
            )
            raise OSError(
                exc.errno,
                f"no space left on the disk to copy the {what} of {segment.path} "
                f"({size} bytes at offset {offset}) aside before it is cut: free space "
                f"and open again{way_out}",
                tmp,
            ) from exc
        return candidate

    def _copy_range(self, src: int, offset: int, size: int, dst: int) -> None:
        """Append ``src``'s bytes ``offset..offset+size`` to the new file ``dst``, in windows.

        A window of zeros is not written: the file is extended over it (a
        hole), so that a zero-filled torn tail costs no disk space.
        """
        start = written = self._fs.file_size(dst)  # dst's size so far
        position = 0
        while position < size:
            data_at = self._fs.data_offset(src, offset + position) - offset
            if data_at > position:  # a hole: zeros, not read
                position = min(size, data_at)
                continue
            chunk = self._fs.pread(src, min(SCAN_WINDOW, size - position), offset + position)
            if not chunk:
                raise OSError(errno.EIO, f"file shorter than expected at offset {offset}")
            if chunk.count(0) != len(chunk):
                if written < start + position:
                    self._fs.truncate(dst, start + position)
                self._fs.append(dst, chunk)
                written = start + position + len(chunk)
            position += len(chunk)
        if written < start + size:
            self._fs.truncate(dst, start + size)

    def _discard_tmp(self, tmp: str) -> None:
        """Remove a temporary file a failed write left (if that fails too, the next open does)."""
        try:
            self._fs.unlink(tmp)
        except OSError as cleanup:
            log.warning("%s: could not remove %s: %r", self.path, tmp, cleanup)

    def _same_bytes(self, path: str, src: int, offset: int, size: int) -> bool:
        """Does file ``path`` hold exactly ``src``'s bytes ``offset..offset+size``?

        A link or another special file there is not a copy (never read through).
        """
        try:
            fd = self._fs.open_read_only(path)
        except CorruptionError:
            return False
        try:
            if self._fs.file_size(fd) != size:
                return False
            position = 0
            while position < size:
                length = min(SCAN_WINDOW, size - position)
                mine = self._fs.pread(fd, length, position)
                if not mine or mine != self._fs.pread(src, length, offset + position):
                    return False
                position += len(mine)
            return True
        finally:
            self._fs.close(fd)

    def salvage_rewrite(
        self, segment: Segment, end: int, damaged: list[Damage], header: bytes = b""
    ) -> None:
        """Move damaged ranges aside and rewrite the segment without them (in windows).

        ``header``: written instead of the segment's first bytes (a damaged header).
        """
        damaged = sorted(damaged)
        for damage in damaged:
            aside = self.copy_aside(segment, damage.offset, damage.size, DAMAGED_SUFFIX)
            self.report.salvaged.append(
                SalvagedRange(segment.path, damage.offset, damage.size, damage.reason)
            )
            log.warning(
                "%s: %d damaged bytes at offset %d (%s) moved to %s",
                segment.path,
                damage.size,
                damage.offset,
                damage.reason,
                aside,
            )
        tmp = segment.path + TMP_SUFFIX
        fd = self._fs.create_file(tmp)
        try:
            try:
                position = 0
                if header:
                    self._fs.append(fd, header)
                    position = len(header)
                for damage in damaged:
                    self._copy_range(segment.fd, position, damage.offset - position, fd)
                    position = damage.offset + damage.size
                self._copy_range(segment.fd, position, end - position, fd)
                self._fs.fsync(fd)
            finally:
                self._fs.close(fd)
        except OSError as exc:
            self._discard_tmp(tmp)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise OSError(
                exc.errno,
                f"no space left on the disk to rewrite {segment.path} without its damaged "
                f"bytes (salvage needs room for a copy of the segment, {end} bytes): free "
                "space and open again",
                tmp,
            ) from exc
        self._fs.rename(tmp, segment.path)
        self._fs.fsync_dir(self.path)
        self._fs.close(segment.fd)
        segment.fd = self._fs.open_file(segment.path)
