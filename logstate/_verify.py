"""Compare the index ``index.snapshot`` gives with the one a full scan rebuilds.

Owns: ``logstate check``'s proof that the snapshot is what it claims to be, a
cache of what scanning the segments rebuilds. Open checks the snapshot's
shape and that every location lies inside its segment (``_snapshot``), and a
read proves the record it reaches is that key's; neither can tell a
location that points at an *older* record of the same key, or a sequence
number that is not the newest record's. Only a full scan can, so this module
opens a second, snapshot-based read-only view next to a full-scan one and
lists every difference: namespaces, keys, locations, checkpoint, sequence
number and live bytes.
Must never: write a file (both views are read-only, so it works on a store a
live process holds) or run on a hot path (it holds a second copy of the index).
"""

from __future__ import annotations

from typing import NamedTuple

from logstate._engine import Engine
from logstate._errors import CorruptionError
from logstate._filenames import SNAPSHOT_FILE_NAME, segment_file_name
from logstate._location import KIND_RECORD, Location, unpack_location

__all__ = ["IndexDifference", "SnapshotComparison", "compare_snapshot_with_scan"]


class IndexDifference(NamedTuple):
    """One way the snapshot-based index differs from the full scan's.

    Attributes:
        what: "key", "sub-storage", "expiry", "checkpoint", "sequence number" or
            "live bytes".
        namespace: the sub-storage path ("" for the root, and for the last three).
        key: the key ("" unless ``what`` is "key").
        snapshot: what the snapshot-based open gives, in words ("absent" when nothing).
        scan: what the full scan gives, likewise.
    """

    what: str
    namespace: str
    key: str
    snapshot: str
    scan: str


class SnapshotComparison(NamedTuple):
    """The outcome of :func:`compare_snapshot_with_scan`.

    Attributes:
        compared: the two indexes were compared (``differences`` is then complete).
        note: when not compared, why (no snapshot, refused by open and why,
            the store changed meanwhile, ...); "" when compared.
        differences: every difference found, in namespace and key order.
    """

    compared: bool
    note: str
    differences: list[IndexDifference]


def describe_location(location: Location | None) -> str:
    """A location in words: segment, offset, size and kind."""
    if location is None:
        return "absent"
    if type(location) is int:
        number, offset, size, kind = unpack_location(location)
        what = "record" if kind == KIND_RECORD else "group operation"
        return f"{segment_file_name(number)} offset {offset} ({size}-byte {what})"
    assert isinstance(location, tuple)
    number, record_offset, record_size, op_offset, op_size, share = location
    return (
        f"{segment_file_name(number)} offset {record_offset} ({record_size}-byte compressed "
        f"group, operation at {op_offset}, {op_size} bytes, {share} of them on disk)"
    )


def compare_snapshot_with_scan(scan: Engine) -> SnapshotComparison:
    """Open ``scan``'s directory again from its snapshot and compare the two indexes.

    Args:
        scan: a read-only engine opened with ``use_snapshot=False`` (a full
            scan); the snapshot-based engine is opened read-only beside it,
            outside the registry, and closed before returning.

    Returns:
        The comparison. Not compared (``compared`` False, ``note`` says
        why) when the scan found damage (its index then is not what open
        would rebuild; the damage is what to report), when there is no
        snapshot, when open would not use it, when open refuses the store,
        or when the segments changed between the two opens (a live writer
        appended): then run it again.

    Raises:
        ValueError: ``scan`` used a snapshot or is writable.
        OSError: reading the files failed.
    """
    if scan.report.snapshot_used or not scan.options.read_only:
        raise ValueError("compare_snapshot_with_scan needs a read-only full-scan engine")
    if scan.report.salvaged or scan.report.missing_segments:
        return SnapshotComparison(
            False, "the segments are damaged: a full scan is not what open would rebuild", []
        )
    if not scan.fs.exists(scan.path + "/" + SNAPSHOT_FILE_NAME):
        return SnapshotComparison(False, "there is none (the next open scans)", [])
    options = scan.options._replace(use_snapshot=True, recovery="strict")
    try:
        other = Engine(scan.path, options, scan.fs)
    except CorruptionError as exc:
        return SnapshotComparison(False, f"open refuses the store: {exc}", [])
    try:
        if not other.report.snapshot_used:
            reason = other.report.snapshot_refused or "it does not check out"
            return SnapshotComparison(False, f"not used by open ({reason}); open scans", [])
        sizes = {n: s.size for n, s in scan.segments.segments.items()}
        if {n: s.size for n, s in other.segments.segments.items()} != sizes:
            return SnapshotComparison(
                False,
                "the segments changed during the check (a live writer appended): run it again",
                [],
            )
        return SnapshotComparison(True, "", _differences(other, scan))
    finally:
        other.close()


def _differences(snap: Engine, scan: Engine) -> list[IndexDifference]:
    """Every difference between ``snap``'s index and ``scan``'s."""
    found: list[IndexDifference] = []
    ours, theirs = snap.keydir.namespaces, scan.keydir.namespaces
    for ns in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(ns), theirs.get(ns)
        if a is None or b is None:
            found.append(
                IndexDifference(
                    "sub-storage",
                    ns,
                    "",
                    "absent" if a is None else f"present ({len(a)} keys)",
                    "absent" if b is None else f"present ({len(b)} keys)",
                )
            )
            continue
        if a == b:  # the common case, at C speed
            continue
        for key in sorted(a.keys() | b.keys()):
            loc_a, loc_b = a.get(key), b.get(key)
            if loc_a != loc_b:
                found.append(
                    IndexDifference(
                        "key", ns, key, describe_location(loc_a), describe_location(loc_b)
                    )
                )
    # expiry times (the clock floors may differ: the snapshot's also holds
    # the times read, not only the times written)
    snap_expiring, scan_expiring = snap.keydir.expiring, scan.keydir.expiring
    for ns in sorted(snap_expiring.keys() | scan_expiring.keys()):
        a_times, b_times = snap_expiring.get(ns, {}), scan_expiring.get(ns, {})
        if a_times == b_times:
            continue
        for key in sorted(a_times.keys() | b_times.keys()):
            if a_times.get(key) != b_times.get(key):
                found.append(
                    IndexDifference(
                        "expiry",
                        ns,
                        key,
                        _describe_deadline(a_times.get(key)),
                        _describe_deadline(b_times.get(key)),
                    )
                )
    if snap.keydir.checkpoint != scan.keydir.checkpoint:
        found.append(
            IndexDifference(
                "checkpoint",
                "",
                "",
                describe_location(snap.keydir.checkpoint),
                describe_location(scan.keydir.checkpoint),
            )
        )
    if snap.appender.seq != scan.appender.seq:
        found.append(
            IndexDifference(
                "sequence number", "", "", str(snap.appender.seq), str(scan.appender.seq)
            )
        )
    if snap.keydir.live_bytes != scan.keydir.live_bytes:
        found.append(
            IndexDifference(
                "live bytes", "", "", str(snap.keydir.live_bytes), str(scan.keydir.live_bytes)
            )
        )
    return found


def _describe_deadline(deadline_s: float | None) -> str:
    return "no expiry" if deadline_s is None else f"expires at {deadline_s!r} s"
