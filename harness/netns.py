"""Network namespaces joined by veth pairs, for tests and benchmarks that need
several hosts: the storage host, the application host, the backup host.

    with Namespaces(["storage", "app", "backup"],
                    [("storage", "app"), ("storage", "backup"), ("app", "backup")]) as net:
        net.addr("storage", "backup")       # storage's address on its link to backup
        net.ifname("storage", "backup")     # the interface in storage facing backup
        net.run("backup", ["nbdinfo", uri])                  # CompletedProcess
        proc = net.popen("app", ["splitd-host", "serve", ...])   # stopped by close()

Each namespace is a real one, /run/netns/NAME with a name unique to this run
(`splitd-TAG-storage`); every link is a veth pair with a /29 of its own out of
10.77.X.0/24, X drawn per run, the first-named end at .1, the other at .2, so
three links hold 10.77.X.0/29, .8/29 and .16/29 (a /29 leaves room for a second
address: add_address). Loopback is up everywhere, IPv6 is off (an IPv4 address
is bound at once, a link-local IPv6 one only after duplicate address
detection), and nothing is routed between links: a namespace reaches only the
other end of its own links.

Processes run in a namespace through `nsenter --net=/run/netns/NAME`, which
enters the network namespace only. `ip netns exec` would also unshare the mount
namespace (to bind /etc/netns/NAME files), hiding from the test the FUSE and
loop mounts made inside. nsenter execs the command, so a Popen's pid is the
command's own.

close() (also on leaving the `with`, and from a finalizer) stops every process
started through popen() (SIGTERM to its process group, SIGKILL after a grace
time), then any process still inside one of the namespaces (all of them ours:
nobody else knows these names), and removes the namespaces, which takes their
veths with them. It never raises; what it could not undo is returned.

unavailable() says why namespaces cannot be made here (not root, no nsenter,
no pyroute2), for a clean skip.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.procs import stop_process

NETNS_DIR = Path("/run/netns")
PREFIX_LEN = 29


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("nsenter") is None:
        return "nsenter is not installed (util-linux)"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "pyroute2 is not installed"
    return None


class NetnsError(RuntimeError):
    pass


def _pyroute2():
    """pyroute2, set up for a caller with signal handlers of its own.

    IPRoute(netns=...) and netns.create() fork a child to enter the
    namespace, and stop it with SIGTERM. A child that kept a handler that
    raises (bench/benchkit.py turns SIGTERM into KeyboardInterrupt) would
    unwind through a copy of the caller's stack and run its clean-up:
    removing the very namespaces and directories the parent is using.
    disable_mp_signal makes the children take SIGTERM's default action."""
    import pyroute2
    from pyroute2 import config

    config.disable_mp_signal = True
    return pyroute2


def _index(ipr, ifname: str, timeout: float = 5.0) -> int:
    """The index of interface `ifname`. A veth's peer made in another
    namespace can take a moment to show there: looked up until it does."""
    deadline = time.monotonic() + timeout
    while True:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise NetnsError(f"no interface {ifname} after {timeout:g} s")
        time.sleep(0.01)


