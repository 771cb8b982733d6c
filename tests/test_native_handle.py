"""LocalFileStorage.set on the C path: ``HandleBase.set`` and the reference it copies.

``HandleBase.set`` (csrc/fast.c) is a copy of the common case of
``LocalFileStorage._set_python``: an open handle, an exact ``str`` key of
ASCII characters, an exact ``bytes`` value, no ``ttl``. It writes the record
from the key's characters and the value's bytes (no key bytes, no encoded
value made). Every other call runs ``_set_python``. These tests hold the two
equal: the same records, the same index, the same errors; which calls the C
copy takes (counted: ``_set_python`` is wrapped); and the docstring, which
the C method carries as a copy of the Python one.

    python -m pytest tests/test_native_handle.py -q
"""

from __future__ import annotations

import enum
import inspect
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logstate import LocalFileStorage, StorageClosedError
from logstate._format import MAX_KEY_SIZE
from logstate._keydir import as_index
from tests.native_required import native_extension


class Color(str, enum.Enum):
    RED = "red"


class Raw(bytes):
    pass


# keys the C copy takes (ASCII, 1..MAX_KEY_SIZE) and keys it hands on
KEYS = st.one_of(
    st.text(alphabet=st.characters(max_codepoint=127), min_size=0, max_size=20),
    st.sampled_from(["a", "ключ", "鍵", "🙂", "a/b", "x" * MAX_KEY_SIZE, "y" * (MAX_KEY_SIZE + 1)]),
    st.text(max_size=8),
)
VALUES = st.one_of(
    st.binary(max_size=200),
    st.integers(),
    st.text(max_size=20),
    st.none(),
    st.builds(bytearray, st.binary(max_size=20)),
    st.builds(Raw, st.binary(max_size=20)),
)
TTLS = st.sampled_from([(), (None,), "kw-none", (5.0,), (-1.0,), ("x",)])
CALLS = st.lists(st.tuples(st.sampled_from(["", "sub"]), KEYS, VALUES, TTLS), max_size=30)


def call(set_: Callable[..., None], key: str, value: object, ttl: object) -> str:
    """One set; what it raised ("" when nothing), as type and message."""
    try:
        if ttl == "kw-none":
            set_(key, value, ttl=None)
        else:
            assert isinstance(ttl, tuple)
            set_(key, value, *ttl)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def files(path: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "LOCK"}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """The calls that reached ``LocalFileStorage._set_python``."""
    native_extension()
    seen: list[tuple[object, ...]] = []
    reference = LocalFileStorage._set_python

    def wrapped(self: LocalFileStorage, *args: Any, **kwargs: Any) -> None:
        seen.append(args + tuple(kwargs.items()))
        reference(self, *args, **kwargs)

    monkeypatch.setattr(LocalFileStorage, "_set_python", wrapped)
    return seen


def test_the_c_set_is_the_handles_set_and_carries_the_reference_docstring() -> None:
    native_extension()
    assert type(LocalFileStorage.set).__name__ == "method_descriptor"
    assert LocalFileStorage.set.__doc__ == inspect.getdoc(LocalFileStorage._set_python)
    params = list(inspect.signature(LocalFileStorage.set).parameters)
    assert params == list(inspect.signature(LocalFileStorage._set_python).parameters)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=CALLS)
def test_the_c_set_and_the_reference_write_the_same_bytes_and_raise_the_same(
    tmp_path_factory: pytest.TempPathFactory, calls: list[tuple[str, str, object, object]]
) -> None:
    native_extension()
    base = tmp_path_factory.mktemp("set")
    dirs = base / "c", base / "python"
    outcomes = []
    for directory, via_c in zip(dirs, (True, False), strict=True):
        store = LocalFileStorage(directory, sync="none", auto_compact=False, clock=lambda: 1e9)
        sub = store.get_or_create_sub_storage("sub")
        raised = []
        for where, key, value, ttl in calls:
            target = store if where == "" else sub
            raised.append(call(target.set if via_c else target._set_python, key, value, ttl))
        values = {k: store.get(k) for k in store} | {f"sub:{k}": sub.get(k) for k in sub}
        store.close()
        outcomes.append((raised, values, files(directory)))
    assert outcomes[0] == outcomes[1]


def test_the_common_case_never_runs_the_python_set(
    tmp_path: pathlib.Path, counted: list[tuple[object, ...]]
) -> None:
    with LocalFileStorage(tmp_path, sync="none") as store:
        sub = store.get_or_create_sub_storage("sub")
        store.set("a", b"1")
        store.set("b" * MAX_KEY_SIZE, b"")
        store.set("c", b"3", None)
        sub.set("a", b"4")
        store["d"] = b"5"
        assert counted == []
        assert [store.get("a"), store.get("c"), sub.get("a"), store["d"]] == [
            b"1",
            b"3",
            b"4",
            b"5",
        ]
        assert store.get("b" * MAX_KEY_SIZE) == b""


