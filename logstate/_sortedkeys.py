"""Ordered reads of one namespace: its keys kept sorted, and key ranges in them.

Owns: ``SortedKeys`` (a namespace's keys in order, kept up to date by the
changes the keydir notes, so that an ordered read after a few changes costs
a few bisections, not a sort) and ``key_range`` (the slice of sorted keys
between bounds or under a prefix). Keys compare as Python str: code point
order, which is also the UTF-8 byte order a KeyMap's arena holds.
Must never: do I/O, hold anything but keys, or know what a location is.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection

__all__ = ["SortedKeys", "key_range"]


def key_range(
    keys: list[str], start: str | None, stop: str | None, prefix: str | None
) -> tuple[int, int]:
    """The slice ``[low, high)`` of the sorted ``keys`` that are ``>= start``,
    ``< stop`` and begin with ``prefix`` (None: no bound)."""
    low = 0 if start is None else bisect_left(keys, start)
    high = len(keys) if stop is None else bisect_left(keys, stop, low)
    if prefix:
        low = max(low, bisect_left(keys, prefix))
        # the first str after every str that begins with prefix
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            high = min(high, bisect_left(keys, prefix[:-1] + chr(last + 1), low))
        else:  # no successor of the last code point: walk to the end of the run
            end = low
            while end < high and keys[end].startswith(prefix):
                end += 1
            high = end
    return low, max(low, high)


class SortedKeys:
    """The keys of one namespace in order, kept up to date by the changes noted.

    ``keys`` is sorted when ``changed`` is empty. Every key whose presence
    may have changed since (a new key, a delete) is appended to
    ``changed``; :meth:`resolve` merges those into ``keys`` (or sorts again
    when there are many), so an ordered read after a few changes costs a
    few bisections, not a sort. ``limit``: past that many unresolved
    changes the keydir drops the view (no ordered read came for a long
    time; the memory is not kept growing).
    """

    __slots__ = ("changed", "keys", "limit")

    def __init__(self, index: Collection[str]) -> None:
        self.keys = sorted(index)
        self.changed: list[str] = []
        self.limit = max(4096, len(self.keys))

    def resolve(self, index: Collection[str]) -> list[str]:
        """``keys``, made equal to ``sorted(index)`` again."""
        changed = self.changed
        if not changed:
            return self.keys
        self.changed = []
        keys = self.keys
        if len(changed) > 64 and len(changed) * 16 > len(keys):
            self.keys = keys = sorted(index)
        else:
            for key in set(changed):
                i = bisect_left(keys, key)
                present = i < len(keys) and keys[i] == key
                if key in index:
                    if not present:
                        keys.insert(i, key)
                elif present:
                    del keys[i]
        self.limit = max(4096, len(keys))
        return keys
