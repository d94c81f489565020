"""Listen addresses ("ports" in DESIGN.md): parsing, interface lookup, binding.

A listen spec is `[NAME=]URI` where URI is one of
    unix:/path/to/socket
    tcp://ADDRESS:PORT        (IPv6 as tcp://[::1]:PORT)
    tcp://%IFACE:PORT         (every address of a network interface, via pyroute2)
and a TCP one may end in `?tls=off|on|require`: that port's own TLS mode,
instead of the daemon's (--tls). So a storage host can serve its application
network in plaintext and require TLS on its backup network: libnbd clients
such as nbdfuse cannot be given a private CA for nbds:// (a URI's
tls-certificates= is local file access, which nbdfuse does not allow).

Every listener has a name, and that name is a *port*: the host agent asks for
an export "as reached through" a port (`locate`, controller/ports.py). NAME
follows the volume name rules. A listener given without one is named after
its kind, counting only the unnamed ones: the first unix listener is `unix`,
the second `unix-2`, the first TCP one `tcp`, and so on; so adding a named
listener never renames another. Names are unique (parse_listeners).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.names import NAME_PATTERN

log = logging.getLogger("splitd.listen")


class ListenSpecError(ValueError):
    pass


class BindError(Exception):
    """A listener could not be bound (address in use, permission, ...): one line."""


@dataclass
class Listener:
    name: str
    uri: str
    kind: str                       # "unix" or "tcp"
    path: str = ""                  # unix
    host: str = ""                  # tcp: address, or "%iface"
    port: int = 0
    tls_mode: str | None = None     # tcp: ?tls=MODE of the spec, None: the daemon's --tls
    tls_required: bool = False
    tls: str = "off"                # what this port does: off, on (STARTTLS offered), require
    bound: list[str] = field(default_factory=list)   # what we actually bound
    servers: list = field(default_factory=list)
    owned: list = field(default_factory=list)        # unix: (path, dev, ino) we bound

    def apply_tls(self, daemon_mode: str) -> None:
        """Set what this port does from its own mode (TCP) or the daemon's.
        A Unix socket never requires TLS; it offers STARTTLS when the daemon
        has TLS on (--tls on or require)."""
        mode = self.tls_mode or daemon_mode
        self.tls_required = mode == "require" and self.kind == "tcp"
        self.tls = "require" if self.tls_required else "on" if mode != "off" else "off"

    def as_dict(self) -> dict:
        return {"name": self.name, "uri": self.uri, "kind": self.kind, "tls": self.tls,
                "tls_required": self.tls_required, "bound": list(self.bound)}


_PORT_NAME_RE = re.compile(NAME_PATTERN)


def parse_listeners(specs: Sequence[str]) -> list[Listener]:
    """Every listener of a configuration, each named (explicitly, or after its
    kind: see the module docstring). Two listeners with one name are refused."""
    listeners = [parse_listen(spec) for spec in specs]
    explicit = {lst.name for lst in listeners if lst.name}
    counts: dict[str, int] = {}
    by_name: dict[str, str] = {}
    for spec, lst in zip(specs, listeners, strict=True):
        if not lst.name:
            counts[lst.kind] = n = counts.get(lst.kind, 0) + 1
            lst.name = lst.kind if n == 1 else f"{lst.kind}-{n}"
            if lst.name in explicit:
                raise ListenSpecError(
                    f"port name {lst.name!r} is given twice: {spec!r} has it by default and "
                    f"another listener by name; give {spec!r} a name of its own (NAME=URI)")
        if lst.name in by_name:
            raise ListenSpecError(f"port name {lst.name!r} is given twice ({by_name[lst.name]!r} "
                                  f"and {spec!r}): every listener needs a name of its own")
        by_name[lst.name] = spec
    return listeners


def parse_listen(spec: str) -> Listener:
    """One `[NAME=]URI` spec, checked. An unnamed listener's name is "" here:
    parse_listeners() names it."""
    name, sep, uri = spec.partition("=")
    if not sep or "://" in name or name.startswith("unix:"):
        name, uri = "", spec
    elif not _PORT_NAME_RE.fullmatch(name):
        raise ListenSpecError(f"invalid port name {name!r} in {spec!r}: use 1 to 64 letters, "
                              "digits, '.', '_' or '-', starting with a letter or digit")
    if uri.startswith("unix:"):
        path = uri[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ListenSpecError(f"{spec!r}: unix listener needs a path (unix:/run/splitd/nbd.sock)")
        path = os.path.abspath(path)
        return Listener(name, f"unix:{path}", "unix", path=path)
    if uri.startswith("tcp://"):
        rest, question, query = uri[len("tcp://"):].partition("?")
        tls_mode = _tls_query(spec, query) if question else None
        rest = rest.rstrip("/")
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            host, port_text = rest, "10809"
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_text)
        except ValueError:
            raise ListenSpecError(f"{spec!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ListenSpecError(f"{spec!r}: port {port} is out of range")
        if not host:
            raise ListenSpecError(f"{spec!r}: give an address or %interface (tcp://0.0.0.0:10809)")
        if not host.startswith("%"):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                if host != "localhost":
                    raise ListenSpecError(f"{spec!r}: {host!r} is not an IP address "
                                          "(use %NAME for a network interface)") from None
        return Listener(name, uri, "tcp", host=host, port=port, tls_mode=tls_mode)
    raise ListenSpecError(f"{spec!r}: a listen URI is unix:/path, tcp://ADDR:PORT or tcp://%IFACE:PORT")


TLS_MODES = ("off", "on", "require")


def _tls_query(spec: str, query: str) -> str:
    """The mode of a `?tls=MODE` query, the only one a listen URI takes."""
    key, _, mode = query.partition("=")
    if key != "tls" or mode not in TLS_MODES:
        raise ListenSpecError(f"{spec!r}: a TCP listen URI takes only ?tls=off, ?tls=on or "
                              "?tls=require (this port's TLS mode)")
    return mode


def interface_addresses(ifname: str) -> list[str]:
    """Every IPv4/IPv6 address of a network interface, looked up over netlink."""
    from pyroute2 import IPRoute  # imported here: only %IFACE listeners need it

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise ListenSpecError(f"no network interface named {ifname!r}")
        addrs = []
        for msg in ipr.get_addr(index=idx[0]):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                # Link-local IPv6 needs a scope id to bind.
                if msg["family"] == socket.AF_INET6 and addr.startswith("fe80:"):
                    addr = f"{addr}%{ifname}"
                addrs.append(addr)
    if not addrs:
        raise ListenSpecError(f"network interface {ifname!r} has no address")
    return addrs


async def bind(listener: Listener, protocol_factory) -> None:
    """Bind every socket of `listener`. Failures raise BindError, with the URI."""
    loop = asyncio.get_running_loop()
    if listener.kind == "unix":
        path = listener.path
        sock, owned = bind_unix(path, listener.uri)
        listener.owned.append(owned)
        try:
            server = await loop.create_unix_server(protocol_factory, sock=sock, backlog=128)
        except BaseException:
            sock.close()
            raise
        listener.servers.append(server)
        listener.bound.append(path)
        return
    if listener.host.startswith("%"):
        # pyroute2's synchronous API runs an event loop of its own: not on ours.
        hosts = await loop.run_in_executor(None, interface_addresses, listener.host[1:])
    else:
        hosts = [listener.host]
    for host in hosts:
        try:
            server = await loop.create_server(protocol_factory, host, listener.port,
                                              reuse_address=True, backlog=128)
        except OSError as e:
            where = f"[{host}]" if ":" in host else host
            raise BindError(f"cannot listen on tcp://{where}:{listener.port}: "
                            f"{os_reason(e)}") from None
        for sock in server.sockets:
            addr = sock.getsockname()
            h = addr[0]
            listener.bound.append(f"[{h}]:{addr[1]}" if ":" in h else f"{h}:{addr[1]}")
        listener.servers.append(server)


def os_reason(e: OSError) -> str:
    """An OSError in words, without the errno number: "address already in use"."""
    if not e.errno:
        return str(e)   # e.g. "AF_UNIX path too long": keep its capitals
    text = os.strerror(e.errno)
    return text[:1].lower() + text[1:]


def bind_unix(path: str, what: str) -> tuple[socket.socket, tuple[str, int, int]]:
    """A Unix stream socket bound at `path` with mode 0660, not yet listening,
    and its owned_path() record for unlink_owned(). A failed bind raises
    BindError naming `what` ("cannot listen on WHAT: address already in use").

    A stale socket at the path is removed first; a live one, or anything that
    is not a socket, is refused (remove_stale_socket). The socket is bound
    here rather than by create_unix_server(path), which would remove whatever
    socket is at the path: if another process got there since the check,
    bind() fails instead of taking its path. The directory is not created.
    """
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {what}: {os_reason(e)}") from None
    except BaseException:
        sock.close()
        raise
    try:
        owned = owned_path(path)
        os.chmod(path, 0o660)   # before listen(): nobody connects with the wrong mode
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    return sock, owned


def owned_path(path: str) -> tuple[str, int, int]:
    """(path, device, inode) of a socket this process just bound at `path`."""
    st = os.lstat(path)
    return path, st.st_dev, st.st_ino


def unlink_owned(owned: tuple[str, int, int]) -> None:
    """Remove a socket this process bound, if the path still holds that very
    socket: never one that another process has put there since."""
    path, dev, ino = owned
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) != (dev, ino):
        log.warning("not removing %s: it is no longer the socket this process made", path)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_stale_socket(path: str) -> None:
    """Remove a Unix socket left by an earlier, unclean stop; refuse anything
    else (a regular file, or a socket somebody still listens on)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not removing it")
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover from an unclean stop
            return
    raise FileExistsError(f"{path}: another process is listening there")


async def close_all(listeners: list[Listener]) -> None:
    for listener in listeners:
        for server in listener.servers:
            server.close()
    for listener in listeners:
        for server in listener.servers:
            await server.wait_closed()
        # Only the paths this process bound: a failed start must never take
        # away the socket of the daemon that holds the path.
        for owned in listener.owned:
            unlink_owned(owned)
        listener.owned.clear()
