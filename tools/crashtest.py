"""kill -9 torture: a workload process killed with SIGKILL at random moments, then verified.

Commands::

    python tools/crashtest.py --kills 5                          # CI round, ~5 s
    python tools/crashtest.py --kills 2000 --seed 1 --mode mixed   # long round, ~20 min
    python tools/crashtest.py --interrupts 10000 --mode mixed     # interrupt workload

With ``--interrupts N`` the parent also sends the child SIGINT at random
moments while it runs (every 0-4 ms), until N of them have landed inside an
operation; the child's handler raises KeyboardInterrupt only while an
operation runs (as Ctrl-C would, but never in the tool's own bookkeeping).
After each one the child reads the storage back through the same handles
and reports ``int <id> before`` or ``int <id> after``: the interrupted
operation must have left exactly the state before it or after it (anything
else is reported as ``bad <id>`` and is a violation); it then goes on with
the same open storage, so stale bookkeeping shows in later operations and in
the verifying open. Each round ends with a SIGKILL or, in half the rounds,
with a SIGTERM whose handler raises SystemExit (a graceful stop: the child
closes its storage); either way every acknowledged operation must be there.

Options: ``--kills N`` (rounds, each ends with a SIGKILL), ``--seed S`` (the
workload and the kill delays), ``--dir D`` (the storage directory; default a
fresh temporary one, removed at the end unless a violation was found; an
existing directory is continued), ``--mode none|interval|always|mixed`` (the
sync mode of the workload; mixed picks one at each start and at each reopen),
``--max-life-s`` (longest time a child runs after it is ready).

The workload (child process, ``--child``): a seeded stream of operations on
one directory -- single sets and deletes in the root and in sub-storages,
batches (some discarded by an exception), InMemoryStorage flushes with a
checkpoint (sets, deletes, in-place mutations of list values, clears),
sub-storage creates, clears and deletes, large values, explicit syncs,
explicit compactions, close+reopen (in mixed mode with another sync mode);
segments are small (32 KiB) and ``auto_compact`` runs compactions in the
background. Every operation has an id, larger than every earlier one, and
every value it writes carries that id (so a wrong value names the operation
it came from). The child reports ``ack <id>`` on stdout only after the
operation's durability point for a process kill: the return of the call (in
every sync mode the bytes are then in the OS, which a SIGKILL does not lose;
power loss is the fault-injection tests' business). Each operation depends only on the
seed, the round and the state, so the parent replays the same stream.

The parent starts the child on the directory, kills it with SIGKILL at a
random moment (mostly while it runs operations; sometimes while it opens and
recovers the directory), waits for it, then opens the directory (read-write,
or read-only so that the next child does the repair and can be killed in it)
and verifies:

- the open succeeds and ``Engine._check()`` holds;
- the state (every sub-storage, key, value, the checkpoint) equals the state
  after the last acknowledged operation, or after the one operation that was
  running when the kill came (a prefix of the history). This implies: every
  acknowledged operation is present (the value it set, or that of a later
  operation), groups (batches, flushes) are all or nothing, and no deleted
  key or sub-storage comes back. A mismatch is reported in those terms;
- the child never dies on its own (an exception in the workload, e.g. a
  failed open, is a violation).

The next child continues from the recovered state. The last line printed is
``kills=N operations verified=M violations=V`` (M: acknowledged operations,
each verified after the kill that ended its round); the exit status is 1
when V > 0. Kill moments depend on timing, so a seed reproduces the workload
and the delays, not the exact kill points; a violating directory is copied
aside (``<dir>.violation-<round>``) for inspection.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from logstate import InMemoryStorage, LocalFileStorage  # noqa: E402

MODES = ("none", "interval", "always")
STORE_OPTIONS: dict[str, Any] = {
    "segment_size": 32 * 1024,  # bytes: segments roll every few dozen operations
    "sync_interval": 0.05,  # seconds
    "auto_compact": True,
    "compact_ratio": 0.5,
    "compact_min_size": 128 * 1024,  # bytes
    "compress_min_size": 2048,  # bytes: most batches and flushes are zstd groups
}
MEM = "mem"  # the sub-storage behind the InMemoryStorage; never dropped or cleared
SUBS = ("s0", "s1", "s2")
NESTED = "s0/n"
ROOT_KEYS = tuple(f"r{i}" for i in range(40))
SUB_KEYS = tuple(f"k{i}" for i in range(10))
MEM_KEYS = tuple(f"m{i}" for i in range(20))
BIG_KEYS = ("big0", "big1", "big2")
READY_TIMEOUT_S = 60.0
KILL_WHILE_OPENING = 0.15  # share of rounds killed while the child opens (recovery)
VERIFY_READ_ONLY = 0.3  # share of rounds verified read-only (the child then repairs)
KEEP_VIOLATIONS = 3  # violating directories copied aside


# =========================================================================== model
@dataclass
class Model:
    """What the directory must hold: namespace -> key -> value, and the checkpoint."""

    namespaces: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}, MEM: {}})
    checkpoint: Any = None

    def clear(self, ns: str) -> None:
        """Keys of ``ns`` and every sub-storage below it (what REC_CLEAR does)."""
        for name in [n for n in self.namespaces if n.startswith(ns + "/")]:
            del self.namespaces[name]
        self.namespaces[ns].clear()

    def drop(self, ns: str) -> None:
        for name in [n for n in self.namespaces if n == ns or n.startswith(ns + "/")]:
            del self.namespaces[name]


@dataclass
class Op:
    """One operation of the workload (``items``: a batch's or a flush's changes)."""

    op_id: int
    kind: str
    ns: str = ""
    key: str = ""
    value: Any = None
    items: list[tuple[Any, ...]] = field(default_factory=list)
    discard: bool = False
    mode: str = ""


def make_value(rng: random.Random, op_id: int) -> Any:
    """A value carrying ``op_id``, of one of several types and sizes."""
    r = rng.random()
    if r < 0.3:
        return op_id
    if r < 0.55:
        return f"{op_id}:" + "s" * rng.randrange(600)
    if r < 0.75:
        return op_id.to_bytes(8, "little") + bytes(rng.randrange(900))
    if r < 0.9:
        return {"op": op_id, "pad": "p" * rng.randrange(300)}  # pickled
    return [op_id]  # pickled; mutated in place by InMemoryStorage flushes


def op_id_of(value: Any) -> int:
    """The id of the operation that wrote ``value`` (-1 for a value this tool never writes)."""
    if type(value) is int:
        return value
    if type(value) is str:
        return int(value.partition(":")[0])
    if type(value) is bytes:
        return int.from_bytes(value[:8], "little")
    if type(value) is dict:
        return int(value["op"])
    if type(value) is list and value:
        return max(int(v) for v in value)
    return -1


def pick_mode(rng: random.Random, mode: str) -> str:
    return rng.choice(MODES) if mode == "mixed" else mode


def plan_op(rng: random.Random, model: Model, op_id: int, mode: str) -> Op:
    """The next operation: a function of the random stream and the state only."""
    spaces = sorted(ns for ns in model.namespaces if ns != MEM)
    subs = [ns for ns in spaces if ns]

    def keys_of(ns: str) -> tuple[str, ...]:
        return ROOT_KEYS if not ns else SUB_KEYS

    r = rng.random()
    if r < 0.40:
        ns = rng.choice(spaces)
        return Op(op_id, "set", ns, rng.choice(keys_of(ns)), make_value(rng, op_id))
    if r < 0.50:
        ns = rng.choice(spaces)
        present = sorted(model.namespaces[ns])
        key = rng.choice(present) if present and rng.random() < 0.8 else rng.choice(keys_of(ns))
        return Op(op_id, "delete", ns, key)
    if r < 0.62:
        ns = rng.choice(spaces)
        items: list[tuple[Any, ...]] = []
        for _ in range(rng.randrange(2, 9)):
            s = rng.random()
            if s < 0.7:
                items.append(("set", rng.choice(keys_of(ns)), make_value(rng, op_id)))
            elif s < 0.95 or not ns:  # never a root clear: it would drop MEM
                items.append(("delete", rng.choice(keys_of(ns))))
            else:
                items.append(("clear",))
        return Op(op_id, "batch", ns, items=items, discard=rng.random() < 0.1)
    if r < 0.75:
        items = []
        lists = {k for k, v in model.namespaces[MEM].items() if type(v) is list}
        if rng.random() < 0.05:
            items.append(("clear",))
            lists.clear()
        for _ in range(rng.randrange(1, 8)):
            s = rng.random()
            key = rng.choice(MEM_KEYS)
            if s < 0.6:
                value = make_value(rng, op_id)
                items.append(("set", key, value))
                (lists.add if type(value) is list else lists.discard)(key)
            elif s < 0.8:
                items.append(("delete", key))
                lists.discard(key)
            elif lists:
                items.append(("append", rng.choice(sorted(lists)), op_id))
        return Op(op_id, "flush", MEM, items=items)
    if r < 0.79:
        names = [n for n in (*SUBS, NESTED) if n.rpartition("/")[0] in model.namespaces]
        return Op(op_id, "create", rng.choice(names))
    if r < 0.82:
        return Op(op_id, "drop", rng.choice(SUBS))
    if r < 0.84:
        return Op(op_id, "clear", rng.choice(subs)) if subs else Op(op_id, "sync")
    if r < 0.86:
        size = rng.randrange(20_000, 120_000)
        value = op_id.to_bytes(8, "little") + (
            rng.randbytes(size) if rng.random() < 0.5 else bytes(size)
        )
        return Op(op_id, "set", "", rng.choice(BIG_KEYS), value)
    if r < 0.91:
        return Op(op_id, "compact")
    if r < 0.97:
        return Op(op_id, "sync")
    return Op(op_id, "reopen", mode=pick_mode(rng, mode))


def apply_op(model: Model, op: Op) -> None:
    """What ``op`` does to the state."""
    spaces = model.namespaces
    if op.kind == "set":
        spaces[op.ns][op.key] = copy.deepcopy(op.value)
    elif op.kind == "delete":
        spaces[op.ns].pop(op.key, None)
    elif op.kind in ("batch", "flush"):
        if op.discard:
            return
        for item in op.items:
            if item[0] == "set":
                spaces[op.ns][item[1]] = copy.deepcopy(item[2])
            elif item[0] == "delete":
                spaces[op.ns].pop(item[1], None)
            elif item[0] == "append":
                spaces[op.ns][item[1]].append(item[2])
            else:
                model.clear(op.ns)
        if op.kind == "flush":
            model.checkpoint = op.op_id
    elif op.kind == "create":
        spaces.setdefault(op.ns, {})
    elif op.kind == "drop":
        model.drop(op.ns)
    elif op.kind == "clear":
        model.clear(op.ns)


def read_model(root: LocalFileStorage) -> Model:
    """Everything the directory holds, through the public API."""
    model = Model({}, root.checkpoint)

    def walk(handle: LocalFileStorage, ns: str) -> None:
        model.namespaces[ns] = {key: handle.get(key) for key in handle.get_all_keys()}
        for name in handle.get_sub_storages():
            child = handle.get_or_create_sub_storage(name)  # exists: writes nothing
            try:
                walk(child, f"{ns}/{name}" if ns else name)
            finally:
                child.close()

    walk(root, "")
    return model


@contextmanager
def sub_storage(root: LocalFileStorage, ns: str) -> Iterator[LocalFileStorage]:
    """A handle on namespace ``ns`` (created if missing), closed afterwards."""
    if not ns:
        yield root
        return
    opened = []
    handle = root
    try:
        for name in ns.split("/"):
            handle = handle.get_or_create_sub_storage(name)
            opened.append(handle)
        yield handle
    finally:
        for each in opened:
            each.close()


# =========================================================================== child
class _Discard(Exception):
    """Raised inside a batch block so that the batch is discarded."""


class Workload:
    """The child's open directory: the root handle and the InMemoryStorage on MEM."""

    def __init__(self, path: str, sync: str) -> None:
        self.path = path
        self._open(sync)

    def _open(self, sync: str) -> None:
        self.sync = sync
        self.root = LocalFileStorage(self.path, sync=sync, **STORE_OPTIONS)
        self.mem_handle = self.root.get_or_create_sub_storage(MEM)
        self.mem = InMemoryStorage(self.mem_handle)

    def close(self) -> None:
        self.mem_handle.close()
        self.root.close()

    def settle(self, op: Op | None) -> None:
        """After an interrupted operation: finish a close or reopen it cut short.

        An interrupted InMemoryStorage flush keeps its changes pending (they
        are written by the next flush); the tool's model wants the state of
        this flush decided now, so pending changes are dropped by loading the
        storage anew: whatever the interrupted flush wrote stays written.
        """
        reopen = op is not None and op.kind == "reopen"
        if reopen or self.root.closed or self.mem_handle.closed:
            # (an interrupted reopen may have replaced some of the three only)
            self.mem_handle.close()
            self.root.close()
            self._open(op.mode if op is not None and reopen else self.sync)
        elif op is not None and op.kind == "flush":
            self.mem = InMemoryStorage(self.mem_handle)

    def run(self, op: Op) -> None:
        """Perform ``op``; returns at its durability point (module docstring)."""
        root = self.root
        if op.kind == "set":
            with sub_storage(root, op.ns) as handle:
                handle.set(op.key, op.value)
        elif op.kind == "delete":
            with sub_storage(root, op.ns) as handle:
                handle.remove(op.key)
        elif op.kind == "batch":
            try:
                with sub_storage(root, op.ns) as handle, handle.batch() as batch:
                    for item in op.items:
                        if item[0] == "set":
                            batch.set(item[1], item[2])
                        elif item[0] == "delete":
                            batch.remove(item[1])
                        else:
                            batch.clear()
                    if op.discard:
                        raise _Discard
            except _Discard:
                pass
        elif op.kind == "flush":
            for item in op.items:
                if item[0] == "set":
                    self.mem.set(item[1], copy.deepcopy(item[2]))
                elif item[0] == "delete":
                    self.mem.remove(item[1])
                elif item[0] == "append":
                    self.mem[item[1]].append(item[2])
                else:
                    self.mem.clear()
            self.mem.flush(checkpoint=op.op_id)
        elif op.kind == "create":
            with sub_storage(root, op.ns):
                pass
        elif op.kind == "drop":
            root.delete_sub_storage(op.ns)
        elif op.kind == "clear":
            with sub_storage(root, op.ns) as handle:
                handle.clear()
        elif op.kind == "compact":
            root.compact()
        elif op.kind == "sync":
            root.flush()
        elif op.kind == "reopen":
            self.close()
            self._open(op.mode)
        else:  # pragma: no cover
            raise ValueError(op.kind)


