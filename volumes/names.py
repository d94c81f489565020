"""Volume names and sizes: the rules live in common.names (shared with
splitctl and the agents); the volume code keeps importing them from here."""
from __future__ import annotations

from common.names import (
    DEFAULT_REGION_SIZE,
    MAX_REGION_SIZE,
    MAX_SIZE,
    MIN_REGION_SIZE,
    NAME_PATTERN,
    SIZE_ALIGNMENT,
    format_size,
    parse_rate,
    parse_region_size,
    parse_size,
    quoted,
    validate_name,
)

__all__ = ["DEFAULT_REGION_SIZE", "MAX_REGION_SIZE", "MAX_SIZE", "MIN_REGION_SIZE",
           "NAME_PATTERN", "SIZE_ALIGNMENT", "format_size", "parse_rate", "parse_region_size",
           "parse_size", "quoted", "validate_name"]
