"""Who may call what on the remote admin API: the scope each method needs,
and the volume glob of a split token. The Unix socket never comes here: it
keeps full local rights.

To add a method that a read or split token may call, add it to
METHOD_SCOPES; a method not named here needs `admin`, so a new method is
closed to remote tokens until someone decides otherwise.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from common.errors import Forbidden
from common.names import validate_name
from common.scopes import Scope, covers

if TYPE_CHECKING:
    from controller.pairs import PairManager
    from volumes.store import TokenRecord

# Admin method name -> the scope it needs. Not listed: Scope.ADMIN.
METHOD_SCOPES: dict[str, Scope] = {
    "status": Scope.READ,
    "clock": Scope.READ,
    "connections": Scope.READ,
    "volume.list": Scope.READ,
    "volume.show": Scope.READ,
    "pair.list": Scope.READ,
    "pair.show": Scope.READ,
    "group.list": Scope.READ,
    "locate": Scope.READ,
    "port.list": Scope.READ,
    "backup.served": Scope.READ,
    "backup.restore_status": Scope.READ,
    "pair.split": Scope.SPLIT,
    "group.split": Scope.SPLIT,
    # Only a normal resync of a split pair (authorize below): the host agent
    # releases the previous split image before the next backup's split.
    # A full resync (from error) and restore stay admin-only.
    "pair.resync": Scope.SPLIT,
}


def required_scope(method: str) -> Scope:
    return METHOD_SCOPES.get(method, Scope.ADMIN)


def authorize(token: TokenRecord, method: str, params: dict[str, Any],
              pairs: PairManager | None) -> None:
    """Raise Forbidden unless `token` may call `method` with `params`.

    `params` are untrusted: a name that is not a valid one, or a pair that
    does not exist, is let through for the method itself to refuse (with
    bad-input or not-found) -- nothing is split either way."""
    need = required_scope(method)
    if not covers(token.scope, need):
        raise Forbidden(f"forbidden: token {token.name!r} has scope {token.scope}; "
                        f"{method} needs scope {need}")
    if token.scope != Scope.SPLIT or need != Scope.SPLIT or pairs is None:
        return
    for pair_name, volumes in _pairs_split(method, params, pairs):
        outside = [v for v in volumes if not fnmatchcase(v, token.volumes)]
        if outside:
            raise Forbidden(f"forbidden: token {token.name!r} may split only pairs of volumes "
                            f"matching {token.volumes!r}; pair {pair_name!r} has volume "
                            f"{outside[0]!r}")
        if method == "pair.resync":
            _check_normal_resync(token, pair_name, pairs)


def _check_normal_resync(token: TokenRecord, pair_name: str, pairs: PairManager) -> None:
    """A split token may resync a pair only from `split` (the changed regions
    copied P->S, the delta chain kept: controller/pairs.py "Split
    generations"); from `error` it is a full resync, which drops the chain
    and copies every region again: an admin's decision."""
    state = str(pairs.pairs[pair_name].state)
    if state == "error":
        raise Forbidden(f"forbidden: pair {pair_name!r} is in state error: its resync is a full "
                        f"resync, which needs scope admin (token {token.name!r} has scope split)")
    if state != "split":
        raise Forbidden(f"forbidden: pair {pair_name!r} is in state {state}: token "
                        f"{token.name!r} (scope split) may resync only a pair in state split")


def _pairs_split(method: str, params: dict[str, Any],
                 pairs: PairManager) -> list[tuple[str, tuple[str, str]]]:
    """(pair name, (primary, secondary)) of each pair the call would split
    (or resync)."""
    try:
        name = validate_name(params.get("name"))
    except ValueError:
        return []
    if method in ("pair.split", "pair.resync"):
        chosen = [p for p in (pairs.pairs.get(name),) if p is not None]
    elif method == "group.split":
        chosen = [p for p in pairs.pairs.values() if p.group == name]
    else:
        # A split-scoped method this function does not know: refuse rather
        # than let a split token past its glob.
        raise Forbidden(f"forbidden: {method} is not allowed to split tokens")
    return [(p.name, (p.primary.name, p.secondary.name)) for p in chosen]
