"""Instructions of an open, a full-scan open and a compaction, counted by callgrind.

Commands (the default store takes several minutes under callgrind on 2 cores)::

    python tools/open_cost.py                              # this checkout
    python tools/open_cost.py --repo /tmp/base             # another checkout's logstate
    python tools/open_cost.py --sets 2000 --keys 500 --json

What it counts: a store is made once (``--sets`` sets of 100-byte values over
``--keys`` keys, then ``--flushes`` (20) ``InMemoryStorage`` flushes of 1,000 keys, 8 MiB
segments, by the checkout measured unless ``--store`` names one made
before). Then each row runs in a fresh process under ``valgrind
--tool=callgrind``, and the number reported is its total ``Ir`` minus that of
a process that only imports logstate (``none``): the cost of the operation,
interpreter included. Rows:

- ``open``: a read-only open with the index snapshot, and its close;
- ``scan``: a read-only open by a full scan (``use_snapshot=False``);
- ``compact``: ``compact()`` of a copy of the store, opened by a scan with
  ``auto_compact=False`` (the copy and the scan are in the count).

To compare two commits, make the store with the older one (``--store`` then
reuses it for the newer), so that both read the same bytes.
``PYTHONHASHSEED=0``; ``--repo DIR`` puts DIR first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("open", "scan", "compact")
_COLLECTED = re.compile(r"Collected : (\d+)")


def make_store(directory: str, sets: int, keys: int, flushes: int = 20) -> None:
    import logstate

    store = logstate.LocalFileStorage(
        directory, sync="none", auto_compact=False, segment_size=8 << 20
    )
    rng = random.Random(1)
    for _ in range(sets):
        store[f"key-{rng.randrange(keys):08d}"] = rng.randbytes(100)
    memory = logstate.InMemoryStorage(store)
    for i in range(flushes):
        for j in range(1000):
            memory[f"mem-{j}"] = i * j
        memory.flush(checkpoint=i)
    store.close()


def run_row(row: str, directory: str) -> None:
    import logstate

    if row == "open":
        logstate.LocalFileStorage(directory, read_only=True).close()
    elif row == "scan":
        logstate.LocalFileStorage(directory, read_only=True, use_snapshot=False).close()
    elif row == "compact":
        work = directory + ".work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(directory, work)
        store = logstate.LocalFileStorage(work, sync="none", auto_compact=False, use_snapshot=False)
        store.compact()
        store.close()
        shutil.rmtree(work)


def _environment(repo: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def count(valgrind: str, repo: str, row: str, directory: str, scratch: str) -> int:
    """Total instructions of one process running ``row`` (``none``: imports only)."""
    out = os.path.join(scratch, f"callgrind.{row}.out")
    done = subprocess.run(
        [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         os.path.abspath(__file__), "--row", row, "--store", directory],
        env=_environment(repo), capture_output=True, text=True, check=True, cwd=scratch,
    )  # fmt: skip
    found = _COLLECTED.search(done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{done.stderr}")
    return int(found.group(1))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=ROOT, help="the checkout whose logstate to measure")
    parser.add_argument("--store", default=None, help="measure this store (made before)")
    parser.add_argument("--sets", type=int, default=300_000, help="sets of the made store")
    parser.add_argument("--keys", type=int, default=100_000, help="distinct keys of those sets")
    parser.add_argument("--flushes", type=int, default=20, help="flushes of 1,000 keys")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--valgrind", default="valgrind", help="the valgrind executable")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # (the measured child)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row is not None:  # the child process that callgrind counts
        import logstate  # noqa: F401  (in every row: "none" counts the import alone)

        if args.row != "none":
            run_row(args.row, args.store)
        return 0
    scratch = tempfile.mkdtemp(prefix="logstate-open-cost-")
    try:
        directory = args.store or os.path.join(scratch, "store")
        if args.store is None:
            subprocess.run(
                [sys.executable, "-c",
                 "import sys; sys.path.insert(0, sys.argv[1]); import open_cost; "
                 "open_cost.make_store(sys.argv[2], *map(int, sys.argv[3:]))",
                 os.path.dirname(os.path.abspath(__file__)), directory,
                 str(args.sets), str(args.keys), str(args.flushes)],
                env=_environment(args.repo), check=True, cwd=scratch,
            )  # fmt: skip
        base = count(args.valgrind, args.repo, "none", directory, scratch)
        results = {row: count(args.valgrind, args.repo, row, directory, scratch) - base
                   for row in ROWS}  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps({"repo": args.repo, "none": base, **results}))
    else:
        print(f"callgrind instructions, logstate from {args.repo} (minus an import-only process)")
        print("| row | instructions |\n|---|---:|")
        for row, value in results.items():
            print(f"| {row} | {value:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
