"""The words a pair is described with: its states, its read policies, and what
`splitctl pair wait` (or an agent) can wait for.

Members are strings (PlainStrEnum): they equal, hash, print and encode to JSON
exactly as the plain values the admin API and the metadata database hold.
Which action moves a pair from one state to another is the controller's
business: see controller/states.py.
"""
from __future__ import annotations

from collections.abc import Mapping

from common.plain import PlainStrEnum


class PairState(PlainStrEnum):
    """DESIGN.md "Pairs and their states"."""

    COPY = "copy"          # initial copy P->S running
    PAIR = "pair"          # mirrored; the engine drains diff P->S
    SPLIT = "split"        # S is P's image at the split moment
    RESYNC = "resync"      # changed regions copied P->S
    RESTORE = "restore"    # changed regions copied S->P
    ERROR = "error"        # suspended by a fault


class ReadPolicy(PlainStrEnum):
    """How a split secondary's reads of regions not yet copied are served
    (DESIGN.md "Split")."""

    COPY_ON_READ = "copy-on-read"   # copy the region P->S, then serve it from S
    STAGING = "staging"             # read P into memory, serve that, hand it to the engine
    WAIT = "wait"                   # hold the read until the engine has copied the region


class WaitTarget(PlainStrEnum):
    """What a caller can wait for, polling pair.show (see target_reached)."""

    SYNCED = "synced"   # S mirrors P (state pair): initial copy, resync or restore done
    COPIED = "copied"   # nothing left to copy in split or pair: S holds its whole image


STATES: tuple[PairState, ...] = tuple(PairState)
READ_POLICIES: tuple[ReadPolicy, ...] = tuple(ReadPolicy)
WAIT_TARGETS: tuple[WaitTarget, ...] = tuple(WaitTarget)


def target_reached(pair: Mapping[str, object], until: str) -> bool:
    """Whether the pair.show result `pair` says the pair is `until`."""
    if until == WaitTarget.SYNCED:
        return pair["state"] == PairState.PAIR
    if until == WaitTarget.COPIED:
        return pair["remaining"] == 0 and pair["state"] in (PairState.SPLIT, PairState.PAIR)
    raise ValueError(f"unknown wait target {until!r} (one of {', '.join(WAIT_TARGETS)})")
