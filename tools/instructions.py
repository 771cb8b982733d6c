"""Instructions per operation, counted by callgrind: a repeatable cost of the hot paths.

Commands (the first takes about a minute on 2 cores)::

    python tools/instructions.py                    # the three rows, N = 20,000
    python tools/instructions.py --rows set --ops 2000 --json
    git worktree add /tmp/base 7aa5d89 && python tools/instructions.py --repo /tmp/base

Wall-clock times on a shared VM vary by tens of percent between runs;
instruction counts do not. For each row, a small Python workload runs twice
under ``valgrind --tool=callgrind``: once doing N operations and once doing
none, with the same setup. The number reported is the difference of the two
runs' total ``Ir`` (instructions executed) divided by N: the cost of one
operation alone, the interpreter's share included (the loop, the call, the
arguments). The kernel's share of a system call is not counted; its
user-space wrapper is.

Rows (keys ``key-%08d`` and 100-byte random values of a fixed seed, as in
``tools/bench.py``; every store is fresh, ``sync="none"``,
``auto_compact=False``):

- ``set``: ``LocalFileStorage.set`` of N distinct keys in an empty store
  (``store.set`` bound once, called in a ``for`` loop; ``get`` likewise);
- ``get``: ``LocalFileStorage.get`` of N existing keys in a shuffled order,
  after the N keys were written, the store closed and reopened (as the
  benchmark's get);
- ``flush``: ``InMemoryStorage.flush`` over a ``LocalFileStorage``, 1,000
  new keys changed before each flush, N / 1,000 flushes, counted per key
  (N must be a multiple of 1,000). ``sync="none"`` on the backing storage,
  so no ``fdatasync`` is made; the ``InMemoryStorage`` sets before each
  flush are not counted;
- ``range``: ``list(LocalFileStorage.keys(start, stop))`` of 10 consecutive
  keys among the N keys written, each read after one new key was set (the
  set is not counted): the cost of an ordered read whose sorted view merges
  one change (see docs/design.md, "Order of keys").

Only the measured calls are counted: the workload runs with
``--collect-atstart=no --toggle-collect=sys_call_tracing`` and makes every
measured call through ``sys.call_tracing`` (a C function that nothing else
calls, and that changes nothing when no tracer is set), so interpreter
start-up, imports, data generation, populating the store, ``close()`` and
exit are in neither count. The subtraction of the 0-operation run then
removes what is left outside the operations: entering the toggle and the
empty loop. Instrumentation itself starts off (``--instr-atstart=no``) and
the workload switches it on with ``callgrind_control`` after its setup,
which makes the setup about 3x faster (``--instr-atstart`` keeps it on
from the start: at N = 20,000 the counts then differ by at most 0.11%).
Hash randomisation is off (``PYTHONHASHSEED=0``): two runs at N = 20,000
give identical counts.

``--repo DIR`` measures the ``logstate`` of another checkout (DIR goes first
on the workload's ``PYTHONPATH``), with this script's workload, so that the
same command measures a commit and its parent. The output names the
``logstate`` that was imported and the CRC-32C implementation it chose
(``google-crc32c`` or the slower ``crcmod``), which the counts depend on.
``--keep DIR`` keeps the callgrind output files, for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OPS = 20_000
FLUSH_KEYS = 1000
VALUE_SIZE = 100
SEED = 20261127
TOGGLE = "sys_call_tracing"  # sys.call_tracing's C function in libpython
ROWS: dict[str, str] = {
    "set": "LocalFileStorage.set (100-byte value)",
    "get": "LocalFileStorage.get (100-byte value)",
    "flush": "InMemoryStorage.flush, per key (1,000 keys per flush)",
    "range": "LocalFileStorage.keys(start, stop) listing 10 of N keys, after 1 new key",
}
_TOTAL_LINE = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


@dataclass
class Result:
    """One row: the two runs' instruction counts and the cost per operation."""

    row: str
    label: str
    ops: int
    ir_ops: int
    ir_zero: int
    per_op: float


# --------------------------------------------------------------------------- workload (child)
def _set_loop(set_: Callable[[str, bytes], None], keys: list[str], values: list[bytes]) -> None:
    for key, value in zip(keys, values, strict=True):
        set_(key, value)


def _get_loop(get: Callable[[str], Any], keys: list[str]) -> None:
    for key in keys:
        get(key)


def _range_read(keys: Callable[..., Any], start: str, stop: str) -> None:
    list(keys(start, stop))


