"""KeyMap (csrc/keymap.c), the C path's compact index: it behaves as a dict.

Every behaviour the engine uses is compared with a dict given the same
operations (seeded random runs, ``_check`` of the map's invariants after each
batch): get, [], []=, del, in, len, iteration in insertion order (an
overwrite keeps the position, a re-insert after a delete goes to the end),
keys/values/items and the keys view's set operations, pop, setdefault,
copy, clear, update, == against a dict; locations of every shape (packed
ints, compressed-group tuples, ints the packed form cannot hold); mutation
during iteration raises RuntimeError; the side table's objects are seen by
the garbage collector; the arena is compacted after many deletes; the memory
per key; ``total_size`` equals ``_location.total_size`` (the rule C copies).
"""

from __future__ import annotations

import gc
import random
import weakref
from typing import Any

import pytest

from logstate._location import compressed_location, location_size, pack_location
from tests.keymap_support import keymap_ext


@pytest.fixture
def KeyMap() -> Any:
    return keymap_ext().KeyMap


def random_location(rng: random.Random) -> Any:
    """A location of any shape an index (or a careless caller) may hold."""
    r = rng.random()
    if r < 0.6:
        return pack_location(
            rng.randrange(1, 1 << 16),
            rng.randrange(1 << 40),
            rng.randrange(1 << 32),
            rng.randrange(2),
        )
    if r < 0.75:
        return compressed_location(rng.randrange(1, 99), 40, 900, rng.randrange(500), 60, 1000)
    return rng.choice(
        [0, 1, 2, 3, 7, -1, -(1 << 90), 1 << 128, (1 << 128) - 4, 1 << 200, True, None, "x"]
    )


def random_key(rng: random.Random) -> str:
    base = f"k{rng.randrange(400)}"
    return rng.choice([base, base + "é", base + "\U0001f600", base * 9, ""])


def run_against_dict(km: Any, steps: int, seed: int) -> dict[str, Any]:
    """Random operations on ``km`` and a dict. Keys are drawn from a pool of str
    objects, so that one object comes back (as the write path's get-then-set
    of one key does: the map remembers its last lookup) as often as an equal
    new one."""
    rng = random.Random(seed)
    model: dict[str, Any] = {}
    pool = [random_key(rng) for _ in range(300)]
    for step in range(steps):
        key = rng.choice(pool) if rng.random() < 0.7 else random_key(rng)
        r = rng.random()
        if r < 0.40:
            value = random_location(rng)
            km[key] = value
            model[key] = value
        elif r < 0.55:
            if key in model:
                del km[key]
                del model[key]
            else:
                with pytest.raises(KeyError):
                    del km[key]
        elif r < 0.65:
            assert km.pop(key, "none") == model.pop(key, "none")
        elif r < 0.70:
            value = random_location(rng)
            assert km.setdefault(key, value) == model.setdefault(key, value)
        elif r < 0.72:
            assert km.copy() == model
        else:
            assert km.get(key) == model.get(key)
            assert (key in km) == (key in model)
            if key in model:
                assert km[key] == model[key]
            else:
                with pytest.raises(KeyError):
                    km[key]
        if step % 500 == 0:
            km._check()
            assert list(km) == list(model)
    km._check()
    return model


def test_a_keymap_behaves_as_a_dict_given_the_same_operations(KeyMap: Any) -> None:
    for seed in range(4):
        km = KeyMap()
        model = run_against_dict(km, 6000, seed)
        assert len(km) == len(model)
        assert list(km) == list(model)
        assert list(km.keys()) == list(model.keys())
        assert list(km.values()) == list(model.values())
        assert list(km.items()) == list(model.items())
        assert km == model and model == km and (km != model) is False
        for key, value in model.items():
            assert type(km[key]) is type(value)  # (True stays a bool, a tuple a tuple)


def test_order_is_insertion_order_an_overwrite_keeps_it_a_reinsert_moves_to_the_end(
    KeyMap: Any,
) -> None:
    km = KeyMap({"a": 4, "b": 8, "c": 12})
    km["a"] = 16
    del km["b"]
    km["b"] = 20
    assert list(km.items()) == [("a", 16), ("c", 12), ("b", 20)]


def test_inequality_with_a_dict_of_another_value_or_key(KeyMap: Any) -> None:
    km = KeyMap({"a": 4, "b": (1, 2, 3, 4, 5, 6)})
    assert km != {"a": 4, "b": (1, 2, 3, 4, 5, 7)}
    assert km != {"a": 4, "c": (1, 2, 3, 4, 5, 6)}
    assert km != {"a": 4}
    assert km == KeyMap(km) == km.copy()


