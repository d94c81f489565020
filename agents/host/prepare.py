"""prepare(): make the storage hold a consistent image of a directory's
filesystem at one instant, and say where it can be read (DESIGN.md "Backup",
step 2).

In order, each step refusing with a PrepareError before anything is frozen:
  1. the filesystem holding the directory (mounts.find_filesystem), its
     device, and the attachment record of that device: the volume and the
     daemon behind it (a directory on anything else is refused, naming it);
  2. the filesystem's lock: one prepare per filesystem at a time ("busy");
  3. the daemon's admin API, connected and authenticated now, so that the
     frozen window holds only the split; `locate` (volume, port) names the
     pair, pair.show its state and group (a pair in `error` is refused);
     With `resync`, a pair left `split` by the previous prepare (every
     member of its group that is) is resynced first (pair.resync: the
     changed regions copied P->S, the delta chain kept, controller/pairs.py
     "Split generations"); a split from `resync` is allowed
     (controller/states.py), so the next steps go on at once;
  4. the pre-freeze hook (`HOOK freeze MOUNTPOINT`);
  5. frozen(): syncfs, arm the watchdog, FIFREEZE (with RCU grace periods
     expedited, unless HostState.expedite is off), pair.split (group.split
     when the pair is in a consistency group), FITHAW, disarm;
  6. the post-thaw hook (`HOOK thaw MOUNTPOINT`): a failure there is
     reported in "warnings", the split image is good;
  7. `locate` again: the secondary's URI through the port, its generation.

The answer: uri, uris, port, tls (the secondary through the port, from
locate), pair, group, volume, directory, mountpoint, device, split_gen and
delta_base (from the split reply or locate when the daemon gives them, else
None), generation (the pair's bitmap generation), split_at, state, frozen_at (wall clock at
FIFREEZE), freeze_ms (the FIFREEZE call), window_ms (FIFREEZE start to FITHAW
end: how long writers were blocked), expedited (RCU grace periods were
expedited during FIFREEZE: agents/host/rcu.py; HostState.expedite),
prepare_ms (all of it), resynced (the pairs resynced first, with
`resync`), warnings.

A split that fails after the freeze still thaws (frozen() thaws whatever
the block raises) and raises "split-failed" with the daemon's message.

PrepareError.code, for scripts and the service:
  not-found           the directory does not exist
  not-splitd          the directory is not on an attached splitd volume
  busy                another prepare of this filesystem is running
  bad-config          the attachment's token file or CA cannot be used
  daemon-unreachable  the daemon cannot be reached (or the TLS handshake failed)
  daemon-refused      the daemon refused locate/pair.show (unknown port, no pair,
                      bad token, out of scope)
  pair-error          the volume's pair is in state error
  pair-state          the pair cannot be split from its state (split already and
                      no `resync` asked)
  hook-failed         the pre-freeze hook failed or outlived its timeout
  freeze-failed       FIFREEZE failed (cannot be frozen, already frozen)
  split-failed        the split failed after the freeze (thawed)
  watchdog-thawed     the split outlived the freeze timeout: the watchdog thawed
                      first, so the image is not known to be consistent
  watchdog-failed     the watchdog could not be reached: nothing was frozen
"""
from __future__ import annotations

import time
from fnmatch import fnmatchcase
from typing import Any

from agents.host.attach import Attachments, summary
from agents.host.daemon import ConfigError
from agents.host.freeze import FreezeError, Window, frozen
from agents.host.hooks import HookFailed, run_hook
from agents.host.mounts import NotFound, find_filesystem
from agents.host.state import Busy, HostState
from agents.host.watchdog import WatchdogError
from common.errors import ErrorCode
from common.scopes import Scope, covers
from controller.states import TRANSITIONS  # the pure state table (imports only common/)
from splitctl.client import AdminClient, AdminError

__all__ = ["PrepareError", "prepare"]

_UNREACHABLE = (ErrorCode.UNREACHABLE, ErrorCode.TLS, ErrorCode.PROTOCOL)


