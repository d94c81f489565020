"""The admin API: one method per admin request, and the table naming them.

Every method takes keyword parameters as they arrive in a request's "params"
(already decoded from JSON, so untrusted), checks them, and returns a
JSON-able dict, or raises an error from controller.errors. Methods are
synchronous and quick; the admin server calls them on the event loop, so
none of them may block on anything slower than a metadata commit. The two
that open a backup store (backup.serve, backup.instant_restore) are
coroutines instead: the open runs in a thread, the checks are made again
after it, and the change is made with no await in between
(daemon/admin_server.py answers them when done).

To add a request, write the method and add one line to METHODS at the end.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from controller import ports
from controller.errors import BadInput, Conflict, NotFound, UnknownMethod
from controller.pairs import Refused
from controller.served import check_source
from controller.tokens import Tokens, describe as describe_token
from volumes.names import parse_region_size, parse_size, quoted, validate_name

if TYPE_CHECKING:
    from controller.pair import Pair
    from controller.pairs import PairManager
    from controller.served import ServedSnapshots
    from daemon.connections import ConnectionRegistry
    from volumes.manager import VolumeManager

log = logging.getLogger("splitd.controller")

# A request's parameter as it arrives, decoded from JSON and not yet checked:
# every method checks its own (validate_name, parse_size, _flag, ...).
Param = Any
# A reply: a JSON-able dict.
Reply = dict[str, Any]


class Controller:
    def __init__(self, manager: VolumeManager, registry: ConnectionRegistry,
                 info: Callable[[], dict[str, Any]], pairs: PairManager | None = None,
                 served: ServedSnapshots | None = None):
        self.manager = manager      # volumes.manager.VolumeManager
        self.registry = registry    # daemon.connections.ConnectionRegistry
        self.info = info            # daemon facts: version, pid, uptime_s, listeners
        self.pairs = pairs          # controller.pairs.PairManager
        self.served = served        # controller.served.ServedSnapshots

    def call(self, method: str, params: dict | None = None) -> Any:
        """Run one admin request: look the method up, check params, call it."""
        handler = METHODS.get(method)
        if handler is None:
            raise UnknownMethod(f"unknown method {quoted(method)}")
        params = {} if params is None else params
        _check_params(method, handler, params)
        return handler(self, **params)

    # -- daemon -----------------------------------------------------------

    def status(self) -> Reply:
        result = dict(self.info())
        result["volumes"] = len(self.manager.list())
        result["unavailable_volumes"] = dict(self.manager.unavailable)
        result["connections"] = self.registry.snapshot()
        if self.pairs is not None:
            result["pairs"] = {p.name: p.state for p in self.pairs.pairs.values()}
            result["unavailable_pairs"] = dict(self.pairs.unavailable)
        return result

    def connections(self) -> Reply:
        """Every open NBD connection: its number, export, peer, port, since
        when, and how many READs it made and bytes it asked for; and the
        last ones to close, with their final counts (daemon/connections.py)."""
        return {"connections": self.registry.snapshot(), "closed": self.registry.closed()}

    # -- volumes ----------------------------------------------------------

    def volume_create(self, name: Param, size: Param, region_size: Param = None,
                      read_only: Param = False) -> Reply:
        name = validate_name(name)
        if self.served is not None and self.served.taken(name):
            raise Conflict(f"export name {name!r} serves a backup snapshot; give the volume another name")
        vol = self.manager.create(name, parse_size(size),
                                  parse_region_size(region_size), _flag(read_only, "read_only"))
        return self._describe(vol)

    def volume_list(self) -> Reply:
        return {"volumes": [self._describe(v) for v in self.manager.list()]}

    def volume_show(self, name: Param) -> Reply:
        return self._describe(self.manager.get(validate_name(name)))

    def volume_resize(self, name: Param, size: Param) -> Reply:
        name = validate_name(name)
        self._refuse_if_paired(name, "resize")
        return self._describe(self.manager.resize(name, parse_size(size)))

    def _refuse_if_paired(self, name: str, action: str) -> None:
        roles = self.pairs.roles(name) if self.pairs is not None else []
        if roles:
            raise Conflict(f"volume {name!r} is in pair{'s' if len(roles) > 1 else ''} "
                           f"{', '.join(repr(r) for r in roles)}: delete the pair first "
                           f"(splitctl pair delete), then {action} the volume")

    def volume_delete(self, name: Param, force: Param = False) -> Reply:
        name = validate_name(name)
        force = _flag(force, "force")
        self._refuse_if_paired(name, "delete")
        in_use = self.registry.count(name)
        if in_use and not force:
            conns = "connection" if in_use == 1 else "connections"
            raise Conflict(f"volume {name!r} is in use by {in_use} NBD {conns}; disconnect "
                           "first, or delete with force (splitctl volume delete --force)")
        closed = self.registry.close_export(name, "volume deleted") if in_use else 0
        self.manager.delete(name)
        return {"name": name, "deleted": True, "connections_closed": closed}

    # -- pairs ------------------------------------------------------------

    def pair_create(self, primary: Param, secondary: Param, create_secondary: Param = False,
                    read_policy: Param = "copy-on-read", rate: Param = 0,
                    group: Param = None) -> Reply:
        return self._pair_manager.create(primary, secondary, _flag(create_secondary, "create_secondary"),
                                 read_policy, rate, group).describe()

    def pair_list(self) -> Reply:
        return {"pairs": [p.describe() for p in self._pair_manager.pairs.values()]}

    def pair_show(self, name: Param) -> Reply:
        return self._pair_manager.get(name).describe()

    def clock(self) -> Reply:
        """The daemon's CLOCK_MONOTONIC, in seconds: the time a split's
        not_after counts in (see _check_not_after)."""
        return {"monotonic": time.monotonic()}

    def pair_split(self, name: Param, not_after: Param = None) -> Reply:
        _check_not_after(not_after, f"pair {quoted(name)}")
        return self._pair_manager.split([name])[0].describe()

    def pair_resync(self, name: Param) -> Reply:
        return self._pair_manager.resync(name).describe()

    def pair_restore(self, name: Param) -> Reply:
        return self._pair_manager.restore(name).describe()

    def pair_delete(self, name: Param, force: Param = False) -> Reply:
        return self._pair_manager.delete(name, _flag(force, "force"))

    def pair_set(self, name: Param, rate: Param = None, read_policy: Param = None) -> Reply:
        return self._pair_manager.set(name, rate, read_policy).describe()

    def group_split(self, name: Param, not_after: Param = None) -> Reply:
        _check_not_after(not_after, f"group {quoted(name)}")
        members = self._pair_manager.group_members(validate_name(name))
        return {"group": name, "pairs": [p.describe() for p in self._pair_manager.split(members)]}

    def group_list(self) -> Reply:
        groups: dict[str, list[str]] = {}
        for p in self._pair_manager.pairs.values():
            if p.group:
                groups.setdefault(p.group, []).append(p.name)
        return {"groups": [{"name": g, "pairs": sorted(m)} for g, m in sorted(groups.items())]}

    # -- ports ------------------------------------------------------------

    def port_list(self) -> Reply:
        return {"ports": ports.port_list(self.info()["listeners"])}

    def locate(self, name: Param, port: Param, role: Param = "secondary") -> Reply:
        """The NBD URI of a volume through one port, with its pair's state.

        role "secondary": a pair's secondary; `name` is a pair (or its
        secondary), or a primary volume that is in one pair.
        role "primary": the volume a host attaches; `name` is a pair (its
        primary is meant), or any volume that is no pair's secondary (a
        primary, or a volume in no pair: itself).

        `generation` is the pair's bitmap generation; `split_gen` counts its
        splits and `delta_base` is the split_gen its delta covers the
        changes since (controller/pairs.py, "Split generations"). A pair
        deleted and made again counts from 0 again: `created` tells the two
        apart."""
        if not isinstance(port, str):
            raise BadInput(f"port must be a port name, not {quoted(port)}")
        if role not in LOCATE_ROLES:
            raise BadInput(f"role must be one of {', '.join(LOCATE_ROLES)}, not {quoted(role)}")
        listener = ports.find_port(self.info()["listeners"], port)
        name = validate_name(name)
        pair: Pair | None
        if role == "primary":
            volume, pair = self._primary_to_locate(name)
        else:
            pair = self._pair_to_locate(name)
            volume = pair.secondary.name
        uris = ports.export_uris(listener, volume)
        reply = {"uri": uris[0], "uris": uris, "port": listener["name"],
                 "tls": listener.get("tls", "off"), "role": role, "volume": volume}
        facts = ("pair", "primary", "secondary", "state", "group", "generation", "split_gen",
                 "delta_base", "split_at", "created")
        if pair is None:
            reply.update(dict.fromkeys(facts))
        else:
            reply.update({"pair": pair.name, "primary": pair.primary.name,
                          "secondary": pair.secondary.name, "state": pair.state,
                          "group": pair.group, "generation": pair.generation,
                          "split_gen": pair.split_gen, "delta_base": pair.delta_base,
                          "split_at": pair.split_at, "created": pair.created})
        return reply

    def _primary_to_locate(self, name: str) -> tuple[str, Pair | None]:
        """(the volume, its one pair or None) for locate(role="primary")."""
        pm = self.pairs
        pair = pm.pairs.get(name) if pm is not None else None
        if pair is not None:
            return pair.primary.name, pair
        if pm is not None and name in pm.unavailable:
            raise Conflict(f"pair {name!r} is unavailable: {pm.unavailable[name]}")
        if self.manager.find(name) is None:
            raise NotFound(f"no volume or pair named {name!r}")
        primary_of = [] if pm is None else [p for p in pm.pairs.values() if p.primary.name == name]
        # A primary of several pairs is still one volume: its URI, no one pair.
        return name, primary_of[0] if len(primary_of) == 1 else None

    def _pair_to_locate(self, name: str) -> Pair:
        pm = self._pair_manager
        pair = pm.pairs.get(name)
        if pair is not None:
            return pair
        if name in pm.unavailable:
            raise Conflict(f"pair {name!r} is unavailable: {pm.unavailable[name]}")
        if self.manager.find(name) is None:
            raise NotFound(f"no volume or pair named {name!r}")
        primary_of = sorted(p.name for p in pm.pairs.values() if p.primary.name == name)
        if len(primary_of) == 1:
            return pm.pairs[primary_of[0]]
        if primary_of:
            raise BadInput(f"volume {name!r} is the primary of {len(primary_of)} pairs "
                           f"({', '.join(repr(n) for n in primary_of)}): name the pair to "
                           "locate (a pair is named by its secondary)")
        unavailable = [n for n in pm.roles(name) if n in pm.unavailable]
        if unavailable:
            raise Conflict(f"volume {name!r} is only in unavailable pairs: "
                           + "; ".join(f"{n!r}: {pm.unavailable[n]}" for n in unavailable))
        raise NotFound(f"volume {name!r} is in no pair: only a pair's secondary can be "
                       f"located (splitctl pair create {name} SECONDARY)")

    # -- remote admin tokens (only over the Unix socket or with an admin token) --

    @functools.cached_property
    def tokens(self) -> Tokens:
        return Tokens(self.manager.store)

    def token_create(self, name: Param, scope: Param, volumes: Param = None) -> Reply:
        record, secret = self.tokens.create(name, scope, volumes)
        return dict(describe_token(record), token=secret)

    def token_list(self) -> Reply:
        return {"tokens": [describe_token(t) for t in self.tokens.list()]}

    def token_revoke(self, name: Param) -> Reply:
        return dict(describe_token(self.tokens.revoke(name)), revoked=True)

    # -- backup snapshots served from a store (controller/served.py) ---------

    async def backup_serve(self, store: Param, snapshot: Param, name: Param = None,
                           key_file: Param = None, cache_size: Param = None) -> Reply:
        out = await self._served.serve(store, snapshot, name, key_file, cache_size)
        out["uris"] = self._uris(out["name"])
        return out

    def _uris(self, export: str) -> dict[str, list[str]]:
        """Where to reach an export: through every port, as locate answers."""
        uris = {}
        for lst in self.info()["listeners"]:
            try:
                uris[lst["name"]] = ports.export_uris(lst, export)
            except Conflict:
                pass        # a wildcard address: no one URI to give
        return uris

    async def backup_instant_restore(self, store: Param, snapshot: Param, volume: Param,
                                     key_file: Param = None, rate: Param = 0) -> Reply:
        """A new volume restored from a snapshot, usable at once; the rest is
        restored in the background (controller/instant.py)."""
        # Kept in the pair's row and opened again at every start.
        check_source(store, snapshot, key_file)
        volume = validate_name(volume)

        def check() -> None:
            # Before the store is opened, and again after (the open takes a
            # while, other requests run meanwhile), right before the change.
            if self.served is not None and self.served.taken(volume):
                raise Conflict(f"export name {volume!r} serves a backup snapshot; give the "
                               "volume another name")

        check()
        pair = await self._pair_manager.create_instant(store, snapshot, volume, key_file, rate,
                                                       check)
        out = pair.describe()
        out["uris"] = self._uris(volume)
        return out

    def backup_restore_status(self, volume: Param) -> Reply:
        """An instant restore: its progress while it runs (as pair.show), or
        state "restored" (or "deleted") once its pair is dissolved."""
        return self._pair_manager.restore_status(volume)

    def backup_unserve(self, name: Param, force: Param = False) -> Reply:
        return self._served.unserve(name, force)

    def backup_served(self) -> Reply:
        return self._served.list()

    @property
    def _served(self) -> ServedSnapshots:
        if self.served is None:
            raise UnknownMethod("this splitd serves no backup snapshots")
        return self.served

    @property
    def _pair_manager(self) -> PairManager:
        if self.pairs is None:
            raise UnknownMethod("this splitd has no pairs (no pair manager)")
        return self.pairs

    def _describe(self, vol) -> dict:
        return {
            "name": vol.name,
            "size": vol.size,
            "region_size": vol.region_size,
            "read_only": vol.read_only,
            "allocated": self.manager.allocated_bytes(vol.name),
            "connections": self.registry.count(vol.name),
            "path": vol.path,
        }


# The volumes `locate` can name: a pair's secondary, or the primary side.
LOCATE_ROLES = ("secondary", "primary")

# Admin method name -> Controller method. The one place requests are named.
METHODS: dict[str, Callable[..., Any]] = {
    "status": Controller.status,
    "clock": Controller.clock,
    "connections": Controller.connections,
    "volume.create": Controller.volume_create,
    "volume.list": Controller.volume_list,
    "volume.show": Controller.volume_show,
    "volume.resize": Controller.volume_resize,
    "volume.delete": Controller.volume_delete,
    "pair.create": Controller.pair_create,
    "pair.list": Controller.pair_list,
    "pair.show": Controller.pair_show,
    "pair.split": Controller.pair_split,
    "pair.resync": Controller.pair_resync,
    "pair.restore": Controller.pair_restore,
    "pair.delete": Controller.pair_delete,
    "pair.set": Controller.pair_set,
    "group.split": Controller.group_split,
    "group.list": Controller.group_list,
    "port.list": Controller.port_list,
    "locate": Controller.locate,
    "token.create": Controller.token_create,
    "token.list": Controller.token_list,
    "token.revoke": Controller.token_revoke,
    "backup.serve": Controller.backup_serve,
    "backup.unserve": Controller.backup_unserve,
    "backup.served": Controller.backup_served,
    "backup.instant_restore": Controller.backup_instant_restore,
    "backup.restore_status": Controller.backup_restore_status,
}


def _check_not_after(not_after: Param, what: str) -> None:
    """A split request may carry a deadline, `not_after`, in the daemon's own
    CLOCK_MONOTONIC seconds (as `clock` answered it): arriving later, it is
    refused. The host agent reads `clock` just before it freezes a filesystem
    and gives up on the split (and thaws) no sooner than that reading plus
    the same allowance on its own clock, so a request the network delivers
    late (TCP retransmits what a closed socket held; a partition may hold
    it longer than an RST takes) cannot split the pair after the thaw. Only
    the daemon's clock is compared, so the hosts' clocks need not agree. The
    split runs synchronously right after this check (no await in between)."""
    if not_after is None:
        return
    if isinstance(not_after, bool) or not isinstance(not_after, (int, float)) \
            or not math.isfinite(not_after):
        raise BadInput("not_after must be a number: the daemon's monotonic clock "
                       "(from the clock call) in seconds")
    late = time.monotonic() - not_after
    if late > 0:
        # Worth an operator's notice: a network that delivered a request
        # this late (the host agent gave up on it and thawed).
        log.warning("split of %s refused: its deadline passed %.3f s before it arrived",
                    what, late)
        raise Refused(f"split of {what} refused: its deadline passed {late:.3f} s before it "
                      "arrived (the caller gave up on it; nothing was split)")


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadInput(f"{what} must be true or false")
    return value


@functools.cache
def _signature(handler: Callable) -> tuple[frozenset[str], tuple[str, ...]]:
    """(every parameter name, the required ones in order), without `self`."""
    params = list(inspect.signature(handler).parameters.values())[1:]
    return (frozenset(p.name for p in params),
            tuple(p.name for p in params if p.default is inspect.Parameter.empty))


def _check_params(method: str, handler: Callable, params: dict) -> None:
    # Named checks here, so a typo in a request is a clear bad-input error and
    # never a TypeError from deep inside the call.
    allowed, required = _signature(handler)
    unknown = sorted(quoted(k) for k in params if k not in allowed)
    if unknown:
        raise BadInput(f"unknown parameter{'s' if len(unknown) > 1 else ''} for {method}: "
                       f"{', '.join(unknown)} (accepted: {', '.join(sorted(allowed)) or 'none'})")
    missing = [p for p in required if p not in params]
    if missing:
        raise BadInput(f"missing parameter{'s' if len(missing) > 1 else ''} for {method}: "
                       f"{', '.join(missing)}")
