"""The replication commands of the ``logstate`` command line: restore, follow, stats.

Owns: ``logstate restore`` (and ``--list``), ``logstate snapshot``,
``logstate follow`` and the
replication part of ``logstate stats`` (from the store's state file without
a broker; ``--live`` asks the broker), their arguments and their output.
Must never: reach into the engine: it calls ``logstate.replication``'s
public functions and reads the state file through ``_state``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 2


def _time_text(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="milliseconds")


def _progress(quiet: bool) -> Callable[[str, int, int], None] | None:
    if quiet or not sys.stderr.isatty():
        return None

    def show(what: str, done: int, total: int) -> None:
        text = f"{what}: {done:,}" + (f" of {total:,} bytes" if total else " records")
        sys.stderr.write("\r" + text.ljust(60))
        sys.stderr.flush()

    return show


def _bad_argument(command: str, exc: ValueError) -> int:
    """A value the replication refused (a partition name, a time without a zone ...)."""
    print(f"logstate {command}: {exc}", file=sys.stderr)
    return EXIT_ERROR


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        return _restore(args)
    except ValueError as exc:
        return _bad_argument("restore", exc)


def cmd_follow(args: argparse.Namespace) -> int:
    try:
        return _follow(args)
    except ValueError as exc:
        return _bad_argument("follow", exc)


def _restore(args: argparse.Namespace) -> int:
    from logstate.replication import restorable, restore

    common: dict[str, Any] = {"timeout": args.timeout}
    if args.list:
        span = restorable(args.url, args.stream, args.partition, **common)
        snapshots = [
            {"seq": s["seq"], "time": _time_text(s.get("time")), "size": s.get("size")}
            for s in span.snapshots
        ]
        out: dict[str, Any] = {
            "oldest_seq": span.oldest_seq,
            "oldest_time": _time_text(span.oldest_time),
            "newest_seq": span.newest_seq,
            "newest_time": _time_text(span.newest_time),
            "snapshots": snapshots,
        }
        if args.json:
            print(json.dumps(out, sort_keys=True))
        else:
            print(f"{args.stream} / {args.partition}")
            print(f"  oldest restorable: seq {out['oldest_seq']:,} ({out['oldest_time']})")
            print(f"  newest:            seq {out['newest_seq']:,} ({out['newest_time']})")
            for snap in snapshots:
                print(f"  snapshot:          seq {snap['seq']:,} ({snap['time']})")
        return EXIT_OK
    if args.dir is None:
        print("logstate restore: DIR is required (or --list)", file=sys.stderr)
        return EXIT_ERROR
    progress = _progress(args.quiet)
    try:
        result = restore(
            args.url,
            args.stream,
            args.partition,
            args.dir,
            until_seq=args.until_seq,
            until_time=args.until_time,
            progress=progress,
            **common,
        )
    finally:
        if progress is not None:
            sys.stderr.write("\r" + " " * 60 + "\r")
    summary = {
        "dir": result.path,
        "seq": result.seq,
        "snapshot_seq": result.snapshot_seq,
        "records": result.records,
    }
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(
            f"restored {args.partition} to seq {result.seq:,} in {result.path} "
            f"(snapshot at seq {result.snapshot_seq:,} + {result.records:,} records)"
        )
    return EXIT_OK


def _follow(args: argparse.Namespace) -> int:
    from logstate.replication import FollowStatus, JetStreamChangelog, follow

    changelog = JetStreamChangelog(args.url, args.stream, args.partition, timeout=args.timeout)
    stopping = [False]
    deadline = None if args.seconds is None else time.monotonic() + args.seconds

    def on_term(_signum: int, _frame: object) -> None:
        stopping[0] = True

    previous = signal.signal(signal.SIGTERM, on_term)
    last_print = [0.0]

    def on_status(status: FollowStatus) -> None:
        now = time.monotonic()
        if args.json:
            print(json.dumps(status._asdict(), sort_keys=True), flush=True)
        elif now - last_print[0] >= 1.0 or (status.lag == 0 and last_print[0] == 0.0):
            last_print[0] = now
            print(
                f"local seq {status.local_seq:,}, stream seq {status.stream_seq:,}, "
                f"lag {status.lag:,} records",
                flush=True,
            )

    def stop() -> bool:
        return stopping[0] or (deadline is not None and time.monotonic() >= deadline)

    try:
        follow(changelog, args.dir, on_status, stop, poll_s=args.poll)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    from logstate.replication import JetStreamChangelog
    from logstate.storage import LocalFileStorage

    changelog = JetStreamChangelog(args.url, args.stream, args.partition, timeout=args.timeout)
    shown = [False]

    def progress(step: str, done: int, total: int) -> None:
        if args.quiet or not sys.stderr.isatty():
            return
        sys.stderr.write("\r" + f"{step}: {done:,} of {total:,} bytes".ljust(60))
        sys.stderr.flush()
        shown[0] = True

    with LocalFileStorage(args.dir, auto_create_dir=False, changelog=changelog) as storage:
        try:
            info = storage.replication_snapshot(progress)
        finally:
            if shown[0]:
                sys.stderr.write("\r" + " " * 60 + "\r")
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        size = info.get("size", 0)
        print(f"snapshot of {args.partition} at seq {info['seq']:,} stored ({size:,} bytes)")
    return EXIT_OK


def replication_stats(
    directory: str, last_seq: int, url: str | None, timeout_s: float
) -> dict[str, Any] | None:
    """The replication part of ``logstate stats`` (None: the store has no changelog).

    From the state file, without a broker; with ``url``, also the stream's
    newest seq and how far this copy is from it (``lag_records``: records
    committed here and not in the stream; negative: the stream is ahead).
    """
    from logstate.replication._state import load_state

    state = load_state(directory)
    if state is None:
        return None
    out: dict[str, Any] = {
        "stream": state.stream,
        "partition": state.partition,
        "writer": state.writer,
        "epoch": state.epoch,
        "acked_seq": state.acked_seq,
        "acked_time": _time_text(state.acked_time_s),
        "last_snapshot": state.snapshots[-1] if state.snapshots else None,
        "fenced": state.fenced,
    }
    if url is not None:
        from logstate.replication import restorable

        span = restorable(url, state.stream, state.partition, timeout=timeout_s)
        out["stream_newest_seq"] = span.newest_seq
        out["lag_records"] = last_seq - span.newest_seq
    return out


def print_replication(stats: dict[str, Any]) -> None:
    snap = stats["last_snapshot"]
    print(f"  replication:   {stats['stream']} / {stats['partition']} (epoch {stats['epoch']})")
    print(f"  acknowledged:  seq {stats['acked_seq']:,} ({stats['acked_time']})")
    if "lag_records" in stats:
        print(
            f"  stream:        seq {stats['stream_newest_seq']:,}; "
            f"lag {stats['lag_records']:,} records (negative: the stream is ahead)"
        )
    snap_text = "none" if snap is None else f"seq {snap['seq']:,} ({_time_text(snap.get('time'))})"
    print(f"  last snapshot: {snap_text}")
    if stats["fenced"]:
        print(f"  FENCED:        taken over by writer {stats['fenced'].get('by_writer')}")


def place_dir(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Give ``restore``'s DIR its place when it follows the options; what is left over.

    ``restore URL --stream S --partition P DIR``: argparse matches the
    optional DIR (as nothing) with URL, before the options, so DIR comes
    back unrecognized.
    """
    if (
        args.command == "restore"
        and args.dir is None
        and len(extra) == 1
        and not extra[0].startswith("-")
    ):
        args.dir = extra[0]
        return []
    return extra


