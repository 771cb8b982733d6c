"""logstate.compat.quixstreams: the legacy Quix Streams state API on logstate.

The first part replays the legacy suite's scenarios (quixstreams 0.5.x,
``tests/.../state/test_localfilestorage.py`` and ``test_inmemorystorage.py``):
each test opens ``LocalFileStorage("./state-files")`` afresh in the working
directory and never closes it, as the legacy tests did. Where the legacy
behaviour was a defect (``True`` read back as ``1``, a ``bytearray`` as
``bytes``) the assertions demand the fixed behaviour: exact types.
The rest covers what the compat module adds: lower-cased keys and sub-storage
names in every method, StateValue/StateType, and InMemoryStorage.flush as a
commit callback.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import logstate
from logstate.compat.quix_import import import_quix_directory
from logstate.compat.quixstreams import (
    InMemoryStorage,
    LegacyStateDirectoryError,
    LocalFileStorage,
    StateType,
    StateValue,
)

Storage = LocalFileStorage | InMemoryStorage


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test runs in its own empty working directory (./state-files is relative)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def open_file_storage() -> Storage:
    """As the legacy tests did: a new handle on ./state-files, never closed."""
    return LocalFileStorage("./state-files")


def open_memory_storage() -> Storage:
    return InMemoryStorage()


def open_backed_memory_storage() -> Storage:
    return InMemoryStorage(LocalFileStorage("./state-files"))


STORAGE_KINDS: dict[str, Callable[[], Storage]] = {
    "file": open_file_storage,
    "memory": open_memory_storage,
    "memory-over-file": open_backed_memory_storage,
}


@pytest.fixture(params=sorted(STORAGE_KINDS))
def open_storage(request: pytest.FixtureRequest) -> Callable[[], Storage]:
    opener: Callable[[], Storage] = STORAGE_KINDS[request.param]
    return opener


def read_back(storage: Storage, key: str) -> Any:
    """The value of ``key`` as a fresh reader sees it.

    The file store: another handle on ./state-files, opened without closing
    the first. The in-memory store: its own value; with a backing storage, that
    value must also be what a file handle reads after a flush.
    """
    if isinstance(storage, InMemoryStorage):
        value = storage.get(key)
        if storage.backing_storage is not None:
            storage.flush()
            assert same_value(LocalFileStorage("./state-files").get(key), value)
        return value
    return LocalFileStorage("./state-files").get(key)


def persisted_keys(storage: Storage) -> list[str] | None:
    """The keys a fresh file handle sees (after a flush); None for a plain dict."""
    if isinstance(storage, InMemoryStorage):
        if storage.backing_storage is None:
            return None
        storage.flush()
    return sorted(LocalFileStorage("./state-files").get_all_keys())


def same_value(a: object, b: object) -> bool:
    """Equal and of the same exact type; floats compared bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


# ============================================================================ legacy scenarios


def test_float_values_round_trip_including_nan_and_infinities(
    open_storage: Callable[[], Storage],
) -> None:
    storage = open_storage()
    storage.clear()
    try:
        storage.set("Float_Pos", 12.51)
        storage.set("Float_Neg", -12.51)
        storage.set("Float_Nan", float("NaN"))
        storage.set("Float_Inf", float("Inf"))
        storage.set("Float_NegInf", -float("Inf"))

        assert same_value(read_back(storage, "Float_Pos"), 12.51)
        assert same_value(read_back(storage, "Float_Neg"), -12.51)
        assert math.isnan(read_back(storage, "Float_Nan"))
        assert same_value(read_back(storage, "Float_Inf"), math.inf)
        assert same_value(read_back(storage, "Float_NegInf"), -math.inf)
    finally:
        storage.clear()


def test_int_values_round_trip_beyond_the_legacy_int64_range(
    open_storage: Callable[[], Storage],
) -> None:
    storage = open_storage()
    storage.clear()
    try:
        storage.set("Int_Pos", 9875)
        storage.set("Int_Neg", -9875)
        storage.set("Int_Huge", 2**64 + 1)  # the legacy store could not hold it

        assert same_value(read_back(storage, "Int_Pos"), 9875)
        assert same_value(read_back(storage, "Int_Neg"), -9875)
        assert same_value(read_back(storage, "Int_Huge"), 2**64 + 1)
    finally:
        storage.clear()