def report(line: str) -> None:
    os.write(1, f"{line}\n".encode())


class _Armed:
    """Whether an operation is running: signals raise only then (see --interrupts)."""

    running = False
    stop = False  # SIGTERM came between operations: stop at the next one


def _on_sigint(signum: int, frame: object) -> None:
    if _Armed.running:
        raise KeyboardInterrupt


def _on_sigterm(signum: int, frame: object) -> None:
    if _Armed.running:
        raise SystemExit(0)
    _Armed.stop = True


def child_main(args: argparse.Namespace) -> None:
    rng = random.Random(f"{args.seed}:{args.round}")
    sync = pick_mode(rng, args.mode)
    report("open")
    workload = Workload(args.dir, sync)
    model = read_model(workload.root)
    op_id = args.start_id
    if args.interrupts:
        signal.signal(signal.SIGINT, _on_sigint)
        signal.signal(signal.SIGTERM, _on_sigterm)
    report(f"ready {op_id}")
    try:
        while not _Armed.stop:
            op = plan_op(rng, model, op_id, args.mode)
            after = copy.deepcopy(model)
            apply_op(after, op)
            _Armed.running = True
            try:
                workload.run(op)
                _Armed.running = False
            except KeyboardInterrupt:
                _Armed.running = False
                # settled with no interrupt armed: the tool's own repair
                workload.settle(op)
                found = read_model(workload.root)
                if found == after:
                    model = after
                    report(f"int {op_id} after")
                elif found == model:
                    report(f"int {op_id} before")
                else:
                    report(f"bad {op_id} {describe(found, model, after, op)[:3]}")
                    raise SystemExit(3) from None
                op_id += 1
                continue
            model = after
            report(f"ack {op_id}")
            op_id += 1
    except SystemExit as stop:
        # SIGTERM in an operation: the graceful shutdown of a service, which
        # closes its storage (the operation is the running one: before or after)
        _Armed.running = False
        if stop.code == 3:
            raise
    finally:
        _Armed.running = False  # an error escaping: no signal raises in the exit path
    workload.settle(None)
    workload.close()
    report("closed")


