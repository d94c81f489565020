"""Throw-away certificates for TLS tests: harness/pki.py (a CA and a server
certificate for localhost / 127.0.0.1 by default), named here for the tests
that import them from this module, and make_pki() for the agent's tests."""
from __future__ import annotations

from pathlib import Path

from harness.pki import KEY, make_ca, make_server_cert, openssl

__all__ = ["KEY", "make_ca", "make_pki", "make_server_cert", "openssl"]


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate and key it signed, and a second CA that
    signed nothing here: {"ca", "cert", "key", "other_ca"}."""
    ca = make_ca(d)
    cert, key = make_server_cert(d)
    return {"ca": ca, "cert": cert, "key": key, "other_ca": make_ca(d, "other-ca")}
