"""NBD URIs as libnbd's nbd_connect_uri(3) reads them (and nbdinfo agrees)."""
from __future__ import annotations

import re
import ssl

import pytest

from agents.nbd import Target, parse_uri, tls_context


@pytest.mark.parametrize("uri, want", [
    ("nbd://example.com", Target("", host="example.com")),
    ("nbd://example.com/", Target("", host="example.com")),
    ("nbd://example.com:1234/vol", Target("vol", host="example.com", port=1234)),
    ("nbd://[::1]:1234/vol", Target("vol", host="::1", port=1234)),
    ("nbd://127.0.0.1/a%20b%2Fc", Target("a b/c", host="127.0.0.1")),
    ("nbds://h/vol?tls-certificates=/etc/certs",
     Target("vol", host="h", tls=True, tls_certificates="/etc/certs")),
    ("nbds://h/vol?tls-verify-peer=false",
     Target("vol", host="h", tls=True, tls_verify_peer=False)),
    ("nbd+unix:///vol?socket=/run/s.sock", Target("vol", socket="/run/s.sock")),
    ("nbd+unix:///?socket=/run/s.sock", Target("", socket="/run/s.sock")),
    ("nbds+unix:///vol?socket=/s&tls-certificates=/c&tls-hostname=srv",
     Target("vol", socket="/s", tls=True, tls_certificates="/c", tls_hostname="srv")),
    ("NBD+UNIX:///vol?socket=/s", Target("vol", socket="/s")),
])
def test_parse(uri, want):
    assert parse_uri(uri) == want


@pytest.mark.parametrize("uri, says", [
    ("http://h/vol", "unsupported NBD URI scheme"),
    ("nbd+unix:///vol", "needs ?socket=PATH"),
    ("nbd+unix://host/vol?socket=/s", "takes no host"),
    ("nbd://h/vol?socket=/s", "only for nbd+unix"),
    ("nbd://h/vol?tls-certificates=/c", "without TLS"),
    ("nbds://h/vol?tls-psk-file=/k", "unsupported NBD URI parameter 'tls-psk-file'"),
    ("nbds://h/vol?tls-verify-peer=maybe", "tls-verify-peer"),
    ("nbd://h:notaport/vol", "bad port"),
    ("nbd+unix:///v?socket=/a&socket=/b", "given twice"),
])
def test_refused_with_a_reason(uri, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_uri(uri)


def test_tls_context_from_a_certificates_directory(pki):
    ctx = tls_context(parse_uri(f"nbds://localhost/v?tls-certificates={pki['client']}"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert any("splitd test CA" in str(ca.get("subject")) for ca in ctx.get_ca_certs())
    unix = tls_context(parse_uri(f"nbds+unix:///v?socket=/s&tls-certificates={pki['client']}"))
    assert unix.verify_mode == ssl.CERT_REQUIRED and not unix.check_hostname
    loose = tls_context(parse_uri("nbds://h/v?tls-verify-peer=false"))
    assert loose.verify_mode == ssl.CERT_NONE
    with pytest.raises(ValueError, match="not a directory"):
        tls_context(parse_uri("nbds://h/v?tls-certificates=/nonexistent"))
