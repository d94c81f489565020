"""Pair states and every allowed transition, as one table.

States (after ShadowImage; DESIGN.md "Pairs and their states"):

    copy     initial copy P->S running             S refused
    pair     mirrored; the engine drains diff P->S  S refused
    split    S is P's image at the split moment     S read-write
    resync   changed regions copied P->S            S refused
    restore  changed regions copied S->P            S refused
    error    suspended by a fault                   S refused

The table below is the whole truth about transitions: an action that is not
listed for a state is refused, and the refusal names what would be allowed.
"""
from __future__ import annotations

from common.states import READ_POLICIES, STATES, PairState, ReadPolicy

# The states and read policies are shared with splitctl and the agents
# (common/states.py); the names below are the ones the controller uses.
COPY, PAIR, SPLIT = PairState.COPY, PairState.PAIR, PairState.SPLIT
RESYNC, RESTORE, ERROR = PairState.RESYNC, PairState.RESTORE, PairState.ERROR

__all__ = [
    "COPY",
    "ERROR",
    "PAIR",
    "READ_POLICIES",
    "RESTORE",
    "RESYNC",
    "SECONDARY_SERVED",
    "SPLIT",
    "STATES",
    "TRANSITIONS",
    "PairState",
    "ReadPolicy",
    "TransitionRefused",
    "next_state",
]

# action -> {from state: to state}
TRANSITIONS: dict[str, dict[str, str]] = {
    # Split takes whatever is not yet copied as pending.
    "split": {COPY: SPLIT, PAIR: SPLIT, RESYNC: SPLIT},
    # Resync from error is a full resync: every region is copied again.
    "resync": {SPLIT: RESYNC, ERROR: RESYNC},
    "restore": {SPLIT: RESTORE},
    # The copy engine drained what it had to copy.
    "drained": {COPY: PAIR, RESYNC: PAIR, RESTORE: PAIR},
    # A fault (I/O error, a broken guarantee found at start).
    "fail": {s: ERROR for s in STATES},
}

# States where S follows P: a WRITE of P goes to S too, and the engine drains
# what is still to copy.
MIRRORING = frozenset({COPY, PAIR, RESYNC})

# Which states serve the secondary as an NBD export.
SECONDARY_SERVED = frozenset({SPLIT})


class TransitionRefused(Exception):
    """The action is not allowed in the pair's current state."""


def next_state(pair_name: str, state: str, action: str) -> str:
    allowed = TRANSITIONS[action]
    if state in allowed:
        return allowed[state]
    possible = sorted(a for a, t in TRANSITIONS.items() if state in t and a not in ("drained", "fail"))
    from_states = ", ".join(sorted(allowed))
    raise TransitionRefused(
        f"pair {pair_name!r} is in state {state!r}: cannot {action} "
        f"(allowed from: {from_states}; from {state!r} you can: {', '.join(possible) or 'delete'})")
