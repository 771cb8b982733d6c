"""Tests of the option checks of a storage directory (logstate._options.validate_options).

One rule for every option: a value of the wrong type raises TypeError, a
value of the right type that is not accepted raises ValueError, each naming
the option. Options given through LocalFileStorage are tested in
tests/test_storage.py.
"""

from __future__ import annotations

import re

import pytest

from logstate._options import (
    DEFAULT_OPTIONS,
    MAX_SEGMENT_SIZE,
    MAX_SYNC_INTERVAL,
    MIN_SEGMENT_SIZE,
    EngineOptions,
    validate_options,
)

BOOL_OPTIONS = ("auto_compact", "read_only", "use_snapshot", "copy_torn_tails")


class ChangelogShape:
    """Has what validate_options asks of a changelog (attach, restore_before_open)."""

    def attach(self, engine: object) -> object:
        raise AssertionError("validate_options must not attach")

    def restore_before_open(self, path: str, mode: str) -> None:
        raise AssertionError("validate_options must not restore")


class AttachOnly:
    def attach(self, engine: object) -> object:
        raise AssertionError("never called")


def names_option(name: str) -> str:
    """A regex for a message that starts with the option's name (not a longer one's)."""
    return rf"^{re.escape(name)} must "


def test_no_options_give_the_defaults() -> None:
    opts = validate_options({})
    assert opts == DEFAULT_OPTIONS == EngineOptions()
    assert opts == EngineOptions(
        sync="interval",
        sync_interval=1.0,
        segment_size=64 * 1024 * 1024,
        recovery="strict",
        compress_min_size=1024 * 1024,
        zstd_level=1,
        auto_compact=True,
        compact_ratio=0.5,
        compact_min_size=4 * 1024 * 1024,
        read_only=False,
        use_snapshot=True,
        copy_torn_tails=True,
    )


ACCEPTED: list[tuple[str, object]] = [
    ("sync", "none"),
    ("sync", "interval"),
    ("sync", "always"),
    ("sync_interval", 0.001),
    ("sync_interval", 3600.0),
    ("sync_interval", MAX_SYNC_INTERVAL),
    ("segment_size", MIN_SEGMENT_SIZE),
    ("segment_size", MAX_SEGMENT_SIZE),
    ("recovery", "strict"),
    ("recovery", "prefix"),
    ("recovery", "salvage"),
    ("compress_min_size", None),
    ("compress_min_size", 0),
    ("compress_min_size", 10**12),
    ("zstd_level", 1),
    ("zstd_level", 22),
    ("compact_ratio", 0.01),
    ("compact_ratio", 0.99),
    ("compact_min_size", 0),
    ("compact_min_size", 10**12),
    *[(name, value) for name in BOOL_OPTIONS for value in (True, False)],
    ("changelog", ChangelogShape()),
]


@pytest.mark.parametrize(("name", "value"), ACCEPTED)
def test_an_accepted_value_is_kept_and_the_other_options_keep_their_defaults(
    name: str, value: object
) -> None:
    opts = validate_options({name: value})
    assert getattr(opts, name) == value
    assert type(getattr(opts, name)) is type(value)
    assert opts._replace(**{name: getattr(DEFAULT_OPTIONS, name)}) == DEFAULT_OPTIONS


@pytest.mark.parametrize(("name", "value"), [("sync_interval", 2), ("sync_interval", 1)])
def test_an_int_is_taken_for_a_float_option_and_made_a_float(name: str, value: int) -> None:
    result = getattr(validate_options({name: value}), name)
    assert result == value
    assert type(result) is float


def test_every_float_option_comes_back_a_float() -> None:
    # compact_ratio has no int in its range: an int is of the right type, out of range
    opts = validate_options({"sync_interval": 5, "compact_ratio": 0.25})
    assert (type(opts.sync_interval), type(opts.compact_ratio)) == (float, float)
    for value in (0, 1):
        with pytest.raises(ValueError, match=names_option("compact_ratio")):
            validate_options({"compact_ratio": value})