class Namespaces:
    """Namespaces named `names` (short names; the real ones are unique per
    run), and one veth pair per (a, b) in `links`."""

    def __init__(self, names: Sequence[str], links: Sequence[tuple[str, str]]):
        if len(set(names)) != len(names):
            raise NetnsError(f"namespace names repeat: {names}")
        if len(links) > 32:
            raise NetnsError("at most 32 links (a /29 each out of a /24)")
        for a, b in links:
            if a not in names or b not in names or a == b:
                raise NetnsError(f"link {a}-{b}: both ends must be two of {names}")
        self.tag = uuid.uuid4().hex[:6]
        self.names = list(names)
        self.links = list(links)
        self.subnet = random.randrange(1, 255)      # X in 10.77.X.0/24
        self.full = {n: f"splitd-{self.tag}-{n}" for n in self.names}
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []

    # -- names and addresses ------------------------------------------------------------

    def path(self, ns: str) -> Path:
        return NETNS_DIR / self.full[ns]

    def _link(self, a: str, b: str) -> tuple[int, bool]:
        """(index of the link between a and b, whether a is its first end)."""
        for i, (x, y) in enumerate(self.links):
            if (x, y) == (a, b):
                return i, True
            if (x, y) == (b, a):
                return i, False
        raise NetnsError(f"no link between {a} and {b}")

    def ifname(self, ns: str, peer: str) -> str:
        """The interface in `ns` facing `peer` (at most 15 characters)."""
        i, _ = self._link(ns, peer)
        return f"v{self.tag}-{i}{ns[0]}{peer[0]}"[:15]

    def addr(self, ns: str, peer: str, host: int | None = None) -> str:
        """`ns`'s address on its link to `peer` (host: another one of that /29)."""
        i, first = self._link(ns, peer)
        if host is None:
            host = 1 if first else 2
        if not 0 < host < 7:
            raise NetnsError(f"host {host} is not in a /29")
        return f"10.77.{self.subnet}.{8 * i + host}"

    # -- set-up -------------------------------------------------------------------------

    def create(self) -> Namespaces:
        IPRoute, netns = _pyroute2().IPRoute, _pyroute2().netns

        try:
            for n in self.names:
                netns.create(self.full[n])
                self._made.append(n)
                # Before any veth arrives: "default" is what new interfaces get.
                self.run(n, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                             "net.ipv6.conf.default.disable_ipv6=1"], check=True)
                with IPRoute(netns=self.full[n]) as ipr:
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for a, b in self.links:
                with IPRoute(netns=self.full[a]) as ipr:
                    ipr.link("add", ifname=self.ifname(a, b), kind="veth",
                             peer={"ifname": self.ifname(b, a), "net_ns_fd": self.full[b]})
                for x, y in ((a, b), (b, a)):
                    with IPRoute(netns=self.full[x]) as ipr:
                        idx = _index(ipr, self.ifname(x, y))
                        ipr.addr("add", index=idx, address=self.addr(x, y), prefixlen=PREFIX_LEN)
                        ipr.link("set", index=idx, state="up")
            self._wait_carrier()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_carrier(self, timeout: float = 10.0) -> None:
        """Until every veth is operationally up (it comes up a moment after
        both ends are set up; a packet sent before then is dropped)."""
        IPRoute = _pyroute2().IPRoute
        deadline = time.monotonic() + timeout
        for a, b in self.links:
            for x, y in ((a, b), (b, a)):
                with IPRoute(netns=self.full[x]) as ipr:
                    while True:
                        [link] = ipr.get_links(ifname=self.ifname(x, y))
                        if link.get_attr("IFLA_OPERSTATE") == "UP":
                            break
                        if time.monotonic() > deadline:
                            raise NetnsError(f"{self.ifname(x, y)} in {x} did not come up")
                        time.sleep(0.01)

    def add_address(self, ns: str, peer: str, host: int) -> str:
        """Another address of `ns` on its link to `peer`; returned."""
        return self._address("add", ns, peer, host)

    def del_address(self, ns: str, peer: str, host: int) -> str:
        return self._address("del", ns, peer, host)

    def _address(self, op: str, ns: str, peer: str, host: int) -> str:
        IPRoute = _pyroute2().IPRoute
        address = self.addr(ns, peer, host)
        with IPRoute(netns=self.full[ns]) as ipr:
            idx = _index(ipr, self.ifname(ns, peer))
            ipr.addr(op, index=idx, address=address, prefixlen=PREFIX_LEN)
        return address

    def addresses(self, ns: str, peer: str) -> list[str]:
        """The IPv4 addresses of `ns` on its link to `peer`."""
        IPRoute = _pyroute2().IPRoute
        with IPRoute(netns=self.full[ns]) as ipr:
            idx = _index(ipr, self.ifname(ns, peer))
            return [m.get_attr("IFA_ADDRESS") for m in ipr.get_addr(index=idx)]

    def flush_neighbours(self, ns: str) -> None:
        """Forget the link-layer addresses `ns` has learnt (ARP): the next
        packet to an address that went away fails at once instead of after
        the neighbour entry goes stale."""
        self.run(ns, ["ip", "neigh", "flush", "all"], check=True)

    def __enter__(self) -> Namespaces:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes ----------------------------------------------------------------------

    def cmd(self, ns: str, args: Sequence[str]) -> list[str]:
        """`args` as a command run in namespace `ns`."""
        return ["nsenter", f"--net={self.path(ns)}", "--", *map(str, args)]

    def run(self, ns: str, args: Sequence[str], *, check: bool = False, timeout: float = 60,
            **kw: Any) -> subprocess.CompletedProcess:
        """Run `args` in `ns` to the end; stdout and stderr captured as text
        unless told otherwise. check: raise NetnsError (with both) on failure."""
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        cp = subprocess.run(self.cmd(ns, args), timeout=timeout, **kw)
        if check and cp.returncode != 0:
            raise NetnsError(f"{' '.join(map(str, args))} in {ns} exited {cp.returncode}:\n"
                             f"{cp.stdout or ''}{cp.stderr or ''}")
        return cp

    def popen(self, ns: str, args: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start `args` in `ns`, in a session of its own; close() stops it."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.cmd(ns, args), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0,
             sig: int = signal.SIGTERM) -> int:
        """Stop one process popen() started (and whatever is left in its
        process group); its exit status."""
        rc = stop_process(proc, timeout, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)
        return rc

    def pids(self, ns: str) -> list[int]:
        """Every process whose network namespace is `ns`."""
        try:
            inode = os.stat(self.path(ns)).st_ino
        except FileNotFoundError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                    found.append(int(entry))
        return found

    # -- clean-up -----------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every process, remove every namespace. Never raises; returns
        what was left behind (empty when all went)."""
        netns = _pyroute2().netns
        left: list[str] = []
        for proc in list(self.procs):
            try:
                self.stop(proc, timeout=5)
            except Exception as e:
                left.append(f"pid {proc.pid}: {e}")
        for n in self._made:
            strays = self.pids(n)
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while strays and time.monotonic() < deadline:
                strays = [p for p in strays if os.path.exists(f"/proc/{p}")]
                for p in strays:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(p, os.WNOHANG)
                time.sleep(0.02)
            if strays:
                left.append(f"{self.full[n]}: processes {strays} would not die")
            try:
                netns.remove(self.full[n])
            except Exception as e:
                left.append(f"{self.full[n]}: {e}")
        self._made.clear()
        return left