def test_the_keys_view_does_set_operations_as_a_dicts(KeyMap: Any) -> None:
    model = {"a": 4, "b": 8, "c": 12}
    km = KeyMap(model)
    other = {"b": 1, "d": 2}
    assert km.keys() | other.keys() == model.keys() | other.keys()
    assert other.keys() - km.keys() == other.keys() - model.keys()
    assert set(other) ^ km.keys() == set(other) ^ model.keys()
    assert km.keys() & {"a", "z"} == {"a"}
    assert km.keys() == {"a", "b", "c"}
    assert len(km.items()) == 3 and ("a", 4) in km.items() and ("a", 5) not in km.items()
    assert 8 in km.values()


@pytest.mark.parametrize("change", ["insert", "delete", "clear"])
def test_a_change_of_the_key_set_during_iteration_raises_runtime_error(
    KeyMap: Any, change: str
) -> None:
    km = KeyMap({"a": 4, "b": 8, "c": 12})
    for view in (km, km.keys(), km.values(), km.items()):
        it = iter(view)
        next(it)
        if change == "insert":
            km["new"] = 0
        elif change == "delete":
            del km["b"]
        else:
            km.clear()
        with pytest.raises(RuntimeError):
            next(it)
        km.clear()
        km.update({"a": 4, "b": 8, "c": 12})


def test_an_overwrite_during_iteration_is_allowed_as_in_a_dict(KeyMap: Any) -> None:
    km = KeyMap({"a": 4, "b": 8, "c": 12})
    for key in km:
        km[key] = 40
    assert km == {"a": 40, "b": 40, "c": 40}


def test_keys_must_be_str_that_utf8_can_encode(KeyMap: Any) -> None:
    km = KeyMap()
    with pytest.raises(TypeError):
        km[b"bytes"] = 4
    with pytest.raises(ValueError):
        km["bad\udc80"] = 4
    assert km.get(7) is None and 7 not in km and "bad\udc80" not in km
    with pytest.raises(KeyError):
        km["bad\udc80"]
    assert len(km) == 0
    km._check()


def test_objects_in_the_side_table_are_seen_by_the_garbage_collector(KeyMap: Any) -> None:
    class Holder:
        pass

    km = KeyMap()
    holder = Holder()
    holder.km = km  # type: ignore[attr-defined]
    km["k"] = holder  # a cycle through the side table
    alive = weakref.ref(holder)
    del km, holder
    gc.collect()
    assert alive() is None


def test_a_deleted_side_object_is_released(KeyMap: Any) -> None:
    class Value:
        pass

    value = Value()
    alive = weakref.ref(value)
    km = KeyMap({"k": value})
    del value
    assert alive() is not None
    km["k"] = 4  # overwritten by a packed int
    assert alive() is None
    km._check()


def test_many_deletes_compact_the_arena(KeyMap: Any) -> None:
    km = KeyMap()
    for i in range(20_000):
        km[f"key-{i:08d}"] = i << 2
    full = km.__sizeof__()
    for i in range(19_000):
        del km[f"key-{i:08d}"]
    km._check()
    assert km.__sizeof__() < full  # (without compaction the arena only grows)
    assert list(km) == [f"key-{i:08d}" for i in range(19_000, 20_000)]
    for i in range(20_000):
        km[f"again-{i}"] = 8
    km._check()
    assert len(km) == 21_000


def test_memory_per_key_at_100k_twelve_char_keys_is_under_56_bytes(KeyMap: Any) -> None:
    """Capacity included (the arena grows by a quarter, the table doubles):
    a record is 32 bytes, a table slot 4; a dict of str and int takes ~140."""
    km = KeyMap()
    for i in range(100_000):
        km[f"key-{i:08d}"] = pack_location(3, i * 134, 134, 0)
    assert km.__sizeof__() / len(km) < 56
    km._check()  # (the table of a large map is rebuilt by regions as it grows)


def test_total_size_equals_the_python_rule_over_every_shape_of_location(KeyMap: Any) -> None:
    """keymap.c's km_total_size copies _location.location_size: proved equal here."""
    rng = random.Random(3)
    model: dict[str, Any] = {}
    for i in range(3000):
        loc = random_location(rng)
        if type(loc) is int or type(loc) is tuple:
            model[f"k{i}"] = loc
    km = KeyMap(model)
    assert km.total_size() == sum(location_size(loc) for loc in model.values())
    with pytest.raises(TypeError):
        KeyMap({"odd": "x"}).total_size()