def _instrumentation_on(control: str | None) -> None:
    """Switch callgrind's instrumentation on in this process (started with it off).

    ``callgrind_control`` sends the request; callgrind reads it only while
    this process runs code, so the wait spins instead of blocking.

    Raises:
        RuntimeError: callgrind_control failed or did not finish in 120 s.
    """
    if control is None:
        return
    import time

    child = subprocess.Popen(
        [control, "--instr=on", str(os.getpid())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while child.poll() is None:
        if time.monotonic() > deadline:
            child.kill()
            raise RuntimeError(f"{control} --instr=on did not finish in 120 s")
    if child.returncode != 0:
        error = child.stderr.read().decode(errors="replace") if child.stderr else ""
        raise RuntimeError(f"{control} --instr=on exited {child.returncode}: {error}")


def run_workload(
    row: str, ops: int, measured: bool, directory: str, control: str | None = None
) -> dict[str, str]:
    """Run one row's workload in this process: the setup, then N or 0 measured operations.

    Everything but the measured calls is identical whether ``measured`` is
    True or False; the measured calls go through ``sys.call_tracing`` (see the
    module docstring).

    Args:
        row: "set", "get", "flush" or "range".
        ops: N, the number of operations of the measured run.
        measured: True: do the N operations; False: do none.
        directory: the storage directory to create (must not exist).
        control: callgrind_control, to switch the instrumentation on after
            the setup (callgrind started with ``--instr-atstart=no``); None:
            it is on from the start.

    Returns:
        Where ``logstate`` was imported from and its CRC-32C implementation.

    Raises:
        ValueError: an unknown row.
    """
    import random

    import logstate
    from logstate import InMemoryStorage, LocalFileStorage
    from logstate._crc import CRC_IMPLEMENTATION

    rng = random.Random(SEED)
    keys = [f"key-{i:08d}" for i in range(ops)]
    values = [rng.randbytes(VALUE_SIZE) for _ in range(ops)]
    count = ops if measured else 0
    if row == "set":
        store = LocalFileStorage(directory, sync="none", auto_compact=False)
        todo, todo_values = keys[:count], values[:count]
        _instrumentation_on(control)
        sys.call_tracing(_set_loop, (store.set, todo, todo_values))
        store.close()
    elif row == "get":
        store = LocalFileStorage(directory, sync="none", auto_compact=False)
        _set_loop(store.set, keys, values)
        store.close()
        store = LocalFileStorage(directory, sync="none", auto_compact=False)
        order = list(keys)
        rng.shuffle(order)
        todo = order[:count]
        _instrumentation_on(control)
        sys.call_tracing(_get_loop, (store.get, todo))
        store.close()
    elif row == "flush":
        backing = LocalFileStorage(directory, sync="none", auto_compact=False)
        memory = InMemoryStorage(backing)
        flush = memory.flush
        _instrumentation_on(control)
        for start in range(0, count, FLUSH_KEYS):
            for i in range(start, start + FLUSH_KEYS):
                memory[keys[i]] = values[i]
            sys.call_tracing(flush, ())
        backing.close()
    elif row == "range":
        store = LocalFileStorage(directory, sync="none", auto_compact=False)
        _set_loop(store.set, keys, values)
        list(store.keys())  # the sorted view exists: each read below merges one change
        starts = [rng.randrange(ops - 10) for _ in range(count)]
        _instrumentation_on(control)
        for i, first in enumerate(starts):
            store.set(f"new-{i:08d}", b"")  # not counted: outside sys.call_tracing
            sys.call_tracing(_range_read, (store.keys, keys[first], keys[first + 10]))
        store.close()
    else:
        raise ValueError(f"unknown row {row!r}")
    return {
        "logstate": os.path.dirname(os.path.abspath(logstate.__file__)),
        "crc": CRC_IMPLEMENTATION,
    }


# --------------------------------------------------------------------------- measuring (parent)
def find_valgrind(given: str | None) -> str:
    """The valgrind executable: ``given``, else the one on PATH, else /usr/bin/valgrind.

    Raises:
        SystemExit: no valgrind found (with how to install it).
    """
    candidates = [given] if given else [shutil.which("valgrind"), "/usr/bin/valgrind"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise SystemExit(
        f"valgrind not found ({given or 'not on PATH, not /usr/bin/valgrind'}): "
        "install it (apt-get install valgrind) or pass --valgrind PATH"
    )


def find_control(valgrind: str) -> str | None:
    """callgrind_control beside ``valgrind`` (or on PATH), or None when there is none."""
    beside = os.path.join(os.path.dirname(valgrind), "callgrind_control")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("callgrind_control")


def read_total_ir(path: str) -> int:
    """The total ``Ir`` of a callgrind output file (its ``summary:`` or ``totals:`` line).

    Raises:
        ValueError: the file has no such line.
    """
    with open(path, "rb") as f:
        match = _TOTAL_LINE.search(f.read())
    if match is None:
        raise ValueError(f"{path}: no summary/totals line in the callgrind output")
    return int(match.group(1))


def run_once(
    valgrind: str,
    control: str | None,
    repo: str,
    row: str,
    ops: int,
    measured: bool,
    work: str,
) -> tuple[int, dict[str, str]]:
    """One callgrind run of the workload; returns its total Ir and the workload's report.

    With ``control`` (callgrind_control), callgrind starts with its
    instrumentation off, which runs the start-up and the setup about 3x
    faster, and the workload switches it on before the measured calls;
    without, it is on from the start. The counts agree to about 0.1%.

    Raises:
        RuntimeError: the run failed, or the workload did not import ``repo``'s logstate.
    """
    tag = f"{row}-{ops if measured else 0}"
    out = os.path.join(work, f"callgrind.{tag}.out")
    store = os.path.join(work, f"store-{tag}")
    shutil.rmtree(store, ignore_errors=True)  # a fresh store (--keep may reuse a directory)
    command = [
        valgrind,
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--collect-atstart=no",
        f"--toggle-collect={TOGGLE}",
        f"--instr-atstart={'no' if control else 'yes'}",
        sys.executable,
        os.path.abspath(__file__),
        "--workload",
        row,
        "--rows",
        row,
        "--ops",
        str(ops),
        "--dir",
        store,
    ]
    if measured:
        command.append("--measured")
    if control:
        command += ["--control", control]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    env["PYTHONHASHSEED"] = "0"
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    report: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    if os.path.realpath(report["logstate"]) != os.path.realpath(os.path.join(repo, "logstate")):
        raise RuntimeError(f"the workload imported {report['logstate']}, not {repo}/logstate")
    return read_total_ir(out), report


def measure(
    valgrind: str, control: str | None, repo: str, row: str, ops: int, work: str
) -> tuple[Result, dict[str, str]]:
    """The row's cost per operation: (Ir of N operations - Ir of none) / N.

    Raises:
        RuntimeError: a run failed, or the N-operation run counted nothing
            (the toggle function was not found: a python without symbols).
    """
    ir_ops, report = run_once(valgrind, control, repo, row, ops, True, work)
    ir_zero, _ = run_once(valgrind, control, repo, row, ops, False, work)
    if ir_ops <= ir_zero:
        raise RuntimeError(
            f"{row}: {ir_ops} instructions with {ops} operations, {ir_zero} without: "
            f"callgrind did not see {TOGGLE} (sys.call_tracing) in {sys.executable}"
        )
    result = Result(row, ROWS[row], ops, ir_ops, ir_zero, round((ir_ops - ir_zero) / ops, 1))
    return result, report


def format_table(results: Sequence[Result], report: dict[str, str], repo: str) -> str:
    """A Markdown table of the results, with what was measured."""
    lines = [
        f"callgrind instructions per operation: N = {results[0].ops:,}, "
        f"logstate from {report['logstate']}, CRC-32C: {report['crc']}, "
        f"Python {sys.version.split()[0]}",
        "",
        "| per operation | instructions | Ir, N ops | Ir, 0 ops |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.label} | {r.per_op:,.0f} | {r.ir_ops:,} | {r.ir_zero:,} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="callgrind instructions per operation of logstate's hot paths"
    )
    parser.add_argument("--ops", type=int, default=DEFAULT_OPS, help="N (default 20000)")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}"
    )
    parser.add_argument("--repo", default=ROOT, help="the checkout whose logstate to measure")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--valgrind", default=None, help="the valgrind executable")
    parser.add_argument("--keep", default=None, help="keep the callgrind outputs in this dir")
    parser.add_argument(
        "--instr-atstart",
        action="store_true",
        help="instrument from the start instead of switching it on with callgrind_control "
        "after the setup (slower; the same counts)",
    )
    # the workload, run under valgrind by the parent
    parser.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measured", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--control", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ops < 1:
        parser.error(f"--ops must be at least 1, got {args.ops}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(
            f"--rows: unknown {', '.join(unknown) or '(none given)'}; know {', '.join(ROWS)}"
        )
    if "flush" in rows and args.ops % FLUSH_KEYS:
        parser.error(f"--ops must be a multiple of {FLUSH_KEYS} for the flush row, got {args.ops}")
    args.rows = rows
    args.repo = os.path.abspath(args.repo)
    if args.workload is None and not os.path.isfile(
        os.path.join(args.repo, "logstate", "__init__.py")
    ):
        parser.error(f"--repo {args.repo}: no logstate/__init__.py there")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workload is not None:
        where = run_workload(args.workload, args.ops, args.measured, args.dir, args.control)
        print(json.dumps(where))
        return 0
    valgrind = find_valgrind(args.valgrind)
    control = None if args.instr_atstart else find_control(valgrind)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    work = args.keep or tempfile.mkdtemp(prefix="logstate-instructions-")
    try:
        results: list[Result] = []
        report: dict[str, str] = {}
        for row in args.rows:
            result, report = measure(valgrind, control, args.repo, row, args.ops, work)
            results.append(result)
            if not args.json:
                print(f"{row}: {result.per_op:,.1f} instructions per operation", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        document = {
            "ops": args.ops,
            "logstate": report["logstate"],
            "crc": report["crc"],
            "python": sys.version.split()[0],
            "rows": {r.row: asdict(r) for r in results},
        }
        print(json.dumps(document, indent=2))
    else:
        print(format_table(results, report, args.repo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