# =========================================================================== parent
@dataclass
class Round:
    """What the stdout of one killed child says."""

    opened: bool  # the child had started opening the directory
    ready: bool  # ... and had opened it: operations may have run
    acks: list[int]  # operations done (acknowledged, or interrupted after their effect)
    undone: set[int]  # operations interrupted before their effect
    interrupts: int  # operations interrupted (before or after)
    bad: list[str]  # interrupted operations that left another state
    closed: bool  # the child closed its storage and exited (SIGTERM)


def parse_output(text: str) -> Round:
    lines = text.split("\n")[:-1]  # a last line without newline was cut by the kill
    done = [int(line.split()[1]) for line in lines if line.startswith(("ack ", "int "))]
    undone = {
        int(line.split()[1])
        for line in lines
        if line.startswith("int ") and line.endswith(" before")
    }
    return Round(
        "open" in lines,
        any(line.startswith("ready ") for line in lines),
        done,
        undone,
        sum(line.startswith("int ") for line in lines),
        [line for line in lines if line.startswith("bad ")],
        "closed" in lines,
    )


def describe(actual: Model, acked: Model, running: Model | None, op: Op | None) -> list[str]:
    """A mismatch in the properties' terms: lost, resurrected, torn group, wrong value."""
    lines = []
    others = [running] if running is not None else []
    for ns in sorted(set(actual.namespaces) | set(acked.namespaces)):
        in_actual = ns in actual.namespaces
        if in_actual != (ns in acked.namespaces) and all(
            in_actual != (ns in m.namespaces) for m in others
        ):
            what = "resurrected" if in_actual else "lost"
            lines.append(f"sub-storage {ns!r} {what}")
        if not in_actual:
            continue
        got = actual.namespaces[ns]
        want = acked.namespaces.get(ns, {})
        for key in sorted(set(got) | set(want)):
            value = got.get(key, "<absent>")
            if value == want.get(key, "<absent>") or any(
                value == m.namespaces.get(ns, {}).get(key, "<absent>") for m in others
            ):
                continue
            if key not in got:
                lines.append(
                    f"lost: {ns}/{key} absent; acknowledged op {op_id_of(want[key])} set it"
                )
            elif key not in want:
                lines.append(
                    f"resurrected: {ns}/{key} holds op {op_id_of(got[key])}'s value; "
                    "it was deleted (or never set) by acknowledged operations"
                )
            else:
                lines.append(
                    f"wrong value: {ns}/{key} holds op {op_id_of(got[key])}'s value; "
                    f"the last acknowledged op on it is {op_id_of(want[key])}"
                )
    if actual.checkpoint not in (acked.checkpoint, *(m.checkpoint for m in others)):
        lines.append(f"checkpoint {actual.checkpoint!r}, acknowledged {acked.checkpoint!r}")
    if not lines and op is not None:
        lines.append(
            f"torn group: part of op {op.op_id} ({op.kind} of {len(op.items)}) was applied"
        )
    return lines or ["state differs (no detail found)"]


