"""The scopes of a remote admin token (DESIGN.md "Listeners and ports").

    read    status, show, list (and locate): looks, changes nothing
    split   read, plus pair.split and group.split of pairs whose volumes
            match the token's `volumes` glob
    admin   everything, token management included

A scope includes every scope before it in SCOPES. Which method needs which
scope is controller/access.py's table; the CLI only needs the words.
"""
from __future__ import annotations

from collections.abc import Sequence

from common.plain import PlainStrEnum


class Scope(PlainStrEnum):
    READ = "read"
    SPLIT = "split"
    ADMIN = "admin"


# Weakest first: a token's scope covers every scope up to its own.
SCOPES: tuple[Scope, ...] = (Scope.READ, Scope.SPLIT, Scope.ADMIN)


def covers(have: str, need: str, order: Sequence[str] = SCOPES) -> bool:
    """Whether a token of scope `have` may do what needs scope `need`, in a
    ladder of scopes weakest first (the host agent has its own)."""
    return order.index(have) >= order.index(need)