def test_the_raw_form_depends_on_the_keys_and_locations_in_order_only(KeyMap: Any) -> None:
    """Two maps with the same items in the same order give the same raw bytes,
    whatever their history (deleted records are not in it)."""
    a = KeyMap()
    b = KeyMap()
    for i in range(3000):
        a[f"k{i}"] = i << 2
        b[f"gone{i}"] = 4
    for i in range(3000):
        del b[f"gone{i}"]
        b[f"k{i}"] = 4
        b[f"k{i}"] = i << 2
    assert a.raw() == b.raw()


def test_pickle_and_repr_show_the_items(KeyMap: Any) -> None:
    import pickle

    km = KeyMap({"a": 4, "b": (1, 2, 3, 4, 5, 6)})
    assert pickle.loads(pickle.dumps(km)) == km
    assert repr(km) == "KeyMap({'a': 4, 'b': (1, 2, 3, 4, 5, 6)})"


def test_repeated_operations_and_loads_leave_no_memory_behind(KeyMap: Any) -> None:
    """A refcount or buffer leak on any path (errors included) shows as growth
    of the traced memory (PyMem_Malloc and every object are traced)."""
    import struct
    import tracemalloc

    load = keymap_ext().keymap_load
    limits = (24, 20, 10, 40, 1 << 30, 65535)

    def work() -> None:
        km = KeyMap()
        for i in range(500):
            km[f"k{i}"] = (1 << 74 | 28 << 34 | 40 << 2) + (i << 34)
            km[f"t{i}"] = (1, 30, 100, i, 20, 5)
            km[f"b{i}"] = 1 << 200
        for i in range(0, 500, 2):
            km.pop(f"k{i}")
            del km[f"t{i}"]
            km.setdefault(f"n{i}", 8)
        assert km == dict(km.items()) and km.copy() == km == KeyMap(km)
        assert list(km.values()) and repr(km) and km.keys() | {"x"} and km.raw()
        plain = {f"k{i}": 1 << 74 | 28 << 34 | 40 << 2 for i in range(99)}
        groups = {f"t{i}": (1, 30, 100, i, 20, 5) for i in range(20)}
        count, arena, sides = KeyMap({**plain, **groups}).raw()
        side = b"".join(struct.pack("<6Q", *loc) for loc in sides)
        load(arena + side, 0, count, len(arena), len(sides), [(1, 1000)], limits)
        with pytest.raises(ValueError):
            load(arena, 0, count, len(arena), 0, [(1, 1000)], limits)  # (no side entry)
        with pytest.raises(TypeError):
            km[b"x"] = 1
        km.clear()

    work()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(20):
            work()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 16_384  # (20 rounds of ~1,500 objects each: a leak is far more)


def test_a_str_subclass_key_whose_release_changes_the_map_never_misdirects_a_lookup(
    KeyMap: Any,
) -> None:
    """The map remembers its last looked-up key; releasing a str subclass can
    run ``__del__``, which here deletes most keys (the table shrinks): a
    lookup after it must still find the right record."""
    m = KeyMap()
    n = 20_000
    for i in range(n):
        m[f"key{i:06d}"] = pack_location(1, i, 8, 0)

    class Key(str):
        def __del__(self) -> None:
            for i in range(n - 10):
                del m[f"key{i:06d}"]

    key = Key("key000001")
    assert m.get(key) == pack_location(1, 1, 8, 0)
    del key  # (the map must not be the one holding it)
    last = f"key{n - 1:06d}"
    assert m.get(last) == pack_location(1, n - 1, 8, 0)
    del m[last]
    assert last not in m
    m._check()


def test_total_size_refuses_a_map_changed_by_a_size_it_adds(KeyMap: Any) -> None:
    """``total_size`` adds the sizes of tuple locations with Python arithmetic:
    a size object whose addition changes the map makes it raise, never return
    a total of no state of the map."""
    m = KeyMap()
    for i in range(100):
        m[f"k{i}"] = pack_location(1, i, 8, 0)

    class Size(int):
        def __add__(self, other: int) -> int:
            m.pop("k0", None)
            return int(self) + int(other)

        __radd__ = __add__

    for j in range(3):
        m[f"t{j}"] = (1, 0, 10, 0, 10, Size(10))
    with pytest.raises(RuntimeError, match="changed"):
        m.total_size()
