"""The ``logstate`` command line (also ``python -m logstate``).

Owns: argument parsing, exit codes (0 success / clean, 1 a problem was found
or data could not be kept, 2 usage or other error), one-line errors on
stderr, progress on a terminal.
Must never: re-declare the byte layout or reach into the engine's internals:
it works through the public API (``LocalFileStorage`` and its ``report``,
``stats()``, ``compact()``, ``get_encoded()``), the value codec's tags, the
demo and the legacy importer.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from logstate import __version__, _native
from logstate._cli_replication import (
    add_commands,
    place_dir,
    print_replication,
    replication_stats,
)
from logstate._demo import DemoRefusedError, run_demo, run_worker
from logstate._errors import CorruptionError, LogstateError
from logstate._filenames import segment_file_name
from logstate._values import TAG_BYTEARRAY, TAG_BYTES, TAG_EXPIRES, TAG_PICKLE, split_expiring
from logstate.compat.quix_import import import_quix_directory
from logstate.storage import LocalFileStorage, is_storage_directory

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_ERROR = 2


# ============================================================================ helpers
class Progress:
    """A one-line progress counter on stderr, only on a terminal and without --quiet."""

    def __init__(self, quiet: bool, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._on = not quiet and self._stream.isatty()
        self._shown = False

    def show(self, text: str) -> None:
        if self._on:
            self._stream.write("\r" + text[:100].ljust(100))
            self._stream.flush()
            self._shown = True

    def done(self) -> None:
        if self._shown:
            self._stream.write("\r" + " " * 100 + "\r")
            self._stream.flush()


def _storages(root: LocalFileStorage) -> Iterator[LocalFileStorage]:
    """The root and every sub-storage below it, depth first (handles to close)."""
    yield root
    for name in root.get_sub_storages():
        sub = root.get_or_create_sub_storage(name)
        try:
            yield from _storages(sub)
        finally:
            sub.close()


def _open_existing(directory: str, **options: Any) -> LocalFileStorage:
    """Open a directory that already is a logstate storage (never create one)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    if not is_storage_directory(directory):
        raise FileNotFoundError(f"{directory} is not a logstate storage (no segment files)")
    return LocalFileStorage(directory, auto_create_dir=False, **options)


def _storage_name(ns: str) -> str:
    return f"sub-storage {ns!r}" if ns else "the root storage"


def _mib(size: int) -> str:
    return f"{size:,} bytes ({size / 1048576:.2f} MiB)"


def _unwrap(
    storage: LocalFileStorage, key: str, encoded: bytes
) -> tuple[bytes | memoryview, float | None]:
    """The value's own encoding (tag + data) and its expiry time (None: it has none).

    A value set with a ttl is tag 10 around the value: its inner tag decides
    what is shown and whether it is a pickle (never loaded unasked).

    Raises:
        CorruptionError: the expiring value's header is damaged (with its place).
    """
    if encoded[0] != TAG_EXPIRES:
        return encoded, None
    try:
        deadline_s, _written_s, inner = split_expiring(encoded)
    except CorruptionError:
        storage.decode_stored(key, encoded, allow_pickle=False)  # raises it, with its place
        raise
    return inner, deadline_s


def _json_value(
    storage: LocalFileStorage, key: str, encoded: bytes, unpickle: bool
) -> tuple[str, Any]:
    """(type name, JSON-able value) of an encoded value."""
    tag = encoded[0]
    if tag in (TAG_BYTES, TAG_BYTEARRAY):
        name = "bytes" if tag == TAG_BYTES else "bytearray"
        return name, base64.b64encode(encoded[1:]).decode("ascii")
    if tag == TAG_PICKLE and not unpickle:
        return "pickle", None
    value = storage.decode_stored(key, encoded, allow_pickle=True)
    if isinstance(value, float) and not math.isfinite(value):
        return "float", repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return type(value).__name__, value
    return f"pickle:{type(value).__module__}.{type(value).__qualname__}", repr(value)