def test_str_values_round_trip_including_the_empty_string(
    open_storage: Callable[[], Storage],
) -> None:
    storage = open_storage()
    storage.clear()
    try:
        storage.set("Str_NonEmpty", "test")
        storage.set("Str_Empty", "")

        assert same_value(read_back(storage, "Str_NonEmpty"), "test")
        assert same_value(read_back(storage, "Str_Empty"), "")
    finally:
        storage.clear()


def test_bool_values_come_back_as_bool_not_int(open_storage: Callable[[], Storage]) -> None:
    storage = open_storage()
    storage.clear()
    try:
        storage.set("Bool_True", True)
        storage.set("Bool_False", False)

        assert read_back(storage, "Bool_True") is True  # the legacy store returned 1
        assert read_back(storage, "Bool_False") is False  # and 0
    finally:
        storage.clear()


def test_bytes_and_bytearray_keep_their_type_including_empty(
    open_storage: Callable[[], Storage],
) -> None:
    storage = open_storage()
    storage.clear()
    try:
        storage.set("Bytes_NonEmpty", bytes("Test-val-1", "utf-8"))
        storage.set("ByteArray_NonEmpty", bytearray("Test-val-1", "utf-8"))
        storage.set("Bytes_Empty", b"")
        storage.set("ByteArray_Empty", bytearray())

        assert same_value(read_back(storage, "Bytes_NonEmpty"), b"Test-val-1")
        assert same_value(read_back(storage, "ByteArray_NonEmpty"), bytearray(b"Test-val-1"))
        assert same_value(read_back(storage, "Bytes_Empty"), b"")
        assert same_value(read_back(storage, "ByteArray_Empty"), bytearray())
    finally:
        storage.clear()


def test_none_round_trips_and_is_stored(open_storage: Callable[[], Storage]) -> None:
    storage = open_storage()
    storage.clear()
    try:
        storage.set("None", None)

        assert read_back(storage, "None") is None
        assert storage.contains_key("None")
    finally:
        storage.clear()


def test_dict_round_trips_through_pickle(open_storage: Callable[[], Storage]) -> None:
    storage = open_storage()
    storage.clear()
    try:
        dictionary = {"test": "me", "nested": {"flag": True}}
        storage.set("Object_Dict", dictionary)

        assert same_value(read_back(storage, "Object_Dict"), dictionary)
    finally:
        storage.clear()


def test_state_value_is_stored_as_the_value_it_wraps(open_storage: Callable[[], Storage]) -> None:
    storage = open_storage()
    storage.clear()
    try:
        val = StateValue(3.12)
        storage.set("StateValue", val)

        res = read_back(storage, "StateValue")
        assert res is not None
        assert same_value(res, val.value)
    finally:
        storage.clear()


def test_file_storage_get_all_keys_returns_the_keys_lower_cased() -> None:
    storage = LocalFileStorage("./state-files")
    storage.clear()

    storage.set("Key1", 12.51)
    storage.set("Key2", 12.51)

    keys = storage.get_all_keys()
    assert sorted(keys) == ["key1", "key2"]  # lower-cased, as by the legacy file store


def test_in_memory_storage_get_all_keys_keeps_the_case() -> None:
    storage = InMemoryStorage()
    storage.clear()

    storage.set("Key1", 12.51)
    storage.set("Key2", 12.51)

    assert sorted(storage.get_all_keys()) == ["Key1", "Key2"]


def test_clear_removes_every_key(open_storage: Callable[[], Storage]) -> None:
    storage = open_storage()
    storage.clear()

    storage.set("Key1", 12.51)
    storage.set("Key2", 12.51)
    assert len(storage.get_all_keys()) == 2

    storage.clear()

    assert storage.get_all_keys() == []
    assert persisted_keys(storage) in ([], None)


def test_remove_deletes_the_key_and_a_missing_key_is_no_error(
    open_storage: Callable[[], Storage],
) -> None:
    storage = open_storage()
    storage.clear()

    storage.set("Key_To_Remove", 12.51)
    storage.set("Key_To_Keep", 1)
    assert storage.contains_key("Key_To_Remove")
    assert persisted_keys(storage) in (["key_to_keep", "key_to_remove"], None)

    storage.remove("Key_To_Remove")

    assert not storage.contains_key("Key_To_Remove")
    assert storage.contains_key("Key_To_Keep")
    assert persisted_keys(storage) in (["key_to_keep"], None)
    storage.remove("Key_To_Remove")  # no error


