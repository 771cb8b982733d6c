"""LocalFileStorage, the public API: values, keys, sub-storages, handles, options.

Every test works on a fresh directory under pytest's ``tmp_path``. Tests that
check "nothing was written" compare every file of the directory byte for byte
before and after the call.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logstate import (
    CorruptionError,
    KeyNotFoundError,
    LocalFileStorage,
    OptionConflictError,
    PickleNotAllowedError,
    StorageClosedError,
    SubStorageDeletedError,
    _registry,
    _writer,
)
from logstate._fs import FileSystem

# ============================================================================ helpers


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of ``directory`` (recursively) with its bytes, except the lock file."""
    files = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = Path(root, name)
            if name != "LOCK":
                files[str(path.relative_to(directory))] = path.read_bytes()
    return files


def segment_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.seg"))


def total_segment_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in segment_paths(directory))


def same_value(a: object, b: object) -> bool:
    """Equal and of the same exact type; floats compared bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


LOCK_PROBE = """
import sys
from logstate import LocalFileStorage, StorageLockedError
try:
    LocalFileStorage(sys.argv[1], sync="none").close()
except StorageLockedError as exc:
    print("locked", exc.pid)
    sys.exit(3)
print("opened")
"""


def other_process_can_open(directory: Path) -> bool:
    """True when a fresh process can take the directory's lock."""
    result = subprocess.run(
        [sys.executable, "-c", LOCK_PROBE, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 3), result.stderr
    return result.returncode == 0


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> Iterator[LocalFileStorage]:
    s = LocalFileStorage(store_dir, sync="none")
    yield s
    s.close()


class StrSubclass(str):
    """A str subclass must keep its class (it goes through pickle)."""


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: str


# ============================================================================ values

scalar_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(1 << 600), max_value=1 << 600),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324]),
    st.text(),
    st.text(alphabet=st.characters(codec=None, exclude_categories=())),  # lone surrogates too
    st.binary(),
    st.binary().map(bytearray),
)
pickled_values = st.one_of(
    st.lists(st.integers() | st.text(), max_size=5),
    st.tuples(st.integers(), st.text()),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=5),
    st.frozensets(st.integers(), max_size=5),
    st.builds(complex, st.integers(-100, 100), st.integers(-100, 100)),
    st.decimals(allow_nan=False),
    st.text().map(StrSubclass),
    st.builds(Point, st.integers(), st.text()),
)
keys = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.dictionaries(keys, scalar_values | pickled_values, min_size=1, max_size=8))
def test_every_value_type_round_trips_through_close_and_reopen(
    tmp_path: Path, items: dict[str, object]
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        with LocalFileStorage(directory, sync="none") as s:
            for key, value in items.items():
                s[key] = value
            for key, value in items.items():  # before reopen: read back from the log
                assert same_value(s[key], value), key
        with LocalFileStorage(directory, sync="none") as s:
            s._check()
            assert sorted(s) == sorted(items)
            for key, value in items.items():
                assert same_value(s[key], value), key


def test_bool_stays_bool_and_bytearray_stays_bytearray(store: LocalFileStorage) -> None:
    store["t"] = True
    store["one"] = 1
    store["ba"] = bytearray(b"xy")
    store["b"] = b"xy"
    assert store["t"] is True
    assert type(store["one"]) is int
    assert type(store["ba"]) is bytearray
    assert type(store["b"]) is bytes


# ============================================================================ mapping protocol


def test_missing_key_raises_key_not_found_error_which_is_a_key_error(
    store: LocalFileStorage,
) -> None:
    with pytest.raises(KeyNotFoundError) as info:
        store["nope"]
    assert isinstance(info.value, KeyError)
    assert info.value.key == "nope"
    with pytest.raises(KeyError):
        del store["nope"]


def test_mapping_protocol_set_get_del_in_len_iter(store: LocalFileStorage) -> None:
    store["a"] = 1
    store["b"] = "two"
    store.set("c", None)
    assert len(store) == 3
    assert "a" in store and "z" not in store
    not_a_str: object = 1
    assert not_a_str not in store  # a non-str is simply not a key of the mapping
    assert sorted(store) == ["a", "b", "c"]
    assert sorted(store.get_all_keys()) == ["a", "b", "c"]
    assert store.contains_key("c") and store["c"] is None
    del store["a"]
    assert "a" not in store and len(store) == 2
    assert dict(store.items()) == {"b": "two", "c": None}
    store["b"] = "replaced"
    assert store["b"] == "replaced" and len(store) == 2


def test_keys_are_case_sensitive(store: LocalFileStorage) -> None:
    assert store.is_case_sensitive is True
    store["Key"] = 1
    store["key"] = 2
    assert store["Key"] == 1 and store["key"] == 2


def test_get_returns_default_for_a_missing_key(store: LocalFileStorage) -> None:
    assert store.get("missing") is None
    assert store.get("missing", 42) == 42
    store["present"] = 0
    assert store.get("present", 42) == 0


def test_remove_of_a_missing_key_is_no_error_and_writes_nothing(
    store: LocalFileStorage, store_dir: Path
) -> None:
    store["a"] = 1
    before = snapshot(store_dir)
    store.remove("missing")
    assert snapshot(store_dir) == before
    store.remove("a")
    assert total_segment_size(store_dir) > sum(len(b) for b in before.values())
    assert "a" not in store


def test_remove_survives_reopen(store_dir: Path) -> None:
    with LocalFileStorage(store_dir, sync="none") as s:
        s["a"] = 1
        s["b"] = 2
        s.remove("a")
    with LocalFileStorage(store_dir, sync="none") as s:
        assert s.get_all_keys() == ["b"]


# ============================================================================ bad keys and values

BAD_KEYS: list[tuple[object, type[Exception]]] = [
    (1, TypeError),
    (b"bytes", TypeError),
    (None, TypeError),
    (("t",), TypeError),
    ("", ValueError),
    ("x" * 4097, ValueError),
    ("é" * 2049, ValueError),  # 4098 UTF-8 bytes
    ("a\ud800b", ValueError),  # lone surrogate: not encodable
]


@pytest.mark.parametrize(("key", "error"), BAD_KEYS, ids=lambda v: repr(v)[:20])
def test_bad_key_raises_and_leaves_the_store_unchanged(
    store: LocalFileStorage, store_dir: Path, key: Any, error: type[Exception]
) -> None:
    store["existing"] = 1
    before = snapshot(store_dir)
    with pytest.raises(error):
        store.set(key, "v")
    with pytest.raises(error):
        store[key] = "v"
    with pytest.raises(error):
        store.remove(key)
    with pytest.raises(error), store.batch() as b:
        b.set("fine", 1)
        b.set(key, "v")
    if not isinstance(key, str):
        with pytest.raises(TypeError):
            store.get(key)
        with pytest.raises(TypeError):
            store.contains_key(key)
    assert snapshot(store_dir) == before
    assert store.get_all_keys() == ["existing"]


def test_longest_allowed_key_is_accepted(store_dir: Path) -> None:
    key = "k" * 4096
    with LocalFileStorage(store_dir, sync="none") as s:
        s[key] = 1
    with LocalFileStorage(store_dir, sync="none") as s:
        assert s[key] == 1


def test_unpicklable_value_raises_type_error_and_leaves_the_store_unchanged(
    store: LocalFileStorage, store_dir: Path
) -> None:
    store["existing"] = 1
    before = snapshot(store_dir)
    with pytest.raises(TypeError):
        store["f"] = lambda: None
    with pytest.raises(TypeError):
        store.set("existing", lambda: None)
    assert snapshot(store_dir) == before
    assert store["existing"] == 1 and "f" not in store


def test_allow_pickle_false_refuses_to_write_a_pickled_value(store_dir: Path) -> None:
    with LocalFileStorage(store_dir, sync="none", allow_pickle=False) as s:
        s["plain"] = "ok"
        before = snapshot(store_dir)
        with pytest.raises(PickleNotAllowedError) as info:
            s["d"] = {"a": 1}
        assert isinstance(info.value, TypeError)
        assert snapshot(store_dir) == before
        assert "d" not in s


def test_allow_pickle_false_refuses_to_read_a_pickle_written_by_another_handle(
    store_dir: Path,
) -> None:
    writer = LocalFileStorage(store_dir, sync="none")
    writer["d"] = {"a": 1}
    writer["s"] = "text"
    reader = LocalFileStorage(store_dir, allow_pickle=False)
    with pytest.raises(PickleNotAllowedError):
        reader["d"]
    with pytest.raises(PickleNotAllowedError):
        reader.get("d")
    assert reader["s"] == "text"
    assert writer["d"] == {"a": 1}  # the other handle still may
    writer.close()
    reader.close()
    with (
        LocalFileStorage(store_dir, allow_pickle=False) as again,
        pytest.raises(PickleNotAllowedError),
    ):
        again["d"]


# ============================================================================ sub-storages


def test_sub_storages_create_get_list_and_keep_keys_apart(store: LocalFileStorage) -> None:
    store["k"] = "root"
    a = store.get_or_create_sub_storage("a")
    a["k"] = "in a"
    again = store.get_or_create_sub_storage("a")
    assert again["k"] == "in a"
    store.get_or_create_sub_storage("b")
    assert store.get_sub_storages() == ["a", "b"]
    assert store["k"] == "root" and len(store) == 1
    assert a.get_all_keys() == ["k"]
    assert a.name == "a" and store.name == ""


def test_nested_sub_storages_are_listed_per_level(store: LocalFileStorage) -> None:
    a = store.get_or_create_sub_storage("a")
    ab = a.get_or_create_sub_storage("b")
    ab["deep"] = 1
    assert store.get_sub_storages() == ["a"]
    assert a.get_sub_storages() == ["b"]
    assert ab.get_sub_storages() == []
    assert ab["deep"] == 1 and "deep" not in a


def test_delete_sub_storage_reports_whether_it_existed(store: LocalFileStorage) -> None:
    a = store.get_or_create_sub_storage("a")
    a["x"] = 1
    a.get_or_create_sub_storage("inner")["y"] = 2
    assert store.delete_sub_storage("a") is True
    assert store.delete_sub_storage("a") is False
    assert store.get_sub_storages() == []
    fresh = store.get_or_create_sub_storage("a")
    assert len(fresh) == 0 and fresh.get_sub_storages() == []


def test_delete_sub_storages_deletes_every_child_and_counts_them(
    store: LocalFileStorage,
) -> None:
    for name in ("a", "b", "c"):
        store.get_or_create_sub_storage(name)["v"] = name
    store["root"] = 1
    assert store.delete_sub_storages() == 3
    assert store.get_sub_storages() == []
    assert store.delete_sub_storages() == 0
    assert store["root"] == 1


def test_handle_on_a_deleted_sub_storage_raises(store: LocalFileStorage) -> None:
    a = store.get_or_create_sub_storage("a")
    a["x"] = 1
    store.delete_sub_storage("a")
    with pytest.raises(SubStorageDeletedError):
        a["x"] = 2
    with pytest.raises(SubStorageDeletedError):
        a.get("x")
    with pytest.raises(SubStorageDeletedError):
        len(a)


def test_clear_of_the_parent_removes_keys_and_sub_storages(store_dir: Path) -> None:
    with LocalFileStorage(store_dir, sync="none") as s:
        s["k"] = 1
        child = s.get_or_create_sub_storage("child")
        child["c"] = 2
        child.get_or_create_sub_storage("grandchild")["g"] = 3
        s.clear()
        assert len(s) == 0 and s.get_sub_storages() == []
        with pytest.raises(SubStorageDeletedError):
            child["c"]
    with LocalFileStorage(store_dir, sync="none") as s:
        assert len(s) == 0 and s.get_sub_storages() == []


def test_clear_of_a_sub_storage_leaves_the_parent_alone(store: LocalFileStorage) -> None:
    store["k"] = 1
    child = store.get_or_create_sub_storage("child")
    child["c"] = 2
    child.get_or_create_sub_storage("g")
    child.clear()
    assert len(child) == 0 and child.get_sub_storages() == []
    assert store["k"] == 1 and store.get_sub_storages() == ["child"]


def test_sub_storage_data_survives_reopen(store_dir: Path) -> None:
    with LocalFileStorage(store_dir, sync="none") as s:
        a = s.get_or_create_sub_storage("a")
        a["x"] = [1, 2]
        a.get_or_create_sub_storage("b")["y"] = b"yy"
        s.get_or_create_sub_storage("empty")
        s.get_or_create_sub_storage("gone")["z"] = 0
        s.delete_sub_storage("gone")
        a.close()
    with LocalFileStorage(store_dir, sync="none") as s:
        s._check()
        assert s.get_sub_storages() == ["a", "empty"]
        a = s.get_or_create_sub_storage("a")
        assert a["x"] == [1, 2]
        assert a.get_or_create_sub_storage("b")["y"] == b"yy"


BAD_NAMES: list[tuple[object, type[Exception]]] = [
    ("", ValueError),
    (".", ValueError),
    ("..", ValueError),
    ("a/b", ValueError),
    ("/abs", ValueError),
    ("..\\x", ValueError),
    ("a\\b", ValueError),
    ("a\0b", ValueError),
    ("n" * 300, ValueError),
    ("\ud800", ValueError),
    (None, TypeError),
    (3, TypeError),
    (b"bytes", TypeError),
]


@pytest.mark.parametrize(("name", "error"), BAD_NAMES, ids=lambda v: repr(v)[:20])
def test_sub_storage_name_attack_is_rejected_and_writes_nothing(
    store: LocalFileStorage, store_dir: Path, name: Any, error: type[Exception]
) -> None:
    store.get_or_create_sub_storage("legit")
    before = snapshot(store_dir)
    entries_before = sorted(os.listdir(store_dir))
    parent_entries = sorted(os.listdir(store_dir.parent))
    with pytest.raises(error):
        store.get_or_create_sub_storage(name)
    with pytest.raises(error):
        store.delete_sub_storage(name)
    assert snapshot(store_dir) == before
    assert sorted(os.listdir(store_dir)) == entries_before
    assert sorted(os.listdir(store_dir.parent)) == parent_entries
    assert store.get_sub_storages() == ["legit"]


def test_unusual_but_legal_sub_storage_names_work(store_dir: Path) -> None:
    names = ["...", " ", "ü-名前", "a.b", "n" * 255]
    with LocalFileStorage(store_dir, sync="none") as s:
        for name in names:
            s.get_or_create_sub_storage(name)[name] = name
    with LocalFileStorage(store_dir, sync="none") as s:
        assert s.get_sub_storages() == sorted(names)
        for name in names:
            assert s.get_or_create_sub_storage(name)[name] == name


# ============================================================================ handles and lifecycle

CLOSED_CALLS: list[tuple[str, Callable[[LocalFileStorage], object]]] = [
    ("set", lambda s: s.set("k", 1)),
    ("get", lambda s: s.get("k")),
    ("remove", lambda s: s.remove("k")),
    ("contains_key", lambda s: s.contains_key("k")),
    ("get_all_keys", lambda s: s.get_all_keys()),
    ("clear", lambda s: s.clear()),
    ("getitem", lambda s: s["k"]),
    ("setitem", lambda s: s.__setitem__("k", 1)),
    ("delitem", lambda s: s.__delitem__("k")),
    ("contains", lambda s: "k" in s),
    ("len", lambda s: len(s)),
    ("iter", lambda s: list(s)),
    ("batch", lambda s: s.batch()),
    ("get_or_create_sub_storage", lambda s: s.get_or_create_sub_storage("x")),
    ("delete_sub_storage", lambda s: s.delete_sub_storage("x")),
    ("delete_sub_storages", lambda s: s.delete_sub_storages()),
    ("get_sub_storages", lambda s: s.get_sub_storages()),
    ("flush", lambda s: s.flush()),
    ("enter", lambda s: s.__enter__()),
]


@pytest.mark.parametrize(("name", "call"), CLOSED_CALLS, ids=[n for n, _ in CLOSED_CALLS])
def test_every_method_of_a_closed_handle_raises_storage_closed_error(
    store_dir: Path, name: str, call: Callable[[LocalFileStorage], object]
) -> None:
    s = LocalFileStorage(store_dir, sync="none")
    s["k"] = 1
    s.close()
    assert s.closed
    with pytest.raises(StorageClosedError):
        call(s)


@pytest.mark.parametrize(("name", "call"), CLOSED_CALLS, ids=[n for n, _ in CLOSED_CALLS])
def test_closed_handle_raises_even_while_another_handle_keeps_the_directory_open(
    store_dir: Path, name: str, call: Callable[[LocalFileStorage], object]
) -> None:
    keeper = LocalFileStorage(store_dir, sync="none")
    s = LocalFileStorage(store_dir)
    s.close()
    with pytest.raises(StorageClosedError):
        call(s)
    keeper["still"] = "works"
    keeper.close()


def test_close_twice_is_allowed(store_dir: Path) -> None:
    s = LocalFileStorage(store_dir, sync="none")
    s.close()
    s.close()
    assert s.closed


def test_context_manager_closes_the_handle(store_dir: Path) -> None:
    with LocalFileStorage(store_dir, sync="none") as s:
        s["a"] = 1
    assert s.closed
    with pytest.raises(StorageClosedError):
        s["a"]
    with LocalFileStorage(store_dir, sync="none") as s:
        assert s["a"] == 1


def test_same_directory_opened_twice_shares_one_engine(store_dir: Path) -> None:
    a = LocalFileStorage(store_dir, sync="none")
    b = LocalFileStorage(store_dir)
    assert a._engine is b._engine
    a["x"] = 1
    assert b["x"] == 1
    b["y"] = 2
    assert a["y"] == 2
    a.close()
    assert b["x"] == 1  # the other handle is unaffected
    b["z"] = 3
    b.close()


def test_a_relative_and_an_absolute_path_share_one_engine(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_dir.mkdir()
    monkeypatch.chdir(store_dir.parent)
    a = LocalFileStorage(store_dir, sync="none")
    b = LocalFileStorage(store_dir.name)
    assert a._engine is b._engine
    a.close()
    b.close()


def test_a_symlink_to_an_open_directory_shares_its_engine(store_dir: Path) -> None:
    store_dir.mkdir()
    link = store_dir.parent / "link"
    link.symlink_to(store_dir)
    a = LocalFileStorage(store_dir, sync="none")
    b = LocalFileStorage(link)
    assert a._engine is b._engine and b.path == os.path.realpath(store_dir)
    a.close()
    b.close()


def test_a_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"not a directory")
    with pytest.raises(NotADirectoryError):
        LocalFileStorage(path)
    assert path.read_bytes() == b"not a directory"


def test_directory_is_released_only_when_the_last_handle_is_closed(store_dir: Path) -> None:
    a = LocalFileStorage(store_dir, sync="none")
    b = LocalFileStorage(store_dir)
    sub = b.get_or_create_sub_storage("s")
    a.close()
    b.close()
    assert not other_process_can_open(store_dir)  # the sub-storage handle holds it
    sub["still"] = "open"
    sub.close()
    assert other_process_can_open(store_dir)


def test_directory_is_released_when_the_last_handle_is_garbage_collected(
    store_dir: Path,
) -> None:
    a = LocalFileStorage(store_dir, sync="none")
    b = LocalFileStorage(store_dir)
    a["k"] = "v"
    del a
    gc.collect()
    assert not other_process_can_open(store_dir)
    assert b["k"] == "v"
    del b
    gc.collect()
    assert other_process_can_open(store_dir)
    with LocalFileStorage(store_dir) as again:
        assert again["k"] == "v"


def test_conflicting_explicit_option_raises_option_conflict_error(store_dir: Path) -> None:
    first = LocalFileStorage(store_dir, sync="none", segment_size=8192)
    with pytest.raises(OptionConflictError) as info:
        LocalFileStorage(store_dir, sync="always")
    assert isinstance(info.value, ValueError)
    assert "sync" in str(info.value)
    with pytest.raises(OptionConflictError):
        LocalFileStorage(store_dir, segment_size=4096)
    omitted = LocalFileStorage(store_dir)  # options left out take the open engine's
    same = LocalFileStorage(store_dir, sync="none", segment_size=8192)
    assert omitted._engine is first._engine is same._engine
    assert omitted._engine.options.sync == "none"
    first.close()
    omitted.close()
    same.close()
    assert other_process_can_open(store_dir)  # the refused opens took no reference


def test_bad_option_is_rejected_and_opens_nothing(store_dir: Path) -> None:
    with pytest.raises(ValueError):
        LocalFileStorage(store_dir, sync="sometimes")
    with pytest.raises(ValueError):
        LocalFileStorage(store_dir, segment_size=10)
    with pytest.raises(TypeError):
        LocalFileStorage(store_dir, allow_pickle="no")  # type: ignore[arg-type]
    with LocalFileStorage(store_dir, sync="always") as s:  # nothing was left open
        s["k"] = 1


BAD_OPTIONS: list[tuple[str, object, type[Exception]]] = [
    # one rule for every option: a wrong type is a TypeError, a wrong value of
    # the right type a ValueError (bool is not taken for a number)
    ("sync", 1, TypeError),
    ("sync", "sometimes", ValueError),
    ("recovery", b"strict", TypeError),
    ("recovery", "lenient", ValueError),
    ("sync_interval", "1", TypeError),
    ("sync_interval", True, TypeError),
    ("sync_interval", 0, ValueError),
    ("segment_size", 8192.0, TypeError),
    ("segment_size", True, TypeError),
    ("segment_size", 10, ValueError),
    ("compress_min_size", 1.0, TypeError),
    ("compress_min_size", -1, ValueError),
    ("zstd_level", 3.0, TypeError),
    ("zstd_level", 23, ValueError),
    ("compact_ratio", "0.5", TypeError),
    ("compact_ratio", True, TypeError),
    ("compact_ratio", 1.0, ValueError),
    ("compact_min_size", 1.0, TypeError),
    ("compact_min_size", -1, ValueError),
    ("auto_compact", 1, TypeError),
    ("read_only", "no", TypeError),
    ("use_snapshot", 0, TypeError),
    ("copy_torn_tails", "yes", TypeError),
    ("allow_pickle", "no", TypeError),
    ("auto_create_dir", 1, TypeError),
]


@pytest.mark.parametrize(
    ("name", "value", "error"), BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v, _ in BAD_OPTIONS]
)
def test_a_bad_option_raises_type_error_for_its_type_value_error_for_its_value(
    store_dir: Path, name: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        LocalFileStorage(store_dir, **{name: value})  # type: ignore[arg-type]
    other = ValueError if error is TypeError else TypeError
    assert not isinstance(info.value, other), f"{name}={value!r}: {info.value!r}"
    assert name in str(info.value)  # the message names the option
    assert not store_dir.exists() or not list(store_dir.iterdir())  # nothing opened
    with LocalFileStorage(store_dir, sync="always") as s:  # nothing was left open
        s["k"] = 1


def test_failed_open_releases_the_lock_so_a_salvage_retry_works(store_dir: Path) -> None:
    with LocalFileStorage(store_dir, sync="none") as s:
        for i in range(5):
            s[f"k{i}"] = f"value {i}"
    segment = segment_paths(store_dir)[0]
    data = bytearray(segment.read_bytes())
    data[40] ^= 0x01  # inside the first record; valid records follow
    segment.write_bytes(bytes(data))
    with pytest.raises(CorruptionError):
        LocalFileStorage(store_dir, sync="none")
    assert not any(e.path == os.path.realpath(store_dir) for e in _registry.open_engines())
    with LocalFileStorage(store_dir, sync="none", recovery="salvage") as s:
        s._check()
        assert sorted(s) == [f"k{i}" for i in range(1, 5)]


def test_missing_directory_with_auto_create_dir_false_raises_file_not_found(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError):
        LocalFileStorage(missing, auto_create_dir=False)
    assert not missing.exists()


def test_existing_directory_opens_with_auto_create_dir_false(store_dir: Path) -> None:
    store_dir.mkdir()
    with LocalFileStorage(store_dir, auto_create_dir=False, sync="none") as s:
        s["k"] = 1


def test_storage_directory_none_means_state_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with LocalFileStorage(sync="none") as s:
        s["k"] = 1
        assert s.path == os.path.realpath(tmp_path / "state")
    assert segment_paths(tmp_path / "state")
    with LocalFileStorage(str(tmp_path / "state")) as s:
        assert s["k"] == 1


def test_directories_are_created_0700_and_files_0600(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        directory = tmp_path / "parent" / "store"
        with LocalFileStorage(directory, sync="none", segment_size=4096) as s:
            for i in range(40):
                s[f"k{i}"] = "x" * 200
            s.get_or_create_sub_storage("sub")["y"] = 1
    finally:
        os.umask(old_umask)
    for d in (directory, directory.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = list(directory.iterdir())
    assert len(segment_paths(directory)) > 1
    assert any(f.name == "LOCK" for f in files)
    for f in files:
        assert f.is_file()
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


# ============================================================================ batches


def test_batch_commits_all_operations_together(store_dir: Path) -> None:
    with LocalFileStorage(store_dir, sync="none") as s:
        s["gone"] = 1
        with s.batch() as b:
            b.set("a", 1)
            b["b"] = [2]
            b.remove("gone")
            assert len(b) == 3
        assert s["a"] == 1 and s["b"] == [2] and "gone" not in s
    with LocalFileStorage(store_dir, sync="none") as s:
        s._check()
        assert sorted(s) == ["a", "b"]


def test_batch_rolled_back_by_an_exception_writes_nothing(
    store: LocalFileStorage, store_dir: Path
) -> None:
    store["keep"] = 1
    before = snapshot(store_dir)
    with pytest.raises(RuntimeError), store.batch() as b:
        b.set("a", 1)
        b.remove("keep")
        b.clear()
        raise RuntimeError("abort")
    assert snapshot(store_dir) == before
    assert store.get_all_keys() == ["keep"]


def test_reads_inside_a_batch_see_the_state_before_it(store: LocalFileStorage) -> None:
    store["a"] = "old"
    with store.batch() as b:
        b.set("a", "new")
        b.set("fresh", 1)
        b.remove("a")
        b.set("a", "newest")
        assert store["a"] == "old"
        assert "fresh" not in store
    assert store["a"] == "newest" and store["fresh"] == 1


def test_batch_with_clear_applies_operations_in_order(store: LocalFileStorage) -> None:
    store["x"] = 1
    store.get_or_create_sub_storage("sub")
    with store.batch() as b:
        b.set("before", 1)
        b.clear()
        b.set("after", 2)
    assert store.get_all_keys() == ["after"]
    assert store.get_sub_storages() == []


def test_batch_cannot_be_committed_twice(store: LocalFileStorage) -> None:
    b = store.batch()
    b.set("a", 1)
    assert b.commit() == 1
    with pytest.raises(RuntimeError):
        b.commit()
    with pytest.raises(RuntimeError):
        b.set("b", 2)


# ============================================================================ flush


class CountingFS(FileSystem):
    """Counts fdatasync calls per file descriptor (every call is real)."""

    def __init__(self) -> None:
        self.fdatasyncs = 0

    def fdatasync(self, fd: int) -> None:
        self.fdatasyncs += 1
        super().fdatasync(fd)


@pytest.mark.parametrize("sync", ["none", "interval", "always"])
def test_flush_syncs_and_data_survives_in_every_sync_mode(store_dir: Path, sync: str) -> None:
    fs = CountingFS()
    engine = _registry.acquire_engine(
        str(store_dir), {"sync": sync, "sync_interval": 60.0}, create=True, fs=fs
    )
    s = LocalFileStorage(store_dir)
    _registry.release_engine(engine)  # the handle now holds the only reference
    assert s._engine is engine
    s["k"] = "v"
    before = fs.fdatasyncs
    s.flush()
    assert fs.fdatasyncs == before + (0 if sync == "always" else 1)
    s.flush()  # nothing new: no second sync is needed, and none is an error
    s.close()
    with LocalFileStorage(store_dir) as again:
        assert again["k"] == "v"


def test_interval_mode_syncs_in_the_background_soon_after_a_write(store_dir: Path) -> None:
    fs = CountingFS()
    engine = _registry.acquire_engine(
        str(store_dir), {"sync": "interval", "sync_interval": 0.02}, create=True, fs=fs
    )
    s = LocalFileStorage(store_dir)
    _registry.release_engine(engine)
    time.sleep(0.1)
    idle = fs.fdatasyncs
    time.sleep(0.1)
    assert fs.fdatasyncs == idle, "no sync without a write"
    s["k"] = 1
    deadline = time.monotonic() + 10
    while fs.fdatasyncs == idle and time.monotonic() < deadline:
        time.sleep(0.005)
    assert fs.fdatasyncs == idle + 1
    assert engine.syncer is not None
    thread = engine.syncer.worker
    assert thread.is_alive()
    s.close()
    assert not thread.is_alive(), "close stops the sync thread"


def test_a_set_over_the_record_size_limit_is_refused_and_changes_nothing(
    store: LocalFileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:

    store.set("kept", b"v")
    segment_bytes = store._engine.stats()["total_bytes"]
    # the limit counts the whole body: namespace, key and value
    monkeypatch.setattr(_writer, "_MAX_BODY_SIZE", 2 + 2 + len("big") + 1 + 9)
    store.set("big", b"x" * 9)  # exactly at the limit
    with pytest.raises(ValueError, match="MAX_RECORD_SIZE"):
        store.set("big", b"x" * 10)
    assert store.get("big") == b"x" * 9
    assert store._engine.stats()["total_bytes"] > segment_bytes
    store.set("after", 1)  # still writable
    store._check()


def test_a_handle_cannot_be_copied_or_pickled_and_stays_usable(tmp_path: Path) -> None:
    import copy
    import pickle

    with LocalFileStorage(tmp_path) as store:
        store.set("k", 1)
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot be copied or pickled"):
                attempt(store)
        assert store.get("k") == 1


def test_a_set_with_a_missing_argument_names_the_method_as_called(tmp_path: Path) -> None:
    store = LocalFileStorage(tmp_path)
    with pytest.raises(TypeError, match=r"^LocalFileStorage\.set\(\) missing 1 required"):
        store.set("k")  # type: ignore[call-arg]
    store.close()