@dataclass
class Stats:
    """What the verifying opens found (how often each kind of crash point was hit)."""

    torn_tails: int = 0  # torn tails cut (or reported, read-only)
    leftovers: int = 0  # temporary files of an interrupted compaction or snapshot
    read_only: int = 0  # rounds verified read-only


def verify(path: str, read_only: bool, stats: Stats) -> Model:
    """Open the directory, check the engine's invariants, return its state."""
    stats.leftovers += sum(name.endswith(".tmp") for name in os.listdir(path))
    options: dict[str, Any] = {"read_only": True} if read_only else {"sync": "none"}
    with LocalFileStorage(path, auto_create_dir=False, auto_compact=False, **options) as root:
        stats.torn_tails += len(root.report.torn_tails)
        root._check()
        return read_model(root)


def parent_main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    # recovery logs a warning for each repair; the summary counts them instead
    logging.getLogger("logstate").setLevel(logging.ERROR)
    rng = random.Random(f"{args.seed}:parent")
    temporary = args.dir is None
    path = args.dir or os.path.join(tempfile.mkdtemp(prefix="logstate-crashtest-"), "store")
    with LocalFileStorage(path, sync="always", auto_compact=False) as root:
        root.get_or_create_sub_storage(MEM).close()
        model = read_model(root)
    ids = [op_id_of(v) for ns in model.namespaces.values() for v in ns.values()]
    next_id = max([0, *ids, *([model.checkpoint] if model.checkpoint else [])]) + 1
    script = os.path.abspath(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *sys.path])}
    kills = verified = violations = 0
    stats = Stats()
    out_path = path + ".child-out"
    err_path = path + ".child-err"
    print(f"crashtest: seed={args.seed} mode={args.mode} kills={args.kills} dir={path}", flush=True)
    interrupts = 0
    rounds = range(args.kills) if not args.interrupts else iter(int, 1)  # forever
    for round_number, _ in enumerate(rounds):
        if args.interrupts and interrupts >= args.interrupts:
            break
        start_id = next_id
        command = [sys.executable, script, "--child", "--dir", path, "--seed", str(args.seed)]
        command += ["--round", str(round_number), "--start-id", str(start_id)]
        command += ["--mode", args.mode, "--interrupts", str(args.interrupts)]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            child = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        kill_while_opening = rng.random() < KILL_WHILE_OPENING
        delay_s = rng.uniform(0, 0.01) if kill_while_opening else rng.uniform(0, args.max_life_s)
        marker = b"open\n" if kill_while_opening else b"ready "
        deadline = time.monotonic() + READY_TIMEOUT_S
        while child.poll() is None and time.monotonic() < deadline:
            with open(out_path, "rb") as out_file:
                if marker in out_file.read():
                    break
            time.sleep(0.002)
        graceful = False
        if args.interrupts and not kill_while_opening:
            # interrupts at random moments, then a SIGTERM (graceful) or a SIGKILL
            end = time.monotonic() + delay_s
            while time.monotonic() < end and child.poll() is None:
                time.sleep(rng.uniform(0, 0.004))
                child.send_signal(signal.SIGINT)
            graceful = rng.random() < 0.5
            if graceful and child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(READY_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    graceful = False  # a hang: reported below
        else:
            time.sleep(delay_s)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait()
        with open(out_path, encoding="utf-8", errors="replace") as out_file:
            output = parse_output(out_file.read())
        interrupts += output.interrupts
        problems: list[str] = list(output.bad)
        if graceful and (child.returncode != 0 or not output.closed):
            with open(err_path, encoding="utf-8", errors="replace") as err_file:
                problems.append(
                    f"the child did not close after SIGTERM ({child.returncode}): "
                    f"{err_file.read()[-3000:]}"
                )
        elif not graceful and child.returncode != -signal.SIGKILL:
            with open(err_path, encoding="utf-8", errors="replace") as err_file:
                problems.append(
                    f"the child exited by itself ({child.returncode}): {err_file.read()[-3000:]}"
                )
        else:
            kills += 1
        # ---- the states the directory may be in: the history's last two points
        replay = random.Random(f"{args.seed}:{round_number}")
        pick_mode(replay, args.mode)
        acked = copy.deepcopy(model)
        expected_ids = list(range(start_id, start_id + len(output.acks)))
        if output.acks != expected_ids:
            problems.append(f"acknowledgements out of order: {output.acks[:5]}...")
        for op_id in expected_ids:
            planned = plan_op(replay, acked, op_id, args.mode)
            if op_id not in output.undone:
                apply_op(acked, planned)
        running: Model | None = None
        running_op: Op | None = None
        if output.ready:  # the operation a SIGKILL or SIGTERM interrupted
            running_op = plan_op(replay, acked, start_id + len(output.acks), args.mode)
            running = copy.deepcopy(acked)
            apply_op(running, running_op)
        read_only = rng.random() < VERIFY_READ_ONLY
        stats.read_only += read_only
        actual: Model | None = None
        try:
            actual = verify(path, read_only, stats)
        except Exception as exc:  # the open or _check() failed: a violation
            problems.append(f"verification open failed: {exc!r}")
        if actual is not None and actual != acked and actual != running:
            problems.extend(describe(actual, acked, running, running_op))
        verified += len(output.acks) - len(output.undone)
        if problems:
            violations += 1
            print(
                f"VIOLATION in round {round_number} (seed {args.seed}, mode {args.mode}, "
                f"ops {start_id}..{start_id + len(output.acks)}, last acknowledged "
                f"{output.acks[-1] if output.acks else None}, verified "
                f"{'read-only' if read_only else 'read-write'}):",
                file=sys.stderr,
            )
            for line in problems[:50]:
                print(f"  {line}", file=sys.stderr)
            if violations <= KEEP_VIOLATIONS:
                aside = f"{path}.violation-{round_number}"
                shutil.copytree(path, aside)
                print(f"  directory copied to {aside}", file=sys.stderr)
            if actual is None:
                break  # cannot continue from a directory that does not open
        model = actual if actual is not None else acked
        next_id = start_id + len(output.acks) + 1  # the running op's id is never reused
        if args.progress and (round_number + 1) % args.progress == 0:
            elapsed_s = time.monotonic() - started
            print(
                f"  round {round_number + 1}: kills={kills} interrupts={interrupts} "
                f"verified={verified} violations={violations} ({elapsed_s:.0f} s)",
                flush=True,
            )
    elapsed_s = time.monotonic() - started
    for leftover in (out_path, err_path):
        if os.path.exists(leftover):
            os.unlink(leftover)
    if temporary and violations == 0:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    print(
        f"crashtest: {elapsed_s:.1f} s; verifying opens found {stats.torn_tails} torn tails "
        f"and {stats.leftovers} temporary files of interrupted compactions or snapshots; "
        f"{stats.read_only} rounds verified read-only; last op id {next_id - 1}",
        flush=True,
    )
    interrupted = f" interrupts={interrupts}" if args.interrupts else ""
    print(
        f"kills={kills}{interrupted} operations verified={verified} violations={violations}",
        flush=True,
    )
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=100, help="rounds (SIGKILLs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="storage directory (default: a temporary one)")
    parser.add_argument("--mode", choices=[*MODES, "mixed"], default="mixed")
    parser.add_argument("--max-life-s", type=float, default=0.4, help="seconds after ready")
    parser.add_argument("--progress", type=int, default=0, help="print every N rounds")
    parser.add_argument(
        "--interrupts",
        type=int,
        default=0,
        help="also interrupt operations with SIGINT until N landed (rounds end with SIGTERM "
        "or SIGKILL; --kills is then ignored)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start-id", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
