"""NBD URIs, parsed as libnbd's nbd_connect_uri(3) parses them, and the TLS
context they ask for.

    nbd://HOST[:PORT]/EXPORT             TCP, no TLS (port 10809 by default)
    nbds://HOST[:PORT]/EXPORT            TCP, TLS required
    nbd+unix:///EXPORT?socket=PATH       Unix socket, no TLS
    nbds+unix:///EXPORT?socket=PATH      Unix socket, TLS required

The export name is the path without its leading "/", percent-decoded
(NetworkBlockDevice/nbd doc/uri.md, "NBD URI export name"). Query parameters,
as libnbd names them:

    socket=PATH               the Unix socket (required for +unix, refused otherwise)
    tls-certificates=DIR      a directory laid out as libnbd / GnuTLS want it:
                              ca-cert.pem, and client-cert.pem + client-key.pem
                              for a client certificate (each optional)
    tls-verify-peer=false     do not check the server's certificate
    tls-hostname=NAME         the name to check the server's certificate against
                              (default: the URI's host; none on a Unix socket)

A parameter we do not know is refused rather than ignored: a URI that asks
for something (tls-psk-file=, say) must not silently get something else.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["DEFAULT_PORT", "Target", "parse_uri", "tls_context"]

DEFAULT_PORT = 10809        # IANA's port for NBD
SCHEMES = {"nbd": (False, False), "nbds": (True, False),
           "nbd+unix": (False, True), "nbds+unix": (True, True)}   # (tls, unix)
FALSE, TRUE = ("false", "off", "no", "0"), ("true", "on", "yes", "1")


@dataclass(frozen=True)
class Target:
    """Where to connect and how, from a URI (or built by hand)."""
    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    tls: bool = False
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_hostname: str | None = None

    def where(self) -> str:
        """For messages: the export and the address."""
        place = f"unix:{self.socket}" if self.socket else f"{self.host}:{self.port}"
        return f"export {self.export!r} at {place}"


def parse_uri(uri: str) -> Target:
    """A Target from an NBD URI; ValueError (naming what is wrong) otherwise."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported NBD URI scheme {parts.scheme!r} in {uri!r} "
                         f"(expected one of {', '.join(SCHEMES)})")
    tls, unix = SCHEMES[scheme]
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key in query:
            raise ValueError(f"query parameter {key!r} given twice in {uri!r}")
        query[key] = value
    socket_path = query.pop("socket", None)
    certs = query.pop("tls-certificates", None)
    verify = query.pop("tls-verify-peer", "true").lower()
    if verify not in FALSE + TRUE:
        raise ValueError(f"tls-verify-peer={verify!r} in {uri!r}: expected true or false")
    hostname = query.pop("tls-hostname", None)
    if query:
        raise ValueError(f"unsupported NBD URI parameter {sorted(query)[0]!r} in {uri!r}")
    if not tls and (certs or hostname):
        raise ValueError(f"TLS parameters in {uri!r}, whose scheme {scheme}: is without TLS "
                         f"(use {scheme.replace('nbd', 'nbds', 1)}:)")
    if unix:
        if not socket_path:
            raise ValueError(f"{uri!r}: {scheme}: needs ?socket=PATH")
        if parts.netloc.rpartition("@")[2]:
            raise ValueError(f"{uri!r}: {scheme}: takes no host (the socket names the server)")
        return Target(export, socket=socket_path, tls=tls, tls_certificates=certs,
                      tls_verify_peer=verify in TRUE, tls_hostname=hostname)
    if socket_path is not None:
        raise ValueError(f"{uri!r}: socket= is only for nbd+unix: and nbds+unix:")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{uri!r}: bad port: {e}") from None
    host = parts.hostname or "localhost"
    return Target(export, host=host, port=port or DEFAULT_PORT, tls=tls, tls_certificates=certs,
                  tls_verify_peer=verify in TRUE, tls_hostname=hostname)


def tls_context(target: Target, *, ca_file: str | None = None, ca_dir: str | None = None,
                cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The client's TLS context: X.509, TLS 1.2 or later. The CA comes from
    ca_file / ca_dir, else the URI's tls-certificates directory, else the
    system's trust store; a client certificate from cert/key, else the
    directory's client-cert.pem and client-key.pem when both are there."""
    certs = target.tls_certificates
    if certs is not None and not os.path.isdir(certs):
        raise ValueError(f"tls-certificates={certs}: not a directory")
    if ca_file is None and ca_dir is None and certs is not None:
        candidate = os.path.join(certs, "ca-cert.pem")
        if os.path.exists(candidate):
            ca_file = candidate
    ctx = ssl.create_default_context(cafile=ca_file, capath=ca_dir)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is None and certs is not None:
        c, k = os.path.join(certs, "client-cert.pem"), os.path.join(certs, "client-key.pem")
        if os.path.exists(c) and os.path.exists(k):
            cert, key = c, k
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    if not target.tls_verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif server_hostname(target) is None:
        # A Unix socket has no host name to check; the chain still is.
        ctx.check_hostname = False
    return ctx


def server_hostname(target: Target) -> str | None:
    return target.tls_hostname or (None if target.socket else target.host)
