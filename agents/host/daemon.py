"""The admin client for a splitd daemon as an attachment names it: a Unix
socket path (full local rights) or tcp://HOST:PORT (TLS and a bearer token
from a file), through splitctl's client library."""
from __future__ import annotations

from splitctl.client import AdminClient, RemoteAdminClient

__all__ = ["admin_client", "ConfigError"]

MAX_TOKEN = 4096


class ConfigError(ValueError):
    """The endpoint, token file or CA cannot be used (nothing was sent)."""


def admin_client(endpoint: str, token_file: str | None = None, tls_ca: str | None = None,
                 timeout: float = 60.0) -> AdminClient:
    if not endpoint.startswith("tcp://"):
        if token_file or tls_ca:
            raise ConfigError(f"a token file and a TLS CA go with a tcp:// daemon, not the "
                              f"Unix socket {endpoint}")
        return AdminClient(endpoint, timeout=timeout)
    if not token_file:
        raise ConfigError(f"the daemon {endpoint} needs a token: --token-file FILE")
    try:
        with open(token_file) as f:
            secret = f.read(MAX_TOKEN)
    except OSError as e:
        raise ConfigError(f"cannot read the token file {token_file}: {e.strerror or e}") from None
    try:
        return RemoteAdminClient(endpoint, secret, tls_ca, timeout=timeout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
