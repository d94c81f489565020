"""Ports (named listeners) as the admin API shows them, and the NBD URI of an
export as reached through one of them (DESIGN.md "Listeners and ports").

Rule of this module: pure functions over the listener records of `status`
(daemon/listeners.Listener.as_dict: name, uri, kind, tls, bound), so what
`port.list` shows and what `locate` answers come from the same facts, and
neither needs a socket to be tested. Which pair a name means is the admin
method's business (controller/service.py); this module only spells URIs.

URIs follow the NBD URI specification (NBD's doc/uri.md), as libnbd and
qemu read them:
    nbd+unix:///EXPORT?socket=PATH     a Unix socket
    nbd://ADDR:PORT/EXPORT             TCP
    nbds://ADDR:PORT/EXPORT            TCP where the port requires TLS
An IPv6 address goes in brackets, with its zone (link-local) as %25ZONE.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from common.errors import Conflict, NotFound

Listener = Mapping[str, Any]


def port_list(listeners: Sequence[Listener]) -> list[dict[str, Any]]:
    """What `port.list` shows of each listener: name, URI, kind, TLS mode, and
    the addresses (or socket path) it is bound to."""
    return [{"name": lst["name"], "uri": lst["uri"], "kind": lst["kind"],
             "tls": lst.get("tls", "off"), "bound": list(lst.get("bound") or [])}
            for lst in listeners]


def find_port(listeners: Sequence[Listener], name: str) -> Listener:
    for lst in listeners:
        if lst["name"] == name:
            return lst
    known = ", ".join(repr(lst["name"]) for lst in listeners) or "none"
    raise NotFound(f"no port named {name!r} (the ports are: {known}; see splitctl port list)")


def export_uris(port: Listener, export: str) -> list[str]:
    """Every NBD URI that reaches `export` through `port`, the one to use
    first: a Unix socket has one; a TCP port one per bound address, with
    link-local IPv6 addresses last (they need the zone and a shared link).
    A port bound to a wildcard address (0.0.0.0, ::) cannot say which of
    the host's addresses a client would reach it by, and is refused."""
    if port["kind"] == "unix":
        path = port["bound"][0] if port.get("bound") else port["uri"][len("unix:"):]
        return [f"nbd+unix:///{export}?socket={quote(path, safe='/')}"]
    scheme = "nbds" if port.get("tls") == "require" else "nbd"
    addresses = [_split(b) for b in port.get("bound") or []]
    usable = [(host, p) for host, p in addresses if not _wildcard(host)]
    if not usable:
        raise Conflict(f"port {port['name']!r} listens on every address of the host "
                       f"({port['uri']}), so it has no one address to give a client; "
                       "listen on an address or an interface (NAME=tcp://%IFACE:PORT) to "
                       "locate exports through it")
    usable.sort(key=lambda a: _link_local(a[0]))
    return [f"{scheme}://{_uri_host(host)}:{p}/{export}" for host, p in usable]


def _split(bound: str) -> tuple[str, int]:
    """"10.0.0.1:10809" or "[fe80::1%eth1]:10809" (as bind() records them)."""
    host, _, port = bound.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None     # "localhost"


def _wildcard(host: str) -> bool:
    addr = _address(host)
    return addr is not None and addr.is_unspecified


def _link_local(host: str) -> bool:
    addr = _address(host)
    return addr is not None and addr.is_link_local


def _uri_host(host: str) -> str:
    if ":" not in host:
        return host
    address, percent, zone = host.partition("%")
    # RFC 6874: the zone's "%" is written "%25" inside the brackets.
    return f"[{address}%25{quote(zone, safe='')}]" if percent else f"[{address}]"
