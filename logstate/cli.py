"""The ``logstate`` command line (also ``python -m logstate``).

Owns: argument parsing, exit codes (0 success, 1 the check found a problem,
2 usage or other error) and turning errors into one line on stderr.
Must never: re-declare the byte layout or reach into the engine's internals;
it works through the public API (and the demo module).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from logstate import __version__
from logstate._demo import DemoRefusedError, run_demo, run_worker
from logstate._errors import LogstateError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logstate", description="Maintenance and demo tool for logstate storages."
    )
    parser.add_argument("--version", action="version", version=f"logstate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="count a synthetic stream while the worker is killed with SIGKILL, and verify",
        description="A worker counts events into a storage; it is killed with SIGKILL at "
        "random moments and restarted; each restart must resume from the last acknowledged "
        "event, and the final counts must match a recount (events lost = 0).",
    )
    demo.add_argument("--dir", default="./state/demo", help="storage directory (./state/demo)")
    demo.add_argument("--restarts", type=int, default=6, help="how many kills (6)")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default: random)")

    worker = commands.add_parser("demo-worker", help=argparse.SUPPRESS)
    worker.add_argument("dir")
    worker.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            if args.restarts < 1:
                print("logstate demo: --restarts must be at least 1", file=sys.stderr)
                return EXIT_ERROR
            seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
            return EXIT_OK if run_demo(args.dir, args.restarts, seed, sys.stdout) else EXIT_PROBLEM
        if args.command == "demo-worker":
            run_worker(args.dir, args.seed, sys.stdout)
            return EXIT_OK  # pragma: no cover - the worker runs until killed
    except (LogstateError, OSError, DemoRefusedError) as exc:
        print(f"logstate {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"logstate {args.command}: interrupted", file=sys.stderr)
        return EXIT_ERROR
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
