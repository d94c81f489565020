"""agents.nbd over TLS (X.509), against splitd --tls require and nbdkit
--tls=require, with the throw-away CA of tests/daemon/test_tls.py."""
from __future__ import annotations

import os
import shutil

import pytest

import agents.nbd as nbd
from tests.agents.conftest import nbdkit, run
from tests.daemon.pki import make_ca, openssl
from tests.daemon.test_tls import tls_daemon

MiB = 1 << 20


def tls_uri(d, certs, host: str = "127.0.0.1", extra: str = "") -> str:
    return f"nbds://{host}:{d.tcp_port}/vol?tls-certificates={certs}{extra}"


def test_splitd_tls_require(make_daemon, pki, loop):
    d = tls_daemon(make_daemon, pki, "require")

    async def go():
        for host in ("127.0.0.1", "localhost"):      # both in the certificate
            async with await nbd.open(tls_uri(d, pki["client"], host), connections=2) as cl:
                assert len(cl.connections) == 2
                data = os.urandom(5 * MiB)           # big reads: many TLS records
                await cl.write(MiB, data)
                assert await cl.read(MiB, len(data)) == data
                assert [e async for e in cl.extents()]
        # The CA and client certificate given as arguments instead of the URI's directory.
        d_ = pki["dir"]
        async with await nbd.open(f"nbds://localhost:{d.tcp_port}/vol",
                                  ca_file=str(d_ / "ca-cert.pem"), cert=str(d_ / "client-cert.pem"),
                                  key=str(d_ / "client-key.pem")) as cl:
            assert await cl.read(0, 4096) == bytes(4096)
        # A CA directory (hashed names, as `openssl rehash` makes them), no client certificate.
        async with await nbd.open(f"nbds://localhost:{d.tcp_port}/vol", ca_dir=str(ca_dir)) as cl:
            assert await cl.read(0, 4096) == bytes(4096)
    ca_dir = pki["dir"] / "ca-dir"
    ca_dir.mkdir(exist_ok=True)
    shutil.copy(pki["dir"] / "ca-cert.pem", ca_dir / "splitd-test-ca.pem")
    openssl("rehash", str(ca_dir), cwd=ca_dir)
    run(loop, go())


def test_splitd_tls_refusals(make_daemon, pki, tmp_path, loop):
    d = tls_daemon(make_daemon, pki, "require", "--tls-verify-peer")
    other = tmp_path / "other"
    other.mkdir()
    make_ca(other, "ca")                            # a CA that signed nothing of theirs

    async def go():
        # Plaintext where TLS is required: the server's refusal, with its message.
        with pytest.raises(nbd.ConnectError, match="ERR_TLS_REQD"):
            await nbd.open(f"nbd://127.0.0.1:{d.tcp_port}/vol")
        # A server certificate from a CA we do not trust.
        with pytest.raises(nbd.ConnectError, match="TLS handshake failed.*certificate verify failed"):
            await nbd.open(tls_uri(d, other))
        # A name the certificate does not carry.
        with pytest.raises(nbd.ConnectError, match="TLS handshake failed"):
            await nbd.open(tls_uri(d, pki["client"], extra="&tls-hostname=elsewhere.example"))
        # --tls-verify-peer and no client certificate: the server ends it.
        with pytest.raises((nbd.ConnectError, nbd.Disconnected)):
            cl = await nbd.open(tls_uri(d, pki["anonymous"]))
            try:
                await cl.read(0, 4096)
            finally:
                await cl.close()
        # Control: with the client certificate it is served.
        async with await nbd.open(tls_uri(d, pki["client"])) as cl:
            assert await cl.read(0, 4096) == bytes(4096)
    run(loop, go())


def test_nbdkit_tls_on_a_unix_socket(serve, pki, loop):
    srv = nbdkit(serve, "--tls=require", f"--tls-certificates={pki['dir']}", "memory", "16M")

    async def go():
        # A Unix socket has no host name: the chain is checked, not a name.
        uri = srv.uri(scheme="nbds+unix") + f"&tls-certificates={pki['client']}"
        async with await nbd.open(uri) as cl:
            data = os.urandom(3 * MiB)
            await cl.write(0, data)
            assert await cl.read(0, len(data)) == data
        with pytest.raises(nbd.ConnectError, match="TLS"):
            await nbd.open(srv.uri())
    run(loop, go())
