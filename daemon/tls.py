"""TLS for NBD listeners: an X.509 server context (proto.md "TLS support")."""
from __future__ import annotations

import ssl


class TLSConfigError(Exception):
    pass


def server_context(cert: str, key: str, ca: str | None = None,
                   verify_peer: bool = False) -> ssl.SSLContext:
    """A server context from PEM files. With verify_peer, clients must present
    a certificate signed by `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TLSConfigError(f"cannot load TLS certificate {cert} / key {key}: {e}") from None
    if ca:
        try:
            ctx.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(f"cannot load TLS CA {ca}: {e}") from None
    if verify_peer:
        if not ca:
            raise TLSConfigError("--tls-verify-peer needs --tls-ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