# ============================================================================ commands
def cmd_compact(args: argparse.Namespace) -> int:
    with _open_existing(args.dir) as storage:
        before = storage.stats()
        result = storage.compact()
        after = storage.stats()
    print(f"compacted {args.dir}: {len(result.inputs)} sealed segment(s) into 1")
    print(f"  before: {_mib(before['total_bytes'])} in {before['segments']} segment(s)")
    print(f"  after:  {_mib(after['total_bytes'])} in {after['segments']} segment(s)")
    print(f"  live data: {_mib(after['live_bytes'])}; {result.records} record(s) kept")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Read-only: every record's checksum (salvage scan), every live value read back,
    and the index snapshot compared with that full scan."""
    progress = Progress(args.quiet)
    problems: list[str] = []
    try:
        storage = _open_existing(
            args.dir, read_only=True, recovery="salvage", use_snapshot=False, allow_pickle=False
        )
    except CorruptionError as exc:
        print(f"DAMAGED {exc.path} at offset {exc.offset}: {exc.reason}")
        return EXIT_PROBLEM
    checked = 0
    with storage:
        report = storage.report
        for path, offset, size, reason in report.salvaged:
            problems.append(f"{path} at offset {offset}: {size} damaged bytes ({reason})")
        for path, offset, size, _aside in report.torn_tails:
            problems.append(
                f"{path} at offset {offset}: {size} bytes of torn tail (an interrupted write; "
                "a writable open cuts it off)"
            )
        for number in report.missing_segments:
            name = os.path.join(storage.path, segment_file_name(number))
            problems.append(f"{name} is missing (segment {number}): its records are lost")
        for sub in _storages(storage):
            where = f" (sub-storage {sub.name})" if sub.name else ""
            for key in sub.get_all_keys():
                try:
                    encoded = sub.get_encoded(key)
                    if encoded is not None:
                        inner, _expires = _unwrap(sub, key, encoded)
                        if inner[0] != TAG_PICKLE:  # a pickle is not loaded: it runs code
                            sub.decode_stored(key, bytes(inner))
                except CorruptionError as exc:
                    problems.append(f"{exc.path} at offset {exc.offset}: {exc.reason}{where}")
                checked += 1
                if checked % 10000 == 0:
                    progress.show(f"checked {checked:,} values")
        stats = storage.stats()
        snapshot = storage.compare_snapshot_with_scan()
    progress.done()
    snapshot_path = os.path.join(storage.path, "index.snapshot")
    for diff in snapshot.differences:
        subject = {
            "key": f"key {diff.key!r} of {_storage_name(diff.namespace)}",
            "expiry": f"the expiry of key {diff.key!r} of {_storage_name(diff.namespace)}",
            "sub-storage": _storage_name(diff.namespace),
        }.get(diff.what, f"the {diff.what}")
        problems.append(
            f"{snapshot_path}: {subject}: the snapshot gives {diff.snapshot}, "
            f"a full scan {diff.scan}"
        )
    for line in problems:
        print(f"DAMAGED {line}")
    if snapshot.differences:
        print(
            f"index.snapshot: {len(snapshot.differences)} difference(s) from a full scan: "
            "delete it (a cache: the next open scans)"
        )
    elif snapshot.compared:
        print("index.snapshot: matches a full scan")
    else:
        print(f"index.snapshot: not compared: {snapshot.note}")
    status = "damaged" if problems else "clean"
    print(
        f"{args.dir}: {status}: {stats['segments']} segment(s), {report.records:,} record(s) "
        f"scanned, {checked:,} live value(s) verified, {len(problems)} problem(s)"
    )
    return EXIT_PROBLEM if problems else EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _open_existing(args.dir, read_only=True) as storage:
        stats = storage.stats()
        names = []
        for sub in _storages(storage):
            if sub.name:
                names.append(sub.name)
    total = stats["total_bytes"]
    stats_out: dict[str, Any] = dict(stats)
    stats_out["garbage_ratio"] = round(stats["dead_bytes"] / total, 4) if total else 0.0
    stats_out["sub_storage_names"] = names
    stats_out["native"] = _native.ACTIVE  # which path this process runs (logstate.native)
    stats_out["native_reason"] = _native.REASON
    replication = replication_stats(args.dir, stats["last_seq"], args.live, args.timeout)
    if replication is not None:
        stats_out["replication"] = replication
    if args.json:
        print(json.dumps(stats_out, sort_keys=True))
        return EXIT_OK
    print(f"{args.dir}")
    expiring = f", {stats['expiring_keys']:,} of them with a ttl" if stats["expiring_keys"] else ""
    print(f"  keys:          {stats['keys']:,} (all storages{expiring})")
    print(f"  sub-storages:  {stats['sub_storages']}" + (f" ({', '.join(names)})" if names else ""))
    print(f"  segments:      {stats['segments']}")
    print(f"  total:         {_mib(total)}")
    print(f"  live:          {_mib(stats['live_bytes'])}")
    print(f"  dead:          {_mib(stats['dead_bytes'])}")
    print(f"  garbage ratio: {stats_out['garbage_ratio']:.2%}")
    print(f"  native:        {_native_path()}")
    if replication is not None:
        print_replication(replication)
    return EXIT_OK


def _native_path() -> str:
    """Which path this process runs: "C extension", or "pure Python (why)"."""
    return "C extension" if _native.ACTIVE else f"pure Python ({_native.REASON})"


def cmd_dump(args: argparse.Namespace) -> int:
    out = sys.stdout
    with _open_existing(args.dir, read_only=True, allow_pickle=False) as storage:
        for sub in _storages(storage):
            for key in sub.get_all_keys():
                line: dict[str, Any] = {"storage": sub.name, "key": key}
                if not args.keys_only:
                    encoded = sub.get_encoded(key)
                    if encoded is None:  # removed meanwhile (not with read_only)
                        continue
                    inner, expires_at = _unwrap(sub, key, encoded)
                    line["type"], line["value"] = _json_value(sub, key, bytes(inner), args.unpickle)
                    if expires_at is not None:
                        line["expires_at"] = expires_at
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"copy_torn_tails": False} if args.no_copy else {}
    with _open_existing(args.dir, recovery="salvage", **options) as storage:
        report = storage.report
        keys = storage.stats()["keys"]
    lost = report.salvaged or report.missing_segments
    for path, offset, size, aside in report.torn_tails:
        kept = f"kept in {aside}" if aside else "not kept: --no-copy"
        print(f"cut a torn tail: {path} at offset {offset}, {size} bytes ({kept})")
    for path, offset, size, reason in report.salvaged:
        print(f"dropped {size} damaged bytes: {path} at offset {offset} ({reason}); moved aside")
    for number in report.missing_segments:
        print(f"segment {number} was missing: its records are lost (an empty one takes its place)")
    if lost:
        print(f"{args.dir}: repaired; the records in the ranges above are lost; {keys:,} keys kept")
    elif report.torn_tails:
        print(f"{args.dir}: repaired a torn tail; nothing else was damaged; {keys:,} keys")
    else:
        print(f"{args.dir}: nothing to repair; {keys:,} keys")
    return EXIT_OK


def cmd_import_quix(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.src):
        raise FileNotFoundError(f"legacy state directory {args.src} does not exist")
    progress = Progress(args.quiet)
    with LocalFileStorage(args.dir) as storage:
        report = import_quix_directory(
            args.src,
            storage,
            allow_pickle=not args.no_pickle,
            progress=lambda path, n: progress.show(f"imported {path or '(root)'}: {n} keys"),
        )
    progress.done()
    for line in report.summary():
        print(line)
    return EXIT_OK if report.complete else EXIT_PROBLEM


def cmd_demo(args: argparse.Namespace) -> int:
    if args.restarts < 1:
        print("logstate demo: --restarts must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    return EXIT_OK if run_demo(args.dir, args.restarts, seed, sys.stdout) else EXIT_PROBLEM


def cmd_demo_worker(args: argparse.Namespace) -> int:  # pragma: no cover - runs until killed
    run_worker(args.dir, args.seed, sys.stdout)
    return EXIT_OK


# ============================================================================ parser
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logstate",
        description="Maintenance and demo tool for logstate storages. "
        "Exit codes: 0 success, 1 a problem found (check) or data not kept, 2 error.",
    )
    parser.add_argument("--version", action="version", version=f"logstate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name: str, help_text: str, func: Any, description: str = "") -> Any:
        sub = commands.add_parser(name, help=help_text, description=description or help_text)
        sub.set_defaults(func=func)
        return sub

    c = command(
        "compact",
        "compact a storage now and print the space before and after",
        cmd_compact,
        "Rewrite the live records of every segment into one and delete the old "
        "segments (crash-safe). Refuses a storage another process has open.",
    )
    c.add_argument("dir")
    c.add_argument("--quiet", action="store_true", help="no progress output")

    c = command(
        "check",
        "verify every record and structure (read-only); exit 0 clean, 1 damaged",
        cmd_check,
        "Scan every segment and verify every record's checksum, then read back every live "
        "value, and compare the index snapshot with the full scan (every difference is a "
        "problem). Read-only: works on a storage a live process holds, changes nothing.",
    )
    c.add_argument("dir")
    c.add_argument("--quiet", action="store_true", help="no progress output")

    c = command(
        "stats",
        "keys, live and dead bytes, segments, garbage ratio; replication state",
        cmd_stats,
        "Sizes and counts of a storage (read-only). For a storage with a changelog, also "
        "its replication state from the state file (last acknowledged seq, epoch, last "
        "snapshot), without a broker; --live URL asks the broker for the current lag.",
    )
    c.add_argument("dir")
    c.add_argument("--json", action="store_true", help="one JSON object")
    c.add_argument(
        "--live", metavar="URL", default=None, help="ask the broker at URL for the current lag"
    )
    c.add_argument("--timeout", type=float, default=10.0, help="seconds per broker call (10)")

    c = command(
        "dump",
        "print every key as a JSON line (storage, key, type, value)",
        cmd_dump,
        "JSON lines of storage (sub-storage path, '' for the root), key, type and value. "
        "bytes are base64; pickled values are not loaded unless --unpickle is given "
        "(loading a pickle can run code).",
    )
    c.add_argument("dir")
    c.add_argument("--keys-only", action="store_true", help="storage and key only")
    c.add_argument("--unpickle", action="store_true", help="load pickled values (trusted data)")

    c = command(
        "repair",
        "salvage a damaged storage: keep every valid record, move damaged bytes aside",
        cmd_repair,
        "Open with recovery='salvage': every valid record is kept, damaged byte ranges are "
        "moved into *.damaged files beside the segments (never deleted), and what was lost "
        "is printed. Refuses a storage another process has open.",
    )
    c.add_argument("dir")
    c.add_argument(
        "--no-copy",
        action="store_true",
        help="cut a torn tail without copying it into a *.torn file first (a full disk: "
        "the copy cannot be written; the cut bytes are not kept)",
    )

    c = command(
        "import-quix",
        "import a legacy Quix Streams state directory",
        cmd_import_quix,
        "Import a legacy quixstreams (0.5.x) state directory: files become keys, "
        "sub-directories sub-storages; temp/backup files are skipped; malformed files are "
        "listed and skipped. Each storage is written as one atomic batch. "
        "Exit 1 when some file was not imported.",
    )
    c.add_argument("src", help="the legacy state directory")
    c.add_argument("dir", help="the logstate storage directory (created if missing)")
    c.add_argument("--no-pickle", action="store_true", help="refuse object (pickled) values")
    c.add_argument("--quiet", action="store_true", help="no progress output")

    c = command(
        "demo",
        "count a synthetic stream while the worker is killed with SIGKILL, and verify",
        cmd_demo,
        "A worker counts events into a storage; it is killed with SIGKILL at random moments "
        "and restarted; each restart must resume from the last acknowledged event, and the "
        "final counts must match a recount (events lost = 0).",
    )
    c.add_argument("--dir", default="./state/demo", help="storage directory (./state/demo)")
    c.add_argument("--restarts", type=int, default=6, help="how many kills (6)")
    c.add_argument("--seed", type=int, default=None, help="random seed (default: random)")

    add_commands(command)

    # no help=: argparse lists every sub-command given one (even SUPPRESS, which it prints)
    worker = commands.add_parser("demo-worker", description="(internal) the demo's worker")
    worker.set_defaults(func=cmd_demo_worker)
    worker.add_argument("dir")
    worker.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    extra = place_dir(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logger = logging.getLogger("logstate")
    quiet_log = args.command in ("check", "repair", "stats", "dump")
    propagate = logger.propagate
    if quiet_log:
        # these print what the engine found on stdout: its log lines would repeat it
        logger.propagate = False
        silence = logging.NullHandler()
        logger.addHandler(silence)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # the reader went away (``logstate dump DIR | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (LogstateError, OSError, DemoRefusedError) as exc:
        print(f"logstate {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"logstate {args.command}: interrupted", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if quiet_log:
            logger.removeHandler(silence)
            logger.propagate = propagate


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