def test_every_open_without_close_sees_the_same_state() -> None:
    first = LocalFileStorage("./state-files")
    first.set("Shared", 1)
    second = LocalFileStorage("./state-files")  # the first is still open
    assert second.get("shared") == 1
    second.set("shared", 2)
    third = LocalFileStorage()  # None is ./state: another directory
    assert first.get("Shared") == 2
    assert third.get("shared") is None
    assert Path("state-files").is_dir() and Path("state").is_dir()


def test_values_keep_their_exact_types_after_every_handle_is_closed_and_reopened() -> None:
    values: dict[str, object] = {
        "float": -0.0,
        "nan": math.nan,
        "int": -(2**70),
        "str": "",
        "true": True,
        "bytes": b"",
        "bytearray": bytearray(b"\x00"),
        "none": None,
        "dict": {"a": [1, 2]},
    }
    handles = [LocalFileStorage("./state-files") for _ in range(3)]
    for key, value in values.items():
        handles[0].set(key.upper(), StateValue(value))
    for handle in handles:
        handle.close()
    with LocalFileStorage("./state-files") as reopened:
        assert sorted(reopened.get_all_keys()) == sorted(values)
        for key, value in values.items():
            assert same_value(reopened.get(key.title()), value), key


# ============================================================================ key folding


def test_file_storage_lower_cases_the_key_in_every_key_taking_method() -> None:
    storage = LocalFileStorage("./state-files")
    assert storage.is_case_sensitive is False

    storage.set("MixedCase", 1)
    storage["OTHER"] = 2
    assert storage.get("mixedcase") == 1 and storage.get("MIXEDCASE") == 1
    assert storage["mIxEdCaSe"] == 1 and storage["other"] == 2
    assert storage.contains_key("MIXEDCASE") and storage.has_key("mixedCASE")
    assert "MixedCASE" in storage and "Other" in storage
    assert not storage.__contains__(42)
    assert sorted(storage.get_all_keys()) == ["mixedcase", "other"]
    assert sorted(storage) == ["mixedcase", "other"]

    assert storage.pop("OtHeR") == 2
    assert storage.setdefault("NEW", 3) == 3 and storage.get("new") == 3
    storage.update({"Upd": 4})
    assert storage.get("UPD") == 4

    del storage["MIXEDCASE"]
    assert not storage.contains_key("mixedcase")
    with pytest.raises(KeyError):
        del storage["MIXEDCASE"]
    with pytest.raises(KeyError):
        storage["MixedCase"]
    storage.remove("NEW")
    assert sorted(storage.get_all_keys()) == ["upd"]


def test_differently_cased_keys_are_one_key() -> None:
    storage = LocalFileStorage("./state-files")
    storage.set("Key", 1)
    storage.set("KEY", 2)
    storage.set("key", 3)
    assert storage.get_all_keys() == ["key"]
    assert len(storage) == 1 and storage["Key"] == 3


def test_keys_written_by_compat_are_lower_case_for_the_main_api() -> None:
    compat = LocalFileStorage("./state-files")
    compat.set("UserCount", 5)
    main = logstate.LocalFileStorage("./state-files")  # same directory, still open
    assert main.is_case_sensitive is True
    assert main.get("usercount") == 5
    assert main.get("UserCount") is None


