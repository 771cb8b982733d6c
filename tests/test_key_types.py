"""Keys and sub-storage names that are ``str`` subclasses are stored as exact ``str``.

An ``enum.StrEnum`` member (3.11+) or any ``class K(str)`` is accepted
wherever a key or name is, and what is stored, indexed and handed back is
the plain ``str`` of the same characters (never the subclass, and never its
``__str__``).
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path

import pytest

from logstate import InMemoryStorage, LocalFileStorage


class PlainSubclass(str):
    """A str subclass whose __str__ lies: the stored key must be the characters."""

    def __str__(self) -> str:
        return "not-the-key"


if sys.version_info >= (3, 11):

    class Color(enum.StrEnum):
        RED = "red"
        GREEN = "green"

    KEY_MAKERS = [PlainSubclass, Color]
else:  # pragma: no cover - StrEnum exists from 3.11
    KEY_MAKERS = [PlainSubclass]


def make(maker: object, text: str) -> str:
    """``text`` as an instance of ``maker`` (a StrEnum is looked up by value)."""
    assert callable(maker)
    key = maker(text)
    assert isinstance(key, str) and type(key) is not str
    return key


def exact(keys: object) -> bool:
    assert isinstance(keys, (list, dict))
    return all(type(k) is str for k in keys)


@pytest.mark.parametrize("maker", KEY_MAKERS)
def test_str_subclass_keys_are_stored_and_returned_as_exact_str(
    tmp_path: Path, maker: object
) -> None:
    red, green = make(maker, "red"), make(maker, "green")
    with LocalFileStorage(tmp_path) as storage:
        storage.set(red, 1)
        storage[green] = 2
        with storage.batch() as batch:
            batch.set(make(maker, "red"), 3)
            batch.set(make(maker, "blue") if maker is PlainSubclass else "blue", 4)
        assert storage.get(red) == 3 and storage[green] == 2
        assert storage.contains_key(red) and red in storage
        assert storage.get_encoded(red) is not None
        assert sorted(storage.get_all_keys()) == ["blue", "green", "red"]
        assert exact(storage.get_all_keys()) and exact(list(storage))
        assert all(type(k) is str for k in storage._engine.keydir.namespaces[""])
        with storage.batch() as batch:
            batch.remove(make(maker, "green"))
        assert green not in storage
        storage[green] = 5
        storage.remove(green)
        assert storage.get(green) is None
        storage[green] = 6
        del storage[green]
    # close wrote the index snapshot (marshal refuses a str subclass); reopen
    # from it, then from a scan of the records
    for use_snapshot in (True, False):
        with LocalFileStorage(tmp_path, use_snapshot=use_snapshot) as reopened:
            assert reopened.report.snapshot_used is use_snapshot
            assert dict(reopened.items()) == {"red": 3, "blue": 4}
            assert exact(reopened.get_all_keys())


@pytest.mark.parametrize("maker", KEY_MAKERS)
def test_str_subclass_sub_storage_names_are_stored_as_exact_str(
    tmp_path: Path, maker: object
) -> None:
    name = make(maker, "red")
    with LocalFileStorage(tmp_path) as storage:
        sub = storage.get_or_create_sub_storage(name)
        sub.set(make(maker, "green"), 1)
        assert sub.name == "red" and type(sub.name) is str
        assert storage.get_sub_storages() == ["red"] and exact(storage.get_sub_storages())
        nested = sub.get_or_create_sub_storage(make(maker, "green"))
        assert nested.name == "red/green" and type(nested.name) is str
        nested.close()
        sub.close()
        assert all(type(ns) is str for ns in storage._engine.keydir.namespaces)
    with LocalFileStorage(tmp_path) as reopened:
        assert reopened.get_sub_storages() == ["red"]
        with reopened.get_or_create_sub_storage("red") as sub:
            assert sub.get_all_keys() == ["green"] and exact(sub.get_all_keys())
        assert reopened.delete_sub_storage(name)


@pytest.mark.parametrize("maker", KEY_MAKERS)
def test_in_memory_storage_keeps_str_subclass_keys_as_exact_str(
    tmp_path: Path, maker: object
) -> None:
    red = make(maker, "red")
    plain = InMemoryStorage()
    plain.set(red, 1)
    assert plain.get_all_keys() == ["red"] and exact(plain.get_all_keys())
    with LocalFileStorage(tmp_path) as backing:
        memory = InMemoryStorage(backing)
        memory[red] = 1
        memory[make(maker, "green")] = 2
        assert exact(memory.get_all_keys()) and exact(list(memory))
        memory.remove(make(maker, "green"))
        assert memory.flush() == 2
        assert backing.get_all_keys() == ["red"] and exact(backing.get_all_keys())
    with LocalFileStorage(tmp_path) as reopened:
        assert dict(reopened.items()) == {"red": 1}
