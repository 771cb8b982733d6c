"""The C hot paths reach a KeyMap index by its C API exactly as by its mapping API.

csrc/fast.c takes KeyMap's C API (key bytes, locations as two u64) when a
namespace's index is exactly a KeyMap, and the generic mapping calls for any
other mapping. The same operations run on a store whose index is a KeyMap
(the direct code) and one whose index is the same kind of KeyMap behind a
Python mapping (the generic code): the indexes, live bytes, reads and segment
files must be equal, compressed groups' tuples (KeyMap side objects, which
the direct code hands to the generic code) included.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, MutableMapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logstate import InMemoryStorage, LocalFileStorage
from logstate._format import GROUP_OP_SIZE
from tests.native_required import native_extension
from tests.test_native_equal import files

KEYS = st.sampled_from(["a", "b", "key-1", "ключ", "鍵", "émoji-🙂", "x" * 300, "a/b", "c"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, st.binary(max_size=200)),
        st.tuples(st.just("remove"), KEYS),
        st.tuples(st.just("get"), KEYS),
        st.tuples(
            st.just("flush"),
            st.lists(st.tuples(KEYS, st.one_of(st.none(), st.binary(max_size=200))), max_size=8),
        ),
    ),
    max_size=40,
)


class _Behind(MutableMapping[str, object]):
    """A KeyMap behind a Python mapping: the C paths take the generic calls."""

    def __init__(self, inner: MutableMapping[str, object]) -> None:
        self.inner = inner

    def __getitem__(self, key: str) -> object:
        return self.inner[key]

    def __setitem__(self, key: str, value: object) -> None:
        self.inner[key] = value

    def __delitem__(self, key: str) -> None:
        del self.inner[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def _run(path: str, behind: bool, ops: list[tuple[object, ...]]) -> tuple[object, ...]:
    ext = native_extension()
    # compress_min_size: the groups of at least 4 ops are compressed (tuple locations)
    store = LocalFileStorage(path, sync="none", auto_compact=False, compress_min_size=4 * 64)
    namespaces = store._engine.keydir.namespaces
    inner = namespaces[""]
    assert type(inner) is ext.KeyMap
    if behind:
        namespaces[""] = _Behind(inner)  # type: ignore[assignment,arg-type]
    seen: list[object] = []
    for op in ops:
        if op[0] == "set":
            store.set(str(op[1]), op[2])
        elif op[0] == "remove":
            if store.contains_key(str(op[1])):
                store.remove(str(op[1]))
        elif op[0] == "get":
            seen.append(store.get(str(op[1])))
        else:
            memory = InMemoryStorage(store)
            for key, value in op[1]:  # type: ignore[attr-defined]
                if value is None:
                    if memory.contains_key(key):
                        memory.remove(key)
                else:
                    memory.set(key, value)
            memory.flush()
    seen.append(store.get("\ud800"))  # not UTF-8: never found
    state = (
        seen,
        dict(inner.items()),
        store._engine.keydir.live_bytes,
        {key: store.get(key) for key in store.get_all_keys()},
    )
    namespaces[""] = inner
    store.close()
    return state


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_the_keymap_c_api_and_the_mapping_calls_give_equal_stores(
    ops: list[tuple[object, ...]],
) -> None:
    native_extension()
    with tempfile.TemporaryDirectory() as tmp:
        direct = _run(os.path.join(tmp, "direct"), False, ops)
        generic = _run(os.path.join(tmp, "generic"), True, ops)
        assert direct == generic
        direct_files, generic_files = (
            files(os.path.join(tmp, "direct")),
            files(os.path.join(tmp, "generic")),
        )
        direct_files.pop("index.snapshot", None), generic_files.pop("index.snapshot", None)
        assert direct_files == generic_files


def _filled(ext: object) -> MutableMapping[str, object]:
    index: MutableMapping[str, object] = ext.KeyMap()  # type: ignore[attr-defined]
    index["a"] = 3 << 74 | 100 << 34 | 40 << 2
    index["ключ"] = (3, 200, 90, 0, 1, 17)  # a compressed group's tuple: its share 17
    index["b"] = 2 << 74 | 1 << 64 | 7 << 34 | 33 << 2 | 1
    return index


def test_index_keys_on_a_keymap_equals_the_generic_calls() -> None:
    ext = native_extension()
    keys = ["a", "ключ", "b", "new", "a", "ключ", "gone"]
    values = [b"x" * 5, b"y", None, b"z" * 9, None, None, None]
    high = 9 << 74 | 1
    results = []
    for behind in (False, True):
        index = _filled(ext)
        target = _Behind(index) if behind else index
        live = ext.index_keys(target, 3, list(keys), list(values), high, 1000)
        results.append((live, dict(index.items()), list(index)))
    assert results[0] == results[1]
    # what is left: "new" (its op's size) less the three old sizes 40, 17, 33
    assert results[0][0] == GROUP_OP_SIZE + 3 + 2 + 3 + 9 - 40 - 17 - 33
    assert set(results[0][1]) == {"new"}