def test_non_str_keys_are_rejected_as_by_the_core() -> None:
    storage = LocalFileStorage("./state-files")
    with pytest.raises(TypeError):
        storage.set(1, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        storage.get(b"k")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        storage.set("", "x")


def test_batch_of_a_compat_storage_lower_cases_keys_and_unwraps_state_values() -> None:
    storage = LocalFileStorage("./state-files")
    storage.set("gone", 0)
    with storage.batch() as batch:
        batch.set("A", StateValue(1))
        batch["B"] = 2
        batch.remove("GONE")
    assert sorted(storage.get_all_keys()) == ["a", "b"]
    assert storage.get("a") == 1 and storage.get("b") == 2


def test_sub_storage_names_are_lower_cased_and_sub_storages_are_compat_storages() -> None:
    storage = LocalFileStorage("./state-files")
    users = storage.get_or_create_sub_storage("Users")
    assert isinstance(users, LocalFileStorage)
    assert storage.get_sub_storages() == ["users"]
    users.set("Alice", {"visits": 3})
    again = LocalFileStorage("./state-files").get_or_create_sub_storage("USERS")
    assert again.get("ALICE") == {"visits": 3}
    assert again.get_all_keys() == ["alice"]
    nested = users.get_or_create_sub_storage("Sessions")
    nested.set("S1", 1)
    assert users.get_sub_storages() == ["sessions"]
    assert storage.delete_sub_storage("uSeRs") is True
    assert storage.get_sub_storages() == []
    assert storage.delete_sub_storage("Users") is False


def test_clear_of_the_file_storage_removes_sub_storages_too() -> None:
    storage = LocalFileStorage("./state-files")
    storage.get_or_create_sub_storage("Topic").set("k", 1)
    storage.set("root", 1)
    storage.clear()
    assert storage.get_all_keys() == [] and storage.get_sub_storages() == []


# ============================================================================ StateValue, StateType


@pytest.mark.parametrize(
    ("value", "state_type"),
    [
        (True, StateType.Bool),  # the legacy class said Long (int checked before bool)
        (False, StateType.Bool),
        (7, StateType.Long),
        (2**100, StateType.Long),
        (1.5, StateType.Double),
        ("s", StateType.String),
        (b"", StateType.Binary),
        (bytearray(b"x"), StateType.Binary),
        ({"a": 1}, StateType.Object),
        (None, StateType.Object),  # as in the legacy class: None went through pickle
    ],
)
def test_state_value_reports_the_legacy_type_of_its_value(
    value: object, state_type: StateType
) -> None:
    wrapped = StateValue(value)
    assert wrapped.type is state_type
    assert same_value(wrapped.value, value)
    assert wrapped.value is value  # kept as given: a bytearray is not turned into bytes


def test_state_value_of_a_state_value_copies_type_and_value() -> None:
    inner = StateValue(bytearray(b"ab"))
    outer = StateValue(inner)
    assert outer.type is StateType.Binary and outer.value is inner.value
    assert "Binary" in repr(outer)


def test_state_value_survives_pickling_inside_a_stored_object() -> None:
    storage = LocalFileStorage("./state-files")
    storage.set("list", [StateValue(1)])
    (restored,) = storage.get("list")
    assert isinstance(restored, StateValue) and restored.value == 1
    assert pickle.loads(pickle.dumps(StateValue("x"))).type is StateType.String


def test_state_type_numbers_and_file_codes_are_the_legacy_ones() -> None:
    assert {member.name: member.value for member in StateType} == {
        "Binary": 0,
        "Bool": 1,
        "Long": 2,
        "Double": 3,
        "String": 4,
        "Object": 5,
    }
    assert {member.file_code for member in StateType} == set("abldos")
    for member in StateType:
        assert StateType.from_file_code(member.file_code) is member
    with pytest.raises(ValueError, match="not a legacy state type code"):
        StateType.from_file_code("x")


def test_state_value_is_accepted_by_every_setter() -> None:
    storage = LocalFileStorage("./state-files")
    storage["Item"] = StateValue(True)
    assert storage.get("item") is True
    memory = InMemoryStorage()
    memory.set("A", StateValue(b"x"))
    memory["B"] = StateValue(2)
    assert memory.get("A") == b"x" and memory["B"] == 2


# ============================================================================ InMemoryStorage


class FakeConsumer:
    """Stands in for the legacy topic consumer: calls its callback with itself."""

    def __init__(self) -> None:
        self.on_committing: Callable[..., object] | None = None

    def commit(self) -> None:
        assert self.on_committing is not None
        self.on_committing(self)


def test_in_memory_flush_works_as_a_commit_callback_and_persists() -> None:
    backing = LocalFileStorage("./state-files")
    storage = InMemoryStorage(backing)
    consumer = FakeConsumer()
    consumer.on_committing = storage.flush
    storage["Counts"] = {"click": 1}
    storage["Counts"]["click"] += 1  # in-place mutation is persisted too

    consumer.commit()

    assert storage.pending_changes() == 0
    storage.flush("positional", keyword="ignored")  # any legacy call shape
    backing.close()
    with LocalFileStorage("./state-files") as reopened:
        assert reopened.get("counts") == {"click": 2}


def test_in_memory_over_a_compat_file_storage_folds_keys_at_once() -> None:
    storage = InMemoryStorage(LocalFileStorage("./state-files"))
    assert storage.is_case_sensitive is False
    storage.set("Key", 1)
    storage["KEY"] = 2
    assert storage.get_all_keys() == ["key"]
    assert storage["kEy"] == 2 and storage.get("KEY") == 2
    assert storage.contains_key("KEY") and storage.has_key("Key") and "KEY" in storage
    assert not storage.__contains__(3)
    storage.flush()
    assert LocalFileStorage("./state-files").get("key") == 2
    reloaded = InMemoryStorage(LocalFileStorage("./state-files"))
    assert reloaded["Key"] == 2  # same key after the "restart"
    del reloaded["KEY"]
    reloaded.remove("KEY")  # missing: no error
    with pytest.raises(KeyError):
        del reloaded["key"]
    assert reloaded.get_all_keys() == []


def test_in_memory_without_backing_is_case_sensitive() -> None:
    storage = InMemoryStorage()
    assert storage.is_case_sensitive is True
    storage.set("Key", 1)
    storage.set("key", 2)
    assert sorted(storage.get_all_keys()) == ["Key", "key"]
    assert storage.get("KEY") is None
    assert storage.flush() == 0


def test_in_memory_over_a_main_api_storage_keeps_the_case() -> None:
    backing = logstate.LocalFileStorage("./state-files")
    storage = InMemoryStorage(backing)
    assert storage.is_case_sensitive is True
    storage.set("Key", 1)
    storage.flush()
    assert backing.get("Key") == 1 and backing.get("key") is None


def test_in_memory_loads_the_backing_storage_on_construction() -> None:
    LocalFileStorage("./state-files").set("Loaded", [1])
    storage = InMemoryStorage(LocalFileStorage("./state-files"))
    assert storage.get("LOADED") == [1]
    assert dict(storage.items()) == {"loaded": [1]}


# ============================================================================ legacy directories


def legacy_long_file(value: int) -> bytes:
    """A legacy state file holding a long (see quix-legacy.md; tests/test_quix_import.py
    has the full writer)."""
    body = b"bl" + struct.pack("<q", value)
    return body + zlib.crc32(body).to_bytes(4, "big")


def test_opening_a_legacy_state_directory_refuses_and_creates_nothing() -> None:
    legacy = Path("state/clicks/stream-1/counts")
    legacy.mkdir(parents=True)
    (legacy / "home").write_bytes(legacy_long_file(41))

    with pytest.raises(LegacyStateDirectoryError, match="logstate import-quix") as info:
        LocalFileStorage()  # None is ./state, as in legacy code
    assert info.value.path == "./state"
    assert info.value.legacy_file == os.path.join("./state", "clicks/stream-1/counts/home")
    assert isinstance(info.value, logstate.LogstateError)
    assert pickle.loads(pickle.dumps(info.value)).legacy_file == info.value.legacy_file
    assert sorted(os.listdir("state")) == ["clicks"]  # no LOCK, no segment written there


def test_after_importing_in_place_the_unchanged_legacy_code_reads_its_state() -> None:
    legacy = Path("state/clicks/stream-1/counts")
    legacy.mkdir(parents=True)
    (legacy / "home").write_bytes(legacy_long_file(41))
    os.rename("state", "state-quix")
    with logstate.LocalFileStorage("state") as target:
        report = import_quix_directory("state-quix", target)
    assert report.keys_imported == 1 and report.complete

    storage = LocalFileStorage()  # the legacy code, with only its import changed
    counts = (
        storage.get_or_create_sub_storage("Clicks")
        .get_or_create_sub_storage("stream-1")
        .get_or_create_sub_storage("counts")
    )
    assert counts.get("HOME") == 41


def test_a_logstate_directory_with_a_stray_legacy_file_opens() -> None:
    LocalFileStorage("./state-files").set("k", 1)
    Path("state-files/stray").write_bytes(legacy_long_file(1))
    assert LocalFileStorage("./state-files").get("k") == 1


def test_a_directory_without_legacy_files_opens() -> None:
    Path("plain/sub").mkdir(parents=True)
    Path("plain/README").write_text("bla bla: begins with b but is no legacy file")
    Path("plain/sub/x.tmpf").write_bytes(legacy_long_file(1))  # a temp file is not state
    storage = LocalFileStorage("plain")
    storage.set("k", 1)
    assert storage.get("K") == 1
