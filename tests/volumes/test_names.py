"""Names and sizes: what is accepted, what is refused, and how sizes print."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from volumes.errors import BadInput
from volumes.names import (
    DEFAULT_REGION_SIZE,
    MAX_SIZE,
    NAME_PATTERN,
    format_size,
    parse_region_size,
    parse_size,
    validate_name,
)

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
aligned_sizes = st.integers(1, MAX_SIZE // 4096).map(lambda n: n * 4096)


# -- names ------------------------------------------------------------------

@given(st.from_regex(re.compile(NAME_PATTERN), fullmatch=True))
def test_every_name_of_the_pattern_is_accepted(name):
    assert validate_name(name) == name


@given(st.text(max_size=80))
def test_accepted_names_are_one_harmless_path_component(text):
    try:
        name = validate_name(text)
    except BadInput as e:
        assert "\n" not in str(e)
        return
    assert 1 <= len(name) <= 64 and name.isascii()
    assert "/" not in name and "\0" not in name and not name.startswith(".")
    assert name not in (".", "..")


@pytest.mark.parametrize("bad", ["", ".", "..", ".hidden", "-x", "_x", "a/b", "../etc",
                                 "a b", "a\n", "é", "a" * 65, "a:b", "a\0b"])
def test_bad_names_are_refused_with_a_reason(bad):
    with pytest.raises(BadInput, match="invalid volume name") as e:
        validate_name(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [None, 5, b"vol", ["vol"]])
def test_names_must_be_strings(bad):
    with pytest.raises(BadInput, match="must be a string"):
        validate_name(bad)


def test_longest_name():
    assert validate_name("a" * 64) == "a" * 64


# -- sizes ------------------------------------------------------------------

@given(aligned_sizes)
def test_plain_byte_counts(n):
    assert parse_size(n) == n
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}B") == n


@given(st.integers(1, 1 << 20), st.sampled_from(sorted(UNITS)),
       st.sampled_from(["", "b", "B", "ib", "iB", "IB"]), st.booleans(), st.booleans())
def test_suffixes_are_binary_and_case_insensitive(count, unit, tail, lower, space):
    n = count * UNITS[unit]
    text = f"{count}{' ' if space else ''}{unit.lower() if lower else unit}{tail}"
    if n % 4096:
        with pytest.raises(BadInput, match="multiple of 4096"):
            parse_size(text)
    else:
        assert parse_size(text) == n


def test_examples():
    assert parse_size("64K") == 65536
    assert parse_size("1G") == 1 << 30
    assert parse_size("1TiB") == 1 << 40
    assert parse_size(" 4096 ") == 4096


@given(st.integers(1, 1 << 40).filter(lambda n: n % 4096))
def test_unaligned_sizes_are_refused(n):
    with pytest.raises(BadInput, match="multiple of 4096"):
        parse_size(n)


@pytest.mark.parametrize("bad", [0, "0", "0G", -4096, "-4096"])
def test_sizes_must_be_positive(bad):
    with pytest.raises(BadInput):
        parse_size(bad)


@pytest.mark.parametrize("bad", [True, None, 1.5, 4096.0, "1.5G", "1 G B", "G", "", "10X",
                                 "1e9", "0x1000", "4096\n4096", "1" * 40])
def test_malformed_sizes_are_refused_in_one_line(bad):
    with pytest.raises(BadInput) as e:
        parse_size(bad)
    assert "\n" not in str(e.value)


def test_sizes_beyond_a_file_are_refused():
    with pytest.raises(BadInput, match="too large"):
        parse_size(MAX_SIZE + 4096)
    with pytest.raises(BadInput, match="too large"):
        parse_size("8192P")


# -- region sizes -------------------------------------------------------------

def test_region_size_default():
    assert parse_region_size() == DEFAULT_REGION_SIZE == 65536
    assert parse_region_size(None) == 65536


@pytest.mark.parametrize("shift", range(12, 27))
def test_region_sizes_powers_of_two_in_range(shift):
    assert parse_region_size(1 << shift) == 1 << shift
    assert parse_region_size(format_size(1 << shift)) == 1 << shift


@given(st.integers(-(1 << 30), 1 << 30))
def test_region_sizes_anything_else_is_refused(n):
    ok = 4096 <= n <= 64 << 20 and n & (n - 1) == 0
    if ok:
        assert parse_region_size(n) == n
    else:
        with pytest.raises(BadInput, match="power of two"):
            parse_region_size(n)


# -- format_size ----------------------------------------------------------------

@given(st.integers(1, 1023), st.sampled_from([1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50]))
def test_whole_units_print_without_a_fraction(count, unit):
    assert "." not in format_size(count * unit)


@given(aligned_sizes)
def test_sizes_printed_without_a_fraction_parse_back(n):
    text = format_size(n)
    if "." not in text:
        assert parse_size(text) == n


@given(st.integers(0, 1 << 63))
def test_format_size_is_close_and_short(n):
    text = format_size(n)
    number, unit = text.split(" ")
    scale = {"B": 1, **{u + "iB": s for u, s in UNITS.items()},
             "PiB": 1 << 50, "EiB": 1 << 60}[unit]
    assert abs(float(number) * scale - n) <= 0.05 * scale
    assert float(number) < 1024 or unit == "EiB"
    assert len(text) <= 10


def test_format_size_examples():
    assert format_size(0) == "0 B"
    assert format_size(4096) == "4 KiB"
    assert format_size(65536) == "64 KiB"
    assert format_size(3 << 29) == "1.5 GiB"
    assert format_size(1 << 40) == "1 TiB"
    assert format_size((1 << 20) - 1) == "1.0 MiB"