@pytest.mark.parametrize(
    ("key", "value", "ttl"),
    [
        ("ключ", b"v", ()),  # not ASCII
        (Color.RED, b"v", ()),  # a str subclass: stored as its plain str
        ("k", 7, ()),  # not bytes
        ("k", bytearray(b"v"), ()),
        ("k", Raw(b"v"), ()),  # a bytes subclass
        ("k", b"v", (5.0,)),  # a ttl
        ("k", b"v", "kw-none"),  # a keyword
    ],
)
def test_every_other_call_runs_the_python_set(
    tmp_path: pathlib.Path, counted: list[tuple[object, ...]], key: str, value: object, ttl: object
) -> None:
    with LocalFileStorage(tmp_path, sync="none", clock=lambda: 1e9) as store:
        assert call(store.set, key, value, ttl) == ""
        assert len(counted) == 1
        got = store.get(str(key.value) if isinstance(key, Color) else key)
        assert got == value and type(got) is type(value)  # (a bytes subclass: pickled)


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("", "ValueError: key must not be empty"),
        ("z" * (MAX_KEY_SIZE + 1), "ValueError: key is 4097 bytes in UTF-8; the limit is 4096"),
        (b"k", "TypeError: key must be a str, got bytes"),
    ],
)
def test_bad_keys_are_refused_by_the_python_set_with_its_message(
    tmp_path: pathlib.Path, counted: list[tuple[object, ...]], key: Any, error: str
) -> None:
    with LocalFileStorage(tmp_path, sync="none") as store:
        store.set("kept", b"v")
        assert call(store.set, key, b"v", ()).startswith(error)
        assert len(counted) == 1 and list(store.keys()) == ["kept"]


def test_a_closed_handle_raises_from_the_python_set(
    tmp_path: pathlib.Path, counted: list[tuple[object, ...]]
) -> None:
    store = LocalFileStorage(tmp_path, sync="none")
    other = LocalFileStorage(tmp_path, sync="none")  # the engine stays open
    store.close()
    with pytest.raises(StorageClosedError):
        store.set("a", b"v")
    assert len(counted) == 1
    other.set("a", b"w")
    assert other.get("a") == b"w"
    other.close()


def test_a_handle_made_with_fast_paths_off_runs_the_python_set(
    tmp_path: pathlib.Path, counted: list[tuple[object, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from logstate import _handle

    monkeypatch.setattr(_handle, "FAST_PATHS", False)
    with LocalFileStorage(tmp_path, sync="none") as store:
        assert store._writer is None
        store.set("a", b"v")
        assert len(counted) == 1 and store.get("a") == b"v"


MANY_KEYS = [f"key-{i:06d}" for i in range(2000)]


def test_sets_through_the_c_copy_survive_a_reopen_with_the_reference_bytes(
    tmp_path: pathlib.Path,
) -> None:
    native_extension()
    for name, via_c in (("c", True), ("python", False)):
        with LocalFileStorage(tmp_path / name, sync="none", auto_compact=False) as store:
            set_ = store.set if via_c else store._set_python
            for i, key in enumerate(MANY_KEYS):
                set_(key, bytes([i % 256]) * (i % 300))
    assert files(tmp_path / "c") == files(tmp_path / "python")
    with LocalFileStorage(tmp_path / "c", read_only=True) as store:
        assert len(store) == len(MANY_KEYS)
        assert store.get(MANY_KEYS[-1]) == bytes([1999 % 256]) * (1999 % 300)


class Rebinding(dict[str, object]):
    """A namespace index that is not a dict (the C set then looks up by the
    mapping calls, which run this): on one key it rebinds the handle's
    ``_ns_bytes`` to an equal new object, so the old one is freed unless the
    set holds it (counted: ``refs``)."""

    def __init__(self, items: dict[str, object], handle: LocalFileStorage) -> None:
        super().__init__(items)
        self.handle = handle

    def __getitem__(self, key: str) -> object:
        if key == "rebind":
            # held by the handle's slot, the argument here, and the set itself
            self.refs = sys.getrefcount(self.handle._ns_bytes)
            size = len(self.handle._ns_bytes)
            self.handle._ns_bytes = bytes(bytearray(self.handle._ns_bytes))
            self.junk = [b"A" * size for _ in range(1000)]  # takes the freed memory
        return dict.__getitem__(self, key)


def test_a_handle_whose_fields_are_rebound_during_its_set_writes_the_set_it_was_given(
    tmp_path: pathlib.Path,
) -> None:
    native_extension()
    with LocalFileStorage(tmp_path, sync="none", auto_compact=False) as store:
        sub = store
        for _ in range(3):  # a namespace of 752 bytes: freed to (and reused from) malloc
            sub = sub.get_or_create_sub_storage("q" * 250)
        sub._ns_bytes = bytes(bytearray(sub._ns_bytes))  # only the handle holds it
        namespaces = store._engine.keydir.namespaces
        index = namespaces[sub._ns]
        namespaces[sub._ns] = Rebinding(dict(index.items()), sub)  # type: ignore[assignment]
        sub.set("rebind", b"value")
        assert namespaces[sub._ns].refs == 3  # type: ignore[union-attr]
        namespaces[sub._ns] = as_index(dict(namespaces[sub._ns].items()))
    with LocalFileStorage(tmp_path, read_only=True) as store:
        sub = store
        for _ in range(3):
            sub = sub.get_or_create_sub_storage("q" * 250)
        assert dict(sub.items()) == {"rebind": b"value"}


class Stop(BaseException):
    pass


class Raising(dict[str, object]):
    """A namespace index whose look-up raises (an interrupt landing in it)."""

    def __getitem__(self, key: str) -> object:
        raise Stop


def test_an_exception_from_the_index_look_up_is_raised_not_swallowed(
    tmp_path: pathlib.Path,
) -> None:
    native_extension()
    for name, via_c in (("c", True), ("python", False)):
        with LocalFileStorage(tmp_path / name, sync="none", auto_compact=False) as store:
            store.set("kept", b"v")
            namespaces = store._engine.keydir.namespaces
            index = namespaces[""]
            namespaces[""] = Raising(index)  # type: ignore[assignment]
            with pytest.raises(Stop):
                (store.set if via_c else store._set_python)("k", b"v")
            namespaces[""] = index
            assert store._engine.appender.seq == 1 and list(store) == ["kept"]
    assert files(tmp_path / "c") == files(tmp_path / "python")
