"""Throw-away certificates for TLS tests: harness/pki.py (a CA and a server
certificate for localhost / 127.0.0.1 by default), named here for the tests
that import them from this module."""
from __future__ import annotations

from harness.pki import KEY, make_ca, make_server_cert, openssl

__all__ = ["KEY", "make_ca", "make_server_cert", "openssl"]
