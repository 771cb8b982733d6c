"""Ordered views: ``keys/items/values(start, stop, prefix, reverse)`` against ``sorted()``.

The model is a dict: every view must list exactly what sorting the dict's
keys (by code point, which is UTF-8 byte order) and slicing gives, after any
sequence of sets, deletes, clears, batches, flushes, compactions and
reopens; the index's sorted views are checked with ``_check`` at each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logstate import InMemoryStorage, LocalFileStorage, bytes_to_key, key_to_bytes

KEYS = st.text(alphabet="ab\u00e9\u4e2d\U0001f600\x00", min_size=1, max_size=4)


def expected(
    model: dict[str, Any], start: str | None, stop: str | None, prefix: str | None
) -> list[str]:
    return [
        k
        for k in sorted(model)
        if (start is None or k >= start)
        and (stop is None or k < stop)
        and (prefix is None or k.startswith(prefix))
    ]


def check_views(s: LocalFileStorage, model: dict[str, Any], bounds: list[str | None]) -> None:
    start, stop, prefix = bounds
    want = expected(model, start, stop, prefix)
    assert list(s.keys(start, stop, prefix)) == want
    assert list(s.keys(start, stop, prefix, reverse=True)) == want[::-1]
    assert list(reversed(s.keys(start, stop, prefix))) == want[::-1]
    assert list(s.items(start, stop, prefix)) == [(k, model[k]) for k in want]
    assert list(s.values(start, stop, prefix, reverse=True)) == [model[k] for k in want[::-1]]
    assert len(s.keys(start, stop, prefix)) == len(want)
    for k in model:
        assert (k in s.keys(start, stop, prefix)) == (k in want)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, st.integers(0, 9)),
        st.tuples(st.just("delete"), KEYS, st.none()),
        st.tuples(st.just("batch"), st.lists(KEYS, max_size=4), st.integers(0, 9)),
        st.tuples(st.just("view"), st.lists(st.none() | KEYS, min_size=3, max_size=3), st.none()),
        st.tuples(st.just("clear"), st.none(), st.none()),
        st.tuples(st.just("compact"), st.none(), st.none()),
        st.tuples(st.just("reopen"), st.none(), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=ops)
def test_views_equal_sorted_model_through_every_change(tmp_path: Path, steps: list[Any]) -> None:
    directory = tmp_path / f"s{abs(hash(str(steps)))}"
    s = LocalFileStorage(directory, sync="none", auto_compact=False)
    sub = s.get_or_create_sub_storage("sub")
    sub["only in sub"] = 1  # a sub-storage's keys are not the parent's
    model: dict[str, Any] = {}
    try:
        for kind, a, b in steps:
            if kind == "set":
                s[a] = b
                model[a] = b
            elif kind == "delete":
                s.remove(a)
                model.pop(a, None)
            elif kind == "batch":
                with s.batch() as batch:
                    for key in a:
                        batch.set(key, b)
                        model[key] = b
            elif kind == "view":
                check_views(s, model, a)
            elif kind == "clear":
                s.clear()
                model.clear()
                sub = s.get_or_create_sub_storage("sub")
                sub["only in sub"] = 1
            elif kind == "compact":
                s.compact()
            else:
                sub.close()
                s.close()
                s = LocalFileStorage(directory, sync="none", auto_compact=False)
                sub = s.get_or_create_sub_storage("sub")
            s._check()
        check_views(s, model, [None, None, None])
        assert list(sub.keys()) == ["only in sub"]
    finally:
        sub.close()
        s.close()


def test_in_memory_flush_and_deletes_keep_the_view_exact(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path / "s", sync="none") as s:
        assert list(s.keys()) == []  # the sorted view exists from here on
        m = InMemoryStorage(s)
        for i in range(50):
            m[f"k{i:02d}"] = i
        m.flush()
        assert list(s.keys(prefix="k0")) == [f"k0{i}" for i in range(10)]
        for i in range(0, 50, 2):
            del m[f"k{i:02d}"]
        m["a"] = 0
        m.flush(checkpoint=1)
        s._check()
        assert list(s.keys(stop="k1")) == ["a"] + [f"k0{i}" for i in range(1, 10, 2)]


def test_many_changes_between_ordered_reads_stay_exact(tmp_path: Path) -> None:
    """Past its limit of unread changes the view is dropped, and rebuilt exactly."""
    with LocalFileStorage(tmp_path / "s", sync="none") as s:
        s["x"] = 0
        assert list(s.keys()) == ["x"]
        for i in range(5000):
            s[f"{i:05d}"] = i
        for i in range(0, 5000, 3):
            del s[f"{i:05d}"]
        s._check()
        want = sorted([f"{i:05d}" for i in range(5000) if i % 3] + ["x"])
        assert list(s.keys()) == want
        assert list(s.keys(start="04990")) == [k for k in want if k >= "04990"]


def test_unordered_iteration_is_the_plain_protocol(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path / "s", sync="none") as s:
        for key in ["c", "a", "b"]:
            s[key] = key
        assert sorted(s) == ["a", "b", "c"]  # iter(storage): all keys, in no promised order
        assert list(s.keys()) == ["a", "b", "c"]
        assert dict(s.items()) == {"a": "a", "b": "b", "c": "c"}
        assert s.keys() == {"a", "b", "c"}  # still a KeysView (a set)


def test_view_arguments_are_checked(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path / "s", sync="none") as s:
        with pytest.raises(TypeError, match="start must be a str key or None.*bytes_to_key"):
            s.keys(b"a")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="prefix"):
            s.items(prefix=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="reverse"):
            s.values(reverse=1)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="closed"):
        list(s.keys())


def test_a_key_deleted_during_items_iteration_is_skipped(tmp_path: Path) -> None:
    with LocalFileStorage(tmp_path / "s", sync="none") as s:
        for key in "abcd":
            s[key] = key
        seen = []
        for key, value in s.items():
            seen.append((key, value))
            if key == "a":
                del s["c"]
        assert seen == [("a", "a"), ("b", "b"), ("d", "d")]


def test_prefix_ending_in_the_last_code_point(tmp_path: Path) -> None:
    top = "\U0010ffff"
    with LocalFileStorage(tmp_path / "s", sync="none") as s:
        for key in ["a" + top, "a" + top + "b", "b", "a"]:
            s[key] = 1
        assert list(s.keys(prefix="a" + top)) == ["a" + top, "a" + top + "b"]


@given(st.lists(st.binary(max_size=6), max_size=30))
def test_bytes_keys_keep_their_order_and_round_trip(raw: list[bytes]) -> None:
    keys = [bytes_to_key(b) for b in raw]
    assert [key_to_bytes(k) for k in keys] == raw
    assert [key_to_bytes(k) for k in sorted(keys)] == sorted(raw)
    # and so do their stored (UTF-8) forms
    assert sorted(keys, key=lambda k: k.encode("utf-8")) == sorted(keys)


def test_key_to_bytes_refuses_keys_bytes_to_key_cannot_make() -> None:
    with pytest.raises(ValueError, match="U\\+4E2D at 1"):
        key_to_bytes("a\u4e2d")
    with pytest.raises(TypeError):
        bytes_to_key("text")  # type: ignore[arg-type]