class PrepareError(Exception):
    """`code`: see the module docstring; `message`: one line."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = " ".join(message.split())

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def prepare(state: HostState, directory: str, port: str, *, timeout: float = 10.0,
            resync: bool = False) -> dict:
    """Freeze, split, thaw; the answer is described in the module docstring.
    `resync`: a pair in `split` is resynced first (step 3) instead of refused."""
    started = time.perf_counter()
    try:
        fs = find_filesystem(directory)
    except NotFound as e:
        raise PrepareError("not-found", str(e)) from None
    attachments = Attachments(state.state_dir)
    att = attachments.by_devno(fs.devno)
    if att is None:
        raise PrepareError("not-splitd", f"{directory} is on {fs.describe()}, not on a splitd "
                                         f"volume; attached: {summary(attachments.list())}")
    try:
        with state.filesystem_lock(fs.devno):
            try:
                # Its socket timeout bounds every call, the split inside the
                # window too: past it we thaw ourselves, as the watchdog would.
                client = att.admin_client(timeout=timeout)
            except ConfigError as e:
                raise PrepareError("bad-config", f"{att.describe()}: {e}") from None
            with client:
                answer = _prepare(state, client, fs, att, port, timeout, resync)
    except Busy:
        raise PrepareError("busy", f"{fs.mountpoint} is being prepared already: one prepare "
                                   "per filesystem at a time") from None
    answer["prepare_ms"] = _ms(time.perf_counter() - started)
    return answer


def _call(client: AdminClient, method: str, **params) -> Any:
    """A call before the freeze: its failure is one PrepareError."""
    try:
        return client.call(method, **params)
    except AdminError as e:
        raise _call_error(client, method, e) from None


def _call_error(client: AdminClient, method: str, e: AdminError) -> PrepareError:
    code = "daemon-unreachable" if e.code in _UNREACHABLE else "daemon-refused"
    return PrepareError(code, f"{method} at {client.where}: {e.message}")


def _prepare(state: HostState, client: AdminClient, fs, att, port: str,
             timeout: float, resync: bool) -> dict:
    located = _call(client, "locate", name=att.volume, port=port)
    pair = _call(client, "pair.show", name=located["pair"])
    resynced: list[str] = []
    if resync and pair["state"] == "split":
        _check_token(client, pair, pair.get("group"))
        resynced = _resync_split(client, pair)
        pair = _call(client, "pair.show", name=pair["name"])
    if pair["state"] == "error":
        raise PrepareError("pair-error", f"pair {pair['name']} of volume {att.volume} is in "
                                         f"state error: {pair.get('reason') or 'no reason given'}"
                                         f" (splitctl pair resync {pair['name']})")
    if pair["state"] not in TRANSITIONS["split"]:
        allowed = ", ".join(sorted(TRANSITIONS["split"]))
        raise PrepareError("pair-state", f"pair {pair['name']} of volume {att.volume} is in "
                                         f"state {pair['state']}, which cannot be split (from: "
                                         f"{allowed}); nothing was frozen"
                           + (": add --resync (splitctl backup prepare --resync, default in "
                              "backup run) or resync it (splitctl pair resync "
                              f"{pair['name']})" if pair["state"] == "split" else ""))
    group = pair.get("group")
    _check_token(client, pair, group)
    # The daemon's clock, read before the hook (d0, answered by our a1):
    # the split's deadline counts from it (see below).
    daemon_now = _daemon_clock(client)
    read_at = time.monotonic()
    try:
        run_hook(state.hook, "freeze", fs.mountpoint)
    except HookFailed as e:
        raise PrepareError("hook-failed", str(e)) from None
    method, params = (("group.split", {"name": group}) if group
                      else ("pair.split", {"name": pair["name"]}))
    window = Window()
    try:
        watchdog = state.watchdog
        if watchdog is None:
            raise WatchdogError("no watchdog was started")
        if not watchdog.alive:
            watchdog.start()
        # The split's deadline, before the watchdog's (armed after this):
        # `deadline` on our clock, not_after = d0 + (deadline - a1) on the
        # daemon's. d0 came before a1, so not_after passes no later (in real
        # time) than our deadline: the daemon refuses a split arriving after
        # we gave up and thawed (_split_failed), with no need for the two
        # hosts' clocks to agree (only to run at the same rate).
        deadline = time.monotonic() + _allowance(timeout)
        if daemon_now is not None:
            params["not_after"] = daemon_now + (deadline - read_at)
        with frozen(fs.mountpoint, watchdog, timeout,
                    expedite=state.state_dir if state.expedite else None) as window:
            try:
                split = client.call_before(deadline, method, **params)
            except AdminError as e:
                raise _split_failed(client, e, method, params, deadline,
                                    known=e.code not in _UNKNOWN_OUTCOME) from None
    except FreezeError as e:
        _thaw_hook_quietly(state, fs.mountpoint)
        raise PrepareError("freeze-failed", e.message) from None
    except WatchdogError as e:
        _thaw_hook_quietly(state, fs.mountpoint)
        if not window.frozen:
            raise PrepareError("watchdog-failed", f"nothing was frozen: {e}") from None
        after = ("thawed" if window.thawed else "NOT thawed: run splitd-host thaw-all, or "
                 f"fsfreeze -u {fs.mountpoint}")
        raise PrepareError("watchdog-failed", f"lost the watchdog during the freeze of "
                                              f"{fs.mountpoint} ({e}); {after}") from None
    except PrepareError as e:
        _thaw_hook_quietly(state, fs.mountpoint)
        if isinstance(e, SplitFailed) and not e.known:
            e.message += _split_anyway(att, pair, guarded="not_after" in params)
        if _watchdog_thawed(window):
            raise PrepareError("watchdog-thawed", _late(fs, timeout) + f" ({e.message})") from None
        raise
    if _watchdog_thawed(window):
        _thaw_hook_quietly(state, fs.mountpoint)
        raise PrepareError("watchdog-thawed", _late(fs, timeout))
    warnings = []
    try:
        run_hook(state.hook, "thaw", fs.mountpoint)
    except HookFailed as e:
        warnings.append(str(e))
    mine = split
    if group:
        mine = next((p for p in split.get("pairs", []) if p.get("name") == pair["name"]), {})
    after = _call(client, "locate", name=pair["name"], port=port)
    return {
        "uri": after["uri"], "uris": after.get("uris", [after["uri"]]), "port": after["port"],
        "tls": after.get("tls"), "pair": pair["name"], "group": group, "volume": att.volume,
        "directory": fs.directory, "mountpoint": fs.mountpoint, "device": att.device,
        # split_gen counts a pair's splits, delta_base the split its delta
        # is against; a daemon without them gives None (not `generation`,
        # the pair's bitmap generation, which is another count).
        "split_gen": mine.get("split_gen", after.get("split_gen")),
        "generation": after.get("generation"),
        "delta_base": mine.get("delta_base", after.get("delta_base")),
        "split_at": after.get("split_at", mine.get("split_at")),
        "state": after.get("state"),
        # When the pair was made: a pair made again counts splits from 0, and
        # the backup agent must not chain onto the old pair's snapshots.
        "created": after.get("created"),
        "frozen_at": window.frozen_at,
        "freeze_ms": round(window.freeze_ms, 1), "window_ms": round(window.window_ms, 1),
        "expedited": window.expedited,
        "resynced": resynced,
        "warnings": warnings,
    }


def _resync_split(client: AdminClient, pair: dict) -> list[str]:
    """Before the hook and the freeze: resync the pair, or every member of
    its group, that is in `split` (members in another state are left for
    the split to take or refuse). The names resynced."""
    group = pair.get("group")
    if group:
        members = [p for p in _call(client, "pair.list")["pairs"] if p.get("group") == group]
    else:
        members = [pair]
    names = [p["name"] for p in members if p.get("state") == "split"]
    for name in names:
        _call(client, "pair.resync", name=name)
    return names


# A failed split call whose outcome we do not know: no answer in time, or
# the connection broke after the request may have been sent.
_UNKNOWN_OUTCOME = (ErrorCode.TIMEOUT, ErrorCode.PROTOCOL)
# After the thaw, whether the pair was split all the same: one short look.
CHECK_TIMEOUT = 2.0


class SplitFailed(PrepareError):
    """split-failed; `known`: the daemon answered (nothing was split)."""

    def __init__(self, message: str, known: bool):
        super().__init__("split-failed", message)
        self.known = known


def _allowance(timeout: float) -> float:
    """How long the split may take: short of the watchdog's timeout, so that
    we give up, abort and thaw before it fires."""
    return max(timeout - 0.5, timeout / 2)


def _daemon_clock(client: AdminClient) -> float | None:
    """The daemon's monotonic clock (the `clock` call), or None from a
    daemon without it (then only the aborted connection guards the split)."""
    try:
        return float(client.call("clock")["monotonic"])
    except AdminError as e:
        if e.code == ErrorCode.UNKNOWN_METHOD:
            return None
        raise _call_error(client, "clock", e) from None
    except (KeyError, TypeError, ValueError):
        raise PrepareError("daemon-refused", f"clock at {client.where}: the reply has no "
                                             "monotonic time; nothing was frozen") from None


def _split_failed(client: AdminClient, e: AdminError, method: str, params: dict,
                  deadline: float, known: bool) -> SplitFailed:
    """Inside the frozen window. An answered failure is thawed at once. An
    unknown outcome: the connection is aborted (call() did: the kernel
    drops the request it still held, the daemon gets an RST), and with a
    daemon-side deadline we stay frozen until it has passed, so that no
    copy of the request still in the network can split after the thaw."""
    if not known:
        client.abort()
        if "not_after" in params:
            time.sleep(max(0.0, deadline - time.monotonic()))
    return SplitFailed(f"{method} {params['name']} failed after the freeze (thawed): "
                       f"{e.message}", known)


def _split_anyway(att, pair: dict, guarded: bool) -> str:
    """After the thaw, best effort: was the pair split all the same? A
    phrase for the error message ("" if not, or if we cannot tell)."""
    try:
        with att.admin_client(timeout=CHECK_TIMEOUT) as check:
            now = check.call("pair.show", name=pair["name"])
    except (AdminError, ConfigError):
        return "; whether the pair was split all the same is not known (the daemon did not answer)"
    if now.get("split_at") == pair.get("split_at"):
        return ""
    if guarded:
        return ("; the pair was split all the same, before the split's deadline (so while "
                "frozen: its image is consistent), but the answer was lost: resync it "
                f"(splitctl pair resync {pair['name']}) and prepare again")
    return ("; the pair was split after the thaw anyway: its image is NOT consistent, "
            f"resync it (splitctl pair resync {pair['name']})")


def _watchdog_thawed(window: Window) -> bool:
    return bool(window.watchdog_fired and window.watchdog_fired.get("result") == "thawed")


def _late(fs, timeout: float) -> str:
    return (f"the split took longer than the freeze timeout ({timeout:g} s): the watchdog "
            f"thawed {fs.mountpoint} first, so the split image is not known to be consistent")


def _check_token(client: AdminClient, pair: dict, group: str | None) -> None:
    """A remote daemon said at auth what the token may do (scope, volumes
    glob; common/scopes.py): a split it would refuse is refused here, before
    the freeze. (The daemon checks again; a group's other pairs only there.)"""
    identity = getattr(client, "identity", None)
    if not isinstance(identity, dict) or "scope" not in identity:
        return
    name, scope = identity.get("token"), str(identity["scope"])
    try:
        allowed = covers(scope, Scope.SPLIT)
    except ValueError:
        return      # a scope newer than us: let the daemon decide
    if not allowed:
        raise PrepareError("daemon-refused", f"token {name} of {client.where} has scope {scope}: "
                           "a split needs scope split or admin; nothing was frozen")
    glob = identity.get("volumes") or "*"
    outside = [v for v in (pair["primary"], pair["secondary"]) if not fnmatchcase(v, glob)]
    if scope == Scope.SPLIT and outside:
        raise PrepareError("daemon-refused", f"token {name} of {client.where} may split only "
                           f"pairs of volumes matching {glob!r}; pair {pair['name']} has volume "
                           f"{outside[0]}; nothing was frozen")


def _thaw_hook_quietly(state: HostState, mountpoint: str) -> None:
    """After a failure past the pre-freeze hook, the application it paused
    is let go all the same."""
    try:
        run_hook(state.hook, "thaw", mountpoint)
    except HookFailed:
        pass
