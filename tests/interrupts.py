"""Raise an exception inside logstate exactly where CPython can deliver a signal.

A signal handler's exception (KeyboardInterrupt from Ctrl-C, SystemExit from a
SIGTERM handler) is raised in the main thread when the interpreter checks its
"eval breaker": in CPython 3.10-3.13 at the start of a Python function
(RESUME), after a call returns (CALL), and at a backward jump (a loop). Never
between two other instructions: ``self.x = a`` followed by ``self.y = b`` is
not split by a signal, but ``os.write(...)`` followed by ``self.size += n`` is.

:class:`Injector` counts those points in logstate's own frames while a call
runs (``sys.settrace`` with opcode events) and raises :class:`Interrupt` at
point number ``target``. Running a call once per point puts an interrupt at
every place a real signal could land in logstate's code (not inside the
standard library: its own windows are not ours to close).
"""

from __future__ import annotations

import dis
import os
import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

import logstate

LOGSTATE_DIR = os.path.dirname(logstate.__file__) + os.sep
_AFTER = frozenset(
    dis.opmap[name]
    for name in (
        "CALL",
        "CALL_FUNCTION_EX",
        "JUMP_BACKWARD",
        "POP_JUMP_BACKWARD_IF_TRUE",
        "POP_JUMP_BACKWARD_IF_FALSE",
        "POP_JUMP_BACKWARD_IF_NONE",
        "POP_JUMP_BACKWARD_IF_NOT_NONE",
        "CALL_FUNCTION",
        "CALL_METHOD",
        "CALL_FUNCTION_KW",
        "JUMP_ABSOLUTE",
    )
    if name in dis.opmap
)

Trace = Callable[[FrameType, str, Any], Any]
_HANDLERS: dict[CodeType, list[tuple[int, int, int]]] = {}


def _handler(code: CodeType, offset: int) -> int:
    """The exception handler covering ``offset`` in ``code`` (-1: none)."""
    entries = _HANDLERS.get(code)
    if entries is None:
        bytecode = dis.Bytecode(code)
        entries = _HANDLERS[code] = [
            (e.start, e.end, e.target) for e in getattr(bytecode, "exception_entries", ())
        ]
    for start, end, target in entries:
        if start <= offset < end:
            return target
    return -1


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt / SystemExit raised by a signal handler."""


class Injector:
    """Raise :class:`Interrupt` at the ``target``-th signal point (0-based); -1: count only."""

    def __init__(self, target: int = -1) -> None:
        self.target = target
        self.points = 0
        self.fired_at: str | None = None

    def _local(self) -> Trace:
        first = True
        last_op = -1
        last_offset = -1

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            nonlocal first, last_op, last_offset
            if event != "opcode":
                return trace
            code = frame.f_code
            # After a call, CPython raises the signal's exception as the call's
            # own (its exception handler applies): raising it here is the same
            # only where the same handler covers both instructions.
            if first or (
                last_op in _AFTER and _handler(code, last_offset) == _handler(code, frame.f_lasti)
            ):
                if self.points == self.target:
                    self.fired_at = f"{code.co_name}:{frame.f_lineno}"
                    self.points += 1
                    raise Interrupt(self.fired_at)
                self.points += 1
            first = False
            last_offset = frame.f_lasti
            last_op = code.co_code[last_offset]
            return trace

        return trace

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_filename.startswith(LOGSTATE_DIR):
            frame.f_trace_opcodes = True
            return self._local()
        return None

    def run(self, call: Callable[[], object]) -> bool:
        """Run ``call`` with the injection armed; True when it was interrupted."""
        sys.settrace(self._global)
        try:
            call()
        except Interrupt:
            return True
        finally:
            sys.settrace(None)
        return False


def count_points(call: Callable[[], object]) -> int:
    """How many signal points ``call`` passes through in logstate's frames."""
    injector = Injector()
    injector.run(call)
    return injector.points