WRONG_TYPE: list[tuple[str, object]] = [
    ("clock", 1.0),  # a time, not a clock
    ("clock", None),
    ("sync", 1),
    ("sync", b"none"),
    ("sync", None),
    ("sync_interval", "1"),
    ("sync_interval", None),
    ("sync_interval", True),  # a bool is not a number of seconds
    ("sync_interval", [1.0]),
    ("segment_size", 4096.0),
    ("segment_size", "4096"),
    ("segment_size", True),
    ("segment_size", None),
    ("recovery", 0),
    ("recovery", None),
    ("compress_min_size", 1.5),
    ("compress_min_size", "0"),
    ("compress_min_size", False),
    ("zstd_level", 1.0),
    ("zstd_level", "3"),
    ("zstd_level", True),
    ("compact_ratio", "0.5"),
    ("compact_ratio", None),
    ("compact_ratio", False),
    ("compact_min_size", 1.0),
    ("compact_min_size", None),
    ("compact_min_size", True),
    *[(name, value) for name in BOOL_OPTIONS for value in (1, 0, "yes", None)],
    ("changelog", "nats://localhost:4222"),  # a URL, not a changelog
    ("changelog", AttachOnly()),
    ("changelog", ChangelogShape),  # the class, whose methods are not bound
]


@pytest.mark.parametrize(("name", "value"), WRONG_TYPE)
def test_a_value_of_the_wrong_type_raises_type_error_naming_the_option(
    name: str, value: object
) -> None:
    with pytest.raises(TypeError, match=names_option(name)):
        validate_options({name: value})


def test_every_option_has_a_wrong_type_case() -> None:
    assert {name for name, _value in WRONG_TYPE} == set(EngineOptions._fields)


OUT_OF_RANGE: list[tuple[str, object]] = [
    ("sync", "sometimes"),
    ("sync", ""),
    ("sync", "ALWAYS"),
    ("sync_interval", 0),
    ("sync_interval", 0.0),
    ("sync_interval", -1.0),
    ("sync_interval", float("nan")),
    ("sync_interval", float("inf")),  # the interval syncer's wait would overflow
    ("sync_interval", MAX_SYNC_INTERVAL * 2),
    ("segment_size", MIN_SEGMENT_SIZE - 1),
    ("segment_size", MAX_SEGMENT_SIZE + 1),
    ("segment_size", 0),
    ("recovery", "lenient"),
    ("recovery", ""),
    ("compress_min_size", -1),
    ("zstd_level", 0),
    ("zstd_level", 23),
    ("zstd_level", -1),
    ("compact_ratio", 0.0),
    ("compact_ratio", 1.0),
    ("compact_ratio", -0.5),
    ("compact_ratio", float("nan")),
    ("compact_min_size", -1),
]


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_a_value_out_of_range_raises_value_error_naming_the_option(
    name: str, value: object
) -> None:
    with pytest.raises(ValueError, match=names_option(name)) as info:
        validate_options({name: value})
    assert not isinstance(info.value, TypeError)


def test_every_option_with_a_range_has_an_out_of_range_case() -> None:
    # clock: any callable; changelog: any changelog (but not with read_only, below)
    ranged = set(EngineOptions._fields) - set(BOOL_OPTIONS) - {"clock", "changelog"}
    assert {name for name, _value in OUT_OF_RANGE} == ranged


def test_a_changelog_with_read_only_raises_value_error_naming_the_changelog() -> None:
    with pytest.raises(ValueError, match=names_option("changelog")) as info:
        validate_options({"changelog": ChangelogShape(), "read_only": True})
    assert not isinstance(info.value, TypeError)
    assert validate_options({"changelog": None, "read_only": True}).changelog is None


def test_an_unknown_option_raises_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="bogus"):
        validate_options({"bogus": 1})
    with pytest.raises(TypeError) as info:
        validate_options({"sync": "none", "bogus": 1, "also_bad": 2})
    assert "bogus" in str(info.value)
    assert "also_bad" in str(info.value)