def add_commands(command: Callable[..., Any]) -> None:
    """Register restore and follow with the command line's ``command`` factory."""

    def broker(c: Any) -> None:
        c.add_argument("url", help="nats:// URL of the broker (comma-separated for several)")
        c.add_argument("--stream", required=True, help="the JetStream stream")
        c.add_argument("--partition", required=True, help="the partition's name in the stream")
        c.add_argument("--timeout", type=float, default=10.0, help="seconds per broker call (10)")

    c = command(
        "restore",
        "build a store from its changelog on NATS JetStream (any restorable seq or time)",
        cmd_restore,
        "Build the store of a partition in DIR from the newest usable snapshot plus the "
        "stream's records after it, each verified (checksum, contiguous seq). DIR must not "
        "exist or be empty; it appears only once everything checked out. --list shows the "
        "restorable range instead.",
    )
    broker(c)
    c.add_argument("dir", nargs="?", help="the directory to build (absent or empty)")
    point = c.add_mutually_exclusive_group()
    point.add_argument("--until-seq", type=int, default=None, help="restore up to this seq")
    point.add_argument(
        "--until-time", default=None, help="restore up to this local commit time (ISO-8601)"
    )
    c.add_argument("--list", action="store_true", help="show the restorable seqs and times")
    c.add_argument("--json", action="store_true", help="one JSON object")
    c.add_argument("--quiet", action="store_true", help="no progress output")

    c = command(
        "snapshot",
        "upload a snapshot of a storage to its changelog's object store now",
        cmd_snapshot,
        "Open DIR as the writer of its partition (it must not be open elsewhere), ship what "
        "the stream lacks, and upload a snapshot of it at its newest seq; then the retention "
        "rule deletes older snapshots and purges the stream messages no kept snapshot needs. "
        "Progress on a terminal unless --quiet.",
    )
    broker(c)
    c.add_argument("dir")
    c.add_argument("--json", action="store_true", help="one JSON object")
    c.add_argument("--quiet", action="store_true", help="no progress output")

    c = command(
        "follow",
        "keep a standby copy of a partition current from its changelog",
        cmd_follow,
        "Restore DIR if it holds no store, then append the stream's new records as they "
        "come, printing the lag (--json: one status object per look). Other processes may "
        "read DIR with read_only=True. Promote it by opening it with the changelog as the "
        "writer (restore='if-behind'): that fences the old writer. Stops on SIGTERM/Ctrl-C.",
    )
    broker(c)
    c.add_argument("dir")
    c.add_argument("--json", action="store_true", help="JSON status lines")
    c.add_argument("--poll", type=float, default=0.2, help="seconds between looks (0.2)")
    c.add_argument("--seconds", type=float, default=None, help="stop after this long")
