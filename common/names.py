"""Checking what users type: volume names and sizes. Shared by the daemon,
splitctl and the agents, so a name or size is refused the same way everywhere.

Rule of this module: every name or size that comes from outside (admin API,
CLI, config) passes through here before anything is written, and a refusal is
a BadInput with a one-line reason that says what would be accepted.

A volume name becomes a file name (<data_dir>/volumes/<name>.img), so the
pattern is also what keeps it a single, harmless path component: no "/", no
leading "." (so never "." or ".."), no NUL, nothing but ASCII.
"""
from __future__ import annotations

import re

from common.errors import BadInput

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME_RE = re.compile(NAME_PATTERN)

# Volumes are served in 4 KiB blocks and their bitmaps count whole blocks.
SIZE_ALIGNMENT = 4096
# The largest offset a file (off_t) and NBD (u64, but we stay signed) can hold,
# rounded down to the alignment. The filesystem may allow less.
MAX_SIZE = (1 << 63) - SIZE_ALIGNMENT

DEFAULT_REGION_SIZE = 64 * 1024
MIN_REGION_SIZE = 4 * 1024
MAX_REGION_SIZE = 64 * 1024 * 1024

# Binary multiples only: a "G" here is always 2**30, whether written G, GB or GiB.
_UNITS = "KMGTPE"
_SIZE_RE = re.compile(r"\s*([0-9]{1,24})\s*(?:([KMGTPE])(?:I?B)?|B)?\s*", re.IGNORECASE)
_SIZE_HELP = ("a whole number of bytes, or with a K, M, G, T, P or E suffix "
              "(e.g. 65536, 64K, 1G, 1TiB)")


def validate_name(name: object) -> str:
    """Return `name` if it is a valid volume name, else raise BadInput."""
    if not isinstance(name, str):
        raise BadInput(f"volume name must be a string, not {_kind(name)}")
    if not _NAME_RE.fullmatch(name):
        raise BadInput(f"invalid volume name {quoted(name)}: use 1 to 64 letters, digits, "
                       "'.', '_' or '-', starting with a letter or digit")
    return name


def parse_size(value: object, what: str = "size") -> int:
    """A volume size in bytes from an int or a string like "64K", "1G", "1TiB".

    The size must be positive and a multiple of 4096.
    """
    size = _parse_bytes(value, what)
    if size <= 0:
        raise BadInput(f"{what} must be greater than 0")
    if size % SIZE_ALIGNMENT:
        raise BadInput(f"{what} {quoted(value)} is not a multiple of {SIZE_ALIGNMENT} bytes")
    if size > MAX_SIZE:
        # format_size(MAX_SIZE) would round to "8.0 EiB", which is itself too large.
        raise BadInput(f"{what} {quoted(value)} is too large (at most {MAX_SIZE} bytes, "
                       f"{format_size(SIZE_ALIGNMENT)} less than 8 EiB)")
    return size


def parse_region_size(value: object = None) -> int:
    """A bitmap region size: a power of two from 4 KiB to 64 MiB (default 64 KiB)."""
    if value is None:
        return DEFAULT_REGION_SIZE
    size = _parse_bytes(value, "region size")
    if not (MIN_REGION_SIZE <= size <= MAX_REGION_SIZE) or size & (size - 1):
        raise BadInput(f"region size {quoted(value)} must be a power of two from "
                       f"{format_size(MIN_REGION_SIZE)} to {format_size(MAX_REGION_SIZE)}")
    return size


def format_size(n: int) -> str:
    """Human-readable binary size: "0 B", "64 KiB", "1.5 GiB".

    Exact multiples print without a fraction (and parse back to the same
    number); anything else is rounded to one decimal.
    """
    if n < 0:
        return "-" + format_size(-n)
    if n < 1024:
        return f"{n} B"
    exp = min((n.bit_length() - 1) // 10, len(_UNITS))
    scale = 1 << (10 * exp)
    if n % scale == 0:
        return f"{n // scale} {_UNITS[exp - 1]}iB"
    value = round(n / scale, 1)
    if value >= 1024 and exp < len(_UNITS):
        # 1023.96 KiB would print as "1024.0 KiB": say "1.0 MiB" instead.
        exp += 1
        scale <<= 10
        value = round(n / scale, 1)
    return f"{value:.1f} {_UNITS[exp - 1]}iB"


def parse_rate(value: object, what: str = "rate") -> int:
    """A copy rate in bytes/s ("100M", 1048576); 0 means unlimited."""
    rate = _parse_bytes(value, what)
    if rate < 0:
        raise BadInput(f"{what} must be 0 (unlimited) or more bytes/s")
    return rate


def _parse_bytes(value: object, what: str) -> int:
    # bool is an int subclass; JSON `true` must not become a 1-byte size.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadInput(f"{what} must be {_SIZE_HELP}; got {_kind(value)}")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.fullmatch(value)
    if m is None:
        raise BadInput(f"invalid {what} {quoted(value)}: use {_SIZE_HELP}")
    number, unit = m.groups()
    exp = _UNITS.index(unit.upper()) + 1 if unit else 0
    return int(number) << (10 * exp)


def quoted(value: object) -> str:
    """repr() cut to 80 characters: keeps control characters visible, and an
    error message that quotes user input on one short line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
